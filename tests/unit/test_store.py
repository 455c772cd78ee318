"""The etcd store against a real etcd: leader fencing and group commit."""

import asyncio
import types

import aetcd
import pytest

from controlplane.state import keys
from controlplane.state.store import Absent, Delete, EtcdStore, Present, Put
from controlplane.state.writer import Writer
from mesh import errors


async def make_store(etcd_server, ident, ttl=30, wait=10.0):
    """A leader store. Leases are long: a 2 s or 5 s one lapses on a stalled worker (the keepalive gives up after
    60 % of it), and then another candidate gets the key or the store stops writing, whatever the test meant."""
    st = EtcdStore([etcd_server.endpoint])
    await st.connect()
    await st.become_leader(ident, ttl=ttl, wait=wait)
    return st


async def test_only_the_leader_writes_and_a_deposed_leader_is_fenced(etcd_server, etcd_client):
    a = await make_store(etcd_server, "cp-a")
    await a.commit([Put(b"/gpumesh/v1/x", b"1")])
    b = EtcdStore([etcd_server.endpoint])
    await b.connect()
    with pytest.raises(errors.Unavailable):
        await b.become_leader("cp-b", ttl=30, wait=0.5)    # a holds the key
    # a's session dies (lease revoked, as when a is partitioned long enough): b takes over
    a.session._keepalive_task.cancel()
    await etcd_client.revoke_lease(a.session_lease)
    await b.become_leader("cp-b", ttl=30, wait=5)
    with pytest.raises(errors.Unavailable):
        await a.commit([Put(b"/gpumesh/v1/x", b"stale")])   # fenced by the leader key's create revision
    assert a.lost_leadership.is_set()
    assert (await etcd_client.get(b"/gpumesh/v1/x")).value == b"1"
    await b.commit([Put(b"/gpumesh/v1/x", b"2")])
    assert (await etcd_client.get(b"/gpumesh/v1/x")).value == b"2"
    await a.close()
    await b.revoke_lease(b.session_lease)
    await b.close()


async def test_restart_of_the_same_identity_takes_over_at_once(etcd_server, etcd_client):
    a = await make_store(etcd_server, "cp-same", ttl=30)
    rev_a = a.leader_revision
    a.session._keepalive_task.cancel()            # crashed: its lease would live 30 s more
    a2 = await make_store(etcd_server, "cp-same", ttl=30, wait=2)
    assert a2.leader_revision > rev_a      # a fresh create revision fences the old incarnation
    with pytest.raises(errors.Unavailable):
        await a.commit([Put(b"/gpumesh/v1/y", b"old")])
    await a2.commit([Put(b"/gpumesh/v1/y", b"new")])
    await a.close()
    await a2.revoke_lease(a2.session_lease)
    await a2.close()


async def test_the_same_identity_from_another_host_is_a_clone_and_waits(etcd_server, etcd_client, caplog):
    """A state directory copied to a second host carries its identity file: the copy must not take the key
    from the leader at once (the two then took it from each other for as long as both ran)."""
    a = await make_store_on(etcd_server, "cp-cloned", host="host-a")
    clone = EtcdStore([etcd_server.endpoint])
    await clone.connect()
    with caplog.at_level("ERROR"), pytest.raises(errors.Unavailable):
        await clone.become_leader("cp-cloned", ttl=30, wait=1.0, host="host-b")
    assert "state directory was copied" in caplog.text
    assert not a.lost_leadership.is_set()
    await a.commit([Put(b"/gpumesh/v1/z", b"a")])        # a is still the leader, unfenced
    # a restart of the leader on its own host still takes over at once
    a.session._keepalive_task.cancel()
    a2 = await make_store_on(etcd_server, "cp-cloned", host="host-a", wait=2)
    assert a2.leader_revision > a.leader_revision
    for st in (a, clone):
        await st.close()
    await a2.revoke_lease(a2.session_lease)
    await a2.close()


async def make_store_on(etcd_server, ident, host, wait=10.0):
    st = EtcdStore([etcd_server.endpoint])
    await st.connect()
    await st.become_leader(ident, ttl=30, wait=wait, host=host)
    return st


async def test_group_commit_merges_and_isolates_a_conflict(etcd_server, etcd_client):
    st = await make_store(etcd_server, "cp-w")
    w = Writer(st)
    w.start()
    await st.commit([Put(b"/gpumesh/v1/taken", b"x")])
    ok = [w.write([Put(f"/gpumesh/v1/k{i}".encode(), b"v")], [Absent(f"/gpumesh/v1/k{i}".encode())])
          for i in range(50)]
    bad = w.write([Put(b"/gpumesh/v1/taken", b"y")], [Absent(b"/gpumesh/v1/taken")])
    missing = w.write([Put(b"/gpumesh/v1/nope", b"y")], [Present(b"/gpumesh/v1/nope")])
    results = await asyncio.gather(*ok, bad, missing, return_exceptions=True)
    assert all(isinstance(r, int) for r in results[:50])
    assert isinstance(results[50], errors.Aborted) and isinstance(results[51], errors.Aborted)
    assert w.batches < 50                   # merged into few transactions
    assert (await etcd_client.get(b"/gpumesh/v1/taken")).value == b"x"
    assert await etcd_client.get(b"/gpumesh/v1/nope") is None
    res = await etcd_client.get_prefix(b"/gpumesh/v1/k")
    assert len(res.kvs) == 50
    await w.stop()
    await st.revoke_lease(st.session_lease)
    await st.close()


