"""meshctl's read commands over a fake client: `describe model|checkpoint|gpu|connection`, `recommend --slice`
and `-o wide`, the wide tables of migrations and checkpoints, and the examples in the new commands' help.
(The fakes are test_meshctl_commands.py's.)"""

from __future__ import annotations

import json

import pytest
import yaml

from gpumesh.v1 import mesh_service_pb2 as MS
from gpumesh.v1 import migration_service_pb2 as MG
from gpumesh.v1 import types_pb2
from mesh import errors
from tests.unit.test_meshctl_commands import FakeMesh, fake, run  # noqa: F401 (fake: a fixture)
from tools.meshctl import main as meshctl


# -- 7. describe model|checkpoint|gpu|connection -------------------------------------------------------

class DescribeMesh(FakeMesh):
    def get_model(self, name):
        from gpumesh.v1 import model_service_pb2 as MM
        if name != "smollm2-135m":
            raise errors.NotFound(f"model {name!r} not found")
        return MM.Model(name=name, family="llama", variants=[MM.Variant(name="q4_1", backend=MM.BACKEND_LLAMA_CPP)])

    def list_checkpoints(self, workload_id="", tenant=""):
        return [MG.CheckpointInfo(id="c-1", workload_id="w-1", node="n1", path="/ck/c-1", step=7, bytes=3_000_000,
                                  seconds=0.5, mb_per_s=6.0, encrypted=True),
                MG.CheckpointInfo(id="c-2", workload_id="w-2")]

    def list_gpus(self, node=""):
        g = types_pb2.GpuStatus(node=node, gpu=types_pb2.Gpu(index=3, uuid="GPU-3", model="H100-80GB",
                                                              memory_bytes=80 << 30), slices=1)
        return [g]

    def list_slices(self, tenant="", node="", state=None):
        return [types_pb2.Slice(id="s-on3", node=node, gpu_index=3), types_pb2.Slice(id="s-on0", node=node)]

    def list_events(self, **kw):
        self.calls.append(("list_events", kw))
        return []

    def mesh_get(self, id):
        return MS.MeshConnection(id=id, tenant="team-a", transport="shm", slice_a="s-1", slice_b="s-2",
                                 a=MS.BufferDescriptor(slice_id="s-1", node="n1"),
                                 b=MS.BufferDescriptor(slice_id="s-2", node="n2"))


@pytest.fixture
def dfake(monkeypatch):
    m = DescribeMesh()
    monkeypatch.setattr("mesh.client.MeshClient", lambda *a, **k: m)
    return m


def test_describe_model_is_model_describe(dfake, capsys):
    rc, out, err = run(capsys, "describe", "model", "smollm2-135m")
    assert rc == 0, err
    assert out.startswith("Name:") and "Variant q4_1" in out
    rc, out, _ = run(capsys, "describe", "model", "smollm2-135m", "-o", "json")
    assert json.loads(out)["family"] == "llama"
    rc, _, err = run(capsys, "describe", "model", "nope")
    assert rc == 1 and "nope" in err


def test_describe_checkpoint_picks_the_id(dfake, capsys):
    rc, out, err = run(capsys, "describe", "checkpoint", "c-1")
    assert rc == 0, err
    assert "/ck/c-1" in out and "Encrypted:" in out and "w-2" not in out
    rc, out, _ = run(capsys, "describe", "ck", "c-1", "-o", "yaml")
    assert yaml.safe_load(out)["path"] == "/ck/c-1"
    rc, _, err = run(capsys, "describe", "checkpoint", "c-9")
    assert rc == 1 and "no checkpoint 'c-9'" in err


def test_describe_gpu_node_index(dfake, capsys):
    rc, out, err = run(capsys, "describe", "gpu", "sim-node-01/3")
    assert rc == 0, err
    assert "UUID:" in out and "GPU-3" in out and "s-on3" in out and "s-on0" not in out
    # field names in words as describe node|slice word theirs, and one "Slices:" (the count is "Slice count")
    fields = [ln.split(":")[0] for ln in out.split("\n") if ln and not ln.startswith(" ") and ":" in ln]
    assert {"GPU model", "MIG mode", "Memory used", "Temperature", "Node status"} <= set(fields)
    assert not {"Mig", "Uuid", "Node-status", "Temp"} & set(fields) and fields.count("Slices") == 1
    assert dict(dfake.calls)["list_events"]["name"] == "sim-node-01/3"
    rc, out, _ = run(capsys, "describe", "gpu", "sim-node-01/3", "-o", "json")
    assert [s["id"] for s in json.loads(out)["slice_list"]] == ["s-on3"]
    rc, _, err = run(capsys, "describe", "gpu", "sim-node-01")
    assert rc == 1 and "NODE/INDEX" in err
    rc, _, err = run(capsys, "describe", "gpu", "sim-node-01/5")
    assert rc == 1 and "no gpu 5" in err


def test_describe_connection(dfake, capsys):
    rc, out, err = run(capsys, "describe", "connection", "m-1")
    assert rc == 0, err
    assert "Transport:" in out and "Side A (slice s-1)" in out and "Side B (slice s-2)" in out
    rc, _, err = run(capsys, "describe", "thing", "x")
    assert rc == 1 and "checkpoint, gpu, connection" in err


# -- 8. recommend --slice, -o wide ---------------------------------------------------------------------

def test_recommend_slice_and_wide(fake, capsys):
    from gpumesh.v1 import cost_service_pb2 as C
    asked = []

    def recommend(**kw):
        asked.append(kw)
        return C.RecommendResponse(recommendations=[C.Recommendation(
            kind="resize", slice_id="s-1", replica="r-1", node="n1", action="shrink", target="1g.10gb",
            saving_per_day=1.5, risk="low")], saving_per_day=1.5)
    fake.recommend = recommend
    rc, out, err = run(capsys, "recommend", "--slice", "s-1", "-o", "wide")
    assert rc == 0, err
    assert asked[0]["slice_id"] == "s-1"
    head = out.split("\n")[0].split()
    assert head[-3:] == ["REPLICA", "NODE", "TARGET"] and "1g.10gb" in out


def test_get_migrations_and_checkpoints_wide(capsys):
    from tools.meshctl import migrate
    m = MG.Migration(id="m-1", workload_id="w-1", phase=MG.MIGRATION_PHASE_DONE, mode=MG.MIGRATION_MODE_PRECOPY,
                     bytes_sent=5_000_000, downtime_ms=12, total_ms=900, reason="drain")
    narrow = migrate.format_migrations([m], "table")
    wide = migrate.format_migrations([m], "wide")
    assert "DOWNTIME" not in narrow and "DOWNTIME" in wide and "12ms" in wide and "5.0MB" in wide
    c = MG.CheckpointInfo(id="c-1", workload_id="w-1", node="n1", bytes=2_000_000, mb_per_s=4.0)
    assert "NODE" not in migrate.format_checkpoints([c], "table").split("\n")[0]
    assert "4.0" in migrate.format_checkpoints([c], "wide")


NEW_COMMANDS = [["update"], ["wake"], ["mesh", "grants"], ["get"], ["describe"], ["alloc"], ["stop"], ["recommend"]]


@pytest.mark.parametrize("path", NEW_COMMANDS, ids=" ".join)
def test_help_has_examples(path):
    p = meshctl.build_parser()
    for name in path:
        p = next(a for a in p._actions if a.__class__.__name__ == "_SubParsersAction").choices[name]
    assert "examples:" in p.format_help() and "meshctl " + " ".join(path) in p.format_help()
