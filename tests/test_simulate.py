"""Synthetic LCO frames: readable like real ones, and their truth is really true."""

from __future__ import annotations

import re
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from photutils.centroids import centroid_2dg, centroid_com

from daskstack import simulate as sim
from daskstack.frames import quiet_astropy, read_frame, read_meta

SHAPE = (256, 256)
CENTER = (150.1, 2.2)


def _catalog(ra, dec, mag, pmra=None, pmdec=None):
    n = len(ra)
    return Table({
        "source_id": np.arange(n, dtype=np.int64), "ra": np.asarray(ra, float),
        "dec": np.asarray(dec, float), "phot_g_mean_mag": np.full(n, mag, float),
        "pmra": np.zeros(n) if pmra is None else np.asarray(pmra, float),
        "pmdec": np.zeros(n) if pmdec is None else np.asarray(pmdec, float),
        "parallax": np.zeros(n), "ref_epoch": np.full(n, 2016.0),
    })


def _measure(data, x, y, sky, radius=15):
    """Centroid (first moment) and aperture flux of a star near (x, y), sky known."""
    ix, iy = int(round(x)), int(round(y))
    cut = data[iy - radius:iy + radius + 1, ix - radius:ix + radius + 1].astype(float) - sky
    cx, cy = centroid_com(cut)
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    flux = cut[(xx + ix - x) ** 2 + (yy + iy - y) ** 2 < radius**2].sum()
    return cx + ix - radius, cy + iy - radius, flux


@pytest.fixture(scope="module")
def field(tmp_path_factory):
    out = tmp_path_factory.mktemp("simfield")
    return sim.simulate_field(out, n_frames=3, shape=SHAPE, filters=("rp", "gp"), seed=7,
                              sip=True, sip_amplitude_px=3.0, cosmic_rays=4, bad_columns=3,
                              hot_pixels=5, satellite_trail_frame=2, rotation_error_deg=0.3,
                              pointing_error_arcmin=1.0)


# -- catalog ----------------------------------------------------------------------------
def test_catalog_is_gaia_like_with_realistic_counts():
    cat = sim.make_catalog(CENTER, 0.3, seed=1, density_per_sq_deg=20000,
                           high_pm_fraction=0.02, max_pm_mas=800)
    for col in ("source_id", "ra", "dec", "phot_g_mean_mag", "pmra", "pmdec", "parallax",
                "ref_epoch"):
        assert col in cat.colnames
    area = 2 * np.pi * (1 - np.cos(np.radians(0.3))) * (180 / np.pi) ** 2
    assert abs(len(cat) - 20000 * area) < 5 * np.sqrt(20000 * area)
    assert len(np.unique(cat["source_id"])) == len(cat)
    sep = SkyCoord(cat["ra"], cat["dec"]).separation(SkyCoord(*CENTER, unit="deg")).deg
    assert sep.max() <= 0.3 + 1e-9 and np.median(sep) > 0.3 * 0.6  # uniform in the disc
    mag = np.asarray(cat["phot_g_mean_mag"])
    assert mag.min() >= 10 and mag.max() <= 20
    ratio = np.sum((mag > 19) & (mag <= 20)) / np.sum((mag > 18) & (mag <= 19))
    assert 1.6 < ratio < 2.5  # counts rise ~10**(0.3 m)
    speed = np.hypot(cat["pmra"], cat["pmdec"])
    assert 0.005 < np.mean(speed > 200) < 0.04 and speed.max() <= 800
    assert np.all(cat["ref_epoch"] == 2016.0)
    again = sim.make_catalog(CENTER, 0.3, seed=1, density_per_sq_deg=20000,
                             high_pm_fraction=0.02, max_pm_mas=800)
    assert np.array_equal(cat["ra"], again["ra"])


