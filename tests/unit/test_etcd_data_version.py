"""The embedded etcd is never older than its data (controlplane/state/etcdserver.py): etcd 3.4 refuses a data
directory a 3.5 has run on ("cluster cannot be downgraded"), and find_etcd prefers a 3.4 to the venv's 3.5.1
(etcd-io/etcd#13766). A control plane whose data the venv's 3.5.1 wrote (before find_etcd passed it over) did
not start once a 3.4 was on the PATH (`apt install etcd-server`, which the WARNING itself recommends)."""

from __future__ import annotations

import logging
import os
import sys

import pytest

from controlplane.state import etcdserver

PYTHON = sys.executable         # (the fixture points sys.executable at a fake venv)

# A stand-in etcd: `--version`; else it records the call, refuses data an etcd of a newer minor version ran on
# (with etcd's own words), and serves /health on its client URL.
FAKE = '''#!{python}
import http.server, json, os, sys
VERSION = "{version}"
if sys.argv[1:] == ["--version"]:
    print("etcd Version: " + VERSION)
    sys.exit(0)
opt = dict(zip(sys.argv[1::2], sys.argv[2::2]))
data = opt["--data-dir"]
os.makedirs(data, exist_ok=True)
with open(os.path.join(os.path.dirname(data), "calls"), "a") as f:
    f.write(VERSION + "\\n")
seen = os.path.join(data, "cluster-version")
mine = tuple(int(x) for x in VERSION.split(".")[:2])
if os.path.exists(seen):
    ran = tuple(int(x) for x in open(seen).read().split("."))
    if ran > mine:
        print(json.dumps({{"level": "fatal", "msg": "invalid downgrade; server version is lower than determined "
                          "cluster version", "current-server-version": VERSION,
                          "determined-cluster-version": "%d.%d" % ran}}, separators=(",", ":")), flush=True)
        sys.exit(1)
with open(seen, "w") as f:
    f.write("%d.%d" % mine)
host, port = opt["--listen-client-urls"].removeprefix("http://").rsplit(":", 1)


class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({{"health": "true"}}).encode()
        self.send_response(200)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


http.server.HTTPServer((host, int(port)), Health).serve_forever()
'''


def _fake(dir_, version: str) -> str:
    dir_.mkdir(parents=True, exist_ok=True)
    p = dir_ / "etcd"
    p.write_text(FAKE.format(python=PYTHON, version=version))
    p.chmod(0o755)
    return str(p)


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    venv, path1 = tmp_path / "venv" / "bin", tmp_path / "p1"
    venv.mkdir(parents=True)
    monkeypatch.setattr(sys, "executable", str(venv / "python"))
    monkeypatch.setenv("PATH", os.pathsep.join([str(path1), os.environ.get("PATH", "")]))
    monkeypatch.delenv(etcdserver.ETCD_ENV, raising=False)
    monkeypatch.setattr(etcdserver, "_versions", {})
    monkeypatch.setattr(etcdserver, "_warned", set())
    monkeypatch.setattr(etcdserver, "_candidates", lambda real=etcdserver._candidates: [
        p for p in real() if p.startswith(str(tmp_path))])          # not the host's own etcd
    return venv, path1


def _data_a_35_wrote(tmp_path):
    """An etcd data directory the venv's 3.5 ran on before the version was recorded (no etcd-version)."""
    member = tmp_path / "etcd" / "member-data"
    member.mkdir(parents=True)
    (member / "cluster-version").write_text("3.5")
    return tmp_path / "etcd"


def _calls(data_dir) -> list[str]:
    return (data_dir / "calls").read_text().split()


