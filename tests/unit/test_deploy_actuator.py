"""The deployment controller's actuator (controlplane/serving/actuator.py): what it writes into a replica's
record when a replica waits for room or its backend crashed."""

from __future__ import annotations

import pytest

from gpumesh.v1 import types_pb2 as t
from mesh import errors


async def test_a_replica_waiting_for_room_is_written_when_its_reason_changes_only():
    """A replica no slice fits is retried every few seconds (each failed action kicks the next pass after the
    backoff); each try wrote the same record to etcd again, for as long as the fleet stayed full."""
    from types import SimpleNamespace

    from controlplane.serving.actuator import Actuator
    from gpumesh.v1 import deployment_service_pb2 as D

    why = ["no GPU has 2 GiB free"]

    async def allocate(req, **kw):
        raise errors.ResourceExhausted(why[0])
    ctl = SimpleNamespace(allocate=allocate, recorder=None)
    saved = []

    async def put_replica(r):
        saved.append(r)
    act = Actuator(ctl, None, SimpleNamespace(put_replica=put_replica))
    spec = D.DeploymentSpec(name="chat", tenant="acme", model="smol")
    r = D.Replica(id="r-1", deployment="chat", message="waiting for a slice")
    for _ in range(3):
        with pytest.raises(errors.ResourceExhausted):
            await act.allocate(saved[-1] if saved else r, spec, 2 << 30)
    assert len(saved) == 1 and saved[0].message == "no slice yet: no GPU has 2 GiB free"
    why[0] = "no GPU has 2 GiB free (3 draining)"
    with pytest.raises(errors.ResourceExhausted):
        await act.allocate(saved[-1], spec, 2 << 30)
    assert len(saved) == 2


async def test_a_crashed_backends_log_tail_in_the_replica_is_bounded():
    """The last lines of a crashed server's log went into the replica's record whole: lines are of any length
    (a megabyte-long line made a record etcd refuses, failing the group commit it rode in)."""
    from types import SimpleNamespace

    from controlplane.serving import actuator
    from gpumesh.v1 import deployment_service_pb2 as D

    async def logs(wid, lines, follow):
        yield SimpleNamespace(data=b"x" * 3_000_000 + b"\nCUDA error: out of memory\n")
    workloads = SimpleNamespace(workloads={"w-1": t.Workload(id="w-1", message="exit code 1")}, logs=logs)
    saved = []

    async def put_replica(r):
        saved.append(r)
    act = actuator.Actuator(None, workloads, SimpleNamespace(put_replica=put_replica))
    n = await act.failed(D.Replica(id="r-1", deployment="chat", workload_id="w-1"), 0.0)
    assert len(n.message) < actuator.LOG_CHARS + 200 and n.message.endswith("CUDA error: out of memory")
    assert saved == [n]


async def test_a_restart_whose_backend_does_not_start_backs_off():
    """A FAILED replica restarted (its backoff over) whose new backend failed at once stayed FAILED with the old
    backoff's time, so the next pass restarted it again at once: a new workload every pass, no backoff, its
    restarts never counted (no CrashLoop). It now goes through the crash rule: restarts + 1 and a backoff."""
    from types import SimpleNamespace

    from controlplane.serving import reconcile as rc
    from controlplane.serving.actuator import Actuator
    from gpumesh.v1 import deployment_service_pb2 as D
    from gpumesh.v1 import model_service_pb2 as M

    async def run(req):
        return t.Workload(id="w-2", slice_id=req.slice_id, state=t.WORKLOAD_STATE_FAILED, message="exit code 1")

    async def ensure(deployment, rid):
        return "k"

    async def put_replica(r):
        pass
    ctl = SimpleNamespace(fleet=SimpleNamespace(slices={"s-1": t.Slice(id="s-1", node="n1", memory_bytes=1 << 30)},
                                                nodes={}))
    act = Actuator(ctl, SimpleNamespace(run=run), SimpleNamespace(put_replica=put_replica,
                                                                   keys=SimpleNamespace(ensure=ensure)))
    r = D.Replica(id="r-1", deployment="chat", slice_id="s-1", workload_id="w-1", state=D.REPLICA_STATE_FAILED,
                  restarts=1)
    r.next_start_at.FromSeconds(100)
    variant = M.Variant(name="f16", backend=M.BACKEND_LLAMA_CPP, artifact="/m/tiny.gguf")
    n = await act.run(r, D.DeploymentSpec(name="chat", model="tiny"), variant)
    assert n.workload_id == "w-2" and "did not start" in n.message
    seen = rc.Observed(id=n.id, state=rc.PENDING if n.state == D.REPLICA_STATE_PENDING else rc.FAILED,
                       has_slice=True, slice_ready=True, workload=rc.W_ENDED, restarts=n.restarts,
                       next_start=n.next_start_at.seconds)
    plan = rc.reconcile(rc.Desired(replicas=1), [seen], now=200.0)
    assert plan.kinds() == [("fail", "r-1")]           # not ("restart", "r-1") at once
