"""Routing policies as plugins, the scheduler's shape: `filter` drops replicas that must not get the
request, `score` rates the rest (lower is better), `pick` chooses. Selected by name in the config
(`policy`): gpu-aware (the gateway's own), and round-robin and least-loaded (the balancers users run
today, kept for `meshctl bench serve` to compare against)."""

from __future__ import annotations

import hashlib
import math
import random
import time
from collections import OrderedDict
from dataclasses import dataclass

from controlplane.gateway import cost
from controlplane.gateway.stats import ReplicaStats
from controlplane.gateway.view import GpuInfo, ReplicaInfo
from mesh.levels import PRESSURE, THERMAL, level





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
    def risk_state(self) -> str:
        """The risky part of its GPU's state when the candidate was taken ("" sound): the key the request's
        outcome is counted under in the observed failure risk (cost.py, hazard.py)."""
        return cost.risk_state(self.pressure, self.thermal)

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
    deadline_at: float | None = None     # time.monotonic() by which the request must have a slot (admission)
    ahead: int = 0                       # requests queued before it (admission)
    behind: int = 0                      # requests queued after it for the same pool (admission)
    first_token_by: float | None = None  # time.monotonic() of its x-gpumesh-deadline-ms (to the first token)

    def wait_left(self) -> float:
        return math.inf if self.deadline_at is None else self.deadline_at - time.monotonic()


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
    # a stream that breaks after tokens were sent is continued on another replica (relay.py); the baselines
    # stand for nginx/Envoy, which retry only before the response starts
    resumes_streams = False

    def __init__(self, cfg, rng: random.Random | None = None) -> None:
        self.cfg = cfg
        self.rng = rng or random.Random()

    def healthy(self, c: Candidate) -> bool:
        """May the replica take requests in the normal course (slots aside)?"""
        return self.reachable(c) and not (self.uses_gpu and self.at_risk(c))

    def reachable(self, c: Candidate) -> bool:
        """Ready, and its circuit (where the policy uses one) lets a request through."""
        if not c.replica.ready:
            return False
        return not (self.uses_breaker and not c.stats.breaker.allows())

    @staticmethod
    def at_risk(c: Candidate) -> bool:
        """A GPU at critical memory pressure or critical temperature, or reported unhealthy."""
        return c.pressure == "critical" or c.thermal == "critical" or (c.gpu is not None and not c.gpu.healthy)

    def expected_wait(self, cands: list[Candidate], ctx: RouteContext) -> float | None:
        """Seconds until a slot frees for this request, where the policy can tell (None: it cannot)."""
        return None

    def first_token(self, cands: list[Candidate]) -> float:
        """Expected seconds to the first token once a slot is had (0 where the policy does not know)."""
        return 0.0

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
    """Seed 003's routing as expected completion time (cost.py): the replica where the request is expected
    to finish first, from its measured service time (EMA time to first token and per token, which holds a
    throttled GPU's slowdown once), its in-flight requests and backend queue, times a risk factor for its
    GPU's state (the failure rate observed there, hazard.py; or a fixed one) and recent failures (the
    expected cost of a request that fails there and runs again elsewhere);
    prefix affinity with a load bound (power of two choices when the affine replica is too loaded); a
    circuit breaker.

    Work-conserving: a request never waits while a replica with a free slot is expected to finish it at
    least as soon as waiting would. A free replica that is sound (GPU below critical memory and temperature,
    no recent failures) always takes it; the free replica with the lowest expected completion time wins. A
    risky replica (critical memory or temperature, recent failures) is skipped only while waiting for a sound
    one is expected to finish the request sooner (the sound ones' expected wait for a slot, from their
    service rate and the requests ahead, plus their service time, plus one slot-interval for each request
    queued behind, which an idle risky replica also keeps waiting), or, where it is not, still taken; with
    `critical_overflow` off a critical GPU is never used while a sound GPU exists. When every GPU is critical
    the request waits (seed 003's queue) until one recovers or its deadline passes."""
    NAME = "gpu-aware"
    uses_gpu = True
    uses_breaker = True
    resumes_streams = True

    def __init__(self, cfg, rng=None) -> None:
        super().__init__(cfg, rng)
        self.affine: OrderedDict[str, str] = OrderedDict()     # affinity key -> replica key
        self.affine_max = 10000

    def score(self, c, ctx, pool):
        return cost.completion(c, ctx.max_tokens, pool, self.cfg)

    @staticmethod
    def risky(c: Candidate) -> bool:
        """Critical GPU or recent failures: used only where it beats waiting for a sound replica."""
        return Policy.at_risk(c) or c.stats.recent_failures >= 1.0

    def _usable(self, cands, ctx) -> list[Candidate]:
        """Replicas the request may go to at all: not excluded, ready, circuit closed or probing, GPU not
        reported unhealthy; critical GPUs only with critical_overflow while a sound GPU exists."""
        out = [c for c in cands if c.key not in ctx.exclude and self.reachable(c)
               and (c.gpu is None or c.gpu.healthy)]
        if not any(not self.at_risk(c) for c in out):
            return []                     # every GPU critical: seed 003's queue, wait for one to recover
        if not self.cfg.critical_overflow:
            out = [c for c in out if not self.at_risk(c)]
        return out

    def expected_wait(self, cands, ctx):
        """The wait for a slot on any replica that may serve the request (inf when none may)."""
        usable = self._usable(cands, ctx)
        return cost.expected_wait(usable, ctx.max_tokens, cands, self.cfg, ctx.ahead)

    def first_token(self, cands):
        return cost.first_token([c for c in cands if self.healthy(c)], cands, self.cfg)

    def _floor(self, usable, cands, ctx) -> float:
        """The fastest sound replica's service time: a risky replica is not assumed faster than that (its EMA
        was measured before its GPU went critical or it started failing; a critical GPU does not speed up)."""
        sound = [cost.service_time(c, ctx.max_tokens, cands, self.cfg) for c in usable if not self.risky(c)]
        return min(sound) if sound else 0.0

    def cost_of(self, c: Candidate, ctx, cands, floor: float) -> float:
        """The score, with a risky replica's service time not below `floor`."""
        ect = self.score(c, ctx, cands)
        return max(ect, floor * cost.risk(c, self.cfg)) if self.risky(c) else ect

    def _wait_instead(self, best: Candidate, usable, cands, ctx, floor: float) -> tuple[bool, str]:
        """Should the request wait for a sound replica rather than go to the risky free `best` now?"""
        sound = [c for c in usable if not self.risky(c)]
        if not sound:
            return False, "no sound replica to wait for"
        wait = cost.expected_wait(sound, ctx.max_tokens, cands, self.cfg, ctx.ahead)
        # once a slot is had, the request costs the replica's service time (its in-flight load is the wait)
        later = wait + min(cost.service_time(c, ctx.max_tokens, cands, self.cfg) * cost.risk(c, self.cfg)
                           for c in sound)
        # leaving the risky replica idle is not free for the queue: each request waiting behind this one then
        # gets its sound slot one slot-interval later (the interval at which sound slots free up)
        interval = cost.expected_wait(sound, ctx.max_tokens, cands, self.cfg, 0)
        others = ctx.behind * interval
        now = self.cost_of(best, ctx, cands, floor)
        left = ctx.wait_left()
        if wait > left:
            return False, f"the sound replicas' expected wait {wait:.1f}s exceeds the {max(left, 0):.1f}s left"
        if now < later + others:
            return False, (f"expected {now:.1f}s there, {later:.1f}s waiting for a sound replica (wait {wait:.1f}s)"
                           f" + {others:.1f}s more for the {ctx.behind} queued behind")
        return True, (f"waiting for a sound replica: expected wait {wait:.1f}s, done in {later:.1f}s vs {now:.1f}s "
                      f"({ctx.behind} queued behind)")

    def pick(self, cands, ctx):
        usable = self._usable(cands, ctx)
        free = [c for c in usable if c.free]
        if not free:
            if not usable:
                return None, "no replica free and healthy (every GPU critical: waiting for one to recover)"
            return None, "no replica free"
        if self.cfg.affinity and ctx.affinity_key:
            chosen, why = self._affine(free, cands, ctx)
            if chosen is not None:
                return chosen, why
        floor = self._floor(usable, cands, ctx)
        best = min(free, key=lambda c: (self.cost_of(c, ctx, cands, floor), self.rng.random()))
        if self.risky(best) and not any(not self.risky(c) for c in free):
            # only risky replicas are free: weigh the best of them against waiting for a busy sound one
            # (with a sound one free, nothing waits: the lowest expected completion among the free wins)
            wait, why = self._wait_instead(best, usable, cands, ctx, floor)
            if wait:
                return None, f"no sound replica free ({why})"
            if ctx.affinity_key:
                self._remember(ctx.affinity_key, best)
            return best, (f"risky replica (pressure {best.pressure}, thermal {best.thermal}, state risk "
                          f"{cost.state_risk(best, self.cfg):.2f}, recent failures "
                          f"{best.stats.recent_failures:.1f}) used: {why}")
        if ctx.affinity_key:
            self._remember(ctx.affinity_key, best)
        return best, (f"least expected completion {self.score(best, ctx, cands):.2f}s of {len(free)} free (pressure "
                      f"{best.pressure}, thermal {best.thermal}, in flight {best.stats.in_flight})")

    def _affine(self, free, cands, ctx) -> tuple[Candidate | None, str]:
        """The conversation's replica while it is free, sound and not loaded beyond the bound; else the
        better of two random free sound ones (None: no affinity known, decide by score)."""
        want = self.affine.get(ctx.affinity_key)
        if want is None:
            return None, ""
        sound = [c for c in free if not self.risky(c)]
        pool = [c for c in cands if c.replica.ready]
        mean = sum(c.load for c in pool) / max(len(pool), 1)
        chosen = next((c for c in sound if c.key == want), None)
        if chosen is not None and chosen.load <= self.cfg.affinity_load_bound * mean + 1e-9 + 1.0 / chosen.limit:
            self._remember(ctx.affinity_key, chosen)
            return chosen, "prefix affinity"
        if len(sound) >= 2:
            a, b = self.rng.sample(sound, 2)
            chosen = min((a, b), key=lambda c: self.score(c, ctx, cands))
            self._remember(ctx.affinity_key, chosen)
            return chosen, "affine replica loaded or unavailable: power of two choices"
        return None, ""

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
