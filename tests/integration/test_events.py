"""Durable events on a real local cluster (TLS, tokens for two tenants and an admin): allocations placed
and refused, slice states, cordon and drain are recorded; a watch receives new ones; a tenant sees only
its own objects' events; the count is bounded by retention; a control-plane restart keeps them; and
`meshctl get events` / `describe` print them."""

from __future__ import annotations

import contextlib
import io
import threading

import pytest

from mesh import errors
from tests.integration import secure
from tests.integration.conftest import wait_for

HOSTS = [
    {"node": "gpu-a", "gpus": [{"model": "H100-80GB", "count": 1, "mig": True}]},
    {"node": "gpu-b", "gpus": [{"model": "A100-40GB", "count": 1, "mig": True}]},
]
EVENTS_KEPT = 60


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("events")
    c = secure.LocalCluster(d / "cluster", HOSTS, lease_ttl=3, agents_per_process=1, tls_dir=d / "tls",
                            tenants_file=str(secure.write_tenants(d / "tenants.yaml")),
                            client_auth={"token": secure.TOKENS["admin"], "ca": str(d / "tls" / "ca.crt")},
                            controlplane_args=["--events-kept", str(EVENTS_KEPT),
                                               "--retention-interval-seconds", "0.5"])
    c.start(timeout=90)
    yield c
    c.stop()


@pytest.fixture
def admin(cluster):
    cluster.wait_ready(timeout=60)
    with secure.client(cluster, "admin", timeout=30) as c:
        yield c


def reasons(events) -> list[tuple[str, str, str]]:
    return [(e.kind, e.name, e.reason) for e in events]


def meshctl(cluster, *argv: str) -> str:
    from tools.meshctl.main import main
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main([*argv, "--endpoint", cluster.endpoint, "--token", secure.TOKENS["admin"],
                   "--ca", str(cluster.tls_dir / "ca.crt")])
    assert rc == 0, buf.getvalue()
    return buf.getvalue()


def test_allocation_and_slice_states_are_recorded_and_scoped_to_the_tenant(cluster, admin):
    with secure.client(cluster, "team-a") as a, secure.client(cluster, "team-b") as b:
        resp = a.allocate(tenant="team-a", mig_profile="1g.10gb", gpu_model="H100-80GB")
        sid = resp.slices[0].id

        def slice_events():
            return reasons(a.list_events(kind="Slice", name=sid))
        got = wait_for(lambda: {"Scheduled", "SliceReady"} <= {r for _, _, r in slice_events()} and slice_events(),
                       30, "the slice's Scheduled and SliceReady events")
        assert ("Slice", sid, "Scheduled") in got
        placed = a.list_events(kind="Allocation", name=resp.allocation_id)
        assert [e.reason for e in placed] == ["Scheduled"] and sid in placed[0].message
        assert placed[0].type == "Normal" and placed[0].tenant == "team-a"
        # team-b sees none of team-a's events; naming team-a is refused
        assert not b.list_events(kind="Slice", name=sid)
        assert all(e.tenant == "team-b" for e in b.list_events())
        with pytest.raises(errors.PermissionDenied):
            b.list_events(tenant="team-a")
        # node events (no tenant) are for admins; the tenant does not see them
        assert not [e for e in a.list_events() if e.kind == "Node"]
        assert [e for e in admin.list_events(kind="Node") if e.reason == "Registered"]
        # a workload's life: Created, Started, Completed
        w = a.run_workload(sid, ["sleep", "1"])
        wait_for(lambda: {"Created", "Started", "Completed"} <= {e.reason for e in a.list_events(kind="Workload",
                                                                                           name=w.id)},
                 30, "the workload's events")
        assert not b.list_events(kind="Workload", name=w.id)
        a.release(sid)
        wait_for(lambda: "Released" in {r for _, _, r in slice_events()}, 30, "the Released event")


def test_a_refused_allocation_is_a_warning_and_repeats_are_counted(cluster, admin):
    with secure.client(cluster, "team-a") as a:
        for _ in range(2):
            with pytest.raises(errors.ResourceExhausted):
                a.allocate(tenant="team-a", mig_profile="7g.80gb", gpu_model="H100-80GB", count=3,
                           request_id="too-big-1")
    ev = wait_for(lambda: [e for e in admin.list_events(kind="Allocation", name="too-big-1") if e.count == 2],
                  30, "the FailedScheduling event counted twice")[0]
    assert (ev.type, ev.reason, ev.tenant) == ("Warning", "FailedScheduling", "team-a")
    assert "cannot place 3 slice(s)" in ev.message


