"""The gRPC servicers: thin adapters from the v1 API onto the controller."""

from __future__ import annotations

import asyncio
import logging
import re

import grpc

from controlplane.api import auth
from controlplane.controllers.slices import Controller
from controlplane.controllers.nodes import NodeManager, validate_node_name
from controlplane.state import requestids
from controlplane.api.rpc import streaming, unary
from controlplane.controllers.telemetry import HEALTH_ENUM, PRESSURE_ENUM, THERMAL_ENUM
from gpumesh.v1 import (admin_service_pb2, admin_service_pb2_grpc, node_service_pb2, node_service_pb2_grpc,
                        slice_service_pb2, slice_service_pb2_grpc, types_pb2)
from mesh import errors, slicespec
from mesh import version as release
from mesh.logs import log

logger = logging.getLogger(__name__)
MAX_ID = 128


def _check_id(value: str, field: str) -> str:
    if not value:
        raise errors.InvalidArgument.of(field, "is required", "a slice ID (s-...) or allocation ID (a-...)")
    if len(value) > MAX_ID or not value.isprintable():
        raise errors.InvalidArgument.of(field, "is not a valid ID", f"printable, at most {MAX_ID} characters")
    return value


class SliceService(slice_service_pb2_grpc.SliceServiceServicer):
    def __init__(self, ctl: Controller) -> None:
        self.ctl = ctl

    @unary
    async def Allocate(self, request, context):
        request.spec.tenant = auth.scope_tenant(request.spec.tenant, "spec.tenant")
        req = slicespec.validate(request.spec)
        if not auth.current().admin:
            for key in request.spec.labels:
                if key in slicespec.SYSTEM_LABELS:
                    raise errors.InvalidArgument.of(f"spec.labels[{key!r}]", "is set by gpumesh itself",
                                                    "labels other than " + ", ".join(sorted(slicespec.SYSTEM_LABELS)))
        if len(request.request_id) > MAX_ID or not request.request_id.isprintable():
            raise errors.InvalidArgument.of("request_id", "is not valid", f"printable, at most {MAX_ID} characters")
        if not (0 <= request.timeout_seconds <= 3600):
            raise errors.InvalidArgument.of("timeout_seconds", f"{request.timeout_seconds} is out of range",
                                            "0 (server default) to 3600")
        fp = requestids.allocate_fingerprint(request) if request.request_id else ""   # after the tenant is scoped
        alloc_id, slices = await self.ctl.allocate(req, request.request_id, request.no_wait,
                                                   request.timeout_seconds, fingerprint=fp)
        return slice_service_pb2.AllocateResponse(allocation_id=alloc_id, slices=slices)

    @unary
    async def Release(self, request, context):
        rid = _check_id(request.id, "id")
        if not auth.current().admin:
            owners = {s.tenant for s in ([self.ctl.fleet.slices[rid]] if rid in self.ctl.fleet.slices else
                                         self.ctl.fleet.slices_of(rid))}
            if owners and not all(auth.visible(t) for t in owners):
                raise errors.NotFound(f"no slice or allocation {rid!r}", kind="slice", name=rid)
        slices = await self.ctl.release(rid)
        return slice_service_pb2.ReleaseResponse(slices=slices)

    @unary
    async def Get(self, request, context):
        sid = _check_id(request.id, "id")
        s = self.ctl.fleet.slices.get(sid)
        if s is None:
            raise errors.NotFound(f"no slice {sid!r}", kind="slice", name=sid)
        auth.check_visible(s.tenant, "slice", sid)
        return s

    @unary
    async def List(self, request, context):
        tenant = auth.scope_tenant(request.tenant)
        out = [s for s in self.ctl.fleet.slices.values()
               if (not tenant or s.tenant == tenant)
               and (not request.node or s.node == request.node)
               and (not request.state or s.state == request.state)
               and (not request.allocation_id or s.allocation_id == request.allocation_id)]
        out.sort(key=lambda s: (s.node, s.gpu_index, s.placement.start, s.id))
        return slice_service_pb2.ListSlicesResponse(slices=out)

    @streaming
    async def Watch(self, request, context):
        tenant = auth.scope_tenant(request.tenant)

        def match(s):
            return (not tenant or s.tenant == tenant) and (not request.node or s.node == request.node)
        q = self.ctl.events.subscribe("SliceService.Watch", context)
        try:
            if request.send_initial:
                for s in list(self.ctl.fleet.slices.values()):
                    if match(s):
                        yield slice_service_pb2.SliceEvent(type=slice_service_pb2.SliceEvent.ADDED, slice=s,
                                                           revision=self.ctl.revision)
            yield slice_service_pb2.SliceEvent(type=slice_service_pb2.SliceEvent.SYNCED, revision=self.ctl.revision)
            while True:
                ev = await q.next()         # ResourceExhausted once this watcher fell behind
                if ev is None:
                    raise errors.Aborted("the watch was ended by the control plane (a standby reloaded or "
                                         "stepped down): list again and watch again")
                if match(ev.slice):
                    yield ev
        finally:
            self.ctl.events.unsubscribe(q)


