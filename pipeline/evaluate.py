"""Evaluate stage: lm-evaluation-harness plus teacher-relative metrics for every model of a run.

Reads:
    runs/<run>/train/<variant>/final/        each trained student (the CE-only baseline is one of the variants)
    runs/<run>/train/<variant>/summary.json  its step count
    cfg.teacher                              the teacher (unit ``teacher``; skipped while its marker matches)
    runs/<run>/cache/val-*.parquet           held-out teacher top-k + tail: the shards the cache marker declares
    runs/<run>/manifest/val-*.parquet        held-out documents for the offline tasks, and every held-out row's text
                                             (bytes and characters per token): the shards manifest.json lists
Writes:
    runs/<run>/evaluate/tasks/               offline task YAMLs rendered from pipeline/eval_tasks/ + their data
    runs/<run>/evaluate/<model>/lm_eval/     lm-eval's own output (<model path sanitized>/results_<ts>.json, samples)
    runs/<run>/evaluate/<model>/results.json intrinsic metrics (per token, per byte and per character), task list
                                             and versions, provenance
    runs/<run>/evaluate/<model>/_COMPLETE.json
Run:
    python -m pipeline.evaluate --config C [--model NAME ...] [--force] [key.path=value ...]

Units are models: each variant of ``cfg.train.variants`` in config order, then ``teacher`` when
``evaluate.include_teacher``. The teacher's marker records only the teacher, its weights and the evaluation settings
(plus the manifest's and cache's identities), so retraining students reuses its result; a student's records its
training unit's outputs, so a retrained student's result is stale until it is evaluated again.

Offline tasks (``evaluate.local_tasks``): ``kd_heldout_mc`` (held-out documents cut into passages of
``evaluate.mc_passage_words`` words; pick a passage's true second half among ``evaluate.mc_choices``; distractors
are other passages' second halves cut to the same word count) and
``kd_heldout_ppl`` (rolling log-likelihood: word/byte perplexity of whole held-out documents). Their data comes
from the first ``evaluate.local_task_docs`` held-out documents (the manifest's val split, decoded with the teacher
tokenizer, split at EOS) and a ``random.Random(seed)`` draw, so every model of a run sees identical items.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import importlib.metadata
import json
import logging
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import definition, lm_head
from pipeline.config import Config, ConfigError, EvalTaskConfig, ModelConfig, model_identity, section_hash
from pipeline.data_format import read_manifest, read_packed_shard, shard_paths
from pipeline.jsonlog import JsonLogger
from pipeline.metrics import INTRINSIC_METRICS, IntrinsicAccumulator
from pipeline.modeling import device, load_causal_lm, load_tokenizer, vocab_hash, weights_fingerprint
from pipeline.rundir import (
    REPO,
    PipelineError,
    RunDir,
    StageContext,
    StageSpec,
    atomic_write_json,
    atomic_write_text,
    stage_main,
)

TEACHER = definition.TEACHER
TASK_TEMPLATES = Path(__file__).resolve().parent / "eval_tasks"
LOCAL_TASKS = ("kd_heldout_mc", "kd_heldout_ppl")
MIN_MC_WORDS = 4  # a context and a continuation of at least two words each
PACKAGES = ("torch", "transformers", "lm_eval", "datasets", "accelerate", "peft")
CACHE_COLUMNS = ("input_ids", "attention_mask", "topk_ids", "topk_logprobs", "tail_logmass")
# lm-eval warnings that do not apply to how this stage calls it: dropped, and explained once in the stage log
EXPECTED_LM_EVAL_WARNINGS = {
    "`pretrained` model kwarg is not of type `str`": (
        "lm-eval warns that `pretrained` is not a string: expected, evaluate hands it the model it already loaded "
        "for the intrinsic metrics (one load, no launcher), so the arguments it says it ignores are not used"
    ),
    "instruct or chat variant but chat template is not applied": (
        "lm-eval advises applying the chat template: not for the offline kd_heldout tasks, which score plain "
        "held-out text (a chat template would change the text being scored); shown for other tasks"
    ),
}
_EXPLAINED: set[str] = set()


# ------------------------------------------------------------------------------------------- offline tasks
def heldout_documents(manifest_dir: Path, tokenizer: Any, max_docs: int) -> list[str]:
    """The first ``max_docs`` non-empty held-out documents: real tokens of the val split in order, split at EOS."""
    manifest = read_manifest(manifest_dir)
    if manifest["tokenizer"]["vocab_hash"] != vocab_hash(tokenizer):
        raise PipelineError(
            f"{manifest_dir / 'manifest.json'}: tokenizer.vocab_hash {manifest['tokenizer']['vocab_hash']} differs "
            f"from the teacher tokenizer's {vocab_hash(tokenizer)}; rerun the manifest stage"
        )
    eos = manifest["tokenizer"]["eos_token_id"]
    parts = []
    for path in shard_paths(manifest, manifest_dir, "val"):
        shard = read_packed_shard(path)
        parts.append(shard["input_ids"][shard["attention_mask"].astype(bool)])
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    docs = []
    for piece in np.split(stream, np.flatnonzero(stream == eos)):
        text = tokenizer.decode(piece[piece != eos].tolist(), skip_special_tokens=True).strip()
        if text:
            docs.append(text)
        if len(docs) == max_docs:
            break
    return docs


def build_mc_items(docs: list[str], n_choices: int, seed: int, passage_words: int = 32) -> list[dict[str, Any]]:
    """Continuation multiple choice: each document is cut into passages of ``passage_words`` words (a last, shorter
    one too if it has at least :data:`MIN_MC_WORDS`), so a few long held-out documents still give many items;
    context = a passage's first half, the true choice its second half; distractors are other passages' second
    halves cut to the true one's word count (length gives nothing away)."""
    rng = random.Random(seed)
    halves = []
    for doc in docs:
        words = doc.split()
        for start in range(0, len(words), passage_words):
            passage = words[start : start + passage_words]
            if len(passage) >= MIN_MC_WORDS:
                half = len(passage) // 2
                halves.append((" ".join(passage[:half]), passage[half:]))
    items = []
    for i, (context, true_words) in enumerate(halves):
        true = " ".join(true_words)
        pool = [" ".join(w[: len(true_words)]) for j, (_, w) in enumerate(halves) if j != i]
        pool = sorted(set(pool) - {true})
        if len(pool) < n_choices - 1:
            continue
        choices = [true, *rng.sample(pool, n_choices - 1)]
        rng.shuffle(choices)
        items.append({"id": i, "context": context, "choices": choices, "label": choices.index(true)})
    return items


