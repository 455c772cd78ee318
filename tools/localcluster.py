"""A local gpumesh cluster of real processes: one control plane (with its embedded
etcd) and agent processes running simulated hosts. Used by `meshctl up`, the
benchmarks and the integration tests.

    with LocalCluster(tmp_path, [make_host("sim-node-01", 8, "H100-80GB")]) as cluster:
        cluster.start()                      # returns once every node is Ready
        with cluster.client() as mesh: ...
        cluster.restart_controlplane()       # same address, state kept in etcd
        cluster.kill_agent("sim-node-01")    # SIGKILL the agent process of that node
        cluster.start_agent("sim-node-01")

Files under `state_dir`: controlplane/ (the control plane's --state-dir: port
file, identity, the embedded etcd's data in controlplane/etcd/), hosts/ (one
host file per node), agents/ (one state dir per agent process; simulated
device state in agents/<agent>/sim/<node>.state.json), bridge-nets/ (each
agent's network for isolated workloads, tools/localnets.py), logs/ (one log per
process), cluster.json (endpoint and pids, read by `meshctl down`).

The daemons' command lines are made in tools/localcommands.py; starting, waiting for and stopping processes is
tools/localprocs.py's.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh import fsmodes
from tools.localcommands import DaemonCommands, egress_deny
from tools.localhosts import agent_groups, default_agents_per_process, sim_hosts, write_host_files
from tools.localnets import BridgeNets
from tools import localprobes
from tools.localprocs import (CLUSTER_FILE, ClusterError, Proc, etcd_pids, exited, is_mesh_process, read_state,
                              signal_group, spawn, stop_detached, stop_pid, stop_workloads, wait_for, write_state)

@dataclass
class LocalCluster:
    """A control plane and agents as child processes, all files under `state_dir`.

    `hosts` are nodeagent.hostfile HostSpecs, host-file mappings (with a `node:` key) or paths
    of host files. Every child runs in its own session (Ctrl-C reaches only the caller; killing
    a child's process group takes its children along). Unless `detach`, children also get
    SIGTERM when the (main thread of the) process that started them dies. `controlplane_args`
    and `agent_args` are appended to the daemons' command lines.
    """

    state_dir: Path
    hosts: list[Any]
    lease_ttl: float | None = None
    agents_per_process: int | None = None
    etcd_endpoints: list[str] = field(default_factory=list)
    log_level: str = "info"
    log_format: str = "json"
    detach: bool = False
    python: str = sys.executable
    env: Mapping[str, str] | None = None
    controlplane_args: list[str] = field(default_factory=list)
    agent_args: list[str] = field(default_factory=list)
    # Security: with `tls_dir` the control plane serves TLS (certificates made there on first use: a CA,
    # controlplane.crt, one agent certificate per node) and agents dial its mTLS port; otherwise everything
    # is plaintext (--insecure). `tenants_file` turns on tokens and authorization; `client_auth` holds the
    # MeshClient keywords (token, ca, cert, key) that `client()` uses.
    tls_dir: Path | None = None
    tenants_file: str | None = None
    client_auth: dict = field(default_factory=dict)
    # HA: `controlplanes` processes against one etcd (one leads, the others stand by; agents and clients get
    # every endpoint). More than one needs an external etcd: `etcd_endpoints`, or `etcd_members` (a cluster of
    # that many members started under state_dir/etcd-cluster by tools.etcdcluster).
    controlplanes: int = 1
    etcd_members: int = 0
    # mesh-gateway (docs/gateway.md): started after the control plane when `gateway` is set; its URL is
    # `gateway_url`. With a tenants file it checks client tokens against it and watches with client_auth's token.
    gateway: bool = False
    gateway_args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir).resolve()
        # others pass through (to their workloads' own directories under agents/), list and read nothing
        fsmodes.passage(self.state_dir, self.state_dir)
        self.endpoint: str | None = None
        self.mtls_endpoint: str | None = None
        self.metrics_endpoint: str | None = None
        self.web: str | None = None          # the web view's URL (controlplane/web)
        self.controlplane: Proc | None = None
        self.cps: list[Proc | None] = [None] * self.controlplanes
        self.cp_endpoints: list[str | None] = [None] * self.controlplanes
        self.etcd_cluster = None
        if self.controlplanes > 1 and not (self.etcd_endpoints or self.etcd_members):
            raise ClusterError("several control planes need a shared etcd: etcd_endpoints or etcd_members")
        self.agents: dict[str, Proc] = {}
        self.gateway_proc: Proc | None = None
        self.gateway_url: str | None = None
        self.gateway_grpc: str | None = None          # HOST:PORT of InferenceService (with --grpc-listen)
        self._host_files: dict[str, Path] = {}
        self.groups: dict[str, list[str]] = {}
        running = read_state(self.state_dir)
        if running and any(is_mesh_process(p) for p in running.get("pids", {}).values()):
            raise ClusterError(f"a cluster is already running in {self.state_dir} "
                               f"(run `meshctl down --state-dir {self.state_dir}`)")
        self._write_hosts()

    # -- layout ---------------------------------------------------------------

    @property
    def nodes(self) -> list[str]:
        return list(self._host_files)

    def _dir(self, name: str) -> Path:
        """A directory of the cluster's: 0700 (logs, host files, the control planes' state), except agents/ (0711:
        the workloads' own directories are below, nodeagent/isolation/plan.py)."""
        path = self.state_dir / name
        if name == "agents":
            fsmodes.passage(self.state_dir, path)
        else:
            fsmodes.private_dir(path)
        return path

    def _write_hosts(self) -> None:
        self._host_files.update(write_host_files(self.hosts, self._dir("hosts")))
        self.groups = agent_groups(self.nodes, self.agents_per_process)

    def agent_for(self, node: str) -> str:
        for name, members in self.groups.items():
            if node in members:
                return name
        raise ClusterError(f"unknown node {node!r} (nodes: {', '.join(self.nodes)})")

    # -- processes ------------------------------------------------------------

    def _spawn(self, proc: Proc) -> None:
        # the death signal follows the starting thread: only tie the child to a main thread that waits
        spawn(proc, self.env, not self.detach and threading.current_thread() is threading.main_thread())

    def _commands(self) -> DaemonCommands:
        """The daemons' command lines from the cluster's settings now (tests change some between starts)."""
        return DaemonCommands(self.python, self.log_format, self.log_level, self.tls_dir, self.tenants_file)

    def _cp_name(self, index: int) -> str:
        return "controlplane" if index == 0 else f"controlplane-{index + 1}"

    @property
    def endpoints(self) -> list[str]:
        """Every control plane's HOST:PORT (started ones)."""
        return [e for e in self.cp_endpoints if e]

    def start_etcd(self, timeout: float = 30.0) -> list[str]:
        """Start the etcd cluster (etcd_members > 0) once; its client URLs."""
        if self.etcd_members and self.etcd_cluster is None:
            from tools.etcdcluster import EtcdCluster
            self.etcd_cluster = EtcdCluster(self.state_dir / "etcd-cluster", self.etcd_members).start(timeout)
            self.etcd_endpoints = self.etcd_cluster.endpoints
        return list(self.etcd_endpoints)

    def start_controlplane(self, timeout: float = 60.0, index: int = 0) -> str:
        """Start control plane `index` (on its previous port after a restart); its HOST:PORT."""
        self.start_etcd()
        name = self._cp_name(index)
        port_file = self._dir(name) / "endpoint.json"
        port_file.unlink(missing_ok=True)
        listen = self.cp_endpoints[index] or (self.endpoint if index == 0 else None) or "127.0.0.1:0"
        argv = self._commands().controlplane(self.state_dir / name, listen, port_file, self.etcd_endpoints,
                                             self.lease_ttl, self.mtls_endpoint or "127.0.0.1:0",
                                             self.controlplane_args)
        proc = self.cps[index] = Proc(name, argv, self._dir("logs") / f"{name}.log")
        if index == 0:
            self.controlplane = proc
        self._spawn(proc)

        def port_file_read() -> str | None:
            try:
                info = json.loads(port_file.read_text())
                self.cp_endpoints[index] = info["endpoint"]
                if index == 0:
                    self.endpoint, self.metrics_endpoint = info["endpoint"], info.get("metrics")
                    self.mtls_endpoint = info.get("mtls_endpoint") or None
                    self.web = info.get("web") or None
                self.save_state()
                return info["endpoint"]
            except (OSError, ValueError, KeyError):
                return None
        return wait_for(proc, "the control plane", port_file_read, timeout, lambda: (
            f"the control plane wrote no port file within {timeout:g}s; see {self.controlplane.log_path}"))

    def start_gateway(self, timeout: float = 60.0, args: list[str] | None = None) -> str:
        """Start mesh-gateway against control plane 0; its base URL (http://HOST:PORT)."""
        argv = self._commands().gateway(self.endpoints, self.client_auth.get("token"),
                                        self.gateway_args + list(args or []))
        proc = self.gateway_proc = Proc("gateway", argv, self._dir("logs") / "gateway.log")
        start = proc.log_path.stat().st_size if proc.log_path.exists() else 0
        self._spawn(proc)

        def listening() -> str | None:
            with open(proc.log_path, "rb") as f:
                f.seek(start)
                for line in f.read().decode(errors="replace").splitlines():
                    if line.startswith("GATEWAY_GRPC_LISTENING "):
                        self.gateway_grpc = line.split()[1]
                    if line.startswith("GATEWAY_LISTENING "):
                        self.gateway_url = "http://" + line.split()[1]
                        self.save_state()
                        return self.gateway_url
            return None
        return wait_for(proc, "the gateway", listening, timeout,
                        lambda: f"the gateway did not listen within {timeout:g}s; see {proc.log_path}")

    def stop_gateway(self, grace: float = 10.0) -> None:
        if self.gateway_proc is not None and self.gateway_proc.popen is not None:
            stop_pid(self.gateway_proc.popen.pid, grace, self.gateway_proc.popen)
        self.gateway_proc, self.gateway_url, self.gateway_grpc = None, None, None

    def _agent_proc(self, name: str) -> Proc:
        commands = self._commands()
        security = commands.agent_security(self.groups[name], self.endpoints, self.mtls_endpoint)
        argv = commands.agent(security, [self._host_files[node] for node in self.groups[name]],
                              self._dir("agents") / name, self.egress_deny(),
                              BridgeNets(self.state_dir).cidr(name, self._dir("bridge-nets") / name), self.agent_args)
        return Proc(name, argv, self._dir("logs") / f"{name}.log")

    def egress_deny(self) -> str:
        """What the agents' workloads may not connect to (tools/localcommands.py `egress_deny`): etcd's default
        ports, this cluster's etcd (its embedded or external members' client and peer ports) and control-plane
        metrics ports."""
        return egress_deny(self.etcd_endpoints, [self.etcd_data_dir / "ports.json",
                                                 *(self.state_dir / "etcd-cluster").glob("*/ports.json")],
                           self.metrics_endpoint)

    def start_agent(self, node: str) -> str:
        """Start the agent process that runs `node` (and its co-hosted nodes) if it is not running."""
        name = self.agent_for(node)
        if self.endpoint is None:
            raise ClusterError("start the control plane first")
        if not (name in self.agents and self.agents[name].running()):
            self.agents[name] = self._agent_proc(name)
            self._spawn(self.agents[name])
            self.save_state()
        return name

    def stop_agent(self, node: str, grace: float = 10.0) -> list[str]:
        """SIGTERM the agent process of `node`; the nodes it ran."""
        name = self.agent_for(node)
        proc = self.agents.get(name)
        if proc and proc.popen:
            stop_pid(proc.popen.pid, grace, proc.popen)
        return list(self.groups[name])

    def kill_agent(self, node: str, sig: int = signal.SIGKILL) -> list[str]:
        """Signal (default SIGKILL) the agent process of `node`; the nodes it ran."""
        name = self.agent_for(node)
        proc = self.agents.get(name)
        if proc and proc.running():
            signal_group(proc.popen.pid, sig)
            if sig == signal.SIGKILL:
                proc.popen.wait(timeout=10)
        return list(self.groups[name])

    def kill_controlplane(self, sig: int = signal.SIGKILL, index: int = 0) -> None:
        """Crash control plane `index` (SIGKILL takes its embedded etcd down with it)."""
        proc = self.cps[index]
        if proc and proc.running():
            signal_group(proc.popen.pid, sig)
            if sig == signal.SIGKILL:
                proc.popen.wait(timeout=10)
                self._kill_embedded_etcd()

    def leader_index(self, timeout: float = 30.0) -> int:
        """Index of the control plane that leads (its health says SERVING), waiting up to `timeout`."""
        def running(i: int) -> bool:
            return self.cps[i] is not None and self.cps[i].running()
        return localprobes.leader_index(self.cp_endpoints, running, self.client_auth, timeout)

    @property
    def etcd_data_dir(self) -> Path:
        return self.state_dir / "controlplane" / "etcd"

    def _kill_embedded_etcd(self) -> None:
        """SIGKILL an embedded etcd its (killed) control plane left running in its own session."""
        if not self.etcd_endpoints:
            for pid in etcd_pids(self.etcd_data_dir):
                signal_group(pid, signal.SIGKILL)

    def stop_controlplane(self, grace: float = 10.0, index: int | None = None) -> None:
        """SIGTERM control plane `index` (default: every one)."""
        for i, proc in enumerate(self.cps):
            if (index is None or i == index) and proc and proc.popen:
                stop_pid(proc.popen.pid, grace, proc.popen)
        self._kill_embedded_etcd()

    def restart_controlplane(self, *, kill: bool = False, wait_ready: bool = True,
                             timeout: float = 60.0) -> str:
        """Stop (SIGTERM, or SIGKILL with `kill`) and start the control plane on the same address."""
        self.kill_controlplane() if kill else self.stop_controlplane(index=0)
        endpoint = self.start_controlplane(timeout)
        if wait_ready:
            self.wait_ready(timeout)
        return endpoint

    # -- lifecycle ------------------------------------------------------------

    def start(self, wait_ready: bool = True, timeout: float = 60.0,
              progress: Callable[[str], None] | None = None) -> "LocalCluster":
        """Start the control plane, then every agent; with `wait_ready`, wait until all nodes are Ready."""
        say = progress or (lambda _msg: None)
        try:
            say("starting etcd + control plane...")
            for i in range(self.controlplanes):
                self.start_controlplane(timeout, index=i)
            say(f"control plane ready at {','.join(self.endpoints)}")
            if self.gateway:
                say(f"gateway at {self.start_gateway(timeout)}")
            say(f"starting {len(self.groups)} agent process(es) for {len(self.nodes)} host(s)...")
            for members in self.groups.values():
                self.start_agent(members[0])
            if wait_ready:
                self.wait_ready(timeout, progress=lambda r, t: say(f"{r}/{t} nodes Ready"))
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float = 60.0, nodes: Iterable[str] | None = None,
                   progress: Callable[[int, int], None] | None = None) -> list:
        """Poll AdminService.ListNodes until `nodes` (default: all) are Ready; the Node messages. A node whose
        agent this cluster (re)started counts once that agent has registered: just after a `kill_agent` and a
        `start_agent`, the killed agent's lease still reads Ready until it runs out."""
        wanted = set(nodes or self.nodes)
        started = {n: self.agents[a].started_at for a in self.groups for n in self.groups[a]
                   if n in wanted and a in self.agents}
        with self.client(timeout=5.0) as mesh:
            return localprobes.wait_nodes_ready(mesh, wanted, started, lambda: self._check_running(wanted),
                                                timeout, progress, self.state_dir / "logs")

    def _check_running(self, nodes: set[str]) -> None:
        agents = {self.agent_for(n) for n in nodes}
        for proc in [*([self.controlplane] if self.controlplanes == 1 else []),
                     *(p for n, p in self.agents.items() if n in agents)]:
            if proc is not None and proc.popen is not None and proc.popen.poll() is not None:
                raise exited(proc, proc.name)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the gateway and the agents, then the control plane, then the cluster's workloads (which outlive
        an agent restart, not the cluster); SIGKILL what is left after `grace`."""
        self.stop_gateway(grace)
        procs = [p for p in self.agents.values() if p.popen is not None]
        threads = [threading.Thread(target=stop_pid, args=(p.popen.pid, grace, p.popen)) for p in procs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.stop_controlplane(grace)
        if self.etcd_cluster is not None:
            self.etcd_cluster.stop()
        stop_workloads(self.state_dir, min(grace, 5.0))
        (self.state_dir / CLUSTER_FILE).unlink(missing_ok=True)

    def pids(self) -> dict[str, int]:
        procs = [*self.cps, *self.agents.values(), self.gateway_proc]
        return {p.name: p.pid for p in procs if p is not None and p.running()}

    def save_state(self) -> None:
        """Write cluster.json (endpoint, nodes, pids) for `meshctl down` and other tools."""
        data = {"endpoint": self.endpoint, "metrics": self.metrics_endpoint, "web": self.web,
                "gateway": self.gateway_url, "gateway_grpc": self.gateway_grpc,
                "state_dir": str(self.state_dir), "nodes": self.nodes, "agents": self.groups,
                "pids": self.pids(), "detached": self.detach}
        write_state(self.state_dir, data)

    def client(self, timeout: float = 30.0):
        from mesh.client import MeshClient
        if self.endpoint is None:
            raise ClusterError("the cluster is not started")
        return MeshClient(",".join(self.endpoints), timeout=timeout, **self.client_auth)

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["LocalCluster", "ClusterError", "sim_hosts", "default_agents_per_process", "read_state",
           "stop_detached", "CLUSTER_FILE"]

