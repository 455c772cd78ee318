"""The queue of pending requests: highest priority first, first come first served among equals."""

from __future__ import annotations

import heapq
import itertools
from typing import Any


class SchedulingQueue:
    def __init__(self) -> None:
        self._heap: list[tuple[int, int, Any]] = []
        self._seq = itertools.count()

    def add(self, req: Any, priority: int | None = None) -> None:
        p = req.priority if priority is None else priority
        heapq.heappush(self._heap, (-p, next(self._seq), req))

    def pop(self) -> Any:
        return heapq.heappop(self._heap)[2]

    def peek(self) -> Any:
        return self._heap[0][2]

    def __len__(self) -> int:
        return len(self._heap)

    def __bool__(self) -> bool:
        return bool(self._heap)
