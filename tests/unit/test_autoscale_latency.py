"""`meshctl bench autoscale`'s latency model (mesh/autoscale/latency.py): the fit recovers known parameters from
synthetic measurements and refuses too few, a calibration file round-trips and a bad one is named, the shipped
calibration was measured, and a slice-creation time replaces the measured one (benchrun.with_slice_create)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mesh.autoscale.latency import LatencyModel, Measurement, default_model, fit


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
