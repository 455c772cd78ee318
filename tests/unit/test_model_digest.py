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
    if shutil.which("sha256sum") is None:
        pytest.skip("sha256sum is not installed: the shell pipeline of the module's doc cannot run")
    shell = subprocess.run("find . -type f | sed 's|^\\./||' | LC_ALL=C sort | xargs sha256sum | sha256sum",
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
        m2.variants[0].artifact_sha256 = new.upper()
        assert (await r.update(m2)).variants[0].artifact_sha256 == new
    asyncio.run(main())


def test_a_digest_that_is_not_hex_is_refused_naming_the_field(tmp_path):
    from controlplane.serving.validate import validate
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    with pytest.raises(errors.InvalidArgument, match=r"variants\[0\].artifact_sha256.*64 hex digits"):
        validate(M.Model(name="t", variants=[gguf_variant(str(gguf), artifact_sha256="abc")]), [])


def test_the_agent_refuses_to_start_a_backend_on_other_weights(tmp_path):
    from nodeagent import backends
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    good = hashlib.sha256(gguf.read_bytes()).hexdigest()
    w = types_pb2.Workload(id="r1", backend=types_pb2.ServingBackend(kind="llama.cpp", artifact=str(gguf),
                                                                     served_name="tiny", context=128,
                                                                     artifact_sha256=good))
    backends.prepare(w, "127.0.0.1", "/usr/bin/python3")
    assert w.command and w.endpoint.startswith("127.0.0.1:")
    with open(gguf, "ab") as f:
        f.write(b"tampered")
    w2 = types_pb2.Workload(id="r2", backend=w.backend)
    with pytest.raises(ValueError, match=f"not the registered ones: SHA-256 [0-9a-f]{{64}} where the model pins {good}"):
        backends.prepare(w2, "127.0.0.1", "/usr/bin/python3")
    assert not w2.command
