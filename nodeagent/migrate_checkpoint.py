"""The agent's checkpoint-store steps: CHECKPOINT writes a consistent checkpoint of a running workload into
the store (`checkpoint_dir`), encrypted with the tenant's key when `checkpoint_keys_file` has one, else with the
checkpoint's own key from the control plane (`checkpoint_key`): every stored checkpoint is authenticated.
DELETE_CHECKPOINT removes an expired checkpoint's files. (A restore from the store is the target's
PUSH_CHECKPOINT: nodeagent/migrate_target.py.)

CHECKPOINT is repeat-safe by checkpoint id (the control plane sends it again every few seconds until
it is answered): a repeat while it runs is ignored, a repeat after it ended gets the same answer, and a
repeat after an agent restart answers from the checkpoint's manifest when it was completely written
(else it is written anew). `max_bytes` (what the tenant's checkpoint quota leaves) bounds the checkpoint: the
store's receiver refuses an entry that would pass it before writing it, and the step fails naming the quota. The checkpoint is written into `<path>.partial-<pid>` and renamed into
place on completion (mesh/checkpoint/format.py CheckpointWriter); a failed checkpoint's partial directory
is removed at once, and those a dead agent left when the agent starts (`clean_partial_checkpoints`).
Only a commit the agent's own receiver took makes a checkpoint: the workload's reply alone does not; and a
step that fails after that commit (the workload's reply is an error) removes what was committed: it is answered
FAILED, so no record would name it and nothing would ever delete it from the store. A workload that stops
sending in the middle of its push fails the step when the receiver gives its stream up (the transfer's idle
timeout, `transfer_idle_timeout_seconds`; `call_unless_stalled`). The agent waits for the workload's answer as
long as its push delivers frames, not a fixed time (a 100 GiB push over 150 MB/s takes 11 minutes), within
`checkpoint_timeout_seconds` in all; a workload that never starts its push fails after NO_PUSH_TIMEOUT_S. Each
repeat of CHECKPOINT while it runs is answered with PROGRESS (the bytes received so far), by which the control plane
keeps waiting; a checkpoint the control plane no longer asks for (UNASKED_S), or gives up (DELETE_CHECKPOINT of
its path), is given up and removed.

Mixed into `MigrationAgent` (nodeagent/migrate.py) on `MigrationBase` (nodeagent/migrate_base.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import threading
import time
import uuid

from gpumesh.v1 import migration_service_pb2 as M
from mesh.checkpoint.agent_link import DEFAULT_TIMEOUT
from mesh.logs import log
from mesh.procs import pid_alive
from nodeagent.migrate_base import CHECKPOINT_TIMEOUT_S, Job, MigrationBase

logger = logging.getLogger("nodeagent.migrate")
R = M.MigrationReport
PARTIAL = re.compile(r"\.(partial|old)-(\d+)$")
PARTIAL_STALE_S = 600.0     # a partial directory untouched this long, of no live process here, is a dead writer's


def _newest_mtime(path: str) -> float:
    newest = os.stat(path).st_mtime
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            try:
                newest = max(newest, os.stat(os.path.join(root, name)).st_mtime)
            except OSError:
                pass
    return newest


def clean_partial_checkpoints(store: str, stale_s: float = PARTIAL_STALE_S, now: float | None = None) -> list[str]:
    """Remove the half-written checkpoint directories (`<id>.partial-<pid>`, `<id>.old-<pid>`; an `.old`
    one whose `<id>` is missing is renamed back, the complete checkpoint it is) under the
    store (`<tenant>/<workload>/`) whose writer is gone: not this process, no live process with that pid
    here, and nothing in them written for `stale_s` seconds (the store may be shared with other hosts'
    agents, whose writers this host cannot see). Returns the paths removed."""
    removed, now = [], time.time() if now is None else now
    if not store or not os.path.isdir(store):
        return removed
    for tenant in os.scandir(store):
        if not tenant.is_dir(follow_symlinks=False):
            continue
        for wl in os.scandir(tenant.path):
            if not wl.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(wl.path):
                m = PARTIAL.search(entry.name)
                if m is None or not entry.is_dir(follow_symlinks=False):
                    continue
                pid = int(m.group(2))
                try:
                    if pid == os.getpid() or pid_alive(pid) or now - _newest_mtime(entry.path) < stale_s:
                        continue
                except OSError:
                    continue
                base = os.path.join(wl.path, entry.name[:m.start()])
                if m.group(1) == "old" and not os.path.exists(base):
                    os.rename(entry.path, base)     # the writer died between its renames: the old one is it
                    continue
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(entry.path)
    return removed


STALL_POLL_S = 0.1
NO_PUSH_TIMEOUT_S = DEFAULT_TIMEOUT
"""how long the workload's checkpoint may go without a frame of its push while no stream of it is open: before
its push (it first waits for a safe point, up to PrecopyPolicy.pause_timeout) and between the push's end and its
answer. A push in progress is bounded by the transfer's idle timeout instead, the whole by `overall_s`."""
UNASKED_S = 120.0
"""a running checkpoint is given up when the control plane has not asked for it again this long (it asks every few
seconds while it waits: migration_checkpoints.CHECKPOINT_RESEND): it gave the step up (its idle period or
ceiling, the caller gone, the leader changed), and a checkpoint committed now would be named by no record."""


