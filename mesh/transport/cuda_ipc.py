"""CUDA IPC through torch: a slice's device buffer mapped into a peer process on the same host.

Registration allocates (or takes) a uint8 CUDA tensor and exports its storage's
IPC handle (`UntypedStorage._share_cuda_()`); the descriptor carries the handle,
pickled. A peer on the same host opens it with `UntypedStorage._new_shared_cuda`
and reads and writes with device copies. Without torch or CUDA, `available()`
says why and the transport raises `Unsupported`.
"""

from __future__ import annotations

import pickle
import secrets

from mesh.transport.base import BufferDescriptor, Revoked, Unsupported, check_bounds, new_key


def available() -> tuple[bool, str]:
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if not torch.cuda.is_available():
        return False, "CUDA is not available (no GPU or no CUDA build of torch)"
    return True, ""


def _torch():
    ok, why = available()
    if not ok:
        raise Unsupported(why, op="open", transport="cuda_ipc")
    import torch
    return torch


class CudaIpcConnection:
    def __init__(self, descriptor: BufferDescriptor, local=None) -> None:
        """`local`: the registered tensor itself when the peer is this process (CUDA refuses to open
        a process's own IPC handle: cudaErrorDeviceUninitialized, "invalid device context")."""
        torch = _torch()
        self.descriptor = descriptor
        if local is not None:
            self.tensor = local.view(torch.uint8).reshape(-1)
        else:
            torch.cuda.init()  # opening a handle in a process that has not touched CUDA yet segfaults
            storage = torch.UntypedStorage._new_shared_cuda(*pickle.loads(descriptor.ipc_handle))
            self.tensor = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
        self.torch = torch

    def write(self, offset: int, data) -> int:
        mv = memoryview(data).cast("B")
        check_bounds("write", self.descriptor.buffer_id, offset, mv.nbytes, self.descriptor.length)
        if self.tensor is None:
            raise Revoked("connection closed", op="write", buffer_id=self.descriptor.buffer_id)
        src = data if isinstance(data, self.torch.Tensor) else self.torch.frombuffer(bytearray(mv), dtype=self.torch.uint8)
        self.tensor[offset:offset + mv.nbytes].copy_(src)
        self.torch.cuda.synchronize(self.tensor.device)
        return mv.nbytes

    def read(self, offset: int, length: int, into=None):
        check_bounds("read", self.descriptor.buffer_id, offset, length, self.descriptor.length)
        out = self.tensor[offset:offset + length].cpu().numpy().tobytes()
        if into is not None:
            memoryview(into).cast("B")[:length] = out
            return into
        return out

    def send(self, data) -> int:
        raise Unsupported("cuda_ipc is one-sided; use the agent's data plane for messages", op="send",
                          transport="cuda_ipc")

    recv = send

    def close(self) -> None:
        self.tensor = None


class CudaIpcTransport:
    name = "cuda_ipc"

    def __init__(self, node: str = "", device: int = 0) -> None:
        self.node, self.device = node, device
        self.buffers: dict[str, object] = {}

    def register(self, slice_id: str, size: int = 0, buffer=None, buffer_id: str = "",
                 rkey: int = 0) -> BufferDescriptor:
        torch = _torch()
        tensor = buffer if buffer is not None else torch.zeros(size, dtype=torch.uint8, device=f"cuda:{self.device}")
        bid = buffer_id or f"b-{secrets.token_hex(6)}"
        handle = tensor.untyped_storage()._share_cuda_()
        self.buffers[bid] = tensor
        return BufferDescriptor(buffer_id=bid, slice_id=slice_id, node=self.node, transport="cuda_ipc",
                                address=int(tensor.data_ptr()), length=tensor.numel() * tensor.element_size(),
                                rkey=rkey or new_key(), ipc_handle=pickle.dumps(handle))

    def deregister(self, buffer_id: str) -> None:
        self.buffers.pop(buffer_id, None)

    def connect(self, descriptor: BufferDescriptor) -> CudaIpcConnection:
        return CudaIpcConnection(descriptor, local=self.buffers.get(descriptor.buffer_id))

    def close(self) -> None:
        self.buffers.clear()
