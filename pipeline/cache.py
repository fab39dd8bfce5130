"""Cache stage: one teacher pass over every manifest shard stores top-k log-probs, tail mass, hidden states and
pooled embeddings in self-describing Parquet shards (format: pipeline/cache_format.py).

Reads   ``runs/<run>/manifest/`` (manifest.json + packed shards), the teacher (``cfg.teacher``) and its tokenizer.
Writes  ``runs/<run>/cache/{train,val}-NNNNN.parquet`` (same stems as the manifest), a completion record per shard
        ``runs/<run>/cache/_shards/<stem>.json`` {sha256, rows, bytes, signature, ...}, ``config.yaml`` and, last,
        ``_COMPLETE.json`` once every shard of every task is complete (stage wrapper).
Run     ``python -m pipeline.cache --config C [key.path=value ...] [--force] [--task-index I --task-count N]``
        ``python -m pipeline.cache --config C --plan``  (size estimate from the schema; no teacher forward)

Per batch of ``cache.batch_size`` rows the teacher body runs once; forward hooks keep only the configured hidden
states (not all L + 1 of ``output_hidden_states``: ~21 GB of bf16 for a 70B teacher at 8 x 2048), and the LM head,
temperature, log-softmax, top-k and tail mass are computed from the body's final (post-norm) hidden state in chunks
of ``cache.logits_chunk`` positions, in place, so the extra peak memory is one [chunk, V] fp32 block instead of
[B, T, V]. Stored log-probs are those of the full distribution at the capture temperature (not renormalised over k);
the tail is the sum of the probabilities outside the top-k (not 1 - their complement), accurate even when the
top-k hold almost all mass.

Resumable and shard-parallel: task ``I`` of ``N`` (defaults: Slurm array task id relative to the array's minimum,
and the array's task count) owns shards ``I, I+N, ...`` of the combined train+val list. A shard counts as done when
its record's signature (output-affecting config, teacher fingerprint, manifest shard checksum, format version)
matches and the file is the one recorded (size and mtime; re-hashed when the mtime moved); anything else, a deleted
or damaged shard included, is recomputed on a plain rerun, and only that shard. Shards and records that no shard of
the current manifest maps to (a rebuilt, smaller manifest) are deleted; the stage marker declares exactly the
current shards with their checksums, and consumers read only those. Shards are written atomically and
deterministically, so a kill -9 at any moment followed by a rerun gives byte-identical shards. On USR1 the current
shard is finished, then the stage asks for a requeue and exits; SIGTERM stops it at once (pipeline.preemption).

Several processes per task (``--nproc-per-node G``, torchrun): ``teacher.tensor_parallel`` T makes them G/T teacher
replicas (``pipeline.teacher_parallel``: transformers' tensor parallelism on each replica's ranks, a whole teacher
per rank when T = 1, an exact vocabulary-parallel top-k). Rank 0 decides which shards are pending, replica r takes
every R-th of them and its TP rank 0 writes them and their records; the ranks of a replica stop together at a shard
boundary on USR1, and all ranks meet before the marker is considered.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline import cache_format as cf
from pipeline import data_format, definition, losses, preemption, sampling, validate
from pipeline import modeling as mdl
from pipeline import teacher_parallel as tp
from pipeline.config import CacheConfig, Config, ConfigError, model_identity, section_hash
from pipeline.config import load as load_config
from pipeline.jsonlog import JsonLogger, console_progress
from pipeline.rundir import (
    PipelineError,
    RunDir,
    StageContext,
    StageSpec,
    atomic_write_json,
    build_parser,
    cli_exit_code,
    file_problem,
    record_file,
    stage_main,
)

STAGE = "cache"
RECORDS = "_shards"
EXECUTION_ONLY = ("batch_size", "logits_chunk", "log_every_s")  # cache fields that do not change what is stored


# ------------------------------------------------------------------------------------------------ extraction
def topk_chunked(
    final_hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    top_k: int,
    temperature: float,
    chunk: int,
    on_logprobs: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k log-probs of the full tempered distribution and the tail log-mass, ``chunk`` positions at a time.

    final_hidden: [N, H] (the post-norm last hidden state). Returns (values [N, k] fp32, ids [N, k] int64,
    tail [N] fp32) on the LM head's device. Per chunk the logits become log-probs and then the tail sum in place,
    so the extra peak memory is one [chunk, V] fp32 block (plus a model-dtype copy when the head is not fp32).
    ``on_logprobs(first position, log-probs [c, V], top-k ids [c, k])`` sees each chunk's full log-probs before the
    tail sum overwrites them (the sampled targets are drawn there).
    """
    values, ids, tails = [], [], []
    for start in range(0, final_hidden.shape[0], chunk):
        logits = lm_head(final_hidden[start : start + chunk]).float()  # [c, V]
        if temperature != 1.0:
            logits.div_(temperature)
        torch.log_softmax(logits, dim=-1, out=logits)
        top_values, top_ids = torch.topk(logits, top_k, dim=-1)
        if on_logprobs is not None:
            on_logprobs(start, logits, top_ids)
        # the mass outside the top-k, summed in place (no [c, V] temporary): the entries are normalised
        # log-probs <= 0, so exp cannot overflow, and a tiny tail is summed directly rather than as 1 - sum(top-k)
        logits.scatter_(-1, top_ids, float("-inf")).exp_()
        tails.append(logits.sum(dim=-1).log_())  # -inf when k == V
        values.append(top_values)
        ids.append(top_ids)
        del logits
    return torch.cat(values), torch.cat(ids), torch.cat(tails)


