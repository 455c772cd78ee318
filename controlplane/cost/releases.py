"""When each slice was released, for the cost accountant (controlplane/cost/accountant.py).

The accountant charges the slices of the fleet every interval; a slice released between two accountings is gone
from the fleet at the next one, so without this the time from its last accounting to its release (up to one
`cost_interval_seconds`) was never charged, nor was a slice created and released between two accountings. The
`ReleaseLog` hangs on the slice event hub (controlplane/api/events.py) like a watcher and notes, for each DELETED
event (published once the deletion is durable), the slice's last record and the time; the next accounting
charges it up to then (`take`).

`Vanished` keeps, for a while, the cursor of a slice that left the fleet before its DELETED came (an accounting
ran while its deletion was being written), so that it is charged from its cursor, not from its creation again.
"""

from __future__ import annotations

from controlplane.api.events import DELETED

MAX_PENDING = 1_000_000        # releases noted between two accountings (a bound, never reached in practice)
VANISHED_KEEP_S = 600.0        # how long a vanished slice's cursor waits for its DELETED


class ReleaseLog:
    """A subscriber of the slice event hub (it has the `put_nowait` and `finish` a Subscription has, and is never
    cut off: it only notes ids and times)."""

    def __init__(self, clock) -> None:
        self.clock = clock
        self.pending: dict[str, tuple[object, float]] = {}     # slice id -> (its last record, released at)

    def put_nowait(self, ev) -> None:
        if ev is None or ev.type != DELETED or len(self.pending) >= MAX_PENDING:
            return                   # None: the hub ending its watchers (`attach` joins it again)
        self.pending[ev.slice.id] = (ev.slice, self.clock())

    def finish(self) -> None:
        pass

    def attach(self, hub) -> None:
        """Join `hub` (again, after its `end_all`); nothing without one."""
        subscribers = getattr(hub, "subscribers", None)
        if subscribers is not None and self not in subscribers:
            subscribers.add(self)

    def detach(self, hub) -> None:
        subscribers = getattr(hub, "subscribers", None)
        if subscribers is not None:
            subscribers.discard(self)

    def take(self) -> dict[str, tuple[object, float]]:
        out, self.pending = self.pending, {}
        return out


class Vanished:
    """Cursors of slices gone from the fleet whose release is not seen yet."""

    def __init__(self) -> None:
        self.cursors: dict[str, tuple[float, float]] = {}     # slice id -> (cursor, when it vanished)

    def add(self, ids, cursors: dict[str, float], now: float) -> None:
        for sid in ids:
            if sid in cursors:
                self.cursors[sid] = (cursors[sid], now)
        for sid in [k for k, (_, at) in self.cursors.items() if now - at > VANISHED_KEEP_S]:
            del self.cursors[sid]

    def pop(self, sid: str) -> float | None:
        got = self.cursors.pop(sid, None)
        return got[0] if got is not None else None
