"""The agent's RDMA registrar: buffers for this node's slices, and the TCP data plane that serves them.

The control plane asks for a buffer (`MeshRegister` on the Sync stream, with
the connection's secret) when it connects two slices; the registrar answers
with the buffer's descriptor (`MeshRegistered`). Every host buffer is a POSIX
shared memory segment (`gpumesh-<buffer id>`) that same-host processes map with
the connection's secret. Over TCP, the data plane serves tcp/shm buffers to
channels that proved the secret (TLS across hosts unless `mesh_tls` is off).

With an RDMA device, a verbs buffer is a memory region over that segment with
its own RC queue pair; when the control plane introduces the peer (`MeshPeer`)
the registrar takes the QP through RTR to RTS towards the peer's QP and keeps
that connected link. The slice's workload then asks its own agent (a same-host
channel, `RDMA_WRITE`/`RDMA_READ` with its buffer's key) and the agent posts
RDMA WRITE/READ on the link: bytes between the hosts move by RDMA only (the
data plane refuses one-sided TCP access to verbs buffers from other hosts).

A buffer is revoked (its keys stop working, its QP and MR are destroyed) on
`MeshDeregister` and when its slice leaves the node's desired set (a release).
On each new Sync stream the registrar reports its endpoint, transports, why
verbs is missing if it is, the buffers it holds, and those a previous run of
this agent registered whose segments survived it (`MeshHello.recoverable`,
from the records in `<state_dir>/mesh/<node>/`, nodeagent/meshrecords.py).
The segments outlive the agent process: `MeshRegister.recover` re-adopts one
(same bytes, same shm key; a verbs buffer gets a new MR and QP over it), so a
connection comes back after an agent restart (docs/mesh.md "What survives
what"). A buffer found unusable while held (its segment damaged or removed) is
reported so that its connection turns FAILED (nodeagent/meshhealth.py); a
starting registrar removes the segments a killed run left unrecorded
(nodeagent/meshsweep.py).
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import stat
from dataclasses import dataclass

from gpumesh.v1 import mesh_service_pb2 as M
from gpumesh.v1 import node_service_pb2
from mesh.config import parse_hostport
from mesh.logs import log
from mesh.transport import channel, cuda_ipc, verbs
from mesh.transport.base import (MAX_BUFFER_BYTES, BufferDamaged, BufferDescriptor, OutOfBounds, Revoked,
                                 TransportError, check_bounds, new_key)
from mesh.transport.regions import DAMAGED_BUFFERS
from mesh.transport.shm import PREFIX, ShmRegion, owner_tag, segment_exists, unlink_segment
from nodeagent.meshhealth import BufferHealth
from nodeagent.meshrecords import BufferRecords
from nodeagent.meshsweep import sweep_orphan_segments
from mesh.transport.tcp import TcpDataPlane
from mesh.transport.wire import OK, OUT_OF_BOUNDS, QP_ERROR

logger = logging.getLogger(__name__)


class BufferGone(Exception):
    """A buffer to recover whose memory no longer exists (MeshRegistered error_kind "gone")."""


def buffer_id_for(connection_id: str, slice_id: str) -> str:
    """The buffer of a connection's side: the same id on every (re-)registration."""
    return f"b-{connection_id or 'x'}-{slice_id}"[:60]


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
    def __init__(self, agent, listen: str = "0.0.0.0:0", advertise: str = "", verbs_transport=None,
                 verbs_unavailable: str = "", tls: bool = True, identity: channel.TlsIdentity | None = None,
                 cuda_transport=None, state_dir: str = "") -> None:
        """`state_dir`: where the records of registered buffers live (what a restarted agent recovers; none:
        a restart recovers nothing). `tls`: the data plane serves TLS (with `identity`, else a self-signed certificate made now) and
        refuses plaintext from other hosts; off: plaintext everywhere (the operator's choice, for speed)."""
        self.agent = agent
        self.node = agent.node
        host, port = parse_hostport(listen, "mesh_listen")
        self.tls = tls
        if tls and identity is None:
            identity = channel.TlsIdentity.self_signed(self.node)
        self.health = BufferHealth(self)        # unusable buffers: reported, their connections turn FAILED
        self.server = TcpDataPlane(host or "0.0.0.0", port, advertise or route_source(agent.endpoint),
                                   identity=identity if tls else None, require_tls_remote=tls, rdma=self,
                                   refuse_unscoped=True,   # the control plane gives every buffer a secret
                                   on_damaged=lambda region, e: self.health.fail(region.buffer_id,
                                                                                 e.reason or "shrunk", e.message))
        self.buffers: dict[str, Held] = {}
        self.records = BufferRecords(state_dir) if state_dir else None
        # this agent's mark in its segments' headers; the segments a killed run left unrecorded go now
        self.owner = owner_tag(self.node, state_dir)
        sweep_orphan_segments(self.node, self.owner, {r["shm_name"] for r in self.records.load().values()}
                              if self.records is not None else set(), getattr(agent, "isolator", None))
        self.verbs = verbs_transport
        self.verbs_unavailable = "" if verbs_transport is not None else (verbs_unavailable or "no verbs transport")
        self.cuda = cuda_transport
        self.transports = (["tcp", "shm"] + (["verbs"] if verbs_transport is not None else [])
                           + (["cuda_ipc"] if cuda_transport is not None else []))
        agent.handlers["mesh_register"] = self.on_register
        agent.handlers["mesh_deregister"] = self.on_deregister
        agent.handlers["mesh_peer"] = self.on_peer
        agent.session_hooks.append(self.on_session)
        agent.desired_hooks.append(self.on_desired)

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    # -- registration -----------------------------------------------------------------------

    def register(self, slice_id: str, size: int, transport: str, connection_id: str = "",
                 secret: bytes = b"", recover: bool = False) -> BufferDescriptor:
        """A buffer for the connection's side on `slice_id`. `recover`: over the memory that already holds it
        (a segment a previous run of this agent registered, or the buffer itself for a verbs buffer whose MR
        and QP are made anew): its bytes are kept; `BufferGone` when that memory no longer exists."""
        if slice_id not in self.agent.desired:
            raise LookupError(f"slice {slice_id} is not on node {self.node}")
        if not 0 < size <= MAX_BUFFER_BYTES:
            raise ValueError(f"size_bytes: {size} is outside 1..{MAX_BUFFER_BYTES}")
        if transport not in self.transports:
            why = f" (verbs: {self.verbs_unavailable})" if transport == "verbs" else ""
            raise TransportError(f"transport {transport!r} is not available on node {self.node} "
                                 f"(available: {', '.join(self.transports)}){why}", op="register")
        if secret and len(secret) < 16:
            raise ValueError("secret: the connection secret must be at least 128 bits")
        bid = buffer_id_for(connection_id, slice_id)
        scope = (connection_id or bid) if secret else ""
        base = 0
        if recover:
            held = self.buffers.get(bid)
            if held is not None and (held.descriptor.transport != transport or held.descriptor.length != size):
                raise BufferGone(f"buffer {bid} on node {self.node} is a {held.descriptor.transport} buffer of "
                                 f"{held.descriptor.length} bytes, not {transport} of {size}")
            unusable = self._unusable(bid) if held is not None else ""
            if unusable:
                raise BufferGone(unusable)                # damaged or removed while held: not the buffer any more
            if held is not None and transport != "verbs":
                return held.descriptor                    # still registered: nothing changed
            if transport == "cuda_ipc":
                raise BufferGone(f"buffer {bid}: cuda_ipc memory is device memory the agent's process allocated; "
                                 f"it died with the previous agent process")
            if held is not None:                          # verbs: a new MR and QP over the same segment
                self.buffers.pop(bid)
                self.server.regions.remove(held.descriptor.rkey)
                self.verbs.deregister(bid)
                region = held.region
            else:
                # only a buffer this agent's records say it registered (for this connection and slice): never
                # whatever file stands at the name in the world-writable /dev/shm
                rec = self.records.get(bid) if self.records is not None else None
                if rec is None or rec["slice_id"] != slice_id or rec["connection_id"] != connection_id:
                    raise BufferGone(f"buffer {bid}: node {self.node} has no record of registering it (its memory "
                                     f"did not survive, e.g. a reboot)")
                region = self._reopen(bid, slice_id, size, secret)
                base = rec["address"] if transport != "verbs" else 0
        else:
            if bid in self.buffers:
                self.deregister(bid, "re-registered")
            if transport == "cuda_ipc":
                self.cuda.device = int(getattr(self.agent.desired[slice_id], "gpu_index", 0) or 0)  # the slice's GPU
                desc = self.cuda.register(slice_id, size, buffer_id=bid)
                desc.node, desc.endpoint = self.node, ""
                self.buffers[bid] = Held(desc, connection_id)
                return desc
            region = ShmRegion(bid, size, new_key(), secret, outlive_process=True, owner=self.owner)
        tenant = getattr(self.agent.desired[slice_id], "tenant", "")
        try:
            if transport == "verbs":
                # the MR is the shared memory segment itself: the slice's workload maps it, the HCA reads and
                # writes it, and the descriptor's key is the MR's rkey
                addr = ctypes.addressof(ctypes.c_char.from_buffer(region.data))
                desc = self.verbs.register(slice_id, size, buffer=addr, buffer_id=bid)
                region.set_key(desc.rkey)
                self.server.regions.add(bid, slice_id, region.data, desc.rkey, base=desc.address, scope=scope,
                                secret=secret, local_only=True, segment=region.segment, tenant=tenant)
                desc.node, desc.endpoint, desc.shm_name = self.node, self.server.endpoint, region.name
            else:
                served = self.server.regions.add(bid, slice_id, region.data, region.rkey, base=base, scope=scope,
                                         secret=secret, segment=region.segment, tenant=tenant)
                desc = BufferDescriptor(buffer_id=bid, slice_id=slice_id, node=self.node, transport=transport,
                                        address=served.base, length=size, rkey=region.rkey,
                                        endpoint=self.server.endpoint, shm_name=region.name)
        except BaseException:
            if self.verbs is not None:
                self.verbs.deregister(bid)
            if recover:
                region.detach()          # the memory stays (and its record): a later attempt may adopt it
            else:
                region.revoke()
                if self.records is not None:
                    self.records.drop(bid)
            raise
        desc.tls_sha256 = self.server.tls_sha256
        self.buffers[bid] = Held(desc, connection_id, region)
        if self.records is not None:
            self.records.save({"buffer_id": bid, "connection_id": connection_id, "slice_id": slice_id,
                               "transport": transport, "size": size, "shm_name": region.name,
                               "address": desc.address})
        iso = getattr(self.agent, "isolator", None)      # the slice's workloads see it in their /dev/shm
        if iso is not None:
            iso.share_segment(slice_id, tenant, region.name)
        log(logger, logging.INFO, "mesh buffer recovered" if recover else "mesh buffer registered", node=self.node,
            buffer=bid, slice=slice_id, size=size, transport=transport)
        return desc

    def _unusable(self, bid: str) -> str:
        """Why held buffer `bid` is unusable (its segment damaged or removed: reported), or ""."""
        self.health.audit()
        failed = self.health.failure(bid)
        return failed.message if failed is not None else ""

    def _slice_link(self, slice_id: str, name: str) -> str:
        """Where the slice's private /dev/shm holds a hard link of the segment (isolation), or ""."""
        root = getattr(getattr(self.agent, "isolator", None), "shm_root", "")
        return os.path.join(root, slice_id, name) if root else ""

    def _reopen(self, bid: str, slice_id: str, size: int, secret: bytes) -> ShmRegion:
        """The segment of `bid` as a previous run of this agent left it; from the slice's own link when the
        /dev/shm name is gone but the slice still maps it."""
        name = PREFIX + bid
        link = self._slice_link(slice_id, name)
        if not segment_exists(name) and link and os.path.lexists(link):
            # the slice's directory is the tenant's: a regular file only, linked without following a symlink
            try:
                if not stat.S_ISREG(os.lstat(link).st_mode):
                    raise OSError("it is not a regular file")
                os.link(link, os.path.join("/dev/shm", name), follow_symlinks=False)
            except OSError as e:
                raise BufferGone(f"buffer {bid}: cannot restore segment {name} from the slice's link: {e}") from None
        try:
            return ShmRegion.reopen(bid, size, secret, owner=self.owner)
        except Revoked as e:
            raise BufferGone(e.message) from None
        except BufferDamaged as e:       # the tenant shrank it or overwrote its header: its memory is not the buffer
            DAMAGED_BUFFERS.labels(e.reason).inc()
            log(logger, logging.WARNING, "mesh buffer damaged by a process that maps its segment: not recovered",
                node=self.node, buffer=bid, slice=slice_id, tenant=getattr(self.agent.desired.get(slice_id), "tenant",
                                                                           ""), reason=e.reason, error=e.message)
            raise BufferGone(e.message) from None

    def _present(self, rec: dict) -> bool:
        link = self._slice_link(rec["slice_id"], rec["shm_name"])
        return segment_exists(rec["shm_name"]) or bool(link and os.path.exists(link))

    def _forget_record(self, rec: dict, reason: str) -> None:
        """Unlink a buffer this agent does not hold any more (a previous run's) and drop its record."""
        unlink_segment(rec["shm_name"])
        iso = getattr(self.agent, "isolator", None)
        if iso is not None:
            iso.unshare_segment(rec["slice_id"], rec["shm_name"])
        self.records.drop(rec["buffer_id"])
        log(logger, logging.INFO, "mesh buffer of a previous agent run revoked", node=self.node,
            buffer=rec["buffer_id"], slice=rec["slice_id"], reason=reason)

    def deregister(self, buffer_id: str, reason: str = "") -> bool:
        held = self.buffers.pop(buffer_id, None)
        self.health.forget(buffer_id)
        if held is None:
            rec = self.records.get(buffer_id) if self.records is not None else None
            if rec is not None:             # a previous run's buffer, not recovered: its memory goes too
                self._forget_record(rec, reason)
                return True
            return False
        if self.records is not None:
            self.records.drop(buffer_id)
        self.server.regions.remove(held.descriptor.rkey)
        if held.descriptor.transport == "verbs" and self.verbs is not None:
            self.verbs.deregister(buffer_id)          # QP, CQ and MRs first: the HCA stops touching the segment
        if held.descriptor.transport == "cuda_ipc" and self.cuda is not None:
            self.cuda.deregister(buffer_id)
        if held.region is not None:
            held.region.revoke()
            iso = getattr(self.agent, "isolator", None)
            if iso is not None:
                iso.unshare_segment(held.descriptor.slice_id, held.region.name)
        log(logger, logging.INFO, "mesh buffer revoked", node=self.node, buffer=buffer_id,
            slice=held.descriptor.slice_id, reason=reason)
        return True

    # -- RDMA on behalf of the slice's workload (the data plane's RDMA_WRITE / RDMA_READ) ------------

    def check(self, region, op: str, offset: int, length: int) -> tuple[int, str]:
        link = self.verbs.link(region.buffer_id) if self.verbs is not None else None
        if link is None:
            return QP_ERROR, f"buffer {region.buffer_id} has no connected queue pair (not a verbs buffer, or its peer " \
                             f"was not introduced yet)"
        try:
            check_bounds(op, link.descriptor.buffer_id, offset, length, link.descriptor.length)
        except OutOfBounds as e:
            return OUT_OF_BOUNDS, e.message
        return OK, ""

    def write(self, region, offset: int, payload) -> None:
        self.verbs.link(region.buffer_id).write(offset, payload)

    def read(self, region, offset: int, length: int) -> bytes:
        return self.verbs.link(region.buffer_id).read(offset, length)

    def revoke_slice(self, slice_id: str, reason: str = "slice released") -> list[str]:
        ids = [b for b, h in self.buffers.items() if h.descriptor.slice_id == slice_id]
        ids += [b for b, r in self._unrecovered().items() if r["slice_id"] == slice_id]
        for bid in ids:
            self.deregister(bid, reason)
        return ids

    def close(self) -> None:
        """Revoke every buffer (held, or a previous run's not recovered) and stop the data plane. A stopping
        agent does not call this: its buffers outlive it for the next run to recover."""
        for bid in list(self.buffers) + list(self._unrecovered()):
            self.deregister(bid, "registrar closed")
        self.health.stop()
        self.server.close()

    # -- Sync stream ----------------------------------------------------------------------

    def _unrecovered(self) -> dict[str, dict]:
        """Records of buffers a previous run of this agent registered that this run does not hold."""
        if self.records is None:
            return {}
        return {b: r for b, r in self.records.load().items() if b not in self.buffers}

    def on_session(self, outbox) -> None:
        recoverable = []
        for bid, rec in self._unrecovered().items():
            if self._present(rec):
                recoverable.append(bid)
            else:
                self.records.drop(bid)           # its memory is gone: nothing to recover, nothing to free
        outbox.put_nowait(node_service_pb2.AgentMessage(mesh_hello=M.MeshHello(
            endpoint=self.server.endpoint, transports=self.transports, buffers=sorted(self.buffers),
            verbs_unavailable=self.verbs_unavailable, tls=self.tls, recoverable=sorted(recoverable))))
        self.health.attach(outbox)           # the buffers found unusable, on this stream too

    async def on_register(self, msg: M.MeshRegister, outbox) -> None:
        reply = M.MeshRegistered(request_id=msg.request_id)
        try:
            desc = self.register(msg.slice_id, msg.size_bytes, msg.transport, msg.connection_id, msg.secret,
                                 recover=msg.recover)
            reply.descriptor.CopyFrom(desc.to_proto())
        except BufferGone as e:
            reply.error, reply.error_kind = str(e), "gone"
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
        """Bring this buffer's QP to RTS towards the peer's QP and keep the link; answer when asked."""
        error = ""
        held = self.buffers.get(msg.buffer_id)
        if held is None:
            error = f"buffer {msg.buffer_id} is not registered on node {self.node}"
        elif held.descriptor.transport != "verbs" or self.verbs is None:
            error = f"buffer {msg.buffer_id} is not a verbs buffer"
        else:
            try:
                self.verbs.connect(BufferDescriptor.from_proto(msg.peer), local_buffer_id=msg.buffer_id)
                log(logger, logging.INFO, "verbs queue pair connected", node=self.node, buffer=msg.buffer_id,
                    peer_buffer=msg.peer.buffer_id, peer_qp=msg.peer.qp_num)
            except TransportError as e:
                error = e.message
        if error:
            log(logger, logging.WARNING, "verbs connect failed", node=self.node, buffer=msg.buffer_id, error=error)
        if msg.request_id:
            outbox.put_nowait(node_service_pb2.AgentMessage(mesh_registered=M.MeshRegistered(
                request_id=msg.request_id, error=error, error_kind="unavailable" if error else "")))

    def on_desired(self, d: node_service_pb2.DesiredSlices) -> None:
        """Revoke the buffers of slices that left the desired set (released) before they are torn down."""
        gone = set(d.removals)
        if d.full:
            keep = {s.id for s in d.upserts}
            gone |= {h.descriptor.slice_id for h in self.buffers.values()} - keep
            gone |= {r["slice_id"] for r in self._unrecovered().values()} - keep
        for sid in gone:
            self.revoke_slice(sid)


