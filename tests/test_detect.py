"""Detection: FWHM measured, photocentres as the LCO catalog's first moments, masks honoured."""

import warnings

import numpy as np
import pytest
from astropy.io import fits
from photutils.centroids import centroid_2dg, centroid_sources
from scipy.spatial import cKDTree

from daskstack import simulate
from daskstack.config import DetectSettings
from daskstack.detect import detect_sources
from daskstack.frames import Frame, read_frame


def test_real_frame_photocentres_and_fwhm(lco_dir):
    path = lco_dir / "ogg0m404-kb82-20170815-1160-e91.fits.fz"
    frame = read_frame(path)
    det = detect_sources(frame, DetectSettings())
    assert 100 < len(det) <= DetectSettings().max_stars
    assert det.n_raw >= len(det)
    assert abs(det.fwhm / frame.header["L1FWHM"] - 1) < 0.3
    assert 150 < det.background < 200 and 15 < det.noise < 30
    cat = fits.getdata(path, "CAT")
    good = cat["FLAG"] == 0
    tree = cKDTree(np.column_stack([cat["X"][good] - 1, cat["Y"][good] - 1]))  # 1-based
    bright = det.xy[:30]
    d, j = tree.query(bright, distance_upper_bound=2)
    assert np.isfinite(d).sum() >= 25
    # photocentres: bright stars agree with the catalog's first moments to < 0.1 px
    assert np.median(d[np.isfinite(d)]) < 0.1
    # and the table is brightest first
    assert np.all(np.diff(np.asarray(det.table["flux"])) <= 0)


def _frame(data, mask=None, saturate=np.inf):
    from daskstack.frames import FrameMeta

    meta = FrameMeta(path="x.fits", name="x", shape=data.shape, filter="rp", exptime=1.0,
                     date_obs=None, mjd=None, gain=1.0, rdnoise=5.0, saturate=saturate,
                     pixscale=1.0, ra=None, dec=None)
    mask = np.zeros(data.shape, bool) if mask is None else mask
    return Frame(meta=meta, data=data.astype(np.float32), mask=mask, header=fits.Header())


def test_no_stars_gives_empty_table():
    rng = np.random.default_rng(0)
    det = detect_sources(_frame(rng.normal(100, 5, (256, 256))), DetectSettings())
    assert len(det) == 0 and np.isnan(det.fwhm)
    assert abs(det.background - 100) < 1 and abs(det.noise - 5) < 0.5


def test_masked_and_saturated_stars_are_not_selected():
    rng = np.random.default_rng(1)
    data = rng.normal(100, 5, (300, 300))
    yy, xx = np.mgrid[:300, :300]
    pos = [(50.3, 60.7), (150.0, 150.0), (220.6, 80.2), (100.0, 240.0)]
    for x, y in pos:
        data += 5000 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 1.4**2))
    mask = np.zeros(data.shape, bool)
    mask[150, 150] = True  # BPM on star 2
    data[240, 100] = 2e5  # star 4 saturated
    mask |= data >= 1e5
    det = detect_sources(_frame(data, mask, saturate=1e5), DetectSettings())
    xy = det.xy
    assert len(det) == 2
    for x, y in (pos[0], pos[2]):
        assert np.min(np.hypot(xy[:, 0] - x, xy[:, 1] - y)) < 0.05  # 0-based photocentre
    assert abs(det.fwhm - 2.3548 * 1.4) < 0.3


def test_real_frame_isophotal_positions_match_sextractor(lco_dir):
    """Faint stars too: the positions are isophotal barycentres like the CAT's X, Y.

    Aperture first moments put faint stars of these asymmetric PSFs ~0.4-0.5 px away from
    LCO's (SExtractor) positions, on which the reference catalog is built."""
    path = lco_dir / "ogg0m404-kb82-20170815-1157-e91.fits.fz"
    det = detect_sources(read_frame(path), DetectSettings())
    cat = fits.getdata(path, "CAT")
    tree = cKDTree(np.column_stack([cat["X"] - 1, cat["Y"] - 1]))
    snr = np.asarray(det.table["snr"])
    for cols, limit in ((("x", "y"), 0.2), (("x_ap", "y_ap"), None)):
        xy = np.column_stack([np.asarray(det.table[c], float) for c in cols])
        d, j = tree.query(xy, distance_upper_bound=2)
        faint = np.isfinite(d) & (snr < 60)
        assert faint.sum() >= 30
        off = xy[faint] - np.column_stack([cat["X"] - 1, cat["Y"] - 1])[j[faint]]
        if limit is not None:
            assert np.median(d[faint]) < limit
            assert np.all(np.abs(off.mean(axis=0)) < 0.1), off.mean(axis=0)  # no bias
        else:  # the aperture photocentres of the same stars: biased (why isophotal is used)
            assert np.abs(off.mean(axis=0)).max() > 0.2


