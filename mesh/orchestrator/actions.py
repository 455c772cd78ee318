"""What a rule decides: one action, with the reason an operator reads in `meshctl get events`."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Action:
    """`kind`: warm_create | warm_release | migrate | grow | shrink. `subject`: the (profile, GPU
    model) key, the workload or the slice; `count` (warm), `source`/`target` (migrate) and `size`
    (resize) say what to do; `reason` the forecast, its interval and the expected benefit."""

    kind: str
    subject: str
    reason: str
    count: int = 0
    source: str = ""
    target: str = ""
    size: float = 0.0
    benefit: float = 0.0
    detail: dict = field(default_factory=dict, compare=False)
