"""pipeline.slurm and slurm/*.sbatch: script generation and the torchrun launch line (no cluster needed), then the
chain on the real local Slurm cluster (slurm/local_cluster.sh): the tiny config end to end, a failure cancelling
everything downstream, the cache array splitting shards, preemption -> checkpoint -> requeue -> finish, cancel, and
the chain overhead. Without sbatch the cluster tests skip with the reason; with CI=true they fail instead."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import config as config_mod
from pipeline import slurm

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
STAGES = ("manifest", "cache", "train", "evaluate", "report")
# the local cluster has 2 cores: every job asks for 1 core, 1 GB, no GPU so jobs can run side by side
SMALL = {  # slurm.python unset: the jobs run the interpreter that submitted them (this venv)
    **{f"slurm.stages.{s}.{k}": v for s in STAGES for k, v in (("cpus_per_task", 1), ("mem_gb", 1))},
    **{f"slurm.stages.{s}.gpus_per_node": 0 for s in STAGES},
}


def overrides(**extra) -> list[str]:
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in {**SMALL, **extra}.items()]


# ------------------------------------------------------------------------------------------ no cluster needed
def test_multi_node_launch_line():
    """A 4-node x 8-GPU allocation: node 2 runs torchrun for 8 local ranks, rendezvous on the first node."""
    env = {"SLURM_NNODES": "4", "SLURM_NODEID": "2", "MASTER_ADDR": "gpu017", "MASTER_PORT": "29517"}
    argv = slurm.launch_argv_from_env(
        env, gpus_per_node=8, shutdown_timeout_s=300, script_args=["-m", "pipeline.train", "--config", "c.yaml"]
    )
    line = " ".join(argv[1:])
    print("launch line:", line)
    assert line == (
        "-m torch.distributed.run --nnodes=4 --node-rank=2 --nproc-per-node=8 --rdzv-backend=static "
        "--rdzv-endpoint=gpu017:29517 --max-restarts=0 --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 "
        "--shutdown-timeout=300 -m pipeline.train --config c.yaml"
    )
    cpu = slurm.launch_argv_from_env({**env, "SLURM_NNODES": "1", "SLURM_NODEID": "0"}, gpus_per_node=0,
                                     shutdown_timeout_s=60, script_args=[])  # fmt: skip
    assert "--nproc-per-node=1" in cpu and "--nnodes=1" in cpu
    with pytest.raises(slurm.PipelineError, match="SLURM_NODEID"):
        slurm.launch_argv_from_env({"SLURM_NNODES": "4"}, gpus_per_node=8, shutdown_timeout_s=1, script_args=[])


def test_launch_cli_dry_run_in_a_multi_node_environment():
    env = {**os.environ, "SLURM_NNODES": "2", "SLURM_NODEID": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "29600"}
    out = subprocess.run(
        [PY, "-m", "pipeline.slurm", "launch", "--gpus-per-node=4", "--dry-run", "--", "-m", "pipeline.train"],
        capture_output=True, text=True, env=env, cwd=REPO, check=True,
    )  # fmt: skip
    assert "--nnodes=2 --node-rank=1 --nproc-per-node=4" in out.stderr
    assert "--rdzv-endpoint=n1:29600" in out.stderr and out.stderr.rstrip().endswith("-m pipeline.train")


def _dry_run(tmp_path: Path, config: Path, extra: list[str]) -> dict:
    cfg = config_mod.load(config, extra)
    return slurm.submit(cfg, config, extra, dry_run=True)


def test_scaling_out_training_is_a_resource_change_only(tiny_config, tmp_path):
    config = tiny_config()
    one = _dry_run(tmp_path, config, overrides())
    one_script = Path(one["jobs"][2]["script"]).read_text()
    four = _dry_run(
        tmp_path, config, overrides(**{"slurm.stages.train.nodes": 4, "slurm.stages.train.gpus_per_node": 8})
    )
    four_script = Path(four["jobs"][2]["script"]).read_text()
    assert "#SBATCH --nodes=4" in four_script and "#SBATCH --gpus-per-node=8" in four_script
    assert "#SBATCH --nodes=1" in one_script and "--gpus-per-node" not in one_script.split("PIPELINE_CMD")[0]
    launch = 'run_stage srun --kill-on-bad-exit=1 "${PIPELINE_CMD[@]}"'
    assert launch in one_script and launch in four_script
    body = [line for line in four_script.splitlines() if not line.startswith(("#SBATCH", "PIPELINE_CMD="))]
    assert body == [line for line in one_script.splitlines() if not line.startswith(("#SBATCH", "PIPELINE_CMD="))]
    for job in four["jobs"]:  # every generated script is valid bash
        subprocess.run(["bash", "-n", job["script"]], check=True)


def test_chain_layout_and_resources_come_from_the_config(tiny_config, tmp_path):
    config = tiny_config()
    extra = overrides(
        **{"slurm.partition": "gpu", "slurm.account": "kd", "slurm.qos": "high", "slurm.extra_args": ["--exclusive"],
           "slurm.stages.cache.array_tasks": 4, "slurm.signal_s": 120, "slurm.stages.evaluate.time_min": 90}
    )  # fmt: skip
    record = _dry_run(tmp_path, config, extra)
    names = [(j["stage"], j["unit"]) for j in record["jobs"]]
    assert names == [("manifest", None), ("cache", None), ("train", "ce"), ("train", "kd"), ("train", "feature"),
                     ("train", "relation"), ("evaluate", None), ("report", None)]  # fmt: skip
    scripts = {(j["stage"], j["unit"]): Path(j["script"]).read_text() for j in record["jobs"]}
    for text in scripts.values():
        for line in ("--partition=gpu", "--account=kd", "--qos=high", "--exclusive", "--requeue"):
            assert f"#SBATCH {line}" in text
    assert "#SBATCH --array=0-3" in scripts[("cache", None)]
    assert "#SBATCH --time=90" in scripts[("evaluate", None)]
    assert "--signal=B:USR1@120" in scripts[("cache", None)] and "--signal=B:USR1@120" in scripts[("train", "kd")]
    # evaluate does not checkpoint: a USR1 warning would only kill it
    assert "#SBATCH --signal" not in scripts[("evaluate", None)]
    assert "trap forward_usr1 USR1" in scripts[("train", "kd")] and "trap forward_usr1" not in scripts[("report", None)]
    assert Path(record["logs_dir"], "tiny", "slurm", "submission.json").is_file()


def test_unknown_stage_resources_are_a_config_error(tiny_config, capsys):
    code = slurm.main(["submit", "--config", str(tiny_config()), "--dry-run", "slurm.stages.tokenize.nodes=1"])
    assert code == 2
    assert "slurm.stages.tokenize: unknown key" in capsys.readouterr().err


def test_only_train_spans_nodes(tiny_config, capsys):
    code = slurm.main(["submit", "--config", str(tiny_config()), "--dry-run", "slurm.stages.cache.nodes=2"])
    assert code == 2 and "slurm.stages.cache.nodes: expected 1" in capsys.readouterr().err


def test_bad_command_override_is_rejected(tiny_config, capsys):
    code = slurm.main(["submit", "--config", str(tiny_config()), "--dry-run", "--command", "train"])
    assert code == 2 and "STAGE=SHELL_COMMAND" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ the real cluster
def _cluster_problem() -> str | None:
    if shutil.which("sbatch") is None:
        return "sbatch not found: Slurm is not installed (slurm/local_cluster.sh installs and starts it)"
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, check=False)
    if "UP" not in ping.stdout:
        return f"slurmctld not responding ({ping.stdout.strip() or ping.stderr.strip()}): run make cluster"
    return None


@pytest.fixture(scope="module")
def cluster():
    problem = _cluster_problem()
    if problem:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but {problem}")
        pytest.skip(problem)


def _submit(config: Path, extra: list[str], commands: dict[str, str] | None = None) -> dict:
    cfg = config_mod.load(config, extra)
    return slurm.submit(cfg, config, extra, commands=commands)


def _wait(record: dict, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = slurm.run_status(record)
        if status["done"]:
            return status
        time.sleep(0.25)
    subprocess.run(["scancel", *[j["job_id"] for j in record["jobs"]]], check=False)
    raise AssertionError(f"chain not done after {timeout_s} s:\n{slurm.format_status(slurm.run_status(record))}")


def _spans(record: dict) -> dict[str, tuple[str, str]]:
    """(first start, last end) of each job of the record (over its array tasks), from sacct, by job label."""
    ids = [j["job_id"] for j in record["jobs"]]
    out = subprocess.run(
        ["sacct", "-n", "-P", "-X", "-j", ",".join(ids), "-o", "JobID,Start,End"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rows = [line.split("|") for line in out.splitlines() if line]
    spans = {}
    for job in record["jobs"]:
        mine = [r for r in rows if r[0].split("_")[0] == job["job_id"]]
        spans[slurm._label(job)] = (min(r[1] for r in mine), max(r[2] for r in mine))
    return spans


def _log_line(stage: str, message: str) -> str:
    """A stand-in stage command that writes one line of the stage's JSON log, as a real stage would."""
    code = (
        "import os; from pathlib import Path; from pipeline.jsonlog import open_logger; "
        f"log = open_logger('tiny', '{stage}', Path(os.environ['PIPELINE_LOGS_DIR']) / 'tiny'); "
        f"log.info('progress', '{message}', step=1); log.close()"
    )
    return f"{PY} -c {json.dumps(code)}"


