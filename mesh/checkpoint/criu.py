"""Transparent checkpointing of a process that does not use the SDK: CRIU (and cuda-checkpoint).

Stop-and-copy only: `dump` freezes the process tree and writes its images (the process
is killed afterwards, or left stopped with `leave_stopped=True`), `restore` brings it back
from the images, with the same PID, detached from the caller. On a GPU host NVIDIA's
`cuda-checkpoint --toggle --pid PID` runs first, moving the process's device memory and
CUDA state into host memory where CRIU can see it, and again after restore.

Requirements: CRIU 4.0 or newer (Debian bookworm's 3.17 fails on current kernels in vDSO
detection, upstream issue 2532, fixed in 4.1) and root (or CAP_CHECKPOINT_RESTORE).
`detect()` says what is there; `require()` raises `TransparentUnavailable` with the reason
and how to get CRIU 4.x. The binaries sit behind `Runner` so tests can substitute them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mesh.checkpoint.format import CheckpointError

MIN_VERSION = (4, 0)
HOW_TO_GET = ("install CRIU 4.x: build it from source (https://github.com/checkpoint-restore/criu, "
              "`make && make install`), or on Debian take the trixie source package "
              "(`apt-get source criu/trixie` for criu 4.1.1, then `dpkg-buildpackage -b`)")


class TransparentUnavailable(CheckpointError):
    """Transparent (CRIU) mode cannot work on this host; the message says why and what to do."""


class CriuFailed(CheckpointError):
    """A criu or cuda-checkpoint command failed; `log` holds the end of its log."""

    def __init__(self, message: str, log: str = "") -> None:
        super().__init__(message + (f"\n{log}" if log else ""))
        self.log = log


class Runner(Protocol):
    def __call__(self, argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess: ...


def run_command(argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)


@dataclass
class CriuInfo:
    path: str | None
    version: tuple[int, ...] | None
    check_ok: bool
    cuda_checkpoint: str | None
    problem: str = ""
    """empty when transparent mode can work, else why not."""

    @property
    def usable(self) -> bool:
        return not self.problem


def parse_version(text: str) -> tuple[int, ...] | None:
    """`criu --version` prints `Version: 4.1.1` (and maybe `GitID: ...`)."""
    m = re.search(r"Version:\s*(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not m:
        return None
    return tuple(int(x) for x in m.groups() if x is not None)


class Criu:
    """Transparent checkpoint/restore through the `criu` binary."""

    def __init__(self, criu: str | None = None, cuda_checkpoint: str | None = None,
                 runner: Runner = run_command, timeout: float = 300.0) -> None:
        self.criu = criu or shutil.which("criu")
        self.cuda_checkpoint = cuda_checkpoint or shutil.which("cuda-checkpoint")
        self.run = runner
        self.timeout = timeout
        self._info: CriuInfo | None = None

    def detect(self, refresh: bool = False) -> CriuInfo:
        if self._info is not None and not refresh:
            return self._info
        info = CriuInfo(self.criu, None, False, self.cuda_checkpoint)
        if not self.criu:
            info.problem = (f"criu is not installed (not on PATH; transparent mode needs criu >= "
                            f"{'.'.join(map(str, MIN_VERSION))}); {HOW_TO_GET}")
        else:
            try:
                v = self.run([self.criu, "--version"], 30)
                info.version = parse_version(v.stdout + v.stderr)
            except (OSError, subprocess.TimeoutExpired) as exc:
                info.problem = f"{self.criu} --version failed: {exc}; {HOW_TO_GET}"
            if not info.problem:
                if info.version is None:
                    info.problem = f"cannot tell the version of {self.criu}; {HOW_TO_GET}"
                elif info.version[:2] < MIN_VERSION:
                    have = ".".join(map(str, info.version))
                    info.problem = (f"criu {have} at {self.criu} is too old (need >= "
                                    f"{'.'.join(map(str, MIN_VERSION))}: older releases fail on current kernels "
                                    f"in vDSO detection); {HOW_TO_GET}")
            if not info.problem:
                c = self.run([self.criu, "check"], 60)
                info.check_ok = c.returncode == 0
                if not info.check_ok:
                    why = (c.stderr or c.stdout).strip().splitlines()[-3:]
                    info.problem = f"`criu check` failed (root or CAP_CHECKPOINT_RESTORE needed): {' / '.join(why)}"
        self._info = info
        return info

    def require(self) -> CriuInfo:
        info = self.detect()
        if info.problem:
            raise TransparentUnavailable(f"transparent checkpointing is unavailable: {info.problem}")
        return info

    def resume_device(self, pid: int) -> None:
        """After a restore left stopped (`leave_stopped`) and continued: give the process its
        device state back (cuda-checkpoint), where there is one."""
        self._cuda_toggle(pid)

    def _cuda_toggle(self, pid: int, probe: bool = True) -> bool:
        """Toggles the process's CUDA state (device <-> host memory); False where there is no
        cuda-checkpoint or (`probe`: `--get-state` fails) the process does not use CUDA."""
        if not self.cuda_checkpoint:
            return False
        if probe:
            st = self.run([self.cuda_checkpoint, "--get-state", "--pid", str(pid)], self.timeout)
            if st.returncode != 0:
                return False    # not a CUDA process: nothing on the device to move
        r = self.run([self.cuda_checkpoint, "--toggle", "--pid", str(pid)], self.timeout)
        if r.returncode != 0:
            raise CriuFailed(f"cuda-checkpoint --toggle --pid {pid} failed (status {r.returncode})",
                             (r.stderr or r.stdout)[-2000:])
        return True

    def dump_argv(self, pid: int, images: Path, *, leave_stopped: bool, leave_running: bool,
                  shell_job: bool, tcp_established: bool) -> list[str]:
        argv = [self.criu, "dump", "--tree", str(pid), "--images-dir", str(images),
                "--log-file", "dump.log", "-v4", "--file-locks"]
        if shell_job:
            argv.append("--shell-job")
        if tcp_established:
            argv.append("--tcp-established")
        if leave_stopped:
            argv.append("--leave-stopped")
        elif leave_running:
            argv.append("--leave-running")
        return argv

    def dump(self, pid: int, images_dir: str | os.PathLike[str], *, leave_stopped: bool = False,
             leave_running: bool = False, shell_job: bool = True, tcp_established: bool = False) -> Path:
        """Dumps the process tree rooted at `pid` into `images_dir`. By default the process is
        killed once dumped (stop-and-copy); `leave_stopped` keeps it frozen (for a rollback),
        `leave_running` lets it continue (a periodic checkpoint)."""
        self.require()
        images = Path(images_dir)
        images.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(images, 0o700)     # the process's memory: the agent's only
        toggled = self._cuda_toggle(pid)
        argv = self.dump_argv(pid, images, leave_stopped=leave_stopped, leave_running=leave_running,
                              shell_job=shell_job, tcp_established=tcp_established)
        r = self.run(argv, self.timeout)
        if r.returncode != 0:
            if toggled:  # give the device state back to the process that stays
                try:
                    self._cuda_toggle(pid, probe=False)
                except CriuFailed:
                    pass
            raise CriuFailed(f"criu dump of pid {pid} failed (status {r.returncode})", _log_tail(images / "dump.log"))
        if toggled and (leave_running or leave_stopped):
            self._cuda_toggle(pid, probe=False)
        return images

    def restore_argv(self, images: Path, pidfile: Path, *, shell_job: bool, tcp_established: bool,
                     leave_stopped: bool = False, inherit: dict[str, str] | None = None) -> list[str]:
        """`inherit` maps `fd[N]` to a resource key of the images (`path_key(path)` for a regular
        file): the restored process gets descriptor N of the caller instead of opening that file."""
        argv = [self.criu, "restore", "--images-dir", str(images), "--log-file", "restore.log", "-v4",
                "--restore-detached", "--pidfile", str(pidfile), "--file-locks"]
        if shell_job:
            argv.append("--shell-job")
        if tcp_established:
            argv.append("--tcp-established")
        if leave_stopped:
            argv.append("--leave-stopped")
        for fd, key in (inherit or {}).items():
            argv += ["--inherit-fd", f"{fd}:{key}"]
        return argv

    def restore(self, images_dir: str | os.PathLike[str], *, shell_job: bool = True,
                tcp_established: bool = False) -> int:
        """Restores the process tree from `images_dir`, detached; returns its root PID."""
        self.require()
        images = Path(images_dir)
        pidfile = images / "restored.pid"
        pidfile.unlink(missing_ok=True)
        r = self.run(self.restore_argv(images, pidfile, shell_job=shell_job, tcp_established=tcp_established),
                     self.timeout)
        if r.returncode != 0:
            raise CriuFailed(f"criu restore from {images} failed (status {r.returncode})",
                             _log_tail(images / "restore.log"))
        pid = int(pidfile.read_text().strip())
        self._cuda_toggle(pid)
        return pid


def path_key(path: str | os.PathLike[str]) -> str:
    """CRIU's key of a regular file for `--inherit-fd`: its absolute path without the leading slash."""
    return os.path.abspath(path).lstrip("/")


