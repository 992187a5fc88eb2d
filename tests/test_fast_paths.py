"""The faster ways of doing the same work give the same results as the plain ones:
the float32 noise model, the compiled loops, the variance resampled in one map_coordinates pass, tiles
and combine blocks worked in strips, several methods from one task per block, the
sharded store, and the local workers' allocator settings (issue 15's performance,
issue 18 items 3-4)."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from scipy.ndimage import uniform_filter

from daskstack import combine, register
from daskstack import store as store_mod
from daskstack.combine import combine_stack, combine_stacks
from daskstack.grid import Grid
from daskstack.noise import SMOOTH_PX, poisson_variance

from .helpers import tan_wcs


@pytest.mark.parametrize("shape", [(61, 47), (1, 1), (1, 6), (2, 3), (9, 1)])
def test_poisson_variance_equals_the_float64_box_mean(shape):
    """Edges (pixels repeated past the border) and frames of one row or column too."""
    rng = np.random.default_rng(3)
    data = rng.normal(400.0, 30.0, shape).astype(np.float32)
    data[min(5, shape[0] - 1), :] = -50.0  # negative signal: the Poisson term clips at 0
    bad = rng.random(data.shape) < 0.05
    bad[20:24, 30:35] = True  # a bad block: some boxes have no good pixel at all
    bad.flat[0] = False
    gain, rdnoise = 1.7, 6.0
    good = ~bad
    local_sum = uniform_filter(np.where(good, data, 0).astype(np.float64), SMOOTH_PX,
                               mode="nearest")
    local_count = uniform_filter(good.astype(np.float64), SMOOTH_PX, mode="nearest")
    with np.errstate(invalid="ignore", divide="ignore"):
        signal = np.where(local_count > 1e-9, local_sum / local_count, 0.0)
    expected = np.maximum(signal, 0) / gain + (rdnoise / gain) ** 2
    expected[bad] = np.nan
    variance = poisson_variance(data, bad, gain, rdnoise)
    assert variance.dtype == np.float32
    assert np.array_equal(np.isnan(variance), bad)
    np.testing.assert_allclose(variance[good], expected[good], rtol=1e-6)


def _sample_points(rng, shape, n):
    ny, nx = shape
    coords = np.array([rng.uniform(-1.0, ny, n), rng.uniform(-1.0, nx, n)])
    # points on pixel centres, the last row and column, and the outer half-pixels
    coords[:, :6] = [[0.0, ny - 1.0, ny - 1.0, 7.0, -0.3, ny - 0.7],
                     [0.0, nx - 1.0, 3.0, nx - 1.0, 2.5, 4.0]]
    return coords


def test_bilinear_variance_in_one_pass_equals_the_squared_taps():
    rng = np.random.default_rng(5)
    shape = (40, 52)
    variance = rng.uniform(10.0, 90.0, shape).astype(np.float32)
    variance[11, 17] = np.nan
    kernel = register.KERNELS["bilinear"]
    coords = _sample_points(rng, shape, 20000)
    outside = register._border_convention(coords, shape)
    taps, taps_power = register._resample(variance, coords, kernel, True)
    fast, fast_power = register._resample_squared(variance, coords.copy(), kernel)
    inside = ~outside
    assert np.array_equal(np.isnan(taps[inside]), np.isnan(fast[inside]))
    ok = inside & np.isfinite(taps)
    np.testing.assert_allclose(fast[ok], taps[ok], rtol=1e-6)
    np.testing.assert_allclose(fast_power[inside], taps_power[inside], rtol=1e-6)
    assert 0.25 <= fast_power[inside].min() and fast_power[inside].max() <= 1.0


def test_one_pass_variance_is_finite_wherever_the_data_are():
    """Positions a rounding error below a pixel centre, beside a NaN: the data's taps
    leave the NaN out (weight 0 for it is never taken); so must the variance's."""
    image = np.ones((6, 8), np.float32)
    image[2, 5] = np.nan
    variance = np.where(np.isnan(image), np.nan, 4.0).astype(np.float32)
    below = np.nextafter(4.0, 0.0)
    x_in = np.array([[below, 4.0, 3.5, 1.0]])
    y_in = np.array([[2.0, np.nextafter(1.0, 0.0), 2.0, np.nextafter(2.0, 0.0)]])
    data, out_var, power = register._interpolate(image, x_in, y_in, "bilinear", variance)
    assert np.array_equal(np.isfinite(out_var), np.isfinite(data))
    assert np.isfinite(data[0, 0])
    np.testing.assert_allclose(out_var[np.isfinite(data)], 4.0 * power[np.isfinite(data)])


