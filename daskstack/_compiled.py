"""Compiled inner loops (numba) of the stage modules: each does in one pass over memory what
the numpy reference beside it does in several, with the same result.

Kept apart so that the stage modules stay readable numpy and each loop here is tested
against that reference (``tests/test_compiled.py``). The stage modules import this module
only inside the functions that use it, so a process that never registers a frame,
models its noise or combines a block (the command-line client) never loads numba and
LLVM.

Compiled on first use in each process and cached on disk (``cache=True``, beside this
file, or in ``NUMBA_CACHE_DIR``); ``nogil``: the threads of one Dask worker run them
concurrently.
"""

from __future__ import annotations

from functools import cache

import numpy as np
from numba import njit

__all__ = ["bilinear_sample", "plain_combine", "poisson_variance", "sorting_network"]


@njit(cache=True, nogil=True)
def _on_border(c, n):
    """``c`` along an axis of ``n`` pixels with reproject's edges: a point in the outer
    half of a border pixel takes that pixel's centre."""
    if c >= -0.5 and c < 0.0:
        return 0.0
    if c >= n - 1.0 and c < n - 0.5:
        return n - 1.0
    return c


@njit(cache=True, nogil=True)
def _axis_taps(c, n):
    """First tap and weight of the second tap of a linear interpolation at ``c`` along an
    axis of ``n`` pixels, with reproject's edges (`_on_border`) and ``map_coordinates``'
    rule for points on the last pixel (taps ``n - 2`` and ``n - 1``, weight 1 on the
    last); first tap -1: outside (NaN)."""
    c = _on_border(c, n)
    if not (c >= 0.0 and c <= n - 1.0):  # also NaN
        return -1, 0.0
    first = int(np.floor(c))
    if first > n - 2:
        first = n - 2
    if first < 0:  # a 1-pixel axis: the one pixel, at weight 1
        return 0, 0.0
    return first, c - first


@njit(cache=True, nogil=True)
def _axis_power(c, n):
    """``(1 - f)**2 + f**2`` at the fraction ``f`` of ``c`` (after the border rule):
    the sum of the squared weights along one axis (``register._triangle_squared``)."""
    c = _on_border(c, n)
    f = c - np.floor(c)
    return f * f + (1.0 - f) * (1.0 - f)


@njit(cache=True, nogil=True)
def _bilinear(image, variance, with_variance, x_in, y_in, data_out, var_out, power_out):
    ny, nx = image.shape
    rows, cols = x_in.shape
    for i in range(rows):
        for j in range(cols):
            y0, fy = _axis_taps(y_in[i, j], ny)
            x0, fx = _axis_taps(x_in[i, j], nx)
            if with_variance:
                # defined (as in the reference) wherever the position is, data or not
                power_out[i, j] = (1.0 * _axis_power(y_in[i, j], ny)
                                   * _axis_power(x_in[i, j], nx))
            if y0 < 0 or x0 < 0:
                data_out[i, j] = np.nan
                if with_variance:
                    var_out[i, j] = np.nan
                continue
            y1 = min(y0 + 1, ny - 1)
            x1 = min(x0 + 1, nx - 1)
            wy0, wy1 = 1.0 - fy, fy
            wx0, wx1 = 1.0 - fx, fx
            # map_coordinates' order: taps row by row, value times the axis weights, summed
            # in double; a NaN tap spreads even at weight 0, as there
            total = 0.0
            total += np.float64(image[y0, x0]) * wy0 * wx0
            total += np.float64(image[y0, x1]) * wy0 * wx1
            total += np.float64(image[y1, x0]) * wy1 * wx0
            total += np.float64(image[y1, x1]) * wy1 * wx1
            data_out[i, j] = total
            if not with_variance:
                continue
            if not np.isfinite(total):
                var_out[i, j] = np.nan
                continue
            sy0, sy1, sx0, sx1 = wy0 * wy0, wy1 * wy1, wx0 * wx0, wx1 * wx1
            spread = 0.0
            spread += np.float64(variance[y0, x0]) * sy0 * sx0
            spread += np.float64(variance[y0, x1]) * sy0 * sx1
            spread += np.float64(variance[y1, x0]) * sy1 * sx0
            spread += np.float64(variance[y1, x1]) * sy1 * sx1
            var_out[i, j] = spread