class GivenUp(RuntimeError):
    """The control plane no longer waits for the checkpoint: dropped, and a later ask starts it anew."""


def given_up(job: Job) -> str:
    """Why the control plane no longer waits for `job`'s checkpoint, or ""."""
    if job.cancelled:
        return "the control plane gave it up (DELETE_CHECKPOINT)"
    idle = time.monotonic() - job.asked
    return f"no longer asked for by the control plane ({idle:.0f} s since its last ask)" if idle > UNASKED_S else ""


def call_unless_stalled(link, sess, cmd: str, overall_s: float = CHECKPOINT_TIMEOUT_S, job: Job | None = None,
                        **args) -> dict:
    """`link.call(cmd, **args)` (the workload pushes its checkpoint into the receiving session `sess` before it
    answers), waited for as long as the push makes progress, not for a fixed time: the link's reply timeout
    must be above `overall_s` (`_link(reply_timeout=)`); the call is aborted and the step fails at once when

    - the receiver gives up a stream of the push for sending nothing within its idle timeout (`sess.stalled`):
      the workload is stuck mid-push (its retry would be too);
    - no stream of it is open and none delivered a frame for NO_PUSH_TIMEOUT_S (the workload never started its
      push, or ended it and does not answer);
    - the whole takes longer than `overall_s` (`checkpoint_timeout_seconds`), progress or not;
    - the control plane no longer waits for it (`job`: `given_up`; GivenUp).

    A limited tenant's checkpoint lock (controlplane/controllers/checkpoint_quota.py) is held until the step
    answers."""
    box: dict = {}
    done = threading.Event()

    def call() -> None:
        try:
            box["reply"] = link.call(cmd, **args)
        except BaseException as exc:   # noqa: BLE001 - raised in the step's thread below
            box["error"] = exc
        finally:
            done.set()
    t0 = time.monotonic()
    threading.Thread(target=call, daemon=True, name=f"link-{cmd}").start()
    while not done.wait(STALL_POLL_S):
        why, now = "", time.monotonic()
        dropped = given_up(job) if job is not None else ""
        if dropped:
            link.abort()
            done.wait(5.0)
            raise GivenUp(dropped)
        if sess.stalled.is_set():
            why = f"the workload's checkpoint push stalled: {sess.stalled_reason}"
        elif now - t0 > overall_s:
            why = (f"the workload's checkpoint did not finish within {overall_s:g} s (checkpoint_timeout_seconds; "
                   f"{sess.bytes_received} bytes received)")
        elif sess.streams <= 0 and now - max(t0, sess.last_frame) > NO_PUSH_TIMEOUT_S:
            why = (f"the workload sent no checkpoint frame for {NO_PUSH_TIMEOUT_S:g} s and did not answer "
                   f"{cmd!r} ({'its push ended' if sess.last_frame else 'it never started its push'})")
        if why:
            link.abort()
            done.wait(5.0)      # the shut-down socket ends the call at once: nothing of it is used
            raise RuntimeError(why)
    if "error" in box:
        raise box["error"]
    return box["reply"]


