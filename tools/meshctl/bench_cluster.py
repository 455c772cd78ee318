"""The cluster `meshctl bench alloc` measures: where its etcd keeps its data, and its security.

Its own LocalCluster keeps etcd's data on disk by default, as an operator's control plane does (a
temporary directory under --data-dir, default $TMPDIR or /var/tmp, whichever is on disk; a tmpfs
--data-dir is refused);
`--tmpfs` keeps the whole state dir on /dev/shm, as the benchmark did before (etcd's fsyncs then cost
nothing). Either way the simulated GPUs' device state files (the stand-in for hardware, rewritten on
every MIG change) stay on tmpfs where there is one, so the figures are the control plane's and etcd's.

`--secure` starts the cluster with TLS (the CA and certificates made as `meshctl certs` does), agents
on the mTLS port, and a tenants file: one tenant and bearer token per client, and an admin token.
Against a running cluster (`--endpoint`) the usual --ca/--cert/--key/--token flags (or $MESH_* and the
context) give the credentials.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tools.meshctl.common import CliError, info

SHM = "/dev/shm"


def fs_type(path: str | os.PathLike) -> str:
    """The filesystem type (`ext4`, `tmpfs`, ...) `path` lives on, from /proc/mounts ('' if unknown)."""
    real = os.path.realpath(path)
    best, kind = "", ""
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mount = parts[1].replace("\\040", " ")
                inside = real == mount or real.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, kind = mount, parts[2]
    except OSError:
        return ""
    return kind


def shm_dir() -> str | None:
    return SHM if os.path.isdir(SHM) and os.access(SHM, os.W_OK) else None


def default_data_dir() -> str:
    """$TMPDIR, else /var/tmp, else the working directory: the first that is a directory on disk."""
    for d in (os.environ.get("TMPDIR"), "/var/tmp", os.getcwd()):
        if d and os.path.isdir(d) and fs_type(d) != "tmpfs":
            return d
    raise CliError("no disk directory for etcd's data ($TMPDIR, /var/tmp and the working directory are tmpfs "
                   "or missing): pass --data-dir DIR, or --tmpfs")


@dataclass
class Credentials:
    """What a benchmark client dials with: TLS files and a bearer token (empty: none)."""

    ca: str = ""
    cert: str = ""
    key: str = ""
    token: str = ""

    @property
    def tls(self) -> bool:
        return bool(self.ca or self.cert)

    def auth(self) -> dict:
        return {k: v for k, v in (("ca", self.ca), ("cert", self.cert), ("key", self.key), ("token", self.token)) if v}


@dataclass
class BenchCluster:
    """The LocalCluster of one `bench alloc` run, or the facts of the running cluster it targets."""

    args: argparse.Namespace
    cluster: object = None
    state_dir: str | None = None
    shm_state: str | None = None
    endpoint: str = ""
    admin: Credentials = field(default_factory=Credentials)
    client_creds: list[Credentials] = field(default_factory=list)
    tenants: list[str] = field(default_factory=list)
    facts: dict = field(default_factory=dict)

    # -- an existing cluster ------------------------------------------------------------------

    @classmethod
    def existing(cls, args: argparse.Namespace, endpoint: str) -> "BenchCluster":
        from tools.meshctl.common import auth
        if args.secure or args.tmpfs or args.data_dir:
            raise CliError("--secure, --tmpfs and --data-dir are for the cluster bench alloc starts; "
                           "with --endpoint give that cluster's credentials (--ca, --cert/--key, --token)")
        creds = Credentials(**auth(args))
        if bool(creds.cert) != bool(creds.key):
            raise CliError("--cert and --key go together")
        bc = cls(args, endpoint=endpoint, admin=creds)
        bc.client_creds = [creds] * args.clients
        bc.tenants = [args.tenant or f"bench-{i:03d}" for i in range(args.clients)]
        bc.facts = {"cluster": "existing", "etcd_storage": "unknown (an existing cluster)", "etcd_data_dir": None,
                    "etcd_fs": None, "tls": creds.tls, "client_cert": bool(creds.cert), "token": bool(creds.token)}
        return bc

    # -- its own cluster ----------------------------------------------------------------------

    @classmethod
    def start(cls, args: argparse.Namespace) -> "BenchCluster":
        bc = cls(args)
        try:
            bc._start()
        except BaseException:
            bc.stop()
            raise
        return bc

    def _storage(self) -> None:
        args = self.args
        if args.tmpfs:
            base = shm_dir()
            if base is None:
                raise CliError(f"--tmpfs: {SHM} is missing or not writable here")
        else:
            base = args.data_dir or default_data_dir()
            if not os.path.isdir(base):
                raise CliError(f"--data-dir: {base} is not a directory")
            if fs_type(base) == "tmpfs":
                raise CliError(f"--data-dir: {base} is a tmpfs, not a disk; name a directory on disk, "
                               "or pass --tmpfs to measure etcd on tmpfs")
        self.state_dir = tempfile.mkdtemp(prefix="meshctl-bench-", dir=base)
        shm = shm_dir()
        if not args.tmpfs and shm:
            # the simulated GPUs' state files (hardware stand-ins) on tmpfs: disk latency is etcd's alone
            self.shm_state = tempfile.mkdtemp(prefix="meshctl-bench-agents-", dir=shm)
            os.symlink(self.shm_state, os.path.join(self.state_dir, "agents"))
        etcd_dir = os.path.join(self.state_dir, "controlplane", "etcd")
        self.facts = {"cluster": "started", "etcd_storage": "tmpfs" if args.tmpfs else "disk",
                      "etcd_data_dir": etcd_dir, "etcd_fs": fs_type(self.state_dir),
                      "sim_state_fs": fs_type(self.shm_state or self.state_dir)}

    def _security(self) -> dict:
        """LocalCluster keywords for --secure (TLS and tokens), and the clients' credentials."""
        n = self.args.clients
        self.tenants = [self.args.tenant or f"bench-{i:03d}" for i in range(n)]
        if not self.args.secure:
            self.client_creds = [Credentials()] * n
            self.facts.update({"tls": False, "client_cert": False, "token": False})
            return {}
        import yaml
        d = Path(self.state_dir)
        tls_dir = d / "tls"
        ca = str(tls_dir / "ca.crt")
        admin_token = secrets.token_hex(24)
        tokens = {t: secrets.token_hex(24) for t in dict.fromkeys(self.tenants)}
        tenants_file = d / "tenants.yaml"
        tenants_file.write_text(yaml.safe_dump({
            "tenants": {t: {} for t in tokens},
            "tokens": [{"name": "bench-admin", "role": "admin", "token": admin_token}]
            + [{"name": f"bench-client-{t}", "tenant": t, "role": "tenant", "token": tok} for t, tok in tokens.items()],
        }))
        os.chmod(tenants_file, 0o600)
        self.admin = Credentials(ca=ca, token=admin_token)
        self.client_creds = [Credentials(ca=ca, token=tokens[t]) for t in self.tenants]
        self.facts.update({"tls": True, "client_cert": False, "token": True, "mtls_agents": True})
        return {"tls_dir": tls_dir, "tenants_file": str(tenants_file),
                "client_auth": {"token": admin_token, "ca": ca}}

    def _start(self) -> None:
        from tools.localcluster import LocalCluster
        from tools.meshctl.cluster import sim_hosts
        args = self.args
        per_process = args.agents_per_process
        if args.secure:
            if per_process not in (None, 1):
                raise CliError("--secure: every agent process runs one node (its certificate names it): "
                               "--agents-per-process must be 1")
            per_process = 1
        self._storage()
        security = self._security()
        hosts = args.sim_hosts
        self.cluster = LocalCluster(self.state_dir, sim_hosts(hosts, args.gpus_per_host, args.gpu_model),
                                    agents_per_process=per_process, lease_ttl=args.lease_ttl,
                                    log_level="warning", **security)
        info(f"starting a cluster of {hosts} hosts ({hosts * args.gpus_per_host} GPUs) in {self.state_dir} "
             f"(etcd on {self.facts['etcd_storage']}, {self.facts['etcd_fs'] or 'unknown fs'}"
             f"{', TLS and tokens' if args.secure else ''})")
        self.cluster.start(timeout=args.ready_timeout, progress=lambda m: info("  " + m))
        self.endpoint = self.cluster.endpoint

    def stop(self) -> None:
        if self.cluster is not None:
            info("stopping the cluster...")
            self.cluster.stop()
            self.cluster = None
        if self.state_dir and not self.args.keep_state:
            shutil.rmtree(self.state_dir, ignore_errors=True)
            if self.shm_state:
                shutil.rmtree(self.shm_state, ignore_errors=True)
        elif self.state_dir:
            info(f"state and logs kept in {self.state_dir}" + (f" (device state in {self.shm_state})"
                                                               if self.shm_state else ""))
