"""The workload record across a migration: what the target is started from, and what the record is at the commit.

A migration moves a workload, it does not make a new one: everything in its record that is still true after the
move is carried over, field for field (a `CopyFrom`, so a field added to `Workload` later is carried too), and only
what belongs to the source's process or placement changes:

| field | START_TARGET spec (`target_spec`) | record at the commit (`committed_record`) |
| --- | --- | --- |
| id | the workload's (a same-node target: its alias until the hand-over) | the workload's |
| node, slice_id | the target's | the target's (a resize: the client's slice ID) |
| tenant, command, env, labels, created_at | kept (restore variables of an earlier restore dropped) | kept |
| backend (kind, artifact, served_name, context, ..., api_key, artifact_sha256) | kept (a hand-started vLLM's share: the target slice's, set by the caller: backendshare.py `moved`) | as the spec |
| endpoint | kept (a transparent target listens where the source did) | transparent: kept; else "" until reported |
| endpoint_certificate | kept (CRIU restores the server with its TLS key in memory) | as endpoint: kept; else cleared |
| state | PENDING | RUNNING |
| pid | 0 | kept when transparent (CRIU restores the same PID); else 0 until the target agent reports it |
| exit_code, finished_at | cleared | cleared |
| started_at, message | cleared (the target agent sets them) | kept / "migrated from ..." |

The replica key (`backend.api_key`) goes only to the target agent, in its command on the agents' stream, as it went to
the source's at Run; the API still redacts it (controlplane/serving/replicakeys.py `redacted`). A deployment's
`Replica` record follows its workload once the migration is over (controlplane/serving/replicamove.py).
"""

from __future__ import annotations

from controlplane.controllers.migration_phases import RESTORE_ENV, W
from gpumesh.v1 import migration_service_pb2 as M
from gpumesh.v1 import types_pb2
from mesh import errors
from mesh.checkpoint.transfer_auth import SECRET_FILE_ENV


def target_spec(w: types_pb2.Workload, wid: str, slice_id: str, node: str) -> types_pb2.Workload:
    """`w` as the target agent starts it under `wid` on `node`'s `slice_id` (see the module's table)."""
    t = types_pb2.Workload()
    t.CopyFrom(w)
    t.id, t.slice_id, t.node, t.state = wid, slice_id, node, W.WORKLOAD_STATE_PENDING
    t.pid, t.exit_code = 0, 0
    for f in ("started_at", "finished_at", "message"):
        t.ClearField(f)
    for k in (*RESTORE_ENV, SECRET_FILE_ENV):      # an earlier receiving target's, never this one's
        t.env.pop(k, None)
    return t


def committed_record(w: types_pb2.Workload, m: M.Migration, step: int) -> types_pb2.Workload:
    """The workload's record written in the commit's transaction (see the module's table)."""
    n = types_pb2.Workload()
    n.CopyFrom(w)
    n.node, n.slice_id, n.state, n.exit_code = (m.target_node, m.resize_slice or m.target_slice,
                                                 W.WORKLOAD_STATE_RUNNING, 0)
    n.message = (f"restored from checkpoint {m.checkpoint_id} at step {step}" if m.checkpoint_id
                 else f"migrated from {m.source_node} at step {step} ({m.id})")
    n.ClearField("finished_at")
    if m.mode != M.MIGRATION_MODE_TRANSPARENT:
        # a process started anew on the target: its pid, and a model server's port, are the target agent's to report
        n.pid = 0
        if n.HasField("backend"):
            n.endpoint = ""
            n.ClearField("endpoint_certificate")     # the target's server gets its own
    return n


def check_workload_id(wid: str) -> None:
    """The request's `workload_id` (the workload manager's own check names its `id` field instead)."""
    from controlplane.controllers.workloadspec import _check_id
    _check_id(wid, "workload_id", "a workload ID (w-...)")


def check_mode(w: types_pb2.Workload, mode: int) -> None:
    """A model server (a workload with a `backend`) does not speak the checkpoint SDK, so only a transparent
    migration (CRIU) can move it: any other mode is refused up front (it could only time out and roll back)."""
    if w.HasField("backend") and mode != M.MIGRATION_MODE_TRANSPARENT:
        raise errors.FailedPrecondition(
            f"workload {w.id} is a model server (backend {w.backend.kind}), which does not use the checkpoint SDK: "
            f"migrate it with mode transparent (CRIU), or let its deployment replace it")
