"""A hand-started llama.cpp server's TLS certificate is renewed by its agent (nodeagent/workload_renewal.py): the
real server (SmolLM2-135M GGUF) started with `run_workload(backend="llama.cpp")`, on an agent whose renewal window
is its certificate's life less 90 s (`--backend-tls-renew-before-seconds`), so the first renewal comes about 90 s
after the start. The workload then reports a new certificate on the same endpoint, the server presents it (the old
one no longer verifies it), it still requires its API key, and a NodeEvent says it was renewed. Before, the
server kept its first certificate until clients refused it (30 days later, with nothing said)."""

from __future__ import annotations

import httpx
import pytest

from mesh import replicatls, tls
from tests.integration.conftest import wait_for
from tests.integration.serving import h100_hosts, llama_env, need_llama, started_cluster
from tests.integration.serving import module_mesh  # noqa: F401 - fixture mesh
from tests.models_util import smollm2_gguf

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]
SLOW = 300
WINDOW = tls.SELF_SIGNED_DAYS * 86400 - 90      # a fresh certificate is due 90 s after it was made
KEY = "renew-key-" + "0123456789abcdef" * 2


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    need_llama()
    with started_cluster(tmp_path_factory, "renewal", h100_hosts(1, mig=False), env=llama_env(),
                         agent_args=["--backend-tls-renew-before-seconds", str(WINDOW)]) as c:
        yield c


def status(w, certificate: str, key: str = KEY) -> int | None:
    """The status of GET /v1/models on `w`'s server verified against `certificate`; None while it does not answer."""
    try:
        return httpx.get(replicatls.base_url(w.endpoint, w.endpoint_certificate) + "/v1/models",
                         headers={"Authorization": f"Bearer {key}"}, verify=replicatls.verify(certificate),
                         timeout=10).status_code
    except httpx.HTTPError:
        return None


def refused(w, certificate: str) -> bool:
    try:
        httpx.get(replicatls.base_url(w.endpoint, w.endpoint_certificate) + "/v1/models",
                  verify=replicatls.verify(certificate), timeout=10)
    except httpx.ConnectError as e:
        return "CERTIFICATE_VERIFY_FAILED" in str(e)
    return False


def test_a_hand_started_llama_cpp_server_gets_a_new_certificate_before_its_own_ends(cluster, mesh):
    alloc = mesh.allocate(tenant="team-a", memory_bytes=2 << 30)
    try:
        w = mesh.run_workload(alloc.slices[0].id, backend="llama.cpp", artifact=str(smollm2_gguf()), context=256,
                              served_name="tiny", api_key=KEY)
        first = wait_for(lambda: (lambda x: x if x.state == 2 and x.endpoint_certificate else None)(
            mesh.get_workload(w.id)), SLOW, "the server to run and report its certificate")
        assert wait_for(lambda: status(first, first.endpoint_certificate) == 200, SLOW, "the server to answer")
        renewed = wait_for(lambda: (lambda x: x if x.state == 2 and x.endpoint_certificate not in
                                    ("", first.endpoint_certificate) else None)(mesh.get_workload(w.id)),
                           SLOW, "the workload to report a renewed certificate")
        assert renewed.endpoint == first.endpoint and renewed.pid != first.pid     # restarted, same address
        assert replicatls.expires_at(renewed.endpoint_certificate) > replicatls.expires_at(first.endpoint_certificate)
        assert wait_for(lambda: status(renewed, renewed.endpoint_certificate) == 200, SLOW,
                        "the restarted server to answer with its new certificate")
        assert status(renewed, renewed.endpoint_certificate, key="wrong") == 401      # its key still guards it
        assert refused(renewed, first.endpoint_certificate)           # the old certificate no longer verifies it
        events = wait_for(lambda: mesh.list_events(reason="BackendCertificateRenewed"), 60,
                          "the renewal's event to be recorded")
        assert any(w.id in e.message and "backend restarted" in e.message for e in events)
        mesh.stop_workload(w.id)
        assert wait_for(lambda: mesh.get_workload(w.id).state in (3, 4, 5), SLOW, "the workload to end") and \
            mesh.get_workload(w.id).state == 5           # STOPPED: the renewal does not outlive the stop
    finally:
        mesh.release(alloc.allocation_id)
