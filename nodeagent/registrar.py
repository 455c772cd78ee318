"""The agent's RDMA registrar: buffers for this node's slices, and the TCP data plane that serves them.

The control plane asks for a buffer (`MeshRegister` on the Sync stream) when it
connects two slices; the registrar answers with the buffer's descriptor
(`MeshRegistered`). Host buffers are POSIX shared memory segments, served to
remote peers by the data plane (key and bounds checked) and mappable by
same-host peers directly; with an RDMA device, verbs buffers are memory regions
with their own queue pair, brought to RTS when the control plane introduces the
peer (`MeshPeer`). A buffer is revoked (its keys stop working) on `MeshDeregister`
and when its slice leaves the node's desired set (a release). On each new Sync
stream the registrar reports its endpoint, transports and buffers (`MeshHello`).
"""

from __future__ import annotations

import ctypes
import logging
import socket
from dataclasses import dataclass

from gpumesh.v1 import mesh_service_pb2 as M
from gpumesh.v1 import node_service_pb2
from mesh.config import parse_hostport
from mesh.logs import log
from mesh.transport import verbs
from mesh.transport.base import MAX_BUFFER_BYTES, BufferDescriptor, TransportError, new_key
from mesh.transport.shm import ShmRegion
from mesh.transport.tcp import TcpDataPlane

logger = logging.getLogger(__name__)


@dataclass
class Held:
    descriptor: BufferDescriptor
    connection_id: str
    region: ShmRegion | None = None


def route_source(endpoint: str) -> str:
    """The local address this host uses to reach `endpoint` (what peers should dial back)."""
    host, port = parse_hostport(endpoint, "control_plane")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((socket.gethostbyname(host or "127.0.0.1"), port or 9))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


