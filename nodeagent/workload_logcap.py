"""A running workload's log kept within the agent's `workload_log_max_bytes`.

The log (`<runner dir>/<id>.log`) is the workload's stdout and stderr: the process writes it through a
descriptor of its own, so nothing between it and the file can count or rotate. Unbounded, a workload that
prints for weeks fills the agent's state directory, where every record of the node lives. So the agent
checks the size of each running workload's log every second, and one that holds more than the bound is
compacted in place: its last half (from the first line that starts there) moves to the start of the file,
which is then cut. Every writer appends (O_APPEND: the shim, the workload's init and the process itself,
a CRIU-restored one through the descriptor it inherits), so what the workload writes meanwhile lands at
the end and is moved too; only what it writes between the last move and the cut (microseconds) is lost,
or, from a workload that writes as fast as the move goes, what it wrote once the bound was moved.

Readers (nodeagent/workload_logs.py) take the same lock, and a follow counts in bytes since the log's first
byte: `cut[path]` says how many were removed from the front, so it goes on where it was.
"""

from __future__ import annotations

import os

MOVE_CHUNK = 1 << 20
LINE_SEARCH = 64 << 10      # the kept part starts at a line when one starts this close to the cut


def compact(path: str, max_bytes: int) -> int:
    """When the file holds more than `max_bytes`, keep its last `max_bytes // 2` bytes (from a line's start):
    moved to the file's start, in place, with what is appended meanwhile, and the file cut after them.
    The number of bytes removed from its front (0: it was within the bound, or is gone)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return 0
    try:
        size = os.fstat(fd).st_size
        if max_bytes <= 0 or size <= max_bytes:
            return 0
        src = size - max_bytes // 2
        newline = os.pread(fd, LINE_SEARCH, src - 1).find(b"\n")
        src += max(newline, 0)       # just after a newline (or, with none near, the middle of a line)
        dst, budget = 0, max_bytes          # what stays is within the bound whatever the writers do
        while True:
            data = os.pread(fd, min(MOVE_CHUNK, budget - dst), src) if dst < budget else b""
            if data:
                os.pwrite(fd, data, dst)
                src, dst = src + len(data), dst + len(data)
                continue
            end = os.fstat(fd).st_size
            if end <= src or dst >= budget:     # caught up with the writers, or one writes as fast as this moves:
                os.ftruncate(fd, dst)           # what it wrote past the moved part goes with the cut
                return max(end, src) - dst
    finally:
        os.close(fd)
