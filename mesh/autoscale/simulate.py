"""A discrete-event simulation of one deployment under an autoscaling policy (the calibrated mode of
`meshctl bench autoscale`): arrivals go to a gateway queue, replicas with ``slots`` each serve them with the
calibrated latency model, and a scaler decides the replica count every ``tick_s`` from what it observed.

Accounting (what ``SimResult`` counts):

- a replica's slice is paid from the decision that started it until it is removed (cold start included);
- a request's TTFT = its wait in the queue + the model's TTFT on a free slot; it met the SLO when TTFT <= SLO;
- a cold-start miss is a request that found no free slot on a ready replica when it arrived and was then
  served by a replica that became ready after it arrived (it waited for a cold start);
- a scale event is a tick where the replica count the scaler set changed.

Scale-down removes starting replicas first, then idle ready ones, then busy ones, which drain (take no new
requests, leave when their requests finish). A scale-up first takes back draining replicas.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from mesh.autoscale.latency import LatencyModel
from mesh.autoscale.types import Sample

_ARRIVE, _DONE, _READY, _TICK = 1, 0, 2, 3        # at equal times: completions first, then arrivals, ready, tick


class Scaler(Protocol):
    def scale(self, now: float, sample: Sample, *, ready: int, starting: int) -> int: ...


@dataclass
class _Replica:
    id: int
    created: float
    ready_at: float
    busy: int = 0
    draining: bool = False
    removed: float | None = None


@dataclass
class SimResult:
    requests: int = 0
    met_slo: int = 0
    ttft_s: list[float] = field(default_factory=list)
    slice_seconds: float = 0.0
    cold_start_misses: int = 0
    scale_events: int = 0
    end_s: float = 0.0
    max_replicas: int = 0
    timeline: list[tuple[float, int]] = field(default_factory=list)   # (t, replicas set) at each change

    @property
    def slo_attainment(self) -> float:
        return self.met_slo / self.requests if self.requests else 1.0

    @property
    def slice_hours(self) -> float:
        return self.slice_seconds / 3600.0


def simulate(arrival_times: np.ndarray, model: LatencyModel, scaler: Scaler, *, slo_ttft_s: float,
             end_s: float, tick_s: float = 2.0, initial_replicas: int = 0, warm_start: bool = False,
             on_tick=None) -> SimResult:
    """Run the arrivals (ascending bench seconds) through replicas the scaler sets; ticks until ``end_s``
    and then until every request is served."""
    res = SimResult()
    ttft_free = model.ttft_s()
    service = model.service_s()
    cold = model.cold_start_s
    replicas: dict[int, _Replica] = {}
    next_id = [0]
    queue: deque[float] = deque()
    events: list = []
    seq = [0]

    def push(t: float, kind: int, payload: int = 0) -> None:
        seq[0] += 1
        heapq.heappush(events, (t, kind, seq[0], payload))

    def add_replica(now: float, warm: bool = False) -> None:
        r = _Replica(next_id[0], now, now if warm else now + cold)
        next_id[0] += 1
        replicas[r.id] = r
        if warm:
            return
        push(r.ready_at, _READY, r.id)

    for _ in range(initial_replicas):
        add_replica(0.0, warm=warm_start)

    # time-weighted in-flight and queue over the tick, arrivals and TTFTs in it
    acc = {"last": 0.0, "inflight": 0.0, "queue": 0.0, "arrived": 0, "ttft_sum": 0.0, "ttft_n": 0}
    inflight = [0]

    def account(now: float) -> None:
        dt = now - acc["last"]
        if dt > 0:
            acc["inflight"] += inflight[0] * dt
            acc["queue"] += len(queue) * dt
            acc["last"] = now

    def start(now: float, r: _Replica, arrived: float) -> None:
        r.busy += 1
        inflight[0] += 1
        ttft = now - arrived + ttft_free
        res.ttft_s.append(ttft)
        res.requests += 1
        if ttft <= slo_ttft_s + 1e-9:
            res.met_slo += 1
        acc["ttft_sum"] += ttft
        acc["ttft_n"] += 1
        if r.ready_at > arrived + 1e-12 and arrived in missed:
            res.cold_start_misses += 1
        push(now + service, _DONE, r.id)

    missed: set[float] = set()       # arrival times that found no free slot (exact floats from the array)

    def free_replica(now: float) -> _Replica | None:
        best = None
        for r in replicas.values():
            if r.removed is None and not r.draining and r.ready_at <= now and r.busy < model.slots:
                if best is None or r.busy < best.busy:
                    best = r
        return best

    def drain_queue(now: float, r: _Replica) -> None:
        while queue and r.removed is None and not r.draining and r.ready_at <= now and r.busy < model.slots:
            start(now, r, queue.popleft())

    def remove(now: float, r: _Replica) -> None:
        r.removed = now
        res.slice_seconds += now - r.created
        del replicas[r.id]

    def set_replicas(now: float, want: int) -> None:
        live = [r for r in replicas.values() if not r.draining]
        if want > len(live):
            for r in sorted((r for r in replicas.values() if r.draining), key=lambda r: -r.busy):
                if len(live) >= want:
                    break
                r.draining = False
                live.append(r)
                drain_queue(now, r)
            while len(live) < want:
                add_replica(now)
                live.append(replicas[next_id[0] - 1])
        elif want < len(live):
            # starting (newest first), then idle ready, then the least busy ready ones drain
            order = sorted(live, key=lambda r: (r.ready_at <= now, r.busy, -r.created))
            for r in order[: len(live) - want]:
                if r.ready_at > now or r.busy == 0:
                    remove(now, r)
                else:
                    r.draining = True

    arr = np.asarray(arrival_times, dtype=float)
    ai = 0
    n_arr = len(arr)
    current = initial_replicas
    res.timeline.append((0.0, current))
    push(tick_s, _TICK)
    while events or ai < n_arr:
        if ai < n_arr and (not events or arr[ai] <= events[0][0]):
            now = float(arr[ai])
            ai += 1
            account(now)
            acc["arrived"] += 1
            r = free_replica(now)
            if r is not None:
                start(now, r, now)
            else:
                missed.add(now)
                queue.append(now)
            continue
        now, kind, _, payload = heapq.heappop(events)
        account(now)
        if kind == _DONE:
            inflight[0] -= 1
            r = replicas.get(payload)
            if r is None:
                continue
            r.busy -= 1
            if r.draining and r.busy == 0:
                remove(now, r)
            else:
                drain_queue(now, r)
        elif kind == _READY:
            r = replicas.get(payload)
            if r is not None:
                drain_queue(now, r)
        else:
            ready = sum(1 for r in replicas.values() if not r.draining and r.ready_at <= now)
            starting = sum(1 for r in replicas.values() if not r.draining and r.ready_at > now)
            sample = Sample(t=now, in_flight=acc["inflight"] / tick_s, queue=acc["queue"] / tick_s,
                            request_rate=acc["arrived"] / tick_s,
                            ttft_ms=1000 * acc["ttft_sum"] / acc["ttft_n"] if acc["ttft_n"] else 0.0, ready=ready)
            acc.update(inflight=0.0, queue=0.0, arrived=0, ttft_sum=0.0, ttft_n=0)
            want = max(0, int(scaler.scale(now, sample, ready=ready, starting=starting)))
            if want != ready + starting:
                set_replicas(now, want)
            if want != current:
                res.scale_events += 1
                res.timeline.append((now, want))
                current = want
            res.max_replicas = max(res.max_replicas, len(replicas))
            if on_tick is not None:
                on_tick(now)
            if now + tick_s <= end_s + 1e-9 or queue or inflight[0] or ai < n_arr:
                push(now + tick_s, _TICK)
    res.end_s = max(end_s, acc["last"])
    for r in list(replicas.values()):
        remove(res.end_s, r)
    return res


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    xs = sorted(values)
    return xs[max(0, math.ceil(q / 100 * len(xs)) - 1)]
