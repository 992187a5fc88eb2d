"""Safe by default (issue 20, points 3, 4, 6, 7): batch jobs that cannot start stop the
run; `combine` never replaces a coadd silently; mistakes are caught before any work;
quiet is quiet, Ctrl-C is one line, repeated reasons are said once."""

from __future__ import annotations

import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from click.testing import CliRunner

from daskstack import cli
from daskstack._rundir import FrameRecord, sha256
from daskstack.catalogs import CatalogError, load_catalog
from daskstack.config import ClusterSettings, Settings, SettingsError
from daskstack.match import MatchError, find_transform, format_probability

ONE_WORKER = ["--workers", "1", "--threads", "1"]


def invoke(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args], catch_exceptions=False)


def daskstack(*args, env=None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daskstack.cli", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300, **kwargs)


@pytest.fixture(scope="module")
def small_field(tmp_path_factory):
    from daskstack.simulate import simulate_field

    return simulate_field(tmp_path_factory.mktemp("safety") / "inputs", n_frames=3,
                          shape=(512, 512), filters=("rp",), seed=11)


@pytest.fixture(scope="module")
def small_run(small_field, tmp_path_factory):
    """One `daskstack run` of the small field (default settings: sigclip)."""
    out = tmp_path_factory.mktemp("safety-run") / "run"
    result = invoke("run", *small_field.frames, "--catalog", small_field.catalog, "--out", out,
                    *ONE_WORKER, "-q")
    assert result.exit_code == 0, result.output
    return out


# --------------------------------------------------------------------------------------
# 3. batch jobs: a refused submission and a job that never starts both stop the run
# --------------------------------------------------------------------------------------
def _fake_batch_system(directory: Path, sbatch_body: str) -> dict:
    directory.mkdir()
    for name, body in (("sbatch", sbatch_body), ("scancel", "exit 0\n")):
        path = directory / name
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(0o755)
    return {**os.environ, "PATH": f"{directory}{os.pathsep}{os.environ['PATH']}"}


def test_refused_job_submission_stops_with_the_schedulers_message(small_field, tmp_path):
    env = _fake_batch_system(tmp_path / "bin", (
        'echo "sbatch: error: Batch job submission failed: Invalid account or '
        'account/partition combination specified" >&2\nexit 1\n'))
    start = time.monotonic()
    proc = daskstack("run", *small_field.frames, "--catalog", small_field.catalog,
                     "--out", tmp_path / "out", "--jobqueue", "slurm", env=env)
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr
    assert elapsed < 60  # the requirement: it stops within a minute, it does not hang
    assert ("sbatch: error: Batch job submission failed: Invalid account or "
            "account/partition combination specified") in proc.stderr
    assert "Traceback" not in proc.stderr


def test_job_that_never_starts_hits_the_worker_timeout(small_field, tmp_path):
    env = _fake_batch_system(tmp_path / "bin", 'echo "Submitted batch job 4242"\n')
    proc = daskstack("run", *small_field.frames, "--catalog", small_field.catalog,
                     "--out", tmp_path / "out", "--jobqueue", "slurm", "--worker-timeout", 3,
                     env=env)
    assert proc.returncode == 2, proc.stderr
    assert "no slurm worker joined within 3 s" in proc.stderr
    assert "--worker-timeout" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_worker_timeout_is_a_setting():
    assert Settings.from_dict({"cluster": {"worker_timeout": 42}}).cluster.worker_timeout == 42
    with pytest.raises(SettingsError, match="worker_timeout"):
        Settings.from_dict({"cluster": {"worker_timeout": 0}}).validate()
    assert "--worker-timeout" in invoke("run", "--help").output


# --------------------------------------------------------------------------------------
# 4. combine: never replaces other settings' coadd silently; prints what it writes
# --------------------------------------------------------------------------------------
def test_combine_refuses_to_replace_a_coadd_of_other_settings(small_run):
    coadd = small_run / "coadd_rp.fits"
    before = sha256(coadd)
    result = invoke("combine", small_run, "--combine", "mean,median", *ONE_WORKER)
    assert result.exit_code == 2
    assert "coadd_rp.fits exists, made with other combine settings" in result.output
    assert "method: 'sigclip' -> 'mean'" in result.output and "--overwrite" in result.output
    assert sha256(coadd) == before
    assert not (small_run / "coadd_rp_median.fits").exists()

    # the same settings as the run's coadd: nothing to protect, it is made again
    result = invoke("combine", small_run / "store.zarr", "--combine", "sigclip", *ONE_WORKER)
    assert result.exit_code == 0, result.output
    assert f"wrote {coadd}" in result.output

    result = invoke("combine", small_run, "--combine", "mean,median", "--overwrite",
                    *ONE_WORKER)
    assert result.exit_code == 0, result.output
    assert f"wrote {coadd}" in result.output
    assert f"wrote {small_run / 'coadd_rp_median.fits'}" in result.output
    assert fits.getheader(coadd)["COMBINE"] == "mean"
    assert fits.getheader(small_run / "coadd_rp_median.fits")["COMBINE"] == "median"
    # back to the run's settings for the other tests of this run directory
    result = invoke("combine", small_run, "--combine", "sigclip", "--overwrite", *ONE_WORKER)
    assert result.exit_code == 0, result.output


def test_report_accepts_the_store_as_well_as_the_run_directory(small_run):
    result = invoke("report", small_run / "store.zarr", "--no-frames", "--workers", 1, "-q")
    assert result.exit_code == 0, result.output
    assert (small_run / "report" / "index.html").exists()


# --------------------------------------------------------------------------------------
# 6. checked before the cluster starts or anything is written
# --------------------------------------------------------------------------------------
def test_missing_catalog_refused_before_anything_is_written(small_field, tmp_path):
    out = tmp_path / "out"
    result = invoke("run", *small_field.frames, "--catalog", tmp_path / "nowhere.ecsv",
                    "--out", out)
    assert result.exit_code == 2
    assert "nowhere.ecsv: catalog file does not exist" in result.output
    assert not out.exists()


def test_catalog_columns_map_unusual_names(small_field, tmp_path):
    table = Table.read(small_field.catalog)
    odd = Table({"X_WORLD": table["ra"], "Y_WORLD": table["dec"],
                 "BRIGHTNESS": table["phot_g_mean_mag"]})
    path = tmp_path / "odd.ecsv"
    odd.write(path)
    out = tmp_path / "out"
    result = invoke("run", *small_field.frames, "--catalog", path, "--out", out)
    assert result.exit_code == 2
    assert "missing column(s) ra, dec" in result.output and not out.exists()
    result = invoke("run", *small_field.frames, "--catalog", path, "--out", out,
                    "--catalog-columns", "ra=X_WORLD,dec=Y_WORLD,mag=NOPE")
    assert result.exit_code == 2
    assert "no column mag=NOPE" in result.output and not out.exists()

    loaded = load_catalog(path, {"ra": "x_world", "dec": "Y_WORLD", "mag": "BRIGHTNESS"})
    order = np.argsort(np.asarray(table["phot_g_mean_mag"]), kind="stable")
    np.testing.assert_allclose(loaded["ra"], np.asarray(table["ra"])[order])
    np.testing.assert_allclose(loaded["mag"], np.asarray(table["phot_g_mean_mag"])[order])
    with pytest.raises(CatalogError, match="no column ra=X"):
        load_catalog(path, {"ra": "X", "dec": "Y_WORLD"})
    settings = Settings.from_dict({"catalog": {"columns": "ra=RA_DEG, dec=DEC_DEG"}})
    assert settings.validate().catalog.column_map == {"ra": "RA_DEG", "dec": "DEC_DEG"}
    with pytest.raises(SettingsError, match="catalog.columns"):
        Settings.from_dict({"catalog": {"columns": "colour=BP_RP"}}).validate()


def test_reference_must_be_among_the_inputs(small_field, tmp_path):
    out = tmp_path / "out"
    result = invoke("run", *small_field.frames, "--catalog", small_field.catalog, "--out", out,
                    "--reference", "not-a-frame")
    assert result.exit_code == 2
    assert "--reference 'not-a-frame' is not among the inputs" in result.output
    assert not out.exists()


def test_globs_and_directories_are_expanded(tmp_path):
    names = ["a.fits", "b.fits.fz", "c.fit", "d.fts", "e.fits.gz", "f.fit.gz", "g.fts.gz"]
    for name in names + ["notes.txt", "catalog.ecsv"]:
        (tmp_path / name).write_bytes(b"")
    assert cli._check_inputs([tmp_path]) == sorted(str(tmp_path / n) for n in names)
    assert cli._check_inputs([tmp_path / "*.fit*"]) == sorted(
        str(p) for p in tmp_path.glob("*.fit*"))
    out = tmp_path / "out"
    result = invoke("run", tmp_path / "*.fits.fz.none", "--catalog", "c.ecsv", "--out", out)
    assert result.exit_code == 2 and "no file matches this pattern" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = invoke("run", empty, "--catalog", "c.ecsv", "--out", out)
    assert result.exit_code == 2 and "directory holds no FITS files" in result.output
    assert not out.exists()


def test_a_different_run_says_what_differs(small_field, small_run):
    frames = small_field.frames
    result = invoke("run", *frames, "--catalog", small_field.catalog, "--out", small_run,
                    "--combine", "median", "--scale", "none")
    assert result.exit_code == 2
    assert "combine.method: 'sigclip' -> 'median'" in result.output
    assert "combine.scale: 'exptime' -> 'none'" in result.output
    assert f"daskstack combine {small_run} --combine median --scale none" in result.output
    result = invoke("run", *frames[:2], "--catalog", small_field.catalog, "--out", small_run,
                    "--sigma", 2.5)
    assert result.exit_code == 2
    assert f"1 frame(s) dropped ({Path(frames[2]).name})" in result.output
    assert "combine.sigma: 3.0 -> 2.5" in result.output
    assert "daskstack combine" not in result.output  # the inputs differ too: a new run


# --------------------------------------------------------------------------------------
# 7. noise
# --------------------------------------------------------------------------------------
def test_quiet_silences_worker_logs(capfd, tmp_path):
    """Records logged on a worker process go through this process's logging: below the
    -q level they are not printed (neither here nor by the worker), errors are."""
    from daskstack._cluster import open_client

    cli._setup_logging(0, quiet=True)
    try:
        worker_log = logging.getLogger("daskstack._pipeline")
        with open_client(ClusterSettings(n_workers=1), local_directory=str(tmp_path)) as client:
            client.submit(worker_log.warning, "frame-x: a bad frame", pure=False).result()
            client.submit(worker_log.error, "the run itself failed", pure=False).result()
            deadline = time.monotonic() + 30
            err = ""
            while "the run itself failed" not in err and time.monotonic() < deadline:
                time.sleep(0.2)
                err += capfd.readouterr().err
    finally:
        cli._setup_logging(0, quiet=False)
    err += capfd.readouterr().err
    assert "the run itself failed" in err
    assert "a bad frame" not in err


def test_ctrl_c_ends_with_one_line(small_field, tmp_path):
    """SIGINT to the process group (as a terminal's Ctrl-C) mid-run: exit 130, the last
    line says how to resume, no traceback from the command or its workers."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "daskstack.cli", "run", *map(str, small_field.frames),
         "--catalog", str(small_field.catalog), "--out", str(tmp_path / "out"), "--workers",
         "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    seen = []
    try:
        for line in proc.stderr:  # the cluster is up once the scheduler is announced
            seen.append(line)
            if line.startswith("Dask scheduler"):
                break
        os.killpg(proc.pid, signal.SIGINT)
        _, rest = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stderr = "".join(seen) + rest
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "interrupted: run the same command again to resume"
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr


def test_repeated_reasons_are_said_once(small_field, tmp_path):
    records = [FrameRecord(file=f"/x/f{i}.fits", name=f"f{i}", refusal="catalog unreachable")
               for i in range(5)]
    records.append(FrameRecord(file="/x/g.fits", name="g", refusal="blank"))
    assert cli._failure_lines(records) == [
        "  FAILED 5 frames (f0.fits, f1.fits, f2.fits, ...): catalog unreachable",
        "  FAILED g.fits: blank"]

    # a catalog of another part of the sky: one cause for every frame of the field
    table = Table.read(small_field.catalog)
    table["ra"] = (np.asarray(table["ra"]) + 90.0) % 360.0
    elsewhere = tmp_path / "elsewhere.ecsv"
    table.write(elsewhere)
    proc = daskstack("run", *small_field.frames, "--catalog", elsewhere, "--out",
                     tmp_path / "out", *ONE_WORKER)
    assert proc.returncode == 4, proc.stderr
    failed = [line for line in proc.stdout.splitlines() if "FAILED" in line]
    assert len(failed) == 1 and failed[0].startswith("  FAILED 3 frames (")
    assert proc.stderr.count("no stars of catalog elsewhere.ecsv") == 1


def test_false_alarm_probability_reads_as_one():
    reasons = []
    for seed in range(3):
        rng = np.random.default_rng(seed)
        ref = rng.uniform(-1500, 1500, (400, 2))
        with pytest.raises(MatchError) as err:
            find_transform(rng.uniform(-1000, 1000, (120, 2)), ref, max_offset=800,
                           match_radius=2.0, min_matches=3)
        reasons.append(str(err.value))
    values = [float(m) for r in reasons
              for m in re.findall(r"false-alarm probability ([0-9.e+-]+)", r)]
    assert values, reasons
    assert all(0.0 <= v <= 1.0 for v in values)
    assert "10^" not in " ".join(reasons)
    assert format_probability(math.log10(0.13)) == "0.13"
    assert format_probability(-5.0) == "1e-5"


def test_run_summary_names_every_file_combine_wrote(tmp_path, capsys):
    from daskstack._pipeline import RunResult

    main, median = tmp_path / "coadd_rp.fits", tmp_path / "coadd_rp_median.fits"
    differences = [tmp_path / "difference" / f"f{i}.fits" for i in range(3)]
    result = RunResult(out_dir=tmp_path, frames=[], coadds={"rp": main},
                       written=[main, median, *differences])
    cli._summary(result, quiet=False)
    out = capsys.readouterr().out
    assert f"coadd [rp]: {main}" in out and f"wrote {median}" in out
    assert f"wrote 3 difference images in {tmp_path / 'difference'}" in out
