"""Turn desired slices into real ones on this host, and back.

MIG slices are GPU + compute instances made through NVML at the placement the
control plane chose; MPS, time-share and exclusive slices are bookkeeping plus
the environment a process needs. `adopt` maps instances that already exist
(after an agent restart) to desired slices and returns the orphans.
"""

from __future__ import annotations

import logging
import os

from gpumesh.v1 import node_service_pb2, types_pb2
from nodeagent.gpu import GpuError, MigInstance, NvmlGpus

logger = logging.getLogger(__name__)
S = types_pb2
MIB = 1 << 20


def slice_env(s: types_pb2.Slice, device_uuid: str, mps_root: str) -> dict[str, str]:
    env = {"CUDA_VISIBLE_DEVICES": device_uuid, "NVIDIA_VISIBLE_DEVICES": device_uuid,
           "GPUMESH_SLICE_ID": s.id, "GPUMESH_MEMORY_LIMIT_BYTES": str(s.memory_bytes)}
    if s.isolation == S.ISOLATION_MPS:
        pipe = os.path.join(mps_root, str(s.gpu_index))
        env.update({
            "CUDA_MPS_PIPE_DIRECTORY": os.path.join(pipe, "pipe"),
            "CUDA_MPS_LOG_DIRECTORY": os.path.join(pipe, "log"),
            "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(max(1, round(s.compute_share * 100))),
            # device 0 is the first (only) visible device for the client
            "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": f"0={s.memory_bytes // MIB}M",
        })
    return env


class Slicer:
    def __init__(self, gpus: NvmlGpus, mps_root: str) -> None:
        self.gpus = gpus
        self.mps_root = mps_root
        self.mig: dict[str, MigInstance] = {}   # slice id -> its instance

    def status(self, s: types_pb2.Slice, state: int, uuid: str = "", message: str = "",
               inst: MigInstance | None = None) -> node_service_pb2.SliceStatus:
        st = node_service_pb2.SliceStatus(slice_id=s.id, state=state, device_uuid=uuid, message=message)
        if state == S.SLICE_STATE_READY:
            st.env.update(slice_env(s, uuid, self.mps_root))
        if inst is not None:
            st.gpu_instance_id = inst.gi_id
            st.compute_instance_id = inst.ci_id or 0
        return st

    def adopt(self, desired: dict[str, types_pb2.Slice]) -> list[MigInstance]:
        """Match existing MIG instances to desired slices; return the orphans."""
        want = {(s.gpu_index, s.profile, s.placement.start): s for s in desired.values()
                if s.isolation == S.ISOLATION_MIG}
        orphans = []
        self.mig.clear()
        for index in sorted({i for i, m in self.gpus.models.items() if m is not None and m.mig_capable}):
            try:
                instances = self.gpus.mig_instances(index)
            except GpuError as e:
                logger.warning("cannot list MIG instances of GPU %s: %s", index, e)
                continue
            for inst in instances:
                s = want.get((inst.gpu_index, inst.profile, inst.start))
                if s is not None and inst.ci_id is not None and s.id not in self.mig:
                    self.mig[s.id] = inst
                else:
                    orphans.append(inst)
        return orphans

    def realize(self, s: types_pb2.Slice) -> node_service_pb2.SliceStatus:
        gpu_uuid = self.gpus.uuids.get(s.gpu_index)
        if gpu_uuid is None:
            return self.status(s, S.SLICE_STATE_FAILED, message=f"no GPU {s.gpu_index} on this node")
        if gpu_uuid != s.gpu_uuid:
            return self.status(s, S.SLICE_STATE_FAILED,
                               message=f"GPU {s.gpu_index} is {gpu_uuid}, not {s.gpu_uuid} (hardware changed)")
        if s.isolation != S.ISOLATION_MIG:
            return self.status(s, S.SLICE_STATE_READY, gpu_uuid)
        inst = self.mig.get(s.id)
        if inst is None:
            try:
                inst = self.gpus.create_mig(s.gpu_index, s.profile, s.placement.start)
            except (GpuError, KeyError) as e:
                return self.status(s, S.SLICE_STATE_FAILED, message=str(e))
            self.mig[s.id] = inst
            logger.info("created MIG instance", extra={"fields": {
                "slice": s.id, "gpu": s.gpu_index, "profile": s.profile, "start": s.placement.start,
                "gi": inst.gi_id, "uuid": inst.uuid}})
        return self.status(s, S.SLICE_STATE_READY, inst.uuid, inst=inst)

    def teardown(self, slice_id: str) -> str | None:
        """Undo a slice; returns an error message when the hardware refused."""
        inst = self.mig.get(slice_id)
        if inst is None:
            return None
        try:
            self.gpus.destroy_mig(inst.gpu_index, inst.gi_id)
        except GpuError as e:
            return str(e)
        del self.mig[slice_id]
        logger.info("destroyed MIG instance", extra={"fields": {"slice": slice_id, "gpu": inst.gpu_index,
                                                                 "gi": inst.gi_id}})
        return None

    def destroy_orphan(self, inst: MigInstance) -> None:
        try:
            self.gpus.destroy_mig(inst.gpu_index, inst.gi_id)
            logger.warning("removed orphan MIG instance", extra={"fields": {
                "gpu": inst.gpu_index, "gi": inst.gi_id, "profile": inst.profile, "start": inst.start}})
        except GpuError as e:
            logger.error("cannot remove orphan MIG instance", extra={"fields": {"gpu": inst.gpu_index,
                                                                               "gi": inst.gi_id, "error": str(e)}})
