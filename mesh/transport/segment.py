"""Reaching a shared memory segment that another process can shrink: system calls, never loads and stores.

A mesh buffer's segment is linked into its slice's private /dev/shm and owned by
the slice's tenant (docs/security.md), so the tenant can `ftruncate` it or
overwrite its header at any time. What Linux does then (checked by
tests/unit/test_mesh_segment_faults.py):

* a *user-mode* load or store on a page of the mapping past the file's new end
  raises SIGBUS, which kills the process (Python cannot return from it): a
  memoryview copy, `struct.pack_into` / `unpack_from` on the mapping,
  `ctypes.memmove`, and OpenSSL encrypting from or decrypting into the mapping
  (a TLS socket's `sendall` / `recv_into` of a slice of it);
* a *system call* that touches such a page fails with EFAULT (`recv_into`,
  `sendall` on a plain socket, `readv`/`writev`) or returns a short count
  (`preadv` into the mapping, `pread` on the segment's descriptor); `pwrite` on
  the descriptor past the end grows the file again;
* memfd seals (F_SEAL_SHRINK) would forbid the shrink, but a file opened by
  name in /dev/shm carries F_SEAL_SEAL: no seal can be added to it.

So whoever must survive a tenant's segment (the agent) reaches it only through
system calls: plain sockets straight on the mapping (EFAULT is an answer, not a
crash), TLS through a bounce buffer of its own and `pread`/`pwrite` on the
segment's descriptor, the header with `pread`/`pwrite`. Before each copy it
compares the file's size (`lseek(SEEK_END)`, about 0.25 us) with what the
buffer needs, so a shrunk segment is a typed error (`BufferDamaged`) before
anything moves; the system calls cover a shrink that races the copy.
"""

from __future__ import annotations

import errno
import os
import ssl
import threading

from mesh.transport.base import BufferDamaged

HEADER_BYTES = 64
BOUNCE_BYTES = 128 << 10       # TLS payloads pass through a buffer of the serving thread's own (L2-sized)
_bounce = threading.local()


def bounce() -> memoryview:
    """This thread's bounce buffer (memory of this process: SSL may touch it in user mode)."""
    b = getattr(_bounce, "buf", None)
    if b is None:
        b = _bounce.buf = memoryview(bytearray(BOUNCE_BYTES))
    return b


class Segment:
    """A descriptor of one segment (its own duplicate: closed when the last holder drops it, so an
    operation in flight never writes through a descriptor number that was closed and reused)."""

    def __init__(self, fd: int, buffer_id: str, length: int) -> None:
        self.fd = os.dup(fd)
        self.buffer_id = buffer_id
        self.expect(length)

    def expect(self, length: int) -> None:
        """The buffer holds `length` bytes after the header (what the size checks compare with)."""
        self.length = length
        self.needed = HEADER_BYTES + max(1, length)

    def __del__(self) -> None:
        fd, self.fd = getattr(self, "fd", -1), -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass

    def size(self) -> int:
        """The file's size now (bytes, header included)."""
        return os.lseek(self.fd, 0, os.SEEK_END)

    def damage(self, op: str = "") -> BufferDamaged | None:
        """None while the segment holds the whole buffer, else the error that says how it was shrunk."""
        size = self.size()
        if size >= self.needed:
            return None
        return self.shrunk(op, size)

    def shrunk(self, op: str, size: int = -1) -> BufferDamaged:
        if size < 0:
            size = self.size()
        return BufferDamaged(f"{op or 'access'} on buffer {self.buffer_id}: its shared memory segment was shrunk to "
                             f"{size} bytes (it needs {self.needed}: a 64-byte header and {self.length} bytes) by a "
                             f"process that maps it; the buffer is unusable: disconnect and connect again",
                             op=op, buffer_id=self.buffer_id, size=size, expected=self.needed, reason="shrunk")

    def check(self, op: str = "") -> None:
        e = self.damage(op)
        if e is not None:
            raise e

    # -- header ------------------------------------------------------------------------

    def read_header(self, n: int = HEADER_BYTES) -> bytes:
        """The first `n` header bytes; BufferDamaged when the file is shorter."""
        b = os.pread(self.fd, n, 0)
        if len(b) < n:
            raise self.shrunk("read header", len(b))
        return b

    def write_header(self, data: bytes, *, grow: bool = False) -> bool:
        """Write `data` at offset 0. Not past the end unless `grow` (pwrite would grow the file):
        False when the segment is too short to hold it."""
        if not grow and self.size() < len(data):
            return False
        os.pwrite(self.fd, data, 0)
        return True

    # -- data through the descriptor (the TLS path) ---------------------------------------

    def pread_into(self, view: memoryview, offset: int, op: str = "read") -> None:
        """Copy buffer bytes [offset, offset+len(view)) into `view` (this process's memory)."""
        n = os.preadv(self.fd, [view], HEADER_BYTES + offset)
        if n < view.nbytes:
            raise self.shrunk(op)

    def pwrite_from(self, view: memoryview, offset: int, op: str = "write") -> None:
        """Copy `view` into buffer bytes at `offset`; refused (nothing written) when the segment is too short."""
        self.check(op)
        os.pwrite(self.fd, view, HEADER_BYTES + offset)


