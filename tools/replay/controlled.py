"""`meshctl replay`: a discrete-event simulation with a simulated clock, over the control plane's
scheduler (`tools.replay.sim.Replay`, the code behind Allocate) and the orchestrator's rules
(`mesh.orchestrator`), comparing controllers on the same arrivals.

Arrivals and departures are the trace's `creation_time`/`deletion_time` inside a window; pods alive
at the window's start are placed first (not measured). Every GPU slice takes `create_s` to carve
(MIG create) unless a warm slice of its shape (GPUs, milli-GPU, GPU models) is ready, and a released
warm slice holds its space `destroy_s` more. A request that fits nowhere first takes the space of
warm slices (never blocked by them), else queues until a departure frees room. Every `tick_s` the
controller runs:

- none: nothing (cold carving, no moves);
- reactive: the same rules fed the present: warm slices for the arrivals of the last bucket, moves
  off GPUs already at critical memory pressure;
- predictive: the rules fed forecasts (`mesh.forecast.choose`): warm slices from the upper edge of the
  99% interval of requests per bucket and shape, and never fewer than the 99% quantile of that shape's
  bursts within two create times over the last week (`burst_quantile`); moves off GPUs whose forecast
  pressure's high edge reaches critical within the horizon (`tools.replay.pressure`).

Both controllers also re-run the move rule for a GPU when a workload lands on it (the placement is a
change the level-triggered controller sees), each on its own readings.

Memory load per workload: `tools.replay.load`. Thermal state is not modelled (reported as 0).
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, replace

import numpy as np

from mesh.errors import InvalidArgument
from mesh.forecast import choose
from mesh.orchestrator import MoveLedger, MovePolicy, WarmPolicy, burst_quantile, warm_actions
from tools.replay.load import LoadModel
from tools.replay.pressure import PressureRules
from tools.replay.record import Recorder
from tools.replay.sim import Replay, typical_mix
from tools.replay.trace import TraceNode, TracePod

CONTROLLERS = ("none", "reactive", "predictive")
DEMAND_MODELS = ("naive", "snaive")          # cheap: a replay refits every bucket for every shape


@dataclass(frozen=True)
class Params:
    create_s: float = 10.0        # MIG instance create (see docs/prediction.md for the source)
    destroy_s: float = 5.0
    tick_s: float = 60.0          # control period, and the pressure series' step
    bucket_s: float = 600.0       # demand series' step
    demand_history_buckets: int = 1008   # a week of 10-minute buckets
    warm_keys: int = 64           # shapes kept warm: the most common in the history before the window
    warm_max_per_key: int = 32
    warm_lead_s: float = 600.0    # warm slices cover the forecast high edge over this much time (a bucket:
                                  # arrivals come in bursts, so a share of the bucket under-provisions)
    horizon_steps: int = 2        # pressure forecast horizon (ticks): act only on an imminent crossing
    screen: float = 0.6           # pressure below which a GPU's forecast is not computed
    level: float = 0.9            # the pressure forecast's interval
    demand_level: float = 0.99    # the demand forecast's interval: its high edge is the warm pool
    demand_origins: int = 144     # backtest origins (a day of buckets): rare shapes need many to show up
    burst_q: float = 0.99         # predictive: keep warm this quantile of a shape's bursts within a create
    burst_history_s: float = 7 * 86400.0   # ... over this much of its arrival history
    burst_windows: float = 2.0    # bursts are counted within this many create times: a pool of the
                                  # history's burst quantile within one create time is exactly enough for
                                  # bursts no larger than the past week's; counting over two gives a margin
                                  # that scales with the create time (docs/prediction.md, session 6)
    young_q: float = 0.99         # predictive: a GPU holding a workload with less than a load period on it
                                  # is forecast per workload: its use now plus this quantile of the changes
                                  # over the horizon seen so far (fleet-wide)
    critical: float = 0.95
    high: float = 0.85
    downtime_s: float = 0.3       # measured migration downtime (docs/checkpointing.md)
    per_workload_per_hour: int = 1
    fleet_per_hour: int = 60
    cooldown_s: float = 120.0     # per source GPU: 10 minutes left a refilled GPU critical (docs/prediction.md)
    place_check: bool = True      # both controllers re-run the move rule for a GPU when a workload lands on it


def key_of(p: TracePod) -> tuple:
    return (p.num_gpu, p.gpu_milli, p.gpu_spec)


def key_name(k: tuple) -> str:
    n, milli, spec = k
    return f"{n}x{milli}m" + (f"@{'|'.join(spec)}" if spec else "")


@dataclass
class Warm:
    name: str
    key: tuple
    created: float
    ready: float
    gpus: float


class Sim(PressureRules):
    def __init__(self, nodes: list[TraceNode], pods: list[TracePod], controller: str, seed: int, start: float,
                 end: float, params: Params, load: LoadModel) -> None:
        if controller not in CONTROLLERS:
            raise InvalidArgument.of("--controller", f"unknown controller {controller!r}", ", ".join(CONTROLLERS))
        self.p, self.ctl, self.start, self.end, self.load = params, controller, start, end, load
        self.rp = Replay(nodes, "fgd", typical_mix(pods), seed)
        self.events: list = []
        self._seq = 0
        self.queue: deque = deque()
        self.waits: list[float] = []
        self.workloads: dict[str, tuple] = {}      # pod name -> (pod, share) for single-GPU shared pods
        self.warm: dict[tuple, list[Warm]] = defaultdict(list)
        self.warm_n = 0
        self.warm_claimed = 0
        self.warm_idle_gpu_s = 0.0
        self.critical_s = 0.0
        self.migrations = 0
        self.workload_s = 0.0
        self.unplaced = 0
        self.cold: Counter = Counter()
        self._demand_now: dict[str, list[float]] = {}
        self.ledger = MoveLedger()
        self.move_pol = MovePolicy(critical=params.critical, high=params.high, step_s=params.tick_s,
                                   per_workload_per_hour=params.per_workload_per_hour,
                                   fleet_per_hour=params.fleet_per_hour, cooldown_s=params.cooldown_s,
                                   downtime_s=params.downtime_s)
        lead = max(params.warm_lead_s, params.tick_s + params.create_s)
        self.warm_pol = WarmPolicy(step_s=params.bucket_s, lead_s=lead,
                                   max_per_key=params.warm_max_per_key)
        self.gpu_hist: dict[tuple, deque] = {}
        self.since: dict[str, float] = {}           # workload -> when it landed on its GPU (placed or moved)
        self.use_hist = np.zeros(201)               # use fractions seen at ticks, bins of 0.01 up to 2.0
        self.step_hist = np.zeros(201)              # a workload's use-fraction change over the horizon, seen at
        self._fracs: dict[str, deque] = {}          # ticks (bins of 0.01 from -1 to +1); its recent fractions
        self.floor: dict[str, int] = {}
        self.rec = Recorder()
        self.pressure_err: list[float] = []
        self.pressure_cover: list[bool] = []
        self._seen: dict[tuple, float] = {}
        self._fc_next: dict[tuple, tuple] = {}
        self._on: dict[tuple, list[str]] = {}
        self.progress = None
        self.forecast_err: list[float] = []
        self._demand_fc: dict[tuple, list[float]] = {}
        self._last_fc_point: dict[tuple, float] = {}
        # the request stream's history per shape (buckets before the window: what the history store holds)
        before = [p for p in pods if p.num_gpu and p.creation_time < start]
        counts = Counter(key_of(p) for p in before) or Counter(key_of(p) for p in pods if p.num_gpu)
        self.keys = [k for k, _ in counts.most_common(params.warm_keys)]
        self.rep = {}
        for k in self.keys:
            same = [p for p in pods if key_of(p) == k]
            cm = Counter((p.cpu_milli, p.memory_mib) for p in same).most_common(1)[0][0]
            self.rep[k] = replace(same[0], cpu_milli=cm[0], memory_mib=cm[1])
        self.arrivals_of: dict[tuple, list[float]] = defaultdict(list)   # the request stream's times per shape
        for p in pods:
            if key_of(p) in self.rep:
                self.arrivals_of[key_of(p)].append(float(p.creation_time))
        for v in self.arrivals_of.values():
            v.sort()
        nb = params.demand_history_buckets
        self.b0 = int(start // params.bucket_s) - nb
        self.demand = {k: np.zeros(nb + int(math.ceil((end - start) / params.bucket_s)) + 2) for k in self.keys}
        for p in pods:
            k = key_of(p)
            if k in self.demand and p.creation_time < end:
                i = int(p.creation_time // params.bucket_s) - self.b0
                if 0 <= i < len(self.demand[k]):
                    self.demand[k][i] += 1
        for i, p in enumerate(pods):
            if p.creation_time < start and (not p.deletion_time or p.deletion_time > start):
                self._push(start, 0, ("initial", p))
            elif start <= p.creation_time < end:
                self._push(p.creation_time, 2, ("arrive", p))
            else:
                continue
            if p.deletion_time and max(p.creation_time, start) < p.deletion_time < end:
                self._push(p.deletion_time, 1, ("depart", p))
        t = start
        while t < end:
            self._push(t, 3, ("tick", None))
            t += params.tick_s

    def _push(self, t: float, prio: int, ev: tuple) -> None:
        self._seq += 1
        heapq.heappush(self.events, (t, prio, self._seq, ev))

    # -- the run ----------------------------------------------------------------------

    def run(self) -> dict:
        day = 0
        while self.events:
            t, _, _, (kind, what) = heapq.heappop(self.events)
            getattr(self, "_" + kind)(t, what)
            if self.progress and t - self.start >= (day + 1) * 86400:
                day += 1
                self.progress(day)
        for q in self.queue:
            self.unplaced += 1
            self._wait(self.end, self.end - q[1] + self.p.create_s)
        for ws in self.warm.values():
            for w in ws:
                self.warm_idle_gpu_s += (self.end - w.created) * w.gpus
        return self._result()

    def _lifetime(self, pod: TracePod, t: float) -> None:
        end = pod.deletion_time if pod.deletion_time and pod.deletion_time < self.end else self.end
        self.workload_s += max(0.0, end - max(t, self.start))

    def _initial(self, t: float, pod: TracePod) -> None:
        if self.rp.arrive(pod):
            self._placed(pod, t)

    def _placed(self, pod: TracePod, t: float) -> None:
        if pod.num_gpu:
            self._lifetime(pod, t)
        if pod.num_gpu == 1 and pod.gpu_milli < 1000:
            self.workloads[pod.name] = (pod, pod.gpu_milli / 1000)
            self.since[pod.name] = t
            if self.ctl != "none" and self.p.place_check and t > self.start:
                self._move_rule(t, None, only=self._gpu_of(pod.name))

    def _arrive(self, t: float, pod: TracePod) -> None:
        if not pod.num_gpu:
            if not self.rp.arrive(pod):
                self.queue.append((pod, t))
            return
        pool = self.warm.get(key_of(pod))
        if pool:
            w = min(pool, key=lambda w: w.ready)
            pool.remove(w)
            self.warm_idle_gpu_s += (min(t, w.ready) - w.created) * w.gpus + max(0.0, t - w.ready) * w.gpus
            self.rp.depart(self._pseudo(w))
            if self.rp.arrive(pod):
                self.warm_claimed += 1
                self._wait(t, max(0.0, w.ready - t))
                self._placed(pod, t)
                self._apply_warm(t, [key_of(pod)])     # level-triggered: a claim re-runs the rule for its shape
                return
        self.cold[("empty pool" if key_of(pod) in self.rep else "shape not kept warm")] += 1
        if self.rp.arrive(pod):
            self._wait(t, self.p.create_s)
            self._placed(pod, t)
            return
        if any(self.warm.values()):              # a warm slice never blocks a real request
            for ws in self.warm.values():
                for w in ws:
                    self.warm_idle_gpu_s += (t - w.created) * w.gpus
                    self.rp.depart(self._pseudo(w))
                ws.clear()
            if self.rp.arrive(pod):
                self._wait(t, self.p.destroy_s + self.p.create_s)
                self._placed(pod, t)
                return
        self.queue.append((pod, t))

    def _depart(self, t: float, pod: TracePod) -> None:
        self.rp.depart(pod)
        if self.workloads.pop(pod.name, None) is not None:
            self.load.forget(pod.name)
            self.since.pop(pod.name, None)
            self._fracs.pop(pod.name, None)
        self._retry(t)

    def _free(self, t: float, w: Warm) -> None:
        self.rp.depart(self._pseudo(w))
        self._retry(t)

    def _retry(self, t: float) -> None:
        for _ in range(len(self.queue)):
            pod, t0 = self.queue.popleft()
            if self.rp.arrive(pod):
                if pod.num_gpu:
                    self._wait(t, t - t0 + self.p.create_s)
                self._placed(pod, t)
            else:
                self.queue.append((pod, t0))

    def _wait(self, t: float, wait: float) -> None:
        self.waits.append(wait)
        self.rec.wait(t, wait)

    def _gpu_of(self, name: str) -> tuple | None:
        ids = self.rp.by_pod.get(name)
        if not ids:
            return None
        s = self.rp.fleet.slices[ids[0]]
        return (s.node, s.gpu_index)

    def _pseudo(self, w: Warm) -> TracePod:
        return replace(self.rep[w.key], name=w.name)

    # -- the controller ---------------------------------------------------------------

    def _tick(self, t: float, _) -> None:
        pressure = self._pressure(t, record=True)
        crit = [g for g, v in pressure.items() if v >= self.p.critical]
        self.critical_s += self.p.tick_s * len(crit)
        self._score_pressure_forecasts(pressure)
        self.rec.tick(t, critical=len(crit), foreseen=sum(1 for g in crit if self._seen.get(g, 0.0) >= self.p.critical),
                      warm=sum(len(ws) for ws in self.warm.values()),
                      warm_gpus=round(sum(w.gpus for ws in self.warm.values() for w in ws), 2),
                      migrations=self.migrations)
        self._seen = {}
        if self.ctl == "none":
            return
        self._warm_rule(t)
        self._move_rule(t, pressure)

    def _warm_rule(self, t: float) -> None:
        b = int(t // self.p.bucket_s) - self.b0
        demand = {}
        new_bucket = t % self.p.bucket_s < self.p.tick_s
        for k in self.keys:
            if self.ctl == "reactive":       # the present: arrivals over the last bucket's length
                demand[key_name(k)] = [float(self.demand[k][b - 1])] * 2
                continue
            if new_bucket or k not in self._demand_fc:
                y = self.demand[k][max(0, b - self.p.demand_history_buckets):b]
                try:
                    f = choose(y, season=int(86400 // self.p.bucket_s), horizon=2, models=DEMAND_MODELS,
                               level=self.p.demand_level, origins=self.p.demand_origins)
                    self._demand_fc[k] = f.hi
                    if k in self._last_fc_point:
                        self.forecast_err.append(abs(self._last_fc_point[k] - self.demand[k][b - 1]))
                    self._last_fc_point[k] = f.points[0]
                except InvalidArgument:      # constant or short history: the last value
                    self._demand_fc[k] = [float(self.demand[k][b - 1])] * 2
                times = self.arrivals_of[k]
                lo, hi = bisect.bisect_left(times, t - self.p.burst_history_s), bisect.bisect_left(times, t)
                self.floor[key_name(k)] = burst_quantile(times[lo:hi], self.p.burst_windows * self.p.create_s,
                                                         self.p.burst_q)
            demand[key_name(k)] = self._demand_fc[k]
        self._demand_now = demand
        self._apply_warm(t, self.keys)

    def _apply_warm(self, t: float, keys: list) -> None:
        by_name = {key_name(k): k for k in keys}
        demand = {n: self._demand_now.get(n, [0.0]) for n in by_name}
        current = {key_name(k): len(self.warm.get(k, [])) for k in keys}
        floor = {n: self.floor[n] for n in by_name if n in self.floor}
        for a in warm_actions(demand, current, self.warm_pol, floor):
            k = by_name[a.subject]
            for _ in range(a.count):
                if a.kind == "warm_create":
                    self.warm_n += 1
                    w = Warm(f"warm-{self.warm_n}", k, t, t + self.p.create_s, float(self.rep[k].gpu_request))
                    if not self.rp.arrive(self._pseudo(w)):
                        break
                    self.warm[k].append(w)
                else:
                    w = max(self.warm[k], key=lambda w: w.created)
                    self.warm[k].remove(w)
                    self.warm_idle_gpu_s += (t + self.p.destroy_s - w.created) * w.gpus
                    self._push(t + self.p.destroy_s, 0, ("free", w))

    def _result(self) -> dict:
        w = np.array(self.waits) if self.waits else np.zeros(1)
        hours = (self.end - self.start) / 3600
        days = self.workload_s / 86400
        return {"alloc_wait_p50_s": round(float(np.percentile(w, 50)), 3),
                "alloc_wait_p99_s": round(float(np.percentile(w, 99)), 3),
                "alloc_wait_mean_s": round(float(w.mean()), 3),
                "waited_allocations": int((w > 0).sum()) if self.waits else 0,
                "critical_memory_gpu_minutes": round(self.critical_s / 60, 1),
                "critical_foreseen_gpu_minutes": round(self.rec.total("foreseen") * self.p.tick_s / 60, 1),
                "critical_thermal_gpu_minutes": 0.0,
                "migrations": self.migrations,
                "migrations_per_workload_day": round(self.migrations / days, 4) if days else 0.0,
                "warm_idle_gpu_hours": round(self.warm_idle_gpu_s / 3600, 2),
                "warm_created": self.warm_n, "warm_claimed": self.warm_claimed,
                "fleet_gpu_hours": round(self.rp.capacity * hours, 1),
                "allocations": len(self.waits), "cold_allocations": dict(self.cold), "unplaced": self.unplaced,
                "demand_forecast_mae": round(float(np.mean(self.forecast_err)), 3) if self.forecast_err else None,
                "pressure_forecast_mae": (round(float(np.mean(self.pressure_err)), 4)
                                          if self.pressure_err else None),
                "pressure_interval_coverage": (round(float(np.mean(self.pressure_cover)), 3)
                                               if self.pressure_cover else None),
                "timeline": self.rec.rows}


def simulate(nodes: list[TraceNode], pods: list[TracePod], controller: str, seed: int, start: float, end: float,
             params: Params = Params(), series=None, progress=None) -> dict:
    sim = Sim(nodes, pods, controller, seed, start, end, params, LoadModel(seed, series))
    sim.progress = progress
    return sim.run()
