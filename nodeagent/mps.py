"""The MPS control daemon of a GPU, behind a small interface.

`RealMps` drives NVIDIA's `nvidia-cuda-mps-control` (one daemon per GPU, each
with its own pipe and log directory); `SimMps` is a stand-in for hosts without
it (the simulated backend): it keeps the same files (the pipe directory with a
`control` entry, a `control.log` in the log directory), refuses what the real
daemon refuses, and tracks the clients the workload runner attaches.

Slices on an MPS GPU get their limits through `CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`
and `CUDA_MPS_PINNED_DEVICE_MEM_LIMIT` in their environment (nodeagent.slicer);
the daemon itself is shared by every MPS slice of the GPU.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from typing import Protocol

from mesh.procs import pid_alive

CONTROL_BINARY = "nvidia-cuda-mps-control"


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
        os.makedirs(pipe_dir, exist_ok=True)
        os.makedirs(log_dir, exist_ok=True)
        res = subprocess.run([self._path(), "-d"], capture_output=True, text=True, timeout=self.timeout,
                             env=_env(device or str(gpu_index), pipe_dir, log_dir))
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

    def add_client(self, pipe_dir: str, pid: int) -> None:
        pass

    def remove_client(self, pipe_dir: str, pid: int) -> None:
        pass


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
        os.makedirs(pipe_dir, exist_ok=True)
        os.makedirs(log_dir, exist_ok=True)
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

    def add_client(self, pipe_dir: str, pid: int) -> None:
        state = self._read(pipe_dir)
        if state is None or not os.path.exists(os.path.join(pipe_dir, "control")):
            raise MpsError(f"no MPS daemon on {pipe_dir}: a client cannot connect")
        state["clients"] = sorted(set(state.get("clients", [])) | {pid})
        self._write(pipe_dir, state)

    def remove_client(self, pipe_dir: str, pid: int) -> None:
        state = self._read(pipe_dir)
        if state is not None and pid in state.get("clients", []):
            state["clients"] = [p for p in state["clients"] if p != pid]
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


def for_backend(backend: str) -> MpsDaemon:
    """RealMps on real GPU hosts (gpu_backend nvml), SimMps on simulated ones."""
    return SimMps() if backend == "sim" else RealMps()
