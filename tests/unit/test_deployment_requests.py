"""DeploymentService's checks on names and Update's on what the replicas' slices will need: refused with
INVALID_ARGUMENT naming the field, before anything is looked up or written."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import grpc
import pytest

from controlplane.serving.deployments import DeploymentManager
from controlplane.serving.deploysvc import DeploymentService
from controlplane.serving.validate import validate
from gpumesh.v1 import deployment_service_pb2 as D
from gpumesh.v1 import model_service_pb2 as M
from mesh import errors, gpumodels
from tests.models_util import TINY_WEIGHT_BYTES, write_tiny_gguf

H100 = gpumodels.get_model("H100-80GB")


class Aborted(Exception):
    pass


class Context:
    async def abort_with_status(self, status):
        raise Aborted(status.code, status.details)

    async def abort(self, code, details):
        raise Aborted(code, details)


def tiny_model(path) -> M.Model:
    """The registered model of the tiny GGUF at `path` (one F16 llama.cpp variant), validated for an H100."""
    return validate(M.Model(name="tiny", variants=[M.Variant(
        name="f16", backend=M.BACKEND_LLAMA_CPP, artifact=str(path), quantization="F16", weight_bytes=TINY_WEIGHT_BYTES,
        max_context=256, architecture=M.Architecture(name="llama", block_count=2, embedding_length=64, head_count=4,
                                                     head_count_kv=2))]), [H100])


@pytest.fixture
def manager(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    model = tiny_model(path)
    registry = SimpleNamespace(get=lambda name: model, gpu_models=lambda: [H100])
    m = DeploymentManager(SimpleNamespace(telemetry=None), workloads=None, registry=registry)
    m.store.deployments["chat"] = D.Deployment(spec=D.DeploymentSpec(name="chat", model="tiny", variant="f16",
                                                                     tenant="team-a", replicas=1), generation=1)
    writes = []

    async def change(name, generation, edit):
        writes.append(name)
    m._change = change
    m.writes = writes
    return m


@pytest.mark.parametrize("method, request_", [
    ("Get", D.GetDeploymentRequest(name="")),
    ("Scale", D.ScaleDeploymentRequest(name="bad name!", replicas=1)),
    ("Delete", D.DeleteDeploymentRequest(name="x" * 5000)),
    ("Update", D.UpdateDeploymentRequest(spec=D.DeploymentSpec(name="no/slash"))),
])
def test_a_bad_name_is_invalid_argument_naming_the_field_not_not_found(manager, method, request_):
    with pytest.raises(Aborted) as e:
        asyncio.run(getattr(DeploymentService(manager), method)(request_, Context()))
    code, details = e.value.args
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert details.startswith("spec.name: " if method == "Update" else "name: "), details
    assert len(details) < 400                                  # a long name is not echoed whole


def test_update_refuses_labels_that_slices_refuse(manager):
    spec = D.DeploymentSpec(name="chat", model="tiny", replicas=1, labels={"bad key!": "v"})
    with pytest.raises(errors.InvalidArgument, match=r"spec.labels\['bad key!'\]"):
        asyncio.run(manager.update(spec, 0))
    assert manager.writes == []
    spec.labels.clear()
    spec.labels["team"] = "search"
    asyncio.run(manager.update(spec, 0))
    assert manager.writes == ["chat"]


def test_update_checks_the_stored_policy_again_when_the_backend_settings_change(manager, monkeypatch):
    """New backend settings change what a replica costs: the stored policy's ceiling is checked again."""
    from controlplane.serving import deployments
    from gpumesh.v1 import scaling_pb2
    checked = []
    monkeypatch.setattr(deployments.scaling, "check", lambda *a: checked.append(a[1].backend.context))
    policy = scaling_pb2.ScalingPolicy(min_replicas=1, max_replicas=2)
    manager.store.deployments["chat"].spec.scaling.CopyFrom(policy)
    same = D.DeploymentSpec(name="chat", model="tiny", replicas=1, scaling=policy)
    asyncio.run(manager.update(same, 0))
    assert checked == []                                   # nothing that prices a replica changed
    bigger = D.DeploymentSpec(name="chat", model="tiny", replicas=1, scaling=policy)
    bigger.backend.context = 256
    asyncio.run(manager.update(bigger, 0))
    assert checked == [256]


