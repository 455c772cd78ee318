"""Retention (controlplane/controllers/retention.py): which finished records expire, and what is sent to delete their files;
the agent's side (forget a workload's files, delete a checkpoint directory in the store)."""

from __future__ import annotations

import asyncio
import os
import time
from types import SimpleNamespace

from controlplane.state import keys
from controlplane.controllers.slices import Controller
from controlplane.controllers.retention import Retention
from controlplane.controllers.workloads import WorkloadManager
from gpumesh.v1 import migration_service_pb2 as M
from gpumesh.v1 import types_pb2 as t

DAY = 86400.0


class RecordingWriter:
    def __init__(self):
        self.deleted: list[bytes] = []

    async def write(self, ops, conds=()):
        self.deleted += [o.key for o in ops]
        return 1


class Session:
    def __init__(self):
        self.sent = []

    def send(self, msg):
        self.sent.append(msg)


def ts(seconds_ago: float, now: float):
    from google.protobuf import timestamp_pb2
    x = timestamp_pb2.Timestamp()
    x.FromNanoseconds(int((now - seconds_ago) * 1e9))
    return x


def world(now: float):
    ctl = Controller(store=None)
    ctl.writer = RecordingWriter()
    session = Session()
    ctl.sessions.by_node["n1"] = session
    wm = WorkloadManager(ctl)

    def wl(wid, state, ended_ago):
        w = t.Workload(id=wid, node="n1", state=state, created_at=ts(ended_ago + 10, now))
        if ended_ago is not None and state in (t.WORKLOAD_STATE_SUCCEEDED, t.WORKLOAD_STATE_STOPPED,
                                               t.WORKLOAD_STATE_FAILED):
            w.finished_at.CopyFrom(ts(ended_ago, now))
        wm.workloads[wid] = w
    wl("w-old", t.WORKLOAD_STATE_SUCCEEDED, 8 * DAY)          # expires
    wl("w-new", t.WORKLOAD_STATE_STOPPED, 1 * DAY)            # kept: within retention
    wl("w-run", t.WORKLOAD_STATE_RUNNING, 30 * DAY)           # kept: runs
    wl("w-mig", t.WORKLOAD_STATE_FAILED, 30 * DAY)            # kept: a migration of it is in progress
    mm = SimpleNamespace(migrations={}, checkpoints={}, checkpoint_keys={}, reports={}, watchers={}, tasks={})
    mm.migrations["m-done"] = M.Migration(id="m-done", workload_id="w-new", phase=M.MIGRATION_PHASE_DONE,
                                          updated_at=ts(9 * DAY, now))
    mm.migrations["m-recent"] = M.Migration(id="m-recent", workload_id="w-new", phase=M.MIGRATION_PHASE_ABORTED,
                                            updated_at=ts(DAY, now))
    mm.migrations["m-active"] = M.Migration(id="m-active", workload_id="w-mig", phase=M.MIGRATION_PHASE_COPYING,
                                            checkpoint_id="ck-used", updated_at=ts(20 * DAY, now))
    for i in range(5):      # w-new: 5 recent checkpoints (ck-4 the newest), 2 kept by count
        mm.checkpoints[f"ck-{i}"] = M.CheckpointInfo(id=f"ck-{i}", workload_id="w-new", node="n1",
                                                     path=f"t/w-new/ck-{i}", created_at=ts(DAY - i * 60, now))
    mm.checkpoints["ck-aged"] = M.CheckpointInfo(id="ck-aged", workload_id="w-run", node="n1", path="t/w-run/aged",
                                                 created_at=ts(10 * DAY, now))
    mm.checkpoints["ck-of-old"] = M.CheckpointInfo(id="ck-of-old", workload_id="w-old", node="n1", path="t/w-old/x",
                                                   created_at=ts(9 * DAY, now))
    mm.checkpoints["ck-used"] = M.CheckpointInfo(id="ck-used", workload_id="w-mig", node="n1", path="t/w-mig/u",
                                                 created_at=ts(40 * DAY, now))
    mm.checkpoint_keys.update({c: b"k" * 32 for c in mm.checkpoints})
    return ctl, wm, mm, session


