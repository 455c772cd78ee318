"""The autoscaler controller (leader only): applies each deployment's scaling policy.

Level-triggered: every `interval` seconds, for each deployment with a policy (`spec.scaling`), it samples
its replicas' load (controlplane/controllers/autoscale_signals.py; a reading older than `load_max_age` is stale,
and while a ready replica's load is unknown no scale-down is made: autoscale_freshness.py), feeds the deployment's
`mesh.autoscale.planner.Planner` (the decision code `meshctl bench autoscale` measures, around the
Knative-like `Autoscaler`) and asks it for a decision, with one replica's cost (the cost ceiling), and for a
predictive policy the forecast's upper quantile of the request rate over one lead time
(controlplane/controllers/autoscale_forecast.py, refitted every `forecast_every` seconds off the event
loop) and the replica's measured figures (time in service, TTFT on a free slot, cold start) that size it. When the decision differs from `spec.replicas` it sets the replicas through the deployment manager
(one etcd write with the decision on `status.autoscaler`); the deployment controller does the rest.

Every change of replicas is an event with the reason and the signal values (`Autoscaled`, `ScaledToZero`);
a cost ceiling that stops a scale-up is a Warning event (`CostCeiling`) with the figures, once per episode; so is
a resource pool with no room for more (`PoolLimit`: a deployment with `spec.pool` is scaled within the pool's
room, PoolStore.room, docs/pools.md), and a replica's load reading gone stale (`LoadStale`): autoscale_warnings.py.
A policy with `variants` overflows replicas that wait for lack of room to a companion deployment of the next variant
that fits (`VariantOverflow`, controlplane/controllers/autoscale_overflow.py, autoscale_variants.py); the load and
counts are the deployment's and its companion's.
Metrics: `gpumesh_autoscaler_desired_replicas`, `gpumesh_autoscaler_decisions_total` (every decision, by
mode and bound_by), `gpumesh_autoscaler_scale_events_total` and `gpumesh_autoscaler_errors_total` (a
deployment whose pass failed: logged, a Warning event `AutoscalerError` once per episode, and the pass goes on
with the other deployments).

Its state is the samples of the last window and a predictive policy's last measured figures, in memory: a
new leader starts with empty windows (it holds what runs until it has seen a window's worth; a scale-down
waits for its delay as after any change) and sizes a forecast floor with the figures the previous leader
wrote on the status when they name the model identity deployed now (`figures_model`), else the registry's
(`autoscale_figures.figures`). The figures describe one model: when the deployment's model identity changes
(model, variant, backend and its settings, slice size: `autoscale_figures.note_model_identity`) they expire, with
a `FiguresReset` event. The state is of one deployment (its name and creation time, `_State.born`): a deployment
deleted and created again under its name starts afresh, and its forecast reads no history from before its creation.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge

from controlplane.controllers import autoscale_figures, autoscale_forecast, autoscale_freshness, autoscale_overflow
from controlplane.controllers import autoscale_signals, autoscale_variants, autoscale_warnings
from controlplane.controllers.slices import now as ts_now
from controlplane.loops import PeriodicTask
from controlplane.serving import scalingspec
from gpumesh.v1 import deployment_service_pb2 as D
from gpumesh.v1 import scaling_pb2 as S
from mesh import errors
from mesh.autoscale import Decision, Sample, ScalingPolicy
from mesh.autoscale.planner import Planner, ServiceFigures
from mesh.logs import log

logger = logging.getLogger(__name__)
DESIRED = Gauge("gpumesh_autoscaler_desired_replicas", "Replicas the autoscaler wants per deployment", ["deployment"])
DECISIONS = Counter("gpumesh_autoscaler_decisions_total", "Autoscaler decisions by mode and what bound them",
                    ["deployment", "mode", "bound_by"])
SCALES = Counter("gpumesh_autoscaler_scale_events_total", "Changes of replicas the autoscaler made",
                 ["deployment", "direction"])
ERRORS = Counter("gpumesh_autoscaler_errors_total", "Autoscaler passes that failed for a deployment (the others "
                 "went on)", ["deployment"])
STATUS_REFRESH_S = 30.0      # the status's signals are rewritten at least this often while they change
SOURCE = "autoscaler"
WAKE_HOLD_S = 600.0          # after a Wake the held request is demand until a replica is READY, this long at most


@dataclass
class _State:
    policy: ScalingPolicy
    plan: Planner
    born: float = 0.0           # the deployment's creation time: the state is of this deployment, not of its name
    counters: autoscale_signals.Counters = field(default_factory=autoscale_signals.Counters)
    woken_seen: float = 0.0
    waking_since: float = 0.0   # a Wake's time while no replica has been READY since
    forecast: float | None = None
    forecast_note: str = ""
    forecast_at: float = 0.0
    forecasting: asyncio.Task | None = None
    status_at: float = 0.0
    ceiling_bound: bool = False
    pool_bound: bool = False
    load_stale: bool = False    # a replica's reading is stale (one LoadStale Warning per episode)
    swap_hold_until: float = 0.0   # variant overflow: no swap back before this (a replica waited after one)
    figures: ServiceFigures | None = None   # the last measured figures (kept through quiet windows)
    figures_from: str = ""                  # "measured", "status" (a previous leader's), "registry"
    identity: autoscale_signals.ModelIdentity | None = None   # the model the figures describe
    measured_since: float = 0.0             # samples before it (of an earlier model) measure no figures
    status_figures: bool = True             # the status's figures may size (not once the model changed)


class AutoscalerController:
    def __init__(self, deployments, registry, *, history=None, interval: float = 2.0,
                 default_cold_start: float = 30.0, forecast_every: float = 30.0, clock=time.time,
                 load_max_age: float = autoscale_freshness.DEFAULT_MAX_AGE_S) -> None:
        self.dm = deployments
        self.registry = registry
        self.history = history                  # controlplane/forecast/recorder.HistoryRecorder, or None
        self.interval = interval
        self.default_cold_start = default_cold_start
        self.forecast_every = forecast_every
        self.load_max_age = load_max_age        # a reading received longer ago is stale (autoscale_freshness.py)
        self.clock = clock
        # each deployment's state, for the deployment now under its name (`_State.born`: a deployment deleted and
        # created again under its name, even within one interval, starts afresh: `_state`)
        self.states: dict[str, _State] = {}
        self.failing: dict[str, float] = {}     # deployment -> its creation time: its last pass failed (one Warning
        #                                         per episode of that deployment)
        self.decided: dict[str, set[tuple[str, str]]] = {}    # deployment -> (mode, bound_by) labels counted
        self._loop = PeriodicTask("autoscaler", self.run_once, interval=lambda: self.interval,
                                  on_error=lambda e: logger.error("autoscaler pass", exc_info=e))

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        fits = [s.forecasting for s in self.states.values() if s.forecasting is not None]
        for t in fits:
            if not t.done():
                t.cancel()
        await self._loop.stop()
        for t in fits:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass

    async def run_once(self) -> None:
        names = [n for n, d in sorted(self.dm.store.deployments.items()) if d.spec.HasField("scaling")]
        for gone in set(self.states) - set(names):
            self._forget(gone)
        self.failing = {n: born for n, born in self.failing.items() if n in names}
        # first: a deployment created again under its name makes its companion of its own, whose name the earlier
        # one's orphaned companion held
        await autoscale_overflow.companions_gone(self)
        for name in names:
            try:
                await self.one(name)
            except errors.NotFound:
                continue        # deleted meanwhile
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - one deployment's failure must not stop the others'
                self._failed(name, e)
            else:
                self.failing.pop(name, None)

    def _forget(self, name: str) -> None:
        """Drop what is kept of the deployment under `name` (gone, or another created under its name)."""
        st = self.states.pop(name, None)
        if st is not None and st.forecasting is not None:
            st.forecasting.cancel()
        _forget_metrics(name, self.decided.pop(name, set()))

    def _failed(self, name: str, e: Exception) -> None:
        """Log and count a deployment's failed pass; a Warning event (`AutoscalerError`) once per episode."""
        ERRORS.labels(name).inc()
        logger.error("autoscaler pass failed", exc_info=e,
                     extra={"fields": {"deployment": name, "error": repr(e)[:500]}})
        d = self.dm.store.deployments.get(name)
        born = _born(d) if d is not None else 0.0
        if self.failing.get(name) == born:
            return
        self.failing[name] = born
        event = getattr(self.dm, "_event_as", None)
        if d is None or event is None:
            return
        try:
            event(name, "Warning", "AutoscalerError", f"the autoscaler could not decide for this deployment "
                  f"(its replicas are left as they are; the others go on): {e!r}"[:1000], d.spec.tenant, SOURCE)
        except Exception as e2:  # noqa: BLE001 - the event is best effort
            logger.warning("autoscaler error event for %s not recorded: %r", name, e2)

    def _state(self, name: str, d: D.Deployment) -> _State:
        policy = scalingspec.to_policy(d.spec.scaling)
        born = _born(d)
        st = self.states.get(name)
        if st is not None and st.born != born:
            # another deployment under the name (deleted and created again since the last pass, by another tenant or
            # with another model): nothing of the earlier one's (samples, figures, forecast, episodes) is its
            self._forget(name)
            st = None
        if st is None or st.policy != policy:
            old = st
            st = _State(policy, Planner(policy, tick_s=self.interval, origin=None), born=born)
            if old is not None:         # a changed policy keeps what was seen, not what was decided
                st.counters, st.woken_seen = old.counters, old.woken_seen
                st.figures, st.figures_from = old.figures, old.figures_from
                st.identity, st.measured_since, st.status_figures = old.identity, old.measured_since, \
                    old.status_figures
                for s in old.plan.samples:
                    st.plan.observe(s)
                if old.forecasting is not None:
                    old.forecasting.cancel()
            self.states[name] = st
        return st

    async def one(self, name: str) -> Decision | None:
        d = self.dm.store.deployments.get(name)
        if d is None or not d.spec.HasField("scaling"):
            return None
        st = self._state(name, d)
        now = self.clock()
        replicas = self.dm.store.replicas_of(name)
        comp = autoscale_variants.companion_of(self.dm.store.deployments, name) if st.policy.variants else None
        comp_replicas = self.dm.store.replicas_of(comp.spec.name) if comp is not None else []
        serving = replicas + comp_replicas          # the load and the count are the deployment's and its overflow's
        ready, starting = autoscale_signals.counts(serving)
        woken = self.dm.scaling.woken.get(name, 0.0)
        if d.status.HasField("autoscaler") and d.status.autoscaler.HasField("woken_at"):
            # kept in etcd: a new leader still counts the request the gateway holds since the Wake
            woken = max(woken, d.status.autoscaler.woken_at.ToNanoseconds() / 1e9)
        if woken > st.woken_seen:
            st.woken_seen = st.waking_since = woken
        loads = self.dm.store.loads
        gap = autoscale_freshness.gaps(now, serving, loads, getattr(self.dm.store, "load_seen", {}), self.load_max_age)
        sample = autoscale_signals.sample(now, serving, loads, st.counters, gap)
        if ready:
            st.waking_since = 0.0
        elif st.waking_since and now - st.waking_since < WAKE_HOLD_S:
            # the request the gateway holds is demand until a replica is READY to take it: the idle period
            # starts again, and a replica starting from zero is not scaled away under it
            sample = dataclasses.replace(sample, queue=sample.queue + 1)
        if not ready or len(gap.missing) < ready:      # with no ready replica's load known, zeros would read as idle
            st.plan.observe(sample)
            self._record(name, d, st.policy, sample)
        variant, need = self._variant(d)
        autoscale_figures.note_model_identity(self.dm, name, d, st, variant, need, comp, now)
        cost = autoscale_signals.replica_cost(replicas, self.dm.ctl.fleet.slices, need or d.status.vram_bytes,
                                              int(d.spec.isolation), self.registry.gpu_models(),
                                              getattr(self.dm, "prices", None))
        cold, cold_from = autoscale_signals.cold_start(replicas, variant, self.default_cold_start)
        lead = st.policy.lead_time_s or cold
        figures = None
        if st.policy.predictive:
            self._refresh_forecast(name, st, lead, now)
            figures = autoscale_figures.figures(d, st, variant, replicas, now, cold)
        pools = getattr(self.dm.ctl, "pools", None)
        room = pools.room(d.spec.pool, need or d.status.vram_bytes, cost) if d.spec.pool and pools else None
        # the same decision code as `meshctl bench autoscale` (mesh/autoscale/planner.py)
        decision = st.plan.decide(now, ready=ready, starting=starting, figures=figures,
                                  forecast_rate=st.forecast if st.policy.predictive else None,
                                  replica_cost_per_hour=cost, pool_room=room)
        decision = autoscale_freshness.hold(decision, gap, ready=ready, current=ready + starting,
                                            max_replicas=st.policy.max_replicas, max_age=self.load_max_age)
        autoscale_warnings.stale(self.dm, name, d, st, gap, self.load_max_age)
        signals = dict(decision.signals)
        signals.update(in_flight=sample.in_flight, queue=sample.queue, kv_cache=round(sample.kv_cache, 4),
                       ttft_ms=round(sample.ttft_ms, 1), request_rate=round(sample.request_rate, 4),
                       replica_cost_per_hour=round(cost, 4))
        if st.policy.predictive:
            signals["lead_time_s"] = round(lead, 2)
            if st.forecast is not None:
                signals["forecast_rate"] = round(st.forecast, 4)
        DESIRED.labels(name).set(decision.desired)
        DECISIONS.labels(name, decision.mode, decision.bound_by or "none").inc()
        self.decided.setdefault(name, set()).add((decision.mode, decision.bound_by or "none"))
        own = decision.desired
        if st.policy.variants:
            own = await autoscale_overflow.share(self, name, d, st, decision, replicas, comp, comp_replicas, need,
                                                 cost, signals)
        await self._apply(name, d, st, decision, signals, cost, now, cold_from, own)
        return decision

    def _variant(self, d: D.Deployment):
        try:
            return self.dm._resolve(d.spec)
        except errors.MeshError:
            return None, 0

    def _record(self, name: str, d: D.Deployment, policy: ScalingPolicy, s: Sample) -> None:
        """The demand in the policy's metric and the request rate (what a predictive policy forecasts) into
        the history."""
        if self.history is None:
            return
        demand = {"concurrency": s.in_flight + s.queue, "queue": s.queue, "kv_cache": s.kv_cache * s.ready,
                  "ttft": s.ttft_ms}[policy.metric]
        self.history.add("deployment", name, autoscale_forecast.series_metric(policy.metric), demand,
                         d.spec.tenant, at=s.t)
        self.history.add("deployment", name, "request_rate", s.request_rate, d.spec.tenant, at=s.t)

    def _refresh_forecast(self, name: str, st: _State, lead: float, now: float) -> None:
        if (st.forecasting is not None and not st.forecasting.done()) or now - st.forecast_at < self.forecast_every:
            return
        st.forecast_at = now
        policy = st.policy

        async def refit():
            value, note = await autoscale_forecast.upper(self.history, name, "request_rate", lead,
                                                          policy.forecast_quantile, self.interval, since=st.born)
            st.forecast, st.forecast_note = value, note
        st.forecasting = asyncio.create_task(refit(), name=f"autoscaler-forecast-{name}")

    async def _apply(self, name: str, d: D.Deployment, st: _State, decision: Decision, signals: dict,
                     cost: float, now: float, cold_from: str, own: int | None = None) -> None:
        """Write the decision; the deployment's own replicas are `own` (its share beside a variant companion)
        or the decision's."""
        old = d.spec.replicas
        own = decision.desired if own is None else own
        status = S.AutoscalerStatus(desired=decision.desired, mode=decision.mode, reason=decision.reason[:1000],
                                    bound_by=decision.bound_by, signals=signals, replica_cost_per_hour=cost,
                                    figures_model=autoscale_signals.identity_digest(st.identity))
        prev = d.status.autoscaler
        if prev.HasField("last_scale_at"):
            status.last_scale_at.CopyFrom(prev.last_scale_at)
        if prev.HasField("woken_at"):
            status.woken_at.CopyFrom(prev.woken_at)
        status.observed_at.CopyFrom(ts_now())
        tenant = d.spec.tenant
        autoscale_warnings.bounds(self.dm, name, d, st, decision, cost, signals)
        changed = own != old
        material = (prev.desired, prev.mode, prev.bound_by, prev.figures_model) != \
            (status.desired, status.mode, status.bound_by, status.figures_model)
        if not changed and not material and now - st.status_at < STATUS_REFRESH_S:
            return
        if changed:
            status.last_scale_at.CopyFrom(ts_now())

        def edit(n: D.Deployment) -> None:
            n.spec.replicas = own
            n.status.autoscaler.CopyFrom(status)
        # written only onto the generation it was decided from: a Wake, Scale or SetScaling written meanwhile (the
        # copy read above was the one before it) is not undone; the next pass decides on what is there
        if changed:
            try:
                await self.dm._change(name, d.generation, edit)
            except errors.Aborted:
                log(logger, logging.INFO, "autoscaler decision dropped: the deployment changed since it was read",
                    deployment=name, generation=d.generation)
                return
            SCALES.labels(name, "up" if own > old else "down").inc()
            reason = "ScaledToZero" if decision.desired == 0 else "Autoscaled"
            beside = f" (of {decision.desired}; the rest as its variant companion)" if own != decision.desired else ""
            text = (f"replicas {old} -> {own}{beside} ({decision.mode}"
                    f"{', bound by ' + decision.bound_by if decision.bound_by else ''}): {decision.reason} "
                    f"signals: {_fmt(signals)}")
            self.dm._event_as(name, "Normal", reason, text[:1000], tenant, SOURCE)
            log(logger, logging.INFO, "autoscaled", deployment=name, replicas_from=old, replicas_to=own,
                mode=decision.mode, bound_by=decision.bound_by, reason=decision.reason, cold_start_from=cold_from)
        elif not await self.dm.write_autoscaler_status(name, status, d.generation):
            return
        st.status_at = now


def _born(d: D.Deployment) -> float:
    """The deployment's creation time (seconds; 0 unset): with its name, what tells it from a deployment deleted
    and created again under the name (the generation starts again at 1, the spec may be the same)."""
    return d.created_at.ToNanoseconds() / 1e9 if d.HasField("created_at") else 0.0


def _forget_metrics(name: str, decided) -> None:
    """A deployment gone (or without a policy now): its series go from every autoscaler metric (they stayed,
    one set per deployment ever scaled, frozen)."""
    for metric, labels in ((DESIRED, [()]), (ERRORS, [()]), (SCALES, [("up",), ("down",)]),
                           (DECISIONS, sorted(decided))):
        for rest in labels:
            try:
                metric.remove(name, *rest)
            except KeyError:
                pass


def _fmt(signals: dict) -> str:
    return " ".join(f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}" for k, v in sorted(signals.items()))
