"""Crash safety of the agent's workload runner: an agent that dies while starting a workload, or in the
middle of a same-node migration's hand-over, never runs the workload twice and never loses its record.
A crash is simulated by raising at the runner's crash points (the real SIGKILL is in
tests/integration/test_workloads.py), then a new runner loads the same directory."""

from __future__ import annotations

import asyncio
import os
import time
import types

import pytest

from gpumesh.v1 import node_service_pb2
from gpumesh.v1 import types_pb2 as t
from nodeagent import workloads as wl
from nodeagent.procfiles import _find_shim
from tests.unit._shims import kill_shims


class Crash(Exception):
    pass


def fake_agent():
    a = types.SimpleNamespace(node="n1", desired={}, handlers={}, session_hooks=[], teardown_hooks=[],
                              claim_hooks=[], gpus=types.SimpleNamespace(nvml=object()))
    a.realized = {s: node_service_pb2.SliceStatus(slice_id=s, state=t.SLICE_STATE_READY, device_uuid="GPU-x")
                  for s in ("s-1", "s-2")}
    return a


@pytest.fixture
def runners(tmp_path):
    made = []

    def make():
        r = wl.WorkloadRunner(fake_agent(), str(tmp_path / "w"))
        made.append(r)
        return r
    yield make
    for r in made:                  # every shim these tests started
        kill_shims(r)


def crash_at(monkeypatch, where):
    def point(self, at):
        if at == where:
            raise Crash(at)
    monkeypatch.setattr(wl.WorkloadRunner, "_crash_point", point)


def spec(wid="w-1", slice_id="s-1"):
    return t.Workload(id=wid, slice_id=slice_id, command=["sleep", "60"], state=t.WORKLOAD_STATE_PENDING)


def full_command(r, *ws):
    q = asyncio.Queue()
    asyncio.run(r.on_command(node_service_pb2.WorkloadCommand(full=True, start=list(ws)), q))
    out = []
    while not q.empty():
        out.extend(q.get_nowait().workloads.workloads)
    return out


def wait_pid_file(r, wid):
    deadline = time.monotonic() + 60
    while not os.path.exists(r.path(wid, "pid")) and time.monotonic() < deadline:
        time.sleep(0.02)


def test_crash_after_launch_readopts_the_supervisor_and_never_starts_twice(runners, monkeypatch):
    r = runners()
    crash_at(monkeypatch, "after-launch")
    with pytest.raises(Crash):
        r.start(spec())
    first = r.popens["w-1"].pid
    monkeypatch.undo()
    wait_pid_file(r, "w-1")

    r2 = runners()                          # the restarted agent
    w = r2.workloads["w-1"]
    assert w.state == t.WORKLOAD_STATE_RUNNING and w.HasField("started_at")
    assert r2.meta["w-1"]["shim_pid"] == first and "starting" not in r2.meta["w-1"]
    # the control plane still has it PENDING (no report came): the full command must not start it again
    full_command(r2, spec())
    assert r2.meta["w-1"]["shim_pid"] == first and "w-1" not in r2.popens
    assert _find_shim(r2.path("w-1", "pid")) == first      # one supervisor, the first one
    r2.check_all(report=False)
    assert r2.workloads["w-1"].state == t.WORKLOAD_STATE_RUNNING and r2.workloads["w-1"].pid > 0


def test_crash_before_launch_marks_it_failed_not_started(runners, monkeypatch):
    r = runners()
    crash_at(monkeypatch, "before-launch")
    with pytest.raises(Crash):
        r.start(spec())
    monkeypatch.undo()
    r2 = runners()
    w = r2.workloads["w-1"]
    assert w.state == t.WORKLOAD_STATE_FAILED and "never started twice" in w.message
    reported = full_command(r2, spec())
    assert reported == [] and _find_shim(r2.path("w-1", "pid")) == 0


def test_a_migration_mark_is_in_the_record_before_the_supervisor_starts(runners, monkeypatch):
    r = runners()
    crash_at(monkeypatch, "after-launch")
    with pytest.raises(Crash):
        r.start(spec(), meta={"migration": "m-1", "criu_hold": True})
    monkeypatch.undo()
    r2 = runners()
    assert r2.meta["w-1"]["migration"] == "m-1" and r2.meta["w-1"]["criu_hold"] is True


@pytest.mark.parametrize("where", ["hand-over", "hand-over-half"])
def test_an_interrupted_hand_over_is_finished_at_load(runners, monkeypatch, where):
    r = runners()
    alias = "w-1~m-1"
    r.start(spec())
    r.start(spec(alias, "s-2"), meta={"migration": "m-1"})
    target_shim = r.meta[alias]["shim_pid"]
    source_shim = r.meta["w-1"]["shim_pid"]
    r.meta[alias]["hand_over_to"] = "w-1"
    r.save(alias)
    crash_at(monkeypatch, where)
    with pytest.raises(Crash):
        r.finish_hand_over(alias)
    monkeypatch.undo()

    r2 = runners()
    assert set(r2.workloads) == {"w-1", f"{alias}~source"}
    assert r2.meta["w-1"]["shim_pid"] == target_shim and r2.workloads["w-1"].slice_id == "s-2"
    assert r2.meta[f"{alias}~source"]["shim_pid"] == source_shim
    assert "hand_over_to" not in r2.meta["w-1"]
    # the control plane's full command in COMMITTED: the workload runs on s-2 (never reported FAILED)
    w = t.Workload(id="w-1", slice_id="s-2", node="n1", state=t.WORKLOAD_STATE_RUNNING, pid=1)
    w.started_at.GetCurrentTime()
    reported = full_command(r2, w)
    assert all(x.state != t.WORKLOAD_STATE_FAILED for x in reported)
    assert r2.workloads["w-1"].state == t.WORKLOAD_STATE_RUNNING and not r2.meta["w-1"].get("stop_at")
    r3 = runners()                           # and loading it again changes nothing
    assert r3.meta["w-1"]["shim_pid"] == target_shim and "hand_over_to" not in r3.meta["w-1"]


