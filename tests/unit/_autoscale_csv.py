"""A series file for the tests of `meshctl bench autoscale` (its reader, its CLI)."""

from __future__ import annotations


def write_csv(tmp_path, text: str) -> str:
    """`text` written to a CSV file under `tmp_path`; its path."""
    p = tmp_path / "s.csv"
    p.write_text(text)
    return str(p)
