"""The replicas' connection pools end (mesh/replicahttp.py): a replica that left the gateway's view has its
pool and sockets closed at once, an idle pool is swept after the keep-alive expiry, a pool a request holds is
never closed under it, and `max_connections` bounds all pools together. Against real TLS servers on
localhost (tests/unit/test_backend_tls.py's); every wait is for a condition, with a deadline."""

from __future__ import annotations

import asyncio
import os
import time

import httpx
import pytest

from controlplane.gateway import proxy
from controlplane.gateway.service import Gateway
from gpumesh.v1 import deployment_service_pb2 as D
from gpumesh.v1 import servingview_service_pb2 as V
from mesh import replicahttp, tls
from tests.unit.test_backend_tls import TlsServer
from tests.unit.test_gateway_routing import cfg

CERT, KEY = tls.self_signed(("127.0.0.1",), "w")
PEM = CERT.decode()
PIN = replicahttp.request_extensions(PEM)


async def until(cond, what: str, deadline: float = 30.0, poke=None) -> None:
    """Wait for `cond()` (calling `poke()`, a coroutine, between looks), failing after `deadline` seconds."""
    end = time.monotonic() + deadline
    while not cond():
        if time.monotonic() > end:
            pytest.fail(f"not within {deadline}s: {what}")
        if poke is not None:
            await poke()
        await asyncio.sleep(0.02)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class HeldServer(TlsServer):
    """Answers with the first chunk of a stream at once and the rest when `go` is set (a long generation)."""

    def __init__(self, *a) -> None:
        super().__init__(*a)
        self.go = asyncio.Event()

    async def _serve(self, reader, writer) -> None:
        self.connections += 1
        try:
            await reader.readuntil(b"\r\n\r\n")
            self.requests += 1
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
            await writer.drain()
            await self.go.wait()
            writer.write(b"4\r\nlast\r\n0\r\n\r\n")
            await writer.drain()
            await reader.read()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed += 1
            writer.close()


def fleet(*endpoints: str) -> V.ServingView:
    d = D.Deployment()
    d.spec.name, d.spec.model = "chat", "smol"
    for i, ep in enumerate(endpoints):
        d.replicas.add(id=f"r-{i}", deployment="chat", state=D.REPLICA_STATE_READY, endpoint=ep,
                       endpoint_certificate=PEM)
    return V.ServingView(deployments=[d])


def test_a_replica_that_leaves_the_gateways_view_has_its_pool_and_sockets_closed(tmp_path):
    async def main():
        gone, stays = TlsServer(CERT, KEY, tmp_path, "g"), TlsServer(CERT, KEY, tmp_path, "s")
        held = HeldServer(CERT, KEY, tmp_path, "h")
        ep_gone, ep_stays, ep_held = await gone.start(), await stays.start(), await held.start()
        gw = Gateway(cfg())
        gw.view.apply(fleet(ep_gone, ep_stays, ep_held))
        before = open_fds()
        for ep in (ep_gone, ep_stays):
            assert b"ok" in await proxy.complete(gw.http, ep, "/v1/completions", b"{}", "k", PEM)
        stream = await gw.http.send(gw.http.build_request("GET", f"https://{ep_held}/", extensions=PIN), stream=True)
        chunks = stream.aiter_raw()
        assert await chunks.__anext__() == b"first"
        assert len(gw.replicas.pools) == 3 and open_fds() == before + 2 * 3    # each: the client's, the server's
        gw.view.apply(fleet(ep_stays))                        # two replicas removed, one of them mid-answer
        await until(lambda: gone.closed == 1, "the removed replica's server sees its connection closed")
        assert [k[0].decode() for k in gw.replicas.pools] == [ep_stays]
        assert held.closed == 0                               # the answer in flight goes on
        held.go.set()
        assert b"".join([c async for c in chunks]) == b"last"
        await stream.aclose()
        await until(lambda: held.closed == 1, "the held pool closes once its answer is done")
        await until(lambda: open_fds() == before + 2, "only the live replica's connection stays open")
        assert stays.closed == 0
        await gw.http.aclose()
        for s in (gone, stays, held):
            await s.stop()
    asyncio.run(main())


