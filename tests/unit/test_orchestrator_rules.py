"""The orchestrator's three rules as table tests over small fleet views (mesh/orchestrator)."""

import pytest

from mesh.errors import InvalidArgument
from mesh.orchestrator import (GpuView, MoveLedger, MovePolicy, ResizePolicy, SliceView, WarmPolicy,
                               WorkloadView, move_actions, resize_actions, warm_actions, warm_need)

# -- rule 1: warm slices ------------------------------------------------------------------

WARM = WarmPolicy(step_s=60, lead_s=120, release_band=0.5, max_per_key=8)


@pytest.mark.parametrize("hi,have,want", [
    ([0.0, 0.0, 0.0], 0, []),                                   # no demand, none warm: nothing
    ([1.2, 0.9, 5.0], 0, [("warm_create", 3)]),                 # ceil(1.2 + 0.9) over 2 lead steps
    ([1.2, 0.9], 1, [("warm_create", 2)]),                      # tops up to the need
    ([1.2, 0.9], 3, []),                                        # at need: nothing
    ([1.2, 0.9], 5, []),                                        # inside the band (3 * 1.5 + 1 = 5)
    ([1.2, 0.9], 7, [("warm_release", 2)]),                     # above the band: back to its edge
    ([0.0, 0.0], 1, []),                                        # band of one for a key gone quiet
    ([0.0, 0.0], 2, [("warm_release", 1)]),
    ([9.0, 9.0], 0, [("warm_create", 8)]),                      # capped per key
])
def test_warm_table(hi, have, want):
    acts = warm_actions({"1g.10gb/A100": hi}, {"1g.10gb/A100": have}, WARM)
    assert [(a.kind, a.count) for a in acts] == want
    for a in acts:
        assert a.subject == "1g.10gb/A100" and "forecast high" in a.reason


def test_warm_key_only_in_current_is_released_and_short_lead_scales():
    acts = warm_actions({}, {"gone": 4}, WARM)
    assert [(a.kind, a.subject, a.count) for a in acts] == [("warm_release", "gone", 3)]
    # a lead time shorter than the step takes that fraction of the step's demand
    assert warm_need([4.0, 4.0], WarmPolicy(step_s=60, lead_s=15)) == 1
    assert warm_need([4.0, 4.0], WarmPolicy(step_s=60, lead_s=30)) == 2


def test_warm_policy_checks_fields():
    with pytest.raises(InvalidArgument, match="warm.lead_s"):
        WarmPolicy(lead_s=0)

# -- rule 2: moves before the hot spot ----------------------------------------------------


def W(i, mem, prio=0, movable=True, cap=None):
    return WorkloadView(i, mem, prio, movable, mem if cap is None else cap)


POL = MovePolicy(critical=0.95, high=0.85, step_s=60, per_workload_per_hour=1, fleet_per_hour=10,
                 cooldown_s=600, downtime_s=0.3)


def fleet():
    return [GpuView("hot", 0.0, (W("a", 0.5, prio=5), W("b", 0.2, prio=1), W("c", 0.3, prio=1, movable=False))),
            GpuView("cool", 0.6, (W("d", 0.2),)),
            GpuView("warmish", 0.6, (W("e", 0.6),))]


@pytest.mark.parametrize("hi_hot,want", [
    ([0.80, 0.90, 0.93], []),                                    # stays below critical: no move
    ([0.80, 0.90, 0.97], [("b", "hot", "cool")]),                # crosses on the interval: lowest priority moves
    ([0.99, 0.99, 0.99], [("b", "hot", "cool")]),                # already critical (what reactive sees)
])
def test_move_table(hi_hot, want):
    hi = {"hot": hi_hot, "cool": [0.2, 0.25, 0.3], "warmish": [0.6, 0.65, 0.7]}
    acts = move_actions(fleet(), hi, POL, MoveLedger(), now=1000.0)
    assert [(a.subject, a.source, a.target) for a in acts] == want
    for a in acts:
        assert a.kind == "migrate" and a.benefit > POL.downtime_s and "critical" in a.reason


def test_move_skips_target_that_would_go_high_and_unmovable():
    hi = {"hot": [0.99], "cool": [0.7], "warmish": [0.7]}    # 0.7 + 0.2 >= high on both: nowhere to go
    assert move_actions(fleet(), hi, POL, MoveLedger(), now=0.0) == []
    only_pinned = [GpuView("hot", 0.0, (W("c", 0.9, movable=False),)), GpuView("cool", 1.0)]
    assert move_actions(only_pinned, {"hot": [0.99], "cool": [0.0]}, POL, MoveLedger(), now=0.0) == []


def test_move_target_needs_free_share():
    gpus = [GpuView("hot", 0.0, (W("b", 0.2, cap=0.5),)), GpuView("full", 0.4), GpuView("room", 0.5)]
    acts = move_actions(gpus, {"hot": [0.99], "full": [0.0], "room": [0.3]}, POL, MoveLedger(), now=0.0)
    assert [(a.subject, a.target) for a in acts] == [("b", "room")]


