"""Submit, watch and cancel the whole pipeline on Slurm: manifest -> cache (array) -> train (one job per variant,
side by side) -> evaluate (after every train job) -> report, chained with ``afterok`` and kill-on-invalid-dependency
so a failure cancels everything downstream instead of leaving it pending forever.

    python -m pipeline.slurm submit --config C [--dry-run] [key.path=value ...]   (make submit CONFIG=C)
    python -m pipeline.slurm status --run R [--logs-dir logs] [--json]             (make status RUN=R)
    python -m pipeline.slurm cancel --run R [--logs-dir logs]                      (make cancel RUN=R)
    python -m pipeline.slurm launch --gpus-per-node G -- -m pipeline.train ...     (inside a train job, per node)

Resources have one source of truth, ``cfg.slurm`` (partition/account/qos/extra_args and ``slurm.stages.<stage>``),
overridable like any key (``slurm.stages.train.nodes=4``). :func:`generate_script` renders ``slurm/<stage>.sbatch``
with those ``#SBATCH`` lines and the run's settings into ``logs/<run>/slurm/<job>.sbatch``; that kept file is
exactly what was submitted. The run record ``logs/<run>/slurm/submission.json`` lists every job.

Why plain ``sbatch`` rather than submitit: submitit submits a pickled Python callable through its own generated
script and handles USR1 with its own checkpoint-and-requeue protocol. Our jobs must wrap the stage in a shell that
starts the monitor beside it, forwards USR1 to it and launches torchrun once per node; submitit's script cannot do
that, and using it for some stages would make two submission paths and two requeue mechanisms. The stages already
checkpoint and requeue themselves (pipeline.preemption) and skip completed work (markers), which is the part
submitit would have added.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import config as config_mod
from pipeline.config import STAGES, Config, ConfigError
from pipeline.jsonlog import format_console, redact
from pipeline.logs import tail_records
from pipeline.rundir import REPO, PipelineError, atomic_write_json, atomic_write_text, cli_exit_code

TEMPLATES = REPO / "slurm"
PREEMPTIBLE = ("cache", "train")  # stages that checkpoint on USR1 (pipeline.preemption); others must not get it
RECORD = "submission.json"
# sacct/squeue states after which a job will not run again
FAILED_STATES = {"FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
DONE_STATES = {"COMPLETED", "CANCELLED", *FAILED_STATES}
# torchrun forwards these to its workers; SIGUSR1 is the time-limit/preemption warning the trainer checkpoints on
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"

# Shell helpers every generated script carries (one copy here instead of five in the templates).
PRELUDE = r"""
STAGE_PID=""; MONITOR_PID=""
forward_usr1() { # Slurm signals only the batch shell (--signal=B:USR1): pass the warning on to the stage
  echo "$(date -Is) USR1 received: forwarding to the stage (pid ${STAGE_PID:-none})" >&2
  if [ -n "$STAGE_PID" ]; then kill -USR1 "$STAGE_PID" 2>/dev/null || true; fi
}
start_monitor() { # telemetry beside the stage: one monitor per node, stopped when the stage ends
  [ "$PIPELINE_MONITOR" = 1 ] || return 0
  local mon=("$PIPELINE_PYTHON" "$PIPELINE_REPO/monitor.py" --run "$PIPELINE_RUN" --stage "$PIPELINE_STAGE"
             --logs-dir "$PIPELINE_LOGS_DIR" --interval "$PIPELINE_MONITOR_INTERVAL")
  if [ "${SLURM_NNODES:-1}" -gt 1 ]; then
    srun --overlap --ntasks-per-node=1 "${mon[@]}" &
  else
    "${mon[@]}" --pid "$STAGE_PID" &
  fi
  MONITOR_PID=$!
}
stop_monitor() {
  if [ -n "$MONITOR_PID" ]; then kill -TERM "$MONITOR_PID" 2>/dev/null || true; wait "$MONITOR_PID" || true; fi
}
trap stop_monitor EXIT
run_stage() { # run_stage CMD...: CMD in the background (so traps run while it works), its exit code returned
  "$@" &
  STAGE_PID=$!
  start_monitor
  local rc r2
  while :; do
    wait "$STAGE_PID" && rc=0 || rc=$?
    if [ "$rc" -gt 128 ]; then # a trapped signal interrupted wait, or the stage died of a signal
      kill -0 "$STAGE_PID" 2>/dev/null && continue
      wait "$STAGE_PID" 2>/dev/null && r2=0 || r2=$?
      [ "$r2" = 127 ] || rc=$r2 # 127: status already collected above
    fi
    break
  done
  stop_monitor
  MONITOR_PID=""
  echo "$(date -Is) stage ${PIPELINE_STAGE} exited with ${rc}" >&2
  return "$rc"
}
""".strip("\n")


# ------------------------------------------------------------------------------------------------ generation
@dataclass
class JobSpec:
    """One job of the chain: which stage (and unit), the command it runs and what it waits for."""

    stage: str
    unit: str | None
    command: list[str]
    after: list[str] = field(default_factory=list)  # names of jobs this one depends on (afterok)

    @property
    def name(self) -> str:
        return f"{self.stage}-{self.unit}" if self.unit else self.stage


def python_of(cfg: Config) -> str:
    """The interpreter the jobs run: ``slurm.python``, else the one running submit (a shared-filesystem venv)."""
    return cfg.slurm.python or sys.executable


def stage_resources(cfg: Config, stage: str) -> Any:
    """The stage's SlurmResources (the one place resources come from)."""
    return getattr(cfg.slurm.stages, stage)


