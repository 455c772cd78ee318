"""The agent's migration steps for same-node migrations, resizes and transparent mode (mixed
into nodeagent.migrate.MigrationAgent).

* A same-node migration runs the target process under the runner key `<workload>~<migration>`;
  after the commit the target takes the workload's ID and the source's record moves aside
  (`_hand_over`), so the source's end is never reported as the workload's.
* SWAP_SLICES (a resize's commit) renames this node's realized slices so each new record names
  the instance at its placement; idempotent, and a full reconcile (adopt by placement) after an
  agent restart reaches the same state.
* Transparent mode (CRIU) is refused with the reason (criu missing or older than 4.0, `criu
  check` failing) until the runner can adopt a CRIU-restored process.
"""

from __future__ import annotations

import asyncio
import logging

from gpumesh.v1 import migration_service_pb2 as M
from gpumesh.v1 import node_service_pb2, types_pb2
from mesh.logs import log

logger = logging.getLogger("nodeagent.migrate")
R = M.MigrationReport


class SlicesMixin:
    """Needs self.agent, self.runner, self.outbox."""

    # -- same-node migrations and resizes ------------------------------------------------

    def _hand_over(self, wid: str, alias: str) -> str:
        """A same-node migration after its commit: the target process (runner key `alias`) takes
        the workload's ID, the source's record moves to `alias~source` (its end is reported under
        that name, which the control plane does not know). Synchronous: no report in between.
        Returns the source's key."""
        old = f"{alias}~source"
        r = self.runner
        if alias in r.workloads:
            if wid in r.workloads:
                r.rekey(wid, old)
            r.rekey(alias, wid)
            log(logger, logging.INFO, "target process took over the workload ID", node=self.agent.node,
                workload=wid, source_key=old)
        return old

    async def _swap_slices(self, cmd: M.MigrationCommand, report) -> None:
        """Rename realized slices so each record in `cmd.slices` on this node names the instance at
        its placement (a resize's swap). Idempotent: a second call finds every name in place."""
        agent, slicer = self.agent, self.agent.slicer
        ids = [s.id for s in cmd.slices]
        mine = [s for s in cmd.slices if s.node == agent.node]

        def holds(key: str, s: types_pb2.Slice) -> bool:
            inst = slicer.mig.get(key)
            if inst is not None:
                return (inst.gpu_index, inst.profile, inst.start) == (s.gpu_index, s.profile, s.placement.start)
            x = slicer.shared.get(key)
            return x is not None and (x.gpu_index, x.isolation, x.memory_bytes) == (
                s.gpu_index, s.isolation, s.memory_bytes)
        moves = {}
        for s in mine:
            src = next((k for k in ([s.id] + ids) if k not in moves.values() and holds(k, s)), None)
            if src is None and s.isolation != types_pb2.ISOLATION_MIG:
                src = s.id      # shared slices are bookkeeping (lost with an agent restart): realized anew
            if src is None:
                raise RuntimeError(f"no realized slice here is at the placement of {s.id} "
                                   f"(GPU {s.gpu_index} {s.profile or s.memory_bytes})")
            moves[s.id] = src
        mig = {k: slicer.mig.pop(k) for k in moves.values() if k in slicer.mig}
        for k in moves.values():
            slicer.shared.pop(k, None)
        for k in ids:
            if k not in moves:          # its placement is on another node now
                agent.realized.pop(k, None)
                agent.desired.pop(k, None)
        statuses = []
        for s in mine:
            src = moves[s.id]
            if src in mig:
                slicer.mig[s.id] = mig[src]
            else:
                slicer.shared[s.id] = s
            agent.desired[s.id] = s
            agent.realized[s.id] = st = slicer.realize(s)
            statuses.append(st)
        if any(src != new for new, src in moves.items()):
            log(logger, logging.INFO, "slices swapped", node=agent.node, moves=moves)
        self._send_statuses(statuses)
        report(R.SLICES_SWAPPED)

    def _send_statuses(self, statuses: list) -> None:
        if statuses and self.outbox is not None:
            self.outbox.put_nowait(node_service_pb2.AgentMessage(
                report=node_service_pb2.SliceStatusReport(statuses=statuses)))

    # -- transparent mode (CRIU) ---------------------------------------------------------

    def _require_transparent(self) -> None:
        from mesh.checkpoint.criu import Criu
        Criu().require()        # TransparentUnavailable: names criu, the version needed, how to get it
        raise RuntimeError("transparent migration of a runner workload needs the runner to adopt a CRIU-restored "
                           "process, which this agent does not do yet")

    async def _check_transparent(self, cmd: M.MigrationCommand, report) -> None:
        await asyncio.to_thread(self._require_transparent)
        report(R.TRANSPARENT_OK)
