"""A secured local cluster for the security and fuzz tests: TLS on the client port, an mTLS port for
agents (one certificate per node), and a tenants file with tokens for two tenants, a viewer and an admin."""

from __future__ import annotations

from pathlib import Path

import grpc
import yaml

from tools.localcluster import LocalCluster

TOKENS = {
    "admin": "admin-token-0123456789abcdef",
    "team-a": "team-a-token-0123456789abcdef",
    "team-b": "team-b-token-0123456789abcdef",
    "viewer-a": "viewer-a-token-0123456789abcdef",
}
QUOTA_A_SLICES = 6
QUOTA_A_PRIORITY = 500


def write_tenants(path: Path) -> Path:
    path.write_text(yaml.safe_dump({
        "tenants": {"team-a": {"quota": {"max_slices": QUOTA_A_SLICES, "max_memory_bytes": "400GiB",
                                                "max_priority": QUOTA_A_PRIORITY}},
                    "team-b": {}},
        "tokens": [
            {"name": "ops", "role": "admin", "token": TOKENS["admin"]},
            {"name": "alice", "tenant": "team-a", "role": "tenant", "token": TOKENS["team-a"]},
            {"name": "bob", "tenant": "team-b", "role": "tenant", "token": TOKENS["team-b"]},
            {"name": "dash", "tenant": "team-a", "role": "viewer", "token": TOKENS["viewer-a"]},
        ]}))
    return path


def start(directory: Path, hosts: list) -> LocalCluster:
    tls_dir = directory / "tls"
    c = LocalCluster(directory / "cluster", hosts, lease_ttl=3, agents_per_process=1, tls_dir=tls_dir,
                     tenants_file=str(write_tenants(directory / "tenants.yaml")),
                     client_auth={"token": TOKENS["admin"], "ca": str(tls_dir / "ca.crt")})
    c.start(timeout=90)
    return c


def client(cluster: LocalCluster, who: str | None, **kw):
    """A MeshClient over TLS with `who`'s token (None: no credentials)."""
    from mesh.client import MeshClient
    return MeshClient(cluster.endpoint, token=TOKENS[who] if who else "", ca=str(cluster.tls_dir / "ca.crt"),
                      timeout=kw.pop("timeout", 15), **kw)


def agent_channel(cluster: LocalCluster, node: str) -> grpc.Channel:
    """A channel to the mTLS port with the agent certificate of `node` (made if missing)."""
    from mesh import tls
    d = Path(cluster.tls_dir)
    if not (d / f"{node}.crt").exists():
        tls.issue(d, "agent", node)
    creds = tls.channel_credentials(str(d / "ca.crt"), str(d / f"{node}.crt"), str(d / f"{node}.key"))
    return grpc.secure_channel(cluster.mtls_endpoint, creds)
