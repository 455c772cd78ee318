"""Workloads: processes the node agents run on slices (WorkloadService).

The control plane keeps every workload in etcd (`/gpumesh/v1/workloads/<id>`) and in memory. The agents
run them: on every Sync open the node gets the full set it should be running (WorkloadCommand full), then
starts and stops as they are asked for; agents answer with WorkloadStatusReports (full on connect, then
changes). Logs are streamed through the node's Sync stream: a LogRequest goes down with a request id, the
LogChunks coming back are routed to the waiting Logs call by that id.

A workload whose slice turns UNKNOWN (node NotReady) becomes UNKNOWN until its
agent reports again; releasing a slice stops its workloads first.
"""

from __future__ import annotations

import asyncio
import logging

from controlplane.api import auth
from controlplane.state import keys, requestids
from controlplane.state.requestids import RequestIds
from controlplane.controllers.nodedelete import node_deleted
from controlplane.controllers.slices import Controller, new_id, now
from controlplane.controllers.workloadrecords import TERMINAL, W, WorkloadRecords
from controlplane.controllers.workloadspec import _check_id, backend_share, validate_run
from controlplane.api.events import DELETED, Subscription
from controlplane.api.rpc import streaming, unary
from controlplane.serving.replicakeys import redacted
from controlplane.state.store import Absent, Put
from gpumesh.v1 import node_service_pb2, types_pb2, workload_service_pb2, workload_service_pb2_grpc
from mesh import errors
from mesh.logs import log

logger = logging.getLogger(__name__)
STOPPING = "stopping"
RUN_WAIT = 10.0        # how long Run waits for the agent to start the process
STOP_SLACK = 5.0       # Stop waits the grace period plus this for the process to end
SLICE_RETRY_S = 1.0    # before a resync of the workloads with the fleet after a failed write


