"""`meshctl bench autoscale --mode real`: the policies on a real local cluster at real time (short series).

A local cluster of ``max_replicas`` simulated H100 hosts (one GPU each, MIG) serves SmolLM2-135M with real
llama.cpp replicas (tools/meshctl/bench_serve_cluster.py's ServeCluster) behind a real `mesh-gateway`
(least-loaded routing, which holds requests while no replica is ready). For each policy the deployment is
scaled to its initial replicas and waited for; then the arrivals (the series' Poisson arrivals, in real
seconds) are sent as streamed completions through the gateway, and every tick the bench samples what its
clients see (time-averaged requests in flight and waiting, arrivals per second, TTFT), asks the same scaler
the calibrated mode uses for a replica count, and sets it through the DeploymentService (`Scale`).

Accounting: slice-seconds are the deployment's replicas (any state but gone) at each tick times the tick;
SLO attainment and goodput from the clients' TTFTs; a cold-start miss is a request that arrived while no
ready replica had a free slot (requests in flight >= ready replicas x slots) and a replica was starting,
and that missed the SLO (it waited on the cold start).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from mesh.autoscale import demand
from mesh.autoscale.benchrun import BenchSpec, bench_policy, compare, figures_of
from mesh.autoscale.latency import LatencyModel
from mesh.autoscale.scalers import AutoscalerScaler, FixedScaler, RateForecaster, peak_replicas
from mesh.autoscale.simulate import percentile
from mesh.autoscale.types import Sample

MAX_REAL_REPLICAS = 4          # llama.cpp replicas this bench starts at most (each a process on this host)


def _counts(d) -> tuple[int, int, int]:
    """(ready, starting, all) replicas of a deployment."""
    from gpumesh.v1 import deployment_service_pb2 as D
    ready = sum(1 for r in d.replicas if r.state == D.REPLICA_STATE_READY and r.endpoint)
    starting = sum(1 for r in d.replicas if r.state in (D.REPLICA_STATE_PENDING, D.REPLICA_STATE_STARTING))
    alive = sum(1 for r in d.replicas if r.state != D.REPLICA_STATE_TERMINATING)
    return ready, starting, alive


async def _replay(mesh, gw_url: str, deployment: str, arrivals: np.ndarray, model: LatencyModel, scaler,
                  spec: BenchSpec, end_s: float, say) -> dict:
    import httpx

    from mesh.loadgen.client import stream_completion
    from mesh.models.bench import synthetic_prompt
    state = {"inflight": 0, "area": 0.0, "last": 0.0, "arrived": 0, "ttft": [], "ready": 0, "starting": 0}
    results: list[tuple[float, float | None, bool]] = []      # (arrival, ttft, waited on a cold start)
    t0 = time.perf_counter()

    def now() -> float:
        return time.perf_counter() - t0

    def account() -> None:
        t = now()
        state["area"] += state["inflight"] * (t - state["last"])
        state["last"] = t

    async def one(i: int, at: float, client: httpx.AsyncClient) -> None:
        await asyncio.sleep(max(0.0, at - now()))
        account()
        cold = state["inflight"] >= state["ready"] * model.slots and state["starting"] > 0
        state["inflight"] += 1
        state["arrived"] += 1
        body = {"model": deployment, "prompt": synthetic_prompt(i + 7, model.prompt_tokens),
                "max_tokens": model.max_tokens, "temperature": 0.8, "seed": i}
        r = await stream_completion(client, gw_url, body, index=i)
        account()
        state["inflight"] -= 1
        ttft = r.ttft_s if r.ok else None
        if ttft is not None:
            state["ttft"].append(ttft)
        results.append((at, ttft, cold))

    slice_s = 0.0
    events = 0
    current = None
    async with httpx.AsyncClient(timeout=600, trust_env=False) as client:
        tasks = [asyncio.create_task(one(i, float(a), client)) for i, a in enumerate(arrivals)]
        tick = spec.tick_s
        while True:
            await asyncio.sleep(max(0.0, tick - now()))
            account()
            d = await asyncio.to_thread(mesh.get_deployment, deployment)
            ready, starting, alive = _counts(d)
            state["ready"], state["starting"] = ready, starting
            slice_s += alive * spec.tick_s
            ttfts = state["ttft"]
            sample = Sample(t=tick, in_flight=state["area"] / spec.tick_s, request_rate=state["arrived"] / spec.tick_s,
                            ttft_ms=1000 * sum(ttfts) / len(ttfts) if ttfts else 0.0, ready=ready)
            state.update(area=0.0, arrived=0, ttft=[])
            want = min(MAX_REAL_REPLICAS, max(0, scaler.scale(tick, sample, ready=ready, starting=starting)))
            if want != d.spec.replicas:
                await asyncio.to_thread(mesh.scale_deployment, deployment, want)
            if current is not None and want != current:
                events += 1
            current = want
            if tick >= end_s and all(t.done() for t in tasks):
                break
            if int(tick) % 20 == 0:
                say(f"t={tick:.0f}s: {ready} ready, {starting} starting, {state['inflight']} in flight, want {want}")
            tick += spec.tick_s
        await asyncio.gather(*tasks)
    met = sum(1 for _, t, _ in results if t is not None and t <= spec.slo_ttft_s)
    misses = sum(1 for _, t, cold in results if cold and (t is None or t > spec.slo_ttft_s))
    ttfts = [t for _, t, _ in results if t is not None]
    hours = slice_s / 3600
    return {"requests": len(results), "slo_attainment": round(met / len(results), 5) if results else 1.0,
            "goodput_per_slice_hour": round(met / hours, 3) if hours else 0.0, "slice_hours": round(hours, 5),
            "cost": round(hours * spec.replica_cost_per_hour, 5), "cold_start_misses": misses,
            "scale_events": events, "forecast_error": None, "goodput": met,
            "failed": sum(1 for _, t, _ in results if t is None),
            "ttft_p50_ms": round(1000 * percentile(ttfts, 50), 1), "ttft_p99_ms": round(1000 * percentile(ttfts, 99), 1)}


def run_real(series: demand.Series, model: LatencyModel, spec: BenchSpec, policies: tuple[str, ...], progress) -> dict:
    from tools.meshctl.bench_serve_cluster import DEPLOYMENT, Gateway, ServeCluster
    arrivals = demand.arrivals(series, spec.rate_scale, spec.speedup, spec.seed)
    end_s = series.duration_s / spec.speedup
    _, lam = demand.rates(series, spec.rate_scale, spec.speedup)
    hosts = min(MAX_REAL_REPLICAS, spec.policy.max_replicas)
    policy = replace(spec.policy, max_replicas=hosts, target=spec.policy.target * model.slots)
    service = model.service_s()
    results = {}
    with tempfile.TemporaryDirectory(prefix="gpumesh-bench-autoscale-") as d:
        sc = ServeCluster(Path(d), hosts, 512, 1.0, progress.step)
        sc.start()
        gw = None
        try:
            gw = Gateway(sc.cluster.endpoint, "least-loaded", Path(d)).start()
            for name in policies:
                forecaster = None
                if name == "fixed-peak":
                    n = peak_replicas(float(lam.max()), service, policy.target, hosts)
                    scaler, initial = FixedScaler(n), n
                else:
                    p = replace(bench_policy(policy, spec, model, name == "predictive"), target=policy.target)
                    if name == "predictive":
                        bucket = series.step_s / spec.speedup
                        forecaster = RateForecaster(bucket, model.cold_start_s + spec.tick_s, season=max(1, spec.season or 2),
                                                    level=spec.level, refit_every=spec.refit_every, min_history=8,
                                                    models=spec.models)
                    scaler = AutoscalerScaler(p, figures=figures_of(model),
                                              replica_cost_per_hour=spec.replica_cost_per_hour, forecaster=forecaster,
                                              tick_s=spec.tick_s)
                    initial = max(p.min_replicas, peak_replicas(float(lam[0]), service, p.target, hosts))
                progress.step(f"{name}: scaling to {initial} replicas before the run")
                sc.mesh.scale_deployment(DEPLOYMENT, initial)
                sc.mesh.wait_deployment(DEPLOYMENT, lambda x, n=initial: _counts(x)[0] == n == len(x.replicas),
                                        timeout=600, poll=0.5)
                progress.step(f"{name}: {len(arrivals)} requests over {end_s:.0f}s through the gateway")
                r = asyncio.run(_replay(sc.mesh, gw.url, DEPLOYMENT, arrivals, model, scaler, spec, end_s,
                                        progress.step))
                if forecaster is not None:
                    bucket = series.step_s / spec.speedup
                    nb = int(np.ceil(end_s / bucket))
                    counts = np.bincount(np.minimum((arrivals // bucket).astype(int), nb - 1), minlength=nb)
                    r["forecast_error"] = forecaster.log.error(counts / bucket)
                results[name] = r
        finally:
            if gw is not None:
                gw.stop()
            sc.stop()
    return {"mode": "real", "policies": results, "comparison": compare(results),
            "series": {"path": series.path, "points": int(len(series.t)), "step_s": series.step_s,
                       "duration_s": round(end_s, 3), "rate_scale": spec.rate_scale, "speedup": spec.speedup,
                       "peak_rate_rps": round(float(lam.max()), 4), "arrivals": int(len(arrivals)), "seed": spec.seed},
            "slo_ttft_ms": round(spec.slo_ttft_s * 1000, 3), "replicas_at_most": hosts,
            "calibration": model.to_dict(), "replica_cost_per_hour": spec.replica_cost_per_hour}
