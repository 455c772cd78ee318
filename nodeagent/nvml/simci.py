"""Compute-instance calls of the simulated NVML (a mixin of ``sim.SimNvml``, next to ``simmig.MigApi``).

Same names, arguments and return types as ``pynvml``. A compute instance lives
inside a GPU instance: its sizes (``CI_SLICES``) and start positions
(``ci_starts``) follow the GPU instance's compute slices. Error codes follow the
NVML reference: a CI profile the GPU instance cannot hold -> INVALID_ARGUMENT
(NOT_SUPPORTED from the profile-info query), occupied placement ->
INSUFFICIENT_RESOURCES, destroying one with processes -> IN_USE, missing id ->
NOT_FOUND.
"""

from __future__ import annotations

from typing import Any

import pynvml as _n

from mesh.gpumodels import MigProfile
from nodeagent.nvml.simargs import array_out, err, fill_placements, placement_in, uint_out
from nodeagent.nvml.simmig import lowest_free
from nodeagent.nvml.simstate import ComputeInstanceHandle, GpuInstanceHandle, to_pointer

CI_SLICES = {_n.NVML_COMPUTE_INSTANCE_PROFILE_1_SLICE: 1, _n.NVML_COMPUTE_INSTANCE_PROFILE_2_SLICE: 2,
              _n.NVML_COMPUTE_INSTANCE_PROFILE_3_SLICE: 3, _n.NVML_COMPUTE_INSTANCE_PROFILE_4_SLICE: 4,
              _n.NVML_COMPUTE_INSTANCE_PROFILE_7_SLICE: 7}
_CI_SMALLER = {7: (1, 2, 3, 4), 4: (1, 2), 3: (1, 2), 2: (1,), 1: ()}  # CI sizes below the GI's own


def ci_starts(gi_slices: int, ci_slices: int) -> tuple[int, ...]:
    """Compute-slice start positions of a CI inside a GI; () if unsupported."""
    if ci_slices == gi_slices:
        return (0,)
    if ci_slices not in _CI_SMALLER.get(gi_slices, ()):
        return ()
    step = {1: 1, 2: 2, 3: 4, 4: 4}[ci_slices]
    return tuple(s for s in range(0, gi_slices, step) if s + ci_slices <= gi_slices)


