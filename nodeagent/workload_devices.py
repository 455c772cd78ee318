"""A workload process's registrations where the hardware would see it (mixed into
nodeagent.workloads.WorkloadRunner): a CRIU-restored process joins its cgroups, the simulated NVML lists it on
the slice's device (what makes IN_USE real there), an MPS slice's daemon takes it as a client with its
tenant's limits (a refused client is killed: its CUDA calls would fail). `_detach` undoes the registrations
when the process ends."""

from __future__ import annotations

import logging
import signal

from mesh.procs import process_tree

logger = logging.getLogger("nodeagent.workloads")
SIM_PROCESS_MEMORY = 256 << 20     # what a simulated workload occupies on its device


class DevicesMixin:
    """Needs the runner's meta, workloads, agent, mps and _signal."""

    def _attach(self, wid: str, pid: int) -> None:
        """Make the process visible where the hardware would see it (simulated NVML, MPS clients)."""
        meta = self.meta[wid]
        for procs in meta.pop("cgroup_procs", []):      # a CRIU-restored process joins its cgroups here
            for p in process_tree(pid):
                try:
                    with open(procs, "w", encoding="ascii") as f:
                        f.write(str(p))
                except OSError as e:
                    logger.warning("cannot move restored process %s into %s: %s", p, procs, e)
        nvml = self.agent.gpus.nvml
        if hasattr(nvml, "sim_add_process") and meta.get("device_uuid"):
            try:
                nvml.sim_add_process(meta["device_uuid"], pid, SIM_PROCESS_MEMORY)
                meta["sim_pid"] = pid
            except ValueError as e:
                logger.warning("cannot register workload with the simulated NVML: %s", e)
        if self.mps is not None and meta.get("mps_pipe"):
            try:
                if "uid" in meta:
                    self.mps.add_client(meta["mps_pipe"], pid, uid=meta["uid"], memory_bytes=SIM_PROCESS_MEMORY)
                else:
                    self.mps.add_client(meta["mps_pipe"], pid)
                meta["mps_pid"] = pid
            except Exception as e:   # noqa: BLE001 - the client is refused: its CUDA calls would fail
                logger.warning("cannot attach workload to the MPS daemon: %s", e)
                meta["mps_refused"] = str(e)
                self._signal(wid, signal.SIGKILL)

    def _detach(self, wid: str) -> None:
        meta = self.meta.get(wid, {})
        nvml = self.agent.gpus.nvml
        if meta.pop("sim_pid", None) is not None and hasattr(nvml, "sim_remove_process"):
            try:
                nvml.sim_remove_process(meta["device_uuid"], self.workloads[wid].pid)
            except ValueError:
                pass   # the MIG device is gone already
        if meta.pop("mps_pid", None) is not None and self.mps is not None:
            try:
                self.mps.remove_client(meta["mps_pipe"], self.workloads[wid].pid)
            except Exception:   # noqa: BLE001
                pass
