"""The transfer channel's sinks: where a receiving session (mesh/checkpoint/transfer_session.py) puts
entries. `BufferTarget` (a memoryview), `NullSink` (discards), `DirectorySink` (a checkpoint directory,
the manifest written on commit). See mesh/checkpoint/transfer.py for the protocol."""

from __future__ import annotations

from typing import Any, Protocol

from mesh.checkpoint.format import CheckpointWriter, EntryMeta, Manifest, entry_file


class EntryTarget(Protocol):
    def write(self, offset: int, data: memoryview) -> None: ...


class Sink(Protocol):
    """Where a receiving session puts entries."""

    def open_entry(self, meta: EntryMeta) -> EntryTarget:
        """Called at the start of each (re)sent entry; may be called again for a newer generation."""

    def commit(self, manifest: Manifest, data: dict[str, bytes]) -> dict[str, Any]:
        """Every entry of `manifest` has arrived and checked out; `data` holds the bytes of its
        data entries (tagged JSON, mesh/checkpoint/datafmt.py: never unpickled). Returns facts for
        the sender's `done` answer."""


class BufferTarget:
    """Writes into a memoryview (a tensor's bytes, or a bytearray)."""

    def __init__(self, buf: memoryview) -> None:
        self.buf = buf

    def write(self, offset: int, data: memoryview) -> None:
        self.buf[offset:offset + len(data)] = data


class NullSink:
    """Discards everything: for measuring the channel."""

    class _Null:
        def write(self, offset: int, data: memoryview) -> None:
            pass

    def open_entry(self, meta: EntryMeta) -> EntryTarget:
        return self._Null()

    def commit(self, manifest: Manifest, data: dict[str, bytes]) -> dict[str, Any]:
        return {}


class DirectorySink:
    """Receives into a checkpoint directory (the store); the manifest is written on commit."""

    def __init__(self, path: str, workload_id: str = "", private: bool = False) -> None:
        self.writer = CheckpointWriter(path, workload_id, private=private)
        self.files: dict[str, str] = {}

    class _File:
        def __init__(self, path: Any) -> None:
            self.path = path

        def write(self, offset: int, data: memoryview) -> None:
            with open(self.path, "r+b") as f:
                f.seek(offset)
                f.write(data)

    def open_entry(self, meta: EntryMeta) -> EntryTarget:
        rel = self.files.setdefault(meta.name, entry_file(len(self.files)))
        path = self.writer.tmp / rel
        with self.writer.create(rel) as f:
            f.truncate(meta.nbytes)
        return self._File(path)

    def commit(self, manifest: Manifest, data: dict[str, bytes]) -> dict[str, Any]:
        entries = [EntryMeta(**{**e.to_json(), "file": self.files[e.name]}) for e in manifest.entries]
        self.writer.commit_manifest(Manifest(workload_id=manifest.workload_id, step=manifest.step, entries=entries,
                                             created=manifest.created, extras=manifest.extras,
                                             checksum=manifest.checksum))
        return {"path": str(self.writer.path)}
