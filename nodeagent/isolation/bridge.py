"""The host bridge of `gpumesh.io/network=isolated` workloads: a veth pair each, an address of the node's
workload network, reachable from the host, reaching nothing of it.

Per agent (its state directory names it): a Linux bridge `gmb<hash>` holding the first address of
`workload_bridge_cidr` (e.g. 10.213.0.1/24), and an nftables table `inet gpumesh_bridge_<hash>` that
rejects every new flow arriving from the bridge (input: the host's own services on any of its addresses;
forward: routing through the host) and lets only the replies of flows the host opened back in. The
workloads' bridge ports are `isolated` (the kernel's bridge port isolation), so two workloads on the
bridge cannot exchange a frame. What stays possible: the host (the agent, the gateway, a host-mode
process) opens a connection to a workload's address and port.

A workload's init (confine.py) unshares its network namespace and waits; the agent then `attach`es it:
the veth pair `gw<tag><octet>` (host side, a port of the bridge) / `eth0` (inside, the address
`<net>.<octet>/<prefix>`, up). The address is encoded in the host side's name, so the set of used
addresses is the bridge's ports: nothing to persist, and an address is free again when the workload's
namespace (and with it the veth pair) is gone, across agent restarts too.

The table is kept (nftkeeper.py): checked before each attach and every few seconds, applied again with a
WARNING when an nftables reload or `flush ruleset` took it away. `workload_bridge_cidr` may overlap no prefix
of another device of the host (`check_overlap`: another agent's bridge, a real network), or the host's traffic
to one workload could reach another's or a workload could take over a real network's traffic. A workload's
namespace is pinned once (a descriptor of `/proc/<pid>/ns/net`, never the host's) and every step uses that
descriptor, so a reused pid cannot put the veth pair's inner end anywhere else. One `WorkloadBridge` (and one
lock) per bridge name in a process (`shared`).

Needs `ip` and `nsenter` (iproute2, util-linux), `nft`, and CAP_NET_ADMIN; `problem()` says what is missing.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import shutil
import subprocess
import threading

from mesh.config import ConfigError
from mesh.logs import log
from nodeagent.isolation.nftkeeper import KEEPER, TableKeeper

logger = logging.getLogger(__name__)
TABLE_PREFIX = "gpumesh_bridge_"
DEFAULT_CIDR = "10.213.0.0/24"


class BridgeError(RuntimeError):
    """The bridge or a workload's veth pair cannot be set up."""


class CidrOverlapError(BridgeError, ConfigError):
    """`workload_bridge_cidr` overlaps a prefix of another device of the host (at agent start: a
    configuration error)."""


def parse_cidr(text: str) -> ipaddress.IPv4Network:
    """`workload_bridge_cidr`: an IPv4 network of 4 to 254 hosts (/24 to /29)."""
    try:
        net = ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as e:
        raise ConfigError(f"workload_bridge_cidr: {text!r} is not a network in CIDR form ({e})") from None
    if net.version != 4 or not 24 <= net.prefixlen <= 29:
        raise ConfigError(f"workload_bridge_cidr: {text!r}: an IPv4 network from /24 to /29 is needed "
                          "(e.g. 10.213.0.0/24: the host takes the first address, workloads the others)")
    return net


def _run(*argv: str, pass_fds: tuple[int, ...] = ()) -> str:
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=30, pass_fds=pass_fds)
    if p.returncode != 0:
        raise BridgeError(f"{' '.join(argv)}: {(p.stderr or p.stdout).strip()}")
    return p.stdout


def overlapping(net: ipaddress.IPv4Network, own_device: str) -> list[tuple[str, str]]:
    """(prefix, device) of the host's IPv4 addresses and main-table routes (`ip -4 addr`, `ip -4 route`;
    the default route aside) on devices other than `own_device` that overlap `net`."""
    found = []
    for line in _run("ip", "-4", "-o", "addr", "show").splitlines():
        f = line.split()                       # 2: eth0    inet 192.0.2.2/24 brd ... scope global eth0
        if len(f) >= 4 and f[2] == "inet":
            found.append((str(ipaddress.ip_interface(f[3]).network), f[1]))
    for line in _run("ip", "-4", "-o", "route", "show").splitlines():
        f = line.split()                       # 192.0.2.0/24 dev eth0 proto kernel ... | default via ...
        if not f or f[0] == "default" or "dev" not in f[:-1]:
            continue
        try:
            found.append((str(ipaddress.ip_network(f[0], strict=False)), f[f.index("dev") + 1]))
        except ValueError:
            continue                           # unreachable/blackhole/... types: their prefix is the 2nd field
    return sorted({(p, d) for p, d in found if d != own_device and ipaddress.ip_network(p).overlaps(net)})


