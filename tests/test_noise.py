"""Noise travels with the signal: the noise model, its registration with the squared
kernel weights (bilinear, Lanczos), its combination by every method, and the coadd's
ERR checked against synthetic truth (issue 15, "Must show") and real frames."""

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from daskstack._stats import sky_level
from daskstack.combine import combine_stack, median_variance_factor
from daskstack.config import RegisterSettings
from daskstack.frames import read_frame
from daskstack.grid import Grid
from daskstack.noise import frame_noise_model, frame_variance
from daskstack.register import KERNELS, noise_correlation, register_frame
from daskstack.simulate import make_catalog, render_frame, true_frame_wcs

from .helpers import tan_wcs

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "lco-pds110"


def assemble(tiles, shape):
    """(data, variance, kernel power) of a frame's registered tiles on the grid."""
    planes = [np.full(shape, np.nan, np.float32) for _ in range(3)]
    for t in tiles:
        sl = np.s_[t.y0:t.y0 + t.data.shape[0], t.x0:t.x0 + t.data.shape[1]]
        for plane, values in zip(planes, (t.data, t.variance, t.kernel_power), strict=True):
            plane[sl] = values
    return planes


# -- A: the noise model ---------------------------------------------------------------------
def test_poisson_and_read_noise_model():
    rng = np.random.default_rng(1)
    sky, rn, gain = 400.0, 9.0, 2.0  # sky in electrons; frame in ADU
    data = (rng.poisson(sky, (200, 200)) + rng.normal(0, rn, (200, 200))) / gain
    mask = np.zeros(data.shape, bool)
    mask[10, 10] = True
    data[20, 20] = np.nan
    variance = frame_variance(data, mask, electrons_per_unit=gain, rdnoise_e=rn)
    expected = (sky + rn**2) / gain**2
    assert np.nanmedian(variance) == pytest.approx(expected, rel=0.01)
    assert np.nanstd(data) ** 2 == pytest.approx(expected, rel=0.03)
    assert np.isnan(variance[10, 10]) and np.isnan(variance[20, 20])
    assert np.isfinite(variance).sum() == data.size - 2


def test_error_extension_is_the_noise(tmp_path):
    """A frame with an ERR extension: its square is the variance; MAXLIN below SATURATE
    masks; gain and read noise come from alternative keywords."""
    rng = np.random.default_rng(2)
    data = rng.normal(100, 5, (64, 64)).astype(np.float32)
    data[5, 5] = 900.0
    err = np.full(data.shape, 5.0, np.float32)
    err[7, 7] = 0.0
    header = fits.Header({"EGAIN": 1.7, "RON": 4.5, "SATURATE": 1000.0, "MAXLIN": 800.0})
    path = tmp_path / "frame.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(data, header, name="SCI"),
                  fits.ImageHDU(err, name="ERR")]).writeto(path)
    frame = read_frame(path)
    assert frame.meta.gain == 1.7 and frame.meta.gain_keyword == "EGAIN"
    assert frame.meta.rdnoise == 4.5 and frame.meta.rdnoise_keyword == "RON"
    assert frame.meta.linear_limit == 800.0 and frame.meta.saturate == 1000.0
    assert not frame.mask[5, 5]  # non-linear, not saturated: the astrometry may use it
    variance, how = frame_noise_model(frame)
    assert how["source"] == "ERR"
    assert variance[0, 0] == pytest.approx(25.0)
    assert np.isnan(variance[5, 5]) and np.isnan(variance[7, 7])


def test_read_noise_from_the_sky_when_no_keyword(tmp_path):
    rng = np.random.default_rng(4)
    rn = 12.0
    data = (rng.poisson(300.0, (300, 300)) + rng.normal(0, rn, (300, 300))).astype(np.float32)
    path = tmp_path / "plain.fits"
    fits.PrimaryHDU(data, fits.Header({"BUNIT": "electron"})).writeto(path)
    frame = read_frame(path)
    variance, how = frame_noise_model(frame)
    assert how["rdnoise_source"] == "sky scatter"
    assert how["rdnoise"] == pytest.approx(rn, rel=0.1)
    _, override = frame_noise_model(frame, rdnoise=3.0)
    assert override["rdnoise"] == 3.0 and override["rdnoise_source"] == "option"
    assert np.sqrt(np.nanmedian(variance)) == pytest.approx(np.std(data), rel=0.02)