class Registrar:
    def __init__(self, agent, listen: str = "0.0.0.0:0", advertise: str = "", verbs_transport=None) -> None:
        self.agent = agent
        self.node = agent.node
        host, port = parse_hostport(listen, "mesh_listen")
        self.server = TcpDataPlane(host or "0.0.0.0", port, advertise or route_source(agent.endpoint))
        self.buffers: dict[str, Held] = {}
        self.verbs = verbs_transport
        self.transports = ["tcp", "shm"] + (["verbs"] if verbs_transport is not None else [])
        agent.handlers["mesh_register"] = self.on_register
        agent.handlers["mesh_deregister"] = self.on_deregister
        agent.handlers["mesh_peer"] = self.on_peer
        agent.session_hooks.append(self.on_session)
        agent.desired_hooks.append(self.on_desired)

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    # -- registration -----------------------------------------------------------------------

    def register(self, slice_id: str, size: int, transport: str, connection_id: str = "") -> BufferDescriptor:
        if slice_id not in self.agent.desired:
            raise LookupError(f"slice {slice_id} is not on node {self.node}")
        if not 0 < size <= MAX_BUFFER_BYTES:
            raise ValueError(f"size_bytes: {size} is outside 1..{MAX_BUFFER_BYTES}")
        if transport not in self.transports:
            raise TransportError(f"transport {transport!r} is not available on node {self.node} "
                                 f"(available: {', '.join(self.transports)})", op="register")
        if transport == "verbs":
            desc = self.verbs.register(slice_id, size)
            desc.node, desc.endpoint = self.node, self.server.endpoint
            # the MR's memory is also served over TCP (same address and key) for peers without verbs
            self.server.add(desc.buffer_id, slice_id, (ctypes.c_char * size).from_address(desc.address),
                            desc.rkey, base=desc.address)
            self.buffers[desc.buffer_id] = Held(desc, connection_id)
            return desc
        bid = f"b-{connection_id or 'x'}-{slice_id}"[:60]
        if bid in self.buffers:
            self.deregister(bid, "re-registered")
        region = ShmRegion(bid, size, new_key())
        served = self.server.add(bid, slice_id, region.data, region.rkey)
        desc = BufferDescriptor(buffer_id=bid, slice_id=slice_id, node=self.node, transport=transport,
                                address=served.base, length=size, rkey=region.rkey, endpoint=self.server.endpoint,
                                shm_name=region.name)
        self.buffers[bid] = Held(desc, connection_id, region)
        iso = getattr(self.agent, "isolator", None)      # the slice's workloads see it in their /dev/shm
        if iso is not None:
            iso.share_segment(slice_id, self.agent.desired[slice_id].tenant, region.name)
        log(logger, logging.INFO, "mesh buffer registered", node=self.node, buffer=bid, slice=slice_id,
            size=size, transport=transport)
        return desc

    def deregister(self, buffer_id: str, reason: str = "") -> bool:
        held = self.buffers.pop(buffer_id, None)
        if held is None:
            return False
        if held.region is not None:
            self.server.remove(held.descriptor.rkey)
            held.region.revoke()
            iso = getattr(self.agent, "isolator", None)
            if iso is not None:
                iso.unshare_segment(held.descriptor.slice_id, held.region.name)
        elif self.verbs is not None:
            self.server.remove(held.descriptor.rkey)
            self.verbs.deregister(buffer_id)
        log(logger, logging.INFO, "mesh buffer revoked", node=self.node, buffer=buffer_id,
            slice=held.descriptor.slice_id, reason=reason)
        return True

    def revoke_slice(self, slice_id: str, reason: str = "slice released") -> list[str]:
        ids = [b for b, h in self.buffers.items() if h.descriptor.slice_id == slice_id]
        for bid in ids:
            self.deregister(bid, reason)
        return ids

    def close(self) -> None:
        for bid in list(self.buffers):
            self.deregister(bid, "agent stopping")
        self.server.close()

    # -- Sync stream ----------------------------------------------------------------------

    def on_session(self, outbox) -> None:
        outbox.put_nowait(node_service_pb2.AgentMessage(mesh_hello=M.MeshHello(
            endpoint=self.server.endpoint, transports=self.transports, buffers=sorted(self.buffers))))

    async def on_register(self, msg: M.MeshRegister, outbox) -> None:
        reply = M.MeshRegistered(request_id=msg.request_id)
        try:
            desc = self.register(msg.slice_id, msg.size_bytes, msg.transport, msg.connection_id)
            reply.descriptor.CopyFrom(desc.to_proto())
        except LookupError as e:
            reply.error, reply.error_kind = str(e), "not_found"
        except ValueError as e:
            reply.error, reply.error_kind = str(e), "invalid_argument"
        except (TransportError, OSError) as e:
            reply.error, reply.error_kind = str(e), "unavailable"
        outbox.put_nowait(node_service_pb2.AgentMessage(mesh_registered=reply))

    async def on_deregister(self, msg: M.MeshDeregister, outbox) -> None:
        for bid in msg.buffer_ids:
            self.deregister(bid, msg.reason)
        if msg.request_id:
            outbox.put_nowait(node_service_pb2.AgentMessage(mesh_registered=M.MeshRegistered(
                request_id=msg.request_id)))

    async def on_peer(self, msg: M.MeshPeer, outbox) -> None:
        held = self.buffers.get(msg.buffer_id)
        if held is None or held.descriptor.transport != "verbs" or self.verbs is None:
            return
        try:
            self.verbs.connect(BufferDescriptor.from_proto(msg.peer), local_buffer_id=msg.buffer_id)
        except Exception as e:   # the device refused the QP transition: the peer will see PeerGone
            log(logger, logging.WARNING, "verbs connect failed", node=self.node, buffer=msg.buffer_id, error=str(e))

    def on_desired(self, d: node_service_pb2.DesiredSlices) -> None:
        """Revoke the buffers of slices that left the desired set (released) before they are torn down."""
        gone = set(d.removals)
        if d.full:
            keep = {s.id for s in d.upserts}
            gone |= {h.descriptor.slice_id for h in self.buffers.values()} - keep
        for sid in gone:
            self.revoke_slice(sid)


def attach_all(agents, cfg) -> list[Registrar]:
    """A registrar (own data-plane port) for every agent of this process."""
    ok, why = verbs.available() if getattr(cfg, "mesh_verbs", True) else (False, "disabled")
    out = []
    for a in agents:
        vt = verbs.VerbsTransport(a.node) if ok else None
        out.append(Registrar(a, getattr(cfg, "mesh_listen", "0.0.0.0:0"), getattr(cfg, "mesh_advertise", ""), vt))
    if not ok:
        log(logger, logging.INFO, "mesh: no RDMA verbs on this host; tcp and shm only", reason=why)
    return out
