"""ForecastService (proto/gpumesh/v1/forecast_service.proto) over the embedded history.

Store reads run on the history's thread; fitting runs in a worker thread, at most `fit_slots` at a
time, so a burst of calls never starves the event loop's CPU. Viewers and admins read every series;
a tenant's caller only its own (its deployments and its tenant series); others are NOT_FOUND for it,
as an unknown series is. A deployment's series are read from its creation on (as the autoscaler's forecast
reads them, controllers/autoscale_forecast.py): they are kept by name, and what a reused name's series hold from
before is an earlier deployment's (history.py drops it only when the name passes to another tenant).
"""

from __future__ import annotations

import asyncio

from google.protobuf import timestamp_pb2

from controlplane.api import auth
from controlplane.api.rpc import unary
from controlplane.forecast import forecasting
from controlplane.forecast.history import KINDS
from controlplane.forecast.interactions import Query
from gpumesh.v1 import forecast_service_pb2 as F
from gpumesh.v1 import forecast_service_pb2_grpc
from mesh import errors


def _ts(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def may_read(tenant: str) -> bool:
    p = auth.current()
    # a viewer reads the fleet's own series (GPUs, nodes: tenant "") and its tenant's, as it lists nodes and GPUs
    # and its tenant's slices and workloads (docs/security.md)
    return p.admin or (p.role == "viewer" and not tenant) or (bool(tenant) and tenant == p.tenant)


class ForecastService(forecast_service_pb2_grpc.ForecastServiceServicer):
    def __init__(self, recorder, fit_slots: int = 1, prometheus=None, deployments=None) -> None:
        self.recorder = recorder
        self.store = recorder.store
        self.slots = asyncio.Semaphore(fit_slots)
        self.prometheus = prometheus          # controlplane/forecast/prometheus.py, or None
        self.deployments = deployments        # serving/deployments.DeploymentManager: their creation times, or None

    def _born(self) -> dict[tuple[str, str], float]:
        """("deployment", name) -> the current deployment's creation time (seconds), for those that have one."""
        known = getattr(getattr(self.deployments, "store", None), "deployments", None) or {}
        return {("deployment", name): d.created_at.ToNanoseconds() / 1e9 for name, d in list(known.items())
                if d.HasField("created_at")}

    def since(self, kind: str, name: str) -> float:
        """When the object's series start: a deployment's creation time, else 0 (all of it)."""
        return self._born().get((kind, name), 0.0) if kind == "deployment" else 0.0

    async def forecast(self, kind: str, name: str, metric: str, horizon_s: float, step_s: float = 0.0,
                       level: float = 0.0) -> F.GetForecastResponse:
        p = forecasting.plan(kind, name, metric, horizon_s, step_s, level)
        source = "embedded"
        if self.prometheus is not None and self.prometheus.serves(kind, metric):
            owner: str | None = ""       # the fleet's own GPU and node series: viewers and admins
            if kind in ("slice", "workload"):        # a tenant's: its owner as the history knows it
                found = await self.recorder.read(self.store.find, kind, name, metric)
                owner = found[1] if found is not None else None      # unknown (aged out): an admin's only
            if not (auth.current().admin if owner is None else may_read(owner)):
                raise errors.NotFound(f"no series {kind}/{name} {metric}", kind="series", name=f"{kind}/{name}/{metric}")
            rows = await self.prometheus.read(kind, name, metric, p.step_s, forecasting.MAX_BINS)
            if not rows:
                raise errors.NotFound(f"no series {kind}/{name} {metric} in Prometheus at {self.prometheus.url} "
                                      f"({self.prometheus.query(name, metric, kind)} has no samples)",
                                      kind="series", name=f"{kind}/{name}/{metric}")
            return await self._answer(p, rows, "prometheus")
        found = await self.recorder.read(self.store.find, kind, name, metric)
        if found is None or not may_read(found[1]):
            raise errors.NotFound(f"no series {kind}/{name} {metric} in the history (meshctl forecast series "
                                  f"lists them)", kind="series", name=f"{kind}/{name}/{metric}")
        # the fit sees the last MAX_BINS bins only: the whole series (a long raw tier holds millions of samples)
        # was read, held per call and filtered and binned on the event loop
        rows = await self.recorder.read(self.store.tail, kind, name, metric, forecasting.MAX_BINS * p.step_s,
                                        self.since(kind, name))
        return await self._answer(p, rows, source)

    async def _answer(self, p, rows, source: str) -> F.GetForecastResponse:
        kind, name, metric = p.kind, p.name, p.metric
        rows = forecasting.finite(rows)
        times, values = forecasting.check_history(p, rows)
        recent = forecasting.last_in_bins(rows, times, p.step_s)
        await self.slots.acquire()
        # the slot is held until the fit's thread ends, also when the call is cancelled meanwhile (a client's
        # deadline): released with the call, the thread went on and more than fit_slots fits ran at a time
        fit = asyncio.ensure_future(asyncio.to_thread(forecasting.fit, p, times, values, recent))
        fit.add_done_callback(lambda t: (self.slots.release(), t.cancelled() or t.exception()))   # retrieved
        f = await asyncio.shield(fit)
        return F.GetForecastResponse(
            kind=kind, name=name, metric=metric, model=f["model"], backtest_mase=f["mase"], level=p.level,
            step_seconds=p.step_s, history_points=int(values.size),
            history_span_seconds=float(times[-1] - times[0]), last_value=float(values[-1]),
            last_at=_ts(float(times[-1])), source=source,
            points=[F.ForecastPoint(at=_ts(float(t)), value=v, lo=lo, hi=hi)
                    for t, v, lo, hi in zip(f["times"], f["points"], f["lo"], f["hi"])])

    @unary
    async def GetForecast(self, request, context):
        return await self.forecast(request.kind, request.name, request.metric, request.horizon_seconds,
                                   request.step_seconds, request.level)

    @unary
    async def ListSeries(self, request, context):
        if request.kind and request.kind not in KINDS:
            raise errors.InvalidArgument.of("kind", f"{request.kind!r} is not a series kind", ", ".join(KINDS))
        infos = await self.recorder.read(self.store.list, request.kind, None, self._born())
        return F.ListSeriesResponse(series=[
            F.SeriesInfo(kind=s.kind, name=s.name, metric=s.metric, tenant=s.tenant, samples=s.count,
                         first=_ts(s.first), last=_ts(s.last)) for s in infos if may_read(s.tenant)])

    @unary
    async def ListInteractions(self, request, context):
        q = interaction_query(request)
        log = getattr(self.recorder, "interactions", None)
        if log is None:
            return F.ListInteractionsResponse()
        entries = await self.recorder.read(log.list, q)
        return F.ListInteractionsResponse(interactions=[interaction_pb(e) for e in entries if may_read(e.tenant)])


MAX_LIMIT = 1000
MAX_SAMPLES = 10_000
MAX_ANSWER_SAMPLES = 200_000     # limit x max_samples: one answer stays a few MB


def interaction_query(request) -> Query:
    """The request checked (INVALID_ARGUMENT naming the field) and scoped to the caller's tenant."""
    if request.limit < 0 or request.limit > MAX_LIMIT:
        raise errors.InvalidArgument.of("limit", f"must be 0 (100) to {MAX_LIMIT}, got {request.limit}")
    if request.max_samples < 0 or request.max_samples > MAX_SAMPLES:
        raise errors.InvalidArgument.of("max_samples", f"must be 0 (120) to {MAX_SAMPLES}, got {request.max_samples}")
    if (request.limit or 100) * (request.max_samples or 120) > MAX_ANSWER_SAMPLES:
        raise errors.InvalidArgument.of("max_samples", f"limit x max_samples must be at most {MAX_ANSWER_SAMPLES:,} "
                                        f"(samples in one answer), got {(request.limit or 100)} x "
                                        f"{(request.max_samples or 120)}")
    for field in ("app_type", "workload_id", "tenant"):
        value = getattr(request, field)
        if len(value) > 256 or not value.isprintable():
            raise errors.InvalidArgument.of(field, "is not valid", "printable, at most 256 characters")
    p = auth.current()
    tenant = request.tenant or None
    if not p.admin:
        tenant = p.tenant or "\0"           # a tenant's caller (or viewer) sees its own workloads only
    return Query(app_type=request.app_type, tenant=tenant, workload=request.workload_id,
                 limit=request.limit or 100, max_samples=request.max_samples or 120)


def interaction_pb(e) -> F.Interaction:
    fp = e.fingerprint
    out = F.Interaction(
        workload_id=e.workload, tenant=e.tenant, app_type=e.app_type, phase=e.phase, labels=e.labels,
        slice_id=e.slice_id, state=e.state, started=_ts(e.started),
        hardware=F.HardwareFingerprint(
            gpu_model=fp.get("gpu_model", ""), gpu_product=fp.get("gpu_product", ""),
            gpu_memory_bytes=int(fp.get("gpu_memory_bytes", 0)), driver_version=fp.get("driver_version", ""),
            cuda_version=fp.get("cuda_version", ""), gpu_backend=fp.get("gpu_backend", ""),
            isolation=fp.get("isolation", ""), mig_profile=fp.get("mig_profile", ""),
            mps_share=float(fp.get("mps_share", 0.0)), slice_memory_bytes=int(fp.get("slice_memory_bytes", 0)),
            compute_share=float(fp.get("compute_share", 0.0)), node=fp.get("node", ""),
            gpu_index=int(fp.get("gpu_index", 0))),
        usage=[F.UsageSample(at=_ts(t), utilization_pct=u, memory_used_bytes=m) for t, u, m in e.usage])
    if e.ended:
        out.ended.CopyFrom(_ts(e.ended))
    return out


OFF = "this control plane keeps no history (history_enabled: false), so it makes no forecasts"


class DisabledForecastService(forecast_service_pb2_grpc.ForecastServiceServicer):
    """history_enabled: false: every call says so."""

    @unary
    async def GetForecast(self, request, context):
        raise errors.FailedPrecondition(OFF)

    @unary
    async def ListSeries(self, request, context):
        raise errors.FailedPrecondition(OFF)

    @unary
    async def ListInteractions(self, request, context):
        raise errors.FailedPrecondition(OFF)
