"""What the cgroup drivers' stand-ins in the unit tests share: the monitor's removal (nodeagent/workload_release.py
calls `begin_remove`, then `remove_step` once a pass until it answers True), done at once by the stand-in's own
`remove`."""

from __future__ import annotations


class StepRemoval:
    def begin_remove(self, name):
        pass

    def remove_step(self, name):      # the monitor's removal, one step a pass
        self.remove(name)
        return True
