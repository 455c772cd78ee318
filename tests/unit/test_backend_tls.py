"""TLS to the model servers (the agent's backend_tls): the certificate the agent makes per server start
(nodeagent/backends/servertls.py), the files it writes, and the pinned verification every client of a replica
uses (mesh/replicatls.py, mesh/replicahttp.py), against real TLS servers on localhost: the right certificate
is accepted, another one (or the right one for another address) refused before anything is sent. The real
path (agents starting llama.cpp with TLS, the gateway and the probes reaching it) is in
tests/integration/test_replica_keys.py."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import ssl
import stat

import httpx
import pytest
from cryptography import x509

from controlplane.controllers.migration_records import committed_record
from controlplane.gateway import proxy
from controlplane.gateway.view import FleetView
from controlplane.serving.replicamove import moved
from gpumesh.v1 import deployment_service_pb2 as D
from gpumesh.v1 import migration_service_pb2 as M
from gpumesh.v1 import servingview_service_pb2 as V
from gpumesh.v1 import types_pb2
from mesh import replicahttp, replicatls, tls
from mesh.config import ConfigError
from nodeagent import backends
from nodeagent.backends import servertls


def sans(pem: bytes | str) -> list:
    cert = x509.load_pem_x509_certificate(pem.encode() if isinstance(pem, str) else pem)
    return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)


@pytest.mark.parametrize("host, want", [("127.0.0.1", x509.IPAddress(ipaddress.ip_address("127.0.0.1"))),
                                        ("::1", x509.IPAddress(ipaddress.ip_address("::1"))),
                                        ("gpu-7.fleet.example", x509.DNSName("gpu-7.fleet.example"))])
def test_a_servers_certificate_names_its_address_in_subject_alt_name(host, want):
    cert, key = tls.self_signed((host,), "w-1")
    assert sans(cert) == [want]
    c = x509.load_pem_x509_certificate(cert)
    assert c.issuer == c.subject                        # self-signed: trusted by pinning, no CA
    assert (c.not_valid_after_utc - c.not_valid_before_utc).days <= tls.SELF_SIGNED_DAYS + 1
    assert b"PRIVATE KEY" in key


def test_a_self_signed_certificate_needs_an_address():
    with pytest.raises(tls.TlsError, match="hosts"):
        tls.self_signed(("",), "w-1")


def test_the_key_and_certificate_are_private_files_of_the_server(tmp_path):
    workdir = str(tmp_path / "w-1.d")
    cert, env = servertls.install("127.0.0.1", "w-1", workdir)
    key_path, cert_path = env[servertls.KEY_ENV], env[servertls.CERT_ENV]
    assert os.path.dirname(key_path) == workdir and open(cert_path).read() == cert
    assert stat.S_IMODE(os.stat(workdir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600          # not other tenants', not the world's
    assert os.stat(key_path).st_uid == os.geteuid()
    assert b"PRIVATE KEY" in open(key_path, "rb").read()
    # as a confined server sees its directory (its /tmp inside its mount namespace)
    _, inside = servertls.install("127.0.0.1", "w-1", workdir, inside="/tmp")
    assert inside == {servertls.KEY_ENV: "/tmp/server-tls.key", servertls.CERT_ENV: "/tmp/server-tls.crt"}


def test_a_link_left_in_the_workloads_directory_is_never_written_through(tmp_path):
    """The directory belongs to the workload: a link it planted where the agent writes is replaced, not followed."""
    workdir, victim = tmp_path / "w-1.d", tmp_path / "victim"
    workdir.mkdir(mode=0o700)
    victim.write_text("keep")
    for name in (servertls.KEY_FILE, servertls.KEY_FILE + ".tmp"):
        os.symlink(victim, workdir / name)
    servertls.install("127.0.0.1", "w-1", str(workdir))
    assert victim.read_text() == "keep"
    assert not os.path.islink(workdir / servertls.KEY_FILE)


def workload(endpoint="127.0.0.1:40001") -> types_pb2.Workload:
    w = types_pb2.Workload(id="w-1", endpoint=endpoint, endpoint_certificate="stale")
    w.backend.kind = "llama.cpp"
    return w


def test_the_agent_records_the_certificate_with_the_endpoint_and_none_when_off(tmp_path):
    w = workload()
    env = backends.server_tls(w, str(tmp_path / "w-1.d"), None, backends.BackendOptions())
    assert set(env) == {servertls.KEY_ENV, servertls.CERT_ENV}
    assert w.endpoint_certificate.startswith("-----BEGIN CERTIFICATE-----")
    assert sans(w.endpoint_certificate) == [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    again = workload()
    backends.server_tls(again, str(tmp_path / "w-1.d"), None, backends.BackendOptions())
    assert again.endpoint_certificate != w.endpoint_certificate      # a restart renews it
    off = workload()
    assert backends.server_tls(off, str(tmp_path / "x.d"), None, backends.BackendOptions(tls=False)) == {}
    assert off.endpoint_certificate == "" and not (tmp_path / "x.d").exists()
    v6 = workload("[::1]:40001")
    backends.server_tls(v6, str(tmp_path / "v6.d"), None, backends.BackendOptions())
    assert sans(v6.endpoint_certificate) == [x509.IPAddress(ipaddress.ip_address("::1"))]


def test_backend_tls_is_on_by_default_and_refuses_a_wildcard_host():
    from nodeagent.config import AgentConfig
    from mesh import config
    base = {"MESH_AGENT_INSECURE": "true", "MESH_AGENT_GPU_BACKEND": "sim", "MESH_AGENT_SIM_HOST_FILE": "h.yaml"}
    assert config.load(AgentConfig, environ=base).backend_tls is True
    assert config.load(AgentConfig, environ={**base, "MESH_AGENT_BACKEND_TLS": "off"}).backend_tls is False
    with pytest.raises(ConfigError, match="backend_host"):
        config.load(AgentConfig, environ={**base, "MESH_AGENT_BACKEND_HOST": "0.0.0.0"})
    assert config.load(AgentConfig, environ={**base, "MESH_AGENT_BACKEND_HOST": "0.0.0.0",
                                             "MESH_AGENT_BACKEND_TLS": "false"}).backend_host == "0.0.0.0"


# -- the clients' pinned verification, against real TLS servers ------------------------------------------------

class TlsServer:
    """A minimal HTTPS server on 127.0.0.1 presenting `cert` (answers every request with 200 and a JSON body);
    counts the TLS connections it accepted, the requests that reached it, and the connections that ended."""

    def __init__(self, cert: bytes, key: bytes, tmp_path, name: str) -> None:
        (tmp_path / f"{name}.crt").write_bytes(cert)
        (tmp_path / f"{name}.key").write_bytes(key)
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(tmp_path / f"{name}.crt", tmp_path / f"{name}.key")
        self.connections = self.requests = self.closed = 0

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ctx)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader, writer) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                self.requests += 1
                body = b'{"choices": [{"text": "ok"}]}'
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                             + str(len(body)).encode() + b"\r\n\r\n" + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            self.closed += 1
            writer.close()

    async def stop(self) -> None:
        self.server.close()


def test_the_pinned_client_accepts_the_replicas_certificate_and_refuses_another(tmp_path):
    right_cert, right_key = tls.self_signed(("127.0.0.1",), "right")
    other_cert, other_key = tls.self_signed(("127.0.0.1",), "impostor")
    elsewhere_cert, elsewhere_key = tls.self_signed(("10.9.9.9",), "elsewhere")

    async def main():
        real = TlsServer(right_cert, right_key, tmp_path, "r")
        impostor = TlsServer(other_cert, other_key, tmp_path, "o")
        moved_away = TlsServer(elsewhere_cert, elsewhere_key, tmp_path, "e")
        ep, ep_impostor, ep_elsewhere = await real.start(), await impostor.start(), await moved_away.start()
        pem = right_cert.decode()
        async with proxy.make_client(10) as client:
            for _ in range(3):
                assert b"ok" in await proxy.complete(client, ep, "/v1/completions", b"{}", "k", pem)
            assert (real.connections, real.requests) == (1, 3)        # one handshake: the pool keeps it alive
            # a server presenting another certificate (a host on the path impersonating the replica)
            with pytest.raises(proxy.BackendFailed, match="CERTIFICATE_VERIFY_FAILED"):
                await proxy.complete(client, ep_impostor, "/v1/completions", b"{}", "k", pem)
            with pytest.raises(proxy.BackendFailed, match="CERTIFICATE_VERIFY_FAILED"):
                await proxy.open_stream(client, ep_impostor, "/v1/completions", b"{}", "k", pem)
            assert impostor.requests == 0                              # nothing (prompt, key) was sent to it
            # the right certificate for another address: the IP check refuses it (no hostname check skipped)
            with pytest.raises(proxy.BackendFailed, match="CERTIFICATE_VERIFY_FAILED|match"):
                await proxy.complete(client, ep_elsewhere, "/v1/completions", b"{}", "k", elsewhere_cert.decode())
            assert moved_away.requests == 0
            # plain HTTP to a TLS-only server gets no answer
            with pytest.raises(proxy.BackendFailed):
                await proxy.complete(client, ep, "/v1/completions", b"{}", "k", "")
        for s in (real, impostor, moved_away):
            await s.stop()
    asyncio.run(main())


def test_a_restarted_server_is_verified_with_its_new_certificate_only(tmp_path):
    """Same address, new certificate (the server restarted): the new one is accepted, the old pool closed, and
    the old certificate no longer verifies the server."""
    old_cert, _ = tls.self_signed(("127.0.0.1",), "old")
    new_cert, new_key = tls.self_signed(("127.0.0.1",), "new")

    async def main():
        server = TlsServer(new_cert, new_key, tmp_path, "n")
        ep = await server.start()
        transport = replicahttp.PinnedTransport()
        async with httpx.AsyncClient(transport=transport, timeout=10) as client:
            url = f"https://{ep}/v1/models"
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await client.get(url, extensions=replicahttp.request_extensions(old_cert.decode()))
            r = await client.get(url, extensions=replicahttp.request_extensions(new_cert.decode()))
            assert r.status_code == 200
            assert [k[1] for k in transport.pools] == [new_cert.decode()]      # the old certificate's pool went
            with pytest.raises(httpx.UnsupportedProtocol):                      # never https without a pin
                await client.get(url)
        await server.stop()
    asyncio.run(main())


def test_a_context_trusts_only_the_pinned_certificate():
    cert, _ = tls.self_signed(("127.0.0.1",), "w")
    ctx = replicatls.context(cert.decode())
    assert ctx is replicatls.context(cert.decode())              # cached per certificate
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.cert_store_stats()["x509"] == 1                   # the pinned one: no system roots
    assert replicatls.base_url("h:1", cert.decode()) == "https://h:1" and replicatls.base_url("h:1", "") == "http://h:1"
    with pytest.raises(tls.TlsError, match="endpoint_certificate"):
        replicatls.context("not a certificate")


# -- the certificate's way from the workload to the replica and the gateway ------------------------------------

def test_the_gateways_view_carries_each_replicas_certificate():
    cert = tls.self_signed(("127.0.0.1",), "w")[0].decode()
    d = D.Deployment()
    d.spec.name, d.spec.model = "chat", "smol"
    d.replicas.add(id="r-1", deployment="chat", state=D.REPLICA_STATE_READY, endpoint="127.0.0.1:1",
                   endpoint_certificate=cert)
    d.replicas.add(id="r-2", deployment="chat", state=D.REPLICA_STATE_READY, endpoint="127.0.0.1:2")
    view = FleetView()
    view.apply(V.ServingView(deployments=[d]))
    a, b = view.deployments["chat"].replicas
    assert (a.certificate, a.scheme) == (cert, "https") and (b.certificate, b.scheme) == ("", "http")
    d.replicas[0].endpoint_certificate = "new"                   # its server restarted: the view follows
    view.apply(V.ServingView(deployments=[d]))
    assert view.deployments["chat"].replicas[0].certificate == "new"


def test_a_replica_follows_its_workloads_certificate_and_a_restarted_target_drops_it():
    w = types_pb2.Workload(id="w-1", slice_id="s-2", node="b", endpoint="10.0.0.2:4000", endpoint_certificate="B")
    s = types_pb2.Slice(id="s-2", node="b")
    r = D.Replica(id="r-1", slice_id="s-1", node="a", endpoint="10.0.0.1:4000", endpoint_certificate="A")
    n = moved(r, w, s)
    assert (n.endpoint, n.endpoint_certificate) == ("10.0.0.2:4000", "B")
    w.backend.kind = "llama.cpp"
    m = M.Migration(id="m-1", workload_id="w-1", mode=M.MIGRATION_MODE_PRECOPY, target_node="b", target_slice="s-2")
    assert committed_record(w, m, 1).endpoint_certificate == ""



def test_concurrent_first_requests_make_one_pool_even_while_an_old_one_closes(tmp_path, monkeypatch):
    """Many requests at once to a replica whose server restarted (same address, new certificate) while the
    old certificate's pool still holds a connection: one new pool for all of them, the old one closed."""
    old_cert, old_key = tls.self_signed(("127.0.0.1",), "old")
    new_cert, new_key = tls.self_signed(("127.0.0.1",), "new")
    made = []
    real = httpx.AsyncHTTPTransport

    def counting(*args, **kwargs):
        made.append(kwargs.get("verify"))
        return real(*args, **kwargs)
    monkeypatch.setattr(replicahttp.httpx, "AsyncHTTPTransport", counting)

    async def main():
        server = TlsServer(old_cert, old_key, tmp_path, "s")
        ep = await server.start()
        transport = replicahttp.PinnedTransport()
        async with httpx.AsyncClient(transport=transport, timeout=10) as client:
            url = f"https://{ep}/v1/models"
            old_pin, new_pin = (replicahttp.request_extensions(c.decode()) for c in (old_cert, new_cert))
            assert (await client.get(url, extensions=old_pin)).status_code == 200
            (tmp_path / "s.crt").write_bytes(new_cert)
            (tmp_path / "s.key").write_bytes(new_key)
            server.ctx.load_cert_chain(tmp_path / "s.crt", tmp_path / "s.key")     # "restarted": the new cert
            rs = await asyncio.gather(*(client.get(url, extensions=new_pin) for _ in range(8)))
            assert [r.status_code for r in rs] == [200] * 8
            assert [k[1] for k in transport.pools] == [new_cert.decode()]
        await server.stop()
    asyncio.run(main())
    assert len([v for v in made if v is not None]) == 2, made      # the old certificate's pool, then one new one


