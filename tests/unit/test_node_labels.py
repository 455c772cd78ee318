"""Node labels an operator sets (the agent's `node_labels`, a simulated host file's `labels:`): what resource pools
select nodes by (pool.selector.node_labels). Before, the agent reported only its own gpumesh.io/ labels, so a
pool's node selector could match nothing an operator chose."""

from __future__ import annotations

import argparse

import pytest

from mesh import config
from mesh.config import ConfigError
from nodeagent.config import AgentConfig
from nodeagent.hostfile import dump_host, parse_host
from nodeagent.main import node_labels

SIM = {"gpu_backend": "sim", "sim_host_file": ["h.yaml"], "insecure": True}


def _load(environ=None, **flags) -> AgentConfig:
    args = argparse.Namespace(**{f: None for f in AgentConfig.__dataclass_fields__})
    for k, v in {**SIM, **flags}.items():
        setattr(args, k, v)
    return config.load(AgentConfig, args, environ=environ or {})


def test_flags_and_environment_give_the_labels():
    assert _load(node_labels=["tier=serving", "zone=eu-1,rack=r7"]).node_label_map() == {
        "tier": "serving", "zone": "eu-1", "rack": "r7"}
    cfg = _load({"MESH_AGENT_NODE_LABELS": "tier=batch,example.com/owner=team-a"})
    assert cfg.node_label_map() == {"tier": "batch", "example.com/owner": "team-a"}
    assert _load().node_label_map() == {}


@pytest.mark.parametrize("items,words", [
    (["tier"], "is not KEY=VALUE"),
    (["tier=a", "tier=b"], "is given twice"),
    (["-bad=x"], "is not a valid label key"),
    (["tier=line\nbreak"], "is not a valid label value"),
    (["gpumesh.io/mig-layout=x"], "set by the agent itself"),
])
def test_bad_labels_stop_the_agent_at_start_naming_them(items, words):
    with pytest.raises(ConfigError, match="node_labels") as e:
        _load(node_labels=items)
    assert words in str(e.value)


HOST = {"node": "gpu-a", "gpus": [{"model": "H100-80GB", "count": 1}]}


def test_a_host_file_adds_its_own_labels_over_the_agents():
    host = parse_host({**HOST, "labels": {"tier": "serving", "gen": 3}})
    assert dict(host.labels) == {"tier": "serving", "gen": "3"}
    assert parse_host(dump_host(host)) == host
    cfg = _load(node_labels=["tier=batch", "zone=eu-1"])
    assert node_labels(cfg, host) == {"tier": "serving", "gen": "3", "zone": "eu-1"}
    assert node_labels(cfg) == {"tier": "batch", "zone": "eu-1"}


@pytest.mark.parametrize("labels,words", [
    (["tier"], "expected a mapping"),
    ({"tier": None}, "expected a mapping"),
    ({"gpumesh.io/workload-egress": "x"}, "set by the agent itself"),
    ({"tier": "a\x1b[2J"}, "is not a valid label value"),
])
def test_bad_host_file_labels_name_the_file_and_field(labels, words):
    with pytest.raises(ValueError, match=r"^h\.yaml: labels") as e:
        parse_host({**HOST, "labels": labels}, "h.yaml")
    assert words in str(e.value)
