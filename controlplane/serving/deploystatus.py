"""The deployment controller's status of a deployment (controlplane/serving/deployments.py): its replica
counts and conditions as reconcile planned them, with the reasons an operator reads in `describe deployment`,
and the events of the conditions that turned."""

from __future__ import annotations

from controlplane.controllers.slices import now
from controlplane.serving import drainstatus
from controlplane.serving import reconcile as rc
from gpumesh.v1 import deployment_service_pb2 as D


def status_of(m, d: D.Deployment, plan: rc.Plan, replicas: list[D.Replica]) -> D.DeploymentStatus:
    """Deployment `d`'s status (of DeploymentManager `m`) with `plan`'s conditions over its `replicas`: counts,
    each condition's reason and message (a crash loop's replica, the drain's waits, the pool that holds replicas
    back) and transition time, and an event for each condition that turned."""
    st = D.DeploymentStatus()
    st.CopyFrom(d.status)
    st.replicas = sum(1 for r in replicas if r.state != D.REPLICA_STATE_TERMINATING)
    st.ready_replicas = sum(1 for r in replicas if r.state == D.REPLICA_STATE_READY)
    old = {c.type: c for c in d.status.conditions}
    del st.conditions[:]
    if "Draining" not in plan.conditions:
        m.drain_notes.pop(d.spec.name, None)
    for ctype, (status, reason, message) in plan.conditions.items():
        if ctype == "CrashLoop" and status:
            crashing = [r for r in replicas if r.restarts >= m.policy.crashloop_after]
            if crashing:
                message = f"replica {crashing[0].id} crashed {crashing[0].restarts} times: {crashing[0].message}"
            else:
                # the failure that makes it a crash loop is not recorded yet (its action runs next): the
                # condition (and its event) turn true once it is, with the replica's reason
                prev = old.get(ctype)
                status, reason, message = (prev.status, prev.reason, prev.message) if prev is not None \
                    else (False, "", "")
        if ctype == "Draining":
            reason, message = drainstatus.status(m, d.spec.name, replicas, reason, message)
        if ctype == "Available" and not status:
            # the pool is the limit (docs/pools.md): say so where `describe deployment` shows it
            held = next((r for r in replicas
                         if r.state == D.REPLICA_STATE_PENDING and "PoolExhausted" in r.message), None)
            if held is not None:
                why = held.message[held.message.index("PoolExhausted"):].split(";")[0]
                reason, message = "PoolExhausted", f"{message}; replica {held.id}: {why}"
        c = D.DeploymentCondition(type=ctype, status=status, reason=reason, message=message[:4000])
        prev = old.get(ctype)
        if prev is not None and prev.status == status:
            c.last_transition_at.CopyFrom(prev.last_transition_at)
        else:
            c.last_transition_at.CopyFrom(now())
            if ctype == "CrashLoop" and status:
                m._event(d.spec.name, "Warning", "CrashLoop", message[:500], d.spec.tenant)
            elif prev is not None:
                m._event(d.spec.name, "Normal", f"{ctype}{'True' if status else 'False'}",
                            f"{ctype} is now {str(bool(status)).lower()}: {reason}", d.spec.tenant)
        st.conditions.append(c)
    return st
