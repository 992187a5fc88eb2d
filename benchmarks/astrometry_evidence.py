"""The astrometry figures the README and the tests quote, each from one command.

    python -m benchmarks detect-sweep      # isophote threshold x radius on the real frames,
                                           # and photutils (Background2D, detect_sources,
                                           # SourceCatalog) against daskstack's detection
    python -m benchmarks astrometry-real   # `daskstack solve` on the 12 real frames from
                                           # wrong start WCSs: error against LCO's solution
    python -m benchmarks false-alarms      # scrambled / random / other-field catalogs:
                                           # how many wrong solutions are accepted
    python -m benchmarks fast-path         # registration fast path against reproject_interp
                                           # on a 4096 x 4096 frame with SIP

Each writes ``benchmarks/results/<name>-<YYYYMMDD>.json`` (machine, versions, commit, the
settings and every raw per-frame / per-trial number) and a ``.md`` summary next to it.
Single process, no Dask: each takes a few minutes on one core of a shared machine.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REAL_DIR = ROOT.parent / "shared" / "data" / "lco-pds110"
SOLVED = [f"ogg0m404-kb82-20170815-{n}-e91" for n in range(1156, 1165)]
UBAND = [f"ogg0m404-kb82-20170815-{n}-e91" for n in (1153, 1154, 1155)]


# -- common ---------------------------------------------------------------------------------
def provenance(command: str) -> dict:
    """Machine, versions, commit and the command of a result (taken when it starts)."""
    versions = {}
    for mod in ("numpy", "scipy", "astropy", "photutils", "reproject", "daskstack"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing module is recorded as None
            versions[mod] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True).stdout.split("\n")
        dirty = [line[3:] for line in dirty if line.strip()]  # files changed since the commit
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, None
    return {"command": command, "date_utc": datetime.now(UTC).isoformat(),
            "commit": commit, "dirty": dirty, "python": sys.version.split()[0],
            "platform": platform.platform(), "cpus": os.cpu_count(),
            "load_avg": os.getloadavg(), "versions": versions}


def write_result(out_dir: Path, name: str, result: dict, markdown: str) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{name}-{datetime.now(UTC):%Y%m%d}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=_plain) + "\n")
    prov = result["provenance"]
    head = (f"# {name}\n\n`{prov['command']}` at commit {prov['commit']}"
            f"{' (changed since: ' + ', '.join(prov['dirty']) + ')' if prov['dirty'] else ''}, "
            f"{prov['date_utc']}; "
            f"{prov['platform']}, {prov['cpus']} cpus, load {prov['load_avg'][0]:.1f}; "
            + ", ".join(f"{k} {v}" for k, v in prov["versions"].items()) + "\n\n")
    stem.with_suffix(".md").write_text(head + markdown)
    print(stem.with_suffix(".md").read_text())
    return stem.with_suffix(".json")


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _quiet():
    from astropy.utils.exceptions import AstropyWarning

    warnings.simplefilter("ignore", AstropyWarning)


def _real_frames(real_dir):
    from daskstack.catalogs import load_catalog
    from daskstack.frames import read_frame

    real_dir = Path(real_dir)
    frames = {name: read_frame(real_dir / f"{name}.fits.fz") for name in SOLVED}
    return frames, load_catalog(real_dir / "refcat-pds110.ecsv")


def _stats(values) -> dict:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], float)
    if not len(v):
        return {"n": 0}
    return {"n": int(len(v)), "median": float(np.median(v)), "max": float(v.max()),
            "min": float(v.min())}


# -- 1. detection sweep and photutils comparison ---------------------------------------------
SWEEP_THRESHOLDS = (2.0, 2.5, 3.0, 3.5, 4.5, 6.0)
SWEEP_RADII = (1.5, 2.0, 3.0, 4.0, 6.0)


def _solve_error(frame, catalog, settings, detections=None, truth=None):
    """Solve one frame; its error against ``truth`` (default: its header WCS)."""
    from daskstack._validate import wcs_separation_arcsec
    from daskstack.astrometry import solve_frame

    result = solve_frame(frame, catalog, settings, detections=detections)
    row = {"frame": frame.name, "status": result.status, "reason": result.reason,
           "n_matches": result.n_matches, "rms_arcsec": result.rms_arcsec}
    if result.ok:
        row["error_arcsec"] = wcs_separation_arcsec(
            result.wcs, truth if truth is not None else frame.meta.header_wcs(),
            frame.data.shape)
    return row


def _photutils_detect(frame, iso_sigma: float, npixels: int = 5):
    """photutils' own chain: Background2D (box 128, 3 x 3 filter, as daskstack's),
    detect_sources on the image convolved with SExtractor's 3 x 3 kernel above
    ``iso_sigma`` x the background RMS, SourceCatalog (isophotal centroids)."""
    from astropy.stats import SigmaClip
    from photutils.background import Background2D, MedianBackground
    from photutils.segmentation import SourceCatalog, detect_sources
    from scipy import ndimage

    from daskstack.detect import _SEX_KERNEL

    bkg = Background2D(frame.data, 128, filter_size=3, mask=frame.mask,
                       sigma_clip=SigmaClip(3.0), bkg_estimator=MedianBackground())
    sub = np.where(frame.mask, 0.0, frame.data - bkg.background)
    conv = ndimage.convolve(sub, _SEX_KERNEL, mode="nearest")
    segm = detect_sources(conv, iso_sigma * bkg.background_rms, npixels=npixels,
                          mask=frame.mask)
    cat = SourceCatalog(sub, segm, mask=frame.mask)
    return cat, bkg


SYNTHETIC_PSFS = ("moffat", "asymmetric", "comatic", "trailed")


def _synthetic_sweep(base, thresholds, radii, tmp_dir: Path) -> list[dict]:
    """The same sweep on simulated 0.4 m-like frames whose truth is exact (two frames of
    each PSF shape): a check that the defaults are not tuned to LCO's own positions."""
    from daskstack.catalogs import load_catalog
    from daskstack.frames import read_frame
    from daskstack.simulate import simulate_field

    rows = []
    for k, psf in enumerate(SYNTHETIC_PSFS):
        field = simulate_field(tmp_dir / psf, n_frames=2, shape=(1020, 1523), pixscale=1.14,
                               filters=("rp",), center=(80.88, -1.17), seed=40 + k, psf=psf,
                               fwhm_range=(2.6, 3.0), exptime=12.0, sky=180.0, rdnoise=16.0,
                               density_per_sq_deg=2500.0, mag_range=(10.0, 18.5),
                               pointing_error_arcmin=0.5, hot_pixels=5, bad_columns=1)
        catalog = load_catalog(field.catalog)
        frames = [read_frame(p) for p in field.frames]
        for thr in thresholds:
            for rad in radii:
                settings = replace(base, detect=replace(base.detect, iso_threshold_sigma=thr,
                                                        iso_radius_fwhm=rad))
                for frame in frames:
                    row = _solve_error(frame, catalog, settings, truth=field.wcs(frame.name))
                    row.update({"psf": psf, "iso_threshold_sigma": thr, "iso_radius_fwhm": rad})
                    rows.append(row)
    return rows


