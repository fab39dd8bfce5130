"""Signals in a stage process (pipeline.preemption through the real stage wrapper, on a toy stage): a warning
(USR1) before the first unit requeues at once, also when it came while the process was starting (the job shell's
warning file); inside a deferred loop the stage stops at its safe point; SIGTERM stops without a requeue request;
the handlers are in place before the config is even read and are removed afterwards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import preemption, validate
from pipeline.rundir import RunDir, StageSpec, stage_main

REPO = Path(__file__).resolve().parent.parent


def _events(logs: Path, stage: str) -> list[dict]:
    return [json.loads(line) for p in sorted((logs / "tiny" / stage).glob("rank_*.jsonl")) for line in
            p.read_text().splitlines()]  # fmt: skip


@pytest.fixture
def job_shell(tmp_path, monkeypatch):
    """The environment slurm/job.sh gives a stage: a signal directory."""
    signal_dir = tmp_path / "signals"
    signal_dir.mkdir()
    monkeypatch.setenv(preemption.SIGNAL_DIR_ENV, str(signal_dir))
    monkeypatch.setenv("SLURM_NODEID", "0")
    return signal_dir


def _toy(tmp_path, work) -> tuple[StageSpec, list[str]]:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"run_name: tiny\nruns_dir: {tmp_path}/runs\nlogs_dir: {tmp_path}/logs\nteacher: {{name_or_path: t}}\n"
        "student: {name_or_path: s}\nmonitor: {enabled: false}\n"
    )
    spec = StageSpec(name="toy", run=work, sections=lambda cfg, unit: {"seed": cfg.seed},
                     units=lambda cfg, args: ["a", "b"], check=validate.check_config)  # fmt: skip
    return spec, ["--config", str(cfg)]


def test_a_warning_before_the_first_unit_requeues_at_once(tmp_path, job_shell):
    ran = []

    def work(cfg, rd, ctx):
        ran.append(ctx.unit)
        return {}

    spec, argv = _toy(tmp_path, work)
    (job_shell / "warning").touch()  # USR1 came while this process was still importing
    before = signal.getsignal(signal.SIGUSR1)
    assert stage_main(spec, argv) == preemption.EXIT_REQUEUED
    assert ran == [] and (job_shell / "requeue").exists() and (job_shell / "ready.0").exists()
    (event,) = [e for e in _events(tmp_path / "logs", "toy") if e["event"] == "preempted"]
    assert "before starting toy a" in event["message"] and "requeue requested" in event["message"]
    assert signal.getsignal(signal.SIGUSR1) is before


def test_a_warning_during_a_unit_stops_before_the_next_one(tmp_path, job_shell):
    ran = []

    def work(cfg, rd, ctx):
        ran.append(ctx.unit)
        os.kill(os.getpid(), signal.SIGUSR1)  # not deferred here: the handler raises at once
        raise AssertionError("not reached")

    spec, argv = _toy(tmp_path, work)
    assert stage_main(spec, argv) == 0
    assert ran == ["a"] and (job_shell / "requeue").exists()
    assert not RunDir(tmp_path / "runs" / "tiny", tmp_path / "logs").marker_path("toy", "a").exists()


def test_sigterm_in_a_deferred_loop_stops_at_the_safe_point_without_requeue(tmp_path, job_shell):
    steps = []

    def work(cfg, rd, ctx):
        with preemption.deferred(preemption.WARNING, preemption.STOP):
            for step in range(100):
                preemption.check(f"checkpoint at step {step} saved", step=step)
                steps.append(step)
                if step == 3:
                    os.kill(os.getpid(), signal.SIGTERM)  # recorded only: the step in hand finishes
        return {}

    spec, argv = _toy(tmp_path, work)
    assert stage_main(spec, argv) == 128 + signal.SIGTERM
    assert steps == [0, 1, 2, 3] and not (job_shell / "requeue").exists()
    (event,) = [e for e in _events(tmp_path / "logs", "toy") if e["event"] == "stopped"]
    assert "SIGTERM" in event["message"] and "checkpoint at step 4 saved" in event["message"]
    assert "without requeue" in event["message"] and event["level"] == "warning"


def test_outside_the_job_shell_a_warning_just_stops(tmp_path, monkeypatch):
    monkeypatch.delenv(preemption.SIGNAL_DIR_ENV, raising=False)

    def work(cfg, rd, ctx):
        os.kill(os.getpid(), signal.SIGUSR1)

    spec, argv = _toy(tmp_path, work)
    assert stage_main(spec, argv) == 0
    (event,) = [e for e in _events(tmp_path / "logs", "toy") if e["event"] == "preempted"]
    assert "rerun the same command to resume" in event["message"]


def test_interrupted_passes_through_except_exception():
    restore = preemption.install()
    try:
        with pytest.raises(preemption.Interrupted):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
            except Exception:  # a library's broad handler must not swallow a stop
                pytest.fail("Interrupted was caught as an Exception")
        assert preemption.received() == signal.SIGTERM
    finally:
        restore()


def test_a_second_stop_while_the_stage_says_why_it_stops_is_only_recorded(tmp_path, job_shell, monkeypatch):
    """Under torchrun a worker gets SIGTERM twice (from Slurm's step and again from the torchrun agent, which also
    sends it when a peer exits 143 first); the second can land while rank 0 asks Slurm why the job stops. It must
    not turn the orderly stop into a traceback and exit 1."""
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("SLURM_PROCID", raising=False)

    def asking_slurm() -> str:
        os.kill(os.getpid(), signal.SIGTERM)  # the agent's SIGTERM, while scontrol/sacct run
        return "cancelled"

    monkeypatch.setattr(preemption, "stop_cause", asking_slurm)

    def work(cfg, rd, ctx):
        os.kill(os.getpid(), signal.SIGTERM)  # not deferred: the stage stops at once

    spec, argv = _toy(tmp_path, work)
    assert stage_main(spec, argv) == 128 + signal.SIGTERM
    (event,) = [e for e in _events(tmp_path / "logs", "toy") if e["event"] == "stopped"]
    assert "SIGTERM (job cancelled)" in event["message"] and not (job_shell / "requeue").exists()


def test_only_rank_0_asks_slurm_why_the_job_stops(tmp_path, monkeypatch):
    """Every rank of a stopped torchrun job logs its stop; only rank 0 runs scontrol/sacct (32 ranks x 2 queries
    per node at once would load the controller while it is ending the job)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    for tool in ("scontrol", "sacct"):
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "{tool} $RANK" >> {calls}\n')
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setattr(preemption, "SACCT_SETTLE_S", 0.0)  # the fake sacct never names an end state
    for rank in (1, 0, 2):
        monkeypatch.setenv("RANK", str(rank))
        log = preemption.JsonLogger("tiny", "toy", tmp_path / f"rank{rank}.jsonl")
        assert preemption.finish(preemption.Interrupted(signal.SIGTERM), log) == 128 + signal.SIGTERM
        log.close()
    assert calls.read_text().split("\n")[:-1] == ["scontrol 0", "sacct 0"]
    rank1 = json.loads((tmp_path / "rank1.jsonl").read_text())
    assert rank1["event"] == "stopped" and "rank 0 logs why" in rank1["message"]


