"""The Slurm executor: the pipeline definition (pipeline/definition.py) rendered into an ``afterok`` chain of jobs,
plus status, cancel and the run's submission history.

    python -m pipeline.slurm submit --config C [--dry-run] [--force] [key.path=value ...]   (make submit CONFIG=C)
    python -m pipeline.slurm status --config C | --run R [--logs-dir D] [--json]          (make status CONFIG=C)
    python -m pipeline.slurm cancel --config C | --run R [--logs-dir D]                   (make cancel CONFIG=C)

Submit queues only what is not complete: every unit of the definition is checked with ``rundir.unit_state`` (the
check the stage wrapper itself makes before skipping a unit), downstream of a unit that will run counts as not
complete, and the jobs that are left are chained on each other with ``afterok`` and ``--kill-on-invalid-dep=yes``
(a failure cancels everything downstream instead of leaving it pending forever). The cache is one job array (of
a partly done cache only the tasks the stage module's ``pending_tasks`` names; the command carries ``--task-count``
so that each task keeps its shards), each train variant its own job (side by side), evaluate one job after every
train job it reads, report last.

Resources and the environment have one source of truth, ``cfg.slurm`` (run-wide keys, and per stage
``slurm.stages.<stage>``), overridable like any key. :func:`generate_script` renders ``slurm/<stage>.sbatch`` with
those ``#SBATCH`` lines, the job shell ``slurm/job.sh``, the run's settings and the environment hook. Each
submission gets its own directory ``logs/<run>/slurm/<NNN>/`` (scripts exactly as submitted, Slurm output,
``submission.json``); ``logs/<run>/slurm/submission.json`` is the latest one, which status and cancel read.

Why plain ``sbatch`` rather than submitit: submitit submits a pickled Python callable through its own generated
script and handles USR1 with its own checkpoint-and-requeue protocol. Our jobs must wrap the stage in a shell that
starts the monitor beside it, gates the warning until the stage can take it, runs an environment hook and a
container wrapper and launches torchrun once per node; submitit's script cannot do that, and using it for some
stages would make two submission paths and two requeue mechanisms.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import config as config_mod
from pipeline import definition, validate
from pipeline.config import Config, ConfigError
from pipeline.definition import PIPELINE, STAGES
from pipeline.jsonlog import format_console, redact
from pipeline.logs import run_location, tail_records
from pipeline.rundir import REPO, PipelineError, RunDir, atomic_write_json, atomic_write_text, cli_exit_code, unit_state

TEMPLATES = REPO / "slurm"
JOB_SHELL = TEMPLATES / "job.sh"
RECORD = "submission.json"
# sacct/squeue states after which a job will not run again
FAILED_STATES = {"FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
DONE_STATES = {"COMPLETED", "CANCELLED", *FAILED_STATES}


# ------------------------------------------------------------------------------------------------ planning
@dataclass
class JobSpec:
    """One job of the chain: which stage and units, the command it runs and the jobs it waits for."""

    stage: str
    unit: str | None  # the unit of a per-unit job (a train variant), else None
    command: list[str]
    after: list[str] = field(default_factory=list)  # names of the jobs this one depends on (afterok)
    units: dict[str, str] = field(default_factory=dict)  # the units this job will run -> why they run
    tasks: list[int] | None = None  # an array job's tasks to queue (of slurm.stages.<stage>.array_tasks)

    @property
    def name(self) -> str:
        return f"{self.stage}-{self.unit}" if self.unit else self.stage


def _unit_label(stage: str, unit: str | None) -> str:
    return f"{stage}[{unit}]" if unit else stage


def pending_units(cfg: Config, *, force: bool = False) -> tuple[dict[tuple, str], dict[tuple, dict | None]]:
    """Which units of the pipeline must run, and why ({(stage, unit): reason}); and the complete ones with their
    markers. A unit runs when ``unit_state`` says it is not complete, or when something it reads will run first."""
    rd = RunDir.from_config(cfg)
    pending: dict[tuple, str] = {}
    complete: dict[tuple, dict | None] = {}
    for stage in PIPELINE:
        spec = importlib.import_module(f"pipeline.{stage.name}").SPEC
        for unit in definition.units(cfg, stage.name):
            waiting = [u for u in definition.upstream(cfg, stage.name, unit) if u in pending]
            if force:
                reason = "--force"
            elif waiting:
                reason = f"{_unit_label(*waiting[0])} runs first"
            else:
                state = unit_state(spec, cfg, rd, unit)
                reason = state.reason
                if not reason:
                    complete[(stage.name, unit)] = state.marker
                    continue
            pending[(stage.name, unit)] = reason
    return pending, complete


def stage_resources(cfg: Config, stage: str) -> Any:
    """The stage's resources (``slurm.stages.<stage>``)."""
    return getattr(cfg.slurm.stages, stage)


