"""Benchmarks: the numbers the issues promise, measured side by side in one run on the same data.

Reads   a real text (``--text``, default ``data/shakespeare/train.jsonl`` from ``python -m pipeline.demo_assets``;
        without it the repository's own Markdown and Python sources) and, in ``--full`` mode, the demo teacher
        ``models/smollm2-135m-instruct`` and student ``models/student-init`` when they exist.
Writes  ``<out>/bench.json`` (machine, command, every raw timing), ``<out>/cache/`` (the benchmark's cache shards)
        and refreshes ``BENCHMARKS.md`` (``--markdown``): table, machine, command, date.
Run     ``python -m pipeline.bench [--quick|--full] [--out runs/bench] [--markdown BENCHMARKS.md]`` (``make bench``).

These machines are shared and noisy, so every row is a ratio of two things timed alternately in the same process
(medians over repeats), never an absolute time compared with a number from another run. Quick mode (default, a few
minutes on 2 CPU cores) trains a tiny Llama teacher on the real text with a BPE tokenizer trained on that text, so
the cached distributions have realistic, non-uniform entropy; full mode uses the real demo teacher and larger
shapes and is meant for a GPU (peak memory then comes from ``torch.cuda.max_memory_allocated``).

The measured code is the pipeline's own: ``cache.extract_batch``/``cache.topk_chunked`` for extraction,
``cache_format.write_shard``/``CacheDataset`` for storage and reading, ``train._loss_step`` for KD steps (with
``pipeline.lm_head``'s chunked head for the student-step rows) and ``slurm`` for the chain. The code that times it
is here and only here (``benchmark_extraction``, ``topk_peak_memory``, ``benchmark_reader``,
``column_bytes_per_token``, ``step_time_ratios``, ``bench_student_step``): stage modules hold only their stage. The
bench is a tool, not a stage: it imports stage modules, stages never import it.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from pipeline import cache as cache_stage
from pipeline import cache_format as cf
from pipeline import losses, sampling
from pipeline import modeling as mdl
from pipeline import teacher_parallel as tp
from pipeline import train as train_stage
from pipeline.config import CacheConfig, ModelConfig
from pipeline.data_format import schema_json
from pipeline.definition import STAGES
from pipeline.rundir import REPO, atomic_write_json, atomic_write_text

DEMO_TEACHER = REPO / "models" / "smollm2-135m-instruct"
DEMO_STUDENT = REPO / "models" / "student-init"
DEFAULT_TEXT = REPO / "data" / "shakespeare" / "train.jsonl"
TOP_K = 16  # the k of the storage goal (issue 4: k=16 + tail <= 90 bytes/token)
SAMPLES = 32  # draws per position of the sampled-targets row (issue 17: <= 40 bytes/token)


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Shapes of one bench mode. The teacher/student fields describe the tiny models trained here; full mode
    replaces them with the demo models when those exist."""

    name: str
    text_chars: int  # characters of the text used (tokenizer training, teacher training, cache rows)
    vocab: int  # BPE vocabulary trained on the text
    teacher_hidden: int
    teacher_layers: int
    teacher_steps: int  # optimizer steps that turn the random teacher into a peaked one
    student_hidden: int
    student_layers: int
    seq_len: int
    cache_rows: int  # rows cached (and read back by the reader benchmark)
    rows_per_shard: int
    batch: int  # teacher and student batch (sequences)
    memory_positions: int  # B*T positions of the peak-memory comparison
    logits_chunk: int  # positions per LM-head chunk there
    gemm_n: int  # square matrix size of the FLOP/s ceiling
    repeats: int  # timed repeats per measurement (medians reported)
    threads: int | None  # torch CPU threads; 1 on the shared machines, where 2 threads thrash under load
    use_demo_models: bool = False
    parallel_rows: int = 64  # rows cached by each teacher-parallel mode (1 process, DP=2, TP)
    parallel_shards: int = 4  # ... in this many shards, so data-parallel replicas split them
    # student KD step, chunked LM head vs whole logits (issue 16): Llama-3's vocabulary on a small body
    step_vocab: int = 128_256
    step_hidden: int = 64
    step_batch: int = 2  # sequences per micro-batch
    step_seq_len: int = 512
    # positions per LM-head chunk: 64 x 128,256 x 4 B = 32.8 MB per fp32 block, under glibc's largest mmap threshold
    # (32 MiB), so on CPU the chunks reuse heap pages where bigger blocks (and whole logits) are mmapped and faulted
    # in afresh at every step (sys time); on a GPU the caching allocator makes the size matter little
    step_chunk: int = 64


# The cache is one shard of one row group (256 or 512 rows): real shards hold thousands of rows
# (configs/llama70b_to_8b.yaml: 2048 per shard), and toy 64-row shards would time the per-file and per-row-group
# fixed costs of opening and decoding (footer, per-column setup) far more than any real cache run pays them.
QUICK = Sizes("quick", 400_000, 4096, 128, 4, 80, 64, 2, 128, 256, 256, 8, 4096, 256, 1024, 7, 1)
FULL = Sizes("full", 3_000_000, 4096, 128, 4, 120, 256, 4, 512, 512, 512, 8, 16384, 1024, 4096, 15, None, True,
             step_batch=4, step_seq_len=1024, step_chunk=512)  # fmt: skip
# Quick shapes on the demo's real teacher and student (make demo's assets): CPU figures for realistic models, where
# the tiny models of quick mode overstate fixed per-step costs (LM head share, relation triplets).
DEMO = dataclasses.replace(QUICK, name="demo-models", repeats=5, use_demo_models=True, parallel_rows=32)
MODES = {"quick": QUICK, "demo-models": DEMO, "full": FULL}


@dataclasses.dataclass
class Row:
    """One line of the table: a measured value against its goal (``op`` is how the value must compare)."""

    key: str
    name: str
    value: float | None
    unit: str
    goal: float | None = None
    op: str = "<="
    detail: str = ""

    @property
    def status(self) -> str:
        if self.value is None:
            return "skipped"
        if self.goal is None:
            return "info"
        ok = self.value <= self.goal if self.op == "<=" else self.value >= self.goal
        return "pass" if ok else "FAIL"

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "status": self.status}


# ---------------------------------------------------------------------------------------------- measurement
def tensor_peak_bytes(fn: Callable[[], Any], on: torch.device) -> int:
    """Peak bytes of torch tensors allocated while ``fn`` runs, above what was allocated before.

    CUDA: the caching allocator's peak counter. CPU: the profiler's allocation and free events replayed in time
    order (what torch asked for, before glibc's heap decides how much resident memory that costs).
    """
    if on.type == "cuda":
        mdl.synchronize(on)
        before = torch.cuda.memory_allocated(on)
        torch.cuda.reset_peak_memory_stats(on)
        with torch.inference_mode():
            fn()
        mdl.synchronize(on)
        return int(torch.cuda.max_memory_allocated(on) - before)
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.profiler.kineto_results.events()
    current = peak = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
        current += nbytes
        peak = max(peak, current)
    return peak


def gemm_timer(n: int, on: torch.device, dtype: torch.dtype) -> Callable[[], float]:
    """A function returning the FLOP/s of one n x n x n matrix multiply (this machine's practical ceiling); call
    it between the timings it is compared with, so both see the same background load."""
    a = torch.randn(n, n, device=on, dtype=dtype)
    b = torch.randn(n, n, device=on, dtype=dtype)
    torch.mm(a, b)  # warm-up: BLAS threads and workspaces

    def flops() -> float:
        mdl.synchronize(on)
        start = time.perf_counter()
        torch.mm(a, b)
        mdl.synchronize(on)
        return 2.0 * n**3 / (time.perf_counter() - start)

    return flops


def forward_flops(model: nn.Module, batch: int, seq_len: int) -> float:
    """Model FLOPs of one forward over [batch, seq_len]: 2 * (weights of every matmul) * tokens for the linear
    layers (LM head included, embedding lookup excluded) + 4 * layers * seq_len * hidden * tokens for attention
    scores and values (PaLM's accounting, causal masking not discounted)."""
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    cfg = model.config
    tokens = batch * seq_len
    return 2.0 * linear * tokens + 4.0 * cfg.num_hidden_layers * seq_len * cfg.hidden_size * tokens


