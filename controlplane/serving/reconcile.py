"""The deployment controller's decision: a pure function of (desired, observed, now) -> actions.

Level-triggered: the controller calls `reconcile` for each deployment on every pass (and on every
change), with what it wants (`Desired`) and what it sees of each replica (`Observed`), and carries out
the actions it returns (controlplane/serving/actuator.py). Nothing here does I/O or reads a clock, so
each rule is a row of a table test (tests/unit/test_deploy_reconcile.py).

The rules, in order, per replica:

- busy (an action of the controller is still running on it): leave it;
- terminating: `Remove` it (stop the backend, release the slice, drop the record);
- its node is NotReady (lost): `Remove` it, and count it as missing (a replacement is created in the
  same pass, on another node while the lost one stays NotReady);
- pending without a slice, or with a slice but no backend running: `Advance` it (allocate / run);
- its backend ended (crash): FAILED with a backoff of `backoff_base * 2**(restarts-1)` capped at
  `backoff_max`; `Restart` once `next_start` has passed;
- starting: `Probe` it (its /v1/models and a one-token completion);
- ready: `Probe` it every `probe_interval` seconds (a hung server turns it back to STARTING).

Then the count: fewer live replicas than wanted -> `Create` the difference; more -> `Remove` the
surplus, the least useful first (failed, then pending, starting, and the newest ready ones last).
Replicas started with other settings than the deployment's now (`outdated`: an update of the backend
settings, a rollout restart, a server's TLS certificate that ends within a week: mesh/replicatls.py) are
rolled one at a time, surge first (`_roll`). Replicas on a node being
drained (`draining`) are replaced surge first too (`_drain`): a replacement is created for each (the
drained node is cordoned, so it lands elsewhere), and a draining replica is removed once enough
replacements are READY that the ready count stays at what is wanted (one that is not READY goes at once).
When no replacement can be placed, the draining replicas stay and the `Draining` condition says why.

Conditions: Available (ready >= wanted), Progressing (count or readiness not yet as wanted),
CrashLoop (some replica has crashed `crashloop_after` times without staying ready for `stable_seconds`)
and Draining (present while replicas on a drained node wait for their replacements; the controller
fills in why).
"""

from __future__ import annotations

from dataclasses import dataclass, field

PENDING, STARTING, READY, FAILED, TERMINATING = "pending", "starting", "ready", "failed", "terminating"
# What the workload runner says of the replica's backend process.
W_NONE, W_RUNNING, W_ENDED, W_UNKNOWN = "none", "running", "ended", "unknown"


@dataclass(frozen=True)
class Policy:
    """Tunables of the controller (controlplane/config.py carries them)."""

    backoff_base: float = 2.0       # seconds before the first restart of a crashed backend
    backoff_max: float = 60.0       # the backoff's cap
    crashloop_after: int = 3        # crashes (without a stable period) that raise CrashLoop
    stable_seconds: float = 60.0    # ready this long: the crash count starts over
    probe_interval: float = 10.0    # seconds between readiness probes of a READY replica


@dataclass(frozen=True)
class Desired:
    replicas: int
    deleting: bool = False          # the deployment is being deleted: remove every replica


@dataclass(frozen=True)
class Observed:
    id: str
    state: str                       # PENDING .. TERMINATING (the stored replica state)
    has_slice: bool = False
    slice_ready: bool = False
    workload: str = W_NONE           # W_*: the backend process as the runner reports it
    node_ready: bool = True
    busy: bool = False               # an action on it is in flight
    restarts: int = 0
    ready_since: float = 0.0         # when it turned READY (0: not ready)
    next_start: float = 0.0          # FAILED: not before this time
    last_probe: float = 0.0
    created: float = 0.0
    outdated: bool = False           # started with other settings than the deployment's now (roll it)
    draining: bool = False           # its node is being drained: replace it elsewhere first, then remove it


@dataclass(frozen=True)
class Action:
    kind: str                        # create | advance | probe | restart | fail | remove | reset
    replica: str = ""
    reason: str = ""
    next_start: float = 0.0          # fail: when it may start again
    count: int = 0                   # create: how many


@dataclass
class Plan:
    actions: list[Action] = field(default_factory=list)
    conditions: dict[str, tuple[bool, str, str]] = field(default_factory=dict)   # type -> (status, reason, message)

    def kinds(self) -> list[tuple[str, str]]:
        return [(a.kind, a.replica) for a in self.actions]


def backoff(restarts: int, policy: Policy) -> float:
    """Seconds to wait before restart number `restarts` (1 for the first crash)."""
    return min(policy.backoff_max, policy.backoff_base * 2 ** max(0, restarts - 1))


def _removal_order(r: Observed) -> tuple:
    rank = {FAILED: 0, PENDING: 1, STARTING: 2, READY: 3}.get(r.state, 0)
    return (rank, -r.created)