def procs_per_node(cfg: Config, stage: str) -> int:
    """Processes per node of a distributed stage: ``nproc_per_node``, else one per GPU, else 1."""
    res = stage_resources(cfg, stage)
    return res.nproc_per_node or max(res.gpus_per_node, 1)


def job_options(cfg: Config, stage: str) -> dict[str, Any]:
    """Where and under what a stage's job runs: the stage's own value, else the run's (lists add up, env merges)."""
    run, res = cfg.slurm, stage_resources(cfg, stage)
    keys = ("partition", "account", "qos", "constraint", "reservation", "exclusive", "mail_type")
    options: dict[str, Any] = {k: getattr(res, k) if getattr(res, k) is not None else getattr(run, k) for k in keys}
    options.update(
        mail_user=run.mail_user,
        export=run.export,
        extra_args=[*run.extra_args, *res.extra_args],
        setup=[*run.setup, *res.setup],
        env={**run.env, **res.env},
        srun_args=[*run.srun_args, *res.srun_args],
        wrapper=res.wrapper if res.wrapper is not None else run.wrapper,
    )
    return options


def python_of(cfg: Config) -> str:
    """The interpreter the jobs run: ``slurm.python``, else the one running submit (a shared-filesystem venv)."""
    return cfg.slurm.python or sys.executable


def stage_command(
    cfg: Config, config_path: Path, overrides: list[str], stage: str, unit: str | None, force: bool
) -> list[str]:
    """What a job runs under srun on every node: the stage's own command line (a distributed stage with
    ``--nproc-per-node``, which launches torchrun itself; pipeline/launch.py)."""
    argv = [python_of(cfg), "-m", f"pipeline.{stage}", "--config", str(config_path)]
    if unit is not None:
        argv += ["--variant", unit]
    if definition.stage(stage).distributed:
        argv.append(f"--nproc-per-node={procs_per_node(cfg, stage)}")
    if definition.stage(stage).slurm_jobs == "array":  # explicit: a resubmit may queue only some of the tasks
        argv.append(f"--task-count={stage_resources(cfg, stage).array_tasks}")
    return argv + (["--force"] if force else []) + overrides


def array_tasks(cfg: Config, stage: str, *, whole: bool) -> list[int]:
    """The tasks of an array stage to queue: every one when ``whole`` (``--force``, or an upstream unit runs again
    first, so what is left cannot be known yet), else those the stage module's ``pending_tasks`` names (the cache:
    the tasks that own a shard without a matching record), so a resubmit after a partial cache asks for the nodes
    of the unfinished tasks only."""
    count = stage_resources(cfg, stage).array_tasks
    if whole:
        return list(range(count))
    return importlib.import_module(f"pipeline.{stage}").pending_tasks(cfg, RunDir.from_config(cfg), count)


def array_spec(tasks: Iterable[int]) -> str:
    """sbatch's ``--array`` value for task ids: ``0-15``, ``1,3``, ``0-2,5``."""
    runs: list[list[int]] = []
    for task in sorted(tasks):
        if runs and task == runs[-1][1] + 1:
            runs[-1][1] = task
        else:
            runs.append([task, task])
    return ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)


