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

Kernels and noise
-----------------
Interpolation kernels are rows of `KERNELS`: reproject's spline orders (nearest,
bilinear, biquadratic, bicubic: the data go through ``map_coordinates`` exactly as in
``reproject_interp``) and Lanczos (``lanczos2``, ``lanczos3``: SWarp's default;
reproject has none), all with reproject's edge and NaN conventions (`_interpolate`).
A frame's variance (`daskstack.noise`) is resampled with the *squared* weights of the
kernel that resampled its data: an output pixel ``sum_k w_k I_k`` has variance
``sum_k w_k**2 V_k`` (`_resample`; for the spline orders ``w`` is the spline's
cardinal kernel, prefilter included). That is the scatter of single output pixels;
neighbours now share input pixels, so the variance of a sum over an aperture is
``noise_correlation(kernel)`` times the sum of the pixel variances (recorded as
``NOISECOR`` in the coadd header). ``sum_k w_k**2`` itself (the kernel power, 1/4 to 1
for bilinear as the sub-pixel offset varies) is kept too: the variance divided by it is
the input noise, which is what inverse-variance weights of a coadd must use (weights
from the smoothed variance would favour the frames that happen to be smoothed most). ``reproject_interp`` cannot return the weights, so
with a variance the exact path evaluates the exact mapping at every output pixel and
feeds it to the same sampler as the fast path. For the flux-conserving methods
(adaptive, exact) the variance is reprojected as the data are: the input noise per
output-pixel area, right for apertures (``NOISECOR`` = 1), above the scatter of single
pixels.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache

import numpy as np
from astropy.wcs import WCS
from astropy.wcs.utils import proj_plane_pixel_area
from scipy.interpolate import BSpline, RectBivariateSpline
from scipy.ndimage import map_coordinates

from .frames import quiet_astropy
from .grid import Grid

__all__ = [
    "KERNELS",
    "Kernel",
    "RegisteredTile",
    "exact_mapping",
    "frame_tiles",
    "mesh_mapping",
    "noise_correlation",
    "register_frame",
]

log = logging.getLogger(__name__)

AREA_TOLERANCE = 0.01  # pixel-area ratios closer to 1 than this are taken as 1


@dataclass(frozen=True)
class Kernel:
    """A separable interpolation kernel: ``weight(distance_px)`` along each axis, nonzero
    within ``radius`` taps on each side. ``spline_order``: the ``map_coordinates``
    order that interpolates the data (reproject's own), None for kernels applied here.
    ``squared``: for a spline-order kernel of at most two taps an axis, ``position ->
    (position', power)`` such that its own interpolation at ``position'`` times
    ``power`` is the sum of the squared weights at ``position`` times the values (the
    variance is then sampled by ``map_coordinates`` too, not tap by tap); None: taps."""

    radius: int
    weight: Callable[[np.ndarray], np.ndarray]
    spline_order: int | None = None
    squared: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None
    # ``(image, x_in, y_in, variance) -> (data, variance, power)``: a compiled sampler
    # doing `_interpolate`'s work for this kernel in one pass (same data, bit for bit)
    sampler: Callable | None = None


def _box(d):
    return ((d > -0.5) & (d <= 0.5)).astype(np.float64)


def _triangle(d):
    return np.clip(1.0 - np.abs(d), 0.0, None)


def _same_pixel(position):
    """Nearest neighbour: the one weight is 1, so is its square."""
    return position, np.ones_like(position)


def _triangle_squared(position):
    """Bilinear: weights ``1 - f`` and ``f`` at fraction ``f``; ``(1 - f)**2 a + f**2 b``
    is ``power`` times the linear interpolation at fraction ``f**2 / power``, ``power =
    (1 - f)**2 + f**2``."""
    base = np.floor(position)
    fraction = position - base
    square = fraction * fraction
    power = square + (1.0 - fraction) ** 2
    return base + square / power, power


