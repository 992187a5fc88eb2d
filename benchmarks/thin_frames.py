"""Thin frames solved with the geometry of the night's solved exposures (issue 19).

    python -m benchmarks thin-frames --nights 20 --per-night 10 --workers 2

Each synthetic *night* (`daskstack.simulate`): one camera (a random rotation, parity, a
SIP distortion, a 1.7 % scale error and 180-degree rotation in its nominal header WCS),
a telescope pointing error common to the night (up to 60"), and four rich exposures of a
field, solved by `solve_frame` (pattern match) as the pipeline would. Their solutions give
the `GeometryPrior` and their detections the night's stars (`night_sources`). Then thin
exposures of the same field, dithered by up to 20" (plus 4" of pointing jitter), each with
4 to 8 well-exposed catalog stars (S/N ~50-300) among 50 cosmic rays and hot pixels, are solved by
`solve_constrained` alone (no companions: the hardest case), and so are the same frames
with the stars of another field (the catalog knows none of them) and with no star at all.

Judged against the true WCS: the RMS and the largest pixel error over an 11 x 11 grid of
the frame (the solved WCS's pixel of the true WCS's sky position). Every solution of an
``other-field`` or ``no-stars`` frame is a false alarm. Writes
``benchmarks/results/thin-frames-<YYYYMMDD>.json`` (machine, versions, commit, every trial)
and a ``.md`` summary.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

import numpy as np

KINDS = ("thin", "other-field", "no-stars")
SHAPE = (512, 768)
PIXSCALE = 1.2  # arcsec / px
N_SPURIOUS = 50  # cosmic rays + hot pixels per thin frame
N_SOLVED = 4  # rich exposures of the night, solved by pattern match
# every exposure's PSF. Not "asymmetric": there the isophotal barycentres that daskstack
# measures (as LCO's catalogs do, see detect.py) sit ~0.1 px from the true photocentre,
# the same in every exposure, which a comparison with the true WCS at 0.1 px would count
PSF = "moffat"
_NIGHTS: dict = {}  # per worker process: the nights already made


def _frame(simulate, catalog, true_wcs, header_offset, rng, *, framenum, n_cosmic_rays=0,
           hot_pixels=0, psf="moffat", filter_name="rp", exptime=60.0):
    """A `Frame` in memory: rendered pixels, an LCO header whose WCS is the nominal one."""
    from daskstack.frames import Frame, _meta_from_header

    data, bpm, info = simulate.render_frame(catalog, true_wcs, SHAPE, rng=rng, psf=psf,
                                            n_cosmic_rays=n_cosmic_rays,
                                            hot_pixels=hot_pixels, exptime=exptime)
    header = simulate.lco_header(true_wcs, SHAPE, pointing_offset_arcsec=header_offset,
                                 rotation_error_deg=0.0, scale_error=0.017, rotate_180=True,
                                 filter_name=filter_name, framenum=framenum,
                                 pixscale=PIXSCALE, exptime=exptime)
    name = f"night-{framenum:04d}"
    meta = _meta_from_header(f"{name}.fits", "SCI", header, SHAPE)
    return Frame(meta, data.astype(np.float32), bpm > 0, header), info


def make_night(seed: int) -> dict:
    """One night: catalog, camera, pointing error, the prior of two solved exposures."""
    from daskstack import simulate
    from daskstack.astrometry import geometry_prior, night_sources, solve_frame
    from daskstack.config import Settings
    from daskstack.detect import detect_sources

    rng = np.random.default_rng(seed)
    centre = (float(rng.uniform(0, 360)), float(rng.uniform(-60, 60)))
    # ~80 catalog stars per frame (the real u' frames: ~120 in a frame 4x larger); the other
    # field: other stars at the same place (a catalog that knows none of them)
    catalog = simulate.make_catalog(centre, 0.35, n_stars=700, seed=seed,
                                    mag_range=(12.0, 19.0))
    other = simulate.make_catalog(centre, 0.35, n_stars=700, seed=seed + 10**6,
                                  mag_range=(12.0, 19.0))
    rotation = float(rng.uniform(0, 360))
    flip = bool(rng.integers(2))
    sip = simulate.random_sip(SHAPE, amplitude_px=1.5, rng=rng, order=2)
    pointing = rng.uniform(-60, 60, 2)  # the night's pointing error, arcsec (east, north)
    # the solved exposures fit the camera's distortion (SIP order 2), as a user whose camera
    # has some would ask for
    settings = Settings()
    settings = replace(settings, solve=replace(settings.solve, sip_order=2))
    solved, dets, wcss = [], [], []
    for k in range(N_SOLVED):
        dither = rng.uniform(-5, 5, 2)
        true = simulate.true_frame_wcs(simulate._offset(*centre, *dither), SHAPE, PIXSCALE,
                                       rotation, flip, sip=sip)
        frame, _ = _frame(simulate, catalog, true, tuple(pointing + rng.normal(0, 4, 2)), rng,
                          framenum=seed % 1000 * 10 + k)
        det = detect_sources(frame, settings.detect)
        res = solve_frame(frame, catalog, settings, detections=det)
        if res.ok:
            with_start = frame.meta.header_wcs()
            start = tuple(float(v) for v in with_start.all_pix2world(
                [[(SHAPE[1] - 1) / 2, (SHAPE[0] - 1) / 2]], 0)[0])
            solved.append((frame.name, res.wcs, start))
            dets.append(det)
            wcss.append(res.wcs)
    night = {"seed": seed, "centre": centre, "catalog": catalog, "other": other,
             "rotation": rotation, "flip": flip, "sip": sip, "pointing": pointing,
             "n_solved": len(solved)}
    if solved:
        night["prior"] = geometry_prior(solved, SHAPE)
        night["night"] = night_sources(dets, wcss, radius_arcsec=2.0 * PIXSCALE)
    return night


def thin_trial(task) -> dict:
    """One trial (runs in a worker process too): a thin frame of ``kind`` solved by
    `solve_constrained` with its night's prior; its error against the true WCS."""
    from daskstack import simulate
    from daskstack.astrometry import solve_constrained
    from daskstack.config import Settings

    night_seed, kind, seed = task
    if night_seed not in _NIGHTS:
        _NIGHTS.clear()
        _NIGHTS[night_seed] = make_night(night_seed)
    night = _NIGHTS[night_seed]
    row = {"night": night_seed, "kind": kind, "seed": seed, "n_solved_exposures":
           night["n_solved"]}
    if "prior" not in night:
        return {**row, "status": "skipped", "reason": "no solved exposure that night"}
    rng = np.random.default_rng(seed)
    dither = rng.uniform(-20, 20, 2)
    true = simulate.true_frame_wcs(simulate._offset(*night["centre"], *dither), SHAPE,
                                   PIXSCALE, night["rotation"], night["flip"], sip=night["sip"])
    source = night["other"] if kind == "other-field" else night["catalog"]
    # 4 to 8 stars of the frame, well exposed (S/N ~50-300: a frame thin in stars, not in
    # signal; fainter stars' centroids scatter by more than 0.1 px on their own)
    _, _, inside = simulate.star_positions(source, true, shape=SHAPE, margin=-10.0)
    n_stars = int(rng.integers(4, 9))
    pick = rng.choice(inside, n_stars, replace=False)
    stars = source[pick]
    stars["phot_g_mean_mag"] = rng.uniform(13.5, 15.5, n_stars)
    if kind == "no-stars":
        stars = stars[:0]
    n_hot = int(rng.integers(10, 30))
    frame, info = _frame(simulate, stars, true, tuple(night["pointing"] + rng.normal(0, 4, 2)),
                         rng, framenum=seed % 10000, n_cosmic_rays=N_SPURIOUS - n_hot,
                         hot_pixels=n_hot, psf=PSF, filter_name="up", exptime=30.0)
    t0 = time.perf_counter()
    res = solve_constrained(frame, night["catalog"], night["prior"], Settings(),
                            night=night["night"])
    row.update(status=res.status, reason=res.reason, n_stars=len(stars),
               n_cosmic_rays=N_SPURIOUS - n_hot, n_hot_pixels=n_hot,
               n_detections=res.n_detections, n_matches=res.n_matches,
               rms_arcsec=res.rms_arcsec, log10_false_alarm=res.match_false_alarm_log10,
               seconds=time.perf_counter() - t0)
    if res.ok:
        row.update(pixel_error_stats(res.wcs, true))
    return row


