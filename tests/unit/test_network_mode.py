"""A workload's network mode (mesh/netmode.py): the label `gpumesh.io/network` and the agent option
`workload_network` are checked where they enter (API, config), and the agent's plan puts a network
namespace in the spec exactly when the mode is `none`."""

from __future__ import annotations

import os

import pytest

from controlplane.controllers.workloads import validate_run
from gpumesh.v1 import types_pb2, workload_service_pb2
from mesh import errors, netmode, slicespec
from mesh.config import ConfigError, validate
from nodeagent.isolation.plan import IsolationRefused
from nodeagent.isolation.probe import HostFeatures
from tests.unit.test_isolation_units import FakeCgroups, _isolator, root_only

LABEL = "gpumesh.io/network"
FULL_NET = HostFeatures(setuid=True, no_new_privs=True, namespaces=["mount", "ipc", "pid", "net"], cgroup_version=1,
                        cgroup_controllers=["memory", "cpu", "pids", "devices"], seccomp=True)


def _run(labels: dict, backend: bool = False) -> workload_service_pb2.RunWorkloadRequest:
    req = workload_service_pb2.RunWorkloadRequest(slice_id="s-1", labels=labels)
    if backend:
        req.backend.kind, req.backend.artifact = "llama.cpp", "/models/m.gguf"
    else:
        req.command.append("true")
    return req


def test_the_run_request_accepts_host_and_none_and_refuses_anything_else_naming_the_label():
    validate_run(_run({LABEL: "host"}))
    validate_run(_run({LABEL: "none"}))
    validate_run(_run({LABEL: "isolated"}))
    validate_run(_run({}))
    with pytest.raises(errors.InvalidArgument) as e:
        validate_run(_run({LABEL: "bridge"}))
    assert e.value.field == f"labels[{LABEL}]" and "'bridge' is not a network mode" in str(e.value)
    assert "host" in e.value.allowed and "none" in e.value.allowed
    with pytest.raises(errors.InvalidArgument, match="criu"):       # criu workloads run without namespaces
        validate_run(_run({LABEL: "none", "gpumesh.io/isolation": "criu"}))
    validate_run(_run({LABEL: "host", "gpumesh.io/isolation": "criu"}))


def test_a_model_server_is_refused_network_none_at_the_api():
    validate_run(_run({LABEL: "host"}, backend=True))
    for mode in ("none", "isolated"):
        with pytest.raises(errors.InvalidArgument, match="model server") as e:
            validate_run(_run({LABEL: mode}, backend=True))
        assert e.value.field == f"labels[{LABEL}]"
    with pytest.raises(errors.InvalidArgument, match="spec.labels"):      # a deployment's labels (deployspec)
        netmode.check_model_server({LABEL: "none"}, "spec.labels")


def test_a_slice_label_is_checked_at_allocation():
    ok = types_pb2.SliceSpec(tenant="t", memory_bytes=1 << 30, labels={LABEL: "none"})
    assert slicespec.validate(ok).labels[LABEL] == "none"
    with pytest.raises(errors.InvalidArgument) as e:
        slicespec.validate(types_pb2.SliceSpec(tenant="t", memory_bytes=1 << 30, labels={LABEL: "off"}))
    assert e.value.field == f"spec.labels[{LABEL}]"


def test_the_agent_option_is_validated_and_defaults_to_host():
    from nodeagent.config import AgentConfig
    assert AgentConfig().workload_network == "host"
    for mode in ("none", "isolated"):
        validate(AgentConfig(gpu_backend="sim", sim_host_file=["x.yaml"], insecure=True, workload_network=mode))
    with pytest.raises(ConfigError, match="workload_network: 'bridge' is not allowed"):
        validate(AgentConfig(gpu_backend="sim", sim_host_file=["x.yaml"], insecure=True, workload_network="bridge"))
    for bad in ("10.0.0.0/16", "10.0.0.1/24", "fd00::/64", "x"):
        with pytest.raises(ConfigError, match="workload_bridge_cidr"):
            validate(AgentConfig(gpu_backend="sim", sim_host_file=["x.yaml"], insecure=True, workload_bridge_cidr=bad))


def test_the_mode_comes_from_the_workload_then_the_slice_then_the_agent():
    r = netmode.resolve
    assert r({}, {}, "host", model_server=False) == "host"
    assert r({}, {}, "none", model_server=False) == "none"
    assert r({}, {LABEL: "none"}, "host", model_server=False) == "none"
    assert r({LABEL: "host"}, {LABEL: "none"}, "none", model_server=False) == "host"
    assert r({LABEL: "none"}, {}, "none", model_server=True) == "host"               # model servers: host
    assert r({"gpumesh.io/isolation": "criu"}, {LABEL: "none"}, "none", model_server=False) == "host"


def _slice(**labels):
    return types_pb2.Slice(id="s-1", tenant="ta", host_memory_bytes=1 << 30, cpu_milli=2000, labels=labels)


def _plan(iso, tmp_path, w, s=None):
    return iso.plan(w, s or _slice(), gpu_index=0, gi_id=0, ci_id=0, workdir=str(tmp_path / "w"))


def _w(backend: bool = False, **labels):
    w = types_pb2.Workload(id="w-1", slice_id="s-1", tenant="ta", command=["true"], labels=labels)
    if backend:
        w.backend.kind, w.backend.artifact = "llama.cpp", "/nonexistent/m.gguf"
    return w