# --- shipping the images over the transfer channel (mesh/checkpoint/transfer_*.py) -------------

LOG_ENTRY = "gpumesh-workload.log"
"""The workload's log so far travels with the images under this name (the target's log continues it)."""


def image_entries(images_dir: str | os.PathLike[str], extra: dict[str, str] | None = None,
                  chunk_bytes: int = 4 << 20) -> list:
    """The files of a CRIU image directory (and `extra` name -> path files) as transfer entries."""
    from mesh.checkpoint.format import EntryMeta
    from mesh.checkpoint.transfer_send import OutEntry
    files = {p.name: p for p in sorted(Path(images_dir).iterdir()) if p.is_file() and p.name != "dump.log"}
    files.update({k: Path(v) for k, v in (extra or {}).items()})
    out = []
    for name, path in files.items():
        size = path.stat().st_size

        def chunks(start: int, path: Path = path, size: int = size):
            with open(path, "rb") as f:
                f.seek(start)
                left = size - start
                while left > 0:
                    b = f.read(min(chunk_bytes, left))
                    if not b:
                        raise CheckpointError(f"{path} shrank while it was sent")
                    left -= len(b)
                    yield b
        out.append(OutEntry(EntryMeta(name=name, kind="tensor", nbytes=size, dtype="uint8", shape=[size]), chunks))
    return out


