"""Fuzzing the FITS reader and header handling (hypothesis, bounded).

From one small valid LCO-like file (PRIMARY + SCI + BPM, uncompressed and fpack), hypothesis
truncates it, flips bytes in headers and data, and rewrites header cards with odd values
(NAXIS, BITPIX, CRVAL, CD, EXPTIME, DATE-OBS, RA/DEC ...). `read_meta`, `read_frame`,
`header_wcs` and `unusable_reason` must either succeed or raise `FrameError` with a
one-line reason naming the file -- never any other exception.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from astropy.io import fits
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daskstack.frames import FrameError, header_wcs, read_frame, read_meta, unusable_reason
from daskstack.simulate import lco_header, true_frame_wcs

SHAPE = (24, 32)
FUZZ = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _valid_bytes(compressed: bool) -> bytes:
    wcs = true_frame_wcs((150.1, 2.2), SHAPE, 0.389)
    header = lco_header(wcs, SHAPE, pointing_offset_arcsec=(10.0, 5.0))
    data = np.random.default_rng(1).normal(100, 5, SHAPE).astype(np.float32)
    sci_header = fits.Header([c for c in header.cards if c.keyword not in ("SIMPLE", "BITPIX",
                                                                          "NAXIS", "EXTEND")])
    if compressed:
        sci = fits.CompImageHDU(data, header=sci_header, name="SCI", compression_type="RICE_1")
        bpm = fits.CompImageHDU(np.zeros(SHAPE, np.uint8), name="BPM",
                                compression_type="RICE_1")
    else:
        sci = fits.ImageHDU(data, header=sci_header, name="SCI")
        bpm = fits.ImageHDU(np.zeros(SHAPE, np.uint8), name="BPM")
    buffer = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(), sci, bpm]).writeto(buffer)
    return buffer.getvalue()


VALID = {False: _valid_bytes(False), True: _valid_bytes(True)}


def _check(path) -> int:
    """Every entry point: success or FrameError (one line, naming the file); any other
    exception fails the test. Returns how many entry points read the file."""
    n_read = 0
    for func in (read_meta, read_frame):
        try:
            result = func(path)
        except FrameError as err:
            assert err.reason and "\n" not in str(err), repr(err)
            assert str(err).startswith(path.name + ": ")
            continue
        n_read += 1
        meta = result if func is read_meta else result.meta
        unusable_reason(meta, needs_exptime=True)
        try:
            meta.header_wcs()
        except FrameError:
            pass
        if func is read_frame:
            try:
                header_wcs(result.header, path)
            except FrameError:
                pass
    return n_read


@pytest.mark.parametrize("compressed", [False, True], ids=["fits", "fpack"])
@FUZZ
@given(data=st.data())
def test_truncated_or_corrupted_bytes(tmp_path, compressed, data):
    raw = bytearray(VALID[compressed])
    kind = data.draw(st.sampled_from(["truncate", "flip", "both", "zero-block"]))
    if kind in ("truncate", "both"):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    if kind in ("flip", "both") and raw:
        for _ in range(data.draw(st.integers(1, 12))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
    if kind == "zero-block" and len(raw) > 2880:
        block = data.draw(st.integers(0, len(raw) // 2880 - 1))
        raw[block * 2880:(block + 1) * 2880] = bytes(2880)
    path = tmp_path / "fuzz.fits"
    path.write_bytes(bytes(raw))
    n_read = _check(path)
    if kind == "truncate":
        assert n_read == 0  # a truncated file is refused, never read as if whole


ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-2**40, 2**40),
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.sampled_from([0, -1, 1, 2, 3, 999, 1e300, -1e300, 1e-300, 90.0001, -91.0, 360.0, 1e9]),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=30),
    st.sampled_from(["", " ", "NaN", "inf", "2023-13-45T99:99:99", "12:34:56.7", "-89:59:60",
                     "99:99:99", "1 1", "0 0", "x", "RA---TAN", "DEC--TAN", "RA---XYZ"]),
)
STRUCTURAL = {"NAXIS", "NAXIS1", "NAXIS2", "BITPIX", "EXTNAME", "BSCALE", "BZERO"}
KEYS = ["NAXIS", "NAXIS1", "NAXIS2", "BITPIX", "CRVAL1", "CRVAL2", "CRPIX1", "CRPIX2",
        "CD1_1", "CD1_2", "CD2_1", "CD2_2", "CDELT1", "PC1_1", "CTYPE1", "CTYPE2", "CUNIT1",
        "EXPTIME", "DATE-OBS", "MJD-OBS", "RA", "DEC", "PIXSCALE", "CCDSUM", "GAIN",
        "SATURATE", "RDNOISE", "WCSERR", "FILTER", "EXTNAME", "BSCALE", "BZERO", "LONPOLE",
        "RADESYS", "EQUINOX", "A_ORDER"]


def _raw_card(key, value) -> bytes:
    """An 80-byte card written as it stands (values FITS forbids included)."""
    if value is None:
        text = f"{key:<8}="
    elif isinstance(value, bool):
        text = f"{key:<8}= {'T' if value else 'F':>20}"
    elif isinstance(value, (int, float)):
        text = f"{key:<8}= {value!r:>20}"
    else:
        text = f"{key:<8}= '{value}'"
    return text[:80].ljust(80).encode("ascii", "replace")


@FUZZ
@given(edits=st.lists(st.tuples(st.sampled_from(KEYS), ODD_VALUES), min_size=1, max_size=5),
       remove=st.lists(st.sampled_from(KEYS), max_size=3))
def test_odd_header_cards(tmp_path, edits, remove):
    """Cards of the SCI header replaced (byte for byte, no astropy checks) or blanked."""
    raw = bytearray(VALID[False])
    start = 2880  # the SCI header follows the empty primary header
    cards = {}
    for i in range(start, len(raw), 80):
        key = raw[i:i + 8].decode().strip()
        if key == "END":
            break
        cards.setdefault(key, i)
    for key, value in edits:
        if key in cards:
            raw[cards[key]:cards[key] + 80] = _raw_card(key, value)
    for key in remove:
        if key in cards:
            raw[cards[key]:cards[key] + 80] = b" " * 80
    path = tmp_path / "odd.fits"
    path.write_bytes(bytes(raw))
    n_read = _check(path)
    if not STRUCTURAL & ({key for key, _ in edits} | set(remove)):
        assert n_read >= 1  # odd values in ordinary cards never make the header unreadable


@FUZZ
@given(values=st.fixed_dictionaries({
    key: st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.integers(
        -10**6, 10**6)) for key in ("CRVAL1", "CRVAL2", "CRPIX1", "CRPIX2", "CD1_1", "CD1_2",
                                    "CD2_1", "CD2_2")}),
       ctype=st.sampled_from([("RA---TAN", "DEC--TAN"), ("RA---TAN-SIP", "DEC--TAN-SIP"),
                              ("", ""), ("RA---SIN", "DEC--SIN"), ("GLON-TAN", "GLAT-TAN"),
                              ("RA---TAN", "RA---TAN"), ("DEC--TAN", "RA---TAN")]))
def test_header_wcs_on_arbitrary_numbers(values, ctype):
    """`header_wcs` on WCS keywords of any value (also via astropy Headers, NaN included)."""
    header = fits.Header()
    header["NAXIS"] = 2
    header["NAXIS1"], header["NAXIS2"] = SHAPE[1], SHAPE[0]
    header["CTYPE1"], header["CTYPE2"] = ctype
    for key, value in values.items():
        if value is not None:
            header[key] = value if not (isinstance(value, float) and not math.isfinite(value)) \
                else str(value)
    try:
        wcs = header_wcs(header, "x.fits")
    except FrameError as err:
        assert str(err).startswith("x.fits: ") and "\n" not in str(err)
    else:
        assert wcs.has_celestial
