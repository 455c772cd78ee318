"""A resize by migration of a slice that runs a model server is refused with a resize's reason, not a migration's.

A resize that cannot be done in place (no room on the GPU, an exclusive slice, a MIG profile) migrates the slice's
workload in pre-copy mode into the new placement. A model server does not speak the checkpoint SDK, so that is
refused; the refusal used to be the Migrate RPC's ("migrate it with mode transparent (CRIU)"), which a resize cannot
do (CRIU moves to another node) and the caller of `meshctl resize` had not asked for. It now says what the resize
would have done and what to do instead, and nothing is written."""

from __future__ import annotations

import pytest

from gpumesh.v1 import types_pb2 as T
from mesh import errors
from tests.unit.test_resize_run_race import _world


async def test_a_resize_by_migration_of_a_model_servers_slice_says_what_to_do():
    etcd, ctl, wm, mm = _world()
    w = T.Workload(id="w-srv", tenant="t", node="nA", slice_id="s-x", command=["serve"],
                   state=T.WORKLOAD_STATE_RUNNING, backend=T.ServingBackend(kind="llama.cpp"))
    wm.workloads[w.id] = w
    before = dict(etcd.kv)
    with pytest.raises(errors.FailedPrecondition) as e:
        await mm._resize_by_migration(ctl.fleet.slices["s-x"], memory_bytes=30 << 30)
    msg = str(e.value)
    assert "slice s-x" in msg and "resize" in msg and "w-srv" in msg, msg
    assert "stop it, resize the slice and run it again" in msg, msg
    assert "mode transparent" not in msg, msg
    assert etcd.kv == before and not mm.migrations
