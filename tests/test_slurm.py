"""pipeline.slurm and slurm/*.sbatch: script generation and the torchrun launch line (no cluster needed), then the
chain on the real local Slurm cluster (slurm/local_cluster.sh): the tiny config end to end, a failure cancelling
everything downstream, the cache array splitting shards, preemption -> checkpoint -> requeue -> finish, cancel, and
the chain overhead. Without sbatch the cluster tests skip with the reason; with CI=true they fail instead."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
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
def _dry_run(config: Path, extra: list[str]) -> dict:
    cfg = config_mod.load(config, extra)
    return slurm.submit(cfg, config, extra, dry_run=True)


def _shellcheck(scripts: list[str]) -> None:
    """Every rendered script is valid bash, and shellcheck-clean where shellcheck is installed (CI installs it)."""
    for script in scripts:
        subprocess.run(["bash", "-n", script], check=True)
    if shutil.which("shellcheck") is None:
        assert os.environ.get("CI", "").lower() != "true", "CI=true but shellcheck is not installed"
        return
    out = subprocess.run(["shellcheck", "-S", "warning", *scripts], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def test_scaling_out_training_is_a_resource_change_only(tiny_config):
    config = tiny_config()
    one = _dry_run(config, overrides())
    one_script = Path(one["jobs"][2]["script"]).read_text()
    four = _dry_run(config, overrides(**{"slurm.stages.train.nodes": 4, "slurm.stages.train.gpus_per_node": 8}))
    four_script = Path(four["jobs"][2]["script"]).read_text()
    assert "#SBATCH --nodes=4" in four_script and "#SBATCH --gpus-per-node=8" in four_script
    assert "#SBATCH --nodes=1" in one_script and "--gpus-per-node" not in one_script.split("PIPELINE_CMD")[0]
    launch_line = (
        'run_stage srun --kill-on-bad-exit=1 "${PIPELINE_SRUN_ARGS[@]}" "${PIPELINE_WRAPPER[@]}" "${PIPELINE_CMD[@]}"'
    )
    assert launch_line in one_script and launch_line in four_script
    assert "--nproc-per-node=8" in four_script and "--nproc-per-node=1" in one_script  # torchrun per node: launch.py
    body = [line for line in four_script.splitlines() if not line.startswith(("#SBATCH", "PIPELINE_CMD="))]
    assert body == [line for line in one_script.splitlines() if not line.startswith(("#SBATCH", "PIPELINE_CMD="))]
    _shellcheck([job["script"] for job in four["jobs"]])


def test_per_stage_resources_env_hook_and_wrapper_are_rendered(tiny_config):
    extra = overrides(**{
        "slurm.partition": "gpu", "slurm.account": "kd", "slurm.qos": "high", "slurm.constraint": "h100",
        "slurm.extra_args": ["--comment=kd"], "slurm.signal_s": 120, "slurm.mail_type": "END,FAIL",
        "slurm.setup": ["module load cuda/12.4", "source /shared/venv/bin/activate"],
        "slurm.env": {"HF_HOME": "/scratch/hf cache"}, "slurm.export": "NONE",
        "slurm.stages.manifest.partition": "cpu", "slurm.stages.report.partition": "cpu",
        "slurm.stages.report.qos": "low", "slurm.stages.cache.array_tasks": 4,
        "slurm.stages.cache.reservation": "teacher-pass", "slurm.stages.cache.exclusive": True,
        "slurm.stages.cache.setup": ["export NCCL_DEBUG=WARN"], "slurm.stages.evaluate.time": "1-02:30:00",
        "slurm.stages.train.srun_args": ["--container-image=/shared/distill.sqsh"],
        "slurm.stages.evaluate.wrapper": ["apptainer", "exec", "--nv", "/shared/distill.sif"],
    })  # fmt: skip
    record = _dry_run(tiny_config(), extra)
    names = [(j["stage"], j["unit"]) for j in record["jobs"]]
    assert names == [("manifest", None), ("cache", None), ("train", "ce"), ("train", "kd"), ("train", "feature"),
                     ("train", "relation"), ("evaluate", None), ("report", None)]  # fmt: skip
    scripts = {(j["stage"], j["unit"]): Path(j["script"]).read_text() for j in record["jobs"]}
    for (stage, _), text in scripts.items():
        for line in ("--account=kd", "--comment=kd", "--requeue", "--constraint=h100", "--mail-type=END,FAIL",
                     "--export=NONE"):  # fmt: skip
            assert f"#SBATCH {line}" in text, (stage, line)
        partition = "cpu" if stage in ("manifest", "report") else "gpu"
        assert f"#SBATCH --partition={partition}" in text and "--partition=gpu" not in text.replace(partition, "")
        hook = text.split("pipeline_setup() {")[1].split("\n}")[0]
        assert "export HF_HOME='/scratch/hf cache'" in hook and "module load cuda/12.4" in hook
        assert ("export NCCL_DEBUG=WARN" in hook) == (stage == "cache")
    assert "#SBATCH --qos=low" in scripts[("report", None)] and "#SBATCH --qos=high" in scripts[("manifest", None)]
    cache = scripts[("cache", None)]
    assert "#SBATCH --array=0-3" in cache and "#SBATCH --reservation=teacher-pass" in cache
    assert "#SBATCH --exclusive" in cache and "#SBATCH --exclusive" not in scripts[("train", "kd")]
    assert "#SBATCH --time=1-02:30:00" in scripts[("evaluate", None)]
    assert "--signal=B:USR1@120" in cache and "--signal=B:USR1@120" in scripts[("train", "kd")]
    assert "#SBATCH --signal" not in scripts[("evaluate", None)]  # evaluate does not checkpoint
    assert "PIPELINE_SRUN_ARGS=(--container-image=/shared/distill.sqsh)" in scripts[("train", "kd")]
    assert "PIPELINE_WRAPPER=(apptainer exec --nv /shared/distill.sif)" in scripts[("evaluate", None)]
    assert "PIPELINE_WRAPPER=()" in scripts[("train", "kd")]
    for text in scripts.values():  # the job shell comes first, its USR1 trap on the first line it runs
        first = next(line for line in text.splitlines() if line.strip() and not line.startswith("#"))
        assert first.startswith("trap 'PIPELINE_EARLY_WARNING=1' USR1")
    _shellcheck([job["script"] for job in record["jobs"]])
    assert Path(record["logs_dir"], "tiny", "slurm", "dry-run", "submission.json").is_file()
    assert not Path(record["logs_dir"], "tiny", "slurm", "submission.json").exists()  # a dry run is not the run


def test_a_resubmit_queues_only_what_is_not_complete(tiny_config):
    """Markers that match the config and inputs (as the stages write them) leave their units out of the chain,
    and whatever reads a unit that runs again is queued after it."""
    from pipeline import cache, manifest, train
    from pipeline.rundir import RunDir, unit_state

    config = tiny_config()
    cfg = config_mod.load(config, overrides())
    rd = RunDir.from_config(cfg)
    assert manifest.main(["--config", str(config), *overrides()]) == 0  # the real one: the cache array's plan reads it
    for spec, unit in ((cache.SPEC, None), (train.SPEC, "kd")):
        state = unit_state(spec, cfg, rd, unit)
        rd.write_marker(spec.name, unit, state, {}, {})
    record = _dry_run(config, overrides())
    assert [(c["stage"], c["unit"]) for c in record["complete"]] == [("manifest", None), ("cache", None),
                                                                     ("train", "kd")]  # fmt: skip
    jobs = {slurm._label(j): j for j in record["jobs"]}
    assert list(jobs) == ["train[ce]", "train[feature]", "train[relation]", "evaluate", "report"]
    assert jobs["train[ce]"]["after_jobs"] == [] and jobs["report"]["after_jobs"] == ["evaluate"]
    assert jobs["evaluate"]["after_jobs"] == ["train-ce", "train-feature", "train-relation"]
    assert jobs["evaluate"]["units"]["kd"].startswith("evaluate/kd has not completed")
    assert jobs["evaluate"]["units"]["ce"] == "train[ce] runs first"
    changed = _dry_run(config, overrides(**{"cache.top_k": 4}))  # the cache must be redone: all of it downstream
    assert [slurm._label(j) for j in changed["jobs"]][:2] == ["cache", "train[ce]"]
    assert changed["jobs"][0]["units"] == {"None": "cache: its configuration changed: cache.top_k (was 8, now 4)"}
    assert "#SBATCH --array=0\n" in Path(changed["jobs"][0]["script"]).read_text()  # no shard has a record
    assert [slurm.array_spec(t) for t in ([0, 1, 2, 3], [1, 3], [0, 1, 2, 5], [7])] == ["0-3", "1,3", "0-2,5", "7"]
    assert len(_dry_run(config, overrides(**{"cache.top_k": 4}))["jobs"]) == 8 - 1  # manifest still complete


def test_slurm_config_errors(tiny_config, capsys):
    cases = {
        "slurm.stages.tokenize.nodes=1": "slurm.stages.tokenize: unknown key",
        "slurm.stages.cache.nodes=2": "slurm.stages.cache.nodes: expected 1 (the cache scales out with array_tasks)",
        "slurm.stages.train.time=1h": "slurm.stages.train.time: expected str or int in sbatch --time format",
        "slurm.stages.train.time=4": "slurm.signal_s: expected fewer seconds than slurm.stages.train.time (4 = 240 s)",
        "slurm.env.HF_TOKEN=x": "slurm.env.HF_TOKEN: secrets do not belong in the config",
        "slurm.stages.cache.env={1X: y}": "slurm.stages.cache.env.1X: expected a shell variable name",
    }
    for override, message in cases.items():
        assert slurm.main(["submit", "--config", str(tiny_config()), "--dry-run", override]) == 2, override
        assert message in capsys.readouterr().err, override


def test_status_and_cancel_exit_2_on_a_config_error_and_1_without_a_record(tiny_config, capsys):
    """status and cancel read the config only for its run_name and logs_dir, with the same rules and exit codes."""
    for cmd in ("status", "cancel"):
        assert slurm.main([cmd, "--config", str(tiny_config()), "train.lrr=1"]) == 2, cmd
        assert "config error: train.lrr: unknown key" in capsys.readouterr().err
        assert slurm.main([cmd, "--config", str(tiny_config()), "slurm.signal_s=x"]) == 2, cmd
        assert 'slurm.signal_s: expected int > 0, got "x"' in capsys.readouterr().err
        assert slurm.main([cmd, "--logs-dir", "/tmp"]) == 2, cmd  # neither --run nor --config
        assert "--run: expected a run name" in capsys.readouterr().err
        assert slurm.main([cmd, "--config", str(tiny_config())]) == 1, cmd  # never submitted
        err = capsys.readouterr().err
        assert "logs/tiny/slurm/submission.json: no submission record for run 'tiny'" in err, err


def test_status_reads_every_attempt_and_one_elapsed_format(monkeypatch):
    answers = {
        "sacct": [  # a job that ran, was requeued and completed; one that never ran
            ("41", "REQUEUED", "0:0", "00:00:07", "None", "2026-01-01T10:00:05", "2026-01-01T10:00:00"),
            ("41", "COMPLETED", "0:0", "1-00:00:14", "None", "2026-01-01T10:01:00", "2026-01-01T10:00:30"),
            ("42", "CANCELLED by 0", "0:0", "00:00:00", "Dependency", "None", "2026-01-01T10:00:00"),
            ("44", "COMPLETED", "0:0", "00:00:00", "None", "2026-01-01T10:00:01", "2026-01-01T10:00:00"),
        ],
        "squeue": [("43", "43", "RUNNING", "None", "1:02:03")],
    }
    monkeypatch.setattr(slurm, "_query", lambda argv: answers[argv[0]])
    states = {j: slurm.summarize_job(t) for j, t in slurm.slurm_states(["41", "42", "43", "44"]).items()}
    assert states["41"]["state"] == "COMPLETED" and states["41"]["requeues"] == 1
    assert slurm.format_elapsed(states["41"]["elapsed_s"]) == "1-00:00:14"
    assert states["42"]["state"] == "CANCELLED" and not states["42"]["started"]
    assert slurm.format_elapsed(states["42"]["elapsed_s"]) == "-"  # never ran
    assert slurm.format_elapsed(states["44"]["elapsed_s"]) == "0:00:00"  # ran, for less than a second
    assert states["43"]["started"] and slurm.format_elapsed(states["43"]["elapsed_s"]) == "1:02:03"
    assert slurm.elapsed_s("05:09") == 309 and slurm.elapsed_s("2-01:00:00") == 176400


def test_status_shows_rank_0s_latest_line_and_any_ranks_error():
    """The other ranks of a torchrun stage echo rank 0 (on a stop they do not ask Slurm why); an error is shown from
    whichever rank wrote it."""
    records = [
        {"ts": "1", "rank": 0, "level": "warning", "event": "stopped", "message": "SIGTERM (job cancelled)"},
        {"ts": "2", "rank": 1, "level": "warning", "event": "stopped", "message": "SIGTERM; (rank 0 logs why)"},
    ]
    assert slurm.last_progress(records, failed=False)["rank"] == 0
    crash = {"ts": "0", "rank": 1, "level": "error", "event": "crashed", "message": "RuntimeError: boom"}
    assert slurm.last_progress([crash, *records], failed=True) is crash
    assert slurm.last_progress(records[1:], failed=False)["rank"] == 1  # no rank 0 line: whatever there is


def test_an_array_cancelled_before_it_was_split_keeps_its_final_state(monkeypatch):
    """sacct reports such an array only as '<job>_[0-N]'; once squeue forgets it, that line is all there is."""
    answers = {"sacct": [("758_[0]", "CANCELLED by 0", "0:0", "00:00:00", "Dependency", "None", "x")], "squeue": []}
    monkeypatch.setattr(slurm, "_query", lambda argv: answers[argv[0]])
    assert slurm.summarize_job(slurm.slurm_states(["758"])["758"])["state"] == "CANCELLED"
    answers["sacct"] = [("759_[0-3]", "PENDING", "0:0", "00:00:00", "Dependency", "Unknown", "x")]
    assert slurm.slurm_states(["759"])["759"] == []  # a pending range: squeue's per-task view is the one to use


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


SUBMITTED: list[str] = []  # job ids of the running test


@pytest.fixture(autouse=True)
def _cancel_leftovers():
    """A test that fails half way must not leave its jobs (perhaps a frozen stage) holding the cluster's 2 cores."""
    yield
    if SUBMITTED:
        subprocess.run(["scancel", *SUBMITTED], capture_output=True, check=False)
        SUBMITTED.clear()