# -- B, D: registration with the squared weights ----------------------------------------------
@pytest.fixture(scope="module")
def noise_frame():
    """Pure white noise of known variance, and a grid rotated and shifted from it."""
    shape = (300, 300)
    rng = np.random.default_rng(5)
    data = rng.normal(0.0, 3.0, shape).astype(np.float32)
    frame_wcs = tan_wcs(shape)
    grid_wcs = tan_wcs((250, 250), ra=150.00003, dec=2.00002, rotation_deg=17.0)
    return data, np.full(shape, 9.0, np.float32), frame_wcs, Grid.from_wcs(grid_wcs, (250, 250))


@pytest.mark.parametrize("order", list(KERNELS))
@pytest.mark.parametrize("fast", [True, False])
def test_registered_variance_is_the_scatter(noise_frame, order, fast):
    """Every kernel, fast and exact path: each output pixel's variance is its scatter, and
    an aperture's variance is NOISECOR times its summed pixel variances."""
    data, variance, frame_wcs, grid = noise_frame
    settings = RegisterSettings(order=order, tile=128, fast_mapping=fast)
    out, out_var, power = assemble(register_frame(data, None, frame_wcs, grid, settings,
                                                  variance=variance), grid.shape)
    ok = np.isfinite(out)
    assert ok.sum() > 0.6 * out.size
    assert np.array_equal(ok, np.isfinite(out_var))
    z = out[ok] / np.sqrt(out_var[ok])
    assert np.std(z) == pytest.approx(1.0, abs=0.03)
    assert np.allclose(out_var[ok], 9.0 * power[ok], rtol=1e-4)
    # 8 x 8 boxes: the variance of their sums / their summed pixel variances
    inner = out[40:200, 40:200].reshape(20, 8, 20, 8)
    inner_var = out_var[40:200, 40:200].reshape(20, 8, 20, 8)
    sums, predicted = inner.sum(axis=(1, 3)), inner_var.sum(axis=(1, 3))
    ratio = np.var(sums) / np.mean(predicted)
    assert ratio == pytest.approx(noise_correlation(order), rel=0.25)


def test_fast_and_exact_lanczos_agree(noise_frame):
    data, variance, frame_wcs, grid = noise_frame
    runs = [assemble(register_frame(data, None, frame_wcs, grid,
                                    RegisterSettings(order="lanczos3", tile=128,
                                                     fast_mapping=fast), variance=variance),
                     grid.shape) for fast in (True, False)]
    (fast_data, fast_var, _), (exact_data, exact_var, _) = runs
    assert np.array_equal(np.isfinite(fast_data), np.isfinite(exact_data))
    ok = np.isfinite(fast_data)
    assert np.max(np.abs(fast_data[ok] - exact_data[ok])) < 1e-3 * 3.0
    assert np.allclose(fast_var[ok], exact_var[ok], rtol=1e-3)


