"""`meshctl bench autoscale`'s CLI: every policy on a short series, calibrated, end to end; bad input exits 2
naming the problem; `--slice-create-s` sets the cold start and says where it came from; the oracle forecast says
so. Its parts are tested in test_autoscale_{latency,demand,simulate,sizing,predictive}.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mesh.autoscale.latency import default_model
from tests.unit._autoscale_csv import write_csv

ROOT = Path(__file__).resolve().parents[2]


def meshctl(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "proto")])}
    return subprocess.run([sys.executable, "-m", "tools.meshctl.main", "bench", "autoscale", *argv], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=600)


def test_cli_runs_every_policy_calibrated_on_a_short_series(tmp_path) -> None:
    rows = ["t,rps"] + [f"{60 * i},{v}" for i, v in enumerate([1, 1, 2, 4, 6, 6, 3, 1, 1, 2, 5, 2])]
    path = write_csv(tmp_path, "\n".join(rows) + "\n")
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
    path = write_csv(tmp_path, "t,rps\n0,1\n60,2\n120,3\n")
    p = meshctl(*[path if a == "S" else a for a in argv], "-o", "json")
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert match in p.stderr and p.stdout == ""


def test_cli_constant_and_non_numeric_series(tmp_path) -> None:
    p = meshctl("--series", write_csv(tmp_path, "t,rps\n0,0\n60,0\n"), "--time-col", "t", "--value-col", "rps")
    assert p.returncode == 2 and "every value of 'rps' is 0" in p.stderr
    p = meshctl("--series", write_csv(tmp_path, "t,rps\n0,1\n60,lots\n"), "--time-col", "t", "--value-col", "rps")
    assert p.returncode == 2 and "'lots', not a number" in p.stderr


def test_cli_slice_create_s_sets_the_cold_start_and_says_where_it_came_from(tmp_path) -> None:
    rows = ["t,rps"] + [f"{60 * i},{v}" for i, v in enumerate([1, 1, 2, 4, 6, 6, 3, 1])]
    path = write_csv(tmp_path, "\n".join(rows) + "\n")
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


def test_cli_oracle_forecast_says_so(tmp_path) -> None:
    rows = ["t,rps"] + [f"{60 * i},{v}" for i, v in enumerate([1, 1, 2, 4, 6, 6, 3, 1])]
    p = meshctl("--series", write_csv(tmp_path, "\n".join(rows) + "\n"), "--time-col", "t", "--value-col", "rps",
                "--policy", "predictive", "--forecast", "oracle", "-o", "json")
    assert p.returncode == 0, p.stderr
    pred = json.loads(p.stdout)["policies"]["predictive"]
    assert pred["sizing"]["forecast"] == "oracle" and pred["forecast_error"]["mae_rps"] == 0.0
