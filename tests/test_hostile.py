"""Bad input and faults: every bad frame of the issue in one batch, exact reasons, the
batch goes on; catalogs that fail; output-directory safety; secrets and paths; exit codes.

One batch (`batch_run`, module scope) holds ALL the bad inputs next to good frames of
mixed sites, cameras, binning, sizes and filters; it runs once (about 5-10 s on the
shared 2-worker cluster) and each test reads its row of ``manifest.ecsv``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.table import Table, vstack

from daskstack import _pipeline as pipeline
from daskstack import _rundir as rundir
from daskstack import catalogs as catalogs_mod
from daskstack._pipeline import EXIT_FAILED, EXIT_OK, EXIT_PARTIAL, RunError, run
from daskstack.config import Settings
from daskstack.frames import FrameError, frame_name, read_meta
from daskstack.simulate import (
    lco_header,
    make_catalog,
    render_frame,
    true_frame_wcs,
    write_lco_frame,
)

CENTER_A = (150.1, 2.2)
CENTER_B = (152.6, 3.4)  # another part of the sky: in the catalog, far from A
CENTER_C = (148.0, -1.5)  # another part of the sky: not in the catalog
SEARCH_RADIUS_ARCMIN = 4.0  # of the batch runs (the header-offset frame is 9 arcmin off)
SHAPE = (384, 384)
PIXSCALE = 0.389

_WCS_CARDS = ("CTYPE1", "CTYPE2", "CRPIX1", "CRPIX2", "CRVAL1", "CRVAL2", "CUNIT1", "CUNIT2",
              "CD1_1", "CD1_2", "CD2_1", "CD2_2", "RADESYS")


def catalogs(seed=5):
    """(catalog of fields A and B, catalog of field C): Gaia-like tables."""
    kw = dict(mag_range=(11.0, 19.5), density_per_sq_deg=15000.0)
    a = make_catalog(CENTER_A, 0.22, seed=seed, **kw)
    b = make_catalog(CENTER_B, 0.08, seed=seed + 1, **kw)
    c = make_catalog(CENTER_C, 0.08, seed=seed + 2, **kw)
    a.meta.clear()
    b.meta.clear()
    return vstack([a, b]), c


def make_frame(path, catalog, center, *, shape=SHAPE, pixscale=PIXSCALE, filter_name="rp",
               site="lsc", telescope="1m0-09", instrument="fa15", binning=1, framenum=1,
               offset_arcsec=(25.0, -15.0), transparency=1.0, exptime=30.0, seed=0,
               date_obs=None, edit=None, drop=(), compressed=True):
    """A synthetic LCO frame of ``center`` (true), its header WCS ``offset_arcsec`` off.

    ``edit``: header cards to set afterwards; ``drop``: cards to remove. Each ``seed``
    is its own exposure, started at its own time (frames of one camera with the same
    DATE-OBS are copies of one exposure, used once)."""
    if date_obs is None:
        date_obs = f"2023-07-01T03:{seed:02d}:00"
    wcs = true_frame_wcs(center, shape, pixscale, rotation_deg=0.0)
    data, bpm, _ = render_frame(catalog, wcs, shape, epoch=2023.5, fwhm_px=3.0 / binning + 0.6,
                                sky=120.0, exptime=exptime, transparency=transparency,
                                rng=np.random.default_rng(seed))
    header = lco_header(wcs, shape, date_obs=date_obs, exptime=exptime,
                        filter_name=filter_name, pointing_offset_arcsec=offset_arcsec,
                        rotation_error_deg=0.2, site=site, telescope=telescope,
                        instrument=instrument, pixscale=pixscale, binning=binning,
                        framenum=framenum)
    header["CCDSUM"] = f"{binning} {binning}"
    for key in drop:
        header.remove(key, ignore_missing=True, remove_all=True)
    for key, value in (edit or {}).items():
        header[key] = value
    if compressed:
        write_lco_frame(path, data, bpm, header)
    else:
        fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(data, header=header, name="SCI"),
                      fits.ImageHDU(bpm, name="BPM")]).writeto(path)
    return path


def plain_sci(path, data, header=None):
    """An uncompressed LCO-like file: empty PRIMARY + SCI (+ nothing else)."""
    hdu = fits.ImageHDU(data, header=header, name="SCI")
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(path)
    return path


def good_header(path):
    with fits.open(path) as hdul:
        return hdul["SCI"].header.copy()


def build_batch(root):
    """Write the batch under ``root``; returns (inputs, catalog path, expectations).

    ``expectations``: frame name -> ("ok", warning or "") or ("failed", exact reason)."""
    root.mkdir(parents=True, exist_ok=True)
    cat_ab, cat_c = catalogs()
    cat_path = root / "catalog.ecsv"
    cat_ab.write(cat_path, format="ascii.ecsv")
    f = {}
    # -- good, mixed: sites, cameras, binning, sizes, filters
    f["g1"] = make_frame(root / "lsc1m009-fa15-20230701-0001-e91.fits.fz", cat_ab, CENTER_A,
                         seed=1)
    f["g2"] = make_frame(root / "coj1m011-fa12-20230701-0002-e91.fits.fz", cat_ab,
                         (CENTER_A[0] + 0.005, CENTER_A[1] - 0.004), shape=(320, 448),
                         site="coj", telescope="1m0-11", instrument="fa12", seed=2,
                         offset_arcsec=(-40.0, 30.0))
    f["g3"] = make_frame(root / "elp1m008-fa05-20230701-0003-e91.fits.fz", cat_ab,
                         (CENTER_A[0] - 0.003, CENTER_A[1] + 0.003), shape=(256, 256),
                         pixscale=2 * PIXSCALE, binning=2, site="elp", telescope="1m0-08",
                         instrument="fa05", seed=3, exptime=20.0)
    # a good frame in another filter whose FILTER card tries to escape the output directory
    f["g4"] = make_frame(root / "lsc1m009-fa15-20230701-0004-e91.fits.fz", cat_ab, CENTER_A,
                         filter_name="../../gp", seed=4)
    # no DATE-OBS: solved without proper motion, with a warning
    f["nodate"] = make_frame(root / "lsc1m009-fa15-20230701-0005-e91.fits.fz", cat_ab,
                             CENTER_A, seed=5, drop=("DATE-OBS", "MJD-OBS", "DAY-OBS"))

    # -- file-level problems
    raw = f["g1"].read_bytes()
    (root / "truncated-0001.fits.fz").write_bytes(raw[: len(raw) // 2])
    (root / "notfits.fits").write_text("SIMPLE? no: an HTML error page from a proxy\n" * 40)
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.zeros((64, 64), np.uint8), name="BPM")]
                 ).writeto(root / "nosci.fits")
    plain_sci(root / "cube.fits", np.ones((3, 64, 64), np.float32))
    header = good_header(f["g1"])  # at other times: not copies of g1's exposure
    header["DATE-OBS"] = "2023-07-01T03:30:00"
    plain_sci(root / "allnan.fits", np.full(SHAPE, np.nan, np.float32), header)
    header["DATE-OBS"] = "2023-07-01T03:31:00"
    plain_sci(root / "constant.fits", np.full(SHAPE, 100.0, np.float32), header)

    # -- header problems (the pixels are fine)
    f["nowcs"] = make_frame(root / "nowcs.fits.fz", cat_ab, CENTER_A, seed=6,
                            drop=_WCS_CARDS + ("RA", "DEC"))
    f["nanwcs"] = make_frame(root / "nanwcs.fits", cat_ab, CENTER_A, seed=7, compressed=False)
    _set_raw_card(f["nanwcs"], "CRVAL1", "NaN")
    f["absurdwcs"] = make_frame(root / "absurdwcs.fits.fz", cat_ab, CENTER_A, seed=8,
                                edit={"CD1_1": -2.0, "CD2_2": 2.0})
    f["offwcs"] = make_frame(root / "offwcs.fits.fz", cat_ab, CENTER_A, seed=9,
                             offset_arcsec=(9 * 60.0, 0.0))
    f["exp0"] = make_frame(root / "exp0.fits.fz", cat_ab, CENTER_A, seed=10,
                           edit={"EXPTIME": 0.0})
    f["expneg"] = make_frame(root / "expneg.fits.fz", cat_ab, CENTER_A, seed=11,
                             edit={"EXPTIME": -5.0})
    f["expmissing"] = make_frame(root / "expmissing.fits.fz", cat_ab, CENTER_A, seed=12,
                                 drop=("EXPTIME",))

    # -- sky problems
    f["clouds"] = make_frame(root / "clouds.fits.fz", cat_ab, CENTER_A, seed=13,
                             transparency=0.0)
    sparse = _brightest_in_frame(cat_ab, CENTER_A, 6)
    # taken on another night: no solved exposure of its camera that night lends it its
    # geometry (tests/test_thin_frames.py has the night that does), so it stays failed
    f["fewstars"] = make_frame(root / "fewstars.fits.fz", sparse, CENTER_A, seed=14,
                               offset_arcsec=(5.0, 5.0), date_obs="2023-07-03T03:14:00")
    f["fieldb"] = make_frame(root / "fieldb.fits.fz", cat_ab, CENTER_B, seed=15,
                             offset_arcsec=(10.0, 10.0))
    f["fieldc"] = make_frame(root / "fieldc.fits.fz", cat_c, CENTER_C, seed=16)

    inputs = [str(f["g1"]), str(f["g2"]), str(f["g3"]), str(f["g4"]), str(f["nodate"]),
              str(root / "truncated-0001.fits.fz"), str(root / "notfits.fits"),
              str(root / "nosci.fits"), str(root / "cube.fits"), str(root / "allnan.fits"),
              str(root / "constant.fits")] + [str(f[k]) for k in (
                  "nowcs", "nanwcs", "absurdwcs", "offwcs", "exp0", "expneg", "expmissing",
                  "clouds", "fewstars", "fieldb", "fieldc")]
    inputs.append(str(f["g2"]))  # the same frame twice
    return inputs, cat_path


def _set_raw_card(path, key, raw_value):
    """Put a value FITS does not allow (NaN) into a card, bypassing astropy's checks."""
    data = bytearray(path.read_bytes())
    start = 2880  # the SCI header follows the empty primary HDU
    for i in range(start, len(data), 80):
        if data[i:i + 8].decode().strip() == key:
            data[i:i + 80] = f"{key:<8}= {raw_value:>20}".ljust(80).encode()
            break
    else:
        raise KeyError(key)
    path.write_bytes(bytes(data))


