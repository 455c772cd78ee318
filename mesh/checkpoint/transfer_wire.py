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


