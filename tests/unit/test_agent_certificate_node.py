"""An agent whose certificate is another node's stops at start (exit status 2, naming both names and how to
get the right certificate) instead of running and being refused by the control plane on every reconnect for
ever (operator walk, session 15: a host file naming gpu-003 with gpu-001's certificate logged PERMISSION_DENIED
"agent certificate 'gpu-001' may not speak for node 'gpu-003'" every few seconds, the service up)."""

from __future__ import annotations

import pytest

from mesh import tls
from nodeagent import main as agentmain

HOST = "node: {node}\ngpus:\n  - {{model: H100-80GB, count: 1, mig: true}}\n"


@pytest.fixture
def started(monkeypatch):
    """main() up to the point where it would connect: what it built, without the host's isolation and data plane."""
    ran = []
    monkeypatch.setattr(agentmain, "install_components", lambda agents, cfg: agents)
    monkeypatch.setattr("nodeagent.registrar.attach_all", lambda agents, cfg: None)

    async def run(agents):
        ran.append([a.node for a in agents])
    monkeypatch.setattr(agentmain, "run", run)
    return ran


def _argv(tmp_path, node: str, cert: str) -> list[str]:
    pki = tmp_path / "pki"
    host = tmp_path / f"{node}.host.yaml"
    host.write_text(HOST.format(node=node))
    return ["--gpu-backend", "sim", "--sim-host-file", str(host), "--state-dir", str(tmp_path / "state"),
            "--tls-ca", str(pki / "ca.crt"), "--tls-cert", str(pki / f"{cert}.crt"),
            "--tls-key", str(pki / f"{cert}.key"), "--log-format", "text"]


def test_another_nodes_certificate_stops_the_agent_at_start(tmp_path, capsys, started):
    tls.write_ca(tmp_path / "pki")
    tls.issue(tmp_path / "pki", "agent", "gpu-001")
    rc = agentmain.main(_argv(tmp_path, "gpu-003", "gpu-001"))
    err = capsys.readouterr().err
    assert rc == 2 and started == []
    assert "tls_cert" in err and "'gpu-001'" in err and "'gpu-003'" in err and "--kind agent --name gpu-003" in err


def test_a_client_certificate_is_not_an_agents(tmp_path, capsys, started):
    tls.write_ca(tmp_path / "pki")
    tls.issue(tmp_path / "pki", "client", "ops", role="admin")
    rc = agentmain.main(_argv(tmp_path, "gpu-003", "ops"))
    assert rc == 2 and started == [] and "not an agent certificate" in capsys.readouterr().err


def test_the_nodes_own_certificate_starts(tmp_path, started):
    tls.write_ca(tmp_path / "pki")
    tls.issue(tmp_path / "pki", "agent", "gpu-003")
    assert agentmain.main(_argv(tmp_path, "gpu-003", "gpu-003")) == 0 and started == [["gpu-003"]]
