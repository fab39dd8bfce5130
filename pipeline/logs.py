"""Read a run's structured logs: a filtered, pretty-printed tail that can follow, and a one-screen overview.

    python -m pipeline.logs --config C | --run R [--logs-dir D] [--stage S] [--level L] [--event E] [-n N] [--follow]
    python -m pipeline.logs --run R --overview                                                    (make logs CONFIG=C)

Reads every ``logs/<run>/<stage>/*.jsonl`` (stage ranks and monitor.py telemetry, one pipeline.jsonlog schema) and
merges them by time. Telemetry samples are left out unless asked for (``--event telemetry`` or ``--telemetry``):
at one per second and node they would drown everything else. ``--level warning`` shows warnings and errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import config as config_mod
from pipeline.config import ConfigError
from pipeline.definition import STAGES
from pipeline.jsonlog import LEVELS, format_console, parse_jsonl

TELEMETRY_EVENTS = {"telemetry"}


@dataclass
class Filter:
    """Which records to show."""

    stages: set[str] = field(default_factory=set)
    min_level: str = "debug"
    events: set[str] = field(default_factory=set)
    telemetry: bool = False

    def match(self, rec: dict) -> bool:
        if self.stages and rec.get("stage") not in self.stages:
            return False
        if LEVELS.get(rec.get("level", "info"), 20) < LEVELS[self.min_level]:
            return False
        if self.events:
            return rec.get("event") in self.events
        return self.telemetry or rec.get("event") not in TELEMETRY_EVENTS


def log_files(run_dir: Path, stages: set[str] | None = None) -> list[Path]:
    """Every JSON-lines log of the run (optionally only some stages)."""
    return sorted(p for p in run_dir.glob("*/*.jsonl") if not stages or p.parent.name in stages)


def tail_records(path: Path, max_bytes: int = 1 << 20) -> list[dict]:
    """The records in the last ``max_bytes`` of a log (a cut first line is dropped)."""
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - max_bytes))
        lines = fh.read().decode("utf-8", errors="replace").splitlines()
    return list(parse_jsonl(lines[1:] if size > max_bytes else lines))


def format_record(rec: dict) -> str:
    """The console line of jsonlog plus where it came from (host, Slurm job/task, rank) when not a plain local run."""
    where = []
    if rec.get("job"):
        where.append(f"job {rec['job']}" + (f"_{rec['task']}" if rec.get("task") is not None else ""))
    if rec.get("rank"):
        where.append(f"rank {rec['rank']}")
    line = format_console(rec)
    return f"{line}  ({rec.get('host', '?')}{', ' if where else ''}{', '.join(where)})" if where else line


class Follower:
    """Remembers how far each log file was read; :meth:`poll` returns the new complete records (new files too).

    The first poll returns everything already written, so listing then following has no gap and no repeat.
    """

    def __init__(self, run_dir: Path, flt: Filter) -> None:
        self.run_dir, self.flt = run_dir, flt
        self.offsets: dict[Path, int] = {}
        self.partial: dict[Path, str] = {}

    def poll(self) -> list[dict]:
        new = []
        for path in log_files(self.run_dir, self.flt.stages):
            offset = self.offsets.get(path, 0)
            size = path.stat().st_size
            if size < offset:  # truncated or replaced: start over
                offset, self.partial[path] = 0, ""
            if size == offset:
                continue
            with open(path, "rb") as fh:
                fh.seek(offset)
                chunk = fh.read(size - offset).decode("utf-8", errors="replace")
            self.offsets[path] = size
            text = self.partial.pop(path, "") + chunk
            complete, _, rest = text.rpartition("\n")
            if rest:
                self.partial[path] = rest  # the writer has not finished this line yet
            new += [r for r in parse_jsonl(complete.splitlines()) if self.flt.match(r)]
        return sorted(new, key=lambda r: r.get("ts", ""))


# -------------------------------------------------------------------------------------------------- overview
def _fmt(value: object) -> str:
    return "-" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)


def overview(run_dir: Path, max_bytes: int = 1 << 20) -> str:
    """One screen: per stage the latest progress line, warning/error counts and the latest telemetry sample."""
    found = {p.parent.name for p in log_files(run_dir)}
    stages = [s for s in STAGES if s in found] + sorted(found - set(STAGES))
    if not stages:
        return f"{run_dir}: no logs yet"
    lines = [f"run {run_dir.name} ({run_dir})"]
    for stage in stages:
        progress, telemetry, counts = None, {}, {"warning": 0, "error": 0}
        for path in log_files(run_dir, {stage}):
            from_monitor = path.name.startswith("telemetry_")
            for rec in tail_records(path, max_bytes):
                if from_monitor:  # the monitor's lines are not the stage's progress
                    if rec.get("event") in TELEMETRY_EVENTS:
                        telemetry[rec.get("host")] = rec
                    continue
                if rec.get("level") in counts:
                    counts[rec["level"]] += 1
                if progress is None or rec.get("ts", "") >= progress.get("ts", ""):
                    progress = rec
        flags = ", ".join(f"{n} {lvl}s" for lvl, n in counts.items() if n)
        lines.append(f"{stage:<9} {format_console(progress)[:140] if progress else '-'}")
        if flags:
            hint = f"python -m pipeline.logs --run {run_dir.name} --stage {stage} --level warning"
            lines.append(f"{'':<9} {flags} ({hint})")
        for host, rec in sorted(telemetry.items(), key=lambda kv: str(kv[0])):
            m = rec.get("metrics", {})
            gpus = m.get("gpus") or []
            gpu = ""
            if gpus:
                util = [g["util_pct"] for g in gpus if g.get("util_pct") is not None]
                mem = sum(g.get("mem_used_gb") or 0 for g in gpus)
                energy = sum(g.get("energy_wh") or 0 for g in gpus)
                mean = sum(util) / len(util) if util else None
                gpu = f" | {len(gpus)} GPUs util {_fmt(mean)}% mem {mem:.1f} GB energy {energy:.3g} Wh"
            lines.append(
                f"{'':<9} telemetry {host} {rec.get('ts', '')[11:19]}: cpu {_fmt(m.get('cpu_util_pct'))}% "
                f"ram {_fmt(m.get('ram_used_gb'))} GB{gpu}"
            )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- CLI
def run_location(config: str | None, overrides: list[str], run: str | None, logs_dir: str | None) -> tuple[str, Path]:
    """(run name, logs root) of the logs/status/cancel commands: ``--run``/``--logs-dir`` when given, else the
    config's ``run_name``/``logs_dir`` (so a run with a non-default logs_dir is found through its config)."""
    if config is not None:
        cfg = config_mod.load(config, overrides)
        run, logs_dir = run or cfg.run_name, logs_dir or cfg.logs_dir
    if not run:
        raise ConfigError("--run: expected a run name (or --config C to take the config's run_name)")
    return run, Path(logs_dir or "logs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.logs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML config: its run_name and logs_dir (with any overrides)")
    parser.add_argument("--run", help="run name, logs/<run>/ (default: the config's run_name)")
    parser.add_argument("--logs-dir", help="root of log directories (default: the config's logs_dir, else logs)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the config (e.g. logs_dir=/scratch/logs)")
    parser.add_argument("--stage", action="append", default=[], help="only this stage (repeatable)")
    parser.add_argument("--level", default="debug", choices=list(LEVELS), help="minimum level")
    parser.add_argument("--event", action="append", default=[], help="only this event (repeatable)")
    parser.add_argument("--telemetry", action="store_true", help="include monitor.py samples")
    parser.add_argument("-n", "--lines", type=int, default=50, help="show the last N matching lines (0: all)")
    parser.add_argument("--follow", "-f", action="store_true", help="keep printing new lines (Ctrl-C stops)")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between polls with --follow")
    parser.add_argument("--json", action="store_true", help="print the raw JSON lines")
    parser.add_argument("--overview", action="store_true", help="one screen: latest progress of every stage")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run, logs_dir = run_location(args.config, args.overrides, args.run, args.logs_dir)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    run_dir = logs_dir / run
    if not run_dir.is_dir():
        print(f"error: {run_dir}: no logs for run '{run}' (expected logs/<run>/<stage>/*.jsonl)", file=sys.stderr)
        return 1
    if args.overview:
        print(overview(run_dir))
        return 0
    flt = Filter(set(args.stage), args.level, set(args.event), args.telemetry)
    show = (lambda r: json.dumps(r, ensure_ascii=False)) if args.json else format_record
    follower = Follower(run_dir, flt)
    records = follower.poll()
    for rec in records[-args.lines :] if args.lines else records:
        print(show(rec))
    if not args.follow:
        return 0
    try:
        while True:
            for rec in follower.poll():
                print(show(rec), flush=True)
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
