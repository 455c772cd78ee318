"""A registry Variant from an artifact on disk (`meshctl model import`).

    v = variant_from_artifact("/models/SmolLM2-135M-Instruct.Q4_1.gguf")     # llama.cpp, from the GGUF header
    v = variant_from_artifact("/models/smollm2-bf16", backend="vllm")        # vLLM, from config.json
    v = hf_variant_from_gguf("/models/SmolLM2.Q4_1.gguf", "/models/smollm2-bf16")   # converts, then as above

A file is a GGUF for llama.cpp (read with the gguf package), a directory a Hugging Face-format directory
for vLLM (its config.json and weight files). The variant carries the facts; the control plane derives
kv_bytes_per_token and the VRAM need from them.
"""

from __future__ import annotations

import json
from pathlib import Path

from gpumesh.v1 import model_service_pb2 as M
from mesh.models import artifact

LLAMA_CPP, VLLM = "llama.cpp", "vllm"


def default_backend(path: Path) -> str:
    """llama.cpp for a file (GGUF), vLLM for a directory (Hugging Face format)."""
    return VLLM if path.is_dir() else LLAMA_CPP


def default_variant_name(quantization: str, backend: str) -> str:
    """"q4_1" for a Q4_1 GGUF, "bf16" for a BF16 directory; the backend's name without a quantization."""
    base = (quantization or backend).lower().replace(".", "")
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in base)[:63] or "default"


def variant_from_artifact(path: str | Path, backend: str = "", name: str = "", kv_cache_type: str = "",
                          context: int = 0, concurrency: int = 0, fallback_rank: int = 0) -> tuple[M.Variant, dict]:
    """The variant for the artifact at `path` and what was read (a dict for messages: model_name,
    family). artifact.ArtifactError, ValueError (a header without a needed key) or
    ggufinfo.GgufUnavailable as `read` raises them."""
    p = Path(path).expanduser().resolve()
    backend = backend or default_backend(p)
    if backend not in (LLAMA_CPP, VLLM):
        raise ValueError(f"unknown backend {backend!r} (allowed: {LLAMA_CPP}, {VLLM})")
    v = M.Variant(backend=M.BACKEND_LLAMA_CPP if backend == LLAMA_CPP else M.BACKEND_VLLM, artifact=str(p),
                  kv_cache_type=kv_cache_type, context=context, concurrency=concurrency, fallback_rank=fallback_rank)
    if backend == LLAMA_CPP:
        from mesh.models import ggufinfo
        info = ggufinfo.read(p)
        a = info.architecture
        v.artifact_format = M.ARTIFACT_FORMAT_GGUF_FILE
        v.architecture.CopyFrom(M.Architecture(
            name=a.name, block_count=a.block_count, embedding_length=a.embedding_length, head_count=a.head_count,
            head_count_kv=a.head_count_kv, key_length=a.key_length, value_length=a.value_length,
            vocab_size=a.vocab_size, parameter_count=a.parameter_count))
        v.quantization, v.weight_bytes, v.max_context = info.quantization, info.weight_bytes, info.max_context
        seen = {"model_name": info.model_name, "family": info.metadata.get("basename", "") or a.name,
                "format": f"GGUF v{info.version}", "tensors": info.tensor_count}
    else:
        facts = artifact.hf_facts(p)
        v.artifact_format = M.ARTIFACT_FORMAT_HF_DIRECTORY
        v.architecture.CopyFrom(M.Architecture(**facts["architecture"]))
        v.quantization, v.weight_bytes, v.max_context = (facts["quantization"], facts["weight_bytes"],
                                                         facts["max_context"])
        seen = {"model_name": p.name, "family": facts["architecture"]["name"], "format": "Hugging Face directory"}
    v.name = name or default_variant_name(v.quantization, backend)
    return v, seen


SOURCE_FILE = "gpumesh-source.json"      # in a converted directory: the GGUF it was made from (its SHA-256)


def converted_from(directory: Path) -> dict:
    """What `hf_variant_from_gguf` recorded in a directory it wrote ({} for any other directory)."""
    try:
        doc = json.loads((Path(directory) / SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def convert_once(gguf: str | Path, out: str | Path, dtype: str = "bfloat16") -> tuple[Path, bool]:
    """The Hugging Face-format directory of `gguf` at `out`: (path, converted now). A directory there
    that this function made from the same GGUF (same SHA-256) and dtype is kept; any other refuses
    (hfconvert.ConversionError), so an unrelated directory is never overwritten."""
    from mesh.models import hfconvert
    src, dst = Path(gguf).expanduser().resolve(), Path(out).expanduser().resolve()
    if not src.is_file():
        raise hfconvert.ConversionError(f"{src} is not a file (--hf-out converts a GGUF file)")
    digest = hfconvert.file_digest(src)
    if dst.exists():
        seen = converted_from(dst)
        if seen.get("sha256") == digest and seen.get("dtype") == dtype:
            artifact.check_hf_dir(dst)
            return dst, False
        raise hfconvert.ConversionError(f"{dst} exists and was not converted from {src.name} as {dtype} "
                                        "(remove it or choose another directory)")
    hfconvert.convert_gguf(src, dst, dtype=dtype)
    marker = dst / SOURCE_FILE
    marker.write_text(json.dumps({"gguf": str(src), "sha256": digest, "dtype": dtype}), encoding="utf-8")
    marker.chmod(0o644)
    return dst, True


def hf_variant_from_gguf(gguf: str | Path, out: str | Path, name: str = "", context: int = 0, concurrency: int = 0,
                         fallback_rank: int = 0, dtype: str = "bfloat16") -> tuple[M.Variant, dict]:
    """The vLLM variant of a GGUF: its Hugging Face-format directory at `out` (converted unless it is
    there already, see convert_once) read like any HF directory. `seen` adds `converted` (bool)."""
    path, fresh = convert_once(gguf, out, dtype)
    v, seen = variant_from_artifact(path, backend=VLLM, name=name, context=context, concurrency=concurrency,
                                    fallback_rank=fallback_rank)
    seen["converted"] = fresh
    return v, seen
