"""STOP_SOURCE whose SDK does not stop the source: the agent stops it itself (SIGTERM, SIGKILL after the stop
grace). With a stop grace under the 10 s the agent waits for the SDK, the runner already sent a SIGKILL during
that wait and marked it `killed`; the re-stop then starts a new grace, and its SIGKILL was never sent (the
runner sends it only while no `killed` mark is there), and the mark stayed in the record across restarts."""

from __future__ import annotations

import itertools
import signal
import time
import types

from gpumesh.v1 import migration_service_pb2 as M
from gpumesh.v1 import types_pb2 as t
from nodeagent import migrate_source
from nodeagent import workloads as wl
from nodeagent.migrate import MigrationAgent
from tests.unit._shims import kill_shims
from tests.unit.test_migration_stop_target_race import agent_with_slice


async def test_the_restop_after_an_unanswered_sdk_stop_sends_its_sigkill_again(tmp_path, monkeypatch):
    a = agent_with_slice()
    r = wl.WorkloadRunner(a, str(tmp_path / "w"), stop_grace=0)
    m = MigrationAgent(a, r)
    try:
        r.start(t.Workload(id="w-1", slice_id="s-1", command=["sleep", "60"]))     # no SDK: the stop call fails
        sent = []
        # a source that no signal ends while the test looks (a process in uninterruptible sleep): the signals
        # are recorded, not delivered
        monkeypatch.setattr(wl.WorkloadRunner, "_signal", lambda self, wid, sig: sent.append(sig))
        # the 10 s wait for the SDK, in steps of a second (the loop still sleeps and checks between them)
        ticks = itertools.count(time.monotonic(), 1.0)
        monkeypatch.setattr(migrate_source, "time", types.SimpleNamespace(time=time.time,
                                                                          monotonic=lambda: next(ticks)))
        reports = []
        await m._stop_source(M.MigrationCommand(migration_id="m-1", action=M.MigrationCommand.STOP_SOURCE,
                                                workload_id="w-1"), lambda event, **k: reports.append(event))
        assert reports == [M.MigrationReport.SOURCE_STOPPED]
        assert sent == [signal.SIGKILL, signal.SIGTERM], "the wait's SIGKILL, then the re-stop's SIGTERM"
        assert not r.meta["w-1"].get("killed"), "the re-stop's grace has not ended in the record"
        time.sleep(0.01)
        r.check_all(report=False)       # the re-stop's grace (0 s) is over
        assert sent == [signal.SIGKILL, signal.SIGTERM, signal.SIGKILL], "no SIGKILL after the re-stop's grace"
        assert r.meta["w-1"]["killed"]
    finally:
        monkeypatch.undo()
        kill_shims(r)


async def test_a_source_that_ends_just_before_the_restop_still_ends_as_the_migrations_stop(tmp_path, monkeypatch):
    """The source's supervisor ends between the last look of the wait and the re-stop: the runner's stop does
    nothing (it ended on its own), and the stop it had must stand; it was cleared, so the source's end read
    as a workload killed by itself (FAILED) instead of STOPPED by its migration."""
    a = agent_with_slice()
    r = wl.WorkloadRunner(a, str(tmp_path / "w"), stop_grace=3600)
    m = MigrationAgent(a, r)
    try:
        r.start(t.Workload(id="w-1", slice_id="s-1", command=["sleep", "60"]))
        alive = [True]
        real_stop = wl.WorkloadRunner.stop

        def stop_after_the_end(self, wid):
            alive[0] = False            # the supervisor is gone by the time the re-stop looks
            real_stop(self, wid)
        monkeypatch.setattr(wl.WorkloadRunner, "shim_running", lambda self, wid: alive[0])
        monkeypatch.setattr(wl.WorkloadRunner, "stop", stop_after_the_end)
        ticks = itertools.count(time.monotonic(), 1.0)
        monkeypatch.setattr(migrate_source, "time", types.SimpleNamespace(time=time.time,
                                                                          monotonic=lambda: next(ticks)))
        await m._stop_source(M.MigrationCommand(migration_id="m-1", action=M.MigrationCommand.STOP_SOURCE,
                                                workload_id="w-1"), lambda event, **k: None)
        assert r.meta["w-1"].get("stop_at"), "the migration's stop was cleared"
        r.check_all(report=False)
        w = r.workloads["w-1"]
        assert w.state == t.WORKLOAD_STATE_STOPPED, (t.WorkloadState.Name(w.state), w.message)
        assert "migrated (m-1)" in w.message
    finally:
        monkeypatch.undo()
        kill_shims(r)


def test_a_source_sdk_answering_numbers_out_of_range_fails_the_send(tmp_path, monkeypatch):
    """The workload's checkpoint SDK is the tenant's code: a `status` or round answered with a number past int64
    (state_bytes 2^64) made building the report raise ValueError, which the send thread did not catch: it died
    without a final report, and SEND was never answered (the migration waited out its copy timeout). It is now a
    FAILED report naming the answer."""
    a = agent_with_slice(ready=False)
    r = wl.WorkloadRunner(a, str(tmp_path / "w"), stop_grace=0)
    m = MigrationAgent(a, r)

    class Link:                   # the tenant's SDK over the control socket
        def call(self, cmd, **kw):     # a whole pre-copy that goes well, but for its state_bytes
            return {"status": {"state_bytes": 2 ** 64}, "dirty": {"bytes": 0}, "pause": {"step": 1},
                    "final": {"entries": 1, "bytes": 10, "seconds": 0.1, "committed": {"step": 1}},
                    }.get(cmd, {"entries": 1, "bytes": 10, "seconds": 0.1, "mb_per_s": 100.0})

        def close(self):
            pass
    monkeypatch.setattr(m, "_link", lambda wid, timeout=0: Link())
    monkeypatch.setattr(m, "_outbound", lambda wid, address: None)
    monkeypatch.setattr(m, "_secret", lambda cmd: b"k" * 32)
    sent = []
    monkeypatch.setattr(m, "_send", lambda rep: sent.append(rep))
    job = migrate_source.Job("m-1", "w-1")
    cmd = M.MigrationCommand(migration_id="m-1", action=M.MigrationCommand.SEND, workload_id="w-1",
                             address="127.0.0.1:9", session="mig-m-1")
    m._run_send(job, cmd, lambda event, **k: None)
    assert job.done and sent == [job.final]
    assert job.final.event == M.MigrationReport.FAILED and "out of range" in job.final.message
