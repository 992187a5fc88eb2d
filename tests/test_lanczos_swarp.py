"""lanczos3 against SWarp's LANCZOS3 on a small synthetic frame (issue 15, item 4).

The benchmark (``python -m benchmarks lanczos-swarp``) compares whole coadds of the
benchmark frames; this checks the same on one 200 x 200 frame, resampled onto a grid
shifted by a fraction of a pixel and rotated by 0.3 degrees: the median absolute
difference is below 1 % of the sky noise. SWarp is a Debian package (``swarp``), which
``.ci/run`` installs.
"""

import shutil
import subprocess

import numpy as np
import pytest
from astropy.io import fits

from daskstack.config import RegisterSettings
from daskstack.grid import Grid
from daskstack.register import register_frame
from daskstack.simulate import make_catalog, render_frame

from .helpers import tan_wcs
from .test_noise import assemble

SWARP = shutil.which("SWarp") or shutil.which("swarp")
SHAPE = (200, 200)


@pytest.mark.skipif(SWARP is None, reason="SWarp is not installed (Debian package swarp)")
def test_lanczos3_equals_swarp_within_a_percent_of_the_noise(tmp_path):
    frame_wcs = tan_wcs(SHAPE)
    catalog = make_catalog((150.0, 2.0), 0.02, density_per_sq_deg=60000,
                           mag_range=(13.0, 20.0), seed=3)
    data, _, info = render_frame(catalog, frame_wcs, SHAPE, sky=300.0, fwhm_px=2.8,
                                 rng=np.random.default_rng(4))
    grid_wcs = tan_wcs(SHAPE, ra=150.0 + 0.37 * 0.389 / 3600, dec=2.0 - 0.41 * 0.389 / 3600,
                       rotation_deg=0.3)
    grid = Grid.from_wcs(grid_wcs, SHAPE)
    mine, _, _ = assemble(register_frame(data, None, frame_wcs, grid,
                                         RegisterSettings(order="lanczos3", tile=128),
                                         conserve_flux=False), SHAPE)

    frame_header = frame_wcs.to_header()
    fits.PrimaryHDU(data.astype(np.float32), frame_header).writeto(tmp_path / "frame.fits")
    head = grid_wcs.to_header()
    head["NAXIS"], head["NAXIS1"], head["NAXIS2"] = 2, SHAPE[1], SHAPE[0]
    (tmp_path / "coadd.head").write_text(
        "\n".join(card.image for card in head.cards) + "\n" + "END".ljust(80) + "\n")
    subprocess.run([SWARP, str(tmp_path / "frame.fits"), "-IMAGEOUT_NAME",
                    str(tmp_path / "coadd.fits"), "-WEIGHTOUT_NAME",
                    str(tmp_path / "coadd.weight.fits"), "-RESAMPLING_TYPE", "LANCZOS3",
                    "-SUBTRACT_BACK", "N", "-FSCALASTRO_TYPE", "NONE", "-COMBINE", "Y",
                    "-WEIGHT_TYPE", "NONE", "-CELESTIAL_TYPE", "NATIVE", "-PROJECTION_TYPE",
                    "TAN", "-RESAMPLE_DIR", str(tmp_path), "-VMEM_DIR", str(tmp_path),
                    "-WRITE_XML", "N", "-VERBOSE_TYPE", "QUIET", "-NTHREADS", "1"],
                   cwd=tmp_path, check=True, capture_output=True)
    swarp = fits.getdata(tmp_path / "coadd.fits").astype(np.float64)
    weight = fits.getdata(tmp_path / "coadd.weight.fits")
    assert swarp.shape == SHAPE
    inner = np.zeros(SHAPE, bool)
    inner[5:-5, 5:-5] = True  # the edges: each tool's own border convention
    common = inner & np.isfinite(mine) & (weight > 0)
    assert common.sum() > 0.8 * common.size
    difference = np.abs(mine - swarp)[common]
    assert np.median(difference) < 0.01 * info["noise"]
    # stars too (not only the sky): the brightest pixels agree within the noise
    bright = common & (swarp > np.percentile(swarp[common], 99.5))
    assert np.max(np.abs(mine - swarp)[bright]) < info["noise"]
