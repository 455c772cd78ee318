"""The deployment controller's decision (controlplane/serving/reconcile.py), table-driven: scale up and
down, crash, backoff, CrashLoop, node lost, probes, adoption, delete."""

from __future__ import annotations

import pytest

from controlplane.serving import reconcile as rc
from controlplane.serving.reconcile import Desired, Observed, Policy

P = Policy(backoff_base=2.0, backoff_max=16.0, crashloop_after=3, stable_seconds=60.0, probe_interval=10.0)
NOW = 1000.0


def ready(i: str, **kw) -> Observed:
    base = dict(id=i, state=rc.READY, has_slice=True, slice_ready=True, workload=rc.W_RUNNING,
                ready_since=NOW - 5, last_probe=NOW - 1, created=float(ord(i[-1])))
    base.update(kw)
    return Observed(**base)


CASES = [
    ("nothing yet: create all", Desired(2), [], [("create", "")], 2),
    ("all ready: nothing to do", Desired(2), [ready("a"), ready("b")], [], 0),
    ("scale up 1 -> 3", Desired(3), [ready("a")], [("create", "")], 2),
    ("scale down 3 -> 1 removes the newest ready", Desired(1), [ready("a"), ready("b"), ready("c")],
     [("remove", "c"), ("remove", "b")], 0),
    ("scale down prefers a failed and a pending replica",
     Desired(1), [ready("a"), Observed("b", rc.PENDING, created=9.0),
                  ready("c", state=rc.FAILED, workload=rc.W_ENDED, next_start=NOW + 50, restarts=1)],
     [("remove", "c"), ("remove", "b")], 0),
    ("pending without a slice: advance", Desired(1), [Observed("a", rc.PENDING)], [("advance", "a")], 0),
    ("slice ready, no backend (restart interrupted): advance", Desired(1),
     [Observed("a", rc.STARTING, has_slice=True, slice_ready=True, workload=rc.W_NONE)], [("advance", "a")], 0),
    ("starting: probe", Desired(1),
     [Observed("a", rc.STARTING, has_slice=True, slice_ready=True, workload=rc.W_RUNNING)], [("probe", "a")], 0),
    ("ready, probed long ago: probe again", Desired(1), [ready("a", last_probe=NOW - 11)], [("probe", "a")], 0),
    ("crash: fail with backoff", Desired(1), [ready("a", workload=rc.W_ENDED)], [("fail", "a")], 0),
    ("failed, backoff not over: wait (and do not create another)", Desired(1),
     [ready("a", state=rc.FAILED, workload=rc.W_ENDED, next_start=NOW + 1, restarts=1)], [], 0),
    ("failed, backoff over: restart", Desired(1),
     [ready("a", state=rc.FAILED, workload=rc.W_ENDED, next_start=NOW - 1, restarts=1)], [("restart", "a")], 0),
    ("node lost: remove and replace", Desired(2), [ready("a"), ready("b", node_ready=False)],
     [("remove", "b"), ("create", "")], 1),
    ("busy replicas are left alone but counted", Desired(2), [ready("a", busy=True, workload=rc.W_ENDED),
                                                              Observed("b", rc.PENDING, busy=True)], [], 0),
    ("agent not reported yet (adopted after restart): wait", Desired(1), [ready("a", workload=rc.W_UNKNOWN)], [], 0),
    ("deployment deleted: remove everything", Desired(0, deleting=True), [ready("a"), Observed("b", rc.PENDING)],
     [("remove", "a"), ("remove", "b")], 0),
    ("terminating left over from a restart: remove it, replace it", Desired(1), [ready("a", state=rc.TERMINATING)],
     [("remove", "a"), ("create", "")], 1),
    ("ready long enough after crashes: reset the count", Desired(1),
     [ready("a", restarts=2, ready_since=NOW - 61)], [("reset", "a")], 0),
    # drain: surge first, the old replica removed only once the ready count holds without it
    ("drain: a replacement first, the old one stays", Desired(2), [ready("a", draining=True), ready("b")],
     [("create", "")], 1),
    ("drain: every replica on drained nodes: a replacement for each", Desired(2),
     [ready("a", draining=True), ready("b", draining=True)], [("create", "")], 2),
    ("drain: replacement starting, the old one keeps serving", Desired(2),
     [ready("a", draining=True), ready("b"), Observed("c", rc.STARTING, has_slice=True, slice_ready=True,
                                                      workload=rc.W_RUNNING, created=9.0)], [("probe", "c")], 0),
    ("drain: replacement READY, the old one removed", Desired(2),
     [ready("a", draining=True), ready("b"), ready("c")], [("remove", "a")], 0),
    ("drain: no room for the replacement (pending): the old one stays", Desired(1),
     [ready("a", draining=True), Observed("b", rc.PENDING, created=9.0)], [("advance", "b")], 0),
    ("drain: one replacement READY of two: one old one removed", Desired(2),
     [ready("a", draining=True), ready("b", draining=True), ready("c"), Observed("d", rc.PENDING, created=9.0)],
     [("advance", "d"), ("remove", "a")], 0),
    ("drain: a not-ready replica on a drained node goes at once", Desired(1),
     [Observed("a", rc.STARTING, has_slice=True, slice_ready=True, workload=rc.W_RUNNING, draining=True)],
     [("create", ""), ("remove", "a")], 1),
]


