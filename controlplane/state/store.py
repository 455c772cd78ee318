"""The etcd store: guarded transactions, the leader session, node leases.

Built on `aetcd` (asyncio, python-etcd3's API, current protobuf). One
`EtcdStore` per control-plane process. Writes go through `commit()`, which
adds the fencing compare on the leader key: a control plane that lost
leadership can no longer write, whatever it believes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import urllib.parse
import uuid

import aetcd
import aetcd.exceptions
import grpc
from prometheus_client import Counter

from controlplane.state import keys
# the operations and preconditions of a transaction (their own module; imported from here by the callers)
from controlplane.state.txnops import Absent, Delete, Present, Put, Revision, Snapshot  # noqa: F401
from mesh import errors

WRITE_ERRORS = Counter("gpumesh_etcd_write_errors_total", "etcd transactions that failed: etcd unreachable or "
                       "erring (etcd), or this control plane no longer the leader (not_leader); precondition "
                       "conflicts are not errors", ["reason"])

log = logging.getLogger(__name__)

ETCD_ERRORS = (aetcd.exceptions.ClientError, OSError, asyncio.TimeoutError)


def parse_endpoint(url: str) -> tuple[str, int]:
    """(host, port) of an etcd endpoint URL, the host as a gRPC target takes it (an IPv6 address bracketed:
    the client dials f"{host}:{port}")."""
    u = urllib.parse.urlparse(url if "://" in url else "http://" + url)
    try:
        port = u.port
    except ValueError:
        port = None
    if not u.hostname or not port:
        raise ValueError(f"etcd endpoint {url!r} is not http://HOST:PORT")
    return (f"[{u.hostname}]" if ":" in u.hostname else u.hostname), port


class EtcdStore:
    def __init__(self, endpoints: list[str], timeout: float = 10.0, *, credentials=None,
                 username: str | None = None, password: str | None = None) -> None:
        """`credentials` (grpc channel credentials, see controlplane.state.etcdtls) for https:// endpoints;
        `username`/`password` for etcd auth."""
        if not endpoints:
            raise ValueError("etcd endpoints: at least one is needed")
        self.endpoints = endpoints
        # One client per endpoint, used one at a time: an error that says the member cannot serve (unreachable, or
        # cut off from the quorum: "no leader", see etcdtls.REQUIRE_LEADER) moves the calls to come on to the next
        # endpoint (`_failover`). (One channel over every member, "ipv4:A:1,B:2", took host names not at all, and
        # stayed on a member that was reachable but had no leader.)
        self._targets = [parse_endpoint(e) for e in endpoints]
        self._client_args = dict(timeout=timeout, credentials=credentials, username=username or None,
                                 password=password or None, options={
                                     "grpc.max_receive_message_length": 64 << 20,
                                     "grpc.keepalive_time_ms": 10_000})
        self._clients: dict = {}
        self._at = 0
        self.client = self._client(0)
        self.identity = ""
        self.leader_revision = 0
        self.session_lease: int | None = None
        self.lost_leadership = asyncio.Event()
        self.revision = 0          # the highest etcd revision any answer to this process carried
        self._keepalive_task: asyncio.Task | None = None

    async def connect(self) -> None:
        await self._call(lambda c: c.connect())

    async def member_versions(self) -> dict[str, str]:
        """The etcd version each endpoint's member reports ("" for one that does not answer now)."""
        out = {}
        for i, ep in enumerate(self.endpoints):
            client = self._client(i)
            try:
                await client.connect()
                resp = await client.maintenancestub.Status(aetcd.rpc.StatusRequest(), timeout=min(client._timeout, 3),
                                                           metadata=client.metadata)
                out[ep] = resp.version
            except Exception:  # noqa: BLE001 - a member down now: its version is unknown, not an error
                out[ep] = ""
        return out

    async def close(self) -> None:
        if self._keepalive_task:
            self._keepalive_task.cancel()
        for client in self._clients.values():
            try:
                await client.close()
            except ETCD_ERRORS:
                pass

    # -- endpoints -------------------------------------------------------------------

    def _client(self, i: int):
        client = self._clients.get(i)
        if client is None:
            from controlplane.state.etcdtls import TlsClient
            host, port = self._targets[i]
            client = self._clients[i] = TlsClient(host=host, port=port, **self._client_args)
        return client

    def _failover(self, client, e: BaseException) -> None:
        """After `client` failed to reach etcd: the next endpoint serves the calls to come (unless another call
        moved on from `client` already)."""
        if len(self._targets) < 2 or client is not self.client or not _unreachable(e):
            return
        self._at = (self._at + 1) % len(self._targets)
        self.client = self._client(self._at)
        log.warning("etcd endpoint unreachable; trying the next", extra={"fields": {
            "error": repr(e), "next": "%s:%s" % self._targets[self._at]}})

    async def _call(self, fn):
        """`await fn(client)` at the current endpoint; when it cannot be reached, again at each other one."""
        for tried in range(len(self._targets)):
            client = self.client
            try:
                return await fn(client)
            except Exception as e:  # noqa: BLE001 - re-raised unless another endpoint is tried
                self._failover(client, e)
                if self.client is client or tried == len(self._targets) - 1:
                    raise

    # -- leadership --------------------------------------------------------------

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
        tx = self.client.transactions
        loop = asyncio.get_running_loop()
        deadline = None if wait is None else loop.time() + wait
        lease = None
        while True:
            if lease is None:
                lease = await self._call(lambda c: c.lease(ttl))
            ok, _ = await self._call(lambda c: c.transaction(
                compare=[tx.create(keys.LEADER.encode()) == 0],
                success=[tx.put(keys.LEADER.encode(), value, lease=lease.id)], failure=[]))
            if ok:
                kv = await self._call(lambda c: c.get(keys.LEADER.encode()))
                self.leader_revision = kv.create_revision
                self.revision = max(self.revision, kv.mod_revision)
                break
            held = await self._call(lambda c: c.get(keys.LEADER.encode()))
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
                dropped, _ = await self._call(lambda c: c.transaction(
                    compare=[tx.mod(keys.LEADER.encode()) == held.mod_revision],
                    success=[tx.delete(keys.LEADER.encode())], failure=[]))
                if dropped:
                    continue
            if deadline is not None and loop.time() > deadline:
                await self.revoke_lease(lease.id)
                raise errors.Unavailable("another control plane holds the leader key")
            await asyncio.sleep(poll)
            try:
                reply = await self._call(lambda c: c.refresh_lease(lease.id))
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
            await self.revoke_lease(self.session_lease)

    async def leader(self) -> tuple[str, str]:
        """(identity, advertised endpoint) of the current leader; ("", "") when there is none."""
        kv = await self._call(lambda c: c.get(keys.LEADER.encode()))
        return decode_leader(kv.value) if kv is not None else ("", "")

    async def _keep_session(self, lease_id: int, ttl: int) -> None:
        """Refresh the session lease every ttl/3 (every 0.25 s after a failure). Leadership counts as lost
        once 60% of the TTL has passed without a good refresh: before etcd can have expired the lease and
        let another control plane in, so this one stops writing first (commit() refuses at once)."""
        loop = asyncio.get_running_loop()
        last_ok = loop.time()
        delay = max(ttl / 3, 0.5)
        while True:
            await asyncio.sleep(delay)
            client = self.client
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
                self._failover(client, e)         # the next try (0.25 s on) goes to the next endpoint
                log.warning("leader session keepalive failed", extra={"fields": {"error": repr(e)}})
                if loop.time() - last_ok < ttl * 0.6:
                    delay = 0.25
                    continue
            self.lost_leadership.set()
            return

    # -- reads ---------------------------------------------------------------------

    async def load(self, prefix: str = keys.PREFIX) -> Snapshot:
        res = await self._call(lambda c: c.get_prefix(prefix.encode()))
        self.revision = max(self.revision, res.header.revision)
        kvs = {kv.key: (kv.value, kv.mod_revision, kv.lease) for kv in res.kvs}
        return Snapshot(revision=res.header.revision, kvs=kvs)

    async def get(self, key: bytes) -> bytes | None:
        kv = await self._call(lambda c: c.get(key))
        return kv.value if kv is not None else None

    async def read(self, key: bytes) -> tuple[bytes, int] | None:
        """The key's (value, mod revision), or None: what a `Revision` precondition is checked against."""
        try:
            kv, _ = await self._range(key)
        except (*ETCD_ERRORS, grpc.RpcError) as e:
            raise errors.Unavailable(f"etcd: {e}") from e
        return (kv.value, kv.mod_revision) if kv is not None else None

    # -- writes --------------------------------------------------------------------

    async def commit(self, ops: list[Put | Delete], conditions: list[Absent | Present | Revision] = ()) -> int:
        """Apply `ops` atomically if this process is still the leader and every
        condition holds. Returns the revision of the write.

        Raises errors.Unavailable when leadership is lost, errors.Aborted when a
        precondition fails.
        """
        if self.lost_leadership.is_set():
            WRITE_ERRORS.labels("not_leader").inc()
            raise errors.Unavailable("this control plane is no longer the leader")
        tx = self.client.transactions
        compare = [tx.create(keys.LEADER.encode()) == self.leader_revision]
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
        before = self.revision
        client = self.client
        try:
            await client.connect()
            resp = await client.kvstub.Txn(
                aetcd.rpc.TxnRequest(compare=[c.build_message() for c in compare],
                                     success=client._ops_to_requests(success)),
                timeout=client._timeout, metadata=client.metadata)
        except Exception as e:  # ETCD_ERRORS, or grpc.aio.AioRpcError from the raw stub
            self._failover(client, e)
            if _refused(e):     # etcd's answer, a refusal (no space, too many operations): not applied
                WRITE_ERRORS.labels("etcd").inc()
                raise errors.Unavailable(f"etcd refused the write: {getattr(e, 'details', lambda: e)()}") from e
            # The transaction may or may not have been applied (a member died with the answer).
            rev = await self._resolve(ops, before)
            if rev:
                return rev
            WRITE_ERRORS.labels("etcd").inc()
            raise errors.Unavailable(f"etcd: {getattr(e, 'details', lambda: e)()}") from e
        self.revision = max(self.revision, resp.header.revision)
        if resp.succeeded:
            return resp.header.revision
        try:    # not applied, for sure: whichever it was, the callers get a typed error (the writer's contract)
            leader = await self._call(lambda c: c.get(keys.LEADER.encode()))
        except ETCD_ERRORS as e:
            WRITE_ERRORS.labels("etcd").inc()
            raise errors.Unavailable(f"etcd: a precondition failed, and then etcd could not be read ({e})") from e
        if leader is None or leader.create_revision != self.leader_revision:
            self.lost_leadership.set()
            WRITE_ERRORS.labels("not_leader").inc()
            raise errors.Unavailable("this control plane is no longer the leader")
        raise errors.Aborted("a precondition of the write failed (concurrent change)")

    async def _range(self, key: bytes, revision: int = 0):
        """The key's KeyValue (at `revision`, 0: now), or None; notes the answer's revision."""
        async def rng(c):
            await c.connect()
            return await c.kvstub.Range(aetcd.rpc.RangeRequest(key=key, revision=revision), timeout=c._timeout,
                                        metadata=c.metadata)
        resp = await self._call(rng)
        self.revision = max(self.revision, resp.header.revision)
        return (resp.kvs[0] if resp.kvs else None), resp.header.revision

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
        barrier = False
        for _ in range(tries):
            if self.lost_leadership.is_set():
                return 0
            try:
                if puts:
                    revs = set()
                    for o in puts:
                        kv, _ = await self._range(o.key)
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
                            kv, _ = await self._range(o.key)
                            if kv is not None and kv.mod_revision <= rev:
                                break
                        else:
                            return rev
                    break
                existed, gone, now_rev = [], [], 0
                for o in deletes:
                    old, _ = await self._range(o.key, before) if before else (None, 0)
                    kv, now_rev = await self._range(o.key)
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
        self.lost_leadership.set()
        raise errors.Unavailable("etcd: the outcome of a write is unknown; this control plane stepped down")

    async def _barrier(self) -> None:
        """Commit a fenced write of `keys.BARRIER`: once etcd answers, every transaction proposed before it has
        been applied or never will be. Fenced off (another leader): leadership is lost, and a transaction of this
        process still pending fails its own leader compare."""
        tx = self.client.transactions
        fence = tx.create(keys.LEADER.encode()) == self.leader_revision

        async def txn(c):
            await c.connect()
            return await c.kvstub.Txn(aetcd.rpc.TxnRequest(
                compare=[fence.build_message()], success=c._ops_to_requests([tx.put(keys.BARRIER.encode(), b"")])),
                timeout=c._timeout, metadata=c.metadata)
        resp = await self._call(txn)
        self.revision = max(self.revision, resp.header.revision)
        if not resp.succeeded:
            self.lost_leadership.set()

    # -- node leases -----------------------------------------------------------------

    async def grant_lease(self, ttl: int) -> int:
        return (await self._call(lambda c: c.lease(ttl))).id

    async def refresh_lease(self, lease_id: int) -> int:
        """Refresh a node lease; returns its TTL, 0 when it has expired."""
        reply = await self._call(lambda c: c.refresh_lease(lease_id))
        return int(reply.TTL) if reply is not None else 0

    async def revoke_lease(self, lease_id: int) -> None:
        try:
            await self._call(lambda c: c.revoke_lease(lease_id))
        except ETCD_ERRORS:
            pass

    async def watch_prefix(self, prefix: str, start_revision: int):
        """A watch on `prefix` from `start_revision` (an aetcd Watch: iterate it, `cancel()` it when done).

        A cancel of the calling task while the watch is being created is always raised here. aetcd waits for
        etcd's "created" answer with `asyncio.wait_for`, which on Python 3.11 returns the result and drops the
        cancel when it lands just as that answer wakes the waiter (CPython gh-86296): the caller would then
        follow its new watch for ever, cancelled in name only (the standby's follower hung on stop so)."""
        task = asyncio.current_task()
        asked = task.cancelling() if task is not None else 0
        watch = await self._call(lambda c: c.watch_prefix(prefix.encode(), start_revision=start_revision))
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


def _unreachable(e: BaseException) -> bool:
    """An error that says the endpoint could not be reached (not an answer of etcd's)."""
    if isinstance(e, (aetcd.exceptions.ConnectionFailedError, aetcd.exceptions.ConnectionTimeoutError,
                      aetcd.exceptions.WatchTimeoutError, OSError, asyncio.TimeoutError)):
        return True
    code = getattr(e, "code", None)
    return callable(code) and code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


_REFUSALS = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                       grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED,
                       grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.OUT_OF_RANGE})


def _refused(e: BaseException) -> bool:
    """etcd answered and refused (the transaction was not applied), as opposed to an answer that may be lost:
    read back, and proved by a barrier write, which a refusing etcd (its space quota reached) would refuse too."""
    code = getattr(e, "code", None)
    return callable(code) and code() in _REFUSALS


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
