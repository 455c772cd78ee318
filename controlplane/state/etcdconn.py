"""The connection of one control-plane process to etcd: one `aetcd` client per endpoint, used one at a time.

An error that says the member cannot serve (unreachable, or cut off from the quorum: "no leader", see
etcdtls.REQUIRE_LEADER) moves the calls to come on to the next endpoint (`failover`). (One channel over every
member, "ipv4:A:1,B:2", took host names not at all, and stayed on a member that was reachable but had no leader.)
The connection also keeps the highest etcd revision any answer carried (`revision`).
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse

import aetcd
import aetcd.exceptions
import grpc

log = logging.getLogger("controlplane.state.store")

ETCD_ERRORS = (aetcd.exceptions.ClientError, OSError, asyncio.TimeoutError)


def parse_endpoint(url: str) -> tuple[str, int]:
    """(host, port) of an etcd endpoint URL, the host as a gRPC target takes it (an IPv6 address bracketed:
    the client dials f"{host}:{port}")."""
    u = urllib.parse.urlparse(url if "://" in url else "http://" + url)
    try:
        port = u.port
    except ValueError:
        port = None
    if not u.hostname or not port:
        raise ValueError(f"etcd endpoint {url!r} is not http://HOST:PORT")
    return (f"[{u.hostname}]" if ":" in u.hostname else u.hostname), port


class EtcdConnection:
    def __init__(self, endpoints: list[str], timeout: float = 10.0, *, credentials=None,
                 username: str | None = None, password: str | None = None) -> None:
        """`credentials` (grpc channel credentials, see controlplane.state.etcdtls) for https:// endpoints;
        `username`/`password` for etcd auth."""
        if not endpoints:
            raise ValueError("etcd endpoints: at least one is needed")
        self.endpoints = endpoints
        self._targets = [parse_endpoint(e) for e in endpoints]
        self._client_args = dict(timeout=timeout, credentials=credentials, username=username or None,
                                 password=password or None, options={
                                     "grpc.max_receive_message_length": 64 << 20,
                                     "grpc.keepalive_time_ms": 10_000})
        self._clients: dict = {}
        self._at = 0
        self.client = self._client(0)
        self.revision = 0          # the highest etcd revision any answer to this process carried

    def note(self, revision: int) -> None:
        """An answer carried `revision`."""
        self.revision = max(self.revision, revision)

    async def connect(self) -> None:
        await self.call(lambda c: c.connect())

    async def member_versions(self) -> dict[str, str]:
        """The etcd version each endpoint's member reports ("" for one that does not answer now)."""
        out = {}
        for i, ep in enumerate(self.endpoints):
            client = self._client(i)
            try:
                await client.connect()
                resp = await client.maintenancestub.Status(aetcd.rpc.StatusRequest(), timeout=min(client._timeout, 3),
                                                           metadata=client.metadata)
                out[ep] = resp.version
            except Exception:  # noqa: BLE001 - a member down now: its version is unknown, not an error
                out[ep] = ""
        return out

    async def close(self) -> None:
        for client in self._clients.values():
            try:
                await client.close()
            except ETCD_ERRORS:
                pass

    def _client(self, i: int):
        client = self._clients.get(i)
        if client is None:
            from controlplane.state.etcdtls import TlsClient
            host, port = self._targets[i]
            client = self._clients[i] = TlsClient(host=host, port=port, **self._client_args)
        return client

    def failover(self, client, e: BaseException) -> None:
        """After `client` failed to reach etcd: the next endpoint serves the calls to come (unless another call
        moved on from `client` already)."""
        if len(self._targets) < 2 or client is not self.client or not unreachable(e):
            return
        self._at = (self._at + 1) % len(self._targets)
        self.client = self._client(self._at)
        log.warning("etcd endpoint unreachable; trying the next", extra={"fields": {
            "error": repr(e), "next": "%s:%s" % self._targets[self._at]}})

    async def call(self, fn):
        """`await fn(client)` at the current endpoint; when it cannot be reached, again at each other one."""
        for tried in range(len(self._targets)):
            client = self.client
            try:
                return await fn(client)
            except Exception as e:  # noqa: BLE001 - re-raised unless another endpoint is tried
                self.failover(client, e)
                if self.client is client or tried == len(self._targets) - 1:
                    raise

    async def range(self, key: bytes, revision: int = 0):
        """The key's KeyValue (at `revision`, 0: now), or None; notes the answer's revision."""
        async def rng(c):
            await c.connect()
            return await c.kvstub.Range(aetcd.rpc.RangeRequest(key=key, revision=revision), timeout=c._timeout,
                                        metadata=c.metadata)
        resp = await self.call(rng)
        self.note(resp.header.revision)
        return (resp.kvs[0] if resp.kvs else None), resp.header.revision

    async def revoke_lease(self, lease_id: int) -> None:
        """Revoke a lease, best effort (etcd unreachable: it expires at its TTL)."""
        try:
            await self.call(lambda c: c.revoke_lease(lease_id))
        except ETCD_ERRORS:
            pass


def unreachable(e: BaseException) -> bool:
    """An error that says the endpoint could not be reached (not an answer of etcd's)."""
    if isinstance(e, (aetcd.exceptions.ConnectionFailedError, aetcd.exceptions.ConnectionTimeoutError,
                      aetcd.exceptions.WatchTimeoutError, OSError, asyncio.TimeoutError)):
        return True
    code = getattr(e, "code", None)
    return callable(code) and code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
