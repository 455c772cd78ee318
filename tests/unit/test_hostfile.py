"""Host files of the simulated NVML (nodeagent/hostfile.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from nodeagent.hostfile import GpuSpec, HostSpec, NicSpec, dump_host, load_host_file, make_host, parse_host

HOSTS = Path(__file__).resolve().parents[2] / "tools" / "hosts"


def test_h100x8_example():
    spec = load_host_file(HOSTS / "h100x8.yaml")
    assert len(spec.gpus) == 8
    assert all(g.model == "H100-80GB" and g.mig_enabled for g in spec.gpus)
    assert [g.index for g in spec.gpus] == list(range(8))
    assert spec.nvlink_domains == (tuple(range(8)),)
    assert [n.kind for n in spec.nics] == ["infiniband"] * 4
    assert sorted(g for n in spec.nics for g in n.gpus) == list(range(8))
    assert all(n.port_guid.startswith("0x") and len(n.port_guid) == 18 for n in spec.nics)


def test_mixed_example():
    spec = load_host_file(HOSTS / "mixed.yaml")
    assert [(g.model, g.mig_enabled) for g in spec.gpus] == [
        ("A100-40GB", True), ("A100-40GB", True), ("L4", False), ("L4", False)]
    assert spec.nvlink_domains == ()
    assert not any(n.kind == "infiniband" for n in spec.nics)


@pytest.mark.parametrize("path", sorted(HOSTS.glob("*.yaml")), ids=lambda p: p.name)
def test_examples_round_trip(path):
    spec = load_host_file(path)
    assert parse_host(dump_host(spec), "dump") == spec
    assert parse_host(yaml.safe_load(yaml.safe_dump(dump_host(spec)))) == spec


def test_defaults_aliases_and_single_entries():
    spec = parse_host({"gpus": [{"model": "h100"}, {"index": 1, "model": "L4", "serial": "1324"},
                                {"model": "a100", "count": 2, "mig": False}]})
    assert spec == HostSpec(
        node=None,
        gpus=(GpuSpec(0, "H100-80GB", True, None), GpuSpec(1, "L4", False, "1324"),
              GpuSpec(2, "A100-40GB", False, None), GpuSpec(3, "A100-40GB", False, None)),
        nvlink_domains=(), nics=(), driver_version="550.54.15", cuda_version="12.4")


def test_explicit_port_guid_kept():
    spec = parse_host({"gpus": [{"model": "H100-80GB"}],
                       "nics": [{"name": "ib0", "kind": "infiniband", "rate_gbps": 400, "port_guid": "0xabc"}]})
    assert spec.nics == (NicSpec("ib0", "infiniband", 400, "0xabc", ()),)


@pytest.mark.parametrize("model,gpus,domains,nics", [
    ("H100-80GB", 8, ((0, 1, 2, 3, 4, 5, 6, 7),), 4),
    ("A100-40GB", 3, ((0, 1, 2),), 2),
    ("L4", 4, (), 0),
    ("T4", 1, (), 0),
])
def test_make_host(model, gpus, domains, nics):
    spec = make_host("node-7", gpus, model)
    assert spec.node == "node-7" and len(spec.gpus) == gpus
    assert spec.nvlink_domains == domains and len(spec.nics) == nics
    assert all(g.mig_enabled == (model not in ("L4", "T4")) for g in spec.gpus)
    assert parse_host(dump_host(spec)) == spec
    assert not any(g.mig_enabled for g in make_host("n", 2, model, mig=False).gpus)


BASE = {"gpus": [{"model": "H100-80GB", "count": 2}]}


@pytest.mark.parametrize("patch,field,words", [
    ({"gpu": []}, "gpu", ["unknown key", "allowed: node, driver_version, cuda_version, gpus, nvlink_domains, nics"]),
    ({"gpus": []}, "gpus", ["non-empty list"]),
    ({"gpus": [{"model": "H100"}, {"model": "B300"}]}, "gpus[1].model", ["'B300'", "allowed: A100-40GB, A100-80GB"]),
    ({"gpus": [{"count": 2}]}, "gpus[0].model", ["required"]),
    ({"gpus": [{"model": "L4", "mig": True}]}, "gpus[0].mig", ["not MIG-capable", "A100-40GB, A100-80GB, H100-80GB, H200-141GB"]),
    ({"gpus": [{"model": "L4", "mig": "yes"}]}, "gpus[0].mig", ["expected bool"]),
    ({"gpus": [{"model": "L4", "count": 0}]}, "gpus[0].count", [">= 1"]),
    ({"gpus": [{"model": "L4", "count": True}]}, "gpus[0].count", ["expected int"]),
    ({"gpus": [{"model": "L4", "count": 2, "serial": "x"}]}, "gpus[0].serial", ["one GPU"]),
    ({"gpus": [{"model": "L4", "count": 2, "index": 0}]}, "gpus[0]", ["not both"]),
    ({"gpus": [{"model": "L4", "colour": "red"}]}, "gpus[0].colour", ["allowed: index, model, count, mig, serial"]),
    ({"gpus": [{"model": "L4", "index": 1}]}, "gpus", ["0..0 without gaps"]),
    ({"gpus": [{"model": "L4"}, {"model": "L4", "index": 0}]}, "gpus[1]", ["given twice"]),
    ({"nvlink_domains": [[0, 2]]}, "nvlink_domains[0][1]", ["GPU index 0..1"]),
    ({"nvlink_domains": [[0], [0, 1]]}, "nvlink_domains[1]", ["already in nvlink_domains[0]"]),
    ({"nvlink_domains": [[0, 0]]}, "nvlink_domains[0]", ["repeat"]),
    ({"gpus": [{"model": "L4", "count": 2}], "nvlink_domains": [[0, 1]]}, "nvlink_domains[0]", ["no NVLink", "NVLink models"]),
    ({"nics": [{"name": "x", "kind": "roce", "rate_gbps": 100}]}, "nics[0].kind", ["allowed: infiniband, ethernet"]),
    ({"nics": [{"name": "x", "kind": "ethernet"}]}, "nics[0].rate_gbps", ["required"]),
    ({"nics": [{"name": "x", "kind": "ethernet", "rate_gbps": -1}]}, "nics[0].rate_gbps", ["positive"]),
    ({"nics": [{"name": "x", "kind": "ethernet", "rate_gbps": 1, "gpus": [5]}]}, "nics[0].gpus[0]", ["GPU index 0..1"]),
    ({"nics": [{"name": "x", "kind": "ethernet", "rate_gbps": 1}] * 2}, "nics[1].name", ["given twice"]),
    ({"nics": [{"name": "x", "kind": "ethernet", "rate_gbps": 1, "speed": 1}]}, "nics[0].speed",
     ["allowed: name, kind, rate_gbps, port_guid, gpus"]),
    ({"cuda_version": "twelve"}, "cuda_version", ["MAJOR.MINOR"]),
    ({"node": 5}, "node", ["expected str"]),
])
def test_validation_messages(patch, field, words):
    with pytest.raises(ValueError) as exc:
        parse_host({**BASE, **patch}, "hosts/bad.yaml")
    msg = str(exc.value)
    assert msg.startswith(f"hosts/bad.yaml: {field}: "), msg
    for w in words:
        assert w in msg, msg


def test_not_a_mapping():
    with pytest.raises(ValueError, match="<host>: .*expected a mapping"):
        parse_host(["gpus"])


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="cannot read host file"):
        load_host_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("gpus: [\n")
    with pytest.raises(ValueError, match=f"{bad}: not valid YAML"):
        load_host_file(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("gpus:\n  - {model: X1}\n")
    with pytest.raises(ValueError, match=rf"{wrong}: gpus\[0\]\.model: unknown GPU model 'X1'"):
        load_host_file(wrong)