def test_a_hand_over_without_a_crash(runners):
    r = runners()
    alias = "w-1~m-1"
    r.start(spec())
    r.start(spec(alias, "s-2"))
    target_shim = r.meta[alias]["shim_pid"]
    r.meta[alias]["hand_over_to"] = "w-1"
    r.finish_hand_over(alias)
    assert r.meta["w-1"]["shim_pid"] == target_shim and "hand_over_to" not in r.meta["w-1"]
    assert runners().meta["w-1"]["shim_pid"] == target_shim


def test_transparent_rollback_after_an_agent_restart_finds_the_running_source(runners):
    """A CRIU dump that did not take the process (it ran on), then an agent restart, then ABORT_SOURCE:
    the source is recognised as running by its supervisor and /proc (no Popen after a restart), its
    frozen mark is cleared and the runner follows it again."""
    from nodeagent.migrate_slices import SlicesMixin
    r = runners()
    r.start(spec())
    wait_pid_file(r, "w-1")
    r.check_all(report=False)
    r.meta["w-1"].update(frozen="m-1", criu_images=r.path("w-1", "criu-m-1"))
    r.save("w-1")

    r2 = runners()                           # restarted: no Popen for the source
    assert "w-1" not in r2.popens and r2.shim_running("w-1")
    mig = types.SimpleNamespace(runner=r2, agent=r2.agent)
    assert asyncio.run(SlicesMixin._abort_transparent(mig, "w-1")) is True
    assert "frozen" not in r2.meta["w-1"] and "criu_images" not in r2.meta["w-1"]
    assert "frozen" not in runners().meta["w-1"]         # durable
    r2.check_all(report=False)
    assert r2.workloads["w-1"].state == t.WORKLOAD_STATE_RUNNING
    r2.stop("w-1")                           # and it is tracked: a stop ends it
    deadline = time.monotonic() + 60
    while r2.workloads["w-1"].state == t.WORKLOAD_STATE_RUNNING and time.monotonic() < deadline:
        r2.check_all(report=False)
        time.sleep(0.05)
    assert r2.workloads["w-1"].state == t.WORKLOAD_STATE_STOPPED


def test_a_hand_over_interrupted_without_the_mark_is_finished_too(runners):
    """Records of an older agent that died between the two renames (no hand_over_to mark): the workload's
    ID goes to the migration's target all the same (the reviewer's handover_crash.py state)."""
    r = runners()
    alias = "w-1~m-1"
    r.start(spec())
    r.start(spec(alias, "s-2"), meta={"migration": "m-1"})
    target_shim = r.meta[alias]["shim_pid"]
    r.rekey("w-1", f"{alias}~source")          # the first rename only
    r2 = runners()
    assert set(r2.workloads) == {"w-1", f"{alias}~source"} and r2.meta["w-1"]["shim_pid"] == target_shim
    w = t.Workload(id="w-1", slice_id="s-2", node="n1", state=t.WORKLOAD_STATE_RUNNING, pid=1)
    w.started_at.GetCurrentTime()
    a = t.Workload(id=alias, slice_id="s-2", node="n1", state=t.WORKLOAD_STATE_PENDING)   # the target, as the
    a.started_at.GetCurrentTime()                                                       # control plane keeps it
    assert all(x.state != t.WORKLOAD_STATE_FAILED for x in full_command(r2, w, a))
    assert r2.workloads["w-1"].state == t.WORKLOAD_STATE_RUNNING and not r2.meta["w-1"].get("stop_at")


def _handed_over_and_ended(r, alias="w-1~m-1"):
    r.start(t.Workload(id="w-1", slice_id="s-1", command=["true"]))
    r.start(t.Workload(id=alias, slice_id="s-2", command=["true"]), meta={"migration": "m-1"})
    r.meta[alias]["hand_over_to"] = "w-1"
    r.finish_hand_over(alias)
    deadline = time.monotonic() + 60
    while any(w.state == t.WORKLOAD_STATE_RUNNING for w in r.workloads.values()):
        assert time.monotonic() < deadline, "the workloads did not end"
        r.check_all(report=False)
        time.sleep(0.02)


def test_expiring_a_handed_over_workload_removes_its_own_files_not_the_sources(runners):
    """After a same-node migration the workload's record keeps the target's files (`w-1~m-1.*`, its stem)
    and the source's record (`w-1~m-1~source`) keeps `w-1.*`: expiring `w-1` removes its own files, so a
    restarted agent does not load it again, and leaves the source's record whole."""
    r = runners()
    alias = "w-1~m-1"
    _handed_over_and_ended(r, alias)
    r.expire("w-1")
    left = sorted(os.listdir(r.dir))
    assert not [f for f in left if f.startswith(f"{alias}.")], left
    r2 = runners()                          # the restarted agent
    assert "w-1" not in r2.workloads


def test_expiring_a_handed_over_workload_removes_the_record_of_its_source_too(runners):
    """The source's record (`w-1~m-1~source`) is reported under a name the control plane does not know, so
    it is never expired on its own: it goes with the workload it was handed over from, with its files (its
    record, log, pid and exit files), here and after a restart."""
    r = runners()
    _handed_over_and_ended(r)
    r.expire("w-1")
    assert r.workloads == {} and os.listdir(r.dir) == []
    assert runners().workloads == {}
