"""A migration without a target places its target slice off the source node by telling the scheduler so
(`avoid_nodes`). It used to probe: allocate, and hold what landed on the source node while asking again; a
packing score put every one of its PLACE_ATTEMPTS probes back on a source node with room, so `meshctl migrate
W` of a workload on a roomy node failed ("no slice like s-... could be placed off node ...") with the rest of
the fleet empty. The scheduler's side: tests/unit/test_scheduler_framework.py (avoid_nodes)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from controlplane.controllers.migration_steps import StepsMixin
from gpumesh.v1 import migration_service_pb2 as M
from gpumesh.v1 import types_pb2 as T


class Steps(StepsMixin):
    def __init__(self, ctl) -> None:
        self.ctl = ctl

    async def _save(self, m) -> None:
        pass


def world():
    src = T.Slice(id="s-src", tenant="t", node="nA", gpu_model="H100-80GB", isolation=T.ISOLATION_MIG,
                  profile="1g.10gb")
    asked = []

    async def allocate(req, no_wait=False):
        asked.append(req)
        node = next((n for n in ("nA", "nB") if n not in req.avoid_nodes), "")
        return f"a-{len(asked)}", [T.Slice(id=f"s-{len(asked)}", node=node)]

    async def await_ready(alloc_id, no_wait, timeout):
        return [T.Slice(id="s-" + alloc_id.removeprefix("a-"), node="nB")]

    async def release(alloc_id, wait=False, message=""):
        pass
    ctl = SimpleNamespace(fleet=SimpleNamespace(slices={"s-src": src}), allocate=allocate,
                          _await_ready=await_ready, release=release)
    return Steps(ctl), asked


async def test_a_migration_without_a_target_asks_for_any_node_but_its_source():
    steps, asked = world()
    m = M.Migration(id="m-1", workload_id="w-1", source_node="nA")
    s = await steps._place(m, T.Workload(id="w-1", slice_id="s-src"))
    assert [r.avoid_nodes for r in asked] == [("nA",)]          # one request, told to keep off nA
    assert s.node == "nB" and m.target_node == "nB"


@pytest.mark.parametrize("fields", [dict(target_node="nA"), dict(resize_slice="s-src")])
async def test_a_named_target_node_or_a_resize_may_use_the_source_node(fields):
    steps, asked = world()
    m = M.Migration(id="m-1", workload_id="w-1", source_node="nA", **fields)
    await steps._place(m, T.Workload(id="w-1", slice_id="s-src"))
    assert asked[0].avoid_nodes == ()
