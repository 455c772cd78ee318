"""`meshctl certs issue --kind server`: a TLS server certificate from the fleet's CA for the other servers an
operator runs, the gateway (`serve_tls_cert`) first (operator walk, session 15: docs/gateway.md serves with
`gw.crt` and README's etcd with `etcd-1.crt`, and meshctl could issue neither: `--kind` took agent or client,
and `certs init` makes the control plane's alone)."""

from __future__ import annotations

import ipaddress

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from mesh import tls
from tools.meshctl import main as meshctl


def _meshctl(capsys, *argv) -> tuple[int, str]:
    rc = meshctl.main(list(argv))
    return rc, capsys.readouterr().err


def test_a_server_certificate_for_the_gateway(tmp_path, capsys):
    d = str(tmp_path / "pki")
    assert _meshctl(capsys, "certs", "init", "--dir", d)[0] == 0
    rc, err = _meshctl(capsys, "certs", "issue", "--dir", d, "--kind", "server", "--name", "gateway-1",
                       "--host", "gw1.example.internal", "--host", "10.0.0.9")
    assert rc == 0, err
    pem = (tmp_path / "pki" / "gateway-1.crt").read_bytes()
    cert = x509.load_pem_x509_certificate(pem)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["gw1.example.internal"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.9")]
    assert ExtendedKeyUsageOID.SERVER_AUTH in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert tls.subject_of(pem).kind == "server"       # never taken for an agent or a client by the control plane
    assert oct((tmp_path / "pki" / "gateway-1.key").stat().st_mode & 0o777) == "0o600"


def test_a_server_certificate_needs_a_host_and_only_it_takes_one(tmp_path, capsys):
    d = str(tmp_path / "pki")
    _meshctl(capsys, "certs", "init", "--dir", d)
    rc, err = _meshctl(capsys, "certs", "issue", "--dir", d, "--kind", "server", "--name", "gateway-1")
    assert rc == 1 and "--host" in err
    rc, err = _meshctl(capsys, "certs", "issue", "--dir", d, "--kind", "client", "--name", "ops", "--role", "admin",
                       "--host", "x.example")
    assert rc == 1 and "--host" in err


def test_a_certificate_named_ca_never_replaces_the_ca(tmp_path, capsys):
    """`certs issue --kind agent --name ca` (a host called ca) wrote its key over ca.key and its certificate over
    ca.crt: the CA was gone, and nothing it had signed could be verified or issued again."""
    d = tmp_path / "pki"
    _meshctl(capsys, "certs", "init", "--dir", str(d))
    before = (d / "ca.key").read_bytes(), (d / "ca.crt").read_bytes()
    for kind, extra in (("agent", ()), ("server", ("--host", "ca.example")), ("client", ("--role", "admin"))):
        rc, err = _meshctl(capsys, "certs", "issue", "--dir", str(d), "--kind", kind, "--name", "ca", *extra)
        assert rc == 1 and "ca.crt" in err, (kind, err)
    assert ((d / "ca.key").read_bytes(), (d / "ca.crt").read_bytes()) == before
