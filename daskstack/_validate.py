"""Comparing WCS solutions: the measures used by the demo, the tests and the benchmarks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from .frames import quiet_astropy

__all__ = ["load_wcs", "wcs_error_px", "wcs_separation_arcsec"]


def load_wcs(source) -> WCS:
    """A WCS from a WCS object, a FITS header, or a FITS file (its primary header)."""
    if isinstance(source, WCS):
        return source
    with quiet_astropy():
        if isinstance(source, fits.Header):
            return WCS(source, relax=True)
        return WCS(fits.getheader(Path(source)), relax=True)


def _grid(shape, n=16):
    ny, nx = shape
    x, y = np.meshgrid(np.linspace(0, nx - 1, n), np.linspace(0, ny - 1, n))
    return x.ravel(), y.ravel()


def wcs_error_px(wcs, truth, shape, n: int = 16) -> float:
    """RMS (pixels) over an ``n`` x ``n`` grid across the frame between where ``wcs`` and
    ``truth`` put the same sky positions: sky of ``truth`` at each grid pixel, back to
    pixels through ``wcs``."""
    wcs, truth = load_wcs(wcs), load_wcs(truth)
    x, y = _grid(shape, n)
    with quiet_astropy():
        ra, dec = truth.all_pix2world(x, y, 0)
        x2, y2 = wcs.all_world2pix(ra, dec, 0)
    return float(np.sqrt(np.mean((x2 - x) ** 2 + (y2 - y) ** 2)))


def wcs_separation_arcsec(wcs, truth, shape, n: int = 16) -> float:
    """RMS angular separation (arcsec) over a grid of pixels between two WCSs."""
    from astropy.coordinates import SkyCoord

    wcs, truth = load_wcs(wcs), load_wcs(truth)
    x, y = _grid(shape, n)
    with quiet_astropy():
        a = SkyCoord(*wcs.all_pix2world(x, y, 0), unit="deg")
        b = SkyCoord(*truth.all_pix2world(x, y, 0), unit="deg")
    return float(np.sqrt(np.mean(a.separation(b).arcsec ** 2)))
