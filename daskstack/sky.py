"""The sky of a frame: the one 2-D background of the package, and the sky models that
``--background`` chooses from (pure numpy / scipy, no I/O).

`background_map` is what detection measures the sky and its noise with
(`daskstack.detect`) and what registration removes from each frame with
``--background 2d`` (`BACKGROUNDS`, `subtract_sky`, called by the pipeline before a
frame is resampled; its noise model is made from the frame with its sky).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ._stats import clipped_rows as _clipped_stats

__all__ = ["BACKGROUNDS", "Background", "background_map", "subtract_sky"]


def _interp_matrix(n_out: int, n_mesh: int, box: float, extrapolate: bool = False
                   ) -> np.ndarray:
    """(n_out, n_mesh) bilinear weights from mesh centres ((k + 0.5) box) to pixels;
    beyond the outermost centres constant, or with ``extrapolate`` linear."""
    pos = (np.arange(n_out) + 0.5) / box - 0.5
    if not extrapolate:
        pos = np.clip(pos, 0, n_mesh - 1)
    lo = np.clip(np.floor(pos).astype(int), 0, max(n_mesh - 2, 0))
    frac = pos - lo
    w = np.zeros((n_out, n_mesh), np.float32)
    rows = np.arange(n_out)
    w[rows, lo] += (1 - frac).astype(np.float32)
    if n_mesh > 1:
        w[rows, lo + 1] += frac.astype(np.float32)
    else:
        w[:, 0] = 1.0
    return w


def background_map(data: np.ndarray, mask: np.ndarray, box: int, *,
                   extrapolate: bool = False):
    """Sky and sky RMS maps of a frame: sigma-clipped median / std on a coarse mesh of
    ``box`` x ``box`` pixels, bilinear between the box centres; beyond the outermost
    centres (the frame's outer half boxes) constant, or with ``extrapolate`` linear, so
    that a sky gradient is followed to the frame's edges (a constant there is off by
    half a box of the gradient, which shows as a step where the frame ends in a coadd).

    The one 2-D background of the package: detection uses it, and registration removes
    it from each frame with ``--background 2d`` (`BACKGROUNDS`).
    As ``photutils.background.Background2D`` with a median estimator, std RMS,
    ``exclude_percentile=50`` and a 3 x 3 median filter of the mesh, but vectorised
    over all boxes and on a 2 x 2 strided subsample of each box (>= 256 pixels per
    box), with the mesh interpolated by two small matrix products: ~10x faster on a
    4096 x 4096 frame. ``mask``: True = bad pixel, left out.
    """
    ny, nx = data.shape
    box = int(max(16, min(box, ny // 2 if ny >= 32 else ny, nx // 2 if nx >= 32 else nx)))
    nby, nbx = max(1, ny // box), max(1, nx // box)
    by, bx = ny // nby, nx // nbx
    step = 2 if by * bx >= 1024 else 1
    blocks = data[:nby * by, :nbx * bx].reshape(nby, by, nbx, bx)[:, ::step, :, ::step]
    bmask = mask[:nby * by, :nbx * bx].reshape(nby, by, nbx, bx)[:, ::step, :, ::step]
    vals = np.where(bmask, np.nan, blocks).astype(np.float32)
    vals = vals.transpose(0, 2, 1, 3).reshape(nby * nbx, -1)
    med, std, n_used = _clipped_stats(vals)
    good_frac = np.isfinite(vals).mean(axis=1)
    bad_box = (good_frac < 0.5) | (n_used < 3)
    if bad_box.all():
        good = data[~mask]
        if good.size == 0:
            raise ValueError("no unmasked pixels for the background")
        m = float(np.median(good))
        r = float(1.4826 * np.median(np.abs(good - m)))
        return np.full(data.shape, m, np.float32), np.full(data.shape, r, np.float32)
    med = med.reshape(nby, nbx)
    std = std.reshape(nby, nbx)
    bad_box = bad_box.reshape(nby, nbx)
    if bad_box.any():  # excluded boxes: the nearest good box
        _, (iy, ix) = ndimage.distance_transform_edt(bad_box, return_indices=True)
        med = med[iy, ix]
        std = std[iy, ix]
    if nby >= 3 or nbx >= 3:
        size = (min(3, nby), min(3, nbx))
        med = ndimage.median_filter(med, size=size, mode="nearest")
        std = ndimage.median_filter(std, size=size, mode="nearest")
    wy = _interp_matrix(ny, nby, by, extrapolate)
    wx = _interp_matrix(nx, nbx, bx, extrapolate)
    bkg = wy @ med.astype(np.float32) @ wx.T
    rms = wy @ std.astype(np.float32) @ wx.T
    return bkg.astype(np.float32), rms.astype(np.float32)


@dataclass(frozen=True)
class Background:
    """How a frame's sky is removed (``--background NAME``).

    sky_map : ``(data, mask, mesh_px) -> sky`` that registration subtracts from the frame
        before resampling it (its noise model is made from the frame with its sky), or
        None: the frame is registered with its sky.
    combine_subtracts : the combine removes one level per frame, the frame's measured
        sky (``--subtract-background``, the default; ``--keep-background`` keeps it).
    """

    sky_map: Callable | None
    combine_subtracts: bool


def _mesh_sky(data, mask, mesh_px):
    # linear beyond the outermost mesh centres: a gradient is followed to the frame's
    # edges, where frames dithered against each other end inside the coadd
    sky, _ = background_map(data, mask, mesh_px, extrapolate=True)
    return sky


# The choices of --background. A new sky model is one entry (plus its tests).
BACKGROUNDS = {
    "constant": Background(None, True),  # one level per frame, removed by the combine
    "2d": Background(_mesh_sky, False),  # a smooth mesh per frame, removed before resampling
    "none": Background(None, False),  # the sky stays (as --keep-background)
}


def subtract_sky(data: np.ndarray, mask: np.ndarray | None, background: str,
                 mesh_px: int) -> np.ndarray:
    """``data`` without the sky that ``background`` (a key of `BACKGROUNDS`) removes
    before registration (``data`` itself when it removes none there)."""
    model = BACKGROUNDS[background]
    if model.sky_map is None:
        return data
    bad = ~np.isfinite(data) if mask is None else (np.asarray(mask, bool) | ~np.isfinite(data))
    return (data - model.sky_map(np.where(bad, 0, data), bad, mesh_px)).astype(np.float32)


