"""Server-sent events from a backend, re-framed as OpenAI sends them (`data: <json>\\n\\n`, ending with
`data: [DONE]\\n\\n`): backends differ in line endings (sse-starlette writes \\r\\n) and send keep-alive
comments, which are dropped here."""

from __future__ import annotations


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
            data = [line[5:].lstrip(b" ") if line.startswith(b"data:") else None for line in raw.split(b"\n")]
            lines = [d for d in data if d is not None]
            if lines:
                out.append(b"\n".join(lines))


def frame(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"


DONE = b"[DONE]"
