"""Registration is all or nothing (issue 20): a frame whose registration fails leaves no
pixel in the store or the coadd, summaries count "solved" and "in the coadd" apart, and
`--grid optimal` on the real frames puts every solved frame into its coadd."""

import numpy as np
import pytest
from astropy.io import fits

from daskstack import store as store_mod
from daskstack._pipeline import EXIT_FAILED, EXIT_OK, EXIT_PARTIAL, run
from daskstack._rundir import wcs_from_text
from daskstack.config import Settings


@pytest.fixture(scope="module")
def exact_field(tmp_path_factory):
    """Four small frames in two filters whose header WCS is exact (WCSERR = 0), so a run
    needs no catalog and no solving."""
    from daskstack.simulate import simulate_field

    return simulate_field(tmp_path_factory.mktemp("exact") / "in", n_frames=4,
                          shape=(300, 300), filters=("rp", "gp"), seed=5,
                          pointing_error_arcmin=0, rotation_error_deg=0, dither_arcsec=4)


def _run_with_failing_registration(field, out, monkeypatch, victims):
    """Run in-process, the registration of the frames ``victims`` (filter, index in the
    store) raising after it has written its first tile."""
    from distributed import Client

    real_write = store_mod.write_tiles
    written = []  # per failed attempt: did the tile written before the failure hold data

    def half_write(store_path, filter_name, index, tiles):
        if (filter_name, index) not in victims:
            return real_write(store_path, filter_name, index, tiles)

        def first_then_fail():
            first = next(iter(tiles))
            written.append(bool(np.isfinite(first[2]).any()))
            yield first
            raise OSError("disk vanished")  # an I/O failure, not a bug

        return real_write(store_path, filter_name, index, first_then_fail())

    monkeypatch.setattr(store_mod, "write_tiles", half_write)
    settings = Settings()
    # several tiles per frame: the failure is half-way
    settings = settings.replace("register", tile=128).replace("combine", method="mean")
    with Client(processes=False, n_workers=1, threads_per_worker=2,
                dashboard_address=":0") as client:
        result = run([str(p) for p in field.frames], "", out, settings, client=client)
    assert written and all(written)
    return result


def test_failed_registration_leaves_no_pixel(exact_field, tmp_path, monkeypatch):
    result = _run_with_failing_registration(exact_field, tmp_path, monkeypatch, {("rp", 0)})
    stack = store_mod.open_store(result.store)
    victim = stack.filters["rp"][0]
    record = next(r for r in result.frames if r.name == victim)
    assert record.status == "failed" and record.reason.startswith("registration failed")
    # the tile written before the failure is gone from the store
    data, _ = stack.arrays("rp")
    assert not np.isfinite(data[0]).any()
    assert np.isfinite(data[1]).any()
    # ... and the frame is not in the coadd, nor named in its header
    header = fits.getheader(result.coadds["rp"])
    named = [header[k] for k in header if k.startswith("IMCMB")]
    assert victim not in named and header["NCOMBINE"] == len(named) == 1
    # with one frame left, the mean coadd is that frame wherever it has data
    other = np.asarray(data[1])
    coadd = fits.getdata(result.coadds["rp"])
    assert np.array_equal(np.isfinite(coadd), np.isfinite(other))
    assert np.nanmax(fits.getdata(result.coadds["rp"], "NFRAMES")) == 1
    assert result.n_solved == 4 and result.n_combined == 3 and result.n_failed == 1
    assert result.exit_code == EXIT_PARTIAL


def test_nothing_combined_exits_4(exact_field, tmp_path, monkeypatch, capsys):
    from daskstack.cli import _summary

    victims = {(f, i) for f in ("rp", "gp") for i in range(2)}
    result = _run_with_failing_registration(exact_field, tmp_path, monkeypatch, victims)
    assert not result.coadds and not list(tmp_path.glob("coadd_*.fits"))
    assert result.n_solved == 4 and result.n_combined == 0
    assert result.exit_code == EXIT_FAILED
    _summary(result, quiet=False)
    assert "solved: 4  in the coadd: 0  failed: 4" in capsys.readouterr().out


def _union_of_footprints(grid_wcs, shape, frames, margin=2.0):
    """Grid pixels that fall at least ``margin`` px inside at least one frame."""
    ny, nx = shape
    gy, gx = np.mgrid[0:ny, 0:nx]
    ra, dec = grid_wcs.pixel_to_world_values(gx, gy)
    union = np.zeros(shape, bool)
    for frame_shape, wcs in frames:
        x, y = wcs.world_to_pixel_values(ra, dec)
        union |= ((x > margin) & (x < frame_shape[1] - 1 - margin)
                  & (y > margin) & (y < frame_shape[0] - 1 - margin))
    return union


def test_optimal_grid_on_real_frames_puts_every_solved_frame_in(lco_frames, lco_dir,
                                                                 dask_client, tmp_path):
    """The issue's case: `--grid optimal` made 1-px edge tiles and every frame failed."""
    from astropy.wcs import WCS

    settings = Settings()
    settings = settings.replace("grid", method="optimal")
    result = run([str(p) for p in lco_frames], str(lco_dir / "refcat-pds110.ecsv"),
                 tmp_path, settings, client=dask_client)
    solved = [r for r in result.frames if r.result is not None and r.result.ok]
    assert len(solved) == result.n_solved >= 9
    assert result.n_combined == result.n_solved
    assert result.exit_code == (EXIT_OK if result.n_failed == 0 else EXIT_PARTIAL)
    for filter_name in {r.meta.filter for r in solved}:
        members = [r for r in solved if r.meta.filter == filter_name]
        with fits.open(result.coadds[filter_name]) as hdul:
            header, coadd = hdul[0].header, hdul[0].data
            grid_wcs = WCS(header)
        named = {header[k] for k in header if k.startswith("IMCMB")}
        assert header["NCOMBINE"] == len(members)
        assert named == {r.name for r in members}
        union = _union_of_footprints(
            grid_wcs, coadd.shape,
            [(r.meta.shape, wcs_from_text(r.result.wcs_header, r.meta.shape))
             for r in members])
        finite = np.isfinite(coadd)
        # no empty band: every row and column that the frames cover has data
        assert finite[union.any(axis=1)].any(axis=1).all()
        assert finite[:, union.any(axis=0)].any(axis=0).all()
        # and the covered area is filled (a few masked pixels aside)
        assert finite[union].mean() > 0.99
