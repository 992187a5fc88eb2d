"""Registration into zarr and lazy combination, end to end through the pipeline.

Ten synthetic frames of one field with an exact header WCS (so no solving is
needed: ``--wcs header``), one of them crossed by a satellite trail, all with
cosmic rays. Checked against the tutorial's method (reproject_interp + ccdproc
Combiner) and against the simulation's truth.
"""

import warnings

import numpy as np
import pytest
from astropy.io import fits
from astropy.nddata import CCDData
from astropy.stats import mad_std, sigma_clip
from astropy.table import Table
from ccdproc import Combiner
from reproject import reproject_interp

from daskstack import combine as combine_mod
from daskstack._pipeline import combine_store_path, register_files
from daskstack.config import Settings
from daskstack.frames import read_frame
from daskstack.simulate import simulate_field
from daskstack.store import open_store

N_FRAMES = 10
TRAIL_FRAME = 3


@pytest.fixture(scope="module")
def stack_field(tmp_path_factory):
    return simulate_field(tmp_path_factory.mktemp("stack") / "inputs", n_frames=N_FRAMES,
                          shape=(480, 480), filters=("rp",), seed=5, pointing_error_arcmin=0,
                          rotation_error_deg=0, satellite_trail_frame=TRAIL_FRAME,
                          dither_arcsec=6.0)


def register_stack(stack_field, dask_client, out, fast_mapping=True):
    settings = Settings()
    # conserve_flux: the tutorial does not rescale pixel areas
    settings = settings.replace("register", conserve_flux=False, tile=128,
                                fast_mapping=fast_mapping)
    register_files([str(p) for p in stack_field.frames], out, settings, wcs_source="header",
                   client=dask_client)
    return out


@pytest.fixture(scope="module")
def stack_store(stack_field, dask_client, tmp_path_factory):
    """Registered with the default fast (mesh) mapping."""
    return register_stack(stack_field, dask_client, tmp_path_factory.mktemp("stack-run"))


@pytest.fixture(scope="module")
def exact_store(stack_field, dask_client, tmp_path_factory):
    """Registered through reproject_interp itself, tile by tile (--exact-mapping)."""
    return register_stack(stack_field, dask_client, tmp_path_factory.mktemp("stack-exact"),
                          fast_mapping=False)


def assert_same_coadd(image, expected, mask, rtol, atol, weight=None):
    """Equal where both are defined. Where the grid maps a frame onto itself, output
    pixels fall exactly on input pixel centres, and whether a masked neighbour's NaN
    spreads into a bilinear sample depends on the last bit of the coordinate, in
    reproject as here: so the coverage may differ on a few such pixels."""
    ok = ~mask & np.isfinite(image)
    if weight is not None:  # same frames contributing
        ok &= weight == N_FRAMES
    assert (np.isfinite(image) != ~mask).sum() < 0.005 * image.size
    assert ok.sum() > 0.9 * ok.size
    np.testing.assert_allclose(image[ok], expected[ok], rtol=rtol, atol=atol)


def combined(stack_store, dask_client, method, scale="none", subtract=False, **extra):
    settings = Settings()
    settings = settings.replace("combine", method=method, scale=scale,
                                subtract_background=subtract, **extra)
    out = stack_store / f"combine-{method}-{scale}-{subtract}"
    paths = combine_store_path(stack_store / "store.zarr", out, settings, client=dask_client)
    with fits.open(paths["rp"]) as hdul:
        return hdul[0].data.astype(np.float64), hdul[0].header, hdul["NFRAMES"].data


