"""daskstack's Lanczos-3 resampling against SWarp's (issue 15, item 4's evidence).

    python -m benchmarks lanczos-swarp [--n-synthetic 4] [--size 4096]

On the benchmark frames (the nine solved PDS 110 frames, and ``--n-synthetic`` simulated
``--size`` x ``--size`` frames, `benchmarks.datasets`), both tools resample every frame
onto the same grid (the first frame's header WCS, `Dataset.grid_head`) with the header
WCS as it is, no background subtraction and no flux scaling, and average them:

- SWarp: ``RESAMPLING_TYPE LANCZOS3``, ``COMBINE_TYPE AVERAGE``, 0/1 weight maps from the
  BPM and SATURATE (`benchmarks/scripts/swarp_prepare.py`), otherwise the configuration
  of the benchmark contender (`contenders.SWARP_CONFIG`);
- daskstack: ``daskstack run --wcs header --grid <head> --combine mean --order lanczos3
  --scale none --background none --no-conserve-flux`` (the pixel scales are equal), and
  the same with ``--order bilinear``.

Compared over the pixels every frame covers in both coadds (daskstack's NFRAMES = N,
SWarp's weight > 0, both finite): the median, 99th percentile and largest |difference|
in units of the sky noise of daskstack's coadd (`compare.sky_noise`: the median over
128 x 128 boxes of the sigma-clipped standard deviation). Star FWHM: a circular Gaussian
fitted (photutils ``fit_fwhm``, 9 x 9 px) at the same positions in each coadd (bright,
isolated, unsaturated stars found by DAOStarFinder in the bilinear coadd), after
removing the sky (`daskstack.sky.background_map`); the median over the stars.
Writes ``benchmarks/results/lanczos-swarp-<YYYYMMDD>.json`` and ``.md``; the run
directories go under ``benchmarks/results/runs/lanczos-swarp`` (not committed).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .astrometry_evidence import _quiet, provenance, write_result
from .compare import difference_stats, load_image, sky_noise
from .contenders import SCRIPTS, SWARP, SWARP_CONFIG
from .datasets import DEFAULT_REAL_DIR, real, synthetic

PY = sys.executable
FIT_SHAPE = 9
MIN_SNR_PEAK = 30.0  # stars whose peak is this many sky sigma above the sky
ISOLATION_PX = 15.0


def _run(command, log: Path) -> float:
    """Run ``command``, its output to ``log``; the wall time in seconds."""
    start = time.perf_counter()
    with open(log, "w") as out:
        subprocess.run([str(c) for c in command], stdout=out, stderr=subprocess.STDOUT,
                       check=True)
    return time.perf_counter() - start


def swarp_lanczos3(frames, grid_head: Path, run_dir: Path) -> tuple[Path, Path, float]:
    """SWarp's LANCZOS3 average of ``frames`` on ``grid_head``: (image, weight, seconds)."""
    inputs = run_dir / "inputs"
    config = dict(SWARP_CONFIG, RESAMPLING_TYPE="LANCZOS3", VMEM_DIR=str(run_dir),
                  RESAMPLE_DIR=str(run_dir / "resamp"), DELETE_TMPFILES="Y")
    (run_dir / "resamp").mkdir(parents=True, exist_ok=True)
    (run_dir / "swarp.conf").write_text(
        "".join(f"{key:<22} {value}\n" for key, value in config.items()))
    (run_dir / "coadd.head").write_text(Path(grid_head).read_text())
    _run([PY, SCRIPTS / "swarp_prepare.py", inputs, *frames], run_dir / "prepare.log")
    seconds = _run([SWARP, "-c", run_dir / "swarp.conf", f"@{inputs / 'inputs.txt'}",
                    "-COMBINE_TYPE", "AVERAGE", "-IMAGEOUT_NAME", run_dir / "coadd.fits",
                    "-WEIGHTOUT_NAME", run_dir / "coadd.weight.fits",
                    "-XML_NAME", run_dir / "swarp.xml"], run_dir / "swarp.log")
    shutil.rmtree(inputs, ignore_errors=True)
    return run_dir / "coadd.fits", run_dir / "coadd.weight.fits", seconds


def daskstack_mean(frames, grid_head: Path, run_dir: Path, order: str,
                   filter_name: str) -> tuple[Path, float]:
    """daskstack's mean of ``frames`` resampled with ``order``: (coadd, seconds)."""
    command = [PY, "-m", "daskstack.cli", "run", *frames, "--wcs", "header", "--grid",
               grid_head, "--combine", "mean", "--order", order, "--scale", "none",
               "--background", "none", "--no-conserve-flux", "--no-keep-store",
               "--workers", "2", "--threads", "1", "--out", run_dir, "--overwrite", "-q"]
    run_dir.mkdir(parents=True, exist_ok=True)
    seconds = _run(command, run_dir.parent / f"daskstack-{order}.log")
    return run_dir / f"coadd_{filter_name}.fits", seconds