def _lanczos(a: int):
    """``sinc(d) sinc(d / a)`` for ``|d| < a``, tabulated every 1/1024 px (linear
    interpolation is within 1e-6 of it, and twice as fast as evaluating it)."""
    distance = np.linspace(-a, a, 2 * a * 1024 + 1)
    table = np.sinc(distance) * np.sinc(distance / a)

    def weight(d):
        return np.interp(d, distance, table, left=0.0, right=0.0)
    return weight


def _cardinal_spline(order: int, radius: int):
    """The weights a spline of ``order`` (with its prefilter, as map_coordinates and
    reproject interpolate) gives each input pixel: the response to a unit impulse,
    tabulated. It decays as 0.27**k (cubic), so ``radius`` taps hold all but ~1e-5 of
    the squared weights."""
    n = 4 * radius
    impulse = np.zeros(2 * n + 1)
    impulse[n] = 1.0
    distance = np.linspace(-radius, radius, 2 * radius * 512 + 1)
    table = map_coordinates(impulse, [n + distance], order=order, mode="mirror")

    def weight(d):
        return np.interp(d, distance, table, left=0.0, right=0.0)
    return weight


def _compiled_bilinear(image, x_in, y_in, variance):
    # imported here: only the processes that register frames load numba
    from ._compiled import bilinear_sample

    return bilinear_sample(image, x_in, y_in, variance)


# The kernels --order takes. A new kernel is one entry (plus its tests).
KERNELS = {
    "nearest-neighbor": Kernel(1, _box, 0, _same_pixel),
    "bilinear": Kernel(1, _triangle, 1, _triangle_squared, _compiled_bilinear),
    "biquadratic": Kernel(4, _cardinal_spline(2, 4), 2),
    "bicubic": Kernel(4, _cardinal_spline(3, 4), 3),
    "lanczos2": Kernel(2, _lanczos(2)),
    "lanczos3": Kernel(3, _lanczos(3)),
}


