"""Astrometry: time per frame of detection + matching + fit on one core, and accuracy
against the simulation's truth as the start (header) WCS gets worse.

Run as its own process pinned to one CPU with BLAS/OpenMP threads set to 1:

    python -m benchmarks.astrometry_bench OUT.json DATA_ROOT REAL_DIR \
        REAL_FRAMES BIG_FRAMES BIG_SIZE SWEEP_SIZE SWEEP_FRAMES

Timing is ``solve_frame(read_frame(path), catalog, Settings())`` around
``solve_frame`` only (reading and decompressing are reported apart). Accuracy is
``daskstack._validate.wcs_error_px(result.wcs, truth, shape)``: the RMS over a 16x16
grid of pixels of where the solved and the true WCS put the same sky position.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

from astropy.utils.exceptions import AstropyWarning

warnings.simplefilter("ignore", AstropyWarning)


def _solve(path, catalog, truth=None, header_truth=False):
    from daskstack._validate import wcs_error_px, wcs_separation_arcsec
    from daskstack.astrometry import solve_frame
    from daskstack.config import Settings
    from daskstack.frames import read_frame

    t0 = time.perf_counter()
    frame = read_frame(path)
    t_read = time.perf_counter() - t0
    c0, t0 = time.process_time(), time.perf_counter()
    result = solve_frame(frame, catalog, Settings())
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    row = {"frame": Path(path).name, "shape": list(frame.data.shape), "status": result.status,
           "reason": result.reason, "t_read_s": t_read, "t_solve_s": wall, "cpu_solve_s": cpu,
           "n_matches": result.n_matches, "rms_arcsec": result.rms_arcsec}
    if result.ok:
        if truth is not None:
            row["error_px"] = wcs_error_px(result.wcs, truth, frame.data.shape)
            row["error_arcsec"] = wcs_separation_arcsec(result.wcs, truth, frame.data.shape)
        elif header_truth:
            row["vs_header_arcsec"] = wcs_separation_arcsec(result.wcs, frame.meta.header_wcs(),
                                                            frame.data.shape)
    return row


def _simulate(directory, n, size, pe, rot, seed):
    from daskstack.simulate import simulate_field

    stamp = Path(directory) / "done.json"
    if stamp.exists():
        info = json.loads(stamp.read_text())
        if len(info["frames"]) >= n:  # cached with fewer frames (e.g. quick): regenerate
            return [Path(p) for p in info["frames"]], info["truth"], info["catalog"]
    field = simulate_field(directory, n_frames=n, shape=(size, size), filters=("rp",),
                           seed=seed, pointing_error_arcmin=pe, rotation_error_deg=rot,
                           sip=False)
    info = {"frames": [str(p) for p in field.frames],
            "truth": {k: str(v) for k, v in field.truth_wcs.items()},
            "catalog": str(field.catalog)}
    stamp.write_text(json.dumps(info))
    return field.frames, info["truth"], info["catalog"]


def main(out_json, data_root, real_dir, real_frames, big_frames, big_size, sweep_size,
         sweep_frames, pointing=(0, 1, 5, 10, 20), rotations=(0, 30, 180)):
    from daskstack.catalogs import load_catalog
    from daskstack.frames import frame_name

    try:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    except (AttributeError, OSError):
        pass
    out = {"cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
           "real": [], "big": [], "sweep": [], "errors": []}
    data_root = Path(data_root) / "astrometry"

    def save():
        Path(out_json).write_text(json.dumps(out, indent=1, default=str))

    # real 1523x1020 frames (LCO's solved header WCS is the reference)
    try:
        real_dir = Path(real_dir)
        catalog = load_catalog(real_dir / "refcat-pds110.ecsv")
        frames = sorted(real_dir.glob("*.fits.fz"))
        from astropy.io import fits
        solved = [f for f in frames if fits.getheader(f, "SCI").get("WCSERR") == 0]
        for path in solved[:real_frames]:
            out["real"].append(_solve(path, catalog, header_truth=True))
            save()
    except Exception:
        out["errors"].append(traceback.format_exc())
    # 4096x4096 frames, header 1' off and 0.3 deg rotated (the simulation's defaults)
    try:
        frames, truth, cat = _simulate(data_root / f"big{big_size}", big_frames, big_size,
                                       1.0, 0.3, 11)
        catalog = load_catalog(cat)
        for path in frames[:big_frames]:
            out["big"].append(_solve(path, catalog, truth[frame_name(path)]))
            save()
    except Exception:
        out["errors"].append(traceback.format_exc())
    # accuracy sweep
    for pe in pointing:
        for rot in rotations:
            try:
                frames, truth, cat = _simulate(
                    data_root / f"sweep{sweep_size}-pe{pe}-rot{rot}", sweep_frames, sweep_size,
                    float(pe), float(rot), 100 + 7 * pe + rot)
                catalog = load_catalog(cat)
                for path in frames[:sweep_frames]:
                    row = _solve(path, catalog, truth[frame_name(path)])
                    row.update({"pointing_error_arcmin": pe, "rotation_error_deg": rot})
                    out["sweep"].append(row)
                    save()
            except Exception:
                out["errors"].append(f"pe={pe} rot={rot}: {traceback.format_exc()}")
    save()


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], a[1], a[2], int(a[3]), int(a[4]), int(a[5]), int(a[6]), int(a[7]))
