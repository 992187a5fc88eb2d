"""Writing coadds: FITS files streamed from the zarr store, with their provenance.

The primary HDU holds the coadd and the grid WCS; the extensions (`COADD_EXTENSIONS`)
its noise and coverage: ``ERR`` (1 sigma per pixel, image units), ``WEIGHT`` (inverse
variance: SWarp's MAP_WEIGHT convention, which SExtractor and photutils take as it
is), ``NFRAMES`` (frames combined per pixel) and ``EXPMAP`` (seconds of exposure per
pixel). All are streamed row block by row block, so the client never holds a whole
mosaic, and written under a temporary name.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import astropy.units as u
import numpy as np
from astropy.io import fits
from astropy.time import Time

from . import combine
from . import store as store_mod
from ._io import as_path, atomic_path
from .combine import header_cards
from .register import noise_correlation

__all__ = ["COADD_EXTENSIONS", "coadd_header", "coadd_planes", "exposure_span",
           "write_coadd_fits", "write_difference", "write_image_fits"]

# extension name -> its EXTNAME comment (and BUNIT: "image" = the coadd's, squared: "-2")
COADD_EXTENSIONS = {
    "ERR": "1-sigma error per pixel, image units",
    "WEIGHT": "inverse variance per pixel (MAP_WEIGHT)",
    "NFRAMES": "number of frames combined per pixel",
    "EXPMAP": "[s] exposure time per pixel",
}
WCS_KEYS = ("CTYPE", "CRVAL", "CRPIX", "CD", "PC", "CDELT", "CUNIT", "LONPOLE", "LATPOLE",
            "RADESYS", "EQUINOX", "WCSAXES")


def coadd_header(stack, filter_name, names, infos, cs, scales, frame_weights=None, *,
                 excluded: dict[str, str] | None = None) -> fits.Header:
    """The coadd header: grid WCS, NCOMBINE, summed EXPTIME, time span (DATE-OBS and
    MJD-OBS: start of the first exposure; DATE-END, MJD-END: end of the last), method, scaling,
    unit (BUNIT) and effective GAIN, the inputs' OBJECT/TELESCOP/INSTRUME, the catalog
    (REFCAT), software (CREATOR) and time written (DATE), input frame names (IMCMBnnn).

    ``infos`` are the store's frame records (`store.FrameInfo`), ``scales`` the
    `combine.FrameScales` applied, ``frame_weights`` those of a weighted combine.
    ``excluded``: ``{name: reason}`` of the registered frames of this filter left out
    (NEXCL, EXCLnnn names, and each reason in HISTORY).
    """
    from . import __version__

    header = stack.grid.header
    header["FILTER"] = (filter_name, "filter of the combined frames")
    header["NCOMBINE"] = (len(names), "number of frames combined")
    exptimes = [f.exptime for f in infos if f.exptime]
    header["EXPTIME"] = (float(np.sum(exptimes)) if exptimes else 0.0,
                         "[s] summed exposure time of the inputs")
    span = exposure_span(infos)
    if span is not None:
        start, end = span
        header["DATE-OBS"] = (start.isot, "[UTC] start of the first input exposure")
        header["MJD-OBS"] = (round(float(start.mjd), 8), "[d] MJD of DATE-OBS")
        header["DATE-END"] = (end.isot, "[UTC] end of the last input exposure")
        header["MJD-END"] = (round(float(end.mjd), 8), "[d] MJD of DATE-END")
    header["COMBINE"] = (cs.method, "daskstack combine method")
    header["SCALING"] = (cs.scale, "daskstack per-frame scaling")
    for key, value, comment in header_cards(cs.method, cs):
        header[key] = (value, comment)
    units = _distinct(infos, "bunit")
    if len(units) == 1 and units[0]:
        header["BUNIT"] = (scales.unit(units[0]), "unit of the coadd")
        gains = combine.electrons_per_unit(units[0], [f.gain or 1.0 for f in infos])
        gain = combine.effective_gain(cs.method, gains, scales.scales, frame_weights,
                                      nlow=cs.nlow, nhigh=cs.nhigh)
        header["GAIN"] = (float(f"{gain:.7g}"), "[e-/BUNIT] effective gain of the coadd")
    elif len(units) > 1:
        header["COMMENT"] = ("no BUNIT: the inputs are in different units ("
                             + ", ".join(unit or "unknown" for unit in units) + ")")
    for key, field, what in (("OBJECT", "object", "object"),
                             ("TELESCOP", "telescope", "telescope"),
                             ("INSTRUME", "instrument", "instrument")):
        values = [v for v in _distinct(infos, field) if v]
        if len(values) == 1:
            header[key] = (values[0], f"{what} of every input")
        elif values:
            header[key] = ("multiple", f"inputs of {len(values)} {what}s: see HISTORY")
            header["HISTORY"] = f"{key} of the inputs: " + ", ".join(values)
    register = stack.params.get("register") or {}
    if register:
        # resampling correlates neighbouring pixels: an aperture's variance is this
        # factor times its summed ERR**2 (1 for flux-conserving reprojection, whose ERR
        # is per output-pixel area; see daskstack.register)
        factor = (noise_correlation(register.get("order", "bilinear"))
                  if register.get("method", "interp") == "interp" else 1.0)
        header["NOISECOR"] = (round(factor, 4),
                              "aperture variance / sum of ERR**2 (resampling)")
        header["RESAMPLE"] = (register.get("order", "bilinear")
                              if register.get("method", "interp") == "interp"
                              else register.get("method"), "resampling kernel")
    # the sky removed (sky.BACKGROUNDS) and the cosmic-ray cleaning of the inputs
    background = register.get("background", "constant")
    if background == "constant" and not cs.subtract_background:
        background = "none"
    header["BKGSUB"] = (background, "sky removed: constant per frame, 2d mesh, none")
    if background == "2d":
        header["BKGMESH"] = (register.get("background_mesh"), "[px] 2-D sky mesh box")
    header["CRCLEAN"] = (bool(register.get("clean_cosmics", False)),
                         "inputs cleaned by L.A.Cosmic (astroscrappy)")
    catalog = stack.params.get("catalog")
    if catalog:
        header["REFCAT"] = (catalog, "reference catalog of the astrometry")
    if np.isfinite(scales.magzp):  # every frame brought to this zero point (photcal)
        from .photcal import filter_band

        header["MAGZP"] = (round(scales.magzp, 4), "[mag] mag = MAGZP - 2.5 log10(value)")
        header["MAGZPERR"] = (round(scales.magzp_err, 4), "[mag] error of MAGZP")
        header["PHOTSYS"] = (stack.params.get("photsys") or "unknown",
                             "photometric system of MAGZP")
        header["MAGBAND"] = (filter_band(filter_name) or "", "catalog band of MAGZP")
    header["CREATOR"] = (f"daskstack {__version__}", "software that made this file")
    header["DATE"] = (datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S"),
                      "[UTC] date this file was written")
    header["ORIGIN"] = "daskstack"
    if stack.params.get("reference_frame"):
        header["REFFRAME"] = (stack.params["reference_frame"], "frame whose pixel grid this is")
    for i, name in enumerate(names, 1):
        header[f"IMCMB{i:03d}" if i < 1000 else "HISTORY"] = name
    excluded = excluded or {}
    header["NEXCL"] = (len(excluded), "registered frames excluded from this coadd")
    for i, (name, reason) in enumerate(excluded.items(), 1):
        if i < 1000:
            header[f"EXCL{i:03d}"] = name
        header["HISTORY"] = f"excluded {name}: {reason}"
    return header


def exposure_span(infos) -> tuple[Time, Time] | None:
    """(start of the first exposure, end of the last) of `FrameInfo` records with
    ``date_obs`` (or ``mjd``) and ``exptime`` (a frame without EXPTIME ends where it
    starts); None without any date."""
    starts, ends = [], []
    for info in infos:
        if info.date_obs:
            start = Time(info.date_obs, scale="utc", precision=3)
        elif info.mjd is not None:
            start = Time(info.mjd, format="mjd", scale="utc", precision=3)
        else:
            continue
        starts.append(start)
        ends.append(start + (info.exptime or 0.0) * u.s)
    if not starts:
        return None
    return min(starts), max(ends)


def _distinct(infos, field) -> list[str]:
    """The distinct values of a frame-record field, in the order met."""
    return list(dict.fromkeys(str(getattr(f, field) or "").strip() for f in infos))


def write_difference(store_path: str, filter_name: str, index: int, scale: float,
                     offset: float, coadd_key: str, path, header: fits.Header) -> Path:
    """``path`` (FITS, grid WCS in ``header``): frame ``index`` of the store, scaled as in
    coadd ``coadd_key``, minus that coadd (`combine.difference_image`)."""
    frame = store_mod.read_plane(store_path, filter_name, index)
    coadd = store_mod.open_coadd_arrays(store_path, coadd_key)["image"][...]
    write_image_fits(as_path(path), [(header, combine.difference_image(frame, coadd, scale,
                                                                       offset))])
    return as_path(path)


def coadd_planes(result) -> dict:
    """The planes of a coadd file from a `combine.CombineResult` (float32): the image,
    then each of `COADD_EXTENSIONS`. Of numpy arrays (one block) or, lazily, of dask
    arrays (numpy's functions defer to them)."""
    variance = result.variance
    with np.errstate(divide="ignore", invalid="ignore"):  # NaN or 0 variance: weight 0
        weight = np.where(variance > 0, 1.0 / variance, 0.0)
    return {
        "image": result.image.astype("float32"),
        "ERR": np.sqrt(variance).astype("float32"),
        "WEIGHT": weight.astype("float32"),
        "NFRAMES": result.nused.astype("float32"),
        "EXPMAP": result.exposure.astype("float32"),
    }


def write_coadd_fits(path: Path, header: fits.Header, planes) -> None:
    """Stream the coadd (primary HDU, ``planes["image"]``) and its `COADD_EXTENSIONS`
    row block by row block from zarr into FITS, so the client never holds the whole
    mosaic twice. Each extension carries the grid WCS; ``ERR`` and ``WEIGHT`` the
    image's unit (and its inverse square)."""
    hdus = [(header, planes["image"])]
    unit = header.get("BUNIT")
    for name, comment in COADD_EXTENSIONS.items():
        ext_header = fits.Header()
        ext_header["EXTNAME"] = (name, comment)
        for key in header:
            if key.startswith(WCS_KEYS):
                ext_header[key] = header[key]
        if unit and name == "ERR":
            ext_header["BUNIT"] = unit
        elif unit and name == "WEIGHT":
            ext_header["BUNIT"] = f"({unit})-2"
        elif name == "EXPMAP":
            ext_header["BUNIT"] = "s"
        if name in ("ERR", "WEIGHT") and "NOISECOR" in header:
            ext_header["NOISECOR"] = (header["NOISECOR"], header.comments["NOISECOR"])
        hdus.append((ext_header, planes[name]))
    write_image_fits(path, hdus)


def write_image_fits(path: Path, planes) -> None:
    """Write ``[(header, 2-D array), ...]`` as a primary HDU and image extensions,
    float32, streamed row block by row block (arrays may be zarr arrays), atomically."""
    with atomic_path(path) as tmp:
        for n, (header, array) in enumerate(planes):
            ny, nx = array.shape
            rows = max(1, int(16 * 2**20 // (4 * nx)))  # 16 MiB a block: a worker writes it
            _stream_hdu(tmp, _image_header(header, ny, nx, primary_hdu=n == 0), array, rows)


def _image_header(header: fits.Header, ny: int, nx: int, primary_hdu: bool) -> fits.Header:
    hdu = fits.PrimaryHDU() if primary_hdu else fits.ImageHDU()
    out = hdu.header
    out["BITPIX"] = -32
    out["NAXIS"] = 2
    out.set("NAXIS1", nx, after="NAXIS")  # before PCOUNT/GCOUNT, as the standard says
    out.set("NAXIS2", ny, after="NAXIS1")
    if not primary_hdu:
        out["PCOUNT"] = 0
        out["GCOUNT"] = 1
    skip = {"SIMPLE", "XTENSION", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND", "PCOUNT",
            "GCOUNT"}
    for card in header.cards:
        if card.keyword in skip or card.keyword == "":
            continue
        out.append(card, end=True)
    return out


def _stream_hdu(path, header, array, rows) -> None:
    hdu = fits.StreamingHDU(str(path), header)
    ny = array.shape[0]
    for y0 in range(0, ny, rows):
        hdu.write(np.asarray(array[y0:y0 + rows], dtype=">f4"))
    hdu.close()
