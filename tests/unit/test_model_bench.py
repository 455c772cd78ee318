"""meshctl model bench's pieces that need no backend (mesh/models/bench.py, tools/meshctl/modelbench.py):
percentiles, prompts that defeat prefix caches, the variant picked, the registry's Measurement of a result."""

from __future__ import annotations

import pytest

from gpumesh.v1 import model_service_pb2 as M
from mesh.models import bench
from tools.meshctl.common import CliError
from tools.meshctl.modelbench import pick_variant


def test_percentile():
    assert bench.percentile([], 95) == 0.0
    assert bench.percentile([3.0], 95) == 3.0
    assert bench.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert bench.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 95) == pytest.approx(4.8)
    assert bench.percentile([5.0, 1.0], 100) == 5.0


def test_prompts_differ_from_the_first_words():
    a, b = bench.synthetic_prompt(2, 40), bench.synthetic_prompt(3, 40)
    assert a.split()[:2] != b.split()[:2]          # no shared prefix for a cache to reuse
    assert len(bench.synthetic_prompt(2, 80).split()) > len(a.split())


def test_pick_variant():
    m = M.Model(name="m", variants=[
        M.Variant(name="bf16", backend=M.BACKEND_VLLM, fallback_rank=1),
        M.Variant(name="q4_1", backend=M.BACKEND_LLAMA_CPP, fallback_rank=0)])
    assert pick_variant(m, "", "")[0].name == "q4_1"
    assert pick_variant(m, "", "vllm") [0].name == "bf16" and pick_variant(m, "", "vllm")[1] == "vllm"
    assert pick_variant(m, "bf16", "")[1] == "vllm"
    with pytest.raises(CliError, match="no variant 'x'"):
        pick_variant(m, "x", "")
    with pytest.raises(CliError, match="no llama.cpp variant bf16"):
        pick_variant(m, "bf16", "llama.cpp")


def test_measurement_of_a_result():
    r = bench.BenchResult(model="m", variant="q4_1", backend="llama.cpp", gpu_model="cpu", artifact="/a", context=512,
                          requests=5, prompt_tokens=130, max_tokens=64, load_seconds=1.5, ttft_seconds=0.2,
                          ttft_p95_seconds=0.3, tokens_per_second=90.0, prompt_tokens_per_second=650.0)
    x = bench.measurement(r, "note")
    assert (x.tokens_per_second, x.ttft_seconds, x.load_seconds, x.ttft_p95_seconds) == (90.0, 0.2, 1.5, 0.3)
    assert (x.requests, x.prompt_tokens, x.max_tokens, x.context, x.concurrency) == (5, 130, 64, 512, 1)
    assert x.backend == "llama.cpp" and x.note == "note" and x.measured_at.seconds > 0


def test_unknown_backend_kind_is_refused():
    with pytest.raises(bench.BenchError, match="cannot start backend 'tgi' here: .*not supported"):
        bench.Backend("tgi", "/a", "m", 512)
    with pytest.raises(ValueError, match="max_tokens >= 2"):
        bench.run("m", "v", "llama.cpp", "/a", max_tokens=1)
