"""The MPS control daemon of a GPU, behind a small interface.

`RealMps` drives NVIDIA's `nvidia-cuda-mps-control` (one daemon per GPU, each
with its own pipe and log directory); `SimMps` is a stand-in for hosts without
it (the simulated backend): it keeps the same files (the pipe directory with a
`control` entry, a `control.log` in the log directory), refuses what the real
daemon refuses, and tracks the clients the workload runner attaches.

Slices on an MPS GPU get their limits through `CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`
and `CUDA_MPS_PINNED_DEVICE_MEM_LIMIT` in their environment (nodeagent.slicer), which a
workload can change; so before a workload starts the agent also sets them on the daemon
(`set_limits`), which the workload cannot: MPS runs one server per user id, and every tenant
runs under its own uid (nodeagent/isolation), so the agent starts the tenant's server
(`start_server -uid U`), and sets `set_device_pinned_mem_limit <server pid> <dev> <MiB>M` and
`set_active_thread_percentage <server pid> <pct>` on it (and the defaults, for a server the
daemon spawns itself). The real daemon serves one uid at a time per GPU: clients of another
tenant's uid wait until the active server's clients are done (NVIDIA's MPS limitation).
`SimMps` follows the same commands and refuses a client whose memory exceeds its server's
pinned limit, as the real server fails the allocation.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from typing import Protocol

from mesh import fsmodes
from mesh.procs import pid_alive

CONTROL_BINARY = "nvidia-cuda-mps-control"


def _make_dirs(pipe_dir: str, log_dir: str) -> None:
    """The daemon's pipe and log directories, which the clients (workloads of every tenant's uid) use: 0755, as
    NVIDIA's daemon expects; the GPU's directory above them lets them pass (0711) and lists nothing."""
    for d in {os.path.dirname(pipe_dir), os.path.dirname(log_dir)}:
        fsmodes.private_dir(d, fsmodes.PASSAGE)
    for d in (pipe_dir, log_dir):
        fsmodes.private_dir(d, 0o755)


class MpsError(RuntimeError):
    """The MPS daemon could not be started, queried or stopped."""


class MpsDaemon(Protocol):
    """One MPS control daemon per GPU, addressed by its pipe directory."""

    def start(self, gpu_index: int, pipe_dir: str, log_dir: str, device: str = "") -> None:
        """Start the daemon for GPU `gpu_index` (`device`: its UUID, else the index); no-op if healthy."""

    def stop(self, gpu_index: int, pipe_dir: str) -> None:
        """Shut the daemon down; MpsError while clients are attached."""

    def healthy(self, gpu_index: int, pipe_dir: str) -> bool:
        """Whether the daemon answers on its pipe directory."""

    def add_client(self, pipe_dir: str, pid: int) -> None:
        """Note a client process (the real daemon sees its clients by itself)."""

    def remove_client(self, pipe_dir: str, pid: int) -> None:
        ...

    def set_limits(self, pipe_dir: str, uid: int, pinned_mem_bytes: int, thread_percentage: int) -> None:
        """Make sure uid's MPS server exists and holds these limits (device 0: the client's only one)."""


def limit_commands(server_pid: int, pinned_mem_bytes: int, thread_percentage: int) -> list[str]:
    mib = max(1, pinned_mem_bytes >> 20)
    return [f"set_default_device_pinned_mem_limit 0 {mib}M",
            f"set_default_active_thread_percentage {thread_percentage}",
            f"set_device_pinned_mem_limit {server_pid} 0 {mib}M",
            f"set_active_thread_percentage {server_pid} {thread_percentage}"]


def _uid_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def _env(device: str, pipe_dir: str, log_dir: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"CUDA_MPS_PIPE_DIRECTORY": pipe_dir, "CUDA_MPS_LOG_DIRECTORY": log_dir})
    if device:
        env["CUDA_VISIBLE_DEVICES"] = device
    return env


class RealMps:
    """`nvidia-cuda-mps-control`: start with `-d`, health with `get_server_list`, stop with `quit`."""

    def __init__(self, binary: str = CONTROL_BINARY, timeout: float = 10.0) -> None:
        self.binary = binary
        self.timeout = timeout

    def _path(self) -> str:
        path = shutil.which(self.binary)
        if path is None:
            raise MpsError(f"{self.binary} not found on PATH (install the NVIDIA driver utilities)")
        return path

    def _control(self, command: str, pipe_dir: str, log_dir: str = "") -> subprocess.CompletedProcess:
        try:
            return subprocess.run([self._path()], input=command + "\n", capture_output=True, text=True,
                                  env=_env("", pipe_dir, log_dir or pipe_dir), timeout=self.timeout)
        except subprocess.TimeoutExpired:
            raise MpsError(f"{self.binary}: `{command}` got no answer within {self.timeout:g}s") from None

    def start(self, gpu_index: int, pipe_dir: str, log_dir: str, device: str = "") -> None:
        if self.healthy(gpu_index, pipe_dir):
            return
        _make_dirs(pipe_dir, log_dir)
        # the daemon makes its pipes for clients of every tenant's uid: not under the agent's private umask
        res = subprocess.run([self._path(), "-d"], capture_output=True, text=True, timeout=self.timeout,
                             env=_env(device or str(gpu_index), pipe_dir, log_dir), umask=0o022)
        if res.returncode != 0:
            raise MpsError(f"starting the MPS daemon of GPU {gpu_index} failed (status {res.returncode}): "
                           f"{(res.stderr or res.stdout).strip()}")
        deadline = time.monotonic() + self.timeout
        while not self.healthy(gpu_index, pipe_dir):
            if time.monotonic() > deadline:
                raise MpsError(f"the MPS daemon of GPU {gpu_index} started but does not answer on {pipe_dir}")
            time.sleep(0.1)

    def healthy(self, gpu_index: int, pipe_dir: str) -> bool:
        if not os.path.exists(os.path.join(pipe_dir, "control")):
            return False
        try:
            return self._control("get_server_list", pipe_dir).returncode == 0
        except MpsError:
            return False

    def stop(self, gpu_index: int, pipe_dir: str) -> None:
        if not self.healthy(gpu_index, pipe_dir):
            return
        res = self._control("quit", pipe_dir)
        if res.returncode != 0:
            raise MpsError(f"stopping the MPS daemon of GPU {gpu_index} failed: {(res.stderr or res.stdout).strip()}")

    def add_client(self, pipe_dir: str, pid: int, uid: int = -1, memory_bytes: int = 0) -> None:
        pass

    def remove_client(self, pipe_dir: str, pid: int) -> None:
        pass

    def _servers(self, pipe_dir: str) -> list[int]:
        res = self._control("get_server_list", pipe_dir)
        return [int(x) for x in res.stdout.split() if x.isdigit()]

    def set_limits(self, pipe_dir: str, uid: int, pinned_mem_bytes: int, thread_percentage: int) -> None:
        server = next((p for p in self._servers(pipe_dir) if _uid_of(p) == uid), 0)
        if not server:
            res = self._control(f"start_server -uid {uid}", pipe_dir)
            if res.returncode != 0:
                raise MpsError(f"start_server -uid {uid}: {(res.stderr or res.stdout).strip()}")
            server = next((p for p in self._servers(pipe_dir) if _uid_of(p) == uid), 0)
        cmds = limit_commands(server, pinned_mem_bytes, thread_percentage)
        for cmd in cmds if server else cmds[:2]:
            res = self._control(cmd, pipe_dir)
            if res.returncode != 0 or "error" in (res.stdout + res.stderr).lower():
                raise MpsError(f"`{cmd}` failed: {(res.stderr or res.stdout).strip()}")


class SimMps:
    """A stand-in daemon: `<pipe_dir>/control` marks it running and `<pipe_dir>/sim-mps.json` holds
    its GPU, device and clients; the log directory gets `control.log` lines as the real one does.
    State lives in files, so it outlives the agent process like the real daemon."""

    STATE = "sim-mps.json"

    def _state_path(self, pipe_dir: str) -> str:
        return os.path.join(pipe_dir, self.STATE)

    def _read(self, pipe_dir: str) -> dict | None:
        try:
            with open(self._state_path(pipe_dir), encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def _write(self, pipe_dir: str, state: dict) -> None:
        tmp = self._state_path(pipe_dir) + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(state, f)
        os.replace(tmp, self._state_path(pipe_dir))

    @staticmethod
    def _log(log_dir: str, line: str) -> None:
        with open(os.path.join(log_dir, "control.log"), "a", encoding="utf-8") as f:
            f.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {line}\n")

    def start(self, gpu_index: int, pipe_dir: str, log_dir: str, device: str = "") -> None:
        if self.healthy(gpu_index, pipe_dir):
            return
        _make_dirs(pipe_dir, log_dir)
        self._write(pipe_dir, {"gpu": gpu_index, "device": device or str(gpu_index), "log_dir": log_dir,
                               "started_at": time.time(), "clients": []})
        with open(os.path.join(pipe_dir, "control"), "w", encoding="utf-8"):
            pass
        self._log(log_dir, f"Starting control daemon for GPU {gpu_index} ({device or gpu_index})")

    def healthy(self, gpu_index: int, pipe_dir: str) -> bool:
        state = self._read(pipe_dir)
        return (state is not None and state.get("gpu") == gpu_index
                and os.path.exists(os.path.join(pipe_dir, "control")))

    def clients(self, pipe_dir: str) -> list[int]:
        state = self._read(pipe_dir) or {}
        return [pid for pid in state.get("clients", []) if _alive(pid)]

    def control(self, pipe_dir: str, line: str) -> str:
        """One command of nvidia-cuda-mps-control's interactive shell (the subset the agent uses),
        with the real daemon's answers; MpsError where the real one prints an error."""
        state = self._read(pipe_dir)
        if state is None or not os.path.exists(os.path.join(pipe_dir, "control")):
            raise MpsError(f"no MPS daemon on {pipe_dir}")
        words = line.split()
        servers = state.setdefault("servers", {})          # server pid (str) -> {uid, mem, pct}
        defaults = state.setdefault("defaults", {"mem": 0, "pct": 100})
        if not words:
            return ""
        cmd, args = words[0], words[1:]
        try:
            if cmd == "get_server_list":
                return "\n".join(sorted(servers))
            if cmd == "start_server" and args[:1] == ["-uid"]:
                uid = int(args[1])
                if any(v["uid"] == uid for v in servers.values()):
                    raise MpsError(f"a server for uid {uid} already runs")
                pid = str(state.get("next_server_pid", 900_000))
                state["next_server_pid"] = int(pid) + 1
                servers[pid] = {"uid": uid, "mem": defaults["mem"], "pct": defaults["pct"]}
                out = pid
            elif cmd == "set_default_device_pinned_mem_limit":
                defaults["mem"] = _parse_mem(args[1])
                out = ""
            elif cmd == "set_default_active_thread_percentage":
                defaults["pct"] = _parse_pct(args[0])
                out = ""
            elif cmd in ("set_device_pinned_mem_limit", "set_active_thread_percentage"):
                if args[0] not in servers:
                    raise MpsError(f"no server with pid {args[0]}")
                if cmd == "set_device_pinned_mem_limit":
                    servers[args[0]]["mem"] = _parse_mem(args[2])
                else:
                    servers[args[0]]["pct"] = _parse_pct(args[1])
                out = ""
            elif cmd == "get_device_pinned_mem_limit":
                return f"{servers[args[0]]['mem'] >> 20}M" if args[0] in servers else ""
            else:
                raise MpsError(f"unknown command {cmd!r}")
        except (IndexError, ValueError) as e:
            raise MpsError(f"`{line}`: bad arguments ({e})") from None
        self._write(pipe_dir, state)
        self._log(state.get("log_dir", pipe_dir), line)
        return out

    def set_limits(self, pipe_dir: str, uid: int, pinned_mem_bytes: int, thread_percentage: int) -> None:
        state = self._read(pipe_dir) or {}
        server = next((int(p) for p, v in state.get("servers", {}).items() if v["uid"] == uid), 0)
        if not server:
            server = int(self.control(pipe_dir, f"start_server -uid {uid}"))
        for cmd in limit_commands(server, pinned_mem_bytes, thread_percentage):
            self.control(pipe_dir, cmd)

    def add_client(self, pipe_dir: str, pid: int, uid: int = -1, memory_bytes: int = 0) -> None:
        """A client connects (as the real client does at cuInit): it joins its uid's server (started
        with the defaults if none runs) and is refused when its memory exceeds the server's pinned
        limit, as the real server fails the allocation."""
        state = self._read(pipe_dir)
        if state is None or not os.path.exists(os.path.join(pipe_dir, "control")):
            raise MpsError(f"no MPS daemon on {pipe_dir}: a client cannot connect")
        if uid >= 0:
            servers = state.get("servers", {})
            server = next((v for v in servers.values() if v["uid"] == uid), None)
            if server is None:
                self.control(pipe_dir, f"start_server -uid {uid}")
                state = self._read(pipe_dir)
                server = next(v for v in state["servers"].values() if v["uid"] == uid)
            used = sum(m for p, m in state.get("client_memory", {}).items()
                       if _alive(int(p)) and state.get("client_uid", {}).get(p) == uid)
            if server["mem"] and used + memory_bytes > server["mem"]:
                self._log(state.get("log_dir", pipe_dir), f"client {pid} (uid {uid}) refused: "
                          f"{used + memory_bytes} bytes exceed the pinned memory limit {server['mem']}")
                raise MpsError(f"the MPS server of uid {uid} refuses client {pid}: {used + memory_bytes} bytes "
                               f"exceed its pinned device memory limit of {server['mem']} bytes")
            state.setdefault("client_memory", {})[str(pid)] = memory_bytes
            state.setdefault("client_uid", {})[str(pid)] = uid
        state["clients"] = sorted(set(state.get("clients", [])) | {pid})
        self._write(pipe_dir, state)

    def remove_client(self, pipe_dir: str, pid: int) -> None:
        state = self._read(pipe_dir)
        if state is not None and pid in state.get("clients", []):
            state["clients"] = [p for p in state["clients"] if p != pid]
            state.get("client_memory", {}).pop(str(pid), None)
            state.get("client_uid", {}).pop(str(pid), None)
            self._write(pipe_dir, state)

    def stop(self, gpu_index: int, pipe_dir: str) -> None:
        state = self._read(pipe_dir)
        if state is None:
            return
        clients = self.clients(pipe_dir)
        if clients:   # the real `quit` waits for its clients to finish; refusing keeps the agent responsive
            raise MpsError(f"the MPS daemon of GPU {gpu_index} still serves client(s) "
                           f"{', '.join(map(str, clients))}")
        try:
            os.unlink(os.path.join(pipe_dir, "control"))
        except FileNotFoundError:
            pass
        os.unlink(self._state_path(pipe_dir))
        if os.path.isdir(state.get("log_dir", "")):
            self._log(state["log_dir"], "Exiting control daemon")


_alive = pid_alive


def _parse_mem(text: str) -> int:
    """`4096M`, `4G` or bytes -> bytes (the daemon's value syntax)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text[-1:].upper() in units:
        return int(text[:-1]) * units[text[-1].upper()]
    return int(text)


def _parse_pct(text: str) -> int:
    v = int(text)
    if not 1 <= v <= 100:
        raise ValueError(f"active thread percentage {v} is outside 1..100")
    return v


def for_backend(backend: str) -> MpsDaemon:
    """RealMps on real GPU hosts (gpu_backend nvml), SimMps on simulated ones."""
    return SimMps() if backend == "sim" else RealMps()
