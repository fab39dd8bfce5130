"""Run directories and the stage wrapper: markers written last, skip / --force, lineage (refusal when upstream is
missing or changed, staleness by content), atomic writes that leave no partial file, and clear errors for unwritable
outputs. Two toy stages (``up`` and ``down``) run through the real ``stage_main`` so the behaviour every stage
inherits is tested once; the real stages' lineage is tests/test_lineage.py."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
import yaml

from pipeline import config as config_mod
from pipeline import rundir, telemetry, validate
from pipeline.rundir import MARKER, PipelineError, RunDir, StageSpec, stage_main, unit_state


def write_config(tmp_path: Path, **train) -> Path:
    path = tmp_path / "c.yaml"
    data = {
        "run_name": "r",
        "runs_dir": str(tmp_path / "runs"),
        "logs_dir": str(tmp_path / "logs"),
        "teacher": {"name_or_path": "org/teacher"},
        "student": {"name_or_path": "org/student"},
        "train": train,
    }
    path.write_text(yaml.safe_dump(data))
    return path


class ToyStages:
    """``up`` writes out.txt from the config; ``down`` (per variant unit) needs ``up`` and copies it."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.fail: Exception | None = None
        self.refuse: Exception | None = None  # raised before begin_writes: a refusal after the input checks
        self.up, self.down  # noqa: B018 (defining a spec registers it: down's upstream is found by name)

    def up_run(self, cfg, rd: RunDir, ctx) -> dict:
        self.calls.append("up")
        out = rd.stage_dir("up")
        if self.refuse:
            raise self.refuse
        ctx.begin_writes()
        assert not (out / MARKER).exists(), "the marker must not exist while the stage writes"
        assert (out / "config.yaml").exists(), "the resolved config is written before the stage writes"
        rundir.atomic_write_text(out / "out.txt", f"lr={cfg.train.lr}")
        if self.fail:
            raise self.fail
        return {"rows": 3.0}

    def down_run(self, cfg, rd: RunDir, ctx) -> dict:
        self.calls.append(f"down:{ctx.unit}")
        names = rundir.declared_outputs(rd.stage_dir("up"))  # what up declares, not what is on disk
        text = "".join((rd.stage_dir("up") / name).read_text() for name in sorted(names))
        rundir.atomic_write_text(rd.stage_dir("down", ctx.unit) / "copy.txt", text)
        return {}

    @property
    def up(self) -> StageSpec:
        return StageSpec(
            name="up",
            run=self.up_run,
            sections=lambda cfg, unit: {"train.lr": cfg.train.lr, "seed": cfg.seed},
            outputs=lambda cfg, rd, unit: {"out.txt": None},
            check=validate.check_config,  # the toy models are not on disk: no model-config rules
        )

    @property
    def down(self) -> StageSpec:
        return StageSpec(
            name="down",
            run=self.down_run,
            sections=lambda cfg, unit: {f"train.variants.{unit}": cfg.train.variants[unit]},
            upstream=lambda cfg, unit: [("up", None)],
            outputs=lambda cfg, rd, unit: {"copy.txt": None},
            units=lambda cfg, args: list(cfg.train.variants),
            check=validate.check_config,
        )


@pytest.fixture
def toy():
    return ToyStages()


def test_marker_is_written_last_with_config_hash_inputs_and_summary(tmp_path, toy):
    cfg_path = write_config(tmp_path)
    assert stage_main(toy.up, ["--config", str(cfg_path)]) == 0
    out = tmp_path / "runs" / "r" / "up"
    marker = json.loads((out / MARKER).read_text())
    assert marker["stage"] == "up" and marker["unit"] is None and marker["inputs"] == {}
    assert marker["summary"]["rows"] == 3.0 and marker["summary"]["duration_s"] >= 0
    assert len(marker["config_hash"]) == 16 and marker["config"] == {"train.lr": 3e-4, "seed": 0}
    record = marker["outputs"]["out.txt"]
    assert record["sha256"] == rundir.file_sha256(out / "out.txt") and record["bytes"] == len("lr=0.0003")
    assert (out / MARKER).stat().st_mtime_ns >= (out / "out.txt").stat().st_mtime_ns
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["train"]["lr"] == 3e-4 and resolved["train"]["variants"]["kd"]["response"]["weight"] == 0.5
    log = tmp_path / "logs" / "r" / "up" / "rank_00000.jsonl"
    events = [json.loads(line)["event"] for line in log.read_text().splitlines()]
    assert events[0] == "start" and events[-1] == "complete"

    assert stage_main(toy.down, ["--config", str(cfg_path)]) == 0
    for unit in ("ce", "kd"):
        down = json.loads((tmp_path / "runs" / "r" / "down" / unit / MARKER).read_text())
        assert down["unit"] == unit
        assert down["inputs"] == {"up": rundir.output_identity(marker["outputs"])}  # up's outputs, by content
    assert toy.calls == ["up", "down:ce", "down:kd"]