def bilinear_sample(image: np.ndarray, x_in: np.ndarray, y_in: np.ndarray,
                    variance: np.ndarray | None = None):
    """``register._interpolate(image, x_in, y_in, 'bilinear', variance)`` in one pass:
    the data bit for bit as ``map_coordinates(order=1)`` with reproject's edges; the
    variance ``sum_k w_k**2 V_k`` over the same four taps (NaN where the data are) and
    the kernel power ``sum_k w_k**2`` (float32). Returns ``(data, variance, power)``,
    the last two None without ``variance``."""
    image = np.ascontiguousarray(image, dtype=np.float32)
    x_in = np.ascontiguousarray(x_in, dtype=np.float64)
    y_in = np.ascontiguousarray(y_in, dtype=np.float64)
    data = np.empty(x_in.shape, np.float32)
    if variance is None:
        _bilinear(image, image, False, x_in, y_in, data, data, data)
        return data, None, None
    variance = np.ascontiguousarray(variance, dtype=np.float32)
    var_out = np.empty(x_in.shape, np.float32)
    power = np.empty(x_in.shape, np.float32)
    _bilinear(image, variance, True, x_in, y_in, data, var_out, power)
    return data, var_out, power


@njit(cache=True, nogil=True)
def _poisson_variance(data, bad, g, read, out):
    """3 x 3 box mean of the good pixels (edge pixels repeated past the border), summed
    in float32 in the order of `noise._box_sum` (rows first: centre, above, below; then
    columns: centre, left, right), clipped at 0, times ``g`` plus ``read``."""
    ny, nx = data.shape
    col_sum = np.empty(nx, np.float32)  # per column, the sum over rows y - 1 .. y + 1
    col_count = np.empty(nx, np.float32)
    for y in range(ny):
        above, below = max(y - 1, 0), min(y + 1, ny - 1)
        for x in range(nx):
            s = np.float32(0.0) if bad[y, x] else data[y, x]
            c = np.float32(0.0) if bad[y, x] else np.float32(1.0)
            if not bad[above, x]:
                s += data[above, x]
                c += np.float32(1.0)
            if not bad[below, x]:
                s += data[below, x]
                c += np.float32(1.0)
            col_sum[x] = s
            col_count[x] = c
        for x in range(nx):
            left, right = max(x - 1, 0), min(x + 1, nx - 1)
            s = col_sum[x] + col_sum[left] + col_sum[right]
            c = col_count[x] + col_count[left] + col_count[right]
            if bad[y, x]:
                out[y, x] = np.nan
                continue
            signal = s / c if c > 0 else np.float32(0.0)
            if signal < 0:
                signal = np.float32(0.0)
            out[y, x] = signal * g + read


def poisson_variance(data: np.ndarray, bad: np.ndarray, g: float, read: float) -> np.ndarray:
    """`noise.poisson_variance`'s arithmetic (``g``: 1 / electrons per unit; ``read``:
    the read-noise variance in data units), float32, NaN where ``bad``."""
    data = np.ascontiguousarray(data, dtype=np.float32)
    bad = np.ascontiguousarray(bad, dtype=np.bool_)
    out = np.empty(data.shape, np.float32)
    _poisson_variance(data, bad, np.float32(g), np.float32(read), out)
    return out


# -- the combine without rejection: mean and median of each pixel's valid values ----------
def _batcher_pairs(size: int):
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        yield i + j, i + j + k
            k //= 2
        p *= 2


@cache
def sorting_network(n: int) -> np.ndarray:
    """Compare-exchange pairs ``(i, j)``, ``i < j``, that sort ``n`` values: Batcher's
    odd-even merge sort of the next power of two, keeping only the pairs within ``n``
    (the padding would hold +inf, which no pair with it ever moves). Read-only."""
    size = 1
    while size < n:
        size *= 2
    pairs = np.array([(i, j) for i, j in _batcher_pairs(size) if j < n],
                     dtype=np.int64).reshape(-1, 2)
    pairs.flags.writeable = False
    return pairs


