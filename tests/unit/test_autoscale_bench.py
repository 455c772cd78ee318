"""`meshctl bench autoscale`'s parts: the latency model's fit, the series reader, the simulation's accounting
on hand-checkable inputs, the policies' scalers, and the CLI (bad input exits 2; a calibrated run end to end)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from mesh.autoscale import demand
from mesh.autoscale.latency import LatencyModel, Measurement, default_model, fit
from mesh.autoscale.scalers import FixedScaler, peak_replicas
from mesh.autoscale.simulate import simulate

ROOT = Path(__file__).resolve().parents[2]


# -- calibration -----------------------------------------------------------------------------------------------

def test_fit_recovers_known_parameters_from_synthetic_measurements() -> None:
    rng = np.random.default_rng(1)
    base, per_token, decode = 0.040, 0.0009, 0.011
    reqs = []
    for n in (32, 128, 384):
        for _ in range(10):
            tokens = 64
            reqs.append(Measurement(n, base + per_token * n + rng.normal(0, 0.002), tokens,
                                    (tokens - 1) * decode * (1 + rng.normal(0, 0.02))))
    m = fit(reqs, [1.4, 1.5, 1.6], [0.2, 0.3, 0.25], prompt_tokens=128, max_tokens=64)
    assert m.prefill_base_s == pytest.approx(base, abs=0.003)
    assert m.prefill_per_token_s == pytest.approx(per_token, rel=0.05)
    assert m.decode_per_token_s == pytest.approx(decode, rel=0.03)
    assert m.load_s == 1.5 and m.slice_create_s == 0.25 and m.cold_start_s == pytest.approx(1.75)
    assert m.service_s() == pytest.approx(m.ttft_s(128) + 63 * m.decode_per_token_s)
    assert m.source["fit"]["ttft_r2"] > 0.95


def test_fit_refuses_too_few_measurements() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        fit([Measurement(10, 0.1, 5, 0.1)], [1.0], [0.1])
    with pytest.raises(ValueError, match="load and slice-creation"):
        fit([Measurement(10, 0.1, 5, 0.1)] * 2, [], [0.1])


def test_calibration_round_trips_and_bad_files_are_named(tmp_path) -> None:
    m = LatencyModel(0.05, 0.001, 0.01, 1.5, 0.2, source={"backend": "x"})
    m.save(tmp_path / "c.json")
    assert LatencyModel.load(tmp_path / "c.json") == m
    doc = json.loads((tmp_path / "c.json").read_text())
    del doc["load_s"]
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="load_s"):
        LatencyModel.load(tmp_path / "bad.json")


def test_shipped_calibration_was_measured() -> None:
    m = default_model()
    assert m.source.get("backend", "").startswith("llama.cpp")
    assert m.source["fit"]["requests"] >= 20 and len(m.source["load_s"]) >= 1
    assert 0 < m.ttft_s() < m.service_s() and m.cold_start_s > m.load_s > 0


# -- the series ------------------------------------------------------------------------------------------------

def write(tmp_path, text: str) -> str:
    p = tmp_path / "s.csv"
    p.write_text(text)
    return str(p)


def test_series_sums_rows_at_one_time_and_parses_dates(tmp_path) -> None:
    s = demand.read_series(write(tmp_path, "time,v,x\n2020-05-01 00:01:00,2,a\n2020-05-01 00:00:00,1,a\n"
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
        demand.read_series(write(tmp_path, text), *cols)


def test_arrivals_follow_the_rate_and_speedup(tmp_path) -> None:
    s = demand.read_series(write(tmp_path, "t,v\n0,10\n100,0\n200,30\n"), "t", "v")
    a = demand.arrivals(s, rate_scale=0.5, speedup=2, seed=3)        # 5/s for 50 s, 0, 15/s for 50 s
    assert a.min() >= 0 and a.max() <= 150
    assert not ((a >= 50) & (a < 100)).any()
    assert 180 < (a < 50).sum() < 320 and 600 < (a >= 100).sum() < 900


# -- the simulation's accounting -------------------------------------------------------------------------------

HAND = LatencyModel(prefill_base_s=0.1, prefill_per_token_s=0.0, decode_per_token_s=0.9, load_s=4.0,
                    slice_create_s=1.0, slots=1, prompt_tokens=1, max_tokens=2)   # TTFT 0.1 s, service 1.0 s


class Always:
    def __init__(self, n: int) -> None:
        self.n = n

    def scale(self, now, sample, *, ready, starting):
        return self.n


def test_accounting_on_a_tiny_series_with_a_warm_replica() -> None:
    r = simulate(np.array([0.0, 0.5, 3.0]), HAND, FixedScaler(1), slo_ttft_s=0.5, end_s=10.0, tick_s=2.0,
                 initial_replicas=1, warm_start=True)
    # request 0: TTFT 0.1; request 1 waits for request 0 (until 1.0): 0.6, misses the 0.5 SLO; request 2: 0.1
    assert r.requests == 3 and r.met_slo == 2 and r.slo_attainment == pytest.approx(2 / 3)
    assert r.ttft_s == pytest.approx([0.1, 0.6, 0.1])
    assert r.slice_seconds == pytest.approx(10.0) and r.slice_hours == pytest.approx(10 / 3600)
    assert r.cold_start_misses == 0 and r.scale_events == 0


def test_a_request_that_waits_for_a_cold_start_is_a_miss_and_the_slice_pays_from_the_decision() -> None:
    r = simulate(np.array([1.0]), HAND, Always(1), slo_ttft_s=0.5, end_s=10.0, tick_s=2.0)
    # the tick at 2 s starts a replica (cold start 5 s): ready at 7, the request's TTFT = 7 - 1 + 0.1
    assert r.ttft_s == pytest.approx([6.1]) and r.met_slo == 0
    assert r.cold_start_misses == 1 and r.scale_events == 1
    assert r.slice_seconds == pytest.approx(8.0)               # from 2 s to the end at 10 s


def test_scale_down_drains_busy_replicas_and_pays_until_they_leave() -> None:
    class Down:
        def scale(self, now, sample, *, ready, starting):
            return 2 if now < 4 else 1

    # two warm replicas, both busy from 3.5 to 4.5 when the tick at 4 s wants one: one drains, leaves at 4.5
    r = simulate(np.array([3.5, 3.5]), HAND, Down(), slo_ttft_s=1.0, end_s=6.0, tick_s=2.0,
                 initial_replicas=2, warm_start=True)
    assert r.met_slo == 2 and r.slice_seconds == pytest.approx(6.0 + 4.5)


def test_peak_replicas_by_littles_law() -> None:
    assert peak_replicas(3.0, 1.0, 0.7, 64) == 5          # 3 req/s x 1 s = 3 in flight / 0.7 per replica
    assert peak_replicas(100.0, 1.0, 1.0, 8) == 8
    assert peak_replicas(0.0, 1.0, 1.0, 8) == 1


# -- the CLI ---------------------------------------------------------------------------------------------------

def meshctl(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "proto")])}
    return subprocess.run([sys.executable, "-m", "tools.meshctl.main", "bench", "autoscale", *argv], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=600)


def test_cli_runs_every_policy_calibrated_on_a_short_series(tmp_path) -> None:
    rows = ["t,rps"] + [f"{60 * i},{v}" for i, v in enumerate([1, 1, 2, 4, 6, 6, 3, 1, 1, 2, 5, 2])]
    path = write(tmp_path, "\n".join(rows) + "\n")
    p = meshctl("--series", path, "--time-col", "t", "--value-col", "rps", "--refit-every", "2",
                "--season", "2", "-o", "json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["mode"] == "calibrated" and set(doc["policies"]) == {"predictive", "reactive", "fixed-peak"}
    for r in doc["policies"].values():
        for key in ("requests", "slo_attainment", "goodput_per_slice_hour", "slice_hours", "cost",
                    "cold_start_misses", "scale_events"):
            assert key in r
        assert r["requests"] == doc["series"]["arrivals"] > 100
        assert 0 <= r["slo_attainment"] <= 1 and r["slice_hours"] > 0
        assert r["cost"] == pytest.approx(r["slice_hours"] * doc["replica_cost_per_hour"], rel=1e-3, abs=1e-4)
    fixed = doc["policies"]["fixed-peak"]
    assert fixed["scale_events"] == 0 and fixed["slice_hours"] >= doc["policies"]["reactive"]["slice_hours"]
    assert doc["calibration"]["source"]["backend"].startswith("llama.cpp")


@pytest.mark.parametrize("argv,match", [
    (["--time-col", "t", "--value-col", "rps"], "--series FILE is required"),
    (["--series", "S", "--time-col", "t", "--value-col", "nope"], "--value-col 'nope': no such column"),
    (["--series", "S", "--time-col", "t", "--value-col", "rps", "--policy", "reactive,magic"], "unknown magic"),
    (["--series", "S", "--time-col", "t", "--value-col", "rps", "--min-replicas", "9", "--max-replicas", "2"],
     "--min-replicas 9 is above --max-replicas 2"),
    (["--series", "S", "--time-col", "t", "--value-col", "rps", "--rate-scale", "0"], "--rate-scale"),
    (["--series", "S", "--time-col", "t", "--value-col", "rps", "--mode", "sideways"], "--mode"),
    (["--series", "S", "--time-col", "t", "--value-col", "rps", "--profile", "9g.99gb"], "--profile '9g.99gb'"),
    (["--series", "S", "--time-col", "t", "--value-col", "rps", "--calibration", "/nonexistent.json"],
     "calibration /nonexistent.json"),
    (["--series", "/nonexistent.csv", "--time-col", "t", "--value-col", "rps"], "--series /nonexistent.csv"),
    (["--series", "S", "--time-col", "t", "--value-col", "rps", "--slice-create-s", "-1"],
     "--slice-create-s -1.0: must be between 0 and 3600 seconds"),
    (["--series", "S", "--time-col", "t", "--value-col", "rps", "--slice-create-s", "nan"],
     "--slice-create-s nan: must be between 0 and 3600"),
    (["--series", "S", "--time-col", "t", "--value-col", "rps", "--slice-create-s", "9999"],
     "--slice-create-s 9999.0: must be between 0 and 3600"),
    (["--series", "S", "--time-col", "t", "--value-col", "rps", "--slice-create-s", "10", "--mode", "real"],
     "--slice-create-s: calibrated mode only"),
    (["--series", "S", "--time-col", "t", "--value-col", "rps", "--sizing-quantile", "1"], "--sizing-quantile 1.0"),
    (["--series", "S", "--time-col", "t", "--value-col", "rps", "--sizing", "guess"], "--sizing"),
])
def test_cli_bad_input_exits_2_naming_the_problem(tmp_path, argv, match) -> None:
    path = write(tmp_path, "t,rps\n0,1\n60,2\n120,3\n")
    p = meshctl(*[path if a == "S" else a for a in argv], "-o", "json")
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert match in p.stderr and p.stdout == ""


def test_cli_constant_and_non_numeric_series(tmp_path) -> None:
    p = meshctl("--series", write(tmp_path, "t,rps\n0,0\n60,0\n"), "--time-col", "t", "--value-col", "rps")
    assert p.returncode == 2 and "every value of 'rps' is 0" in p.stderr
    p = meshctl("--series", write(tmp_path, "t,rps\n0,1\n60,lots\n"), "--time-col", "t", "--value-col", "rps")
    assert p.returncode == 2 and "'lots', not a number" in p.stderr


def test_rate_forecaster_forecasts_the_bucket_a_lead_time_ahead_from_history_only() -> None:
    from mesh.autoscale.scalers import RateForecaster
    pattern = [1.0, 1.0, 6.0, 2.0]                            # requests per second, season of 4 buckets of 10 s
    f = RateForecaster(10.0, 12.0, season=4, level=0.9, refit_every=1, min_history=50, models=("snaive",))
    seen = []
    for k in range(64):                                      # ticks of 2 s, arrivals at the bucket's rate
        for j in range(5):
            now = 10.0 * k + 2.0 * (j + 1)
            f.observe(now, pattern[k % 4] * 2.0)
            if k >= 50 and j == 0:
                seen.append((k, f.upper_rate(now)))
    assert f.log.fits > 0 and f.log.failures == 0
    for k, upper in seen:
        # at 2 s into bucket k the lead reaches bucket k + 1: the upper edge covers the max of k, k + 1
        assert upper == pytest.approx(max(pattern[k % 4], pattern[(k + 1) % 4]), abs=0.05)
    err = f.log.error(np.array([pattern[k % 4] for k in range(64)]))
    assert err["buckets"] > 0 and err["mae_rps"] == pytest.approx(0.0, abs=0.05)


def test_cli_slice_create_s_sets_the_cold_start_and_says_where_it_came_from(tmp_path) -> None:
    rows = ["t,rps"] + [f"{60 * i},{v}" for i, v in enumerate([1, 1, 2, 4, 6, 6, 3, 1])]
    path = write(tmp_path, "\n".join(rows) + "\n")
    p = meshctl("--series", path, "--time-col", "t", "--value-col", "rps", "--policy", "predictive,reactive",
                "--slice-create-s", "10", "--season", "2", "--refit-every", "2", "-o", "json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    measured = default_model()
    cs = doc["cold_start"]
    assert cs["slice_create_s"] == 10.0 and cs["load_s"] == pytest.approx(measured.load_s, abs=1e-4)
    assert cs["cold_start_s"] == pytest.approx(10.0 + measured.load_s, abs=1e-3)
    assert "--slice-create-s 10" in cs["slice_create_from"] and "calibration (measured" in cs["load_from"]
    assert doc["calibration"]["prefill_base_s"] == pytest.approx(measured.prefill_base_s)   # serving kept
    pred = doc["policies"]["predictive"]
    assert pred["forecast_error"]["lead_time_s"] == pytest.approx(cs["cold_start_s"] + 2.0, abs=1e-2)
    assert pred["sizing"] == {"forecast": "fitted", "rule": "erlang", "quantile": 0.7,
                              "wait_s": pytest.approx(doc["slo_ttft_ms"] / 1000 - measured.ttft_s(), abs=1e-3),
                              "nowcast": True, "reaction_s": pytest.approx(cs["cold_start_s"] + 2.0, abs=1e-3),
                              "catch_up": False, "floor_quantile": 0.7, "scale_down_delay_s": 120.0}
    # the measured 1.2 s cold start plus a tick is within the SLO's room: catch-up, unless turned off
    for flag, on in (("auto", True), ("off", False)):
        p = meshctl("--series", path, "--time-col", "t", "--value-col", "rps", "--policy", "predictive",
                    "--season", "2", "--refit-every", "2", "--catch-up", flag, "--nowcast", "off", "-o", "json")
        assert p.returncode == 0, p.stderr
        sz = json.loads(p.stdout)["policies"]["predictive"]["sizing"]
        assert sz["catch_up"] is on and sz["nowcast"] is False
        assert (sz["floor_quantile"], sz["scale_down_delay_s"]) == ((0.5, 0.0) if on else (0.7, 120.0))
    # without the flag: the calibration's measured slice creation, said so
    p = meshctl("--series", path, "--time-col", "t", "--value-col", "rps", "--policy", "reactive", "-o", "json")
    cs = json.loads(p.stdout)["cold_start"]
    assert cs["slice_create_s"] == pytest.approx(measured.slice_create_s, abs=1e-4)
    assert cs["slice_create_from"].startswith("calibration (measured")


def test_with_slice_create_keeps_the_measured_load_and_refuses_bad_values() -> None:
    from mesh.autoscale.benchrun import cold_start_info, with_slice_create
    m = LatencyModel(0.05, 0.001, 0.01, 1.5, 0.2, source={"backend": "x"})
    m30 = with_slice_create(m, 28.5, "assumed")
    assert m30.cold_start_s == pytest.approx(30.0) and m30.load_s == 1.5 and m30.ttft_s() == m.ttft_s()
    assert cold_start_info(m30)["slice_create_from"] == "assumed"
    assert m30.source["slice_create_measured_s"] == 0.2
    for bad in (-0.1, float("inf"), 3601.0):
        with pytest.raises(ValueError, match="slice_create_s"):
            with_slice_create(m, bad, "x")


# -- the predictive policy's sizing rule (mesh/autoscale/sizing.py) ------------------------------------------------

def _erlang_c_closed_form(c: int, a: float) -> float:
    """Erlang C by its textbook sum: (a^c/c! x c/(c-a)) / (sum_{k<c} a^k/k! + a^c/c! x c/(c-a))."""
    import math
    top = a ** c / math.factorial(c) * c / (c - a)
    return top / (sum(a ** k / math.factorial(k) for k in range(c)) + top)


def test_erlang_c_matches_the_textbook_values() -> None:
    from mesh.autoscale.sizing import erlang_c
    assert erlang_c(2, 1.0) == pytest.approx(1 / 3)                     # M/M/2 at a = 1 Erlang
    for c, a in ((5, 3.2), (12, 9.7), (30, 25.0)):
        assert erlang_c(c, a) == pytest.approx(_erlang_c_closed_form(c, a), rel=1e-9)
    assert erlang_c(3, 3.0) == 1.0 and erlang_c(3, 0.0) == 0.0        # overloaded: everyone waits; idle: nobody


@pytest.mark.parametrize("rate,service,slots,wait,q", [(0.92, 5.66, 1, 6.36, 0.97), (2.88, 5.66, 1, 6.36, 0.99),
                                                       (4.0, 2.0, 4, 0.5, 0.95), (0.05, 5.66, 1, 6.36, 0.97)])
def test_erlang_replicas_is_the_fewest_whose_wait_tail_meets_the_quantile(rate, service, slots, wait, q) -> None:
    import math
    from mesh.autoscale.sizing import erlang_replicas
    a = rate * service

    def tail(n: int) -> float:                                        # P(wait > wait_s), M/M/(n x slots)
        c = n * slots
        return 1.0 if c <= a else _erlang_c_closed_form(c, a) * math.exp(-(c - a) * wait / service)

    n = erlang_replicas(rate, service, slots, wait, q)
    assert tail(n) <= 1 - q
    assert n == 1 or tail(n - 1) > 1 - q
    assert n * slots > a                                               # never below the mean load


def test_poisson_replicas_hold_the_quantile_of_poisson_concurrency() -> None:
    import math
    from mesh.autoscale.sizing import poisson_replicas
    a = 2.0 * 5.0                                                      # 2 requests/s x 5 s in service
    cdf, k = 0.0, 0
    while True:                                                        # smallest k with P(N <= k) >= 0.99
        cdf += math.exp(-a) * a ** k / math.factorial(k)
        if cdf >= 0.99:
            break
        k += 1
    assert k == 18
    assert poisson_replicas(2.0, 5.0, 1, 0.99) == 18
    assert poisson_replicas(2.0, 5.0, 4, 0.99) == math.ceil(18 / 4)
    assert poisson_replicas(0.0, 5.0, 1, 0.99) == 0


def test_sizing_rules_refuse_bad_arguments_naming_them() -> None:
    from mesh.autoscale.sizing import erlang_replicas, little_replicas, poisson_replicas, replicas_for
    assert little_replicas(2.0, 5.0, 0.7) == 15                        # ceil(10 / 0.7)
    with pytest.raises(ValueError, match="quantile"):
        erlang_replicas(1.0, 5.0, 1, 6.0, 1.0)
    with pytest.raises(ValueError, match="rate"):
        poisson_replicas(-1.0, 5.0, 1, 0.9)
    with pytest.raises(ValueError, match="wait_s"):
        erlang_replicas(1.0, 5.0, 1, -1.0, 0.9)
    with pytest.raises(ValueError, match="service_s"):
        erlang_replicas(1.0, 0.0, 1, 1.0, 0.9)
    with pytest.raises(ValueError, match="allowed erlang, poisson, little"):
        replicas_for("guess", 1.0, 5.0)


def _figures(cold_start_s: float = 30.0):
    from mesh.autoscale.planner import ServiceFigures
    return ServiceFigures(service_s=5.66, ttft_s=0.0, slots=1, cold_start_s=cold_start_s)   # room 6.36 s at 6360 ms


def test_predictive_scaler_wants_the_erlang_replicas_for_the_forecast_rate() -> None:
    from mesh.autoscale.scalers import AutoscalerScaler
    from mesh.autoscale.sizing import erlang_replicas
    from mesh.autoscale.types import Sample, ScalingPolicy
    policy = ScalingPolicy(min_replicas=1, max_replicas=64, target=1.3, predictive=True, max_scale_up_rate=100,
                           slo_ttft_ms=6360, sizing="erlang", sizing_quantile=0.97)
    s = AutoscalerScaler(policy, figures=_figures(), forecaster=_FixedRate(2.5))
    want = s.scale(2.0, Sample(t=2.0, in_flight=1, queue=0, request_rate=0.5, ready=1), ready=1, starting=0)
    n = erlang_replicas(2.5, 5.66, 1, 6.36, 0.97)
    assert want == n and n > math.ceil(2.5 * 5.66 / 1.3)               # more than Little's law at the target
    assert s.last.mode == "predictive"
    with pytest.raises(ValueError, match="sizing rule"):
        AutoscalerScaler(replace(policy, sizing="guess"), figures=_figures())


def test_queueing_planner_uses_the_last_bucket_before_a_fit_and_never_forecasts_below_it() -> None:
    from mesh.autoscale.planner import Planner
    from mesh.autoscale.types import Sample, ScalingPolicy
    policy = ScalingPolicy(max_replicas=8, target=1.0, predictive=True, slo_ttft_ms=6360, nowcast=False)
    plan = Planner(policy, tick_s=2.0, bucket_s=10.0)
    assert plan.upper_rate(1.0, None) is None                          # nothing seen
    for j in range(5):
        plan.observe(Sample(t=2.0 * (j + 1), request_rate=3.0))         # 30 arrivals in bucket 0: 3 requests/s
    plan.observe(Sample(t=12.0, request_rate=0.0))
    assert plan.upper_rate(12.0, None) == pytest.approx(3.0) and plan.naive_fallbacks == 1
    assert plan.upper_rate(12.0, 1.0) == pytest.approx(3.0)            # a fitted forecast never below it
    assert plan.upper_rate(12.0, 5.0) == pytest.approx(5.0)
    little = Planner(replace(policy, sizing="little"), tick_s=2.0, bucket_s=10.0)
    for j in range(5):
        little.observe(Sample(t=2.0 * (j + 1), request_rate=3.0))
    little.observe(Sample(t=12.0, request_rate=0.0))
    assert little.upper_rate(12.0, None) is None                       # the little rule keeps the old behaviour
    assert little.upper_rate(12.0, 1.0) == pytest.approx(1.0)


class _FixedRate:
    """A forecaster that always says ``rate`` requests/s."""

    def __init__(self, rate: float) -> None:
        from mesh.autoscale.planner import RateBuckets
        from mesh.autoscale.scalers import ForecastLog
        self.rate = rate
        self.log = ForecastLog()
        self.buckets = RateBuckets(60.0)
        self.bucket_s = 60.0

    def upper_rate(self, now):
        return self.rate


def _scaler(cold_start_s: float, catch_up: bool, quantile: float = 0.97):
    from mesh.autoscale.scalers import AutoscalerScaler
    from mesh.autoscale.types import ScalingPolicy
    policy = ScalingPolicy(min_replicas=1, max_replicas=64, target=3.0, predictive=True, max_scale_up_rate=100,
                           scale_down_delay_s=120, panic_threshold=100, slo_ttft_ms=6360, sizing="erlang",
                           sizing_quantile=quantile, catch_up=catch_up)
    return AutoscalerScaler(policy, figures=_figures(cold_start_s), tick_s=2.0, forecaster=_FixedRate(2.5))


def test_catch_up_sizes_the_floor_at_the_median_when_a_replica_is_ready_within_the_slo_room() -> None:
    from mesh.autoscale.scalers import CATCH_UP_QUANTILE
    from mesh.autoscale.sizing import erlang_replicas
    from mesh.autoscale.types import Sample
    fast = _scaler(1.2, catch_up=True)                  # 1.2 s + 2 s tick <= 6.36 s of room
    assert fast.catching_up and fast.floor_quantile == CATCH_UP_QUANTILE
    slow = _scaler(30.0, catch_up=True)                 # 32 s > 6.36 s: nothing changes
    assert not slow.catching_up and slow.floor_quantile == 0.97
    off = _scaler(1.2, catch_up=False)
    assert not off.catching_up and off.floor_quantile == 0.97
    sample = Sample(t=2.0, in_flight=1, request_rate=0.5, ready=1)
    n_median = erlang_replicas(2.5, 5.66, 1, 6.36, CATCH_UP_QUANTILE)
    n_tail = erlang_replicas(2.5, 5.66, 1, 6.36, 0.97)
    assert n_median < n_tail
    assert fast.scale(2.0, sample, ready=1, starting=0) == n_median
    assert slow.scale(2.0, sample, ready=1, starting=0) == n_tail
    assert off.scale(2.0, sample, ready=1, starting=0) == n_tail


def test_catch_up_scales_down_to_the_floor_without_the_delay() -> None:
    from mesh.autoscale.types import Sample
    fast, slow = _scaler(1.2, catch_up=True), _scaler(30.0, catch_up=True)
    for s in (fast, slow):
        s.forecaster.rate = 2.5
        high = s.scale(2.0, Sample(t=2.0, in_flight=1, request_rate=2.5, ready=1), ready=1, starting=0)
        s.forecaster.rate = 0.5                         # the forecast drops
        s.last_high = high
    low_fast = fast.scale(4.0, Sample(t=4.0, in_flight=1, request_rate=0.5, ready=fast.last_high),
                          ready=fast.last_high, starting=0)
    low_slow = slow.scale(4.0, Sample(t=4.0, in_flight=1, request_rate=0.5, ready=slow.last_high),
                          ready=slow.last_high, starting=0)
    assert low_fast < fast.last_high                    # down at once, to the floor for 0.5 requests/s
    assert low_slow == slow.last_high and slow.last.bound_by == "stabilization"   # held by the 120 s delay


def test_nowcast_keeps_the_forecast_rate_at_least_the_bucket_under_way_once_a_third_has_passed() -> None:
    from mesh.autoscale.planner import RateBuckets
    b = RateBuckets(30.0)
    b.observe(30.0, 30.0)                               # bucket 0: 1 request/s
    b.observe(32.0, 0.0)                                # bucket 1 begins
    assert b.last_rate() == pytest.approx(1.0)
    assert b.nowcast_rate(32.0) is None                 # 2 s of 30: too early
    b.observe(40.0, 40.0)                               # 40 arrivals in the first 10 s of bucket 1
    assert b.nowcast_rate(40.0) == pytest.approx(4.0)   # a third has passed: its 4 requests/s so far


def test_the_oracle_forecast_is_the_realized_bucket_rate_a_lead_ahead() -> None:
    from mesh.autoscale.scalers import OracleForecaster
    arrivals = np.array([1.0, 2.0, 3.0] + [10.0 + i / 4 for i in range(40)])   # 3 in bucket 0, 40 in bucket 1
    f = OracleForecaster(10.0, 4.0, arrivals, 20.0)
    assert f.upper_rate(2.0) == pytest.approx(0.3)                 # now .. now + 4 s: bucket 0 only
    assert f.upper_rate(7.0) == pytest.approx(4.0)                 # the lead reaches bucket 1: its 40 in 10 s
    assert f.log.point[1] == pytest.approx(4.0)


def test_cli_oracle_forecast_says_so(tmp_path) -> None:
    rows = ["t,rps"] + [f"{60 * i},{v}" for i, v in enumerate([1, 1, 2, 4, 6, 6, 3, 1])]
    p = meshctl("--series", write(tmp_path, "\n".join(rows) + "\n"), "--time-col", "t", "--value-col", "rps",
                "--policy", "predictive", "--forecast", "oracle", "-o", "json")
    assert p.returncode == 0, p.stderr
    pred = json.loads(p.stdout)["policies"]["predictive"]
    assert pred["sizing"]["forecast"] == "oracle" and pred["forecast_error"]["mae_rps"] == 0.0
