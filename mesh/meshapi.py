"""The mesh part of the SDK: connect slices with registered buffers (MeshService).

    with MeshClient(endpoint) as mesh:
        conn = mesh.mesh_connect("s-a", "s-b", size_bytes=4 << 20)
        peer = mesh.mesh_open(conn, side="b")  # slice B's buffer, from slice A's side (the connection's secret;
                                               # for verbs: RDMA through A's agent)
        peer.write(0, payload); assert peer.read(0, len(payload)) == payload
        mesh.mesh_disconnect(conn.id)

    peer = mesh.mesh_open(conn, side="b", reconnect=True)  # rides through an agent restart (mesh.reconnect)

Mixed into `mesh.client.MeshClient`; errors are the typed `mesh.errors` ones
(PERMISSION_DENIED across tenants without a grant, NOT_FOUND, FAILED_PRECONDITION).
"""

from __future__ import annotations

import functools
import types
from typing import Any

from gpumesh.v1 import mesh_service_pb2 as M
from gpumesh.v1 import mesh_service_pb2_grpc


def _converting(fn):
    from mesh.client import _converting as conv
    return conv(fn)


class _client_optional:
    """A method that works on a client (`client.mesh_open(...)`) and on the class without one
    (`MeshApi.mesh_open(descriptor, ...)`: `self` is None)."""

    def __init__(self, fn) -> None:
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __get__(self, obj, owner=None):
        if obj is None:
            return functools.update_wrapper(functools.partial(self.fn, None), self.fn)
        return types.MethodType(self.fn, obj)


class MeshApi:
    _channel: Any
    timeout: float

    @property
    def _meshsvc(self) -> mesh_service_pb2_grpc.MeshServiceStub:
        stub = self.__dict__.get("_mesh_stub")
        if stub is None:
            stub = self.__dict__["_mesh_stub"] = mesh_service_pb2_grpc.MeshServiceStub(self._channel)
        return stub

    def mesh_connect(self, slice_a: str, slice_b: str, size_bytes: int, transport: str = "") -> M.MeshConnection:
        """Register a buffer of `size_bytes` for each slice and connect them (transport from the topology)."""
        return _converting(self._meshsvc.Connect)(M.MeshConnectRequest(
            slice_a=slice_a, slice_b=slice_b, size_bytes=size_bytes, transport=transport), timeout=self.timeout)

    def mesh_get(self, id: str, timeout: float | None = None) -> M.MeshConnection:
        return _converting(self._meshsvc.Get)(M.GetMeshConnectionRequest(id=id),
                                              timeout=self.timeout if timeout is None else timeout)

    def mesh_list(self, tenant: str = "", slice_id: str = "") -> list[M.MeshConnection]:
        resp = _converting(self._meshsvc.List)(M.ListMeshConnectionsRequest(tenant=tenant, slice_id=slice_id),
                                               timeout=self.timeout)
        return list(resp.connections)

    def mesh_disconnect(self, id: str) -> M.MeshConnection:
        """Revoke both buffers (their keys stop working) and forget the connection."""
        return _converting(self._meshsvc.Disconnect)(M.DisconnectMeshRequest(id=id), timeout=self.timeout)

    def mesh_grant(self, from_tenant: str, to_tenant: str, revoke: bool = False) -> M.MeshGrant:
        """Admin: let slices of `from_tenant` connect to slices of `to_tenant` (or withdraw it)."""
        return _converting(self._meshsvc.Grant)(M.MeshGrantRequest(
            from_tenant=from_tenant, to_tenant=to_tenant, revoke=revoke), timeout=self.timeout)

    def mesh_grants(self) -> list[M.MeshGrant]:
        return list(_converting(self._meshsvc.ListGrants)(M.ListMeshGrantsRequest(), timeout=self.timeout).grants)

    @_client_optional
    def mesh_open(self, target, fallback: bool = True, *, side: str = "", secret: bytes = b"", local=None,
                  reconnect: bool = False, recover_timeout: float = 60.0):
        """A data-plane connection (`mesh.transport.base.Connection`).

        `target` is a MeshConnection and `side` "a" or "b" (the buffer to open; the other side is the
        caller's own, through which a verbs peer is reached by RDMA; the connection's secret is used),
        or a buffer descriptor (proto or dataclass) with the connection's `secret` and, for a verbs
        peer, `local` (the caller's own descriptor).

        `reconnect=True` (a MeshConnection and a client: `mesh.mesh_open(conn, side="b", reconnect=True)`):
        a `mesh.reconnect.ReconnectingConnection` that rides through a recovery of the connection (an agent
        restart): on PeerGone it waits, polling `mesh_get`, up to `recover_timeout` seconds for the connection
        to be READY again, reopens it with the new descriptors and retries the operation once (a send only
        when it cannot have been delivered; see the module). Also callable on the class (no client) for
        `reconnect=False`."""
        if reconnect:
            if not isinstance(target, M.MeshConnection):
                raise ValueError("target: reconnect=True needs the MeshConnection (from mesh_connect or mesh_get), "
                                 "not a bare descriptor: the connection is fetched again by its id")
            if self is None:
                raise ValueError("reconnect=True needs a client to fetch the connection (client.mesh_open(...)), "
                                 "or use mesh.reconnect.ReconnectingConnection(conn, side, get=...)")
            from mesh.reconnect import ReconnectingConnection
            if side not in ("a", "b"):
                raise ValueError(f"side: {side!r} is not 'a' or 'b' (the buffer of the connection to open)")
            # each poll's own deadline within the wait's (the client's timeout could be longer)
            poll = min(self.timeout, recover_timeout) if self.timeout else recover_timeout
            return ReconnectingConnection(target, side, get=lambda cid: self.mesh_get(cid, timeout=poll),
                                          recover_timeout=recover_timeout, secret=secret,
                                          open=lambda c, s, sec: open_connection(c, fallback, side=s, secret=sec))
        return open_connection(target, fallback, side=side, secret=secret, local=local)


