"""The deployment controller's Draining condition (controlplane/serving/deployments.py): which of a deployment's
replicas wait on drained nodes and for what, and the DrainWaiting event on those nodes."""

from __future__ import annotations

from controlplane.serving import reconcile as rc
from gpumesh.v1 import deployment_service_pb2 as D

STATE_NAMES = {D.REPLICA_STATE_PENDING: rc.PENDING, D.REPLICA_STATE_STARTING: rc.STARTING,
               D.REPLICA_STATE_READY: rc.READY, D.REPLICA_STATE_FAILED: rc.FAILED,
               D.REPLICA_STATE_TERMINATING: rc.TERMINATING}


def status(m, name: str, replicas: list[D.Replica], reason: str, message: str) -> tuple[str, str]:
    """The Draining condition's reason and message of deployment `name` (of DeploymentManager `m`): which
    replicas wait on drained nodes and for what (the replacements not READY yet, and why: no room, loading).
    A new "waiting" message is also recorded as an event on the drained node (`meshctl describe node`)."""
    drained = {r.node for r in replicas if r.node in m.ctl.fleet.nodes
               and m.ctl.fleet.nodes[r.node].record.draining}
    old = [r for r in replicas if r.node in drained and r.state != D.REPLICA_STATE_TERMINATING]
    new = [r for r in replicas if r.node not in drained and r.state != D.REPLICA_STATE_READY]
    if not old:
        return reason, message
    if any(r.state == D.REPLICA_STATE_PENDING and not r.slice_id and r.message.startswith("no slice yet")
           for r in new):
        reason = "NoRoomForReplacement"
    message = (f"replica {', '.join(r.id for r in old)} on drained node {', '.join(sorted(drained))} "
               f"stay{'s' if len(old) == 1 else ''} until replacements are READY")
    if new:
        message += "; waiting for " + "; ".join(
            f"{r.id} ({STATE_NAMES.get(r.state, 'pending')}" +
            (f": {r.message})" if r.state in (D.REPLICA_STATE_PENDING, D.REPLICA_STATE_FAILED) else ")")
            for r in new)
    telemetry = getattr(m.ctl, "telemetry", None)
    note = f"{reason}:{[(r.id, r.state) for r in old + new]}"
    if telemetry is not None and m.drain_notes.get(name) != note and new:
        # node events are read by every tenant's callers (GetNode): no deployment's names or messages in them
        for node in sorted(drained):
            here = sum(1 for r in old if r.node == node)
            telemetry.record(node, "Warning" if reason == "NoRoomForReplacement" else "Normal", "DrainWaiting",
                             f"{here} replica(s) of a deployment stay on this drained node until {len(new)} "
                             f"replacement(s) are READY" + (" (no room for a replacement)" if reason ==
                             "NoRoomForReplacement" else "") + ": its Draining condition says which")
    m.drain_notes[name] = note
    return reason, message
