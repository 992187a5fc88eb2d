"""Photometric calibration (issue 16): catalog bands (Gaia DR3 relations, Pan-STARRS DR2,
ATLAS-RefCat2, files), per-frame zero points against synthetic truth, a coadd on one zero
point, and the real PDS 110 frames."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.stats import sigma_clip
from astropy.table import Table

from daskstack import catalogs
from daskstack.catalogs import (
    GAIA_SDSS_RELATIONS,
    SOURCES,
    gaia_sdss_magnitudes,
    load_catalog,
    photometric_system,
    reference_catalog,
)
from daskstack.config import CatalogSettings, Settings
from daskstack.photcal import filter_band
from daskstack.photometry import aperture_correction, aperture_photometry

CENTRE = SkyCoord(150.0, 2.0, unit="deg")


# -- bands -------------------------------------------------------------------------------
# G - band at BP-RP = 0.5 (0.6 for i), 1.0, 1.5 and 2.5, evaluated by hand from the published
# polynomials (Riello et al. 2021, Table C.2; Gaia DR3 documentation 5.5.1):
#   G-g = 0.2199 - 0.6365 x - 0.1548 x^2 + 0.0064 x^3
#   G-r = -0.09837 + 0.08592 x + 0.1907 x^2 - 0.1701 x^3 + 0.02263 x^4
#   G-i = -0.293 + 0.6404 x - 0.09609 x^2 - 0.002104 x^3
PUBLISHED = {
    "g": {0.5: -0.13625, 1.0: -0.56500, 1.5: -1.06155, 2.5: -2.23885},
    "r": {0.5: -0.02758, 1.0: 0.03078, 1.5: 0.00006, 2.5: -0.46552},
    "i": {0.6: 0.05619, 1.0: 0.24921, 1.5: 0.44430},
}


def test_gaia_relations_give_the_published_values():
    for band, values in PUBLISHED.items():
        colours = np.array(list(values))
        mag, err = gaia_sdss_magnitudes(np.full(colours.size, 15.0), colours, band)
        np.testing.assert_allclose(15.0 - mag, list(values.values()), atol=1e-5,
                                   err_msg=band)
        # the relation's scatter is the error
        np.testing.assert_allclose(err, GAIA_SDSS_RELATIONS[band].sigma)
    # outside the validity range (G-i: 0.5 < BP-RP < 2.0; G-g: 0.3 < BP-RP < 3.0): nothing
    mag, err = gaia_sdss_magnitudes([15.0, 15.0, 15.0], [0.2, 2.5, np.nan], "i")
    assert np.all(np.isnan(mag)) and np.all(np.isnan(err))
    assert np.isnan(gaia_sdss_magnitudes([15.0], [0.1], "g")[0][0])
    # a G error adds in quadrature
    _, err = gaia_sdss_magnitudes([15.0], [1.0], "r", g_err=[0.05])
    assert err[0] == pytest.approx(np.hypot(0.05, GAIA_SDSS_RELATIONS["r"].sigma))
    # no relation for u or z: those filters get no zero point from Gaia
    assert set(GAIA_SDSS_RELATIONS) == {"g", "r", "i"}


def test_gaia_relations_give_the_suns_colours():
    """An independent check of the transcription: the Sun (BP-RP = 0.82, Casagrande &
    VandenBerg 2018) has g-r = 0.44 and r-i = 0.11 (SDSS), within the relations' scatter."""
    g, _ = gaia_sdss_magnitudes([0.0], [0.82], "g")
    r, _ = gaia_sdss_magnitudes([0.0], [0.82], "r")
    i, _ = gaia_sdss_magnitudes([0.0], [0.82], "i")
    assert abs((g - r)[0] - 0.44) < 0.05
    assert abs((r - i)[0] - 0.11) < 0.06


def test_filters_map_to_bands():
    assert [filter_band(f) for f in ("rp", "gp", "ip", "zs", "up", "V", "w")] == \
        ["r", "g", "i", "z", "u", None, None]


