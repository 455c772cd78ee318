"""A slice that replaces another: how a move counts against a pool's and a tenant's quota.

A migration, a drain's moves and a resize by migration allocate their target slice while the source still exists,
and so does a drain's replacement for a deployment's replica. The target carries the label `REPLACES` (the source's
slice ID, set by gpumesh only: slicespec.SYSTEM_LABELS) and is a reservation for the same workload: while its move
is live (the control plane's migration manager says so, controlplane/controllers/migration_quota.py; for a drain's
replacement replica, the records do: controlplane/state/drainpairs.py) the pair counts once, at the larger of the
two in each figure. So a move to an equal slice always fits a pool or a tenant at its limit, a resize's growth
must still fit, and no room opens for anything else meanwhile. A pair whose move is over counts as the two slices
it is.

No I/O and no control-plane imports: the fleet (`Fleet.replaced`, `Fleet.tenant_usage`), mesh/pools.py `usage`
and the scheduler's Pool and TenantQuota plugins use these.
"""

from __future__ import annotations

REPLACES = "gpumesh.replaces"


def source_id(labels) -> str:
    """The slice the holder of `labels` (a slice, a request) replaces, or ""."""
    return labels.get(REPLACES, "")


def overlap(a: tuple, b: tuple) -> tuple:
    """What a pair with figures `a` and `b` (each a tuple of the same quantities) counts twice: the smaller of each."""
    return tuple(min(x, y) for x, y in zip(a, b))


def beyond(more: tuple, held: tuple) -> tuple:
    """What a request for `more` asks on top of the source slice it replaces (`held`): the growth only, never less
    than nothing."""
    return tuple(max(type(x)(0), x - y) for x, y in zip(more, held))
