"""Consolidation on the live fleet: gathers the facts mesh/cost/recommend.py reasons over (replicas with their
measured peaks from the accountant, warm slices, GPUs) and, asked to apply, carries the recommendations out
one at a time with the control plane's own machinery, stopping at the first failure:

- resize: MigrationManager.resize (controlplane/controllers/resize.py: in place for MPS/time-share when the
  GPU has room, else by migration; the replica's backend keeps running);
- idle-replica: ScalingOps.remove_replica (one replica fewer, and the one removed is the replica listed, marked
  TERMINATING in the same transaction: the controller would pick its own, the newest READY one);
- idle-warm: Controller.release of the warm slice;
- pack: MigrationManager.migrate of each slice's workload to the receiving GPU listed (pinned: `to_gpu`, not
  only the node, where the scheduler would pick its own GPU);
- share-mps: not applied (it needs the deployments recreated with MPS isolation): reported as skipped.

One found, as it is carried out, to no longer hold with nothing of it done (the pack's first receiving GPU filled,
the replica or its deployment changed) is refused like one found so when checked (`refused`).
"""

from __future__ import annotations

import functools
import logging
import math
import time

from controlplane.controllers.migration_targets import TargetGpuChanged
from controlplane.cost.accountant import CostAccountant
from controlplane.serving import deployspec
from gpumesh.v1 import cost_service_pb2 as C
from gpumesh.v1 import deployment_service_pb2 as D
from gpumesh.v1 import types_pb2 as W
from mesh import errors
from mesh.cost import listed as L
from mesh.cost import recommend as R
from mesh.cost import slice_share
from mesh.cost.accounting import is_warm_labels
from mesh.logs import log
from mesh.models import vram

logger = logging.getLogger(__name__)
ISO = {1: "mig", 2: "mps", 3: "timeshare", 4: "exclusive"}


