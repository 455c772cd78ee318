"""Admission: per-replica concurrency slots and a bounded per-model queue with priority classes.

A request asks for a slot on one of its model's replicas. The policy picks among those that are healthy
and have a free slot; when none does, the request waits in its model's queue (critical before standard
before sheddable, first come first served within a class) until a slot frees, the fleet changes (a GPU
cools down, a replica becomes ready, a circuit half-opens) or its deadline passes. A full queue or a
passed deadline raises `Rejected`; the caller answers 429 or falls back. A request whose deployments all left
the serving view while it waited (deleted; its `live` says so, `drop_gone` asks on every new view) raises
`Gone` at once, and a queue left empty is forgotten. With `shed_early`, a policy that
can estimate the wait (gpu-aware) has a request refused at once when its expected wait already exceeds
what its deadline allows; the request's deadline and its place in the queue are in its RouteContext, so
the policy can weigh a degraded replica against the wait."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from dataclasses import dataclass, field

from controlplane.gateway.config import PRIORITIES
from controlplane.gateway.policy import Candidate, Policy, RouteContext


class Rejected(Exception):
    def __init__(self, why: str, reason: str) -> None:
        super().__init__(why)
        self.reason = reason          # queue_full | deadline | gone


class Gone(Rejected):
    """None of the deployments the request was resolved to is in the serving view any more."""

    def __init__(self, why: str) -> None:
        super().__init__(why, "gone")


@dataclass(order=True)
class _Waiter:
    priority: int
    seq: int
    candidates: object = field(compare=False)        # () -> list[Candidate]
    ctx: RouteContext = field(compare=False)
    future: asyncio.Future = field(compare=False)
    enqueued: float = field(compare=False, default=0.0)
    live: object = field(compare=False, default=None)          # () -> bool: its deployments are still served


@dataclass
class Slot:
    """A held replica slot; `release` is idempotent (called on success, failure and client disconnect)."""
    candidate: Candidate
    why: str
    waited: float
    admission: "Admission"
    probe: int = 0              # the half-open probe this slot took (CircuitBreaker.begin), 0 when none
    released: bool = False

    def release(self) -> None:
        """Free the slot, and the probe it took if no verdict (ok/failed) was given on it: a request that ends
        without one (a benchmark, a client gone) must not leave the circuit half-open and probing for good."""
        if not self.released:
            self.released = True
            self.admission._free(self.candidate, self.probe)


def _granted(w: _Waiter) -> bool:
    """The waiter's future holds a slot (not cancelled, not answered Gone)."""
    return w.future.done() and not w.future.cancelled() and w.future.exception() is None


