"""The agent's GPU layer: inventory and the MIG lifecycle through NVML.

`nvml` is the real `pynvml` module on a GPU host or the simulated NVML; both
are called the same way here (the real library's calling conventions,
ctypes out-parameters included), so this code path is the one that runs on
real hardware.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass

from gpumesh.v1 import types_pb2
from mesh import gpumodels

logger = logging.getLogger(__name__)


class GpuError(RuntimeError):
    """An NVML call failed; `nvml_code` keeps NVML's return code."""

    def __init__(self, message: str, nvml_code: int | None = None) -> None:
        super().__init__(message)
        self.nvml_code = nvml_code


class GpuInUse(GpuError):
    """Refused because processes run on the device (NVML_ERROR_IN_USE); `pids` names them
    (empty when NVML refused without our having seen them)."""

    def __init__(self, message: str, pids: list[int] | tuple[int, ...] = (), nvml_code: int | None = 19) -> None:
        super().__init__(message, nvml_code)
        self.pids = list(pids)


class GpuNotSupported(GpuError):
    """The GPU cannot do this (NVML_ERROR_NOT_SUPPORTED), e.g. MIG on a non-MIG GPU or MIG disabled."""


class GpuInsufficientResources(GpuError):
    """The placement is taken or the GPU is full (NVML_ERROR_INSUFFICIENT_RESOURCES)."""


# NVML return codes (pynvml.NVML_ERROR_*) with a typed subclass.
_TYPED = {3: GpuNotSupported, 19: GpuInUse, 23: GpuInsufficientResources}
NVML_SUCCESS = 0
NVML_ERROR_RESET_REQUIRED = 16


@dataclass(frozen=True)
class MigMode:
    """MIG mode of one GPU: what is in effect now, and what takes effect at the next reset."""

    current: bool
    pending: bool

    @property
    def reset_needed(self) -> bool:
        return self.current != self.pending


@dataclass(frozen=True)
class MigInstance:
    gpu_index: int
    gi_id: int
    ci_id: int | None
    profile: str
    start: int
    uuid: str


