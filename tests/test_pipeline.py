"""The whole pipeline end to end: synthetic truth, output layout, resume, real frames."""

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from daskstack._pipeline import EXIT_OK, EXIT_PARTIAL, run
from daskstack._validate import wcs_error_px
from daskstack.catalogs import load_catalog, propagate_proper_motion
from daskstack.frames import read_meta


def coadd_star_offsets(coadd_path, catalog, epoch, max_stars=40):
    """Measured flux-weighted centroids of isolated bright catalog stars in a coadd,
    minus where the coadd's WCS puts them (pixels)."""
    from photutils.centroids import centroid_com

    with fits.open(coadd_path) as hdul:
        image = hdul[0].data.astype(float)
        wcs = WCS(hdul[0].header)
    cat = propagate_proper_motion(catalog, epoch) if epoch else catalog
    x, y = wcs.world_to_pixel_values(np.asarray(cat["ra"]), np.asarray(cat["dec"]))
    order = np.argsort(np.asarray(cat["mag"]))
    ny, nx = image.shape
    r = 7
    offsets = []
    for i in order:
        xi, yi = x[i], y[i]
        if not (r + 2 < xi < nx - r - 3 and r + 2 < yi < ny - r - 3):
            continue
        # isolated: no other catalog star within 4 r
        d = np.hypot(x - xi, y - yi)
        if np.sum(d < 4 * r) > 1:
            continue
        ix, iy = int(round(xi)), int(round(yi))
        cut = image[iy - r:iy + r + 1, ix - r:ix + r + 1]
        ring = image[iy - 3 * r:iy + 3 * r + 1, ix - 3 * r:ix + 3 * r + 1]
        if not np.all(np.isfinite(cut)) or cut.max() > 0.5 * np.nanmax(image):
            continue
        sub = cut - np.nanmedian(ring)
        cx, cy = centroid_com(np.clip(sub, 0, None))
        offsets.append((ix - r + cx - xi, iy - r + cy - yi))
        if len(offsets) >= max_stars:
            break
    return np.array(offsets)


def test_run_layout_and_manifest(sim_run, sim_field):
    assert sim_run.exit_code == EXIT_OK
    out = sim_run.out_dir
    assert set(sim_run.coadds) == {"rp", "gp"}
    assert (out / "coadd_rp.fits").exists() and (out / "coadd_gp.fits").exists()
    manifest = Table.read(out / "manifest.ecsv")
    assert len(manifest) == len(sim_field.frames)
    assert set(manifest["status"]) == {"ok"}
    assert np.all(manifest["n_matches"] >= 8)
    for name in manifest["name"]:
        assert (out / f"{name}.wcs").exists()
    with fits.open(out / "coadd_rp.fits") as hdul:
        header = hdul[0].header
        assert header["NCOMBINE"] == 3
        assert header["FILTER"] == "rp"
        assert "WEIGHT" in hdul and hdul["NFRAMES"].data.max() == 3


def test_coadd_carries_its_noise(sim_run, sim_field):
    """ERR, WEIGHT = 1/ERR**2, NFRAMES and EXPMAP beside the coadd; the ERR of the sky
    is its measured scatter; NOISECOR names the kernel's correlation."""
    from daskstack._stats import sky_level
    from daskstack.register import noise_correlation

    with fits.open(sim_run.out_dir / "coadd_rp.fits") as hdul:
        image, err, weight = (hdul[n].data.astype(float) for n in (0, "ERR", "WEIGHT"))
        nframes, expmap = hdul["NFRAMES"].data, hdul["EXPMAP"].data
        header = hdul[0].header
        assert hdul["ERR"].header["BUNIT"] == header["BUNIT"]
        assert hdul["EXPMAP"].header["BUNIT"] == "s"
    assert header["NOISECOR"] == pytest.approx(noise_correlation("bilinear"), abs=1e-3)
    full = nframes == 3
    ok = full & np.isfinite(err)
    np.testing.assert_allclose(weight[ok], 1 / err[ok] ** 2, rtol=1e-4)
    assert np.all(weight[~np.isfinite(image)] == 0)
    exptimes = [read_meta(f).exptime for f in sim_field.frames if read_meta(f).filter == "rp"]
    assert np.allclose(expmap[full], sum(exptimes))
    level, scatter = sky_level(image, ~ok)
    sky = ok & (np.abs(image - level) < 3 * scatter)
    assert np.median(err[sky]) == pytest.approx(scatter, rel=0.1)