def test_finished_records_expire_with_their_files():
    now = time.time()
    ctl, wm, mm, session = world(now)
    r = Retention(ctl, wm, mm, retention_s=7 * DAY, checkpoints_kept=2)
    counts = asyncio.run(r.sweep(now))
    assert set(wm.workloads) == {"w-new", "w-run", "w-mig"}
    assert set(mm.migrations) == {"m-recent", "m-active"}
    # the newest 2 of w-new's, and the one an unfinished migration restores from
    assert set(mm.checkpoints) == {"ck-3", "ck-4", "ck-used"}
    assert set(mm.checkpoint_keys) == set(mm.checkpoints)       # an expired one's sealing key is not kept in memory
    assert counts == {"workloads": 1, "migrations": 1, "checkpoints": 5, "events": 0}
    assert set(ctl.writer.deleted) == {keys.workload("w-old"), keys.migration("m-done"),
                                       *(keys.checkpoint(c) for c in ("ck-0", "ck-1", "ck-2", "ck-aged", "ck-of-old")),
                                       # a checkpoint's own sealing key (tenants without a key) goes with it
                                       *(keys.checkpoint_key(c) for c in ("ck-0", "ck-1", "ck-2", "ck-aged", "ck-of-old"))}
    forgets = [m.workloads.forget for m in session.sent if m.WhichOneof("kind") == "workloads"]
    assert [list(f) for f in forgets] == [["w-old"]]
    deletes = sorted(m.migration.path for m in session.sent if m.WhichOneof("kind") == "migration")
    assert deletes == sorted(["t/w-new/ck-0", "t/w-new/ck-1", "t/w-new/ck-2", "t/w-run/aged", "t/w-old/x"])
    assert all(m.migration.action == M.MigrationCommand.DELETE_CHECKPOINT for m in session.sent
               if m.WhichOneof("kind") == "migration")
    # a second sweep finds nothing more
    assert asyncio.run(r.sweep(now)) == {"workloads": 0, "migrations": 0, "checkpoints": 0, "events": 0}


def test_an_agent_away_at_expiry_is_told_when_it_reports_the_workload():
    now = time.time()
    ctl, wm, mm, session = world(now)
    del ctl.sessions.by_node["n1"]
    r = Retention(ctl, wm, mm, retention_s=7 * DAY)
    asyncio.run(r.sweep(now))
    assert "w-old" in wm.expired_ids
    back = Session()
    ctl.sessions.by_node["n1"] = back
    from gpumesh.v1 import node_service_pb2 as N
    asyncio.run(wm._report("n1", N.WorkloadStatusReport(full=True, workloads=[
        t.Workload(id="w-old", state=t.WORKLOAD_STATE_SUCCEEDED)])))
    assert [list(m.workloads.forget) for m in back.sent] == [["w-old"]]
    assert "w-old" not in wm.expired_ids


