"""Before the agent tears a slice (or an orphan MIG instance) down: the workloads still on it stop first.

A GPU refuses to destroy a MIG instance whose processes still run (IN_USE), so the agent awaits these hooks
(`NodeAgent.teardown_hooks`) before a teardown; and before it adopts instances after a restart it asks which
slice each instance was made for (`NodeAgent.claim_hooks`, from the workload records)."""

from __future__ import annotations

import asyncio
import logging
import time

from gpumesh.v1 import types_pb2 as W
from mesh.logs import log

logger = logging.getLogger(__name__)
MIG_UUID_PREFIX = "MIG-"       # NVML's MIG device UUIDs; a whole GPU's start with "GPU-"


class SliceTeardown:
    """The workload runner's part in slice teardown (composition: it reads and stops the runner's workloads)."""

    def __init__(self, runner) -> None:
        self.runner = runner

    def install(self) -> "SliceTeardown":
        agent = self.runner.agent
        if hasattr(agent, "teardown_hooks"):
            agent.teardown_hooks.append(self.free_slices)
        if hasattr(agent, "claim_hooks"):
            agent.claim_hooks.append(self.device_claims)
        return self

    def device_claims(self) -> dict[str, str]:
        """{device UUID: slice ID} of the workloads running here (what a restarted agent knows of which
        slice a MIG instance was made for)."""
        return {m["device_uuid"]: w.slice_id for wid, w in self.runner.workloads.items()
                if w.state == W.WORKLOAD_STATE_RUNNING and (m := self.runner.meta.get(wid, {})).get("device_uuid")}

    async def free_slices(self, slice_ids: set[str], device_uuids: set[str], timeout: float | None = None) -> None:
        """Before slices (or orphan MIG instances, by device UUID) are torn down: stop the workloads
        still running on them and wait until they end (SIGKILL after the grace), so the GPU is not asked
        to destroy an instance its processes still use. A restarted agent meets this when the slice of a
        workload was released while the agent was away."""
        realized = getattr(self.runner.agent, "realized", {})

        def on_it(wid: str, w) -> bool:
            uuid = self.runner.meta.get(wid, {}).get("device_uuid")
            if uuid and uuid.startswith(MIG_UUID_PREFIX):
                # a MIG instance: by the device. A resize or migration commit moves a workload onto a new
                # instance under the same slice ID while the reserved slice ID (with the old instance) is
                # released; the moved workload's record still names the reserved ID and must not be stopped
                return uuid in device_uuids
            # an MPS, time-share or exclusive slice: its device is the whole GPU, which other slices share,
            # so by the slice ID; a resize's target moved the same way runs on another GPU than the
            # released reserved slice now names, and is kept
            if w.slice_id not in slice_ids:
                return False
            st = realized.get(w.slice_id)
            return not (uuid and st is not None and st.device_uuid and st.device_uuid != uuid)
        victims = [wid for wid, w in self.runner.workloads.items()
                   if w.state == W.WORKLOAD_STATE_RUNNING and not self.runner.meta.get(wid, {}).get("frozen")
                   and on_it(wid, w)]
        if not victims:
            return
        for wid in victims:
            self.runner.meta.setdefault(wid, {}).setdefault("stop_reason", "its slice was released")
            self.runner.stop(wid)
        deadline = time.monotonic() + (self.runner.stop_grace + 5 if timeout is None else timeout)
        while time.monotonic() < deadline and any(self.runner.workloads[w].state == W.WORKLOAD_STATE_RUNNING
                                                  for w in victims if w in self.runner.workloads):
            await asyncio.sleep(self.runner.poll_interval)
            self.runner.check_all()
        log(logger, logging.INFO, "stopped the workloads of slices being torn down", node=self.runner.agent.node,
            workloads=",".join(victims), slices=",".join(sorted(slice_ids)))
