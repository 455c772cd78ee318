"""Transparent mode: CRIU detection with stand-in binaries, the flags used, the images over the
transfer channel, and a real round trip of a running process where a working CRIU 4.x is
installed (the orchestrated migration: tests/integration/test_migration_transparent.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from mesh.checkpoint.criu import (LOG_ENTRY, Criu, ImageSink, TransparentUnavailable, image_entries, image_manifest,
                                  parse_version, path_key)
from tests import criu_gate

SECRET = bytes(range(32))


def fake(tmp_path, name: str, version: str, check_rc: int = 0) -> str:
    p = tmp_path / name
    p.write_text(f"""#!/bin/sh
echo "$@" >> {tmp_path}/calls
case "$1" in
  --version) echo "Version: {version}" ;;
  check) echo "Looks good."; exit {check_rc} ;;
  restore) while [ $# -gt 0 ]; do [ "$1" = --pidfile ] && echo 4242 > "$2"; shift; done ;;
esac
exit 0
""")
    p.chmod(0o755)
    return str(p)


def test_parse_version():
    assert parse_version("Version: 4.1.1\nGitID: v4.1.1") == (4, 1, 1)
    assert parse_version("Version: 3.17") == (3, 17)
    assert parse_version("criu, I think") is None


def test_absent_criu_is_refused_with_how_to_get_it(tmp_path):
    c = Criu(criu=None)
    c.criu = None
    info = c.detect()
    assert not info.usable and "not installed" in info.problem
    with pytest.raises(TransparentUnavailable, match=r"criu is not installed.*trixie.*criu 4.1.1"):
        c.dump(os.getpid(), tmp_path / "img")


def test_old_criu_is_refused(tmp_path):
    c = Criu(criu=fake(tmp_path, "criu", "3.17.1"))
    with pytest.raises(TransparentUnavailable, match=r"criu 3\.17\.1 .* is too old \(need >= 4\.0"):
        c.require()


def test_failing_check_is_refused(tmp_path):
    c = Criu(criu=fake(tmp_path, "criu", "4.1.1", check_rc=1))
    with pytest.raises(TransparentUnavailable, match="criu check. failed"):
        c.require()


def test_dump_and_restore_flags_with_cuda_checkpoint_first(tmp_path):
    c = Criu(criu=fake(tmp_path, "criu", "4.1.1"), cuda_checkpoint=fake(tmp_path, "cuda-checkpoint", "1"))
    assert c.detect().usable
    c.dump(1234, tmp_path / "img", leave_stopped=True)
    pid = c.restore(tmp_path / "img")
    assert pid == 4242
    calls = (tmp_path / "calls").read_text().splitlines()
    dump_at = next(i for i, line in enumerate(calls) if line.startswith("dump"))
    assert calls[dump_at - 1] == "--toggle --pid 1234", "device state goes to host memory before the dump"
    dump = calls[dump_at].split()
    assert dump[:3] == ["dump", "--tree", "1234"] and "--shell-job" in dump and "--leave-stopped" in dump
    assert calls[dump_at + 1] == "--toggle --pid 1234", "a process left behind gets its device state back"
    restore = next(line for line in calls if line.startswith("restore")).split()
    assert "--restore-detached" in restore and "--shell-job" in restore
    assert calls[-1] == "--toggle --pid 4242"


def _working_criu() -> tuple[Criu | None, str]:
    c = Criu()
    info = c.detect()
    return (c, "") if info.usable else (None, info.problem)


CRIU, WHY_NOT = _working_criu()


@criu_gate.needs_criu   # skips without CRIU; fails under GPUMESH_REQUIRE_CRIU=1 (CI)
def test_round_trip_of_a_running_process(tmp_path):
    """A counter process is dumped (killed), restored from its images, and keeps counting."""
    out = tmp_path / "count"
    # written by rename, so a dump between the truncation and the write never leaves the file empty
    script = ("import os, time\nn = 0\nwhile True:\n    n += 1\n"
              f"    open({str(out) + '.tmp'!r}, 'w').write(str(n))\n"
              f"    os.replace({str(out) + '.tmp'!r}, {str(out)!r})\n    time.sleep(0.01)\n")
    p = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while not out.exists() or int(out.read_text() or 0) < 10:
            time.sleep(0.01)
        CRIU.dump(p.pid, tmp_path / "img", shell_job=False)
        p.wait(timeout=60)
        before = int(out.read_text())
        pid = CRIU.restore(tmp_path / "img", shell_job=False)
        assert pid == p.pid
        deadline = time.monotonic() + 120        # a liveness bound, never a speed: generous on a loaded host
        while int(out.read_text() or 0) <= before + 5:
            assert time.monotonic() < deadline, "the restored process does not run"
            time.sleep(0.01)
    finally:
        for pid in {p.pid}:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        shutil.rmtree(tmp_path / "img", ignore_errors=True)


def test_restore_left_stopped_with_an_inherited_log(tmp_path):
    c = Criu(criu=fake(tmp_path, "criu", "4.1.1"))
    argv = c.restore_argv(tmp_path / "img", tmp_path / "p", shell_job=True, tcp_established=False,
                          leave_stopped=True, inherit={"fd[7]": path_key("/var/w/x.log")})
    assert "--leave-stopped" in argv and "--restore-detached" in argv
    assert argv[argv.index("--inherit-fd") + 1] == "fd[7]:var/w/x.log"


def test_cuda_checkpoint_skips_a_process_without_cuda(tmp_path):
    cc = tmp_path / "cuda-checkpoint"
    cc.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/calls\n[ "$1" = --get-state ] && exit 1\nexit 0\n')
    cc.chmod(0o755)
    c = Criu(criu=fake(tmp_path, "criu", "4.1.1"), cuda_checkpoint=str(cc))
    c.dump(1234, tmp_path / "img")
    calls = (tmp_path / "calls").read_text().splitlines()
    assert "--get-state --pid 1234" in calls and not any(x.startswith("--toggle") for x in calls)


def test_images_travel_over_the_transfer_channel_and_restore_once(tmp_path):
    from mesh.checkpoint.transfer import TransferClient, TransferServer
    src = tmp_path / "src"
    src.mkdir()
    (src / "pages-1.img").write_bytes(os.urandom(5 << 20))
    (src / "core-1.img").write_bytes(b"core")
    (src / "dump.log").write_text("not sent")
    (tmp_path / "w.log").write_text("line 1\n")
    restored = []

    def on_commit(path, extras):
        restored.append(extras)
        return {"pid": 4242}
    server = TransferServer("127.0.0.1:0").start()
    try:
        server.expect("s", ImageSink(tmp_path / "dst", on_commit), secret=SECRET)
        entries = image_entries(src, {LOG_ENTRY: str(tmp_path / "w.log")})
        with TransferClient(server.address, "s", mesh="grpc", secret=SECRET) as client:
            stats = client.send(entries, commit=lambda st: image_manifest("w", entries, st, {"k": 1}, client.algo))
        assert stats.committed == {"pid": 4242} and restored == [{"k": 1}]
        assert sorted(p.name for p in (tmp_path / "dst").iterdir()) == ["core-1.img", LOG_ENTRY, "pages-1.img"]
        assert (tmp_path / "dst" / "pages-1.img").read_bytes() == (src / "pages-1.img").read_bytes()
        assert (tmp_path / "dst" / LOG_ENTRY).read_text() == "line 1\n"
    finally:
        server.stop(0)


def test_images_are_verified_before_criu_restore_runs(tmp_path):
    """The restore (`on_commit`, which runs `criu restore` as root) runs only on exactly the images the
    authenticated manifest names, unaltered; a file changed or added in the images directory after it
    arrived, or a file name that reaches out of it, stops it."""
    from mesh.checkpoint.criu import ImagesRejected, verify_images
    from mesh.checkpoint.format import EntryMeta
    from mesh.checkpoint.transfer import TransferClient, TransferError, TransferServer
    src = tmp_path / "src"
    src.mkdir()
    (src / "core-1.img").write_bytes(b"core" * 100)
    restored = []
    server = TransferServer("127.0.0.1:0").start()
    try:
        sink = ImageSink(tmp_path / "dst", lambda path, extras: restored.append(path) or {"pid": 1})
        sess = server.expect("s", sink, secret=SECRET)
        entries = image_entries(src)
        with TransferClient(server.address, "s", mesh="grpc", secret=SECRET) as client:
            client.send(entries)         # every image, no commit yet
            manifest = image_manifest("w", entries, type("S", (), {"checksums": {
                n: sess.entries[n].checksum for n in sess.entries}})(), {}, client.algo)
        assert oct((tmp_path / "dst").stat().st_mode & 0o777) == "0o700"
        verify_images(tmp_path / "dst", manifest)
        (tmp_path / "dst" / "extra.img").write_bytes(b"x")
        with pytest.raises(ImagesRejected, match="extra.img"):
            sink.commit(manifest, {})
        assert restored == []
        sink._error = None
        (tmp_path / "dst" / "extra.img").unlink()
        (tmp_path / "dst" / "core-1.img").write_bytes(b"CORE" * 100)
        with pytest.raises(ImagesRejected, match="core-1.img"):
            sink.commit(manifest, {})
        assert restored == []
        for bad in ("../escape.img", "restored.pid", ".hidden"):
            with pytest.raises(ImagesRejected):
                sink.open_entry(EntryMeta(name=bad, kind="tensor", nbytes=1))
        assert not (tmp_path / "escape.img").exists()
        with TransferClient(server.address, "s", mesh="grpc", secret=bytes(32)) as client:
            with pytest.raises(TransferError, match="UNAUTHENTICATED"):
                client.send(image_entries(src), commit=manifest)
        assert restored == []
    finally:
        server.stop(0)
