"""The learn.astropy tutorial "Image Registration and Combination", for N frames.

As the tutorial does it, all in memory: read each frame's SCI image and header WCS
with astropy, ``reproject_interp`` it onto the first frame's pixel grid (bilinear,
reproject's default), wrap each result in a ``CCDData`` whose mask is where the
reprojection gave NaN (no coverage), and combine them with ``ccdproc.Combiner``:
``average_combine()`` and ``median_combine()``. Both coadds are written as FITS
with the reference WCS. No bad-pixel mask is used (the tutorial uses none).

    python tutorial_method.py OUT_DIR FRAME [FRAME ...]

Writes OUT_DIR/mean.fits and OUT_DIR/median.fits.
"""

import sys
import warnings
from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.io import fits
from astropy.nddata import CCDData
from astropy.utils.exceptions import AstropyWarning
from astropy.wcs import WCS
from ccdproc import Combiner
from reproject import reproject_interp

warnings.simplefilter("ignore", AstropyWarning)


def main(out_dir, files):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # the reference frame: its WCS and shape define the output grid
    with fits.open(files[0]) as hdul:
        ref = hdul["SCI"]
        wcs_ref = WCS(ref.header)
        shape_ref = ref.data.shape

    reprojected = []
    for path in files:
        with fits.open(path) as hdul:
            sci = hdul["SCI"]
            data, wcs = sci.data, WCS(sci.header)
        array, footprint = reproject_interp((data, wcs), wcs_ref, shape_out=shape_ref)
        reprojected.append(CCDData(array, unit=u.electron,
                                   mask=np.isnan(array), wcs=wcs_ref))

    combiner = Combiner(reprojected)
    mean = combiner.average_combine()
    median = combiner.median_combine()

    header = wcs_ref.to_header()
    for name, image in (("mean", mean), ("median", median)):
        data = np.where(image.mask, np.nan, image.data) if image.mask is not None else image.data
        fits.PrimaryHDU(data, header=header).writeto(out_dir / f"{name}.fits", overwrite=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
