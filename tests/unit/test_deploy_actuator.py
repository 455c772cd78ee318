"""The deployment controller's actuator (controlplane/serving/actuator.py): what it writes into a replica's
record when a replica waits for room or its backend crashed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from gpumesh.v1 import types_pb2 as t
from mesh import errors


async def test_a_replica_waiting_for_room_is_written_when_its_reason_changes_only():
    """A replica no slice fits is retried every few seconds (each failed action kicks the next pass after the
    backoff); each try wrote the same record to etcd again, for as long as the fleet stayed full."""
    from types import SimpleNamespace

    from controlplane.serving.actuator import Actuator
    from controlplane.state.requestids import RequestIds
    from gpumesh.v1 import deployment_service_pb2 as D

    why = ["no GPU has 2 GiB free"]

    async def allocate(req, **kw):
        raise errors.ResourceExhausted(why[0])
    from controlplane.state.fleet import Fleet
    ctl = SimpleNamespace(allocate=allocate, recorder=None, requests=RequestIds(lambda: 3600.0),   # (no id seen)
                          fleet=Fleet())
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
    from controlplane.state.fleet import Fleet
    ctl = SimpleNamespace(fleet=Fleet())
    ctl.fleet.slices["s-1"] = t.Slice(id="s-1", node="n1", memory_bytes=1 << 30)
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


def controller(*nodes):
    """A real slice controller (scheduler, request ids, fleet) over an in-memory fleet, writing nowhere."""
    from controlplane.controllers.slices import Controller
    from tests.unit.test_placement import make_fleet

    ctl = Controller(store=None)

    async def write(ops, conds=()):
        return 1

    async def lease():
        return 1
    ctl.writer = SimpleNamespace(write=write)
    ctl._request_lease = lease
    fleet = make_fleet(*((n, [("H100-80GB", True)]) for n in nodes))
    ctl.fleet.nodes, ctl.fleet.index = fleet.nodes, fleet.index
    return ctl


def live_allocations(ctl, replica: str) -> set[str]:
    from controlplane.serving import deployspec
    return {s.allocation_id for s in ctl.fleet.slices.values()
            if s.labels.get(deployspec.LABEL_REPLICA) == replica and s.state != t.SLICE_STATE_RELEASING}


async def fallback_placed():
    """Replicas r-0 and r-1 of deployment "chat" (2 GiB each) allocated while only n1 takes slices: r-1 by the
    fallback, on the node that holds r-0. Returns (ctl, actuator, spec, r-1, r-0's slice, r-1's slice); n2 is
    still not ready."""
    from controlplane.serving.actuator import Actuator
    from gpumesh.v1 import deployment_service_pb2 as D

    ctl = controller("n1", "n2")
    ctl.fleet.nodes["n2"].ready = False                 # (not yet: only n1 takes slices)
    saved = []

    async def put_replica(r):
        saved.append(r)
    act = Actuator(ctl, None, SimpleNamespace(put_replica=put_replica))
    spec = D.DeploymentSpec(name="chat", tenant="acme", model="smol")
    other = await act.allocate(D.Replica(id="r-0", deployment="chat"), spec, 2 << 30)
    r = D.Replica(id="r-1", deployment="chat")
    first = await act.allocate(r, spec, 2 << 30)
    return ctl, act, spec, r, other, first


async def test_a_retry_after_a_lost_record_reuses_the_fallback_allocation():
    """A replica placed by the fallback (no node free of the deployment's other replicas) whose record of it was
    lost (a crash before the write) was allocated again on the retry: the spread attempt, tried first, succeeded
    once another node had room, and the first allocation stayed until the replica was removed (two slices for
    one replica). The retry now gets the first allocation back."""
    ctl, act, spec, r, other, first = await fallback_placed()
    assert first.node == other.node == "n1"            # the fallback: n1 holds the deployment's other replica
    ctl.fleet.nodes["n2"].ready = True                  # room on another node now; `first` was never recorded
    again = await act.allocate(r, spec, 2 << 30)
    assert again.allocation_id == first.allocation_id and again.slice_id == first.slice_id
    assert live_allocations(ctl, "r-1") == {first.allocation_id}
    assert live_allocations(ctl, "r-0") == {other.allocation_id}


async def test_an_allocation_the_retry_cannot_reuse_is_released_once_another_holds_the_replica():
    """The fallback allocation was for an earlier spec (the deployment changed before the retry): the retry places
    the replica anew (spread, on the node that has room now) and releases the first at once, not at the replica's
    removal."""
    ctl, act, spec, r, other, first = await fallback_placed()
    ctl.fleet.nodes["n2"].ready = True
    bigger = await act.allocate(r, spec, 15 << 30)      # the record of `first` lost; now 15 GiB per replica
    assert bigger.node == "n2" and bigger.memory_bytes >= 15 << 30
    assert ctl.fleet.slices[first.slice_id].state == t.SLICE_STATE_RELEASING
    assert live_allocations(ctl, "r-1") == {bigger.allocation_id}
    assert live_allocations(ctl, "r-0") == {other.allocation_id}                # another replica's: untouched
    assert (await act.allocate(r, spec, 15 << 30)).allocation_id == bigger.allocation_id        # a retry: the same
    assert live_allocations(ctl, "r-1") == {bigger.allocation_id}
