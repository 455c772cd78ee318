"""The workload manager as a MigrationManager sees it, for tests that run migrations without one: its records
(`workloads`, `revisions`), the hooks it offers (`extra_desired`, `run_guards`), and no Run being written
(`new_on`: WorkloadRecords.new_on)."""

from __future__ import annotations

import types


def workloads_standin(workloads: dict | None = None, revisions: dict | None = None) -> types.SimpleNamespace:
    return types.SimpleNamespace(extra_desired=[], run_guards=[], workloads=workloads if workloads is not None else {},
                                 stopping=set(), waiters={}, revisions=revisions if revisions is not None else {},
                                 new_on=lambda slice_id: ([], []))