def _brightest_in_frame(catalog, center, n):
    """The ``n`` brightest catalog stars within the central part of a frame at ``center``."""
    ra, dec = np.asarray(catalog["ra"]), np.asarray(catalog["dec"])
    half = 0.35 * SHAPE[0] * PIXSCALE / 3600.0
    inside = (np.abs((ra - center[0]) * np.cos(np.radians(center[1]))) < half) & (
        np.abs(dec - center[1]) < half)
    sub = catalog[inside]
    sub.sort("phot_g_mean_mag")
    return Table(sub[:n])


# --------------------------------------------------------------------------------------
# The batch: every bad input at once, next to good mixed frames
# --------------------------------------------------------------------------------------
TOKEN = "s3cr3t-LCO-token-0123456789abcdef"
GOOD_RP = ["lsc1m009-fa15-20230701-0001-e91", "coj1m011-fa12-20230701-0002-e91",
           "elp1m008-fa05-20230701-0003-e91", "lsc1m009-fa15-20230701-0005-e91"]
GOOD_GP = ["lsc1m009-fa15-20230701-0004-e91"]  # FILTER '../../gp'
R = SEARCH_RADIUS_ARCMIN
# the batch's fields (OBJECT 'SIMFIELD' in every frame): A, and the frame of field B far
# away, made unique (daskstack._fields.output_fields)
FIELD_A, FIELD_B = "SIMFIELD", "SIMFIELD-2"

