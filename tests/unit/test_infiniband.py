"""InfiniBand ports from a /sys/class/infiniband tree (nodeagent/infiniband.py)."""

from __future__ import annotations

from pathlib import Path

from nodeagent.hostfile import NicSpec, load_host_file
from nodeagent.infiniband import read_ports, write_sysfs

HOSTS = Path(__file__).resolve().parents[2] / "tools" / "hosts"
H100X8, MIXED = HOSTS / "h100x8.yaml", HOSTS / "mixed.yaml"


def put(root, rel, text):
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text + "\n")


def test_absent_root_means_no_ports(tmp_path):
    assert read_ports(str(tmp_path / "nope")) == []
    assert read_ports(str(tmp_path)) == []


def test_real_sysfs_shapes(tmp_path):
    put(tmp_path, "mlx5_0/node_guid", "0c42:a103:00a1:b2c2")
    put(tmp_path, "mlx5_0/ports/1/state", "4: ACTIVE")
    put(tmp_path, "mlx5_0/ports/1/rate", "400 Gb/sec (4X NDR)")
    put(tmp_path, "mlx5_0/ports/1/link_layer", "InfiniBand")
    put(tmp_path, "mlx5_0/ports/1/gids/0", "fe80:0000:0000:0000:0c42:a103:00a1:b2c3")
    # a RoCE port: Ethernet link layer, its GID comes from the MAC, so the node GUID stands in
    put(tmp_path, "mlx5_1/node_guid", "b83f:d203:0012:3456")
    put(tmp_path, "mlx5_1/ports/1/state", "1: DOWN")
    put(tmp_path, "mlx5_1/ports/1/rate", "2.5 Gb/sec (1X SDR)")
    put(tmp_path, "mlx5_1/ports/1/link_layer", "Ethernet")
    put(tmp_path, "mlx5_1/ports/1/gids/0", "fe80:0000:0000:0000:ba3f:d2ff:fe12:3456")
    # a device whose port files cannot be read, and a stray entry
    (tmp_path / "mlx5_2" / "ports" / "1").mkdir(parents=True)
    (tmp_path / "mlx5_2" / "ports" / "lost+found").mkdir()
    (tmp_path / "not_a_device").write_text("x")
    ports = read_ports(str(tmp_path))
    got = [(p.device, p.port, p.state, p.rate_gbps, p.port_guid, p.link_layer) for p in ports]
    assert got == [
        ("mlx5_0", 1, "ACTIVE", 400.0, "0x0c42a10300a1b2c3", "InfiniBand"),
        ("mlx5_1", 1, "DOWN", 2.5, "0xb83fd20300123456", "Ethernet"),
        ("mlx5_2", 1, "", 0.0, "", ""),
    ]


def test_simulated_hosts_lay_out_their_infiniband_nics(tmp_path):
    host = load_host_file(H100X8)
    write_sysfs(str(tmp_path), host.nics, down=["mlx5_3"])
    ports = read_ports(str(tmp_path))
    assert [(p.device, p.state, p.rate_gbps, p.link_layer) for p in ports] == [
        ("mlx5_0", "ACTIVE", 400.0, "InfiniBand"), ("mlx5_1", "ACTIVE", 400.0, "InfiniBand"),
        ("mlx5_2", "ACTIVE", 400.0, "InfiniBand"), ("mlx5_3", "DOWN", 400.0, "InfiniBand")]
    assert [p.port_guid for p in ports] == [n.port_guid for n in host.nics]
    write_sysfs(str(tmp_path / "mixed"), load_host_file(MIXED).nics)  # Ethernet only: nothing
    assert read_ports(str(tmp_path / "mixed")) == []
    write_sysfs(str(tmp_path / "short"), [NicSpec("ib9", "infiniband", 200, "0xabc", ())])
    assert read_ports(str(tmp_path / "short"))[0].port_guid == "0x0000000000000abc"
