"""The checkpoint format: a JSON manifest plus raw entry bytes, versioned and checksummed.

A checkpoint is a set of named *entries*. A tensor entry is the tensor's raw bytes
(C order, native little-endian) with its dtype and shape in the manifest; a data
entry is a small declared object (RNG states, the step and extras, an optimizer's
non-tensor state) as tagged JSON (`datafmt.py`). Nothing is pickled: version 1 held
pickle entries, and readers refuse them (unpickling received bytes runs code).

On disk a checkpoint is a directory::

    manifest.json        {"format": "gpumesh-checkpoint", "format_version": 2, "workload_id",
                          "step", "created", "checksum": "xxh3-128", "entries": [...], "extras": {...}}
    data/00000.bin ...   one file per entry, in manifest order

The manifest is written last, through a rename, so a directory with a manifest is
complete. Readers verify every entry's size and checksum (xxh3-128, or SHA-256 where
`xxhash` is not installed; the manifest names which) and raise `ChecksumMismatch`
naming the entry. The same `EntryMeta` travels on the transfer
stream (`mesh.checkpoint.transfer`), so a streamed checkpoint and a stored one are
the same thing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

FORMAT_NAME = "gpumesh-checkpoint"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
CHUNK_BYTES = 4 << 20
"""Default chunk size for reading, writing and streaming entries."""

Kind = Literal["tensor", "data"]
KINDS = ("tensor", "data")
INT64_MAX = (1 << 63) - 1
"""a manifest's step, sizes and dimensions are reported in int64 fields (MigrationReport, CheckpointInfo)."""

try:
    import xxhash as _xxhash
except ImportError:  # the `torch` extra brings it; sha256 (hardware-accelerated on x86) otherwise
    _xxhash = None

CHECKSUMS = ("xxh3-128", "sha256")
"""Entry checksum algorithms a manifest may name. xxh3-128 (~18 GB/s) when `xxhash` is
installed, else SHA-256 (~1.6 GB/s with SHA-NI); readers need the one a manifest names."""
DEFAULT_CHECKSUM = "xxh3-128" if _xxhash is not None else "sha256"


class CheckpointError(Exception):
    """Base of the checkpoint package's errors."""


class FormatError(CheckpointError):
    """The manifest is missing, unreadable, or of an unknown format or version."""


@dataclass
class ChecksumMismatch(CheckpointError):
    """An entry's bytes do not match the manifest (size or checksum)."""

    entry: str
    expected: str
    actual: str
    where: str = ""

    def __post_init__(self) -> None:
        super().__init__(str(self))

    def __str__(self) -> str:
        at = f" ({self.where})" if self.where else ""
        return f"checkpoint entry {self.entry!r}{at}: expected {self.expected}, got {self.actual}"