def _write_if_changed(path: Path, text: str) -> None:
    """Atomic write that leaves an identical file untouched (units share the task directory)."""
    if not path.exists() or path.read_text() != text:
        atomic_write_text(path, text)


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows)


def prepare_local_tasks(cfg: Config, rd: RunDir, teacher_tokenizer: Any) -> Path:
    """Write the offline tasks' data and rendered YAMLs into ``runs/<run>/evaluate/tasks/`` (deterministic)."""
    task_dir = rd.stage_dir("evaluate", "tasks")
    docs = heldout_documents(rd.stage_dir("manifest"), teacher_tokenizer, cfg.evaluate.local_task_docs)
    mc = build_mc_items(docs, cfg.evaluate.mc_choices, cfg.seed, cfg.evaluate.mc_passage_words)
    if not mc:
        raise PipelineError(
            f"{rd.stage_dir('manifest')}: the val split has {len(docs)} documents, too few with >= {MIN_MC_WORDS} "
            f"words for a {cfg.evaluate.mc_choices}-choice task; raise manifest.val_fraction or lower mc_choices"
        )
    task_dir.mkdir(parents=True, exist_ok=True)
    _write_if_changed(task_dir / "kd_heldout_mc.jsonl", _jsonl(mc))
    _write_if_changed(task_dir / "kd_heldout_ppl.jsonl", _jsonl([{"id": i, "text": d} for i, d in enumerate(docs)]))
    for template in sorted(TASK_TEMPLATES.glob("*.yaml")):
        text = template.read_text().replace("@TASK_DATA@", str(task_dir.resolve()))
        _write_if_changed(task_dir / template.name, text)
    return task_dir


def task_list(cfg: Config) -> list[EvalTaskConfig]:
    """Configured tasks plus the offline ones (unless listed explicitly, where that entry's settings win)."""
    tasks = list(cfg.evaluate.tasks)
    if cfg.evaluate.local_tasks:
        named = {t.name for t in tasks}
        tasks += [EvalTaskConfig(name=n) for n in LOCAL_TASKS if n not in named and "kd_heldout" not in named]
    return tasks


# -------------------------------------------------------------------------------------------------- lm-eval
_MANAGERS: dict[tuple[str | None, bool], Any] = {}


