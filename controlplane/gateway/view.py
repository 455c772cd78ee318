"""The gateway's picture of the fleet: deployments, replicas, registry models and GPU telemetry, followed
from the control plane by one ServingViewService.Watch stream (reconnecting with backoff). Routing reads
only this picture: no control-plane call per request."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import grpc

from gpumesh.v1 import deployment_service_pb2 as D
from gpumesh.v1 import servingview_service_pb2 as V
from gpumesh.v1 import servingview_service_pb2_grpc
from mesh.logs import log

logger = logging.getLogger(__name__)


@dataclass
class GpuInfo:
    node: str
    index: int
    memory_used: int = 0
    memory_total: int = 0
    utilization: float = 0.0
    temperature_c: float = 0.0
    power_w: float = 0.0
    throttled: bool = False
    healthy: bool = True
    has_reading: bool = False


@dataclass
class ReplicaInfo:
    id: str
    deployment: str
    endpoint: str
    ready: bool
    gpu: tuple[str, int]
    backend: str
    concurrency: int                 # the deployment's (vLLM's max_num_seqs)
    running: int | None = None       # the backend's own load signals, when the control plane reports them
    waiting: int | None = None
    kv_usage: float | None = None    # 0..1
    api_key: str = field(default="", repr=False)   # its server's key (the serving view's replica_api_keys)
    certificate: str = field(default="", repr=False)   # its server's pinned TLS certificate ("": plain HTTP)

    @property
    def scheme(self) -> str:
        return "https" if self.certificate else "http"

    @property
    def key(self) -> str:
        return f"{self.deployment}/{self.id}"


@dataclass
class DeploymentInfo:
    name: str
    model: str
    variant: str
    tenant: str
    backend: str
    context: int
    fallback_rank: int
    replicas: list[ReplicaInfo] = field(default_factory=list)


def _signals(r: D.Replica) -> tuple[int | None, int | None, float | None]:
    """The backend's own load signals (Replica.load: requests running and waiting, KV-cache use, read by the
    agent from the backend's /metrics), when the latest reading succeeded; unknown otherwise."""
    if not r.HasField("load") or not r.load.scraped:
        return None, None, None
    return int(r.load.requests_running), int(r.load.requests_waiting), float(r.load.kv_cache_usage)


