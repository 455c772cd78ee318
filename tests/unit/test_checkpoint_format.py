"""The checkpoint format: manifest, raw entries, checksums that name the broken entry."""

from __future__ import annotations

import json

import pytest

from mesh.checkpoint.format import (DEFAULT_CHECKSUM, FORMAT_VERSION, ChecksumMismatch, CheckpointWriter, EntryMeta,
                                    FormatError, Manifest, read_entry, read_manifest, verify_checkpoint)


def write(path, entries: dict[str, bytes], chunk: int = 3) -> Manifest:
    w = CheckpointWriter(path, "w-1")
    for name, data in entries.items():
        chunks = [data[i:i + chunk] for i in range(0, len(data), chunk)]
        w.write_entry(EntryMeta(name=name, kind="tensor", nbytes=len(data), dtype="uint8", shape=[len(data)]), chunks)
    return w.commit(step=7, extras={"note": "x"})


def test_round_trip(tmp_path):
    data = {"module/m/w": bytes(range(100)), "tensor/empty": b"", "meta": b"\x80\x05N."}
    m = write(tmp_path / "ck", data)
    got = read_manifest(tmp_path / "ck")
    assert got.to_json() == m.to_json()
    assert got.format_version == FORMAT_VERSION and got.step == 7 and got.workload_id == "w-1"
    assert got.checksum == DEFAULT_CHECKSUM and got.extras == {"note": "x"}
    assert got.nbytes == 104
    for name, blob in data.items():
        assert read_entry(tmp_path / "ck", got, name) == blob
    assert [e.name for e in verify_checkpoint(tmp_path / "ck").entries] == list(data)
    assert not list(tmp_path.glob("ck.partial-*"))


def test_commit_replaces_an_older_checkpoint_atomically(tmp_path):
    write(tmp_path / "ck", {"a": b"old"})
    write(tmp_path / "ck", {"a": b"new!"})
    m = read_manifest(tmp_path / "ck")
    assert read_entry(tmp_path / "ck", m, "a") == b"new!"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "remove"])
def test_damaged_entry_is_named(tmp_path, damage):
    write(tmp_path / "ck", {"module/m/a": b"a" * 50, "module/m/b": b"b" * 50})
    m = read_manifest(tmp_path / "ck")
    f = tmp_path / "ck" / m.entry("module/m/b").file
    if damage == "flip":
        raw = bytearray(f.read_bytes())
        raw[10] ^= 1
        f.write_bytes(bytes(raw))
    elif damage == "truncate":
        f.write_bytes(f.read_bytes()[:-1])
    else:
        f.unlink()
    assert read_entry(tmp_path / "ck", m, "module/m/a") == b"a" * 50
    with pytest.raises(ChecksumMismatch) as exc:
        verify_checkpoint(tmp_path / "ck")
    assert exc.value.entry == "module/m/b"
    assert "'module/m/b'" in str(exc.value)


def test_unknown_version_and_missing_manifest(tmp_path):
    with pytest.raises(FormatError, match="no manifest.json"):
        read_manifest(tmp_path)
    write(tmp_path / "ck", {"a": b"x"})
    p = tmp_path / "ck" / "manifest.json"
    d = json.loads(p.read_text())
    p.write_text(json.dumps({**d, "format_version": 99}))
    with pytest.raises(FormatError, match="version 99 is not supported"):
        read_manifest(tmp_path / "ck")
    p.write_text(json.dumps({**d, "checksum": "md5"}))
    with pytest.raises(FormatError, match="md5.*allowed: xxh3-128, sha256"):
        read_manifest(tmp_path / "ck")


def test_sha256_checkpoints_stay_readable(tmp_path):
    w = CheckpointWriter(tmp_path / "ck", algo="sha256")
    w.write_entry(EntryMeta(name="a", kind="data", nbytes=3), [b"abc"])
    m = w.commit(step=1)
    assert read_manifest(tmp_path / "ck").checksum == "sha256"
    assert m.entry("a").checksum == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert read_entry(tmp_path / "ck", m, "a") == b"abc"
