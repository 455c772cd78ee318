"""The workloads' egress guard: tenant processes may not open connections to the host's own unauthenticated
services (etcd, Prometheus endpoints), whatever their namespaces.

Workloads share the host's network namespace (a model server must be reachable by the gateway), so a tenant
process could reach every port the host listens on. This installs an nftables table with one rule in the
output hook: a new TCP or UDP flow whose socket belongs to a tenant uid (the allocated range and the mapped
uids) and whose destination is one of the denied endpoints is rejected (the connection is refused, as a
closed port would be). Established flows and other owners are untouched; loopback traffic to any other port
(a server's own helpers, the SDK's data plane, which authenticates every channel) goes through.

Endpoints (`workload_egress_deny`, comma-separated): `local:PORT` (any address of this host), `ADDRESS:PORT`
or `CIDR:PORT` (IPv4, or IPv6 in brackets), where PORT is a number or FIRST-LAST. The default denies etcd's
client and peer ports on the host; the agent adds its own metrics port.

The table (`inet gpumesh_egress_<hash of the state directory>`) is replaced atomically at each agent start and
kept when the agent stops: workloads outlive an agent restart, and so does their guard. `meshctl down` (and a
local cluster's stop) deletes it with the workloads. The table's comment names its state directory; an agent
starting deletes the guards whose state directory is gone (an agent killed and its directory removed, as a
test run's temporary one is): such a guard protects nothing any more, and its uid set, shared by every agent
of the host, would refuse today's tenants the ports it names. An nft older than table comments (0.9.7) gets the
guard without it (`install` finds out), never swept. It needs the `nft` command (the nftables package) and
CAP_NET_ADMIN; without them the agent logs why and labels the node `gpumesh.io/workload-egress=unguarded`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass

from mesh.config import ConfigError

DEFAULT_DENY = "local:2379,local:2380"
TABLE_PREFIX = "gpumesh_egress_"


@dataclass(frozen=True)
class Endpoint:
    address: str          # "local", or an IPv4/IPv6 network in CIDR form
    ports: tuple[int, int]

    @property
    def family(self) -> str:
        if self.address == "local":
            return "local"
        return "ip6" if ":" in self.address else "ip"

    def port_text(self) -> str:
        lo, hi = self.ports
        return str(lo) if lo == hi else f"{lo}-{hi}"


def _ports(text: str, where: str) -> tuple[int, int]:
    lo_s, _, hi_s = text.partition("-")
    try:
        lo, hi = int(lo_s), int(hi_s or lo_s)
    except ValueError:
        raise ConfigError(f"workload_egress_deny: {where}: {text!r} is not a port or FIRST-LAST") from None
    if not 1 <= lo <= hi <= 65535:
        raise ConfigError(f"workload_egress_deny: {where}: ports must be within 1..65535 with FIRST <= LAST")
    return lo, hi


def parse(text: str) -> list[Endpoint]:
    """`local:2379,10.0.0.0/8:9100,[::1]:2379-2380` -> endpoints; ConfigError naming the item."""
    out = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        host, sep, port = item.rpartition(":")
        if not sep or not host:
            raise ConfigError(f"workload_egress_deny: {item!r} is not HOST:PORT (HOST: local, an address or a "
                              "CIDR network, IPv6 in brackets)")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if host != "local":
            try:
                host = str(ipaddress.ip_network(host, strict=False))
            except ValueError:
                raise ConfigError(f"workload_egress_deny: {item!r}: {host!r} is not local, an address or a "
                                  "CIDR network") from None
        out.append(Endpoint(host, _ports(port, repr(item))))
    return out


def table_name(state_dir: str) -> str:
    return TABLE_PREFIX + hashlib.sha256(os.path.realpath(state_dir).encode()).hexdigest()[:12]


COMMENT_PREFIX = "gpumesh-agent "
_COMMENT_MAX = 127          # nftables keeps at most 128 bytes of a table's comment, its NUL included
_COMMENT = re.compile(r'^\s*comment "' + re.escape(COMMENT_PREFIX) + r'mnt=(\d+) ([^"]*)"\s*$', re.M)
_TABLE = re.compile(r"^table inet (" + TABLE_PREFIX + r"\w+)\s*$", re.M)


def mount_namespace() -> str:
    """This process's mount namespace (the inode of /proc/self/ns/mnt), "" when it cannot be read. A state
    directory's path means something only within one: an agent in a container sharing the host's network (and so
    its nftables) but not its mounts sees none of the host agents' directories."""
    try:
        return str(os.stat("/proc/self/ns/mnt").st_ino)
    except OSError:
        return ""


def comment(state_dir: str) -> str:
    """The table's comment naming its agent's mount namespace and state directory ("" when the path cannot be
    one: too long for nftables, or with a quote or a character outside printable ASCII, or the namespace
    unknown; such a guard is never swept)."""
    mnt = mount_namespace()
    text = f"{COMMENT_PREFIX}mnt={mnt} {os.path.realpath(state_dir)}"
    if not mnt or len(text.encode()) > _COMMENT_MAX or not all(" " <= c <= "~" and c != '"' for c in text):
        return ""
    return text


