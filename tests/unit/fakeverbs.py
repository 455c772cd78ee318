"""A stand-in for pyverbs that follows its API and errors, with a tiny in-memory fabric.

`make(devices=False)` behaves like pyverbs on a host without RDMA: get_device_list()
raises PyverbsRDMAError("Failed to get devices list"). With devices, memory regions
are real host memory (ctypes), queue pairs must go RESET -> INIT -> RTR -> RTS before
post_send, and RDMA WRITE/READ move bytes between MRs, checking the remote key, the
MR's access flags and bounds, and complete on the send CQ with IBV_WC_* statuses.
"""

from __future__ import annotations

import collections
import ctypes
import itertools
import random
import types


class PyverbsError(Exception):
    pass


class PyverbsRDMAError(PyverbsError):
    def __init__(self, msg: str, error_code: int = -1) -> None:
        super().__init__(msg)
        self.error_code = error_code


class E:
    """ibv_* constants (pyverbs.enums); values as in rdma-core where they matter."""

    IBV_ACCESS_LOCAL_WRITE = 1
    IBV_ACCESS_REMOTE_WRITE = 2
    IBV_ACCESS_REMOTE_READ = 4
    IBV_QPT_RC = 2
    IBV_QPS_RESET, IBV_QPS_INIT, IBV_QPS_RTR, IBV_QPS_RTS = 100, 101, 102, 103
    IBV_WR_RDMA_WRITE = 0
    IBV_WR_RDMA_READ = 4
    IBV_SEND_SIGNALED = 2
    IBV_WC_SUCCESS = 0
    IBV_WC_REM_INV_REQ_ERR = 9
    IBV_WC_REM_ACCESS_ERR = 10
    IBV_WC_RETRY_EXC_ERR = 12
    IBV_WC_RNR_RETRY_EXC_ERR = 13
    IBV_WC_WR_FLUSH_ERR = 5


def make(devices: bool = True) -> types.SimpleNamespace:
    fabric = types.SimpleNamespace(mrs={}, qps={}, log=[])
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
        def __init__(self, pd, length, access, address=None):
            self.length, self.access = length, access
            self._mem = (ctypes.c_char * max(1, length))()
            self.buf = address if address is not None else ctypes.addressof(self._mem)
            self.lkey, self.rkey = next(keys), next(keys)
            fabric.mrs[self.rkey] = self

        def write(self, data, length, offset=0):
            ctypes.memmove(self.buf + offset, bytes(data), length)

        def read(self, length, offset):
            return ctypes.string_at(self.buf + offset, length)

        def close(self):
            fabric.mrs.pop(self.rkey, None)

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
            self.qp_type, self.scq, self.rcq, self.cap = qp_type, scq, rcq, cap

    class QPAttr:
        def __init__(self, qp_state=E.IBV_QPS_INIT, cur_qp_state=E.IBV_QPS_RESET):
            self.qp_state = qp_state

    class QP:
        def __init__(self, pd, init_attr, qp_attr=None):
            self.pd, self.attr = pd, init_attr
            self.qp_num = random.randrange(1, 1 << 24)
            self.qp_state = E.IBV_QPS_RESET
            fabric.qps[self.qp_num] = self

        def to_init(self, attr):
            if self.qp_state != E.IBV_QPS_RESET:
                raise PyverbsRDMAError("Failed to modify QP state to init", 22)
            self.access = attr.qp_access_flags
            self.qp_state = E.IBV_QPS_INIT

        def to_rtr(self, attr):
            if self.qp_state != E.IBV_QPS_INIT:
                raise PyverbsRDMAError("Failed to modify QP state to RTR", 22)
            if not attr.ah_attr.is_global or attr.ah_attr.grh.dgid.gid is None:
                raise PyverbsRDMAError("RoCE/IB GRH needed", 22)
            self.dest = attr.dest_qp_num
            self.qp_state = E.IBV_QPS_RTR

        def to_rts(self, attr):
            if self.qp_state != E.IBV_QPS_RTR:
                raise PyverbsRDMAError("Failed to modify QP state to RTS", 22)
            self.qp_state = E.IBV_QPS_RTS

        def post_send(self, wr, bad_wr=None):
            if self.qp_state != E.IBV_QPS_RTS:
                raise PyverbsRDMAError("Failed to post send", 22)
            fabric.log.append(wr.opcode)
            status = E.IBV_WC_SUCCESS
            peer = fabric.qps.get(self.dest)
            remote = fabric.mrs.get(wr.rkey)
            sge = wr.sg[0]
            need = E.IBV_ACCESS_REMOTE_WRITE if wr.opcode == E.IBV_WR_RDMA_WRITE else E.IBV_ACCESS_REMOTE_READ
            if peer is None:
                status = E.IBV_WC_RETRY_EXC_ERR
            elif remote is None or not remote.access & need or wr.remote_addr < remote.buf \
                    or wr.remote_addr + sge.length > remote.buf + remote.length:
                status = E.IBV_WC_REM_ACCESS_ERR
            elif wr.opcode == E.IBV_WR_RDMA_WRITE:
                ctypes.memmove(wr.remote_addr, sge.addr, sge.length)
            else:
                ctypes.memmove(sge.addr, wr.remote_addr, sge.length)
            self.attr.scq.q.append(types.SimpleNamespace(wr_id=wr.wr_id, status=status, opcode=wr.opcode,
                                                         byte_len=sge.length))

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
