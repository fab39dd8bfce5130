"""The local executor (python -m pipeline.run): the definition's stages in order, each as the same command a Slurm
job runs, stopping at the first failure; config and stage-name errors exit 2 before anything runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pipeline import definition
from pipeline import run as run_mod

REPO = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.run", *args], cwd=REPO, capture_output=True, text=True)


def test_stage_commands_are_the_stage_modules():
    args = run_mod.build_parser().parse_args(["--config", "c.yaml", "--nproc-per-node", "2", "--redo", "report",
                                              "train.lr=1e-3"])  # fmt: skip
    args.redo = {"report"}
    commands = {s.name: run_mod.stage_command(s, args)[1:] for s in definition.PIPELINE}
    assert commands["manifest"] == ["-m", "pipeline.manifest", "--config", "c.yaml", "train.lr=1e-3"]
    assert commands["cache"] == ["-m", "pipeline.cache", "--config", "c.yaml", "--nproc-per-node=2", "train.lr=1e-3"]
    assert commands["report"] == ["-m", "pipeline.report", "--config", "c.yaml", "--force", "train.lr=1e-3"]


def test_runs_in_order_and_stops_at_the_first_failure(tiny_config, tmp_path):
    config = str(tiny_config())
    out = _run("--config", config, "--stages", "report,evaluate,manifest")  # run in pipeline order
    assert out.returncode == 1, out.stderr[-2000:]
    assert "==> manifest" in out.stderr and "==> evaluate" in out.stderr and "==> report" not in out.stderr
    assert "stage evaluate exited with 1; stopping" in out.stderr
    assert "cache/_COMPLETE.json missing); evaluate/ce cannot start" in out.stderr  # the stage's own one-line error
    assert (tmp_path / "runs" / "tiny" / "manifest" / "_COMPLETE.json").is_file()
    again = _run("--config", config, "--stages", "manifest")
    assert again.returncode == 0 and "already complete" in again.stderr


def test_config_and_stage_errors_exit_2_before_any_stage(tiny_config):
    config = str(tiny_config())
    bad = _run("--config", config, "train.lrr=1")
    assert bad.returncode == 2 and "config error: train.lrr: unknown key" in bad.stderr and "==>" not in bad.stderr
    unknown = _run("--config", config, "--stages", "manifest,tokenize")
    assert unknown.returncode == 2 and "unknown stage tokenize" in unknown.stderr
