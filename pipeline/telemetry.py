"""GPU (NVML) and host sampling behind ``monitor.py``: what one telemetry line and the per-stage summary hold.

A sample is a flat dict of host metrics plus ``gpus``, a list with one dict per GPU::

    cpu_util_pct, ram_used_gb, ram_total_gb,
    gpus: [{index, uuid, name, util_pct, mem_used_gb, mem_total_gb, power_w, energy_wh, temp_c, sm_clock_mhz,
            throttle}]

``energy_wh`` is the energy each GPU used since the monitor started. NVML's total-energy counter is in millijoules
(1 Wh = 3.6e6 mJ); GPUs without that counter (pre-Volta) fall back to integrating the power reading over time. A
field the GPU does not support is ``None`` rather than a failure. Without NVML (no driver, as on this development
machine) :func:`open_gpus` returns the reason and the monitor carries on with host metrics only.
"""

from __future__ import annotations

import bisect
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

if TYPE_CHECKING:
    from pipeline.config import Config
    from pipeline.jsonlog import JsonLogger

MONITOR_SCRIPT = Path(__file__).resolve().parent.parent / "monitor.py"
MJ_PER_WH = 3.6e6  # 1 Wh = 3600 J = 3.6e6 mJ
BYTES_PER_GB = 1e9

# nvmlClocksEventReason* bits (the older name is ...ThrottleReason*; same values)
THROTTLE_REASONS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}


def decode_throttle(mask: int) -> list[str]:
    """Names of the set bits of an NVML clocks-event (throttle) mask, unknown bits as hex."""
    names = [name for bit, name in THROTTLE_REASONS.items() if mask & bit]
    unknown = mask & ~sum(THROTTLE_REASONS)
    return names + ([hex(unknown)] if unknown else [])


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Gpus:
    """NVML handles of every visible GPU and the energy reference taken when monitoring started."""

    def __init__(self, nvml: Any) -> None:
        self.nvml = nvml
        self.handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
        self.static = [
            {"index": i, "uuid": _text(nvml.nvmlDeviceGetUUID(h)), "name": _text(nvml.nvmlDeviceGetName(h))}
            for i, h in enumerate(self.handles)
        ]
        self.energy_start_mj = [self._try(nvml.nvmlDeviceGetTotalEnergyConsumption, h) for h in self.handles]
        self.integrated_wh = [0.0] * len(self.handles)  # fallback when the energy counter is unsupported
        self.last_t: float | None = None

    def _try(self, fn: Any, *args: Any) -> Any:
        """One NVML query; None when this GPU does not support it (a missing field must not stop the monitor)."""
        try:
            return fn(*args)
        except self.nvml.NVMLError:
            return None

    def sample(self, now: float) -> list[dict]:
        nv = self.nvml
        dt = 0.0 if self.last_t is None else now - self.last_t
        self.last_t = now
        out = []
        for i, h in enumerate(self.handles):
            util = self._try(nv.nvmlDeviceGetUtilizationRates, h)
            mem = self._try(nv.nvmlDeviceGetMemoryInfo, h)
            power_mw = self._try(nv.nvmlDeviceGetPowerUsage, h)
            power_w = None if power_mw is None else power_mw / 1000.0
            energy_mj = self._try(nv.nvmlDeviceGetTotalEnergyConsumption, h)
            if energy_mj is not None and self.energy_start_mj[i] is not None:
                energy_wh = (energy_mj - self.energy_start_mj[i]) / MJ_PER_WH
            else:
                self.integrated_wh[i] += (power_w or 0.0) * dt / 3600.0
                energy_wh = self.integrated_wh[i]
            mask = self._try(nv.nvmlDeviceGetCurrentClocksEventReasons, h)
            out.append(
                {
                    **self.static[i],
                    "util_pct": None if util is None else util.gpu,
                    "mem_used_gb": None if mem is None else mem.used / BYTES_PER_GB,
                    "mem_total_gb": None if mem is None else mem.total / BYTES_PER_GB,
                    "power_w": power_w,
                    "energy_wh": energy_wh,
                    "temp_c": self._try(nv.nvmlDeviceGetTemperature, h, nv.NVML_TEMPERATURE_GPU),
                    "sm_clock_mhz": self._try(nv.nvmlDeviceGetClockInfo, h, nv.NVML_CLOCK_SM),
                    "throttle": None if mask is None else decode_throttle(mask),
                }
            )
        return out

    def close(self) -> None:
        self._try(self.nvml.nvmlShutdown)