class ComputeInstanceApi:
    """Compute-instance calls; state access comes from SimNvml (_read, _mutate, _model, _handle, _gi_of, _ci_of,
    _device_handle)."""

    def _ci_profile(self, h: GpuInstanceHandle, gi: dict, profile: int) -> tuple[int, tuple[int, ...], MigProfile]:
        gp = self._model(h.gpu).profile_by_id(gi["profile_id"])
        slices = CI_SLICES.get(profile, 0)
        starts = ci_starts(gp.compute_slices, slices) if slices else ()
        return slices, starts, gp

    def nvmlGpuInstanceGetComputeInstanceProfileInfo(self, device: Any, profile: int, engProfile: int, version: int = 2) -> Any:
        if version not in (1, 2):
            raise err(_n.NVML_ERROR_FUNCTION_NOT_FOUND)
        h = self._handle(device, GpuInstanceHandle)
        _, gi = self._gi_of(self._read(), h)
        if not 0 <= profile < _n.NVML_COMPUTE_INSTANCE_PROFILE_COUNT or engProfile != _n.NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED:
            raise err(_n.NVML_ERROR_INVALID_ARGUMENT)
        slices, starts, gp = self._ci_profile(h, gi, profile)
        if not starts:
            raise err(_n.NVML_ERROR_NOT_SUPPORTED)
        model = self._model(h.gpu)
        sm_per_slice = min(p.multiprocessors for p in model.mig_profiles if p.compute_slices == 1)
        info = _n.c_nvmlComputeInstanceProfileInfo_v2_t() if version == 2 else _n.c_nvmlComputeInstanceProfileInfo_t()
        info.id, info.sliceCount, info.instanceCount = profile, slices, len(starts)
        info.multiprocessorCount = gp.multiprocessors if slices == gp.compute_slices else slices * sm_per_slice
        info.sharedCopyEngineCount = gp.compute_slices
        if version == 2:
            info.name = (f"MIG {gp.name}" if slices == gp.compute_slices else f"MIG {slices}c.{gp.name}").encode()
        return info

    nvmlGpuInstanceGetComputeInstanceProfileInfoV = nvmlGpuInstanceGetComputeInstanceProfileInfo

    def _ci_free(self, gi: dict, slices: int, starts: tuple[int, ...]) -> list[int]:
        used = set()
        for c in gi["cis"]:
            used.update(range(c["start"], c["start"] + CI_SLICES[c["profile_id"]]))
        return [s for s in starts if not used.intersection(range(s, s + slices))]

    def nvmlGpuInstanceGetComputeInstanceRemainingCapacity(self, gpuInstance: Any, profileId: int) -> int:
        h = self._handle(gpuInstance, GpuInstanceHandle)
        _, gi = self._gi_of(self._read(), h)
        slices, starts, _ = self._ci_profile(h, gi, profileId)
        if not starts:
            raise err(_n.NVML_ERROR_INVALID_ARGUMENT)
        return len(self._ci_free(gi, slices, starts))

    def nvmlGpuInstanceGetComputeInstancePossiblePlacements(self, gpuInstance: Any, profileId: int, placementsRef: Any, countRef: Any) -> int:
        h = self._handle(gpuInstance, GpuInstanceHandle)
        _, gi = self._gi_of(self._read(), h)
        slices, starts, _ = self._ci_profile(h, gi, profileId)
        if not starts:
            raise err(_n.NVML_ERROR_INVALID_ARGUMENT)
        return fill_placements(placementsRef, uint_out(countRef), starts, slices)

    def nvmlGpuInstanceCreateComputeInstance(self, gpuInstance: Any, profileId: int) -> ComputeInstanceHandle:
        return self._create_ci(self._handle(gpuInstance, GpuInstanceHandle), profileId, None)

    def nvmlGpuInstanceCreateComputeInstanceWithPlacement(self, gpuInstance: Any, profileId: int, placement: Any) -> ComputeInstanceHandle:
        h = self._handle(gpuInstance, GpuInstanceHandle)
        return self._create_ci(h, profileId, placement_in(placement))

    def _create_ci(self, h: GpuInstanceHandle, profile_id: int, placement: tuple[int, int] | None) -> ComputeInstanceHandle:
        def apply(state: dict) -> ComputeInstanceHandle:
            gpu, gi = self._gi_of(state, h)
            slices, starts, _ = self._ci_profile(h, gi, profile_id)
            if not starts:
                raise err(_n.NVML_ERROR_INVALID_ARGUMENT)
            free = self._ci_free(gi, slices, starts)
            if placement is None:
                if not free:
                    raise err(_n.NVML_ERROR_INSUFFICIENT_RESOURCES)
                start = free[0]
            else:
                start, size = placement
                if start not in starts or size != slices:
                    raise err(_n.NVML_ERROR_INVALID_ARGUMENT)
                if start not in free:
                    raise err(_n.NVML_ERROR_INSUFFICIENT_RESOURCES)
            uid = gpu["next_uid"]
            gpu["next_uid"] += 1
            ci_id = lowest_free((c["id"] for c in gi["cis"]), 0)
            gi["cis"].append({"id": ci_id, "profile_id": profile_id, "start": start, "uid": uid})
            return ComputeInstanceHandle(h.gpu, uid)

        return self._mutate(apply)

    def nvmlComputeInstanceDestroy(self, computeInstance: Any) -> int:
        h = self._handle(computeInstance, ComputeInstanceHandle)

        def apply(state: dict) -> int:
            gpu, gi, ci = self._ci_of(state, h.gpu, h.uid)
            if any(p["gi"] == gi["id"] and p["ci"] == ci["id"] for p in gpu["processes"]):
                raise err(_n.NVML_ERROR_IN_USE)
            gi["cis"].remove(ci)
            return _n.NVML_SUCCESS

        return self._mutate(apply)

    def nvmlGpuInstanceGetComputeInstances(self, gpuInstance: Any, profileId: int, computeInstancesRef: Any, countRef: Any) -> int:
        h = self._handle(gpuInstance, GpuInstanceHandle)
        _, gi = self._gi_of(self._read(), h)
        if profileId not in CI_SLICES:
            raise err(_n.NVML_ERROR_INVALID_ARGUMENT)
        count = uint_out(countRef)
        found = sorted((c for c in gi["cis"] if c["profile_id"] == profileId), key=lambda c: c["id"])
        if found:
            out = array_out(computeInstancesRef)
            for i, c in enumerate(found):
                out[i] = to_pointer(ComputeInstanceHandle(h.gpu, c["uid"]), _n.c_nvmlComputeInstance_t)
        count.value = len(found)
        return _n.NVML_SUCCESS

    def nvmlGpuInstanceGetComputeInstanceById(self, gpuInstance: Any, computeInstanceId: int) -> ComputeInstanceHandle:
        h = self._handle(gpuInstance, GpuInstanceHandle)
        _, gi = self._gi_of(self._read(), h)
        for c in gi["cis"]:
            if c["id"] == computeInstanceId:
                return ComputeInstanceHandle(h.gpu, c["uid"])
        raise err(_n.NVML_ERROR_NOT_FOUND)

    def nvmlComputeInstanceGetInfo(self, computeInstance: Any) -> Any:
        h = self._handle(computeInstance, ComputeInstanceHandle)
        _, gi, ci = self._ci_of(self._read(), h.gpu, h.uid)
        info = _n.c_nvmlComputeInstanceInfo_t()
        info.device = to_pointer(self._device_handle(h.gpu), _n.c_nvmlDevice_t)
        info.gpuInstance = to_pointer(GpuInstanceHandle(h.gpu, gi["uid"]), _n.c_nvmlGpuInstance_t)
        info.id, info.profileId = ci["id"], ci["profile_id"]
        info.placement.start, info.placement.size = ci["start"], CI_SLICES[ci["profile_id"]]
        return info

    nvmlComputeInstanceGetInfo_v2 = nvmlComputeInstanceGetInfo
