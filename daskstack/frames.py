"""Reading frames: LCO-style multi-extension FITS (``SCI`` + ``BPM``, fpack or not).

Everything that is peculiar to LCO files is handled here, once: the extension
names, the sexagesimal RA/DEC pointing keywords, WCSERR, SATURATE, the
non-standard units that make astropy warn. Other stages see a `Frame` (pixels)
or a `FrameMeta` (a small picklable record that Dask tasks pass around).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.coordinates import Angle
from astropy.io import fits
from astropy.time import Time
from astropy.utils.exceptions import AstropyWarning
from astropy.wcs import WCS, FITSFixedWarning

from ._io import as_path, is_url
from .errors import DaskstackError
from .noise import GAIN_KEYS, RDNOISE_KEYS, SATURATION_KEYS, header_number

__all__ = [
    "Frame",
    "FrameError",
    "FrameMeta",
    "frame_name",
    "header_wcs",
    "header_wcs_failure",
    "pixel_unit",
    "quiet_astropy",
    "read_frame",
    "read_meta",
    "unusable_reason",
]

log = logging.getLogger(__name__)

FITS_SUFFIXES = (".fits.fz", ".fits.gz", ".fits", ".fit", ".fts", ".fz")


class FrameError(DaskstackError, ValueError):
    """A frame that cannot be used, with the file and the reason.

    ``str(err)`` is one line, ``"<file>: <reason>"``; ``err.reason`` alone is
    what the manifest records.
    """

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = " ".join(str(reason).split())  # one line, whatever astropy said
        super().__init__(f"{Path(self.path).name}: {reason}")

    def __reduce__(self):  # picklable: it travels back from Dask workers
        return type(self), (self.path, self.reason)


@contextlib.contextmanager
def quiet_astropy():
    """Silence astropy warnings that a user cannot act on (LCO units, FITS fixes).

    Used around reads only, never globally.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        warnings.simplefilter("ignore", fits.verify.VerifyWarning)
        warnings.simplefilter("ignore", AstropyWarning)
        yield


def frame_name(path) -> str:
    """The file name without its FITS suffixes (``a-e91.fits.fz`` -> ``a-e91``)."""
    name = Path(str(path)).name
    for suffix in FITS_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


@dataclass(frozen=True)
class FrameMeta:
    """What the pipeline needs to know about a frame, without its pixels.

    Pixel conventions everywhere in daskstack: 0-based (numpy / astropy
    ``pixel_to_world``), x along the second array axis.
    """

    path: str
    name: str
    shape: tuple[int, int]  # (ny, nx)
    filter: str
    exptime: float | None
    date_obs: str | None
    mjd: float | None
    gain: float  # e-/ADU (1.0 when no header keyword gives it: `gain_keyword` is "")
    rdnoise: float  # e- (0.0 when no header keyword gives it: `rdnoise_keyword` is "")
    saturate: float  # SATURATE (masked by read_frame); inf without it
    pixscale: float | None  # nominal arcsec / pixel from the header
    ra: float | None  # telescope pointing, degrees
    dec: float | None
    site: str = ""
    telescope: str = ""
    instrument: str = ""
    wcserr: int | None = None
    binning: int = 1
    object: str = ""
    # unit of the pixel values: BUNIT, normalised (`pixel_unit`); "" = not known
    bunit: str = ""
    hdu: str | int = "SCI"
    wcs_header: str = field(default="", repr=False)  # header WCS as text, picklable
    # why the header WCS cannot be used ("" = usable; NO_WCS = no WCS keywords at all)
    wcs_error: str = ""
    # problems that do not stop the frame, e.g. no DATE-OBS (recorded in the manifest)
    warnings: tuple[str, ...] = ()
    gain_keyword: str = ""  # the header keyword GAIN came from ("" = none: 1.0 assumed)
    rdnoise_keyword: str = ""  # the header keyword RDNOISE came from ("" = none)
    has_error: bool = False  # an ERR extension (1 sigma per pixel) is read with the pixels
    # the lowest of SATURATE and MAXLIN: above it a pixel's noise is not known (no weight),
    # though non-linear pixels still centroid well enough for the astrometry
    linear_limit: float = np.inf
    airmass: float | None = None  # AIRMASS keyword (>= 1), None where absent or implausible

    @property
    def epoch(self) -> float | None:
        """Decimal (Julian) year of the observation, for proper motion; None if unknown."""
        if self.mjd is not None:
            return float(Time(self.mjd, format="mjd").jyear)
        if self.date_obs:
            return float(Time(self.date_obs).jyear)
        return None

    def header_wcs(self) -> WCS:
        if self.wcs_error:
            raise FrameError(self.path, self.wcs_error)
        return header_wcs(fits.Header.fromstring(self.wcs_header), self.path)


