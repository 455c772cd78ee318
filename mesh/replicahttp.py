"""An httpx client for model servers, each verified against its own pinned certificate (mesh/replicatls.py).

httpx takes its TLS settings per transport, not per request, and the replicas each have their own trust
anchor. One `httpx.AsyncClient` therefore carries a `PinnedTransport`, which keeps one pooled
`httpx.AsyncHTTPTransport` per (origin, certificate), made on the first request to it; a request names its
replica's certificate in the `gpumesh.pin` extension (`request_extensions`). Against one client per replica
this keeps the callers' code and lifetime as they were (one client, closed once), and against a single
transport that re-checks the certificate after the handshake it refuses a wrong server before the request
(prompt and key) is sent. The cost per request is one dict lookup (the PEM string's hash is cached); a
connection's handshake happens once, then the pool keeps it alive as before.

Pools end. httpcore drops expired connections only of the pool a request uses, and a server's port is
random, so the pool of a replica that is gone is never used again: without an end its idle connections
would sit in CLOSE_WAIT until the process ran out of descriptors. So a pool is closed when
- no request has used it for the keep-alive expiry (`sweep`: amortised over the requests, and called by an
  owner that has a periodic task; by then every connection it held has expired anyway),
- its owner says the replica is gone (`retain(endpoints)`: the gateway, from its view of the fleet),
- the same origin comes back with another certificate (its server restarted), or
- more than `max_pools` exist (the least recently used idle pool first).
Never under a request: each pool counts the requests that hold it (from the send until the response is
closed, as httpcore holds the connection), and a pool retired while held is closed by its last request.
Closing runs in a task of its own, so neither a request nor a synchronous caller (`retain` from a view
listener) waits on it.

The limits: `max_connections` bounds the requests (so the connections in use) of all pools together, by one
semaphore, waited on for at most the request's pool timeout as httpx would; each pool keeps at most
POOL_KEEPALIVE idle connections (a live replica's worth of keep-alive, against a churn of handshakes), and an
idle pool lives only as long as its connections would have.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

import httpx

from mesh import replicatls
from mesh.logs import log

logger = logging.getLogger(__name__)

PIN = "gpumesh.pin"
MAX_POOLS = 1024
POOL_KEEPALIVE = 64         # idle connections kept per replica's pool
IDLE_DEFAULT = 5.0          # a pool's idle life where the limits set no keep-alive expiry (httpx's default)


def request_extensions(certificate: str) -> dict[str, str]:
    """The request extensions that pin a request to `certificate` (none for a plain-HTTP replica)."""
    return {PIN: certificate} if certificate else {}


def origin(endpoint: str) -> bytes:
    """An endpoint ("host:port") as a request's `url.netloc` spells it (the pools' key)."""
    return httpx.URL(f"https://{endpoint}").netloc


class Pool:
    """One (origin, certificate)'s transport, with the requests holding it and when it was last let go."""

    __slots__ = ("transport", "held", "last_used", "retired")

    def __init__(self, transport: httpx.AsyncHTTPTransport) -> None:
        self.transport = transport
        self.held = 0
        self.last_used = time.monotonic()
        self.retired = False


class _Held(httpx.AsyncByteStream):
    """A response's body that lets go of its pool (and its connection slot) once, when closed."""

    def __init__(self, stream: httpx.AsyncByteStream, release: Callable[[], None]) -> None:
        self.stream, self.release = stream, release

    async def __aiter__(self):
        async for chunk in self.stream:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self.stream.aclose()
        finally:
            release, self.release = self.release, None
            if release is not None:
                release()


