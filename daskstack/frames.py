"""Reading frames: LCO-style multi-extension FITS (``SCI`` + ``BPM``, fpack or not).

Everything that is peculiar to LCO files is handled here, once: the extension
names, the sexagesimal RA/DEC pointing keywords, WCSERR, SATURATE, the
non-standard units that make astropy warn. Other stages see a `Frame` (pixels)
or a `FrameMeta` (a small picklable record that Dask tasks pass around).
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.coordinates import Angle
from astropy.io import fits
from astropy.time import Time
from astropy.utils.exceptions import AstropyWarning
from astropy.wcs import WCS, FITSFixedWarning

__all__ = [
    "Frame",
    "FrameError",
    "FrameMeta",
    "frame_name",
    "header_wcs",
    "quiet_astropy",
    "read_frame",
    "read_meta",
]

log = logging.getLogger(__name__)

FITS_SUFFIXES = (".fits.fz", ".fits.gz", ".fits", ".fit", ".fts", ".fz")


class FrameError(ValueError):
    """A frame that cannot be used, with the file and the reason.

    ``str(err)`` is one line, ``"<file>: <reason>"``; ``err.reason`` alone is
    what the manifest records.
    """

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{Path(self.path).name}: {reason}")


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
    gain: float
    rdnoise: float
    saturate: float
    pixscale: float | None  # nominal arcsec / pixel from the header
    ra: float | None  # telescope pointing, degrees
    dec: float | None
    site: str = ""
    telescope: str = ""
    instrument: str = ""
    wcserr: int | None = None
    binning: int = 1
    object: str = ""
    hdu: str | int = "SCI"
    wcs_header: str = field(default="", repr=False)  # header WCS as text, picklable

    @property
    def epoch(self) -> float | None:
        """Decimal (Julian) year of the observation, for proper motion; None if unknown."""
        if self.mjd is not None:
            return float(Time(self.mjd, format="mjd").jyear)
        if self.date_obs:
            return float(Time(self.date_obs).jyear)
        return None

    def header_wcs(self) -> WCS:
        return header_wcs(fits.Header.fromstring(self.wcs_header), self.path)


@dataclass
class Frame:
    """A frame's pixels (float32), its bad-pixel mask (True = bad) and SCI header."""

    meta: FrameMeta
    data: np.ndarray
    mask: np.ndarray
    header: fits.Header

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def path(self) -> str:
        return self.meta.path


def _image_hdu(hdul: fits.HDUList, path) -> tuple[str | int, fits.ImageHDU]:
    """The science image: the ``SCI`` extension, else the first HDU with 2-D data."""
    if "SCI" in hdul:
        return "SCI", hdul["SCI"]
    for index, hdu in enumerate(hdul):
        if isinstance(hdu, (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU)) and hdu.header.get(
            "NAXIS", 0
        ) > 0:
            return index, hdu
    raise FrameError(path, "no SCI extension and no image HDU")


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


def _meta_from_header(path, hdu_key, header: fits.Header, shape) -> FrameMeta:
    if len(shape) != 2:
        raise FrameError(path, f"image has {len(shape)} dimensions, expected 2")
    ny, nx = int(shape[0]), int(shape[1])
    if ny < 2 or nx < 2:
        raise FrameError(path, f"image is {nx}x{ny} pixels, too small")
    mjd = _float_or_none(header.get("MJD-OBS"))
    date_obs = header.get("DATE-OBS") or None
    if mjd is None and date_obs:
        try:
            mjd = float(Time(date_obs).mjd)
        except ValueError:
            date_obs = None
    binning = 1
    ccdsum = str(header.get("CCDSUM", "1 1")).split()
    if ccdsum and ccdsum[0].isdigit():
        binning = int(ccdsum[0])
    wcserr = header.get("WCSERR")
    with quiet_astropy():
        wcs_header = WCS(header, naxis=2).to_header(relax=True)
    return FrameMeta(
        path=str(path),
        name=frame_name(path),
        shape=(ny, nx),
        filter=str(header.get("FILTER", "") or "unknown").strip(),
        exptime=_float_or_none(header.get("EXPTIME", header.get("EXPOSURE"))),
        date_obs=str(date_obs) if date_obs else None,
        mjd=mjd,
        gain=_float_or_none(header.get("GAIN")) or 1.0,
        rdnoise=_float_or_none(header.get("RDNOISE")) or 0.0,
        saturate=_float_or_none(header.get("SATURATE")) or np.inf,
        pixscale=_float_or_none(header.get("PIXSCALE")),
        ra=_angle_deg(header.get("RA"), "hourangle"),
        dec=_angle_deg(header.get("DEC"), "deg"),
        site=str(header.get("SITEID", "")).strip(),
        telescope=str(header.get("TELESCOP", "")).strip(),
        instrument=str(header.get("INSTRUME", "")).strip(),
        wcserr=int(wcserr) if isinstance(wcserr, (int, np.integer)) else None,
        binning=binning,
        object=str(header.get("OBJECT", "")).strip(),
        hdu=hdu_key,
        wcs_header=wcs_header.tostring(),
    )


