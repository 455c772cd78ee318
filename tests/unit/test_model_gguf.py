"""Reading model artifacts: GGUF headers (mesh/models/ggufinfo.py), HF directories and the magic checks
(mesh/models/artifact.py), and the variant `meshctl model import` builds (mesh/models/importer.py)."""

from __future__ import annotations

import pytest

from gpumesh.v1 import model_service_pb2 as M
from mesh.models import artifact, importer
from tests.models_util import TINY, TINY_KV_F16, TINY_WEIGHT_BYTES, smollm2_gguf, write_hf_dir, write_tiny_gguf


def test_tiny_gguf_facts(tmp_path):
    from mesh.models import ggufinfo
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    info = ggufinfo.read(path)
    a = info.architecture
    assert (a.name, a.block_count, a.embedding_length, a.head_count, a.head_count_kv, a.vocab_size) == \
        ("llama", TINY["block_count"], TINY["embedding_length"], TINY["head_count"], TINY["head_count_kv"],
         TINY["vocab_size"])
    assert info.max_context == TINY["context_length"]
    assert info.quantization == "F16"                       # general.file_type 1 = MOSTLY_F16
    assert info.weight_bytes == TINY_WEIGHT_BYTES and info.tensor_count == 2
    assert a.parameter_count == TINY_WEIGHT_BYTES // 2
    assert info.weight_bytes < info.file_bytes
    assert info.kv_bytes_per_token() == TINY_KV_F16
    assert info.kv_bytes_per_token("q8_0") == 2 * 2 * 32 * 34 // 32
    assert info.model_name == "tiny test model" and info.metadata["basename"] == "tiny"


def test_real_smollm2_gguf():
    """SmolLM2-135M-Instruct's published shape: 30 layers, hidden 576, 9 heads, 3 KV heads, 8k context."""
    from mesh.models import ggufinfo
    path = smollm2_gguf()
    info = ggufinfo.read(path)
    a = info.architecture
    assert (a.name, a.block_count, a.embedding_length, a.head_count, a.head_count_kv) == ("llama", 30, 576, 9, 3)
    assert info.max_context == 8192 and info.quantization == "Q4_1" and a.vocab_size == 49152
    assert 130e6 < a.parameter_count < 140e6                  # "135M"
    assert 0.9 * info.file_bytes < info.weight_bytes < info.file_bytes
    assert info.kv_bytes_per_token() == 2 * 30 * 3 * 64 * 2   # 23,040 bytes per token at f16


def test_gguf_magic(tmp_path):
    good = write_tiny_gguf(tmp_path / "tiny.gguf")
    assert artifact.check_gguf(good) == 3
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(artifact.ArtifactError, match="not a GGUF file"):
        artifact.check_gguf(text)
    with pytest.raises(artifact.ArtifactError, match="does not exist"):
        artifact.check_gguf(tmp_path / "missing.gguf")
    with pytest.raises(artifact.ArtifactError, match="is a directory"):
        artifact.check_gguf(tmp_path)
    old = tmp_path / "v1.gguf"
    old.write_bytes(b"GGUF\x01\x00\x00\x00" + b"\0" * 16)
    with pytest.raises(artifact.ArtifactError, match="version 1 is not supported"):
        artifact.check_gguf(old)


def test_gguf_reader_without_the_package_says_what_to_install(tmp_path, monkeypatch):
    import builtins
    from mesh.models import ggufinfo
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    real = builtins.__import__

    def no_gguf(name, *a, **kw):
        if name == "gguf":
            raise ImportError("no gguf")
        return real(name, *a, **kw)
    monkeypatch.setattr(builtins, "__import__", no_gguf)
    with pytest.raises(ggufinfo.GgufUnavailable, match=r"gpumesh\[serving\]"):
        ggufinfo.read(path)


def test_hf_directory(tmp_path):
    d = write_hf_dir(tmp_path / "smollm2-bf16", weights=1000)
    facts = artifact.hf_facts(d)
    assert facts["architecture"]["block_count"] == 30 and facts["architecture"]["head_count_kv"] == 3
    assert facts["max_context"] == 8192 and facts["quantization"] == "BF16" and facts["weight_bytes"] == 1000
    (d / "model.safetensors").unlink()
    with pytest.raises(artifact.ArtifactError, match="has no weights"):
        artifact.check_hf_dir(d)
    (d / "config.json").unlink()
    with pytest.raises(artifact.ArtifactError, match="has no config.json"):
        artifact.check_hf_dir(d)
    with pytest.raises(artifact.ArtifactError, match="does not exist"):
        artifact.check_hf_dir(tmp_path / "nope")
    f = tmp_path / "file"
    f.write_text("{}")
    with pytest.raises(artifact.ArtifactError, match="is a file"):
        artifact.check_hf_dir(f)


@pytest.mark.parametrize("uri,ok", [
    ("/models/a.gguf", "/models/a.gguf"),
    ("file:///models/a%20b.gguf", "/models/a b.gguf"),
    ("file://localhost/models/a.gguf", "/models/a.gguf"),
    ("models/a.gguf", None),
    ("https://example.org/a.gguf", None),
    ("file://host/models/a.gguf", None),
    ("", None),
])
def test_resolve(uri, ok):
    if ok is None:
        with pytest.raises(artifact.ArtifactError):
            artifact.resolve(uri)
    else:
        assert str(artifact.resolve(uri)) == ok


def test_import_builds_the_variant_from_a_gguf(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    v, seen = importer.variant_from_artifact(path)
    assert v.backend == M.BACKEND_LLAMA_CPP and v.artifact_format == M.ARTIFACT_FORMAT_GGUF_FILE
    assert v.artifact == str(path.resolve()) and v.name == "f16" and v.quantization == "F16"
    assert (v.weight_bytes, v.max_context, v.architecture.block_count) == (TINY_WEIGHT_BYTES, 256, 2)
    assert v.kv_bytes_per_token == 0          # derived by the control plane from the architecture
    assert seen["family"] == "tiny"


def test_import_builds_the_variant_from_an_hf_directory(tmp_path):
    d = write_hf_dir(tmp_path / "bf16")
    v, _ = importer.variant_from_artifact(d, name="bf16")
    assert v.backend == M.BACKEND_VLLM and v.artifact_format == M.ARTIFACT_FORMAT_HF_DIRECTORY
    assert (v.quantization, v.max_context, v.architecture.head_count) == ("BF16", 8192, 9)
    with pytest.raises(ValueError, match="unknown backend"):
        importer.variant_from_artifact(d, backend="tgi")