def sbatch_directives(cfg: Config, job: JobSpec, *, output: Path, dependency: list[str]) -> list[str]:
    """The ``#SBATCH`` options of one job, all derived from ``cfg.slurm`` (pure)."""
    res = stage_resources(cfg, job.stage)
    opts = [
        f"--job-name={cfg.run_name}.{job.name}",
        f"--nodes={res.nodes}",
        "--ntasks-per-node=1",  # one launcher per node: torchrun (train) or the stage itself
        f"--cpus-per-task={res.cpus_per_task}",
        f"--mem={res.mem_gb}G",
        f"--time={res.time_min}",
        f"--output={output}",
    ]
    if res.gpus_per_node:
        opts.append(f"--gpus-per-node={res.gpus_per_node}")
    if job.stage == "cache":
        opts.append(f"--array=0-{res.array_tasks - 1}")
    if job.stage in PREEMPTIBLE:
        opts.append(f"--signal=B:USR1@{cfg.slurm.signal_s}")
    for key in ("partition", "account", "qos"):
        if getattr(cfg.slurm, key):
            opts.append(f"--{key}={getattr(cfg.slurm, key)}")
    if dependency:
        opts += [f"--dependency=afterok:{':'.join(dependency)}", "--kill-on-invalid-dep=yes"]
    return opts + list(cfg.slurm.extra_args)


def stage_command(cfg: Config, config_path: Path, overrides: list[str], stage: str, unit: str | None) -> list[str]:
    """What the job runs under srun: the stage module, or for train the per-node torchrun launcher."""
    args = ["-m", f"pipeline.{stage}", "--config", str(config_path)]
    if unit is not None:
        args += ["--variant", unit]
    args += overrides
    if stage == "train":
        res = stage_resources(cfg, stage)
        return [
            python_of(cfg),
            "-m",
            "pipeline.slurm",
            "launch",
            f"--gpus-per-node={res.gpus_per_node}",
            f"--shutdown-timeout={cfg.slurm.signal_s}",
            "--",
            *args,
        ]
    return [python_of(cfg), *args]