def test_nearest_variance_is_the_data_pixel():
    rng = np.random.default_rng(6)
    shape = (30, 20)
    image = rng.normal(size=shape).astype(np.float32)
    variance = np.arange(image.size, dtype=np.float32).reshape(shape) + 1
    coords = _sample_points(rng, shape, 5000)
    coords[:, 6:10] = [[3.5, 4.5, 10.0, 2.0], [6.0, 7.5, 8.5, 1.5]]  # exact ties
    y, x = coords
    data, out_var, power = register._interpolate(image, x, y, "nearest-neighbor", variance)
    ok = np.isfinite(data)
    # the variance of the very pixel whose value was taken
    flat_index = out_var[ok].astype(np.int64) - 1
    assert np.array_equal(image.ravel()[flat_index], data[ok])
    assert np.all(power[ok] == 1)


@pytest.mark.parametrize("order", ["bilinear", "lanczos3"])
def test_tile_in_strips_equals_the_whole_tile(order, monkeypatch):
    rng = np.random.default_rng(7)
    image = rng.normal(100.0, 5.0, (80, 90)).astype(np.float32)
    image[30, 40] = np.nan
    variance = np.where(np.isnan(image), np.nan, 25.0).astype(np.float32)
    gy, gx = np.mgrid[0:37, 0:41].astype(float)
    x_in, y_in = gx * 1.9 + 0.3 + 0.01 * gy, gy * 2.1 - 0.4
    whole = register._interpolate(image, x_in, y_in, order, variance)
    monkeypatch.setattr(register, "STRIP_POINTS", 100)  # strips of 2 rows
    strips = register._interpolate_in_strips(image, x_in, y_in, order, variance)
    for a, b in zip(whole, strips, strict=True):
        assert np.array_equal(a, b, equal_nan=True)
    data_only = register._interpolate_in_strips(image, x_in, y_in, order, None)
    assert np.array_equal(data_only[0], whole[0], equal_nan=True)
    assert data_only[1:] == (None, None)


@pytest.fixture(scope="module")
def small_stack():
    rng = np.random.default_rng(8)
    n, ny, nx = 7, 48, 40
    data = rng.normal(100.0, 10.0, (n, ny, nx)).astype(np.float32)
    data[2, 5:9, 5:9] = 5000.0  # a cosmic ray
    data[:3, 40:, :] = np.nan  # frames that do not cover
    data[:, 0, 0] = np.nan  # a pixel nobody covers
    variance = np.where(np.isnan(data), np.nan,
                        rng.uniform(80.0, 120.0, (n, 1, 1))).astype(np.float32)
    power = np.full(data.shape, 0.6, np.float32)
    return data, variance, power


def test_methods_from_one_task_per_block_equal_one_graph_each(small_stack, monkeypatch):
    data, variance, power = small_stack
    monkeypatch.setattr(combine, "STRIP_BYTES", 7 * 4 * 40 * 3)  # strips of 3 rows
    stack = da.from_array(data, chunks=(-1, 16, 20))
    options = dict(variance=da.from_array(variance, chunks=stack.chunks),
                   kernel_power=da.from_array(power, chunks=stack.chunks),
                   scales=np.linspace(0.9, 1.1, 7), offsets=np.zeros(7),
                   exptime=np.full(7, 30.0), sigma=2.5)
    methods = [("mean", {}), ("median", {}), ("sigclip", {}), ("minmax", {}),
               ("weighted", {"reject": "sigclip"})]
    together = combine_stacks(stack, methods=methods, **options)
    combine_layers = [name for name in together[0].image.dask.layers
                      if name.startswith("combine-")]
    assert len(combine_layers) == 1  # one task per block for every method
    for (method, own), result in zip(methods, together, strict=True):
        alone = combine_stack(stack, method=method, **options, **own)
        monkeypatch.setattr(combine, "STRIP_BYTES", 2**30)  # the whole block at once
        whole = combine_stack(stack, method=method, **options, **own)
        monkeypatch.setattr(combine, "STRIP_BYTES", 7 * 4 * 40 * 3)
        for a, b, c in zip(result, alone, whole, strict=True):
            a, b, c = (np.asarray(x.compute()) for x in (a, b, c))
            assert np.array_equal(a, b, equal_nan=True), method
            assert np.array_equal(a, c, equal_nan=True), method


