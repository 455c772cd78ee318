"""What the web view's reads may cost: `/api/snapshot` per client (a short cache of the last frame per credential,
then a token bucket per credential, or per remote address when nothing is checked: 429 with Retry-After beyond),
and the live streams' limit, which holds even when preparing a stream's answer lets other requests run.

The view runs on a free port with a hand-moved clock: no assertion depends on how fast the machine is."""

from __future__ import annotations

import asyncio
import hashlib

import aiohttp
import pytest

from controlplane.api import auth
from controlplane.api.tenantsfile import Tenants
from controlplane.config import ControlPlaneConfig
from controlplane.web import limits
from controlplane.web import server as web_server
from controlplane.web import snapshot
from mesh.config import ConfigError

TOKENS = {"admin-token-0123456789": auth.Principal("client", "ops", "", "admin"),
          "team-a-token-0123456789": auth.Principal("client", "alice", "team-a", "tenant"),
          "team-a-other-0123456789": auth.Principal("client", "alice", "team-a", "tenant")}   # alice's second token


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def builds(monkeypatch):
    """The principals each frame was built for (snapshot.take, counted)."""
    seen: list[auth.Principal] = []
    take = snapshot.take

    async def counting(switches, principal):
        seen.append(principal)
        return await take(switches, principal)
    monkeypatch.setattr(snapshot, "take", counting)
    return seen


async def _view(clock, *, tokens: bool = False, per_second: float = 1000.0, cache_seconds: float = 0.0):
    tenants = Tenants(tokens={hashlib.sha256(t.encode()).hexdigest(): p for t, p in TOKENS.items()},
                      quotas={"team-a": {}}) if tokens else None
    view = web_server.WebView({}, auth.Authenticator(tenants, insecure=True), lambda: None,
                              snapshot_per_second=per_second, snapshot_cache_seconds=cache_seconds, clock=clock)
    port = await view.start("127.0.0.1", 0)
    return view, f"http://127.0.0.1:{port}/api/snapshot"


def _bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


async def test_a_client_over_the_snapshot_limit_gets_429_with_retry_after(builds):
    """Every /api/snapshot built a whole frame (a List of everything) however fast one client asked. Beyond
    web_snapshot_per_second (a bucket of that many, refilled at that rate), 429 in the view's JSON error shape
    with the page's security headers, naming the limit, and Retry-After saying when a request will be served."""
    clock = Clock()
    view, url = await _view(clock, per_second=2.0)
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(2):
                async with s.get(url) as r:
                    assert r.status == 200
            async with s.get(url) as r:
                assert r.status == 429 and r.headers["Retry-After"] == "1"
                assert r.content_type == "application/json"
                err = (await r.json())["error"]
                assert err["code"] == "RESOURCE_EXHAUSTED", err
                assert "web_snapshot_per_second" in err["message"] and "2 per second" in err["message"], err
                assert r.headers["Content-Security-Policy"] == web_server.CSP
                assert r.headers["X-Content-Type-Options"] == "nosniff" and r.headers["Cache-Control"] == "no-store"
            assert len(builds) == 2                    # a refused request builds nothing
            clock.t += 0.5                             # half a second refills one request's worth
            async with s.get(url) as r:
                assert r.status == 200
            async with s.get(url) as r:
                assert r.status == 429
    finally:
        await view.stop()


async def test_the_limit_is_per_credential_and_per_address_without_one(builds):
    """One credential over its limit does not refuse another; a credential's tokens share its limit. With nothing
    checked (the local demo: every caller is the same unrestricted principal) the limit is per remote address."""
    clock = Clock()
    view, url = await _view(clock, tokens=True, per_second=1.0)
    try:
        async with aiohttp.ClientSession() as s:
            assert (await s.get(url, headers=_bearer("team-a-token-0123456789"))).status == 200
            assert (await s.get(url, headers=_bearer("team-a-other-0123456789"))).status == 429   # alice again
            assert (await s.get(url, headers=_bearer("admin-token-0123456789"))).status == 200
            assert (await s.get(url, headers=_bearer("wrong"))).status == 401       # no credential: no bucket used
    finally:
        await view.stop()
    view, url = await _view(clock, per_second=1.0)
    try:
        for addr, want in (("127.0.0.1", 200), ("127.0.0.1", 429), ("127.0.0.2", 200), ("127.0.0.2", 429)):
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(addr, 0))) as s:
                async with s.get(url) as r:
                    assert r.status == want, (addr, want)
    finally:
        await view.stop()


