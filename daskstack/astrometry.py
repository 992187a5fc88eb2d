"""Astrometric calibration of one frame: a TAN or TAN-SIP WCS fitted to a reference catalog.

`solve_frame` is a pure function of one frame and a catalog table::

    detect (photocentres) -> catalog stars around the header / pointing centre
    -> proper motion to the frame epoch -> triangle pattern match (any rotation,
    flip, scale within tolerance, offset within the search radius)
    -> iterated nearest-neighbour match + linear least-squares TAN(-SIP) fit with
    sigma clipping -> QA (matches, RMS, plausible scale and shape)

Conventions: pixels are 0-based (``x`` along the second array axis), as
``astropy.wcs.WCS.pixel_to_world``; FITS keywords (CRPIX) are 1-based as the
standard says. CRPIX of a fitted WCS is the frame centre, ``((nx+1)/2, (ny+1)/2)``.

A solution that cannot be trusted is returned with ``status='failed'`` and a
one-line ``reason``; a wrong WCS that looks solved is the worst outcome, so every
check errs on the side of failing.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS, Sip
from scipy.spatial import cKDTree

from ._io import atomic_path
from ._stats import clip_residuals, sky_level
from .catalogs import propagate_proper_motion
from .config import Settings
from .detect import Detections, detect_sources
from .frames import Frame, FrameError, quiet_astropy
from .match import (
    MatchError,
    TriangleIndex,
    find_shift,
    find_transform,
    fit_shift_rotation,
    format_probability,
    nn_match,
)

__all__ = [
    "GeometryPrior",
    "SolveResult",
    "companion_filter",
    "fit_tan_sip",
    "geometry_prior",
    "night_sources",
    "solve_constrained",
    "solve_frame",
    "updated_header",
    "write_wcs_file",
]

log = logging.getLogger(__name__)


@dataclass
class SolveResult:
    """The outcome of solving one frame (small, picklable).

    ``wcs_header`` is the fitted WCS as header text (TAN or TAN-SIP, with the inverse
    SIP AP/BP), empty when failed; ``rms_arcsec`` / ``rms_px`` are the RMS residuals
    of the matched stars after clipping; ``rotation_deg`` is the position angle of
    the frame's +y axis (east of north); ``flux_ratio`` is the median of detected
    flux (e-) / ``10**(-0.4 mag)`` over matched stars (photometric scaling).
    """

    name: str
    path: str
    filter: str
    status: str = "failed"  # 'ok' | 'failed'
    reason: str = ""
    wcs_header: str = field(default="", repr=False)
    n_detections: int = 0
    n_catalog: int = 0
    n_matches: int = 0
    rms_arcsec: float = float("nan")
    rms_px: float = float("nan")
    sip_order: int = 0
    fwhm_px: float = float("nan")
    elongation: float = float("nan")  # median major/minor axis ratio of the stars
    background: float = float("nan")
    noise: float = float("nan")
    pixel_scale_arcsec: float = float("nan")
    rotation_deg: float = float("nan")
    flipped: bool = False
    flux_ratio: float = float("nan")
    match_false_alarm_log10: float = float("nan")
    elapsed: float = 0.0
    # which evidence gave the WCS: 'pattern' (the frame's own stars), 'companions' (only
    # those confirmed by other exposures of the pointing), 'constrained' (the camera's
    # geometry from the night's solved exposures, `solve_constrained`), 'header'
    method: str = "pattern"
    # the photometric zero point (`daskstack.photcal`): magnitude in the catalog band
    # ``zp_band`` of 1 pixel unit per second; NaN with ``zp_reason`` saying why not
    zp: float = float("nan")
    zp_err: float = float("nan")
    n_zp: int = 0
    zp_band: str = ""
    zp_reason: str = ""
    airmass: float = float("nan")  # AIRMASS of the header
    # the calibration stars (`photcal.FrameStars`), for the colour-term fit of the frames
    # of a night; not recorded anywhere
    zp_stars: object = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def wcs(self) -> WCS | None:
        """The fitted WCS (astropy), or None when failed."""
        if not self.wcs_header:
            return None
        with quiet_astropy():
            return WCS(fits.Header.fromstring(self.wcs_header), relax=True)

    def to_dict(self) -> dict:
        return asdict(self)


# -- tangent-plane helpers ------------------------------------------------------------------
def _project(ra, dec, ra0, dec0):
    """Gnomonic projection (degrees in, degrees out): standard coordinates xi (east), eta."""
    ra, dec = np.radians(ra), np.radians(dec)
    ra0, dec0 = math.radians(ra0), math.radians(dec0)
    dra = ra - ra0
    cosc = np.sin(dec0) * np.sin(dec) + np.cos(dec0) * np.cos(dec) * np.cos(dra)
    xi = np.cos(dec) * np.sin(dra) / cosc
    eta = (np.cos(dec0) * np.sin(dec) - np.sin(dec0) * np.cos(dec) * np.cos(dra)) / cosc
    return np.degrees(xi), np.degrees(eta), cosc


def _deproject(xi, eta, ra0, dec0):
    xi, eta = np.radians(xi), np.radians(eta)
    ra0, dec0 = math.radians(ra0), math.radians(dec0)
    rho = np.hypot(xi, eta)
    c = np.arctan(rho)
    with np.errstate(invalid="ignore", divide="ignore"):
        dec = np.arcsin(np.cos(c) * np.sin(dec0)
                        + np.where(rho > 0, eta * np.sin(c) * np.cos(dec0) / np.where(rho > 0, rho, 1), 0))
        ra = ra0 + np.arctan2(xi * np.sin(c),
                              rho * np.cos(dec0) * np.cos(c) - eta * np.sin(dec0) * np.sin(c))
    return np.mod(np.degrees(ra), 360.0), np.degrees(dec)


def _poly_terms(u, v, order, min_order=0):
    return np.column_stack([u**i * v**j for i in range(order + 1) for j in range(order + 1 - i)
                            if min_order <= i + j <= order]), \
        [(i, j) for i in range(order + 1) for j in range(order + 1 - i) if min_order <= i + j <= order]


@dataclass
class _Model:
    """TAN(-SIP) model with CRPIX fixed: pixel (0-based) -> standard coords about crval."""

    crval: tuple[float, float]
    crpix0: tuple[float, float]  # 0-based
    cd: np.ndarray
    order: int = 0
    a: dict = field(default_factory=dict)  # (i, j) -> coeff, SIP forward
    b: dict = field(default_factory=dict)
    norm: float = 1.0

    def pix_to_std(self, x, y):
        u = np.asarray(x, float) - self.crpix0[0]
        v = np.asarray(y, float) - self.crpix0[1]
        f = sum((c * u**i * v**j for (i, j), c in self.a.items()), np.zeros_like(u))
        g = sum((c * u**i * v**j for (i, j), c in self.b.items()), np.zeros_like(u))
        up, vp = u + f, v + g
        return self.cd[0, 0] * up + self.cd[0, 1] * vp, self.cd[1, 0] * up + self.cd[1, 1] * vp

    def pix_to_world(self, x, y):
        xi, eta = self.pix_to_std(x, y)
        return _deproject(xi, eta, *self.crval)

    @property
    def scale_arcsec(self) -> float:
        return float(math.sqrt(abs(np.linalg.det(self.cd))) * 3600.0)

    def to_wcs(self, shape) -> WCS:
        ny, nx = shape
        w = WCS(naxis=2)
        sip = self.order >= 2
        w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"] if sip else ["RA---TAN", "DEC--TAN"]
        w.wcs.crval = list(self.crval)
        w.wcs.crpix = [self.crpix0[0] + 1.0, self.crpix0[1] + 1.0]
        w.wcs.cd = self.cd
        w.wcs.radesys = "ICRS"
        w.wcs.cunit = ["deg", "deg"]
        if sip:
            order = self.order
            a = np.zeros((order + 1, order + 1))
            b = np.zeros((order + 1, order + 1))
            for (i, j), c in self.a.items():
                a[i, j] = c
            for (i, j), c in self.b.items():
                b[i, j] = c
            ap, bp = _inverse_sip(a, b, shape, self.crpix0, order + 1)
            w.sip = Sip(a, b, ap, bp, w.wcs.crpix)
        w.wcs.set()
        w.pixel_shape = (nx, ny)
        return w


def _inverse_sip(a, b, shape, crpix0, order):
    """AP, BP polynomials (order ``order``) inverting the forward SIP over the frame."""
    ny, nx = shape
    gx, gy = np.meshgrid(np.linspace(-0.05 * nx, 1.05 * nx, 40), np.linspace(-0.05 * ny, 1.05 * ny, 40))
    u = gx.ravel() - crpix0[0]
    v = gy.ravel() - crpix0[1]
    f = np.zeros_like(u)
    g = np.zeros_like(u)
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            f += a[i, j] * u**i * v**j
            g += b[i, j] * u**i * v**j
    U, V = u + f, v + g
    s = max(nx, ny) / 2.0
    terms, idx = _poly_terms(U / s, V / s, order, 1)
    cu, *_ = np.linalg.lstsq(terms, u - U, rcond=None)
    cv, *_ = np.linalg.lstsq(terms, v - V, rcond=None)
    ap = np.zeros((order + 1, order + 1))
    bp = np.zeros((order + 1, order + 1))
    for k, (i, j) in enumerate(idx):
        ap[i, j] = cu[k] / s ** (i + j)
        bp[i, j] = cv[k] / s ** (i + j)
    return ap, bp


def fit_tan_sip(x, y, ra, dec, crpix0, order: int = 0, crval=None, weights=None) -> _Model:
    """Linear least-squares TAN (``order=0``) or TAN-SIP (``order`` 2..4) fit, CRPIX fixed.

    ``x``, ``y`` are 0-based pixels, ``crpix0`` the 0-based reference pixel. The
    standard coordinates of the stars about CRVAL are fitted as polynomials of
    ``(x - crpix0)``; the constant terms move CRVAL (iterated to convergence),
    the linear ones give CD and the higher ones, through ``CD^-1``, the SIP A/B.
    """
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    ra = np.asarray(ra, float)
    dec = np.asarray(dec, float)
    if crval is None:
        crval = (float(np.degrees(np.arctan2(np.mean(np.sin(np.radians(ra))),
                                             np.mean(np.cos(np.radians(ra))))) % 360),
                 float(np.mean(dec)))
    deg = max(1, order)
    u = x - crpix0[0]
    v = y - crpix0[1]
    s = max(np.abs(u).max(), np.abs(v).max(), 1.0)
    terms, idx = _poly_terms(u / s, v / s, deg, 0)
    w = np.ones(len(x)) if weights is None else np.asarray(weights, float)
    sw = np.sqrt(w)[:, None]
    for _ in range(4):
        xi, eta, _ = _project(ra, dec, *crval)
        cx, *_ = np.linalg.lstsq(terms * sw, xi * sw[:, 0], rcond=None)
        ce, *_ = np.linalg.lstsq(terms * sw, eta * sw[:, 0], rcond=None)
        c0 = (cx[idx.index((0, 0))], ce[idx.index((0, 0))])
        new = _deproject(np.array([c0[0]]), np.array([c0[1]]), *crval)
        moved = math.hypot(c0[0], c0[1]) * 3600
        crval = (float(new[0][0]), float(new[1][0]))
        if moved < 1e-5:
            break
    xi, eta, _ = _project(ra, dec, *crval)
    cx, *_ = np.linalg.lstsq(terms * sw, xi * sw[:, 0], rcond=None)
    ce, *_ = np.linalg.lstsq(terms * sw, eta * sw[:, 0], rcond=None)
    coef = {ij: (cx[k] / s ** sum(ij), ce[k] / s ** sum(ij)) for k, ij in enumerate(idx)}
    cd = np.array([[coef[(1, 0)][0], coef[(0, 1)][0]], [coef[(1, 0)][1], coef[(0, 1)][1]]])
    # the tiny residual constant term: fold it into CRVAL exactly via the pixel it lands on
    model = _Model(crval, tuple(crpix0), cd, 0)
    if order >= 2:
        inv = np.linalg.inv(cd)
        a, b = {}, {}
        for ij, (px, pe) in coef.items():
            if sum(ij) >= 2:
                fa, fb = inv @ np.array([px, pe])
                a[ij], b[ij] = float(fa), float(fb)
        model.order = order
        model.a, model.b = a, b
    c00 = coef[(0, 0)]
    if abs(c00[0]) + abs(c00[1]) > 0:
        ra_c, dec_c = _deproject(np.array([c00[0]]), np.array([c00[1]]), *crval)
        model.crval = (float(ra_c[0]), float(dec_c[0]))
    return model


# -- companions ---------------------------------------------------------------------------
def _shift_between(xy, other, max_shift):
    """Mode of the pairwise offsets ``other - xy`` within ``max_shift`` (px), refined."""
    tree = cKDTree(other)
    pairs = tree.query_ball_point(xy, max_shift)
    dx = []
    for i, js in enumerate(pairs):
        for j in js:
            dx.append(other[j] - xy[i])
    if len(dx) < 3:
        return None
    dx = np.array(dx)
    bins = np.arange(-max_shift, max_shift + 1.0, 1.0)
    h, ex, ey = np.histogram2d(dx[:, 0], dx[:, 1], bins=[bins, bins])
    h = h + np.roll(h, 1, 0) + np.roll(h, -1, 0)
    h = h + np.roll(h, 1, 1) + np.roll(h, -1, 1)
    i, j = np.unravel_index(np.argmax(h), h.shape)
    guess = np.array([(ex[i] + ex[i + 1]) / 2, (ey[j] + ey[j + 1]) / 2])
    near = np.hypot(*(dx - guess).T) < 2.0
    if near.sum() < 3:
        return None
    return np.median(dx[near], axis=0)


def companion_filter(det: Detections, companions, fraction: float = 0.6,
                     max_shift_px: float = 30.0) -> np.ndarray:
    """Indices of ``det`` rows also seen in at least ``fraction`` of the companion exposures.

    Each companion (a `Detections` of the same pointing and filter) is first aligned
    by the mode of the pairwise offsets (a dither of a few pixels); a detection
    counts as present if a companion source lies within ``max(1.5, FWHM)`` px of it.
    Cosmic rays and most noise peaks appear in one exposure only.
    """
    xy = det.xy
    if len(xy) == 0 or not companions:
        return np.arange(len(xy))
    radius = max(1.5, float(det.fwhm) if np.isfinite(det.fwhm) else 2.0)
    hits = np.zeros(len(xy), int)
    n_used = 0
    for comp in companions:
        other = comp.xy
        if len(other) < 3:
            continue
        shift = _shift_between(xy, other, max_shift_px)
        if shift is None:
            continue
        n_used += 1
        d, _ = cKDTree(other).query(xy + shift, distance_upper_bound=radius)
        hits += np.isfinite(d)
    if n_used == 0:
        return np.arange(len(xy))
    need = max(1, math.ceil(fraction * n_used - 1e-9))
    return np.nonzero(hits >= need)[0]


# -- solving ------------------------------------------------------------------------------
def _start(frame: Frame):
    """Start WCS, field centre (ra, dec) and nominal scale (arcsec/px); WCS may be None."""
    ny, nx = frame.data.shape
    wcs = None
    try:
        from .frames import header_wcs

        wcs = header_wcs(frame.header, frame.path)
    except FrameError:
        wcs = None
    if wcs is not None:
        with quiet_astropy():
            ra, dec = wcs.all_pix2world([[(nx - 1) / 2.0, (ny - 1) / 2.0]], 0)[0]
        scale = float(np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix))) * 3600.0)
        return wcs, (float(ra), float(dec)), scale
    meta = frame.meta
    if meta.ra is None or meta.dec is None:
        return None, None, None
    return None, (meta.ra, meta.dec), meta.pixscale


def _catalog_arrays(catalog: Table):
    ra = np.asarray(catalog["ra"], float)
    dec = np.asarray(catalog["dec"], float)
    mag = np.asarray(catalog["mag"], float) if "mag" in catalog.colnames else np.full(len(ra), np.nan)
    return ra, dec, mag


def _fail(result: SolveResult, reason: str, t0: float) -> SolveResult:
    result.status = "failed"
    result.reason = reason
    result.wcs_header = ""
    result.elapsed = time.perf_counter() - t0
    log.info("%s: failed: %s", result.name, reason)
    return result


def _header_only(frame, det, catalog, settings, result, t0):
    wcs, _, _ = _start(frame)
    if wcs is None:
        return _fail(result, "settings.solve.wcs='header' but the header has no usable WCS", t0)
    result.method = "header"
    result.wcs_header = wcs.to_header(relax=True).tostring()
    result.pixel_scale_arcsec = float(np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix))) * 3600)
    result.sip_order = int(wcs.sip.a_order) if wcs.sip is not None else 0
    cd = wcs.pixel_scale_matrix
    result.rotation_deg = float(np.degrees(np.arctan2(cd[0, 1], cd[1, 1])) % 360)
    result.flipped = bool(np.linalg.det(cd) > 0)
    # matches and residuals need detections: only when they were given (else 0 / NaN)
    if det is not None and catalog is not None and len(catalog) and len(det):
        ra, dec, mag = _catalog_arrays(catalog)
        with quiet_astropy():
            cx, cy = wcs.all_world2pix(ra, dec, 0)
        radius = max(3.0 * det.fwhm if np.isfinite(det.fwhm) else 6.0, 2.0)
        ok = np.isfinite(cx) & np.isfinite(cy)
        if ok.sum():
            tree = cKDTree(np.column_stack([cx[ok], cy[ok]]))
            d, _ = tree.query(det.xy, distance_upper_bound=radius)
            good = np.isfinite(d)
            result.n_matches = int(good.sum())
            if good.sum():
                result.rms_px = float(np.sqrt(np.mean(d[good] ** 2)))
                result.rms_arcsec = result.rms_px * result.pixel_scale_arcsec
    result.status = "ok"
    result.reason = "header WCS taken as is"
    result.elapsed = time.perf_counter() - t0
    return result


def solve_frame(frame: Frame, catalog: Table, settings: Settings | None = None,
                companions=None, detections: Detections | None = None) -> SolveResult:
    """Fit a WCS to one frame from a reference catalog.

    Parameters
    ----------
    frame : Frame
        The frame (pixels, mask, SCI header). Its header WCS (any rotation, a few %
        off in scale, up to ``settings.solve.search_radius_arcmin`` off in pointing)
        or, without one, its RA/DEC pointing keywords and PIXSCALE, give the start.
    catalog : Table
        Normalised reference catalog (`daskstack.catalogs`): ra, dec, mag, and
        optionally pmra, pmdec, ref_epoch (propagated to the frame epoch when
        ``settings.catalog.propagate_pm``).
    settings : Settings
        ``settings.detect``, ``settings.solve``, ``settings.catalog.propagate_pm``.
    companions : list of Detections, optional
        Detections of other exposures of the same pointing and filter: only sources
        present in most of them are matched (for frames with few catalog stars among
        many spurious detections, e.g. u band).
    detections : Detections, optional
        Precomputed detections of this frame (else `detect_sources` runs).

    Returns
    -------
    SolveResult
        ``status='ok'`` with the WCS, or ``'failed'`` with a specific reason.
        With ``settings.solve.wcs == 'header'`` nothing is detected (unless
        ``detections`` are given): the header WCS is returned as is, with the sky level
        and noise of `daskstack._stats.sky_level`; the QA that needs detections stays 0 / NaN.
    """
    settings = settings or Settings()
    ss = settings.solve
    t0 = time.perf_counter()
    meta = frame.meta
    result = SolveResult(name=meta.name, path=meta.path, filter=meta.filter,
                         sip_order=0, method=ss.wcs)
    if ss.wcs == "header":
        # cheap: no detection; sky and noise for the scaling from a strided subsample
        if detections is not None:
            result.n_detections = len(detections)
            result.fwhm_px, result.elongation = detections.fwhm, detections.elongation
            result.background, result.noise = detections.background, detections.noise
        else:
            result.background, result.noise = sky_level(frame.data, frame.mask)
        return _header_only(frame, detections, catalog, settings, result, t0)
    result.method = "companions" if companions else "pattern"
    det = detections if detections is not None else detect_sources(frame, settings.detect)
    result.n_detections = len(det)
    result.fwhm_px, result.background, result.noise = det.fwhm, det.background, det.noise
    result.elongation = det.elongation
    if len(det) == 0:
        return _fail(result, "no stars detected", t0)
    if len(det) < 3:
        return _fail(result, f"too few stars detected ({len(det)} < 3)", t0)

    start_wcs, centre, scale = _start(frame)
    if centre is None or scale is None or not np.isfinite(scale) or scale <= 0:
        return _fail(result, "no header WCS and no RA/DEC + PIXSCALE keywords to start from", t0)
    ny, nx = frame.data.shape
    crpix0 = ((nx - 1) / 2.0, (ny - 1) / 2.0)
    half_diag_deg = 0.5 * math.hypot(nx, ny) * scale / 3600.0
    search_deg = ss.search_radius_arcmin / 60.0

    if catalog is None or len(catalog) == 0:
        return _fail(result, "reference catalog is empty", t0)
    stars = _field_stars(catalog, meta, settings, centre, scale,
                         half_diag_deg * (1 + ss.scale_tolerance) + search_deg)
    result.n_catalog = stars.n_region
    if stars.n_region < ss.min_matches:
        return _fail(result, f"too few catalog stars in field ({stars.n_region} < "
                             f"{ss.min_matches})", t0)

    xy = det.xy
    use = np.arange(len(xy))
    if companions:  # only sources also seen in the other exposures
        use = companion_filter(det, companions, ss.companion_fraction,
                               ss.companion_max_shift_arcsec / scale)
        if len(use) < 3:
            return _fail(result, f"too few detections confirmed by companion exposures "
                                 f"({len(use)} of {len(xy)})", t0)
    fwhm = det.fwhm if np.isfinite(det.fwhm) else 3.0
    if ss.match_radius_arcsec > 0:
        radius_px = ss.match_radius_arcsec / scale
    else:
        radius_px = max(1.5 * fwhm, 2.0 / scale)

    match, last_err = _pattern_match(xy[use] - np.array(crpix0), stars.ref, ss, (ny, nx),
                                     scale, half_diag_deg, search_deg, radius_px, result.name,
                                     second_attempt=bool(companions))
    if match is None:
        return _fail(result, _no_match_reason(last_err, ss), t0)
    result.match_false_alarm_log10 = match.log10_false_alarm
    result.flipped = match.transform.flip

    # every selected detection may match now that the transform is known
    det_index = use if companions else np.arange(len(xy))
    fit = _refine_fit(xy, det, det_index, match, stars, crpix0, fwhm, radius_px, scale, ss)
    if fit is None:
        return _fail(result, "matches lost while fitting the WCS", t0)
    _measure_fit(result, fit, det, det_index, stars)
    reason = _qa_failure(result, fit.model, scale, ss)
    if reason:
        return _fail(result, reason, t0)
    wcs = fit.model.to_wcs((ny, nx))
    hdr = wcs.to_header(relax=True)
    result.wcs_header = hdr.tostring()
    result.status = "ok"
    result.reason = ""
    result.elapsed = time.perf_counter() - t0
    log.info("%s: solved, %d matches, rms %.3f arcsec, scale %.4f, sip %d", result.name,
             result.n_matches, result.rms_arcsec, result.pixel_scale_arcsec, result.sip_order)
    return result


# -- the steps of solve_frame ---------------------------------------------------------------
@dataclass
class _FieldStars:
    """Catalog stars that may fall on the frame, brightest first, at the frame epoch."""

    n_region: int  # stars within the frame's reach (half diagonal + search radius)
    ra: np.ndarray
    dec: np.ndarray
    mag: np.ndarray
    ref: np.ndarray  # (-xi, eta) in nominal pixels about the start centre


def _field_stars(catalog, meta, settings, centre, scale, reach_deg) -> _FieldStars:
    """The catalog stars within ``reach_deg`` of the start centre, proper motions
    propagated to the frame epoch. Reference points are (-xi, eta) in nominal pixels,
    so that a standard (east-left) image is an unflipped rotation of them."""
    cat = catalog
    if settings.catalog.propagate_pm and meta.epoch is not None and "ref_epoch" in cat.colnames:
        cat = propagate_proper_motion(cat, meta.epoch)
    ra, dec, mag = _catalog_arrays(cat)
    xi, eta, cosc = _project(ra, dec, *centre)
    region = (cosc > 0) & (np.hypot(xi, eta) <= reach_deg)
    ridx = np.nonzero(region)[0]
    ridx = ridx[np.argsort(np.where(np.isfinite(mag[ridx]), mag[ridx], np.inf), kind="stable")]
    ref = np.column_stack([-xi[ridx], eta[ridx]]) * 3600.0 / scale
    return _FieldStars(int(region.sum()), ra[ridx], dec[ridx], mag[ridx], ref)


def _pattern_match(src, ref, ss, shape, scale, half_diag_deg, search_deg, radius_px, name,
                   second_attempt=False):
    """Triangle-pattern match of detections ``src`` (pixels about the frame centre) to
    catalog points ``ref``: (the match, with ``ref_idx`` into ``ref``, or None; the most
    informative `MatchError` met). ``second_attempt``: the frame failed on its own and is
    tried again with its companions' help (its searches count twice)."""
    ny, nx = shape
    tol = ss.scale_tolerance
    scale_range = (1.0 / (1.0 + tol), 1.0 + tol)
    frame_area = nx * ny
    levels_base = (12, 20, 30, 45)
    # Catalog depth per search cell: in cells of the frame's size, each star's brightness
    # rank among the stars of its cell, scaled to a frame's area. Capping it keeps the
    # catalog about as dense as the detections everywhere in the search area (a deeper
    # catalog only adds chance coincidences and triangles), whatever the area's size.
    cell = float(max(nx, ny))
    keys = np.floor(ref / cell).astype(np.int64)
    _, cell_id = np.unique(keys, axis=0, return_inverse=True)
    cell_id = cell_id.ravel()
    by_cell = np.argsort(cell_id, kind="stable")  # brightness order kept within a cell
    starts = np.searchsorted(cell_id[by_cell], cell_id[by_cell])
    rank_in_cell = np.empty(len(ref), float)
    rank_in_cell[by_cell] = np.arange(len(ref)) - starts
    depth = rank_in_cell * frame_area / cell**2
    keep_ref = np.nonzero(depth < max(3 * len(src), 2 * levels_base[-1]) + 5)[0]
    ref_used = ref[keep_ref]
    tri_index = TriangleIndex(ref_used, scale_range, max_side=0.6 * max(nx, ny)
                              * scale_range[1] * 1.02, rank=depth[keep_ref])
    levels = tuple((n, 1.5 * n + 5) for n in levels_base)
    cache: dict = {}
    match = None
    last_err = None
    # search the neighbourhood of the header position first, then the whole radius; the
    # catalog triangles are built once (per depth) and reused by every step
    # (a few bright stars at every radius before more stars anywhere: cheapest first)
    radii = [r for r in (3.0 / 60, 8.0 / 60) if r < search_deg] + [search_deg]
    # every (level, radius) is a search of its own: their number enters the false-alarm
    # probability of the match (Bonferroni), so that max_false_alarm holds per frame
    n_searches = len(levels) * len(radii)
    if second_attempt:  # a second attempt at a frame that failed on its own: count both
        n_searches *= 2
    t_match = time.perf_counter()
    r_used = np.hypot(ref_used[:, 0], ref_used[:, 1])
    for level in levels:
        for rad in radii:
            ref_radius = (half_diag_deg * (1 + tol) + rad) * 3600.0 / scale
            if (r_used <= ref_radius).sum() < 3:
                continue
            try:
                match = find_transform(
                    src, ref_used, scale_range=scale_range, allow_flip=ss.allow_flip,
                    max_offset=rad * 3600.0 / scale, match_radius=radius_px,
                    min_matches=ss.min_matches,
                    max_false_alarm=ss.max_false_alarm, clip_sigma=ss.clip_sigma,
                    levels=(level,), max_triangle_side=0.6 * max(nx, ny),
                    ref_index=tri_index, ref_radius=ref_radius, cache=cache,
                    n_searches=n_searches,
                )
                match.ref_idx = keep_ref[match.ref_idx]
                break
            except MatchError as err:
                # the most informative failure: the one with the most matches
                if last_err is None or (err.best is not None and (
                        last_err.best is None or err.best.n_matches >= last_err.best.n_matches)):
                    last_err = err
        if match is not None:
            break
    log.debug("%s: pattern match %.2f s, %d catalog triangles built", name,
              time.perf_counter() - t_match, tri_index.n_built)
    return match, last_err


