"""The IDs the control plane sends that the agent builds paths from: a workload's record, pid, log and
own directory (`<runner dir>/<id>.<ext>`), its cgroup (`<node>/<id>`, whose processes are SIGKILLed on
removal), its slice's /dev/shm directory, a migration's CRIU images (`<id>.criu-<migration id>`).

The control plane makes them (`w-<hex>`, `s-<hex>`, `m-<hex>`, a same-node migration's alias
`<workload>~<migration>`), but the agent runs as root and never trusts a name to stay inside its own
directories: an ID such as `../../system.slice/sshd.service` is refused where it enters the agent
(the workload command, the migration command, the runner's start, the isolation plan)."""

from __future__ import annotations

import re

ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.~-]{0,127}")
ALLOWED = "1-128 letters, digits and '_.~-', starting with a letter or digit, without '..'"


class BadId(ValueError):
    """An ID the agent would build a path from is not one it accepts (the message names the field)."""


def check_id(value: str, field: str) -> str:
    """`value`, or BadId naming `field` and what is allowed."""
    if not ID_RE.fullmatch(value) or ".." in value:
        raise BadId(f"{field}: {value[:80]!r} is not a valid ID (allowed: {ALLOWED})")
    return value


def check_ids(*fields: tuple[str, str]) -> None:
    """Each (field, value) whose value is set (an empty one is left to the caller)."""
    for field, value in fields:
        if value:
            check_id(value, field)
