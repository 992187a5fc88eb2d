"""Small builders shared by tests (no files, no randomness beyond a seed)."""

from __future__ import annotations

import numpy as np
from astropy.wcs import WCS, Sip


def tan_wcs(shape, ra=150.0, dec=2.0, rotation_deg=0.0, scale_arcsec=0.389, sip=False):
    """A TAN (optionally TAN-SIP with ~2 px of distortion at the corners) WCS."""
    ny, nx = shape
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"] if sip else ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [ra, dec]
    wcs.wcs.crpix = [(nx + 1) / 2, (ny + 1) / 2]
    t = np.deg2rad(rotation_deg)
    s = scale_arcsec / 3600.0
    wcs.wcs.cd = s * np.array([[-np.cos(t), np.sin(t)], [np.sin(t), np.cos(t)]])
    if sip:
        half = max(nx, ny) / 2
        a = np.zeros((4, 4))
        b = np.zeros((4, 4))
        a[2, 0], a[0, 2], a[1, 1], a[3, 0] = (1.0 / half**2, -0.6 / half**2, 0.8 / half**2,
                                              0.5 / half**3)
        b[0, 2], b[2, 0], b[1, 2] = 1.0 / half**2, 0.5 / half**2, 0.5 / half**3
        wcs.sip = Sip(a, b, None, None, wcs.wcs.crpix)
    wcs.array_shape = shape
    return wcs
