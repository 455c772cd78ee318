"""A real local cluster for the integration tests: embedded etcd, the control
plane process and two agent processes over simulated GPU hosts."""

from __future__ import annotations

import contextlib
import os
import json
import time
from collections.abc import Iterator

import pytest

from tools.localcluster import LocalCluster

LEASE_TTL = 3

HOSTS = [
    {"node": "gpu-a", "gpus": [{"model": "H100-80GB", "count": 1, "mig": True}]},
    {"node": "gpu-b", "gpus": [{"model": "A100-40GB", "count": 2, "mig": True},
                               {"model": "L4", "count": 1, "mig": False}],
     "nvlink_domains": [[0, 1]]},
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(tmp_path_factory.mktemp("cluster"), HOSTS, lease_ttl=LEASE_TTL, agents_per_process=1)
    c.start(timeout=90)
    yield c
    c.stop()


@pytest.fixture
def mesh(cluster):
    """A client; every slice left at the end of the test is released."""
    cluster.wait_ready(timeout=60)
    with cluster.client(timeout=30) as client:
        yield client
        release_all(client)
        wait_for(lambda: not client.list_slices(), 30, "slices to be released")


@contextlib.contextmanager
def workload_cluster(path, hosts: list[dict], **kwargs) -> Iterator[LocalCluster]:
    """A cluster whose tests run workloads: a LocalCluster of `hosts` in `path` (3 s leases, one agent per process;
    `kwargs` go to LocalCluster) started within 90 s; at the end every workload still pending or running is
    stopped (no process outlives the cluster), then the cluster."""
    c = LocalCluster(path, hosts, lease_ttl=LEASE_TTL, agents_per_process=1, **kwargs)
    c.start(timeout=90)
    try:
        yield c
    finally:
        with c.client() as client:
            stop_running(client)
        c.stop()


@contextlib.contextmanager
def client_for_test(cluster, stop_workloads: bool = False):
    """A client for one test, once every node is Ready; at the end of the test (every running workload stopped
    first when `stop_workloads`) every slice left is released."""
    cluster.wait_ready(timeout=30)
    with cluster.client(timeout=30) as client:
        yield client
        if stop_workloads:
            stop_running(client)
        release_all(client)


def release_all(client) -> None:
    """Release every slice (best effort: a test's leftovers)."""
    for s in client.list_slices():
        try:
            client.release(s.id)
        except Exception:
            pass


def stop_running(client) -> None:
    """Stop every pending or running workload (best effort)."""
    from gpumesh.v1 import types_pb2
    for w in client.list_workloads():
        if w.state in (types_pb2.WORKLOAD_STATE_RUNNING, types_pb2.WORKLOAD_STATE_PENDING):
            try:
                client.stop_workload(w.id)
            except Exception:
                pass


def json_lines(client, wid: str) -> list[dict]:
    """The JSON lines a workload printed, in order."""
    text = b"".join(client.workload_logs(wid)).decode(errors="replace")
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


# A wait's timeout only bounds how long a failing test takes to fail; a loaded machine (CI's two cores, or
# several suites at once) can be many times slower than the figures the tests were written with.
WAIT_SCALE = float(os.environ.get("GPUMESH_TEST_WAIT_SCALE", "3"))


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    """`predicate()`'s first truthy value, polled every `interval` seconds; AssertionError naming `what` after
    `timeout` (times WAIT_SCALE) seconds.

    Read through it, never once, whatever is written after the call that caused it returns: durable events (the
    recorder writes them in batches after the change: `list_events`, `meshctl get events`, `describe`); a node's
    events that follow an etcd write (GpuRecovered, GpuUnhealthy after the health change); the gateway's view
    (`/v1/gpu/status`, `/policies`, `/models`: it learns by watching); a standby's reads (it follows etcd); the
    forecast history (`forecast series`: flushed periodically); whatever a background loop computes (cost
    accounting, autoscaler, orchestrator) or another process writes (agent logs and files, a backend's
    /metrics counting a request out after its response). A fixed sleep is no substitute: wait for the
    condition itself, with a timeout that only bounds how long a failure takes."""
    timeout *= WAIT_SCALE
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
