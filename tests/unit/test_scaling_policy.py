"""Scaling policies: every bad field refused naming it and what is allowed, defaults filled in, the client's
builder, and one replica's cost (the floor of a cost ceiling) from the slice it gets."""

from __future__ import annotations

import pytest

from controlplane.serving import replicacost, scalingspec
from gpumesh.v1 import scaling_pb2 as S
from mesh import errors, gpumodels, scalingpolicy
from mesh.cost import PriceTable

OK = dict(min_replicas=1, max_replicas=4, metric="concurrency", target=4)


def pol(**kw) -> S.ScalingPolicy:
    fields = dict(OK, **kw)
    return S.ScalingPolicy(**{k: v for k, v in fields.items() if v is not None})


BAD = [
    (dict(min_replicas=5, max_replicas=4), "spec.scaling.min_replicas", "max_replicas"),
    (dict(min_replicas=-1), "spec.scaling.min_replicas", "0 to 64"),
    (dict(max_replicas=0), "spec.scaling.max_replicas", "1 to 64"),
    (dict(max_replicas=65), "spec.scaling.max_replicas", "1 to 64"),
    (dict(metric="gpu_util"), "spec.scaling.metric", "concurrency, queue, kv_cache, ttft"),
    (dict(target=0), "spec.scaling.target", "> 0"),
    (dict(target=-2), "spec.scaling.target", "> 0"),
    (dict(metric="kv_cache", target=1.5), "spec.scaling.target", "at most 1"),
    (dict(stable_window_seconds=-5), "spec.scaling.stable_window_seconds", "1 to 3600"),
    (dict(stable_window_seconds=1e9), "spec.scaling.stable_window_seconds", "1 to 3600"),
    (dict(stable_window_seconds=float("nan")), "spec.scaling.stable_window_seconds", "1 to 3600"),
    (dict(panic_window_seconds=-1), "spec.scaling.panic_window_seconds", "stable window"),
    (dict(stable_window_seconds=10, panic_window_seconds=20), "spec.scaling.panic_window_seconds", "10s"),
    (dict(stable_window_seconds=3), "spec.scaling.panic_window_seconds", "0.1 to 3"),
    (dict(panic_threshold=0.5), "spec.scaling.panic_threshold", "1 to 100"),
    (dict(scale_up_delay_seconds=-1), "spec.scaling.scale_up_delay_seconds", "0 to 3600"),
    (dict(scale_down_delay_seconds=-30), "spec.scaling.scale_down_delay_seconds", "0 to 86400"),
    (dict(max_scale_up_rate=0.5), "spec.scaling.max_scale_up_rate", "1 to 1000"),
    (dict(scale_to_zero_after_seconds=300), "spec.scaling.scale_to_zero_after_seconds", "min_replicas is 0"),
    (dict(min_replicas=0, scale_to_zero_after_seconds=-3), "spec.scaling.scale_to_zero_after_seconds", "never"),
    (dict(lead_time_seconds=-1), "spec.scaling.lead_time_seconds", "0 (the measured cold start)"),
    (dict(forecast_quantile=0.5), "spec.scaling.forecast_quantile", "above 0.5 and below 1"),
    (dict(forecast_quantile=1.0), "spec.scaling.forecast_quantile", "above 0.5 and below 1"),
    (dict(cost_ceiling_per_hour=-1), "spec.scaling.cost_ceiling_per_hour", "0 (none)"),
    (dict(cost_ceiling_per_hour=float("inf")), "spec.scaling.cost_ceiling_per_hour", "0 (none)"),
    (dict(slo_ttft_ms=-1), "spec.scaling.slo_ttft_ms", "0 (none) or milliseconds up to 600000"),
    (dict(slo_ttft_ms=float("nan")), "spec.scaling.slo_ttft_ms", "0 (none)"),
    (dict(slo_ttft_ms=7e5), "spec.scaling.slo_ttft_ms", "up to 600000"),
    (dict(sizing="guess"), "spec.scaling.sizing", "erlang, poisson, little"),
    (dict(sizing="erlang"), "spec.scaling.sizing", "set slo_ttft_ms"),
    (dict(sizing_quantile=1.0, slo_ttft_ms=800), "spec.scaling.sizing_quantile", "above 0 and below 1"),
    (dict(sizing_quantile=-0.2), "spec.scaling.sizing_quantile", "above 0 and below 1"),
]


@pytest.mark.parametrize("fields,field,allowed", BAD, ids=[b[1].rsplit(".", 1)[1] + str(i) for i, b in enumerate(BAD)])
def test_a_bad_field_is_refused_by_name(fields, field, allowed):
    with pytest.raises(errors.InvalidArgument) as e:
        scalingspec.check(pol(**fields))
    assert e.value.field == field, str(e.value)
    assert allowed in str(e.value), str(e.value)


def test_a_ceiling_below_one_replica_is_refused_with_the_figures():
    with pytest.raises(errors.InvalidArgument) as e:
        scalingspec.check(pol(cost_ceiling_per_hour=0.2), replica_cost=0.31125)
    assert e.value.field == "spec.scaling.cost_ceiling_per_hour"
    assert "0.3113" in str(e.value) and "below one replica's cost" in str(e.value)
    scalingspec.check(pol(cost_ceiling_per_hour=0.32), replica_cost=0.31125)       # one replica fits
    scalingspec.check(pol(cost_ceiling_per_hour=0.2), replica_cost=None)            # unknown: not checked here


