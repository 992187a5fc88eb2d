"""`daskstack solve` on the twelve real LCO frames, judged by its `.wcs` outputs.

Every frame is first rewritten (uncompressed, into tmp) with a start WCS that is
wrong the way real headers are: LCO's nominal WCS (rotated 180 deg and 1.7 % off in
scale against the truth), or the solved WCS moved 5' and rotated 2 deg. The CAT
extension and the solved WCS are never given to the solver (they are the answer).
"""

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from click.testing import CliRunner

from daskstack._validate import wcs_separation_arcsec
from daskstack.cli import main
from daskstack.frames import quiet_astropy

SOLVED = [f"ogg0m404-kb82-20170815-{n}-e91" for n in range(1156, 1165)]
UBAND = [f"ogg0m404-kb82-20170815-{n}-e91" for n in (1153, 1154, 1155)]
SHAPE = (1020, 1523)
WORST_ARCSEC = 0.40
MEDIAN_ARCSEC = 0.20
WCS_PREFIXES = ("CD1_", "CD2_", "CRPIX", "CRVAL", "CTYPE", "PC1_", "PC2_", "CDELT", "CUNIT")


def truth_wcs(lco_dir, name):
    with quiet_astropy():
        return WCS(fits.getheader(lco_dir / f"{name}.fits.fz", "SCI"), naxis=2)


def write_start(lco_dir, name, out, start):
    """Copy SCI + BPM into ``out`` with the start WCS ``start(header) -> (crval, cd)``."""
    with quiet_astropy(), fits.open(lco_dir / f"{name}.fits.fz") as hdul:
        sci = hdul["SCI"].header.copy()
        crval, cd = start(sci)
        for key in list(sci):
            if key.startswith(WCS_PREFIXES):
                del sci[key]
        sci["CTYPE1"], sci["CTYPE2"] = "RA---TAN", "DEC--TAN"
        sci["CRPIX1"], sci["CRPIX2"] = (SHAPE[1] + 1) / 2, (SHAPE[0] + 1) / 2
        sci["CRVAL1"], sci["CRVAL2"] = crval
        (sci["CD1_1"], sci["CD1_2"]), (sci["CD2_1"], sci["CD2_2"]) = cd
        sci["WCSERR"] = 4
        fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(hdul["SCI"].data, sci, name="SCI"),
                      fits.ImageHDU(hdul["BPM"].data, name="BPM")]).writeto(
            out / f"{name}.fits")


def nominal_start(header):
    from astropy.coordinates import SkyCoord

    c = SkyCoord(header["RA"], header["DEC"], unit=("hourangle", "deg"))
    return (c.ra.deg, c.dec.deg), [[0.0, -3.222e-4], [3.222e-4, 0.0]]


def moved_start(reference):
    """The solved WCS of ``reference`` moved by 5' and rotated by 2 deg."""
    theta = np.radians(2.0)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    ra, dec = reference.wcs.crval
    step = 5.0 / 60
    crval = (ra + 0.8 * step / np.cos(np.radians(dec)), dec + 0.6 * step)
    return lambda header: (crval, (rot @ reference.wcs.cd).tolist())


def solve_all(lco_dir, tmp_path, start_for):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in SOLVED + UBAND:
        write_start(lco_dir, name, inputs, start_for(name))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [
        "solve", *sorted(str(p) for p in inputs.glob("*.fits")), "--catalog",
        str(lco_dir / "refcat-pds110.ecsv"), "--out", str(out), "--workers", "2", "-q"])
    assert result.exit_code in (0, 3), result.output
    return out, Table.read(out / "solve.ecsv")


@pytest.fixture(scope="module")
def from_nominal(lco_dir, tmp_path_factory):
    return solve_all(lco_dir, tmp_path_factory.mktemp("nominal"), lambda name: nominal_start)


@pytest.fixture(scope="module")
def from_moved(lco_dir, tmp_path_factory):
    reference = truth_wcs(lco_dir, SOLVED[0])
    return solve_all(lco_dir, tmp_path_factory.mktemp("moved"),
                     lambda name: moved_start(truth_wcs(lco_dir, name) if name in SOLVED
                                              else reference))


