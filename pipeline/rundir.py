"""Run directories, atomic writes, completion markers and the wrapper every stage runs under.

Layout (a contract other tools rely on)::

    runs/<run>/<stage>/[<unit>/]...            stage outputs (unit: a training variant, an evaluated model)
    runs/<run>/<stage>/[<unit>/]config.yaml    the fully resolved config the stage ran with
    runs/<run>/<stage>/[<unit>/]_COMPLETE.json marker, written last: config hash, input fingerprints, summary
    logs/<run>/<stage>/rank_<rank>.jsonl       structured logs (see jsonlog)

Like datatrove's ``_run_for_rank``: the wrapper refuses to start while an upstream marker is missing, skips a unit
whose marker matches the current config hash and input fingerprints (unless ``--force``), writes the resolved
config, runs the stage and writes the marker only on success. Errors meant for users are :class:`PipelineError`:
one line naming the file, column or key and what was expected; the process exits 1 (2 for config errors).
Outside the Slurm job shell (which starts ``monitor.py`` once per node itself) the wrapper runs ``monitor.py`` beside
the stage (``telemetry.LocalMonitor``), so local runs get ``logs/<run>/<stage>/telemetry_*`` too. Signal handlers
(``pipeline.preemption``) are in place from the wrapper's first line; ``--nproc-per-node N`` on a distributed stage
re-executes it under torchrun (``pipeline.launch``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline import config as config_mod
from pipeline import definition, launch, preemption, telemetry
from pipeline.config import Config, ConfigError
from pipeline.jsonlog import JsonLogger, open_logger, redact

MARKER = "_COMPLETE.json"
REPO = Path(__file__).resolve().parent.parent  # the checkout this code runs from
_UMASK = os.umask(0)
os.umask(_UMASK)


class PipelineError(RuntimeError):
    """A failure the user can fix; the message is one line naming the culprit and what was expected."""


# ------------------------------------------------------------------------------------------------ atomic I/O
@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``, on failure delete it.

    The rename is atomic on POSIX, so readers see the old file or the complete new one, never a torn write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs on a shared cluster follow the user's umask
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_writable(directory: Path) -> None:
    """Fail early, naming the directory, when outputs cannot be written there."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test."):
            pass
    except OSError as err:
        raise PipelineError(f"{directory}: output directory is not writable ({err.strerror})") from None


# ------------------------------------------------------------------------------------------------- run dirs
@dataclass
class RunDir:
    """Paths of one run: ``runs/<run>`` for outputs and ``logs/<run>`` for logs."""

    root: Path
    logs: Path

    @classmethod
    def from_config(cls, cfg: Config) -> RunDir:
        return cls(Path(cfg.runs_dir) / cfg.run_name, Path(cfg.logs_dir) / cfg.run_name)

    def stage_dir(self, stage: str, unit: str | None = None) -> Path:
        return self.root / stage / unit if unit else self.root / stage

    def marker_path(self, stage: str, unit: str | None = None) -> Path:
        return self.stage_dir(stage, unit) / MARKER

    def read_marker(self, stage: str, unit: str | None = None) -> dict | None:
        path = self.marker_path(stage, unit)
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, NotADirectoryError):  # a file where the run directory should be: no marker
            return None
        except (OSError, json.JSONDecodeError) as err:
            raise PipelineError(f"{path}: unreadable completion marker ({err}); rerun that stage") from None

    def require(self, stage: str, unit: str | None = None) -> dict:
        """The upstream marker, or a PipelineError naming what is missing and how to produce it."""
        marker = self.read_marker(stage, unit)
        if marker is None:
            what = f"{stage} ({unit})" if unit else stage
            raise PipelineError(
                f"{self.marker_path(stage, unit)}: missing — upstream stage '{what}' has not completed; "
                f"run it first (make {stage})"
            )
        return marker

    def fingerprint(self, stage: str, unit: str | None = None) -> str:
        """Identity of an upstream result: the hash of its marker (changes whenever it is redone)."""
        return file_sha256(self.marker_path(stage, unit))[:16]

    def write_marker(self, stage: str, unit: str | None, config_hash: str, inputs: dict, summary: dict) -> None:
        job = os.environ.get("SLURM_JOB_ID")
        atomic_write_json(
            self.marker_path(stage, unit),
            {
                "stage": stage,
                "unit": unit,
                "config_hash": config_hash,
                "inputs": inputs,
                "summary": summary,
                "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "host": socket.gethostname(),
                "slurm_job_id": job,
            },
        )


