"""`meshctl config ...`: the named contexts of meshctl's config file (kubectl's `config` verbs).

get-contexts, current-context, use-context, set-context, delete-context, rename-context, view.
The file and its rules are mesh/meshconfig.py; how a command picks its context, mesh/context.py.
"""

from __future__ import annotations

import argparse
import os

from tools.meshctl.common import CliError, HelpFormatter, info, out, subcommand

CONFIG_EPILOG = """\
examples:
  meshctl config set-context staging --endpoint cp1.staging.internal:50051,cp2.staging.internal:50051 \\
      --ca ~/pki/staging-ca.crt --token-file ~/.config/gpumesh/staging.token
  meshctl config set-context production --endpoint cp.prod.internal:50051 --ca ~/pki/prod-ca.crt \\
      --cert ~/pki/ops.crt --key ~/pki/ops.key
  meshctl config get-contexts
  meshctl config use-context staging
  meshctl --context production get nodes            # one command against another context
  MESH_CONTEXT=production meshctl get slices        # a shell's worth of commands
  meshctl config view --minify

The file: $MESHCONFIG, else config.yaml in $GPUMESH_CONFIG_DIR (else
$XDG_CONFIG_HOME/gpumesh, else ~/.config/gpumesh); private (mode 0600), written
atomically. The context in use: --context NAME, else $MESH_CONTEXT, else the
file's current-context; --endpoint and $MESH_ENDPOINT still override its
endpoint, and --token/--ca/--cert/--key and $MESH_TOKEN/... its credentials.
"""


def register(sub: argparse._SubParsersAction) -> None:
    cfg = sub.add_parser("config", help="meshctl's contexts: where and as whom it reaches a control plane",
                         formatter_class=HelpFormatter, epilog=CONFIG_EPILOG,
                         description="Named contexts (an endpoint and its credentials) and the current one, "
                                     "like kubectl's kubeconfig.")
    c = cfg.add_subparsers(dest="config_command", metavar="COMMAND", title="commands")

    p = subcommand(c, "get-contexts", help="list the contexts (* marks the current one)", skip=("output",),
                   epilog="examples:\n  meshctl config get-contexts\n  meshctl config get-contexts -o name\n"
                          "  meshctl config get-contexts staging -o yaml      # tokens redacted\n")
    p.add_argument("names", nargs="*", metavar="NAME", help="only these contexts")
    p.add_argument("-o", "--output", choices=("table", "wide", "name", "json", "yaml"), default=argparse.SUPPRESS,
                   help="table (default), wide (adds the local cluster's state dir), name, json or yaml")
    p.set_defaults(func=run_get_contexts)

    p = subcommand(c, "current-context", help="print the current context's name",
                   epilog="example:\n  meshctl config current-context\n")
    p.set_defaults(func=run_current_context)

    p = subcommand(c, "use-context", help="make a context the current one", aliases=("use",),
                   epilog="example:\n  meshctl config use-context production\n")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=run_use_context)

    p = subcommand(c, "set-context", help="create or change a context",
                   description="Create the context NAME, or change the fields given (an empty value, e.g. "
                               "--token '', removes one). Without NAME (or with --current): the current context, "
                               "created as `default` when there is none. The first context becomes the current one.",
                   epilog=SET_EPILOG)
    p.add_argument("name", nargs="?", metavar="NAME", help="the context (default: the current one)")
    p.add_argument("--current", action="store_true", help="change the current context")
    p.add_argument("--token-file", metavar="FILE",
                   help="a file holding the bearer token, read at each use (replaces --token in the context)")
    p.set_defaults(func=run_set_context)

    p = subcommand(c, "delete-context", help="remove a context",
                   epilog="example:\n  meshctl config delete-context old-staging\n")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=run_delete_context)

    p = subcommand(c, "rename-context", help="rename a context (the current one stays current)",
                   epilog="example:\n  meshctl config rename-context default production\n")
    p.add_argument("old", metavar="OLD")
    p.add_argument("new", metavar="NEW")
    p.set_defaults(func=run_rename_context)

    p = subcommand(c, "view", help="print the config file (tokens redacted unless --raw)", skip=("output",),
                   epilog="examples:\n  meshctl config view\n  meshctl config view --minify -o json\n"
                          "  meshctl config view --raw > backup.yaml           # with the tokens\n")
    p.add_argument("-o", "--output", choices=("yaml", "json"), default=argparse.SUPPRESS,
                   help="yaml (default) or json")
    p.add_argument("--raw", action="store_true", help="show the tokens as they are")
    p.add_argument("--minify", action="store_true",
                   help="only the context in use (--context, $MESH_CONTEXT or the current one)")
    p.set_defaults(func=run_view)
    cfg.set_defaults(func=lambda args: (cfg.print_help(), 2)[1])