@dataclass
class Frame:
    """A frame's pixels (float32), its bad-pixel mask (True = bad), SCI header and, where
    the file has one, its ``ERR`` extension (1 sigma per pixel, float32)."""

    meta: FrameMeta
    data: np.ndarray
    mask: np.ndarray
    header: fits.Header
    error: np.ndarray | None = None

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def path(self) -> str:
        return self.meta.path


NO_WCS = "no WCS in header"
# extensions that hold images but never the science image (LCO masks, errors, catalogs)
_AUXILIARY = {"BPM", "ERR", "CAT", "WEIGHT", "MASK", "VAR", "UNCERT"}
_WCS_KEYS = ("CTYPE1", "CTYPE2", "CRVAL1", "CRVAL2", "CD1_1", "CD2_2", "CDELT1", "CDELT2",
             "PC1_1", "PC2_2")


_NUMERIC_WCS_KEYS = ("CRVAL1", "CRVAL2", "CRPIX1", "CRPIX2", "CD1_1", "CD1_2", "CD2_1", "CD2_2",
                     "CDELT1", "CDELT2", "PC1_1", "PC1_2", "PC2_1", "PC2_2", "CROTA2")


def _image_hdu(hdul: fits.HDUList, path) -> tuple[str | int, fits.ImageHDU]:
    """The science image: the ``SCI`` extension, else the first HDU with image data
    that is not a mask or error extension."""
    if "SCI" in hdul:
        return "SCI", hdul["SCI"]
    for index, hdu in enumerate(hdul):
        if not isinstance(hdu, (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU)):
            continue
        if str(hdu.name).upper() in _AUXILIARY:
            continue
        naxis = hdu.header.get("ZNAXIS", hdu.header.get("NAXIS", 0))
        if isinstance(naxis, (int, np.integer)) and naxis > 0:
            return index, hdu
    names = ", ".join(str(h.name) or str(i) for i, h in enumerate(hdul))
    raise FrameError(path, f"no SCI extension and no other image HDU (HDUs: {names})")


# Frames that are not reduced science images, each with what to do about it: a table of
# (rule, reason), tried in order on the file's HDUs and its science header; the first rule
# that answers refuses the frame (the batch goes on). Guider first: a guide camera's raw
# frame is a guider frame before it is a raw one.
REDUCED_PRODUCT = ("daskstack needs the reduced image (for LCO frames the BANZAI product, "
                   "'-e91' in the name: 'daskstack download --rlevel 91')")


def _guider_frame(hdul: fits.HDUList, header: fits.Header, path) -> str:
    """A guide camera's frame: OBSTYPE says GUIDE, LCO's guider product name ('-g00'),
    or an LCO guide camera ('ef..')."""
    obstype = str(header.get("OBSTYPE", hdul[0].header.get("OBSTYPE", ""))).strip().upper()
    instrument = str(header.get("INSTRUME", hdul[0].header.get("INSTRUME", ""))).strip()
    if "GUIDE" in obstype:
        why = f"OBSTYPE = '{obstype}'"
    elif re.search(r"-g\d\d$", frame_name(path)):
        why = "an LCO guider product ('-g00' in the name)"
    elif re.fullmatch(r"ef\d\d", instrument.lower()):
        why = f"INSTRUME = '{instrument}', an LCO guide camera"
    else:
        return ""
    return (f"guider frame ({why}): a guide camera's image, not a science exposure; leave "
            "it out (LCO archive: 'daskstack download --obstype EXPOSE')")


