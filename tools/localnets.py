"""Each local agent's network for isolated workloads (`--workload-bridge-cidr`).

A local cluster gives each agent a /24 of 10.213.0.0/16. Two clusters on one host must not give two agents the
same one: an agent whose network overlaps another device's refuses to start (nodeagent/isolation/bridge.py).
So the choice

- starts at a block picked from a hash of the cluster's state directory (two clusters on one host start at
  different blocks unless the hash collides),
- skips the blocks an address or route of the host already uses (another cluster's bridge, once made, and any
  other device),
- skips the blocks claimed by another cluster of this host whose state directory still exists (host-wide
  claims in `claims_dir`, the user's own directory (0700, checked), chosen under its lock; one file per block
  naming the cluster's state directory and the agent; a claim whose directory is gone is stale and taken
  over; a cluster's stop gives its claims back, as it removes its bridges),
- and is kept in the cluster's state (`bridge-nets/<agent>`), so a restarted agent gets the network its
  bridge already has (the bridge refuses another); a kept network that another cluster claimed since this one
  stopped (its bridges gone with it) is chosen anew.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import os
import stat
import tempfile
from pathlib import Path
from typing import Callable, Iterator

BASE = ipaddress.ip_network("10.213.0.0/16")
BLOCKS = 256
DEFAULT_CLAIMS = Path(tempfile.gettempdir()) / f"gpumesh-bridge-nets-{os.getuid()}"


def host_prefixes() -> list[ipaddress.IPv4Network]:
    """The IPv4 prefixes of the host's addresses and routes ([] where `ip` is missing: nothing to avoid)."""
    from nodeagent.isolation.bridge import overlapping
    try:
        return [ipaddress.ip_network(p) for p, _ in overlapping(BASE, "")]
    except (OSError, RuntimeError, ValueError):
        return []


def _block(i: int) -> ipaddress.IPv4Network:
    return ipaddress.ip_network(f"10.213.{i}.0/24")


def _index(net: ipaddress.IPv4Network) -> int:
    return int(net.network_address) >> 8 & 0xFF


class BridgeNets:
    """Chooses, claims and remembers the agents' networks of one local cluster."""

    def __init__(self, state_dir: Path, claims_dir: Path = DEFAULT_CLAIMS,
                 in_use: Callable[[], list[ipaddress.IPv4Network]] = host_prefixes) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.claims_dir = Path(claims_dir)
        self.in_use = in_use
        self._start = int.from_bytes(hashlib.sha256(str(self.state_dir).encode()).digest()[:2], "big") % BLOCKS

    def cidr(self, agent: str, kept: Path) -> str:
        """The agent's network: the one kept in the file `kept`, else a new free one (claimed, then kept)."""
        try:
            net = ipaddress.ip_network(kept.read_text().strip())
        except (OSError, ValueError):
            net = None
        with self._claims() as claims:
            if net is not None and net.prefixlen == 24 and net.subnet_of(BASE) and self._claim(claims, _index(net),
                                                                                                  agent):
                return str(net)       # its bridge, if it still stands, has this network
            used = self.in_use()
            for k in range(BLOCKS):
                i = (self._start + k) % BLOCKS
                net = _block(i)
                if any(net.overlaps(p) for p in used) or not self._claim(claims, i, agent):
                    continue
                kept.write_text(f"{net}\n")
                return str(net)
        raise RuntimeError(f"no free /24 in {BASE} for agent {agent}'s isolated workloads: every block is used "
                           f"by a device or claimed in {self.claims_dir}; pass --workload-bridge-cidr yourself")

    @contextlib.contextmanager
    def _claims(self) -> Iterator[Path | None]:
        """The claims directory, locked (flock) for one choice or release at a time, so two clusters starting
        together cannot both take over one stale claim; None when it cannot be trusted (not a directory of this
        user's, writable by others) or made: the devices' check alone then."""
        d = self.claims_dir
        try:
            d.mkdir(mode=0o700, exist_ok=True)
            st = os.lstat(d)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
                yield None
                return
            fd = os.open(d / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
        except OSError:
            yield None
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield d
        finally:
            os.close(fd)

    def _claim(self, claims: Path | None, i: int, agent: str) -> bool:
        """Claim block i for this cluster's `agent` (True), unless another agent, of this cluster or of one
        whose state directory still exists, holds it (the caller holds the claims' lock)."""
        if claims is None:
            return True
        me = f"{self.state_dir}\t{agent}"
        path = claims / str(i)
        owner = _owner(path)
        if owner == me:
            return True
        if owner and Path(owner.split("\t")[0]).is_dir():
            return False
        try:
            path.unlink(missing_ok=True)              # stale: its cluster's directory is gone
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except OSError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(me + "\n")
        return True

    def release(self) -> None:
        """Give back this cluster's claims (its state is being removed)."""
        with self._claims() as claims:
            for path in (sorted(claims.iterdir()) if claims is not None else []):
                if path.name.isdigit() and _owner(path).split("\t")[0] == str(self.state_dir):
                    path.unlink(missing_ok=True)


def _owner(path: Path) -> str:
    """Who holds a claim ("" for none, or for anything that is not a plain file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return ""
    with os.fdopen(fd) as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return ""
        return f.read(4096).strip()