def test_update_refuses_a_negative_generation_naming_it(manager):
    spec = D.DeploymentSpec(name="chat", model="tiny", replicas=1)
    with pytest.raises(errors.InvalidArgument) as e:
        asyncio.run(manager.update(spec, -1))
    assert e.value.field == "generation" and manager.writes == []


def test_create_refuses_a_priority_over_the_tenants_cap(manager):
    from controlplane.scheduler import profiles
    fw = profiles.build("default")
    fw.plugin("TenantQuota").tenants["team-a"] = {"max_priority": 100}
    manager.ctl.scheduler = fw
    manager.ctl.recorder = SimpleNamespace(emit=lambda *a, **k: None)
    manager.kick = lambda: None

    async def create(d):
        manager.writes.append(d.spec.name)
        manager.store.deployments[d.spec.name] = d
    manager.store.create = create
    spec = D.DeploymentSpec(name="big", model="tiny", tenant="team-a", replicas=1, priority=101)
    with pytest.raises(errors.ResourceExhausted, match=r"spec.priority: tenant team-a quota max_priority=100"):
        asyncio.run(manager.create(spec))
    assert manager.writes == []
    asyncio.run(manager.create(D.DeploymentSpec(name="ok", model="tiny", tenant="team-a", replicas=1, priority=100)))
    asyncio.run(manager.create(D.DeploymentSpec(name="b", model="tiny", tenant="team-b", replicas=1, priority=900)))
    assert manager.writes == ["ok", "b"]


async def test_a_deployment_is_not_created_for_a_model_whose_delete_is_being_written(tmp_path):
    """The registry's Delete checks which deployments run the model, then writes; a Create between the two found
    the model still registered and was written too: a deployment of a model that is gone (its replicas could
    never be placed). Create checks the model again under the registry's lock."""
    from controlplane.serving.registry import ModelRegistry
    from controlplane.state.store import Delete
    from controlplane.events.recorder import NullRecorder

    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    gate, written = asyncio.Event(), []

    async def write(ops, conds=()):
        if any(isinstance(op, Delete) for op in ops):
            await gate.wait()                     # the model's delete, in flight
        written.extend(ops)
    ctl = SimpleNamespace(writer=SimpleNamespace(write=write), fleet=SimpleNamespace(nodes={}), telemetry=None,
                          recorder=NullRecorder())
    registry = ModelRegistry(ctl, check_artifacts=False)
    registry.models["tiny"] = tiny_model(path)
    m = DeploymentManager(ctl, workloads=None, registry=registry)
    deleting = asyncio.create_task(registry.delete("tiny"))
    await asyncio.sleep(0)
    creating = asyncio.create_task(m.create(D.DeploymentSpec(name="chat", model="tiny", tenant="a", replicas=1)))
    await asyncio.sleep(0.05)
    gate.set()
    await deleting
    with pytest.raises(errors.InvalidArgument, match="spec.model: no model 'tiny'"):
        await creating
    assert "chat" not in m.store.deployments and "tiny" not in registry.models


async def test_a_deployment_is_not_created_in_a_pool_whose_delete_is_being_written(tmp_path):
    """A pool's Delete checks which deployments draw from it, then writes; a Create between the two found the pool
    and was written too (a deployment drawing from a pool that is gone). Create checks its pool again, and
    writes, under the pools' lock."""
    from controlplane.events.recorder import NullRecorder
    from controlplane.pools.store import PoolStore
    from controlplane.state.fleet import Fleet
    from controlplane.state.store import Delete
    from mesh import pools as mesh_pools
    from mesh.cost import PriceTable
    from tests.unit.test_pools import pool

    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    gate = asyncio.Event()

    async def write(ops, conds=()):
        if any(isinstance(op, Delete) for op in ops):
            await gate.wait()                     # the pool's delete, in flight
    ctl = SimpleNamespace(writer=SimpleNamespace(write=write), fleet=Fleet(), telemetry=None, recorder=NullRecorder(),
                          scheduler=None)
    store = PoolStore(ctl, PriceTable.parse(["H100-80GB=2.40"]))
    store.pools["gpus"] = mesh_pools.validate(pool(name="gpus"))
    model = tiny_model(path)
    m = DeploymentManager(ctl, workloads=None, registry=SimpleNamespace(get=lambda name: model,
                                                                        gpu_models=lambda: [H100]))
    store.deployments = m
    deleting = asyncio.create_task(store.delete("gpus"))
    await asyncio.sleep(0)
    creating = asyncio.create_task(m.create(D.DeploymentSpec(name="chat", model="tiny", tenant="a", replicas=1,
                                                             pool="gpus")))
    await asyncio.sleep(0.05)
    gate.set()
    await deleting
    with pytest.raises(errors.InvalidArgument, match="spec.pool: no pool 'gpus'"):
        await creating
    assert "chat" not in m.store.deployments and "gpus" not in store.pools


