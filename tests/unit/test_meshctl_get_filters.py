"""`meshctl get` over a fake client: a filter flag a kind does not take is refused naming the flag and the kinds
it filters (never silently ignored: `get replicas --node n1` listing every node's replicas reads as an answer),
and a NAME that matches nothing is an error on stderr with exit status 1, the ones found still printed
(as `kubectl get` answers NotFound)."""

from __future__ import annotations

import json

import pytest

from gpumesh.v1 import deployment_service_pb2 as D
from gpumesh.v1 import pool_service_pb2 as P
from gpumesh.v1 import types_pb2
from tests.unit._meshctl_fake import install, run


class FakeMesh:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def list_nodes(self, state=None):
        self.calls.append("list_nodes")
        return [types_pb2.Node(name="n1"), types_pb2.Node(name="n2")]

    def list_slices(self, tenant="", node="", state=None):
        self.calls.append("list_slices")
        return [types_pb2.Slice(id="s-1", allocation_id="a-1", tenant="team-a", node="n1")]

    def list_deployments(self, tenant="", model="", labels=None):
        self.calls.append("list_deployments")
        return [D.Deployment(spec=D.DeploymentSpec(name="chat", model="m", tenant="team-a"))]

    def list_pools(self):
        self.calls.append("list_pools")
        return [P.Pool(name="inference-a")]

    def list_models(self, family="", labels=None):
        self.calls.append("list_models")
        return []

    def mesh_list(self, tenant="", slice_id=""):
        self.calls.append("mesh_list")
        return []


@pytest.fixture
def fake(monkeypatch):
    return install(monkeypatch, FakeMesh())


@pytest.mark.parametrize("argv, needle", [
    (["get", "replicas", "--node", "n1"], "--node applies to gpus, slices, workloads, events, not replicas"),
    (["get", "deployments", "--state", "ready"], "--state applies to nodes, slices, not deployments"),
    (["get", "models", "--tenant", "team-a"], "--tenant applies to slices, workloads, deployments"),
    (["get", "pools", "--node", "n1"], "--node applies to"),
    (["get", "policies", "--node", "n1"], "--node applies to"),
    (["get", "events", "--slice", "s-1"], "--slice applies to workloads, connections, not events"),
    (["get", "models", "--slice", "s-1"], "--slice applies to"),
    (["get", "checkpoints", "--state", "ready"], "--state applies to"),
    (["get", "nodes", "--tenant", "team-a"], "--tenant applies to"),
    (["get", "gpus", "--state", "ready"], "--state applies to nodes, slices, not gpus"),
])
def test_a_filter_the_kind_does_not_take_is_refused(fake, capsys, argv, needle):
    rc, out, err = run(capsys, *argv)
    assert rc == 1 and needle in err and out == ""
    assert fake.calls == []                        # refused before asking the control plane


def test_servingview_keeps_its_own_explanation(fake, capsys):
    rc, _, err = run(capsys, "get", "servingview", "--tenant", "team-a")
    assert rc == 1 and "--tenant does not filter servingview" in err


@pytest.mark.parametrize("argv, needle", [
    (["get", "deployments", "nosuch"], "error: no deployment 'nosuch'"),
    (["get", "replicas", "nosuch"], "error: no deployment 'nosuch'"),
    (["get", "nodes", "nosuch"], "error: no node 'nosuch'"),
    (["get", "slices", "s-nosuch"], "error: no slice or allocation 's-nosuch'"),
    (["get", "pools", "nosuch"], "error: no pool 'nosuch'"),
    (["get", "models", "nosuch"], "error: no model 'nosuch'"),
    (["get", "connections", "m-nosuch"], "error: no mesh connection 'm-nosuch'"),
])
def test_a_name_that_matches_nothing_is_an_error(fake, capsys, argv, needle):
    rc, _, err = run(capsys, *argv)
    assert rc == 1 and needle in err


def test_the_names_found_are_printed_and_the_missing_named(fake, capsys):
    rc, out, err = run(capsys, "get", "nodes", "n1", "nosuch", "-o", "json")
    assert rc == 1
    assert [n["name"] for n in json.loads(out)["items"]] == ["n1"]
    assert err.strip() == "error: no node 'nosuch'"
    rc, out, err = run(capsys, "get", "slices", "a-1")          # an allocation ID names its slices
    assert rc == 0 and "s-1" in out and err == ""
    rc, out, err = run(capsys, "get", "deployments", "chat")
    assert rc == 0 and "chat" in out and err == ""


def test_empty_lists_say_so_in_the_same_words(fake, capsys):
    assert run(capsys, "get", "connections")[1] == "No connections found.\n"
    assert run(capsys, "get", "pools", "-o", "table")[1] != "No pools found.\n"       # one pool: a table
    fake.list_pools = lambda: []
    assert run(capsys, "get", "pools")[1] == "No pools found.\n"
    assert json.loads(run(capsys, "get", "connections", "-o", "json")[1]) == {"items": []}


@pytest.mark.parametrize("argv, needle", [
    (["logs", "w-1", "-o", "json"], "-o json: logs prints the workload's output"),
    (["logs", "w-1", "-o", "wide"], "-o wide: logs prints"),
    (["top", "--once", "-o", "yaml"], "-o yaml: top prints terminal frames"),
])
def test_text_commands_refuse_a_format_they_cannot_print(fake, capsys, argv, needle):
    """`logs` and `top` printed their text for -o json|yaml|wide as if asked for nothing."""
    rc, out, err = run(capsys, *argv)
    assert rc == 1 and needle in err and "allowed: table" in err and out == ""
    assert fake.calls == []