def _taps(kernel: Kernel, position: np.ndarray, size: int):
    """Indices (clipped into the image, as reproject's border rule) and normalised
    weights of the ``2 * radius`` taps around each position, along one axis."""
    first = np.floor(position).astype(np.intp) - kernel.radius + 1
    index = [first + k for k in range(2 * kernel.radius)]
    weights = [kernel.weight(position - i) for i in index]
    total = np.sum(weights, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        weights = [w / total for w in weights]
    return [np.clip(i, 0, size - 1) for i in index], weights


@cache
def noise_correlation(order: str) -> float:
    """Variance of a sum over a large aperture / the sum of its pixel variances, for images
    resampled with the kernel ``order`` at random sub-pixel offsets and combined:
    ``1 / mean(sum_k w_k**2)`` over offsets, the two axes multiplied (1 for nearest,
    bilinear (3/2)**2 = 2.25). One frame at offset f has ``1 / sum_k w_k(f)**2``; in a
    coadd each frame enters the summed ``ERR**2`` with its ``sum_k w_k**2``, so the
    mean of those, not of their inverses, is what the coadd's factor is. Multiply an
    aperture's summed ``ERR**2`` by it."""
    kernel = KERNELS[order]
    offsets = (np.arange(4096) + 0.5) / 4096
    _, weights = _taps(kernel, offsets, 10**6)
    return float(1.0 / np.mean(np.sum(np.square(weights), axis=0)) ** 2)


@dataclass
class RegisteredTile:
    """One output tile of one frame: data (float32, NaN = no data), footprint (0..1) and,
    when a variance was given, the variance (float32, NaN where data is NaN) and the
    kernel power ``sum_k w_k**2`` (float32; 1 for flux-conserving reprojection)."""

    y0: int
    x0: int
    data: np.ndarray
    footprint: np.ndarray
    mapping: str  # "mesh", "exact" or the reproject function used
    mapping_error_px: float  # measured max error of the mesh mapping (0 for exact)
    variance: np.ndarray | None = None
    kernel_power: np.ndarray | None = None


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
        if grid:
            return _on_grid(spline_x, ys, xs, k_y, k_x), _on_grid(spline_y, ys, xs, k_y, k_x)
        return spline_x(ys, xs, grid=False), spline_y(ys, xs, grid=False)

    return evaluate, mesh_y, mesh_x


def _on_grid(spline: RectBivariateSpline, ys, xs, k_y: int, k_x: int) -> np.ndarray:
    """``spline(ys, xs)`` on the grid ``ys`` x ``xs`` (inside the spline's nodes) as two
    matrix products, ``B_y C B_x^T`` with the B-spline design matrices: the same tensor
    spline as fitpack evaluates (to ~1e-12 px), about five times faster on a tile,
    because fitpack recomputes the basis of every row for every column."""
    t_y, t_x, coefficients = spline.tck
    basis_y = BSpline.design_matrix(ys, t_y, k_y).toarray()
    basis_x = BSpline.design_matrix(xs, t_x, k_x).toarray()
    coefficients = coefficients.reshape(basis_y.shape[1], basis_x.shape[1])
    return basis_y @ coefficients @ basis_x.T


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


def _border_convention(coords: np.ndarray, shape) -> np.ndarray:
    """reproject's edges, in place on ``coords`` (2, n: y then x): points in the outer half
    of a border pixel take the border value; returns the points outside the image."""
    outside = np.zeros(coords.shape[1], dtype=bool)
    for axis, size in enumerate(shape):
        c = coords[axis]
        c[(c < 0) & (c >= -0.5)] = 0
        c[(c < size - 0.5) & (c >= size - 1)] = size - 1
        outside |= (c < -0.5) | (c > size - 0.5)
    return outside


def _interpolate(image: np.ndarray, x_in: np.ndarray, y_in: np.ndarray, order: str,
                 variance: np.ndarray | None = None):
    """Sample ``image`` (and its ``variance``) at (x_in, y_in) with reproject's
    conventions; returns ``(data, variance, kernel power)``, the last two None without
    ``variance``.

    Pixel values live at pixel centres; points in the outer half of a border pixel
    take the border value; points outside the image are NaN; NaN pixels spread to
    every output pixel whose kernel weighs them (so bad pixels never enter the coadd).
    """
    kernel = KERNELS[order]
    if kernel.sampler is not None:
        return kernel.sampler(image, x_in, y_in, variance)
    coords = np.array([y_in.ravel(), x_in.ravel()], dtype=np.float64)
    outside = _border_convention(coords, image.shape)
    if kernel.spline_order is not None:
        out = map_coordinates(image, coords, order=kernel.spline_order, cval=np.nan,
                              mode="constant", prefilter=kernel.spline_order > 1)
    else:
        out, _ = _resample(image, coords, kernel, False)
    out[outside] = np.nan
    if variance is None:
        return out.reshape(x_in.shape), None, None
    if kernel.squared is not None:
        out_var, power = _resample_squared(variance, coords, kernel)
        # a fraction within rounding of 1 puts the shifted position on the next pixel
        # centre, whose NaN (at weight 0) then spreads where the data's did not: those
        # few points tap by tap
        redo = np.isnan(out_var) & np.isfinite(out)
        if redo.any():
            out_var[redo], power[redo] = _resample(variance, coords[:, redo], kernel, True)
    else:
        out_var, power = _resample(variance, coords, kernel, True)
    out_var[outside | ~np.isfinite(out)] = np.nan
    return (out.reshape(x_in.shape), out_var.reshape(x_in.shape),
            power.reshape(x_in.shape))


def _resample_squared(variance: np.ndarray, coords: np.ndarray, kernel: Kernel):
    """`_resample` with ``squared`` for a kernel with `Kernel.squared`: one
    ``map_coordinates`` pass at shifted positions (the same taps as the data's, so the
    same NaN spreading) instead of a gather per tap in float64."""
    shifted = np.empty_like(coords)
    power = np.ones(coords.shape[1])
    for axis in range(coords.shape[0]):
        shifted[axis], axis_power = kernel.squared(coords[axis])
        power *= axis_power
    out = map_coordinates(variance, shifted, order=kernel.spline_order, cval=np.nan,
                          mode="constant", prefilter=False)
    power = power.astype(np.float32)
    out *= power
    return out, power


def _resample(image: np.ndarray, coords: np.ndarray, kernel: Kernel, squared: bool):
    """``sum_k w_k image_k`` (or with ``squared``, ``sum_k w_k**2 image_k``: a variance)
    over the kernel's taps around each point of ``coords`` (2, n), and the sum of the
    weights used (``sum_k w_k**2`` with ``squared``), both float32. A NaN pixel with a
    nonzero weight makes the point NaN. Taps beyond the edge repeat the border pixel."""
    ny, nx = image.shape
    rows, wy = _taps(kernel, coords[0], ny)
    cols, wx = _taps(kernel, coords[1], nx)
    flat = image.ravel()
    out = np.zeros(coords.shape[1], np.float64)
    total = np.zeros(coords.shape[1], np.float64)
    for row, w_row in zip(rows, wy, strict=True):
        for col, w_col in zip(cols, wx, strict=True):
            w = w_row * w_col
            if squared:
                w = w * w
            value = flat[row * nx + col]
            out += np.where(w != 0, w * value, 0.0)
            total += w
    return out.astype(np.float32), total.astype(np.float32)


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
    variance: np.ndarray | None = None,
    copy: bool = True,
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
        ``method`` (interp/adaptive/exact), ``order`` (a key of `KERNELS`), ``tile``,
        ``fast_mapping``, ``mapping_tolerance_px``.
    conserve_flux : bool
        Multiply by (output pixel area / input pixel area) so that values are
        electrons per *output* pixel: frames of different binning or cameras then
        add up. Applied when the areas differ by more than ``AREA_TOLERANCE``: the
        ~1e-4 scatter of solved pixel scales of one camera is fit noise, and leaving
        it alone keeps same-camera stacks equal to the tutorial's method.
    variance : ndarray, optional
        The frame's variance (`daskstack.noise.frame_variance`); NaN = no weight, and
        such pixels are treated as bad. Resampled with the squared kernel weights (see
        the module docstring) into ``RegisteredTile.variance``, scaled by the squared
        area ratio with `conserve_flux`.
    copy : bool
        False: ``data``, when it is float32 already, becomes the working image, its bad
        pixels set to NaN in place (saves a frame-sized copy for a caller that has no
        further use for the pixels).
    """
    image = np.array(data, dtype=np.float32, copy=True) if copy else \
        np.asarray(data, dtype=np.float32)
    if mask is not None:
        image[mask] = np.nan
    if variance is not None:
        variance = np.asarray(variance, dtype=np.float32)
        image[~np.isfinite(variance)] = np.nan
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
        result = _register_tile(image, variance, frame_wcs, grid_wcs, y0, x0, shape,
                                settings, rng)
        if result is None:
            continue
        out, out_var, power, footprint, how, error = result
        if not np.any(footprint > 0):
            continue
        if area_ratio != 1.0:
            out *= np.float32(area_ratio)
            if out_var is not None:
                out_var *= np.float32(area_ratio**2)
        yield RegisteredTile(y0, x0, out.astype(np.float32, copy=False),
                             footprint.astype(np.float32, copy=False), how, error,
                             out_var, power)


def _register_tile(image, variance, frame_wcs, grid_wcs, y0, x0, shape, settings, rng):
    if settings.method == "interp" and settings.fast_mapping:
        try:
            fast = _mesh_tile(image, variance, frame_wcs, grid_wcs, y0, x0, shape, settings,
                              rng)
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
    if settings.method == "interp" and (variance is not None
                                        or KERNELS[settings.order].spline_order is None):
        return _exact_tile(image, variance, frame_wcs, grid_wcs, y0, x0, shape,
                           settings.order)
    return _reproject_tile(image, variance, frame_wcs, grid_wcs, y0, x0, shape, settings)


STRIP_POINTS = 65536  # output pixels sampled at once: their temporaries stay in cache


def _interpolate_in_strips(image, x_in, y_in, order, variance):
    """`_interpolate` over strips of rows of a tile: each output pixel is sampled on its
    own, so the result is the same, but the float64 temporaries of a strip are reused
    from the heap and stay in the cache (those of a whole tile are page-faulted)."""
    ny, nx = x_in.shape
    rows = max(1, STRIP_POINTS // max(nx, 1))
    if ny <= rows or KERNELS[order].sampler is not None:  # a compiled sampler needs none
        return _interpolate(image, x_in, y_in, order, variance)
    planes = [np.empty((ny, nx), np.float32) for _ in range(1 if variance is None else 3)]
    for y0 in range(0, ny, rows):
        strip = slice(y0, y0 + rows)
        parts = _interpolate(image, x_in[strip], y_in[strip], order, variance)
        for plane, part in zip(planes, parts[:len(planes)], strict=True):
            plane[strip] = part
    return (planes[0], None, None) if variance is None else tuple(planes)


def _sampled_tile(image, variance, x_in, y_in, order, how, error):
    out, out_var, power = _interpolate_in_strips(image, x_in, y_in, order, variance)
    return out, out_var, power, np.isfinite(out).astype(np.float32), how, error


def _mesh_tile(image, variance, frame_wcs, grid_wcs, y0, x0, shape, settings, rng):
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
            return _sampled_tile(image, variance, x_in, y_in, settings.order, "mesh", error)
        step //= 4
    return None


def _exact_tile(image, variance, frame_wcs, grid_wcs, y0, x0, shape, order):
    """One tile through the exact mapping at every output pixel (what reproject_interp
    computes), sampled as the fast path samples: for the kernels reproject lacks and
    for the variance, whose squared weights reproject cannot give."""
    gy, gx = np.mgrid[y0:y0 + shape[0], x0:x0 + shape[1]].astype(float)
    x_in, y_in = exact_mapping(grid_wcs, frame_wcs, gx, gy)
    return _sampled_tile(image, variance, np.asarray(x_in, float), np.asarray(y_in, float),
                         order, "exact", 0.0)


def _reproject_tile(image, variance, frame_wcs, grid_wcs, y0, x0, shape, settings):
    """One tile through reproject itself (the reference path); the variance, if any, is
    reprojected as the data are (see the module docstring)."""
    from reproject import reproject_adaptive, reproject_exact, reproject_interp

    tile_wcs = grid_wcs[y0:y0 + shape[0], x0:x0 + shape[1]]

    def project(values):
        with quiet_astropy():
            if settings.method == "interp":
                return reproject_interp((values, frame_wcs), tile_wcs, shape_out=shape,
                                        order=KERNELS[settings.order].spline_order), \
                    "reproject_interp"
            if settings.method == "adaptive":
                return reproject_adaptive((values, frame_wcs), tile_wcs, shape_out=shape,
                                          conserve_flux=False, boundary_mode="strict"), \
                    "reproject_adaptive"
            return reproject_exact((values, frame_wcs), tile_wcs, shape_out=shape), \
                "reproject_exact"

    (out, footprint), name = project(image)
    out = np.asarray(out, dtype=np.float32)
    footprint = np.asarray(footprint, dtype=np.float32)
    footprint[~np.isfinite(out)] = 0
    out_var = power = None
    if variance is not None:
        (out_var, _), _ = project(variance)
        out_var = np.asarray(out_var, dtype=np.float32)
        out_var[~np.isfinite(out)] = np.nan
        power = np.ones_like(out_var)
    return out, out_var, power, footprint, name, 0.0