def test_move_budget_cooldown_and_cost():
    hi = {"hot": [0.99, 0.99], "cool": [0.2, 0.2], "warmish": [0.6, 0.6]}
    led = MoveLedger()
    led.record(100.0, "b", "elsewhere")                  # b moved within the hour: the next candidate goes
    acts = move_actions(fleet(), hi, POL, led, now=1000.0)
    assert [a.subject for a in acts] == ["a"]
    led = MoveLedger()
    led.record(900.0, "x", "hot")                        # cooldown of the source GPU
    assert move_actions(fleet(), hi, POL, led, now=1000.0) == []
    assert len(move_actions(fleet(), hi, POL, led, now=1600.0)) == 1
    full = MoveLedger()
    for i in range(10):
        full.record(500.0 + i, f"w{i}", f"g{i}")        # fleet budget spent
    assert move_actions(fleet(), hi, POL, full, now=1000.0) == []
    costly = MovePolicy(step_s=60, downtime_s=200.0)    # one critical step (60 s) is worth less than the downtime
    assert move_actions(fleet(), {"hot": [0.99, 0.5], "cool": [0.2], "warmish": [0.6]}, costly, MoveLedger(),
                        now=0.0) == []
    assert len(move_actions(fleet(), {"hot": [0.99] * 4, "cool": [0.2], "warmish": [0.6]}, costly, MoveLedger(),
                            now=0.0)) == 1


def test_move_policy_checks_fields():
    with pytest.raises(InvalidArgument, match="moves.high"):
        MovePolicy(critical=0.8, high=0.9)

# -- rule 3: grow before the need ---------------------------------------------------------

RP = ResizePolicy(headroom=0.1, shrink_band=0.3)


@pytest.mark.parametrize("slice_,hi,want", [
    (SliceView("s", 10, True), [8, 9, 9.5], []),                            # fits: nothing
    (SliceView("s", 10, True), [9, 12], [("grow", 14)]),                    # 12 * 1.1 -> 14 (whole GiB)
    (SliceView("s", 10, False), [9, 12], []),                               # not opted in
    (SliceView("s", 10, True, max_size=12), [9, 12.5], [("grow", 12)]),     # the client's bound
    (SliceView("s", 10, True, quota_left=1), [9, 12.5], [("grow", 11)]),    # the tenant's quota
    (SliceView("s", 10, True, quota_left=0), [9, 12.5], []),
    (SliceView("s", 10, True), [7, 7.5], []),                               # 7.5 * 1.1 * 1.3 = 10.7: inside the band
    (SliceView("s", 10, True), [4, 5], [("shrink", 6)]),                    # 5 * 1.1 -> 6
    (SliceView("s", 10, True, min_size=8), [4, 5], [("shrink", 8)]),
])
def test_resize_table(slice_, hi, want):
    acts = resize_actions([slice_], {"s": hi}, RP)
    assert [(a.kind, a.size) for a in acts] == want


def test_move_budget_per_workload_per_day():
    hi = {"hot": [0.99, 0.99], "cool": [0.2, 0.2], "warmish": [0.6, 0.6]}
    pol = MovePolicy(per_workload_per_hour=1, per_workload_per_day=2, cooldown_s=0)
    led = MoveLedger()
    led.record(0.0, "b", "x")
    led.record(4000.0, "b", "y")                          # b moved twice today, an hour apart
    assert [a.subject for a in move_actions(fleet(), hi, pol, led, now=8000.0)] == ["a"]
    assert [a.subject for a in move_actions(fleet(), hi, pol, led, now=86400.0 + 1)] == ["b"]   # a day later


def test_gpu_cooldowns_are_forgotten_once_they_end():
    """`last_by_gpu` had one entry per GPU ever moved from, kept for ever (GPUs replaced, nodes retired): a GPU
    whose cooldown has ended is dropped, one still cooling is kept and still holds its moves back."""
    hi = {"hot": [0.99, 0.99], "cool": [0.2, 0.2], "warmish": [0.6, 0.6]}
    led = MoveLedger()
    for i in range(1000):                  # churn: a thousand GPUs moved from (the moves' day budget aside)
        led.last_by_gpu[f"retired-{i}"] = float(i)
    led.record(1500.0, "x", "hot")                       # the live GPU, cooling until 2100
    assert move_actions(fleet(), hi, POL, led, now=1500.0) == []
    assert set(led.last_by_gpu) == {"hot", *(f"retired-{i}" for i in range(901, 1000))}
    assert move_actions(fleet(), hi, POL, led, now=2050.0) == []          # still cooling: still held back
    assert led.last_by_gpu == {"hot": 1500.0}
    assert [a.source for a in move_actions(fleet(), hi, POL, led, now=2100.0)] == ["hot"]
    assert led.last_by_gpu == {}
