"""GPU-instance and MIG-device calls of the simulated NVML (a mixin of ``sim.SimNvml``).

Same names, arguments and return types as ``pynvml``; placement math comes
from ``mesh.gpumodels``; ctypes arguments are taken as ``simargs`` describes;
compute instances are in ``simci``. Error codes follow the NVML reference: MIG
disabled -> NOT_SUPPORTED, unknown profile id -> INVALID_ARGUMENT
(NOT_SUPPORTED from the profile-info queries), occupied placement ->
INSUFFICIENT_RESOURCES, destroying an instance that still has compute
instances or processes -> IN_USE, missing id -> NOT_FOUND.
"""

from __future__ import annotations

import ctypes
from typing import Any

import pynvml as _n

from mesh.gpumodels import GpuModel, MigProfile, placement_conflict
from nodeagent.nvml.simargs import array_out, err, fill_placements, placement_in, uint_out
from nodeagent.nvml.simstate import GpuInstanceHandle, MigDeviceHandle, to_pointer


def lowest_free(used: Any, first: int) -> int:
    """The lowest id from `first` up that `used` does not hold (new GPU and compute instance ids)."""
    taken = set(used)
    n = first
    while n in taken:
        n += 1
    return n


class MigApi:
    """GPU-instance and MIG-device calls; state access comes from SimNvml."""

    # -- helpers the mixin needs from SimNvml: _read, _mutate, _device, _model, _gi_of, _ci_of

    def _mig_gpu(self, state: dict, idx: int) -> tuple[dict, GpuModel]:
        model = self._model(idx)
        gpu = state["gpus"][idx]
        if not model.mig_capable or gpu["mig_current"] != _n.NVML_DEVICE_MIG_ENABLE:
            raise err(_n.NVML_ERROR_NOT_SUPPORTED)
        return gpu, model

    def _mig_capable(self, idx: int) -> GpuModel:
        """The model, for the queries a real MIG-capable GPU answers with MIG disabled too (profile
        info, possible placements, the list of GPU instances: seen on an H100 with MIG off)."""
        model = self._model(idx)
        if not model.mig_capable:
            raise err(_n.NVML_ERROR_NOT_SUPPORTED)
        return model

    @staticmethod
    def _gi_profile(model: GpuModel, profile_id: int, code: int = _n.NVML_ERROR_INVALID_ARGUMENT) -> MigProfile:
        for p in model.mig_profiles:
            if p.gi_profile_id == profile_id:
                return p
        raise err(code)

    @staticmethod
    def _layout(model: GpuModel, gpu: dict) -> list[tuple[str, int]]:
        return [(model.profile_by_id(g["profile_id"]).name, g["start"]) for g in gpu["gis"]]

    def _gi_info_struct(self, p: MigProfile, version: int) -> Any:
        info = _n.c_nvmlGpuInstanceProfileInfo_v2_t() if version == 2 else _n.c_nvmlGpuInstanceProfileInfo_t()
        info.id, info.isP2pSupported, info.sliceCount = p.gi_profile_id, 0, p.compute_slices
        info.instanceCount, info.multiprocessorCount = p.max_instances, p.multiprocessors
        info.copyEngineCount = p.compute_slices
        info.decoderCount = {1: int(p.media_extensions or p.memory_slices > 1), 2: 1, 3: 2, 4: 2, 7: 5}[p.compute_slices]
        info.encoderCount = 0
        info.jpegCount = info.ofaCount = int(p.media_extensions or p.compute_slices == 7)
        info.memorySizeMB = p.memory_mib
        if version == 2:
            info.name = f"MIG {p.name}".encode()
        return info

    # -- GPU instance profiles and placements

    def nvmlDeviceGetGpuInstanceProfileInfo(self, device: Any, profile: int, version: int = 2) -> Any:
        if version not in (1, 2):
            raise err(_n.NVML_ERROR_FUNCTION_NOT_FOUND)
        idx = self._device(device)
        self._read()
        model = self._mig_capable(idx)
        if not 0 <= profile < _n.NVML_GPU_INSTANCE_PROFILE_COUNT:
            raise err(_n.NVML_ERROR_INVALID_ARGUMENT)
        for p in model.mig_profiles:
            if p.nvml_profile == profile:
                return self._gi_info_struct(p, version)
        raise err(_n.NVML_ERROR_NOT_SUPPORTED)

    nvmlDeviceGetGpuInstanceProfileInfoV = nvmlDeviceGetGpuInstanceProfileInfo

    def nvmlDeviceGetGpuInstanceProfileInfoById(self, device: Any, profileId: int) -> Any:
        idx = self._device(device)
        self._read()
        model = self._mig_capable(idx)
        return self._gi_info_struct(self._gi_profile(model, profileId, _n.NVML_ERROR_NOT_SUPPORTED), 2)

    nvmlDeviceGetGpuInstanceProfileInfoByIdV = nvmlDeviceGetGpuInstanceProfileInfoById

    def nvmlDeviceGetGpuInstanceRemainingCapacity(self, device: Any, profileId: int) -> int:
        idx = self._device(device)
        gpu = self._read()["gpus"][idx]
        model = self._mig_capable(idx)  # with MIG off, a real H100 answers the capacity of an empty GPU
        p = self._gi_profile(model, profileId)
        layout = self._layout(model, gpu)
        n = 0
        for s in p.starts:  # aligned, equal-size blocks: greedy is optimal
            if placement_conflict(model, layout, p.name, s) is None:
                layout.append((p.name, s))
                n += 1
        return n

    def nvmlDeviceGetGpuInstancePossiblePlacements(self, device: Any, profileId: int, placementsRef: Any, countRef: Any) -> int:
        idx = self._device(device)
        model = self._model(idx)
        self._read()
        if not model.mig_capable:
            raise err(_n.NVML_ERROR_NOT_SUPPORTED)
        p = self._gi_profile(model, profileId)
        count = uint_out(countRef)
        return fill_placements(placementsRef, count, p.starts, p.memory_slices)

    nvmlDeviceGetGpuInstancePossiblePlacements_v2 = nvmlDeviceGetGpuInstancePossiblePlacements

    # -- GPU instances

    def nvmlDeviceCreateGpuInstance(self, device: Any, profileId: int) -> GpuInstanceHandle:
        return self._create_gi(self._device(device), profileId, None)

    def nvmlDeviceCreateGpuInstanceWithPlacement(self, device: Any, profileId: int, placement: Any) -> GpuInstanceHandle:
        idx = self._device(device)
        handle = self._create_gi(idx, profileId, placement_in(placement))
        _test_delay()
        return handle

    def _create_gi(self, idx: int, profile_id: int, placement: tuple[int, int] | None) -> GpuInstanceHandle:
        def apply(state: dict) -> GpuInstanceHandle:
            gpu, model = self._mig_gpu(state, idx)
            p = self._gi_profile(model, profile_id)
            layout = self._layout(model, gpu)
            if placement is None:
                start = next((s for s in p.starts if placement_conflict(model, layout, p.name, s) is None), None)
                if start is None:
                    raise err(_n.NVML_ERROR_INSUFFICIENT_RESOURCES)
            else:
                start, size = placement
                if start not in p.starts or size != p.memory_slices:
                    raise err(_n.NVML_ERROR_INVALID_ARGUMENT)
                if placement_conflict(model, layout, p.name, start) is not None:
                    raise err(_n.NVML_ERROR_INSUFFICIENT_RESOURCES)
            uid = gpu["next_uid"]
            gpu["next_uid"] += 1
            gi_id = lowest_free((g["id"] for g in gpu["gis"]), 1)
            gpu["gis"].append({"id": gi_id, "profile_id": p.gi_profile_id, "start": start, "uid": uid, "cis": []})
            return GpuInstanceHandle(idx, uid)

        return self._mutate(apply)

    def nvmlGpuInstanceDestroy(self, gpuInstance: Any) -> int:
        h = self._handle(gpuInstance, GpuInstanceHandle)

        def apply(state: dict) -> int:
            gpu, gi = self._gi_of(state, h)
            if gi["cis"] or any(p["gi"] == gi["id"] for p in gpu["processes"]):
                raise err(_n.NVML_ERROR_IN_USE)
            gpu["gis"].remove(gi)
            return _n.NVML_SUCCESS

        return self._mutate(apply)

    def nvmlDeviceGetGpuInstances(self, device: Any, profileId: int, gpuInstancesRef: Any, countRef: Any) -> int:
        idx = self._device(device)
        gpu = self._read()["gpus"][idx]
        model = self._mig_capable(idx)
        self._gi_profile(model, profileId)
        count = uint_out(countRef)
        found = sorted((g for g in gpu["gis"] if g["profile_id"] == profileId), key=lambda g: g["id"])
        if found:
            out = array_out(gpuInstancesRef)
            for i, g in enumerate(found):
                out[i] = to_pointer(GpuInstanceHandle(idx, g["uid"]), _n.c_nvmlGpuInstance_t)
        count.value = len(found)
        return _n.NVML_SUCCESS

    def nvmlDeviceGetGpuInstanceById(self, device: Any, gpuInstanceId: int) -> GpuInstanceHandle:
        idx = self._device(device)
        gpu = self._read()["gpus"][idx]
        self._mig_capable(idx)  # with MIG off: NOT_FOUND, as a real H100 answers
        for g in gpu["gis"]:
            if g["id"] == gpuInstanceId:
                return GpuInstanceHandle(idx, g["uid"])
        raise err(_n.NVML_ERROR_NOT_FOUND)

    def nvmlGpuInstanceGetInfo(self, gpuInstance: Any) -> Any:
        h = self._handle(gpuInstance, GpuInstanceHandle)
        _, gi = self._gi_of(self._read(), h)
        p = self._model(h.gpu).profile_by_id(gi["profile_id"])
        info = _n.c_nvmlGpuInstanceInfo_t()
        info.device = to_pointer(self._device_handle(h.gpu), _n.c_nvmlDevice_t)
        info.id, info.profileId = gi["id"], gi["profile_id"]
        info.placement.start, info.placement.size = gi["start"], p.memory_slices
        return info

    # -- MIG device handles

    def nvmlDeviceGetMaxMigDeviceCount(self, device: Any) -> int:
        idx = self._device(device)
        gpu = self._read()["gpus"][idx]
        if not self._model(idx).mig_capable:
            raise err(_n.NVML_ERROR_NOT_SUPPORTED)
        return 7 if gpu["mig_current"] == _n.NVML_DEVICE_MIG_ENABLE else 0

    def nvmlDeviceGetMigDeviceHandleByIndex(self, device: Any, index: int) -> MigDeviceHandle:
        idx = self._device(device)
        state = self._read()
        if not self._model(idx).mig_capable:
            raise err(_n.NVML_ERROR_NOT_SUPPORTED)
        gpu = state["gpus"][idx]
        if gpu["mig_current"] != _n.NVML_DEVICE_MIG_ENABLE or not 0 <= index < 7:
            raise err(_n.NVML_ERROR_INVALID_ARGUMENT)
        devices = [c["uid"] for g in sorted(gpu["gis"], key=lambda g: g["id"])
                   for c in sorted(g["cis"], key=lambda c: c["id"])]
        if index >= len(devices):
            raise err(_n.NVML_ERROR_NOT_FOUND)
        return MigDeviceHandle(idx, devices[index])

    def nvmlDeviceIsMigDeviceHandle(self, device: Any) -> ctypes.c_uint:
        h = self._any_handle(device)
        return ctypes.c_uint(int(isinstance(h, MigDeviceHandle)))  # pynvml returns the c_uint itself

    def _mig_ids(self, device: Any) -> tuple[dict, dict]:
        h = self._any_handle(device)
        if not isinstance(h, MigDeviceHandle):
            raise err(_n.NVML_ERROR_NOT_SUPPORTED)
        _, gi, ci = self._ci_of(self._read(), h.gpu, h.ci_uid)
        return gi, ci

    def nvmlDeviceGetGpuInstanceId(self, device: Any) -> int:
        return self._mig_ids(device)[0]["id"]

    def nvmlDeviceGetComputeInstanceId(self, device: Any) -> int:
        return self._mig_ids(device)[1]["id"]

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, migDevice: Any) -> Any:
        h = self._any_handle(migDevice)
        if not isinstance(h, MigDeviceHandle):
            raise err(_n.NVML_ERROR_INVALID_ARGUMENT)
        self._ci_of(self._read(), h.gpu, h.ci_uid)
        return self._device_handle(h.gpu)


def _test_delay() -> None:
    """Testing only (the chaos suite): $GPUMESH_SIM_CREATE_DELAY seconds of sleep after a GPU instance is
    made and before its compute instance, so a test can kill the agent half-way through a creation."""
    import os
    import time
    delay = os.environ.get("GPUMESH_SIM_CREATE_DELAY")
    if delay:
        time.sleep(float(delay))