class NodeService(node_service_pb2_grpc.NodeServiceServicer):
    def __init__(self, ctl: Controller, nodes: NodeManager, heartbeat_interval: float) -> None:
        self.ctl = ctl
        self.nodes = nodes
        self.heartbeat_interval = heartbeat_interval

    @unary
    async def Register(self, request, context):
        node = await self.nodes.register(request.node_name, request.inventory, request.agent_version)
        return node_service_pb2.RegisterResponse(node=node, lease_ttl_seconds=self.nodes.lease_ttl,
                                                 heartbeat_interval_seconds=self.heartbeat_interval)

    @unary
    async def Heartbeat(self, request, context):
        validate_node_name(request.node_name)
        ttl = await self.nodes.heartbeat(request.node_name)
        return node_service_pb2.HeartbeatResponse(lease_ttl_seconds=ttl)

    async def Sync(self, request_iterator, context):
        try:
            first = await request_iterator.__anext__()
        except StopAsyncIteration:
            return
        if first.WhichOneof("kind") != "hello":
            await context.abort(errors.InvalidArgument.code, "the first Sync message must be a hello")
        node = first.hello.node_name
        entry = self.ctl.fleet.nodes.get(node)
        if entry is None or not entry.ready:
            await context.abort(errors.FailedPrecondition.code, f"node {node!r} is not registered: register first")
        session = self.ctl.sessions.open(node)
        desired = [s for s in self.ctl.fleet.slices_on(node) if s.state != types_pb2.SLICE_STATE_RELEASING]
        session.send_full(desired, self.ctl.revision)
        log(logger, logging.INFO, "agent stream open", node=node, desired=len(desired))

        for opened in self.ctl.session_hooks:
            opened(node, session)

        async def read():
            try:
                async for msg in request_iterator:
                    kind = msg.WhichOneof("kind")
                    if kind == "report":
                        r = msg.report
                        await self.ctl.report(node, r.full, r.statuses, r.released)
                        if r.full:
                            session.synced.set()
                    elif kind in self.ctl.agent_handlers:
                        await self.ctl.agent_handlers[kind](node, getattr(msg, kind))
            except errors.MeshError as e:
                # A report that could not be made durable (etcd unavailable): end the stream, so the
                # agent reconnects and reports everything again, instead of reports being dropped.
                log(logger, logging.WARNING, "agent report not persisted; closing the stream", node=node,
                    error=str(e))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - a broken stream or a handler's bug: log it, end the stream
                # grpc errors of the request stream (the agent went away, a malformed message) and anything
                # unexpected end the stream the same way: the agent reconnects and resyncs in full.
                log(logger, logging.WARNING if isinstance(e, grpc.RpcError) else logging.ERROR,
                    "agent stream reader failed; closing the stream", node=node, error=repr(e))
                if not isinstance(e, grpc.RpcError):
                    logger.exception("agent stream reader of %s failed", node)
            finally:
                session.close()

        reader = asyncio.create_task(read(), name=f"sync-read-{node}")
        try:
            while True:
                msg = await session.outbox.get()
                if msg is None:
                    break
                yield coalesce(msg, session.outbox)
        finally:
            reader.cancel()
            self.ctl.sessions.close(session)
            log(logger, logging.INFO, "agent stream closed", node=node)


def coalesce(msg, outbox: asyncio.Queue):
    """Fold the incremental changes already queued behind `msg` into it: one message, same order."""
    if msg.WhichOneof("kind") != "desired" or msg.desired.full:
        return msg
    while not outbox.empty():
        nxt = outbox._queue[0]          # peek: stop before a close (None), a full resync or another kind
        if nxt is None or nxt.WhichOneof("kind") != "desired" or nxt.desired.full:
            break
        outbox.get_nowait()
        msg.desired.upserts.extend(nxt.desired.upserts)
        msg.desired.removals.extend(nxt.desired.removals)
        msg.desired.revision = nxt.desired.revision
    return msg