STANDIN = {s: "true" for s in STAGES}


@pytest.mark.slurm
def test_chain_overhead_five_trivial_stages(cluster, tiny_config):
    """Submit to last completion for five trivial stages (one variant): the orchestration's own cost."""
    config = tiny_config()
    extra = overrides(**{"train.variants": {"ce": {}}, "train.baseline_variant": "ce"})
    t0 = time.monotonic()
    record = _submit(config, extra, STANDIN)
    status = _wait(record, 60)
    elapsed = time.monotonic() - t0
    print(f"chain overhead: {elapsed:.1f} s for 5 trivial stages (submit -> last completion)")
    assert status["complete"], slurm.format_status(status)
    spans = list(_spans(record).values())
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False)), spans  # each after the previous
    assert elapsed <= 15, f"chain overhead {elapsed:.1f} s > 15 s"


@pytest.mark.slurm
def test_failed_stage_cancels_downstream_and_status_says_which(cluster, tiny_config):
    config = tiny_config()
    commands = {**STANDIN, "manifest": f"{_log_line('manifest', 'packing done')} && sleep 1.2", "cache": "exit 3"}
    record = _submit(config, overrides(), commands)
    status = _wait(record, 60)
    states = {slurm._label(r): r["state"] for r in status["jobs"]}
    assert states["manifest"] == "COMPLETED" and states["cache"] == "FAILED"
    downstream = ["train[ce]", "train[kd]", "train[feature]", "train[relation]", "evaluate", "report"]
    assert all(states[d] == "CANCELLED" for d in downstream), states
    assert status["failed"] == ["cache"] and status["cancelled_downstream"] == downstream
    out = subprocess.run(
        [PY, "-m", "pipeline.slurm", "status", "--run", "tiny", "--logs-dir", record["logs_dir"]],
        capture_output=True, text=True, cwd=REPO, check=True,
    ).stdout  # fmt: skip
    print(out)
    assert "FAILED: cache" in out and "exit 3:0" in out
    assert "cancelled downstream (dependency never satisfied): train[ce], train[kd]" in out
    assert "packing done" in out  # the manifest's last progress line from its JSON log
    # telemetry ran beside the manifest job and wrote its summary when the stage ended
    manifest_job = record["jobs"][0]["job_id"]
    host = os.uname().nodename
    summary_path = Path(record["logs_dir"], "tiny", "manifest", f"telemetry_summary_{host}_{manifest_job}.json")
    summary = json.loads(summary_path.read_text())
    assert summary["job"] == manifest_job and summary["samples"] >= 1 and summary["duration_s"] > 0


