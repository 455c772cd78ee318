"""A gRPC channel over several control planes (HA), for the synchronous SDK.

    channel = FailoverChannel(["cp-1:7070", "cp-2:7070"], make_channel)

Unary calls that fail with UNAVAILABLE move to the next endpoint (or straight
to the one a standby names in its `gpumesh-leader` trailing metadata) and are
tried again until the call's deadline:

- always when a standby refused the call (it did not run it);
- otherwise only for calls that are safe to repeat: reads, and writes that are
  idempotent on the server (Allocate carries a request_id, which the SDK sets
  itself, so a retry returns the allocation the first attempt made).

Streaming calls go to the endpoint that answered last (a stream is not
replayed); their callers re-open them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import grpc

LEADER_METADATA = "gpumesh-leader"
STANDBY_METADATA = "gpumesh-standby"
# Method-name prefixes that are safe to send twice.
IDEMPOTENT = ("Get", "List", "Watch", "Check", "Describe", "Top", "Allocate", "Release", "Cordon", "Uncordon",
              "Drain", "Health", "Stats", "Logs")
_DEFAULT_DEADLINE = 30.0


def split_endpoints(endpoint: str | list[str]) -> list[str]:
    items = endpoint if isinstance(endpoint, (list, tuple)) else str(endpoint).split(",")
    out = [e.strip() for e in items if e and e.strip()]
    if not out:
        raise ValueError("endpoint: at least one HOST:PORT is needed")
    return out


def pick_leader(hint: str, endpoints: list[str]) -> int:
    """Which of `endpoints` the leader named in `hint` is (-1: none). A leader advertises every
    endpoint it serves, comma-separated (its token port and its mTLS port): a caller dials the one
    it was given."""
    for cand in hint.split(","):
        cand = cand.strip()
        if cand and cand in endpoints:
            return endpoints.index(cand)
    return -1


def _metadata(err: grpc.RpcError) -> dict[str, str]:
    """The text entries of `err`'s trailing metadata. Binary entries (keys ending "-bin", such as the
    rich status details `grpc-status-details-bin` a long UNAVAILABLE message carries) are left out:
    their bytes are protobuf, not UTF-8."""
    try:
        md = err.trailing_metadata() or ()
    except Exception:  # noqa: BLE001 - some error objects carry none
        md = ()
    return {k: (v if isinstance(v, str) else v.decode("utf-8", "replace"))
            for k, v in md if not k.endswith("-bin")}


class FailoverChannel(grpc.Channel):
    def __init__(self, endpoints: list[str], make_channel: Callable[[str], grpc.Channel]) -> None:
        self.endpoints = list(endpoints)
        self.channels = [make_channel(e) for e in self.endpoints]
        self.current = 0
        self.failovers = 0
        self._lock = threading.Lock()

    # -- choosing the endpoint ------------------------------------------------------------

    def channel(self) -> grpc.Channel:
        return self.channels[self.current]

    def moved(self, tried: int, err: grpc.RpcError) -> None:
        """`tried` failed with `err`: go to the leader it names, else to the next endpoint."""
        leader = _metadata(err).get(LEADER_METADATA, "")
        with self._lock:
            if self.current != tried:
                return          # another thread moved already
            at = pick_leader(leader, self.endpoints)
            if at >= 0 and at != tried:
                self.current = at
            else:
                self.current = (tried + 1) % len(self.channels)
            self.failovers += 1

    # -- grpc.Channel ---------------------------------------------------------------------

    def unary_unary(self, method, request_serializer=None, response_deserializer=None, _registered_method=False):
        return _UnaryUnary(self, method, request_serializer, response_deserializer)

    def unary_stream(self, method, request_serializer=None, response_deserializer=None, _registered_method=False):
        return _Current(self, "unary_stream", method, request_serializer, response_deserializer)

    def stream_unary(self, method, request_serializer=None, response_deserializer=None, _registered_method=False):
        return _Current(self, "stream_unary", method, request_serializer, response_deserializer)

    def stream_stream(self, method, request_serializer=None, response_deserializer=None, _registered_method=False):
        return _Current(self, "stream_stream", method, request_serializer, response_deserializer)

    def subscribe(self, callback, try_to_connect=False):
        self.channel().subscribe(callback, try_to_connect)

    def unsubscribe(self, callback):
        for ch in self.channels:
            try:
                ch.unsubscribe(callback)
            except (KeyError, ValueError):
                pass

    def close(self):
        for ch in self.channels:
            ch.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class _Current:
    """A streaming multi-callable on whichever endpoint is current when it is called."""

    def __init__(self, fc: FailoverChannel, kind: str, method, ser, deser) -> None:
        self.fc, self.kind, self.method, self.ser, self.deser = fc, kind, method, ser, deser

    def _callable(self):
        return getattr(self.fc.channel(), self.kind)(self.method, self.ser, self.deser)

    def __call__(self, *args, **kwargs):
        return self._callable()(*args, **kwargs)

    def with_call(self, *args, **kwargs):
        return self._callable().with_call(*args, **kwargs)

    def future(self, *args, **kwargs):
        return self._callable().future(*args, **kwargs)


class _UnaryUnary(grpc.UnaryUnaryMultiCallable):
    def __init__(self, fc: FailoverChannel, method, ser, deser) -> None:
        self.fc, self.method, self.ser, self.deser = fc, method, ser, deser
        name = method.decode() if isinstance(method, bytes) else str(method)
        self.idempotent = name.rsplit("/", 1)[-1].startswith(IDEMPOTENT)

    def _retryable(self, err: grpc.RpcError) -> bool:
        if err.code() != grpc.StatusCode.UNAVAILABLE or len(self.fc.channels) < 2:
            return False
        return self.idempotent or STANDBY_METADATA in _metadata(err)

    def with_call(self, request, timeout=None, metadata=None, credentials=None, wait_for_ready=None,
                  compression=None):
        deadline = time.monotonic() + (timeout if timeout is not None else _DEFAULT_DEADLINE)
        pause, tries = 0.05, 0
        while True:
            tried = self.fc.current
            remaining = deadline - time.monotonic()
            try:
                return self.fc.channels[tried].unary_unary(self.method, self.ser, self.deser).with_call(
                    request, timeout=max(remaining, 0.001), metadata=metadata, credentials=credentials,
                    wait_for_ready=wait_for_ready, compression=compression)
            except grpc.RpcError as err:
                if not self._retryable(err) or deadline - time.monotonic() <= pause:
                    raise
                self.fc.moved(tried, err)
                tries += 1
                if tries % len(self.fc.channels) == 0:
                    # a whole round failed (an election is under way): wait a little before the next
                    time.sleep(pause)
                    pause = min(pause * 2, 1.0)

    def __call__(self, request, timeout=None, metadata=None, credentials=None, wait_for_ready=None,
                 compression=None):
        return self.with_call(request, timeout, metadata, credentials, wait_for_ready, compression)[0]

    def future(self, request, timeout=None, metadata=None, credentials=None, wait_for_ready=None,
               compression=None):
        return self.fc.channel().unary_unary(self.method, self.ser, self.deser).future(
            request, timeout=timeout, metadata=metadata, credentials=credentials,
            wait_for_ready=wait_for_ready, compression=compression)
