"""Rule 1's burst floor (mesh/orchestrator/warm.py): `burst_quantile` and `warm_actions(floor=...)`
as table tests."""

import pytest

from mesh.errors import InvalidArgument
from mesh.orchestrator import WarmPolicy, burst_quantile, warm_actions

WARM = WarmPolicy(step_s=600, lead_s=600, release_band=0.5, max_per_key=8)


@pytest.mark.parametrize("times,window,q,want", [
    ([], 10, 0.99, 0),                                   # never asked for: no floor
    ([100.0], 10, 0.99, 1),                              # one at a time
    ([0, 1000, 2000], 10, 0.99, 1),                      # spread out: a pool of one covers each
    ([0, 0, 0, 5000], 10, 1.0, 3),                       # three in the same second
    ([0, 5, 10, 5000], 10, 1.0, 3),                      # within the window, edges included
    ([0, 5, 11, 5000], 10, 1.0, 2),                      # the third came after the first's window
    ([5000, 0, 0, 0], 10, 1.0, 3),                       # any order
    ([0, 0, 0] + [100.0 * i for i in range(1, 98)], 10, 0.98, 1),   # sizes 1, 2, 3 and 97 x 1: q 0.98 is 1
    ([0, 0, 0] + [100.0 * i for i in range(1, 98)], 10, 0.99, 2),   # ... q 0.99 the 99th of 100: 2
    ([0, 0, 0] + [100.0 * i for i in range(1, 98)], 10, 1.0, 3),    # ... the max does not ignore it
])
def test_burst_quantile_table(times, window, q, want):
    assert burst_quantile(times, window, q) == want


def test_burst_quantile_checks_q():
    with pytest.raises(InvalidArgument, match="warm.burst_quantile"):
        burst_quantile([1.0], 10, 0)


@pytest.mark.parametrize("hi,floor,have,want", [
    ([0.0], 0, 0, []),                                   # no demand, no floor
    ([0.0], 3, 0, [("warm_create", 3)]),                 # a quiet bucket still keeps the burst floor
    ([1.2], 3, 1, [("warm_create", 2)]),                 # the floor above the step forecast's need (2)
    ([5.5], 3, 0, [("warm_create", 6)]),                 # the forecast above the floor
    ([0.0], 3, 5, []),                                   # inside the band over the floor (3 * 1.5 + 1 = 5)
    ([0.0], 3, 6, [("warm_release", 1)]),
    ([0.0], 20, 0, [("warm_create", 8)]),                # capped per key
])
def test_warm_floor_table(hi, floor, have, want):
    acts = warm_actions({"k": hi}, {"k": have}, WARM, {"k": floor})
    assert [(a.kind, a.count) for a in acts] == want
    if acts and floor > 1 and hi[0] < floor:
        assert "burst high" in acts[0].reason


def test_warm_floor_only_key_and_default():
    # a key with only a floor (no forecast, none warm) gets it; without floors the rule is unchanged
    assert [(a.subject, a.count) for a in warm_actions({}, {}, WARM, {"k": 2})] == [("k", 2)]
    assert warm_actions({"k": [1.0]}, {"k": 1}, WARM) == warm_actions({"k": [1.0]}, {"k": 1}, WARM, None) == []
