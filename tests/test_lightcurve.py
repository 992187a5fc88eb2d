"""Light curves from the store (`daskstack lightcurve`): a synthetic variable star through
the whole pipeline, constant stars whose errors are their scatter, calibration with the
frames' zero points, and the real PDS 110 frames' comparison stars."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from astropy.table import Table
from click.testing import CliRunner

from daskstack import store as store_mod
from daskstack._fields import separation_deg
from daskstack._pipeline import lightcurve_store_path, run
from daskstack.cli import main
from daskstack.config import Settings
from daskstack.lightcurve import (
    DIFF_COLUMNS,
    LC_COLUMNS,
    LC_FLAG_NO_ZP,
    LightcurveError,
    Star,
    gaussian_fwhm,
    parse_target,
    reading_boxes,
    reduced_chi2,
    target_name,
)
from daskstack.simulate import make_catalog, simulate_field

CENTER = (150.1, 2.2)
T0 = 60000.0  # MJD of the first frame
PERIOD = 0.09  # d: the sinusoid
AMPLITUDE = 0.05
DEPTH = 0.01
TRANSIT = (T0 + 0.08, T0 + 0.12)  # a box-shaped dip, ~12 of the 50 frames


def variable_flux(mjd):
    """The variable star's flux over its catalog magnitude's: a 5% sinusoid and a 1% dip."""
    dip = 1.0 - DEPTH * ((mjd >= TRANSIT[0]) & (mjd <= TRANSIT[1]))
    return (1.0 + AMPLITUDE * np.sin(2 * np.pi * (mjd - T0) / PERIOD)) * dip


@pytest.fixture(scope="module")
def variable_field(tmp_path_factory, dask_client):
    """50 frames (256x256, one filter, 5 min cadence) with exact header WCSs: one star
    varies, three isolated constant stars are targets too; the pipeline run with
    ``--wcs header``, then each frame given its true zero point but two."""
    catalog = make_catalog(CENTER, 0.1, density_per_sq_deg=40000, mag_range=(11, 18), seed=5)
    mag = np.asarray(catalog["phot_g_mean_mag"])
    ra, dec = np.asarray(catalog["ra"]), np.asarray(catalog["dec"])
    # within 75" of the centre (the frames are 205" wide), no star within 15" brighter
    # than 4 mag fainter: stars whose light curves only their noise can move
    near = separation_deg(ra, dec, *CENTER) < 75 / 3600

    def isolated(i):
        sep = separation_deg(ra, dec, ra[i], dec[i]) * 3600
        return not np.any((sep > 0) & (sep < 15) & (mag < mag[i] + 4))

    pick = [i for i in np.argsort(mag) if near[i] and 12.5 < mag[i] < 16 and isolated(i)]
    variable, constant = pick[0], pick[1:4]
    out = tmp_path_factory.mktemp("lightcurve")
    field = simulate_field(
        out / "inputs", n_frames=50, shape=(256, 256), filters=("rp",), pixscale=0.8,
        center=CENTER, seed=5, catalog=catalog, pointing_error_arcmin=0.0,
        rotation_error_deg=0.0, dither_arcsec=4.0, cosmic_rays=False, hot_pixels=0,
        bad_columns=0, exptime=30.0, cadence_s=300.0, epoch_year="2023-02-25T00:00:00",
        variables={variable: variable_flux}, trunc_sigma=0.002)
    result = run([str(p) for p in field.frames], str(field.catalog), out / "run",
                 Settings().replace("solve", wcs="header"), client=dask_client)
    assert result.n_ok == 50
    truth = field.truth_table()
    stack = store_mod.open_store(result.store)
    by_name = {str(row["name"]): row for row in truth}
    no_zp = sorted(stack.frames)[3:5]
    # the simulated flux is exptime * transparency * 10**(-0.4 (m - zeropoint)) (gain 1)
    store_mod.update_frames(stack, {
        name: dataclasses.replace(
            info, zp=math.nan if name in no_zp else float(
                by_name[name]["zeropoint"] + 2.5 * np.log10(by_name[name]["transparency"])),
            zp_err=0.005, n_zp=20) for name, info in stack.frames.items()})
    targets = [(float(ra[i]), float(dec[i])) for i in (variable, *constant)]
    names = ["variable", "constant-1", "constant-2", "constant-3"]
    paths = lightcurve_store_path(result.store, targets, names, client=dask_client)
    tables = {name: Table.read(paths[name], format="ascii.ecsv") for name in names}
    return {"run": result, "truth": truth, "mag": mag, "tables": tables, "paths": paths,
            "rows": [variable, *constant], "no_zp": no_zp, "targets": targets}


def test_variable_star_depth_and_amplitude_recovered(variable_field):
    from scipy.optimize import curve_fit

    table = variable_field["tables"]["variable"]
    ok = np.isfinite(table["diff_mag"])
    assert ok.sum() >= 48
    t = np.asarray(table["mjd"])[ok]
    flux = 10 ** (-0.4 * np.asarray(table["diff_mag"])[ok])
    err = flux * np.asarray(table["diff_mag_err"])[ok] / 1.0857

    def model(t, level, a, b, depth):
        phase = 2 * np.pi * (t - T0) / PERIOD
        dip = 1.0 - depth * ((t >= TRANSIT[0]) & (t <= TRANSIT[1]))
        return level * (1 + a * np.sin(phase) + b * np.cos(phase)) * dip

    (level, a, b, depth), _ = curve_fit(model, t, flux, p0=(np.median(flux), 0, 0, 0),
                                        sigma=err, absolute_sigma=True)
    assert abs(math.hypot(a, b) / AMPLITUDE - 1) < 0.1
    assert abs(depth / DEPTH - 1) < 0.1
    # and the light curve's errors are its scatter about the true variation
    truth = variable_flux(t)
    ratio = flux / truth
    assert 0.5 < reduced_chi2(-2.5 * np.log10(ratio), err / flux * 1.0857) < 2


def test_constant_stars_scatter_as_their_errors(variable_field):
    for name in ("constant-1", "constant-2", "constant-3"):
        table = variable_field["tables"][name]
        chi2 = reduced_chi2(np.asarray(table["diff_mag"]), np.asarray(table["diff_mag_err"]))
        assert 0.5 < chi2 < 2, (name, chi2)
        comparisons = table.meta["comparisons"]["rp"]["used"]
        assert len(comparisons) >= 3
        # the targets themselves are never comparison stars
        for ra, dec in variable_field["targets"]:
            assert all(separation_deg(c["ra"], c["dec"], ra, dec) > 1 / 3600
                       for c in comparisons)


def test_magnitudes_calibrated_with_the_zero_points(variable_field):
    table = variable_field["tables"]["constant-1"]
    assert table.colnames == [*LC_COLUMNS, *DIFF_COLUMNS]
    assert len(table) == 50 and np.all(np.diff(table["mjd"]) > 0)
    true_mag = variable_field["mag"][variable_field["rows"][1]]
    calibrated = np.isfinite(table["mag"])
    # frames without a zero point: flux given, no magnitude, flagged
    missing = np.isin(table["frame"], variable_field["no_zp"])
    assert missing.sum() == 2
    assert not calibrated[missing].any()
    assert np.all(table["flags"][missing] & LC_FLAG_NO_ZP)
    assert np.isfinite(table["flux"][missing]).all()
    assert calibrated[~missing].all()
    # the zero points are the truth's: what is left is the aperture correction's (a
    # "total" flux within 3 FWHM: 97.7% of a Moffat star's, and the sky of a crowded
    # field), a few hundredths
    offset = np.asarray(table["mag"])[calibrated] - true_mag
    assert abs(np.median(offset)) < 0.08
    assert np.std(offset) < 0.03
    assert np.all(np.asarray(table["fwhm"]) > 1.5)


def test_picture_and_report_section(variable_field):
    from daskstack._report import write_report

    run_dir = variable_field["run"].out_dir
    assert (run_dir / "lightcurves" / "variable.png").stat().st_size > 5000
    page = write_report(run_dir).read_text()
    assert "<h2>Light curves</h2>" in page
    assert "lightcurves/variable.png" in page and "lightcurves/constant-2.ecsv" in page


def test_command_line(variable_field, dask_client):
    # (without -q: the command sets the root logger's level, and later tests in this
    # process count daskstack's warnings)
    run_dir = variable_field["run"].out_dir
    ra, dec = variable_field["targets"][1]
    result = CliRunner().invoke(main, [
        "lightcurve", str(run_dir), "--target", f"{ra} {dec}", "--target", "10:00:24 +02:12:00",
        "--target-name", "again", "--scheduler", dask_client.scheduler.address],
        catch_exceptions=False)
    assert result.exit_code == 0, result.output
    again = Table.read(run_dir / "lightcurves" / "again.ecsv", format="ascii.ecsv")
    first = variable_field["tables"]["constant-1"]
    # the same star, other comparison stars (the fixture's other targets are not
    # comparisons there): the same light curve within its errors
    change = np.asarray(again["diff_mag"] - first["diff_mag"])
    assert np.all(np.abs(change - np.median(change)) < 3 * np.asarray(first["diff_mag_err"]))
    assert (run_dir / "lightcurves" / f"{target_name(150.1, 2.2)}.ecsv").exists()
    outside = CliRunner().invoke(main, [
        "lightcurve", str(run_dir), "--target", "20:00:00 +40:00:00",
        "--scheduler", dask_client.scheduler.address])
    assert outside.exit_code != 0 and "not on the grid" in outside.output


def test_parse_target_and_names():
    assert parse_target("80.879 -1.0733") == pytest.approx((80.879, -1.0733))
    ra, dec = parse_target("05:23:31.0 -01:04:24")
    assert ra == pytest.approx(80.879167) and dec == pytest.approx(-1.073333)
    assert parse_target("5h23m31s -1d04m24s") == pytest.approx((ra, dec))
    with pytest.raises(LightcurveError, match="not 'RA DEC'"):
        parse_target("PDS 110")
    assert target_name(80.879, -1.0733) == "080.87900-01.07330"
    assert target_name(0, 0, "PDS 110/b") == "PDS_110_b"


def test_boxes_read_only_the_chunks_around_the_stars():
    stars = [Star(0, 0, 100.0, 100.0), Star(0, 0, 110.0, 104.0), Star(0, 0, 900.0, 700.0)]
    boxes = reading_boxes(stars, 20, (1024, 1024), (256, 256))
    # the two neighbours share a chunk: one read; the far star its own small box
    assert sorted(len(b.stars) for b in boxes) == [1, 2]
    assert sum((b.y1 - b.y0) * (b.x1 - b.x0) for b in boxes) < 3 * 41 * 41
    near_edge = reading_boxes([Star(0, 0, 3.0, 1020.0)], 20, (1024, 1024), (256, 256))
    assert (near_edge[0].x0, near_edge[0].y1) == (0, 1024)


def test_gaussian_fwhm_of_a_gaussian():
    yy, xx = np.mgrid[:31, :31]
    sigma = 1.7
    image = 500 * np.exp(-((xx - 15.3) ** 2 + (yy - 14.6) ** 2) / (2 * sigma**2))
    assert gaussian_fwhm(image, 15.3, 14.6) == pytest.approx(2.3548 * sigma, rel=1e-3)
    assert math.isnan(gaussian_fwhm(image, 1.0, 15.0))  # the fitted square leaves the image


def test_real_frames_comparison_stars_are_flat(lco_frames, lco_dir, dask_client, tmp_path):
    """The solved PDS 110 frames (three each in g', r', z_s; header WCS): bright isolated
    catalog stars measured as targets, differential against the comparisons chosen
    for them, are flat within 0.02 mag and scatter as their errors say."""
    catalog_path = lco_dir / "refcat-pds110.ecsv"
    result = run([str(p) for p in lco_frames], str(catalog_path), tmp_path,
                 Settings().replace("solve", wcs="header"), client=dask_client)
    assert result.n_ok == 9  # the u' frames' header WCS is LCO's failed one: refused
    catalog = Table.read(catalog_path, format="ascii.ecsv")
    ra, dec, mag = (np.asarray(catalog[c], float) for c in ("ra", "dec", "mag"))
    pds110 = (80.8792, -1.0733)  # a young star with eclipses: not a constant star
    grid = store_mod.open_store(result.store).grid
    x, y = grid.wcs.world_to_pixel_values(ra, dec)
    ny, nx = grid.shape
    chosen = []
    for i in np.argsort(mag):
        sep = separation_deg(ra, dec, ra[i], dec[i]) * 3600
        if (10.5 < mag[i] < 13.5 and 60 < x[i] < nx - 60 and 60 < y[i] < ny - 60
                and not np.any((sep > 0) & (sep < 40))
                and separation_deg(ra[i], dec[i], *pds110) * 3600 > 40):
            chosen.append(i)
    chosen = chosen[:4]
    assert len(chosen) == 4
    paths = lightcurve_store_path(result.store, [(ra[i], dec[i]) for i in chosen],
                                  client=dask_client)
    chi2_sum, dof = 0.0, 0
    for path in paths.values():
        table = Table.read(path, format="ascii.ecsv")
        assert sorted(set(table["filter"])) == ["gp", "rp", "zs"]
        # the header's AIRMASS (1.51-1.53 that night) and SITEID
        assert np.all((table["airmass"] > 1.5) & (table["airmass"] < 1.54))
        assert set(table["site"]) == {"ogg"}
        for filter_name in ("gp", "rp", "zs"):
            rows = table[table["filter"] == filter_name]
            diff, err = np.asarray(rows["diff_mag"]), np.asarray(rows["diff_mag_err"])
            assert np.isfinite(diff).all() and len(diff) == 3
            assert np.std(diff) < 0.02, (path.stem, filter_name, diff)
            chi2_sum += reduced_chi2(diff, err) * (len(diff) - 1)
            dof += len(diff) - 1
    assert 0.5 < chi2_sum / dof < 2, chi2_sum / dof
