"""A stand-in for pyverbs that follows its API, enums and RC semantics, with a tiny in-memory fabric.

`make(devices=False)` behaves like pyverbs on a host without RDMA: get_device_list()
raises PyverbsRDMAError("Failed to get devices list"). With devices, memory regions
are real host memory (ctypes) and queue pairs follow the RC state machine of
rdma-core (values of pyverbs.enums, pyverbs 44):

* RESET -> INIT -> RTR -> RTS through `to_init` / `to_rtr` / `to_rts` (pyverbs'
  `to_rtr` from RESET passes through INIT first, as the real one does) or
  `modify(attr, IBV_QP_STATE | ...)`; any state -> RESET or ERR through `modify`.
  A transition the state machine does not allow raises PyverbsRDMAError (errno
  22, EINVAL), as ibv_modify_qp does: a QP that is RTR/RTS towards one peer
  cannot be taken to RTR towards another without going through RESET.
* post_send is refused in RESET/INIT/RTR (EINVAL) and with more than
  `cap.max_send_wr` outstanding work requests (ENOMEM).
* RDMA WRITE/READ check the remote key, the MR's access flags and bounds. A remote
  access violation completes with IBV_WC_REM_ACCESS_ERR and moves the requester's
  QP, and the responder's (a fatal NAK on an RC connection), to IBV_QPS_ERR; every
  later work request on an ERR QP (and anything still outstanding) completes with
  IBV_WC_WR_FLUSH_ERR and moves no byte.
* A peer QP that is gone or not RTR/RTS towards us: retries exhausted
  (IBV_WC_RETRY_EXC_ERR), QP to ERR.
* Completions go to the send CQ in posting order per QP, with the WC opcode
  (IBV_WC_RDMA_WRITE / IBV_WC_RDMA_READ), byte_len and qp_num.
* An MR over existing memory (`address=`, e.g. a mesh buffer's shared memory segment) pins its
  pages as ibv_reg_mr does: registering a range that is not all backed (pages past a shrunk file's
  end) fails with EFAULT; once registered, the NIC keeps reaching the pinned pages even when the
  file is shrunk later (they leave the file, not the MR), so it never faults. The stand-in reaches
  such memory as DMA does, never with a CPU load or store of this process (which would be a SIGBUS
  on a page that left the file): through /proc/self/mem, and a page that left the file becomes
  the MR's own page. Unlike real pinned pages it starts as zeros (the stand-in cannot keep what
  the page held at the shrink); a page that is past the end again after the file grew back is
  reached in the file, not in the MR.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import itertools
import mmap
import os
import random
import types


class PyverbsError(Exception):
    pass


class PyverbsRDMAError(PyverbsError):
    def __init__(self, msg: str, error_code: int = -1) -> None:
        super().__init__(msg if error_code == -1 else f"{msg}. Errno: {error_code}")
        self.error_code = error_code


class E:
    """ibv_* constants with the values of pyverbs.enums (rdma-core 44)."""

    IBV_ACCESS_LOCAL_WRITE = 1
    IBV_ACCESS_REMOTE_WRITE = 2
    IBV_ACCESS_REMOTE_READ = 4
    IBV_QPT_RC = 2
    IBV_QPS_RESET, IBV_QPS_INIT, IBV_QPS_RTR, IBV_QPS_RTS, IBV_QPS_SQD, IBV_QPS_SQE, IBV_QPS_ERR = range(7)
    IBV_QP_STATE = 1
    IBV_QP_AV = 128
    IBV_QP_DEST_QPN = 1048576
    IBV_WR_RDMA_WRITE = 0
    IBV_WR_RDMA_READ = 4
    IBV_SEND_SIGNALED = 2
    IBV_WC_SUCCESS = 0
    IBV_WC_LOC_PROT_ERR = 4
    IBV_WC_WR_FLUSH_ERR = 5
    IBV_WC_REM_INV_REQ_ERR = 9
    IBV_WC_REM_ACCESS_ERR = 10
    IBV_WC_RETRY_EXC_ERR = 12
    IBV_WC_RNR_RETRY_EXC_ERR = 13
    IBV_WC_RDMA_WRITE = 1
    IBV_WC_RDMA_READ = 2


EINVAL, ENOMEM, EFAULT = 22, 12, 14
PAGE = mmap.PAGESIZE
_mem: tuple[int, int] | None = None        # (pid, descriptor of /proc/self/mem): a fork needs its own


def _proc_mem() -> int:
    global _mem
    if _mem is None or _mem[0] != os.getpid():
        _mem = (os.getpid(), os.open("/proc/self/mem", os.O_RDWR | os.O_CLOEXEC))
    return _mem[1]


def _dma(addr: int, n: int, data=None, orphans: dict | None = None) -> bytes | None:
    """Read `n` bytes at `addr` (data None) or write `data` there, through /proc/self/mem: a page that is
    not backed any more answers EIO instead of raising SIGBUS. Such a page is served from `orphans` (the
    MR's pinned copy, made on first use); without `orphans` the access fails with EFAULT."""
    fd, out, pos = _proc_mem(), bytearray(), 0
    src = memoryview(data).cast("B") if data is not None else None
    while pos < n:
        a = addr + pos
        page, o = a - a % PAGE, a % PAGE
        if orphans is not None and page in orphans:
            k = min(n - pos, PAGE - o)
            if src is None:
                out += orphans[page][o:o + k]
            else:
                orphans[page][o:o + k] = src[pos:pos + k]
            pos += k
            continue
        k = n - pos if orphans is None or not orphans else min(n - pos, PAGE - o)
        try:
            got = os.pwrite(fd, src[pos:pos + k], a) if src is not None else len(b := os.pread(fd, k, a))
        except OSError as e:
            if e.errno not in (errno.EIO, errno.EFAULT):
                raise
            got = 0
        if src is None and got:
            out += b
        if got == 0:
            if orphans is None:
                raise PyverbsRDMAError("Bad address", EFAULT)
            orphans[page] = bytearray(PAGE)      # the pinned page left the file: it stays the MR's
        pos += got
    return bytes(out) if src is None else None


def make(devices: bool = True) -> types.SimpleNamespace:
    fabric = types.SimpleNamespace(mrs={}, lkeys={}, qps={}, log=[])
    keys = itertools.count(0x1000)

    class Device:
        name = b"mlx5_0"

    def get_device_list():
        if not devices:
            raise PyverbsRDMAError("Failed to get devices list")
        return [Device()]

    class Context:
        def __init__(self, name=None, **kw):
            if name != "mlx5_0":
                raise PyverbsRDMAError(f"Failed to open device {name}")
            self.name = name

        def query_port(self, port):
            return types.SimpleNamespace(lid=7, active_mtu=5, link_layer=1, state=4)

        def query_gid(self, port, index):
            return GID("fe80:0000:0000:0000:0002:c903:0000:0001")

        def close(self):
            pass

    class PD:
        def __init__(self, ctx):
            self.ctx = ctx

        def close(self):
            pass

    class MR:
        def __init__(self, pd, length, access, address=None, implicit=False, **kw):
            self.length, self.access = length, access
            self._mem = None if address is not None else (ctypes.c_char * max(1, length))()
            self.buf = address if address is not None else ctypes.addressof(self._mem)
            self.orphans: dict[int, bytearray] | None = None      # own memory: nothing to pin
            if address is not None:       # ibv_reg_mr pins every page of the range: all must be backed
                try:
                    for a in {address, address + max(1, length) - 1}:
                        _dma(a, 1)
                except PyverbsRDMAError:
                    raise PyverbsRDMAError("Failed to register a MR", EFAULT) from None
                self.orphans = {}
            self.lkey, self.rkey = next(keys), next(keys)
            fabric.mrs[self.rkey] = self
            fabric.lkeys[self.lkey] = self

        def dma_write(self, addr, data, length):
            if self.orphans is None:
                ctypes.memmove(addr, bytes(data[:length]), length)
            else:
                _dma(addr, length, data[:length], self.orphans)

        def dma_read(self, addr, length):
            if self.orphans is None:
                return ctypes.string_at(addr, length)
            return _dma(addr, length, orphans=self.orphans)

        def write(self, data, length, offset=0):
            self.dma_write(self.buf + offset, memoryview(bytes(data)), length)

        def read(self, length, offset):
            return self.dma_read(self.buf + offset, length)

        def close(self):
            fabric.mrs.pop(self.rkey, None)
            fabric.lkeys.pop(self.lkey, None)

    class CQ:
        def __init__(self, ctx, cqe, *a):
            self.q = collections.deque()

        def poll(self, num_entries=1):
            out = [self.q.popleft() for _ in range(min(num_entries, len(self.q)))]
            return len(out), out

        def close(self):
            pass

    class QPCap:
        def __init__(self, max_send_wr=1, max_recv_wr=10, max_send_sge=1, max_recv_sge=1, max_inline_data=0):
            self.max_send_wr = max_send_wr

    class QPInitAttr:
        def __init__(self, qp_type=E.IBV_QPT_RC, qp_context=None, scq=None, rcq=None, srq=None, cap=None,
                     sq_sig_all=0):
            self.qp_type, self.scq, self.rcq, self.cap = qp_type, scq, rcq, cap or QPCap()

    class QPAttr:
        def __init__(self, qp_state=E.IBV_QPS_INIT, cur_qp_state=E.IBV_QPS_RESET):
            self.qp_state = qp_state
            self.cur_qp_state = cur_qp_state

    class QP:
        def __init__(self, pd, init_attr, qp_attr=None):
            self.pd, self.attr = pd, init_attr
            self.qp_num = random.randrange(1, 1 << 24)
            self.qp_state = E.IBV_QPS_RESET
            self.dest = None
            self.outstanding = 0
            fabric.qps[self.qp_num] = self

        # -- the state machine (ibv_modify_qp) ------------------------------------------------
        def _reset(self):
            self.qp_state, self.dest, self.access = E.IBV_QPS_RESET, None, 0

        def to_init(self, attr):
            if self.qp_state not in (E.IBV_QPS_RESET, E.IBV_QPS_INIT):
                raise PyverbsRDMAError("Failed to modify QP state to init", EINVAL)
            self.access = attr.qp_access_flags
            self.qp_state = E.IBV_QPS_INIT

        def to_rtr(self, attr):
            if self.qp_state == E.IBV_QPS_RESET:          # pyverbs: RESET -> INIT -> RTR
                self.to_init(attr)
            if self.qp_state != E.IBV_QPS_INIT:
                raise PyverbsRDMAError("Failed to modify QP state to RTR", EINVAL)
            if not attr.ah_attr.is_global or attr.ah_attr.grh.dgid.gid is None:
                raise PyverbsRDMAError("Failed to modify QP state to RTR", EINVAL)   # RoCE/IB GRH needed
            self.dest = attr.dest_qp_num
            self.qp_state = E.IBV_QPS_RTR

        def to_rts(self, attr):
            if self.qp_state != E.IBV_QPS_RTR:
                raise PyverbsRDMAError("Failed to modify QP state to RTS", EINVAL)
            self.qp_state = E.IBV_QPS_RTS

        def modify(self, qp_attr, comp_mask):
            if not comp_mask & E.IBV_QP_STATE:
                raise PyverbsRDMAError("Failed to modify QP", EINVAL)
            want = qp_attr.qp_state
            if want == E.IBV_QPS_RESET:
                self._reset()
            elif want == E.IBV_QPS_ERR:
                self._error()
            elif want == E.IBV_QPS_INIT:
                self.to_init(qp_attr)
            elif want == E.IBV_QPS_RTR:
                self.to_rtr(qp_attr)
            elif want == E.IBV_QPS_RTS:
                self.to_rts(qp_attr)
            else:
                raise PyverbsRDMAError("Failed to modify QP", EINVAL)

        def query(self, attr_mask):
            return QPAttr(qp_state=self.qp_state, cur_qp_state=self.qp_state), self.attr

        def _error(self):
            self.qp_state = E.IBV_QPS_ERR

        # -- work requests ----------------------------------------------------------------------
        def _complete(self, wr, status, length):
            op = E.IBV_WC_RDMA_WRITE if wr.opcode == E.IBV_WR_RDMA_WRITE else E.IBV_WC_RDMA_READ
            self.attr.scq.q.append(types.SimpleNamespace(wr_id=wr.wr_id, status=status, opcode=op,
                                                         byte_len=length if status == E.IBV_WC_SUCCESS else 0,
                                                         qp_num=self.qp_num, vendor_err=0))

        def post_send(self, wr, bad_wr=None):
            if self.qp_state in (E.IBV_QPS_RESET, E.IBV_QPS_INIT, E.IBV_QPS_RTR):
                raise PyverbsRDMAError("Failed to post send", EINVAL)
            pending = sum(1 for c in self.attr.scq.q if getattr(c, "qp_num", None) == self.qp_num)
            if pending >= self.attr.cap.max_send_wr:
                raise PyverbsRDMAError("Failed to post send", ENOMEM)
            fabric.log.append(wr.opcode)
            sge = wr.sg[0]
            if self.qp_state == E.IBV_QPS_ERR:
                self._complete(wr, E.IBV_WC_WR_FLUSH_ERR, 0)
                return
            peer = fabric.qps.get(self.dest)
            if peer is None or peer.qp_state not in (E.IBV_QPS_RTR, E.IBV_QPS_RTS) or peer.dest != self.qp_num:
                self._error()
                self._complete(wr, E.IBV_WC_RETRY_EXC_ERR, 0)
                return
            remote = fabric.mrs.get(wr.rkey)
            write = wr.opcode == E.IBV_WR_RDMA_WRITE
            need = E.IBV_ACCESS_REMOTE_WRITE if write else E.IBV_ACCESS_REMOTE_READ
            if remote is None or not remote.access & need or not peer.access & need \
                    or wr.remote_addr < remote.buf or wr.remote_addr + sge.length > remote.buf + remote.length:
                self._error()
                peer._error()         # a remote access error is fatal to both ends of the RC connection
                self._complete(wr, E.IBV_WC_REM_ACCESS_ERR, 0)
                return
            local = fabric.lkeys.get(sge.lkey)
            if local is None or not sge.addr >= local.buf or sge.addr + sge.length > local.buf + local.length:
                self._error()
                self._complete(wr, E.IBV_WC_LOC_PROT_ERR, 0)
                return
            if write:
                remote.dma_write(wr.remote_addr, memoryview(local.dma_read(sge.addr, sge.length)), sge.length)
            else:
                local.dma_write(sge.addr, memoryview(remote.dma_read(wr.remote_addr, sge.length)), sge.length)
            self._complete(wr, E.IBV_WC_SUCCESS, sge.length)

        def close(self):
            fabric.qps.pop(self.qp_num, None)

    class SGE:
        def __init__(self, addr, length, lkey):
            self.addr, self.length, self.lkey = addr, length, lkey

    class SendWR:
        def __init__(self, wr_id=0, opcode=E.IBV_WR_RDMA_WRITE, num_sge=1, imm_data=0, sg=None, send_flags=0):
            self.wr_id, self.opcode, self.num_sge, self.sg, self.send_flags = wr_id, opcode, num_sge, sg, send_flags

        def set_wr_rdma(self, rkey, addr):
            self.rkey, self.remote_addr = rkey, addr

    class GID:
        def __init__(self, val=None):
            self.gid = val

    class GlobalRoute:
        def __init__(self, dgid=None, flow_label=0, sgid_index=0, hop_limit=1, traffic_class=0):
            self.dgid, self.sgid_index = dgid, sgid_index

    class AHAttr:
        def __init__(self, dlid=0, sl=0, src_path_bits=0, static_rate=0, is_global=0, port_num=1, grh=None):
            self.dlid, self.is_global, self.port_num, self.grh = dlid, is_global, port_num, grh

    enums = types.SimpleNamespace(**{k: v for k, v in vars(E).items() if k.startswith("IBV_")})
    return types.SimpleNamespace(
        fabric=fabric,
        device=types.SimpleNamespace(get_device_list=get_device_list, Context=Context),
        pd=types.SimpleNamespace(PD=PD), mr=types.SimpleNamespace(MR=MR), cq=types.SimpleNamespace(CQ=CQ),
        qp=types.SimpleNamespace(QPCap=QPCap, QPInitAttr=QPInitAttr, QPAttr=QPAttr, QP=QP),
        wr=types.SimpleNamespace(SGE=SGE, SendWR=SendWR),
        addr=types.SimpleNamespace(GID=GID, GlobalRoute=GlobalRoute, AHAttr=AHAttr),
        enums=enums,
        pyverbs_error=types.SimpleNamespace(PyverbsError=PyverbsError, PyverbsRDMAError=PyverbsRDMAError))