@pytest.mark.slurm
def test_cluster_script_ensure_is_a_quick_no_op_on_a_healthy_cluster(cluster):
    t0 = time.monotonic()
    out = subprocess.run([str(REPO / "slurm" / "local_cluster.sh"), "ensure"], capture_output=True, text=True)
    assert out.returncode == 0 and "cluster healthy" in out.stderr, out.stderr
    assert time.monotonic() - t0 < 10


@pytest.mark.slurm
def test_a_refused_job_cancels_the_part_of_the_chain_already_submitted(cluster, tiny_config):
    no_gpus = (
        shutil.which("nvidia-smi") is None
        and "gres/gpu" not in subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True).stdout
    )
    if not no_gpus:
        pytest.skip("this cluster has GPUs: a GPU request would not be refused")
    extra = overrides(**{"slurm.stages.cache.gpus_per_node": 1})  # the local cluster has no GPUs
    with pytest.raises(slurm.PipelineError, match=r"cache.sbatch: sbatch refused the job.*cancelled the jobs") as err:
        _submit(tiny_config(), extra, {**STANDIN, "manifest": "sleep 30"})
    manifest_job = str(err.value).rsplit(": ", 1)[1].rstrip(")")
    deadline = time.monotonic() + 20  # slurmctld hands the job's end to slurmdbd asynchronously
    seen = ""
    while "CANCELLED" not in seen and time.monotonic() < deadline:
        time.sleep(0.2)
        seen = subprocess.run(["sacct", "-n", "-X", "-P", "-j", manifest_job, "-o", "State"], capture_output=True,
                              text=True).stdout  # fmt: skip
        seen += subprocess.run(["squeue", "-h", "-j", manifest_job, "-o", "%T"], capture_output=True, text=True).stdout
    assert "CANCELLED" in seen


