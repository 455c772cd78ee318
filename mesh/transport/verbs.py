"""RDMA verbs through pyverbs (rdma-core's Python binding).

Each registered buffer is a memory region (MR) in the transport's protection
domain with LOCAL_WRITE | REMOTE_WRITE | REMOTE_READ access, plus its own RC
queue pair and completion queue. The descriptor carries what the peer needs:
the MR's address and rkey, and the QP's address (GID, LID, QPN, first PSN).
The control plane hands each side the other's descriptor; `connect` then moves
the local QP through INIT -> RTR -> RTS towards the peer's QP, and `write` /
`read` post IBV_WR_RDMA_WRITE / IBV_WR_RDMA_READ work requests from the local
staging MR (a buffer's own WRITE/READ payloads pass through it, in chunks of
`STAGING_BYTES`) and poll the CQ for the completion. RC semantics hold: an
error completion leaves the QP in the error state (the connection refuses later
operations with `QueuePairError`), and a QP connected to one peer is never
reused for another. A completion with an error status becomes a typed error:
remote access errors (wrong key, revoked MR, out of bounds on the remote side)
`InvalidKey`, retries exhausted `PeerGone`. Bounds are checked against both
descriptors before anything is posted.

pyverbs is imported lazily (it is a Debian package, python3-pyverbs, outside
the venv: the system dist-packages are tried as a fallback). Without a device,
`get_device_list()` raises PyverbsRDMAError("Failed to get devices list"),
reported as `Unsupported` with that reason.
"""

from __future__ import annotations

import importlib
import os
import secrets
import sys
import threading
import time
import types

from mesh.transport.base import (BufferDescriptor, InvalidKey, PeerGone, QueuePairError, Revoked, TransportError,
                                 Unsupported, check_bounds)

SYSTEM_SITE = "/usr/lib/python3/dist-packages"
SUBMODULES = ("device", "pd", "mr", "cq", "qp", "wr", "addr", "enums", "pyverbs_error")
POLL_TIMEOUT_S = 10.0
STAGING_BYTES = 4 << 20      # per buffer: the local MR that outgoing WRITEs and incoming READs pass through


STANDIN_ENV = "GPUMESH_PYVERBS_STANDIN"
_standin: types.SimpleNamespace | None = None


def load_pyverbs() -> types.SimpleNamespace:
    """pyverbs' submodules as one namespace; Unsupported when the binding is not installed.

    `GPUMESH_PYVERBS_STANDIN=module:function` loads a stand-in that speaks pyverbs' API instead
    (simulated hosts, like the simulated NVML: `tests.unit.fakeverbs:make`, whose fabric joins the
    agents of one process). It is never set on a GPU host."""
    global _standin
    spec = os.environ.get(STANDIN_ENV, "")
    if spec:
        if _standin is None:
            mod, _, fn = spec.partition(":")
            _standin = getattr(importlib.import_module(mod), fn or "make")()
        return _standin

    def load():
        return types.SimpleNamespace(**{m: importlib.import_module(f"pyverbs.{m}") for m in SUBMODULES})
    try:
        return load()
    except ImportError:
        pass
    added = SYSTEM_SITE not in sys.path
    if added:
        sys.path.append(SYSTEM_SITE)
    try:
        return load()
    except ImportError as e:
        raise Unsupported(f"pyverbs is not installed (apt-get install python3-pyverbs): {e}", op="open",
                          transport="verbs") from None
    finally:
        if added:
            sys.path.remove(SYSTEM_SITE)


def available(pyverbs=None) -> tuple[bool, str]:
    """Whether an RDMA device can be opened here, and if not, why."""
    try:
        v = pyverbs or load_pyverbs()
        devices = v.device.get_device_list()
    except Unsupported as e:
        return False, e.message
    except Exception as e:   # PyverbsRDMAError: "Failed to get devices list"
        return False, f"no RDMA device: {e}"
    if not devices:
        return False, "no RDMA device: the device list is empty"
    return True, ""


class _Buffer:
    def __init__(self, mr, staging, cq, qp, psn: int, descriptor: BufferDescriptor) -> None:
        self.mr, self.staging, self.cq, self.qp, self.psn, self.descriptor = mr, staging, cq, qp, psn, descriptor
        self.peer: BufferDescriptor | None = None
        self.link: "VerbsConnection | None" = None