def _open(path):
    path = Path(path)
    if not path.exists():
        raise FrameError(path, "file does not exist")
    try:
        return fits.open(path, memmap=False)
    except (OSError, ValueError, TypeError, IndexError, KeyError) as err:
        raise FrameError(path, f"not a readable FITS file ({err})") from None


def read_meta(path) -> FrameMeta:
    """Read only the header of a frame's science image (cheap: no pixels)."""
    with quiet_astropy(), _open(path) as hdul:
        try:
            key, hdu = _image_hdu(hdul, path)
            header = hdu.header
            shape = tuple(header.get(f"ZNAXIS{i}", header.get(f"NAXIS{i}", 0)) for i in (2, 1))
            naxis = header.get("ZNAXIS", header.get("NAXIS", 0))
            if naxis != 2:
                shape = (0,) * int(naxis)
            return _meta_from_header(path, key, header, shape)
        except FrameError:
            raise
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise FrameError(path, f"unreadable header ({err})") from None


def read_frame(path) -> Frame:
    """Read a frame: SCI pixels as float32, a bad-pixel mask, the SCI header.

    The mask is True where the pixel must not be used: non-zero in the ``BPM``
    extension (if any), not finite, or at/above the SATURATE level.
    Raises `FrameError` naming the file and the problem.
    """
    with quiet_astropy(), _open(path) as hdul:
        try:
            key, hdu = _image_hdu(hdul, path)
            header = hdu.header.copy()
            data = hdu.data
            if data is None:
                raise FrameError(path, "science extension holds no image data")
            meta = _meta_from_header(path, key, header, data.shape)
            data = np.asarray(data, dtype=np.float32)
            mask = ~np.isfinite(data)
            if "BPM" in hdul and hdul["BPM"].data is not None:
                bpm = np.asarray(hdul["BPM"].data)
                if bpm.shape == data.shape:
                    mask |= bpm != 0
                else:
                    log.warning("%s: BPM shape %s differs from SCI %s; ignored", meta.name,
                                bpm.shape, data.shape)
            if np.isfinite(meta.saturate):
                mask |= data >= meta.saturate
        except FrameError:
            raise
        except (OSError, ValueError, TypeError, KeyError, IndexError, EOFError) as err:
            raise FrameError(path, f"corrupt or truncated FITS data ({err})") from None
    if mask.all():
        raise FrameError(path, "every pixel is masked or not finite")
    return Frame(meta=meta, data=data, mask=mask, header=header)


def header_wcs(header: fits.Header, path="<header>") -> WCS:
    """The celestial WCS of a header, checked: 2-D, celestial, finite, plausible scale."""
    with quiet_astropy():
        try:
            wcs = WCS(header, naxis=2, relax=True)
        except Exception as err:  # astropy raises many types for broken WCS keywords
            raise FrameError(path, f"invalid WCS in header ({err})") from None
    if not wcs.has_celestial or wcs.wcs.ctype[0] == "":
        raise FrameError(path, "no celestial WCS in header")
    try:
        scale = np.sqrt(np.abs(np.linalg.det(wcs.pixel_scale_matrix))) * 3600.0
    except (ValueError, np.linalg.LinAlgError):
        scale = np.nan
    if not np.all(np.isfinite(wcs.wcs.crval)) or not np.all(np.isfinite(wcs.wcs.crpix)):
        raise FrameError(path, "WCS has non-finite CRVAL or CRPIX")
    if not np.isfinite(scale) or not (1e-3 < scale < 3600.0):
        raise FrameError(path, f"WCS pixel scale {scale:.3g} arcsec/px is not plausible")
    return wcs