def open_gpus(nvml: Any = None) -> tuple[Gpus | None, str | None]:
    """(Gpus, None) when NVML works, else (None, reason). ``nvml`` defaults to the real ``pynvml`` module."""
    try:
        if nvml is None:
            import pynvml as nvml
        nvml.nvmlInit()
    except Exception as err:  # ImportError, NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded, ...
        return None, f"NVML unavailable ({type(err).__name__}: {err}); GPU metrics off, host metrics continue"
    try:
        return Gpus(nvml), None
    except nvml.NVMLError as err:
        nvml.nvmlShutdown()
        return None, f"NVML device query failed ({err}); GPU metrics off, host metrics continue"


def host_sample(window_s: float | None = None) -> dict:
    """System-wide CPU utilisation and RAM. The CPU share is measured since the previous call (psutil keeps the
    reference), or over ``window_s`` seconds from now when given (the first sample: with no previous call the share
    over a few microseconds is 0 or 100)."""
    mem = psutil.virtual_memory()
    return {
        "cpu_util_pct": psutil.cpu_percent(interval=window_s),
        "ram_used_gb": (mem.total - mem.available) / BYTES_PER_GB,
        "ram_total_gb": mem.total / BYTES_PER_GB,
    }


@dataclass
class Summary:
    """Running aggregates of the samples; :meth:`result` is the per-stage telemetry summary."""

    started: float = field(default_factory=time.monotonic)
    samples: int = 0
    cpu_sum: float = 0.0
    cpu_max: float = 0.0
    ram_peak_gb: float = 0.0
    gpu_util_sum: float = 0.0
    gpu_util_n: int = 0
    gpu_util_max: float = 0.0
    gpu_mem_peak_gb: float = 0.0
    power_sum_w: float = 0.0
    energy_wh: list[float] = field(default_factory=list)
    gpu_count: int = 0
    gpu_uuids: list[str] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)  # wall clock: the report lines up hosts and attempts

    def add(self, sample: dict) -> None:
        self.samples += 1
        self.cpu_sum += sample["cpu_util_pct"]
        self.cpu_max = max(self.cpu_max, sample["cpu_util_pct"])
        self.ram_peak_gb = max(self.ram_peak_gb, sample["ram_used_gb"])
        gpus = sample.get("gpus") or []
        self.gpu_count = len(gpus)
        self.gpu_uuids = [g["uuid"] for g in gpus if g.get("uuid")]
        utils = [g["util_pct"] for g in gpus if g["util_pct"] is not None]
        if utils:
            # mean over GPUs per sample, then over samples: the node's average busy fraction
            self.gpu_util_sum += sum(utils) / len(utils)
            self.gpu_util_n += 1
            self.gpu_util_max = max(self.gpu_util_max, max(utils))
        mems = [g["mem_used_gb"] for g in gpus if g["mem_used_gb"] is not None]
        self.gpu_mem_peak_gb = max([self.gpu_mem_peak_gb, *mems])
        self.power_sum_w += sum(g["power_w"] or 0.0 for g in gpus)
        self.energy_wh = [g["energy_wh"] or 0.0 for g in gpus]

    def result(self, now: float | None = None) -> dict:
        n = max(self.samples, 1)
        return {
            "duration_s": round((time.monotonic() if now is None else now) - self.started, 3),
            "started_at": self.started_at,
            "samples": self.samples,
            "cpu_util_mean": self.cpu_sum / n,
            "cpu_util_max": self.cpu_max,
            "ram_peak_gb": self.ram_peak_gb,
            "gpu_count": self.gpu_count,
            "gpu_uuids": self.gpu_uuids,
            "gpu_util_mean": self.gpu_util_sum / self.gpu_util_n if self.gpu_util_n else None,
            "gpu_util_max": self.gpu_util_max if self.gpu_util_n else None,
            "gpu_mem_peak_gb": self.gpu_mem_peak_gb if self.gpu_count else None,
            "power_mean_w": self.power_sum_w / n if self.gpu_count else None,
            "energy_wh": sum(self.energy_wh) if self.gpu_count else None,
        }


def next_deadline(start: float, interval: float, now: float) -> float:
    """The first tick ``start + k * interval`` after ``now``: a fixed cadence that never drifts, and a slow sample
    skips the ticks it overran instead of shifting every later one."""
    k = math.floor((now - start) / interval) + 1
    return start + k * interval