def model_of(product_name: str) -> gpumodels.GpuModel | None:
    for m in gpumodels.MODELS.values():
        if m.product_name == product_name:
            return m
    try:
        return gpumodels.get_model(product_name)
    except KeyError:
        return None


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class NvmlGpus:
    def __init__(self, nvml) -> None:
        self.nvml = nvml
        self.models: dict[int, gpumodels.GpuModel | None] = {}
        self.uuids: dict[int, str] = {}
        self.last_seen: dict[int, types_pb2.Gpu] = {}
        self.memory: dict[int, int] = {}   # GPU index -> total memory in bytes

    def _err(self, what: str, e: Exception) -> GpuError:
        code = getattr(e, "value", None)
        return _TYPED.get(code, GpuError)(f"{what}: {e}", nvml_code=code)

    def init(self) -> None:
        self.nvml.nvmlInit()

    def shutdown(self) -> None:
        try:
            self.nvml.nvmlShutdown()
        except self.nvml.NVMLError:
            pass

    def handle(self, index: int):
        return self.nvml.nvmlDeviceGetHandleByIndex(index)

    # -- inventory ------------------------------------------------------------------

    def inventory(self) -> list[types_pb2.Gpu]:
        """Every GPU NVML enumerates. A GPU that fell off the bus keeps the identity it had
        when last seen (so its slices stay accounted to it); one never seen is left out."""
        n = self.nvml
        out = []
        for i in range(n.nvmlDeviceGetCount()):
            try:
                g = self._gpu(i)
                self.last_seen[i] = g
                out.append(g)
            except n.NVMLError_GpuIsLost:
                logger.warning("GPU %s is lost (fell off the bus)", i)
                if i in self.last_seen:
                    out.append(self.last_seen[i])
        return out

    def _gpu(self, i: int) -> types_pb2.Gpu:
        n = self.nvml
        h = n.nvmlDeviceGetHandleByIndex(i)
        name = _text(n.nvmlDeviceGetName(h))
        model = model_of(name)
        self.models[i] = model
        uuid = _text(n.nvmlDeviceGetUUID(h))
        self.uuids[i] = uuid
        self.memory[i] = int(n.nvmlDeviceGetMemoryInfo(h).total)
        g = types_pb2.Gpu(index=i, uuid=uuid, model=model.name if model else name, product_name=name,
                          memory_bytes=int(n.nvmlDeviceGetMemoryInfo(h).total), nvlink_domain=-1)
        try:
            current, pending = n.nvmlDeviceGetMigMode(h)
            g.mig_enabled = current == n.NVML_DEVICE_MIG_ENABLE
            g.mig_pending = pending != current
        except n.NVMLError_NotSupported:
            pass
        try:
            g.pci_bus_id = _text(n.nvmlDeviceGetPciInfo(h).busId)
        except (n.NVMLError, AttributeError):
            pass
        try:
            g.serial = _text(n.nvmlDeviceGetSerial(h))
        except n.NVMLError:
            pass
        return g

    # -- MIG ----------------------------------------------------------------------------

    def _model(self, index: int) -> gpumodels.GpuModel:
        model = self.models.get(index)
        if model is None or not model.mig_capable:
            raise GpuError(f"GPU {index} is not a known MIG-capable model")
        return model

    def _compute_instances(self, gi, profile: gpumodels.MigProfile) -> list:
        n = self.nvml
        info = n.nvmlGpuInstanceGetComputeInstanceProfileInfo(gi, profile.ci_profile,
                                                             n.NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED)
        arr = (n.c_nvmlComputeInstance_t * 8)()
        count = ctypes.c_uint(0)
        n.nvmlGpuInstanceGetComputeInstances(gi, info.id, arr, ctypes.byref(count))
        return [arr[i] for i in range(count.value)]

    def _mig_uuids(self, index: int) -> dict[tuple[int, int], str]:
        n = self.nvml
        h = self.handle(index)
        out = {}
        for i in range(n.nvmlDeviceGetMaxMigDeviceCount(h)):
            try:
                mig = n.nvmlDeviceGetMigDeviceHandleByIndex(h, i)
            except n.NVMLError_NotFound:
                continue
            out[(n.nvmlDeviceGetGpuInstanceId(mig), n.nvmlDeviceGetComputeInstanceId(mig))] = \
                _text(n.nvmlDeviceGetUUID(mig))
        return out

    def mig_instances(self, index: int) -> list[MigInstance]:
        """Every GPU instance on GPU `index` (with its compute instance and MIG device UUID)."""
        n = self.nvml
        model = self._model(index)
        h = self.handle(index)
        found = []
        try:
            for p in model.mig_profiles:
                arr = (n.c_nvmlGpuInstance_t * max(p.max_instances, 1))()
                count = ctypes.c_uint(0)
                n.nvmlDeviceGetGpuInstances(h, p.gi_profile_id, arr, ctypes.byref(count))
                for k in range(count.value):
                    gi = arr[k]
                    info = n.nvmlGpuInstanceGetInfo(gi)
                    cis = self._compute_instances(gi, p)
                    ci_id = n.nvmlComputeInstanceGetInfo(cis[0]).id if cis else None
                    found.append((info.id, ci_id, p.name, info.placement.start))
            uuids = self._mig_uuids(index) if found else {}
        except n.NVMLError as e:
            raise self._err(f"listing MIG instances of GPU {index}", e) from e
        return [MigInstance(index, gi, ci, prof, start, uuids.get((gi, ci), "") if ci is not None else "")
                for gi, ci, prof, start in found]

    def create_mig(self, index: int, profile_name: str, start: int) -> MigInstance:
        """Create a GPU instance at `start` and one compute instance spanning it."""
        n = self.nvml
        model = self._model(index)
        p = model.profile(profile_name)
        h = self.handle(index)
        try:
            info = n.nvmlDeviceGetGpuInstanceProfileInfo(h, p.nvml_profile)
            placement = n.c_nvmlGpuInstancePlacement_t()
            placement.start, placement.size = start, p.memory_slices
            gi = n.nvmlDeviceCreateGpuInstanceWithPlacement(h, info.id, ctypes.byref(placement))
        except n.NVMLError as e:
            raise self._err(f"creating {profile_name}@{start} on GPU {index}", e) from e
        try:
            ci_info = n.nvmlGpuInstanceGetComputeInstanceProfileInfo(
                gi, p.ci_profile, n.NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED)
            ci = n.nvmlGpuInstanceCreateComputeInstance(gi, ci_info.id)
            gi_id = n.nvmlGpuInstanceGetInfo(gi).id
            ci_id = n.nvmlComputeInstanceGetInfo(ci).id
        except n.NVMLError as e:
            try:
                n.nvmlGpuInstanceDestroy(gi)
            except n.NVMLError:
                logger.warning("could not roll back GPU instance after a failed compute instance")
            raise self._err(f"creating the compute instance of {profile_name}@{start} on GPU {index}", e) from e
        uuid = self._mig_uuids(index).get((gi_id, ci_id), "")
        return MigInstance(index, gi_id, ci_id, profile_name, start, uuid)

    def destroy_mig(self, index: int, gi_id: int) -> None:
        """Destroy the compute instances of GPU instance `gi_id`, then the instance."""
        n = self.nvml
        model = self._model(index)
        h = self.handle(index)
        try:
            gi = n.nvmlDeviceGetGpuInstanceById(h, gi_id)
        except n.NVMLError_NotFound:
            return
        except n.NVMLError as e:
            raise self._err(f"finding GPU instance {gi_id} on GPU {index}", e) from e
        pids = self.mig_pids(index, gi_id)
        if pids:
            raise GpuInUse(f"GPU instance {gi_id} on GPU {index} is in use by process(es) "
                           f"{', '.join(map(str, pids))}", pids)
        try:
            p = model.profile_by_id(n.nvmlGpuInstanceGetInfo(gi).profileId)
            for ci in self._compute_instances(gi, p):
                n.nvmlComputeInstanceDestroy(ci)
            n.nvmlGpuInstanceDestroy(gi)
        except n.NVMLError as e:
            raise self._err(f"destroying GPU instance {gi_id} on GPU {index}", e) from e

    # -- processes ----------------------------------------------------------------------

    def _pids_of(self, handle) -> list[int]:
        n = self.nvml
        return sorted({int(p.pid) for p in n.nvmlDeviceGetComputeRunningProcesses(handle)})

    def mig_pids(self, index: int, gi_id: int) -> list[int]:
        """PIDs of the compute processes on the MIG devices of GPU instance `gi_id` (queried on
        each MIG device handle, as NVML reports processes per compute instance)."""
        n = self.nvml
        h = self.handle(index)
        pids: set[int] = set()
        try:
            for i in range(n.nvmlDeviceGetMaxMigDeviceCount(h)):
                try:
                    mig = n.nvmlDeviceGetMigDeviceHandleByIndex(h, i)
                except n.NVMLError_NotFound:
                    continue
                if n.nvmlDeviceGetGpuInstanceId(mig) == gi_id:
                    pids.update(self._pids_of(mig))
        except n.NVMLError as e:
            raise self._err(f"listing the processes of GPU instance {gi_id} on GPU {index}", e) from e
        return sorted(pids)

    def device_pids(self, uuid: str) -> list[int]:
        """PIDs of the compute processes on a GPU or MIG device, by UUID."""
        n = self.nvml
        try:
            return self._pids_of(n.nvmlDeviceGetHandleByUUID(uuid))
        except n.NVMLError as e:
            raise self._err(f"listing the processes of {uuid}", e) from e

    # -- MIG mode -----------------------------------------------------------------------

    def mig_mode(self, index: int) -> MigMode:
        n = self.nvml
        try:
            current, pending = n.nvmlDeviceGetMigMode(self.handle(index))
        except n.NVMLError as e:
            raise self._err(f"reading the MIG mode of GPU {index}", e) from e
        return MigMode(current == n.NVML_DEVICE_MIG_ENABLE, pending == n.NVML_DEVICE_MIG_ENABLE)

    def set_mig_mode(self, index: int, enabled: bool) -> MigMode:
        """Ask NVML for MIG mode `enabled`; never resets the GPU. The answer's `reset_needed`
        says whether the mode is only pending (it takes effect at the next GPU reset or reboot)."""
        n = self.nvml
        h = self.handle(index)
        mode = n.NVML_DEVICE_MIG_ENABLE if enabled else n.NVML_DEVICE_MIG_DISABLE
        try:
            status = n.nvmlDeviceSetMigMode(h, mode)
        except n.NVMLError_ResetRequired:
            status = NVML_ERROR_RESET_REQUIRED
        except n.NVMLError_InUse as e:
            raise GpuInUse(f"setting MIG mode {'enabled' if enabled else 'disabled'} on GPU {index}: {e} "
                           f"(MIG instances or processes exist)") from e
        except n.NVMLError as e:
            raise self._err(f"setting MIG mode {'enabled' if enabled else 'disabled'} on GPU {index}", e) from e
        mode_now = self.mig_mode(index)
        if status not in (NVML_SUCCESS, NVML_ERROR_RESET_REQUIRED, None):
            logger.warning("unexpected MIG activation status %s on GPU %s", status, index)
        return mode_now
