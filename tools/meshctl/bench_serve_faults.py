"""The serve bench's faults, applied the same way for every policy: `Injector` pins a simulated GPU's
temperature (`hot`, with `Throttle` slowing the backend to the reported clock ratio), declares memory
pressure (`pressure`, with `OomWatch` crashing a busy backend as a GPU at critical memory would) and kills
a backend (`kill`). Split from tools/meshctl/bench_serve_cluster.py (moves only)."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mesh.loadgen.inject import HOT_CELSIUS, OOM_RATE, PRESSURE_FRACTION, Injection, OomModel
from tools.meshctl.bench_serve_cluster import ReplicaInfo, ServeCluster, process_tree, signal_tree


def loaded_clock_ratio(host_file: Path, state_file: Path, gpu: int) -> float:
    """SM clock under full load / maximum SM clock, as the simulated GPU reports it now (its pins and
    faults), read from a scratch copy of its state so the real one is not touched."""
    import pynvml

    from nodeagent.nvml.sim import SimNvml
    with tempfile.TemporaryDirectory() as d:
        shutil.copy(state_file, Path(d) / "s.json")
        scratch = SimNvml(host_file, str(Path(d) / "s.json"))
        scratch.sim_set_load(gpu, 100.0, None)
        scratch.nvmlInit()
        try:
            h = scratch.nvmlDeviceGetHandleByIndex(gpu)
            top = scratch.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM)
            now = scratch.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM)
        finally:
            scratch.nvmlShutdown()
    return max(0.05, min(1.0, now / top)) if top else 1.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process tree (from /proc/PID/stat)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])          # utime, stime (fields 14 and 15 of stat)
        except (OSError, IndexError, ValueError):
            pass
    return total / tick


class OomWatch:
    """Applies an OomModel to one replica's backend while its GPU is at critical memory pressure: every
    `period_s` the compute it did since the last look is fed to the model; a crash is a SIGKILL of the tree.
    After a crash it waits for the deployment to bring the backend back (a new pid) and goes on."""

    def __init__(self, sc: "ServeCluster", replica: ReplicaInfo, model: OomModel, on_crash: Callable[[int], None],
                 period_s: float = 0.25):
        self.sc, self.replica, self.model, self.on_crash, self.period = sc, replica, model, on_crash, period_s
        self.crashes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"oom-{replica.index}")

    def start(self) -> "OomWatch":
        self._thread.start()
        return self

    def _run(self) -> None:
        pid, last = None, 0.0
        while not self._stop.wait(self.period):
            if pid is None or not Path(f"/proc/{pid}").exists():
                try:
                    pid = self.sc.current_pid(self.replica)
                except Exception:                     # noqa: BLE001 - the control plane is busy: look again
                    pid = None
                last = cpu_seconds(pid) if pid else 0.0
                continue
            now = cpu_seconds(pid)
            busy, last = now - last, now
            if self.model.step(busy):
                signal_tree(pid, signal.SIGKILL)
                self.crashes += 1
                self.on_crash(pid)
                pid = None

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)


class Throttle:
    """Runs a process tree at `ratio` of its speed: SIGSTOP for (1 - ratio) of every period."""

    def __init__(self, pid: int, ratio: float, period_s: float = 0.1):
        self.pid, self.ratio, self.period = pid, ratio, period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"throttle-{pid}")

    def start(self) -> "Throttle":
        if self.ratio < 1.0:
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            signal_tree(self.pid, signal.SIGSTOP)
            self._stop.wait(self.period * (1 - self.ratio))
            signal_tree(self.pid, signal.SIGCONT)
            self._stop.wait(self.period * self.ratio)
        signal_tree(self.pid, signal.SIGCONT)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        signal_tree(self.pid, signal.SIGCONT)


@dataclass
class Injector:
    """Applies injections to a ServeCluster's replicas and takes them away again."""

    sc: ServeCluster
    emulate_throttle: bool = True
    say: Callable[[str], None] = lambda _m: None
    oom_rate: float = OOM_RATE
    seed: int = 0
    applied: list[dict] = field(default_factory=list)
    _throttles: list[Throttle] = field(default_factory=list)
    _ooms: list[OomWatch] = field(default_factory=list)
    _touched: set[int] = field(default_factory=set)
    started_at: float = 0.0                     # the run's start (time.monotonic()), for the crash times

    def apply(self, inj: Injection, t: float) -> None:
        rep = self.sc.replicas[inj.replica]
        entry = {**inj.describe(), "node": rep.node, "gpu_index": rep.gpu_index, "applied_at_s": round(t, 2)}
        if inj.kind == "kill":
            pid = self.sc.backend_pid(rep)
            signal_tree(pid, signal.SIGKILL)
            entry["pid"] = pid
        else:
            nvml = self.sc.nvml(rep)
            self._touched.add(inj.replica)
            if inj.kind == "hot":
                nvml.sim_set_telemetry(rep.gpu_index, temperature_c=HOT_CELSIUS)
                entry["temperature_c"] = HOT_CELSIUS
                if self.emulate_throttle:
                    ratio = loaded_clock_ratio(*self.sc.sim_files(rep), rep.gpu_index)
                    self._throttles.append(Throttle(self.sc.backend_pid(rep), ratio).start())
                    entry["emulated_speed"] = round(ratio, 3)
            else:
                total = nvml.sim_readings()[rep.gpu_index]["memory_total_bytes"]
                used = int(total * PRESSURE_FRACTION[inj.level])
                nvml.sim_set_load(rep.gpu_index, None, used)
                entry["memory_used_bytes"] = used
                if inj.level == "critical" and self.oom_rate > 0:
                    # the same generator for every policy's run: seeded by the bench's seed and the replica
                    model = OomModel(self.oom_rate, seed=self.seed * 1000 + inj.replica)
                    self._ooms.append(OomWatch(self.sc, rep, model, lambda pid, i=inj.replica: self._crashed(i, pid))
                                      .start())
                    entry["oom_rate_per_busy_s"] = self.oom_rate
        self.applied.append(entry)
        self.say(f"injected {inj.kind} on replica {inj.replica} ({rep.node}) at {t:.1f}s")

    def _crashed(self, index: int, pid: int) -> None:
        rep = self.sc.replicas[index]
        t = time.monotonic() - self.started_at if self.started_at else 0.0
        self.applied.append({"kind": "oom", "replica": index, "at_s": round(t, 2), "node": rep.node,
                             "gpu_index": rep.gpu_index, "applied_at_s": round(t, 2), "pid": pid})
        self.say(f"OOM crash of replica {index}'s backend ({rep.node}, critical memory) at {t:.1f}s")

    def stop_faults(self) -> None:
        """Stop the OOM watches and throttles (the end of a run), before anything is restored."""
        for w in self._ooms:
            w.stop()
        self._ooms.clear()
        for th in self._throttles:
            th.stop()
        self._throttles.clear()

    def reset(self, timeout: float = 600.0) -> None:
        """Faults away, killed backends back and READY, the control plane's GPU states back to what they were."""
        self.stop_faults()
        for i in sorted(self._touched):
            rep = self.sc.replicas[i]
            self.sc.nvml(rep).sim_clear(rep.gpu_index)
        self._touched.clear()
        self.sc.wait_all_ready(timeout)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            states = self.sc.gpu_states()
            if all(states.get((r.node, r.gpu_index), ("", ""))[0] in ("low", "normal") and
                   states.get((r.node, r.gpu_index), ("", ""))[1] in ("normal", "warning") for r in self.sc.replicas):
                return
            time.sleep(0.5)
        self.say("warning: the GPU states did not come back to normal within 120 s")
