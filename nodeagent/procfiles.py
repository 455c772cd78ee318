"""Files and processes of the workload runner: reading its JSON records, recognising a live shim,
a process tree, and reading a workload's log (its tail, or from an offset)."""

from __future__ import annotations

import json
import os

def _read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _shim_alive(pid: int, pid_file: str) -> bool:
    """Whether `pid` is a live shim launched with `--pid-file pid_file` (a recycled pid is not: not even
    another workload's shim whose files' names contain this one's, as `job10` contains `job1`)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
        with open(f"/proc/{pid}/stat", "rb") as f:
            if f.read().rsplit(b")", 1)[-1].split()[0] == b"Z":
                return False
    except OSError:
        return False
    return b"shim.py" in cmd and b"\0--pid-file\0" + pid_file.encode() + b"\0" in cmd


def _find_shim(pid_file: str) -> int:
    """The pid of a live shim launched with `--pid-file pid_file` (0 when none): how a restarted
    agent finds the supervisor of a workload whose start it did not live to record."""
    want = b"\0--pid-file\0" + pid_file.encode() + b"\0"
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if b"shim.py" in cmd and want in cmd and _shim_alive(int(name), pid_file):
            return int(name)
    return 0


LOG_READ_CAP = 8 << 20
"""The most of a workload's log one log request reads (its end): the workload may write gigabytes
without a newline, and the agent holds what it reads, then queues it on the Sync stream (whose outbox
ends the stream at 256 MiB). What lies before is named in a first line (`_cut_line`)."""
TAIL_BLOCK = 64 << 10


def _cut_line(skipped: int) -> bytes:
    return (f"[... the log's first {skipped} bytes are not shown: one read returns at most its last "
            f"{LOG_READ_CAP >> 20} MiB ...]\n").encode()


def _tail(path: str, lines: int, cap: int = LOG_READ_CAP) -> tuple[bytes, int]:
    """The last `lines` lines of the file (all when 0), at most its last `cap` bytes (then a first line
    says how many bytes before are not shown), and the file size read up to."""
    if not os.path.exists(path):
        return b"", 0
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        if lines <= 0:
            start = max(0, size - cap)
            f.seek(start)
            data = f.read(size - start)
            return (_cut_line(start) + data if start else data), size
        blocks: list[bytes] = []
        pos, read, newlines = size, 0, 0
        while pos > 0 and newlines <= lines and read < cap:     # one newline more than lines: the first's start
            step = min(TAIL_BLOCK, pos, cap - read)
            pos -= step
            f.seek(pos)
            block = f.read(step)
            blocks.append(block)
            read += len(block)
            newlines += block.count(b"\n")
        blocks.reverse()
        out = b"".join(b"".join(blocks).splitlines(keepends=True)[-lines:])
        if pos > 0 and newlines <= lines:       # stopped by the cap: the first line shown may be partial
            return _cut_line(size - len(out)) + out, size
        return out, size


def _read_from(path: str, offset: int) -> tuple[bytes, int]:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(1 << 20)
    except FileNotFoundError:
        return b"", offset
    return data, offset + len(data)