def test_chunk_layout():
    assert store_mod.chunk_layout(1024, (4096, 4096)) == ((1, 1024, 1024), None)
    assert store_mod.chunk_layout(1024, (4096, 4096), 1024) == ((1, 1024, 1024), None)
    assert store_mod.chunk_layout(1024, (4096, 4096), 256) == ((1, 256, 256), (1, 1024, 1024))
    # a grid narrower than a tile on one axis: that axis is one chunk
    assert store_mod.chunk_layout(1024, (300, 4096), 256) == ((1, 300, 256), (1, 300, 1024))
    # an inner size that does not divide the tile: no shards
    assert store_mod.chunk_layout(1000, (4096, 4096), 256) == ((1, 1000, 1000), None)


def test_sharded_store_writes_reads_and_clears_whole_tiles(tmp_path):
    grid = Grid.from_wcs(tan_wcs((100, 130)), (100, 130))
    path = tmp_path / "store.zarr"
    stack = store_mod.create_store(path, grid, {}, {"rp": ["a", "b"]}, tile=64,
                                   inner={"rp": 32})
    data_arr, _ = stack.arrays("rp")
    assert (data_arr.chunks, data_arr.shards) == ((1, 32, 32), (1, 64, 64))
    rng = np.random.default_rng(9)
    planes = rng.normal(size=(3, 100, 130)).astype(np.float32)
    tiles = [(y0, x0, planes[0][y0:y0 + 64, x0:x0 + 64], None,
              planes[1][y0:y0 + 64, x0:x0 + 64], planes[2][y0:y0 + 64, x0:x0 + 64])
             for y0 in (0, 64) for x0 in (0, 64, 128)]
    assert store_mod.write_tiles(str(path), "rp", 1, tiles) == 6
    variance_arr, power_arr = stack.variance("rp")
    assert np.array_equal(data_arr[1], planes[0])
    assert np.array_equal(variance_arr[1], planes[1])
    np.testing.assert_allclose(power_arr[1], planes[2], rtol=1e-3, atol=1e-3)  # float16
    assert np.all(np.isnan(data_arr[0]))
    store_mod.clear_frame(str(path), "rp", 1, [(64, 0)])  # the whole tile, every chunk
    cleared = data_arr[1]
    assert np.all(np.isnan(cleared[64:, :64]))
    assert np.array_equal(cleared[:64], planes[0][:64])
    assert np.array_equal(cleared[64:, 64:], planes[0][64:, 64:])


def test_local_frames_go_through_tensorstore_and_match_zarr_python(tmp_path):
    """A local store's frame planes are read and written by tensorstore
    (`store.frame_array`): what it writes zarr-python reads back, and the reverse, with
    chunks never written (NaN), chosen frames (``oindex``), a plane the store lacks
    (None) and the dask array the combine reads (`store.lazy_frames`)."""
    grid = Grid.from_wcs(tan_wcs((100, 130)), (100, 130))
    path = tmp_path / "store.zarr"
    stack = store_mod.create_store(path, grid, {}, {"rp": ["a", "b", "c"]}, tile=64,
                                   inner={"rp": 32})
    data_arr = stack.group("r+")["rp/data"]
    foot_arr = stack.arrays("rp")[1]
    rng = np.random.default_rng(4)
    plane = rng.normal(size=(100, 130)).astype(np.float32)
    data_arr[0] = plane  # zarr-python writes frame 0
    written = store_mod.frame_array(str(path), "rp", "data", write=True)
    assert type(written).__name__ == "_FrameArray"  # tensorstore, not zarr-python
    written[2, 10:74, 0:64] = plane[10:74, :64]  # part of a shard: the rest stays NaN
    frames = store_mod.frame_array(str(path), "rp", "data")
    assert np.array_equal(frames[0], plane)
    assert np.array_equal(data_arr[2], frames[2], equal_nan=True)
    assert np.array_equal(data_arr[2, 10:74, :64], plane[10:74, :64])
    assert np.isnan(data_arr[2, 80:, 100:]).all() and np.isnan(frames[1]).all()
    chosen = frames.oindex[[0, 2], slice(5, 50), slice(60, 90)]
    assert np.array_equal(chosen, data_arr.get_orthogonal_selection(
        ([0, 2], slice(5, 50), slice(60, 90))), equal_nan=True)
    assert foot_arr is None and store_mod.frame_array(str(path), "rp", "footprint") is None
    lazy = store_mod.lazy_frames(stack, "rp", (3, 32, 32))
    assert np.array_equal(lazy["data"].compute(), data_arr[:], equal_nan=True)
    assert lazy["footprint"] is None