def _same_peer(a: BufferDescriptor, b: BufferDescriptor) -> bool:
    return (a.qp_num, a.gid, a.lid, a.rkey, a.address) == (b.qp_num, b.gid, b.lid, b.rkey, b.address)


class VerbsConnection:
    """One RC queue pair in RTS towards the peer's; one-sided WRITE/READ staged through a local MR.

    As on hardware, an error completion (remote access error, retries exhausted) leaves the QP in
    the error state: this connection then refuses every later operation (`QueuePairError`), and
    work requests that were posted behind the failed one complete with IBV_WC_WR_FLUSH_ERR. A new
    `mesh connect` (new QPs) is the way back."""

    def __init__(self, transport: "VerbsTransport", local: _Buffer, peer: BufferDescriptor) -> None:
        self.t, self.local, self.descriptor = transport, local, peer
        self._wr_id = 0
        self._lock = threading.Lock()
        self.failed: str = ""

    def _live(self, op: str) -> None:
        if self.local.mr is None:
            raise Revoked(f"local buffer {self.local.descriptor.buffer_id} was deregistered", op=op,
                          buffer_id=self.descriptor.buffer_id)
        if self.failed:
            raise QueuePairError(f"{op} on buffer {self.descriptor.buffer_id}: the queue pair is in the error state "
                                 f"({self.failed}); disconnect and connect again", op=op,
                                 buffer_id=self.descriptor.buffer_id, transport="verbs")

    def _chunks(self, offset: int, length: int):
        step = self.local.staging.length
        for done in range(0, length, step):
            yield offset + done, done, min(step, length - done)

    def _post_chunk(self, op: str, opcode, remote_off: int, length: int) -> int:
        v, e = self.t.v, self.t.v.enums
        self._wr_id += 1
        sge = v.wr.SGE(self.local.staging.buf, length, self.local.staging.lkey)
        wr = v.wr.SendWR(wr_id=self._wr_id, opcode=opcode, num_sge=1, sg=[sge], send_flags=e.IBV_SEND_SIGNALED)
        wr.set_wr_rdma(self.descriptor.rkey, self.descriptor.address + remote_off)
        try:
            self.local.qp.post_send(wr)
        except v.pyverbs_error.PyverbsError as err:
            raise TransportError(f"{op}: post_send failed: {err}", op=op,
                                 buffer_id=self.descriptor.buffer_id) from None
        return self._wr_id

    def _complete(self, op: str, wr_id: int) -> None:
        """Wait for the completion of `wr_id` (completions come in posting order on an RC QP)."""
        e = self.t.v.enums
        bid = self.descriptor.buffer_id
        deadline = time.monotonic() + POLL_TIMEOUT_S
        while True:
            npolled, wcs = self.local.cq.poll(num_entries=1)
            if npolled:
                wc = wcs[0]
                if wc.wr_id != wr_id and wc.status == e.IBV_WC_SUCCESS:
                    continue          # an earlier request's completion (ordering per QP)
                break
            if time.monotonic() > deadline:
                self.failed = f"no completion within {POLL_TIMEOUT_S:g}s"
                raise PeerGone(f"{op}: no completion within {POLL_TIMEOUT_S:g}s", op=op, buffer_id=bid,
                               endpoint=self.descriptor.node)
        if wc.status == e.IBV_WC_SUCCESS:
            return
        self.failed = f"completion status {int(wc.status)}"
        if wc.status in (e.IBV_WC_REM_ACCESS_ERR, e.IBV_WC_REM_INV_REQ_ERR):
            raise InvalidKey(f"{op} on buffer {bid}: remote access error (wrong or revoked key, or out of "
                             f"bounds on the peer): completion status {int(wc.status)}; the queue pair is now in "
                             f"the error state", op=op, buffer_id=bid, rkey=self.descriptor.rkey)
        if wc.status in (e.IBV_WC_RETRY_EXC_ERR, e.IBV_WC_RNR_RETRY_EXC_ERR):
            raise PeerGone(f"{op} on buffer {bid}: the peer does not answer (completion status {int(wc.status)})",
                           op=op, buffer_id=bid, endpoint=self.descriptor.node)
        if wc.status == e.IBV_WC_WR_FLUSH_ERR:
            raise QueuePairError(f"{op} on buffer {bid}: flushed (the queue pair is in the error state)", op=op,
                                 buffer_id=bid, transport="verbs")
        raise TransportError(f"{op} on buffer {bid}: completion status {int(wc.status)}", op=op, buffer_id=bid)

    def write(self, offset: int, data) -> int:
        mv = memoryview(data).cast("B")
        n = mv.nbytes
        with self._lock:
            self._live("write")
            check_bounds("write", self.descriptor.buffer_id, offset, n, self.descriptor.length)
            for remote_off, done, k in self._chunks(offset, n):
                self.local.staging.write(bytes(mv[done:done + k]), k, 0)
                self._complete("write", self._post_chunk("write", self.t.v.enums.IBV_WR_RDMA_WRITE, remote_off, k))
        return n

    def read(self, offset: int, length: int, into=None):
        with self._lock:
            self._live("read")
            check_bounds("read", self.descriptor.buffer_id, offset, length, self.descriptor.length)
            out = bytearray(length) if into is None else memoryview(into).cast("B")
            for remote_off, done, k in self._chunks(offset, length):
                self._complete("read", self._post_chunk("read", self.t.v.enums.IBV_WR_RDMA_READ, remote_off, k))
                out[done:done + k] = self.local.staging.read(k, 0)
        return into if into is not None else bytes(out)

    def send(self, data) -> int:
        raise Unsupported("two-sided verbs messages go through the agents' data plane (tcp) in this release",
                          op="send", buffer_id=self.descriptor.buffer_id, transport="verbs")

    def recv(self, timeout: float = 0.0) -> bytes | None:
        raise Unsupported("two-sided verbs messages go through the agents' data plane (tcp) in this release",
                          op="recv", buffer_id=self.descriptor.buffer_id, transport="verbs")

    def close(self) -> None:
        pass


