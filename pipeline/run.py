"""The local executor: the pipeline definition (pipeline/definition.py) run in order on this machine.

    python -m pipeline.run --config C [--stages cache,train] [--nproc-per-node N] [--force | --redo report]
                           [key.path=value ...]                                     (make run CONFIG=C, make demo)

Each stage runs as its own process with exactly the command line a Slurm job runs (``python -m pipeline.<stage>
--config C [overrides]``; a distributed stage with ``--nproc-per-node N`` launches torchrun itself), so what works
here works there; the stages skip what is already complete. The run stops at the first stage that fails, or
that exits without completing (a stage stopped by a signal saves its state and exits; rerun to resume). SIGTERM
and SIGUSR1 sent to this process are passed on to the running stage; Ctrl-C reaches it from the terminal.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import signal
import subprocess
import sys

from pipeline import config as config_mod
from pipeline import definition, validate
from pipeline.config import Config, ConfigError
from pipeline.rundir import PipelineError, RunDir, cli_exit_code, unit_state


def stage_command(stage: definition.Stage, args: argparse.Namespace) -> list[str]:
    """The command of one stage (pure): the same ``python -m pipeline.<stage>`` a Slurm job runs."""
    argv = [sys.executable, "-m", f"pipeline.{stage.name}", "--config", args.config]
    if stage.distributed and args.nproc_per_node:
        argv.append(f"--nproc-per-node={args.nproc_per_node}")
    if args.force or stage.name in args.redo:
        argv.append("--force")
    return argv + args.overrides


def run_stage(argv: list[str]) -> int:
    """Run one stage process to its end, passing SIGTERM/SIGUSR1 on to it; its exit code."""
    proc = subprocess.Popen(argv)

    def forward(signum: int, frame: object) -> None:
        proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal sends it to the stage too
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def incomplete_units(cfg: Config, stage: definition.Stage) -> list[str]:
    """The units of ``stage`` that are not complete now (after its process exited 0), with the reason."""
    spec = importlib.import_module(f"pipeline.{stage.name}").SPEC
    rd = RunDir.from_config(cfg)
    out = []
    for unit in definition.units(cfg, stage.name):
        state = unit_state(spec, cfg, rd, unit)
        if not state.complete:
            out.append(f"{stage.name}{'[' + unit + ']' if unit else ''}: {state.reason}")
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML config")
    parser.add_argument("--stages", help=f"comma-separated subset, in pipeline order ({','.join(definition.STAGES)})")
    parser.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                        help="processes of each distributed stage (cache, train) under torchrun")  # fmt: skip
    parser.add_argument("--force", action="store_true", help="redo every stage run (each gets --force)")
    parser.add_argument("--redo", default="", help="comma-separated stages to redo (--force) even when complete")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, passed on to every stage")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_mod.load(args.config, args.overrides)  # a config error stops here, before any stage starts
        validate.check(cfg)  # and every rule any stage would refuse (the models' configs included)
        stages = definition.select(args.stages.split(",") if args.stages else None)
        args.redo = {s.name for s in definition.select(args.redo.split(","))} if args.redo else set()
        if args.nproc_per_node is not None and args.nproc_per_node < 1:
            raise ConfigError(f"--nproc-per-node: expected an int >= 1, got {args.nproc_per_node}")
    except ValueError as err:  # ConfigError included
        return cli_exit_code(err if isinstance(err, ConfigError) else ConfigError(f"--stages/--redo: {err}"))
    except PipelineError as err:  # a model whose config cannot be read
        return cli_exit_code(err)
    for stage in stages:
        argv_ = stage_command(stage, args)
        print(f"==> {stage.name}: {shlex.join(argv_)}", file=sys.stderr, flush=True)
        code = run_stage(argv_)
        if code != 0:
            print(f"pipeline.run: stage {stage.name} exited with {code}; stopping", file=sys.stderr)
            return code
        try:
            left = incomplete_units(cfg, stage)
        except PipelineError as err:
            return cli_exit_code(err)
        if left:
            print(f"pipeline.run: stage {stage.name} stopped before completing ({'; '.join(left)}); rerun to resume",
                  file=sys.stderr)  # fmt: skip
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
