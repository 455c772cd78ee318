"""The gateway's Prometheus metrics (its own registry, served at /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry()
_LAT = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120)
_TPOT = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5)

REQUESTS = Counter("gpumesh_gateway_requests_total", "requests answered, by model and HTTP status",
                   ["model", "code"], registry=REGISTRY)
TTFT = Histogram("gpumesh_gateway_ttft_seconds", "time to first token, by model and replica", ["model", "replica"],
                 buckets=_LAT, registry=REGISTRY)
TPOT = Histogram("gpumesh_gateway_tpot_seconds", "time per output token after the first", ["model", "replica"],
                 buckets=_TPOT, registry=REGISTRY)
E2E = Histogram("gpumesh_gateway_e2e_seconds", "request latency, first byte in to last byte out",
                ["model", "replica"], buckets=_LAT, registry=REGISTRY)
TOKENS = Counter("gpumesh_gateway_tokens_total", "tokens in (prompt) and out (completion)",
                 ["model", "direction"], registry=REGISTRY)
QUEUE_DEPTH = Gauge("gpumesh_gateway_queue_depth", "requests waiting for a replica slot", ["model"],
                    registry=REGISTRY)
QUEUE_WAIT = Histogram("gpumesh_gateway_queue_wait_seconds", "time waited for a replica slot", ["model"],
                       buckets=_LAT, registry=REGISTRY)
FALLBACKS = Counter("gpumesh_gateway_fallbacks_total", "requests served by a fallback variant", ["model"],
                    registry=REGISTRY)
RETRIES = Counter("gpumesh_gateway_retries_total", "requests retried on another replica before the first token",
                  ["model"], registry=REGISTRY)
RESUMED = Counter("gpumesh_gateway_resumed_total", "streams that broke after tokens were sent, by what the gateway "
                  "did: resumed (continued on another replica), refused (the request or backend cannot be "
                  "continued), failed (no replica took the continuation)", ["model", "outcome"], registry=REGISTRY)
REJECTED = Counter("gpumesh_gateway_rejected_total", "requests answered 429 (queue full or deadline)",
                   ["model", "reason"], registry=REGISTRY)
BACKEND_ERRORS = Counter("gpumesh_gateway_backend_errors_total", "failed backend attempts", ["model", "replica"],
                         registry=REGISTRY)
CIRCUIT = Gauge("gpumesh_gateway_circuit_state", "circuit breaker per replica: 0 closed, 1 half-open, 2 open",
                ["replica"], registry=REGISTRY)
FAILURE_PROBABILITY = Gauge("gpumesh_gateway_state_failure_probability", "gpu-aware's estimate that a request "
                            "sent to the replica while its GPU is in the risky state (memory-high, "
                            "memory-critical, thermal-critical, ...) fails: the rate observed there, shrunk "
                            "toward the prior (docs/gateway.md)", ["replica", "state"], registry=REGISTRY)
IN_FLIGHT = Gauge("gpumesh_gateway_in_flight", "requests the gateway has on a replica", ["replica"],
                  registry=REGISTRY)
CACHE_HITS = Counter("gpumesh_gateway_cache_hits_total", "answers served from a response cache, by kind (exact, "
                     "semantic)", ["model", "kind"],
                     registry=REGISTRY)
CACHE_MISSES = Counter("gpumesh_gateway_cache_misses_total", "cacheable requests not in a cache, by kind",
                       ["model", "kind"],
                       registry=REGISTRY)
CACHE_SAVED = Counter("gpumesh_gateway_cache_saved_tokens_total", "completion tokens not generated thanks to the "
                      "cache, by kind", ["model", "kind"], registry=REGISTRY)
CACHE_SKIPPED = Counter("gpumesh_gateway_semantic_cache_skipped_total", "eligible requests that skipped the "
                        "semantic cache because the embedder was saturated", ["model"], registry=REGISTRY)
EMBED = Histogram("gpumesh_gateway_semantic_embed_seconds", "time to embed one prompt (the semantic cache), "
                  "queue included", buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1),
                  registry=REGISTRY)
OVERHEAD = Histogram("gpumesh_gateway_overhead_seconds", "the gateway's own time per request: end to end in the "
                     "gateway minus the queue wait and the backend's time", ["model"],
                     buckets=(.0001, .00025, .0005, .001, .002, .005, .01, .025, .05, .1), registry=REGISTRY)
VIEW_AGE = Gauge("gpumesh_gateway_view_age_seconds", "seconds since the last serving-view snapshot",
                 registry=REGISTRY)
COST_PER_HOUR = Gauge("gpumesh_gateway_model_cost_dollars_per_hour", "what a model's replicas cost per hour now "
                      "(the control plane's cost ledger, via the serving view)", ["model"], registry=REGISTRY)
COST_24H = Gauge("gpumesh_gateway_model_cost_dollars_24h", "what a model's replicas cost over the last 24 hours",
                 ["model"], registry=REGISTRY)
COST_PER_1K = Gauge("gpumesh_gateway_model_cost_dollars_per_1k_tokens", "a model's dollars per 1,000 tokens over the "
                    "last 24 hours", ["model"], registry=REGISTRY)


def set_model_costs(costs) -> None:
    """The serving view's per-model cost figures onto the gauges (ServingView.model_costs)."""
    for c in costs:
        COST_PER_HOUR.labels(c.model).set(c.dollars_per_hour)
        COST_24H.labels(c.model).set(c.dollars_24h)
        COST_PER_1K.labels(c.model).set(c.dollars_per_1k_tokens)


# the series labelled by replica, with their label names in order
PER_REPLICA = ((TTFT, ("model", "replica")), (TPOT, ("model", "replica")), (E2E, ("model", "replica")),
               (BACKEND_ERRORS, ("model", "replica")), (CIRCUIT, ("replica",)), (IN_FLIGHT, ("replica",)),
               (FAILURE_PROBABILITY, ("replica", "state")))


def forget_replicas(keep: set[str]) -> int:
    """Remove the series of replicas not in `keep` (they left the fleet: scaled away, rolled, replaced), so a
    long-lived gateway's /metrics does not grow with every replica it ever saw; the number of series removed."""
    removed = 0
    for metric, names in PER_REPLICA:
        gone = {tuple(s.labels[n] for n in names) for family in metric.collect() for s in family.samples
                if "replica" in s.labels and s.labels["replica"] not in keep}
        for labels in gone:
            try:
                metric.remove(*labels)
                removed += 1
            except KeyError:
                pass
    return removed


def forget_queues(live) -> int:
    """Remove the queue_depth series of the pools (comma-joined deployment names) that `live(pool)` says are gone
    (deleted deployments), as forget_replicas does for replicas; the number removed."""
    gone = {s.labels["model"] for family in QUEUE_DEPTH.collect() for s in family.samples
            if not live(s.labels["model"])}
    for pool in gone:
        try:
            QUEUE_DEPTH.remove(pool)
        except KeyError:
            pass
    return len(gone)
