"""meshctl's config file: named contexts (where and as whom to reach a control plane) and the current one.

YAML shaped like kubectl's kubeconfig, one flat entry per context:

    apiVersion: gpumesh/v1
    kind: Config
    current-context: staging
    contexts:
    - name: staging
      endpoint: cp1.staging.internal:50051,cp2.staging.internal:50051
      ca: /etc/gpumesh/pki/ca.crt
      token-file: /home/ops/.config/gpumesh/staging.token
    - name: local                      # written by `meshctl up`, removed by `meshctl down`
      endpoint: 127.0.0.1:50051
      state-dir: /home/ops/.mesh

The file is `$MESHCONFIG`, else `config.yaml` in the config dir (`$GPUMESH_CONFIG_DIR`, else
`$XDG_CONFIG_HOME/gpumesh`, else `~/.config/gpumesh`). It is written atomically (a private temporary
file renamed over it) with mode 0600, under a lock, since it may hold tokens. The single-context
`context.json` of earlier versions, in the config dir, is read as one context (`local` when `meshctl up`
wrote it, else `default`) and replaced by the YAML file on the first change.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mesh.fsmodes import replace_private

API_VERSION = "gpumesh/v1"
KIND = "Config"
CONFIG_FILE = "config.yaml"
LEGACY_FILE = "context.json"
ENV_CONFIG = "MESHCONFIG"
ENV_CONFIG_DIR = "GPUMESH_CONFIG_DIR"
REDACTED = "REDACTED"
LEGACY_LOCAL, LEGACY_DEFAULT = "local", "default"

# YAML key -> Context attribute, in the order they are written.
FIELDS = {"endpoint": "endpoint", "ca": "ca", "cert": "cert", "key": "key", "token": "token",
          "token-file": "token_file", "state-dir": "state_dir"}
TOP_KEYS = ("apiVersion", "kind", "current-context", "contexts")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:/+-]{0,252}$")
NAME_ALLOWED = "1-253 characters: letters, digits and . _ @ : / + - (starting with a letter or digit)"


class NoEndpointError(Exception):
    """No control plane endpoint could be found (also the base of the config file's errors)."""


class ConfigFileError(NoEndpointError):
    """The config file (or a file it names) cannot be read or is invalid; names the file and the field."""

    def __init__(self, path: Path | str, field: str, message: str) -> None:
        self.path, self.field = str(path), field
        super().__init__(f"{path}: {field}: {message}" if field else f"{path}: {message}")


class UnknownContextError(NoEndpointError):
    """A context name that the config file does not hold; lists the ones it does."""

    def __init__(self, name: str, known: list[str], path: Path | str, source: str = "") -> None:
        self.name, self.known, self.path = name, list(known), str(path)
        where = f" (from {source})" if source else ""
        have = ", ".join(self.known) if self.known else "none"
        super().__init__(f"context {name!r}{where} does not exist in {path}; known contexts: {have} "
                         "(see `meshctl config get-contexts`)")


def config_dir() -> Path:
    """The folder of meshctl's config file (unless `$MESHCONFIG` names the file itself)."""
    explicit = os.environ.get(ENV_CONFIG_DIR)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CONFIG_HOME")
    if xdg:
        return Path(xdg).expanduser() / "gpumesh"
    return Path.home() / ".config" / "gpumesh"


def config_path() -> Path:
    """`$MESHCONFIG`, else config.yaml in `config_dir()`."""
    explicit = os.environ.get(ENV_CONFIG)
    return Path(explicit).expanduser() if explicit else config_dir() / CONFIG_FILE


def check_name(name: str, what: str = "name") -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValueError(f"{what} {name!r} is not a valid context name (allowed: {NAME_ALLOWED})")
    return name


@dataclass
class Context:
    """One named context: a control plane's endpoint(s) and the credentials to use there."""

    name: str
    endpoint: str = ""
    ca: str = ""            # CA certificate file; turns on TLS
    cert: str = ""          # client certificate file (with key)
    key: str = ""           # client key file
    token: str = ""         # bearer token (secret: redacted by `meshctl config view`)
    token_file: str = ""    # a file holding the bearer token, read at each use
    state_dir: str = ""     # a local cluster's state dir (`meshctl up`): `meshctl down` removes the context

    def to_doc(self, *, redact: bool = False) -> dict:
        doc: dict = {"name": self.name}
        for key, attr in FIELDS.items():
            value = getattr(self, attr)
            if value:
                doc[key] = REDACTED if (redact and attr == "token") else value
        return doc

    def problems(self) -> list[tuple[str, str]]:
        """(field, message) for each inconsistency."""
        out = []
        if self.token and self.token_file:
            out.append(("token", "token and token-file are exclusive (give one)"))
        if bool(self.cert) != bool(self.key):
            out.append(("cert" if not self.cert else "key", "cert and key go together"))
        return out


@dataclass
class MeshConfig:
    """The config file's contents; `path` is where it is (or will be) written."""

    path: Path
    contexts: dict[str, Context] = field(default_factory=dict)
    current: str = ""
    legacy: Path | None = None          # the context.json this was migrated from, removed on save

    def get(self, name: str, source: str = "") -> Context:
        try:
            return self.contexts[name]
        except KeyError:
            raise UnknownContextError(name, list(self.contexts), self.path, source) from None

    def to_doc(self, *, redact: bool = False, only: str | None = None) -> dict:
        names = [only] if only else list(self.contexts)
        return {"apiVersion": API_VERSION, "kind": KIND, "current-context": self.current,
                "contexts": [self.contexts[n].to_doc(redact=redact) for n in names]}


def parse(doc: object, path: Path) -> MeshConfig:
    """Validate a loaded YAML document; errors name the file and the field."""
    cfg = MeshConfig(path=path)
    if doc is None:
        return cfg
    if not isinstance(doc, dict):
        raise ConfigFileError(path, "", f"must be a mapping with {', '.join(TOP_KEYS)}")
    for key in doc:
        if key not in TOP_KEYS:
            raise ConfigFileError(path, str(key), f"unknown field (allowed: {', '.join(TOP_KEYS)})")
    if doc.get("apiVersion", API_VERSION) != API_VERSION:
        raise ConfigFileError(path, "apiVersion", f"{doc['apiVersion']!r} is not supported (allowed: {API_VERSION})")
    if doc.get("kind", KIND) != KIND:
        raise ConfigFileError(path, "kind", f"{doc['kind']!r} is not supported (allowed: {KIND})")
    current = doc.get("current-context") or ""
    if not isinstance(current, str):
        raise ConfigFileError(path, "current-context", "must be a context name (a string)")
    entries = doc.get("contexts") or []
    if not isinstance(entries, list):
        raise ConfigFileError(path, "contexts", "must be a list of contexts (- name: ..., endpoint: ...)")
    for i, entry in enumerate(entries):
        ctx = _parse_context(entry, f"contexts[{i}]", path)
        if ctx.name in cfg.contexts:
            raise ConfigFileError(path, f"contexts[{i}].name", f"{ctx.name!r} appears twice")
        cfg.contexts[ctx.name] = ctx
    cfg.current = current
    return cfg


def _parse_context(entry: object, where: str, path: Path) -> Context:
    if not isinstance(entry, dict):
        raise ConfigFileError(path, where, "must be a mapping with name, endpoint, ...")
    for key in entry:
        if key != "name" and key not in FIELDS:
            raise ConfigFileError(path, f"{where}.{key}",
                                  f"unknown field (allowed: name, {', '.join(FIELDS)})")
    name = entry.get("name")
    try:
        check_name(name)
    except ValueError as exc:
        raise ConfigFileError(path, f"{where}.name", str(exc)) from None
    values = {}
    for key, attr in FIELDS.items():
        value = entry.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            shown = "" if key == "token" else f" {value!r}"          # a token is never echoed
            raise ConfigFileError(path, f"{where}.{key}", f"must be a string (got {type(value).__name__}{shown})")
        values[attr] = value
    ctx = Context(name=name, **values)
    for fld, message in ctx.problems():
        raise ConfigFileError(path, f"{where}.{fld}", message)
    return ctx


def load(path: Path | None = None) -> MeshConfig:
    """The config file at `path` (default `config_path()`); an empty config if there is none. Without
    `$MESHCONFIG`, a legacy context.json in the config dir is read when config.yaml does not exist."""
    path = path or config_path()
    try:
        text = path.read_text()
    except FileNotFoundError:
        if os.environ.get(ENV_CONFIG):
            return MeshConfig(path=path)
        return _from_legacy(path)
    except OSError as exc:
        raise ConfigFileError(path, "", f"cannot read it: {exc}") from exc
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # the problem and where, never str(exc): PyYAML quotes the offending line, which may hold a token
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigFileError(path, "", f"not valid YAML{where}: {problem}") from None
    return parse(doc, path)


def _from_legacy(path: Path) -> MeshConfig:
    legacy = config_dir() / LEGACY_FILE
    try:
        data = json.loads(legacy.read_text())
    except FileNotFoundError:
        return MeshConfig(path=path)
    except (OSError, ValueError) as exc:
        raise ConfigFileError(legacy, "", f"cannot read the context file: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigFileError(legacy, "", "the context file is not a JSON object")
    name = LEGACY_LOCAL if data.get("state_dir") else LEGACY_DEFAULT
    values = {attr: str(data[k]) for k, attr in
              (("endpoint", "endpoint"), ("ca", "ca"), ("cert", "cert"), ("key", "key"), ("token", "token"),
               ("state_dir", "state_dir")) if data.get(k)}
    return MeshConfig(path=path, contexts={name: Context(name=name, **values)}, current=name, legacy=legacy)


def save(cfg: MeshConfig) -> Path:
    """Write `cfg` atomically with mode 0600 (a symlinked file is written where it points)."""
    target = Path(os.path.realpath(cfg.path))
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    text = yaml.safe_dump(cfg.to_doc(), sort_keys=False, default_flow_style=False)
    replace_private(target, text, fsync=True)
    if cfg.legacy is not None:
        try:
            cfg.legacy.unlink()
        except FileNotFoundError:
            pass
        cfg.legacy = None
    return cfg.path


@contextmanager
def editing(path: Path | None = None) -> Iterator[MeshConfig]:
    """Load, let the caller change, and save the config under an exclusive lock (a hidden lock file
    beside it), so two meshctl processes do not lose each other's changes. Nothing is written when
    the body raises or changes nothing."""
    path = path or config_path()
    target = Path(os.path.realpath(path))
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock_fd = os.open(target.parent / f".{target.name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        cfg = load(path)
        before = _snapshot(cfg)
        yield cfg
        if _snapshot(cfg) != before:
            save(cfg)
    finally:
        os.close(lock_fd)


def _snapshot(cfg: MeshConfig) -> tuple:
    return cfg.current, tuple(dataclasses.astuple(c) for c in cfg.contexts.values())


__all__ = ["Context", "MeshConfig", "ConfigFileError", "UnknownContextError", "NoEndpointError", "load", "save",
           "editing", "parse", "config_dir", "config_path", "check_name", "REDACTED", "ENV_CONFIG", "ENV_CONFIG_DIR"]
