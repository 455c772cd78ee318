"""What the autoscaler controller observes of one deployment: a `mesh.autoscale.Sample` from its replicas'
load signals, the replicas ready and starting, one replica's cost, and its cold start.

- Load: each READY replica's latest `Replica.load` (the agent's reading of the backend's /metrics, kept in
  memory by the deployment store, nodeagent/backends/loadsignals.py) when it was read from the replica's
  current workload and scraped: requests running (in flight) and waiting (queue) summed, KV-cache use and
  TTFT averaged, the request rate from the increase of each backend's `requests_total` counter since the
  controller's previous reading of it.
- A READY replica whose reading went stale (controlplane/controllers/autoscale_freshness.py) is taken to carry
  the mean load of the replicas read; one not read yet counts none.
- Cost: a running replica's slice priced as it is (mesh.cost), else the estimate for the slice it would
  get (controlplane/serving/replicacost.py).
- Figures (what sizes a predictive floor) from the registry when the deployment's own are not measured.
- Cold start: the latest of the deployment's own replicas' created -> ready time; else the registry's
  `model bench` load time of the variant plus a slice's start; else the configured default.
- Model identity: what a replica's time in service and TTFT depend on, so figures measured under one
  identity are not used under another.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import NamedTuple

from controlplane.serving import replicacost
from gpumesh.v1 import deployment_service_pb2 as D
from gpumesh.v1 import model_service_pb2 as M
from mesh.autoscale import Sample
from mesh.autoscale.planner import ServiceFigures

SLICE_START_S = 5.0          # added to a registry load time: a slice's creation, not measured there


def _secs(t) -> float:
    return t.seconds + t.nanos / 1e9 if t.seconds or t.nanos else 0.0


@dataclass
class Counters:
    """The previous `requests_total` reading per replica: (workload, total, time read)."""
    last: dict[str, tuple[str, float, float]] = field(default_factory=dict)

    def rate(self, r: D.Replica, load) -> tuple[float, float]:
        """(requests finished since the previous reading, seconds between the readings); (0, 0) on the first."""
        at = _secs(load.at)
        prev = self.last.get(r.id)
        self.last[r.id] = (load.workload_id, float(load.requests_total), at)
        if prev is None or prev[0] != load.workload_id or at <= prev[2]:
            return 0.0, 0.0
        return max(0.0, float(load.requests_total) - prev[1]), at - prev[2]

    def keep_only(self, ids: set[str]) -> None:
        for rid in [k for k in self.last if k not in ids]:
            del self.last[rid]


def counts(replicas: list[D.Replica]) -> tuple[int, int]:
    """(READY replicas, replicas on their way: pending, starting or failed-and-restarting)."""
    ready = sum(1 for r in replicas if r.state == D.REPLICA_STATE_READY)
    starting = sum(1 for r in replicas if r.state in (D.REPLICA_STATE_PENDING, D.REPLICA_STATE_STARTING,
                                                      D.REPLICA_STATE_FAILED))
    return ready, starting


def sample(now: float, replicas: list[D.Replica], loads: dict, counters: Counters,
           gaps=None) -> Sample:
    """The deployment's load now, from its READY replicas' latest readings. With `gaps` (the replicas whose load
    is unknown: autoscale_freshness.gaps), a replica whose reading went stale is taken to carry the mean load of
    those read (the in-flight, queued and request-rate sums scaled up to them), one not read (none yet, /metrics
    did not answer) counts none, and neither's counter moves, so its next reading counts the requests of the
    whole gap. None read: the load is zero (the caller does not observe it)."""
    stale = frozenset(gaps.stale) if gaps is not None else frozenset()
    skip = gaps.missing if gaps is not None else frozenset()
    in_flight = queue = kv = ttft = finished = 0.0
    spans: list[float] = []
    kv_n = ttft_n = 0
    ready = read = 0
    for r in replicas:
        if r.state != D.REPLICA_STATE_READY:
            continue
        ready += 1
        load = loads.get(r.id)
        if r.id in skip or load is None or not load.scraped or load.workload_id != r.workload_id:
            continue
        read += 1
        in_flight += load.requests_running
        queue += load.requests_waiting
        kv += load.kv_cache_usage
        kv_n += 1
        if load.ttft_seconds > 0:
            ttft += load.ttft_seconds * 1000
            ttft_n += 1
        n, dt = counters.rate(r, load)
        if dt > 0:
            finished += n
            spans.append(dt)
    counters.keep_only({r.id for r in replicas})
    rate = finished / (sum(spans) / len(spans)) if spans else 0.0
    scale = (read + len(stale)) / read if read else 1.0
    return Sample(t=now, in_flight=in_flight * scale, queue=queue * scale, kv_cache=kv / kv_n if kv_n else 0.0,
                  ttft_ms=ttft / ttft_n if ttft_n else 0.0, request_rate=rate * scale, ready=ready)


def replica_cost(replicas: list[D.Replica], slices: dict, need: int, isolation: int, gpu_models,
                 prices) -> float:
    """Dollars per hour of one replica: the dearest running replica's slice, else the cheapest estimate
    over the fleet's GPU models (0: no price known)."""
    if prices is None:
        return 0.0
    running = [slices[r.slice_id] for r in replicas if r.slice_id and r.slice_id in slices]
    if running:
        return max(replicacost.of_replicas(running, prices))
    return replicacost.cheapest(need, isolation, gpu_models, prices) or 0.0