def pixel_error_stats(wcs, truth) -> dict:
    """RMS and largest distance (px) over an 11 x 11 grid of the frame between each pixel
    and where ``wcs`` puts the sky position that ``truth`` gives it."""
    from daskstack.frames import quiet_astropy

    gx, gy = np.meshgrid(np.linspace(0, SHAPE[1] - 1, 11), np.linspace(0, SHAPE[0] - 1, 11))
    with quiet_astropy():
        ra, dec = truth.all_pix2world(gx.ravel(), gy.ravel(), 0)
        px, py = wcs.all_world2pix(ra, dec, 0)
    d = np.hypot(px - gx.ravel(), py - gy.ravel())
    return {"rms_px_error": float(np.sqrt(np.mean(d**2))), "max_px_error": float(d.max())}


def run_trials(nights: int, per_night: int, seed: int = 2026, workers: int = 1) -> list[dict]:
    """Every (night, kind, trial), ``per_night`` trials of each kind per night."""
    seeds = np.random.SeedSequence(seed).generate_state(nights * (1 + len(KINDS) * per_night))
    seeds = [int(s) for s in seeds]
    tasks = []
    for n in range(nights):
        base = n * (1 + len(KINDS) * per_night)
        for i, kind in enumerate(KINDS):
            for k in range(per_night):
                tasks.append((seeds[base] % 2**31, kind, seeds[base + 1 + i * per_night + k]))
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        # one night per chunk: a worker makes each of its nights once
        with ProcessPoolExecutor(workers) as pool:
            return list(pool.map(thin_trial, tasks, chunksize=len(KINDS) * per_night))
    return [thin_trial(task) for task in tasks]


