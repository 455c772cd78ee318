"""The leader's last accounting in etcd (`keys.COST_ACCOUNTED`): the time up to which the cost accountant has
charged every live slice into its ledger.

Each control plane keeps its ledger in its own state dir, so a new leader on another host knows no cursor of the
slices that live on: it charged each from its creation, the time the old leader had charged a second time, and a
failback to the old host charged the other's time again from its own older cursors. A leader reads the mark
when it starts and charges no slice before it (`CostAccountant.floor`); it writes the mark after each
accounting its ledger has stored. The mark is one small fenced write per accounting; a mark that could not be
written leaves the next leader to charge again at most the accountings since the last one written.
"""

from __future__ import annotations

import json
import logging
import math

from controlplane.state import keys
from controlplane.state.txnops import Put
from mesh.logs import log

logger = logging.getLogger(__name__)
KEY = keys.COST_ACCOUNTED.encode()


async def read(store) -> float:
    """The mark (0: none, no etcd store, or unreadable: then every slice is charged from its cursor or creation)."""
    if store is None:
        return 0.0
    try:
        raw = await store.get(KEY)
    except Exception as e:   # noqa: BLE001 - etcd unreadable: charged as before, logged
        log(logger, logging.WARNING, "cost: the last accounting's mark is unreadable; slices with no cursor here are "
            "charged from their creation", error=repr(e))
        return 0.0
    if raw is None:
        return 0.0
    try:
        t = float(json.loads(raw)["t"])
    except (ValueError, TypeError, KeyError) as e:
        log(logger, logging.WARNING, "cost: the last accounting's mark is not {\"t\": seconds}; ignored",
            key=keys.COST_ACCOUNTED, error=repr(e))
        return 0.0
    return t if math.isfinite(t) and t > 0 else 0.0


async def write(writer, t: float) -> None:
    """Store the mark `t` (never raises: a mark not written is logged, and the next one catches up)."""
    if writer is None:
        return
    try:
        await writer.write([Put(KEY, json.dumps({"t": t}).encode())], [])
    except Exception as e:   # noqa: BLE001 - not the leader any more, etcd down
        log(logger, logging.WARNING, "cost: the last accounting's mark was not written", error=repr(e))
