"""gRPC plumbing for the servicers: typed errors to statuses, metrics, and unparseable requests.

Metrics carry the service and the method (`SliceService`/`Get` and `MeshService`/`Get` are two
series). `DecodeGuard` is the server's outermost interceptor: it wraps every handler's request
deserializer, so request bytes that are not a valid protobuf message of the method's type are
answered INVALID_ARGUMENT naming the method, instead of grpc's UNKNOWN ("Unexpected <class
'google.protobuf.message.DecodeError'>").
"""

from __future__ import annotations

import functools
import inspect
import logging
import time

import grpc
from google.protobuf.message import DecodeError
from prometheus_client import Counter, Histogram

from mesh import errors, richstatus
from mesh.logs import log

logger = logging.getLogger(__name__)

REQUESTS = Counter("gpumesh_grpc_requests_total", "gRPC requests handled", ["service", "method", "code"])
LATENCY = Histogram("gpumesh_grpc_request_seconds", "gRPC request latency", ["service", "method"],
                    buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))


def split_method(full: str) -> tuple[str, str]:
    """'/gpumesh.v1.SliceService/Get' -> ('SliceService', 'Get')."""
    service, _, method = full.lstrip("/").rpartition("/")
    return service.rpartition(".")[2], method


def count(full_method: str, code: str) -> None:
    service, method = split_method(full_method)
    REQUESTS.labels(service, method, code).inc()


async def _abort(context, service: str, method: str, e: Exception):
    if isinstance(e, errors.MeshError):
        REQUESTS.labels(service, method, e.code.name).inc()
        await context.abort_with_status(richstatus.to_status(e))
    log(logger, logging.ERROR, "unexpected error", service=service, method=method, error=repr(e))
    logger.exception("unexpected error in %s.%s", service, method)
    REQUESTS.labels(service, method, "INTERNAL").inc()
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}")


def _service_of(servicer) -> str:
    """The gRPC service a servicer object implements (its class is named after it)."""
    for cls in type(servicer).__mro__:
        if cls.__name__.endswith("Servicer") and cls.__module__.endswith("_pb2_grpc"):
            return cls.__name__[:-len("Servicer")]
    return type(servicer).__name__


def unary(method):
    """Wrap a unary servicer method: MeshError -> rich status; count and time it."""
    name = method.__name__

    @functools.wraps(method)
    async def wrapper(self, request, context):
        service = _service_of(self)
        t0 = time.perf_counter()
        try:
            out = await method(self, request, context)
            REQUESTS.labels(service, name, "OK").inc()
            return out
        except (errors.MeshError, ValueError, KeyError, RuntimeError, OSError) as e:
            await _abort(context, service, name, e)
        finally:
            LATENCY.labels(service, name).observe(time.perf_counter() - t0)
    return wrapper


def streaming(method):
    """Like `unary`, for server-streaming methods (async generators)."""
    name = method.__name__
    assert inspect.isasyncgenfunction(method)

    @functools.wraps(method)
    async def wrapper(self, request, context):
        service = _service_of(self)
        try:
            async for item in method(self, request, context):
                yield item
            REQUESTS.labels(service, name, "OK").inc()
        except (errors.MeshError, ValueError, KeyError, RuntimeError, OSError) as e:
            await _abort(context, service, name, e)
    return wrapper


# -- requests that do not parse ----------------------------------------------------------------

class Malformed:
    """What the guarded deserializer returns for bytes that are not a message of the method's type."""

    __slots__ = ("method", "why")

    def __init__(self, method: str, why: str) -> None:
        self.method = method
        self.why = why

    def message(self) -> str:
        return (f"{self.method}: the request message could not be parsed ({self.why}); send a valid serialized "
                f"protobuf message of the method's request type")


def _guarded(deserialize, method: str):
    if deserialize is None:
        return None

    def parse(data: bytes):
        try:
            return deserialize(data)
        except (DecodeError, RecursionError, ValueError, TypeError, UnicodeDecodeError) as e:
            return Malformed(method, f"{type(e).__name__}: {str(e)[:200]}" if str(e) else type(e).__name__)
    return parse


class DecodeGuard(grpc.aio.ServerInterceptor):
    """Outermost interceptor: unparseable request bytes -> INVALID_ARGUMENT naming the method."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method

        async def refuse(bad: Malformed, context):
            count(method, "INVALID_ARGUMENT")
            log(logger, logging.WARNING, "malformed request", method=method, error=bad.why)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, bad.message())

        def checked_iterator(it, context):
            async def gen():
                async for msg in it:
                    if isinstance(msg, Malformed):
                        await refuse(msg, context)
                    yield msg
            return gen()

        kw = dict(request_deserializer=_guarded(handler.request_deserializer, method),
                  response_serializer=handler.response_serializer)
        if handler.unary_unary:
            behavior = handler.unary_unary

            async def uu(request, context):
                if isinstance(request, Malformed):
                    await refuse(request, context)
                return await behavior(request, context)
            return grpc.unary_unary_rpc_method_handler(uu, **kw)
        if handler.unary_stream:
            behavior = handler.unary_stream

            if inspect.isasyncgenfunction(behavior):
                async def us(request, context):
                    if isinstance(request, Malformed):
                        await refuse(request, context)
                    async for item in behavior(request, context):
                        yield item
            else:
                async def us(request, context):
                    if isinstance(request, Malformed):
                        await refuse(request, context)
                    return await behavior(request, context)
            return grpc.unary_stream_rpc_method_handler(us, **kw)
        if handler.stream_unary:
            behavior = handler.stream_unary

            async def su(it, context):
                return await behavior(checked_iterator(it, context), context)
            return grpc.stream_unary_rpc_method_handler(su, **kw)
        behavior = handler.stream_stream
        if inspect.isasyncgenfunction(behavior):
            async def ss(it, context):
                async for item in behavior(checked_iterator(it, context), context):
                    yield item
        else:
            async def ss(it, context):
                return await behavior(checked_iterator(it, context), context)
        return grpc.stream_stream_rpc_method_handler(ss, **kw)
