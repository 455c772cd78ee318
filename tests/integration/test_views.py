"""The fleet views against a real local cluster (etcd, control plane, agent processes): `meshctl top`
(`--once` output, and live under tmux: keys sent, the pane captured) and the web view (its JSON and
server-sent events with tenant tokens, and the page in headless Chromium over the DevTools protocol).

The cluster is tests/integration/secure.py's: TLS (so the web view serves HTTPS with the control plane's
certificate) and a tenants file with tokens for team-a, team-b, a viewer and an admin.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aiohttp
import pytest

from tests.integration import secure
from tests.integration.browser import Browser, find_chromium
from tests.integration.conftest import json_lines, wait_for
from tools.localcluster import LocalCluster

pytestmark = pytest.mark.integration
HOSTS = [{"node": f"view-{i}", "gpus": [{"model": "H100-80GB", "count": 2, "mig": True}]} for i in (1, 2)]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # secure.start's cluster (TLS, tokens; the web view is HTTPS), with migrations stopped once planned so a
    # migration stays "in progress" for the web view's test
    d = tmp_path_factory.mktemp("views")
    tls_dir = d / "tls"
    c = LocalCluster(d / "cluster", HOSTS, lease_ttl=3, agents_per_process=1, tls_dir=tls_dir,
                     tenants_file=str(secure.write_tenants(d / "tenants.yaml")),
                     client_auth={"token": secure.TOKENS["admin"], "ca": str(tls_dir / "ca.crt")},
                     controlplane_args=["--migration-pause-at", "planned"])
    c.start(timeout=90)
    yield c
    c.stop()


@pytest.fixture
def admin(cluster):
    with cluster.client(timeout=30) as client:
        yield client
        for alloc in {s.allocation_id for s in client.list_slices()}:
            client.release(alloc)
        wait_for(lambda: not client.list_slices(), 30, "slices to be released")


def meshctl(cluster, *argv, token="admin", timeout=60) -> subprocess.CompletedProcess:
    env = {**os.environ, "GPUMESH_CONFIG_DIR": str(cluster.state_dir / "cfg")}
    return subprocess.run([sys.executable, "-m", "tools.meshctl.main", *argv, "--endpoint", cluster.endpoint,
                           "--token", secure.TOKENS[token], "--ca", str(cluster.tls_dir / "ca.crt")], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)


def slot_column(line: str) -> str:
    """The 'MEM SLOTS CMP' cells of a GPU row: 8 memory cells, a space, 7 compute cells."""
    parts = line.split()
    return f"{parts[3]} {parts[4]}"


# -- meshctl top --------------------------------------------------------------------------------------

def test_top_once_draws_every_gpu_and_the_slots_of_a_slice(cluster, admin):
    resp = admin.allocate(tenant="team-a", mig_profile="3g.40gb")
    s = resp.slices[0]
    r = meshctl(cluster, "top", "--once")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), r.stdout
    rows = {(ln.split()[0], ln.split()[1]): ln for ln in lines if ln.startswith("view-")}
    assert set(rows) == {(f"view-{n}", str(i)) for n in (1, 2) for i in (0, 1)}, r.stdout
    slots = slot_column(rows[(s.node, str(s.gpu_index))])
    start = s.placement.start
    # team-a is the only tenant: symbol A on memory slots start..start+3 and compute slices start..start+2
    assert slots[start:start + 4] == "AAAA" and slots[9 + start:9 + start + 3] == "AAA", slots
    assert slots.count("A") == 7, slots
    assert "A=team-a" in r.stdout

    r = meshctl(cluster, "top", "--once", "--view", "slices")
    assert r.returncode == 0 and s.id in r.stdout and "3g.40gb@" in r.stdout
    r = meshctl(cluster, "top", "--once", "--view", "slices", "--tenant", "team-b")
    assert r.returncode == 0 and s.id not in r.stdout
    r = meshctl(cluster, "top", "--once", "--view", "events")           # EventService: the slice's scheduling
    assert r.returncode == 0 and any("Scheduled" in ln and f"Slice/{s.id}"[:20] in ln
                                     for ln in r.stdout.splitlines()), r.stdout
    r = meshctl(cluster, "top", "--once", "--sort", "bogus")
    assert r.returncode == 1 and "--sort" in r.stderr and "util" in r.stderr


def test_top_once_as_a_tenant_shows_other_tenants_slots_as_carved(cluster, admin):
    s = admin.allocate(tenant="team-a", mig_profile="1g.10gb").slices[0]
    r = meshctl(cluster, "top", "--once", token="team-b")
    assert r.returncode == 0, r.stderr
    row = next(ln for ln in r.stdout.splitlines() if ln.startswith(f"{s.node} ") and ln.split()[1] == str(s.gpu_index))
    assert slot_column(row)[s.placement.start] == "▒" and "team-a" not in r.stdout


def test_top_without_a_terminal_prints_plain_frames(cluster, admin):
    """stdout a pipe: whole frames one after another, no cursor movement or colour codes."""
    env = {**os.environ, "GPUMESH_CONFIG_DIR": str(cluster.state_dir / "cfg")}
    proc = subprocess.Popen([sys.executable, "-m", "tools.meshctl.main", "top", "--interval", "0.5", "--endpoint",
                             cluster.endpoint, "--token", secure.TOKENS["admin"], "--ca",
                             str(cluster.tls_dir / "ca.crt")], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        lines = []
        while sum(ln.startswith("gpumesh top") for ln in lines) < 3:
            line = proc.stdout.readline()
            assert line, f"top ended early: {lines}"
            lines.append(line)
    finally:
        proc.terminate()
        proc.wait(30)
    assert sum(ln.startswith("view-") for ln in lines) >= 8            # two whole frames of 4 GPU rows
    assert not any("\x1b" in ln for ln in lines)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install tmux)")
def test_top_live_under_tmux(cluster, admin, tmp_path):
    sock = f"gpumesh-top-{uuid.uuid4().hex[:8]}"
    tmux = ["tmux", "-L", sock]
    env = f"GPUMESH_CONFIG_DIR={tmp_path} PYTHONPATH={os.environ.get('PYTHONPATH', '')} TERM=xterm-256color"
    cmd = (f"env {env} {sys.executable} -m tools.meshctl.main top --endpoint {cluster.endpoint} "
           f"--token {secure.TOKENS['admin']} --ca {cluster.tls_dir / 'ca.crt'} --interval 1; echo TOP-EXITED $?; sleep 120")
    subprocess.run([*tmux, "new-session", "-d", "-x", "80", "-y", "24", "-c", str(ROOT), cmd], check=True)

    def pane() -> str:
        return subprocess.run([*tmux, "capture-pane", "-p"], capture_output=True, text=True).stdout

    try:
        wait_for(lambda: sum(ln.startswith("view-") for ln in pane().splitlines()) == 4, 60, "4 GPU rows")
        screen = pane().splitlines()
        assert len(screen) <= 24 and all(len(ln) <= 80 for ln in screen)
        assert any(ln.startswith("NODE") and "MEM SLOTS CMP" in ln for ln in screen)
        s = admin.allocate(tenant="team-b", mig_profile="2g.20gb").slices[0]

        def slice_drawn():
            for ln in pane().splitlines():
                if ln.startswith(f"{s.node} ") and ln.split()[1] == str(s.gpu_index):
                    slots = slot_column(ln)
                    return slots[s.placement.start:s.placement.start + 2] == "AA"
            return False
        wait_for(slice_drawn, 30, "the allocated slice's slots")           # from the watch, no keypress
        subprocess.run([*tmux, "send-keys", "s"], check=True)
        wait_for(lambda: any(ln.startswith("SLICE") for ln in pane().splitlines()) and s.id in pane(), 60,
                 "the slices view")
        subprocess.run([*tmux, "send-keys", "d"], check=True)
        wait_for(lambda: any(ln.startswith("NAME") and "TTFT" in ln for ln in pane().splitlines()), 60,
                 "the deployments view")
        subprocess.run([*tmux, "send-keys", "g"], check=True)
        subprocess.run([*tmux, "send-keys", "n"], check=True)           # node filter: the first node only
        wait_for(lambda: "n:node=view-1" in pane() and not any(ln.startswith("view-2")
                                                                for ln in pane().splitlines()), 20, "the node filter")
        subprocess.run([*tmux, "send-keys", "q"], check=True)
        wait_for(lambda: "TOP-EXITED 0" in pane(), 60, "top to quit on q")
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)


# -- the web view -------------------------------------------------------------------------------------

def web_url(cluster) -> str:
    assert cluster.web and cluster.web.startswith("https://"), cluster.web
    return cluster.web.rstrip("/")


def tls_session(cluster) -> aiohttp.ClientSession:
    """A client that trusts the cluster's CA (the web view's certificate is the control plane's)."""
    ctx = ssl.create_default_context(cafile=str(cluster.tls_dir / "ca.crt"))
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx))