@dataclasses.dataclass
class Extraction:
    """What to extract from one teacher forward (hidden indices already normalised)."""

    top_k: int
    temperature: float
    hidden_layers: list[int]
    hidden_dtype: torch.dtype
    positions: list[int] | None
    embed_layer: int | None
    logits_chunk: int
    draws: int = 0  # sampled tokens per position (0: top-k only)
    support: str | None = None  # what they are drawn from: "full" vocabulary or the "tail" outside the top-k
    proposal_temperature: float = 1.0


def decoder_layers(body: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder blocks of a transformers decoder (``model.get_decoder().layers``: Llama, Mistral, Qwen, Gemma...)."""
    layers = getattr(body, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise PipelineError(
            f"teacher: {type(body).__name__} has no ModuleList ``layers`` of decoder blocks; hidden states cannot "
            "be captured with hooks for this architecture"
        )
    return layers


@contextlib.contextmanager
def capture_hidden_states(body: torch.nn.Module, indices: set[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Keep ``hidden_states[i]`` for ``i`` in ``indices`` (below the number of blocks L) while the body runs.

    Same convention as ``output_hidden_states`` (``pipeline.modeling.HIDDEN_INDEX_CONVENTION``): index 0 is the
    input of block 0 (the embeddings output, captured by a pre-hook), index i the output of block i (a forward hook
    on ``layers[i - 1]``). Index L, the post-norm final state, is the body's ``last_hidden_state`` and not captured
    here. Only the requested tensors stay referenced, so the others are freed as the forward proceeds.
    """
    layers = decoder_layers(body)
    captured: dict[int, torch.Tensor] = {}

    def keep_input(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        captured[0] = args[0] if args else kwargs["hidden_states"]

    def keep_output(index: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
            captured[index] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = []
    for index in sorted(indices):
        if index == 0:
            handles.append(layers[0].register_forward_pre_hook(keep_input, with_kwargs=True))
        elif index < len(layers):
            handles.append(layers[index - 1].register_forward_hook(keep_output(index)))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@torch.inference_mode()
def extract_batch(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    extraction: Extraction,
    uniforms: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """One teacher pass over [B, T] rows -> CPU tensors: topk_logprobs/topk_ids [B,T,k], tail_logmass [B,T],
    ``hidden_<i>`` [B,Tsub,H] in the storage dtype, embed [B,H] fp32; with ``extraction.draws``, sampled_ids and
    sampled_weights [B,T,n] drawn at ``uniforms`` [B,T,n] (``sampling.row_uniforms`` of these rows)."""
    body, lm_head = model.get_decoder(), model.get_output_embeddings()
    inputs = input_ids.to(model.get_input_embeddings().weight.device)
    mask = attention_mask.to(inputs.device)
    wanted = set(extraction.hidden_layers) | ({extraction.embed_layer} if extraction.embed_layer is not None else set())
    with capture_hidden_states(body, wanted) as states:
        out = body(input_ids=inputs, attention_mask=mask, use_cache=False)
    states[len(decoder_layers(body))] = out.last_hidden_state  # hidden_states[L] is post-norm
    batch, seq_len = input_ids.shape
    final = out.last_hidden_state.to(lm_head.weight.device).reshape(batch * seq_len, -1)
    head = (extraction.top_k, extraction.temperature, extraction.logits_chunk)
    drawn: list[tuple[torch.Tensor, torch.Tensor]] = []
    if tp.vocab_sharded(lm_head):
        if extraction.draws:  # validate refuses this config; a direct caller gets the reason
            raise PipelineError("sampled targets need the whole vocabulary on one process (teacher.tensor_parallel 1)")
        values, ids, tail = tp.vocab_parallel_topk(final, lm_head, *head)
    else:
        flat_uniforms = None if uniforms is None else uniforms.reshape(batch * seq_len, -1).to(final.device)

        def draw(start: int, logp: torch.Tensor, top_ids: torch.Tensor) -> None:
            exclude = top_ids if extraction.support == "tail" else None
            u = flat_uniforms[start : start + len(logp)]
            drawn.append(sampling.draw(logp, u, proposal_temperature=extraction.proposal_temperature, exclude=exclude))

        values, ids, tail = topk_chunked(final, lm_head, *head, draw if extraction.draws else None)
    floor = cf.LOGPROB_FLOOR
    result = {
        "topk_logprobs": values.clamp_min(floor).reshape(batch, seq_len, -1).cpu(),
        "topk_ids": ids.reshape(batch, seq_len, -1).cpu(),
        "tail_logmass": tail.clamp_min(floor).reshape(batch, seq_len).cpu(),
    }
    if drawn:
        result["sampled_ids"] = torch.cat([d[0] for d in drawn]).reshape(batch, seq_len, -1).cpu()
        result["sampled_weights"] = torch.cat([d[1] for d in drawn]).reshape(batch, seq_len, -1).cpu()
    for layer in extraction.hidden_layers:
        hidden = states[layer]
        if extraction.positions is not None:
            hidden = hidden[:, torch.tensor(extraction.positions, device=hidden.device)]
        result[cf.hidden_column(layer)] = hidden.to(extraction.hidden_dtype).cpu()
    if extraction.embed_layer is not None:
        result["embed"] = losses.pool_hidden(  # the pooling the relation loss applies to the student
            states[extraction.embed_layer], mask.to(states[extraction.embed_layer].device)
        ).cpu()
    return result


def to_columns(parts: list[dict[str, torch.Tensor]], packed: dict[str, Any]) -> dict[str, np.ndarray]:
    """Concatenate per-batch results into the numpy columns :func:`cache_format.write_shard` takes."""
    cols: dict[str, np.ndarray] = {
        "sample_id": packed["sample_id"].astype(np.int64),
        "input_ids": packed["input_ids"].astype(np.int32),
        "attention_mask": packed["attention_mask"].astype(np.int8),
    }
    for name in parts[0]:
        merged = torch.cat([p[name] for p in parts])
        if name in ("topk_ids", "sampled_ids"):
            cols[name] = merged.to(torch.int32).numpy()
        elif name in ("topk_logprobs", "tail_logmass", "sampled_weights"):
            cols[name] = merged.to(torch.float16).numpy()
        elif name.startswith("hidden_"):
            cols[name] = merged.view(torch.int16).numpy()  # raw 2-byte patterns of fp16/bf16
        else:
            cols[name] = merged.numpy()
    return cols


# ------------------------------------------------------------------------------------------------- planning
def resolve_extraction(
    cache_settings: CacheConfig, teacher_config: Any, seq_len: int, seed: int
) -> tuple[Extraction, dict[str, Any]]:
    """What to extract and the metadata fields it implies, hidden indices normalised against the teacher's
    config (the config rules themselves, ranges included, are ``pipeline.validate``'s and ran at stage start)."""
    count = validate.num_hidden_states(teacher_config)
    layers = [
        validate.hidden_index(i, count, f"cache.hidden_layers.{n}") for n, i in enumerate(cache_settings.hidden_layers)
    ]
    embed = (
        None
        if cache_settings.embed_layer is None
        else validate.hidden_index(cache_settings.embed_layer, count, "cache.embed_layer")
    )
    positions = cf.hidden_positions(seq_len, cache_settings.hidden_every_n, cache_settings.hidden_fraction, seed)
    sampled = sampling_meta(cache_settings, seed)
    extraction = Extraction(
        top_k=cache_settings.top_k,
        temperature=cache_settings.temperature,
        hidden_layers=layers,
        hidden_dtype=cf.HIDDEN_DTYPES[cache_settings.hidden_dtype],
        positions=positions,
        embed_layer=embed,
        logits_chunk=cache_settings.logits_chunk,
        draws=0 if sampled is None else cache_settings.samples,
        support=None if sampled is None else sampled["support"],
        proposal_temperature=cache_settings.proposal_temperature,
    )
    fields = {
        "top_k": cache_settings.top_k,
        "temperature": cache_settings.temperature,
        "hidden_layers": layers,
        "hidden_dim": int(teacher_config.hidden_size),
        "hidden_dtype": cache_settings.hidden_dtype,
        "hidden_positions": positions,
        "hidden_index_convention": mdl.HIDDEN_INDEX_CONVENTION,
        "num_hidden_states": count,
        "embed_layer": embed,
        "targets": cache_settings.targets,
        "sampling": sampled,
        "seq_len": seq_len,
    }
    return extraction, fields


def sampling_meta(cache_settings: CacheConfig, seed: int) -> dict[str, Any] | None:
    """The shards' self-description of their sampled columns (None for a top-k-only cache)."""
    if cache_settings.targets == "topk":
        return None
    return {
        "draws": cache_settings.samples,
        "support": "full" if cache_settings.targets == "sampled" else "tail",
        "proposal_temperature": cache_settings.proposal_temperature,
        "seed": seed,
        "weights": "w_v = (c_v / draws) * p(v) / q(v); q = p^(1/proposal_temperature) renormalised on the support "
        "(full: the vocabulary; tail: the tokens outside the top-k); E[w_v] = p(v)",
        "uniforms": "draw j of position t in row r is the inverse CDF of q at numpy.random.default_rng([seed, "
        "int(manifest_sha256[:15], 16), r]).random((seq_len, draws), float32)[t, j]",
    }


def plan_rows(cfg: Config, manifest: dict[str, Any], teacher_config: Any) -> list[dict[str, Any]]:
    """Per-column size estimate of the whole cache from the schema (no model forward).

    ``raw`` is exact uncompressed bytes; ``est`` assumes what zstd + BYTE_STREAM_SPLIT typically achieve: ids shrink
    to the bytes the vocabulary needs, fp16 log-probs to ~1.7 bytes, hidden states to ~92 % (measured on random
    and SmolLM2 data; real ratios vary, use ``raw`` as the upper bound).
    """
    seq_len = int(manifest["seq_len"])
    _, fields = resolve_extraction(cfg.cache, teacher_config, seq_len, cfg.seed)
    meta = {**fields, "rows": 0}
    schema = cf.cache_schema(meta)
    rows = sum(int(manifest["splits"][s]["rows"]) for s in data_format.SPLITS)
    tokens = rows * seq_len
    id_bytes = max(1, int(np.ceil(np.log2(max(2, int(teacher_config.vocab_size))) / 8)))
    ratio = {"topk_ids": id_bytes / 4, "topk_logprobs": 0.85, "tail_logmass": 0.85, "input_ids": id_bytes / 4}
    table = []
    for field in schema:
        raw = cf.bytes_per_row(pa.schema([field]))
        est = raw * ratio.get(field.name, 0.92 if field.name.startswith("hidden_") else 1.0)
        table.append({"column": field.name, "raw_bytes_per_token": raw / seq_len, "est_bytes_per_token": est / seq_len})
    total_raw = sum(r["raw_bytes_per_token"] for r in table)
    total_est = sum(r["est_bytes_per_token"] for r in table)
    table.append({"column": "TOTAL", "raw_bytes_per_token": total_raw, "est_bytes_per_token": total_est})
    for row in table:
        row["raw_total_gb"] = row["raw_bytes_per_token"] * tokens / 1e9
        row["est_total_gb"] = row["est_bytes_per_token"] * tokens / 1e9
    return table


def _human(num_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if num_bytes < 1000 or unit == "TB":
            return f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
    return ""


def format_plan(table: list[dict[str, Any]], tokens: int) -> str:
    """The plan as a text table: bytes per token and totals per column."""
    lines = [f"cache plan for {tokens:,} tokens (raw = uncompressed upper bound, est = typical zstd)"]
    lines.append(f"{'column':<16}{'raw B/tok':>12}{'est B/tok':>12}{'raw total':>12}{'est total':>12}")
    for r in table:
        lines.append(
            f"{r['column']:<16}{r['raw_bytes_per_token']:>12.2f}{r['est_bytes_per_token']:>12.2f}"
            f"{_human(r['raw_total_gb'] * 1e9):>12}{_human(r['est_total_gb'] * 1e9):>12}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- bookkeeping
def task_split(args: argparse.Namespace) -> tuple[int, int]:
    """(task index, task count) from the flags, else the Slurm array, else (0, 1). With ``--task-count`` given
    (``slurm submit`` always gives it, and a resubmit queues only the tasks with shards left, e.g. ``--array=1,3``
    of 4) the array task id is the index itself; without it, the id counts from the array's first task."""
    index, count = getattr(args, "task_index", None), getattr(args, "task_count", None)
    if index is None and os.environ.get("SLURM_ARRAY_TASK_ID", "").isdigit():
        first = 0 if count is not None else int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0") or 0)
        index = int(os.environ["SLURM_ARRAY_TASK_ID"]) - first
    if count is None and os.environ.get("SLURM_ARRAY_TASK_COUNT", "").isdigit():
        count = int(os.environ["SLURM_ARRAY_TASK_COUNT"])
    index, count = index or 0, count or 1
    if not 0 <= index < count:
        raise PipelineError(f"--task-index {index}: expected 0 <= index < --task-count {count}")
    return index, count


def manifest_shards(manifest: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(split, shard entry) of every manifest shard, train then val, in manifest order."""
    return [(split, s) for split in data_format.SPLITS for s in manifest["splits"][split]["shards"]]


def task_shards(manifest: dict[str, Any], index: int, count: int) -> list[tuple[str, dict[str, Any]]]:
    """The shards task ``index`` of ``count`` owns: every ``count``-th of the train+val list, from ``index``."""
    return manifest_shards(manifest)[index::count]


def pending_tasks(cfg: Config, rd: RunDir, count: int) -> list[int]:
    """The tasks of ``count`` that own a shard without a matching record (``shard_done``, as each task decides for
    itself): what ``slurm submit`` queues of the array when the manifest is complete and the cache is not. Task 0
    alone when every shard is done but the stage marker is not (it writes the marker, computing nothing)."""
    manifest = data_format.read_manifest(rd.stage_dir("manifest"))
    fingerprint, cache_dir = teacher_fingerprint(cfg), rd.stage_dir(STAGE)
    tasks = [
        index
        for index in range(count)
        if not all(
            shard_done(cache_dir, s["file"], shard_signature(cfg, fingerprint, s["sha256"]))
            for _, s in task_shards(manifest, index, count)
        )
    ]
    return tasks or [0]


def output_sections(cfg: Config) -> tuple:
    """The config that determines the cached values (execution knobs such as batch size excluded)."""
    cache = {k: v for k, v in dataclasses.asdict(cfg.cache).items() if k not in EXECUTION_ONLY}
    seed = cfg.seed if cfg.cache.hidden_fraction is not None or cfg.cache.targets != "topk" else None
    return (model_identity(cfg.teacher), cache, seed)


def teacher_fingerprint(cfg: Config) -> str:
    return mdl.weights_fingerprint(cfg.teacher, "teacher")


def shard_signature(cfg: Config, fingerprint: str, manifest_sha: str) -> str:
    return section_hash(*output_sections(cfg), fingerprint, manifest_sha, cf.FORMAT_VERSION)


def record_path(cache_dir: Path, shard_file: str) -> Path:
    return cache_dir / RECORDS / (Path(shard_file).stem + ".json")


def read_record(cache_dir: Path, shard_file: str) -> dict[str, Any] | None:
    try:
        return json.loads(record_path(cache_dir, shard_file).read_text())
    except (OSError, ValueError):
        return None


def shard_done(cache_dir: Path, shard_file: str, signature: str) -> bool:
    """Whether a shard's record matches the current signature and the file is still the one recorded (size and
    mtime, re-hashed only when the mtime moved: a damaged or edited shard is recomputed, an intact one is not)."""
    record = read_record(cache_dir, shard_file)
    if record is None or record.get("signature") != signature:
        return False
    return not file_problem(cache_dir / cf.cache_shard_name(shard_file), record)


def remove_strays(cache_dir: Path, manifest: dict[str, Any]) -> list[str]:
    """Delete the shards and records that no shard of the current manifest maps to (left by a run over an earlier,
    larger manifest); returns their names. Consumers read only declared shards anyway; this keeps the directory
    what it claims to be."""
    wanted = {cf.cache_shard_name(s["file"]) for _, s in manifest_shards(manifest)}
    strays = [p for p in cache_dir.glob("*.parquet") if p.name not in wanted]
    strays += [p for p in (cache_dir / RECORDS).glob("*.json") if p.stem + ".parquet" not in wanted]
    for path in strays:
        path.unlink(missing_ok=True)
    return sorted(p.name for p in strays)


# ------------------------------------------------------------------------------------------------------ stage
def _add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task-index", type=int, default=None, help="this task's index (default: Slurm array id)")
    count_help = "number of tasks (default: the Slurm array's size; given, the array task id is the index)"
    parser.add_argument("--task-count", type=int, default=None, help=count_help)
    parser.add_argument("--plan", action="store_true", help="print the size and parallel plan, exit (no forward)")
    hw = tp.Hardware()
    parser.add_argument("--gpu-tflops", type=float, default=hw.gpu_tflops, help="--plan: dense bf16 peak per GPU")
    parser.add_argument("--mfu", type=float, default=hw.mfu, help="--plan: fraction of the peak the teacher reaches")
    parser.add_argument("--gpu-gb", type=float, default=hw.gpu_memory_gb, help="--plan: memory per GPU")
    parser.add_argument("--allreduce-gb-s", type=float, default=hw.allreduce_gb_s, help="--plan: NVLink bus GB/s")


def _check_tokenizer(cfg: Config, manifest: dict[str, Any], where: Path) -> None:
    tokenizer = mdl.load_tokenizer(cfg.teacher, "teacher")
    teacher_hash, want = mdl.vocab_hash(tokenizer), manifest["tokenizer"]["vocab_hash"]
    if teacher_hash != want:
        raise PipelineError(
            f"{where}: tokenizer.vocab_hash {want} ({manifest['tokenizer']['name_or_path']}) differs from the "
            f"teacher tokenizer's {teacher_hash} (teacher.name_or_path={cfg.teacher.name_or_path}); rebuild the "
            "manifest with the teacher's tokenizer"
        )


def _pending(cfg: Config, cache_dir: Path, fingerprint: str, mine: list, force: bool) -> list:
    """This task's shards without a matching record (or whose file is no longer the one recorded); temp files they
    left behind (kill -9) are removed."""
    pending = [
        (split, s)
        for split, s in mine
        if force or not shard_done(cache_dir, s["file"], shard_signature(cfg, fingerprint, s["sha256"]))
    ]
    for _, shard in pending:  # temp files of this task's shards left by a killed run (other tasks own theirs)
        for stale in cache_dir.glob(f".{cf.cache_shard_name(shard['file'])}.*.tmp"):
            stale.unlink(missing_ok=True)
    return pending


def run(cfg: Config, rd: RunDir, ctx: StageContext) -> dict[str, float]:
    """Cache this task's share of the manifest shards; return summary numbers.

    Under torchrun the task's processes form ``layout.replicas`` teacher replicas (``pipeline.teacher_parallel``):
    rank 0 removes strays and decides which shards are pending, replica r computes every R-th of them and its TP
    rank 0 writes them."""
    manifest_dir, cache_dir = rd.stage_dir("manifest"), rd.stage_dir(STAGE)
    manifest = data_format.read_manifest(manifest_dir)
    _check_tokenizer(cfg, manifest, manifest_dir / data_format.MANIFEST_FILE)
    teacher_config = mdl.load_model_config(cfg.teacher, "teacher")
    tp.check_tensor_parallel(teacher_config, cfg.teacher.tensor_parallel)
    extraction, fields = resolve_extraction(cfg.cache, teacher_config, int(manifest["seq_len"]), cfg.seed)
    fingerprint = teacher_fingerprint(cfg)
    index, count = task_split(ctx.args)
    mine = task_shards(manifest, index, count)
    on = mdl.device()
    layout = tp.setup(cfg.teacher.tensor_parallel, on)
    ctx.begin_writes()
    pending = None
    if layout.rank == 0:
        strays = remove_strays(cache_dir, manifest)
        if strays:
            ctx.log.info("strays", f"removed {len(strays)} files no manifest shard maps to", files=strays[:20])
        pending = _pending(cfg, cache_dir, fingerprint, mine, ctx.force)
    pending = tp.broadcast(pending, layout)
    ours = pending[layout.replica :: layout.replicas]
    ctx.log.info(
        "plan",
        f"task {index}/{count}: {len(mine)} shards, {len(pending)} to compute ({layout.describe()})",
        task_index=index,
        replicas=layout.replicas,
        tensor_parallel=layout.tensor_parallel,
    )
    totals = {"shards": float(len(mine)), "shards_computed": 0.0, "rows": 0.0, "tokens": 0.0, "bytes": 0.0}
    if not pending:
        return totals
    model = tp.load_teacher(cfg.teacher, layout, on)
    base = {
        "teacher": cfg.teacher.name_or_path,
        "teacher_fingerprint": fingerprint,
        "vocab_hash": manifest["tokenizer"]["vocab_hash"],
        "vocab_size": int(manifest["tokenizer"]["vocab_size"]),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        **fields,
    }
    progress = Progress(ctx.log, cfg.cache.log_every_s, len(ours), sum(int(shard["rows"]) for _, shard in ours))
    done = {k: 0.0 for k in ("shards_computed", "rows", "tokens", "bytes")}
    with preemption.deferred(preemption.WARNING):  # the warning lets the shard in hand finish; SIGTERM stops at once
        stopped = False
        for split, shard in ours:
            # the ranks of a replica run collectives together: they stop at the same shard boundary or not at all
            if tp.any_rank(preemption.received() is not None, layout.replica_group):
                stopped = True
                break
            info = cache_one_shard(model, extraction, base, split, shard, manifest_dir, cache_dir, cfg, progress,
                                   write=layout.writer)  # fmt: skip
            if info is not None:
                signature = shard_signature(cfg, fingerprint, shard["sha256"])
                recorded = record_file(cache_dir / info["file"], info["sha256"])  # + size and mtime, as markers hold
                atomic_write_json(record_path(cache_dir, shard["file"]), {**info, **recorded, "signature": signature})
                done["shards_computed"] += 1
                for key in ("rows", "tokens", "bytes"):
                    done[key] += info[key]
        tp.barrier(layout)  # every replica's shards are on disk before rank 0 looks for the stage marker
        if tp.any_rank(stopped, layout.control):  # every rank stops together, after its replica's last shard
            where = f"{progress.shards_done} of {len(ours)} shards of this replica written"
            raise preemption.Interrupted(preemption.received() or preemption.WARNING, where, **progress.metrics())
    progress.bar.close()
    totals.update(tp.sum_over_ranks(done, layout))
    totals["tokens_per_s"] = totals["tokens"] / max(progress.elapsed(), 1e-9)
    totals["bytes_per_token"] = totals["bytes"] / max(totals["tokens"], 1.0)
    return totals


class Progress:
    """Token counter that logs ``progress`` lines with tokens/s every ``every_s`` seconds, and moves the console's
    progress bar over the rows of this replica's shards (``jsonlog.console_progress``: interactive terminals only)."""

    def __init__(self, log: JsonLogger, every_s: float, shards_total: int, rows_total: int) -> None:
        self.log, self.every_s, self.shards_total = log, every_s, shards_total
        self.start = self.last = time.monotonic()
        self.tokens, self.shards_done = 0, 0
        self.bar = console_progress(log, rows_total, "cache", "row")

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def metrics(self) -> dict[str, float]:
        return {
            "tokens": self.tokens,
            "tokens_per_s": self.tokens / max(self.elapsed(), 1e-9),
            "shards_done": self.shards_done,
            "shards_total": self.shards_total,
        }

    def add(self, tokens: int, rows: int) -> None:
        self.tokens += tokens
        self.bar.update(rows)
        if time.monotonic() - self.last >= self.every_s:
            self.last = time.monotonic()
            self.log.info("progress", "", **self.metrics())


def cache_one_shard(
    model: torch.nn.Module,
    extraction: Extraction,
    base: dict[str, Any],
    split: str,
    shard: dict[str, Any],
    manifest_dir: Path,
    cache_dir: Path,
    cfg: Config,
    progress: Progress,
    write: bool = True,
) -> dict[str, Any] | None:
    """Teacher pass over one manifest shard -> one cache shard; returns its record (None when ``write`` is false: a
    tensor-parallel rank other than the replica's writer computes alongside and writes nothing)."""
    source = manifest_dir / shard["file"]
    packed = data_format.read_packed_shard(source)
    rows = len(packed["sample_id"])
    if rows != shard["rows"]:
        raise PipelineError(f"{source}: {rows} rows, manifest.json says {shard['rows']}; rebuild the manifest")
    started = time.monotonic()
    parts = []
    batch = cfg.cache.batch_size
    key = sampling.shard_key(shard["sha256"])
    for start in range(0, rows, batch):
        ids = torch.from_numpy(packed["input_ids"][start : start + batch].astype(np.int64))
        mask = torch.from_numpy(packed["attention_mask"][start : start + batch].astype(np.int64))
        uniforms = None
        if extraction.draws:  # per row, from the seed and the shard's content: the same for any batch size or resume
            rows_here = range(start, start + len(ids))
            draws = sampling.row_uniforms(cfg.seed, key, rows_here, ids.shape[1], extraction.draws)
            uniforms = torch.from_numpy(draws)
        parts.append(extract_batch(model, ids, mask, extraction, uniforms))
        progress.add(int(mask.sum()), len(ids))
    if not write:
        progress.shards_done += 1
        return None
    meta = {
        **base,
        "split": split,
        "manifest_shard": shard["file"],
        "manifest_sha256": shard["sha256"],
        "rows": rows,
    }
    out = cache_dir / cf.cache_shard_name(shard["file"])
    info = cf.write_shard(
        out,
        to_columns(parts, packed),
        meta,
        compression=cfg.cache.compression,
        compression_level=cfg.cache.compression_level,
    )
    progress.shards_done += 1
    tokens = int(packed["attention_mask"].sum())
    seconds = time.monotonic() - started
    progress.log.info("shard", out.name, rows=rows, tokens=tokens, bytes=info["bytes"], seconds=seconds)
    return {**info, "tokens": tokens, "manifest_sha256": shard["sha256"], "seconds": round(seconds, 3)}


def _complete(cfg: Config, rd: RunDir, ctx: StageContext) -> bool:
    """The stage marker may be written once every shard of every task has a matching record."""
    manifest = data_format.read_manifest(rd.stage_dir("manifest"))
    fingerprint = teacher_fingerprint(cfg)
    cache_dir = rd.stage_dir(STAGE)
    return all(
        shard_done(cache_dir, s["file"], shard_signature(cfg, fingerprint, s["sha256"]))
        for _, s in manifest_shards(manifest)
    )


def _outputs(cfg: Config, rd: RunDir, unit: str | None) -> dict[str, str | None]:
    """Every shard, with the checksum its record took when it was written (no re-read of a terabyte cache)."""
    manifest = data_format.read_manifest(rd.stage_dir("manifest"))
    cache_dir = rd.stage_dir(STAGE)
    shards = [s["file"] for _, s in manifest_shards(manifest)]
    return {cf.cache_shard_name(name): read_record(cache_dir, name)["sha256"] for name in shards}


def _sections(cfg: Config, unit: str | None) -> dict[str, Any]:
    # The format version is part of the stage's identity: after an upgrade a rerun rebuilds the cache instead of
    # skipping it as complete and leaving train to fail on old-format shards.
    teacher, cache, seed = output_sections(cfg)
    return {"teacher": teacher, "cache": cache, "seed": seed, "cache_format_version": cf.FORMAT_VERSION}


SPEC = StageSpec(
    name=STAGE,
    run=run,
    sections=_sections,
    upstream=lambda cfg, unit: definition.upstream(cfg, STAGE, unit),
    external=lambda cfg, unit: {"weights:teacher": teacher_fingerprint(cfg)},
    outputs=_outputs,
    add_args=_add_args,
    complete=_complete,
)


def plan_main(args: argparse.Namespace) -> int:
    """``--plan``: the estimated cache size and the teacher-parallel layouts for the config (and the manifest, when
    it exists; before it does, ``manifest.max_tokens`` stands in for the token count)."""
    try:
        cfg = load_config(args.config, args.overrides)
        validate.check(cfg)
        rd = RunDir.from_config(cfg)
        manifest_dir = rd.stage_dir("manifest")
        if (manifest_dir / data_format.MANIFEST_FILE).exists() or not cfg.manifest.max_tokens:
            manifest, source = data_format.read_manifest(manifest_dir), "manifest"
        else:
            rows = cfg.manifest.max_tokens // cfg.manifest.seq_len
            manifest = {"seq_len": cfg.manifest.seq_len, "splits": {"train": {"rows": rows}, "val": {"rows": 0}}}
            source = "manifest.max_tokens (no manifest yet)"
        teacher_config = mdl.load_model_config(cfg.teacher, "teacher")
        tp.check_tensor_parallel(teacher_config, cfg.teacher.tensor_parallel)
        table = plan_rows(cfg, manifest, teacher_config)
    except (ConfigError, PipelineError) as err:
        return cli_exit_code(err)
    tokens = sum(int(manifest["splits"][s]["rows"]) for s in data_format.SPLITS) * int(manifest["seq_len"])
    print(format_plan(table, tokens))
    print(f"(tokens from {source})")
    resources = cfg.slurm.stages.cache
    if resources.gpus_per_node < 1:
        print("\nno parallel plan: slurm.stages.cache.gpus_per_node is 0 (CPU)")
        return 0
    hw = tp.Hardware(args.gpu_tflops, args.mfu, args.gpu_gb, args.allreduce_gb_s)
    dtype = cfg.teacher.dtype if cfg.teacher.dtype != "auto" else "bfloat16"  # auto is bf16 on the GPU
    layouts = tp.plan_parallel(
        teacher_config,
        seq_len=int(manifest["seq_len"]),
        batch=cfg.cache.batch_size,
        logits_chunk=cfg.cache.logits_chunk,
        dtype_bytes=torch.finfo(getattr(torch, dtype)).bits // 8,
        gpus_per_node=resources.gpus_per_node,
        hw=hw,
    )
    print()
    print(tp.format_parallel_plan(layouts, tokens, resources.array_tasks, resources.gpus_per_node,
                                  cfg.teacher.tensor_parallel, hw))  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser(STAGE, _add_args).parse_args(argv)
    if args.plan:
        return plan_main(args)
    return stage_main(SPEC, argv)


if __name__ == "__main__":
    sys.exit(main())