def plan(
    cfg: Config, config_path: Path, overrides: list[str], commands: dict[str, str], *, force: bool = False
) -> tuple[list[JobSpec], dict[tuple, dict | None]]:
    """The jobs to submit, in submission order, and the units left out because they are complete.
    ``commands`` replaces a stage's command by a shell line (tests and smoke runs of the orchestration)."""
    pending, complete = pending_units(cfg, force=force)
    jobs: list[JobSpec] = []
    job_of: dict[tuple, str] = {}  # (stage, unit) -> the job that runs it
    ancestors: dict[str, set[str]] = {}  # job -> every job it waits for, directly or not
    for stage in PIPELINE:
        mine = [(unit, why) for (s, unit), why in pending.items() if s == stage.name]
        if not mine:
            continue
        groups = [[u] for u in mine] if stage.slurm_jobs == "per_unit" else [mine]
        for group in groups:
            unit = group[0][0] if stage.slurm_jobs == "per_unit" else None
            if stage.name in commands:
                command = ["bash", "-c", commands[stage.name]]
            else:
                command = stage_command(cfg, config_path, overrides, stage.name, unit, force)
            job = JobSpec(stage.name, unit, command, units={str(u): why for u, why in group})
            direct = {job_of[up] for u, _ in group for up in definition.upstream(cfg, stage.name, u) if up in job_of}
            if stage.slurm_jobs == "array":
                job.tasks = array_tasks(cfg, stage.name, whole=force or bool(direct))
            # afterok on a job's upstream jobs, less those another of them already waits for (report after
            # evaluate, not also after every train job)
            implied = set().union(*(ancestors[d] for d in direct))
            job.after = [j.name for j in jobs if j.name in direct - implied]
            ancestors[job.name] = direct | implied
            job_of.update({(stage.name, u): job.name for u, _ in group})
            jobs.append(job)
    return jobs, complete


# ---------------------------------------------------------------------------------------------- rendering
def sbatch_directives(cfg: Config, job: JobSpec, *, output: Path, dependency: list[str]) -> list[str]:
    """The ``#SBATCH`` options of one job, all derived from ``cfg.slurm`` (pure)."""
    res, opt, stage = stage_resources(cfg, job.stage), job_options(cfg, job.stage), definition.stage(job.stage)
    opts = [
        f"--job-name={cfg.run_name}.{job.name}",
        f"--nodes={res.nodes}",
        "--ntasks-per-node=1",  # one task per node: the stage, which launches torchrun there itself
        f"--cpus-per-task={res.cpus_per_task}",
        f"--mem={res.mem_gb}G",
        f"--time={res.time}",
        f"--output={output}",
    ]
    if res.gpus_per_node:
        opts.append(f"--gpus-per-node={res.gpus_per_node}")
    if stage.slurm_jobs == "array":
        opts.append(f"--array={array_spec(job.tasks if job.tasks is not None else range(res.array_tasks))}")
    if stage.preemptible:  # to the batch shell (B:), which hands it on when the stage can take it
        opts.append(f"--signal=B:USR1@{cfg.slurm.signal_s}")
    for key in ("partition", "account", "qos", "constraint", "reservation", "mail_type", "mail_user", "export"):
        if opt[key]:
            opts.append(f"--{key.replace('_', '-')}={opt[key]}")
    if opt["exclusive"]:
        opts.append("--exclusive")
    if dependency:
        opts += [f"--dependency=afterok:{':'.join(dependency)}", "--kill-on-invalid-dep=yes"]
    return opts + opt["extra_args"]


def _sh(word: str) -> str:
    """shlex.quote, and quoted when it holds a comma too (shellcheck reads a bare comma in an array as a typo)."""
    quoted = shlex.quote(word)
    return f"'{word}'" if quoted == word and "," in word else quoted


def _bash_array(name: str, items: list[str]) -> str:
    return f"{name}=(" + " ".join(_sh(a) for a in items) + ")"


