"""The gateway's admin token from a file (`token_file`), so that it is neither on the command line (every local
user reads /proc/PID/cmdline: docs/gateway.md started it with `--token "$ADMIN_TOKEN"`) nor in the config
file (operator walk, session 15)."""

from __future__ import annotations

import argparse

import pytest

from controlplane.gateway.config import GatewayConfig
from mesh import config
from mesh.config import ConfigError


def _load(*argv: str) -> GatewayConfig:
    parser = argparse.ArgumentParser()
    config.add_arguments(parser, GatewayConfig)
    return config.load(GatewayConfig, parser.parse_args(["--insecure", *argv]), environ={})


def test_the_token_is_read_from_token_file(tmp_path):
    f = tmp_path / "gateway.token"
    f.write_text("0123456789abcdef0123456789abcdef\n")
    assert _load("--token-file", str(f)).token == "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize("content,argv,match", [
    (None, (), "token_file: cannot read"),
    ("\n", (), "token_file: .* is empty"),
    ("t" * 32, ("--token", "u" * 32), "token, token_file: give one"),
])
def test_a_bad_token_file_is_refused_naming_it(tmp_path, content, argv, match):
    f = tmp_path / "gateway.token"
    if content is not None:
        f.write_text(content)
    with pytest.raises(ConfigError, match=match):
        _load("--token-file", str(f), *argv)


def _load_agent(tmp_path, *argv: str):
    from nodeagent.config import AgentConfig
    parser = argparse.ArgumentParser()
    config.add_arguments(parser, AgentConfig)
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\nMA==\n-----END CERTIFICATE-----\n")
    return config.load(AgentConfig, parser.parse_args(["--tls-ca", str(ca), *argv]), environ={})


def test_the_agents_token_is_read_from_agent_token_file(tmp_path):
    """The agent's token had the same exposure as the gateway's (its only ways in: the command line, the environment
    or the config file); `agent_token_file` reads it from a file, refused as the gateway's is when it is bad."""
    f = tmp_path / "agent.token"
    f.write_text("a" * 32 + "\n")
    assert _load_agent(tmp_path, "--agent-token-file", str(f)).agent_token == "a" * 32
    with pytest.raises(ConfigError, match="agent_token, agent_token_file: give one"):
        _load_agent(tmp_path, "--agent-token-file", str(f), "--agent-token", "b" * 32)
    f.write_text("\n")
    with pytest.raises(ConfigError, match="agent_token_file: .* is empty"):
        _load_agent(tmp_path, "--agent-token-file", str(f))
