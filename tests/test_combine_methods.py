"""The combine methods as a table (rejection x estimator): a new method is one entry."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
from astropy.stats import sigma_clip

from daskstack import combine
from daskstack.combine import (
    COMBINE_METHODS,
    ESTIMATORS,
    REJECTIONS,
    CombineMethod,
    _combine_tile,
    combine_stack,
    header_cards,
)
from daskstack.config import CombineSettings, Settings, SettingsError


def _stack(seed=3, n=11, shape=(16, 18)):
    rng = np.random.default_rng(seed)
    data = rng.normal(100.0, 10.0, (n,) + shape).astype(np.float32)
    hit = rng.random(data.shape) < 0.05
    data[hit] += rng.uniform(200, 500, hit.sum())
    data[rng.random(data.shape) < 0.1] = np.nan
    return data


def test_every_method_is_a_known_rejection_and_estimator():
    assert set(combine.METHODS) == set(COMBINE_METHODS)
    for name, spec in COMBINE_METHODS.items():
        assert spec.rejection is None or spec.rejection in REJECTIONS, name
        assert spec.estimator in ESTIMATORS, name
        assert spec.two_frames in combine.TWO_FRAME_REJECTIONS, name
        assert spec.memory_factor >= 1, name


@pytest.mark.filterwarnings("ignore:Input data contains invalid values")
def test_a_new_method_is_one_table_entry(monkeypatch):
    """Sigma clipping followed by the median of the survivors, added as one entry only,
    equals astropy's sigma_clip + median."""
    monkeypatch.setitem(COMBINE_METHODS, "clipmedian",
                        CombineMethod("sigclip", "median", 4.0, combine._sigclip_cards))
    data = _stack()
    res = combine_stack(da.from_array(data, chunks=(data.shape[0], 8, 9)),
                        method="clipmedian", sigma=2.5, iters=4)
    image, nused = dask.compute(res.image, res.nused, scheduler="sync")
    clipped = sigma_clip(data, sigma=2.5, maxiters=4, cenfunc="median", stdfunc="std", axis=0,
                         masked=True)
    expected = np.ma.median(clipped, axis=0).filled(np.nan)
    np.testing.assert_allclose(image, expected, rtol=2e-6, atol=1e-4)
    np.testing.assert_array_equal(nused, clipped.count(axis=0))
    cards = header_cards("clipmedian", CombineSettings(sigma=2.5, iters=4))
    assert [(k, v) for k, v, _ in cards] == [("CLIPSIG", 2.5), ("CLIPITER", 4),
                                             ("PAIRSIG", 4.0), ("PAIRFRAC", 0.5)]
    settings = Settings()
    # the settings accept it: same table
    settings = settings.replace("combine", method="mean,clipmedian")
    assert settings.validate().combine.methods == ["mean", "clipmedian"]
    monkeypatch.delitem(COMBINE_METHODS, "clipmedian")
    with pytest.raises(SettingsError, match="combine.method = 'mean,clipmedian' is not one of"):
        settings.validate()


def test_header_cards_from_the_table():
    cs = CombineSettings(sigma=2.0, iters=5)
    pair = ["PAIRSIG", "PAIRFRAC"]  # the two-frame rule of every method but minmax
    assert [k for k, _, _ in header_cards("sigclip", cs)] == ["CLIPSIG", "CLIPITER", *pair]
    assert header_cards("sigclip", cs)[0][1] == 2.0
    for method in ("mean", "median", "weighted"):
        assert [k for k, _, _ in header_cards(method, cs)] == pair
    assert header_cards("minmax", cs) == []


def test_block_size_follows_the_memory_factor(monkeypatch):
    """Each task's block times its method's memory factor stays within the budget; a
    method that needs more memory per value gets a smaller block, methods that need the
    same get the same block (the one the store's chunks were made for)."""
    budget = 64 * 2**20
    monkeypatch.setitem(COMBINE_METHODS, "heavy", CombineMethod("sigclip", "mean", 20.0))
    for methods in (["mean"], ["sigclip"], ["weighted"], ["mean", "heavy"]):
        block = _combine_tile(1024, 200, (4096, 4096), budget, methods=methods)
        factor = max(COMBINE_METHODS[m].memory_factor for m in methods)
        assert block == 128 or 200 * block * block * 8 * factor <= budget
    sizes = {m: _combine_tile(1024, 20, (4096, 4096), 4 * budget, methods=[m])
             for m in ("mean", "median", "sigclip", "minmax", "weighted", "heavy")}
    assert sizes["heavy"] < sizes["mean"]
    assert len({sizes[m] for m in combine.METHODS}) == 1
    with pytest.raises(KeyError):
        _combine_tile(1024, 60, (4096, 4096), budget, methods=["nonsense"])


@pytest.mark.parametrize("method", combine.METHODS)
@pytest.mark.parametrize(("n", "side"), [(20, 256), (40, 192), (100, 128)])
def test_memory_factor_bounds_what_the_work_allocates(method, n, side):
    """The table's memory factor is true: what combining one block allocates (traced by
    tracemalloc: numpy's buffers are traced) stays within it times the input at 8 bytes
    a value, rejections and the 'weighted' sort included."""
    import tracemalloc

    rng = np.random.default_rng(5)
    data = rng.normal(100.0, 10.0, (n, side, side)).astype(np.float32)
    data[rng.random(data.shape) < 0.05] += 500.0
    variance = np.full(data.shape, 100.0, np.float32)
    power = np.full(data.shape, 0.5, np.float16)
    options = dict(sigma=3.0, iters=5, cenfunc="median", nlow=1, nhigh=1,
                   scales=np.ones(n), offsets=np.zeros(n), exptime=np.full(n, 30.0),
                   pair_sigma=4.0, pair_fraction=0.5, sky_levels=None)
    def combine_once():
        result = combine.combine_stacks(data, None, variance=variance, kernel_power=power,
                                        methods=[(method, {"reject": "sigclip" if
                                                           method == "weighted" else "none"})],
                                        **options)
        dask.compute(*(r.image for r in result), scheduler="sync")

    combine_once()  # caches filled (tables of the median's variance, dask's): not per block
    tracemalloc.start()
    try:
        combine_once()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= COMBINE_METHODS[method].memory_factor * n * side * side * 8
