"""HTTP calls to a local cluster's gateway, shared by the gateway's integration tests: the tenants file's
bearer tokens (tests/integration/secure.py), requests, `/v1/gpu/status` and `/metrics` readings."""

from __future__ import annotations

import json

import httpx

from tests.integration.secure import TOKENS


def auth(who: str | None) -> dict:
    """The authorization header of the tenants file's principal `who` (none for None)."""
    return {"authorization": f"Bearer {TOKENS[who]}"} if who else {}


def post(cluster, body, who="team-a", path="/v1/chat/completions", headers=None, raw=None,
         method="POST") -> httpx.Response:
    """`body` as JSON (or `raw` bytes) to the gateway as `who`."""
    return httpx.request(method, f"{cluster.gateway_url}{path}", headers={**auth(who), **(headers or {})},
                         content=raw if raw is not None else json.dumps(body), timeout=300)


def get(cluster, path: str, who="admin") -> httpx.Response:
    return httpx.get(f"{cluster.gateway_url}{path}", headers=auth(who), timeout=60)


def status(cluster, who="admin") -> dict:
    """`/v1/gpu/status` as `who`."""
    r = get(cluster, "/v1/gpu/status", who)
    r.raise_for_status()
    return r.json()


def ready_in_gateway(cluster, name: str, n: int) -> bool:
    """Whether the gateway sees `n` READY replicas of deployment `name`."""
    m = next((m for m in status(cluster)["models"] if m["name"] == name), None)
    return m is not None and sum(1 for r in m["replicas"] if r["ready"]) == n


def metric(cluster, series: str) -> float:
    """One series of the gateway's `/metrics` (0 when absent)."""
    text = httpx.get(f"{cluster.gateway_url}/metrics", timeout=30).text
    return next((float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(series + " ")), 0.0)
