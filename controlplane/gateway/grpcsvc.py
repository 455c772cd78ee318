"""InferenceService.Generate over gRPC (proto/gpumesh/v1/inference_service.proto): the same request path
as the HTTP API (authentication, validation, routing, queue, fallback, retry), streaming the text."""

from __future__ import annotations

import asyncio
import json

import grpc

from controlplane.gateway.apierror import APIError
from controlplane.gateway import validate
from controlplane.gateway.sse import DONE, data_of
from gpumesh.v1 import inference_service_pb2 as I
from gpumesh.v1 import inference_service_pb2_grpc

CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
         403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND, 409: grpc.StatusCode.FAILED_PRECONDITION,
         412: grpc.StatusCode.FAILED_PRECONDITION, 413: grpc.StatusCode.INVALID_ARGUMENT,
         422: grpc.StatusCode.INVALID_ARGUMENT, 429: grpc.StatusCode.RESOURCE_EXHAUSTED, 499: grpc.StatusCode.CANCELLED,
         501: grpc.StatusCode.UNIMPLEMENTED, 502: grpc.StatusCode.UNAVAILABLE, 503: grpc.StatusCode.UNAVAILABLE,
         504: grpc.StatusCode.DEADLINE_EXCEEDED}


def grpc_code(status: int) -> grpc.StatusCode:
    """The gRPC code of an HTTP status (the same request path answers both); other 4xx are the caller's."""
    if status in CODES:
        return CODES[status]
    return grpc.StatusCode.INVALID_ARGUMENT if 400 <= status < 500 else grpc.StatusCode.INTERNAL


def to_body(req: I.GenerateRequest) -> tuple[str, dict]:
    # the usage asked for: the last message's token counts are the server's own where it sends them (vLLM);
    # llama-cpp-python's server ignores stream_options and sends none (prompt_tokens is then left unset)
    body: dict = {"model": req.model, "stream": True, "max_tokens": req.max_tokens or 16,
                  "temperature": round(float(req.temperature), 6), "stream_options": {"include_usage": True}}
    if req.has_seed:
        body["seed"] = req.seed
    validate.priority(req.priority, "standard", field="priority")      # named as this call's field
    if req.messages and req.prompt:
        raise APIError(400, "prompt: give exactly one of prompt, messages", param="prompt")
    if req.messages:
        body["messages"] = [{"role": m.role, "content": m.content} for m in req.messages]
        return "/v1/chat/completions", body
    body["prompt"] = req.prompt
    return "/v1/completions", body


class StreamBroken(Exception):
    """The backend's stream ended with an error event after output was sent."""

    def __init__(self, message: str, completion: int) -> None:
        super().__init__(message)
        self.message, self.completion = message, completion


class InferenceService(inference_service_pb2_grpc.InferenceServiceServicer):
    def __init__(self, gw) -> None:
        self.gw = gw

    async def Generate(self, request, context):
        md = {k.lower(): v for k, v in context.invocation_metadata()}
        headers = {"authorization": md.get("authorization")}
        if request.priority:
            headers["x-gpumesh-priority"] = request.priority
        if request.allow_fallback:
            headers["x-gpumesh-allow-fallback"] = "true"
        try:
            path, body = to_body(request)
            out = await self.gw.handle(path, json.dumps(body).encode(), headers)
        except APIError as e:
            await context.abort(grpc_code(e.status), e.message)
            return
        served, degraded = out.headers.get("x-gpumesh-served-by", ""), out.headers.get("x-gpumesh-degraded", "")
        try:
            async for item in self._chunks(out, served, degraded):
                yield item
        except StreamBroken as e:
            yield I.GenerateResponse(finish_reason="error", served_by=served, degraded=degraded, text=e.message,
                                     completion_tokens=e.completion)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the stream broke after {e.completion} chunk(s): "
                                                             f"{e.message}")
        finally:
            await out.stream.aclose()          # a cancelled call releases its replica slot at once

    async def _chunks(self, out, served: str, degraded: str):
        finish, completion, usage = "", 0, {}
        async for event in out.stream:
            data = data_of(event)              # an event whose data has several lines has several `data:` lines
            if data == DONE:
                continue                       # drain the relay: it measures and logs after [DONE]
            try:
                doc = json.loads(data)
            except ValueError:
                doc = None
            if not isinstance(doc, dict):
                raise StreamBroken(f"the backend sent an event that is not a JSON object: {data[:80]!r}", completion)
            if "error" in doc:
                # the partial output went out; the call itself fails, so a client that checks only the
                # status never takes a cut answer for a whole one
                err = doc["error"]
                raise StreamBroken(str(err.get("message", "") if isinstance(err, dict) else err)[:1000], completion)
            usage = _usage(doc.get("usage")) or usage
            choices = doc.get("choices")
            for ch in choices if isinstance(choices, list) else ():
                if not isinstance(ch, dict):
                    continue
                delta = ch.get("delta") if isinstance(ch.get("delta"), dict) else {}
                text = ch.get("text") or delta.get("content") or ""
                reason = ch.get("finish_reason")
                finish = reason[:64] if isinstance(reason, str) and reason else finish
                if text and isinstance(text, str):
                    completion += 1
                    yield I.GenerateResponse(text=text, served_by=served, degraded=degraded)
        # no usage (llama.cpp): the prompt's count is unknown, left unset rather than reported as 0
        yield I.GenerateResponse(finish_reason=finish or "stop", served_by=served, degraded=degraded,
                                 completion_tokens=usage.get("completion_tokens", completion),
                                 **{k: v for k, v in usage.items() if k == "prompt_tokens"})


def _usage(u) -> dict:
    """The counts of an event's `usage` that are whole numbers in the proto's range (a backend's odd value
    is no count)."""
    if not isinstance(u, dict):
        return {}
    return {k: u[k] for k in ("prompt_tokens", "completion_tokens")
            if type(u.get(k)) is int and 0 <= u[k] < 2 ** 31}


async def set_serving(gw, serving: bool) -> None:
    """The gRPC health status of the gateway (the empty service name and InferenceService)."""
    from grpc_health.v1 import health_pb2
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", I.DESCRIPTOR.services_by_name["InferenceService"].full_name):
        await gw.grpc_health.set(name, status)


async def start_grpc(gw, listen: str, cert: str = "", key: str = "") -> grpc.aio.Server:
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection
    server = grpc.aio.server()
    inference_service_pb2_grpc.add_InferenceServiceServicer_to_server(InferenceService(gw), server)
    h = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(h, server)
    gw.grpc_health = h
    # NOT_SERVING until the first view of the fleet (every model would read as unknown before it)
    await set_serving(gw, gw.view.updated_at > 0)
    if not gw.view.updated_at:
        def on_view():
            if gw.view.updated_at and on_view in gw.view.listeners:
                gw.view.listeners.remove(on_view)
                if not gw.draining:         # a SIGTERM before the first view: stays NOT_SERVING
                    asyncio.get_running_loop().create_task(set_serving(gw, True))
        gw.view.listeners.append(on_view)
    reflection.enable_server_reflection([I.DESCRIPTOR.services_by_name["InferenceService"].full_name,
                                         reflection.SERVICE_NAME], server)
    if cert:
        with open(cert, "rb") as c, open(key, "rb") as k:
            creds = grpc.ssl_server_credentials([(k.read(), c.read())])
        port = server.add_secure_port(listen, creds)
    else:
        port = server.add_insecure_port(listen)
    await server.start()
    gw.grpc_port = port
    return server
