"""Preemption and time-limit handling shared by long-running stages (cache, train).

Slurm sends ``USR1`` ``signal_s`` seconds before the time limit (``#SBATCH --signal=B:USR1@300``, forwarded to the
Python process by the sbatch script) and ``TERM`` on preemption. The handler only sets a flag: the stage checks
``stop_requested`` at a safe point (train: after an optimizer step; cache: after a shard), saves its state, then
calls :func:`requeue` and exits, as datatrove's requeue handler does. Completion markers make the requeued run
resume where it stopped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading

EXIT_REQUEUED = 0  # a requeued job exits cleanly; Slurm restarts it from the top of the batch script


class PreemptionFlag:
    """Set by USR1/TERM; read by the stage loop at safe points."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM)) -> None:
        self._event = threading.Event()
        self.signal_name: str | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.signal_name = signal.Signals(signum).name
        self._event.set()

    @property
    def stop_requested(self) -> bool:
        return self._event.is_set()

    def restore(self) -> None:
        """Put the previous handlers back (tests create several flags in one process)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def slurm_job_ref() -> str | None:
    """The id ``scontrol requeue`` needs: ``<array job>_<task>`` for array tasks, else the job id."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def requeue() -> bool:
    """Ask Slurm to requeue this job; False outside Slurm (a local run just stops and is rerun by hand)."""
    ref = slurm_job_ref()
    if ref is None:
        return False
    result = subprocess.run(["scontrol", "requeue", ref], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"scontrol requeue {ref} failed: {result.stderr.strip()}")
    return True
