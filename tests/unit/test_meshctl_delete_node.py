"""`meshctl delete node NAME [-o json|yaml]` over a fake SDK: what it prints, what reaches the API, the refusal."""

from __future__ import annotations

import json

import pytest
import yaml

from gpumesh.v1 import admin_service_pb2
from gpumesh.v1 import types_pb2 as T
from mesh import errors
from tools.meshctl import main as meshctl

B = "node-b"


class FakeMesh:
    """The SDK's delete_node, answering what the server would."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def close(self):
        pass

    def delete_node(self, name):
        self.asked.append(name)
        if name == "ready-node":
            raise errors.FailedPrecondition("node ready-node is READY (its agent holds its lease): drain it and stop "
                                            "its agent first")
        return admin_service_pb2.DeleteNodeResponse(
            node=T.Node(name=name, state=T.NODE_STATE_NOT_READY, deleting=True), slices=["s-1", "s-2"],
            allocations=["a-1"], workloads=["w-1"], replicas=["chat/r-1"])


def test_meshctl_delete_node_prints_what_was_ended(monkeypatch, capsys):
    fake = FakeMesh()
    monkeypatch.setattr("mesh.client.MeshClient", lambda *a, **k: fake)

    def run(*argv):
        rc = meshctl.main(["--endpoint", "127.0.0.1:1", *argv])
        o = capsys.readouterr()
        return rc, o.out, o.err
    rc, out, err = run("delete", "node", B)
    assert rc == 0, err
    assert out.splitlines() == ["1 allocation(s) released: allocation/a-1", "2 slice(s) deleted: slice/s-1 slice/s-2",
                                "1 workload(s) failed: workload/w-1",
                                "1 replica(s) being replaced elsewhere: replica/chat/r-1", f"node/{B} deleted"]
    rc, out, _ = run("delete", "node", B, "-o", "json")
    doc = json.loads(out)
    assert doc["node"]["deleting"] and doc["slices"] == ["s-1", "s-2"] and doc["migrations"] == []
    rc, out, _ = run("delete", "node", B, "-o", "yaml")
    assert yaml.safe_load(out)["replicas"] == ["chat/r-1"]
    rc, out, err = run("delete", "node", "ready-node")
    assert rc != 0 and "drain it and stop its agent first" in err
    with pytest.raises(SystemExit):
        run("delete", "gadget", B)
    assert "choose from 'pool', 'node'" in capsys.readouterr().err and fake.asked == [B, B, B, "ready-node"]


def test_a_node_being_deleted_reads_notready_deleting():
    from mesh.client import node_to_dict
    from tools.meshctl.output import node_status
    doc = node_to_dict(T.Node(name=B, state=T.NODE_STATE_NOT_READY, deleting=True, message="being deleted"))
    assert doc["deleting"] and node_status(doc) == "NotReady,Deleting"
    assert node_status(node_to_dict(T.Node(name=B, state=T.NODE_STATE_READY))) == "Ready"