def test_a_gaia_query_carries_sdss_bands(tmp_path, monkeypatch):
    raw = Table({"ra": [150.0, 150.01, 150.02], "dec": [2.0, 2.01, 2.02],
                 "phot_g_mean_mag": [14.0, 15.0, 16.0], "phot_bp_mean_mag": [14.5, 15.1, 17.5],
                 "phot_rp_mean_mag": [13.5, 15.05, 15.0], "pmra": [1.0, 0.0, 0.0],
                 "pmdec": [0.0, 0.0, 0.0], "ref_epoch": [2016.0] * 3})
    monkeypatch.setitem(catalogs._SERVICES, "mast", lambda *a: raw.copy())
    table = reference_catalog("gaia", CENTRE, 0.1, CatalogSettings(cache_dir=str(tmp_path)))
    assert {"g_mag", "r_mag", "i_mag", "r_mag_err"} <= set(table.colnames)
    assert "u_mag" not in table.colnames and "z_mag" not in table.colnames
    assert list(table["mag"]) == [14.0, 15.0, 16.0]  # G still orders the stars
    expected, _ = gaia_sdss_magnitudes([14.0], [1.0], "r")
    assert table["r_mag"][0] == pytest.approx(expected[0])
    assert np.isnan(table["i_mag"][1])  # BP-RP 0.05: outside G-i's range
    assert np.isfinite(table["r_mag"][2]) and np.isnan(table["i_mag"][2])  # BP-RP 2.5
    assert table.meta["photsys"] == SOURCES["gaia"].photsys
    # the cache keeps the bands
    monkeypatch.setitem(catalogs._SERVICES, "mast", lambda *a: pytest.fail("queried again"))
    again = reference_catalog("gaia", CENTRE, 0.1, CatalogSettings(cache_dir=str(tmp_path)))
    assert np.allclose(again["r_mag"][:2], table["r_mag"][:2])


def test_a_file_declares_the_band_of_its_mag(lco_dir):
    path = lco_dir / "refcat-pds110.ecsv"
    plain = reference_catalog(str(path))
    assert "r_mag" not in plain.colnames  # instrumental, arbitrary zero point: no band
    declared = reference_catalog(str(path), settings=CatalogSettings(mag_band="r"))
    assert np.array_equal(declared["r_mag"], declared["mag"])
    assert declared.meta["photsys"] == "refcat-pds110.ecsv mag as r (declared)"
    assert photometric_system("gaia") == SOURCES["gaia"].photsys


def test_a_file_with_band_columns(tmp_path):
    Table({"ra": [1.0, 1.1], "dec": [2.0, 2.1], "r_mag": [15.0, 14.0], "r_mag_err": [0.01, 0.02],
           "Gmag": [15.2, 14.1]}).write(tmp_path / "c.ecsv")
    table = load_catalog(tmp_path / "c.ecsv")
    assert list(table["r_mag"]) == [14.0, 15.0] and list(table["r_mag_err"]) == [0.02, 0.01]
    assert "g_mag" not in table.colnames  # Gaia's G is not the g band


# -- the services, served on 127.0.0.1 ---------------------------------------------------
PS1_COLUMNS = ["objID", "raMean", "decMean", "nDetections"] + [
    f"{b}{kind}" for b in "grizy" for kind in ("MeanPSFMag", "MeanPSFMagErr")]


def _url(server) -> str:
    return f"http://127.0.0.1:{server.port}"


def test_panstarrs_query_against_a_local_server(httpserver, monkeypatch, tmp_path):
    from astroquery.mast import Catalogs, conf
    from werkzeug import Response

    kinds = {c: "int" if c in ("objID", "nDetections") else "float" for c in PS1_COLUMNS}
    httpserver.expect_request("/api/v0.1/panstarrs/dr2/mean/metadata.json").respond_with_json(
        [{"column_name": c, "db_type": k, "description": c} for c, k in kinds.items()])
    rows = [[1, 150.0, 2.0, 5] + [15.0, 0.01, 14.6, 0.01, 14.4, 0.01, 14.3, 0.02, 14.2, 0.03],
            [2, 150.01, 2.01, 3] + [16.0, 0.02, -999.0, -999.0, 15.5, 0.02, 15.4, 0.03,
                                    15.3, 0.05]]
    requests = []

    def mean(request):
        requests.append(json.loads(request.get_data()))
        return Response(json.dumps({"info": [{"name": c, "type": k} for c, k in kinds.items()],
                                    "data": rows}), content_type="application/json")

    httpserver.expect_request("/api/v0.1/panstarrs/dr2/mean.json",
                              method="POST").respond_with_handler(mean)
    monkeypatch.setattr(Catalogs._service_api_connection, "REQUEST_URL",
                        _url(httpserver) + "/api/v0.1/")
    with conf.set_temp("catalogs_server", _url(httpserver)):
        table = reference_catalog("panstarrs", CENTRE, 0.1,
                                  CatalogSettings(cache_dir=str(tmp_path), retries=0))
    assert requests[0]["ra"] == pytest.approx(150.0) and requests[0]["radius"] == 0.1
    assert requests[0]["nDetections.gte"] == 2
    assert table["r_mag"][0] == 14.6 and np.isnan(table["r_mag"][1])  # -999: no r
    assert table["z_mag"][1] == 15.4 and table["g_mag_err"][0] == 0.01
    assert table.meta["photsys"] == "Pan-STARRS1 DR2 (AB)"


