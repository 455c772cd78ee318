"""meshctl over a fake SDK client: the tests of its commands put a fake in place of MeshClient and run the CLI's
main in-process against a placeholder endpoint (the fake answers; nothing is dialled)."""

from __future__ import annotations

from tools.meshctl import main as meshctl


def install(monkeypatch, mesh):
    """Every `client(args)` of meshctl's commands yields `mesh`."""
    monkeypatch.setattr("mesh.client.MeshClient", lambda *a, **k: mesh)
    return mesh


def run(capsys, *argv) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `meshctl --endpoint 127.0.0.1:1 ARGV...`."""
    rc = meshctl.main(["--endpoint", "127.0.0.1:1", *argv])
    o = capsys.readouterr()
    return rc, o.out, o.err