@dataclass
class EntryMeta:
    """One entry of a checkpoint: what it is and how to check it."""

    name: str
    kind: Kind
    nbytes: int
    dtype: str = ""
    """torch dtype name without the `torch.` prefix (e.g. `float32`); empty for data entries."""
    shape: list[int] = field(default_factory=list)
    checksum: str = ""
    """hex digest of the entry's bytes, by the manifest's checksum algorithm."""
    file: str = ""
    """where the bytes are, relative to the checkpoint directory (default `data/<index>.bin`)."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "EntryMeta":
        try:
            meta = cls(name=str(d["name"]), kind=d["kind"], nbytes=int(d["nbytes"]), dtype=str(d.get("dtype", "")),
                       shape=[int(x) for x in d.get("shape", [])], checksum=str(d.get("checksum", "")),
                       file=str(d.get("file", "")))
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise FormatError(f"bad manifest entry {str(d)[:200]}: {exc}") from None
        if meta.kind not in KINDS:
            why = (" (pickled entries are refused: unpickling received bytes would run code)"
                   if meta.kind == "pickle" else "")
            raise FormatError(f"entry {meta.name!r}: kind {meta.kind!r} is not allowed{why}; allowed: "
                              f"{', '.join(KINDS)}")
        if not 0 <= meta.nbytes <= INT64_MAX:
            raise FormatError(f"entry {meta.name!r}: nbytes {meta.nbytes} (allowed: 0 to {INT64_MAX})")
        if any(not 0 <= n <= INT64_MAX for n in meta.shape):
            raise FormatError(f"entry {meta.name!r}: shape {str(meta.shape)[:200]} (allowed: dimensions of 0 to "
                              f"{INT64_MAX})")
        return meta


@dataclass
class Manifest:
    workload_id: str
    step: int
    entries: list[EntryMeta]
    created: float = field(default_factory=time.time)
    extras: dict[str, Any] = field(default_factory=dict)
    """small JSON-able facts about the checkpoint (not the workload's pickled extras)."""
    format_version: int = FORMAT_VERSION
    checksum: str = DEFAULT_CHECKSUM
    """the algorithm of every entry's checksum (one of CHECKSUMS)."""

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def entry(self, name: str) -> EntryMeta:
        for e in self.entries:
            if e.name == name:
                return e
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT_NAME, "format_version": self.format_version, "workload_id": self.workload_id,
                "step": self.step, "created": self.created, "checksum": self.checksum,
                "entries": [e.to_json() for e in self.entries], "extras": self.extras}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Manifest":
        if not isinstance(d, dict):
            raise FormatError("a checkpoint manifest must be a JSON object")
        if d.get("format") != FORMAT_NAME:
            raise FormatError(f"not a gpumesh checkpoint manifest (format={d.get('format')!r})")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            why = (" (version 1 stored pickled objects, which are never loaded; take a new checkpoint)"
                   if version == 1 else "")
            raise FormatError(f"checkpoint format version {version!r} is not supported "
                              f"(this build reads version {FORMAT_VERSION}){why}")
        algo = d.get("checksum", "")
        check_algorithm(algo)
        try:
            step, created, extras = int(d.get("step", 0)), float(d.get("created", 0.0)), dict(d.get("extras", {}))
            entries = list(d.get("entries", []))
        except (TypeError, ValueError, OverflowError) as exc:
            raise FormatError(f"bad manifest (step, created, extras or entries): {exc}") from None
        if not 0 <= step <= INT64_MAX:
            # the agent reports it in an int64 field: past it, a checkpoint already in the store got no record
            raise FormatError(f"manifest step {step} (allowed: 0 to {INT64_MAX})")
        return cls(workload_id=str(d.get("workload_id", "")), step=step, created=created, extras=extras,
                   entries=[EntryMeta.from_json(e) for e in entries], format_version=version, checksum=algo)


def check_algorithm(algo: str) -> None:
    if algo not in CHECKSUMS:
        raise FormatError(f"checksum algorithm {algo!r} is not supported (allowed: {', '.join(CHECKSUMS)})")
    if algo == "xxh3-128" and _xxhash is None:
        raise FormatError("this checkpoint uses xxh3-128 checksums: install the `xxhash` package "
                          "(pip install 'gpumesh[torch]')")


def new_hasher(algo: str = DEFAULT_CHECKSUM) -> Any:
    """An incremental hasher with update/copy/hexdigest."""
    check_algorithm(algo)
    return _xxhash.xxh3_128() if algo == "xxh3-128" else hashlib.sha256()


def checksum(data: bytes | memoryview, algo: str = DEFAULT_CHECKSUM) -> str:
    h = new_hasher(algo)
    h.update(data)
    return h.hexdigest()


def chunk_sum(data: bytes | memoryview, algo: str = DEFAULT_CHECKSUM) -> int:
    """The per-chunk check used on the transfer stream: xxh3-64 with xxh3-128 entries, else CRC-32."""
    if algo == "xxh3-128":
        return _xxhash.xxh3_64_intdigest(data)
    return zlib.crc32(data)


def entry_file(index: int) -> str:
    return f"data/{index:05d}.bin"


def _entry_path(root: Path, index: int, meta: EntryMeta | None = None) -> Path:
    return root / (meta.file if meta is not None and meta.file else entry_file(index))


