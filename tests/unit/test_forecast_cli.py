"""`meshctl forecast backtest`: the report on a CSV, the predictions file, and bad input (exit status 2,
an error naming the problem)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from tools.meshctl.main import main

pytest.importorskip("pandas", reason="reading CSV series needs gpumesh[forecast]")


def write_csv(path, rows, header=("t", "v", "g")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def two_series(path, n=240):
    rng = np.random.default_rng(0)
    rows = []
    for g, amp in (("a", 10.0), ("b", 3.0)):
        for i in range(n):
            rows.append((1_700_000_000 + 60 * i, round(20 + amp * np.sin(2 * np.pi * i / 24) + rng.normal(0, 0.3), 3),
                         g))
    return write_csv(path, rows)


def run(capsys, *argv):
    code = main(["forecast", "backtest", *argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_backtest_reports_every_model_and_the_choice_per_series(tmp_path, capsys):
    path = two_series(tmp_path / "s.csv")
    preds = tmp_path / "preds.csv"
    code, out, err = run(capsys, "--csv", path, "--time-col", "t", "--value-col", "v", "--group-col", "g",
                         "--season", "24", "--horizon", "6min", "--models", "naive,snaive", "--origins", "10",
                         "--predictions-out", str(preds), "-o", "json")
    assert code == 0, err
    assert err == ""                                    # quiet under -o json
    doc = json.loads(out)
    assert doc["horizon"] == 6 and doc["season"] == 24 and doc["step_seconds"] == 60
    assert [r["series"] for r in doc["series"]] == ["a", "b"]
    for r in doc["series"]:
        assert r["chosen"] in r["models"]
        for m in ("naive", "snaive"):
            assert set(r["models"][m]) >= {"mase", "smape", "pinball", "coverage", "rel_mae_naive"}
        # a clean season: the seasonal naive wins and is chosen
        assert r["chosen"].startswith("snaive") or "snaive" in r["chosen"]
        assert r["beats_naive"]
    assert doc["summary"]["series"] == 2 and doc["summary"]["beats_naive_share"] == 1.0
    with open(preds) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["series", "origin", "step", "time", "actual", "point", "lo", "hi", "model"]
    per_series = {r["series"]: r["origins"]["evaluation"] for r in doc["series"]}
    models = {r["model"] for r in rows}
    assert {"naive", "snaive"} <= models
    assert len(rows) == sum(per_series.values()) * 6 * len(models)
    first = rows[0]
    assert float(first["lo"]) <= float(first["point"]) <= float(first["hi"])
    assert first["origin"] < first["time"]


def test_table_output_names_the_choice(tmp_path, capsys):
    path = two_series(tmp_path / "s.csv")
    code, out, _ = run(capsys, "--csv", path, "--time-col", "t", "--value-col", "v", "--group-col", "g",
                       "--season", "24", "--horizon", "3", "--models", "naive,snaive", "--origins", "6")
    assert code == 0
    assert out.splitlines()[0].split()[:3] == ["SERIES", "POINTS", "CHOSEN"]
    assert "intervals cover" in out


@pytest.mark.parametrize("case, want", [
    ("unknown-time-col", "time-col: no column 'nope'"),
    ("unknown-value-col", "value-col: no column 'nope'"),
    ("unknown-group-col", "group-col: no column 'nope'"),
    ("non-numeric", "non-numeric value at row 5"),
    ("gap", "has a gap: 3 missing step(s)"),
    ("constant", "is constant"),
    ("horizon-too-long", "too short for horizon 500"),
    ("empty", "has a header but no rows"),
    ("missing-file", "no such file"),
    ("bad-time", "not a time at row 3"),
    ("duplicate-times", "two values at"),
    ("unknown-model", "unknown model 'prophet'"),
    ("bad-horizon", "horizon: not a number of steps or a duration"),
    ("bad-aci-gamma", "aci-gamma: must be >= 0 and < 1"),
])
def test_bad_input_exits_2_naming_the_problem(tmp_path, capsys, case, want):
    good = [(60 * i, float(i % 7), "a") for i in range(200)]
    rows, extra = good, []
    args = {"--time-col": "t", "--value-col": "v", "--horizon": "5", "--season": "7"}
    if case.startswith("unknown-") and case.endswith("col"):
        args["--" + case[len("unknown-"):]] = "nope"
    elif case == "non-numeric":
        rows = good[:3] + [(180, "12abc", "a")] + good[4:]
    elif case == "gap":
        rows = good[:50] + good[53:]
    elif case == "constant":
        rows = [(60 * i, 4.0, "a") for i in range(200)]
    elif case == "horizon-too-long":
        args["--horizon"] = "500"
    elif case == "empty":
        rows = []
    elif case == "bad-time":
        rows = [good[0], ("yesterday-ish", 1.0, "a")] + good[2:]
    elif case == "duplicate-times":
        rows = good[:10] + [good[9]] + good[10:]
    elif case == "unknown-model":
        extra = ["--models", "naive,prophet"]
    elif case == "bad-horizon":
        args["--horizon"] = "soon"
    elif case == "bad-aci-gamma":
        extra = ["--aci-gamma", "-0.1"]
    path = str(tmp_path / "missing.csv") if case == "missing-file" else write_csv(tmp_path / "x.csv", rows)
    argv = ["--csv", path] + [x for kv in args.items() for x in kv] + extra + ["-o", "json"]
    code, out, err = run(capsys, *argv)
    assert code == 2, (code, out, err)
    assert want in err, err
    assert out == ""


def test_skip_bad_reports_unusable_series_and_goes_on(tmp_path, capsys):
    rows = [(60 * i, float(i % 7) + (i % 3), "ok") for i in range(200)] + [(60 * i, 1.0, "flat") for i in range(200)]
    path = write_csv(tmp_path / "x.csv", rows)
    code, out, err = run(capsys, "--csv", path, "--time-col", "t", "--value-col", "v", "--group-col", "g",
                         "--horizon", "5", "--season", "7", "--models", "naive,snaive", "--skip-bad", "-o", "json")
    assert code == 0, err
    doc = json.loads(out)
    by = {r["series"]: r for r in doc["series"]}
    assert "is constant" in by["flat"]["error"] and "flat" in by["flat"]["error"]
    assert "chosen" in by["ok"]
    assert doc["summary"]["series"] == 1 and doc["summary"]["skipped"] == 1


def test_freq_bins_and_fills_an_irregular_series(tmp_path, capsys):
    # two rows a minute, one minute missing: --freq 1min --agg sum bins them, --fill zero fills the gap
    rows = [(60 * i + s, 1.0 + (i % 5), "a") for i in range(300) if i != 100 for s in (0, 30)]
    path = write_csv(tmp_path / "x.csv", rows)
    base = ["--csv", path, "--time-col", "t", "--value-col", "v", "--freq", "1min", "--agg", "sum", "--horizon", "5",
            "--season", "5", "--models", "naive,snaive", "-o", "json"]
    code, _, err = run(capsys, *base)
    assert code == 2 and "has a gap: 1 missing step(s)" in err
    code, out, err = run(capsys, *base, "--fill", "zero")
    assert code == 0, err
    assert json.loads(out)["series"][0]["points"] == 300


def test_recent_col_feeds_latest_and_bad_recent_input_exits_2(tmp_path, capsys):
    # hourly bins of a demand whose last reading in each bin (at_end) leads the bin's mean
    rng = np.random.default_rng(3)
    level = np.repeat(rng.integers(0, 10, size=80) * 5.0, 5)[:360]
    rows = [(3600 * i, (level[i - 1] + level[i]) / 2 if i else level[0], level[i]) for i in range(360)]
    path = write_csv(tmp_path / "c.csv", rows, header=("time", "value", "at_end"))
    code, out, err = run(capsys, "--csv", path, "--time-col", "time", "--value-col", "value", "--recent-col", "at_end",
                         "--horizon", "1", "--season", "1", "--models", "naive,latest,linear", "--origins", "80",
                         "--no-ensembles", "-o", "json")
    assert code == 0, err
    [r] = json.loads(out)["series"]
    assert r["models"]["latest"]["mae"] < r["models"]["naive"]["mae"] and r["chosen"] in ("latest", "linear")
    code, _, err = run(capsys, "--csv", path, "--time-col", "time", "--value-col", "value", "--recent-col", "nope",
                       "--horizon", "1", "--models", "naive,latest")
    assert code == 2 and "recent-col" in err and "no column 'nope'" in err and "at_end" in err
    bad = write_csv(tmp_path / "b.csv", rows[:50] + [(3600 * 50, 1.0, "soon")] + rows[51:],
                    header=("time", "value", "at_end"))
    code, _, err = run(capsys, "--csv", bad, "--time-col", "time", "--value-col", "value", "--recent-col", "at_end",
                       "--horizon", "1", "--models", "naive,latest")
    assert code == 2 and "recent-col" in err and "row 52" in err and "'soon'" in err


@pytest.mark.parametrize("model", ["ses", "theta", "ces", "latest", "linear"])
def test_new_models_refuse_a_constant_series_and_a_horizon_past_the_history(tmp_path, capsys, model):
    flat = write_csv(tmp_path / "f.csv", [(60 * i, 5.0) for i in range(300)], header=("t", "v"))
    code, _, err = run(capsys, "--csv", flat, "--time-col", "t", "--value-col", "v", "--models", f"naive,{model}")
    assert code == 2 and "constant" in err
    short = write_csv(tmp_path / "s.csv", [(60 * i, float(i % 7)) for i in range(40)], header=("t", "v"))
    code, _, err = run(capsys, "--csv", short, "--time-col", "t", "--value-col", "v", "--models", f"naive,{model}",
                       "--horizon", "30")
    assert code == 2 and "too short for horizon 30" in err


def test_concurrency_writes_the_level_at_each_bin_end(tmp_path, capsys):
    path = write_csv(tmp_path / "pods.csv", [(0, 5400, 1), (1800, 9000, 2)], header=("start", "end", "gpus"))
    code = main(["forecast", "concurrency", "--csv", path, "--start-col", "start", "--end-col", "end",
                 "--weight-cols", "gpus", "--freq", "1h"])
    out = capsys.readouterr().out.split()
    assert code == 0 and out[0] == "time,value,at_end"
    assert out[1:] == ["0,2,3", "3600,2.5,2", "7200,1,0"]      # means per bin; the level at each bin end


def test_no_shrink_and_the_rule_options_reach_the_backtest(tmp_path, capsys):
    path = two_series(tmp_path / "s.csv")
    base = ["--csv", path, "--time-col", "t", "--value-col", "v", "--group-col", "g", "--season", "24",
            "--horizon", "6", "--models", "naive,snaive", "--origins", "10", "-o", "json"]
    code, out, err = run(capsys, *base)
    assert code == 0, err
    assert any(m.startswith("shrunk(") for m in json.loads(out)["series"][0]["models"])
    code, out, err = run(capsys, *base, "--no-shrink", "--aci-gamma", "0", "--steady-tolerance", "0")
    assert code == 0, err
    assert not any(m.startswith("shrunk(") for m in json.loads(out)["series"][0]["models"])
