"""The leader's writes: one etcd transaction fenced by the leader key, and when its answer is lost, the read-back
that decides by revisions whether it was applied (a barrier write first, before "not applied" is answered).

A control plane that lost leadership can no longer write, whatever it believes: every transaction compares the
leader key's create revision with the one this process took it at (controlplane/state/leadership.py).
"""

from __future__ import annotations

import asyncio
import logging

import aetcd
import grpc
from prometheus_client import Counter

from controlplane.state import keys
from controlplane.state.etcdconn import ETCD_ERRORS, EtcdConnection
from controlplane.state.leadership import LeaderSession
from controlplane.state.txnops import Absent, Delete, Present, Put, Revision
from mesh import errors

WRITE_ERRORS = Counter("gpumesh_etcd_write_errors_total", "etcd transactions that failed: etcd unreachable or "
                       "erring (etcd), or this control plane no longer the leader (not_leader); precondition "
                       "conflicts are not errors", ["reason"])

log = logging.getLogger("controlplane.state.store")


class FencedCommit:
    def __init__(self, conn: EtcdConnection, session: LeaderSession) -> None:
        self.conn = conn
        self.session = session

    async def commit(self, ops: list[Put | Delete], conditions: list[Absent | Present | Revision] = ()) -> int:
        """Apply `ops` atomically if this process is still the leader and every
        condition holds. Returns the revision of the write.

        Raises errors.Unavailable when leadership is lost, errors.Aborted when a
        precondition fails.
        """
        lost = self.session.lost_leadership
        if lost.is_set():
            WRITE_ERRORS.labels("not_leader").inc()
            raise errors.Unavailable("this control plane is no longer the leader")
        tx = self.conn.client.transactions
        compare = [tx.create(keys.LEADER.encode()) == self.session.leader_revision]
        for c in conditions:
            if isinstance(c, Absent):
                compare.append(tx.create(c.key) == 0)
            elif isinstance(c, Revision):
                compare.append(tx.mod(c.key) == c.mod_revision)
            else:
                compare.append(tx.create(c.key) > 0)
        success = [tx.put(o.key, o.value, lease=o.lease) if isinstance(o, Put) else tx.delete(o.key)
                   for o in ops]
        # Every revision etcd gave out up to here is at most `before`: if this transaction is applied,
        # its keys carry a mod_revision above it (the read-back after a lost answer relies on that).
        before = self.conn.revision
        client = self.conn.client
        try:
            await client.connect()
            resp = await client.kvstub.Txn(
                aetcd.rpc.TxnRequest(compare=[c.build_message() for c in compare],
                                     success=client._ops_to_requests(success)),
                timeout=client._timeout, metadata=client.metadata)
        except Exception as e:  # ETCD_ERRORS, or grpc.aio.AioRpcError from the raw stub
            self.conn.failover(client, e)
            if refused(e):     # etcd's answer, a refusal (no space, too many operations): not applied
                WRITE_ERRORS.labels("etcd").inc()
                raise errors.Unavailable(f"etcd refused the write: {getattr(e, 'details', lambda: e)()}") from e
            # The transaction may or may not have been applied (a member died with the answer).
            rev = await self._resolve(ops, before)
            if rev:
                return rev
            WRITE_ERRORS.labels("etcd").inc()
            raise errors.Unavailable(f"etcd: {getattr(e, 'details', lambda: e)()}") from e
        self.conn.note(resp.header.revision)
        if resp.succeeded:
            return resp.header.revision
        try:    # not applied, for sure: whichever it was, the callers get a typed error (the writer's contract)
            leader = await self.conn.call(lambda c: c.get(keys.LEADER.encode()))
        except ETCD_ERRORS as e:
            WRITE_ERRORS.labels("etcd").inc()
            raise errors.Unavailable(f"etcd: a precondition failed, and then etcd could not be read ({e})") from e
        if leader is None or leader.create_revision != self.session.leader_revision:
            lost.set()
            WRITE_ERRORS.labels("not_leader").inc()
            raise errors.Unavailable("this control plane is no longer the leader")
        raise errors.Aborted("a precondition of the write failed (concurrent change)")

    async def _resolve(self, ops: list[Put | Delete], before: int, tries: int = 20) -> int:
        """After a transaction whose answer was lost: read its keys back and decide by revisions, never by
        values (a key that already held the same value proves nothing). One transaction gives every key it
        puts the same mod_revision, above `before` (the highest revision seen before it was sent; only
        this process writes these keys, fenced by the leader key). All puts at one revision R > before:
        applied at R. No put above `before`: not applied (0, a clean failure). A transaction of deletes
        only: applied when every key existed at `before` and is gone now. Anything else (half applied,
        or unknowable): leadership is dropped, so a fresh leader reloads etcd rather than this process
        serving a fleet that may differ from it.

        "Not applied" is only answered after a barrier: a timed-out transaction may sit in etcd's raft log and be
        applied after the read-back (a quorum's disks stalled past the deadline), so a fenced write is committed
        first (`_barrier`): everything proposed before it is applied by the time it is, and the keys are read
        again."""
        puts = [o for o in ops if isinstance(o, Put)]
        deletes = [o for o in ops if not isinstance(o, Put)]
        rng = self.conn.range
        barrier = False
        for _ in range(tries):
            if self.session.lost_leadership.is_set():
                return 0
            try:
                if puts:
                    revs = set()
                    for o in puts:
                        kv, _ = await rng(o.key)
                        revs.add(kv.mod_revision if kv is not None and kv.mod_revision > before else 0)
                    if revs == {0}:
                        if not barrier:
                            await self._barrier()
                            barrier = True
                            continue
                        return 0
                    if len(revs) == 1:
                        rev = revs.pop()
                        for o in deletes:           # same transaction: must be gone too
                            kv, _ = await rng(o.key)
                            if kv is not None and kv.mod_revision <= rev:
                                break
                        else:
                            return rev
                    break
                existed, gone, now_rev = [], [], 0
                for o in deletes:
                    old, _ = await rng(o.key, before) if before else (None, 0)
                    kv, now_rev = await rng(o.key)
                    existed.append(old is not None)
                    gone.append(kv is None)
                if all(existed) and all(gone):
                    return now_rev
                if not any(existed) or not any(gone):
                    if any(existed) and not barrier:      # deletes of existing keys that may still apply
                        await self._barrier()
                        barrier = True
                        continue
                    return 0
                break
            except Exception:  # noqa: BLE001 - etcd still unreachable: wait for a member
                await asyncio.sleep(0.25)
        log.error("cannot tell whether an etcd write was applied: giving up leadership")
        self.session.lost_leadership.set()
        raise errors.Unavailable("etcd: the outcome of a write is unknown; this control plane stepped down")

    async def _barrier(self) -> None:
        """Commit a fenced write of `keys.BARRIER`: once etcd answers, every transaction proposed before it has
        been applied or never will be. Fenced off (another leader): leadership is lost, and a transaction of this
        process still pending fails its own leader compare."""
        tx = self.conn.client.transactions
        fence = tx.create(keys.LEADER.encode()) == self.session.leader_revision

        async def txn(c):
            await c.connect()
            return await c.kvstub.Txn(aetcd.rpc.TxnRequest(
                compare=[fence.build_message()], success=c._ops_to_requests([tx.put(keys.BARRIER.encode(), b"")])),
                timeout=c._timeout, metadata=c.metadata)
        resp = await self.conn.call(txn)
        self.conn.note(resp.header.revision)
        if not resp.succeeded:
            self.session.lost_leadership.set()


_REFUSALS = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                       grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED,
                       grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.OUT_OF_RANGE})


def refused(e: BaseException) -> bool:
    """etcd answered and refused (the transaction was not applied), as opposed to an answer that may be lost:
    read back, and proved by a barrier write, which a refusing etcd (its space quota reached) would refuse too."""
    code = getattr(e, "code", None)
    return callable(code) and code() in _REFUSALS
