"""Photometric calibration: each frame's magnitude zero point from the catalog stars in it.

Definition. A frame's zero point ``zp`` is the magnitude, in the catalog band of its
filter (`filter_band`), of a source giving one unit of the frame's pixel values (its
BUNIT: electrons for LCO ``e91`` frames, else ADU) per second of exposure, above the
atmosphere of that night as the frame saw it (extinction, clouds and all), at colour
``g - r = 0``::

    mag = zp - 2.5 log10(flux / EXPTIME) + colour_term * (g - r)

with ``flux`` the star's total flux (pixel units), the colour term fitted per filter,
camera and night (`fit_zero_points`; 0 where no colours are known or it is turned off).

How (`measure_frame_stars`, on the worker that has the frame, its detections and its
WCS in memory): the catalog stars in the frame with a magnitude in the band are put at
their catalog positions (the WCS is good to a fraction of a pixel) and kept only where
the detection found the same star clean (detect's flags: not saturated or masked,
no comparable neighbour, not at an edge) and no catalog neighbour brighter than 4 mag
fainter lies within the large aperture; they are measured with
`daskstack.photometry.aperture_photometry` in an aperture of ``aperture_fwhm`` x FWHM,
corrected to total flux with the aperture correction of the frame's bright stars
(`daskstack.photometry.aperture_correction`, ``correction_fwhm`` x FWHM), both with the
sky of the same annulus beyond the large aperture. Each star gives
``zp_i = m_cat - m_inst`` with an error from its photon noise and the catalog's (for Gaia,
the published relation's scatter); `fit_zero_points` takes the clipped, weighted mean
(with a colour term, jointly for the frames of one filter, camera and night), and the
zero point's error is the formal one, scaled up by the scatter where that is larger,
with the aperture correction's error added.

No band for the filter (u' with Gaia), too few stars: no zero point, and a reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from astropy.table import Table
from astropy.wcs import WCS
from scipy.spatial import cKDTree

from .catalogs import BANDS, propagate_proper_motion
from .config import PhotometrySettings
from .photometry import aperture_correction, aperture_photometry

__all__ = [
    "COLOUR",
    "calibrate_frame",
    "FILTER_BANDS",
    "FrameStars",
    "ZeroPoint",
    "filter_band",
    "fit_zero_points",
    "frame_zero_point",
    "measure_frame_stars",
]

log = logging.getLogger(__name__)

# the catalog band of each filter name (LCO's names, and the bands' own): one table
FILTER_BANDS = {
    "up": "u", "u": "u", "sdss-u": "u",
    "gp": "g", "g": "g", "sdss-g": "g",
    "rp": "r", "r": "r", "sdss-r": "r",
    "ip": "i", "i": "i", "sdss-i": "i",
    "zs": "z", "z": "z", "pan-z": "z", "sdss-z": "z",
    "y": "y", "pan-y": "y",
}
COLOUR = ("g", "r")  # the colour index of the colour term: g - r
NEIGHBOUR_DMAG = 4.0  # a catalog neighbour brighter than this much fainter disturbs
ALONE_DMAG = 6.0  # ... the aperture correction's stars (0.4 % of the light)
FALLBACK_FWHM = (4.0, 3.0)  # smaller aperture-correction radii, tried in turn
FALLBACK_ERROR = 0.01  # mag, for the light beyond them
MAG_PER_FLUX = 2.5 / np.log(10.0)  # d(mag) / (d(flux) / flux)


def filter_band(filter_name: str) -> str | None:
    """The catalog band (`daskstack.catalogs.BANDS`) of a filter; None when none fits
    (B, V, w, H-alpha ...): such frames get no zero point."""
    band = FILTER_BANDS.get(str(filter_name).strip().lower())
    return band if band in BANDS else None


@dataclass
class FrameStars:
    """The calibration stars of one frame (small, picklable): instrumental magnitudes
    ``-2.5 log10(total flux / EXPTIME)``, catalog magnitudes in the band and colours
    (g - r; NaN unknown), each star's error (photometry and catalog), and the aperture
    correction's error, common to all."""

    m_inst: np.ndarray
    m_cat: np.ndarray
    error: np.ndarray
    colour: np.ndarray
    correction_error: float = 0.0

    def __len__(self) -> int:
        return len(self.m_inst)


