"""History read from Prometheus (`prometheus_url`) with PromQL over its HTTP API, for a fleet whose metrics
Prometheus already scrapes: the gauges the control plane exports (controlplane/api/metrics.py), per GPU
(`gpumesh_gpu_*{node, gpu, model}`) and per slice, node and workload (`gpumesh_slice_*{slice, node,
tenant}`, `gpumesh_node_*{node}`, `gpumesh_workload_*{workload, node, tenant}`: fleet_series.GAUGES).
Other series (deployments, the request stream) come from the embedded store. `/api/v1/query_range` at the
forecast's step; the answer's [time, "value"] pairs are the rows.
"""

from __future__ import annotations

import time

import aiohttp

from controlplane.forecast.fleet_series import GAUGES
from mesh import errors

GPU_METRICS = {"memory_used": "gpumesh_gpu_memory_used_bytes", "memory_total": "gpumesh_gpu_memory_total_bytes",
               "temperature": "gpumesh_gpu_temperature_celsius", "utilization": "gpumesh_gpu_utilization_percent",
               "memory_pressure": "gpumesh_gpu_memory_pressure_level", "thermal_state": "gpumesh_gpu_thermal_level"}
MAX_POINTS = 11_000       # Prometheus refuses a range query of more points per series


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


class PrometheusHistory:
    def __init__(self, url: str, timeout: float = 20.0, clock=time.time) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.clock = clock

    def serves(self, kind: str, metric: str) -> bool:
        return (kind == "gpu" and metric in GPU_METRICS) or (kind, metric) in GAUGES

    def query(self, name: str, metric: str, kind: str = "gpu") -> str:
        if kind != "gpu":       # max: a slice or workload that moved has had one series per node
            return f'max({GAUGES[kind, metric][0]}{{{kind}="{_label(name)}"}})'
        node, _, index = name.rpartition("/")
        return f'max({GPU_METRICS[metric]}{{node="{_label(node)}",gpu="{_label(index)}"}})'

    async def read(self, kind: str, name: str, metric: str, step: float, points: int) -> list[tuple[float, float]]:
        """[(time, value)] at `step` over the last `points` steps, oldest first; [] when Prometheus has none."""
        end = self.clock()
        start = end - step * min(points, MAX_POINTS - 1)
        params = {"query": self.query(name, metric, kind), "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"}
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout)) as s:
                async with s.get(f"{self.url}/api/v1/query_range", params=params) as r:
                    body = await r.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            raise errors.Unavailable(f"prometheus_url {self.url}: {type(e).__name__}: {e}") from None
        try:
            if body.get("status") != "success":
                raise errors.Unavailable(f"prometheus_url {self.url} refused {params['query']!r}: "
                                         f"{body.get('errorType', '')} {body.get('error', '')}".strip())
            result = body.get("data", {}).get("result", [])
            if not result:
                return []
            return [(float(t), float(v)) for t, v in result[0].get("values", [])]
        except (AttributeError, TypeError, ValueError, KeyError, IndexError) as e:
            # JSON, but not a Prometheus answer (another server at that address, a proxy's page): was INTERNAL
            raise errors.Unavailable(f"prometheus_url {self.url} did not answer as Prometheus's query_range "
                                     f"does ({type(e).__name__}: {e})") from None
