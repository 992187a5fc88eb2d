"""The compiled loops (`daskstack._compiled`) against the numpy/scipy code they replace:
the bilinear sampler is ``map_coordinates`` bit for bit (reproject's edges, NaN taps,
the last row and column, frames of one or two pixels), its variance and kernel power
those of the squared-weight reference to float32 rounding; the combine's mean and median
without rejection are `combine._combine_block`'s numpy value for value (NaN, footprint
0, variance NaN or 0, the two-frame rule, scales, offsets, any number of frames)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from daskstack import combine, register
from daskstack._compiled import sorting_network


def _reference(monkeypatch, image, x_in, y_in, variance):
    """`register._interpolate` through map_coordinates (the sampler switched off)."""
    with monkeypatch.context() as m:
        m.setitem(register.KERNELS, "bilinear",
                  dataclasses.replace(register.KERNELS["bilinear"], sampler=None))
        return register._interpolate(image, x_in, y_in, "bilinear", variance)


def _hard_points(rng, ny, nx, n=400):
    """Random points and the ones where a sampler goes wrong: pixel centres (a tap at
    weight 0), the outer half of border pixels, exactly on the edges, beyond them."""
    x = rng.uniform(-1.5, nx + 0.5, n)
    y = rng.uniform(-1.5, ny + 0.5, n)
    x[:80] = rng.integers(-1, nx + 1, 80)
    y[40:120] = rng.integers(-1, ny + 1, 80)
    x[120:140] = rng.choice([-0.5, -0.25, 0.0, nx - 1.0, nx - 0.75, nx - 0.5, nx - 0.5001], 20)
    y[140:160] = rng.choice([-0.5, -0.25, 0.0, ny - 1.0, ny - 0.75, ny - 0.5, -0.5001], 20)
    x[160] = np.nan
    return x.reshape(20, n // 20), y.reshape(20, n // 20)


@pytest.mark.parametrize("shape", [(1, 1), (1, 5), (2, 2), (3, 7), (16, 11)])
def test_bilinear_sampler_equals_map_coordinates(shape, monkeypatch):
    rng = np.random.default_rng(sum(shape))
    for _ in range(20):
        image = rng.normal(100.0, 10.0, shape).astype(np.float32)
        image[rng.random(shape) < 0.15] = np.nan
        variance = rng.uniform(20.0, 80.0, shape).astype(np.float32)
        variance[np.isnan(image)] = np.nan
        x_in, y_in = _hard_points(rng, *shape)
        data, out_var, power = register._interpolate(image, x_in, y_in, "bilinear", variance)
        ref_data, ref_var, ref_power = _reference(monkeypatch, image, x_in, y_in, variance)
        assert data.dtype == out_var.dtype == power.dtype == np.float32
        assert np.array_equal(data, ref_data, equal_nan=True)  # bit for bit
        assert np.array_equal(np.isnan(out_var), np.isnan(ref_var))
        np.testing.assert_allclose(out_var, ref_var, rtol=2e-6)
        np.testing.assert_allclose(power, ref_power, rtol=1e-7)
        only_data = register._interpolate(image, x_in, y_in, "bilinear")
        assert np.array_equal(only_data[0], data, equal_nan=True)
        assert only_data[1:] == (None, None)


def test_a_nan_tap_spreads_even_at_weight_zero(monkeypatch):
    """On a pixel centre the second tap has weight 0; map_coordinates still multiplies
    its NaN in (so a bad pixel's neighbours are NaN at their centres): the sampler too,
    and a sampler that skipped zero weights would fail here."""
    image = np.ones((4, 4), np.float32)
    image[1, 2] = np.nan
    x_in = np.array([[1.0, 1.5, 0.0]])
    y_in = np.array([[1.0, 1.0, 3.0]])
    data, _, _ = register._interpolate(image, x_in, y_in, "bilinear")
    ref, _, _ = _reference(monkeypatch, image, x_in, y_in, None)
    assert np.array_equal(data, ref, equal_nan=True)
    assert np.isnan(data[0, 0]) and np.isnan(data[0, 1]) and data[0, 2] == 1.0


def test_registered_frame_unchanged_by_the_sampler(monkeypatch):
    """A whole frame through `register_frame` (mesh mapping, tiles, area scaling)."""
    from daskstack.config import RegisterSettings
    from daskstack.grid import Grid

    from .helpers import tan_wcs

    rng = np.random.default_rng(11)
    data = rng.normal(500.0, 20.0, (90, 110)).astype(np.float32)
    mask = rng.random(data.shape) < 0.01
    variance = np.full(data.shape, 30.0, np.float32)
    frame_wcs = tan_wcs((90, 110), rotation_deg=7.0, sip=True)
    grid = Grid.from_wcs(tan_wcs((100, 120), ra=150.0005, dec=2.0003), (100, 120))
    settings = RegisterSettings(tile=64)

    def tiles():
        return list(register.register_frame(data, mask, frame_wcs, grid, settings,
                                            variance=variance))

    compiled = tiles()
    monkeypatch.setitem(register.KERNELS, "bilinear",
                        dataclasses.replace(register.KERNELS["bilinear"], sampler=None))
    reference = tiles()
    assert len(compiled) == len(reference) > 1
    for a, b in zip(compiled, reference, strict=True):
        assert (a.y0, a.x0) == (b.y0, b.x0)
        assert np.array_equal(a.data, b.data, equal_nan=True)
        assert np.array_equal(a.footprint, b.footprint)
        np.testing.assert_allclose(a.variance, b.variance, rtol=2e-6)


@pytest.mark.parametrize("n", range(1, 13))
def test_sorting_network_sorts_every_zero_one_input(n):
    """A compare-exchange network sorts every input iff it sorts every 0/1 input."""
    ones = (np.arange(2**n)[:, None] >> np.arange(n)) & 1  # every 0/1 input, one a row
    values = ones.T.astype(np.float32).copy()
    for i, j in sorting_network(n):
        lo, hi = np.minimum(values[i], values[j]), np.maximum(values[i], values[j])
        values[i], values[j] = lo, hi
    assert np.array_equal(values.T, np.sort(ones, axis=1))


@pytest.mark.parametrize("n", [13, 20, 33, 64, 65, 100, 129])
def test_sorting_network_sorts_large_stacks(n):
    rng = np.random.default_rng(n)
    values = rng.normal(size=(n, 500)).astype(np.float32)
    values[:, :100] = rng.integers(0, 3, (n, 100))  # ties
    expected = np.sort(values, axis=0)
    for i, j in sorting_network(n):
        assert i < j < n
        lo, hi = np.minimum(values[i], values[j]), np.maximum(values[i], values[j])
        values[i], values[j] = lo, hi
    assert np.array_equal(values, expected)


def _hard_stack(rng, n, ny=23, nx=31):
    """Values, footprint, variance with every way a value drops out, and pixels with
    exactly two values of which the higher is sometimes far above the lower."""
    data = rng.normal(100.0, 10.0, (n, ny, nx)).astype(np.float32)
    data[rng.random(data.shape) < 0.15] = np.nan
    data[rng.random(data.shape) < 0.01] = np.inf
    foot = (rng.random(data.shape) > 0.1).astype(np.float32)
    variance = rng.uniform(50.0, 150.0, data.shape).astype(np.float32)
    variance[rng.random(data.shape) < 0.05] = np.nan
    variance[rng.random(data.shape) < 0.02] = 0.0
    if n >= 2:
        two = rng.random((ny, nx)) < 0.3
        data[2:, two] = np.nan
        data[:2, two] = 100.0
        foot[:2, two] = variance[:2, two] = 1.0
        data[1, two] += rng.choice([0.0, 3.0, 200.0], two.sum()).astype(np.float32)
    data[:, 0, 0] = np.nan  # no value at all
    return data, foot, variance


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 20, 33, 100])
@pytest.mark.parametrize("method", ["mean", "median"])
def test_plain_combine_equals_the_numpy_reference(n, method):
    rng = np.random.default_rng(n)
    data, foot, variance = _hard_stack(rng, n)
    options = combine.combine_options(
        n, method=method, scales=rng.uniform(0.5, 2.0, n), offsets=rng.uniform(-5, 5, n),
        exptime=rng.uniform(10.0, 100.0, n), sky_levels=rng.uniform(0.0, 50.0, n),
        pair_sigma=4.0, pair_fraction=0.5)
    for planes in [(foot, variance), (None, variance), (foot, None), (None, None)]:
        got = combine._combine_block(data, *planes, None, **options)
        ref = combine._combine_block(data, *planes, None, compiled=False, **options)
        assert got.dtype == np.float32 and got.shape == ref.shape == (5,) + data.shape[1:]
        for plane in range(4):  # image, weight, count, variance: value for value
            assert np.array_equal(got[plane], ref[plane], equal_nan=True), plane
        np.testing.assert_allclose(got[4], ref[4], rtol=1e-6)  # exposure (s)
    if n >= 2:  # the two-frame rule did reject higher values (and the test sees it)
        with_rule = combine._combine_block(data, foot, variance, None, **options)
        without = combine._combine_block(data, foot, variance, None,
                                         **dict(options, pair_sigma=0.0))
        assert np.any(with_rule[2] < without[2])
