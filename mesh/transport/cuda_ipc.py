"""CUDA IPC through torch: a slice's device buffer mapped into a peer process on the same host.

Registration allocates (or takes) a uint8 CUDA tensor and exports its storage's
IPC handle (`UntypedStorage._share_cuda_()`); the descriptor carries the handle
as data: JSON with the byte strings in base64 (`encode_handle`), never a
pickle, and a peer decodes it strictly (`decode_handle`: exact keys, types and
sizes; anything else is refused with `InvalidDescriptor` before torch is
touched). A peer on the same host opens it with `UntypedStorage._new_shared_cuda`
and reads and writes with device copies. Without torch or CUDA, `available()`
says why and the transport raises `Unsupported`. Connections are brokered by
the control plane like the other transports (`meshctl mesh connect --transport
cuda_ipc`: same node, tenant scope and grants).
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
from dataclasses import dataclass

from mesh.transport.base import BufferDescriptor, Revoked, TransportError, Unsupported, check_bounds, new_key

MAX_HANDLE_JSON = 4096
MAX_BLOB = 256        # cudaIpcMemHandle_t / cudaIpcEventHandle_t are 64 bytes; the ref counter a file name
HANDLE_FIELDS = {"v": int, "device": int, "handle": str, "size": int, "offset": int, "ref_counter_handle": str,
                 "ref_counter_offset": int, "event_handle": str, "event_sync_required": bool}


@dataclass
class InvalidDescriptor(TransportError):
    """A descriptor field is not what the transport accepts (named in `field`)."""

    field: str = ""


def encode_handle(handle: tuple) -> bytes:
    """torch's `_share_cuda_()` tuple (device, handle, size, offset, ref_counter_handle,
    ref_counter_offset, event_handle, event_sync_required) as JSON data."""
    device, h, size, offset, ref, ref_off, event, sync = handle
    b64 = lambda b: base64.b64encode(bytes(b or b"")).decode()    # noqa: E731
    return json.dumps({"v": 1, "device": int(device), "handle": b64(h), "size": int(size), "offset": int(offset),
                       "ref_counter_handle": b64(ref), "ref_counter_offset": int(ref_off), "event_handle": b64(event),
                       "event_sync_required": bool(sync)}, sort_keys=True).encode()


def decode_handle(data: bytes, buffer_id: str = "") -> tuple:
    """The tuple for `UntypedStorage._new_shared_cuda`, from `encode_handle`'s JSON; InvalidDescriptor
    naming the field for anything else (a pickle, other keys, wrong types, oversized blobs)."""
    def bad(field: str, why: str) -> InvalidDescriptor:
        return InvalidDescriptor(f"ipc_handle of buffer {buffer_id or '?'}: {field} {why}", op="connect",
                                 buffer_id=buffer_id, field=f"ipc_handle.{field}" if field else "ipc_handle")
    if not data or len(data) > MAX_HANDLE_JSON:
        raise bad("", f"must be 1 to {MAX_HANDLE_JSON} bytes of JSON")
    try:
        doc = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise bad("", "is not UTF-8 JSON (a CUDA IPC handle is data, never a pickle)") from None
    if not isinstance(doc, dict) or set(doc) != set(HANDLE_FIELDS):
        raise bad("", f"must be an object with exactly the keys {', '.join(sorted(HANDLE_FIELDS))}")
    for k, t in HANDLE_FIELDS.items():
        if type(doc[k]) is not t:        # bool is not an int here, and an int not a bool
            raise bad(k, f"must be a {t.__name__}")
    if doc["v"] != 1:
        raise bad("v", "must be 1")
    for k in ("device", "size", "offset", "ref_counter_offset"):
        if not 0 <= doc[k] < 1 << 62:
            raise bad(k, "is out of range")
    blobs = {}
    for k in ("handle", "ref_counter_handle", "event_handle"):
        try:
            blobs[k] = base64.b64decode(doc[k], validate=True)
        except (binascii.Error, ValueError):
            raise bad(k, "is not base64") from None
        if len(blobs[k]) > MAX_BLOB:
            raise bad(k, f"is over {MAX_BLOB} bytes")
    return (doc["device"], blobs["handle"], doc["size"], doc["offset"], blobs["ref_counter_handle"],
            doc["ref_counter_offset"], blobs["event_handle"], doc["event_sync_required"])


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
        self.descriptor = descriptor
        handle = decode_handle(descriptor.ipc_handle, descriptor.buffer_id) if local is None else None
        torch = _torch()
        if local is not None:
            self.tensor = local.view(torch.uint8).reshape(-1)
        else:
            torch.cuda.init()  # opening a handle in a process that has not touched CUDA yet segfaults
            storage = torch.UntypedStorage._new_shared_cuda(*handle)
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
                                rkey=rkey or new_key(), ipc_handle=encode_handle(handle))

    def deregister(self, buffer_id: str) -> None:
        self.buffers.pop(buffer_id, None)

    def connect(self, descriptor: BufferDescriptor) -> CudaIpcConnection:
        return CudaIpcConnection(descriptor, local=self.buffers.get(descriptor.buffer_id))

    def close(self) -> None:
        self.buffers.clear()
