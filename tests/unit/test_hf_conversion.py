"""SmolLM2's GGUF converted to a Hugging Face-format BF16 directory for vLLM (mesh/models/hfconvert.py,
importer.convert_once / hf_variant_from_gguf, `meshctl model import --hf-out`), and the registry's
validation of the result. The conversion is the session fixture's (`smollm2_hf`: once per cache)."""

from __future__ import annotations

import json
import stat

import pytest

from gpumesh.v1 import model_service_pb2 as M
from mesh import errors, gpumodels
from mesh.models import hfconvert, importer
from tests.models_util import smollm2_gguf


def test_the_converted_directory(smollm2_hf):
    cfg = json.loads((smollm2_hf / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["dtype"] == "bfloat16" and "quantization_config" not in cfg
    assert (smollm2_hf / "model.safetensors").is_file() and (smollm2_hf / "tokenizer.json").is_file()
    # readable by the workloads' unprivileged uids
    for p in [smollm2_hf, *smollm2_hf.iterdir()]:
        assert p.stat().st_mode & (stat.S_IROTH | (stat.S_IXOTH if p.is_dir() else 0)), p
    src = importer.converted_from(smollm2_hf)
    assert src["sha256"] == hfconvert.file_digest(smollm2_gguf()) and src["dtype"] == "bfloat16"
    from safetensors import safe_open
    with safe_open(str(smollm2_hf / "model.safetensors"), "pt") as f:
        emb = f.get_tensor("model.embed_tokens.weight")
    assert tuple(emb.shape) == (49152, 576) and str(emb.dtype) == "torch.bfloat16"
    assert float(emb.float().abs().sum()) > 0         # real weights, not zeros


def test_the_vllm_variant_matches_the_gguf(smollm2_hf):
    hv, seen = importer.variant_from_artifact(smollm2_hf, backend="vllm")
    gv, _ = importer.variant_from_artifact(smollm2_gguf())
    assert hv.backend == M.BACKEND_VLLM and hv.artifact_format == M.ARTIFACT_FORMAT_HF_DIRECTORY
    assert hv.quantization == "BF16" and hv.name == "bf16"
    assert hv.weight_bytes == (smollm2_hf / "model.safetensors").stat().st_size > gv.weight_bytes
    for f in ("block_count", "embedding_length", "head_count", "head_count_kv", "vocab_size"):
        assert getattr(hv.architecture, f) == getattr(gv.architecture, f), f
    assert hv.max_context == gv.max_context == 8192


def test_the_registry_accepts_each_artifact_only_for_its_backend(smollm2_hf):
    from controlplane.serving import validate
    fleet = [gpumodels.get_model("H100-80GB")]
    hv, _ = importer.variant_from_artifact(smollm2_hf, backend="vllm", context=512)
    gv, _ = importer.variant_from_artifact(smollm2_gguf(), context=512, fallback_rank=1)
    m = validate.validate(M.Model(name="smol", variants=[hv, gv]), fleet)
    need = {v.name: v.vram.total_bytes for v in m.variants}
    assert need["bf16"] > need["q4_1"]                  # BF16 weights and vLLM's larger reserve
    wrong = M.Variant()
    wrong.CopyFrom(hv)
    wrong.backend, wrong.artifact_format = M.BACKEND_LLAMA_CPP, M.ARTIFACT_FORMAT_GGUF_FILE
    with pytest.raises(errors.InvalidArgument, match=r"variants\[0\].artifact"):
        validate.validate(M.Model(name="smol", variants=[wrong]), fleet)
    wrong.CopyFrom(gv)
    wrong.backend, wrong.artifact_format, wrong.fallback_rank = M.BACKEND_VLLM, M.ARTIFACT_FORMAT_HF_DIRECTORY, 0
    with pytest.raises(errors.InvalidArgument, match=r"variants\[0\].artifact"):
        validate.validate(M.Model(name="smol", variants=[wrong]), fleet)


def test_convert_once_reuses_its_own_and_refuses_others(smollm2_hf, tmp_path):
    before = (smollm2_hf / "model.safetensors").stat().st_mtime_ns
    v, seen = importer.hf_variant_from_gguf(smollm2_gguf(), smollm2_hf, context=512)
    assert seen["converted"] is False and (smollm2_hf / "model.safetensors").stat().st_mtime_ns == before
    assert v.artifact == str(smollm2_hf) and v.context == 512
    other = tmp_path / "someone-elses"
    other.mkdir()
    (other / "config.json").write_text("{}")
    with pytest.raises(hfconvert.ConversionError, match="was not converted from"):
        importer.convert_once(smollm2_gguf(), other)
    assert (other / "config.json").read_text() == "{}"            # untouched
    with pytest.raises(hfconvert.ConversionError, match="not a file"):
        importer.convert_once(tmp_path, tmp_path / "out")
    with pytest.raises(hfconvert.ConversionError, match="dtype"):
        hfconvert.convert_gguf(smollm2_gguf(), tmp_path / "out", dtype="int4")


def test_meshctl_import_hf_out_dry_run(smollm2_hf, capsys):
    from tools.meshctl.main import main
    rc = main(["model", "import", str(smollm2_gguf()), "--name", "smol", "--hf-out", str(smollm2_hf),
               "--dry-run", "-o", "json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    doc = json.loads(out.out)
    got = [(v["name"], v["backend"], v["fallback_rank"]) for v in doc["variants"]]
    assert got == [("bf16", "vllm", 0), ("q4_1", "llama.cpp", 1)]
    assert "reused" in out.err
    rc = main(["model", "import", str(smollm2_hf), "--name", "smol", "--hf-out", str(smollm2_hf), "--dry-run"])
    assert rc != 0 and "converts a GGUF file" in capsys.readouterr().err
    rc = main(["model", "import", str(smollm2_gguf()), "--name", "smol", "--hf-out", str(smollm2_hf),
               "--hf-variant", "q4_1", "--dry-run"])
    assert rc != 0 and "GGUF variant's name too" in capsys.readouterr().err
