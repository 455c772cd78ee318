"""The workloads' egress guard without an agent: parsing the endpoints and the nftables script
(nodeagent/isolation/egress.py; tests/integration/test_isolation.py runs it against real nftables)."""

from __future__ import annotations

import pytest

from mesh.config import ConfigError
from nodeagent.isolation import egress


def test_endpoints_parse_with_local_addresses_networks_and_port_ranges():
    got = egress.parse(" local:2379, 10.1.2.3:9100 ,10.0.0.0/8:9100-9200,[::1]:2380,")
    assert [(e.address, e.ports, e.family) for e in got] == [
        ("local", (2379, 2379), "local"), ("10.1.2.3/32", (9100, 9100), "ip"),
        ("10.0.0.0/8", (9100, 9200), "ip"), ("::1/128", (2380, 2380), "ip6")]
    assert egress.parse("") == []


@pytest.mark.parametrize("text, words", [
    ("2379", "is not HOST:PORT"),
    ("local:", "'' is not a port"),
    ("local:0", "within 1..65535"),
    ("local:9-3", "FIRST <= LAST"),
    ("example.com:80", "'example.com' is not local, an address or a CIDR network"),
])
def test_bad_endpoints_are_refused_naming_the_option(text, words):
    with pytest.raises(ConfigError, match="workload_egress_deny") as e:
        egress.parse(text)
    assert words in str(e.value)


def test_the_script_replaces_the_table_at_once_and_matches_only_tenant_uids():
    script = egress.ruleset("gpumesh_egress_t", [(200000, 265535), (1234, 1234), (1234, 1234)],
                            egress.parse("local:2379,10.0.0.0/8:9100"))
    lines = script.splitlines()
    assert lines[:2] == ["table inet gpumesh_egress_t", "delete table inet gpumesh_egress_t"]
    rules = [ln.strip() for ln in lines if "reject" in ln]
    assert rules == [
        "meta skuid { 1234, 200000-265535 } ct state new meta l4proto { tcp, udp } fib daddr type local "
        "th dport 2379 counter reject",
        "meta skuid { 1234, 200000-265535 } ct state new meta l4proto { tcp, udp } ip daddr 10.0.0.0/8 "
        "th dport 9100 counter reject"]
    assert egress.table_name("/var/lib/a") != egress.table_name("/var/lib/b")
    assert egress.table_name("/var/lib/a") == egress.table_name("/var/lib/a/")


def test_the_agent_config_checks_the_option():
    from nodeagent.config import AgentConfig
    cfg = AgentConfig(gpu_backend="sim", sim_host_file=["x.yaml"], insecure=True, workload_egress_deny="local:x")
    with pytest.raises(ConfigError, match="workload_egress_deny"):
        cfg.check()


def test_the_agents_metrics_port_is_denied_even_when_the_kernel_picked_it():
    import urllib.request

    from nodeagent.config import AgentConfig
    from nodeagent.isolation.setup import denied_endpoints
    from nodeagent.main import start_metrics
    cfg = AgentConfig(gpu_backend="sim", sim_host_file=["x.yaml"], insecure=True, metrics_listen="127.0.0.1:0")
    start_metrics(cfg)
    port = int(cfg.metrics_listen.rpartition(":")[2])
    assert port > 0
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
    got = [(e.address, e.ports) for e in denied_endpoints(cfg)]
    assert got == [("local", (2379, 2379)), ("local", (2380, 2380)), ("local", (port, port))]
    cfg.workload_egress_deny = ""                # the guard off: nothing denied, the metrics port neither
    assert denied_endpoints(cfg) == []


def test_the_table_names_its_state_directory_when_nftables_can_keep_it(tmp_path):
    script = egress.ruleset("gpumesh_egress_t", [(200000, 265535)], egress.parse("local:2379"), str(tmp_path))
    mnt = egress.mount_namespace()
    assert mnt.isdigit()
    assert f'  comment "gpumesh-agent mnt={mnt} {tmp_path.resolve()}";' in script.splitlines()
    assert "comment" not in egress.ruleset("gpumesh_egress_t", [(200000, 265535)], egress.parse("local:2379"))
    assert egress.comment("/x/" + "d" * 200) == ""          # over nftables' 128 bytes: no comment
    assert egress.comment('/tmp/a"b') == "" and egress.comment("/tmp/é") == ""
    listed = ('table inet gpumesh_egress_t {\n\tcomment "gpumesh-agent mnt=4026531841 /var/lib/gpumesh/agent 1"\n'
              "\tchain output {\n\t}\n}\n")
    assert egress.owner(listed) == ("4026531841", "/var/lib/gpumesh/agent 1")
    assert egress.owner("table inet gpumesh_egress_t {\n\tchain output {\n\t}\n}\n") is None


def test_an_nft_without_table_comments_still_gets_the_guard(tmp_path, monkeypatch):
    """Table comments came with nftables 0.9.7 (Ubuntu 20.04 ships 0.9.3): there the commented script is a syntax
    error, and the guard, which installed before the comment was added, was not installed at all (the node ran
    its workloads unguarded). It is installed without the comment (never swept, as a guard made before the
    comment), and applied again (nftkeeper.py) the same way."""
    applied = []

    def old_nft(script: str) -> None:
        if "comment" in script:
            raise OSError('nft: /dev/stdin:4:3-9: Error: syntax error, unexpected comment\n  comment "gpumesh-agent')
        applied.append(script)
    monkeypatch.setattr(egress, "_nft", old_nft)
    monkeypatch.setattr(egress, "_comments", None, raising=False)
    eps, uids = egress.parse("local:2379"), [(200000, 265535)]
    table = egress.install(str(tmp_path), uids, eps)
    assert applied == [egress.ruleset(table, uids, eps)]                  # the guard, without the comment
    assert egress.ruleset(table, uids, eps, str(tmp_path)) == applied[0]   # what the keeper applies again

    def broken(script: str) -> None:
        raise OSError("nft: Error: Could not process rule: Operation not permitted")
    monkeypatch.setattr(egress, "_nft", broken)                           # a failure of another kind: as ever
    monkeypatch.setattr(egress, "_comments", None, raising=False)
    with pytest.raises(OSError, match="Operation not permitted"):
        egress.install(str(tmp_path), uids, eps)
