"""The node agent: registers, heartbeats, and reconciles desired slices with
the GPUs over one long-lived Sync stream to the control plane.

Level-triggered: on every (re)connection the control plane sends the full
desired set; the agent adopts matching instances, removes orphans, realizes
what is missing and answers with a full report. Then it applies changes as
they come. NVML calls run in a worker thread, one at a time per node.
"""

from __future__ import annotations

import asyncio
import logging
import random

import grpc

from gpumesh.v1 import node_service_pb2, node_service_pb2_grpc, types_pb2
from mesh import version as release
from mesh.failover import pick_leader
from mesh.logs import log
from mesh.outbox import Outbox
from nodeagent import metrics
from nodeagent.gpu import NvmlGpus
from nodeagent.slicer import Slicer
from nodeagent.telemetry import TelemetryCollector, run_telemetry

logger = logging.getLogger(__name__)
VERSION = f"gpumesh-agent/{release.VERSION}"
RETRY_TEARDOWN_S = 2.0
OUTBOX_LIMIT = 10_000          # messages queued for the control plane before the stream is ended and resynced


def leader_hint(e: grpc.aio.AioRpcError) -> str:
    """The leader endpoints a standby control plane named in its trailing metadata ('' if none)."""
    for k, v in (e.trailing_metadata() or ()):
        if k == "gpumesh-leader":
            return v if isinstance(v, str) else v.decode()
    return ""


def is_standby(e: grpc.aio.AioRpcError) -> bool:
    return any(k == "gpumesh-standby" for k, _ in (e.trailing_metadata() or ()))


def node_event(type_: str, reason: str, message: str, gpu_index: int = -1) -> types_pb2.NodeEvent:
    ev = types_pb2.NodeEvent(type=type_, reason=reason, message=message, gpu_index=gpu_index)
    ev.at.GetCurrentTime()
    return ev


