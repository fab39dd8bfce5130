"""monitor.py and pipeline.telemetry: NVML fields and units through a mocked pynvml (this machine has no GPU), the
real no-NVML path, drift-free cadence, stopping on the stage's end and on SIGTERM, the summary, and its CPU cost."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import monitor
from pipeline.jsonlog import JsonLogger
from pipeline.telemetry import (
    MJ_PER_WH,
    Gpus,
    Summary,
    decode_throttle,
    merge_series,
    merge_summaries,
    next_deadline,
    open_gpus,
)

REPO = Path(__file__).resolve().parent.parent
SCHEMA = ["ts", "level", "run", "stage", "job", "task", "host", "rank", "event", "message", "metrics"]


class FakeNvml:
    """pynvml's API surface used by pipeline.telemetry, for two GPUs; GPU 1 is an older card without the energy
    counter and temperature sensor (NVML raises NOT_SUPPORTED there)."""

    NVML_TEMPERATURE_GPU = 0
    NVML_CLOCK_SM = 1

    class NVMLError(Exception):
        pass

    def __init__(self, energy_step_mj: float = MJ_PER_WH, fail_init: bool = False):
        self.energy_mj = [5_000_000.0, None]
        self.energy_step_mj = energy_step_mj
        self.fail_init = fail_init
        self.shutdown = False

    def nvmlInit(self):
        if self.fail_init:
            raise self.NVMLError("NVML Shared Library Not Found")

    def nvmlShutdown(self):
        self.shutdown = True

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetUUID(self, h):
        return f"GPU-0000-{h}"

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA H100 80GB HBM3"  # older pynvml returns bytes

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=[90, 30][h], memory=10)

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(used=[40e9, 20e9][h], total=80e9, free=0)

    def nvmlDeviceGetPowerUsage(self, h):
        return [350_000, 300_000][h]  # milliwatts

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        if self.energy_mj[h] is None:
            raise self.NVMLError("Not Supported")
        value = self.energy_mj[h]
        self.energy_mj[h] += self.energy_step_mj  # each read: one more Wh consumed
        return value

    def nvmlDeviceGetTemperature(self, h, sensor):
        if h == 1:
            raise self.NVMLError("Not Supported")
        return 71

    def nvmlDeviceGetClockInfo(self, h, kind):
        assert kind == self.NVML_CLOCK_SM
        return 1980

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        return [0x4 | 0x40, 0x0][h]


def test_gpu_sample_fields_and_units():
    gpus = Gpus(FakeNvml())
    first = gpus.sample(0.0)
    second = gpus.sample(36.0)
    g0, g1 = second
    assert g0["index"] == 0 and g0["uuid"] == "GPU-0000-0" and g0["name"] == "NVIDIA H100 80GB HBM3"
    assert g0["util_pct"] == 90 and g0["mem_used_gb"] == 40.0 and g0["mem_total_gb"] == 80.0
    assert g0["power_w"] == 350.0 and g0["temp_c"] == 71 and g0["sm_clock_mhz"] == 1980
    assert g0["throttle"] == ["sw_power_cap", "hw_thermal_slowdown"] and g1["throttle"] == []
    # millijoules -> Wh: the fake counter grows 3.6e6 mJ (= 1 Wh) per read; the reference was read at start
    assert first[0]["energy_wh"] == pytest.approx(1.0) and g0["energy_wh"] == pytest.approx(2.0)
    # no energy counter: power integrated over time, 300 W for 36 s = 3 Wh; unsupported temperature -> None
    assert g1["energy_wh"] == pytest.approx(300 * 36 / 3600) and g1["temp_c"] is None


def test_throttle_mask_decoding():
    assert decode_throttle(0) == []
    assert decode_throttle(0x1 | 0x8) == ["gpu_idle", "hw_slowdown"]
    assert decode_throttle(0x10000) == ["0x10000"]


def test_without_nvml_the_reason_is_returned():
    gpus, reason = open_gpus(FakeNvml(fail_init=True))
    assert gpus is None and "NVML unavailable" in reason and "host metrics continue" in reason
    real, real_reason = open_gpus()  # the real pynvml: this machine has no driver
    if real is not None:
        real.close()
        pytest.skip("a real NVML is present here")
    assert "NVML unavailable" in real_reason


def test_summary_aggregates():
    s = Summary(started=0.0)
    for util, mem, cpu in ((80, 30.0, 10.0), (100, 50.0, 30.0)):
        gpus = [{"util_pct": util, "mem_used_gb": mem, "power_w": 300.0, "energy_wh": 2.0},
                {"util_pct": util - 40, "mem_used_gb": mem / 2, "power_w": 100.0, "energy_wh": 1.0}]  # fmt: skip
        s.add({"cpu_util_pct": cpu, "ram_used_gb": cpu / 10, "ram_total_gb": 8.0, "gpus": gpus})
    r = s.result(now=10.0)
    assert r["duration_s"] == 10.0 and r["samples"] == 2 and r["gpu_count"] == 2
    assert r["gpu_util_mean"] == pytest.approx(((80 + 40) / 2 + (100 + 60) / 2) / 2)
    assert r["gpu_util_max"] == 100 and r["gpu_mem_peak_gb"] == 50.0 and r["energy_wh"] == 3.0
    assert r["cpu_util_mean"] == 20.0 and r["cpu_util_max"] == 30.0 and r["power_mean_w"] == 400.0
    host_only = Summary(started=0.0)
    host_only.add({"cpu_util_pct": 5.0, "ram_used_gb": 1.0, "ram_total_gb": 8.0})
    assert host_only.result(now=1.0)["energy_wh"] is None and host_only.result(now=1.0)["gpu_util_mean"] is None


def node(host: str, start: float, seconds: float, util: float, power: float, gpus: int = 8, **extra) -> dict:
    """A monitor summary of one host: ``gpus`` GPUs at ``util`` % drawing ``power`` W together."""
    return {"host": host, "started_at": start, "duration_s": seconds, "gpu_count": gpus, "gpu_util_mean": util,
            "gpu_util_max": util + 3, "power_mean_w": power, "energy_wh": power * seconds / 3600, "samples": seconds,
            "cpu_util_mean": 10.0, "gpu_uuids": [f"{host}-gpu{i}" for i in range(gpus)], **extra}  # fmt: skip


def test_merged_summaries_of_concurrent_nodes_add_gpus_and_power_and_span_the_wall_clock():
    # the numbers: two 8-GPU nodes of one job, 3600 s side by side, at 20 % / 1000 W and 95 % / 5000 W
    merged = merge_summaries([node("a", 1000.0, 3600, 20.0, 1000.0), node("b", 1002.0, 3598, 95.0, 5000.0)])
    assert merged["gpu_count"] == 16 and merged["duration_s"] == 3600 and merged["hosts"] == 2
    assert merged["gpu_util_mean"] == pytest.approx((20 * 3600 + 95 * 3598) / (3600 + 3598))
    assert merged["power_mean_w"] == pytest.approx(6000, rel=1e-3) and merged["energy_wh"] == pytest.approx(6000, 1e-3)
    assert merged["gpu_hours"] == pytest.approx(16, rel=1e-3) and merged["gpu_util_max"] == 98


def test_merged_summaries_of_a_requeued_job_do_not_double_count():
    # the same node twice (a requeue after an hour in the queue), then an array task elsewhere at the same time
    first, second = node("a", 0.0, 3600, 50.0, 2000.0), node("a", 7200.0, 3600, 70.0, 3000.0)
    merged = merge_summaries([first, second])
    assert merged["gpu_count"] == 8 and merged["duration_s"] == 10800 and merged["busy_s"] == 7200
    assert merged["power_mean_w"] == pytest.approx(2500) and merged["gpu_util_mean"] == pytest.approx(60)
    assert merged["gpu_hours"] == pytest.approx(16) and merged["energy_wh"] == pytest.approx(5000)
    merged = merge_summaries([first, second, node("b", 7200.0, 3600, 90.0, 4000.0)])
    assert merged["gpu_count"] == 16 and merged["power_mean_w"] == pytest.approx((2000 + 3000 + 4000) / 2)
    # older summaries without UUIDs: the most GPUs a host showed, summed over hosts
    legacy = [{k: v for k, v in s.items() if k != "gpu_uuids"} for s in (first, second, node("b", 0.0, 10, 1, 1))]
    assert merge_summaries(legacy)["gpu_count"] == 16
    host_only = merge_summaries([{"host": "c", "duration_s": 5.0, "cpu_util_mean": 40.0, "gpu_count": 0}])
    assert "gpu_count" not in host_only and host_only["cpu_util_mean"] == 40.0 and merge_summaries([]) == {}


def test_merged_series_add_power_of_out_of_phase_monitors():
    a = [{"t": 100.0 + i, "gpu_util_pct": 20.0, "gpu_count": 8, "gpu_power_w": 1000.0} for i in range(10)]
    b = [{"t": 100.4 + i, "gpu_util_pct": 95.0, "gpu_count": 8, "gpu_power_w": 5000.0} for i in range(5)]
    merged = merge_series([a, b], 1.0)
    assert [p["t"] for p in merged] == [100.0 + i for i in range(10)]
    both = merged[1:5]  # b's first sample (100.4) counts from t = 101 on; it ended at 104.4
    assert all(p["gpu_power_w"] == 6000 and p["gpu_count"] == 16 for p in both)
    assert all(p["gpu_util_pct"] == pytest.approx(57.5) for p in both)
    assert merged[0]["gpu_power_w"] == 1000 and merged[-1]["gpu_power_w"] == 1000  # b only within 2 intervals
    assert merge_series([[], []], 1.0) == []


def test_next_deadline_skips_overrun_ticks():
    assert next_deadline(10.0, 1.0, 10.2) == 11.0
    assert next_deadline(10.0, 1.0, 13.5) == 14.0  # a 3.5 s stall skips ticks instead of bunching them


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


class SlowGpus:
    """Each sample costs 30 ms of (fake) time; the sample times are what the test checks."""

    def __init__(self, clock, cost=0.03):
        self.clock, self.cost, self.times = clock, cost, []

    def sample(self, now):
        self.times.append(now)
        self.clock.t += self.cost
        return []


class FakeStop:
    """stop.wait(timeout) that advances the fake clock and says stop after ``ticks`` waits."""

    def __init__(self, clock, ticks):
        self.clock, self.ticks, self.waits = clock, ticks, 0

    def wait(self, timeout):
        self.clock.t += timeout
        self.waits += 1
        return self.waits >= self.ticks


def test_cadence_is_fixed_and_does_not_drift(tmp_path):
    clock = FakeClock()
    gpus = SlowGpus(clock)
    log = JsonLogger("r", "train", tmp_path / "t.jsonl", console=False)
    result = monitor.monitor(log, interval_s=0.5, stop=FakeStop(clock, 40), gpus=gpus, clock=clock)
    offsets = [t - 100.0 for t in gpus.times]
    # a sleep(interval) loop would drift by 30 ms per sample (1.2 s after 40); deadlines keep every tick exact
    assert offsets == pytest.approx([0.5 * k for k in range(40)], abs=1e-9)
    assert result["samples"] == 40 and result["duration_s"] == pytest.approx(20.0)
    lines = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert [line["event"] for line in lines].count("telemetry") == 40 and lines[-1]["event"] == "telemetry_summary"
    assert all(list(line) == SCHEMA for line in lines)


def test_the_first_cpu_sample_is_measured_over_a_real_window(monkeypatch):
    """psutil's CPU share is relative to the previous call; the first sample has none, and a share over the few
    microseconds since a reference taken just before is 0 or 100. It is measured over a real window instead."""
    import psutil

    from pipeline import telemetry

    windows, real = [], psutil.cpu_percent

    def spy(interval=None, percpu=False):
        windows.append(interval)
        return real(interval=interval)

    monkeypatch.setattr(telemetry.psutil, "cpu_percent", spy)
    clock = FakeClock()
    log = JsonLogger("r", "train", None, console=False)
    started = time.monotonic()
    result = monitor.monitor(log, interval_s=0.5, stop=FakeStop(clock, 3), gpus=None, clock=clock)
    assert windows == [monitor.FIRST_CPU_WINDOW_S, None, None] and time.monotonic() - started >= 0.1
    assert 0 <= result["cpu_util_max"] <= 100 and result["samples"] == 3


def test_a_sample_slower_than_the_interval_skips_ticks(tmp_path):
    clock = FakeClock()
    gpus = SlowGpus(clock, cost=1.2)
    log = JsonLogger("r", "train", None, console=False)
    monitor.monitor(log, interval_s=0.5, stop=FakeStop(clock, 3), gpus=gpus, clock=clock)
    assert [t - 100.0 for t in gpus.times] == pytest.approx([0.0, 1.5, 3.0])


def _run_monitor(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO / "monitor.py"), "--run", "r", "--stage", "cache", "--logs-dir", str(tmp_path),
         *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_cli_stops_when_the_stage_ends_and_writes_the_summary(tmp_path):
    stage = subprocess.Popen(["sleep", "4"])  # long enough that a slow monitor start (loaded CI) still sees > 1 s
    env = {"SLURM_JOB_ID": "778", "SLURM_ARRAY_JOB_ID": "777", "SLURM_ARRAY_TASK_ID": "3"}
    t0 = time.monotonic()
    proc = _run_monitor(tmp_path, "--interval", "0.2", "--pid", str(stage.pid), env=env)
    stage.wait()
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0 and time.monotonic() - t0 < 15
    assert err.count("NVML unavailable") == 1  # one clear warning, then host metrics only
    host = socket.gethostname()
    lines = [
        json.loads(x) for x in (tmp_path / "r" / "cache" / f"telemetry_{host}_777_3.jsonl").read_text().splitlines()
    ]
    samples = [x for x in lines if x["event"] == "telemetry"]
    assert len(samples) >= 3
    for x in samples:
        assert list(x) == SCHEMA and (x["run"], x["stage"], x["job"], x["task"], x["host"]) == (
            "r",
            "cache",
            "777",
            "3",
            host,
        )
        assert (
            0 <= x["metrics"]["cpu_util_pct"] <= 100 and 0 < x["metrics"]["ram_used_gb"] < x["metrics"]["ram_total_gb"]
        )
    assert [x["event"] for x in lines].count("nvml_unavailable") == 1
    summary = json.loads((tmp_path / "r" / "cache" / f"telemetry_summary_{host}_777_3.json").read_text())
    assert summary["job"] == "777" and summary["task"] == "3" and summary["samples"] == len(samples)
    assert 1.0 < summary["duration_s"] < 12 and summary["energy_wh"] is None and summary["gpu_count"] == 0
    assert summary["restart"] == 0


def test_a_requeued_attempt_writes_its_own_summary(tmp_path):
    stage = subprocess.Popen(["sleep", "0.5"])
    proc = _run_monitor(tmp_path, "--interval", "0.2", "--pid", str(stage.pid),
                        env={"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "1"})  # fmt: skip
    stage.wait()
    proc.communicate(timeout=20)
    path = tmp_path / "r" / "cache" / f"telemetry_summary_{socket.gethostname()}_42_restart1.json"
    assert json.loads(path.read_text())["restart"] == 1


def test_cli_ignores_usr1_and_stops_cleanly_on_sigterm(tmp_path):
    proc = _run_monitor(tmp_path, "--interval", "0.2")
    log = tmp_path / "r" / "cache" / f"telemetry_{socket.gethostname()}_local.jsonl"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not (log.is_file() and '"telemetry"' in log.read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # the stage's preemption warning: not for the monitor
    time.sleep(0.5)
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert json.loads(log.read_text().splitlines()[-1])["event"] == "telemetry_summary"
    assert (log.parent / f"telemetry_summary_{socket.gethostname()}_local.json").is_file()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@pytest.mark.slow
def test_cpu_cost_below_one_percent_of_a_core_at_1s(tmp_path):
    proc = _run_monitor(tmp_path, "--interval", "1")
    try:
        time.sleep(2.0)  # past interpreter start-up and imports: measure the steady state
        c0, t0 = _cpu_seconds(proc.pid), time.monotonic()
        time.sleep(10.0)
        c1, t1 = _cpu_seconds(proc.pid), time.monotonic()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)
    share = (c1 - c0) / (t1 - t0)
    print(f"monitor CPU cost at 1 s interval: {100 * share:.2f} % of a core")
    assert share < 0.01


def test_sample_loop_survives_a_real_stop_event(tmp_path):
    """The real Event/clock path: stop from another thread ends the loop within one interval."""
    stop = threading.Event()
    log = JsonLogger("r", "train", None, console=False)
    threading.Timer(0.3, stop.set).start()
    t0 = time.monotonic()
    result = monitor.monitor(log, interval_s=5.0, stop=stop, gpus=Gpus(FakeNvml()))
    assert time.monotonic() - t0 < 3 and result["samples"] == 1 and result["gpu_count"] == 2