# frame name -> exact reason recorded in manifest.ecsv (a regex where numbers vary)
EXPECTED_FAILURES = {
    "truncated-0001": re.compile(r"truncated FITS file \(\d+ bytes, its headers describe "
                                 r"\d+\)"),
    "notfits": "not a FITS file (does not start with SIMPLE)",
    "nosci": "no SCI extension and no other image HDU (HDUs: PRIMARY, BPM)",
    "cube": "image has 3 dimensions, expected 2: a raw frame (one plane per amplifier or "
            "readout)? daskstack needs the reduced image (for LCO frames the BANZAI product, "
            "'-e91' in the name: 'daskstack download --rlevel 91')",
    "allnan": "image is all NaN (no finite pixel)",
    "constant": "image is constant (every usable pixel = 100)",
    "nowcs": "no WCS in header and no RA/DEC + PIXSCALE keywords to start from",
    "nanwcs": "header WCS unusable: WCS keyword CRVAL1 = 'NaN' is not a finite number",
    "absurdwcs": "header WCS unusable: WCS pixel scale 7.2e+03 arcsec/px is not plausible",
    "offwcs": re.compile(rf"(too few matched stars \(\d < 8\)|match not significant .*) "
                         rf"within {R:g} arcmin of the header position|no consistent pattern "
                         rf"match within {R:g} arcmin"),
    "exp0": "EXPTIME = 0 s (<= 0): cannot scale by exposure time",
    "expneg": "EXPTIME = -5 s (<= 0): cannot scale by exposure time",
    "expmissing": "EXPTIME missing or not a number: cannot scale by exposure time",
    "clouds": "no stars detected",
    "fewstars": f"too few matched stars (5 < 8) within {R:g} arcmin of the header position",
    "fieldc": "no stars of catalog catalog.ecsv within 0.096 deg of RA 148.0069 Dec -1.5042 "
              "(a frame of another field?)",
}


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append(self.format(record))


