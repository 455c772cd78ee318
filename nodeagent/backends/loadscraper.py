"""The agent's reader of its model servers' load (docs/serving.md, "Load signals").

At every telemetry reading (nodeagent/telemetry.py `run_telemetry`) the agent GETs `/metrics` of each
running workload that is a model server (a workload with a `backend` and an `endpoint`), all at once
with a short timeout, parses the page with the backend kind's parser (nodeagent/backends/loadsignals.py)
and sends the result in `NodeTelemetry.backends`. It keeps the previous sample of each backend to turn
the counters into rates. A backend that does not answer, or answers without the metrics, is reported
with `scraped` false and the reason, so the control plane still sees that the agent tried.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable

from google.protobuf import timestamp_pb2

from gpumesh.v1 import types_pb2
from nodeagent.backends import loadsignals

SCRAPE_TIMEOUT = 2.0        # seconds per backend; a busy llama.cpp still answers /metrics (async route)


class LoadScraper:
    """`workloads`: returns the agent's workload records now (the runner's `workloads.values()`)."""

    def __init__(self, workloads: Callable[[], Iterable[types_pb2.Workload]], timeout: float = SCRAPE_TIMEOUT,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self.workloads = workloads
        self.timeout = timeout
        self.clock = clock
        self.wall = wall
        self.prev: dict[str, loadsignals.Sample] = {}

    def targets(self) -> list[tuple[str, str, str, str, str]]:
        """(workload id, kind, endpoint, the server's API key, its certificate) of each running model server."""
        return [(w.id, w.backend.kind, w.endpoint, w.backend.api_key, w.endpoint_certificate)
                for w in list(self.workloads())
                if w.HasField("backend") and w.endpoint and w.state == types_pb2.WORKLOAD_STATE_RUNNING]

    async def read(self) -> list[types_pb2.BackendLoad]:
        targets = self.targets()
        for wid in set(self.prev) - {t[0] for t in targets}:
            del self.prev[wid]
        if not targets:
            return []
        try:
            import httpx        # the gpumesh[serving] extra, which a host running model servers has
        except ImportError:
            return [self._failed(wid, kind, ep, "httpx is not installed (pip install 'gpumesh[serving]')")
                    for wid, kind, ep, _key, _cert in targets]
        from mesh import replicahttp
        async with replicahttp.client(self.timeout) as client:
            return list(await asyncio.gather(*(self._one(client, *t) for t in targets)))

    async def _one(self, client, wid: str, kind: str, endpoint: str, api_key: str,
                   certificate: str = "") -> types_pb2.BackendLoad:
        from mesh import replicahttp, replicatls
        try:
            # vLLM's /metrics is behind the replica's key (nodeagent/backends/vllm.py GUARD_ALL_PATHS); over
            # HTTPS pinned to the certificate this agent made for the server (nodeagent/backends/servertls.py)
            r = await client.get(f"{replicatls.base_url(endpoint, certificate)}/metrics",
                                 headers={"authorization": f"Bearer {api_key}"} if api_key else None,
                                 extensions=replicahttp.request_extensions(certificate))
            if r.status_code != 200:
                return self._failed(wid, kind, endpoint, f"GET /metrics answered {r.status_code}")
            sample = loadsignals.parse(kind, r.text, self.clock())
        except Exception as e:  # noqa: BLE001 - connection refused, timeout, a page without the metrics
            return self._failed(wid, kind, endpoint, f"{type(e).__name__}: {e}"[:300])
        out = loadsignals.load_of(sample, self.prev.get(wid))
        self.prev[wid] = sample
        out.workload_id, out.kind, out.endpoint = wid, kind, endpoint
        out.at.CopyFrom(self._now())
        return out

    def _failed(self, wid: str, kind: str, endpoint: str, why: str) -> types_pb2.BackendLoad:
        return types_pb2.BackendLoad(workload_id=wid, kind=kind, endpoint=endpoint, scraped=False, error=why,
                                     at=self._now())

    def _now(self) -> timestamp_pb2.Timestamp:
        ts = timestamp_pb2.Timestamp()
        ts.FromNanoseconds(int(self.wall() * 1e9))
        return ts