@root_only
def test_the_plan_has_a_network_namespace_only_in_mode_none(tmp_path):
    iso = _isolator(tmp_path, features=FULL_NET, cgroups=FakeCgroups())
    assert "net" not in _plan(iso, tmp_path, _w()).spec["namespaces"]                  # default host
    assert "net" not in _plan(iso, tmp_path, _w(**{LABEL: "host"})).spec["namespaces"]
    spec = _plan(iso, tmp_path, _w(**{LABEL: "none"})).spec
    assert spec["namespaces"][-1] == "net" and {"pid", "mount", "ipc"} <= set(spec["namespaces"])
    assert "net" in _plan(iso, tmp_path, _w(), _slice(**{LABEL: "none"})).spec["namespaces"]
    iso.settings.network = "none"                                                        # the agent's default
    assert "net" in _plan(iso, tmp_path, _w()).spec["namespaces"]
    assert "net" not in _plan(iso, tmp_path, _w(backend=True)).spec["namespaces"]       # a model server
    assert "net" not in _plan(iso, tmp_path, _w(**{"gpumesh.deployment": "d1"})).spec["namespaces"]
    assert _plan(iso, tmp_path, _w(**{"gpumesh.io/isolation": "criu"})).spec["namespaces"] == []
    with pytest.raises(IsolationRefused, match="criu"):
        _plan(iso, tmp_path, _w(**{LABEL: "none", "gpumesh.io/isolation": "criu"}))
    with pytest.raises(IsolationRefused, match="'bridge' is not allowed"):      # an agent older than the API
        _plan(iso, tmp_path, _w(**{LABEL: "bridge"}))


class FakeBridge:
    def __init__(self, problem=""):
        self._problem = problem

    def problem(self):
        return self._problem


@root_only
def test_an_isolated_plan_asks_the_init_to_wait_for_its_interface_and_needs_a_bridge(tmp_path):
    iso = _isolator(tmp_path, features=FULL_NET, cgroups=FakeCgroups())
    with pytest.raises(IsolationRefused, match="no workload bridge"):
        _plan(iso, tmp_path, _w(**{LABEL: "isolated"}))
    iso.bridge = FakeBridge("nft not found")
    with pytest.raises(IsolationRefused, match="nft not found"):
        _plan(iso, tmp_path, _w(**{LABEL: "isolated"}))
    iso.bridge = FakeBridge()
    spec = _plan(iso, tmp_path, _w(**{LABEL: "isolated"})).spec
    assert spec["network"] == "isolated" and spec["namespaces"][-1] == "net"
    assert _plan(iso, tmp_path, _w(**{LABEL: "none"})).spec["network"] == "none"
    assert _plan(iso, tmp_path, _w()).spec["network"] == "host"


@root_only
def test_mode_none_is_refused_where_the_kernel_makes_no_network_namespace(tmp_path):
    no_net = HostFeatures(**{**FULL_NET.summary(), "namespaces": ["mount", "ipc", "pid"]})
    iso = _isolator(tmp_path, features=no_net, mode="permissive", cgroups=FakeCgroups())
    with pytest.raises(IsolationRefused, match="cannot make network namespaces"):      # even when permissive
        _plan(iso, tmp_path, _w(**{LABEL: "none"}))
    assert "net" not in _plan(iso, tmp_path, _w()).spec["namespaces"]


@pytest.mark.skipif(os.geteuid() != 0, reason="unshare(CLONE_NEWNET) needs root")
def test_the_probe_finds_network_namespaces_on_this_host():
    from nodeagent.isolation.probe import CLONE_NEWNET, _try_unshare
    assert _try_unshare(CLONE_NEWNET)


def test_meshctl_run_network_sets_the_label_and_refuses_other_values(monkeypatch, capsys):
    from tools.meshctl import main as meshctl
    seen: dict = {}

    class Fake:
        timeout = 5.0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def close(self):
            pass

        def run_workload(self, slice_id, command=None, env=None, labels=None, **kw):
            seen.update(slice=slice_id, labels=dict(labels or {}))
            return types_pb2.Workload(id="w-1", slice_id=slice_id, state=types_pb2.WORKLOAD_STATE_RUNNING,
                                      labels=labels)
    monkeypatch.setattr("mesh.client.MeshClient", lambda *a, **k: Fake())
    rc = meshctl.main(["--endpoint", "127.0.0.1:1", "run", "--slice", "s-1", "--network", "none", "--label",
                       "job=a", "--", "true"])
    assert rc == 0 and seen["labels"] == {LABEL: "none", "job": "a"}, capsys.readouterr()
    with pytest.raises(SystemExit):
        meshctl.main(["--endpoint", "127.0.0.1:1", "run", "--slice", "s-1", "--network", "bridge", "--", "true"])
    assert "invalid choice: 'bridge'" in capsys.readouterr().err
    out = _run_help()
    assert "gpumesh.io/network=host|none|isolated" in out and "--network {host,none,isolated}" in out


def _run_help() -> str:
    import contextlib
    import io
    from tools.meshctl import main as meshctl
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        meshctl.main(["run", "--help"])
    return buf.getvalue()


def test_describe_workload_shows_the_network_and_the_address():
    from mesh.client import workload_to_dict
    from tools.meshctl.workloads import format_workload
    w = types_pb2.Workload(id="w-1", slice_id="s-1", command=["x"], labels={LABEL: "isolated"},
                           network_address="10.213.0.2")
    d = workload_to_dict(w)
    assert d["network_address"] == "10.213.0.2"
    text = format_workload(d)
    assert "isolated" in text and "10.213.0.2" in text
    plain = format_workload(workload_to_dict(types_pb2.Workload(id="w-2", command=["x"])))
    assert "Address:   <none>" in plain and "10.213" not in plain