class NodeAgent:
    def __init__(self, node: str, endpoint: str, gpus: NvmlGpus, *, mps_root: str,
                 topology: tuple = (), nics: tuple = (), backend: str = "nvml",
                 driver_version: str = "", cuda_version: str = "", reconnect_max: float = 5.0,
                 telemetry_interval: float = 5.0, ib_root: str | None = "/sys/class/infiniband") -> None:
        self.node = node
        # One endpoint or several (HA control planes), comma-separated: the agent rotates through them
        # on a failed connection, preferring the leader a standby names in `gpumesh-leader`.
        self.endpoints = [e.strip() for e in endpoint.split(",") if e.strip()] or [endpoint]
        self.endpoint = self.endpoints[0]
        self.gpus = gpus
        self.slicer = Slicer(gpus, mps_root)
        self.topology = topology
        self.nics = nics
        self.backend = backend
        self.driver_version = driver_version
        self.cuda_version = cuda_version
        self.reconnect_max = reconnect_max
        self.telemetry_interval = telemetry_interval
        self.collector = TelemetryCollector(gpus.nvml, gpus, self.slicer, ib_root)
        self.desired: dict[str, types_pb2.Slice] = {}
        self.realized: dict[str, node_service_pb2.SliceStatus] = {}
        self.stuck: set[str] = set()         # releases the hardware refused; retried
        self.stuck_orphans: dict[tuple[int, int], object] = {}   # (gpu, GI) -> orphan MIG instance; retried
        self.registered = asyncio.Event()
        self.stopping = asyncio.Event()
        # Extension points for other components (telemetry, workloads): ControllerMessage kind ->
        # async handler(message, outbox), and hooks run when a Sync stream opens: hook(outbox).
        self.handlers: dict = {}
        self.session_hooks: list = []
        # Called with every DesiredSlices before it is applied (the mesh registrar revokes released slices' buffers).
        self.desired_hooks: list = []
        # Awaited before slices or orphan MIG instances are torn down: await hook(slice_ids, device_uuids).
        # The workload runner stops what still runs on them and waits for it to end: a GPU refuses to
        # destroy a MIG instance that runs processes (IN_USE), so the workload goes first, then the instance.
        self.teardown_hooks: list = []
        # Called before adopting MIG instances: hook() -> {device UUID: slice ID} the agent knows an
        # instance was made for (the workload runner's records; Slicer.adopt).
        self.claim_hooks: list = []
        # Run (in a worker thread) once NVML is up, before the first connection: hook().
        # Labels merged into the inventory (e.g. a declared MIG layout).
        self.start_hooks: list = []
        self.labels: dict[str, str] = {}
        # TLS to the control plane (grpc.ChannelCredentials; None: plaintext) and the name its certificate holds.
        self.credentials = None
        self.server_name = ""
        self.outbox_limit = OUTBOX_LIMIT
        self.token = ""          # an agent token (tenants file, role agent): sent as 'authorization: Bearer'

    # -- inventory ----------------------------------------------------------------------

    def inventory(self) -> types_pb2.NodeInventory:
        inv = types_pb2.NodeInventory(hostname=self.node, gpu_backend=self.backend,
                                      driver_version=self.driver_version, cuda_version=self.cuda_version)
        gpus = self.gpus.inventory()
        for d, members in enumerate(self.topology):
            inv.nvlink_domains.add(gpus=list(members))
            for g in gpus:
                if g.index in members:
                    g.nvlink_domain = d
        inv.gpus.extend(gpus)
        inv.labels.update(self.labels)
        for nic in self.nics:
            inv.nics.add(name=nic.name, kind=nic.kind, rate_gbps=nic.rate_gbps, port_guid=nic.port_guid,
                         gpus=list(nic.gpus))
        return inv

    # -- main loop ----------------------------------------------------------------------

    async def run(self) -> None:
        await asyncio.to_thread(self.gpus.init)
        for hook in self.start_hooks:
            await asyncio.to_thread(hook)
        backoff = 0.2
        current = 0
        while not self.stopping.is_set():
            self.endpoint = self.endpoints[current]
            options = [("grpc.keepalive_time_ms", 10_000), ("grpc.max_receive_message_length", 64 << 20)]
            if self.credentials is None:
                channel = grpc.aio.insecure_channel(self.endpoint, options=options)
            else:
                if self.server_name:
                    options.append(("grpc.ssl_target_name_override", self.server_name))
                channel = grpc.aio.secure_channel(self.endpoint, self.credentials, options=options)
            stub = node_service_pb2_grpc.NodeServiceStub(channel)
            hinted = False
            try:
                await self._session(stub)
                backoff = 0.2
            except grpc.aio.AioRpcError as e:
                log(logger, logging.WARNING, "control plane connection lost", node=self.node,
                    endpoint=self.endpoint, code=e.code().name, error=e.details())
                if len(self.endpoints) > 1 and e.code() in (grpc.StatusCode.UNAVAILABLE,
                                                            grpc.StatusCode.DEADLINE_EXCEEDED):
                    at = pick_leader(leader_hint(e), self.endpoints)
                    if at >= 0 and self.endpoints[at] != self.endpoint:
                        current, hinted = at, True
                    else:
                        current = (current + 1) % len(self.endpoints)
                    if is_standby(e):
                        backoff = 0.2    # a standby answered: an election is close, keep retrying briskly
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure of a session: log it and reconnect
                log(logger, logging.ERROR, "agent session failed; reconnecting", node=self.node,
                    endpoint=self.endpoint, error=repr(e))
                logger.exception("agent session failed")
            finally:
                self.registered.clear()
                metrics.RECONNECTS.labels(self.node).inc()
                await channel.close()
            if self.stopping.is_set():
                break
            if hinted:
                backoff = 0.2        # a standby named the leader: go there now
                continue
            await asyncio.sleep(backoff * (0.5 + random.random()))
            # With several endpoints, back off only after a whole round of them failed.
            if len(self.endpoints) == 1 or current == 0:
                backoff = min(backoff * 2, self.reconnect_max)

    def _metadata(self):
        return (("authorization", f"Bearer {self.token}"),) if self.token else None

    async def _session(self, stub) -> None:
        inv = await asyncio.to_thread(self.inventory)
        reply = await stub.Register(node_service_pb2.RegisterRequest(node_name=self.node, inventory=inv,
                                                                     agent_version=VERSION), timeout=30,
                                    metadata=self._metadata())
        self.registered.set()
        log(logger, logging.INFO, "registered", node=self.node, lease_ttl=reply.lease_ttl_seconds,
            gpus=len(inv.gpus))
        # Bounded: a control plane that stops reading ends the stream (and a reconnect resyncs) rather
        # than reports and telemetry piling up here without end.
        outbox: asyncio.Queue = Outbox(self.outbox_limit)
        outbox.put_nowait(node_service_pb2.AgentMessage(hello=node_service_pb2.SyncHello(node_name=self.node)))

        async def requests():
            while True:
                msg = await outbox.get()
                if msg is None:
                    if outbox.overflowed:
                        log(logger, logging.WARNING, "the control plane is not reading this agent's stream: "
                            "ending it to reconnect and resync", node=self.node, queued=outbox.limit)
                    return
                if msg.WhichOneof("kind") == "report":
                    # fold queued reports into one message (statuses before releases, as queued)
                    while not outbox.empty() and outbox._queue[0] is not None \
                            and outbox._queue[0].WhichOneof("kind") == "report":
                        nxt = outbox.get_nowait().report
                        msg.report.full = msg.report.full or nxt.full
                        msg.report.statuses.extend(nxt.statuses)
                        msg.report.released.extend(nxt.released)
                yield msg

        call = stub.Sync(requests(), metadata=self._metadata())
        beat = asyncio.create_task(self._heartbeats(stub, reply.heartbeat_interval_seconds, call))
        retry = asyncio.create_task(self._retry_stuck(outbox))
        telemetry = asyncio.create_task(run_telemetry(self.collector, self.telemetry_interval, outbox,
                                                      loads=self.backend_loads()))
        try:
            for opened in self.session_hooks:
                opened(outbox)
            async for msg in call:
                kind = msg.WhichOneof("kind")
                if kind == "desired":
                    await self._apply(msg.desired, outbox)
                elif kind in self.handlers:
                    await self.handlers[kind](getattr(msg, kind), outbox)
        finally:
            beat.cancel()
            retry.cancel()
            telemetry.cancel()
            outbox.put_nowait(None)
            call.cancel()

    def backend_loads(self):
        """The reader of the model servers' load signals (nodeagent/backends/loadscraper.py), kept across
        sessions so its rates go on; None without a workload runner."""
        runner = getattr(self, "workload_runner", None)
        if runner is None:
            return None
        if getattr(self, "_load_scraper", None) is None:
            from nodeagent.backends.loadscraper import LoadScraper
            def serving():
                # not a process a transparent migration dumped (gone) or restored and holds stopped: a scrape's
                # connection open at the dump would make CRIU refuse it (an established TCP socket)
                return [w for wid, w in list(runner.workloads.items())
                        if not {"frozen", "criu_hold"} & set(runner.meta.get(wid, {}))]
            self._load_scraper = LoadScraper(serving)
        return self._load_scraper

    async def _heartbeats(self, stub, interval: float, call) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await stub.Heartbeat(node_service_pb2.HeartbeatRequest(node_name=self.node), timeout=interval * 2,
                                     metadata=self._metadata())
            except grpc.aio.AioRpcError as e:
                log(logger, logging.WARNING, "heartbeat failed", node=self.node, code=e.code().name)
                if e.code() == grpc.StatusCode.NOT_FOUND:
                    call.cancel()   # re-register on a fresh session
                    return

    # -- reconciliation -----------------------------------------------------------------

    async def _apply(self, d: node_service_pb2.DesiredSlices, outbox: asyncio.Queue) -> None:
        for hook in self.desired_hooks:
            hook(d)
        report = node_service_pb2.SliceStatusReport(full=d.full)
        if d.full:
            self.desired = {s.id: s for s in d.upserts}
            claims: dict[str, str] = {}
            for hook in self.claim_hooks:
                claims.update(hook())
            orphans = await asyncio.to_thread(self.slicer.adopt, self.desired, claims)
            self.stuck_orphans.clear()          # found again by this adoption when still there
            if orphans:
                await self._before_teardown(set(), {inst.uuid for inst in orphans if inst.uuid})
            for inst in orphans:
                err = await asyncio.to_thread(self.slicer.destroy_orphan, inst)
                metrics.ORPHANS.labels(self.node).inc()
                if err is not None:
                    self.stuck_orphans[(inst.gpu_index, inst.gi_id)] = inst
            self.realized = {k: v for k, v in self.realized.items() if k in self.desired}
            log(logger, logging.INFO, "reconciling full desired state", node=self.node,
                desired=len(self.desired), adopted=len(self.slicer.mig), orphans=len(orphans))
            todo = list(self.desired.values())
        else:
            for s in d.upserts:
                self.desired[s.id] = s
            todo = list(d.upserts)
        if todo:
            statuses = await asyncio.to_thread(lambda: [self.slicer.realize(s) for s in todo])
            for st in statuses:
                self.realized[st.slice_id] = st
                metrics.OPERATIONS.labels(self.node, "realize", "ok" if st.state == types_pb2.SLICE_STATE_READY
                                          else "failed").inc()
        if d.full:
            report.statuses.extend(self.realized.values())
        else:
            report.statuses.extend(self.realized[s.id] for s in todo)
        if d.removals:
            await self._before_teardown(set(d.removals), {self.slicer.mig[sid].uuid for sid in d.removals
                                                           if sid in self.slicer.mig})
        for sid in d.removals:
            self.desired.pop(sid, None)
            self.realized.pop(sid, None)
            gpu_index = self.slicer.gpu_of(sid)
            err = await asyncio.to_thread(self.slicer.teardown, sid)
            metrics.OPERATIONS.labels(self.node, "teardown", "ok" if err is None else "refused").inc()
            if err is None:
                self.stuck.discard(sid)
                report.released.append(sid)
            else:
                self.stuck.add(sid)
                log(logger, logging.WARNING, "release refused by the GPU; will retry", node=self.node,
                    slice=sid, error=err)
                outbox.put_nowait(node_service_pb2.AgentMessage(event=node_event(
                    "Warning", "ReleaseBlocked", f"slice {sid} cannot be released yet: {err}", gpu_index)))
        metrics.SLICES.labels(self.node).set(len(self.realized))
        if d.full or report.statuses or report.released:
            outbox.put_nowait(node_service_pb2.AgentMessage(report=report))

    async def _before_teardown(self, slice_ids: set[str], device_uuids: set[str]) -> None:
        for hook in self.teardown_hooks:
            try:
                await hook(slice_ids, device_uuids)
            except asyncio.CancelledError:
                raise
            except Exception:   # noqa: BLE001 - the teardown is tried anyway (and retried if refused)
                logger.exception("teardown hook")

    async def _retry_stuck(self, outbox: asyncio.Queue) -> None:
        while True:
            await asyncio.sleep(RETRY_TEARDOWN_S)
            for key, inst in list(self.stuck_orphans.items()):
                if any((m.gpu_index, m.gi_id) == key for m in self.slicer.mig.values()):
                    self.stuck_orphans.pop(key, None)       # that GPU instance belongs to a slice now
                    continue
                if inst.uuid:
                    await self._before_teardown(set(), {inst.uuid})
                if await asyncio.to_thread(self.slicer.destroy_orphan, inst) is None:
                    self.stuck_orphans.pop(key, None)
            for sid in list(self.stuck):
                if await asyncio.to_thread(self.slicer.teardown, sid) is None:
                    self.stuck.discard(sid)
                    outbox.put_nowait(node_service_pb2.AgentMessage(
                        report=node_service_pb2.SliceStatusReport(released=[sid])))