def cli_exit_code(err: ConfigError | PipelineError) -> int:
    """Print a user-facing error as one line on stderr and return its exit code: 2 for config, 1 otherwise.

    Every command line (stages, ``cache --plan``, ``slurm submit``...) answers bad input the same way."""
    if isinstance(err, ConfigError):
        print(f"config error: {err}", file=sys.stderr)
        return 2
    print(f"error: {err}", file=sys.stderr)
    return 1


# ------------------------------------------------------------------------------------------- stage wrapper
@dataclass
class StageContext:
    """What a stage's ``run`` receives besides the config and run directory."""

    log: JsonLogger
    unit: str | None = None
    args: argparse.Namespace = field(default_factory=argparse.Namespace)
    force: bool = False
    monitor: telemetry.LocalMonitor | None = None


@dataclass
class StageSpec:
    """How the wrapper drives one stage.

    sections(cfg, unit) -> the config parts this unit's output depends on (hashed into the marker).
    upstream(cfg, unit) -> the (stage, unit) markers that must exist before it starts.
    units(cfg, args)    -> the units to run in this process ([None] for a single-output stage).
    run(cfg, rd, ctx)   -> summary numbers; raise PipelineError for user-fixable problems.
    complete(cfg, rd, ctx) -> whether the stage's marker may be written (array tasks: all shards done).
    """

    name: str
    run: Callable[[Config, RunDir, StageContext], dict]
    sections: Callable[[Config, str | None], tuple]
    upstream: Callable[[Config, str | None], list[tuple[str, str | None]]] = lambda cfg, unit: []
    units: Callable[[Config, argparse.Namespace], list[str | None]] = lambda cfg, args: [None]
    add_args: Callable[[argparse.ArgumentParser], None] = lambda parser: None
    complete: Callable[[Config, RunDir, StageContext], bool] = lambda cfg, rd, ctx: True


def build_parser(stage: str, add_args: Callable[[argparse.ArgumentParser], None]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m pipeline.{stage}", description=f"Run the {stage} stage.")
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--force", action="store_true", help="redo the stage even if its marker matches")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4")
    if getattr(definition.stage(stage), "distributed", False):
        parser.add_argument(
            "--nproc-per-node",
            type=int,
            default=None,
            metavar="N",
            help="run N processes on this node under torchrun (Slurm: on every node of the job)",
        )
    add_args(parser)
    return parser


def redacted_config_yaml(cfg: Config) -> str:
    """The resolved config as YAML with secret values replaced. Redacted before dumping, not after: a bare ``***``
    in YAML is an alias and would make the dump unloadable."""
    return yaml.safe_dump(json.loads(redact(json.dumps(config_mod.to_dict(cfg)))), sort_keys=False)


@dataclass
class UnitState:
    """Whether one unit of a stage is complete for the current config and upstream outputs, and why not."""

    complete: bool
    reason: str  # one line naming what is missing or changed ("" when complete)
    config_hash: str
    inputs: dict[str, str]  # identity of every upstream output this unit consumes
    marker: dict | None  # the unit's marker as found on disk


def unit_state(spec: StageSpec, cfg: Config, rd: RunDir, unit: str | None) -> UnitState:
    """Decide, without side effects, whether ``unit`` of ``spec`` is complete for ``cfg`` and the upstream outputs
    on disk now. Raises PipelineError when an upstream marker is missing. The stage wrapper skips a complete unit;
    ``slurm submit`` queues only the units that are not."""
    inputs = {}
    for stage, up_unit in spec.upstream(cfg, unit):
        rd.require(stage, up_unit)
        inputs[f"{stage}/{up_unit}" if up_unit else stage] = rd.fingerprint(stage, up_unit)
    config_hash = config_mod.section_hash(*spec.sections(cfg, unit))
    marker = rd.read_marker(spec.name, unit)
    if marker is None:
        reason = "not run yet"
    elif marker.get("config_hash") != config_hash:
        reason = "its configuration changed"
    elif marker.get("inputs") != inputs:
        reason = "an upstream output changed"
    else:
        reason = ""
    return UnitState(not reason, reason, config_hash, inputs, marker)