def _raw_level(hdul: fits.HDUList, header: fits.Header, path) -> str:
    level = header.get("RLEVEL", hdul[0].header.get("RLEVEL"))
    if isinstance(level, (int, np.integer)) and level == 0:
        return f"raw frame (RLEVEL = 0): {REDUCED_PRODUCT}"
    return ""


_AMPLIFIER_KEYS = ("BIASSEC", "AMPNAME", "AMPID", "TRIMSEC")


def _raw_amplifiers(hdul: fits.HDUList, header: fits.Header, path) -> str:
    """Several image extensions read out by separate amplifiers (overscan sections)."""
    amps = [hdu for hdu in hdul[1:] if isinstance(hdu, (fits.ImageHDU, fits.CompImageHDU))
            and str(hdu.name).upper() not in _AUXILIARY
            and hdu.header.get("ZNAXIS", hdu.header.get("NAXIS", 0)) == 2]
    if len(amps) > 1 and any(k in hdu.header for hdu in amps for k in _AMPLIFIER_KEYS):
        return (f"raw frame ({len(amps)} amplifier extensions, not yet trimmed and "
                f"joined): {REDUCED_PRODUCT}")
    return ""


def _raw_cube(hdul: fits.HDUList, header: fits.Header, path) -> str:
    naxis = header.get("ZNAXIS", header.get("NAXIS", 0))
    if isinstance(naxis, (int, np.integer)) and naxis == 3:
        return (f"image has 3 dimensions, expected 2: a raw frame (one plane per "
                f"amplifier or readout)? {REDUCED_PRODUCT}")
    return ""


NOT_REDUCED = (_guider_frame, _raw_level, _raw_amplifiers, _raw_cube)


def _check_reduced(hdul: fits.HDUList, header: fits.Header, path) -> None:
    """FrameError with the first `NOT_REDUCED` rule's reason, if any says so."""
    for rule in NOT_REDUCED:
        reason = rule(hdul, header, path)
        if reason:
            raise FrameError(path, reason)


def _float_or_none(value):
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _angle_deg(value, unit) -> float | None:
    """RA/DEC keywords are sexagesimal strings in LCO headers, degrees elsewhere."""
    if value is None or value == "":
        return None
    try:
        if isinstance(value, str) and (":" in value or " " in value.strip()):
            return float(Angle(value, unit=unit).deg)
        return float(value)
    except (ValueError, TypeError):
        return None


def _wcs_problem(header: fits.Header, path) -> tuple[str, str]:
    """(header WCS as text, why it cannot be used or "")."""
    present = any(key in header for key in _WCS_KEYS)
    try:
        wcs = header_wcs(header, path)
        with quiet_astropy():
            return wcs.to_header(relax=True).tostring(), ""
    except FrameError as err:
        return "", (err.reason if present else NO_WCS)


def _date_obs(header: fits.Header, notes: list[str]):
    """(DATE-OBS or None, MJD or None); problems are appended to ``notes``."""
    mjd = _float_or_none(header.get("MJD-OBS"))
    date_obs = header.get("DATE-OBS")
    date_obs = (str(date_obs) if date_obs is not None else "").strip() or None
    if date_obs:
        try:
            with quiet_astropy():
                parsed = Time(date_obs, scale="utc")
                if mjd is None:
                    mjd = float(parsed.mjd)
        except Exception:  # astropy raises several types for strings that are no date
            notes.append(f"DATE-OBS {date_obs[:24]!r} is not a date: catalog proper "
                         "motions not applied")
            date_obs = None
    if mjd is not None and not (-1e6 < mjd < 1e6):  # ~ years -800 .. 4600
        mjd = None
        if date_obs is None:
            notes.append("MJD-OBS is not plausible: catalog proper motions not applied")
    if date_obs is None and mjd is None and not notes:
        notes.append("DATE-OBS missing: catalog proper motions not applied")
    return date_obs, mjd


