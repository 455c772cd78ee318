"""What the model registry accepts as an artifact (mesh/models/artifact.py check_kind, open_regular): a regular
file (GGUF) or a directory of regular files (Hugging Face layout), symbolic links followed. A FIFO, a device or
a socket is refused by its type, INVALID_ARGUMENT naming the field, before anything opens it: Register opened
whatever path it was given, and a FIFO held a worker thread for ever (the open waits for a writer). The paths
are resolved and stat'ed in a worker thread, never on the event loop (a hung network filesystem would stop it).

The FIFO tests cannot hang if that regresses: a reader blocked on the FIFO is seen (a writer's non-blocking open
succeeds only while a reader has it open), released by that writer's open and close, and the test fails."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import threading
from types import SimpleNamespace

import pytest

from controlplane.serving.registry import ModelRegistry
from gpumesh.v1 import model_service_pb2 as M
from mesh import errors
from mesh.models import digest
from tests.models_util import write_hf_dir, write_tiny_gguf
from tests.unit.test_model_validation import gguf_variant, hf_variant

DEADLINE_S = 60.0          # far beyond a stat; reached only when the call hangs on something else
KIND_RULE = "a model is a regular file (GGUF) or a directory (Hugging Face layout)"


def registry() -> ModelRegistry:
    async def write(ops, conds=()):
        return 1
    return ModelRegistry(SimpleNamespace(fleet=SimpleNamespace(nodes={}), writer=SimpleNamespace(write=write)))


def reader_blocked_on(fifo) -> bool:
    """Whether something has `fifo` open for reading (a blocked open or read); if so it is released: the write end
    opened here and closed gives it end of file."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:             # ENXIO: no reader
        return False
    os.close(fd)
    return True


async def refused_without_reading(call, fifo) -> errors.InvalidArgument:
    """The InvalidArgument `call` raises; fails the test (and releases the reader) if it opens `fifo`."""
    task = asyncio.ensure_future(call)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while not task.done():
        if reader_blocked_on(fifo):
            with pytest.raises(Exception):
                await asyncio.wait_for(task, DEADLINE_S)
            pytest.fail(f"{fifo} was opened for reading: the call waited for a writer")
        if loop.time() > deadline:
            task.cancel()
            pytest.fail(f"no answer in {DEADLINE_S:g}s")
        await asyncio.sleep(0.01)
    with pytest.raises(errors.InvalidArgument) as e:
        task.result()
    return e.value


async def test_a_fifo_is_refused_by_its_type_without_being_opened(tmp_path):
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    r = registry()
    e = await refused_without_reading(r.register(M.Model(name="tiny", variants=[gguf_variant(str(fifo))])), fifo)
    assert e.field == "model.variants[0].artifact"
    assert f"model.variants[0].artifact: {fifo} is a FIFO; {KIND_RULE}" in str(e)
    e = await refused_without_reading(r.register(M.Model(name="tiny", variants=[hf_variant(f"file://{fifo}")])),
                                      fifo)
    assert e.field == "model.variants[0].artifact" and f"{fifo} is a FIFO; {KIND_RULE}" in str(e)
    assert r.models == {}


async def test_a_directory_holding_a_fifo_is_refused_without_opening_it(tmp_path):
    """config.json was read whatever it was; a weights file that is a FIFO would hang the agent's server."""
    hf = write_hf_dir(tmp_path / "hf")
    os.rename(hf / "config.json", tmp_path / "config.json")
    os.mkfifo(hf / "config.json")
    r = registry()
    e = await refused_without_reading(r.register(M.Model(name="hf", variants=[hf_variant(str(hf), weight_bytes=4096)])),
                                      hf / "config.json")
    assert e.field == "model.variants[0].artifact"
    assert f"{hf / 'config.json'} is a FIFO; a Hugging Face directory holds regular files" in str(e)
    os.unlink(hf / "config.json")
    os.rename(tmp_path / "config.json", hf / "config.json")
    os.mkfifo(hf / "sub.safetensors")
    e = await refused_without_reading(r.register(M.Model(name="hf", variants=[hf_variant(str(hf), weight_bytes=4096)])),
                                      hf / "sub.safetensors")
    assert f"{hf / 'sub.safetensors'} is a FIFO" in str(e)
    os.unlink(hf / "sub.safetensors")
    ok = await r.register(M.Model(name="hf", variants=[hf_variant(str(hf), weight_bytes=4096)]))
    assert ok.variants[0].artifact_sha256                   # the same directory of regular files: registered