def _nframes(path) -> np.ndarray:
    from astropy.io import fits

    with fits.open(path, memmap=False) as hdul:
        return np.asarray(hdul["NFRAMES"].data, dtype=np.float64)


def star_fwhm(images: dict, reference: str, common: np.ndarray, noise: float) -> dict:
    """Median FWHM (px) of the same stars in each of ``images`` ({name: array}), at the
    positions DAOStarFinder finds in ``images[reference]``."""
    from photutils.detection import DAOStarFinder
    from photutils.psf import fit_fwhm
    from scipy.spatial import cKDTree

    from daskstack.sky import background_map

    subtracted = {}
    for name, image in images.items():
        bad = ~(common & np.isfinite(image))
        sky, _ = background_map(np.where(bad, 0, image).astype(np.float32), bad, 128)
        subtracted[name] = np.where(bad, np.nan, image - sky)
    ref = subtracted[reference]
    found = DAOStarFinder(threshold=MIN_SNR_PEAK * noise, fwhm=3.0)(np.nan_to_num(ref))
    if found is None:
        return {"n_stars": 0}
    x, y = np.asarray(found["xcentroid"]), np.asarray(found["ycentroid"])
    half = FIT_SHAPE
    ny, nx = ref.shape
    distance, _ = cKDTree(np.column_stack([x, y])).query(np.column_stack([x, y]), k=2)
    keep = (distance[:, 1] > ISOLATION_PX) & (x > half) & (x < nx - half - 1) & (
        y > half) & (y < ny - half - 1)
    # the whole fitting box covered by every frame, in every coadd
    keep &= np.array([np.all(common[int(round(b)) - half:int(round(b)) + half + 1,
                                    int(round(a)) - half:int(round(a)) + half + 1])
                      for a, b in zip(x, y, strict=True)])
    # not saturated: the brightest tenth of the peaks is left out
    peak = np.asarray(found["peak"])
    keep &= peak < np.percentile(peak, 90)
    xy = np.column_stack([x[keep], y[keep]])
    if len(xy) == 0:
        return {"n_stars": 0}
    fwhm = {name: fit_fwhm(np.nan_to_num(image), xypos=xy, fit_shape=FIT_SHAPE, fwhm=3.0)
            for name, image in subtracted.items()}
    return {"n_stars": int(len(xy)),
            **{f"median_fwhm_{name}": float(np.median(value)) for name, value in fwhm.items()},
            **{f"median_ratio_{name}_over_{reference}": float(np.median(
                value / fwhm[reference])) for name, value in fwhm.items() if name != reference}}


def compare_dataset(dataset, run_root: Path, log=print) -> dict:
    frames = [str(f) for f in dataset.frames]
    run_dir = run_root / dataset.name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    log(f"{dataset.name}: {len(frames)} frames; SWarp LANCZOS3 ...")
    swarp_image, swarp_weight, t_swarp = swarp_lanczos3(frames, dataset.grid_head,
                                                        run_dir / "swarp")
    coadds, seconds = {}, {"swarp": t_swarp}
    for order in ("lanczos3", "bilinear"):
        log(f"{dataset.name}: daskstack {order} ...")
        coadds[order], seconds[order] = daskstack_mean(
            frames, dataset.grid_head, run_dir / f"daskstack-{order}", order, dataset.filter)
    images = {"swarp": load_image(swarp_image), "lanczos3": load_image(coadds["lanczos3"]),
              "bilinear": load_image(coadds["bilinear"])}
    common = (load_image(swarp_weight) > 0) & (_nframes(coadds["lanczos3"]) == len(frames))
    for image in images.values():
        common &= np.isfinite(image)
    noise = sky_noise(images["lanczos3"], common)
    # where they differ: within the kernel's reach (3 px) of the grid's edge or of a pixel
    # not every frame covers (a frame's edge, a masked pixel), each tool's own convention
    from scipy.ndimage import binary_dilation

    edge = np.zeros(common.shape, bool)
    edge[:3], edge[-3:], edge[:, :3], edge[:, -3:] = True, True, True, True
    near_edge = binary_dilation(~common | edge, np.ones((7, 7), bool))
    differs = common & (np.abs(images["lanczos3"] - images["swarp"]) > 0.01 * noise)
    result = {
        "pixels_differing_over_1pct_noise": int(differs.sum()),
        "of_them_within_3px_of_an_edge_or_uncovered_pixel": int((differs & near_edge).sum()),
        "dataset": dataset.name, "n_frames": len(frames), "frames": [Path(f).name for f in frames],
        "grid": str(dataset.grid_head.name), "shape": list(images["swarp"].shape),
        "seconds": seconds, "n_common_pixels": int(common.sum()),
        "lanczos3_vs_swarp": difference_stats(images["lanczos3"], images["swarp"], common,
                                              noise),
        "bilinear_vs_swarp": difference_stats(images["bilinear"], images["swarp"], common,
                                              noise),
        "stars": star_fwhm(images, "bilinear", common, noise),
    }
    log(f"{dataset.name}: median |lanczos3 - SWarp| = "
        f"{result['lanczos3_vs_swarp']['median_over_noise']:.4f} sky sigma")
    return result


