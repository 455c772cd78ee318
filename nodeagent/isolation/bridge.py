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

logger = logging.getLogger(__name__)
TABLE_PREFIX = "gpumesh_bridge_"
DEFAULT_CIDR = "10.213.0.0/24"


class BridgeError(RuntimeError):
    """The bridge or a workload's veth pair cannot be set up."""


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


def _run(*argv: str) -> str:
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        raise BridgeError(f"{' '.join(argv)}: {(p.stderr or p.stdout).strip()}")
    return p.stdout


class WorkloadBridge:
    def __init__(self, state_dir: str, cidr: str = DEFAULT_CIDR) -> None:
        tag = hashlib.sha256(os.path.realpath(state_dir).encode()).hexdigest()
        self.net = parse_cidr(cidr)
        self.name = f"gmb{tag[:8]}"                 # at most 15 characters (IFNAMSIZ)
        self.port_prefix = f"gw{tag[:6]}"           # + 3 digits of the address's last octet
        self.table = TABLE_PREFIX + tag[:12]
        self.gateway = next(self.net.hosts())
        self._lock = threading.Lock()
        self._ready = False

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

    def ensure(self) -> None:
        """The bridge (made, addressed, up) and its table (replaced atomically); idempotent."""
        if self._ready:
            return
        if self.problem():
            raise BridgeError(self.problem())
        if not os.path.exists(f"/sys/class/net/{self.name}"):
            _run("ip", "link", "add", self.name, "type", "bridge")
        addrs = _run("ip", "-4", "-o", "addr", "show", "dev", self.name)
        mine = f"{self.gateway}/{self.net.prefixlen}"
        if mine not in addrs.split():
            _run("ip", "addr", "add", mine, "dev", self.name)
        _run("ip", "link", "set", self.name, "up")
        script = f"table inet {self.table}\ndelete table inet {self.table}\n" + self._rules()
        p = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True, timeout=30)
        if p.returncode != 0:
            raise BridgeError(f"nft: {p.stderr.strip()}")
        self._ready = True
        log(logger, logging.INFO, "workload bridge ready", bridge=self.name, address=mine, table=self.table)

    def remove_if_there(self) -> None:
        """`remove` when this agent made a bridge (no command runs otherwise)."""
        if os.path.exists(f"/sys/class/net/{self.name}"):
            self.remove()

    def remove(self) -> None:
        """The bridge and its table go (the cluster's end; workloads' veth pairs go with their namespaces)."""
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

    def attach(self, pid: int) -> str:
        """Give the network namespace of process `pid` its veth pair and address; returns the address."""
        with self._lock:
            self.ensure()
            used = self.used()
            free = [h for h in self.net.hosts() if h != self.gateway and int(h) - int(self.net.network_address)
                    not in used]
            if not free:
                raise BridgeError(f"the workload network {self.net} is full ({len(used)} workloads)")
            addr = free[0]
            octet = int(addr) - int(self.net.network_address)
            host_side, inside = f"{self.port_prefix}{octet:03d}", f"gwin{octet:03d}"
            _run("ip", "link", "add", host_side, "type", "veth", "peer", "name", inside, "netns", str(pid))
            try:
                _run("ip", "link", "set", host_side, "master", self.name)
                _run("bridge", "link", "set", "dev", host_side, "isolated", "on")
                _run("ip", "link", "set", host_side, "up")
                ns = ["nsenter", f"--net=/proc/{pid}/ns/net"]
                _run(*ns, "ip", "link", "set", inside, "name", "eth0")
                _run(*ns, "ip", "addr", "add", f"{addr}/{self.net.prefixlen}", "dev", "eth0")
                _run(*ns, "ip", "link", "set", "eth0", "up")
            except BridgeError:
                subprocess.run(["ip", "link", "del", host_side], capture_output=True, timeout=30)
                raise
            return str(addr)
