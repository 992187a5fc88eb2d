"""The suite's own guards (tests/conftest.py), each run by pytest on a tiny test file:
under CI=true a skip fails (remote_data excepted); a manifest saying "unexpected error"
fails the test that made it (unless marked internal_error)."""

from __future__ import annotations

import pytest

from daskstack._rundir import INTERNAL_ERRORS_ENV

# the guards of tests/conftest.py, and nothing else of it, in the inner test directory
CONFTEST = """
from tests.conftest import pytest_make_collect_report, pytest_runtest_makereport  # noqa
"""
INI = """
[pytest]
markers =
    remote_data: needs the real internet
    internal_error: provokes an internal error on purpose
"""

SKIPS = """
import pytest

def test_passes():
    assert True

def test_skips_at_run():
    pytest.skip("no frobnicator on this machine")

@pytest.fixture
def missing_tool():
    pytest.skip("the tool is absent")

def test_skips_in_fixture(missing_tool):
    pass

@pytest.mark.skipif(True, reason="condition says no")
def test_skipif():
    pass

@pytest.mark.remote_data
def test_remote_skips():
    pytest.skip("no internet")

@pytest.mark.xfail(reason="known")
def test_expected_failure():
    assert False
"""

MODULE_SKIP = """
import pytest
pytest.importorskip("a_module_that_is_not_installed")

def test_never_collected():
    pass
"""


@pytest.fixture
def inner(pytester, monkeypatch, tmp_path):
    pytester.makeconftest(CONFTEST)
    pytester.makeini(INI)
    # the inner runs report internal errors to a file of their own, not to the suite's
    monkeypatch.setenv(INTERNAL_ERRORS_ENV, str(tmp_path / "internal-errors.log"))
    return pytester


@pytest.mark.parametrize("ci", ["true", "1"])
def test_ci_turns_every_skip_into_a_failure_but_remote_data(inner, monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    inner.makepyfile(test_skips=SKIPS)
    result = inner.runpytest("-rA")
    # a skip in the test fails it; a skip in setup (fixture, skipif) is a setup error
    result.assert_outcomes(passed=1, failed=1, errors=2, skipped=1, xfailed=1)
    result.stdout.fnmatch_lines([
        "*CI=true: a skipped test fails*no frobnicator on this machine*",
        "*CI=true: a skipped test fails*the tool is absent*",
        "*CI=true: a skipped test fails*condition says no*",
    ])
    result.stdout.fnmatch_lines(["SKIPPED*no internet*"])  # remote_data: may skip
    assert result.ret != 0


def test_ci_fails_a_module_that_skips_whole(inner, monkeypatch):
    monkeypatch.setenv("CI", "true")
    inner.makepyfile(test_module_skip=MODULE_SKIP)
    result = inner.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["*CI=true: a skipped module fails*a_module_that_is_not_installed*"])
    assert result.ret != 0


def test_without_ci_skips_are_skips(inner, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    inner.makepyfile(test_skips=SKIPS, test_module_skip=MODULE_SKIP)
    result = inner.runpytest()
    result.assert_outcomes(passed=1, skipped=5, xfailed=1)
    assert result.ret == 0


INTERNAL_ERRORS = """
import pytest
from daskstack._rundir import FrameRecord, write_manifest

def _manifest(path, reason):
    record = FrameRecord(file="a.fits", name="a", refusal=reason)
    write_manifest([record], path)

def test_bad_frame_is_fine(tmp_path):
    _manifest(tmp_path / "manifest.ecsv", "no stars detected")

def test_bug_in_a_run(tmp_path):
    _manifest(tmp_path / "solve.ecsv", "unexpected error while solving: KeyError: 'x'")

def test_next_test_is_not_blamed(tmp_path):
    _manifest(tmp_path / "manifest.ecsv", "too few matches")

@pytest.mark.internal_error
def test_provoked_on_purpose(tmp_path):
    _manifest(tmp_path / "manifest.ecsv", "unexpected error while registering: ValueError")

@pytest.fixture(scope="module")
def buggy_run(tmp_path_factory):
    _manifest(tmp_path_factory.mktemp("m") / "manifest.ecsv", "unexpected error while x")

def test_bug_in_a_shared_fixture(buggy_run):
    pass
"""


def test_a_manifest_saying_unexpected_error_fails_its_test(inner, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    inner.makepyfile(test_internal=INTERNAL_ERRORS)
    result = inner.runpytest("-rA")
    # the test and the fixture user fail at teardown; the others pass
    result.assert_outcomes(passed=5, errors=2)
    result.stdout.fnmatch_lines([
        "ERROR*test_bug_in_a_run*",
        "ERROR*test_bug_in_a_shared_fixture*",
    ])
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_bug_in_a_run*",
                                 "*hit an internal error*",
                                 "*solve.ecsv: a: unexpected error while solving: KeyError*"])
    for name in ("test_bad_frame_is_fine", "test_next_test_is_not_blamed",
                 "test_provoked_on_purpose"):
        result.stdout.no_fnmatch_line(f"ERROR*{name}*")