def test_rank_0_waits_for_accounting_to_record_the_cancel(tmp_path, monkeypatch):
    """slurmdbd records a cancel asynchronously: on a loaded cluster sacct still says RUNNING a few seconds after
    scancel (a CI run logged "stop requested" for a cancel). Rank 0 asks again until sacct names the end state."""
    bin_dir, answers = tmp_path / "bin", tmp_path / "answers"
    bin_dir.mkdir()
    answers.write_text("RUNNING\nRUNNING\nCANCELLED by 0\n")
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho JobId=7 JobState=COMPLETING Restarts=0\n")
    (bin_dir / "sacct").write_text(f"#!/bin/sh\nhead -n 1 {answers}\nsed -i 1d {answers}\n")
    for tool in ("scontrol", "sacct"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    assert preemption.stop_cause() == "cancelled" and answers.read_text() == ""
    answers.write_text("RUNNING\n" * 100)  # a SIGTERM sent by hand: the job goes on running
    monkeypatch.setattr(preemption, "SACCT_SETTLE_S", 1.0)
    assert preemption.stop_cause() is None
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))  # inside a container: no Slurm commands, no waiting
    started = time.monotonic()
    assert preemption.stop_cause() is None and time.monotonic() - started < 0.5


def test_more_sigterms_to_the_step_spare_rank_0s_question_to_slurm(tmp_path):
    """After the SIGTERM that stops a stage more follow to every process of the step (srun terminating the step,
    torchrun's agent stopping its workers with killpg); a scontrol/sacct that rank 0 runs at that moment must survive
    them, or the log says "stop requested" where Slurm would have said "job cancelled"."""
    bin_dir, asked = tmp_path / "bin", tmp_path / "asked"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho JobId=7 JobState=CANCELLED Restarts=0\n")
    (bin_dir / "sacct").write_text(f"#!/bin/sh\ntouch {asked}\nsleep 2\necho 'CANCELLED by 0'\n")
    for tool in ("scontrol", "sacct"):
        (bin_dir / tool).chmod(0o755)
    worker = (
        "import signal, sys; from pathlib import Path; from pipeline import preemption; "
        "preemption.install(); log = preemption.JsonLogger('tiny', 'toy', Path(sys.argv[1])); "
        "sys.exit(preemption.finish(preemption.Interrupted(signal.SIGTERM), log))"
    )
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "7", "PYTHONPATH": str(REPO)}
    env.pop("RANK", None)
    env.pop("SLURM_PROCID", None)
    out = str(tmp_path / "rank0.jsonl")
    proc = subprocess.Popen([sys.executable, "-c", worker, out], env=env, start_new_session=True)  # as torchrun's
    deadline = time.monotonic() + 60
    while not asked.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the worker never asked sacct"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)  # to the worker and its children, while sacct answers
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    event = json.loads((tmp_path / "rank0.jsonl").read_text())
    assert event["event"] == "stopped" and "SIGTERM (job cancelled)" in event["message"], event