def _meta_from_header(path, hdu_key, header: fits.Header, shape, has_error=False
                      ) -> FrameMeta:
    if len(shape) != 2:
        raise FrameError(path, f"image has {len(shape)} dimensions, expected 2")
    ny, nx = int(shape[0]), int(shape[1])
    if ny < 2 or nx < 2:
        raise FrameError(path, f"image is {nx}x{ny} pixels, too small")
    notes: list[str] = []
    date_obs, mjd = _date_obs(header, notes)
    binning = 1
    ccdsum = str(header.get("CCDSUM", "1 1")).split()
    if ccdsum and ccdsum[0].isdigit() and 1 <= int(ccdsum[0]) <= 64:
        binning = int(ccdsum[0])
    # LCO's own WCS-solve status (0 = solved); a float or a numeric string counts too
    wcserr = _float_or_none(header.get("WCSERR"))
    wcs_text, wcs_error = _wcs_problem(header, path)
    gain = header_number(header, GAIN_KEYS)
    rdnoise = header_number(header, RDNOISE_KEYS)
    if rdnoise is not None and rdnoise < 0:
        rdnoise = None
    levels = [v for v in (_float_or_none(header.get(k)) for k in SATURATION_KEYS)
              if v is not None and v > 0]
    return FrameMeta(
        path=str(path),
        name=frame_name(path),
        shape=(ny, nx),
        filter=str(header.get("FILTER", "") or "unknown").strip(),
        exptime=_float_or_none(header.get("EXPTIME", header.get("EXPOSURE"))),
        date_obs=str(date_obs) if date_obs else None,
        mjd=mjd,
        gain=gain if gain and gain > 0 else 1.0,
        rdnoise=rdnoise if rdnoise and rdnoise > 0 else 0.0,
        saturate=_float_or_none(header.get("SATURATE")) or np.inf,
        pixscale=_float_or_none(header.get("PIXSCALE")),
        ra=_angle_deg(header.get("RA"), "hourangle"),
        dec=_angle_deg(header.get("DEC"), "deg"),
        site=str(header.get("SITEID", "")).strip(),
        telescope=str(header.get("TELESCOP", "")).strip(),
        instrument=str(header.get("INSTRUME", "")).strip(),
        wcserr=int(wcserr) if wcserr is not None else None,
        binning=binning,
        object=str(header.get("OBJECT", "")).strip(),
        bunit=pixel_unit(header),
        hdu=hdu_key,
        wcs_header=wcs_text,
        wcs_error=wcs_error,
        warnings=tuple(notes),
        gain_keyword=_first_key(header, GAIN_KEYS) if gain and gain > 0 else "",
        rdnoise_keyword=_first_key(header, RDNOISE_KEYS) if rdnoise is not None else "",
        has_error=has_error,
        linear_limit=min(levels) if levels else np.inf,
        airmass=_airmass(header),
    )


def _airmass(header: fits.Header) -> float | None:
    value = _float_or_none(header.get("AIRMASS"))
    return value if value is not None and 1.0 <= value < 100.0 else None


def _first_key(header: fits.Header, keys) -> str:
    return next((k for k in keys if _float_or_none(header.get(k)) is not None), "")


# BUNIT spellings met in the wild -> one name each (FITS/astropy spelling, lower case)
_UNIT_NAMES = {"electron": "electron", "electrons": "electron", "e-": "electron",
               "e": "electron", "adu": "adu", "count": "adu", "counts": "adu", "ct": "adu",
               "dn": "adu"}


def pixel_unit(header: fits.Header) -> str:
    """The unit of a frame's pixel values: its BUNIT (normalised: ``'electron'``,
    ``'adu'``, or as written), else ``'electron'`` for an LCO processed frame (BANZAI
    ``e91`` products are in electrons and carry no BUNIT), else "" (not known)."""
    bunit = str(header.get("BUNIT", "") or "").strip()
    if bunit:
        return _UNIT_NAMES.get(bunit.lower(), bunit)
    if str(header.get("ORIGIN", "")).strip().upper() == "LCOGT" and header.get("RLEVEL") == 91:
        return "electron"
    return ""


_MAGIC = (b"SIMPLE  =", b"\x1f\x8b", b"BZh", b"PK\x03\x04")  # FITS, gzip, bzip2, zip