def test_refcat2_query_against_a_local_server(httpserver, monkeypatch, tmp_path):
    from astropy.io.votable import from_table
    from astroquery.vizier.core import VizierClass

    served = Table({"RA_ICRS": [150.0, 150.01], "DE_ICRS": [2.0, 2.01], "pmRA": [1.0, -2.0],
                    "pmDE": [0.5, 0.0], "gmag": [15.2, 16.1], "e_gmag": [0.01, 0.02],
                    "rmag": [14.8, 15.6], "e_rmag": [0.01, 0.02], "imag": [14.6, 15.4],
                    "e_imag": [0.01, 0.02], "zmag": [14.5, 15.3], "e_zmag": [0.01, 0.02]})
    votable = from_table(served)
    votable.resources[0].tables[0].name = catalogs.REFCAT2_VIZIER
    body = io.BytesIO()
    votable.to_xml(body)
    httpserver.expect_request("/viz-bin/votable", method="POST").respond_with_data(
        body.getvalue(), content_type="application/x-votable+xml")
    monkeypatch.setattr(VizierClass, "_server_to_url",
                        lambda self, return_type="votable": _url(httpserver) + "/viz-bin/votable")
    table = reference_catalog("refcat2", CENTRE, 0.1,
                              CatalogSettings(cache_dir=str(tmp_path), retries=0))
    posted = httpserver.log[0][0].get_data(as_text=True)
    assert f"-source={catalogs.REFCAT2_VIZIER}" in posted and "rmag=<19.00" in posted
    assert list(table["r_mag"]) == [14.8, 15.6] and list(table["z_mag_err"]) == [0.01, 0.02]
    assert table["pmra"][1] == -2.0 and table["ref_epoch"][0] == 2015.5
    assert table.meta["photsys"].startswith("ATLAS-RefCat2")


@pytest.mark.remote_data
@pytest.mark.parametrize("name", ["panstarrs", "refcat2", "gaia"])
def test_real_services_give_bands(name, tmp_path):
    pds110 = SkyCoord("05h23m31s", "-01d10m24s")
    table = reference_catalog(name, pds110, 0.1, CatalogSettings(cache_dir=str(tmp_path),
                                                                 mag_limit=17.0, retries=1))
    assert len(table) > 20
    assert np.isfinite(table["r_mag"]).sum() > 10


# -- aperture correction -----------------------------------------------------------------
def test_aperture_correction_reaches_the_total_flux():
    """Gaussian stars: the small aperture's loss is known exactly."""
    rng = np.random.default_rng(3)
    sigma, shape = 1.5, (200, 200)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    xs, ys = np.meshgrid(np.arange(30, 180, 30.0) + 0.3, np.arange(30, 180, 30.0) + 0.6)
    xs, ys = xs.ravel(), ys.ravel()
    flux = rng.uniform(2e4, 2e5, xs.size)
    image = np.full(shape, 100.0)
    for x0, y0, f in zip(xs, ys, flux, strict=True):
        image += f / (2 * np.pi * sigma**2) * np.exp(-((xx - x0)**2 + (yy - y0)**2)
                                                      / (2 * sigma**2))
    variance = image + 25.0
    image = image + rng.normal(0.0, np.sqrt(variance))
    radius = 1.5 * 2.355 * sigma
    correction = aperture_correction(image, xs, ys, radius, 8 * sigma, variance=variance)
    expected = 2.5 * np.log10(1 - np.exp(-radius**2 / (2 * sigma**2)))
    assert correction.n_stars == xs.size
    assert correction.correction == pytest.approx(expected, abs=3 * correction.error + 1e-3)
    small = aperture_photometry(image, xs, ys, radius, variance=variance,
                                annulus=(8 * sigma + 4, 8 * sigma + 10))
    total = small["flux"] * 10 ** (-0.4 * correction.correction)
    assert np.median(total / flux) == pytest.approx(1.0, abs=0.005)


# -- zero points against synthetic truth -------------------------------------------------
COLOUR_TERMS = {"rp": 0.04, "gp": -0.06}


