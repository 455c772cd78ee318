"""A starting agent removes the mesh segments a killed run of its own left that no record names
(nodeagent/meshsweep.py), and leaves every other segment on the host alone: a recorded (recoverable) one,
another agent's, one an agent running now holds, one made before segments named their owner."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import types

import pytest

from mesh.transport.shm import PREFIX, ShmRegion, owner_tag, segment_exists, segment_owner, unlink_segment
from nodeagent.meshrecords import BufferRecords
from nodeagent.registrar import Registrar
from tests.unit._mesh_cluster import SliceShm

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAKE = """
import os, sys
from mesh.transport.shm import ShmRegion
regions = []
for arg in sys.argv[2:]:
    bid, owner = arg.split("=")
    regions.append(ShmRegion(bid, 4096, 7, b"s" * 32, outlive_process=True, owner=bytes.fromhex(owner)))
if sys.argv[1] == "kill":
    os.kill(os.getpid(), 9)          # what an agent killed by SIGKILL leaves: its segments, nothing else
print("made", flush=True)
sys.stdin.read()                     # "hold": alive until the test closes stdin
for r in regions:
    r.detach()
"""


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "proto")])}


def made_by_killed_agent(segments: dict[str, bytes]) -> None:
    p = subprocess.run([sys.executable, "-c", MAKE, "kill", *(f"{b}={o.hex()}" for b, o in segments.items())],
                       env=_env(), stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    assert p.returncode == -signal.SIGKILL, p.stderr.decode()


@pytest.fixture
def names():
    made: list[str] = []
    yield made
    for n in made:
        unlink_segment(PREFIX + n)


def _agent(node: str, isolator=None):
    a = types.SimpleNamespace(node=node, endpoint="127.0.0.1:50051", handlers={}, session_hooks=[],
                              desired_hooks=[], desired={})
    if isolator is not None:
        a.isolator = isolator
    return a


def test_a_starting_agent_removes_its_unrecorded_segments_and_no_other(tmp_path, names, caplog):
    tag = f"t{os.getpid()}x{os.urandom(3).hex()}"
    mine, other_dir = str(tmp_path / "agent1" / "mesh" / "n1"), str(tmp_path / "agent2" / "mesh" / "n1")
    ours, theirs = owner_tag("n1", mine), owner_tag("n1", other_dir)
    orphan, recorded, foreign, legacy, held = (f"b-{tag}{k}-s-a" for k in ("o", "r", "f", "l", "h"))
    names += [orphan, recorded, foreign, legacy, held]
    # a killed run of agent n1 left two segments: one its records name (recoverable), one they do not
    # (killed between making the segment and writing its record); another agent on this host (a second
    # node "n1" of a local cluster, its own state directory) and an agent of an older version left theirs
    made_by_killed_agent({orphan: ours, recorded: ours, foreign: theirs, legacy: bytes(8)})
    BufferRecords(mine).save({"buffer_id": recorded, "connection_id": f"m-{tag}", "slice_id": "s-a",
                              "transport": "tcp", "size": 4096, "shm_name": PREFIX + recorded, "address": 65536})
    # one with this agent's tag that a live process holds (an agent of the same node and directory, running)
    holder = subprocess.Popen([sys.executable, "-c", MAKE, "hold", f"{held}={ours.hex()}"], env=_env(),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"made\n"
        iso = SliceShm(f"/dev/shm/gpumesh-test-{tag}")           # the same tmpfs as the segments (hard links)
        iso.share_segment("s-a", "team-a", PREFIX + orphan)        # the slice's workload linked it too
        link = os.path.join(iso.shm_root, "s-a", PREFIX + orphan)
        assert all(segment_exists(PREFIX + n) for n in names) and os.path.exists(link)

        with caplog.at_level(logging.WARNING, logger="nodeagent.meshsweep"):
            r = Registrar(_agent("n1", iso), "127.0.0.1:0", tls=False, state_dir=mine)
        try:
            assert not segment_exists(PREFIX + orphan) and not os.path.lexists(link)
            for n in (recorded, foreign, legacy, held):
                assert segment_exists(PREFIX + n), n
            warned = [rec.fields for rec in caplog.records if rec.levelno == logging.WARNING]
            assert [(w["node"], w["segment"], w["slice_links"]) for w in warned] == [("n1", PREFIX + orphan, 1)]
            assert list(r.records.load()) == [recorded]          # the control plane still decides on that one
        finally:
            r.server.close()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
        shutil.rmtree(f"/dev/shm/gpumesh-test-{tag}", ignore_errors=True)


def test_the_segments_an_agent_makes_and_re_adopts_carry_its_owner_tag(tmp_path, names):
    bid, tag = f"b-t{os.getpid()}a{os.urandom(3).hex()}-s-a", owner_tag("n1", str(tmp_path))
    names.append(bid)
    region = ShmRegion(bid, 4096, 7, b"s" * 32, outlive_process=True)        # made before the tag existed
    region.detach()
    assert segment_owner(PREFIX + bid) == (os.getpid(), bytes(8))
    region = ShmRegion.reopen(bid, 4096, b"s" * 32, owner=tag)                # a restarted agent re-adopts it
    region.detach()
    assert segment_owner(PREFIX + bid) == (os.getpid(), tag)
    region = ShmRegion.reopen(bid, 4096, b"s" * 32)                           # no owner given: kept
    region.set_key(9)
    assert segment_owner(PREFIX + bid) == (os.getpid(), tag)
    region.revoke()
    assert not segment_exists(PREFIX + bid)


def test_a_registered_buffer_s_segment_names_its_agent(tmp_path):
    state = str(tmp_path / "mesh" / "n1")
    agent = _agent("n1")
    agent.desired = {"s-a": types.SimpleNamespace(id="s-a", tenant="team-a")}
    r = Registrar(agent, "127.0.0.1:0", tls=False, state_dir=state)
    try:
        d = r.register("s-a", 4096, "shm", f"m-t{os.getpid()}{os.urandom(3).hex()}", b"s" * 32)
        assert segment_owner(d.shm_name) == (os.getpid(), owner_tag("n1", state))
        assert owner_tag("n1", state) == owner_tag("n1", state + "/.") != owner_tag("n2", state)
    finally:
        r.close()
