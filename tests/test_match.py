"""Point-set matching: rotations, flips, junk, refusal on thin evidence."""

import numpy as np
import pytest

from daskstack.match import MatchError, Transform, find_transform, fit_similarity


def _field(rot, flip, seed=0, n_true=100, n_junk=80, scale=1.02, offset=(300.0, -500.0)):
    rng = np.random.default_rng(seed)
    ref = rng.uniform(-1500, 1500, (400, 2))
    th = np.radians(rot)
    m = scale * np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    if flip:
        m = m @ np.diag([1.0, -1.0])
    truth = Transform(m, offset)
    src = truth.inverse()(ref)
    inside = (np.abs(src) < 1000).all(1)
    order = np.nonzero(inside)[0]  # ref is "brightest first": keep that order
    src = src[order][:n_true] + rng.normal(0, 0.3, (min(n_true, len(order)), 2))
    src = np.vstack([src, rng.uniform(-1000, 1000, (n_junk, 2))])  # cosmic rays, hot pixels
    perm = rng.permutation(len(src))
    return src[perm], ref, truth


@pytest.mark.parametrize("rot,flip", [(0, False), (180, False), (180, True), (37.5, False),
                                      (271, True)])
def test_find_transform_any_rotation_and_flip(rot, flip):
    src, ref, truth = _field(rot, flip, seed=int(rot))
    res = find_transform(src, ref, scale_range=(0.95, 1.05), max_offset=800, match_radius=2.0)
    assert res.n_matches >= 90
    assert res.transform.flip == flip
    assert abs((res.transform.rotation_deg - rot + 180) % 360 - 180) < 0.01
    assert abs(res.transform.scale - 1.02) < 1e-4
    assert np.allclose(res.transform.offset, truth.offset, atol=0.2)
    assert res.log10_false_alarm < -50


def test_flip_not_allowed_refuses_mirrored_field():
    src, ref, _ = _field(90, True, seed=3)
    with pytest.raises(MatchError):
        find_transform(src, ref, allow_flip=False, max_offset=800, match_radius=2.0)


def test_refuses_pure_junk():
    rng = np.random.default_rng(5)
    ref = rng.uniform(-1500, 1500, (400, 2))
    with pytest.raises(MatchError) as err:
        find_transform(rng.uniform(-1000, 1000, (120, 2)), ref, max_offset=800,
                       match_radius=2.0)
    assert err.value.reason


def test_refuses_offset_outside_search_radius():
    src, ref, _ = _field(0, False, seed=7, offset=(900.0, 0.0))
    with pytest.raises(MatchError):
        find_transform(src, ref, max_offset=300, match_radius=2.0)


def test_fit_similarity_exact():
    rng = np.random.default_rng(1)
    src = rng.uniform(-100, 100, (20, 2))
    t = Transform(0.9 * np.array([[0.0, -1.0], [1.0, 0.0]]) @ np.diag([1, -1]), (5.0, -3.0))
    fit = fit_similarity(src, t(src), flip=True)
    assert np.allclose(fit.matrix, t.matrix) and np.allclose(fit.offset, t.offset)


def test_triangles_vectorised_equal_brute_force():
    import itertools

    from daskstack.match import _all_triangles, _local_triangles

    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 1000, (60, 2))
    d = np.hypot(*(xy[:, None] - xy[None]).transpose(2, 0, 1))
    local = {tuple(t) for t in _local_triangles(xy, 300.0).tolist()}
    brute = {(i, j, k) for i, j, k in itertools.combinations(range(60), 3)
             if max(d[i, j], d[i, k], d[j, k]) <= 300}
    assert local == brute and len(brute) > 100
    assert _all_triangles(9).tolist() == [list(c) for c in itertools.combinations(range(9), 3)]


def test_reference_triangles_built_once_across_widening_search():
    from daskstack.match import TriangleIndex

    src, ref, truth = _field(120, False, seed=11, offset=(700.0, 200.0))
    index = TriangleIndex(ref, (0.95, 1.05), max_side=1300)
    cache = {}
    with pytest.raises(MatchError):  # the field lies beyond the first search radius
        find_transform(src, ref, max_offset=300, match_radius=2.0, ref_index=index,
                       ref_radius=1000 + 300, cache=cache)
    n_inner = index.n_built
    res = find_transform(src, ref, max_offset=1000, match_radius=2.0, ref_index=index,
                         ref_radius=2200, cache=cache)
    assert np.allclose(res.transform.offset, truth.offset, atol=0.2)
    n_all = index.n_built
    assert n_all > n_inner > 0
    # the wider step only added the triangles reaching beyond the first radius
    fresh = TriangleIndex(ref, (0.95, 1.05), max_side=1300)
    for n_ref in {float(k) for k in index._tiers}:
        fresh.chunks(n_ref, index._tiers[n_ref][0])
    assert fresh.n_built == n_all
    # asking again builds nothing
    find_transform(src, ref, max_offset=1000, match_radius=2.0, ref_index=index,
                   ref_radius=2200, cache=cache)
    assert index.n_built == n_all
