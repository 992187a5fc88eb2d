"""Where the frames' WCS comes from (issue 20): `--wcs auto` (the default) solves with a
catalog and otherwise takes the header WCS only where the header calls it good; the
reference grid is the best solved frame of the deepest filter, named as REFFRAME."""

import dataclasses

import numpy as np
import pytest
from astropy.io import fits
from click.testing import CliRunner

from daskstack._pipeline import EXIT_OK, EXIT_PARTIAL, reference_frame, run
from daskstack._rundir import FrameRecord
from daskstack.astrometry import SolveResult
from daskstack.config import Settings
from daskstack.frames import FrameMeta, read_meta, unusable_reason

U_BAND = [f"ogg0m404-kb82-20170815-{n}-e91" for n in (1153, 1154, 1155)]  # WCSERR = 4


def _record(name, filter_name, exptime, n_matches=0, rms=float("nan"), status="ok"):
    meta = FrameMeta(path=f"{name}.fits", name=name, shape=(10, 10), filter=filter_name,
                     exptime=exptime, date_obs=None, mjd=None, gain=1.0, rdnoise=0.0,
                     saturate=np.inf, pixscale=1.0, ra=0.0, dec=0.0)
    result = SolveResult(name=name, path=meta.path, filter=filter_name, status=status,
                         n_matches=n_matches, rms_arcsec=rms)
    return FrameRecord(file=meta.path, name=name, meta=meta, result=result)


def test_reference_is_the_best_frame_of_the_deepest_filter():
    records = [
        _record("g1", "gp", 10, 90, 0.1), _record("g2", "gp", 10, 95, 0.1),
        _record("g3", "gp", 10, 99, 0.1),  # 30 s in all: not the deepest
        _record("r1", "rp", 20, 50, 0.30), _record("r2", "rp", 20, 50, 0.20),
        _record("r3", "rp", 5, 40, 0.10),  # rp: 45 s; most matches, then lowest RMS
        _record("z1", "zs", 100, 80, 0.1, status="failed"),  # failed frames do not count
    ]
    settings = Settings()
    for order in (records, records[::-1], records[3:] + records[:3]):
        assert reference_frame(order, settings) == "r2"
    # frames taken with their header WCS have no QA: the longest exposure, then the name
    header_frames = [_record("b", "ip", 10), _record("c", "ip", 30), _record("a", "ip", 30)]
    assert reference_frame(header_frames, settings) == "a"
    settings = settings.replace("grid", reference="g1")  # a named reference still wins
    assert reference_frame(records, settings) == "g1"
    settings = settings.replace("grid", method="optimal")
    assert reference_frame(records, settings) == ""


def test_only_a_header_that_says_failed_is_refused(lco_dir):
    meta = read_meta(lco_dir / f"{U_BAND[0]}.fits.fz")
    assert meta.wcserr == 4
    reason = unusable_reason(meta, needs_start=False, trusts_header=True)
    assert "WCSERR = 4" in reason and "catalog" in reason
    # solving starts from that header: nothing to refuse
    assert unusable_reason(meta, needs_start=True) == ""
    # a frame that does not say (no WCSERR keyword) is trusted, as documented
    assert unusable_reason(dataclasses.replace(meta, wcserr=None), needs_start=False,
                           trusts_header=True) == ""


def _expected_header_reference(frames):
    """The rule applied to the headers: deepest filter among WCSERR = 0 frames (summed
    EXPTIME), then (no QA) the longest exposure, then the first name."""
    metas = [m for m in map(read_meta, frames) if m.wcserr == 0]
    depth = {}
    for m in metas:
        depth[m.filter] = depth.get(m.filter, 0.0) + m.exptime
    deepest = min(depth, key=lambda f: (-depth[f], f))
    return min((m for m in metas if m.filter == deepest), key=lambda m: (-m.exptime, m.name))


@pytest.mark.parametrize("wcs", ["header", "auto"])
def test_header_wcs_without_catalog_refuses_frames_whose_solve_failed(
        wcs, lco_frames, dask_client, tmp_path):
    settings = Settings()
    settings = settings.replace("solve", wcs=wcs)
    result = run([str(p) for p in lco_frames], "", tmp_path, settings, client=dask_client)
    by_name = {r.name: r for r in result.frames}
    for name in U_BAND:
        assert by_name[name].status == "failed"
        assert "WCSERR = 4" in by_name[name].reason and "catalog" in by_name[name].reason
    others = [r for r in result.frames if r.name not in U_BAND]
    assert all(r.status == "ok" and r.result.method == "header" for r in others)
    assert set(result.coadds) == {"gp", "rp", "zs"}
    assert result.exit_code == EXIT_PARTIAL
    reference = _expected_header_reference(lco_frames)
    for path in result.coadds.values():
        header = fits.getheader(path)
        assert header["REFFRAME"] == reference.name
        assert (header["NAXIS2"], header["NAXIS1"]) == reference.shape


def test_auto_with_a_catalog_solves_every_frame(lco_frames, lco_dir, dask_client, tmp_path):
    """With a catalog every frame is solved, the WCSERR = 4 ones too, and the grid is the
    best solved frame of the deepest filter."""
    result = run([str(p) for p in lco_frames], str(lco_dir / "refcat-pds110.ecsv"), tmp_path,
                 client=dask_client)
    assert all(r.result.method == "pattern" for r in result.frames)
    solved = [r for r in result.frames if r.result.ok]
    assert {r.name for r in solved} >= set(U_BAND)
    assert result.exit_code == (EXIT_OK if len(solved) == len(lco_frames) else EXIT_PARTIAL)
    depth = {}
    for r in solved:
        depth[r.meta.filter] = depth.get(r.meta.filter, 0.0) + r.meta.exptime
    deepest = max(depth, key=depth.get)
    best = min((r for r in solved if r.meta.filter == deepest),
               key=lambda r: (-r.result.n_matches, r.result.rms_arcsec))
    for path in result.coadds.values():
        header = fits.getheader(path)
        assert header["REFFRAME"] == best.name
        crval = best.result.wcs.wcs.crval
        assert np.allclose([header["CRVAL1"], header["CRVAL2"]], crval, atol=1e-9)


def test_cli_names_the_refused_file_and_what_to_do(lco_dir, tmp_path):
    from daskstack.cli import main

    frames = [lco_dir / f"{U_BAND[0]}.fits.fz", lco_dir / "ogg0m404-kb82-20170815-1159-e91.fits.fz"]
    result = CliRunner().invoke(main, ["run", *map(str, frames), "--wcs", "header", "--out",
                                       str(tmp_path / "out"), "--workers", "1", "--threads",
                                       "1"], catch_exceptions=False)
    assert result.exit_code == EXIT_PARTIAL, result.output
    assert (f"FAILED {U_BAND[0]}.fits.fz: the header says its WCS failed (WCSERR = 4"
            in result.output)
    assert "pass a catalog (--catalog)" in result.output
    assert "solved: 1  in the coadd: 1  failed: 1" in result.output


def test_a_frame_of_another_field_never_sets_the_grid():
    """The best frame overall is of another pointing: the grid stays on the main field."""
    records = [_record(n, "rp", 30, 40, 0.2) for n in ("a1", "a2", "a3")]
    stray = _record("z-elsewhere", "rp", 300, 400, 0.1)
    stray.meta = dataclasses.replace(stray.meta, ra=120.0, dec=-30.0)
    assert reference_frame(records + [stray], Settings()) == "a1"
