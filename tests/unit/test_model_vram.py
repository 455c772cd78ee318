"""The VRAM formula and the smallest slice that holds a need (mesh/models/vram.py)."""

from __future__ import annotations

import pytest

from controlplane.scheduler.plugins.noderesources import mig_profile
from gpumesh.v1 import types_pb2
from mesh import gpumodels, slicespec
from mesh.models import vram

MIB, GIB = 1 << 20, 1 << 30


@pytest.mark.parametrize("name,arch,kv_type,want", [
    # public configs: SmolLM2-135M (30 layers, 3 KV heads, 576/9 = 64 per head)
    ("smollm2-135m f16", dict(block_count=30, head_count=9, head_count_kv=3, embedding_length=576), "f16",
     2 * 30 * 3 * 64 * 2),
    # Llama 3 8B: 32 layers, 8 KV heads of 128
    ("llama3-8b f16", dict(block_count=32, head_count=32, head_count_kv=8, embedding_length=4096), "f16", 131072),
    ("llama3-8b q8_0", dict(block_count=32, head_count=32, head_count_kv=8, embedding_length=4096), "q8_0",
     32 * 8 * 256 * 34 // 32),
    ("llama3-8b fp8", dict(block_count=32, head_count=32, head_count_kv=8, embedding_length=4096), "fp8", 65536),
    ("llama3-8b q4_0", dict(block_count=32, head_count=32, head_count_kv=8, embedding_length=4096), "q4_0",
     32 * 8 * 256 * 18 // 32),
    # Llama 2 7B: no grouped-query attention (head_count_kv 0 = head_count)
    ("llama2-7b f16", dict(block_count=32, head_count=32, embedding_length=4096), "f16", 2 * 32 * 32 * 128 * 2),
    # explicit, unequal key and value lengths
    ("k192 v128 bf16", dict(block_count=16, head_count=8, head_count_kv=1, key_length=192, value_length=128,
                           embedding_length=0), "bf16", 16 * 1 * 320 * 2),
    ("f32 cache", dict(block_count=2, head_count=4, head_count_kv=2, embedding_length=64), "f32", 2 * 2 * 32 * 4),
])
def test_kv_bytes_per_token(name, arch, kv_type, want):
    assert vram.kv_bytes_per_token(kv_cache_type=kv_type, **arch) == want


@pytest.mark.parametrize("arch,match", [
    (dict(block_count=0, head_count=4, embedding_length=64), "block_count"),
    (dict(block_count=2, head_count=0, embedding_length=64), "head_count"),
    (dict(block_count=2, head_count=4, head_count_kv=2, embedding_length=0), "embedding_length"),
])
def test_kv_bytes_per_token_needs_the_facts(arch, match):
    with pytest.raises(ValueError, match=match):
        vram.kv_bytes_per_token(**arch)


def test_unknown_kv_type_names_the_allowed():
    with pytest.raises(ValueError, match="allowed: f32, f16, bf16"):
        vram.kv_type_bytes("int3")


@pytest.mark.parametrize("backend,weights,kv,context,conc,want_kv,want_overhead", [
    # llama.cpp allocates exactly n_ctx; overhead = CUDA context + compute buffers
    ("llama.cpp", 1 * GIB, 131072, 8192, 1, 131072 * 8192, 1 * GIB),
    ("llama.cpp", 96576768, 23040, 2048, 1, 23040 * 2048, 1 * GIB),
    ("llama.cpp", 1 * GIB, 131072, 0, 1, 0, 1 * GIB),
    # vLLM pages the KV cache in blocks of 16 tokens per sequence; overhead = CUDA context + 2 GiB reserve
    ("vllm", 16 * GIB, 131072, 1000, 4, 131072 * 1008 * 4, 512 * MIB + 2 * GIB),
    ("vllm", 16 * GIB, 131072, 4096, 8, 131072 * 4096 * 8, 512 * MIB + 2 * GIB),
])
def test_vram(backend, weights, kv, context, conc, want_kv, want_overhead):
    need = vram.vram(backend, weights, kv, context, conc)
    assert (need.kv_cache_bytes, need.overhead_bytes) == (want_kv, want_overhead)
    raw = weights + want_kv + want_overhead
    assert need.total_bytes >= raw and need.total_bytes - raw < MIB and need.total_bytes % MIB == 0


def test_vram_refuses_unknown_backends_and_negative_sizes():
    with pytest.raises(ValueError, match="unknown backend 'tgi'.*llama.cpp, vllm"):
        vram.vram("tgi", 1, 1, 1)
    for kw in ({"weight_bytes": -1}, {"kv_bytes_per_token": -2}, {"context": -3}, {"concurrency": -4}):
        args = {"weight_bytes": 1, "kv_bytes_per_token": 1, "context": 1, "concurrency": 1, **kw}
        with pytest.raises(ValueError, match=f"{next(iter(kw))} must be >= 0"):
            vram.vram("vllm", **args)


@pytest.mark.parametrize("gpu,need,profile,mps", [
    ("H100-80GB", 1 * GIB, "1g.10gb", True),
    ("H100-80GB", 9 * GIB, "1g.10gb", True),
    ("H100-80GB", 11 * GIB, "1g.20gb", True),
    ("H100-80GB", 30 * GIB, "3g.40gb", True),
    ("H100-80GB", 45 * GIB, "7g.80gb", True),
    ("H100-80GB", 79 * GIB, "7g.80gb", True),
    ("H100-80GB", 80 * GIB, "", False),           # more than 7g.80gb's 81152 MiB and the GPU's 81559 MiB
    ("A100-40GB", 4 * GIB, "1g.5gb", True),
    ("H200-141GB", 100 * GIB, "7g.141gb", True),
    ("L4", 10 * GIB, "", True),                   # no MIG: an MPS share
    ("L4", 23 * GIB, "", False),
])
def test_smallest_slice(gpu, need, profile, mps):
    model = gpumodels.get_model(gpu)
    fit = vram.slice_for(need, model)
    assert fit.mig_profile == profile
    assert bool(fit.mps_memory_bytes) == mps and fit.fits == bool(profile or mps)
    if mps:
        assert fit.mps_memory_bytes >= need and fit.mps_compute_share == round(fit.mps_memory_bytes /
                                                                                (model.memory_mib * MIB), 4)


@pytest.mark.parametrize("need", [1 * GIB, 5 * GIB, 9 * GIB, 10 * GIB, 19 * GIB, 21 * GIB, 39 * GIB, 60 * GIB])
@pytest.mark.parametrize("gpu", ["A100-40GB", "A100-80GB", "H100-80GB", "H200-141GB"])
def test_smallest_mig_profile_is_the_schedulers(gpu, need):
    """The registry's pick is the one `meshctl alloc --memory` gets from the scheduler."""
    model = gpumodels.get_model(gpu)
    req = slicespec.validate(types_pb2.SliceSpec(tenant="t", memory_bytes=need))
    sched = mig_profile(req, model)
    assert vram.slice_for(need, model).mig_profile == (sched.name if not isinstance(sched, str) else "")


def test_slices_for_keeps_catalog_order_once_each():
    h100, l4 = gpumodels.get_model("H100-80GB"), gpumodels.get_model("L4")
    fits = vram.slices_for(2 * GIB, [l4, h100, l4])
    assert [f.gpu_model for f in fits] == ["H100-80GB", "L4"]


def test_largest_slice():
    assert vram.largest_slice_bytes(gpumodels.get_model("H100-80GB")) == 81559 * MIB
    assert vram.largest_slice_bytes(gpumodels.get_model("T4")) == 15360 * MIB
