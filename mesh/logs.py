"""Structured logging for the daemons: one JSON object per line (or plain text).

Extra fields go in `extra={"fields": {...}}` or through `log(logger, level, msg, **fields)`.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import sys


class JsonFormatter(logging.Formatter):
    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "component": self.component,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self, component: str) -> None:
        super().__init__("%(asctime)s %(levelname)-5s " + component + " %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return line


def setup(component: str, level: str = "info", fmt: str = "json") -> None:
    """Route the root logger to stderr in `fmt` ("json" or "text")."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(component) if fmt == "json" else TextFormatter(component))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("grpc", "asyncio", "aetcd"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def log(logger: logging.Logger, level: int, msg: str, **fields) -> None:
    """Log `msg` with structured `fields`."""
    if logger.isEnabledFor(level):
        logger.log(level, msg, extra={"fields": fields})
