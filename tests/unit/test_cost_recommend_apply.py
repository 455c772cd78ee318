"""`meshctl recommend --apply` carries out exactly the recommendations it listed, and nothing else: each
recommendation has an id (what it acts on: its slices, workloads and the GPUs they go to), each apply step names
it, and the control plane refuses, naming what changed, one that no longer holds instead of carrying out another.

The control plane side is the real CostService and Recommender over a synthetic fleet of MPS GPUs whose
migrations move slices between GPUs; meshctl is driven through its command line (the fake client of
test_meshctl_commands.py, its `recommend` routed to that CostService)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from controlplane.cost.recommender import Recommender
from controlplane.cost.service import CostService
from gpumesh.v1 import cost_service_pb2 as C
from mesh import errors
from mesh.cost import recommend as R
from tests.unit.test_meshctl_commands import fake, run  # noqa: F401 (fake: a fixture)

GIB = 2**30


class Fleet:
    """One MPS H100 per node; a migration moves its slice (and workload) to the node (and GPU) asked for."""

    def __init__(self, layout: dict[str, list[tuple[str, int]]]) -> None:
        self.gpus = {node: [(sid, gib * GIB, f"w-{sid}") for sid, gib in slices] for node, slices in layout.items()}
        self.migrated: list[tuple[str, str]] = []

    def facts(self):
        return [], [], [R.GpuFacts(node, 0, "H100-80GB", 80 * GIB, 2.40, "mps" if sl else "", tuple(sl),
                                   sum(s[1] for s in sl)) for node, sl in self.gpus.items()]

    async def migrate(self, wid, to_node="", reason="", to_gpu=-1):
        assert to_gpu == 0                                  # the GPU the pack listed (each node has one)
        src = next(n for n, sl in self.gpus.items() if any(s[2] == wid for s in sl))
        s = next(s for s in self.gpus[src] if s[2] == wid)
        self.gpus[src].remove(s)
        self.gpus[to_node].append(s)
        self.migrated.append((wid, to_node))


def service(fleet: Fleet) -> CostService:
    ctl = SimpleNamespace(recorder=SimpleNamespace(emit=lambda *a, **k: None), fleet=SimpleNamespace(slices={}))
    rec = Recommender(ctl, None, SimpleNamespace(migrate=fleet.migrate), None)
    rec.facts = fleet.facts
    return CostService(None, rec)


def call(svc: CostService, **kw) -> C.RecommendResponse:
    kw.pop("timeout", None)
    return asyncio.run(CostService.Recommend.__wrapped__(svc, C.RecommendRequest(**kw), None))


# Four MPS GPUs. Listed: pack d (its 25 GiB to b), then pack c (40 GiB to a, 20 GiB to b). Once d is packed, the
# first pack the control plane computes is another one, never listed: b's three slices to a and c.
LAYOUT = {"a": [("s-a1", 30)], "b": [("s-b1", 25), ("s-b2", 10)], "c": [("s-c1", 20), ("s-c2", 40)],
          "d": [("s-d1", 25)]}


def test_the_fleet_turns_the_first_pack_into_an_unlisted_one_after_one_step():
    fleet = Fleet(LAYOUT)
    listed = R.pack(fleet.facts()[2])
    assert [(r.node, r.moves) for r in listed] == [("d", [("s-d1", "w-s-d1", "b", 0)]),
                                                   ("c", [("s-c2", "w-s-c2", "a", 0), ("s-c1", "w-s-c1", "b", 0)])]
    asyncio.run(fleet.migrate("w-s-d1", "b", to_gpu=0))
    assert R.pack(fleet.facts()[2])[0].node == "b"           # not the listed second (c)


def test_apply_carries_out_exactly_the_listed_pack_recommendations(fake, capsys):
    fleet = Fleet(LAYOUT)
    svc = service(fleet)
    fake.recommend = lambda **kw: call(svc, **kw)
    rc, out, err = run(capsys, "recommend", "--apply", "-o", "json")
    assert rc == 0, err
    # exactly the listed moves, in the listed order: s-d1 to b, then c's two slices; b's slices never move
    assert fleet.migrated == [("w-s-d1", "b"), ("w-s-c2", "a"), ("w-s-c1", "b")]
    assert {n: sorted(s[0] for s in sl) for n, sl in fleet.gpus.items()} == {
        "a": ["s-a1", "s-c2"], "b": ["s-b1", "s-b2", "s-c1", "s-d1"], "c": [], "d": []}


def test_a_listed_pack_that_no_longer_holds_is_refused_naming_what_changed(fake, capsys):
    """Between the steps, b fills up (another allocation): c's listed pack no longer fits, and the control plane
    refuses it, naming b's free memory, instead of carrying out the pack it would compute now."""
    fleet = Fleet(LAYOUT)
    svc = service(fleet)
    steps = []

    def recommend(**kw):
        if kw.get("apply"):
            steps.append(kw)
            if len(steps) == 2:
                fleet.gpus["b"].append(("s-new", 10 * GIB, "w-new"))
        return call(svc, **kw)
    fake.recommend = recommend
    rc, out, err = run(capsys, "recommend", "--apply")
    assert rc == 1
    assert fleet.migrated == [("w-s-d1", "b")]               # the first; nothing after the refusal
    assert "failed:" in out and "no longer holds" in out and "GPU b/0" in out and "GiB free" in out
    assert "stopped at a failure" in out


