"""TLS for the model servers the agent starts (the agent's `backend_tls`, on by default).

Each time a replica's server starts, the agent makes it a fresh key and a self-signed certificate
(mesh/tls.py `self_signed`: EC P-256, `backend_host` in subjectAltName, valid SELF_SIGNED_DAYS: a restart
renews it), writes both into the workload's own directory (`<runner>/<id>.d`, mode 0700: with confinement
owned by the tenant's uid and seen by the workload as its /tmp), the key mode 0600 and owned by the server's
uid, and names the files in the server's environment:

- llama-cpp-python's server reads `SSL_KEYFILE` / `SSL_CERTFILE` (its ServerSettings' `ssl_keyfile` /
  `ssl_certfile`, pydantic settings read from the environment when not on the command line) and hands them
  to uvicorn;
- vLLM's server is started through nodeagent/backends/vllm.py's wrapper, which turns the same variables into
  `--ssl-keyfile` / `--ssl-certfile`.

The server then speaks HTTPS only. The certificate (public) is reported with the endpoint
(`Workload.endpoint_certificate`), reaches the replica's record and the gateway's serving view, and every
client verifies the server against exactly it (mesh/replicatls.py). The key never leaves the host: it is
neither in the workload's record nor on the command line.
"""

from __future__ import annotations

import os

from mesh.tls import self_signed

CERT_FILE, KEY_FILE = "server-tls.crt", "server-tls.key"
CERT_ENV, KEY_ENV = "SSL_CERTFILE", "SSL_KEYFILE"


def _write(path: str, data: bytes, mode: int, uid: int, gid: int) -> None:
    """Write `data` as a new file (never through a link left in the directory: the workload owns it), with
    `mode` and owner uid:gid set before it is renamed into place."""
    tmp = path + ".tmp"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        if uid >= 0 and (uid, gid) != (os.geteuid(), os.getegid()):
            os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def install(host: str, name: str, workdir: str, inside: str = "", uid: int = -1, gid: int = -1
            ) -> tuple[str, dict[str, str]]:
    """Make the server's key and certificate for `host` (an IP address or DNS name: the endpoint's host) in
    `workdir` (the host's path of the workload's own directory; made 0700 when missing), owned by uid:gid
    (-1: the agent's). `inside`: the same directory as the server sees it ('' = `workdir`).
    (certificate PEM, the server's environment naming the files)."""
    cert, key = self_signed((host.strip("[]"),), name)
    os.makedirs(workdir, mode=0o700, exist_ok=True)
    _write(os.path.join(workdir, KEY_FILE), key, 0o600, uid, gid)
    _write(os.path.join(workdir, CERT_FILE), cert, 0o644, uid, gid)
    seen = inside or workdir
    return cert.decode(), {KEY_ENV: os.path.join(seen, KEY_FILE), CERT_ENV: os.path.join(seen, CERT_FILE)}