def machine_info(on: torch.device) -> dict[str, Any]:
    """CPU model, cores, threads, memory, torch version and GPU (if any) of this run."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import psutil

    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(on),
        "gpu": None,
    }
    if on.type == "cuda":
        props = torch.cuda.get_device_properties(on)
        info["gpu"] = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    return info


# ------------------------------------------------------------------ the stage code under test: extraction
def benchmark_extraction(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    extraction: cache_stage.Extraction,
    repeats: int = 3,
) -> dict[str, float]:
    """Seconds of a bare teacher forward vs :func:`extract_batch` on the same batch and model.

    The bare forward is ``model(input_ids, attention_mask)`` returning full logits (no KV cache, as in the
    extraction). After one untimed call of each they alternate ``repeats`` times, so background load hits both
    alike; reported are medians and the spread of the per-repeat ratios."""
    bare, extract = [], []

    def forward() -> torch.Tensor:
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def timed(fn: Callable[[], object]) -> float:
        mdl.synchronize(input_ids.device)
        start = time.perf_counter()
        fn()
        mdl.synchronize(input_ids.device)
        return time.perf_counter() - start

    with torch.inference_mode():
        forward(), cache_stage.extract_batch(model, input_ids, attention_mask, extraction)
        for _ in range(repeats):
            bare.append(timed(forward))
            extract.append(timed(lambda: cache_stage.extract_batch(model, input_ids, attention_mask, extraction)))
    return {
        "bare_forward_s": statistics.median(bare),
        "extraction_s": statistics.median(extract),
        **paired_ratio("overhead_ratio", extract, bare),
    }


def paired_ratio(name: str, measured: list[float], reference: list[float]) -> dict[str, float]:
    """``name``: the median of the per-repeat ratios measured/reference (each pair timed back to back, so a load
    change on the shared machine hits both sides), and their spread as ``name_min`` / ``name_max``."""
    ratios = sorted(m / r for m, r in zip(measured, reference, strict=True))
    return {name: statistics.median(ratios), f"{name}_min": ratios[0], f"{name}_max": ratios[-1]}


# For the resident-set peaks measured in child processes: glibc raises its mmap threshold after each large free, so
# later tensors come from the heap and stay resident after they are freed; the same step then measured 344-626 MiB
# from run to run. A fixed 64 KiB threshold maps every tensor and unmaps it on free: the RSS follows live memory
# and the figure repeats to the MiB.
RSS_EXACT_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _topk_peak_child(mode: str, positions: int, hidden: int, vocab: int, chunk: int, top_k: int) -> int:
    """In a fresh process: bytes the resident-set peak rises by while computing top-k (``mode``: chunked/full)."""
    torch.manual_seed(0)
    states = torch.randn(positions, hidden)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    page = os.sysconf("SC_PAGE_SIZE")
    with open("/proc/self/statm") as fh:
        before = int(fh.read().split()[1]) * page
    with open("/proc/self/clear_refs", "w") as fh:  # "5" resets the peak RSS (VmHWM) to the current RSS
        fh.write("5")
    with torch.inference_mode():
        if mode == "chunked":
            cache_stage.topk_chunked(states, head, top_k, 1.0, chunk)
        else:
            torch.topk(torch.log_softmax(head(states), dim=-1), top_k, dim=-1)
    with open("/proc/self/status") as fh:
        peak = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))
    return peak - before


def topk_peak_memory(
    positions: int = 8 * 256, hidden: int = 576, vocab: int = 49152, chunk: int = 128, top_k: int = 16
) -> dict[str, float]:
    """Peak extra memory (resident set, Linux) of chunked top-k vs materialised [positions, V] logits, each in a
    fresh process; ``ratio_to_logits`` compares the chunked peak with positions x V x 4 bytes."""

    def child(mode: str) -> int:
        code = (
            "from pipeline.bench import _topk_peak_child; "
            f"print(_topk_peak_child({mode!r}, {positions}, {hidden}, {vocab}, {chunk}, {top_k}))"
        )
        env = {**os.environ, "PYTHONPATH": str(REPO), **RSS_EXACT_MALLOC}
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
        return int(done.stdout.split()[-1])

    chunked, full = child("chunked"), child("full")
    logits = positions * vocab * 4
    return {
        "logits_bytes": float(logits),
        "chunked_peak_bytes": float(chunked),
        "full_peak_bytes": float(full),
        "ratio_to_logits": chunked / logits,
        "ratio_to_full": chunked / full,
    }


# --------------------------------------------------------------------- the stage code under test: cache reader
def rowwise_read(files: Sequence[Path], columns: Sequence[str]) -> int:
    """Baseline reader: every row through ``to_pydict`` Python lists into tensors of the stored dtypes (what
    ``cache_format.CacheDataset`` yields), one tensor per row and column; returns tokens read."""
    tokens = 0
    for path in files:
        table = pq.read_table(path, columns=list(columns))
        meta = schema_json(Path(path), table.schema, cf.META_KEY, "cache shard")  # the table's own: no second read
        dtypes = {}
        for field in table.schema:
            if pa.types.is_fixed_size_list(field.type):
                dtypes[field.name] = cf.STORED_TORCH_DTYPES[field.type.value_type]
            elif pa.types.is_fixed_size_binary(field.type):
                dtypes[field.name] = cf.HIDDEN_DTYPES[meta["hidden_dtype"]]
            else:
                dtypes[field.name] = torch.int64
        data = table.to_pydict()
        for i in range(table.num_rows):
            for name in columns:
                value = data[name][i]
                if isinstance(value, bytes):
                    torch.frombuffer(bytearray(value), dtype=dtypes[name])
                else:
                    torch.tensor(value, dtype=dtypes[name])
            tokens += len(data["input_ids"][i]) if "input_ids" in data else 1
    return tokens


def column_bytes_per_token(path: Path) -> dict[str, float]:
    """Compressed bytes per token of each column of a shard (from the Parquet footer), plus ``total``."""
    footer = pq.read_metadata(path)
    meta = cf.read_cache_meta(path)
    tokens = footer.num_rows * int(meta["seq_len"])
    sizes: dict[str, float] = collections.defaultdict(float)
    for g in range(footer.num_row_groups):
        group = footer.row_group(g)
        for c in range(group.num_columns):
            column = group.column(c)
            sizes[column.path_in_schema.split(".")[0]] += column.total_compressed_size
    result = {name: size / tokens for name, size in sizes.items()}
    result["total"] = Path(path).stat().st_size / tokens
    return result


def benchmark_reader(
    files: Sequence[Path], *, batch_size: int = 8, columns: Sequence[str] | None = None, repeats: int = 3
) -> dict[str, float]:
    """Tokens/s of ``cache_format.CacheDataset`` vs :func:`rowwise_read` over the same shards and KD columns, both
    yielding the stored dtypes, after one untimed pass of each (page cache, lazy imports).

    Each repeat times one row-wise pass, then fresh datasets (footers read, every row group read and decoded again,
    shuffled) back to back for at least as long: both readers are timed over windows of the same length, so a
    pass of a few milliseconds is not judged alone right after the other reader has flushed the CPU caches, and
    timer and scheduler noise weigh on both alike. The two alternate, so background load hits both; reported are
    medians over ``repeats`` and the spread of the per-repeat speedups."""
    columns = list(columns or ("input_ids", "attention_mask", "topk_ids", "topk_logprobs", "tail_logmass"))
    meta = cf.read_cache_meta(files[0])
    stored = [cf.stored_column(c, meta) for c in columns]

    def fast_window(seconds: float) -> float:
        tokens, start = 0, time.perf_counter()
        while True:
            dataset = cf.CacheDataset(files, batch_size=batch_size, columns=columns, shuffle=True)
            tokens += sum(batch["input_ids"].numel() for batch in dataset)
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return tokens / elapsed

    def rowwise_pass() -> tuple[float, float]:
        start = time.perf_counter()
        tokens = rowwise_read(files, stored)
        elapsed = time.perf_counter() - start
        return tokens / elapsed, elapsed

    rowwise_pass(), fast_window(0.0)
    rowwise, fast = [], []
    for _ in range(repeats):
        speed, elapsed = rowwise_pass()
        rowwise.append(speed)
        fast.append(fast_window(elapsed))
    return {
        "rowwise_tokens_per_s": statistics.median(rowwise),
        "dataset_tokens_per_s": statistics.median(fast),
        **paired_ratio("speedup", fast, rowwise),
    }


# ------------------------------------------------------------------------ the stage code under test: KD steps
def synthetic_batch(
    vocab: int, batch_size: int, seq_len: int, top_k: int, teacher_dim: int, layers: tuple[int, ...], seed: int = 0
) -> dict[str, Any]:
    """A batch shaped like ``CacheDataset``'s (random teacher top-k with a valid tail, hidden states, embeddings)."""
    gen = torch.Generator().manual_seed(seed)
    teacher_logits = torch.randn(batch_size, seq_len, vocab, generator=gen) * 3
    logp = torch.log_softmax(teacher_logits, -1)
    top, ids = logp.topk(top_k, -1)
    tail = losses.log1mexp(torch.logsumexp(top, -1))
    batch = {
        "input_ids": torch.randint(0, vocab, (batch_size, seq_len), generator=gen),
        "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
        "topk_ids": ids,
        "topk_logprobs": top,
        "tail_logmass": tail,
        "embed": torch.randn(batch_size, teacher_dim, generator=gen),
    }
    for layer in layers:
        batch[cf.hidden_column(layer)] = torch.randn(batch_size, seq_len, teacher_dim, generator=gen)
    return batch


