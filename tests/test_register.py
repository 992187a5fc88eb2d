"""Registration: the fast mesh path against reproject itself, masks, tiles, flux scaling."""

import numpy as np
import pytest
from reproject import reproject_exact, reproject_interp

from daskstack.config import RegisterSettings
from daskstack.grid import Grid
from daskstack.register import exact_mapping, frame_tiles, mesh_mapping, register_frame

from .helpers import tan_wcs


def assemble(tiles, shape):
    out = np.full(shape, np.nan, np.float32)
    foot = np.zeros(shape, np.float32)
    for t in tiles:
        sl = np.s_[t.y0:t.y0 + t.data.shape[0], t.x0:t.x0 + t.data.shape[1]]
        out[sl], foot[sl] = t.data, t.footprint
    return out, foot


@pytest.fixture(scope="module")
def sip_case():
    shape = (700, 900)
    frame_wcs = tan_wcs(shape, rotation_deg=0.7, sip=True)
    grid_wcs = tan_wcs((800, 800), ra=150.004, dec=2.003, rotation_deg=-0.2)
    rng = np.random.default_rng(3)
    data = rng.normal(200.0, 15.0, shape).astype(np.float32)
    return data, frame_wcs, Grid.from_wcs(grid_wcs, (800, 800))


def test_mesh_mapping_error_on_sip_frame(sip_case):
    """The spline of the pixel mapping stays far below the 0.01 px bound with SIP."""
    _, frame_wcs, grid = sip_case
    evaluate, _, _ = mesh_mapping(grid.wcs, frame_wcs, 0, 0, grid.shape, 64)
    rng = np.random.default_rng(0)
    ys, xs = rng.uniform(0, 799, 2000), rng.uniform(0, 799, 2000)
    sx, sy = evaluate(ys, xs, grid=False)
    ex, ey = exact_mapping(grid.wcs, frame_wcs, xs, ys)
    error = np.hypot(sx - ex, sy - ey)
    assert np.nanmax(error) < 0.001


@pytest.mark.parametrize("order", ["bilinear", "bicubic"])
def test_fast_path_equals_reproject_interp(sip_case, order):
    data, frame_wcs, grid = sip_case
    settings = RegisterSettings(tile=256, order=order)
    tiles = list(register_frame(data, None, frame_wcs, grid, settings, conserve_flux=False))
    assert {t.mapping for t in tiles} == {"mesh"}
    out, foot = assemble(tiles, grid.shape)
    ref, ref_foot = reproject_interp((data, frame_wcs), grid.wcs, shape_out=grid.shape,
                                     order=order)
    both = np.isfinite(ref) & np.isfinite(out)
    # coverage agrees except possibly on a handful of edge pixels within 1e-3 px of a border
    assert (np.isfinite(ref) != np.isfinite(out)).sum() <= 5
    assert both.sum() > 0.5 * out.size
    # float32 rounding, not interpolation error: measured 1.0e-6 (bilinear) and 1.2e-6
    # (bicubic) of the value at most here; on a 4096x4096 SIP frame of sky ~100 + stars,
    # 7.7e-8 (benchmarks/results/fast-path-20261130.json, python -m benchmarks fast-path)
    relative = np.abs(out[both].astype(np.float64) - ref[both]) / np.abs(ref[both])
    assert np.max(relative) < 2.5e-6
    assert np.percentile(relative, 99) < 1e-6


def test_exact_fallback_when_tolerance_unreachable(sip_case):
    data, frame_wcs, grid = sip_case
    settings = RegisterSettings(tile=512, mapping_tolerance_px=1e-12)
    tiles = list(register_frame(data, None, frame_wcs, grid, settings, conserve_flux=False))
    assert {t.mapping for t in tiles} == {"reproject_interp"}
    out, _ = assemble(tiles, grid.shape)
    ref, _ = reproject_interp((data, frame_wcs), grid.wcs, shape_out=grid.shape)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-4, equal_nan=True)


def test_exact_method_uses_reproject_exact():
    shape = (120, 100)
    frame_wcs = tan_wcs(shape, rotation_deg=10)
    grid = Grid.from_wcs(tan_wcs((110, 110), ra=150.0005), (110, 110))
    data = np.random.default_rng(1).normal(50, 5, shape).astype(np.float32)
    settings = RegisterSettings(tile=64, method="exact")
    out, foot = assemble(register_frame(data, None, frame_wcs, grid, settings,
                                        conserve_flux=False), grid.shape)
    ref, ref_foot = reproject_exact((data, frame_wcs), grid.wcs, shape_out=grid.shape)
    ok = ref_foot > 0
    np.testing.assert_allclose(out[ok], ref[ok], rtol=1e-5)


