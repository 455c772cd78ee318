"""The web view inside an in-process control plane (embedded etcd): configuration, routes, shutdown."""

from __future__ import annotations

import aiohttp
import pytest

from controlplane.config import ControlPlaneConfig
from mesh.config import ConfigError


def test_web_listen_is_validated(tmp_path):
    cfg = ControlPlaneConfig(web_listen="localhost", state_dir=str(tmp_path / "cp"), insecure=True)
    with pytest.raises(ConfigError, match="web_listen: 'localhost' is not HOST:PORT"):
        cfg.check()
    from mesh import config
    with pytest.raises(ConfigError, match="web_refresh_seconds"):
        config.load(ControlPlaneConfig, None, environ={"MESH_CP_WEB_REFRESH_SECONDS": "0", "MESH_CP_INSECURE": "1",
                                                        "MESH_CP_STATE_DIR": str(tmp_path / "cp")})


async def test_web_view_serves_the_page_and_frames(tmp_path):
    from controlplane.server import ControlPlane
    cfg = ControlPlaneConfig(listen="127.0.0.1:0", metrics_listen="", web_listen="127.0.0.1:0",
                             state_dir=str(tmp_path / "cp"), insecure=True, leader_ttl=30)
    cp = ControlPlane(cfg)
    await cp.start()
    try:
        base = f"http://127.0.0.1:{cp.web_port}"
        async with aiohttp.ClientSession() as s:
            async with s.get(base + "/") as r:
                assert r.status == 200 and "<title>gpumesh</title>" in await r.text()
            async with s.get(base + "/static/app.js") as r:
                assert r.status == 200 and r.content_type == "text/javascript"
            async with s.get(base + "/static/index.py") as r:
                assert r.status == 404 and "app.js" in (await r.json())["error"]["message"]
            async with s.get(base + "/api/snapshot") as r:          # --insecure, no tenants file: the demo
                frame = await r.json()
                assert r.status == 200 and frame["principal"]["admin"] is True
                assert frame["nodes"] == [] and frame["slices"] == [] and frame["unavailable"] == []
            # nothing checked: a request addressed by a name (a rebound attacker's page) gets nothing
            for host in ("evil.example:80", "gpumesh.attacker.test"):
                async with s.get(base + "/api/snapshot", headers={"Host": host}) as r:
                    assert r.status == 403 and "DNS rebinding" in (await r.json())["error"]["message"]
            for host in (f"localhost:{cp.web_port}", f"[::1]:{cp.web_port}", "10.1.2.3"):
                async with s.get(base + "/api/snapshot", headers={"Host": host}) as r:
                    assert r.status == 200
    finally:
        await cp.stop()
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.ClientConnectionError):
            await s.get(base + "/healthz")


async def test_a_standby_serves_the_web_view_from_its_follower(tmp_path):
    """A second control plane on the same etcd stands by: its web view answers from the fleet it follows
    (slices, nodes, deployments: a standby serves those reads)."""
    from controlplane.server import ControlPlane
    leader = ControlPlane(ControlPlaneConfig(listen="127.0.0.1:0", metrics_listen="", state_dir=str(tmp_path / "a"),
                                             insecure=True, leader_ttl=30))
    await leader.start()
    standby = None
    try:
        standby = ControlPlane(ControlPlaneConfig(
            listen="127.0.0.1:0", metrics_listen="", web_listen="127.0.0.1:0", state_dir=str(tmp_path / "b"),
            insecure=True, leader_ttl=30, etcd_endpoints=[leader.etcd.endpoint]))
        await standby.start()
        async with aiohttp.ClientSession() as s:
            import asyncio
            for _ in range(300):                 # the follower loads the fleet in the background
                async with s.get(f"http://127.0.0.1:{standby.web_port}/api/snapshot") as r:
                    frame = await r.json()
                if r.status == 200 and not any(u.startswith(("SliceService", "DeploymentService"))
                                               for u in frame["unavailable"]):
                    break
                await asyncio.sleep(0.1)
            assert r.status == 200 and frame["nodes"] == [] and frame["slices"] == []
            assert frame["deployments"] == [], frame
            assert not any(u.startswith("DeploymentService") for u in frame["unavailable"]), frame["unavailable"]
    finally:
        if standby is not None:
            await standby.stop()
        await leader.stop()


async def test_live_streams_are_bounded_and_end_with_their_client(tmp_path, monkeypatch):
    """Each live stream builds frames on the control plane's event loop: at most MAX_STREAMS_PER_CALLER per
    credential (503 with Retry-After beyond), and a stream whose client went away stops at its next refresh
    instead of building frames for nobody until its next write (the keepalive, 15 s). Its headers carry the
    page's security headers too (the middleware's come after a stream's headers are sent)."""
    import asyncio

    from controlplane.server import ControlPlane
    from controlplane.web import server as web_server
    monkeypatch.setattr(web_server, "MAX_STREAMS_PER_CALLER", 2)
    cfg = ControlPlaneConfig(listen="127.0.0.1:0", metrics_listen="", web_listen="127.0.0.1:0",
                             state_dir=str(tmp_path / "cp"), insecure=True, leader_ttl=30, web_refresh_seconds=0.2)
    cp = ControlPlane(cfg)
    await cp.start()
    try:
        url = f"http://127.0.0.1:{cp.web_port}/api/stream"
        sessions = [aiohttp.ClientSession() for _ in range(3)]
        try:
            held = []
            for s in sessions[:2]:
                r = await s.get(url)
                assert r.status == 200 and r.headers["Content-Security-Policy"].startswith("default-src 'none'")
                assert (await r.content.readline()).startswith(b"event: frame")
                held.append(r)
            async with sessions[2].get(url) as r:
                assert r.status == 503 and r.headers["Retry-After"] == "10"
                assert "too many live streams" in (await r.json())["error"]["message"]
            held[0].close()                                  # one client goes away
            await sessions[0].close()
            web = cp.web
            deadline = asyncio.get_running_loop().time() + 30
            while len(web.streams) != 1 and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)                    # its stream ends at its next refresh (0.2 s)
            assert len(web.streams) == 1
            r = await sessions[2].get(url)
            assert r.status == 200
            r.close()
        finally:
            for s in sessions:
                await s.close()
    finally:
        await cp.stop()