def chain(cfg: Config, config_path: Path, overrides: list[str], commands: dict[str, str]) -> list[JobSpec]:
    """The jobs in submission order. ``commands`` replaces a stage's command by a shell line (tests, smoke runs)."""

    for stage in STAGES:
        if stage != "train" and stage_resources(cfg, stage).nodes != 1:
            raise ConfigError(
                f"slurm.stages.{stage}.nodes: expected 1 (only train spans nodes; the cache scales out with "
                f"array_tasks), got {stage_resources(cfg, stage).nodes}"
            )

    def command(stage: str, unit: str | None) -> list[str]:
        if stage in commands:
            return ["bash", "-c", commands[stage]]
        return stage_command(cfg, config_path, overrides, stage, unit)

    trains = [JobSpec("train", v, command("train", v), ["cache"]) for v in cfg.train.variants]
    return [
        JobSpec("manifest", None, command("manifest", None)),
        JobSpec("cache", None, command("cache", None), ["manifest"]),
        *trains,
        JobSpec("evaluate", None, command("evaluate", None), [t.name for t in trains]),
        JobSpec("report", None, command("report", None), ["evaluate"]),
    ]


def generate_script(cfg: Config, job: JobSpec, *, output: Path, dependency: list[str], logs_dir: Path) -> str:
    """``slurm/<stage>.sbatch`` with this job's ``#SBATCH`` lines and settings filled in (pure but for reading
    the template)."""
    template = (TEMPLATES / f"{job.stage}.sbatch").read_text()
    directives = "\n".join(f"#SBATCH {d}" for d in sbatch_directives(cfg, job, output=output, dependency=dependency))
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
    lines = [f"export {k}={shlex.quote(v)}" for k, v in settings.items()]
    lines.append("PIPELINE_CMD=(" + " ".join(shlex.quote(a) for a in job.command) + ")")
    body = "# settings of this run (generated by python -m pipeline.slurm submit)\n" + "\n".join(lines)
    for placeholder in ("# @SBATCH@", "# @SETTINGS@"):
        if placeholder not in template:
            raise PipelineError(f"{TEMPLATES / (job.stage + '.sbatch')}: expected a line '{placeholder}'")
    return template.replace("# @SBATCH@", directives).replace("# @SETTINGS@", body + "\n" + PRELUDE)


# ---------------------------------------------------------------------------------------------------- launch
def torchrun_argv(
    *,
    python: str,
    nnodes: int,
    node_rank: int,
    nproc_per_node: int,
    master_addr: str,
    master_port: int,
    shutdown_timeout_s: int,
    script_args: list[str],
) -> list[str]:
    """The per-node torchrun line (pure). Static rendezvous: Slurm has already fixed the members and their order,
    so node ``node_rank`` gets global ranks ``node_rank*nproc .. +nproc-1`` and nothing is elastic."""
    return [
        python,
        "-m",
        "torch.distributed.run",
        f"--nnodes={nnodes}",
        f"--node-rank={node_rank}",
        f"--nproc-per-node={nproc_per_node}",
        "--rdzv-backend=static",
        f"--rdzv-endpoint={master_addr}:{master_port}",
        "--max-restarts=0",
        f"--signals-to-handle={TORCHRUN_SIGNALS}",
        f"--shutdown-timeout={shutdown_timeout_s}",
        *script_args,
    ]


def launch_argv_from_env(env: dict[str, str], *, gpus_per_node: int, shutdown_timeout_s: int, script_args: list[str]):
    """torchrun_argv for the node this process runs on, read from the Slurm step environment."""
    missing = [k for k in ("SLURM_NNODES", "SLURM_NODEID", "MASTER_ADDR", "MASTER_PORT") if k not in env]
    if missing:
        raise PipelineError(f"launch: environment lacks {', '.join(missing)} (run it inside slurm/train.sbatch)")
    return torchrun_argv(
        python=sys.executable,
        nnodes=int(env["SLURM_NNODES"]),
        node_rank=int(env["SLURM_NODEID"]),
        nproc_per_node=max(gpus_per_node, 1),  # CPU-only allocation: one process
        master_addr=env["MASTER_ADDR"],
        master_port=int(env["MASTER_PORT"]),
        shutdown_timeout_s=shutdown_timeout_s,
        script_args=script_args,
    )


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


