"""The physical floor: read and decompress every input once and write the outputs once,
with no computation in between.

Each frame's SCI and BPM extensions are read with astropy (which decompresses the
fpack tiles, as every contender that reads .fits.fz does); then one grid-sized
float32 image and one grid-sized float32 weight map (what a coadd run writes) are
written. A contender cannot be faster than this on the same machine.

    python floor.py OUT_DIR GRID_HEAD FRAME [FRAME ...]
"""

import sys
import warnings
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.utils.exceptions import AstropyWarning

warnings.simplefilter("ignore", AstropyWarning)


def main(out_dir, grid_head, files):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checksum = 0.0
    for path in files:
        with fits.open(path, memmap=False) as hdul:
            for name in ("SCI", "BPM"):
                if name in hdul:
                    data = hdul[name].data
                    checksum += float(data.flat[0])  # touch: the data are decompressed
    header = fits.Header.fromtextfile(grid_head)
    shape = (int(header["NAXIS2"]), int(header["NAXIS1"]))
    image = np.zeros(shape, dtype=np.float32)
    fits.HDUList([fits.PrimaryHDU(image, header=header),
                  fits.ImageHDU(image, name="WEIGHT")]).writeto(out_dir / "floor.fits",
                                                                overwrite=True)
    print(f"read {len(files)} frames, checksum {checksum:.3g}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