@pytest.fixture(scope="module")
def tutorial_stack(stack_field, stack_store):
    """The tutorial's way: reproject_interp of every frame onto the first frame's grid."""
    grid = open_store(stack_store / "store.zarr").grid
    frames = []
    for path in stack_field.frames:
        frame = read_frame(path)
        # pixels above MAXLIN (non-linear) have no known noise: daskstack gives them no
        # weight, so the tutorial's frames leave them out too
        data = np.where(frame.mask | (frame.data >= frame.meta.linear_limit), np.nan,
                        frame.data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out, _ = reproject_interp((data, frame.meta.header_wcs()), grid.wcs,
                                      shape_out=grid.shape)
        frames.append(out)
    return np.array(frames)


def ccd_list(stack):
    return [CCDData(f, mask=~np.isfinite(f), unit="electron") for f in stack]


def test_mean_equals_tutorial_method_to_float32(exact_store, dask_client, tutorial_stack):
    image, header, weight = combined(exact_store, dask_client, "mean")
    expected = Combiner(ccd_list(tutorial_stack)).average_combine()
    assert_same_coadd(image, expected.data, expected.mask, rtol=3e-7, atol=0)
    assert header["NCOMBINE"] == N_FRAMES and header["COMBINE"] == "mean"
    assert weight.max() == N_FRAMES


def test_fast_mapping_mean_within_the_noise(stack_store, dask_client, tutorial_stack):
    """The default mesh mapping: equal to the tutorial's mean to 1e-4 of the sky noise."""
    image, _, weight = combined(stack_store, dask_client, "mean")
    expected = Combiner(ccd_list(tutorial_stack)).average_combine()
    count = np.isfinite(tutorial_stack).sum(axis=0)
    noise = mad_std(tutorial_stack[1], ignore_nan=True)
    # on the frame that is the grid itself, a bilinear sample at an exact pixel centre
    # may or may not see a masked neighbour (the coordinate's last bit): compare pixels
    # where the same frames contribute
    same = (weight == count)
    assert same.mean() > 0.99
    assert_same_coadd(np.where(same, image, np.nan), expected.data, expected.mask | ~same,
                      rtol=3e-7, atol=1e-4 * noise)


def test_median_equals_ccdproc(exact_store, dask_client, tutorial_stack):
    image, _, _ = combined(exact_store, dask_client, "median")
    expected = Combiner(ccd_list(tutorial_stack)).median_combine()
    assert_same_coadd(image, expected.data, expected.mask, rtol=3e-7, atol=0)


def test_sigclip_equals_astropy(exact_store, dask_client, tutorial_stack):
    image, _, _ = combined(exact_store, dask_client, "sigclip")
    clipped = sigma_clip(np.ma.masked_invalid(tutorial_stack), sigma=3, maxiters=3,
                         cenfunc="median", stdfunc="std", axis=0)
    expected = clipped.mean(axis=0)
    assert_same_coadd(image, expected.data, np.ma.getmaskarray(expected), rtol=3e-7, atol=0)


def test_trail_and_cosmic_rays_rejected(stack_store, dask_client, tutorial_stack):
    """A satellite trail in one frame of ten shows in the mean, not in median or sigclip."""
    sky = np.nanmedian(tutorial_stack, axis=(1, 2))
    flat = tutorial_stack - sky[:, None, None]  # frames' sky levels differ by tens of e-
    reference = np.nanmedian(np.delete(flat, TRAIL_FRAME, axis=0), axis=0)
    noise = mad_std(flat[TRAIL_FRAME] - reference, ignore_nan=True)
    trail = (flat[TRAIL_FRAME] - reference > 10 * noise) & (reference < 5 * noise)
    trail &= np.all(np.isfinite(flat), axis=0)
    assert trail.sum() > 300  # the trail crosses the frame
    coadd_noise = noise / np.sqrt(N_FRAMES)
    mean, _, _ = combined(stack_store, dask_client, "mean", subtract=True)
    assert np.median((mean - reference)[trail]) > 5 * coadd_noise
    for method in ("median", "sigclip"):
        image, _, _ = combined(stack_store, dask_client, method, subtract=True)
        excess = (image - reference)[trail]
        assert abs(np.median(excess)) < 1.5 * coadd_noise, method


def test_recombining_does_not_reproject(stack_store, dask_client):
    store = stack_store / "store.zarr"
    data_chunks = [p for p in store.rglob("*") if p.is_file() and "/c/" in str(p)
                   and "coadd" not in str(p.relative_to(store))]
    assert data_chunks
    before = {p: p.stat().st_mtime_ns for p in data_chunks}
    mean, _, _ = combined(stack_store, dask_client, "mean")
    minmax, header, _ = combined(stack_store, dask_client, "minmax")
    after = {p: p.stat().st_mtime_ns for p in data_chunks}
    assert before == after
    assert header["COMBINE"] == "minmax"
    assert not np.allclose(mean, minmax, equal_nan=True)


def isolated_bright_stars(stack_field, wcs, shape, n=25):
    catalog = stack_field.catalog_table()
    truth = stack_field.truth_table()
    epoch = float(np.mean(truth["epoch"]))
    from daskstack.simulate import propagate

    ra, dec = propagate(catalog, epoch)
    x, y = wcs.world_to_pixel_values(ra, dec)
    mag = np.asarray(catalog["phot_g_mean_mag"])
    inside = (x > 25) & (x < shape[1] - 26) & (y > 25) & (y < shape[0] - 26)
    picks = []
    for i in np.argsort(mag):
        if not inside[i] or mag[i] < 13.5:  # brighter ones may saturate
            continue
        d = np.hypot(x - x[i], y - y[i])
        if np.any((d < 25) & (d > 0) & (mag < mag[i] + 4)):
            continue
        picks.append(i)
        if len(picks) == n:
            break
    return x[picks], y[picks], mag[picks]


def test_exptime_scaled_fluxes_match_truth(stack_field, stack_store, dask_client):
    """Scaled to e-/s with the sky removed, star fluxes match the truth within 1%."""
    from photutils.aperture import CircularAperture, aperture_photometry

    image, header, _ = combined(stack_store, dask_client, "mean", scale="exptime",
                                subtract=True)
    grid = open_store(stack_store / "store.zarr").grid
    truth = stack_field.truth_table()
    x, y, mag = isolated_bright_stars(stack_field, grid.wcs, grid.shape)
    assert len(x) >= 8
    radius = 18.0
    phot = aperture_photometry(np.nan_to_num(image), CircularAperture(np.c_[x, y], radius))
    measured = np.asarray(phot["aperture_sum"])
    # expected: mean over frames of transparency x enclosed Moffat fraction, in e-/s
    beta = np.asarray(truth["moffat_beta"])
    alpha = np.asarray(truth["fwhm_px"]) / (2 * np.sqrt(2 ** (1 / beta) - 1))
    enclosed = 1 - (1 + (radius / alpha) ** 2) ** (1 - beta)
    factor = np.mean(np.asarray(truth["transparency"]) * enclosed)
    zeropoint = float(truth["zeropoint"][0])
    expected = factor * 10 ** (-0.4 * (mag - zeropoint))
    ratio = measured / expected
    assert np.median(ratio) == pytest.approx(1.0, abs=0.01)
    assert header["BUNIT"] == "electron/s"


def test_noise_falls_as_one_over_sqrt_n(stack_field, stack_store):
    """Sky noise of the mean coadd of N frames ~ 1/sqrt(N): measured on 8x8 block sums
    (so the interpolation's pixel-to-pixel correlation does not enter) of blocks that
    hold no catalog star (whose light does not average away), as the scatter of the
    difference of neighbouring blocks (so the sky gradient does not enter)."""
    store = open_store(stack_store / "store.zarr")
    data, _ = store.arrays("rp")
    # frame 0 is the grid itself (not interpolated); frame 3 has the trail
    use = [i for i in range(1, N_FRAMES) if i != TRAIL_FRAME]
    stack = np.asarray(data.oindex[use])
    sky = np.array([store.frames[store.filters["rp"][i]].background for i in use])
    catalog = stack_field.catalog_table()
    x, y = store.grid.wcs.world_to_pixel_values(catalog["ra"], catalog["dec"])
    starry = np.zeros(store.grid.shape, bool)
    ny, nx = store.grid.shape
    for xi, yi in zip(np.round(x).astype(int), np.round(y).astype(int), strict=True):
        if -8 <= xi < nx + 8 and -8 <= yi < ny + 8:
            starry[max(yi - 8, 0):yi + 9, max(xi - 8, 0):xi + 9] = True
    noise = []
    for n in (1, 4, 8):
        res = combine_mod.combine_stack(stack[:n], method="mean", offsets=-sky[:n])
        image = np.asarray(res.image)[16:464, 16:464]
        blocks = image.reshape(56, 8, 56, 8).sum(axis=(1, 3))
        clean = ~starry[16:464, 16:464].reshape(56, 8, 56, 8).any(axis=(1, 3))
        clean &= np.isfinite(blocks)
        # neighbouring blocks differ by noise only: the sky gradient cancels
        pairs = clean[:, 1:] & clean[:, :-1]
        assert pairs.sum() > 200
        noise.append(mad_std((blocks[:, 1:] - blocks[:, :-1])[pairs]) / np.sqrt(2))
    noise = np.array(noise)
    np.testing.assert_allclose(noise, noise[0] / np.sqrt([1, 4, 8]), rtol=0.15)


def test_store_describes_itself(stack_store, stack_field):
    store = open_store(stack_store / "store.zarr")
    assert store.filters == {"rp": [p.name.replace(".fits.fz", "") for p in stack_field.frames]}
    record = next(iter(store.frames.values()))
    assert record.exptime > 0 and record.background > 0
    assert store.params["register"]["order"] == "bilinear"
    data, _ = store.arrays("rp")
    assert data.shape == (N_FRAMES, *store.grid.shape)
    table = Table.read(stack_store / "manifest.ecsv") if (stack_store / "manifest.ecsv").exists() \
        else None
    assert table is None or len(table) == N_FRAMES


def test_difference_images_bring_out_what_changed(stack_field, stack_store, dask_client):
    """Frame minus coadd: the trail stands out in its frame's difference, nowhere else."""
    settings = Settings()
    settings = settings.replace("combine", method="median", difference=True)
    out = stack_store / "combine-difference"
    combine_store_path(stack_store / "store.zarr", out, settings, client=dask_client)
    names = [p.name.replace(".fits.fz", "") for p in stack_field.frames]
    files = sorted((out / "difference").glob("*.fits"))
    assert [p.stem for p in files] == sorted(names)
    bright = {}
    for name in names:
        diff = fits.getdata(out / "difference" / f"{name}.fits")
        noise = mad_std(diff, ignore_nan=True)
        assert abs(np.nanmedian(diff)) < 0.2 * noise  # sky matched: scaled as in the coadd
        bright[name] = int(np.sum(diff > 10 * noise))
    trail = names[TRAIL_FRAME]
    assert bright[trail] > 300
    assert max(v for k, v in bright.items() if k != trail) < bright[trail] / 3
    header = fits.getheader(out / "difference" / f"{trail}.fits")
    assert header["FRAME"] == trail and "CRVAL1" in header
    from daskstack._rundir import read_outputs

    assert f"difference/{trail}.fits" in read_outputs(out)
