"""InfiniBand (and RoCE) ports as the kernel shows them under /sys/class/infiniband.

For every device ``<root>/<dev>`` and port ``<root>/<dev>/ports/<n>``: ``state``
("4: ACTIVE"), ``rate`` ("400 Gb/sec (4X NDR)"), ``link_layer`` ("InfiniBand"
or "Ethernet"), and the port GUID: the low 64 bits of ``gids/0`` on an
InfiniBand port, else the device's ``node_guid`` ("0c42:a103:00a1:b2c3").
A missing root means no ports; an unreadable file leaves its field empty.

``write_sysfs`` lays out the same tree for the NICs of a simulated host, so
simulated agents read their ports through this same code.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable

from gpumesh.v1 import types_pb2

logger = logging.getLogger(__name__)
DEFAULT_ROOT = "/sys/class/infiniband"
_RATE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*Gb/sec")
_SPEEDS = {100: "EDR", 200: "HDR", 400: "NDR", 800: "XDR"}


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""


def _guid_hex(text: str) -> str:
    """'0c42:a103:00a1:b2c3' (or the last four groups of a GID) -> '0x0c42a10300a1b2c3'; '' if unreadable."""
    groups = text.strip().split(":")
    if len(groups) < 4:
        return ""
    digits = "".join(g.rjust(4, "0") for g in groups[-4:]).lower()
    if not re.fullmatch(r"[0-9a-f]{16}", digits) or int(digits, 16) == 0:
        return ""
    return "0x" + digits


def _port_number(name: str) -> int | None:
    return int(name) if name.isdigit() else None


def read_ports(root: str = DEFAULT_ROOT) -> list[types_pb2.IbPort]:
    """Every port of every device under ``root``, sorted by device and port."""
    try:
        devices = sorted(os.listdir(root))
    except OSError:
        return []
    out = []
    for dev in devices:
        base = os.path.join(root, dev)
        try:
            ports = sorted((n for n in (_port_number(p) for p in os.listdir(os.path.join(base, "ports")))
                            if n is not None))
        except OSError:
            continue
        node_guid = _guid_hex(_read(os.path.join(base, "node_guid")))
        for n in ports:
            pdir = os.path.join(base, "ports", str(n))
            state = _read(os.path.join(pdir, "state"))
            state = state.split(":", 1)[1].strip() if ":" in state else state
            m = _RATE.match(_read(os.path.join(pdir, "rate")))
            link = _read(os.path.join(pdir, "link_layer"))
            guid = _guid_hex(_read(os.path.join(pdir, "gids", "0"))) if link == "InfiniBand" else ""
            out.append(types_pb2.IbPort(device=dev, port=n, state=state, rate_gbps=float(m.group(1)) if m else 0.0,
                                        port_guid=guid or node_guid, link_layer=link))
    return out


def write_sysfs(root: str, nics: Iterable, down: Iterable[str] = ()) -> None:
    """Lay out ``root`` as /sys/class/infiniband for the InfiniBand NICs of a host file
    (``hostfile.NicSpec``: name, kind, rate_gbps, port_guid), one port each; ports of NICs
    named in ``down`` are DOWN. Other kinds of NIC are left out."""
    down = set(down)
    for nic in nics:
        if nic.kind != "infiniband":
            continue
        digits = nic.port_guid.lower().removeprefix("0x").rjust(16, "0")
        guid = ":".join(digits[i:i + 4] for i in range(0, 16, 4))
        pdir = os.path.join(root, nic.name, "ports", "1")
        os.makedirs(os.path.join(pdir, "gids"), exist_ok=True)
        files = {
            os.path.join(root, nic.name, "node_guid"): guid,
            os.path.join(pdir, "state"): "1: DOWN" if nic.name in down else "4: ACTIVE",
            os.path.join(pdir, "phys_state"): "3: Disabled" if nic.name in down else "5: LinkUp",
            os.path.join(pdir, "rate"): f"{nic.rate_gbps} Gb/sec (4X {_SPEEDS.get(nic.rate_gbps, 'HDR')})",
            os.path.join(pdir, "link_layer"): "InfiniBand",
            os.path.join(pdir, "gids", "0"): "fe80:0000:0000:0000:" + guid,
        }
        for path, text in files.items():
            with open(path, "w", encoding="ascii") as f:
                f.write(text + "\n")
