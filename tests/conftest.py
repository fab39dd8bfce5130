"""Shared fixtures: a tiny byte-level BPE tokenizer, tiny random Llama teacher/student saved with
save_pretrained (so every stage loads them with from_pretrained like a real checkpoint), a tiny corpus,
and a helper writing a test config derived from configs/tiny.yaml."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
WORDS = (
    "the king queen lord lady sword crown night day love death war peace fool wise old young good ill "
    "speak hear see come go stay fly run heart hand eye blood fire water earth air sweet bitter"
).split()
EOS = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def sentence(rng: random.Random, n_min: int = 4, n_max: int = 14) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(n_min, n_max))]
    return " ".join(words).capitalize() + "."


def corpus_texts(n: int, seed: int = 0) -> list[str]:
    """Deterministic pseudo-English documents of a few sentences each."""
    rng = random.Random(seed)
    return [" ".join(sentence(rng) for _ in range(rng.randint(1, 4))) for _ in range(n)]


def build_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=[EOS, "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_texts(300, seed=123), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def build_llama(out: Path, tokenizer, *, hidden: int, layers: int, seed: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def redeclare(unit_dir: Path) -> None:
    """Re-record the outputs a unit's marker declares as they are on disk now, as if the stage had written them
    like this: lineage then sees nothing wrong, and what a test damaged must be caught by the content checks (a
    shard from another teacher, format version, NaN...) that guard against a producer, not a disk, gone wrong."""
    from pipeline.rundir import MARKER, atomic_write_json, record_file

    marker = json.loads((unit_dir / MARKER).read_text())
    marker["outputs"] = {name: record_file(unit_dir / name) for name in marker["outputs"]}
    atomic_write_json(unit_dir / MARKER, marker)


def mark_complete(cfg, stage: str, unit: str | None, names: list[str], summary: dict | None = None) -> None:
    """Write the marker ``stage`` would write after producing the files ``names`` (relative to its unit directory)
    for ``cfg``: for tests that fabricate a stage's outputs instead of running it. Its upstream must be complete."""
    from pipeline.rundir import RunDir, record_file, stage_spec, unit_state

    rd = RunDir.from_config(cfg)
    state = unit_state(stage_spec(stage), cfg, rd, unit)
    assert not state.waiting, state.reason
    out = rd.stage_dir(stage, unit)
    rd.write_marker(stage, unit, state, {name: record_file(out / name) for name in names}, summary or {})


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> dict[str, Path]:
    """Paths of a tiny tokenizer, teacher (hidden 64, 3 layers), student (hidden 32, 2 layers) and corpus."""
    root = tmp_path_factory.mktemp("tiny_assets")
    tokenizer = build_tokenizer(root / "tokenizer")
    build_llama(root / "teacher", tokenizer, hidden=64, layers=3, seed=1)
    build_llama(root / "student", tokenizer, hidden=32, layers=2, seed=2)
    corpus = root / "corpus.jsonl"
    with open(corpus, "w") as fh:
        for text in corpus_texts(240):
            fh.write(json.dumps({"text": text}) + "\n")
    return {"tokenizer": root / "tokenizer", "teacher": root / "teacher", "student": root / "student", "corpus": corpus}


def write_config(tmp_path: Path, assets: dict[str, Path], overrides: dict | None = None) -> Path:
    """configs/tiny.yaml pointed at the fixtures and at tmp_path, with extra ``{"a.b": value}`` overrides."""
    from pipeline.config import apply_override

    data = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    base = {
        "runs_dir": str(tmp_path / "runs"),
        "logs_dir": str(tmp_path / "logs"),
        "teacher.name_or_path": str(assets["teacher"]),
        "student.name_or_path": str(assets["student"]),
        "manifest.sources.0.data_files": str(assets["corpus"]),
    }
    for key, value in {**base, **(overrides or {})}.items():
        apply_override(data, key.split("."), value)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


SMALL_MANIFEST = {"manifest.max_tokens": 2000, "manifest.rows_per_shard": 6}  # ~2k tokens in shards of 6 x 32


@pytest.fixture(scope="session")
def small_manifest(tmp_path_factory, tiny_assets) -> Path:
    """One tiny manifest (``SMALL_MANIFEST``), built once; tests copy it into their own run directory."""
    from pipeline import manifest

    root = tmp_path_factory.mktemp("small_manifest")
    assert manifest.main(["--config", str(write_config(root, tiny_assets, SMALL_MANIFEST))]) == 0
    return root / "runs" / "tiny" / "manifest"


@pytest.fixture
def tiny_config(tmp_path, tiny_assets):
    """A callable: ``tiny_config(**{"train.max_steps": 3})`` -> path of a config file under tmp_path."""

    def make(overrides: dict | None = None, **kw) -> Path:
        return write_config(tmp_path, tiny_assets, {**(overrides or {}), **kw})

    return make


@pytest.fixture(autouse=True)
def _seed():
    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
