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

    def add(self, sample: dict) -> None:
        self.samples += 1
        self.cpu_sum += sample["cpu_util_pct"]
        self.cpu_max = max(self.cpu_max, sample["cpu_util_pct"])
        self.ram_peak_gb = max(self.ram_peak_gb, sample["ram_used_gb"])
        gpus = sample.get("gpus") or []
        self.gpu_count = len(gpus)
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
            "samples": self.samples,
            "cpu_util_mean": self.cpu_sum / n,
            "cpu_util_max": self.cpu_max,
            "ram_peak_gb": self.ram_peak_gb,
            "gpu_count": self.gpu_count,
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