class FleetView:
    """The latest snapshot, parsed; `changed` is set whenever a new one arrives."""

    def __init__(self) -> None:
        self.deployments: dict[str, DeploymentInfo] = {}
        self.gpus: dict[tuple[str, int], GpuInfo] = {}
        self.models: dict[str, object] = {}
        self.raw: V.ServingView | None = None
        self.updated_at = 0.0
        self.connected = False
        self.listeners: list = []

    def apply(self, view: V.ServingView) -> None:
        models = {m.name: m for m in view.models}
        deps: dict[str, DeploymentInfo] = {}
        for d in view.deployments:
            m = models.get(d.spec.model)
            variant = next((v for v in m.variants if v.name == d.spec.variant), None) if m else None
            backend = d.status.backend or (("vllm" if variant.backend == 2 else "llama.cpp") if variant else "llama.cpp")
            context = d.spec.backend.context or (variant.max_context if variant else 0)
            info = DeploymentInfo(d.spec.name, d.spec.model, d.spec.variant, d.spec.tenant, backend, context,
                                  variant.fallback_rank if variant else 0)
            for r in d.replicas:
                running, waiting, kv = _signals(r)
                info.replicas.append(ReplicaInfo(
                    r.id, d.spec.name, r.endpoint, r.state == D.REPLICA_STATE_READY and bool(r.endpoint),
                    (r.node, r.gpu_index), backend, max(1, d.spec.backend.concurrency), running, waiting, kv,
                    view.replica_api_keys.get(r.id, ""), r.endpoint_certificate))
            deps[info.name] = info
        gpus = {}
        for g in view.gpus:
            t = g.telemetry
            gpus[(g.node, g.gpu.index)] = GpuInfo(
                g.node, g.gpu.index, t.memory_used_bytes, t.memory_total_bytes or g.gpu.memory_bytes,
                t.utilization_pct, t.temperature_c, t.power_w, bool(t.throttle_reasons), t.health in (0, 1),
                t.HasField("at"))
        self.deployments, self.gpus, self.models, self.raw = deps, gpus, models, view
        if view.model_costs:
            from controlplane.gateway import metrics
            metrics.set_model_costs(view.model_costs)
        self.updated_at = time.time()
        for fn in list(self.listeners):
            fn()

    # -- lookups ------------------------------------------------------------------------------

    def visible(self, tenant: str | None) -> list[DeploymentInfo]:
        """Deployments a caller of `tenant` may use (None: every tenant's, an admin or the insecure demo)."""
        return [d for d in self.deployments.values() if tenant is None or d.tenant == tenant]

    def resolve(self, name: str, tenant: str | None) -> tuple[list[DeploymentInfo], list[DeploymentInfo]]:
        """The deployments that serve `name` for the caller, and those of its fallback variants.

        `name` is a deployment name (its model's higher-rank variants are its fallbacks) or a registry
        model name (the lowest fallback rank deployed is primary, the next rank the fallback)."""
        mine = self.visible(tenant)
        direct = [d for d in mine if d.name == name]
        if direct:
            d = direct[0]
            later = sorted({x.fallback_rank for x in mine if x.model == d.model and x.fallback_rank > d.fallback_rank})
            return direct, [x for x in mine if x.model == d.model and later and x.fallback_rank == later[0]]
        of_model = [d for d in mine if d.model == name]
        ranks = sorted({d.fallback_rank for d in of_model})
        if not ranks:
            return [], []
        primary = [d for d in of_model if d.fallback_rank == ranks[0]]
        fallback = [d for d in of_model if len(ranks) > 1 and d.fallback_rank == ranks[1]]
        return primary, fallback


class ViewFollower:
    """Runs the watch stream in the background; reconnects after a failure."""

    def __init__(self, view: FleetView, cfg) -> None:
        self.view = view
        self.cfg = cfg
        self.task: asyncio.Task | None = None
        self.first = asyncio.Event()
        self.targets = [t.strip() for t in cfg.control_plane.split(",") if t.strip()]
        self.turn = 0

    def _channel(self) -> grpc.aio.Channel:
        # several control planes (HA): a standby answers UNAVAILABLE, so the next one is tried
        target = self.targets[self.turn % len(self.targets)]
        if self.cfg.insecure:
            return grpc.aio.insecure_channel(target)
        with open(self.cfg.tls_ca, "rb") as f:
            creds = grpc.ssl_channel_credentials(root_certificates=f.read())
        return grpc.aio.secure_channel(target, creds)

    async def run(self) -> None:
        backoff = 0.2
        while True:
            try:
                async with self._channel() as ch:
                    stub = servingview_service_pb2_grpc.ServingViewServiceStub(ch)
                    md = (("authorization", f"Bearer {self.cfg.token}"),) if self.cfg.token else None
                    call = stub.Watch(V.WatchServingViewRequest(interval_ms=self.cfg.view_interval_ms), metadata=md)
                    async for snap in call:
                        if not self.view.connected:
                            log(logger, logging.INFO, "following the control plane", endpoint=self.cfg.control_plane,
                                deployments=len(snap.deployments))
                        self.view.connected = True
                        self.view.apply(snap)
                        self.first.set()
                        backoff = 0.2
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as e:
                if self.view.connected:
                    log(logger, logging.WARNING, "serving view stream lost; routing on the last view while "
                        "reconnecting", code=e.code().name, detail=e.details())
            except Exception as e:   # a reconnect loop must not die
                log(logger, logging.WARNING, "serving view stream failed", error=repr(e))
            self.view.connected = False
            self.turn += 1
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            try:
                await self.task
            except (asyncio.CancelledError, Exception):
                pass