SET_EPILOG = """\
examples:
  meshctl config set-context staging --endpoint cp1.staging.internal:50051,cp2.staging.internal:50051 \\
      --ca /etc/gpumesh/pki/ca.crt --token-file ~/.config/gpumesh/staging.token
  meshctl config set-context production --cert ~/pki/ops.crt --key ~/pki/ops.key   # change two fields
  meshctl config set-context --current --token ''                                 # remove a field
  meshctl config set-context --endpoint cp.example.internal:50051 --ca pki/ca.crt --token "$TOKEN"

--ca, --cert, --key and --token-file are stored as absolute paths; prefer
--token-file to --token (a token on the command line is visible to `ps`).
"""


def _load():
    from mesh import meshconfig
    return meshconfig.load()


def _known(cfg) -> str:
    return ", ".join(cfg.contexts) or "none"


def run_get_contexts(args: argparse.Namespace) -> int:
    cfg = _load()
    for name in args.names:
        cfg.get(name)
    names = args.names or list(cfg.contexts)
    fmt = getattr(args, "output", "table")
    if fmt == "name":
        out("".join(f"{n}\n" for n in names))
    elif fmt in ("json", "yaml"):
        from tools.meshctl.output import dump
        out(dump({"current-context": cfg.current,
                  "contexts": [cfg.contexts[n].to_doc(redact=True) for n in names]}, fmt))
    else:
        from tools.meshctl.output import render_table
        headers = ["current", "name", "endpoint", "tls", "auth"] + (["state-dir"] if fmt == "wide" else [])
        rows = []
        for n in names:
            c = cfg.contexts[n]
            row = ["*" if n == cfg.current else " ", n, c.endpoint, "yes" if (c.ca or c.cert) else "no", _auth(c)]
            rows.append(row + ([c.state_dir] if fmt == "wide" else []))
        out(render_table(headers, rows) if rows else "")
        if not rows:
            info(f"no contexts in {cfg.path}: `meshctl up` or `meshctl config set-context NAME --endpoint HOST:PORT`")
    return 0


def _auth(c) -> str:
    kinds = [k for k, on in (("client-cert", c.cert), ("token", c.token), ("token-file", c.token_file)) if on]
    return "+".join(kinds) or "none"


def run_current_context(args: argparse.Namespace) -> int:
    cfg = _load()
    if not cfg.current:
        raise CliError(f"current-context is not set in {cfg.path} (known contexts: {_known(cfg)}; "
                       "choose one with `meshctl config use-context NAME`)")
    out(cfg.current + "\n")
    return 0


def run_use_context(args: argparse.Namespace) -> int:
    from mesh import meshconfig
    with meshconfig.editing() as cfg:
        cfg.get(args.name)
        cfg.current = args.name
    out(f'Switched to context "{args.name}".\n')
    return 0