def test_concurrent_first_requests_share_one_pool_and_the_pools_are_bounded(tmp_path):
    """Many requests to a replica not yet pooled, at once: one pool (none closed under another's request);
    beyond max_pools the least recently used pool goes."""
    cert, key = tls.self_signed(("127.0.0.1",), "w")
    pem = cert.decode()

    async def main():
        server = TlsServer(cert, key, tmp_path, "c")
        ep = await server.start()
        transport = replicahttp.PinnedTransport(max_pools=1)
        async with httpx.AsyncClient(transport=transport, timeout=10) as client:
            pin = replicahttp.request_extensions(pem)
            rs = await asyncio.gather(*(client.get(f"https://{ep}/v1/models", extensions=pin) for _ in range(8)))
            assert [r.status_code for r in rs] == [200] * 8 and len(transport.pools) == 1
            other = await TlsServer(cert, key, tmp_path, "d").start()
            assert (await client.get(f"https://{other}/v1/models", extensions=pin)).status_code == 200
            assert [k[0].decode() for k in transport.pools] == [other]
        await server.stop()
    asyncio.run(main())


def test_a_replica_is_rolled_before_its_certificate_ends():
    """A certificate within RENEW_BEFORE_SECONDS of its end makes the replica outdated: the deployment
    controller replaces it (surge first), and the new replica's server gets a fresh certificate."""
    from types import SimpleNamespace

    from controlplane.serving import observe
    from controlplane.serving.deployments import DeploymentManager
    fresh = tls.self_signed(("127.0.0.1",), "w")[0].decode()
    ending = tls.self_signed(("127.0.0.1",), "w", days=1)[0].decode()
    assert not replicatls.expiring(fresh) and replicatls.expiring(ending) and not replicatls.expiring("")
    assert replicatls.expiring(fresh, now=replicatls.expires_at(fresh) - 3600)
    mgr = DeploymentManager.__new__(DeploymentManager)
    mgr.ctl = SimpleNamespace(fleet=SimpleNamespace(slices={}, nodes={}))
    mgr.workloads = SimpleNamespace(workloads={})
    mgr.busy, mgr.last_probe, mgr.down_since = set(), {}, {}
    for cert, want in ((fresh, False), (ending, True), ("", False)):
        r = D.Replica(id="r-1", state=D.REPLICA_STATE_READY, template="t", endpoint_certificate=cert)
        assert observe.replica(mgr, r, "t").outdated is want
