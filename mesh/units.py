"""Byte sizes as people write them: "10GiB", "512MiB", "40G", "1.5TiB", "123".

Binary IEC suffixes (Ki, Mi, Gi, Ti, Pi, optionally followed by "B") are
powers of 1024; decimal SI suffixes (k, M, G, T, P, optionally followed by
"B") are powers of 1000; a bare number or a "B" suffix is bytes. Suffixes are
case-insensitive and may be separated from the number by spaces.
"""

from __future__ import annotations

import re
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation

ALLOWED_FORMS = (
    "a non-negative number of bytes, optionally with a suffix: "
    "B, KiB, MiB, GiB, TiB, PiB (powers of 1024) or kB, MB, GB, TB, PB / k, M, G, T, P "
    "(powers of 1000), e.g. 10GiB, 512MiB, 40G, 1.5TiB, 123"
)

_PREFIX_POWER = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}
_SIZE_RE = re.compile(r"^\s*(?P<num>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[a-z]*)\s*$", re.IGNORECASE)
_BINARY_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def _multiplier(unit: str) -> int | None:
    u = unit.lower()
    if u in ("", "b"):
        return 1
    if u.endswith("b"):
        u = u[:-1]
    if u.endswith("i"):
        prefix, base = u[:-1], 1024
    else:
        prefix, base = u, 1000
    if prefix not in _PREFIX_POWER or prefix == "":
        return None
    return base ** _PREFIX_POWER[prefix]


def parse_size(text: str | int) -> int:
    """The number of bytes `text` stands for. Fractions round to the nearest byte.

    Raises ValueError naming the allowed forms for negative or unreadable sizes.
    """
    if isinstance(text, bool):
        raise ValueError(f"invalid size {text!r}: expected {ALLOWED_FORMS}")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"invalid size {text}: must not be negative; expected {ALLOWED_FORMS}")
        return text
    if not isinstance(text, str):
        raise ValueError(f"invalid size {text!r}: expected {ALLOWED_FORMS}")
    if text.strip().startswith("-"):
        raise ValueError(f"invalid size {text!r}: must not be negative; expected {ALLOWED_FORMS}")
    m = _SIZE_RE.match(text)
    mult = _multiplier(m.group("unit")) if m else None
    if m is None or mult is None:
        raise ValueError(f"invalid size {text!r}: expected {ALLOWED_FORMS}")
    try:
        value = Decimal(m.group("num")) * mult
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only digits
        raise ValueError(f"invalid size {text!r}: expected {ALLOWED_FORMS}") from exc
    return int(value.quantize(Decimal(1), rounding=ROUND_HALF_EVEN))


def format_size(n: int | float) -> str:
    """A short binary form of `n` bytes: 10737418240 -> "10GiB", 10200547328 -> "9.5GiB".

    One decimal at most, trailing ".0" dropped; below 1KiB the bytes are printed ("123B").
    """
    n = int(n)
    if n < 0:
        return "-" + format_size(-n)
    value = float(n)
    unit = 0
    while unit < len(_BINARY_UNITS) - 1 and value >= 1024:
        value /= 1024
        unit += 1
    if unit == 0:
        return f"{n}B"
    text = f"{value:.1f}"
    if float(text) >= 1024 and unit < len(_BINARY_UNITS) - 1:
        value /= 1024
        unit += 1
        text = f"{value:.1f}"
    if text.endswith(".0"):
        text = text[:-2]
    return text + _BINARY_UNITS[unit]


__all__ = ["parse_size", "format_size", "ALLOWED_FORMS"]
