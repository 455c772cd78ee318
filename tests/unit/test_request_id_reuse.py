"""An idempotency key reused with other arguments is refused (controlplane/state/requestids.py).

Allocate and Run, through their gRPC services and the SDK: the same request_id with the same arguments gets
the first call's result (also with another wait); with other arguments RequestIdReused (ALREADY_EXISTS),
which names request_id and neither the earlier arguments nor their result; the same after a control-plane
restart (the ids read back from etcd); and a durable value of the old format (a bare id) is accepted as
before. Before, every retry with a known id got the first call's result whatever its arguments.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json

import grpc
import pytest

from controlplane.api.services import SliceService
from controlplane.controllers.nodes import rebuild
from controlplane.controllers.slices import Controller
from controlplane.controllers.workloads import WorkloadManager, WorkloadService
from controlplane.state import keys
from controlplane.state.store import EtcdStore
from gpumesh.v1 import slice_service_pb2_grpc, types_pb2 as t, workload_service_pb2_grpc
from mesh import errors
from mesh.client import MeshClient
from tests.unit.test_placement import make_fleet


@pytest.fixture
async def store(etcd_server, etcd_client):
    s = EtcdStore([etcd_server.endpoint])
    await s.connect()
    # a long lease: a 5 s one (refreshed within 1.25 s) lapses on a stalled worker and the store stops writing
    await s.become_leader("request-id-reuse-test", ttl=30)
    yield s
    await s.revoke_lease(s.session_lease)
    await s.close()


class ControlPlane:
    """A controller and a workload manager loaded from etcd as a restarted leader loads them, served over
    real gRPC (SliceService, WorkloadService) on a loopback port."""

    def __init__(self, store: EtcdStore) -> None:
        self.store = store

    async def __aenter__(self) -> "ControlPlane":
        self.ctl = Controller(self.store)
        self.ctl.writer.start()
        fleet = make_fleet(("n1", [("H100-80GB", True), ("H100-80GB", True)]))     # (the agent's, in memory)
        self.ctl.fleet.nodes, self.ctl.fleet.index = fleet.nodes, fleet.index
        rebuild(self.ctl, await self.store.load())
        for entry in self.ctl.fleet.nodes.values():
            entry.ready = True                  # (its agent would be connected)
        self.wm = WorkloadManager(self.ctl)
        await self.wm.load()
        self.server = grpc.aio.server()
        slice_service_pb2_grpc.add_SliceServiceServicer_to_server(SliceService(self.ctl), self.server)
        workload_service_pb2_grpc.add_WorkloadServiceServicer_to_server(WorkloadService(self.wm), self.server)
        self.endpoint = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        await self.server.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.server.stop(None)
        await self.wm.stop()
        await self.ctl.writer.stop()

    async def call(self, method: str, *args, **kwargs):
        """An SDK call (the SDK is synchronous: in a thread, so this loop keeps serving it)."""
        def go():
            with MeshClient(self.endpoint, timeout=20) as mesh:
                return getattr(mesh, method)(*args, **kwargs)
        return await asyncio.to_thread(go)

    async def ready_slice(self, sid: str, tenant: str = "acme", gpu: int = 0) -> None:
        """A READY slice (what an agent would have reported), durable so a restart finds it."""
        s = t.Slice(id=sid, allocation_id="a-" + sid, tenant=tenant, node="n1", gpu_index=gpu,
                    gpu_uuid=f"GPU-n1-{gpu}", isolation=t.ISOLATION_MIG, profile="1g.10gb",
                    state=t.SLICE_STATE_READY)
        self.ctl.fleet.put_slice(s)
        await self.ctl.save([s], created=True)


def alloc(**kw) -> dict:
    return dict(dict(tenant="acme", mig_profile="1g.10gb", request_id="job-1", no_wait=True), **kw)


def assert_refused(exc: errors.RequestIdReused, rid: str, call: str, *not_named: str) -> None:
    assert isinstance(exc, errors.AlreadyExists) and exc.code == grpc.StatusCode.ALREADY_EXISTS
    assert exc.field == "request_id" and exc.request_id == rid
    assert exc.message.startswith(f"request_id: {rid!r} was used by an earlier {call} call with other arguments")
    for text in not_named:                   # neither the earlier call's result nor its arguments
        assert text not in exc.message


async def test_allocate_retry_with_other_arguments_is_refused(store):
    async with ControlPlane(store) as cp:
        first = await cp.call("allocate", **alloc())
        # the same arguments, waiting otherwise (timeout_seconds, no_wait are how the caller waits): the first
        again = await cp.call("allocate", **alloc(timeout_seconds=120))
        assert again.allocation_id == first.allocation_id
        for other in (alloc(mig_profile="2g.20gb"), alloc(labels={"job": "x"}), alloc(priority=5)):
            with pytest.raises(errors.RequestIdReused) as refused:
                await cp.call("allocate", **other)
            assert_refused(refused.value, "job-1", "Allocate", first.allocation_id, "1g.10gb", "2g.20gb")
        assert len(cp.ctl.fleet.slices) == 1          # nothing placed by a refused call
        # keys are per tenant: another tenant's call with the id is its own first call
        theirs = await cp.call("allocate", **alloc(tenant="other", mig_profile="2g.20gb"))
        assert theirs.allocation_id != first.allocation_id
        value = json.loads((await store.client.get(keys.request("acme", "job-1"))).value)
        assert value["id"] == first.allocation_id and value["fingerprint"].startswith("sha256:")


async def test_allocate_refusal_survives_a_restart_and_old_values_are_accepted(store):
    async with ControlPlane(store) as cp:
        first = await cp.call("allocate", **alloc())
        old = await cp.call("allocate", **alloc(request_id="old-1"))
    # a value written before fingerprints were kept: the bare allocation id
    lease = (await store.client.get(keys.request("acme", "old-1"))).lease
    await store.client.put(keys.request("acme", "old-1"), old.allocation_id.encode(), lease=lease)
    async with ControlPlane(store) as cp:          # a restarted control plane: the ids come from etcd
        assert (await cp.call("allocate", **alloc())).allocation_id == first.allocation_id
        with pytest.raises(errors.RequestIdReused) as refused:
            await cp.call("allocate", **alloc(mig_profile="2g.20gb"))
        assert_refused(refused.value, "job-1", "Allocate", first.allocation_id)
        # the old value has no fingerprint: a retry gets its allocation, whatever its arguments, as before
        again = await cp.call("allocate", **alloc(request_id="old-1", mig_profile="2g.20gb"))
        assert again.allocation_id == old.allocation_id
        assert len(cp.ctl.fleet.slices) == 2


def run(sid: str = "s-1", **kw) -> tuple:
    fields = dict(env={"A": "1", "B": "2"}, labels={"job": "train"}, request_id="run-1")
    fields.update(kw)
    return (sid, ["python", "train.py"]), fields


async def test_run_retry_with_other_arguments_is_refused_also_after_a_restart(store):
    async with ControlPlane(store) as cp:
        await cp.ready_slice("s-1")
        await cp.ready_slice("s-2", gpu=1)
        args, kw = run()
        first = await cp.call("run_workload", *args, **kw)
        # the same arguments (the env map in another order serializes the same): the first workload
        args, kw = run(env={"B": "2", "A": "1"})
        assert (await cp.call("run_workload", *args, **kw)).id == first.id
        others = [run(env={"A": "1", "B": "3"}), run(labels={}), run("s-2")]
        for args, kw in others + [(("s-1", ["python", "eval.py"]), run()[1])]:
            with pytest.raises(errors.RequestIdReused) as refused:
                await cp.call("run_workload", *args, **kw)
            assert_refused(refused.value, "run-1", "Run", first.id, "train.py")
        assert list(cp.wm.workloads) == [first.id]
        args, kw = run(request_id="old-run")
        old = await cp.call("run_workload", *args, **kw)
    key = keys.workload_request("acme", "old-run")
    lease = (await store.client.get(key)).lease
    await store.client.put(key, old.id.encode(), lease=lease)         # the old format: the bare workload id
    async with ControlPlane(store) as cp:
        args, kw = run()
        assert (await cp.call("run_workload", *args, **kw)).id == first.id
        with pytest.raises(errors.RequestIdReused):
            await cp.call("run_workload", "s-2", ["python", "train.py"], **kw)
        args, kw = run(request_id="old-run", env={})
        assert (await cp.call("run_workload", *args, **kw)).id == old.id       # accepted as before
        assert len(cp.wm.workloads) == 2


async def test_meshctl_shows_the_refusal(store):
    from tools.meshctl.main import main
    async with ControlPlane(store) as cp:
        await cp.call("allocate", **alloc())

        def alloc_cli(profile: str) -> tuple[int, str]:
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code = main(["--endpoint", cp.endpoint, "alloc", "--tenant", "acme", "--profile", profile,
                             "--request-id", "job-1", "--no-wait"])
            return code, err.getvalue()
        code, err = await asyncio.to_thread(alloc_cli, "2g.20gb")
    assert code == 1
    assert "request_id: 'job-1' was used by an earlier Allocate call with other arguments" in err


async def test_the_actuator_replaces_an_allocation_made_for_an_earlier_spec_of_the_replica():
    """The serving actuator allocates with the replica's ID as the request id. When the deployment changed
    between an allocation and the replica's record of it (a crash in between), the earlier allocation is of
    the old size: it is released and the new request placed (under an id of its own, the same on a retry).
    Before, the replica got the old allocation's slice."""
    from types import SimpleNamespace

    from controlplane.serving.actuator import Actuator
    from gpumesh.v1 import deployment_service_pb2 as D

    ctl = Controller(store=None)

    async def write(ops, conds=()):
        return 1

    async def lease():
        return 1
    ctl.writer = SimpleNamespace(write=write)
    ctl._request_lease = lease
    fleet = make_fleet(("n1", [("H100-80GB", True)]), ("n2", [("H100-80GB", True)]))
    ctl.fleet.nodes, ctl.fleet.index = fleet.nodes, fleet.index
    saved = []

    async def put_replica(r):
        saved.append(r)
    act = Actuator(ctl, None, SimpleNamespace(put_replica=put_replica))
    spec = D.DeploymentSpec(name="chat", tenant="acme", model="smol")
    r = D.Replica(id="r-1", deployment="chat")
    first = await act.allocate(r, spec, 2 << 30)
    assert first.profile == "1g.10gb"
    # the record of `first` was lost; the deployment now needs 15 GiB per replica
    bigger = await act.allocate(r, spec, 15 << 30)
    assert bigger.allocation_id != first.allocation_id and bigger.memory_bytes >= 15 << 30
    assert ctl.fleet.slices[first.slice_id].state == t.SLICE_STATE_RELEASING
    again = await act.allocate(r, spec, 15 << 30)                      # a retry: the same allocation
    assert again.allocation_id == bigger.allocation_id
    assert sum(1 for s in ctl.fleet.slices.values() if s.state != t.SLICE_STATE_RELEASING) == 1


