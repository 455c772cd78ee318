"""How old a replica's load reading may be for the autoscaler (controlplane/controllers/autoscaler.py), and what it
decides while a replica's load is unknown (docs/autoscaling.md, "Stale and missing load").

A reading arrives with each telemetry report of the replica's node (the agent's scrape of the backend's /metrics,
every telemetry interval). One received more than `load_max_age` seconds ago is **stale**: the agent is cut off
from the control plane, or no longer reads that backend; it would otherwise count with its last value until the
replica is replaced (`deployment_node_lost_seconds`), or for good while the agent reports without it. A READY
replica with no reading of its current workload yet, or whose backend's /metrics did not answer, is **absent**.
Either way its load is unknown:

- the sample takes a stale one to carry the mean load of the replicas read (it was serving), and one not read
  (a new replica: its first reading comes within a telemetry interval) to carry none, so a burst's replicas just
  READY do not multiply it (autoscale_signals.sample); with no ready replica's load known, no sample is observed
  (zeros would read as idle: a scale to zero);
- no scale-down is made (nor a scale to zero) while any ready replica's load is unknown: the decision holds at
  the replicas there are (`mode: hold`, `bound_by: unknown_load`, the reason and the `load_unknown` and
  `load_stale` signals say so), though never above max_replicas or the cost ceiling; a scale-up the known load
  asks for goes on;
- a stale reading is a Warning event `LoadStale` on the deployment, once per episode.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from gpumesh.v1 import deployment_service_pb2 as D
from mesh.autoscale import Decision

DEFAULT_MAX_AGE_S = 15.0      # three telemetry intervals of an agent at its default 5 s


@dataclass(frozen=True)
class Gaps:
    """The READY replicas whose load is unknown now: `stale` (their latest reading arrived more than the max age
    ago) and `absent` (no reading of their current workload yet, or one whose backend's /metrics did not answer)."""
    stale: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()
    oldest_s: float = 0.0           # the age of the oldest stale reading
    unscraped: tuple[str, ...] = ()     # those of `absent` with a reading whose /metrics did not answer

    @property
    def missing(self) -> frozenset[str]:
        return frozenset(self.stale) | frozenset(self.absent)


def gaps(now: float, replicas: list[D.Replica], loads: dict, seen: dict, max_age: float) -> Gaps:
    """Which READY replicas' load is unknown at `now`. A reading's age counts from when the control plane received
    it (`seen`: replica id -> the time, DeploymentStore.set_load), not from the agent's stamp, so an agent's clock
    makes its readings look neither fresh nor stale; a reading held without a receipt time (none in the control
    plane, where set_load stamps each) is not judged. `max_age` <= 0: no age bound."""
    stale, absent, unscraped, oldest = [], [], [], 0.0
    for r in replicas:
        if r.state != D.REPLICA_STATE_READY:
            continue
        load = loads.get(r.id)
        if load is None or load.workload_id != r.workload_id:
            absent.append(r.id)
            continue
        at = seen.get(r.id)
        if max_age > 0 and at is not None and now - at > max_age:
            stale.append(r.id)
            oldest = max(oldest, now - at)
        elif not load.scraped:
            absent.append(r.id)
            unscraped.append(r.id)
    return Gaps(tuple(stale), tuple(absent), oldest, tuple(unscraped))


def hold(decision: Decision, gap: Gaps, *, ready: int, current: int, max_replicas: int,
         max_age: float) -> Decision:
    """`decision` with the replicas whose load is unknown said in its reason and signals, and no scale-down made on
    it: held at `current` (the replicas there are), but never above `max_replicas` or what the cost ceiling affords
    (the decision's `affordable` signal)."""
    if not gap.missing:
        return decision
    signals = dict(decision.signals)
    signals.update(load_unknown=float(len(gap.missing)), load_stale=float(len(gap.stale)))
    parts = []
    if gap.stale:
        parts.append(f"{len(gap.stale)} stale: no reading for over {max_age:g}s")
    if gap.absent:
        parts.append(f"{len(gap.absent)} not read: no reading yet or /metrics did not answer")
    note = f"the load of {len(gap.missing)} of {ready} ready replica(s) is unknown ({'; '.join(parts)})"
    cap = max_replicas
    if "affordable" in signals:
        cap = min(cap, int(signals["affordable"]))
    held = min(current, cap)
    reason = decision.reason.rstrip(".")
    if decision.desired < held:
        return dataclasses.replace(decision, desired=held, mode="hold", bound_by="unknown_load", signals=signals,
                                   reason=f"{reason}; held at {held}: {note}, and no scale-down is made on it.")
    how = (["a stale one taken at the mean load of those read"] if gap.stale else []) + \
        (["one not read counted as none"] if gap.absent else [])
    return dataclasses.replace(decision, signals=signals, reason=f"{reason}; {note}: {', '.join(how)}.")


def stale_message(gap: Gaps, max_age: float) -> str:
    """The `LoadStale` Warning's text."""
    shown = ", ".join(gap.stale[:5]) + (f" and {len(gap.stale) - 5} more" if len(gap.stale) > 5 else "")
    return (f"no load reading of replica(s) {shown} for {gap.oldest_s:.0f}s (more than {max_age:g}s): their load is "
            f"unknown, taken as the mean of the others', and no scale-down is made until they report again (is "
            f"their node's agent reaching the control plane, and scraping the backend?)")[:1000]
