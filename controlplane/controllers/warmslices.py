"""Warm slices: MIG instances carved ahead of the requests the forecast expects (rule 1 of the
orchestrator, docs/prediction.md "The live orchestrator").

A warm slice is an ordinary slice record made by the same machinery as Allocate's (the scheduler
places it, the agent creates the MIG instance through NVML), owned by no tenant (tenant "", so it
counts against no quota and only admins and viewers see it) and labelled `gpumesh.io/warm=true`
(with its key, `gpumesh.io/warm-key`). The pool keeps no state of its own: the fleet (and so etcd)
is the pool, so a restart or a new leader finds it as it was.

- `create`: placed with the fragmentation-gradient (FGD) profile, never by preemption; not waited for.
- `claim` (called by `Controller.allocate` before scheduling, without an await in between): a READY
  warm slice matching a one-slice MIG request becomes the tenant's, with a new allocation id, the
  request's labels and priority and a new creation time, so the tenant cannot tell it from a fresh
  slice (the instance was created for no one and ran nothing; its device and environment are the
  slice's own). Quotas are checked as for any allocation.
- `make_room`: a request that fits only where warm slices sit takes that space; the warm slices in
  its way are released (the agent destroys them before it creates the new one, in order).
- `release`: given back (the orchestrator's hysteresis decides how many).
- `release_unclaimable`: a warm slice its agent could not carve (FAILED) or on a cordoned node is given back; the
  node of a failed one gets no warm slice for a backoff (`FAILED_BACKOFF_S`, doubling to `FAILED_BACKOFF_MAX_S`,
  forgotten once a warm slice there is READY).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import statistics
import time

from controlplane import placement
from controlplane.controllers.orchmetrics import CLAIMS, YIELDS
from controlplane.scheduler.framework import CycleState
from gpumesh.v1 import types_pb2
from mesh.logs import log
from mesh.pools import LABEL as POOL_LABEL
from mesh.slicespec import SliceRequest

logger = logging.getLogger(__name__)
S = types_pb2
WARM_LABEL = "gpumesh.io/warm"
KEY_LABEL = "gpumesh.io/warm-key"
WARM_TENANT = ""
WARM_PRIORITY = -(2 ** 31)      # below every tenant's: a real request never yields to a warm slice
ANY = "any"
CREATE_SAMPLES = 20
DEFAULT_CREATE_S = 10.0
# A node whose agent could not carve a warm slice gets none for this long, doubled at each failure there up to
# the cap, and forgotten when a warm slice there is READY: without it, FGD chose the same spot every pass and the
# pool carved, failed and gave back there for good (two events a pass, an NVML call each time).
FAILED_BACKOFF_S = 60.0
FAILED_BACKOFF_MAX_S = 1800.0


def key_of(profile: str, gpu_model: str | None) -> str:
    """The warm pool's key of a request: `PROFILE/GPU_MODEL` (`any` when the request names no model)."""
    return f"{profile}/{gpu_model or ANY}"


def split_key(key: str) -> tuple[str, str | None]:
    profile, _, model = key.partition("/")
    return profile, (None if model in ("", ANY) else model)


def request_key(req: SliceRequest) -> str | None:
    """The key of a request the warm pool can serve (one MIG slice of a named profile), else None."""
    if req.count != 1 or not req.mig_profile or req.isolation not in (None, "mig"):
        return None
    return key_of(req.mig_profile, req.gpu_model)


def is_warm(s: types_pb2.Slice) -> bool:
    return s.labels.get(WARM_LABEL) == "true" and s.tenant == WARM_TENANT


async def release_when_off(ctl, setting: str) -> list[str]:
    """Give back every warm slice when warm slices are turned off: nothing claims them then (the pool is what
    hands them to requests and makes room where they sit), so each held its GPU space for good and requests that
    fit only there were refused. Called by a new leader whose configuration has the rule off; `setting` names
    the option that turned it off, for the events."""
    gone = []
    for s in [s for s in ctl.fleet.slices.values() if is_warm(s) and s.state != S.SLICE_STATE_RELEASING]:
        why = f"warm slices are turned off ({setting})"
        await ctl.release(s.id, wait=False, message=f"warm slice given back: {why}")
        gone.append(s.id)
        ctl.recorder.emit("Slice", s.id, "Normal", "WarmSliceReleased", f"given back: {why}", node=s.node,
                          source="orchestrator")
    if gone:
        log(logger, logging.INFO, "warm slices given back: the rule is off", count=len(gone), setting=setting)
    return gone