def _tree(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    inputs, cat = build_batch(root / "inputs")
    return root, inputs, cat


@pytest.fixture(scope="module")
def batch_run(batch, dask_client):
    """The batch, once, with an archive token in the environment and DEBUG logging."""
    root, inputs, cat = batch
    settings = Settings()
    settings = settings.replace("solve", search_radius_arcmin=SEARCH_RADIUS_ARCMIN)
    handler = _Collect()
    logger = logging.getLogger("daskstack")  # DEBUG for daskstack (distributed's is noise)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    before = _tree(root)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("LCO_ARCHIVE_TOKEN", TOKEN)
            result = run(inputs, str(cat), root / "out", settings, client=dask_client)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    created = _tree(root) - before
    manifest = Table.read(root / "out" / "manifest.ecsv", format="ascii.ecsv")
    rows = {row["name"]: row for row in manifest}
    return result, rows, handler.lines, created


@pytest.mark.parametrize("name", sorted(EXPECTED_FAILURES))
def test_bad_input_fails_with_its_reason_and_the_batch_goes_on(batch_run, name):
    result, rows, _, _ = batch_run
    row = rows[name]
    expected = EXPECTED_FAILURES[name]
    assert row["status"] == "failed"
    if isinstance(expected, str):
        assert row["reason"] == expected
    else:
        assert expected.fullmatch(row["reason"]), row["reason"]
    assert "\n" not in row["reason"]
    # the report (RunResult / CLI summary) says the same, and names the file
    record = next(r for r in result.frames if r.name == name)
    assert record.status == "failed" and record.reason == row["reason"]
    # ... and the rest of the batch was processed
    for good in GOOD_RP + GOOD_GP:
        assert rows[good]["status"] == "ok" and rows[good]["registered"], good


def test_good_mixed_frames_are_combined(batch_run):
    """Different sites, cameras, sizes, binning (2x2, 0.778"/px) and filters in one run;
    the frame of another field (B, in the catalog) gets its own field and coadd."""
    result, rows, _, _ = batch_run
    assert result.exit_code == EXIT_PARTIAL
    assert len(rows) == len(EXPECTED_FAILURES) + len(GOOD_RP) + len(GOOD_GP) + 1
    assert set(result.coadds) == {f"{FIELD_A}/rp", f"{FIELD_A}/../../gp", f"{FIELD_B}/rp"}
    assert rows["fieldb"]["status"] == "ok" and rows["fieldb"]["field"] == FIELD_B
    assert {rows[n]["field"] for n in GOOD_RP + GOOD_GP} == {FIELD_A}
    with fits.open(result.coadds[f"{FIELD_B}/rp"]) as hdul:
        assert hdul[0].header["NCOMBINE"] == 1 and hdul[0].header["IMCMB001"] == "fieldb"
    with fits.open(result.coadds[f"{FIELD_A}/rp"]) as hdul:
        assert hdul[0].header["NCOMBINE"] == len(GOOD_RP)
        assert {hdul[0].header[f"IMCMB{i:03d}"] for i in range(1, 5)} == set(GOOD_RP)
        assert np.isfinite(hdul[0].data).mean() > 0.5
    with fits.open(result.coadds[f"{FIELD_A}/../../gp"]) as hdul:
        assert hdul[0].header["NCOMBINE"] == 1
    metas = {r.name: r.meta for r in result.frames if r.name in GOOD_RP}
    assert {m.site for m in metas.values()} == {"lsc", "coj", "elp"}
    assert {m.binning for m in metas.values()} == {1, 2}
    assert len({m.shape for m in metas.values()}) == 3
    for name in GOOD_RP:
        binning = 2 if "elp" in name else 1
        assert abs(rows[name]["pixel_scale_arcsec"] / binning - PIXSCALE) < 0.005


def test_missing_date_obs_warns_falls_back_and_is_recorded(batch_run):
    _, rows, logs, _ = batch_run
    row = rows["lsc1m009-fa15-20230701-0005-e91"]
    assert row["status"] == "ok" and _text(row["reason"]) == ""
    assert row["warnings"] == "DATE-OBS missing: catalog proper motions not applied"
    assert any("0005-e91.fits.fz: DATE-OBS missing" in line for line in logs)
    assert all(_text(rows[n]["warnings"]) == "" for n in GOOD_RP if "0005" not in n)


def _text(value) -> str:
    return "" if np.ma.is_masked(value) else str(value)


def test_same_frame_twice_is_used_once_with_a_warning(batch, batch_run):
    _, inputs, _ = batch
    _, rows, logs, _ = batch_run
    name = "coj1m011-fa12-20230701-0002-e91"
    assert sum(frame_name(p) == name for p in inputs) == 2
    assert name in rows  # one row: the manifest is keyed by frame
    assert any(f"{name}.fits.fz: given more than once; used once" in line for line in logs)


def test_no_token_in_logs_manifest_or_fits_headers(batch_run):
    result, _, logs, _ = batch_run
    assert logs and not any(TOKEN in line for line in logs)
    for path in result.out_dir.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_nothing_written_outside_the_output_directory(batch_run):
    """A FILTER of '../../gp' names a coadd inside OUT, not two directories up."""
    result, _, _, created = batch_run
    out = result.out_dir.resolve()
    outside = [p for p in created if out not in p.resolve().parents and p.resolve() != out]
    assert outside == []
    assert result.coadds[f"{FIELD_A}/../../gp"].parent.resolve() == out / FIELD_A
    assert result.coadds[f"{FIELD_A}/../../gp"].name == "coadd__.._gp.fits"


def test_outputs_checksums_match(batch_run):
    result, _, _, _ = batch_run
    recorded = rundir.read_outputs(result.out_dir)
    assert set(recorded) >= {f"{FIELD_A}/{n}.wcs" for n in GOOD_RP + GOOD_GP} | {
        f"{FIELD_A}/coadd_rp.fits", f"{FIELD_A}/coadd__.._gp.fits", f"{FIELD_B}/fieldb.wcs"}
    for name, (sha, size) in recorded.items():
        path = result.out_dir / name
        assert path.stat().st_size == size and rundir.sha256(path) == sha


# --------------------------------------------------------------------------------------
# Catalogs that cannot be used
# --------------------------------------------------------------------------------------
def _one_good(batch):
    _, inputs, _ = batch
    return [p for p in inputs if frame_name(p) == GOOD_RP[0]]


def test_empty_catalog(batch, dask_client, tmp_path):
    """A catalog file that cannot work is refused before anything is written (issue 20)."""
    cat = tmp_path / "empty.ecsv"
    Table(names=("ra", "dec", "mag"), dtype=(float, float, float)).write(cat)
    with pytest.raises(RunError) as err:
        run(_one_good(batch), str(cat), tmp_path / "out", client=dask_client)
    assert str(err.value) == f"catalog: {cat}: catalog holds no stars (no row with finite ra/dec)"
    assert not (tmp_path / "out").exists()


def test_catalog_without_the_needed_columns(batch, dask_client, tmp_path):
    cat = tmp_path / "columns.csv"
    Table({"x": [1.0, 2.0], "y": [3.0, 4.0], "flux": [5.0, 6.0]}).write(cat)
    with pytest.raises(RunError) as err:
        run(_one_good(batch), str(cat), tmp_path / "out", client=dask_client)
    assert str(err.value) == (
        f"catalog: {cat}: missing column(s) ra, dec (accepted names: ra: ra/ra_deg/raj2000/"
        "ra_icrs; dec: dec/dec_deg/dej2000/decj2000; found: x, y, flux)")
    assert not (tmp_path / "out").exists()


def _unreachable(*args, **kwargs):
    raise ConnectionError("[Errno 101] Network is unreachable")


def test_catalog_service_unreachable_without_cache(batch, dask_client, tmp_path,
                                                   monkeypatch):
    monkeypatch.setitem(catalogs_mod._SERVICES, "mast", _unreachable)
    settings = Settings()
    settings = settings.replace("catalog", retries=0)
    result = run(_one_good(batch), "gaia", tmp_path / "out", settings, client=dask_client)
    assert result.exit_code == EXIT_FAILED
    assert re.fullmatch(r"Gaia query via mast failed after 1 attempts for field RA "
                        r"150\.\d{4} Dec \+2\.\d{4} radius 0\.\d{3} deg: ConnectionError: "
                        r"\[Errno 101\] Network is unreachable", result.frames[0].reason), \
        result.frames[0].reason


def test_catalog_service_unreachable_with_cached_field(batch, dask_client, tmp_path,
                                                       monkeypatch):
    """A field queried before (cache written as catalogs.query_gaia does) runs offline."""
    _, _, cat = batch
    frames = _one_good(batch)
    cache = tmp_path / "cache"
    settings = Settings()
    settings = settings.replace("catalog", retries=0, cache_dir=str(cache))
    gaia_like = Table.read(cat, format="ascii.ecsv")
    def cone(center, radius_deg, *args, **kwargs):  # as the service answers: the cone only
        stars = SkyCoord(gaia_like["ra"], gaia_like["dec"], unit="deg")
        return gaia_like[stars.separation(center).deg <= radius_deg]

    monkeypatch.setitem(catalogs_mod._SERVICES, "mast", cone)
    pipeline._field_catalog([read_meta(frames[0])], "gaia", settings, cache)  # the earlier query
    assert len(list(cache.glob("gaia-mast_*.ecsv"))) == 1
    monkeypatch.setitem(catalogs_mod._SERVICES, "mast", _unreachable)
    result = run(frames, "gaia", tmp_path / "out", settings, client=dask_client)
    assert result.exit_code == EXIT_OK, result.frames[0].reason


# --------------------------------------------------------------------------------------
# Output safety (checked before any work starts)
# --------------------------------------------------------------------------------------
def _no_work_done(out: Path):
    return not list(out.glob("*.wcs")) and not (out / "store.zarr").exists()


def test_output_path_is_a_file(batch, tmp_path):
    out = tmp_path / "file"
    out.write_text("x")
    with pytest.raises(RunError, match=r"file: exists and is not a directory"):
        run(_one_good(batch), str(batch[2]), out)


def test_output_directory_cannot_be_created(batch, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunError, match=r"cannot create the output directory \(Not a "
                                       r"directory\)"):
        run(_one_good(batch), str(batch[2]), tmp_path / "file" / "out")


def test_output_directory_not_writable(batch, tmp_path, monkeypatch):
    """Tests run as root, for whom chmod does not stop writes: the write probe is made to
    fail as on a read-only mount (the code tries a real write, not os.access alone)."""
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(rundir.tempfile, "mkstemp", refuse)
    with pytest.raises(RunError, match=r"out: output directory is not writable \(Permission "
                                       r"denied\)"):
        run(_one_good(batch), str(batch[2]), tmp_path / "out")


@pytest.fixture
def read_only_mount(tmp_path):
    """A read-only filesystem: as root (CI), a small tmpfs mounted read-only for the test;
    otherwise one this machine has."""
    import subprocess

    target = tmp_path / "ro"
    target.mkdir()
    if os.geteuid() == 0 and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(target)],
            capture_output=True).returncode == 0:
        yield target
        subprocess.run(["umount", str(target)], check=True)
        return
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 3 and "ro" in fields[3].split(",") and Path(fields[1]).is_dir() \
                and fields[1] not in ("/",) and not os.access(fields[1], os.W_OK):
            yield Path(fields[1])
            return
    pytest.skip("no read-only mount on this machine, and none can be made (not root)")


