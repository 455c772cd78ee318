"""`meshctl model bench` on a real local cluster (etcd, the control plane, an agent) with the real
llama.cpp server (llama-cpp-python's) loading the real SmolLM2-135M GGUF: the command starts the backend,
measures cold start, time to first token and tokens/s over streaming requests, prints them as JSON and
stores them in the registry on the variant under the host's GPU model ("cpu" here), where `model describe`
shows them. Figures are checked for being measured (> 0, consistent), never against timing bounds."""

from __future__ import annotations

import json

import pytest

from gpumesh.v1 import model_service_pb2 as M
from tests.integration.serving import h100_hosts, need_llama, started_cluster
from tests.integration.serving import meshctl_in_process as meshctl
from tests.integration.serving import module_mesh, smollm2_model  # noqa: F401 - fixtures mesh, smollm2
from tests.models_util import smollm2_gguf

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]
HOSTS = h100_hosts(1)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    need_llama()
    smollm2_gguf()
    with started_cluster(tmp_path_factory, "bench", HOSTS) as c:
        yield c


def test_bench_llamacpp_stores_figures(cluster, mesh, smollm2, monkeypatch):
    # one thread (a small shared machine); N_BATCH=1: see tests/integration/serving.py llama_env (AMX)
    for k, v in (("N_THREADS", "1"), ("N_THREADS_BATCH", "1"), ("N_BATCH", "1")):
        monkeypatch.setenv(k, v)
    before = mesh.get_model("smollm2")
    assert not before.variants[0].measured
    rc, out, err = meshctl(cluster, "model", "bench", "smollm2", "--requests", "3", "--prompt-tokens", "48",
                           "--max-tokens", "24", "-o", "json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["stored"] is True and doc["backend"] == "llama.cpp" and doc["gpu_model"] == "cpu"
    assert doc["variant"] == before.variants[0].name and doc["context"] == 512 and doc["requests"] == 3
    assert doc["load_seconds"] > 0 and doc["ttft_seconds"] > 0 and doc["tokens_per_second"] > 0
    assert doc["ttft_p95_seconds"] >= doc["ttft_seconds"] and doc["prompt_tokens_per_second"] > 0
    assert len(doc["runs"]) == 3 and all(r["tokens"] >= 2 for r in doc["runs"])
    assert doc["prompt_tokens"] > 10          # calibrated by the server's own count towards 48
    assert doc["command"][1:3] == ["-m", "nodeagent.backends.llamacpp_server"]

    # in the registry, on the variant, under "cpu": the same figures
    m = mesh.get_model("smollm2")
    assert m.generation == before.generation + 1
    fig = m.variants[0].measured["cpu"]
    assert fig.tokens_per_second == pytest.approx(doc["tokens_per_second"])
    assert fig.ttft_seconds == pytest.approx(doc["ttft_seconds"])
    assert fig.load_seconds == pytest.approx(doc["load_seconds"])
    assert (fig.requests, fig.max_tokens, fig.context, fig.backend) == (3, 24, 512, "llama.cpp")
    assert fig.HasField("measured_at") and "started as a process" in fig.note

    rc, out, _ = meshctl(cluster, "model", "describe", "smollm2")
    assert rc == 0 and "Measured:" in out
    row = next(line for line in out.splitlines() if line.strip().startswith("cpu"))
    assert f"{doc['tokens_per_second']:.1f}" in row and "3 x" in row

    # the SDK's way (what the command calls): another GPU model's figures beside, under its canonical name
    m = mesh.record_measurement("smollm2", doc["variant"], "H100", M.Measurement(tokens_per_second=400.0))
    assert sorted(m.variants[0].measured) == ["H100-80GB", "cpu"]
    assert m.variants[0].measured["cpu"].tokens_per_second == pytest.approx(doc["tokens_per_second"])
    from mesh import errors
    with pytest.raises(errors.NotFound, match="no variant 'nope'"):
        mesh.record_measurement("smollm2", "nope", "cpu", M.Measurement())


def test_bench_bad_input(cluster, mesh, smollm2):
    rc, _, err = meshctl(cluster, "model", "bench", "smollm2", "--variant", "nope")
    assert rc != 0 and "no variant 'nope'" in err
    rc, _, err = meshctl(cluster, "model", "bench", "smollm2", "--backend", "vllm")
    assert rc != 0 and "no vllm variant" in err
    rc, _, err = meshctl(cluster, "model", "bench", "no-such-model")
    assert rc != 0 and "no-such-model" in err