async def test_a_retry_of_a_released_allocation_is_refused_and_the_actuator_places_anew(store):
    """An idempotency key whose allocation was released since answers FailedPrecondition naming request_id
    (it answered an allocation of no live slice before: an empty answer read as a success, and the actuator
    took slices[0] of it). The actuator then places the replica under its next request id, once per
    released allocation."""
    from types import SimpleNamespace

    from controlplane.serving.actuator import Actuator
    from gpumesh.v1 import deployment_service_pb2 as D

    async with ControlPlane(store) as cp:
        first = await cp.call("allocate", **alloc())
        await cp.ctl.release(first.allocation_id, wait=False)
        with pytest.raises(errors.FailedPrecondition, match=r"request_id: 'job-1' named allocation .* released"):
            await cp.call("allocate", **alloc())

        saved = []

        async def put_replica(r):
            saved.append(r)
        act = Actuator(cp.ctl, None, SimpleNamespace(put_replica=put_replica))
        spec = D.DeploymentSpec(name="chat", tenant="acme", model="smol")
        r = D.Replica(id="r-1", deployment="chat")
        placed = await act.allocate(r, spec, 2 << 30)
        await cp.ctl.release(placed.allocation_id, wait=False)          # its slice lost
        anew = await act.allocate(r, spec, 2 << 30)
        assert anew.allocation_id != placed.allocation_id and anew.slice_id
        assert (await act.allocate(r, spec, 2 << 30)).allocation_id == anew.allocation_id      # a retry
        await cp.ctl.release(anew.allocation_id, wait=False)
        third = await act.allocate(r, spec, 2 << 30)
        assert third.allocation_id not in (placed.allocation_id, anew.allocation_id)


