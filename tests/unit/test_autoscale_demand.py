"""`meshctl bench autoscale`'s series reader and arrivals (mesh/autoscale/demand.py): rows at one time summed,
dates parsed, bad input named, arrivals following the rate and the speedup."""

from __future__ import annotations

import pytest

from mesh.autoscale import demand
from tests.unit._autoscale_csv import write_csv


def test_series_sums_rows_at_one_time_and_parses_dates(tmp_path) -> None:
    s = demand.read_series(write_csv(tmp_path, "time,v,x\n2020-05-01 00:01:00,2,a\n2020-05-01 00:00:00,1,a\n"
                                           "2020-05-01 00:01:00,3,b\n2020-05-01 00:02:00,NULL,c\n"), "time", "v")
    assert s.t.tolist() == [0.0, 60.0] and s.value.tolist() == [1.0, 5.0] and s.step_s == 60.0


@pytest.mark.parametrize("text,cols,match", [
    ("t,v\n0,1\n1,2\n", ("t", "rate"), "--value-col 'rate': no such column"),
    ("t,v\n0,1\n1,2\n", ("time", "v"), "--time-col 'time': no such column"),
    ("t,v\n", ("t", "v"), "0 usable point"),
    ("t,v\n0,0\n1,0\n", ("t", "v"), "every value"),
    ("t,v\n0,1\n1,abc\n", ("t", "v"), "row 3: value column 'v' has 'abc', not a number"),
    ("t,v\n0,1\nyesterday,2\n", ("t", "v"), "row 3: time column 't'"),
    ("t,v\n0,1\n1,-3\n", ("t", "v"), ">= 0"),
])
def test_series_bad_input_is_named(tmp_path, text, cols, match) -> None:
    with pytest.raises(demand.SeriesError, match=match):
        demand.read_series(write_csv(tmp_path, text), *cols)


def test_arrivals_follow_the_rate_and_speedup(tmp_path) -> None:
    s = demand.read_series(write_csv(tmp_path, "t,v\n0,10\n100,0\n200,30\n"), "t", "v")
    a = demand.arrivals(s, rate_scale=0.5, speedup=2, seed=3)        # 5/s for 50 s, 0, 15/s for 50 s
    assert a.min() >= 0 and a.max() <= 150
    assert not ((a >= 50) & (a < 100)).any()
    assert 180 < (a < 50).sum() < 320 and 600 < (a >= 100).sum() < 900
