"""The transfer channel's payload over the mesh data plane, when that is faster.

The gRPC stream stays the control path (hello/have, begin, chunk headers, end, commit, done:
ordered, checked, resumable); only the chunk *payload* moves. A receiver that offers a ring
(`TransferServer.expect(..., mesh=True)`) registers a mesh buffer (`mesh.transport.shm`: a
POSIX shared-memory segment, the same-host stand-in for NVLink) of `slots` chunk slots and
names it in its `have` answer. A sender that can attach it (same host) and for which
`mesh.transport.mesh_is_faster` holds writes each chunk into the next free slot with a
one-sided write, marks the slot full, and sends the chunk frame with `{"slot", "n"}` and no
payload; the receiver checks the chunk in the slot exactly as one that came on the stream,
copies it into its target and marks the slot free. Where the ring cannot be attached
(another host, no shm, revoked) the sender falls back to the gRPC stream. The transport used
is reported in `SendStats.transport` ("shm" or "grpc").

A new stream (after a cut) starts with every slot free: frames in flight died with the old
stream, and their chunks are resent.
"""

from __future__ import annotations

import dataclasses
import struct
import time
from typing import Any

from mesh.checkpoint.format import CHUNK_BYTES
from mesh.transport import mesh_is_faster
from mesh.transport.base import BufferDescriptor, TransportError

SLOT_HEADER = 64
FLAG = struct.Struct("<Q")
FREE, FULL = 0, 1
RING_SLOTS = 4
SHM_MB_PER_S = 4000.0       # a conservative same-host memory-copy rate, for the mesh-or-stream choice
STREAM_MB_PER_S = 800.0     # the gRPC stream on loopback, until a send measured it
SLOT_WAIT_S = 60.0


class ShmRing:
    """The receiver's ring of chunk slots in one registered shm buffer."""

    def __init__(self, slots: int = RING_SLOTS, slot_bytes: int = CHUNK_BYTES) -> None:
        from mesh.transport.shm import ShmTransport
        self.slots, self.slot_bytes = slots, slot_bytes
        self.stride = SLOT_HEADER + slot_bytes
        self.transport = ShmTransport()
        self.desc = self.transport.register("checkpoint-transfer", size=slots * self.stride)
        self.view = self.transport.view(self.desc.buffer_id)

    def offer(self) -> dict[str, Any]:
        d = {k: v for k, v in dataclasses.asdict(self.desc).items() if not isinstance(v, bytes)}
        return {"transport": "shm", "descriptor": d, "slots": self.slots, "slot_bytes": self.slot_bytes}

    def reset(self) -> None:
        for i in range(self.slots):
            FLAG.pack_into(self.view, i * self.stride, FREE)

    def take(self, slot: int, n: int) -> memoryview:
        if not (0 <= slot < self.slots) or not (0 <= n <= self.slot_bytes):
            raise ValueError(f"ring slot {slot} with {n} bytes is outside the ring ({self.slots} x {self.slot_bytes})")
        off = slot * self.stride + SLOT_HEADER
        return self.view[off:off + n]

    def release(self, slot: int) -> None:
        if 0 <= slot < self.slots and self.view is not None:
            FLAG.pack_into(self.view, slot * self.stride, FREE)

    def close(self) -> None:
        if self.view is not None:
            self.view = None
            self.transport.close()


class RingWriter:
    """The sender's side: attaches the offered ring; `put` writes a chunk into the next slot."""

    def __init__(self, offer: dict[str, Any]) -> None:
        if offer.get("transport") != "shm":
            raise TransportError(f"unknown mesh transport {offer.get('transport')!r}", op="connect")
        from mesh.transport.shm import ShmConnection
        self.slots, self.slot_bytes = int(offer["slots"]), int(offer["slot_bytes"])
        self.stride = SLOT_HEADER + self.slot_bytes
        self.buffer_id = offer["descriptor"]["buffer_id"]
        self.conn = ShmConnection(BufferDescriptor(**offer["descriptor"]))
        self.next = 0
        self._flag = bytearray(FLAG.size)

    def restart(self) -> None:
        self.next = 0

    def fits(self, n: int) -> bool:
        return n <= self.slot_bytes

    def put(self, chunk: memoryview, stopped: Any = None) -> int:
        """Waits for the next slot to be free (or `stopped()`: the stream is gone), writes `chunk`
        into it and marks it full; returns the slot."""
        slot = self.next % self.slots
        base = slot * self.stride
        deadline = None
        while True:
            self.conn.read(base, FLAG.size, into=self._flag)
            if FLAG.unpack_from(self._flag)[0] == FREE:
                break
            if stopped is not None and stopped():
                raise TransportError("the stream ended while waiting for a ring slot", op="write",
                                     buffer_id=self.buffer_id)
            now = time.monotonic()
            deadline = deadline or now + SLOT_WAIT_S
            if now > deadline:
                raise TransportError(f"ring slot {slot} of buffer {self.buffer_id} was not freed within "
                                     f"{SLOT_WAIT_S:g} s", op="write", buffer_id=self.buffer_id)
            time.sleep(0.0001)
        self.conn.write(base + SLOT_HEADER, chunk)
        self.conn.write(base, FLAG.pack(FULL))
        self.next += 1
        return slot

    def close(self) -> None:
        self.conn.close()


def choose(offer: dict[str, Any] | None, nbytes: int, mode: str, writer: RingWriter | None,
           stream_mb_per_s: float) -> tuple[RingWriter | None, bool, str]:
    """(the attached ring writer, kept for later sends; whether to use it for this send; why).
    `mode`: auto (the mesh when it is faster), grpc (never), shm (always; raises when it cannot)."""
    if mode == "grpc" or not offer:
        return writer, False, "grpc" if mode == "grpc" else "grpc (the receiver offers no mesh buffer)"
    setup = 0.0
    if writer is None or writer.buffer_id != offer.get("descriptor", {}).get("buffer_id"):
        try:
            writer = RingWriter(offer)
        except (TransportError, OSError, KeyError, TypeError, ValueError) as e:
            if mode == "shm":
                raise
            return None, False, f"grpc (the receiver's {offer.get('transport')} buffer is not reachable here: {e})"
        setup = 0.005
    if mode == "auto" and not mesh_is_faster(nbytes, SHM_MB_PER_S, stream_mb_per_s, mesh_setup_s=setup):
        return writer, False, "grpc (too small to gain from the mesh)"
    return writer, True, "shm"
