"""Pictures and a static HTML report of a run: look at hundreds of frames where it matters.

What the learn.astropy tutorial checks by eye for two frames, drawn where it is needed:

* per frame, for failed and flagged frames (others on demand) (``report/frames/``): the
  image (asinh stretch between robust percentiles) with the detected sources and the
  catalog stars placed by the header (start) WCS and by the solved WCS
  (``<name>_sources.png``); the astrometric residuals of the matched stars as vectors
  across the frame and as a histogram with the RMS (``<name>_residuals.png``); the
  numbers drawn (``<name>.json``);
* per frame, every frame: a thumbnail (a small JPEG, binned from the store or from the
  frame read once), inlined in the page;
* per run (``report/``): each coadd and its weight map, a two-colour overlay of the
  reference frame and an aligned frame from the store, the colour composite when three
  filters are present, and the QA of every frame night by night with each group's
  median and MAD bands (``summary.png``), each frame's zero point against time and
  airmass, per filter and site (``zero_points.png``, where frames have zero points);
  ``suggested-exclude.txt``, the frames flagged
  by `daskstack.qa` in the format ``--exclude-file`` reads;
* per light curve (``lightcurves/<name>.png``, drawn by ``daskstack lightcurve``; the page
  shows them when ``RUN/lightcurves`` exists): the differential and calibrated magnitudes
  against time, per filter;
* ``report/index.html``: one static page (inline CSS and a small inline script, relative
  links only, no network) with the run's parameters, the coadd previews, the flagged
  frames with why, and a table of every frame that sorts and filters, failed and flagged
  frames first. Its size grows by a thumbnail and a table row per frame.

Everything here is a plain function of paths and small records. Figures are made with
explicit ``Figure`` + ``FigureCanvasAgg`` objects, never pyplot's global state, so they
are safe on Dask workers (threads or processes); `daskstack._pipeline.make_report` runs
them as tasks.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import logging
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import quote

import numpy as np
from astropy.io import fits
from astropy.table import Table

from . import qa
from ._fields import separation_deg
from ._io import as_path, atomic_path, atomic_write_text
from ._rundir import EXCLUDED, read_manifest, run_settings
from ._stats import clip_residuals, mad_sigma
from .match import nn_match

__all__ = [
    "FRAMES_DIR",
    "FramePlots",
    "REPORT_DIR",
    "coadd_preview",
    "colour_composite",
    "count_markers",
    "display_image",
    "find_outliers",
    "frame_figures",
    "frame_task",
    "lightcurve_figure",
    "load_frame_plots",
    "run_figure_jobs",
    "run_safely",
    "run_settings",
    "summary_plots",
    "zero_point_plots",
    "two_colour_overlay",
    "write_report",
]

log = logging.getLogger(__name__)

REPORT_DIR = "report"
FRAMES_DIR = "frames"
MAX_DISPLAY = 1024  # pictures are binned to at most this many pixels a side
DPI = 80

# approximate central wavelengths (nm): colour composites go blue -> green -> red
_WAVELENGTH = {
    "u": 354, "up": 354, "U": 365, "B": 445, "g": 475, "gp": 475, "OIII": 500,
    "V": 551, "w": 600, "r": 622, "rp": 622, "H-Alpha": 656, "Ha": 656, "R": 658,
    "SII": 672, "i": 763, "ip": 763, "I": 806, "z": 905, "zs": 905, "Y": 1000,
}

OUTLIER_SIGMA = qa.OUTLIER_SIGMA
THUMBNAIL = 96  # px: the longest side of a frame's thumbnail in the table
SUGGESTED_EXCLUDE = "suggested-exclude.txt"  # flagged frames, as --exclude-file reads it


# --------------------------------------------------------------------------------------
# Small helpers: figures, stretch, binning
# --------------------------------------------------------------------------------------
def _figure(width_in: float, height_in: float):
    """A Figure with its own Agg canvas (no pyplot: safe in worker threads)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.1)


def _finite_sample(data: np.ndarray, n: int = 200_000) -> np.ndarray:
    values = np.asarray(data, float).ravel()
    if values.size > n:
        values = values[:: values.size // n]
    return values[np.isfinite(values)]


def stretch_limits(data, low: float = 0.5, high: float = 99.7) -> tuple[float, float]:
    """Robust display limits: percentiles of the finite pixels (a flat image gives a unit
    range so that the stretch stays defined)."""
    values = _finite_sample(data)
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(values, [low, high])
    if not hi > lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def scaled(data, low: float = 0.5, high: float = 99.7, a: float = 0.1) -> np.ndarray:
    """Pixels mapped to 0..1 by an asinh stretch between robust percentiles; NaN -> 0."""
    from astropy.visualization import AsinhStretch

    lo, hi = stretch_limits(data, low, high)
    x = np.clip((np.asarray(data, float) - lo) / (hi - lo), 0.0, 1.0)
    out = AsinhStretch(a=a)(x, clip=True)
    return np.nan_to_num(out, nan=0.0)


def _binned_rows(read_rows, shape, max_size: int = MAX_DISPLAY):
    """Block-mean binning of a 2-D array read row block by row block (FITS memmap, zarr):
    the whole image is never in memory at full resolution. Returns (binned, factor)."""
    ny, nx = shape
    factor = max(1, math.ceil(max(ny, nx) / max_size))
    if factor == 1:
        return np.asarray(read_rows(0, ny), dtype=np.float32), 1
    by, bx = ny // factor, nx // factor
    out = np.full((by, bx), np.nan, dtype=np.float32)
    step = max(1, (8 * 2**20) // (4 * nx * factor))  # output rows per read (~8 MiB)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN blocks
        for j0 in range(0, by, step):
            j1 = min(by, j0 + step)
            block = np.asarray(read_rows(j0 * factor, j1 * factor), dtype=np.float32)
            block = block[:, : bx * factor].reshape(j1 - j0, factor, bx, factor)
            out[j0:j1] = np.nanmean(block, axis=(1, 3))
    return out, factor


def display_image(data: np.ndarray, max_size: int = MAX_DISPLAY):
    """``(binned, factor)``: an in-memory image binned for display."""
    return _binned_rows(lambda y0, y1: data[y0:y1], data.shape, max_size)


def _extent(shape):
    ny, nx = shape
    return (-0.5, nx - 0.5, -0.5, ny - 0.5)


def _show(ax, image, shape, cmap="gray"):
    """Draw a (binned) image on full-resolution pixel coordinates (0-based, origin lower)."""
    ax.imshow(scaled(image), origin="lower", cmap=cmap, extent=_extent(shape),
              interpolation="nearest", vmin=0, vmax=1)
    ax.set_xlim(-0.5, shape[1] - 0.5)
    ax.set_ylim(-0.5, shape[0] - 0.5)


def count_markers(fig) -> dict[str, int]:
    """Markers drawn, read back from the figure: ``{gid: points}`` for every scatter
    and quiver given a ``gid`` (tests count what was really plotted)."""
    from matplotlib.quiver import Quiver

    counts: dict[str, int] = {}
    for ax in fig.axes:
        for artist in ax.collections:
            gid = artist.get_gid()
            if not gid:
                continue
            n = int(artist.N) if isinstance(artist, Quiver) else len(artist.get_offsets())
            counts[gid] = counts.get(gid, 0) + n
    return counts


_finite_or_none = qa.finite_or_none


# --------------------------------------------------------------------------------------
# Per frame
# --------------------------------------------------------------------------------------
@dataclass
class FramePlots:
    """What the per-frame pictures show (small, picklable; saved as ``<name>.json``).

    ``markers`` are read back from the figures (`count_markers`): ``detected``,
    ``catalog_before``, ``catalog_after``, ``matched`` (detections matched to the
    catalog through the solved WCS) and ``residuals`` (vectors drawn).
    ``offset_arcsec`` is how far the header WCS put the frame centre from the solved one.
    """

    name: str
    status: str = "ok"
    reason: str = ""
    files: dict[str, str] = field(default_factory=dict)  # kind -> file name in frames/
    n_detections: int = 0
    n_catalog_before: int = 0
    n_catalog_after: int = 0
    n_matches: int = 0
    rms_arcsec: float | None = None
    median_residual_arcsec: float | None = None
    offset_arcsec: float | None = None
    markers: dict[str, int] = field(default_factory=dict)
    error: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def load_wcs_file(path):
    """The WCS in an ``<name>.wcs`` file (FITS header), or None if absent/unusable."""
    from astropy.wcs import WCS

    from .frames import quiet_astropy

    if not path or not as_path(path).exists():
        return None
    with quiet_astropy():
        try:
            with as_path(path).open("rb") as handle:  # a file or an object
                wcs = WCS(fits.getheader(handle), relax=True)
        except (OSError, ValueError):
            return None
    return wcs if wcs.has_celestial else None


def _catalog_pixels(wcs, ra, dec, shape, margin: float = 0.0):
    """Catalog stars inside the frame under ``wcs``: (x, y, index)."""
    from .frames import quiet_astropy

    ny, nx = shape
    with quiet_astropy(), np.errstate(all="ignore"):
        try:
            x, y = wcs.all_world2pix(ra, dec, 0, quiet=True)
        except Exception:  # noqa: BLE001 - a diverging SIP inverse: fall back to no SIP
            x, y = wcs.wcs_world2pix(ra, dec, 0)
    x, y = np.asarray(x, float), np.asarray(y, float)
    inside = (np.isfinite(x) & np.isfinite(y) & (x > -0.5 - margin) & (x < nx - 0.5 + margin)
              & (y > -0.5 - margin) & (y < ny - 0.5 + margin))
    idx = np.nonzero(inside)[0]
    return x[idx], y[idx], idx


def _near_field(catalog, wcs, shape):
    """Catalog rows within 1.5 half-diagonals of the frame centre (TAN is only valid on
    the near hemisphere, and a projection of far stars can land inside the frame)."""
    ny, nx = shape
    ra = np.asarray(catalog["ra"], float)
    dec = np.asarray(catalog["dec"], float)
    ra0, dec0 = (float(v) for v in wcs.all_pix2world([[(nx - 1) / 2, (ny - 1) / 2]], 0)[0])
    scale = float(np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix))) * 3600.0)
    keep = separation_deg(ra, dec, ra0, dec0) < 1.5 * 0.5 * math.hypot(nx, ny) * scale / 3600.0 + 1.0 / 60
    return ra[keep], dec[keep], scale


