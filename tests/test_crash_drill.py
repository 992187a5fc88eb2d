"""Crash drill: `daskstack run` killed (SIGKILL, whole process group) in each phase.

One run directory, five runs, each killed as soon as the run's own outputs show it is in
the phase aimed at: solving (a first ``.wcs``), registering (the store appears),
combining (the store's coadd arrays appear), writing (a coadd's temporary FITS appears),
drawing the report (``report/`` appears). Each kill must have interrupted the run
(return code -SIGKILL, that phase's outputs not all there) and left every file complete
and valid (FITS open and read, tables parse, sha256 as recorded in outputs.ecsv -- only
the one file renamed into place just before the kill may be newer than its record); each
next run resumes the last. A final run must finish, with coadds identical to those of an
uninterrupted run, and leave no temporaries behind.
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

from daskstack._pipeline import EXIT_OK, run
from daskstack._rundir import OUTPUTS_FILE, TEMPORARY, read_outputs, sha256
from daskstack.config import Settings

N_FRAMES = 3
TILE = 128
METHODS = ("sigclip", "mean", "median")  # three coadds: the write phase lasts a while
COADDS = ["coadd_rp.fits", "coadd_rp_mean.fits", "coadd_rp_median.fits"]


def _coadd_temporary(out: Path) -> bool:
    return any(TEMPORARY.match(p.name) and p.name.startswith(".coadd_")
               for p in out.iterdir())


# phase -> (the run's own sign that it is in that phase, outputs still incomplete then)
PHASES = {
    "solve": (lambda out: any(out.glob("*.wcs")),
              lambda out: len(list(out.glob("*.wcs"))) < N_FRAMES
              and not (out / "store.zarr").exists()),
    "register": (lambda out: (out / "store.zarr").exists(),
                 lambda out: not (out / "store.zarr" / "coadd").exists()
                 and not any((out / c).exists() for c in COADDS)),
    "combine": (lambda out: (out / "store.zarr" / "coadd").exists(),
                lambda out: not any((out / c).exists() for c in COADDS)),
    "write": (_coadd_temporary,
              lambda out: not all((out / c).exists() for c in COADDS)),
    "report": (lambda out: (out / "report").exists(),
               lambda out: not (out / "report" / "index.html").exists()),
}


@pytest.fixture(scope="module")
def drill_field(tmp_path_factory):
    from daskstack.simulate import simulate_field

    return simulate_field(tmp_path_factory.mktemp("drill") / "inputs", n_frames=N_FRAMES,
                          shape=(384, 384), filters=("rp",), seed=3, cosmic_rays=False)


def _command(field, out, *extra):
    return [sys.executable, "-m", "daskstack.cli", "run", *map(str, field.frames),
            "--catalog", str(field.catalog), "--out", str(out), "--workers", "1", "-q",
            "--tile", str(TILE), "--combine", ",".join(METHODS), *extra]


def _run(field, out, log: Path, *extra) -> tuple[int, str]:
    with open(log, "wb") as err:
        code = subprocess.run(_command(field, out, *extra), stdout=subprocess.DEVNULL,
                              stderr=err, timeout=300).returncode
    return code, log.read_text(errors="replace")


def _kill_in(phase: str, field, out, log: Path) -> None:
    """Start a run, SIGKILL its process group as soon as it is in ``phase``; check that
    the kill interrupted it there."""
    in_phase, incomplete = PHASES[phase]
    with open(log, "wb") as err:
        proc = subprocess.Popen(_command(field, out, "--report"), stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while proc.poll() is None and time.monotonic() < deadline:
                if out.is_dir() and in_phase(out):
                    os.killpg(proc.pid, signal.SIGKILL)  # the CLI, scheduler, workers
                    break
                time.sleep(0.001)
        finally:
            if proc.poll() is None and time.monotonic() >= deadline:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stderr = log.read_text(errors="replace")[-3000:]
    assert proc.returncode == -signal.SIGKILL, (
        f"{phase}: the run was not killed (exit {proc.returncode}): {stderr}")
    assert incomplete(out), f"{phase}: the kill came after the phase's outputs were all made"


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
            assert name in ("store.zarr", "catalog-cache", "report"), name
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


def test_crash_drill(drill_field, dask_client, tmp_path):
    # the uninterrupted run, in this process (the same settings as the command's options)
    settings = Settings().update({"register.tile": TILE, "combine.method": ",".join(METHODS)})
    uninterrupted = run([str(p) for p in drill_field.frames], str(drill_field.catalog),
                        tmp_path / "reference", settings, client=dask_client)
    assert uninterrupted.exit_code == EXIT_OK
    reference = {c: fits.getdata(tmp_path / "reference" / c) for c in COADDS}

    out = tmp_path / "drill"
    for phase in PHASES:
        _kill_in(phase, drill_field, out, tmp_path / f"{phase}.log")
        check_run_dir(out)

    code, err = _run(drill_field, out, tmp_path / "resume.log", "--report")
    assert code == EXIT_OK, err[-3000:]
    check_run_dir(out)
    assert not [p.name for p in out.iterdir() if TEMPORARY.match(p.name)]
    assert (out / "report" / "index.html").exists()
    recorded = read_outputs(out)
    for name in COADDS:
        np.testing.assert_array_equal(fits.getdata(out / name), reference[name])
        assert recorded[name][0] == sha256(out / name)
