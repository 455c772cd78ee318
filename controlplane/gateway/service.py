"""The gateway's request path, independent of the HTTP framework: authenticate, validate, resolve the
model, answer from the cache, take a replica slot (queue, fallback), call the backend (retry once before
the first token; relay.py streams, and resumes a stream that breaks), measure, log. `app.py` turns its
results into HTTP responses."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field

from controlplane.gateway import cache as cachemod
from controlplane.gateway import metrics as M
from controlplane.gateway import proxy, semcache, validate
from controlplane.gateway.admission import Admission, Gone, Rejected, Slot
from controlplane.gateway.apierror import APIError
from controlplane.gateway.clients import Caller, Clients
from controlplane.gateway.config import GatewayConfig
from controlplane.gateway.policy import Candidate, RouteContext, affinity_key, gpu_levels, make
from controlplane.gateway.relay import Plan, Segment, StreamRelay, release_if_never_started
from controlplane.gateway.hazard import HazardBook
from controlplane.gateway.stats import StatsTable
from controlplane.gateway.tcpprobe import TcpProber
from controlplane.gateway.breaker import STATE_VALUE
from controlplane.gateway.view import DeploymentInfo, FleetView
from controlplane.gateway.wake import Waker
from mesh.logs import log

logger = logging.getLogger("gateway.requests")


@dataclass
class Outcome:
    """What to send: a whole body, or a stream of SSE bytes; with status and headers."""
    status: int = 200
    body: bytes = b""
    stream: object = None                       # async iterator of bytes
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Trace:
    """What the log line of one request says."""
    model: str = ""
    tenant: str | None = None
    replica: str = ""
    why: str = ""
    degraded: str = ""
    retries: int = 0
    queued_s: float = 0.0
    cache: str = ""
    status: int = 200
    ttft: float | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    start: float = field(default_factory=time.monotonic)
    error: str = ""
    backend_s: float = 0.0
    resumed: str = ""           # the replica a broken stream was resumed on (relay.py)
    resolved: bool = False      # the model names a deployment the caller may use


class Gateway:
    def __init__(self, cfg: GatewayConfig, view: FleetView | None = None) -> None:
        self.cfg = cfg
        self.view = view or FleetView()
        self.stats = StatsTable(cfg.breaker_failures, cfg.breaker_open_seconds, cfg.ema_alpha,
                                cfg.failure_half_life_seconds,
                                HazardBook(cfg.failure_prior_requests, cfg.failure_risk_half_life_seconds))
        self.policy = make(cfg.policy, cfg)
        # a stream that breaks after tokens were sent is continued on another replica (relay.py) where the
        # gateway allows it and the policy does (the baselines stand for balancers that never do)
        self.resumes = cfg.resume_broken_streams and self.policy.resumes_streams
        self.admission = Admission(self.policy, cfg.queue_size, cfg.shed_early)
        self.cache = cachemod.ResponseCache(cfg.cache_entries, cfg.cache_bytes, cfg.cache_ttl_seconds)
        self.semcache = semcache.build(cfg)          # None unless semantic_cache is on
        self.draining = False                        # SIGTERM received: /readyz 503, gRPC NOT_SERVING (main.py)
        self.grpc_port, self.grpc_health = 0, None   # set by grpcsvc.start_grpc
        self.clients = Clients(cfg.tenants_file)
        self.replicas = proxy.make_transport()      # one pool per replica (mesh/replicahttp.py)
        self.http = proxy.make_client(cfg.backend_timeout_seconds, self.replicas)
        self.view.listeners.append(self._on_view)
        self.waker = Waker(cfg, self.view)          # scale from zero (controlplane/gateway/wake.py)
        self._ticker: asyncio.Task | None = None
        self.prober = TcpProber(self.stats, self.admission.kick)    # circuits a refused connection opened

    # -- the fleet ------------------------------------------------------------------------------

    def _on_view(self) -> None:
        keys = {r.key for d in self.view.deployments.values() for r in d.replicas}
        self.stats.forget_except(keys)
        M.forget_replicas(keys | set(self.stats.by_replica))    # the series of replicas gone (none in flight)
        # a replica that left the view is not asked again: its pool's connections close now, not at exit
        self.replicas.retain(r.endpoint for d in self.view.deployments.values() for r in d.replicas if r.endpoint)
        # a request waiting for deployments that were deleted is answered now (not at its deadline), and the
        # queues and queue_depth series of pools that are gone go with them
        for pool in self.admission.drop_gone():
            M.QUEUE_DEPTH.labels(pool).set(self.admission.depth(pool))
        M.forget_queues(lambda pool: pool in self.admission.queues
                        or all(n in self.view.deployments for n in pool.split(",")))
        self.admission.kick()

    async def start(self) -> None:
        async def tick():        # breakers half-open with time, not with events
            while True:
                await asyncio.sleep(0.25)
                try:
                    if self.policy.uses_breaker:
                        self.prober.start_due(self.view)
                    self.admission.kick()
                    self.replicas.sweep()          # pools idle past the keep-alive expiry, even with no requests
                    M.VIEW_AGE.set(time.time() - self.view.updated_at if self.view.updated_at else 0)
                except Exception:  # noqa: BLE001 - the ticker outlives a bad pass: probes, kicks, sweeps go on
                    logger.exception("gateway tick")
        self._ticker = asyncio.get_running_loop().create_task(tick())

    async def stop(self) -> None:
        if self._ticker:
            self._ticker.cancel()
        if self.semcache is not None:
            self.semcache.embedder.close()
        await self.http.aclose()
        await self.waker.close()

    def limit(self, d: DeploymentInfo, concurrency: int) -> int:
        if d.backend == "vllm":
            return self.cfg.vllm_concurrency or concurrency
        return self.cfg.llamacpp_concurrency

    def _current(self, d: DeploymentInfo) -> DeploymentInfo | None:
        """`d` as the latest view has it (even for a queued request); None when it was deleted since the request
        was resolved, or its name is now another tenant's or model's deployment: not the caller's to use."""
        cur = self.view.deployments.get(d.name)
        return cur if cur is not None and cur.tenant == d.tenant and cur.model == d.model else None

    def serves(self, deps: list[DeploymentInfo]) -> bool:
        """Whether any of `deps` is still in the view (a request waiting for them can still be served)."""
        return any(self._current(d) is not None for d in deps)

    def candidates(self, deps: list[DeploymentInfo]) -> list[Candidate]:
        out = []
        for d in deps:
            cur = self._current(d)
            if cur is None:
                continue
            for r in cur.replicas:
                g = self.view.gpus.get(r.gpu)
                pressure, thermal = gpu_levels(g, self.cfg.pressure_limits, self.cfg.thermal_limits)
                out.append(Candidate(r, self.stats.of(r.key), g, self.limit(cur, r.concurrency), pressure, thermal))
        return out

    # -- one request ----------------------------------------------------------------------------

    async def handle(self, path: str, raw: bytes, headers) -> Outcome:
        """Answer one /v1/chat/completions or /v1/completions request (APIError for a clean error)."""
        t = Trace()
        try:
            out = await self._handle(path, raw, headers, t)
        except APIError as e:
            t.status, t.error = e.status, e.message
            M.REQUESTS.labels(t.model if t.resolved else "-", str(e.status)).inc()
            self._log(t)
            raise
        except asyncio.CancelledError:          # the client went away (queued, or waiting for the backend)
            t.status, t.error = 499, "the client went away before the answer"
            M.REQUESTS.labels(t.model if t.resolved else "-", "499").inc()
            self._log(t)
            raise
        if out.stream is None:
            M.REQUESTS.labels(t.model, str(out.status)).inc()
            self._log(t)
        return out

    async def _handle(self, path: str, raw: bytes, headers, t: Trace) -> Outcome:
        caller = self.clients.caller(headers.get("authorization"))
        t.tenant = caller.tenant
        chat = path.endswith("/chat/completions")
        body = validate.parse(raw)
        info = validate.request(body, chat)
        t.model = info["model"][:200]
        primary, fallback = self.view.resolve(info["model"], caller.tenant)
        if not primary and not self.view.updated_at:
            # no view of the fleet yet (a gateway just started): not "no such model", which clients do not retry
            raise APIError(503, "the gateway has no view of the deployments yet (it is starting or cannot reach "
                                "the control plane): retry", code="not_ready", headers={"retry-after": "2"})
        if not primary:
            raise validate.model_not_found(info["model"])
        t.resolved = True         # a model of the fleet: a metric label from now on (not any name a client sends)
        context = min((d.context for d in primary if d.context), default=0)
        for name in ("max_tokens", "max_completion_tokens"):      # each one given, named as itself
            validate.check_context(body.get(name), context, name)
        prio = validate.priority(headers.get("x-gpumesh-priority"),
                                 self.cfg.priorities.get(caller.tenant or "", "standard"))
        deadline = validate.deadline_ms(headers.get("x-gpumesh-deadline-ms")) or self.cfg.default_deadline_ms or None
        allow = validate.flag(headers.get("x-gpumesh-allow-fallback"), "x-gpumesh-allow-fallback")
        if allow is None:
            allow = (caller.tenant or "") in self.cfg.fallback_tenants
        timeout = self._wait_bound(deadline, primary)
        ckey = skey = None
        if self.cache.enabled and not info["stream"] and cachemod.deterministic(body):
            ckey = cachemod.key(caller.tenant, path, body)
            hit = self.cache.get(ckey)
            if hit is not None:
                M.CACHE_HITS.labels(t.model, "exact").inc()
                M.CACHE_SAVED.labels(t.model, "exact").inc(hit[1])
                t.cache, t.replica, t.why = "hit", "cache", "exact-match cache hit"
                return Outcome(200, hit[0], headers={"x-gpumesh-served-by": "cache", "x-gpumesh-cache": "hit"})
            M.CACHE_MISSES.labels(t.model, "exact").inc()
            t.cache = "miss"
        if self.semcache is not None and not info["stream"] and cachemod.deterministic(body):
            out, skey = await self._semantic(caller.tenant, path, body, t)
            if out is not None:
                return out
        asleep = self.waker.asleep(primary)
        rewaking = None
        if asleep:      # scaled to zero, and no cache answered: wake it and hold the request while a replica starts
            await self.waker.wake(asleep)
            timeout = self.waker.hold_seconds(deadline)
            rewaking = asyncio.ensure_future(self.waker.keep_waking(asleep))    # a Wake that failed is asked again
        max_tokens = info["max_tokens"] or 16
        ctx = RouteContext(",".join(sorted(d.name for d in primary)),
                           affinity_key(caller.tenant, body, self.cfg.affinity_prefix_chars), max_tokens,
                           first_token_by=t.start + deadline / 1000 if deadline else None)
        try:
            slot, deps = await self._admit(primary, fallback if allow else [], ctx, prio, timeout, t)
        except Gone:
            # its deployments were deleted while it waited: answered now as a request arriving now is (404 for
            # a name that serves the caller nothing any more; else retry, and be routed to what serves it now)
            if not self.view.resolve(info["model"], caller.tenant)[0]:
                raise validate.model_not_found(info["model"]) from None
            raise APIError(503, f"model: the deployments serving {validate.show(info['model'])} changed while the "
                                "request waited: retry", param="model", code="model_changed",
                           headers={"retry-after": "1"}) from None
        finally:
            if rewaking is not None:
                rewaking.cancel()
        if deps is not primary:    # the fallback's: a retry or a continuation waits in the fallback's queue, not
            # at the head of the primary's, where it blocked every request behind it from the primary's replicas
            ctx = dataclasses.replace(ctx, model=",".join(sorted(d.name for d in deps)))
        dep = next(d for d in deps if d.name == slot.candidate.replica.deployment)
        return await self._call(path, body, info["stream"], slot, deps, dep, ctx, prio, t, ckey, skey)

    async def _semantic(self, tenant, path: str, body: dict, t: Trace):
        """(an answer from the semantic cache, or None and what to store the backend's answer under)."""
        started = time.monotonic()
        hit, pending = await self.semcache.lookup(tenant, path, body)
        if pending is None:
            if semcache.split(tenant, path, body) is not None:
                M.CACHE_SKIPPED.labels(t.model).inc()
            return None, None
        M.EMBED.observe(time.monotonic() - started)
        if hit is None:
            M.CACHE_MISSES.labels(t.model, "semantic").inc()
            t.cache = (t.cache + ",semantic-miss").lstrip(",")
            return None, pending
        M.CACHE_HITS.labels(t.model, "semantic").inc()
        M.CACHE_SAVED.labels(t.model, "semantic").inc(hit.tokens)
        sim = f"{hit.similarity:.4f}"
        t.cache, t.replica = "semantic", "cache"
        t.why = f"semantic cache hit (similarity {sim} >= bound {self.semcache.index.bound:.4f})"
        return Outcome(200, hit.body, headers={"x-gpumesh-served-by": "cache", "x-gpumesh-cache": "semantic",
                                               "x-gpumesh-cache-similarity": sim}), None

    def _wait_bound(self, deadline_ms: float | None, deps) -> float:
        """How long the request may wait for a slot: its deadline (to the first token) minus the expected time
        to the first token once it has one (gpu-aware; 0 for the baselines), at most queue_timeout_seconds."""
        if deadline_ms is None:
            return self.cfg.queue_timeout_seconds
        left = deadline_ms / 1000 - self.policy.first_token(self.candidates(deps))
        return max(0.0, min(left, self.cfg.queue_timeout_seconds))

    async def _admit(self, primary, fallback, ctx: RouteContext, prio: str, timeout: float, t: Trace):
        cands = self.candidates(primary)
        healthy = any(self.policy.healthy(c) for c in cands)
        if fallback and not healthy:
            return await self._fallback(fallback, ctx, prio, timeout, t, "every replica unavailable"), fallback
        M.QUEUE_DEPTH.labels(ctx.model).set(self.admission.depth(ctx.model) + 1)
        try:
            slot = await self.admission.acquire(lambda: self.candidates(primary), ctx, prio, timeout,
                                                live=lambda: self.serves(primary))
        except Gone:                          # its deployments went away: _on_view set the gauge
            raise
        except asyncio.CancelledError:        # the client went away while waiting: it left the queue
            M.QUEUE_DEPTH.labels(ctx.model).set(self.admission.depth(ctx.model))
            raise
        except Rejected as e:
            M.QUEUE_DEPTH.labels(ctx.model).set(self.admission.depth(ctx.model))
            if fallback:
                return await self._fallback(fallback, ctx, prio, timeout, t, str(e)), fallback
            M.REJECTED.labels(t.model, e.reason).inc()
            raise APIError(429, f"{e}; retry after {self.cfg.retry_after_seconds}s"
                           + ("" if healthy else " (every replica is unavailable: GPU critical, throttling or "
                                                  "failing)"), code=e.reason,
                           headers={"retry-after": str(self.cfg.retry_after_seconds)}) from None
        M.QUEUE_DEPTH.labels(ctx.model).set(self.admission.depth(ctx.model))
        M.QUEUE_WAIT.labels(t.model).observe(slot.waited)
        t.queued_s = slot.waited
        if slot.waited > 0 and not healthy:
            t.degraded = "queued"
        t.replica, t.why = slot.candidate.key, slot.why
        return slot, primary

    async def _fallback(self, fallback, ctx: RouteContext, prio: str, timeout: float, t: Trace, why: str) -> Slot:
        fctx = RouteContext(",".join(sorted(d.name for d in fallback)), ctx.affinity_key, ctx.max_tokens)
        try:
            slot = await self.admission.acquire(lambda: self.candidates(fallback), fctx, prio, timeout,
                                                live=lambda: self.serves(fallback))
        except Gone:
            raise
        except Rejected as e:
            M.REJECTED.labels(t.model, e.reason).inc()
            raise APIError(429, f"{why}; the fallback variant too: {e}; retry after {self.cfg.retry_after_seconds}s",
                           code=e.reason, headers={"retry-after": str(self.cfg.retry_after_seconds)}) from None
        M.FALLBACKS.labels(t.model).inc()
        t.degraded, t.replica, t.why = "fallback", slot.candidate.key, f"fallback ({why}): {slot.why}"
        t.queued_s = slot.waited
        return slot

    def _headers(self, slot: Slot, t: Trace) -> dict[str, str]:
        h = {"x-gpumesh-served-by": slot.candidate.key}
        if t.degraded:
            h["x-gpumesh-degraded"] = t.degraded
        if t.degraded == "queued":
            h["x-gpumesh-held-ms"] = str(round(t.queued_s * 1000))
        return h

    async def _call(self, path, body, stream, slot: Slot, deps, dep, ctx, prio, t: Trace, ckey,
                    skey=None) -> Outcome:
        attempts = 0
        while True:
            attempts += 1
            c = slot.candidate
            dep = self.view.deployments.get(c.replica.deployment, dep)
            body["model"] = dep.model
            data = json.dumps(body).encode()
            started = time.monotonic()
            try:
                if stream:
                    s = await proxy.open_stream(self.http, c.replica.endpoint, path, data, c.replica.api_key,
                                                  c.replica.certificate)
                    t.ttft = time.monotonic() - t.start
                    t.backend_s += time.monotonic() - started
                    plan = Plan(path, body, path.endswith("/chat/completions"), deps, ctx, prio, self.resumes)
                    seg = Segment(s, slot, started)
                    relay = StreamRelay(self, seg, t, plan).run()
                    release_if_never_started(relay, seg)
                    return Outcome(200, stream=relay, headers=self._headers(slot, t))
                answer = await proxy.complete(self.http, c.replica.endpoint, path, data, c.replica.api_key,
                                              c.replica.certificate)
                t.backend_s += time.monotonic() - started
            except proxy.BackendFailed as e:
                t.backend_s += time.monotonic() - started
                self._failed(slot, e)
                # retried once; a refused or cut connection (no work done) on every other replica in turn
                if attempts > 1 and not (e.unreachable and attempts < sum(len(d.replicas) for d in deps)):
                    raise APIError(502, f"the model server failed twice (last: {c.key}: {e})",
                                   code="backend_failed") from None
                M.RETRIES.labels(t.model).inc()
                t.retries += 1
                ctx = dataclasses.replace(ctx, exclude=ctx.exclude | {c.key})
                slot = await self._retry_slot(deps, ctx, prio, t)
                continue
            except APIError:
                c.stats.ok()              # the request was refused, the replica is fine
                slot.release()
                raise
            except BaseException:
                # frees the half-open probe only if this request took it: a bare breaker.release() here freed
                # another request's probe in flight, and a second probe went to a replica still on trial
                slot.release()
                raise
            e2e = time.monotonic() - started
            usage = _usage(answer)
            t.tokens_in, t.tokens_out = usage
            c.stats.observe(None, e2e / max(usage[1], 1))
            c.stats.ok(c.risk_state)
            slot.release()
            self._measure(t, c, e2e, None)
            # the keys name the model asked for, not the variant that served: a fallback's answer stored under
            # them would be replayed, untagged, to requests the primary variant serves again
            if ckey and t.degraded != "fallback":
                self.cache.put(ckey, answer, usage[1])
            if skey is not None and t.degraded != "fallback":
                self.semcache.put(skey, answer, usage[1])
            return Outcome(200, answer, headers=self._headers(slot, t))

    async def _retry_slot(self, deps, ctx, prio, t: Trace) -> Slot:
        if not any(c.key not in ctx.exclude and c.replica.ready for c in self.candidates(deps)):
            # no other replica at all: fail now (one that is only busy, hot or open is waited for below)
            raise APIError(502, "the model server failed before its first token and the model has no other "
                                "replica for the retry", code="backend_failed",
                           headers={"retry-after": str(self.cfg.retry_after_seconds)})
        try:
            # first in its class: the request was admitted before those waiting now (at the back, a retry
            # waited behind every request that arrived while it failed)
            # within what is left of its deadline to the first token, which the failed attempt did not bring
            wait = self.cfg.queue_timeout_seconds
            if ctx.first_token_by is not None:
                wait = max(0.0, min(wait, ctx.first_token_by - time.monotonic()))
            slot = await self.admission.acquire(lambda: self.candidates(deps), ctx, prio, wait, first_in_class=True,
                                                live=lambda: self.serves(deps))
        except Rejected as e:
            raise APIError(503, f"the model server failed and no other replica took the retry: {e}",
                           code="backend_failed", headers={"retry-after": str(self.cfg.retry_after_seconds)}) from None
        t.replica, t.why = slot.candidate.key, f"retry: {slot.why}"
        return slot

    def _failed(self, slot: Slot, e: proxy.BackendFailed) -> None:
        why = str(e)
        c = slot.candidate
        c.stats.failed(e.unreachable, c.risk_state)
        slot.release()
        M.BACKEND_ERRORS.labels(c.replica.deployment, c.key).inc()
        M.CIRCUIT.labels(c.key).set(STATE_VALUE[c.stats.breaker.state])
        log(logger, logging.WARNING, "backend failed", replica=c.key, endpoint=c.replica.endpoint, error=why,
            circuit=c.stats.breaker.state)

    def _measure(self, t: Trace, c: Candidate, e2e: float, ttft: float | None, tpot: float | None = None) -> None:
        model, rep = c.replica.deployment, c.key
        M.E2E.labels(model, rep).observe(e2e)
        if ttft is not None:
            M.TTFT.labels(model, rep).observe(ttft)
        if tpot is not None:
            M.TPOT.labels(model, rep).observe(tpot)
        M.TOKENS.labels(model, "in").inc(t.tokens_in)
        M.TOKENS.labels(model, "out").inc(t.tokens_out)

    def _log(self, t: Trace) -> None:
        if t.status == 200 and t.backend_s > 0 and t.ttft is None:     # whole answers (a stream also counts its client)
            M.OVERHEAD.labels(t.model).observe(max(0.0, time.monotonic() - t.start - t.backend_s - t.queued_s))
        if not self.cfg.log_requests:
            return
        log(logger, logging.INFO, "request", model=t.model, tenant=t.tenant or "*", status=t.status,
            replica=t.replica, policy=self.policy.NAME, why=t.why, degraded=t.degraded, retries=t.retries,
            cache=t.cache, queued_ms=round(t.queued_s * 1000, 1),
            ttft_ms=round(t.ttft * 1000, 1) if t.ttft is not None else None,
            e2e_ms=round((time.monotonic() - t.start) * 1000, 1), backend_ms=round(t.backend_s * 1000, 1),
            tokens_in=t.tokens_in, tokens_out=t.tokens_out, resumed=t.resumed,
            error=t.error)


def _usage(answer: bytes) -> tuple[int, int]:
    try:
        u = json.loads(answer).get("usage") or {}
        return int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0)
    except (ValueError, AttributeError, TypeError):
        return 0, 0

