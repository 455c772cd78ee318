"""The live orchestrator's Prometheus metrics (docs/prediction.md, "The live orchestrator")."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

DECISIONS = Counter("gpumesh_orchestrator_decisions_total",
                    "Orchestrator decisions acted on, by rule (warm, moves, resize) and action "
                    "(warm_create, warm_release, migrate, grow, shrink)", ["rule", "action"])
FAILED = Counter("gpumesh_orchestrator_failures_total",
                 "Orchestrator decisions whose actuator refused or failed, by rule", ["rule"])
WARM = Gauge("gpumesh_warm_slices", "Warm slices carved or being carved, by key (PROFILE/GPU_MODEL)", ["key"])
CLAIMS = Counter("gpumesh_warm_claims_total", "Allocate requests answered from a warm slice")
YIELDS = Counter("gpumesh_warm_yields_total", "Warm slices released because a real request needed their space")
FORECAST_UPPER = Gauge("gpumesh_orchestrator_forecast_upper",
                       "The peak of the forecast interval's upper edge within the horizon, per series the "
                       "orchestrator judges (memory fraction, Celsius, requests per step, bytes)",
                       ["kind", "name", "metric"])
FIT_SECONDS = Histogram("gpumesh_orchestrator_fit_seconds", "Wall time of one round of the orchestrator's "
                        "forecasts (in the fit worker)", buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
PASSES = Counter("gpumesh_orchestrator_passes_total", "Orchestrator passes over the fleet")
