"""Allocate request ids: idempotent retries, and keys that expire instead of piling up in etcd."""

from __future__ import annotations

import pytest

from controlplane.controllers import slices as controller_mod
from controlplane.state import keys, requestids
from controlplane.controllers.slices import Controller
from controlplane.state.store import EtcdStore
from gpumesh.v1 import types_pb2 as t
from mesh.slicespec import validate
from tests.unit.test_placement import make_fleet


@pytest.fixture
async def ctl(etcd_server, etcd_client):
    store = EtcdStore([etcd_server.endpoint])
    await store.connect()
    # a long lease: a 5 s one (refreshed within 1.25 s) lapses on a stalled worker and the store stops writing
    await store.become_leader("request-ids-test", ttl=30)
    c = Controller(store)
    c.writer.start()
    fleet = make_fleet(("n1", [("H100-80GB", True)]))
    c.fleet.nodes, c.fleet.index = fleet.nodes, fleet.index
    yield c
    await c.writer.stop()
    await store.revoke_lease(store.session_lease)
    await store.close()


def one_g(tenant: str = "acme"):
    return validate(t.SliceSpec(tenant=tenant, mig_profile="1g.10gb"))


async def test_a_retry_gets_the_same_allocation_and_the_key_expires_with_a_lease(ctl, etcd_client):
    first, _ = await ctl.allocate(one_g(), request_id="r-1", no_wait=True)
    again, _ = await ctl.allocate(one_g(), request_id="r-1", no_wait=True)
    other, _ = await ctl.allocate(one_g("other"), request_id="r-1", no_wait=True)  # ids are per tenant
    assert again == first and other != first
    assert len(ctl.fleet.slices) == 2
    kv = await etcd_client.get(keys.request("acme", "r-1"))
    assert kv.value.decode() == first and kv.lease != 0
    ttl = (await etcd_client.get_lease_info(kv.lease)).TTL
    want = controller_mod.REQUEST_TTL_S + controller_mod.REQUEST_LEASE_ROTATE_S
    assert want - 60 <= ttl <= want
    # later keys share the lease until it rotates: one lease, not one per request
    await ctl.allocate(one_g(), request_id="r-2", no_wait=True)
    assert (await etcd_client.get(keys.request("acme", "r-2"))).lease == kv.lease


def test_remembered_ids_are_forgotten_after_the_ttl(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(requestids.time, "monotonic", lambda: clock[0])   # the ids' clock
    c = Controller(store=None)
    c.remember_request("acme", "old", "a-1")
    clock[0] += controller_mod.REQUEST_TTL_S - 1
    c.remember_request("acme", "mid", "a-2")
    assert set(c.requests) == {("acme", "old"), ("acme", "mid")}
    clock[0] += 2
    c.remember_request("acme", "new", "a-3")
    assert set(c.requests) == {("acme", "mid"), ("acme", "new")}


def test_an_id_remembered_again_lives_its_whole_ttl_from_then(monkeypatch):
    """A re-remembered id (a standby's reload, a retry's durable read) was dropped at its first entry's end; and
    clear() left the old entries to drop ids remembered after it."""
    clock = [1000.0]
    monkeypatch.setattr(requestids.time, "monotonic", lambda: clock[0])   # the ids' clock
    c = Controller(store=None)
    c.remember_request("acme", "x", "a-1")
    clock[0] += controller_mod.REQUEST_TTL_S - 1
    c.requests.clear()                                   # a standby's reload: remembered again from etcd
    c.remember_request("acme", "x", "a-1")
    clock[0] += 2
    c.remember_request("acme", "other", "a-2")          # prunes: the first entry of "x" is past its TTL
    assert c.requests.lookup("acme", "x") == "a-1"
    c.remember_request("acme", "x", "a-1")               # and remembered twice without a clear
    clock[0] += controller_mod.REQUEST_TTL_S - 1
    c.remember_request("acme", "third", "a-3")
    assert c.requests.lookup("acme", "x") == "a-1"
    clock[0] += 2
    c.remember_request("acme", "fourth", "a-4")
    assert c.requests.lookup("acme", "x") is None        # its last entry's TTL is over