class Admission:
    def __init__(self, policy: Policy, queue_size: int, shed_early: bool = False) -> None:
        self.policy = policy
        self.queue_size = queue_size
        self.shed_early = shed_early
        self.queues: dict[str, list[_Waiter]] = {}
        self._seq = itertools.count()

    def depth(self, model: str) -> int:
        return len(self.queues.get(model, ()))

    def _take(self, c: Candidate) -> int:
        """Take a slot on `c`; the half-open probe it took (0: none)."""
        c.stats.in_flight += 1
        c.stats.starts.append(time.monotonic())
        c.stats.requests += 1
        return c.stats.breaker.begin() if self.policy.uses_breaker else 0

    def _free(self, c: Candidate, probe: int = 0, newest: bool = False) -> None:
        c.stats.in_flight = max(0, c.stats.in_flight - 1)
        if c.stats.starts:
            if newest:
                c.stats.starts.pop()          # a grant given back unused: its own start
            else:
                c.stats.starts.popleft()      # the oldest (exact for one slot; for several, close enough)
        if probe:
            c.stats.breaker.release(probe)
        self.kick()

    async def acquire(self, candidates, ctx: RouteContext, priority: str, timeout: float,
                      first_in_class: bool = False, live=None) -> Slot:
        """A slot on a replica of ctx.model; waits up to `timeout` seconds; Rejected when the queue is full or
        the wait ran out. `first_in_class`: the request goes before every waiting request of its priority
        class (a retry, or a broken stream's continuation: it was admitted before any of them). `live`
        (() -> bool): whether the request's deployments are still served; Gone when they are not (now, or
        at a `drop_gone` while it waits)."""
        start = time.monotonic()
        if live is not None and not live():
            raise Gone(f"no deployment serves {ctx.model} any more")
        q = self.queues.get(ctx.model, [])
        prio = PRIORITIES.index(priority)
        ctx.deadline_at = start + max(timeout, 0.0)
        ctx.ahead = sum(1 for w in q if (w.priority < prio if first_in_class else w.priority <= prio))
        ctx.behind = len(q) - ctx.ahead
        if not ctx.ahead:
            c, why = self.policy.pick(candidates(), ctx)
            if c is not None:
                return Slot(c, why, 0.0, self, self._take(c))
        if len(q) >= self.queue_size:
            raise Rejected(f"the queue of {ctx.model} is full ({self.queue_size} waiting)", "queue_full")
        if timeout <= 0:
            raise Rejected(f"no replica of {ctx.model} is free and the request's deadline allows no wait", "deadline")
        if self.shed_early:
            wait = self.policy.expected_wait(candidates(), ctx)
            if wait is not None and math.isfinite(wait) and wait > timeout:
                raise Rejected(f"no replica of {ctx.model} can take the request within its deadline (expected wait "
                               f"{wait:.1f}s, {timeout:.1f}s allowed)", "deadline")
        seq = next(self._seq)
        w = _Waiter(prio, seq - (1 << 62) if first_in_class else seq, candidates, ctx,
                    asyncio.get_running_loop().create_future(), start, live)
        self.queues[ctx.model] = q
        heapq.heappush(q, w)
        self._past_head(q)              # a replica the waiters ahead excluded may be free for this one now
        try:
            c, why, probe = await asyncio.wait_for(asyncio.shield(w.future), timeout)
        except asyncio.TimeoutError:
            self._drop(ctx.model, w)
            if _granted(w):                                          # granted at the last moment: give it back
                c, _, probe = w.future.result()
                self._free(c, probe, newest=True)
            raise Rejected(f"no replica of {ctx.model} became free within {timeout:.1f}s", "deadline") from None
        except asyncio.CancelledError:                               # the client went away while waiting
            self._drop(ctx.model, w)
            if _granted(w):
                c, _, probe = w.future.result()
                self._free(c, probe, newest=True)
            raise
        return Slot(c, why, time.monotonic() - start, self, probe)

    def _drop(self, model: str, w: _Waiter) -> None:
        q = self.queues.get(model, [])
        if w in q:
            q.remove(w)
            heapq.heapify(q)
        if not q:
            self.queues.pop(model, None)
        if not w.future.done():
            w.future.cancel()

    def drop_gone(self) -> set[str]:
        """Answer at once (Gone) the waiters whose deployments left the serving view, and forget the queues that
        are left empty (after a new view); the queues (models) that lost waiters."""
        changed = set()
        for model, q in list(self.queues.items()):
            gone = [w for w in q if not w.future.done() and w.live is not None and not w.live()]
            for w in gone:
                w.future.set_exception(Gone(f"no deployment serves {model} any more: deleted while the request "
                                            "waited"))
            if gone:
                q[:] = [w for w in q if w not in gone]
                heapq.heapify(q)
                changed.add(model)
            if not q:
                del self.queues[model]
        return changed

    def kick(self) -> None:
        """Hand free slots to waiters, best priority first (after a release or a change of the fleet)."""
        for model, q in list(self.queues.items()):
            while q:
                w = q[0]
                if w.future.done():
                    heapq.heappop(q)
                    continue
                w.ctx.ahead, w.ctx.behind = 0, len(q) - 1
                c, why = self.policy.pick(w.candidates(), w.ctx)
                if c is None:
                    break
                heapq.heappop(q)
                w.future.set_result((c, why, self._take(c)))
            self._past_head(q)
            if not q:
                del self.queues[model]         # the queue of a model nothing waits for (gone, or idle)

    def _past_head(self, q: list[_Waiter]) -> None:
        """The head of the queue waits; a free replica that it (and every waiter before the next one) excluded
        (a retry's or a broken stream's continuation's failed replica) would stay idle behind it for nothing:
        a waiter further back takes it when its own pick is that replica. Priority holds for everything else."""
        if not q or q[0].future.done() or not q[0].ctx.exclude:
            return                                      # the common case: nothing to look past
        excluded = None
        for i, w in enumerate(sorted(q)):
            if w.future.done():
                continue
            if excluded is None:
                excluded = set(w.ctx.exclude)           # the head: it could not be served
            elif excluded:
                cands = w.candidates()
                if not any(x.key in excluded and x.free for x in cands):
                    return                              # none of them is free: nothing to hand past the head
                w.ctx.ahead, w.ctx.behind = i, len(q) - i - 1
                c, why = self.policy.pick(cands, w.ctx)
                if c is not None and c.key in excluded:
                    q.remove(w)
                    heapq.heapify(q)
                    w.future.set_result((c, why, self._take(c)))
                    continue
                excluded &= set(w.ctx.exclude)          # those behind it go after it for the others
            if not excluded:
                return