def lanczos_swarp(out_dir: Path, real_dir=None, n_synthetic: int = 4, size: int = 4096,
                  command: str = "") -> Path:
    if SWARP is None:
        raise SystemExit("SWarp is not installed (Debian package swarp): nothing to compare")
    _quiet()
    out_dir = Path(out_dir)
    prov = provenance(command or "python -m benchmarks lanczos-swarp")
    data_root = out_dir / "data"
    run_root = out_dir / "runs" / "lanczos-swarp"
    datasets = [real(data_root, real_dir or DEFAULT_REAL_DIR)]
    if n_synthetic > 0:
        datasets.append(synthetic(data_root, n_synthetic, size).subset(n_synthetic))
    rows = [compare_dataset(d, run_root) for d in datasets]
    result = {"provenance": prov, "swarp": _swarp_version(), "datasets": rows}
    return write_result(out_dir, "lanczos-swarp", result, _markdown(result))


def _swarp_version() -> str:
    out = subprocess.run([SWARP, "-v"], capture_output=True, text=True)
    return (out.stdout or out.stderr).strip()


def _markdown(result) -> str:
    lines = [
        f"{result['swarp']}. Each dataset: every frame resampled onto the first frame's "
        "grid (header WCS, no background subtraction, no flux scaling) and averaged, by "
        "SWarp (RESAMPLING_TYPE LANCZOS3, COMBINE_TYPE AVERAGE, 0/1 weights from BPM and "
        "SATURATE) and by daskstack (--order lanczos3 and --order bilinear, --combine mean, "
        "--scale none, --background none, --no-conserve-flux). Differences over the pixels "
        "every frame covers in both, in units of the sky noise of daskstack's lanczos3 "
        "coadd; star FWHM: circular Gaussian fits (photutils fit_fwhm, 9x9 px) at the same "
        "positions in each coadd, median over the stars.", "",
        "| dataset | frames | pixels | sky noise | median abs(lanczos3 - SWarp) / noise | "
        "99th pct | median abs(bilinear - SWarp) / noise | stars | FWHM bilinear | "
        "FWHM lanczos3 | FWHM SWarp | seconds SWarp / lanczos3 / bilinear |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["datasets"]:
        lan, bil, stars = row["lanczos3_vs_swarp"], row["bilinear_vs_swarp"], row["stars"]
        sec = row["seconds"]
        lines.append(
            f"| {row['dataset']} | {row['n_frames']} | {row['n_common_pixels']} | "
            f"{lan['sky_noise']:.3g} | {lan['median_over_noise']:.2g} | "
            f"{lan['p99_over_noise']:.2g} | {bil['median_over_noise']:.3f} | "
            f"{stars.get('n_stars', 0)} | {stars.get('median_fwhm_bilinear', float('nan')):.3f} | "
            f"{stars.get('median_fwhm_lanczos3', float('nan')):.3f} | "
            f"{stars.get('median_fwhm_swarp', float('nan')):.3f} | "
            f"{sec['swarp']:.0f} / {sec['lanczos3']:.0f} / {sec['bilinear']:.0f} |")
    lines += ["", "In float32 ulps of SWarp's values, |lanczos3 - SWarp|: median / 99th "
              "percentile " + ", ".join(
                  f"{row['dataset']} {row['lanczos3_vs_swarp']['median_ulp32']:.0f} / "
                  f"{row['lanczos3_vs_swarp']['p99_ulp32']:.0f}" for row in result["datasets"])
              + ". Pixels differing by more than 1 % of the sky noise, and how many of "
              "them lie within 3 px (the kernel's reach) of the grid's edge or of a pixel "
              "not every frame covers, where each tool keeps its own edge convention: "
              + ", ".join(f"{row['dataset']} {row['pixels_differing_over_1pct_noise']} "
                          f"({row['of_them_within_3px_of_an_edge_or_uncovered_pixel']})"
                          for row in result["datasets"])
              + "; largest difference (sky sigma): " + ", ".join(
                  f"{row['dataset']} {row['lanczos3_vs_swarp']['max_over_noise']:.0f}"
                  for row in result["datasets"]) + ".", "",
              "Median FWHM ratio lanczos3 / bilinear per dataset: " + ", ".join(
        f"{row['dataset']} {row['stars'].get('median_ratio_lanczos3_over_bilinear', float('nan')):.3f}"
        for row in result["datasets"]) + ".", ""]
    return "\n".join(lines)
