"""Many fields in one batch (issue 17): each field its own grid and coadds, mosaics whose
sky levels are matched across the overlaps, frames that are not reduced images refused
with what to do, and an archive query of several targets run as it was fetched."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from astropy.io import fits
from astropy.table import Table, vstack

from daskstack._pipeline import EXIT_OK, EXIT_PARTIAL, combine_store_path, make_report, run
from daskstack._stats import mad_sigma
from daskstack.config import Settings
from daskstack.simulate import simulate_field
from daskstack.store import open_store

PIXSCALE = 0.389
SIDE = 160  # px: small frames, fast tests
OVERLAP = 0.2  # the mosaic's pointings overlap by a fifth of a frame
EXACT = dict(shape=(SIDE, SIDE), pixscale=PIXSCALE, pointing_error_arcmin=0.0,
             rotation_error_deg=0.0, dither_arcsec=0.0, cosmic_rays=False, bad_columns=0,
             hot_pixels=0, sky_gradient=0.0, fwhm_range=(3.0, 3.5))
# store tiles smaller than the mosaic's grid: each frame covers some of them only
TILED = Settings().replace("register", tile=128)
MOSAIC = "Big Nebula"  # OBJECT of the mosaic; its field directory is its file-safe form
MOSAIC_DIR = "Big_Nebula"


def _mosaic_frames(root, frames_per_pointing=2):
    """A 3x3 mosaic, pointings overlapping by `OVERLAP`; every frame its own sky level."""
    step = (1 - OVERLAP) * SIDE * PIXSCALE / 3600
    frames, groups, catalogs = [], [], []
    for k in range(9):
        iy, ix = divmod(k, 3)
        dec = 10.0 + (iy - 1) * step
        ra = 60.0 + (ix - 1) * step / np.cos(np.radians(dec))
        field = simulate_field(root / f"pointing{k}", n_frames=frames_per_pointing,
                               filters=("rp",), center=(ra, dec), seed=100 + k,
                               object_name=MOSAIC, first_framenum=100 + 10 * k,
                               epoch_year=2023.6 + k * 0.002, sky=80.0 * (1 + 0.35 * k),
                               **EXACT)
        frames += field.frames
        groups.append(field.frames)
        catalogs.append(Table.read(field.catalog))
    return frames, groups, catalogs


def _target(root, name, centre, seed, framenum):
    return simulate_field(root / name, n_frames=4, filters=("rp", "gp"), center=centre,
                          seed=seed, object_name=name, first_framenum=framenum,
                          epoch_year=2023.5 + seed * 0.003, **EXACT)


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """Two small fields far apart on the sky and the 3x3 mosaic, exact header WCSs."""
    root = tmp_path_factory.mktemp("fields")
    alpha = _target(root, "ALPHA", (150.1, 2.2), 1, 1)
    beta = _target(root, "BETA", (200.0, -30.0), 2, 20)
    mosaic, groups, catalogs = _mosaic_frames(root)
    catalog = root / "catalog.ecsv"
    vstack([Table.read(alpha.catalog), Table.read(beta.catalog), *catalogs],
           metadata_conflicts="silent").write(catalog)
    return {"root": root, "alpha": alpha.frames, "beta": beta.frames, "mosaic": mosaic,
            "groups": groups, "catalog": catalog}


@pytest.fixture(scope="module")
def header_run(batch, lco_frames, dask_client):
    """The issue's mixed batch: the twelve real PDS 110 frames, two synthetic fields far
    away and the synthetic 3x3 mosaic, each frame with its header WCS (no catalog:
    nothing solved, so the test stays fast; the real frames' solving is
    tests/test_solve_real.py's)."""
    frames = [*lco_frames, *batch["alpha"], *batch["beta"], *batch["mosaic"]]
    return run(frames, "", batch["root"] / "out", TILED, client=dask_client)


# the real u' frames, whose header says LCO could not solve their WCS (WCSERR = 4)
U_BAND = {f"ogg0m404-kb82-20170815-{n}-e91" for n in (1153, 1154, 1155)}


def seam_steps(coadd, coverage, width=10):
    """|median just inside - median just outside| along every frame edge (straight
    pixel columns and rows: the mosaic grid is aligned with the frames) where both sides
    are in the coadd."""
    steps = []
    ny, nx = coadd.shape
    for cov in coverage:
        ys, xs = np.nonzero(cov)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        for axis, lo, hi, size in ((1, x0, x1, nx), (0, y0, y1, ny)):
            for edge, inward in ((lo, 1), (hi, -1)):
                inside = slice(edge, edge + width) if inward > 0 else slice(edge - width, edge)
                outside = slice(edge - width, edge) if inward > 0 else slice(edge, edge + width)
                if outside.start < 0 or outside.stop > size:
                    continue
                along = slice(y0 + width, y1 - width) if axis == 1 else slice(x0 + width,
                                                                              x1 - width)
                a = coadd[along, inside] if axis == 1 else coadd[inside, along]
                b = coadd[along, outside] if axis == 1 else coadd[outside, along]
                good = np.isfinite(a).all(axis=axis) & np.isfinite(b).all(axis=axis)
                if good.sum() < 20:
                    continue
                a, b = (a[good] if axis == 1 else a[:, good]), (b[good] if axis == 1
                                                                 else b[:, good])
                steps.append(abs(float(np.median(a) - np.median(b))))
    return np.array(steps)


def seam_in_sigma(coadd_path, store_path):
    """Median step across frame edges / the coadd's pixel-to-pixel sky noise."""
    with fits.open(coadd_path) as hdul:
        coadd = hdul[0].data.astype(float)
    coverage = np.isfinite(zarr.open_group(str(store_path), mode="r")["rp/data"][:])
    steps = seam_steps(coadd, coverage)
    assert len(steps) >= 12  # every inner edge of the 3x3 mosaic measured
    # the noise of single pixels: neighbour differences cancel any level step
    noise = mad_sigma(np.diff(coadd, axis=1)[np.isfinite(np.diff(coadd, axis=1))]) / np.sqrt(2)
    return float(np.median(steps) / noise)


# --------------------------------------------------------------------------------------
def test_each_field_gets_its_own_coadds(header_run, batch):
    out = header_run.out_dir
    assert header_run.exit_code == EXIT_PARTIAL  # the three u' frames, and only they
    assert set(header_run.coadds) == {"ALPHA/rp", "ALPHA/gp", "BETA/rp", "BETA/gp",
                                      f"{MOSAIC_DIR}/rp", "PDS_110/gp", "PDS_110/rp",
                                      "PDS_110/zs"}
    for key, path in header_run.coadds.items():
        field, filt = key.split("/")
        assert path == out / field / f"coadd_{filt}.fits" and path.exists()
        assert (out / field / "store.zarr").is_dir()
    assert not list(out.glob("coadd_*.fits")) and not (out / "store.zarr").exists()
    manifest = Table.read(out / "manifest.ecsv")
    assert not [r for r in manifest if "overlap" in str(r["reason"])]
    failed = {str(r["name"]): str(r["reason"]) for r in manifest if r["status"] != "ok"}
    assert set(failed) == U_BAND
    assert all(reason.startswith("the header says its WCS failed (WCSERR = 4")
               for reason in failed.values())
    field_of = {str(r["name"]): str(r["field"]) for r in manifest}
    assert {field_of[n] for n in field_of if n.startswith("ogg0m404")} == {"PDS_110"}
    with fits.open(out / "PDS_110" / "coadd_rp.fits") as hdul:
        assert hdul[0].header["NCOMBINE"] == 3 and hdul[0].header["OBJECT"] == "PDS 110"
    for key, frames in (("ALPHA", batch["alpha"]), ("BETA", batch["beta"]),
                        (MOSAIC_DIR, batch["mosaic"])):
        for path in frames:
            name = path.name.removesuffix(".fits.fz")
            assert field_of[name] == key
            assert (out / key / f"{name}.wcs").exists()
    with fits.open(out / MOSAIC_DIR / "coadd_rp.fits") as hdul:
        assert hdul[0].header["NCOMBINE"] == len(batch["mosaic"])
        # one grid covers the whole mosaic: every frame of it is in the coadd somewhere
        assert hdul[0].data.shape[0] > 2.5 * SIDE and hdul[0].data.shape[1] > 2.5 * SIDE
        assert "REFFRAME" not in hdul[0].header
    with fits.open(out / "ALPHA" / "coadd_rp.fits") as hdul:
        assert hdul[0].data.shape == (SIDE, SIDE) and hdul[0].header["NCOMBINE"] == 2


def test_mosaic_has_no_seams_after_matching(header_run, batch, dask_client):
    store = header_run.out_dir / MOSAIC_DIR / "store.zarr"
    # the run as it is: each frame's sky removed, then the levels matched
    assert seam_in_sigma(store.parent / "coadd_rp.fits", store) < 0.1
    # the frames' skies kept: matched, no seam; not matched, a seam of several sigma
    keep = Settings().replace("combine", subtract_background=False)
    matched, unmatched = batch["root"] / "matched", batch["root"] / "unmatched"
    combine_store_path(store, matched, keep, client=dask_client)
    assert seam_in_sigma(matched / "coadd_rp.fits", store) < 0.1
    combine_store_path(store, unmatched, keep.replace("combine", match_background="off"),
                       client=dask_client)
    assert seam_in_sigma(unmatched / "coadd_rp.fits", store) > 1.0


def test_mosaic_equals_its_pointings_combined_one_at_a_time(header_run, batch, dask_client):
    """Where pointings do not overlap, the mosaic's coadd (sky levels not matched) is the
    coadd of that pointing's frames alone, on the same grid, to float32."""
    out = header_run.out_dir
    settings = Settings().replace("combine", match_background="off")
    whole = batch["root"] / "whole"
    combine_store_path(out / MOSAIC_DIR / "store.zarr", whole, settings, client=dask_client)
    with fits.open(whole / "coadd_rp.fits") as hdul:
        mosaic = hdul[0].data.astype(np.float64)
    coverage = np.isfinite(zarr.open_group(str(out / MOSAIC_DIR / "store.zarr"), mode="r")
                           ["rp/data"][:])
    order = open_store(out / MOSAIC_DIR / "store.zarr").filters["rp"]
    grid_file = out / MOSAIC_DIR / "coadd_rp.fits"
    compared = 0
    for k in (0, 4, 5):  # a corner, the centre and a side: every kind of neighbourhood
        frames = batch["groups"][k]
        alone = run(frames, "", batch["root"] / f"group{k}",
                    settings.replace("grid", method=str(grid_file)), client=dask_client)
        assert alone.exit_code == EXIT_OK and set(alone.coadds) == {"rp"}
        with fits.open(alone.coadds["rp"]) as hdul:
            single = hdul[0].data.astype(np.float64)
        names = {p.name.removesuffix(".fits.fz") for p in frames}
        mine = np.array([n in names for n in order])
        only_here = coverage[mine].all(axis=0) & ~coverage[~mine].any(axis=0)
        assert only_here.sum() > 0.3 * SIDE * SIDE
        np.testing.assert_allclose(mosaic[only_here], single[only_here], rtol=2e-6,
                                   atol=2e-6 * np.nanmax(np.abs(single)))
        compared += 1
    assert compared == 3


def test_fields_resume_combine_exclude_and_report(header_run, batch, lco_frames, dask_client):
    from click.testing import CliRunner

    from daskstack.cli import main

    out = header_run.out_dir
    frames = [*lco_frames, *batch["alpha"], *batch["beta"], *batch["mosaic"]]
    again = run(frames, "", out, TILED, client=dask_client)
    assert again.coadds == header_run.coadds
    # nothing registered again: every frame's registration time is the first run's
    before = Table.read(out / "manifest.ecsv")
    assert all(r.registered for r in again.frames if r.name not in U_BAND)
    first = {r.name: r.t_register for r in header_run.frames if r.registered}
    assert {r.name: r.t_register for r in again.frames if r.registered} == first
    # `daskstack combine RUN` combines every field's store; an exclusion marks the run's
    # manifest and leaves the other fields' frames alone
    victim = batch["alpha"][0].name.removesuffix(".fits.fz")
    result = CliRunner().invoke(main, ["combine", str(out), "--exclude", victim,
                                       "--scheduler", dask_client.scheduler.address],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    for field in ("ALPHA", "BETA", MOSAIC_DIR, "PDS_110"):
        assert str(out / field / "coadd_rp.fits") in result.output
    manifest = Table.read(out / "manifest.ecsv")
    status = dict(zip(manifest["name"], manifest["status"], strict=True))
    assert status[victim] == "excluded"
    assert sum(s == "excluded" for s in status.values()) == 1
    assert len(manifest) == len(before)
    with fits.open(out / "ALPHA" / "coadd_rp.fits") as hdul:
        assert hdul[0].header["NEXCL"] == 1
    page = make_report(out, client=dask_client, frames=False).read_text()
    for field in ("ALPHA", "BETA", MOSAIC_DIR, "PDS_110"):
        assert f"field {field}" in page and f"coadd_{field}__rp.png" in page


def test_a_fixed_grid_keeps_one_field_and_drops_what_lies_outside(batch, dask_client):
    """--reference fixes the grid: one field, today's layout, other fields' frames
    dropped as outside the grid."""
    frames = batch["alpha"] + batch["beta"]
    reference = batch["alpha"][0].name.removesuffix(".fits.fz")
    result = run(frames, "", batch["root"] / "fixed",
                 Settings().replace("grid", reference=reference), client=dask_client)
    assert set(result.coadds) == {"rp", "gp"}
    assert (batch["root"] / "fixed" / "coadd_rp.fits").exists()
    reasons = {r.name: r.reason for r in result.frames}
    for path in batch["beta"]:
        assert reasons[path.name.removesuffix(".fits.fz")] == (
            "does not overlap the output grid (reference grid)")


# --------------------------------------------------------------------------------------
def _copy_with(src, dst, **cards):
    with fits.open(src) as hdul:
        for key, value in cards.items():
            hdul["SCI"].header[key] = value
        hdul.writeto(dst)
    return dst


def test_frames_that_are_not_reduced_images_say_so(batch, dask_client, tmp_path):
    good = batch["alpha"]
    raw = _copy_with(good[0], tmp_path / "coj1m011-fa12-20230701-0101-e00.fits.fz",
                     RLEVEL=0)
    guider = _copy_with(good[1], tmp_path / "coj1m011-ef06-20230701-0102-g00.fits.fz",
                        OBSTYPE="GUIDE", INSTRUME="ef06")
    amps = tmp_path / "coj1m011-fa12-20230701-0103-e00.fits"
    hdus = [fits.PrimaryHDU()]
    for amp in range(4):
        header = fits.Header({"AMPNAME": f"Q{amp + 1}", "BIASSEC": "[2049:2080,1:2048]",
                              "DATASEC": "[1:2048,1:2048]"})
        hdus.append(fits.ImageHDU(np.zeros((64, 80), np.float32), header=header))
    fits.HDUList(hdus).writeto(amps)
    cube = tmp_path / "coj1m011-fa12-20230701-0104-e00.fits"
    fits.PrimaryHDU(np.zeros((4, 32, 32), np.float32)).writeto(cube)
    result = run([*good, raw, guider, amps, cube], "", tmp_path / "out", Settings(),
                 client=dask_client)
    reasons = {r.name: r.reason for r in result.frames}
    assert reasons[raw.name.removesuffix(".fits.fz")].startswith(
        "raw frame (RLEVEL = 0): daskstack needs the reduced image")
    assert "'-e91'" in reasons[raw.name.removesuffix(".fits.fz")]
    assert reasons[guider.name.removesuffix(".fits.fz")].startswith(
        "guider frame (OBSTYPE = 'GUIDE')")
    assert reasons[amps.stem].startswith("raw frame (4 amplifier extensions")
    assert reasons[cube.stem].startswith("image has 3 dimensions, expected 2: a raw frame")
    assert "e91" in reasons[amps.stem] and "e91" in reasons[cube.stem]
    assert set(result.coadds) == {"rp", "gp"} and result.n_combined == len(good)
    assert result.exit_code == 3


def test_guider_named_by_camera_or_product_name(tmp_path, batch):
    from daskstack.frames import FrameError, read_meta

    camera = _copy_with(batch["beta"][0], tmp_path / "a.fits.fz", INSTRUME="ef12")
    product = _copy_with(batch["beta"][0], tmp_path / "ogg2m001-kb42-20230701-0001-g00.fits.fz")
    for path, why in ((camera, "INSTRUME = 'ef12'"), (product, "LCO guider product")):
        with pytest.raises(FrameError, match="guider frame") as err:
            read_meta(path)
        assert why in err.value.reason


# --------------------------------------------------------------------------------------
def test_download_of_several_targets_then_run(httpserver, batch, dask_client, tmp_path,
                                              monkeypatch):
    """An archive query spanning two targets (served on 127.0.0.1), then `run` on what it
    fetched: one coadd per target and filter."""
    from click.testing import CliRunner

    from daskstack.cli import main
    from tests.test_archive import frame_json, paginated_handler, url_for

    monkeypatch.delenv("LCO_ARCHIVE_TOKEN", raising=False)
    records = []
    for frame_id, path in enumerate(batch["alpha"] + batch["beta"], start=5001):
        body = path.read_bytes()
        with fits.open(path) as hdul:
            target, filt = hdul["SCI"].header["OBJECT"], hdul["SCI"].header["FILTER"]
        record = frame_json(httpserver, frame_id, body, target_name=target, OBJECT=target,
                            primary_optical_element=filt, FILTER=filt)
        httpserver.expect_request(f"/files/{frame_id}.fits.fz").respond_with_data(body)
        records.append(record)
    seen: list[dict] = []
    httpserver.expect_request("/frames/").respond_with_handler(paginated_handler(records, seen))
    frames_dir = tmp_path / "frames"
    result = CliRunner().invoke(main, ["download", "--proposal", "LCOEPO2014B-010",
                                       "--rlevel", "91", "--out", str(frames_dir),
                                       "--archive-url", url_for(httpserver, "/")])
    assert result.exit_code == 0, result.output
    assert seen[-1]["proposal_id"] == "LCOEPO2014B-010"
    fetched = sorted(frames_dir.glob("*.fits.fz"))
    assert len(fetched) == len(records)
    out = run(fetched, "", tmp_path / "run", Settings(), client=dask_client)
    assert out.exit_code == EXIT_OK
    assert set(out.coadds) == {"ALPHA/rp", "ALPHA/gp", "BETA/rp", "BETA/gp"}
    for key, path in out.coadds.items():
        with fits.open(path) as hdul:
            assert hdul[0].header["OBJECT"] == key.split("/")[0]
            assert hdul[0].header["NCOMBINE"] == 2


def test_output_fields_names_and_links():
    """Unit: footprints that overlap chain into one field; the same OBJECT links frames
    a few arcminutes apart; names are file-safe and unique."""
    from daskstack._fields import output_fields
    from daskstack.frames import FrameMeta

    def meta(name, ra, dec, target):
        return FrameMeta(path=name, name=name, shape=(100, 100), filter="rp", exptime=1.0,
                         date_obs=None, mjd=None, gain=1.0, rdnoise=0.0, saturate=np.inf,
                         pixscale=1.0, ra=ra, dec=dec, object=target)

    side = 100 / 3600  # deg
    metas = [meta("a1", 10.0, 0.0, "NGC 1/2"), meta("a2", 10.0 + 0.8 * side, 0.0, ""),
             meta("a3", 10.0 + 1.6 * side, 0.0, "NGC 1/2"),  # chained through a2
             meta("b1", 50.0, 0.0, "NGC 1/2"),  # same name, elsewhere: its own field
             meta("c1", 10.0 + 0.1, 0.0, "NGC 1/2"),  # same name, 6' away: linked
             meta("d1", 90.0, 0.0, "")]
    fields = output_fields(metas, Settings())
    assert fields == [("NGC_1_2", ["a1", "a2", "a3", "c1"]), ("NGC_1_2-2", ["b1"]),
                      ("ra090.0000+00.0000", ["d1"])]
    assert output_fields(metas, Settings().replace("grid", reference="a1")) == [
        ("", [m.name for m in metas])]
    assert output_fields(metas[:3], Settings()) == [("", ["a1", "a2", "a3"])]


def test_sky_offsets_recovered_by_least_squares():
    from daskstack.skymatch import overlap_differences, solve_offsets

    rng = np.random.default_rng(3)
    levels = np.array([0.0, 5.0, -3.0, 2.0])
    stack = np.full((4, 60, 120), np.nan)
    for i in range(4):  # a strip of frames, each overlapping the next by a third
        stack[i, :, i * 20:i * 20 + 60] = levels[i] + rng.normal(0, 0.2, (60, 60))
    pairs = overlap_differences(stack, [0, 1, 2, 3], stride=1)
    assert {(i, j) for i, j, _, _ in pairs} == {(0, 1), (0, 2), (1, 2), (1, 3), (2, 3)}
    corrections = solve_offsets(pairs, 4)
    np.testing.assert_allclose(corrections, levels - levels.mean(), atol=0.05)
    assert solve_offsets([], 3).tolist() == [0.0, 0.0, 0.0]


def test_each_block_lists_exactly_the_frames_over_it(header_run):
    """The combine's per-block frame lists (recorded while registering) hold every frame
    with a value in the block and none without: a block reads nothing of the others."""
    from daskstack._pipeline import _block_members

    store = header_run.out_dir / MOSAIC_DIR / "store.zarr"
    stack = open_store(store)
    names = stack.filters["rp"]
    data = zarr.open_group(str(store), mode="r")["rp/data"][:]
    block = 64
    members = _block_members(stack, names, block)
    ny, nx = stack.grid.shape
    assert set(members) == {(y, x) for y in range(0, ny, block) for x in range(0, nx, block)}
    for (y0, x0), frames in members.items():
        has_data = np.isfinite(data[:, y0:y0 + block, x0:x0 + block]).any(axis=(1, 2))
        assert set(np.flatnonzero(has_data)) <= set(frames)
    # tile-level lists: a frame is listed only in the store tiles it wrote
    assert max(len(f) for f in members.values()) < len(names)
