"""Shared robust statistics: one sky/noise estimator, one clipping rule, one separation."""

import numpy as np
import pytest
from astropy.coordinates import SkyCoord

from daskstack import _pipeline as pipeline
from daskstack import store as store_mod
from daskstack._fields import separation_deg
from daskstack._stats import clip_residuals, mad_sigma, residual_sigma, sky_level
from daskstack.astrometry import solve_frame
from daskstack.config import Settings
from daskstack.frames import read_frame, read_meta
from daskstack.grid import make_grid
from daskstack.simulate import simulate_field


def test_mad_sigma_and_sky_level_on_gaussian_sky_with_stars():
    rng = np.random.default_rng(2)
    sky = rng.normal(200.0, 12.0, (600, 600))
    assert mad_sigma(sky) == pytest.approx(12.0, rel=0.02)
    hit = rng.random(sky.shape) < 0.02  # stars, cosmic rays
    sky[hit] += rng.uniform(100, 5000, hit.sum())
    mask = np.zeros(sky.shape, bool)
    mask[:, :50] = True
    sky[:, :50] = 1e6  # masked columns must not count
    level, noise = sky_level(sky, mask)
    assert level == pytest.approx(200.0, abs=0.5)
    assert noise == pytest.approx(12.0, rel=0.03)
    assert np.isnan(sky_level(np.full((10, 10), np.nan))[0])


def test_clip_residuals_drops_mismatches_keeps_a_tight_set():
    rng = np.random.default_rng(4)
    offsets = rng.normal(0.0, 0.2, (400, 2))
    d = np.hypot(*offsets.T)
    # per-axis sigma s: the rule's scale is 1.4826 x sqrt(2) s
    assert residual_sigma(d) == pytest.approx(1.4826 * np.sqrt(2) * 0.2, rel=0.08)
    with_outliers = np.concatenate([d, [5.0, 8.0]])
    keep = clip_residuals(with_outliers, 3.0, 0.01)
    assert keep[:400].mean() > 0.99 and not keep[400:].any()
    tight = np.full(10, 1e-6)
    assert clip_residuals(np.append(tight, 0.05), 3.0, 0.1).all()  # the floor
    fit = np.arange(11) < 10  # scale measured on the tight pairs only
    assert not clip_residuals(np.append(tight, 0.05), 3.0, 0.01, fit=fit)[-1]


def test_separation_deg_matches_astropy():
    ra1, dec1 = np.array([10.0, 359.9, 80.0]), np.array([-5.0, 89.0, 0.0])
    ra2, dec2 = np.array([10.0001, 0.1, 260.0]), np.array([-5.0, 89.5, 0.0])
    expected = SkyCoord(ra1, dec1, unit="deg").separation(SkyCoord(ra2, dec2, unit="deg")).deg
    np.testing.assert_allclose(separation_deg(ra1, dec1, ra2, dec2), expected, rtol=1e-9)
    assert isinstance(separation_deg(1.0, 2.0, 1.0, 2.5), float)


def test_both_header_wcs_paths_measure_the_same_sky(tmp_path):
    """A header-WCS frame gets its sky level and noise from `solve_frame` (API) or from
    the register task (pipeline); both now use one estimator and agree exactly, close to
    the simulated sky and noise."""
    field = simulate_field(tmp_path / "in", n_frames=1, shape=(512, 512), filters=("rp",),
                           seed=5)
    truth = field.truth_table()[0]
    path = str(field.frames[0])
    frame, meta = read_frame(path), read_meta(path)
    settings = Settings()
    settings = settings.replace("solve", wcs="header")
    solved = solve_frame(frame, None, settings)
    grid = make_grid([(meta.shape, meta.header_wcs())], settings.grid, names=[meta.name])
    store_mod.create_store(tmp_path / "store.zarr", grid, {meta.name: store_mod.FrameInfo()},
                           {meta.filter: [meta.name]}, tile=settings.register.tile)
    _, _, registered = pipeline._register_task(meta, meta.wcs_header, grid,
                                               str(tmp_path / "store.zarr"), meta.filter, 0,
                                               settings, measure_sky=True)
    assert (solved.background, solved.noise) == registered
    expected_noise = np.sqrt(truth["sky"] / truth["gain"] + (truth["rdnoise"] / truth["gain"])**2)
    assert solved.background == pytest.approx(truth["sky"], rel=0.02)
    # within 6 %: the simulated sky has a gradient across the frame
    assert solved.noise == pytest.approx(expected_noise, rel=0.06)
