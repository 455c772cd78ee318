"""The command lines of a local cluster's daemons (tools/localcluster.py): the control plane, mesh-gateway and the
agents, with the TLS certificates they name (made under `tls_dir` on first use) and what the agents' workloads may
not connect to."""

from __future__ import annotations

import json
import math
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tools.localprocs import ClusterError


@dataclass(frozen=True)
class DaemonCommands:
    """The settings every daemon's command line takes from the cluster. With `tls_dir` the control plane serves
    TLS and agents dial its mTLS port; otherwise everything is plaintext (--insecure). `tenants_file` turns on
    tokens and authorization."""

    python: str
    log_format: str
    log_level: str
    tls_dir: Path | None = None
    tenants_file: str | None = None

    def controlplane(self, state_dir: Path, listen: str, port_file: Path, etcd_endpoints: list[str],
                     lease_ttl: float | None, mtls_listen: str, extra: list[str]) -> list[str]:
        argv = [self.python, "-m", "controlplane.main", "--state-dir", str(state_dir),
                "--listen", listen, "--metrics-listen", "127.0.0.1:0", "--port-file", str(port_file),
                "--web-listen", "127.0.0.1:0",
                "--log-format", self.log_format, "--log-level", self.log_level]
        if etcd_endpoints:
            argv += ["--etcd-endpoints", ",".join(etcd_endpoints)]
        if lease_ttl:
            argv += ["--lease-ttl", str(math.ceil(lease_ttl))]
        return argv + self._controlplane_security(mtls_listen) + extra

    def gateway(self, control_planes: list[str], token: str | None, extra: list[str]) -> list[str]:
        argv = [self.python, "-m", "controlplane.gateway.main", "--listen", "127.0.0.1:0",
                "--control-plane", ",".join(control_planes), "--log-format", self.log_format,
                "--log-level", self.log_level]
        if self.tls_dir is None:
            argv.append("--insecure")
        else:
            argv += ["--tls-ca", str(Path(self.tls_dir) / "ca.crt")]
        if token:
            argv += ["--token", token]
        if self.tenants_file:
            argv += ["--tenants-file", str(self.tenants_file)]
        return argv + extra

    def agent(self, security: list[str], host_files: Iterable[Path], state_dir: Path, egress_deny: str,
              bridge_cidr: str, extra: list[str]) -> list[str]:
        """`security`: `agent_security`'s arguments."""
        argv = [self.python, "-m", "nodeagent.main", *security, "--gpu-backend", "sim"]
        for path in host_files:
            argv += ["--sim-host-file", str(path)]
        return argv + ["--state-dir", str(state_dir), "--metrics-listen", "127.0.0.1:0",
                       "--log-format", self.log_format, "--log-level", self.log_level,
                       "--workload-egress-deny", egress_deny,
                       # each agent its own bridge network for isolated workloads, free on this host
                       # (tools/localnets.py; extra may set another)
                       "--workload-bridge-cidr", bridge_cidr, *extra]

    def _controlplane_security(self, mtls_listen: str) -> list[str]:
        args = ["--tenants-file", str(self.tenants_file)] if self.tenants_file else []
        if self.tls_dir is None:
            return args + ["--insecure"]
        from mesh import tls
        d = Path(self.tls_dir)
        if not (d / "ca.crt").exists():
            tls.write_ca(d)
        if not (d / "controlplane.crt").exists():
            tls.issue(d, "server", tls.SERVER_CN, hosts=("localhost", "127.0.0.1"), filename="controlplane")
        return args + ["--tls-cert", str(d / "controlplane.crt"), "--tls-key", str(d / "controlplane.key"),
                       "--tls-client-ca", str(d / "ca.crt"), "--mtls-listen", mtls_listen]

    def agent_security(self, nodes: list[str], control_planes: list[str], mtls_endpoint: str | None) -> list[str]:
        """How the agent process of `nodes` reaches the control plane: plaintext to every control plane, or with
        its own certificate (one node per process, which it names) to the mTLS port."""
        if self.tls_dir is None:
            return ["--control-plane", ",".join(control_planes), "--insecure"]
        from mesh import tls
        if len(nodes) != 1:
            raise ClusterError("with TLS every agent process runs one node (its certificate names it): "
                               "agents_per_process must be 1")
        d = Path(self.tls_dir)
        if not (d / f"{nodes[0]}.crt").exists():
            tls.issue(d, "agent", nodes[0])
        return ["--control-plane", str(mtls_endpoint), "--tls-ca", str(d / "ca.crt"),
                "--tls-cert", str(d / f"{nodes[0]}.crt"), "--tls-key", str(d / f"{nodes[0]}.key")]


def egress_deny(etcd_endpoints: list[str], ports_files: Iterable[Path], metrics_endpoint: str | None) -> str:
    """What the agents' workloads may not connect to: etcd's default ports, and this cluster's etcd (its
    external members' client ports, and the ports its etcds saved in `ports_files`: client and peer) and
    control-plane metrics ports (nodeagent/isolation/egress.py)."""
    ports = set()
    for url in etcd_endpoints:
        ports.add(urllib.parse.urlparse(url if "://" in url else f"http://{url}").port)
    for saved in ports_files:
        try:
            ports.update(json.loads(saved.read_text()).values())
        except (OSError, ValueError, AttributeError):
            pass
    if metrics_endpoint:
        ports.add(int(metrics_endpoint.rpartition(":")[2]))
    items = ["local:2379", "local:2380", *(f"local:{p}" for p in sorted(p for p in ports
                                                                          if isinstance(p, int) and p > 0))]
    return ",".join(dict.fromkeys(items))