def _check_complete(path, hdul: fits.HDUList) -> None:
    """FrameError unless the file ends where its last HDU does (zero padding allowed).

    Read from the file's layout, not from astropy's warnings: `warnings.catch_warnings`
    is process-global, so on a worker with several threads one thread would record (and
    fail on) the warning that another thread's corrupt file raised.
    """
    # `HDUList.fileinfo` would render every header (and fail on a corrupt card): the
    # offsets astropy itself checks truncation against are read directly
    size = getattr(getattr(hdul, "_file", None), "size", 0) or 0  # 0: compressed stream
    ends = [hdu._data_offset + hdu._data_size for hdu in hdul
            if isinstance(getattr(hdu, "_data_offset", None), int)
            and isinstance(getattr(hdu, "_data_size", None), int)]
    expected = max(ends, default=0)
    if not size or not expected:
        return
    if size < expected:
        raise FrameError(path, f"truncated FITS file ({size} bytes, its headers describe "
                               f"{expected})")
    if size > expected:
        with as_path(path).open("rb") as handle:
            handle.seek(expected)
            extra = handle.read(2880 * 4)
        if extra.strip(b"\0"):  # not padding: a header astropy could not parse
            raise FrameError(path, f"corrupt or truncated FITS header after HDU "
                                   f"#{len(hdul) - 1}")


@contextlib.contextmanager
def _open(path):
    """Open a FITS file for reading; FrameError for a missing, empty, non-FITS, corrupt or
    truncated file (astropy only *warns* about truncation: here it is an error)."""
    name, path = str(path), as_path(path)  # a URL (s3://...) is read through fsspec
    try:
        if not path.exists():
            raise FrameError(name, "file does not exist")
        if not path.is_file():
            raise FrameError(name, "not a regular file")
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(9)
    except OSError as err:
        raise FrameError(name, f"cannot read file ({err.strerror or err})") from None
    if size == 0:
        raise FrameError(name, "empty file (0 bytes)")
    if not head.startswith(_MAGIC):
        raise FrameError(name, "not a FITS file (does not start with SIMPLE)")
    with contextlib.ExitStack() as stack:
        # an object is opened as a file object (read as astropy seeks: the headers,
        # then only the pixels asked for); a local file by name, as astropy prefers
        source = stack.enter_context(path.open("rb")) if is_url(name) else path
        with quiet_astropy():  # astropy only warns about truncation: checked below instead
            try:
                hdul = fits.open(source, memmap=False, lazy_load_hdus=False)
            except Exception as err:  # astropy raises many types for corrupt files
                raise FrameError(name, f"not a readable FITS file ({_short(err)})") from None
        try:
            _check_complete(name, hdul)
            yield hdul
        finally:
            hdul.close()


def _has_error(hdul: fits.HDUList, science_key) -> bool:
    """An ``ERR`` image extension beside the science image (not the science image itself)."""
    return (science_key != "ERR" and "ERR" in hdul and hdul["ERR"].header.get(
        "ZNAXIS", hdul["ERR"].header.get("NAXIS", 0)) == 2)


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def read_meta(path) -> FrameMeta:
    """Read only the header of a frame's science image (cheap: no pixels).

    Raises `FrameError` (naming the file and the problem) and nothing else for a bad file.
    """
    with quiet_astropy(), _open(path) as hdul:
        try:
            key, hdu = _image_hdu(hdul, path)
            header = hdu.header
            _check_reduced(hdul, header, path)
            prefix = "ZNAXIS" if isinstance(hdu, fits.CompImageHDU) and "ZNAXIS" in header \
                else "NAXIS"
            naxis = header.get(prefix, 0)
            if not isinstance(naxis, (int, np.integer)) or not 0 <= naxis <= 999:
                raise FrameError(path, f"invalid {prefix} = {naxis!r}")
            shape = (0,) * int(naxis)
            if naxis == 2:
                shape = tuple(header.get(f"{prefix}{i}", 0) for i in (2, 1))
                if not all(isinstance(n, (int, np.integer)) and n >= 0 for n in shape):
                    raise FrameError(path, f"invalid {prefix}2/{prefix}1 = {shape!r}")
            return _meta_from_header(path, key, header, shape, _has_error(hdul, key))
        except FrameError:
            raise
        except Exception as err:  # a malformed card raises many types deep in astropy
            raise FrameError(path, f"unreadable header ({_short(err)})") from None


