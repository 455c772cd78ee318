"""The SHA-256 of a model artifact, so that the weights an agent loads are the weights that were registered.

- A file (GGUF): the SHA-256 of its bytes, what `sha256sum FILE` prints.
- A directory (Hugging Face format): the SHA-256 of its manifest, one line per regular file below it in
  sorted order of the path relative to the directory, `<sha256 of the file>  <relative path>\\n`, leaving out
  hidden names (a file or directory whose name starts with a dot: a download tool's `.cache`, a `.git`, whose
  contents differ between hosts that hold the same weights): what `cd DIR && find -L . -name '.?*' -prune -o
  -type f -print | sed 's|^\\./||' | LC_ALL=C sort | xargs sha256sum | sha256sum` prints (symbolic links are
  followed, as a Hugging Face cache's snapshot links to its blobs).
- Anything else (a device, a FIFO, a socket) is refused: it is not weights, and reading it may never end.

Hashing reads the whole artifact (about 1-2 GB/s per core). `ArtifactDigests` remembers each file's digest
under its identity and change stamps (device, inode, size, modification and status-change times): a write, a
rename over it or a `touch -d` changes the status-change time, which no unprivileged user can set back, so a
changed file is read again while an unchanged one is not.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import threading
from pathlib import Path

HEX_RE = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 1 << 20


class DigestMismatch(ValueError):
    """The artifact on disk is not the registered one (the message names both digests)."""


def _stamp(st: os.stat_result) -> tuple:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def file_sha256(path: Path) -> str:
    """The SHA-256 of a regular file's bytes. Opened with O_NONBLOCK and checked on the open file: a FIFO put at
    the path after the caller's stat is refused (DigestMismatch) instead of blocking the reader for ever."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DigestMismatch(f"artifact {path}: not a regular file or a directory")
        os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def walk(directory: Path):
    """os.walk of a model directory: links followed, hidden names left out, and a directory that is one of its own
    ancestors (a link loop, `sub/up -> ..`) not entered: the walk nested it until the path was too long, which two
    such links make exponential. Other linked directories are walked as before (the digest does not change)."""
    chains: dict[str, frozenset] = {}
    for root, dirs, files in os.walk(directory, followlinks=True):
        try:
            st = os.stat(root)
        except OSError:
            dirs[:] = []
            continue
        here = (st.st_dev, st.st_ino)
        above = chains.get(os.path.dirname(root), frozenset())
        if here in above:
            dirs[:] = []
            continue
        chains[root] = above | {here}
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        yield root, dirs, [f for f in files if not f.startswith(".")]


def files_below(directory: Path) -> list[str]:
    """The regular files below `directory` (`walk`: links followed, hidden names left out, each directory once),
    as sorted relative POSIX paths."""
    out = []
    for root, dirs, files in walk(directory):
        for name in files:
            p = Path(root) / name
            if not name.startswith(".") and p.is_file():
                out.append(p.relative_to(directory).as_posix())
    return sorted(out, key=lambda s: s.encode())


class ArtifactDigests:
    """Digests of artifacts, each file read once while it does not change (thread-safe)."""

    def __init__(self) -> None:
        self._known: dict[str, tuple[tuple, str]] = {}
        self._lock = threading.Lock()

    def _file(self, path: Path) -> str:
        real = os.path.realpath(path)
        st = os.stat(real)
        if not stat.S_ISREG(st.st_mode):
            raise DigestMismatch(f"artifact {path}: not a regular file or a directory")
        stamp = _stamp(st)
        with self._lock:
            hit = self._known.get(real)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        digest = file_sha256(Path(real))
        if _stamp(os.stat(real)) == stamp:          # not written while it was read: remember it
            with self._lock:
                self._known[real] = (stamp, digest)
        return digest

    def of(self, path: str | Path) -> str:
        """The artifact's digest (OSError when it cannot be read)."""
        p = Path(path)
        if not p.is_dir():
            return self._file(p)
        manifest = "".join(f"{self._file(p / rel)}  {rel}\n" for rel in files_below(p))
        return hashlib.sha256(manifest.encode()).hexdigest()

    def verify(self, path: str | Path, expected: str) -> None:
        """DigestMismatch unless the artifact's digest is `expected`."""
        got = self.of(path)
        if got != expected.lower():
            raise DigestMismatch(f"the weights are not the registered ones: SHA-256 {got} where the model pins "
                                 f"{expected.lower()} (artifact {path}; to accept new weights, update the model "
                                 "with their artifact_sha256)")


DIGESTS = ArtifactDigests()