def _submit(config: Path, extra: list[str], commands: dict[str, str] | None = None) -> dict:
    cfg = config_mod.load(config, extra)
    record = slurm.submit(cfg, config, extra, commands=commands)
    SUBMITTED.extend(j["job_id"] for j in record["jobs"])
    return record


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
    # srun_args (a container's --container-image): the monitor runs through srun too, and still writes its summary
    record = _submit(config, overrides(**{"slurm.stages.manifest.srun_args": ["--overlap"]}), commands)
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
    # telemetry ran beside the manifest job (through srun) and wrote its summary when the stage ended
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


def _make(target: str, config: Path, *args: str) -> subprocess.CompletedProcess:
    """A make target as a user runs it: the run (and its non-default logs_dir) found through CONFIG."""
    cmd = ["make", "-s", "--no-print-directory", target, f"CONFIG={config}", f"PY={PY}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)


@pytest.mark.slurm
def test_cancel_cancels_every_job_of_the_run(cluster, tiny_config):
    config = tiny_config()
    record = _submit(config, overrides(), {**STANDIN, "manifest": "sleep 60"})
    with pytest.raises(slurm.PipelineError, match="still has jobs queued or running.*pipeline.slurm cancel --run"):
        _submit(config, overrides(), STANDIN)  # a second chain of the same run while the first is active
    out = _make("cancel", config)  # logs_dir is tmp_path/logs: make finds it through the config
    assert out.returncode == 0 and "cancelled 8 jobs" in out.stdout, out.stderr
    status = _wait(record, 30)
    assert {r["state"] for r in status["jobs"]} == {"CANCELLED"}
    out = _make("cancel", config)  # nothing left to cancel, and it says so
    assert out.returncode == 0 and "cancelled 0 jobs of run tiny: - (8 already over:" in out.stdout, out.stdout


def _run_local(module: str, config: Path, extra: list[str], *args: str) -> None:
    subprocess.run([PY, "-m", module, "--config", str(config), *args, *extra], cwd=REPO, check=True,
                   capture_output=True)  # fmt: skip


def _wait_for(what: str, predicate, record: dict, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"no {what} after {timeout_s} s:\n{slurm.format_status(slurm.run_status(record))}")


def _events(record: dict, job: dict) -> list[dict]:
    return slurm.job_log_records(Path(record["logs_dir"]), record["run"], job["stage"], job["job_id"])


def _has_event(record: dict, job: dict, event: str) -> bool:
    return any(r["event"] == event for r in _events(record, job))


def _queued(record: dict) -> str:
    """squeue's lines for the record's jobs that are pending, running or completing (a requeued job is pending at
    once, with its id; squeue leaves out ids it no longer knows instead of failing on the list)."""
    ids = ",".join(j["job_id"] for j in record["jobs"])
    out = subprocess.run(["squeue", "-h", "-j", ids, "-o", "%i %T"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _nothing_left(record: dict, within_s: float = 60) -> dict:
    """Every job of the record is over within ``within_s``: no process of it is left that could requeue it."""
    status = _wait(record, within_s)
    assert not _queued(record), _queued(record)
    return status


def _still_nothing(record: dict, cancelled_at: float, after_s: float) -> None:
    """``after_s`` after the cancel the jobs are still over: none ran again (sacct keeps every attempt, so a
    requeued one counts), the output shows no requeue by job.sh, and nothing is queued. On this cluster a requeued
    job is pending at once and runs again ~12.5 s later (slurm/local_cluster.sh, cred_expire=10)."""
    time.sleep(max(0.0, cancelled_at + after_s - time.monotonic()))
    assert not _queued(record), _queued(record)
    status = slurm.run_status(record)
    assert status["done"] and not any(r["requeues"] for r in status["jobs"]), slurm.format_status(status)
    for job in record["jobs"]:
        assert all("requeueing job" not in out.read_text() for out in slurm.job_outputs(job)), job["output"]


def _freeze_stage(job_id: str, stage: str) -> list[int]:
    """SIGSTOP the stage processes of a running job (each torchrun worker, or the one process), which then stay
    mid-stage as a full-size teacher pass or training would for hours, until Slurm's cancel sends SIGCONT and
    SIGTERM to every process of the job: the cancel lands during the stage however fast the tiny models are and
    however slowly the test's commands start."""
    frozen = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            env, cmdline = proc.environ(), proc.info["cmdline"] or []
        except psutil.Error:
            continue
        module = cmdline[cmdline.index("-m") + 1] if "-m" in cmdline[:3] else None  # srun and torchrun: not ours
        if module == f"pipeline.{stage}" and job_id in (env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_JOB_ID")):
            proc.suspend()
            frozen.append(proc.pid)
    assert frozen, f"no pipeline.{stage} process of job {job_id}"
    return frozen


@pytest.mark.slurm
@pytest.mark.slow
def test_cancel_during_cache_resubmit_after_a_failure_and_cancel_during_train(cluster, tiny_config, tmp_path):
    """scancel stops a running stage instead of letting it requeue itself (every torchrun rank of the cache; rank 0
    alone asks Slurm why), and no job of the run is running or pending a minute later; a resubmit queues only what
    is left and keeps the earlier submissions; make status/logs/cancel find the run through its config (logs_dir
    in tmp)."""
    config = tiny_config()
    kd = {"kd": {"ce_weight": 0.5, "response": {"weight": 0.5}}}
    extra = overrides(**{"cache.batch_size": 1, "train.variants": kd, "train.baseline_variant": "kd",
                         "train.max_steps": 2000, "train.checkpoint_every": 1000})  # fmt: skip
    two_ranks = [*extra, "slurm.stages.cache.nproc_per_node=2"]  # the first cache only: torchrun starts slowly
    cache_dir = tmp_path / "runs" / "tiny" / "cache"
    # 1. cancel while the cache runs, once its first shard is written: it stops without a requeue
    first = _submit(config, two_ranks, {k: v for k, v in STANDIN.items() if k not in ("manifest", "cache")})
    cache_job = first["jobs"][1]
    _wait_for("the first cache shard", lambda: any((cache_dir / "_shards").glob("*.json")), first)
    assert len(_freeze_stage(cache_job["job_id"], "cache")) == 2  # both torchrun workers
    out = subprocess.run([PY, "-m", "pipeline.slurm", "cancel", "--config", str(config), *extra],
                         capture_output=True, text=True, cwd=REPO)  # fmt: skip
    cache_cancelled = time.monotonic()
    manifest_job = first["jobs"][0]["job_id"]
    assert out.returncode == 0 and f"cancelled 4 jobs of run tiny: {cache_job['job_id']} " in out.stdout, out
    assert f"(1 already over: {manifest_job})" in out.stdout, out.stdout  # the manifest had completed
    status = _nothing_left(first)
    row = status["jobs"][1]
    assert row["state"] == "CANCELLED" and row["requeues"] == 0, slurm.format_status(status)
    stopped = [e for e in _events(first, cache_job) if e["event"] in ("stopped", "requeued", "preempted", "crashed")]
    assert sorted((e["rank"], e["event"]) for e in stopped) == [(0, "stopped"), (1, "stopped")], stopped
    by_rank = {e["rank"]: e["message"] for e in stopped}
    assert "SIGTERM (job cancelled)" in by_rank[0] and "without requeue" in by_rank[0], by_rank
    assert "rank 0 logs why" in by_rank[1], by_rank
    shards = len(list((tmp_path / "runs" / "tiny" / "manifest").glob("*.parquet")))
    done = len(list((cache_dir / "_shards").glob("*.json")))
    assert 1 <= done < shards and not (cache_dir / "_COMPLETE.json").exists(), done  # stopped mid-cache
    # 2. resubmit: manifest is complete (not queued); the cache completes; a failing train cancels the rest
    second = _submit(config, extra, {"train": "exit 3", "evaluate": "true", "report": "true"})  # the real cache
    assert [c["stage"] for c in second["complete"]] == ["manifest"]
    assert [slurm._label(j) for j in second["jobs"]] == ["cache", "train[kd]", "evaluate", "report"]
    status = _wait(second, 240)
    assert status["failed"] == ["train[kd]"], slurm.format_status(status)
    (plan,) = [e for e in _events(second, second["jobs"][0]) if e["event"] == "plan" and e["rank"] == 0]
    assert f"{shards - done} to compute" in plan["message"], plan  # the shards written before the cancel are kept
    # 3. resubmit after the failure: only train and what follows; cancel during training
    third = _submit(config, extra, {k: v for k, v in STANDIN.items() if k != "train"})
    assert [c["stage"] for c in third["complete"]] == ["manifest", "cache"]
    assert [slurm._label(j) for j in third["jobs"]] == ["train[kd]", "evaluate", "report"]
    assert third["jobs"][0]["after"] == []  # nothing queued before it: it starts at once
    train_job = third["jobs"][0]
    _wait_for("a training step", lambda: _has_event(third, train_job, "step"), third)
    _freeze_stage(train_job["job_id"], "train")
    out = _make("status", config)
    assert out.returncode == 0 and "train[kd]" in out.stdout and "complete, not queued" in out.stdout, out.stderr
    assert _make("logs", config, "STAGE=train").stdout.count("[train]") >= 1
    out = _make("cancel", config)
    train_cancelled = time.monotonic()
    assert out.returncode == 0 and "cancelled 3 jobs" in out.stdout, out.stderr
    status = _nothing_left(third)
    assert status["jobs"][0]["state"] == "CANCELLED" and status["jobs"][0]["requeues"] == 0
    (stop,) = [e for e in _events(third, train_job) if e["event"] == "stopped"]
    assert "SIGTERM (job cancelled)" in stop["message"] and "checkpoint at step" in stop["message"], stop
    assert 0 < stop["metrics"]["step"] < 2000, stop
    assert list((tmp_path / "runs" / "tiny" / "train" / "kd" / "checkpoints").glob("step_*"))
    slurm_dir = tmp_path / "logs" / "tiny" / "slurm"  # every submission kept: scripts, outputs, record
    assert sorted(p.name for p in slurm_dir.glob("[0-9][0-9][0-9]")) == ["001", "002", "003"]
    assert (slurm_dir / "001" / "cache.sbatch").is_file() and (slurm_dir / "002" / "train-kd.sbatch").is_file()
    assert json.loads((slurm_dir / "submission.json").read_text())["submission"] == "003"
    # a minute after the cache's cancel nothing of that chain came back; the train job neither, 15 s after its own
    _still_nothing(first, cache_cancelled, 60)
    _still_nothing(third, train_cancelled, 15)


@pytest.mark.slurm
@pytest.mark.slow
def test_cache_job_launches_torchrun_and_array_tasks_split_shards(cluster, tiny_config, tmp_path):
    config = tiny_config()
    extra = overrides(**{"slurm.stages.cache.array_tasks": 2, "slurm.stages.cache.nproc_per_node": 2})
    _run_local("pipeline.manifest", config, extra)
    record = _submit(config, extra, {k: v for k, v in STANDIN.items() if k != "cache"})  # the real cache stage
    assert [slurm._label(j) for j in record["jobs"]][0] == "cache"  # the manifest is complete: not queued
    status = _wait(record, 300)
    assert status["complete"], slurm.format_status(status)
    cache_job = record["jobs"][0]
    assert status["jobs"][0]["counts"] == {"COMPLETED": 2}
    assert "--nproc-per-node=2" in Path(cache_job["script"]).read_text()
    for out in slurm.job_outputs(cache_job):  # each task's stage re-executed itself as torchrun with 2 processes
        assert "pipeline.launch --nproc-per-node=2 --standalone" in out.read_text()
    by_task: dict[str, set[str]] = {}
    ranks = set()
    for rec in _events(record, cache_job):
        ranks.add((rec["task"], rec["rank"]))
        if rec["event"] == "shard":
            by_task.setdefault(rec["task"], set()).add(rec["message"])
    assert ranks == {("0", 0), ("0", 1), ("1", 0), ("1", 1)}
    manifest_shards = {p.name for p in (tmp_path / "runs" / "tiny" / "manifest").glob("*.parquet")}
    assert sorted(by_task) == ["0", "1"]
    assert not (by_task["0"] & by_task["1"]), by_task  # disjoint
    assert by_task["0"] | by_task["1"] == manifest_shards  # and together they cover every shard
    cache_dir = tmp_path / "runs" / "tiny" / "cache"
    assert (cache_dir / "_COMPLETE.json").is_file()
    # a shard of task 1 lost: the resubmit queues array task 1 alone (task 0 has nothing left), the rest after it
    lost = sorted(by_task["1"])[0]
    recorded = json.loads((cache_dir / "_shards" / lost.replace(".parquet", ".json")).read_text())["sha256"]
    (cache_dir / lost).unlink()
    one_process = overrides(**{"slurm.stages.cache.array_tasks": 2})  # torchrun is tested above; it starts slowly
    again = _submit(config, one_process, {k: v for k, v in STANDIN.items() if k != "cache"})
    cache_again = again["jobs"][0]
    assert cache_again["stage"] == "cache" and cache_again["array"] == "1", cache_again
    script = Path(cache_again["script"]).read_text()
    assert "#SBATCH --array=1\n" in script and "--task-count=2" in script and "--nproc-per-node=1" in script
    assert [slurm._label(j) for j in again["jobs"]][1:] == ["train[ce]", "train[kd]", "train[feature]",
                                                            "train[relation]", "evaluate", "report"]  # fmt: skip
    assert all(j["after_jobs"] == ["cache"] for j in again["jobs"][1:5])
    status = _wait(again, 300)
    assert status["complete"] and status["jobs"][0]["counts"] == {"COMPLETED": 1}, slurm.format_status(status)
    (plan,) = [e for e in _events(again, cache_again) if e["event"] == "plan" and e["rank"] == 0]
    assert plan["task"] == "1" and "task 1/2" in plan["message"] and "1 to compute" in plan["message"], plan
    assert hashlib.sha256((cache_dir / lost).read_bytes()).hexdigest() == recorded  # the same bytes again
    assert (cache_dir / "_COMPLETE.json").is_file()


MAX_STEPS = 1200  # enough that the requeues below happen while it trains


@pytest.mark.slurm
@pytest.mark.slow
def test_warning_at_start_external_requeue_and_warning_mid_training_all_resume(cluster, tiny_config, tmp_path):
    """USR1 right after the job starts (before the model is loaded) requeues it at once; an external scontrol
    requeue is logged as a requeue, not a crash; USR1 during training checkpoints and requeues; the run completes
    with the uninterrupted number of steps."""
    config = tiny_config()
    extra = overrides(
        **{"train.variants": {"kd": {"ce_weight": 0.5, "response": {"weight": 0.5}}}, "train.baseline_variant": "kd",
           "train.max_steps": MAX_STEPS, "train.eval_every": 1000, "train.checkpoint_every": 1000}
    )  # fmt: skip
    _run_local("pipeline.manifest", config, extra)
    _run_local("pipeline.cache", config, extra)
    record = _submit(config, extra, {k: v for k, v in STANDIN.items() if k != "train"})  # the real train stage
    train = record["jobs"][0]
    job = train["job_id"]

    def output() -> str:
        return "\n".join(p.read_text() for p in slurm.job_outputs(train))

    def steps() -> int:
        return len([e for e in _events(record, train) if e["event"] == "step"])

    # as the job starts: once the batch shell has run its first lines (a USR1 while bash itself is still starting,
    # before it has read the script's first trap, kills the job shell: sacct FAILED, WTERMSIG 10; seen under load
    # when the signal followed squeue's RUNNING by 27 ms), long before the stage has loaded anything
    _wait_for("the job shell's first line", lambda: "[job.sh] job" in output(), record)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    _wait_for("the early requeue", lambda: "requeueing job" in output(), record)
    _wait_for("training steps after the requeue", lambda: steps() > 0, record)
    subprocess.run(["scontrol", "requeue", job], check=True)  # an administrator's requeue
    _wait_for("the logged requeue", lambda: _has_event(record, train, "requeued"), record)
    _wait_for("a resumed run", lambda: _has_event(record, train, "resumed"), record)
    before = steps()
    _wait_for("more steps", lambda: steps() > before, record)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)  # the time-limit warning mid-training
    status = _wait(record, 300)
    assert status["complete"], slurm.format_status(status)
    assert status["jobs"][0]["requeues"] == 3, slurm.format_status(status)
    events = _events(record, train)
    assert not [e for e in events if e["level"] == "error"], [e for e in events if e["level"] == "error"]
    preempted = [e for e in events if e["event"] == "preempted"]
    assert all("requeue requested" in e["message"] for e in preempted), preempted
    # the early warning: requeued before anything was loaded, by the stage or (before it started) by job.sh
    assert len(preempted) == 2 and "before starting train kd" in preempted[0]["message"] or len(preempted) == 1
    mid = preempted[-1]
    assert "checkpoint at step" in mid["message"] and 0 < mid["metrics"]["step"] < MAX_STEPS, mid
    (requeued,) = [e for e in events if e["event"] == "requeued"]
    assert "Slurm requeued the job" in requeued["message"] and "checkpoint at step" in requeued["message"]
    resumed = [e["metrics"]["step"] for e in events if e["event"] == "resumed"]
    assert resumed == [requeued["metrics"]["step"], mid["metrics"]["step"]]
    marker = json.loads((tmp_path / "runs" / "tiny" / "train" / "kd" / "_COMPLETE.json").read_text())
    assert marker["summary"]["steps"] == MAX_STEPS
    assert output().count("requeueing job") == 2 and "forwarding USR1 to the stage" in output()


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
