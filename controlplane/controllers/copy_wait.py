"""How long the control plane waits for an agent's answer to one step (`MigrationManager._ask`).

A short step (start a target, resume, stop) has a fixed timeout. A long one (CHECKPOINT into the store, a
restore's PUSH_CHECKPOINT, a migration's SEND) takes as long as its state needs: tens of GB of GPU and host memory
to a slow store is more than half an hour. It is waited for as long as its agent reports progress (PROGRESS with
other bytes than before, or a new pre-copy round; the source's pause) and fails after `idle` seconds without any
(`copy_idle_timeout_seconds`: a dead agent, a lost node, a step stuck), or after `ceiling` seconds in all
(`copy_timeout_seconds`), progress or not.
"""

from __future__ import annotations

from gpumesh.v1 import migration_service_pb2 as M

R = M.MigrationReport


IDLE_NAME = "copy_idle_timeout_seconds"


class Idle(float):
    """An idle period that is not `copy_idle_timeout_seconds` as it is: `why` names where it comes from."""
    why: str

    def __new__(cls, seconds: float, why: str) -> "Idle":
        idle = super().__new__(cls, seconds)
        idle.why = why
        return idle


class StepWait:
    """The deadline of one asked step, moved on by its progress; the times are the event loop's."""

    def __init__(self, node: str, what: str, timeout: float, now: float, idle: float | None = None) -> None:
        self.node, self.what, self.timeout, self.idle = node, what, timeout, idle
        self.start = self.last = now
        self.bytes = 0
        self.round = -1

    def note(self, rep: M.MigrationReport, now: float) -> bool:
        """Take a report that is not the answer: True (and the idle period starts over) when it shows progress."""
        advanced = rep.event == R.SOURCE_PAUSED
        if rep.event == R.PROGRESS:
            if rep.bytes != self.bytes:     # fewer: the agent restarted and writes the checkpoint anew
                self.bytes, advanced = rep.bytes, True
            if rep.HasField("round") and rep.round.round > self.round:
                self.round, advanced = rep.round.round, True
        if advanced:
            self.last = now
        return advanced

    @property
    def deadline(self) -> float:
        end = self.start + self.timeout
        return end if self.idle is None else min(end, self.last + self.idle)

    def expired(self, now: float) -> str:
        """Why the step is given up at `now` (a message naming the limit), or ""."""
        if now < self.deadline:
            return ""
        if self.idle is None:
            return f"node {self.node} did not answer {self.what} within {self.timeout:g} s"
        so_far = f"{self.bytes} bytes reported"
        if now >= self.start + self.timeout:
            return (f"node {self.node} did not finish {self.what} within {self.timeout:g} s "
                    f"(copy_timeout_seconds, however it progressed; {so_far})")
        why = getattr(self.idle, "why", IDLE_NAME)
        return f"node {self.node} reported no progress of {self.what} for {self.idle:g} s ({why}; {so_far})"
