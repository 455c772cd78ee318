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
