"""Aperture photometry at given pixel positions, with errors from the noise model.

One implementation for every flux daskstack measures on purpose: zero points of frames
(catalog stars), photometry on coadds, and forced photometry for light curves. Pure
computation on arrays (photutils' apertures do the pixel geometry, exact overlap).

The local sky is the sigma-clipped median of an annulus; the flux error is

    flux_err**2 = correlation * sum(variance in the aperture) + area**2 * sky_err**2

with ``sky_err`` the annulus' clipped standard deviation over the square root of its
pixel count, and ``correlation`` the factor by which resampling made an aperture's
variance exceed the sum of its pixels' variances (1 for a frame as observed; a coadd
records it in its header, ``register.KERNELS`` gives it per kernel).
"""

from __future__ import annotations

import numpy as np
from astropy.table import Table
from photutils.aperture import CircularAperture

from ._stats import clipped_rows

__all__ = ["PHOT_FLAG_EDGE", "PHOT_FLAG_MASKED", "PHOT_FLAG_NO_SKY", "aperture_photometry"]

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
    sky_err = sky_std / np.sqrt(np.maximum(n_sky, 1.0))
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
        sky_term = (area * sky_err) ** 2
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