def test_a_restart_stamp_is_short_printable_text(manager):
    """restart_stamp was stored as given: a megabyte of it went into the deployment's etcd record (every status
    write rewrote it; one over etcd's request limit failed the whole group-committed transaction it rode in)."""
    spec = D.DeploymentSpec(name="chat", model="tiny", replicas=1, restart_stamp="x" * 1_000_000)
    for call in (lambda: manager.update(spec, 0), lambda: manager.create(spec)):
        with pytest.raises(errors.InvalidArgument) as e:
            asyncio.run(call())
        assert e.value.field == "spec.restart_stamp" and len(str(e.value)) < 300
    assert manager.writes == []
    spec.restart_stamp = "2026-12-07T07:00:00+00:00"
    asyncio.run(manager.update(spec, 0))
    assert manager.writes == ["chat"]


def test_a_bad_model_name_is_refused_naming_spec_model(manager):
    """The registry's lookup named its own field ("name: ..."), read as the deployment's name."""
    from controlplane.serving.validate import check_name
    manager.registry.get = lambda name: check_name(name, "name")
    with pytest.raises(errors.InvalidArgument) as e:
        asyncio.run(manager.create(D.DeploymentSpec(name="chat2", model="no/such model", replicas=1)))
    assert e.value.field == "spec.model", e.value


def test_a_deleted_deployments_notes_are_dropped(manager):
    """The drain notes and the wake times of deleted deployments stayed in memory for the leader's life (one per
    name ever drained or woken), and a deployment created later under the name read the old wake as its own."""
    async def write(ops, conds=()):
        return 1
    manager.ctl.writer = SimpleNamespace(write=write)
    manager.ctl.recorder = SimpleNamespace(emit=lambda *a, **kw: None)
    manager.drain_notes["chat"] = "WaitingForReplacements:[]"
    manager.scaling.woken["chat"] = 1.0
    asyncio.run(manager.delete("chat"))
    assert "chat" not in manager.drain_notes and "chat" not in manager.scaling.woken


async def test_a_replica_waiting_for_its_slice_to_be_realized_does_not_spin_the_controller(manager):
    """Each ended action kicked a pass at once, and a pass gave the replica whose slice its node had not realized
    yet another advance that ended at once: thousands of passes a second until the slice was READY."""
    from gpumesh.v1 import types_pb2 as T

    async def write(ops, conds=()):
        return 1
    manager.ctl.writer = SimpleNamespace(write=write)
    manager.ctl.recorder = SimpleNamespace(emit=lambda *a, **kw: None)
    manager.ctl.fleet = SimpleNamespace(slices={"s-1": T.Slice(id="s-1", node="n1", state=T.SLICE_STATE_PENDING)},
                                        nodes={"n1": SimpleNamespace(ready=True,
                                                                     record=SimpleNamespace(draining=False))})
    manager.workloads = SimpleNamespace(workloads={})
    manager.interval = 0.1
    manager.store.replicas["chat"] = {"r-1": D.Replica(id="r-1", deployment="chat", slice_id="s-1", node="n1",
                                                       state=D.REPLICA_STATE_PENDING)}
    manager._loop.start()
    manager.kick()
    await asyncio.sleep(0.5)
    await manager._loop.stop()
    assert 2 <= manager._loop.passes <= 10


def test_a_long_label_key_is_not_echoed_whole(manager):
    spec = D.DeploymentSpec(name="chat", model="tiny", replicas=1, labels={"k" * 1_000_000: "v"})
    with pytest.raises(errors.InvalidArgument) as e:
        asyncio.run(manager.update(spec, 0))
    assert e.value.field.startswith("spec.labels['kkk") and len(str(e.value)) < 400