def test_a_store_tensorstore_cannot_read_is_an_os_error(tmp_path):
    """A shard whose bytes are damaged is the disk's problem (`OSError`, as zarr-python
    raises), not a bug in the pipeline."""
    grid = Grid.from_wcs(tan_wcs((64, 64)), (64, 64))
    path = tmp_path / "store.zarr"
    stack = store_mod.create_store(path, grid, {}, {"rp": ["a"]}, tile=64, inner={"rp": 32})
    data_arr = stack.group("r+")["rp/data"]
    data_arr[0] = np.ones((64, 64), np.float32)
    (shard,) = [p for p in (path / "rp").rglob("*") if p.is_file() and "data" in p.parts
                and p.name != "zarr.json"]
    shard.write_bytes(shard.read_bytes()[:-7])  # truncated: the index at its end is gone
    with pytest.raises(OSError, match="store.zarr"):
        store_mod.frame_array(str(path), "rp", "data")[0]


def test_a_frame_whose_tiles_stop_coming_leaves_no_write_under_way(tmp_path):
    """`write_tiles` writes a tile while the next is made; when making one fails, the
    tiles already handed over are in the store by the time the error reaches the caller
    (which then clears the frame: no late write may land after that), and the tile's
    arrays could be reused by the caller at once."""
    grid = Grid.from_wcs(tan_wcs((64, 128)), (64, 128))
    path = tmp_path / "store.zarr"
    store_mod.create_store(path, grid, {}, {"rp": ["a", "b"]}, tile=64)
    first = np.full((64, 64), 3.0, np.float32)

    def tiles():
        values = first.copy()
        yield 0, 0, values, None, values * 2, np.ones_like(values)
        values[:] = -1.0  # the buffer reused: what was handed over is already copied
        raise ValueError("the second tile could not be made")

    with pytest.raises(ValueError, match="second tile"):
        store_mod.write_tiles(str(path), "rp", 1, tiles())
    data = store_mod.frame_array(str(path), "rp", "data")
    assert np.array_equal(data[1, :, :64], first)
    assert np.isnan(data[1, :, 64:]).all() and np.isnan(data[0]).all()
    assert np.array_equal(store_mod.frame_array(str(path), "rp", "variance")[1, :, :64],
                          first * 2)


def test_the_combine_block_is_made_of_whole_chunks():
    """At every N, the block the combine reads (memory budget) is a whole number of the
    chunks the store was made with for that N: each chunk is read once."""
    for n_frames in (5, 20, 40, 100, 400):
        block = combine._combine_tile(1024, n_frames, (4096, 4096), methods=["mean", "median"])
        chunks, shards = store_mod.chunk_layout(1024, (4096, 4096), block)
        assert block % chunks[1] == 0 and block % chunks[2] == 0
        assert (shards is None) == (block == 1024)
    assert combine._combine_tile(1024, 100, (4096, 4096), methods=["mean"]) < 1024


def test_local_workers_get_the_allocator_settings():
    from daskstack._cluster import WORKER_MALLOC_ENV, open_client
    from daskstack.config import ClusterSettings

    with open_client(ClusterSettings(n_workers=1, threads_per_worker=1)) as client:
        environ = client.run(lambda: dict(__import__("os").environ))
    (worker_env,) = environ.values()
    for key, value in WORKER_MALLOC_ENV.items():
        assert worker_env.get(key) == str(value)
