"""Write docs/configuration.md from the daemons' config dataclasses
(`python -m tools.gendocs`; `--check` fails if the file is stale)."""

from __future__ import annotations

import argparse
import pathlib
import sys

from controlplane.config import ControlPlaneConfig
from controlplane.gateway.config import GatewayConfig
from mesh.config import reference
from nodeagent.config import AgentConfig

PATH = pathlib.Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def render() -> str:
    return f"""# Configuration reference

Generated from the config classes by `python -m tools.gendocs`; do not edit by hand.

Every daemon reads its settings from, in increasing precedence: the defaults
below, a YAML file (`--config FILE` or `$<PREFIX>CONFIG`; keys are the setting
names), environment variables, and flags. Everything is validated at start; an
invalid value stops the daemon with exit status 2 and a message that names the
setting, where it came from and what is allowed.
A true/false setting takes `true`/`false` (also `yes`/`no`, `on`/`off`, `1`/`0`)
in the file and the environment, and `--X` or `--no-X` as a flag.

## mesh-controlplane

{reference(ControlPlaneConfig)}

## mesh-agent

{reference(AgentConfig)}

## mesh-gateway

{reference(GatewayConfig)}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not PATH.exists() or PATH.read_text() != text:
            print(f"{PATH} is stale: run `python -m tools.gendocs`", file=sys.stderr)
            return 1
        return 0
    PATH.parent.mkdir(exist_ok=True)
    PATH.write_text(text)
    print(f"wrote {PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
