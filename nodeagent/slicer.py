"""Turn desired slices into real ones on this host, and back.

MIG slices are GPU + compute instances made through NVML at the placement the
control plane chose (or, with a declared layout, the declared instance at that
placement); MPS, time-share and exclusive slices are bookkeeping (memory
accounted so the slices of a GPU never exceed it), the MPS daemon of the GPU,
and the environment a process needs. `adopt` maps instances that already
exist (after an agent restart) to desired slices and returns the orphans.
A MIG slice whose device still runs processes is not torn down (IN_USE).
"""

from __future__ import annotations

import logging
import os

from gpumesh.v1 import node_service_pb2, types_pb2
from nodeagent.gpu import GpuError, GpuInUse, MigInstance, NvmlGpus
from nodeagent.mps import MpsDaemon, MpsError

logger = logging.getLogger(__name__)
S = types_pb2
MIB = 1 << 20


def mps_dirs(mps_root: str, gpu_index: int) -> tuple[str, str]:
    """(pipe directory, log directory) of the MPS daemon of a GPU."""
    base = os.path.join(mps_root, str(gpu_index))
    return os.path.join(base, "pipe"), os.path.join(base, "log")


def slice_env(s: types_pb2.Slice, device_uuid: str, mps_root: str) -> dict[str, str]:
    env = {"CUDA_VISIBLE_DEVICES": device_uuid, "NVIDIA_VISIBLE_DEVICES": device_uuid,
           "GPUMESH_SLICE_ID": s.id, "GPUMESH_MEMORY_LIMIT_BYTES": str(s.memory_bytes)}
    if s.isolation == S.ISOLATION_MPS:
        pipe, log = mps_dirs(mps_root, s.gpu_index)
        env.update({
            "CUDA_MPS_PIPE_DIRECTORY": pipe,
            "CUDA_MPS_LOG_DIRECTORY": log,
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
        self.shared: dict[str, types_pb2.Slice] = {}   # non-MIG slices realized here
        self.layout = None          # nodeagent.layout.MigPlan when the node declares MIG layouts
        self.mps: MpsDaemon | None = None

    def _declared(self, index: int):
        return self.layout.declared(index) if self.layout is not None else None

    def status(self, s: types_pb2.Slice, state: int, uuid: str = "", message: str = "",
               inst: MigInstance | None = None) -> node_service_pb2.SliceStatus:
        st = node_service_pb2.SliceStatus(slice_id=s.id, state=state, device_uuid=uuid, message=message)
        if state == S.SLICE_STATE_READY:
            st.env.update(slice_env(s, uuid, self.mps_root))
        if inst is not None:
            st.gpu_instance_id = inst.gi_id
            st.compute_instance_id = inst.ci_id or 0
        return st

    def adopt(self, desired: dict[str, types_pb2.Slice], claims: dict[str, str] | None = None) -> list[MigInstance]:
        """Match existing MIG instances to desired slices (by GPU, profile and placement); return the
        orphans. `claims` (device UUID -> slice ID, from the workload records) names the slice an
        instance is known to have been made for: an instance claimed by another slice than the desired
        one at its placement (the old slice was released and a new one placed there while the agent was
        away) is an orphan, not adopted with the old slice's processes still on it."""
        want = {(s.gpu_index, s.profile, s.placement.start): s for s in desired.values()
                if s.isolation == S.ISOLATION_MIG}
        orphans = []
        self.mig.clear()
        self.shared = {k: v for k, v in self.shared.items() if k in desired}
        self._stop_idle_mps({s.gpu_index for s in desired.values() if s.isolation == S.ISOLATION_MPS})
        for index in sorted({i for i, m in self.gpus.models.items() if m is not None and m.mig_capable}):
            try:
                instances = self.gpus.mig_instances(index)
            except GpuError as e:
                logger.warning("cannot list MIG instances of GPU %s: %s", index, e)
                continue
            for inst in instances:
                s = want.get((inst.gpu_index, inst.profile, inst.start))
                declared = self._declared(index)
                # the control plane's record of the slice naming this very instance wins over the claim
                # (a resize or migration commit moves a workload onto a new instance under the same slice
                # ID: the workload record still names the reserved target slice's ID)
                if s is not None and declared is None and (claims or {}).get(inst.uuid, s.id) != s.id \
                        and s.device_uuid != inst.uuid:
                    s = None
                if s is not None and inst.ci_id is not None and s.id not in self.mig:
                    self.mig[s.id] = inst
                elif declared is None or (inst.profile, inst.start) not in declared.placements:
                    orphans.append(inst)
        return orphans

    def _stop_idle_mps(self, keep: set[int]) -> None:
        """Stop MPS daemons left running for GPUs that have no MPS slice (after a restart)."""
        if self.mps is None:
            return
        for index in self.gpus.uuids:
            if index in keep:
                continue
            pipe, _ = mps_dirs(self.mps_root, index)
            try:
                if os.path.isdir(pipe) and self.mps.healthy(index, pipe):
                    self.mps.stop(index, pipe)
                    logger.info("stopped idle MPS daemon", extra={"fields": {"gpu": index}})
            except MpsError as e:
                logger.warning("cannot stop idle MPS daemon", extra={"fields": {"gpu": index, "error": str(e)}})

    def realize(self, s: types_pb2.Slice) -> node_service_pb2.SliceStatus:
        gpu_uuid = self.gpus.uuids.get(s.gpu_index)
        if gpu_uuid is None:
            return self.status(s, S.SLICE_STATE_FAILED, message=f"no GPU {s.gpu_index} on this node")
        if gpu_uuid != s.gpu_uuid:
            return self.status(s, S.SLICE_STATE_FAILED,
                               message=f"GPU {s.gpu_index} is {gpu_uuid}, not {s.gpu_uuid} (hardware changed)")
        if s.isolation != S.ISOLATION_MIG:
            return self._realize_shared(s, gpu_uuid)
        inst = self.mig.get(s.id)
        declared = self._declared(s.gpu_index)
        if inst is None and declared is not None:
            return self._realize_declared(s, declared)
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

    def _realize_declared(self, s: types_pb2.Slice, declared) -> node_service_pb2.SliceStatus:
        """With a declared layout, a MIG slice maps onto the declared instance at its placement."""
        where = (s.profile, s.placement.start)
        if where not in declared.placements:
            return self.status(s, S.SLICE_STATE_FAILED, message=(
                f"{s.profile}@{s.placement.start} is not in the declared MIG layout {declared.name!r} of GPU "
                f"{s.gpu_index} ({declared.text() or 'no instances'}); this node only realizes declared instances"))
        taken = {(i.gpu_index, i.gi_id) for k, i in self.mig.items() if k != s.id}
        try:
            found = [i for i in self.gpus.mig_instances(s.gpu_index)
                     if (i.profile, i.start) == where and i.ci_id is not None and (i.gpu_index, i.gi_id) not in taken]
        except GpuError as e:
            return self.status(s, S.SLICE_STATE_FAILED, message=str(e))
        if not found:
            return self.status(s, S.SLICE_STATE_FAILED, message=(
                f"the declared instance {s.profile}@{s.placement.start} of GPU {s.gpu_index} does not exist or is "
                f"taken (declared layout {declared.name!r} not applied: see the node's events)"))
        self.mig[s.id] = found[0]
        return self.status(s, S.SLICE_STATE_READY, found[0].uuid, inst=found[0])

    def _realize_shared(self, s: types_pb2.Slice, gpu_uuid: str) -> node_service_pb2.SliceStatus:
        """MPS, time-share, exclusive: account memory on the GPU, start its MPS daemon when needed."""
        if s.id not in self.shared:
            total = self.gpus.memory.get(s.gpu_index, 0)
            mates = [x for x in self.shared.values() if x.gpu_index == s.gpu_index]
            used = sum(x.memory_bytes for x in mates)
            if mates and (s.isolation == S.ISOLATION_EXCLUSIVE
                          or any(x.isolation == S.ISOLATION_EXCLUSIVE for x in mates)):
                return self.status(s, S.SLICE_STATE_FAILED,
                                   message=f"GPU {s.gpu_index} is held exclusively or shared: "
                                           f"{', '.join(x.id for x in mates)}")
            if total and used + s.memory_bytes > total:
                return self.status(s, S.SLICE_STATE_FAILED, message=(
                    f"GPU {s.gpu_index}: {s.memory_bytes} bytes do not fit beside the {used} bytes of its other "
                    f"slices ({total} bytes in all)"))
        if s.isolation == S.ISOLATION_MPS and self.mps is not None:
            pipe, log = mps_dirs(self.mps_root, s.gpu_index)
            try:
                self.mps.start(s.gpu_index, pipe, log, gpu_uuid)
            except (MpsError, OSError) as e:
                return self.status(s, S.SLICE_STATE_FAILED, message=f"MPS daemon of GPU {s.gpu_index}: {e}")
        self.shared[s.id] = s
        return self.status(s, S.SLICE_STATE_READY, gpu_uuid)

    def gpu_of(self, slice_id: str) -> int:
        if slice_id in self.mig:
            return self.mig[slice_id].gpu_index
        s = self.shared.get(slice_id)
        return s.gpu_index if s is not None else -1

    def _teardown_shared(self, slice_id: str) -> str | None:
        s = self.shared.get(slice_id)
        if s is None:
            return None
        if s.isolation == S.ISOLATION_MPS and self.mps is not None and not any(
                x.isolation == S.ISOLATION_MPS and x.gpu_index == s.gpu_index
                for k, x in self.shared.items() if k != slice_id):
            pipe, _ = mps_dirs(self.mps_root, s.gpu_index)
            try:
                self.mps.stop(s.gpu_index, pipe)
            except MpsError as e:
                return str(e)
        del self.shared[slice_id]
        return None

    def teardown(self, slice_id: str) -> str | None:
        """Undo a slice; returns an error message when the hardware refused (IN_USE: the
        message names the processes still running on the MIG device)."""
        inst = self.mig.get(slice_id)
        if inst is None:
            return self._teardown_shared(slice_id)
        try:
            if self._declared(inst.gpu_index) is not None:
                pids = self.gpus.mig_pids(inst.gpu_index, inst.gi_id)   # declared instances stay
                if pids:
                    raise GpuInUse(f"MIG device {inst.uuid} (GPU {inst.gpu_index}, GI {inst.gi_id}) is in use by "
                                   f"process(es) {', '.join(map(str, pids))}", pids)
            else:
                self.gpus.destroy_mig(inst.gpu_index, inst.gi_id)
        except GpuError as e:
            return str(e)
        del self.mig[slice_id]
        logger.info("destroyed MIG instance", extra={"fields": {"slice": slice_id, "gpu": inst.gpu_index,
                                                                 "gi": inst.gi_id}})
        return None

    def destroy_orphan(self, inst: MigInstance) -> str | None:
        """Destroy a MIG instance no desired slice claims; the error when the GPU refused (IN_USE: a
        process still runs on it; the agent stops the workloads on it first and retries)."""
        try:
            self.gpus.destroy_mig(inst.gpu_index, inst.gi_id)
        except GpuError as e:
            logger.error("cannot remove orphan MIG instance", extra={"fields": {"gpu": inst.gpu_index,
                                                                               "gi": inst.gi_id, "error": str(e)}})
            return str(e)
        logger.warning("removed orphan MIG instance", extra={"fields": {
            "gpu": inst.gpu_index, "gi": inst.gi_id, "profile": inst.profile, "start": inst.start}})
        return None
