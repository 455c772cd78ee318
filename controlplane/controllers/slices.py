"""The slice lifecycle: allocate, realize (via agents), release, lose and recover.

The controller owns the fleet view. Every change is made to the fleet first
(synchronously, so no two requests see the same free capacity), then written
to etcd through the group-commit writer; events and answers go out only once
the write is durable.
"""

from __future__ import annotations

import asyncio
import logging
import secrets

from google.protobuf import timestamp_pb2

from controlplane.state import keys, requestids
from controlplane.state.requestids import RequestIds

from controlplane import placement
from controlplane.scheduler import profiles
from controlplane.api.events import ADDED, DELETED, MODIFIED, EventHub
from controlplane.state.fleet import Fleet
from controlplane.controllers.evictions import EVICT_WAIT_S, preempt
from controlplane.controllers.sessions import Sessions
from controlplane.controllers.slicereports import SliceReports
from controlplane.controllers.slicewrites import SAVE_BATCH, SliceWrites  # noqa: F401 - SAVE_BATCH: its tests
from controlplane.state.store import Absent, Delete, EtcdStore, Present, Put
from controlplane.state.writer import Writer
from gpumesh.v1 import types_pb2
from mesh import errors
from mesh.logs import log
from mesh.slicespec import ISOLATION_ENUM, SliceRequest

logger = logging.getLogger(__name__)
S = types_pb2
REQUEST_TTL_S = 24 * 3600
"""How long an Allocate request id is remembered: a retry with the same id within it gets the same
allocation; after it the id is forgotten (its etcd key expires with a lease), so keys do not pile up."""
REQUEST_LEASE_ROTATE_S = requestids.LEASE_ROTATE_S

TERMINAL = (S.SLICE_STATE_READY, S.SLICE_STATE_FAILED)


def now() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.GetCurrentTime()
    return ts


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(6)}"


