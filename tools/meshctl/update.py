"""`meshctl update pool|deployment NAME [flags] | -f FILE`: change a resource in place, guarded by its
generation (kubectl's `edit`/`apply` habits; docs/operations.md "meshctl")."""

from __future__ import annotations

import argparse

from tools.meshctl.common import CliError, client, info, nonneg_int, out, subcommand

EPILOG = """\
examples:
  meshctl update deployment chat --replicas 3
  meshctl update deployment chat --context 4096 --concurrency 4     # replicas roll one at a time
  meshctl update deployment chat --gpu-layers 20 --device cpu
  meshctl update deployment chat --label team=search --label old-    # set team, remove old
  meshctl get deployment chat -o yaml > chat.yaml; $EDITOR chat.yaml; meshctl update deployment -f chat.yaml
  meshctl update pool inference-a --max-slices 8                      # the flags given replace those fields
  meshctl update pool -f pool.yaml                                    # the shape `describe pool NAME -o yaml` prints

A deployment's replicas, backend settings (context, concurrency, gpu_layers, device) and labels may
change; its model, variant, isolation, tenant, priority and pool stay (a file that changes them is
refused naming the field). A backend change restarts the replicas one at a time, a new one first.
Every update is guarded by the generation: the one read just before (flags), or the file's
`generation` (-f); ABORTED when someone changed the object in between (read it again and retry).
A deployment's scaling policy is changed with `meshctl autoscale`, not here.
"""

DEPLOYMENT_FLAGS = ("replicas", "context", "concurrency", "gpu_layers", "device", "label")


def label_change(text: str) -> tuple[str, str | None]:
    """`KEY=VALUE` sets a label, `KEY-` removes it (kubectl label's syntax) -> (key, value or None)."""
    key, sep, value = text.partition("=")
    if sep and key:
        return key, value
    if not sep and len(text) > 1 and text.endswith("-"):
        return text[:-1], None
    raise argparse.ArgumentTypeError(f"invalid label {text!r} (allowed: KEY=VALUE to set, KEY- to remove)")


def register(sub: argparse._SubParsersAction) -> None:
    from tools.meshctl import pools
    u = subcommand(sub, "update", help="change a deployment or a resource pool in place", epilog=EPILOG,
                   description="Update a resource (deployment, pool): the flags given replace those fields (the "
                               "others stay); -f FILE replaces what the kind lets change. Guarded by the "
                               "object's generation.")
    u.add_argument("kind", metavar="KIND", choices=("pool", "pools", "deployment", "deployments", "deploy"),
                   help="deployment (deploy) | pool")
    u.add_argument("name", metavar="NAME", nargs="?", default="")
    u.add_argument("-f", "--file", default="", metavar="FILE",
                   help="a YAML or JSON document as `get deployment NAME -o yaml` / `describe pool NAME -o yaml` "
                        "prints ('-': stdin)")
    d = u.add_argument_group("deployment flags")
    d.add_argument("--replicas", type=nonneg_int, default=None, metavar="N", help="0 to 64")
    d.add_argument("--context", type=nonneg_int, default=None, metavar="TOKENS",
                   help="context per sequence (0: the variant's serving context)")
    d.add_argument("--concurrency", type=nonneg_int, default=None, metavar="N", help="sequences at once (0: 1)")
    d.add_argument("--gpu-layers", type=nonneg_int, default=None, metavar="N", help="llama.cpp: layers on the GPU (0: all)")
    d.add_argument("--device", choices=("cuda", "cpu", "auto"), default=None,
                   help="vLLM's build: cuda, cpu, or auto (each agent's choice)")
    d.add_argument("--label", type=label_change, action="append", default=None, metavar="KEY=VALUE|KEY-",
                   help="set (KEY=VALUE) or remove (KEY-) a label (repeatable)")
    pools._pool_flags(u.add_argument_group("pool flags"), defaults=None, file_flag=False)
    u.set_defaults(func=run_update)


def _given(args: argparse.Namespace, names: tuple[str, ...]) -> list[str]:
    return ["--" + n.replace("_", "-") for n in names if getattr(args, n, None) is not None]


def run_update(args: argparse.Namespace) -> int:
    from tools.meshctl import pools
    if args.kind.startswith("pool"):
        wrong = _given(args, DEPLOYMENT_FLAGS)
        if wrong:
            raise CliError(f"{', '.join(wrong)}: deployment flags; a pool takes {', '.join(_flags(pools.POOL_FLAGS))}")
        return pools.run_update(args)
    wrong = _given(args, pools.POOL_FLAGS)
    if wrong:
        raise CliError(f"{', '.join(wrong)}: pool flags; a deployment takes {', '.join(_flags(DEPLOYMENT_FLAGS))}")
    return run_update_deployment(args)


def _flags(names: tuple[str, ...]) -> list[str]:
    return ["--" + n.replace("_", "-") for n in names]


def read_document(path: str) -> dict:
    import sys
    import yaml
    try:
        text = sys.stdin.read() if path == "-" else open(path).read()
    except OSError as e:
        raise CliError(f"-f: cannot read {path}: {e.strerror}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise CliError(f"-f: {path} is not YAML or JSON: {e}") from None
    if isinstance(doc, dict) and isinstance(doc.get("items"), list) and len(doc["items"]) == 1:
        doc = doc["items"][0]             # what `get deployment NAME -o yaml` prints for one name
    if not isinstance(doc, dict):
        raise CliError(f"-f: {path} holds no deployment document (a mapping with name, replicas, backend, labels)")
    return doc


def run_update_deployment(args: argparse.Namespace) -> int:
    from tools.meshctl.deploy import format_deployments
    given = _given(args, DEPLOYMENT_FLAGS)
    if args.file:
        if given:
            raise CliError(f"-f replaces the deployment: leave out {', '.join(given)} (edit the file)")
        doc = read_document(args.file)
        if args.name:
            if doc.get("name") not in (None, "", args.name):
                raise CliError(f"-f: the file is deployment {doc.get('name')!r}, not {args.name!r}")
            doc["name"] = args.name
        with client(args) as mesh:
            d = mesh.apply_deployment(doc)
    else:
        if not args.name:
            raise CliError("a deployment NAME (or -f FILE) is required")
        if not given:
            raise CliError(f"nothing to change: give one of {', '.join(_flags(DEPLOYMENT_FLAGS))}, or -f FILE")
        labels = dict(args.label or [])
        with client(args) as mesh:
            d = mesh.edit_deployment(
                args.name, replicas=args.replicas, context=args.context, concurrency=args.concurrency,
                gpu_layers=args.gpu_layers, device=None if args.device is None else
                ("" if args.device == "auto" else args.device),
                labels={k: v for k, v in labels.items() if v is not None},
                remove_labels=[k for k, v in labels.items() if v is None])
    info(f"deployment/{d.spec.name} updated (generation {d.generation})")
    out(format_deployments([d], args.output, single=True))
    return 0
