"""Aperture photometry at given pixel positions, with errors from the noise model.

One implementation for every flux daskstack measures on purpose: zero points of frames
(catalog stars), photometry on coadds, and forced photometry for light curves. Pure
computation on arrays (photutils' apertures do the pixel geometry, exact overlap).

The local sky is the sigma-clipped median of an annulus; the flux error is

    flux_err**2 = correlation * (sum(variance in the aperture) + area**2 * sky_err**2)

with ``sky_err`` the error of the annulus' clipped median (sqrt(pi/2) x its clipped
standard deviation over the square root of its pixel count), and ``correlation`` the factor by which resampling made an aperture's
variance exceed the sum of its pixels' variances (1 for a frame as observed; a coadd
records it in its header, ``register.KERNELS`` gives it per kernel): the annulus' mean
is a sum over correlated pixels too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from astropy.table import Table
from photutils.aperture import CircularAperture

from ._stats import clipped_rows

__all__ = ["PHOT_FLAG_EDGE", "PHOT_FLAG_MASKED", "PHOT_FLAG_NO_SKY", "ApertureCorrection",
           "aperture_correction", "aperture_photometry"]

PHOT_FLAG_MASKED = 1  # a pixel of the aperture is masked, saturated or without variance
PHOT_FLAG_EDGE = 2  # the aperture leaves the image
PHOT_FLAG_NO_SKY = 4  # too few good annulus pixels for a local sky
MIN_SKY_PIXELS = 20


def aperture_photometry(data: np.ndarray, x, y, radius, *,
                        variance: np.ndarray | None = None, mask: np.ndarray | None = None,
                        annulus: tuple[float, float] | None = None,
                        correlation: float = 1.0) -> Table:
    """Background-subtracted fluxes in circular apertures at 0-based pixel positions.

    Parameters
    ----------
    data : 2-D array
        Image (any unit); NaN marks pixels without data.
    x, y : array-like
        Aperture centres (0-based pixels, numpy ``[y, x]`` order of ``data``).
    radius : float or sequence of floats
        Aperture radius (pixels); several radii share one sky (each star's annulus is
        measured once), and ``flux``, ``flux_err``, ``area`` and ``flags`` then have one
        column per radius (shape ``(n, n_radii)``).
    variance : 2-D array, optional
        Per-pixel variance of ``data`` (its unit squared); NaN = no data. Without it the
        errors come from the annulus scatter alone (sky-limited).
    mask : 2-D bool array, optional
        True for pixels to ignore.
    annulus : (r_in, r_out), optional
        Sky annulus radii (pixels); default ``(radius + 4, radius + 10)`` (the largest
        radius).
    correlation : float
        Variance of an aperture sum over the sum of its pixels' variances (>= 1 after
        resampling).

    Returns
    -------
    Table with ``x, y, flux, flux_err, sky`` (per pixel), ``area``, ``flags``. A flagged
    measurement is still given where it can be computed; NaN where it cannot.
    """
    data = np.asarray(data, dtype=float)
    x = np.atleast_1d(np.asarray(x, float))
    y = np.atleast_1d(np.asarray(y, float))
    bad = ~np.isfinite(data)
    if mask is not None:
        bad |= np.asarray(mask, bool)
    if variance is not None:
        variance = np.asarray(variance, float)
        bad |= ~np.isfinite(variance)
    radii = np.atleast_1d(np.asarray(radius, float))
    r_in, r_out = annulus if annulus is not None else (radii.max() + 4.0, radii.max() + 10.0)
    out = Table({"x": x, "y": y})
    n = len(x)
    shape = (n,) if np.ndim(radius) == 0 else (n, len(radii))
    if n == 0:
        for name in ("flux", "flux_err", "sky", "area"):
            out[name] = np.full(shape if name != "sky" else n, np.nan)
        out["flags"] = np.zeros(shape, np.int32)
        return out

    ny, nx = data.shape
    positions = np.column_stack([x, y])
    clean = np.where(bad, 0.0, data)
    sky, sky_std, n_sky = _annulus_sky(data, bad, x, y, r_in, r_out)
    no_sky = ~(n_sky >= MIN_SKY_PIXELS) | ~np.isfinite(sky)
    # the error of a median: sqrt(pi/2) that of a mean of the same pixels
    sky_err = np.sqrt(np.pi / 2) * sky_std / np.sqrt(np.maximum(n_sky, 1.0))
    columns = {name: np.full((n, len(radii)), np.nan) for name in ("flux", "flux_err", "area")}
    flags = np.zeros((n, len(radii)), np.int32)
    for k, r in enumerate(radii):
        edge = (x - r < -0.5) | (y - r < -0.5) | (x + r > nx - 0.5) | (y + r > ny - 0.5)
        flags[edge, k] |= PHOT_FLAG_EDGE
        flags[no_sky, k] |= PHOT_FLAG_NO_SKY
        apertures = CircularAperture(positions, r=r)
        # exact-overlap sums over the aperture; bad pixels counted apart (flag), not filled
        sums, _ = apertures.do_photometry(clean)
        area = np.atleast_1d(apertures.area_overlap(data, mask=bad))
        bad_weight, _ = apertures.do_photometry(bad.astype(float))
        flags[np.atleast_1d(bad_weight) > 1e-6, k] |= PHOT_FLAG_MASKED
        flux = np.atleast_1d(sums) - sky * area
        sky_term = correlation * (area * sky_err) ** 2
        if variance is not None:
            var_sum, _ = apertures.do_photometry(np.where(bad, 0.0, variance))
            flux_err = np.sqrt(correlation * np.atleast_1d(var_sum) + sky_term)
        else:
            flux_err = np.sqrt(area * sky_std**2 * correlation + sky_term)
        flux[no_sky] = np.nan
        flux_err[no_sky] = np.nan
        columns["flux"][:, k], columns["flux_err"][:, k], columns["area"][:, k] = (
            flux, flux_err, area)
    squeeze = np.ndim(radius) == 0
    out["flux"] = columns["flux"][:, 0] if squeeze else columns["flux"]
    out["flux_err"] = columns["flux_err"][:, 0] if squeeze else columns["flux_err"]
    out["sky"] = sky
    out["area"] = columns["area"][:, 0] if squeeze else columns["area"]
    out["flags"] = flags[:, 0] if squeeze else flags
    return out


def _annulus_sky(data, bad, x, y, r_in: float, r_out: float):
    """Per position: the sigma-clipped (3 sigma, at most 5 iterations) median and standard
    deviation of the good pixels whose centres lie in the annulus, and their number;
    all positions at once (`daskstack._stats.clipped_rows`)."""
    ny, nx = data.shape
    half = int(np.ceil(r_out)) + 1
    offsets = np.arange(-half, half + 1)
    rows = np.floor(y + 0.5).astype(int)[:, None, None] + offsets[None, :, None]
    cols = np.floor(x + 0.5).astype(int)[:, None, None] + offsets[None, None, :]
    d2 = (cols - x[:, None, None]) ** 2 + (rows - y[:, None, None]) ** 2
    on_image = (rows >= 0) & (rows < ny) & (cols >= 0) & (cols < nx)
    rows, cols = np.clip(rows, 0, ny - 1), np.clip(cols, 0, nx - 1)
    take = (d2 >= r_in**2) & (d2 <= r_out**2) & on_image & ~bad[rows, cols]
    values = np.where(take, data[rows, cols], np.nan).reshape(len(x), -1)
    count = take.reshape(len(x), -1).sum(axis=1)
    median, std, _ = clipped_rows(values)
    empty = count == 0
    return np.where(empty, np.nan, median), np.where(empty, np.nan, std), count


@dataclass(frozen=True)
class ApertureCorrection:
    """Magnitude to add to a small-aperture magnitude for the star's total flux:
    ``mag_total = mag_small + correction`` (<= 0), with its error and the stars used."""

    correction: float = 0.0
    error: float = float("nan")
    n_stars: int = 0


def aperture_correction(data: np.ndarray, x, y, radius: float, big_radius: float, *,
                        variance: np.ndarray | None = None, mask: np.ndarray | None = None,
                        min_snr: float = 20.0, max_stars: int = 40,
                        clip_sigma: float = 3.0) -> ApertureCorrection:
    """The aperture correction of a frame from its bright stars at ``(x, y)``.

    Each star is measured (`aperture_photometry`) in ``radius`` and in ``big_radius``
    (large enough to hold all but a negligible part of the light: the sky annulus is
    beyond it); the correction is the clipped, weighted median of ``-2.5 log10(big /
    small)`` over the unflagged stars with S/N > ``min_snr`` in the big aperture (the
    brightest ``max_stars``), weighted by that S/N squared (the big aperture's noise
    dominates), its error the formal one, scaled up where the stars scatter more. Give isolated stars: a
    neighbour inside the big aperture biases it. No usable star: correction 0, error
    NaN, ``n_stars`` 0 (the caller decides).
    """
    big = aperture_photometry(data, x, y, big_radius, variance=variance, mask=mask)
    good = (big["flags"] == 0) & (np.asarray(big["flux"]) > min_snr * np.asarray(big["flux_err"]))
    if not good.any():
        return ApertureCorrection()
    index = np.nonzero(good)[0]
    index = index[np.argsort(-np.asarray(big["flux"])[index])][:max_stars]
    small = aperture_photometry(data, np.asarray(x, float)[index], np.asarray(y, float)[index],
                                radius, variance=variance, mask=mask,
                                annulus=(big_radius + 4.0, big_radius + 10.0))
    big_flux, big_err = np.asarray(big["flux"])[index], np.asarray(big["flux_err"])[index]
    small_flux = np.asarray(small["flux"])
    ratio = big_flux / small_flux
    ok = (small["flags"] == 0) & (ratio > 0) & np.isfinite(ratio)
    if not ok.any():
        return ApertureCorrection()
    delta = -2.5 * np.log10(ratio[ok])
    # the big aperture's sky noise dominates each star's error: weight by it
    weight = (big_flux[ok] / big_err[ok]) ** 2
    kept = np.ones(delta.size, bool)
    for _ in range(5):
        mean = float(np.average(delta[kept], weights=weight[kept]))
        pull = (delta - mean) * np.sqrt(weight) / 1.0857
        scale = max(1.0, float(1.4826 * np.median(np.abs(pull[kept]))))
        now = np.abs(pull) <= clip_sigma * scale
        if np.array_equal(now, kept) or now.sum() < 1:
            break
        kept = now
    mean = float(np.average(delta[kept], weights=weight[kept]))
    chi2 = float(np.sum(weight[kept] * (delta[kept] - mean) ** 2) / 1.0857**2
                 / max(kept.sum() - 1, 1)) if kept.sum() > 1 else 1.0
    # the weighted median: a neighbour fainter than the catalog's limit only ever adds light
    # to the big aperture, and the median does not follow such one-sided outliers (its
    # error: sqrt(pi/2) that of the mean)
    order = np.argsort(delta[kept])
    cumulative = np.cumsum(weight[kept][order])
    median = float(delta[kept][order][np.searchsorted(cumulative, 0.5 * cumulative[-1])])
    error = 1.2533 * 1.0857 * np.sqrt(max(chi2, 1.0) / np.sum(weight[kept]))
    return ApertureCorrection(median, float(error), int(kept.sum()))
