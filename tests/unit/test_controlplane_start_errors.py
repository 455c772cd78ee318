"""A control plane that cannot reach its etcd at start says so in one line naming the endpoints and the
settings to check, and exits with status 1, not a Python traceback (operator walk, session 15: an etcd run
with --client-cert-auth, as README's secure setup runs it, and a control plane without etcd_cert died with
aetcd's ConnectionFailedError "Unwrap failed (TSI_DATA_CORRUPTED)" and 30 lines of traceback)."""

from __future__ import annotations

import socket

from controlplane import main as cpmain
from mesh import tls


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(tmp_path, *extra: str) -> list[str]:
    return ["--insecure", "--state-dir", str(tmp_path / "cp"), "--listen", "127.0.0.1:0", "--metrics-listen", "",
            "--no-history-enabled", "--log-format", "text", *extra]


def test_unreachable_tls_etcd_without_client_certificate_is_one_clear_line(tmp_path, capsys):
    tls.write_ca(tmp_path / "pki")
    url = f"https://127.0.0.1:{_closed_port()}"
    rc = cpmain.main(_start(tmp_path, "--etcd-endpoints", url, "--etcd-ca", str(tmp_path / "pki" / "ca.crt")))
    err = capsys.readouterr().err
    assert rc == 1
    assert "Traceback" not in err
    line = next(x for x in err.splitlines() if x.startswith("mesh-controlplane: "))
    assert f"cannot reach etcd at {url}" in line
    assert "etcd_cert and etcd_key" in line          # etcd with --client-cert-auth refuses a client without one
    assert "etcd_ca" in line


def test_unreachable_plain_etcd_names_the_endpoint(tmp_path, capsys):
    url = f"http://127.0.0.1:{_closed_port()}"
    rc = cpmain.main(_start(tmp_path, "--etcd-endpoints", url))
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    line = next(x for x in err.splitlines() if x.startswith("mesh-controlplane: "))
    assert f"cannot reach etcd at {url}" in line and "etcd_cert" not in line