# -- files ------------------------------------------------------------------------------
def test_field_files_read_like_lco_frames(field):
    truth = Table.read(field.truth)
    assert len(field.frames) == 3 and len(truth) == 3
    assert Table.read(field.catalog)["ref_epoch"][0] == 2016.0
    for i, path in enumerate(field.frames):
        assert re.fullmatch(r"lsc1m009-fa15-\d{8}-\d{4}-e91\.fits\.fz", path.name)
        frame = read_frame(path)
        meta = read_meta(path)
        row = truth[i]
        assert meta.name == row["name"] == frame.name
        assert frame.data.shape == SHAPE and frame.data.dtype == np.float32
        assert meta.filter == ("rp", "gp")[i % 2] == row["filter"]
        assert meta.exptime == row["exptime"] and meta.gain == 1.0 and meta.rdnoise == 7.0
        assert meta.saturate == 120000.0 and meta.pixscale == 0.389 and meta.wcserr == 4
        assert meta.site == "lsc" and meta.instrument == "fa15" and meta.binning == 1
        assert abs(meta.mjd - row["mjd"]) < 1e-6
        assert frame.header["RLEVEL"] == 91 and frame.header["OBSTYPE"] == "EXPOSE"
        assert isinstance(frame.header["RA"], str) and ":" in frame.header["DEC"]
        # the RA/DEC pointing is the header WCS centre
        hwcs = meta.header_wcs()
        assert abs(meta.ra - hwcs.wcs.crval[0]) < 1e-5 and abs(meta.dec - hwcs.wcs.crval[1]) < 1e-5
        # bad columns are masked, everywhere on their rows; the BPM is the same in every frame
        with fits.open(path) as hdul:
            assert [h.name for h in hdul] == ["PRIMARY", "SCI", "BPM"]
            assert hdul["SCI"].compression_type == "RICE_1"
            bpm = hdul["BPM"].data
        columns = [int(c) for c in str(row["bad_columns"]).split()]
        assert len(columns) == 3
        for c in columns:
            assert bpm[:, c].any() and frame.mask[bpm[:, c] != 0, c].all()
        if i == 0:
            first_bpm = bpm
        assert np.array_equal(bpm, first_bpm)
        assert 0.001 < frame.mask.mean() < 0.05
        # sky level and noise as the truth says
        good = frame.data[~frame.mask]
        assert abs(np.median(good) - row["sky"]) < 0.1 * row["sky"]
        wcs = field.wcs(path)
        assert wcs.sip is not None and wcs.wcs.ctype[0] == "RA---TAN-SIP"


def test_realistic_artefacts_not_in_bpm(tmp_path):
    cat = sim.make_catalog(CENTER, 0.05, seed=2, density_per_sq_deg=1.0)  # ~no stars
    wcs = sim.true_frame_wcs(CENTER, SHAPE, 0.389)
    data, bpm, info = sim.render_frame(cat, wcs, SHAPE, sky=100.0, rng=4, n_cosmic_rays=10,
                                       satellite_trail=2000.0, bad_columns=2, hot_pixels=3)
    assert len(info["cosmic_rays"]) == 10 and info["trail"] is not None
    # the BPM holds the detector defects only: bad columns and hot pixels
    defects = np.zeros(SHAPE, bool)
    for c, r0, r1 in info["bad_columns"]:
        defects[r0:r1, c] = True
    defects[info["hot_pixels"]] = True
    assert np.array_equal(bpm != 0, defects) and len(info["hot_pixels"][0]) == 3
    for rows, cols in info["cosmic_rays"]:
        assert 1 <= len(rows) <= 8
        hit = ~defects[rows, cols]
        assert data[rows, cols][hit].max() > 100.0 + 10 * 12  # sharp and bright
        neighbours = data[np.clip(rows + 3, 0, 255), cols][hit]
        assert np.median(neighbours) < 100 + 4 * 12
    t = info["trail"]
    assert data[int(round(t["y0"])), int(round(t["x0"]))] > 100 + 0.5 * 2000
    assert not bpm[int(round(t["y0"])), int(round(t["x0"]))]
    assert len(info["bad_columns"]) == 2 and bpm.sum() >= 3
    path = sim.write_lco_frame(tmp_path / "a-e91.fits.fz", data, bpm,
                               sim.lco_header(wcs, SHAPE, rng=1))
    frame = read_frame(path)
    assert np.array_equal(frame.mask, bpm != 0)
    assert np.allclose(frame.data, data, atol=12.0 / 16)  # quantisation below noise/16 * ~1


