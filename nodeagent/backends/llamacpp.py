"""llama.cpp through llama-cpp-python's OpenAI-compatible server (`python -m llama_cpp.server`).

The server loads one GGUF file and answers /v1/models, /v1/completions and /v1/chat/completions (it
has no /health; readiness is /v1/models plus a one-token completion, done by the control plane). The
agent runs it through nodeagent/backends/llamacpp_server.py, which adds `/metrics` with the load
signals under llama.cpp's own server's names (`llamacpp:requests_processing`, ...). It serves one
request at a time. `gpu_layers` 0 offloads every layer (-1 to the server); on a host without a GPU
llama.cpp runs on the CPU whatever it is given.

The interpreter is the agent's own (`sys.executable`): the `gpumesh[serving]` extra installs
llama-cpp-python[server] beside the agent. Workloads run as an unprivileged user, so the venv and the
GGUF file must be readable by others (docs/serving.md).
"""

from __future__ import annotations

from gpumesh.v1 import types_pb2

KIND = "llama.cpp"
# llama_cpp.server with a Prometheus /metrics of its load (requests, KV use, tokens, time to first token)
SERVER_MODULE = "nodeagent.backends.llamacpp_server"
DEFAULT_CONTEXT = 2048
# the server's `api_key` setting (llama_cpp.server.settings.ServerSettings, a pydantic-settings BaseSettings:
# read from this variable when not on the command line); with it set, every /v1 route and /extras route
# answers 401 without `authorization: Bearer <key>` (our /metrics is not behind it)
API_KEY_ENV = "API_KEY"


def command(b: types_pb2.ServingBackend, host: str, port: int, python: str) -> list[str]:
    argv = [python, "-m", SERVER_MODULE, "--model", b.artifact, "--host", host, "--port", str(port),
            "--n_ctx", str(b.context or DEFAULT_CONTEXT),
            "--n_gpu_layers", str(b.gpu_layers if b.gpu_layers > 0 else -1),
            # llama-cpp-python's server otherwise ends a running stream (with [DONE], as if complete) when
            # another request arrives; the gateway already bounds each replica's concurrency
            "--interrupt_requests", "false"]
    if b.served_name:
        argv += ["--model_alias", b.served_name]
    return argv