def run_set_context(args: argparse.Namespace) -> int:
    from mesh import meshconfig
    changes = _changes(args)
    with meshconfig.editing() as cfg:
        name = args.name
        if args.current or not name:
            if args.current and name and name != cfg.current:
                raise CliError(f"give NAME or --current, not both (the current context is {cfg.current or 'unset'!r})")
            from mesh.context import chosen_name
            # the context this command works on: --context / $MESH_CONTEXT, else the file's current one
            name = chosen_name(getattr(args, "mesh_context", None))[0] or cfg.current or meshconfig.LEGACY_DEFAULT
        _check(meshconfig.check_name, name)
        ctx = cfg.contexts.get(name)
        created = ctx is None
        if created:
            if not changes.get("endpoint"):
                raise CliError(f"context {name!r} does not exist yet: --endpoint HOST:PORT is required to create it "
                               f"(known contexts: {_known(cfg)})")
            ctx = meshconfig.Context(name=name)
        elif not changes:
            raise CliError("nothing to change: give --endpoint, --ca, --cert, --key, --token or --token-file")
        for attr, value in changes.items():
            setattr(ctx, attr, value)
        if changes.get("token"):
            ctx.token_file = ""
        if changes.get("token_file"):
            ctx.token = ""
        for fld, message in ctx.problems():
            raise CliError(f"--{fld.replace('_', '-')}: {message}")
        cfg.contexts[name] = ctx
        if not cfg.current or cfg.current not in cfg.contexts:
            cfg.current = name
        path = cfg.path
    for attr in ("ca", "cert", "key", "token_file"):
        if changes.get(attr) and not os.path.exists(changes[attr]):
            info(f"warning: --{attr.replace('_', '-')} {changes[attr]} does not exist (yet)")
    out(f'Context "{name}" {"created" if created else "modified"}.\n')
    info(f"saved in {path}")
    return 0


def _changes(args: argparse.Namespace) -> dict[str, str]:
    """The fields given on the command line (an empty value clears one); file paths made absolute."""
    changes = {}
    for attr in ("endpoint", "ca", "cert", "key", "token", "token_file"):
        value = getattr(args, attr, None)
        if value is None:
            continue
        if value and attr in ("ca", "cert", "key", "token_file"):
            value = os.path.abspath(os.path.expanduser(value))
        changes[attr] = value
    if changes.get("token") and changes.get("token_file"):
        raise CliError("--token and --token-file are exclusive (give one)")
    return changes


def _check(fn, *a):
    try:
        return fn(*a)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def run_delete_context(args: argparse.Namespace) -> int:
    from mesh import meshconfig
    with meshconfig.editing() as cfg:
        cfg.get(args.name)
        del cfg.contexts[args.name]
        was_current = cfg.current == args.name
        if was_current:
            cfg.current = ""
        path = cfg.path
    if was_current:
        info("warning: this removed the current context; choose another with `meshctl config use-context NAME`")
    out(f"deleted context {args.name} from {path}\n")
    return 0


def run_rename_context(args: argparse.Namespace) -> int:
    from mesh import meshconfig
    _check(meshconfig.check_name, args.new, "new name")
    with meshconfig.editing() as cfg:
        ctx = cfg.get(args.old)
        if args.new in cfg.contexts and args.new != args.old:
            raise CliError(f"cannot rename the context {args.old!r}: a context {args.new!r} already exists")
        cfg.contexts = {(args.new if n == args.old else n): c for n, c in cfg.contexts.items()}
        ctx.name = args.new
        if cfg.current == args.old:
            cfg.current = args.new
    out(f'Context "{args.old}" renamed to "{args.new}".\n')
    return 0


def run_view(args: argparse.Namespace) -> int:
    from mesh.context import select
    from tools.meshctl.output import dump
    cfg = _load()
    only = None
    if args.minify:
        ctx = select(getattr(args, "mesh_context", None))
        if ctx is None:
            raise CliError(f"--minify: no context in use (current-context is not set in {cfg.path})")
        only = ctx.name
    fmt = getattr(args, "output", "yaml")
    out(dump(cfg.to_doc(redact=not args.raw, only=only), "json" if fmt == "json" else "yaml"))
    return 0
