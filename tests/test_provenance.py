"""What a coadd says about itself (issue 20, point 8) and what a run leaves on disk
(point 9): units, gain, time span, inputs' identity; copies of a frame used once; the
store dropped on request."""

from __future__ import annotations

import logging
import shutil
from types import SimpleNamespace

import astropy.units as u
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.time import Time
from click.testing import CliRunner

import daskstack
from daskstack import combine
from daskstack._rundir import FrameRecord, OutputLog, dedupe_exposures
from daskstack._write import coadd_header
from daskstack.cli import main
from daskstack.config import CombineSettings
from daskstack.frames import read_meta
from daskstack.grid import Grid
from daskstack.store import FrameInfo

from .helpers import tan_wcs

CLUSTER = ["--workers", "1", "--threads", "1"]
GAIN = 2.0  # e-/ADU: the simulated frames are in ADU


@pytest.fixture(scope="module")
def adu_field(tmp_path_factory):
    """Three r' frames in ADU (GAIN = 2, BUNIT = 'adu')."""
    from daskstack.simulate import simulate_field

    # an exact header WCS (WCSERR = 0): the runs here take it as it is (--wcs header)
    return simulate_field(tmp_path_factory.mktemp("adu") / "inputs", n_frames=3,
                          shape=(384, 384), filters=("rp",), seed=5, gain=GAIN,
                          exptime={"rp": 40.0}, pointing_error_arcmin=0,
                          rotation_error_deg=0, sip=False)


@pytest.fixture(scope="module")
def adu_run(adu_field, dask_client, tmp_path_factory):
    """The pipeline on the three frames plus a copy of the first under another name."""
    from daskstack._pipeline import run

    inputs = tmp_path_factory.mktemp("copies")
    copy = inputs / "renamed-copy.fits.fz"
    shutil.copyfile(adu_field.frames[0], copy)
    out = tmp_path_factory.mktemp("adu-run")
    handler = _Collect()
    logging.getLogger("daskstack").addHandler(handler)
    try:
        result = run([str(p) for p in adu_field.frames] + [str(copy)],
                     str(adu_field.catalog), out, client=dask_client)
    finally:
        logging.getLogger("daskstack").removeHandler(handler)
    return SimpleNamespace(result=result, copy=copy, warnings=handler.messages)


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_adu_frames_give_adu_per_second(adu_field):
    assert read_meta(adu_field.frames[0]).bunit == "adu"
    assert fits.getheader(adu_field.frames[0], "SCI")["GAIN"] == GAIN


def test_coadd_header_units_gain_and_time_span(adu_field, adu_run):
    result = adu_run.result
    assert result.exit_code == 0, [r.reason for r in result.frames]
    header = fits.getheader(result.coadds["rp"])
    truth = Table.read(adu_field.truth)
    # scaled by exposure time, frames in ADU: the coadd is in ADU per second
    assert header["BUNIT"] == "adu/s"
    assert header["SCALING"] == "exptime"
    # effective gain of the (clipped) mean of rates: N^2 / sum(s_i / g_i), s_i = 1/t_i
    exptime = np.asarray(truth["exptime"], dtype=float)
    expected_gain = len(exptime) ** 2 / np.sum(1.0 / (exptime * GAIN))
    assert header["GAIN"] == pytest.approx(expected_gain, rel=1e-6)
    starts = Time(list(truth["date_obs"]), scale="utc")
    ends = starts + exptime * u.s
    assert Time(header["DATE-OBS"]) == starts.min()
    assert abs((Time(header["DATE-END"]) - ends.max()).sec) < 1e-3
    assert abs((Time(header["DATE-END"]) - starts.max()).sec - exptime[-1]) < 1e-3
    assert header["MJD-OBS"] == pytest.approx(starts.min().mjd, abs=1e-7)
    assert "MJDREF" not in header
    assert header["CREATOR"] == f"daskstack {daskstack.__version__}"
    assert Time(header["DATE"], scale="utc") > starts.max()  # written now, not observed
    assert header["REFCAT"] == adu_field.catalog.name
    frame_header = fits.getheader(adu_field.frames[0], "SCI")
    for key in ("OBJECT", "TELESCOP", "INSTRUME"):
        assert header[key] == frame_header[key]


def test_a_renamed_copy_is_combined_once(adu_field, adu_run):
    header = fits.getheader(adu_run.result.coadds["rp"])
    assert header["NCOMBINE"] == len(adu_field.frames)
    names = {header[f"IMCMB{i:03d}"] for i in range(1, header["NCOMBINE"] + 1)}
    assert "renamed-copy" not in names
    warning = [m for m in adu_run.warnings if "renamed-copy.fits.fz" in m]
    assert warning and adu_field.frames[0].name in warning[0] and "used once" in warning[0]


def test_identical_files_without_date_are_found_by_checksum(tmp_path, caplog):
    data = np.arange(64, dtype=np.float32).reshape(8, 8)
    paths = []
    for name, values in (("a", data), ("b", data), ("c", data + 1)):
        paths.append(tmp_path / f"{name}.fits")
        fits.PrimaryHDU(values).writeto(paths[-1])
    records = [FrameRecord(file=str(p), name=p.stem, meta=read_meta(p)) for p in paths]
    assert all(r.meta.date_obs is None for r in records)
    with caplog.at_level(logging.WARNING, logger="daskstack"):
        kept = dedupe_exposures(records)
    assert [r.name for r in kept] == ["a", "c"]  # same size as a, other bytes: kept
    assert "b.fits: the same exposure as a.fits (same checksum)" in caplog.text