class Controller:
    def __init__(self, store: EtcdStore, *, ready_timeout: float = 30.0, release_timeout: float = 30.0) -> None:
        self.store = store
        self.fleet = Fleet()
        self.writer = Writer(store)
        self.writes = SliceWrites(self)
        self.reports = SliceReports(self)
        self.events = EventHub()
        # Durable events (controlplane/events/): the leader sets its Recorder; elsewhere emit does nothing.
        #     ctl.recorder.emit(kind, name, "Normal" | "Warning", reason, message, tenant=..., node=...)
        from controlplane.events.recorder import NullRecorder
        self.recorder = NullRecorder()
        self._state_changes: dict[str, int] = {}         # slice id -> its state before an unsaved change
        self.sessions = Sessions()
        self.ready_timeout = ready_timeout
        self.release_timeout = release_timeout
        self.ready_waiters: dict[str, list[asyncio.Future]] = {}
        self.gone_waiters: dict[str, list[asyncio.Future]] = {}
        self.requests = RequestIds(lambda: self.request_ttl, "Allocate")   # (tenant, request id) -> allocation id
        self.request_lease = requestids.RequestKeyLease(lambda: self.store, lambda: self.request_ttl)
        self.revision = 0
        self.request_ttl = REQUEST_TTL_S                 # how long Allocate request ids are kept (config)
        # Extension points for other components (telemetry, workloads):
        # AgentMessage kind -> async handler(node, message), and
        # callbacks run when an agent's Sync stream opens: hook(node, session).
        self.agent_handlers: dict = {}
        self.session_hooks: list = []
        # fn(SliceRequest) called with every new Allocate request (the history's request stream)
        self.request_listeners: list = []
        # Awaited at the start of a release: hook(slices, wait) (the workload manager stops the
        # workloads on them first, so the agent is not refused the teardown with IN_USE).
        self.release_hooks: list = []
        # The warm-slice pool (controllers/warmslices.py) when the orchestrator keeps one: Allocate claims from it.
        self.warm = None
        # Nodes being deleted (controllers/nodedelete.py): their agent may not register, and nothing waits
        # for an answer from them (a migration's steps fail at once).
        self.deleted_nodes: set[str] = set()
        # Resizes between their commit and the agents' SWAP_SLICES (controllers/resize.py): slice id -> the
        # placement (`placement_of`: device UUID, GPU and compute instance, the limits in its env) its record has
        # since the swap. An agent's report naming another one for it describes the placement before the swap
        # (the record's old one): it is ignored.
        self.swapping: dict[str, tuple] = {}
        # hook(slice) -> whether a release's removal of it waits (a resize's client slice until its agents swap,
        # resize.py); a held one's release revision by slice id, for that hook's owner to send (`held_removals`)
        self.removal_holds: list = []
        self.held_removals: dict[str, int] = {}
        self.evict_wait = EVICT_WAIT_S      # how long a drain or a preemption waits for a release (evictions.py)

    # -- persistence helpers ------------------------------------------------------------

    async def save_or_restore(self, changed: list[types_pb2.Slice], priors: list[types_pb2.Slice],
                              deleted: list[types_pb2.Slice] = ()) -> int:
        """`save` of changes already made in the fleet, in batches, the fleet put back as etcd has it when one
        fails (slicewrites.py)."""
        return await self.writes.save_or_restore(changed, priors, deleted)

    async def save(self, changed: list[types_pb2.Slice], deleted: list[types_pb2.Slice] = (),
                   created: bool = False, extra: list = (), extra_conds: list = (), added: bool = False) -> int:
        """Write `changed` slices (and delete `deleted`) durably, then publish events (ADDED when
        `created`, or `added`: a claimed warm slice is new to its tenant's watchers)."""
        ops = [Put(keys.slice_(s.id), s.SerializeToString()) for s in changed]
        ops += [Delete(keys.slice_(s.id)) for s in deleted]
        ops += list(extra)
        conds = [Absent(keys.slice_(s.id)) if created else Present(keys.slice_(s.id)) for s in changed]
        conds += list(extra_conds)
        rev = await self.writer.write(ops, conds)
        self.revision = max(self.revision, rev)
        for s in changed:
            self.fleet.revisions[s.id] = rev
            self.events.publish(ADDED if created or added else MODIFIED, s, rev)
            self._slice_event(s, created)
            if s.state in TERMINAL or s.state == S.SLICE_STATE_RELEASING:
                self._resolve(self.ready_waiters, s.id, s)     # released before it was ready: no waiter stays
        for s in deleted:
            self._state_changes.pop(s.id, None)
            self.recorder.emit("Slice", s.id, "Normal", "Released", f"released from {s.node}/GPU {s.gpu_index}",
                               tenant=s.tenant, node=s.node, source="slice-controller")
            self.events.publish(DELETED, s, rev)
            self._resolve(self.gone_waiters, s.id, s)
            self._resolve(self.ready_waiters, s.id, s)     # deleted before it became ready: no waiter stays
        return rev

    def _slice_event(self, s: types_pb2.Slice, created: bool) -> None:
        """The durable event of a slice's state change (written by `save`)."""
        if created:
            where = f"{s.node}/GPU {s.gpu_index}" + (f" ({s.profile}, start {s.placement.start})" if s.profile else
                                                     f" ({s.memory_bytes >> 20} MiB)")
            self.recorder.emit("Slice", s.id, "Normal", "Scheduled", f"assigned to {where} by allocation "
                               f"{s.allocation_id}", tenant=s.tenant, node=s.node, source="scheduler")
            return
        before = self._state_changes.pop(s.id, None)
        if before is None:
            return
        state = S.SliceState.Name(s.state).removeprefix("SLICE_STATE_").capitalize()
        warn = s.state in (S.SLICE_STATE_FAILED, S.SLICE_STATE_UNKNOWN)
        reason = {"Ready": "SliceReady", "Failed": "SliceFailed", "Releasing": "Releasing",
                  "Unknown": "SliceUnknown", "Pending": "SlicePending"}.get(state, "Slice" + state)
        was = S.SliceState.Name(before).removeprefix("SLICE_STATE_").lower()
        self.recorder.emit("Slice", s.id, "Warning" if warn else "Normal", reason,
                           f"{was} -> {state.lower()}" + (f": {s.message}" if s.message else ""),
                           tenant=s.tenant, node=s.node, source="slice-controller")

    @staticmethod
    def _resolve(table: dict, slice_id: str, value) -> None:
        for fut in table.pop(slice_id, ()):
            if not fut.done():
                fut.set_result(value)

    @staticmethod
    def _unwait(table: dict, futs) -> None:
        """Drop the futures of waits that ended without an answer (timed out, cancelled)."""
        gone = set(map(id, futs))
        for sid in [k for k, v in table.items() if any(id(f) in gone for f in v)]:
            left = [f for f in table[sid] if id(f) not in gone]
            if left:
                table[sid] = left
            else:
                del table[sid]

    def _wait(self, table: dict, slice_id: str) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        table.setdefault(slice_id, []).append(fut)
        return fut

    def _update(self, s: types_pb2.Slice, **fields) -> types_pb2.Slice:
        ns = types_pb2.Slice()
        ns.CopyFrom(s)
        env = fields.pop("env", None)
        for k, v in fields.items():
            setattr(ns, k, v)
        if env is not None:
            ns.env.clear()
            ns.env.update(env)
        ns.updated_at.CopyFrom(now())
        if ns.state != s.state:
            self._state_changes.setdefault(ns.id, s.state)
        self.fleet.put_slice(ns)
        return ns

    # -- allocate ---------------------------------------------------------------------

    def _slices_for(self, req: SliceRequest, choices: list[placement.Choice]) -> list[types_pb2.Slice]:
        alloc_id, ts = new_id("a"), now()
        out = []
        for c in choices:
            s = types_pb2.Slice(
                id=new_id("s"), allocation_id=alloc_id, tenant=req.tenant, node=c.node, gpu_uuid=c.gpu_uuid,
                gpu_index=c.gpu_index, gpu_model=c.gpu_model, isolation=ISOLATION_ENUM[c.isolation],
                profile=c.profile or "", memory_bytes=c.memory_bytes, compute_share=c.compute_share,
                state=S.SLICE_STATE_PENDING, priority=req.priority, labels=req.labels, created_at=ts, updated_at=ts)
            if c.profile:
                s.placement.start, s.placement.size = c.start, c.size
            out.append(s)
        return out

    async def allocate(self, req: SliceRequest, request_id: str = "", no_wait: bool = False,
                       timeout: float = 0.0, fingerprint: str = "") -> tuple[str, list[types_pb2.Slice]]:
        """Place `req` (see SliceService.Allocate). A `request_id` seen before answers its allocation when
        `fingerprint` (requestids.allocate_fingerprint; "" compares with nothing) is the first call's, and
        raises RequestIdReused when it is not, FailedPrecondition when that allocation was released since."""
        if request_id:
            existing = self.requests.check(req.tenant, request_id, fingerprint)
            if existing:
                if self.released(existing):
                    # its result is spent: answering an allocation of no slices would read as a success
                    raise errors.FailedPrecondition(
                        f"request_id: {request_id!r} named allocation {existing}, which has been released since "
                        f"(an idempotency key answers its first call's result): use a new request_id to allocate "
                        f"again")
                return existing, await self._await_ready(existing, no_wait, timeout)
        for listener in self.request_listeners:
            try:
                listener(req)
            except Exception:   # noqa: BLE001 - the history never stops an allocation
                logger.exception("request listener")
        # The decision and the fleet update below run without an await in between, so no other
        # request sees the same capacity; victims of a preemption are evicted before the bind.
        framework = getattr(self, "scheduler", None)
        if framework is None:    # this controller's own: its scorers learn the request mix, never shared
            framework = self.scheduler = profiles.build("default")
        warm = self.warm
        if warm is not None:
            claimed = warm.claim(req, framework)
            if claimed is not None:
                return await self._claimed(req, request_id, claimed, warm, fingerprint)
        decision = framework.schedule(req, self.fleet)
        warm_victims: list[str] = []
        if not decision.ok and warm is not None:
            room, warm_victims = warm.make_room(req, framework)
            if room is not None:
                decision = room     # no await from here to release_ids below: no claim can take a victim
        if not decision.ok:
            refused = placement.exhausted(req, decision)
            self.recorder.emit("Allocation", request_id or "-", "Warning", "FailedScheduling", str(refused),
                               tenant=req.tenant, source="scheduler")
            raise refused
        slices = self._slices_for(req, decision.choices)
        alloc_id = slices[0].allocation_id
        for s, c in zip(slices, decision.choices):
            s.cpu_milli, s.host_memory_bytes = c.cpu_milli, c.host_memory_bytes
            s.anti_affinity.update(req.anti_affinity)
            self.fleet.put_slice(s)
        extra, conds = [], []
        try:
            # a victim whose release is not durable fails the allocation: its slices leave the fleet below
            if warm_victims:
                log(logger, logging.INFO, "warm slices yield", victims=warm_victims, allocation=alloc_id)
                await warm.release_ids(warm_victims, f"warm slice yields its space to allocation {alloc_id}")
            await preempt(self, decision.victims, alloc_id, req)
            if request_id:
                await self._request_ops(req.tenant, request_id, alloc_id, fingerprint, extra, conds)
            rev = await self.save(slices, created=True, extra=extra, extra_conds=conds)
        except BaseException:
            for s in slices:
                self.fleet.drop_slice(s.id)
            self._forget_request(req.tenant, request_id, alloc_id)
            raise
        log(logger, logging.INFO, "allocated", allocation=alloc_id, tenant=req.tenant,
            slices=[f"{s.id}@{s.node}/{s.gpu_index}" for s in slices])
        placed = ", ".join(f"{s.id} on {s.node}/GPU {s.gpu_index}" for s in slices[:8])
        self.recorder.emit("Allocation", alloc_id, "Normal", "Scheduled", f"placed {len(slices)} slice(s): {placed}"
                           + (" ..." if len(slices) > 8 else "")
                           + (f" (preempted {len(decision.victims)})" if decision.victims else ""),
                           tenant=req.tenant, source="scheduler")
        waits = [] if no_wait else [self._wait(self.ready_waiters, s.id) for s in slices]
        by_node: dict[str, list] = {}
        for s in slices:
            by_node.setdefault(s.node, []).append(s)
        for node, group in by_node.items():
            session = self.sessions.get(node)
            if session is not None:
                session.send_upserts(group, rev)
        if no_wait:
            return alloc_id, slices
        return alloc_id, await self._gather(alloc_id, [s.id for s in slices], waits, timeout)

    async def _claimed(self, req: SliceRequest, request_id: str, s: types_pb2.Slice, warm,
                       fingerprint: str = "") -> tuple[str, list]:
        """Allocate's answer from a claimed warm slice (controllers/warmslices.py): saved under the
        tenant and answered READY at once; the agent is told the new owner. The tenant's events are
        those of a fresh slice (scheduled, then ready); that it was warm is an admin's event."""
        extra, conds = [], []
        warm_key = f"{s.profile}/{s.gpu_model}"
        try:
            if request_id:   # may await the keys' lease: a change of the slice meanwhile is in the fleet's record
                await self._request_ops(req.tenant, request_id, s.allocation_id, fingerprint, extra, conds)
                s = self.fleet.slices.get(s.id, s)
            rev = await self.save([s], extra=extra, extra_conds=conds, added=True)
        except BaseException as e:
            self._forget_request(req.tenant, request_id, s.allocation_id)
            prior = warm.prior.pop(s.id, None)
            # as etcd has it (still warm, mostly), unless a change built on the claim during the lease's await (its
            # node lost) or the slice's deletion (its node deleted) was written: then that change's record stays
            await self.writes._put_back([(s, None)], {prior.id: prior} if prior is not None else {},
                                        read=not isinstance(e, asyncio.CancelledError))
            if prior is not None:       # ... but not as the tenant's: the claim is undone in it
                await warm.undo_claim(s, prior)
            raise
        warm.prior.pop(s.id, None)
        log(logger, logging.INFO, "allocated from a warm slice", allocation=s.allocation_id, tenant=req.tenant,
            slices=[f"{s.id}@{s.node}/{s.gpu_index}"])
        self.recorder.emit("Allocation", s.allocation_id, "Normal", "Scheduled",
                           f"placed 1 slice(s): {s.id} on {s.node}/GPU {s.gpu_index}", tenant=req.tenant,
                           source="scheduler")
        self.recorder.emit("Slice", s.id, "Normal", "Scheduled", f"assigned to {s.node}/GPU {s.gpu_index} ({s.profile}, "
                           f"start {s.placement.start}) by allocation {s.allocation_id}", tenant=req.tenant,
                           node=s.node, source="scheduler")
        self.recorder.emit("Slice", s.id, "Normal", "SliceReady", "pending -> ready", tenant=req.tenant, node=s.node,
                           source="slice-controller")
        self.recorder.emit("Slice", s.id, "Normal", "WarmSliceClaimed", f"warm {warm_key} claimed by allocation "
                           f"{s.allocation_id}", node=s.node, source="orchestrator")
        session = self.sessions.get(s.node)
        if session is not None:
            session.send_upserts([s], rev)
        return s.allocation_id, [s]

    def remember_request(self, tenant: str, request_id: str, alloc_id: str, fingerprint: str = "") -> None:
        """Keep an Allocate request id for REQUEST_TTL_S (a retry within it gets the same allocation)."""
        self.requests.remember(tenant, request_id, alloc_id, fingerprint)

    async def _request_ops(self, tenant: str, request_id: str, alloc_id: str, fingerprint: str, extra: list,
                           conds: list) -> None:
        """Remember the id (a concurrent retry finds it) and add its durable key, with the fingerprint, to the
        allocation's write; guarded by its absence, so two first calls never both win."""
        self.remember_request(tenant, request_id, alloc_id, fingerprint)
        lease = await self._request_lease()
        extra.append(Put(keys.request(tenant, request_id), requestids.encode(alloc_id, fingerprint), lease=lease))
        conds.append(Absent(keys.request(tenant, request_id)))

    def _forget_request(self, tenant: str, request_id: str, alloc_id: str) -> None:
        """Drop a failed Allocate's request id, unless a concurrent call with the same id owns it now."""
        self.requests.forget(tenant, request_id, alloc_id)

    async def _request_lease(self) -> int:
        """The etcd lease request keys are written with (requestids.RequestKeyLease)."""
        return await self.request_lease.get()

    async def _await_ready(self, alloc_id: str, no_wait: bool, timeout: float) -> list[types_pb2.Slice]:
        ids = [s.id for s in self.fleet.slices_of(alloc_id)]
        if no_wait:
            return [self.fleet.slices[i] for i in ids]
        waits = []
        for i in ids:
            if self.fleet.slices[i].state not in TERMINAL:
                waits.append(self._wait(self.ready_waiters, i))
        return await self._gather(alloc_id, ids, waits, timeout)

    async def _gather(self, alloc_id: str, ids: list[str], waits, timeout: float) -> list[types_pb2.Slice]:
        timeout = timeout or self.ready_timeout
        if waits:
            done, pending = await asyncio.wait(waits, timeout=timeout)
            if pending:
                for f in pending:
                    f.cancel()
                self._unwait(self.ready_waiters, pending)
                raise errors.DeadlineExceeded(
                    f"allocation {alloc_id} is placed but not ready after {timeout:g}s (its node agent has not "
                    f"realized it yet); it stays PENDING: follow it with Get/Watch or release it")
        slices = [self.fleet.slices[i] for i in ids if i in self.fleet.slices]
        failed = [s for s in slices if s.state == S.SLICE_STATE_FAILED]
        if failed:
            await self.release(alloc_id, wait=False)
            raise errors.Unavailable(f"node {failed[0].node} could not realize slice {failed[0].id}: "
                                     f"{failed[0].message}; the allocation was released, retry (with a new request_id: "
                                     f"this one names the released allocation)")
        released = [s for s in slices if s.state == S.SLICE_STATE_RELEASING]
        if released or len(slices) < len(ids):
            # released while the call waited (a Release, a preemption, its node drained or deleted): never a
            # partial or releasing slice list as if it were the allocation
            why = f"{released[0].message or 'released'} ({released[0].id})" if released else "its slices were deleted"
            raise errors.Aborted(f"allocation {alloc_id} was released before it was ready: {why}; retry with a new "
                                 f"request_id (this one names the released allocation)")
        return slices

    # -- release ----------------------------------------------------------------------

    def released(self, alloc_id: str) -> bool:
        """Whether every slice of the allocation is gone or being released (its result is spent)."""
        return all(s.state == S.SLICE_STATE_RELEASING for s in self.fleet.slices_of(alloc_id))

    def find(self, ident: str) -> list[types_pb2.Slice]:
        if ident in self.fleet.slices:
            return [self.fleet.slices[ident]]
        group = self.fleet.slices_of(ident)
        if not group:
            raise errors.NotFound(f"no slice or allocation {ident!r}", kind="slice", name=ident)
        return group

    async def release(self, ident: str, wait: bool = True, message: str = "") -> list[types_pb2.Slice]:
        targets = self.find(ident)
        for hook in self.release_hooks:
            await hook([s for s in targets if s.state != S.SLICE_STATE_RELEASING], wait)
        # as they are now: while a hook awaits (a workload's stop) a slice may change (its agent's report, a resize)
        # or go; RELEASING built from the copies read before undid that, or brought a deleted slice back
        targets = [self.fleet.slices[s.id] for s in targets if s.id in self.fleet.slices]
        priors = [s for s in targets if s.state != S.SLICE_STATE_RELEASING]
        changed = [self._update(s, state=S.SLICE_STATE_RELEASING, message=message or "released") for s in priors]
        result = [self.fleet.slices[s.id] for s in targets]
        gone = [self._wait(self.gone_waiters, s.id) for s in result] if wait else []
        if changed:
            try:
                rev = await self.save_or_restore(changed, priors)
            except BaseException:
                for f in gone:
                    f.cancel()
                self._unwait(self.gone_waiters, gone)
                raise
            by_node: dict[str, list[str]] = {}
            for s in changed:
                if any(hold(s) for hold in self.removal_holds):
                    self.held_removals[s.id] = rev
                    continue
                by_node.setdefault(s.node, []).append(s.id)
            for node, ids in by_node.items():
                session = self.sessions.get(node)
                if session is not None:
                    session.send_removals(ids, rev)
        connected = [s for s in result if self.sessions.get(s.node) is not None
                     and self.fleet.nodes.get(s.node) and self.fleet.nodes[s.node].ready]
        if wait and connected and gone:
            await asyncio.wait(gone, timeout=self.release_timeout)
        for f in gone:
            f.cancel()
        self._unwait(self.gone_waiters, [f for f in gone if f.cancelled()])
        return [self.fleet.slices.get(s.id, s) for s in result]

    # -- agent reports ----------------------------------------------------------------

    async def report(self, node: str, full: bool, statuses, released) -> None:
        """An agent's slice statuses applied (slicereports.py)."""
        await self.reports.report(node, full, statuses, released)

    async def mark_node_lost(self, node: str, why: str) -> None:
        await self.reports.mark_node_lost(node, why)

    async def end_node_slices(self, node: str, message: str) -> tuple[list[str], list[str]]:
        """A deleted node's slices (controllers/nodedelete.py): their allocations are released as a drain
        evicts them (`release`: RELEASING with `message`, workloads stopped first, removals sent to the
        other nodes' agents), then the records of the slices on `node`, whose agent will never confirm a
        teardown, are deleted as an agent's release report would (watchers see DELETED, waiters answer).
        Idempotent: a retry ends what is left. (slice ids, allocation ids) ended."""
        on = self.fleet.slices_on(node)
        ids, allocs = [s.id for s in on], sorted({s.allocation_id for s in on})
        for alloc in allocs:
            if self.fleet.slices_of(alloc):
                try:
                    await self.release(alloc, wait=False, message=message)
                except errors.NotFound:
                    continue        # released and gone meanwhile (its tenant, a drain): nothing left to end
        await self.save_or_restore([], [], [self.fleet.drop_slice(s.id) for s in self.fleet.slices_on(node)])
        return ids, allocs
