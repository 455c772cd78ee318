"""CI cannot go green without the transparent-migration tests: `.ci/criu` fails when CRIU does not build
or work (unless GPUMESH_CI_ALLOW_NO_CRIU=1, loudly), GPUMESH_REQUIRE_CRIU=1 turns a CRIU test's skip into
a failure, and the closing line counts CRIU skips. The whole suite is not run: the script's logic is
checked with stand-in build commands and one real CRIU test."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import criu_gate

ROOT = Path(__file__).resolve().parents[2]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUMESH_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "proto"), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def _criu_step(**extra) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / ".ci" / "criu"), sys.executable], capture_output=True, text=True,
                          env=_env(**extra), timeout=300)


@pytest.mark.parametrize("script", [".ci/run", ".ci/criu", "tools/build_criu.sh"])
def test_ci_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(ROOT / script)]).returncode == 0


def test_ci_run_uses_the_criu_step_and_counts_at_the_end():
    text = (ROOT / ".ci" / "run").read_text()
    assert '.ci/criu .venv/bin/python)" || exit 1' in text        # a failed step stops CI
    assert "export GPUMESH_REQUIRE_CRIU=1" in text
    assert "|| echo" not in text.split(".ci/criu", 1)[1].split("\n", 1)[0]   # not swallowed
    assert ".ci/summary.py" in text and "--junitxml=.ci-junit.xml" in text


def test_a_failed_criu_build_fails_ci():
    r = _criu_step(GPUMESH_CI_CRIU_BUILD="false")
    assert r.returncode == 1
    assert "CI FAILS: CRIU 4.x did not build" in r.stderr and r.stdout == ""


def test_a_machine_that_cannot_build_it_goes_on_only_when_allowed_and_loudly():
    r = _criu_step(GPUMESH_CI_CRIU_BUILD="false", GPUMESH_CI_ALLOW_NO_CRIU="1")
    assert r.returncode == 0
    assert r.stdout.startswith("missing: CRIU 4.x did not build")
    assert "!!! NO CRIU" in r.stderr


def test_a_built_criu_that_does_not_work_fails_ci(tmp_path):
    fake = tmp_path / "criu"
    fake.write_text("#!/bin/sh\necho 'Version: 4.1.1'\n[ \"$1\" = check ] && { echo 'no kernel support' >&2; exit 1; }\n")
    fake.chmod(0o755)
    r = _criu_step(GPUMESH_CI_CRIU_BUILD="true", PATH=f"{tmp_path}:/usr/bin:/bin")
    assert r.returncode == 1
    assert "criu check" in r.stderr and "no kernel support" in r.stderr


@pytest.mark.skipif(bool(criu_gate.why_not()), reason=f"{criu_gate.SKIP_PREFIX}: {criu_gate.why_not()}")
def test_a_working_criu_makes_the_transparent_tests_required():
    r = _criu_step(GPUMESH_CI_CRIU_BUILD="true")
    assert r.returncode == 0 and r.stdout.strip() == "required"


def _one_criu_test(**extra) -> subprocess.CompletedProcess:
    """The real CRIU round trip with CRIU hidden from PATH (the gate sees no working CRIU)."""
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(ROOT / "tests/unit/test_checkpoint_criu.py"), "-k", "round_trip"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env=_env(PATH="/usr/bin:/bin", **extra))


def test_without_criu_a_transparent_test_skips_with_the_reason_and_is_counted():
    r = _one_criu_test()
    assert r.returncode == 0, r.stdout[-2000:]
    assert "1 skipped" in r.stdout
    assert "1 transparent-migration (CRIU) test(s) SKIPPED: no working CRIU: criu is not installed" in r.stdout


def test_under_require_criu_a_transparent_test_fails_instead_of_skipping():
    r = _one_criu_test(GPUMESH_REQUIRE_CRIU="1")
    assert r.returncode == 1, r.stdout[-2000:]
    assert "1 error" in r.stdout and "GPUMESH_REQUIRE_CRIU=1 but there is no working CRIU" in r.stdout


def test_gate_skips_or_fails(monkeypatch):
    # CI itself runs with GPUMESH_REQUIRE_CRIU=1: set and restore it through monkeypatch, never leave it changed
    monkeypatch.delenv(criu_gate.REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="no working CRIU: gone"):
        criu_gate.check("gone")
    monkeypatch.setenv(criu_gate.REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="GPUMESH_REQUIRE_CRIU=1"):
        criu_gate.check("gone")
    criu_gate.check("")   # works: nothing to do


def _summary():
    spec = importlib.util.spec_from_file_location("ci_summary", ROOT / ".ci" / "summary.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="5">
<testcase classname="a" name="ok"/>
<testcase classname="a" name="bad"><failure message="boom"/></testcase>
<testcase classname="a" name="setup"><error message="fixture"/></testcase>
<testcase classname="t" name="tp"><skipped type="pytest.skip" message="no working CRIU: criu is not installed"/></testcase>
<testcase classname="v" name="verbs"><skipped type="pytest.skip" message="no RDMA device"/></testcase>
</testsuite></testsuites>"""


def test_closing_line_counts_criu_skips(tmp_path):
    (tmp_path / "t.xml").write_text(JUNIT)
    line = _summary().closing_line([("tests", str(tmp_path / "t.xml")), ("chaos", str(tmp_path / "none.xml"))])
    assert line == ("CI: tests: 1 passed, 1 failed, 1 errors, 2 skipped; chaos: no report; "
                    "1 TRANSPARENT-MIGRATION (CRIU) TESTS SKIPPED")


def test_ci_runs_the_readmes_test_command():
    """The README's first code block holds its two commands, install-and-run then the tests; the test command is what
    .ci/run runs, with the JUnit report added (and the Quick start repeats both)."""
    import re
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", readme, re.S)
    install, command = blocks[0].strip().split("\n")
    assert "pip install" in install and install.endswith("meshctl up --demo")
    assert command.startswith(".venv/bin/python -m pytest")
    assert [b.strip() for b in blocks[1:3]] == [install, command]
    assert f"{command} --junitxml=.ci-junit.xml\n" in (ROOT / ".ci" / "run").read_text()
