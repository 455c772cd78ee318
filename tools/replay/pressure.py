"""`meshctl replay`'s memory-pressure side: GPU pressure from the workloads' load, the predictive
controller's pressure forecast (the GPU's own series, or per workload for a GPU holding a workload
younger than a load period), its error and interval coverage, and the move rule
(`mesh.orchestrator.move_actions`) applied to the simulated fleet. Mixed into `controlled.Sim`.
"""

from __future__ import annotations

from collections import defaultdict, deque

import numpy as np

from controlplane.scheduler.plugins._gpu import free_milli
from mesh.errors import InvalidArgument
from mesh.forecast import choose
from mesh.orchestrator import GpuView, WorkloadView, move_actions
from tools.replay.load import PERIOD_S

PRESSURE_MODELS = ("naive", "snaive")
LONE_MAX = 0.9


class PressureRules:
    """Needs from the host: p (Params), ctl, workloads, since, gpu_hist, step_hist, _fracs, load, rp,
    ledger, move_pol, migrations, pressure_err, pressure_cover, _seen, _fc_next, _on, _gpu_of."""

    def _layout(self) -> dict[tuple, list[str]]:
        on: dict[tuple, list[str]] = defaultdict(list)
        for name in self.workloads:
            g = self._gpu_of(name)
            if g is not None:
                on[g].append(name)
        return on

    def _pressure(self, t: float, record: bool = False) -> dict:
        """GPU memory pressure now (sum of its workloads' use); `record` (at ticks) appends it to the
        GPUs' series and the workloads' use fractions to the fleet's histogram."""
        self._on = self._layout()
        out = {}
        for g, names in self._on.items():
            uses = [(self._use(n, self.workloads[n][1], t), self.workloads[n][1]) for n in names]
            out[g] = sum(u for u, _ in uses)
            if record:
                for n, (u, share) in zip(names, uses):
                    self.use_hist[min(200, int(u / share * 100))] += 1
                    d = self._fracs.setdefault(n, deque(maxlen=self.p.horizon_steps + 1))
                    d.append(u / share)
                    if len(d) == d.maxlen:
                        self.step_hist[min(200, max(0, int(round((d[-1] - d[0]) * 100)) + 100))] += 1
        if record:
            for g, v in out.items():
                self.gpu_hist.setdefault(g, deque(maxlen=240)).append(v)
            for g in [g for g in self.gpu_hist if g not in out]:
                del self.gpu_hist[g]
            c = np.cumsum(self.use_hist)
            self._qhi = (int(np.searchsorted(c, self.p.young_q * c[-1])) + 1) / 100 if c[-1] else 1.0
            c = np.cumsum(self.step_hist)
            self._qstep = max(0.0, (int(np.searchsorted(c, self.p.young_q * c[-1])) - 99) / 100) if c[-1] else 0.1
        return out

    def _use(self, name: str, share: float, t: float) -> float:
        """GPU memory a workload uses (fraction of the GPU): its share x its load, never more than
        LONE_MAX of the GPU (alone, a workload past that runs out of memory by itself: no move helps)."""
        return min(LONE_MAX, share * self.load.use(name, t))

    def _hour_bound(self, name: str, t: float) -> float:
        """A workload's upper bound over the next hour (it may not move again within it: the budget):
        its share at the fleet's `young_q` quantile of use fractions, never less than its use now."""
        share = self.workloads[name][1]
        return max(self._use(name, share, t), min(LONE_MAX, share * getattr(self, "_qhi", 1.0)))

    def _bound(self, name: str, t: float) -> float:
        """A workload's upper bound over the horizon (fraction of the GPU): its use now plus its share
        times the fleet's `young_q` quantile of use-fraction changes over the horizon."""
        share = self.workloads[name][1]
        return min(LONE_MAX, self._use(name, share, t) + share * getattr(self, "_qstep", 0.1))

    def _pressure_fc(self, y: np.ndarray, now: float, h: int) -> tuple[list[float], list[float]]:
        """The pressure forecast (points, high edge): with an hourly season once the GPU's series holds
        enough of it for a backtest, else the last value plus the interval of its changes (season 1),
        else (a GPU just filled) the present."""
        for season in (int(PERIOD_S // self.p.tick_s), 1):
            try:
                f = choose(y, season=season, horizon=h, models=PRESSURE_MODELS, level=self.p.level, origins=8)
            except InvalidArgument:
                continue
            return list(f.points), [max(a, now) if i == 0 else a for i, a in enumerate(f.hi)]
        return [now] * h, [now] * h

    def _gpu_hi(self, g: tuple, v: float, t: float) -> list[float]:
        """The high edge of a GPU's pressure over the horizon: the present for reactive; for predictive
        the GPU series' forecast; for a GPU holding a young workload (less than a load period on it: the
        series has not seen its cycle, and its arrival is a jump in the series), the sum of its
        workloads' upper bounds (`_bound`)."""
        h = self.p.horizon_steps
        if self.ctl == "reactive":
            return [v] * h
        names = self._on.get(g, [])
        if any(t - self.since.get(n, t) < PERIOD_S for n in names) or g not in self.gpu_hist:
            return [sum(self._bound(n, t) for n in names)] * h
        if v < self.p.screen:
            return [v] * h
        points, hi = self._pressure_fc(np.fromiter(self.gpu_hist[g], float), v, h)
        self._fc_next[g] = (points[0], hi[0])
        return hi

    def _score_pressure_forecasts(self, pressure: dict) -> None:
        for g, (point, hi) in getattr(self, "_fc_next", {}).items():
            if g in pressure:
                self.pressure_err.append(abs(point - pressure[g]))
                self.pressure_cover.append(pressure[g] <= hi)
        self._fc_next = {}

    def _move_rule(self, t: float, pressure: dict | None, only: tuple | None = None) -> None:
        """At a tick, every GPU; on a placement (`only`), the GPU the workload landed on."""
        if pressure is None:
            if only is None:
                return
            self._on = self._layout()
            names = self._on.get(only, [])
            pressure = {only: sum(self._use(n, self.workloads[n][1], t) for n in names)}
        self._fc_next = getattr(self, "_fc_next", {})
        hi = {f"{g[0]}/{g[1]}": self._gpu_hi(g, v, t) for g, v in pressure.items()}
        for g in pressure:
            self._seen[g] = max(self._seen.get(g, 0.0), max(hi[f"{g[0]}/{g[1]}"]))
        if not any(max(x) >= self.p.critical for x in hi.values()):
            return
        hot = {gid: x for gid, x in hi.items() if max(x) >= self.p.critical}
        # predictive judges a target first on its workloads' and the mover's hour-long bounds (a moved
        # workload may not move again within the budget's hour), then, where none passes (a packed
        # fleet), on the horizon's bounds; reactive on the present
        # a target node without the host CPU for the workload is left out and the rule re-run (up to 3 times)
        for mode in (("hour", "horizon") if self.ctl == "predictive" else ("now",)):
            exclude: set[str] = set()
            for _ in range(3):
                views = self._views(t, mode, exclude)
                target_hi = {v.id: [sum(w.memory for w in v.workloads)] for v in views} if mode == "hour" else None
                failed = False
                for a in move_actions(views, hot, self.move_pol, self.ledger, t, target_hi):
                    if self._migrate(t, a):
                        hot.pop(a.source, None)
                    else:
                        exclude.add(a.target.rsplit("/", 1)[0])
                        failed = True
                if not failed or not hot:
                    break
            if not hot:
                break

    def _views(self, t: float, mode: str, exclude: set[str] = frozenset()) -> list[GpuView]:
        bound = {"hour": self._hour_bound, "horizon": self._bound,
                 "now": lambda n, t: self._use(n, self.workloads[n][1], t)}[mode]
        views = []
        for node in self.rp.fleet.nodes.values():
            for g in node.gpus:
                wl = tuple(WorkloadView(n, bound(n, t), priority=0, movable=True, capacity=self.workloads[n][1])
                           for n in self._on.get((node.name, g.index), ()))
                free = 0.0 if node.name in exclude else free_milli(g) / 1000
                views.append(GpuView(f"{node.name}/{g.index}", free, wl))
        return views

    def _migrate(self, t: float, a) -> bool:
        node, idx = a.target.rsplit("/", 1)
        pod, _ = self.workloads[a.subject]
        if self.rp.fleet.nodes[node].cpu_free < pod.cpu_milli:
            return False
        for sid in self.rp.by_pod[a.subject]:
            s = self.rp.fleet.slices[sid]
            moved = type(s)()
            moved.CopyFrom(s)
            moved.node, moved.gpu_index = node, int(idx)
            self.rp.fleet.put_slice(moved)
        src, dst = tuple(a.source.rsplit("/", 1)), (node, int(idx))
        src = (src[0], int(src[1]))
        if a.subject in self._on.get(src, []):
            self._on[src].remove(a.subject)
        self._on.setdefault(dst, []).append(a.subject)
        self.ledger.record(t, a.subject, a.source)
        self.since[a.subject] = t
        self.migrations += 1
        return True