def slots(spec: D.DeploymentSpec, variant) -> int:
    """Requests one replica serves at once: the deployment's `backend.concurrency` (1 unset), and 1 on
    llama.cpp, whose Python server decodes one request at a time whatever it is given."""
    if variant is not None and variant.backend == M.BACKEND_LLAMA_CPP:
        return 1
    return max(1, spec.backend.concurrency)


def _measured(variant, replicas: list[D.Replica], usable) -> list:
    """The variant's `model bench` figures that pass `usable`, on the replicas' GPU models when measured
    there, else on any GPU model."""
    if variant is None:
        return []
    gpu_models = {r.gpu_model for r in replicas if r.gpu_model}
    ms = [(k, m) for k, m in variant.measured.items() if usable(m)]
    return [m for k, m in ms if not gpu_models or k in gpu_models] or [m for _, m in ms]


def free_slot_ttft(variant, replicas: list[D.Replica]) -> float | None:
    """The registry's measured TTFT on a free slot (`meshctl model bench`, on the replicas' GPU models when
    measured there; the slowest), seconds; None when not measured (the controller then takes the observed)."""
    ttfts = [m.ttft_seconds for m in _measured(variant, replicas, lambda m: m.ttft_seconds > 0)]
    return max(ttfts) if ttfts else None


def registry_figures(variant, replicas: list[D.Replica], *, slots: int, cold_start_s: float) -> ServiceFigures | None:
    """A replica's figures from the registry's `model bench` of the variant (the slowest of the replicas' GPU
    models when measured there): the time in service of its bench request (TTFT + max_tokens / decode
    tokens per second) and the TTFT; None when not measured. What sizes a predictive policy's floor before
    the deployment's own requests were measured (a new leader, a deployment that has been quiet)."""
    ms = _measured(variant, replicas, lambda m: m.tokens_per_second > 0 and m.max_tokens > 0)
    if not ms:
        return None
    m = max(ms, key=lambda m: m.ttft_seconds + m.max_tokens / m.tokens_per_second)
    return ServiceFigures(service_s=m.ttft_seconds + m.max_tokens / m.tokens_per_second, ttft_s=m.ttft_seconds,
                          slots=max(1, slots), cold_start_s=cold_start_s)


def cold_start(replicas: list[D.Replica], variant, default_s: float) -> tuple[float, str]:
    """(seconds, where the figure comes from)."""
    seen = [(_secs(r.ready_at), _secs(r.ready_at) - _secs(r.created_at)) for r in replicas
            if r.HasField("ready_at") and r.HasField("created_at") and _secs(r.ready_at) > _secs(r.created_at)]
    if seen:
        return max(seen)[1], "replicas"
    loads = [m.load_seconds for m in _measured(variant, replicas, lambda m: m.load_seconds > 0)]
    if loads:
        return max(loads) + SLICE_START_S, "registry"
    return default_s, "default"



class ModelIdentity(NamedTuple):
    """What a replica's time in service and TTFT depend on (`model_identity`)."""
    model: str
    variant: str
    backend: int                 # the variant's backend kind (model_service.proto Backend)
    artifact: str
    artifact_sha256: str
    context: int
    concurrency: int
    gpu_layers: int
    device: str
    isolation: int
    vram_need: int               # bytes: with the isolation, picks the slice (the MIG profile: the compute share)
    companion_model: str = ""
    companion_variant: str = ""


def model_identity(spec: D.DeploymentSpec, variant, need: int,
                   companion: D.DeploymentSpec | None = None) -> ModelIdentity | None:
    """The deployment's model identity (None: the registry does not resolve it now, nothing to compare): the
    model, the variant (its backend kind, weights), the backend settings that change a request's speed
    (context, concurrency: batching, GPU layers offloaded, device: CUDA or CPU) and the slice (isolation and
    VRAM need, which pick the MIG profile and so the compute share); with a variant-overflow companion, its model
    and variant too (its replicas' load is measured with the deployment's). Not the replicas, labels, tenant,
    priority, restart stamp or scaling policy: they change no request's speed."""
    if variant is None and not need:
        return None
    b = spec.backend
    v = variant
    return ModelIdentity(spec.model, v.name if v is not None else spec.variant, int(v.backend) if v is not None else 0,
                         v.artifact if v is not None else "", v.artifact_sha256 if v is not None else "",
                         b.context, b.concurrency or 1, b.gpu_layers, b.device, int(spec.isolation), need,
                         companion.model if companion is not None else "",
                         companion.variant if companion is not None else "")


def identity_digest(identity: ModelIdentity | None) -> str:
    """A short stable digest of `identity` for the status (`AutoscalerStatus.figures_model`); "" for None."""
    if identity is None:
        return ""
    return hashlib.sha256(repr(tuple(identity)).encode()).hexdigest()[:16]


def identity_change(old: ModelIdentity, new: ModelIdentity) -> str:
    """What differs, e.g. "variant 'q4' -> 'q8', vram_need 2147483648 -> 4294967296"."""
    return ", ".join(f"{f} {a!r} -> {b!r}" for f, a, b in zip(ModelIdentity._fields, old, new) if a != b)
