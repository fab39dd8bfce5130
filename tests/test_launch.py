"""pipeline.launch: the torchrun line a stage with --nproc-per-node becomes, locally and on every node of a Slurm
job (the real two-process runs are tests/test_train.py's DDP test and tests/test_slurm.py's cache job)."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from pipeline import launch
from pipeline.rundir import REPO, PipelineError, build_parser


def test_one_node_is_standalone_and_usr1_is_left_to_the_workers():
    line = launch.torchrun_argv(nproc_per_node=2, script_args=["-m", "pipeline.cache", "--config", "c.yaml"])
    assert line[1:] == [
        "-m", "pipeline.launch", "--nproc-per-node=2", "--standalone", "--max-restarts=0",
        "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT", "--shutdown-timeout=30",
        "-m", "pipeline.cache", "--config", "c.yaml",
    ]  # fmt: skip
    assert "SIGUSR1" not in " ".join(line)  # torchrun ignores the warning (it would tear the workers down)


def test_multi_node_layout_from_the_slurm_step_environment():
    env = {"SLURM_NNODES": "4", "SLURM_NODEID": "2", "MASTER_ADDR": "gpu017", "MASTER_PORT": "29517"}
    assert launch.node_layout(env) == (4, 2, "gpu017:29517")
    nnodes, node_rank, endpoint = launch.node_layout(env)
    line = " ".join(launch.torchrun_argv(nproc_per_node=8, nnodes=nnodes, node_rank=node_rank, endpoint=endpoint,
                                         shutdown_timeout_s=300, script_args=[]))  # fmt: skip
    assert "--nproc-per-node=8 --nnodes=4 --node-rank=2 --rdzv-backend=static --rdzv-endpoint=gpu017:29517" in line
    assert launch.node_layout({"SLURM_NNODES": "1"}) == (1, 0, None)
    with pytest.raises(PipelineError, match="lacks SLURM_NODEID, MASTER_ADDR"):
        launch.node_layout({"SLURM_NNODES": "2", "MASTER_PORT": "1"})


def test_who_launches():
    assert launch.wanted(2, {})
    assert not launch.wanted(1, {}) and not launch.wanted(None, {})
    assert launch.wanted(1, {"SLURM_NNODES": "2"})  # one process per node, two nodes: torchrun
    assert not launch.wanted(2, {"TORCHELASTIC_RUN_ID": "x"})  # a worker runs the stage


def test_only_distributed_stages_take_nproc_per_node():
    noop = lambda parser: None  # noqa: E731
    assert build_parser("cache", noop).parse_args(["--config", "c", "--nproc-per-node", "2"]).nproc_per_node == 2
    assert build_parser("train", noop).parse_args(["--config", "c"]).nproc_per_node is None
    with pytest.raises(SystemExit):
        build_parser("evaluate", noop).parse_args(["--config", "c", "--nproc-per-node", "2"])


def test_a_stopped_launch_exits_as_a_stop_without_a_traceback(tmp_path):
    """SIGTERM to the launcher (scancel, Ctrl-C): torchrun stops its workers and the launcher exits 143, without
    the traceback of torchrun's SignalException that would read like a crash in the job's log."""
    worker = tmp_path / "worker.py"
    worker.write_text(
        "import os, pathlib, time\n"
        f"pathlib.Path({str(tmp_path)!r}, 'ready.' + os.environ['RANK']).touch()\n"
        "time.sleep(600)\n"
    )
    line = launch.torchrun_argv(nproc_per_node=2, shutdown_timeout_s=5, script_args=[str(worker)])
    proc = subprocess.Popen(line, cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready.{rank}").exists() for rank in (0, 1)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=60)[1]
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr and "torchrun stopped its workers on SIGTERM" in stderr, stderr
