"""aiohttp logs each request it cannot parse (a header line over 8 KiB, a broken request line, a bad method) at
ERROR with its traceback, from its `aiohttp.server` logger, and answers 400 itself. The request is the client's
fault and the answer is right; the traceback told the operator nothing and let anyone who reaches the port fill
the log. `quiet()` turns those records into one WARNING line: the peer (as aiohttp names it) and what was wrong,
on one line, cut to 200 characters. Every other error of that logger is left as it is."""

from __future__ import annotations

import logging

from aiohttp import http_exceptions

LOGGER = "aiohttp.server"
MAX_CHARS = 200


class BadRequestLine(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, http_exceptions.HttpProcessingError) and 400 <= (exc.code or 400) < 500:
            what = " ".join(f"{exc.code} {exc.message}".split())[:MAX_CHARS]
            record.msg, record.args = "%s: bad request answered %s", (record.getMessage(), what)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info, record.exc_text = None, None
        return True


def quiet() -> None:
    """Install the filter on aiohttp's server logger, once per process."""
    log = logging.getLogger(LOGGER)
    if not any(isinstance(f, BadRequestLine) for f in log.filters):
        log.addFilter(BadRequestLine())
