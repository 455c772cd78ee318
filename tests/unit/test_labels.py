"""One label rule for every object that carries labels (mesh/labels.py): keys Kubernetes-shaped, values printable.
A control character in a value would reach meshctl's tables, the events, the logs and Prometheus."""

from __future__ import annotations

import pytest

from controlplane.controllers.workloadspec import validate_run
from controlplane.serving import deployspec
from controlplane.serving.validate import validate as validate_model
from gpumesh.v1 import deployment_service_pb2 as D
from gpumesh.v1 import model_service_pb2 as M
from gpumesh.v1 import types_pb2
from gpumesh.v1 import workload_service_pb2 as W
from mesh import errors, gpumodels, labels, pools, slicespec
from mesh.poolapi import pool_from_dict

HOSTILE_VALUES = ["line\nforged", "\x1b[2Jrepainted", "tab\there", "nul\0", "del\x7f", "nbsp\u00a0", "x" * 257]
HOSTILE_KEYS = ["", "-lead", "trail-", "sp ace", "new\nline", "k" * 64, "ünï"]


def _slice(lbl):
    slicespec.validate(types_pb2.SliceSpec(tenant="acme", memory_bytes=1 << 30, count=1, labels=lbl))


def _anti_affinity(lbl):
    slicespec.validate(types_pb2.SliceSpec(tenant="acme", memory_bytes=1 << 30, count=1, anti_affinity=lbl))


def _workload(lbl):
    validate_run(W.RunWorkloadRequest(slice_id="s-1", command=["true"], labels=lbl))


def _deployment(lbl):
    deployspec.check_settings(D.DeploymentSpec(name="chat", labels=lbl), M.Variant(max_context=512))


def _model(lbl):
    validate_model(M.Model(name="tiny", labels=lbl, variants=[M.Variant(name="f16")]),
                   [gpumodels.get_model("H100-80GB")], check_artifacts=False)


def _pool(lbl):
    pools.validate(pool_from_dict({"name": "inference-a", "selector": {"node_labels": lbl}}))


CARRIERS = {"spec.labels": _slice, "spec.anti_affinity": _anti_affinity, "labels": _workload,
            "spec.labels ": _deployment, "model.labels": _model, "pool.selector.node_labels": _pool}


@pytest.mark.parametrize("field,call", CARRIERS.items(), ids=[
    "slice", "anti-affinity", "workload", "deployment", "model", "pool"])
@pytest.mark.parametrize("value", HOSTILE_VALUES, ids=repr)
def test_a_value_with_control_characters_is_refused_naming_the_key(field, call, value):
    with pytest.raises(errors.InvalidArgument) as e:
        call({"team": value})
    assert e.value.field == f"{field.strip()}['team']"
    assert e.value.allowed == labels.VALUE_RULE


@pytest.mark.parametrize("field,call", CARRIERS.items(), ids=[
    "slice", "anti-affinity", "workload", "deployment", "model", "pool"])
@pytest.mark.parametrize("key", HOSTILE_KEYS, ids=repr)
def test_a_malformed_key_is_refused(field, call, key):
    with pytest.raises(errors.InvalidArgument) as e:
        call({key: "v"})
    assert e.value.field.startswith(field.strip() + "[") and e.value.allowed == labels.KEY_RULE


def test_printable_text_of_any_script_passes():
    labels.check({"team": "équipe données", "gpumesh.io/network": "host", "a": ""}, "labels", 8)


def test_too_many_labels_names_the_map():
    with pytest.raises(errors.InvalidArgument) as e:
        labels.check({f"k{i}": "v" for i in range(9)}, "spec.labels", 8)
    assert e.value.field == "spec.labels" and "at most 8" in e.value.allowed