def test_variants_must_be_the_models():
    with pytest.raises(errors.InvalidArgument) as e:
        scalingspec.check(pol(variants=["q4", "f16"]), variants=("q4",))
    assert e.value.field == "spec.scaling.variants[1]" and "q4" in e.value.allowed
    scalingspec.check(pol(variants=["q4"]), variants=("q4", "q8"))


def test_the_prefix_names_the_request_field():
    with pytest.raises(errors.InvalidArgument) as e:
        scalingspec.check(pol(max_replicas=0), prefix="policy")
    assert e.value.field == "policy.max_replicas"


def test_defaults_fill_unset_fields():
    a = scalingspec.to_policy(S.ScalingPolicy(max_replicas=3, target=2))
    assert (a.min_replicas, a.metric, a.stable_window_s, a.panic_window_s, a.panic_threshold) == (1, "concurrency", 60,
                                                                                                    6, 2)
    assert (a.scale_down_delay_s, a.max_scale_up_rate, a.forecast_quantile) == (120, 10, 0.9)
    p = S.ScalingPolicy(max_replicas=3, target=2, min_replicas=0, scale_down_delay_seconds=0,
                        scale_to_zero_after_seconds=30)
    a = scalingspec.to_policy(scalingspec.check(p))
    assert (a.min_replicas, a.scale_down_delay_s, a.scale_to_zero_after_s) == (0, 0, 30)
    assert scalingspec.scales_to_zero(p) and not scalingspec.scales_to_zero(pol())
    assert "0-3 replicas" in scalingspec.describe(p) and "to zero after 30s" in scalingspec.describe(p)


def test_the_client_builder():
    p = scalingpolicy.build(max_replicas=4, target=2, scale_to_zero_after_s=300)
    assert p.HasField("min_replicas") and p.min_replicas == 0
    scalingspec.check(p)
    p = scalingpolicy.build(max_replicas=4, target=2, scale_down_delay_s=0)
    assert p.HasField("scale_down_delay_seconds") and not p.HasField("min_replicas")
    doc = scalingpolicy.effective(p)
    assert doc["min_replicas"] == 1 and doc["scale_down_delay_seconds"] == 0 and doc["stable_window_seconds"] == 60


def test_one_replicas_cost_follows_its_slice():
    prices = PriceTable.parse(["H100-80GB=2.49", "A100-40GB=1.29"])
    h100, a100 = gpumodels.get_model("H100-80GB"), gpumodels.get_model("A100-40GB")
    need = 2 << 30                                  # 2 GiB: the smallest MIG profile, 1 memory slice of 8
    assert replicacost.estimate(need, 0, h100, prices) == pytest.approx(2.49 / 8)
    assert replicacost.estimate(need, 1, a100, prices) == pytest.approx(1.29 / 8)
    mps = replicacost.estimate(need, 2, h100, prices)           # MPS: the memory fraction of the GPU
    assert mps == pytest.approx(2.49 * need / (h100.memory_mib * 2**20), rel=1e-3)
    assert replicacost.cheapest(need, 0, [h100, a100], prices) == pytest.approx(1.29 / 8)
    assert replicacost.estimate(200 << 30, 0, h100, prices) is None          # fits no slice
    assert replicacost.cheapest(need, 0, [], prices) is None


def test_the_slo_and_sizing_fields_reach_the_autoscaler_with_their_defaults():
    a = scalingspec.to_policy(pol())
    assert (a.slo_ttft_ms, a.sizing_rule, a.sizing_quantile, a.nowcast, a.catch_up) == (0.0, "little", 0.7, True, True)
    a = scalingspec.to_policy(scalingspec.check(pol(slo_ttft_ms=6800, predictive=True)))
    assert (a.slo_ms, a.sizing_rule) == (6800, "erlang")              # the objective's room: Erlang C
    a = scalingspec.to_policy(pol(metric="ttft", target=900))
    assert (a.slo_ms, a.sizing_rule) == (900, "erlang")               # a ttft policy's target is its objective
    built = scalingspec.check(scalingpolicy.build(max_replicas=8, target=1, predictive=True, slo_ttft_ms=6800,
                                                  sizing="poisson", sizing_quantile=0.9, nowcast=False,
                                                  catch_up=False))
    a = scalingspec.to_policy(built)
    assert (a.sizing_rule, a.sizing_quantile, a.nowcast, a.catch_up) == ("poisson", 0.9, False, False)
    doc = scalingpolicy.effective(built)
    assert (doc["slo_ttft_ms"], doc["sizing"], doc["nowcast"], doc["catch_up"]) == (6800, "poisson", False, False)
    assert scalingpolicy.effective(pol(slo_ttft_ms=500))["sizing"] == "erlang"
    line = scalingspec.describe(built)
    assert "TTFT objective 6800 ms" in line and "poisson sizing q0.9, no nowcast, no catch-up" in line