def _no_match_reason(last_err, ss) -> str:
    """Why no pattern match was accepted, in the user's terms."""
    reason = last_err.reason if last_err is not None else "no catalog stars near the field"
    if reason.startswith("no consistent pattern match"):
        return f"no consistent pattern match within {ss.search_radius_arcmin:g} arcmin"
    if not reason.startswith("too few detections"):
        # the header position may be off by more than the search radius: say so
        return f"{reason} within {ss.search_radius_arcmin:g} arcmin of the header position"
    return reason


@dataclass
class _Fit:
    """The refined WCS model and the detection/catalog pairs it was fitted to."""

    model: object
    order: int
    xy: np.ndarray  # (x, y) of the detections that may match
    det_pairs: np.ndarray  # indices into ``xy`` of the kept pairs
    cat_pairs: np.ndarray  # indices into the field stars of the kept pairs


def _refine_fit(xy, det, det_index, match, stars, crpix0, fwhm, radius_px, scale, ss):
    """Iterative nearest-neighbour matching of every detection in ``det_index`` and
    weighted TAN(-SIP) fit, with clipping; None when the matches are lost."""
    cat_ra, cat_dec = stars.ra, stars.dec
    pairs_d = det_index[match.src_idx]
    pairs_c = match.ref_idx
    model = fit_tan_sip(xy[pairs_d, 0], xy[pairs_d, 1], cat_ra[pairs_c], cat_dec[pairs_c],
                        crpix0, 0)
    all_xy = xy[det_index]
    # weights: centroid variance from S/N (FWHM / (2.355 S/N)) plus a floor for the
    # catalog and PSF systematics; bright stars, whose photocentres are best defined,
    # dominate the fit
    snr = np.asarray(det.table["snr"], float)[det_index]
    sigma_c = fwhm / (2.3548 * np.maximum(snr, 1.0))
    all_w = 1.0 / (sigma_c**2 + ss.centroid_floor_px**2)
    order = 0
    radius = 3.0 * radius_px
    keep = None
    for it in range(8):
        order = ss.sip_order if it >= 2 else 0
        cxi, ceta, _ = _project(cat_ra, cat_dec, *model.crval)
        tree = cKDTree(np.column_stack([cxi, ceta]) * 3600.0)
        dxi, deta = model.pix_to_std(all_xy[:, 0], all_xy[:, 1])
        si, rj, dd = nn_match(np.column_stack([dxi, deta]) * 3600.0, tree, radius * scale)
        if len(si) < 3:
            break
        keep = clip_residuals(dd, ss.clip_sigma, 0.1 * scale)
        n_coef = (order + 1) * (order + 2) // 2 if order >= 2 else 3
        if order >= 2 and keep.sum() < 3 * n_coef:
            order = 0
        model = fit_tan_sip(all_xy[si[keep], 0], all_xy[si[keep], 1], cat_ra[rj[keep]],
                            cat_dec[rj[keep]], crpix0, order, crval=model.crval,
                            weights=all_w[si[keep]])
        radius = max(radius_px, radius * 0.7) if it < 5 else radius_px
    if keep is None or len(si) < 3:
        return None
    return _Fit(model, order, all_xy, si[keep], rj[keep])


