"""meshctl's newer commands against a real local cluster (etcd, the control plane, two simulated hosts' agents),
as subprocesses over real gRPC. No model server runs: the deployment here has 0 replicas.

- `update deployment` with flags and with `-f` (a stale generation is refused, the stored one kept), and the
  list filters `get deployments --model/-l`; `wake deployment` reaches DeploymentService.Wake (refused
  without a scale-to-zero policy, naming why);
- `alloc --anti-affinity` puts two slices with the same label on two nodes (with `--cpu/--host-memory`
  given, which the simulated hosts have room for);
- `get slices -w` prints the slices, then a line for a slice allocated after it started, and ends cleanly
  on SIGTERM;
- `mesh grant` then `get grants` / `mesh grants` list it;
- `update pool` (now beside `update deployment`) still changes a pool and refuses deployment flags.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import yaml

from tests.integration.conftest import wait_for
from tests.integration.serving import register_smollm2
from tests.models_util import smollm2_gguf

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def meshctl(cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "tools.meshctl.main", "--endpoint", cluster.endpoint, *args],
                       capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"meshctl {' '.join(args)} failed ({p.returncode}): {p.stderr}{p.stdout}")
    return p


def test_update_and_wake_deployment(cluster, mesh, tmp_path):
    try:
        smollm2_gguf()
    except Exception as e:  # noqa: BLE001 - the packaged GGUF is what the registry reads
        pytest.skip(f"the SmolLM2 GGUF is not installed: {e}")
    register_smollm2(mesh)
    mesh.deploy("smollm2", name="chat", replicas=0, context=256, labels={"old": "x"})
    try:
        d = json.loads(meshctl(cluster, "update", "deployment", "chat", "--context", "384", "--label", "team=search",
                               "--label", "old-", "-o", "json").stdout)
        assert d["backend"]["context"] == 384 and d["labels"] == {"team": "search"} and d["generation"] == 2
        f = tmp_path / "chat.yaml"
        f.write_text(meshctl(cluster, "get", "deployment", "chat", "-o", "yaml").stdout)
        doc = yaml.safe_load(f.read_text())["items"][0]
        doc["backend"]["concurrency"] = 2
        f.write_text(yaml.safe_dump(doc))
        d = json.loads(meshctl(cluster, "update", "deployment", "-f", str(f), "-o", "json").stdout)
        assert d["backend"]["concurrency"] == 2 and d["generation"] == 3
        p = meshctl(cluster, "update", "deployment", "-f", str(f), check=False)     # generation 2 is stale now
        assert p.returncode == 1 and "generation" in p.stderr.lower()
        assert mesh.get_deployment("chat").generation == 3
        doc["model"] = "other"
        f.write_text(yaml.safe_dump(doc))
        p = meshctl(cluster, "update", "deployment", "-f", str(f), check=False)
        assert p.returncode == 1 and "model" in p.stderr
        names = lambda *a: [x["name"] for x in json.loads(meshctl(cluster, "get", "deployments", *a, "-o", "json")
                                                             .stdout)["items"]]
        assert names("-l", "team=search") == ["chat"] and names("-l", "team=ads") == []
        assert names("--model", "smollm2") == ["chat"] and names("--model", "nope") == []
        p = meshctl(cluster, "wake", "deployment", "chat", check=False)
        assert p.returncode == 1 and "scal" in p.stderr and "zero" in p.stderr
    finally:
        mesh.undeploy("chat")


def test_alloc_anti_affinity_spreads(cluster, mesh):
    docs = [json.loads(meshctl(cluster, "alloc", "--tenant", "team-a", "--memory", "4GiB", "--label", "app=db",
                               "--anti-affinity", "app=db", "--cpu", "250m", "--host-memory", "1GiB",
                               "-o", "json").stdout) for _ in range(2)]
    nodes = {d["slices"][0]["node"] for d in docs}
    assert len(nodes) == 2, docs


def test_get_slices_watch_follows_and_ends_on_sigterm(cluster, mesh):
    w = subprocess.Popen([sys.executable, "-m", "tools.meshctl.main", "--endpoint", cluster.endpoint, "get", "slices",
                          "-w", "--tenant", "team-w", "-o", "json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        seen: list[dict] = []
        alloc = None
        import threading

        def read():
            for line in w.stdout:
                seen.append(json.loads(line))
        t = threading.Thread(target=read, daemon=True)
        t.start()
        # the watch starts after the process does: allocate until one of ours shows up in the stream
        alloc = mesh.allocate(tenant="team-w", mig_profile="1g.10gb")
        sid = alloc.slices[0].id
        wait_for(lambda: any(e["object"]["id"] == sid and e["object"]["state"] == "ready" for e in seen), 60,
                 "the watch to print the new slice READY")
        assert {e["type"] for e in seen} <= {"ADDED", "MODIFIED", "DELETED"}
        w.send_signal(signal.SIGTERM)
        assert w.wait(timeout=30) == 143
        err = w.stderr.read()
        assert "terminated" in err and "Traceback" not in err
    finally:
        if w.poll() is None:
            w.kill()
            w.wait()


def test_grants_are_listed(cluster, mesh):
    meshctl(cluster, "mesh", "grant", "team-g", "team-h")
    try:
        for cmd in (("get", "grants"), ("mesh", "grants")):
            items = json.loads(meshctl(cluster, *cmd, "-o", "json").stdout)["items"]
            assert {"from_tenant": "team-g", "to_tenant": "team-h"}.items() <= next(
                g for g in items if g["from_tenant"] == "team-g").items()
        assert "team-h" in meshctl(cluster, "get", "grants").stdout
    finally:
        meshctl(cluster, "mesh", "grant", "team-g", "team-h", "--revoke")


def test_update_pool_still_works(cluster, mesh):
    meshctl(cluster, "create", "pool", "p-upd", "--max-slices", "4")
    try:
        meshctl(cluster, "update", "pool", "p-upd", "--max-slices", "2")
        doc = json.loads(meshctl(cluster, "describe", "pool", "p-upd", "-o", "json").stdout)
        assert doc["quota"]["max_slices"] == 2
        p = meshctl(cluster, "update", "pool", "p-upd", "--replicas", "3", check=False)
        assert p.returncode == 1 and "--replicas" in p.stderr
    finally:
        meshctl(cluster, "delete", "pool", "p-upd")
