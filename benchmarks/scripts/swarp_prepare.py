"""SWarp cannot read fpack (tile-compressed) multi-extension files: write, for each
frame, its SCI image as a plain FITS file (SCI header, pixels float32) and a weight
map (uint8: 1 = good, 0 = bad), bad meaning non-zero in BPM, not finite, or at/above
SATURATE (the mask daskstack's reader applies). This is SWarp's preparation (the
decompression an fpack user pays before SWarp) and is timed as part of the SWarp
contender.

    python swarp_prepare.py OUT_DIR FRAME [FRAME ...]

Writes OUT_DIR/<name>.fits and OUT_DIR/<name>.weight.fits and OUT_DIR/inputs.txt.
"""

import sys
import warnings
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.utils.exceptions import AstropyWarning

warnings.simplefilter("ignore", AstropyWarning)

DROP = {"XTENSION", "PCOUNT", "GCOUNT", "EXTNAME", "CHECKSUM", "DATASUM", "BSCALE", "BZERO"}


def main(out_dir, files):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for path in files:
        name = Path(path).name
        for suffix in (".fits.fz", ".fits", ".fz"):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
                break
        with fits.open(path, memmap=False) as hdul:
            sci = hdul["SCI"]
            data = np.asarray(sci.data, dtype=np.float32)
            header = fits.Header([c for c in sci.header.cards if c.keyword not in DROP])
            bad = ~np.isfinite(data)
            if "BPM" in hdul and hdul["BPM"].data is not None:
                bad |= hdul["BPM"].data != 0
            saturate = header.get("SATURATE")
            if saturate:
                bad |= data >= float(saturate)
        fits.PrimaryHDU(data, header=header).writeto(out_dir / f"{name}.fits", overwrite=True)
        fits.PrimaryHDU((~bad).astype(np.uint8)).writeto(out_dir / f"{name}.weight.fits",
                                                         overwrite=True)
        names.append(str((out_dir / f"{name}.fits").resolve()))
    (out_dir / "inputs.txt").write_text("\n".join(names) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