def _measure_fit(result, fit, det, det_index, stars) -> None:
    """QA of the fit into ``result``: matches, RMS, scale, rotation, parity, flux ratio."""
    model, order = fit.model, fit.order
    # final residuals of the kept pairs under the final model
    mx, my = fit.xy[fit.det_pairs, 0], fit.xy[fit.det_pairs, 1]
    pxi, peta = model.pix_to_std(mx, my)
    cxi, ceta, _ = _project(stars.ra[fit.cat_pairs], stars.dec[fit.cat_pairs], *model.crval)
    res = np.hypot(pxi - cxi, peta - ceta) * 3600.0
    n_fit = len(fit.det_pairs)
    n_par = 2 * ((order + 1) * (order + 2) // 2 if order >= 2 else 3)
    rms = float(np.sqrt(np.sum(res**2) / max(n_fit - n_par / 2, 1)))
    fitted_scale = model.scale_arcsec
    result.n_matches = n_fit
    result.rms_arcsec = rms
    result.rms_px = rms / fitted_scale
    result.sip_order = order if order >= 2 else 0
    result.pixel_scale_arcsec = fitted_scale
    cd = model.cd
    result.rotation_deg = float(np.degrees(np.arctan2(cd[0, 1], cd[1, 1])) % 360)
    result.flipped = bool(np.linalg.det(cd) > 0)
    flux = np.asarray(det.table["flux"], float)[det_index[fit.det_pairs]]
    cmag = stars.mag[fit.cat_pairs]
    okm = np.isfinite(cmag) & (flux > 0)
    if okm.sum():
        result.flux_ratio = float(np.median(flux[okm] / 10 ** (-0.4 * cmag[okm])))


def _qa_failure(result, model, scale, ss) -> str:
    """Why a fitted WCS is not to be trusted ("" when it is)."""
    tol = ss.scale_tolerance
    if result.n_matches < ss.min_matches:
        return f"too few matched stars ({result.n_matches} < {ss.min_matches})"
    if result.rms_arcsec > ss.max_rms_arcsec:
        return f"rms {result.rms_arcsec:.2f} arcsec > {ss.max_rms_arcsec:g}"
    fitted_scale = result.pixel_scale_arcsec
    if abs(fitted_scale / scale - 1.0) > tol * 1.2:
        return (f"implausible pixel scale {fitted_scale:.4f} arcsec/px (start "
                f"{scale:.4f} +- {100 * tol:.0f}%)")
    sv = np.linalg.svd(model.cd, compute_uv=False)
    if sv[0] / sv[1] - 1.0 > ss.max_skew:
        return (f"implausible pixel shape: axis ratio {sv[0] / sv[1]:.4f} "
                f"(> 1 + {ss.max_skew:g})")
    return ""


# -- thin frames: the camera's geometry from the night's solved exposures -------------------
ROTATION_FLOOR_DEG = 0.01  # rotation searched at least this far (one solved exposure: no spread)


@dataclass
class GeometryPrior:
    """A camera's geometry on one night, from its solved exposures (small, picklable).

    ``cd`` (deg/px, the mean CD) and the SIP ``sip_a`` / ``sip_b`` (``{(i, j): coeff}``,
    the mean over the exposures fitted to the highest order; empty for TAN) fix the pixel scale, rotation and
    distortion about the frame centre; ``rotation_spread_deg`` and ``scale_spread``
    are their standard deviations over the exposures. ``pointing_offset_arcsec``
    (east, north) is the mean of (solved centre - start centre) of the exposures, the
    telescope's pointing error that night, and ``pointing_spread_arcsec`` its scatter.
    """

    shape: tuple[int, int]
    cd: np.ndarray
    sip_order: int = 0
    sip_a: dict = field(default_factory=dict)
    sip_b: dict = field(default_factory=dict)
    rotation_spread_deg: float = 0.0
    scale_spread: float = 0.0
    pointing_offset_arcsec: tuple[float, float] = (0.0, 0.0)
    pointing_spread_arcsec: float = 0.0
    n_exposures: int = 0
    names: tuple[str, ...] = ()

    @property
    def scale_arcsec(self) -> float:
        return float(math.sqrt(abs(np.linalg.det(self.cd))) * 3600.0)

    @property
    def rotation_range_deg(self) -> float:
        """How far the rotation of a frame of this camera may be from ``cd``'s."""
        return max(3.0 * self.rotation_spread_deg, ROTATION_FLOOR_DEG)


def _sip_dict(coeffs) -> dict:
    return {(i, j): float(coeffs[i, j]) for i in range(coeffs.shape[0])
            for j in range(coeffs.shape[1]) if i + j >= 2 and coeffs[i, j] != 0}


def geometry_prior(solved, shape) -> GeometryPrior:
    """The `GeometryPrior` of the solved exposures ``solved``: ``(name, wcs, start_centre)``
    each (``wcs`` fitted, ``start_centre`` the (ra, dec) its solve started from), all of
    one camera and night with frames of ``shape`` (ny, nx). Exposures of the other
    parity than the majority, or whose CRPIX is not the frame centre, are not used.
    Raises ValueError when none is usable."""
    ny, nx = shape
    centre = ((nx - 1) / 2.0, (ny - 1) / 2.0)
    rows = []
    for name, wcs, start in solved:
        if wcs is None or not np.allclose(np.asarray(wcs.wcs.crpix) - 1.0, centre, atol=0.51):
            continue
        cd = np.asarray(wcs.pixel_scale_matrix, float)
        with quiet_astropy():
            ra, dec = wcs.all_pix2world([centre], 0)[0]
        xi, eta, _ = _project(np.array([ra]), np.array([dec]), *start)
        rows.append((name, wcs, cd, float(xi[0]) * 3600.0, float(eta[0]) * 3600.0))
    if not rows:
        raise ValueError("no solved exposure of this camera with its reference pixel at the "
                         "frame centre")
    parity = np.sign([np.linalg.det(r[2]) for r in rows])
    major = 1.0 if (parity > 0).sum() > len(parity) / 2 else -1.0
    rows = [r for r, p in zip(rows, parity, strict=True) if p == major]
    cds = np.array([r[2] for r in rows])
    # the position angle of +y (as SolveResult.rotation_deg) and the scale of each
    angles = np.degrees(np.arctan2(cds[:, 0, 1], cds[:, 1, 1]))
    mean_angle = math.degrees(np.angle(np.mean(np.exp(1j * np.radians(angles)))))
    spread = (float(np.std((angles - mean_angle + 180.0) % 360.0 - 180.0, ddof=1))
              if len(rows) > 1 else 0.0)
    scales = np.sqrt(np.abs(np.linalg.det(cds)))
    offsets = np.array([[r[3], r[4]] for r in rows])
    mean_offset = offsets.mean(0)
    # the distortion: the mean of the SIP polynomials of the exposures fitted to the highest
    # order (all about the frame centre, so their coefficients average as the mappings do)
    order = max(r[1].sip.a_order if r[1].sip is not None else 0 for r in rows)
    with_sip = [r[1].sip for r in rows if r[1].sip is not None and r[1].sip.a_order == order]
    sip_a: dict = {}
    sip_b: dict = {}
    for sip in with_sip:
        for target, coeffs in ((sip_a, sip.a), (sip_b, sip.b)):
            for key, value in _sip_dict(coeffs).items():
                target[key] = target.get(key, 0.0) + value / len(with_sip)
    return GeometryPrior(
        shape=(int(ny), int(nx)), cd=cds.mean(0), sip_order=order, sip_a=sip_a, sip_b=sip_b,
        rotation_spread_deg=spread,
        scale_spread=float(np.std(scales, ddof=1) / scales.mean()) if len(rows) > 1 else 0.0,
        pointing_offset_arcsec=(float(mean_offset[0]), float(mean_offset[1])),
        pointing_spread_arcsec=(float(np.sqrt(((offsets - mean_offset) ** 2).sum(1).mean()))
                                if len(rows) > 1 else 0.0),
        n_exposures=len(rows), names=tuple(r[0] for r in rows))


def night_sources(detections, wcss, radius_arcsec: float, min_count: int = 2):
    """Sky positions (ra, dec arrays, deg) of the sources that the solved exposures of a
    night saw in at least ``min_count`` of them (``min(min_count, len(wcss))``): stars,
    whatever the catalog holds (a cosmic ray is in one exposure only). ``detections``
    and ``wcss`` pair each exposure's `Detections` with its fitted WCS; positions are
    averaged over the exposures that saw them."""
    pairs = [(d, w) for d, w in zip(detections, wcss, strict=True)
             if d is not None and w is not None and len(d)]
    if not pairs:
        return np.zeros(0), np.zeros(0)
    need = max(1, min(min_count, len(pairs)))
    with quiet_astropy():
        ra0, dec0 = pairs[0][1].wcs.crval
        sky = [w.all_pix2world(d.xy, 0) for d, w in pairs]
    sums = np.zeros((0, 2))
    counts = np.zeros(0, int)
    for radec in sky:
        xi, eta, _ = _project(radec[:, 0], radec[:, 1], ra0, dec0)
        pts = np.column_stack([xi, eta]) * 3600.0
        if len(sums):
            si, ci, _ = nn_match(pts, cKDTree(sums / counts[:, None]), radius_arcsec)
            sums[ci] += pts[si]
            counts[ci] += 1
            new = np.setdiff1d(np.arange(len(pts)), si)
        else:
            new = np.arange(len(pts))
        sums = np.vstack([sums, pts[new]])
        counts = np.concatenate([counts, np.ones(len(new), int)])
    keep = counts >= need
    mean = sums[keep] / counts[keep, None] / 3600.0
    return _deproject(mean[:, 0], mean[:, 1], ra0, dec0)


def _rotated(cd: np.ndarray, theta_rad: float) -> np.ndarray:
    c, s = math.cos(theta_rad), math.sin(theta_rad)
    return np.array([[c, -s], [s, c]]) @ cd


def solve_constrained(frame: Frame, catalog: Table, prior: GeometryPrior,
                      settings: Settings | None = None, companions=None,
                      detections: Detections | None = None, night=None) -> SolveResult:
    """Solve a thin frame with the geometry of its camera's solved exposures that night.

    Scale, rotation and distortion come from ``prior`` (`geometry_prior`); only the
    shift, and a rotation within ``prior.rotation_range_deg``, are searched
    (`daskstack.match.find_shift`): first within 10" + 3x the pointing scatter of the
    night's exposures (at most, and with fewer than three exposures,
    ``companion_max_shift_arcsec``) of where the night's pointing error puts the frame, then
    within ``search_radius_arcmin`` of the start; both searches count in the
    false-alarm probability, as do the two unconstrained attempts made before
    (``n_searches`` = 3 x 2). The references are the catalog stars and ``night``
    ((ra, dec) of `night_sources`: stars the solved exposures saw, also those the
    catalog lacks); with ``companions`` (detections of other exposures of the same
    pointing and filter) only the detections they confirm are matched.

    Returns a `SolveResult` with ``method='constrained'``: ``ok`` with a TAN(-SIP) WCS
    (the prior's CD rotated by the fitted angle, its SIP, the fitted CRVAL), or
    ``failed`` with the reason (too few matches, not significant, RMS too large).
    """
    settings = settings or Settings()
    ss = settings.solve
    t0 = time.perf_counter()
    meta = frame.meta
    result = SolveResult(name=meta.name, path=meta.path, filter=meta.filter,
                         method="constrained")
    ny, nx = frame.data.shape
    if tuple(prior.shape) != (ny, nx):
        return _fail(result, f"frame shape {ny}x{nx} differs from the camera's solved "
                             f"exposures ({prior.shape[0]}x{prior.shape[1]})", t0)
    det = detections if detections is not None else detect_sources(frame, settings.detect)
    result.n_detections = len(det)
    result.fwhm_px, result.background, result.noise = det.fwhm, det.background, det.noise
    if len(det) < ss.constrained_min_matches:
        return _fail(result, f"too few stars detected ({len(det)} < "
                             f"{ss.constrained_min_matches})", t0)
    _, start, _ = _start(frame)
    if start is None:
        return _fail(result, "no header WCS and no RA/DEC keywords to start from", t0)
    xy = det.xy
    use = np.arange(len(xy))
    scale = prior.scale_arcsec
    if companions:
        use = companion_filter(det, companions, ss.companion_fraction,
                               ss.companion_max_shift_arcsec / scale)
        if len(use) < ss.constrained_min_matches:
            return _fail(result, f"too few detections confirmed by companion exposures "
                                 f"({len(use)} of {len(xy)})", t0)
    # where the night's pointing error puts the frame: the centre of the projection
    offset = np.array(prior.pointing_offset_arcsec)
    ra_c, dec_c = _deproject(np.array([offset[0] / 3600.0]), np.array([offset[1] / 3600.0]),
                             *start)
    crval = (float(ra_c[0]), float(dec_c[0]))
    crpix0 = ((nx - 1) / 2.0, (ny - 1) / 2.0)
    fwhm = det.fwhm if np.isfinite(det.fwhm) else 3.0
    # the geometry is known: the match radius need only cover the centroid scatter of
    # faint stars and what the prior's geometry misses (a smaller radius is fewer chances)
    radius_px = (ss.match_radius_arcsec / scale if ss.match_radius_arcsec > 0
                 else max(0.35 * fwhm, 1.0))
    # the first search: where the night's pointing error puts the frame, as far as the
    # exposures scatter about it (measured from three or more; else the dither allowed)
    near_arcsec = (min(3.0 * prior.pointing_spread_arcsec + 10.0, ss.companion_max_shift_arcsec)
                   if prior.n_exposures >= 3 else ss.companion_max_shift_arcsec)
    near_px = near_arcsec / scale
    wide_px = (ss.search_radius_arcmin * 60.0 + float(np.hypot(*offset))) / scale
    searches = [near_px] + ([wide_px] if wide_px > near_px else [])

    # references: catalog stars, then the night's own stars the catalog lacks
    ra, dec, mag = _catalog_arrays(catalog)
    if settings.catalog.propagate_pm and meta.epoch is not None and \
            "ref_epoch" in catalog.colnames:
        ra, dec, mag = _catalog_arrays(propagate_proper_motion(catalog, meta.epoch))
    n_cat = len(ra)
    if night is not None and len(night[0]):
        nra, ndec = (np.asarray(v, float) for v in night)
        cxi, ceta, _ = _project(ra, dec, *crval)
        nxi, neta, _ = _project(nra, ndec, *crval)
        d, _ = cKDTree(np.column_stack([cxi, ceta]) * 3600.0).query(
            np.column_stack([nxi, neta]) * 3600.0, distance_upper_bound=2 * radius_px * scale)
        extra = ~np.isfinite(d)
        ra, dec = np.concatenate([ra, nra[extra]]), np.concatenate([dec, ndec[extra]])
        mag = np.concatenate([mag, np.full(int(extra.sum()), np.nan)])
    half_diag_px = 0.5 * math.hypot(nx, ny)
    model = _Model(crval, crpix0, prior.cd.copy(), prior.sip_order, dict(prior.sip_a),
                   dict(prior.sip_b))

    def plane(model):
        """Detections and references in the tangent plane of ``model``, in pixels."""
        dxi, deta = model.pix_to_std(xy[use, 0], xy[use, 1])
        rxi, reta, cosc = _project(ra, dec, *model.crval)
        k = 3600.0 / scale
        return np.column_stack([dxi, deta]) * k, np.column_stack([rxi, reta]) * k, cosc > 0

    # weights: centroid variance from S/N plus the floor, as in `solve_frame`'s fit
    snr = np.asarray(det.table["snr"], float)[use]
    weights = 1.0 / ((fwhm / (2.3548 * np.maximum(snr, 1.0))) ** 2 + ss.centroid_floor_px**2)
    src, ref, front = plane(model)
    region = front & (np.hypot(*ref.T) <= half_diag_px + wide_px + radius_px)
    ridx = np.nonzero(region)[0]
    result.n_catalog = int((ridx < n_cat).sum())
    if len(ridx) < ss.constrained_min_matches:
        return _fail(result, f"too few reference stars around the field ({len(ridx)} < "
                             f"{ss.constrained_min_matches})", t0)
    # the references are complete over the area they were taken from
    n_searches = 3 * len(searches)
    match, last_err = None, None
    for max_offset in searches:
        in_area = np.hypot(*ref[ridx].T) <= half_diag_px + max_offset + radius_px
        area = math.pi * (half_diag_px + max_offset + radius_px) ** 2
        try:
            match = find_shift(src, ref[ridx[in_area]], max_offset=max_offset,
                               match_radius=radius_px,
                               max_rotation_deg=prior.rotation_range_deg,
                               min_matches=ss.constrained_min_matches,
                               max_false_alarm=ss.max_false_alarm, n_searches=n_searches,
                               density_area=area, weights=weights)
            match.ref_idx = ridx[in_area][match.ref_idx]
            break
        except MatchError as err:
            if last_err is None or (err.best is not None and (
                    last_err.best is None or err.best.n_matches > last_err.best.n_matches)):
                last_err = err
    if match is None:
        return _fail(result, f"constrained search: {last_err.reason}", t0)
    result.match_false_alarm_log10 = match.log10_false_alarm

    # the shift and rotation found, refined in the sky: CRVAL moves, CD turns
    theta = math.radians(match.meta["rotation_deg"])
    max_rot = math.radians(prior.rotation_range_deg)
    t = match.transform.offset * scale / 3600.0
    new = _deproject(np.array([t[0]]), np.array([t[1]]), *model.crval)
    model.crval = (float(new[0][0]), float(new[1][0]))
    model.cd = _rotated(prior.cd, theta)
    si = rj = np.zeros(0, int)
    dist = np.zeros(0)
    for _ in range(4):
        src, ref, _front = plane(model)
        si, rj, dist = nn_match(src, cKDTree(ref[ridx]), radius_px)
        if len(si) < 2:
            break
        # a star hit by a cosmic ray, or a chance neighbour, must not pull the few others
        keep = clip_residuals(dist, ss.clip_sigma, radius_px / 3.0)
        if keep.sum() >= 2:
            si, rj = si[keep], rj[keep]
        step = fit_shift_rotation(src[si], ref[ridx][rj], max_rot - abs(theta), weights[si])
        dtheta = math.atan2(step.matrix[1, 0], step.matrix[0, 0])
        # ref = R src + t about this CRVAL: move CRVAL to where t points, turn CD by dtheta
        t = step.offset * scale / 3600.0
        new = _deproject(np.array([t[0]]), np.array([t[1]]), *model.crval)
        model.crval = (float(new[0][0]), float(new[1][0]))
        theta += dtheta
        model.cd = _rotated(prior.cd, theta)
    src, ref, _front = plane(model)
    si, rj, dist = nn_match(src, cKDTree(ref[ridx]), radius_px)
    n_fit = len(si)
    rms = float(np.sqrt(np.mean(dist**2))) * scale if n_fit else float("nan")
    result.n_matches = n_fit
    result.rms_arcsec = rms
    result.rms_px = rms / scale
    result.sip_order = prior.sip_order if prior.sip_order >= 2 else 0
    result.pixel_scale_arcsec = scale
    result.rotation_deg = float(np.degrees(np.arctan2(model.cd[0, 1], model.cd[1, 1])) % 360)
    result.flipped = bool(np.linalg.det(model.cd) > 0)
    flux = np.asarray(det.table["flux"], float)[use[si]]
    cmag = mag[ridx[rj]]
    okm = np.isfinite(cmag) & (flux > 0)
    if okm.sum():
        result.flux_ratio = float(np.median(flux[okm] / 10 ** (-0.4 * cmag[okm])))
    if n_fit < ss.constrained_min_matches:
        return _fail(result, f"constrained search: matches lost while refining ({n_fit} < "
                             f"{ss.constrained_min_matches})", t0)
    if rms > ss.max_rms_arcsec:
        return _fail(result, f"rms {rms:.2f} arcsec > {ss.max_rms_arcsec:g}", t0)
    result.wcs_header = model.to_wcs((ny, nx)).to_header(relax=True).tostring()
    result.status = "ok"
    result.reason = ""
    result.elapsed = time.perf_counter() - t0
    log.info("%s: solved with the geometry of %d exposure(s), %d matches (%d catalog), "
             "rms %.3f arcsec, false-alarm probability %s", result.name, prior.n_exposures,
             n_fit, int((ridx[rj] < n_cat).sum()), rms,
             format_probability(match.log10_false_alarm))
    return result


# -- output -------------------------------------------------------------------------------
_QA_CARDS = (
    ("n_matches", "DSNMATCH", "matched catalog stars"),
    ("rms_arcsec", "DSRMS", "[arcsec] RMS of the fit residuals"),
    ("rms_px", "DSRMSPX", "[px] RMS of the fit residuals"),
    ("n_detections", "DSNDET", "stars detected"),
    ("fwhm_px", "DSFWHM", "[px] measured FWHM"),
    ("elongation", "DSELONG", "median major/minor axis ratio of the stars"),
    ("pixel_scale_arcsec", "DSSCALE", "[arcsec/px] fitted pixel scale"),
    ("flux_ratio", "DSFLXRAT", "detected flux / 10**(-0.4 mag)"),
)


def _qa_cards(result: SolveResult):
    cards = [("DSSTATUS", result.status, "daskstack astrometry status"),
             ("DSMETHOD", result.method, "pattern/companions/constrained: fitted; header")]
    for attr, key, comment in _QA_CARDS:
        value = getattr(result, attr)
        if isinstance(value, float) and not math.isfinite(value):
            continue
        cards.append((key, value, comment))
    return cards


def write_wcs_file(result: SolveResult, path, shape=None) -> None:
    """Write the fitted WCS as the PRIMARY header of a FITS file (astrometry.net ``.wcs``).

    Atomic. QA keywords (DSSTATUS, DSNMATCH, DSRMS ...) are added, and with ``shape``
    (ny, nx) the image size as IMAGEW/IMAGEH, as solve-field writes it (so the file
    can serve as an output grid). Raises ValueError for a failed result.
    """
    if not result.wcs_header:
        raise ValueError(f"{result.name}: no WCS to write ({result.reason})")
    header = fits.Header.fromstring(result.wcs_header)
    if shape is not None:
        header["IMAGEW"] = (int(shape[1]), "image width, pixels")
        header["IMAGEH"] = (int(shape[0]), "image height, pixels")
    for key, value, comment in _qa_cards(result):
        header[key] = (value, comment)
    header["HISTORY"] = f"daskstack astrometry of {result.name}"
    hdu = fits.PrimaryHDU(header=header)
    with atomic_path(path, suffix=".fits") as tmp:
        hdu.writeto(tmp)


_WCS_PREFIXES = ("CRPIX", "CRVAL", "CTYPE", "CUNIT", "CDELT", "CD1_", "CD2_", "PC1_", "PC2_",
                 "CROTA", "A_", "B_", "AP_", "BP_", "LONPOLE", "LATPOLE", "RADESYS", "EQUINOX",
                 "WCSAXES", "MJDREF", "WCSNAME", "PV1_", "PV2_")


def updated_header(header: fits.Header, result: SolveResult) -> fits.Header:
    """The frame header with the fitted WCS; the original WCS kept under alternate key 'O'.

    The original primary WCS cards are written as ``CRPIX1O``, ``CD1_1O`` ... with
    ``WCSNAMEO = 'ORIGINAL'`` (FITS alternate WCS), then replaced by the new WCS
    (``WCSNAME = 'daskstack'``) and the QA keywords. A failed result returns an
    unchanged copy with a HISTORY line.
    """
    out = header.copy()
    if not result.wcs_header:
        out["HISTORY"] = f"daskstack astrometry failed: {result.reason}"[:72]
        return out
    with quiet_astropy():
        try:
            orig = WCS(header, naxis=2, relax=True)
            if orig.has_celestial and orig.wcs.ctype[0]:
                alt = orig.deepcopy()
                alt.sip = None
                alt.wcs.alt = "O"
                alt.wcs.name = "ORIGINAL"
                for card in alt.to_header(key="O").cards:
                    if card.keyword.endswith("O") or card.keyword.startswith("WCSNAME"):
                        out[card.keyword] = (card.value, card.comment)
        except Exception as err:  # a broken original WCS is simply not kept
            log.debug("original WCS not kept: %s", err)
    for key in list(out.keys()):
        if key.startswith(_WCS_PREFIXES) and not key.endswith("O") and key not in ("A_ORDER",):
            del out[key]
        elif key in ("A_ORDER", "B_ORDER", "AP_ORDER", "BP_ORDER"):
            del out[key]
    new = fits.Header.fromstring(result.wcs_header)
    for card in new.cards:
        if card.keyword in ("DATE-OBS", "MJD-OBS", "DATEREF", "MJDREFI", "MJDREFF"):
            continue
        out[card.keyword] = (card.value, card.comment)
    out["WCSNAME"] = ("daskstack", "WCS fitted by daskstack")
    for key, value, comment in _qa_cards(result):
        out[key] = (value, comment)
    return out
