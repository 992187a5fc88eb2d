"""Sky levels matched across a mosaic's overlaps, so that no seam shows in its coadd.

Frames of different pointings are taken at different times, airmasses and moon
distances: their sky levels differ, and a coadd of them shows a step where one frame's
coverage ends. As Montage's background modelling (``mBgModel``) and reproject's
``reproject_and_coadd(match_background=True)`` do, each pair of overlapping frames
gives the median difference of their values over the overlap, and one additive
correction per frame is solved from all the pairs by least squares:

    minimise  sum over pairs (i, j) of  w_ij (d_ij - (c_i - c_j))**2

with ``w_ij`` the number of overlap pixels measured. The corrections are defined up to
a constant per connected group of frames; the minimum-norm solution (LSQR from zero)
makes them sum to zero in each group, so the coadd keeps the frames' mean sky level.
(reproject's own solver, ``solve_corrections_sgd``, is private to reproject, draws
from numpy's global random state, so two combines of the same store would differ, and
weighs a corner overlap like a whole side: hence this weighted, deterministic one.)

Pure functions of arrays: `daskstack._pipeline` reads the overlaps block by block
from the store and calls them.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ALL_PAIRS_UP_TO", "MAX_PIXELS", "MIN_OVERLAP_PIXELS", "PAIRS_PER_FRAME",
           "overlap_differences", "solve_offsets"]

MIN_OVERLAP_PIXELS = 64  # a pair measured on fewer pixels (in one block) says too little
ALL_PAIRS_UP_TO = 16  # frames over one block: up to this many, every overlapping pair
# beyond (a deep stack on an optimal grid), each frame with the frames it overlaps most:
# the pairs still connect every frame, at a cost linear in the frames
PAIRS_PER_FRAME = 8
MAX_PIXELS = 16384  # per pair and block: the median of the differences is then ~1 % sigma


def overlap_differences(values: np.ndarray, frames, stride: int = 2) -> list:
    """``[(i, j, median(values_i - values_j), n pixels)]`` over the pixels where both
    frames have a finite value, for the overlapping pairs of the stack ``values``
    ``(k, ty, tx)`` (scaled as the combine scales them; NaN where a frame gives
    nothing); ``frames`` names the k frames (their indices in the whole stack). Every
    ``stride``-th pixel in each axis is used, at most `MAX_PIXELS` per pair (the sky is
    smooth; the noise averages out)."""
    sub = np.asarray(values)[:, ::stride, ::stride].reshape(len(values), -1)
    finite = np.isfinite(sub)
    k = sub.shape[0]
    shared = finite.astype(np.float32) @ finite.T.astype(np.float32)
    np.fill_diagonal(shared, 0)
    if k <= ALL_PAIRS_UP_TO:
        pairs = {(a, b) for a in range(k) for b in range(a + 1, k)}
    else:
        pairs = set()
        for a in range(k):
            for b in np.argsort(-shared[a], kind="stable")[:PAIRS_PER_FRAME]:
                pairs.add((min(a, int(b)), max(a, int(b))))
    out = []
    for a, b in sorted(pairs):
        if shared[a, b] < MIN_OVERLAP_PIXELS:
            continue
        both = np.flatnonzero(finite[a] & finite[b])
        if both.size > MAX_PIXELS:
            both = both[:: both.size // MAX_PIXELS + 1]
        out.append((int(frames[a]), int(frames[b]),
                    float(np.median(sub[a, both] - sub[b, both])), int(both.size)))
    return out


def solve_offsets(pairs, n: int) -> np.ndarray:
    """Additive corrections ``c`` (length ``n``) to subtract from each frame so that
    overlapping frames agree: the weighted least-squares solution of ``c_i - c_j =
    d_ij`` over ``pairs`` ``(i, j, d_ij, weight)``, the same pair measured in several
    blocks counted once per block. Frames in no pair get 0."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import lsqr

    pairs = [p for p in pairs if p[0] != p[1] and np.isfinite(p[2]) and p[3] > 0]
    if not pairs:
        return np.zeros(n)
    rows = np.arange(len(pairs))
    i = np.array([p[0] for p in pairs])
    j = np.array([p[1] for p in pairs])
    d = np.array([p[2] for p in pairs], dtype=np.float64)
    sqrt_w = np.sqrt(np.array([p[3] for p in pairs], dtype=np.float64))
    matrix = coo_matrix((np.concatenate([sqrt_w, -sqrt_w]),
                         (np.concatenate([rows, rows]), np.concatenate([i, j]))),
                        shape=(len(pairs), n)).tocsr()
    solution = lsqr(matrix, d * sqrt_w, atol=1e-12, btol=1e-12, iter_lim=20 * n + 100)[0]
    return solution
