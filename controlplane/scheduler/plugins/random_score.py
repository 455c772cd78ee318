"""Random: a uniformly random feasible node (the replay's baseline)."""

from __future__ import annotations

import random

from controlplane.state.fleet import NodeEntry
from controlplane.scheduler.framework import CycleState, Option
from mesh.slicespec import SliceRequest

NAME = "Random"


class Plugin:
    NAME = NAME
    cacheable = False

    def __init__(self, seed: int | None = None) -> None:
        if seed is not None and not isinstance(seed, int):
            raise ValueError(f"{NAME}: seed must be an integer, not {seed!r}")
        self.rng = random.Random(seed)

    def pick(self, n: int) -> int:
        """One of `n` feasible nodes, uniformly (what scoring each at random comes to, in one draw)."""
        return self.rng.randrange(n)

    def score(self, state: CycleState, req: SliceRequest, node: NodeEntry, option: Option) -> float:
        return self.rng.random()