def test_lanczos_interpolates_smooth_images_and_keeps_reproject_conventions():
    """A smooth image is reproduced; a NaN pixel blanks only its kernel's reach; points
    beyond the half-pixel border are NaN."""
    shape = (120, 120)
    y, x = np.mgrid[0:120, 0:120]
    data = (100 + 10 * np.sin(x / 9.0) * np.cos(y / 11.0)).astype(np.float32)
    data[60, 60] = np.nan
    frame_wcs = tan_wcs(shape)
    grid_wcs = tan_wcs(shape, ra=150.0 + 0.7 * 0.389 / 3600, dec=2.0 + 0.2 * 0.389 / 3600)
    grid = Grid.from_wcs(grid_wcs, shape)
    for order, reach in (("lanczos3", 6), ("lanczos2", 4)):
        out, _, _ = assemble(register_frame(data, None, frame_wcs, grid,
                                            RegisterSettings(order=order, tile=64),
                                            variance=np.ones(shape, np.float32)), shape)
        gx, gy = frame_wcs.world_to_pixel(grid_wcs.pixel_to_world(x, y))
        truth = 100 + 10 * np.sin(gx / 9.0) * np.cos(gy / 11.0)
        ok = np.isfinite(out)
        assert np.max(np.abs(out[ok] - truth[ok])[(x[ok] > 5) & (x[ok] < 114)
                                                  & (y[ok] > 5) & (y[ok] < 114)]) < 0.05
        assert 1 <= (~ok[50:70, 50:70]).sum() <= reach * reach
        beyond = (gx < -0.5) | (gx > 119.5) | (gy < -0.5) | (gy > 119.5)
        assert beyond.sum() >= 100
        assert np.array_equal(~ok & ~((abs(x - 60) < 10) & (abs(y - 60) < 10)), beyond)


# -- C: the combine rules ---------------------------------------------------------------------
def test_median_efficiency_factor():
    assert median_variance_factor(1) == median_variance_factor(2) == 1.0
    assert median_variance_factor(3) == pytest.approx(1.347, abs=0.005)  # 0.4487 * 3
    assert median_variance_factor(101) == pytest.approx(np.pi / 2)
    rng = np.random.default_rng(0)
    for n in (5, 8, 20):
        measured = np.var(np.median(rng.standard_normal((200_000, n)), axis=1)) * n
        assert median_variance_factor(n) == pytest.approx(measured, rel=0.02)


@pytest.mark.parametrize("method", ["mean", "weighted", "median", "sigclip", "minmax"])
def test_each_method_reports_its_own_variance(method):
    """Values of unequal noise: (image - truth) / sqrt(variance) has unit scatter."""
    rng = np.random.default_rng(7)
    sigma = np.linspace(1.0, 3.0, 21)[:, None, None]
    data = rng.standard_normal((21, 150, 150)) * sigma
    variance = np.broadcast_to(sigma**2, data.shape)
    result = combine_stack(data, None, method=method, variance=variance,
                           exptime=np.arange(1, 22))
    image, var, exposure = (np.asarray(a) for a in (result.image, result.variance,
                                                    result.exposure))
    z = image / np.sqrt(var)
    if method == "minmax":
        # the rule of the survivors ignores that the extremes dropped are mostly from the
        # noisiest frames: the error is conservative (~6 % too large here), never too small
        assert 0.9 < np.std(z) <= 1.0
    else:
        assert np.std(z) == pytest.approx(1.0, abs=0.03)
    assert np.all(exposure == 231)
    if method == "weighted":
        assert np.allclose(var, 1 / np.sum(1 / sigma**2), rtol=1e-5)


# -- E: the must-show tests on synthetic truth --------------------------------------------------
N_FRAMES = 20
GRID_SHAPE = (256, 256)
FRAME_SHAPE = (290, 290)
SKY_RATE, RDNOISE, FWHM = 4.0, 7.0, 3.0  # e-/s/px, e-, px
# every star rendered on a stamp of this half-size, in the frames and in the truth alike (the
# renderer normalises each stamp, so stamps cut by each frame's noise would differ by ~1 %)
STAMP = 9
CENTER = (150.1, 2.2)


@pytest.fixture(scope="module")
def synthetic_stacks():
    return make_stacks()