def test_output_directory_on_a_read_only_mount(batch, read_only_mount):
    """The same for real, on a read-only filesystem."""
    with pytest.raises(RunError, match="output directory is not writable|cannot create"):
        run(_one_good(batch), str(batch[2]), read_only_mount)
    with pytest.raises(RunError, match="cannot create the output directory"):
        run(_one_good(batch), str(batch[2]), read_only_mount / "out")


def test_not_enough_disk_space_is_reported_before_work(batch, dask_client, tmp_path,
                                                       monkeypatch):
    _, _, cat = batch
    real = rundir.shutil.disk_usage
    monkeypatch.setattr(rundir.shutil, "disk_usage",
                        lambda path: real(path)._replace(free=100_000))
    out = tmp_path / "out"
    with pytest.raises(RunError, match=r"out: not enough disk space for the planned store: "
                                       r"the store and coadds need up to 0\.0\d GiB, 0\.00 "
                                       r"GiB free"):
        run(_one_good(batch), str(cat), out, client=dask_client)
    assert _no_work_done(out)


def test_store_estimate_follows_frames_and_grid(batch_run):
    """The estimate before solving uses frame shapes; after, the tiles on the grid."""
    result, _, _, _ = batch_run
    before = rundir.estimate_output_bytes(
        [rundir.FrameRecord(file=r.file, name=r.name, meta=r.meta) for r in result.frames])
    n_px = sum(r.meta.shape[0] * r.meta.shape[1] for r in result.frames
               if r.meta is not None)
    assert before >= 8 * n_px
    after = rundir.estimate_output_bytes(result.frames, result.grid, tile=128)
    ny, nx = result.grid.shape
    assert after >= 2 * 16 * ny * nx  # two filters, image + weight, zarr + FITS
    assert after < before