def job_settings(cfg: Config, job: JobSpec, logs_dir: Path) -> str:
    """The generated part of a job script: the variables job.sh reads, the stage command and the environment hook."""
    opt = job_options(cfg, job.stage)
    settings = {
        "PIPELINE_REPO": str(REPO),
        "PIPELINE_PYTHON": python_of(cfg),
        "PIPELINE_RUN": cfg.run_name,
        "PIPELINE_STAGE": job.stage,
        "PIPELINE_UNIT": job.unit or "",
        "PIPELINE_LOGS_DIR": str(logs_dir),
        "PIPELINE_MONITOR": "1" if cfg.monitor.enabled else "0",
        "PIPELINE_MONITOR_INTERVAL": str(cfg.monitor.interval_s),
        "PIPELINE_RDZV_PORT": str(cfg.slurm.rdzv_port),
    }
    lines = ["# ---- settings of this job (generated by python -m pipeline.slurm submit)"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in settings.items()]
    lines.append(_bash_array("PIPELINE_SRUN_ARGS", opt["srun_args"]))
    lines.append(_bash_array("PIPELINE_WRAPPER", opt["wrapper"]))
    lines.append(_bash_array("PIPELINE_CMD", job.command))
    hook = [f"  export {k}={shlex.quote(v)}" for k, v in opt["env"].items()]
    hook += [f"  {line}" for line in opt["setup"]]
    lines += [
        f"pipeline_setup() {{ # the environment hook: slurm.setup/env and slurm.stages.{job.stage}.setup/env",
        *hook,
        "  :",
        "}",
        "job_start",
    ]
    return "\n".join(lines)


def generate_script(cfg: Config, job: JobSpec, *, output: Path, dependency: list[str], logs_dir: Path) -> str:
    """``slurm/<stage>.sbatch`` with this job's ``#SBATCH`` lines, slurm/job.sh and the job's settings filled in."""
    template_path = TEMPLATES / f"{job.stage}.sbatch"
    template = template_path.read_text()
    for placeholder in ("# @SBATCH@", "# @JOB@"):
        if placeholder not in template:
            raise PipelineError(f"{template_path}: expected a line '{placeholder}'")
    directives = "\n".join(f"#SBATCH {d}" for d in sbatch_directives(cfg, job, output=output, dependency=dependency))
    shell = JOB_SHELL.read_text().rstrip("\n")
    body = f"# ---- {JOB_SHELL.relative_to(REPO)}\n{shell}\n{job_settings(cfg, job, logs_dir)}"
    return template.replace("# @SBATCH@", directives).replace("# @JOB@", body)


