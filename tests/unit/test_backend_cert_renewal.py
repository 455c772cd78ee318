"""A hand-started model server's TLS certificate is renewed before it ends (nodeagent/workload_renewal.py).

The agent makes each server a self-signed certificate valid mesh/tls.py SELF_SIGNED_DAYS, and clients pin exactly
it. A deployment's replicas are rolled by the control plane before theirs ends; a backend a tenant started with
`meshctl run --backend` was not: it kept its first certificate, and once that ended every client failed the TLS
handshake. Now the agent that runs it restarts it in place (the runner's own start path: same slice, same
confinement, the same port when still free) with a fresh certificate, reports the new one with the workload's
status, and says so in a NodeEvent; a renewal that cannot happen now gets a Warning event instead.

The clock is injected (`renewal.clock`) and the check is driven directly (`renewal.step()`): no waiting on time.
The server is a stand-in that speaks HTTPS with the files the agent names in SSL_CERTFILE / SSL_KEYFILE, as
llama-cpp-python's server does; tests/integration/test_backend_cert_renewal.py runs the real one."""

from __future__ import annotations

import asyncio
import os
import ssl
import sys
import time
import types

import httpx
import pytest

from gpumesh.v1 import node_service_pb2
from gpumesh.v1 import types_pb2 as t
from mesh import replicatls
from mesh.config import ConfigError
from nodeagent import workloads as wl
from nodeagent.backends import llamacpp
from tests.unit._shims import kill_shims

# answers every GET with 200 over TLS, with the key and certificate the agent named in its environment
SERVER = """
import http.server, os, ssl, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("content-length", "2"); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a): pass
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(os.environ["SSL_CERTFILE"], os.environ["SSL_KEYFILE"])
s = http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), H)
s.socket = ctx.wrap_socket(s.socket, server_side=True)
s.serve_forever()
"""
DAY = 86400.0


class Died(Exception):
    """The agent killed at a crash point (nodeagent/workload_recovery.py `_crash_point`)."""


def stand_in(b, host, port, python):
    return [sys.executable, "-c", SERVER, host, str(port)]


def make_agent(nvml=None):
    a = types.SimpleNamespace(node="n1", desired={}, handlers={}, session_hooks=[], teardown_hooks=[],
                              claim_hooks=[], gpus=types.SimpleNamespace(nvml=nvml or object()), slicer=object())
    a.realized = {"s-1": node_service_pb2.SliceStatus(slice_id="s-1", state=t.SLICE_STATE_READY, device_uuid="GPU-x")}
    return a


@pytest.fixture
def runner(tmp_path, monkeypatch):
    monkeypatch.setattr(llamacpp, "command", stand_in)
    r = wl.WorkloadRunner(make_agent(), str(tmp_path / "w"), stop_grace=5)
    yield r
    kill_shims(r)


def spec(wid="w-1", **labels) -> t.Workload:
    return t.Workload(id=wid, slice_id="s-1", tenant="team-a", labels=labels,
                      backend=t.ServingBackend(kind="llama.cpp", artifact="/models/tiny.gguf", api_key="k" * 32))


def get(w: t.Workload, certificate: str | None = None) -> int:
    """The status of a GET to the workload's server, verified against `certificate` (its own by default)."""
    cert = w.endpoint_certificate if certificate is None else certificate
    return httpx.get(replicatls.base_url(w.endpoint, w.endpoint_certificate) + "/v1/models",
                     verify=replicatls.verify(cert), timeout=10).status_code


def answers(w: t.Workload) -> None:
    """Wait until the (stand-in) server listens: it binds its port a moment after it starts."""
    deadline = time.monotonic() + 60
    while True:
        try:
            assert get(w) == 200
            return
        except httpx.ConnectError:
            assert time.monotonic() < deadline, "the server did not answer"
            time.sleep(0.05)


