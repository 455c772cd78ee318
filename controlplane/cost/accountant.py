"""The cost accountant (leader only): every `interval` seconds it charges each slice of the fleet for the
time since its cursor (mesh/cost/accounting.py), writes the charges and cursors to the ledger
(controlplane/cost/ledger.py) on a worker thread, and exports Prometheus metrics:

- `gpumesh_cost_dollars_total{tenant,deployment,model,node}`: dollars charged (every category);
- `gpumesh_cost_idle_dollars_total{tenant,deployment,model,node,kind}`: of them, idle warm slices
  (kind `idle_warm`) and idle replicas (`idle_replica`);
- `gpumesh_cost_dollars_per_hour{tenant,deployment,model,node}`: the live slices' rate now;
- `gpumesh_cost_dollars_per_1k_tokens{model}`: over the last `token_window` seconds.

A group's label sets go `SERIES_GRACE_S` after its last live slice once its node or deployment is deleted (the
grace lets Prometheus scrape the last increment), or `SERIES_IDLE_S` after it with nothing deleted (a tenant
that holds no slice on a node any more: no event says a tenant is gone); a model's once no deployment serves it
and its window is empty. The ledger keeps what they were charged (`_forget_gone`).

A slice's deployment and model come from its labels (`gpumesh.deployment`) and the deployment's spec; a
replica's activity (idle or not, tokens) from its backend's counters on Replica.load.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge

from controlplane.cost import watermark
from controlplane.cost.ledger import CostLedger
from controlplane.cost.releases import ReleaseLog, Vanished
from controlplane.loops import PeriodicTask
from gpumesh.v1 import cost_service_pb2 as C
from gpumesh.v1 import deployment_service_pb2 as D
from mesh.cost import PriceTable, slice_share
from mesh.cost import accounting as acc
from mesh.logs import log

logger = logging.getLogger(__name__)
LABELS = ["tenant", "deployment", "model", "node"]
DOLLARS = Counter("gpumesh_cost_dollars_total", "Dollars charged for slices at the configured GPU prices", LABELS)
IDLE = Counter("gpumesh_cost_idle_dollars_total", "Dollars charged for idle warm slices and idle replicas",
               LABELS + ["kind"])
RATE = Gauge("gpumesh_cost_dollars_per_hour", "Dollars per hour of the live slices now", LABELS)
PER_1K = Gauge("gpumesh_cost_dollars_per_1k_tokens", "Dollars per 1,000 tokens served, per model, over the "
               "accountant's token window", ["model"])
READERS = 2             # GetCost reads summing at once (more wait their turn)
CHUNK = 2000            # slices charged between two hand-backs of the event loop
HELD_LIMIT = 200_000    # charges kept for the next write while the ledger refuses writes; the oldest go first
LABEL_DEPLOYMENT = "gpumesh.deployment"
LABEL_REPLICA = "gpumesh.replica"
SERIES_GRACE_S = 300.0      # a deleted group's series outlive its last slice by several scrape intervals
SERIES_IDLE_S = 86400.0     # a group with no live slice for a day loses its series, deleted or not


@dataclass
class _Pass:
    """One accounting's running sums."""

    charges: list = field(default_factory=list)
    live: dict = field(default_factory=dict)                 # slice id -> its new cursor
    rates: dict = field(default_factory=dict)                # (tenant, deployment, model, node) -> $/hour
    slice_rates: dict = field(default_factory=dict)          # slice id -> (tenant, $/hour): `--by slice`'s rate
    spent: dict = field(default_factory=dict)                # same key -> [dollars, idle warm, idle replica]
    per_model: dict = field(default_factory=dict)            # model -> [dollars, tokens]
    seen_replicas: set = field(default_factory=set)
    released: set = field(default_factory=set)               # slice ids charged up to their release


def _remove(metric, *labels) -> None:
    try:
        metric.remove(*labels)
    except KeyError:       # never set in this process
        pass


def _secs(t) -> float:
    return t.seconds + t.nanos / 1e9