# ---------------------------------------------------------------------------------------------------- submit
def _slurm(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run a Slurm client command; a clear error where Slurm is not installed."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise PipelineError(f"{cmd[0]}: not found (no Slurm here; slurm/local_cluster.sh sets one up)") from None


def _sbatch(script: Path) -> str:
    result = _slurm(["sbatch", "--parsable", str(script)])
    if result.returncode != 0:
        raise PipelineError(f"{script}: sbatch refused the job: {result.stderr.strip()}")
    return result.stdout.strip().split(";")[0]


def _submission_dir(slurm_dir: Path, dry_run: bool) -> Path:
    """``<NNN>`` after the last submission's (earlier ones are kept), or ``dry-run``."""
    if dry_run:
        return slurm_dir / "dry-run"
    numbers = [int(p.name) for p in slurm_dir.glob("[0-9][0-9][0-9]") if p.is_dir()] if slurm_dir.is_dir() else []
    return slurm_dir / f"{max(numbers, default=0) + 1:03d}"


def _refuse_if_active(logs_dir: Path, run: str) -> None:
    """Two chains of one run would write the same files."""
    if not (logs_dir / run / "slurm" / RECORD).is_file():
        return
    states = run_status(load_record(logs_dir, run))
    active = [f"{_label(j)} {j['job_id']}" for j in states["jobs"] if j["state"] not in DONE_STATES]
    if active:
        raise PipelineError(
            f"{logs_dir / run / 'slurm' / RECORD}: run '{run}' still has jobs queued or running ({', '.join(active)}); "
            f"wait, or cancel them: python -m pipeline.slurm cancel --run {run} --logs-dir {logs_dir}"
        )


def submit(
    cfg: Config,
    config_path: Path,
    overrides: list[str],
    *,
    commands: dict[str, str] | None = None,
    dry_run: bool = False,
    force: bool = False,
) -> dict:
    """Plan, render and submit what is left of the chain; write and return the run record (``jobs`` empty when
    everything is complete)."""
    logs_dir = Path(cfg.logs_dir).resolve()
    slurm_dir = logs_dir / cfg.run_name / "slurm"
    if not dry_run:
        _refuse_if_active(logs_dir, cfg.run_name)
    jobs, complete = plan(cfg, config_path.resolve(), overrides, commands or {}, force=force)
    out_dir = _submission_dir(slurm_dir, dry_run)
    record = {
        "run": cfg.run_name,
        "submission": out_dir.name,
        "submitted_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "config": str(config_path.resolve()),
        "overrides": [redact(o) for o in overrides],  # a token passed as an override must not land in logs/
        "commands": {k: redact(v) for k, v in (commands or {}).items()},
        "cwd": os.getcwd(),
        "logs_dir": str(logs_dir),
        "dry_run": dry_run,
        "complete": [
            {"stage": s, "unit": u, "job_id": (marker or {}).get("slurm_job_id")} for (s, u), marker in complete.items()
        ],
        "jobs": [],
    }
    if not jobs:
        return record
    out_dir.mkdir(parents=True, exist_ok=True)  # Slurm opens --output before the job runs: it must exist
    ids: dict[str, str] = {}
    try:
        for job in jobs:
            pattern = "%A_%a" if definition.stage(job.stage).slurm_jobs == "array" else "%j"
            output = out_dir / f"{job.name}-{pattern}.out"
            script = out_dir / f"{job.name}.sbatch"
            dependency = [ids[name] for name in job.after]
            atomic_write_text(
                script, generate_script(cfg, job, output=output, dependency=dependency, logs_dir=logs_dir)
            )
            ids[job.name] = "dry-run" if dry_run else _sbatch(script)
            record["jobs"].append(
                {
                    "stage": job.stage,
                    "unit": job.unit,
                    "units": job.units,
                    "job_id": ids[job.name],
                    "array_tasks": stage_resources(cfg, job.stage).array_tasks if pattern == "%A_%a" else None,
                    "array": array_spec(job.tasks) if job.tasks is not None else None,  # the tasks queued
                    "after": dependency,
                    "after_jobs": job.after,
                    "script": str(script),
                    "output": str(output),
                }
            )
    except PipelineError as err:
        submitted = [j["job_id"] for j in record["jobs"] if j["job_id"] != "dry-run"]
        _scancel(submitted)  # half a chain would wait forever on the job that was refused
        if submitted:
            raise PipelineError(f"{err} (cancelled the jobs already submitted: {' '.join(submitted)})") from None
        raise
    atomic_write_json(out_dir / RECORD, record)
    if not dry_run:
        atomic_write_json(slurm_dir / RECORD, record)
    return record


def _scancel(job_ids: list[str]) -> None:
    if job_ids:
        _slurm(["scancel", *job_ids])


# ---------------------------------------------------------------------------------------------------- status
def load_record(logs_dir: Path, run: str) -> dict:
    """The latest submission record of ``run``."""
    path = logs_dir / run / "slurm" / RECORD
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path}: no submission record for run '{run}' (submit it with make submit)") from None
    except (OSError, json.JSONDecodeError) as err:
        raise PipelineError(f"{path}: unreadable submission record ({err})") from None


def _query(cmd: list[str]) -> list[list[str]]:
    return [line.split("|") for line in _slurm(cmd).stdout.splitlines() if line.strip()]


def elapsed_s(text: str) -> int | None:
    """Seconds of a Slurm duration: sacct's ``[D-]HH:MM:SS`` and squeue's ``[D-][H:]M:SS`` alike."""
    text = text.strip()
    if not text or text in ("INVALID", "UNLIMITED"):
        return None
    days, _, clock = text.rpartition("-")
    try:
        parts = [int(p) for p in clock.split(":")]
        seconds = 0
        for part in parts:
            seconds = seconds * 60 + part
        return seconds + int(days or 0) * 86400
    except ValueError:
        return None


def format_elapsed(seconds: int | None) -> str:
    """One format for every duration shown: ``H:MM:SS``, ``D-HH:MM:SS`` from a day on."""
    if seconds is None:
        return "-"
    days, rest = divmod(seconds, 86400)
    clock = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}" if days else ""
    return f"{days}-{clock}" if days else f"{rest // 3600}:{rest % 3600 // 60:02d}:{rest % 60:02d}"


