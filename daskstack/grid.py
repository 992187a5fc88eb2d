"""The output grid: one celestial WCS and array shape that every frame is registered onto.

Three choices, as a user of the tutorial expects them:

- ``reference``: the pixel grid of one frame (the tutorial reprojects onto its first frame);
- ``optimal``: the smallest TAN grid covering all frames
  (`reproject.mosaicking.find_optimal_celestial_wcs`), optionally with a given pixel
  scale, rotation and shape;
- a FITS file or text header the user supplies.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import astropy.units as u
import numpy as np
from astropy.io import fits
from astropy.wcs import WCS
from astropy.wcs.utils import proj_plane_pixel_scales

from .errors import DaskstackError
from .frames import FrameError, quiet_astropy

__all__ = ["Grid", "GridError", "grid_from_file", "make_grid", "optimal_grid", "reference_grid"]


class GridError(DaskstackError, ValueError):
    """No output grid can be made from the inputs and options."""


@dataclass(frozen=True)
class Grid:
    """An output grid: shape ``(ny, nx)`` and a celestial WCS (kept as header text: picklable)."""

    shape: tuple[int, int]
    header_text: str

    @property
    def wcs(self) -> WCS:
        with quiet_astropy():
            wcs = WCS(fits.Header.fromstring(self.header_text), relax=True)
        wcs.array_shape = self.shape
        return wcs

    @property
    def header(self) -> fits.Header:
        header = fits.Header.fromstring(self.header_text)
        header.remove("MJDREF", ignore_missing=True)  # astropy writes 0; no time axis here
        header["NAXIS"] = 2
        header["NAXIS1"] = self.shape[1]
        header["NAXIS2"] = self.shape[0]
        return header

    @property
    def pixel_scale_arcsec(self) -> float:
        return float(np.sqrt(np.prod(proj_plane_pixel_scales(self.wcs.celestial))) * 3600.0)

    @property
    def fingerprint(self) -> str:
        """A short hash of shape + WCS: a resumed run reuses a store only on the same grid."""
        text = f"{self.shape}|{self.header_text}".encode()
        return hashlib.sha256(text).hexdigest()[:16]

    @classmethod
    def from_wcs(cls, wcs: WCS, shape) -> Grid:
        header = wcs.celestial.to_header(relax=True)
        for key in ("DATE-OBS", "MJD-OBS", "DATE-BEG", "DATE-END", "MJD-BEG", "MJD-END",
                    "DATEREF", "MJDREFI", "MJDREFF", "TIMESYS"):
            header.remove(key, ignore_missing=True, remove_all=True)
        ny, nx = (int(n) for n in shape)
        if ny < 1 or nx < 1:
            raise GridError(f"grid shape {shape} is empty")
        return cls(shape=(ny, nx), header_text=header.tostring())


def reference_grid(wcs: WCS, shape) -> Grid:
    """The pixel grid of a reference frame (the tutorial's choice)."""
    return Grid.from_wcs(wcs, shape)


def optimal_grid(
    footprints,
    *,
    pixel_scale_arcsec: float = 0.0,
    rotation_deg: float = 0.0,
    shape: tuple[int, int] | None = None,
) -> Grid:
    """The TAN grid that covers every frame, north up, rotated by ``rotation_deg``.

    Parameters
    ----------
    footprints : iterable of (shape, WCS)
        The frames' array shapes ``(ny, nx)`` and their (solved) WCSs.
    pixel_scale_arcsec : float
        Output pixel scale; 0 takes the finest scale of the inputs, so frames with
        different binning or cameras keep their detail.
    rotation_deg : float
        Position angle of the output +y axis, east of north.
    shape : (ny, nx), optional
        Force the output shape, centred on the optimal grid's centre.
    """
    from reproject.mosaicking import find_optimal_celestial_wcs

    footprints = [(tuple(s), w) for s, w in footprints]
    if not footprints:
        raise GridError("no frames to build an optimal grid from")
    resolution = pixel_scale_arcsec * u.arcsec if pixel_scale_arcsec > 0 else None
    with quiet_astropy():
        wcs, out_shape = find_optimal_celestial_wcs(footprints, resolution=resolution)
    if rotation_deg:
        wcs = _rotated(wcs, out_shape, footprints, rotation_deg)
        out_shape = _covering_shape(wcs, footprints)
    if shape is not None:
        centre = (np.array(out_shape[::-1], dtype=float) - 1) / 2.0
        world_centre = wcs.pixel_to_world_values(*centre)
        wcs.wcs.crval = [float(v) for v in world_centre]
        wcs.wcs.crpix = [(shape[1] + 1) / 2.0, (shape[0] + 1) / 2.0]
        out_shape = shape
    return Grid.from_wcs(wcs, out_shape)


def _rotated(wcs: WCS, shape, footprints, rotation_deg: float) -> WCS:
    theta = np.deg2rad(rotation_deg)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    new = wcs.deepcopy()
    new.wcs.pc = rot @ new.wcs.get_pc()
    return new


def _covering_shape(wcs: WCS, footprints) -> tuple[int, int]:
    """Re-centre ``wcs`` (in place) on the frames' corners and return the covering shape."""
    corners = []
    for (ny, nx), frame_wcs in footprints:
        x = np.array([-0.5, nx - 0.5, nx - 0.5, -0.5])
        y = np.array([-0.5, -0.5, ny - 0.5, ny - 0.5])
        ra, dec = frame_wcs.pixel_to_world_values(x, y)
        corners.append(np.array(wcs.world_to_pixel_values(ra, dec)))
    xy = np.hstack(corners)
    lo = np.floor(xy.min(axis=1) + 0.5)
    hi = np.ceil(xy.max(axis=1) + 0.5)
    wcs.wcs.crpix = wcs.wcs.crpix - lo
    return int(hi[1] - lo[1]), int(hi[0] - lo[0])


def grid_from_file(path) -> Grid:
    """A grid from a FITS file (its first HDU with a celestial WCS) or a text header."""
    path = Path(path)
    try:
        with quiet_astropy():
            if path.suffix.lower() in (".txt", ".hdr", ".head"):
                header = fits.Header.fromtextfile(path)
            else:
                header = None
                with fits.open(path) as hdul:
                    for hdu in hdul:
                        if "CTYPE1" in hdu.header:
                            header = hdu.header.copy()
                            break
                if header is None:
                    raise GridError(f"{path.name}: no HDU with a WCS")
            wcs = WCS(header, naxis=2, relax=True)
    except (OSError, ValueError) as err:
        raise GridError(f"{path.name}: cannot read a grid WCS ({err})") from None
    # image size: NAXISn, fpack's ZNAXISn, or IMAGEH/IMAGEW (astrometry.net .wcs files)
    shape = (header.get("ZNAXIS2") or header.get("NAXIS2") or header.get("IMAGEH", 0),
             header.get("ZNAXIS1") or header.get("NAXIS1") or header.get("IMAGEW", 0))
    if not wcs.has_celestial:
        raise GridError(f"{path.name}: the header has no celestial WCS")
    if not shape[0] or not shape[1]:
        raise GridError(f"{path.name}: the header gives no NAXIS1/NAXIS2 for the grid shape")
    return Grid.from_wcs(wcs, shape)


def make_grid(footprints, settings, names=None) -> Grid:
    """The output grid chosen by ``settings`` (a `daskstack.config.GridSettings`).

    ``footprints`` are ``(shape, WCS)`` of the solved frames in input order;
    ``names`` their frame names, used to find ``settings.reference``.
    """
    footprints = list(footprints)
    method = settings.method
    if method == "reference":
        if not footprints:
            raise GridError("no solved frame to take the reference grid from")
        index = 0
        if settings.reference:
            if names is None or settings.reference not in names:
                raise GridError(f"reference frame {settings.reference!r} is not among the "
                                "solved frames")
            index = list(names).index(settings.reference)
        shape, wcs = footprints[index]
        return reference_grid(wcs, shape)
    if method == "optimal":
        return optimal_grid(footprints, pixel_scale_arcsec=settings.pixel_scale_arcsec,
                            rotation_deg=settings.rotation_deg, shape=settings.shape)
    try:
        return grid_from_file(method)
    except FrameError as err:
        raise GridError(str(err)) from None
