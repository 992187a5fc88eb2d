"""An interrupted run (the whole process group SIGKILLed part-way) resumes: frames the
manifest calls finished are not computed again, and the coadd is identical to an
uninterrupted run's (`sim_run`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
from astropy.io import fits
from astropy.table import Table

from daskstack._pipeline import EXIT_OK, read_manifest, run


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # only zombies left (not reaped yet by their parent, itself dead) count as gone
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _cli(args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "daskstack.cli", "run", *args],
                            start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, **kwargs)


def test_killed_run_resumes_without_redoing_finished_frames(sim_field, sim_run, tmp_path,
                                                            dask_client):
    out = tmp_path / "run"
    frames = [str(p) for p in sim_field.frames]
    args = [*frames, "--catalog", str(sim_field.catalog), "--out", str(out), "-q"]

    # 1. a run on one local worker, killed (process group: client, nannies, workers)
    #    as soon as its manifest records a solved frame
    proc = _cli([*args, "--workers", "1"])
    manifest = out / "manifest.ecsv"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            table = read_manifest(manifest) if manifest.exists() else None
            if table is not None and np.any(table["status"] == "ok"):
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.communicate()[0].decode(errors="replace")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    deadline = time.monotonic() + 20
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _group_alive(proc.pid), "LocalCluster workers outlived the killed run"
    assert not list(out.glob("coadd_*.fits")), "the run finished before it was killed"

    before = Table.read(manifest)
    finished = {row["name"]: float(row["t_solve"]) for row in before if row["status"] == "ok"}
    assert 0 < len(finished)
    mtimes = {name: (out / f"{name}.wcs").stat().st_mtime_ns for name in finished}

    # 2. the same command again (on another cluster size: cluster settings are not part of
    #    the run's identity) finishes the run without solving those frames again
    proc = _cli([*args, "--workers", "2"])
    output = proc.communicate(timeout=180)[0].decode(errors="replace")
    assert proc.returncode == EXIT_OK, output
    after = Table.read(manifest)
    assert set(after["status"]) == {"ok"} and all(after["registered"])
    rows = {row["name"]: row for row in after}
    for name, t_solve in finished.items():
        assert (out / f"{name}.wcs").stat().st_mtime_ns == mtimes[name], name
        assert float(rows[name]["t_solve"]) == t_solve, name  # the timing of the first run
    for filter_name, path in sim_run.coadds.items():
        resumed = out / f"coadd_{filter_name}.fits"
        np.testing.assert_array_equal(fits.getdata(resumed), fits.getdata(path))
        np.testing.assert_array_equal(fits.getdata(resumed, "WEIGHT"),
                                      fits.getdata(path, "WEIGHT"))

    # 3. once more, complete: nothing is solved or registered again, same coadd
    wcs_mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.wcs")}
    t_register = {row["name"]: float(row["t_register"]) for row in after}
    chunks = {p: p.stat().st_mtime_ns for p in (out / "store.zarr").rglob("c/*/*/*")}
    assert chunks
    again = run(frames, str(sim_field.catalog), out, client=dask_client)
    assert again.exit_code == EXIT_OK
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.wcs")} == wcs_mtimes
    assert {r.name: r.t_register for r in again.frames} == t_register
    assert {p: p.stat().st_mtime_ns for p in chunks} == chunks  # no tile rewritten
    for filter_name, path in sim_run.coadds.items():
        np.testing.assert_array_equal(fits.getdata(again.coadds[filter_name]),
                                      fits.getdata(path))
