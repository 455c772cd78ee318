"""The HTTP API (Starlette on uvicorn): OpenAI-compatible routes, seed 003's /v1/gpu/*, seed 002's
/models, /predict, /policies, /metrics, and /healthz, /readyz. Every error is OpenAI's JSON shape."""

from __future__ import annotations

import asyncio
import json
import logging

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from controlplane.gateway import cost, gpuapi, modelsapi, validate
from controlplane.gateway import metrics as M
from controlplane.gateway.apierror import APIError
from controlplane.gateway.breaker import STATE_VALUE
from controlplane.gateway.service import Gateway
from mesh.logs import log

logger = logging.getLogger(__name__)
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def error_response(e: APIError) -> Response:
    # ASCII JSON: a message quoting the client's input can never fail to encode
    return Response(json.dumps(e.body()).encode(), status_code=e.status, media_type="application/json",
                    headers=e.headers)


async def _body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body ({declared} bytes) is larger than the limit of {limit} bytes "
                            f"(max_body_bytes)", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body is larger than the limit of {limit} bytes (max_body_bytes)",
                           code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def _unless_gone(request: Request, work):
    """Run the request path, cancelling it when the client disconnects first (a queued request leaves the
    queue, a backend call is abandoned, the slot is released)."""
    task = asyncio.ensure_future(work)

    async def gone():
        while (await request.receive())["type"] != "http.disconnect":
            pass
    watcher = asyncio.ensure_future(gone())
    try:
        done, _ = await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    try:
        await task
    except BaseException:
        pass
    raise ClientDisconnect()


def create_app(gw: Gateway) -> Starlette:
    def caller(request: Request):
        return gw.clients.caller(request.headers.get("authorization"))

    async def inference(request: Request, path: str | None = None, raw: bytes | None = None) -> Response:
        if raw is None:
            raw = await _body(request, gw.cfg.max_body_bytes)
        out = await _unless_gone(request, gw.handle(path or request.url.path, raw, request.headers))
        if out.stream is not None:
            return StreamingResponse(out.stream, media_type="text/event-stream",
                                     headers={**SSE_HEADERS, **out.headers})
        return Response(out.body, status_code=out.status, media_type="application/json", headers=out.headers)

    async def chat(request):
        return await inference(request, "/v1/chat/completions")

    async def completions(request):
        return await inference(request, "/v1/completions")

    async def predict(request):
        """Seed 002's /predict: a chat completion when the body has messages, else a completion."""
        raw = await _body(request, gw.cfg.max_body_bytes)
        is_chat = "messages" in validate.parse(raw)
        return await inference(request, "/v1/chat/completions" if is_chat else "/v1/completions", raw)

    async def v1_models(request):
        return JSONResponse(gpuapi.openai_models(gw, caller(request)))

    async def models(request):
        if request.method == "POST":
            raw = await _body(request, gw.cfg.max_body_bytes)
            return JSONResponse(await modelsapi.register(gw, caller(request), request.headers.get("authorization"),
                                                         raw), status_code=201)
        return JSONResponse({**gpuapi.models(gw, caller(request)),
                             **await modelsapi.registered(gw, request.headers.get("authorization"))})

    async def delete_model(request):
        return JSONResponse(await modelsapi.delete(gw, caller(request), request.headers.get("authorization"),
                                                   request.path_params["name"]))

    async def gpu_status(request):
        return JSONResponse(gpuapi.status(gw, caller(request)))

    async def gpu_forecast(request):
        return JSONResponse(await gpuapi.memory_forecast(gw, caller(request), request.query_params.get("hours")))

    async def gpu_optimal(request):
        return JSONResponse(gpuapi.models_optimal(gw, caller(request), request.query_params.get("agent_type")))

    async def gpu_rebalance(request):
        return JSONResponse(gpuapi.rebalance(gw, caller(request), request.query_params.get("apply")))

    async def gpu_benchmark(request):
        return JSONResponse(await gpuapi.benchmark_model(gw, caller(request), request.query_params.get("model_name"),
                                                         request.query_params.get("max_tokens")))

    async def policies(request):
        return JSONResponse(gpuapi.policies(gw, caller(request).tenant))

    async def metrics(request):
        if gw.cfg.metrics_auth == "admin" and gw.clients.enforced and caller(request).tenant is not None:
            raise APIError(403, "authorization: /metrics names every tenant's models: it needs an admin token "
                                "(metrics_auth: admin)", param="authorization", code="forbidden")
        for key, s in list(gw.stats.by_replica.items()):
            M.IN_FLIGHT.labels(key).set(s.in_flight)
            M.CIRCUIT.labels(key).set(STATE_VALUE[s.breaker.state])
            for state in list(s.by_state):
                M.FAILURE_PROBABILITY.labels(key, state).set(
                    s.failure_probability(state, cost.failure_prior(state, gw.cfg)))
        return Response(generate_latest(M.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    async def healthz(request):
        # no credentials here (a load balancer's probe): nothing about the tenants' deployments, not even a count
        return JSONResponse({"status": "ok", "view_connected": gw.view.connected, "policy": gw.policy.NAME})

    async def readyz(request):
        ok = gw.view.updated_at > 0 and not gw.draining
        return JSONResponse({"ready": ok, "view_connected": gw.view.connected, "draining": gw.draining},
                            status_code=200 if ok else 503)

    async def on_api_error(request, e: APIError):
        return error_response(e)

    async def on_http(request, e: HTTPException):
        msg = {404: f"{request.url.path} is not an endpoint of this gateway",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return error_response(APIError(e.status_code, msg, code="not_found" if e.status_code == 404 else
                                       "method_not_allowed" if e.status_code == 405 else None))

    async def on_disconnect(request, e: ClientDisconnect):
        return Response(status_code=499)

    async def on_any(request, e: Exception):
        log(logger, logging.ERROR, "unexpected error", path=request.url.path, error=repr(e))
        logger.exception("unexpected error on %s", request.url.path)
        return error_response(APIError(500, f"internal error: {type(e).__name__}", code="internal_error"))

    routes = [
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", v1_models, methods=["GET"]),
        Route("/v1/gpu/status", gpu_status, methods=["GET"]),
        Route("/v1/gpu/memory-forecast", gpu_forecast, methods=["GET"]),
        Route("/v1/gpu/models-optimal", gpu_optimal, methods=["GET"]),
        Route("/v1/gpu/rebalance", gpu_rebalance, methods=["POST"]),
        Route("/v1/gpu/benchmark-model", gpu_benchmark, methods=["POST"]),
        Route("/models", models, methods=["GET", "POST"]),
        Route("/models/{name:path}", delete_model, methods=["DELETE"]),
        Route("/predict", predict, methods=["POST"]),
        Route("/policies", policies, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={APIError: on_api_error, HTTPException: on_http,
                                                        ClientDisconnect: on_disconnect, Exception: on_any})
