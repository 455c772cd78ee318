"""A tenant's allocated ids (nodeagent/isolation/users.py): the gid is the uid, so an id the host's group
database gives to a group (sudo, shadow, disk, docker...) is as taken as one its user database gives to an
account: the workload would run with that group as its primary group and read what the group may read."""

from __future__ import annotations

import grp
import pwd

import pytest

from nodeagent.isolation.users import TenantUsers


def _group_without_account():
    """A group id of this host that no account has as its uid, followed by an id free of both."""
    accounts = {p.pw_uid for p in pwd.getpwall()}
    groups = {g.gr_gid for g in grp.getgrall()}
    for gid in sorted(groups - accounts - {0}):
        if gid + 1 not in groups and gid + 1 not in accounts:
            return gid
    return None


@pytest.mark.skipif(_group_without_account() is None, reason="no group id on this host without an account")
def test_an_id_a_group_holds_is_never_allocated(tmp_path):
    gid = _group_without_account()
    for tenant in ("ta", "tb", "tc", "td"):     # whichever the hash starts at, the group's id is skipped
        users = TenantUsers((gid, gid + 1), {}, str(tmp_path / f"{tenant}.json"), agent_uid=gid + 5,
                            agent_gid=gid + 5)
        ident = users.identity(tenant)
        assert ident.gid == gid + 1, f"tenant {tenant} got the id of group {grp.getgrgid(gid).gr_name}"
