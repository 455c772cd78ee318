"""What `meshctl replay` records per control tick, for its figures and `--plot`: allocations and
their waits since the last tick, GPUs at critical pressure (and how many of them the forecast made
at the tick before saw coming), warm slices held, migrations so far."""

from __future__ import annotations


class Recorder:
    def __init__(self) -> None:
        self.rows: list[dict] = []
        self._waits: list[float] = []

    def wait(self, t: float, wait: float) -> None:
        """An allocation answered after `wait` seconds (0: a warm slice was ready)."""
        self._waits.append(wait)

    def tick(self, t: float, **values) -> None:
        w = self._waits
        self.rows.append({"t": t, "allocations": len(w), "waited": sum(1 for x in w if x > 0),
                          "wait_max_s": max(w, default=0.0), **values})
        self._waits = []

    def total(self, key: str) -> float:
        return sum(r.get(key, 0) for r in self.rows)
