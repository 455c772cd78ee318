"""Child-process helpers for tools.localcluster: start and wait for, signal, stop, find leftovers, cluster.json.

Every signal goes to a process id this cluster recorded (checked against its
command line, so a recycled pid is never signalled), never to a name pattern.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from mesh import fsmodes
from mesh.procs import pid_alive, process_tree, with_death_signal

T = TypeVar("T")

CLUSTER_FILE = "cluster.json"


class ClusterError(Exception):
    """The cluster could not be started, reached or stopped."""


alive = pid_alive


def is_mesh_process(pid: int) -> bool:
    """Whether `pid` is alive and runs a gpumesh daemon (so a recycled pid is never signalled)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return alive(pid) if not Path("/proc").is_dir() else False
    return alive(pid) and (b"controlplane.main" in cmd or b"nodeagent.main" in cmd or b"controlplane.gateway.main" in cmd)


def signal_group(pid: int, sig: int) -> None:
    for fn, target in ((os.killpg, pid), (os.kill, pid)):
        try:
            fn(target, sig)
            return
        except (ProcessLookupError, PermissionError):
            continue


def stop_pid(pid: int, grace: float = 10.0, popen: subprocess.Popen | None = None) -> None:
    """SIGTERM `pid`, wait up to `grace` seconds, then SIGKILL its process group."""
    running = popen.poll() is None if popen is not None else alive(pid)
    if running:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if (popen.poll() is not None) if popen is not None else not alive(pid):
            break
        time.sleep(0.05)
    signal_group(pid, signal.SIGKILL)  # leftovers: the process itself or its children (etcd)
    if popen is not None:
        try:
            popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


@dataclass
class Proc:
    """One child process: its command line, log file and (once started) Popen."""

    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen | None = None
    # wall-clock time of the latest start (time.time(): compared with the control plane's timestamps)
    started_at: float = 0.0

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no log>"


def spawn(proc: Proc, env: Mapping[str, str] | None, tie_to_caller: bool) -> None:
    """Start `proc` in its own session (Ctrl-C reaches only the caller; killing its process group takes its children
    along), its output appended to its log (0600) after a line naming the command. `env`: None for this process's
    environment. With `tie_to_caller`, the child gets SIGTERM when the calling thread dies."""
    fsmodes.private_dir(proc.log_path.parent)
    env = dict(os.environ if env is None else env)
    env.setdefault("PYTHONUNBUFFERED", "1")
    fd = os.open(proc.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.fchmod(fd, 0o600)           # workload commands, tenants, node names: the operator's alone
    with open(fd, "ab") as log:
        log.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(proc.argv)}\n".encode())
        log.flush()
        argv = with_death_signal(proc.argv) if tie_to_caller else proc.argv
        proc.started_at = time.time()
        proc.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                      env=env, start_new_session=True)


def exited(proc: Proc, who: str) -> ClusterError:
    """The error for a child that exited: its status and the last lines of its log."""
    return ClusterError(f"{who} exited with status {proc.popen.returncode}; last log lines ({proc.log_path}):\n"
                        f"{proc.log_tail()}")


def wait_for(proc: Proc, who: str, ready: Callable[[], T | None], timeout: float,
             too_late: Callable[[], str]) -> T:
    """What `ready()` gives once it gives something (asked every 0.05 s); ClusterError when `proc` exits first
    (`exited`) or `timeout` seconds pass (the message `too_late()`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.running():
            raise exited(proc, who)
        got = ready()
        if got is not None:
            return got
        time.sleep(0.05)
    raise ClusterError(too_late())


def etcd_pids(data_dir: str | os.PathLike) -> list[int]:
    """Pids of etcd processes serving `data_dir` (an embedded etcd left behind by a killed
    control plane runs in its own session, so it outlives the control plane's process group)."""
    marker = os.fsencode(str(Path(data_dir)))
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and os.path.basename(argv[0]).startswith(b"etcd") and any(
                a == marker or a.startswith(marker + b"/") for a in argv[1:]):
            found.append(int(entry))
    return found


def workload_shims(state_dir: str | os.PathLike) -> list[int]:
    """The workload shims (nodeagent/shim.py) whose files lie under `state_dir`: this cluster's workloads,
    which outlive their agent by design (an agent restart adopts them)."""
    marker = str(Path(state_dir).resolve()).encode() + b"/"
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"nodeagent/shim.py") for a in argv[:3]) and any(a.startswith(marker) for a in argv):
            found.append(int(entry))
    return found


def stop_workloads(state_dir: str | os.PathLike, grace: float = 5.0) -> int:
    """Stop this cluster's workloads (SIGTERM each shim's process tree, SIGKILL what is left after `grace`):
    a cluster taken down takes its model servers and jobs with it. The number of processes signalled."""
    trees = [process_tree(pid) for pid in workload_shims(state_dir)]
    pids = [p for tree in trees for p in tree]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in pids:
            try:
                os.kill(p, sig)
            except OSError:
                pass
        deadline = time.monotonic() + grace
        while sig == signal.SIGTERM and time.monotonic() < deadline and any(pid_alive(p) for p in pids):
            time.sleep(0.05)
    remove_egress_guards(state_dir)
    remove_slice_shm_dirs(state_dir)
    remove_mesh_segments(state_dir)
    return len(pids)