def submit(
    cfg: Config,
    config_path: Path,
    overrides: list[str],
    *,
    commands: dict[str, str] | None = None,
    dry_run: bool = False,
) -> dict:
    """Generate and submit the chain; write and return the run record."""
    logs_dir = Path(cfg.logs_dir).resolve()
    slurm_dir = logs_dir / cfg.run_name / "slurm"
    if not dry_run and (slurm_dir / RECORD).is_file():
        previous = load_record(logs_dir, cfg.run_name)
        states = run_status(previous)
        active = [f"{_label(j)} {j['job_id']}" for j in states["jobs"] if j["state"] not in DONE_STATES]
        if active:  # two chains of one run would write the same files
            raise PipelineError(
                f"{slurm_dir / RECORD}: run '{cfg.run_name}' still has jobs queued or running ({', '.join(active)}); "
                f"wait, or make cancel RUN={cfg.run_name} first"
            )
    slurm_dir.mkdir(parents=True, exist_ok=True)  # Slurm opens --output before the job runs: it must exist
    jobs = chain(cfg, config_path.resolve(), overrides, commands or {})
    ids: dict[str, str] = {}
    record_jobs = []
    try:
        for job in jobs:
            pattern = "%A_%a" if job.stage == "cache" else "%j"
            output = slurm_dir / f"{job.name}-{pattern}.out"
            script = slurm_dir / f"{job.name}.sbatch"
            dependency = [ids[name] for name in job.after]
            atomic_write_text(
                script, generate_script(cfg, job, output=output, dependency=dependency, logs_dir=logs_dir)
            )
            ids[job.name] = "dry-run" if dry_run else _sbatch(script)
            record_jobs.append(
                {
                    "stage": job.stage,
                    "unit": job.unit,
                    "job_id": ids[job.name],
                    "array_tasks": stage_resources(cfg, job.stage).array_tasks if job.stage == "cache" else None,
                    "after": dependency,
                    "script": str(script),
                    "output": str(output),
                }
            )
    except PipelineError as err:
        submitted = [j["job_id"] for j in record_jobs if j["job_id"] != "dry-run"]
        _scancel(submitted)  # half a chain would wait forever on the job that was refused
        if submitted:
            raise PipelineError(f"{err} (cancelled the jobs already submitted: {' '.join(submitted)})") from None
        raise
    record = {
        "run": cfg.run_name,
        "submitted_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "config": str(config_path.resolve()),
        "overrides": [redact(o) for o in overrides],  # a token passed as an override must not land in logs/
        "commands": {k: redact(v) for k, v in (commands or {}).items()},
        "cwd": os.getcwd(),
        "logs_dir": str(logs_dir),
        "dry_run": dry_run,
        "jobs": record_jobs,
    }
    atomic_write_json(slurm_dir / RECORD, record)
    return record


def _scancel(job_ids: list[str]) -> None:
    if job_ids:
        _slurm(["scancel", *job_ids])


# ---------------------------------------------------------------------------------------------------- status
def load_record(logs_dir: Path, run: str) -> dict:
    path = logs_dir / run / "slurm" / RECORD
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path}: no submission record for run '{run}' (submit it with make submit)") from None
    except (OSError, json.JSONDecodeError) as err:
        raise PipelineError(f"{path}: unreadable submission record ({err})") from None


def _query(cmd: list[str]) -> list[list[str]]:
    return [line.split("|") for line in _slurm(cmd).stdout.splitlines() if line.strip()]