# Whether this host's nft takes a table's comment (nftables 0.9.7 and later): None until an install found out.
# Where it does not, guards go without it (never swept, as those made before the comment existed).
_comments: bool | None = None


def owner(listing: str) -> tuple[str, str] | None:
    """(mount namespace, state directory) a guard's listing (`nft list table inet T`) names in its comment, None
    when none."""
    m = _COMMENT.search(listing)
    return (m.group(1), m.group(2)) if m else None


def ruleset(table: str, uid_ranges: list[tuple[int, int]], endpoints: list[Endpoint], state_dir: str = "") -> str:
    """The nft script that replaces `table` with the guard (atomic: one transaction); with `state_dir`, the
    table's comment names it (unless this host's nft takes no table comment: `install` found out)."""
    uids = ", ".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in sorted(set(uid_ranges)))
    who = f"meta skuid {{ {uids} }} ct state new meta l4proto {{ tcp, udp }}"
    rules = []
    for e in endpoints:
        where = {"local": "fib daddr type local", "ip": f"ip daddr {e.address}",
                 "ip6": f"ip6 daddr {e.address}"}[e.family]
        rules.append(f"    {who} {where} th dport {e.port_text()} counter reject")
    body = "\n".join(rules)
    note = comment(state_dir) if state_dir and _comments is not False else ""
    return (f"table inet {table}\ndelete table inet {table}\n"
            f"table inet {table} {{\n" + (f'  comment "{note}";\n' if note else "") +
            f"  chain output {{\n    type filter hook output priority 0; policy accept;\n"
            f"{body}\n  }}\n}}\n")


def _nft(script: str) -> None:
    nft = shutil.which("nft") or "/usr/sbin/nft"
    if not os.path.exists(nft):
        raise OSError("the nft command is not installed (apt install nftables)")
    r = subprocess.run([nft, "-f", "-"], input=script, capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise OSError(f"nft: {r.stderr.strip() or 'failed'}")


def install(state_dir: str, uid_ranges: list[tuple[int, int]], endpoints: list[Endpoint]) -> str:
    """Install (or replace) the guard of the agent whose state directory is `state_dir`; its table name.
    OSError when nftables cannot be used here."""
    global _comments
    table = table_name(state_dir)
    if not endpoints:
        remove(state_dir)
        return table
    script = ruleset(table, uid_ranges, endpoints, state_dir)
    try:
        _nft(script)
    except OSError:
        bare = ruleset(table, uid_ranges, endpoints)
        if bare == script or _comments is not None:
            raise
        _nft(bare)              # (raises what a guard without the comment meets: that one was not the comment's)
        _comments = False       # an nft older than table comments (0.9.7): the guard matters, its comment does not
        return table
    if script != ruleset(table, uid_ranges, endpoints):
        _comments = True
    return table


def _gone(state_dir: str) -> bool:
    """Whether `state_dir` is certainly no directory any more: missing, or something else now. A directory this
    process cannot look into (EACCES: another user's, NFS with root squashed; EIO, ESTALE) is not gone: its
    agent may be running, and its guard is what keeps its tenants off the host's services."""
    try:
        return not stat.S_ISDIR(os.stat(state_dir).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return True
    except (OSError, ValueError):
        return False


def sweep_orphans() -> list[tuple[str, str]]:
    """Delete the guards whose comment names this process's mount namespace and a state directory that no
    longer exists in it (`_gone`); [(table, directory)] of those deleted. A guard of another mount namespace (an
    agent in a container sharing the host's network), or without the comment, or whose directory this process
    cannot look into, is left alone. Nothing when nftables cannot be listed here."""
    here = mount_namespace()
    if not here:
        return []
    nft = shutil.which("nft") or "/usr/sbin/nft"
    try:
        tables = subprocess.run([nft, "list", "tables", "inet"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    gone = []
    for table in _TABLE.findall(tables.stdout if tables.returncode == 0 else ""):
        try:
            p = subprocess.run([nft, "list", "table", "inet", table], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        mnt, state_dir = (owner(p.stdout) if p.returncode == 0 else None) or ("", "")
        if mnt == here and state_dir and _gone(state_dir):
            try:        # another agent may sweep the same table at once: gone either way
                _nft(f"table inet {table}\ndelete table inet {table}\n")
                gone.append((table, state_dir))
            except (OSError, subprocess.TimeoutExpired):
                pass
    return gone


def remove(state_dir: str) -> None:
    """Delete the guard of `state_dir`'s agent, if any (nothing when nftables is missing)."""
    table = table_name(state_dir)
    try:
        _nft(f"table inet {table}\ndelete table inet {table}\n")
    except (OSError, subprocess.TimeoutExpired):
        pass