@pytest.fixture(scope="module")
def calibrated_run(dask_client, tmp_path_factory):
    """Eight frames (four r', two g', two u') of stars with colours, a colour term per filter and an
    airmass from 1.05 to 2.0 (extinction 0.10 and 0.18 mag per airmass), combined on one
    zero point. The catalog is read as deep as the simulated sky (mag 20), so that the
    aperture correction's stars are known to be isolated."""
    from daskstack._pipeline import run
    from daskstack.simulate import simulate_field

    root = tmp_path_factory.mktemp("photcal")
    field = simulate_field(root / "inputs", n_frames=8, shape=(768, 768),
                           filters=("rp", "gp", "rp", "up"), seed=11, colours=True,
                           colour_term=COLOUR_TERMS, airmass_range=(1.05, 2.0),
                           extinction={"rp": 0.10, "gp": 0.18}, fwhm_range=(2.5, 3.2),
                           exptime=120.0)
    settings = (Settings().replace("catalog", mag_limit=20.5)
                .replace("combine", scale="photometric", method="mean"))
    result = run([str(p) for p in field.frames], str(field.catalog), root / "out", settings,
                 client=dask_client)
    assert result.n_combined == 8
    return field, result


def test_zero_points_recovered_from_synthetic_truth(calibrated_run):
    from daskstack._rundir import read_manifest
    from daskstack.store import open_store

    field, result = calibrated_run
    truth = {row["name"]: row for row in field.truth_table()}
    manifest = read_manifest(result.manifest)
    stack = open_store(result.store)
    calibrated = [row for row in manifest if row["filter"] != "up"]
    assert len(calibrated) == 6
    for row in calibrated:
        expected = truth[row["name"]]["zp_true"]
        assert abs(row["zp"] - expected) < 0.01, (row["name"], row["zp"], expected)
        assert abs(row["zp"] - expected) < 3 * row["zp_err"] + 0.002, row["name"]
        assert row["n_zp"] >= 30 and row["zp_band"] == filter_band(row["filter"])
        assert row["airmass"] == pytest.approx(truth[row["name"]]["airmass"], abs=1e-3)
        info = stack.frames[row["name"]]
        assert (info.zp, info.zp_err, info.n_zp) == (row["zp"], row["zp_err"], row["n_zp"])
    # what is recovered varies: extinction over 1.05-2.0 airmass and clouds (transparency)
    assert np.ptp([truth[row["name"]]["zp_true"] for row in calibrated
                   if row["filter"] == "rp"]) > 0.05
    for row in manifest:
        if row["filter"] == "up":  # the catalog has no u band: nothing invented
            assert np.isnan(row["zp"]) and row["n_zp"] == 0
            assert "no u-band magnitudes" in row["zp_reason"]


def test_coadd_on_one_zero_point_measures_true_magnitudes(calibrated_run):
    """Aperture photometry on the r' and g' coadds, calibrated with their MAGZP: bright
    stars within 0.01 mag of their true (natural-system) magnitudes, and errors that are
    the scatter (the coadd's ERR with its NOISECOR)."""
    from astropy.wcs import WCS

    from daskstack._rundir import read_manifest
    from daskstack.photcal import measure_frame_stars
    from daskstack.simulate import propagate

    field, result = calibrated_run
    with fits.open(result.coadds["up"]) as hdul:  # u': no zero point, no MAGZP
        assert "MAGZP" not in hdul[0].header
    truth = field.truth_table()
    manifest = read_manifest(result.manifest)
    all_pulls = []
    for filt in ("rp", "gp"):
        band = filter_band(filt)
        with fits.open(result.coadds[filt]) as hdul:
            header, image, err = hdul[0].header.copy(), hdul[0].data, hdul["ERR"].data
        assert header["PHOTSYS"] == "catalog.ecsv <band>_mag" and header["MAGBAND"] == band
        assert 0 < header["MAGZPERR"] < 0.01
        catalog = field.catalog_table()
        catalog["ra"], catalog["dec"] = propagate(catalog, float(np.mean(truth["epoch"])))
        catalog["mag"] = catalog[f"{band}_mag"]
        # the filter's natural system: the catalog band moved by the colour term
        catalog[f"{band}_mag"] = catalog[f"{band}_mag"] - COLOUR_TERMS[filt] * (
            catalog["g_mag"] - catalog["r_mag"])
        fwhm = float(np.median([r["fwhm_px"] for r in manifest if r["filter"] == filt]))
        stars, why = measure_frame_stars(
            image, ~np.isfinite(image), WCS(header), catalog, band, 1.0, fwhm,
            variance=err.astype(float) ** 2, correlation=header["NOISECOR"])
        assert stars is not None, why
        delta = stars.m_inst + header["MAGZP"] - stars.m_cat
        # stars brighter than 14 reach the saturation level in the best-seeing frames
        # (their coadd pixels then mix frames of different PSFs)
        unsaturated = stars.m_cat > 14.0
        bright = unsaturated & (stars.m_cat < 17.0)
        assert bright.sum() >= 5
        assert abs(np.median(delta[bright])) < 0.01, filt
        # the scatter about the common offset (MAGZP's and the aperture correction's
        # error), in units of each star's error
        all_pulls.append((delta - np.median(delta))[unsaturated] / stars.error[unsaturated])
    # one blend more than 5 sigma off is left out
    pulls = sigma_clip(np.concatenate(all_pulls), sigma=5.0)
    assert pulls.count() >= 150 and pulls.mask.sum() <= 2
    assert 0.9 < np.std(pulls.compressed()) < 1.1