def test_isophotal_centroids_unbiased_on_symmetric_stars():
    from daskstack.detect import isophotal_centroids

    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:200, :200]
    true = rng.uniform(20, 180, (12, 2))
    data = rng.normal(100, 5, (200, 200))
    for x, y in true:
        data += 400 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 1.5**2))
    mask = np.zeros(data.shape, bool)
    start = true + rng.uniform(-0.7, 0.7, true.shape)
    xi, yi, npix = isophotal_centroids(data, mask, start[:, 0], start[:, 1],
                                       np.full(12, 100.0), np.full(12, 5.0), 3.5, 10.0)
    assert np.all(npix > 5)
    err = np.hypot(xi - true[:, 0], yi - true[:, 1])
    assert np.median(err) < 0.05 and err.max() < 0.15, err


@pytest.mark.parametrize("psf", ["asymmetric", "comatic", "trailed"])
def test_photocentres_recover_truth_where_a_symmetric_fit_is_biased(psf):
    """Asymmetric PSFs (as on the LCO 0.4 m frames), truth = photocentres: the isophotal
    barycentres of bright stars sit on the truth, photutils' centroid_2dg (a symmetric
    2-D Gaussian fit) sits a quarter pixel or more off, always in the same direction."""
    shape = (600, 600)
    wcs = simulate.true_frame_wcs((80.9, -1.17), shape, 1.14)
    catalog = simulate.make_catalog((80.9, -1.17), 0.17, density_per_sq_deg=6000,
                                    mag_range=(11.0, 17.0), seed=4)
    data, _, info = simulate.render_frame(catalog, wcs, shape, fwhm_px=2.8, psf=psf, sky=180.0,
                                          exptime=12.0, zeropoint=23.5, rdnoise=16.0, rng=2)
    det = detect_sources(_frame(data), DetectSettings())
    truth = np.column_stack([info["x"], info["y"]])
    d, j = cKDTree(truth).query(det.xy, distance_upper_bound=2.0)
    bright = np.isfinite(d) & (np.asarray(det.table["snr"]) > 200)
    assert bright.sum() >= 15
    ours = np.median(det.xy[bright] - truth[j[bright]], axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fit warnings of faint stars
        gx, gy = centroid_sources(data - 180.0, det.table["x_ap"][bright],
                                  det.table["y_ap"][bright], box_size=11,
                                  centroid_func=centroid_2dg)
    theirs = np.median(np.column_stack([gx, gy]) - truth[j[bright]], axis=0)
    assert np.hypot(*ours) < 0.1, ours
    assert np.hypot(*theirs) > 0.25, theirs
    assert np.hypot(*theirs) > 3 * np.hypot(*ours)


def test_detection_constants_are_validated_toml_settings(tmp_path):
    from daskstack.config import Settings, SettingsError

    path = tmp_path / "s.toml"
    path.write_text("[detect]\niso_threshold_sigma = 5\niso_radius_fwhm = 2.5\n"
                    "sharp_fwhm_ratio = 0.6\ncrowd_flux_ratio = 0.2\n")
    settings = Settings.from_toml(path).validate()
    assert settings.detect.iso_threshold_sigma == 5.0
    assert settings.detect.iso_radius_fwhm == 2.5
    assert settings.detect.sharp_fwhm_ratio == 0.6 and settings.detect.crowd_flux_ratio == 0.2
    for name, value in [("iso_threshold_sigma", 0), ("iso_radius_fwhm", 0.5),
                        ("sharp_fwhm_ratio", 1.2), ("sharp_peak_fraction", 0),
                        ("crowd_flux_ratio", -0.1), ("crowd_aperture_flux_ratio", 2)]:
        with pytest.raises(SettingsError, match=f"detect.{name}"):
            Settings.from_dict({"detect": {name: value}}).validate()


def test_isophote_settings_change_the_positions():
    """The isophote is used: a higher one moves the faint stars' positions (and only
    by a fraction of a pixel)."""
    shape = (300, 300)
    wcs = simulate.true_frame_wcs((80.9, -1.17), shape, 1.14)
    catalog = simulate.make_catalog((80.9, -1.17), 0.1, density_per_sq_deg=6000,
                                    mag_range=(12.0, 18.0), seed=5)
    data, _, _ = simulate.render_frame(catalog, wcs, shape, fwhm_px=2.8, psf="comatic",
                                       sky=180.0, exptime=12.0, zeropoint=23.5, rng=3)
    low = detect_sources(_frame(data), DetectSettings())
    high = detect_sources(_frame(data), DetectSettings(iso_threshold_sigma=8.0))
    assert np.array_equal(low.table["x_ap"], high.table["x_ap"])  # same stars
    shift = np.hypot(*(low.xy - high.xy).T)
    assert 0.02 < np.median(shift) < 1.0