def test_data_a_35_ran_on_starts_with_a_35_though_a_34_is_found_first(dirs, tmp_path):
    venv, path1 = dirs
    _fake(path1, "3.4.23")          # the PATH's 3.4 (apt's etcd-server): safe, so preferred to ...
    _fake(venv, "3.5.1")            # ... the venv's 3.5.1, which wrote the data
    data = _data_a_35_wrote(tmp_path)
    server = etcdserver.EtcdServer(data, fast=True)
    try:
        server.start(timeout=60)
    finally:
        server.stop()
    assert _calls(data) == ["3.4.23", "3.5.1"]      # refused by the 3.4, started with the 3.5
    assert server.needs() == (3, 5) and (data / "etcd-version").read_text().strip() == "3.5"
    again = etcdserver.EtcdServer(data, fast=True)
    try:
        again.start(timeout=60)
    finally:
        again.stop()
    assert _calls(data) == ["3.4.23", "3.5.1", "3.5.1"]     # recorded: no failed try with the 3.4 any more


def test_a_newer_safe_one_is_taken_before_the_affected_one_and_the_warning_does_not_offer_34(dirs, caplog):
    venv, path1 = dirs
    only = _fake(venv, "3.5.1")
    _fake(path1, "3.4.23")
    caplog.set_level(logging.WARNING)
    assert etcdserver.find_etcd((3, 5)) == only
    warning = next(r.getMessage() for r in caplog.records if "etcd-io/etcd#13766" in r.getMessage())
    assert "3.5.3 or later" in warning and "3.4" not in warning
    assert etcdserver.find_etcd((3, 4)) == str(path1 / "etcd")      # 3.4 is enough: the safe 3.4 first


def test_none_new_enough_says_which_version_the_data_needs(dirs):
    _, path1 = dirs
    _fake(path1, "3.4.23")
    with pytest.raises(etcdserver.EtcdError, match=r"needs etcd 3\.5 or later.*3\.4\.23"):
        etcdserver.find_etcd((3, 5))


def test_a_fresh_data_directory_records_what_ran_and_a_start_that_fails_otherwise_is_not_retried(dirs, tmp_path):
    _, path1 = dirs
    _fake(path1, "3.4.23")
    server = etcdserver.EtcdServer(tmp_path / "fresh", fast=True)
    try:
        server.start(timeout=60)
    finally:
        server.stop()
    assert server.needs() == (3, 4)
    broken = path1 / "etcd"
    broken.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo 'etcd Version: 3.4.23' && exit 0\necho boom; exit 3\n")
    with pytest.raises(etcdserver.EtcdError, match="exited with 3"):
        etcdserver.EtcdServer(tmp_path / "fresh", fast=True).start(timeout=60)


def test_both_of_etcds_log_formats_are_understood():
    zap = (b'{"level":"fatal","msg":"invalid downgrade; server version is lower than determined cluster version",'
           b'"current-server-version":"3.4.23","determined-cluster-version":"3.5","stacktrace":"..."}')
    capnslog = (b"2026-12-07 12:50:38.654005 C | etcdserver/membership: cluster cannot be downgraded (current "
                b"version: 3.4.23 is lower than determined cluster version: 3.5).")
    for line in (zap, capnslog):
        m = etcdserver._DOWNGRADE.search(line)
        assert m and (int(m.group(1)), int(m.group(2))) == (3, 5)


def test_a_multi_member_cluster_on_data_a_35_ran_on_starts_with_a_35(dirs, tmp_path):
    """The same for tools.etcdcluster (`meshctl up --etcd-members 3`, the chaos suite): each member refused
    by the 3.4 is spawned again with the 3.5, and what ran is recorded."""
    from tools.etcdcluster import EtcdCluster
    venv, path1 = dirs
    _fake(path1, "3.4.23")
    _fake(venv, "3.5.1")
    root = tmp_path / "cluster"
    for i in range(2):
        (root / f"m{i}" / "member-data").mkdir(parents=True)
        (root / f"m{i}" / "member-data" / "cluster-version").write_text("3.5")
    cluster = EtcdCluster(root, members=2)
    try:
        cluster.start(timeout=60)
    finally:
        cluster.stop()
    for i in range(2):
        assert _calls(root / f"m{i}") == ["3.4.23", "3.5.1"]
        assert cluster.members[i].needs() == (3, 5)
    fresh = EtcdCluster(tmp_path / "fresh", members=2)
    try:
        fresh.start(timeout=60)
    finally:
        fresh.stop()
    assert [m.needs() for m in fresh.members] == [(3, 4), (3, 4)]
