"""DeleteNode against a real etcd (the real store's guarded transactions and the group-commit writer): a control
plane that stops right after the deletion marker is durable leaves the node half-deleted in etcd; the next leader,
loaded from etcd, finishes the deletion. The fleet and the control plane are test_nodedelete's."""

from __future__ import annotations

import pytest

from controlplane.state import keys
from controlplane.state.store import EtcdStore
from gpumesh.v1 import migration_service_pb2 as M
from gpumesh.v1 import types_pb2 as T
from tests.unit._nodedelete_world import B, Etcd, check_deleted, connect_a, control_plane, fleet, migrate, wait_for

IDENTITY = "nodedelete-test"


async def leader(etcd_server) -> EtcdStore:
    store = EtcdStore([etcd_server.endpoint])
    await store.connect()
    await store.become_leader(IDENTITY, ttl=30)        # a restart of the same identity takes over at once;
    # long: a 5 s lease (refresh timeout 1.25 s) lapses on a stalled worker and the store stops writing
    return store


async def test_a_deletion_cut_after_its_marker_is_finished_by_the_next_leader(etcd_server, etcd_client):
    seed = Etcd()
    fleet(seed)
    for k, v in seed.kv.items():
        await etcd_client.put(k, v)
    store = await leader(etcd_server)
    first = await control_plane(store)
    connect_a(first)
    migrate(first, seed)
    for mid in ("m-from-b", "m-to-b"):
        await etcd_client.put(keys.migration(mid), first.mm.migrations[mid].SerializeToString())
        await etcd_client.put(keys.migration_secret(mid), first.mm.secrets[mid])
    await first.deleter._mark(B, first.ctl.fleet.nodes[B])      # the marker is durable; then the crash
    await first.stop()
    await store.close()
    marked = T.Node.FromString((await etcd_client.get(keys.node(B))).value)
    assert marked.deleting

    store = await leader(etcd_server)
    second = await control_plane(store)
    try:
        connect_a(second)
        assert B in second.ctl.deleted_nodes
        await wait_for(lambda: B not in second.ctl.fleet.nodes, "the deletion to finish")
        await wait_for(lambda: all(second.mm.migrations[m].phase == M.MIGRATION_PHASE_ABORTED
                                   for m in ("m-from-b", "m-to-b")), "the migrations to roll back")
        real = Etcd()                                   # what etcd holds now, read into the checker's shape
        resp = await etcd_client.get_prefix(b"/gpumesh/v1/")
        real.kv = {kv.key: kv.value for kv in resp}
        check_deleted(real)
        assert ("Node", B, "NodeDeleted") in [e[:3] for e in second.ctl.recorder.events]
    finally:
        await second.stop()
        await store.revoke_lease(store.session_lease)
        await store.close()