def test_a_pool_idle_past_the_keepalive_expiry_is_swept_by_the_next_requests(tmp_path):
    async def main():
        old, live = TlsServer(CERT, KEY, tmp_path, "o"), TlsServer(CERT, KEY, tmp_path, "l")
        ep_old, ep_live = await old.start(), await live.start()
        transport = replicahttp.PinnedTransport(httpx.Limits(keepalive_expiry=0.3))
        async with httpx.AsyncClient(transport=transport, timeout=10) as client:
            assert (await client.get(f"https://{ep_old}/", extensions=PIN)).status_code == 200

            async def use_live():
                assert (await client.get(f"https://{ep_live}/", extensions=PIN)).status_code == 200
            await until(lambda: old.closed == 1, "the idle pool's connection is closed", poke=use_live)
            assert [k[0].decode() for k in transport.pools] == [ep_live] and live.closed == 0
        for s in (old, live):
            await s.stop()
    asyncio.run(main())


def test_a_pool_in_use_is_not_evicted_past_the_pool_cap(tmp_path):
    async def main():
        held, other = HeldServer(CERT, KEY, tmp_path, "h"), TlsServer(CERT, KEY, tmp_path, "o")
        ep_held, ep_other = await held.start(), await other.start()
        transport = replicahttp.PinnedTransport(max_pools=1)
        async with httpx.AsyncClient(transport=transport, timeout=10) as client:
            stream = await client.send(client.build_request("GET", f"https://{ep_held}/", extensions=PIN),
                                       stream=True)
            chunks = stream.aiter_raw()
            assert await chunks.__anext__() == b"first"
            assert (await client.get(f"https://{ep_other}/", extensions=PIN)).status_code == 200
            assert len(transport.pools) == 2 and held.closed == 0      # over the cap, rather than cut it
            held.go.set()
            assert b"".join([c async for c in chunks]) == b"last"
            await stream.aclose()
            third = await TlsServer(CERT, KEY, tmp_path, "t").start()
            assert (await client.get(f"https://{third}/", extensions=PIN)).status_code == 200
            assert [k[0].decode() for k in transport.pools] == [third]   # idle now: the cap holds again
            await until(lambda: held.closed == 1 and other.closed == 1, "the evicted pools' connections close")
        for s in (held, other):
            await s.stop()
    asyncio.run(main())


def test_max_connections_bounds_all_pools_together(tmp_path):
    async def main():
        servers = [HeldServer(CERT, KEY, tmp_path, f"h{i}") for i in range(3)]
        eps = [await s.start() for s in servers]
        transport = replicahttp.PinnedTransport(httpx.Limits(max_connections=2))
        async with httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(10, pool=0.2)) as client:
            streams = [await client.send(client.build_request("GET", f"https://{ep}/", extensions=PIN),
                                         stream=True) for ep in eps[:2]]
            with pytest.raises(httpx.PoolTimeout):
                await client.get(f"https://{eps[2]}/", extensions=PIN)
            assert servers[2].requests == 0
            servers[0].go.set()
            await streams[0].aread()
            await streams[0].aclose()
            servers[2].go.set()
            r = await client.get(f"https://{eps[2]}/", extensions=PIN)
            assert r.status_code == 200 and r.content == b"firstlast"
            servers[1].go.set()
            await streams[1].aclose()
        for s in servers:
            await s.stop()
    asyncio.run(main())


def test_the_control_planes_probes_close_the_pools_of_replicas_no_longer_recorded(tmp_path):
    from controlplane.serving.actuator import Actuator

    async def main():
        gone, stays = TlsServer(CERT, KEY, tmp_path, "g"), TlsServer(CERT, KEY, tmp_path, "s")
        ep_gone, ep_stays = await gone.start(), await stays.start()
        act = Actuator(None, None, None, probe_timeout=10)
        for ep in (ep_gone, ep_stays):
            assert await act.probe(ep, "smol", complete=False, certificate=PEM) == (True, "")
        act.retain([ep_stays])                      # the deployments controller's pass: ep_gone was removed
        await until(lambda: gone.closed == 1, "the removed replica's probe connection is closed")
        assert stays.closed == 0
        await act.close()
        for s in (gone, stays):
            await s.stop()
    asyncio.run(main())