def open_connection(target, fallback: bool = True, *, side: str = "", secret: bytes = b"", local=None):
    """What `mesh_open` does without `reconnect` (see there)."""
    from mesh.transport import connect
    from mesh.transport.base import BufferDescriptor
    if isinstance(target, M.MeshConnection):
        if side not in ("a", "b"):
            raise ValueError(f"side: {side!r} is not 'a' or 'b' (the buffer of the connection to open)")
        secret = secret or target.secret
        local = target.b if side == "a" else target.a
        target = target.a if side == "a" else target.b
    if not isinstance(target, BufferDescriptor):
        target = BufferDescriptor.from_proto(target)
    if local is not None and not isinstance(local, BufferDescriptor):
        local = BufferDescriptor.from_proto(local)
    return connect(target, fallback=fallback, secret=secret, local=local)


def connection_state_name(value: int) -> str:
    from mesh.client import enum_name
    return enum_name(M.MeshConnectionState, value, "MESH_CONNECTION_STATE_")


def descriptor_to_dict(d: M.BufferDescriptor) -> dict[str, Any]:
    out = {"buffer_id": d.buffer_id, "slice_id": d.slice_id, "node": d.node, "transport": d.transport,
           "address": d.address, "length": d.length, "rkey": d.rkey, "endpoint": d.endpoint}
    if d.shm_name:
        out["shm_name"] = d.shm_name
    if d.tls_sha256:
        out["tls_sha256"] = d.tls_sha256.hex()
    if d.qp_num:
        out.update(gid=d.gid.decode(errors="replace"), lid=d.lid, qp_num=d.qp_num, psn=d.psn, device=d.device,
                   port=d.port, lkey=d.lkey)
    return out


def connection_to_dict(c: M.MeshConnection) -> dict[str, Any]:
    from mesh.client import timestamp
    return {"id": c.id, "tenant": c.tenant, "transport": c.transport, "reason": c.reason,
            "data_path": c.data_path, "fallback_reason": c.fallback_reason,
            "secret": "(held: returned to the SDK, not printed)" if c.secret else "",
            "state": connection_state_name(c.state), "slice_a": c.slice_a, "slice_b": c.slice_b,
            "size_bytes": c.size_bytes, "message": c.message, "created_at": timestamp(c, "created_at"),
            "a": descriptor_to_dict(c.a), "b": descriptor_to_dict(c.b)}


def grant_to_dict(g: M.MeshGrant) -> dict[str, Any]:
    from mesh.client import timestamp
    return {"from_tenant": g.from_tenant, "to_tenant": g.to_tenant, "created_at": timestamp(g, "created_at")}