def image_manifest(workload_id: str, entries: list, stats, extras: dict, algo: str):
    """The commit of an `image_entries` send (a function of its SendStats: the entries' checksums)."""
    from mesh.checkpoint.format import EntryMeta, Manifest
    return Manifest(workload_id=workload_id, step=0, extras=extras, checksum=algo,
                    entries=[EntryMeta(**{**e.meta.to_json(), "checksum": stats.checksums[e.meta.name]})
                             for e in entries])


class ImagesRejected(CheckpointError):
    """Received CRIU images do not match their (authenticated) manifest: `criu restore` is not run."""


_IMAGE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")


def verify_images(path: str | os.PathLike[str], manifest) -> None:
    """Before `criu restore`: the directory holds exactly the manifest's files, each of its size
    and checksum (the manifest came over the authenticated channel, so these are the images the
    source agent dumped). Anything else is refused with ImagesRejected."""
    from mesh.checkpoint.format import new_hasher
    root = Path(path)
    want = {e.name: e for e in manifest.entries}
    have = {p.name for p in root.iterdir()} - {"restored.pid", "restore.log"}
    if have != set(want):
        raise ImagesRejected(f"{root}: the files {sorted(have ^ set(want))} differ from the images' manifest: "
                             f"criu restore is not run")
    for name, e in want.items():
        p = root / name
        if p.is_symlink() or not p.is_file():
            raise ImagesRejected(f"{p}: not a regular file: criu restore is not run")
        h = new_hasher(manifest.checksum)
        n = 0
        with open(p, "rb") as f:
            while b := f.read(4 << 20):
                h.update(b)
                n += len(b)
        if n != e.nbytes or h.hexdigest() != e.checksum:
            raise ImagesRejected(f"image {name!r}: {n} bytes, {manifest.checksum} {h.hexdigest()[:16]}..., the "
                                 f"manifest says {e.nbytes} bytes, {e.checksum[:16]}...: criu restore is not run")


class ImageSink:
    """Receives CRIU images (and the log) into a directory (0700, the agent's); on commit checks
    them against the manifest (`verify_images`), then calls `on_commit(dir, extras)` once (the
    restore) and answers its result; a repeated commit gets the same answer or error."""

    def __init__(self, path: str | os.PathLike[str], on_commit) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.path, 0o700)
        self.on_commit = on_commit
        self._result: dict | None = None
        self._error: Exception | None = None

    class _File:
        def __init__(self, path: Path) -> None:
            self.path = path

        def write(self, offset: int, data) -> None:
            with open(self.path, "r+b") as f:
                f.seek(offset)
                f.write(data)

    def open_entry(self, meta):
        if not _IMAGE_NAME.match(meta.name) or meta.kind != "tensor" or meta.name in ("restored.pid", "restore.log"):
            raise ImagesRejected(f"bad image file name {meta.name!r} (allowed: letters, digits, '_', '.', '-')")
        p = self.path / meta.name
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.truncate(meta.nbytes)
        return self._File(p)

    def commit(self, manifest, data) -> dict:
        if self._result is None and self._error is None:
            try:
                verify_images(self.path, manifest)
                extras = manifest.extras
                if not all(isinstance(extras.get(k, ""), str) for k in ("log_key", "cwd", "workdir")):
                    raise ImagesRejected("the images' extras: log_key, cwd and workdir must be strings")
                self._result = dict(self.on_commit(self.path, extras))
            except Exception as e:   # noqa: BLE001 - answered to the sender
                self._error = e if isinstance(e, CheckpointError) else CheckpointError(str(e))
        if self._error is not None:
            raise self._error
        return self._result


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def detect() -> CriuInfo:
    """What this host offers for transparent mode."""
    return Criu().detect()
