"""The control plane's settings are checked at start, each refusal naming the option and what it allows."""

from __future__ import annotations

import pytest

from controlplane.config import ControlPlaneConfig
from mesh.config import ConfigError


@pytest.mark.parametrize("endpoints,match", [
    (["http://etcd-1"], "is not http\\(s\\)://HOST:PORT"),          # was a ValueError traceback at start
    (["http://etcd-1:99999"], "is not http\\(s\\)://HOST:PORT"),
    (["http://etcd-1:abc"], "is not http\\(s\\)://HOST:PORT"),
    (["https://etcd-1:2379", "http://etcd-2:2379"], "mix http:// and https://"),
    (["etcd-1:2379"], "must start with http:// or https://"),
])
def test_bad_etcd_endpoints_are_refused_naming_the_option(tmp_path, endpoints, match):
    cfg = ControlPlaneConfig(state_dir=str(tmp_path / "cp"), insecure=True, etcd_endpoints=endpoints)
    with pytest.raises(ConfigError, match="etcd_endpoints: .*" + match):
        cfg.check()


def test_good_etcd_endpoints_pass(tmp_path):
    ControlPlaneConfig(state_dir=str(tmp_path / "cp"), insecure=True,
                       etcd_endpoints=["http://etcd-1:2379", "http://10.0.0.2:2379"]).check()


@pytest.mark.parametrize("url,target", [
    ("http://etcd-1:2379", ("etcd-1", 2379)), ("https://10.0.0.2:2380", ("10.0.0.2", 2380)),
    ("http://[::1]:2379", ("[::1]", 2379)), ("http://[fd00::5]:32379", ("[fd00::5]", 32379)),
    ("127.0.0.1:2379", ("127.0.0.1", 2379))])
def test_etcd_endpoints_become_grpc_targets(url, target):
    """The store's client dials f"{host}:{port}": an IPv6 member's address stays bracketed."""
    from controlplane.state.etcdconn import parse_endpoint
    assert parse_endpoint(url) == target



def test_the_reference_lists_every_flag_the_daemons_take():
    """docs/configuration.md's flag column is every option string argparse accepts, no more: a boolean's
    `--no-X` too (the reference showed only `--backend-tls`, `--history-enabled`, ... and an operator had no
    way to learn how to turn one off on the command line; operator walk, session 15)."""
    import argparse
    import re

    from controlplane.gateway.config import GatewayConfig
    from mesh import config
    from nodeagent.config import AgentConfig
    for cls in (ControlPlaneConfig, AgentConfig, GatewayConfig):
        parser = argparse.ArgumentParser(add_help=False)
        config.add_arguments(parser, cls)
        taken = {s for a in parser._actions for s in a.option_strings} - {"--config"}
        listed = set()
        for row in config.reference(cls).splitlines()[2:]:
            listed |= set(re.findall(r"`(--[a-z0-9-]+)`", row.split(" | ")[1]))
        assert listed == taken, (cls.__name__, sorted(taken - listed), sorted(listed - taken))


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_every_float_option_refuses_a_number_that_is_not_finite(tmp_path, bad):
    """NaN passed every minimum and maximum check (each comparison with NaN is false) and infinity every
    option without a maximum: a `nan` from a flag, the environment or a file reached the daemon's loops (a
    timer of NaN seconds, a weight that makes every score NaN). Each float option, from the environment."""
    import dataclasses

    from controlplane.gateway.config import GatewayConfig
    from mesh import config
    from nodeagent.config import AgentConfig
    checked = 0
    for cls in (ControlPlaneConfig, AgentConfig, GatewayConfig):
        for f in dataclasses.fields(cls):
            if config._kind(cls, f) is not float:
                continue
            env = {f"{cls.ENV_PREFIX}{f.name.upper()}": bad, f"{cls.ENV_PREFIX}STATE_DIR": str(tmp_path),
                   f"{cls.ENV_PREFIX}INSECURE": "true"}
            with pytest.raises(ConfigError, match=f"^{f.name}\\b.*finite"):
                config.load(cls, environ=env)
            checked += 1
    assert checked >= 20