@pytest.mark.parametrize("start", ["from_nominal", "from_moved"])
def test_solved_frames_agree_with_lco(start, request, lco_dir):
    out, qa = request.getfixturevalue(start)
    status = {row["name"]: row["status"] for row in qa}
    errors = {}
    for name in SOLVED:
        assert status[name] == "ok", (name, qa)
        errors[name] = wcs_separation_arcsec(out / f"{name}.wcs", truth_wcs(lco_dir, name),
                                             SHAPE)
    # measured by `python -m benchmarks astrometry-real` (benchmarks/results/
    # astrometry-real-20261130.json): worst 0.362", median 0.167" from either start;
    # asserted with a margin of 0.04" (worst) and 0.03" (median)
    assert max(errors.values()) <= WORST_ARCSEC, errors
    assert np.median(list(errors.values())) <= MEDIAN_ARCSEC, errors


@pytest.mark.parametrize("start", ["from_nominal", "from_moved"])
def test_uband_consistent_with_gband(start, request, lco_dir):
    """u' frames: never a wrong WCS; solved ones sit where the g' frames say (centre
    within 10", CD within 0.3 %) and agree with each other once the dither is removed."""
    out, qa = request.getfixturevalue(start)
    rows = {row["name"]: row for row in qa}
    g = truth_wcs(lco_dir, SOLVED[0])
    centre = ((SHAPE[1] - 1) / 2, (SHAPE[0] - 1) / 2)
    g_centre = g.pixel_to_world(*centre)
    solved = []
    for name in UBAND:
        if rows[name]["status"] != "ok":
            assert rows[name]["reason"], name
            assert not (out / f"{name}.wcs").exists()
            continue
        with quiet_astropy():
            wcs = WCS(fits.getheader(out / f"{name}.wcs"))
        assert wcs.pixel_to_world(*centre).separation(g_centre).arcsec < 10.0, name
        np.testing.assert_allclose(wcs.pixel_scale_matrix, g.pixel_scale_matrix, rtol=0,
                                   atol=0.003 * 3.17e-4)
        solved.append(wcs)
    if start == "from_nominal":
        assert len(solved) == 3, qa  # LCO's own pipeline failed on these: we must not
    reference = solved[0]
    c0 = reference.pixel_to_world(*centre)
    for wcs in solved[1:]:
        shifted = wcs.deepcopy()
        x, y = shifted.world_to_pixel(c0)
        shifted.wcs.crpix = shifted.wcs.crpix + (np.array(centre) - [x, y])
        assert wcs_separation_arcsec(shifted, reference, SHAPE) <= 0.5


def measured_dither(lco_dir, name, reference):
    """The pixel shift of ``reference``'s stars against ``name``'s, measured from the
    frames themselves (mode of the pairwise offsets of their detections)."""
    from daskstack.astrometry import _shift_between
    from daskstack.config import Settings
    from daskstack.detect import detect_sources
    from daskstack.frames import read_frame

    settings = Settings()
    xy = detect_sources(read_frame(lco_dir / f"{name}.fits.fz"), settings.detect).xy
    other = detect_sources(read_frame(lco_dir / f"{reference}.fits.fz"), settings.detect).xy
    shift = _shift_between(xy, other, 30.0)
    assert shift is not None, (name, reference)
    return shift


@pytest.mark.parametrize("start", ["from_nominal", "from_moved"])
def test_uband_all_solved_within_half_arcsec_of_gband(start, request, lco_dir):
    """Issue 19: every u' frame (LCO's own solve failed, WCSERR=4) is solved, whatever
    the start, and sits within 0.5" of the same night's g' solution (daskstack's, of the
    same run: LCO's own g' WCS is itself ~0.3" from the catalog, see the data README) once
    the dither between the two exposures, measured from their detections, is removed.
    The manifest says which evidence solved each frame."""
    out, qa = request.getfixturevalue(start)
    rows = {row["name"]: row for row in qa}
    g_name = SOLVED[0]
    with quiet_astropy():
        g = WCS(fits.getheader(out / f"{g_name}.wcs"))
    for name in UBAND:
        assert rows[name]["status"] == "ok", (name, rows[name]["reason"])
        assert rows[name]["method"] in ("pattern", "companions", "constrained"), rows[name]
        with quiet_astropy():
            wcs = WCS(fits.getheader(out / f"{name}.wcs"))
        # a star at pixel p of the u' frame is at p + dither in the g' frame
        dither = measured_dither(lco_dir, name, g_name)
        moved = wcs.deepcopy()
        moved.wcs.crpix = moved.wcs.crpix + dither
        assert wcs_separation_arcsec(moved, g, SHAPE) <= 0.5, (name, dither)
    assert {rows[name]["method"] for name in SOLVED} == {"pattern"}