@pytest.mark.parametrize("name,desired,observed,want,created", CASES, ids=[c[0] for c in CASES])
def test_reconcile(name, desired, observed, want, created):
    plan = rc.reconcile(desired, observed, NOW, P)
    assert plan.kinds() == want
    assert sum(a.count for a in plan.actions if a.kind == "create") == created


def test_backoff_doubles_and_is_capped():
    assert [rc.backoff(n, P) for n in (1, 2, 3, 4, 5, 9)] == [2.0, 4.0, 8.0, 16.0, 16.0, 16.0]
    plan = rc.reconcile(Desired(1), [ready("a", workload=rc.W_ENDED, restarts=2)], NOW, P)
    assert plan.actions[0].next_start == NOW + 8.0          # third crash: 2 * 2**2


def test_crashloop_condition():
    ok = rc.reconcile(Desired(1), [ready("a", workload=rc.W_ENDED, restarts=1)], NOW, P)
    assert ok.conditions["CrashLoop"][0] is False
    loop = rc.reconcile(Desired(1), [ready("a", workload=rc.W_ENDED, restarts=2)], NOW, P)
    assert loop.conditions["CrashLoop"][:2] == (True, "BackOff")
    waiting = rc.reconcile(Desired(1), [ready("a", state=rc.FAILED, workload=rc.W_ENDED, restarts=3,
                                              next_start=NOW + 5)], NOW, P)
    assert waiting.conditions["CrashLoop"][0] is True
    assert waiting.conditions["Available"][0] is False


def test_available_and_progressing():
    plan = rc.reconcile(Desired(2), [ready("a"), ready("b")], NOW, P)
    assert plan.conditions["Available"][0] is True and plan.conditions["Progressing"][0] is False
    plan = rc.reconcile(Desired(2), [ready("a")], NOW, P)
    assert plan.conditions["Available"][0] is False and plan.conditions["Progressing"][0] is True


ROLL = [
    ("all outdated and ready: surge one", Desired(2), [ready("a", outdated=True), ready("b", outdated=True)],
     [("create", "")], 1),
    ("surge not ready yet: wait, nothing removed", Desired(2),
     [ready("a", outdated=True), ready("b", outdated=True),
      Observed("c", rc.STARTING, has_slice=True, slice_ready=True, workload=rc.W_RUNNING, created=99.0)],
     [("probe", "c")], 0),
    ("surge ready: remove the oldest outdated", Desired(2),
     [ready("a", outdated=True), ready("b", outdated=True), ready("c")], [("remove", "a")], 0),
    ("an outdated replica that is not ready goes first, at once", Desired(2),
     [ready("a", outdated=True), ready("b", outdated=True, state=rc.STARTING, last_probe=NOW),
      Observed("c", rc.STARTING, has_slice=True, slice_ready=True, workload=rc.W_RUNNING, created=99.0)],
     [("probe", "c"), ("remove", "b")], 0),
    ("one outdated left after a removal: surge again", Desired(2), [ready("b", outdated=True), ready("c")],
     [("create", "")], 1),
    ("a busy replica holds the surge", Desired(2), [ready("b", outdated=True), ready("c", busy=True)], [], 0),
]


@pytest.mark.parametrize("name,desired,observed,want,created", ROLL, ids=[c[0] for c in ROLL])
def test_rolling_update(name, desired, observed, want, created):
    plan = rc.reconcile(desired, observed, NOW, P)
    assert plan.kinds() == want
    assert sum(a.count for a in plan.actions if a.kind == "create") == created
    assert plan.conditions["Progressing"][0] is True


def test_rolling_never_drops_below_the_ready_count():
    """Simulate a roll of 3 ready replicas: at every step at least 3 are READY."""
    reps = {i: ready(i, outdated=True) for i in "abc"}
    n, t = 0, NOW
    for _ in range(40):
        plan = rc.reconcile(Desired(3), list(reps.values()), t, P)
        assert sum(1 for r in reps.values() if r.state == rc.READY) >= 3
        for a in plan.actions:
            if a.kind == "create":
                for _ in range(a.count):
                    n += 1
                    rid = f"n{n}"
                    reps[rid] = Observed(rid, rc.STARTING, has_slice=True, slice_ready=True,
                                         workload=rc.W_RUNNING, created=100.0 + n)
            elif a.kind == "remove":
                del reps[a.replica]
            elif a.kind == "probe" and reps[a.replica].state == rc.STARTING:
                reps[a.replica] = ready(a.replica, created=reps[a.replica].created, last_probe=t)
        t += 1
        if not any(r.outdated for r in reps.values()) and len(reps) == 3:
            break
    assert sorted(reps) == ["n1", "n2", "n3"] and all(r.state == rc.READY for r in reps.values())


def test_draining_condition():
    plan = rc.reconcile(Desired(1), [ready("a", draining=True), Observed("b", rc.PENDING, created=9.0)], NOW, P)
    assert plan.conditions["Draining"][:2] == (True, "WaitingForReplacements") and "a" in plan.conditions["Draining"][2]
    assert plan.conditions["Available"][0] is True and plan.conditions["Progressing"][0] is True
    assert "Draining" not in rc.reconcile(Desired(1), [ready("a")], NOW, P).conditions
