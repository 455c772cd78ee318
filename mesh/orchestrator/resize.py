"""Rule 3, grow before the need: a slice (opted in by its label) whose forecast demand's high edge
exceeds its size grows, within its bounds and its tenant's quota; it shrinks back when the high
edge, with the hysteresis band, falls below its size."""

from __future__ import annotations

import math
from dataclasses import dataclass

from mesh.errors import InvalidArgument
from mesh.orchestrator.actions import Action


@dataclass(frozen=True)
class SliceView:
    id: str
    size: float                   # what it has (GiB of memory, or a compute share)
    opted_in: bool                # the client's label allows resizing
    min_size: float = 0.0
    max_size: float = math.inf
    quota_left: float = math.inf  # its tenant's unused quota, same unit
    granularity: float = 1.0      # sizes come in multiples of this


@dataclass(frozen=True)
class ResizePolicy:
    headroom: float = 0.1         # grow to high * (1 + headroom)
    shrink_band: float = 0.3      # shrink only when high * (1 + headroom) * (1 + band) < size

    def __post_init__(self) -> None:
        for name in ("headroom", "shrink_band"):
            if getattr(self, name) < 0:
                raise InvalidArgument.of(f"resize.{name}", "must be >= 0")


def _round_up(x: float, g: float) -> float:
    return math.ceil(x / g - 1e-9) * g if g > 0 else x


def resize_actions(slices: list[SliceView], hi: dict[str, list[float]], policy: ResizePolicy) -> list[Action]:
    out = []
    for s in slices:
        if not s.opted_in or not hi.get(s.id):
            continue
        peak = max(hi[s.id])
        want = _round_up(peak * (1 + policy.headroom), s.granularity)
        why = f"forecast high {peak:g} within the horizon, size {s.size:g}"
        if peak > s.size:
            target = min(want, s.max_size, s.size + s.quota_left)
            if target > s.size:
                out.append(Action("grow", s.id, f"{why}: grow to {target:g}", size=target))
        elif peak * (1 + policy.headroom) * (1 + policy.shrink_band) < s.size:
            target = max(want, s.min_size)
            if target < s.size:
                out.append(Action("shrink", s.id, f"{why}: shrink to {target:g}", size=target))
    return out