def run_unit(spec: StageSpec, cfg: Config, rd: RunDir, ctx: StageContext) -> dict:
    """Check upstream, skip if done, write the resolved config, run, write the marker last."""
    unit = ctx.unit
    state = unit_state(spec, cfg, rd, unit)
    config_hash, inputs, marker = state.config_hash, state.inputs, state.marker
    if state.complete and not ctx.force:
        ctx.log.info("skipped", f"{rd.stage_dir(spec.name, unit)} is already complete (use --force to redo)")
        return {**marker.get("summary", {}), "skipped": True}
    preemption.check(f"before starting {spec.name}{' ' + unit if unit else ''}")  # nothing to save yet: stop now
    out = rd.stage_dir(spec.name, unit)
    check_writable(out)
    # Under DDP every rank runs the stage; rank 0 alone owns the files the wrapper writes.
    lead = ctx.log.rank == 0
    if marker is not None and lead:  # stale result: remove the marker first so a crash cannot leave it valid
        rd.marker_path(spec.name, unit).unlink(missing_ok=True)
    if lead:
        atomic_write_text(out / "config.yaml", redacted_config_yaml(cfg))
    if ctx.monitor is not None:
        ctx.monitor.start()
    started = time.monotonic()
    ctx.log.info("start", f"{spec.name}{' ' + unit if unit else ''}", config_hash=config_hash)
    summary = spec.run(cfg, rd, ctx)
    summary = {**summary, "duration_s": round(time.monotonic() - started, 3)}
    if spec.complete(cfg, rd, ctx):
        if lead:
            rd.write_marker(spec.name, unit, config_hash, inputs, summary)
        ctx.log.info("complete", f"{spec.name}{' ' + unit if unit else ''}", **summary)
    else:
        ctx.log.info("task_done", "this task's share is done; the stage completes when every task has", **summary)
    return summary


def stage_main(spec: StageSpec, argv: list[str] | None = None) -> int:
    """Entry point of ``python -m pipeline.<stage>``; returns the process exit code."""
    restore_signals = preemption.install()  # first: a signal while the process starts must not kill it
    try:
        with preemption.deferred(preemption.WARNING, preemption.STOP):  # acted on before the first unit
            parser = build_parser(spec.name, spec.add_args)
            args = parser.parse_args(argv)
            try:
                cfg = config_mod.load(args.config, args.overrides)
            except ConfigError as err:
                return cli_exit_code(err)
            if launch.wanted(getattr(args, "nproc_per_node", None)):
                return _launch_workers(spec, cfg, args, argv)
            rd = RunDir.from_config(cfg)
            try:
                log = open_logger(cfg.run_name, spec.name, rd.logs)
            except OSError as err:
                print(f"error: {rd.logs / spec.name}: log directory is not writable ({err.strerror})", file=sys.stderr)
                return 1
        return _run_units(spec, cfg, rd, args, log)
    finally:
        restore_signals()


def _launch_workers(spec: StageSpec, cfg: Config, args: argparse.Namespace, argv: list[str] | None) -> int:
    """``--nproc-per-node``: become torchrun running this same command on every local rank; a warning that came
    before anything started means requeue now, without launching."""
    if preemption.received() is not None:
        stop = preemption.Interrupted(preemption.received(), "before launching the workers")
        return preemption.finish(stop, JsonLogger(cfg.run_name, spec.name, None))
    return launch.relaunch(
        args.nproc_per_node,
        sys.argv[1:] if argv is None else argv,
        module=f"pipeline.{spec.name}",
        shutdown_timeout_s=cfg.slurm.signal_s,
    )


def _run_units(spec: StageSpec, cfg: Config, rd: RunDir, args: argparse.Namespace, log: JsonLogger) -> int:
    monitor = telemetry.LocalMonitor(cfg, spec.name, Path(cfg.logs_dir), log)
    try:
        units = spec.units(cfg, args)
        for unit in units:
            run_unit(spec, cfg, rd, StageContext(log=log, unit=unit, args=args, force=args.force, monitor=monitor))
        return 0
    except preemption.Interrupted as stop:
        return preemption.finish(stop, log)
    except ConfigError as err:
        log.error("config_error", str(err))
        return cli_exit_code(err)
    except PipelineError as err:
        log.error("failed", str(err))
        if not log.console:
            print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted", "stopped by the user")
        return 130
    except Exception as err:  # unexpected: keep the traceback, in the log too
        if preemption.received() == preemption.STOP:  # e.g. a peer that stopped first broke a collective
            return preemption.finish(preemption.Interrupted(preemption.STOP, f"{type(err).__name__}: {err}"), log)
        log.error("crashed", f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
        raise
    finally:
        with preemption.deferred(preemption.WARNING, preemption.STOP):
            monitor.stop()
            log.close()
