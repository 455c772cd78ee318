"""Agents' slice status reports applied to the fleet (held by the slice Controller as `reports`,
controllers/slices.py): a slice's state, device, MIG instances and env as its agent realized them, a full report's
missing slices re-created and released ones deleted, a lost node's slices UNKNOWN; and the resize swap guard
(`Controller.swapping`, resize.py): a report of a slice's placement before its agent swapped it is ignored."""

from __future__ import annotations

import logging

from gpumesh.v1 import types_pb2
from mesh.logs import log

logger = logging.getLogger("controlplane.controllers.slices")
S = types_pb2

# what of a realized slice's env tells two placements on one GPU apart (nodeagent/slicer.py slice_env): a resize
# the scheduler put on the slice's own GPU (MPS, time-share) has the same device and no MIG instances
SWAP_ENV = ("GPUMESH_MEMORY_LIMIT_BYTES", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")


def placement_of(device_uuid: str, gpu_instance_id: int, compute_instance_id: int, env) -> tuple:
    """A slice record's realized placement, as `Controller.swapping` keeps it."""
    return (device_uuid, gpu_instance_id, compute_instance_id, *(env.get(k, "") for k in SWAP_ENV))


def names_placement(placement: tuple, st) -> bool:
    """Whether an agent's status names `placement`: its device and MIG instances, and the limits in its env when
    it has one (a READY status; the others carry none)."""
    return placement == placement_of(st.device_uuid, st.gpu_instance_id, st.compute_instance_id,
                                     st.env if st.env else dict(zip(SWAP_ENV, placement[3:])))


class SliceReports:
    """Over a Controller: its fleet, swapping, _update and save_or_restore (read through it)."""

    def __init__(self, ctl) -> None:
        self.ctl = ctl

    async def report(self, node: str, full: bool, statuses, released) -> None:
        changed, deleted, priors = [], [], []
        held = set()
        for st in statuses:
            held.add(st.slice_id)
            s = self.ctl.fleet.slices.get(st.slice_id)
            if s is None or s.node != node or s.state == S.SLICE_STATE_RELEASING:
                continue
            swapped = self.ctl.swapping.get(s.id)
            if swapped is not None and not names_placement(swapped, st):
                log(logger, logging.INFO, "report of a slice's placement before its resize's swap; ignored until "
                    "the agent swaps it", slice=s.id, node=node, reported_device=st.device_uuid,
                    reported_gpu_instance=st.gpu_instance_id, device=swapped[0], gpu_instance=swapped[1])
                continue
            if (s.state, s.device_uuid, s.message, s.gpu_instance_id, s.compute_instance_id) == \
                    (st.state, st.device_uuid, st.message, st.gpu_instance_id, st.compute_instance_id) \
                    and dict(s.env) == dict(st.env):
                continue
            priors.append(s)
            changed.append(self.ctl._update(s, state=st.state, device_uuid=st.device_uuid, env=dict(st.env),
                                            message=st.message, gpu_instance_id=st.gpu_instance_id,
                                            compute_instance_id=st.compute_instance_id))
        gone_ids = set(released)
        if full:
            for s in self.ctl.fleet.slices_on(node):
                if s.id in held or s.id in self.ctl.swapping:
                    continue        # (a swapped one: the agent holds it under the other ID until it swaps)
                if s.state == S.SLICE_STATE_RELEASING:
                    gone_ids.add(s.id)
                elif s.state in (S.SLICE_STATE_READY, S.SLICE_STATE_UNKNOWN):
                    priors.append(s)
                    changed.append(self.ctl._update(s, state=S.SLICE_STATE_PENDING,
                                                    message="not on the node; re-creating"))
        for sid in gone_ids:
            s = self.ctl.fleet.slices.get(sid)
            if s is not None and s.node == node and s.state == S.SLICE_STATE_RELEASING:
                deleted.append(self.ctl.fleet.drop_slice(sid))
        if changed or deleted:
            await self.ctl.save_or_restore(changed, priors, deleted)   # else the agent's next report writes it

    async def mark_node_lost(self, node: str, why: str) -> None:
        priors = [s for s in self.ctl.fleet.slices_on(node)
                  if s.state in (S.SLICE_STATE_READY, S.SLICE_STATE_PENDING)]
        changed = [self.ctl._update(s, state=S.SLICE_STATE_UNKNOWN, message=f"node NotReady: {why}") for s in priors]
        if changed:
            await self.ctl.save_or_restore(changed, priors)