async def test_a_burst_within_the_cache_time_costs_one_frame_per_credential(builds, monkeypatch):
    """Requests of one credential within web_snapshot_cache_seconds of a frame get that frame (and requests that
    arrive while it is built wait for it): one build, not one per request. A frame is never another credential's:
    each sees its own principal (a tenant's frame is scoped to its tenant)."""
    clock = Clock()
    view, url = await _view(clock, tokens=True, cache_seconds=0.5)
    gate, begun = asyncio.Event(), []
    take = snapshot.take

    async def slow(switches, principal):
        begun.append(principal)
        await gate.wait()
        return await take(switches, principal)
    monkeypatch.setattr(snapshot, "take", slow)
    try:
        async with aiohttp.ClientSession() as s:
            async def get(token):
                async with s.get(url, headers=_bearer(token)) as r:
                    assert r.status == 200
                    return await r.json()
            waiting = [asyncio.create_task(get("team-a-token-0123456789")) for _ in range(4)]
            waiting.append(asyncio.create_task(get("admin-token-0123456789")))
            for _ in range(6000):                      # both frames begun (the other requests wait on them)
                if len(begun) >= 2:
                    break
                await asyncio.sleep(0.01)
            gate.set()
            frames = await asyncio.gather(*waiting)
            assert sorted(p.name for p in builds) == ["alice", "ops"]
            assert {f["principal"]["tenant"] for f in frames[:4]} == {"team-a"}
            assert frames[4]["principal"]["admin"] is True
            assert (await get("team-a-other-0123456789")) == frames[0]           # alice's, still fresh: no build
            assert len(builds) == 2
            clock.t += 0.6
            await get("team-a-token-0123456789")                                   # stale: built again
            assert len(builds) == 3
    finally:
        await view.stop()


def test_the_snapshot_limits_are_validated(tmp_path):
    from mesh import config
    base = {"MESH_CP_INSECURE": "1", "MESH_CP_STATE_DIR": str(tmp_path / "cp")}
    for name, bad in (("WEB_SNAPSHOT_PER_SECOND", "0"), ("WEB_SNAPSHOT_PER_SECOND", "-1"),
                      ("WEB_SNAPSHOT_CACHE_SECONDS", "-0.5"), ("WEB_SNAPSHOT_CACHE_SECONDS", "600")):
        with pytest.raises(ConfigError, match=name.lower()):
            config.load(ControlPlaneConfig, None, environ={**base, f"MESH_CP_{name}": bad})
    cfg = config.load(ControlPlaneConfig, None, environ=base)
    assert cfg.web_snapshot_per_second > 0 and cfg.web_snapshot_cache_seconds >= 0


@pytest.mark.parametrize("name,steps", [
    ("a full bucket serves its burst", [(0.0, 0.0), (0.0, 0.0), (0.0, 0.5)]),
    ("it refills at the rate", [(0.0, 0.0), (0.0, 0.0), (0.5, 0.0), (0.0, 0.5)]),
    ("never more than the burst", [(10.0, 0.0), (0.0, 0.0), (0.0, 0.5)]),
    ("a refused request takes nothing", [(0.0, 0.0), (0.0, 0.0), (0.0, 0.5), (0.25, 0.25), (0.25, 0.0)]),
])
def test_token_bucket(name, steps):
    """web_snapshot_per_second = 2: a bucket of 2, refilled at 2 per second; each step moves the clock, then takes
    one, and gets the wait (0: served)."""
    clock = Clock()
    rl = limits.RateLimiter(2.0, clock=clock)
    for dt, wait in steps:
        clock.t += dt
        assert rl.take("k") == pytest.approx(wait), name


def test_the_rate_limiter_forgets_idle_clients():
    """A bucket that has refilled is the same as none: those go when the table grows past its bound, so a flood of
    addresses cannot grow it without end."""
    clock = Clock()
    rl = limits.RateLimiter(1.0, clock=clock, max_keys=100)
    for i in range(100):
        rl.take(f"a{i}")
    clock.t += 5
    rl.take("new")
    assert len(rl) <= 51 and rl.take("new") > 0


async def test_the_live_stream_limit_holds_while_a_stream_is_prepared(monkeypatch):
    """The limit was checked, then the stream's answer prepared (an await), then the stream counted: two requests
    that both passed the check before either was counted both got streams. Preparing does not suspend in today's
    aiohttp, but any await that does (a slow client's headers, a response-prepare hook) let the limit be exceeded:
    here prepare waits until a second prepare begins or the first request is answered."""
    monkeypatch.setattr(web_server, "MAX_STREAMS_PER_CALLER", 1)
    entered, release = [], asyncio.Event()
    prepare = aiohttp.web.StreamResponse.prepare

    async def suspending(self, request):
        if request.path == "/api/stream":
            entered.append(request)
            if len(entered) >= 2:
                release.set()
            await release.wait()
        return await prepare(self, request)
    monkeypatch.setattr(aiohttp.web.StreamResponse, "prepare", suspending)
    view = web_server.WebView({}, auth.Authenticator(None, insecure=True), lambda: None, refresh=0.2)
    port = await view.start("127.0.0.1", 0)
    sessions = [aiohttp.ClientSession() for _ in range(2)]
    try:
        url = f"http://127.0.0.1:{port}/api/stream"
        gets = [asyncio.create_task(s.get(url)) for s in sessions]
        await asyncio.wait(gets, return_when=asyncio.FIRST_COMPLETED, timeout=60)
        release.set()
        answers = await asyncio.gather(*gets)
        assert sorted(r.status for r in answers) == [200, 503]
        assert len(view.streams) == 1 and view.stream_callers == {str(auth.UNRESTRICTED): 1}
        for r in answers:
            r.close()
    finally:
        for s in sessions:
            await s.close()
        await view.stop()
