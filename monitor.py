"""Telemetry beside a pipeline stage: GPUs through NVML, host CPU and RAM, one JSON line per sample.

Writes ``logs/<run>/<stage>/telemetry_<host>_<job>.jsonl`` (pipeline.jsonlog schema, event ``telemetry``; ``<job>``
is ``<array job>_<task>`` for array tasks, ``local`` outside Slurm) and, at exit, the per-stage summary
``telemetry_summary_<host>_<job>[_restart<n>].json`` {duration_s, gpu_util_mean, gpu_util_max, gpu_mem_peak_gb,
energy_wh, ...}, one per attempt of a requeued job.
Samples follow a fixed cadence on absolute deadlines (no drift). The monitor stops cleanly on SIGTERM/SIGINT/SIGUSR2
and when the process given by ``--pid`` (the stage) has ended (SIGUSR2: what slurm/job.sh sends a monitor started
with srun, which forwards it, where a SIGTERM to srun SIGKILLs the step); SIGUSR1 (the preemption warning meant for
the stage) is ignored. Without NVML it warns once and keeps sampling the host. The slurm/*.sbatch scripts start it
once per node; a stage run outside Slurm starts it itself (``pipeline.telemetry.LocalMonitor``); by hand::

    python monitor.py --run tiny --stage train --interval 1 --pid 12345
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from pipeline.jsonlog import JsonLogger, slurm_ids
from pipeline.rundir import atomic_write_json
from pipeline.telemetry import Gpus, Summary, host_sample, next_deadline, open_gpus

FIRST_CPU_WINDOW_S = 0.1  # the first CPU share is measured over this window (later ones: since the previous sample)


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie, i.e. finished but not yet reaped, counts as ended)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def job_ref() -> str:
    """``<job>``, ``<array job>_<task>`` or ``local``: what names this job's telemetry files."""
    job, task = slurm_ids()
    if job is None:
        return "local"
    return f"{job}_{task}" if task is not None else job


def monitor(
    log: JsonLogger,
    *,
    interval_s: float,
    stop: threading.Event,
    gpus: Gpus | None,
    pid: int | None = None,
    clock=time.monotonic,
) -> dict:
    """Sample until ``stop`` is set or ``pid`` ends; return the summary (also logged as ``telemetry_summary``)."""
    summary = Summary(started=clock())
    start = clock()
    window: float | None = min(interval_s, FIRST_CPU_WINDOW_S)
    while True:
        now = clock()
        sample = host_sample(window)
        window = None
        if gpus is not None:
            sample["gpus"] = gpus.sample(now)
        summary.add(sample)
        log.info("telemetry", **sample)
        if stop.wait(max(0.0, next_deadline(start, interval_s, clock()) - clock())):
            break
        if pid is not None and not pid_alive(pid):
            break
    result = summary.result(clock())
    log.info("telemetry_summary", f"{summary.samples} samples every {interval_s} s", **result)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python monitor.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="run name (logs/<run>/)")
    parser.add_argument("--stage", required=True, help="stage being watched (logs/<run>/<stage>/)")
    parser.add_argument("--logs-dir", default="logs", help="root of log directories (cfg.logs_dir)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    parser.add_argument("--pid", type=int, default=None, help="stop when this process (the stage) ends")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.interval <= 0:
        print(f"monitor.py: --interval: expected seconds > 0, got {args.interval}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2):
        signal.signal(sig, lambda signum, frame: stop.set())
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    host, ref = socket.gethostname(), job_ref()
    out_dir = Path(args.logs_dir) / args.run / args.stage
    log = JsonLogger(
        args.run,
        args.stage,
        out_dir / f"telemetry_{host}_{ref}.jsonl",
        rank=int(os.environ.get("SLURM_NODEID", "0")),
        console=False,
    )
    gpus, reason = open_gpus()
    if reason is not None:
        log.warning("nvml_unavailable", reason)
        print(f"monitor.py: warning: {reason}", file=sys.stderr)
    log.info("monitor_start", f"pid {os.getpid()} watching {args.pid}", interval_s=args.interval)
    try:
        result = monitor(log, interval_s=args.interval, stop=stop, gpus=gpus, pid=args.pid)
    finally:
        if gpus is not None:
            gpus.close()
        log.close()
    job, task = slurm_ids()
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    ids = {"run": args.run, "stage": args.stage, "host": host, "job": job, "task": task, "restart": restart}
    # one summary per attempt: a requeued job's earlier attempt used energy too (the report sums the files)
    name = f"telemetry_summary_{host}_{ref}" + (f"_restart{restart}" if restart else "") + ".json"
    atomic_write_json(out_dir / name, {**ids, "interval_s": args.interval, **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
