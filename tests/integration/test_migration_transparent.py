"""Transparent (CRIU) migration of a process that does not use the SDK, end to end.

etcd, the control plane and two agent processes (one node each); the workload is a plain Python
loop that counts in memory and prints its counter with a token drawn at start. After
`migrate --mode transparent` to the other node the same counter goes on (no restart: the token
is the same, no number is missing or repeated), the source's copy is gone and the workload
record names the target, and the target's runner records its exit status; after a control-plane
crash around the commit (rollback to the source, or finish) the runner that adopted it stops it.

Needs a working CRIU 4.x (`criu` on PATH, `criu check` passing, root); skips with the reason
otherwise, and fails instead under GPUMESH_REQUIRE_CRIU=1 (CI; tests/criu_gate.py). Both agents run on this host, so CRIU restores the process under its PID on the
"other" node: the dump killed the source's copy, so the PID is free.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

from gpumesh.v1 import migration_service_pb2 as M
from gpumesh.v1 import types_pb2 as t
from mesh import errors
from mesh.migrationapi import migration_phase
from tests import criu_gate
from tests.integration.conftest import client_for_test, json_lines, wait_for, workload_cluster

pytestmark = pytest.mark.integration
HOSTS = [{"node": "tp-a", "gpus": [{"model": "H100-80GB", "count": 1, "mig": True}]},
         {"node": "tp-b", "gpus": [{"model": "H100-80GB", "count": 1, "mig": True}]}]
MARKER = f"gpumesh-transparent-counter-{os.getpid()}"     # this run's: two runs at once never count each other's
COUNTER = ("import json, os, sys, time\n"
           "token = os.urandom(8).hex()\n"
           "n = 0\n"
           "while True:\n"
           "    if len(sys.argv) > 2 and os.path.exists(sys.argv[2]):\n"
           "        sys.exit(7)\n"
           "    n += 1\n"
           "    print(json.dumps({'n': n, 'token': token, 'pid': os.getpid()}), flush=True)\n"
           "    time.sleep(0.05)\n")


WHY_NOT = criu_gate.why_not()
needs_criu = criu_gate.needs_criu   # skips without CRIU; fails under GPUMESH_REQUIRE_CRIU=1 (CI)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("tmig")
    with workload_cluster(d, HOSTS, agent_args=["--workload-stop-grace-seconds", "2"]) as c:
        yield c


@pytest.fixture
def mesh(cluster):
    with client_for_test(cluster) as client:
        yield client


counts = json_lines


def last(mesh, wid) -> int:
    return max((d["n"] for d in counts(mesh, wid)), default=0)


def copies() -> list[int]:
    """Live processes running the counter (not zombies)."""
    pids = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{p}/stat") as f:
                state = f.read().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if MARKER.encode() in cmd and b"shim.py" not in cmd and state != "Z":
            pids.append(int(p))
    return pids


def parent_cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        ppid = int(f.read().rsplit(")", 1)[-1].split()[1])
    with open(f"/proc/{ppid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode()


# The workload runs as tenant tp's unprivileged uid: a Python that uid may execute (the test's own
# may live in root's home), and the label that keeps it CRIU-dumpable (no PID/mount namespaces;
# docs/operations.md, "Workload isolation").
COUNTER_PY = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
CRIU_LABELS = {"gpumesh.io/isolation": "criu"}


def start_counter(mesh, quit_file: str = ""):
    s = mesh.allocate(tenant="tp", mig_profile="1g.10gb").slices[0]
    w = mesh.run_workload(s.id, [COUNTER_PY, "-c", COUNTER, MARKER] + ([quit_file] if quit_file else []),
                          labels=CRIU_LABELS)
    assert w.state == t.WORKLOAD_STATE_RUNNING
    wait_for(lambda: last(mesh, w.id) >= 20, 60, "the counter to reach 20")
    return s, mesh.get_workload(w.id)


@needs_criu
def test_transparent_migration_continues_the_process_from_its_memory(mesh, tmp_path):
    quit_dir = tempfile.mkdtemp(prefix="gpumesh-tp-", dir="/var/tmp")    # where the tenant's uid can look
    os.chmod(quit_dir, 0o755)
    quit_file = Path(quit_dir) / "quit"
    src_slice, w = start_counter(mesh, str(quit_file))
    assert copies() == [w.pid]
    m = mesh.wait_migration(mesh.migrate(w.id, mode="transparent").id, timeout=180)
    assert migration_phase(m) == "done", m.message
    assert m.mode == M.MIGRATION_MODE_TRANSPARENT
    moved = mesh.get_workload(w.id)
    assert moved.state == t.WORKLOAD_STATE_RUNNING, moved.message
    assert moved.node == m.target_node != w.node and moved.slice_id == m.target_slice != src_slice.id
    at_commit = last(mesh, w.id)
    wait_for(lambda: last(mesh, w.id) >= at_commit + 20, 60, "the restored counter to go on")
    # one copy, the restored one, followed by a shim of the target's runner
    assert copies() == [w.pid], "CRIU restores the same PID; exactly one copy runs"
    assert "--restore-pidfile" in parent_cmdline(w.pid)
    # the counter went on from its in-memory state: the same token, every number once, in order
    out = counts(mesh, w.id)
    assert {d["token"] for d in out} == {out[0]["token"]}, "the process was restarted, not restored"
    assert [d["n"] for d in out] == list(range(1, len(out) + 1))
    assert out[-1]["n"] > at_commit >= 20
    assert any(x.id == m.id for x in mesh.list_migrations(workload_id=w.id))
    # the target's runner follows the adopted process: its own exit status
    quit_file.write_text("")
    ended = wait_for(lambda: (x := mesh.get_workload(w.id)).state != t.WORKLOAD_STATE_RUNNING and x, 60,
                     "the restored process to exit")
    assert ended.state == t.WORKLOAD_STATE_FAILED and ended.exit_code == 7, ended.message
    assert ended.node == m.target_node and not copies()


@needs_criu
@pytest.mark.parametrize("phase", ["paused", "committed"])
def test_control_plane_killed_during_a_transparent_migration(cluster, mesh, phase):
    """kill -9 of the control plane with the migration held after the dump: in PAUSED (the target
    restored and holds, stopped) it rolls back: the target copy is killed and the source is
    restored from its images on its own node; in COMMITTED it finishes on the target. Either
    way one copy runs on, from its memory."""
    cluster.controlplane_args = ["--migration-pause-at", phase]
    cluster.restart_controlplane(timeout=60)
    try:
        _, w = start_counter(mesh)
        m = mesh.migrate(w.id, mode="transparent")
        wait_for(lambda: migration_phase(mesh.get_migration(m.id)) == phase, 60, f"phase {phase}")
        wait_for(lambda: w.pid in copies() and "--restore-pidfile" in parent_cmdline(w.pid), 60,
                 "the target to restore the process (held stopped)")
        held = last(mesh, w.id)
        cluster.controlplane_args = []
        cluster.restart_controlplane(kill=True, timeout=60)
        m = wait_for(lambda: (x := mesh.get_migration(m.id)).phase in (
            M.MIGRATION_PHASE_DONE, M.MIGRATION_PHASE_ABORTED) and x, 120, f"the migration in {phase} to end")
        if phase == "committed":
            assert migration_phase(m) == "done", m.message
            want = m.target_node
        else:
            assert migration_phase(m) == "aborted" and "restarted in phase paused" in m.message, m.message
            want = w.node
        wait_for(lambda: (x := mesh.get_workload(w.id)).node == want and x.state == t.WORKLOAD_STATE_RUNNING, 60,
                 f"the workload to run on {want}")
        wait_for(lambda: last(mesh, w.id) >= held + 20, 60, "the counter to go on")
        assert copies() == [w.pid] and "--restore-pidfile" in parent_cmdline(w.pid)
        out = counts(mesh, w.id)
        assert {d["token"] for d in out} == {out[0]["token"]}, "the process was restarted, not restored"
        assert [d["n"] for d in out] == list(range(1, len(out) + 1))
        # the runner that adopted it stops it
        stopped = mesh.stop_workload(w.id)
        assert stopped.state == t.WORKLOAD_STATE_STOPPED and stopped.node == want, stopped.message
        wait_for(lambda: not copies(), 30, "the counter to end")
    finally:
        cluster.controlplane_args = []


@needs_criu
def test_transparent_migration_to_the_same_node_is_refused(mesh):
    _, w = start_counter(mesh)
    with pytest.raises(errors.FailedPrecondition, match="another node"):
        mesh.migrate(w.id, to_node=w.node, mode="transparent")
    now = mesh.get_workload(w.id)
    assert now.state == t.WORKLOAD_STATE_RUNNING and now.pid == w.pid and copies() == [w.pid]
    mesh.stop_workload(w.id)
    wait_for(lambda: not copies(), 30, "the counter to end")


@needs_criu
def test_a_workload_in_namespaces_is_refused_naming_the_label(mesh):
    """Without gpumesh.io/isolation=criu a workload runs in PID/mount namespaces that CRIU does not
    dump here: transparent mode is refused up front, naming the label, and the workload runs on."""
    s = mesh.allocate(tenant="tp", mig_profile="1g.10gb").slices[0]
    w = mesh.run_workload(s.id, ["sleep", "60"])
    with pytest.raises(errors.FailedPrecondition, match="gpumesh.io/isolation=criu"):
        mesh.migrate(w.id, mode="transparent")
    assert mesh.get_workload(w.id).state == t.WORKLOAD_STATE_RUNNING
    mesh.stop_workload(w.id)


@pytest.mark.skipif(not WHY_NOT, reason="CRIU works here: the refusal is for hosts without it")
def test_without_criu_transparent_mode_is_refused_naming_it(mesh):
    _, w = start_counter(mesh)
    with pytest.raises(errors.FailedPrecondition, match="(?i)criu"):
        mesh.migrate(w.id, mode="transparent")
    now = mesh.get_workload(w.id)
    assert now.state == t.WORKLOAD_STATE_RUNNING and now.pid == w.pid
    mesh.stop_workload(w.id)
