"""Moves before the hot spot (rule 2 of the orchestrator): the fleet as `mesh.orchestrator.moves`
sees it, the rule run twice (memory pressure, then temperature), and each move it asks for started
through the MigrationManager (the same pre-copy live migration `meshctl migrate` uses).

- Memory: the forecast of memory used as a fraction of the GPU; critical and high from the control
  plane's `memory_pressure_thresholds` (85% and 70% by default). A moved workload adds its slice's
  share of the GPU to the target's forecast.
- Temperature: the forecast in Celsius divided by the critical threshold (`thermal_thresholds`, 85 C
  by default), so critical is 1.0 and high is the throttling threshold over it; a moved workload adds
  nothing to the target's temperature forecast (its power follows it; the next readings show that).
- Movable: a RUNNING workload not migrating already, whose slice is no model replica (a deployment
  replaces replicas itself) and is not labelled `gpumesh.io/movable=false`; lowest priority first.
- The target named to the migration is the target GPU's node; the scheduler (pressure-aware) picks
  the GPU there. Budgets, cooldown per GPU and the cost check are the rule's (`MovePolicy`,
  `MoveLedger`); the downtime the cost check weighs is the mean measured downtime of the last
  finished migrations, or `orchestrator_move_downtime_seconds` until there are some.
"""

from __future__ import annotations

import logging
import re
import time
from collections import deque

from gpumesh.v1 import types_pb2
from mesh import errors
from mesh.logs import log
from mesh.orchestrator import GpuView, MoveLedger, MovePolicy, WorkloadView, move_actions

logger = logging.getLogger(__name__)
MOVABLE_LABEL = "gpumesh.io/movable"
REASON = re.compile(r"^orchestrator: GPU (\S+) ")      # a move's migration reason names its source GPU
W = types_pb2


def downtime_s(migrations, default: float, last: int = 20) -> float:
    """Mean downtime of the last `last` finished migrations that measured one."""
    if migrations is None:
        return default
    done = [m for m in migrations.migrations.values() if getattr(m, "downtime_ms", 0) > 0]
    done.sort(key=lambda m: m.created_at.ToNanoseconds())
    done = done[-last:]
    return sum(m.downtime_ms for m in done) / len(done) / 1000 if done else default


def fleet_views(ctl, workloads, migrations, replica_slices: set[str], thermal: bool) -> list[GpuView]:
    """One GpuView per healthy GPU on a schedulable node, its movable workloads inside."""
    by_slice: dict[str, list] = {}
    for w in workloads.workloads.values() if workloads is not None else ():
        if w.state == W.WORKLOAD_STATE_RUNNING:
            by_slice.setdefault(w.slice_id, []).append(w)
    views = []
    for node in ctl.fleet.nodes.values():
        for g in node.gpus:
            if not node.schedulable or g.health != "healthy":
                free = 0.0          # never a target
            else:
                free = max(0.0, 1.0 - g.allocated_memory / g.memory_bytes) if g.memory_bytes else 0.0
            ws = []
            for s in ctl.fleet.slices_on(node.name):
                if s.gpu_index != g.index:
                    continue
                share = s.memory_bytes / g.memory_bytes if g.memory_bytes else 0.0
                for w in by_slice.get(s.id, ()):
                    movable = (s.id not in replica_slices and s.labels.get(MOVABLE_LABEL) != "false"
                               and w.labels.get(MOVABLE_LABEL) != "false"
                               and (migrations is None or migrations.active_for(w.id) is None))
                    ws.append(WorkloadView(w.id, 0.0 if thermal else share, s.priority, movable, share))
            views.append(GpuView(f"{g.node}/{g.index}", free, tuple(ws)))
    return views


