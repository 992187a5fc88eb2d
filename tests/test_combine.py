"""Tests of daskstack.combine against ccdproc / astropy, and of its noise, scaling and laziness."""

from __future__ import annotations

import pickle
import warnings

import ccdproc
import dask
import dask.array as da
import numpy as np
import pytest
from astropy.nddata import CCDData
from astropy.stats import sigma_clip
from dask.callbacks import Callback

from daskstack.combine import (
    combine_stack,
    frame_scales,
    inverse_variance_weights,
)

F32 = dict(rtol=2e-6, atol=1e-4, equal_nan=True)  # float32 precision on values ~100


def _compute(res):
    image, weight, nused = dask.compute(res.image, res.weight, res.nused, scheduler="sync")
    return image, weight, nused


def _stack(seed=0, n=9, shape=(20, 24), holes=0.15, outliers=True):
    """Noisy frames with NaN holes, a few outliers and a fully uncovered corner."""
    rng = np.random.default_rng(seed)
    data = rng.normal(100.0, 10.0, (n,) + shape).astype(np.float32)
    if outliers:
        hit = rng.random(data.shape) < 0.05
        data[hit] += rng.choice([-1, 1], hit.sum()) * rng.uniform(50, 500, hit.sum())
    data[rng.random(data.shape) < holes] = np.nan
    data[:, :2, :3] = np.nan  # nobody covers this corner
    return data


def _combiner(data):
    ccds = [CCDData(frame.astype(np.float64), mask=~np.isfinite(frame), unit="electron")
            for frame in data]
    return ccdproc.Combiner(ccds)


def _with_ccdproc_nans(combined):
    """ccdproc's result with its fully-masked pixels as NaN."""
    out = np.array(combined.data, dtype=np.float64)
    out[combined.mask] = np.nan
    return out


