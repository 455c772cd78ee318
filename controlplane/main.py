"""`mesh-controlplane`: the gpumesh control plane daemon."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from controlplane.config import ControlPlaneConfig
from mesh import config, logs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mesh-controlplane",
        description="gpumesh control plane: the gRPC API (slices, nodes, admin) over etcd state.",
        epilog="With no --etcd-endpoints it starts an embedded etcd under --state-dir.")
    config.add_arguments(parser, ControlPlaneConfig)
    args = parser.parse_args(argv)
    os.umask(0o077)      # its state (history.db, etcd's files, identity) is its user's alone (mesh/fsmodes.py)
    try:
        cfg = config.load(ControlPlaneConfig, args)
    except config.ConfigError as e:
        print(f"mesh-controlplane: configuration error: {e}", file=sys.stderr)
        return 2
    logs.setup("controlplane", cfg.log_level, cfg.log_format)
    from controlplane.server import ControlPlane
    try:
        asyncio.run(ControlPlane(cfg).run_until_signal())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
