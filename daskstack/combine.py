"""Combination of a registered stack into one image: lazy, tile by tile, flat memory.

Everything here is pure: functions of dask (or numpy) arrays and of small per-frame
numbers, no I/O and no cluster code. `combine_stack` builds a dask graph and never
computes it.

The stack
---------
``data`` has shape ``(n_frames, ny, nx)`` (NaN where a frame does not cover a pixel or
the pixel is bad) and ``weights``, optional, the reprojection footprint of the same
shape. A value takes part in the combination when it is finite *and* its footprint
weight is > 0. Each output tile is computed by one task from one chunk that holds the
whole stack axis (the input is rechunked to ``{0: -1}`` if it is not already), so a
task needs about ``n_frames * tile**2 * 4`` bytes for the chunk plus what the work
allocates. Every method works in strips of about 1 MiB of input (`_combine_in_strips`),
so that is the output planes, the block's scaled copy and a few strips' temporaries:
traced with tracemalloc (`tests/test_combine_methods.py` checks every method on blocks
of 20 to 100 frames), it stays below 2.6x the input block at 8 bytes a value, sigma
clipping and 'weighted' with rejection included. Every method has that same bound: the
small differences between methods, below the 4x in memory between two block sides,
would otherwise give one method blocks smaller than the store's chunks (made for the
run's methods), and a later combine with it would read every chunk several times.

Scaling
-------
Every frame is brought to common units before any rejection or averaging with

    corrected_i = data_i * scales[i] + offsets[i]

(`frame_scales` computes ``scales`` and ``offsets``). Rejection therefore works on the
scaled values, as IRAF ``imcombine`` does (``ccdproc.Combiner`` instead rejects on the
unscaled values and scales afterwards; with frames of different exposure time that
rejects good pixels, so we do not copy it).

Methods and the library semantics they reproduce
------------------------------------------------
Each method the user names is one row of `COMBINE_METHODS`: a rejection from
`REJECTIONS` ('none', 'sigclip', 'minmax': which of each pixel's sorted values are
kept) followed by an estimator from `ESTIMATORS` ('mean', 'median', 'weighted': how
the kept values become one), as ccdproc's ``Combiner`` separates ``clip_extrema`` /
``sigma_clipping`` from ``average_combine`` / ``median_combine``; the row also holds
the method's memory factor and its header cards. A new method is one row (and its
tests); a new rejection or estimator one function in its table.

``mean``
    mean of the valid values = ``ccdproc.Combiner.average_combine`` with masked
    (NaN) values excluded.
``median``
    median of the valid values; for an even count the mean of the two middle values
    = ``ccdproc.Combiner.median_combine`` / ``numpy.nanmedian``.
``sigclip``
    ``astropy.stats.sigma_clip(stack, sigma=sigma, maxiters=iters, cenfunc=cenfunc,
    stdfunc='std', axis=0)`` (default ``copy=True``: a value clipped in any iteration
    stays clipped; the iterations stop when nothing more is clipped or after
    ``iters``), then the mean of the unclipped values. The centre is the median or the
    mean of the surviving values, the spread their population standard deviation
    (ddof=0), and values strictly below ``cen - sigma*std`` or strictly above
    ``cen + sigma*std`` are clipped. With ``iters=1`` this is also exactly
    ``ccdproc.Combiner.sigma_clipping(sigma, sigma, func=cenfunc, dev_func='std')``
    followed by ``average_combine`` (ccdproc cannot pass ``maxiters`` > 1: its own
    keyword collides with astropy's).
    Caveat of std-based clipping: among n values a single outlier is at most about
    ``n / sqrt(n - 1)`` standard deviations from the centre, so with ``sigma=3`` it is
    never rejected in a stack of fewer than 10 frames; use 'median' or 'minmax' (or a
    smaller sigma) for small stacks.
    Given the stack's ``variance`` (the pipeline always gives it), each value's spread
    is the larger of that std and its own noise, so frames of unequal depth are not cut
    at a fraction of their own sigma; without it, exactly astropy's rule.
``minmax``
    per pixel the ``nlow`` lowest and ``nhigh`` highest *valid* values are rejected
    and the rest averaged = ``ccdproc.Combiner.clip_extrema(nlow, nhigh)`` +
    ``average_combine`` when every frame covers the pixel. Where some values are
    missing, ccdproc counts the missing (NaN) values toward ``nhigh``; we reject only
    valid values (IRAF's intent, without IRAF's proportional reduction). A pixel with
    no more than ``nlow + nhigh`` valid values has nothing left: NaN, weight 0.
``weighted``
    weighted mean ``sum(w v) / sum(w)`` with ``w = frame_weights[i] * footprint``,
    optionally after the rejection ``reject`` ('sigclip' or 'minmax', decided on the
    unweighted values exactly as above). Given the stack's ``variance``, ``w`` is per
    pixel the inverse variance of each frame's input pixels (``kernel_power /
    variance``), the minimum-variance combination for photometry; given per-frame
    inverse-variance weights (`inverse_variance_weights`) instead, one number a frame.

Two frames: cosmic rays
-----------------------
Where only two values cover a pixel, no rejection that compares a value with the
others' spread can work (each is one spread from their mean), so a cosmic ray in one of
two frames would pass into the coadd at half its height. Each method's row names a
rule for those pixels (`CombineMethod.two_frames`, a key of `TWO_FRAME_REJECTIONS`),
applied before its own rejection: 'pair' (every method but 'minmax', whose ``nhigh``
already drops the higher of two) takes each scaled value above the sky level left in its
frame (``e = value - sky``; the sky is 0 where it was subtracted) and rejects the higher

    e_high - e_low > pair_sigma * sqrt(var_high + var_low) + pair_fraction * max(e_low, 0)

with the variances of the noise model (scaled like the values, so frames of other depth
or exposure are compared in their own noise). A star is in both frames: the lower value
holds its signal, and the second term allows the two to differ by that fraction of it,
for sub-pixel resampling and seeing differences (a higher value may be 1 + fraction
times the lower's signal). A cosmic ray on sky has a lower value near the sky: it goes
when it is ``pair_sigma`` sigma above it. ``pair_sigma = 0`` turns the rule off; without
``variance`` it does nothing. Frames of very different seeing (a star's wings more than
1 + fraction times brighter in the broader frame) lose wing values to the rule: raise
``pair_fraction`` or turn it off for such pairs. Rejected values still count in the
``exposure`` map, as every rejection's do.

Noise
-----
Given the stack's ``variance``, each method also returns the variance of its result
by its estimator's rule, from the values it kept: ``sum(w**2 v) / sum(w)**2`` for
the (weighted) mean (exact; for 'sigclip' and 'minmax' over the surviving values),
and for the median ``F(n) n / (sum 1/sqrt(v))**2`` with ``F`` the median's
efficiency factor for n Gaussian values (`median_variance_factor`; pi/2 for large n).

Pixels where no value is used are NaN in ``image`` and 0 in ``weight`` and ``nused``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import NamedTuple

import dask.array as da
import numpy as np

from .errors import RunError

log = logging.getLogger(__name__)

__all__ = [
    "COMBINE_METHODS",
    "ESTIMATORS",
    "METHODS",
    "REJECTIONS",
    "REJECTS",
    "SCALES",
    "TWO_FRAME_REJECTIONS",
    "CombineMethod",
    "CombineResult",
    "FrameScales",
    "combine_frames",
    "combine_options",
    "combine_result",
    "combine_stack",
    "combine_stacks",
    "difference_image",
    "effective_gain",
    "electrons_per_unit",
    "frame_scales",
    "header_cards",
    "inverse_variance_weights",
    "packed_stacks",
    "split_results",
]

SCALES = ("none", "exptime", "background", "photometric")


# -- per-frame scaling ----------------------------------------------------------------------
class FrameScales(NamedTuple):
    """``corrected_i = data_i * scales[i] + offsets[i]``; ``units`` says what comes out.

    ``units`` is ``"input"`` (the frames' own unit, e.g. electron), ``"input/s"``
    (the frames' unit per second) or ``"reference"`` (the unit of the photometric
    reference frame: counts as that frame would have recorded them).
    """

    scales: np.ndarray
    offsets: np.ndarray
    units: str
    # the sky level each frame keeps after ``data * scales + offsets`` (0 where it was
    # subtracted), or None where the frames' sky levels are not known
    levels: np.ndarray | None = None
    # with --scale photometric from zero points: the coadd's own zero point (mag of one
    # coadd unit) and its error; NaN otherwise
    magzp: float = float("nan")
    magzp_err: float = float("nan")

    def unit(self, input_unit: str = "electron") -> str:
        """A BUNIT string for the coadd of frames in ``input_unit``."""
        if self.units == "input/s":
            return f"{input_unit}/s"
        return input_unit


def _per_frame(name: str, values, n: int | None, *, positive: bool) -> np.ndarray:
    if values is None:
        raise ValueError(f"{name} is required for this scaling")
    arr = np.atleast_1d(np.asarray(values, dtype=np.float64))
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one number per frame")
    if n is not None and arr.size != n:
        raise ValueError(f"{name} has {arr.size} values for {n} frames")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite")
    if positive and not np.all(arr > 0):
        raise ValueError(f"{name} must be > 0")
    return arr


def frame_scales(
    scale: str = "none",
    *,
    exptime=None,
    sky=None,
    flux_ratio=None,
    subtract_background: bool = False,
    n_frames: int | None = None,
) -> FrameScales:
    """Per-frame multiplicative scale and additive offset for the choice ``scale``.

    Parameters (all one value per frame, in frame order)
    ----------
    scale : {'none', 'exptime', 'background', 'photometric'}
        'none'
            ``scales = 1``. Output units: the frames' own (``units='input'``).
        'exptime'
            ``scales = 1 / exptime``: every frame becomes a rate, and so is the
            coadd: output in the frames' unit **per second** (e-/s for frames in
            electrons; ``units='input/s'``). Multiply by an exposure time yourself if
            you want counts.
        'background'
            ``scales = 1``; the sky levels are matched additively to their median:
            ``offsets = median(sky) - sky`` (or ``-sky`` with `subtract_background`).
            Output units: the frames' own.
        'photometric'
            ``scales = 1 / flux_ratio`` where ``flux_ratio[i]`` = flux of the matched
            catalog stars in frame i / their flux in the reference frame (so the
            reference frame has ratio 1). It absorbs exposure time, airmass and
            transparency. Output units: those of the reference frame
            (``units='reference'``).
    exptime : seconds, > 0 (required for 'exptime').
    sky : per-frame sky level (a scalar per frame, in the frames' units, before
        scaling). Required for 'background' and for `subtract_background`.
    flux_ratio : > 0 (required for 'photometric').
    subtract_background : remove each frame's sky level before scaling:
        ``offsets = -sky * scales``, so the coadd's sky is 0 in every mode.
        Without it, only 'background' applies offsets; 'exptime' and 'photometric'
        are purely multiplicative (the sky pedestal is scaled with the data).
    n_frames : optional check of the number of frames.

    Returns
    -------
    FrameScales(scales, offsets, units, levels): float64 arrays of length n_frames, the
    units convention above, and the sky level each frame keeps after scaling (0 when
    subtracted; None without ``sky``), which the two-frame rule compares values above.
    """
    if scale not in SCALES:
        raise ValueError(f"scale = {scale!r} is not one of {', '.join(map(repr, SCALES))}")
    lengths = [np.size(v) for v in (exptime, sky, flux_ratio) if v is not None]
    n = n_frames if n_frames is not None else (lengths[0] if lengths else None)
    if n is None:
        raise ValueError("scale = 'none' without sky levels needs n_frames")

    units = "input"
    if scale == "exptime":
        scales = 1.0 / _per_frame("exptime", exptime, n, positive=True)
        units = "input/s"
    elif scale == "photometric":
        scales = 1.0 / _per_frame("flux_ratio", flux_ratio, n, positive=True)
        units = "reference"
    else:
        scales = np.ones(n)

    if subtract_background:
        offsets = -_per_frame("sky", sky, n, positive=False) * scales
    elif scale == "background":
        level = _per_frame("sky", sky, n, positive=False)
        offsets = np.median(level) - level
    else:
        offsets = np.zeros(n)
    levels = None
    if sky is not None and np.size(sky) == n:
        levels = np.nan_to_num(np.asarray(sky, np.float64).reshape(n)) * scales + offsets
    return FrameScales(scales, offsets, units, levels)


def electrons_per_unit(unit: str, gain) -> np.ndarray:
    """Electrons per pixel-value unit of each frame: 1 for frames in electrons (whatever
    their GAIN card says), else the header GAIN (e-/ADU)."""
    gain = np.asarray(gain, dtype=np.float64)
    return np.ones_like(gain) if unit == "electron" else gain


def effective_gain(method: str, gain, scales, weights=None, *, nlow: int = 0,
                   nhigh: int = 0) -> float:
    """Electrons per unit of the coadd, for its Poisson noise: ``variance = value / G``.

    Frame i has ``gain_i`` electrons per unit of its own (`electrons_per_unit`) and is
    multiplied by ``s_i`` (``scales``). A source of S coadd units has Poisson variance
    ``S * s_i / gain_i`` in frame i (scaled); the weighted mean (``w_i``, 1 unless
    ``weighted``) of N frames then has variance ``S * sum(w_i**2 s_i / gain_i) /
    sum(w_i)**2``, so

        G = sum(w_i)**2 / sum(w_i**2 * s_i / gain_i)

    (N frames alike: ``G = N * gain / s``; scaled by exposure time, ``gain * sum(t_i)``).
    ``median``: times 2/pi (the median's variance is pi/2 that of the mean); ``minmax``:
    times (N - nlow - nhigh) / N (that many values kept per pixel); ``sigclip``: as the
    mean (clipping removes few values of a source's own noise).
    """
    gain = np.asarray(gain, dtype=np.float64)
    scales = np.asarray(scales, dtype=np.float64)
    w = np.ones_like(scales) if weights is None else np.asarray(weights, dtype=np.float64)
    g = float(np.sum(w) ** 2 / np.sum(w**2 * scales / gain))
    n = scales.size
    if method == "median":
        g *= 2.0 / np.pi
    elif method == "minmax":
        g *= max(n - nlow - nhigh, 1) / n
    return g


def inverse_variance_weights(gain, rdnoise, sky, exptime=None, scale=None) -> np.ndarray:
    """Per-frame weights ``1 / variance`` of a sky pixel, in the units of the coadd.

    The variance of a sky pixel of frame i in its own data units (ADU if ``gain`` is
    the e-/ADU conversion, electrons with ``gain = 1``) is
    ``(sky_i * gain_i + rdnoise_i**2) / gain_i**2`` (Poisson noise of the sky plus
    read noise in electrons). After scaling by ``s_i`` the variance is multiplied by
    ``s_i**2``. ``s_i`` is ``scale`` (e.g. ``frame_scales(...).scales``) if given, else
    ``1 / exptime`` if ``exptime`` is given (the 'exptime' mode), else 1.

    ``sky`` is the sky level *before* any background subtraction (the noise stays when
    the level is removed). Each argument is a scalar or one value per frame. The
    weights are not normalised: with them `combine_stack(method='weighted')` returns
    a ``weight`` map equal to the inverse variance of the coadd's sky.
    """
    gain = np.asarray(gain, dtype=np.float64)
    rdnoise = np.asarray(rdnoise, dtype=np.float64)
    sky = np.asarray(sky, dtype=np.float64)
    if np.any(gain <= 0) or np.any(rdnoise < 0) or np.any(sky < 0):
        raise ValueError("gain must be > 0, rdnoise and sky >= 0")
    if scale is not None:
        s = np.asarray(scale, dtype=np.float64)
    elif exptime is not None:
        t = np.asarray(exptime, dtype=np.float64)
        if np.any(t <= 0):
            raise ValueError("exptime must be > 0")
        s = 1.0 / t
    else:
        s = np.float64(1.0)
    variance = (sky * gain + rdnoise**2) / gain**2 * s**2
    if np.any(variance <= 0) or not np.all(np.isfinite(variance)):
        raise ValueError("variance must be finite and > 0 (sky and read noise both zero?)")
    return np.atleast_1d(1.0 / variance)


# -- the per-block kernel -------------------------------------------------------------------
def _take(sorted_, index):
    """``sorted_[index[y, x], y, x]`` with the index clipped into range."""
    index = np.clip(index, 0, sorted_.shape[0] - 1)
    return np.take_along_axis(sorted_, index[None], axis=0)[0]


def _range_mean_std(values, inside, count, need_std=True):
    """Mean and population std (ddof=0) over the values where ``inside``."""
    with np.errstate(invalid="ignore", divide="ignore"):
        total = np.sum(np.where(inside, values, 0.0), axis=0, dtype=np.float64)
        mean = total / count
        if not need_std:
            return mean, None
        dev = np.where(inside, values - mean.astype(values.dtype), 0.0)
        var = np.sum(dev * dev, axis=0, dtype=np.float64) / count
    return mean, np.sqrt(var)


STRIP_BYTES = 2**20  # input of one strip of a block: it and its temporaries stay in cache


def _combine_in_strips(data, *planes, methods):
    """`_combine_block` with each of ``methods`` (its keyword options) over strips of
    rows of a block, each about `STRIP_BYTES` of input; ``(5 * len(methods), ty, tx)``.
    Every pixel is combined on its own, so the result is the same, but the temporaries
    of the sorts and sums (several times the input) stay small and hot in the cache
    instead of being fresh, page-faulted arrays of the whole block's size, and the
    methods read each strip while it is in the cache."""
    n, ny, nx = data.shape
    rows = max(1, STRIP_BYTES // max(1, 4 * n * nx))
    out = np.empty((5 * len(methods), ny, nx), np.float32)
    for y0 in range(0, ny, rows):
        strip = np.s_[:, y0:y0 + rows]
        parts = [None if p is None else p[strip] for p in planes]
        for k, options in enumerate(methods):
            out[5 * k:5 * k + 5, y0:y0 + rows] = _combine_block(data[strip], *parts, **options)
    return out


def _combine_block(
    data, weights=None, variance=None, kernel_power=None, *, rejection, estimator, sigma, iters, cenfunc, nlow,
    nhigh, scales, offsets, frame_weights, exptime, two_frames="none", pair_sigma=0.0,
    pair_fraction=0.0, sky_levels=None, compiled=True,
):
    """Combine one chunk ``(n_frames, ty, tx)`` -> ``(5, ty, tx)`` float32: image, weight,
    number of values used, variance (NaN without ``variance``), exposure (s)
    (``two_frames`` where two values cover a pixel, ``rejection``, then ``estimator``).

    The mean and the median without rejection, the coadds most runs make, go through a
    compiled loop (`daskstack._compiled.plain_combine`: one pass over each row of
    pixels, the median from a sorting network) that gives what the numpy below gives
    (``compiled=False``, its reference in the tests) without the sorts and the
    block-sized temporaries."""
    if compiled and rejection == "none" and estimator in ("mean", "median"):
        from ._compiled import plain_combine  # numba: only in the processes that combine

        return plain_combine(
            data, weights, variance, scales=scales, offsets=offsets, exptime=exptime,
            sky_levels=sky_levels, pair_sigma=pair_sigma if two_frames == "pair" else 0.0,
            pair_fraction=pair_fraction,
            median_factors=(median_variance_table(data.shape[0]) if estimator == "median"
                            else None))
    n = data.shape[0]
    values = np.asarray(data, dtype=np.float32)
    s = np.ones(n, np.float32) if scales is None else scales.astype(np.float32)
    if scales is not None or offsets is not None:
        o = np.zeros(n, np.float32) if offsets is None else offsets.astype(np.float32)
        values = values * s[:, None, None] + o[:, None, None]
    else:
        values = values.copy()
    valid = np.isfinite(values)
    if weights is not None:
        weights = np.asarray(weights)
        valid &= weights > 0
    if variance is not None:
        # scaling multiplies a value by s, its variance by s**2
        variance = np.asarray(variance, dtype=np.float32) * (s * s)[:, None, None]
        with np.errstate(invalid="ignore"):
            valid &= variance > 0  # NaN (no weight) and 0 both leave the value out
    exposure = (np.tensordot(np.asarray(exptime, np.float32), valid, axes=1)
                if exptime is not None else np.zeros(values.shape[1:], np.float32))
    valid = TWO_FRAME_REJECTIONS[two_frames](values, valid, variance, pair_sigma=pair_sigma,
                                             pair_fraction=pair_fraction,
                                             sky_levels=sky_levels)
    if variance is not None:
        variance[~valid] = np.nan
    values[~valid] = np.nan

    per_value_w = None
    if estimator == "weighted":
        fw = np.ones(n, np.float32) if frame_weights is None else frame_weights.astype(np.float32)
        per_value_w = np.broadcast_to(fw[:, None, None], values.shape)
        if weights is not None:
            per_value_w = np.where(valid, weights.astype(np.float32) * per_value_w, 0)
        if variance is not None:
            # per-pixel inverse variance of the input pixels (not of the resampled ones,
            # which a kernel smoothed by kernel_power: see daskstack.register)
            noise = variance
            if kernel_power is not None:
                noise = variance / np.asarray(kernel_power, dtype=np.float32)
            with np.errstate(invalid="ignore", divide="ignore"):
                per_value_w = np.where(valid, per_value_w / noise, 0).astype(np.float32)

    if rejection == "none" and estimator != "median":  # plain (weighted) mean: no sort
        count = valid.sum(axis=0)
        return _pack(*_mean_of(values, valid, count, per_value_w, variance), count, exposure)
    if rejection == "none":
        # the median of every valid value: only the values need sorting (the variance
        # sums over the same values in any order), not an argsort that carries the
        # variances along
        count = valid.sum(axis=0)
        image, weight, _ = _estimate_median(np.sort(values, axis=0), None, None,
                                            np.zeros(count.shape, np.intp), count)
        var = (np.full(count.shape, np.nan) if variance is None else
               _median_variance(variance, valid, count))
        return _pack(image, weight, var, count, exposure)

    # Sort each pixel's values (NaN last); every rejection keeps a contiguous range
    # [lo, hi) of the sorted values. Weights and variances travel with their values.
    if per_value_w is not None or variance is not None:
        order = np.argsort(values, axis=0, kind="stable")
        sorted_ = np.take_along_axis(values, order, axis=0)
        sorted_w = (None if per_value_w is None else
                    np.take_along_axis(np.ascontiguousarray(per_value_w), order, axis=0))
        sorted_v = None if variance is None else np.take_along_axis(variance, order, axis=0)
        del order
    else:
        sorted_ = np.sort(values, axis=0)
        sorted_w = sorted_v = None
    del values, variance
    nvalid = valid.sum(axis=0)
    del valid
    lo = np.zeros(nvalid.shape, np.intp)
    hi = nvalid.astype(np.intp)
    lo, hi = REJECTIONS[rejection](sorted_, lo, hi, sigma=sigma, iters=iters,
                                   cenfunc=cenfunc, nlow=nlow, nhigh=nhigh,
                                   sorted_v=sorted_v)
    count = hi - lo
    image, weight, var = ESTIMATORS[estimator](sorted_, sorted_w, sorted_v, lo, hi)
    return _pack(image, weight, var, count, exposure)


# Rejections: (sorted values, lo, hi, **options) -> the range [lo, hi) of each pixel's
# sorted valid values that is kept. ``sorted_v``: the values' variances, or None.
def _reject_none(sorted_, lo, hi, **_):
    return lo, hi


def _reject_minmax(sorted_, lo, hi, *, nlow, nhigh, **_):
    lo = np.minimum(lo + nlow, hi)
    hi = np.maximum(hi - nhigh, lo)
    return lo, hi


def _reject_sigclip(sorted_, lo, hi, *, sigma, iters, cenfunc, sorted_v=None, **_):
    # with variances, a value's spread is the larger of the stack's std and its own noise
    # (the noise model): the values of a shallow frame among deep ones are no longer cut
    # at a fraction of their own sigma (which biased the survivors' variance low), while
    # star cores, whose values differ by seeing more than by noise, keep the stack's
    # wider spread (and the two middle values, within one std of the median, stay)
    own_sigma = None if sorted_v is None else np.sqrt(sorted_v)
    k = np.arange(sorted_.shape[0]).reshape(-1, 1, 1)
    for _ in range(iters):
        count = hi - lo
        inside = (k >= lo) & (k < hi)
        if cenfunc == "median":
            cen = 0.5 * (_take(sorted_, lo + (count - 1) // 2)
                         + _take(sorted_, lo + count // 2))
            _, std = _range_mean_std(sorted_, inside, count)
        else:
            cen, std = _range_mean_std(sorted_, inside, count)
        std = std.astype(np.float32)
        if own_sigma is not None:
            std = np.fmax(std, own_sigma)
        cen = np.asarray(cen).astype(np.float32)
        with np.errstate(invalid="ignore"):
            low = sorted_ < (cen - std * np.float32(sigma))
            high = sorted_ > (cen + std * np.float32(sigma))
        # kept values stay a contiguous range: all up to the highest low outlier go, all
        # from the lowest high outlier on (with one spread for all, exactly those flagged;
        # with each value's own spread, also a rare lower value within its own bounds)
        new_lo = np.maximum(lo, np.max(np.where(inside & low, k, -1), axis=0) + 1)
        new_hi = np.minimum(hi, np.min(np.where(inside & high, k, sorted_.shape[0]), axis=0))
        new_hi = np.maximum(new_hi, new_lo)
        changed = np.any(new_lo != lo) or np.any(new_hi != hi)
        lo, hi = new_lo, new_hi
        if not changed:
            break
    return lo, hi


# Estimators: (sorted values, their weights or None, their variances or None, lo, hi)
# -> (image, weight, variance) of the kept range; the weight is the number of values, or
# the sum of their weights; the variance is the estimator's own (NaN without variances).
def _estimate_mean(sorted_, sorted_w, sorted_v, lo, hi):
    k = np.arange(sorted_.shape[0]).reshape(-1, 1, 1)
    count = hi - lo
    return _mean_of(sorted_, (k >= lo) & (k < hi), count, sorted_w, sorted_v)


def _estimate_median(sorted_, sorted_w, sorted_v, lo, hi):
    count = hi - lo
    with np.errstate(invalid="ignore"):
        med = 0.5 * (_take(sorted_, lo + (count - 1) // 2).astype(np.float64)
                     + _take(sorted_, lo + count // 2))
    med[count == 0] = np.nan
    variance = np.full(med.shape, np.nan)
    if sorted_v is not None:
        k = np.arange(sorted_.shape[0]).reshape(-1, 1, 1)
        variance = _median_variance(sorted_v, (k >= lo) & (k < hi), count)
    return med, count.astype(np.float64), variance


def _median_variance(sorted_v, inside, count):
    """Variance of the median of the values flagged ``inside`` (variances ``sorted_v``).

    For large n it is 1 / (4 n f(m)**2) with f the mean of the values' densities at the
    median: (pi/2) n / (sum 1/sigma_i)**2 for Gaussians (pi/2: the median's efficiency
    relative to the mean; sigma**2 / n for equal sigma); for small n the exact Gaussian
    factor of `median_variance_factor` replaces pi/2."""
    with np.errstate(invalid="ignore", divide="ignore"):
        inv_sigma = np.sum(np.where(inside, 1.0 / np.sqrt(sorted_v), 0.0), axis=0,
                           dtype=np.float64)
        factor = median_variance_table(sorted_v.shape[0])[count]
        variance = factor * count / inv_sigma**2
    variance[count == 0] = np.nan
    return variance


# Two-frame rules: (values, valid, variance or None, **options) -> valid, with the values
# rejected where exactly two frames cover a pixel (see "Two frames" in the module docstring).
def _pair_none(values, valid, variance, **_):
    return valid


def _pair_outlier(values, valid, variance, *, pair_sigma, pair_fraction, sky_levels, **_):
    """Reject the higher of two values that differ by more than the noise model allows."""
    if variance is None or not pair_sigma > 0:
        return valid
    ys, xs = np.nonzero(valid.sum(axis=0) == 2)
    if ys.size == 0:
        return valid
    ok = valid[:, ys, xs]
    # each value above its own frame's sky: frames whose sky was kept differ by it
    excess = values[:, ys, xs]
    if sky_levels is not None:
        excess = excess - sky_levels.astype(np.float32)[:, None]
    high = np.argmax(np.where(ok, excess, -np.inf), axis=0)
    low = np.argmin(np.where(ok, excess, np.inf), axis=0)
    column = np.arange(ys.size)
    e_high, e_low = excess[high, column], excess[low, column]
    var = variance[:, ys, xs]
    allowed = (np.float32(pair_sigma) * np.sqrt(var[high, column] + var[low, column])
               + np.float32(pair_fraction) * np.maximum(e_low, 0))
    out = e_high - e_low > allowed
    valid = valid.copy()
    valid[high[out], ys[out], xs[out]] = False
    return valid


TWO_FRAME_REJECTIONS = {"none": _pair_none, "pair": _pair_outlier}

REJECTIONS = {"none": _reject_none, "sigclip": _reject_sigclip, "minmax": _reject_minmax}
ESTIMATORS = {"mean": _estimate_mean, "median": _estimate_median, "weighted": _estimate_mean}
REJECTS = tuple(REJECTIONS)


@cache
def median_variance_factor(n: int) -> float:
    """Variance of the median of ``n`` Gaussian values of unit variance, times n: 1 for
    n = 1, 2, rising to pi/2 as n grows (exact order-statistic integrals up to
    ``n = 100``; pi/2 beyond, within 1.5 %)."""
    if n <= 2:
        return 1.0
    if n > 100:
        return float(np.pi / 2)
    from scipy.special import gammaln, log_ndtr

    half = 9.0 * np.sqrt(np.pi / (2 * n))
    x = np.linspace(-half, half, 1601 if n % 2 else 801)
    log_phi = -0.5 * x**2 - 0.5 * np.log(2 * np.pi)
    log_cdf, log_sf = log_ndtr(x), log_ndtr(-x)
    k = n // 2
    if n % 2:  # the (k+1)-th of n values
        log_c = gammaln(n + 1) - 2 * gammaln(k + 1)
        density = np.exp(log_c + k * (log_cdf + log_sf) + log_phi)
        return float(np.trapezoid(x**2 * density, x) * n)
    # even n: the mean of the k-th and (k+1)-th, from their joint density (x < y)
    log_c = gammaln(n + 1) - 2 * gammaln(k)
    xx, yy = np.meshgrid(x, x, indexing="ij")
    joint = np.where(xx < yy, np.exp(log_c + (k - 1) * (log_cdf[:, None] + log_sf[None, :])
                                     + log_phi[:, None] + log_phi[None, :]), 0.0)
    second_moment = np.trapezoid(np.trapezoid(((xx + yy) / 2) ** 2 * joint, x, axis=1), x)
    return float(second_moment / np.trapezoid(np.trapezoid(joint, x, axis=1), x) * n)


@cache
def median_variance_table(n_max: int) -> np.ndarray:
    """`median_variance_factor` for 0..n_max values (0 for none), as an array to index
    (read-only: made once per stack depth, not for every strip of every block)."""
    table = np.array([0.0] + [median_variance_factor(n) for n in range(1, n_max + 1)])
    table.flags.writeable = False
    return table


# -- the methods: the user's vocabulary, as rejection x estimator ---------------------------
def _no_cards(settings) -> list:
    return []


def _sigclip_cards(settings) -> list:
    return [("CLIPSIG", settings.sigma, "sigma-clipping threshold"),
            ("CLIPITER", settings.iters, "sigma-clipping iterations")]


@dataclass(frozen=True)
class CombineMethod:
    """One combine method as the user names it (``--combine NAME``).

    rejection : key of `REJECTIONS`, or None: taken from the ``reject`` argument
        (``weighted_reject`` in the settings).
    estimator : key of `ESTIMATORS`; 'weighted' also uses the per-frame weights.
    memory_factor : peak memory the work of one task allocates / its input block at 8
        bytes a value (measured, see the module docstring); the combine's block size
        keeps the product within a budget. Methods with equal factors get equal blocks,
        the block the store's chunks were sized for: no chunk is read twice.
    cards : ``settings -> [(keyword, value, comment), ...]``: the coadd header cards
        that record the method's parameters.
    two_frames : key of `TWO_FRAME_REJECTIONS`: the rule where only two frames cover a
        pixel, applied before ``rejection``.
    """

    rejection: str | None
    estimator: str
    memory_factor: float
    cards: Callable = _no_cards
    two_frames: str = "pair"


# A new method is one entry here (plus its tests); the names are what --combine takes.
COMBINE_METHODS = {
    "mean": CombineMethod("none", "mean", 2.6),
    "median": CombineMethod("none", "median", 2.6),
    "sigclip": CombineMethod("sigclip", "mean", 2.6, _sigclip_cards),
    # its nhigh already drops the higher of two values
    "minmax": CombineMethod("minmax", "mean", 2.6, two_frames="none"),
    "weighted": CombineMethod(None, "weighted", 2.6),
}
METHODS = tuple(COMBINE_METHODS)


def header_cards(method: str, settings) -> list:
    """The coadd header cards ``[(keyword, value, comment)]`` of ``method`` with the
    combine ``settings`` (`daskstack.config.CombineSettings`)."""
    spec = COMBINE_METHODS[method]
    cards = spec.cards(settings)
    if spec.two_frames == "pair":
        cards = cards + [
            ("PAIRSIG", settings.pair_sigma, "2 frames: higher rejected beyond (0: off)"),
            ("PAIRFRAC", settings.pair_fraction, "2 frames: + this fraction of lower signal")]
    return cards


def _combine_tile(tile: int, n_frames: int, shape, budget_bytes: int = 146 * 2**20,
                  methods=("sigclip",)) -> int:
    """Output block size for the combine: a block holds all frames of a tile, so shrink
    the tile as frames are added to keep each task's memory bounded (flat in N). A task
    needs its input block (8 bytes a value: data and variance, float32) times the
    largest ``memory_factor`` of the ``methods`` combined from it. The budget: a worker
    holds its libraries (~0.2-0.3 GiB) and a block or two in flight (the one combined,
    the next read); this one keeps such a process below 0.5 GiB at N = 10 to 100
    (`benchmarks/results/full-custom-20261201-043854.md`, made with the same blocks)."""
    factor = max(COMBINE_METHODS[m].memory_factor for m in methods)
    block = tile
    while block > 128 and n_frames * block * block * 8 * factor > budget_bytes:
        block //= 2
    return min(block, max(shape))


# -- per-frame scales of a store's frames ----------------------------------------------------
def _scales(cs, infos, background: str = "constant"):
    """Per-frame scales/offsets of the store's `FrameInfo` records ``infos``, registered
    with the sky model ``background`` (a key of `daskstack.sky.BACKGROUNDS`); a clear
    error names the frame whose record lacks a value."""
    from .sky import BACKGROUNDS

    model = BACKGROUNDS[background]
    subtract = cs.subtract_background and model.combine_subtracts

    def values(key):
        out = np.array([_or_nan(getattr(f, key)) for f in infos])
        bad = [f.file for f, v in zip(infos, out, strict=True) if not np.isfinite(v)]
        if bad and (cs.scale in _NEEDS.get(key, ()) or (key == "background" and subtract)):
            raise RunError(f"--scale {cs.scale}: no {key} known for {Path(bad[0]).name}")
        return out

    exptime, sky = values("exptime"), values("background")
    if model.sky_map is not None:  # registration removed each frame's sky: none is left
        sky = np.zeros(len(infos))
    if cs.scale == "photometric":
        zp = np.array([_or_nan(f.zp) for f in infos])
        if np.all(np.isfinite(zp)) and np.all(exptime > 0):
            return _zero_point_scales(subtract, zp,
                                      np.array([_or_nan(f.zp_err) for f in infos]),
                                      exptime, sky)
        missing = [Path(f.file).name for f, z in zip(infos, zp, strict=True)
                   if not np.isfinite(z)]
        log.warning("--scale photometric: no zero point for %d frame(s) (%s%s): scaled by "
                    "their catalog stars' flux ratio, with no MAGZP", len(missing),
                    ", ".join(missing[:3]), ", ..." if len(missing) > 3 else "")
    ratio = values("flux_ratio")
    if cs.scale == "photometric":
        ratio = ratio / np.median(ratio)  # the coadd is in the units of a typical frame
    return frame_scales(cs.scale, exptime=exptime, sky=sky, flux_ratio=ratio,
                        subtract_background=subtract, n_frames=len(infos))


def _zero_point_scales(subtract_background: bool, zp, zp_err, exptime, sky) -> FrameScales:
    """Every frame brought to one zero point: frame i's counts have the zero point
    ``zp_i + 2.5 log10(EXPTIME_i)``; the coadd's, MAGZP, is the median of those (the
    coadd is in the units of a typical frame), and frame i is scaled by
    ``10**(-0.4 (zp_i + 2.5 log10 EXPTIME_i - MAGZP))``. MAGZPERR is the frames'
    RMS zero-point error, not divided by sqrt(N): their errors share the catalog's."""
    counts_zp = zp + 2.5 * np.log10(exptime)
    magzp = float(np.median(counts_zp))
    ratio = 10.0 ** (0.4 * (counts_zp - magzp))
    scaled = frame_scales("photometric", exptime=exptime, sky=sky, flux_ratio=ratio,
                          subtract_background=subtract_background, n_frames=len(zp))
    return scaled._replace(magzp=magzp, magzp_err=float(np.sqrt(np.mean(zp_err**2))))


def difference_image(frame: np.ndarray, coadd: np.ndarray, scale: float,
                     offset: float) -> np.ndarray:
    """One registered frame, scaled as in the coadd (``frame * scale + offset``), minus
    the coadd: what varied (variable stars, transients). float32, NaN where either is."""
    return (frame * np.float32(scale) + np.float32(offset) - coadd).astype(np.float32)


_NEEDS = {"exptime": ("exptime",), "background": ("background",),
          "flux_ratio": ("photometric",)}


def _or_nan(value):
    return np.nan if value is None else float(value)


def _mean_of(values, inside, count, weights=None, variances=None):
    """(mean, summed weight, variance of the mean) per pixel of the values flagged
    ``inside``: plain, or weighted by ``weights`` (same shape as ``values``); the
    variance is ``sum(w**2 v) / sum(w)**2`` (``sum(v) / n**2`` unweighted), NaN without
    ``variances``."""
    nan = np.full(np.shape(count), np.nan)
    if weights is None:
        mean, _ = _range_mean_std(values, inside, count, need_std=False)
        variance = nan
        if variances is not None:
            with np.errstate(invalid="ignore", divide="ignore"):
                variance = np.sum(np.where(inside, variances, 0), axis=0,
                                  dtype=np.float64) / np.square(count, dtype=np.float64)
        return mean, count.astype(np.float64), variance
    w = np.where(inside, weights, 0)
    wsum = np.sum(w, axis=0, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.sum(np.where(inside, values * w, 0), axis=0, dtype=np.float64) / wsum
        variance = nan
        if variances is not None:
            variance = np.sum(np.where(inside, w * w * variances, 0), axis=0,
                              dtype=np.float64) / wsum**2
    return mean, wsum, variance


def _pack(image, weight, variance, count, exposure):
    out = np.empty((5,) + np.shape(count), np.float32)
    empty = (count == 0) | ~(weight > 0)
    out[0] = np.where(empty, np.nan, image)
    out[1] = np.where(empty, 0, weight)
    out[2] = np.where(empty, 0, count)
    out[3] = np.where(empty, np.nan, variance)
    out[4] = exposure
    return out


# -- the lazy combination -------------------------------------------------------------------
class CombineResult(NamedTuple):
    """Lazy results of `combine_stack`, all ``(ny, nx)`` dask arrays from one graph.

    image : float32, NaN where nothing was used.
    weight : float32, number of values used, or for 'weighted' the sum of the weights
        of the values used; 0 where nothing was used.
    nused : int32, number of values used per pixel.
    variance : float32, the variance of ``image`` by the method's own rule (NaN where
        nothing was used, or when no ``variance`` was given): exact for the (weighted)
        mean of the values kept (so for 'sigclip' and 'minmax' from the frames that
        survive), the median's from `median_variance_factor`.
    exposure : float32, summed exposure time (s) of the frames with a value at the
        pixel (0 without ``exptime``).

    The three share their tasks: compute (or store) them together, e.g.
    ``dask.compute(res.image, res.weight)`` or ``da.store([...])``, so each tile is
    combined once.
    """

    image: da.Array
    weight: da.Array
    nused: da.Array
    variance: da.Array
    exposure: da.Array


def _small(name, values, n):
    if values is None:
        return None
    arr = np.atleast_1d(np.asarray(values, dtype=np.float64))
    if arr.shape != (n,):
        raise ValueError(f"{name} must have one value per frame ({n}), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite")
    return arr


def combine_stack(
    data,
    weights=None,
    *,
    method: str = "sigclip",
    sigma: float = 3.0,
    iters: int = 3,
    cenfunc: str = "median",
    nlow: int = 1,
    nhigh: int = 1,
    scales=None,
    offsets=None,
    frame_weights=None,
    reject: str = "none",
    variance=None,
    kernel_power=None,
    exptime=None,
    pair_sigma: float = 4.0,
    pair_fraction: float = 0.5,
    sky_levels=None,
    _plan: bool = False,
) -> CombineResult:
    """Combine a registered stack ``(n_frames, ny, nx)`` into one image, lazily.

    data : dask or numpy array, NaN where a frame has no (good) value.
    weights : footprint of the same shape, or None; values with weight <= 0 are
        ignored, and for 'weighted' the footprint multiplies the frame weights.
    method : 'mean', 'median', 'sigclip', 'minmax' or 'weighted' (see the module
        docstring for the exact semantics).
    sigma, iters, cenfunc : sigma clipping ('sigclip', or 'weighted' with
        ``reject='sigclip'``): symmetric threshold, maximum iterations, centre
        'median' or 'mean' (spread: std).
    nlow, nhigh : 'minmax' (or ``reject='minmax'``): valid values rejected per pixel.
    scales, offsets : per-frame ``corrected = data * scales + offsets`` applied
        first (from `frame_scales`).
    frame_weights : per-frame weights for 'weighted' (e.g. `inverse_variance_weights`);
        None = footprint weights only (times the per-pixel inverse ``variance``).
    reject : rejection before the weighted mean, 'none', 'sigclip' or 'minmax'
        ('weighted' only).
    variance : each value's variance, same shape as ``data`` (the store's ``variance``),
        or None; NaN or <= 0 leaves the value out. It gives the coadd's ``variance``
        and makes 'weighted' an inverse-variance weighting per pixel.
    kernel_power : the resampling's ``sum of squared weights`` per value (the store's
        ``kernel_power``), or None (= 1): 'weighted' weights by ``kernel_power /
        variance``, the inverse variance of the input pixels.
    exptime : per-frame exposure times (s) for the ``exposure`` map, or None.
    pair_sigma, pair_fraction : where two values cover a pixel, the higher is rejected
        beyond ``pair_sigma`` sigma of the noise (needs ``variance``) plus
        ``pair_fraction`` of the lower's signal ("Two frames" in the module docstring);
        for the methods whose row says so (all but 'minmax'). ``pair_sigma=0``: off.
    sky_levels : per-frame sky level left in the values after scaling and offsets
        (``data * scales + offsets`` of the sky), or None (= 0: sky subtracted).

    Returns a `CombineResult` of dask arrays; nothing is computed. Chunks along the
    sky axes are those of ``data``.
    """
    if np.ndim(data) != 3:
        raise ValueError(f"data must be (n_frames, ny, nx), got shape {np.shape(data)}")
    if not isinstance(data, da.Array):
        data = da.from_array(np.asarray(data), chunks=(-1, "auto", "auto"))
    n = data.shape[0]
    if data.numblocks[0] != 1:
        data = data.rechunk({0: -1})
    kwargs = combine_options(
        n, method=method, sigma=sigma, iters=iters, cenfunc=cenfunc, nlow=nlow, nhigh=nhigh,
        scales=scales, offsets=offsets, frame_weights=frame_weights, reject=reject,
        exptime=exptime, pair_sigma=pair_sigma, pair_fraction=pair_fraction,
        sky_levels=sky_levels)

    args = [data]
    for name, extra in (("weights", weights), ("variance", variance),
                        ("kernel_power", kernel_power)):
        if extra is None:
            args.append(None)
            continue
        if np.shape(extra) != data.shape:
            raise ValueError(f"{name} shape {np.shape(extra)} != data shape {data.shape}")
        if not isinstance(extra, da.Array):
            extra = da.from_array(np.asarray(extra), chunks=data.chunks)
        elif extra.chunks != data.chunks:
            extra = extra.rechunk(data.chunks)
        args.append(extra)

    if _plan:  # for combine_stacks: the inputs and the block options, no graph
        return args, kwargs
    return combine_result(_packed(args, [kwargs], f"combine-{method}"))


def combine_result(stacked) -> CombineResult:
    """The `CombineResult` of a ``(5, ny, nx)`` array of packed blocks (the output of
    `_combine_block` or `combine_frames`, block by block): a dask array, or one block's
    numpy array."""
    return CombineResult(stacked[0], stacked[1], stacked[2].astype(np.int32), stacked[3],
                         stacked[4])


def combine_options(n, *, method="sigclip", sigma=3.0, iters=3, cenfunc="median", nlow=1,
                    nhigh=1, scales=None, offsets=None, frame_weights=None, reject="none",
                    exptime=None, pair_sigma=4.0, pair_fraction=0.5, sky_levels=None) -> dict:
    """The checked per-block options of a combine of ``n`` frames (arguments as for
    `combine_stack`), for `combine_frames` or the blocks of `combine_stack`."""
    if method not in COMBINE_METHODS:
        raise ValueError(f"method = {method!r} is not one of {', '.join(map(repr, METHODS))}")
    if reject not in REJECTIONS:
        raise ValueError(f"reject = {reject!r} is not one of {', '.join(map(repr, REJECTS))}")
    spec = COMBINE_METHODS[method]
    if reject != "none" and spec.rejection is not None:
        raise ValueError("reject applies to method='weighted' only")
    if frame_weights is not None and spec.estimator != "weighted":
        raise ValueError("frame_weights are used by method='weighted' only")
    if cenfunc not in ("median", "mean"):
        raise ValueError("cenfunc must be 'median' or 'mean'")
    if not sigma > 0 or int(iters) != iters or iters < 1:
        raise ValueError("sigma must be > 0 and iters an integer >= 1")
    if int(nlow) != nlow or int(nhigh) != nhigh or nlow < 0 or nhigh < 0:
        raise ValueError("nlow and nhigh must be integers >= 0")
    if not pair_sigma >= 0 or not pair_fraction >= 0:
        raise ValueError("pair_sigma and pair_fraction must be >= 0")
    if frame_weights is not None:
        frame_weights = _small("frame_weights", frame_weights, n)
        if np.any(frame_weights < 0):
            raise ValueError("frame_weights must be >= 0")
    return dict(
        rejection=reject if spec.rejection is None else spec.rejection,
        estimator=spec.estimator,
        sigma=float(sigma),
        iters=int(iters),
        cenfunc=cenfunc,
        nlow=int(nlow),
        nhigh=int(nhigh),
        scales=_small("scales", scales, n),
        offsets=_small("offsets", offsets, n),
        frame_weights=frame_weights,
        exptime=None if exptime is None else np.nan_to_num(
            np.asarray(exptime, dtype=np.float64)).reshape(n),
        two_frames=spec.two_frames,
        pair_sigma=float(pair_sigma),
        pair_fraction=float(pair_fraction),
        sky_levels=None if sky_levels is None else np.nan_to_num(_small(
            "sky_levels", np.nan_to_num(np.asarray(sky_levels, np.float64)), n)),
    )


def combine_stacks(data, weights=None, *, methods, **options) -> list[CombineResult]:
    """Several `combine_stack` results of one stack from one task per block: each block
    is read once and combined by every method in turn (several methods from separate
    graphs would share the reading tasks, whose blocks then travel between workers).

    methods : ``[(method, {option: value}), ...]``: each method with the options of its
        own (e.g. ``reject``); ``options``: those of `combine_stack` common to all.
    Returns one `CombineResult` per method, in order."""
    return split_results(packed_stacks(data, weights, methods=methods, **options))


def split_results(stacked) -> list[CombineResult]:
    """The `CombineResult` of each method of a packed ``(5 * methods, ny, nx)`` array
    (`packed_stacks`, or one block of it), in order."""
    return [combine_result(stacked[k:k + 5]) for k in range(0, stacked.shape[0], 5)]


def packed_stacks(data, weights=None, *, methods, **options):
    """`combine_stacks`, packed: one dask array ``(5 * len(methods), ny, nx)``, method
    ``k``'s result in rows ``5k .. 5k + 4`` as `combine_result` reads them. For a caller
    that consumes each block whole (every method's planes, in the task that made it)
    rather than plane by plane."""
    plans = [combine_stack(data, weights, method=method, **{**options, **own}, _plan=True)
             for method, own in methods]
    args = plans[0][0]  # the same stack for every method
    name = "combine-" + "-".join(method for method, _ in methods)
    return _packed(args, [kwargs for _, kwargs in plans], name)


def _packed(args, methods, token):
    """One map_blocks of `_combine_in_strips` over ``args``: ``(5 * len(methods), ...)``."""
    data = args[0]
    return da.map_blocks(
        _combine_in_strips,
        *args,
        chunks=((5 * len(methods),),) + data.chunks[1:],
        dtype=np.float32,
        token=token,
        meta=np.empty((0, 0, 0), np.float32),
        methods=methods,
    )


_PER_FRAME = ("scales", "offsets", "frame_weights", "exptime", "sky_levels")


def combine_frames(frames, data, weights=None, variance=None, kernel_power=None, *,
                   options: dict) -> np.ndarray:
    """One output block from only the frames ``frames`` (indices into the stack that
    ``options`` = `combine_options` describes) whose values ``data`` etc. hold, shape
    ``(len(frames), ty, tx)``: the same result as the block of `combine_stack` over every
    frame, where the others give nothing there. ``(5, ty, tx)`` float32, packed as
    `combine_result` reads it; a block no frame covers is empty (NaN, weight 0)."""
    frames = np.asarray(frames, dtype=int)
    if frames.size == 0:
        shape = np.shape(data)[1:]
        zero = np.zeros(shape)
        return _pack(zero, zero, zero, np.zeros(shape, int), np.zeros(shape, np.float32))
    subset = {k: (v[frames] if k in _PER_FRAME and v is not None else v)
              for k, v in options.items()}
    return _combine_in_strips(data, weights, variance, kernel_power, methods=[subset])
