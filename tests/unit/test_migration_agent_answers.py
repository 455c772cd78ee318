"""The agent never answers a step as done when it is not: RESUME_TARGET for a target that does not run, and
ABORT_SOURCE for a source whose resume failed, answer FAILED (so the control plane asks again or stops)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from gpumesh.v1 import migration_service_pb2 as M
from gpumesh.v1 import types_pb2 as t
from nodeagent.migrate import MigrationAgent

C, R = M.MigrationCommand, M.MigrationReport


class Runner:
    """The workload runner's surface the migration steps use, without processes."""

    def __init__(self, tmp_path, workloads: dict, meta: dict) -> None:
        self.workloads, self.meta, self.tmp, self.popens = workloads, meta, tmp_path, {}
        self.reported: list = []

    def path(self, wid: str, ext: str) -> str:
        return str(self.tmp / f"{wid}.{ext}")

    def socket_path(self, wid: str) -> str:
        return str(self.tmp / f"{wid}.sock")          # nothing listens there

    def save(self, wid: str) -> None:
        pass

    def report(self, ws) -> None:
        self.reported.extend(ws)


def run(ma: MigrationAgent, cmd: M.MigrationCommand) -> list:
    sent: list = []
    asyncio.run(ma.on_command(cmd, SimpleNamespace(put_nowait=sent.append)))
    return [(m.migration.event, m.migration.message) for m in sent if m.HasField("migration")]


def agent(tmp_path, state: int, meta: dict) -> MigrationAgent:
    w = t.Workload(id="w-1", node="b", state=state, message="stopped by the full command")
    return MigrationAgent(SimpleNamespace(node="b"), Runner(tmp_path, {"w-1": w}, {"w-1": meta}))


def test_resume_target_fails_for_a_target_that_was_stopped_before_it_was_resumed(tmp_path):
    ma = agent(tmp_path, t.WORKLOAD_STATE_STOPPED, {"migration": "m-1"})
    answers = run(ma, M.MigrationCommand(migration_id="m-1", action=C.RESUME_TARGET, workload_id="w-1"))
    assert [e for e, _ in answers] == [R.FAILED]
    assert "not running" in answers[0][1]


def test_resume_target_asked_again_after_the_resumed_target_ended_is_answered_resumed(tmp_path):
    ma = agent(tmp_path, t.WORKLOAD_STATE_SUCCEEDED, {})    # the first RESUME_TARGET cleared the mark
    answers = run(ma, M.MigrationCommand(migration_id="m-1", action=C.RESUME_TARGET, workload_id="w-1"))
    assert [e for e, _ in answers] == [R.TARGET_RESUMED]


def test_abort_source_whose_resume_fails_answers_failed(tmp_path):
    ma = agent(tmp_path, t.WORKLOAD_STATE_RUNNING, {})      # runs, but its SDK socket does not answer
    (tmp_path / "w-1.sock").write_text("")                 # there, nothing listening: connection refused
    answers = run(ma, M.MigrationCommand(migration_id="m-1", action=C.ABORT_SOURCE, workload_id="w-1"))
    assert [e for e, _ in answers] == [R.FAILED]
    assert "did not resume" in answers[0][1]


def test_abort_source_of_a_source_that_ended_answers_resumed(tmp_path):
    ma = agent(tmp_path, t.WORKLOAD_STATE_SUCCEEDED, {})    # nothing to resume: the workload record says so
    answers = run(ma, M.MigrationCommand(migration_id="m-1", action=C.ABORT_SOURCE, workload_id="w-1"))
    assert [e for e, _ in answers] == [R.SOURCE_RESUMED]


def test_abort_source_of_a_process_without_the_sdk_answers_resumed(tmp_path):
    ma = agent(tmp_path, t.WORKLOAD_STATE_RUNNING, {})      # no SDK socket: nothing could have paused it
    answers = run(ma, M.MigrationCommand(migration_id="m-1", action=C.ABORT_SOURCE, workload_id="w-1"))
    assert [e for e, _ in answers] == [R.SOURCE_RESUMED]