def test_cordon_is_recorded_and_a_watch_receives_it(cluster, admin):
    seen, stop = [], threading.Event()
    with secure.client(cluster, "admin", timeout=30) as watcher:
        stream = watcher.watch_events(kind="Node", name="gpu-b", timeout=120)

        def follow():
            try:
                for notice in stream:
                    seen.append(notice)
                    if stop.is_set():
                        return
            except errors.MeshError:
                pass
        t = threading.Thread(target=follow, daemon=True)
        t.start()
        wait_for(lambda: any(n.type == n.SYNCED for n in seen), 30, "the watch to sync")
        admin.cordon("gpu-b")
        try:
            notice = wait_for(lambda: [n for n in seen if n.event.reason == "Cordoned"], 30,
                              "the watch to receive Cordoned")[0]
        finally:
            stop.set()
            admin.uncordon("gpu-b")
        assert notice.event.kind == "Node" and notice.event.name == "gpu-b" and notice.event.node == "gpu-b"
        wait_for(lambda: [n for n in seen if n.event.reason == "Uncordoned"], 30, "the watch to see Uncordoned")
        stream.close()
    text = meshctl(cluster, "get", "events", "--for", "node/gpu-b")
    header = text.splitlines()[0].split()
    assert header == ["TYPE", "REASON", "OBJECT", "MESSAGE", "COUNT", "AGE"]
    assert "Cordoned" in text and "node/gpu-b" in text
    described = meshctl(cluster, "describe", "node", "gpu-b")
    assert "Events:" in described and "Cordoned" in described and "Uncordoned" in described


def test_meshctl_get_events_watch_prints_new_events(cluster, admin):
    import json
    import os
    import subprocess
    import sys
    argv = [sys.executable, "-m", "tools.meshctl.main", "get", "events", "--for", "node/gpu-a", "-w", "-o", "json",
            "--endpoint", cluster.endpoint, "--token", secure.TOKENS["admin"], "--ca", str(cluster.tls_dir / "ca.crt")]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    lines: list[dict] = []
    reader = threading.Thread(target=lambda: [lines.append(json.loads(x)) for x in proc.stdout], daemon=True)
    reader.start()
    try:
        wait_for(lambda: any(d["event"]["reason"] == "Registered" for d in lines), 60, "the listed events")
        admin.cordon("gpu-a")
        admin.uncordon("gpu-a")
        wait_for(lambda: any(d["event"]["reason"] == "Uncordoned" for d in lines), 30, "the new events on -w")
    finally:
        proc.terminate()
        proc.wait(30)
    assert all(d["event"]["kind"] == "Node" and d["event"]["name"] == "gpu-a" for d in lines)
    assert {d["type"] for d in lines} <= {"ADDED", "MODIFIED"}


def test_describe_slice_shows_its_events_and_json_lists_them(cluster, admin):
    resp = admin.allocate(tenant="team-b", mig_profile="1g.10gb", gpu_model="H100-80GB")
    sid = resp.slices[0].id
    try:
        wait_for(lambda: [e for e in admin.list_events(kind="Slice", name=sid) if e.reason == "SliceReady"], 30,
                 "SliceReady")
        text = meshctl(cluster, "describe", "slice", sid)
        assert "Events:" in text and "Scheduled" in text and "SliceReady" in text
        import json
        doc = json.loads(meshctl(cluster, "get", "events", "--for", f"slice/{sid}", "-o", "json"))
        assert {e["reason"] for e in doc["items"]} >= {"Scheduled", "SliceReady"}
        assert all(e["name"] == sid and e["tenant"] == "team-b" for e in doc["items"])
    finally:
        admin.release(sid)


def test_retention_bounds_the_number_of_events(cluster, admin):
    with secure.client(cluster, "team-a") as a:
        for i in range(EVENTS_KEPT + 20):
            with pytest.raises(errors.ResourceExhausted):
                a.allocate(tenant="team-a", mig_profile="7g.80gb", gpu_model="H100-80GB", count=3,
                           request_id=f"flood-{i}")
    newest = f"flood-{EVENTS_KEPT + 19}"
    wait_for(lambda: admin.list_events(kind="Allocation", name=newest), 30, "the newest event")
    wait_for(lambda: len(admin.list_events()) <= EVENTS_KEPT, 30, f"at most {EVENTS_KEPT} events")
    names = {e.name for e in admin.list_events(kind="Allocation")}
    assert "flood-0" not in names and newest in names         # the oldest expired first


def test_events_survive_a_control_plane_restart(cluster, admin):
    def uncordoned():
        return [e for e in admin.list_events(kind="Node", name="gpu-a") if e.reason == "Uncordoned"]
    # an earlier test's Uncordoned may be recorded already: this one repeats it (its count goes up), written in
    # a batch after the uncordon returns; wait for this one's write, not the earlier record
    had = sum(e.count for e in uncordoned())
    admin.cordon("gpu-a")
    admin.uncordon("gpu-a")

    def recorded():
        evs = uncordoned()
        return evs if sum(e.count for e in evs) > had else None
    before = wait_for(recorded, 30, "this Uncordoned to be recorded")
    cluster.restart_controlplane(kill=True)
    with secure.client(cluster, "admin", timeout=30) as again:
        after = wait_for(lambda: _list_or_none(again), 60, "the restarted control plane to answer")
    kept = {(e.id, e.reason, e.count) for e in after}
    assert {(e.id, e.reason, e.count) for e in before} <= kept


def _list_or_none(client):
    try:
        return [e for e in client.list_events(kind="Node", name="gpu-a")]
    except errors.Unavailable:
        return None