class WarmPool:
    def __init__(self, ctl, clock=time.monotonic) -> None:
        self.ctl = ctl
        self.clock = clock
        self.backoff: dict[str, tuple[float, float]] = {}     # node -> (no warm slice there until, its delay)
        from controlplane.scheduler import profiles
        self.framework = profiles.build("fgd", preemption=False)
        self.claims = 0            # since start (metrics)
        self.prior: dict[str, types_pb2.Slice] = {}     # slice id -> its warm record while a claim is saved
        # warm slices chosen for release whose release has not begun yet: never claimed in between (a
        # release awaits, and an Allocate claiming the next one on the list would lose its slice)
        self.yielding: set[str] = set()
        # create-to-ready seconds of the last warm slices (each measured once, when first seen READY)
        self.create_times: collections.deque = collections.deque(maxlen=CREATE_SAMPLES)
        self._timed: set[str] = set()

    # -- what there is -------------------------------------------------------------------------

    def slices(self) -> list[types_pb2.Slice]:
        return [s for s in self.ctl.fleet.slices.values()
                if is_warm(s) and s.state != S.SLICE_STATE_RELEASING and s.id not in self.yielding]

    async def release_ids(self, ids: list[str], message: str) -> list[str]:
        """Release these warm slices, each only if it is still warm when its turn comes; the ids are
        withheld from claims from the start (call this without an await between choosing them and it)."""
        self.yielding.update(ids)
        gone = []
        try:
            for sid in ids:
                s = self.ctl.fleet.slices.get(sid)
                if s is None or not is_warm(s):
                    continue
                await self.ctl.release(sid, wait=False, message=message)
                gone.append(sid)
        finally:
            self.yielding.difference_update(ids)
        return gone

    def create_time_s(self) -> float:
        """The median create-to-ready time of the last warm slices (their records' creation and the update
        that made them READY, read on the first pass that sees them READY); DEFAULT_CREATE_S before any."""
        for s in self.slices():
            if s.state == S.SLICE_STATE_READY and s.id not in self._timed:
                self._timed.add(s.id)
                took = (s.updated_at.ToNanoseconds() - s.created_at.ToNanoseconds()) / 1e9
                if took >= 0:
                    self.create_times.append(took)
        if len(self._timed) > 4 * CREATE_SAMPLES:
            self._timed &= {s.id for s in self.slices()}
        return statistics.median(self.create_times) if self.create_times else DEFAULT_CREATE_S

    def unclaimable(self, s: types_pb2.Slice) -> str:
        """Why warm slice `s` can never be claimed, or "": its agent could not carve it (FAILED), or its node is
        cordoned (the operator said no new placement there, and a claim is one: `claim` passes it over)."""
        if s.state == S.SLICE_STATE_FAILED:
            return f"its node could not carve it: {s.message or 'failed'}"
        node = self.ctl.fleet.nodes.get(s.node)
        if node is not None and node.record.cordoned:
            return f"its node {s.node} is cordoned"
        return ""

    def counts(self) -> dict[str, int]:
        """key -> warm slices carved or being carved that a request could still claim."""
        out: dict[str, int] = {}
        for s in self.slices():
            if self.unclaimable(s):
                continue
            k = s.labels.get(KEY_LABEL, key_of(s.profile, s.gpu_model))
            out[k] = out.get(k, 0) + 1
        return out

    # -- carve and give back ---------------------------------------------------------------------

    async def create(self, key: str, count: int, reason: str) -> list[types_pb2.Slice]:
        """Carve up to `count` warm slices of `key` where FGD puts them; returns those placed."""
        profile, model = split_key(key)
        req = SliceRequest(tenant=WARM_TENANT or "warm", memory_bytes=0, compute_share=0.0, isolation="mig",
                           gpu_model=model, mig_profile=profile, count=1, topology="any", priority=WARM_PRIORITY,
                           labels={WARM_LABEL: "true", KEY_LABEL: key})
        now = self.clock()
        self.backoff = {n: b for n, b in self.backoff.items() if b[0] + FAILED_BACKOFF_MAX_S > now}
        avoid = tuple(sorted(n for n, (until, _) in self.backoff.items() if until > now))
        if avoid:
            req = dataclasses.replace(req, avoid_nodes=avoid)
        made: list[types_pb2.Slice] = []
        for _ in range(count):
            decision = self.framework.schedule(req, self.ctl.fleet, allow_preemption=False, explain=False)
            if not decision.ok:
                log(logger, logging.INFO, "no room for a warm slice", key=key)
                break
            s = self.ctl._slices_for(req, decision.choices)[0]
            s.tenant = WARM_TENANT
            self.ctl.fleet.put_slice(s)
            try:
                rev = await self.ctl.save([s], created=True)
            except BaseException:
                self.ctl.fleet.drop_slice(s.id)
                raise
            session = self.ctl.sessions.get(s.node)
            if session is not None:
                session.send_upserts([s], rev)
            self.ctl.recorder.emit("Slice", s.id, "Normal", "WarmSliceCreated",
                                   f"warm {profile} on {s.node}/GPU {s.gpu_index} (start {s.placement.start}): "
                                   f"{reason}", node=s.node, source="orchestrator")
            made.append(s)
        return made

    async def release_unclaimable(self) -> list[str]:
        """Give back the warm slices no request can claim (`unclaimable`: not carved, or on a cordoned node).
        They were counted as carved and no tenant releases them: they held their GPU space for good and the key
        got no replacement where requests can take one."""
        gone = []
        for s in self.slices():
            if s.state == S.SLICE_STATE_READY:
                self.backoff.pop(s.node, None)
        for s, why in [(s, self.unclaimable(s)) for s in self.slices()]:
            if not why:
                continue
            if s.state == S.SLICE_STATE_FAILED:
                delay = min(FAILED_BACKOFF_MAX_S, 2 * self.backoff[s.node][1]) if s.node in self.backoff \
                    else FAILED_BACKOFF_S
                self.backoff[s.node] = (self.clock() + delay, delay)
                why += f"; no warm slice on {s.node} for {delay:g}s"
            if await self.release_ids([s.id], f"warm slice given back: {why}"):
                gone.append(s.id)
                self.ctl.recorder.emit("Slice", s.id, "Warning", "WarmSliceReleased", f"given back: {why}",
                                       node=s.node, source="orchestrator")
        return gone

    async def release(self, key: str, count: int, reason: str) -> list[str]:
        """Give back `count` warm slices of `key`: those still being carved first, then the newest."""
        mine = [s for s in self.slices() if s.labels.get(KEY_LABEL) == key]
        mine.sort(key=lambda s: (s.state == S.SLICE_STATE_READY, s.created_at.ToNanoseconds()))
        chosen = {s.id: s for s in mine[:count]}
        gone = await self.release_ids(list(chosen), f"warm slice given back: {reason}")
        for sid in gone:
            self.ctl.recorder.emit("Slice", sid, "Normal", "WarmSliceReleased", f"given back: {reason}",
                                   node=chosen[sid].node, source="orchestrator")
        return gone

    # -- Allocate's side (synchronous: no other request runs in between) --------------------------

    def claim(self, req: SliceRequest, framework) -> types_pb2.Slice | None:
        """The updated slice record of the warm slice this request takes, or None (then it is scheduled
        as usual). The caller saves it."""
        key = request_key(req)
        if (key is None or req.cpu_milli or req.host_memory_bytes or req.anti_affinity or req.preempt
                or req.avoid_nodes or req.only_gpu):
            return None
        if POOL_LABEL in req.labels:     # a pool's nodes and GPU models are the scheduler's Pool filter's to judge
            return None
        fleet = self.ctl.fleet
        candidates = []
        for s in self.slices():
            if s.state != S.SLICE_STATE_READY or s.profile != req.mig_profile:
                continue
            if req.gpu_model and s.gpu_model != req.gpu_model:
                continue
            if req.gpu_models and s.gpu_model not in req.gpu_models:
                continue
            node = fleet.nodes.get(s.node)
            g = fleet.gpu(s.node, s.gpu_index)
            if node is None or not node.schedulable or g is None or g.health != "healthy" \
                    or "critical" in (g.memory_pressure, g.thermal_state):
                continue
            candidates.append(s)
        if not candidates:
            return None
        state = CycleState()
        for p in framework.pre_filters:            # the tenant's quota, as for any allocation
            if not p.pre_filter(state, req, fleet).ok:
                return None
        # the same key first (exactly what was forecast), then the fullest GPU (keeps the rest whole)
        candidates.sort(key=lambda s: (s.labels.get(KEY_LABEL) != key, -fleet.gpu(s.node, s.gpu_index).fill, s.id))
        w = candidates[0]
        for p in getattr(framework, "permits", ()):   # the quota on what the slice really holds (a MIG
            if not p.permit(state, req, fleet, [w]).ok:  # profile's memory, which the request does not name)
                return None                              # the scheduler's path answers the refusal
        from controlplane.controllers.slices import new_id, now
        ns = types_pb2.Slice()
        ns.CopyFrom(w)
        ts = now()
        ns.allocation_id = new_id("a")
        ns.tenant = req.tenant
        ns.priority = req.priority
        ns.labels.clear()
        ns.labels.update(req.labels)
        ns.message = ""
        ns.created_at.CopyFrom(ts)
        ns.updated_at.CopyFrom(ts)
        self.prior[ns.id] = w
        fleet.put_slice(ns)
        self.claims += 1
        CLAIMS.inc()
        return ns

    async def undo_claim(self, claimed: types_pb2.Slice, warm: types_pb2.Slice) -> None:
        """After a failed claim (its slice put back as etcd has it): where the record still carries the claim
        (another change built on the claimed record while it awaited, e.g. its node lost, and that change was
        written or is queued), the slice goes back to the pool in that record: the warm owner, allocation,
        labels, priority and creation time, the other change's fields kept. Else the tenant would hold an
        allocation its Allocate failed to give it (counted against its quota, never released by it)."""
        cur = self.ctl.fleet.slices.get(claimed.id)
        if cur is None or cur.allocation_id != claimed.allocation_id:
            return
        back = types_pb2.Slice()
        back.CopyFrom(cur)
        back.tenant, back.allocation_id, back.priority = warm.tenant, warm.allocation_id, warm.priority
        back.labels.clear()
        back.labels.update(warm.labels)
        back.created_at.CopyFrom(warm.created_at)
        self.ctl.fleet.put_slice(back)
        try:
            await self.ctl.save_or_restore([back], [cur])
        except Exception as e:  # noqa: BLE001 - the Allocate's own failure is what its caller hears
            log(logger, logging.WARNING, "a failed warm claim is still written as the tenant's; release it",
                slice=claimed.id, allocation=claimed.allocation_id, tenant=claimed.tenant, error=str(e))
            return
        log(logger, logging.INFO, "failed warm claim undone in a record another change wrote", slice=claimed.id,
            allocation=claimed.allocation_id, tenant=claimed.tenant)

    def make_room(self, req: SliceRequest, framework) -> tuple[object, list[str]]:
        """Schedule `req` as if no warm slice existed; returns (decision, warm slice ids in its way).
        The fleet is left as it was."""
        warm = [s for s in self.slices()]
        if not warm:
            return None, []
        for s in warm:
            self.ctl.fleet.drop_slice(s.id)
        try:
            decision = framework.schedule(req, self.ctl.fleet)
        finally:
            for s in warm:
                self.ctl.fleet.put_slice(s)
        if not decision.ok:
            return None, []
        victims = []
        for c in decision.choices:
            for s in warm:
                if s.node != c.node or s.gpu_index != c.gpu_index:
                    continue
                if c.profile and not _overlaps(s, c):
                    continue
                victims.append(s.id)
        YIELDS.inc(len(set(victims)))
        return decision, sorted(set(victims))


def _overlaps(s: types_pb2.Slice, c: placement.Choice) -> bool:
    a0, a1 = s.placement.start, s.placement.start + max(1, s.placement.size)
    b0, b1 = c.start, c.start + max(1, c.size)
    return a0 < b1 and b0 < a1