def _infos(**fields):
    base = {"exptime": 10.0, "date_obs": "2024-01-01T00:00:00", "gain": 1.0,
            "bunit": "electron", "object": "M 66", "telescope": "1m0-01",
            "instrument": "fa14"}
    return [FrameInfo(**{**base, **{k: v[i] for k, v in fields.items()}})
            for i in range(len(next(iter(fields.values()))))]


def _header(infos, method="mean", scale="exptime", catalog=""):
    grid = Grid.from_wcs(tan_wcs((50, 60)), (50, 60))
    stack = SimpleNamespace(grid=grid, params={"catalog": catalog})
    scales = combine.frame_scales(scale, exptime=[f.exptime for f in infos],
                                  n_frames=len(infos))
    return coadd_header(stack, "rp", [f"f{i}" for i in range(len(infos))], infos,
                        CombineSettings(method=method, scale=scale), scales)


def test_inputs_that_differ_are_listed():
    infos = _infos(telescope=["1m0-01", "1m0-03", "1m0-01"],
                   date_obs=["2024-01-01T00:00:00", "2024-01-01T00:01:00",
                             "2024-01-01T00:02:00"])
    header = _header(infos)
    assert header["TELESCOP"] == "multiple"
    assert "TELESCOP of the inputs: 1m0-01, 1m0-03" in str(header["HISTORY"])
    assert header["INSTRUME"] == "fa14" and header["OBJECT"] == "M 66"
    assert header["DATE-END"].startswith("2024-01-01T00:02:10")
    assert "REFCAT" not in header  # header WCS used: no catalog


def test_effective_gain_follows_the_combine():
    """Frames in electrons (gain 1), not scaled: mean of N gives N, median 2N/pi."""
    infos = _infos(exptime=[10.0, 10.0, 10.0, 10.0])
    assert _header(infos, "mean", "none")["GAIN"] == pytest.approx(4.0)
    assert _header(infos, "median", "none")["GAIN"] == pytest.approx(8 / np.pi, rel=1e-6)
    assert _header(infos, "mean", "none")["BUNIT"] == "electron"
    assert _header(infos, "mean", "exptime")["GAIN"] == pytest.approx(40.0)
    mixed = _infos(bunit=["electron", "adu"], exptime=[10.0, 10.0])
    header = _header(mixed)
    assert "BUNIT" not in header and "different units" in str(header["COMMENT"])


def test_no_keep_store_drops_the_store_and_keeps_the_coadds(adu_field, tmp_path):
    out = tmp_path / "run"
    frames = [str(p) for p in adu_field.frames]
    runner = CliRunner()
    result = runner.invoke(main, ["run", *frames, "--wcs", "header", "--out", str(out),
                                  "--no-keep-store", *CLUSTER], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    # the store's size is said before the work
    assert "store: ~" in result.output and f"for {len(frames)} frames on a" in result.output
    assert not (out / "store.zarr").exists()
    coadd = out / "coadd_rp.fits"
    assert OutputLog(out).verified(coadd)  # the log still matches what is on disk
    assert np.isfinite(fits.getdata(coadd)).mean() > 0.5
    again = runner.invoke(main, ["combine", str(out / "store.zarr"), *CLUSTER])
    assert again.exit_code != 0
    assert "removed" in again.output and "--keep-store" in again.output
    # the same run with the store kept is the same run (resumed), and brings it back
    kept = runner.invoke(main, ["run", *frames, "--wcs", "header", "--out", str(out),
                                "--keep-store", *CLUSTER], catch_exceptions=False)
    assert kept.exit_code == 0, kept.output
    assert (out / "store.zarr" / "zarr.json").exists()


def test_a_coadd_that_cannot_be_written_leaves_the_others_recorded(sim_run, dask_client,
                                                                     tmp_path):
    """The workers write a filter's coadd files side by side: when one of them fails
    (here the first method's, the main coadd), the others are still written and in the
    output log with their checksums (a resumed run can trust them), and the run stops
    with the failed file's own error."""
    from daskstack._pipeline import combine_store_path
    from daskstack._rundir import read_outputs, sha256
    from daskstack.config import Settings

    out = tmp_path / "out"
    blocked = out / "coadd_rp.fits"  # a directory where the main coadd should go
    blocked.mkdir(parents=True)
    (blocked / "keep").write_text("in the way")
    settings = Settings().replace("combine", method="mean,median")
    with pytest.raises(IsADirectoryError):
        combine_store_path(sim_run.out_dir / "store.zarr", out, settings, client=dask_client,
                           overwrite=True)
    recorded = read_outputs(out)
    assert recorded["coadd_rp_median.fits"][0] == sha256(out / "coadd_rp_median.fits")
    assert "coadd_rp.fits" not in recorded
    assert (blocked / "keep").read_text() == "in the way"
