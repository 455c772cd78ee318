"""The forecast part of the SDK (ForecastService): what the control plane expects a series to do next.

    with MeshClient(endpoint) as mesh:
        f = mesh.get_forecast("gpu", "node-1/0", "memory_used", horizon_seconds=600)
        for p in f.points:
            print(p.at.ToJsonString(), p.value, p.lo, p.hi)
        print(f.model, f.backtest_mase, f.history_points)
        for s in mesh.list_series(kind="gpu"):
            print(s.kind, s.name, s.metric, s.samples)
        for e in mesh.list_interactions(app_type="training"):    # seed 000's interaction log
            print(e.workload_id, e.hardware.gpu_model, e.hardware.mig_profile, len(e.usage))

`forecast_to_dict` / `series_to_dict` / `interaction_to_dict` are what `meshctl forecast get|series -o json|yaml` print. Mixed into
`mesh.client.MeshClient`; errors are the typed `mesh.errors` ones.
"""

from __future__ import annotations

from typing import Any

from gpumesh.v1 import forecast_service_pb2 as F
from gpumesh.v1 import forecast_service_pb2_grpc


def _converting(fn):
    from mesh.client import _converting as conv
    return conv(fn)


class ForecastApi:
    _channel: Any
    timeout: float

    @property
    def _forecastsvc(self) -> forecast_service_pb2_grpc.ForecastServiceStub:
        stub = self.__dict__.get("_forecast_stub")
        if stub is None:
            stub = self.__dict__["_forecast_stub"] = forecast_service_pb2_grpc.ForecastServiceStub(self._channel)
        return stub

    def get_forecast(self, kind: str, name: str, metric: str, horizon_seconds: float, *, step_seconds: float = 0.0,
                     level: float = 0.0) -> F.GetForecastResponse:
        """The forecast of one series `horizon_seconds` ahead (step 0: about 30 points; level 0: 0.9)."""
        req = F.GetForecastRequest(kind=kind, name=name, metric=metric, horizon_seconds=horizon_seconds,
                                   step_seconds=step_seconds, level=level)
        return _converting(self._forecastsvc.GetForecast)(req, timeout=self.timeout)

    def list_series(self, kind: str = "") -> list[F.SeriesInfo]:
        """The series of the history the caller may read."""
        return list(_converting(self._forecastsvc.ListSeries)(F.ListSeriesRequest(kind=kind),
                                                              timeout=self.timeout).series)


    def list_interactions(self, app_type: str = "", *, workload_id: str = "", tenant: str = "", limit: int = 0,
                          max_samples: int = 0) -> list[F.Interaction]:
        """Interaction-log entries (newest first): labels, hardware fingerprint and use over time per workload."""
        req = F.ListInteractionsRequest(app_type=app_type, workload_id=workload_id, tenant=tenant, limit=limit,
                                        max_samples=max_samples)
        return list(_converting(self._forecastsvc.ListInteractions)(req, timeout=self.timeout).interactions)


def _num(v: float):
    return None if v != v else v        # NaN (a metric not read at that time) -> null


def interaction_to_dict(e: F.Interaction) -> dict[str, Any]:
    from mesh.client import timestamp
    hw = {f.name: getattr(e.hardware, f.name) for f in e.hardware.DESCRIPTOR.fields}
    return {"workload_id": e.workload_id, "tenant": e.tenant, "app_type": e.app_type, "phase": e.phase,
            "labels": dict(e.labels), "hardware": hw, "slice_id": e.slice_id, "state": e.state,
            "started": timestamp(e, "started"), "ended": timestamp(e, "ended"),
            "usage": [{"at": timestamp(u, "at"), "utilization_pct": _num(u.utilization_pct),
                       "memory_used_bytes": _num(u.memory_used_bytes)} for u in e.usage]}


def forecast_to_dict(f: F.GetForecastResponse) -> dict[str, Any]:
    from mesh.client import timestamp
    return {"kind": f.kind, "name": f.name, "metric": f.metric, "model": f.model, "backtest_mase": f.backtest_mase,
            "level": f.level, "step_seconds": f.step_seconds, "source": f.source,
            "history": {"points": f.history_points, "span_seconds": f.history_span_seconds,
                        "last_value": f.last_value, "last_at": timestamp(f, "last_at")},
            "points": [{"at": timestamp(p, "at"), "value": p.value, "lo": p.lo, "hi": p.hi} for p in f.points]}


def series_to_dict(s: F.SeriesInfo) -> dict[str, Any]:
    from mesh.client import timestamp
    return {"kind": s.kind, "name": s.name, "metric": s.metric, "tenant": s.tenant, "samples": s.samples,
            "first": timestamp(s, "first"), "last": timestamp(s, "last")}