async def get_snapshot(session, cluster, token: str | None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with session.get(f"{web_url(cluster)}/api/snapshot", headers=headers) as r:
        return r.status, await r.json()


async def test_web_snapshot_scopes_a_tenant_to_its_slices(cluster, admin):
    a = admin.allocate(tenant="team-a", mig_profile="1g.10gb").slices[0]
    b = admin.allocate(tenant="team-b", mig_profile="1g.10gb").slices[0]
    async with tls_session(cluster) as session:
        status, frame = await get_snapshot(session, cluster, secure.TOKENS["admin"])
        assert status == 200 and {s["id"] for s in frame["slices"]} == {a.id, b.id}
        assert sum(len(n["gpus"]) for n in frame["nodes"]) == 4
        status, frame = await get_snapshot(session, cluster, secure.TOKENS["team-a"])
        assert status == 200 and [s["id"] for s in frame["slices"]] == [a.id]
        assert frame["principal"]["tenant"] == "team-a"
        cells = [c for n in frame["nodes"] for g in n["gpus"] for c in g["slots"]["memory"] if c]
        assert {c["slice"] for c in cells} == {a.id, ""}       # b's instance is drawn carved, unnamed
        assert "team-b" not in json.dumps(frame)
        deadline = time.monotonic() + 30                 # events are written behind the allocation
        while not any(e["kind"] == "Slice" and e["name"] == a.id and e["reason"] == "Scheduled"
                      for e in frame["events"]):
            assert time.monotonic() < deadline, frame["events"]
            await asyncio.sleep(0.3)
            status, frame = await get_snapshot(session, cluster, secure.TOKENS["team-a"])
        assert not any(e["name"] == b.id for e in frame["events"])
        status, frame = await get_snapshot(session, cluster, secure.TOKENS["viewer-a"])
        assert status == 200 and [s["id"] for s in frame["slices"]] == [a.id]
        status, body = await get_snapshot(session, cluster, None)
        assert status == 401 and "Bearer" in body["error"]["message"]
        status, body = await get_snapshot(session, cluster, "not-a-token")
        assert status == 401 and body["error"]["code"] == "UNAUTHENTICATED"
        async with session.get(f"{web_url(cluster)}/static/../server.py") as r:
            assert r.status == 404
        async with session.get(f"{web_url(cluster)}/") as r:
            assert r.status == 200 and "default-src 'none'" in r.headers["Content-Security-Policy"]


async def test_web_stream_sends_a_frame_when_a_slice_is_allocated(cluster, admin):
    headers = {"Authorization": f"Bearer {secure.TOKENS['team-a']}"}
    async with tls_session(cluster) as session:
        async with session.get(f"{web_url(cluster)}/api/stream", headers=headers,
                               timeout=aiohttp.ClientTimeout(total=90)) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")

            async def frames():
                async for line in r.content:
                    if line.startswith(b"data: "):
                        yield json.loads(line[6:])
            it = frames()
            first = await it.__anext__()
            assert first["slices"] == []
            s = admin.allocate(tenant="team-a", mig_profile="2g.20gb").slices[0]
            admin.allocate(tenant="team-b", mig_profile="1g.10gb")        # not team-a's: never shown
            async for frame in it:
                ids = {x["id"] for x in frame["slices"]}
                assert ids <= {s.id}
                if ids == {s.id}:
                    break


# -- in Chromium --------------------------------------------------------------------------------------

async def test_web_page_in_headless_chromium(cluster, admin, tmp_path):
    if find_chromium() is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    # the page is HTTPS with the test CA's certificate, which this throwaway profile does not trust
    browser = Browser.start(tmp_path / "profile", args=("--ignore-certificate-errors",))
    try:
        async with aiohttp.ClientSession() as session:
            page = await browser.page(session)
            await page.goto(f"{web_url(cluster)}/#token={secure.TOKENS['admin']}")
            assert await page.wait_for("document.querySelectorAll('.gpu').length === 4", 60, "4 GPU cards")
            assert await page.evaluate("location.hash") == ""           # the token left the address bar
            assert await page.evaluate("document.getElementById('status').textContent") == "live"
            a = admin.allocate(tenant="team-a", mig_profile="3g.40gb").slices[0]
            cells = await page.wait_for(
                f"document.querySelectorAll('.gpu[data-node=\"{a.node}\"][data-index=\"{a.gpu_index}\"] "
                f".slot[data-slice=\"{a.id}\"]').length", 60, "the new slice's slots")
            assert cells == 4 + 3                                          # 4 memory slots, 3 compute slices
            b = admin.allocate(tenant="team-b", mig_profile="1g.10gb").slices[0]
            await page.wait_for(f"!!document.querySelector('tr.slice[data-id=\"{b.id}\"]')", 60, "team-b's slice")
            await page.wait_for(f"!!document.querySelector('tr.event[data-name=\"{b.id}\"]')", 60, "b's event")
            shot = tmp_path / "web-view.png"
            await page.screenshot(shot)
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            if os.environ.get("GPUMESH_UPDATE_DOCS"):
                shutil.copy(shot, ROOT / "docs" / "images" / "web-view.png")

            # the same page with team-a's token: only team-a's slice, team-b's instance drawn carved
            await page.goto("about:blank")
            await page.goto(f"{web_url(cluster)}/#token={secure.TOKENS['team-a']}")
            await page.wait_for("document.querySelectorAll('tr.slice').length === 1", 60, "team-a's one slice")
            rows = await page.evaluate("[...document.querySelectorAll('tr.slice')].map(r => r.dataset.tenant)")
            assert rows == ["team-a"]
            assert await page.evaluate(f"!!document.querySelector('[data-slice=\"{b.id}\"]')") is False
            assert await page.evaluate("document.body.innerText.includes('team-b')") is False
            assert await page.evaluate("document.querySelectorAll('.slot.carved').length") >= 2

            # a wrong token: the page asks for one
            await page.goto("about:blank")
            await page.goto(f"{web_url(cluster)}/#token=wrong")
            await page.wait_for("!document.getElementById('login').hidden", 30, "the token form")
            assert "invalid bearer token" in await page.evaluate("document.getElementById('login-error').textContent")
    finally:
        browser.stop()


def test_up_json_names_the_web_view_and_stays_quiet(tmp_path):
    env = {**os.environ, "GPUMESH_CONFIG_DIR": str(tmp_path / "cfg")}
    state = tmp_path / "state"
    r = subprocess.run([sys.executable, "-m", "tools.meshctl.main", "up", "--sim-hosts", "1", "--gpus-per-host", "1",
                        "--state-dir", str(state), "--detach", "-o", "json"], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=180)
    try:
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["web"].startswith("http://127.0.0.1:") and out["web"].endswith("/")
        assert r.stderr == ""                       # -o json: no progress lines
        import urllib.request
        with urllib.request.urlopen(out["web"] + "healthz", timeout=10) as resp:
            assert resp.read() == b"ok\n"
    finally:
        subprocess.run([sys.executable, "-m", "tools.meshctl.main", "down", "--state-dir", str(state)],
                       capture_output=True, env=env, cwd=ROOT, timeout=120)


# -- progress -----------------------------------------------------------------------------------------

def test_alloc_shows_progress_on_a_terminal_and_none_in_json(cluster, admin):
    """A gang of 3 slices: on a terminal (a pty as stderr) a spinner names the wait; with -o json stderr
    stays empty and stdout is the allocation's JSON."""
    import pty
    master, slave = pty.openpty()
    env = {**os.environ, "GPUMESH_CONFIG_DIR": str(cluster.state_dir / "cfg"), "TERM": "xterm-256color"}
    argv = [sys.executable, "-m", "tools.meshctl.main", "alloc", "--tenant", "team-a", "--profile", "1g.10gb",
            "--count", "3", "--endpoint", cluster.endpoint, "--token", secure.TOKENS["admin"],
            "--ca", str(cluster.tls_dir / "ca.crt")]
    try:
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=slave, text=True, env=env, cwd=ROOT, timeout=120)
        os.close(slave)
        drawn = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        os.close(master)
    assert proc.returncode == 0, drawn.decode(errors="replace")
    assert b"allocating 3 slices and waiting until READY" in drawn
    r = meshctl(cluster, "alloc", "--tenant", "team-a", "--profile", "1g.10gb", "--count", "2", "-o", "json")
    assert r.returncode == 0 and r.stderr == ""
    assert len(json.loads(r.stdout)["slices"]) == 2