def test_different_run_is_not_overwritten_without_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"inputs": ["a.fits"]}))
    (out / "coadd_rp.fits").write_bytes(b"old coadd")
    rundir.OutputLog(out).add(out / "coadd_rp.fits")
    (out / "user-notes.txt").write_text("mine")
    with pytest.raises(RunError, match="holds a different run"):
        rundir.check_run_dir(out, {"inputs": ["b.fits"]}, overwrite=False)
    assert (out / "coadd_rp.fits").read_bytes() == b"old coadd"
    assert not rundir.check_run_dir(out, {"inputs": ["b.fits"]}, overwrite=True)
    assert not (out / "coadd_rp.fits").exists()  # no old coadd that looks like the new run's
    assert (out / "user-notes.txt").exists()  # what daskstack did not write is left alone
    assert json.loads((out / "run.json").read_text()) == {"inputs": ["b.fits"]}
    assert rundir.check_run_dir(out, {"inputs": ["b.fits"]}, overwrite=False)  # resumes


def test_stale_temporaries_of_a_killed_run_are_removed(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    stale = out / ".coadd_rp.fits.k2j4_x9a.tmp.fits"
    stale.write_bytes(b"half a coadd")
    keep = out / ".hidden-user-file"
    keep.write_text("mine")
    rundir.check_run_dir(out, {"inputs": []}, overwrite=False)
    assert not stale.exists() and keep.exists()


def test_atomic_write_keeps_the_previous_file_when_the_writer_dies(tmp_path):
    from daskstack._io import atomic_path

    path = tmp_path / "coadd_rp.fits"
    path.write_bytes(b"previous complete file")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_bytes(b"half of the new")
        raise RuntimeError("killed")
    assert path.read_bytes() == b"previous complete file"
    assert [p.name for p in tmp_path.iterdir()] == ["coadd_rp.fits"]


# --------------------------------------------------------------------------------------
# Exit codes through the command line (on the session's cluster)
# --------------------------------------------------------------------------------------
def _cli(args, env):
    """``daskstack run ARGS`` in this process (CliRunner); logging restored afterwards."""
    from click.testing import CliRunner

    from daskstack.cli import main

    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        return CliRunner().invoke(main, ["run", *args], env=env, catch_exceptions=False)
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])


