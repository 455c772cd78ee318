"""A workload's environment (the tenant's `env` in Run) is the workload's only: the agent's supervisor
(nodeagent/shim.py) and the workload's init (nodeagent/isolation/confine.py) run as root before the uid
switch and must not run with it. Before, both got it: `PYTHONPATH` naming a directory the tenant wrote (its
earlier workload's own directory) made the root shim import the tenant's `argparse.py`, and `LD_PRELOAD`
would load the tenant's library into both: root code execution on the host. The workload still gets its
whole environment."""

from __future__ import annotations

import os
import signal
import time
import types

import pytest

from gpumesh.v1 import node_service_pb2
from gpumesh.v1 import types_pb2 as t
from nodeagent import workloads as wl
from nodeagent.isolation.devices import NvidiaDevices
from nodeagent.isolation.plan import Isolator, IsolationSettings
from nodeagent.isolation.probe import HostFeatures
from nodeagent.isolation.users import TenantUsers

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="a confined workload switches to a tenant's uid: root")
PLANTED = """import os
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "ran-as-%d" % os.geteuid()), "w"):
    pass
raise SystemExit("planted module imported")
"""


def _runner(tmp_path, isolator=None):
    a = types.SimpleNamespace(node="n1", desired={}, handlers={}, session_hooks=[], teardown_hooks=[],
                              claim_hooks=[], gpus=types.SimpleNamespace(nvml=object()), slicer=object())
    a.realized = {"s-1": node_service_pb2.SliceStatus(slice_id="s-1", state=t.SLICE_STATE_READY, device_uuid="GPU-x")}
    return wl.WorkloadRunner(a, str(tmp_path / "w"), isolator=isolator)


def _planted(tmp_path):
    d = tmp_path / "tenant-wrote-this"
    d.mkdir()
    for name in ("argparse.py", "json.py", "subprocess.py", "sitecustomize.py"):
        (d / name).write_text(PLANTED)
    os.chmod(d, 0o755)
    return d


def _run(r, env, command):
    w = r.start(t.Workload(id="w-1", slice_id="s-1", tenant="ta", command=command, env=env))
    try:
        deadline = time.monotonic() + 60
        while r.workloads["w-1"].state == t.WORKLOAD_STATE_RUNNING:
            assert time.monotonic() < deadline, "the workload did not end"
            r.check_all(report=False)
            time.sleep(0.02)
        return r.workloads["w-1"], open(r.path("w-1", "log"), "rb").read().decode(errors="replace")
    finally:
        if r.meta.get("w-1", {}).get("shim_pid") and w.state == t.WORKLOAD_STATE_RUNNING:
            try:
                os.killpg(r.meta["w-1"]["shim_pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_the_supervisor_never_runs_with_the_workloads_python_path(tmp_path):
    d = _planted(tmp_path)
    w, out = _run(_runner(tmp_path), {"PYTHONPATH": str(d), "MARK": "mine"}, ["sh", "-c", "echo $MARK $PYTHONPATH"])
    assert not [f for f in os.listdir(d) if f.startswith("ran-as")], out
    assert w.state == t.WORKLOAD_STATE_SUCCEEDED and f"mine {d}" in out      # the workload has its environment


@root_only
def test_a_confined_workloads_environment_reaches_neither_the_root_shim_nor_its_init(tmp_path):
    iso = Isolator(IsolationSettings(mode="permissive", seccomp=False, shm_root=str(tmp_path / "shm")),
                   HostFeatures(setuid=True, no_new_privs=True),
                   TenantUsers((310000, 310010), {}, str(tmp_path / "ids.json")),
                   None, NvidiaDevices(str(tmp_path), str(tmp_path / "mig-minors")), node="n1", scope=str(tmp_path))
    d = _planted(tmp_path)
    w, out = _run(_runner(tmp_path, iso), {"PYTHONPATH": str(d), "MARK": "mine"},
                  ["sh", "-c", "echo $MARK $(id -u)"])
    assert not [f for f in os.listdir(d) if f.startswith("ran-as")], out
    assert w.state == t.WORKLOAD_STATE_SUCCEEDED and "mine 310" in out, out
