"""The migration transfer channel on a secured cluster, attacked from outside: real etcd, the control
plane and two agent processes with their certificates, a tenant, a viewer of that tenant, and a
PyTorch training workload migrating between the nodes.

The migration is held in TARGET_READY (`migration_pause_at`): the target process listens. A viewer
reads the migration (session, target address), as the old code let anyone who could read it do, and
pushes to the target: without the secret, with another migration's secret, with a crafted pickle.
Each is refused and the target restores nothing. The secret the control plane drew for the
migration is in etcd under its own key and appears in no API answer (Get, List, Watch), in no
`meshctl` output and in no log; the target listens on the agent's address, not on every interface.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest

pytest.importorskip("torch", reason="torch is not installed (pip install 'gpumesh[torch]')")

from gpumesh.v1 import migration_service_pb2 as M  # noqa: E402
from mesh.checkpoint.agent_link import AgentLink  # noqa: E402
from mesh.checkpoint.format import EntryMeta, Manifest  # noqa: E402
from mesh.checkpoint.transfer import PUSH, OutEntry, TransferClient, TransferError, frame  # noqa: E402
from mesh.migrationapi import migration_phase  # noqa: E402
from tests.integration import secure  # noqa: E402
from tests.integration.conftest import json_lines, release_all, stop_running, wait_for  # noqa: E402
from tests.unit._checkpoint_util import ROOT  # noqa: E402
from tools.localcluster import LocalCluster  # noqa: E402

pytestmark = pytest.mark.integration
HOSTS = [{"node": "sec-a", "gpus": [{"model": "H100-80GB", "count": 1, "mig": True}]},
         {"node": "sec-b", "gpus": [{"model": "H100-80GB", "count": 1, "mig": True}]}]
TRAIN = [sys.executable, "-m", "tools.examples.train_mnist_like", "--steps", "100000", "--sleep-ms", "20",
         "--print-every", "5"]


@pytest.fixture(scope="module")
def sc(tmp_path_factory):
    d = tmp_path_factory.mktemp("chan")
    tls_dir = d / "tls"
    c = LocalCluster(d / "cluster", HOSTS, lease_ttl=3, agents_per_process=1, tls_dir=tls_dir,
                     tenants_file=str(secure.write_tenants(d / "tenants.yaml")),
                     client_auth={"token": secure.TOKENS["admin"], "ca": str(tls_dir / "ca.crt")},
                     controlplane_args=["--migration-pause-at", "target_ready"],
                     agent_args=["--workload-stop-grace-seconds", "2", "--checkpoint-dir", str(d / "store")])
    c.start(timeout=90)
    yield c
    with c.client() as admin:
        stop_running(admin)
    c.stop()


def etcd_get(cluster: LocalCluster, key: str) -> bytes | None:
    port = json.loads((cluster.etcd_data_dir / "ports.json").read_text())["client"]
    body = json.dumps({"key": base64.b64encode(key.encode()).decode()}).encode()
    with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/v3/kv/range", data=body),
                                timeout=10) as r:
        kvs = json.loads(r.read()).get("kvs", [])
    return base64.b64decode(kvs[0]["value"]) if kvs else None


def forms(secret: bytes) -> list[bytes]:
    """How a secret could show up in bytes or text."""
    return [secret, secret.hex().encode(), base64.b64encode(secret), base64.b64encode(secret).rstrip(b"="),
            base64.urlsafe_b64encode(secret).rstrip(b"=")]


def listening_on(port: int) -> list[str]:
    """Local addresses of the TCP sockets listening on `port` (from /proc/net/tcp and tcp6)."""
    out = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.rsplit(":", 1)
            if int(p, 16) == port and state == "0A":
                out.append(addr)
    return out


def sockets(cluster: LocalCluster, wid: str) -> list[str]:
    """The checkpoint control sockets of `wid` on every agent (as WorkloadRunner.socket_path names them)."""
    import hashlib
    out = []
    for d in (cluster.state_dir / "agents").glob("*/workloads/*"):
        # unconfined: <wid>.sock beside the record; confined: .gpumesh-ctl.sock in the workload's own directory
        for path in (str(d / f"{wid}.sock"), str(d / f"{wid}.d" / ".gpumesh-ctl.sock")):
            if len(path) > 100:
                path = f"/tmp/gpumesh-{hashlib.sha256(path.encode()).hexdigest()[:16]}.sock"
            if os.path.exists(path):
                out.append(path)
    return out


class _Payload:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_strangers_cannot_push_and_viewers_never_see_the_secret(sc, tmp_path):
    with secure.client(sc, "team-a", timeout=30) as a, secure.client(sc, "viewer-a", timeout=30) as viewer:
        s = a.allocate(tenant="team-a", mig_profile="1g.10gb").slices[0]
        w = a.run_workload(s.id, TRAIN, env={"PYTHONPATH": str(ROOT)})
        wait_for(lambda: any(d.get("step", 0) >= 10 for d in json_lines(a, w.id)), 90, "training to reach step 10")
        with sc.client() as admin:
            admin.cordon(w.node)         # the target goes to the other node (no placement probes on this one)
        try:
            m = a.migrate(w.id)
            wait_for(lambda: migration_phase(viewer.get_migration(m.id)) in ("target_ready", "aborted"), 120,
                     "the target to listen (held in TARGET_READY)")
        finally:
            with sc.client() as admin:
                admin.uncordon(w.node)
        assert migration_phase(viewer.get_migration(m.id)) == "target_ready", viewer.get_migration(m.id).message
        seen = viewer.get_migration(m.id)
        assert seen.session and seen.target_address            # what the old code's attacker needed

        secret = etcd_get(sc, f"/gpumesh/v1/migration-secrets/{m.id}")
        assert secret is not None and len(secret) >= 16, "the control plane keeps the migration's secret in etcd"

        # no API answer, no meshctl output, no log carries it
        answers = [seen.SerializeToString(), a.get_migration(m.id).SerializeToString(),
                   M.ListMigrationsResponse(migrations=viewer.list_migrations()).SerializeToString(),
                   next(iter(viewer.watch_migration(m.id, timeout=10))).SerializeToString(),
                   etcd_get(sc, f"/gpumesh/v1/migrations/{m.id}")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "proto")])}
        for out in ("json", "yaml", "wide"):
            r = subprocess.run([sys.executable, "-m", "tools.meshctl.main", "get", "migrations", "-o", out,
                                "--endpoint", sc.endpoint, "--token", secure.TOKENS["viewer-a"],
                                "--ca", str(sc.tls_dir / "ca.crt")], capture_output=True, timeout=60, env=env, cwd=ROOT)
            assert r.returncode == 0 and m.id.encode() in r.stdout, r.stderr
            answers.append(r.stdout + r.stderr)
        answers += [p.read_bytes() for p in (sc.state_dir / "logs").glob("*.log")]
        for blob in answers:
            assert not any(f in blob for f in forms(secret)), "the migration's secret leaked"

        # the target listens on the agent's address, not on every interface
        host, port = seen.target_address.rsplit(":", 1)
        assert host not in ("0.0.0.0", "::", "[::]")
        bound = listening_on(int(port))
        assert bound and all(addr not in ("00000000", "00000000000000000000000000000000") for addr in bound), bound

        # pushes from a viewer who read the session and the address
        marker = tmp_path / "pwned"
        blob = pickle.dumps({"step": 10 ** 6, "extras": _Payload(str(marker))})
        meta = EntryMeta(name="meta", kind="pickle", nbytes=len(blob))
        old_style = [frame({"t": "hello", "session": seen.session}),
                     frame({"t": "begin", "meta": meta.to_json(), "gen": 0, "offset": 0, "algo": "sha256"}),
                     frame({"t": "chunk", "offset": 0, "sum": -1}, blob), frame({"t": "end", "checksum": ""}),
                     frame({"t": "commit", "manifest": Manifest(workload_id=w.id, step=10 ** 6,
                                                                entries=[meta]).to_json()})]
        with grpc.insecure_channel(seen.target_address) as ch:
            with pytest.raises(grpc.RpcError) as exc:
                list(ch.stream_stream(PUSH)(iter(old_style), timeout=20))
        assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
        for guess in (b"\x00" * 32, os.urandom(32), seen.session.encode().ljust(32, b"\x00")):
            with TransferClient(seen.target_address, seen.session, secret=guess, retries=0, connect_timeout=20) as c:
                with pytest.raises(TransferError, match="UNAUTHENTICATED"):
                    c.send([OutEntry(EntryMeta(name="meta", kind="data", nbytes=len(blob)),
                                     lambda start: [memoryview(blob)[start:]])])
        assert not marker.exists(), "the pickled payload ran on the target"

        # the target restored nothing: it still waits for its source
        statuses = []
        for p in sockets(sc, w.id):
            try:
                with AgentLink(str(p), timeout=10) as link:
                    statuses.append(link.call("status"))
            except (OSError, ConnectionError):
                pass
        target = [st for st in statuses if st.get("receive_session") == seen.session]
        assert target and not target[0]["restored"] and target[0]["step"] == 0
        assert not list((sc.state_dir / "agents").rglob("*.transfer-secret")), "the secret file was left behind"
        a.stop_workload(w.id)


COUNTER = ("import json, os, time\n"
           "n = 0\n"
           "while True:\n"
           "    n += 1\n"
           "    print(json.dumps({'n': n, 'pid': os.getpid()}), flush=True)\n"
           "    time.sleep(0.05)\n")


def _criu_problem() -> str:
    from mesh.checkpoint.criu import Criu
    info = Criu().detect()
    return "" if info.usable else info.problem


@pytest.mark.skipif(bool(_criu_problem()), reason=f"no working CRIU: {_criu_problem()}")
def test_transparent_images_go_agent_to_agent_over_mtls(sc):
    """The target agent's image receiver speaks mTLS with the agents' certificates and hears only the
    source agent that proves the migration's secret; then a transparent migration completes over it."""
    from mesh import tls
    d = sc.tls_dir
    counted = lambda c, wid: max((x.get("n", 0) for x in json_lines(c, wid)), default=0)  # noqa: E731
    with secure.client(sc, "team-a", timeout=30) as a, secure.client(sc, "viewer-a", timeout=30) as viewer:
        s = a.allocate(tenant="team-a", mig_profile="1g.10gb").slices[0]
        # transparent migration needs the criu isolation label (no namespaces: CRIU dumps the process as is),
        # and an interpreter the tenant's uid may run outside a mount namespace
        py = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
        w = a.run_workload(s.id, [py, "-c", COUNTER], labels={"gpumesh.io/isolation": "criu"})
        wait_for(lambda: counted(a, w.id) >= 10, 60, "the counter to reach 10")
        src = a.get_workload(w.id).node
        dst = next(n for n in ("sec-a", "sec-b") if n != src)
        with sc.client() as admin:
            admin.cordon(src)
        try:
            m = a.migrate(w.id, mode="transparent")
            wait_for(lambda: migration_phase(viewer.get_migration(m.id)) in ("target_ready", "aborted"), 120,
                     "the target agent to listen")
        finally:
            with sc.client() as admin:
                admin.uncordon(src)
        seen = viewer.get_migration(m.id)
        assert migration_phase(seen) == "target_ready", seen.message
        secret = etcd_get(sc, f"/gpumesh/v1/migration-secrets/{m.id}")

        def push(creds=None, secret=secret) -> TransferError:
            entry = [OutEntry(EntryMeta(name="core-1.img", kind="tensor", nbytes=4, dtype="uint8", shape=[4]),
                              lambda start: [b"evil"[start:]])]
            with TransferClient(seen.target_address, seen.session, secret=secret, retries=0, connect_timeout=5,
                                credentials=creds, server_name=dst if creds else "", mesh="grpc") as c:
                with pytest.raises(TransferError) as exc:
                    c.send(entry)
            return exc.value

        def agent(node: str):
            return tls.channel_credentials(str(d / "ca.crt"), str(d / f"{node}.crt"), str(d / f"{node}.key"))
        assert "cannot reach" in str(push())                                   # plaintext: no TLS handshake
        assert "PERMISSION_DENIED" in str(push(agent(dst)))                    # an agent, not the source
        assert "UNAUTHENTICATED" in str(push(agent(src), secret=os.urandom(32)))   # the source's cert, no secret
        assert a.get_workload(w.id).node == src and counted(a, w.id) > 10      # nothing restored; it runs on

        # the held migration rolls back with the restart; an unheld one goes through over mTLS
        sc.controlplane_args = []
        sc.restart_controlplane(timeout=60)
        sc.wait_ready(timeout=60)
        wait_for(lambda: migration_phase(a.get_migration(m.id)) == "aborted", 120, "the rollback")
        with sc.client() as admin:
            admin.cordon(src)
        try:
            m2 = a.wait_migration(a.migrate(w.id, mode="transparent").id, timeout=180)
        finally:
            with sc.client() as admin:
                admin.uncordon(src)
        assert migration_phase(m2) == "done", m2.message
        assert a.get_workload(w.id).node == dst and m2.transfer in ("grpc", "criu")
        before = counted(a, w.id)
        wait_for(lambda: counted(a, w.id) >= before + 10, 60, "the restored counter to count on")
        assert etcd_get(sc, f"/gpumesh/v1/migration-secrets/{m2.id}") is None, "the secret outlived the migration"
        a.stop_workload(w.id)


