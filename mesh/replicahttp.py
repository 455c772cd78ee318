"""An httpx client for model servers, each verified against its own pinned certificate (mesh/replicatls.py).

httpx takes its TLS settings per transport, not per request, and the replicas each have their own trust
anchor. One `httpx.AsyncClient` therefore carries a `PinnedTransport`, which keeps one pooled
`httpx.AsyncHTTPTransport` per (origin, certificate), made on the first request to it; a request names its
replica's certificate in the `gpumesh.pin` extension (`request_extensions`). Against one client per replica
this keeps the callers' code and lifetime as they were (one client, closed once), and against a single
transport that re-checks the certificate after the handshake it refuses a wrong server before the request
(prompt and key) is sent. The cost per request is one dict lookup (the PEM string's hash is cached); a
connection's handshake happens once, then the pool keeps it alive as before.

A replica whose server restarted comes back with a new certificate (and port): its first request opens a
new pool, and the pools of the same origin under an older certificate are closed. The pools are bounded
(least recently used closed first).
"""

from __future__ import annotations

from collections import OrderedDict

import httpx

from mesh import replicatls

PIN = "gpumesh.pin"
MAX_POOLS = 1024


def request_extensions(certificate: str) -> dict[str, str]:
    """The request extensions that pin a request to `certificate` (none for a plain-HTTP replica)."""
    return {PIN: certificate} if certificate else {}


class PinnedTransport(httpx.AsyncBaseTransport):
    """`pins`: endpoint ("host:port") -> certificate, for requests without the extension (the benches, whose
    load generator sends to URLs only)."""

    def __init__(self, limits: httpx.Limits | None = None, max_pools: int = MAX_POOLS,
                 pins: dict[str, str] | None = None) -> None:
        self.limits = limits or httpx.Limits()
        self.pins = dict(pins or {})
        self.max_pools = max_pools
        self.plain = httpx.AsyncHTTPTransport(limits=self.limits, trust_env=False)
        self.pools: OrderedDict[tuple[bytes, str], httpx.AsyncHTTPTransport] = OrderedDict()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        pem = request.extensions.get(PIN, "") or (self.pins.get(request.url.netloc.decode()) if self.pins else "")
        if not pem:
            if request.url.scheme != "http":
                raise httpx.UnsupportedProtocol(f"{request.url.scheme}://{request.url.host}: a replica without "
                                                "a pinned certificate is reached over plain http only")
            return await self.plain.handle_async_request(request)
        if request.url.scheme != "https":
            raise httpx.UnsupportedProtocol(f"{request.url}: a pinned replica is reached over https only")
        key = (request.url.netloc, pem)
        pool = self.pools.get(key)
        if pool is None:
            pool, stale = self._open(key)
            for old in stale:
                await old.aclose()
        else:
            self.pools.move_to_end(key)
        return await pool.handle_async_request(request)

    def _open(self, key: tuple[bytes, str]) -> tuple[httpx.AsyncHTTPTransport, list[httpx.AsyncHTTPTransport]]:
        """The new pool for `key`, in place, and the pools it replaces, taken out (to be closed): the origin's
        under another certificate (its server restarted) and, beyond `max_pools`, the least recently used.
        Synchronous: no other request can interleave between the lookup and the insertion."""
        try:
            ctx = replicatls.context(key[1])
        except ValueError as e:         # TlsError: a record that is not a PEM certificate
            raise httpx.ConnectError(str(e)) from None
        stale = [k for k in self.pools if k[0] == key[0]]
        for k in self.pools:
            if len(self.pools) - len(stale) < self.max_pools:
                break
            if k not in stale:
                stale.append(k)
        pool = httpx.AsyncHTTPTransport(verify=ctx, limits=self.limits, trust_env=False)
        self.pools[key] = pool
        return pool, [self.pools.pop(k) for k in stale]

    async def aclose(self) -> None:
        pools, self.pools = list(self.pools.values()), OrderedDict()
        for p in [self.plain, *pools]:
            await p.aclose()


def client(timeout: float | httpx.Timeout, limits: httpx.Limits | None = None,
           pins: dict[str, str] | None = None) -> httpx.AsyncClient:
    """An AsyncClient for replicas: send each request with `extensions=request_extensions(certificate)` to
    `replicatls.base_url(endpoint, certificate)`. Proxies from the environment are not used (replicas are
    reached directly: a proxy would also need to be trusted with the traffic)."""
    return httpx.AsyncClient(timeout=timeout, transport=PinnedTransport(limits, pins=pins), trust_env=False)
