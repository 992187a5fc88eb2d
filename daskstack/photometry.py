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
from astropy.stats import SigmaClip
from astropy.table import Table
from photutils.aperture import ApertureStats, CircularAnnulus, CircularAperture

__all__ = ["PHOT_FLAG_EDGE", "PHOT_FLAG_MASKED", "PHOT_FLAG_NO_SKY", "aperture_photometry"]

PHOT_FLAG_MASKED = 1  # a pixel of the aperture is masked, saturated or without variance
PHOT_FLAG_EDGE = 2  # the aperture leaves the image
PHOT_FLAG_NO_SKY = 4  # too few good annulus pixels for a local sky
MIN_SKY_PIXELS = 20


def aperture_photometry(data: np.ndarray, x, y, radius: float, *,
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
    radius : float
        Aperture radius (pixels).
    variance : 2-D array, optional
        Per-pixel variance of ``data`` (its unit squared); NaN = no data. Without it the
        errors come from the annulus scatter alone (sky-limited).
    mask : 2-D bool array, optional
        True for pixels to ignore.
    annulus : (r_in, r_out), optional
        Sky annulus radii (pixels); default ``(radius + 4, radius + 10)``.
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
    r_in, r_out = annulus if annulus is not None else (radius + 4.0, radius + 10.0)
    out = Table({"x": x, "y": y})
    n = len(x)
    flux = np.full(n, np.nan)
    flux_err = np.full(n, np.nan)
    sky = np.full(n, np.nan)
    area = np.full(n, np.nan)
    flags = np.zeros(n, np.int32)
    if n == 0:
        for name, col in (("flux", flux), ("flux_err", flux_err), ("sky", sky),
                          ("area", area), ("flags", flags)):
            out[name] = col
        return out

    ny, nx = data.shape
    edge = (x - radius < -0.5) | (y - radius < -0.5) | (x + radius > nx - 0.5) | \
        (y + radius > ny - 0.5)
    flags[edge] |= PHOT_FLAG_EDGE
    positions = np.column_stack([x, y])
    apertures = CircularAperture(positions, r=radius)
    annuli = CircularAnnulus(positions, r_in=r_in, r_out=r_out)
    clean = np.where(bad, 0.0, data)

    sky_stats = ApertureStats(data, annuli, mask=bad, sigma_clip=SigmaClip(sigma=3.0, maxiters=5))
    n_sky = np.atleast_1d(sky_stats.sum_aper_area.value)
    sky = np.atleast_1d(np.asarray(sky_stats.median, float))
    sky_std = np.atleast_1d(np.asarray(sky_stats.std, float))
    no_sky = ~(n_sky >= MIN_SKY_PIXELS) | ~np.isfinite(sky)
    flags[no_sky] |= PHOT_FLAG_NO_SKY

    # exact-overlap sums over the aperture; bad pixels counted apart (flag), not filled
    sums, _ = apertures.do_photometry(clean)
    area = np.atleast_1d(apertures.area_overlap(data, mask=bad))
    bad_weight, _ = apertures.do_photometry(bad.astype(float))
    flags[np.atleast_1d(bad_weight) > 1e-6] |= PHOT_FLAG_MASKED
    flux = np.atleast_1d(sums) - sky * area
    sky_err = sky_std / np.sqrt(np.maximum(n_sky, 1.0))
    sky_term = (area * sky_err) ** 2
    if variance is not None:
        var_sum, _ = apertures.do_photometry(np.where(bad, 0.0, variance))
        flux_err = np.sqrt(correlation * np.atleast_1d(var_sum) + sky_term)
    else:
        flux_err = np.sqrt(area * sky_std**2 * correlation + sky_term)
    flux[no_sky] = np.nan
    flux_err[no_sky] = np.nan
    out["flux"] = flux
    out["flux_err"] = flux_err
    out["sky"] = sky
    out["area"] = area
    out["flags"] = flags
    return out
