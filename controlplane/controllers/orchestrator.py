"""The live orchestrator: a leader-only, level-triggered controller that forecasts and acts before
the need (issue 13; docs/prediction.md, "The live orchestrator").

Every `orchestrator_interval_seconds` it looks at the fleet as it is, fits the forecasts the enabled
rules need (in worker processes: `orchforecast.ProcessFitter`), runs the pure rules of
`mesh.orchestrator` and acts through the actuators that exist:

1. warm slices (`warmslices.WarmPool`): keep the forecast request mix's upper quantile carved;
2. moves before the hot spot (`premigrate.MovePass`): live-migrate off a GPU whose forecast memory or
   temperature reaches critical within the horizon;
3. grow before the need (`autoresize.ResizePass`): resize opted-in slices ahead of their use.

Each decision is a durable event with its reason (the forecast, its interval, the model, the action
and the expected benefit; `meshctl get events --for orchestrator`, `--for workload/ID`, ...) and a
metric (`orchmetrics`). The state it acts on is the fleet's (warm slices are slice records, moves are
migration records), so a new leader carries on where the last one stopped; only the recent samples
its forecasts read (`orchforecast.Windows`) start over, seeded from the history store when it is on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from controlplane.controllers import orchmetrics as M
from controlplane.controllers.autoresize import ResizePass
from controlplane.controllers.orchforecast import (InlineFitter, ProcessFitter, Windows, jobs_for_demand,
                                                   jobs_for_gpus, jobs_for_slices)
from controlplane.controllers.premigrate import MovePass
from controlplane.controllers.warmslices import WarmPool, request_key
from controlplane.forecast import forecasting
from controlplane.loops import PeriodicTask
from mesh.logs import log
from mesh.orchestrator import WarmPolicy, burst_quantile, warm_actions

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    warm: bool = False
    moves: bool = False
    resize: bool = False
    interval_s: float = 5.0
    level: float = 0.9
    fit_workers: int = 1
    load_step_s: float = 1.0
    load_horizon_s: float = 15.0
    demand_step_s: float = 60.0
    warm_lead_s: float = 60.0
    warm_release_band: float = 0.5
    warm_max_per_key: int = 8
    warm_max_total: int = 16
    warm_burst_q: float = 0.0
    warm_create_s: float = 0.0
    warm_burst_windows: float = 2.0
    per_workload_per_hour: int = 1
    fleet_per_hour: int = 60
    cooldown_s: float = 600.0
    downtime_s: float = 0.3
    resize_headroom: float = 0.1
    resize_shrink_band: float = 0.3
    resize_cooldown_s: float = 300.0

    @property
    def enabled(self) -> bool:
        return self.warm or self.moves or self.resize

    @classmethod
    def from_config(cls, cfg) -> "Settings":
        c = cfg
        return cls(warm=c.orchestrator_warm_slices, moves=c.orchestrator_moves, resize=c.orchestrator_resize,
                   interval_s=c.orchestrator_interval_seconds, level=c.orchestrator_level,
                   fit_workers=c.orchestrator_fit_workers, load_step_s=c.orchestrator_load_step_seconds,
                   load_horizon_s=c.orchestrator_load_horizon_seconds,
                   demand_step_s=c.orchestrator_demand_step_seconds, warm_lead_s=c.orchestrator_warm_lead_seconds,
                   warm_release_band=c.orchestrator_warm_release_band,
                   warm_max_per_key=c.orchestrator_warm_max_per_key, warm_max_total=c.orchestrator_warm_max_total,
                   warm_burst_q=c.orchestrator_warm_burst_quantile, warm_create_s=c.orchestrator_warm_create_seconds,
                   warm_burst_windows=c.orchestrator_warm_burst_windows,
                   per_workload_per_hour=c.orchestrator_move_per_workload_per_hour,
                   fleet_per_hour=c.orchestrator_move_fleet_per_hour,
                   cooldown_s=c.orchestrator_move_cooldown_seconds, downtime_s=c.orchestrator_move_downtime_seconds,
                   resize_headroom=c.orchestrator_resize_headroom,
                   resize_shrink_band=c.orchestrator_resize_shrink_band,
                   resize_cooldown_s=c.orchestrator_resize_cooldown_seconds)


class Orchestrator:
    def __init__(self, ctl, settings: Settings, *, telemetry=None, workloads=None, migrations=None,
                 deployments=None, thresholds=((50.0, 70.0, 85.0), (65.0, 80.0, 85.0)), fitter=None,
                 history=None, clock=time.time) -> None:
        self.ctl, self.s = ctl, settings
        self.telemetry, self.wm, self.migrations, self.deployments = telemetry, workloads, migrations, deployments
        self.pressure_pct, self.thermal_c = thresholds
        self.clock = clock
        self.history = history          # controlplane/forecast/recorder.HistoryRecorder, or None
        keep = max(forecasting.MAX_BINS * settings.load_step_s, 8 * 3600.0,
                   forecasting.MAX_BINS * settings.demand_step_s if settings.warm else 0.0)
        self.windows = Windows(keep, clock)
        self.fitter = fitter
        self.pool = WarmPool(ctl) if settings.warm else None
        self.moves = MovePass(ctl, workloads, migrations, settings, clock)
        self.resizes = ResizePass(ctl, migrations, settings, clock)
        self.latest: dict[tuple[str, str, str], object] = {}      # (kind, name, metric) -> Forecast
        # a pass every interval_s from the start of the last one (at least 50 ms apart), the first at once
        self._loop = PeriodicTask("orchestrator", self.tick, interval=lambda: self.s.interval_s, at_once=True,
                                  from_start=True, min_gap=0.05, setup=self._seed_from_history,
                                  on_error=self._pass_failed)
        self._warm_keys_seen: set[str] = set()

    # -- wiring -----------------------------------------------------------------------------------

    def attach(self) -> None:
        if self.telemetry is not None:
            self.telemetry.reading_listeners.append(self.windows.on_gpu)
            if hasattr(self.telemetry, "slice_listeners"):
                self.telemetry.slice_listeners.append(self.windows.on_slices)
        self.ctl.request_listeners.append(self._on_request)
        if self.pool is not None:
            self.ctl.warm = self.pool

    def _on_request(self, req) -> None:
        key = request_key(req)
        if key is not None:
            self.windows.on_request(key, req.count)

    def start(self) -> None:
        if self.fitter is None:
            self.fitter = ProcessFitter(self.s.fit_workers) if self.s.fit_workers else InlineFitter()
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()
        await self.resizes.stop()
        if self.ctl.warm is self.pool:
            self.ctl.warm = None
        if self.fitter is not None:
            self.fitter.close()

    async def seed(self, history) -> None:
        """Start from the history store's record (controlplane/forecast/) instead of empty windows: the
        GPUs' raw readings, and the Allocate counts per minute per MIG profile (as the key PROFILE/any,
        when the demand step is a minute: the store keeps requests per minute). A new leader or a
        restarted control plane then forecasts at once."""
        if history is None:
            return
        read, store = history.read, history.store
        since = self.clock() - self.windows.keep_s
        n = 0
        if self.s.moves:
            for node in list(self.ctl.fleet.nodes.values()):
                for g in node.gpus:
                    name = f"{g.node}/{g.index}"
                    got = [await read(store.read, "gpu", name, m, since)
                           for m in ("temperature", "memory_used", "memory_total")]
                    n += self.windows.seed_gpu(name, *got)
        if self.s.warm and self.s.demand_step_s == 60.0:
            for info in await read(store.list, "fleet"):
                if info.metric == "requests" and info.name.startswith("profile/"):
                    rows = await read(store.read, "fleet", info.name, "requests", since)
                    n += self.windows.seed_requests(f"{info.name.removeprefix('profile/')}/any", rows)
        log(logger, logging.INFO, "orchestrator seeded from the history", samples=n)

    async def _seed_from_history(self) -> None:
        if self.history is not None:
            try:
                await self.seed(self.history)
            except Exception as e:   # noqa: BLE001 - without the record it starts from empty windows
                log(logger, logging.WARNING, "orchestrator: cannot read the history; starting empty", error=repr(e))

    @staticmethod
    def _pass_failed(e: Exception) -> None:
        log(logger, logging.WARNING, "orchestrator pass failed; retrying", error=repr(e))

    # -- one level-triggered pass -------------------------------------------------------------------

    async def tick(self) -> dict:
        """Forecast, decide and act once; returns the actions taken per rule."""
        M.PASSES.inc()
        forecasts = await self.forecast()
        done = {"warm": 0, "moves": 0, "resize": 0}
        if self.s.warm:
            done["warm"] = await self.warm_pass({f.name: f for (k, _, m), f in forecasts.items()
                                                 if k == "fleet" and m == "requests"})
        if self.s.moves and self.migrations is not None:
            gpu = {(n, m): f for (k, n, m), f in forecasts.items() if k == "gpu"}
            decisions = self.moves.decide(gpu, self.pressure_pct, self.thermal_c, self._replica_slices())
            done["moves"] = await self.moves.act(decisions)
            M.DECISIONS.labels("moves", "migrate").inc(done["moves"])
            M.FAILED.labels("moves").inc(len(decisions) - done["moves"])
        if self.s.resize and self.migrations is not None:
            sl = {n: f for (k, n, m), f in forecasts.items() if k == "slice"}
            decisions = self.resizes.decide(sl)
            done["resize"] = await self.resizes.act(decisions)
            for a, _ in decisions:
                M.DECISIONS.labels("resize", a.kind).inc()
        if self.pool is not None:
            counts = self.pool.counts()
            for key in set(counts) | {k for k in self._warm_keys_seen}:
                M.WARM.labels(key).set(counts.get(key, 0))
            self._warm_keys_seen = set(counts) | self._warm_keys_seen
        return done

    async def forecast(self) -> dict:
        now = self.clock()
        jobs = []
        live = {f"{g.node}/{g.index}" for n in self.ctl.fleet.nodes.values() for g in n.gpus}
        self.windows.keep_only(live, self.ctl.fleet.slices)     # whichever rules are on: telemetry feeds all
        if self.s.warm:
            jobs += jobs_for_demand(self.windows, self.s.demand_step_s, self.s.warm_lead_s, self.s.level, now)
        if self.s.moves:
            jobs += jobs_for_gpus(self.windows, self.s.load_step_s, self.s.load_horizon_s, self.s.level, live)
        if self.s.resize:
            from controlplane.controllers.autoresize import opted_in
            ids = [s.id for s in self.ctl.fleet.slices.values() if opted_in(s)]
            jobs += jobs_for_slices(self.windows, ids, self.s.load_step_s, self.s.load_horizon_s, self.s.level)
        out = {}
        if jobs:
            t0 = time.monotonic()
            results = await self.fitter(jobs)
            M.FIT_SECONDS.observe(time.monotonic() - t0)
            out = {(j.kind, j.name, j.metric): f for j, f in zip(jobs, results) if f is not None}
        for key in set(self.latest) - set(out):      # a released slice's (a gone GPU's) last forecast is not kept
            try:
                M.FORECAST_UPPER.remove(*key)
            except KeyError:
                pass
        for key, f in out.items():
            M.FORECAST_UPPER.labels(*key).set(f.peak_hi)
        self.latest = out
        return out

    def _replica_slices(self) -> set[str]:
        dm = self.deployments
        if dm is None:
            return set()
        try:
            return {r.slice_id for reps in dm.store.replicas.values() for r in reps.values() if r.slice_id}
        except AttributeError:
            return set()

    # -- rule 1 ---------------------------------------------------------------------------------

    def burst_floor(self) -> dict[str, int]:
        """key -> warm slices kept whatever the step forecast says: the `warm_burst_q` quantile of the bursts
        (requests of the key within `warm_burst_windows` create times) among the arrivals the windows keep;
        {} when off."""
        if not self.s.warm_burst_q:
            return {}
        window = self.s.warm_burst_windows * (self.s.warm_create_s or self.pool.create_time_s())
        return {k: n for k, q in self.windows.arrivals.items()
                if (n := burst_quantile([a[0] for a in q], window, self.s.warm_burst_q))}

    async def warm_pass(self, demand: dict) -> int:
        """`demand`: warm key -> Forecast of requests per step. Creates and releases warm slices."""
        policy = WarmPolicy(step_s=self.s.demand_step_s, lead_s=self.s.warm_lead_s,
                            release_band=self.s.warm_release_band, max_per_key=self.s.warm_max_per_key)
        await self.pool.release_unclaimable()   # not carved, or cordoned: given back, carved again below where needed
        counts = self.pool.counts()
        for k in counts:        # a new leader: a key no request was seen for yet has its window from now on
            self.windows.track(k)
        floor = self.burst_floor()
        # keys without a forecast or burst floor yet keep what they have (no decision on a history too short);
        # a key decided on is judged with what it has (a floor-only key counted none, and was carved again
        # each pass; a key this leader had seen no request for was given back down to one)
        current = {k: v for k, v in counts.items() if k in demand or k in floor}
        actions = warm_actions({k: list(f.hi) for k, f in demand.items()}, current, policy, floor)
        total = sum(counts.values())
        done = 0
        for a in sorted(actions, key=lambda a: a.kind != "warm_release"):      # give back first
            f = demand.get(a.subject)
            why = a.reason
            if f is not None:
                why = (f"requests per {f.step_s:g}s forecast {f.points[0]:.2f} [{f.lo[0]:.2f}, {f.hi[0]:.2f}] "
                       f"({f.model}); {a.reason}")
            if a.kind == "warm_release":
                gone = await self.pool.release(a.subject, a.count, why)
                total -= len(gone)
                n = len(gone)
            else:
                count = min(a.count, max(0, self.s.warm_max_total - total))
                if count <= 0:
                    continue
                made = await self.pool.create(a.subject, count, why + f"; expected benefit: up to {count} "
                                              f"Allocate(s) answered without waiting for NVML")
                total += len(made)
                n = len(made)
            if n:
                M.DECISIONS.labels("warm", a.kind).inc(n)
                self.ctl.recorder.emit("Orchestrator", f"warm/{a.subject}", "Normal",
                                       "WarmSlicesCreated" if a.kind == "warm_create" else "WarmSlicesReleased",
                                       f"{n} warm {a.subject}: {why}", source="orchestrator")
                done += n
        return done
