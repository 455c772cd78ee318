"""Routing policies as plugins, the scheduler's shape: `filter` drops replicas that must not get the
request, `score` rates the rest (lower is better), `pick` chooses. Selected by name in the config
(`policy`): gpu-aware (the gateway's own), and round-robin and least-loaded (the balancers users run
today, kept for `meshctl bench serve` to compare against)."""

from __future__ import annotations

import hashlib
import random
from collections import OrderedDict
from dataclasses import dataclass

from controlplane.gateway.stats import ReplicaStats
from controlplane.gateway.view import GpuInfo, ReplicaInfo

PRESSURE = ("low", "normal", "high", "critical")
THERMAL = ("normal", "warning", "throttling", "critical")


def level(value: float, limits: tuple[float, float, float], names: tuple[str, ...]) -> str:
    """Seed 003's bands, as the control plane computes them (controllers/telemetry.py)."""
    if value < limits[0]:
        return names[0]
    if value <= limits[1]:
        return names[1]
    if value <= limits[2]:
        return names[2]
    return names[3]


def gpu_levels(g: GpuInfo | None, pressure_limits, thermal_limits) -> tuple[str, str]:
    """(memory pressure, thermal state) of a GPU from its latest reading; unknown reads as low/normal."""
    if g is None or not g.has_reading:
        return "low", "normal"
    pct = 100.0 * g.memory_used / g.memory_total if g.memory_total > 0 else 0.0
    return level(pct, pressure_limits, PRESSURE), level(g.temperature_c, thermal_limits, THERMAL)


@dataclass
class Candidate:
    replica: ReplicaInfo
    stats: ReplicaStats
    gpu: GpuInfo | None
    limit: int                  # requests at once the replica takes
    pressure: str = "low"
    thermal: str = "normal"

    @property
    def key(self) -> str:
        return self.replica.key

    @property
    def free(self) -> bool:
        return self.stats.in_flight < self.limit

    @property
    def load(self) -> float:
        """Requests on the replica per slot: the gateway's in flight plus the backend's own waiting queue."""
        return (self.stats.in_flight + (self.replica.waiting or 0)) / self.limit


@dataclass
class RouteContext:
    model: str
    affinity_key: str = ""
    max_tokens: int = 16
    exclude: frozenset = frozenset()


def affinity_key(tenant: str | None, body: dict, chars: int) -> str:
    """A conversation's key: the tenant and the first `chars` characters of its prompt (chat: the messages
    before the last one, which is what the next turn shares)."""
    if "messages" in body and isinstance(body["messages"], list):
        msgs = body["messages"]
        head = msgs[:-1] if len(msgs) > 1 else msgs
        text = "\x1e".join(f"{m.get('role')}:{m.get('content')}" for m in head if isinstance(m, dict))
    else:
        p = body.get("prompt", "")
        text = p if isinstance(p, str) else str(p)
    if not text:
        return ""
    return hashlib.blake2b(f"{tenant}\x1f{text[:chars]}".encode(errors="surrogatepass"), digest_size=12).hexdigest()


class Policy:
    NAME = ""
    uses_gpu = False
    uses_breaker = False

    def __init__(self, cfg, rng: random.Random | None = None) -> None:
        self.cfg = cfg
        self.rng = rng or random.Random()

    def healthy(self, c: Candidate) -> bool:
        """May the replica take requests at all (slots aside)?"""
        if not c.replica.ready:
            return False
        if self.uses_breaker and not c.stats.breaker.allows():
            return False
        if self.uses_gpu and (c.pressure == "critical" or c.thermal in ("throttling", "critical")
                              or (c.gpu is not None and not c.gpu.healthy)):
            return False
        return True

    def filter(self, cands: list[Candidate], ctx: RouteContext) -> list[Candidate]:
        return [c for c in cands if c.key not in ctx.exclude and c.free and self.healthy(c)]

    def score(self, c: Candidate, ctx: RouteContext, pool: list[Candidate]) -> float:
        return 0.0

    def pick(self, cands: list[Candidate], ctx: RouteContext) -> tuple[Candidate | None, str]:
        """The replica for the request and why (for the log line); None when none may take it now."""
        ok = self.filter(cands, ctx)
        if not ok:
            return None, "no replica free"
        scored = sorted(ok, key=lambda c: (self.score(c, ctx, ok), self.rng.random()))
        return scored[0], f"lowest score {self.score(scored[0], ctx, ok):.3f} of {len(ok)}"


