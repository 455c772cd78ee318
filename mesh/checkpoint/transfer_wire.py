"""The transfer channel's wire: frames (4-byte header length, JSON header, payload), the
service name and message limits, `TransferError`. See mesh/checkpoint/transfer.py."""

from __future__ import annotations

import json
import struct
from typing import Any

from mesh.checkpoint.format import CheckpointError

SERVICE = "gpumesh.checkpoint.v1.Transfer"
PUSH = f"/{SERVICE}/Push"
MAX_MESSAGE = 64 << 20
GRPC_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]

KEEPALIVE_S = 30
"""both ends ping the other this often while a stream is open (also while it carries no data: a stalled
stream is the one whose peer may have vanished without a FIN or RST)..."""
KEEPALIVE_TIMEOUT_S = 10
"""...and drop the connection when a ping is not answered within this: the stream ends UNAVAILABLE on the
sender (which retries) and CANCELLED on the receiver (which releases the session)."""
_KEEPALIVE = [("grpc.keepalive_time_ms", KEEPALIVE_S * 1000), ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_S * 1000),
              ("grpc.http2.max_pings_without_data", 0)]
CHANNEL_OPTIONS = GRPC_OPTIONS + _KEEPALIVE + [("grpc.keepalive_permit_without_calls", 0)]
"""the sender's channel: pings only while a stream is open."""
SERVER_OPTIONS = GRPC_OPTIONS + _KEEPALIVE + [
    ("grpc.keepalive_permit_without_calls", 1),
    # the client's pings, KEEPALIVE_S apart without data, must not count as abuse (the default floor is 5 min:
    # two such pings and the server sends GOAWAY too_many_pings, cutting the transfer)
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_S * 1000 // 3)]
"""the receiver's server: see CHANNEL_OPTIONS. The receive loop's idle timeout between frames
(transfer_recv.py IDLE_TIMEOUT_S) covers a peer whose connection answers pings but sends nothing."""


class TransferError(CheckpointError):
    """A transfer failed for good (after retries); `entry` names the entry when one is to blame."""

    def __init__(self, message: str, entry: str = "") -> None:
        super().__init__(message)
        self.entry = entry


def cumulative_sum(hasher: Any) -> int:
    """The per-chunk check: 64 bits of the entry's running digest after the chunk (no second
    pass over the bytes; a receiver whose digest matched up to the chunk before checks this
    chunk with it)."""
    return int.from_bytes(hasher.digest()[:8], "little")


# --- frames ---------------------------------------------------------------------------------

def frame(header: dict[str, Any], payload: bytes | memoryview = b"") -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode()
    return b"".join((struct.pack("<I", len(h)), h, payload))


def unframe(message: bytes) -> tuple[dict[str, Any], memoryview]:
    mv = memoryview(message)
    (n,) = struct.unpack_from("<I", mv)
    return json.loads(bytes(mv[4:4 + n])), mv[4 + n:]


