"""The mesh data plane: registered buffers between slices (see `base` for the interface).

    from mesh.transport import connect
    conn = connect(descriptor)          # picks the transport the descriptor names
    conn.write(0, payload); conn.read(0, len(payload))

`connect` falls back to the agent's TCP data plane when the named transport
cannot be used from this process (a shm segment of another host, no CUDA).
"""

from __future__ import annotations

from mesh.transport.base import (BufferDescriptor, Connection, InvalidKey, OutOfBounds, PeerGone, Revoked,
                                 Transport, TransportError, Unsupported)


def connect(descriptor: BufferDescriptor, *, fallback: bool = True) -> Connection:
    """A connection to `descriptor` over its transport (tcp when that is impossible here and `fallback`)."""
    kind = descriptor.transport
    try:
        if kind == "shm":
            from mesh.transport.shm import ShmConnection
            return ShmConnection(descriptor)
        if kind == "cuda_ipc":
            from mesh.transport.cuda_ipc import CudaIpcConnection
            return CudaIpcConnection(descriptor)
        if kind == "verbs":
            raise Unsupported("verbs connections are made by the agents that own the queue pairs",
                              op="connect", buffer_id=descriptor.buffer_id, transport="verbs")
    except (Unsupported, Revoked) as e:
        if not (fallback and descriptor.endpoint) or (isinstance(e, Revoked) and kind != "shm"):
            raise
    from mesh.transport.tcp import TcpConnection
    return TcpConnection(descriptor)


def mesh_is_faster(size_bytes: int, mesh_mb_per_s: float, stream_mb_per_s: float,
                   mesh_setup_s: float = 0.05) -> bool:
    """For migration: move `size_bytes` over the mesh (setup + transfer) or the gRPC stream?"""
    if mesh_mb_per_s <= 0:
        return False
    mb = size_bytes / 1e6
    return mesh_setup_s + mb / mesh_mb_per_s < mb / max(stream_mb_per_s, 1e-9)


__all__ = ["BufferDescriptor", "Connection", "Transport", "TransportError", "InvalidKey", "OutOfBounds",
           "Revoked", "PeerGone", "Unsupported", "connect", "mesh_is_faster"]
