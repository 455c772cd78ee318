"""The replicas' load signals as the leader's Prometheus metrics (labels: deployment, replica), set from each
reading (controlplane/serving/deployments.py on_loads) and removed with the replica (deploystore.py)."""

from __future__ import annotations

from prometheus_client import Gauge

LABELS = ("deployment", "replica")
GAUGES = {
    "requests_running": Gauge("gpumesh_replica_requests_running", "Requests the replica's backend decodes now",
                              LABELS),
    "requests_waiting": Gauge("gpumesh_replica_requests_waiting", "Requests queued in the replica's backend", LABELS),
    "kv_cache_usage": Gauge("gpumesh_replica_kv_cache_usage", "Fraction of the replica's KV cache in use", LABELS),
    "generation_tokens_per_second": Gauge("gpumesh_replica_generation_tokens_per_second",
                                          "Tokens the replica generated per second (last telemetry interval)", LABELS),
    "prompt_tokens_per_second": Gauge("gpumesh_replica_prompt_tokens_per_second",
                                      "Prompt tokens the replica processed per second (last telemetry interval)",
                                      LABELS),
    "ttft_seconds": Gauge("gpumesh_replica_ttft_seconds", "Mean time to first token of the replica's recent requests",
                          LABELS),
}


def observe(deployment: str, replica: str, load) -> None:
    """Set the gauges from a scraped reading (types_pb2.BackendLoad); an unscraped one leaves them."""
    if not load.scraped:
        return
    for field, gauge in GAUGES.items():
        gauge.labels(deployment, replica).set(getattr(load, field))


def forget(deployment: str, replica: str) -> None:
    for gauge in GAUGES.values():
        try:
            gauge.remove(deployment, replica)
        except KeyError:
            pass
