"""No wrong WCS from catalogs that do not contain the frame (a few trials of the committed
false-alarm benchmark, `python -m benchmarks false-alarms`: 204 trials, 0 accepted)."""

import math

import numpy as np
import pytest

from benchmarks.astrometry_evidence import FALSE_ALARM_KINDS, false_alarm_catalog, false_alarms
from daskstack.match import MatchError, find_transform


def test_real_frames_against_catalogs_without_them_are_never_solved(lco_dir):
    result = false_alarms(lco_dir, None, trials_per_kind=1, seed=7)
    assert result["n_trials"] == len(FALSE_ALARM_KINDS)
    assert {t["kind"] for t in result["trials"]} == set(FALSE_ALARM_KINDS)
    assert len({t["frame"] for t in result["trials"]}) == len(FALSE_ALARM_KINDS)
    assert result["n_accepted"] == 0, [t for t in result["trials"] if t["status"] == "ok"]
    for trial in result["trials"]:
        assert trial["reason"], trial


def test_false_alarm_catalogs_have_the_real_density(lco_dir):
    from daskstack.catalogs import load_catalog

    catalog = load_catalog(lco_dir / "refcat-pds110.ecsv")
    centre = (float(np.median(catalog["ra"])), float(np.median(catalog["dec"])))
    rng = np.random.default_rng(0)
    scrambled = false_alarm_catalog("scrambled", catalog, centre, 0.2, rng)
    assert sorted(scrambled["ra"]) == sorted(catalog["ra"])
    assert not np.array_equal(scrambled["ra"], catalog["ra"])
    for kind in ("random", "other-field"):
        cat = false_alarm_catalog(kind, catalog, centre, 0.2, rng)
        area = math.pi * 0.2**2
        # the real catalog's density over its own footprint, within Poisson noise + edges
        real = len(catalog) / (np.ptp(catalog["ra"]) * math.cos(math.radians(centre[1]))
                               * np.ptp(catalog["dec"]))
        assert 0.7 < len(cat) / (real * area) < 1.3, kind


def test_significance_counts_every_search():
    """The false-alarm probability grows with the number of searches made on a frame
    (Bonferroni): a match just significant for one search is not for a thousand."""
    rng = np.random.default_rng(1)
    ref = rng.uniform(-500, 500, (60, 2))
    src = ref[:25] + rng.normal(0, 0.3, (25, 2))
    src = np.vstack([src[:12], rng.uniform(-500, 500, (40, 2))])  # 12 true of 52
    one = find_transform(src, ref, max_offset=50, min_matches=8, max_false_alarm=0.5)
    many = find_transform(src, ref, max_offset=50, min_matches=8, max_false_alarm=0.5,
                          n_searches=1000)
    assert many.log10_false_alarm == pytest.approx(one.log10_false_alarm + 3, abs=1e-9)
    with pytest.raises(MatchError, match="not significant"):
        find_transform(src, ref, max_offset=50, min_matches=8,
                       max_false_alarm=10 ** (one.log10_false_alarm + 1), n_searches=1000)
