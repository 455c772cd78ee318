"""How much GPU memory a model variant needs, and the smallest slice that holds it.

The formula (also in docs/serving.md)::

    vram(context, concurrency) = weight_bytes
                               + kv_bytes_per_token * tokens(context) * concurrency
                               + cuda_context + runtime_reserve            (per backend)

    kv_bytes_per_token = block_count * head_count_kv * (key_length + value_length) * bytes_per_element
                       = 2 * n_layers * n_kv_heads * head_dim * bytes_per_element   (key = value = head_dim)

`tokens(context)` is the context rounded up to the backend's KV block (vLLM pages its KV cache in blocks
of 16 tokens per sequence; llama.cpp allocates exactly n_ctx). The total is rounded up to a MiB.

`bytes_per_element` is that of the KV cache's type: f32 4, f16/bf16 2 (the default of both backends:
llama.cpp's `--cache-type-k/v f16`, vLLM's `kv_cache_dtype auto` on a BF16 model), fp8 1, and the block
quantizations of llama.cpp by their block size (q8_0: 34 bytes per 32 elements, q4_0: 18 per 32, ...).
Models with sliding-window layers (Gemma 3, Mistral) need less than the formula says at long contexts:
it counts every layer at full context, an upper bound.

The runtime overhead per backend (`OVERHEADS`), constants chosen from what the backends report at start:

- **CUDA context, both backends: 512 MiB.** The driver's context, the loaded kernels (CUDA 12 loads them
  lazily), cuBLAS workspaces: 300-600 MiB on A100/H100 per process, and an MPS client or MIG instance
  pays it too.
- **llama.cpp compute buffers: 512 MiB.** The scratch buffers of one ubatch (512 tokens): logits
  (n_vocab x 512 x 4 bytes, 100 MiB for a 49k vocabulary, 256 MiB for 128k) and attention intermediates;
  llama.cpp logs "compute buffer size" of 100-600 MiB for 0.1-8B models at 4-8k context.
- **vLLM activation and profiling reserve: 2 GiB.** vLLM profiles one forward pass of
  `max_num_batched_tokens` and keeps the peak activation memory out of the KV cache (about 1-1.5 GiB
  for 1-8B models at the default 2048-8192 batched tokens), plus CUDA graphs (a few hundred MiB; none
  with `--enforce-eager`).

Nothing here imports NVML, gRPC or the gguf package: the registry, deployments and meshctl share it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterable

from mesh import gpumodels

MIB = 1 << 20
GIB = 1 << 30

# Bytes per KV-cache element, by cache type (llama.cpp's --cache-type-k/v names; vLLM's fp8).
KV_TYPE_BYTES: dict[str, Fraction] = {
    "f32": Fraction(4), "f16": Fraction(2), "bf16": Fraction(2),
    "fp8": Fraction(1), "fp8_e4m3": Fraction(1), "fp8_e5m2": Fraction(1),
    "q8_0": Fraction(34, 32), "q5_1": Fraction(24, 32), "q5_0": Fraction(22, 32),
    "q4_1": Fraction(20, 32), "q4_0": Fraction(18, 32), "iq4_nl": Fraction(18, 32),
}
DEFAULT_KV_TYPE = "f16"


@dataclass(frozen=True)
class Overhead:
    """The runtime memory a backend takes beyond weights and KV cache."""

    cuda_context_bytes: int   # driver context, kernels, library workspaces (per process)
    runtime_bytes: int        # llama.cpp: compute buffers; vLLM: activation/profiling reserve
    kv_block_tokens: int      # the KV cache's allocation unit per sequence (tokens)

    @property
    def total_bytes(self) -> int:
        return self.cuda_context_bytes + self.runtime_bytes


OVERHEADS: dict[str, Overhead] = {
    "llama.cpp": Overhead(cuda_context_bytes=512 * MIB, runtime_bytes=512 * MIB, kv_block_tokens=1),
    "vllm": Overhead(cuda_context_bytes=512 * MIB, runtime_bytes=2 * GIB, kv_block_tokens=16),
}
BACKENDS = tuple(OVERHEADS)


def kv_type_bytes(kv_cache_type: str) -> Fraction:
    """Bytes per element of a KV cache type; ValueError naming the allowed types."""
    t = (kv_cache_type or DEFAULT_KV_TYPE).lower()
    if t not in KV_TYPE_BYTES:
        raise ValueError(f"unknown KV cache type {kv_cache_type!r} (allowed: {', '.join(KV_TYPE_BYTES)})")
    return KV_TYPE_BYTES[t]


def kv_bytes_per_token(block_count: int, head_count: int, embedding_length: int, head_count_kv: int = 0,
                       key_length: int = 0, value_length: int = 0, kv_cache_type: str = DEFAULT_KV_TYPE) -> int:
    """KV-cache bytes per token of context: block_count * head_count_kv * (key_length + value_length) *
    bytes per element, rounded up. head_count_kv 0 means head_count (no grouped-query attention);
    key/value lengths 0 mean embedding_length / head_count. ValueError naming what is missing."""
    if block_count <= 0:
        raise ValueError(f"block_count must be > 0, not {block_count}")
    kv_heads = head_count_kv or head_count
    if kv_heads <= 0:
        raise ValueError("head_count (or head_count_kv) must be > 0")
    if not (key_length and value_length):
        if head_count <= 0 or embedding_length <= 0:
            raise ValueError("key_length/value_length, or embedding_length and head_count, are needed")
        head_dim = embedding_length // head_count
        key_length, value_length = key_length or head_dim, value_length or head_dim
    return math.ceil(block_count * kv_heads * (key_length + value_length) * kv_type_bytes(kv_cache_type))


def kv_bytes_of(arch, kv_cache_type: str = DEFAULT_KV_TYPE) -> int:
    """`kv_bytes_per_token` of an object with the Architecture fields (the proto message or alike)."""
    return kv_bytes_per_token(arch.block_count, arch.head_count, arch.embedding_length, arch.head_count_kv,
                              arch.key_length, arch.value_length, kv_cache_type)


@dataclass(frozen=True)
class VramNeed:
    """The parts of a variant's VRAM need at one context and concurrency."""

    backend: str
    context: int
    concurrency: int
    weight_bytes: int
    kv_cache_bytes: int
    overhead_bytes: int

    @property
    def total_bytes(self) -> int:
        raw = self.weight_bytes + self.kv_cache_bytes + self.overhead_bytes
        return -(-raw // MIB) * MIB


def vram(backend: str, weight_bytes: int, kv_bytes_per_token: int, context: int, concurrency: int = 1,
         overheads: dict[str, Overhead] | None = None) -> VramNeed:
    """The VRAM need of a variant of `backend` ("llama.cpp" or "vllm") serving `concurrency` sequences of
    `context` tokens. ValueError for an unknown backend or negative sizes."""
    table = overheads or OVERHEADS
    if backend not in table:
        raise ValueError(f"unknown backend {backend!r} (allowed: {', '.join(table)})")
    for name, value in (("weight_bytes", weight_bytes), ("kv_bytes_per_token", kv_bytes_per_token),
                        ("context", context), ("concurrency", concurrency)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, not {value}")
    o = table[backend]
    tokens = -(-context // o.kv_block_tokens) * o.kv_block_tokens
    return VramNeed(backend=backend, context=context, concurrency=concurrency, weight_bytes=weight_bytes,
                    kv_cache_bytes=kv_bytes_per_token * tokens * concurrency, overhead_bytes=o.total_bytes)


# -- the smallest slice that fits ------------------------------------------------------------------

@dataclass(frozen=True)
class SliceFit:
    """Where a need fits on one GPU model: its smallest MIG profile and an MPS share."""

    gpu_model: str
    gpu_memory_bytes: int
    mig_profile: str = ""          # "" when no MIG profile holds the need (or no MIG)
    mig_memory_bytes: int = 0
    mps_memory_bytes: int = 0      # 0 when the need exceeds the GPU (or no MPS)
    mps_compute_share: float = 0.0

    @property
    def fits(self) -> bool:
        return bool(self.mig_profile or self.mps_memory_bytes)


def largest_slice_bytes(model: gpumodels.GpuModel) -> int:
    """The memory of the largest slice of a GPU model: the whole GPU where MPS, time-share or exclusive
    use is possible, else its largest MIG profile."""
    if model.isolations - {"mig"}:
        return model.memory_mib * MIB
    return max((p.memory_mib * MIB for p in model.mig_profiles), default=0)


def slice_for(need_bytes: int, model: gpumodels.GpuModel) -> SliceFit:
    """The smallest slice of `model` that holds `need_bytes`: the MIG profile the scheduler would pick
    for `meshctl alloc --memory` (GpuModel.smallest_profile_for), and an MPS share of that memory with
    the scheduler's default compute share (memory over the GPU's memory)."""
    gpu = model.memory_mib * MIB
    p = model.smallest_profile_for(need_bytes, 0.0) if model.mig_capable else None
    mps = -(-need_bytes // MIB) * MIB
    mps_ok = "mps" in model.isolations and mps <= gpu
    return SliceFit(gpu_model=model.name, gpu_memory_bytes=gpu,
                    mig_profile=p.name if p else "", mig_memory_bytes=p.memory_mib * MIB if p else 0,
                    mps_memory_bytes=mps if mps_ok else 0,
                    mps_compute_share=round(min(1.0, mps / gpu), 4) if mps_ok else 0.0)


def slices_for(need_bytes: int, models: Iterable[gpumodels.GpuModel]) -> list[SliceFit]:
    """`slice_for` over several GPU models, in catalog order, each once."""
    order = {name: i for i, name in enumerate(gpumodels.model_names())}
    uniq = {m.name: m for m in models}
    return [slice_for(need_bytes, uniq[n]) for n in sorted(uniq, key=lambda n: (order.get(n, len(order)), n))]

