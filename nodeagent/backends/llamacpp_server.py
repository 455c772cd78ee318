"""llama-cpp-python's OpenAI-compatible server with load metrics: `python -m nodeagent.backends.llamacpp_server
ARGS` takes exactly `python -m llama_cpp.server`'s arguments and serves the same API, plus `GET /metrics`.

llama-cpp-python's server exposes no load at all (no /metrics, no /health). llama.cpp's own C++ server
(`llama-server --metrics`) does, and this wrapper exposes the same names in the Prometheus text format
(prometheus_client), so the agent reads both with one parser (nodeagent/backends/loadsignals.py):

| metric | meaning here |
| --- | --- |
| `llamacpp:requests_processing` | 1 while a request holds the model (the server decodes one at a time), else 0 |
| `llamacpp:requests_deferred` | completion requests received and not yet holding the model |
| `llamacpp:kv_cache_usage_ratio` | tokens in the context (prompt + generated, kept for prefix reuse) over `n_ctx` |
| `llamacpp:kv_cache_tokens` | those tokens |
| `llamacpp:prompt_tokens_total` | prompt tokens of every generation (cached prefixes included) |
| `llamacpp:tokens_predicted_total` | generated tokens |
| `llamacpp:time_to_first_token_seconds` | histogram (vLLM's buckets), gpumesh's addition: from the request's |
|  | arrival to its first generated token, queueing included |

The counts come from wrapping `Llama.generate` (the generator every completion and chat completion
runs through) in this process; nothing else of the server changes. The agent runs this module instead
of `llama_cpp.server` (nodeagent/backends/llamacpp.py).
"""

from __future__ import annotations

import contextvars
import time

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest

COMPLETION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/engines/copilot-codex/completions"})
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)        # vLLM's time_to_first_token_seconds buckets

ARRIVED: contextvars.ContextVar[float] = contextvars.ContextVar("gpumesh_request_arrived", default=0.0)
PROMPT = Counter("llamacpp:prompt_tokens", "Number of prompt tokens processed.")
PREDICTED = Counter("llamacpp:tokens_predicted", "Number of generation tokens processed.")
TTFT = Histogram("llamacpp:time_to_first_token_seconds",
                 "Time from a completion request's arrival to its first generated token, seconds.",
                 buckets=TTFT_BUCKETS)
INFLIGHT = {"n": 0}


class CountRequests:
    """ASGI middleware: counts the completion requests in flight and stamps their arrival (a context
    variable the generation reads, in the worker thread the server runs it in)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http" or scope.get("path") not in COMPLETION_PATHS:
            return await self.app(scope, receive, send)
        INFLIGHT["n"] += 1
        token = ARRIVED.set(time.monotonic())
        try:
            return await self.app(scope, receive, send)
        finally:
            INFLIGHT["n"] -= 1
            ARRIVED.reset(token)


def _model():
    from llama_cpp.server import app as server_app
    proxy = getattr(server_app, "_llama_proxy", None)
    return getattr(proxy, "_current_model", None)


def _processing() -> float:
    from llama_cpp.server import app as server_app
    return 1.0 if server_app.llama_inner_lock.locked() else 0.0


def _kv_tokens() -> float:
    m = _model()
    return float(m.n_tokens) if m is not None else 0.0


def _kv_ratio() -> float:
    m = _model()
    if m is None or not m.n_ctx():
        return 0.0
    return min(1.0, m.n_tokens / m.n_ctx())


Gauge("llamacpp:requests_processing", "Requests holding the model (0 or 1).").set_function(_processing)
Gauge("llamacpp:requests_deferred", "Completion requests waiting for the model.").set_function(
    lambda: float(max(0, INFLIGHT["n"] - int(_processing()))))
Gauge("llamacpp:kv_cache_usage_ratio", "Tokens in the context over its size (0 to 1).").set_function(_kv_ratio)
Gauge("llamacpp:kv_cache_tokens", "Tokens in the context.").set_function(_kv_tokens)


def counted_generate(orig):
    """`Llama.generate`, counting prompt tokens, generated tokens and the time to the first one."""

    def generate(self, tokens, *args, **kwargs):
        tokens = list(tokens)
        PROMPT.inc(len(tokens))
        start = ARRIVED.get() or time.monotonic()
        it = orig(self, tokens, *args, **kwargs)
        first, sent = True, None
        try:
            while True:
                try:
                    tok = next(it) if sent is None else it.send(sent)
                except StopIteration:
                    return
                if first:
                    TTFT.observe(time.monotonic() - start)
                    first = False
                PREDICTED.inc()
                sent = yield tok
        finally:
            it.close()
    generate.__wrapped__ = orig
    return generate


def with_metrics(create_app):
    def create(*args, **kwargs):
        from fastapi.responses import Response
        app = create_app(*args, **kwargs)
        app.add_middleware(CountRequests)

        @app.get("/metrics", include_in_schema=False)
        async def metrics() -> Response:
            return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
        return app
    return create


def main() -> None:
    import llama_cpp
    from llama_cpp.server import __main__ as server_main
    llama_cpp.Llama.generate = counted_generate(llama_cpp.Llama.generate)
    server_main.create_app = with_metrics(server_main.create_app)
    server_main.main()


if __name__ == "__main__":
    main()
