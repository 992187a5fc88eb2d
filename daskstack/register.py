"""Registration: one frame onto the output grid, tile by tile (pure computation, no I/O).

`reproject` is the engine: `reproject_interp`, `reproject_adaptive` and
`reproject_exact` on each output tile. For bilinear/bicubic interpolation there is a
fast path beside it, because most of reproject_interp's time goes into evaluating
the full WCS chain (output pixel -> sky -> input pixel, with SIP inversion) at every
output pixel, while the interpolation itself is cheap. Like SWarp, the fast path
evaluates the exact mapping on a coarse mesh, interpolates it with a bicubic spline,
**checks** it against the exact mapping at the points where interpolation is worst
(mesh cell centres and a random sample) and falls back to reproject when the error
exceeds ``mapping_tolerance_px`` (or when anything in the fast path fails). The interpolation then uses the same edge and NaN
conventions as reproject, so results agree with reproject to float precision.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from astropy.wcs import WCS
from astropy.wcs.utils import proj_plane_pixel_area
from scipy.interpolate import RectBivariateSpline
from scipy.ndimage import map_coordinates

from .frames import quiet_astropy
from .grid import Grid

__all__ = [
    "RegisteredTile",
    "exact_mapping",
    "frame_tiles",
    "mesh_mapping",
    "register_frame",
]

log = logging.getLogger(__name__)

ORDERS = {"nearest-neighbor": 0, "bilinear": 1, "biquadratic": 2, "bicubic": 3}
AREA_TOLERANCE = 0.01  # pixel-area ratios closer to 1 than this are taken as 1


@dataclass
class RegisteredTile:
    """One output tile of one frame: data (float32, NaN = no data) and footprint (0..1)."""

    y0: int
    x0: int
    data: np.ndarray
    footprint: np.ndarray
    mapping: str  # "mesh", "exact" or the reproject function used
    mapping_error_px: float  # measured max error of the mesh mapping (0 for exact)


def exact_mapping(grid_wcs: WCS, frame_wcs: WCS, x, y):
    """Input-frame pixel coordinates of output-grid pixels (0-based), through the sky."""
    with quiet_astropy():
        world = grid_wcs.pixel_to_world_values(x, y)
        return frame_wcs.world_to_pixel_values(*world)


def mesh_mapping(grid_wcs, frame_wcs, y0, x0, shape, step):
    """A bicubic spline of the pixel mapping over one tile, from a mesh of exact points.

    Returns a function ``(ys, xs) -> (x_in, y_in)`` on the grid ``ys`` x ``xs``
    (output pixel coordinates, 1-D, ascending).
    """
    ny, nx = shape
    mesh_y = _mesh_nodes(y0, ny, step)
    mesh_x = _mesh_nodes(x0, nx, step)
    gx, gy = np.meshgrid(mesh_x, mesh_y)
    mx, my = exact_mapping(grid_wcs, frame_wcs, gx, gy)
    if not (np.all(np.isfinite(mx)) and np.all(np.isfinite(my))):
        return None
    # RectBivariateSpline's first axis is mesh_y: its "kx" is the degree along y
    k_y = min(3, len(mesh_y) - 1)
    k_x = min(3, len(mesh_x) - 1)
    spline_x = RectBivariateSpline(mesh_y, mesh_x, mx, kx=k_y, ky=k_x)
    spline_y = RectBivariateSpline(mesh_y, mesh_x, my, kx=k_y, ky=k_x)

    def evaluate(ys, xs, grid=True):
        return spline_x(ys, xs, grid=grid), spline_y(ys, xs, grid=grid)

    return evaluate, mesh_y, mesh_x


def _mesh_nodes(start, size, step):
    """Evenly spaced nodes spanning ``size`` pixels, at most ``step`` apart, at least 4 so
    a cubic spline fits. A tile narrower than 4 px (the edge tile of a grid 1-3 px longer
    than a multiple of the tile) gets nodes 1 px apart reaching past its far edge: the
    mapping is defined there too, and the spline is only evaluated inside the tile."""
    count = max(4, int(np.ceil((size - 1) / step)) + 1)
    span = max(size - 1, count - 1)
    return np.linspace(start, start + span, count, dtype=float)


def _mapping_error(evaluate, grid_wcs, frame_wcs, mesh_y, mesh_x, rng) -> float:
    """Max distance (px) between spline and exact mapping where the spline is worst."""
    cy = (mesh_y[:-1] + mesh_y[1:]) / 2 if len(mesh_y) > 1 else mesh_y
    cx = (mesh_x[:-1] + mesh_x[1:]) / 2 if len(mesh_x) > 1 else mesh_x
    gx, gy = np.meshgrid(cx, cy)
    ys = np.concatenate([gy.ravel(), rng.uniform(mesh_y[0], mesh_y[-1], 64)])
    xs = np.concatenate([gx.ravel(), rng.uniform(mesh_x[0], mesh_x[-1], 64)])
    sx, sy = evaluate(ys, xs, grid=False)
    ex, ey = exact_mapping(grid_wcs, frame_wcs, xs, ys)
    return float(np.nanmax(np.hypot(sx - ex, sy - ey)))


def _interpolate(image: np.ndarray, x_in: np.ndarray, y_in: np.ndarray, order: int):
    """Sample ``image`` at (x_in, y_in) with reproject's conventions.

    Pixel values live at pixel centres; points in the outer half of a border pixel
    take the border value; points outside the image are NaN; NaN pixels spread to
    every output pixel that touches them (so bad pixels never enter the coadd).
    """
    ny, nx = image.shape
    coords = np.array([y_in.ravel(), x_in.ravel()])
    for axis, size in enumerate((ny, nx)):
        c = coords[axis]
        c[(c < 0) & (c >= -0.5)] = 0
        c[(c < size - 0.5) & (c >= size - 1)] = size - 1
    out = map_coordinates(image, coords, order=order, cval=np.nan, mode="constant",
                          prefilter=order > 1)
    outside = np.zeros(coords.shape[1], dtype=bool)
    for axis, size in enumerate((ny, nx)):
        outside |= (coords[axis] < -0.5) | (coords[axis] > size - 0.5)
    out[outside] = np.nan
    return out.reshape(x_in.shape)


def frame_tiles(frame_wcs: WCS, frame_shape, grid: Grid, tile: int) -> list[tuple[int, int]]:
    """Origins ``(y0, x0)`` of the output tiles that the frame overlaps."""
    ny, nx = frame_shape
    n = 32
    edge = np.linspace(-0.5, 1, n)
    xs = np.concatenate([edge * nx - 0.5, np.full(n, nx - 0.5), edge[::-1] * nx - 0.5,
                         np.full(n, -0.5)])
    ys = np.concatenate([np.full(n, -0.5), edge * ny - 0.5, np.full(n, ny - 0.5),
                         edge[::-1] * ny - 0.5])
    xs = np.clip(xs, -0.5, nx - 0.5)
    ys = np.clip(ys, -0.5, ny - 0.5)
    with quiet_astropy():
        world = frame_wcs.pixel_to_world_values(xs, ys)
        gx, gy = grid.wcs.world_to_pixel_values(*world)
    ok = np.isfinite(gx) & np.isfinite(gy)
    if not ok.any():
        return []
    gny, gnx = grid.shape
    x_lo = max(int(np.floor(gx[ok].min())) - 1, 0)
    x_hi = min(int(np.ceil(gx[ok].max())) + 1, gnx - 1)
    y_lo = max(int(np.floor(gy[ok].min())) - 1, 0)
    y_hi = min(int(np.ceil(gy[ok].max())) + 1, gny - 1)
    if x_lo > x_hi or y_lo > y_hi:
        return []
    return [(ty * tile, tx * tile)
            for ty in range(y_lo // tile, y_hi // tile + 1)
            for tx in range(x_lo // tile, x_hi // tile + 1)]


def register_frame(
    data: np.ndarray,
    mask: np.ndarray | None,
    frame_wcs: WCS,
    grid: Grid,
    settings,
    *,
    conserve_flux: bool = True,
    seed: int = 0,
) -> Iterator[RegisteredTile]:
    """Reproject one frame onto ``grid``, yielding the output tiles it overlaps.

    Parameters
    ----------
    data, mask : ndarray
        The frame's pixels and bad-pixel mask (True = bad); bad pixels become NaN
        before interpolation, so they and their interpolation neighbours are left out.
    frame_wcs : WCS
        The frame's (solved) WCS.
    grid : Grid
        The output grid.
    settings : RegisterSettings
        ``method`` (interp/adaptive/exact), ``order``, ``tile``, ``fast_mapping``,
        ``mapping_tolerance_px``.
    conserve_flux : bool
        Multiply by (output pixel area / input pixel area) so that values are
        electrons per *output* pixel: frames of different binning or cameras then
        add up. Applied when the areas differ by more than ``AREA_TOLERANCE``: the
        ~1e-4 scatter of solved pixel scales of one camera is fit noise, and leaving
        it alone keeps same-camera stacks equal to the tutorial's method.
    """
    image = np.array(data, dtype=np.float32, copy=True)
    if mask is not None:
        image[mask] = np.nan
    grid_wcs = grid.wcs
    area_ratio = 1.0
    if conserve_flux:
        area_ratio = float(proj_plane_pixel_area(grid_wcs.celestial)
                           / proj_plane_pixel_area(frame_wcs.celestial))
        if abs(area_ratio - 1.0) <= AREA_TOLERANCE:
            area_ratio = 1.0
    rng = np.random.default_rng(seed)
    tile = settings.tile
    gny, gnx = grid.shape
    for y0, x0 in frame_tiles(frame_wcs, image.shape, grid, tile):
        shape = (min(tile, gny - y0), min(tile, gnx - x0))
        result = _register_tile(image, frame_wcs, grid_wcs, y0, x0, shape, settings, rng)
        if result is None:
            continue
        out, footprint, how, error = result
        if not np.any(footprint > 0):
            continue
        if area_ratio != 1.0:
            out *= np.float32(area_ratio)
        yield RegisteredTile(y0, x0, out.astype(np.float32, copy=False),
                             footprint.astype(np.float32, copy=False), how, error)


def _register_tile(image, frame_wcs, grid_wcs, y0, x0, shape, settings, rng):
    order = ORDERS[settings.order]
    if settings.method == "interp" and settings.fast_mapping:
        try:
            fast = _mesh_tile(image, frame_wcs, grid_wcs, y0, x0, shape, settings, order, rng)
        except Exception as err:  # noqa: BLE001
            # the fast path is only an acceleration of the exact one: whatever breaks it
            # (a spline that cannot be built, a WCS that misbehaves off the frame) must
            # cost speed, never a tile; say so, since it points at a bug to fix
            log.warning("fast mapping failed for tile (%d, %d) (%s: %s); exact path",
                        y0, x0, type(err).__name__, err)
            fast = None
        if fast is not None:
            return fast
        log.debug("mesh mapping error too large for tile (%d, %d); exact path", y0, x0)
    return _reproject_tile(image, frame_wcs, grid_wcs, y0, x0, shape, settings, order)


def _mesh_tile(image, frame_wcs, grid_wcs, y0, x0, shape, settings, order, rng):
    """One tile through the checked mesh mapping; None when the mesh is not accurate
    enough (or not finite) even at a finer step."""
    step = 64
    for _attempt in range(2):
        mesh = mesh_mapping(grid_wcs, frame_wcs, y0, x0, shape, step)
        if mesh is None:
            return None
        evaluate, mesh_y, mesh_x = mesh
        error = _mapping_error(evaluate, grid_wcs, frame_wcs, mesh_y, mesh_x, rng)
        if error <= settings.mapping_tolerance_px:
            ys = np.arange(y0, y0 + shape[0], dtype=float)
            xs = np.arange(x0, x0 + shape[1], dtype=float)
            x_in, y_in = evaluate(ys, xs)
            out = _interpolate(image, x_in, y_in, order)
            return out, np.isfinite(out).astype(np.float32), "mesh", error
        step //= 4
    return None


def _reproject_tile(image, frame_wcs, grid_wcs, y0, x0, shape, settings, order):
    """One tile through reproject itself (the reference path)."""
    from reproject import reproject_adaptive, reproject_exact, reproject_interp

    tile_wcs = grid_wcs[y0:y0 + shape[0], x0:x0 + shape[1]]
    with quiet_astropy():
        if settings.method == "interp":
            out, footprint = reproject_interp((image, frame_wcs), tile_wcs, shape_out=shape,
                                              order=order)
            name = "reproject_interp"
        elif settings.method == "adaptive":
            out, footprint = reproject_adaptive((image, frame_wcs), tile_wcs, shape_out=shape,
                                                conserve_flux=False, boundary_mode="strict")
            name = "reproject_adaptive"
        else:
            out, footprint = reproject_exact((image, frame_wcs), tile_wcs, shape_out=shape)
            name = "reproject_exact"
    out = np.asarray(out, dtype=np.float32)
    footprint = np.asarray(footprint, dtype=np.float32)
    footprint[~np.isfinite(out)] = 0
    return out, footprint, name, 0.0