def make_stacks():
    """20 frames of 10-80 s (unequal depth, known noise), dithered and slightly rotated,
    registered with bilinear and lanczos3, each with its noiseless twin: per kernel
    ``(data, variance, kernel_power, noiseless data)`` stacks; the exposure times; the
    positions of the stars on the grid.

    The truth a coadd is compared with is the coadd of the noiseless twins by the same
    kernel and method (so what remains is the noise alone: resampling also broadens the
    PSF, which moves ~0.7 % of an aperture's flux across its edge in this crowded field,
    a real effect but not noise)."""
    rng = np.random.default_rng(15)
    catalog = make_catalog(CENTER, radius_deg=0.1, n_stars=1500, mag_range=(15.0, 21.5),
                           seed=15)
    grid_wcs = true_frame_wcs(CENTER, GRID_SHAPE, 1.0)
    grid = Grid.from_wcs(grid_wcs, GRID_SHAPE)
    _, _, truth_info = render_frame(catalog, grid_wcs, GRID_SHAPE, fwhm_px=FWHM, sky=0.0,
                                    rdnoise=0.0, exptime=1.0, noise=False, saturate=1e12,
                                    max_stamp_radius=STAMP)
    exptime = rng.permutation(np.linspace(10.0, 80.0, N_FRAMES))
    frames = []
    for t in exptime:
        offset = rng.uniform(-6, 6, 2) / 3600.0
        wcs = true_frame_wcs((CENTER[0] + offset[0], CENTER[1] + offset[1]), FRAME_SHAPE, 1.0,
                             rotation_deg=rng.uniform(-1, 1))
        renders = [render_frame(catalog, wcs, FRAME_SHAPE, fwhm_px=FWHM, sky=SKY_RATE * t,
                                rdnoise=RDNOISE, exptime=t, rng=rng, saturate=1e12,
                                max_stamp_radius=STAMP, noise=noise)[0]
                   for noise in (True, False)]
        frames.append((*renders, wcs))
    stacks = {}
    for order in ("bilinear", "lanczos3"):
        planes = []
        settings = RegisterSettings(order=order, tile=128)
        for data, clean, wcs in frames:
            variance = frame_variance(data, None, rdnoise_e=RDNOISE)
            registered = assemble(register_frame(data, None, wcs, grid, settings,
                                                 conserve_flux=False, variance=variance),
                                  GRID_SHAPE)
            twin, _, _ = assemble(register_frame(clean, None, wcs, grid, settings,
                                                 conserve_flux=False, variance=variance),
                                  GRID_SHAPE)
            planes.append((*registered, twin))
        stacks[order] = [np.stack(p) for p in zip(*planes, strict=True)]
    return stacks, exptime, truth_info


def _coadd(stacks, exptime, order, method):
    """(coadd, ERR, truth): the truth is the noiseless twins' coadd, same weights."""
    data, variance, power, clean = stacks[order]
    results = [combine_stack(values, None, method=method, scales=1 / exptime,
                             offsets=-SKY_RATE * np.ones(N_FRAMES), variance=variance,
                             kernel_power=power, exptime=exptime) for values in (data, clean)]
    image, truth = (np.asarray(r.image, np.float64) for r in results)
    return image, np.sqrt(np.asarray(results[0].variance, np.float64)), truth


def _sky_pixels(image, err, truth):
    """Pixels far from every star (truth below 2 % of the noise), off the edges."""
    sky = (truth < 0.02 * np.nanmedian(err)) & np.isfinite(image)
    sky[:8], sky[-8:], sky[:, :8], sky[:, -8:] = False, False, False, False
    return sky


@pytest.mark.parametrize("order", ["bilinear", "lanczos3"])
@pytest.mark.parametrize("method", ["mean", "weighted", "median", "sigclip"])
def test_coadd_err_is_the_scatter_over_sky_pixels(synthetic_stacks, order, method):
    stacks, exptime, _ = synthetic_stacks
    image, err, truth = _coadd(stacks, exptime, order, method)
    sky = _sky_pixels(image, err, truth)
    assert sky.sum() > 5000
    z = (image - truth)[sky] / err[sky]
    assert np.std(z) == pytest.approx(1.0, abs=0.05), f"{order} {method}: std {np.std(z):.3f}"


