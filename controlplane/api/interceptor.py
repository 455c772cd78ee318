"""The gRPC interceptor that authenticates and authorizes every RPC before its servicer runs
(controlplane/api/auth.py decides who the caller is and what it may call), and sets `auth.current()` for it.

Unary and streaming calls alike: a request stream is checked as it arrives, so an agent's `hello` naming
another node is refused (PERMISSION_DENIED) before the servicer reads it.
"""

from __future__ import annotations

import inspect
import logging

import grpc

from controlplane.api.auth import PUBLIC, Authenticator, Principal, _current, check_node, denial, rule_for
from mesh import errors
from mesh.logs import log

logger = logging.getLogger("controlplane.api.auth")


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates and authorizes every RPC before its servicer runs; sets `current()` for it."""

    def __init__(self, authenticator: Authenticator) -> None:
        self.auth = authenticator

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        method = details.method
        rule = rule_for(method)
        if handler is None or rule == PUBLIC or not self.auth.enforce:
            return handler
        admit = self._admit

        def wrap_request_iterator(it, context):
            async def checked():
                async for msg in it:
                    hello = getattr(msg, "hello", None) if msg.WhichOneof("kind") == "hello" else None
                    if hello is not None:
                        try:
                            check_node(hello.node_name)
                        except errors.PermissionDenied as e:
                            _count(method, e.code)
                            await context.abort(e.code, e.message)
                    yield msg
            return checked()

        def unary_in(behavior, streaming_out):
            if streaming_out:
                async def gen(request, context):
                    token = _current.set(await admit(method, request, context))
                    try:
                        async for item in behavior(request, context):
                            yield item
                    finally:
                        _current.reset(token)
                return gen

            async def call(request, context):
                token = _current.set(await admit(method, request, context))
                try:
                    return await behavior(request, context)
                finally:
                    _current.reset(token)
            return call

        def stream_in(behavior, streaming_out):
            if streaming_out and inspect.isasyncgenfunction(behavior):
                async def gen(it, context):
                    token = _current.set(await admit(method, None, context))
                    try:
                        async for item in behavior(wrap_request_iterator(it, context), context):
                            yield item
                    finally:
                        _current.reset(token)
                return gen

            async def call(it, context):
                token = _current.set(await admit(method, None, context))
                try:
                    return await behavior(wrap_request_iterator(it, context), context)
                finally:
                    _current.reset(token)
            return call

        kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(unary_in(handler.unary_unary, False), **kw)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(unary_in(handler.unary_stream, True), **kw)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(stream_in(handler.stream_unary, False), **kw)
        return grpc.stream_stream_rpc_method_handler(stream_in(handler.stream_stream, True), **kw)

    async def _admit(self, method: str, request, context) -> Principal:
        try:
            p = self.auth.principal(context)
        except errors.Unauthenticated as e:
            _count(method, e.code)
            await context.abort(e.code, e.message)
        why = denial(rule_for(method), p, method)
        if why is None and p.kind == "agent" and request is not None and hasattr(request, "node_name"):
            if request.node_name != p.name:
                why = f"agent certificate {p.name!r} may not speak for node {request.node_name!r}"
        if why is not None:
            code = grpc.StatusCode.UNAUTHENTICATED if p.kind == "anonymous" else grpc.StatusCode.PERMISSION_DENIED
            _count(method, code)
            log(logger, logging.WARNING, "unauthenticated" if p.kind == "anonymous" else "permission denied",
                method=method, principal=str(p), reason=why)
            await context.abort(code, why)
        return p


def _count(method: str, code: grpc.StatusCode) -> None:
    from controlplane.api.rpc import count
    count(method, code.name)
