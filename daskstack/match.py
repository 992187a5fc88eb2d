"""Point-set matching: a similarity transform between detections and catalog stars.

Pure geometry (numpy + scipy.spatial), no astropy WCS. Both point sets are in
pixel-like units: ``src`` are detected pixel positions (usually relative to the
frame centre), ``ref`` are catalog positions projected onto a tangent plane and
divided by the nominal pixel scale. The transform maps ``src`` onto ``ref``::

    ref = A @ src + t,    A = s * R(theta) * F,    F = diag(1, -1) if flipped else I

with any rotation ``theta`` (0-360 deg), a scale ``s`` within a given range, an
optional flip (parity change) and an offset ``|t| <= max_offset``.

Method
------
1. **Triangle asterisms.** All triangles of the brightest points of each set
   (iterative deepening: a few bright points first, more if that fails) are
   described by invariants of similarity *and* reflection (the side ratios
   ``L1/L0``, ``L2/L0`` of the sorted sides ``L0 >= L1 >= L2``). A KD-tree finds
   triangle pairs with close invariants; because the scale is known to within
   ``scale_range``, the longest sides must agree too, and each pair gives a
   candidate transform, discarded unless its scale, parity and offset are allowed.
   Triangles are enumerated with numpy (no Python loop per triangle); the reference
   triangles live in a `TriangleIndex` that builds each depth tier once and extends
   it ring by ring when the search radius grows, so repeated calls reuse them.
2. **Voting / verification.** Every candidate is applied to the bright detections
   and scored by the number of catalog stars within a verification radius
   (KD-tree). The best candidates are refined by iterative nearest-neighbour
   matching with a least-squares similarity fit and sigma clipping.
3. **Significance.** The number of matches is compared with what chance gives: with
   ``lambda`` matches expected at random (catalog density x match area x
   detections) and ``n_trials`` independent transforms in the search space, the
   false-alarm probability ``1 - exp(-n_trials * P(Poisson(lambda) >= n))`` (the
   chance that at least one of the trials does as well; never above 1) must be below
   ``max_false_alarm`` and ``n >= min_matches``. Otherwise `MatchError` is raised
   with the reason: thin evidence gives no transform rather than a wrong one.
   A caller that searches one frame several times (deeper star lists, wider search
   radii) passes the number of searches it may make as ``n_searches``: the
   probability is multiplied by it (Bonferroni), so that ``max_false_alarm`` bounds
   the chance of a false match over all the searches of the frame, not of each one.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
from scipy.spatial import cKDTree

from ._stats import clip_residuals
from .errors import DaskstackError

__all__ = [
    "MatchError",
    "MatchResult",
    "Transform",
    "TriangleIndex",
    "find_shift",
    "find_transform",
    "fit_shift_rotation",
    "format_probability",
    "fit_similarity",
    "nn_match",
    "refine_match",
    "triangle_invariants",
]

log = logging.getLogger(__name__)


class MatchError(DaskstackError, RuntimeError):
    """No trustworthy transform; ``reason`` is one line saying why."""

    def __init__(self, reason: str, best: MatchResult | None = None):
        self.reason = reason
        self.best = best
        super().__init__(reason)


@dataclass
class Transform:
    """``ref = matrix @ src + offset`` (a similarity, possibly with a flip)."""

    matrix: np.ndarray
    offset: np.ndarray

    def __post_init__(self):
        self.matrix = np.asarray(self.matrix, float).reshape(2, 2)
        self.offset = np.asarray(self.offset, float).reshape(2)

    def __call__(self, xy) -> np.ndarray:
        xy = np.asarray(xy, float).reshape(-1, 2)
        return xy @ self.matrix.T + self.offset

    def inverse(self) -> Transform:
        inv = np.linalg.inv(self.matrix)
        return Transform(inv, -inv @ self.offset)

    @property
    def flip(self) -> bool:
        return bool(np.linalg.det(self.matrix) < 0)

    @property
    def scale(self) -> float:
        return float(np.sqrt(abs(np.linalg.det(self.matrix))))

    @property
    def rotation_deg(self) -> float:
        """Rotation angle (deg, 0-360) of the similarity, after the flip (if any)."""
        m = self.matrix @ (np.diag([1.0, -1.0]) if self.flip else np.eye(2))
        return float(np.degrees(np.arctan2(m[1, 0], m[0, 0])) % 360.0)


@dataclass
class MatchResult:
    """A transform and the matched pairs that support it.

    ``src_idx[k]`` matches ``ref_idx[k]``; ``rms`` is in ref units; ``n_expected``
    is the number of matches that chance alone would give; ``log10_false_alarm`` is
    log10 of the false-alarm probability ``1 - exp(-n_trials * P(Poisson(n_expected)
    >= n_matches))``, at most 0.
    """

    transform: Transform
    src_idx: np.ndarray
    ref_idx: np.ndarray
    rms: float
    radius: float
    n_expected: float = float("nan")
    log10_false_alarm: float = float("nan")
    meta: dict = field(default_factory=dict)

    @property
    def n_matches(self) -> int:
        return int(len(self.src_idx))


def _poisson_logsf(n: int, lam: float) -> float:
    """log P(X >= n) for X ~ Poisson(lam) (0 for n = 0). scipy.stats is imported here,
    not with the module: it is slow to import, and every worker process imports this
    module while only a solve calls this."""
    if n <= 0:
        return 0.0
    from scipy import stats

    return float(stats.poisson.logsf(n - 1, lam))


# -- small fits --------------------------------------------------------------------------
def fit_similarity(src, ref, flip: bool = False, weights=None) -> Transform:
    """Least-squares similarity (Umeyama) mapping ``src`` to ``ref``; ``flip`` forces parity."""
    src = np.asarray(src, float)
    ref = np.asarray(ref, float)
    if flip:
        src = src * np.array([1.0, -1.0])
    w = np.ones(len(src)) if weights is None else np.asarray(weights, float)
    w = w / w.sum()
    ms = (w[:, None] * src).sum(0)
    mr = (w[:, None] * ref).sum(0)
    s0 = src - ms
    r0 = ref - mr
    # complex-number form: r = a * s, a = s*exp(i theta)
    zs = s0[:, 0] + 1j * s0[:, 1]
    zr = r0[:, 0] + 1j * r0[:, 1]
    denom = (w * np.abs(zs) ** 2).sum()
    a = (w * zr * np.conj(zs)).sum() / denom if denom > 0 else 1.0 + 0j
    m = np.array([[a.real, -a.imag], [a.imag, a.real]])
    if flip:
        m = m @ np.diag([1.0, -1.0])
        t = mr - m @ (ms * np.array([1.0, -1.0]))
    else:
        t = mr - m @ ms
    return Transform(m, t)


def nn_match(src_xy, ref_tree: cKDTree, radius: float):
    """One-to-one nearest-neighbour pairs within ``radius``.

    Each source takes its nearest reference; a reference claimed by several
    sources keeps only the closest. Returns ``(src_idx, ref_idx, dist)``.
    """
    src_xy = np.asarray(src_xy, float).reshape(-1, 2)
    if len(src_xy) == 0 or ref_tree.n == 0:
        empty = np.zeros(0, int)
        return empty, empty, np.zeros(0)
    dist, idx = ref_tree.query(src_xy, k=1, distance_upper_bound=radius)
    ok = np.isfinite(dist)
    si = np.nonzero(ok)[0]
    ri = idx[ok]
    d = dist[ok]
    order = np.argsort(d)
    _, first = np.unique(ri[order], return_index=True)
    keep = np.sort(order[first])
    return si[keep], ri[keep], d[keep]


# -- triangles --------------------------------------------------------------------------
def _all_triangles(n: int) -> np.ndarray:
    """(m, 3) int32: every (i < j < k) of ``range(n)`` (numpy, no Python loop per triangle)."""
    if n < 3:
        return np.zeros((0, 3), np.int32)
    i, j = np.triu_indices(n, 1)
    # for each pair (i, j): every k > j
    cnt = n - 1 - j
    e = np.repeat(np.arange(len(i)), cnt)
    first = np.cumsum(cnt) - cnt
    k = np.arange(cnt.sum()) - np.repeat(first, cnt) + np.repeat(j + 1, cnt)
    return np.column_stack([i[e], j[e], k]).astype(np.int32)


def _local_triangles(xy: np.ndarray, max_side: float) -> np.ndarray:
    """(m, 3) int32: every (i < j < k) of ``xy`` whose three sides are all <= ``max_side``.

    The pairs within ``max_side`` come from a KD-tree; every pair (i, j) is extended by
    the neighbours k > j of j, and kept if (i, k) is a pair too (a sorted-key lookup):
    all in numpy, no Python loop per pair or triangle.
    """
    n = len(xy)
    pairs = cKDTree(xy).query_pairs(max_side, output_type="ndarray").astype(np.int64)
    if len(pairs) == 0:
        return np.zeros((0, 3), np.int32)
    pairs = np.sort(pairs, axis=1)
    pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
    i, j = pairs[:, 0], pairs[:, 1]
    keys = i * n + j  # ascending
    indptr = np.searchsorted(i, np.arange(n + 1))
    cnt = indptr[j + 1] - indptr[j]  # pairs (j, k) with k > j
    total = int(cnt.sum())
    if total == 0:
        return np.zeros((0, 3), np.int32)
    e = np.repeat(np.arange(len(i)), cnt)
    first = np.cumsum(cnt) - cnt
    k = pairs[np.repeat(indptr[j], cnt) + np.arange(total) - np.repeat(first, cnt), 1]
    q = i[e] * n + k
    pos = np.minimum(np.searchsorted(keys, q), len(keys) - 1)
    ok = keys[pos] == q
    return np.column_stack([i[e][ok], j[e][ok], k[ok]]).astype(np.int32)


def triangle_invariants(xy: np.ndarray, max_side: float = np.inf, min_ratio: float = 0.1):
    """All triangles of ``xy``: invariants, vertex order and longest side.

    Vertices are ordered (A, B, C) with A opposite the shortest side, B opposite
    the middle one and C opposite the longest, so that corresponding triangles
    list corresponding stars. Invariants are ``(L1/L0, L2/L0)``, invariant under
    rotation, scale, translation and reflection. Triangles with a longest side
    above ``max_side`` or too flat (``L2/L0 < min_ratio``) are dropped.

    Returns ``(inv (m, 2), verts (m, 3) int, l0 (m,), orient (m,) +-1)``.
    """
    xy = np.asarray(xy, float)
    n = len(xy)
    if n < 3:
        return np.zeros((0, 2)), np.zeros((0, 3), int), np.zeros(0), np.zeros(0)
    if np.isfinite(max_side) and n > 30:
        comb = _local_triangles(xy, max_side)
    else:
        comb = _all_triangles(n)
    return _invariants_of(xy, comb, max_side, min_ratio)


def _invariants_of(xy, comb, max_side=np.inf, min_ratio: float = 0.1):
    """`triangle_invariants` of the given vertex triples ``comb`` ((m, 3) indices of ``xy``)."""
    if len(comb) == 0:
        return np.zeros((0, 2)), np.zeros((0, 3), int), np.zeros(0), np.zeros(0)
    p = xy[comb]  # (m, 3, 2)
    # side opposite vertex k: between the other two
    s0 = np.hypot(*(p[:, 1] - p[:, 2]).T)
    s1 = np.hypot(*(p[:, 0] - p[:, 2]).T)
    s2 = np.hypot(*(p[:, 0] - p[:, 1]).T)
    sides = np.column_stack([s0, s1, s2])
    order = np.argsort(sides, axis=1)  # ascending: vertex opposite the shortest first
    sorted_sides = np.take_along_axis(sides, order, axis=1)
    l0 = sorted_sides[:, 2]
    with np.errstate(invalid="ignore", divide="ignore"):
        inv = np.column_stack([sorted_sides[:, 1] / l0, sorted_sides[:, 0] / l0])
    verts = np.take_along_axis(comb, order, axis=1)
    keep = (l0 <= max_side) & (inv[:, 1] >= min_ratio) & np.isfinite(inv).all(axis=1)
    verts = verts[keep]
    q = xy[verts]
    cross = ((q[:, 1, 0] - q[:, 0, 0]) * (q[:, 2, 1] - q[:, 0, 1])
             - (q[:, 1, 1] - q[:, 0, 1]) * (q[:, 2, 0] - q[:, 0, 0]))
    return inv[keep], verts, l0[keep], np.sign(cross)


class TriangleIndex:
    """Triangles of a reference point set, built once and queried many times.

    ``rank`` orders the points by depth (default: their index, i.e. brightness
    order); the triangles of the points with ``rank < n_ref`` (a *tier*) within a
    distance ``radius`` of the origin are built on first use and kept. A larger radius
    later only adds the triangles that reach beyond the radius already built (a new
    *chunk*), so that a solve widening its search (more detections, a larger radius)
    never builds the same catalog triangles twice. Each chunk's invariants and longest
    sides sit in a KD-tree in which the allowed scale range is a box (the longest sides
    of corresponding triangles must agree within it).
    """

    def __init__(self, ref, scale_range=(0.95, 1.05), max_side: float = np.inf, rank=None,
                 tol: float = 0.008):
        self.ref = np.asarray(ref, float).reshape(-1, 2)
        self.rank = (np.arange(len(self.ref), dtype=float) if rank is None
                     else np.asarray(rank, float))
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.max_side = float(max_side)
        self.tol = float(tol)
        lo, hi = np.log(self.scale_range[0]), np.log(self.scale_range[1])
        self._lcentre = 0.5 * (lo + hi)
        self._lhalf = 0.5 * (hi - lo) + 0.01
        self._tiers: dict = {}
        self.tree = cKDTree(self.ref) if len(self.ref) else None
        self._radius = np.hypot(self.ref[:, 0], self.ref[:, 1])
        self.n_built = 0  # triangles built so far (all tiers and chunks)

    def chunks(self, n_ref: float, radius: float = np.inf):
        """The chunks ``(inv, verts, l0, orient, far, tree)`` of tier ``n_ref`` up to ``radius``."""
        key = float(n_ref)
        built_r, chunks = self._tiers.get(key, (-1.0, []))
        if radius > built_r:
            pts = np.nonzero((self.rank < n_ref) & (self._radius <= radius))[0]
            comb = (_local_triangles(self.ref[pts], self.max_side)
                    if np.isfinite(self.max_side) and len(pts) > 30 else _all_triangles(len(pts)))
            comb = pts[comb] if len(comb) else np.zeros((0, 3), int)
            if built_r >= 0 and len(comb):  # only the triangles that reach beyond built_r
                comb = comb[self._radius[comb].max(axis=1) > built_r]
            inv, verts, l0, orient = _invariants_of(self.ref, comb, self.max_side)
            coords = np.column_stack([inv / self.tol, np.log(np.maximum(l0, 1e-12))
                                      / self._lhalf])
            tree = cKDTree(coords) if len(coords) else None
            far = self._radius[verts].max(axis=1) if len(verts) else np.zeros(0)
            chunks = chunks + [(inv, verts, l0, orient, far, tree)]
            self._tiers[key] = (radius, chunks)
            self.n_built += len(inv)
        return chunks


def _candidates_from_triangles(src, ref_index: TriangleIndex, n_src, n_ref, allow_flip,
                               max_offset, max_side=np.inf, ref_radius=np.inf, cache=None):
    """Candidate transforms (as (k, 2, 2) matrices and (k, 2) offsets) from triangle pairs.

    Source triangles of the ``n_src`` first points of ``src`` are looked up in the
    reference tier ``n_ref`` of ``ref_index`` (box query: invariants within ``tol``,
    longest sides within the scale range); reference triangles with a vertex beyond
    ``ref_radius`` from the origin are not used. ``cache`` keeps the look-ups of each
    chunk for later calls with the same ``src``.
    """
    empty = np.zeros((0, 2, 2)), np.zeros((0, 2))
    scale_range = ref_index.scale_range
    cache = {} if cache is None else cache
    skey = ("src", n_src)
    if skey not in cache:
        cache[skey] = triangle_invariants(src[:n_src], max_side=max_side)
    s_inv, s_v, s_l0, s_or = cache[skey]
    if len(s_inv) == 0:
        return empty
    q = None
    parts_s, parts_r, parts_f = [], [], []
    for c, (_inv, r_verts, r_l0, r_or, far, tree) in enumerate(
            ref_index.chunks(n_ref, ref_radius)):
        key = (n_src, float(n_ref), c)
        if key not in cache:
            if tree is None:
                cache[key] = (np.zeros(0, int), np.zeros(0, int), np.zeros(0, bool))
            else:
                if q is None:
                    q = np.column_stack([s_inv / ref_index.tol,
                                         (np.log(np.maximum(s_l0, 1e-12)) + ref_index._lcentre)
                                         / ref_index._lhalf])
                pairs = cKDTree(q).sparse_distance_matrix(tree, 1.0, p=np.inf,
                                                          output_type="ndarray")
                si = pairs["i"].astype(np.int64)
                ri = pairs["j"].astype(np.int64)
                ratio = r_l0[ri] / s_l0[si]
                ok = (ratio >= scale_range[0]) & (ratio <= scale_range[1])
                flip = s_or[si] != r_or[ri]
                if not allow_flip:
                    ok &= ~flip
                cache[key] = (si[ok], ri[ok], flip[ok])
        si, ri, flip = cache[key]
        if np.isfinite(ref_radius):
            ok = far[ri] <= ref_radius
            si, ri, flip = si[ok], ri[ok], flip[ok]
        parts_s.append(s_v[si])
        parts_r.append(r_verts[ri])
        parts_f.append(flip)
    if not parts_s or sum(len(x) for x in parts_f) == 0:
        return empty
    flip = np.concatenate(parts_f)
    ps = src[np.concatenate(parts_s)]  # (k, 3, 2)
    pr = ref_index.ref[np.concatenate(parts_r)]
    sign = np.where(flip, -1.0, 1.0)
    ps_f = ps * np.stack([np.ones_like(sign), sign], axis=-1)[:, None, :]
    ms = ps_f.mean(axis=1)
    mr = pr.mean(axis=1)
    zs = (ps_f[..., 0] - ms[:, None, 0]) + 1j * (ps_f[..., 1] - ms[:, None, 1])
    zr = (pr[..., 0] - mr[:, None, 0]) + 1j * (pr[..., 1] - mr[:, None, 1])
    a = (zr * np.conj(zs)).sum(1) / (np.abs(zs) ** 2).sum(1)
    mats = np.empty((len(a), 2, 2))
    mats[:, 0, 0] = a.real
    mats[:, 0, 1] = -a.imag * sign
    mats[:, 1, 0] = a.imag
    mats[:, 1, 1] = a.real * sign
    offs = mr - np.einsum("kij,kj->ki", mats, ps.mean(axis=1))
    scale = np.abs(a)
    ok = (scale >= scale_range[0]) & (scale <= scale_range[1])
    ok &= np.hypot(offs[:, 0], offs[:, 1]) <= max_offset
    return mats[ok], offs[ok]


def _score(mats, offs, src_v, ref_tree, radius):
    """Number of verification sources with a reference within ``radius``, per candidate."""
    k = len(mats)
    counts = np.zeros(k, int)
    chunk = max(1, 200000 // max(len(src_v), 1))
    for start in range(0, k, chunk):
        m = mats[start:start + chunk]
        o = offs[start:start + chunk]
        pts = np.einsum("kij,nj->kni", m, src_v) + o[:, None, :]
        d, _ = ref_tree.query(pts.reshape(-1, 2), k=1, distance_upper_bound=radius)
        counts[start:start + chunk] = np.isfinite(d).reshape(len(m), -1).sum(1)
    return counts


# -- refinement & significance -------------------------------------------------------------
def refine_match(src, ref, transform: Transform, radius: float, *, ref_tree=None,
                 clip_sigma: float = 3.0, iterations: int = 6, start_radius=None,
                 keep_flip: bool = True) -> MatchResult:
    """Iterative nearest-neighbour matching with a similarity fit and sigma clipping.

    The matching radius shrinks from ``start_radius`` (default ``3 x radius``) to
    ``radius``; at each step the pairs are refitted and outliers beyond
    ``clip_sigma`` times the robust residual scatter (but never inside ``radius/3``)
    are dropped from the fit.
    """
    src = np.asarray(src, float)
    ref = np.asarray(ref, float)
    tree = ref_tree if ref_tree is not None else cKDTree(ref)
    flip = transform.flip
    r = float(start_radius if start_radius is not None else 3.0 * radius)
    t = transform
    si = ri = np.zeros(0, int)
    for it in range(iterations):
        si, ri, d = nn_match(t(src), tree, r)
        if len(si) < 3:
            break
        keep = np.ones(len(si), bool)
        for _ in range(3):
            t_new = fit_similarity(src[si[keep]], ref[ri[keep]], flip=flip if keep_flip else False)
            res = np.hypot(*(t_new(src[si]) - ref[ri]).T)
            new_keep = clip_residuals(res, clip_sigma, radius / 3.0, fit=keep)
            if new_keep.sum() < 3 or np.array_equal(new_keep, keep):
                keep = new_keep if new_keep.sum() >= 3 else keep
                break
            keep = new_keep
        t = t_new
        r = max(radius, r * 0.6) if it < iterations - 2 else radius
    si, ri, d = nn_match(t(src), tree, radius)
    rms = float(np.sqrt(np.mean(d**2))) if len(d) else float("nan")
    return MatchResult(t, si, ri, rms, radius)


def _log10_probability_of_any(log10_expected: float) -> float:
    """log10 of ``1 - exp(-10**log10_expected)``: the chance of at least one event when
    ``10**log10_expected`` are expected (Poisson); equal to ``log10_expected`` when small."""
    if log10_expected < -8:
        return log10_expected  # 1 - exp(-x) = x to 1e-8; and 10**x may underflow
    return float(math.log10(-math.expm1(-(10.0 ** min(log10_expected, 300.0)))))


def format_probability(log10_probability: float) -> str:
    """A probability for people: ``0.13``, ``0.021``, ``1e-5``, ``3e-120``."""
    if not math.isfinite(log10_probability):
        return "unknown"
    if log10_probability >= -2:
        return f"{10.0 ** log10_probability:.2g}"
    exponent = math.floor(log10_probability)
    mantissa = 10.0 ** (log10_probability - exponent)
    if round(mantissa) >= 10:
        mantissa, exponent = 1.0, exponent + 1
    return f"{round(mantissa):d}e{exponent:d}"


def _significance(result: MatchResult, src, ref, ref_tree, scale_range, allow_flip,
                  max_offset, n_src_used, n_searches: int = 1):
    """Fill ``n_expected`` and ``log10_false_alarm`` of a match (over ``n_searches``)."""
    r = result.radius
    pts = result.transform(src[:n_src_used])
    lo, hi = pts.min(0), pts.max(0)
    area = max((hi - lo).prod(), np.pi * r * r)
    inside = ((ref >= lo) & (ref <= hi)).all(1).sum()
    density = max(inside, 1) / area
    lam = n_src_used * density * np.pi * r * r
    n = result.n_matches
    extent = max(np.hypot(*(hi - lo)) / 2, 10 * r)
    off_area = np.pi * min(max_offset, 1e7) ** 2 if np.isfinite(max_offset) else 4 * area
    trials = max(off_area / (np.pi * r * r), 1.0)
    trials *= 2 * np.pi * extent / r  # rotations
    trials *= max(np.log(scale_range[1] / scale_range[0]) * extent / r, 1.0)
    trials *= 2 if allow_flip else 1
    trials *= max(int(n_searches), 1)  # Bonferroni over the searches made on the frame
    logsf = _poisson_logsf(n, lam)
    result.n_expected = float(lam)
    # expected number of chance matches this good among all trials; the probability
    # of at least one is 1 - exp(-expected), which reads as a probability (<= 1)
    log10_expected = float((logsf + math.log(trials)) / math.log(10))
    result.meta["log10_expected_false_matches"] = log10_expected
    result.log10_false_alarm = _log10_probability_of_any(log10_expected)
    result.meta["n_trials"] = float(trials)
    return result


def find_transform(src, ref, *, scale_range=(0.95, 1.05), allow_flip: bool = True,
                   max_offset: float = np.inf, match_radius: float = 3.0,
                   min_matches: int = 8, max_false_alarm: float = 1e-4,
                   clip_sigma: float = 3.0, levels=((12, 30), (20, 60), (30, 110), (40, 160)),
                   max_verify: int = 200, max_triangle_side: float = np.inf,
                   max_candidates: int = 3000, ref_index: TriangleIndex | None = None,
                   ref_radius: float = np.inf, cache: dict | None = None,
                   n_searches: int = 1) -> MatchResult:
    """Find the similarity that maps ``src`` onto ``ref`` (both sorted brightest first).

    Parameters
    ----------
    src : (n, 2) array
        Detected positions (pixels, e.g. relative to the frame centre), brightest first.
    ref : (m, 2) array
        Reference positions in the same units (tangent plane / nominal pixel scale),
        brightest first.
    scale_range : (lo, hi)
        Allowed scale of the transform (ref units per src unit).
    allow_flip : bool
        Also accept a mirrored transform (parity change).
    max_offset : float
        Largest allowed ``|t|`` (the image of ``src``'s origin in ref coordinates).
    match_radius : float
        Final matching radius (ref units).
    min_matches : int
        Fewer matched pairs: `MatchError`.
    max_false_alarm : float
        Largest accepted false-alarm probability of the match (see module notes).
    levels : sequence of (n_src, n_ref)
        Numbers of brightest points used for triangles, tried in turn.
    max_triangle_side : float
        Longest triangle side used (src units); limits the triangles of a large
        reference set to local ones (enumerated with a KD-tree).
    max_candidates : int
        Candidate transforms verified per level; beyond that, those of the cells of
        (flip, rotation, offset) proposed by most triangle pairs are kept.
    ref_index : TriangleIndex, optional
        Triangles of ``ref`` (built once, reused by repeated calls, e.g. a search that
        widens); its ``rank`` replaces the brightness index in ``levels``' ``n_ref``,
        its ``scale_range`` must equal ``scale_range``. Default: built here, with
        ``rank`` = index in ``ref``.
    ref_radius : float
        Only reference triangles whose vertices all lie within this distance of the
        origin of ``ref`` are used (the search area of this call).
    cache : dict, optional
        Triangle-pair look-ups kept between calls with the same ``src`` and
        ``ref_index`` (an empty dict to start).
    n_searches : int
        How many pattern searches the caller may make on this frame (this call being
        one of them): the false-alarm probability is multiplied by it (Bonferroni).

    Returns
    -------
    MatchResult

    Raises
    ------
    MatchError
        With the reason (too few points, no consistent pattern, not significant).
    """
    src = np.asarray(src, float).reshape(-1, 2)
    ref = np.asarray(ref, float).reshape(-1, 2)
    if len(src) < 3:
        raise MatchError(f"too few detections to match ({len(src)} < 3)")
    if len(ref) < 3:
        raise MatchError(f"too few reference stars to match ({len(ref)} < 3)")
    if ref_index is None:
        ref_index = TriangleIndex(ref, scale_range, max_side=max_triangle_side
                                  * scale_range[1] * 1.02)
    elif len(ref_index.ref) != len(ref):
        raise ValueError("ref_index was built for another reference set")
    ref_tree = ref_index.tree
    n_verify = min(len(src), max_verify)
    src_v = src[:n_verify]
    verify_radius = 3.0 * match_radius
    best: MatchResult | None = None
    tried = set()
    for n_s, n_r in levels:
        n_s = min(n_s, len(src))
        n_r = min(n_r, float(ref_index.rank.max()) + 1)
        if (n_s, n_r) in tried:
            continue
        tried.add((n_s, n_r))
        mats, offs = _candidates_from_triangles(src, ref_index, n_s, n_r, allow_flip,
                                                max_offset, max_side=max_triangle_side,
                                                ref_radius=ref_radius, cache=cache)
        if len(mats) == 0:
            continue
        if len(mats) > max_candidates:
            # vote: the true transform is proposed by many triangle pairs; keep the
            # candidates of the most popular (flip, rotation, offset) cells
            extent = max(float(np.ptp(src[:n_s], axis=0).max()), 1.0)
            rot = np.degrees(np.arctan2(mats[:, 1, 0], mats[:, 0, 0]))
            flipk = np.linalg.det(mats) < 0
            cell = max(4.0 * match_radius, 0.03 * extent)
            # one int64 key per (flip, 2-degree rotation bin, offset cell)
            cells = np.floor(offs / cell).astype(np.int64)
            cells -= cells.min(axis=0)
            span = int(cells.max()) + 1
            keys = ((flipk.astype(np.int64) * 181 + np.floor(rot / 2.0).astype(np.int64) + 90)
                    * span + cells[:, 0]) * span + cells[:, 1]
            _, inverse, votes = np.unique(keys, return_inverse=True, return_counts=True)
            top = np.argsort(-votes[inverse.ravel()], kind="stable")[:max_candidates]
            mats, offs = mats[top], offs[top]
        counts = _score(mats, offs, src_v[:80], ref_tree, verify_radius)
        order = np.argsort(counts)[::-1][:8]
        for k in order:
            if counts[k] < 3:
                break
            res = refine_match(src_v, ref, Transform(mats[k], offs[k]), match_radius,
                               ref_tree=ref_tree, clip_sigma=clip_sigma,
                               start_radius=verify_radius)
            if res.n_matches < 3:
                continue
            if np.hypot(*res.transform.offset) > max_offset or not (
                scale_range[0] * 0.99 <= res.transform.scale <= scale_range[1] * 1.01
            ):
                continue
            _significance(res, src, ref, ref_tree, scale_range, allow_flip, max_offset,
                          n_verify, n_searches)
            # ranked by the expected count: it still orders matches whose false-alarm
            # probabilities are all ~1
            if best is None or (res.meta["log10_expected_false_matches"]
                                < best.meta["log10_expected_false_matches"]):
                best = res
        if best is not None and best.log10_false_alarm < math.log10(max_false_alarm) - 4 \
                and best.n_matches >= min_matches:
            break  # convincing: no need to go deeper
    if best is None:
        raise MatchError("no consistent pattern match")
    best.meta["n_verify"] = n_verify
    if best.n_matches < min_matches:
        raise MatchError(
            f"too few matched stars ({best.n_matches} < {min_matches})", best
        )
    if best.log10_false_alarm > math.log10(max_false_alarm):
        raise MatchError(
            f"match not significant ({best.n_matches} matches, {best.n_expected:.2g} expected "
            f"by chance, false-alarm probability "
            f"{format_probability(best.log10_false_alarm)})", best
        )
    return best


# -- constrained search: the geometry known, only the shift (and a small rotation) ----------
def fit_shift_rotation(src, ref, max_rotation_rad: float = 0.0, weights=None) -> Transform:
    """Weighted least-squares ``ref = R(theta) @ src + t`` with the scale fixed at 1 and
    ``|theta| <= max_rotation_rad`` (0: a pure shift). The rotation is about the origin
    of ``src`` (the frame centre), as that of a camera whose geometry is known."""
    src = np.asarray(src, float).reshape(-1, 2)
    ref = np.asarray(ref, float).reshape(-1, 2)
    w = np.ones(len(src)) if weights is None else np.asarray(weights, float)
    w = w / w.sum()
    ms, mr = (w[:, None] * src).sum(0), (w[:, None] * ref).sum(0)
    theta = 0.0
    if max_rotation_rad > 0 and len(src) >= 2:
        zs = (src[:, 0] - ms[0]) + 1j * (src[:, 1] - ms[1])
        zr = (ref[:, 0] - mr[0]) + 1j * (ref[:, 1] - mr[1])
        cross = (w * zr * np.conj(zs)).sum()
        if abs(cross) > 0:
            theta = float(np.clip(np.angle(cross), -max_rotation_rad, max_rotation_rad))
    c, s = math.cos(theta), math.sin(theta)
    m = np.array([[c, -s], [s, c]])
    return Transform(m, mr - m @ ms)


def _best_offset(src, ref_tree, centre, max_offset, radius):
    """The offset ``t`` (``|t - centre| <= max_offset``) that brings most points of
    ``src`` within ``radius`` of a reference: a vote over all pairwise offsets, each
    offset scored by the number of offsets within ``radius`` of it. Returns
    ``(t, votes)`` or ``(None, 0)``."""
    near = ref_tree.query_ball_point(src + centre, max_offset + radius)
    counts = np.fromiter((len(js) for js in near), int, len(src))
    if counts.sum() == 0:
        return None, 0
    si = np.repeat(np.arange(len(src)), counts)
    rj = np.fromiter((j for js in near for j in js), int, int(counts.sum()))
    offs = ref_tree.data[rj] - src[si]
    votes = cKDTree(offs).query_ball_point(offs, radius, return_length=True)
    k = int(np.argmax(votes))
    return offs[k], int(votes[k])


def find_shift(src, ref, *, max_offset: float, match_radius: float, centre=(0.0, 0.0),
               max_rotation_deg: float = 0.0, min_matches: int = 4,
               max_false_alarm: float = 1e-4, n_searches: int = 1,
               density_area: float | None = None, weights=None) -> MatchResult:
    """Find ``ref = R(theta) @ src + t`` when the geometry of ``src`` is already known.

    ``src`` are detections already mapped by the camera's known scale, rotation and
    distortion into the units of ``ref`` (tangent plane / pixel scale), relative to the
    frame centre; what is left is the shift ``t`` (within ``max_offset`` of
    ``centre``) and a rotation ``|theta| <= max_rotation_deg`` (the spread of the
    camera's solved exposures). Method: for each rotation of a grid whose step moves
    the frame's corners by ``match_radius / 2``, every pairwise offset
    ``ref_j - R src_i`` votes, the offset with the most votes within ``match_radius``
    wins; the best is refined by nearest-neighbour matching and a fit of the shift
    (and rotation, within its range).

    Significance, counted for this smaller search: ``lambda`` chance matches as in
    `find_transform` (detections x reference density x match area); the trials are
    the shift area over the match area times the rotations resolvable within the range
    (``2 range x extent / match_radius``), times ``n_searches`` (Bonferroni over the
    constrained searches made on the frame). ``density_area``: the area (ref units^2)
    over which ``ref`` is complete (default: the bounding box of the mapped ``src``).
    ``weights`` (per ``src`` point, e.g. inverse centroid variances) weight the refinement.

    Raises `MatchError` (too few matches, not significant) like `find_transform`.
    """
    src = np.asarray(src, float).reshape(-1, 2)
    ref = np.asarray(ref, float).reshape(-1, 2)
    centre = np.asarray(centre, float).reshape(2)
    if len(src) < 2:
        raise MatchError(f"too few detections to match ({len(src)} < 2)")
    if len(ref) < 2:
        raise MatchError(f"too few reference stars to match ({len(ref)} < 2)")
    tree = cKDTree(ref)
    extent = max(float(np.hypot(*src.T).max()), match_radius)
    max_rot = math.radians(max(max_rotation_deg, 0.0))
    step = 0.5 * match_radius / extent
    n_rot = 2 * math.ceil(max_rot / step) + 1 if max_rot > 0 else 1
    best_t, best_votes, best_theta = None, 0, 0.0
    for theta in np.linspace(-max_rot, max_rot, n_rot):
        c, s = math.cos(theta), math.sin(theta)
        rotated = src @ np.array([[c, -s], [s, c]]).T
        t, votes = _best_offset(rotated, tree, centre, max_offset, match_radius)
        if t is not None and votes > best_votes:
            best_t, best_votes, best_theta = t, votes, theta
    if best_t is None or best_votes < 2:
        raise MatchError(f"no consistent shift within {max_offset:.0f} px")
    c, s = math.cos(best_theta), math.sin(best_theta)
    t = Transform(np.array([[c, -s], [s, c]]), best_t)
    si = ri = np.zeros(0, int)
    for _ in range(5):
        si, ri, _d = nn_match(t(src), tree, match_radius)
        if len(si) < 2:
            break
        new = fit_shift_rotation(src[si], ref[ri], max_rot if len(si) >= 3 else 0.0,
                                 None if weights is None else np.asarray(weights)[si])
        if np.linalg.norm(new.offset - centre) > max_offset + match_radius:
            break
        t = new
    si, ri, d = nn_match(t(src), tree, match_radius)
    rms = float(np.sqrt(np.mean(d**2))) if len(d) else float("nan")
    result = MatchResult(t, si, ri, rms, match_radius)
    # significance of the best of all shifts and rotations tried
    r = match_radius
    if density_area is None:
        pts = t(src)
        lo, hi = pts.min(0), pts.max(0)
        inside = int(((ref >= lo) & (ref <= hi)).all(1).sum())
        density_area = max(float((hi - lo).prod()), np.pi * r * r)
    else:
        inside = len(ref)
    lam = len(src) * max(inside, 1) / density_area * np.pi * r * r
    trials = max(max_offset**2 / r**2, 1.0)
    trials *= max(2.0 * max_rot * extent / r, 1.0)
    trials *= max(int(n_searches), 1)
    n = result.n_matches
    logsf = _poisson_logsf(n, lam)
    log10_expected = float((logsf + math.log(trials)) / math.log(10))
    result.n_expected = float(lam)
    result.log10_false_alarm = _log10_probability_of_any(log10_expected)
    result.meta.update(log10_expected_false_matches=log10_expected, n_trials=float(trials),
                       rotation_deg=math.degrees(math.atan2(t.matrix[1, 0], t.matrix[0, 0])))
    if n < min_matches:
        raise MatchError(f"too few matched stars ({n} < {min_matches})", result)
    if result.log10_false_alarm > math.log10(max_false_alarm):
        raise MatchError(
            f"shift not significant ({n} matches, {lam:.2g} expected by chance, "
            f"false-alarm probability {format_probability(result.log10_false_alarm)})", result)
    return result
