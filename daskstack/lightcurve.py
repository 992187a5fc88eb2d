"""Light curves from the store: forced aperture photometry at fixed sky positions on every
registered frame, calibrated with each frame's zero point and made differential against
comparison stars chosen automatically. Pure computation on arrays and tables; the store
is read by `daskstack._pipeline` (a small box around each star, a block of frames per
task), which calls `measure_block` on what it read and `light_curves` on the results.

Photometry (`daskstack.photometry.aperture_photometry`, the one implementation):

* aperture radius `APERTURE_FWHM` x the frame's FWHM, **per frame**: a radius that
  follows the seeing keeps the same fraction of every star's light in every frame (the
  PSF's shape changes little while its width changes a lot), so a fixed radius would
  turn seeing changes into flux changes for the calibrated light curve; the FWHM is the
  one the frame's solve measured (the manifest's ``fwhm_px``, converted to grid pixels),
  or, where none was measured (frames taken with their header WCS), measured here on
  the brightest candidate comparison stars (Gaussian fits to their cores);
* the sky is an annulus `SKY_FWHM` x FWHM, beyond the reach of the star's wings;
* an aperture correction per frame, the median over the comparison stars of the flux
  in `TOTAL_FWHM` x FWHM over the flux in the aperture, makes the flux a total flux,
  the flux the zero point is defined for (mag = zp - 2.5 log10(flux / exptime));
* errors from the store's variance plane; the resampling's correlation of neighbouring
  pixels is undone with ``kernel_power`` (the variance over the kernel power is the
  input noise: `daskstack.register`).

Differential photometry: per filter, each comparison star's flux per second is
normalised by its median over the frames; the ensemble of a frame is the
inverse-variance weighted mean of its comparisons' normalised fluxes (a comparison
missing from a frame then does not shift the ensemble), and the differential magnitude
is ``-2.5 log10(flux / exptime / ensemble)``: what the target's instrumental magnitude
would be at the filter's median transparency.

Comparison stars: from the run's catalog, isolated (no catalog star within
`ISOLATION_FWHM` x FWHM brighter than `ISOLATION_DMAG` magnitudes fainter), the
`N_CANDIDATES` brightest of the `N_NEAREST` such stars nearest the target (near: the
same store chunks, so few more chunks are read, and the same part of the optics); then
measured on every frame, those unsaturated and unmasked in at least
`MIN_CLEAN_FRACTION` of a filter's frames and not variable against the others kept,
at most `N_COMPARISON` of them, brightest first.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from astropy.table import Table

from ._stats import mad_sigma
from .errors import DaskstackError
from .photometry import PHOT_FLAG_EDGE, PHOT_FLAG_MASKED, PHOT_FLAG_NO_SKY, aperture_photometry

__all__ = [
    "DIFF_COLUMNS",
    "LC_COLUMNS",
    "LC_FLAG_NO_COMPARISON",
    "LC_FLAG_NO_DATA",
    "LC_FLAG_NO_ZP",
    "Box",
    "LightcurveError",
    "Star",
    "choose_candidates",
    "gaussian_fwhm",
    "light_curves",
    "measure_block",
    "parse_target",
    "reading_boxes",
    "star_box_half",
    "target_name",
]

# the columns of RUN/lightcurves/<name>.ecsv, in order; differential columns follow
LC_COLUMNS = ("mjd", "frame", "filter", "site", "flux", "flux_err", "mag", "mag_err", "zp",
              "zp_err", "airmass", "fwhm", "flags")
DIFF_COLUMNS = ("diff_mag", "diff_mag_err", "n_comp", "aper_corr")  # after LC_COLUMNS
PHOT_ARRAYS = ("flux", "flux_err", "total", "total_err")  # per frame and star, from measure_block

# flags: photometry's (1 masked or saturated pixel in the aperture, 2 aperture leaves the
# grid, 4 no local sky) and these
LC_FLAG_NO_ZP = 8  # no zero point, exposure time or aperture correction: flux given, mag NaN
LC_FLAG_NO_COMPARISON = 16  # no usable comparison star in this frame: no diff_mag
LC_FLAG_NO_DATA = 32  # the frame does not cover the target: no flux

APERTURE_FWHM = 1.5  # aperture radius / FWHM: near the best S/N for faint stars
TOTAL_FWHM = 3.0  # radius / FWHM of the "total" flux: 97.7% of a Moffat (beta 2.5) star
SKY_FWHM = (4.5, 7.0)  # sky annulus radii / FWHM
DEFAULT_FWHM_ARCSEC = 2.5  # for choosing isolated stars before any FWHM is known
ISOLATION_FWHM = 5.0  # a comparison has no comparable catalog star this close
ISOLATION_DMAG = 3.0  # neighbours fainter than this (mag) do not matter
N_NEAREST = 40
N_CANDIDATES = 15
N_COMPARISON = 6
N_FWHM_STARS = 7  # the brightest unsaturated candidates measure a frame's FWHM where none is known
FWHM_FIT_BOX = 4  # half-size (px) of the core fitted for the FWHM
MIN_CLEAN_FRACTION = 0.8
VARIABLE_CHI2 = 5.0  # a candidate whose reduced chi-square against the others exceeds
# this and 3 times the candidates' median is left out as variable
MAG_PER_LN = 2.5 / math.log(10.0)  # 1.0857: mag error per relative flux error
_BAD = PHOT_FLAG_MASKED | PHOT_FLAG_EDGE | PHOT_FLAG_NO_SKY


class LightcurveError(DaskstackError, ValueError):
    """Targets or a store that cannot give a light curve (said why)."""


@dataclass(frozen=True)
class Star:
    """A position measured on every frame: a target, or a comparison candidate."""

    ra: float
    dec: float
    x: float  # grid pixels, 0-based
    y: float
    mag: float = float("nan")  # catalog magnitude (candidates)


@dataclass(frozen=True)
class Box:
    """A region of the grid read for a block of frames: ``[y0:y1, x0:x1]`` and the
    stars (indices into the list of stars) measured in it."""

    y0: int
    y1: int
    x0: int
    x1: int
    stars: tuple[int, ...]


def parse_target(text: str) -> tuple[float, float]:
    """``"RA DEC"`` in degrees (``"80.88 -1.17"``) or sexagesimal (``"05:23:31.0
    -01:10:24"``, ``"5h23m31s -1d10m24s"``; RA in hours) -> (ra, dec) degrees."""
    from astropy import units as u
    from astropy.coordinates import SkyCoord

    parts = str(text).replace(",", " ").split()
    try:
        if len(parts) == 2 and all(re.fullmatch(r"[-+]?\d+(\.\d*)?([eE][-+]?\d+)?", p)
                                   for p in parts):
            coord = SkyCoord(float(parts[0]), float(parts[1]), unit="deg")
        else:
            coord = SkyCoord(str(text), unit=(u.hourangle, u.deg))
    except (ValueError, TypeError) as err:
        raise LightcurveError(f"--target {text!r}: not 'RA DEC' in degrees or "
                              f"sexagesimal (e.g. '80.879 -1.173' or '05:23:31 -01:10:24'): "
                              f"{err}") from None
    return float(coord.ra.deg), float(coord.dec.deg)


def target_name(ra: float, dec: float, name: str = "") -> str:
    """A file-safe name: ``name`` with anything but letters, digits, ``._+-`` made
    ``_``, or from the coordinates (``080.87958-01.17333``)."""
    if name:
        safe = re.sub(r"[^A-Za-z0-9._+-]", "_", name.strip()).lstrip(".")
        if safe:
            return safe
    return f"{ra:09.5f}{dec:+09.5f}"


def star_box_half(fwhm_px: float) -> int:
    """Half-size (px) of the box a star is measured in: its sky annulus and a margin."""
    return int(math.ceil(SKY_FWHM[1] * fwhm_px)) + 2


def choose_candidates(catalog: Table, x, y, targets: list[Star], shape, *,
                      isolation_px: float, margin_px: float) -> list[list[int]]:
    """Comparison candidates for each target: rows of ``catalog`` (with ``mag``) at grid
    positions ``x, y``; the `N_CANDIDATES` brightest of the `N_NEAREST` isolated stars
    nearest the target, inside the grid by ``margin_px``, none within ``isolation_px``
    of any target."""
    from scipy.spatial import cKDTree

    x, y = np.asarray(x, float), np.asarray(y, float)
    mag = np.asarray(catalog["mag"], float)
    ny, nx = shape
    inside = ((x >= margin_px) & (x < nx - 1 - margin_px) & (y >= margin_px)
              & (y < ny - 1 - margin_px) & np.isfinite(mag))
    finite = np.isfinite(x) & np.isfinite(y)
    tree = cKDTree(np.column_stack([x[finite], y[finite]]))
    index = np.flatnonzero(finite)
    isolated = np.zeros(len(x), bool)
    for i in np.flatnonzero(inside):
        near = index[tree.query_ball_point([x[i], y[i]], isolation_px)]
        near = near[near != i]
        fainter = np.where(np.isfinite(mag[near]), mag[near], -np.inf) > mag[i] + ISOLATION_DMAG
        isolated[i] = bool(np.all(fainter))
    for star in targets:
        isolated &= np.hypot(x - star.x, y - star.y) > isolation_px
    eligible = np.flatnonzero(isolated)
    out = []
    for star in targets:
        nearest = eligible[np.argsort(np.hypot(x[eligible] - star.x,
                                               y[eligible] - star.y))[:N_NEAREST]]
        out.append([int(i) for i in nearest[np.argsort(mag[nearest], kind="stable")]
                    [:N_CANDIDATES]])
    return out


def reading_boxes(stars: list[Star], half: int, shape, chunk: tuple[int, int]) -> list[Box]:
    """Boxes to read: one per star (``2 half + 1`` a side, clipped to the grid), merged
    where a merged box touches no chunk its members did not (a chunk is decompressed
    once per read)."""
    ny, nx = shape

    def chunks(b):
        return {(cy, cx) for cy in range(b[0] // chunk[0], (b[1] - 1) // chunk[0] + 1)
                for cx in range(b[2] // chunk[1], (b[3] - 1) // chunk[1] + 1)}

    boxes = []
    for i, s in enumerate(stars):
        cx, cy = int(round(s.x)), int(round(s.y))
        box = (max(cy - half, 0), min(cy + half + 1, ny), max(cx - half, 0),
               min(cx + half + 1, nx))
        if box[0] >= box[1] or box[2] >= box[3]:
            continue  # off the grid: measured nowhere (flagged no data)
        boxes.append((box, (i,)))
    merged = True
    while merged:
        merged = False
        for a in range(len(boxes)):
            for b in range(a + 1, len(boxes)):
                (ba, sa), (bb, sb) = boxes[a], boxes[b]
                union = (min(ba[0], bb[0]), max(ba[1], bb[1]), min(ba[2], bb[2]),
                         max(ba[3], bb[3]))
                if chunks(union) == chunks(ba) | chunks(bb) and chunks(ba) & chunks(bb):
                    boxes[a] = (union, sa + sb)
                    del boxes[b]
                    merged = True
                    break
            if merged:
                break
    return [Box(*box, stars=members) for box, members in boxes]


def measure_block(cubes, boxes: list[Box], stars: list[Star], fwhm, *, scale=1.0,
                  resampled: bool = True, max_fwhm: float = np.inf) -> dict:
    """Photometry of every star on a block of frames.

    ``cubes``: per box, ``(data, variance, kernel_power)`` arrays ``(n_frames, ny, nx)``
    as read from the store; ``fwhm``: per frame, grid pixels (NaN: measured here on the
    stars of the boxes, the brightest half of those measured; at most ``max_fwhm``, what
    the boxes hold); ``scale``: per frame (or one for all), frame pixel size over grid
    pixel size; ``resampled``: the store was made by interpolation (its
    pixel values are per frame pixel, and neighbouring pixels correlated), not by
    flux-conserving reprojection.

    Returns ``flux``, ``flux_err``, ``total`` (flux in `TOTAL_FWHM` x FWHM; NaN where
    that aperture holds a masked pixel), ``total_err``, ``flags``
    (``(n_frames, n_stars)``; in frame pixel units) and ``fwhm`` (``(n_frames,)``, grid px).
    """
    n_frames = len(fwhm)
    n_stars = len(stars)
    out = {k: np.full((n_frames, n_stars), np.nan) for k in PHOT_ARRAYS}
    out["flags"] = np.full((n_frames, n_stars), LC_FLAG_NO_DATA, np.int32)
    fwhm = np.array(fwhm, float)
    # the flux of a resampled star is spread over scale**2 grid pixels per frame pixel
    # (and the variance of its sum is scale**2 times the input noise summed over them)
    areas = np.broadcast_to(np.asarray(scale, float) ** 2 if resampled else 1.0, n_frames)
    for k in range(n_frames):
        area = float(areas[k]) if np.isfinite(areas[k]) else 1.0
        planes = [(box, *(np.asarray(c[k], float) for c in cube)) for box, cube in
                  zip(boxes, cubes, strict=True)]
        if not np.isfinite(fwhm[k]):
            fwhm[k] = _measured_fwhm(planes, stars)
        if not np.isfinite(fwhm[k]):
            continue
        fwhm[k] = min(fwhm[k], max_fwhm)
        for box, data, variance, power in planes:
            if not np.isfinite(data).any():
                continue
            if resampled:  # the input noise: see daskstack.register
                with np.errstate(invalid="ignore", divide="ignore"):
                    variance = variance / power
            idx = np.array(box.stars)
            sx = np.array([stars[i].x - box.x0 for i in idx])
            sy = np.array([stars[i].y - box.y0 for i in idx])
            annulus = (SKY_FWHM[0] * fwhm[k], SKY_FWHM[1] * fwhm[k])
            # the aperture and the "total" one share the sky of the annulus
            phot = aperture_photometry(data, sx, sy, [APERTURE_FWHM * fwhm[k],
                                                      TOTAL_FWHM * fwhm[k]],
                                       variance=variance, annulus=annulus, correlation=area)
            flux, flux_err, flags = (np.asarray(phot[c]) for c in ("flux", "flux_err", "flags"))
            # boxes are cut only where the grid ends: the box's edge flag is the grid's
            out["flux"][k, idx] = flux[:, 0] / area
            out["flux_err"][k, idx] = flux_err[:, 0] / area
            masked = (flags[:, 1] & PHOT_FLAG_MASKED) != 0
            out["total"][k, idx] = np.where(masked, np.nan, flux[:, 1] / area)
            out["total_err"][k, idx] = flux_err[:, 1] / area
            # no pixel at all in the aperture: the frame does not cover the star
            empty = ~(np.asarray(phot["area"])[:, 0] > 0) | ~np.isfinite(out["flux"][k, idx])
            out["flags"][k, idx] = np.where(empty, LC_FLAG_NO_DATA | flags[:, 0], flags[:, 0])
    out["fwhm"] = fwhm
    return out


def _measured_fwhm(planes, stars) -> float:
    """A frame's FWHM (grid px) from its `N_FWHM_STARS` brightest unsaturated catalog
    stars in the boxes: the median of circular Gaussian fits to their cores (`gaussian_fwhm`; a
    moment-based width grows with the aperture in a Moffat star's wings)."""
    order = sorted((i for i in range(len(stars)) if np.isfinite(stars[i].mag)),
                   key=lambda i: stars[i].mag)
    box_of = {i: k for k, (box, *_) in enumerate(planes) for i in box.stars}
    skies = [float(np.nanmedian(data)) if np.isfinite(data).any() else np.nan
             for _, data, _, _ in planes]
    values = []
    for i in order:  # brightest first; saturated ones (NaN cores) give NaN
        box, data, _, _ = planes[box_of[i]]
        value = gaussian_fwhm(data - skies[box_of[i]], stars[i].x - box.x0, stars[i].y - box.y0)
        if np.isfinite(value):
            values.append(value)
            if len(values) == N_FWHM_STARS:
                break
    return float(np.median(values)) if values else float("nan")


def gaussian_fwhm(image, x: float, y: float, half: int = FWHM_FIT_BOX) -> float:
    """FWHM (px) of a circular Gaussian plus a constant fitted to the ``2 half + 1``
    pixels square around (x, y) of a sky-subtracted ``image``; NaN where the square
    leaves the image, holds a NaN, or the fit fails."""
    from scipy.optimize import least_squares

    cx, cy = int(round(x)), int(round(y))
    ny, nx = image.shape
    if not (half <= cx < nx - half and half <= cy < ny - half):
        return float("nan")
    stamp = np.asarray(image[cy - half:cy + half + 1, cx - half:cx + half + 1], float)
    if not np.isfinite(stamp).all() or not stamp.max() > 0:
        return float("nan")
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    xx, yy, values = xx.ravel().astype(float), yy.ravel().astype(float), stamp.ravel()

    def residual(p):
        amp, dx, dy, sigma, level = p
        return amp * np.exp(-((xx - dx) ** 2 + (yy - dy) ** 2) / (2 * sigma**2)) + level - values

    def jacobian(p):
        amp, dx, dy, sigma, _ = p
        r2 = (xx - dx) ** 2 + (yy - dy) ** 2
        g = np.exp(-r2 / (2 * sigma**2))
        return np.column_stack([g, amp * g * (xx - dx) / sigma**2, amp * g * (yy - dy) / sigma**2,
                                amp * g * r2 / sigma**3, np.ones_like(g)])

    start = (stamp.max(), x - cx, y - cy, 1.2, 0.0)
    fit = least_squares(residual, start, jac=jacobian, method="lm")
    sigma = abs(fit.x[3])
    return float(2.3548 * sigma) if fit.success and 0.3 < sigma < 2.0 * half else float("nan")


# --------------------------------------------------------------------------------------
# Differential photometry and the light-curve table (client side, per target)
# --------------------------------------------------------------------------------------
def _ensemble(rate, rate_err, clean):
    """Per frame, the inverse-variance weighted mean of the normalised comparison rates
    (each column divided by its median over its clean frames), its error and count."""
    rate = np.where(clean, rate, np.nan)
    with np.errstate(all="ignore"):
        ref = np.nanmedian(rate, axis=0)
        norm = rate / ref
        weight = np.where(clean & np.isfinite(norm), (ref / rate_err) ** 2, 0.0)
        total = weight.sum(axis=1)
        mean = np.where(total > 0, np.nansum(np.where(weight > 0, norm, 0.0) * weight,
                                             axis=1) / total, np.nan)
        err = np.where(total > 0, 1.0 / np.sqrt(total), np.nan)
    return mean, err, (weight > 0).sum(axis=1)


def _relative(rate, rate_err, mean, mean_err):
    """-2.5 log10(rate / ensemble) and its error (NaN where either is missing)."""
    with np.errstate(all="ignore"):
        ok = (rate > 0) & (mean > 0)
        mag = np.where(ok, -2.5 * np.log10(rate / mean), np.nan)
        err = np.where(ok, MAG_PER_LN * np.hypot(rate_err / rate, mean_err / mean), np.nan)
    return mag, err


def reduced_chi2(mag, err) -> float:
    """Reduced chi-square of magnitudes about their weighted mean (NaN under 2 points)."""
    ok = np.isfinite(mag) & np.isfinite(err) & (err > 0)
    if ok.sum() < 2:
        return float("nan")
    w = 1.0 / err[ok] ** 2
    mean = np.sum(w * mag[ok]) / np.sum(w)
    return float(np.sum(w * (mag[ok] - mean) ** 2) / (ok.sum() - 1))


def select_comparisons(rate, rate_err, clean, mag) -> tuple[np.ndarray, dict]:
    """Indices (columns) of the comparison stars of one filter, and each candidate's
    verdict ``{column: why left out}``: unsaturated and unmasked in at least
    `MIN_CLEAN_FRACTION` of the frames, then the most variable against the others left
    out while its reduced chi-square exceeds `VARIABLE_CHI2` and 3 times the median,
    then the `N_COMPARISON` brightest."""
    n = rate.shape[1]
    why = {}
    usable = []
    for j in range(n):
        if clean[:, j].mean() < MIN_CLEAN_FRACTION or not clean[:, j].any():
            why[j] = "saturated, masked or off the frames"
        else:
            usable.append(j)
    while len(usable) > 2:
        chi2 = np.array([_leave_one_out_chi2(rate, rate_err, clean, usable, j)
                         for j in usable])
        worst = int(np.nanargmax(chi2)) if np.isfinite(chi2).any() else None
        if worst is None or not (chi2[worst] > VARIABLE_CHI2
                                 and chi2[worst] > 3 * np.nanmedian(chi2)):
            break
        why[usable[worst]] = f"variable (reduced chi-square {chi2[worst]:.1f})"
        del usable[worst]
    order = sorted(usable, key=lambda j: (-np.nanmedian(np.where(clean[:, j], rate[:, j],
                                                                  np.nan)), mag[j]))
    for j in order[N_COMPARISON:]:
        why[j] = "fainter than the comparisons kept"
    return np.array(order[:N_COMPARISON], int), why


def _leave_one_out_chi2(rate, rate_err, clean, members, j) -> float:
    others = [m for m in members if m != j]
    mean, err, _ = _ensemble(rate[:, others], rate_err[:, others], clean[:, others])
    mag, mag_err = _relative(np.where(clean[:, j], rate[:, j], np.nan), rate_err[:, j],
                             mean, err)
    return reduced_chi2(mag, mag_err)


def light_curves(frames: Table, phot: dict, n_targets: int, candidates: list[list[int]],
                 candidate_stars: list[Star]) -> list[Table]:
    """One table per target, one row per frame: the `LC_COLUMNS`, then ``diff_mag``,
    ``diff_mag_err``, ``n_comp`` and ``aper_corr``.

    ``frames``: one row per frame with ``mjd, frame, filter, site, exptime, zp, zp_err,
    airmass``; ``phot``: `measure_block`'s arrays for those frames, the targets' columns
    first, then the candidates'; ``candidates``: per target, its candidates' positions
    in ``candidate_stars`` (column ``n_targets + k`` of ``phot``). Each table's meta
    says which comparison stars were used per filter (with their scatter and reduced
    chi-square against the others) and why the other candidates were not.
    """
    filters = np.asarray(frames["filter"]).astype(str)
    exptime = np.asarray(frames["exptime"], float)
    with np.errstate(all="ignore"):
        per_second = 1.0 / np.where(exptime > 0, exptime, np.nan)
    out = []
    for t in range(n_targets):
        columns = [n_targets + k for k in candidates[t]]
        flux_all = phot["flux"][:, [t, *columns]]
        err_all = phot["flux_err"][:, [t, *columns]]
        flags_all = phot["flags"][:, [t, *columns]]
        total_all = phot["total"][:, [t, *columns]]
        total_err_all = phot["total_err"][:, [t, *columns]]
        n = len(frames)
        diff_mag = np.full(n, np.nan)
        diff_err = np.full(n, np.nan)
        n_comp = np.zeros(n, int)
        aper_corr = np.full(n, np.nan)
        aper_corr_err = np.full(n, np.nan)
        comparisons = {}
        for filter_name in sorted(set(filters)):
            rows = np.flatnonzero(filters == filter_name)
            rate = flux_all[rows, 1:] * per_second[rows, None]
            rate_err = err_all[rows, 1:] * per_second[rows, None]
            clean = ((flags_all[rows, 1:] & (_BAD | LC_FLAG_NO_DATA)) == 0) & (rate > 0) & \
                np.isfinite(rate_err)
            mags = np.array([candidate_stars[k].mag for k in candidates[t]])
            chosen, why = select_comparisons(rate, rate_err, clean, mags)
            mean, mean_err, used = _ensemble(rate[:, chosen], rate_err[:, chosen],
                                             clean[:, chosen])
            target_rate = flux_all[rows, 0] * per_second[rows]
            diff_mag[rows], diff_err[rows] = _relative(target_rate,
                                                       err_all[rows, 0] * per_second[rows],
                                                       mean, mean_err)
            n_comp[rows] = used
            corr, corr_err = _aperture_corrections(
                *(a[rows, 1:][:, chosen] for a in (flux_all, err_all, total_all, total_err_all)),
                clean[:, chosen])
            aper_corr[rows], aper_corr_err[rows] = corr, corr_err
            stats = []
            for j in chosen:
                star = candidate_stars[candidates[t][j]]
                if len(chosen) > 1:
                    others = [c for c in chosen if c != j]
                    m, e, _ = _ensemble(rate[:, others], rate_err[:, others], clean[:, others])
                    cmag, cerr = _relative(np.where(clean[:, j], rate[:, j], np.nan),
                                           rate_err[:, j], m, e)
                    ok = np.isfinite(cmag)
                    scatter = float(np.std(cmag[ok])) if ok.sum() > 1 else float("nan")
                    chi2 = reduced_chi2(cmag, cerr)
                else:
                    scatter = chi2 = float("nan")
                stats.append({"ra": star.ra, "dec": star.dec, "x": star.x, "y": star.y,
                              "catalog_mag": star.mag, "rms_mag": scatter,
                              "reduced_chi2": chi2})
            comparisons[filter_name] = {
                "used": stats,
                "left_out": [{"ra": candidate_stars[candidates[t][j]].ra,
                              "dec": candidate_stars[candidates[t][j]].dec, "why": w}
                             for j, w in sorted(why.items())]}
        out.append(_table(frames, flux_all[:, 0], err_all[:, 0], flags_all[:, 0],
                          phot["fwhm"], aper_corr, aper_corr_err, diff_mag, diff_err, n_comp,
                          comparisons))
    return out


def _aperture_corrections(flux, flux_err, total, total_err, clean):
    """Per frame, total / aperture flux and its error: each comparison's ratio over its
    median across the frames (the ratio differs from star to star by the faint
    neighbours the larger aperture takes in), the median of those over the comparisons
    (one comparison whose neighbour's light comes and goes with the seeing must not
    drag the others), times the median of the comparisons' medians; its error the
    larger of the scatter's (1.25 MAD / sqrt(n)) and the formal one. Frames with no
    comparison get the filter's median (error: its scatter)."""
    with np.errstate(all="ignore"):
        ratio = np.where(clean & np.isfinite(total) & (flux > 0), total / flux, np.nan)
        # the total aperture holds the aperture: its error is what the ring adds
        ring_err = np.sqrt(np.maximum(total_err**2 - flux_err**2, 0.0))
        sigma = ratio * np.hypot(ring_err / np.abs(total), flux_err / flux)
        per_star = np.nanmedian(ratio, axis=0)
        level = np.nanmedian(per_star)
        norm, norm_err = ratio / per_star, sigma / per_star
    corr = np.full(len(ratio), np.nan)
    err = np.full(len(ratio), np.nan)
    for i, (values, errors) in enumerate(zip(norm, norm_err, strict=True)):
        good = np.isfinite(values) & (errors > 0)
        if not good.any():
            continue
        formal = 1.0 / math.sqrt(np.sum(1.0 / errors[good] ** 2))
        scatter = (1.2533 * mad_sigma(values[good]) / math.sqrt(good.sum())
                   if good.sum() > 2 else 0.0)
        corr[i] = np.median(values[good]) * level
        err[i] = max(formal, scatter) * level
    if np.isfinite(corr).any():
        missing = ~np.isfinite(corr)
        corr[missing] = np.nanmedian(corr)
        err[missing] = mad_sigma(corr[~missing]) if (~missing).sum() > 2 else 0.0
    return corr, err


def _table(frames, flux, flux_err, flags, fwhm, aper_corr, aper_corr_err, diff_mag, diff_err,
           n_comp, comparisons) -> Table:
    flags = np.array(flags, np.int32)
    exptime = np.asarray(frames["exptime"], float)
    zp = np.asarray(frames["zp"], float)
    zp_err = np.asarray(frames["zp_err"], float)
    # no aperture correction (no comparison star in any frame): the aperture's flux,
    # and no magnitude (the zero point is for total fluxes)
    corrected = np.isfinite(aper_corr)
    with np.errstate(all="ignore"):
        total = np.where(corrected, flux * aper_corr, flux)
        total_err = np.where(corrected, np.hypot(flux_err * aper_corr, flux * aper_corr_err),
                             flux_err)
        calibrated = np.isfinite(zp) & (exptime > 0) & corrected
        ok = calibrated & (total > 0)
        mag = np.where(ok, zp - 2.5 * np.log10(total / exptime), np.nan)
        mag_err = np.where(ok, np.hypot(MAG_PER_LN * total_err / total,
                                        np.where(np.isfinite(zp_err), zp_err, 0.0)), np.nan)
    flags[~calibrated] |= LC_FLAG_NO_ZP
    flags[~np.isfinite(diff_mag) & ((flags & LC_FLAG_NO_DATA) == 0)] |= LC_FLAG_NO_COMPARISON
    table = Table()
    table["mjd"] = np.asarray(frames["mjd"], float)
    for key in ("frame", "filter", "site"):
        table[key] = np.asarray(frames[key]).astype(str)
    table["flux"], table["flux_err"] = total, total_err
    table["mag"], table["mag_err"] = mag, mag_err
    table["zp"], table["zp_err"] = zp, zp_err
    table["airmass"] = np.asarray(frames["airmass"], float)
    table["fwhm"] = np.asarray(fwhm, float)
    table["flags"] = flags
    table["diff_mag"], table["diff_mag_err"] = diff_mag, diff_err
    table["n_comp"] = np.asarray(n_comp, int)
    table["aper_corr"] = aper_corr
    for key, unit in (("mjd", "d"), ("mag", "mag"), ("mag_err", "mag"), ("zp", "mag"),
                      ("zp_err", "mag"), ("fwhm", "pix"), ("diff_mag", "mag"),
                      ("diff_mag_err", "mag")):
        table[key].unit = unit
    table.meta["comparisons"] = comparisons
    return table
