"""Robust statistics shared by the stages: one implementation of each.

* `mad_sigma` -- the standard deviation of a Gaussian from the median absolute
  deviation (1.4826 MAD), insensitive to the stars and cosmic rays among sky pixels.
* `clipped_rows` -- sigma-clipped median and standard deviation of each row of an array
  at once (the detection's background mesh, the photometry's sky annuli).
* `sky_level` -- sky level and noise of a frame from a strided sample of its good
  pixels (for frames that were never detected on).
* `residual_sigma` / `clip_residuals` -- the clipping rule for 2-D position residuals
  (distances between matched pairs) used by the pattern matcher, the WCS fit and the
  report's residual plots, so the three keep the same stars.

Pure numpy; no I/O.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["clip_residuals", "clipped_rows", "mad_sigma", "residual_sigma", "sky_level"]

MAD_TO_SIGMA = 1.4826  # 1 / Phi^-1(3/4): sigma of a Gaussian per unit of MAD
# median of a Rayleigh distribution (2-D Gaussian offsets, per-axis sigma s) = s sqrt(2 ln 2),
# so median / sqrt(ln 2) = sqrt(2) s, the RMS radius
RAYLEIGH_MEDIAN = 0.8326  # sqrt(ln 2), rounded as the solver has always used it


def mad_sigma(values, centre: float | None = None) -> float:
    """1.4826 x the median absolute deviation of ``values`` from ``centre`` (default:
    their median): the standard deviation of a Gaussian, robust to outliers."""
    values = np.asarray(values, np.float64)
    if centre is None:
        centre = float(np.median(values))
    return float(MAD_TO_SIGMA * np.median(np.abs(values - centre)))


def sky_level(data: np.ndarray, mask: np.ndarray | None = None,
              n_sample: int = 250_000) -> tuple[float, float]:
    """Sky level and noise per pixel (in the data's units) of a frame, without detecting
    anything: ``(level, noise)``, NaN when no pixel is usable.

    Sigma-clipped (3 sigma, at most 5 iterations) median and MAD-based standard
    deviation of a strided subsample of about ``n_sample`` unmasked, finite pixels: a
    few ms for a 4096 x 4096 frame. Stars and cosmic rays are clipped away. The MAD
    is used rather than the clipped standard deviation (``astropy.stats.
    sigma_clipped_stats``), which is biased low by the clipping (~1.3 % at 3 sigma) and
    high by the wings of faint stars; the MAD of a Gaussian clipped at 3 sigma is only
    0.27 % below the unclipped one, and that is corrected.
    """
    ny, nx = data.shape
    stride = max(1, int(math.sqrt(ny * nx / n_sample)))
    sample = data[::stride, ::stride]
    good = np.isfinite(sample)
    if mask is not None:
        good &= ~np.asarray(mask[::stride, ::stride], bool)
    values = np.asarray(sample[good], np.float64)
    if values.size == 0:
        return float("nan"), float("nan")
    med = float(np.median(values))
    sig = mad_sigma(values, med)
    for _ in range(5):
        keep = np.abs(values - med) <= 3.0 * max(sig, 1e-12)
        if keep.sum() < 10:
            break
        new_med = float(np.median(values[keep]))
        new_sig = mad_sigma(values[keep], new_med)
        if abs(new_med - med) < 1e-3 * max(sig, 1e-12) and abs(new_sig - sig) < 1e-3 * sig:
            med, sig = new_med, new_sig
            break
        med, sig = new_med, new_sig
    # the MAD of a Gaussian clipped at 3 sigma is 0.27 % below the unclipped one
    return med, sig / 0.9973


def residual_sigma(distances) -> float:
    """Robust scale of 2-D position residuals: ``1.4826 x median(d) / sqrt(ln 2)``
    (0 for no residuals). For Gaussian offsets of per-axis sigma s the median distance
    is ``s sqrt(2 ln 2)``, so this is 1.4826 x the RMS radius: a deliberately generous
    scale, so that clipping at a few of it removes only mismatches."""
    distances = np.asarray(distances, np.float64)
    if distances.size == 0:
        return 0.0
    return MAD_TO_SIGMA * np.median(distances) / RAYLEIGH_MEDIAN


def clip_residuals(distances, clip_sigma: float, floor: float, *, fit=None) -> np.ndarray:
    """Which pairs to keep: ``distances <= max(clip_sigma x residual_sigma, floor)``.

    The scale is measured on the pairs flagged in ``fit`` (a boolean mask; default all),
    the cut applied to all of them; ``floor`` (same unit as ``distances``) keeps a tight
    set of pairs from clipping its own noise.
    """
    distances = np.asarray(distances, np.float64)
    sample = distances if fit is None else distances[fit]
    return distances <= max(clip_sigma * residual_sigma(sample), floor)


def clipped_rows(values: np.ndarray, sigma: float = 3.0, iters: int = 5):
    """Sigma-clipped median and standard deviation of each row (NaN = excluded).

    One sort per row, then every clipping iteration is a contiguous range of the
    sorted row (cumulative sums give its mean and variance): no Python loop per row.
    Returns (median, std, n_used).
    """
    v = np.sort(values, axis=1)
    nrow, ncol = v.shape
    n_valid = np.isfinite(v).sum(axis=1)
    vf = np.where(np.isfinite(v), v, 0.0).astype(np.float64)
    c1 = np.concatenate([np.zeros((nrow, 1)), np.cumsum(vf, axis=1)], axis=1)
    c2 = np.concatenate([np.zeros((nrow, 1)), np.cumsum(vf * vf, axis=1)], axis=1)
    rows = np.arange(nrow)
    lo = np.zeros(nrow, int)
    hi = n_valid.copy()
    for _ in range(iters):
        n = np.maximum(hi - lo, 1)
        mid_a = np.clip(lo + (n - 1) // 2, 0, ncol - 1)
        mid_b = np.clip(lo + n // 2, 0, ncol - 1)
        med = 0.5 * (vf[rows, mid_a] + vf[rows, mid_b])
        mean = (c1[rows, hi] - c1[rows, lo]) / n
        var = np.maximum((c2[rows, hi] - c2[rows, lo]) / n - mean**2, 0.0)
        std = np.sqrt(var)
        new_lo = (v < (med - sigma * std)[:, None]).sum(axis=1)
        new_hi = (v <= (med + sigma * std)[:, None]).sum(axis=1)
        if np.array_equal(new_lo, lo) and np.array_equal(new_hi, hi):
            break
        ok = new_hi - new_lo >= 3
        lo = np.where(ok, new_lo, lo)
        hi = np.where(ok, new_hi, hi)
    n = np.maximum(hi - lo, 1)
    med = 0.5 * (vf[rows, np.clip(lo + (n - 1) // 2, 0, ncol - 1)]
                 + vf[rows, np.clip(lo + n // 2, 0, ncol - 1)])
    mean = (c1[rows, hi] - c1[rows, lo]) / n
    std = np.sqrt(np.maximum((c2[rows, hi] - c2[rows, lo]) / n - mean**2, 0.0))
    return med, std, hi - lo
