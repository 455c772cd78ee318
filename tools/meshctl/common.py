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


class _GivesWay:
    """The conflict rule of meshctl's parsers and their argument groups (see Parser)."""

    def _handle_conflict_error(self, action, conflicting_actions):  # noqa: ANN001 - argparse's hook
        if all(getattr(a, "gives_way", False) for _, a in conflicting_actions):
            self._handle_conflict_resolve(action, conflicting_actions)
            prog = getattr(self, "prog", "") or ""
            if action.type is not None:
                action.type = _hint_global_context(action.type, prog)
            if action.help:
                action.help += f"; to choose a meshctl context: meshctl --context NAME {prog.removeprefix('meshctl ')} ..."
            return
        super()._handle_conflict_error(action, conflicting_actions)


class _Group(_GivesWay, argparse._ArgumentGroup):
    pass


class Parser(_GivesWay, argparse.ArgumentParser):
    """meshctl's parsers. A command's own `--context` (a model's context length in tokens: deploy, run,
    model import, ...) takes the option over from the global `--context NAME`, which these commands take
    before their name (`meshctl --context prod deploy ...`); anything else that clashes is still an error."""

    def add_argument_group(self, *args, **kwargs):  # noqa: ANN002, ANN003 - argparse's signature
        group = _Group(self, *args, **kwargs)
        group.prog = self.prog
        self._action_groups.append(group)
        return group


def _hint_global_context(convert, prog: str):
    def parse(text: str):
        try:
            return convert(text)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
            raise argparse.ArgumentTypeError(
                f"{exc} (this command's --context is a length in tokens; to choose a meshctl context, "
                f"put it before the command: meshctl --context NAME {prog.removeprefix('meshctl ')} ...)") from None
    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def add_global_flags(parser: argparse.ArgumentParser, *, root: bool, skip: tuple[str, ...] = ()) -> None:
    """The flags every command takes; on subcommands they default to SUPPRESS so a flag given
    before the command is not overwritten by the subcommand's default."""
    def d(value: Any) -> Any:
        return value if root else argparse.SUPPRESS
    g = parser.add_argument_group("global options")
    g.add_argument("--endpoint", metavar="HOST:PORT", default=d(None),
                   help="control plane address (default: $MESH_ENDPOINT, then the context's endpoint)")
    ctx = g.add_argument("--context", dest="mesh_context", metavar="NAME", default=d(None),
                         help="the context of meshctl's config file to use (default: $MESH_CONTEXT, then its "
                              "current-context; see `meshctl config get-contexts`)")
    ctx.gives_way = True    # to a command's own --context (Parser)
    g.add_argument("--token", metavar="TOKEN", default=d(None),
                   help="bearer token (default: $MESH_TOKEN, then the context)")
    g.add_argument("--ca", metavar="FILE", default=d(None),
                   help="CA certificate of the control plane; turns on TLS (default: $MESH_CA, then the context)")
    g.add_argument("--cert", metavar="FILE", default=d(None),
                   help="client certificate (default: $MESH_CERT, then the context); with --key")
    g.add_argument("--key", metavar="FILE", default=d(None), help="client key (default: $MESH_KEY, then the context)")
    if "output" not in skip:
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
    """The control plane's address: --endpoint, else $MESH_ENDPOINT, else the context's (mesh/context.py)."""
    import os
    from mesh.context import ENV_ENDPOINT, resolve_endpoint
    flag, name = getattr(args, "endpoint", None), getattr(args, "mesh_context", None)
    addr = resolve_endpoint(flag, context=name)
    if name and not flag and os.environ.get(ENV_ENDPOINT) and not getattr(args, "_warned_endpoint", False):
        args._warned_endpoint = True
        info(f"warning: ${ENV_ENDPOINT} ({addr}) overrides the endpoint of context {name!r}")
    return addr


def auth(args: argparse.Namespace) -> dict:
    """Credentials (token, ca, cert, key) from the flags, the environment or the context."""
    from mesh.context import resolve_auth
    return resolve_auth({k: getattr(args, k, None) for k in ("token", "ca", "cert", "key")},
                        context=getattr(args, "mesh_context", None))


def client(args: argparse.Namespace) -> "MeshClient":
    """A MeshClient for the endpoint the flags, environment or context name."""
    from mesh.client import MeshClient
    return MeshClient(endpoint(args), timeout=getattr(args, "timeout", 30.0), **auth(args))


def text_only(args: argparse.Namespace, command: str, what: str) -> None:
    """Refuse -o json|yaml|wide for a command whose output is text of its own (a workload's log, top's frames):
    silently printing text for `-o json` breaks the script that asked for JSON."""
    fmt = getattr(args, "output", "table")
    if fmt != "table":
        raise CliError(f"-o {fmt}: {command} prints {what}; -o does not apply to it (allowed: table, the default)")


def out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def info(text: str) -> None:
    """Progress for humans: stderr, so stdout stays machine-readable."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()