def is_fault(e: OSError) -> bool:
    """A system call met a page of the mapping that the file no longer has."""
    return e.errno == errno.EFAULT


def recv_into_segment(sock, seg: Segment, dest: memoryview, offset: int, length: int) -> BufferDamaged | None:
    """Receive `length` payload bytes from `sock` into the buffer at `offset` (`dest`: those `length` bytes of
    the buffer in this process's mapping, sliced once by the caller: a deregistration that releases the buffer's
    view meanwhile does not release this one). On a plain socket straight into the mapping (recv_into is a
    system call); on TLS
    through this thread's bounce buffer and `pwrite`. When the segment cannot take them, the rest of the
    payload is read and dropped (the stream stays in step) and the error is returned. Connection errors raise."""
    got, damaged = 0, None
    tls = isinstance(sock, ssl.SSLSocket)
    scratch = bounce()
    while got < length:
        if damaged is None and not tls:
            try:
                k = sock.recv_into(dest[got:], length - got)
            except OSError as e:
                if not is_fault(e):
                    raise
                damaged = seg.shrunk("write")      # nothing of this call was taken from the stream
                continue
            if k == 0:
                raise ConnectionError("connection closed by peer")
            got += k
            continue
        # TLS (a record at a time) fills the bounce buffer, then one pwrite; or the rest of a refused payload
        n, want = 0, min(length - got, scratch.nbytes)
        while n < want:
            k = sock.recv_into(scratch[n:want], want - n)
            if k == 0:
                raise ConnectionError("connection closed by peer")
            n += k
        if damaged is None:
            damaged = seg.damage("write")
            if damaged is None:
                os.pwrite(seg.fd, scratch[:n], HEADER_BYTES + offset + got)
        got += n
    return damaged


def send_from_segment(sock, seg: Segment, src: memoryview, offset: int, length: int) -> BufferDamaged | None:
    """Send buffer bytes [offset, offset+length) (the reply's header is already sent). A shrink that races
    the copy cuts the reply short: the error is returned and the caller must close the channel."""
    if not isinstance(sock, ssl.SSLSocket):
        try:
            sock.sendall(src)
        except OSError as e:
            if not is_fault(e):
                raise
            return seg.shrunk("read")
        return None
    scratch = bounce()
    done = 0
    while done < length:
        k = min(length - done, scratch.nbytes)
        try:
            seg.pread_into(scratch[:k], offset + done)
        except BufferDamaged as e:
            return e
        sock.sendall(scratch[:k])
        done += k
    return None
