"""Faults of the simulated NVML and NVML's event API (a mixin of ``sim.SimNvml``).

Faults live in the state file, so another process (``simctl``, a test) can
inject them into a running agent's simulator:

* **XID errors** and ECC errors are appended to the GPU's event log
  (``events``, the last EVENTS_KEPT) with a sequence number. An event set
  registered on a GPU (``nvmlDeviceRegisterEvents``) delivers, through
  ``nvmlEventSetWait_v2``, the events logged after its registration, oldest
  first, once each; plus the XIDs the host file schedules (``faults.xids``,
  each ``after_s`` seconds after this simulator was configured).
* **What the driver does after an XID** (``DRIVER_EFFECTS``): a double-bit or
  uncontained ECC error (48, 94, 95) counts an uncorrected ECC error and marks a
  row pending remap (Ampere and newer; older GPUs: a page pending retirement);
  63 marks a row pending remap, 64 a failed remap; 79 takes the GPU off the bus.
  NVML reports them: ``nvmlDeviceGetRemappedRows`` (pending, failure),
  ``nvmlDeviceGetRetiredPagesPendingStatus`` (NOT_SUPPORTED on GPUs that remap
  rows, as on real A100/H100), volatile ECC counters.
* **GPU reset** (``sim_reset_gpu``, what ``nvidia-smi --gpu-reset`` does): refused
  with IN_USE while compute processes run on the GPU (or its MIG devices), with
  GPU_IS_LOST when it is off the bus; otherwise the pending MIG mode applies, the
  MIG instances go, pending row remaps / page retirements are applied and the
  volatile ECC counters start again. A failed remap stays (the GPU needs service).
* **A lost GPU** (fallen off the bus): every call on its handles, and
  ``nvmlDeviceGetHandleByIndex``/``ByUUID`` for it, raise GPU_IS_LOST, as NVML
  does. ``sim_lose_gpu`` logs XID 79 first, as the driver does.
* **Load and heat**: ``sim_set_load`` (utilization and memory not tied to a
  process) and the pins of ``sim_set_telemetry`` (``extra_heat_c`` for poor
  cooling, or a pinned temperature or power).

``sim_clear`` takes a GPU's run-time faults, load and pins away (the event log
and ECC counts stay: they happened). Faults the host file describes stay.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any, Callable

import pynvml as _n

from nodeagent.hostfile import HostSpec
from nodeagent.nvml.simargs import err
from nodeagent.nvml.simstate import DeviceHandle, EventSetHandle, StateStore, from_pointer, to_pointer

EVENTS_KEPT = 256
XID_FALLEN_OFF_BUS = 79
SUPPORTED_EVENTS = (_n.nvmlEventTypeXidCriticalError | _n.nvmlEventTypeSingleBitEccError
                    | _n.nvmlEventTypeDoubleBitEccError)
_NA = _n.NVML_VALUE_NOT_AVAILABLE_uint.value
_WAIT_POLL_S = 0.02


_OLD_PAGE_RETIREMENT = ("V100-32GB", "T4")   # before Ampere: dynamic page retirement, no row remapper
# XID -> what the driver's state shows after it: ECC counts and memory repairs (see the module doc).
DRIVER_EFFECTS: dict[int, tuple[str, ...]] = {48: ("ecc", "repair"), 94: ("ecc", "repair"), 95: ("ecc", "repair"),
                                              63: ("repair",), 64: ("remap_failed",), 79: ("lost",)}


def reset_repairs(gpu: dict) -> None:
    """A reset or reboot applies pending row remaps and page retirements and restarts the volatile
    ECC counters; a failed remap stays."""
    mem = gpu.setdefault("memory_repair", {})
    if mem.pop("remap_pending", False):
        mem["remapped"] = mem.get("remapped", 0) + 1
    if mem.pop("pages_pending", False):
        mem["retired"] = mem.get("retired", 0) + 1
    ecc = gpu.get("ecc") or {}
    gpu["ecc_volatile_base"] = {k: ecc.get(k, 0) for k in ("corrected", "uncorrected")}


class _Registration:
    __slots__ = ("mask", "cursor", "scheduled")

    def __init__(self, mask: int, cursor: int):
        self.mask = mask
        self.cursor = cursor  # last event seq delivered or skipped
        self.scheduled: set[int] = set()  # host-file XIDs (by position) already delivered


def log_event(gpu: dict, event_type: int, data: int, at: float, gi: int | None = None,
              ci: int | None = None) -> int:
    """Append an event to a GPU's log in the state; returns its sequence number."""
    seq = gpu.get("event_seq", 0) + 1
    gpu["event_seq"] = seq
    events = gpu.setdefault("events", [])
    events.append({"seq": seq, "type": event_type, "data": data, "at": at, "gi": gi, "ci": ci})
    del events[:-EVENTS_KEPT]
    return seq


