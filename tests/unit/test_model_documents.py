"""The model document of `meshctl model get -o yaml` / `register -f` (mesh/modelapi.py) and the
printing of `meshctl model get|describe` (tools/meshctl/models.py), without a cluster."""

from __future__ import annotations

import pytest
import yaml

from controlplane.serving.validate import validate
from gpumesh.v1 import model_service_pb2 as M
from mesh import errors, gpumodels
from mesh.modelapi import model_from_dict, model_to_dict
from tests.models_util import TINY_WEIGHT_BYTES, write_tiny_gguf
from tools.meshctl.models import format_model, format_models


@pytest.fixture
def model(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    v = M.Variant(name="f16", backend=M.BACKEND_LLAMA_CPP, artifact=str(path), weight_bytes=TINY_WEIGHT_BYTES,
                  max_context=256, architecture=M.Architecture(name="llama", block_count=2, embedding_length=64,
                                                               head_count=4, head_count_kv=2))
    v.measured["H100-80GB"].CopyFrom(M.Measurement(tokens_per_second=95.5, ttft_seconds=0.02, load_seconds=1.5))
    m = validate(M.Model(name="tiny", family="llama", labels={"tier": "test"}, variants=[v]),
                 [gpumodels.get_model("H100-80GB"), gpumodels.get_model("L4")])
    m.generation = 3
    m.created_at.FromJsonString("2026-12-05T10:00:00Z")
    return m


def test_yaml_round_trip(model):
    doc = yaml.safe_load(yaml.safe_dump(model_to_dict(model)))
    assert doc["variants"][0]["backend"] == "llama.cpp" and doc["variants"][0]["artifact_format"] == "gguf"
    assert model_from_dict(doc) == model


def test_sizes_may_be_written_with_units():
    m = model_from_dict({"name": "x", "variants": [{"name": "a", "backend": "vllm", "weight_bytes": "1.5GiB",
                                                    "artifact_format": "hf"}]})
    assert m.variants[0].weight_bytes == 3 << 29 and m.variants[0].backend == M.BACKEND_VLLM


@pytest.mark.parametrize("doc,path,text", [
    ({"name": "x", "colour": "red"}, "model.colour", "unknown key"),
    ({"variants": [{"backend": "tgi"}]}, "model.variants[0].backend", "llama.cpp, vllm"),
    ({"variants": [{"weight_bytes": "lots"}]}, "model.variants[0].weight_bytes", "not a size"),
    ({"variants": [{"max_context": "8k"}]}, "model.variants[0].max_context", "not an integer"),
    ({"variants": {"name": "a"}}, "model.variants", "not a list"),
    ({"labels": ["a"]}, "model.labels", "not a mapping"),
    ({"variants": [{"measured": {"H100": {"tokens_per_second": "fast"}}}]},
     "model.variants[0].measured['H100'].tokens_per_second", "not a number"),
    ({"created_at": "yesterday"}, "model.created_at", "RFC 3339"),
    # beyond what the protobuf field holds: a clear error, not a ValueError from the setter (a 500)
    ({"variants": [{"max_context": 10 ** 12}]}, "model.variants[0].max_context", "out of range"),
    ({"variants": [{"weight_bytes": "20000PiB"}]}, "model.variants[0].weight_bytes", "out of range"),
])
def test_bad_documents_name_the_key(doc, path, text):
    with pytest.raises(errors.InvalidArgument) as e:
        model_from_dict(doc)
    assert e.value.field == path and text in e.value.message


def test_table_and_description(model):
    table = format_models([model], "wide")
    header, row = table.splitlines()
    assert header.split()[:9] == ["MODEL", "VARIANT", "BACKEND", "QUANT", "WEIGHTS", "CONTEXT", "VRAM", "RANK", "AGE"]
    assert row.split()[:4] == ["tiny", "f16", "llama.cpp", "<none>"] and "H100-80GB:1g.10gb" in row
    assert "H100-80GB:96" in row                                   # tokens/s (wide)
    assert format_models([], "table") == "No models found.\n"
    text = format_model(model_to_dict(model), context=128, concurrency=4)
    assert "VRAM need:" in text and "At 128 tokens x 4" in text
    assert "1g.10gb" in text and "95.5" in text
