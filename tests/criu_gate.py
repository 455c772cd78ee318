"""Whether the transparent-migration (CRIU) tests run on this host, and what a missing CRIU means.

Tests that need a working CRIU 4.x carry `needs_criu` (a marker, checked by tests/conftest.py when each
test is set up). Without a working CRIU they skip with the reason (`SKIP_PREFIX: ...`), so a developer's
machine without it still runs the rest; with `GPUMESH_REQUIRE_CRIU=1` (CI sets it) they FAIL instead,
naming what is missing, so CI cannot go green without them. The session's summary counts those skips.
"""

from __future__ import annotations

import functools
import os

import pytest

REQUIRE_ENV = "GPUMESH_REQUIRE_CRIU"
SKIP_PREFIX = "no working CRIU"
MARKER = "needs_criu"

needs_criu = pytest.mark.needs_criu


@functools.cache
def why_not() -> str:
    """Empty when CRIU works here (criu >= 4 on PATH, `criu check` passing), else why not."""
    from mesh.checkpoint.criu import Criu
    info = Criu().detect()
    return "" if info.usable else info.problem


def required() -> bool:
    return os.environ.get(REQUIRE_ENV, "") == "1"


def check(why: str | None = None) -> None:
    """At the setup of a `needs_criu` test: nothing when CRIU works; else fail (required) or skip."""
    why = why_not() if why is None else why
    if not why:
        return
    if required():
        pytest.fail(f"{REQUIRE_ENV}=1 but there is {SKIP_PREFIX} on this host: {why} "
                    f"(build it with tools/build_criu.sh)", pytrace=False)
    pytest.skip(f"{SKIP_PREFIX}: {why}")
