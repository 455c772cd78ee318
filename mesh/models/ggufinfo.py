"""The facts of a GGUF file, read from its header with the `gguf` package (the `serving` extra).

    info = read("/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    info.architecture.block_count, info.max_context, info.quantization, info.weight_bytes
    info.kv_bytes_per_token()          # mesh.models.vram's formula at the f16 KV cache

The keys read (GGUF spec, `<arch>` = general.architecture): `<arch>.context_length`,
`<arch>.block_count`, `<arch>.embedding_length`, `<arch>.attention.head_count`,
`<arch>.attention.head_count_kv`, `<arch>.attention.key_length` / `value_length`, `<arch>.vocab_size`
(else the tokenizer's token count), `general.file_type` (the quantization; else the most common tensor
type) and every tensor's size. Per-layer head counts (arrays, as in OpenELM) count at their largest,
an upper bound.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mesh.models import artifact, vram


class GgufUnavailable(RuntimeError):
    """The gguf package is not installed."""


@dataclass(frozen=True)
class ArchitectureFacts:
    name: str
    block_count: int
    embedding_length: int
    head_count: int
    head_count_kv: int = 0
    key_length: int = 0
    value_length: int = 0
    vocab_size: int = 0
    parameter_count: int = 0


@dataclass(frozen=True)
class GgufInfo:
    path: str
    version: int
    architecture: ArchitectureFacts
    max_context: int
    quantization: str
    weight_bytes: int
    tensor_count: int
    file_bytes: int
    model_name: str = ""
    metadata: dict = field(default_factory=dict)   # the general.* strings (name, basename, size_label, ...)

    def kv_bytes_per_token(self, kv_cache_type: str = vram.DEFAULT_KV_TYPE) -> int:
        return vram.kv_bytes_of(self.architecture, kv_cache_type)


def _gguf():
    try:
        import gguf
    except ImportError:
        raise GgufUnavailable("reading a GGUF header needs the gguf package: pip install 'gpumesh[serving]'") \
            from None
    return gguf


def _value(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    if isinstance(v, list):                 # per-layer values: the largest (an upper bound)
        nums = [x for x in v if isinstance(x, (int, float))]
        return max(nums) if nums else default
    return v


def quantization_name(gguf, file_type: int | None, tensor_types: Counter) -> str:
    """"Q4_1" from general.file_type (LlamaFileType.MOSTLY_Q4_1), else the most common tensor type."""
    if file_type is not None:
        try:
            name = gguf.LlamaFileType(int(file_type)).name
            return name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            pass
    if tensor_types:
        return tensor_types.most_common(1)[0][0]
    return ""


def read(path: str | Path) -> GgufInfo:
    """Read a GGUF file's facts. artifact.ArtifactError when it is not a readable GGUF file,
    GgufUnavailable without the gguf package, ValueError when the header lacks a needed key."""
    p = Path(path)
    version = artifact.check_gguf(p)
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(str(p), "r")
    except (ValueError, OSError, IndexError) as e:
        raise artifact.ArtifactError(f"{p}: the GGUF header cannot be parsed: {e}") from None
    arch = str(_value(reader, "general.architecture", "") or "")
    if not arch:
        raise ValueError(f"{p}: the GGUF header has no general.architecture")

    def need(key: str) -> int:
        v = _value(reader, f"{arch}.{key}")
        if v is None:
            raise ValueError(f"{p}: the GGUF header has no {arch}.{key}")
        return int(v)

    def opt(key: str) -> int:
        v = _value(reader, f"{arch}.{key}")
        return int(v) if v is not None else 0

    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = opt("vocab_size") or (len(tokens.data) if tokens is not None else 0)
    types = Counter(t.tensor_type.name for t in reader.tensors)
    facts = ArchitectureFacts(
        name=arch, block_count=need("block_count"), embedding_length=need("embedding_length"),
        head_count=need("attention.head_count"), head_count_kv=opt("attention.head_count_kv"),
        key_length=opt("attention.key_length"), value_length=opt("attention.value_length"), vocab_size=vocab,
        parameter_count=sum(int(t.n_elements) for t in reader.tensors))
    meta = {k.removeprefix("general."): str(_value(reader, k)) for k in reader.fields
            if k.startswith("general.") and isinstance(_value(reader, k), str)}
    return GgufInfo(path=str(p), version=version, architecture=facts, max_context=need("context_length"),
                    quantization=quantization_name(gguf, _value(reader, "general.file_type"), types),
                    weight_bytes=sum(int(t.n_bytes) for t in reader.tensors), tensor_count=len(reader.tensors),
                    file_bytes=p.stat().st_size, model_name=meta.get("name", ""), metadata=meta)
