"""One transfer stream's frames on the receiving side: taken off the gRPC stream with a limit on the wait
for each (`_Reader`: the idle timeout between frames), then opened, validated and applied to the session in
order (`_Pipeline`) on helper threads. The server (mesh/checkpoint/transfer_recv.py) runs one of each per
stream; the session is mesh/checkpoint/transfer_session.py."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from struct import error as struct_error
from typing import Any

import grpc

from mesh.checkpoint.format import EntryMeta, FormatError, Manifest
from mesh.checkpoint.transfer_auth import Channel, TransferAuthError
from mesh.checkpoint.transfer_session import ReceiveSession, _Abort, _RecvEntry
from mesh.checkpoint.transfer_wire import unframe


class _Idle(Exception):
    """No message within the idle timeout."""


class _Reader:
    """Takes a stream's messages on a helper thread, so that the handler waits for each with a limit
    (`next`): a sync gRPC request iterator takes none, and only the handler's thread can answer the
    stream a status (context.abort)."""

    _END = object()

    def __init__(self, requests: Iterator[bytes], name: str) -> None:
        self.requests = requests
        self.q: queue.Queue[Any] = queue.Queue(maxsize=1)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"transfer-read-{name}")
        self.thread.start()

    def next(self, timeout: float) -> bytes | None:
        """The next message, None at the stream's end; raises _Idle when none came within `timeout`
        seconds, or the stream's own error."""
        try:
            item = self.q.get(timeout=timeout)
        except queue.Empty:
            raise _Idle() from None
        if item is self._END:
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    def stop(self) -> None:
        """The handler is done: whatever still comes is dropped (the thread ends with the stream)."""
        self.stopped.set()

    def _run(self) -> None:
        try:
            for msg in self.requests:
                if not self._put(msg):
                    return
            self._put(self._END)
        except BaseException as exc:   # noqa: BLE001 - handed to the stream's handler
            self._put(exc)

    def _put(self, item: Any) -> bool:
        while not self.stopped.is_set():
            try:
                self.q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False


class _Pipeline:
    """Processes one stream's frames in order on a helper thread, so the stream's handler takes
    the next message while this one is checked (the hashing releases the GIL) and copied into
    its target. The first error stops it and is raised to the handler by `put` or `finish`."""

    DEPTH = 4

    def __init__(self, session: ReceiveSession, ring: Any, channel: Channel) -> None:
        self.session, self.ring, self.channel = session, ring, channel
        self.cur: _RecvEntry | None = None
        self.error: BaseException | None = None
        self.q: queue.Queue[Any] = queue.Queue(maxsize=self.DEPTH)
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"transfer-recv-{session.session}")
        self.thread.start()

    def put(self, msg: bytes) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.q.put(msg, timeout=0.1)
                return
            except queue.Full:
                if not self.thread.is_alive() and self.error is None:
                    raise _Abort(grpc.StatusCode.INTERNAL, "the transfer pipeline ended")

    def finish(self) -> None:
        while self.thread.is_alive():
            try:
                self.q.put(None, timeout=0.1)
                break
            except queue.Full:
                continue
        self.thread.join()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        if self.thread.is_alive():
            self.error = self.error or _Abort(grpc.StatusCode.CANCELLED, "stream ended")
            try:
                self.q.put_nowait(None)
            except queue.Full:
                pass
            self.thread.join(30)

    def _run(self) -> None:
        while True:
            msg = self.q.get()
            if msg is None or self.error is not None:
                return
            try:
                self._frame(msg)
            except (KeyError, ValueError, TypeError, OverflowError, struct_error) as exc:
                # a field missing or of another type, a number JSON spells as Infinity: the sender's fault, said
                # so (INVALID_ARGUMENT), never an UNKNOWN error of the server
                self.error = _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed frame: {exc!r}")
                return
            except BaseException as exc:   # noqa: BLE001 - handed to the stream's handler
                self.error = exc
                return

    def _frame(self, msg: bytes) -> None:
        session, ring = self.session, self.ring
        try:
            h, data = unframe(self.channel.open(msg))     # opened first: nothing of a forged frame is used
        except TransferAuthError as exc:
            raise _Abort(grpc.StatusCode.DATA_LOSS, str(exc)) from None
        except (ValueError, TypeError, UnicodeDecodeError, struct_error) as exc:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed frame: {exc}") from None
        kind = h.get("t") if isinstance(h, dict) else None
        if kind == "chunk":
            if self.cur is None:
                raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, "chunk before begin")
            if "slot" in h:
                if ring is None:
                    raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, "chunk in a ring slot, no ring")
                try:
                    session.chunk(self.cur, h, ring.take(int(h["slot"]), int(h["n"])))
                except ValueError as exc:
                    raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
                finally:
                    ring.release(int(h["slot"]))
            else:
                session.chunk(self.cur, h, data)
        elif kind == "begin":
            try:
                meta = EntryMeta.from_json(h["meta"])
            except FormatError as exc:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
            self.cur = session.begin(meta, int(h["gen"]), int(h["offset"]),
                                     h.get("algo", "sha256"), h.get("check", ""))
        elif kind == "end":
            if self.cur is None:
                raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, "end before begin")
            session.end(self.cur, h["checksum"])
            self.cur = None
        elif kind == "commit":
            try:
                manifest = Manifest.from_json(h["manifest"])
            except FormatError as exc:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
            session.commit(manifest)
        else:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown frame {kind!r}")