# -- astrometric truth ------------------------------------------------------------------
def test_truth_wcs_places_stars_to_hundredths_of_a_pixel_with_sip():
    sip = sim.random_sip(SHAPE, 4.0, rng=np.random.default_rng(5))
    wcs = sim.true_frame_wcs(CENTER, SHAPE, 0.389, rotation_deg=25.0, sip=sip)
    xs, ys = np.meshgrid([30.0, 128.3, 225.7], [30.6, 128.0, 226.2])
    ra, dec = wcs.all_pix2world(xs.ravel(), ys.ravel(), 0)
    cat = _catalog(ra, dec, 13.0)
    data, bpm, info = sim.render_frame(cat, wcs, SHAPE, epoch=2016.0, fwhm_px=3.0, sky=150.0,
                                       exptime=30.0, zeropoint=23.5, rng=3)
    assert len(info["x"]) == 9 and not info["saturated"].any()
    assert np.allclose(info["x"], xs.ravel(), atol=1e-4)
    assert np.allclose(info["y"], ys.ravel(), atol=1e-4)
    lin_x, lin_y = wcs.wcs_world2pix(ra, dec, 0)  # without SIP
    assert np.hypot(lin_x - xs.ravel(), lin_y - ys.ravel()).max() > 1.0  # SIP matters here
    for x, y in zip(info["x"], info["y"], strict=False):
        cx, cy, _ = _measure(data, x, y, 150.0)
        assert np.hypot(cx - x, cy - y) < 0.05
    # the truth WCS file round-trips, SIP and all
    header = fits.Header()
    header.extend(wcs.to_header(relax=True))
    back = WCS(header)
    assert np.allclose(back.all_world2pix(ra, dec, 0), [xs.ravel(), ys.ravel()], atol=1e-4)


def test_header_wcs_is_wrong_as_requested(field):
    truth = Table.read(field.truth)
    for path, row in zip(field.frames, truth, strict=False):
        with quiet_astropy():  # NAXIS=0 in a header-only file: astropy warns, harmlessly
            true = WCS(fits.getheader(field.truth_wcs[row["name"]]))
        head = read_meta(path).header_wcs()
        centre = (SHAPE[1] - 1) / 2.0, (SHAPE[0] - 1) / 2.0
        sep = true.pixel_to_world(*centre).separation(head.pixel_to_world(*centre)).arcsec
        assert abs(sep - 60.0) < 0.5
        east, north = true.pixel_to_world(*centre).spherical_offsets_to(
            head.pixel_to_world(*centre))
        assert east.arcsec == pytest.approx(row["pointing_error_east_arcsec"], abs=0.05)
        assert north.arcsec == pytest.approx(row["pointing_error_north_arcsec"], abs=0.05)
        assert np.hypot(row["pointing_error_east_arcsec"], row["pointing_error_north_arcsec"]) \
            == pytest.approx(60.0)
        # rotation between the CD matrices
        rel = np.linalg.solve(true.pixel_scale_matrix, head.pixel_scale_matrix)
        angle = np.degrees(np.arctan2(rel[1, 0], rel[0, 0]))
        assert abs(abs(angle) - 0.3) < 0.01 and angle == pytest.approx(row["rotation_error_deg"])
        assert np.linalg.det(rel) == pytest.approx(1.0, abs=1e-6)
    # a nominal WCS rotated by 180 degrees and 2% off in scale, 90" off to the east
    wcs = sim.true_frame_wcs(CENTER, SHAPE, 0.389, rotation_deg=90.0)
    header = sim.lco_header(wcs, SHAPE, pointing_offset_arcsec=(90.0, 0.0), rotation_error_deg=0,
                            scale_error=0.02, rotate_180=True)
    head = WCS(header)
    rel = np.linalg.solve(wcs.wcs.cd, head.wcs.cd)
    assert np.allclose(rel, -1.02 * np.eye(2), atol=1e-9)
    offset = wcs.pixel_to_world(127.5, 127.5).spherical_offsets_to(head.pixel_to_world(127.5, 127.5))
    assert offset[0].arcsec == pytest.approx(90.0, abs=0.01) and abs(offset[1].arcsec) < 0.01
    assert header["WCSERR"] == 4
    exact = sim.lco_header(wcs, SHAPE, pointing_offset_arcsec=(0, 0), rotation_error_deg=0)
    assert exact["WCSERR"] == 0 and np.allclose(WCS(exact).wcs.cd, wcs.wcs.cd)