def slurm_states(job_ids: list[str]) -> dict[str, list[dict]]:
    """Per submitted job id, one entry per job or array task: state, exit code, reason, elapsed.

    squeue knows pending/running jobs (and why they wait); sacct knows finished ones. squeue wins when both answer.
    """
    out: dict[str, dict[str, dict]] = {j: {} for j in job_ids}
    if not job_ids:
        return {}
    ids = ",".join(job_ids)
    for jobid, state, exit_code, elapsed, reason, start in _query(
        ["sacct", "-n", "-P", "-X", "-j", ids, "-o", "JobID,State,ExitCode,Elapsed,Reason,Start"]
    ):
        base = jobid.split("_")[0].split("+")[0]
        # "[...]" lines are array ranges Slurm has not split into tasks: pending ones squeue reports better, but a
        # range cancelled before it ever ran stays in that form, and its final state is the only one left.
        if base in out and ("[" not in jobid or state.split()[0] in DONE_STATES):
            out[base][jobid] = {
                "id": jobid,
                "state": state.split()[0],  # "CANCELLED by 0" -> CANCELLED
                "exit_code": exit_code,
                "elapsed": elapsed,
                "reason": reason,
                # right after a dependency cancellation sacct briefly reports Start = the cancel time
                "started": start not in ("Unknown", "None", "")
                and not (state.startswith("CANCELLED") and elapsed == "00:00:00"),
            }
    for jobid, array_job, state, reason, elapsed in _query(["squeue", "-h", "-r", "-j", ids, "-o", "%i|%F|%T|%r|%M"]):
        base = array_job if array_job in out else jobid.split("_")[0]
        if base in out:
            # before sacct has the job: it ran if it is running now or spent time running (a job cancelled for
            # a never-satisfied dependency shows CANCELLED with 0:00)
            started = state in ("RUNNING", "COMPLETING", "SUSPENDED") or elapsed not in ("0:00", "")
            entry = out[base].get(jobid, {"id": jobid, "exit_code": "", "started": started})
            out[base][jobid] = {**entry, "state": state, "reason": reason, "elapsed": elapsed}
    return {j: sorted(tasks.values(), key=lambda t: t["id"]) for j, tasks in out.items()}


def summarize_job(tasks: list[dict]) -> dict:
    """One state for a job (an array: the worst task state), plus counts per state."""
    if not tasks:
        return {"state": "UNKNOWN", "counts": {}, "exit_code": "", "reason": "", "elapsed": ""}
    counts: dict[str, int] = {}
    for t in tasks:
        counts[t["state"]] = counts.get(t["state"], 0) + 1
    order = [*sorted(FAILED_STATES), "CANCELLED", "RUNNING", "REQUEUED", "PENDING", "COMPLETING", "COMPLETED"]
    state = min(counts, key=lambda s: order.index(s) if s in order else len(order))
    worst = next(t for t in tasks if t["state"] == state)
    return {
        "state": state,
        "counts": counts,
        "exit_code": worst.get("exit_code", ""),
        "reason": worst.get("reason", ""),
        "elapsed": max((t.get("elapsed") or "" for t in tasks), default=""),
        "started": any(t.get("started") for t in tasks),
    }


def last_progress(logs_dir: Path, run: str, stage: str, unit: str | None = None) -> dict | None:
    """The latest line of the stage's JSON logs (any rank); with ``unit`` (a train variant, which shares the stage's
    log with the other variants) the latest line naming it, if any does."""
    latest, latest_unit = None, None
    for path in sorted((logs_dir / run / stage).glob("rank_*.jsonl")):
        for rec in tail_records(path):
            if latest is None or rec.get("ts", "") >= latest.get("ts", ""):
                latest = rec
            words = str(rec.get("message", "")).replace(":", " ").split()
            if unit and unit in words and (latest_unit is None or rec.get("ts", "") >= latest_unit.get("ts", "")):
                latest_unit = rec
    return latest_unit or latest