class VerbsTransport:
    name = "verbs"
    ACCESS = ("IBV_ACCESS_LOCAL_WRITE", "IBV_ACCESS_REMOTE_WRITE", "IBV_ACCESS_REMOTE_READ")

    def __init__(self, node: str = "", device: str = "", port: int = 1, gid_index: int = 0, pyverbs=None) -> None:
        self.node, self.device, self.port, self.gid_index = node, device, port, gid_index
        self._pyverbs = pyverbs
        self.v = None
        self.ctx = self.pd = None
        self.buffers: dict[str, _Buffer] = {}

    def open(self) -> None:
        """Open the device, query its port and GID, allocate the protection domain."""
        if self.ctx is not None:
            return
        v = self._pyverbs or load_pyverbs()
        try:
            devices = v.device.get_device_list()
        except v.pyverbs_error.PyverbsError as e:
            raise Unsupported(f"no RDMA device: {e}", op="open", transport="verbs") from None
        names = [d.name.decode() if isinstance(d.name, bytes) else d.name for d in devices]
        if not names or (self.device and self.device not in names):
            raise Unsupported(f"RDMA device {self.device or 'any'} not found (devices: {names or 'none'})",
                              op="open", transport="verbs")
        self.v = v
        self.device = self.device or names[0]
        self.ctx = v.device.Context(name=self.device)
        self.port_attr = self.ctx.query_port(self.port)
        self.gid = self.ctx.query_gid(self.port, self.gid_index)
        self.pd = v.pd.PD(self.ctx)

    def _access(self) -> int:
        flags = 0
        for name in self.ACCESS:
            flags |= int(getattr(self.v.enums, name))
        return flags

    def register(self, slice_id: str, size: int = 0, buffer=None, buffer_id: str = "",
                 rkey: int = 0) -> BufferDescriptor:
        """A memory region of `size` bytes (new memory, or the integer address `buffer`: host or device
        memory, e.g. a shared memory segment the slice's workload maps), a staging MR for this side's own
        WRITE/READ payloads, and an RC queue pair in INIT."""
        self.open()
        v, e = self.v, self.v.enums
        bid = buffer_id or f"b-{secrets.token_hex(6)}"
        access = self._access()
        try:
            if buffer is not None:      # ibv_reg_mr pins the pages: EFAULT when some are past a shrunk file's end
                mr = v.mr.MR(self.pd, size, access, address=int(buffer))
            else:
                mr = v.mr.MR(self.pd, size, access)
        except v.pyverbs_error.PyverbsError as err:
            raise TransportError(f"cannot register a memory region of {size} bytes for buffer {bid}: {err}",
                                 op="register", buffer_id=bid) from None
        staging = v.mr.MR(self.pd, max(1, min(size, STAGING_BYTES)), int(e.IBV_ACCESS_LOCAL_WRITE))
        cq = v.cq.CQ(self.ctx, 64)
        cap = v.qp.QPCap(max_send_wr=64, max_recv_wr=64, max_send_sge=1, max_recv_sge=1)
        qp = v.qp.QP(self.pd, v.qp.QPInitAttr(qp_type=e.IBV_QPT_RC, scq=cq, rcq=cq, cap=cap))
        attr = v.qp.QPAttr()
        attr.qp_access_flags = access
        attr.port_num = self.port
        attr.pkey_index = 0
        qp.to_init(attr)
        psn = secrets.randbits(24)
        gid = self.gid.gid if hasattr(self.gid, "gid") else str(self.gid)
        desc = BufferDescriptor(buffer_id=bid, slice_id=slice_id, node=self.node, transport="verbs",
                                address=int(mr.buf), length=size, rkey=int(mr.rkey), lkey=int(mr.lkey),
                                gid=gid.encode(), lid=int(self.port_attr.lid), qp_num=int(qp.qp_num), psn=psn,
                                device=self.device, port=self.port)
        self.buffers[bid] = _Buffer(mr, staging, cq, qp, psn, desc)
        return desc

    def connect(self, descriptor: BufferDescriptor, local_buffer_id: str = "") -> VerbsConnection:
        """Bring the local buffer's QP through RTR to RTS towards the peer's QP (from its descriptor).

        Idempotent for the same peer. A QP already connected to another peer is never reused: that is
        refused here (and the device would refuse the RTR transition too, unless the QP went through RESET)."""
        local = self.buffers.get(local_buffer_id) if local_buffer_id else None
        if local is None:
            raise TransportError("verbs connect needs the local buffer registered for this connection",
                                 op="connect", buffer_id=descriptor.buffer_id)
        if local.peer is not None:
            if not _same_peer(local.peer, descriptor):
                raise QueuePairError(f"the queue pair of buffer {local_buffer_id} is connected to buffer "
                                     f"{local.peer.buffer_id} (QP {local.peer.qp_num}); it is not reused for buffer "
                                     f"{descriptor.buffer_id} (QP {descriptor.qp_num})", op="connect",
                                     buffer_id=descriptor.buffer_id, transport="verbs")
            return local.link
        v = self.v
        attr = v.qp.QPAttr()
        attr.qp_access_flags = self._access()
        attr.port_num = self.port
        attr.pkey_index = 0
        attr.path_mtu = self.port_attr.active_mtu
        attr.dest_qp_num = descriptor.qp_num
        attr.rq_psn = descriptor.psn
        attr.max_dest_rd_atomic = 1
        attr.min_rnr_timer = 12
        grh = v.addr.GlobalRoute(dgid=v.addr.GID(descriptor.gid.decode()), sgid_index=self.gid_index)
        attr.ah_attr = v.addr.AHAttr(dlid=descriptor.lid, is_global=1 if descriptor.gid else 0,
                                     port_num=self.port, grh=grh)
        try:
            local.qp.to_rtr(attr)
            attr.sq_psn = local.psn
            attr.timeout = 14
            attr.retry_cnt = 7
            attr.rnr_retry = 7
            attr.max_rd_atomic = 1
            local.qp.to_rts(attr)
        except v.pyverbs_error.PyverbsError as err:
            raise QueuePairError(f"queue pair of buffer {local_buffer_id} towards QP {descriptor.qp_num}: {err}",
                                 op="connect", buffer_id=descriptor.buffer_id, transport="verbs") from None
        local.peer = descriptor
        local.link = VerbsConnection(self, local, descriptor)
        return local.link

    def link(self, buffer_id: str) -> VerbsConnection | None:
        """The connected queue pair of a local buffer (None before the peer was introduced)."""
        b = self.buffers.get(buffer_id)
        return b.link if b is not None else None

    def deregister(self, buffer_id: str) -> None:
        b = self.buffers.pop(buffer_id, None)
        if b is None:
            return
        for obj in (b.qp, b.cq, b.staging, b.mr):     # closing the MR invalidates its rkey at the HCA
            try:
                obj.close()
            except Exception:
                pass
        b.mr = None

    def close(self) -> None:
        for bid in list(self.buffers):
            self.deregister(bid)
        for obj in (self.pd, self.ctx):
            if obj is not None:
                obj.close()
        self.pd = self.ctx = None
