"""Writing coadds: FITS files streamed from the zarr store, with their provenance.

The primary HDU holds the coadd and the grid WCS; the ``WEIGHT`` extension the number
of frames (or summed weights) per pixel. Both are streamed row block by row block, so
the client never holds a whole mosaic, and written under a temporary name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.io import fits

from ._io import atomic_path

__all__ = ["coadd_header", "write_coadd_fits", "write_image_fits"]

WCS_KEYS = ("CTYPE", "CRVAL", "CRPIX", "CD", "PC", "CDELT", "CUNIT", "LONPOLE", "LATPOLE",
            "RADESYS", "EQUINOX", "WCSAXES")


def coadd_header(stack, filter_name, names, infos, cs, scales) -> fits.Header:
    """The coadd header: grid WCS, NCOMBINE, summed EXPTIME, DATE-OBS range, method,
    scaling and unit, input frame names (IMCMBnnn)."""
    header = stack.grid.header
    header["FILTER"] = (filter_name, "filter of the combined frames")
    header["NCOMBINE"] = (len(names), "number of frames combined")
    exptimes = [f["exptime"] for f in infos if f.get("exptime")]
    header["EXPTIME"] = (float(np.sum(exptimes)) if exptimes else 0.0,
                         "[s] summed exposure time of the inputs")
    dates = sorted(f["date_obs"] for f in infos if f.get("date_obs"))
    if dates:
        header["DATE-OBS"] = (dates[0], "start of the first input exposure")
        header["DATE-END"] = (dates[-1], "start of the last input exposure")
    header["COMBINE"] = (cs.method, "daskstack combine method")
    header["SCALING"] = (cs.scale, "daskstack per-frame scaling")
    if cs.method == "sigclip":
        header["CLIPSIG"] = (cs.sigma, "sigma-clipping threshold")
        header["CLIPITER"] = (cs.iters, "sigma-clipping iterations")
    header["BUNIT"] = (scales.unit("electron"), "unit of the coadd")
    header["ORIGIN"] = "daskstack"
    if stack.params.get("reference_frame"):
        header["REFFRAME"] = (stack.params["reference_frame"], "frame whose pixel grid this is")
    for i, name in enumerate(names, 1):
        header[f"IMCMB{i:03d}" if i < 1000 else "HISTORY"] = name
    return header


def write_coadd_fits(path: Path, header: fits.Header, image_array, weight_array) -> None:
    """Stream the coadd (primary HDU) and its weight map (``WEIGHT`` extension) row block by
    row block from zarr into FITS, so the client never holds the whole mosaic twice."""
    weight_header = fits.Header()
    weight_header["EXTNAME"] = ("WEIGHT", "frames (or summed weights) per pixel")
    for key in header:
        if key.startswith(WCS_KEYS):
            weight_header[key] = header[key]
    write_image_fits(path, [(header, image_array), (weight_header, weight_array)])


def write_image_fits(path: Path, planes) -> None:
    """Write ``[(header, 2-D array), ...]`` as a primary HDU and image extensions,
    float32, streamed row block by row block (arrays may be zarr arrays), atomically."""
    with atomic_path(path) as tmp:
        for n, (header, array) in enumerate(planes):
            ny, nx = array.shape
            rows = max(1, int(64 * 2**20 // (4 * nx)))
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
