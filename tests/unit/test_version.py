"""`meshctl version` and AdminService.GetVersion: the control plane reports its release, API, runtime, role and
identity to any caller and the etcd members' versions to admins only; meshctl prints them with the agents' and
warns where a minor release differs (a fleet upgraded one host at a time)."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from controlplane.api import auth
from controlplane.api.services import AdminService
from gpumesh.v1 import admin_service_pb2, types_pb2
from mesh import version as release
from tests.unit._meshctl_fake import install, run
from tools.meshctl import main as meshctl


class FakeStore:
    identity = "cp-host-a-1f2e"

    async def member_versions(self):
        return {"http://10.0.0.1:2379": "3.4.23", "http://10.0.0.2:2379": ""}


def _get_version(principal, leading=True):
    svc = AdminService(SimpleNamespace(store=FakeStore()), nodes=None, leading=leading)

    async def call():
        token = auth._current.set(principal)
        try:
            return await svc.GetVersion(admin_service_pb2.GetVersionRequest(), context=None)
        finally:
            auth._current.reset(token)
    return asyncio.run(call())


def test_any_caller_gets_the_release_and_role_and_only_admins_the_etcd_members():
    admin = _get_version(auth.Principal("client", "ops", role="admin"))
    assert (admin.version, admin.api, admin.identity, admin.leader) == (release.VERSION, "gpumesh.v1",
                                                                         "cp-host-a-1f2e", True)
    assert admin.python and admin.grpcio and admin.protobuf
    assert dict(admin.etcd_members) == {"http://10.0.0.1:2379": "3.4.23", "http://10.0.0.2:2379": ""}
    tenant = _get_version(auth.Principal("client", "alice", "team-a", "tenant"), leading=False)
    assert tenant.version == release.VERSION and not tenant.leader and not tenant.etcd_members


class FakeMesh:
    def __init__(self, server_version="", agents=("gpumesh-agent/X", "gpumesh-agent/X", "")):
        self.info = admin_service_pb2.VersionInfo(version=server_version or release.VERSION, api="gpumesh.v1",
                                                  python="3.11.7", grpcio="1.85", protobuf="7.36",
                                                  identity="cp-a", leader=True,
                                                  etcd_members={"http://e0:2379": "3.4.23"})
        self.agents = [a.replace("X", release.VERSION) for a in agents]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def version(self):
        return self.info

    def list_nodes(self, state=None):
        return [types_pb2.Node(name=f"n{i}", agent_version=a) for i, a in enumerate(self.agents)]


def _run(monkeypatch, capsys, mesh, *argv):
    install(monkeypatch, mesh)
    return run(capsys, "version", *argv)


def test_the_table_names_client_server_etcd_and_agents(monkeypatch, capsys):
    rc, out, err = _run(monkeypatch, capsys, FakeMesh())
    assert rc == 0 and "WARNING" not in err
    lines = out.splitlines()
    assert lines[0].startswith(f"Client Version: {release.VERSION} (gpumesh.v1")
    assert lines[1].startswith(f"Server Version: {release.VERSION} (gpumesh.v1") and "leader cp-a" in lines[1]
    assert "etcd http://e0:2379: 3.4.23" in lines
    assert lines[-1] == f"Agents: {release.VERSION} (2 nodes), unknown (1 node)"


def test_json_and_a_warning_for_agents_a_minor_release_apart(monkeypatch, capsys):
    mesh = FakeMesh(agents=("gpumesh-agent/X", "gpumesh-agent/0.0.9"))
    rc, out, err = _run(monkeypatch, capsys, mesh, "-o", "json")
    doc = json.loads(out)
    assert rc == 0 and doc["server"]["role"] == "leader" and doc["etcd"] == {"http://e0:2379": "3.4.23"}
    assert doc["agents"] == {"0.0.9": 1, release.VERSION: 1}
    if release.minor(release.VERSION) != "0.0":
        assert "1 agent(s) run 0.0.9" in err


def test_a_client_a_minor_release_apart_is_warned(monkeypatch, capsys):
    rc, _out, err = _run(monkeypatch, capsys, FakeMesh(server_version="99.0.0"))
    assert rc == 0 and f"meshctl {release.VERSION} and control plane 99.0.0 differ in minor release" in err


def test_client_only_needs_no_control_plane(monkeypatch, capsys):
    def unreachable(*a, **k):
        raise AssertionError("--client must not dial the control plane")
    monkeypatch.setattr("mesh.client.MeshClient", unreachable)
    rc = meshctl.main(["version", "--client", "-o", "yaml"])
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith("client:\n") and "server" not in out


@pytest.mark.parametrize("text,want", [("0.1.0", "0.1"), ("1.2.3+local", "1.2"), ("0+unknown", "0")])
def test_minor(text, want):
    assert release.minor(text) == want
