"""Cost accounting arithmetic: what one slice costs over one interval, and in which category.

No I/O: the leader's accountant (controlplane/cost/accountant.py) gathers each slice's facts every interval,
asks `charge` for the interval since the slice's cursor (its creation the first time), and keeps the
charges in the ledger (controlplane/cost/ledger.py).

Categories, counted apart so an operator sees what idles:
- `busy`: a slice doing its job (a replica that served requests, any other tenant slice);
- `idle_warm`: a warm slice (labelled `WARM_LABEL`: carved ahead of demand by the orchestrator, not yet
  claimed);
- `idle_replica`: a READY replica's slice whose backend finished no request and had none running or waiting
  over the interval (`replica_activity`).
"""

from __future__ import annotations

from dataclasses import dataclass

BUSY, IDLE_WARM, IDLE_REPLICA = "busy", "idle_warm", "idle_replica"
CATEGORIES = (BUSY, IDLE_WARM, IDLE_REPLICA)
WARM_LABEL = "gpumesh.io/warm"       # "true" on warm slices: pre-carved by the orchestrator, no holder yet
GROUPS = ("tenant", "deployment", "model", "node", "slice")


def is_warm_labels(labels) -> bool:
    """A warm slice: the orchestrator's label (controlplane/controllers/warmslices.py), cleared on claim."""
    return labels.get(WARM_LABEL) == "true"


@dataclass(frozen=True)
class SliceFacts:
    """What the accounting needs of one slice (and the replica on it, if any)."""

    slice_id: str
    tenant: str
    node: str
    gpu_model: str
    share: float                 # of its GPU, mesh.cost.slice_share
    dollars_per_hour: float      # share × the GPU's price
    created: float               # epoch seconds
    deployment: str = ""
    model: str = ""
    warm: bool = False


@dataclass
class Charge:
    slice_id: str
    tenant: str
    deployment: str
    model: str
    node: str
    gpu_model: str
    category: str
    start: float
    end: float
    seconds: float
    gpu_seconds: float
    dollars: float
    tokens: float = 0.0

    def key(self, by: str) -> str:
        if by not in GROUPS:
            raise ValueError(f"by: {by!r} is not one of {', '.join(GROUPS)}")
        return getattr(self, "slice_id" if by == "slice" else by)


@dataclass(frozen=True)
class Activity:
    """A replica's backend counters at one reading (BackendLoad)."""

    requests_total: float
    tokens_total: float          # prompt + generated
    in_flight: float             # running + waiting now


def replica_activity(prev: Activity | None, now: Activity | None) -> tuple[bool, float]:
    """(idle, tokens) over the interval between two readings of a READY replica. Idle: no request finished
    and none in flight; tokens: the counters' increase (a counter that went down: the backend restarted, its
    new value is the increase). Without a reading now it is not judged idle (unknown is not idle); without
    one before, nothing is known of the interval yet either."""
    if now is None or prev is None:
        return False, 0.0
    done = now.requests_total - prev.requests_total if now.requests_total >= prev.requests_total else now.requests_total
    tokens = now.tokens_total - prev.tokens_total if now.tokens_total >= prev.tokens_total else now.tokens_total
    return (done <= 0 and now.in_flight <= 0 and prev.in_flight <= 0), max(0.0, tokens)


def charge(f: SliceFacts, cursor: float | None, now: float, idle_replica: bool = False,
           tokens: float = 0.0) -> Charge | None:
    """The slice's cost from its cursor (its creation when None; never before its creation) to `now`;
    None when that is no time at all."""
    start = f.created if cursor is None else max(cursor, f.created)
    if now <= start:
        return None
    seconds = now - start
    category = IDLE_WARM if f.warm else (IDLE_REPLICA if idle_replica else BUSY)
    return Charge(f.slice_id, f.tenant, f.deployment, f.model, f.node, f.gpu_model, category, start, now, seconds,
                  seconds * f.share, seconds * f.dollars_per_hour / 3600.0, tokens)


def per_1k_tokens(dollars: float, tokens: float) -> float:
    return dollars / tokens * 1000.0 if tokens > 0 else 0.0
