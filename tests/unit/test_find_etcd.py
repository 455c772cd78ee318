"""Which etcd binary runs (controlplane/state/etcdserver.find_etcd): never 3.5.0-3.5.2 when another is there
(etcd-io/etcd#13766: a member killed under load may come back without committed writes)."""

from __future__ import annotations

import logging
import os
import sys

import pytest

from controlplane.state import etcdserver


def _fake(dir_, version: str):
    dir_.mkdir(parents=True, exist_ok=True)
    p = dir_ / "etcd"
    p.write_text(f"#!/bin/sh\necho 'etcd Version: {version}'\necho 'Git SHA: x'\n")
    p.chmod(0o755)
    return str(p)


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    venv, path1, path2 = tmp_path / "venv" / "bin", tmp_path / "p1", tmp_path / "p2"
    venv.mkdir(parents=True)
    monkeypatch.setattr(sys, "executable", str(venv / "python"))
    monkeypatch.setenv("PATH", os.pathsep.join([str(path1), str(path2)]))
    monkeypatch.delenv(etcdserver.ETCD_ENV, raising=False)
    monkeypatch.setattr(etcdserver, "_versions", {})
    monkeypatch.setattr(etcdserver, "_warned", set())
    monkeypatch.setattr(etcdserver, "_candidates", lambda real=etcdserver._candidates: [
        p for p in real() if p.startswith(str(tmp_path))])          # not the host's own /usr/bin/etcd
    return venv, path1, path2


def test_an_affected_etcd_is_passed_over_for_one_further_on(dirs):
    venv, path1, path2 = dirs
    _fake(venv, "3.5.1")
    _fake(path1, "3.5.2")
    good = _fake(path2, "3.4.23")
    assert etcdserver.find_etcd() == good
    assert etcdserver.etcd_version(good) == (3, 4, 23)


def test_the_venvs_etcd_comes_first_when_it_is_fine(dirs):
    venv, path1, _ = dirs
    first = _fake(venv, "3.5.16")
    _fake(path1, "3.4.23")
    assert etcdserver.find_etcd() == first


def test_only_affected_ones_run_with_a_warning_that_says_what_to_install(dirs, caplog):
    venv, _, _ = dirs
    only = _fake(venv, "3.5.1")
    caplog.set_level(logging.WARNING)
    assert etcdserver.find_etcd() == only
    assert etcdserver.find_etcd() == only
    warnings = [r for r in caplog.records if "etcd-io/etcd#13766" in r.getMessage()]
    assert len(warnings) == 1 and "apt install etcd-server" in warnings[0].getMessage()


def test_the_environment_names_the_binary(dirs, monkeypatch, tmp_path):
    venv, _, _ = dirs
    _fake(venv, "3.4.23")
    named = _fake(tmp_path / "mine", "3.5.1")
    monkeypatch.setenv(etcdserver.ETCD_ENV, named)
    assert etcdserver.find_etcd() == named
    monkeypatch.setenv(etcdserver.ETCD_ENV, str(tmp_path / "missing"))
    with pytest.raises(etcdserver.EtcdError, match="GPUMESH_ETCD=.*not an executable file"):
        etcdserver.find_etcd()


def test_none_at_all_says_how_to_get_one(dirs):
    with pytest.raises(etcdserver.EtcdError, match="apt install etcd-server"):
        etcdserver.find_etcd()


def test_the_affected_versions_are_told_apart_from_the_fixed_ones():
    assert etcdserver.unsafe_version("3.5.1") and etcdserver.unsafe_version((3, 5, 2))
    assert not etcdserver.unsafe_version("3.5.3") and not etcdserver.unsafe_version("3.4.23")
    assert not etcdserver.unsafe_version("") and not etcdserver.unsafe_version(None)


def test_the_store_reads_each_members_version(tmp_path):
    import asyncio

    from controlplane.state.store import EtcdStore
    server = etcdserver.EtcdServer(tmp_path / "etcd", fast=True).start()
    try:
        real = etcdserver.etcd_version(etcdserver.find_etcd())

        async def go():
            store = EtcdStore([server.endpoint, "http://127.0.0.1:9"])     # the second: nothing listens
            try:
                return await store.member_versions()
            finally:
                await store.close()
        got = asyncio.run(go())
        assert got == {server.endpoint: ".".join(map(str, real)), "http://127.0.0.1:9": ""}
    finally:
        server.stop()