def summary(trials: list[dict]) -> dict:
    """Per kind: trials, accepted, and for thin frames the fraction within 0.1 px."""
    out = {}
    for kind in KINDS:
        sel = [t for t in trials if t["kind"] == kind and t["status"] != "skipped"]
        ok = [t for t in sel if t["status"] == "ok"]
        row = {"trials": len(sel), "accepted": len(ok)}
        if kind == "thin" and sel:
            within = [t for t in ok if t["rms_px_error"] <= 0.1]
            row.update(within_0p1_px=len(within), fraction_within_0p1_px=len(within) / len(sel),
                       max_within=sum(t["max_px_error"] <= 0.1 for t in ok),
                       median_rms_px_error=float(np.median([t["rms_px_error"] for t in ok]))
                       if ok else math.nan,
                       worst_rms_px_error=max((t["rms_px_error"] for t in ok), default=math.nan))
        out[kind] = row
    return out


def thin_frames(out_dir, nights: int = 20, per_night: int = 10, seed: int = 2026,
                workers: int = 1) -> dict:
    """Run the trials, write the result (when ``out_dir``) and return it."""
    from daskstack.config import Settings

    from .astrometry_evidence import _quiet, provenance, write_result

    _quiet()
    prov = provenance(f"python -m benchmarks thin-frames --nights {nights} --per-night "
                      f"{per_night} --workers {workers}")
    t0 = time.perf_counter()
    trials = run_trials(nights, per_night, seed, workers)
    ss = Settings().solve
    result = {"provenance": prov, "elapsed_s": time.perf_counter() - t0,
              "settings": {"max_false_alarm": ss.max_false_alarm,
                           "constrained_min_matches": ss.constrained_min_matches,
                           "companion_max_shift_arcsec": ss.companion_max_shift_arcsec,
                           "search_radius_arcmin": ss.search_radius_arcmin,
                           "shape": SHAPE, "pixscale_arcsec": PIXSCALE,
                           "spurious_per_frame": N_SPURIOUS},
              "summary": summary(trials), "trials": trials}
    if out_dir is not None:
        s = result["summary"]
        lines = ["| frames | trials | accepted | within 0.1 px (RMS over the frame) | "
                 "within 0.1 px (worst grid point) | median RMS px error |",
                 "|---|---|---|---|---|---|"]
        for kind in KINDS:
            r = s[kind]
            if kind == "thin":
                lines.append(f"| {kind} (4-8 stars, 50 cosmic rays + hot pixels) | "
                             f"{r['trials']} | {r['accepted']} | {r['within_0p1_px']} "
                             f"({100 * r['fraction_within_0p1_px']:.1f} %) | {r['max_within']} | "
                             f"{r['median_rms_px_error']:.3f} |")
            else:
                lines.append(f"| {kind} | {r['trials']} | {r['accepted']} | | | |")
        reasons: dict = {}
        for t in trials:
            if t["status"] != "ok":
                key = f"{t['kind']}: {t['reason'].split(' (')[0]}"
                reasons[key] = reasons.get(key, 0) + 1
        lines += ["", "| refused: reason | trials |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])]
        write_result(out_dir, "thin-frames", result, "\n".join(lines) + "\n")
    return result