class FaultApi:
    """Event-set calls and fault injection of SimNvml."""

    _host: HostSpec
    _clock: Callable[[], float]
    _started: float
    _store: StateStore | None
    _need_store: Callable[[], StateStore]
    _read: Callable[[], dict]
    _whole: Callable[[Any], int]

    def _init_events(self) -> None:
        self._event_sets: dict[int, dict[int, _Registration]] = {}
        self._event_ids = itertools.count(1)
        self._event_lock = threading.Lock()

    def _is_lost(self, state: dict, idx: int) -> bool:
        gpu = state["gpus"][idx]
        return gpu.get("lost", self._host.gpus[idx].faults.lost)

    # -- pynvml event API

    def _event_set(self, eventSet: Any) -> dict[int, _Registration]:
        h = eventSet if isinstance(eventSet, EventSetHandle) else from_pointer(eventSet)
        regs = self._event_sets.get(h.index) if isinstance(h, EventSetHandle) else None
        if regs is None:
            raise err(_n.NVML_ERROR_INVALID_ARGUMENT)
        return regs

    def nvmlEventSetCreate(self) -> Any:
        self._read()
        with self._event_lock:
            sid = next(self._event_ids)
            self._event_sets[sid] = {}
        return to_pointer(EventSetHandle(sid), _n.c_nvmlEventSet_t)

    def nvmlEventSetFree(self, eventSet: Any) -> None:
        self._read()
        h = from_pointer(eventSet) if not isinstance(eventSet, EventSetHandle) else eventSet
        with self._event_lock:
            if not isinstance(h, EventSetHandle) or self._event_sets.pop(h.index, None) is None:
                raise err(_n.NVML_ERROR_INVALID_ARGUMENT)

    def nvmlDeviceGetSupportedEventTypes(self, handle: Any) -> int:
        self._whole(handle)
        return SUPPORTED_EVENTS

    def nvmlDeviceRegisterEvents(self, handle: Any, eventTypes: int, eventSet: Any) -> None:
        idx = self._whole(handle)
        regs = self._event_set(eventSet)
        if eventTypes & ~SUPPORTED_EVENTS:
            raise err(_n.NVML_ERROR_NOT_SUPPORTED)
        gpu = self._read()["gpus"][idx]
        with self._event_lock:
            old = regs.get(idx)
            if old is not None:
                old.mask |= eventTypes
            else:
                regs[idx] = _Registration(eventTypes, gpu.get("event_seq", 0))

    def _next_event(self, regs: dict[int, _Registration]) -> Any:
        state = self._read()
        now = self._clock()
        best = None  # (at, seq, gpu, registration, event, scheduled position)
        with self._event_lock:
            for idx, reg in regs.items():
                for ev in state["gpus"][idx].get("events", ()):
                    if ev["seq"] > reg.cursor and ev["type"] & reg.mask:
                        if best is None or (ev["at"], ev["seq"]) < best[:2]:
                            best = (ev["at"], ev["seq"], idx, reg, ev, None)
                        break
                if reg.mask & _n.nvmlEventTypeXidCriticalError:
                    for k, (code, after) in enumerate(self._host.gpus[idx].faults.xids):
                        at = self._started + after
                        if k not in reg.scheduled and at <= now and (best is None or (at, -1) < best[:2]):
                            ev = {"type": _n.nvmlEventTypeXidCriticalError, "data": code, "gi": None, "ci": None}
                            best = (at, -1, idx, reg, ev, k)
            if best is None:
                return None
            _, seq, idx, reg, ev, k = best
            if k is None:
                reg.cursor = seq
            else:
                reg.scheduled.add(k)
        data = _n.c_nvmlEventData_t()
        data.device = to_pointer(DeviceHandle(idx), _n.c_nvmlDevice_t)
        data.eventType, data.eventData = ev["type"], ev["data"]
        data.gpuInstanceId = _NA if ev["gi"] is None else ev["gi"]
        data.computeInstanceId = _NA if ev["ci"] is None else ev["ci"]
        return data

    def nvmlEventSetWait_v2(self, eventSet: Any, timeoutms: int) -> Any:
        """The oldest undelivered event of the set; TIMEOUT when none came within ``timeoutms``."""
        regs = self._event_set(eventSet)
        deadline = time.monotonic() + max(0, timeoutms) / 1000
        while True:
            data = self._next_event(regs)
            if data is not None:
                return data
            left = deadline - time.monotonic()
            if left <= 0:
                raise err(_n.NVML_ERROR_TIMEOUT)
            time.sleep(min(_WAIT_POLL_S, left))

    nvmlEventSetWait = nvmlEventSetWait_v2

    # -- sim-only fault injection (works without nvmlInit; ValueError on misuse)

    def _gpu_index(self, index: int) -> int:
        self._need_store()
        if not isinstance(index, int) or not 0 <= index < len(self._host.gpus):
            raise ValueError(f"no GPU {index!r} on this simulated host; GPUs: 0..{len(self._host.gpus) - 1}")
        return index

    def sim_inject_xid(self, index: int, code: int, gi: int | None = None, ci: int | None = None) -> int:
        """Log XID ``code`` on GPU ``index`` (optionally on one GPU/compute instance); returns its sequence."""
        return self.sim_inject_xids(index, [code], gi, ci)

    def sim_inject_xids(self, index: int, codes: list[int], gi: int | None = None, ci: int | None = None) -> int:
        """Log a burst of XIDs on GPU ``index`` at one instant, as the driver logs one fault's (48, 63, 94 within
        milliseconds): one write of the state, so no reader sees part of it; returns the last one's sequence."""
        idx = self._gpu_index(index)
        for code in codes:
            if not isinstance(code, int) or isinstance(code, bool) or not 1 <= code <= 1000:
                raise ValueError(f"XID code: expected an integer 1..1000, got {code!r}")
        if not codes:
            raise ValueError("XID codes: expected at least one")
        now = self._clock()
        old_gen = self._models[idx].name in _OLD_PAGE_RETIREMENT

        def apply(state: dict) -> int:
            gpu = state["gpus"][idx]
            for code in codes:
                effects = DRIVER_EFFECTS.get(code, ())
                seq = log_event(gpu, _n.nvmlEventTypeXidCriticalError, code, now, gi, ci)
                mem = gpu.setdefault("memory_repair", {})
                if "ecc" in effects:
                    ecc = gpu.setdefault("ecc", {})
                    ecc["uncorrected"] = ecc.get("uncorrected", 0) + 1
                    log_event(gpu, _n.nvmlEventTypeDoubleBitEccError, 1, now)
                if "repair" in effects:
                    mem["pages_pending" if old_gen else "remap_pending"] = True
                if "remap_failed" in effects:
                    mem["remap_failed"] = True
                if "lost" in effects:
                    gpu["lost"] = True
            return seq

        return self._need_store().mutate(apply)

    # -- memory repair state (pynvml calls)

    def nvmlDeviceGetRemappedRows(self, handle: Any) -> tuple[int, int, int, int]:
        """(correctable rows remapped, uncorrectable rows remapped, remap pending, remap failed);
        NOT_SUPPORTED before Ampere."""
        idx = self._whole(handle)
        if self._models[idx].name in _OLD_PAGE_RETIREMENT:
            raise err(_n.NVML_ERROR_NOT_SUPPORTED)
        mem = self._read()["gpus"][idx].get("memory_repair") or {}
        return (0, mem.get("remapped", 0), int(bool(mem.get("remap_pending"))), int(bool(mem.get("remap_failed"))))

    def nvmlDeviceGetRetiredPagesPendingStatus(self, handle: Any) -> int:
        """NVML_FEATURE_ENABLED while retired pages wait for a reset; NOT_SUPPORTED on GPUs with a
        row remapper (Ampere and newer), as on real hardware."""
        idx = self._whole(handle)
        if self._models[idx].name not in _OLD_PAGE_RETIREMENT:
            raise err(_n.NVML_ERROR_NOT_SUPPORTED)
        mem = self._read()["gpus"][idx].get("memory_repair") or {}
        return _n.NVML_FEATURE_ENABLED if mem.get("pages_pending") else _n.NVML_FEATURE_DISABLED

    def sim_reset_gpu(self, index: int) -> None:
        """``nvidia-smi --gpu-reset -i INDEX``: NVMLError_InUse while compute processes run on the
        GPU or its MIG devices; NVMLError_GpuIsLost when it is off the bus. Otherwise the pending
        MIG mode becomes current, all MIG instances go, and reset_repairs applies."""
        idx = self._gpu_index(index)

        def apply(state: dict) -> None:
            gpu = state["gpus"][idx]
            if self._is_lost(state, idx):
                raise err(_n.NVML_ERROR_GPU_IS_LOST)
            if gpu["processes"]:
                raise err(_n.NVML_ERROR_IN_USE)
            gpu["mig_current"] = gpu["mig_pending"]
            gpu["gis"] = []
            reset_repairs(gpu)

        self._need_store().mutate(apply)

    def sim_inject_ecc(self, index: int, corrected: int = 0, uncorrected: int = 0) -> None:
        """Count ECC errors on GPU ``index`` and log their events (single-bit / double-bit)."""
        idx = self._gpu_index(index)
        if corrected < 0 or uncorrected < 0:
            raise ValueError(f"ECC error counts must be >= 0, got {corrected}, {uncorrected}")
        now = self._clock()

        def apply(state: dict) -> None:
            gpu = state["gpus"][idx]
            ecc = gpu.setdefault("ecc", {})
            ecc["corrected"] = ecc.get("corrected", 0) + corrected
            ecc["uncorrected"] = ecc.get("uncorrected", 0) + uncorrected
            if corrected:
                log_event(gpu, _n.nvmlEventTypeSingleBitEccError, corrected, now)
            if uncorrected:
                log_event(gpu, _n.nvmlEventTypeDoubleBitEccError, uncorrected, now)

        self._need_store().mutate(apply)

    def sim_lose_gpu(self, index: int, xid: bool = True) -> None:
        """GPU ``index`` falls off the bus (after logging XID 79 unless ``xid`` is False)."""
        idx = self._gpu_index(index)
        now = self._clock()

        def apply(state: dict) -> None:
            gpu = state["gpus"][idx]
            if xid and not gpu.get("lost"):
                log_event(gpu, _n.nvmlEventTypeXidCriticalError, XID_FALLEN_OFF_BUS, now)
            gpu["lost"] = True

        self._need_store().mutate(apply)

    def sim_set_load(self, index: int, util: float | None = None, memory_used: int | None = None) -> None:
        """Declare load on GPU ``index`` beyond its processes: utilization percent and memory bytes
        (None: none of that kind)."""
        idx = self._gpu_index(index)
        if util is not None and not 0 <= util <= 100:
            raise ValueError(f"util: expected a percentage 0..100, got {util}")
        if memory_used is not None and memory_used < 0:
            raise ValueError(f"memory_used: expected bytes >= 0, got {memory_used}")

        def apply(state: dict) -> None:
            load = {}
            if util:
                load["util"] = float(util)
            if memory_used:
                load["memory_used"] = int(memory_used)
            state["gpus"][idx]["load"] = load

        self._need_store().mutate(apply)

    def sim_clear(self, index: int) -> None:
        """Take GPU ``index``'s run-time faults, declared load and pins away; it is back on the bus."""
        idx = self._gpu_index(index)

        def apply(state: dict) -> None:
            gpu = state["gpus"][idx]
            for key in ("load", "lost"):
                gpu.pop(key, None)
            gpu["telemetry"] = {}

        self._need_store().mutate(apply)
