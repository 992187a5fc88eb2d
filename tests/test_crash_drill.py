"""Crash drill: `daskstack run` killed (SIGKILL, whole process group) at random moments.

After every kill, each file in the run directory must be complete and valid (FITS open
and read, tables parse, sha256 as recorded in outputs.ecsv -- only the one file renamed
into place just before the kill may be newer than its record); a final run must resume to
a coadd identical to that of an uninterrupted run, and leave no temporaries behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from daskstack.pipeline import EXIT_OK
from daskstack.rundir import OUTPUTS_FILE, TEMPORARY, read_outputs, sha256

N_KILLS = 5


@pytest.fixture(scope="module")
def drill_field(tmp_path_factory):
    from daskstack.simulate import simulate_field

    return simulate_field(tmp_path_factory.mktemp("drill") / "inputs", n_frames=4,
                          shape=(384, 384), filters=("rp",), seed=3, cosmic_rays=False)


def _command(field, out):
    return [sys.executable, "-m", "daskstack.cli", "run", *map(str, field.frames),
            "--catalog", str(field.catalog), "--out", str(out), "--workers", "1", "-q",
            "--tile", "128"]


def _run(field, out, kill_after=None):
    proc = subprocess.Popen(_command(field, out), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    if kill_after is None:
        _, err = proc.communicate(timeout=300)
        return proc.returncode, err.decode(errors="replace")
    try:
        proc.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI, its scheduler and worker processes
        proc.wait()
    proc.stderr.close()
    return proc.returncode, ""


def check_run_dir(out: Path) -> None:
    """Every file under its final name is complete; checksums agree with outputs.ecsv."""
    outputs_file = out / OUTPUTS_FILE
    recorded = {}
    recorded_at = 0
    if outputs_file.exists():
        Table.read(outputs_file, format="ascii.ecsv")  # parses: never half-written
        recorded = read_outputs(out)
        recorded_at = outputs_file.stat().st_mtime_ns
    behind = []
    for path in sorted(out.iterdir()):
        name = path.name
        if name.startswith("."):
            assert name == ".dask" or TEMPORARY.match(name), name  # only our temporaries
            continue
        if path.is_dir():
            assert name in ("store.zarr", "catalog-cache"), name
            continue
        if name.endswith((".fits", ".wcs")):
            with fits.open(path, checksum=True) as hdul:
                hdul.verify("exception")
                for hdu in hdul:
                    if hdu.header.get("NAXIS", 0):
                        assert np.asarray(hdu.data).shape == hdu.shape
                if name.endswith(".wcs"):
                    assert hdul[0].header["CTYPE1"].startswith("RA---TAN")
            if name in recorded and recorded[name] == (sha256(path),
                                                       path.stat().st_size):
                continue
            # renamed into place, killed before outputs.ecsv caught up: newer than its record
            assert path.stat().st_mtime_ns >= recorded_at, f"{name}: checksum mismatch"
            behind.append(name)
        elif name.endswith(".ecsv"):
            Table.read(path, format="ascii.ecsv")
        elif name == "run.json":
            json.loads(path.read_text())
        else:
            raise AssertionError(f"unexpected file {name}")
    assert len(behind) <= 1, behind


def test_crash_drill(drill_field, tmp_path):
    start = time.perf_counter()
    code, err = _run(drill_field, tmp_path / "reference")
    duration = time.perf_counter() - start
    assert code == EXIT_OK, err[-3000:]  # all good frames: exit 0 through the CLI
    reference = fits.getdata(tmp_path / "reference" / "coadd_rp.fits")

    out = tmp_path / "drill"
    rng = np.random.default_rng(2024)
    for _ in range(N_KILLS):
        # from interpreter start-up to the end of combine (a run may also finish first)
        _run(drill_field, out, kill_after=float(rng.uniform(0.2, 1.0) * duration))
        check_run_dir(out)

    code, err = _run(drill_field, out)
    assert code == EXIT_OK, err[-3000:]
    check_run_dir(out)
    assert not [p.name for p in out.iterdir() if TEMPORARY.match(p.name)]
    np.testing.assert_array_equal(fits.getdata(out / "coadd_rp.fits"), reference)
    recorded = read_outputs(out)
    assert recorded["coadd_rp.fits"][0] == sha256(out / "coadd_rp.fits")