class CheckpointWriter:
    """Writes a checkpoint directory entry by entry, chunk by chunk; `commit` writes the manifest.

    Writes go to `<path>.partial-<pid>` and are renamed to `path` on commit, replacing an
    older checkpoint there, so a reader never sees a half-written checkpoint.
    """

    def __init__(self, path: str | os.PathLike[str], workload_id: str = "", algo: str = DEFAULT_CHECKSUM,
                 private: bool = False) -> None:
        """`private`: the directory 0700 and its files 0600 whatever the umask (the agents' checkpoint store: a
        process's state, docs/security.md); else as the umask makes them (a workload's own checkpoints)."""
        self.path = Path(path)
        self.workload_id = workload_id
        self.algo = algo
        self.private = private
        self.tmp = self.path.with_name(f"{self.path.name}.partial-{os.getpid()}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        if private:
            from mesh.fsmodes import private_dir
            private_dir(self.tmp)
            private_dir(self.tmp / "data")
        else:
            (self.tmp / "data").mkdir(parents=True)
        self.entries: list[EntryMeta] = []

    def create(self, rel: str):
        """A new file of the checkpoint (binary, for writing)."""
        if self.private:
            from mesh.fsmodes import private_file
            return private_file(self.tmp / rel)
        return open(self.tmp / rel, "wb")

    def write_entry(self, meta: EntryMeta, chunks: Iterable[bytes | memoryview]) -> EntryMeta:
        """Writes one entry from its chunks; fills in and returns its checksum and size."""
        h = new_hasher(self.algo)
        n = 0
        rel = entry_file(len(self.entries))
        with self.create(rel) as f:
            for chunk in chunks:
                h.update(chunk)
                f.write(chunk)
                n += len(chunk)
        if meta.nbytes and n != meta.nbytes:
            raise ChecksumMismatch(meta.name, f"{meta.nbytes} bytes", f"{n} bytes", "while writing")
        meta = dataclasses.replace(meta, nbytes=n, checksum=h.hexdigest(), file=rel)
        self.entries.append(meta)
        return meta

    def commit(self, step: int, extras: dict[str, Any] | None = None) -> Manifest:
        return self.commit_manifest(Manifest(workload_id=self.workload_id, step=step, entries=self.entries,
                                             extras=extras or {}, checksum=self.algo))

    def commit_manifest(self, manifest: Manifest) -> Manifest:
        with self.create(MANIFEST) as f:
            f.write(json.dumps(manifest.to_json(), indent=1).encode())
            f.flush()
            os.fsync(f.fileno())
        old = self.path.with_name(f"{self.path.name}.old-{os.getpid()}")
        if self.path.exists():
            self.path.rename(old)
        self.tmp.rename(self.path)
        shutil.rmtree(old, ignore_errors=True)
        return manifest

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def read_manifest(path: str | os.PathLike[str]) -> Manifest:
    p = Path(path) / MANIFEST
    try:
        with open(p) as f:
            return Manifest.from_json(json.load(f))
    except FileNotFoundError:
        raise FormatError(f"{path}: no {MANIFEST} (not a checkpoint, or not completely written)") from None
    except json.JSONDecodeError as exc:
        raise FormatError(f"{p}: unreadable manifest: {exc}") from None


def iter_entry_chunks(path: str | os.PathLike[str], manifest: Manifest, name: str,
                      chunk_bytes: int = CHUNK_BYTES, verify: bool = True) -> Iterator[bytes]:
    """Yields an entry's bytes in chunks; with `verify`, raises ChecksumMismatch at the end
    (before the last chunk is yielded) when size or checksum differ from the manifest."""
    index = next((i for i, e in enumerate(manifest.entries) if e.name == name), None)
    if index is None:
        raise KeyError(name)
    meta = manifest.entries[index]
    h = new_hasher(manifest.checksum)
    n = 0
    try:
        f = open(_entry_path(Path(path), index, meta), "rb")
    except FileNotFoundError:
        raise ChecksumMismatch(name, f"{meta.nbytes} bytes", "a missing data file") from None
    with f:
        pending: bytes | None = None
        while True:
            chunk = f.read(chunk_bytes)
            if not chunk:
                break
            h.update(chunk)
            n += len(chunk)
            if pending is not None:
                yield pending
            pending = chunk
    if verify:
        if n != meta.nbytes:
            raise ChecksumMismatch(name, f"{meta.nbytes} bytes", f"{n} bytes")
        if h.hexdigest() != meta.checksum:
            raise ChecksumMismatch(name, f"{manifest.checksum} {meta.checksum[:16]}...", f"{h.hexdigest()[:16]}...")
    if pending is not None:
        yield pending


def read_entry(path: str | os.PathLike[str], manifest: Manifest, name: str, verify: bool = True) -> bytes:
    return b"".join(iter_entry_chunks(path, manifest, name, verify=verify))


def verify_checkpoint(path: str | os.PathLike[str]) -> Manifest:
    """Reads every entry and checks its size and checksum; returns the manifest."""
    manifest = read_manifest(path)
    for e in manifest.entries:
        for _ in iter_entry_chunks(path, manifest, e.name):
            pass
    return manifest