def test_agent_deletes_forgotten_workload_files_and_expired_checkpoints(tmp_path):
    from nodeagent.migrate import MigrationAgent
    from nodeagent.workloads import WorkloadRunner
    runner = WorkloadRunner.__new__(WorkloadRunner)
    runner.dir, runner.workloads, runner.meta, runner.popens = str(tmp_path / "wl"), {}, {}, {}
    from nodeagent.workload_logs import LogStreamer
    runner.logs = LogStreamer(runner)
    os.makedirs(runner.dir)
    for ext in ("json", "log", "exit"):
        (tmp_path / "wl" / f"w-1.{ext}").write_text("x")
    runner.workloads["w-1"] = t.Workload(id="w-1", state=t.WORKLOAD_STATE_SUCCEEDED)
    (tmp_path / "wl" / "w-2.log").write_text("still running")
    runner.workloads["w-2"] = t.Workload(id="w-2", state=t.WORKLOAD_STATE_RUNNING)
    runner.expire("w-1")
    runner.expire("w-2")
    assert sorted(os.listdir(runner.dir)) == ["w-2.log"]
    store = tmp_path / "store"
    (store / "t" / "w-1" / "ck-1").mkdir(parents=True)
    (store / "t" / "w-1" / "ck-1" / "pages.img").write_text("x")
    ma = MigrationAgent(SimpleNamespace(node="n1"), runner, checkpoint_dir=str(store))
    sent = []
    ma.outbox = SimpleNamespace(put_nowait=sent.append)
    asyncio.run(ma.on_command(M.MigrationCommand(migration_id="ck-1", action=M.MigrationCommand.DELETE_CHECKPOINT,
                                                 path="t/w-1/ck-1"), ma.outbox))
    assert not (store / "t" / "w-1" / "ck-1").exists() and not sent
    outside = tmp_path / "outside"
    outside.mkdir()
    asyncio.run(ma.on_command(M.MigrationCommand(migration_id="ck-x", action=M.MigrationCommand.DELETE_CHECKPOINT,
                                                 path="../outside"), ma.outbox))
    assert outside.exists()                      # a path that leaves the store is refused


def test_a_restore_being_planned_keeps_its_checkpoint_and_workload():
    """A Restore whose migration record is still being written (MigrationManager.planning) counts as in
    progress: the sweep that runs meanwhile keeps the checkpoint it restores from and its workload."""
    now = time.time()
    ctl, wm, mm, session = world(now)
    mm.planning = {"m-new": M.Migration(id="m-new", workload_id="w-old", checkpoint_id="ck-of-old")}
    r = Retention(ctl, wm, mm, retention_s=7 * DAY, checkpoints_kept=2)
    asyncio.run(r.sweep(now))
    assert "w-old" in wm.workloads and "ck-of-old" in mm.checkpoints


def test_a_restore_that_begins_between_two_writes_of_a_sweep_keeps_its_checkpoint():
    """The sweep decided once what expires, then wrote it in chunks with awaits between: a Restore of an
    expiring checkpoint that began after the first chunk lost the checkpoint (and its workload) to a later one.
    Each chunk is judged again before its write, and what it deletes leaves memory first."""
    from controlplane.controllers import retention
    now = time.time()
    ctl, wm, mm, session = world(now)
    mm.planning = {}
    written = []

    class Writer:
        async def write(self, ops, conds=()):
            written.append([o.key for o in ops])
            if len(written) == 1:        # a Restore of ck-of-old begins while the first chunk is written
                assert "ck-of-old" in mm.checkpoints      # not in this chunk: still there to restore from
                mm.planning["m-new"] = M.Migration(id="m-new", workload_id="w-old", checkpoint_id="ck-of-old")
            return 1
    ctl.writer = Writer()
    events = SimpleNamespace(oldest_first=lambda: [SimpleNamespace(id=f"e{i}", last_timestamp=ts(30 * DAY, now))
                                                   for i in range(retention.MAX_OPS)], drop=lambda i: None)
    r = Retention(ctl, wm, mm, retention_s=7 * DAY, checkpoints_kept=2)
    r.events, r.events_retention_s, r.events_kept = events, 7 * DAY, 10
    asyncio.run(r.sweep(now))
    assert len(written) >= 2 and len(written[0]) == retention.MAX_OPS      # the events filled the first chunk
    later = [k for chunk in written[1:] for k in chunk]
    assert keys.checkpoint("ck-of-old") not in later and keys.workload("w-old") not in later
    assert "ck-of-old" in mm.checkpoints and "w-old" in wm.workloads
    assert keys.checkpoint("ck-aged") in later and "ck-aged" not in mm.checkpoints    # the rest went
