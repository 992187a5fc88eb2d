"""Shared fixtures: the real LCO frames in ../shared and small synthetic fields.

Two guards on the evidence the suite gives, as hooks:

- with ``CI`` set true in the environment, a test that skips fails, with its skip reason
  (tests marked ``remote_data`` excepted): CI cannot go green on evidence it never saw;
- a test during which any manifest (``manifest.ecsv``, ``solve.ecsv``) records a frame
  reason beginning "unexpected error" (a bug, not a bad frame) fails at teardown, unless
  it is marked ``internal_error`` (it provokes one on purpose). `write_manifest` reports
  such reasons to the file named by ``$DASKSTACK_INTERNAL_ERRORS_FILE``, which this
  conftest sets: runs in subprocesses (the CLI) are caught as well.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from daskstack._rundir import INTERNAL_ERRORS_ENV

ROOT = Path(__file__).resolve().parents[1]
LCO_DIR = ROOT.parent / "shared" / "data" / "lco-pds110"


@pytest.fixture(scope="session")
def lco_dir() -> Path:
    """The twelve real LCO frames of PDS 110 and their reference catalog (never copied)."""
    if not (LCO_DIR / "refcat-pds110.ecsv").exists():
        pytest.skip(f"real LCO frames not found at {LCO_DIR} (12 LCO frames of PDS 110 "
                    "from the public repository hposborn/pds110: see README.md, Test data)")
    return LCO_DIR


@pytest.fixture(scope="session")
def lco_frames(lco_dir) -> list[Path]:
    return sorted(lco_dir.glob("*.fits.fz"))


@pytest.fixture(scope="session")
def dask_client():
    """One LocalCluster (2 worker processes) shared by the pipeline tests."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                           dashboard_address=":0", silence_logs=40)
    client = Client(cluster)
    yield client
    client.close()
    cluster.close()


@pytest.fixture(scope="session")
def sim_field(tmp_path_factory):
    """Six small synthetic LCO-like frames in two filters, with known truth."""
    from daskstack.simulate import simulate_field

    return simulate_field(tmp_path_factory.mktemp("sim") / "inputs", n_frames=6,
                          shape=(768, 768), filters=("rp", "gp"), seed=11)


@pytest.fixture(scope="session")
def sim_run(sim_field, dask_client, tmp_path_factory):
    """The whole pipeline run once on `sim_field` (default settings)."""
    from daskstack._pipeline import run

    out = tmp_path_factory.mktemp("sim-run")
    return run([str(p) for p in sim_field.frames], str(sim_field.catalog), out,
               client=dask_client)


# --------------------------------------------------------------------------------------
# Guards: no skip under CI; no internal error in any run a test makes
# --------------------------------------------------------------------------------------
def ci_forbids_skips() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes", "on")


def pytest_configure(config):
    if not os.environ.get(INTERNAL_ERRORS_ENV):
        fd, path = tempfile.mkstemp(prefix="daskstack-internal-errors-", suffix=".log")
        os.close(fd)
        os.environ[INTERNAL_ERRORS_ENV] = path
        config.add_cleanup(lambda: (os.unlink(path), os.environ.pop(INTERNAL_ERRORS_ENV)))


_internal_errors_read: dict[str, int] = {}  # errors file -> bytes already attributed


def _new_internal_errors() -> str:
    """What `write_manifest` reported since the last call (one test at a time)."""
    path = os.environ.get(INTERNAL_ERRORS_ENV)
    if not path or not os.path.exists(path):
        return ""
    with open(path) as handle:
        handle.seek(_internal_errors_read.get(path, 0))
        text = handle.read()
        _internal_errors_read[path] = handle.tell()
    return text


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    return longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if (report.skipped and not hasattr(report, "wasxfail") and ci_forbids_skips()
            and item.get_closest_marker("remote_data") is None):
        report.outcome = "failed"
        report.longrepr = (f"CI=true: a skipped test fails (its evidence is missing): "
                           f"{_skip_reason(report)}")
    if report.when == "teardown":
        # setup (session fixtures too), call and teardown of this test are over
        bugs = _new_internal_errors()
        if bugs and item.get_closest_marker("internal_error") is None and report.passed:
            report.outcome = "failed"
            report.longrepr = ("a run made by this test hit an internal error (a bug, "
                               f"not a bad frame; see its errors.log):\n{bugs}")
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield
    if (report.skipped and ci_forbids_skips()
            and collector.get_closest_marker("remote_data") is None):
        report.outcome = "failed"
        report.longrepr = (f"CI=true: a skipped module fails (its evidence is missing): "
                           f"{_skip_reason(report)}")
    return report
