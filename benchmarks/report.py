"""Markdown tables and the scaling plot from a results JSON file."""

from __future__ import annotations

import json
from pathlib import Path

from . import stats

GiB = 2**30
ORDER = ["floor", "tutorial", "swarp", "reproject_and_coadd", "daskstack-1w", "daskstack-2w"]


def _spread(s, key, fmt="{:.1f}", scale=1.0):
    """'median [min-max]' of a summary's measure (the median alone for one repeat)."""
    if key not in s:
        return "-"
    v, lo, hi = s[key] / scale, s[key + "_min"] / scale, s[key + "_max"] / scale
    if s.get("n_ok", 1) > 1:
        return f"{fmt.format(v)} [{fmt.format(lo)}-{fmt.format(hi)}]"
    return fmt.format(v)


def _groups(results):
    groups = {}
    for r in results["runs"]:
        groups.setdefault((r["dataset"], r["n_frames"]), []).append(r)
    return groups


def _order(contender):
    return ORDER.index(contender) if contender in ORDER else 99


def performance_table(results) -> str:
    """Wall time, CPU time and peak memory of every contender at every N: median [min-max]
    over the repeats that finished."""
    lines = ["| data | N | contender | repeats ok | wall s, mean+median | CPU s, mean+median | "
             "peak RSS GiB, mean+median (process tree) | largest process GiB | "
             "wall s, all steps | status |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (ds, n), recs in _groups(results).items():
        shape = recs[0]["frame_shape"]
        for rec in sorted(recs, key=lambda r: _order(r["contender"])):
            c, s = rec["contender"], rec.get("summary", {})
            status = s.get("status", "?")
            if rec.get("skipped"):
                status = "skipped: " + rec["skipped"]
            head = f"| {ds} {shape[1]}x{shape[0]} | {n} | {c}"
            if status != "ok":
                stop = s.get("stopped_at_rss_bytes")
                if stop:
                    status += (f" (stopped at {stop / GiB:.1f} GiB after "
                               f"{s.get('wall_s_at_stop') or 0:.0f} s)")
                lines.append(f"{head} | {s.get('n_ok', 0)}/{s.get('n', 0)} | - | - | - | - | - | "
                             f"{status} |")
                continue
            failed = [r["status"] for r in rec["repeats"] if r["status"] != "ok"]
            note = rec.get("note") or ""
            lines.append(
                f"{head}{' (' + note + ')' if note else ''} | {s['n_ok']}/{s['n']} | "
                f"{_spread(s, 'wall_core_s')} | {_spread(s, 'cpu_core_s')} | "
                f"{_spread(s, 'peak_core_rss_bytes', '{:.2f}', GiB)} | "
                f"{_spread(s, 'peak_process_rss_bytes', '{:.2f}', GiB)} | "
                f"{_spread(s, 'wall_s')} | "
                f"{'ok' if not failed else 'ok, then ' + ', '.join(failed)} |")
    return "\n".join(lines)


def ratios_table(results) -> str:
    """Each ratio taken between the two contenders' runs of the same interleaved round,
    then median [min-max] over the rounds (the per-round values listed)."""
    rows = stats.paired_ratios(results["runs"])
    if not rows:
        return "_no pair of contenders finished in the same round_"
    lines = ["| data | N | ratio | median [min-max] | rounds | per round |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        spread = (f"{r['median']:.2f} [{r['min']:.2f}-{r['max']:.2f}]" if r["n"] > 1
                  else f"{r['median']:.2f}")
        per = ", ".join(f"{p['value']:.2f}" for p in r["per_repeat"])
        lines.append(f"| {r['dataset']} | {r['n_frames']} | {r['ratio']} | {spread} | "
                     f"{r['n']} | {per} |")
    return "\n".join(lines)


def schedule_section(results) -> str:
    """The order the runs were made in, round by round, at every data size."""
    lines = []
    for g in results.get("schedule", []):
        rounds = "; ".join(f"{i + 1}: {', '.join(order)}" for i, order in enumerate(g["order"]))
        lines.append(f"- {g['dataset']} N={g['n_frames']}: {rounds}")
    return "\n".join(lines) or "_no schedule recorded_"


def steps_table(results) -> str:
    lines = ["| data | N | contender | step | wall s | peak RSS GiB |", "|---|---|---|---|---|---|"]
    for (ds, n), recs in _groups(results).items():
        for r in recs:
            for name, st in r.get("summary", {}).get("steps", {}).items():
                wall = (f"{st['wall_s']:.1f} [{st['wall_s_min']:.1f}-{st['wall_s_max']:.1f}]"
                        if "wall_s_min" in st else f"{st['wall_s']:.1f}")
                lines.append(f"| {ds} | {n} | {r['contender']} | {name} | {wall} | "
                             f"{st['peak_rss_bytes'] / GiB:.2f} |")
    return "\n".join(lines)


def agreement_table(results) -> str:
    lines = ["| data | N | coadd | a vs b | pixels | sky noise | median abs diff / noise | "
             "p99 / noise | max / noise | p99 float32 ulps |", "|---|---|---|---|---|---|---|---|---|---|"]
    for a in results["agreement"]:
        if not a.get("n_pixels"):
            continue
        lines.append(f"| {a['dataset']} | {a['n_frames']} | {a['kind']} | {a['a']} vs {a['b']} | "
                     f"{a['n_pixels']} | {a['sky_noise']:.3g} | {a['median_over_noise']:.2e} | "
                     f"{a['p99_over_noise']:.2e} | {a['max_over_noise']:.2e} | "
                     f"{a['p99_ulp32']:.1f} |")
    return "\n".join(lines)


def stars_table(results) -> str:
    lines = ["| data | N | coadd | stars | median dx, dy px | RMS offset px | flux / truth | "
             "flux scatter |", "|---|---|---|---|---|---|---|---|"]
    for s in results["stars"]:
        if not s.get("n_stars"):
            lines.append(f"| {s['dataset']} | {s['n_frames']} | {s['coadd']} | 0 | "
                         f"{s.get('error', '-')} | | | |")
            continue
        lines.append(f"| {s['dataset']} | {s['n_frames']} | {s['coadd']} | {s['n_stars']} | "
                     f"{s['dx_median_px']:+.3f}, {s['dy_median_px']:+.3f} | "
                     f"{s['offset_rms_px']:.3f} | {s['flux_ratio_median']:.4f} | "
                     f"{s['flux_ratio_scatter']:.4f} |")
    return "\n".join(lines)


def astrometry_section(results) -> str:
    a = results.get("astrometry")
    if not a:
        return "_astrometry not run_"
    out = []

    def timing(rows, label):
        ok = [r for r in rows if r.get("status") == "ok"]
        if not rows:
            return
        times = sorted(r["t_solve_s"] for r in rows)
        med = times[len(times) // 2]
        shape = rows[0]["shape"]
        extra = ""
        errs = [r.get("error_px") for r in ok if r.get("error_px") is not None]
        if errs:
            extra = f"; error vs truth median {sorted(errs)[len(errs) // 2]:.4f} px, max {max(errs):.4f} px"
        hdr = [r.get("vs_header_arcsec") for r in ok if r.get("vs_header_arcsec") is not None]
        if hdr:
            extra = f"; vs LCO's solved WCS median {sorted(hdr)[len(hdr) // 2]:.3f}\""
        out.append(f"- {label} ({shape[1]}x{shape[0]}): {len(ok)}/{len(rows)} solved; "
                   f"detect+match+fit {med:.2f} s per frame (median; range {times[0]:.2f}-"
                   f"{times[-1]:.2f} s; read {rows[0]['t_read_s']:.2f} s){extra}")

    timing(a.get("real", []), "real PDS 110 frames")
    timing(a.get("big", []), "synthetic frames, header 1' / 0.3 deg off")
    sweep = a.get("sweep", [])
    if sweep:
        rots = sorted({r["rotation_error_deg"] for r in sweep})
        pes = sorted({r["pointing_error_arcmin"] for r in sweep})
        shape = sweep[0]["shape"]
        out.append(f"\nAccuracy against the truth (RMS px over the frame, worst of the frames; "
                   f"{shape[1]}x{shape[0]}; 'fail' = not solved):\n")
        out.append("| pointing error \\ rotation | " + " | ".join(f"{r} deg" for r in rots) + " |")
        out.append("|---|" + "---|" * len(rots))
        for pe in pes:
            cells = []
            for rot in rots:
                rows = [r for r in sweep if r["pointing_error_arcmin"] == pe
                        and r["rotation_error_deg"] == rot]
                if not rows:
                    cells.append("-")
                elif any(r["status"] != "ok" for r in rows):
                    cells.append("fail: " + rows[0].get("reason", "")[:40])
                else:
                    cells.append(f"{max(r['error_px'] for r in rows):.4f} "
                                 f"({max(r['t_solve_s'] for r in rows):.1f} s)")
            out.append(f"| {pe}' | " + " | ".join(cells) + " |")
    for err in a.get("errors", []):
        out.append(f"\nerror: ```{err.strip()[-800:]}```")
    return "\n".join(out)


def targets(results) -> str:
    """The issue's targets, evaluated on this run (or 'not measured')."""
    runs = {(r["dataset"], r["n_frames"], r["contender"]): r.get("summary", {})
            for r in results["runs"]}
    synth = sorted({n for (d, n, c) in runs if d.startswith("synth")})
    lines = []

    def get(n, c, key="wall_core_s"):
        s = runs.get((next((d for (d, m, _) in runs if d.startswith("synth") and m == n), ""), n,
                      c), {})
        return s.get(key) if s.get("status") == "ok" else None

    ratios = {(r["n_frames"], r["numerator"], r["denominator"], r["measure"]): r
              for r in stats.paired_ratios(results["runs"]) if r["dataset"].startswith("synth")}
    n20 = 20 if 20 in synth else (max(synth) if synth else None)
    if n20 is not None:
        tag = "" if n20 == 20 else f" (N=20 not in this suite: shown at N={n20})"
        for c in ("daskstack-2w", "daskstack-1w"):
            if get(n20, c) is None:
                continue
            ts = runs.get((next((d for (d, m, _) in runs if d.startswith("synth") and m == n20),
                                 ""), n20, "tutorial"), {}).get("status")
            speedup = ratios.get((n20, "tutorial", c, "wall_core_s"))
            vs_swarp = ratios.get((n20, c, "swarp", "wall_core_s"))
            if not speedup and ts and ts != "ok":
                lines.append(f"- tutorial at N={n20}: {ts} (no time to compare {c} with)")
            if speedup:
                x = speedup["median"]
                lines.append(f"- {c} mean+median vs tutorial at N={n20}{tag}: {x:.2f}x faster "
                             f"(median of {speedup['n']} rounds, {speedup['min']:.2f}-"
                             f"{speedup['max']:.2f}; target >= 3x: {'met' if x >= 3 else 'MISSED'})")
            if vs_swarp:
                x = vs_swarp["median"]
                lines.append(f"- {c} vs SWarp at N={n20}: {x:.2f}x SWarp's wall time (median of "
                             f"{vs_swarp['n']} rounds, {vs_swarp['min']:.2f}-{vs_swarp['max']:.2f};"
                             f" target <= 1.5x: {'met' if x <= 1.5 else 'MISSED'})")
    for c in ("daskstack-2w", "daskstack-1w"):
        p10, p40 = get(10, c, "peak_rss_bytes"), get(40, c, "peak_rss_bytes")
        if p10 and p40:
            r = p40 / p10
            lines.append(f"- {c} peak memory N=40 / N=10: {r:.2f} ({p40 / GiB:.2f} GiB at N=40; "
                         f"targets <= 1.2x and < 3 GiB: "
                         f"{'met' if r <= 1.2 and p40 < 3 * GiB else 'MISSED'})")
        elif synth:
            peaks = {n: get(n, c, "peak_rss_bytes") for n in synth}
            peaks = {n: p for n, p in peaks.items() if p}
            if peaks:
                lines.append(f"- {c} peak memory by N (N=10 and 40 needed for the target): " +
                             ", ".join(f"N={n}: {p / GiB:.2f} GiB" for n, p in peaks.items()))
    lines += _scaling_targets(results, synth, get, ratios)
    for a in results["agreement"]:
        if a["a"] == "tutorial" and a["kind"] == "mean" and a.get("n_pixels"):
            lines.append(f"- daskstack mean vs tutorial mean ({a['dataset']}, N={a['n_frames']}): "
                         f"p99 {a['p99_ulp32']:.1f} float32 ulps, max {a['max_over_noise']:.1e} "
                         f"x noise (target: float32 precision)")
        if a["a"] == "swarp" and a["b"].startswith("daskstack") and a.get("n_pixels"):
            lines.append(f"- daskstack {a['kind']} vs SWarp ({a['dataset']}, N={a['n_frames']}): "
                         f"median |diff| {100 * a['median_over_noise']:.3f}% of the sky noise "
                         f"(target < 1%: {'met' if a['median_over_noise'] < 0.01 else 'MISSED'})")
    astro = results.get("astrometry") or {}
    big = [r for r in astro.get("big", []) if r.get("status") == "ok"]
    if big:
        t = sorted(r["t_solve_s"] for r in big)[len(big) // 2]
        lines.append(f"- astrometry 4096x4096 on one core: {t:.2f} s per frame "
                     f"(target < 2 s: {'met' if t < 2 else 'MISSED'})")
    sweep = [r for r in astro.get("sweep", []) if r["pointing_error_arcmin"] <= 10]
    if sweep:
        bad = [r for r in sweep if r["status"] != "ok" or r.get("error_px", 1) > 0.05]
        worst = max((r.get("error_px", float("inf")) if r["status"] == "ok" else float("inf"))
                    for r in sweep)
        lines.append(f"- astrometry accuracy to 10' and any rotation: worst {worst:.4f} px "
                     f"(target <= 0.05 px: {'met' if not bad else f'MISSED in {len(bad)} of {len(sweep)} frames'})")
    return "\n".join(lines) if lines else "_nothing to evaluate_"


# issue 18: daskstack-2w against SWarp ("mean+median"): N -> (wall, CPU) ratio ceilings
SWARP_CEILINGS = {20: (0.35, 0.6), 100: (0.35, None)}
MEMORY_NS, MEMORY_GROWTH, MEMORY_CAP_GIB = (10, 20, 40, 100), 1.2, 0.6
COMBINE_NS, COMBINE_GROWTH = (20, 100), 1.3


def _scaling_targets(results, synth, get, ratios) -> list[str]:
    """Issue 18's criteria: daskstack-2w against SWarp at N=20 and 100, its largest
    process flat in N and below a cap, and its combine step (``sigclip``: a process that
    reads the store and combines, start included) costing the same per frame at N=100 as
    at N=20."""
    c, lines = "daskstack-2w", []
    for n, (wall_cap, cpu_cap) in SWARP_CEILINGS.items():
        for measure, cap in (("wall_core_s", wall_cap), ("cpu_core_s", cpu_cap)):
            r = ratios.get((n, c, "swarp", measure))
            if cap is None or r is None:
                continue
            lines.append(f"- {c} / SWarp at N={n}, {measure.split('_')[0]} (mean+median): "
                         f"{r['median']:.2f} (median of {r['n']} rounds, {r['min']:.2f}-"
                         f"{r['max']:.2f}; target <= {cap}: "
                         f"{'met' if r['median'] <= cap else 'MISSED'})")
    peaks = {n: get(n, c, "peak_process_rss_bytes") for n in MEMORY_NS if n in synth}
    peaks = {n: p / GiB for n, p in peaks.items() if p}
    if peaks:
        base = peaks.get(MEMORY_NS[0])
        worst = max(peaks.values())
        met = (base is not None and worst <= MEMORY_GROWTH * base and worst < MEMORY_CAP_GIB
               and len(peaks) == len(MEMORY_NS))
        lines.append(f"- {c} largest process (median over repeats): "
                     + ", ".join(f"N={n}: {p:.2f} GiB" for n, p in peaks.items())
                     + (f"; largest / N={MEMORY_NS[0]}: {worst / base:.2f}" if base else "")
                     + f" (targets <= {MEMORY_GROWTH}x N={MEMORY_NS[0]}'s and < "
                     f"{MEMORY_CAP_GIB} GiB at N={', '.join(map(str, MEMORY_NS))}: "
                     f"{'met' if met else 'MISSED or not all measured'})")
    per_frame = {}
    for n in COMBINE_NS:
        steps = get(n, c, "steps") or {}
        if "sigclip" in steps:
            per_frame[n] = steps["sigclip"]["wall_s"] / n
    if len(per_frame) == len(COMBINE_NS):
        lo, hi = (per_frame[n] for n in COMBINE_NS)
        lines.append(f"- {c} combine step (sigclip, its own process) per frame: "
                     f"N={COMBINE_NS[0]}: {lo:.2f} s, N={COMBINE_NS[1]}: {hi:.2f} s; ratio "
                     f"{hi / lo:.2f} (target <= {COMBINE_GROWTH}: "
                     f"{'met' if hi / lo <= COMBINE_GROWTH else 'MISSED'})")
    return lines


def plot(results, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for r in results["runs"]:
        if not r["dataset"].startswith("synth"):
            continue
        s = r.get("summary", {})
        series.setdefault(r["contender"], []).append((r["n_frames"], s))
    if not series:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for c in sorted(series, key=lambda c: ORDER.index(c) if c in ORDER else 99):
        pts = sorted(series[c], key=lambda p: p[0])
        ok = [(n, s) for n, s in pts if s.get("status") == "ok"]
        line = None
        if ok:
            line, = ax1.plot([n for n, _ in ok], [s["wall_core_s"] for _, s in ok], "o-", label=c)
            if any(s.get("n_ok", 1) > 1 for _, s in ok):
                ax1.vlines([n for n, _ in ok], [s["wall_core_s_min"] for _, s in ok],
                           [s["wall_core_s_max"] for _, s in ok], color=line.get_color())
            ax2.plot([n for n, _ in ok], [s["peak_core_rss_bytes"] / GiB for _, s in ok], "o-",
                     color=line.get_color(), label=c)
            if any(s.get("n_ok", 1) > 1 for _, s in ok):
                ax2.vlines([n for n, _ in ok], [s["peak_core_rss_bytes_min"] / GiB for _, s in ok],
                           [s["peak_core_rss_bytes_max"] / GiB for _, s in ok],
                           color=line.get_color())
        oom = [(n, s) for n, s in pts if s.get("status") == "out-of-memory"]
        if oom:
            color = line.get_color() if line else "k"
            ax2.plot([n for n, _ in oom], [s["stopped_at_rss_bytes"] / GiB for _, s in oom], "x",
                     ms=10, mew=2, color=color, label=f"{c}: stopped (memory)")
    ax1.set(xlabel="frames (4096x4096)", ylabel="wall time, mean + median (s)",
            xscale="log", yscale="log", title="time")
    ax2.set(xlabel="frames (4096x4096)",
            ylabel="peak RSS of the process tree, mean + median (GiB)",
            xscale="log", title="memory")
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=8)
    fig.suptitle(f"daskstack benchmarks ({results['suite']} suite, "
                 f"{results['machine']['affinity']} cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(json_path) -> tuple[Path, Path | None]:
    json_path = Path(json_path)
    results = json.loads(json_path.read_text())
    png = plot(results, json_path.with_suffix(".png"))
    m = results["machine"]
    overrides = results.get("overrides") or {}
    title = f"# daskstack benchmarks: {results['suite']} suite ({results['started']})"
    if overrides:
        title += " - CUSTOM RUN, not the suite as defined"
    parts = [
        title,
        f"\nMade by `{results.get('command', '?')}` at commit `{results.get('commit', '?')}`"
        + (f" with uncommitted changes to {', '.join(results['modified_files'])}"
           if results.get("modified_files") else "")
        + (f"; overrides of the suite: {json.dumps(overrides)}" if overrides else "") + ".",
        f"\nMachine: {m['affinity']} cores, {m['memory_gib']:.1f} GiB "
        f"(load average at start {', '.join(f'{x:.1f}' for x in m['load_avg'])}); "
        f"{m.get('swarp') or 'SWarp not installed'}; Python {m.get('python')}, "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
        + f". Suite wall time {results.get('elapsed_s', 0) / 60:.1f} min. Memory cap for a run: "
        f"{results['mem_limit_bytes'] / GiB:.1f} GiB.",
        "\nTimes are of whole processes: median [min-max] over the repeats, which ran "
        "interleaved (round r of every contender before round r+1 of any, the order rotated "
        "each round; see 'Order of the runs'). 'mean+median' is what each contender needs to "
        "produce both coadds (SWarp: decompression + resample/average + median of the "
        "resampled frames; daskstack: one `run --combine mean,median`); 'all steps' adds "
        "daskstack's sigma-clipped combine. Peak RSS is of the whole process tree (all "
        "workers); 'largest process' is the largest single process in it. Every raw "
        "per-repeat figure is in the JSON file of the same name.",
        "\n## Time and memory\n", performance_table(results),
        "\n## Ratios within each round\n", ratios_table(results),
        "\n## Targets\n", targets(results),
        "\n## Agreement on the same grid (pixels all cover)\n", agreement_table(results),
        "\n## Stars in the coadds against the truth (synthetic)\n", stars_table(results),
        "\n## Astrometry (one core)\n", astrometry_section(results),
        "\n## Steps (median [min-max])\n", steps_table(results),
        "\n## Order of the runs\n", schedule_section(results),
    ]
    if results.get("generation_s"):
        parts.append("\nInput generation (not timed as a contender): " + ", ".join(
            f"{k} {v:.0f} s" for k, v in results["generation_s"].items()))
    for note in results.get("notes", []):
        parts.append(f"\nNote: {note}")
    if png:
        parts.append(f"\n![scaling]({png.name})")
    md = json_path.with_suffix(".md")
    md.write_text("\n".join(parts) + "\n")
    return md, png