class AdminService(admin_service_pb2_grpc.AdminServiceServicer):
    def __init__(self, ctl: Controller, nodes: NodeManager, deleter=None, leading: bool = False) -> None:
        self.ctl = ctl
        self.nodes = nodes
        self.deleter = deleter          # controllers/nodedelete.py (the leader's)
        self.leading = leading          # the leader's servicer (a standby's follower builds one that is not)

    @unary
    async def GetVersion(self, request, context):
        info = admin_service_pb2.VersionInfo(version=release.VERSION, api=release.API, **release.runtime(),
                                             identity=getattr(self.ctl.store, "identity", "") or "",
                                             leader=self.leading)
        if auth.current().admin:        # etcd's endpoints are the fleet's infrastructure: admins only
            info.etcd_members.update(await self.ctl.store.member_versions())
        return info

    @unary
    async def ListNodes(self, request, context):
        out = [self.nodes.view(n) for n in sorted(self.ctl.fleet.nodes)]
        if not auth.current().admin:
            for n in out:
                _redact_events(n, self.ctl)
        if request.state:
            out = [n for n in out if n.state == request.state]
        return admin_service_pb2.ListNodesResponse(nodes=out)

    @unary
    async def GetNode(self, request, context):
        validate_node_name(request.name, "name")
        n = self.nodes.view(request.name)
        if not auth.current().admin:
            _redact_events(n, self.ctl)
        return n

    @unary
    async def CordonNode(self, request, context):
        validate_node_name(request.name, "name")
        return await self.nodes.set_cordon(request.name, True)

    @unary
    async def UncordonNode(self, request, context):
        validate_node_name(request.name, "name")
        return await self.nodes.set_cordon(request.name, False)

    @unary
    async def DrainNode(self, request, context):
        validate_node_name(request.name, "name")
        node, evicted, replacing = await self.nodes.drain(request.name, request.dry_run)
        return admin_service_pb2.DrainNodeResponse(node=node, evicted=evicted, replacing=replacing)

    @unary
    async def DeleteNode(self, request, context):
        validate_node_name(request.name, "name")
        if self.deleter is None:
            raise errors.Unavailable("this control plane cannot delete nodes (no node deleter)")
        return await self.deleter.delete(request.name)

    @unary
    async def ListGpus(self, request, context):
        if request.node:
            validate_node_name(request.node, "node")
            self.nodes.entry(request.node)
        out = []
        for name in sorted(self.ctl.fleet.nodes):
            if request.node and name != request.node:
                continue
            entry = self.ctl.fleet.nodes[name]
            out.extend(self._gpu_status(name, entry, inv) for inv in entry.record.inventory.gpus)
        return admin_service_pb2.ListGpusResponse(gpus=out)

    @unary
    async def ClearGpuQuarantine(self, request, context):
        validate_node_name(request.node, "node")
        entry = self.nodes.entry(request.node)
        g = self.ctl.fleet.gpu(request.node, request.gpu_index)
        inv = next((x for x in entry.record.inventory.gpus if x.index == request.gpu_index), None)
        if g is None or inv is None:
            raise errors.NotFound(f"gpu_index: node {request.node} has no GPU {request.gpu_index}",
                                  kind="gpu", name=f"{request.node}/{request.gpu_index}")
        telemetry = getattr(self.ctl, "telemetry", None)
        if g.health == "healthy" or telemetry is None:
            raise errors.FailedPrecondition(f"GPU {request.node}/{request.gpu_index} is {g.health}: "
                                            f"only a quarantined or unhealthy GPU is cleared")
        await telemetry.health.clear(g)
        return self._gpu_status(request.node, entry, inv)

    def _gpu_status(self, name: str, entry, inv) -> types_pb2.GpuStatus:
        st = types_pb2.GpuStatus(node=name, gpu=inv, node_ready=entry.ready, node_cordoned=entry.record.cordoned)
        g = next((x for x in entry.gpus if x.index == inv.index), None)
        if g is not None:
            st.allocated_memory_bytes = g.allocated_memory
            st.allocated_compute_share = round(g.allocated_compute, 4)
            st.slices = len(g.slices)
            st.mig_layout.extend(f"{p}@{s}" for p, s in sorted(g.mig_layout, key=lambda x: x[1]))
            st.sharing = slicespec.ISOLATION_ENUM.get(g.sharing, 0) if g.sharing else 0
            if g.telemetry is not None:
                st.telemetry.CopyFrom(g.telemetry)
            st.telemetry.index = g.index
            st.telemetry.health = HEALTH_ENUM[g.health]
            st.telemetry.memory_pressure = PRESSURE_ENUM[g.memory_pressure]
            st.telemetry.thermal_state = THERMAL_ENUM[g.thermal_state]
        return st


# Node events whose messages name a workload or migration (of any tenant) and the error that stopped it: a
# tenant or viewer reading the node sees what happened, not whose or why (controllers/health.py writes them).
WORKLOAD_EVENT_REASONS = frozenset({"GpuWorkloadNotMoved", "GpuWorkloadMigrating"})


# A slice ID in any other node event (GpuUnhealthy's "slices on it: ...", an agent's ReleaseBlocked): each one the
# caller may not see is replaced, so a tenant reads its own slices there and learns no other tenant's IDs.
SLICE_ID = re.compile(r"\bs-[0-9a-f]{12}\b")
HIDDEN = "(another tenant's slice)"


def _redact_events(n, ctl=None) -> None:
    slices = getattr(getattr(ctl, "fleet", None), "slices", {})

    def shown(m: re.Match) -> str:
        s = slices.get(m.group(0))
        return m.group(0) if s is not None and s.tenant and auth.visible(s.tenant) else HIDDEN
    for ev in n.events:
        if ev.reason in WORKLOAD_EVENT_REASONS:
            ev.message = (f"GPU {ev.gpu_index}: " if ev.gpu_index >= 0 else "") + \
                f"{ev.reason} (the workload and the details are shown to administrators)"
        else:
            ev.message = SLICE_ID.sub(shown, ev.message)