class PinnedTransport(httpx.AsyncBaseTransport):
    """`pins`: endpoint ("host:port") -> certificate, for requests without the extension (the benches, whose
    load generator sends to URLs only). `pools`: (origin, certificate) -> Pool, least recently used first."""

    def __init__(self, limits: httpx.Limits | None = None, max_pools: int = MAX_POOLS,
                 pins: dict[str, str] | None = None) -> None:
        self.limits = limits or httpx.Limits()
        self.pins = dict(pins or {})
        self.max_pools = max_pools
        expiry = self.limits.keepalive_expiry
        self.idle_after = IDLE_DEFAULT if expiry is None else expiry
        keep = self.limits.max_keepalive_connections
        keep = POOL_KEEPALIVE if keep is None else min(keep, POOL_KEEPALIVE)
        self.pool_limits = httpx.Limits(max_connections=self.limits.max_connections,
                                        max_keepalive_connections=keep, keepalive_expiry=expiry)
        self.plain = httpx.AsyncHTTPTransport(limits=self.limits, trust_env=False)
        self.pools: OrderedDict[tuple[bytes, str], Pool] = OrderedDict()
        n = self.limits.max_connections
        self._slots = asyncio.Semaphore(n) if n else None
        self._next_sweep = time.monotonic() + self.idle_after
        self._closing: list[httpx.AsyncHTTPTransport] = []
        self._closer: asyncio.Task | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        pem = request.extensions.get(PIN, "") or (self.pins.get(request.url.netloc.decode()) if self.pins else "")
        if not pem:
            if request.url.scheme != "http":
                raise httpx.UnsupportedProtocol(f"{request.url.scheme}://{request.url.host}: a replica without "
                                                "a pinned certificate is reached over plain http only")
        elif request.url.scheme != "https":
            raise httpx.UnsupportedProtocol(f"{request.url}: a pinned replica is reached over https only")
        await self._admit(request)
        pool = None
        try:
            # from here to the send nothing awaits: the pool is held before anything can retire it
            pool = self._pool((request.url.netloc, pem)) if pem else None
            if time.monotonic() >= self._next_sweep:
                self.sweep()
            if self._closing:
                self._close_later()
            response = await (pool.transport if pool else self.plain).handle_async_request(request)
        except BaseException:
            self._release(pool)
            raise
        response.stream = _Held(response.stream, lambda: self._release(pool))
        return response

    async def _admit(self, request: httpx.Request) -> None:
        """A slot of `max_connections`, all pools together; PoolTimeout after the request's pool timeout."""
        if self._slots is None:
            return
        if not self._slots.locked():
            await self._slots.acquire()
            return
        wait = (request.extensions.get("timeout") or {}).get("pool")
        try:
            await asyncio.wait_for(self._slots.acquire(), wait)
        except asyncio.TimeoutError:
            raise httpx.PoolTimeout(f"all {self.limits.max_connections} connections to the replicas are in use",
                                    request=request) from None

    def _release(self, pool: Pool | None) -> None:
        if self._slots is not None:
            self._slots.release()
        if pool is None:
            return
        pool.held -= 1
        pool.last_used = time.monotonic()
        if pool.retired and not pool.held:
            self._closing.append(pool.transport)
            self._close_later()

    def _pool(self, key: tuple[bytes, str]) -> Pool:
        """`key`'s pool, held (made on first use). A new one retires the origin's pools under another
        certificate (its server restarted) and, beyond `max_pools`, the least recently used idle ones.
        Synchronous: no other request can interleave between the lookup and the hold."""
        pool = self.pools.get(key)
        if pool is None:
            try:
                ctx = replicatls.context(key[1])
            except ValueError as e:         # TlsError: a record that is not a PEM certificate
                raise httpx.ConnectError(str(e)) from None
            stale = [k for k in self.pools if k[0] == key[0]]
            excess = len(self.pools) - len(stale) + 1 - self.max_pools
            for k, p in self.pools.items():
                if excess <= 0:
                    break
                if not p.held and k not in stale:
                    stale.append(k)
                    excess -= 1
            for k in stale:
                self._retire(k)
            pool = self.pools[key] = Pool(httpx.AsyncHTTPTransport(verify=ctx, limits=self.pool_limits,
                                                                    trust_env=False))
        else:
            self.pools.move_to_end(key)
        pool.held += 1
        return pool

    def _retire(self, key: tuple[bytes, str]) -> None:
        """Take `key`'s pool out: closed now if no request holds it, else by the last one (`_release`)."""
        pool = self.pools.pop(key)
        pool.retired = True
        if not pool.held:
            self._closing.append(pool.transport)
            self._close_later()

    def sweep(self) -> int:
        """Retire the pools no request has used for the keep-alive expiry; how many. Synchronous."""
        now = time.monotonic()
        self._next_sweep = now + max(self.idle_after / 2, 0.05)
        idle = [k for k, p in self.pools.items() if not p.held and now - p.last_used >= self.idle_after]
        for k in idle:
            self._retire(k)
        return len(idle)

    def retain(self, endpoints: Iterable[str]) -> int:
        """Retire the pools of every origin not among `endpoints` ("host:port", the live replicas'), and the
        idle ones (`sweep`); how many. Synchronous, for an owner's listener."""
        live = set()
        for e in endpoints:
            try:
                live.add(origin(e))
            except httpx.InvalidURL:
                continue
        gone = [k for k in self.pools if k[0] not in live]
        for k in gone:
            self._retire(k)
        if gone:
            log(logger, logging.DEBUG, "closing the connection pools of replicas that are gone", pools=len(gone))
        return len(gone) + self.sweep()

    def _close_later(self) -> None:
        """Close the retired pools in a task (none while no event loop runs: the next request's, or aclose)."""
        if self._closer is not None and not self._closer.done():
            return
        try:
            self._closer = asyncio.get_running_loop().create_task(self._close_retired())
        except RuntimeError:
            pass

    async def _close_retired(self) -> None:
        while self._closing:
            transport = self._closing.pop()
            try:
                await transport.aclose()
            except Exception as e:      # noqa: BLE001 - a socket that fails to close is gone either way
                log(logger, logging.WARNING, "closing a replica's connection pool failed", error=repr(e))

    async def aclose(self) -> None:
        pools, self.pools = list(self.pools.values()), OrderedDict()
        for p in pools:
            p.retired = False           # closed here, held or not: a late release has nothing left to close
        self._closing.extend(p.transport for p in pools)
        if self._closer is not None and not self._closer.done():
            await self._closer
        await self._close_retired()
        await self.plain.aclose()


def client(timeout: float | httpx.Timeout, limits: httpx.Limits | None = None,
           pins: dict[str, str] | None = None, transport: PinnedTransport | None = None) -> httpx.AsyncClient:
    """An AsyncClient for replicas: send each request with `extensions=request_extensions(certificate)` to
    `replicatls.base_url(endpoint, certificate)`. Proxies from the environment are not used (replicas are
    reached directly: a proxy would also need to be trusted with the traffic). `transport`: one the caller
    keeps, to tell it which replicas are live (`PinnedTransport.retain`)."""
    return httpx.AsyncClient(timeout=timeout, transport=transport or PinnedTransport(limits, pins=pins),
                             trust_env=False)