@dataclass
class ZeroPoint:
    """One frame's zero point (see the module notes), or why it has none."""

    zp: float = float("nan")
    zp_err: float = float("nan")
    n_zp: int = 0
    band: str = ""
    reason: str = ""  # why there is no zero point ("" = there is one)
    colour_term: float = 0.0
    airmass: float = float("nan")
    stars: FrameStars | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return np.isfinite(self.zp)


def measure_frame_stars(data: np.ndarray, mask: np.ndarray, wcs: WCS, catalog: Table,
                        band: str, exptime: float, fwhm_px: float, *,
                        detections: Table | None = None, variance: np.ndarray | None = None,
                        epoch: float | None = None, correlation: float = 1.0,
                        settings: PhotometrySettings | None = None
                        ) -> tuple[FrameStars | None, str]:
    """The calibration stars of one frame (see the module notes), or None and why not.

    ``detections``: the frame's clean detections (`daskstack.detect.Detections.table`,
    columns ``x``, ``y``); without them every catalog star free of masked pixels and
    catalog neighbours is used. ``epoch``: decimal year to move the catalog to.
    ``correlation``: of the pixels' noise, as `aperture_photometry` takes it (a coadd's
    NOISECOR; 1 for a frame as observed).
    """
    settings = settings or PhotometrySettings()
    column = f"{band}_mag"
    if column not in catalog.colnames:
        return None, f"no {band}-band magnitudes in the catalog"
    if not (exptime and exptime > 0):
        return None, "no EXPTIME"
    if not (fwhm_px and np.isfinite(fwhm_px)):
        return None, "no FWHM measured"
    stars = propagate_proper_motion(catalog, epoch) if epoch is not None else catalog
    ny, nx = data.shape
    with np.errstate(invalid="ignore"):
        x, y = wcs.all_world2pix(np.asarray(stars["ra"], float), np.asarray(stars["dec"], float),
                                 0, quiet=True)
    radius = settings.aperture_fwhm * fwhm_px
    big = settings.correction_fwhm * fwhm_px
    annulus = (big + 4.0, big + 10.0)
    reach = annulus[1] + 1.0
    all_mag = np.asarray(stars["mag"], float)
    inside = np.isfinite(x) & np.isfinite(y) & (x > -big) & (y > -big) & (x < nx + big) & \
        (y < ny + big)
    x, y, all_mag, stars = x[inside], y[inside], all_mag[inside], stars[inside]
    band_mag = _values(stars, column)
    usable = np.isfinite(band_mag) & (x > reach) & (y > reach) & (x < nx - 1 - reach) & \
        (y < ny - 1 - reach)
    # isolation in the catalog: nothing brighter than NEIGHBOUR_DMAG fainter in the big
    # aperture; the aperture correction's stars nothing brighter than ALONE_DMAG fainter
    tree = cKDTree(np.column_stack([x, y]))
    alone = np.ones(len(x), bool)
    for i, j in tree.query_pairs(big + fwhm_px, output_type="ndarray"):
        mi, mj = all_mag[i], all_mag[j]
        if not np.isfinite(mj) or mj < mi + ALONE_DMAG:
            alone[i] = False
        if not np.isfinite(mi) or mi < mj + ALONE_DMAG:
            alone[j] = False
        if np.hypot(x[i] - x[j], y[i] - y[j]) > big:
            continue
        if not np.isfinite(mj) or mj < mi + NEIGHBOUR_DMAG:
            usable[i] = False
        if not np.isfinite(mi) or mi < mj + NEIGHBOUR_DMAG:
            usable[j] = False
    if detections is not None:
        # the detection saw this star clean (not saturated, masked, crowded or at an edge)
        det_xy = np.column_stack([np.asarray(detections["x"], float),
                                  np.asarray(detections["y"], float)])
        if len(det_xy):
            dist, _ = cKDTree(det_xy).query(np.column_stack([x, y]))
            usable &= dist < max(1.0, 0.5 * fwhm_px)
        else:
            usable[:] = False
    index = np.nonzero(usable)[0]
    if len(index) < settings.min_stars:
        return None, (f"too few isolated, unsaturated catalog stars with a {band} magnitude "
                      f"({len(index)} < {settings.min_stars})")
    bright = index[alone[index]]
    # too few isolated bright stars that far out (a small or crowded frame): a smaller
    # radius, whose missing light (1-1.5 % at 3-4 FWHM for the Moffat wings of the
    # synthetic frames) is added as error
    for reach_fwhm in sorted({settings.correction_fwhm, *FALLBACK_FWHM}, reverse=True):
        if reach_fwhm > settings.correction_fwhm or reach_fwhm <= settings.aperture_fwhm:
            continue
        big = reach_fwhm * fwhm_px
        correction = aperture_correction(data, x[bright], y[bright], radius, big,
                                         variance=variance, mask=mask,
                                         clip_sigma=settings.clip_sigma)
        if correction.n_stars >= 2:
            break
    if correction.n_stars < 1:
        return None, "no aperture correction: no bright isolated star"
    fell_back = big < settings.correction_fwhm * fwhm_px
    correction_error = float(np.hypot(correction.error, FALLBACK_ERROR if fell_back else 0.0))
    annulus = (big + 4.0, big + 10.0)
    phot = aperture_photometry(data, x[index], y[index], radius, variance=variance, mask=mask,
                               annulus=annulus, correlation=correlation)
    flux, flux_err = np.asarray(phot["flux"], float), np.asarray(phot["flux_err"], float)
    ok = (phot["flags"] == 0) & (flux > 5.0 * flux_err)
    if ok.sum() < settings.min_stars:
        return None, (f"too few catalog stars measured cleanly in the {band} band "
                      f"({int(ok.sum())} < {settings.min_stars})")
    index, flux, flux_err = index[ok], flux[ok], flux_err[ok]
    m_inst = -2.5 * np.log10(flux / exptime) + correction.correction
    cat_err = _values(stars, f"{column}_err")[index] if f"{column}_err" in stars.colnames \
        else np.zeros(len(index))
    error = np.hypot(MAG_PER_FLUX * flux_err / flux, np.nan_to_num(cat_err))
    colour = (_values(stars, f"{COLOUR[0]}_mag") - _values(stars, f"{COLOUR[1]}_mag")
              if all(f"{b}_mag" in stars.colnames for b in COLOUR)
              else np.full(len(stars), np.nan))[index]
    return FrameStars(m_inst, band_mag[index], error, colour, correction_error), ""


