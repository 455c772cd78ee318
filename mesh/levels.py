"""Seed 003's levels of a GPU: memory pressure and thermal state, by band.

One definition for every part that judges or reads them: the control plane's telemetry (which judges a
reading), the scheduler's health filter, the metrics, and the gateway (which judges the telemetry it
follows with its own configured thresholds)."""

from __future__ import annotations

PRESSURE = ("low", "normal", "high", "critical")
THERMAL = ("normal", "warning", "throttling", "critical")


def level(value: float, limits: tuple[float, float, float], names: tuple[str, ...]) -> str:
    """As the seeds define the bands: names[0] below limits[0]; names[1] up to and including
    limits[1]; names[2] up to and including limits[2]; names[3] above (e.g. memory: <50% low,
    50-70% normal, 70-85% high, >85% critical)."""
    if value < limits[0]:
        return names[0]
    if value <= limits[1]:
        return names[1]
    if value <= limits[2]:
        return names[2]
    return names[3]