def test_named_recommendation_that_changed_is_failed_precondition_and_nothing_is_applied():
    fleet = Fleet(LAYOUT)
    svc = service(fleet)
    first, second = call(svc).recommendations
    assert first.id and second.id and first.id != second.id
    fleet.gpus["c"].append(("s-c3", 5 * GIB, "w-s-c3"))     # c holds one more slice now: moving two no longer frees it
    with pytest.raises(errors.FailedPrecondition, match=r"no longer holds.*GPU c/0 .*s-c3"):
        call(svc, apply=True, ids=[second.id])
    assert fleet.migrated == []
    got = call(svc, apply=True, ids=[first.id])              # the other one still holds: carried out alone
    assert [r.result for r in got.recommendations] == ["applied"] and got.applied == 1
    assert fleet.migrated == [("w-s-d1", "b")]


def test_ids_are_validated():
    svc = service(Fleet(LAYOUT))
    for bad in (["nonsense"], ["pack:"], ["pack:b/x:s-1@w-1>a/0"], [""], ["shrink:s-1"]):
        with pytest.raises(errors.InvalidArgument) as e:
            call(svc, apply=True, ids=bad)
        assert e.value.field == "ids"


def test_listing_by_ids_shows_those_that_still_hold():
    fleet = Fleet(LAYOUT)
    svc = service(fleet)
    first, second = call(svc).recommendations
    asyncio.run(fleet.migrate("w-s-c1", "a", to_gpu=0))      # c's listed pack no longer holds as listed
    got = call(svc, ids=[first.id, second.id])
    assert [r.id for r in got.recommendations] == [first.id]


def test_a_resize_whose_target_changed_is_refused_naming_both_targets():
    """The replica's measured peak rose after the listing: the resize listed (to 6 GiB) is refused, naming the
    one it would be now (12 GiB), and no resize is carried out."""
    peak = [6 * GIB]
    resized = []

    def facts():
        return [R.ReplicaFacts("chat", "r-1", "s-r1", "n1", 0, "H100-80GB", "mps", "", 20 * GIB, 0.25, 2.40, 8,
                               20 * GIB, 1.0, peak[0], 7200.0)], [], []

    async def resize(sid, memory, share, profile):
        resized.append((sid, memory))

    ctl = SimpleNamespace(recorder=SimpleNamespace(emit=lambda *a, **k: None), fleet=SimpleNamespace(slices={}))
    rec = Recommender(ctl, SimpleNamespace(store=SimpleNamespace(replicas={})), SimpleNamespace(resize=resize), None)
    rec.facts = facts
    svc = CostService(None, rec)
    (listed,) = call(svc).recommendations
    peak[0] = 12 * GIB
    with pytest.raises(errors.FailedPrecondition, match=r"s-r1.*12\.00 GiB.*listed.*6\.00 GiB"):
        call(svc, apply=True, ids=[listed.id])
    assert resized == []
    peak[0] = 6 * GIB
    assert call(svc, apply=True, ids=[listed.id]).applied == 1 and resized == [("s-r1", 6 * GIB)]


def test_apply_by_id_carries_out_only_that_one(fake, capsys):
    fleet = Fleet(LAYOUT)
    svc = service(fleet)
    _, second = call(svc).recommendations
    fake.recommend = lambda **kw: call(svc, **kw)
    rc, out, err = run(capsys, "recommend", "--apply", "--id", second.id)
    assert rc == 0, err
    assert fleet.migrated == [("w-s-c2", "a"), ("w-s-c1", "b")]
