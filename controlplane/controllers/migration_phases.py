"""What the migration modules share: the phases, timeouts and the step failure."""

from __future__ import annotations

from gpumesh.v1 import migration_service_pb2 as M
from gpumesh.v1 import types_pb2

P = M.MigrationPhase
C = M.MigrationCommand
R = M.MigrationReport
W = types_pb2
FINISHED = (P.MIGRATION_PHASE_DONE, P.MIGRATION_PHASE_ABORTED)
BEFORE_COMMIT = (P.MIGRATION_PHASE_PLANNED, P.MIGRATION_PHASE_TARGET_READY, P.MIGRATION_PHASE_COPYING,
                 P.MIGRATION_PHASE_PAUSED)
TARGET_WANTED = (P.MIGRATION_PHASE_TARGET_READY, P.MIGRATION_PHASE_COPYING, P.MIGRATION_PHASE_PAUSED)
LABEL = "gpumesh-migration"          # on a slice a migration allocated
RESTORE_ENV = ("GPUMESH_RESTORE_FROM", "GPUMESH_RESTORE_HOLD")
PHASE_NAMES = {P.Name(v).removeprefix("MIGRATION_PHASE_").lower(): v for v in P.values() if v}
RESEND = 2.0            # seconds between repeats of an unanswered agent step
START_TIMEOUT = 120.0   # the target process starts (imports torch, builds its model) and listens
COPY_TIMEOUT = 86400.0        # the longest a long step (checkpoint, restore push, copy) may take: copy_timeout_seconds
COPY_IDLE_TIMEOUT = 900.0     # ... without progress: copy_idle_timeout_seconds (controllers/copy_wait.py)
# a migration's source reports progress only when a pre-copy round ends, and the first moves the whole state: a
# round may take this long (the whole copy's old fixed timeout) whatever copy_idle_timeout_seconds says
ROUND_IDLE_TIMEOUT = 1800.0
STEP_TIMEOUT = 60.0
PLACE_ATTEMPTS = 8


class StepFailed(Exception):
    """A step failed: before the commit, the migration rolls back."""


class StepTimedOut(StepFailed):
    """The agent did not answer a step in time (its limit named in the message): it may still be working on it."""


def phase_name(value: int) -> str:
    return P.Name(value).removeprefix("MIGRATION_PHASE_").lower()


def alias(m: M.Migration) -> str:
    """The runner key of the target process of a same-node migration (the source holds the
    workload's ID until it is stopped); empty when the target runs on another node."""
    if m.workload_id and not m.checkpoint_id and m.target_node and m.target_node == m.source_node:
        return f"{m.workload_id}~{m.id}"
    return ""
