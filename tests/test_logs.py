"""pipeline.logs: merged, filtered, pretty-printed tail of a run's JSON logs; following; the overview screen."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

from pipeline import logs
from pipeline.jsonlog import JsonLogger, open_logger

REPO = Path(__file__).resolve().parent.parent


def _write_run(root: Path) -> Path:
    """A run with two stages, a warning, an error and a telemetry file (as monitor.py writes it)."""
    run = root / "tiny"
    m = open_logger("tiny", "manifest", run, rank=0)
    m.info("start", "manifest")
    m.info("complete", "manifest", rows=194)
    m.close()
    t = open_logger("tiny", "train", run, rank=0)
    t.info("step", "kd step 3/6", loss=2.5)
    t.warning("slow_io", "reading shards is slow")
    t.error("failed", "cache/train-00000.parquet: expected top_k 8, got 4")
    t.close()
    r1 = JsonLogger("tiny", "train", run / "train" / "rank_00001.jsonl", rank=1, console=False)
    r1.info("step", "kd step 3/6 on rank 1", loss=2.6)
    r1.close()
    mon = JsonLogger("tiny", "train", run / "train" / "telemetry_node7_55.jsonl", console=False)
    gpu = {"index": 0, "util_pct": 88, "mem_used_gb": 41.5, "energy_wh": 0.25}
    mon.info("telemetry", cpu_util_pct=12.0, ram_used_gb=30.0, ram_total_gb=512.0, gpus=[gpu])
    mon.close()
    return run


def _cli(root: Path, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.logs", "--run", "tiny", "--logs-dir", str(root), *args],
        capture_output=True, text=True, cwd=REPO, check=True,
    )  # fmt: skip
    return out.stdout


def test_tail_merges_stages_in_time_order_without_telemetry(tmp_path):
    _write_run(tmp_path)
    lines = _cli(tmp_path).splitlines()
    assert len(lines) == 6  # 2 manifest + 3 train rank 0 + 1 train rank 1; telemetry left out
    assert "[manifest]" in lines[0] and "start" in lines[0]
    assert any("ERROR failed: cache/train-00000.parquet" in x for x in lines)
    assert any("rank 1" in x and "loss=2.6" in x for x in lines)
    assert not any("telemetry" in x for x in lines)


def test_filters_by_stage_level_event_and_count(tmp_path):
    _write_run(tmp_path)
    assert all("[train]" in x for x in _cli(tmp_path, "--stage", "train").splitlines())
    warn = _cli(tmp_path, "--level", "warning").splitlines()
    assert len(warn) == 2 and "WARNING slow_io" in warn[0] and "ERROR failed" in warn[1]
    steps = _cli(tmp_path, "--event", "step").splitlines()
    assert len(steps) == 2 and all("step 3/6" in x for x in steps)
    last = _cli(tmp_path, "-n", "1").splitlines()
    assert len(last) == 1 and "kd step 3/6 on rank 1" in last[0]  # the newest line
    telemetry = [json.loads(x) for x in _cli(tmp_path, "--event", "telemetry", "--json").splitlines()]
    assert len(telemetry) == 1 and telemetry[0]["metrics"]["gpus"][0]["util_pct"] == 88


def test_follower_returns_only_new_complete_lines_and_new_files(tmp_path):
    run = _write_run(tmp_path)
    follower = logs.Follower(run, logs.Filter())
    assert len(follower.poll()) == 6
    assert follower.poll() == []
    path = run / "train" / "rank_00000.jsonl"
    rec = json.dumps({"ts": "2099-01-01T00:00:00.000+00:00", "level": "info", "stage": "train", "event": "step",
                      "message": "kd step 4/6", "metrics": {}})  # fmt: skip
    with open(path, "a") as fh:
        fh.write(rec[:30])  # a writer in the middle of a line
    assert follower.poll() == []
    with open(path, "a") as fh:
        fh.write(rec[30:] + "\n")
    assert [r["message"] for r in follower.poll()] == ["kd step 4/6"]
    ev = open_logger("tiny", "evaluate", run, rank=0)
    ev.info("start", "evaluate")
    ev.close()
    assert [r["stage"] for r in follower.poll()] == ["evaluate"]


def test_follow_cli_prints_lines_as_they_arrive(tmp_path):
    run = _write_run(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.logs", "--run", "tiny", "--logs-dir", str(tmp_path), "--follow",
         "--interval", "0.1", "--stage", "report"],
        stdout=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        time.sleep(1.0)
        rep = open_logger("tiny", "report", run, rank=0)
        rep.info("complete", "report written", models=5)
        rep.close()
        line = proc.stdout.readline()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert "[report] complete: report written models=5" in line


def test_overview_one_screen(tmp_path):
    _write_run(tmp_path)
    out = _cli(tmp_path, "--overview")
    print(out)
    lines = out.splitlines()
    assert len(lines) <= 24
    manifest = next(x for x in lines if x.startswith("manifest"))
    assert "complete: manifest rows=194" in manifest
    train = next(x for x in lines if x.startswith("train"))
    assert "kd step 3/6 on rank 1" in train  # the newest train line, whichever rank wrote it
    assert any("1 warnings, 1 errors" in x for x in lines)
    host = socket.gethostname()
    assert any(f"telemetry {host}" in x and "1 GPUs util 88% mem 41.5 GB energy 0.25 Wh" in x for x in lines)


def test_missing_run_is_a_clear_error(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.logs", "--run", "nope", "--logs-dir", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert out.returncode == 1 and "no logs for run 'nope'" in out.stderr