def remove_mesh_segments(state_dir: str | os.PathLike) -> int:
    """Unlink the mesh buffers' shared memory segments the cluster's agents registered (their records,
    nodeagent/meshrecords.py, under each agent's `mesh/<node>/`, and those without a record that carry the
    agent's owner tag: left by a run killed between making a segment and recording it): a segment outlives its
    agent (a restarted agent re-adopts it), not the cluster. Another cluster's segments stay. The number
    unlinked."""
    from mesh.transport.shm import PREFIX, owner_tag, unlink_segment
    from nodeagent.meshrecords import BufferRecords
    from nodeagent.meshsweep import sweep_orphan_segments
    agents = Path(state_dir) / "agents"
    gone = 0
    for d in sorted(agents.glob("*/mesh/*")) if agents.is_dir() else []:
        if d.is_dir():
            gone += sum(unlink_segment(r["shm_name"]) for r in BufferRecords(str(d)).load().values()
                        if r["shm_name"].startswith(PREFIX) and "/" not in r["shm_name"])
            gone += len(sweep_orphan_segments(d.name, owner_tag(d.name, str(d)), set()))
    return gone


def remove_slice_shm_dirs(state_dir: str | os.PathLike, root: str = "") -> None:
    """Delete the slices' private /dev/shm directories of the cluster's agents (nodeagent/isolation/plan.py
    `node_shm_root`): an agent keeps them across its restarts (its workloads do), the cluster's end does not."""
    import shutil

    from nodeagent.isolation.plan import SHM_ROOT, node_shm_root
    agents = Path(state_dir) / "agents"
    for agent in (sorted(agents.iterdir()) if agents.is_dir() else []):
        runners = agent / "workloads"
        for node in (sorted(runners.iterdir()) if runners.is_dir() else []):
            if node.is_dir():
                shutil.rmtree(node_shm_root(node.name, str(node), root or SHM_ROOT), ignore_errors=True)


def remove_egress_guards(state_dir: str | os.PathLike) -> None:
    """Delete the nftables guards the cluster's agents installed for their workloads
    (nodeagent/isolation/egress.py) and their isolated workloads' bridges (bridge.py): they outlive an
    agent, not the cluster."""
    from nodeagent.isolation import egress
    from nodeagent.isolation.bridge import WorkloadBridge
    from tools.localnets import BridgeNets
    agents = Path(state_dir) / "agents"
    for d in (sorted(agents.iterdir()) if agents.is_dir() else []):
        if d.is_dir():
            egress.remove(str(d))
            WorkloadBridge(str(d)).remove_if_there()       # isolated workloads' bridge and its table
    BridgeNets(Path(state_dir)).release()               # the bridges' networks, free for another cluster


def read_state(state_dir: str | os.PathLike) -> dict | None:
    """The cluster.json of `state_dir`, or None."""
    try:
        return json.loads((Path(state_dir) / CLUSTER_FILE).read_text())
    except (OSError, ValueError):
        return None


def write_state(state_dir: str | os.PathLike, data: dict) -> None:
    """Write cluster.json (0600, replaced at once) for `meshctl down` and other tools: what `read_state` reads."""
    tmp = Path(state_dir) / f".{CLUSTER_FILE}.tmp"
    with fsmodes.private_file(tmp) as f:
        f.write((json.dumps(data, indent=2) + "\n").encode())
    os.replace(tmp, Path(state_dir) / CLUSTER_FILE)


def stop_detached(state_dir: str | os.PathLike, grace: float = 10.0) -> list[str]:
    """Stop the cluster recorded in `state_dir`/cluster.json (agents first); the names stopped."""
    state = read_state(state_dir)
    if state is None:
        raise ClusterError(f"no cluster recorded in {Path(state_dir).resolve()} (no {CLUSTER_FILE})")
    pids: dict[str, int] = state.get("pids", {})

    stopped = []
    agents = [(n, p) for n, p in pids.items() if n != "controlplane" and is_mesh_process(p)]
    threads = [threading.Thread(target=stop_pid, args=(p, grace)) for _, p in agents]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stopped += [n for n, _ in agents]
    cp = pids.get("controlplane")
    if cp and is_mesh_process(cp):
        stop_pid(cp, grace)
        stopped.append("controlplane")
    for pid in etcd_pids(Path(state_dir).resolve() / "controlplane" / "etcd"):
        stop_pid(pid, 2.0)
        stopped.append(f"etcd:{pid}")
    if stop_workloads(state_dir, grace):
        stopped.append("workloads")
    (Path(state_dir) / CLUSTER_FILE).unlink(missing_ok=True)
    return stopped


def registered_since(node, started_at: float) -> bool:
    """Whether `node`'s agent registered after `started_at` (0: no start to wait for). A control plane without
    `agent_registered_at` (older) leaves it unset: its Ready is taken as it is."""
    if not started_at or not node.HasField("agent_registered_at"):
        return True
    at = node.agent_registered_at
    return at.seconds + at.nanos / 1e9 >= started_at - 0.05     # one clock (one host); a margin for its rounding