class CostAccountant:
    def __init__(self, ctl, deployments, ledger: CostLedger, prices: PriceTable, interval: float = 10.0,
                 history=None, token_window: float = 3600.0, clock=time.time) -> None:
        self.ctl = ctl
        self.deployments = deployments
        self.ledger = ledger
        self.prices = prices
        self.interval = interval
        self.history = history
        self.token_window = token_window
        self.clock = clock
        self.cursors: dict[str, float] = {}
        self.floor = 0.0          # the last leader's accounting (watermark.py): no slice is charged before it
        self.activity: dict[str, acc.Activity] = {}        # replica id -> its counters at the last accounting
        # replica id -> [first seen, peak in flight, last time it was active]: what recommendations size by
        self.observed: dict[str, list[float]] = {}
        self.window: dict[str, collections.deque] = {}     # model -> (t, dollars, tokens) per accounting
        self.rates: dict[tuple, float] = {}
        self.slice_rates: dict[str, tuple[str, float]] = {}
        self.model_24h: dict[str, tuple[float, float]] = {}  # model -> (dollars, tokens) over 24 h (ledger)
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="cost")
        # GetCost's ledger reads: threads of their own, so a long window's sums never queue an accounting's write
        self.reads = concurrent.futures.ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="cost-read")
        self._loop = PeriodicTask("cost-accountant", self._pass, interval=lambda: self.interval,
                                  on_error=self._pass_failed)
        self._last_compact = 0.0
        self._shapes: dict[tuple, tuple[float, float]] = {}
        # labels -> the metric's labelled child (looked up once: labels() is slow at thousands of slices)
        self._children: dict[tuple, object] = {}
        self._idle_children: dict[tuple, object] = {}
        self._rate_children: dict[tuple, object] = {}
        # what a failed ledger write left (its transaction rolled back): written with the next accounting
        self._held: list[acc.Charge] = []
        self._held_gone: set[str] = set()
        self._last_live: dict[tuple, float] = {}     # (tenant, deployment, model, node) -> last tick it was live
        # released slices, charged up to their release by the next accounting (controlplane/cost/releases.py)
        self.releases = ReleaseLog(clock)
        self.vanished = Vanished()
        self.releases.attach(getattr(ctl, "events", None))
        ctl.cost = self

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def read(self, fn, *args):
        """`fn` (a ledger read) on a reader thread, beside the writes' thread."""
        return await asyncio.get_running_loop().run_in_executor(self.reads, fn, *args)

    async def load(self) -> None:
        """The cursors of this host's ledger, none before the last leader's accounting (watermark.py)."""
        self.floor = await watermark.read(getattr(self.ctl, "store", None))
        self.cursors = {sid: max(t, self.floor) for sid, t in (await self._run(self.ledger.cursors)).items()}
        log(logger, logging.INFO, "cost ledger loaded", cursors=len(self.cursors), path=self.ledger.path,
            accounted_until=self.floor)

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()
        try:
            await self.account()          # the last interval, so a clean stop loses nothing
        except Exception as e:   # noqa: BLE001
            log(logger, logging.WARNING, "cost: last accounting at stop failed", error=repr(e))
        self.releases.detach(getattr(self.ctl, "events", None))
        self.reads.shutdown(wait=False, cancel_futures=True)    # a read still running: its connection closes after
        await self._run(self.ledger.close)
        self.pool.shutdown(wait=True)

    async def _pass(self) -> None:
        await self.account()
        now = self.clock()
        if now - self._last_compact >= 3600:
            self._last_compact = now
            await self._run(self.ledger.compact, now)

    @staticmethod
    def _pass_failed(e: Exception) -> None:   # accounting never stops the control plane
        log(logger, logging.WARNING, "cost accounting failed; retrying", error=repr(e))

    # -- one accounting -----------------------------------------------------------------------

    def _share_price(self, s) -> tuple[float, float]:
        """(share, dollars per hour) of a slice's shape, computed once per shape."""
        shape = (int(s.isolation), s.gpu_model, s.profile, int(s.memory_bytes), float(s.compute_share))
        got = self._shapes.get(shape)
        if got is None:
            share = slice_share(shape[0], shape[1], profile=shape[2], memory_bytes=shape[3], compute_share=shape[4])
            got = self._shapes[shape] = (share, share * self.prices.gpu_hour(s.gpu_model))
            if len(self._shapes) > 100_000:
                self._shapes.clear()
        return got

    def _child(self, cache: dict, metric, key: tuple):
        c = cache.get(key)
        if c is None:
            c = cache[key] = metric.labels(*key)
        return c

    def facts(self, s) -> acc.SliceFacts:
        share, per_hour = self._share_price(s)
        dep = s.labels.get(LABEL_DEPLOYMENT, "")
        model = ""
        if dep and self.deployments is not None:
            d = self.deployments.store.deployments.get(dep)
            model = d.spec.model if d is not None else ""
        return acc.SliceFacts(s.id, s.tenant, s.node, s.gpu_model, share, per_hour,
                              _secs(s.created_at) if s.HasField("created_at") else self.clock(), dep, model,
                              acc.is_warm_labels(s.labels))

    def _replica(self, s):
        dep, rid = s.labels.get(LABEL_DEPLOYMENT), s.labels.get(LABEL_REPLICA)
        if not dep or not rid or self.deployments is None:
            return None, None
        st = self.deployments.store
        r = st.replicas.get(dep, {}).get(rid)
        load = st.loads.get(rid) if r is not None else None
        return r, load

    def _activity(self, s) -> tuple[bool, float]:
        r, load = self._replica(s)
        if r is None:
            return False, 0.0
        now = None
        if load is not None and load.scraped:
            now = acc.Activity(load.requests_total, load.prompt_tokens_total + load.generation_tokens_total,
                               load.requests_running + load.requests_waiting)
        prev = self.activity.get(r.id)
        t = self.clock()
        obs = self.observed.setdefault(r.id, [t, 0.0, t])
        if now is not None:
            self.activity[r.id] = now
            obs[1] = max(obs[1], now.in_flight)
        idle, tokens = acc.replica_activity(prev, now)
        if prev is not None and now is not None and now.requests_total > prev.requests_total:
            obs[1] = max(obs[1], 1.0)         # a request ran between two readings
        if not idle:
            obs[2] = t
        return idle and r.state == D.REPLICA_STATE_READY, tokens

    def tick(self, now: float) -> tuple[list[acc.Charge], dict[str, float], set[str]]:
        """Charge every slice up to `now` (in memory: cursors, metrics); the charges, the cursors to store and
        the slices gone since the last tick."""
        p = _Pass()
        self.releases.attach(getattr(self.ctl, "events", None))
        for s in list(self.ctl.fleet.slices.values()):
            self._charge(p, s, now)
        self._charge_released(p, now)
        return self._finish(p, now)

    async def tick_async(self, now: float, chunk: int = CHUNK) -> tuple[list[acc.Charge], dict[str, float], set[str]]:
        """`tick`, handing the event loop back every `chunk` slices (a large fleet takes a while)."""
        p = _Pass()
        self.releases.attach(getattr(self.ctl, "events", None))
        for i, s in enumerate(list(self.ctl.fleet.slices.values())):
            if i and i % chunk == 0:
                await asyncio.sleep(0)
            self._charge(p, s, now)
        self._charge_released(p, now)
        return self._finish(p, now)

    def _charge(self, p: "_Pass", s, now: float) -> None:
        """Charge live slice `s` from its cursor to `now`; it is live: its cursor moves to `now`, its rate counts."""
        f = self.facts(s)
        idle, tokens = self._activity(s) if f.deployment else (False, 0.0)
        rid = s.labels.get(LABEL_REPLICA)
        if rid:
            p.seen_replicas.add(rid)
        cursor = self.cursors.get(s.id)
        if cursor is None and self.vanished.cursors:
            cursor = self.vanished.pop(s.id)          # back in the fleet (a failed deletion put back)
        if cursor is None and self.floor:
            cursor = self.floor                       # charged by the last leader up to then
        p.live[s.id] = max(now, cursor or 0.0)
        key = (f.tenant, f.deployment, f.model, f.node)
        p.rates[key] = p.rates.get(key, 0.0) + f.dollars_per_hour
        p.slice_rates[s.id] = (f.tenant, f.dollars_per_hour)
        self._add(p, f, acc.charge(f, cursor, now, idle_replica=idle, tokens=tokens))

    def _charge_released(self, p: "_Pass", now: float) -> None:
        """Charge each slice released since the last accounting from its cursor (its creation when it never had
        one) up to its release: it is gone from the fleet, so `_charge` no longer sees it."""
        for sid, (s, at) in self.releases.take().items():
            if sid in p.live:
                continue                  # in the fleet again (a put back): charged as live
            cursor = self.cursors[sid] if sid in self.cursors else self.vanished.pop(sid)
            if cursor is None and self.floor:
                cursor = self.floor
            p.released.add(sid)
            f = self.facts(s)
            self._add(p, f, acc.charge(f, cursor, min(at, now)))

    def _add(self, p: "_Pass", f: acc.SliceFacts, c: acc.Charge | None) -> None:
        if c is None:
            return
        key = (f.tenant, f.deployment, f.model, f.node)
        p.charges.append(c)
        spent = p.spent.get(key)
        if spent is None:
            spent = p.spent[key] = [0.0, 0.0, 0.0]
        spent[0] += c.dollars
        if c.category == acc.IDLE_WARM:
            spent[1] += c.dollars
        elif c.category == acc.IDLE_REPLICA:
            spent[2] += c.dollars
        if f.model:
            m = p.per_model.setdefault(f.model, [0.0, 0.0])
            m[0] += c.dollars
            m[1] += c.tokens

    def _finish(self, p: "_Pass", now: float) -> tuple[list[acc.Charge], dict[str, float], set[str]]:
        charges, live, rates, spent, per_model, seen_replicas = (p.charges, p.live, p.rates, p.spent, p.per_model,
                                                                 p.seen_replicas)
        for key, (dollars, warm, idle_rep) in spent.items():
            self._child(self._children, DOLLARS, key).inc(dollars)
            if warm:
                self._child(self._idle_children, IDLE, (*key, acc.IDLE_WARM)).inc(warm)
            if idle_rep:
                self._child(self._idle_children, IDLE, (*key, acc.IDLE_REPLICA)).inc(idle_rep)
        for model, (dollars, tokens) in per_model.items():
            self.window.setdefault(model, collections.deque()).append((now, dollars, tokens))
        gone = set(self.cursors) - set(live)
        self.vanished.add(gone - p.released, self.cursors, now)     # left the fleet, their release not seen yet
        self.cursors = live
        for rid in set(self.activity) - seen_replicas:
            self.activity.pop(rid, None)
        for rid in set(self.observed) - seen_replicas:
            self.observed.pop(rid, None)
        for key in set(self.rates) - set(rates):
            self._rate_children.pop(key, None)
            _remove(RATE, *key)
        for key, v in rates.items():
            if self.rates.get(key) != v:
                self._child(self._rate_children, RATE, key).set(v)
        self.rates = rates
        self.slice_rates = p.slice_rates
        served = self._served_models()
        for model, dq in list(self.window.items()):
            while dq and dq[0][0] < now - self.token_window:
                dq.popleft()
            if not dq and served is not None and model not in served:
                del self.window[model]          # no deployment serves it and its window is empty: it goes
                _remove(PER_1K, model)
                continue
            dollars, tokens = sum(x[1] for x in dq), sum(x[2] for x in dq)
            PER_1K.labels(model).set(acc.per_1k_tokens(dollars, tokens))
        for key in rates:
            self._last_live[key] = now
        self._forget_gone(rates, now)
        if self.history is not None:
            per: dict[tuple[str, str, str], float] = {}
            for (tenant, dep, _model, _node), v in rates.items():
                per[("tenant", tenant, tenant)] = per.get(("tenant", tenant, tenant), 0.0) + v
                if dep:
                    per[("deployment", dep, tenant)] = per.get(("deployment", dep, tenant), 0.0) + v
            for (kind, name, tenant), v in per.items():
                self.history.add(kind, name, "dollars_per_hour", v, tenant, at=now)
        return charges, live, gone

    def _served_models(self) -> set[str] | None:
        """The models of the deployments there are (None without a deployment manager: nothing is known)."""
        if self.deployments is None:
            return None
        return {d.spec.model for d in list(self.deployments.store.deployments.values())}

    def _deleted(self, key: tuple) -> bool:
        """Whether a group's node or deployment is deleted, or its deployment serves another model now."""
        _tenant, dep, model, node = key[:4]
        nodes = getattr(self.ctl.fleet, "nodes", None)
        if nodes is not None and node not in nodes:
            return True
        if dep and self.deployments is not None:
            d = self.deployments.store.deployments.get(dep)
            return d is None or (bool(model) and d.spec.model != model)
        return False

    def _forget_gone(self, rates: dict, now: float) -> None:
        """Drop the counters' label sets (and their cached children) of the groups with no live slice: those
        whose node or deployment is deleted (or whose deployment serves another model now) `SERIES_GRACE_S`
        after their last live slice, so a scrape still sees their last increment; any other `SERIES_IDLE_S`
        after it (a tenant gone from a node). They were kept for ever, one series per group ever charged,
        frozen at their last value. What they were charged stays in the ledger (GetCost, the 24 h figures); a
        group still live keeps its counters untouched."""
        def gone(k: tuple) -> bool:
            idle = now - self._last_live.get(k[:4], now)
            return idle >= SERIES_IDLE_S or (idle >= SERIES_GRACE_S and self._deleted(k))
        for cache, metric in ((self._children, DOLLARS), (self._idle_children, IDLE)):
            for key in [k for k in cache if k[:4] not in rates and gone(k)]:
                del cache[key]
                _remove(metric, *key)
        live = {k[:4] for k in self._children} | {k[:4] for k in self._idle_children} | set(rates)
        for key in [k for k in self._last_live if k not in live]:
            del self._last_live[key]

    async def account(self) -> int:
        now = self.clock()
        charges, live, gone = await self.tick_async(now)
        # the cursors in memory moved on with this tick: charges a failed write did not store are kept and
        # written with the next one (else the interval was never charged: the next tick starts at the new cursors)
        charges = self._held + charges
        gone = (self._held_gone | gone) - set(live)
        try:
            # shielded: stop() cancels the pass where it waits, and a queued write (behind a GetCost query or the
            # compaction) was dropped with the cancel while the cursors had moved on: that interval was never charged
            n = await asyncio.shield(asyncio.get_running_loop().run_in_executor(
                self.pool, self.ledger.write, charges, live, gone))
        except Exception:
            self._held, self._held_gone = charges[-HELD_LIMIT:], gone
            raise
        self._held, self._held_gone = [], set()
        await watermark.write(getattr(self.ctl, "writer", None), max(now, self.floor))   # every live slice: up to now
        lines = await self._run(self.ledger.query, "model", now - 86400.0)
        self.model_24h = {ln.key: (ln.dollars, ln.tokens) for ln in lines if ln.key}
        return n

    # -- reads --------------------------------------------------------------------------------

    def rate(self, by: str, key: str, tenant: str | None = None) -> float:
        """Dollars per hour now of the live slices of one group (of one tenant's slices when given; a released
        slice: 0, as for a group of none)."""
        return self.rates_by(by, tenant).get(key, 0.0)

    def rates_by(self, by: str, tenant: str | None = None) -> dict[str, float]:
        """The dollars per hour now of every group `by` (of one tenant's slices when given), in one pass."""
        if by == "slice":
            return {k: v for k, (owner, v) in self.slice_rates.items() if tenant is None or owner == tenant}
        i = {"tenant": 0, "deployment": 1, "model": 2, "node": 3}.get(by)
        out: dict[str, float] = {}
        if i is None:
            return out
        for k, v in self.rates.items():
            if tenant is None or k[0] == tenant:
                out[k[i]] = out.get(k[i], 0.0) + v
        return out

    def model_costs(self, models) -> list:
        out, rates = [], self.rates_by("model")
        for m in sorted(models):
            dollars, tokens = self.model_24h.get(m, (0.0, 0.0))
            out.append(C.ModelCost(model=m, dollars_per_hour=round(rates.get(m, 0.0), 6),
                                   dollars_24h=round(dollars, 6),
                                   dollars_per_1k_tokens=round(acc.per_1k_tokens(dollars, tokens), 6)))
        return out
