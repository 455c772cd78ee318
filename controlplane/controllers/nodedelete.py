"""Retiring a node for good (`AdminService.DeleteNode`, `meshctl delete node`; kubectl's `delete node`).

Only a NotReady node is deleted (its agent holds no lease): a READY one is refused, since its agent would
go on running what the control plane forgets. The deletion is a marker, then idempotent steps:

1. the marker: the node's record with `deleting` set, written in one transaction guarded by the absence of
   its alive key (an agent that registered meanwhile wins: FAILED_PRECONDITION). From here the node is in
   `ctl.deleted_nodes`: its agent's Register is refused, so are a cordon, an uncordon and a drain (their
   copy of the record would put it back without the marker), and no migration waits for an answer from it.
2. its workloads end FAILED "node NAME deleted" (`fail_workloads`, through the workload manager's write);
3. its mesh connections are disconnected (the mesh manager's: the peer's buffer is revoked);
4. its slices' allocations are released as a drain evicts them, and its slice records deleted as the
   agent's release report would (the slice controller's `end_node_slices`); a deployment replica whose
   slice is gone is lost at once, so the deployment controller (kicked) replaces it;
5. migrations from or to it end through their own state machine (every step asked of the node fails
   now): rolled back before the commit, finished after it; waited for a while. A restore is one only to
   its target (it reads the checkpoint store; a restore from a deleted node's checkpoint goes on);
6. the last transaction deletes its record (marker included) and its GPU health records (quarantines);
   the in-memory node, its telemetry and heartbeats go; the event `NodeDeleted` is recorded.

Before step 2 the health controller forgets the node's GPUs (`HealthController.forget_node`): the tasks
moving workloads off an unhealthy GPU of it are cancelled and no reset is asked of it any more.

Each step skips what went meanwhile (a connection its tenant disconnected, an allocation released): a
NotFound ends the deletion only when the node itself is gone.

A control plane that stops in the middle finds the marker when it starts (NodeManager.load puts the node
in `ctl.deleted_nodes`) and `resume` finishes the deletion; a DeleteNode retried before that joins or
finishes it. A DeleteNode of a node already deleted answers NOT_FOUND (the node is gone; nothing is done
twice). When the agent comes back it registers as a new node: the control plane sends it no slices and
no workloads, so its own reconciliation tears down what it still holds (nodeagent/agent.py, orphans), and
its reports of the old workloads change nothing (controllers/workloads.py).
"""

from __future__ import annotations

import asyncio
import logging

from controlplane.state import keys
from controlplane.state.store import Absent, Delete, Present, Put
from gpumesh.v1 import admin_service_pb2, types_pb2
from mesh import errors
from mesh.logs import log

logger = logging.getLogger(__name__)
MIGRATION_WAIT_S = 15.0     # how long a deletion waits for the migrations it ended to reach their last phase
ANSWER_WAIT_S = 60.0        # how long DeleteNode waits for the deletion; it goes on in the background after
RETRY_S = 2.0               # between attempts of a deletion whose write failed (etcd unavailable)
BATCH = 100                 # records per transaction (etcd takes at most 128 operations)


def node_deleted(node: str) -> str:
    """The message of what a node's deletion ended (workloads; slices and allocations; mesh connections)."""
    return f"node {node} deleted"


async def fail_workloads(wm, node: str, reason: str) -> list[str]:
    """Every workload on `node` that has not ended ends FAILED with `reason`, durably (the workload manager's
    own conditional write: its events and waiters; one moved off the node meanwhile, by a migration's commit,
    is left as it is), before its slices go, so it reads as failed, not as 'stopped: slice released'.
    Idempotent; the ids ended by this call."""
    from controlplane.controllers.workloads import TERMINAL

    def failed(w: types_pb2.Workload) -> types_pb2.Workload | None:
        if w.node != node or w.state in TERMINAL:       # ended (or moved) meanwhile: skipped
            return None
        n = types_pb2.Workload()
        n.CopyFrom(w)
        n.state, n.message = types_pb2.WORKLOAD_STATE_FAILED, reason
        n.finished_at.GetCurrentTime()
        return n
    ids, ended = [w.id for w in wm.workloads.values() if w.node == node and w.state not in TERMINAL], []
    for i in range(0, len(ids), BATCH):
        ended += [w.id for w in await wm.update(ids[i:i + BATCH], failed, f"deletion of node {node}")]
    return ended