def slurm_states(job_ids: list[str]) -> dict[str, list[dict]]:
    """Per submitted job id, one entry per job or array task: state, exit code, reason, elapsed seconds, whether it
    ever started, and how often it was requeued.

    sacct (with -D: every attempt of a requeued job) knows finished jobs and earlier attempts; squeue knows
    pending/running jobs and why they wait, and wins when both answer.
    """
    out: dict[str, dict[str, dict]] = {j: {} for j in job_ids}
    if not job_ids:
        return {}
    ids = ",".join(job_ids)
    attempts: dict[str, list[list[str]]] = {}
    fields = "JobID,State,ExitCode,Elapsed,Reason,Start,Submit"
    rows = _query(["sacct", "-n", "-P", "-X", "-D", "-j", ids, "-o", fields])
    for row in sorted(rows, key=lambda r: (r[6], r[5])):  # oldest attempt first
        attempts.setdefault(row[0], []).append(row)
    for jobid, tries in attempts.items():
        base = jobid.split("_")[0].split("+")[0]
        _, state, exit_code, elapsed, reason, start, _ = tries[-1]
        state = state.split()[0]  # "CANCELLED by 0" -> CANCELLED
        # "[...]" lines are array ranges Slurm has not split into tasks: pending ones squeue reports better, but a
        # range cancelled before it ever ran stays in that form, and its final state is the only one left.
        if base not in out or ("[" in jobid and state not in DONE_STATES):
            continue
        ran = [t for t in tries if (elapsed_s(t[3]) or 0) > 0 or t[1].split()[0] in ("RUNNING", "REQUEUED")]
        out[base][jobid] = {
            "id": jobid,
            "state": state,
            "exit_code": exit_code,
            "elapsed_s": elapsed_s(elapsed),
            "reason": reason,
            # right after a dependency cancellation sacct briefly reports Start = the cancel time
            "started": bool(ran) or (start not in ("Unknown", "None", "") and state not in ("CANCELLED", "PENDING")),
            "requeues": max(len(tries) - 1, sum(t[1].startswith("REQUEUED") for t in tries)),
        }
    for jobid, array_job, state, reason, elapsed in _query(["squeue", "-h", "-r", "-j", ids, "-o", "%i|%F|%T|%r|%M"]):
        base = array_job if array_job in out else jobid.split("_")[0]
        if base in out:
            entry = out[base].get(jobid, {"id": jobid, "exit_code": "", "started": False, "requeues": 0})
            running = state in ("RUNNING", "COMPLETING", "SUSPENDED") or (elapsed_s(elapsed) or 0) > 0
            out[base][jobid] = {
                **entry,
                "state": state,
                "reason": reason,
                "elapsed_s": elapsed_s(elapsed) if running else entry.get("elapsed_s"),
                "started": entry["started"] or running,
            }
    return {j: sorted(tasks.values(), key=lambda t: t["id"]) for j, tasks in out.items()}


def summarize_job(tasks: list[dict]) -> dict:
    """One state for a job (an array: the worst task state), plus counts per state, requeues and elapsed."""
    if not tasks:
        return {"state": "UNKNOWN", "counts": {}, "exit_code": "", "reason": "", "elapsed_s": None, "started": False,
                "requeues": 0}  # fmt: skip
    counts: dict[str, int] = {}
    for t in tasks:
        counts[t["state"]] = counts.get(t["state"], 0) + 1
    order = [*sorted(FAILED_STATES), "CANCELLED", "RUNNING", "REQUEUED", "PENDING", "COMPLETING", "COMPLETED"]
    state = min(counts, key=lambda s: order.index(s) if s in order else len(order))
    worst = next(t for t in tasks if t["state"] == state)
    elapsed = [t["elapsed_s"] for t in tasks if t.get("elapsed_s") is not None]
    started = any(t.get("started") for t in tasks)
    return {
        "state": state,
        "counts": counts,
        "exit_code": worst.get("exit_code", ""),
        "reason": worst.get("reason", ""),
        "elapsed_s": max(elapsed) if elapsed and started else None,  # a job that ran under a second shows 0:00:00
        "started": started,
        "requeues": sum(t.get("requeues", 0) for t in tasks),
    }


