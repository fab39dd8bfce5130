"""Structured JSON-lines logs: one schema for every stage, the monitor and the Slurm tools.

Each line is one JSON object with the fixed keys

    ts (ISO-8601 UTC), level, run, stage, job, task, host, rank, event, message, metrics

``job``/``task`` are the Slurm job id and array task id (null outside Slurm). Metric names carry their unit
(``tokens_per_s``, ``power_w``, ``mem_gb``). Files live at ``logs/<run>/<stage>/rank_<rank:05d>.jsonl``; only rank 0
also prints a readable line to the console, above the progress bar of a long loop (:func:`console_progress`,
interactive terminals only). Values of secret-looking environment variables (HF tokens and the
like) are replaced by ``***`` in everything written, so a token in the environment never reaches a log.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
import socket
import sys
import threading
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

SECRET_NAME = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL)", re.I)
LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


def _secret_values() -> list[str]:
    # Short values ("1", "true") are flags, not secrets; redacting them would mangle ordinary text.
    values = {v for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v) >= 8}
    return sorted(values, key=len, reverse=True)


def redact(text: str) -> str:
    """Replace every secret-looking environment value in ``text`` with ``***``."""
    for value in _secret_values():
        text = text.replace(value, "***")
    return text


def redact_values(values: dict[str, Any]) -> dict[str, Any]:
    """A flat mapping with every string value redacted: what markers and checkpoints may record of a config."""
    return {key: redact(value) if isinstance(value, str) else value for key, value in values.items()}


def slurm_ids() -> tuple[str | None, str | None]:
    """(job id, array task id) of the current Slurm job; for an array, the array's job id."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    return job, os.environ.get("SLURM_ARRAY_TASK_ID")


def env_rank() -> int:
    """Global rank from torch.distributed/accelerate launchers, else Slurm's process id, else 0."""
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def _clean(value: Any) -> Any:
    """JSON-safe metrics: floats rounded for readability, non-finite floats as strings (valid JSON)."""
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item"):  # numpy / torch scalars
        return _clean(value.item())
    return value


class JsonLogger:
    """Writes the JSON-lines schema above to one file and (rank 0) a readable console line."""

    def __init__(
        self,
        run: str,
        stage: str,
        path: Path | None,
        *,
        rank: int | None = None,
        console: bool | None = None,
        stream: TextIO | None = None,
        min_level: str = "info",
    ) -> None:
        self.run, self.stage = run, stage
        self.rank = env_rank() if rank is None else rank
        self.host = socket.gethostname()
        self.job, self.task = slurm_ids()
        self.console = (self.rank == 0) if console is None else console
        self.stream = stream or sys.stderr
        self.min_level = LEVELS[min_level]
        self.path = path
        self._lock = threading.Lock()
        self._file = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", buffering=1, encoding="utf-8")  # line-buffered: tail -f sees each line

    def record(self, level: str, event: str, message: str = "", **metrics: Any) -> dict:
        """The dict one log line holds (exposed so tools can build the same schema)."""
        return {
            "ts": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
            "level": level,
            "run": self.run,
            "stage": self.stage,
            "job": self.job,
            "task": self.task,
            "host": self.host,
            "rank": self.rank,
            "event": event,
            "message": message,
            "metrics": _clean(metrics),
        }

    def log(self, level: str, event: str, message: str = "", **metrics: Any) -> None:
        if LEVELS[level] < self.min_level:
            return
        rec = self.record(level, event, message, **metrics)
        line = redact(json.dumps(rec, ensure_ascii=False))
        with self._lock:
            if self._file is not None:
                self._file.write(line + "\n")
            if self.console:
                text = redact(format_console(rec))
                if len(_BARS):  # above the open bar, which tqdm then redraws below the line
                    from tqdm import tqdm

                    tqdm.write(text, file=self.stream)
                else:
                    self.stream.write(text + "\n")
                self.stream.flush()

    def debug(self, event: str, message: str = "", **metrics: Any) -> None:
        self.log("debug", event, message, **metrics)

    def info(self, event: str, message: str = "", **metrics: Any) -> None:
        self.log("info", event, message, **metrics)

    def warning(self, event: str, message: str = "", **metrics: Any) -> None:
        self.log("warning", event, message, **metrics)

    def error(self, event: str, message: str = "", **metrics: Any) -> None:
        self.log("error", event, message, **metrics)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def parse_jsonl(lines: Iterable[str], malformed: list[str] | None = None) -> Iterator[dict]:
    """The JSON objects of JSON-lines text, the one reader of the pipeline's own JSONL files (logs, metrics, sample
    audit trails). Blank lines and non-objects are skipped; so is a line that does not parse (one still being
    written, or torn by kill -9), which is also appended to ``malformed`` when given."""
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if malformed is not None:
                malformed.append(line)
            continue
        if isinstance(record, dict):
            yield record


def format_console(rec: dict) -> str:
    """One readable line: ``HH:MM:SS stage LEVEL event: message k=v ...``."""
    clock = rec["ts"][11:19]
    metrics = " ".join(f"{k}={v}" for k, v in (rec.get("metrics") or {}).items())
    level = rec["level"].upper() if rec["level"] != "info" else ""
    parts = [clock, f"[{rec['stage']}]", level, f"{rec['event']}:" if rec["message"] else rec["event"]]
    parts += [rec["message"], metrics]
    return " ".join(p for p in parts if p)


def rank_log_path(logs_root: Path, stage: str, rank: int) -> Path:
    """``<stage>/rank_<r>.jsonl`` locally; under Slurm the job (and array task) is part of the name, because array
    tasks and side-by-side train jobs on other nodes must not append to one shared file (NFS interleaves them).
    A requeued job keeps its id, so it continues its own file."""
    job, task = slurm_ids()
    suffix = "" if job is None else f".job{job}" + ("" if task is None else f"_{task}")
    return logs_root / stage / f"rank_{rank:05d}{suffix}.jsonl"


def open_logger(run: str, stage: str, logs_root: Path, rank: int | None = None) -> JsonLogger:
    """The logger a stage uses: ``logs/<run>/<stage>/rank_<rank>.jsonl`` plus console on rank 0."""
    rank = env_rank() if rank is None else rank
    return JsonLogger(run, stage, rank_log_path(logs_root, stage, rank), rank=rank)


# ------------------------------------------------------------------------------------------------ progress bar
_BARS: weakref.WeakSet = weakref.WeakSet()  # open console bars: log lines are written above them, not through them


def console_progress(log: JsonLogger, total: float, desc: str, unit: str, initial: float = 0) -> Any:
    """A tqdm bar (percent, rate, ETA) for a long loop, shown only on ``log``'s console when that is an interactive
    terminal (rank 0 run by hand): under Slurm, in pipes and on other ranks it is disabled, and it never reaches
    the JSON log file, whose ``progress``/``step`` events stay the record. Use it as a context manager."""
    from tqdm import tqdm

    interactive = log.console and getattr(log.stream, "isatty", lambda: False)()
    bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=log.stream, disable=not interactive,
               leave=False, dynamic_ncols=True, smoothing=0.1)  # fmt: skip
    if interactive:
        _BARS.add(bar)
    return bar