async def test_new_settings_are_checked_against_a_model_update_being_written(tmp_path):
    """The registry's Update checks the settings of the deployments that run the model, then writes; a deployment
    Update between the two was checked against the old variant and written: settings the new one refuses."""
    from controlplane.serving.registry import ModelRegistry
    from controlplane.events.recorder import NullRecorder
    from controlplane.state import keys

    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    gate = asyncio.Event()

    async def write(ops, conds=()):
        if any(op.key == keys.model("tiny") for op in ops):
            await gate.wait()                     # the model's update, in flight
    ctl = SimpleNamespace(writer=SimpleNamespace(write=write), fleet=SimpleNamespace(nodes={}), telemetry=None,
                          recorder=NullRecorder())

    def variant(max_context):
        return M.Variant(name="f16", backend=M.BACKEND_LLAMA_CPP, artifact=str(path), quantization="F16",
                         weight_bytes=TINY_WEIGHT_BYTES, max_context=max_context, architecture=M.Architecture(
                             name="llama", block_count=2, embedding_length=64, head_count=4, head_count_kv=2))
    registry = ModelRegistry(ctl, check_artifacts=False)
    registry.models["tiny"] = validate(M.Model(name="tiny", generation=1, variants=[variant(256)]), [H100])
    m = DeploymentManager(ctl, workloads=None, registry=registry)
    m.store.deployments["chat"] = D.Deployment(spec=D.DeploymentSpec(name="chat", model="tiny", variant="f16",
                                                                     tenant="a", replicas=1), generation=1)
    shrinking = asyncio.create_task(registry.update(M.Model(name="tiny", variants=[variant(128)])))
    await asyncio.sleep(0.05)
    wider = D.DeploymentSpec(name="chat", model="tiny", replicas=1)
    wider.backend.context = 256
    widening = asyncio.create_task(m.update(wider, 0))
    await asyncio.sleep(0.05)
    gate.set()
    assert (await shrinking).generation == 2
    with pytest.raises(errors.InvalidArgument, match="spec.backend.context: 256 is out of range"):
        await widening
    assert m.store.deployments["chat"].spec.backend.context == 0


async def test_a_policy_naming_a_variant_a_model_update_drops_is_refused(tmp_path):
    """A model's Update refuses to drop a variant a deployment's scaling policy names, and checks that under the
    registry's lock; SetScaling (and Create with a policy) checked the policy's variant names without it, so a
    policy naming the variant written while the update was in flight named a variant that was gone."""
    from controlplane.serving.registry import ModelRegistry
    from controlplane.events.recorder import NullRecorder
    from controlplane.state import keys
    from gpumesh.v1 import scaling_pb2 as S

    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    in_flight, gate = asyncio.Event(), asyncio.Event()

    async def write(ops, conds=()):
        if any(op.key == keys.model("tiny") for op in ops):
            in_flight.set()
            await gate.wait()                     # the model's update, in flight
    ctl = SimpleNamespace(writer=SimpleNamespace(write=write), fleet=SimpleNamespace(nodes={}), telemetry=None,
                          recorder=NullRecorder())

    def variant(name, rank):
        return M.Variant(name=name, backend=M.BACKEND_LLAMA_CPP, artifact=str(path), quantization="F16",
                         weight_bytes=TINY_WEIGHT_BYTES, max_context=256, fallback_rank=rank,
                         architecture=M.Architecture(name="llama", block_count=2, embedding_length=64, head_count=4,
                                                     head_count_kv=2))
    registry = ModelRegistry(ctl, check_artifacts=False)
    registry.models["tiny"] = validate(M.Model(name="tiny", generation=1, variants=[variant("f16", 0),
                                                                                    variant("q8", 1)]), [H100])
    m = DeploymentManager(ctl, workloads=None, registry=registry)
    m.store.deployments["chat"] = D.Deployment(spec=D.DeploymentSpec(name="chat", model="tiny", variant="f16",
                                                                     tenant="a", replicas=1), generation=1)
    dropping = asyncio.create_task(registry.update(M.Model(name="tiny", variants=[variant("f16", 0)])))
    await asyncio.wait_for(in_flight.wait(), 30)
    policy = S.ScalingPolicy(max_replicas=2, target=2, variants=["q8"])
    setting = asyncio.create_task(m.scaling.set_scaling("chat", policy, False))
    creating = asyncio.create_task(m.create(D.DeploymentSpec(name="other", model="tiny", tenant="a", replicas=1,
                                                             scaling=policy)))
    gate.set()
    assert (await dropping).generation == 2
    with pytest.raises(errors.InvalidArgument, match=r"policy.variants\[0\]: the model has no variant 'q8'"):
        await setting
    with pytest.raises(errors.InvalidArgument, match=r"spec.scaling.variants\[0\]: the model has no variant 'q8'"):
        await creating
    assert not m.store.deployments["chat"].spec.HasField("scaling") and "other" not in m.store.deployments