def run_status(record: dict) -> dict:
    """Each job's Slurm state and last progress line, and which stage failed / what it cancelled."""
    logs_dir = Path(record["logs_dir"])
    states = slurm_states([j["job_id"] for j in record["jobs"]])
    rows = []
    for job in record["jobs"]:
        summary = summarize_job(states.get(job["job_id"], []))
        rows.append({**job, **summary, "progress": last_progress(logs_dir, record["run"], job["stage"], job["unit"])})
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
        "jobs": rows,
        "failed": [_label(r) for r in failed],
        "cancelled_downstream": [_label(r) for r in downstream],
        "cancelled": [_label(r) for r in rows if r["state"] == "CANCELLED"],
        "done": all(r["state"] in DONE_STATES for r in rows),
        "complete": all(r["state"] == "COMPLETED" for r in rows),
    }


def _label(row: dict) -> str:
    return f"{row['stage']}[{row['unit']}]" if row.get("unit") else row["stage"]


def format_status(status: dict) -> str:
    """The human table of ``make status``."""
    head = f"{'STAGE':<22} {'JOB':<9} {'STATE':<24} {'ELAPSED':<9} LAST PROGRESS"
    lines = [f"run {status['run']}", head]
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
        lines.append(f"{_label(r):<22} {r['job_id']:<9} {state:<24} {r['elapsed'] or '-':<9} {progress[:100]}")
    if status["failed"]:
        lines.append(f"FAILED: {', '.join(status['failed'])}")
        for r in status["jobs"]:
            if r["state"] in FAILED_STATES:
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
    """scancel every job of the run; returns the ids."""
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
    p = sub.add_parser("submit", help="submit the whole chain")
    p.add_argument("--config", required=True, help="YAML config")
    p.add_argument("--dry-run", action="store_true", help="write the scripts and record, submit nothing")
    p.add_argument(
        "--command",
        action="append",
        default=[],
        metavar="STAGE=CMD",
        help="replace a stage's command by a shell line (tests and smoke runs of the orchestration only)",
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides, passed on to every stage")
    for name in ("status", "cancel"):
        p = sub.add_parser(name, help=f"{name} a submitted run")
        p.add_argument("--run", required=True, help="run name")
        p.add_argument("--logs-dir", default="logs", help="root of log directories (cfg.logs_dir)")
        if name == "status":
            p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser("launch", help="exec torchrun for this node (used inside slurm/train.sbatch)")
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--shutdown-timeout", type=int, default=300, help="seconds workers get to save after a signal")
    p.add_argument("--dry-run", action="store_true", help="print the torchrun line instead of running it")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="-- -m pipeline.train --config ...")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "submit":
            cfg = config_mod.load(args.config, args.overrides)
            record = submit(
                cfg, Path(args.config), args.overrides, commands=_parse_commands(args.command), dry_run=args.dry_run
            )
            for job in record["jobs"]:
                after = f" after {','.join(job['after'])}" if job["after"] else ""
                print(f"{job['job_id']:<9} {_label(job)}{after}")
            print(f"run record: {Path(record['logs_dir']) / record['run'] / 'slurm' / RECORD}")
        elif args.cmd == "status":
            status = run_status(load_record(Path(args.logs_dir), args.run))
            print(json.dumps(status, indent=2, default=str) if args.json else format_status(status))
        elif args.cmd == "cancel":
            ids = cancel(load_record(Path(args.logs_dir), args.run))
            print(f"cancelled {len(ids)} jobs of run {args.run}: {' '.join(ids)}")
        elif args.cmd == "launch":
            script_args = args.script_args[1:] if args.script_args[:1] == ["--"] else args.script_args
            argv_ = launch_argv_from_env(
                dict(os.environ),
                gpus_per_node=args.gpus_per_node,
                shutdown_timeout_s=args.shutdown_timeout,
                script_args=script_args,
            )
            print("launch: " + shlex.join(argv_), file=sys.stderr, flush=True)
            if not args.dry_run:
                os.execv(argv_[0], argv_)  # exec: srun's USR1 reaches torchrun itself, which forwards it
        return 0
    except (ConfigError, PipelineError) as err:
        return cli_exit_code(err)


if __name__ == "__main__":
    sys.exit(main())