def test_proper_motion_moves_stars_between_epochs():
    wcs = sim.true_frame_wcs(CENTER, SHAPE, 0.389)
    ra, dec = wcs.all_pix2world([100.0, 180.0], [128.0, 60.0], 0)
    cat = _catalog(ra, dec, 13.5, pmra=[1500.0, 0.0], pmdec=[-600.0, 0.0])  # mas/yr
    kwargs = dict(fwhm_px=3.0, sky=100.0, exptime=30.0, zeropoint=23.5)
    a, _, ia = sim.render_frame(cat, wcs, SHAPE, epoch=2016.0, rng=1, **kwargs)
    b, _, ib = sim.render_frame(cat, wcs, SHAPE, epoch="2026-01-01T00:00:00", rng=2, **kwargs)
    dt = 2026.0 - 2016.0 + 0.0007  # 2026-01-01 as a Julian year
    # east is -x, north +y for rotation 0
    expected = np.array([-1.5 * dt, -0.6 * dt]) / 0.389
    moved = np.array([ib["x"][0] - ia["x"][0], ib["y"][0] - ia["y"][0]])
    assert np.allclose(moved, expected, atol=0.02)
    xa, ya, _ = _measure(a, ia["x"][0], ia["y"][0], 100.0)
    xb, yb, _ = _measure(b, ib["x"][0], ib["y"][0], 100.0)
    assert np.allclose([xb - xa, yb - ya], expected, atol=0.08)
    xa, ya, _ = _measure(a, ia["x"][1], ia["y"][1], 100.0)
    xb, yb, _ = _measure(b, ib["x"][1], ib["y"][1], 100.0)
    assert np.hypot(xb - xa, yb - ya) < 0.08  # the slow star stays


# -- photometric truth ------------------------------------------------------------------
def test_star_flux_follows_the_photometric_model():
    wcs = sim.true_frame_wcs(CENTER, SHAPE, 0.389)
    xs, ys = np.meshgrid([50.2, 128.7, 200.1], [60.4, 190.9])
    ra, dec = wcs.all_pix2world(xs.ravel(), ys.ravel(), 0)
    cat = _catalog(ra, dec, 14.0)
    gain, exptime, transparency, zp = 2.0, 45.0, 0.9, 23.2
    data, _, info = sim.render_frame(cat, wcs, SHAPE, fwhm_px=3.5, sky=80.0, gain=gain,
                                     exptime=exptime, transparency=transparency, zeropoint=zp,
                                     rng=9)
    expected = exptime * transparency * 10 ** (-0.4 * (14.0 - zp)) / gain  # ADU
    assert np.allclose(info["flux"], expected)
    for x, y in zip(info["x"], info["y"], strict=False):
        _, _, flux = _measure(data, x, y, 80.0, radius=20)
        assert flux == pytest.approx(expected, rel=0.03)


def test_bright_stars_saturate_and_are_masked(tmp_path):
    wcs = sim.true_frame_wcs(CENTER, SHAPE, 0.389)
    ra, dec = wcs.all_pix2world([128.0], [128.0], 0)
    data, bpm, info = sim.render_frame(_catalog(ra, dec, 9.0), wcs, SHAPE, sky=100.0,
                                       saturate=60000.0, rng=1)
    assert info["saturated"][0] and data.max() == 60000.0
    assert np.array_equal(bpm == 2, data >= 60000.0)  # flagged as LCO does
    path = sim.write_lco_frame(tmp_path / "sat-e91.fits.fz", data, bpm,
                               sim.lco_header(wcs, SHAPE, saturate=60000.0, rng=1))
    frame = read_frame(path)
    assert frame.mask[128, 128] and frame.mask.sum() == np.sum(data >= 60000.0) > 4


@pytest.mark.parametrize("sky,gain,rdnoise", [(200.0, 2.0, 10.0), (4.0, 1.0, 3.0)])
def test_noise_of_empty_sky(sky, gain, rdnoise):
    cat = _catalog([], [], 15.0)
    wcs = sim.true_frame_wcs(CENTER, SHAPE, 0.389)
    data, _, info = sim.render_frame(cat, wcs, SHAPE, sky=sky, gain=gain, rdnoise=rdnoise, rng=11)
    expected = np.sqrt(sky * gain + rdnoise**2) / gain
    assert info["noise"] == pytest.approx(expected)
    assert np.std(data) == pytest.approx(expected, rel=0.02)
    assert np.mean(data) == pytest.approx(sky, abs=3 * expected / 256)


