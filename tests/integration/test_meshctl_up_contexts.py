"""`meshctl up` saves its cluster as a named context beside the operator's others and makes it current;
commands reach it through that context; `meshctl down` removes that context only. Real processes (etcd,
control plane, an agent), meshctl in a subprocess, a temporary config dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def meshctl(*args, env, timeout=300):
    return subprocess.run([sys.executable, "-m", "tools.meshctl.main", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_up_adds_a_current_context_and_down_removes_only_it(tmp_path):
    cfg = tmp_path / "cfg"
    env = {k: v for k, v in os.environ.items() if k not in ("MESH_ENDPOINT", "MESH_CONTEXT", "MESHCONFIG", "MESH_TOKEN")}
    env["GPUMESH_CONFIG_DIR"] = str(cfg)
    made = meshctl("config", "set-context", "staging", "--endpoint", "staging.invalid:50051", "--token", "t", env=env)
    assert made.returncode == 0, made.stderr
    state = tmp_path / "mesh"
    up = meshctl("up", "--detach", "--no-gateway", "--sim-hosts", "1", "--gpus-per-host", "1", "--state-dir",
                 str(state), "--context-name", "lab", "-o", "json", env=env)
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        endpoint = json.loads(up.stdout)["endpoint"]
        doc = yaml.safe_load((cfg / "config.yaml").read_text())
        assert doc["current-context"] == "lab"
        assert {c["name"]: c.get("endpoint") for c in doc["contexts"]} == {"staging": "staging.invalid:50051",
                                                                          "lab": endpoint}
        assert next(c for c in doc["contexts"] if c["name"] == "lab")["state-dir"] == str(state.resolve())
        nodes = meshctl("get", "nodes", "-o", "json", env=env, timeout=60)          # through the current context
        assert nodes.returncode == 0, nodes.stderr
        assert [n["name"] for n in json.loads(nodes.stdout)["items"]] == ["sim-node-01"]
        listed = meshctl("config", "get-contexts", env=env, timeout=60)
        assert listed.returncode == 0 and "*         lab" in listed.stdout, listed.stdout
    finally:
        down = meshctl("down", "--state-dir", str(state), env=env, timeout=120)
    assert down.returncode == 0, down.stderr
    doc = yaml.safe_load((cfg / "config.yaml").read_text())
    assert [c["name"] for c in doc["contexts"]] == ["staging"] and doc["current-context"] == ""
    view = meshctl("config", "view", env=env, timeout=60)
    assert "token: REDACTED" in view.stdout
