"""meshctl: the gpumesh admin CLI (kubectl habits, built only on the mesh.client SDK).

Each command group lives in its own module with a `register(sub)` that adds
its subparsers; handlers import the SDK lazily so `meshctl --help` is fast.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import warnings
from collections.abc import Sequence

from tools.meshctl import (autoscale, bench, certs, cluster, contexts, cost, deploy, describe, forecast, generate, get, mesh,
                           migrate, models, nodes, pools, replay, sim, slices, top, update, version, workloads)
from tools.meshctl.common import CliError, HelpFormatter, Parser, add_global_flags

GROUPS = (cluster, get, describe, slices, workloads, migrate, nodes, mesh, models, deploy, generate, autoscale, bench,
          sim, replay, forecast, certs, contexts, top, pools, update, cost, version)

EPILOG = """\
examples:
  meshctl up --sim-hosts 2 --gpus-per-host 8 --detach   # a local simulated cluster
  meshctl get nodes
  meshctl get gpus -o wide
  meshctl alloc --tenant team-a --profile 1g.10gb
  meshctl alloc --tenant team-a --memory 8GiB --compute 0.25 --isolation mps
  meshctl get slices --tenant team-a -o json
  meshctl describe node sim-node-01
  meshctl run --slice s-7f3a9c1e2b4d -- python train.py
  meshctl logs w-3f9a2c1d7e6b -f
  meshctl release a-7f3a9c1e2b4d
  meshctl drain sim-node-02 --dry-run
  meshctl top                                           # live view (--once: one frame)
  meshctl model import /models/SmolLM2-135M-Instruct.Q4_1.gguf --name smollm2-135m
  meshctl create pool inference-a --gpu-model H100-80GB --max-slices 4
  meshctl cost --by model --since 24h
  meshctl recommend
  meshctl down
  meshctl config get-contexts                           # staging, production, local...
  meshctl --context production get nodes
  meshctl version                                       # meshctl, control plane, etcd, agents

The control plane address comes from --endpoint, then $MESH_ENDPOINT, then the
context: --context NAME, else $MESH_CONTEXT, else the current-context of the
config file ($MESHCONFIG, else config.yaml in $GPUMESH_CONFIG_DIR or
~/.config/gpumesh), which `meshctl up` and `meshctl config set-context|use-context`
write. Credentials come from --token/--ca/--cert/--key, then
$MESH_TOKEN/$MESH_CA/$MESH_CERT/$MESH_KEY, then the context.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="meshctl", formatter_class=HelpFormatter, epilog=EPILOG,
        description="Manage a gpumesh fleet: nodes, GPUs and the slices carved from them.")
    add_global_flags(parser, root=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for group in GROUPS:
        group.register(sub)
    return parser


def _describe_error(exc: BaseException, args: argparse.Namespace) -> str:
    from mesh import errors
    if isinstance(exc, errors.ResourceExhausted):
        lines = [exc.message]
        lines += [f"  {cls}: {why}" for cls, why in sorted(exc.reasons.items())
                  if f"{cls}: {why}" not in exc.message]
        return "\n".join(lines)
    if isinstance(exc, errors.InvalidArgument):
        if exc.field and exc.field not in exc.message:
            return f"{exc.field}: {exc.message}"
        return exc.message
    if isinstance(exc, errors.Unavailable):
        where = getattr(args, "endpoint", None) or "the control plane"
        try:
            from tools.meshctl.common import endpoint
            where = endpoint(args)
        except Exception:
            pass
        return f"cannot reach the control plane at {where}: {exc.message}"
    if isinstance(exc, errors.DeadlineExceeded):
        return f"timed out: {exc.message} (raise --timeout?)"
    if isinstance(exc, errors.MeshError) and type(exc) is errors.MeshError:
        return f"{exc.code.name.lower()}: {exc.message}"
    return str(exc)


def _terminated(signum, _frame):
    """SIGTERM unwinds like Ctrl-C: the command's clean-up runs (a bench's cluster, its state directory)."""
    raise Terminated(signum)


class Terminated(BaseException):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def main(argv: Sequence[str] | None = None) -> int:
    """Run meshctl; returns the exit status (0 ok, 1 error, 2 usage, 130 interrupted, 143 terminated)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    in_main = threading.current_thread() is threading.main_thread()
    before = signal.signal(signal.SIGTERM, _terminated) if in_main else None
    if in_main:         # a warning (a token sent in plaintext) reads like kubectl's, not like a traceback line
        warnings.formatwarning = lambda message, *_a, **_k: f"warning: {message}\n"
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except Terminated as t:
        sys.stderr.write("terminated\n")
        return 128 + t.signum
    except BrokenPipeError:
        return 0
    except CliError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    except Exception as exc:  # noqa: BLE001 - the CLI never shows a traceback unless -v
        from mesh import errors
        from mesh.context import NoEndpointError
        if isinstance(exc, (errors.MeshError, NoEndpointError)):
            sys.stderr.write(f"error: {_describe_error(exc, args)}\n")
            return 1
        if getattr(args, "verbose", 0):
            import traceback
            traceback.print_exc()
        sys.stderr.write(f"error: {type(exc).__name__}: {exc}\n")
        return 1
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, before)


if __name__ == "__main__":
    sys.exit(main())