def read_frame(path) -> Frame:
    """Read a frame: SCI pixels as float32, a bad-pixel mask, the SCI header.

    The mask is True where the pixel must not be used: non-zero in the ``BPM``
    extension (if any), not finite, or at/above the SATURATE level. An ``ERR``
    extension of the same shape is read too (`Frame.error`).
    Raises `FrameError` (naming the file and the problem) and nothing else for a bad
    file: unreadable, truncated, no image, all NaN, constant, fully masked.
    """
    with quiet_astropy(), _open(path) as hdul:
        try:
            key, hdu = _image_hdu(hdul, path)
            header = hdu.header.copy()
            _check_reduced(hdul, header, path)
            data = hdu.data
            if data is None:
                raise FrameError(path, "science extension holds no image data")
            meta = _meta_from_header(path, key, header, data.shape, _has_error(hdul, key))
            data = np.asarray(data, dtype=np.float32)
            error = None
            if meta.has_error:
                error = np.asarray(hdul["ERR"].data, dtype=np.float32)
                if error.shape != data.shape:
                    log.warning("%s: ERR shape %s differs from SCI %s; noise from GAIN and "
                                "RDNOISE instead", meta.name, error.shape, data.shape)
                    error = None
            with np.errstate(invalid="ignore", over="ignore"):
                mask = ~np.isfinite(data)
                all_nan = bool(mask.all())
                if "BPM" in hdul and hdul["BPM"].data is not None:
                    bpm = np.asarray(hdul["BPM"].data)
                    if bpm.shape == data.shape:
                        mask |= bpm != 0
                    else:
                        log.warning("%s: BPM shape %s differs from SCI %s; ignored",
                                    meta.name, bpm.shape, data.shape)
                if np.isfinite(meta.saturate):
                    mask |= data >= meta.saturate
        except FrameError:
            raise
        except MemoryError:
            raise FrameError(path, "image too large to read into memory") from None
        except Exception as err:  # astropy raises many types for corrupt data
            raise FrameError(path, f"corrupt or truncated FITS data ({_short(err)})") from None
    if all_nan:
        raise FrameError(path, "image is all NaN (no finite pixel)")
    if mask.all():
        raise FrameError(path, "every pixel is masked, saturated or not finite")
    # reductions over the usable pixels in place (a boolean-indexed copy of a 4096^2
    # frame cost as much as its mask)
    usable = ~mask
    lowest = float(np.min(data, where=usable, initial=np.inf))
    if lowest == float(np.max(data, where=usable, initial=-np.inf)):
        raise FrameError(path, f"image is constant (every usable pixel = {lowest:g})")
    # astropy's HDU objects hold reference cycles through the file's decompressed buffers
    # (tens of MiB for a 4096^2 frame); a young-generation pass (~1 ms) frees them now
    # instead of whenever the collector next runs, which keeps a worker's memory flat
    gc.collect(0)
    return Frame(meta=meta, data=data, mask=mask, header=header, error=error)


def unusable_reason(meta: FrameMeta, *, needs_exptime: bool = False,
                    needs_start: bool = True, trusts_header: bool = False) -> str:
    """Why a frame cannot be processed, from its header alone ("" = it can).

    ``needs_start``: the solver needs a start (a usable header WCS, or no WCS at all and
    RA/DEC + PIXSCALE); a header WCS that is present but broken (NaN, absurd scale) is
    a header that lies, so the frame fails rather than being solved from RA/DEC.
    ``trusts_header``: the header WCS is to be used as it is, so a header that says its
    own WCS failed (`header_wcs_failure`) refuses the frame.
    ``needs_exptime``: scaling by exposure time needs EXPTIME > 0.
    """
    if trusts_header:
        failed = header_wcs_failure(meta)
        if failed:
            return failed
    if needs_start and meta.wcs_error:
        if meta.wcs_error != NO_WCS:
            return f"header WCS unusable: {meta.wcs_error}"
        if meta.ra is None or meta.dec is None or not meta.pixscale or meta.pixscale <= 0:
            return f"{NO_WCS} and no RA/DEC + PIXSCALE keywords to start from"
    if needs_exptime:
        if meta.exptime is None:
            return "EXPTIME missing or not a number: cannot scale by exposure time"
        if meta.exptime <= 0:
            return f"EXPTIME = {meta.exptime:g} s (<= 0): cannot scale by exposure time"
    return ""