def test_cli_exit_codes(batch, dask_client, tmp_path):
    """A run with one bad frame exits 3, a run of bad frames only exits 4 (0, all good, is
    checked by the crash drill's uninterrupted run); -vv logs hold no token."""
    root, inputs, cat = batch
    good = _one_good(batch)
    bad = [p for p in inputs if frame_name(p) in ("notfits", "cube")]
    common = ["--catalog", str(cat), "--scheduler", dask_client.scheduler.address,
              "--search-radius", str(SEARCH_RADIUS_ARCMIN), "-vv"]
    env = {"LCO_ARCHIVE_TOKEN": TOKEN}
    partial = _cli([*good, bad[0], "--out", str(tmp_path / "partial"), *common], env)
    assert partial.exit_code == EXIT_PARTIAL, partial.output[-2000:]
    assert "FAILED notfits.fits: not a FITS file (does not start with SIMPLE)" in \
        partial.output
    failed = _cli([*bad, "--out", str(tmp_path / "failed"), *common], env)
    assert failed.exit_code == EXIT_FAILED, failed.output[-2000:]
    assert "FAILED cube.fits: image has 3 dimensions, expected 2" in failed.output
    for res in (partial, failed):
        assert TOKEN not in res.output


def test_a_corrupt_file_read_beside_good_ones_in_threads_fails_alone(tmp_path):
    """A worker runs several tasks in threads: a corrupt file's complaint (astropy warns
    about truncation and unreadable headers) must fail that file only, never a good frame
    read at the same moment (a process-global warnings capture used to catch the other
    thread's warning)."""
    from concurrent.futures import ThreadPoolExecutor

    good = tmp_path / "good.fits"
    hdul = fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.ones((64, 64), np.float32))])
    hdul.writeto(good)
    raw = good.read_bytes()
    truncated = tmp_path / "truncated.fits"
    truncated.write_bytes(raw[:2880 + 1000])  # inside the extension's header
    short = tmp_path / "short.fits"
    short.write_bytes(raw[:-2000])  # inside the data
    paths = [good, truncated, good, short] * 50

    def outcome(path):
        try:
            read_meta(path)
            return "ok"
        except FrameError as err:
            return err.reason

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(outcome, paths))
    for path, result in zip(paths, results, strict=True):
        if path == good:
            assert result == "ok"
        elif path == truncated:
            assert result.startswith("corrupt or truncated FITS header after HDU #0"), result
        else:
            assert result.startswith("truncated FITS file"), result