class NodeDeleter:
    def __init__(self, ctl, nodes, workloads=None, mesh=None) -> None:
        self.ctl = ctl
        self.nodes = nodes
        self.workloads = workloads
        self.mesh = mesh
        self.tasks: dict[str, asyncio.Task] = {}            # node -> its deletion in progress
        self._marking: dict[str, asyncio.Event] = {}        # node -> set once its marker's write has ended
        self.migration_wait = MIGRATION_WAIT_S
        self.answer_wait = ANSWER_WAIT_S
        self.retry = RETRY_S

    # -- entry points ----------------------------------------------------------------------------

    async def delete(self, name: str) -> admin_service_pb2.DeleteNodeResponse:
        """DeleteNode: the marker, then the steps (in a task that outlives the call: a client that goes
        away does not leave a half-deleted node); what was ended."""
        entry = self.nodes.entry(name)                      # NOT_FOUND, also for a node deleted already
        if name not in self.ctl.deleted_nodes:
            if entry.ready:
                raise errors.FailedPrecondition(
                    f"node {name} is READY (its agent holds its lease): drain it and stop its agent first, "
                    f"then delete it once `meshctl get nodes` shows it NotReady")
            await self._mark(name, entry)
        else:
            await self._marked(name)
        task = self._start(name)
        done, _ = await asyncio.wait({task}, timeout=self.answer_wait)
        if not done:
            raise errors.Unavailable(f"the deletion of node {name} goes on in the background (a write to etcd "
                                     f"keeps failing, or migrations take long): retry DeleteNode to follow it")
        return task.result()

    async def resume(self) -> None:
        """At leader start: finish the deletions a stopped control plane had begun (their marker)."""
        for name in sorted(self.ctl.deleted_nodes):
            log(logger, logging.WARNING, "finishing the deletion of a node begun before a restart", node=name)
            self._start(name)

    async def stop(self) -> None:
        for t in list(self.tasks.values()):
            t.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks.values()), timeout=5.0)

    # -- the marker -------------------------------------------------------------------------------

    async def _mark(self, name: str, entry=None) -> None:
        """The marker. The node is in `ctl.deleted_nodes` before anything is awaited, so from here a Register,
        a cordon or a drain is refused; the record is then read and written under its record lock
        (NodeManager.record_lock), so a cordon or Register already writing lands first and its change is kept
        (a copy of the record taken before would put it back without `deleting`). `entry`: unused, the
        record is read under the lock."""
        self.ctl.deleted_nodes.add(name)
        done = self._marking[name] = asyncio.Event()
        try:
            async with self.nodes.record_lock(name):
                entry = self.nodes.entry(name)
                rec = types_pb2.Node()
                rec.CopyFrom(entry.record)
                rec.deleting = True
                rec.message = "being deleted"
                try:
                    await self.ctl.writer.write([Put(keys.node(name), rec.SerializeToString())],
                                                [Present(keys.node(name)), Absent(keys.alive(name))])
                except errors.Aborted:
                    raise errors.FailedPrecondition(f"node {name} registered again meanwhile (its agent holds its "
                                                    f"lease): stop its agent first") from None
                entry.record = rec
        except BaseException:
            self.ctl.deleted_nodes.discard(name)
            raise
        finally:
            self._marking.pop(name, None)
            done.set()
        log(logger, logging.WARNING, "node deletion begins", node=name)

    async def _marked(self, name: str) -> None:
        """A DeleteNode that finds the node being deleted: if the marker of a concurrent call is still being
        written, its outcome first (the steps never run on a node whose marker etcd refused)."""
        pending = self._marking.get(name)
        if pending is None:
            return
        await pending.wait()
        if name not in self.ctl.deleted_nodes:
            raise errors.Unavailable(f"the deletion of node {name} did not begin (a concurrent DeleteNode's "
                                     f"marker was not written): retry DeleteNode")

    def _start(self, name: str) -> asyncio.Task:
        task = self.tasks.get(name)
        if task is None or task.done():
            task = self.tasks[name] = asyncio.create_task(self._until_done(name), name=f"delete-node-{name}")
        return task

    async def _until_done(self, name: str) -> admin_service_pb2.DeleteNodeResponse:
        try:
            while True:
                try:
                    return await self.finish(name)
                except errors.MeshError as e:
                    if isinstance(e, errors.NotFound) and name not in self.ctl.fleet.nodes:
                        raise           # deleted already (an earlier attempt finished)
                    # anything else gone meanwhile (a connection, an allocation someone else ended) is not the
                    # end of the deletion: the next attempt ends what is left
                    log(logger, logging.WARNING, "node deletion interrupted; trying again", node=name, error=str(e))
                    await asyncio.sleep(self.retry)
        except errors.NotFound:
            raise
        except Exception:       # noqa: BLE001 - a bug: said here (a resumed deletion has no caller), a retry starts anew
            logger.exception("deletion of node %s", name)
            raise
        finally:
            self.tasks.pop(name, None)

    # -- the steps ---------------------------------------------------------------------------------

    async def finish(self, name: str) -> admin_service_pb2.DeleteNodeResponse:
        """Steps 2-6 (module doc); each ends what is left, so running them again after a failure is safe."""
        ctl = self.ctl
        entry = ctl.fleet.nodes.get(name)
        if entry is None:           # finished by an earlier attempt
            ctl.deleted_nodes.discard(name)
            raise errors.NotFound(f"no node {name!r}", kind="node", name=name)
        why = node_deleted(name)
        out = admin_service_pb2.DeleteNodeResponse(node=self.nodes.view(name))
        telemetry = getattr(ctl, "telemetry", None)
        if telemetry is not None:
            telemetry.health.forget_node(name)      # its GPUs' recovery (migrations off them, resets) ends first
        migrations = getattr(ctl, "migrations", None)
        # named before anything ends: those already failing (their asks of the node fail from the marker on)
        involved = migrations.unfinished_for(name) if migrations is not None else []
        if self.workloads is not None:
            out.workloads.extend(await fail_workloads(self.workloads, name, why))
        if self.mesh is not None:
            for c in [c for c in self.mesh.connections.values() if name in (c.a.node, c.b.node)]:
                try:
                    await self.mesh.disconnect(c.id, reason=why)
                except errors.NotFound:
                    continue        # disconnected meanwhile (its tenant, the release follower, the peer's deletion)
                out.connections.append(c.id)
        deployments = getattr(ctl, "deployments", None)
        if deployments is not None:
            out.replicas.extend(sorted(f"{r.deployment}/{r.id}" for rs in deployments.store.replicas.values()
                                       for r in rs.values() if r.node == name and r.slice_id))
        slices, allocs = await ctl.end_node_slices(name, why)
        out.slices.extend(slices)
        out.allocations.extend(allocs)
        if deployments is not None:
            deployments.kick()                      # a slice gone is a replica lost: replaced at once
        if migrations is not None:
            ended = await migrations.end_for_node(name, self.migration_wait)
            out.migrations.extend(sorted(set(involved) | set(ended)))
        await self._forget(name)
        log(logger, logging.WARNING, "node deleted", node=name, slices=len(out.slices), workloads=len(out.workloads),
            migrations=len(out.migrations), connections=len(out.connections), replicas=len(out.replicas))
        ctl.recorder.emit("Node", name, "Normal", "NodeDeleted",
                          f"deleted: {len(out.slices)} slice(s) of {len(out.allocations)} allocation(s), "
                          f"{len(out.workloads)} workload(s), {len(out.migrations)} migration(s), "
                          f"{len(out.connections)} mesh connection(s), {len(out.replicas)} replica(s) ended",
                          node=name, source="node-controller")
        return out

    async def _forget(self, name: str) -> None:
        """The last transaction: the node's record (and marker) and its GPU health records; then memory."""
        ctl = self.ctl
        health = await ctl.store.load(f"{keys.GPU_HEALTH}{name}/")
        ops = [Delete(k if isinstance(k, bytes) else k.encode()) for k in health.kvs] + [Delete(keys.node(name))]
        async with self.nodes.record_lock(name):
            try:
                await ctl.writer.write(ops, [Absent(keys.alive(name))])
            except errors.Aborted:
                raise errors.Unavailable(f"node {name} holds a lease again: not deleted") from None
            ctl.fleet.drop_node(name)
            ctl.deleted_nodes.discard(name)
        self.nodes.heartbeats.pop(name, None)
        telemetry = getattr(ctl, "telemetry", None)
        if telemetry is not None:
            telemetry.events.pop(name, None)
            telemetry.ib_ports.pop(name, None)
            telemetry.health.forget_node(name)
        deployments = getattr(ctl, "deployments", None)
        if deployments is not None:
            deployments.down_since.pop(name, None)
        if self.mesh is not None:
            self.mesh.hellos.pop(name, None)