# -- the real frames ---------------------------------------------------------------------
def test_real_frames_zero_points_agree_within_their_errors(lco_dir, lco_frames, dask_client,
                                                           tmp_path):
    """The PDS 110 r' frames against the shared catalog, whose `mag` is LCO's
    instrumental r (zero point 25, arbitrary), declared as the r band: the zero points
    are then on that instrumental system, not a standard one, and say how consistently
    the three r' exposures are measured. The g' frame has no g band to calibrate on."""
    from daskstack._pipeline import solve_files
    from daskstack._rundir import read_manifest

    frames = [p for p in lco_frames if any(f"-{n}-" in p.name for n in (1156, 1159, 1160, 1161))]
    solve_files([str(p) for p in frames], str(lco_dir / "refcat-pds110.ecsv"), tmp_path,
                Settings().replace("catalog", mag_band="r"), client=dask_client)
    manifest = read_manifest(tmp_path / "solve.ecsv")
    rp = manifest[manifest["filter"] == "rp"]
    assert len(rp) == 3 and np.all(rp["n_zp"] >= 30)
    zp, err = np.asarray(rp["zp"], float), np.asarray(rp["zp_err"], float)
    assert np.all(err < 0.02)
    mean = np.average(zp, weights=err**-2)
    chi2 = float(np.sum(((zp - mean) / err) ** 2))
    assert chi2 / (len(zp) - 1) < 3.0, (zp, err)
    gp = manifest[manifest["filter"] == "gp"][0]
    assert np.isnan(gp["zp"]) and "no g-band magnitudes" in gp["zp_reason"]
    assert "declared" in gp["zp_reason"]
    assert np.all(np.abs(manifest["airmass"] - 1.52) < 0.02)  # from the headers


def test_report_draws_zero_points_against_time_and_airmass(calibrated_run, tmp_path):
    from daskstack._report import zero_point_plots
    from daskstack._rundir import read_manifest

    _, result = calibrated_run
    table = read_manifest(result.manifest)
    info = zero_point_plots(table, tmp_path / "zero_points.png")
    assert info["n_frames"] == 6 and (tmp_path / "zero_points.png").stat().st_size > 1000
    assert zero_point_plots(table[table["filter"] == "up"], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_fit_zero_points_with_one_colour_term_and_an_outlier():
    from daskstack.photcal import FrameStars, fit_zero_points

    rng = np.random.default_rng(2)
    truth_zp, truth_term = [23.10, 22.95, 23.02], 0.07
    frames = []
    for zp in truth_zp:
        colour = rng.uniform(0.2, 1.4, 60)
        m_cat = rng.uniform(14, 18, 60)
        error = np.full(60, 0.01)
        m_inst = m_cat - zp - truth_term * colour + rng.normal(0, 0.01, 60)
        m_inst[0] += 0.5  # a variable star, or a blend
        frames.append(FrameStars(m_inst, m_cat, error, colour, correction_error=0.002))
    fits_ = fit_zero_points(frames, "r")
    for fit, zp in zip(fits_, truth_zp, strict=True):
        assert abs(fit.zp - zp) < 3 * fit.zp_err and fit.zp_err < 0.005
        assert 57 <= fit.n_zp <= 59  # the outlier clipped (and at most a 3-sigma star)
        assert fit.colour_term == pytest.approx(truth_term, abs=0.005)
    # without colours (or turned off): one frame's mean, the colour term left in it
    alone = fit_zero_points(frames[:1], "r", colour_term=False)[0]
    assert alone.colour_term == 0.0
    assert alone.zp == pytest.approx(truth_zp[0] + truth_term * np.mean(frames[0].colour),
                                     abs=0.01)
    few = FrameStars(frames[0].m_inst[:2], frames[0].m_cat[:2], frames[0].error[:2],
                     frames[0].colour[:2])
    assert "too few catalog stars" in fit_zero_points([few], "r")[0].reason