async def test_a_device_is_refused_by_its_type():
    if not os.path.exists("/dev/null"):
        pytest.skip("no /dev/null")
    with pytest.raises(errors.InvalidArgument, match=re.escape(f"/dev/null is a character device; {KIND_RULE}")) as e:
        await asyncio.wait_for(registry().register(M.Model(name="n", variants=[gguf_variant("/dev/null")])),
                               DEADLINE_S)
    assert e.value.field == "model.variants[0].artifact"


async def test_a_symbolic_link_to_a_regular_file_is_registered(tmp_path):
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    link = tmp_path / "current.gguf"
    link.symlink_to(gguf)
    m = await registry().register(M.Model(name="tiny", variants=[gguf_variant(str(link))]))
    assert m.variants[0].artifact == str(link)
    assert m.variants[0].artifact_sha256 == hashlib.sha256(gguf.read_bytes()).hexdigest()


async def test_paths_are_resolved_and_stated_off_the_event_loop(tmp_path, monkeypatch):
    """Update compared the new artifact with the registered one (os.path.realpath) on the event loop."""
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    on_loop = []
    loop_thread = threading.current_thread()

    def watch(real):
        def call(path, *a, **kw):
            if str(tmp_path) in os.fspath(path) and threading.current_thread() is loop_thread:
                on_loop.append((real.__name__, os.fspath(path)))
            return real(path, *a, **kw)
        return call
    monkeypatch.setattr(os.path, "realpath", watch(os.path.realpath))
    monkeypatch.setattr(os, "stat", watch(os.stat))
    r = registry()
    m = await r.register(M.Model(name="tiny", variants=[gguf_variant(str(gguf))]))
    update = M.Model()
    update.CopyFrom(m)
    update.variants[0].artifact_sha256 = ""
    update.description = "the same weights"
    assert (await r.update(update)).variants[0].artifact_sha256 == m.variants[0].artifact_sha256
    assert on_loop == []


def test_a_link_loop_in_a_model_directory_ends_the_walk_there(tmp_path):
    """Two links back to an ancestor made os.walk(followlinks=True) nest 2^depth directories until the path was
    too long; the walk (mesh/models/digest.py `walk`) enters no directory that is one of its own ancestors, and a
    linked directory that is not a loop is walked as before."""
    from mesh.models.digest import files_below
    d = tmp_path / "model"
    (d / "sub").mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / "sub" / "w.bin").write_bytes(b"x")
    (d / "sub" / "up").symlink_to("..")          # one loop: before, 40 nested copies (two: 2^40, a hang)
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "t.json").write_text("{}")
    (d / "tok").symlink_to(tmp_path / "shared")
    assert files_below(d) == ["config.json", "sub/w.bin", "tok/t.json"]


async def test_a_broken_link_in_a_model_directory_is_refused_naming_it(tmp_path):
    """A link that resolves to nothing (dangling: the snapshot link of an interrupted Hugging Face download to a blob
    that never arrived; or in a loop) was left out as no file, so an incomplete directory registered and failed only
    when a replica loaded it. Register now refuses it, naming the link and where it points; without it the same
    directory registers."""
    hf = write_hf_dir(tmp_path / "hf")
    r = registry()
    (hf / "gone.safetensors").symlink_to(tmp_path / "nowhere")
    with pytest.raises(errors.InvalidArgument) as e:
        await r.register(M.Model(name="hf", variants=[hf_variant(str(hf), weight_bytes=4096)]))
    assert e.value.field == "model.variants[0].artifact"
    assert f"{hf / 'gone.safetensors'} is a link to {str(tmp_path / 'nowhere')!r}, which does not exist" in str(e.value)
    os.unlink(hf / "gone.safetensors")
    (hf / "loop.safetensors").symlink_to(hf / "loop.safetensors")
    with pytest.raises(errors.InvalidArgument, match=re.escape(f"{hf / 'loop.safetensors'} is a link in a loop")):
        await r.register(M.Model(name="hf", variants=[hf_variant(str(hf), weight_bytes=4096)]))
    os.unlink(hf / "loop.safetensors")
    assert r.models == {}
    m = await r.register(M.Model(name="hf", variants=[hf_variant(str(hf), weight_bytes=4096)]))
    assert m.variants[0].artifact_sha256 == digest.DIGESTS.of(hf)