async def test_the_actuator_starts_one_backend_per_replica_start_across_a_lost_replica_record(tmp_path):
    """A control plane that crashed after the backend's workload was recorded but before the replica named it
    started a second server on the replica's slice on the retry (the first ran on, named by no replica).
    The start's request id (the replica and the workload it replaces) makes the retry find the first one;
    a retry for a changed deployment stops that one and starts the new settings."""
    from types import SimpleNamespace

    from controlplane.serving.actuator import Actuator
    from controlplane.serving.validate import validate
    from gpumesh.v1 import deployment_service_pb2 as D
    from gpumesh.v1 import model_service_pb2 as Mo
    from mesh import gpumodels
    from tests.models_util import TINY_WEIGHT_BYTES, write_tiny_gguf

    ctl = Controller(store=None)

    async def write(ops, conds=()):
        return 1

    async def lease():
        return 1
    ctl.writer = SimpleNamespace(write=write)
    ctl._request_lease = lease
    fleet = make_fleet(("n1", [("H100-80GB", True)]))
    ctl.fleet.nodes, ctl.fleet.index = fleet.nodes, fleet.index
    ctl.fleet.put_slice(t.Slice(id="s-1", allocation_id="a-1", tenant="acme", node="n1", gpu_index=0,
                                gpu_uuid="GPU-n1-0", isolation=t.ISOLATION_MIG, profile="1g.10gb",
                                memory_bytes=10 << 30, state=t.SLICE_STATE_READY))
    wm = WorkloadManager(ctl)

    async def ensure(deployment, rid):
        return "k" * 43

    async def put_replica(r):
        pass
    act = Actuator(ctl, wm, SimpleNamespace(put_replica=put_replica, keys=SimpleNamespace(ensure=ensure)))
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    model = validate(Mo.Model(name="tiny", variants=[Mo.Variant(
        name="f16", backend=Mo.BACKEND_LLAMA_CPP, artifact=str(path), quantization="F16",
        weight_bytes=TINY_WEIGHT_BYTES, max_context=256, architecture=Mo.Architecture(
            name="llama", block_count=2, embedding_length=64, head_count=4, head_count_kv=2))]),
        [gpumodels.get_model("H100-80GB")])
    variant = model.variants[0]
    spec = D.DeploymentSpec(name="chat", tenant="acme", model="tiny", variant="f16")
    r = D.Replica(id="r-1", deployment="chat", slice_id="s-1", node="n1")

    def live():
        return sorted(w.id for w in wm.workloads.values() if w.state == t.WORKLOAD_STATE_PENDING)

    first = await act.run(r, spec, variant)
    again = await act.run(r, spec, variant)                # the replica's record of `first` was lost
    assert again.workload_id == first.workload_id and live() == [first.workload_id]
    restart = await act.run(first, spec, variant)         # a restart after `first` ended: a new start
    assert restart.workload_id != first.workload_id
    spec.backend.context = 128                             # the deployment changed before the retry
    changed = await act.run(first, spec, variant)
    assert changed.workload_id not in (first.workload_id, restart.workload_id)
    assert wm.workloads[restart.workload_id].state == t.WORKLOAD_STATE_STOPPED
    assert (await act.run(first, spec, variant)).workload_id == changed.workload_id      # its retry


