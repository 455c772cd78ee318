"""Daemon configuration: typed dataclasses filled from defaults, a YAML file,
environment variables and flags (in that order, later wins), validated at start.

Each config field carries its documentation and its checks in `field(metadata=...)`
through `option(...)`, so `--help`, the config reference and the validation
come from one place.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import typing
from typing import Any

import yaml


class ConfigError(ValueError):
    """The configuration is invalid; the message names the setting and the source."""


def option(default: Any, help: str, *, choices: tuple | None = None, minimum: float | None = None,
           maximum: float | None = None, flag: str | None = None, repeated: bool = False) -> Any:
    meta = {"help": help, "choices": choices, "min": minimum, "max": maximum, "flag": flag,
            "repeated": repeated}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _kind(cls, f: dataclasses.Field):
    hints = typing.get_type_hints(cls)
    t = hints[f.name]
    origin = typing.get_origin(t)
    if origin is list:
        return list
    if origin is typing.Union or str(origin) == "types.UnionType":
        args = [a for a in typing.get_args(t) if a is not type(None)]
        return args[0]
    return t


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """Add one flag per config field (defaults are None so that unset flags don't override)."""
    parser.add_argument("--config", metavar="FILE", help="YAML config file (keys as in the reference)")
    for f in dataclasses.fields(cls):
        kind = _kind(cls, f)
        help_text = f.metadata.get("help", "")
        env = f"(env {cls.ENV_PREFIX}{f.name.upper()})"
        if kind is bool:
            parser.add_argument(_flag(f), dest=f.name, action=argparse.BooleanOptionalAction,
                                default=None, help=f"{help_text} {env}")
        elif kind is list:
            parser.add_argument(_flag(f), dest=f.name, action="append", default=None,
                                help=f"{help_text} (repeatable; env: comma-separated) {env}")
        else:
            parser.add_argument(_flag(f), dest=f.name, default=None, metavar=f.name.upper(),
                                help=f"{help_text} [default: {f.default!r}] {env}")


def _coerce(cls, f: dataclasses.Field, value: Any, source: str) -> Any:
    kind = _kind(cls, f)
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if kind is list:
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list):
                raise ValueError("expected a list")
            # flags may repeat and each may hold a comma-separated list
            return [part.strip() for v in value for part in str(v).split(",") if part.strip()]
        if kind is int:
            if isinstance(value, bool):
                raise ValueError("expected an integer")
            return int(value)
        if kind is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{f.name} (from {source}): {value!r} is not valid: {e}") from None


def load(cls, args: argparse.Namespace | None = None, environ: dict | None = None):
    """Build and validate a `cls` config from file, environment and parsed flags."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    path = getattr(args, "config", None) if args is not None else None
    path = path or environ.get(f"{cls.ENV_PREFIX}CONFIG")
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                data = yaml.safe_load(fh) or {}
        except OSError as e:
            raise ConfigError(f"config file {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: expected a mapping of settings")
        for key, value in data.items():
            name = str(key).replace("-", "_")
            if name not in fields:
                raise ConfigError(f"config file {path}: unknown setting {key!r} "
                                  f"(known: {', '.join(sorted(fields))})")
            values[name] = _coerce(cls, fields[name], value, path)
    for name, f in fields.items():
        env = f"{cls.ENV_PREFIX}{name.upper()}"
        if env in environ:
            values[name] = _coerce(cls, f, environ[env], f"${env}")
    if args is not None:
        for name, f in fields.items():
            value = getattr(args, name, None)
            if value is not None:
                values[name] = _coerce(cls, f, value, _flag(f))
    cfg = cls(**values)
    validate(cfg)
    return cfg


def validate(cfg) -> None:
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        choices, lo, hi = f.metadata.get("choices"), f.metadata.get("min"), f.metadata.get("max")
        if choices and value not in choices:
            raise ConfigError(f"{f.name}: {value!r} is not allowed (allowed: {', '.join(map(str, choices))})")
        if isinstance(value, float) and not math.isfinite(value):     # NaN passes every comparison below
            raise ConfigError(f"{f.name}: {value} is not allowed: a finite number is needed")
        if lo is not None and value < lo:
            raise ConfigError(f"{f.name}: {value} is below the minimum {lo}")
        if hi is not None and value > hi:
            raise ConfigError(f"{f.name}: {value} is above the maximum {hi}")
    check = getattr(cfg, "check", None)
    if check:
        check()


def reference(cls) -> str:
    """A Markdown table of every setting: name, flag, env, default, meaning."""
    rows = ["| setting | flag | environment | default | meaning |", "| --- | --- | --- | --- | --- |"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flags = f"`{_flag(f)}`"
        if _kind(cls, f) is bool:       # argparse.BooleanOptionalAction: --X turns it on, --no-X off
            flags += f" / `--no-{_flag(f)[2:]}`"
        rows.append(f"| `{f.name}` | {flags} | `{cls.ENV_PREFIX}{f.name.upper()}` | "
                    f"`{default!r}` | {f.metadata.get('help', '')} |")
    return "\n".join(rows)


def parse_hostport(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not (0 <= int(port) <= 65535):
        raise ConfigError(f"{what}: {value!r} is not HOST:PORT (port 0-65535)")
    return host.strip("[]") or "0.0.0.0", int(port)


def read_token_file(path: str, given: str, field: str, token_field: str, what: str) -> str:
    """The first line of `path` (the `field` option: a file holding the `token_field` option's secret, kept off the
    command line, where any local user reads it, and out of the config file); ConfigError naming the field when
    both are given, or when the file cannot be read or is empty."""
    if given:
        raise ConfigError(f"{token_field}, {field}: give one, not both")
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{field}: cannot read {path}: {e}") from None
    if not first:
        raise ConfigError(f"{field}: {path} is empty (its first line is {what})")
    return first
