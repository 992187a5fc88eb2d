"""Output grids: a reference frame's, the optimal covering grid, a user's header."""

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs.utils import proj_plane_pixel_scales

from daskstack.config import GridSettings
from daskstack.grid import GridError, grid_from_file, make_grid, optimal_grid

from .helpers import tan_wcs


def footprints():
    """Three frames: two dithered 1k frames and a 2x2-binned one, rotated."""
    a = tan_wcs((1000, 1000), ra=150.00, dec=2.00)
    b = tan_wcs((1000, 1000), ra=150.03, dec=2.02, rotation_deg=3)
    c = tan_wcs((500, 600), ra=149.98, dec=1.99, rotation_deg=90, scale_arcsec=0.778)
    return [((1000, 1000), a), ((1000, 1000), b), ((500, 600), c)]


def corners_in_grid(grid, shape, wcs):
    ny, nx = shape
    x = np.array([-0.5, nx - 0.5, nx - 0.5, -0.5])
    y = np.array([-0.5, -0.5, ny - 0.5, ny - 0.5])
    gx, gy = grid.wcs.world_to_pixel_values(*wcs.pixel_to_world_values(x, y))
    gny, gnx = grid.shape
    return np.all((gx >= -1) & (gx <= gnx) & (gy >= -1) & (gy <= gny))


def test_reference_grid_is_the_frame_grid():
    fps = footprints()
    grid = make_grid(fps, GridSettings(method="reference", reference="b"), names=["a", "b", "c"])
    assert grid.shape == (1000, 1000)
    x, y = np.array([0.0, 999.0]), np.array([0.0, 500.0])
    np.testing.assert_allclose(grid.wcs.pixel_to_world_values(x, y),
                               fps[1][1].pixel_to_world_values(x, y), atol=1e-10)
    with pytest.raises(GridError, match="'zz' is not among"):
        make_grid(fps, GridSettings(method="reference", reference="zz"), names=["a", "b", "c"])


def test_optimal_grid_covers_every_frame_at_the_finest_scale():
    fps = footprints()
    grid = make_grid(fps, GridSettings(method="optimal"))
    for shape, wcs in fps:
        assert corners_in_grid(grid, shape, wcs)
    assert grid.pixel_scale_arcsec == pytest.approx(0.389, rel=1e-3)


def test_optimal_grid_scale_rotation_and_shape():
    fps = footprints()
    grid = optimal_grid(fps, pixel_scale_arcsec=1.0, rotation_deg=30.0)
    assert np.sqrt(np.prod(proj_plane_pixel_scales(grid.wcs))) * 3600 == pytest.approx(1.0)
    pc = grid.wcs.wcs.get_pc()
    assert np.degrees(np.arctan2(pc[1, 0], pc[0, 0])) == pytest.approx(30.0, abs=1e-6)
    for shape, wcs in fps:
        assert corners_in_grid(grid, shape, wcs)
    fixed = optimal_grid(fps, shape=(300, 400))
    assert fixed.shape == (300, 400)


def test_grid_from_a_fits_file_and_a_text_header(tmp_path):
    wcs = tan_wcs((200, 300), ra=10.0, dec=-20.0, rotation_deg=12)
    header = wcs.to_header()
    header["NAXIS"], header["NAXIS1"], header["NAXIS2"] = 2, 300, 200
    fits.PrimaryHDU(np.zeros((200, 300), np.float32), header=wcs.to_header()).writeto(
        tmp_path / "grid.fits")
    (tmp_path / "grid.head").write_text(header.tostring(sep="\n", endcard=True, padding=False))
    solve_field = wcs.to_header()
    solve_field["IMAGEW"], solve_field["IMAGEH"] = 300, 200  # astrometry.net's .wcs
    fits.PrimaryHDU(header=solve_field).writeto(tmp_path / "frame.wcs")
    for path in (tmp_path / "grid.fits", tmp_path / "grid.head", tmp_path / "frame.wcs"):
        grid = grid_from_file(path)
        assert grid.shape == (200, 300)
        np.testing.assert_allclose(grid.wcs.pixel_to_world_values(5.0, 7.0),
                                   wcs.pixel_to_world_values(5.0, 7.0), atol=1e-10)
    (tmp_path / "flat.fits").write_bytes(fits.PrimaryHDU(np.zeros((4, 4))).data.tobytes())
    with pytest.raises(GridError, match="flat.fits"):
        grid_from_file(tmp_path / "flat.fits")


def test_grid_fingerprint_changes_with_the_grid():
    fps = footprints()
    a = make_grid(fps, GridSettings(method="reference"), names=["a", "b", "c"])
    b = make_grid(fps, GridSettings(method="reference", reference="b"), names=["a", "b", "c"])
    assert a.fingerprint != b.fingerprint
    assert a.fingerprint == make_grid(fps, GridSettings(), names=["a", "b", "c"]).fingerprint
