"""Errors in OpenAI's JSON shape: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

from __future__ import annotations

import json

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
         415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
         500: "server_error", 502: "server_error", 503: "server_error", 504: "server_error"}


class APIError(Exception):
    """An answer that is an error: status, OpenAI error body, extra headers."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, type_: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}
        self.type = type_ or TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def sse(self) -> bytes:
        """The error as a server-sent event (a stream broken after tokens were sent)."""
        return b"data: " + json.dumps(self.body()).encode() + b"\n\n"


def invalid(param: str, problem: str, allowed: str = "") -> APIError:
    text = f"{param}: {problem}" + (f" (allowed: {allowed})" if allowed else "")
    return APIError(400, text, param=param, code="invalid_value")