def task_manager(include_path: Path | None, tasks: list[EvalTaskConfig]) -> Any:
    """A ``TaskManager`` over our rendered tasks, indexing lm-eval's ~15k built-in task YAMLs only when a requested
    name is not ours (indexing them takes tens of seconds); one per process, shared by every model evaluated."""
    from lm_eval.tasks import TaskManager

    local = set()
    if include_path is not None:
        local = {p.stem for p in Path(include_path).glob("*.yaml")}
    defaults = not all(t.name in local for t in tasks)
    key = (str(include_path) if include_path else None, defaults)
    if key not in _MANAGERS:
        _MANAGERS[key] = TaskManager(include_path=key[0], include_defaults=defaults)
    return _MANAGERS[key]


def run_lm_eval(
    model: torch.nn.Module,
    tokenizer: Any,
    model_path: str,
    tasks: list[EvalTaskConfig],
    cfg: Config,
    out_dir: Path,
    include_path: Path | None,
    log: JsonLogger,
) -> dict[str, Any]:
    """Run lm-eval through its Python API, one ``simple_evaluate`` per (few-shot, limit) group, writing its own
    layout (``<out_dir>/<sanitized model>/results_<timestamp>.json`` + samples) via ``EvaluationTracker``.

    The output is built in a temporary sibling and renamed over ``out_dir`` at the end, so a crash never leaves a
    half-written result. Returns per-task versions, few-shot, limits and sample counts, and the written files.
    """
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.models.huggingface import HFLM

    manager = task_manager(include_path, tasks)
    offline_only = all(task.name.startswith("kd_heldout") for task in tasks)
    with expected_lm_eval_warnings(log, offline_only):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.evaluate.batch_size)
        groups: dict[tuple[int, int | None], list[str]] = {}
        for task in tasks:
            groups.setdefault((task.num_fewshot, task.limit), []).append(task.name)

        tmp = out_dir.with_name(f".{out_dir.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        info: dict[str, Any] = {"versions": {}, "n_shot": {}, "n_samples": {}, "limits": {}, "files": []}
        for (num_fewshot, limit), names in groups.items():
            tracker = EvaluationTracker(output_path=str(tmp))
            results = simple_evaluate(
                model=lm,
                model_args={"pretrained": model_path},  # names the tracker's output directory and is recorded
                tasks=names,
                num_fewshot=num_fewshot,
                limit=limit,
                batch_size=cfg.evaluate.batch_size,
                task_manager=manager,
                evaluation_tracker=tracker,
                log_samples=True,
                bootstrap_iters=cfg.evaluate.bootstrap_iters,
                random_seed=cfg.seed,
                numpy_random_seed=cfg.seed,
                torch_random_seed=cfg.seed,
                fewshot_random_seed=cfg.seed,
            )
            samples = results.pop("samples")
            tracker.save_results_aggregated(results=results, samples=samples)
            for name in results["configs"]:
                tracker.save_results_samples(task_name=name, samples=samples[name])
            info["versions"].update(results.get("versions", {}))
            info["n_shot"].update(results.get("n-shot", {}))
            info["n_samples"].update(results.get("n-samples", {}))
            info["limits"].update({name: limit for name in results["configs"]})
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
        info["files"] = sorted(str(p.relative_to(out_dir.parent)) for p in out_dir.rglob("results_*.json"))
    return info


@contextlib.contextmanager
def expected_lm_eval_warnings(log: JsonLogger, offline_only: bool) -> Iterator[None]:
    """While lm-eval runs, drop its warnings of :data:`EXPECTED_LM_EVAL_WARNINGS` that do not apply here (the
    chat-template advice only when every task is an offline ``kd_heldout`` one) and explain each once per process
    in the stage log instead; every other lm-eval message passes unchanged."""
    dropped = {k: v for k, v in EXPECTED_LM_EVAL_WARNINGS.items() if offline_only or "chat template" not in k}

    def keep(record: logging.LogRecord) -> bool:
        text = " ".join(record.getMessage().split())  # lm-eval wraps its advice over several indented lines
        for phrase, why in dropped.items():
            if phrase in text:
                if phrase not in _EXPLAINED:
                    _EXPLAINED.add(phrase)
                    log.info("lm_eval_note", why)
                return False
        return True

    loggers = [logging.getLogger(name) for name in ("lm_eval.evaluator", "lm_eval.models.huggingface")]
    for logger in loggers:
        logger.addFilter(keep)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(keep)


# ------------------------------------------------------------------------------------------ intrinsic metrics
@torch.inference_mode()
def intrinsic_metrics(
    model: torch.nn.Module, tokenizer: Any, cfg: Config, rd: RunDir
) -> tuple[dict[str, float], dict[str, Any] | None]:
    """Held-out perplexity, top-1 agreement, KL(teacher‖student), ECE, bits per byte and per-character perplexity
    over the held-out cache (see metrics), the LM head applied ``evaluate.logits_chunk`` positions at a time; and how
    a student with another tokenizer read it (None for a model that shares the teacher's vocabulary): its rows are the
    held-out text re-tokenized (``pipeline.xtok``), its teacher-relative metrics count the aligned positions, and
    aligned_fraction / mapped_mass_fraction join the metrics."""
    from pipeline import xtok
    from pipeline.cache_format import CacheDataset, list_cache_shards, read_cache_meta, to_compute, validate_for_student

    files = list_cache_shards(rd.stage_dir("cache"), "val")
    if not files:
        raise PipelineError(f"{rd.stage_dir('cache')}: no val-*.parquet cache shards; rerun the cache stage")
    meta = read_cache_meta(files[0])
    columns = ["sample_id", *CACHE_COLUMNS]
    data: Any = CacheDataset(files, batch_size=cfg.evaluate.batch_size, shuffle=False, columns=columns)
    texts, cross = xtok.RowTexts(rd.stage_dir("manifest"), files), None
    teacher_tokenizer = load_tokenizer(cfg.teacher)
    cached = xtok.cache_ids(tokenizer, teacher_tokenizer)
    validate_for_student(meta, vocab_hash=cached.vocab_hash, vocab_size=cached.vocab_size, reader=cached.reader)
    if cached.other:
        cross = xtok.setup_for_model(teacher_tokenizer, tokenizer, rd.stage_dir("manifest"), model.config)
        data = cross.wrap(data)
    acc = IntrinsicAccumulator(cfg.evaluate.ece_bins, temperature=float(meta.get("temperature", 1.0)))
    stats = torch.zeros(len(xtok.STAT_KEYS), dtype=torch.float64)
    on = next(model.parameters()).device
    chunk = cfg.evaluate.logits_chunk
    body, head = lm_head.body_and_head(model)
    model.eval()
    for i, batch in enumerate(data):
        if cfg.evaluate.intrinsic_batches is not None and i >= cfg.evaluate.intrinsic_batches:
            break
        if cross is None:  # bytes and characters of every predicted token, from the manifest's row text
            spans = xtok.teacher_row_spans(texts, batch["sample_id"].tolist(), batch["attention_mask"].numpy())
            batch["next_bytes"], batch["next_chars"] = spans
        else:
            stats += batch["xtok_stats"]
        batch = to_compute(batch, on)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if chunk:  # the LM head chunk by chunk: no [B, T, V] logits (pipeline.lm_head)
            acc.update_chunks(batch, lm_head.logits_in_chunks(body(**inputs).last_hidden_state, head, chunk))
        else:
            acc.update(model(**inputs).logits, batch)
    result = acc.result()
    if cross is None:
        return result, None
    summary = xtok.stats_summary(stats.tolist())
    result["aligned_fraction"] = summary["aligned_fraction"]
    result["mapped_mass_fraction"] = summary.get("mapped_mass_fraction", float("nan"))
    return result, {**cross.provenance(getattr(tokenizer, "name_or_path", "")), **summary}


# ------------------------------------------------------------------------------------------------ provenance
def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages a score depends on (None when absent)."""
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_hash() -> str | None:
    """Commit of the pipeline code (with a ``-dirty`` suffix when the tree has local changes), None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def evaluated_model(cfg: Config, rd: RunDir, unit: str) -> tuple[ModelConfig, int | None]:
    """The model to load for a unit and its training step (None for the teacher)."""
    if unit == TEACHER:
        # evaluate is one process: a teacher the cache split over several GPUs is spread over the job's GPUs here
        spread = cfg.teacher.device_map or ("auto" if cfg.teacher.tensor_parallel > 1 else None)
        return dataclasses.replace(cfg.teacher, device_map=spread), None
    final = rd.stage_dir("train", unit) / "final"
    if not (final / "config.json").exists():
        raise PipelineError(f"{final}: no trained model (config.json missing); rerun train --variant {unit}")
    summary_path = rd.stage_dir("train", unit) / "summary.json"
    try:
        step = int(json.loads(summary_path.read_text())["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        step = None
    settings = dataclasses.replace(cfg.student, name_or_path=str(final), tokenizer=None, revision=None, gguf_file=None)
    return settings, step


# ------------------------------------------------------------------------------------------------------ stage
def run(cfg: Config, rd: RunDir, ctx: StageContext) -> dict[str, float]:
    """Evaluate one model (``ctx.unit``) and write its results.json; returns the intrinsic metrics."""
    unit = ctx.unit or TEACHER
    out = rd.stage_dir("evaluate", unit)
    settings, step = evaluated_model(cfg, rd, unit)
    key = TEACHER if unit == TEACHER else "student"
    started = time.monotonic()
    tasks = task_list(cfg)
    # task names were checked with the config (pipeline.validate) before anything ran
    include = prepare_local_tasks(cfg, rd, load_tokenizer(cfg.teacher)) if tasks and cfg.evaluate.local_tasks else None
    tokenizer = load_tokenizer(settings, key)
    model = load_causal_lm(settings, key, device())
    model.eval()

    intrinsic, student_rows = intrinsic_metrics(model, tokenizer, cfg, rd)
    ctx.log.info("intrinsic", f"{unit}: held-out metrics", **intrinsic)

    ctx.begin_writes()  # the model loaded and its held-out metrics computed: now replace the earlier result
    lm_eval_info: dict[str, Any] = {}
    if tasks:
        lm_eval_info = run_lm_eval(
            model, tokenizer, settings.name_or_path, tasks, cfg, out / "lm_eval", include, ctx.log
        )
        ctx.log.info("lm_eval", f"{unit}: {len(lm_eval_info['versions'])} tasks", files=lm_eval_info["files"])

    results = {
        "model": unit,
        "model_path": settings.name_or_path,
        "step": step,
        "intrinsic": intrinsic,
        "intrinsic_higher_is_better": {m.name: m.higher_is_better for m in INTRINSIC_METRICS.values()},
        "tasks": [dataclasses.asdict(t) for t in tasks],
        "lm_eval_files": lm_eval_info.get("files", []),
        "task_versions": lm_eval_info.get("versions", {}),
        "n_shot": lm_eval_info.get("n_shot", {}),
        "n_samples": lm_eval_info.get("n_samples", {}),
        "limits": lm_eval_info.get("limits", {}),
        # a student with another tokenizer: how its held-out rows were made from the teacher's (pipeline.xtok)
        **({"student_rows": student_rows} if student_rows else {}),
        "provenance": {
            "config_hash": section_hash(sections(cfg, unit)),
            "packages": package_versions(),
            "python": sys.version.split()[0],
            "git_hash": git_hash(),
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "seed": cfg.seed,
            "device": str(next(model.parameters()).device),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "eval_time_s": round(time.monotonic() - started, 3),
        },
    }
    atomic_write_json(out / "results.json", results)
    return {k: v for k, v in intrinsic.items() if isinstance(v, float)}


def sections(cfg: Config, unit: str | None) -> dict[str, Any]:
    """What a model's results depend on besides its inputs (the trained weights, or the teacher's): how it is loaded
    and the evaluation settings."""
    model = {"teacher": model_identity(cfg.teacher)} if unit == TEACHER else {"student": cfg.student, "model": unit}
    return {**model, "evaluate": cfg.evaluate, "seed": cfg.seed}


def upstream(cfg: Config, unit: str | None) -> list[tuple[str, str | None]]:
    """The held-out manifest and cache for every model; the variant's training for a student."""
    return definition.upstream(cfg, "evaluate", unit)


def external(cfg: Config, unit: str | None) -> dict[str, str]:
    """The teacher's weights for the teacher's unit (a student's weights are train's declared output)."""
    return {"weights:teacher": weights_fingerprint(cfg.teacher, "teacher")} if unit == TEACHER else {}


def outputs(cfg: Config, rd: RunDir, unit: str | None) -> dict[str, str | None]:
    """results.json and every file of lm-eval's own output (the report reads the results files results.json lists)."""
    out = rd.stage_dir("evaluate", unit)
    files = [out / "results.json", *(p for p in (out / "lm_eval").rglob("*") if p.is_file())]
    return {str(p.relative_to(out)): None for p in files}


def units(cfg: Config, args: Any) -> list[str]:
    """Every variant in config order, then the teacher; ``--model`` picks a subset."""
    every = definition.units(cfg, "evaluate")
    chosen = getattr(args, "model", None) or every
    for name in chosen:
        if name not in every:
            raise ConfigError(f"--model: expected one of {', '.join(every)}, got {name!r}")
    return [m for m in every if m in chosen]


def add_args(parser: Any) -> None:
    parser.add_argument("--model", action="append", help="evaluate only this model (repeatable; variant or teacher)")


SPEC = StageSpec(
    name="evaluate",
    run=run,
    sections=sections,
    upstream=upstream,
    external=external,
    outputs=outputs,
    units=units,
    add_args=add_args,
)


def main(argv: list[str] | None = None) -> int:
    return stage_main(SPEC, argv)


if __name__ == "__main__":
    sys.exit(main())
