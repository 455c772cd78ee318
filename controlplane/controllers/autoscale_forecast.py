"""Predictive warm-up's forecast: the upper quantile of a deployment's request rate one lead time ahead.

The autoscaler controller records each sample's request rate (and its demand in the policy's metric, as
`demand_<metric>`) into the history store (controlplane/forecast/recorder.py) as `deployment/<name>
request_rate`; the forecast's upper rate is the Planner's `forecast_rate` (mesh/autoscale/planner.py), which
sizes it into replicas as `meshctl bench autoscale` does. This reads the series on the history's thread and fits it with the forecasting service's code (controlplane/forecast/forecasting.py) in
a worker thread, never on the event loop. The forecast's interval is central, so the upper quantile q is
the high edge of the (2q - 1) interval.
"""

from __future__ import annotations

import asyncio
import logging
import math

from controlplane.forecast import forecasting
from mesh import errors
from mesh.logs import log

logger = logging.getLogger(__name__)
POINTS = 4                 # forecast steps over the lead time


def series_metric(metric: str) -> str:
    return f"demand_{metric}"


async def upper(history, name: str, series: str, lead_s: float, quantile: float,
                step_floor: float, since: float = 0.0) -> tuple[float | None, str]:
    """(the upper `quantile` of the deployment's `series` over now .. now + `lead_s`, or None; a note: the
    model, or why none). Only samples at or after `since` (the deployment's creation time) are read: a series is
    kept by name, and what it holds from before is an earlier deployment's under the name (deleted and created
    again, with another model or by the same tenant: history.py drops another tenant's only on the first write)."""
    if history is None:
        return None, "no history (history_enabled: false)"
    lead = max(lead_s, step_floor)
    step = max(step_floor, lead / POINTS)
    level = min(0.98, max(0.02, 2 * quantile - 1))
    try:
        p = forecasting.plan("deployment", name, series, lead, step, level)
        # only the window the fit sees (forecasting.MAX_BINS steps): a long raw tier read whole held the
        # history thread and this pass, every pass
        rows = await history.read(history.store.tail, "deployment", name, series, forecasting.MAX_BINS * p.step_s,
                                  since)
        times, values = forecasting.check_history(p, rows)
        f = await asyncio.to_thread(forecasting.fit, p, times, values)
    except errors.MeshError as e:
        return None, str(e)[:200]
    except Exception as e:  # noqa: BLE001 - a failed fit leaves the policy reactive
        log(logger, logging.WARNING, "demand forecast failed", deployment=name, error=repr(e))
        return None, f"fit failed: {e!r}"[:200]
    hi = [float(x) for x in f["hi"] if math.isfinite(float(x))]
    if not hi:
        return None, "no finite forecast"
    return max(0.0, max(hi)), f"{f['model']} over {values.size} points of {step:g}s"