def header_wcs_failure(meta: FrameMeta) -> str:
    """Why the frame's own header says its WCS is no solution ("" = it does not say so).

    LCO writes ``WCSERR = 0`` when its pipeline solved the WCS; any other value means the
    solve failed and the header holds only the nominal pointing WCS (on the 0.4 m SBIG
    frames rotated 180 degrees and ~1.7% off in scale). A frame without WCSERR (other
    observatories, frames reduced elsewhere) does not say, and its header WCS is trusted.
    """
    if meta.wcserr is None or meta.wcserr == 0:
        return ""
    return (f"the header says its WCS failed (WCSERR = {meta.wcserr}: only the nominal "
            "pointing, not a solution); pass a catalog (--catalog) to solve this frame")


def header_wcs(header: fits.Header, path="<header>") -> WCS:
    """The celestial WCS of a header, checked: 2-D, celestial, finite, plausible scale."""
    for key in _NUMERIC_WCS_KEYS:
        try:
            value = header.get(key)
        except Exception:  # noqa: BLE001  (an unparsable card: show what it holds)
            try:
                value = header.cards[key].image[10:].split("/")[0].strip().strip("'").strip()
            except Exception:  # noqa: BLE001
                value = "<unparsable>"
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer,
                                                              np.floating)) \
                or not math.isfinite(value):
            raise FrameError(path, f"WCS keyword {key} = {str(value)[:20]!r} is not a finite "
                                   "number")
    with quiet_astropy():
        try:
            wcs = WCS(header, naxis=2, relax=True)
        except Exception as err:  # astropy raises many types for broken WCS keywords
            raise FrameError(path, f"invalid WCS in header ({_short(err)})") from None
    try:
        celestial = wcs.has_celestial and wcs.wcs.ctype[0] != ""
    except Exception:  # noqa: BLE001  (inconsistent axis types)
        celestial = False
    if not celestial:
        raise FrameError(path, "no celestial WCS in header")
    if not np.all(np.isfinite(wcs.wcs.crval)) or not np.all(np.isfinite(wcs.wcs.crpix)):
        raise FrameError(path, "WCS has non-finite CRVAL or CRPIX")
    if abs(wcs.wcs.crval[wcs.wcs.lat]) > 90:
        raise FrameError(path, f"WCS reference latitude {wcs.wcs.crval[wcs.wcs.lat]:g} deg "
                               "is beyond the pole")
    try:
        with quiet_astropy(), np.errstate(all="ignore"):
            scale = float(np.sqrt(np.abs(np.linalg.det(wcs.pixel_scale_matrix))) * 3600.0)
    except Exception:  # noqa: BLE001  (singular or inconsistent matrices)
        scale = np.nan
    if not np.isfinite(scale) or not (1e-3 < scale < 3600.0):
        raise FrameError(path, f"WCS pixel scale {scale:.3g} arcsec/px is not plausible")
    try:
        with quiet_astropy(), np.errstate(all="ignore"):
            wcs.wcs.set()
            ra, dec = wcs.wcs_pix2world([list(wcs.wcs.crpix)], 1)[0]
    except Exception as err:  # noqa: BLE001  (wcslib refuses the projection)
        raise FrameError(path, f"WCS cannot be evaluated ({_short(err)})") from None
    if not (np.isfinite(ra) and np.isfinite(dec)):
        raise FrameError(path, "WCS gives no sky position at the reference pixel")
    return wcs