@pytest.mark.slurm
def test_cancel_cancels_every_job_of_the_run(cluster, tiny_config):
    config = tiny_config()
    record = _submit(config, overrides(), {**STANDIN, "manifest": "sleep 60"})
    with pytest.raises(slurm.PipelineError, match="still has jobs queued or running"):
        _submit(config, overrides(), STANDIN)  # a second chain of the same run while the first is active
    out = subprocess.run(
        [PY, "-m", "pipeline.slurm", "cancel", "--run", "tiny", "--logs-dir", record["logs_dir"]],
        capture_output=True, text=True, cwd=REPO, check=True,
    ).stdout  # fmt: skip
    assert "cancelled 8 jobs" in out
    status = _wait(record, 30)
    assert {r["state"] for r in status["jobs"]} == {"CANCELLED"}


def _run_local(module: str, config: Path, extra: list[str]) -> None:
    subprocess.run([PY, "-m", module, "--config", str(config), *extra], cwd=REPO, check=True, capture_output=True)


@pytest.mark.slurm
@pytest.mark.slow
def test_cache_array_tasks_split_shards_disjointly(cluster, tiny_config, tmp_path):
    config = tiny_config()
    extra = overrides(**{"slurm.stages.cache.array_tasks": 3})
    _run_local("pipeline.manifest", config, extra)
    record = _submit(config, extra, {k: v for k, v in STANDIN.items() if k != "cache"})  # the real cache stage
    status = _wait(record, 240)
    assert status["complete"], slurm.format_status(status)
    cache_job = record["jobs"][1]
    assert status["jobs"][1]["counts"] == {"COMPLETED": 3}
    by_task: dict[str, set[str]] = {}
    for path in Path(record["logs_dir"], "tiny", "cache").glob("rank_*.jsonl"):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec["event"] == "shard":
                assert rec["job"] == cache_job["job_id"]
                by_task.setdefault(rec["task"], set()).add(rec["message"])
    manifest_shards = {p.name for p in (tmp_path / "runs" / "tiny" / "manifest").glob("*.parquet")}
    assert sorted(by_task) == ["0", "1", "2"]
    tasks = list(by_task.values())
    assert all(not (a & b) for i, a in enumerate(tasks) for b in tasks[i + 1 :]), by_task  # disjoint
    assert set().union(*tasks) == manifest_shards  # and together they cover every shard
    assert (tmp_path / "runs" / "tiny" / "cache" / "_COMPLETE.json").is_file()