def match_catalog(det_xy, cat_x, cat_y, radius_px: float, clip_sigma: float,
                  scale: float):
    """Detections matched one-to-one to catalog pixels within ``radius_px``, then clipped
    as the solver clips (``clip_sigma`` robust sigmas, floor 0.1 arcsec).

    Returns (detection index, catalog index, dx, dy) with (dx, dy) = catalog - detection
    in pixels.
    """
    from scipy.spatial import cKDTree

    empty = (np.zeros(0, int), np.zeros(0, int), np.zeros(0), np.zeros(0))
    if len(det_xy) == 0 or len(cat_x) == 0:
        return empty
    si, rj, dd = nn_match(det_xy, cKDTree(np.column_stack([cat_x, cat_y])), radius_px)
    if len(si) >= 3:
        keep = clip_residuals(dd, clip_sigma, 0.1)  # px, as the solver (0.1 px * scale arcsec)
        si, rj = si[keep], rj[keep]
    dx = np.asarray(cat_x)[rj] - det_xy[si, 0]
    dy = np.asarray(cat_y)[rj] - det_xy[si, 1]
    return si, rj, dx, dy


def frame_figures(frame_path, start_wcs, solved_wcs, catalog, settings, out_dir, *,
                  status: str = "ok", reason: str = "", name: str | None = None,
                  max_size: int = MAX_DISPLAY) -> FramePlots:
    """Draw one frame's pictures into ``out_dir``; return the numbers drawn.

    Parameters
    ----------
    frame_path : path
        The input frame (read again here: pixels never travel through the graph).
    start_wcs : astropy.wcs.WCS or None
        The header (start) WCS; None: taken from the frame's header if it has one.
    solved_wcs : astropy.wcs.WCS, path of a ``.wcs`` file, or None (frame not solved)
    catalog : astropy.table.Table or None
        The reference catalog (normalised: ra, dec, mag, proper motions).
    settings : daskstack.config.Settings
        Detection settings (sources are detected again, as the solver did) and the
        solver's match radius and clipping.
    status, reason
        The frame's manifest status and failure reason, written on the pictures.

    Files: ``<name>_sources.png`` (before / after panels), ``<name>_residuals.png``
    (vectors and histogram; solved frames only), ``<name>.json`` (this record).
    """
    from .catalogs import propagate_proper_motion
    from .detect import detect_sources
    from .frames import FrameError, frame_name, header_wcs, read_frame

    out_dir = as_path(out_dir)
    name = name or frame_name(frame_path)
    plots = FramePlots(name=name, status=status, reason=reason)
    if isinstance(solved_wcs, (str, Path)):
        solved_wcs = load_wcs_file(solved_wcs)
    try:
        frame = read_frame(frame_path)
    except FrameError as err:
        plots.error = f"cannot read the frame: {err.reason}"
        _save_json(plots, out_dir)
        return plots
    ny, nx = shape = frame.data.shape
    if start_wcs is None:
        try:
            start_wcs = header_wcs(frame.header, frame.path)
        except FrameError:
            start_wcs = None
    det = detect_sources(frame, settings.detect)
    det_xy = det.xy
    plots.n_detections = len(det)

    cat = catalog if catalog is not None and len(catalog) else None
    if cat is not None and settings.catalog.propagate_pm and frame.meta.epoch is not None \
            and "ref_epoch" in cat.colnames:
        cat = propagate_proper_motion(cat, frame.meta.epoch)
    before = after = None
    scale = None
    if cat is not None:
        for key, wcs in (("before", start_wcs), ("after", solved_wcs)):
            if wcs is None:
                continue
            ra, dec, scale_w = _near_field(cat, wcs, shape)
            x, y, _ = _catalog_pixels(wcs, ra, dec, shape)
            if key == "before":
                before = (x, y)
            else:
                after, scale = (x, y), scale_w
    if start_wcs is not None and solved_wcs is not None:
        from .frames import quiet_astropy

        with quiet_astropy():
            centre = [[(nx - 1) / 2, (ny - 1) / 2]]
            a = start_wcs.all_pix2world(centre, 0)[0]
            b = solved_wcs.all_pix2world(centre, 0)[0]
        plots.offset_arcsec = separation_deg(a[0], a[1], b[0], b[1]) * 3600

    # matches through the solved WCS, as the solver made them
    si = np.zeros(0, int)
    dx = dy = np.zeros(0)
    if after is not None and scale:
        fwhm = det.fwhm if np.isfinite(det.fwhm) else 3.0
        ss = settings.solve
        radius = ss.match_radius_arcsec / scale if ss.match_radius_arcsec > 0 else max(
            1.5 * fwhm, 2.0 / scale)
        si, _, dx, dy = match_catalog(det_xy, after[0], after[1], radius, ss.clip_sigma, scale)
    residual = np.hypot(dx, dy) * (scale or 1.0)
    plots.n_matches = len(si)
    if len(si):
        plots.rms_arcsec = float(np.sqrt(np.mean(residual**2)))
        plots.median_residual_arcsec = float(np.median(residual))
    plots.n_catalog_before = len(before[0]) if before is not None else 0
    plots.n_catalog_after = len(after[0]) if after is not None else 0

    image, _ = display_image(np.where(frame.mask, np.nan, frame.data), max_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    markers: dict[str, int] = {}

    # 1. sources: image + detections + catalog before / after the correction
    fig = _figure(13, 6.8)
    axes = fig.subplots(1, 2, sharex=True, sharey=True)
    title_status = "" if status == "ok" else f"  [{status.upper()}: {reason}]"
    fig.suptitle(f"{name}{title_status}", fontsize=11,
                 color="black" if status == "ok" else "firebrick")
    for ax, key, wcs_xy in ((axes[0], "before", before), (axes[1], "after", after)):
        _show(ax, image, shape)
        ax.scatter(det_xy[:, 0], det_xy[:, 1], s=60, facecolors="none", edgecolors="cyan",
                   linewidths=0.8, gid="detected" if key == "before" else None,
                   label=f"detected ({len(det_xy)})")
        if wcs_xy is not None:
            ax.scatter(wcs_xy[0], wcs_xy[1], s=30, marker="+", color="orangered",
                       linewidths=0.9, gid=f"catalog_{key}", label=f"catalog ({len(wcs_xy[0])})")
        if key == "after" and len(si):
            ax.scatter(det_xy[si, 0], det_xy[si, 1], s=110, facecolors="none",
                       edgecolors="lime", linewidths=1.0, gid="matched",
                       label=f"matched ({len(si)})")
        if key == "before":
            label = "before: header WCS" if start_wcs is not None else "before: no header WCS"
            if plots.offset_arcsec is not None:
                label += f" (off by {plots.offset_arcsec:.1f}\")"
        else:
            label = "after: solved WCS" if solved_wcs is not None else "after: not solved"
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("x (px)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper right", fontsize=8, framealpha=0.8)
    axes[0].set_ylabel("y (px)")
    if solved_wcs is None:
        axes[1].text(0.5, 0.5, "not solved" + (f":\n{reason}" if reason else ""),
                     transform=axes[1].transAxes, ha="center", va="center", fontsize=12,
                     color="firebrick", wrap=True,
                     bbox=dict(facecolor="white", alpha=0.85, edgecolor="firebrick"))
    fig.tight_layout()
    markers.update(count_markers(fig))
    _save(fig, out_dir / f"{name}_sources.png")
    plots.files["sources"] = f"{name}_sources.png"

    # 2. residuals: vectors across the frame, and their histogram with the RMS
    if solved_wcs is not None:
        fig = _figure(13, 5.6)
        ax_v, ax_h = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.15, 1]})
        ax_v.set_aspect("equal")
        ax_v.set_xlim(-0.5, nx - 0.5)
        ax_v.set_ylim(-0.5, ny - 0.5)
        ax_v.set_xlabel("x (px)")
        ax_v.set_ylabel("y (px)")
        if len(si):
            typical = max(float(np.sqrt(np.mean(dx**2 + dy**2))), 1e-3)
            gain = 0.05 * max(nx, ny) / typical  # a typical residual spans 5% of the frame
            q = ax_v.quiver(det_xy[si, 0], det_xy[si, 1], dx, dy, residual, angles="xy",
                            scale_units="xy", scale=1.0 / gain, cmap="viridis", width=0.003,
                            gid="residuals")
            key_px = float(f"{typical:.1g}")
            ax_v.quiverkey(q, 0.82, 1.03, key_px, f"{key_px * scale:.2g}\"", labelpos="E",
                           coordinates="axes")
            ax_v.set_title(f"residuals (catalog - detected) x{gain:.0f}", fontsize=10,
                           loc="left")
            ax_h.hist(residual, bins=max(5, min(40, len(residual) // 4)), color="steelblue",
                      edgecolor="white")
            ax_h.axvline(plots.rms_arcsec, color="firebrick", ls="--")
            ax_h.text(0.97, 0.95, f"RMS {plots.rms_arcsec:.3f}\"\n"
                      f"median {plots.median_residual_arcsec:.3f}\"\n{len(si)} stars",
                      transform=ax_h.transAxes, ha="right", va="top", fontsize=11,
                      bbox=dict(facecolor="white", alpha=0.9, edgecolor="0.7"))
        else:
            ax_v.text(0.5, 0.5, "no matched stars", transform=ax_v.transAxes, ha="center")
            ax_h.text(0.5, 0.5, "no residuals", transform=ax_h.transAxes, ha="center")
        ax_h.set_xlabel("|residual| (arcsec)")
        ax_h.set_ylabel("stars")
        ax_h.set_title("astrometric residuals", fontsize=10)
        fig.suptitle(name, fontsize=11)
        fig.tight_layout()
        markers.update(count_markers(fig))
        _save(fig, out_dir / f"{name}_residuals.png")
        plots.files["residuals"] = f"{name}_residuals.png"
    markers.setdefault("matched", 0)
    markers.setdefault("residuals", 0)
    plots.markers = markers
    _save_json(plots, out_dir)
    return plots


def _save_json(plots: FramePlots, out_dir: Path) -> None:
    atomic_write_text(as_path(out_dir) / f"{plots.name}.json",
                      json.dumps(plots.to_dict(), indent=1, default=_json_default))


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def frame_task(frame_path: str, wcs_path: str | None, catalog, settings, out_dir: str,
               status: str = "ok", reason: str = "", name: str | None = None) -> FramePlots:
    """The Dask task: one frame's pictures from paths; never raises (errors recorded)."""
    from .frames import frame_name

    name = name or frame_name(frame_path)
    try:
        return frame_figures(frame_path, None, wcs_path, catalog, settings, out_dir,
                             status=status, reason=reason, name=name)
    except Exception as err:  # noqa: BLE001 - a picture must not stop the report
        log.exception("%s: pictures failed", name)
        plots = FramePlots(name=name, status=status, reason=reason,
                           error=f"pictures failed: {type(err).__name__}: {err}")
        try:
            _save_json(plots, as_path(out_dir))
        except OSError:
            pass
        return plots


def load_frame_plots(frames_dir) -> dict[str, FramePlots]:
    """The per-frame records saved beside the pictures (``frames/<name>.json``)."""
    out = {}
    for path in sorted(as_path(frames_dir).glob("*.json")):
        try:
            values = json.loads(path.read_text())
            plots = FramePlots(**{k: v for k, v in values.items()
                                  if k in FramePlots.__dataclass_fields__})
        except (OSError, ValueError, TypeError):
            continue
        out[plots.name] = plots
    return out


# --------------------------------------------------------------------------------------
# Per run
# --------------------------------------------------------------------------------------
def _read_fits_binned(path, hdu, max_size=MAX_DISPLAY):
    from .frames import quiet_astropy

    # a URL's text: astropy opens it through fsspec itself
    with quiet_astropy(), fits.open(str(path), memmap=True) as hdul:
        data = hdul[hdu].data
        header = hdul[hdu].header.copy()
        image, factor = _binned_rows(lambda y0, y1: data[y0:y1], data.shape, max_size)
        shape = data.shape
    return image, factor, shape, header


def coadd_preview(coadd_path, png, weight_png=None, max_size: int = MAX_DISPLAY) -> dict:
    """PNG previews of one coadd (asinh stretch) and of its noise and coverage (ERR and
    EXPMAP extensions, with the sky scatter measured in units of the ERR)."""
    coadd_path = as_path(coadd_path)
    image, factor, shape, header = _read_fits_binned(coadd_path, 0, max_size)
    filt = str(header.get("FILTER", coadd_path.stem.removeprefix("coadd_")))
    fig = _figure(8.5, 8.5 * shape[0] / shape[1] + 0.6)
    ax = fig.add_axes([0.08, 0.06, 0.9, 0.88])
    _show(ax, image, shape)
    ax.set_title(f"coadd {filt}: {header.get('NCOMBINE', '?')} frames, "
                 f"{header.get('COMBINE', '')}, {header.get('EXPTIME', 0):.0f} s", fontsize=10)
    _save(fig, as_path(png))
    info = {"filter": filt, "image": as_path(png).name, "shape": list(shape),
            "ncombine": header.get("NCOMBINE"), "binning": factor}
    if weight_png is not None:
        try:
            err, _, _, _ = _read_fits_binned(coadd_path, "ERR", max_size)
            expmap, _, _, _ = _read_fits_binned(coadd_path, "EXPMAP", max_size)
        except KeyError:  # a coadd written before the noise extensions
            return info
        noise = noise_check(image, err, factor)
        fig = _figure(15.0, 7.0 * shape[0] / shape[1] + 0.8)
        for n, (plane, label, cmap) in enumerate(((err, "ERR (1 sigma)", "magma"),
                                                  (expmap, "EXPMAP (s)", "viridis"))):
            ax = fig.add_axes([0.05 + 0.5 * n, 0.06, 0.37, 0.86])
            finite = plane[np.isfinite(plane)]
            top = float(np.percentile(finite, 99)) if finite.size else 1.0
            im = ax.imshow(plane, origin="lower", cmap=cmap, extent=_extent(shape),
                           interpolation="nearest", vmin=0, vmax=top or 1.0)
            fig.colorbar(im, cax=fig.add_axes([0.43 + 0.5 * n, 0.06, 0.015, 0.86]),
                         label=label)
            ax.set_title(f"{label} {filt}", fontsize=10)
        if noise is not None:
            fig.suptitle(f"{filt}: sky scatter / ERR = {noise[0]:.3f} (1 when the noise is as "
                         f"predicted); median ERR {noise[1]:.4g}", fontsize=10)
            info["noise_over_err"], info["median_err"] = noise
        _save(fig, as_path(weight_png))
        info["weight"] = as_path(weight_png).name
    return info


def noise_check(image, err, binning: int = 1):
    """How well a coadd's ERR predicts its noise: ``(scatter of (image - sky) / ERR over
    the sky, median ERR there)``, the first 1 when ERR is right; None without sky. Pixels
    of every depth count, each against its own ERR. ``binning``: the previews are block
    means of binning**2 pixels, whose ERR (the mean's) is ERR / binning if the pixels are
    independent (resampling correlates them a little: the ratio then rises towards
    sqrt(NOISECOR) at large binning)."""
    from ._stats import mad_sigma, sky_level

    err = err / binning
    level, scatter = sky_level(image, ~np.isfinite(err))
    if not np.isfinite(scatter) or scatter <= 0:
        return None
    sky = (np.isfinite(image) & np.isfinite(err) & (err > 0)
           & (np.abs(image - level) < 5 * scatter))
    if sky.sum() < 100:
        return None
    z = (image[sky] - level) / err[sky]
    return float(mad_sigma(z, 0.0)), float(np.median(err[sky]))


def _wavelength(name: str) -> float:
    return _WAVELENGTH.get(name, _WAVELENGTH.get(name.lower(), 10_000 + sum(map(ord, name))))


def colour_composite(coadds: dict[str, str], png, max_size: int = MAX_DISPLAY) -> dict | None:
    """A Lupton et al. (2004) colour composite of three coadds (bluest -> blue, reddest ->
    red); None with fewer than three filters. With more, the three deepest (star light
    over sky noise) are used, so a shallow band (u') does not paint the sky with noise.
    Each channel is the sky-subtracted coadd in units of its own sky noise, with the
    noise below one sigma left black."""
    from astropy.stats import mad_std
    from astropy.visualization import make_lupton_rgb

    if len(coadds) < 3:
        return None
    planes, shape = {}, None
    for filt, path in coadds.items():
        image, _, shape_f, _ = _read_fits_binned(path, 0, max_size)
        if shape is not None and image.shape != shape[1]:
            return None  # coadds on different grids: no composite
        shape = (shape_f, image.shape)
        sky = np.nanmedian(image)
        noise = mad_std(image, ignore_nan=True) or 1.0
        signal = (image - sky) / noise
        planes[filt] = (signal, float(np.nanpercentile(signal, 99.9)))
    deepest = sorted(planes, key=lambda f: planes[f][1], reverse=True)[:3]
    chosen = sorted(deepest, key=_wavelength)
    shape = shape[0]
    channels = []
    for filt in chosen:
        signal, top = planes[filt]
        channels.append(np.nan_to_num(np.clip(signal - 1.0, 0, None) / max(top, 1.0),
                                      nan=0.0))
    blue, green, red = channels
    with np.errstate(invalid="ignore", divide="ignore"):  # black sky: 0 / 0
        rgb = make_lupton_rgb(red, green, blue, minimum=0.0, stretch=0.5, Q=8)
    fig = _figure(8.5, 8.5 * shape[0] / shape[1] + 0.6)
    ax = fig.add_axes([0.08, 0.06, 0.9, 0.88])
    ax.imshow(rgb, origin="lower", extent=_extent(shape), interpolation="nearest")
    ax.set_title(f"colour composite: R={chosen[2]}  G={chosen[1]}  B={chosen[0]}",
                 fontsize=10)
    _save(fig, as_path(png))
    return {"image": as_path(png).name, "filters": {"red": chosen[2], "green": chosen[1],
                                                 "blue": chosen[0]}}


def two_colour_overlay(store_path, png, reference: str = "", aligned: str = "",
                       max_size: int = MAX_DISPLAY) -> dict | None:
    """The tutorial's composite: the reference frame (magenta) and an aligned frame (green)
    from the store's registered data; where they agree stars are white, and the aligned
    frame's shifted border shows how far it moved."""
    from . import store as store_mod

    stack = store_mod.open_store(store_path)
    registered = stack.params.get("registered") or [
        n for names in stack.filters.values() for n in names]
    if not registered:
        return None
    if reference not in registered:  # the grid's own reference frame (REFFRAME), if any
        reference = stack.params.get("reference_frame", "")
    if reference not in registered:
        reference = registered[0]
    if aligned not in registered or aligned == reference:
        ref_filter, _ = stack.index_of(reference)
        same = [n for n in stack.filters[ref_filter] if n in registered and n != reference]
        others = [n for n in registered if n != reference]
        if not others:
            return None
        aligned = (same or others)[-1]
    images = []
    for name in (reference, aligned):
        filt, index = stack.index_of(name)
        data, _ = stack.arrays(filt)
        image, _ = _binned_rows(lambda y0, y1, d=data, i=index: d[i, y0:y1],
                                data.shape[1:], max_size)
        images.append(scaled(image, 1.0, 99.5))
    ref, ali = images
    rgb = np.dstack([ref, ali, ref])
    shape = stack.grid.shape
    fig = _figure(8.5, 8.5 * shape[0] / shape[1] + 0.9)
    ax = fig.add_axes([0.08, 0.06, 0.9, 0.86])
    ax.imshow(rgb, origin="lower", extent=_extent(shape), interpolation="nearest")
    ax.set_title(f"magenta: {reference} (reference)\ngreen: {aligned} (aligned)", fontsize=10)
    _save(fig, as_path(png))
    return {"image": as_path(png).name, "reference": reference, "aligned": aligned}


def _column(table: Table, name: str) -> np.ndarray:
    if name not in table.colnames:
        return np.full(len(table), np.nan)
    column = table[name]
    values = np.ma.filled(np.ma.asarray(column, dtype=float), np.nan) if np.ma.isMaskedArray(
        column) else np.asarray(column, dtype=float)
    return values


def manifest_qa(table: Table) -> dict[str, dict]:
    """The manifest as `daskstack.qa` records: ``{name: {column: value}}`` (masked
    values as None)."""
    columns = table.colnames
    out = {}
    for row in table:
        values = {c: (None if np.ma.is_masked(row[c]) else row[c]) for c in columns}
        values["name"] = str(row["name"])
        out[values["name"]] = values
    return out


def _usable(table: Table) -> list[str]:
    """Frames with QA to compare: solved (``ok``) and those left out by a person
    (``excluded``: solved too; their numbers still tell what the group looks like)."""
    return [str(n) for n, s in zip(table["name"], table["status"], strict=True)
            if _text(s) in ("ok", EXCLUDED)]


def find_outliers(table: Table, sigma: float = OUTLIER_SIGMA) -> dict[str, list[str]]:
    """Solved frames of the manifest ``table`` whose QA stands out in their group of
    comparable frames (filter x telescope/instrument x night): ``{name: [why, ...]}``
    (`daskstack.qa.find_outliers`)."""
    if len(table) == 0:
        return {}
    return qa.find_outliers(manifest_qa(table), _usable(table), sigma)


def summary_plots(table: Table, png, outliers: dict[str, list[str]] | None = None) -> dict:
    """QA across frames, one panel per metric (`daskstack.qa.METRICS` that any frame
    has): frames in time order along x, nights apart (a gap and a dotted line, so
    hundreds of frames of a night do not clump into one column), each group's median
    as a line over its frames with bands of 1 and `OUTLIER_SIGMA` robust sigmas (frames
    beyond the outer band on the bad side are flagged), colour per filter, flagged
    frames ringed red, failed frames as red ticks on the axis."""
    outliers = find_outliers(table) if outliers is None else outliers
    n = len(table)
    rows = manifest_qa(table) if n else {}
    names = list(rows)
    mjd = _column(table, "mjd")
    nights = [qa.frame_group(rows[nm]).rsplit(" / ", 1)[-1] for nm in names]
    order = sorted(range(n), key=lambda i: (nights[i], mjd[i] if np.isfinite(mjd[i])
                                            else np.inf, i))
    x = np.empty(n)
    position, night_starts = 0.0, []
    for rank, i in enumerate(order):
        if rank == 0 or nights[i] != nights[order[rank - 1]]:
            position += 0 if rank == 0 else max(2.0, 0.03 * n)  # a gap between nights
            night_starts.append((position, nights[i]))
        x[i] = position
        position += 1
    status = np.array([_text(s) for s in table["status"]]) if n else np.array([], str)
    usable = np.isin(status, ["ok", EXCLUDED])
    filters = np.array([_text(f) for f in table["filter"]]) if n else np.array([], str)
    groups = np.array([qa.frame_group(rows[nm]) for nm in names])
    stats = qa.group_statistics(rows, [nm for nm, u in zip(names, usable, strict=True)
                                       if u]) if n else {}
    values_of = {m.column: qa.metric_values([rows[nm] for nm in names], m)
                 for m in qa.METRICS}
    metrics = [m for m in qa.METRICS if np.isfinite(values_of[m.column][usable]).any()] \
        or list(qa.METRICS[:2])
    ncols = 2
    nrows = math.ceil(len(metrics) / ncols)
    fig = _figure(13, 2.9 * nrows + 0.8)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, sharex=True)).ravel()
    palette = ["tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:olive",
               "tab:cyan", "tab:pink"]
    colours = {f: palette[i % len(palette)] for i, f in enumerate(sorted(set(filters),
                                                                         key=_wavelength))}
    # each flagged frame ringed in the panels of the metrics it was flagged for
    flagged_for = qa.outlier_metrics(rows, [nm for nm, u in zip(names, usable, strict=True)
                                            if u]) if n else {}
    flagged = np.array([nm in outliers for nm in names], bool)
    for ax, metric in zip(axes, metrics, strict=False):
        values = values_of[metric.column]
        for group in sorted(set(groups[usable])):
            sel = usable & (groups == group)
            colour = colours[filters[sel][0]]
            centre = stats.get(group, {}).get(metric.column)
            if centre is not None:
                median, spread, _ = centre
                x0, x1 = x[sel].min() - 0.5, x[sel].max() + 0.5
                ax.fill_between([x0, x1], median - OUTLIER_SIGMA * spread,
                                median + OUTLIER_SIGMA * spread, color=colour, alpha=0.08, lw=0)
                ax.fill_between([x0, x1], median - spread, median + spread, color=colour,
                                alpha=0.2, lw=0)
                ax.plot([x0, x1], [median, median], color=colour, lw=1.0)
        for filt, colour in colours.items():
            sel = usable & (filters == filt) & np.isfinite(values)
            if sel.any():
                ax.plot(x[sel], values[sel], "o", ms=3 if n > 200 else 4, color=colour,
                        label=filt, alpha=0.85)
        ring = usable & np.isfinite(values) & np.array(
            [metric.column in flagged_for.get(nm, {}) for nm in names], bool)
        if ring.any():
            ax.scatter(x[ring], values[ring], s=110, facecolors="none", edgecolors="red",
                       linewidths=1.4, zorder=5, gid=f"outliers_{metric.column}")
        failed = ~usable & (status != "")
        if failed.any():
            ax.plot(x[failed], np.zeros(failed.sum()), "|", color="red", ms=12, mew=1.5,
                    transform=ax.get_xaxis_transform(), label="failed")
        for start, _ in night_starts[1:]:
            ax.axvline(start - 0.5 * max(2.0, 0.03 * n), color="0.5", ls=":", lw=0.8)
        unit = f" ({metric.unit})" if metric.unit else ""
        ax.set_ylabel(metric.label + unit, fontsize=9)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.grid(alpha=0.3)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    for ax in axes[:len(metrics)][-ncols:]:
        ax.set_xlabel("frames in time order, night by night (dotted lines: a new night)")
        if len(night_starts) <= 12:
            for start, night in night_starts:
                ax.annotate(night, (start, 0), xycoords=("data", "axes fraction"),
                            xytext=(2, 2), textcoords="offset points", fontsize=7,
                            color="0.3")
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper right", fontsize=9, ncols=len(labels))
    fig.suptitle(f"{n} frames: {int(usable.sum())} solved, {int((~usable).sum())} failed, "
                 f"{int((usable & flagged).sum())} flagged (red rings); bands: group median "
                 f"+-1 and +-{OUTLIER_SIGMA:g} robust sigma", fontsize=10, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    _save(fig, as_path(png))
    return {"image": as_path(png).name, "outliers": sorted(outliers),
            "groups": sorted({str(g) for g in groups[usable]})}


def zero_point_plots(table: Table, png) -> dict | None:
    """Each frame's zero point (`daskstack.photcal`) with its error, against the time of
    the exposure and against airmass: colour per filter, marker per site (extinction is
    the slope against airmass, clouds the frames below their filter's line). None when
    no frame has a zero point."""
    zp = _column(table, "zp")
    has = np.isfinite(zp)
    if not has.any():
        return None
    err = _column(table, "zp_err")
    mjd = _column(table, "mjd")
    airmass = _column(table, "airmass")
    filters = np.array([_text(f) for f in table["filter"]])
    sites = np.array([_text(s) or "?" for s in table["site"]]) if "site" in table.colnames \
        else np.full(len(table), "?")
    palette = ["tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:olive"]
    colours = {f: palette[i % len(palette)] for i, f in enumerate(
        sorted(set(filters[has]), key=_wavelength))}
    markers = {site: "osD^vP*X"[i % 8] for i, site in enumerate(sorted(set(sites[has])))}
    start = np.nanmin(mjd[has]) if np.isfinite(mjd[has]).any() else 0.0
    hours = (mjd - start) * 24.0
    fig = _figure(13, 4.2)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, x, label in ((axes[0], hours, f"hours since MJD {start:.4f}"),
                         (axes[1], airmass, "airmass")):
        for filt, colour in colours.items():
            for site, marker in markers.items():
                sel = has & (filters == filt) & (sites == site) & np.isfinite(x)
                if sel.any():
                    ax.errorbar(x[sel], zp[sel], yerr=np.nan_to_num(err[sel]), fmt=marker,
                                color=colour, ms=5, capsize=2, label=f"{filt} / {site}")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("zero point (mag of 1 unit / s)")
    axes[0].legend(fontsize=8)
    n_without = int((~has & (np.array([_text(s) for s in table["status"]]) != "failed")).sum())
    fig.suptitle(f"zero points of {int(has.sum())} frames (colour: filter, marker: site); "
                 f"{n_without} solved frame(s) without one (see the table)", fontsize=10,
                 x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    _save(fig, Path(png))
    return {"image": Path(png).name, "n_frames": int(has.sum())}


def thumbnail(image: np.ndarray, size: int = THUMBNAIL) -> bytes:
    """A small JPEG (bytes) of an image: binned to at most ``size`` px a side, asinh
    stretched; a few kB whatever the frame's size."""
    from io import BytesIO

    from PIL import Image

    binned, _ = display_image(image, size)
    pixels = (255 * scaled(binned, 1.0, 99.5)).astype(np.uint8)[::-1]  # north up, as drawn
    buffer = BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="JPEG", quality=70)
    return buffer.getvalue()


def thumbnails_task(store_path: str | None, items: list[tuple[str, str | None, str]],
                    size: int = THUMBNAIL) -> dict[str, bytes | str]:
    """Thumbnails of several frames (one Dask task): ``items`` are ``(name, store filter
    or None, frame path)``; a frame in the store is binned from its registered pixels
    (on the output grid), any other read once from its file. ``{name: JPEG bytes}``, or
    ``{name: why}`` for a frame that cannot be read (never raises)."""
    from . import store as store_mod
    from .frames import FrameError, read_frame

    stack = store_mod.open_store(store_path) if store_path else None
    arrays = {}  # opened once per filter: opening a zarr array reads its metadata files
    out: dict[str, bytes | str] = {}
    for name, filter_name, path in items:
        try:
            if stack is not None and filter_name is not None:
                _, index = stack.index_of(name)
                if filter_name not in arrays:
                    arrays[filter_name] = stack.arrays(filter_name)[0]
                data = arrays[filter_name]
                image, _ = _binned_rows(lambda y0, y1, d=data, i=index: d[i, y0:y1],
                                        data.shape[1:], size)
            else:
                frame = read_frame(path)
                image, _ = display_image(np.where(frame.mask, np.nan, frame.data), size)
            out[name] = thumbnail(image, size)
        except FrameError as err:
            out[name] = f"cannot read the frame: {err.reason}"
        except Exception as err:  # noqa: BLE001 - a thumbnail must not stop the report
            log.exception("%s: thumbnail failed", name)
            out[name] = f"thumbnail failed: {type(err).__name__}: {err}"
    return out


def run_coadds(run_dir) -> list[tuple[str, Path]]:
    """``[(key, path)]`` of a run's coadds: ``coadd_<key>.fits`` in the run directory, or
    in a run of several fields each field's, keyed ``<field>/<key>``."""
    run_dir = as_path(run_dir)
    found = [(p.stem.removeprefix("coadd_"), p) for p in sorted(run_dir.glob("coadd_*.fits"))]
    found += [(f"{p.parent.name}/{p.stem.removeprefix('coadd_')}", p)
              for p in sorted(run_dir.glob("*/coadd_*.fits"))]
    return found


def _picture_key(key: str) -> str:
    """A coadd key as part of a picture's file name (a field's key holds a '/')."""
    return key.replace("/", "__")


def lightcurve_figure(table: Table, png, title: str = "") -> dict:
    """A target's light curve (``daskstack lightcurve``'s table): above, the differential
    magnitude of each filter about its median; below, the calibrated magnitude where the
    frames have zero points, else the flux about its median; flagged points hollow."""
    fig = _figure(9.0, 6.0)
    top, bottom = fig.subplots(2, 1, sharex=True)
    mjd = np.asarray(table["mjd"], float)
    t0 = math.floor(np.nanmin(mjd)) if np.isfinite(mjd).any() else 0.0
    filters = sorted(set(np.asarray(table["filter"]).astype(str)))
    calibrated = np.isfinite(np.asarray(table["mag"], float)).any()
    drawn = 0
    for name in filters:
        rows = np.asarray(table["filter"]).astype(str) == name
        flagged = (np.asarray(table["flags"]) & 7) != 0
        for ax, key, err_key, offset in (
                (top, "diff_mag", "diff_mag_err", True),
                (bottom, "mag" if calibrated else "flux",
                 "mag_err" if calibrated else "flux_err", not calibrated)):
            value = np.asarray(table[key], float)[rows]
            err = np.asarray(table[err_key], float)[rows]
            ok = np.isfinite(value)
            if not ok.any():
                continue
            if offset:  # each filter about its median (fluxes: relative)
                centre = np.median(value[ok])
                value, err = ((value - centre, err) if key != "flux" else
                              (value / centre, err / abs(centre)))
            for bad, style in ((False, "o"), (True, "o")):
                sel = ok & (flagged[rows] == bad)
                if sel.any():
                    bars = ax.errorbar(mjd[rows][sel] - t0, value[sel], yerr=err[sel],
                                       fmt=style, ms=4, lw=0.8, mfc="none" if bad else None,
                                       label=name if not bad and ax is top else None)
                    drawn += int(sel.sum())
                    if bad:
                        bars[0].set_alpha(0.5)
    top.set_ylabel("diff. mag - median")
    top.invert_yaxis()
    if calibrated:
        bottom.set_ylabel("mag")
        bottom.invert_yaxis()
    else:
        bottom.set_ylabel("flux / median (no zero point)")
    bottom.set_xlabel(f"MJD - {t0:.0f}")
    if filters:
        top.legend(loc="best", fontsize=8)
    fig.suptitle(title or str(table.meta.get("target", "")))
    _save(fig, Path(png))
    return {"points": drawn}


def run_figure_jobs(run_dir, reference: str = "") -> list[tuple]:
    """``(kind, function, args)`` for every per-run picture (run as Dask tasks or inline)."""
    run_dir = as_path(run_dir)
    out = run_dir / REPORT_DIR
    jobs = []
    coadds = {}
    for key, path in run_coadds(run_dir):
        coadds[key] = str(path)
        png = _picture_key(key)
        jobs.append((f"coadd:{key}", coadd_preview,
                     (str(path), str(out / f"coadd_{png}.png"), str(out / f"weight_{png}.png"))))
    if len(coadds) >= 3 and all("/" not in k for k in coadds):
        jobs.append(("colour", colour_composite, (coadds, str(out / "colour.png"))))
    if (run_dir / "store.zarr").exists():
        jobs.append(("overlay", two_colour_overlay,
                     (str(run_dir / "store.zarr"), str(out / "overlay.png"), reference)))
    return jobs


def run_figures(run_dir, reference: str = "") -> dict:
    """Every per-run picture, made here (no Dask); ``{kind: info}``; errors recorded."""
    results = {}
    for kind, func, args in run_figure_jobs(run_dir, reference):
        results[kind] = run_safely(func, *args)
    return results


def run_safely(func, *args):
    """``func(*args)``, or ``{"error": ...}`` if it raised (one picture must not stop the
    report)."""
    try:
        return func(*args)
    except Exception as err:  # noqa: BLE001 - one picture must not stop the report
        log.exception("report picture failed")
        return {"error": f"{type(err).__name__}: {err}"}


# --------------------------------------------------------------------------------------
# The HTML page
# --------------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:1.5em;
color:#222;background:#fff;max-width:1500px}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;
margin-top:1.6em}
.meta{color:#555}.summary span{display:inline-block;margin-right:1.2em;font-weight:600}
.bad{color:#b22222}.warn{color:#b8860b}
table{border-collapse:collapse;font-size:.9em}th,td{border:1px solid #ddd;padding:3px 7px;
text-align:left;vertical-align:top}th{background:#f3f3f3;position:sticky;top:0}
#frames th{cursor:pointer;user-select:none}#frames th[aria-sort=ascending]::after{content:" \\25B2"}
#frames th[aria-sort=descending]::after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.failed td{background:#fdecea}tr.outlier td{background:#fff6e0}tr.excluded td{color:#777}
img.thumb{display:block;max-width:96px;max-height:96px;border:0}
.gallery{display:flex;flex-wrap:wrap;gap:12px}.gallery figure{margin:0;flex:0 1 560px}
.frame figure,.gallery figure.wide{margin:0 0 .5em 0;flex:0 1 1040px;max-width:1040px}
.gallery img,.frame img{max-width:100%;border:1px solid #ccc}
figcaption{font-size:.85em;color:#444}
.frame{margin-bottom:1.2em}.frame h3{margin:.3em 0;font-size:1.05em}
.controls{margin:.5em 0}.controls input{width:22em}
pre{background:#f7f7f7;padding:.6em;overflow-x:auto}
"""

# after load: how many <img> did not decode (checked by the tests in headless Chromium)
# and how long the page took to load
_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.images, broken = 0;
  for (var i = 0; i < imgs.length; i++) {
    if (!imgs[i].complete || imgs[i].naturalWidth === 0) { broken++; }
  }
  document.body.setAttribute('data-images', String(imgs.length));
  document.body.setAttribute('data-broken-images', String(broken));
  // milliseconds from the start of navigation to this load event (page, images, scripts)
  document.body.setAttribute('data-load-ms', String(Math.round(performance.now())));
});
"""

# the frame table: click a heading to sort (the first click puts the worst frames first:
# largest FWHM, fewest matches ...; again to reverse); filter by text and by status
_TABLE_SCRIPT = """
(function () {
  var table = document.getElementById('frames');
  if (!table) { return; }
  var body = table.tBodies[0], heads = table.tHead.rows[0].cells, state = {col: -1, dir: 1};
  function key(row, c, num) {
    var cell = row.cells[c];
    if (!num) { return cell.textContent.toLowerCase(); }
    var v = cell.getAttribute('data-v');
    return (v === null || v === '') ? NaN : parseFloat(v);
  }
  function sortBy(c) {
    var th = heads[c], num = th.getAttribute('data-type') === 'num';
    var first = th.getAttribute('data-bad') === 'high' ? -1 : 1;
    var dir = state.col === c ? -state.dir : first;
    state = {col: c, dir: dir};
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a, c, num), y = key(b, c, num);
      if (num) {
        if (isNaN(x) || isNaN(y)) { return isNaN(x) - isNaN(y); }
        return dir * (x - y);
      }
      return dir * (x < y ? -1 : (x > y ? 1 : 0));
    });
    rows.forEach(function (r) { body.appendChild(r); });
    for (var i = 0; i < heads.length; i++) { heads[i].removeAttribute('aria-sort'); }
    th.setAttribute('aria-sort', dir > 0 ? 'ascending' : 'descending');
  }
  Array.prototype.forEach.call(heads, function (th, c) {
    th.addEventListener('click', function () { sortBy(c); });
  });
  var text = document.getElementById('filter-text');
  var show = document.getElementById('filter-status');
  var count = document.getElementById('filter-count');
  function apply() {
    var q = text.value.toLowerCase(), s = show.value, n = 0;
    Array.prototype.forEach.call(body.rows, function (r) {
      var keep = (!q || r.textContent.toLowerCase().indexOf(q) >= 0) &&
                 (s === 'all' || (' ' + r.getAttribute('data-show') + ' ').indexOf(' ' + s + ' ') >= 0);
      r.style.display = keep ? '' : 'none';
      if (keep) { n++; }
    });
    count.textContent = n + ' of ' + body.rows.length + ' frames shown';
  }
  text.addEventListener('input', apply);
  show.addEventListener('change', apply);
  apply();
})();
"""


def _text(value) -> str:
    """A table cell as text: masked (ECSV empty strings read back masked) -> ''."""
    return "" if value is None or np.ma.is_masked(value) else str(value)


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _href(*parts: str) -> str:
    return _e("/".join(quote(str(p)) for p in parts))


def _fmt(value, digits: int = 3) -> str:
    value = _finite_or_none(value)
    if value is None:
        return ""
    if value == 0:
        return "0"
    if abs(value) >= 1e5 or abs(value) < 1e-3:
        return f"{value:.{digits}g}"
    return f"{value:.{digits}f}"


def _img(src_parts, alt: str, caption: str = "", wide: bool = False) -> str:
    cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    cls = ' class="wide"' if wide else ""
    return (f'<figure{cls}><a href="{_href(*src_parts)}"><img src="{_href(*src_parts)}" '
            f'alt="{_e(alt)}"></a>{cap}</figure>')


def _settings_html(run_info: dict) -> str:
    parts = []
    if run_info.get("catalog"):
        parts.append(f"<p>catalog: <code>{_e(run_info['catalog'])}</code>; "
                     f"inputs: {len(run_info.get('inputs', []))} frames</p>")
    settings = run_info.get("settings") or {}
    rows = []
    for section, values in settings.items():
        if not isinstance(values, dict):
            rows.append(f"<tr><td>{_e(section)}</td><td></td><td>{_e(values)}</td></tr>")
            continue
        for key, value in values.items():
            rows.append(f"<tr><td>{_e(section)}</td><td>{_e(key)}</td>"
                        f"<td><code>{_e(json.dumps(value))}</code></td></tr>")
    if rows:
        parts.append('<table id="parameters"><thead><tr><th>section</th><th>setting</th>'
                     "<th>value</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")
    else:
        parts.append("<p>no run.json: parameters unknown</p>")
    return "\n".join(parts)


def frame_order(table: Table, outliers: dict[str, list[str]] | None = None) -> list[int]:
    """Rows of the manifest as the report lists them: failed (and pending) frames first,
    then flagged frames (``outliers``), then frames excluded on purpose, then the others;
    manifest order within each."""
    outliers = outliers or {}
    status = [_text(s) for s in table["status"]] if len(table) else []
    names = [str(n) for n in table["name"]] if len(table) else []

    def rank(i):
        if status[i] not in ("ok", EXCLUDED):
            return 0
        if names[i] in outliers:
            return 1
        return 2 if status[i] == EXCLUDED else 3

    return sorted(range(len(status)), key=lambda i: (rank(i), i))


def frames_needing_pictures(table: Table, outliers: dict[str, list[str]]) -> list[str]:
    """Frames whose full-size pictures the report draws by default: failed and flagged."""
    return [str(table["name"][i]) for i in frame_order(table, outliers)
            if _text(table["status"][i]) not in ("ok", EXCLUDED)
            or str(table["name"][i]) in outliers]


def write_suggested_exclude(run_dir, outliers: dict[str, list[str]]) -> Path:
    """``RUN_DIR/report/suggested-exclude.txt``: the flagged frames, one a line with why
    as a comment, in the format ``--exclude-file`` reads."""
    run_dir = as_path(run_dir)
    path = run_dir / REPORT_DIR / SUGGESTED_EXCLUDE
    heading = (f"daskstack report: {len(outliers)} frame(s) flagged as outliers of their "
               "group (filter / telescope-instrument / night).\n"
               "Edit as you like, then combine without them (nothing is registered again):\n"
               f"  daskstack combine {run_dir / 'store.zarr'} --exclude-file {path}\n"
               "(or the same 'daskstack run' command with --exclude-file)")
    atomic_write_text(path, qa.format_name_list(
        {name: "; ".join(why) for name, why in outliers.items()}, heading))
    return path


# (heading, manifest column or key, type, which side is bad)
_TABLE_COLUMNS = (
    ("#", "index", "num", ""), ("picture", "thumb", "", ""), ("frame", "name", "text", ""),
    ("group", "group", "text", ""), ("status", "status", "text", ""),
    ("why", "why", "text", ""), ("date", "date_obs", "text", ""),
    ("FWHM (px)", "fwhm_px", "num", "high"), ("elongation", "elongation", "num", "high"),
    ("sky", "background", "num", "high"), ("flux ratio /s", "transparency", "num", "low"),
    ("RMS (\")", "rms_arcsec", "num", "high"), ("matches", "n_matches", "num", "low"),
    ("zero point", "zp", "num", "high"), ("pictures", "links", "", ""),
)


_TRANSPARENCY = next(m for m in qa.METRICS if m.column == "transparency")


def _frame_row(i: int, row: dict, cls: str, why: str, thumb, links: list[str],
               picture: str | None, columns=_TABLE_COLUMNS) -> str:
    """One row of the frame table; numeric cells carry their value in ``data-v`` (the
    sort key); ``picture``: the href of the frame's full-size picture, if drawn."""
    name = row["name"]
    status = _text(row.get("status"))
    cells = []
    for _, key, kind, _ in columns:
        if key == "index":
            cells.append(f'<td class="num" data-v="{i}">{i}</td>')
        elif key == "thumb":
            if isinstance(thumb, bytes):
                src = "data:image/jpeg;base64," + base64.b64encode(thumb).decode("ascii")
                img = f'<img class="thumb" src="{src}" alt="{_e(name)}">'
                if picture:
                    img = f'<a href="{picture}">{img}</a>'
                cells.append(f"<td>{img}</td>")
            else:
                cells.append(f'<td class="meta">{_e(thumb or "")}</td>')
        elif key == "links":
            cells.append(f"<td>{' '.join(links)}</td>")
        elif key == "why":
            cells.append(f"<td>{_e(why)}</td>")
        elif key == "group":
            cells.append(f"<td>{_e(qa.frame_group(row))}</td>")
        elif kind == "num":
            if key == "transparency":
                value = qa.metric_values([row], _TRANSPARENCY)[0]
                text = _fmt(value, 4)
            else:
                value = qa.qa_value(row, key)
                text = "" if value is None else (str(int(value)) if key == "n_matches"
                                                 else _fmt(value, 3))
            value = _finite_or_none(value)
            cells.append(f'<td class="num" data-v="{"" if value is None else repr(value)}">'
                         f"{text}</td>")
        else:
            cells.append(f"<td>{_e(_text(row.get(key)))}</td>")
    show = {"failed": "failed attention", "outlier": "flagged attention",
            "excluded": "excluded", "ok": "ok"}[cls]
    return (f'<tr id="{_e("frame-" + name)}" class="{cls}" data-name="{_e(name)}" '
            f'data-status="{_e(status)}" data-show="{show}">' + "".join(cells) + "</tr>")


def _lightcurves_html(run_dir: Path) -> str:
    """The light-curve section: each ``RUN/lightcurves/<name>.ecsv`` with its picture and
    the scatter of its differential magnitudes ("" without light curves)."""
    directory = run_dir / "lightcurves"
    paths = sorted(directory.glob("*.ecsv")) if directory.is_dir() else []
    if not paths:
        return ""
    parts = ["<h2>Light curves</h2>", '<table class="lightcurves"><thead><tr><th>target</th>'
             "<th>RA</th><th>Dec</th><th>frames</th><th>filters</th><th>comparison stars"
             "</th><th>diff. mag scatter (robust)</th><th>median diff. mag error</th>"
             "<th>calibrated</th></tr></thead><tbody>"]
    pictures = []
    for path in paths:
        try:
            table = Table.read(path, format="ascii.ecsv")
        except (OSError, ValueError) as err:
            parts.append(f'<tr><td>{_e(path.stem)}</td><td colspan="8" class="bad">'
                         f"unreadable: {_e(err)}</td></tr>")
            continue
        diff = np.asarray(table["diff_mag"], float)
        err = np.asarray(table["diff_mag_err"], float)
        filters = np.asarray(table["filter"]).astype(str)
        # per filter (each has its own zero of diff_mag), the median of those
        scatter = [mad_sigma(values) for values in
                   (diff[(filters == f) & np.isfinite(diff)] for f in sorted(set(filters)))
                   if len(values) > 1]
        comparisons = table.meta.get("comparisons") or {}
        n_comp = ", ".join(f"{f}: {len(v.get('used', []))}" for f, v in comparisons.items())
        parts.append(
            f'<tr><td><a href="{_href("..", "lightcurves", path.name)}">{_e(path.stem)}</a>'
            f"</td><td>{_fmt(table.meta.get('ra'), 5)}</td><td>{_fmt(table.meta.get('dec'), 5)}"
            f"</td><td>{len(table)}</td><td>{_e(', '.join(sorted(set(filters))))}"
            f"</td><td>{_e(n_comp)}</td><td>{_fmt(np.median(scatter) if scatter else None, 4)}"
            f"</td><td>{_fmt(np.nanmedian(err) if np.isfinite(err).any() else None, 4)}</td>"
            f"<td>{int(np.isfinite(np.asarray(table['mag'], float)).sum())} of {len(table)}"
            "</td></tr>")
        png = path.with_suffix(".png")
        if png.exists():
            pictures.append(_img(["..", "lightcurves", png.name], f"light curve {path.stem}",
                                 f"{path.stem}: differential (per filter, about its median) "
                                 "and calibrated magnitudes", wide=True))
    parts.append("</tbody></table>")
    if pictures:
        parts.append('<div class="gallery">' + "".join(pictures) + "</div>")
    return "\n".join(parts)


def write_report(run_dir, run_plots: dict | None = None, *, title: str | None = None,
                 thumbnails: dict[str, bytes | str] | None = None,
                 summary: dict | None = None, max_attention: int = 24) -> Path:
    """Write ``RUN_DIR/report/index.html`` (and ``suggested-exclude.txt``) from the
    manifest, run.json and the pictures already in ``RUN_DIR/report`` (per-frame
    pictures are linked where they exist).

    ``run_plots`` is what `run_figures` returned (else pictures are found on disk);
    ``thumbnails`` ``{name: JPEG bytes or why not}`` (`thumbnails_task`) are inlined
    in the table, so the page stays one file however many frames it lists;
    ``summary``: what `summary_plots` returned for this manifest (else drawn here).
    Written atomically; every link is relative; no script, font or style is fetched.
    """
    run_dir = as_path(run_dir)
    out = run_dir / REPORT_DIR
    frames_dir = out / FRAMES_DIR
    out.mkdir(parents=True, exist_ok=True)
    table = read_manifest(run_dir / "manifest.ecsv")
    if table is None:
        raise FileNotFoundError(f"{run_dir}: no readable manifest.ecsv")
    try:
        run_info = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        run_info = {}
    plots = load_frame_plots(frames_dir)
    outliers = find_outliers(table)
    write_suggested_exclude(run_dir, outliers)
    if summary is None:
        summary = run_safely(summary_plots, table, out / "summary.png", outliers)
    zero_points = run_safely(zero_point_plots, table, out / "zero_points.png")
    run_plots = run_plots or {}
    thumbnails = thumbnails or {}
    rows = manifest_qa(table)

    n = len(table)
    status = [_text(s) for s in table["status"]]
    n_ok = sum(s == "ok" for s in status)
    n_excluded = sum(s == EXCLUDED for s in status)
    n_failed = n - n_ok - n_excluded
    groups = sorted({qa.frame_group(r) for r in rows.values()})
    title = title or f"daskstack report: {run_dir.resolve().name}"
    generated = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    body = [f"<h1>{_e(title)}</h1>",
            f'<p class="meta">run directory <code>{_e(run_dir.resolve())}</code>; '
            f"generated {_e(generated)}</p>",
            '<p class="summary">'
            f"<span>{n} frames</span><span>{n_ok} in the coadds</span>"
            f'<span class="{"bad" if n_failed else ""}">{n_failed} failed</span>'
            f'<span class="{"warn" if outliers else ""}">{len(outliers)} flagged</span>'
            f"<span>{n_excluded} excluded</span><span>{len(groups)} groups</span></p>"]

    # coadds
    coadds = run_coadds(run_dir)
    body.append("<h2>Coadds</h2>")
    if coadds:
        field_shown = ""
        body.append('<div class="gallery">')
        for key, path in coadds:
            field_name = key.split("/")[0] if "/" in key else ""
            if field_name != field_shown:  # a run of several fields: each its own part
                body.append(f'</div><h3>field {_e(field_name)}</h3><div class="gallery">')
                field_shown = field_name
            png = _picture_key(key)
            relative = f"{path.parent.name}/{path.name}" if "/" in key else path.name
            if (out / f"coadd_{png}.png").exists():
                body.append(_img([f"coadd_{png}.png"], f"coadd {key}",
                                 f"coadd {key} ({relative})"))
            else:
                body.append(f'<p><a href="{_href("..", relative)}">{_e(relative)}</a> '
                            "(no preview)</p>")
            if (out / f"weight_{png}.png").exists():
                body.append(_img([f"weight_{png}.png"], f"noise and exposure maps {key}",
                                 f"ERR and EXPMAP {key}: sky scatter in units of ERR"))
        body.append("</div>")
        errors = [f"{k}: {v['error']}" for k, v in run_plots.items()
                  if isinstance(v, dict) and "error" in v]
        for err in errors:
            body.append(f'<p class="bad">picture failed: {_e(err)}</p>')
    else:
        body.append('<p class="bad">no coadd was written</p>')
    extra = []
    if (out / "colour.png").exists() and len(coadds) >= 3:
        info = run_plots.get("colour") or {}
        extra.append(_img(["colour.png"], "colour composite",
                          "colour composite " + " ".join(
                              f"{k}={v}" for k, v in (info.get("filters") or {}).items())))
    if (out / "overlay.png").exists():
        info = run_plots.get("overlay") or {}
        caption = "two-colour overlay: reference frame (magenta) and an aligned frame (green)"
        if info.get("reference"):
            caption += f": {info['reference']} / {info.get('aligned', '')}"
        extra.append(_img(["overlay.png"], "two-colour overlay", caption))
    if extra:
        body.append("<h2>Alignment and colour</h2>")
        body.append('<div class="gallery">' + "".join(extra) + "</div>")

    body.append(_lightcurves_html(run_dir))

    # across frames
    body.append("<h2>Across frames</h2>")
    body.append(f'<p id="groups">groups of comparable frames (filter / telescope-instrument '
                f"/ night): {_e('; '.join(groups))}</p>")
    if (out / "summary.png").exists() and "error" not in (summary or {}):
        body.append('<div class="gallery">' + _img(["summary.png"], "summary plots",
                    "QA of every frame, night by night, with each group's median and "
                    "robust-sigma bands; flagged frames ringed red", wide=True) + "</div>")
    if zero_points and "error" not in zero_points:
        body.append('<div class="gallery" id="zero-points">' + _img(
            ["zero_points.png"], "zero points", "each frame's zero point against time and "
            "airmass, per filter and site (manifest zp, zp_err)", wide=True) + "</div>")
    body.append(f'<p>{len(outliers)} frame(s) flagged (more than {OUTLIER_SIGMA:g} robust '
                f"sigmas from their group's median, on the bad side): listed in "
                f'<a href="{_href(SUGGESTED_EXCLUDE)}">{SUGGESTED_EXCLUDE}</a>, which '
                "<code>--exclude-file</code> reads as it is.</p>")
    if outliers:
        body.append('<ul id="flagged">' + "".join(
            f'<li><a href="#{_e("frame-" + name)}">{_e(name)}</a>: {_e("; ".join(why))}</li>'
            for name, why in outliers.items()) + "</ul>")

    # frames that need a look: failed first, then flagged
    order = frame_order(table, outliers)
    attention = [i for i in order if status[i] not in ("ok", EXCLUDED)] + [
        i for i in order if status[i] in ("ok", EXCLUDED) and str(table["name"][i]) in outliers]
    if attention:
        body.append("<h2>Frames to look at</h2>")
        for i in attention[:max_attention]:
            name = str(table["name"][i])
            failed = status[i] not in ("ok", EXCLUDED)
            why = _text(table["reason"][i]) if failed else "; ".join(outliers[name])
            body.append(f'<div class="frame"><h3>{_e(name)}: '
                        f'<span class="{"bad" if failed else "warn"}">'
                        f"{_e(status[i] if failed else 'flagged')}</span> {_e(why)}</h3>")
            pics = plots.get(name)
            for kind in ("sources", "residuals"):
                fname = pics.files.get(kind) if pics else None
                if fname and (frames_dir / fname).exists():
                    body.append(_img([FRAMES_DIR, fname], f"{name} {kind}"))
            body.append("</div>")
        if len(attention) > max_attention:
            body.append(f"<p>... and {len(attention) - max_attention} more in the table "
                        "below.</p>")

    # every frame
    body.append("<h2>Frames</h2>")
    body.append('<p class="controls"><input id="filter-text" type="search" '
                'placeholder="filter: any text of a row (name, group, why ...)"> '
                '<select id="filter-status"><option value="all">all frames</option>'
                '<option value="attention">failed and flagged</option>'
                '<option value="failed">failed</option><option value="flagged">flagged'
                '</option><option value="excluded">excluded</option>'
                '<option value="ok">the others</option></select> '
                '<span id="filter-count"></span></p>')
    body.append(f'<p class="meta">Click a heading to sort (the worst frames first). '
                "Full-size pictures are drawn for failed and flagged frames; for any other: "
                f"<code>daskstack report {_e(run_dir)} --frame NAME</code> "
                "(or <code>--all-pictures</code>).</p>")
    # no zero point anywhere (daskstack measures none yet): no empty column
    columns = [c for c in _TABLE_COLUMNS if c[1] != "zp" or qa.has_zero_points(rows)]
    head = "".join(f'<th data-key="{key}" data-type="{kind}" data-bad="{bad}">{_e(label)}</th>'
                   for label, key, kind, bad in columns)
    table_rows = []
    for i in order:
        name = str(table["name"][i])
        pics = plots.get(name)
        links = []
        for kind in ("sources", "residuals"):
            fname = pics.files.get(kind) if pics else None
            if fname and (frames_dir / fname).exists():
                links.append(f'<a href="{_href(FRAMES_DIR, fname)}">{kind}</a>')
        field_name = _text(table["field"][i]) if "field" in table.colnames else ""
        wcs_name = f"{field_name}/{name}.wcs" if field_name else f"{name}.wcs"
        if (run_dir / wcs_name).exists():
            links.append(f'<a href="{_href("..", wcs_name)}">wcs</a>')
        if pics and pics.error:
            links.append(f'<span class="bad">{_e(pics.error)}</span>')
        failed = status[i] not in ("ok", EXCLUDED)
        cls = ("failed" if failed else "outlier" if name in outliers
               else "excluded" if status[i] == EXCLUDED else "ok")
        why = _text(table["reason"][i])
        if name in outliers:
            why = (why + "; " if why else "") + "flagged: " + "; ".join(outliers[name])
        picture = (_href(FRAMES_DIR, pics.files["sources"]) if pics and "sources" in pics.files
                   and (frames_dir / pics.files["sources"]).exists() else None)
        table_rows.append(_frame_row(i, rows[name], cls, why, thumbnails.get(name), links,
                                     picture, columns))
    body.append(f'<table id="frames"><thead><tr>{head}</tr></thead><tbody>'
                + "\n".join(table_rows) + "</tbody></table>")
    body.append(f"<script>{_TABLE_SCRIPT}</script>")

    body.append("<h2>Parameters</h2>")
    body.append(_settings_html(run_info))
    body.append(f'<p class="meta">manifest: <a href="{_href("..", "manifest.ecsv")}">'
                "manifest.ecsv</a></p>")

    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{_CSS}</style>"
            f"<script>{_SCRIPT}</script></head>\n<body>\n" + "\n".join(b for b in body if b)
            + "\n</body></html>\n")
    path = out / "index.html"
    atomic_write_text(path, page)
    return path
