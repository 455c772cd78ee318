"""A bearer token bound for another machine over plaintext gRPC warns; loopback (the local cluster) and TLS
stay quiet. The channel is only built: gRPC connects lazily, so no server is needed."""

from __future__ import annotations

import warnings

import pytest

from mesh.client import MeshClient
from mesh.inferenceapi import InferenceClient
from mesh.tls import PlaintextTokenWarning, is_loopback_target


@pytest.mark.parametrize("target, local", [
    ("127.0.0.1:7070", True), ("localhost:7070", True), ("[::1]:7070", True), ("unix:/run/mesh.sock", True),
    ("dns:///localhost:7070", True), ("127.8.9.10:1", True),
    ("10.0.0.5:7070", False), ("cp.example.com:443", False), ("[2001:db8::1]:7070", False),
    ("dns:///cp.example.com:7070", False)])
def test_loopback_targets(target, local):
    assert is_loopback_target(target) is local


def _caught(make):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        make().close()
    return [w for w in seen if issubclass(w.category, PlaintextTokenWarning)]


def test_a_token_over_plaintext_to_another_host_warns():
    got = _caught(lambda: MeshClient("10.0.0.5:7070", token="s3cret"))
    assert len(got) == 1 and "10.0.0.5:7070" in str(got[0].message) and "s3cret" not in str(got[0].message)
    assert len(_caught(lambda: InferenceClient("gw.example.com:8081", token="s3cret"))) == 1
    # each endpoint of an HA list is its own channel
    assert len(_caught(lambda: MeshClient("10.0.0.5:7070,10.0.0.6:7070", token="t"))) == 2


def test_loopback_tls_or_no_token_stays_quiet(tmp_path):
    assert _caught(lambda: MeshClient("127.0.0.1:7070", token="t")) == []
    assert _caught(lambda: MeshClient("10.0.0.5:7070")) == []                    # nothing to leak
    assert _caught(lambda: MeshClient("10.0.0.5:7070", token="t", tls=True)) == []
    assert _caught(lambda: InferenceClient("localhost:8081", token="t")) == []


def test_meshctl_prints_the_warning_as_one_line():
    import os
    import subprocess
    import sys
    env = dict(os.environ, MESH_ENDPOINT="192.0.2.1:1", MESH_TOKEN="s3cret")      # TEST-NET: nothing there
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p = subprocess.run([sys.executable, "-m", "tools.meshctl.main", "get", "nodes", "--timeout", "0.5"], env=env, cwd=root,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    assert "warning: sending a bearer token in plaintext to 192.0.2.1:1" in p.stderr and "s3cret" not in p.stderr
    assert "warnings.warn" not in p.stderr                           # one line, not Python's two
