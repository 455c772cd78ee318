"""Rule 1, warm slices: keep enough slices carved ahead that requests in the forecast's upper
quantile over the lead time (the time it takes to carve one) find one ready.

The demand forecast is of requests per step for one key (profile or size, GPU model); the need is
the sum of the interval's high edge over the steps the lead time covers, rounded up. Warm slices
are given back only when the pool exceeds the need by the hysteresis band, and then only down to
the band's edge, so a forecast that wobbles does not carve and destroy the same slice over and over.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mesh.errors import InvalidArgument
from mesh.orchestrator.actions import Action


@dataclass(frozen=True)
class WarmPolicy:
    step_s: float = 60.0          # the forecast's step
    lead_s: float = 60.0          # how far ahead a warm slice must be ready: control period + create time
    release_band: float = 0.5     # give back only above need * (1 + band) + 1
    max_per_key: int = 8          # never more warm slices of one key

    def __post_init__(self) -> None:
        for name in ("step_s", "lead_s"):
            if getattr(self, name) <= 0:
                raise InvalidArgument.of(f"warm.{name}", "must be > 0")
        if self.release_band < 0:
            raise InvalidArgument.of("warm.release_band", "must be >= 0")

    def lead_steps(self) -> int:
        return max(1, math.ceil(self.lead_s / self.step_s - 1e-9))


def warm_need(hi: list[float], policy: WarmPolicy) -> int:
    """Warm slices the upper quantile asks for over the lead time."""
    n = policy.lead_steps()
    window = list(hi[:n]) + [hi[-1] if hi else 0.0] * max(0, n - len(hi))
    frac = policy.lead_s / policy.step_s if policy.lead_s < policy.step_s else 1.0
    return min(policy.max_per_key, math.ceil(sum(max(0.0, v) for v in window) * frac - 1e-9))


def burst_quantile(times: list[float], window_s: float, q: float = 0.99) -> int:
    """The `q` quantile of burst sizes in `times` (one key's arrival times, any order): for each
    arrival, how many arrived within `window_s` up to and including it. A pool of that many warm
    slices covers a burst that comes faster than a replacement can be carved (`window_s` = the
    create time). 0 for no arrivals."""
    if not 0 < q <= 1:
        raise InvalidArgument.of("warm.burst_quantile", "must be > 0 and <= 1")
    ts = sorted(times)
    if not ts:
        return 0
    sizes, lo = [], 0
    for i, t in enumerate(ts):
        while ts[lo] < t - window_s:
            lo += 1
        sizes.append(i - lo + 1)
    sizes.sort()
    return sizes[min(len(sizes) - 1, math.ceil(q * len(sizes)) - 1)]


def warm_actions(demand: dict[str, list[float]], current: dict[str, int], policy: WarmPolicy,
                 floor: dict[str, int] | None = None) -> list[Action]:
    """`demand`: key -> the forecast interval's high edge per step; `current`: key -> warm slices
    carved (ready or being carved); `floor`: key -> warm slices kept whatever the step forecast says
    (the upper quantile of a burst within the create time, `burst_quantile`). Creates up to the need;
    releases above the hysteresis band."""
    out = []
    floor = floor or {}
    for key in sorted(set(demand) | set(current) | set(floor)):
        hi = demand.get(key, [])
        need = max(warm_need(hi, policy), min(policy.max_per_key, floor.get(key, 0)))
        have = current.get(key, 0)
        keep_max = math.floor(need * (1 + policy.release_band)) + 1
        why = f"forecast high {sum(hi[:policy.lead_steps()]):.2f} requests over the next {policy.lead_s:g}s"
        if floor.get(key, 0) > warm_need(hi, policy):
            why += f", burst high {floor[key]} within a create"
        if have < need:
            out.append(Action("warm_create", key, f"{why}: need {need} warm, have {have}", count=need - have))
        elif have > keep_max:
            out.append(Action("warm_release", key, f"{why}: need {need} warm, have {have} (band up to {keep_max})",
                              count=have - keep_max))
    return out