def job_log_records(logs_dir: Path, run: str, stage: str, job_id: str) -> list[dict]:
    """The stage's JSON log records written by one Slurm job (every rank and array task of it), oldest first."""
    records = []
    for path in sorted((logs_dir / run / stage).glob(f"rank_*.job{job_id}[._]*jsonl")):
        records += tail_records(path)
    return sorted(records, key=lambda r: r.get("ts", ""))


def last_progress(records: list[dict], failed: bool) -> dict | None:
    """What to show for a job: its last error when it failed (the line that says why, from whichever rank wrote
    it), else its latest line from rank 0 (of any array task; the other ranks of a torchrun stage echo it, and
    on a stop only rank 0 asks Slurm why)."""
    if failed:
        errors = [r for r in records if r.get("level") == "error"]
        if errors:
            return errors[-1]
    lead = [r for r in records if r.get("rank", 0) == 0] or records
    return lead[-1] if lead else None


def run_status(record: dict) -> dict:
    """Each job's Slurm state and last progress line, which stage failed and what that cancelled, and the units
    this submission left out because they were complete."""
    logs_dir = Path(record["logs_dir"])
    states = slurm_states([j["job_id"] for j in record["jobs"] if j["job_id"] != "dry-run"])
    rows = []
    for job in record["jobs"]:
        summary = summarize_job(states.get(job["job_id"], []))
        records = job_log_records(logs_dir, record["run"], job["stage"], job["job_id"])
        progress = last_progress(records, summary["state"] in FAILED_STATES)
        rows.append({**job, **summary, "progress": progress})
    failed = [r for r in rows if r["state"] in FAILED_STATES]
    # cancelled because an upstream job failed (afterok can never be satisfied): rows are in submission order,
    # so every job's upstream has been classified before it
    broken = {r["job_id"] for r in failed}
    downstream = []
    for r in rows:
        if r["state"] == "CANCELLED" and any(j in broken for j in r["after"]):
            broken.add(r["job_id"])
            downstream.append(r)
    return {
        "run": record["run"],
        "submission": record.get("submission"),
        "jobs": rows,
        "complete_before": record.get("complete", []),
        "failed": [_label(r) for r in failed],
        "cancelled_downstream": [_label(r) for r in downstream],
        "cancelled": [_label(r) for r in rows if r["state"] == "CANCELLED"],
        "done": all(r["state"] in DONE_STATES for r in rows),
        "complete": all(r["state"] == "COMPLETED" for r in rows),
    }


def _label(row: dict) -> str:
    return _unit_label(row["stage"], row.get("unit"))


def format_status(status: dict) -> str:
    """The human table of ``make status``."""
    head = f"{'STAGE':<22} {'JOB':<9} {'STATE':<28} {'REQUEUES':<8} {'ELAPSED':<10} LAST PROGRESS"
    lines = [f"run {status['run']} (submission {status.get('submission') or '-'})", head]
    for done in status["complete_before"]:
        job = done.get("job_id") or "-"
        lines.append(f"{_unit_label(done['stage'], done['unit']):<22} {job:<9} {'complete, not queued':<28}")
    for r in status["jobs"]:
        state = r["state"]
        if len(r["counts"]) > 1 or sum(r["counts"].values()) > 1:
            state += " (" + ", ".join(f"{n} {s.lower()}" for s, n in sorted(r["counts"].items())) + ")"
        elif r["state"] in FAILED_STATES:
            state += f" exit {r['exit_code']}"
        elif r["state"] == "CANCELLED" and not r["started"]:
            state += " (never ran)"
        elif r["state"] == "PENDING" and r["reason"] not in ("", "None"):
            state += f" ({r['reason']})"
        progress = format_console(r["progress"]) if r["progress"] else "-"
        elapsed = format_elapsed(r["elapsed_s"])
        lines.append(f"{_label(r):<22} {r['job_id']:<9} {state:<28} {r['requeues']:<8} {elapsed:<10} {progress[:100]}")
    if status["failed"]:
        lines.append(f"FAILED: {', '.join(status['failed'])}")
        for r in status["jobs"]:
            if r["state"] in FAILED_STATES:
                if r["progress"] and r["progress"].get("level") == "error":
                    lines.append(f"  {_label(r)} error: {r['progress'].get('message', '')}")
                lines.append(f"  {_label(r)} output: {' '.join(map(str, job_outputs(r))) or r['output']}")
    if status["cancelled_downstream"]:
        lines.append(f"cancelled downstream (dependency never satisfied): {', '.join(status['cancelled_downstream'])}")
    elif status["cancelled"]:
        lines.append(f"cancelled: {', '.join(status['cancelled'])}")
    if status["complete"]:
        lines.append("all jobs completed")
    return "\n".join(lines)


