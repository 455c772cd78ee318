"""Artifact digests (mesh/models/digest.py): the registry pins each variant's SHA-256 at Register, keeps it
across an Update that names the same file, and the agent refuses to start a replica on other weights."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
from types import SimpleNamespace

import pytest

from gpumesh.v1 import model_service_pb2 as M
from gpumesh.v1 import types_pb2
from mesh import errors
from mesh.models import digest
from tests.models_util import write_hf_dir, write_tiny_gguf
from tests.unit.test_model_validation import gguf_variant


def test_a_file_digest_is_sha256sum_and_a_directory_digest_is_its_manifests(tmp_path):
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    assert digest.ArtifactDigests().of(gguf) == hashlib.sha256(gguf.read_bytes()).hexdigest()
    hf = write_hf_dir(tmp_path / "hf", weights=1 << 20)
    (hf / "sub").mkdir()
    (hf / "sub" / "tokenizer.json").write_text("{}")
    (hf / ".cache").mkdir()
    (hf / ".cache" / "download.metadata").write_text("local to this host")
    blob = tmp_path / "blob"
    blob.write_text("a snapshot's link to its blob")
    (hf / "linked.json").symlink_to(blob)
    if shutil.which("sha256sum") is None:
        pytest.skip("sha256sum is not installed: the shell pipeline of the module's doc cannot run")
    shell = subprocess.run("find -L . -name '.?*' -prune -o -type f -print | sed 's|^\\./||' | LC_ALL=C sort | "
                           "xargs sha256sum | sha256sum",
                           shell=True, cwd=hf, capture_output=True, text=True, check=True).stdout.split()[0]
    assert digest.ArtifactDigests().of(hf) == shell


def test_an_unchanged_file_is_read_once_and_a_rewritten_one_again(tmp_path, monkeypatch):
    path = tmp_path / "w.gguf"
    path.write_bytes(b"A" * 4096)
    reads = []
    real = digest.file_sha256
    monkeypatch.setattr(digest, "file_sha256", lambda p: reads.append(p) or real(p))
    d = digest.ArtifactDigests()
    first = d.of(path)
    assert d.of(path) == first and len(reads) == 1
    st = os.stat(path)
    with open(path, "r+b") as f:                  # same size, and the modification time put back
        f.write(b"B")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(digest.DigestMismatch, match=f"where the model pins {first}"):
        d.verify(path, first)
    assert len(reads) == 2


def registry(tmp_path):
    from controlplane.serving.registry import ModelRegistry

    async def write(puts, conds):
        return None
    ctl = SimpleNamespace(fleet=SimpleNamespace(nodes={}), writer=SimpleNamespace(write=write))
    return ModelRegistry(ctl)


def test_register_pins_the_digest_and_update_keeps_it_for_the_same_file(tmp_path):
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    want = hashlib.sha256(gguf.read_bytes()).hexdigest()
    r = registry(tmp_path)

    async def main():
        m = await r.register(M.Model(name="tiny", variants=[gguf_variant(str(gguf))]))
        assert m.variants[0].artifact_sha256 == want
        with pytest.raises(errors.FailedPrecondition, match=r"variants\[0\].artifact_sha256: .* has SHA-256"):
            await r.register(M.Model(name="other", variants=[gguf_variant(str(gguf), artifact_sha256="0" * 64)]))
        # an update of the description keeps the pinned digest
        m2 = M.Model()
        m2.CopyFrom(m)
        m2.variants[0].artifact_sha256 = ""
        m2.description = "the same weights"
        assert (await r.update(m2)).variants[0].artifact_sha256 == want
        # new weights at the same path: refused until their digest is given
        with open(gguf, "ab") as f:
            f.write(b"\0" * 64)
        new = hashlib.sha256(gguf.read_bytes()).hexdigest()
        m2.generation = 0
        with pytest.raises(errors.FailedPrecondition, match=f"has SHA-256 {new}, not {want}"):
            await r.update(m2)
        m2.variants[0].artifact = f"file://{gguf}"           # the same file by its URI: still pinned
        with pytest.raises(errors.FailedPrecondition, match=f"has SHA-256 {new}, not {want}"):
            await r.update(m2)
        m2.variants[0].artifact_sha256 = new.upper()
        assert (await r.update(m2)).variants[0].artifact_sha256 == new
    asyncio.run(main())


def test_a_digest_that_is_not_hex_is_refused_naming_the_field(tmp_path):
    from controlplane.serving.validate import validate
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    with pytest.raises(errors.InvalidArgument, match=r"variants\[0\].artifact_sha256.*64 hex digits"):
        validate(M.Model(name="t", variants=[gguf_variant(str(gguf), artifact_sha256="abc")]), [])


def test_the_launcher_refuses_to_start_a_server_on_other_weights(tmp_path):
    """The agent puts the check in front of the server's command (the launcher, run as the workload); the
    launcher exits 65 with both digests on stderr when the file changed, and execs the server when not."""
    import sys

    from nodeagent import backends
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    good = hashlib.sha256(gguf.read_bytes()).hexdigest()
    w = types_pb2.Workload(id="r1", backend=types_pb2.ServingBackend(kind="llama.cpp", artifact=str(gguf),
                                                                     served_name="tiny", context=128,
                                                                     artifact_sha256=good))
    backends.prepare(w, "127.0.0.1", sys.executable)
    argv = list(w.command)
    assert argv[:8] == [sys.executable, "-m", backends.LAUNCHER, "--artifact", str(gguf), "--sha256", good, "--"]
    assert argv[9:11] == ["-m", "nodeagent.backends.llamacpp_server"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    ok = subprocess.run([*argv[:8], sys.executable, "-c", "print('SERVER STARTED')"], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "SERVER STARTED" in ok.stdout, ok.stderr
    with open(gguf, "ab") as f:
        f.write(b"tampered")
    bad = subprocess.run([*argv[:8], sys.executable, "-c", "print('SERVER STARTED')"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 65 and "SERVER STARTED" not in bad.stdout
    assert f"the weights are not the registered ones: SHA-256 " in bad.stderr and good in bad.stderr
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)                                   # never read: refused before any open
    odd = subprocess.run([sys.executable, "-m", backends.LAUNCHER, "--artifact", str(fifo), "--sha256", good,
                          "--", "true"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert odd.returncode == 65 and "not a regular file" in odd.stderr


def test_vllm_gets_the_check_inside_its_launcher():
    from nodeagent import backends
    argv = ["/py", "-m", backends.LAUNCHER, "--", "/vpy", "-c", "x"]
    assert backends.with_weight_check(argv, "/py", "/m", "a" * 64) == [
        "/py", "-m", backends.LAUNCHER, "--artifact", "/m", "--sha256", "a" * 64, "--", "/vpy", "-c", "x"]


def test_hidden_files_are_not_part_of_a_directorys_digest(tmp_path):
    hf = write_hf_dir(tmp_path / "hf", weights=1 << 16)
    before = digest.ArtifactDigests().of(hf)
    (hf / ".cache" / "huggingface").mkdir(parents=True)
    (hf / ".cache" / "huggingface" / "x.metadata").write_text("downloaded at 12:00")
    (hf / ".gitattributes").write_text("*.safetensors filter=lfs")
    assert digest.ArtifactDigests().of(hf) == before
    (hf / "extra.json").write_text("{}")
    assert digest.ArtifactDigests().of(hf) != before
