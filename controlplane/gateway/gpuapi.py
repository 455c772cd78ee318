"""Seed 003's GPU endpoints and seed 002's resource-manager endpoints, answered from the gateway's view of
the fleet and its own measurements (no control-plane call, except /v1/gpu/memory-forecast, which asks the
control plane's ForecastService)."""

from __future__ import annotations

import time

from controlplane.gateway import cost
from controlplane.gateway.apierror import APIError, invalid
from controlplane.gateway.clients import Caller
from controlplane.gateway.policy import gpu_levels

GIB = 1 << 30


def _gpu(gw, g) -> dict:
    pressure, thermal = gpu_levels(g, gw.cfg.pressure_limits, gw.cfg.thermal_limits)
    return {"node": g.node, "index": g.index, "memory_used_bytes": g.memory_used,
            "memory_total_bytes": g.memory_total, "memory_available_bytes": max(g.memory_total - g.memory_used, 0),
            "memory_used_pct": round(100.0 * g.memory_used / g.memory_total, 1) if g.memory_total else None,
            "utilization_pct": g.utilization, "temperature_c": g.temperature_c, "power_w": g.power_w,
            "throttled": g.throttled, "pressure": pressure, "thermal_state": thermal, "healthy": g.healthy,
            "reading": g.has_reading}


def _vram(gw, d) -> int:
    m = gw.view.models.get(d.model)
    v = next((v for v in m.variants if v.name == d.variant), None) if m is not None else None
    return int(v.vram.total_bytes) if v is not None and v.HasField("vram") else 0


def _by_state(gw, s) -> dict:
    """Per risky GPU state the replica was sent requests in: requests and failures seen there (decayed) and
    the failure probability gpu-aware prices it by (cost.py)."""
    out = s.book.evidence(s.by_state)
    for state, ev in out.items():
        ev["failure_probability"] = round(s.failure_probability(state, cost.failure_prior(state, gw.cfg)), 4)
    return out


def _model(gw, d) -> dict:
    reps = []
    for r in d.replicas:
        s = gw.stats.of(r.key)
        reps.append({"replica": r.key, "endpoint": r.endpoint, "scheme": r.scheme, "ready": r.ready,
                     "gpu": f"{r.gpu[0]}/{r.gpu[1]}",
                     "ema_ttft_ms": round(s.ttft_ema * 1000, 1) if s.ttft_ema is not None else None,
                     "ema_tpot_ms": round(s.tpot_ema * 1000, 2) if s.tpot_ema is not None else None,
                     "in_flight": s.in_flight, "requests": s.requests, "failures": s.failures,
                     "circuit": s.breaker.state, "circuit_shut": s.breaker.shut(),   # half-open, port not back: shut
                     "backend_waiting": r.waiting, "kv_cache_usage": r.kv_usage,
                     # requests and failures seen while its GPU was in each risky state (decayed; cost.py)
                     "by_gpu_state": _by_state(gw, s)})
    return {"name": d.name, "model": d.model, "variant": d.variant, "tenant": d.tenant, "backend": d.backend,
            "context": d.context, "fallback_rank": d.fallback_rank, "vram_bytes": _vram(gw, d),
            "queue": gw.admission.depth(d.name), "replicas": reps}


def status(gw, caller: Caller) -> dict:
    deps = gw.view.visible(caller.tenant)
    mine = {r.gpu for d in deps for r in d.replicas}
    gpus = [_gpu(gw, g) for k, g in sorted(gw.view.gpus.items()) if caller.tenant is None or k in mine]
    return {"gpus": gpus, "models": [_model(gw, d) for d in sorted(deps, key=lambda d: d.name)],
            "policy": gw.policy.NAME, "view_age_seconds": round(time.time() - gw.view.updated_at, 2)
            if gw.view.updated_at else None}