def job_outputs(job: dict) -> list[Path]:
    """The Slurm output files of a recorded job (its ``%j``/``%A_%a`` pattern resolved)."""
    pattern = Path(job["output"].replace("%A", job["job_id"]).replace("%j", job["job_id"]).replace("%a", "*"))
    return sorted(pattern.parent.glob(pattern.name))


def cancel(record: dict) -> list[str]:
    """scancel every job of the run's latest submission (running ones get SIGTERM: they stop, not requeue)."""
    ids = [j["job_id"] for j in record["jobs"] if j["job_id"] != "dry-run"]
    _scancel(ids)
    return ids


# ------------------------------------------------------------------------------------------------------ CLI
def _parse_commands(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        stage, sep, cmd = item.partition("=")
        if not sep or stage not in STAGES:
            raise ConfigError(f"--command {item}: expected STAGE=SHELL_COMMAND with STAGE one of {', '.join(STAGES)}")
        out[stage] = cmd
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.slurm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("submit", help="submit what is left of the chain")
    p.add_argument("--config", required=True, help="YAML config")
    p.add_argument("--dry-run", action="store_true", help="write the scripts to logs/<run>/slurm/dry-run/ only")
    p.add_argument("--force", action="store_true", help="queue every stage and redo it (each stage gets --force)")
    p.add_argument(
        "--command",
        action="append",
        default=[],
        metavar="STAGE=CMD",
        help="replace a stage's command by a shell line (tests and smoke runs of the orchestration only)",
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides, passed on to every stage")
    for name in ("status", "cancel"):
        p = sub.add_parser(name, help=f"{name} the run's latest submission")
        p.add_argument("--config", help="YAML config: its run_name and logs_dir (with any overrides)")
        p.add_argument("--run", help="run name (default: the config's run_name)")
        p.add_argument("--logs-dir", help="root of log directories (default: the config's logs_dir, else logs)")
        p.add_argument("overrides", nargs="*", help="dotted overrides of the config (e.g. logs_dir=/scratch/logs)")
        if name == "status":
            p.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "submit":
            cfg = config_mod.load(args.config, args.overrides)
            validate.check(cfg)  # every rule any stage would refuse, before a script is written or a job queued
            record = submit(
                cfg,
                Path(args.config),
                args.overrides,
                commands=_parse_commands(args.command),
                dry_run=args.dry_run,
                force=args.force,
            )
            for done in record["complete"]:
                print(f"{'complete':<9} {_unit_label(done['stage'], done['unit'])} (not queued)")
            for job in record["jobs"]:
                after = f" after {', '.join(job['after_jobs'])}" if job["after_jobs"] else ""
                partial = job.get("array") and job["array"] != array_spec(range(job["array_tasks"]))
                tasks = f" (array tasks {job['array']} of {job['array_tasks']})" if partial else ""
                print(f"{job['job_id']:<9} {_label(job)}{tasks}{after}")
            if not record["jobs"]:
                print(f"run '{record['run']}' is complete for this config and its inputs: nothing to queue")
            elif not args.dry_run:
                print(f"run record: {Path(record['logs_dir']) / record['run'] / 'slurm' / RECORD}")
        else:
            run, logs_dir = run_location(args.config, args.overrides, args.run, args.logs_dir)
            record = load_record(logs_dir, run)
            if args.cmd == "status":
                status = run_status(record)
                print(json.dumps(status, indent=2, default=str) if args.json else format_status(status))
            else:
                ids = cancel(record)
                print(f"cancelled {len(ids)} jobs of run {run}: {' '.join(ids)}")
        return 0
    except (ConfigError, PipelineError) as err:
        return cli_exit_code(err)


if __name__ == "__main__":
    sys.exit(main())