async def _bare_view():
    """A WebView over no servicers (each part of a frame 'not served'), on a free port, nothing checked."""
    from controlplane.api import auth
    from controlplane.web.server import WebView
    view = WebView({}, auth.Authenticator(None, insecure=True), lambda: None)
    port = await view.start("127.0.0.1", 0)
    return view, f"http://127.0.0.1:{port}"


async def test_every_error_is_json_with_the_pages_security_headers(monkeypatch):
    """A path that is no route, a method a route does not take, and a frame that fails to build are
    answered like the view's own errors (JSON {"error": {code, message}} naming what was wrong) and carry
    the page's security headers: aiohttp's own answers were text/plain and bare (no CSP, no nosniff, no
    no-store), and a failed frame a text 500."""
    from controlplane.web import server as web_server
    from controlplane.web import snapshot
    view, base = await _bare_view()
    try:
        async with aiohttp.ClientSession() as s:
            cases = [("GET", "/nope", 404, "NOT_FOUND", "/nope"), ("GET", "/static/", 404, "NOT_FOUND", "/static/"),
                     ("POST", "/api/snapshot", 405, "METHOD_NOT_ALLOWED", "POST"),
                     ("DELETE", "/", 405, "METHOD_NOT_ALLOWED", "GET")]
            for method, path, status, code, named in cases:
                async with s.request(method, base + path) as r:
                    assert r.status == status, (method, path)
                    assert r.content_type == "application/json", (method, path, await r.text())
                    err = (await r.json())["error"]
                    assert err["code"] == code and named in err["message"], err
                    assert r.headers["Content-Security-Policy"] == web_server.CSP
                    assert r.headers["X-Content-Type-Options"] == "nosniff"
                    assert r.headers["Cache-Control"] == "no-store"

            async def broken(switches, principal):
                raise TypeError("a servicer's bug, with internals: /etc/secret")
            monkeypatch.setattr(snapshot, "take", broken)
            async with s.get(base + "/api/snapshot") as r:
                assert r.status == 500 and r.content_type == "application/json"
                err = (await r.json())["error"]
                assert err["code"] == "INTERNAL" and "/etc/secret" not in err["message"], err
                assert r.headers["Content-Security-Policy"] == web_server.CSP
    finally:
        await view.stop()


def test_the_page_never_parses_what_it_receives_as_html():
    """Names come from tenants (deployment and label names, workload commands, event messages): a tenant that
    names something `<img src=x onerror=...>` must see that text drawn, never markup run. The page draws with
    createElement/textContent only (controlplane/web/static/app.js `el`), and the CSP forbids inline script
    besides; this keeps any HTML sink (and attribute setters that take code or URLs) out of it."""
    import re

    from controlplane.web.server import CSP, STATIC
    js = (STATIC / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                 "createContextualFragment", "DOMParser", ".src =", ".href =", "srcdoc", "javascript:"):
        assert sink not in js, f"app.js uses {sink}: draw received text with textContent"
    assert not re.search(r"setAttribute\(\s*['\"]on", js) and "k.startsWith(\"on" not in js
    html = (STATIC / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)", html) and not re.search(r"\son[a-z]+\s*=", html)
    assert "script-src 'self'" in CSP and "unsafe-inline" not in CSP


async def test_a_malformed_request_is_one_warning_line_not_an_error_with_a_traceback(tmp_path, caplog):
    """aiohttp logs every request it cannot parse (an 8 KiB header line, a broken request line) at ERROR with
    its traceback: anyone who reaches the port filled the control plane's log with tracebacks. It answers 400
    as before; the log gets one WARNING line naming the peer and what was wrong."""
    import asyncio
    import logging

    from controlplane.server import ControlPlane
    cp = ControlPlane(ControlPlaneConfig(listen="127.0.0.1:0", metrics_listen="", web_listen="127.0.0.1:0",
                                         state_dir=str(tmp_path / "cp"), insecure=True, leader_ttl=30))
    await cp.start()
    try:
        with caplog.at_level(logging.DEBUG):
            for bad in (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
                        b"NOT A REQUEST\x00\r\n\r\n"):
                r, w = await asyncio.open_connection("127.0.0.1", cp.web_port)
                w.write(bad)
                await w.drain()
                assert (await r.read(64)).startswith(b"HTTP/1.0 400")
                w.close()
            await asyncio.sleep(0.05)
        mine = [x for x in caplog.records if x.name == "aiohttp.server"]
        assert len(mine) == 2, [x.getMessage() for x in mine]
        assert all(x.levelno == logging.WARNING and not x.exc_info for x in mine)
        assert "127.0.0.1" in mine[0].getMessage() and "8190" in mine[0].getMessage()
    finally:
        await cp.stop()