async def test_removing_a_replica_releases_an_allocation_its_record_lost():
    """A control plane that crashed between Allocate and the replica's write left the replica without its slice;
    removed before a retry adopted it (a scale-down, a delete), the allocation was held for ever: nothing named
    it. Its slices carry the replica's label, and the removal releases them."""
    from types import SimpleNamespace

    from controlplane.serving.actuator import Actuator
    from gpumesh.v1 import deployment_service_pb2 as D

    ctl = Controller(store=None)

    async def write(ops, conds=()):
        return 1

    async def lease():
        return 1
    ctl.writer = SimpleNamespace(write=write)
    ctl._request_lease = lease
    fleet = make_fleet(("n1", [("H100-80GB", True)]))
    ctl.fleet.nodes, ctl.fleet.index = fleet.nodes, fleet.index
    gone = []

    async def put_replica(r):
        pass

    async def delete_replica(r):
        gone.append(r.id)
    act = Actuator(ctl, SimpleNamespace(workloads={}), SimpleNamespace(put_replica=put_replica,
                                                                       delete_replica=delete_replica))
    spec = D.DeploymentSpec(name="chat", tenant="acme", model="smol")
    other = await act.allocate(D.Replica(id="r-2", deployment="chat"), spec, 2 << 30)     # another replica's
    lost = await act.allocate(D.Replica(id="r-1", deployment="chat"), spec, 2 << 30)
    await act.remove(D.Replica(id="r-1", deployment="chat", state=D.REPLICA_STATE_PENDING), "scale down to 1")
    assert gone == ["r-1"]
    assert ctl.fleet.slices[lost.slice_id].state == t.SLICE_STATE_RELEASING
    assert ctl.fleet.slices[other.slice_id].state != t.SLICE_STATE_RELEASING
