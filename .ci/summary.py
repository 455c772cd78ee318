"""CI's closing line, from pytest's JUnit XML reports: what passed, failed and skipped in each step,
and how many transparent-migration (CRIU) tests skipped, so a skip for want of CRIU cannot hide.

    python .ci/summary.py tests=.ci-junit.xml chaos=.ci-junit-chaos.xml
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

CRIU_SKIP = "no working CRIU"   # tests/criu_gate.py's SKIP_PREFIX (kept free of imports: runs before anything)


def tally(path: str | Path) -> Counter:
    """passed/failed/errors/skipped test cases of one report, and `criu_skipped`."""
    c: Counter = Counter()
    for case in ET.parse(path).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        if "failure" in kinds:
            c["failed"] += 1
        elif "error" in kinds:
            c["errors"] += 1
        elif "skipped" in kinds:
            c["skipped"] += 1
            msg = " ".join((el.get("message") or "") + (el.text or "") for el in case.iter("skipped"))
            if CRIU_SKIP in msg:
                c["criu_skipped"] += 1
        else:
            c["passed"] += 1
    return c


def closing_line(reports: list[tuple[str, str]]) -> str:
    parts, criu = [], 0
    for label, path in reports:
        if not Path(path).exists():
            parts.append(f"{label}: no report")
            continue
        c = tally(path)
        criu += c["criu_skipped"]
        parts.append(f"{label}: {c['passed']} passed, {c['failed']} failed, {c['errors']} errors, "
                     f"{c['skipped']} skipped")
    line = "CI: " + "; ".join(parts)
    if criu:
        line += f"; {criu} TRANSPARENT-MIGRATION (CRIU) TESTS SKIPPED"
    return line


def main(argv: list[str]) -> int:
    reports = []
    for arg in argv:
        label, sep, path = arg.partition("=")
        if not sep:
            print(f"usage: {sys.argv[0]} LABEL=JUNIT.xml ...", file=sys.stderr)
            return 2
        reports.append((label, path))
    print(closing_line(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
