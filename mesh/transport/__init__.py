"""The mesh data plane: registered buffers between slices (see `base` for the interface).

    from mesh.transport import connect
    conn = connect(descriptor)          # picks the transport the descriptor names
    conn.write(0, payload); conn.read(0, len(payload))

`connect` falls back to the agent's TCP data plane when the named transport
cannot be used from this process (a shm segment of another host, no CUDA);
never for verbs: a verbs peer is reached by RDMA through the caller's own agent.
"""

from __future__ import annotations

from mesh.transport.base import (BufferDamaged, BufferDescriptor, Connection, InvalidKey, NotAuthorized, OutOfBounds,
                                 PeerGone, QueuePairError, Revoked, Transport, TransportError, Unsupported)


def connect(descriptor: BufferDescriptor, *, fallback: bool = True, secret: bytes = b"",
            local: BufferDescriptor | None = None) -> Connection:
    """A connection to `descriptor` over its transport.

    `secret`: the mesh connection's secret (MeshConnection.secret), which the data plane and shm
    segments of brokered buffers require. `local`: the caller's own buffer of the same connection;
    a verbs peer is reached through it (RDMA WRITE/READ posted by the caller's agent on the queue
    pair it keeps). A shm segment of another host, or CUDA without a GPU, falls back to the owner's
    TCP data plane when `fallback`; a verbs peer never does (its bytes move by RDMA or not at all)."""
    kind = descriptor.transport
    try:
        if kind == "verbs":
            if local is not None and local.buffer_id != descriptor.buffer_id and _on_this_host(local):
                if local.transport != "verbs":
                    raise Unsupported(f"buffer {local.buffer_id} is not a verbs buffer", op="connect",
                                      buffer_id=descriptor.buffer_id, transport="verbs")
                from mesh.transport.tcp import RdmaConnection
                return RdmaConnection(descriptor, local, secret=secret)
            from mesh.transport.shm import ShmConnection      # the caller's own buffer (it is shm-backed)
            try:
                return ShmConnection(descriptor, secret)
            except Revoked:
                if local is None:
                    raise Unsupported(f"buffer {descriptor.buffer_id} is on node {descriptor.node} and registered "
                                      f"for RDMA: open it with your own buffer of the connection (mesh_open(conn, "
                                      f"side=...) or connect(..., local=mine))", op="connect",
                                      buffer_id=descriptor.buffer_id, transport="verbs") from None
                raise
        if kind == "shm":
            from mesh.transport.shm import ShmConnection
            return ShmConnection(descriptor, secret)
        if kind == "cuda_ipc":
            from mesh.transport.cuda_ipc import CudaIpcConnection
            return CudaIpcConnection(descriptor)
    except (Unsupported, Revoked) as e:
        if kind == "verbs" or not (fallback and descriptor.endpoint) or (isinstance(e, Revoked) and kind != "shm"):
            raise
    from mesh.transport.tcp import TcpConnection
    return TcpConnection(descriptor, secret=secret)


def _on_this_host(d: BufferDescriptor) -> bool:
    """Whether a registered buffer's shared memory segment is visible here (the caller's own buffer)."""
    import os
    return bool(d.shm_name) and "/" not in d.shm_name and os.path.exists(os.path.join("/dev/shm", d.shm_name))


def mesh_is_faster(size_bytes: int, mesh_mb_per_s: float, stream_mb_per_s: float,
                   mesh_setup_s: float = 0.05) -> bool:
    """For migration: move `size_bytes` over the mesh (setup + transfer) or the gRPC stream?"""
    if mesh_mb_per_s <= 0:
        return False
    mb = size_bytes / 1e6
    return mesh_setup_s + mb / mesh_mb_per_s < mb / max(stream_mb_per_s, 1e-9)


__all__ = ["BufferDamaged", "BufferDescriptor", "Connection", "Transport", "TransportError", "InvalidKey",
           "OutOfBounds", "Revoked", "PeerGone", "Unsupported", "NotAuthorized", "QueuePairError", "connect",
           "mesh_is_faster"]
