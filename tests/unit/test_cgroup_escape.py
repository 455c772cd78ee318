"""Removing a workload's cgroup kills a workload that forks a child and exits over and over (a new pid after every
read of cgroup.procs): the group's pids.max goes to 0 first (cgroups._deny_forks), so no process of it can fork
past the kill loop. On this host the loop alone also won the race; the second test shows the mechanism: after the
denial a process of the group cannot fork. Uses the host's real cgroups (root and the pids controller needed:
skips without them)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import pytest

from nodeagent.isolation import cgroups as cg

# a subreaper that reaps the evader's exited parents (a container's init may not: their zombies would count
# toward pids.max), and under it the evader: fork, and the parent exits, over and over
EVADER = """import ctypes, os
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)        # PR_SET_CHILD_SUBREAPER
if os.fork() == 0:
    while True:
        if os.fork():
            os._exit(0)
while True:
    try:
        os.wait()
    except ChildProcessError:
        pass
"""


def _group(name: str):
    """(the cgroup manager, the files a process writes its pid into to join `name`); skips where it cannot."""
    mgr = _manager()
    try:
        return mgr, mgr.create(name, cg.Limits(pids_max=64))
    except cg.CgroupError as e:
        pytest.skip(f"cannot create a cgroup here: {e}")


def _manager():
    if os.geteuid() != 0:
        pytest.skip("needs root to create cgroups")
    if os.path.isdir("/sys/fs/cgroup/pids"):
        return cg.CgroupV1(f"gpumesh-test-{uuid.uuid4().hex[:8]}")
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers") and \
            "pids" in open("/sys/fs/cgroup/cgroup.controllers").read().split():
        return cg.CgroupV2(f"gpumesh-test-{uuid.uuid4().hex[:8]}")
    pytest.skip("no pids cgroup controller on this host")


def _alive_in(marker: str) -> list[int]:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if marker in open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace"):
                    out.append(int(pid))
            except OSError:
                pass
    return out


def test_a_forking_workload_cannot_outrun_the_removal_of_its_cgroup():
    name = "n/evader"
    mgr, procs = _group(name)
    marker = f"evader-{uuid.uuid4().hex}"
    code = f"# {marker}\n" + EVADER
    try:
        p = subprocess.Popen([sys.executable, "-c", code], preexec_fn=lambda: [
            open(f, "w").write(str(os.getpid())) for f in procs])
        deadline = time.monotonic() + 60
        while not _alive_in(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _alive_in(marker), "the evader did not start"
        mgr.remove(name)
        deadline = time.monotonic() + 60
        while _alive_in(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive_in(marker), "a process of the removed cgroup still runs"
    finally:
        for pid in _alive_in(marker):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        try:
            mgr.remove(name)
        except Exception:  # noqa: BLE001 - best effort clean-up
            pass


def test_after_the_denial_no_process_of_the_group_can_fork():
    name = "n/denied"
    mgr, procs = _group(name)
    try:
        p = subprocess.Popen([sys.executable, "-c", "import os, sys\nsys.stdin.readline()\ntry:\n    pid = os.fork()\n"
                              "except OSError as e:\n    print('REFUSED', e.errno)\nelse:\n    print('FORKED')\n"
                              "    pid == 0 and os._exit(0)\n"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             preexec_fn=lambda: [open(f, "w").write(str(os.getpid())) for f in procs])
        group = os.path.dirname(next(f for f in procs if "pids" in f or len(procs) == 1))
        cg._deny_forks(group)
        out, _ = p.communicate("go\n", timeout=30)
        assert out.split()[0] == "REFUSED", out
    finally:
        mgr.remove(name)


def test_cgroup_kill_ends_every_process_of_a_v2_group_at_once():
    """cgroups._kill_all (v2's cgroup.kill, before the removal's rmdir loop) on a group of the v2 hierarchy
    (the unified one of a hybrid host, or the root of a pure v2 host)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create cgroups")
    root = next((r for r in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup")
                 if os.path.exists(os.path.join(r, "cgroup.procs")) and
                 os.path.exists(os.path.join(r, "cgroup.subtree_control"))), None)
    if root is None:
        pytest.skip("no cgroup v2 hierarchy here")
    group = os.path.join(root, f"gpumesh-test-kill-{uuid.uuid4().hex[:8]}")
    try:
        os.mkdir(group)
    except OSError as e:
        pytest.skip(f"cannot create a v2 cgroup here: {e}")
    import subprocess
    import time
    procs = []
    try:
        if not os.path.exists(os.path.join(group, "cgroup.kill")):
            pytest.skip("this kernel has no cgroup.kill (Linux < 5.14)")
        for _ in range(3):
            p = subprocess.Popen(["sleep", "300"])
            procs.append(p)
            with open(os.path.join(group, "cgroup.procs"), "w") as f:
                f.write(str(p.pid))
        cg._kill_all(group)
        for p in procs:
            assert p.wait(timeout=30) == -9            # SIGKILL, all of them, with no per-pid kill
        deadline = time.monotonic() + 30
        while open(os.path.join(group, "cgroup.procs")).read().strip() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.rmdir(group)                                  # empty: the rmdir succeeds at once
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        if os.path.isdir(group):
            os.rmdir(group)