class WorkloadManager(WorkloadRecords):
    """Workload records (workloadrecords.py: their conditional writes), the agents' view of them, and log
    routing."""

    def __init__(self, ctl: Controller) -> None:
        super().__init__(ctl)
        self.log_queues: dict[str, asyncio.Queue] = {}   # LogRequest id -> its chunks
        # hook(node) -> more workloads the node must keep running (migration targets; controlplane/controllers/migrations.py)
        self.extra_desired: list = []
        # hook(slice id) -> why no workload may start on the slice now, or "" (a migration's target)
        self.run_guards: list = []
        self._watch: asyncio.Task | None = None
        self.expired_ids: dict = {}                      # recently expired IDs (controlplane/controllers/retention.py)
        self.resyncs = 0                                 # times the slice follower fell behind and resynced
        self.requests = RequestIds(lambda: ctl.request_ttl, "Run")     # (tenant, Run request id) -> workload id
        ctl.session_hooks.append(self._session_opened)
        ctl.agent_handlers["workloads"] = self._report
        ctl.agent_handlers["log"] = self._log_chunk
        ctl.release_hooks.append(self.stop_on_slices)

    async def load(self) -> None:
        reqs = await self.ctl.store.load(keys.WORKLOAD_REQUESTS)
        for key, (value, _rev, _lease) in reqs.kvs.items():
            tenant, _, rid = key.decode()[len(keys.WORKLOAD_REQUESTS):].partition("/")
            self.requests.load(tenant, rid, value)
        snap = await self.ctl.store.load(keys.WORKLOADS)
        for value, rev, _lease in snap.kvs.values():
            w = types_pb2.Workload()
            w.ParseFromString(value)
            self.workloads[w.id] = w
            self.revisions[w.id] = rev
            if w.state not in TERMINAL and w.message == STOPPING:
                self.stopping.add(w.id)

        def lost(w: types_pb2.Workload) -> types_pb2.Workload | None:
            node = self.ctl.fleet.nodes.get(w.node)
            if w.state in TERMINAL or w.state == W.WORKLOAD_STATE_UNKNOWN or (node and node.ready):
                return None
            return self._copy(w, state=W.WORKLOAD_STATE_UNKNOWN, message=f"node {w.node} NotReady")
        await self.update(list(self.workloads), lost, "node NotReady at load")
        self._watch = asyncio.create_task(self._follow_slices(), name="workload-slices")

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()

    def desired_on(self, node: str) -> list[types_pb2.Workload]:
        out = [w for w in self.workloads.values()
               if w.node == node and w.state not in TERMINAL and w.id not in self.stopping]
        for hook in self.extra_desired:
            out += hook(node)
        return out

    # -- API ------------------------------------------------------------------------------

    def get(self, wid: str) -> types_pb2.Workload:
        _check_id(wid, "id", "a workload ID (w-...)")
        w = self.workloads.get(wid)
        if w is None:
            raise errors.NotFound(f"no workload {wid!r}", kind="workload", name=wid)
        return w

    async def run(self, req: workload_service_pb2.RunWorkloadRequest) -> types_pb2.Workload:
        validate_run(req)
        s = self.ctl.fleet.slices.get(req.slice_id)
        if s is None:
            raise errors.NotFound(f"no slice {req.slice_id!r}", kind="slice", name=req.slice_id)
        if s.state != types_pb2.SLICE_STATE_READY:
            raise errors.FailedPrecondition(
                f"slice {s.id} is {types_pb2.SliceState.Name(s.state).removeprefix('SLICE_STATE_')}, not READY: "
                f"a workload starts only on a READY slice")
        for guard in self.run_guards:
            if why := guard(s.id):
                raise errors.FailedPrecondition(f"slice {s.id} {why}")
        rkey = (s.tenant, req.request_id)
        fp = requestids.fingerprint(req) if req.request_id else ""     # every field but request_id
        if req.request_id:
            seen = self.requests.check(*rkey, fp)
            if seen is not None:        # a retry: the first call's workload, never a second run
                return await self._answer_retry(seen)
        w = types_pb2.Workload(id=new_id("w"), slice_id=s.id, node=s.node, tenant=s.tenant, command=req.command,
                               env=req.env, labels=req.labels, state=W.WORKLOAD_STATE_PENDING, created_at=now())
        if req.HasField("backend"):
            w.backend.CopyFrom(req.backend)
            w.backend.gpu_memory_utilization = backend_share(req.backend, s.memory_bytes,
                                                             self.ctl.fleet.gpu_memory_of(s), s.isolation)
        extra, conds = [], []
        self.creating[w.id] = s.id      # past the guards: no resize of the slice commits until it is written (new_on)
        if req.request_id:
            self.requests.remember(*rkey, w.id, fp)     # a concurrent retry waits on this one
            key = keys.workload_request(*rkey)
            try:
                extra.append(Put(key, requestids.encode(w.id, fp), lease=await self.ctl._request_lease()))
            except BaseException:
                self.requests.forget(*rkey, w.id)
                self.creating.pop(w.id, None)
                raise
            conds.append(Absent(key))
        try:
            await self.save_created(w, extra, conds)
        except BaseException:
            self.requests.forget(*rkey, w.id)
            raise
        log(logger, logging.INFO, "workload created", workload=w.id, slice=s.id, node=s.node,
            request_id=req.request_id or None)
        session = self.ctl.sessions.get(s.node)
        if session is None:
            return w
        session.send(node_service_pb2.ControllerMessage(workloads=node_service_pb2.WorkloadCommand(start=[w])))
        return await self._wait_until(w.id, lambda x: x.state != W.WORKLOAD_STATE_PENDING, RUN_WAIT)

    async def _answer_retry(self, wid: str) -> types_pb2.Workload:
        for _ in range(100):         # a concurrent first call may still be writing it
            if wid in self.workloads:
                break
            await asyncio.sleep(0.05)
        w = self.get(wid)
        if w.state == W.WORKLOAD_STATE_PENDING and self.ctl.sessions.get(w.node) is not None:
            return await self._wait_until(wid, lambda x: x.state != W.WORKLOAD_STATE_PENDING, RUN_WAIT)
        return w

    async def stop_workload(self, wid: str, grace: float = 0.0, wait: bool = True) -> types_pb2.Workload:
        w = self.get(wid)
        if not (0 <= grace <= 3600):
            raise errors.InvalidArgument.of("grace_seconds", f"{grace} is out of range", "0 (10 s) to 3600")
        if w.state in TERMINAL:
            return w
        if w.state == W.WORKLOAD_STATE_PENDING and self.ctl.sessions.get(w.node) is None:
            def never_started(x: types_pb2.Workload) -> types_pb2.Workload | None:
                if x.state != W.WORKLOAD_STATE_PENDING or self.ctl.sessions.get(x.node) is not None:
                    return None     # it started (or ended) meanwhile: the stop below is the record's
                n = self._copy(x, state=W.WORKLOAD_STATE_STOPPED, message="stopped before it started")
                n.finished_at.CopyFrom(now())
                return n
            written = await self.update([wid], never_started, "Stop")
            w = self.workloads.get(wid, written[0] if written else w)
            if written or w.state in TERMINAL:
                return w
        self.stopping.add(wid)
        await self.update([wid], lambda x: None if x.state in TERMINAL else self._copy(x, message=STOPPING), "Stop")
        w = self.workloads.get(wid, w)      # as it is now: a migration may have moved it meanwhile
        session = self.ctl.sessions.get(w.node)
        if session is not None:
            session.send(node_service_pb2.ControllerMessage(workloads=node_service_pb2.WorkloadCommand(stop=[wid])))
        if not wait or session is None:
            return self.workloads[wid]
        # The agent's own grace period applies (WorkloadCommand carries no per-stop grace).
        return await self._wait_until(wid, lambda x: x.state in TERMINAL, (grace or 10.0) + STOP_SLACK)

    async def stop_on_slices(self, slices: list[types_pb2.Slice], wait: bool) -> None:
        """Release hook: stop what runs on `slices` first (waiting for it unless `wait` is false)."""
        ids = {s.id for s in slices}
        running = [w.id for w in self.workloads.values() if w.slice_id in ids and w.state not in TERMINAL]
        if running:
            await asyncio.gather(*(self.stop_workload(wid, wait=wait) for wid in running))

    def list(self, tenant: str = "", node: str = "", slice_id: str = "") -> list[types_pb2.Workload]:
        out = [w for w in self.workloads.values()
               if (not tenant or w.tenant == tenant) and (not node or w.node == node)
               and (not slice_id or w.slice_id == slice_id)]
        out.sort(key=lambda w: (w.created_at.seconds, w.created_at.nanos, w.id))
        return out

    async def logs(self, wid: str, tail_lines: int, follow: bool, context=None):
        w = self.get(wid)
        if tail_lines < 0:
            raise errors.InvalidArgument.of("tail_lines", f"{tail_lines} is negative", "0 (all) or more")
        session = self.ctl.sessions.get(w.node)
        if session is None:
            raise errors.Unavailable(f"node {w.node} is not connected: its logs cannot be read now")
        rid = new_id("l")
        # bounded: a reader that stops reading is cut off (RESOURCE_EXHAUSTED) instead of chunks piling up
        q = Subscription("WorkloadService.Logs", self.ctl.events.max_queue, context)
        self.log_queues[rid] = q
        session.send(node_service_pb2.ControllerMessage(logs=node_service_pb2.LogRequest(
            request_id=rid, workload_id=wid, tail_lines=tail_lines, follow=follow)))
        finished = False
        try:
            while True:
                try:
                    async with asyncio.timeout(1.0):     # not wait_for: on 3.11 it can drop a cancel (gh-86296)
                        chunk = await q.next()
                except TimeoutError:
                    if self.ctl.sessions.get(w.node) is not session:
                        raise errors.Unavailable(f"node {w.node} disconnected while sending the log") from None
                    continue
                if chunk.error:
                    finished = True
                    raise errors.NotFound(chunk.error, kind="workload", name=wid) if "no workload" in chunk.error \
                        else errors.Unavailable(chunk.error)
                yield chunk
                if chunk.eof:
                    finished = True
                    return
        finally:
            self.log_queues.pop(rid, None)
            if not finished and self.ctl.sessions.get(w.node) is session:
                session.send(node_service_pb2.ControllerMessage(logs=node_service_pb2.LogRequest(
                    request_id=rid, workload_id=wid, cancel=True)))

    # -- agents -----------------------------------------------------------------------------

    def _session_opened(self, node: str, session) -> None:
        session.send(node_service_pb2.ControllerMessage(workloads=node_service_pb2.WorkloadCommand(
            full=True, start=self.desired_on(node))))

    async def _report(self, node: str, rep: node_service_pb2.WorkloadStatusReport) -> None:
        reported, forget = {}, []
        for st in rep.workloads:
            w = self.workloads.get(st.id)
            if w is None and st.id in self.expired_ids and st.state in TERMINAL:
                forget.append(st.id)        # expired while this agent was away: its files go too
                self.expired_ids.pop(st.id, None)
            if w is None or w.node != node:
                continue
            if w.state == W.WORKLOAD_STATE_FAILED and w.message == node_deleted(node):
                # the agent of a deleted node came back (a new node of the same name): its old workloads
                # stay as the deletion ended them, and once stopped there their files go
                if st.state in TERMINAL:
                    forget.append(st.id)
                continue
            reported[st.id] = st
        session = self.ctl.sessions.get(node)
        if forget and session is not None:
            session.send(node_service_pb2.ControllerMessage(workloads=node_service_pb2.WorkloadCommand(forget=forget)))
        # applied again to the record as etcd holds it if another write went first (workloadrecords.py)
        await self.update(reported, lambda w: self._reported(node, w, reported[w.id]), f"{node}'s status report")

    def _reported(self, node: str, w: types_pb2.Workload, st: types_pb2.Workload) -> types_pb2.Workload | None:
        """Workload `w`'s record after `node` reported `st` of it; None when the report changes nothing."""
        if w.node != node:
            # the record moved (a migration committed) after the report was read: the node no longer holds it
            log(logger, logging.INFO, "status report from a node that no longer holds the workload; ignored",
                workload=w.id, node=node, holder=w.node, reported=W.WorkloadState.Name(st.state))
            return None
        if w.state == W.WORKLOAD_STATE_FAILED and w.message == node_deleted(node):
            return None
        if w.state in TERMINAL and st.state not in TERMINAL:
            return None         # a late report never revives a finished workload
        message = STOPPING if st.id in self.stopping and st.state not in TERMINAL else st.message
        n = self._copy(w, state=st.state, pid=st.pid, exit_code=st.exit_code, message=message)
        if st.endpoint:
            n.endpoint = st.endpoint        # a backend's address, picked by the agent
            n.endpoint_certificate = st.endpoint_certificate    # ... its server's (new at each start)
            n.command[:] = st.command
            n.env.update(st.env)            # ... its own variables (vLLM's KV cache size on CPUs)
            if st.backend.device:
                n.backend.device = st.backend.device      # ... and the vLLM build it chose
        if st.network_address:
            n.network_address = st.network_address      # an isolated workload's bridge address
        for f in ("started_at", "finished_at"):
            if st.HasField(f):
                getattr(n, f).CopyFrom(getattr(st, f))
        return n

    async def _log_chunk(self, node: str, chunk: node_service_pb2.LogChunk) -> None:
        q = self.log_queues.get(chunk.request_id)
        if q is not None:
            q.put_nowait(chunk)

    async def _follow_slices(self) -> None:
        """Slices that turn UNKNOWN (node lost) make their workloads UNKNOWN; deleted slices end theirs.

        Cut off for falling behind (events.py), it logs, subscribes again and reconciles every workload
        with the fleet as it is now, so no slice change is missed."""
        resync = False
        while True:
            q = self.ctl.events.subscribe("workload slice follower")
            try:
                if resync:
                    self.resyncs += 1
                    if not await self._apply_slices(list(self.workloads), self._reconciled, "resync"):
                        continue    # not written: again (a subscription anew, the fleet read anew)
                while True:
                    try:
                        ev = await q.next()
                    except errors.ResourceExhausted as e:
                        log(logger, logging.WARNING, "workload slice follower fell behind; resyncing from the "
                            "fleet", error=str(e))
                        break
                    if ev is None:
                        break       # ended by the hub: subscribe again and resync
                    sid, s = ev.slice.id, None if ev.type == DELETED else ev.slice
                    ids = [w.id for w in self.workloads.values() if w.slice_id == sid and w.state not in TERMINAL]
                    if not await self._apply_slices(ids, lambda w: None if w.slice_id != sid or w.state in TERMINAL
                                                    else self._follow(w, s), f"slice {sid} changed"):
                        break       # not written (nothing delivers this change again): resync from the fleet
                resync = True
            finally:
                self.ctl.events.unsubscribe(q)

    def _follow(self, w: types_pb2.Workload, s: types_pb2.Slice | None) -> types_pb2.Workload | None:
        """The workload's new record given its slice now (None: deleted); None when unchanged."""
        if s is None:
            n = self._copy(w, state=W.WORKLOAD_STATE_STOPPED, message=f"slice {w.slice_id} released")
            n.finished_at.CopyFrom(now())
            return n
        if s.state == types_pb2.SLICE_STATE_UNKNOWN and w.state != W.WORKLOAD_STATE_UNKNOWN:
            return self._copy(w, state=W.WORKLOAD_STATE_UNKNOWN, message=f"node {w.node} NotReady: {s.message}")
        return None

    def _reconciled(self, w: types_pb2.Workload) -> types_pb2.Workload | None:
        """The workload's record given its slice as the fleet holds it now."""
        return None if w.state in TERMINAL else self._follow(w, self.ctl.fleet.slices.get(w.slice_id))

    async def _apply_slices(self, ids: list[str], change, what: str) -> bool:
        try:
            await self.update(ids, change, what)
            return True
        except errors.MeshError as e:
            log(logger, logging.WARNING, "cannot update workloads; resyncing", error=str(e))
            await asyncio.sleep(SLICE_RETRY_S)
            return False


