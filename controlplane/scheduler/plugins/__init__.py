"""Scheduler plugins, one per module; `REGISTRY` maps each plugin's NAME to its class."""

from __future__ import annotations

from controlplane.scheduler.plugins import (antiaffinity, bestfit, fgd, gpumodel, nodehealth, noderesources,
                                            packing, pool, preemption, pressure, quota, random_score, spread, topology)

REGISTRY = {m.NAME: m.Plugin for m in (antiaffinity, bestfit, fgd, gpumodel, nodehealth, noderesources,
                                       packing, pool, preemption, pressure, quota, random_score, spread, topology)}
