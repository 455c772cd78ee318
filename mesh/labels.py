"""What a label map may hold, the same for every object that carries one (slices and their anti-affinity rules,
workloads, deployments, models, pools' node selectors).

A key is 1-63 letters, digits, '.', '_', '-' or '/', starting and ending with a letter or digit (Kubernetes'
rule, so labels copy between the two); a value is at most 256 printable characters. Printable matters: labels
reach `meshctl`'s tables, the events, the structured logs and Prometheus label values, where a newline or an
escape sequence would forge a line or repaint an operator's terminal.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from mesh import errors

KEY_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?$")
KEY_RULE = "1-63 letters, digits, '.', '_', '-' or '/', starting and ending with a letter or digit"
MAX_VALUE = 256
VALUE_RULE = f"at most {MAX_VALUE} printable characters (no control characters)"


def check(labels: Mapping[str, str], field: str, most: int, what: str = "labels") -> None:
    """InvalidArgument naming `field[key]` for the first key or value outside the rules, or `field` when there
    are more than `most` entries."""
    if len(labels) > most:
        raise errors.InvalidArgument.of(field, f"has {len(labels)} {what}", f"at most {most}")
    for k, v in labels.items():
        if not KEY_RE.match(k):
            raise errors.InvalidArgument.of(f"{field}[{errors.shown(k)}]", "is not a valid label key", KEY_RULE)
        if len(v) > MAX_VALUE or not v.isprintable():
            raise errors.InvalidArgument.of(f"{field}[{errors.shown(k)}]",
                                            f"value {errors.shown(v)} is not a valid label value", VALUE_RULE)


def parse_pairs(items, field: str, most: int) -> dict[str, str]:
    """`KEY=VALUE` strings (flags, environment, a config list) into a label map checked as above; ValueError-free:
    InvalidArgument naming `field` for a pair without '=' or a key given twice."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise errors.InvalidArgument.of(field, f"{errors.shown(item)} is not KEY=VALUE", KEY_RULE)
        if key in out:
            raise errors.InvalidArgument.of(f"{field}[{errors.shown(key)}]", "is given twice", "each key once")
        out[key] = value
    check(out, field, most)
    return out