def test_rerun_is_a_noop_that_says_so_and_force_redoes(tmp_path, toy, capsys):
    cfg_path = write_config(tmp_path)
    assert stage_main(toy.up, ["--config", str(cfg_path)]) == 0
    marker_before = (tmp_path / "runs" / "r" / "up" / MARKER).read_text()
    capsys.readouterr()
    assert stage_main(toy.up, ["--config", str(cfg_path)]) == 0
    assert toy.calls == ["up"]
    console = capsys.readouterr()
    assert "already complete (use --force to redo)" in console.err + console.out
    assert (tmp_path / "runs" / "r" / "up" / MARKER).read_text() == marker_before

    assert stage_main(toy.up, ["--config", str(cfg_path), "--force"]) == 0
    assert toy.calls == ["up", "up"]


def test_changed_config_section_or_upstream_redoes_only_what_depends_on_it(tmp_path, toy):
    cfg_path = write_config(tmp_path)
    assert stage_main(toy.up, ["--config", str(cfg_path)]) == 0
    assert stage_main(toy.down, ["--config", str(cfg_path)]) == 0
    # a section `up` does not hash: no-op; a variant's recipe: only that unit reruns
    assert stage_main(toy.up, ["--config", str(cfg_path), "train.max_steps=7"]) == 0
    assert stage_main(toy.down, ["--config", str(cfg_path), "train.variants.kd.ce_weight=0.7"]) == 0
    assert toy.calls == ["up", "down:ce", "down:kd", "down:kd"]
    # a changed upstream result (other output bytes) makes every downstream unit stale
    assert stage_main(toy.up, ["--config", str(cfg_path), "train.lr=1e-3"]) == 0
    assert stage_main(toy.down, ["--config", str(cfg_path), "train.lr=1e-3", "train.variants.kd.ce_weight=0.7"]) == 0
    assert toy.calls[-3:] == ["up", "down:ce", "down:kd"]
    assert (tmp_path / "runs" / "r" / "down" / "ce" / "copy.txt").read_text() == "lr=0.001"


def test_an_upstream_redone_with_identical_outputs_leaves_consumers_complete(tmp_path, toy):
    """Identities are content hashes (DVC): --force that writes the same bytes is not a change downstream."""
    cfg_path = write_config(tmp_path)
    assert stage_main(toy.up, ["--config", str(cfg_path)]) == 0
    assert stage_main(toy.down, ["--config", str(cfg_path)]) == 0
    assert stage_main(toy.up, ["--config", str(cfg_path), "--force"]) == 0
    assert stage_main(toy.down, ["--config", str(cfg_path)]) == 0
    assert toy.calls == ["up", "down:ce", "down:kd", "up"]


def test_a_consumer_of_a_stale_or_damaged_upstream_refuses_naming_it(tmp_path, toy, capsys):
    cfg_path = write_config(tmp_path)
    assert stage_main(toy.up, ["--config", str(cfg_path)]) == 0
    capsys.readouterr()
    out = tmp_path / "runs" / "r" / "up" / "out.txt"
    cases = {  # what happens to up, and the line the consumer must print
        "missing": (lambda: out.unlink(), f"up: {out} (declared in _COMPLETE.json): missing"),
        "edited": (lambda: out.write_text("lr=0.0005"), f"up: {out} (declared in _COMPLETE.json): changed since it"),
        "reconfigured": (lambda: None, "up: its configuration changed: train.lr (was 0.0003, now 0.001)"),
    }
    for name, (damage, needle) in cases.items():
        damage()
        extra = ["train.lr=1e-3"] if name == "reconfigured" else []
        assert stage_main(toy.down, ["--config", str(cfg_path), *extra]) == 1, name
        err = capsys.readouterr().err
        assert needle in err and "down/ce cannot start until up is complete: run make up first" in err, err
        assert toy.calls == ["up"], name
        rundir.atomic_write_text(out, "lr=0.0003")
    # a file whose mtime moved but whose bytes are the recorded ones is still the same output
    os.utime(out, ns=(1, 1))
    assert unit_state(toy.up, config_mod.load(cfg_path), RunDir.from_config(config_mod.load(cfg_path)), None).complete