def clean_store(checkpoint_dir: str) -> None:
    """At agent start, once per agent process (nodeagent/migrate.py `install`): `clean_partial_checkpoints`,
    logged."""
    try:
        removed = clean_partial_checkpoints(checkpoint_dir)
    except OSError as e:
        logger.warning("cannot clean partial checkpoints in %s: %s", checkpoint_dir, e)
        return
    if removed:
        log(logger, logging.INFO, "partial checkpoints of a previous agent removed", count=len(removed))


class CheckpointSteps(MigrationBase):
    """CHECKPOINT and DELETE_CHECKPOINT (see the module's docstring)."""

    async def _checkpoint(self, cmd: M.MigrationCommand, report) -> None:
        key = (cmd.migration_id, "checkpoint")
        if self._asked_again(key):      # a repeat: running (ignored) or answered (the same answer again)
            return
        job = self.jobs[key] = Job(cmd.migration_id, cmd.workload_id)
        crash_point = getattr(self.runner, "_crash_point", None)
        if crash_point is not None:
            crash_point("checkpoint")   # test hook (MESH_AGENT_TEST_CRASH_AT, nodeagent/workload_recovery.py)
        try:
            rep = self._already_written(cmd) or await self._write_checkpoint(cmd)
        except Exception as e:   # noqa: BLE001 - answered, and the same answer to a repeat
            rep = R(migration_id=cmd.migration_id, event=R.FAILED, message=f"checkpoint on {self.agent.node}: {e}")
            if isinstance(e, GivenUp):
                # nobody waits for an answer; a later ask (the control plane waits again after all) starts it anew
                log(logger, logging.WARNING, "checkpoint given up", node=self.agent.node, workload=cmd.workload_id,
                    path=cmd.path, reason=str(e))
                job.done = True
                if self.jobs.get(key) is job:
                    del self.jobs[key]
                return
        job.final, job.done = rep, True
        self._send(rep)

    def _already_written(self, cmd: M.MigrationCommand) -> M.MigrationReport | None:
        """The answer for a checkpoint that is in the store already (written before an agent restart)."""
        from mesh.checkpoint.format import CheckpointError, read_manifest
        try:
            man = read_manifest(self._store_path(cmd.path))
        except (CheckpointError, RuntimeError, OSError):
            return None
        enc = man.extras.get("encryption") or {}
        if enc.get("checkpoint") not in (None, cmd.migration_id):
            return None
        log(logger, logging.INFO, "checkpoint found written (asked again)", node=self.agent.node,
            workload=cmd.workload_id, path=cmd.path)
        return R(migration_id=cmd.migration_id, event=R.CHECKPOINTED, path=cmd.path, step=man.step,
                 bytes=man.nbytes, encrypted=enc.get("key") == "tenant")

    async def _write_checkpoint(self, cmd: M.MigrationCommand) -> M.MigrationReport:
        wid = cmd.workload_id
        if not self._running(wid):
            raise RuntimeError(f"workload {wid} does not run on {self.agent.node}")
        path = self._store_path(cmd.path)
        job = self.jobs.get((cmd.migration_id, "checkpoint")) or Job(cmd.migration_id, wid)
        key, kind = self._key(cmd.tenant), "tenant"
        if key is None:
            key, kind = cmd.checkpoint_key, "checkpoint"      # the checkpoint's own: it is authenticated anyway
            if len(key) != 32:
                raise RuntimeError("the control plane sent no checkpoint key (an older control plane?): refused")

        def run() -> M.MigrationReport:
            from mesh.checkpoint.store import StoreSink
            from mesh.checkpoint.transfer import TransferServer
            from mesh.checkpoint.transfer_auth import new_secret
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)     # the store is the agents' alone
            server = TransferServer("127.0.0.1:0", idle_timeout_s=self.transfer_idle_timeout).start()
            session = f"ckpt-{uuid.uuid4().hex[:12]}"
            secret = new_secret()       # both ends are here: the workload gets it over its control socket
            relay = sink = sess = None
            written = False
            try:
                sink = StoreSink(path, wid, key=key, tenant=cmd.tenant, checkpoint_id=cmd.migration_id, key_kind=kind,
                                 max_bytes=max(0, cmd.max_bytes))
                sess = server.expect(session, sink, mesh=True, secret=secret)
                job.live = lambda: sess.bytes_received       # answered to the control plane's repeats
                relay = self._outbound(wid, server.address)      # a workload without network: through its /tmp
                t0 = time.perf_counter()
                overall = self.checkpoint_timeout
                with self._link(wid, reply_timeout=overall + 60) as link:       # the wait is bounded below
                    r = call_unless_stalled(link, sess, "checkpoint", overall, job, session=session,
                                            secret=secret.hex(), target=relay.address if relay else server.address)
                seconds = time.perf_counter() - t0
                # only the receiver the agent owns says the checkpoint is in the store: the workload's reply
                # is its own word (the SDK answers after the receiver's `done`, which follows the commit)
                done = sess.committed
                if done is None:
                    raise RuntimeError("the workload did not commit its checkpoint (its checkpoint call returned, "
                                       "the agent's receiver got no commit)")
                if given_up(job):       # committed after the control plane gave up: removed below
                    raise GivenUp(given_up(job))
                nbytes = int(done.get("bytes", r.get("bytes", 0)))
                rep = M.MigrationReport(migration_id=cmd.migration_id, event=R.CHECKPOINTED, path=cmd.path,
                                        step=int(done.get("step", r.get("step", 0))), bytes=nbytes, seconds=seconds,
                                        mb_per_s=nbytes / 1e6 / max(seconds, 1e-9), encrypted=kind == "tenant")
                written = True
                return rep
            except Exception:
                if sink is not None and sink.refused:
                    # the receiver refused an entry past the tenant's quota: that is the answer, whatever the
                    # workload's SDK made of the refusal (the control plane turns it into RESOURCE_EXHAUSTED)
                    raise RuntimeError(sink.refused) from None
                raise
            finally:
                if relay is not None:
                    relay.stop()
                server.stop(0)
                if sink is not None and not written:
                    # `<path>.partial-<agent pid>`: clean_partial_checkpoints skips this live agent's own and
                    # DELETE_CHECKPOINT removes only `path`, so nothing else would remove it
                    sink.writer.abort()
                    if sess is not None and sess.committed is not None:
                        # the receiver committed, then the step failed (the workload's reply, the report): it is
                        # answered FAILED, so no record names this checkpoint and nothing would ever delete it
                        shutil.rmtree(path, ignore_errors=True)
        rep = await asyncio.to_thread(run)
        log(logger, logging.INFO, "checkpoint written", node=self.agent.node, workload=wid, path=path,
            step=rep.step, bytes=rep.bytes, encrypted=rep.encrypted)
        return rep

    async def _delete_checkpoint(self, cmd: M.MigrationCommand, report) -> None:
        """The checkpoint's record expired (controlplane/controllers/retention.py), or the control plane gave its
        CHECKPOINT up (migration_checkpoints.py): remove its files from the store, the running step given up first."""
        job = self.jobs.get((cmd.migration_id, "checkpoint"))
        if job is not None and not job.done:
            job.cancelled = True
        path = self._store_path(cmd.path)
        await asyncio.to_thread(shutil.rmtree, path, True)
        log(logger, logging.INFO, "expired checkpoint deleted", node=self.agent.node, path=cmd.path)
