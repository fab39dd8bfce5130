"""Multi-process launches: a stage given ``--nproc-per-node N`` re-executes itself under torchrun, the same way on a
workstation and in a Slurm job.

    python -m pipeline.train --config C --nproc-per-node 2            (one node: torchrun --standalone)
    srun python -m pipeline.train --config C --nproc-per-node 8       (slurm/job.sh: one srun task per node; node k
                                                                       runs ranks 8k..8k+7, rendezvous on node 0)

Why by hand and not ``accelerate launch``: the launch must be the stage's own command line (so a Slurm job, a
container wrapper and a person at a terminal run the same thing), must read the node layout Slurm already fixed
(static rendezvous on the first node, ``SLURM_NNODES``/``SLURM_NODEID``), and must leave the time-limit warning
to the workers (torchrun forwards only SIGTERM/SIGINT/SIGHUP/SIGQUIT; USR1 reaches every process of a Slurm step
directly, and is ignored by torchrun so that a warning cannot kill it; see pipeline.preemption). What torchrun
itself does (process groups, environment, tearing the group down when a worker fails) is torchrun's.
"""

from __future__ import annotations

import os
import shlex
import sys

from pipeline import preemption

# torchrun forwards these to its workers (its default list): stop requests. USR1 is deliberately not among them.
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT"


def under_torchrun(env: dict[str, str] | None = None) -> bool:
    """Whether this process is a torchrun worker (then it runs the stage instead of launching)."""
    return "TORCHELASTIC_RUN_ID" in (os.environ if env is None else env)


def torchrun_argv(
    *,
    nproc_per_node: int,
    nnodes: int = 1,
    node_rank: int = 0,
    endpoint: str | None = None,
    shutdown_timeout_s: int = 30,
    script_args: list[str],
    python: str = sys.executable,
) -> list[str]:
    """The torchrun line (pure). One node: ``--standalone`` (a free local port, so jobs side by side on a node
    never collide). Several: static rendezvous at ``endpoint`` (host:port of node 0): Slurm has fixed the members
    and their order, so node ``node_rank`` gets ranks ``node_rank*nproc .. +nproc-1`` and nothing is elastic."""
    argv = [python, "-m", "pipeline.launch", f"--nproc-per-node={nproc_per_node}"]  # torchrun, see torchrun_main
    if nnodes == 1:
        argv.append("--standalone")
    else:
        argv += [f"--nnodes={nnodes}", f"--node-rank={node_rank}", "--rdzv-backend=static"]
        argv.append(f"--rdzv-endpoint={endpoint}")
    argv += ["--max-restarts=0", f"--signals-to-handle={TORCHRUN_SIGNALS}", f"--shutdown-timeout={shutdown_timeout_s}"]
    return argv + script_args


def node_layout(env: dict[str, str]) -> tuple[int, int, str | None]:
    """(nodes, this node's rank, rendezvous endpoint) from a Slurm step's environment (1, 0, None elsewhere).
    slurm/job.sh exports MASTER_ADDR/MASTER_PORT (the first node of the job, a port offset by the job id)."""
    nnodes = int(env.get("SLURM_NNODES", "1") or 1)
    if nnodes == 1:
        return 1, 0, None
    missing = [k for k in ("SLURM_NODEID", "MASTER_ADDR", "MASTER_PORT") if k not in env]
    if missing:
        from pipeline.rundir import PipelineError  # rundir imports this module

        raise PipelineError(
            f"--nproc-per-node on {nnodes} nodes: the environment lacks {', '.join(missing)} (slurm/job.sh exports "
            "them; run the stage through python -m pipeline.slurm submit, or export them yourself)"
        )
    return nnodes, int(env["SLURM_NODEID"]), f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}"


def wanted(nproc_per_node: int | None, env: dict[str, str] | None = None) -> bool:
    """Whether this process should launch workers rather than run the stage: several processes in all, and not
    already one of them."""
    env = os.environ if env is None else env
    if nproc_per_node is None or under_torchrun(env):
        return False
    return nproc_per_node * int(env.get("SLURM_NNODES", "1") or 1) > 1


def relaunch(nproc_per_node: int, argv: list[str], *, module: str, shutdown_timeout_s: int) -> int:
    """Replace this process by torchrun running ``python -m <module> <argv>`` on every local rank (never returns
    unless the launch line cannot be built)."""
    nnodes, node_rank, endpoint = node_layout(dict(os.environ))
    line = torchrun_argv(
        nproc_per_node=nproc_per_node,
        nnodes=nnodes,
        node_rank=node_rank,
        endpoint=endpoint,
        shutdown_timeout_s=shutdown_timeout_s,
        script_args=["-m", module, *argv],
    )
    print(f"launch: {shlex.join(line)}", file=sys.stderr, flush=True)
    preemption.ignore_warning_for_children()
    sys.stdout.flush()
    os.execv(line[0], line)
    return 1  # not reached: execv replaces the process or raises


def torchrun_main(argv: list[str]) -> int:
    """torchrun itself (``torch.distributed.run.main``), except that a stop request ends it as a stop: on SIGTERM its
    agent stops the workers (each logs why) and then raises ``SignalException``, whose traceback would land in the
    job's log at every ``scancel`` as if the launcher had crashed. Returns 128 + the signal number, like a shell."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main

    try:
        main(argv)
    except SignalException as stop:
        print(f"launch: torchrun stopped its workers on {stop.sigval.name}", file=sys.stderr, flush=True)
        return 128 + int(stop.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(torchrun_main(sys.argv[1:]))