def test_a_refused_rerun_keeps_the_finished_marker_and_config(tmp_path, toy):
    """A stage that refuses before ctx.begin_writes() leaves the finished unit exactly as it was."""
    cfg_path = write_config(tmp_path)
    assert stage_main(toy.up, ["--config", str(cfg_path)]) == 0
    out = tmp_path / "runs" / "r" / "up"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    toy.refuse = PipelineError("inputs do not fit")
    assert stage_main(toy.up, ["--config", str(cfg_path), "train.lr=1e-3"]) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert unit_state(toy.up, config_mod.load(cfg_path), RunDir.from_config(config_mod.load(cfg_path)), None).complete


def test_refuses_to_start_when_upstream_is_missing(tmp_path, toy, capsys):
    cfg_path = write_config(tmp_path)
    assert stage_main(toy.down, ["--config", str(cfg_path)]) == 1
    err = capsys.readouterr()
    message = (err.err or err.out).strip().splitlines()[-1]
    assert "up has not completed (" in message and "up/_COMPLETE.json missing); down/ce cannot start" in message
    assert "run make up first" in message
    assert toy.calls == []
    assert not (tmp_path / "runs" / "r" / "down").exists()


def test_unfinished_upstream_counts_as_missing(tmp_path, toy):
    """Outputs without a marker (a crashed or still-running upstream) are not an input."""
    cfg_path = write_config(tmp_path)
    toy.fail = PipelineError("out.txt: expected something")
    assert stage_main(toy.up, ["--config", str(cfg_path)]) == 1
    assert (tmp_path / "runs" / "r" / "up" / "out.txt").exists()
    assert not (tmp_path / "runs" / "r" / "up" / MARKER).exists()
    assert stage_main(toy.down, ["--config", str(cfg_path)]) == 1
    assert toy.calls == ["up"]


def test_failed_rerun_removes_the_stale_marker(tmp_path, toy):
    cfg_path = write_config(tmp_path)
    assert stage_main(toy.up, ["--config", str(cfg_path)]) == 0
    toy.fail = PipelineError("boom")
    assert stage_main(toy.up, ["--config", str(cfg_path), "train.lr=1e-3"]) == 1
    assert not (tmp_path / "runs" / "r" / "up" / MARKER).exists(), "an old marker must not vouch for new outputs"


def test_unexpected_exception_propagates_without_marker(tmp_path, toy):
    cfg_path = write_config(tmp_path)
    toy.fail = RuntimeError("bug")
    with pytest.raises(RuntimeError, match="bug"):
        stage_main(toy.up, ["--config", str(cfg_path)])
    assert not (tmp_path / "runs" / "r" / "up" / MARKER).exists()
    log = (tmp_path / "logs" / "r" / "up" / "rank_00000.jsonl").read_text().splitlines()
    assert json.loads(log[-1])["event"] == "crashed" and "Traceback" in json.loads(log[-1])["metrics"]["traceback"]


def test_corrupt_marker_is_a_clear_error(tmp_path):
    rd = RunDir(tmp_path / "runs" / "r", tmp_path / "logs" / "r")
    rd.stage_dir("up").mkdir(parents=True)
    rd.marker_path("up").write_text("{not json")
    with pytest.raises(PipelineError, match=r"up/_COMPLETE.json: unreadable completion marker .*rerun that stage"):
        rd.read_marker("up")


# ------------------------------------------------------------------------------------------------ atomic I/O
def test_atomic_write_failure_leaves_old_file_and_no_temp(tmp_path):
    target = tmp_path / "d" / "shard.parquet"
    rundir.atomic_write_bytes(target, b"complete v1")
    with pytest.raises(RuntimeError):
        with rundir.atomic_path(target) as tmp:
            tmp.write_bytes(b"half of v2")
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"complete v1"
    assert sorted(p.name for p in target.parent.iterdir()) == ["shard.parquet"]


