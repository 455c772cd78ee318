"""Arrivals from an Azure LLM inference trace (Patel et al., "Splitwise", ISCA '24).

The format is a CSV with a header `TIMESTAMP,ContextTokens,GeneratedTokens`; timestamps look like
`2023-11-16 18:17:03.9799600` (seven fractional digits) and are sorted. Each row becomes an `Arrival`:
seconds after the first row, divided by `rate_scale` (2.0 sends twice as many requests per second),
(after skipping `start_s` seconds of the trace, to replay another window of it) with the token counts
capped to the model's context: the generated tokens to `max_output` (and to
half the context), the context tokens to what is left of the context after them. Rows arriving after
`duration` seconds (after scaling) are cut.
"""

from __future__ import annotations

import csv
import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from mesh.errors import InvalidArgument

COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


@dataclass(frozen=True)
class Arrival:
    """One request of the replay: when it leaves (seconds from the start) and its token counts."""

    index: int
    at_s: float
    context_tokens: int
    generated_tokens: int


def parse_timestamp(text: str) -> dt.datetime:
    """`YYYY-MM-DD HH:MM:SS[.fffffff]`: Python takes at most six fractional digits, the trace has seven."""
    head, _, frac = text.strip().partition(".")
    try:
        base = dt.datetime.strptime(head, "%Y-%m-%d %H:%M:%S")
    except ValueError:
        raise InvalidArgument.of("TIMESTAMP", f"{text!r} is not a timestamp", "YYYY-MM-DD HH:MM:SS.fffffff") from None
    if frac and not frac.isdigit():
        raise InvalidArgument.of("TIMESTAMP", f"{text!r} has a bad fraction", "digits after the dot")
    return base + dt.timedelta(microseconds=round(float(f"0.{frac or 0}") * 1e6))


def cap_tokens(context: int, generated: int, max_context: int, max_output: int | None = None) -> tuple[int, int]:
    """Token counts that fit a model of `max_context` tokens: generated capped to `max_output` and to half the
    context, at least 1; context tokens to what is left (at least 1)."""
    if max_context < 4:
        raise InvalidArgument.of("max_context", f"{max_context} is too small", ">= 4 tokens")
    out = max(1, min(generated, max_context // 2, max_output or generated))
    ctx = max(1, min(context, max_context - out))
    return ctx, out


def read_rows(lines: Iterable[str], source: str = "trace") -> list[tuple[dt.datetime, int, int]]:
    reader = csv.DictReader(lines)
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise InvalidArgument.of(f"{source}: header", f"missing column(s) {', '.join(missing)}",
                                 ",".join(COLUMNS))
    rows = []
    for n, row in enumerate(reader, start=2):
        try:
            ctx, gen = int(row["ContextTokens"]), int(row["GeneratedTokens"])
        except (TypeError, ValueError):
            raise InvalidArgument.of(f"{source}: line {n}", "token counts are not integers",
                                     "ContextTokens and GeneratedTokens >= 0") from None
        if ctx < 0 or gen < 0:
            raise InvalidArgument.of(f"{source}: line {n}", "negative token count", ">= 0")
        rows.append((parse_timestamp(row["TIMESTAMP"] or ""), ctx, gen))
    return rows


def arrivals(rows: list[tuple[dt.datetime, int, int]], *, max_context: int, rate_scale: float = 1.0,
             duration: float | None = None, max_output: int | None = None, limit: int | None = None,
             start_s: float = 0.0) -> list[Arrival]:
    """The replay's requests: offsets from the first row (after skipping `start_s` seconds of the trace)
    divided by `rate_scale`, cut at `duration` s."""
    if rate_scale <= 0:
        raise InvalidArgument.of("rate_scale", f"{rate_scale} is not positive", "> 0")
    if duration is not None and duration <= 0:
        raise InvalidArgument.of("duration", f"{duration} is not positive", "> 0 seconds")
    if start_s < 0:
        raise InvalidArgument.of("start_s", f"{start_s} is negative", ">= 0 seconds")
    if not rows:
        return []
    first = min(r[0] for r in rows) + dt.timedelta(seconds=start_s)
    rows = [r for r in rows if r[0] >= first]
    if not rows:
        return []
    t0 = min(r[0] for r in rows)
    out: list[Arrival] = []
    for when, ctx, gen in sorted(rows, key=lambda r: r[0]):
        at = (when - t0).total_seconds() / rate_scale
        if duration is not None and at > duration:
            break
        if limit is not None and len(out) >= limit:
            break
        c, g = cap_tokens(ctx, gen, max_context, max_output)
        out.append(Arrival(len(out), at, c, g))
    return out


def read_trace(path: str | Path, **kwargs) -> list[Arrival]:
    """Read an Azure LLM trace file and return its arrivals (keywords as `arrivals`)."""
    p = Path(path)
    try:
        with p.open(newline="") as f:
            rows = read_rows(f, source=p.name)
    except OSError as e:
        raise InvalidArgument.of("trace", f"cannot read {p}: {e.strerror or e}", "an Azure LLM trace CSV") from None
    return arrivals(rows, **kwargs)