def reconcile(desired: Desired, observed: list[Observed], now: float, policy: Policy = Policy()) -> Plan:
    plan = Plan()
    act = plan.actions.append
    live: list[Observed] = []
    crashlooping: list[Observed] = []
    for r in observed:
        if r.busy:
            if r.state != TERMINATING:
                live.append(r)
            continue
        if r.state == TERMINATING or desired.deleting:
            act(Action("remove", r.id, "deployment deleted" if desired.deleting else "terminating"))
            continue
        if not r.node_ready and r.has_slice:
            act(Action("remove", r.id, "node lost"))
            continue
        live.append(r)
        if r.restarts >= policy.crashloop_after:
            crashlooping.append(r)
        if r.workload == W_ENDED and r.state != FAILED:
            n = r.restarts + 1
            act(Action("fail", r.id, "backend ended", next_start=now + backoff(n, policy)))
            if n >= policy.crashloop_after and r not in crashlooping:
                crashlooping.append(r)
            continue
        if r.state == FAILED:
            if now >= r.next_start:
                act(Action("restart", r.id, "backoff over"))
            continue
        if r.state == PENDING or (r.has_slice and r.slice_ready and r.workload == W_NONE):
            act(Action("advance", r.id))
            continue
        if r.workload == W_UNKNOWN:
            continue                        # its node's agent has not reported yet: wait
        if r.state == STARTING:
            act(Action("probe", r.id))
        elif r.state == READY:
            if r.restarts and r.ready_since and now - r.ready_since >= policy.stable_seconds:
                act(Action("reset", r.id, "stable"))
            if now - r.last_probe >= policy.probe_interval:
                act(Action("probe", r.id))
    want = 0 if desired.deleting else desired.replicas
    removing = {a.replica for a in plan.actions if a.kind == "remove"}
    draining = [r for r in live if r.draining]
    if draining:
        _drain(plan, live, want, removing)
    elif len(live) < want:
        act(Action("create", count=want - len(live), reason=f"{len(live)} of {want} replicas"))
    elif want and any(r.outdated for r in live):
        _roll(plan, live, want, removing)
    elif len(live) > want:
        surplus = sorted((r for r in live if not r.busy), key=_removal_order)[:len(live) - want]
        removing = {r.id for r in surplus}
        plan.actions = [a for a in plan.actions if a.replica not in removing]
        act = plan.actions.append
        for r in surplus:
            act(Action("remove", r.id, f"scale down to {want}"))
    ready = sum(1 for r in live if r.state == READY)
    rolling = any(r.outdated for r in live)
    plan.conditions["Available"] = (
        (True, "MinimumReplicasAvailable", f"{ready} of {want} replicas ready") if ready >= want else
        (False, "MinimumReplicasUnavailable", f"{ready} of {want} replicas ready"))
    progressing = len(live) != want or ready < want or rolling or bool(draining) or \
        any(a.kind in ("create", "remove") for a in plan.actions)
    plan.conditions["Progressing"] = (
        (True, "ReplicaSetUpdating", f"{len(live)} replicas, {ready} ready, {want} wanted") if progressing else
        (False, "NewReplicaSetAvailable", f"{want} replicas ready"))
    if draining:
        ids = ", ".join(r.id for r in draining)
        plan.conditions["Draining"] = (True, "WaitingForReplacements",
                                       f"replica {ids} on a drained node: removed once replacements are ready")
    if crashlooping:
        ids = ", ".join(r.id for r in crashlooping)
        plan.conditions["CrashLoop"] = (True, "BackOff", f"replica {ids} keeps crashing")
    else:
        plan.conditions["CrashLoop"] = (False, "", "")
    return plan


def _roll(plan: Plan, live: list[Observed], want: int, removing: set[str]) -> None:
    """A rolling update (some replicas run old settings), one replica at a time, surge first: while
    every up-to-date replica is READY and there are `want` replicas, create one more; with more than
    `want`, remove an outdated one: a not-ready one at once, a READY one only once every up-to-date
    replica is READY (so the ready count never drops below where it was)."""
    current_unready = any(not r.outdated and r.state != READY for r in live)
    busy = any(r.busy for r in live)
    if len(live) == want:
        if not current_unready and not busy:
            plan.actions.append(Action("create", count=1, reason="rolling update: surge"))
        return
    old = sorted((r for r in live if r.outdated and not r.busy and r.id not in removing),
                 key=lambda r: (r.state == READY, r.created))
    if old and (old[0].state != READY or not current_unready):
        plan.actions = [a for a in plan.actions if a.replica != old[0].id]
        plan.actions.append(Action("remove", old[0].id, "rolling update: replaced"))


def _drain(plan: Plan, live: list[Observed], want: int, removing: set[str]) -> None:
    """Replicas on a drained node, surge first: create a replacement for each (up to `want` replicas off
    the drained nodes), then remove the draining ones: a not-ready one at once, a READY one only while the
    READY replicas left stay at least `want` (so a drain never takes the deployment below its ready count;
    with no room for replacements the draining replicas keep serving)."""
    staying = [r for r in live if not r.draining]
    if len(staying) < want:
        plan.actions.append(Action("create", count=want - len(staying),
                                   reason=f"replacing {len(live) - len(staying)} replica(s) of a drained node"))
    ready = sum(1 for r in live if r.state == READY and r.id not in removing)
    spare = ready - want
    for r in sorted((r for r in live if r.draining and not r.busy and r.id not in removing),
                    key=lambda r: (r.state == READY, r.created)):
        if r.state == READY:
            if spare <= 0:
                continue
            spare -= 1
        plan.actions = [a for a in plan.actions if a.replica != r.id]
        plan.actions.append(Action("remove", r.id, "node drained: replaced elsewhere"))
