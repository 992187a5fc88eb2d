"""Synthetic LCO-like frames with known truth: for tests, ``daskstack demo`` and benchmarks.

A simulated field is a Gaia-like catalog (`make_catalog`) seen through a set of
frames. Each frame has a *true* WCS (`true_frame_wcs`, TAN or TAN-SIP) that
places every star exactly, and an LCO-style header (`lco_header`) whose WCS is
wrong the way a telescope's nominal WCS is wrong (pointing error, rotation
error, optionally a scale error and a 180-degree rotation). Pixels come from
`render_frame` (Moffat stars on small stamps, round or asymmetric - comatic,
trailed - with the photocentre at the catalog position, sky with a gradient, noise,
saturation, cosmic rays, bad columns, an optional satellite trail) and are
written by `write_lco_frame` as fpack-compressed multi-extension FITS that
`daskstack.frames.read_frame` reads like a real LCO ``e91`` product.

Conventions
-----------
* Pixel coordinates are 0-based (numpy / astropy ``world_to_pixel``), x along
  the second array axis; shapes are ``(ny, nx)``.
* Pixel values are ADU (counts) = electrons / gain, as in LCO files (whose
  GAIN is ~1, i.e. electrons). ``sky`` is in ADU per pixel.
* Photometric model: a star of magnitude ``m`` (the catalog's
  ``phot_g_mean_mag``, in every filter, unless the stars have colours: then the
  magnitude in the filter's band, ``<band>_mag``, moved by the colour term,
  ``m = m_band - colour_term * (g - r)``, and the zero point lowered by the
  extinction, ``k * airmass``)
  gives ``exptime * transparency * 10**(-0.4 * (m - zeropoint))`` electrons,
  all of them inside its stamp (the Moffat profile is truncated where it falls
  well below the noise and renormalised), before saturation.
* Noise: Poisson on star + sky (drawn exactly where the expected count is
  below ``poisson_threshold`` electrons, and with its Gaussian limit above,
  which is indistinguishable there and ten times faster), plus Gaussian read
  noise.
* Proper motion: catalog positions (at ``ref_epoch``) move linearly on the sky
  with ``pmra`` (which includes cos(dec)) and ``pmdec`` to the frame epoch;
  parallax is not applied.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.coordinates import Angle
from astropy.io import fits
from astropy.table import Table
from astropy.time import Time
from astropy.wcs import WCS, Sip

from ._io import atomic_path
from .frames import quiet_astropy

__all__ = [
    "DEFAULT_EXPTIME",
    "PSF_SHAPES",
    "SKY_MAG",
    "ZEROPOINTS",
    "SimulatedField",
    "lco_frame_name",
    "lco_header",
    "make_catalog",
    "nominal_wcs",
    "propagate",
    "psf_components",
    "random_sip",
    "render_frame",
    "simulate_field",
    "star_positions",
    "true_frame_wcs",
    "write_lco_frame",
    "write_truth_wcs",
]

log = logging.getLogger(__name__)

# Magnitude giving 1 electron/s on an LCO 1-m telescope with a Sinistro camera
# (roughly; the simulated stars have no colours, so these only set the depth).
ZEROPOINTS = {
    "up": 21.0, "U": 21.0, "B": 22.7, "gp": 23.4, "V": 23.0, "rp": 23.5, "R": 23.4,
    "ip": 23.1, "I": 22.8, "zs": 22.3, "Y": 21.3, "w": 24.3,
}
# Sky brightness, mag / arcsec^2 (grey time).
SKY_MAG = {
    "up": 21.6, "U": 21.6, "B": 21.8, "gp": 21.3, "V": 20.8, "rp": 20.3, "R": 20.2,
    "ip": 19.6, "I": 19.4, "zs": 18.9, "Y": 18.2, "w": 20.6,
}
DEFAULT_EXPTIME = {
    "up": 180.0, "U": 180.0, "B": 120.0, "gp": 90.0, "V": 90.0, "rp": 60.0, "R": 60.0,
    "ip": 60.0, "I": 60.0, "zs": 90.0, "Y": 120.0, "w": 30.0,
}
DEFAULT_ZEROPOINT = 23.0
DEFAULT_SKY_MAG = 20.5

# Stars per square degree between G=10 and G=20: ~25 stars in a 256x256 frame at
# 0.389"/px and ~1500 in a 2048x2048 one (a rich field, not the galactic plane).
DEFAULT_DENSITY = 33000.0
COUNTS_SLOPE = 0.3  # dlog10 N / dm

# Sites and telescopes for the default names (Sinistro 4k cameras on 1-m telescopes).
DEFAULT_SITE = "lsc"
DEFAULT_TELESCOPE = "1m0-09"
DEFAULT_INSTRUMENT = "fa15"
SITE_LONGITUDE = {"lsc": -70.80, "cpt": 20.81, "coj": 149.07, "elp": -104.02,
                  "ogg": -156.26, "tfn": -16.51, "tlv": 34.76}


# ---------------------------------------------------------------------------------------
# The result
# ---------------------------------------------------------------------------------------
@dataclass
class SimulatedField:
    """What `simulate_field` wrote."""

    frames: list[Path]  # the .fits.fz files, in order
    catalog: Path  # <dir>/catalog.ecsv (Gaia-like)
    truth_wcs: dict[str, Path]  # frame name -> <dir>/truth/<name>.wcs
    truth: Path  # <dir>/truth.ecsv, one row per frame
    center: tuple[float, float]  # (ra, dec) deg

    def truth_table(self) -> Table:
        return Table.read(self.truth, format="ascii.ecsv")

    def catalog_table(self) -> Table:
        return Table.read(self.catalog, format="ascii.ecsv")

    def wcs(self, name) -> WCS:
        """The true WCS (with SIP if any) of a frame, by name or path."""
        from .frames import frame_name

        key = frame_name(name)
        with quiet_astropy():
            return WCS(fits.getheader(self.truth_wcs[key]))


# ---------------------------------------------------------------------------------------
# Sky geometry helpers
# ---------------------------------------------------------------------------------------
def _offset(ra, dec, east_arcsec, north_arcsec):
    """Move (ra, dec) [deg] by a great-circle offset given as (east, north) arcsec."""
    ra = np.radians(ra)
    dec = np.radians(dec)
    east = np.radians(np.asarray(east_arcsec, dtype=float) / 3600.0)
    north = np.radians(np.asarray(north_arcsec, dtype=float) / 3600.0)
    rho = np.hypot(east, north)
    pa = np.arctan2(east, north)
    sin_dec2 = np.sin(dec) * np.cos(rho) + np.cos(dec) * np.sin(rho) * np.cos(pa)
    dec2 = np.arcsin(np.clip(sin_dec2, -1.0, 1.0))
    ra2 = ra + np.arctan2(np.sin(pa) * np.sin(rho) * np.cos(dec),
                          np.cos(rho) - np.sin(dec) * sin_dec2)
    return np.degrees(ra2) % 360.0, np.degrees(dec2)


def _tangent_offset(ra0, dec0, ra, dec):
    """(east, north) arcsec of (ra, dec) in the gnomonic plane centred on (ra0, dec0)."""
    ra0, dec0, ra, dec = (np.radians(v) for v in (ra0, dec0, ra, dec))
    cosc = np.sin(dec0) * np.sin(dec) + np.cos(dec0) * np.cos(dec) * np.cos(ra - ra0)
    xi = np.cos(dec) * np.sin(ra - ra0) / cosc
    eta = (np.cos(dec0) * np.sin(dec) - np.sin(dec0) * np.cos(dec) * np.cos(ra - ra0)) / cosc
    return np.degrees(xi) * 3600.0, np.degrees(eta) * 3600.0


def _rotation(deg: float) -> np.ndarray:
    t = math.radians(deg)
    return np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])


def _as_rng(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def _to_time(value) -> Time:
    """A decimal (Julian) year, an ISO date string or a Time -> Time."""
    if isinstance(value, Time):
        return value
    if isinstance(value, str):
        return Time(value, scale="utc")
    return Time(float(value), format="jyear", scale="utc")


# ---------------------------------------------------------------------------------------
# Catalog
# ---------------------------------------------------------------------------------------
def make_catalog(
    center=(150.1, 2.2),
    radius_deg: float = 0.25,
    *,
    density_per_sq_deg: float = DEFAULT_DENSITY,
    mag_range=(10.0, 20.0),
    seed=0,
    epoch: float = 2016.0,
    high_pm_fraction: float = 0.0,
    max_pm_mas: float = 1000.0,
    n_stars: int | None = None,
    colours: bool = False,
) -> Table:
    """A Gaia DR3-like catalog of random stars in a cone.

    Columns: ``source_id`` (int64), ``ra``, ``dec`` (deg, at ``ref_epoch``),
    ``phot_g_mean_mag``, ``pmra`` (mas/yr, includes cos dec), ``pmdec`` (mas/yr),
    ``parallax`` (mas), ``ref_epoch`` (yr). Positions are uniform on the sphere
    within ``radius_deg``; magnitudes follow number counts N(<m) ~ 10**(0.3 m)
    within ``mag_range``; the number of stars is Poisson with mean
    ``density_per_sq_deg`` x area (or exactly ``n_stars``). Ordinary stars get
    proper motions of a few mas/yr; a fraction ``high_pm_fraction`` get between
    0.3 and 1 times ``max_pm_mas`` in a random direction. With ``colours``, true
    magnitudes in the bands g, r, i, z too (``<band>_mag``, ``_err`` 0: the truth):
    ``r_mag = phot_g_mean_mag``, g - r uniform in 0.2-1.4 (main-sequence-like),
    r - i = 0.45 (g - r) - 0.05 and i - z = 0.3 (g - r) - 0.05.
    """
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 1])
    ra0, dec0 = float(center[0]), float(center[1])
    radius = math.radians(float(radius_deg))
    area_sq_deg = 2.0 * math.pi * (1.0 - math.cos(radius)) * (180.0 / math.pi) ** 2
    n = int(n_stars) if n_stars is not None else int(rng.poisson(density_per_sq_deg * area_sq_deg))
    # positions: uniform in the spherical cap
    cos_rho = 1.0 - rng.random(n) * (1.0 - math.cos(radius))
    rho_arcsec = np.degrees(np.arccos(np.clip(cos_rho, -1, 1))) * 3600.0
    pa = rng.random(n) * 2.0 * math.pi
    ra, dec = _offset(ra0, dec0, rho_arcsec * np.sin(pa), rho_arcsec * np.cos(pa))
    # magnitudes: inverse CDF of 10**(0.3 m) between mag_range
    m_lo, m_hi = float(min(mag_range)), float(max(mag_range))
    u_lo = 10.0 ** (COUNTS_SLOPE * (m_lo - m_hi))
    mag = m_hi + np.log10(u_lo + (1.0 - u_lo) * rng.random(n)) / COUNTS_SLOPE
    # parallax: nearer for brighter stars (roughly), in mas
    parallax = np.exp(rng.normal(0.0, 0.8, n)) * 10.0 ** (-0.1 * (mag - 12.0))
    # proper motions: a few mas/yr, scaling with parallax
    pm_scale = 2.0 + 4.0 * parallax
    pmra = rng.normal(0.0, 1.0, n) * pm_scale
    pmdec = rng.normal(0.0, 1.0, n) * pm_scale
    if high_pm_fraction > 0 and n:
        fast = rng.random(n) < float(high_pm_fraction)
        k = int(fast.sum())
        speed = float(max_pm_mas) * rng.uniform(0.3, 1.0, k)
        angle = rng.random(k) * 2.0 * math.pi
        pmra[fast] = speed * np.sin(angle)
        pmdec[fast] = speed * np.cos(angle)
        parallax[fast] = 4.74 * speed / rng.uniform(20.0, 80.0, k)  # v_t 20-80 km/s
    source_id = (np.int64(10) ** 18 * (1 + int(seed) % 6)
                 + np.cumsum(rng.integers(1, 10**9, n, dtype=np.int64)))
    table = Table()
    table["source_id"] = source_id.astype(np.int64)
    table["ra"] = ra * u.deg
    table["dec"] = dec * u.deg
    table["phot_g_mean_mag"] = mag.astype(np.float32) * u.mag
    table["pmra"] = pmra * (u.mas / u.yr)
    table["pmdec"] = pmdec * (u.mas / u.yr)
    table["parallax"] = parallax * u.mas
    table["ref_epoch"] = np.full(n, float(epoch)) * u.yr
    if colours:
        # a stream of its own: the positions and magnitudes stay those without colours
        g_r = np.random.default_rng([int(seed) & 0xFFFFFFFF, 7]).uniform(0.2, 1.4, n)
        r_mag = mag.astype(np.float32).astype(float)
        i_mag = r_mag - (0.45 * g_r - 0.05)
        for band, values in (("g", r_mag + g_r), ("r", r_mag), ("i", i_mag),
                             ("z", i_mag - (0.3 * g_r - 0.05))):
            table[f"{band}_mag"] = values * u.mag
            table[f"{band}_mag_err"] = np.zeros(n) * u.mag
    table.meta["comments"] = ["simulated Gaia DR3-like catalog (daskstack.simulate)"]
    table.meta.update({"center_ra": ra0, "center_dec": dec0, "radius_deg": float(radius_deg),
                       "seed": int(seed)})
    return table


def _column(table, names, default=None):
    for name in names:
        if name in table.colnames:
            col = table[name]
            values = np.ma.filled(np.ma.asarray(col, dtype=float), np.nan)
            return np.asarray(values, dtype=float)
    if default is None:
        raise KeyError(f"catalog has none of the columns {names}")
    return np.full(len(table), float(default))


def propagate(catalog: Table, epoch) -> tuple[np.ndarray, np.ndarray]:
    """Catalog (ra, dec) [deg] moved linearly with proper motion to ``epoch`` (decimal year)."""
    ra = _column(catalog, ("ra",))
    dec = _column(catalog, ("dec",))
    if epoch is None:
        return ra, dec
    ref = _column(catalog, ("ref_epoch",), 2016.0)
    pmra = np.nan_to_num(_column(catalog, ("pmra",), 0.0))
    pmdec = np.nan_to_num(_column(catalog, ("pmdec",), 0.0))
    dt = float(_to_time(epoch).jyear) - ref
    dt = np.nan_to_num(dt)
    dec_t = dec + pmdec * dt / 3.6e6
    ra_t = ra + pmra * dt / 3.6e6 / np.cos(np.radians(0.5 * (dec + dec_t)))
    return ra_t % 360.0, dec_t


def star_positions(catalog: Table, wcs: WCS, epoch=None, *, shape=None, margin: float = 0.0):
    """True 0-based pixel positions of catalog stars at ``epoch`` (SIP honoured).

    Returns ``(x, y, index)``: if ``shape`` is given, only stars within
    ``margin`` pixels of the frame, with their row numbers in the catalog.
    """
    ra, dec = propagate(catalog, epoch)
    index = np.arange(len(ra))
    if shape is not None:
        ny, nx = shape
        # cheap first cut with the linear part (SIP adds at most a few pixels)
        crval = wcs.wcs.crval
        east, north = _tangent_offset(crval[0], crval[1], ra, dec)
        scale = np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix))) * 3600.0
        half_diag = 0.5 * math.hypot(nx, ny) + margin + 64.0
        near = np.hypot(east, north) < half_diag * scale
        ra, dec, index = ra[near], dec[near], index[near]
    if len(ra) == 0:
        return np.empty(0), np.empty(0), index
    with quiet_astropy():
        if wcs.sip is not None:
            x, y = wcs.all_world2pix(ra, dec, 0, tolerance=1e-7, maxiter=50, quiet=True)
        else:
            x, y = wcs.wcs_world2pix(ra, dec, 0)
    if shape is not None:
        ny, nx = shape
        inside = ((x > -0.5 - margin) & (x < nx - 0.5 + margin)
                  & (y > -0.5 - margin) & (y < ny - 0.5 + margin))
        x, y, index = x[inside], y[inside], index[inside]
    return np.asarray(x), np.asarray(y), index


# ---------------------------------------------------------------------------------------
# WCS
# ---------------------------------------------------------------------------------------
def _sip_arrays(sip) -> tuple[np.ndarray, np.ndarray]:
    """SIP forward coefficients as (A, B) square arrays; accepts arrays or A_p_q keywords."""
    if isinstance(sip, Sip):
        return np.array(sip.a), np.array(sip.b)
    if isinstance(sip, Mapping):
        terms = {}
        for key, value in sip.items():
            name, p, q = str(key).upper().split("_")
            terms[(name, int(p), int(q))] = float(value)
        order = max(p + q for _, p, q in terms) if terms else 2
        a = np.zeros((order + 1, order + 1))
        b = np.zeros((order + 1, order + 1))
        for (name, p, q), value in terms.items():
            if name == "A":
                a[p, q] = value
            elif name == "B":
                b[p, q] = value
            else:
                raise ValueError(f"SIP term {name}_{p}_{q}: only A_p_q and B_p_q can be given")
        return a, b
    a, b = sip
    return np.array(a, dtype=float), np.array(b, dtype=float)


def _poly_terms(order):
    return [(p, q) for p in range(order + 1) for q in range(order + 1 - p)]


def _fit_inverse_sip(a, b, shape, crpix):
    """Fit AP, BP (order + 1) so that sip_foc2pix inverts the forward A, B on the frame."""
    order = a.shape[0] - 1
    inv_order = order + 1
    ny, nx = shape
    gx, gy = np.meshgrid(np.linspace(-0.1 * nx, 1.1 * nx, 40), np.linspace(-0.1 * ny, 1.1 * ny, 40))
    uu = gx.ravel() + 1.0 - crpix[0]
    vv = gy.ravel() + 1.0 - crpix[1]
    fu = np.zeros_like(uu)
    fv = np.zeros_like(uu)
    for p in range(order + 1):
        for q in range(order + 1 - p):
            fu += a[p, q] * uu**p * vv**q
            fv += b[p, q] * uu**p * vv**q
    U, V = uu + fu, vv + fv
    terms = _poly_terms(inv_order)
    norm = max(nx, ny)
    design = np.stack([(U / norm) ** p * (V / norm) ** q for p, q in terms], axis=1)
    coef_u, *_ = np.linalg.lstsq(design, uu - U, rcond=None)
    coef_v, *_ = np.linalg.lstsq(design, vv - V, rcond=None)
    ap = np.zeros((inv_order + 1, inv_order + 1))
    bp = np.zeros((inv_order + 1, inv_order + 1))
    for (p, q), cu, cv in zip(terms, coef_u, coef_v, strict=False):
        ap[p, q] = cu / norm ** (p + q)
        bp[p, q] = cv / norm ** (p + q)
    return ap, bp


def random_sip(shape, amplitude_px: float = 2.0, *, rng=None, order: int = 3) -> dict:
    """Plausible SIP coefficients (order 2 or 3): mostly radial (barrel/pincushion),
    plus small random terms; the largest displacement in the frame corners is
    about ``amplitude_px``. Returned as ``{"A_p_q": value, "B_p_q": value}``."""
    rng = _as_rng(rng)
    ny, nx = shape
    r_max = 0.5 * math.hypot(nx, ny)
    coeffs: dict[str, float] = {}
    if order >= 3:
        k = float(amplitude_px) * 0.7 / r_max**3 * rng.choice([-1.0, 1.0])
        coeffs.update({"A_3_0": k, "A_1_2": k, "B_2_1": k, "B_0_3": k})
    for p, q in ((2, 0), (1, 1), (0, 2)):
        scale = float(amplitude_px) * (0.3 if order >= 3 else 0.6) / r_max**2
        coeffs[f"A_{p}_{q}"] = scale * rng.uniform(-1, 1)
        coeffs[f"B_{p}_{q}"] = scale * rng.uniform(-1, 1)
    return coeffs


def true_frame_wcs(center, shape, pixscale_arcsec, rotation_deg: float = 0.0, flip: bool = False,
                   sip=None) -> WCS:
    """The WCS of a frame centred on ``center`` (ra, dec deg): TAN, or TAN-SIP.

    With ``rotation_deg=0`` and ``flip=False`` north is +y and east is -x; the
    pixel axes are rotated by ``rotation_deg`` (counter-clockwise) and
    ``flip=True`` mirrors x (east +x). CRPIX is the frame centre.
    ``sip``: forward distortion coefficients, as ``{"A_2_0": ..., "B_0_2": ...}``
    (order 2-3, pixel units relative to CRPIX), as an (A, B) pair of square
    arrays, or an `astropy.wcs.Sip`; the inverse (AP, BP) is fitted so the
    header is complete.
    """
    ny, nx = int(shape[0]), int(shape[1])
    scale = float(pixscale_arcsec) / 3600.0
    parity = np.diag([scale if flip else -scale, scale])
    cd = parity @ _rotation(rotation_deg)
    wcs = WCS(naxis=2)
    wcs.wcs.crpix = [(nx + 1) / 2.0, (ny + 1) / 2.0]
    wcs.wcs.crval = [float(center[0]) % 360.0, float(center[1])]
    wcs.wcs.cd = cd
    wcs.wcs.cunit = ["deg", "deg"]
    wcs.wcs.radesys = "ICRS"
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.pixel_shape = (nx, ny)
    if sip is not None and sip is not False:
        a, b = _sip_arrays(sip)
        ap, bp = _fit_inverse_sip(a, b, (ny, nx), wcs.wcs.crpix)
        wcs.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
        wcs.sip = Sip(a, b, ap, bp, wcs.wcs.crpix)
    wcs.wcs.set()
    return wcs


def nominal_wcs(true_wcs: WCS, *, pointing_offset_arcsec=(0.0, 0.0), rotation_error_deg=0.0,
                scale_error=0.0, rotate_180=False) -> WCS:
    """A telescope's nominal TAN WCS for a frame whose true WCS is ``true_wcs``.

    Same CRPIX; CRVAL = the true sky position of CRPIX moved by
    ``pointing_offset_arcsec`` = (east, north) (the header's error); CD = the
    true CD rotated by ``rotation_error_deg``, times ``1 + scale_error``, and
    negated if ``rotate_180``. No SIP.
    """
    crpix = np.array(true_wcs.wcs.crpix, dtype=float)
    with quiet_astropy():
        ra_c, dec_c = true_wcs.all_pix2world([[crpix[0], crpix[1]]], 1)[0]
    ra_h, dec_h = _offset(ra_c, dec_c, pointing_offset_arcsec[0], pointing_offset_arcsec[1])
    cd = true_wcs.wcs.cd if true_wcs.wcs.has_cd() else true_wcs.pixel_scale_matrix
    cd = np.array(cd) @ _rotation(rotation_error_deg) * (1.0 + float(scale_error))
    if rotate_180:
        cd = -cd
    wcs = WCS(naxis=2)
    wcs.wcs.crpix = crpix
    wcs.wcs.crval = [float(ra_h), float(dec_h)]
    wcs.wcs.cd = cd
    wcs.wcs.cunit = ["deg", "deg"]
    wcs.wcs.radesys = "ICRS"
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.pixel_shape = true_wcs.pixel_shape
    wcs.wcs.set()
    return wcs


def write_truth_wcs(path, wcs: WCS, shape=None, **cards) -> Path:
    """A FITS file whose PRIMARY header holds ``wcs`` (with SIP): ``WCS(fits.getheader(path))``."""
    header = fits.Header()
    with quiet_astropy():
        header.extend(wcs.to_header(relax=True), update=True)
    if shape is not None:
        header["IMAGEW"] = (int(shape[1]), "image width, pixels")
        header["IMAGEH"] = (int(shape[0]), "image height, pixels")
    for key, value in cards.items():
        header[key.upper()[:8]] = value
    path = Path(path)
    with atomic_path(path) as tmp:
        fits.PrimaryHDU(header=header).writeto(tmp)
    return path


# ---------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------
def _moffat_alpha(fwhm_px: float, beta: float) -> float:
    return float(fwhm_px) / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))


def _stamp_radii(flux_e, fwhm_px, beta, noise_e, *, trunc_sigma, r_min, r_max):
    """Per-star stamp half-sizes: where the profile falls below ``trunc_sigma`` x noise,
    rounded up to r_min * 2**k (so stars come in a few size groups)."""
    alpha = _moffat_alpha(fwhm_px, beta)
    peak = np.maximum(flux_e, 0.0) * (beta - 1.0) / (math.pi * alpha**2)
    thr = max(trunc_sigma * noise_e, 1e-3)
    q = np.maximum(peak / thr, 1.0) ** (1.0 / beta)
    need = alpha * np.sqrt(np.maximum(q - 1.0, 0.0))
    steps = np.ceil(np.log2(np.maximum(need, r_min) / r_min))
    radii = (r_min * 2.0**steps).astype(int)
    return np.minimum(radii, r_max)


def _add_stars(image, x, y, flux, fwhm_px, beta, radii, *, chunk_pixels=4_000_000):
    """Add Moffat stars (total ``flux`` inside each stamp) to ``image`` in place."""
    ny, nx = image.shape
    alpha2 = np.float32(_moffat_alpha(fwhm_px, beta) ** 2)
    beta32 = np.float32(beta)
    flat = image.reshape(-1)
    for radius in np.unique(radii):
        sel = np.flatnonzero(radii == radius)
        size = 2 * int(radius) + 1
        per_chunk = max(1, chunk_pixels // (size * size))
        steps = np.arange(-radius, radius + 1)
        for start in range(0, len(sel), per_chunk):
            idx = sel[start:start + per_chunk]
            ix0 = np.rint(x[idx]).astype(np.int64)
            iy0 = np.rint(y[idx]).astype(np.int64)
            cols = ix0[:, None] + steps[None, :]  # (n, S)
            rows = iy0[:, None] + steps[None, :]
            dx = (cols - x[idx, None]).astype(np.float32)
            dy = (rows - y[idx, None]).astype(np.float32)
            r2 = dy[:, :, None] ** 2 + dx[:, None, :] ** 2  # (n, S, S)
            r2 /= alpha2
            r2 += np.float32(1.0)
            if beta == 2.5:
                prof = np.reciprocal(r2, out=r2)
                prof = prof * prof * np.sqrt(prof)
            else:
                prof = np.power(r2, -beta32, out=r2)
            norm = prof.sum(axis=(1, 2), dtype=np.float64)
            prof *= (flux[idx] / norm).astype(np.float32)[:, None, None]
            ok = ((rows >= 0) & (rows < ny))[:, :, None] & ((cols >= 0) & (cols < nx))[:, None, :]
            flat_index = rows[:, :, None] * nx + cols[:, None, :]
            if ok.all():
                np.add.at(flat, flat_index.reshape(-1), prof.reshape(-1))
            else:
                np.add.at(flat, flat_index[ok], prof[ok])


# Point-spread functions: sums of Moffat components ``(weight, along, across, width)``,
# offsets ``along``/``across`` and ``width`` in units of the frame FWHM, ``along`` in the
# direction ``psf_angle_deg`` (from +x towards +y). Every star's profile is placed so that
# its flux-weighted first moment, its photocentre, sits at the catalog position (as a
# catalog such as Gaia measures photocentres); a symmetric model fitted to an asymmetric
# profile then sits off the truth, as on the LCO 0.4 m frames of PDS 110, where DAOStarFinder
# and centroid_2dg sit ~0.5-0.7 px from the photocentres (shared/data/lco-pds110/README.md);
# at FWHM 2.8 px centroid_2dg sits ~0.33 (asymmetric), ~0.53 (comatic), ~0.37 px (trailed) off.
PSF_SHAPES = {
    "moffat": ((1.0, 0.0, 0.0, 1.0),),
    # a core with a shoulder on one side (astigmatism + collimation of a small telescope)
    "asymmetric": ((0.6, 0.0, 0.0, 0.85), (0.4, 0.85, 0.0, 1.1)),
    # coma: a core and a fan that widens away from it
    "comatic": ((0.58, 0.0, 0.0, 0.9), (0.27, 0.55, 0.0, 1.25), (0.15, 1.2, 0.0, 1.8)),
    # a tracking jump: most of the exposure at the start, then a drift along ``along``
    "trailed": ((0.34, 0.0, 0.0, 0.8), (0.22, 0.6, 0.0, 0.8), (0.17, 1.2, 0.0, 0.8),
                (0.15, 1.8, 0.0, 0.8), (0.12, 2.4, 0.0, 0.8)),
}
# Direction of the asymmetry in the PDS 110 frames: symmetric-fit centre minus photocentre
# ~(-0.4, +0.6) px, i.e. the light extends towards (+0.4, -0.6).
DEFAULT_PSF_ANGLE_DEG = -56.0


def psf_components(psf, fwhm_px: float, angle_deg: float = DEFAULT_PSF_ANGLE_DEG):
    """Components of a PSF in pixels, about its photocentre: (weight, dx, dy, fwhm) arrays.

    ``psf`` is a name of `PSF_SHAPES` or a sequence of ``(weight, along, across, width)``.
    The weights are normalised to 1 and the offsets shifted so that the flux-weighted mean
    of the component centres (the profile's first moment: each Moffat is symmetric) is 0.
    """
    if isinstance(psf, str):
        if psf not in PSF_SHAPES:
            raise ValueError(f"psf = {psf!r}: not one of {', '.join(sorted(PSF_SHAPES))}")
        psf = PSF_SHAPES[psf]
    comp = np.asarray(psf, float).reshape(-1, 4)
    if not (comp[:, 0] > 0).all() or not (comp[:, 3] > 0).all():
        raise ValueError("psf components need positive weights and widths")
    w = comp[:, 0] / comp[:, 0].sum()
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    dx = (comp[:, 1] * c - comp[:, 2] * s) * fwhm_px
    dy = (comp[:, 1] * s + comp[:, 2] * c) * fwhm_px
    dx -= np.sum(w * dx)
    dy -= np.sum(w * dy)
    return w, dx, dy, comp[:, 3] * fwhm_px


def _cosmic_rays(n, shape, rng):
    """Sharp cosmic-ray hits: short tracks of 1-8 pixels, hundreds to thousands of e-."""
    ny, nx = shape
    hits = []
    for _ in range(int(n)):
        length = int(rng.choice([1, 1, 2, 2, 3, 4, 5, 6, 8]))
        angle = rng.uniform(0, 2 * math.pi)
        x0, y0 = rng.uniform(0, nx - 1), rng.uniform(0, ny - 1)
        t = np.arange(length)
        xs = np.clip(np.rint(x0 + t * math.cos(angle)), 0, nx - 1).astype(int)
        ys = np.clip(np.rint(y0 + t * math.sin(angle)), 0, ny - 1).astype(int)
        xy = np.unique(np.stack([ys, xs], axis=1), axis=0)
        energy = rng.lognormal(math.log(1500.0), 0.7, len(xy))
        hits.append((xy[:, 0], xy[:, 1], energy.astype(np.float32)))
    return hits


def _satellite_trail(image, fwhm_px, amplitude_e, rng):
    """Add a straight trail (Gaussian cross-section of the PSF's FWHM) across the frame."""
    ny, nx = image.shape
    angle = rng.uniform(0, math.pi)
    xc, yc = rng.uniform(0.25 * nx, 0.75 * nx), rng.uniform(0.25 * ny, 0.75 * ny)
    sigma = float(fwhm_px) / 2.3548
    half = int(math.ceil(4 * sigma / max(abs(math.cos(angle)), abs(math.sin(angle)))))
    offsets = np.arange(-half, half + 1)
    c, s = math.cos(angle), math.sin(angle)
    if abs(c) >= abs(s):  # mostly along x: one band of rows per column
        cols = np.arange(nx)
        centre = yc + (cols - xc) * s / c
        rows = np.rint(centre)[:, None].astype(int) + offsets[None, :]
        dist = (rows - centre[:, None]) * abs(c)
        cols = np.broadcast_to(cols[:, None], rows.shape)
    else:
        rows = np.arange(ny)
        centre = xc + (rows - yc) * c / s
        cols = np.rint(centre)[:, None].astype(int) + offsets[None, :]
        dist = (cols - centre[:, None]) * abs(s)
        rows = np.broadcast_to(rows[:, None], cols.shape)
    ok = (rows >= 0) & (rows < ny) & (cols >= 0) & (cols < nx)
    values = (amplitude_e * np.exp(-0.5 * (dist / sigma) ** 2)).astype(np.float32)
    image[rows[ok], cols[ok]] += values[ok]  # (row, col) pairs are unique
    return {"x0": float(xc), "y0": float(yc), "angle_deg": math.degrees(angle),
            "amplitude_e": float(amplitude_e), "sigma_px": sigma}


def _bad_column_list(bad_columns, shape, rng) -> list[tuple[int, int, int]]:
    """Bad columns as (col, row0, row1): given, or ``bad_columns`` random ones."""
    ny, nx = shape
    if bad_columns is None or bad_columns is False:
        return []
    if not isinstance(bad_columns, (int, np.integer)):
        return [(int(c), max(0, int(r0)), min(ny, int(r1))) for c, r0, r1 in bad_columns
                if 0 <= int(c) < nx]
    columns = []
    chosen = rng.choice(nx, size=min(int(bad_columns), nx), replace=False) if bad_columns else []
    for c in np.sort(chosen):
        if rng.random() < 0.5:
            r0, r1 = 0, ny
        else:
            r0 = int(rng.integers(0, ny - 1))
            r1 = ny if rng.random() < 0.5 else int(rng.integers(r0 + 1, ny + 1))
        columns.append((int(c), r0, r1))
    return columns


def _hot_pixel_list(hot_pixels, shape, rng):
    """Hot pixels as (rows, cols): given, or ``hot_pixels`` random ones."""
    ny, nx = shape
    if hot_pixels is None or hot_pixels is False or (
            isinstance(hot_pixels, (int, np.integer)) and hot_pixels == 0):
        return np.empty(0, int), np.empty(0, int)
    if isinstance(hot_pixels, (int, np.integer)):
        return rng.integers(0, ny, int(hot_pixels)), rng.integers(0, nx, int(hot_pixels))
    rows, cols = (np.asarray(v, dtype=int) for v in hot_pixels)
    return rows, cols


def render_frame(
    catalog: Table,
    wcs: WCS,
    shape,
    *,
    epoch=None,
    fwhm_px: float = 3.0,
    moffat_beta: float = 2.5,
    psf="moffat",
    psf_angle_deg: float = DEFAULT_PSF_ANGLE_DEG,
    sky: float = 150.0,
    sky_gradient=0.0,
    gain: float = 1.0,
    rdnoise: float = 7.0,
    saturate: float = 120000.0,
    exptime: float = 60.0,
    zeropoint: float = 23.5,
    transparency: float = 1.0,
    band: str | None = None,
    colour_term: float = 0.0,
    rng=None,
    n_cosmic_rays: int = 0,
    bad_columns=0,
    hot_pixels=0,
    satellite_trail=False,
    noise: bool = True,
    poisson_threshold: float = 30.0,
    trunc_sigma: float = 0.05,
    max_stamp_radius: int = 128,
    flux_factor=None,
):
    """Render a frame: returns ``(data float32 ADU, bpm uint8, info dict)``.

    Stars: the catalog propagated to ``epoch`` (decimal year, ISO date or Time;
    None = the catalog positions), placed at ``wcs.all_world2pix`` (0-based),
    with ``exptime * transparency * 10**(-0.4 (mag - zeropoint))`` electrons
    (``mag``: the catalog's ``<band>_mag - colour_term * (g_mag - r_mag)`` with a
    ``band``, else its ``phot_g_mean_mag``) in
    a Moffat profile (``fwhm_px``, ``moffat_beta``), or the sum of Moffat components of
    ``psf`` (a name of `PSF_SHAPES`: "moffat", "asymmetric", "comatic", "trailed", or
    components as for `psf_components`, oriented by ``psf_angle_deg``) whose photocentre
    (first moment) is the star's position. Sky: ``sky`` ADU/pixel
    times ``1 + gx (x/nx - 1/2) + gy (y/ny - 1/2)`` with ``sky_gradient`` =
    (gx, gy) or a float gx. Noise (if ``noise``): Poisson + read noise; then
    cosmic rays (not in the BPM), hot pixels and ``bad_columns`` (garbage
    values, flagged 1 in the BPM), an optional ``satellite_trail`` (True or a
    peak in electrons; not in the BPM); clipped at ``saturate`` ADU, and the
    clipped pixels flagged 2 in the BPM (as LCO's pipeline does). ``flux_factor``: per
    catalog row, the star's flux in this frame over its catalog magnitude's (variable
    stars; None = 1 for all).

    ``info``: ``x``, ``y``, ``flux`` (ADU), ``mag``, ``source_id``, ``index``
    (catalog row) of the rendered stars; ``saturated`` (per star: peak
    clipped); ``cosmic_rays`` (list of (rows, cols)); ``bad_columns`` (list of
    (col, row0, row1)); ``hot_pixels`` ((rows, cols)); ``trail`` (dict or
    None); ``sky``, ``noise`` (ADU, the expected sky noise).
    """
    rng = _as_rng(rng)
    if not isinstance(catalog, Table):
        catalog = Table.read(catalog)
    ny, nx = int(shape[0]), int(shape[1])
    gain = float(gain)
    sky_e = float(sky) * gain
    rn = float(rdnoise)
    noise_e = math.sqrt(max(sky_e, 0.0) + rn * rn)

    # sky (electrons)
    if isinstance(sky_gradient, (int, float)):
        gx, gy = float(sky_gradient), 0.0
    else:
        gx, gy = (float(v) for v in sky_gradient)
    image = np.empty((ny, nx), dtype=np.float32)
    row = (sky_e * (1.0 + gx * (np.arange(nx) / max(nx - 1, 1) - 0.5))).astype(np.float32)
    col = (sky_e * gy * (np.arange(ny) / max(ny - 1, 1) - 0.5)).astype(np.float32)
    np.add(row[None, :], col[:, None], out=image)

    # stars
    max_r = int(min(max_stamp_radius, max(ny, nx)))
    r_min = max(3, int(math.ceil(3.0 * fwhm_px)))
    x, y, index = star_positions(catalog, wcs, epoch, shape=(ny, nx), margin=float(max_r))
    if band is not None:
        mag = (_column(catalog, (f"{band}_mag",)) - float(colour_term)
               * (_column(catalog, ("g_mag",)) - _column(catalog, ("r_mag",))))[index]
    else:
        mag = _column(catalog, ("phot_g_mean_mag", "mag"))[index] if len(index) else np.empty(0)
    flux_e = float(exptime) * float(transparency) * 10.0 ** (-0.4 * (mag - float(zeropoint)))
    if flux_factor is not None and len(index):  # variable stars: per catalog row
        flux_e = flux_e * np.asarray(flux_factor, float)[index]
    good = np.isfinite(flux_e) & np.isfinite(x) & np.isfinite(y)
    x, y, index, mag, flux_e = x[good], y[good], index[good], mag[good], flux_e[good]
    weights, cdx, cdy, widths = psf_components(psf, fwhm_px, psf_angle_deg)
    reach = float(np.max(np.hypot(cdx, cdy)))
    radii = _stamp_radii(flux_e, fwhm_px, moffat_beta, noise_e, trunc_sigma=trunc_sigma,
                         r_min=r_min, r_max=max_r)
    # keep stars whose stamp touches the frame
    touch = ((x + radii + reach > -0.5) & (x - radii - reach < nx - 0.5)
             & (y + radii + reach > -0.5) & (y - radii - reach < ny - 0.5))
    x, y, index, mag, flux_e = (v[touch] for v in (x, y, index, mag, flux_e))
    peak_e = np.full(len(x), sky_e)
    for w, ox, oy, width in zip(weights, cdx, cdy, widths, strict=True):
        part = flux_e * w
        radii = _stamp_radii(part, width, moffat_beta, noise_e, trunc_sigma=trunc_sigma,
                             r_min=max(3, int(math.ceil(3.0 * width))), r_max=max_r)
        if len(x):
            _add_stars(image, x + ox, y + oy, part, width, moffat_beta, radii)
        # the components' peaks added: exact for one component, an upper bound otherwise
        peak_e += part * (moffat_beta - 1.0) / (math.pi * _moffat_alpha(width, moffat_beta)**2)

    # noise
    if noise:
        low = image < poisson_threshold
        z = rng.standard_normal((ny, nx), dtype=np.float32)
        if low.any():
            z_low = z[low] * np.float32(rn)
            lam = np.maximum(image[low], 0.0)
        var = image + np.float32(rn * rn)
        np.maximum(var, 0.0, out=var)
        np.sqrt(var, out=var)
        var *= z
        image += var
        if low.any():
            image[low] = rng.poisson(lam).astype(np.float32) + z_low

    # cosmic rays (sharp; not flagged, like reality)
    cr_list = []
    if n_cosmic_rays:
        for rows, cols, energy in _cosmic_rays(n_cosmic_rays, (ny, nx), rng):
            image[rows, cols] += energy
            cr_list.append((rows, cols))

    trail = None
    if satellite_trail is not None and satellite_trail is not False:
        amp = 20.0 * noise_e if satellite_trail is True else float(satellite_trail)
        trail = _satellite_trail(image, fwhm_px, amp, rng)

    if gain != 1.0:
        image /= np.float32(gain)
    np.minimum(image, np.float32(saturate), out=image)
    # saturated pixels are flagged 2 in the BPM, as the LCO pipeline does (the lossy
    # compression of SCI moves them a little below SATURATE)
    bpm = (image >= np.float32(saturate)).view(np.uint8) * np.uint8(2)

    # detector defects (garbage values, flagged 1)
    columns = _bad_column_list(bad_columns, (ny, nx), rng)
    for c, r0, r1 in columns:
        kind = rng.random()
        if kind < 0.4:  # hot column
            values = sky * 5 + rng.exponential(50.0 * noise_e / gain, r1 - r0)
        elif kind < 0.7:  # dead column
            values = rng.normal(0.0, 2.0, r1 - r0)
        else:  # garbage
            values = rng.uniform(-10.0 * sky, 20.0 * sky, r1 - r0)
        image[r0:r1, c] = np.minimum(values, saturate).astype(np.float32)
        bpm[r0:r1, c] = 1
    hot = _hot_pixel_list(hot_pixels, (ny, nx), rng)
    if len(hot[0]):
        hr, hc = hot
        image[hr, hc] = np.minimum(image[hr, hc] + rng.uniform(100, 5000, len(hr)) * noise_e / gain,
                                   saturate).astype(np.float32)
        bpm[hr, hc] = 1

    source_id = (np.asarray(catalog["source_id"])[index] if "source_id" in catalog.colnames
                 else index)
    info = {
        "x": x, "y": y, "flux": flux_e / gain, "mag": mag, "source_id": source_id,
        "index": index, "saturated": peak_e / gain >= saturate,
        "cosmic_rays": cr_list, "bad_columns": columns, "hot_pixels": hot, "trail": trail,
        "sky": float(sky), "noise": noise_e / gain,
    }
    return image, bpm, info


# ---------------------------------------------------------------------------------------
# Headers and files
# ---------------------------------------------------------------------------------------
def lco_frame_name(site=DEFAULT_SITE, telescope=DEFAULT_TELESCOPE, instrument=DEFAULT_INSTRUMENT,
                   day_obs="20230701", framenum=1, rlevel=91) -> str:
    """LCO file stem, e.g. ``lsc1m009-fa15-20230701-0042-e91``."""
    return f"{site}{telescope.replace('-', '')}-{instrument}-{day_obs}-{int(framenum):04d}-e{rlevel}"


def _day_obs(time: Time, site: str) -> str:
    """LCO DAY-OBS: the (UTC) date at the start of the local night."""
    lon = SITE_LONGITUDE.get(site, 0.0)
    local = Time(time.mjd + lon / 360.0 - 0.5, format="mjd")
    return local.strftime("%Y%m%d")


def lco_header(
    true_wcs: WCS,
    shape,
    *,
    date_obs="2023-07-01T03:00:00",
    exptime: float = 60.0,
    filter_name: str = "rp",
    pointing_error_arcmin: float = 1.0,
    rotation_error_deg: float = 0.3,
    scale_error: float = 0.0,
    rotate_180: bool = False,
    pointing_offset_arcsec=None,
    rng=None,
    site: str = DEFAULT_SITE,
    telescope: str = DEFAULT_TELESCOPE,
    instrument: str = DEFAULT_INSTRUMENT,
    gain: float = 1.0,
    rdnoise: float = 7.0,
    saturate: float = 120000.0,
    pixscale: float | None = None,
    fwhm_px: float = 3.0,
    object_name: str = "SIMFIELD",
    framenum: int = 1,
    binning: int = 1,
    wcserr: int | None = None,
    bunit: str | None = None,
    extra: Mapping | None = None,
) -> fits.Header:
    """The SCI header of an LCO ``e91`` frame whose true WCS is ``true_wcs``.

    Its WCS is the telescope's nominal one (`nominal_wcs`), wrong by a pointing
    error ``pointing_offset_arcsec`` = (east, north) (the header centre minus the
    true centre; default: ``pointing_error_arcmin`` in a direction drawn from
    ``rng``), a rotation of exactly ``rotation_error_deg`` (signed), a fractional
    ``scale_error``, and a 180-degree rotation if ``rotate_180``. RA/DEC (the
    pointing, sexagesimal) are the header's CRVAL. WCSERR is 4 ("not solved")
    unless the header WCS is exact (then 0) or ``wcserr`` is given.
    L1FWHM is in arcsec, as LCO writes it. ``bunit``: the BUNIT card; by default none
    when ``gain`` is 1 (LCO e91 frames are in electrons and carry none) and ``'adu'``
    otherwise (the pixels are then ADU = electrons / gain).
    """
    del shape  # CRPIX comes from true_wcs; kept for symmetry with the other builders
    if pointing_offset_arcsec is None:
        rng = _as_rng(rng)
        angle = rng.uniform(0, 2 * math.pi)
        dist = float(pointing_error_arcmin) * 60.0
        pointing_offset_arcsec = (dist * math.sin(angle), dist * math.cos(angle))
    east, north = (float(v) for v in pointing_offset_arcsec)
    hwcs = nominal_wcs(true_wcs, pointing_offset_arcsec=(east, north),
                       rotation_error_deg=rotation_error_deg, scale_error=scale_error,
                       rotate_180=rotate_180)
    true_scale = float(np.sqrt(abs(np.linalg.det(true_wcs.pixel_scale_matrix))) * 3600.0)
    if pixscale is None:
        pixscale = round(true_scale, 3)
    time = _to_time(date_obs)
    exact = east == 0 and north == 0 and rotation_error_deg == 0 and scale_error == 0 \
        and not rotate_180 and true_wcs.sip is None
    if wcserr is None:
        wcserr = 0 if exact else 4
    day_obs = _day_obs(time, site)
    ra_h, dec_h = hwcs.wcs.crval
    ra_str = Angle(ra_h, u.deg).to_string(unit=u.hourangle, sep=":", precision=3, pad=True)
    dec_str = Angle(dec_h, u.deg).to_string(unit=u.deg, sep=":", precision=2, pad=True,
                                            alwayssign=True)
    end = Time(time.mjd + float(exptime) / 86400.0, format="mjd")
    name = lco_frame_name(site, telescope, instrument, day_obs, framenum)
    h = fits.Header()
    cards = [
        ("ORIGIN", "LCOGT", "Organization responsible for the data"),
        ("SITEID", site, "ID code of the Observatory site"),
        ("TELID", telescope[:3] + telescope[-1:] if len(telescope) > 4 else telescope,
         "ID code of the Telescope"),
        ("TELESCOP", telescope, "The Name of the Telescope"),
        ("OBSTYPE", "EXPOSE", "Observation type"),
        ("FRAMENUM", int(framenum), "Running frame number"),
        ("ORIGNAME", name[:-3] + "e00.fits", "Fname written by ICS"),
        ("TIMESYS", "UTC", "Time system used"),
        ("DATE-OBS", time.utc.isot[:23], "[UTC] Start date and time of the observation"),
        ("DAY-OBS", day_obs, "[UTC] Date at start of local observing night"),
        ("UTSTART", time.utc.isot[11:23], "[UTC] The start time of the observation"),
        ("UTSTOP", end.utc.isot[11:23], "[UTC] The finish time of the observation"),
        ("MJD-OBS", round(float(time.mjd), 7), "[UTC days] Start date/time (Modified Julian Dat"),
        ("EXPTIME", float(exptime), "[s] Exposure length"),
        ("REQTIME", float(exptime), "[seconds] Requested exposure time"),
        ("FILTER", filter_name, "Filter used"),
        ("INSTRUME", instrument, "Instrument used"),
        ("GAIN", float(gain), "[electrons/count] Pixel gain"),
        ("RDNOISE", float(rdnoise), "[electrons/pixel] Read noise"),
        ("SATURATE", float(saturate), "[ADU] Saturation level used"),
        ("MAXLIN", float(saturate) * 0.87, "[ADU] Non-linearity level"),
        ("CCDSUM", f"{int(binning)} {int(binning)}", "CCD on-chip summing/binning"),
        ("PIXSCALE", float(pixscale), "[arcsec/pixel] Nominal pixel scale on sky"),
        ("RA", ra_str, "[HH:MM:SS.sss] RA where telescope is pointing"),
        ("DEC", dec_str, "[sDD:MM:SS.ss] Dec where telescope is pointing"),
        ("RADESYS", "ICRS", "[[FK5,ICRS]] Fundamental coord. system of the o"),
        ("OBJECT", object_name, "Object name"),
        ("PROPID", "SIMULATED", "Proposal ID"),
        ("CTYPE1", "RA---TAN", "Type of WCS Projection"),
        ("CTYPE2", "DEC--TAN", "Type of WCS Projection"),
        ("CRPIX1", float(hwcs.wcs.crpix[0]), "[pixel] Coordinate of reference point (axis 1)"),
        ("CRPIX2", float(hwcs.wcs.crpix[1]), "[pixel] Coordinate of reference point (axis 2)"),
        ("CRVAL1", float(ra_h), "[deg] RA at the reference pixel"),
        ("CRVAL2", float(dec_h), "[deg] Dec at the reference pixel"),
        ("CUNIT1", "deg", "Units of RA"),
        ("CUNIT2", "deg", "Units of Dec"),
        ("CD1_1", float(hwcs.wcs.cd[0, 0]), "WCS CD transformation matrix"),
        ("CD1_2", float(hwcs.wcs.cd[0, 1]), "WCS CD transformation matrix"),
        ("CD2_1", float(hwcs.wcs.cd[1, 0]), "WCS CD transformation matrix"),
        ("CD2_2", float(hwcs.wcs.cd[1, 1]), "WCS CD transformation matrix"),
        ("L1FWHM", round(float(fwhm_px) * true_scale, 4), "[arcsec] Frame FWHM in arcsec"),
        ("WCSERR", int(wcserr), "Error status of WCS fit. 0 for no error"),
        ("RLEVEL", 91, "Reduction level"),
        ("PIPEVER", "daskstack-sim", "Pipeline version"),
    ]
    if bunit is None and float(gain) != 1.0:
        bunit = "adu"
    if bunit:
        cards.append(("BUNIT", bunit, "Unit of the pixel values"))
    for key, value, comment in cards:
        h.append(_card(key, value, comment))
    if extra:
        for key, value in extra.items():
            h[key] = value
    return h


def _card(key, value, comment) -> fits.Card:
    """A header card whose comment is cut to fit in 80 characters (silently)."""
    card = fits.Card(key, value)
    room = 80 - len(card.image.rstrip()) - 3
    return fits.Card(key, value, comment[:max(room, 0)])


_STRUCTURAL = {"SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND", "XTENSION", "PCOUNT",
               "GCOUNT", "EXTNAME", "BSCALE", "BZERO"}


def write_lco_frame(path, data, bpm, header, *, quantize_level: float = 16.0,
                    dither_seed: int | None = None) -> Path:
    """Write an LCO-style fpack file: empty PRIMARY, ``SCI`` (float32, RICE_1 with
    ``quantize_level`` steps per noise sigma, subtractive dither with a seed derived
    from the file name, so output is deterministic) and ``BPM`` (uint8, RICE_1). Atomic."""
    path = Path(path)
    sci_header = fits.Header([card for card in header.cards if card.keyword not in _STRUCTURAL])
    if dither_seed is None:
        dither_seed = zlib.crc32(path.name.encode()) % 10000 + 1
    data = np.asarray(data, dtype=np.float32)
    with quiet_astropy():
        sci = fits.CompImageHDU(data, header=sci_header, name="SCI", compression_type="RICE_1",
                                quantize_level=float(quantize_level), quantize_method=1,
                                dither_seed=int(dither_seed))
        mask = fits.CompImageHDU(np.asarray(bpm, dtype=np.uint8), name="BPM",
                                 compression_type="RICE_1")
        hdul = fits.HDUList([fits.PrimaryHDU(), sci, mask])
        with atomic_path(path) as tmp:
            hdul.writeto(tmp)
    return path


# ---------------------------------------------------------------------------------------
# A whole field
# ---------------------------------------------------------------------------------------
def _per_filter(value, filt, table, default):
    if value is None:
        return float(table.get(filt, default))
    if isinstance(value, Mapping):
        return float(value.get(filt, table.get(filt, default)))
    return float(value)


def _make_one(spec: dict) -> dict:
    """Render and write one frame (picklable, so an executor can run it)."""
    rng = np.random.default_rng(spec["rng_seed"])
    # the WCS is rebuilt here, not pickled (pickling a WCS rounds it through header text,
    # and the pixels would then depend on whether an executor was used)
    wcs = true_frame_wcs(**spec["wcs_args"])
    data, bpm, info = render_frame(spec["catalog"], wcs, spec["shape"], rng=rng,
                                   **spec["render"])
    write_lco_frame(spec["path"], data, bpm, spec["header"])
    write_truth_wcs(spec["truth_path"], wcs, spec["shape"], DATE_OBS=spec["date_obs"])
    return {"n_stars": int(len(info["x"])), "n_saturated": int(np.sum(info["saturated"])),
            "n_cosmic_rays": len(info["cosmic_rays"]),
            "bad_columns": " ".join(str(c) for c, _, _ in info["bad_columns"]),
            "trail": info["trail"] is not None}


def simulate_field(
    out_dir,
    *,
    n_frames: int = 8,
    shape=(2048, 2048),
    filters: Sequence[str] = ("rp", "gp"),
    pixscale: float = 0.389,
    center=(150.1, 2.2),
    seed: int = 0,
    sip=False,
    sip_amplitude_px: float = 2.0,
    pointing_error_arcmin: float = 1.0,
    rotation_error_deg: float = 0.3,
    scale_error: float = 0.0,
    rotate_180: bool = False,
    rotation_deg: float = 0.0,
    flip: bool = False,
    dither_arcsec: float = 20.0,
    epoch_year=2023.5,
    cadence_s: float | None = None,
    catalog_epoch: float = 2016.0,
    catalog=None,
    density_per_sq_deg: float = DEFAULT_DENSITY,
    mag_range=(10.0, 20.0),
    high_pm_fraction: float = 0.0,
    max_pm_mas: float = 1000.0,
    cosmic_rays=True,
    bad_columns=3,
    hot_pixels=20,
    satellite_trail_frame=None,
    frame_overrides=None,
    fwhm_range=(2.5, 4.0),
    moffat_beta: float = 2.5,
    psf="moffat",
    psf_angle_deg: float = DEFAULT_PSF_ANGLE_DEG,
    exptime=None,
    zeropoint=None,
    sky=None,
    sky_gradient: float = 0.05,
    transparency_range=(0.85, 1.0),
    colours: bool = False,
    colour_term=None,
    extinction=None,
    airmass_range=(1.0, 1.0),
    gain: float = 1.0,
    rdnoise: float = 7.0,
    saturate: float = 120000.0,
    site: str = DEFAULT_SITE,
    telescope: str = DEFAULT_TELESCOPE,
    instrument: str = DEFAULT_INSTRUMENT,
    object_name: str = "SIMFIELD",
    first_framenum: int = 1,
    variables=None,
    trunc_sigma: float = 0.05,
    executor=None,
) -> SimulatedField:
    """Simulate ``n_frames`` LCO frames of one field into ``out_dir``.

    Writes ``<name>.fits.fz`` (LCO names), ``catalog.ecsv`` (Gaia-like, epoch
    ``catalog_epoch``, covering every frame plus a margin that includes the
    header pointing errors), ``truth/<name>.wcs`` (true WCS, with SIP if
    ``sip``: True = `random_sip` with ``sip_amplitude_px``, or coefficients as
    for `true_frame_wcs`) and ``truth.ecsv`` (one row per frame).

    Frames cycle through ``filters``; each is dithered by up to
    ``dither_arcsec`` (uniform in each axis) around ``center`` (its requested
    pointing, = the header RA/DEC), is truly centred ``pointing_error_arcmin``
    away in a random direction, and gets its own FWHM (uniform in
    ``fwhm_range``, px; the profile ``psf``, see `render_frame`: the catalog
    positions are the stars' photocentres), transparency, sky (from the filter's sky brightness,
    times 0.8-1.3, unless ``sky`` (ADU) is given), sky gradient direction and
    time (from ``epoch_year``: a decimal year or an ISO date, every
    ``cadence_s``, default exptime + 30 s). ``exptime``, ``zeropoint`` and
    ``sky``: a number, a {filter: value} dict, or None for the defaults.
    ``cosmic_rays``: True (a realistic rate for the exposure and area), False,
    or a count per frame. ``bad_columns`` and ``hot_pixels`` (a count, or
    explicit lists as for `render_frame`) are the camera's: the same pixels in
    every frame, flagged in every BPM. ``satellite_trail_frame``: an index or indices of
    frames that get a trail. ``frame_overrides``: ``{frame index: {...}}`` to degrade
    chosen frames: ``fwhm_px`` (bad seeing), ``transparency`` (clouds), ``sky_factor``
    (a brighter sky, e.g. moonlight or clouds lit from below), ``psf`` and
    ``psf_angle_deg`` (e.g. "trailed": a tracking jump), ``zeropoint``; the truth table records
    what each frame got. ``variables``: ``{catalog row: function of MJD}``, variable
    stars whose flux is the catalog magnitude's times the function's value at mid-exposure
    (the truth table has it per frame, column ``flux_factor_<row>``). ``trunc_sigma``: as
    for `render_frame` (smaller: stars' wings drawn further out; photometry at the 0.1%
    level needs ~0.002, or the wings cut where a frame's noise says change the light in
    the core from frame to frame). ``executor``: anything with ``map`` (a
    concurrent.futures executor) to render frames in parallel.
    Photometry: with ``colours`` the catalog has true g, r, i, z magnitudes (`make_catalog`)
    and each frame shows the magnitudes of its filter's band (``rp`` -> r ...; a filter
    whose band the catalog lacks, u', shows ``phot_g_mean_mag``) with ``colour_term``
    (a number or {filter: value}: catalog mag = instrumental + zp + colour_term (g - r));
    ``extinction`` (mag per airmass, a number or {filter: value}) lowers each frame's zero
    point by ``extinction * airmass``, the airmass running linearly over ``airmass_range``
    from the first frame to the last (header AIRMASS). The truth table's ``zp_true`` is
    the zero point `daskstack.photcal` measures: the magnitude at g - r = 0 of one pixel
    unit (ADU) per second, ``zeropoint - extinction * airmass + 2.5 log10(transparency /
    gain)``.
    Deterministic for a given ``seed``.
    """
    from .photcal import filter_band

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ny, nx = int(shape[0]), int(shape[1])
    shape = (ny, nx)
    filters = [filters] if isinstance(filters, str) else list(filters)
    if not filters:
        raise ValueError("filters: at least one filter is needed")
    ra0, dec0 = float(center[0]) % 360.0, float(center[1])
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0])

    # the catalog: every frame, the dithers, the pointing errors and a margin
    half_diag_arcsec = 0.5 * math.hypot(nx, ny) * pixscale
    radius_arcsec = (half_diag_arcsec + math.sqrt(2) * dither_arcsec
                     + 1.5 * pointing_error_arcmin * 60.0 + 60.0)
    if catalog is None:
        catalog = make_catalog((ra0, dec0), radius_arcsec / 3600.0,
                               density_per_sq_deg=density_per_sq_deg, mag_range=mag_range,
                               seed=seed, epoch=catalog_epoch, high_pm_fraction=high_pm_fraction,
                               max_pm_mas=max_pm_mas, colours=colours)
    elif not isinstance(catalog, Table):
        catalog = Table.read(catalog)
    catalog_path = out_dir / "catalog.ecsv"
    with atomic_path(catalog_path) as tmp:
        catalog.write(tmp, format="ascii.ecsv")

    sip_coeffs = None
    if sip is True:
        sip_coeffs = random_sip(shape, sip_amplitude_px, rng=np.random.default_rng(
            [int(seed) & 0xFFFFFFFF, 2]))
    elif sip is not False and sip is not None:
        sip_coeffs = sip

    # detector defects belong to the camera: the same in every frame
    defect_rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 3])
    detector_columns = _bad_column_list(bad_columns, shape, defect_rng)
    detector_hot = _hot_pixel_list(hot_pixels, shape, defect_rng)

    start = _to_time(epoch_year)
    trail_frames = set()
    if satellite_trail_frame is not None:
        trail_frames = ({int(satellite_trail_frame)} if np.isscalar(satellite_trail_frame)
                        else {int(i) for i in satellite_trail_frame})

    specs, rows = [], []
    t_mjd = float(start.mjd)
    truth_dir = out_dir / "truth"
    for i in range(int(n_frames)):
        filt = filters[i % len(filters)]
        texp = _per_filter(exptime, filt, DEFAULT_EXPTIME, 60.0)
        zp = _per_filter(zeropoint, filt, ZEROPOINTS, DEFAULT_ZEROPOINT)
        fwhm = float(rng.uniform(*fwhm_range))
        transp = float(rng.uniform(*transparency_range))
        degrade = dict((frame_overrides or {}).get(i, {}))
        fwhm = float(degrade.pop("fwhm_px", fwhm))
        transp = float(degrade.pop("transparency", transp))
        zp = float(degrade.pop("zeropoint", zp))
        airmass = float(airmass_range[0]) + (float(airmass_range[1]) - float(airmass_range[0])) \
            * i / max(int(n_frames) - 1, 1)
        k_ext = _per_filter(extinction, filt, {}, 0.0)
        frame_colour_term = _per_filter(colour_term, filt, {}, 0.0)
        band = filter_band(filt) if colours else None
        band = band if band is not None and f"{band}_mag" in catalog.colnames else None
        sky_factor = float(degrade.pop("sky_factor", 1.0))
        frame_psf = degrade.pop("psf", psf)
        frame_psf_angle = float(degrade.pop("psf_angle_deg", psf_angle_deg))
        if degrade:
            raise ValueError(f"frame_overrides[{i}]: unknown keys {sorted(degrade)}")
        if sky is None:
            sky_mag = SKY_MAG.get(filt, DEFAULT_SKY_MAG)
            sky_adu = (texp * 10.0 ** (-0.4 * (sky_mag - zp)) * pixscale**2
                       * float(rng.uniform(0.8, 1.3)) / gain)
        else:
            sky_adu = _per_filter(sky, filt, {}, 100.0) * float(rng.uniform(0.9, 1.1))
        sky_adu *= sky_factor
        grad_angle = rng.uniform(0, 2 * math.pi)
        gradient = (sky_gradient * math.cos(grad_angle), sky_gradient * math.sin(grad_angle))
        dither = rng.uniform(-dither_arcsec, dither_arcsec, 2)
        perr_angle = rng.uniform(0, 2 * math.pi)
        perr = (pointing_error_arcmin * 60.0 * math.sin(perr_angle),
                pointing_error_arcmin * 60.0 * math.cos(perr_angle))
        rot_err = float(rotation_error_deg) * float(rng.choice([-1.0, 1.0]))
        if cosmic_rays is True:
            # ~ 1.5 hits / cm^2 / min on 15-um pixels
            area_cm2 = nx * ny * (15e-4) ** 2
            n_cr = int(rng.poisson(1.5 * area_cm2 * texp / 60.0))
        elif not cosmic_rays:
            n_cr = 0
        else:
            n_cr = int(cosmic_rays)
        frame_seed = [int(seed) & 0xFFFFFFFF, 100 + i]
        factors = {}
        if variables:
            mid_mjd = float(t_mjd) + 0.5 * texp / 86400.0
            factors = {int(row): float(func(mid_mjd)) for row, func in variables.items()}
            flux_factor = np.ones(len(catalog))
            for row, value in factors.items():
                flux_factor[row] = value
        else:
            flux_factor = None

        time = Time(t_mjd, format="mjd", scale="utc")
        t_mjd += (cadence_s if cadence_s is not None else texp + 30.0) / 86400.0
        ra_req, dec_req = _offset(ra0, dec0, dither[0], dither[1])
        ra_true, dec_true = _offset(ra_req, dec_req, -perr[0], -perr[1])
        wcs_args = dict(center=(float(ra_true), float(dec_true)), shape=shape,
                        pixscale_arcsec=pixscale, rotation_deg=rotation_deg, flip=flip,
                        sip=sip_coeffs)
        wcs = true_frame_wcs(**wcs_args)
        framenum = int(first_framenum) + i
        header = lco_header(wcs, shape, date_obs=time, exptime=texp, filter_name=filt,
                            pointing_offset_arcsec=perr, rotation_error_deg=rot_err,
                            scale_error=scale_error, rotate_180=rotate_180, site=site,
                            telescope=telescope, instrument=instrument, gain=gain,
                            rdnoise=rdnoise, saturate=saturate, pixscale=pixscale,
                            fwhm_px=fwhm, object_name=object_name, framenum=framenum,
                            extra={"AIRMASS": round(airmass, 4)})
        name = lco_frame_name(site, telescope, instrument, header["DAY-OBS"], framenum)
        path = out_dir / f"{name}.fits.fz"
        truth_path = truth_dir / f"{name}.wcs"
        epoch = float(time.jyear)
        specs.append({
            "catalog": catalog, "wcs_args": wcs_args, "shape": shape, "rng_seed": frame_seed,
            "path": path, "truth_path": truth_path, "header": header,
            "date_obs": header["DATE-OBS"],
            "render": dict(epoch=epoch, fwhm_px=fwhm, moffat_beta=moffat_beta, psf=frame_psf,
                           psf_angle_deg=frame_psf_angle, sky=sky_adu,
                           sky_gradient=gradient, gain=gain, rdnoise=rdnoise, saturate=saturate,
                           exptime=texp, zeropoint=zp - k_ext * airmass,
                           transparency=transp, band=band, colour_term=frame_colour_term,
                           n_cosmic_rays=n_cr, bad_columns=detector_columns,
                           hot_pixels=detector_hot,
                           satellite_trail=i in trail_frames, flux_factor=flux_factor,
                           trunc_sigma=trunc_sigma),
        })
        rows.append({
            "name": name, "filter": filt, "exptime": texp, "fwhm_px": fwhm,
            "moffat_beta": moffat_beta,
            "psf": frame_psf if isinstance(frame_psf, str) else "custom",
            "sky": sky_adu, "sky_gradient_x": gradient[0],
            "sky_gradient_y": gradient[1], "transparency": transp, "zeropoint": zp,
            "airmass": airmass, "extinction": k_ext * airmass, "band": band or "",
            "colour_term": frame_colour_term,
            "zp_true": zp - k_ext * airmass + 2.5 * math.log10(transp / gain),
            "gain": gain, "rdnoise": rdnoise, "saturate": saturate,
            "mjd": float(time.mjd), "date_obs": header["DATE-OBS"], "epoch": epoch,
            "ra_true": float(ra_true), "dec_true": float(dec_true),
            "ra_header": float(header["CRVAL1"]), "dec_header": float(header["CRVAL2"]),
            "dither_east_arcsec": float(dither[0]), "dither_north_arcsec": float(dither[1]),
            "pointing_error_east_arcsec": perr[0], "pointing_error_north_arcsec": perr[1],
            "rotation_deg": float(rotation_deg), "rotation_error_deg": rot_err,
            "scale_error": float(scale_error), "rotate_180": bool(rotate_180),
            "flip": bool(flip), "sip": sip_coeffs is not None,
            **{f"flux_factor_{row}": value for row, value in factors.items()},
        })

    mapper = executor.map if executor is not None else map
    results = list(mapper(_make_one, specs))
    for row, result in zip(rows, results, strict=False):
        row.update(result)
    truth = Table(rows=rows)
    truth.meta.update({"center_ra": ra0, "center_dec": dec0, "seed": int(seed),
                       "pixscale": float(pixscale), "shape": [ny, nx],
                       "catalog_epoch": float(catalog_epoch)})
    truth_path = out_dir / "truth.ecsv"
    with atomic_path(truth_path) as tmp:
        truth.write(tmp, format="ascii.ecsv")
    log.info("simulated %d frames of %dx%d in %s", len(specs), nx, ny, out_dir)
    return SimulatedField(
        frames=[s["path"] for s in specs],
        catalog=catalog_path,
        truth_wcs={row["name"]: s["truth_path"] for row, s in zip(rows, specs, strict=False)},
        truth=truth_path,
        center=(ra0, dec0),
    )