def calibrate_frame(frame, wcs: WCS, catalog: Table, fwhm_px: float, *, detections=None,
                    settings=None) -> ZeroPoint:
    """The zero point of one solved `daskstack.frames.Frame` (its pixels, mask and header
    in memory), with its noise model for the errors; ``settings`` a
    `daskstack.config.Settings`. The frame's AIRMASS comes along (NaN without one)."""
    from .config import Settings
    from .noise import frame_noise_model

    settings = settings or Settings()
    airmass = frame.meta.airmass if frame.meta.airmass is not None else float("nan")
    band = filter_band(frame.meta.filter)
    if band is None:
        return ZeroPoint(reason=f"no catalog band for filter {frame.meta.filter!r}",
                         airmass=airmass)
    if f"{band}_mag" not in catalog.colnames:
        system = catalog.meta.get("photsys") or catalog.meta.get("source") or "the catalog"
        return ZeroPoint(band=band, airmass=airmass,
                         reason=f"no {band}-band magnitudes in the catalog ({system})")
    variance, _ = frame_noise_model(frame, gain=settings.register.gain,
                                    rdnoise=settings.register.rdnoise)
    stars, why = measure_frame_stars(
        frame.data, frame.mask, wcs, catalog, band, frame.meta.exptime, fwhm_px,
        detections=None if detections is None else detections.table, variance=variance,
        epoch=frame.meta.epoch if settings.catalog.propagate_pm else None,
        settings=settings.photometry)
    if stars is None:
        return ZeroPoint(band=band, reason=why, airmass=airmass)
    result = frame_zero_point(stars, band, settings.photometry)
    result.stars, result.airmass = stars, airmass
    return result


def _values(table: Table, column: str) -> np.ndarray:
    values = table[column]
    if np.ma.isMaskedArray(values):
        values = values.filled(np.nan)
    return np.asarray(getattr(values, "value", values), float)


def frame_zero_point(stars: FrameStars, band: str,
                     settings: PhotometrySettings | None = None) -> ZeroPoint:
    """One frame's zero point from its stars alone (no colour term): `fit_zero_points`
    of one frame."""
    return fit_zero_points([stars], band, settings, colour_term=False)[0]