ENV_HIDDEN = "(hidden from viewers)"


def shown(w: types_pb2.Workload) -> types_pb2.Workload:
    """`w` as the caller may read it: never its backend's key (`redacted`); for a viewer, its environment's values
    hidden too (the names stay). The tenant sets them and they often hold its credentials (an HF_TOKEN, a database
    password); a viewer (a dashboard, an on-call reader) reads state and logs and needs none of them."""
    out = redacted(w)
    if auth.current().role != "viewer" or not out.env:
        return out
    if out is w:
        out = types_pb2.Workload()
        out.CopyFrom(w)
    out.env.update({k: ENV_HIDDEN for k in out.env})     # not set while iterating: upb's map iterator is undefined then
    return out


class WorkloadService(workload_service_pb2_grpc.WorkloadServiceServicer):
    def __init__(self, manager: WorkloadManager) -> None:
        self.m = manager

    def _own(self, wid: str) -> None:
        """Another tenant's workload reads as unknown."""
        w = self.m.workloads.get(wid)
        if w is not None:
            auth.check_visible(w.tenant, "workload", wid)

    @unary
    async def Run(self, request, context):
        s = self.m.ctl.fleet.slices.get(request.slice_id)
        if s is not None:
            auth.check_visible(s.tenant, "slice", request.slice_id)
            if not s.tenant:        # a warm slice (the orchestrator's): a tenant claims it empty
                raise errors.FailedPrecondition(f"slice {request.slice_id} is a warm slice held for Allocate "
                                                "and runs no workload; allocate a slice to run one")
        return shown(await self.m.run(request))

    @unary
    async def Stop(self, request, context):
        self._own(request.id)
        return shown(await self.m.stop_workload(request.id, request.grace_seconds))

    @unary
    async def Get(self, request, context):
        self._own(request.id)
        return shown(self.m.get(request.id))

    @unary
    async def List(self, request, context):
        return workload_service_pb2.ListWorkloadsResponse(
            workloads=[shown(w) for w in self.m.list(auth.scope_tenant(request.tenant), request.node,
                                                        request.slice_id)])

    @streaming
    async def Logs(self, request, context):
        self._own(request.id)
        async for chunk in self.m.logs(request.id, request.tail_lines, request.follow, context):
            yield chunk
