"""The transport interface of the mesh: registered buffers, descriptors, connections, typed errors.

A *buffer* is registered for a slice and gets a `BufferDescriptor` (address,
length, keys, node, transport) that a peer needs to address it. A peer
`connect`s to a descriptor and gets a `Connection` with one-sided `write` and
`read` at offsets (like RDMA WRITE/READ: the owner's CPU does not take part)
and two-sided `send` / `recv`. Every operation completes before it returns:
the return value is the completion (bytes moved), a failure raises one of the
typed errors below with the fields that explain it. Deregistering a buffer
revokes its keys: later operations with them fail with `Revoked`.
"""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

TRANSPORTS = ("tcp", "shm", "verbs", "cuda_ipc")
MAX_BUFFER_BYTES = 4 << 30


# -- errors -------------------------------------------------------------------------------

@dataclass
class TransportError(Exception):
    """A data-plane operation failed. `op` is write/read/send/recv/register/connect."""

    message: str
    op: str = ""
    buffer_id: str = ""

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


@dataclass
class InvalidKey(TransportError):
    """The rkey does not name a registered region (wrong or forged key)."""

    rkey: int = 0


@dataclass
class OutOfBounds(TransportError):
    """[offset, offset+length) is not inside the region; nothing was written or read."""

    offset: int = 0
    length: int = 0
    region_length: int = 0


@dataclass
class Revoked(TransportError):
    """The region was deregistered (disconnect, or its slice released): its keys are dead."""


@dataclass
class PeerGone(TransportError):
    """The peer's data plane cannot be reached or went away mid-operation."""

    endpoint: str = ""


@dataclass
class Unsupported(TransportError):
    """This transport cannot be used here (no RDMA device, no CUDA, another host's shm...)."""

    transport: str = ""


@dataclass
class QueuePairError(TransportError):
    """An RDMA queue pair cannot be used: it is in the error state after a failed work request, or it is
    connected to another peer (an RC QP is never silently reused). Disconnect and connect again."""

    transport: str = "verbs"


@dataclass
class NotAuthorized(TransportError):
    """The data plane refused the caller: no or a wrong per-connection secret, TLS required, or a
    key of another connection than the one this channel authenticated for."""


@dataclass
class BufferDamaged(TransportError):
    """The buffer's shared memory segment was shrunk (`ftruncate`) or its header overwritten by a process
    that maps it (its slice's workload: the segment is the tenant's file). Its memory is no longer what was
    registered: the buffer fails, nothing was moved; the agent and every other buffer go on. Disconnect and
    connect again. `size`: the segment's size when it was seen (bytes, header included); `expected`: what the
    buffer needs; `reason`: "shrunk" or "header"."""

    size: int = 0
    expected: int = 0
    reason: str = ""


ERROR_KINDS: dict[str, type[TransportError]] = {
    "transport": TransportError, "invalid_key": InvalidKey, "out_of_bounds": OutOfBounds,
    "revoked": Revoked, "peer_gone": PeerGone, "unsupported": Unsupported,
    "queue_pair": QueuePairError, "not_authorized": NotAuthorized, "damaged": BufferDamaged}


def check_bounds(op: str, buffer_id: str, offset: int, length: int, region_length: int) -> None:
    if offset < 0 or length < 0 or offset + length > region_length:
        raise OutOfBounds(f"{op} of {length} bytes at offset {offset} is outside buffer {buffer_id or '?'} "
                          f"of {region_length} bytes", op=op, buffer_id=buffer_id, offset=offset, length=length,
                          region_length=region_length)


@dataclass
class Completion:
    """The outcome of a posted operation (like an RDMA work completion): `error` is None on success."""

    wr_id: int
    op: str
    length: int = 0
    error: TransportError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


# -- descriptors --------------------------------------------------------------------------

def new_key() -> int:
    """A 64-bit remote key (never 0: 0 means "no key")."""
    return secrets.randbits(63) | 1


@dataclass
class BufferDescriptor:
    """What a peer needs to address a registered buffer (mirrors gpumesh.v1.BufferDescriptor)."""

    buffer_id: str
    slice_id: str
    node: str
    transport: str
    address: int = 0
    length: int = 0
    rkey: int = 0
    lkey: int = 0
    endpoint: str = ""
    shm_name: str = ""
    gid: bytes = b""
    lid: int = 0
    qp_num: int = 0
    psn: int = 0
    device: str = ""
    port: int = 0
    ipc_handle: bytes = b""
    tls_sha256: bytes = b""

    def to_proto(self):
        from gpumesh.v1 import mesh_service_pb2
        return mesh_service_pb2.BufferDescriptor(**dataclasses.asdict(self))

    @classmethod
    def from_proto(cls, msg) -> "BufferDescriptor":
        return cls(**{f.name: getattr(msg, f.name) for f in dataclasses.fields(cls)})

    def with_transport(self, transport: str) -> "BufferDescriptor":
        return dataclasses.replace(self, transport=transport)


# -- protocols ----------------------------------------------------------------------------

@runtime_checkable
class Connection(Protocol):
    """A peer's view of one remote buffer."""

    descriptor: BufferDescriptor

    def write(self, offset: int, data) -> int:
        """One-sided write of `data` (bytes-like) at `offset`; the bytes written."""

    def read(self, offset: int, length: int, into=None):
        """One-sided read; returns the bytes (or fills the writable buffer `into` and returns it)."""

    def send(self, data) -> int:
        """Two-sided: queue a message for the buffer's owner."""

    def recv(self, timeout: float = 0.0) -> bytes | None:
        """Two-sided: the next message queued for this buffer (None when none came in `timeout`)."""

    def close(self) -> None: ...


@runtime_checkable
class Transport(Protocol):
    """Registers local buffers and connects to remote ones."""

    name: str

    def register(self, slice_id: str, size: int = 0, buffer=None) -> BufferDescriptor:
        """A new buffer of `size` bytes, or an existing host/device buffer, for `slice_id`."""

    def deregister(self, buffer_id: str) -> None:
        """Revoke the buffer's keys and free it. Idempotent."""

    def connect(self, descriptor: BufferDescriptor) -> Connection: ...

    def close(self) -> None: ...
