"""The library baseline: ``reproject.mosaicking.reproject_and_coadd`` (mean).

Every frame's SCI extension is reprojected with ``reproject_interp`` (bilinear) onto
the first frame's grid and averaged, with reproject's own footprint weights; the
files are given by name, so reproject reads them one at a time. No bad-pixel masks.

    python reproject_coadd.py OUT_DIR FRAME [FRAME ...]

Writes OUT_DIR/mean.fits (NaN where no frame covers).
"""

import sys
import warnings
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.utils.exceptions import AstropyWarning
from astropy.wcs import WCS
from reproject import reproject_interp
from reproject.mosaicking import reproject_and_coadd

warnings.simplefilter("ignore", AstropyWarning)


def main(out_dir, files):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with fits.open(files[0]) as hdul:
        wcs_ref = WCS(hdul["SCI"].header)
        shape_ref = hdul["SCI"].data.shape
    array, footprint = reproject_and_coadd(
        [str(f) for f in files], wcs_ref, shape_out=shape_ref, hdu_in="SCI",
        reproject_function=reproject_interp, combine_function="mean",
        blank_pixel_value=np.nan)
    fits.HDUList([fits.PrimaryHDU(array.astype(np.float32), header=wcs_ref.to_header()),
                  fits.ImageHDU(footprint.astype(np.float32), name="FOOTPRINT")]).writeto(
        out_dir / "mean.fits", overwrite=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
