"""``make gpu-check``: every CUDA path of the pipeline in one prepared run (under 8 minutes on one H200), one report.

Run     ``python -m pipeline.gpu_check [--out runs/gpu_check] [--teacher DIR | --gguf FILE] [--text FILE]``
        ``python -m pipeline.gpu_check --cpu-smoke``  the same sequence on the CPU with tiny shapes: tests this script
        (configs, subprocesses, report) where there is no GPU; its figures mean nothing
Writes  ``<out>/gpu_check.json`` {status, wall_s, machine, teacher, checks: {name: {status, seconds, ...}}}, rewritten
        after every check (a run cut short keeps what it measured), plus the run directory, logs and bench output
Exit    0 when every check passed or was skipped, 1 when one failed, 2 without a CUDA GPU (nothing is run).

Checks, in order; one that fails is recorded and the next runs, one that needs an earlier one's output is skipped:

1. ``environment``  GPUs, torch/CUDA/NCCL versions, a bf16 GEMM's TFLOP/s (this GPU's practical ceiling)
2. ``cache_bf16``   the manifest and cache stages as subprocesses (the commands users run): teacher in bf16 with SDPA on
                    the GPU; tokens/s and MFU of the stage; stored top-k against an fp32 forward of the same rows
3. ``parallel``     with 2+ GPUs: ``bench.bench_parallel`` under torchrun with NCCL (DP=G and TP shards against one
                    process, tokens/s of each); skipped on one GPU
4. ``train_fsdp``   the train stage, response KD, ``train.distributed=fsdp`` in bf16 (FSDP2 MixedPrecisionPolicy) on one
                    GPU: finite falling losses, sharded DCP checkpoint, ``final/`` loads with from_pretrained
5. ``telemetry``    the NVML files the stages' own monitors wrote: GPU count, utilisation, power, energy
6. ``bench``        ``make bench --full``'s rows on this GPU (extraction overhead and FLOP/s, reader, memory, KD steps)

The teacher is the demo's SmolLM2-135M-Instruct (``models/smollm2-135m-instruct``, or ``--gguf`` to convert the
GGUF there) and otherwise a random-init Llama with SmolLM2's layers and a BPE tokenizer of 8,192 tokens trained on
the text: the same body FLOPs per token (a smaller LM head), so throughput and MFU stay representative, but its
distributions are not a trained model's; the report says which one ran.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pipeline import bench
from pipeline.jsonlog import parse_jsonl
from pipeline.rundir import REPO, atomic_write_json

EXIT_FAILED, EXIT_NO_GPU = 1, 2
SMOLLM2_SHAPE = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                 "num_key_value_heads": 3}  # fmt: skip
TINY_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2}  # fmt: skip
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}  # dense, from the data sheets


@dataclasses.dataclass(frozen=True)
class CheckSizes:
    """Shapes of one gpu-check mode."""

    seq_len: int
    max_tokens: int  # tokens the manifest keeps (train + val)
    val_fraction: float  # of the ~600-character passages the text is cut into
    rows_per_shard: int
    cache_batch: int
    logits_chunk: int
    train_steps: int
    micro_batch: int
    fallback_teacher: dict[str, int]  # shape of the random teacher when the demo teacher is not there
    bench: bench.Sizes
    timeout_s: int  # per subprocess


GPU = CheckSizes(512, 1 << 19, 0.02, 128, 16, 4096, 60, 8, SMOLLM2_SHAPE, bench.FULL, 600)
SMOKE_BENCH = dataclasses.replace(
    bench.QUICK, name="smoke", text_chars=60_000, vocab=300, teacher_hidden=32, teacher_layers=2, teacher_steps=2,
    student_hidden=32, student_layers=2, seq_len=32, cache_rows=16, rows_per_shard=8, batch=4, memory_positions=256,
    logits_chunk=64, gemm_n=64, repeats=1, step_vocab=3000, step_hidden=32, step_seq_len=64, step_chunk=16,
)  # fmt: skip
SMOKE = CheckSizes(32, 2500, 0.3, 8, 4, 64, 4, 4, TINY_SHAPE, SMOKE_BENCH, 300)


# ------------------------------------------------------------------------------------------------- helpers
class Report:
    """The JSON report, rewritten after every check so that a run cut short keeps what it measured."""

    def __init__(self, path: Path, mode: str) -> None:
        self.path = path
        self.data: dict[str, Any] = {
            "status": "running",
            "mode": mode,
            "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "checks": {},
        }
        self.started = time.perf_counter()

    def save(self) -> None:
        self.data["wall_s"] = round(time.perf_counter() - self.started, 1)
        atomic_write_json(self.path, self.data)

    def run(self, name: str, check: Callable[[], dict[str, Any]], needs: tuple[str, ...] = ()) -> bool:
        """Run one check, record pass/fail/skip, its seconds and figures; returns whether it passed."""
        missing = [n for n in needs if self.data["checks"].get(n, {}).get("status") != "pass"]
        started = time.perf_counter()
        if missing:
            result = {"status": "skipped", "reason": f"needs {', '.join(missing)}"}
        else:
            print(f"gpu-check: {name} ...", file=sys.stderr, flush=True)
            try:
                result = {"status": "pass", **check()}
            except Skip as skip:
                result = {"status": "skipped", "reason": str(skip)}
            except Exception as err:  # recorded; the next checks still run
                result = {
                    "status": "fail",
                    "error": f"{type(err).__name__}: {err}",
                    "traceback": traceback.format_exc(),
                }
        result["seconds"] = round(time.perf_counter() - started, 1)
        self.data["checks"][name] = result
        self.save()
        print(f"gpu-check: {name}: {result['status']} ({result['seconds']} s)", file=sys.stderr, flush=True)
        return result["status"] == "pass"


class Skip(Exception):
    """A check that does not apply here (one GPU, no NVML ...); the message says why."""


def run_module(args: list[str], timeout_s: int, log: Path, nproc: int = 1) -> None:
    """``python -m <args>`` (under torchrun when ``nproc`` > 1) with output in ``log``; raises on failure."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)  # carried wheels too
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env["TOKENIZERS_PARALLELISM"] = "false"
    prefix = [sys.executable, "-m"]
    if nproc > 1:
        prefix += ["torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m"]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        done = subprocess.run([*prefix, *args], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                              timeout=timeout_s, check=False)  # fmt: skip
    if done.returncode != 0:
        tail = log.read_text()[-2000:]
        raise RuntimeError(f"python -m {' '.join(args[:1])} exited {done.returncode}; end of {log}:\n{tail}")


