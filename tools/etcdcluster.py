"""A multi-member etcd cluster on loopback, for HA tests and the chaos suite.

    with EtcdCluster(tmp_path / "etcd", members=3) as etcd:
        store = EtcdStore(etcd.endpoints)
        etcd.kill(1)            # SIGKILL one member; the other two keep quorum
        etcd.restart(1)         # same data dir and ports: it rejoins

Each member is a controlplane.state.etcdserver.EtcdServer with the shared
`--initial-cluster`; all start together (a member is healthy only once a
quorum is up).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import time

from controlplane.state.etcdserver import EtcdError, EtcdServer, etcd_version
from mesh.procs import with_death_signal


class Member(EtcdServer):
    def __init__(self, *args, cluster: str = "", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.cluster = cluster

    def command(self) -> list[str]:
        cmd = super().command()
        i = cmd.index("--initial-cluster")
        cmd[i + 1] = self.cluster
        cmd += ["--initial-cluster-token", "gpumesh-test"]
        return cmd

    def spawn(self) -> None:
        """Start the process without waiting for health (a lone member of a cluster never is)."""
        from mesh.fsmodes import private_dir
        private_dir(self.data_dir.parent)   # the members' data and logs: every cluster secret is in them
        private_dir(self.data_dir)
        (self.data_dir / "ports.json").write_text(
            __import__("json").dumps({"client": self.client_port, "peer": self.peer_port}))
        self._kill_stale()
        cmd = self.command()
        self.binary = cmd[0]
        with open(self.log_file, "ab") as out:
            self.log_offset = out.tell()
            self.proc = subprocess.Popen(with_death_signal(cmd), stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        (self.data_dir / "pid").write_text(str(self.proc.pid))

    def respawned_newer(self) -> bool:
        """This member exited as older than its data (an etcd 3.4 found first on data a 3.5 ran on): spawned again
        with one new enough (EtcdServer.start does the same for a lone etcd); False when it exited otherwise."""
        need = self._refused_as_older(self.log_offset)
        if not need or need <= self.needs():
            return False
        self._record_version(need)
        self.spawn()
        return True


class EtcdCluster:
    def __init__(self, root: str | os.PathLike, members: int = 3, fast: bool = True) -> None:
        self.root = pathlib.Path(root)
        self.members: list[Member] = []
        for i in range(members):
            self.members.append(Member(self.root / f"m{i}", name=f"m{i}", fast=fast,
                                       log_file=self.root / f"m{i}.log"))
        cluster = ",".join(f"{m.name}=http://{m.host}:{m.peer_port}" for m in self.members)
        for m in self.members:
            m.cluster = cluster

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def start(self, timeout: float = 30.0) -> "EtcdCluster":
        for m in self.members:
            m.spawn()
        self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 30.0, members: list[int] | None = None) -> None:
        wanted = [self.members[i] for i in (members if members is not None else range(len(self.members)))]
        deadline = time.monotonic() + timeout
        while not all(m.healthy() for m in wanted):
            for m in wanted:
                if m.proc is not None and m.proc.poll() is not None and not m.respawned_newer():
                    raise EtcdError(f"etcd member {m.name} exited with {m.proc.returncode}; see {m.log_file}")
            if time.monotonic() > deadline:
                self.stop()
                raise EtcdError(f"etcd cluster not healthy within {timeout:g}s; logs in {self.root}")
            time.sleep(0.05)
        for m in wanted:
            m._record_version(etcd_version(m.binary))      # what ran on the data: no older etcd from now on

    def kill(self, i: int) -> None:
        self.members[i].kill()

    def restart(self, i: int, timeout: float = 30.0) -> None:
        self.members[i].spawn()
        self.wait_healthy(timeout, [i])

    def stop(self) -> None:
        for m in self.members:
            m.stop(grace=5)

    def __enter__(self) -> "EtcdCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