class WorkloadBridge:
    def __init__(self, state_dir: str, cidr: str = DEFAULT_CIDR, keeper: TableKeeper = KEEPER) -> None:
        tag = hashlib.sha256(os.path.realpath(state_dir).encode()).hexdigest()
        self.net = parse_cidr(cidr)
        self.name = f"gmb{tag[:8]}"                 # at most 15 characters (IFNAMSIZ)
        self.port_prefix = f"gw{tag[:6]}"           # + 3 digits of the address's last octet
        self.table = TABLE_PREFIX + tag[:12]
        self.gateway = next(self.net.hosts())
        self._lock = threading.Lock()
        self._ready = False
        self.keeper = keeper

    @staticmethod
    def problem() -> str:
        """What this host lacks for isolated workloads ("" when nothing)."""
        missing = [c for c in ("ip", "nsenter", "nft", "bridge") if shutil.which(c) is None]
        if missing:
            return f"{', '.join(missing)} not found (iproute2, util-linux, nftables)"
        return ""

    # -- the bridge and its firewall --------------------------------------------------------

    def _rules(self) -> str:
        br = self.name
        return (f"table inet {self.table} {{\n"
                "  chain input {\n    type filter hook input priority -10; policy accept;\n"
                f'    iifname "{br}" ct state established,related accept\n'
                f'    iifname "{br}" meta l4proto tcp reject with tcp reset\n'
                f'    iifname "{br}" reject\n  }}\n'
                "  chain forward {\n    type filter hook forward priority -10; policy accept;\n"
                f'    oifname "{br}" ct state established,related accept\n'
                f'    iifname "{br}" reject\n    oifname "{br}" reject\n  }}\n}}\n')

    def check_overlap(self) -> None:
        """CidrOverlapError when `workload_bridge_cidr` overlaps an address or route of another device."""
        clash = overlapping(self.net, self.name)
        if clash:
            prefix, dev = clash[0]
            raise CidrOverlapError(
                f"workload_bridge_cidr: {self.net} overlaps {prefix} on device {dev} (" +
                ", ".join(f"{p} dev {d}" for p, d in clash) + "): isolated workloads' addresses would clash with "
                "it; give this agent a network no device of the host uses (each agent on a host its own)")

    def _script(self) -> str:
        return f"table inet {self.table}\ndelete table inet {self.table}\n" + self._rules()

    def ensure(self) -> None:
        """The bridge (made, addressed, up) and its table (replaced atomically, then kept: a table removed
        since, e.g. by an nftables reload, is applied again with a WARNING); idempotent."""
        if self._ready and os.path.exists(f"/sys/class/net/{self.name}") and self.keeper.watching(self.table):
            self.keeper.check(self.table)
            return
        if self.problem():
            raise BridgeError(self.problem())
        self.check_overlap()
        if not os.path.exists(f"/sys/class/net/{self.name}"):
            _run("ip", "link", "add", self.name, "type", "bridge")
        addrs = _run("ip", "-4", "-o", "addr", "show", "dev", self.name)
        mine = f"{self.gateway}/{self.net.prefixlen}"
        if mine not in addrs.split():
            _run("ip", "addr", "add", mine, "dev", self.name)
        _run("ip", "link", "set", self.name, "up")
        p = subprocess.run(["nft", "-f", "-"], input=self._script(), capture_output=True, text=True, timeout=30)
        if p.returncode != 0:
            raise BridgeError(f"nft: {p.stderr.strip()}")
        self.keeper.watch(self.table, self._script)
        self._ready = True
        log(logger, logging.INFO, "workload bridge ready", bridge=self.name, address=mine, table=self.table)

    def remove_if_there(self) -> None:
        """`remove` when this agent made a bridge (no command runs otherwise)."""
        if os.path.exists(f"/sys/class/net/{self.name}"):
            self.remove()

    def remove(self) -> None:
        """The bridge and its table go (the cluster's end; workloads' veth pairs go with their namespaces)."""
        self.keeper.forget(self.table)
        subprocess.run(["nft", "delete", "table", "inet", self.table], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", self.name], capture_output=True, timeout=30)
        self._ready = False

    # -- workloads ------------------------------------------------------------------------------

    def used(self) -> set[int]:
        """The last octets taken: the bridge's ports are named after them."""
        try:
            ports = os.listdir(f"/sys/class/net/{self.name}/brif")
        except OSError:
            return set()
        return {int(p[len(self.port_prefix):]) for p in ports
                if p.startswith(self.port_prefix) and p[len(self.port_prefix):].isdigit()}

    @staticmethod
    def pin(pid: int, expect: str = "") -> int:
        """A descriptor of the network namespace of process `pid` (BridgeError when it is the host's, or not
        `expect`, its `net:[inode]` as seen before); the caller closes it."""
        try:
            fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise BridgeError(f"the workload's network namespace (pid {pid}): {e}") from None
        st, host = os.fstat(fd), os.stat("/proc/self/ns/net")
        if (st.st_dev, st.st_ino) == (host.st_dev, host.st_ino) or (expect and expect != f"net:[{st.st_ino}]"):
            os.close(fd)
            raise BridgeError(f"pid {pid} is not in the workload's network namespace (" +
                              ("the host's" if st.st_ino == host.st_ino else f"net:[{st.st_ino}], not {expect}") +
                              "): the workload's init ended")
        return fd

    def attach(self, pid: int, ns_fd: int | None = None) -> str:
        """Give the network namespace of process `pid` (pinned by `ns_fd` when given: every step uses the
        descriptor, never the pid again) its veth pair and address; returns the address."""
        own = ns_fd is None
        fd = self.pin(pid) if own else ns_fd
        try:
            with self._lock:
                return self._attach(fd)
        finally:
            if own:
                os.close(fd)

    def _attach(self, fd: int) -> str:
        self.ensure()
        used = self.used()
        free = [h for h in self.net.hosts() if h != self.gateway and int(h) - int(self.net.network_address)
                not in used]
        if not free:
            raise BridgeError(f"the workload network {self.net} is full ({len(used)} workloads)")
        addr = free[0]
        octet = int(addr) - int(self.net.network_address)
        host_side, inside = f"{self.port_prefix}{octet:03d}", f"gwin{octet:03d}"
        ns_path = f"/proc/self/fd/{fd}"          # the child's own copy of the descriptor (pass_fds)
        _run("ip", "link", "add", host_side, "type", "veth", "peer", "name", inside, "netns", ns_path,
             pass_fds=(fd,))
        try:
            _run("ip", "link", "set", host_side, "master", self.name)
            _run("bridge", "link", "set", "dev", host_side, "isolated", "on")
            _run("ip", "link", "set", host_side, "up")
            ns = ["nsenter", f"--net={ns_path}"]
            _run(*ns, "ip", "link", "set", inside, "name", "eth0", pass_fds=(fd,))
            _run(*ns, "ip", "addr", "add", f"{addr}/{self.net.prefixlen}", "dev", "eth0", pass_fds=(fd,))
            _run(*ns, "ip", "link", "set", "eth0", "up", pass_fds=(fd,))
        except BridgeError:
            subprocess.run(["ip", "link", "del", host_side], capture_output=True, timeout=30)
            raise
        return str(addr)


_SHARED: dict[str, WorkloadBridge] = {}
_SHARED_LOCK = threading.Lock()


def shared(state_dir: str, cidr: str = DEFAULT_CIDR) -> WorkloadBridge:
    """The process's one `WorkloadBridge` of `state_dir` (several simulated agents of one process share
    their bridge: one object, one lock, so concurrent attaches never pick the same address)."""
    b = WorkloadBridge(state_dir, cidr)
    with _SHARED_LOCK:
        have = _SHARED.setdefault(b.name, b)
    if have.net != b.net:
        raise ConfigError(f"workload_bridge_cidr: {cidr} differs from {have.net}, which bridge {b.name} of this "
                          "process already has")
    return have