def fit_zero_points(frames: list[FrameStars], band: str,
                    settings: PhotometrySettings | None = None, *,
                    colour_term: bool | None = None) -> list[ZeroPoint]:
    """Zero points of frames of one filter, camera and night, with one colour term.

    Model: ``m_cat - m_inst = zp_frame + colour_term * (g - r)``, weighted least squares
    with ``clip_sigma`` clipping of the stars; the colour term (when ``colour_term``,
    default ``settings.colour_term``, and enough stars have colours spread over > 0.2
    mag) is common to the frames, each frame its own zero point. Stars without a colour
    count only where there is no colour term. Each zero point's error: the formal
    error, times sqrt(reduced chi-square) where the stars scatter more than their
    errors say, the colour term's error propagated, and the frame's aperture-correction
    error in quadrature.
    """
    settings = settings or PhotometrySettings()
    fit_colour = settings.colour_term if colour_term is None else colour_term
    frame_of = np.concatenate([np.full(len(s), k) for k, s in enumerate(frames)]).astype(int)
    delta = np.concatenate([s.m_cat - s.m_inst for s in frames])
    weight = 1.0 / np.concatenate([np.maximum(s.error, 1e-3) for s in frames]) ** 2
    colour = np.concatenate([s.colour for s in frames])
    has_colour = np.isfinite(colour)
    fit_colour = bool(fit_colour) and has_colour.sum() >= 2 * settings.min_stars and \
        np.ptp(colour[has_colour]) > 0.2
    use = np.isfinite(delta) & (has_colour if fit_colour else True)
    n_frames = len(frames)
    for _ in range(6):
        zp, slope, slope_var, mean_colour, wsum = _solve(delta, weight, colour, frame_of,
                                                         use, n_frames, fit_colour)
        model = zp[frame_of] + (slope * np.nan_to_num(colour) if fit_colour else 0.0)
        resid = (delta - model) * np.sqrt(weight)
        scale = _robust_scale(resid[use])
        keep = use & (np.abs(resid) <= settings.clip_sigma * max(scale, 1.0))
        if np.array_equal(keep, use):
            break
        use = keep
    else:  # the last clipping changed the stars: the fit of those that are left
        zp, slope, slope_var, mean_colour, wsum = _solve(delta, weight, colour, frame_of,
                                                         use, n_frames, fit_colour)
        model = zp[frame_of] + (slope * np.nan_to_num(colour) if fit_colour else 0.0)
        resid = (delta - model) * np.sqrt(weight)
    chi2 = _reduced_chi2(resid[use], int(use.sum()), n_frames + int(fit_colour))
    out = []
    for k, stars in enumerate(frames):
        n = int((use & (frame_of == k)).sum())
        if n < settings.min_stars:
            out.append(ZeroPoint(band=band, n_zp=n, reason=(
                f"too few catalog stars after clipping ({n} < {settings.min_stars})")))
            continue
        var = (1.0 / wsum[k] + mean_colour[k] ** 2 * slope_var) * max(chi2, 1.0)
        out.append(ZeroPoint(zp=float(zp[k]), zp_err=float(np.sqrt(var + stars.correction_error
                                                                       ** 2)),
                             n_zp=n, band=band, colour_term=float(slope)))
    return out


def _solve(delta, weight, colour, frame_of, use, n_frames, fit_colour):
    """Weighted least squares of per-frame offsets and (optionally) one common slope."""
    w = np.where(use, weight, 0.0)
    wsum = np.bincount(frame_of, w, n_frames)
    safe = np.where(wsum > 0, wsum, 1.0)
    mean_delta = np.bincount(frame_of, w * np.nan_to_num(delta), n_frames) / safe
    c = np.nan_to_num(colour)
    mean_colour = np.bincount(frame_of, w * c, n_frames) / safe if fit_colour else \
        np.zeros(n_frames)
    slope, slope_var = 0.0, 0.0
    if fit_colour:
        dc = c - mean_colour[frame_of]
        sxx = float(np.sum(w * dc * dc))
        if sxx > 0:
            slope = float(np.sum(w * dc * (np.nan_to_num(delta) - mean_delta[frame_of])) / sxx)
            slope_var = 1.0 / sxx
    zp = np.where(wsum > 0, mean_delta - slope * mean_colour, np.nan)
    return zp, slope, slope_var, mean_colour, safe


def _robust_scale(values: np.ndarray) -> float:
    if values.size < 3:
        return 1.0
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def _reduced_chi2(resid: np.ndarray, n: int, n_par: int) -> float:
    return float(np.sum(resid**2) / (n - n_par)) if n > n_par else 1.0
