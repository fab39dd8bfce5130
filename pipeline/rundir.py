"""Run directories, atomic writes, completion markers, lineage and the wrapper every stage runs under.

Layout (a contract other tools rely on)::

    runs/<run>/<stage>/[<unit>/]...            stage outputs (unit: a training variant, an evaluated model)
    runs/<run>/<stage>/[<unit>/]config.yaml    the fully resolved config the stage ran with
    runs/<run>/<stage>/[<unit>/]_COMPLETE.json marker, written last: config, inputs, declared outputs, summary
    logs/<run>/<stage>/rank_<rank>.jsonl       structured logs (see jsonlog)

Lineage (DVC's lock file, datatrove's completion markers): a unit's marker records the config it depends on, the
identity of every input (each upstream unit's declared outputs by content hash, model weights, data files) and its
own declared outputs (relative path -> sha256, bytes, mtime). :func:`unit_state` is the one decision: a unit is
complete only when its upstream units are complete, its config and inputs equal those recorded, and its declared
outputs are still on disk as recorded (size and mtime; a file whose mtime moved is re-hashed). Otherwise ``reason``
says, in one line, what is missing or changed. Identities are content hashes, so an upstream redone with
byte-identical outputs leaves its consumers complete, and one redone differently makes them stale.

The wrapper (datatrove's ``_run_for_rank``): checks the config (:func:`pipeline.validate.check`), refuses to start
while an upstream unit is not complete (naming the file or change and the command that fixes it), skips a complete
unit (unless ``--force``), runs the stage, and writes the marker last. Nothing a finished run wrote is touched until
the stage calls ``ctx.begin_writes()`` after its own input checks: that withdraws the old marker (a crashed redo can
never look complete) and writes ``config.yaml``; a refused rerun therefore leaves every finished output
byte-identical. Consumers read exactly the files their upstream's marker declares (:func:`declared_outputs`).
Errors meant for users are :class:`PipelineError`: one line naming the file, column or key and what was expected;
the process exits 1 (2 for config errors). Outside the Slurm job shell (which starts ``monitor.py`` once per node
itself) the wrapper runs ``monitor.py`` beside the stage (``telemetry.LocalMonitor``), so local runs get
``logs/<run>/<stage>/telemetry_*`` too. Signal handlers (``pipeline.preemption``) are in place from the wrapper's
first line; ``--nproc-per-node N`` on a distributed stage re-executes it under torchrun (``pipeline.launch``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import importlib
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
from pipeline import definition, launch, preemption, telemetry, validate
from pipeline.config import Config, ConfigError
from pipeline.jsonlog import JsonLogger, open_logger, redact, redact_values

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


# -------------------------------------------------------------------------------------------- output records
def record_file(path: Path, sha256: str | None = None) -> dict[str, Any]:
    """What a marker records of one output file: its content hash (``sha256`` when the stage already computed it,
    as the cache does for every shard; else hashed now), size and mtime."""
    stat = path.stat()
    return {"sha256": sha256 or file_sha256(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def file_problem(path: Path, record: dict[str, Any]) -> str:
    """How ``path`` differs from its record ("" when it matches). Size and mtime decide cheaply, so checking a
    terabyte cache costs one ``stat`` per shard; only a file whose mtime moved (touched, copied, rewritten) is
    re-hashed, and it still matches if its bytes are the recorded ones."""
    try:
        stat = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    if stat.st_size != record.get("bytes"):
        return f"changed since it was recorded ({stat.st_size} bytes, not {record.get('bytes')})"
    if stat.st_mtime_ns == record.get("mtime_ns") or file_sha256(path) == record.get("sha256"):
        return ""
    return "changed since it was recorded (sha256 differs)"


def output_identity(outputs: dict[str, dict[str, Any]]) -> str:
    """Content identity of a unit's declared outputs: equal exactly when every file has the same bytes."""
    blob = json.dumps({name: record["sha256"] for name, record in outputs.items()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def declared_outputs(directory: Path) -> dict[str, dict[str, Any]]:
    """The outputs the marker in ``directory`` declares (relative path -> record): the only files a consumer reads.
    A PipelineError names the marker when there is none."""
    marker = Path(directory) / MARKER
    try:
        data = json.loads(marker.read_text())
    except (FileNotFoundError, NotADirectoryError):
        raise PipelineError(f"{marker}: missing — {directory} has not completed; run that stage first") from None
    except (OSError, json.JSONDecodeError) as err:
        raise PipelineError(f"{marker}: unreadable completion marker ({err}); rerun that stage") from None
    return data.get("outputs") or {}


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

    def write_marker(self, stage: str, unit: str | None, state: UnitState, outputs: dict, summary: dict) -> None:
        """The marker: what :func:`unit_state` compares next time (config, inputs, declared outputs) + summary."""
        job = os.environ.get("SLURM_JOB_ID")
        atomic_write_json(
            self.marker_path(stage, unit),
            {
                "stage": stage,
                "unit": unit,
                "config_hash": state.config_hash,
                "config": state.config,
                "inputs": state.inputs,
                "outputs": outputs,
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
    """What a stage's ``run`` receives besides the config and run directory.

    ``state`` is the unit's lineage decision (its ``inputs`` are what the checkpoints and outputs are made from).
    ``begin_writes()`` must be called once the stage has checked its inputs and before it writes or deletes any
    output: it withdraws the unit's old marker and writes ``config.yaml`` (the wrapper calls it after ``run`` if the
    stage did not)."""

    log: JsonLogger
    unit: str | None = None
    args: argparse.Namespace = field(default_factory=argparse.Namespace)
    force: bool = False
    monitor: telemetry.LocalMonitor | None = None
    state: UnitState | None = None
    begin_writes: Callable[[], None] = lambda: None


@dataclass
class StageSpec:
    """How the wrapper drives one stage (defining one registers it: :func:`stage_spec` finds it by name).

    sections(cfg, unit) -> {config key path: value} this unit's output depends on (hashed and stored in the marker).
    upstream(cfg, unit) -> the (stage, unit) whose outputs it reads; each must be complete before it starts.
    external(cfg, unit) -> {name: identity} of inputs outside the run directory (model weights, data files).
    outputs(cfg, rd, unit) -> {path relative to the unit's directory: sha256 or None} of the files it declares;
                          consumers read exactly these. None: the wrapper hashes the file.
    units(cfg, args)    -> the units to run in this process ([None] for a single-output stage).
    run(cfg, rd, ctx)   -> summary numbers; raise PipelineError for user-fixable problems.
    complete(cfg, rd, ctx) -> whether the stage's marker may be written (array tasks: all shards done).
    optional_upstream   -> an upstream unit that is not complete is left out instead of blocking (the report).
    check(cfg)          -> the config rules, run before anything else (pipeline.validate.check).
    """

    name: str
    run: Callable[[Config, RunDir, StageContext], dict]
    sections: Callable[[Config, str | None], dict[str, Any]]
    upstream: Callable[[Config, str | None], list[tuple[str, str | None]]] = lambda cfg, unit: []
    external: Callable[[Config, str | None], dict[str, str]] = lambda cfg, unit: {}
    outputs: Callable[[Config, RunDir, str | None], dict[str, str | None]] = lambda cfg, rd, unit: {}
    units: Callable[[Config, argparse.Namespace], list[str | None]] = lambda cfg, args: [None]
    add_args: Callable[[argparse.ArgumentParser], None] = lambda parser: None
    complete: Callable[[Config, RunDir, StageContext], bool] = lambda cfg, rd, ctx: True
    optional_upstream: bool = False
    check: Callable[[Config], None] = validate.check

    def __post_init__(self) -> None:
        SPECS[self.name] = self


SPECS: dict[str, StageSpec] = {}


def stage_spec(name: str) -> StageSpec:
    """The spec of stage ``name``: a registered one, else the ``SPEC`` of ``pipeline.<name>`` (imported by name, so
    stage modules still never import each other)."""
    if name not in SPECS:
        importlib.import_module(f"pipeline.{name}")
    return SPECS[name]


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
    inputs: dict[str, str]  # identity of every input this unit consumes (upstream units by content, models, data)
    marker: dict | None  # the unit's marker as found on disk
    config: dict[str, Any] = field(default_factory=dict)  # the flattened config sections behind config_hash
    waiting: dict[str, str] = field(default_factory=dict)  # upstream unit -> why it is not complete
    culprit: str = ""  # the unit whose own state ``reason`` describes (this one, or an upstream one)


def unit_key(stage: str, unit: str | None) -> str:
    """``cache``, ``train/kd``: how a unit is named in markers, inputs and messages."""
    return f"{stage}/{unit}" if unit else stage


def unit_state(spec: StageSpec, cfg: Config, rd: RunDir, unit: str | None, memo: dict | None = None) -> UnitState:
    """Decide, without side effects, whether ``unit`` of ``spec`` is complete for ``cfg`` and the files on disk now.

    Complete means: every upstream unit is complete (recursively, so a cache made under another ``cache.*`` config
    or from another manifest is not an input), this unit's recorded config and input identities equal the current
    ones, and its declared outputs are on disk as recorded. ``reason`` names the first thing that is not so;
    ``waiting`` names the upstream units that are not complete (the wrapper refuses to start while one is; ``slurm
    submit`` queues only incomplete units). Costs one ``stat`` per declared file (plus a re-hash of a file whose
    mtime moved) and reads of ``config.json`` files; ``memo`` shares the answers across calls of one decision.
    """
    memo = {} if memo is None else memo
    key = (spec.name, unit)
    if key in memo:
        return memo[key]
    sections = spec.sections(cfg, unit)
    config_hash = config_mod.section_hash(sections)
    config = redact_values(config_mod.flatten(sections))  # recorded in the marker: no secret in it
    inputs, waiting, culprits = {}, {}, {}
    for stage, up_unit in spec.upstream(cfg, unit):
        up = unit_state(stage_spec(stage), cfg, rd, up_unit, memo)
        if up.complete:
            inputs[unit_key(stage, up_unit)] = output_identity(up.marker.get("outputs") or {})
        else:
            waiting[unit_key(stage, up_unit)], culprits[unit_key(stage, up_unit)] = up.reason, up.culprit
    inputs.update(spec.external(cfg, unit))
    marker = rd.read_marker(spec.name, unit)
    me = unit_key(spec.name, unit)
    culprit = me
    if waiting and not spec.optional_upstream:  # the root cause, as the upstream unit that has it says it
        name = next(iter(waiting))
        reason, culprit = waiting[name], culprits[name]
    elif marker is None:
        reason = f"{me} has not completed ({rd.marker_path(spec.name, unit)} missing)"
    elif marker.get("config_hash") != config_hash:
        reason = f"{me}: its configuration changed: {describe_changes(marker.get('config') or {}, config)}"
    elif marker.get("inputs") != inputs:
        reason = f"{me}: {describe_input_changes(marker.get('inputs') or {}, inputs)}"
    else:
        problem = outputs_problem(rd.stage_dir(spec.name, unit), marker.get("outputs") or {})
        reason = f"{me}: {problem}" if problem else ""
    memo[key] = UnitState(not reason, reason, config_hash, inputs, marker, config, waiting, culprit if reason else "")
    return memo[key]


def outputs_problem(directory: Path, outputs: dict[str, dict[str, Any]]) -> str:
    """The first declared output that is missing or differs from its record, as one line ("" when all match)."""
    for name, record in sorted(outputs.items()):
        problem = file_problem(directory / name, record)
        if problem:
            return f"{directory / name} (declared in {MARKER}): {problem}"
    return ""


def _short(value: Any) -> str:
    """A value for a one-line message; a long one keeps its end (where paths differ)."""
    text = json.dumps(value, default=str)
    return text if len(text) <= 48 else text[:12] + "..." + text[-33:]


def describe_changes(old: dict[str, Any], new: dict[str, Any], limit: int = 3) -> str:
    """``cache.top_k (was 4, now 8), seed (was 0, now 1)``: the keys whose values differ, ``limit`` named."""
    missing = object()
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k, missing) != new.get(k, missing)]
    if not changed:
        return "a value recorded only as *** (secret-looking) changed"
    shown = [
        f"{k} (was {_short(old[k]) if k in old else 'unset'}, now {_short(new[k]) if k in new else 'unset'})"
        for k in changed[:limit]
    ]
    more = f" and {len(changed) - limit} more" if len(changed) > limit else ""
    return ", ".join(shown) + more


def describe_input_changes(old: dict[str, str], new: dict[str, str]) -> str:
    """One line naming the inputs that differ from those the unit was made from."""
    parts = []
    for name in sorted(set(old) | set(new)):
        if old.get(name) == new.get(name):
            continue
        if name not in new:
            parts.append(f"{name} is no longer an input")
        elif name not in old:
            parts.append(f"{name} is a new input")
        else:
            parts.append(f"{name} changed (was {old[name]}, now {new[name]})")
    return "made from other inputs: " + "; ".join(parts)


def upstream_refusal(spec: StageSpec, unit: str | None, state: UnitState) -> PipelineError:
    """The consumer's refusal: what is missing or changed upstream (the reason names the file or key) and the
    command that fixes it."""
    stage = state.culprit.split("/")[0]
    return PipelineError(
        f"{state.reason}; {unit_key(spec.name, unit)} cannot start until {state.culprit} is complete: run make "
        f"{stage} first (it redoes only what is missing or changed)"
    )


def run_unit(spec: StageSpec, cfg: Config, rd: RunDir, ctx: StageContext) -> dict:
    """Check upstream, skip if done, run (the stage calls ``ctx.begin_writes()``), write the marker last."""
    unit = ctx.unit
    state = unit_state(spec, cfg, rd, unit)
    if state.waiting and not spec.optional_upstream:
        raise upstream_refusal(spec, unit, state)
    if state.complete and not ctx.force:
        ctx.log.info("skipped", f"{rd.stage_dir(spec.name, unit)} is already complete (use --force to redo)")
        return {**state.marker.get("summary", {}), "skipped": True}
    preemption.check(f"before starting {spec.name}{' ' + unit if unit else ''}")  # nothing to save yet: stop now
    out = rd.stage_dir(spec.name, unit)
    check_writable(out)
    # Under DDP every rank runs the stage; rank 0 alone owns the files the wrapper writes.
    lead = ctx.log.rank == 0
    began = []

    def begin_writes() -> None:
        if began:
            return
        began.append(True)
        if lead:  # a stale result: withdraw the marker first so a crashed redo cannot look complete
            rd.marker_path(spec.name, unit).unlink(missing_ok=True)
            atomic_write_text(out / "config.yaml", redacted_config_yaml(cfg))

    ctx.state, ctx.begin_writes = state, begin_writes
    if state.marker is not None:
        ctx.log.info("redo", f"{unit_key(spec.name, unit)}: --force" if state.complete else state.reason)
    if ctx.monitor is not None:
        ctx.monitor.start()
    started = time.monotonic()
    ctx.log.info("start", f"{spec.name}{' ' + unit if unit else ''}", config_hash=state.config_hash)
    summary = spec.run(cfg, rd, ctx)
    begin_writes()
    summary = {**summary, "duration_s": round(time.monotonic() - started, 3)}
    if spec.complete(cfg, rd, ctx):
        if lead:
            declared = spec.outputs(cfg, rd, unit)
            outputs = {name: record_file(out / name, sha) for name, sha in sorted(declared.items())}
            rd.write_marker(spec.name, unit, state, outputs, summary)
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
                spec.check(cfg)  # every config rule, before anything is written (slurm submit runs the same)
            except (ConfigError, PipelineError) as err:
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