def peak_tflops(name: str) -> float | None:
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None)


# ------------------------------------------------------------------------------------------------- assets
def prepare_assets(out: Path, sizes: CheckSizes, args: argparse.Namespace) -> dict[str, Any]:
    """Teacher, student and text for the stages: the demo's when present, else built here (see the docstring)."""
    from pipeline import demo_assets

    text, source = bench.load_text(args.text, 4_000_000 if sizes is GPU else 200_000)
    assets: dict[str, Any] = {"text": source}
    teacher = args.teacher
    if teacher is None and args.gguf is not None:
        teacher = out / "assets" / "teacher"
        if not (teacher / "config.json").is_file():
            demo_assets.convert_gguf(args.gguf, teacher)
    if teacher is None and sizes is GPU and bench.DEMO_TEACHER.is_dir():
        teacher = bench.DEMO_TEACHER
    if teacher is None:
        teacher = out / "assets" / "random_teacher"
        build_random_teacher(teacher, text, sizes.fallback_teacher)
        assets["teacher_note"] = (
            "random-init Llama of the listed shape (demo teacher not found): figures are speed only"
        )
    student = out / "assets" / "student"
    if not (student / "config.json").is_file():
        shape = demo_assets.STUDENT_SHAPE if sizes is GPU else {**TINY_SHAPE, "max_position_embeddings": 256}
        demo_assets.build_student(Path(teacher), student, shape=shape)
    corpus = out / "assets" / "text.jsonl"
    corpus.parent.mkdir(parents=True, exist_ok=True)
    with open(corpus, "w", encoding="utf-8") as fh:  # passages of ~600 characters (~150 tokens), one record each
        for start in range(0, len(text), 600):
            fh.write(json.dumps({"text": text[start : start + 600]}) + "\n")
    teacher_config = json.loads((Path(teacher) / "config.json").read_text())
    assets.update(teacher=str(teacher), student=str(student), corpus=str(corpus),
                  teacher_shape={k: teacher_config.get(k) for k in (*SMOLLM2_SHAPE, "vocab_size")})  # fmt: skip
    return assets