def detect_sweep(real_dir, out_dir, tmp_dir, thresholds=SWEEP_THRESHOLDS,
                 radii=SWEEP_RADII) -> Path:
    """Threshold x radius of the isophote -> WCS error against LCO's solution (9 frames),
    and against the truth of simulated frames with asymmetric PSFs; then photutils'
    SourceCatalog centroids + Background2D against daskstack's detection."""
    from daskstack.config import Settings
    from daskstack.detect import detect_sources

    _quiet()
    prov = provenance("python -m benchmarks detect-sweep")
    frames, catalog = _real_frames(real_dir)
    base = Settings()
    sweep = []
    for thr in thresholds:
        for rad in radii:
            settings = replace(base, detect=replace(base.detect, iso_threshold_sigma=thr,
                                                    iso_radius_fwhm=rad))
            for frame in frames.values():
                row = _solve_error(frame, catalog, settings)
                row.update({"iso_threshold_sigma": thr, "iso_radius_fwhm": rad})
                sweep.append(row)
    # photutils against daskstack, frame by frame: speed (best of 3) and the WCS that
    # solve_frame fits from each one's positions for the same stars
    comparison = []
    ds = base.detect
    for frame in frames.values():
        times = {"daskstack": [], "photutils": []}
        for _ in range(3):
            t0 = time.perf_counter()
            det = detect_sources(frame, ds)
            times["daskstack"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            cat, bkg = _photutils_detect(frame, ds.iso_threshold_sigma)
            times["photutils"].append(time.perf_counter() - t0)
        ours = _solve_error(frame, catalog, base, detections=det)
        # the same stars, at photutils' isophotal centroids (nearest segment within 1.5 px)
        from scipy.spatial import cKDTree

        pxy = np.column_stack([np.asarray(cat.xcentroid, float),
                               np.asarray(cat.ycentroid, float)])
        good = np.isfinite(pxy).all(axis=1)
        d, j = cKDTree(pxy[good]).query(det.xy, distance_upper_bound=1.5)
        found = np.isfinite(d)
        theirs_table = det.table[found]
        theirs_table["x"] = pxy[good][j[found], 0]
        theirs_table["y"] = pxy[good][j[found], 1]
        theirs = _solve_error(frame, catalog, base,
                              detections=replace(det, table=theirs_table))
        comparison.append({
            "frame": frame.name, "t_daskstack_s": min(times["daskstack"]),
            "t_photutils_s": min(times["photutils"]), "times": times,
            "n_daskstack": len(det), "n_photutils_segments": int(len(cat)),
            "n_same_stars": int(found.sum()),
            "median_offset_px": float(np.median(d[found])) if found.any() else None,
            "sky_daskstack": det.background, "sky_photutils": float(bkg.background_median),
            "noise_daskstack": det.noise, "noise_photutils": float(bkg.background_rms_median),
            "daskstack": ours, "photutils": theirs,
        })
    synthetic = _synthetic_sweep(base, thresholds, radii, Path(tmp_dir))
    result = {"provenance": prov,
              "truth": "LCO's solved header WCS of the 9 frames with WCSERR=0 (good to "
                       "~0.1-0.4\"); error = RMS separation over a 16x16 pixel grid",
              "catalog": "refcat-pds110.ecsv", "defaults": vars(base.detect),
              "sweep": sweep, "photutils_comparison": comparison,
              "synthetic_truth": "daskstack.simulate frames like the 0.4 m ones (1523x1020, "
                                 "1.14\"/px, FWHM 2.6-3.0 px, 12 s), catalog positions = "
                                 "photocentres; error against the true WCS",
              "synthetic_sweep": synthetic}
    return write_result(out_dir, "detect-sweep", result, _sweep_markdown(result))


def _sweep_table(rows, title) -> list[str]:
    thrs = sorted({r["iso_threshold_sigma"] for r in rows})
    rads = sorted({r["iso_radius_fwhm"] for r in rows})
    lines = [title + "\n",
             "| threshold (sigma) \\ radius (FWHM) | " + " | ".join(f"{r:g}" for r in rads)
             + " |", "|---" * (len(rads) + 1) + "|"]
    for t in thrs:
        cells = []
        for r in rads:
            sel = [x for x in rows if x["iso_threshold_sigma"] == t and x["iso_radius_fwhm"] == r]
            s = _stats(x.get("error_arcsec") for x in sel)
            failed = sum(x["status"] != "ok" for x in sel)
            cells.append(f"{s.get('median', float('nan')):.3f} / {s.get('max', float('nan')):.3f}"
                         + (f" ({failed} failed)" if failed else ""))
        lines.append(f"| {t:g} | " + " | ".join(cells) + " |")
    return lines + [""]


def _sweep_markdown(result) -> str:
    lines = _sweep_table(result["sweep"], "WCS error against LCO's solution, median / worst "
                         "of the 9 frames (arcsec); failed solves counted.")
    synthetic = result.get("synthetic_sweep", [])
    for psf in SYNTHETIC_PSFS:
        sel = [r for r in synthetic if r["psf"] == psf]
        if sel:
            lines += _sweep_table(sel, f"Simulated 0.4 m-like frames, PSF `{psf}`: WCS error "
                                       "against the true WCS, median / worst of 2 frames "
                                       "(arcsec).")
    comp = result["photutils_comparison"]
    ours = _stats(c["daskstack"].get("error_arcsec") for c in comp)
    theirs = _stats(c["photutils"].get("error_arcsec") for c in comp)
    td = _stats(c["t_daskstack_s"] for c in comp)
    tp = _stats(c["t_photutils_s"] for c in comp)
    lines += ["", "photutils (Background2D + detect_sources + SourceCatalog isophotal "
              "centroids, same isophote) against daskstack's detect_sources, same stars, "
              "same solver:\n", "| | daskstack | photutils |", "|---|---|---|",
              f"| WCS error median / worst (arcsec) | {ours['median']:.3f} / {ours['max']:.3f} "
              f"| {theirs['median']:.3f} / {theirs['max']:.3f} |",
              f"| time per frame, median (s, best of 3) | {td['median']:.3f} "
              f"| {tp['median']:.3f} |",
              f"| stars found by both | {sum(c['n_same_stars'] for c in comp)} of "
              f"{sum(c['n_daskstack'] for c in comp)} | |",
              "", "Per frame:\n", "| frame | daskstack error | photutils error | "
              "daskstack s | photutils s | median offset (px) |", "|---|---|---|---|---|---|"]
    for c in comp:
        lines.append(f"| {c['frame']} | {c['daskstack'].get('error_arcsec', float('nan')):.3f}"
                     f" | {c['photutils'].get('error_arcsec', float('nan')):.3f} | "
                     f"{c['t_daskstack_s']:.3f} | {c['t_photutils_s']:.3f} | "
                     f"{c['median_offset_px'] or float('nan'):.2g} |")
    return "\n".join(lines) + "\n"


# -- 2. real-frame astrometry from wrong starts ----------------------------------------------
def astrometry_real(real_dir, out_dir, tmp_dir) -> Path:
    """The test_solve_real runs (nominal and moved start WCSs), every frame's error."""
    from daskstack._validate import wcs_separation_arcsec
    from tests.test_solve_real import moved_start, nominal_start, solve_all, truth_wcs

    _quiet()
    prov = provenance("python -m benchmarks astrometry-real")
    real_dir = Path(real_dir)
    starts = {
        "from_nominal": lambda name: nominal_start,
        "from_moved": lambda name: moved_start(truth_wcs(real_dir, name if name in SOLVED
                                                         else SOLVED[0])),
    }
    runs = {}
    for label, start_for in starts.items():
        work = Path(tmp_dir) / label
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        out, qa = solve_all(real_dir, work, start_for)
        elapsed = time.perf_counter() - t0
        rows = []
        for row in qa:
            name = str(row["name"])
            entry = {"frame": name, "status": str(row["status"]), "reason": str(row["reason"]),
                     "n_matches": int(row["n_matches"]), "rms_arcsec": float(row["rms_arcsec"])}
            if name in SOLVED and entry["status"] == "ok":
                entry["error_arcsec"] = wcs_separation_arcsec(
                    out / f"{name}.wcs", truth_wcs(real_dir, name), (1020, 1523))
            rows.append(entry)
        errors = [r["error_arcsec"] for r in rows if "error_arcsec" in r]
        runs[label] = {"rows": rows, "elapsed_s": elapsed, "summary": _stats(errors),
                       "n_solved": sum(r["status"] == "ok" for r in rows)}
    result = {"provenance": prov,
              "truth": "LCO's solved header WCS (9 frames with WCSERR=0); error = RMS "
                       "separation over a 16x16 pixel grid (daskstack._validate)",
              "runs": runs}
    lines = ["| start WCS | solved | median error (\") | worst error (\") |", "|---|---|---|---|"]
    for label, run in runs.items():
        s = run["summary"]
        lines.append(f"| {label} | {run['n_solved']} of {len(run['rows'])} | "
                     f"{s['median']:.3f} | {s['max']:.3f} |")
    lines += ["", "| start | frame | status | matches | rms (\") | error (\") |",
              "|---|---|---|---|---|---|"]
    for label, run in runs.items():
        for r in run["rows"]:
            lines.append(f"| {label} | {r['frame']} | {r['status']} | {r['n_matches']} | "
                         f"{r['rms_arcsec']:.3f} | {r.get('error_arcsec', float('nan')):.3f} |")
    return write_result(out_dir, "astrometry-real", result, "\n".join(lines) + "\n")


# -- 3. false alarms ----------------------------------------------------------------------
FALSE_ALARM_KINDS = ("scrambled", "random", "other-field")


def false_alarm_catalog(kind: str, catalog, centre, radius_deg: float, rng):
    """A catalog with no counterpart of the frame's stars, as dense as the real one.

    ``scrambled``: the real catalog with RA and Dec shuffled independently (same
    magnitudes and marginal distributions, no pattern); ``random``: uniform positions
    within ``radius_deg`` of ``centre`` at the real catalog's density over the frame;
    ``other-field``: a simulated Gaia-like field (`daskstack.simulate.make_catalog`) of the
    same density, placed on the frame.
    """
    from astropy.table import Table

    from daskstack.catalogs import normalize_catalog
    from daskstack.simulate import make_catalog

    ra = np.asarray(catalog["ra"], float)
    dec = np.asarray(catalog["dec"], float)
    mag = np.asarray(catalog["mag"], float)
    if kind == "scrambled":
        return Table({"ra": rng.permutation(ra), "dec": rng.permutation(dec), "mag": mag})
    cosd = math.cos(math.radians(centre[1]))
    area = np.ptp(ra) * cosd * np.ptp(dec)  # sq deg covered by the real catalog
    density = len(ra) / area
    if kind == "random":
        n = rng.poisson(density * math.pi * radius_deg**2)
        r = radius_deg * np.sqrt(rng.uniform(0, 1, n))
        t = rng.uniform(0, 2 * math.pi, n)
        return Table({"ra": centre[0] + r * np.cos(t) / cosd, "dec": centre[1] + r * np.sin(t),
                      "mag": rng.choice(mag, n)})
    if kind == "other-field":
        sim = make_catalog(centre, radius_deg, density_per_sq_deg=density,
                           mag_range=(float(mag.min()), float(mag.max())),
                           seed=int(rng.integers(1 << 31)))
        return normalize_catalog(sim)
    raise ValueError(f"unknown false-alarm kind {kind!r}")


_TRIAL_CACHE: dict = {}


def _false_alarm_trial(task) -> dict:
    """One trial (runs in a worker process too): the frame's own detections, a catalog
    that does not contain it, `solve_frame` with the default settings."""
    from daskstack.astrometry import solve_frame
    from daskstack.catalogs import load_catalog
    from daskstack.config import Settings
    from daskstack.detect import detect_sources
    from daskstack.frames import read_frame

    _quiet()
    real_dir, kind, name, seed = task
    settings = Settings()
    if name not in _TRIAL_CACHE:
        frame = read_frame(Path(real_dir) / f"{name}.fits.fz")
        _TRIAL_CACHE[name] = (frame, detect_sources(frame, settings.detect))
    if "catalog" not in _TRIAL_CACHE:
        _TRIAL_CACHE["catalog"] = load_catalog(Path(real_dir) / "refcat-pds110.ecsv")
    frame, det = _TRIAL_CACHE[name]
    catalog = _TRIAL_CACHE["catalog"]
    centre = (float(np.median(catalog["ra"])), float(np.median(catalog["dec"])))
    # the random and other-field catalogs cover the frame (its half diagonal), as the real
    # catalog does; the solver still searches search_radius_arcmin around the header
    radius = 0.5 * math.hypot(*frame.data.shape) * 1.14 / 3600
    cat = false_alarm_catalog(kind, catalog, centre, radius, np.random.default_rng(seed))
    t0 = time.perf_counter()
    res = solve_frame(frame, cat, settings, detections=det)
    return {"kind": kind, "frame": name, "seed": seed, "status": res.status,
            "reason": res.reason, "n_catalog": int(len(cat)), "n_matches": res.n_matches,
            "log10_false_alarm": res.match_false_alarm_log10,
            "seconds": time.perf_counter() - t0}


def false_alarms(real_dir, out_dir, trials_per_kind: int = 68, seed: int = 2026,
                 workers: int = 1) -> dict:
    """Solve the 12 real frames against catalogs that do not contain them: every accepted
    solution is a false alarm. Returns the result dict (and writes it when ``out_dir``).
    ``workers`` > 1 runs the trials in that many processes (same trials, same result)."""
    from daskstack.config import Settings

    prov = provenance(f"python -m benchmarks false-alarms --trials {trials_per_kind} "
                      f"--workers {workers}")
    names = SOLVED + UBAND
    seeds = np.random.SeedSequence(seed).generate_state(len(FALSE_ALARM_KINDS)
                                                         * trials_per_kind)
    tasks = [(str(real_dir), kind, names[(k + 5 * i) % len(names)],  # every frame in turn
              int(seeds[i * trials_per_kind + k]))
             for i, kind in enumerate(FALSE_ALARM_KINDS) for k in range(trials_per_kind)]
    t0 = time.perf_counter()
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            trials = list(pool.map(_false_alarm_trial, tasks, chunksize=4))
    else:
        trials = [_false_alarm_trial(task) for task in tasks]
    elapsed = time.perf_counter() - t0
    accepted = [t for t in trials if t["status"] == "ok"]
    settings = Settings()
    result = {"provenance": prov,
              "settings": {"max_false_alarm": settings.solve.max_false_alarm,
                           "search_radius_arcmin": settings.solve.search_radius_arcmin,
                           "searches_per_frame": "4 depths x 3 radii = 12 (x2 with "
                                                 "companions), Bonferroni (match.py)"},
              "n_trials": len(trials), "n_accepted": len(accepted), "elapsed_s": elapsed,
              "trials": trials}
    if out_dir is not None:
        lines = ["| catalog | trials | accepted | best log10 false-alarm probability | "
                 "median s per trial |", "|---|---|---|---|---|"]
        for kind in FALSE_ALARM_KINDS:
            sel = [t for t in trials if t["kind"] == kind]
            best = [t["log10_false_alarm"] for t in sel if np.isfinite(t["log10_false_alarm"])]
            lines.append(f"| {kind} | {len(sel)} | {sum(t['status'] == 'ok' for t in sel)} | "
                         f"{min(best) if best else float('nan'):.1f} | "
                         f"{np.median([t['seconds'] for t in sel]):.2f} |")
        lines.append(f"| all | {len(trials)} | {len(accepted)} | | |")
        reasons = {}
        for t in trials:
            key = t["reason"].split(" (")[0]
            reasons[key] = reasons.get(key, 0) + 1
        lines += ["", "| reason given | trials |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])]
        write_result(out_dir, "false-alarms", result, "\n".join(lines) + "\n")
    return result


# -- 4. registration fast path against reproject_interp ------------------------------------
def fast_path(out_dir, size: int = 4096, seed: int = 5) -> Path:
    """A 4096 x 4096 frame with SIP (3 px of distortion) onto a rotated, shifted TAN grid:
    the fast mesh path against ``reproject_interp`` over the whole grid."""
    from reproject import reproject_interp

    from daskstack import simulate
    from daskstack.config import RegisterSettings
    from daskstack.grid import Grid
    from daskstack.register import exact_mapping, frame_tiles, mesh_mapping, register_frame

    _quiet()
    prov = provenance("python -m benchmarks fast-path")
    shape = (size, size)
    centre = (150.1, 2.2)
    sip = simulate.random_sip(shape, 3.0, rng=np.random.default_rng(seed))
    frame_wcs = simulate.true_frame_wcs(centre, shape, 0.389, rotation_deg=0.7, sip=sip)
    grid_wcs = simulate.true_frame_wcs((150.1003, 2.2002), shape, 0.389, rotation_deg=-0.3)
    grid = Grid.from_wcs(grid_wcs, shape)
    catalog = simulate.make_catalog(centre, 0.35, seed=seed)
    data, _, _ = simulate.render_frame(catalog, frame_wcs, shape, fwhm_px=3.0, sky=100.0,
                                       rdnoise=7.0, exptime=60.0, rng=seed)
    settings = RegisterSettings(tile=1024)
    t0 = time.perf_counter()
    tiles = list(register_frame(data, None, frame_wcs, grid, settings, conserve_flux=False))
    t_fast = time.perf_counter() - t0
    out = np.full(shape, np.nan, np.float32)
    for t in tiles:
        out[t.y0:t.y0 + t.data.shape[0], t.x0:t.x0 + t.data.shape[1]] = t.data
    t0 = time.perf_counter()
    ref, _ = reproject_interp((data, frame_wcs), grid.wcs, shape_out=shape)
    t_ref = time.perf_counter() - t0
    both = np.isfinite(ref) & np.isfinite(out)
    diff = np.abs(out[both].astype(np.float64) - ref[both])
    rel = diff / np.maximum(np.abs(ref[both]), 1e-30)
    # mapping error of the mesh spline against the exact WCS chain, 20000 random pixels
    rng = np.random.default_rng(seed)
    map_err = []
    for y0, x0 in frame_tiles(frame_wcs, shape, grid, settings.tile):
        tshape = (min(settings.tile, size - y0), min(settings.tile, size - x0))
        evaluate, _, _ = mesh_mapping(grid.wcs, frame_wcs, y0, x0, tshape, 64)
        ys = rng.uniform(y0, y0 + tshape[0] - 1, 20000 // 16)
        xs = rng.uniform(x0, x0 + tshape[1] - 1, 20000 // 16)
        sx, sy = evaluate(ys, xs, grid=False)
        ex, ey = exact_mapping(grid.wcs, frame_wcs, xs, ys)
        map_err.append(np.hypot(sx - ex, sy - ey))
    map_err = np.concatenate(map_err)
    map_err = map_err[np.isfinite(map_err)]
    result = {
        "provenance": prov,
        "case": {"shape": shape, "sip_amplitude_px": 3.0, "sip_order": 3, "order": "bilinear",
                 "tile": settings.tile, "sky": 100.0, "frame_rotation_deg": 0.7,
                 "grid_rotation_deg": -0.3},
        "tiles": [{"y0": t.y0, "x0": t.x0, "mapping": t.mapping,
                   "mapping_error_px": t.mapping_error_px} for t in tiles],
        "n_compared": int(both.sum()),
        "coverage_mismatch_px": int((np.isfinite(ref) != np.isfinite(out)).sum()),
        "median_value": float(np.median(ref[both])),
        "abs_diff": {"max": float(diff.max()), "p99": float(np.percentile(diff, 99)),
                     "median": float(np.median(diff))},
        "rel_diff": {"max": float(rel.max()), "p99": float(np.percentile(rel, 99)),
                     "median": float(np.median(rel))},
        "mapping_error_px": {"max": float(map_err.max()),
                             "p99": float(np.percentile(map_err, 99)), "n": int(len(map_err))},
        "t_fast_s": t_fast, "t_reproject_interp_s": t_ref,
    }
    md = ("| measure | value |\n|---|---|\n"
          f"| pixels compared | {result['n_compared']} (coverage differs on "
          f"{result['coverage_mismatch_px']}) |\n"
          f"| median value | {result['median_value']:.1f} |\n"
          f"| max / p99 \\|difference\\| | {diff.max():.3g} / {np.percentile(diff, 99):.3g} |\n"
          f"| max / p99 \\|difference\\| / value | {rel.max():.3g} / "
          f"{np.percentile(rel, 99):.3g} |\n"
          f"| mesh mapping error max / p99 (px) | {map_err.max():.3g} / "
          f"{np.percentile(map_err, 99):.3g} |\n"
          f"| time fast path / reproject_interp (s) | {t_fast:.1f} / {t_ref:.1f} |\n")
    return write_result(out_dir, "fast-path", result, md)