def near_its_end(r, w: t.Workload, before: float = DAY) -> None:
    """Set the renewal's clock to `before` seconds before `w`'s certificate ends."""
    r.renewal.clock = lambda: replicatls.expires_at(w.endpoint_certificate) - before


def drained(q: asyncio.Queue) -> list:
    out = []
    while not q.empty():
        out.append(q.get_nowait())
    return out


async def renew_all(r) -> None:
    """One renewal check, and every restart it began to its end."""
    r.renewal.step()
    await asyncio.gather(*r.renewal.tasks.values())


async def test_a_backend_whose_certificate_is_within_the_window_is_restarted_with_a_new_one(runner):
    outbox = asyncio.Queue()
    runner.outbox = outbox
    old = await asyncio.to_thread(runner.start, spec())
    assert old.state == t.WORKLOAD_STATE_RUNNING, old.message
    old = t.Workload(); old.CopyFrom(runner.workloads["w-1"])
    await asyncio.to_thread(answers, old)
    runner.renewal.step()               # weeks from its end: nothing to do
    assert not runner.renewal.tasks and runner.workloads["w-1"].endpoint_certificate == old.endpoint_certificate
    near_its_end(runner, old)
    await renew_all(runner)
    new = runner.workloads["w-1"]
    assert new.state == t.WORKLOAD_STATE_RUNNING, new.message
    assert new.endpoint_certificate and new.endpoint_certificate != old.endpoint_certificate
    assert replicatls.expires_at(new.endpoint_certificate) >= replicatls.expires_at(old.endpoint_certificate)
    assert new.pid and new.pid != old.pid and new.endpoint == old.endpoint     # the same port: still free
    await asyncio.to_thread(answers, new)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        await asyncio.to_thread(get, new, old.endpoint_certificate)            # the server presents the new one
    msgs = drained(outbox)
    reports = [w for m in msgs if m.HasField("workloads") for w in m.workloads.workloads]
    assert [(w.id, w.state, w.endpoint_certificate) for w in reports] == \
        [("w-1", t.WORKLOAD_STATE_RUNNING, new.endpoint_certificate)]           # the status path clients read
    events = [m.event for m in msgs if m.HasField("event")]
    assert [(e.type, e.reason) for e in events] == [("Normal", "BackendCertificateRenewed")]
    assert "w-1" in events[0].message and "restarted" in events[0].message
    again = wl.WorkloadRunner(runner.agent, runner.dir)                         # the durable record says the same
    assert again.workloads["w-1"].endpoint_certificate == new.endpoint_certificate
    assert "renewing" not in again.meta["w-1"]
    near_its_end(runner, new, before=8 * DAY)                                   # the new one: not yet
    runner.renewal.step()
    assert not runner.renewal.tasks


async def test_a_deployments_replica_is_left_to_its_deployment(runner):
    """The control plane rolls a replica (controlplane/serving/observe.py): the agent never restarts it itself."""
    w = await asyncio.to_thread(runner.start, spec(**{"gpumesh.replica": "r-1", "gpumesh.deployment": "chat"}))
    assert w.state == t.WORKLOAD_STATE_RUNNING, w.message
    near_its_end(runner, w)
    runner.outbox = asyncio.Queue()
    runner.renewal.step()
    assert not runner.renewal.tasks and runner.workloads["w-1"].pid == w.pid and runner.outbox.empty()


async def test_a_renewal_that_cannot_happen_warns_once_a_day(runner):
    w = await asyncio.to_thread(runner.start, spec())
    runner.outbox = asyncio.Queue()
    runner.agent.realized["s-1"].state = t.SLICE_STATE_UNKNOWN     # its slice cannot take a start now
    near_its_end(runner, w, before=3 * DAY)
    runner.renewal.step()
    runner.renewal.step()
    events = [m.event for m in drained(runner.outbox)]
    assert [(e.type, e.reason) for e in events] == [("Warning", "BackendCertificateRenewalBlocked")]
    assert "w-1" in events[0].message and "not ready" in events[0].message and "expires" in events[0].message
    assert not runner.renewal.tasks and runner.workloads["w-1"].pid == w.pid
    near_its_end(runner, w, before=3 * DAY - DAY - 1)                # a day later: warned again
    runner.renewal.step()
    assert [m.event.reason for m in drained(runner.outbox)] == ["BackendCertificateRenewalBlocked"]
    runner.agent.realized["s-1"].state = t.SLICE_STATE_READY
    await renew_all(runner)
    assert runner.workloads["w-1"].endpoint_certificate != w.endpoint_certificate


