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


def _shim_alive(pid: int, marker: str) -> bool:
    """Whether `pid` is a live shim of this workload (a recycled pid is not)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
        with open(f"/proc/{pid}/stat", "rb") as f:
            if f.read().rsplit(b")", 1)[-1].split()[0] == b"Z":
                return False
    except OSError:
        return False
    return b"shim.py" in cmd and marker.encode() in cmd


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


def _tail(path: str, lines: int) -> tuple[bytes, int]:
    """The last `lines` lines of the file (all when 0), and the file size read up to."""
    if not os.path.exists(path):
        return b"", 0
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if lines <= 0:
            f.seek(0)
            return f.read(size), size
        block, data = 64 << 10, b""
        pos = size
        while pos > 0 and data.count(b"\n") <= lines:
            step = min(block, pos)
            pos -= step
            f.seek(pos)
            data = f.read(step) + data
        keep = data.splitlines(keepends=True)[-lines:]
        return b"".join(keep), size


def _read_from(path: str, offset: int) -> tuple[bytes, int]:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(1 << 20)
    except FileNotFoundError:
        return b"", offset
    return data, offset + len(data)
