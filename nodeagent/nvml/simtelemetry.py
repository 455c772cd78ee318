"""Telemetry of the simulated NVML: a model of each GPU as a function of
time and load (a mixin of ``sim.SimNvml``).

* **Load.** Utilization is the sum of the ``util`` of the GPU's processes
  (``sim_add_process(..., util=)``, DEFAULT_PROCESS_UTIL when not given; on a
  MIG GPU a process counts in proportion to its compute instance's share of
  the 7 compute slices) plus the GPU's declared load (``sim_set_load``),
  capped at 100. Memory used is the processes' ``used_memory`` plus the
  declared load's; a MIG device sees only its GPU instance's processes.
* **Power** runs from the idle power to the TDP with utilization, capped at
  the enforced power limit (SW power cap when the demand exceeds it).
* **Temperature** is a first-order lag toward an equilibrium set by power:
  ``eq = ambient + (full_load - ambient) * power / TDP + extra_heat``,
  ``T(t) = eq + (T0 - eq) * exp(-(t - t0) / time_constant)``. The anchor
  ``(t0, T0)`` is stored in the state file and moved to "now" before every
  change of the state, so the curve is continuous across load changes and
  the same in every process that reads the file. A GPU never anchored is at
  its equilibrium.
* **Throttling.** At or above ``throttle_c`` SW thermal slowdown lowers the SM
  clock 5% per degree (to half at most); at ``slowdown_c`` HW slowdown halves
  it again. An idle GPU reports GPU_IDLE and its idle clock.

Parameters come from the host file's ``thermal`` mapping of each GPU; pins
(``sim_set_telemetry``) replace a computed utilization, power or temperature.
Reads never write the state file.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from typing import Any, Callable

import pynvml as _n

from mesh.gpumodels import GpuModel
from nodeagent.hostfile import GpuSpec, HostSpec
from nodeagent.nvml.simargs import err
from nodeagent.nvml.simci import CI_SLICES
from nodeagent.nvml.simstate import DeviceHandle

DEFAULT_PROCESS_UTIL = 35.0  # percent, for a process added without a declared util
MEMORY_UTIL_RATIO = 0.6  # memory-controller busy time per unit of SM busy time
# (max SM clock, max memory clock) in MHz
MAX_CLOCKS = {"A100-40GB": (1410, 1215), "A100-80GB": (1410, 1593), "H100-80GB": (1980, 2619),
              "H200-141GB": (1980, 3201), "L4": (2040, 6251), "A10": (1695, 6251), "T4": (1590, 5001),
              "V100-32GB": (1530, 877)}
IDLE_SM_MHZ = 345
THROTTLE_NAMES = {  # reason bit -> the short name the agent reports
    _n.nvmlClocksEventReasonGpuIdle: "gpu_idle",
    _n.nvmlClocksEventReasonApplicationsClocksSetting: "applications_clocks",
    _n.nvmlClocksEventReasonSwPowerCap: "sw_power_cap",
    _n.nvmlClocksEventReasonHwSlowdown: "hw_slowdown",
    _n.nvmlClocksEventReasonSyncBoost: "sync_boost",
    _n.nvmlClocksEventReasonSwThermalSlowdown: "sw_thermal",
    _n.nvmlClocksEventReasonHwThermalSlowdown: "hw_thermal",
    _n.nvmlClocksEventReasonHwPowerBrakeSlowdown: "hw_power_brake",
    _n.nvmlClocksEventReasonDisplayClockSetting: "display_clocks",
}
_SUPPORTED_REASONS = (_n.nvmlClocksEventReasonGpuIdle | _n.nvmlClocksEventReasonSwPowerCap
                      | _n.nvmlClocksEventReasonHwSlowdown | _n.nvmlClocksEventReasonSwThermalSlowdown
                      | _n.nvmlClocksEventReasonHwThermalSlowdown)


@dataclass(frozen=True)
class Reading:
    """What the model says about one GPU at one moment."""

    util: float  # percent
    memory_util: float  # percent
    memory_used: int  # bytes
    memory_total: int  # bytes
    power_w: float
    power_limit_w: float
    temperature_c: float
    sm_mhz: int
    memory_mhz: int
    reasons: int  # nvmlClocksEventReason* bits


class GpuModelTelemetry:
    """The telemetry model of one GPU: its parameters and the state-to-reading function."""

    def __init__(self, model: GpuModel, spec: GpuSpec):
        t = spec.thermal
        self.model = model
        self.spec = spec
        self.tdp_w = float(model.tdp_w)
        self.idle_w = t.idle_power_w if t.idle_power_w is not None else 0.1 * self.tdp_w
        self.limit_w = t.power_limit_w if t.power_limit_w is not None else self.tdp_w
        self.max_sm, self.max_mem = MAX_CLOCKS.get(model.name, (1500, 1500))
        self.memory_total = model.memory_mib * 2**20

    def load(self, gpu: dict) -> tuple[float, int, bool]:
        """(utilization %, memory used in bytes, anything running) from processes and declared load."""
        util = 0.0
        shares = {}
        if gpu.get("mig_current"):
            for gi in gpu["gis"]:
                for ci in gi["cis"]:
                    shares[(gi["id"], ci["id"])] = CI_SLICES[ci["profile_id"]] / 7
        used = 0
        for p in gpu["processes"]:
            u = p.get("util")
            u = DEFAULT_PROCESS_UTIL if u is None else u
            util += u * shares.get((p["gi"], p["ci"]), 1.0) if p["gi"] is not None else u
            used += p["used_memory"]
        load = gpu.get("load") or {}
        util += load.get("util", 0.0)
        used += load.get("memory_used", 0)
        busy = bool(gpu["processes"]) or util > 0
        return max(0.0, min(100.0, util)), max(0, min(self.memory_total, used)), busy

    def power(self, util: float, pins: dict) -> tuple[float, bool]:
        """(power in W, capped by the power limit)."""
        if "power_w" in pins:
            return float(pins["power_w"]), float(pins["power_w"]) >= self.limit_w
        demand = self.idle_w + (self.tdp_w - self.idle_w) * util / 100.0
        return min(demand, self.limit_w), demand > self.limit_w

    def equilibrium(self, power_w: float, gpu: dict) -> float:
        t = self.spec.thermal
        extra = (gpu.get("telemetry") or {}).get("extra_heat_c", self.spec.faults.extra_heat_c)
        return t.ambient_c + (t.full_load_c - t.ambient_c) * power_w / self.tdp_w + extra

    def model_temperature(self, gpu: dict, power_w: float, now: float) -> float:
        """The modelled temperature (pins aside) at ``now``."""
        eq = self.equilibrium(power_w, gpu)
        anchor = gpu.get("thermal")
        if not anchor:
            return eq
        dt = max(0.0, now - anchor["at"])
        return eq + (anchor["temp_c"] - eq) * math.exp(-dt / self.spec.thermal.time_constant_s)

    def read(self, gpu: dict, now: float) -> Reading:
        pins = gpu.get("telemetry") or {}
        util, used, busy = self.load(gpu)
        util = float(pins.get("utilization_gpu", util))
        mem_util = float(pins.get("utilization_memory", util * MEMORY_UTIL_RATIO))
        power, capped = self.power(util, pins)
        temp = float(pins.get("temperature_c", self.model_temperature(gpu, power, now)))
        t = self.spec.thermal
        reasons, factor = 0, 1.0
        if not busy and util <= 0:
            reasons |= _n.nvmlClocksEventReasonGpuIdle
        if capped:
            reasons |= _n.nvmlClocksEventReasonSwPowerCap
            demand = self.idle_w + (self.tdp_w - self.idle_w) * util / 100.0
            factor *= max(0.5, self.limit_w / demand) if demand > 0 else 1.0
        if temp >= t.throttle_c:
            reasons |= _n.nvmlClocksEventReasonSwThermalSlowdown
            factor *= max(0.5, 1.0 - 0.05 * (temp - t.throttle_c + 1))
        if temp >= t.slowdown_c:
            reasons |= _n.nvmlClocksEventReasonHwSlowdown | _n.nvmlClocksEventReasonHwThermalSlowdown
            factor *= 0.5
        sm = IDLE_SM_MHZ if reasons & _n.nvmlClocksEventReasonGpuIdle else int(self.max_sm * factor) // 15 * 15
        return Reading(util, min(100.0, mem_util), used, self.memory_total, power, self.limit_w, temp,
                       max(sm, min(IDLE_SM_MHZ, self.max_sm)), self.max_mem, reasons)


def numa_layout(host: HostSpec) -> tuple[list[int], int]:
    """(NUMA node of each GPU, number of NUMA nodes): the host file's, else GPUs split over two nodes."""
    n = len(host.gpus)
    nodes = [g.numa_node if g.numa_node is not None else (g.index * 2 // n if n > 1 else 0) for g in host.gpus]
    return nodes, max(max(nodes) + 1, 2 if n > 1 else 1)


def cpu_set(host: HostSpec, gpu: int) -> range:
    """The CPUs near GPU ``gpu``: its NUMA node's equal share of the host's CPUs."""
    nodes, count = numa_layout(host)
    per = max(1, host.cpus // count)
    first = min(nodes[gpu] * per, max(0, host.cpus - per))
    return range(first, first + per)


class TelemetryApi:
    """The pynvml telemetry calls of SimNvml (whole-GPU handles; NOT_SUPPORTED on MIG devices,
    except memory info and processes, which sim.SimNvml serves)."""

    _host: HostSpec
    _clock: Callable[[], float]
    _gpu_models: list[GpuModelTelemetry]
    _whole: Callable[[Any], int]
    _any_handle: Callable[[Any], Any]
    _read: Callable[[], dict]

    def _reading(self, handle: Any) -> tuple[Reading, GpuModelTelemetry]:
        idx = self._whole(handle)
        m = self._gpu_models[idx]
        return m.read(self._read()["gpus"][idx], self._clock()), m

    def _anchor_temperatures(self, state: dict) -> None:
        """Move every GPU's temperature anchor to now (run before each state change)."""
        now = self._clock()
        for idx, gpu in enumerate(state["gpus"][:len(self._gpu_models)]):
            m = self._gpu_models[idx]
            util, _, _ = m.load(gpu)
            pins = gpu.get("telemetry") or {}
            power, _ = m.power(float(pins.get("utilization_gpu", util)), pins)
            gpu["thermal"] = {"at": now, "temp_c": round(m.model_temperature(gpu, power, now), 6)}

    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Any:
        r, _ = self._reading(handle)
        return _n.c_nvmlUtilization_t(int(round(r.util)), int(round(r.memory_util)))

    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int:
        r, _ = self._reading(handle)
        if sensor != _n.NVML_TEMPERATURE_GPU:
            raise err(_n.NVML_ERROR_INVALID_ARGUMENT)
        return int(round(r.temperature_c))

    def nvmlDeviceGetTemperatureV(self, handle: Any, sensor: int, version: int = _n.nvmlTemperature_v1) -> int:
        if version != _n.nvmlTemperature_v1:
            raise err(_n.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        return self.nvmlDeviceGetTemperature(handle, sensor)

    nvmlDeviceGetTemperatureV1 = nvmlDeviceGetTemperature

    def nvmlDeviceGetTemperatureThreshold(self, handle: Any, threshold: int) -> int:
        _, m = self._reading(handle)
        t = m.spec.thermal
        values = {_n.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN: t.shutdown_c, _n.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN: t.slowdown_c,
                  _n.NVML_TEMPERATURE_THRESHOLD_GPU_MAX: t.throttle_c}
        if threshold not in values:
            raise err(_n.NVML_ERROR_NOT_SUPPORTED)
        return int(round(values[threshold]))

    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int:
        r, _ = self._reading(handle)
        return int(round(r.power_w * 1000))

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: Any) -> int:
        _, m = self._reading(handle)
        return int(round(m.limit_w * 1000))

    nvmlDeviceGetPowerManagementLimit = nvmlDeviceGetEnforcedPowerLimit

    def nvmlDeviceGetPowerManagementDefaultLimit(self, handle: Any) -> int:
        _, m = self._reading(handle)
        return int(round(m.tdp_w * 1000))

    def nvmlDeviceGetPerformanceState(self, handle: Any) -> int:
        r, _ = self._reading(handle)
        return _n.NVML_PSTATE_8 if r.reasons & _n.nvmlClocksEventReasonGpuIdle else _n.NVML_PSTATE_0

    def _clock_of(self, r: Reading, m: GpuModelTelemetry, kind: int, maximum: bool) -> int:
        sm, mem = (m.max_sm, m.max_mem) if maximum else (r.sm_mhz, r.memory_mhz)
        values = {_n.NVML_CLOCK_GRAPHICS: sm, _n.NVML_CLOCK_SM: sm, _n.NVML_CLOCK_MEM: mem,
                  _n.NVML_CLOCK_VIDEO: sm * 9 // 10 // 15 * 15}
        if kind not in values:
            raise err(_n.NVML_ERROR_INVALID_ARGUMENT)
        return values[kind]

    def nvmlDeviceGetClockInfo(self, handle: Any, type: int) -> int:  # noqa: A002 - pynvml's name
        r, m = self._reading(handle)
        return self._clock_of(r, m, type, False)

    def nvmlDeviceGetMaxClockInfo(self, handle: Any, type: int) -> int:  # noqa: A002
        r, m = self._reading(handle)
        return self._clock_of(r, m, type, True)

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: Any) -> int:
        return self._reading(handle)[0].reasons

    nvmlDeviceGetCurrentClocksThrottleReasons = nvmlDeviceGetCurrentClocksEventReasons

    def nvmlDeviceGetSupportedClocksEventReasons(self, handle: Any) -> int:
        self._reading(handle)
        return _SUPPORTED_REASONS

    nvmlDeviceGetSupportedClocksThrottleReasons = nvmlDeviceGetSupportedClocksEventReasons

    def nvmlDeviceGetEccMode(self, handle: Any) -> list[int]:
        self._reading(handle)
        return [_n.NVML_FEATURE_ENABLED, _n.NVML_FEATURE_ENABLED]

    def nvmlDeviceGetTotalEccErrors(self, handle: Any, errorType: int, counterType: int) -> int:
        idx = self._whole(handle)
        if errorType not in (_n.NVML_MEMORY_ERROR_TYPE_CORRECTED, _n.NVML_MEMORY_ERROR_TYPE_UNCORRECTED) \
                or counterType not in (_n.NVML_VOLATILE_ECC, _n.NVML_AGGREGATE_ECC):
            raise err(_n.NVML_ERROR_INVALID_ARGUMENT)
        gpu = self._read()["gpus"][idx]
        faults = self._host.gpus[idx].faults
        key = "corrected" if errorType == _n.NVML_MEMORY_ERROR_TYPE_CORRECTED else "uncorrected"
        base = faults.ecc_corrected if key == "corrected" else faults.ecc_uncorrected
        total = base + (gpu.get("ecc") or {}).get(key, 0)
        if counterType == _n.NVML_VOLATILE_ECC and "ecc_volatile_base" in gpu:
            # counted since the last reset or reboot (the host file's counts predate the first one)
            return total - base - gpu["ecc_volatile_base"].get(key, 0)
        return total

    def nvmlDeviceGetFanSpeed(self, handle: Any) -> int:
        self._reading(handle)
        raise err(_n.NVML_ERROR_NOT_SUPPORTED)  # passively cooled data-center boards

    # -- affinity

    def nvmlDeviceGetNumaNodeId(self, handle: Any) -> int:
        h = self._any_handle(handle)
        idx = h.index if isinstance(h, DeviceHandle) else h.gpu
        self._read()
        return numa_layout(self._host)[0][idx]

    def _bitmask(self, bits: range | list[int], words: int) -> Any:
        out = (ctypes.c_ulonglong * words)()
        for b in bits:
            if b // 64 < words:
                out[b // 64] |= 1 << (b % 64)
        return out

    def nvmlDeviceGetCpuAffinity(self, handle: Any, cpuSetSize: int) -> Any:
        idx = self._whole(handle)
        self._read()
        return self._bitmask(cpu_set(self._host, idx), cpuSetSize)

    def nvmlDeviceGetCpuAffinityWithinScope(self, handle: Any, cpuSetSize: int, scope: int) -> Any:
        idx = self._whole(handle)
        self._read()
        if scope not in (_n.NVML_AFFINITY_SCOPE_NODE, _n.NVML_AFFINITY_SCOPE_SOCKET):  # one socket per node
            raise err(_n.NVML_ERROR_INVALID_ARGUMENT)
        return self._bitmask(cpu_set(self._host, idx), cpuSetSize)

    def nvmlDeviceGetMemoryAffinity(self, handle: Any, nodeSetSize: int, scope: int) -> Any:
        idx = self._whole(handle)
        self._read()
        if scope not in (_n.NVML_AFFINITY_SCOPE_NODE, _n.NVML_AFFINITY_SCOPE_SOCKET):
            raise err(_n.NVML_ERROR_INVALID_ARGUMENT)
        return self._bitmask([numa_layout(self._host)[0][idx]], nodeSetSize)


class TelemetryHelpers:
    """Sim-only readings (work without nvmlInit)."""

    def sim_readings(self) -> list[dict]:
        """What the model says about every GPU now: the numbers NVML would report, the
        throttle reasons by name, whether it is lost, its logged XIDs and ECC counts."""
        state = self._need_store().read()
        now = self._clock()
        out = []
        for idx, m in enumerate(self._gpu_models):
            gpu = state["gpus"][idx]
            r = m.read(gpu, now)
            faults = self._host.gpus[idx].faults
            ecc = gpu.get("ecc") or {}
            out.append({
                "index": idx, "model": m.model.name, "lost": self._is_lost(state, idx),
                "utilization_pct": round(r.util, 1), "memory_used_bytes": r.memory_used,
                "memory_total_bytes": r.memory_total, "temperature_c": round(r.temperature_c, 1),
                "power_w": round(r.power_w, 1), "power_limit_w": round(r.power_limit_w, 1),
                "sm_clock_mhz": r.sm_mhz, "memory_clock_mhz": r.memory_mhz,
                "throttle_reasons": [name for bit, name in THROTTLE_NAMES.items() if r.reasons & bit],
                "xids": [e["data"] for e in gpu.get("events", ()) if e["type"] == _n.nvmlEventTypeXidCriticalError],
                "ecc_corrected": faults.ecc_corrected + ecc.get("corrected", 0),
                "ecc_uncorrected": faults.ecc_uncorrected + ecc.get("uncorrected", 0),
                "load": dict(gpu.get("load") or {}), "pins": dict(gpu.get("telemetry") or {}),
                "processes": len(gpu["processes"]),
            })
        return out
