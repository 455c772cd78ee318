"""The etcd store: one `EtcdStore` per control-plane process, over etcd's API through `aetcd` (asyncio,
python-etcd3's API, current protobuf).

It composes the connection (controlplane/state/etcdconn.py: a client per endpoint, failover), the leader
session (leadership.py: the leader key, its lease and keepalive) and the fenced writes (fencedcommit.py:
`commit()`, whose compare on the leader key keeps a control plane that lost leadership from writing, whatever
it believes); here are the reads, the node leases and the watches.
"""

from __future__ import annotations

import asyncio

import grpc

from controlplane.state import keys
from controlplane.state.etcdconn import ETCD_ERRORS, EtcdConnection
from controlplane.state.fencedcommit import FencedCommit
from controlplane.state.leadership import LeaderSession
# the operations and preconditions of a transaction (their own module; imported from here by the callers)
from controlplane.state.txnops import Absent, Delete, Present, Put, Revision, Snapshot  # noqa: F401
from mesh import errors


class EtcdStore:
    def __init__(self, endpoints: list[str], timeout: float = 10.0, *, credentials=None,
                 username: str | None = None, password: str | None = None) -> None:
        """`credentials` (grpc channel credentials, see controlplane.state.etcdtls) for https:// endpoints;
        `username`/`password` for etcd auth."""
        self.conn = EtcdConnection(endpoints, timeout, credentials=credentials, username=username,
                                   password=password)
        self.endpoints = endpoints
        self.session = LeaderSession(self.conn)
        self.writes = FencedCommit(self.conn, self.session)

    # -- what the parts hold ----------------------------------------------------------

    @property
    def client(self):
        """The aetcd client of the endpoint in use."""
        return self.conn.client

    @client.setter
    def client(self, client) -> None:
        self.conn.client = client

    @property
    def revision(self) -> int:
        """The highest etcd revision any answer to this process carried."""
        return self.conn.revision

    @property
    def identity(self) -> str:
        return self.session.identity

    @property
    def leader_revision(self) -> int:
        return self.session.leader_revision

    @property
    def session_lease(self) -> int | None:
        return self.session.session_lease

    @property
    def lost_leadership(self) -> asyncio.Event:
        return self.session.lost_leadership

    # -- connection and leadership ----------------------------------------------------

    async def connect(self) -> None:
        await self.conn.connect()

    async def member_versions(self) -> dict[str, str]:
        """The etcd version each endpoint's member reports ("" for one that does not answer now)."""
        return await self.conn.member_versions()

    async def close(self) -> None:
        self.session.stop_keepalive()
        await self.conn.close()

    async def become_leader(self, identity: str, ttl: int = 10, wait: float | None = 60.0,
                            endpoint: str = "", poll: float = 0.2, host: str | None = None) -> None:
        """Take the leader key with a fresh session lease (LeaderSession.become_leader)."""
        await self.session.become_leader(identity, ttl, wait, endpoint, poll, host)

    async def step_down(self, why: str) -> None:
        """Give up leadership now (LeaderSession.step_down)."""
        await self.session.step_down(why)

    async def leader(self) -> tuple[str, str]:
        """(identity, advertised endpoint) of the current leader; ("", "") when there is none."""
        return await self.session.leader()

    # -- reads ---------------------------------------------------------------------

    async def load(self, prefix: str = keys.PREFIX) -> Snapshot:
        res = await self.conn.call(lambda c: c.get_prefix(prefix.encode()))
        self.conn.note(res.header.revision)
        kvs = {kv.key: (kv.value, kv.mod_revision, kv.lease) for kv in res.kvs}
        return Snapshot(revision=res.header.revision, kvs=kvs)

    async def get(self, key: bytes) -> bytes | None:
        kv = await self.conn.call(lambda c: c.get(key))
        return kv.value if kv is not None else None

    async def read(self, key: bytes) -> tuple[bytes, int] | None:
        """The key's (value, mod revision), or None: what a `Revision` precondition is checked against."""
        try:
            kv, _ = await self.conn.range(key)
        except (*ETCD_ERRORS, grpc.RpcError) as e:
            raise errors.Unavailable(f"etcd: {e}") from e
        return (kv.value, kv.mod_revision) if kv is not None else None

    # -- writes --------------------------------------------------------------------

    async def commit(self, ops: list[Put | Delete], conditions: list[Absent | Present | Revision] = ()) -> int:
        """Apply `ops` atomically if this process is still the leader and every condition holds; the revision of
        the write (FencedCommit.commit: errors.Unavailable when leadership is lost, errors.Aborted when a
        precondition fails)."""
        return await self.writes.commit(ops, conditions)

    # -- node leases -----------------------------------------------------------------

    async def grant_lease(self, ttl: int) -> int:
        return (await self.conn.call(lambda c: c.lease(ttl))).id

    async def refresh_lease(self, lease_id: int) -> int:
        """Refresh a node lease; returns its TTL, 0 when it has expired."""
        reply = await self.conn.call(lambda c: c.refresh_lease(lease_id))
        return int(reply.TTL) if reply is not None else 0

    async def revoke_lease(self, lease_id: int) -> None:
        await self.conn.revoke_lease(lease_id)

    # -- watches ---------------------------------------------------------------------

    async def watch_prefix(self, prefix: str, start_revision: int):
        """A watch on `prefix` from `start_revision` (an aetcd Watch: iterate it, `cancel()` it when done).

        A cancel of the calling task while the watch is being created is always raised here. aetcd waits for
        etcd's "created" answer with `asyncio.wait_for`, which on Python 3.11 returns the result and drops the
        cancel when it lands just as that answer wakes the waiter (CPython gh-86296): the caller would then
        follow its new watch for ever, cancelled in name only (the standby's follower hung on stop so)."""
        task = asyncio.current_task()
        asked = task.cancelling() if task is not None else 0
        watch = await self.conn.call(lambda c: c.watch_prefix(prefix.encode(), start_revision=start_revision))
        if task is not None and task.cancelling() > asked:
            await cancel_watch(watch)
            raise asyncio.CancelledError()
        return watch


async def cancel_watch(watch) -> None:
    """Stop a watch's events (best effort, at most 1 s: etcd may be unreachable)."""
    try:
        async with asyncio.timeout(1):
            await watch.cancel()
    except Exception:  # noqa: BLE001 - etcd errors and the timeout: the stream ends with the client
        pass
