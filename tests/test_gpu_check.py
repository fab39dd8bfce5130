"""``make gpu-check`` where there is no GPU: it refuses with a clear message and exit 2, and its ``--cpu-smoke`` mode
runs the whole prepared sequence (real manifest, cache and FSDP train stages as subprocesses, telemetry files, bench
rows) on tiny shapes, so the script a GPU session will spend its device minutes on has already run end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from pipeline import gpu_check
from tests.conftest import REPO


def test_without_a_gpu_it_exits_2_with_a_clear_message_and_a_report(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path)]) == gpu_check.EXIT_NO_GPU == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU visible" in err and "nothing was run" in err and "--cpu-smoke" in err
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["status"] == "no_gpu" and report["checks"] == {} and "no CUDA GPU" in report["error"]


def test_peak_table_and_check_outcomes(tmp_path):
    assert gpu_check.peak_tflops("NVIDIA H200") == 989.0 and gpu_check.peak_tflops("Some GPU") is None
    report = gpu_check.Report(tmp_path / "r.json", "test")

    def broken() -> dict:
        raise ValueError("boom")

    def not_here() -> dict:
        raise gpu_check.Skip("one GPU")

    assert not report.run("a", broken) and report.run("b", lambda: {"x": 1})
    assert not report.run("c", not_here) and not report.run("d", lambda: {}, needs=("a", "b"))
    saved = json.loads((tmp_path / "r.json").read_text())["checks"]
    assert saved["a"]["status"] == "fail" and "ValueError: boom" in saved["a"]["error"]
    assert saved["b"] == {"status": "pass", "x": 1, "seconds": saved["b"]["seconds"]}
    assert saved["c"] == {"status": "skipped", "reason": "one GPU", "seconds": saved["c"]["seconds"]}
    assert saved["d"]["reason"] == "needs a"


@pytest.mark.slow
def test_cpu_smoke_runs_every_check_through_the_real_stages(tmp_path, tiny_assets):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pipeline.gpu_check", "--cpu-smoke", "--out", str(tmp_path),
           "--text", str(tiny_assets["corpus"])]  # fmt: skip
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    checks = report["checks"]
    assert report["status"] == "pass"
    assert sorted(checks) == sorted(["environment", "cache_bf16", "parallel", "train_fsdp", "telemetry", "bench"])
    assert {name: c["status"] for name, c in checks.items() if c["status"] != "pass"} == {
        "parallel": "skipped", "telemetry": "skipped"}  # fmt: skip
    assert "needs 2 or more" in checks["parallel"]["reason"] and "no NVML" in checks["telemetry"]["reason"]
    cache = checks["cache_bf16"]
    assert cache["tokens"] > 0 and cache["tokens_per_s"] > 0 and cache["logprob_abs_diff_max"] < 0.01
    train = checks["train_fsdp"]
    assert train["steps"] == gpu_check.SMOKE.train_steps and "__0_0.distcp" in train["sharded_checkpoint"]
    assert {row["key"] for row in checks["bench"]["rows"]} >= {"extraction", "reader", "kd_response"}
    assert "random-init" in report["assets"]["teacher_note"]
