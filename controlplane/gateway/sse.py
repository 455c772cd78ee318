"""Server-sent events from a backend, re-framed as OpenAI sends them (`data: <json>\\n\\n`, ending with
`data: [DONE]\\n\\n`): backends differ in line endings (sse-starlette writes \\r\\n) and send keep-alive
comments, which are dropped here. An event's data may span several `data:` lines (a pretty-printed JSON
object, say): as the SSE spec reads them, its data is those lines joined by a newline, and `frame` writes
such data back as one `data:` line per line, so the client reads the very same data."""

from __future__ import annotations


def _value(line: bytes) -> bytes | None:
    """The value of a `data` field line (one space after the colon is dropped, as the spec says); None for any
    other line (a comment, another field)."""
    if line == b"data":
        return b""
    if not line.startswith(b"data:"):
        return None
    value = line[5:]
    return value[1:] if value.startswith(b" ") else value


class EventReader:
    """Feed bytes, get the `data` payload of each complete event."""

    def __init__(self) -> None:
        self.buf = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        self.buf += chunk
        if b"\r" in self.buf:
            keep_cr = self.buf.endswith(b"\r")
            self.buf = self.buf.rstrip(b"\r") if keep_cr else self.buf
            self.buf = self.buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            if keep_cr:
                self.buf += b"\r"
        out = []
        while True:
            end = self.buf.find(b"\n\n")
            if end < 0:
                return out
            raw, self.buf = self.buf[:end], self.buf[end + 2:]
            data = _data(raw)
            if data is not None:
                out.append(data)


def _data(raw: bytes) -> bytes | None:
    """The data of one event's lines: its `data` values joined by a newline; None when it has none."""
    values = [v for v in map(_value, raw.split(b"\n")) if v is not None]
    return b"\n".join(values) if values else None


def data_of(event: bytes) -> bytes:
    """The data of one whole event as `frame` writes it (b"" when it has none)."""
    return _data(event.replace(b"\r\n", b"\n")) or b""


def frame(data: bytes) -> bytes:
    """One event carrying `data`: a `data:` line per line of it (a newline in a single `data:` line would end
    the field there, and the rest would read as a field of another name, which a client drops)."""
    return b"".join(b"data: " + line + b"\n" for line in data.split(b"\n")) + b"\n"


DONE = b"[DONE]"
