"""Where a migration goes (the MigrationManager's part for it): a named target slice (checked: READY, the tenant's,
free), a named node (the scheduler picks the slice and GPU there), or one GPU of a node.

A GPU is named by `meshctl recommend --apply` only (a pack recommendation lists each move as slice -> node/GPU;
there is no API field): the move must land on that GPU, else the GPU it promised to free stays in use or the move
does not pack. The GPU is checked as the migration is planned: it exists, it takes slices of the source's model
and isolation, and (but for MIG, whose start slots the scheduler judges) its free memory, less what the unplaced
moves already pinned to it take, holds the source slice; else FAILED_PRECONDITION (`TargetGpuChanged`) naming the
GPU and what it holds now, and nothing is recorded. The target is then placed on that GPU alone (`SliceRequest.only_gpu`, honoured by the
scheduling framework): when it no longer fits there the migration rolls back; it never goes to another GPU.

The pin lives in memory until the target is placed: a migration not yet past PLANNED is rolled back when the
control plane restarts, so a restarted control plane never needs it.
"""

from __future__ import annotations

import dataclasses

from controlplane.api import auth
from controlplane.controllers.migration_phases import W
from controlplane.state.fleet import ISOLATION_NAMES
from gpumesh.v1 import migration_service_pb2 as M
from gpumesh.v1 import types_pb2
from mesh import errors
from mesh.slicespec import SliceRequest


def _gib(b: int) -> str:
    return f"{b / 2**30:.2f} GiB"


class TargetGpuChanged(errors.FailedPrecondition):
    """The GPU a migration is pinned to is gone or no longer takes the move (what a pack's apply reports as the
    recommendation no longer holding)."""


class TargetsMixin:
    """Mixed into MigrationManager (self.ctl, self.wm, self.unfinished)."""

    @property
    def target_gpus(self) -> dict[str, int]:
        """migration id -> the GPU index on its target node it is pinned to, until its target is placed."""
        return self.__dict__.setdefault("_target_gpus", {})

    def _set_target(self, m: M.Migration, to_slice: str, to_node: str, to_gpu: int = -1,
                    w: types_pb2.Workload | None = None) -> None:
        """The named target slice or node, when one is named; with `to_gpu` (and the workload `w`), that GPU of
        `to_node`, checked and pinned."""
        if to_gpu >= 0 and (to_slice or not to_node):
            raise errors.InvalidArgument.of("to_gpu", f"GPU {to_gpu} of {'a slice' if to_slice else 'no node'}",
                                            "a GPU index of the target node (to_node), without a target slice")
        if to_slice:
            s = self._check_target_slice(to_slice, m.tenant)
            m.target_slice, m.target_node = s.id, s.node
        elif to_node:
            if to_node not in self.ctl.fleet.nodes:
                raise errors.NotFound(f"no node {to_node!r}", kind="node", name=to_node)
            if to_gpu >= 0:
                self._check_gpu_room(m, w, to_node, to_gpu)
                self.target_gpus[m.id] = to_gpu
            m.target_node = to_node

    def _check_target_slice(self, sid: str, tenant: str) -> types_pb2.Slice:
        s = self.ctl.fleet.slices.get(sid)
        if s is None:
            raise errors.NotFound(f"no slice {sid!r}", kind="slice", name=sid)
        auth.check_visible(s.tenant, "slice", sid)
        if s.tenant != tenant:
            raise errors.FailedPrecondition(f"slice {sid} belongs to tenant {s.tenant}, the workload to {tenant}")
        if s.state != types_pb2.SLICE_STATE_READY:
            raise errors.FailedPrecondition(f"slice {sid} is not READY")
        if any(x.slice_id == sid and x.state in (W.WORKLOAD_STATE_RUNNING, W.WORKLOAD_STATE_PENDING)
               for x in self.wm.workloads.values()):
            raise errors.FailedPrecondition(f"slice {sid} runs a workload already")
        return s

    def _check_gpu_room(self, m: M.Migration, w: types_pb2.Workload, node: str, index: int) -> None:
        fleet = self.ctl.fleet
        g = fleet.gpu(node, index)
        if g is None:
            raise TargetGpuChanged(f"GPU {node}/{index} is gone")
        src = fleet.slices.get(w.slice_id)
        if src is None:
            raise errors.FailedPrecondition(f"the slice of workload {w.id}, {w.slice_id}, is gone")
        kind = ISOLATION_NAMES.get(src.isolation, "")
        if g.model.name != src.gpu_model or g.sharing not in (None, kind):
            raise TargetGpuChanged(f"GPU {node}/{index} is a {g.sharing or 'free'} {g.model.name} now; slice {src.id} "
                                   f"is {kind} on {src.gpu_model}")
        if src.isolation == types_pb2.ISOLATION_MIG:
            return
        bound = [x for x in self.unfinished() if x.id != m.id and not x.target_slice and x.target_node == node
                 and self.target_gpus.get(x.id) == index]
        pending = sum(s.memory_bytes for x in bound if (s := fleet.slices.get(x.source_slice)) is not None)
        free = g.memory_bytes - g.allocated_memory - pending
        if free < src.memory_bytes:
            moving = f" once the moves pinned there take theirs (migration {', '.join(x.id for x in bound)})"
            raise TargetGpuChanged(f"GPU {node}/{index} has {_gib(free)} free now{moving if bound else ''}; slice "
                                   f"{src.id} needs {_gib(src.memory_bytes)}")

    def pinned_request(self, m: M.Migration, req: SliceRequest) -> SliceRequest:
        """`req` pinned to the GPU migration `m` was pinned to, if any (the pin is used up: one placement)."""
        index = self.target_gpus.pop(m.id, None)
        return req if index is None else dataclasses.replace(req, only_gpu=(m.target_node, index))
