"""The read-only web view: an HTTP listener of the control plane (`web_listen`), on its event loop.

Routes (aiohttp):

* `GET /` and `GET /static/{app.js,style.css}`: the page, plain HTML/JS/CSS shipped in the package
  (controlplane/web/static); no data and no authentication, and a Content-Security-Policy that lets it
  load nothing from anywhere else.
* `GET /api/snapshot`: one frame as JSON (controlplane/web/snapshot.py). A frame built for a credential answers
  its requests for `snapshot_cache_seconds` (and those that come while it is built); beyond `snapshot_per_second`
  requests per credential (per remote address when nothing is checked), 429 with Retry-After
  (controlplane/web/limits.py).
* `GET /api/stream`: server-sent events, `event: frame` with a whole frame, first at once, then each
  time the frame changes (checked when a slice changes and every `refresh` seconds, which is how
  telemetry, deployments and migrations are seen), with a comment line every 15 s to keep proxies open.
* `GET /healthz`: "ok".

The API routes take the same credentials as gRPC: `Authorization: Bearer <token>` checked against the
tenants file (controlplane/api/auth.py); with `insecure` and no tenants file nothing is checked (the
local demo; then only requests addressed to localhost or an IP are answered, against DNS rebinding). Clients
with the viewer role or more may read; what they see is scoped by the servicers.
Errors are JSON `{"error": {"code", "message"}}`: 401/403, 404 (no such path), 405 (any method but GET/HEAD),
429 (snapshots too often), 503 (too many live streams), 500 (logged; the answer names no internals), all with the
page's security headers. With TLS configured for gRPC the web view serves HTTPS with the same certificate.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
import pathlib
import ssl
import time
from typing import Callable

from aiohttp import web

from controlplane.api import auth
from controlplane.web import badrequests, snapshot
from controlplane.web.changes import ChangeFeed
from controlplane.web.limits import FrameCache, RateLimiter
from mesh import errors
from mesh.logs import log

logger = logging.getLogger(__name__)
STATIC = pathlib.Path(__file__).with_name("static")
FILES = {"app.js": "text/javascript", "style.css": "text/css"}
KEEPALIVE_S = 15.0
MAX_STREAMS = 64              # live streams in all: each builds frames on the control plane's event loop
MAX_STREAMS_PER_CALLER = 8    # per credential (a browser tab holds one)
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _error(status: int, code: str, message: str) -> web.Response:
    resp = web.json_response({"error": {"code": code, "message": message}}, status=status)
    if status == 401:
        resp.headers["WWW-Authenticate"] = 'Bearer realm="gpumesh"'
    return resp


@web.middleware
async def _headers(request: web.Request, handler):
    """The page's security headers on every answer, and every error in the view's JSON shape: aiohttp's own
    404 (no such route) and 405 (a method the route does not take) and an unexpected exception (500, logged,
    its text kept out of the answer) would otherwise be bare text/plain."""
    try:
        resp = await handler(request)
    except web.HTTPNotFound:
        resp = _error(404, "NOT_FOUND", f"{request.path} is not a path of the web view (the page is /, its data "
                                        f"/api/snapshot and /api/stream)")
    except web.HTTPMethodNotAllowed as e:
        resp = _error(405, "METHOD_NOT_ALLOWED", f"{request.method} is not allowed on {request.path} (allowed: "
                                                 f"{', '.join(sorted(e.allowed_methods))}); the web view only reads")
        resp.headers["Allow"] = ",".join(sorted(e.allowed_methods))
    except web.HTTPException:
        raise
    except Exception as e:  # noqa: BLE001 - a bug in a frame answers 500 and is logged, never shown
        log(logger, logging.ERROR, "web view request failed", path=request.path, error=repr(e))
        logger.exception("web view request failed on %s", request.path)
        resp = _error(500, "INTERNAL", "internal error in the web view (logged by the control plane)")
    resp.headers.setdefault("Content-Security-Policy", CSP)
    resp.headers.setdefault("X-Content-Type-Options", "nosniff")
    resp.headers.setdefault("Referrer-Policy", "no-referrer")
    resp.headers.setdefault("Cache-Control", "no-store")
    return resp


class WebView:
    """The web view's HTTP server. `switches`: service name -> Switch (the control plane's servicers);
    `hub`: () -> the slice EventHub now in use (None while there is none)."""

    def __init__(self, switches: dict, authenticator: auth.Authenticator, hub: Callable[[], object],
                 refresh: float = 2.0, ssl_context: ssl.SSLContext | None = None, snapshot_per_second: float = 5.0,
                 snapshot_cache_seconds: float = 0.5, clock: Callable[[], float] = time.monotonic) -> None:
        self.switches = switches
        self.authenticator = authenticator
        self.refresh = refresh
        self.ssl_context = ssl_context
        self.changes = ChangeFeed(hub)
        self.runner: web.AppRunner | None = None
        self.port = 0
        self.streams: set[asyncio.Task] = set()
        self.stream_callers: dict[str, int] = {}     # live streams per credential (MAX_STREAMS_PER_CALLER)
        self.snapshot_limit = RateLimiter(snapshot_per_second, clock=clock)
        self.frames = FrameCache(snapshot_cache_seconds, clock=clock)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[_headers])
        app.router.add_get("/", self.index)
        app.router.add_get("/static/{name}", self.static)
        app.router.add_get("/api/snapshot", self.snapshot)
        app.router.add_get("/api/stream", self.stream)
        app.router.add_get("/healthz", self.healthz)
        return app

    async def start(self, host: str, port: int) -> int:
        badrequests.quiet()
        self.runner = web.AppRunner(self.app(), access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, ssl_context=self.ssl_context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        self.changes.start()
        return self.port

    async def stop(self) -> None:
        self.frames.clear()
        await self.changes.stop()
        for t in list(self.streams):
            t.cancel()
        if self.runner is not None:
            await self.runner.cleanup()

    # -- routes ------------------------------------------------------------------------------------

    async def index(self, request: web.Request) -> web.Response:
        return web.Response(body=(STATIC / "index.html").read_bytes(), content_type="text/html", charset="utf-8")

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in FILES:
            return _error(404, "NOT_FOUND", f"no file {name!r}; the page has {', '.join(sorted(FILES))}")
        return web.Response(body=(STATIC / name).read_bytes(), content_type=FILES[name], charset="utf-8")

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    def _principal(self, request: web.Request) -> auth.Principal | web.Response:
        try:
            p = self.authenticator.from_authorization(request.headers.get("Authorization", ""))
        except errors.MeshError as e:
            return _error(401, "UNAUTHENTICATED", e.message)
        if p.unrestricted and not addressed_directly(request.host):
            # nothing is checked (the demo): a page elsewhere whose name an attacker re-points at this
            # address (DNS rebinding) would read the fleet; such a page's requests carry its own name
            return _error(403, "PERMISSION_DENIED", "Host: without credentials the web view answers only "
                                                    "requests addressed to localhost or an IP address (a "
                                                    "name could be DNS rebinding); configure a tenants file "
                                                    "to reach it by name")
        why = auth.denial(auth.VIEWER, p, "/gpumesh.web/View")
        if why is not None:
            code = 401 if p.kind == "anonymous" else 403
            return _error(code, "UNAUTHENTICATED" if code == 401 else "PERMISSION_DENIED",
                          why if code == 403 else "the web view needs 'Authorization: Bearer <token>' "
                                                  "(a token from the tenants file)")
        return p

    async def snapshot(self, request: web.Request) -> web.Response:
        p = self._principal(request)
        if isinstance(p, web.Response):
            return p
        # per credential; with nothing checked every caller is the same principal: per remote address then
        client = ("addr", request.remote) if p.unrestricted else ("principal", p)
        wait = self.snapshot_limit.take(client)
        if wait:
            rate = self.snapshot_limit.rate
            resp = _error(429, "RESOURCE_EXHAUSTED", f"too many snapshots: at most {rate:g} per second per "
                                                     f"{'address' if p.unrestricted else 'credential'} "
                                                     f"(web_snapshot_per_second); retry after {wait:.1f} s, or "
                                                     f"follow /api/stream")
            resp.headers["Retry-After"] = str(max(1, math.ceil(wait)))
            return resp

        async def build() -> str:
            return json.dumps(snapshot.stamp(await snapshot.take(self.switches, p)))
        return web.Response(text=await self.frames.get(p, build), content_type="application/json")

    async def stream(self, request: web.Request) -> web.StreamResponse:
        p = self._principal(request)
        if isinstance(p, web.Response):
            return p
        who = str(p)
        if len(self.streams) >= MAX_STREAMS or self.stream_callers.get(who, 0) >= MAX_STREAMS_PER_CALLER:
            resp = _error(503, "UNAVAILABLE", f"too many live streams (at most {MAX_STREAMS_PER_CALLER} per "
                                              f"credential, {MAX_STREAMS} in all): close one, or poll /api/snapshot")
            resp.headers["Retry-After"] = "10"
            return resp
        # counted at once, with no await between the check and the count: two requests cannot both pass the check
        # while the first prepares its answer (an await that may let the other run)
        task = asyncio.current_task()
        self.streams.add(task)
        self.stream_callers[who] = self.stream_callers.get(who, 0) + 1
        # the middleware's headers come after a stream's are sent: its own, here
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no", "Content-Security-Policy": CSP,
                                           "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})
        try:
            await resp.prepare(request)
        except BaseException:
            self._release(task, who)
            raise
        last = None
        loop = asyncio.get_running_loop()
        sent_at = loop.time()
        try:
            while True:
                if request.transport is None or request.transport.is_closing():
                    break           # the client went away: no more frames built for nobody
                seen = self.changes.version
                frame = await snapshot.take(self.switches, p)
                body = json.dumps(frame, sort_keys=True)
                if body != last:
                    last = body
                    data = json.dumps(snapshot.stamp(frame))
                    await resp.write(f"event: frame\ndata: {data}\n\n".encode())
                    sent_at = loop.time()
                elif loop.time() - sent_at >= KEEPALIVE_S:
                    await resp.write(b": keepalive\n\n")
                    sent_at = loop.time()
                await self.changes.wait(seen, self.refresh)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        except Exception as e:  # noqa: BLE001 - a broken frame ends this stream, never the server
            log(logger, logging.WARNING, "web view stream ended", error=repr(e))
        finally:
            self._release(task, who)
        return resp

    def _release(self, task: asyncio.Task | None, who: str) -> None:
        self.streams.discard(task)
        self.stream_callers[who] -= 1
        if not self.stream_callers[who]:
            del self.stream_callers[who]


def addressed_directly(host: str) -> bool:
    """Whether an HTTP Host header names localhost or an IP literal (with or without a port)."""
    h = (host or "").strip().lower()
    if h.startswith("["):
        h = h[1:h.find("]")] if "]" in h else h
    elif h.count(":") == 1:
        h = h.split(":", 1)[0]
    if h in ("localhost", "localhost.") or h.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(h)
        return True
    except ValueError:
        return False


def ssl_context(cert: str, key: str) -> ssl.SSLContext | None:
    """HTTPS with the gRPC server's certificate, or None for plaintext."""
    if not cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx
