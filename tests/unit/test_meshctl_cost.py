"""`meshctl cost` names its own flag when the control plane refuses the window: `--since 1000d` was answered with
the RPC's field and seconds ("since_seconds: 86400000.0 is out of range (allowed: a number of seconds in (0,
3.456e+07])"), which the operator never typed."""

from __future__ import annotations

from types import SimpleNamespace

from mesh import errors
from tests.unit import _meshctl_fake as fake


class Mesh(SimpleNamespace):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def close(self):
        pass

    def get_cost(self, by="tenant", since_seconds=0.0):
        raise errors.InvalidArgument.of("since_seconds", f"{since_seconds!r} is out of range",
                                        "a number of seconds in (0, 3.456e+07] (400 days: cost_retention_days)")


def test_a_window_longer_than_the_ledger_keeps_names_since(monkeypatch, capsys):
    fake.install(monkeypatch, Mesh())
    rc, out, err = fake.run(capsys, "cost", "--since", "1000d")
    assert rc == 1 and not out
    line = err.strip()
    assert "\n" not in line and line.startswith("error: --since: 1000d is more than") and "400 days" in line
    assert "since_seconds" not in line


class Crowded(Mesh):
    def get_cost(self, by="tenant", since_seconds=0.0):
        raise errors.InvalidArgument.of("since_seconds", f"over {since_seconds:g} s there are more than 50,000 {by} "
                                        f"lines: more than one answer holds",
                                        "a shorter window or a coarser `by` (at most 50,000 lines)")


def test_more_lines_than_one_answer_names_since_and_by_not_the_retention(monkeypatch, capsys):
    """It said "--since: 7d is more than the control plane keeps costs for", which was not the reason."""
    fake.install(monkeypatch, Crowded())
    rc, out, err = fake.run(capsys, "cost", "--by", "slice", "--since", "7d")
    assert rc == 1 and not out
    line = err.strip()
    assert line.startswith("error: --since 7d --by slice: more lines than one answer holds")
    assert "a shorter window or a coarser --by (at most 50,000 lines)" in line and "keeps costs" not in line
