"""Where `meshctl` finds the control plane.

In order: the `--endpoint` flag, `$MESH_ENDPOINT`, then the current context
file written by `meshctl up` (`context.json` in `$GPUMESH_CONFIG_DIR`, else
`$XDG_CONFIG_HOME/gpumesh`, else `~/.config/gpumesh`).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

CONTEXT_FILE = "context.json"
ENV_ENDPOINT = "MESH_ENDPOINT"
ENV_CONFIG_DIR = "GPUMESH_CONFIG_DIR"


class NoEndpointError(Exception):
    """No control plane endpoint could be found."""


def config_dir() -> Path:
    """The folder that holds the current context file."""
    explicit = os.environ.get(ENV_CONFIG_DIR)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CONFIG_HOME")
    if xdg:
        return Path(xdg).expanduser() / "gpumesh"
    return Path.home() / ".config" / "gpumesh"


def context_path() -> Path:
    return config_dir() / CONTEXT_FILE


def load_context() -> dict | None:
    """The saved context (`{"endpoint": ..., "state_dir": ...}`), or None if none is saved."""
    path = context_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise NoEndpointError(f"cannot read the context file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise NoEndpointError(f"the context file {path} is not a JSON object")
    return data


def resolve_endpoint(flag: str | None) -> str:
    """The control plane's HOST:PORT from the flag, the environment or the context file."""
    if flag:
        return flag
    env = os.environ.get(ENV_ENDPOINT)
    if env:
        return env
    ctx = load_context()
    if ctx and ctx.get("endpoint"):
        return str(ctx["endpoint"])
    raise NoEndpointError(
        "no control plane endpoint: run `meshctl up` to start a local cluster, "
        f"pass --endpoint HOST:PORT, or set ${ENV_ENDPOINT}")


AUTH_KEYS = ("token", "ca", "cert", "key")
ENV_AUTH = {"token": "MESH_TOKEN", "ca": "MESH_CA", "cert": "MESH_CERT", "key": "MESH_KEY"}


def resolve_auth(flags: dict | None = None) -> dict:
    """Credentials for MeshClient (token, ca, cert, key): each from the flag, else `$MESH_TOKEN`,
    `$MESH_CA`, `$MESH_CERT`, `$MESH_KEY`, else the current context; absent ones are left out."""
    flags = flags or {}
    ctx = None
    out = {}
    for k in AUTH_KEYS:
        value = flags.get(k) or os.environ.get(ENV_AUTH[k])
        if not value:
            if ctx is None:
                ctx = load_context() or {}
            value = ctx.get(k)
        if value:
            out[k] = str(value)
    return out


def _same_dir(a: str | os.PathLike | None, b: str | os.PathLike | None) -> bool:
    if not a or not b:
        return False
    return os.path.realpath(os.fspath(a)) == os.path.realpath(os.fspath(b))


def save_context(endpoint: str, state_dir: str | os.PathLike | None, auth: dict | None = None) -> Path:
    """Make `endpoint` (of the cluster whose files are in `state_dir`, if local) the current context,
    with its credentials (`auth`: token, ca, cert, key). The file is private (mode 0600): it may hold a token."""
    path = context_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"endpoint": endpoint}
    if state_dir is not None:
        data["state_dir"] = os.path.realpath(os.fspath(state_dir))
    data.update({k: v for k, v in (auth or {}).items() if k in AUTH_KEYS and v})
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".context-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def clear_context(state_dir: str | os.PathLike) -> bool:
    """Remove the current context if it points at `state_dir`; True if it was removed."""
    try:
        ctx = load_context()
    except NoEndpointError:
        return False
    if not ctx or not _same_dir(ctx.get("state_dir"), state_dir):
        return False
    try:
        context_path().unlink()
    except FileNotFoundError:
        return False
    return True


__all__ = ["resolve_endpoint", "resolve_auth", "save_context", "clear_context", "load_context",
           "config_dir", "context_path", "NoEndpointError"]