async def test_web_snapshot_shows_migrations_in_progress_to_their_tenant(cluster, admin):
    """A migration held in PLANNED (the cluster's --migration-pause-at): listed for admin and its tenant,
    not for another tenant. (Last in this file: the held migration stays.)"""
    s = admin.allocate(tenant="team-a", mig_profile="1g.10gb").slices[0]
    # a process that uses the checkpoint SDK: a pre-copy migration of one without it is refused when asked
    w = admin.run_workload(s.id, [sys.executable, "-m", "tools.examples.train_mnist_like", "--steps", "100000",
                                  "--sleep-ms", "50", "--print-every", "5"], env={"PYTHONPATH": str(ROOT)})
    wait_for(lambda: any(d.get("step", 0) >= 5 for d in json_lines(admin, w.id)), 90, "training to reach step 5")
    m = admin.migrate(w.id)
    async with tls_session(cluster) as session:
        for who, shown in (("admin", True), ("team-a", True), ("team-b", False)):
            status, frame = await get_snapshot(session, cluster, secure.TOKENS[who])
            assert status == 200
            found = [x for x in frame["migrations"] if x["id"] == m.id]
            assert bool(found) is shown, (who, frame["migrations"])
            if shown:
                assert found[0]["phase"] == "planned" and found[0]["workload_id"] == w.id
                assert [x["id"] for x in frame["workloads"]] == [w.id]
            else:
                assert frame["workloads"] == []