async def memory_forecast(gw, caller: Caller, hours: str | None) -> dict:
    """Each visible GPU's memory use over the next `hours`: from the control plane's ForecastService (the
    highest point and interval edge over the horizon) where it can forecast, else the current use."""
    from controlplane.gateway import forecastclient
    try:
        h = float(hours) if hours not in (None, "") else 1.0
    except ValueError:
        h = -1
    if not 0 < h <= 168:
        raise invalid("hours", f"{hours!r} is not a number of hours", "more than 0, at most 168")
    st = status(gw, caller)
    got = await forecastclient.gpu_memory(gw.cfg, [(g["node"], g["index"]) for g in st["gpus"]], h * 3600)
    out, reasons = [], set()
    for g in st["gpus"]:
        f = got.get((g["node"], g["index"]))
        row = {"node": g["node"], "index": g["index"], "memory_used_bytes": g["memory_used_bytes"],
               "memory_total_bytes": g["memory_total_bytes"]}
        if isinstance(f, str) or f is None or not f.points:
            reasons.add(f or "no answer")
            row.update({"source": "current-use", "projected_used_bytes": g["memory_used_bytes"],
                        "headroom_bytes": g["memory_available_bytes"],
                        "available_for_inference_bytes": max(g["memory_available_bytes"], 0), "forecast_error": f})
        else:
            peak, high = max(p.value for p in f.points), max(p.hi for p in f.points)
            headroom = int(g["memory_total_bytes"] - high)
            row.update({"source": "forecast", "projected_used_bytes": int(peak), "projected_high_bytes": int(high),
                        "headroom_bytes": headroom, "available_for_inference_bytes": max(headroom, 0),
                        "model": f.model, "backtest_mase": f.backtest_mase, "level": f.level,
                        "history_points": f.history_points, "history_span_seconds": f.history_span_seconds})
        out.append(row)
    sources = {r["source"] for r in out}
    source = sources.pop() if len(sources) == 1 else ("mixed" if sources else "current-use")
    if source == "forecast":
        note = ("from the control plane's ForecastService: projected_used_bytes is the highest forecast point over "
                "the horizon, headroom is the total less the interval's highest edge")
    else:
        note = ("no forecast from the control plane's forecasting service for " +
                ("some GPUs" if source == "mixed" else "these GPUs") + f" ({'; '.join(sorted(map(str, reasons)))}): "
                "their projection is the current use, and their headroom is what is free now")
    return {"hours": h, "source": source, "note": note, "gpus": out}


def models_optimal(gw, caller: Caller, agent_type: str | None) -> dict:
    ranked = []
    for d in gw.view.visible(caller.tenant):
        ready = [r for r in d.replicas if r.ready]
        cands = gw.candidates([d])
        usable = [c for c in cands if c.replica.ready and c.pressure != "critical"
                  and c.thermal not in ("throttling", "critical") and not c.stats.breaker.shut()]
        reqs = sum(c.stats.requests for c in cands)
        fails = sum(c.stats.failures for c in cands)
        reliability = 1.0 - fails / reqs if reqs else 1.0
        ttfts = [c.stats.ttft_ema for c in cands if c.stats.ttft_ema is not None]
        latency = min(ttfts) if ttfts else None
        fit = len(usable) / max(len(d.replicas), 1)
        score = fit * reliability / (1.0 + (latency or 0.0))
        ranked.append({"model": d.name, "registry_model": d.model, "variant": d.variant, "backend": d.backend,
                       "ready_replicas": len(ready), "usable_replicas": len(usable), "fit": round(fit, 3),
                       "ema_ttft_ms": round(latency * 1000, 1) if latency is not None else None,
                       "reliability": round(reliability, 4), "score": round(score, 4)})
    ranked.sort(key=lambda x: (-x["score"], x["model"]))
    return {"agent_type": agent_type or "", "note": "every model serves every agent type here; ranked by fit "
            "(replicas on GPUs that are not critical or throttling, circuits closed), latency and reliability",
            "models": ranked}


def rebalance(gw, caller: Caller, apply: str | None) -> dict:
    if apply not in (None, "", "true", "false", "1", "0"):
        raise invalid("apply", f"{apply!r} is not a boolean", "true, false")
    applying = apply in ("true", "1")
    actions = []
    for d in gw.view.visible(caller.tenant):
        for c in gw.candidates([d]):
            reasons = []
            if c.pressure == "critical":
                reasons.append("GPU memory pressure critical")
            if c.thermal in ("throttling", "critical"):
                reasons.append(f"GPU thermal state {c.thermal}")
            if c.stats.breaker.shut():
                reasons.append("circuit open after failures" if not c.stats.breaker.unreachable else
                               "circuit open: the replica refused or cut connections and nothing listens yet")
            if not reasons:
                continue
            routed = gw.policy.uses_gpu or gw.policy.uses_breaker
            soft = c.thermal == "throttling" and len(reasons) == 1      # throttling only: weighed, not avoided
            detail = ("new requests count its measured slowdown and go to it only when it is still expected to "
                      "finish first" if soft else "new requests go to the model's other replicas (or wait, or fall "
                      "back) until it recovers; a critical GPU only when waiting for a sound replica is expected to "
                      "take longer (its risk counted) or to pass the request's deadline")
            actions.append({"action": "route-around", "replica": c.key, "reason": "; ".join(reasons),
                            "applied": routed, "detail": detail if routed else
                            f"the {gw.policy.NAME} policy does not route around GPU state"})
            actions.append({"action": "move-replica", "replica": c.key, "reason": "; ".join(reasons),
                            "applied": False, "detail": "recommended: `meshctl rollout restart` or scale to place "
                            "it on another GPU; the gateway does not change deployments"})
    return {"apply": applying, "actions": actions}


