"""``python -m benchmarks lightcurve``: `daskstack lightcurve` on stores of N frames.

Each store is made directly with `daskstack.store` (`create_store`, `write_tiles`), not
by running the pipeline (registering thousands of frames would take far longer than
what is measured): a 512x512 grid in 128-pixel chunks, one filter, N frames 5 minutes
apart. The stars are `daskstack.simulate.render_frame` images of a synthetic catalog
(Moffat, noiseless) at five seeing values, rendered once; each frame is one of them
times its transparency, plus sky, plus Poisson and read noise drawn from its variance;
the variance plane is that variance and the kernel power 1 (frames already on the
grid). Each frame's record has its FWHM and zero point, as a solved run's would.

Then ``daskstack lightcurve STORE --target ... --catalog CATALOG --workers W`` as a
measured process (wall time, CPU, peak memory of the process tree: its LocalCluster's
workers included, whose start is in the wall time), and the Dask phase's own time
(the progress line). Recorded per N, with the load average before and after (the
machine is shared), the light curve's differential scatter and reduced chi-square
(a sanity check: the target is a constant star).

Writes ``benchmarks/results/lightcurve-<date>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

from . import measure
from .runner import provenance_lines, run_per_n

CENTER = (150.1, 2.2)
SHAPE = (512, 512)
TILE = 128
PIXSCALE = 0.8
SEEING_PX = (2.6, 3.0, 3.4, 3.8, 4.2)
EXPTIME, ZEROPOINT, SKY, RDNOISE = 30.0, 23.5, 400.0, 7.0


def build_store(directory: Path, n_frames: int, seed: int = 3) -> tuple[Path, Path, tuple]:
    """A store of ``n_frames`` frames and its catalog; returns (store, catalog, target)."""

    from daskstack import store as store_mod
    from daskstack.grid import Grid
    from daskstack.simulate import make_catalog, render_frame, true_frame_wcs

    directory.mkdir(parents=True, exist_ok=True)
    wcs = true_frame_wcs(CENTER, SHAPE, PIXSCALE)
    catalog = make_catalog(CENTER, 0.12, density_per_sq_deg=15000, mag_range=(11, 18),
                           seed=seed)
    catalog_path = directory / "catalog.ecsv"
    catalog.write(catalog_path, format="ascii.ecsv", overwrite=True)
    bases = [render_frame(catalog, wcs, SHAPE, fwhm_px=f, sky=0.0, noise=False,
                          exptime=EXPTIME, zeropoint=ZEROPOINT, saturate=np.inf,
                          trunc_sigma=0.002, rng=seed)[0] for f in SEEING_PX]
    rng = np.random.default_rng(seed)
    names = [f"bench-{i:05d}" for i in range(n_frames)]
    transparency = rng.uniform(0.85, 1.0, n_frames)
    infos = {name: store_mod.FrameInfo(
        file="", filter="rp", exptime=EXPTIME, mjd=60000.0 + i * 300.0 / 86400.0, gain=1.0,
        rdnoise=RDNOISE, background=SKY, fwhm_px=SEEING_PX[i % len(SEEING_PX)], site="lsc",
        zp=ZEROPOINT + 2.5 * math.log10(transparency[i]), zp_err=0.005, n_zp=20,
        airmass=1.2) for i, name in enumerate(names)}
    path = directory / "store.zarr"
    stack = store_mod.create_store(path, Grid.from_wcs(wcs, SHAPE), infos, {"rp": names},
                                   tile=TILE, params={"register": {"method": "interp",
                                                                   "order": "bilinear"}})
    power = np.ones((TILE, TILE), np.float16)
    for i in range(n_frames):
        expected = bases[i % len(bases)] * transparency[i] + SKY
        variance = (expected + RDNOISE**2).astype(np.float32)
        data = (expected + rng.standard_normal(SHAPE) * np.sqrt(variance)).astype(np.float32)
        store_mod.write_tiles(str(path), "rp", i, (
            (y0, x0, data[y0:y0 + TILE, x0:x0 + TILE], None,
             variance[y0:y0 + TILE, x0:x0 + TILE], power)
            for y0 in range(0, SHAPE[0], TILE) for x0 in range(0, SHAPE[1], TILE)))
    stack.params["registered"] = names
    store_mod.update_frames(stack, {})
    # the target: the brightest star of magnitude 13-15 near the centre, no comparable
    # neighbour within 15"
    ra, dec = np.asarray(catalog["ra"]), np.asarray(catalog["dec"])
    mag = np.asarray(catalog["phot_g_mean_mag"])
    from daskstack._fields import separation_deg

    for i in np.argsort(mag):
        sep = separation_deg(ra, dec, ra[i], dec[i]) * 3600
        if (13 < mag[i] < 15 and separation_deg(ra[i], dec[i], *CENTER) < 60 / 3600
                and not np.any((sep > 0) & (sep < 15) & (mag < mag[i] + 4))):
            return path, catalog_path, (float(ra[i]), float(dec[i]))
    raise RuntimeError("no isolated target star in the synthetic catalog")


def _directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure_one(n_frames: int, workdir: Path, workers: int) -> dict:
    from astropy.table import Table

    from daskstack.lightcurve import reduced_chi2

    start = time.perf_counter()
    store, catalog, (ra, dec) = build_store(workdir / f"store-{n_frames}", n_frames)
    build_s = time.perf_counter() - start
    load_before = os.getloadavg()
    log = workdir / f"lightcurve-{n_frames}.log"
    run = dataclasses.asdict(measure.run_measured(
        [sys.executable, "-m", "daskstack.cli", "lightcurve", str(store), "--target",
         f"{ra} {dec}", "--target-name", "bench", "--catalog", str(catalog), "--workers",
         str(workers)], log_path=log))
    load_after = os.getloadavg()
    if run["status"] != "ok":
        raise RuntimeError(f"lightcurve on {n_frames} frames: {run['status']}: "
                           f"{log.read_text()[-2000:]}")
    text = log.read_text()
    phase = re.findall(r"lightcurve\s*\[#+\]\s*(\d+)/(\d+)\s+([\d.]+)s", text)
    table = Table.read(store.parent / "lightcurves" / "bench.ecsv", format="ascii.ecsv")
    diff, err = np.asarray(table["diff_mag"]), np.asarray(table["diff_mag_err"])
    run.pop("timeline", None)
    return {
        "n_frames": n_frames, "grid": list(SHAPE), "tile": TILE, "workers": workers,
        "store_bytes": _directory_bytes(store), "build_s": build_s,
        "load_avg_before": load_before, "load_avg_after": load_after,
        "process": run, "tasks": int(phase[-1][1]) if phase else None,
        "dask_phase_s": float(phase[-1][2]) if phase else None,
        "rows": len(table), "comparisons": len(table.meta["comparisons"]["rp"]["used"]),
        "diff_mag_std": float(np.nanstd(diff)), "diff_mag_err_median": float(np.nanmedian(err)),
        "diff_reduced_chi2": reduced_chi2(diff, err),
    }


def _markdown(result: dict) -> str:
    lines = [f"# daskstack lightcurve on N-frame stores ({result['date']})", "",
             *provenance_lines(result, versions=("dask", "zarr")), "",
             "Stores made directly with `daskstack.store` (see `benchmarks/lightcurve_bench.py`):"
             f" a {SHAPE[1]}x{SHAPE[0]} grid in {TILE}-px chunks, one filter, synthetic stars at "
             "five seeings, Poisson + read noise, each frame's FWHM and zero point recorded. "
             "`daskstack lightcurve STORE --target RA_DEC --catalog CATALOG --workers W`: one "
             "target, comparison stars chosen automatically. 'process': the whole command "
             "(Python start, LocalCluster start and stop, catalog, writing the ECSV and PNG); "
             "'Dask phase': the tasks only (the progress line); peak memory of the process "
             "tree (client + scheduler + workers).", "",
             "| frames | store | tasks | process wall (s) | CPU (s) | Dask phase (s) | peak RSS "
             "tree | largest process | load before / after (1 min) | diff. mag std | median "
             "error | reduced chi2 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["results"]:
        proc = r["process"]
        lines.append(
            f"| {r['n_frames']} | {r['store_bytes'] / 2**30:.2f} GiB | {r['tasks']} | "
            f"{proc['wall_s']:.1f} | {proc['cpu_user_s'] + proc['cpu_sys_s']:.1f} | "
            f"{r['dask_phase_s']} | {proc['peak_rss_bytes'] / 2**20:.0f} MiB | "
            f"{proc['peak_process_rss_bytes'] / 2**20:.0f} MiB | "
            f"{r['load_avg_before'][0]:.1f} / {r['load_avg_after'][0]:.1f} | "
            f"{r['diff_mag_std']:.4f} | {r['diff_mag_err_median']:.4f} | "
            f"{r['diff_reduced_chi2']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks lightcurve")
    parser.add_argument("--n", type=int, nargs="+", default=[250, 1000],
                        help="frame counts (default: 250 1000)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep the stores in this directory")
    args = parser.parse_args(argv)
    command = "python -m benchmarks lightcurve " + " ".join(argv or sys.argv[2:])
    run_per_n("lightcurve", args.n, lambda n, workdir: measure_one(n, workdir, args.workers),
              out_dir=args.out, keep=args.keep, command=command, markdown=_markdown,
              not_printed=("process",))
    return 0
