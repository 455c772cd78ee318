"""The transfer channel: checkpoint entries streamed between two endpoints over gRPC.

One bidirectional stream method, `/gpumesh.checkpoint.v1.Transfer/Push`, with raw
bytes messages (generic handler, identity serializers: no proto, no pickle). Each
message is a *frame*: a 4-byte little-endian header length, a JSON header, then the
payload. Every message after the `hello` is sealed (AES-256-GCM, keys from the session's
secret and both sides' nonces; mesh/checkpoint/transfer_auth.py). The sender speaks first:

    hello  {session, nonce, proof}           proof = HMAC(secret, session, nonce); without it, or
                                             with a nonce heard before (replayed), the stream is
                                             refused (UNAUTHENTICATED), nothing written
                                             -> receiver answers its nonce and a sealed `have`:
                                                what it holds per entry (generation, contiguous
                                                bytes, done)
    begin  {meta, gen, offset, algo}         start an entry, or resume it at `offset`
    chunk  {offset, sum} + bytes             up to CHUNK_BYTES of the current entry; `sum` is
                                             xxh3-64 (CRC-32 with sha256 entries) of the chunk
    end    {checksum}                        the whole entry's checksum (xxh3-128 or SHA-256);
                                             checked by the receiver
    commit {manifest}                        every entry of the manifest is here with its
                                             checksum: hand the checkpoint to the sink
    (stream closed)                          -> receiver answers `done` {bytes, committed}

A broken stream loses nothing that was received: the sender reconnects, reads the
`have` map and continues each entry from the receiver's offset (it keeps the hash
state of every chunk boundary of the entry in flight, so the end-to-end checksum
still covers the whole entry). A chunk that fails its check aborts the stream with
DATA_LOSS and is resent on the retry; an entry whose checksum differs is reset and
resent from its start; after `retries` attempts the sender raises `TransferError`
naming the entry.

A stream that sends no frame for the receiver's idle timeout (IDLE_TIMEOUT_S, 120 s by default) is
answered DEADLINE_EXCEEDED and its session released for the retry; both ends send keepalive pings
(transfer_wire.py), so a connection that died silently is dropped within about 40 s.

Generations let pre-copy resend an entry that changed: a `begin` with a newer
generation replaces what the receiver holds; one the receiver already has whole is
skipped.
"""

from __future__ import annotations

from mesh.checkpoint.transfer_recv import TransferServer
from mesh.checkpoint.transfer_session import ReceiveSession, _Abort, _RecvEntry
from mesh.checkpoint.transfer_send import OutEntry, ProgressFn, SendStats, TransferClient, raw_entries
from mesh.checkpoint.transfer_sinks import BufferTarget, DirectorySink, EntryTarget, NullSink, Sink
from mesh.checkpoint.transfer_wire import (GRPC_OPTIONS, MAX_MESSAGE, PUSH, SERVICE, TransferError, frame,
                                           unframe)

__all__ = ["BufferTarget", "DirectorySink", "EntryTarget", "GRPC_OPTIONS", "MAX_MESSAGE", "NullSink", "OutEntry",
           "PUSH", "ProgressFn", "ReceiveSession", "SERVICE", "SendStats", "Sink", "TransferClient", "TransferError",
           "TransferServer", "_Abort", "_RecvEntry", "frame", "raw_entries", "unframe"]