@pytest.mark.parametrize("order", ["bilinear", "lanczos3"])
@pytest.mark.parametrize("method", ["mean", "weighted", "median", "sigclip"])
def test_aperture_photometry_pulls(synthetic_stacks, order, method):
    """photutils with the ERR map (times NOISECOR for the aperture): pulls of unit std."""
    from photutils.aperture import CircularAperture, aperture_photometry

    stacks, exptime, info = synthetic_stacks
    image, err, truth = _coadd(stacks, exptime, order, method)
    x, y = info["x"], info["y"]
    inside = (x > 12) & (x < GRID_SHAPE[1] - 13) & (y > 12) & (y < GRID_SHAPE[0] - 13)
    apertures = CircularAperture(np.column_stack([x[inside], y[inside]]), r=2 * FWHM)
    measured = aperture_photometry(image, apertures, error=err)
    true = aperture_photometry(truth, apertures)["aperture_sum"]
    error = measured["aperture_sum_err"] * np.sqrt(noise_correlation(order))
    pulls = np.asarray((measured["aperture_sum"] - true) / error)
    assert len(pulls) > 150
    assert np.std(pulls) == pytest.approx(1.0, abs=0.1), f"{order} {method}: {np.std(pulls)}"


@pytest.mark.parametrize("order", ["bilinear", "lanczos3"])
def test_weighted_gains_what_the_depths_promise(synthetic_stacks, order):
    stacks, exptime, _ = synthetic_stacks
    sigma = np.sqrt(SKY_RATE * exptime + RDNOISE**2) / exptime  # sky noise, e-/s
    expected = np.sqrt(np.sum(sigma**2) / N_FRAMES**2 * np.sum(1 / sigma**2))
    noise = {}
    for method in ("mean", "weighted"):
        image, err, truth = _coadd(stacks, exptime, order, method)
        sky = _sky_pixels(image, err, truth)
        noise[method] = np.std((image - truth)[sky])
    assert expected > 1.2  # the depths differ enough for this to mean something
    assert noise["mean"] / noise["weighted"] == pytest.approx(expected, rel=0.05)


# -- E: real frames ------------------------------------------------------------------------------
@pytest.mark.skipif(not DATA.is_dir(), reason=f"real frames not found at {DATA}")
@pytest.mark.parametrize("number", ["1153", "1156", "1159", "1162"])  # up, gp, rp, zs
def test_real_frame_err_matches_its_sky_scatter(number):
    """One frame registered (bilinear, shifted by a fraction of a pixel): its ERR agrees
    with the measured sky scatter of the registered pixels within 10 %."""
    frame = read_frame(DATA / f"ogg0m404-kb82-20170815-{number}-e91.fits.fz")
    wcs = frame.meta.header_wcs()
    grid_wcs = wcs.deepcopy()
    grid_wcs.wcs.crpix = wcs.wcs.crpix + np.array([0.37, -0.41])
    ny, nx = frame.data.shape
    grid = Grid.from_wcs(grid_wcs, (ny, nx))
    variance, _ = frame_noise_model(frame)
    out, out_var, _ = assemble(register_frame(frame.data, frame.mask, wcs, grid,
                                              RegisterSettings(tile=512), variance=variance),
                               (ny, nx))
    level, scatter = sky_level(out)
    sky = np.isfinite(out) & (np.abs(out - level) < 3 * scatter)
    predicted = float(np.sqrt(np.median(out_var[sky])))
    assert predicted == pytest.approx(scatter, rel=0.10), f"{number}: ERR {predicted:.2f} " \
        f"vs scatter {scatter:.2f}"


def test_report_noise_check_compares_measured_and_predicted():
    from daskstack._report import noise_check

    rng = np.random.default_rng(8)
    err = np.where(np.arange(300)[None, :] < 150, 2.0, 6.0) * np.ones((300, 1))
    image = rng.normal(0.0, 1.0, (300, 300)) * err  # two depths, each with its ERR
    image[100:110, 100:110] += 500.0  # a star: not sky
    ratio, median_err = noise_check(image, err)
    assert ratio == pytest.approx(1.0, abs=0.03) and median_err in (2.0, 6.0)
    assert noise_check(image, err / 1.5)[0] == pytest.approx(1.5, rel=0.03)
    assert noise_check(np.full((10, 10), np.nan), err[:10, :10]) is None