# ------------------------------------------------------------------------------------------- local lifecycle
class LocalMonitor:
    """The monitor's lifecycle beside a stage that runs outside the Slurm job shell (slurm/job.sh exports
    ``PIPELINE_MONITOR`` and starts one per node itself): one per node (local rank 0), started with the first unit
    that really runs, so a rerun that skips everything leaves the last run's telemetry summary alone; stopped when
    the stage ends (and by itself, through ``--pid``, if the stage is killed). Telemetry never fails a stage: a
    monitor that cannot start is a warning."""

    def __init__(self, cfg: Config, stage: str, logs_dir: Path, log: JsonLogger) -> None:
        wanted = cfg.monitor.enabled and "PIPELINE_MONITOR" not in os.environ
        wanted = wanted and os.environ.get("LOCAL_RANK", "0") == "0"
        self.log = log
        self.process: subprocess.Popen | None = None
        self.command = None
        if wanted:
            self.command = [sys.executable, str(MONITOR_SCRIPT), "--run", cfg.run_name, "--stage", stage]
            self.command += ["--logs-dir", str(logs_dir), "--interval", str(cfg.monitor.interval_s)]
            self.command += ["--pid", str(os.getpid())]

    def start(self) -> None:
        if self.command is None or self.process is not None:
            return
        try:  # its warnings (no NVML on this machine) are in its own log; keep the stage's console clean
            self.process = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        except OSError as err:
            self.command = None
            self.log.warning("monitor_failed", f"{MONITOR_SCRIPT} did not start ({err}); no telemetry for this run")

    def stop(self) -> None:
        """SIGTERM (the monitor writes its summary and exits), SIGKILL if it has not after 10 s."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


# ------------------------------------------------------------------------------ merging across hosts and jobs
def _busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end] intervals (time during which at least one of them ran)."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def merge_summaries(summaries: list[dict]) -> dict:
    """One stage's telemetry from the summaries of every monitor that watched it: the nodes of a job, the tasks of
    an array, the attempts of a requeued job (one file each, see monitor.py).

    Each summary i covers one host for d_i seconds from ``started_at`` (wall clock; a file without it counts as
    starting with the others) with n_i GPUs:

    - ``duration_s``: wall span, first start to last end (concurrent jobs do not add up); ``busy_s`` the time at
      least one of them ran (the span without the gaps between attempts)
    - ``gpu_count``: distinct GPUs (by UUID; files without UUIDs: the most any file of a host saw, summed over hosts);
      ``gpu_hours`` = sum n_i d_i / 3600
    - ``gpu_util_mean`` = sum u_i n_i d_i / sum n_i d_i: the mean over every GPU and all time
    - ``power_mean_w`` = sum p_i d_i / busy_s: GPUs of concurrent hosts add, sequential attempts do not
    - ``cpu_util_mean``: mean over hosts and time; ``energy_wh``, ``samples``: sums; maxima and peaks: maxima
    """
    if not summaries:
        return {}

    def num(summary: dict, key: str) -> float | None:
        value = summary.get(key)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    first = min((t for s in summaries if (t := num(s, "started_at")) is not None), default=0.0)
    rows = []
    for s in summaries:
        start, seconds = num(s, "started_at"), num(s, "duration_s") or 0.0
        start = first if start is None else start
        rows.append({"s": s, "start": start, "end": start + seconds, "d": seconds, "n": int(num(s, "gpu_count") or 0)})
    busy = _busy_seconds([(r["start"], r["end"]) for r in rows])
    merged: dict[str, Any] = {
        "duration_s": max(r["end"] for r in rows) - min(r["start"] for r in rows),
        "busy_s": busy,
        "files": len(rows),
        "hosts": len({r["s"].get("host") for r in rows}),
        "samples": sum(num(r["s"], "samples") or 0 for r in rows),
    }
    for key in ("cpu_util_max", "ram_peak_gb", "gpu_util_max", "gpu_mem_peak_gb"):
        values = [v for r in rows if (v := num(r["s"], key)) is not None]
        if values:
            merged[key] = max(values)

    def weighted(key: str, by_gpus: bool) -> float | None:
        """Mean of ``key`` over the files, weighted by their seconds (x their GPUs when every file counts them)."""
        pairs = [(v, r["d"] * (r["n"] if by_gpus else 1)) for r in rows if (v := num(r["s"], key)) is not None]
        total = sum(w for _, w in pairs)
        return sum(v * w for v, w in pairs) / total if pairs and total > 0 else None

    if (cpu := weighted("cpu_util_mean", False)) is not None:
        merged["cpu_util_mean"] = cpu
    energies = [e for r in rows if (e := num(r["s"], "energy_wh")) is not None]
    if energies:
        merged["energy_wh"] = sum(energies)
    powers = [(p, r["d"]) for r in rows if (p := num(r["s"], "power_mean_w")) is not None]
    if powers and busy > 0:
        merged["power_mean_w"] = sum(p * d for p, d in powers) / busy
    counted = all(r["n"] > 0 for r in rows if num(r["s"], "gpu_util_mean") is not None)
    if (util := weighted("gpu_util_mean", counted)) is not None:
        merged["gpu_util_mean"] = util
    if not any(r["n"] for r in rows):
        return merged
    if all(isinstance(r["s"].get("gpu_uuids"), list) for r in rows):
        merged["gpu_count"] = len({u for r in rows for u in r["s"]["gpu_uuids"]})
    else:
        per_host: dict[Any, int] = {}
        for r in rows:
            per_host[r["s"].get("host")] = max(per_host.get(r["s"].get("host"), 0), r["n"])
        merged["gpu_count"] = sum(per_host.values())
    merged["gpu_hours"] = sum(r["n"] * r["d"] for r in rows) / 3600
    return merged


# The report's GPU series: each combines one per-GPU reading of a sample (``gpus[i][reading]``) over a host's GPUs
GPU_SERIES = {
    "gpu_util_pct": ("util_pct", "mean"),
    "gpu_mem_gb": ("mem_used_gb", "sum"),
    "gpu_power_w": ("power_w", "sum"),
}


def gpu_point(sample: dict[str, Any]) -> dict[str, float]:
    """One sample's GPUs as series values ``{gpu_util_pct (mean), gpu_count, gpu_mem_gb, gpu_power_w (sums)}``, only
    the series some GPU has a reading for (a GPU without NVML utilisation, or a host without GPUs, gives fewer)."""
    gpus = sample.get("gpus") or []
    point: dict[str, float] = {}
    for series, (reading, how) in GPU_SERIES.items():
        values = [float(g[reading]) for g in gpus if isinstance(g.get(reading), (int, float))]
        if values:
            point[series] = sum(values) / len(values) if how == "mean" else sum(values)
            if how == "mean":
                point["gpu_count"] = len(values)  # weight of this host's mean when hosts are merged
    return point


def merge_series(series: list[list[dict]], interval_s: float) -> list[dict]:
    """Telemetry points of several monitors on one time axis. Each series is one file's time-sorted points
    ``{t, gpu_util_pct (mean over its GPUs), gpu_count, gpu_mem_gb, gpu_power_w (sums over its GPUs)}``.

    On a grid of ``interval_s`` seconds each series contributes its latest point if it is at most two intervals old
    (so monitors sampling out of phase all count, and a finished one drops out); utilisation combines as the
    GPU-weighted mean, memory and power add: two nodes drawing 1000 W and 5000 W give 6000 W, not alternately one
    and the other."""
    series = [points for points in series if points]
    if not series:
        return []
    start, end = min(p[0]["t"] for p in series), max(p[-1]["t"] for p in series)
    times = [[p["t"] for p in points] for points in series]
    merged = []
    for step in range(int((end - start) // interval_s) + 1):
        t = start + step * interval_s
        parts = []
        for points, stamps in zip(series, times, strict=True):
            latest = bisect.bisect_right(stamps, t + 1e-6) - 1
            if latest >= 0 and t - stamps[latest] <= 2 * interval_s:
                parts.append(points[latest])
        if not parts:
            continue
        point: dict[str, float] = {"t": t}
        utils = [(p["gpu_util_pct"], p.get("gpu_count", 1)) for p in parts if "gpu_util_pct" in p]
        if utils:
            point["gpu_util_pct"] = sum(u * n for u, n in utils) / max(sum(n for _, n in utils), 1e-9)
            point["gpu_count"] = sum(n for _, n in utils)
        for key in ("gpu_mem_gb", "gpu_power_w"):
            if any(key in p for p in parts):
                point[key] = sum(p[key] for p in parts if key in p)
        merged.append(point)
    return merged