@njit(cache=True, nogil=True)
def _plain_combine(data, foot, variance, scales, offsets, exptime, sky, pair_sigma,
                   pair_fraction, median, network, factors, out):
    n, ny, nx = data.shape
    with_foot = foot.shape[0] > 0
    with_variance = variance.shape[0] > 0
    pair = with_variance and pair_sigma > 0
    inf = np.float32(np.inf)
    s2 = scales * scales
    # each pixel's values, frame by frame (+inf: not valid, so a sort puts it last)
    values = np.empty((n, nx), np.float32)
    var = np.empty((n, nx), np.float32)
    count = np.empty(nx, np.int64)
    exposure = np.empty(nx, np.float64)
    total = np.empty(nx, np.float64)
    spread = np.empty(nx, np.float64)
    for y in range(ny):
        count[:] = 0
        exposure[:] = 0
        for i in range(n):
            for x in range(nx):
                v = data[i, y, x] * scales[i] + offsets[i]
                ok = np.isfinite(v)
                if with_foot:
                    ok = ok and foot[i, y, x] > 0
                if with_variance:
                    w = variance[i, y, x] * s2[i]
                    ok = ok and w > 0
                    var[i, x] = w
                if ok:
                    values[i, x] = v
                    count[x] += 1
                    exposure[x] += exptime[i]
                else:
                    values[i, x] = inf
        if pair:  # two values: the higher goes beyond what the noise allows
            for x in range(nx):
                if count[x] != 2:
                    continue
                high = low = -1
                e_high = -inf
                e_low = inf
                for i in range(n):
                    if values[i, x] == inf:
                        continue
                    e = values[i, x] - sky[i]
                    if e > e_high:
                        high, e_high = i, e
                    if e < e_low:
                        low, e_low = i, e
                allowed = (pair_sigma * np.sqrt(var[high, x] + var[low, x])
                           + pair_fraction * max(e_low, np.float32(0.0)))
                if e_high - e_low > allowed:
                    values[high, x] = inf
                    count[x] = 1
        # sums in frame order, in double (as the reference's reductions)
        total[:] = 0.0
        spread[:] = 0.0
        for i in range(n):
            for x in range(nx):
                if values[i, x] < inf:
                    if median:
                        if with_variance:
                            spread[x] += np.float32(1.0) / np.sqrt(var[i, x])
                    else:
                        total[x] += values[i, x]
                        if with_variance:
                            spread[x] += var[i, x]
        if median:
            for k in range(network.shape[0]):
                a, b = network[k, 0], network[k, 1]
                for x in range(nx):
                    lo, hi = values[a, x], values[b, x]
                    values[a, x] = min(lo, hi)
                    values[b, x] = max(lo, hi)
        for x in range(nx):
            c = count[x]
            out[2, y, x] = c
            out[4, y, x] = exposure[x]
            if c == 0:
                out[0, y, x] = np.nan
                out[1, y, x] = 0
                out[3, y, x] = np.nan
                continue
            out[1, y, x] = c
            if median:
                out[0, y, x] = 0.5 * (np.float64(values[(c - 1) // 2, x]) + values[c // 2, x])
                out[3, y, x] = (factors[c] * c / spread[x] ** 2 if with_variance else np.nan)
            else:
                out[0, y, x] = total[x] / c
                out[3, y, x] = spread[x] / (np.float64(c) * c) if with_variance else np.nan


def plain_combine(data, foot=None, variance=None, *, scales=None, offsets=None, exptime=None,
                  sky_levels=None, pair_sigma=0.0, pair_fraction=0.0, median_factors=None):
    """`combine._combine_block` of rejection 'none' with the 'mean' estimator, or the
    'median' one given ``median_factors`` (`combine.median_variance_table` of the frames),
    in one pass over each row of pixels, packed ``(5, ny, nx)`` float32 as there: the same
    values, sums in the same order (the median from a sorting network instead of a sort:
    the same order statistics)."""
    n, ny, nx = np.shape(data)
    empty = np.empty((0, 0, 0), np.float32)

    def per_frame(values, default):
        if values is None:
            return np.full(n, default, np.float32)
        return np.asarray(values).astype(np.float32)

    median = median_factors is not None
    out = np.empty((5, ny, nx), np.float32)
    _plain_combine(
        np.asarray(data, np.float32), empty if foot is None else np.asarray(foot, np.float32),
        empty if variance is None else np.asarray(variance, np.float32),
        per_frame(scales, 1.0), per_frame(offsets, 0.0), per_frame(exptime, 0.0),
        per_frame(sky_levels, 0.0), np.float32(pair_sigma), np.float32(pair_fraction),
        median, sorting_network(n) if median else np.empty((0, 2), np.int64),
        np.asarray(median_factors if median else [0.0], np.float64), out)
    return out
