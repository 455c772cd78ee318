"""Persistent device state of the simulated NVML, and its opaque handles.

The state of every simulated GPU (MIG mode, GPU and compute instances,
processes, telemetry overrides) lives in one JSON file, so it outlives the
agent process the way a real GPU's instances do, and another process (a test,
a workload stand-in) can change it while the agent runs.

Writes take an ``fcntl.flock`` on ``<state>.lock``, re-read the file, apply
the change and atomically rename a new file into place whose mtime is strictly
greater than the previous one. Reads ``stat`` the file and re-parse it only
when (inode, mtime_ns, size) changed.

State layout::

    {"version": 1, "generation": 7, "faults": {},
     "gpus": [{"mig_current": 1, "mig_pending": 1, "next_uid": 5, "telemetry": {},
               "gis": [{"id": 1, "profile_id": 19, "start": 0, "uid": 3,
                        "cis": [{"id": 0, "profile_id": 0, "start": 0, "uid": 4}]}],
               "processes": [{"pid": 42, "used_memory": 1048576, "gi": 1, "ci": 0, "util": 80}],
               "load": {"util": 30.0, "memory_used": 1073741824},
               "thermal": {"at": 1718000000.5, "temp_c": 41.2},
               "lost": false, "ecc": {"corrected": 0, "uncorrected": 0}, "event_seq": 1,
               "events": [{"seq": 1, "type": 8, "data": 79, "at": 1718000000.5, "gi": null, "ci": null}]}]}

``gi``/``ci`` of a process are null for a process on a whole (non-MIG) GPU.
``telemetry`` holds pins (TELEMETRY_KEYS). Every key after ``processes`` is
optional (older state files lack them); ``simtelemetry`` and ``simfaults``
explain them. ``thermal`` is rewritten before every change (``before_mutate``).
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import pynvml as _n

from nodeagent.hostfile import HostSpec

STATE_VERSION = 1
TELEMETRY_KEYS = ("utilization_gpu", "utilization_memory", "temperature_c", "power_w", "extra_heat_c")
_NAMESPACE = uuid.UUID("5f1b7c0e-3a52-4d8e-9c1e-6a7e2b9d0c41")
T = TypeVar("T")


def gpu_uuid(node: str, index: int) -> str:
    """Deterministic GPU UUID for GPU ``index`` of ``node``."""
    return "GPU-" + str(uuid.uuid5(_NAMESPACE, f"{node}/gpu/{index}"))


def mig_uuid(parent_uuid: str, gi_id: int, ci_id: int) -> str:
    """Deterministic MIG device UUID from the parent GPU UUID and GI/CI ids."""
    return "MIG-" + str(uuid.uuid5(_NAMESPACE, f"{parent_uuid}/gi/{gi_id}/ci/{ci_id}"))


def initial_gpu(mig_enabled: bool) -> dict[str, Any]:
    mode = 1 if mig_enabled else 0
    return {"mig_current": mode, "mig_pending": mode, "next_uid": 1, "telemetry": {}, "gis": [], "processes": []}


def initial_state(host: HostSpec) -> dict[str, Any]:
    return {"version": STATE_VERSION, "generation": 0, "faults": {},
            "gpus": [initial_gpu(g.mig_enabled) for g in host.gpus]}


class StateStore:
    """The state file of one simulated host: cached reads, locked atomic writes."""

    def __init__(self, path: str | os.PathLike, host: HostSpec,
                 before_mutate: Callable[[dict[str, Any]], None] | None = None):
        self.path = os.fspath(path)
        self.host = host
        self.before_mutate = before_mutate  # runs on the fresh copy before every change
        self._lock_path = self.path + ".lock"
        self._tlock = threading.RLock()
        self._cache: tuple[tuple[int, int, int] | None, dict[str, Any], str] | None = None
        self.mutate(lambda state: None)  # create the file, or fit it to the host

    def read(self) -> dict[str, Any]:
        """The current state; callers must not modify it."""
        try:
            st = os.stat(self.path)
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            key = None
        cache = self._cache
        if cache is not None and cache[0] == key and key is not None:
            return cache[1]
        state, raw = self._load(key)
        self._cache = (key, state, raw)
        return state

    def mutate(self, fn: Callable[[dict[str, Any]], T]) -> T:
        """Apply ``fn`` to a fresh copy of the state under the file lock and
        write the result; nothing is written when ``fn`` raises."""
        with self._tlock, self._file_lock():
            try:
                st = os.stat(self.path)
                key = (st.st_ino, st.st_mtime_ns, st.st_size)
                prev_mtime = st.st_mtime_ns
            except FileNotFoundError:
                key, prev_mtime = None, 0
            cache = self._cache
            if cache is not None and cache[0] == key and key is not None:
                state = json.loads(cache[2])
            else:
                state, _ = self._load(key)
            if self.before_mutate is not None:
                self.before_mutate(state)
            result = fn(state)
            state["generation"] = state.get("generation", 0) + 1
            raw = json.dumps(state, separators=(",", ":"))
            tmp = f"{self.path}.{os.getpid()}.{threading.get_ident()}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(raw)
            mtime = max(time.time_ns(), prev_mtime + 1)
            os.utime(tmp, ns=(mtime, mtime))
            st = os.stat(tmp)
            os.replace(tmp, self.path)
            self._cache = ((st.st_ino, st.st_mtime_ns, st.st_size), state, raw)
            return result

    def _load(self, key: tuple[int, int, int] | None) -> tuple[dict[str, Any], str]:
        raw = ""
        if key is not None:
            try:
                with open(self.path, encoding="utf-8") as f:
                    raw = f.read()
            except FileNotFoundError:
                raw = ""
        if not raw.strip():
            state = initial_state(self.host)
            return state, json.dumps(state, separators=(",", ":"))
        try:
            state = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.path}: simulated NVML state is not valid JSON: {e}") from e
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"{self.path}: state version {state.get('version')!r}, expected {STATE_VERSION}")
        gpus = state["gpus"]
        if len(gpus) != len(self.host.gpus):  # host file changed: fit the GPU list to it
            del gpus[len(self.host.gpus):]
            gpus.extend(initial_gpu(g.mig_enabled) for g in self.host.gpus[len(gpus):])
            raw = json.dumps(state, separators=(",", ":"))
        return state, raw

    def _file_lock(self) -> "_FlockGuard":
        return _FlockGuard(self._lock_path)

    def close(self) -> None:
        """Nothing stays open between calls; kept for symmetry."""


class _FlockGuard:
    """Exclusive flock on the lock file, opened per use (no fd per idle host)."""

    def __init__(self, path: str):
        self.path = path
        self.fd = -1

    def __enter__(self) -> None:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)  # closing releases the lock


# Opaque handles. eq=False: like real NVML handles they compare by identity.
@dataclass(frozen=True, eq=False, slots=True)
class DeviceHandle:
    index: int


@dataclass(frozen=True, eq=False, slots=True)
class MigDeviceHandle:
    gpu: int
    ci_uid: int


@dataclass(frozen=True, eq=False, slots=True)
class GpuInstanceHandle:
    gpu: int
    uid: int


@dataclass(frozen=True, eq=False, slots=True)
class ComputeInstanceHandle:
    gpu: int
    uid: int


@dataclass(frozen=True, eq=False, slots=True)
class EventSetHandle:
    index: int  # the event set's number within its SimNvml


# Handles written into ctypes out-arrays and info structs become fake
# pointers: tag << 56 | gpu << 40 | uid. They are never dereferenced.
_TAGS = {DeviceHandle: 0x50, GpuInstanceHandle: 0x51, ComputeInstanceHandle: 0x52, MigDeviceHandle: 0x53,
         EventSetHandle: 0x54}
_INDEXED = (DeviceHandle, EventSetHandle)
_BY_TAG = {v: k for k, v in _TAGS.items()}


def to_pointer(handle: Any, ptr_type: Any) -> Any:
    """Encode a sim handle as a ctypes pointer of ``ptr_type``."""
    second = handle.index if isinstance(handle, _INDEXED) else handle.uid if hasattr(handle, "uid") else handle.ci_uid
    gpu = 0 if isinstance(handle, _INDEXED) else handle.gpu
    addr = (_TAGS[type(handle)] << 56) | (gpu << 40) | second
    return ctypes.cast(ctypes.c_void_p(addr), ptr_type)


def from_pointer(ptr: Any) -> Any:
    """Decode a fake pointer made by ``to_pointer``; None if it is not one."""
    try:
        addr = ctypes.cast(ptr, ctypes.c_void_p).value
    except (ctypes.ArgumentError, TypeError):
        return None
    if not addr or (addr >> 56) not in _BY_TAG:
        return None
    kind, gpu, second = _BY_TAG[addr >> 56], (addr >> 40) & 0xFFFF, addr & ((1 << 40) - 1)
    return kind(second) if kind in _INDEXED else kind(gpu, second)


class SimHelpers:
    """Sim-only calls (``sim_*``) of SimNvml: inspect and drive the simulated host.
    They work without nvmlInit; misuse raises ValueError."""

    _store: StateStore | None
    _host: HostSpec
    _uuids: list[str]
    _models: list[Any]

    def _need_store(self) -> StateStore:
        if self._store is None:
            raise RuntimeError("simulated NVML is not configured: call configure(host_file, state_file) first")
        return self._store

    def sim_host(self) -> HostSpec:
        self._need_store()
        return self._host

    def sim_state(self) -> dict:
        """A deep copy of the current state (works without nvmlInit)."""
        return json.loads(json.dumps(self._need_store().read()))

    def sim_reboot(self) -> None:
        """Host reboot: processes end, pending MIG modes apply, instances go; GPUs that fell off
        the bus are back, pending row remaps / page retirements are applied, volatile ECC counts
        start again (simfaults.reset_repairs)."""
        from nodeagent.nvml.simfaults import reset_repairs

        def apply(state: dict) -> None:
            for gpu in state["gpus"]:
                gpu["processes"], gpu["gis"], gpu["mig_current"] = [], [], gpu["mig_pending"]
                gpu.pop("lost", None)
                reset_repairs(gpu)

        self._need_store().mutate(apply)

    def _locate(self, state: dict, uuid: str) -> tuple[int, dict | None, dict | None]:
        for idx, gpu in enumerate(state["gpus"]):
            if self._uuids[idx] == uuid:
                return idx, None, None
            for gi in gpu["gis"]:
                for ci in gi["cis"]:
                    if mig_uuid(self._uuids[idx], gi["id"], ci["id"]) == uuid:
                        return idx, gi, ci
        raise ValueError(f"no GPU or MIG device with UUID {uuid!r} on this simulated host")

    def sim_add_process(self, uuid: str, pid: int, used_memory_bytes: int, util: float | None = None) -> None:
        """Start a simulated compute process on a GPU or MIG device; ``util`` is the percent of its
        device it keeps busy (None: simtelemetry.DEFAULT_PROCESS_UTIL)."""
        if util is not None and not 0 <= util <= 100:
            raise ValueError(f"util: expected a percentage 0..100, got {util}")

        def apply(state: dict) -> None:
            idx, gi, ci = self._locate(state, uuid)
            gpu = state["gpus"][idx]
            if gi is None and gpu["mig_current"] == _n.NVML_DEVICE_MIG_ENABLE:
                raise ValueError(f"GPU {uuid} is in MIG mode: start processes on one of its MIG devices")
            mates = [p for p in gpu["processes"] if gi is None or p["gi"] == gi["id"]]
            if any(p["pid"] == pid and p["ci"] == (ci and ci["id"]) for p in mates):
                raise ValueError(f"process {pid} already runs on {uuid}")
            model = self._models[idx]
            limit = (model.memory_mib if gi is None else model.profile_by_id(gi["profile_id"]).memory_mib) * 2**20
            if sum(p["used_memory"] for p in mates) + used_memory_bytes > limit:
                raise ValueError(f"{used_memory_bytes} bytes do not fit in the free memory of {uuid} ({limit} bytes total)")
            proc = {"pid": pid, "used_memory": used_memory_bytes, "gi": gi and gi["id"], "ci": ci and ci["id"]}
            if util is not None:
                proc["util"] = float(util)
            gpu["processes"].append(proc)

        self._need_store().mutate(apply)

    def sim_remove_process(self, uuid: str, pid: int) -> bool:
        """End a simulated process; False if it was not running there."""

        def apply(state: dict) -> bool:
            idx, gi, ci = self._locate(state, uuid)
            procs = state["gpus"][idx]["processes"]
            keep = [p for p in procs if not (p["pid"] == pid and p["gi"] == (gi and gi["id"]) and p["ci"] == (ci and ci["id"]))]
            state["gpus"][idx]["processes"] = keep
            return len(keep) != len(procs)

        return self._need_store().mutate(apply)

    def sim_set_telemetry(self, index: int, **values: float | None) -> None:
        """Override telemetry of GPU ``index`` (keys: TELEMETRY_KEYS; None clears)."""
        bad = sorted(set(values) - set(TELEMETRY_KEYS))
        if bad:
            raise ValueError(f"unknown telemetry keys {bad}; allowed: {', '.join(TELEMETRY_KEYS)}")

        def apply(state: dict) -> None:
            t = state["gpus"][index].setdefault("telemetry", {})
            for k, v in values.items():
                if v is None:
                    t.pop(k, None)
                else:
                    t[k] = v

        self._need_store().mutate(apply)

