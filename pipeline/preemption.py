"""What a stage process does when Slurm (or a person) signals it, from the first line of ``stage_main`` on.

Two signals, two meanings:

- ``SIGUSR1`` is the warning the job asked for (``#SBATCH --signal=B:USR1@<signal_s>``: the time limit or a
  preemption is near): save what is worth saving, ask for a requeue, exit 0. The requeued job resumes from the
  checkpoint and the completion markers.
- ``SIGTERM`` (``scancel``, an administrator, the time limit itself, Slurm's own requeue or preemption) means stop:
  checkpoint if the stage is at a point where that is quick, then exit 143 *without* requeueing. When Slurm itself
  requeued the job (``scontrol requeue``, preempt-requeue) the log says so, as a requeue and not as a crash.

Where a stage holds nothing worth saving (loading a model, between units) a signal stops it at once: the handler
raises :class:`Interrupted`, and the stage wrapper turns that into the exit above (a warning before the first unit
of work means: requeue now). Inside :func:`deferred` (a training loop, a shard being written) the handler only
records the signal and the stage stops at its next safe point with :func:`check`.

The requeue itself is done by the job shell (slurm/job.sh), outside any container and after every process of the
stage has exited: the stage leaves a request file in ``$PIPELINE_SIGNAL_DIR``. The same directory carries the two
halves of the start-up handshake that keeps an early warning from killing a process that has no handler yet: the
job shell writes ``warning`` when USR1 arrives and forwards the signal only once every node's stage process has
written ``ready.<node>``; a process that starts after the warning finds the file.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pipeline.jsonlog import JsonLogger, env_rank

WARNING = signal.SIGUSR1  # save, requeue, exit 0
STOP = signal.SIGTERM  # save if quick, exit without requeueing
EXIT_REQUEUED = 0  # the stage did its part; the job shell requeues the job
SIGNAL_DIR_ENV = "PIPELINE_SIGNAL_DIR"  # set by slurm/job.sh: the handshake and requeue-request files
# slurmdbd records a cancel asynchronously: on a loaded controller sacct still says RUNNING for a few seconds after
# scancel (seen in CI). Rank 0 asks again for this long; Slurm's KillWait (30 s by default) leaves the time.
SACCT_SETTLE_S = 8.0


class Interrupted(BaseException):  # noqa: N818 (a control-flow signal like KeyboardInterrupt, not an error)
    """Raised where a stage stops on a signal; BaseException so that ``except Exception`` in libraries lets it
    through. ``where`` says what was saved (``checkpoint at step 12 saved``), ``metrics`` go into the log line."""

    def __init__(self, signum: int, where: str = "", **metrics: Any) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum, self.where, self.metrics = signum, where, metrics


class _State:
    """The process-wide record of what was received, which signals are deferred right now, and whether the stage is
    already stopping."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.deferred: frozenset[int] = frozenset()
        # Set once the stage acts on a signal. From then on signals are only recorded: a torchrun worker gets
        # SIGTERM from the Slurm step and again from the agent (also when a peer exits first), and a second
        # Interrupted raised inside finish() would turn the orderly stop into a traceback and exit 1.
        self.stopping = False

    def handle(self, signum: int, frame: object) -> None:
        if self.received != STOP:  # a stop request outranks a warning
            self.received = signum
        if signum not in self.deferred and not self.stopping:
            self.stopping = True
            raise Interrupted(signum)


_STATE = _State()


def install() -> Callable[[], None]:
    """Put the handlers in place (first thing in every stage process) and do this node's half of the handshake;
    returns a function that puts the previous handlers back (tests run several stages in one process)."""
    _STATE.received, _STATE.deferred, _STATE.stopping = None, frozenset(), False
    previous = {sig: signal.signal(sig, _STATE.handle) for sig in (WARNING, STOP)}
    signal_dir = os.environ.get(SIGNAL_DIR_ENV)
    if signal_dir:
        if "TORCHELASTIC_RUN_ID" not in os.environ:  # the process srun started on this node (workers inherit)
            with contextlib.suppress(OSError):
                Path(signal_dir, f"ready.{os.environ.get('SLURM_NODEID', '0')}").touch()
        if Path(signal_dir, "warning").exists():  # the warning came while this process was starting
            _STATE.received = _STATE.received or WARNING

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


def ignore_warning_for_children() -> None:
    """Ignore USR1 from here on (before exec'ing a launcher): an ignored disposition survives exec, so torchrun and
    the workers it starts cannot be killed by an early warning; each worker installs its handler in stage_main."""
    signal.signal(WARNING, signal.SIG_IGN)