def test_atomic_write_of_a_new_file_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "new.json"
    with pytest.raises(TypeError):
        rundir.atomic_write_json(target, {"x": object.__new__(type("NoJson", (), {"__str__": None}))})
    assert list(tmp_path.iterdir()) == []
    rundir.atomic_write_json(target, {"b": 1, "a": [1.5]})
    assert json.loads(target.read_text()) == {"a": [1.5], "b": 1}


def test_file_sha256_matches_hashlib(tmp_path):
    import hashlib

    data = os.urandom(3 * 1024 * 1024 + 7)
    (tmp_path / "f").write_bytes(data)
    assert rundir.file_sha256(tmp_path / "f", chunk=1 << 20) == hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------- unwritable dirs
def test_check_writable_names_the_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should be")  # fails for root too, unlike chmod
    with pytest.raises(PipelineError, match=r"file/out: output directory is not writable"):
        rundir.check_writable(blocker / "out")


def test_stage_with_unwritable_runs_dir_exits_1_and_names_it(tmp_path, toy, capsys):
    blocker = tmp_path / "runs_is_a_file"
    blocker.write_text("")
    cfg_path = write_config(tmp_path)
    assert stage_main(toy.up, ["--config", str(cfg_path), f"runs_dir={blocker}"]) == 1
    err = capsys.readouterr()
    assert "runs_is_a_file/r/up: output directory is not writable" in err.err + err.out
    assert toy.calls == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits")
def test_read_only_directory_is_not_writable(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(PipelineError, match="output directory is not writable"):
            rundir.check_writable(ro)
    finally:
        ro.chmod(0o755)


def test_local_runs_start_monitor_beside_the_stage(tmp_path, toy, monkeypatch):
    import psutil

    monkeypatch.delenv("PIPELINE_MONITOR", raising=False)  # not under the Slurm wrapper
    cfg_path = write_config(tmp_path)
    data = yaml.safe_load(cfg_path.read_text())
    cfg_path.write_text(yaml.safe_dump({**data, "monitor": {"interval_s": 0.05}}))
    plain_run = toy.up_run

    def slow_run(cfg, rd, ctx):  # long enough for several samples
        time.sleep(1.0)
        return plain_run(cfg, rd, ctx)

    toy.up_run = slow_run
    assert stage_main(toy.up, ["--config", str(cfg_path)]) == 0
    # (other children may exist in a full run, e.g. multiprocessing's resource tracker)
    monitors = [c for c in psutil.Process().children(recursive=True) if str(telemetry.MONITOR_SCRIPT) in c.cmdline()]
    assert not monitors, "the monitor is stopped and reaped with the stage"
    logs = tmp_path / "logs" / "r" / "up"
    host = socket.gethostname()
    lines = [json.loads(x) for x in (logs / f"telemetry_{host}_local.jsonl").read_text().splitlines()]
    events = [x["event"] for x in lines]
    assert events[-1] == "telemetry_summary" and events.count("telemetry") >= 3  # (+ nvml_unavailable here)
    assert {(x["run"], x["stage"]) for x in lines} == {("r", "up")}
    assert f"watching {os.getpid()}" in lines[events.index("monitor_start")]["message"]
    summary_path = logs / f"telemetry_summary_{host}_local.json"
    summary = summary_path.read_bytes()
    assert json.loads(summary)["duration_s"] > 0.1  # from the monitor's own start, ~0.15 s after the stage's

    # a rerun that skips everything must not replace the last run's telemetry with an empty one
    assert stage_main(toy.up, ["--config", str(cfg_path)]) == 0
    # under the Slurm wrapper (PIPELINE_MONITOR exported, it runs the monitor) or with the monitor off: none here
    monkeypatch.setenv("PIPELINE_MONITOR", "1")
    assert stage_main(toy.up, ["--config", str(cfg_path), "--force"]) == 0
    monkeypatch.delenv("PIPELINE_MONITOR")
    assert stage_main(toy.up, ["--config", str(cfg_path), "--force", "monitor.enabled=false"]) == 0
    assert toy.calls == ["up", "up", "up"] and summary_path.read_bytes() == summary