# -- agreement with ccdproc / astropy ---------------------------------------------------
def test_mean_matches_ccdproc_average_combine():
    data = _stack()
    image, weight, nused = _compute(combine_stack(da.from_array(data, chunks=(9, 10, 12)),
                                                  method="mean"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ref = _combiner(data).average_combine()
    np.testing.assert_allclose(image, _with_ccdproc_nans(ref), **F32)
    np.testing.assert_array_equal(nused, np.isfinite(data).sum(axis=0))
    np.testing.assert_array_equal(weight, nused)
    assert image.dtype == np.float32


def test_median_matches_ccdproc_median_combine():
    data = _stack(seed=1, n=8)  # even count: mean of the two middle values
    image, _, nused = _compute(combine_stack(data, method="median"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ref = _combiner(data).median_combine()
        nanmedian = np.nanmedian(data.astype(np.float64), axis=0)
    np.testing.assert_allclose(image, _with_ccdproc_nans(ref), **F32)
    np.testing.assert_allclose(image, nanmedian, **F32)
    np.testing.assert_array_equal(nused, np.isfinite(data).sum(axis=0))


@pytest.mark.parametrize("cenfunc", ["median", "mean"])
def test_sigclip_one_iteration_matches_ccdproc(cenfunc):
    data = _stack(seed=2, n=10)
    image, _, nused = _compute(
        combine_stack(data, method="sigclip", sigma=2.0, iters=1, cenfunc=cenfunc))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        combiner = _combiner(data)
        combiner.sigma_clipping(low_thresh=2.0, high_thresh=2.0, func=cenfunc, dev_func="std")
        ref = combiner.average_combine()
    np.testing.assert_allclose(image, _with_ccdproc_nans(ref), **F32)
    np.testing.assert_array_equal(nused, (~combiner.data_arr.mask).sum(axis=0))
    assert (nused < np.isfinite(data).sum(axis=0)).sum() > 50  # clipping did happen


@pytest.mark.parametrize("cenfunc,iters", [("median", 3), ("mean", 5)])
def test_sigclip_matches_astropy_sigma_clip(cenfunc, iters):
    data = _stack(seed=3, n=12)
    image, _, nused = _compute(combine_stack(
        da.from_array(data, chunks=(4, 10, 24)),  # stack axis split: must be rechunked
        method="sigclip", sigma=2.5, iters=iters, cenfunc=cenfunc))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clipped = sigma_clip(data, sigma=2.5, maxiters=iters, cenfunc=cenfunc,
                             stdfunc="std", axis=0)
        ref = clipped.mean(axis=0, dtype=np.float64).filled(np.nan)
    np.testing.assert_allclose(image, ref, **F32)
    np.testing.assert_array_equal(nused, clipped.count(axis=0))
    assert (nused < np.isfinite(data).sum(axis=0)).any()  # something was clipped


def test_minmax_matches_ccdproc_clip_extrema_full_coverage():
    data = _stack(seed=4, n=7, holes=0.0)
    data[:, :2, :3] = 5.0  # the corner is covered here: ccdproc counts NaN as "highest"
    image, _, nused = _compute(combine_stack(data, method="minmax", nlow=1, nhigh=2))
    combiner = _combiner(data)
    combiner.clip_extrema(nlow=1, nhigh=2)
    ref = combiner.average_combine()
    np.testing.assert_allclose(image, ref.data, **F32)
    assert (nused == 7 - 3).all()


def test_minmax_with_gaps_rejects_only_valid_values():
    data = _stack(seed=5, n=6)
    image, _, nused = _compute(combine_stack(data, method="minmax", nlow=1, nhigh=1))
    expect = np.full(data.shape[1:], np.nan)
    count = np.zeros(data.shape[1:], int)
    for y, x in np.ndindex(*data.shape[1:]):
        values = np.sort(data[:, y, x][np.isfinite(data[:, y, x])].astype(np.float64))
        kept = values[1:len(values) - 1]
        if kept.size:
            expect[y, x] = kept.mean()
            count[y, x] = kept.size
    np.testing.assert_allclose(image, expect, **F32)
    np.testing.assert_array_equal(nused, count)


# -- rejection of artefacts ------------------------------------------------------------
def test_cosmic_ray_and_trail_in_one_frame_rejected_by_sigclip_and_median():
    rng = np.random.default_rng(6)
    n, ny, nx = 10, 40, 40
    data = rng.normal(200.0, 5.0, (n, ny, nx)).astype(np.float32)
    trail = np.zeros((ny, nx), bool)
    yy, xx = np.mgrid[:ny, :nx]
    trail[np.abs(yy - 0.7 * xx - 5) < 1.0] = True  # a satellite trail across frame 3
    trail[30:32, 5:7] = True  # and a cosmic ray
    data[3][trail] += 3000.0
    stack = da.from_array(data, chunks=(n, 20, 20))
    mean = _compute(combine_stack(stack, method="mean"))[0]
    assert np.all(mean[trail] > 200 + 250)  # present: 3000 / 10
    for method in ("sigclip", "median"):
        image = _compute(combine_stack(stack, method=method))[0]
        assert np.all(np.abs(image[trail] - 200.0) < 6 * 5.0 / np.sqrt(n - 1)), method
        assert abs(np.median(image[trail]) - 200.0) < 2.0


# -- noise -------------------------------------------------------------------------------
def test_mean_noise_falls_as_one_over_sqrt_n():
    rng = np.random.default_rng(7)
    data = rng.normal(0.0, 10.0, (16, 96, 96)).astype(np.float32)
    stds = {}
    for n in (1, 4, 16):
        image = _compute(combine_stack(da.from_array(data[:n], chunks=(n, 48, 48)),
                                       method="mean"))[0]
        stds[n] = float(np.std(image))
    for n in (4, 16):
        assert stds[n] * np.sqrt(n) == pytest.approx(stds[1], rel=0.10), stds


def test_weighted_inverse_variance_beats_plain_mean():
    rng = np.random.default_rng(8)
    rdnoise = np.array([3.0] * 4 + [15.0] * 4)  # gain 1, no sky: sigma = read noise
    data = (rng.normal(0.0, 1.0, (8, 80, 80)) * rdnoise[:, None, None]).astype(np.float32)
    w = inverse_variance_weights(gain=1.0, rdnoise=rdnoise, sky=0.0)
    np.testing.assert_allclose(w, 1 / rdnoise**2)
    footprint = np.ones_like(data)
    weighted, wmap, _ = _compute(combine_stack(data, footprint, method="weighted",
                                               frame_weights=w))
    plain = _compute(combine_stack(data, method="mean"))[0]
    expect = 1 / np.sqrt(np.sum(w))  # minimum-variance noise
    assert np.std(weighted) == pytest.approx(expect, rel=0.1)
    assert np.std(weighted) < 0.75 * np.std(plain)
    np.testing.assert_allclose(wmap, np.sum(w), rtol=1e-5)  # weight map = inverse variance


def test_weighted_uses_footprint_and_rejection():
    rng = np.random.default_rng(9)
    data = rng.normal(50.0, 1.0, (8, 10, 10)).astype(np.float32)
    data[2, 4, 4] = 5000.0
    footprint = np.ones_like(data)
    footprint[0, :, :5] = 0.0  # frame 0 does not cover the left half
    footprint[1] = 0.5
    fw = np.array([1, 2, 1, 1, 1, 1, 3, 1.0])
    # (with 7 values one outlier is at most 7/sqrt(6) = 2.86 std from the rest: sigma 2.5)
    image, wmap, nused = _compute(combine_stack(
        data, footprint, method="weighted", frame_weights=fw, reject="sigclip", sigma=2.5))
    # reference: astropy's clipping of the covered values, then the weighted mean
    covered = np.where(footprint > 0, data, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kept = ~sigma_clip(covered, sigma=2.5, maxiters=3, axis=0).mask
    w = footprint * fw[:, None, None] * kept
    np.testing.assert_allclose(image, (data * w).sum(0) / w.sum(0), rtol=1e-5)
    np.testing.assert_allclose(wmap, w.sum(0), rtol=1e-6)
    np.testing.assert_array_equal(nused, kept.sum(0))
    assert abs(image[4, 4] - 50) < 3 and not kept[2, 4, 4]


# -- scaling -----------------------------------------------------------------------------
def _star(shape, y0, x0, flux, fwhm=3.0):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    s = fwhm / 2.3548
    return flux * np.exp(-((yy - y0) ** 2 + (xx - x0) ** 2) / (2 * s * s)) / (2 * np.pi * s * s)


def _aperture(image, y0, x0, r=8.0):
    yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
    return float(np.sum(image[(yy - y0) ** 2 + (xx - x0) ** 2 < r * r]))


def test_exptime_scaling_gives_rate_flux():
    rng = np.random.default_rng(10)
    shape = (48, 48)
    exptime = np.array([10.0, 30.0, 60.0, 120.0, 20.0])
    sky_rate, star_rate = 5.0, 2.0e4  # e-/s
    frames, sky = [], []
    for t in exptime:
        counts = sky_rate * t + _star(shape, 24, 24, star_rate * t)
        frames.append(rng.poisson(counts).astype(np.float32))
        sky.append(sky_rate * t)  # the pipeline's per-frame sky level
    fs = frame_scales("exptime", exptime=exptime, sky=sky, subtract_background=True)
    assert fs.units == "input/s" and fs.unit("electron") == "electron/s"
    np.testing.assert_allclose(fs.scales, 1 / exptime)
    for method in ("mean", "sigclip", "median"):
        image = _compute(combine_stack(np.stack(frames), method=method, scales=fs.scales,
                                       offsets=fs.offsets))[0]
        assert _aperture(image, 24, 24) == pytest.approx(star_rate, rel=0.01), method
        assert abs(np.median(image)) < 0.2  # sky removed


def test_photometric_scaling_matches_reference_frame_flux():
    rng = np.random.default_rng(11)
    shape = (48, 64)
    transparency = np.array([1.0, 0.6, 0.85, 0.4, 0.95, 0.7])
    sky = np.array([80.0, 120.0, 95.0, 150.0, 85.0, 100.0])
    target, comparison = 5.0e4, 8.0e4
    frames = []
    for tr, s in zip(transparency, sky, strict=False):
        model = s + tr * (_star(shape, 24, 18, target) + _star(shape, 24, 46, comparison))
        frames.append(rng.normal(model, 2.0).astype(np.float32))
    # "catalog star" flux ratios relative to frame 0, measured on the comparison star
    phot = np.array([_aperture(f - s, 24, 46) for f, s in zip(frames, sky, strict=False)])
    ratio = phot / phot[0]
    fs = frame_scales("photometric", flux_ratio=ratio, sky=sky, subtract_background=True)
    assert fs.units == "reference"
    image = _compute(combine_stack(np.stack(frames), method="sigclip", scales=fs.scales,
                                   offsets=fs.offsets))[0]
    reference_flux = _aperture(frames[0] - sky[0], 24, 18)
    assert _aperture(image, 24, 18) == pytest.approx(reference_flux, rel=0.01)
    # without scaling the transparency losses show up
    unscaled = _compute(combine_stack(np.stack(frames) - sky[:, None, None], method="mean"))[0]
    assert _aperture(unscaled, 24, 18) < 0.85 * reference_flux


def test_frame_scales_modes_and_errors():
    fs = frame_scales("background", sky=[10.0, 20.0, 40.0])
    np.testing.assert_allclose(fs.scales, 1.0)
    np.testing.assert_allclose(fs.offsets, [10.0, 0.0, -20.0])  # matched to the median sky
    fs = frame_scales("none", sky=[10.0, 20.0], subtract_background=True)
    np.testing.assert_allclose(fs.offsets, [-10.0, -20.0])
    fs = frame_scales("none", n_frames=3)
    np.testing.assert_allclose(fs.offsets, 0.0)
    fs = frame_scales("exptime", exptime=[2.0, 4.0], sky=[10.0, 20.0])
    np.testing.assert_allclose(fs.offsets, 0.0)  # no subtraction: purely multiplicative
    with pytest.raises(ValueError, match="exptime"):
        frame_scales("exptime", exptime=[2.0, 0.0])
    with pytest.raises(ValueError, match="sky"):
        frame_scales("background", exptime=[1.0, 2.0])
    with pytest.raises(ValueError, match="3 frames"):
        frame_scales("photometric", flux_ratio=[1.0, 0.5], n_frames=3)
    with pytest.raises(ValueError):
        frame_scales("magic", n_frames=2)
    # ADU frames: variance = (sky*gain + rn^2)/gain^2, scaled by 1/exptime^2
    w = inverse_variance_weights(gain=2.0, rdnoise=4.0, sky=[100.0, 400.0], exptime=[10.0, 20.0])
    np.testing.assert_allclose(w, 1 / (np.array([216.0, 816.0]) / 4 / np.array([100.0, 400.0])))


def test_bad_arguments():
    data = np.zeros((3, 4, 4), np.float32)
    with pytest.raises(ValueError, match="method"):
        combine_stack(data, method="mode")
    with pytest.raises(ValueError, match="weighted"):
        combine_stack(data, method="mean", frame_weights=[1, 1, 1])
    with pytest.raises(ValueError, match="one value per frame"):
        combine_stack(data, method="mean", scales=[1, 2])
    with pytest.raises(ValueError, match="weights shape"):
        combine_stack(data, np.ones((3, 4, 5)))


# -- coverage ----------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["mean", "median", "sigclip", "minmax", "weighted"])
def test_uncovered_pixels_are_nan_with_zero_weight(method):
    data = _stack(seed=12, n=5, holes=0.0, outliers=False)  # corner [:2, :3] all NaN
    footprint = np.ones_like(data)
    footprint[:, 5, 5] = 0.0  # finite values, but outside every footprint
    image, weight, nused = _compute(combine_stack(data, footprint, method=method))
    for y, x in [(0, 0), (1, 2), (5, 5)]:
        assert np.isnan(image[y, x]) and weight[y, x] == 0 and nused[y, x] == 0
    covered = np.ones(image.shape, bool)
    covered[:2, :3] = covered[5, 5] = False
    assert np.isfinite(image[covered]).all() and (weight[covered] > 0).all()


# -- laziness, flat memory -------------------------------------------------------------
class _Sizes(Callback):
    """Record the size of every task result."""

    def __init__(self):
        super().__init__()
        self.nbytes = []

    def _posttask(self, key, result, dsk, state, id):
        self.nbytes.append(getattr(result, "nbytes", 0))


def _zarr_stack(path, n, ny=64, nx=192, tile=64, seed=13):
    zarr = pytest.importorskip("zarr")
    rng = np.random.default_rng(seed)
    values = rng.normal(10.0, 1.0, (n, ny, nx)).astype(np.float32)
    values[rng.random(values.shape) < 0.1] = np.nan
    arr = zarr.create_array(store=str(path), shape=values.shape, chunks=(n, tile, tile),
                            dtype="float32", fill_value=np.nan)
    arr[:] = values
    return values, da.from_zarr(str(path))


def test_combination_is_lazy_and_graph_is_small(tmp_path):
    values, stack = _zarr_stack(tmp_path / "a.zarr", n=12)
    assert stack.numblocks == (1, 1, 3)
    res = combine_stack(stack, method="sigclip")
    assert all(isinstance(a, da.Array) for a in res)
    graph = dict(res.image.__dask_graph__())
    size = len(pickle.dumps(graph))
    assert size < values.nbytes / 10, size  # no pixels inside the graph
    # tasks scale with chunks, not frames
    _, bigger = _zarr_stack(tmp_path / "b.zarr", n=36)
    graph_big = dict(combine_stack(bigger, method="sigclip").image.__dask_graph__())
    assert len(graph_big) == len(graph)

    sizes = _Sizes()
    with sizes:
        image, weight, nused = _compute(res)
    chunk_bytes = 12 * 64 * 64 * 4
    assert max(sizes.nbytes) <= chunk_bytes  # never more than one chunk in one task
    expect = _compute(combine_stack(values, method="sigclip"))
    for got, ref in zip((image, weight, nused), expect, strict=False):
        np.testing.assert_array_equal(got, ref)
