"""Helpers shared by the meshctl command modules (kept free of heavy imports)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mesh.client import MeshClient


class CliError(Exception):
    """A user-facing failure: printed as `error: <message>`, exit status 1."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the line breaks of descriptions and example epilogs."""


def add_global_flags(parser: argparse.ArgumentParser, *, root: bool, skip: tuple[str, ...] = ()) -> None:
    """The flags every command takes; on subcommands they default to SUPPRESS so a flag given
    before the command is not overwritten by the subcommand's default."""
    def d(value: Any) -> Any:
        return value if root else argparse.SUPPRESS
    g = parser.add_argument_group("global options")
    g.add_argument("--endpoint", metavar="HOST:PORT", default=d(None),
                   help="control plane address (default: $MESH_ENDPOINT, then the context saved by `meshctl up`)")
    g.add_argument("--token", metavar="TOKEN", default=d(None),
                   help="bearer token (default: $MESH_TOKEN, then the context)")
    g.add_argument("--ca", metavar="FILE", default=d(None),
                   help="CA certificate of the control plane; turns on TLS (default: $MESH_CA, then the context)")
    g.add_argument("--cert", metavar="FILE", default=d(None),
                   help="client certificate (default: $MESH_CERT, then the context); with --key")
    g.add_argument("--key", metavar="FILE", default=d(None), help="client key (default: $MESH_KEY, then the context)")
    g.add_argument("-o", "--output", choices=("table", "wide", "json", "yaml"), default=d("table"),
                   help="output format (default: table)")
    if "timeout" not in skip:
        g.add_argument("--timeout", type=positive_float, metavar="SECONDS", default=d(30.0),
                       help="deadline of each API call in seconds (default: 30)")
    g.add_argument("-v", "--verbose", action="count", default=d(0),
                   help="more detail (tracebacks on unexpected errors)")


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def nonneg_int(text: str) -> int:
    """An argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def key_value(what: str = "label"):
    """An argparse type: KEY=VALUE (a label, an environment variable, ...), as a (key, value) pair."""
    def parse(text: str) -> tuple[str, str]:
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"invalid {what} {text!r} (allowed: KEY=VALUE)")
        return key, value
    return parse


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def subcommand(sub: Any, name: str, *, help: str, description: str = "", epilog: str = "",
               aliases: tuple[str, ...] = (), skip: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """A subparser with the global flags and the shared formatter."""
    p = sub.add_parser(name, help=help, description=description or help, epilog=epilog,
                       aliases=list(aliases), formatter_class=HelpFormatter)
    add_global_flags(p, root=False, skip=skip)
    return p


def endpoint(args: argparse.Namespace) -> str:
    from mesh.context import resolve_endpoint
    return resolve_endpoint(getattr(args, "endpoint", None))


def client(args: argparse.Namespace) -> "MeshClient":
    """A MeshClient for the endpoint the flags, environment or context name."""
    from mesh.client import MeshClient
    from mesh.context import resolve_auth
    auth = resolve_auth({k: getattr(args, k, None) for k in ("token", "ca", "cert", "key")})
    return MeshClient(endpoint(args), timeout=getattr(args, "timeout", 30.0), **auth)


def out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def info(text: str) -> None:
    """Progress for humans: stderr, so stdout stays machine-readable."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()