def step_time_ratios(
    student: nn.Module,
    *,
    batch_size: int = 8,
    seq_len: int = 128,
    top_k: int = 32,
    teacher_dim: int | None = None,
    repeats: int = 5,
) -> dict[str, float]:
    """Seconds per full training step (forward, losses, backward, AdamW) of each KD family vs CE only, on the same
    batch through the trainer's own ``train._loss_step``; returns ``{<name>_s, <name>_ratio}`` for response (the default
    0.5·CE + 0.5·tail-bucket KL), feature (CE + one projected layer) and relation (CE + RKD), medians of
    ``repeats`` interleaved runs after one warm-up each. Goals (issue 5): ≤ 1.10, 1.25, 1.10.
    """
    from pipeline.config import FeatureKDConfig, LossConfig, RelationKDConfig, ResponseKDConfig

    width = int(student.config.hidden_size)
    teacher_dim = teacher_dim or 2 * width
    layer = int(student.config.num_hidden_layers) // 2
    vocab = int(student.get_output_embeddings().weight.shape[0])
    recipes = {
        "ce": LossConfig(),
        "response": LossConfig(ce_weight=0.5, response=ResponseKDConfig(weight=0.5)),
        "feature": LossConfig(feature=FeatureKDConfig(weight=1.0, layer_pairs=[[layer, layer]])),
        "relation": LossConfig(relation=RelationKDConfig(weight=1.0)),
    }
    batch = synthetic_batch(vocab, batch_size, seq_len, top_k, teacher_dim, (layer,))
    on = next(student.parameters()).device
    batch = cf.to_compute(batch, on)
    runs = {}
    for name, loss in recipes.items():
        pairs = [(layer, layer)] if loss.feature.weight > 0 else []
        recipe = train_stage.LossRecipe(name, loss, 1.0, pairs, int(student.config.num_hidden_layers))
        projectors = losses.FeatureProjectors(pairs, width, teacher_dim) if pairs else None
        model = train_stage.Distillee(student, projectors).to(on)
        runs[name] = (model, recipe, torch.optim.AdamW(model.parameters(), lr=1e-6))
    times: dict[str, list[float]] = {name: [] for name in recipes}
    for rep in range(repeats + 1):
        for name, (model, recipe, opt) in runs.items():
            mdl.synchronize(on)
            t0 = time.perf_counter()
            total, _, _ = train_stage._loss_step(model, batch, recipe, gather=False)
            total.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            mdl.synchronize(on)
            if rep > 0:  # the first round warms allocators and kernels
                times[name].append(time.perf_counter() - t0)
    median = {name: sorted(v)[len(v) // 2] for name, v in times.items()}
    out = {f"{name}_s": t for name, t in median.items()}
    out.update({f"{name}_ratio": median[name] / median["ce"] for name in recipes if name != "ce"})
    return out


# ------------------------------------------------------------------------------------------------ assets
def shown_path(path: Path) -> str:
    """``path`` relative to the repository when inside it (reports stay valid on another checkout)."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def load_text(path: Path | None, max_chars: int) -> tuple[str, str]:
    """(text, where it came from): a JSONL file's ``text`` fields or a plain text file; without one, this
    repository's Markdown and Python sources (real English and code, always present)."""
    if path is not None and Path(path).is_file():
        path = Path(path)
        if path.suffix == ".jsonl":
            parts, size = [], 0
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    text = json.loads(line).get("text", "")
                    parts.append(text)
                    size += len(text)
                    if size >= max_chars:
                        break
            return "\n\n".join(parts)[:max_chars], shown_path(path)
        return path.read_text(encoding="utf-8")[:max_chars], shown_path(path)
    files = sorted(REPO.glob("*.md")) + sorted((REPO / "pipeline").glob("*.py"))
    text = "\n\n".join(f.read_text(encoding="utf-8") for f in files)
    while len(text) < max_chars:  # small checkouts: repeat rather than measure on too few tokens
        text += "\n\n" + text
    return text[:max_chars], "repository sources (*.md, pipeline/*.py)"


def train_bpe(text: str, vocab: int) -> Any:
    """A byte-level BPE tokenizer trained on ``text`` (so token frequencies are those of a real tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    chunks = [text[i : i + 4000] for i in range(0, len(text), 4000)]
    tok.train_from_iterator(chunks, trainer=trainer)
    return tok


def tiny_llama(vocab: int, hidden: int, layers: int, max_positions: int, seed: int) -> nn.Module:
    """A small random Llama like the test fixtures' (4 heads, 2 KV heads, MLP 2x hidden)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


def pretrain(model: nn.Module, stream: np.ndarray, steps: int, batch: int, seq_len: int, on: torch.device) -> float:
    """A few AdamW steps of next-token prediction on ``stream``, so the teacher's distributions are peaked like a
    trained model's instead of uniform; returns the last loss."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        starts = rng.integers(0, len(stream) - seq_len - 1, batch)
        ids = torch.from_numpy(np.stack([stream[s : s + seq_len] for s in starts]).astype(np.int64)).to(on)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return loss.item()


@dataclasses.dataclass
class Assets:
    teacher: nn.Module
    student: nn.Module
    rows: np.ndarray  # [N, T] int32 token rows of the real text (no padding)
    vocab: int
    describe: dict[str, Any]


def build_assets(sizes: Sizes, text_path: Path | None, on: torch.device, log: Callable[[str], None]) -> Assets:
    """Teacher, student and token rows: the demo models in full mode when present, else tiny ones trained here."""
    text, source = load_text(text_path, sizes.text_chars)
    needed = sizes.cache_rows * sizes.seq_len
    describe: dict[str, Any] = {"text": source, "text_chars": len(text)}
    if sizes.use_demo_models and DEMO_TEACHER.is_dir():
        log(f"loading the demo teacher {DEMO_TEACHER.name}")
        teacher_settings = ModelConfig(name_or_path=str(DEMO_TEACHER))
        tokenizer = mdl.load_tokenizer(teacher_settings)
        stream = np.asarray(tokenizer(text)["input_ids"], dtype=np.int32)
        teacher = mdl.load_causal_lm(teacher_settings, "teacher", on).eval()
        vocab = int(teacher.config.vocab_size)
        if DEMO_STUDENT.is_dir():
            student = mdl.load_causal_lm(ModelConfig(name_or_path=str(DEMO_STUDENT), dtype="float32"), "student", on)
        else:
            student = tiny_llama(vocab, sizes.student_hidden, sizes.student_layers, sizes.seq_len, 2).to(on)
        describe.update(teacher=str(DEMO_TEACHER.relative_to(REPO)), tokenizer=f"the teacher's, vocab {vocab}")
    else:
        log(f"training a {sizes.vocab}-token BPE tokenizer and a tiny teacher on {source}")
        tokenizer = train_bpe(text, sizes.vocab)
        stream = np.asarray(tokenizer.encode(text).ids, dtype=np.int32)
        vocab = tokenizer.get_vocab_size()
        teacher = tiny_llama(vocab, sizes.teacher_hidden, sizes.teacher_layers, sizes.seq_len, 1).to(on)
        started = time.perf_counter()
        loss = pretrain(teacher, stream[needed:], sizes.teacher_steps, 8, min(64, sizes.seq_len), on)
        student = tiny_llama(vocab, sizes.student_hidden, sizes.student_layers, sizes.seq_len, 2).to(on)
        describe.update(
            teacher=f"tiny Llama hidden {sizes.teacher_hidden}, {sizes.teacher_layers} layers, trained "
            f"{sizes.teacher_steps} steps (last loss {loss:.2f}, {time.perf_counter() - started:.0f} s)",
            tokenizer=f"BPE trained on the text, vocab {vocab}",
        )
    if len(stream) < needed:
        raise ValueError(f"{source}: {len(stream)} tokens, the bench needs {needed} (use a longer --text)")
    rows = stream[:needed].reshape(sizes.cache_rows, sizes.seq_len)
    student.eval()
    describe.update(
        vocab=vocab,
        teacher_params=sum(p.numel() for p in teacher.parameters()),
        student_params=sum(p.numel() for p in student.parameters()),
        seq_len=sizes.seq_len,
        rows=sizes.cache_rows,
    )
    return Assets(teacher, student, rows, vocab, describe)


# ------------------------------------------------------------------------------------------- cache shards
def write_bench_cache(
    assets: Assets, sizes: Sizes, out: Path, cache_settings: CacheConfig | None = None
) -> tuple[list[Path], dict[str, Any]]:
    """Cache the token rows (default: top-k + tail, no hidden states) with the cache stage's own extraction, draws
    and writer (zstd level 3, the defaults); returns the shard paths and the first shard's metadata."""
    cache_settings = cache_settings or CacheConfig(top_k=TOP_K, batch_size=sizes.batch)
    extraction, fields = cache_stage.resolve_extraction(cache_settings, assets.teacher.config, sizes.seq_len, 0)
    shutil.rmtree(out, ignore_errors=True)
    files = []
    for first in range(0, sizes.cache_rows, sizes.rows_per_shard):
        ids = assets.rows[first : first + sizes.rows_per_shard]
        packed = {
            "sample_id": np.arange(first, first + len(ids), dtype=np.int64),
            "input_ids": ids,
            "attention_mask": np.ones_like(ids, dtype=np.int8),
        }
        parts = []
        for start in range(0, len(ids), sizes.batch):
            batch = torch.from_numpy(ids[start : start + sizes.batch].astype(np.int64))
            uniforms = None
            if extraction.draws:  # the shard's number stands in for its checksum in the draws' seed
                rows = range(start, start + len(batch))
                draws = sampling.row_uniforms(0, len(files), rows, sizes.seq_len, extraction.draws)
                uniforms = torch.from_numpy(draws)
            parts.append(cache_stage.extract_batch(assets.teacher, batch, torch.ones_like(batch), extraction, uniforms))
        name = f"train-{len(files):05d}.parquet"
        meta = {
            "teacher": "bench",
            "teacher_fingerprint": "bench",
            "vocab_hash": "bench",
            "vocab_size": assets.vocab,
            "dtype": str(next(assets.teacher.parameters()).dtype).removeprefix("torch."),
            **fields,
            "split": "train",
            "manifest_shard": name,
            "manifest_sha256": "bench",
            "rows": len(ids),
        }
        cf.write_shard(out / name, cache_stage.to_columns(parts, packed), meta)
        files.append(out / name)
    return files, cf.read_cache_meta(files[0])


# ------------------------------------------------------------------------------------------------- rows
def bench_reader(files: list[Path], sizes: Sizes) -> tuple[Row, dict[str, Any]]:
    """CacheDataset vs a row-wise ``to_pydict`` reader over the same shards and KD columns."""
    runs = [benchmark_reader(files, batch_size=sizes.batch) for _ in range(max(3, sizes.repeats // 2))]
    speedup = statistics.median(r["speedup"] for r in runs)
    fast = statistics.median(r["dataset_tokens_per_s"] for r in runs)
    slow = statistics.median(r["rowwise_tokens_per_s"] for r in runs)
    detail = f"{fast / 1e6:.2f}M vs {slow / 1e3:.0f}k tokens/s (top-{TOP_K} ids, log-probs, tail, ids, mask)"
    return Row("reader", "cache reader vs row-wise to_pydict", speedup, "x", 30.0, ">=", detail), {"runs": runs}


def bench_extraction(assets: Assets, sizes: Sizes, on: torch.device) -> tuple[Row, Row, dict[str, Any]]:
    """Top-k + tail + one hidden layer vs a bare forward on the same batches; plus the forward's FLOP/s as a
    fraction of this machine's matmul ceiling."""
    teacher = assets.teacher
    layer = max(1, teacher.config.num_hidden_layers // 2)
    cache_settings = CacheConfig(
        top_k=TOP_K, hidden_layers=[layer], batch_size=sizes.batch, logits_chunk=sizes.logits_chunk
    )
    extraction, _ = cache_stage.resolve_extraction(cache_settings, teacher.config, sizes.seq_len, 0)
    ids = torch.from_numpy(assets.rows[: sizes.batch].astype(np.int64)).to(on)
    mask = torch.ones_like(ids)

    dtype = next(teacher.parameters()).dtype
    gemm = gemm_timer(sizes.gemm_n, on, dtype)
    flops = forward_flops(teacher, sizes.batch, sizes.seq_len)
    runs, ceilings = [], []
    for _ in range(sizes.repeats):  # forward pair and GEMM alternate: each fraction compares like with like
        runs.append(benchmark_extraction(teacher, ids, mask, extraction, repeats=1))
        ceilings.append(gemm())
    times = {"bare": [r["bare_forward_s"] for r in runs], "extract": [r["extraction_s"] for r in runs]}
    ratio = statistics.median(r["overhead_ratio"] for r in runs)
    fractions = [flops / t / c for t, c in zip(times["bare"], ceilings, strict=True)]
    achieved, ceiling = flops / statistics.median(times["bare"]), statistics.median(ceilings)
    tokens_per_s = sizes.batch * sizes.seq_len / statistics.median(times["bare"])
    # what the extraction adds (log-softmax and top-k over V per position) scales with the LM head, not the body:
    # its share of the forward says how far a result carries to a teacher of another shape (Llama-70B: ~1.5 %)
    head_share = 2.0 * teacher.get_output_embeddings().weight.numel() * sizes.batch * sizes.seq_len / flops
    extraction = Row(
        "extraction",
        f"top-{TOP_K} + tail + hidden[{layer}] vs bare teacher forward",
        ratio,
        "x",
        1.10,
        "<=",
        f"batch {sizes.batch}x{sizes.seq_len}, LM head in chunks of {sizes.logits_chunk} positions; "
        f"the LM head is {head_share:.0%} of this teacher's forward FLOPs",
    )
    fraction = Row(
        "flops",
        "teacher forward FLOP/s / matmul ceiling",
        statistics.median(fractions),
        "",
        None,
        "",
        f"{achieved / 1e9:.1f} of {ceiling / 1e9:.1f} GFLOP/s ({str(dtype).removeprefix('torch.')} "
        f"{sizes.gemm_n}^3 GEMM{' on GPU' if on.type == 'cuda' else ''}), {tokens_per_s:.0f} tokens/s",
    )
    raw = {"times_s": times, "gemm_flops": ceilings, "forward_flops": flops, "tokens_per_s": tokens_per_s}
    raw["lm_head_flops_share"] = head_share
    return extraction, fraction, raw


def bench_memory(assets: Assets, sizes: Sizes, on: torch.device) -> tuple[Row, dict[str, Any]]:
    """Peak extra memory of ``cache.topk_chunked`` vs materialising all B x T x V logits in fp32, relative to the
    B x T x V x 4 bytes of those logits alone (the stricter of the two possible denominators).

    The row is torch's own tensor peak (profiler memory events on CPU, the allocator's peak on GPU): exact,
    repeatable and the same quantity on both. On CPU the detail adds ``topk_peak_memory`` (resident-set
    peak of each variant in a fresh process), which also counts what glibc's heap keeps resident after frees and
    moves by tens of MiB between runs at these sizes.
    """
    head = assets.teacher.get_output_embeddings()
    hidden, vocab = int(assets.teacher.config.hidden_size), assets.vocab
    positions, chunk = sizes.memory_positions, sizes.logits_chunk
    logits = positions * vocab * 4
    states = torch.randn(positions, hidden, device=on, dtype=head.weight.dtype)
    tensors = {
        "chunked": tensor_peak_bytes(lambda: cache_stage.topk_chunked(states, head, TOP_K, 1.0, chunk), on),
        "full": tensor_peak_bytes(lambda: torch.topk(torch.log_softmax(head(states).float(), -1), TOP_K, -1), on),
    }
    raw: dict[str, Any] = {"logits_bytes": logits, "tensor_peak_bytes": tensors}
    mib = 2**20
    detail = (
        f"tensors: {tensors['chunked'] / mib:.1f} MiB chunked ({tensors['chunked'] / logits:.3f}) vs "
        f"{tensors['full'] / mib:.0f} MiB materialised, logits alone {logits / mib:.0f} MiB"
    )
    if on.type == "cpu":
        rss = topk_peak_memory(positions=positions, hidden=hidden, vocab=vocab, chunk=chunk, top_k=TOP_K)
        raw["rss"] = rss
        detail += (
            f"; resident set: {rss['chunked_peak_bytes'] / mib:.1f} MiB chunked ({rss['ratio_to_logits']:.3f}) vs "
            f"{rss['full_peak_bytes'] / mib:.0f} MiB materialised"
        )
    detail += f"; {positions} positions, chunk {chunk}, V={vocab}"
    value = tensors["chunked"] / logits
    return Row("memory", "peak memory: chunked top-k / B*T*V fp32 logits", value, "", 0.125, "<=", detail), raw


KD_GOALS = {"response": 1.10, "feature": 1.25, "relation": 1.10}  # step time / CE-only step (issue 5)
STUDENT_STEP_GOALS = {"memory": 0.25, "time": 1.10}  # chunked LM head / whole logits (issue 16)


def student_step_setup(sizes: Sizes, chunk: int, on: torch.device) -> tuple[nn.Module, Any, dict, Any]:
    """(model, recipe, batch, optimizer) of a KD training step (0.5·CE + 0.5·tail-bucket KL, top-16 + tail) on a
    tiny Llama body with ``sizes.step_vocab`` outputs, the head computed in chunks of ``chunk`` positions (0: whole
    logits). The teacher's top-k is random: the step's cost does not depend on its values."""
    from pipeline.config import LossConfig, ResponseKDConfig

    student = tiny_llama(sizes.step_vocab, sizes.step_hidden, 2, sizes.step_seq_len, 3).to(on).train()
    model = train_stage.Distillee(student, None, chunk)
    recipe = train_stage.LossRecipe("kd", LossConfig(ce_weight=0.5, response=ResponseKDConfig(weight=0.5)), 1.0, [], 2)
    gen = torch.Generator().manual_seed(0)
    shape = (sizes.step_batch, sizes.step_seq_len)
    top = torch.log_softmax(torch.randn(*shape, TOP_K, generator=gen) * 2, -1).sort(-1, descending=True).values
    batch = {
        "input_ids": torch.randint(0, sizes.step_vocab, shape, generator=gen),
        "attention_mask": torch.ones(shape, dtype=torch.long),
        "topk_ids": torch.randint(0, sizes.step_vocab, (*shape, TOP_K), generator=gen),
        "topk_logprobs": top + torch.log(torch.tensor(0.9)),  # 90 % of the mass in the top-k, 10 % in the tail
        "tail_logmass": torch.full(shape, float(torch.log(torch.tensor(0.1)))),
    }
    return model, recipe, cf.to_compute(batch, on), torch.optim.AdamW(model.parameters(), lr=1e-6)


def student_step(model: nn.Module, recipe: Any, batch: dict, optimizer: Any) -> None:
    """One training step through the trainer's own ``_loss_step``: forward, losses, backward, AdamW."""
    total, _, _ = train_stage._loss_step(model, batch, recipe, gather=False)
    total.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def student_step_peak_child(sizes_json: str, chunk: int) -> dict[str, int]:
    """In a fresh process: the resident-set peak of one steady-state KD step (after a warm-up step, so AdamW's state
    exists) above the resident set before it, and the process's peak overall (``VmHWM``, Linux)."""
    sizes = Sizes(**json.loads(sizes_json))
    if sizes.threads:
        torch.set_num_threads(sizes.threads)
    setup = student_step_setup(sizes, chunk, torch.device("cpu"))
    student_step(*setup)
    page = os.sysconf("SC_PAGE_SIZE")
    with open("/proc/self/statm") as fh:
        before = int(fh.read().split()[1]) * page
    with open("/proc/self/clear_refs", "w") as fh:  # "5" resets the peak RSS (VmHWM) to the current RSS
        fh.write("5")
    student_step(*setup)
    with open("/proc/self/status") as fh:
        peak = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))
    return {"step_rise_bytes": peak - before, "before_bytes": before, "peak_bytes": peak}


def student_step_peaks(sizes: Sizes, chunk: int, on: torch.device) -> dict[str, int]:
    """``student_step_peak_child``'s figures on CPU (a fresh process each); on GPU the caching allocator's peak of
    the same steady-state step above what was allocated before it."""
    if on.type == "cuda":
        setup = student_step_setup(sizes, chunk, on)
        student_step(*setup)
        mdl.synchronize(on)
        before = torch.cuda.memory_allocated(on)
        torch.cuda.reset_peak_memory_stats(on)
        student_step(*setup)
        mdl.synchronize(on)
        peak = torch.cuda.max_memory_allocated(on)
        return {"step_rise_bytes": peak - before, "before_bytes": before, "peak_bytes": peak}
    code = (
        "import json; from pipeline.bench import student_step_peak_child; "
        f"print(json.dumps(student_step_peak_child({json.dumps(dataclasses.asdict(sizes))!r}, {chunk})))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), **RSS_EXACT_MALLOC}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout.splitlines()[-1])


def bench_student_step(sizes: Sizes, on: torch.device) -> tuple[list[Row], dict[str, Any]]:
    """A student KD step with the chunked LM head (``pipeline.lm_head``) vs whole [B, T, V] logits, side by side:
    the step's peak memory (resident set of a fresh process on CPU) and its time (medians of ``sizes.repeats``
    alternating steps on one model after a warm-up each)."""
    chunk, positions = sizes.step_chunk, sizes.step_batch * sizes.step_seq_len
    peaks = {"chunked": student_step_peaks(sizes, chunk, on), "whole": student_step_peaks(sizes, 0, on)}
    model, recipe, batch, optimizer = student_step_setup(sizes, chunk, on)
    models = {"chunked": model, "whole": train_stage.Distillee(model.student, None, 0)}  # one student, one AdamW
    times: dict[str, list[float]] = {name: [] for name in models}
    for rep in range(sizes.repeats + 1):
        for name, variant in models.items():
            mdl.synchronize(on)
            started = time.perf_counter()
            student_step(variant, recipe, batch, optimizer)
            mdl.synchronize(on)
            if rep > 0:  # the first round warms allocators and kernels
                times[name].append(time.perf_counter() - started)
    median = {name: statistics.median(t) for name, t in times.items()}
    mib = 2**20
    rise = {name: p["step_rise_bytes"] for name, p in peaks.items()}
    where = "GPU allocator" if on.type == "cuda" else "resident set of a fresh process"
    shape = f"V={sizes.step_vocab}, hidden {sizes.step_hidden}, {sizes.step_batch}x{sizes.step_seq_len} positions"
    memory = Row(
        "student_step_memory",
        "student KD step peak memory: chunked LM head / whole logits",
        rise["chunked"] / rise["whole"],
        "",
        STUDENT_STEP_GOALS["memory"],
        "<=",
        f"{where}, rise during a step: {rise['chunked'] / mib:.0f} MiB chunked vs {rise['whole'] / mib:.0f} MiB "
        f"whole (process peaks {peaks['chunked']['peak_bytes'] / mib:.0f} vs {peaks['whole']['peak_bytes'] / mib:.0f}"
        f" MiB); {shape}, chunk {chunk}",
    )
    step_time = Row(
        "student_step_time",
        "student KD step time: chunked LM head / whole logits",
        median["chunked"] / median["whole"],
        "x",
        STUDENT_STEP_GOALS["time"],
        "<=",
        f"{median['chunked'] * 1e3:.0f} ms vs {median['whole'] * 1e3:.0f} ms ({'GPU' if on.type == 'cuda' else 'CPU'},"
        f" forward + backward + AdamW, chunks recomputed in backward); {shape}",
    )
    return [memory, step_time], {"peaks": peaks, "times_s": times, "positions": positions, "chunk": chunk}


def bench_kd_steps(assets: Assets, sizes: Sizes, calls: int = 3) -> tuple[list[Row], dict[str, Any]]:
    """``step_time_ratios``: a full step (forward, losses, backward, AdamW) of each KD family vs CE only on
    the same batch, through the trainer's own ``_loss_step``. Called ``calls`` times and the median ratio kept,
    because one call's ratio of medians still swings by ~20 % when other users' jobs come and go."""
    results = [
        step_time_ratios(
            assets.student.train(),
            batch_size=sizes.batch,
            seq_len=sizes.seq_len,
            top_k=TOP_K,
            teacher_dim=int(assets.teacher.config.hidden_size),
            repeats=sizes.repeats,
        )
        for _ in range(calls)
    ]
    rows = []
    for name, goal in KD_GOALS.items():
        ratio = statistics.median(r[f"{name}_ratio"] for r in results)
        step_s = statistics.median(r[f"{name}_s"] for r in results)
        ce_s = statistics.median(r["ce_s"] for r in results)
        detail = f"{step_s * 1e3:.0f} ms vs {ce_s * 1e3:.0f} ms, batch {sizes.batch}x{sizes.seq_len}, {calls} calls"
        rows.append(Row(f"kd_{name}", f"{name}-based KD step / CE-only step", ratio, "x", goal, "<=", detail))
    return rows, {"calls": results}


def bench_bytes(files: list[Path], meta: dict[str, Any], assets: Assets) -> tuple[Row, dict[str, Any]]:
    """Stored bytes per token of a cache with top-16 + tail only (zstd), per column from
    ``column_bytes_per_token``, with the teacher's top-k mass as evidence that the distributions
    are not uniform."""
    rows = [cf.read_cache_meta(f)["rows"] for f in files]
    tokens = sum(rows) * int(meta["seq_len"])
    per_file = [column_bytes_per_token(f) for f in files]
    columns = {name: sum(p[name] * r for p, r in zip(per_file, rows, strict=True)) / sum(rows) for name in per_file[0]}
    dataset = cf.CacheDataset(files, batch_size=64, shuffle=False, columns=["topk_logprobs", "tail_logmass"])
    mass = torch.cat([b["topk_logprobs"].float().exp().sum(-1).flatten() for b in dataset]).mean().item()
    split = ", ".join(f"{name} {value:.1f}" for name, value in columns.items() if name != "total")
    detail = f"{tokens:,} tokens; per column: {split}; teacher top-{TOP_K} mass {mass:.2f}, V={assets.vocab}"
    row = Row("bytes", f"cache bytes/token (k={TOP_K} + tail, zstd)", columns["total"], "B", 90.0, "<=", detail)
    return row, {"bytes_per_token": columns, "tokens": tokens, "topk_mass": mass}


def bench_sampled_bytes(assets: Assets, sizes: Sizes, out: Path) -> tuple[Row, dict[str, Any]]:
    """Stored bytes per token of the sampled-target columns (``sampled_ids`` + ``sampled_weights``, zstd) for
    ``SAMPLES`` draws per position from the teacher itself (``cache.targets: sampled``), on the bench vocabulary."""
    cache_settings = CacheConfig(top_k=1, batch_size=sizes.batch, targets="sampled", samples=SAMPLES)
    files, meta = write_bench_cache(assets, sizes, out, cache_settings)
    rows = [cf.read_cache_meta(f)["rows"] for f in files]
    per_file = [column_bytes_per_token(f) for f in files]
    columns = {n: sum(p[n] * r for p, r in zip(per_file, rows, strict=True)) / sum(rows) for n in cf.SAMPLED_COLUMNS}
    dataset = cf.CacheDataset(files, batch_size=64, shuffle=False, columns=["sampled_weights"])
    distinct = torch.cat([(b["sampled_weights"] > 0).sum(-1).flatten().float() for b in dataset]).mean().item()
    value = sum(columns.values())
    detail = (
        f"{SAMPLES} draws per position, {distinct:.1f} distinct ids on average; ids {columns['sampled_ids']:.1f} + "
        f"weights {columns['sampled_weights']:.1f} B; {sum(rows) * sizes.seq_len:,} tokens, V={assets.vocab}"
    )
    row = Row("sampled_bytes_per_token", "sampled targets bytes/token (zstd)", value, "B", 40.0, "<=", detail)
    return row, {"bytes_per_token": columns, "distinct_per_position": distinct, "draws": SAMPLES}


def parallel_tensor_size(teacher_config: Any) -> int:
    """The smallest tensor-parallel size > 1 the teacher allows (2 for the tiny Llama, 3 for SmolLM2's 9/3 heads)."""
    heads, kv = (
        int(teacher_config.num_attention_heads),
        int(getattr(teacher_config, "num_key_value_heads", None) or teacher_config.num_attention_heads),
    )
    return next(t for t in range(2, heads + 1) if heads % t == 0 and kv % t == 0)


def parallel_worker(root: Path, out: Path, tensor_parallel: int, batch: int, logits_chunk: int, shards: int) -> None:
    """One process of a teacher-parallel mode (under torchrun): load the teacher as the cache stage does
    (``teacher_parallel.setup``/``load_teacher``), cache ``root/rows.npy`` in ``shards`` shards with
    ``cache.extract_batch`` (replica r takes shards r, r+R, ...; its TP rank 0 writes them) and let rank 0 write the
    compute time between two barriers to ``out/result.json``."""
    from pipeline.config import TeacherConfig

    on = mdl.device()
    layout = tp.setup(tensor_parallel, on)
    teacher_settings = TeacherConfig(name_or_path=str(root / "teacher"), dtype="float32")
    teacher = tp.load_teacher(teacher_settings, layout, on)
    rows = np.load(root / "rows.npy")
    layer = max(1, teacher.config.num_hidden_layers // 2)
    cache_settings = CacheConfig(top_k=TOP_K, hidden_layers=[layer], batch_size=batch, logits_chunk=logits_chunk)
    extraction, fields = cache_stage.resolve_extraction(cache_settings, teacher.config, rows.shape[1], 0)
    pieces = np.array_split(np.arange(len(rows)), shards)
    tp.barrier(layout)
    started = time.perf_counter()
    for index in range(layout.replica, shards, layout.replicas):
        ids = rows[pieces[index]]
        parts = []
        for start in range(0, len(ids), batch):
            chunk = torch.from_numpy(ids[start : start + batch].astype(np.int64))
            parts.append(cache_stage.extract_batch(teacher, chunk, torch.ones_like(chunk), extraction))
        if layout.writer:
            packed = {"sample_id": pieces[index].astype(np.int64), "input_ids": ids,
                      "attention_mask": np.ones_like(ids, dtype=np.int8)}  # fmt: skip
            name = f"train-{index:05d}.parquet"
            meta = {"teacher": "bench", "teacher_fingerprint": "bench", "vocab_hash": "bench",
                    "vocab_size": int(teacher.config.vocab_size), "dtype": "float32", **fields, "split": "train",
                    "manifest_shard": name, "manifest_sha256": "bench", "rows": len(ids)}  # fmt: skip
            cf.write_shard(out / name, cache_stage.to_columns(parts, packed), meta)
    tp.barrier(layout)
    seconds = time.perf_counter() - started
    if layout.rank == 0:
        tokens = int(rows.size)
        result = {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}
        atomic_write_json(
            out / "result.json", {**result, "processes": layout.world, "tensor_parallel": tensor_parallel}
        )


def bench_parallel(
    assets: Assets, sizes: Sizes, out: Path, log: Callable[[str], None], nproc_dp: int = 2
) -> tuple[list[Row], dict[str, Any]]:
    """The cache teacher under torchrun (gloo on CPU, NCCL on GPU): 1 process, DP=``nproc_dp`` (whole teacher per
    rank) and TP=T (transformers tensor parallelism, T the smallest the heads allow) cache the same rows; rows say
    how far each mode's shards are from the single process's and the tokens/s of each, measured one after another
    in this run."""
    root = out / "parallel"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    assets.teacher.save_pretrained(root / "teacher")
    rows = assets.rows[: sizes.parallel_rows]
    np.save(root / "rows.npy", rows)
    tensor = parallel_tensor_size(assets.teacher.config)
    modes = {"single": (1, 1), "dp": (nproc_dp, 1), "tp": (tensor, tensor)}
    results: dict[str, Any] = {}
    for mode, (nproc, tensor_parallel) in modes.items():
        log(f"teacher parallelism: {mode} ({nproc} process(es), tensor_parallel {tensor_parallel})")
        target = root / mode
        target.mkdir()
        if nproc == 1:  # the reference: this process, no launcher
            parallel_worker(root, target, 1, sizes.batch, sizes.logits_chunk, sizes.parallel_shards)
            results[mode] = json.loads((target / "result.json").read_text())
            continue
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(sizes.threads or 1)}
        code = (
            "import sys; from pathlib import Path; from pipeline.bench import parallel_worker; "
            f"parallel_worker(Path({str(root)!r}), Path({str(target)!r}), {tensor_parallel}, {sizes.batch}, "
            f"{sizes.logits_chunk}, {sizes.parallel_shards})"
        )
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "--no-python", sys.executable, "-c", code]  # fmt: skip
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise RuntimeError(f"bench parallel {mode} failed: {(done.stderr or done.stdout)[-2000:]}")
        results[mode] = json.loads((target / "result.json").read_text())
    dp, tp_ = tp.compare_caches(root / "dp", root / "single"), tp.compare_caches(root / "tp", root / "single")
    speed = {mode: results[mode]["tokens_per_s"] for mode in modes}
    where = "GPU" if torch.cuda.is_available() else "CPU, gloo"

    def detail(cmp: dict[str, Any]) -> str:
        diffs = ", ".join(f"{k} {v:.1e}" for k, v in cmp["max_abs"].items())
        return (
            f"{cmp['identical_shards']}/{cmp['shards']} shards byte-identical; top-{TOP_K} id sets equal at "
            f"{cmp['positions'] - cmp['boundary_swaps'] - cmp['other_id_differences']}/{cmp['positions']} positions "
            f"({cmp['reordered_positions']} reordered, {cmp['boundary_swaps']} k-th-place near-ties); "
            f"max |diff|: {diffs}"
        )

    def distance(cmp: dict[str, Any]) -> float:
        return cmp["max_fp16_steps"] if cmp["other_id_differences"] == 0 else float("inf")

    ratio = speed["tp"] / speed["single"]
    speeds = f"{speed['tp']:.0f} / {speed['dp']:.0f} / {speed['single']:.0f} tokens/s ({where}; {len(rows)} rows x "
    speeds += f"{rows.shape[1]} in {sizes.parallel_shards} shards; value: TP over 1 process)"
    table = [
        Row("parallel_dp", f"DP={nproc_dp} cache vs 1 process (fp16 steps)", distance(dp), "", 1.0, "<=", detail(dp)),
        Row("parallel_tp", f"TP={tensor} cache vs 1 process (fp16 steps)", distance(tp_), "", 1.0, "<=", detail(tp_)),
        Row(
            "parallel_speed", f"teacher tokens/s: TP={tensor} / DP={nproc_dp} / 1 process", ratio, "x", None, "", speeds
        ),
    ]
    return table, {"results": results, "dp": dp, "tp": tp_, "tensor_parallel": tensor}


SLURM_ROW = "Slurm chain overhead (5 trivial stages)"
SLURM_STAGE_RESOURCES = {"gpus_per_node": 0, "cpus_per_task": 1, "mem_gb": 1, "time": "5"}


def slurm_chain_config(root: Path) -> Path:
    """A config whose chain is exactly five jobs (one train variant), sized to fit any node; the stages' commands
    are replaced by ``true``, so what is timed is submission, scheduling and the ``afterok`` hand-offs."""
    import yaml

    stages = {name: dict(SLURM_STAGE_RESOURCES) for name in STAGES}
    data = {
        "run_name": "bench_slurm",
        "runs_dir": str(root / "runs"),
        "logs_dir": str(root / "logs"),
        "teacher": {"name_or_path": "unused"},
        "student": {"name_or_path": "unused"},
        "train": {"variants": {"ce": {}}},
        "monitor": {"enabled": False},
        "slurm": {"python": sys.executable, "signal_s": 60, "stages": stages},  # signal_s below the 5 min limit
    }
    path = root / "config.yaml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def bench_slurm(out: Path, log: Callable[[str], None], timeout_s: float = 120.0) -> tuple[Row, dict]:
    """Submit-to-last-completion seconds of five trivial chained jobs through ``pipeline.slurm.submit`` (the
    same generated scripts, dependencies and run record as ``make submit``)."""
    from pipeline import config as config_mod
    from pipeline import slurm

    name = SLURM_ROW
    ping = shutil.which("scontrol") and subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    if not ping or ping.returncode != 0 or "UP" not in ping.stdout:
        return Row("slurm", name, None, "s", 15.0, "<=", "skipped: no Slurm cluster is up (make cluster)"), {}
    root = out / "slurm"
    shutil.rmtree(root, ignore_errors=True)
    config_path = slurm_chain_config(root)
    cfg = config_mod.load(config_path, [])
    log("submitting five chained trivial Slurm jobs")
    started = time.perf_counter()
    record = slurm.submit(cfg, config_path, [], commands={stage: "true" for stage in STAGES})
    ids = [job["job_id"] for job in record["jobs"]]
    states: dict[str, str] = {}
    while time.perf_counter() - started < timeout_s:
        states = {j: slurm.summarize_job(t)["state"] for j, t in slurm.slurm_states(ids).items()}
        if all(s in slurm.DONE_STATES for s in states.values()):
            break
        time.sleep(0.1)
    seconds = time.perf_counter() - started
    raw = {"seconds": seconds, "states": states, "jobs": len(ids)}
    if len(ids) != 5 or any(s != "COMPLETED" for s in states.values()):
        return Row("slurm", name, None, "s", 15.0, "<=", f"skipped: chain did not complete ({states})"), raw
    detail = "submit to last completion, polled every 0.1 s via sacct/squeue"
    return Row("slurm", name, seconds, "s", 15.0, "<=", detail), raw


# ----------------------------------------------------------------------------------------------- output
MEMORY_ROWS = ("memory", "student_step_memory")  # fractions shown as 1/n


def format_value(row: Row) -> str:
    if row.value is None:
        return "—"
    if row.key in MEMORY_ROWS:
        return f"{row.value:.3f} (1/{1 / row.value:.0f})" if 0 < row.value < 1 else f"{row.value:.3f}"
    return f"{row.value:.3g}{row.unit}" if row.unit != "B" else f"{row.value:.1f} B"


def format_goal(row: Row) -> str:
    if row.goal is None:
        return "—"
    if row.key in MEMORY_ROWS:
        return f"{row.op} 1/{1 / row.goal:.0f}"
    return f"{row.op} {row.goal:g}{row.unit if row.unit != 'B' else ' B'}"


def format_table(rows: list[Row]) -> str:
    """The table as Markdown (it reads fine in a terminal too)."""
    lines = ["| benchmark | measured | goal | result | detail |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row.name} | {format_value(row)} | {format_goal(row)} | {row.status} | {row.detail} |")
    return "\n".join(lines)


def format_markdown(result: dict[str, Any], rows: list[Row]) -> str:
    """BENCHMARKS.md: how to reproduce, the table, the machine, the data and the method."""
    m = result["machine"]
    gpu = m["gpu"] or "none"
    assets = result["assets"]
    return f"""# Benchmarks

Generated by `{result["command"]}` on {result["date"]} ({result["mode"]} mode, {result["wall_s"]:.0f} s).
Raw figures: `{result["json"]}`. Regenerate with `make bench` (quick) or `make bench ARGS=--full` (GPU).

Every timed row is a ratio of two things timed alternately in the same process, the median over repeats: the
machines are shared and noisy, so absolute times from different runs are not comparable. Bytes per token and the
Slurm chain are absolute. Goals come from issues 4, 5 and 7.

{format_table(rows)}

## Machine

- CPU: {m["cpu"]}, {m["cores"]} cores ({m["cores_usable"]} usable, torch threads {m["torch_threads"]}), \
{m["ram_gb"]} GiB RAM
- GPU: {gpu}
- Python {m["python"]}, torch {m["torch"]}, device `{m["device"]}`

## Data and models

- Text: {assets["text"]} ({assets["text_chars"]:,} characters); tokenizer: {assets["tokenizer"]}.
- Teacher: {assets["teacher"]} ({assets["teacher_params"]:,} parameters); student {assets["student_params"]:,} \
parameters.
- Cache: {assets["rows"]} rows x {assets["seq_len"]} tokens of the text in shards of \
{result["sizes"]["rows_per_shard"]} rows, top-{TOP_K} log-probs + tail, written by `cache_format.write_shard` (zstd
  level 3) from `cache.extract_batch`.

## Method

- Reader: `bench.benchmark_reader`: CacheDataset (fresh datasets back to back, each reading footers and
  decoding every row group again) vs `to_pydict` rows turned into tensors one by one, both yielding the stored
  dtypes (int32 ids, int8 mask, fp16 log-probs; `cache_format.to_compute` widens on the device), each timed over
  windows of the same length.
- Extraction: `bench.benchmark_extraction`: `cache.extract_batch` (body with hidden states, LM head + log-softmax +
  top-k + tail in chunks, one hidden layer copied out) vs `model(input_ids)` computing the full logits, same batch.
- Memory: `cache.topk_chunked` vs full fp32 logits + log-softmax + top-k, torch's tensor peak (profiler memory events
  on CPU, `torch.cuda.max_memory_allocated` on GPU) over the B x T x V x 4 bytes of the logits. On CPU the detail adds
  the resident-set peak of each in a fresh process (`bench.topk_peak_memory`), which includes glibc's heap policy.
- KD steps: `bench.step_time_ratios` (`train._loss_step` + backward + AdamW per variant on the same batch) vs CE only.
- Student step: `bench.bench_student_step`: a KD step (0.5 CE + 0.5 tail-bucket KL, `train._loss_step` + backward +
  AdamW) of a tiny Llama body with Llama-3's 128,256-token vocabulary, LM head in chunks (`pipeline.lm_head`,
  recomputed in the backward pass) vs whole logits. Memory: the rise of the resident-set peak during a steady-state
  step (after a warm-up step), each in a fresh process (CPU; `torch.cuda.max_memory_allocated` on GPU); time:
  alternating steps on one model, medians.
- FLOP/s: model FLOPs (2 x matmul weights x tokens + 4 x layers x T x hidden x tokens) per second of the bare
  forward over the FLOP/s of a square GEMM in the model's dtype timed right after it (median over repeats).
- Slurm: five trivial chained jobs (`afterok`), submit to last completion, through `pipeline.slurm`.
"""


def run_bench(
    sizes: Sizes,
    out: Path,
    markdown: Path | None,
    text: Path | None,
    command: str,
    *,
    slurm: bool = True,
    parallel: bool = True,
    log: Callable[[str], None] = lambda msg: print(f"bench: {msg}", file=sys.stderr, flush=True),
) -> dict[str, Any]:
    """Measure every row, write ``<out>/bench.json`` and (if given) the Markdown report; returns the result."""
    started = time.perf_counter()
    on = mdl.device()
    if sizes.threads:
        torch.set_num_threads(sizes.threads)
    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    assets = build_assets(sizes, text, on, log)
    log(f"caching the text with the teacher (top-{TOP_K} + tail)")
    files, meta = write_bench_cache(assets, sizes, out / "cache")
    rows: list[Row] = []
    raw: dict[str, Any] = {}
    log("reader")
    row, raw["reader"] = bench_reader(files, sizes)
    rows.append(row)
    log("extraction and FLOP/s")
    extraction, flops, raw["extraction"] = bench_extraction(assets, sizes, on)
    rows.append(extraction)
    log("peak memory")
    row, raw["memory"] = bench_memory(assets, sizes, on)
    rows.append(row)
    log("KD steps")
    kd_rows, raw["kd_steps"] = bench_kd_steps(assets, sizes)
    rows += kd_rows
    log("student step: chunked LM head vs whole logits")
    step_rows, raw["student_step"] = bench_student_step(sizes, on)
    rows += step_rows
    row, raw["bytes"] = bench_bytes(files, meta, assets)
    rows.append(row)
    log(f"sampled targets ({SAMPLES} draws per position)")
    row, raw["sampled_bytes"] = bench_sampled_bytes(assets, sizes, out / "cache_sampled")
    rows.append(row)
    rows.append(flops)
    if parallel:
        parallel_rows, raw["parallel"] = bench_parallel(assets, sizes, out, log)
        rows += parallel_rows
    if slurm:
        row, raw["slurm"] = bench_slurm(out, log)
    else:
        row = Row("slurm", SLURM_ROW, None, "s", 15.0, "<=", "skipped: --skip-slurm")
    rows.append(row)
    result = {
        "mode": sizes.name,
        "command": command,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "wall_s": time.perf_counter() - started,
        "machine": machine_info(on),
        "sizes": dataclasses.asdict(sizes),
        "assets": assets.describe,
        "rows": [r.to_dict() for r in rows],
        "raw": raw,
        "json": shown_path(out / "bench.json"),
    }
    atomic_write_json(out / "bench.json", result)
    if markdown is not None:
        atomic_write_text(markdown, format_markdown(result, rows))
    print(format_table(rows))
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.bench [--quick|--full] [--out DIR] [--markdown FILE] [--text FILE]``."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick", help="tiny models (default)")
    mode.add_argument("--demo-models", dest="mode", action="store_const", const="demo-models",
                      help="the demo's teacher and student at quick shapes (CPU)")  # fmt: skip
    mode.add_argument("--full", dest="mode", action="store_const", const="full", help="demo models, GPU shapes")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench", help="raw figures and bench cache")
    parser.add_argument("--markdown", type=Path, default=REPO / "BENCHMARKS.md", help="report to refresh")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="real text (.jsonl with 'text' or plain)")
    parser.add_argument("--skip-slurm", action="store_true", help="leave out the Slurm chain row")
    parser.add_argument("--skip-parallel", action="store_true", help="leave out the teacher-parallel rows")
    args = parser.parse_args(argv)
    sizes = MODES[args.mode or "quick"]
    command = "python -m pipeline.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    run_bench(sizes, args.out, args.markdown, args.text, command.strip(), slurm=not args.skip_slurm,
              parallel=not args.skip_parallel)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
