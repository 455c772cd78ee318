"""`meshctl generate MODEL --prompt TEXT`: a completion from a deployed model through mesh-gateway's gRPC
InferenceService (mesh/inferenceapi.py; docs/gateway.md), the text streamed to stdout as generated."""

from __future__ import annotations

import argparse
import os
import sys

from tools.meshctl.common import CliError, info, nonneg_int, out, subcommand

EPILOG = """\
examples:
  meshctl generate chat --prompt "The capital of France is" --max-tokens 8 --gateway 127.0.0.1:8090
  MESH_GATEWAY=127.0.0.1:8090 meshctl generate smollm2 --message system="Be brief." --message user="Hi!"
  meshctl generate chat --prompt "Once upon a time" --temperature 0.8 --seed 7 --priority sheddable
  meshctl generate chat --prompt "2+2=" -o json        # {"text", "finish_reason", "served_by", token counts}

MODEL is a deployment name or a registry model name. The text goes to stdout as the gateway streams it;
the replica that served it, why it stopped and the token counts go to stderr (-o json|yaml: one document
at the end). The gateway is --gateway HOST:PORT (its grpc_listen), else $MESH_GATEWAY, else the gateway of the
local cluster (`meshctl up`) that the context in use names; the token and TLS
flags are the control plane's (--token, --ca, ... or $MESH_TOKEN, ...). Ctrl-C cancels the request.
"""


def _message(text: str) -> tuple[str, str]:
    role, sep, content = text.partition("=")
    if not sep or role not in ("system", "user", "assistant"):
        raise argparse.ArgumentTypeError(f"invalid message {text!r} (allowed: ROLE=TEXT, ROLE system, user or "
                                         "assistant)")
    return role, content


def register(sub: argparse._SubParsersAction) -> None:
    p = subcommand(sub, "generate", help="a completion from a deployed model, streamed (gateway gRPC)",
                   description="Run a completion on a deployed model through mesh-gateway's InferenceService and "
                               "print the text as it is generated.", epilog=EPILOG)
    p.add_argument("model", metavar="DEPLOYMENT_OR_MODEL")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", default="", help="a plain prompt (a completion)")
    what.add_argument("--message", type=_message, action="append", metavar="ROLE=TEXT",
                      help="a chat message, in order (repeatable; a chat completion)")
    p.add_argument("--max-tokens", type=nonneg_int, default=0, metavar="N", help="tokens at most (default 16)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 to 2 (default 0: greedy)")
    p.add_argument("--seed", type=int, default=None, help="a fixed sampling seed")
    p.add_argument("--priority", choices=("critical", "standard", "sheddable"), default="",
                   help="default: the tenant's")
    p.add_argument("--allow-fallback", action="store_true",
                   help="accept an answer from the model's fallback variant when its replicas are busy or down")
    p.add_argument("--gateway", default=None, metavar="HOST:PORT",
                   help="the gateway's gRPC address (default: $MESH_GATEWAY, else the local cluster's of the "
                        "context)")
    p.set_defaults(func=run_generate)


def local_gateway(args: argparse.Namespace) -> str:
    """The gRPC address of the gateway of the local cluster (`meshctl up`) the context in use names: its state
    dir's cluster.json `gateway_grpc`; "" when the context is no local cluster's or its gateway has no gRPC."""
    import json
    from pathlib import Path
    from mesh.context import NoEndpointError, select
    from tools.localprocs import CLUSTER_FILE
    try:
        ctx = select(getattr(args, "mesh_context", None), strict_current=False)
    except NoEndpointError:
        return ""
    if ctx is None or not ctx.state_dir:
        return ""
    try:
        return json.loads((Path(ctx.state_dir) / CLUSTER_FILE).read_text()).get("gateway_grpc") or ""
    except (OSError, ValueError, AttributeError):
        return ""


def gateway(args: argparse.Namespace) -> str:
    addr = args.gateway or os.environ.get("MESH_GATEWAY", "") or local_gateway(args)
    if not addr:
        raise CliError("--gateway: no gateway address (give --gateway HOST:PORT, the gateway's grpc_listen, or set "
                       "$MESH_GATEWAY; a local cluster's context, `meshctl up`, names its own)")
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise CliError(f"--gateway: {addr!r} is not HOST:PORT")
    return addr


def run_generate(args: argparse.Namespace) -> int:
    from mesh.inferenceapi import InferenceClient, response_to_dict
    from tools.meshctl.common import auth as credentials
    from tools.meshctl.output import dump
    auth = credentials(args)
    stream = args.output not in ("json", "yaml")
    text: list[str] = []
    last = None
    with InferenceClient(gateway(args), timeout=None, **auth) as inf:
        for chunk in inf.generate(args.model, prompt=args.prompt, messages=args.message, max_tokens=args.max_tokens,
                                  temperature=args.temperature, seed=args.seed, priority=args.priority,
                                  allow_fallback=args.allow_fallback):
            text.append(chunk.text)
            last = chunk
            if stream and chunk.text:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
    from gpumesh.v1 import inference_service_pb2 as I
    doc = response_to_dict("".join(text), last or I.GenerateResponse())
    if stream:
        out("\n")
        info(f"finish_reason={doc['finish_reason'] or '-'} served_by={doc['served_by'] or '-'} "
             f"prompt_tokens={'-' if doc['prompt_tokens'] is None else doc['prompt_tokens']} "
             f"completion_tokens={doc['completion_tokens']}"
             + (f" degraded={doc['degraded']}" if doc["degraded"] else ""))
    else:
        out(dump(doc, args.output))
    return 1 if doc["finish_reason"] == "error" else 0