class Recommender:
    def __init__(self, ctl, deployments, migrations, accountant: CostAccountant, min_observed: float = 3600.0,
                 clock=time.time) -> None:
        self.ctl = ctl
        self.deployments = deployments
        self.migrations = migrations
        self.acc = accountant
        self.min_observed = min_observed
        self.clock = clock

    # -- facts --------------------------------------------------------------------------------

    def _need(self, d: D.Deployment, concurrency: int) -> int:
        variant, _ = self.deployments._resolve(d.spec)
        return vram.vram(deployspec.BACKEND_KINDS[variant.backend], variant.weight_bytes,
                         variant.kv_bytes_per_token, deployspec.context_of(d.spec, variant), concurrency).total_bytes

    def facts(self) -> tuple[list[R.ReplicaFacts], list[R.WarmSlice], list[R.GpuFacts]]:
        now = self.clock()
        prices = self.acc.prices
        replicas = []
        st = self.deployments.store
        for name, d in st.deployments.items():
            reps = list(st.replicas.get(name, {}).values())
            ready = [r for r in reps if r.state == D.REPLICA_STATE_READY]
            for r in reps:
                s = self.ctl.fleet.slices.get(r.slice_id) if r.slice_id else None
                if s is None:
                    continue
                first, peak, last_active = self.acc.observed.get(r.id, [now, 0.0, now])
                sized = max(1, d.spec.backend.concurrency or 1)
                try:
                    need = self._need(d, sized)
                    peak_need = self._need(d, max(1, math.ceil(peak)))
                except (errors.MeshError, ValueError):
                    continue
                share = slice_share(int(s.isolation), s.gpu_model, profile=s.profile,
                                    memory_bytes=int(s.memory_bytes), compute_share=float(s.compute_share))
                replicas.append(R.ReplicaFacts(
                    name, r.id, s.id, s.node, s.gpu_index, s.gpu_model, ISO.get(s.isolation, ""), s.profile,
                    s.memory_bytes, share, prices.gpu_hour(s.gpu_model), sized, need, peak, peak_need, now - first,
                    ready=r.state == D.REPLICA_STATE_READY, idle=now - last_active >= self.min_observed,
                    ready_peers=len(ready) - (1 if r in ready else 0), tenant=d.spec.tenant))
        warm = []
        for s in self.ctl.fleet.slices.values():
            if is_warm_labels(s.labels):
                share = slice_share(int(s.isolation), s.gpu_model, profile=s.profile,
                                    memory_bytes=int(s.memory_bytes), compute_share=float(s.compute_share))
                created = s.created_at.seconds + s.created_at.nanos / 1e9
                warm.append(R.WarmSlice(s.id, s.node, s.gpu_model, share, prices.gpu_hour(s.gpu_model), now - created))
        # what a pack's migration can move: a running workload that is not a model server (those move only by CRIU
        # to another node; a deployment replaces its replicas instead). Any other slice is "": it pins its GPU
        running = {w.slice_id: w.id for w in self.migrations.wm.workloads.values()
                   if w.state == W.WORKLOAD_STATE_RUNNING and not w.HasField("backend")}
        gpus = []
        for e in self.ctl.fleet.nodes.values():
            for g in e.gpus:
                sl = [(s.id, s.memory_bytes, running.get(s.id, "")) for s in g.slices.values()]
                gpus.append(R.GpuFacts(e.name, g.index, g.model.name, g.memory_bytes, prices.gpu_hour(g.model.name),
                                       g.sharing or "", tuple(sl), g.allocated_memory))
        return replicas, warm, gpus

    def recommend(self, kinds=()) -> list[R.Rec]:
        try:
            return R.recommend(*self.facts(), min_observed=self.min_observed, kinds=tuple(kinds))
        except ValueError as e:
            raise errors.InvalidArgument.of("kinds", str(e).split(": ", 1)[-1], ", ".join(R.KINDS)) from None

    # -- applying -----------------------------------------------------------------------------

    async def apply_one(self, rec: R.Rec) -> str:
        if rec.kind == "resize":
            s = await self.migrations.resize(rec.slice_id, rec.memory_bytes, rec.compute_share, rec.profile)
            await self._sync_replica(rec, s)
            return "applied"
        if rec.kind == "idle-replica":
            d = self.deployments.store.deployments.get(rec.deployment)
            try:
                if d is None:
                    raise errors.FailedPrecondition(f"deployment {rec.deployment} is gone")
                # the generation judged just now (named(): no await since): a change before the write refuses it
                await self.deployments.scaling.remove_replica(rec.deployment, rec.replica, d.generation,
                                                              "idle (meshctl recommend --apply)")
            except errors.FailedPrecondition as e:
                raise L.Changed(f"{L.describe(L.identity(rec))} no longer holds: {e}") from None
            return "applied"
        if rec.kind == "idle-warm":
            message = "released as idle by meshctl recommend --apply"
            warm = getattr(self.ctl, "warm", None)
            s = self.ctl.fleet.slices.get(rec.slice_id)
            if s is None or not is_warm_labels(s.labels):
                raise errors.FailedPrecondition(f"slice {rec.slice_id} is no longer a warm slice (claimed or "
                                                "released meanwhile)")
            if warm is not None and s.tenant == "":
                if not await warm.release_ids([rec.slice_id], message):
                    raise errors.FailedPrecondition(f"slice {rec.slice_id} was claimed meanwhile")
            else:
                await self.ctl.release(rec.slice_id, wait=False, message=message)
            return "applied"
        if rec.kind == "pack":
            for i, (sid, wid, node, index) in enumerate(rec.moves):
                if not wid:
                    raise errors.FailedPrecondition(f"slice {sid} runs no workload to migrate")
                try:
                    # to the GPU listed, not just its node: else the scheduler picks the GPU (migration_targets.py)
                    await self.migrations.migrate(wid, to_node=node, to_gpu=index,
                                                  reason="consolidation (meshctl recommend --apply)")
                except errors.FailedPrecondition as e:
                    if i:
                        started = ", ".join(m[0] for m in rec.moves[:i])
                        raise errors.FailedPrecondition(f"moving slice {sid} to {node}/{index} refused: {e} (the "
                                                        f"moves of {started} were started)") from None
                    if isinstance(e, TargetGpuChanged):     # the listed GPU filled since the check: nothing moved
                        raise L.Changed(f"{L.describe(L.identity(rec))} no longer holds: {e}") from None
                    raise
            return "applied"
        return "skipped: recreate the deployments with isolation mps (not automatic)"

    async def _sync_replica(self, rec: R.Rec, s) -> None:
        """The replica's record follows its slice's new size (the next controller pass would not look),
        in etcd too: a new leader reads it."""
        reps = self.deployments.store.replicas.get(rec.deployment, {})
        r = reps.get(rec.replica)
        if r is not None and s is not None and s.id == r.slice_id and s.memory_bytes != r.memory_bytes:
            n = D.Replica()
            n.CopyFrom(r)
            n.memory_bytes, n.profile = s.memory_bytes, s.profile
            await self.deployments.store.put_replica(n)

    def named(self, rid: str) -> R.Rec:
        """The recommendation `rid` names, as it stands now; listed.Changed naming what changed when it no
        longer holds (mesh/cost/listed.py)."""
        if L.kind_of(rid) == "pack":
            return L.check_pack(rid, self.facts()[2])
        return L.find(rid, self.recommend([L.kind_of(rid)]))

    async def run(self, apply: bool, limit: int = 0, kinds=(), slice_id: str = "", ids=()) -> C.RecommendResponse:
        """The recommendations (those named by `ids`, in that order, when given; else those computed now), and
        with `apply` each carried out in turn, stopping at the first failure. A named one is checked just
        before its turn and never replaced by another: when it no longer holds the call is refused
        (FailedPrecondition) if nothing was carried out yet, else its result says so and the run stops."""
        check_request(kinds, ids)
        if ids:
            steps = [(rid, functools.partial(self.named, rid)) for rid in ids]
        else:
            steps = [(L.identity(r), lambda r=r: r) for r in self.recommend(kinds)]
        out = C.RecommendResponse()
        for rid, step in steps:
            acting = apply and not out.stopped and not (limit and out.applied >= limit)
            try:
                rec = step()
            except L.Changed as e:
                if acting:              # (listed: only those that still hold)
                    refused(e, out, out.recommendations.add(id=rid, kind=L.kind_of(rid)))
                continue
            if (slice_id and rec.slice_id != slice_id) or (kinds and rec.kind not in kinds):
                continue
            m = out.recommendations.add(kind=rec.kind, deployment=rec.deployment, replica=rec.replica,
                                        slice_id=rec.slice_id, node=rec.node, action=rec.action, target=rec.target,
                                        saving_per_day=round(rec.saving_per_day, 4), risk=rec.risk, id=rid)
            out.saving_per_day += m.saving_per_day
            if acting:
                try:
                    await self._carry_out(rec, m, out)
                except L.Changed as e:  # found so as it was carried out, before any of it was done
                    refused(e, out, m)
        return out

    async def _carry_out(self, rec: R.Rec, m: C.Recommendation, out: C.RecommendResponse) -> None:
        try:
            m.result = await self.apply_one(rec)
        except errors.MeshError as e:
            m.result = f"failed: {e}"
            out.stopped = True
        if m.result == "applied":
            out.applied += 1
        log(logger, logging.INFO if not out.stopped else logging.WARNING, "recommendation carried out",
            kind=rec.kind, slice=rec.slice_id, deployment=rec.deployment, result=m.result, id=m.id)
        self.ctl.recorder.emit("Deployment" if rec.deployment else "Slice", rec.deployment or rec.slice_id,
                               "Normal" if m.result == "applied" else "Warning", "Consolidated",
                               f"{rec.action}: {m.result}; saves ${rec.saving_per_day:.2f}/day"[:500],
                               source="cost-recommender")


def refused(e: L.Changed, out: C.RecommendResponse, m: C.Recommendation) -> None:
    """A listed recommendation (`m` in `out`) no longer holds: the call is refused (FailedPrecondition naming what
    changed) while nothing was carried out yet; else its result says so and the run stops."""
    if not out.applied:
        raise errors.FailedPrecondition(f"{e} (not carried out; list again for what holds now)") from None
    m.result = f"failed: {e}"
    out.stopped = True


def check_request(kinds, ids) -> None:
    for k in kinds:
        if k not in R.KINDS:
            raise errors.InvalidArgument.of("kinds", f"{k!r} is not a kind", ", ".join(R.KINDS))
    if len(ids) > L.MAX_IDS:
        raise errors.InvalidArgument.of("ids", f"{len(ids)} ids", f"at most {L.MAX_IDS} in one request")
    for rid in ids:
        try:
            L.kind_of(rid)
        except ValueError as e:
            raise errors.InvalidArgument.of("ids", str(e), "the `id` of a recommendation an earlier answer "
                                                           "listed") from None
