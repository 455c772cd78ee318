"""Rule 2, moves before the hot spot: a GPU whose forecast memory pressure (the interval's high edge,
not only the point) reaches critical within the horizon has its lowest-priority movable workload
live-migrated to a GPU whose forecast, with that workload added, stays below high.

Guards: a budget (moves per workload per hour and per day, per fleet per hour), a cooldown per source GPU, and a
cost check: the expected benefit (seconds of critical pressure the move avoids on the source) must
exceed the migration's measured downtime. "Reactive" is the same rule fed the present reading as a
flat forecast: it moves only once a GPU is already critical.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from mesh.errors import InvalidArgument
from mesh.orchestrator.actions import Action


@dataclass(frozen=True)
class WorkloadView:
    id: str
    memory: float                 # its share of the GPU's memory now (fraction of the GPU)
    priority: int = 0             # lower moves first
    movable: bool = True
    capacity: float = 0.0         # what it takes on the target (allocation share, fraction of a GPU)


@dataclass(frozen=True)
class GpuView:
    id: str
    free: float                   # unallocated share (fraction of the GPU) a moved workload may take
    workloads: tuple[WorkloadView, ...] = ()


@dataclass(frozen=True)
class MovePolicy:
    critical: float = 0.95        # memory pressure (used / total) counted as critical
    high: float = 0.85            # a target must stay below this, with the workload added
    step_s: float = 60.0          # the forecast's step
    per_workload_per_hour: int = 1
    per_workload_per_day: int = 24
    fleet_per_hour: int = 60
    cooldown_s: float = 600.0     # per source GPU
    downtime_s: float = 0.3       # measured migration downtime (docs/checkpointing.md: about 0.3 s)

    def __post_init__(self) -> None:
        if not 0 < self.high <= self.critical:
            raise InvalidArgument.of("moves.high", "must be > 0 and <= critical")
        for name in ("step_s", "downtime_s", "cooldown_s"):
            if getattr(self, name) < 0:
                raise InvalidArgument.of(f"moves.{name}", "must be >= 0")


@dataclass
class MoveLedger:
    """The moves made so far (for the budget and cooldowns); the caller records each one it does.

    `moves` keeps a day (the longest budget); `last_by_gpu` keeps a GPU only while its cooldown runs
    (`forget_cooled`): one entry per GPU ever moved from, kept for ever, grew with GPUs replaced and nodes
    retired."""

    moves: deque = field(default_factory=deque)     # (time, workload, source)
    last_by_gpu: dict = field(default_factory=dict)

    def record(self, now: float, workload: str, source: str) -> None:
        self.moves.append((now, workload, source))
        self.last_by_gpu[source] = now

    def forget_cooled(self, now: float, cooldown_s: float) -> None:
        """Drop the GPUs whose cooldown has ended: an entry older than the cooldown holds nothing back."""
        for gid in [g for g, t in self.last_by_gpu.items() if now - t >= cooldown_s]:
            del self.last_by_gpu[gid]

    def _trim(self, now: float) -> None:
        while self.moves and self.moves[0][0] <= now - 86400:
            self.moves.popleft()

    def fleet_last_hour(self, now: float) -> int:
        self._trim(now)
        return sum(1 for t, _, _ in self.moves if t > now - 3600)

    def workload_last_hour(self, now: float, workload: str) -> int:
        return self.workload_since(now, workload, 3600)

    def workload_since(self, now: float, workload: str, seconds: float) -> int:
        self._trim(now)
        return sum(1 for t, w, _ in self.moves if w == workload and t > now - seconds)


def move_actions(gpus: list[GpuView], hi: dict[str, list[float]], policy: MovePolicy, ledger: MoveLedger,
                 now: float, target_hi: dict[str, list[float]] | None = None) -> list[Action]:
    """`hi`: GPU id -> the forecast memory pressure's high edge per step (the present reading,
    repeated, for a reactive controller). `target_hi`: what a target is judged on, when that differs
    (a moved workload cannot move again within the budget's hour, so a forecaster may judge targets
    over that longer lead; default `hi`). At most one move per source GPU per call."""
    by_id = {g.id: g for g in gpus}
    extra: dict[str, float] = {}      # pressure and share already promised to targets in this call
    taken: dict[str, float] = {}
    out: list[Action] = []
    ledger.forget_cooled(now, policy.cooldown_s)
    hot = [(max(h), gid) for gid, h in hi.items() if h and max(h) >= policy.critical and gid in by_id]
    for peak, gid in sorted(hot, reverse=True):
        if now - ledger.last_by_gpu.get(gid, -1e18) < policy.cooldown_s:
            continue
        if ledger.fleet_last_hour(now) + len(out) >= policy.fleet_per_hour:
            break
        steps = sum(1 for v in hi[gid] if v >= policy.critical)
        benefit_s = steps * policy.step_s
        if benefit_s <= policy.downtime_s:
            continue
        cands = sorted((w for w in by_id[gid].workloads if w.movable), key=lambda w: (w.priority, w.memory))
        for w in cands:
            if (ledger.workload_last_hour(now, w.id) >= policy.per_workload_per_hour
                    or ledger.workload_since(now, w.id, 86400) >= policy.per_workload_per_day):
                continue
            target = _target(gpus, hi if target_hi is None else target_hi, gid, w, policy, extra, taken)
            if target is None:
                continue
            extra[target] = extra.get(target, 0.0) + w.memory
            taken[target] = taken.get(target, 0.0) + w.capacity
            out.append(Action("migrate", w.id, f"GPU {gid} forecast high {peak:.2f} >= critical {policy.critical:g} "
                              f"in {steps} of {len(hi[gid])} steps; {target} stays below {policy.high:g}",
                              source=gid, target=target, benefit=benefit_s))
            break
    return out


def _target(gpus, hi, source, w, policy, extra, taken) -> str | None:
    best, best_peak = None, None
    for g in gpus:
        if g.id == source or g.free - taken.get(g.id, 0.0) < w.capacity - 1e-9:
            continue
        h = hi.get(g.id) or [sum(x.memory for x in g.workloads)]
        peak = max(h) + extra.get(g.id, 0.0) + w.memory
        if peak < policy.high and (best_peak is None or peak < best_peak):
            best, best_peak = g.id, peak
    return best