async def benchmark_model(gw, caller: Caller, model_name: str | None, max_tokens: str | None) -> dict:
    """Seed 003's benchmark: one short streamed completion on each ready replica of the model (taking the
    replica's slot like any request, so it never overloads one), reporting time to first token and tokens/s."""
    import json as _json
    import time as _time

    from controlplane.gateway import proxy
    from controlplane.gateway.admission import Rejected
    from controlplane.gateway.policy import RouteContext
    from controlplane.gateway.service import Trace
    from controlplane.gateway.relay import count_event
    if not model_name:
        raise invalid("model_name", "is required: a model from GET /v1/models")
    try:
        n = int(max_tokens) if max_tokens not in (None, "") else 32
    except ValueError:
        n = 0
    if not 1 <= n <= 512:
        raise invalid("max_tokens", f"{max_tokens!r} is out of range", "1 to 512")
    primary, _ = gw.view.resolve(model_name, caller.tenant)
    if not primary:
        raise APIError(404, f"model_name: {model_name!r} is not a model you can use", param="model_name",
                       code="model_not_found")
    body = _json.dumps({"prompt": "Once upon a time, by the sea,", "max_tokens": n, "temperature": 0,
                        "stream": True, "model": primary[0].model}).encode()
    out = []
    for c in gw.candidates(primary):
        row = {"replica": c.key, "backend": c.replica.backend, "gpu": f"{c.replica.gpu[0]}/{c.replica.gpu[1]}"}
        if not c.replica.ready:
            out.append({**row, "error": "not ready"})
            continue
        try:
            slot = await gw.admission.acquire(lambda c=c: [x for x in gw.candidates(primary) if x.key == c.key],
                                              RouteContext(f"bench:{c.key}"), "sheddable", 30)
        except Rejected as e:
            out.append({**row, "error": str(e)})
            continue
        start, tokens, first = _time.monotonic(), 0, None
        try:
            s = await proxy.open_stream(gw.http, c.replica.endpoint, "/v1/completions", body,
                                       c.replica.api_key, c.replica.certificate)
            first = _time.monotonic() - start
            events = list(s.first)
            try:
                while True:
                    for data in events:
                        if data != b"[DONE]":
                            tokens += count_event(data, Trace())
                    if b"[DONE]" in events:
                        break
                    events = s.reader.feed(await s.chunks.__anext__())
            except StopAsyncIteration:
                pass
            finally:
                await s.close()
            total = _time.monotonic() - start
            out.append({**row, "ttft_ms": round(first * 1000, 1), "tokens": tokens,
                        "tokens_per_s": round((tokens - 1) / (total - first), 1) if tokens > 1 and total > first else None,
                        "e2e_ms": round(total * 1000, 1)})
        except (proxy.BackendFailed, APIError) as e:
            out.append({**row, "error": str(e)})
        except proxy.httpx.HTTPError as e:          # the stream cut after its first event: the row says so, not a 500
            out.append({**row, "error": f"the stream broke: {proxy.failed(e)}"})
        finally:
            slot.release()
    return {"model": model_name, "max_tokens": n, "replicas": out}


def models(gw, caller: Caller) -> dict:
    """Seed 002's /models: the models with their resource needs."""
    out = []
    for d in sorted(gw.view.visible(caller.tenant), key=lambda d: d.name):
        out.append({"name": d.name, "model": d.model, "variant": d.variant, "backend": d.backend,
                    "vram_bytes": _vram(gw, d), "context": d.context, "replicas": len(d.replicas),
                    "ready_replicas": sum(1 for r in d.replicas if r.ready), "fallback_rank": d.fallback_rank})
    return {"models": out}


def openai_models(gw, caller: Caller) -> dict:
    seen, data = set(), []
    for d in sorted(gw.view.visible(caller.tenant), key=lambda d: d.name):
        for name in (d.name, d.model):
            if name not in seen:
                seen.add(name)
                data.append({"id": name, "object": "model", "created": 0, "owned_by": d.tenant or "gpumesh"})
    return {"object": "list", "data": data}


def policies(gw, tenant: str | None = None) -> dict:
    """The routing policy and the scaling policies of the deployments the caller may use (from the view)."""
    from mesh.scalingpolicy import policy_doc
    raw = gw.view.raw
    deps = [d for d in (raw.deployments if raw is not None else ())
            if d.spec.HasField("scaling") and (tenant is None or d.spec.tenant == tenant)]
    return {"routing_policy": gw.policy.NAME, "available": ["gpu-aware", "round-robin", "least-loaded"],
            "scaling_policies": [policy_doc(d) for d in sorted(deps, key=lambda d: d.spec.name)]}