def test_bad_pixels_never_reach_the_output():
    shape = (200, 200)
    wcs = tan_wcs(shape)
    grid = Grid.from_wcs(wcs, shape)
    data = np.full(shape, 10.0, np.float32)
    mask = np.zeros(shape, bool)
    data[:, 57] = 1e6  # a bad column flagged in the BPM
    mask[:, 57] = True
    out, foot = assemble(register_frame(data, mask, wcs, grid, RegisterSettings(tile=128)),
                         shape)
    assert np.nanmax(out) == pytest.approx(10.0)
    assert np.all(np.isnan(out[:, 57])) and np.all(foot[:, 57] == 0)
    assert np.isfinite(out[:, 10]).all()


def test_tiles_cover_only_the_frame_footprint():
    frame_shape = (300, 300)
    frame_wcs = tan_wcs(frame_shape, ra=150.0)
    grid_wcs = tan_wcs((1000, 1000), ra=150.0)  # frame sits in the middle
    grid = Grid.from_wcs(grid_wcs, (1000, 1000))
    origins = frame_tiles(frame_wcs, frame_shape, grid, 256)
    assert sorted(origins) == [(256, 256), (256, 512), (512, 256), (512, 512)]
    far = tan_wcs(frame_shape, ra=160.0)
    assert frame_tiles(far, frame_shape, grid, 256) == []


def test_flux_conserved_across_pixel_scales():
    """A 2x2-binned frame registered onto a fine grid gives electrons per output pixel."""
    coarse = tan_wcs((100, 100), scale_arcsec=0.778)
    fine = tan_wcs((200, 200), scale_arcsec=0.389)
    data = np.full((100, 100), 400.0, np.float32)
    out, _ = assemble(register_frame(data, None, coarse, Grid.from_wcs(fine, (200, 200)),
                                     RegisterSettings(tile=128)), (200, 200))
    assert np.nanmedian(out) == pytest.approx(100.0, rel=1e-3)


def test_one_pixel_edge_tiles_take_the_fast_path_and_match_reproject(sip_case):
    """A grid one pixel longer than a multiple of the tile has 1-px edge tiles (and a
    1x1 corner): the mesh spline must still be built there (issue 20: it raised
    ``regrid_smth:ky=0``) and give reproject's values."""
    data, frame_wcs, grid = sip_case
    grid = Grid.from_wcs(grid.wcs, (257, 513))
    settings = RegisterSettings(tile=256)
    tiles = list(register_frame(data, None, frame_wcs, grid, settings, conserve_flux=False))
    shapes = {t.data.shape for t in tiles}
    assert {(1, 256), (256, 1), (1, 1)} <= shapes
    assert {t.mapping for t in tiles} == {"mesh"}
    out, _ = assemble(tiles, grid.shape)
    ref, _ = reproject_interp((data, frame_wcs), grid.wcs, shape_out=grid.shape,
                              order="bilinear")
    assert np.isfinite(ref[-1]).sum() > 100 and np.isfinite(ref[:, -1]).sum() > 100
    assert (np.isfinite(ref) != np.isfinite(out)).sum() <= 5
    both = np.isfinite(ref) & np.isfinite(out)
    assert np.max(np.abs(out[both] - ref[both])) < 1e-3 * 15.0


def test_failing_fast_path_falls_back_to_the_exact_path(sip_case, monkeypatch):
    """Whatever breaks the mesh mapping costs speed, never a tile: the frame comes out
    exactly as through the exact path (reproject) alone."""
    from daskstack import register

    data, frame_wcs, grid = sip_case
    settings = RegisterSettings(tile=256)
    exact = list(register_frame(data, None, frame_wcs, grid,
                                RegisterSettings(tile=256, fast_mapping=False)))

    def broken_mesh(*args, **kwargs):
        raise ValueError("spline cannot be built")

    monkeypatch.setattr(register, "mesh_mapping", broken_mesh)
    fallback = list(register_frame(data, None, frame_wcs, grid, settings))
    assert {t.mapping for t in fallback} == {"reproject_interp"}
    assert [(t.y0, t.x0) for t in fallback] == [(t.y0, t.x0) for t in exact]
    for a, b in zip(fallback, exact, strict=True):
        np.testing.assert_array_equal(a.data, b.data)
        np.testing.assert_array_equal(a.footprint, b.footprint)