def test_per_frame_wcs_matches_truth(sim_run, sim_field):
    """Issue: every corrected WCS within 0.1 px RMS of the simulation's truth."""
    for record in sim_run.frames:
        error = wcs_error_px(record.result.wcs, sim_field.truth_wcs[record.name],
                             record.meta.shape)
        assert error < 0.1, (record.name, error)


def test_coadd_wcs_puts_stars_at_catalog_positions(sim_run, sim_field):
    """Issue: stars in the coadd sit at their catalog positions to better than 0.2 px."""
    catalog = load_catalog(sim_field.catalog)
    epoch = read_meta(sim_field.frames[0]).epoch
    for filter_name in ("rp", "gp"):
        offsets = coadd_star_offsets(sim_run.coadds[filter_name], catalog, epoch)
        assert len(offsets) >= 10
        rms = np.sqrt(np.mean(np.sum(offsets ** 2, axis=1)))
        assert np.median(np.hypot(*offsets.T)) < 0.2
        assert rms < 0.2, rms


def test_rerun_resumes_without_recomputing(sim_run, sim_field, dask_client):
    """A second run of the same inputs reuses solved and registered frames."""
    before = {p.name: p.stat().st_mtime_ns for p in sim_run.out_dir.glob("*.wcs")}
    image_before = fits.getdata(sim_run.coadds["rp"])
    again = run([str(p) for p in sim_field.frames], str(sim_field.catalog), sim_run.out_dir,
                client=dask_client)
    after = {p.name: p.stat().st_mtime_ns for p in sim_run.out_dir.glob("*.wcs")}
    assert before == after  # no frame solved again
    assert all(r.registered for r in again.frames)
    np.testing.assert_array_equal(fits.getdata(again.coadds["rp"]), image_before)


def test_different_run_in_same_directory_is_refused(sim_run, sim_field, dask_client):
    from daskstack._pipeline import RunError

    with pytest.raises(RunError, match="different run"):
        run([str(p) for p in sim_field.frames[:2]], str(sim_field.catalog), sim_run.out_dir,
            client=dask_client)


def test_real_lco_frames_make_coadds(lco_frames, lco_dir, dask_client, tmp_path):
    """The twelve real frames with the reference catalog: coadds per filter, correct WCS."""
    result = run([str(p) for p in lco_frames], str(lco_dir / "refcat-pds110.ecsv"), tmp_path,
                 client=dask_client)
    assert result.exit_code in (EXIT_OK, EXIT_PARTIAL)
    assert {"gp", "rp", "zs"} <= set(result.coadds)
    solved = [r for r in result.frames if r.status == "ok"]
    assert len(solved) >= 9
    catalog = load_catalog(lco_dir / "refcat-pds110.ecsv")
    offsets = coadd_star_offsets(result.coadds["rp"], catalog, None)
    assert len(offsets) >= 10
    # the catalog itself scatters by ~0.15" (~0.13 px): the coadd WCS must be that good
    assert np.median(np.hypot(*offsets.T)) < 0.4


def test_companion_exposures_rescue_a_thin_frame(tmp_path, monkeypatch):
    """A frame that fails on its own is solved again with the detections of the other
    exposures of its pointing and filter (the u-band case), and only with those."""
    from distributed import Client

    from daskstack import _pipeline as pipeline
    from daskstack.simulate import simulate_field

    field = simulate_field(tmp_path / "in", n_frames=4, shape=(384, 384), filters=("up", "rp"),
                           seed=8, pointing_error_arcmin=0.2, dither_arcsec=5)
    thin = field.frames[0].name.replace(".fits.fz", "")
    real_solve = pipeline.solve_frame
    seen = {}

    def picky_solve(frame, catalog, settings, companions=None, detections=None):
        if frame.name == thin:
            seen[companions is None] = companions
            if companions is None:
                result = real_solve(frame, catalog, settings, detections=detections)
                result.status, result.reason, result.wcs_header = "failed", "too thin", ""
                return result
        return real_solve(frame, catalog, settings, companions=companions,
                          detections=detections)

    monkeypatch.setattr(pipeline, "solve_frame", picky_solve)
    with Client(processes=False, n_workers=1, threads_per_worker=2,
                dashboard_address=":0") as client:
        records = pipeline._inspect_frames(client, [str(p) for p in field.frames])
        pipeline._solve_frames(client, records, tmp_path / "out",
                               pipeline.Settings().replace("catalog", source=str(field.catalog)))
    by_name = {r.name: r for r in records}
    assert by_name[thin].status == "ok"
    companions = seen[False]
    assert len(companions) == 1  # the other 'up' exposure, not the rp frames
    assert len(companions[0]) > 10
    assert wcs_error_px(by_name[thin].result.wcs, field.truth_wcs[thin], (384, 384)) < 0.1