async def test_a_failed_restart_fails_the_workload_and_warns(runner, monkeypatch):
    w = await asyncio.to_thread(runner.start, spec())
    runner.outbox = asyncio.Queue()
    near_its_end(runner, w)

    def no_port(*a, **k):
        raise OSError(98, "Address already in use")
    from nodeagent import backends
    monkeypatch.setattr(backends, "free_port", no_port)
    await renew_all(runner)
    n = runner.workloads["w-1"]
    assert n.state == t.WORKLOAD_STATE_FAILED and "certificate renewal" in n.message and "in use" in n.message
    events = [m.event for m in drained(runner.outbox) if m.HasField("event")]
    assert [(e.type, e.reason) for e in events] == [("Warning", "BackendCertificateRenewalFailed")]
    assert "renewing" not in runner.meta["w-1"]


@pytest.mark.parametrize("where", ["after-stop", "before-launch"])
async def test_an_agent_that_dies_mid_renewal_finishes_it_after_its_restart(runner, monkeypatch, where):
    """Killed after the old server ended (before the new one is recorded as starting, or after it was recorded
    but before its supervisor was launched): the restarted agent's record still holds the workload, and its first
    renewal check starts the server again; the workload is never lost, nor reported ended."""
    w = await asyncio.to_thread(runner.start, spec())
    near_its_end(runner, w)

    def die(self, at):
        if at == where:
            raise Died(at)
    monkeypatch.setattr(wl.WorkloadRunner, "_crash_point", die)
    runner.renewal.step()
    with pytest.raises(Died):
        await asyncio.gather(*runner.renewal.tasks.values())
    monkeypatch.undo()
    monkeypatch.setattr(llamacpp, "command", stand_in)
    again = wl.WorkloadRunner(runner.agent, runner.dir, stop_grace=5)         # the restarted agent
    try:
        rec = again.workloads["w-1"]
        assert rec.state in (t.WORKLOAD_STATE_RUNNING, t.WORKLOAD_STATE_PENDING) and again.meta["w-1"]["renewing"]
        again.check_all(report=False)                   # the monitor leaves it to the renewal: not ended
        assert again.workloads["w-1"].state != t.WORKLOAD_STATE_FAILED
        again.renewal.clock = runner.renewal.clock
        await renew_all(again)
        n = again.workloads["w-1"]
        assert n.state == t.WORKLOAD_STATE_RUNNING, n.message
        assert n.endpoint_certificate != w.endpoint_certificate and n.pid != w.pid
        assert "renewing" not in again.meta["w-1"]
        await asyncio.to_thread(answers, n)
    finally:
        kill_shims(again)


async def test_a_stop_during_the_renewal_is_not_undone_by_it(runner):
    """The tenant's stop that arrives while the old server is being ended: the server is not started again."""
    w = await asyncio.to_thread(runner.start, spec())
    near_its_end(runner, w)
    runner.renewal.step()
    runner.stop("w-1")
    await asyncio.gather(*runner.renewal.tasks.values())
    deadline = time.monotonic() + 60
    while runner.workloads["w-1"].state == t.WORKLOAD_STATE_RUNNING:
        assert time.monotonic() < deadline, "the stop was not recorded"
        runner.check_all(report=False)
        await asyncio.sleep(0.02)
    assert runner.workloads["w-1"].state == t.WORKLOAD_STATE_STOPPED, runner.workloads["w-1"].message


