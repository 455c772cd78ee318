"""The removal of an ended workload's cgroup, without holding the agent's event loop.

When a workload's supervisor has ended, its cgroup goes before its end is recorded: what the group still holds
(a child that left the process group, a daemon) is killed, and the group is removed once those processes have
left. A killed process may take seconds to leave (a large address space to free, a GPU context the driver tears
down, a wait in the kernel). The monitor, on the event loop, makes one attempt per pass (`CgroupRelease.gone`)
and the workload stays RUNNING until its group is gone, so heartbeats, reports and commands are served meanwhile
and an agent that dies in between removes it again after its restart (the record still says RUNNING). A group
whose processes have not left after RELEASE_WAIT seconds is left behind (a WARNING names it) and the workload
ends all the same; a later start of the same ID removes it first (nodeagent/isolation/plan.py)."""

from __future__ import annotations

import logging
import time

from mesh.logs import log

logger = logging.getLogger("nodeagent.workloads")
RELEASE_WAIT = 10.0     # seconds an ended workload waits for its cgroup's processes to leave


class CgroupRelease:
    """The runner's cgroup removals in progress (composition: `isolator` is nodeagent.isolation.Isolator)."""

    def __init__(self, isolator, node: str = "", wait: float = RELEASE_WAIT) -> None:
        self.isolator, self.node, self.wait = isolator, node, wait
        self.since: dict[str, float] = {}        # cgroup name -> monotonic time of its first attempt

    def gone(self, wid: str, cgroup: str) -> bool:
        """One step of removing `wid`'s cgroup (the first kills its processes): True when the group is gone,
        or when they did not leave in time (the group is then left); False: ask again on the next pass."""
        if not cgroup or self.isolator is None:
            return True
        if cgroup not in self.since:
            self.since[cgroup] = time.monotonic()
            self.isolator.begin_release(cgroup)
        if self.isolator.release_step(cgroup):
            self.since.pop(cgroup, None)
            return True
        if time.monotonic() - self.since[cgroup] < self.wait:
            return False
        self.since.pop(cgroup, None)
        log(logger, logging.WARNING, "workload cgroup not removed: its processes did not leave", node=self.node,
            workload=wid, cgroup=cgroup, waited_s=self.wait)
        return True