class MovePass:
    def __init__(self, ctl, workloads, migrations, settings, clock=time.time) -> None:
        self.ctl, self.wm, self.migrations = ctl, workloads, migrations
        self.s = settings
        self.clock = clock
        self.ledger = MoveLedger()
        self._seeded = False
        # workload -> when its move was refused (it cannot be checkpointed, its slice is pinned): it sits out the
        # cooldown; picked again each pass, it was refused each pass and the GPU's other workloads never tried
        self.refused: dict[str, float] = {}

    def seed(self, now: float) -> None:
        """The moves of the last day from the migration records (a new leader's ledger started empty, so the
        budgets and the GPU cooldown began again: a workload just moved could be moved again at once)."""
        self._seeded = True
        if self.migrations is None:
            return
        done = []
        for m in list(self.migrations.migrations.values()):
            hit = REASON.match(m.reason)
            t = m.created_at.ToNanoseconds() / 1e9
            if hit and now - 86400 < t <= now:
                done.append((t, m.workload_id, hit.group(1)))
        for t, wid, gpu in sorted(done):
            self.ledger.record(t, wid, gpu)

    def policies(self, pressure_pct, thermal_c, downtime: float) -> tuple[MovePolicy, MovePolicy]:
        common = dict(step_s=self.s.load_step_s, per_workload_per_hour=self.s.per_workload_per_hour,
                      fleet_per_hour=self.s.fleet_per_hour, cooldown_s=self.s.cooldown_s, downtime_s=downtime)
        memory = MovePolicy(critical=pressure_pct[2] / 100, high=pressure_pct[1] / 100, **common)
        thermal = MovePolicy(critical=1.0, high=thermal_c[1] / thermal_c[2], **common)
        return memory, thermal

    def decide(self, forecasts: dict, pressure_pct, thermal_c, replica_slices: set[str]) -> list:
        """(action, metric, forecast) for each move the rule asks for. `forecasts`: (gpu name, metric) -> Forecast."""
        now = self.clock()
        if not self._seeded:
            self.seed(now)
        memory, thermal = self.policies(pressure_pct, thermal_c, downtime_s(self.migrations, self.s.downtime_s))
        for wid in [w for w, t in self.refused.items() if now - t >= self.s.cooldown_s]:
            del self.refused[wid]
        out = []
        moved: set[str] = set(self.refused)
        # the temperature run is judged with the memory run's moves as if made: against the ledger as it was, a
        # GPU hot on both gave up a workload for each in one pass (its cooldown ignored), the fleet budget was
        # spent twice, and a target's free share was promised twice
        trial = MoveLedger(deque(self.ledger.moves), dict(self.ledger.last_by_gpu))
        taken: dict[str, float] = {}
        for metric, policy, scale in (("memory_fraction", memory, 1.0), ("temperature", thermal, 1 / thermal_c[2])):
            hi = {name: [v * scale for v in f.hi] for (name, m), f in forecasts.items() if m == metric}
            if not hi:
                continue
            views = fleet_views(self.ctl, self.wm, self.migrations, replica_slices, thermal=metric == "temperature")
            views = [GpuView(v.id, v.free - taken.get(v.id, 0.0), tuple(w for w in v.workloads if w.id not in moved))
                     for v in views]
            capacity = {w.id: w.capacity for v in views for w in v.workloads}
            for a in move_actions(views, hi, policy, trial, now):
                moved.add(a.subject)
                trial.record(now, a.subject, a.source)
                taken[a.target] = taken.get(a.target, 0.0) + capacity.get(a.subject, 0.0)
                out.append((a, metric, forecasts[(a.source, metric)]))
        return out

    async def act(self, decisions) -> int:
        done = 0
        for a, metric, f in decisions:
            node = a.target.rpartition("/")[0]
            w = self.wm.workloads.get(a.subject) if self.wm is not None else None
            unit, fmt = ("C", ".1f") if metric == "temperature" else ("", ".3f")
            what = (f"{metric} forecast {f.points[-1]:{fmt}}{unit} [{min(f.lo):{fmt}}, {f.peak_hi:{fmt}}] over the "
                    f"next {len(f.hi) * f.step_s:g}s ({f.model}), now {f.last:{fmt}}{unit}")
            reason = f"orchestrator: GPU {a.source} {what}; {a.reason}; expected benefit {a.benefit:g}s at critical avoided"
            try:
                await self.migrations.migrate(a.subject, to_node=node, reason=reason[:500])
            except errors.MeshError as e:
                log(logger, logging.WARNING, "orchestrator: move refused", workload=a.subject, error=str(e))
                self.refused[a.subject] = self.clock()
                self.ctl.recorder.emit("Workload", a.subject, "Warning", "PreMigrateFailed", f"{reason}: {e}",
                                       tenant=w.tenant if w else "", node=a.source.rpartition("/")[0],
                                       source="orchestrator")
                continue
            self.ledger.record(self.clock(), a.subject, a.source)
            self.ctl.recorder.emit("Workload", a.subject, "Normal", "PreMigrate",
                                   f"moving to {node} before GPU {a.source} reaches critical: {what}; {a.reason}; "
                                   f"expected benefit {a.benefit:g}s at critical avoided",
                                   tenant=w.tenant if w else "", node=a.source.rpartition("/")[0],
                                   source="orchestrator")
            done += 1
        return done
