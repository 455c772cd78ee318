"""What the deployment controller (controlplane/serving/deployments.py) observes of one replica for `reconcile`
(controlplane/serving/reconcile.py): its state, its slice and node (lost once the node stays NotReady for
`node_lost_seconds`, draining), its workload, its action in flight, its probes and restarts, and whether it runs
an outdated template or a server certificate about to end."""

from __future__ import annotations

import time

from controlplane.serving import reconcile as rc
from gpumesh.v1 import deployment_service_pb2 as D
from gpumesh.v1 import types_pb2 as W
from mesh import replicatls

STATE_NAMES = {D.REPLICA_STATE_PENDING: rc.PENDING, D.REPLICA_STATE_STARTING: rc.STARTING,
               D.REPLICA_STATE_READY: rc.READY, D.REPLICA_STATE_FAILED: rc.FAILED,
               D.REPLICA_STATE_TERMINATING: rc.TERMINATING}
ENDED = (W.WORKLOAD_STATE_SUCCEEDED, W.WORKLOAD_STATE_FAILED, W.WORKLOAD_STATE_STOPPED)


def _secs(t) -> float:
    return t.seconds + t.nanos / 1e9 if t.seconds or t.nanos else 0.0


def replica(m, r: D.Replica, template: str = "") -> rc.Observed:
    """Replica `r` as DeploymentManager `m` observes it now (`template`: the deployment's current one, "" when its
    model or variant is gone: nothing counts as outdated)."""
    s = m.ctl.fleet.slices.get(r.slice_id) if r.slice_id else None
    node_ready = True
    if r.slice_id:
        node = m.ctl.fleet.nodes.get(s.node) if s is not None else None
        # a slice gone (released by someone else): lost at once; on a NotReady node: lost once the node
        # stays NotReady for node_lost_seconds (an agent or control-plane restart is not a loss)
        if s is None or node is None:
            node_ready = False
        elif node.ready and s.state != W.SLICE_STATE_UNKNOWN:
            m.down_since.pop(s.node, None)
        else:
            since = m.down_since.setdefault(s.node, time.monotonic())
            node_ready = time.monotonic() - since < m.node_lost_seconds
    draining = False
    if r.slice_id:
        where = m.ctl.fleet.nodes.get(s.node if s is not None else r.node)
        draining = where is not None and where.record.draining
    w = m.workloads.workloads.get(r.workload_id) if r.workload_id else None
    if not r.workload_id:
        wstate = rc.W_NONE
    elif w is None or w.state in ENDED:
        wstate = rc.W_ENDED
    elif w.state == W.WORKLOAD_STATE_UNKNOWN:
        wstate = rc.W_UNKNOWN
    else:
        wstate = rc.W_RUNNING
    return rc.Observed(
        id=r.id, state=STATE_NAMES.get(r.state, rc.PENDING), has_slice=bool(r.slice_id),
        slice_ready=s is not None and s.state == W.SLICE_STATE_READY, workload=wstate, node_ready=node_ready,
        busy=r.id in m.busy, restarts=r.restarts, ready_since=_secs(r.ready_at),
        next_start=_secs(r.next_start_at), last_probe=m.last_probe.get(r.id, 0.0),
        created=_secs(r.created_at), outdated=bool(template and r.template and r.template != template)
        or replicatls.expiring(r.endpoint_certificate),     # rolled before its server's certificate ends
        draining=draining)