@pytest.mark.slurm
@pytest.mark.slow
def test_training_job_preempted_checkpoints_requeues_and_finishes(cluster, tiny_config, tmp_path):
    config = tiny_config()
    extra = overrides(
        **{"train.variants": {"kd": {"ce_weight": 0.5, "response": {"weight": 0.5}}}, "train.baseline_variant": "kd",
           "train.max_steps": 40, "train.eval_every": 1000, "train.checkpoint_every": 1000}
    )  # fmt: skip
    _run_local("pipeline.manifest", config, extra)
    _run_local("pipeline.cache", config, extra)
    record = _submit(config, extra, {k: v for k, v in STANDIN.items() if k != "train"})  # the real train stage
    train_job = record["jobs"][2]["job_id"]
    log = Path(record["logs_dir"], "tiny", "train", f"rank_00000.job{train_job}.jsonl")
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:  # wait for training steps, then send the preemption warning
        if log.is_file() and '"event": "step"' in log.read_text():
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"no training step logged:\n{slurm.format_status(slurm.run_status(record))}")
    subprocess.run(["scancel", "--signal=USR1", "--batch", train_job], check=True)
    status = _wait(record, 240)
    assert status["complete"], slurm.format_status(status)
    events = [json.loads(line) for line in log.read_text().splitlines()]
    preempted = [e for e in events if e["event"] == "preempted"]
    resumed = [e for e in events if e["event"] == "resumed"]
    assert preempted and "requeued" in preempted[0]["message"], preempted
    assert resumed and resumed[0]["metrics"]["step"] == preempted[0]["metrics"]["step"]
    assert 0 < preempted[0]["metrics"]["step"] < 40
    restarts = subprocess.run(["scontrol", "show", "job", train_job], capture_output=True, text=True).stdout
    assert "Restarts=1" in restarts
    marker = json.loads((tmp_path / "runs" / "tiny" / "train" / "kd" / "_COMPLETE.json").read_text())
    assert marker["summary"]["steps"] == 40
    out = next(iter(slurm.job_outputs(record["jobs"][2])), None)
    assert out is not None and "USR1 received: forwarding to the stage" in out.read_text()


@pytest.mark.slurm
@pytest.mark.slow
def test_tiny_config_full_chain_completes_in_order(cluster, tiny_config, tmp_path):
    config = tiny_config()
    extra = overrides(**{"slurm.stages.cache.array_tasks": 2})
    record = _submit(config, extra)
    status = _wait(record, 900)
    print(slurm.format_status(status))
    assert status["complete"], slurm.format_status(status)
    spans = _spans(record)
    trains = [k for k in spans if k.startswith("train[")]
    assert len(trains) == 4
    assert spans["manifest"][1] <= spans["cache"][0]
    assert all(spans["cache"][1] <= spans[t][0] for t in trains)
    assert all(spans[t][1] <= spans["evaluate"][0] for t in trains)
    assert spans["evaluate"][1] <= spans["report"][0]
    run = tmp_path / "runs" / "tiny"
    for stage in ("manifest", "cache", "report"):
        assert (run / stage / "_COMPLETE.json").is_file(), stage
    for variant in ("ce", "kd", "feature", "relation"):
        assert (run / "train" / variant / "_COMPLETE.json").is_file(), variant
        assert (run / "evaluate" / variant / "_COMPLETE.json").is_file(), variant
    assert (run / "evaluate" / "teacher" / "_COMPLETE.json").is_file()
    assert (run / "report" / "summary.md").is_file()
    for job in record["jobs"]:  # telemetry beside every stage
        assert list(Path(record["logs_dir"], "tiny", job["stage"]).glob("telemetry_summary_*.json")), job["stage"]


def test_an_array_cancelled_before_it_was_split_keeps_its_final_state(monkeypatch):
    """sacct reports such an array only as '<job>_[0-N]'; once squeue forgets it, that line is all there is."""
    answers = {"sacct": [("758_[0]", "CANCELLED by 0", "0:0", "00:00:00", "Dependency", "None")], "squeue": []}
    monkeypatch.setattr(slurm, "_query", lambda argv: answers[argv[0]])
    assert slurm.summarize_job(slurm.slurm_states(["758"])["758"])["state"] == "CANCELLED"
    answers["sacct"] = [("759_[0-3]", "PENDING", "0:0", "00:00:00", "Dependency", "Unknown")]
    assert slurm.slurm_states(["759"])["759"] == []  # a pending range: squeue's per-task view is the one to use
