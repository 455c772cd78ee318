"""Where `meshctl` (and `MeshClient.from_context`) finds the control plane, and as whom.

The endpoint: the `--endpoint` flag, else `$MESH_ENDPOINT`, else the chosen context's endpoint.
Each credential (token, ca, cert, key): its flag, else `$MESH_TOKEN`/`$MESH_CA`/`$MESH_CERT`/`$MESH_KEY`,
else the chosen context (its `token`, or the contents of its `token-file`).
The chosen context: the `--context` flag (`context=` in the SDK), else `$MESH_CONTEXT`, else the config
file's `current-context`. A context chosen by name that the file lacks is an error listing the known ones.
The config file itself (named contexts, YAML like kubeconfig) is `mesh/meshconfig.py`.
"""

from __future__ import annotations

import os
from pathlib import Path

from mesh import meshconfig
from mesh.meshconfig import (ConfigFileError, Context, NoEndpointError, UnknownContextError, config_dir,
                             config_path)

ENV_ENDPOINT = "MESH_ENDPOINT"
ENV_CONTEXT = "MESH_CONTEXT"
ENV_CONFIG_DIR = meshconfig.ENV_CONFIG_DIR
ENV_CONFIG = meshconfig.ENV_CONFIG
AUTH_KEYS = ("token", "ca", "cert", "key")
ENV_AUTH = {"token": "MESH_TOKEN", "ca": "MESH_CA", "cert": "MESH_CERT", "key": "MESH_KEY"}


def context_path() -> Path:
    """The config file (kept under its old name for callers of the single-context API)."""
    return config_path()


def chosen_name(context: str | None = None) -> tuple[str, str]:
    """(name, where it came from) of the explicitly chosen context: the flag, else `$MESH_CONTEXT`;
    ("", "") when neither names one (the file's current-context applies)."""
    if context:
        return context, "--context"
    env = os.environ.get(ENV_CONTEXT)
    if env:
        return env, f"${ENV_CONTEXT}"
    return "", ""


def select(context: str | None = None, *, strict_current: bool = True) -> Context | None:
    """The context in use: `context`, else `$MESH_CONTEXT`, else the file's current-context; None when
    none is set. A named context the file lacks raises UnknownContextError; so does a current-context
    that names no context, unless `strict_current` is False (then it counts as none)."""
    cfg = meshconfig.load()
    name, source = chosen_name(context)
    if name:
        return cfg.get(name, source)
    if not cfg.current:
        return None
    if cfg.current not in cfg.contexts and not strict_current:
        return None
    return cfg.get(cfg.current, f"current-context in {cfg.path}")


def resolve_endpoint(flag: str | None, context: str | None = None) -> str:
    """The control plane's HOST:PORT (or a comma-separated list) from the flag, the environment or the context.
    A context named by `context` or `$MESH_CONTEXT` must exist even when the flag or environment wins."""
    if flag or os.environ.get(ENV_ENDPOINT):
        if chosen_name(context)[0]:
            select(context)
        return flag or os.environ[ENV_ENDPOINT]
    ctx = select(context)
    if ctx is not None and ctx.endpoint:
        return ctx.endpoint
    if ctx is not None:
        raise NoEndpointError(f"context {ctx.name!r} has no endpoint: set one with "
                              f"`meshctl config set-context {ctx.name} --endpoint HOST:PORT`")
    raise NoEndpointError(
        "no control plane endpoint: run `meshctl up` to start a local cluster, "
        f"pass --endpoint HOST:PORT, set ${ENV_ENDPOINT}, or choose a context "
        "(`meshctl config get-contexts`, `meshctl config use-context NAME`)")


def resolve_auth(flags: dict | None = None, context: str | None = None) -> dict:
    """Credentials for MeshClient (token, ca, cert, key): each from the flag, else `$MESH_TOKEN`,
    `$MESH_CA`, `$MESH_CERT`, `$MESH_KEY`, else the chosen context; absent ones are left out."""
    flags = flags or {}
    out: dict[str, str] = {}
    ctx: Context | None = None
    loaded = False
    for k in AUTH_KEYS:
        value = flags.get(k) or os.environ.get(ENV_AUTH[k])
        if not value:
            if not loaded:
                ctx, loaded = select(context, strict_current=False), True
            value = _credential(ctx, k) if ctx is not None else ""
        if value:
            out[k] = str(value)
    return out


def _credential(ctx: Context, key: str) -> str:
    if key != "token" or ctx.token or not ctx.token_file:
        return getattr(ctx, key)
    path = Path(ctx.token_file).expanduser()
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise ConfigFileError(config_path(), f"context {ctx.name!r} token-file",
                              f"cannot read {path}: {exc.strerror or exc}") from exc
    if not token:
        raise ConfigFileError(config_path(), f"context {ctx.name!r} token-file", f"{path} is empty")
    return token


def load_context(context: str | None = None) -> dict | None:
    """The context in use as a flat dict (`endpoint`, `state_dir`, `token`, `ca`, ...), or None if none is set."""
    ctx = select(context, strict_current=False)
    if ctx is None:
        return None
    return {attr: getattr(ctx, attr) for attr in meshconfig.FIELDS.values() if getattr(ctx, attr)}


def _same_dir(a: str | os.PathLike | None, b: str | os.PathLike | None) -> bool:
    if not a or not b:
        return False
    return os.path.realpath(os.fspath(a)) == os.path.realpath(os.fspath(b))


def save_context(endpoint: str, state_dir: str | os.PathLike | None, auth: dict | None = None,
                 name: str | None = None, *, make_current: bool = True) -> Path:
    """Save `endpoint` (of the cluster whose files are in `state_dir`, if local) with its credentials
    (`auth`: token, ca, cert, key) as the context `name` (default: `local` for a local cluster, else
    `default`), replacing one of that name, and make it the current context. Returns the file."""
    name = meshconfig.check_name(name or (meshconfig.LEGACY_LOCAL if state_dir is not None
                                          else meshconfig.LEGACY_DEFAULT))
    ctx = Context(name=name, endpoint=endpoint,
                  state_dir=os.path.realpath(os.fspath(state_dir)) if state_dir is not None else "",
                  **{k: str(v) for k, v in (auth or {}).items() if k in AUTH_KEYS and v})
    with meshconfig.editing() as cfg:
        cfg.contexts[name] = ctx
        if make_current:
            cfg.current = name
        return cfg.path


def clear_context(state_dir: str | os.PathLike) -> bool:
    """Remove the contexts of the local cluster in `state_dir` (saved by `meshctl up`), and the
    current-context if it was one of them; True if any was removed. A broken file is left alone."""
    try:
        with meshconfig.editing() as cfg:
            gone = [n for n, c in cfg.contexts.items() if _same_dir(c.state_dir, state_dir)]
            for n in gone:
                del cfg.contexts[n]
            if cfg.current in gone:
                cfg.current = ""
            return bool(gone)
    except ConfigFileError:
        return False


__all__ = ["resolve_endpoint", "resolve_auth", "save_context", "clear_context", "load_context", "select",
           "chosen_name", "config_dir", "config_path", "context_path", "NoEndpointError", "ConfigFileError",
           "UnknownContextError", "ENV_CONTEXT", "ENV_ENDPOINT", "ENV_CONFIG"]
