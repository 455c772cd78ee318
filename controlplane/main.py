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
    import aetcd.exceptions

    from controlplane.server import ControlPlane
    try:
        asyncio.run(ControlPlane(cfg).run_until_signal())
    except KeyboardInterrupt:
        pass
    except aetcd.exceptions.ConnectionFailedError as e:
        if not cfg.etcd_endpoints:
            raise                   # the embedded etcd: its own start reports what went wrong
        print(f"mesh-controlplane: {etcd_unreachable(cfg, e)}", file=sys.stderr)
        return 1
    return 0


def etcd_unreachable(cfg: ControlPlaneConfig, error: BaseException) -> str:
    """One line for a start that found no etcd member answering: the endpoints, gRPC's reason and the
    settings that make a reachable member refuse (gRPC reports a refused client certificate only as
    "Unwrap failed" or "Handshake failed")."""
    checks = ["that etcd runs there (etcdctl --endpoints URL endpoint health)"]
    if any(u.startswith("https://") for u in cfg.etcd_endpoints):
        checks.append("etcd_ca (the CA that signed the members' certificates)")
        if not cfg.etcd_cert:
            checks.append("etcd_cert and etcd_key (an etcd run with --client-cert-auth refuses a client without "
                          "a certificate; none is set)")
    return (f"cannot reach etcd at {','.join(cfg.etcd_endpoints)}: {error}; check " + ", ".join(checks))


if __name__ == "__main__":
    sys.exit(main())
