"""GPU reset on the control plane's request (the health policy's recovery, controlplane/controllers/health.py).

NVML has no public reset call (``nvmlDeviceResetGpuLockedClocks`` only unlocks clocks); a GPU is
reset with ``nvidia-smi --gpu-reset -i <GPU>``, as root, and only when nothing uses it: nvidia-smi
refuses ("in use by another process") while compute processes run on it, and cannot reach a GPU
that fell off the bus. This module does the same on every backend: it first asks NVML for the
compute processes of the GPU and its MIG devices and refuses while there are any, then resets —
through ``nvidia-smi`` on a real host, through the simulated NVML's ``sim_reset_gpu`` (the same
semantics: IN_USE, GPU_IS_LOST) in the simulator. A reset drops the GPU's MIG instances, so the
agent then reconciles its desired slices again (they are recreated, as after a reboot).

The answer goes back as a NodeEvent: "GpuReset" (Normal) or "GpuResetFailed" (Warning, why).
"""

from __future__ import annotations

import asyncio
import logging
import subprocess

from gpumesh.v1 import node_service_pb2
from mesh.logs import log
from nodeagent.agent import node_event

logger = logging.getLogger(__name__)
NVIDIA_SMI_RESET = ("nvidia-smi", "--gpu-reset", "-i")
RESET_TIMEOUT_S = 120


class ResetRefused(Exception):
    """The reset was not done; the message says why."""


class GpuResetter:
    def __init__(self, agent, command: tuple[str, ...] = NVIDIA_SMI_RESET) -> None:
        self.agent = agent
        self.command = command
        self.lock = asyncio.Lock()

    def install(self) -> "GpuResetter":
        self.agent.handlers["gpu_reset"] = self.on_command
        return self

    async def on_command(self, cmd: node_service_pb2.GpuReset, outbox: asyncio.Queue) -> None:
        async with self.lock:
            collector = getattr(self.agent, "collector", None)
            if collector is not None:
                # the XIDs logged before the reset first (a burst the last poll cut in two): they belong to the
                # incident the reset ends, and would read as a new one after its result
                await collector.report_events(outbox)
            try:
                await asyncio.to_thread(self.reset, cmd.gpu_index)
            except ResetRefused as e:
                log(logger, logging.WARNING, "GPU reset refused", node=self.agent.node, gpu=cmd.gpu_index,
                    reason=cmd.reason, error=str(e))
                outbox.put_nowait(node_service_pb2.AgentMessage(event=node_event(
                    "Warning", "GpuResetFailed", f"GPU {cmd.gpu_index} reset failed: {e}", cmd.gpu_index)))
                return
            log(logger, logging.INFO, "GPU reset", node=self.agent.node, gpu=cmd.gpu_index, reason=cmd.reason)
            # The reset dropped the GPU's MIG instances: realize the desired slices again.
            await self.agent._apply(node_service_pb2.DesiredSlices(full=True, upserts=list(self.agent.desired.values())),
                                    outbox)
            outbox.put_nowait(node_service_pb2.AgentMessage(event=node_event(
                "Normal", "GpuReset", f"GPU {cmd.gpu_index} reset ({cmd.reason or 'asked by the control plane'})",
                cmd.gpu_index)))

    def pids(self, index: int) -> list[int]:
        """Compute processes on the GPU and on each of its MIG devices."""
        n = self.agent.gpus.nvml
        h = self.agent.gpus.handle(index)
        pids = {int(p.pid) for p in n.nvmlDeviceGetComputeRunningProcesses(h)}
        try:
            count = n.nvmlDeviceGetMaxMigDeviceCount(h)
        except n.NVMLError:
            count = 0
        for i in range(count):
            try:
                mig = n.nvmlDeviceGetMigDeviceHandleByIndex(h, i)
            except n.NVMLError:
                continue
            pids.update(int(p.pid) for p in n.nvmlDeviceGetComputeRunningProcesses(mig))
        return sorted(pids)

    def reset(self, index: int) -> None:
        n = self.agent.gpus.nvml
        try:
            pids = self.pids(index)
        except n.NVMLError as e:
            raise ResetRefused(f"cannot list its processes: {e}") from None
        if pids:
            raise ResetRefused(f"in use by process(es) {', '.join(map(str, pids))}")
        if hasattr(n, "sim_reset_gpu"):
            try:
                n.sim_reset_gpu(index)
            except n.NVMLError_InUse:
                raise ResetRefused("in use by another process") from None
            except n.NVMLError as e:
                raise ResetRefused(str(e)) from None
            return
        try:
            uuid = n.nvmlDeviceGetUUID(self.agent.gpus.handle(index))
        except n.NVMLError as e:
            raise ResetRefused(str(e)) from None
        uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
        try:
            r = subprocess.run([*self.command, uuid], capture_output=True, text=True, timeout=RESET_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ResetRefused(f"{' '.join(self.command)} {uuid}: {e}") from None
        if r.returncode != 0:
            text = (r.stdout + r.stderr).strip().splitlines()
            why = text[-1] if text else f"exit status {r.returncode}"
            raise ResetRefused(("in use: " if "in use" in why.lower() else "") + why)