def attach_all(agents, cfg) -> list[Registrar]:
    """A registrar (own data-plane port) for every agent of this process."""
    ok, why = verbs.available() if getattr(cfg, "mesh_verbs", True) else (False, "disabled (mesh_verbs: false)")
    cuda_ok, _ = cuda_ipc.available()
    tls = getattr(cfg, "mesh_tls", True)
    identity = None
    if tls and getattr(cfg, "tls_cert", "") and getattr(cfg, "tls_key", ""):
        identity = channel.TlsIdentity.from_files(cfg.tls_cert, cfg.tls_key)    # the cluster's agent certificate
    out = []
    for a in agents:
        vt = verbs.VerbsTransport(a.node) if ok else None
        ct = cuda_ipc.CudaIpcTransport(a.node) if cuda_ok else None
        out.append(Registrar(a, getattr(cfg, "mesh_listen", "0.0.0.0:0"), getattr(cfg, "mesh_advertise", ""), vt,
                             verbs_unavailable=why, tls=tls, identity=identity, cuda_transport=ct,
                             state_dir=os.path.join(cfg.state_dir, "mesh", a.node) if getattr(cfg, "state_dir", "")
                             else ""))
    if not ok:
        log(logger, logging.INFO, "mesh: no RDMA verbs on this host; tcp and shm only", reason=why)
    if not tls:
        log(logger, logging.WARNING, "mesh: data plane TLS is off (mesh_tls: false): bytes between hosts are "
                                     "plaintext; the connection secret still authenticates every channel")
    return out
