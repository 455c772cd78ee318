"""Live migration and restore of a real PyTorch training loop, across processes.

Each test runs tools/examples/train_mnist_like.py (an MLP with dropout, Adam, data from
the registered RNG) and compares the final state, bit for bit, with an unmigrated
reference run of the same seed and step count.
"""

from __future__ import annotations

import os
import signal

import pytest

pytest.importorskip("torch", reason="torch is not installed (pip install 'gpumesh[torch]')")

from mesh.checkpoint.agent_link import AgentLink, CommandError  # noqa: E402
from mesh.checkpoint.precopy import MigrationFailed, PrecopyMigration, PrecopyPolicy, stop_and_copy  # noqa: E402
from mesh.checkpoint.transfer_auth import SECRET_FILE_ENV, write_secret_file  # noqa: E402
from tests.unit._checkpoint_util import (assert_same_state, clean_env, finish, run_example,  # noqa: E402
                                         start_example, wait_for_socket, wait_for_step)

STEPS = "1000"
SLOW = ("--sleep-ms", "10")  # a 10 s run at least: the migrations land mid-run even on a stalled worker


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    out = run_example("--steps", STEPS, "--final-dir", str(d / "final"))
    return str(d / "final"), out[-1]["checksum"]


SECRETS = {"to-b": bytes(range(32)), "to-c": bytes(range(1, 33)), "m2": bytes(range(2, 34))}


def start(tmp_path, name: str, receive: str | None = None):
    sock = str(tmp_path / f"{name}.sock")
    env = clean_env(GPUMESH_CHECKPOINT_SOCKET=sock)
    if receive:
        env["GPUMESH_RESTORE_FROM"] = f"receive:{receive}@127.0.0.1:0"
        env[SECRET_FILE_ENV] = write_secret_file(tmp_path / f"{name}.secret", SECRETS[receive])
    return start_example("--steps", STEPS, *SLOW, "--final-dir", str(tmp_path / f"{name}-final"), env=env), sock


def test_migrates_mid_training_bit_identically(tmp_path, reference):
    """a -> b by pre-copy, then b -> c by stop-and-copy; c finishes equal to the reference."""
    procs = {}
    procs["a"], a = start(tmp_path, "a")
    procs["b"], b = start(tmp_path, "b", receive="to-b")
    procs["c"], c = start(tmp_path, "c", receive="to-c")
    try:
        for name, sock in (("a", a), ("b", b), ("c", c)):
            wait_for_socket(sock, procs[name])
        with AgentLink(a) as link:
            wait_for_step(link, 20)
        pre = PrecopyMigration(a, b, secret=SECRETS["to-b"], policy=PrecopyPolicy(stop_bytes=0, max_rounds=2, shrink_ratio=1.0)).run()
        assert [r.round for r in pre.rounds] == [0, 1, 2, 3]
        assert [r.paused for r in pre.rounds] == [False, False, False, True]
        # every round resends what changed since the last; how many steps ran in between depends on the
        # machine's speed, so only the first (whole) round is a known size
        assert 20 <= pre.step < int(STEPS) and pre.bytes_sent >= pre.state_bytes
        assert pre.downtime_ms <= pre.total_ms
        with AgentLink(b) as link:
            wait_for_step(link, pre.step + 3)
        snc = stop_and_copy(b, c, secret=SECRETS["to-c"])
        assert all(r.paused for r in snc.rounds) and pre.step + 3 <= snc.step < int(STEPS)
        a_out, b_out, c_out = finish(procs["a"]), finish(procs["b"]), finish(procs["c"])
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    assert not any(line.get("done") for line in a_out + b_out), "the sources stopped after migrating"
    assert b_out[0]["started_at"] == pre.step and c_out[0]["started_at"] == snc.step
    assert c_out[-1]["done"] and c_out[-1]["checksum"] == reference[1]
    assert_same_state(reference[0], str(tmp_path / "c-final"))


def test_restores_from_the_store_after_a_kill(tmp_path, reference):
    sock = str(tmp_path / "w.sock")
    store = str(tmp_path / "store" / "latest")
    p = start_example("--steps", STEPS, *SLOW, env=clean_env(GPUMESH_CHECKPOINT_SOCKET=sock))
    try:
        wait_for_socket(sock, p)
        with AgentLink(sock) as link:
            wait_for_step(link, 15)
            first = link.call("checkpoint", path=store)
            wait_for_step(link, first["step"] + 10)
            second = link.call("checkpoint", path=store)  # replaces the first
            assert second["step"] > first["step"]
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    finally:
        if p.poll() is None:
            p.kill()
    out = run_example("--steps", STEPS, "--final-dir", str(tmp_path / "final"),
                      env=clean_env(GPUMESH_RESTORE_FROM=store))
    assert out[0]["started_at"] == second["step"]
    assert out[-1]["checksum"] == reference[1]
    assert_same_state(reference[0], str(tmp_path / "final"))


def test_failed_migration_resumes_the_source(tmp_path):
    src, src_sock = start(tmp_path, "src")
    dst, dst_sock = start(tmp_path, "dst", receive="m2")
    wait_for_socket(src_sock, src)
    wait_for_socket(dst_sock, dst)
    try:
        with AgentLink(src_sock) as link:
            wait_for_step(link, 5)
            addr = None
            with AgentLink(dst_sock) as t:
                while not addr:
                    addr = t.call("status")["receive_address"]
            dst.kill()
            dst.wait()
            with pytest.raises(MigrationFailed) as exc:
                stop_and_copy(src_sock, _DeadTarget(addr), secret=SECRETS["m2"], policy=PrecopyPolicy(target_timeout=2, connect_timeout=1))
            assert exc.value.resumed_source
            step = link.call("status")["step"]
            wait_for_step(link, step + 3)  # training goes on
            assert link.call("status")["paused"] is False
            with pytest.raises(CommandError, match="no pre-copy session"):
                link.call("final")
            link.call("stop")
        out = finish(src)
    finally:
        for p in (src, dst):
            if p.poll() is None:
                p.kill()
    assert not any(line.get("done") for line in out)


class _DeadTarget:
    """A target whose process is gone but whose address the engine was given."""

    def __init__(self, addr: str) -> None:
        self.addr = addr

    def call(self, cmd: str, **args):
        if cmd == "status":
            return {"receive_address": self.addr, "receive_session": "m2"}
        raise ConnectionError("target gone")
