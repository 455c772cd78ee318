"""Simulated NVML: the ``pynvml`` API over a host file and a state file.

Use it exactly like ``pynvml``: every ``NVML_*`` constant, ctypes struct and
``NVMLError*`` class is pynvml's own object, so ``except nvml.NVMLError_InUse``
and ``isinstance(e, pynvml.NVMLError_InUse)`` both work. ``configure`` first::

    sim.configure("tools/hosts/h100x8.yaml", "/tmp/node1.nvml.json")
    sim.nvmlInit()
    h = sim.nvmlDeviceGetHandleByIndex(0)

Without ``configure``, ``nvmlInit`` reads ``GPUMESH_SIM_HOST_FILE`` and
``GPUMESH_SIM_STATE_FILE`` and otherwise fails with LIBRARY_NOT_FOUND.
Device state lives in the state file (see ``simstate``), so a restarted
process sees the same MIG mode and instances. pynvml calls the simulator does
not implement raise FUNCTION_NOT_FOUND. ``SimNvml`` instances are
independent simulators with the same attributes as this module (for many
simulated hosts in one process). Sim-only helpers start with ``sim_``.

MIG calls are in ``simmig`` (GPU instances, MIG devices) and ``simci`` (compute
instances); ``simargs`` takes pynvml's ctypes arguments as the C library does.

Telemetry (utilization, memory, power, temperature, clocks, throttle reasons,
ECC, NUMA/CPU affinity) follows the model in ``simtelemetry``, a function of
the state file and the time (``SimNvml(..., clock=)`` injects the time);
faults (XIDs through the event API, lost GPUs, heat) are in ``simfaults``;
``python -m nodeagent.nvml.simctl`` drives both from outside.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import socket
import threading
import time
import types
from typing import Any, Callable

import pynvml as _n

from mesh.gpumodels import GpuModel, get_model
from nodeagent.hostfile import HostSpec, load_host_file
from nodeagent.nvml.simfaults import FaultApi
from nodeagent.nvml.simargs import err
from nodeagent.nvml.simci import CI_SLICES, ComputeInstanceApi
from nodeagent.nvml.simmig import MigApi
from nodeagent.nvml.simstate import (DeviceHandle, GpuInstanceHandle, MigDeviceHandle, SimHelpers, StateStore,
                                     from_pointer, gpu_uuid, mig_uuid)
from nodeagent.nvml.simtelemetry import GpuModelTelemetry, TelemetryApi, TelemetryHelpers

_HELPERS = {"nvmlStructToFriendlyObject", "nvmlFriendlyObjectToStruct", "nvmlExceptionClass"}


def _missing(name: str) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        raise _n.NVMLError(_n.NVML_ERROR_FUNCTION_NOT_FOUND)

    call.__name__ = call.__qualname__ = name
    return call


# pynvml's public names: constants, structs and errors as they are; its C
# calls as FUNCTION_NOT_FOUND stubs until SimNvml overrides them.
_EXPORTS: dict[str, Any] = {}
for _name, _value in vars(_n).items():
    if _name.startswith("_") or isinstance(_value, types.ModuleType) or _name == "nvmlLib":
        continue
    if _name.startswith("nvml") and inspect.isfunction(_value) and _name not in _HELPERS:
        _value = _missing(_name)
    _EXPORTS[_name] = _value

# nvmlErrorString texts that pynvml would fetch from the library and cache in
# this same dict; filled here so str(error) reads as it does on a real host.
for _code, _text in ((_n.NVML_ERROR_IN_USE, "In use by another client"),
                     (_n.NVML_ERROR_INSUFFICIENT_RESOURCES, "Insufficient resources"),
                     (_n.NVML_ERROR_NO_DATA, "No data"),
                     (_n.NVML_ERROR_ARGUMENT_VERSION_MISMATCH, "Argument version mismatch"),
                     (_n.NVML_ERROR_NOT_READY, "Not ready"),
                     (_n.NVML_ERROR_INVALID_STATE, "Invalid state")):
    _n.NVMLError._errcode_to_string.setdefault(_code, _text)

_BUS = (0x18, 0x2A, 0x3A, 0x5D, 0x9A, 0xAB, 0xBA, 0xDB)
_PCI_DEVICE_ID = {"A100-40GB": 0x20B010DE, "A100-80GB": 0x20B210DE, "H100-80GB": 0x233010DE,
                  "H200-141GB": 0x233510DE, "L4": 0x27B810DE, "A10": 0x223610DE, "T4": 0x1EB810DE,
                  "V100-32GB": 0x1DB510DE}
_COMPUTE_CAP = {"A100-40GB": (8, 0), "A100-80GB": (8, 0), "H100-80GB": (9, 0), "H200-141GB": (9, 0),
                "L4": (8, 9), "A10": (8, 6), "T4": (7, 5), "V100-32GB": (7, 0)}
_NA_UINT = _n.NVML_VALUE_NOT_AVAILABLE_uint.value


class SimNvml(MigApi, ComputeInstanceApi, TelemetryApi, FaultApi, SimHelpers, TelemetryHelpers):
    """One simulated host's NVML; attribute-compatible with the pynvml module.
    ``clock`` gives the time in seconds since the epoch (default ``time.time``)."""

    def __init__(self, host_file: str | os.PathLike | HostSpec | None = None,
                 state_file: str | os.PathLike | None = None, clock: Callable[[], float] | None = None):
        self._store: StateStore | None = None
        self._refcount = 0
        self._lock = threading.Lock()
        self._clock = clock or time.time
        self._init_events()
        if host_file is not None and state_file is not None:
            self.configure(host_file, state_file)

    def __getattr__(self, name: str) -> Any:
        try:
            return _EXPORTS[name]
        except KeyError:
            raise AttributeError(f"simulated NVML has no attribute {name!r}") from None

    def configure(self, host_file: str | os.PathLike | HostSpec, state_file: str | os.PathLike) -> None:
        """Serve the host ``host_file`` describes, keeping state in ``state_file``."""
        host = host_file if isinstance(host_file, HostSpec) else load_host_file(host_file)
        node = host.node or socket.gethostname()
        self._host = host
        self._models: list[GpuModel] = [get_model(g.model) for g in host.gpus]
        self._uuids = [gpu_uuid(node, g.index) for g in host.gpus]
        self._handles = [DeviceHandle(g.index) for g in host.gpus]
        self._gpu_models = [GpuModelTelemetry(m, g) for m, g in zip(self._models, host.gpus)]
        self._started = self._clock()
        if self._store is not None:
            self._store.close()
        self._store = StateStore(state_file, host, before_mutate=self._anchor_temperatures)

    # -- internals shared with MigApi and ComputeInstanceApi

    def _read(self) -> dict:
        if self._refcount <= 0:
            raise err(_n.NVML_ERROR_UNINITIALIZED)
        return self._store.read()

    def _mutate(self, fn: Callable[[dict], Any]) -> Any:
        if self._refcount <= 0:
            raise err(_n.NVML_ERROR_UNINITIALIZED)
        return self._store.mutate(fn)

    def _model(self, idx: int) -> GpuModel:
        return self._models[idx]

    def _device_handle(self, idx: int) -> DeviceHandle:
        return self._handles[idx]

    def _handle(self, obj: Any, kind: type) -> Any:
        if self._refcount <= 0:
            raise err(_n.NVML_ERROR_UNINITIALIZED)
        h = obj if isinstance(obj, kind) else from_pointer(obj) if obj is not None else None
        idx = getattr(h, "gpu", getattr(h, "index", -1))
        if not isinstance(h, kind) or not 0 <= idx < len(self._models):
            raise err(_n.NVML_ERROR_INVALID_ARGUMENT)
        self._check_lost(idx)
        return h

    def _check_lost(self, idx: int, state: dict | None = None) -> None:
        if self._is_lost(state or self._store.read(), idx):
            raise err(_n.NVML_ERROR_GPU_IS_LOST)

    def _any_handle(self, obj: Any) -> DeviceHandle | MigDeviceHandle:
        h = obj if isinstance(obj, (DeviceHandle, MigDeviceHandle)) else from_pointer(obj)
        return self._handle(h, MigDeviceHandle if isinstance(h, MigDeviceHandle) else DeviceHandle)

    def _device(self, obj: Any) -> int:
        """Index of a whole-GPU handle; INVALID_ARGUMENT for anything else."""
        return self._handle(obj, DeviceHandle).index

    def _whole(self, obj: Any) -> int:
        """Index of a whole-GPU handle; NOT_SUPPORTED for a MIG device."""
        h = self._any_handle(obj)
        if isinstance(h, MigDeviceHandle):
            raise err(_n.NVML_ERROR_NOT_SUPPORTED)
        return h.index

    def _gi_of(self, state: dict, h: GpuInstanceHandle) -> tuple[dict, dict]:
        gpu = state["gpus"][h.gpu]
        for gi in gpu["gis"]:
            if gi["uid"] == h.uid:
                return gpu, gi
        raise err(_n.NVML_ERROR_INVALID_ARGUMENT)

    def _ci_of(self, state: dict, idx: int, uid: int) -> tuple[dict, dict, dict]:
        gpu = state["gpus"][idx]
        for gi in gpu["gis"]:
            for ci in gi["cis"]:
                if ci["uid"] == uid:
                    return gpu, gi, ci
        raise err(_n.NVML_ERROR_INVALID_ARGUMENT)

    def _mig_of(self, h: MigDeviceHandle) -> tuple[dict, dict, dict]:
        return self._ci_of(self._read(), h.gpu, h.ci_uid)

    # -- library and system

    def nvmlInitWithFlags(self, flags: int) -> None:
        with self._lock:
            if self._store is None:
                host, state = os.environ.get("GPUMESH_SIM_HOST_FILE"), os.environ.get("GPUMESH_SIM_STATE_FILE")
                if not (host and state):
                    raise err(_n.NVML_ERROR_LIBRARY_NOT_FOUND)
                self.configure(host, state)
            self._refcount += 1

    def nvmlInit(self) -> None:
        self.nvmlInitWithFlags(0)

    def nvmlShutdown(self) -> None:
        with self._lock:
            if self._refcount <= 0:
                raise err(_n.NVML_ERROR_UNINITIALIZED)
            self._refcount -= 1

    def nvmlErrorString(self, result: int) -> str:
        return _n.NVMLError._errcode_to_string.get(result, "Unknown Error")

    def nvmlSystemGetDriverVersion(self) -> str:
        self._read()
        return self._host.driver_version

    def nvmlSystemGetNVMLVersion(self) -> str:
        self._read()
        return f"{self._host.cuda_version.split('.')[0]}.{self._host.driver_version}"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        self._read()
        major, minor = self._host.cuda_version.split(".")
        return int(major) * 1000 + int(minor) * 10

    nvmlSystemGetCudaDriverVersion_v2 = nvmlSystemGetCudaDriverVersion

    # -- device identity

    def nvmlDeviceGetCount(self) -> int:
        self._read()
        return len(self._models)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> DeviceHandle:
        state = self._read()
        if not 0 <= index < len(self._models):
            raise err(_n.NVML_ERROR_INVALID_ARGUMENT)
        self._check_lost(index, state)
        return self._handles[index]

    def nvmlDeviceGetHandleByUUID(self, uuid: str | bytes) -> DeviceHandle | MigDeviceHandle:
        state = self._read()
        text = uuid.decode() if isinstance(uuid, bytes) else uuid
        if text in self._uuids:
            self._check_lost(self._uuids.index(text), state)
            return self._handles[self._uuids.index(text)]
        for idx, gpu in enumerate(state["gpus"]):
            for gi in gpu["gis"]:
                for ci in gi["cis"]:
                    if mig_uuid(self._uuids[idx], gi["id"], ci["id"]) == text:
                        self._check_lost(idx, state)
                        return MigDeviceHandle(idx, ci["uid"])
        raise err(_n.NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetHandleBySerial(self, serial: str | bytes) -> DeviceHandle:
        self._read()
        text = serial.decode() if isinstance(serial, bytes) else serial
        for idx in range(len(self._models)):
            if self._serial(idx) == text:
                self._check_lost(idx)
                return self._handles[idx]
        raise err(_n.NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetHandleByPciBusId(self, pciBusId: str | bytes) -> DeviceHandle:
        self._read()
        text = (pciBusId.decode() if isinstance(pciBusId, bytes) else pciBusId).upper()
        for idx in range(len(self._models)):
            if self._bus_id(idx) in (text, "0000" + text):
                self._check_lost(idx)
                return self._handles[idx]
        raise err(_n.NVML_ERROR_NOT_FOUND)

    nvmlDeviceGetHandleByPciBusId_v2 = nvmlDeviceGetHandleByPciBusId

    def nvmlDeviceGetIndex(self, handle: Any) -> int:
        return self._whole(handle)

    def nvmlDeviceGetName(self, handle: Any) -> str:
        h = self._any_handle(handle)
        if isinstance(h, DeviceHandle):
            return self._models[h.index].product_name
        _, gi, ci = self._mig_of(h)
        model = self._models[h.gpu]
        gp = model.profile_by_id(gi["profile_id"])
        slices = CI_SLICES[ci["profile_id"]]
        return f"{model.product_name} MIG {gp.name if slices == gp.compute_slices else f'{slices}c.{gp.name}'}"

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        h = self._any_handle(handle)
        if isinstance(h, DeviceHandle):
            return self._uuids[h.index]
        _, gi, ci = self._mig_of(h)
        return mig_uuid(self._uuids[h.gpu], gi["id"], ci["id"])

    def _serial(self, idx: int) -> str:
        serial = self._host.gpus[idx].serial
        return serial or str(int(hashlib.sha256(self._uuids[idx].encode()).hexdigest(), 16))[:13]

    def nvmlDeviceGetSerial(self, handle: Any) -> str:
        return self._serial(self._whole(handle))

    def _bus_id(self, idx: int) -> str:
        return f"{idx // len(_BUS):08X}:{_BUS[idx % len(_BUS)]:02X}:00.0"

    def _pci_info(self, idx: int) -> Any:
        info = _n.nvmlPciInfo_t()
        info.busIdLegacy = info.busId = self._bus_id(idx).encode()
        info.domain, info.bus, info.device = idx // len(_BUS), _BUS[idx % len(_BUS)], 0
        info.pciDeviceId, info.pciSubSystemId = _PCI_DEVICE_ID[self._models[idx].name], 0x16C110DE
        return info

    def nvmlDeviceGetPciInfo(self, handle: Any) -> Any:
        h = self._any_handle(handle)
        if isinstance(h, MigDeviceHandle):
            self._mig_of(h)
        return self._pci_info(h.index if isinstance(h, DeviceHandle) else h.gpu)

    nvmlDeviceGetPciInfo_v3 = nvmlDeviceGetPciInfo

    def nvmlDeviceGetCudaComputeCapability(self, handle: Any) -> tuple[int, int]:
        h = self._any_handle(handle)
        return _COMPUTE_CAP[self._models[h.index if isinstance(h, DeviceHandle) else h.gpu].name]

    # -- memory, processes (the rest of telemetry: simtelemetry)

    def _procs(self, h: DeviceHandle | MigDeviceHandle) -> tuple[list[dict], int]:
        """Processes visible on the handle, and its memory size in bytes."""
        if isinstance(h, DeviceHandle):
            gpu = self._read()["gpus"][h.index]
            return gpu["processes"], self._models[h.index].memory_mib * 2**20
        gpu, gi, _ = self._mig_of(h)
        mem = self._models[h.gpu].profile_by_id(gi["profile_id"]).memory_mib * 2**20
        return [p for p in gpu["processes"] if p["gi"] == gi["id"]], mem

    def nvmlDeviceGetMemoryInfo(self, handle: Any, version: int | None = None) -> Any:
        h = self._any_handle(handle)
        if isinstance(h, DeviceHandle):  # processes plus declared load
            total = self._models[h.index].memory_mib * 2**20
            used = self._gpu_models[h.index].load(self._read()["gpus"][h.index])[1]
        else:
            procs, total = self._procs(h)
            used = min(total, sum(p["used_memory"] for p in procs))
        mem = _n.c_nvmlMemory_v2_t() if version else _n.c_nvmlMemory_t()
        if version:
            mem.version, mem.reserved = version, 0
        mem.total, mem.used, mem.free = total, used, total - used
        return mem

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> list:
        h = self._any_handle(handle)
        procs = self._procs(h)[0]
        if isinstance(h, MigDeviceHandle):  # a MIG device sees the processes of its compute instance
            ci_id = self._mig_of(h)[2]["id"]
            procs = [p for p in procs if p["ci"] == ci_id]
        out = []
        for p in procs:
            gi = _NA_UINT if p["gi"] is None else p["gi"]
            ci = _NA_UINT if p["ci"] is None else p["ci"]
            out.append(_n.nvmlStructToFriendlyObject(_n.c_nvmlProcessInfo_v2_t(p["pid"], p["used_memory"], gi, ci)))
        return out

    nvmlDeviceGetComputeRunningProcesses_v2 = nvmlDeviceGetComputeRunningProcesses
    nvmlDeviceGetComputeRunningProcesses_v3 = nvmlDeviceGetComputeRunningProcesses

    # -- NVLink

    def _link_peer(self, device: Any, link: int) -> int | None:
        idx = self._whole(device)
        self._read()
        links = self._models[idx].nvlink_links
        if not 0 <= link < _n.NVML_NVLINK_MAX_LINKS:
            raise err(_n.NVML_ERROR_INVALID_ARGUMENT)
        if link >= links:
            raise err(_n.NVML_ERROR_NOT_SUPPORTED)
        peers = next(([g for g in d if g != idx] for d in self._host.nvlink_domains if idx in d), [])
        return peers[link % len(peers)] if peers else None

    def nvmlDeviceGetNvLinkState(self, device: Any, link: int) -> int:
        return _n.NVML_FEATURE_DISABLED if self._link_peer(device, link) is None else _n.NVML_FEATURE_ENABLED

    def nvmlDeviceGetNvLinkRemotePciInfo(self, device: Any, link: int) -> Any:
        peer = self._link_peer(device, link)
        if peer is None:
            raise err(_n.NVML_ERROR_NOT_SUPPORTED)
        return self._pci_info(peer)

    nvmlDeviceGetNvLinkRemotePciInfo_v2 = nvmlDeviceGetNvLinkRemotePciInfo

    def nvmlDeviceGetNvLinkRemoteDeviceType(self, handle: Any, link: int) -> int:
        if self._link_peer(handle, link) is None:
            raise err(_n.NVML_ERROR_NOT_SUPPORTED)
        return _n.NVML_NVLINK_DEVICE_TYPE_GPU

    # -- MIG mode

    def nvmlDeviceGetMigMode(self, device: Any) -> list[int]:
        idx = self._whole(device)
        gpu = self._read()["gpus"][idx]
        if not self._models[idx].mig_capable:
            raise err(_n.NVML_ERROR_NOT_SUPPORTED)
        return [gpu["mig_current"], gpu["mig_pending"]]

    def nvmlDeviceSetMigMode(self, device: Any, mode: int) -> int:
        """Record ``mode`` as pending; it takes effect at the next GPU reset.
        Returns the activation status: RESET_REQUIRED while pending differs."""
        idx = self._whole(device)

        def apply(state: dict) -> int:
            gpu = state["gpus"][idx]
            if not self._models[idx].mig_capable:
                raise err(_n.NVML_ERROR_NOT_SUPPORTED)
            if mode not in (_n.NVML_DEVICE_MIG_DISABLE, _n.NVML_DEVICE_MIG_ENABLE):
                raise err(_n.NVML_ERROR_INVALID_ARGUMENT)
            if mode != gpu["mig_current"] and (gpu["gis"] or gpu["processes"]):
                raise err(_n.NVML_ERROR_IN_USE)
            gpu["mig_pending"] = mode
            return _n.NVML_SUCCESS if mode == gpu["mig_current"] else _n.NVML_ERROR_RESET_REQUIRED

        return self._mutate(apply)


for _name, _value in _EXPORTS.items():
    globals().setdefault(_name, _value)
_default = SimNvml()
configure = _default.configure
for _name in dir(SimNvml):
    if _name.startswith(("nvml", "sim_")):
        globals()[_name] = getattr(_default, _name)
del _name, _value, _code, _text
