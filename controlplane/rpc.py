"""gRPC plumbing for the servicers: typed errors to statuses, and metrics."""

from __future__ import annotations

import functools
import inspect
import logging
import time

import grpc
from prometheus_client import Counter, Histogram

from mesh import errors, richstatus
from mesh.logs import log

logger = logging.getLogger(__name__)

REQUESTS = Counter("gpumesh_grpc_requests_total", "gRPC requests handled", ["method", "code"])
LATENCY = Histogram("gpumesh_grpc_request_seconds", "gRPC request latency", ["method"],
                    buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))


async def _abort(context, method: str, e: Exception):
    if isinstance(e, errors.MeshError):
        REQUESTS.labels(method, e.code.name).inc()
        await context.abort_with_status(richstatus.to_status(e))
    log(logger, logging.ERROR, "unexpected error", method=method, error=repr(e))
    logger.exception("unexpected error in %s", method)
    REQUESTS.labels(method, "INTERNAL").inc()
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}")


def unary(method):
    """Wrap a unary servicer method: MeshError -> rich status; count and time it."""
    name = method.__name__

    @functools.wraps(method)
    async def wrapper(self, request, context):
        t0 = time.perf_counter()
        try:
            out = await method(self, request, context)
            REQUESTS.labels(name, "OK").inc()
            return out
        except (errors.MeshError, ValueError, KeyError, RuntimeError, OSError) as e:
            await _abort(context, name, e)
        finally:
            LATENCY.labels(name).observe(time.perf_counter() - t0)
    return wrapper


def streaming(method):
    """Like `unary`, for server-streaming methods (async generators)."""
    name = method.__name__
    assert inspect.isasyncgenfunction(method)

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            async for item in method(self, request, context):
                yield item
            REQUESTS.labels(name, "OK").inc()
        except (errors.MeshError, ValueError, KeyError, RuntimeError, OSError) as e:
            await _abort(context, name, e)
    return wrapper