class RoundRobin(Policy):
    """Each replica in turn (nginx's default): no GPU state, no latency, no breaker."""
    NAME = "round-robin"

    def __init__(self, cfg, rng=None) -> None:
        super().__init__(cfg, rng)
        self.turn: dict[str, int] = {}

    def pick(self, cands, ctx):
        ordered = sorted(cands, key=lambda c: c.key)
        n = len(ordered)
        start = self.turn.get(ctx.model, 0)
        for i in range(n):
            c = ordered[(start + i) % n]
            if c.key not in ctx.exclude and c.free and self.healthy(c):
                self.turn[ctx.model] = (start + i + 1) % n
                return c, f"round-robin turn {(start + i) % n} of {n}"
        return None, "no replica free"


class LeastLoaded(Policy):
    """The fewest requests in flight (nginx least_conn, Envoy least-request): no GPU state, no breaker."""
    NAME = "least-loaded"

    def score(self, c, ctx, pool):
        return c.load


class GpuAware(Policy):
    """Seed 003's routing: GPU memory pressure and thermal state (critical or throttling GPUs get nothing),
    EMA latency, in-flight and backend queue, failures with a circuit breaker, and prefix affinity with a
    load bound (power of two choices when the affine replica is too loaded)."""
    NAME = "gpu-aware"
    uses_gpu = True
    uses_breaker = True

    def __init__(self, cfg, rng=None) -> None:
        super().__init__(cfg, rng)
        self.affine: OrderedDict[str, str] = OrderedDict()     # affinity key -> replica key
        self.affine_max = 10000

    def _latency(self, c: Candidate, ctx: RouteContext, pool: list[Candidate]) -> float:
        def est(x: Candidate) -> float | None:
            if x.stats.ttft_ema is None and x.stats.tpot_ema is None:
                return None
            return (x.stats.ttft_ema or 0.0) + (x.stats.tpot_ema or 0.0) * ctx.max_tokens
        known = [e for e in (est(x) for x in pool) if e is not None]
        mine = est(c)
        if not known or mine is None:
            return 0.0
        best = min(known)
        return (mine - best) / best if best > 0 else 0.0

    def score(self, c, ctx, pool):
        cfg = self.cfg
        s = cfg.weight_pressure * PRESSURE.index(c.pressure) / 3
        s += cfg.weight_thermal * THERMAL.index(c.thermal) / 3
        s += cfg.weight_latency * min(self._latency(c, ctx, pool), 10.0)
        s += cfg.weight_inflight * c.stats.in_flight / c.limit
        backend = (c.replica.waiting or 0) / c.limit + (c.replica.kv_usage or 0.0)
        s += cfg.weight_backend_queue * backend
        s += cfg.weight_failures * min(c.stats.recent_failures, 5.0)
        return s

    def pick(self, cands, ctx):
        ok = self.filter(cands, ctx)
        if not ok:
            return None, "no replica free and healthy"
        if self.cfg.affinity and ctx.affinity_key:
            want = self.affine.get(ctx.affinity_key)
            pool = [c for c in cands if c.replica.ready]
            mean = sum(c.load for c in pool) / max(len(pool), 1)
            chosen = next((c for c in ok if c.key == want), None)
            if chosen is not None and chosen.load <= self.cfg.affinity_load_bound * mean + 1e-9 + 1.0 / chosen.limit:
                self._remember(ctx.affinity_key, chosen)
                return chosen, "prefix affinity"
            if want is not None and len(ok) >= 2:
                a, b = self.rng.sample(ok, 2)
                chosen = min((a, b), key=lambda c: self.score(c, ctx, ok))
                self._remember(ctx.affinity_key, chosen)
                return chosen, "affine replica loaded or unavailable: power of two choices"
        chosen = min(ok, key=lambda c: (self.score(c, ctx, ok), self.rng.random()))
        if ctx.affinity_key:
            self._remember(ctx.affinity_key, chosen)
        return chosen, (f"lowest score {self.score(chosen, ctx, ok):.3f} of {len(ok)} (pressure {chosen.pressure}, "
                        f"thermal {chosen.thermal}, in flight {chosen.stats.in_flight})")

    def _remember(self, key: str, c: Candidate) -> None:
        self.affine[key] = c.key
        self.affine.move_to_end(key)
        while len(self.affine) > self.affine_max:
            self.affine.popitem(last=False)


POLICIES = {p.NAME: p for p in (GpuAware, RoundRobin, LeastLoaded)}


def make(name: str, cfg, rng: random.Random | None = None) -> Policy:
    try:
        return POLICIES[name](cfg, rng)
    except KeyError:
        raise ValueError(f"policy: {name!r} is not one of {', '.join(POLICIES)}") from None
