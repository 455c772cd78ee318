"""The leader key and this process's session on it: the election (`become_leader`), the keepalive that counts
leadership lost before etcd can let another control plane in, stepping down; and the leader key's value.

The fencing itself is in the writes: every transaction compares the leader key's create revision
(`leader_revision`, controlplane/state/fencedcommit.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import uuid

from controlplane.state import keys
from controlplane.state.etcdconn import ETCD_ERRORS, EtcdConnection
from mesh import errors

log = logging.getLogger("controlplane.state.store")


class LeaderSession:
    def __init__(self, conn: EtcdConnection) -> None:
        self.conn = conn
        self.identity = ""
        self.leader_revision = 0
        self.session_lease: int | None = None
        self.lost_leadership = asyncio.Event()
        self._keepalive_task: asyncio.Task | None = None

    async def become_leader(self, identity: str, ttl: int = 10, wait: float | None = 60.0,
                            endpoint: str = "", poll: float = 0.2, host: str | None = None) -> None:
        """Take the leader key with a fresh session lease.

        The key's value names this control plane, its host and its advertised `endpoint` (so standbys can
        point callers at the leader). A previous incarnation of the same identity on the same host (a
        restart) takes over at once; another holder is waited for until its lease expires, at most `wait`
        seconds (None: for ever, the standby's campaign). While waiting, this candidate keeps its own lease
        alive.

        The same identity from another host is a copied state directory (its `identity` file cloned with it),
        not a restart: taking over at once there made the two control planes take the key from each other
        for as long as both ran. It is waited for like any other holder, with an ERROR saying what to do.
        """
        self.identity = identity
        host = host if host is not None else os.uname().nodename
        value = encode_leader(identity, endpoint, host)
        clone_logged = False
        call = self.conn.call
        tx = self.conn.client.transactions
        loop = asyncio.get_running_loop()
        deadline = None if wait is None else loop.time() + wait
        lease = None
        while True:
            if lease is None:
                lease = await call(lambda c: c.lease(ttl))
            ok, _ = await call(lambda c: c.transaction(
                compare=[tx.create(keys.LEADER.encode()) == 0],
                success=[tx.put(keys.LEADER.encode(), value, lease=lease.id)], failure=[]))
            if ok:
                kv = await call(lambda c: c.get(keys.LEADER.encode()))
                self.leader_revision = kv.create_revision
                self.conn.note(kv.mod_revision)
                break
            held = await call(lambda c: c.get(keys.LEADER.encode()))
            held_host = leader_host(held.value) if held is not None else ""
            if (held is not None and decode_leader(held.value)[0] == identity and held_host not in ("", host)
                    and not clone_logged):
                clone_logged = True
                log.error("the leader key holds this control plane's identity from another host: its state "
                          "directory was copied; waiting as a standby (delete <state_dir>/identity on one of "
                          "them to give it an identity of its own)",
                          extra={"fields": {"identity": identity, "leader_host": held_host, "host": host}})
            if held is not None and decode_leader(held.value)[0] == identity and held_host in ("", host):
                # Our own previous incarnation (a restart) still holds the key: drop it and
                # take it anew, so the leader key gets a fresh create revision (fencing).
                dropped, _ = await call(lambda c: c.transaction(
                    compare=[tx.mod(keys.LEADER.encode()) == held.mod_revision],
                    success=[tx.delete(keys.LEADER.encode())], failure=[]))
                if dropped:
                    continue
            if deadline is not None and loop.time() > deadline:
                await self.conn.revoke_lease(lease.id)
                raise errors.Unavailable("another control plane holds the leader key")
            await asyncio.sleep(poll)
            try:
                reply = await call(lambda c: c.refresh_lease(lease.id))
                if reply is None or reply.TTL <= 0:
                    lease = None
            except ETCD_ERRORS:
                lease = None
        self.session_lease = lease.id
        self._keepalive_task = asyncio.create_task(self._keep_session(lease.id, ttl))
        log.info("leader elected", extra={"fields": {"identity": identity, "revision": self.leader_revision}})

    async def step_down(self, why: str) -> None:
        """Give up leadership now: no write of this process passes the fence any more, and the session
        lease is revoked so a standby takes over at once instead of after the lease's TTL."""
        log.error("stepping down as leader", extra={"fields": {"reason": why}})
        self.lost_leadership.set()
        if self._keepalive_task is not None:
            self._keepalive_task.cancel()
        if self.session_lease is not None:
            await self.conn.revoke_lease(self.session_lease)

    async def leader(self) -> tuple[str, str]:
        """(identity, advertised endpoint) of the current leader; ("", "") when there is none."""
        kv = await self.conn.call(lambda c: c.get(keys.LEADER.encode()))
        return decode_leader(kv.value) if kv is not None else ("", "")

    def stop_keepalive(self) -> None:
        if self._keepalive_task:
            self._keepalive_task.cancel()

    async def _keep_session(self, lease_id: int, ttl: int) -> None:
        """Refresh the session lease every ttl/3 (every 0.25 s after a failure). Leadership counts as lost
        once 60% of the TTL has passed without a good refresh: before etcd can have expired the lease and
        let another control plane in, so this one stops writing first (commit() refuses at once)."""
        loop = asyncio.get_running_loop()
        last_ok = loop.time()
        delay = max(ttl / 3, 0.5)
        while True:
            await asyncio.sleep(delay)
            client = self.conn.client
            try:
                async with asyncio.timeout(max(ttl / 4, 0.5)):   # not wait_for: it can drop a cancel (gh-86296)
                    reply = await client.refresh_lease(lease_id)
                if reply is not None and reply.TTL > 0:
                    last_ok = loop.time()
                    delay = max(ttl / 3, 0.5)
                    continue
                log.error("leader session lease expired")
            except Exception as e:  # noqa: BLE001 - etcd's errors, a raw gRPC one, anything: a failed refresh
                # (an exception escaping here ended the keepalive without flagging the loss: the lease lapsed
                # while this process went on writing until etcd refused a fenced write)
                self.conn.failover(client, e)         # the next try (0.25 s on) goes to the next endpoint
                log.warning("leader session keepalive failed", extra={"fields": {"error": repr(e)}})
                if loop.time() - last_ok < ttl * 0.6:
                    delay = 0.25
                    continue
            self.lost_leadership.set()
            return


def encode_leader(identity: str, endpoint: str = "", host: str = "") -> bytes:
    return json.dumps({"identity": identity, "endpoint": endpoint, "host": host}).encode()


def leader_host(value: bytes) -> str:
    """The host the leader key's holder ran on; "" when its value does not say (an older control plane)."""
    try:
        d = json.loads(value)
    except ValueError:
        return ""
    return str(d.get("host", "")) if isinstance(d, dict) else ""


def decode_leader(value: bytes) -> tuple[str, str]:
    """(identity, endpoint) from the leader key's value (older control planes wrote the bare identity)."""
    try:
        d = json.loads(value)
        if isinstance(d, dict):
            return str(d.get("identity", "")), str(d.get("endpoint", ""))
    except ValueError:
        pass
    return value.decode(errors="replace"), ""


def new_identity() -> str:
    return uuid.uuid4().hex[:12]