# -- determinism ------------------------------------------------------------------------
def test_same_seed_same_pixels_other_seed_other_pixels(tmp_path):
    kwargs = dict(n_frames=2, shape=(128, 160), cosmic_rays=3, satellite_trail_frame=1)
    a = sim.simulate_field(tmp_path / "a", seed=3, **kwargs)
    b = sim.simulate_field(tmp_path / "b", seed=3, **kwargs)
    c = sim.simulate_field(tmp_path / "c", seed=4, **kwargs)
    assert [p.name for p in a.frames] == [p.name for p in b.frames]
    for pa, pb, pc in zip(a.frames, b.frames, c.frames, strict=False):
        fa, fb, fc = read_frame(pa), read_frame(pb), read_frame(pc)
        assert fa.data.shape == (128, 160)
        assert np.array_equal(fa.data, fb.data) and np.array_equal(fa.mask, fb.mask)
        assert pa.read_bytes() == pb.read_bytes()
        assert not np.array_equal(fa.data, fc.data)
    assert a.catalog.read_text() == b.catalog.read_text() != c.catalog.read_text()
    assert a.truth.read_text() == b.truth.read_text()
    # frames rendered in another process (as benchmarks do) are the same bytes
    with ProcessPoolExecutor(max_workers=1) as executor:
        d = sim.simulate_field(tmp_path / "d", seed=3, executor=executor, **kwargs)
    assert [p.read_bytes() for p in d.frames] == [p.read_bytes() for p in a.frames]


def test_header_keywords_match_a_real_lco_frame(lco_frames):
    real = fits.getheader(lco_frames[0], "SCI")
    wcs = sim.true_frame_wcs(CENTER, SHAPE, 0.389)
    ours = sim.lco_header(wcs, SHAPE, rng=0)
    for key in ("DATE-OBS", "MJD-OBS", "EXPTIME", "FILTER", "RA", "DEC", "SITEID", "TELESCOP",
                "INSTRUME", "GAIN", "RDNOISE", "SATURATE", "PIXSCALE", "WCSERR", "CCDSUM",
                "OBJECT", "RLEVEL", "OBSTYPE", "L1FWHM", "DAY-OBS", "CTYPE1", "CD1_1", "CRPIX1"):
        assert key in ours
        assert type(ours[key]) is type(real[key]) or {type(ours[key]), type(real[key])} <= {
            int, float}, key
    assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3}", ours["RA"])
    assert re.fullmatch(r"[+-]\d\d:\d\d:\d\d\.\d{2}", ours["DEC"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}", ours["DATE-OBS"])


def test_sky_gradient():
    wcs = sim.true_frame_wcs(CENTER, SHAPE, 0.389)
    data, _, _ = sim.render_frame(_catalog([], [], 15.0), wcs, SHAPE, sky=300.0,
                                  sky_gradient=(0.2, -0.1), rng=0)
    left, right = np.median(data[:, :16]), np.median(data[:, -16:])
    bottom, top = np.median(data[:16, :]), np.median(data[-16:, :])
    assert right - left == pytest.approx(0.2 * 300 * 240 / 255, abs=3.0)
    assert top - bottom == pytest.approx(-0.1 * 300 * 240 / 255, abs=3.0)


@pytest.mark.parametrize("psf", ["asymmetric", "comatic", "trailed"])
def test_asymmetric_psfs_have_their_photocentre_at_the_catalog_position(psf):
    """Noise-free stars: the first moment of the whole profile is the catalog position,
    while a symmetric Gaussian fit sits away from it (the profile really is lopsided)."""
    wcs = sim.true_frame_wcs(CENTER, SHAPE, 0.389, rotation_deg=10.0)
    xs, ys = np.meshgrid([60.3, 128.0, 195.6], [60.7, 128.2, 195.1])
    ra, dec = wcs.all_pix2world(xs.ravel(), ys.ravel(), 0)
    data, _, info = sim.render_frame(_catalog(ra, dec, 13.0), wcs, SHAPE, epoch=2016.0,
                                     fwhm_px=3.0, psf=psf, sky=150.0, exptime=30.0,
                                     zeropoint=23.5, noise=False, rng=0)
    for x, y in zip(info["x"], info["y"], strict=True):
        cx, cy, _ = _measure(data, x, y, 150.0, radius=25)
        assert np.hypot(cx - x, cy - y) < 0.02
        ix, iy = int(round(x)), int(round(y))
        gx, gy = centroid_2dg(data[iy - 5:iy + 6, ix - 5:ix + 6] - 150.0)
        assert np.hypot(gx - 5 + ix - x, gy - 5 + iy - y) > 0.25


def test_psf_components_are_centred_and_named_shapes_only():
    w, dx, dy, width = sim.psf_components("comatic", 3.0, angle_deg=30.0)
    assert w.sum() == pytest.approx(1.0)
    assert np.sum(w * dx) == pytest.approx(0.0, abs=1e-12)
    assert np.sum(w * dy) == pytest.approx(0.0, abs=1e-12)
    assert np.all(width > 0)
    with pytest.raises(ValueError, match="not one of"):
        sim.psf_components("doughnut", 3.0)