def test_a_checkpoint_without_a_tenant_key_is_sealed_with_its_own_key_and_restores(sc):
    """team-a has no key in checkpoint_keys_file: its checkpoint is sealed with a key the control plane
    drew for it (etcd only, in no API answer), and restores from it."""
    if sc.controlplane_args:
        sc.controlplane_args = []
        sc.restart_controlplane(timeout=60)
        sc.wait_ready(timeout=60)
    with sc.client() as admin:
        stop_running(admin)
        release_all(admin)              # the earlier tests' slices (the tenant's quota is 6)
    with secure.client(sc, "team-a", timeout=30) as a, secure.client(sc, "viewer-a", timeout=30) as viewer:
        s = a.allocate(tenant="team-a", mig_profile="1g.10gb").slices[0]
        w = a.run_workload(s.id, TRAIN, env={"PYTHONPATH": str(ROOT)})
        wait_for(lambda: any(d.get("step", 0) >= 10 for d in json_lines(a, w.id)), 90, "training to reach step 10")
        ck = a.checkpoint(w.id)
        assert not ck.encrypted            # no tenant key ...
        store = sc.state_dir.parent / "store" / ck.path
        enc = json.loads((store / "manifest.json").read_text())["extras"]["encryption"]
        assert enc["key"] == "checkpoint" and enc["checkpoint"] == ck.id and enc["manifest_mac"]   # ... but sealed
        key = etcd_get(sc, f"/gpumesh/v1/checkpoint-keys/{ck.id}")
        assert key is not None and len(key) == 32
        shown = [a.list_checkpoints(workload_id=w.id)[0].SerializeToString(), ck.SerializeToString(),
                 M.ListCheckpointsResponse(checkpoints=viewer.list_checkpoints()).SerializeToString()]
        assert not any(f in blob for blob in shown for f in forms(key))
        a.stop_workload(w.id)
        wait_for(lambda: a.get_workload(w.id).state not in (1, 2), 60, "the workload to stop")   # PENDING, RUNNING
        m = a.wait_migration(a.restore(ck.id).id, timeout=180)
        assert migration_phase(m) == "done", m.message
        wait_for(lambda: any(d.get("started_at") == ck.step for d in json_lines(a, w.id)), 90,
                 "the restored run to start from the checkpoint's step")
        a.stop_workload(w.id)