def test_the_renewal_window_is_an_agent_option_validated_against_the_certificates_life():
    from mesh import config, tls
    from nodeagent.config import AgentConfig
    base = {"MESH_AGENT_INSECURE": "true", "MESH_AGENT_GPU_BACKEND": "sim", "MESH_AGENT_SIM_HOST_FILE": "h.yaml"}
    assert config.load(AgentConfig, environ=base).backend_tls_renew_before_seconds == replicatls.RENEW_BEFORE_SECONDS
    ok = {**base, "MESH_AGENT_BACKEND_TLS_RENEW_BEFORE_SECONDS": "3600"}
    assert config.load(AgentConfig, environ=ok).backend_tls_renew_before_seconds == 3600
    for bad in ("0", str(tls.SELF_SIGNED_DAYS * DAY)):
        with pytest.raises(ConfigError, match="backend_tls_renew_before_seconds"):
            config.load(AgentConfig, environ={**base, "MESH_AGENT_BACKEND_TLS_RENEW_BEFORE_SECONDS": bad})


root_only = pytest.mark.skipif(os.geteuid() != 0, reason="a confined workload switches to a tenant's uid: root")


@root_only
async def test_a_confined_backend_is_restarted_under_the_same_confinement(tmp_path, monkeypatch):
    """The restart is the runner's own start: the same tenant uid, cgroup and device registration as the first
    start, the new key owned by that uid; the old process's registration is gone."""
    from tests.unit.test_workload_failed_start_cleanup import FakeCgroups, FakeNvml
    from nodeagent.isolation.devices import NvidiaDevices
    from nodeagent.isolation.plan import Isolator, IsolationSettings
    from nodeagent.isolation.probe import HostFeatures
    from nodeagent.isolation.users import TenantUsers
    from nodeagent.backends import servertls
    monkeypatch.setattr(llamacpp, "command", lambda b, host, port, python: ["sleep", "600"])
    groups, nvml = FakeCgroups(), FakeNvml()
    iso = Isolator(IsolationSettings(mode="permissive", seccomp=False, shm_root=str(tmp_path / "shm")),
                   HostFeatures(setuid=True, no_new_privs=True),
                   TenantUsers((310000, 310010), {}, str(tmp_path / "ids.json")),
                   groups, NvidiaDevices(str(tmp_path), str(tmp_path / "mig-minors")), node="n1", scope=str(tmp_path))
    r = wl.WorkloadRunner(make_agent(nvml), str(tmp_path / "w"), isolator=iso, stop_grace=5)
    try:
        w = await asyncio.to_thread(r.start, spec())
        assert w.state == t.WORKLOAD_STATE_RUNNING, w.message
        first = dict(r.meta["w-1"])

        def uid_of(pid):
            for _ in range(500):
                with open(f"/proc/{pid}/status") as f:
                    uid = int(next(line for line in f if line.startswith("Uid:")).split()[1])
                if uid:
                    return uid
                time.sleep(0.01)        # the shim's child switches to the tenant's uid just after it starts
            return uid
        assert uid_of(w.pid) == first["uid"] != 0
        near_its_end(r, w)
        await renew_all(r)
        n, meta = r.workloads["w-1"], r.meta["w-1"]
        assert n.state == t.WORKLOAD_STATE_RUNNING, n.message
        assert n.endpoint_certificate != w.endpoint_certificate and n.pid != w.pid
        assert (meta["uid"], meta["gid"], meta["cgroup"]) == (first["uid"], first["gid"], first["cgroup"])
        assert meta["cgroup"] in groups.groups and uid_of(n.pid) == first["uid"]
        assert nvml.processes == {("GPU-x", n.pid)}                    # the old process's registration went
        key = os.path.join(r.path("w-1", "d"), servertls.KEY_FILE)
        assert os.stat(key).st_uid == first["uid"]
        assert open(os.path.join(r.path("w-1", "d"), servertls.CERT_FILE)).read() == n.endpoint_certificate
    finally:
        kill_shims(r)
