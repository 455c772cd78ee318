"""`meshctl describe node|slice`'s forecasts section (tools/meshctl/describeforecast.py) over a fake
ForecastService client: the series asked for, the row per series, and a series too short said so."""

from __future__ import annotations

from gpumesh.v1 import forecast_service_pb2 as F
from mesh import errors
from tools.meshctl import describeforecast as dfc


class FakeMesh:
    def __init__(self):
        self.asked = []

    def get_forecast(self, kind, name, metric, horizon, step_seconds=0.0, level=0.0):
        self.asked.append((kind, name, metric, horizon))
        if metric == "requests":
            raise errors.FailedPrecondition("series fleet/profile/1g.10gb requests has 3 points of 40s; needs 80")
        value = 70.0 if metric == "temperature" else float(8 << 30)
        return F.GetForecastResponse(kind=kind, name=name, metric=metric, model="damped", level=0.9,
                                     last_value=value, points=[F.ForecastPoint(value=value + 1, lo=value - 1,
                                                                               hi=value + 3)])


def test_node_rows_per_gpu_and_metric():
    m = FakeMesh()
    rows = dfc.for_gpus(m, "n1", [0, 1], 15.0)
    assert [(r["series"], r["metric"]) for r in rows] == [
        ("gpu/n1/0", "temperature"), ("gpu/n1/0", "memory_used"), ("gpu/n1/1", "temperature"),
        ("gpu/n1/1", "memory_used")]
    text = dfc.section(rows)
    assert text.startswith("Forecasts:") and "70.0C" in text and "[69.0C, 73.0C] 90%" in text and "damped" in text


def test_slice_rows_include_its_profile_demand_and_say_when_history_is_short():
    m = FakeMesh()
    rows = dfc.for_slice(m, {"node": "n1", "gpu_index": 2, "profile": "1g.10gb"}, 15.0)
    assert ("fleet", "profile/1g.10gb", "requests", 600.0) in m.asked
    assert "needs 80" in rows[-1]["error"] and "needs 80" in dfc.section(rows)


def test_no_forecast_service_no_section():
    class Off:
        def get_forecast(self, *a, **k):
            raise errors.FailedPrecondition("this control plane keeps no history")
    rows = dfc.safe(dfc.for_gpus, Off(), "n1", [0], 15.0)
    assert all("error" in r for r in rows)
    assert dfc.section([]) == ""