@contextlib.contextmanager
def deferred(*signals: int) -> Iterator[None]:
    """Inside, ``signals`` are only recorded; the stage calls :func:`check` at its safe points."""
    before = _STATE.deferred
    _STATE.deferred = before | frozenset(signals)
    try:
        yield
    finally:
        _STATE.deferred = before


def received() -> int | None:
    """The signal received so far (SIGTERM if both came), or None."""
    return _STATE.received


def check(where: str = "", **metrics: Any) -> None:
    """At a safe point: raise :class:`Interrupted` if a signal was received (``where``: what is saved by now)."""
    if _STATE.received is not None:
        _STATE.stopping = True
        raise Interrupted(_STATE.received, where, **metrics)


def finish(stop: Interrupted, log: JsonLogger) -> int:
    """Log why the stage stops, leave the requeue request after a warning, and return the exit code. Signals that
    come meanwhile (the agent's SIGTERM while rank 0 asks Slurm why) are only recorded."""
    _STATE.stopping = True
    with deferred(WARNING, STOP):
        return _finish(stop, log)


def _finish(stop: Interrupted, log: JsonLogger) -> int:
    where = f" ({stop.where})" if stop.where else ""
    if stop.signum == WARNING:
        signal_dir = os.environ.get(SIGNAL_DIR_ENV)
        if signal_dir:
            with contextlib.suppress(OSError):
                Path(signal_dir, "requeue").touch()
        outcome = "requeue requested" if signal_dir else "not in a Slurm job: rerun the same command to resume"
        log.warning("preempted", f"SIGUSR1 (time limit or preemption warning){where}; {outcome}", **stop.metrics)
        return EXIT_REQUEUED
    name = signal.Signals(stop.signum).name
    if env_rank() != 0 and os.environ.get("SLURM_JOB_ID"):  # one query per job, not one per rank
        log.warning("stopped", f"{name}{where}; stopping with the other ranks (rank 0 logs why)", **stop.metrics)
        return 128 + stop.signum
    cause = stop_cause()
    if cause == "requeued":
        log.warning("requeued", f"Slurm requeued the job (scontrol requeue or preemption){where}; it will run again",
                    **stop.metrics)  # fmt: skip
    else:
        why = {"cancelled": "job cancelled", "timeout": "time limit reached", "preempted": "job preempted"}.get(
            cause or "", "stop requested"
        )
        log.warning("stopped", f"{name} ({why}){where}; exiting without requeue", **stop.metrics)
    return 128 + stop.signum


def _slurm_query(cmd: list[str]) -> str | None:
    """The query's output ("" on failure, None without the command). It starts with SIGTERM ignored (an ignored
    disposition survives exec): more SIGTERMs follow the one that stopped the stage (srun terminating the step after
    a cancel, torchrun's agent stopping its workers with killpg) and reach every process of the step, the query in
    flight included, which then answered nothing and a cancel read "stop requested"."""
    previous = signal.signal(STOP, signal.SIG_IGN)  # only while the child is forked; finish() records, not raises
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    except OSError:
        return None
    finally:
        signal.signal(STOP, previous)
    try:
        return proc.communicate(timeout=10)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return ""


def stop_cause() -> str | None:
    """Why Slurm is ending this job: ``requeued`` (the controller counts more restarts than this attempt has:
    scontrol requeue, preempt-requeue), ``cancelled``, ``timeout``, ``preempted``; None outside Slurm, without
    the Slurm commands (inside a container) or when it cannot tell. While a job ends, scontrol shows COMPLETING
    for all of these, so the restart count and sacct's state tell them apart; sacct is asked until it names an
    end state, for at most ``SACCT_SETTLE_S``."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    shown = _slurm_query(["scontrol", "-o", "show", "job", job])
    if shown is None:  # no Slurm commands here (inside a container)
        return None
    fields = dict(f.split("=", 1) for f in shown.split() if "=" in f)
    if fields.get("Restarts", "0").isdigit() and int(fields.get("Restarts", "0")) > int(
        os.environ.get("SLURM_RESTART_COUNT", "0") or 0
    ):
        return "requeued"
    causes = {"CANCELLED": "cancelled", "TIMEOUT": "timeout", "PREEMPTED": "preempted"}
    deadline = time.monotonic() + SACCT_SETTLE_S
    while True:
        state = ((_slurm_query(["sacct", "-n", "-X", "-P", "-j", job, "-o", "State"]) or "").split() or [""])[0]
        if state in causes or time.monotonic() >= deadline:
            return causes.get(state)
        time.sleep(0.5)  # accounting has not caught up yet (RUNNING) or did not answer
