"""Local clusters' agent networks (tools/localnets.py): two clusters on one host never give two agents the same
/24, a network a device uses is skipped, an agent keeps its network across restarts, a cluster's stop frees it."""

import ipaddress

import pytest

from tools.localnets import BLOCKS, BridgeNets


def nets(tmp_path, name, used=()):
    state = tmp_path / name
    state.mkdir(exist_ok=True)
    (state / "bridge-nets").mkdir(exist_ok=True)
    return BridgeNets(state, claims_dir=tmp_path / "claims",
                      in_use=lambda: [ipaddress.ip_network(u) for u in used])


def test_two_clusters_on_one_host_get_distinct_networks(tmp_path):
    a, b = nets(tmp_path, "a"), nets(tmp_path, "b")
    got = [a.cidr(f"agent-{i}", a.state_dir / "bridge-nets" / f"agent-{i}") for i in range(3)]
    got += [b.cidr(f"agent-{i}", b.state_dir / "bridge-nets" / f"agent-{i}") for i in range(3)]
    assert len(set(got)) == 6
    for g in got:
        n = ipaddress.ip_network(g)
        assert n.prefixlen == 24 and n.subnet_of(ipaddress.ip_network("10.213.0.0/16"))


def test_a_network_a_device_uses_is_skipped(tmp_path):
    probe = nets(tmp_path, "a")
    first = probe.cidr("agent-0", tmp_path / "probe-kept")
    probe.release()
    a = nets(tmp_path, "a", used=[first])
    got = a.cidr("agent-0", a.state_dir / "bridge-nets" / "agent-0")
    assert got != first
    wide = nets(tmp_path, "w", used=["10.213.0.0/16"])       # a route over all of them
    with pytest.raises(RuntimeError, match="workload-bridge-cidr"):
        wide.cidr("agent-0", wide.state_dir / "bridge-nets" / "agent-0")


def test_an_agent_keeps_its_network_and_a_stop_frees_it(tmp_path):
    a = nets(tmp_path, "a")
    kept = a.state_dir / "bridge-nets" / "agent-0"
    first = a.cidr("agent-0", kept)
    # its own bridge now uses it: a restart still gets it
    again = nets(tmp_path, "a", used=[first]).cidr("agent-0", kept)
    assert again == first
    b = nets(tmp_path, "b")
    taken = {b.cidr(f"x{i}", b.state_dir / "bridge-nets" / f"x{i}") for i in range(BLOCKS - 1)}
    assert first not in taken                                # claimed by a, which still exists
    with pytest.raises(RuntimeError):
        b.cidr("one-more", b.state_dir / "bridge-nets" / "one-more")
    a.release()                                              # a's cluster stopped: its bridges are gone
    assert b.cidr("one-more", b.state_dir / "bridge-nets" / "one-more") == first
    # a starts again: its kept network is b's now, so it gets another (none left here)
    with pytest.raises(RuntimeError):
        a.cidr("agent-0", kept)


def test_a_claim_whose_cluster_is_gone_is_taken_over(tmp_path):
    import shutil
    a = nets(tmp_path, "a")
    first = a.cidr("agent-0", a.state_dir / "bridge-nets" / "agent-0")
    shutil.rmtree(a.state_dir)                               # removed without a stop
    b = nets(tmp_path, "b")
    taken = {b.cidr(f"x{i}", b.state_dir / "bridge-nets" / f"x{i}") for i in range(BLOCKS)}
    assert first in taken and len(taken) == BLOCKS


def test_claims_in_a_directory_of_another_user_or_open_to_others_are_not_trusted(tmp_path):
    """A claims directory writable by others (or not this user's) is ignored: its files could name any
    directory (blocking every block) or be a FIFO (blocking the start); the devices' check alone decides."""
    import os
    claims = tmp_path / "claims"
    claims.mkdir(mode=0o777)
    os.chmod(claims, 0o777)
    for i in range(BLOCKS):
        (claims / str(i)).write_text(f"/\tx{i}\n")            # "held" by a cluster whose directory is /
    a = nets(tmp_path, "a")
    assert a.cidr("agent-0", a.state_dir / "bridge-nets" / "agent-0")
    os.chmod(claims, 0o700)
    os.mkfifo(claims / "fifo-claim")
    (claims / "0").unlink()
    os.mkfifo(claims / "0")                                    # a FIFO where a claim should be: not a claim
    b = nets(tmp_path, "b")
    b._start = 0
    got = b.cidr("agent-0", b.state_dir / "bridge-nets" / "agent-0")
    assert got == "10.213.0.0/24"