def build_random_teacher(out: Path, text: str, shape: dict[str, int]) -> None:
    """A random Llama of ``shape`` with a byte-level BPE tokenizer trained on ``text`` (EOS and pad added)."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if (out / "config.json").is_file():
        return
    tok = bench.train_bpe(text, 8192)
    tok.add_special_tokens(["<|endoftext|>", "<pad>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), max_position_embeddings=2048, tie_word_embeddings=True,
                         eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, **shape)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(out)
    fast.save_pretrained(out)


def write_config(out: Path, sizes: CheckSizes, assets: dict[str, Any], on: torch.device) -> Path:
    """The run's config: the assets above, bf16 + SDPA teacher (fp32 on the CPU, where bf16 matmuls crawl),
    response KD with FSDP, 0.5 s telemetry."""
    import yaml

    layers = int(assets["teacher_shape"]["num_hidden_layers"])
    data = {
        "run_name": "gpu_check",
        "runs_dir": str(out / "runs"),
        "logs_dir": str(out / "logs"),
        "teacher": {"name_or_path": assets["teacher"], "dtype": "bfloat16" if on.type == "cuda" else "float32",
                    "attn_implementation": "sdpa"},
        "student": {"name_or_path": assets["student"], "attn_implementation": "sdpa"},
        "manifest": {"sources": [{"path": "json", "data_files": assets["corpus"]}], "seq_len": sizes.seq_len,
                     "max_tokens": sizes.max_tokens, "rows_per_shard": sizes.rows_per_shard,
                     "val_fraction": sizes.val_fraction, "chat_template": False},
        "cache": {"top_k": 32, "hidden_layers": [layers // 2, layers], "embed_layer": layers,
                  "batch_size": sizes.cache_batch, "logits_chunk": sizes.logits_chunk, "log_every_s": 5.0},
        "train": {"variants": {"kd": {"ce_weight": 0.5, "response": {"weight": 0.5}}}, "baseline_variant": "kd",
                  "max_steps": sizes.train_steps, "micro_batch_size": sizes.micro_batch, "warmup_steps": 5,
                  "lr": 1.0e-3, "checkpoint_every": sizes.train_steps // 2, "eval_every": sizes.train_steps,
                  "eval_batches": 4, "log_every": 1, "distributed": "fsdp"},
        "monitor": {"interval_s": 0.5},
    }  # fmt: skip
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# -------------------------------------------------------------------------------------------------- checks
def check_environment(on: torch.device) -> dict[str, Any]:
    gemm = bench.gemm_timer(
        8192 if on.type == "cuda" else 256, on, torch.bfloat16 if on.type == "cuda" else torch.float32
    )
    flops = max(gemm() for _ in range(5))
    gpus = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    return {
        "gpus": [
            {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "sms": p.multi_processor_count}
            for p in gpus
        ],  # fmt: skip
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if on.type == "cuda" else None,
        "gemm_tflops": flops / 1e12,
        "gemm_dtype": "bfloat16" if on.type == "cuda" else "float32",
    }


def check_cache(
    config: Path, out: Path, sizes: CheckSizes, on: torch.device, peak: float | None, trained: bool
) -> dict[str, Any]:
    """Manifest + cache stages, then the stored top-k of the first shard against an fp32 forward of its rows
    (``trained``: a real teacher, whose top-1 must agree at >= 90 % of positions)."""
    from pipeline import cache_format as cf
    from pipeline import modeling as mdl
    from pipeline.config import ModelConfig

    run_module(["pipeline.manifest", "--config", str(config)], sizes.timeout_s, out / "logs_stdout" / "manifest.txt")
    run_module(["pipeline.cache", "--config", str(config)], sizes.timeout_s, out / "logs_stdout" / "cache.txt")
    cache_dir = out / "runs" / "gpu_check" / "cache"
    summary = json.loads((cache_dir / "_COMPLETE.json").read_text())["summary"]
    shard = cf.list_cache_shards(cache_dir, "train")[0]
    meta = cf.read_cache_meta(shard)
    batch = next(iter(cf.CacheDataset([shard], batch_size=8, shuffle=False)))
    batch = cf.to_compute(batch, on)
    teacher = mdl.load_causal_lm(ModelConfig(name_or_path=meta["teacher"], dtype="float32"), "teacher", on).eval()
    with torch.inference_mode():
        logp = torch.log_softmax(teacher(input_ids=batch["input_ids"]).logits.float(), dim=-1)
    real = batch["attention_mask"].bool()
    top1 = (logp.argmax(-1) == batch["topk_ids"][..., 0])[real].float().mean().item()
    diff = (logp.gather(-1, batch["topk_ids"]) - batch["topk_logprobs"])[real].abs()
    if trained and top1 < 0.9:  # a random teacher's near-uniform distributions make this figure meaningless
        raise RuntimeError(f"stored top-1 agrees with an fp32 forward at only {top1:.3f} of positions (< 0.9)")
    flops_per_token = bench.forward_flops(teacher, 1, sizes.seq_len) / sizes.seq_len
    achieved = summary["tokens_per_s"] * flops_per_token
    return {
        "tokens": summary["tokens"],
        "tokens_per_s": summary["tokens_per_s"],
        "stage_seconds": summary["duration_s"],
        "stored_dtype": meta["dtype"],
        "achieved_tflops": achieved / 1e12,
        "mfu_vs_datasheet": achieved / (peak * 1e12) if peak else None,
        "top1_agreement_vs_fp32": top1,
        "logprob_abs_diff_mean": diff.mean().item(),
        "logprob_abs_diff_max": diff.max().item(),
        "bytes_per_token": summary["bytes_per_token"],
    }


def check_parallel(assets_bench: Any, sizes: CheckSizes, out: Path) -> dict[str, Any]:
    gpus = torch.cuda.device_count()
    if gpus < 2:
        raise Skip(f"{gpus} GPU visible: TP/DP parity needs 2 or more")
    rows, raw = bench.bench_parallel(assets_bench, sizes.bench, out / "bench", lambda m: None, nproc_dp=gpus)
    return {"rows": [r.to_dict() for r in rows], "raw": raw}


def check_train(config: Path, out: Path, sizes: CheckSizes) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    run_module(["pipeline.train", "--config", str(config)], sizes.timeout_s, out / "logs_stdout" / "train.txt")
    variant = out / "runs" / "gpu_check" / "train" / "kd"
    rows = list(parse_jsonl((variant / "metrics.jsonl").read_text().splitlines()))
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    checkpoint = sorted((variant / "checkpoints").glob("step_*"))[-1]
    AutoModelForCausalLM.from_pretrained(variant / "final")
    summary = json.loads((variant / "summary.json").read_text())
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    if not (all(map(lambda v: v == v and abs(v) != float("inf"), losses)) and last < first):
        raise RuntimeError(f"train losses not finite and falling: first {losses[:3]}, last {losses[-3:]}")
    return {
        "steps": summary["steps"],
        "tokens_per_s": summary["tokens_per_s"],
        "loss_first3": first,
        "loss_last3": last,
        "mem_gb_peak": max(r.get("mem_gb", 0.0) for r in rows if r["split"] == "train"),
        "sharded_checkpoint": sorted(p.name for p in (checkpoint / "sharded").iterdir()),
    }


def check_telemetry(out: Path, on: torch.device) -> dict[str, Any]:
    from pipeline import telemetry

    result = {}
    for stage in ("cache", "train"):
        files = sorted((out / "logs" / "gpu_check" / stage).glob("telemetry_summary_*.json"))
        if not files:
            raise RuntimeError(f"{out / 'logs' / 'gpu_check' / stage}: no telemetry summary (monitor.py did not run)")
        result[stage] = telemetry.merge_summaries([json.loads(p.read_text()) for p in files])
    if on.type != "cuda":
        raise Skip(f"no NVML on the CPU (host metrics recorded: {sorted(result['cache'])})")
    for stage, merged in result.items():
        if not merged.get("gpu_count") or not merged.get("energy_wh") or not merged.get("gpu_util_max"):
            raise RuntimeError(f"{stage}: NVML telemetry incomplete: {merged}")
    return result


def check_bench(sizes: CheckSizes, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    result = bench.run_bench(sizes.bench, out / "bench", None, args.text, "python -m pipeline.gpu_check",
                             slurm=False, parallel=False)  # fmt: skip
    return {"rows": result["rows"], "assets": result["assets"]}


# ------------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "gpu_check", help="report and work directory")
    parser.add_argument("--teacher", type=Path, default=None, help="HF teacher directory (default: the demo's)")
    parser.add_argument("--gguf", type=Path, default=None, help="convert this GGUF teacher first (demo: SmolLM2)")
    parser.add_argument("--text", type=Path, default=bench.DEFAULT_TEXT, help="text for the manifest and the bench")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (tests this script)")
    args = parser.parse_args(argv)
    sizes = SMOKE if args.cpu_smoke else GPU
    args.out.mkdir(parents=True, exist_ok=True)
    report = Report(args.out / "gpu_check.json", "cpu-smoke" if args.cpu_smoke else "gpu")
    if not args.cpu_smoke and not torch.cuda.is_available():
        built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU only"
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
        message = (
            f"gpu-check: no CUDA GPU visible (torch {torch.__version__}, built for {built}; CUDA_VISIBLE_DEVICES="
            f"{visible}); nothing was run. Run it on a GPU node (srun --gpus=1 make gpu-check), or with --cpu-smoke "
            "to test the script itself"
        )
        report.data.update(status="no_gpu", error=message)
        report.save()
        print(message, file=sys.stderr)
        return EXIT_NO_GPU
    on = torch.device("cuda", 0) if not args.cpu_smoke else torch.device("cpu")
    report.data["machine"] = bench.machine_info(on)
    peak = peak_tflops(torch.cuda.get_device_name(0)) if on.type == "cuda" else None
    report.run("environment", lambda: check_environment(on))
    assets = prepare_assets(args.out, sizes, args)
    report.data["assets"] = assets
    config = write_config(args.out, sizes, assets, on)
    trained = "teacher_note" not in assets
    report.run("cache_bf16", lambda: check_cache(config, args.out, sizes, on, peak, trained))
    bench_assets: dict[str, Any] = {}

    def assets_for_bench() -> Any:
        if "assets" not in bench_assets:
            bench_assets["assets"] = bench.build_assets(sizes.bench, args.text, on, lambda m: None)
        return bench_assets["assets"]

    report.run("parallel", lambda: check_parallel(assets_for_bench(), sizes, args.out))
    report.run("train_fsdp", lambda: check_train(config, args.out, sizes), needs=("cache_bf16",))
    report.run("telemetry", lambda: check_telemetry(args.out, on), needs=("cache_bf16",))
    report.run("bench", lambda: check_bench(sizes, args.out, args))
    failed = [name for name, c in report.data["checks"].items() if c["status"] == "fail"]
    report.data["status"] = "fail" if failed else "pass"
    report.save()
    print(f"gpu-check: {report.data['status']} in {report.data['wall_s']} s; report {report.path}"
          + (f"; failed: {', '.join(failed)}" if failed else ""), file=sys.stderr)  # fmt: skip
    return EXIT_FAILED if failed else 0


if __name__ == "__main__":
    sys.exit(main())