async def test_group_commit_never_merges_past_etcds_operation_limit(etcd_server, etcd_client):
    # two writes of 100 puts each (the event recorder's and retention's chunks) queued together: merged they
    # were one transaction of 200 operations, which etcd refuses (--max-txn-ops 128), failing both callers
    st = await make_store(etcd_server, "cp-big", ttl=5)
    w = Writer(st)
    w.start()
    writes = [w.write([Put(f"/gpumesh/v1/big{j}/{i}".encode(), b"v") for i in range(100)]) for j in range(3)]
    small = w.write([Put(b"/gpumesh/v1/small", b"v")], [Absent(b"/gpumesh/v1/small")])
    results = await asyncio.gather(*writes, small, return_exceptions=True)
    assert all(isinstance(r, int) for r in results), results
    assert len((await etcd_client.get_prefix(b"/gpumesh/v1/big")).kvs) == 300
    assert not st.lost_leadership.is_set()
    await w.stop()
    await st.close()


class LateTxn:
    """kvstub.Txn whose first transaction loses its answer and reaches etcd only just before the next one, as a
    proposal stuck in etcd's raft log past the client's deadline (a quorum's disks stalled) is applied later."""

    def __init__(self, stub) -> None:
        self.stub, self.held, self.calls = stub, None, 0

    async def __call__(self, request, **kw):
        self.calls += 1
        if self.calls == 1:
            self.held = (request, kw)
            raise aetcd.exceptions.ConnectionTimeoutError("deadline exceeded")
        if self.held is not None:
            (late, late_kw), self.held = self.held, None
            await self.stub.Txn(late, **late_kw)
        return await self.stub.Txn(request, **kw)


@pytest.mark.parametrize("op", ["put", "delete"])
async def test_a_lost_write_applied_after_its_read_back_is_not_answered_as_failed(etcd_server, etcd_client, op):
    st = await make_store(etcd_server, f"cp-late-{op}", ttl=5)
    key = f"/gpumesh/v1/slices/late-{op}".encode()
    if op == "delete":
        await st.commit([Put(key, b"v")])
    late = LateTxn(st.client.kvstub)
    st.client.kvstub = types.SimpleNamespace(Txn=late, Range=st.client.kvstub.Range)
    rev = await st.commit([Put(key, b"v2")] if op == "put" else [Delete(key)])
    assert rev > 0                  # before: "not applied" (UNAVAILABLE), and then etcd applied it all the same
    kv = await etcd_client.get(key)
    assert (kv is not None and kv.value == b"v2") if op == "put" else kv is None
    assert not st.lost_leadership.is_set()
    await st.close()


async def test_a_dead_first_endpoint_of_named_members_is_passed_over(etcd_server, etcd_client):
    # endpoints by host name (docs/operations.md: https://etcd-1:2379, ...) were one channel to the first alone:
    # with that member down the control plane could neither campaign nor write, whatever the others
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]                     # nothing listens here once closed
    port = etcd_server.endpoint.rsplit(":", 1)[1]
    st = EtcdStore([f"http://localhost:{dead}", f"http://localhost:{port}"], timeout=3)
    await st.connect()
    await st.become_leader("cp-named", ttl=5, wait=5)
    await st.commit([Put(b"/gpumesh/v1/named", b"1")])
    assert (await st.load()).kvs[b"/gpumesh/v1/named"][0] == b"1"
    assert (await etcd_client.get(b"/gpumesh/v1/named")).value == b"1"
    await st.close()


async def test_a_refused_write_whose_leader_check_fails_raises_a_typed_error(etcd_server, etcd_client):
    # the writer fails only MeshErrors to their callers; anything else counts as a crash of the writer (5 in a
    # minute and the leader steps down): a refused precondition and then an etcd blip must not be one
    st = await make_store(etcd_server, "cp-check", ttl=5)
    await st.commit([Put(b"/gpumesh/v1/there", b"1")])

    async def unreachable(*a, **kw):
        raise aetcd.exceptions.ConnectionFailedError("etcd unreachable")
    real, st.client.get = st.client.get, unreachable
    with pytest.raises(errors.Unavailable):
        await st.commit([Put(b"/gpumesh/v1/there", b"2")], [Absent(b"/gpumesh/v1/there")])
    st.client.get = real
    assert not st.lost_leadership.is_set()
    await st.close()


async def test_a_write_etcd_refuses_is_not_read_back(etcd_server, etcd_client):
    # a refusal is an answer (etcd's space quota reached, too many operations): not applied, no read-back and no
    # barrier write, which a full etcd would refuse too (20 tries, then the leader stepped down over nothing)
    st = await make_store(etcd_server, "cp-refused", ttl=5)
    with pytest.raises(errors.Unavailable, match="refused"):
        await st.commit([Put(f"/gpumesh/v1/many/{i}".encode(), b"v") for i in range(200)])
    assert await etcd_client.get(b"/gpumesh/v1/barrier") is None
    assert not st.lost_leadership.is_set()
    await st.close()


def test_key_layout():
    assert keys.slice_("s-1") == b"/gpumesh/v1/slices/s-1"
    assert keys.name_of(keys.alive("n1"), keys.ALIVE) == "n1"


async def test_a_keepalive_that_fails_oddly_still_flags_the_lost_leadership():
    """Only etcd's own errors were caught: any other exception from a refresh ended the keepalive without
    setting lost_leadership, and the leader went on as if its session lived."""
    st = EtcdStore(["http://127.0.0.1:9"])
    calls = []

    class Client:
        async def refresh_lease(self, lease_id):
            calls.append(lease_id)
            raise RuntimeError("an unexpected answer")
    st.client = Client()
    await asyncio.wait_for(st.session._keep_session(7, 1), 30)
    assert st.lost_leadership.is_set() and calls and set(calls) == {7}
