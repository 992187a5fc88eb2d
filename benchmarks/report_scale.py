"""``python -m benchmarks report-scale``: how the report scales with the number of frames.

For each frame count N: N small synthetic frames (one field, two filters, a cadence that
spans two nights, a few frames degraded), ``daskstack run --wcs header`` on them (the
header WCS is exact in these frames: the run is registration and combination only,
short), then ``daskstack report`` on the run directory, both as measured processes (wall
time, peak memory of the process tree; each starts its own LocalCluster). Recorded per N:
run and report time and their ratio, the report's size and file count, and, where
Chromium is installed, the time ``chromium --headless --dump-dom`` takes to load the page
from the file system (browser start included) and how many of its images did not decode.

Writes ``benchmarks/results/report-scale-<date>.json`` and ``.md`` (machine, versions,
commit, raw numbers).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from . import measure
from .runner import run_per_n

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"]


def simulate(directory: Path, n_frames: int, size: int, seed: int = 21) -> list[Path]:
    """N frames with exact header WCSs (WCSERR = 0), two filters, about 12 of them
    degraded (seeing, clouds, trailing in turn; with --wcs header only the sky level is
    measured, so only the clouds' bright sky can be flagged)."""
    from daskstack.simulate import simulate_field

    kinds = ({"fwhm_px": 7.0}, {"transparency": 0.3, "sky_factor": 3.0},
             {"psf": "trailed"})
    degraded = {i: kinds[k % len(kinds)]
                for k, i in enumerate(range(3, n_frames, max(7, n_frames // 12)))}
    with ProcessPoolExecutor(2) as pool:
        field = simulate_field(directory, n_frames=n_frames, shape=(size, size),
                               filters=("rp", "gp"), seed=seed, pointing_error_arcmin=0.0,
                               rotation_error_deg=0.0, cosmic_rays=False, hot_pixels=0,
                               bad_columns=0, exptime=30.0,
                               cadence_s=2 * 86400.0 / max(n_frames, 1),  # two nights
                               frame_overrides=degraded, executor=pool)
    return [Path(p) for p in field.frames]


def _run_timings(log_text: str) -> dict[str, float]:
    """The phase timings the run printed (``time: inspect 1.2s  solve 0.0s ...``)."""
    line = next(line for line in log_text.splitlines() if line.startswith("time: "))
    return {k: float(v) for k, v in re.findall(r"(\S+) ([\d.]+)s", line)}


def _dir_size(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def _chromium_load(index: Path, scratch: Path) -> dict | None:
    if CHROMIUM is None:
        return None
    start = time.perf_counter()
    proc = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={scratch}",
                           "--dump-dom", index.resolve().as_uri()],
                          capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - start
    images = re.search(r'data-images="(\d+)"', proc.stdout)
    broken = re.search(r'data-broken-images="(\d+)"', proc.stdout)
    load_ms = re.search(r'data-load-ms="(\d+)"', proc.stdout)
    return {"seconds": seconds, "images": int(images.group(1)) if images else None,
            "page_load_ms": int(load_ms.group(1)) if load_ms else None,
            "broken_images": int(broken.group(1)) if broken else None,
            "chromium": subprocess.run([CHROMIUM, "--version"], capture_output=True,
                                       text=True).stdout.strip()}


def measure_one(n_frames: int, size: int, workdir: Path, workers: int) -> dict:
    inputs = workdir / f"inputs-{n_frames}"
    out = workdir / f"run-{n_frames}"
    start = time.perf_counter()
    frames = simulate(inputs, n_frames, size)
    simulate_s = time.perf_counter() - start
    cli = [sys.executable, "-m", "daskstack.cli"]
    # the run with its report, as a user runs it: the run's own phase timings say how
    # long the report took beside the pipeline (no process or cluster start in either)
    run = dataclasses.asdict(measure.run_measured(
        [*cli, "run", *map(str, frames), "--wcs", "header", "--out", str(out), "--overwrite",
         "--workers", str(workers), "--report"], log_path=workdir / f"run-{n_frames}.log"))
    # and `daskstack report` again, alone: a process of its own (cluster start included)
    report = dataclasses.asdict(measure.run_measured(
        [*cli, "report", str(out), "--workers", str(workers), "-q"],
        log_path=workdir / f"report-{n_frames}.log"))
    for what, m in (("run", run), ("report", report)):
        if m["status"] != "ok":
            raise RuntimeError(f"{what} of {n_frames} frames: {m['status']} (exit "
                               f"{m['returncode']}): {Path(m['log']).read_text()[-2000:]}")
    timings = _run_timings(Path(run["log"]).read_text())
    pipeline_s = sum(v for k, v in timings.items() if k != "report")
    size_bytes, n_files = _dir_size(out / "report")
    manifest = (out / "manifest.ecsv").read_text().splitlines()
    flagged = [line.split()[0] for line in
               (out / "report" / "suggested-exclude.txt").read_text().splitlines()
               if line and not line.startswith("#")]
    record = {
        "n_frames": n_frames, "frame_shape": [size, size], "workers": workers,
        "simulate_s": simulate_s, "run": run, "report": report,
        "run_timings_s": timings, "pipeline_s": pipeline_s,
        "report_in_run_s": timings.get("report"),
        "report_over_pipeline": timings["report"] / pipeline_s,
        "report_process_over_run_process": report["wall_s"] / run["wall_s"],
        "report_bytes": size_bytes, "report_files": n_files,
        "report_bytes_per_frame": size_bytes / n_frames,
        "manifest_rows": sum(1 for line in manifest if line and not line.startswith("#")) - 1,
        "flagged": len(flagged),
        "chromium": _chromium_load(out / "report" / "index.html", workdir / f"chr-{n_frames}"),
    }
    return record


def _markdown(result: dict) -> str:
    lines = [f"# Report scale ({result['date']})", "",
             f"Command: `{result['provenance']['command']}`; commit "
             f"`{result['provenance']['commit']}` (branch {result['provenance']['branch']}"
             + (f", modified: {', '.join(result['provenance']['modified_files'])}"
                if result["provenance"]["modified_files"] else "") + ").",
             f"Machine: {result['machine']['cpus']} CPUs ({result['machine']['affinity']} "
             f"usable), {result['machine']['memory_gib']:.1f} GiB, load average "
             f"{', '.join(f'{v:.1f}' for v in result['machine']['load_avg'])} at the start; "
             f"Python {result['machine']['python']}, dask "
             f"{result['machine']['versions'].get('dask')}, daskstack "
             f"{result['machine']['versions'].get('daskstack')}.", "",
             "Each N: `daskstack run FRAMES --wcs header --workers W --report`: the "
             "pipeline's phases (inspect, solve, register, combine) and the report phase "
             "as the run timed them (`time:` line); then `daskstack report OUT --workers W` "
             "alone, a process with its own LocalCluster (start and stop included), beside "
             "the run's whole process (its report included). Chromium: `chromium "
             "--headless --dump-dom` of the page from the file system: the whole command "
             "(browser start included), and the page's own load time (navigation start "
             "to its load event, `performance.now()`).", "",
             "| frames | size | pipeline (s) | report in the run (s) | report / pipeline | "
             "run process (s) | report process (s) | report size | files | bytes / frame | "
             "flagged | rows | Chromium command (s) | page load (ms) | images | broken |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["results"]:
        chrome = r.get("chromium") or {}
        lines.append(
            f"| {r['n_frames']} | {r['frame_shape'][0]} px | {r['pipeline_s']:.1f} | "
            f"{r['report_in_run_s']:.1f} | {r['report_over_pipeline']:.2f} | "
            f"{r['run']['wall_s']:.1f} | {r['report']['wall_s']:.1f} | "
            f"{r['report_bytes'] / 2**20:.2f} MiB | {r['report_files']} | "
            f"{r['report_bytes_per_frame'] / 1024:.1f} KiB | {r['flagged']} | "
            f"{r['manifest_rows']} | "
            f"{chrome.get('seconds', float('nan')):.2f} | {chrome.get('page_load_ms')} | "
            f"{chrome.get('images')} | "
            f"{chrome.get('broken_images')} |")
    if len(result["results"]) >= 2:
        a, b = result["results"][0], result["results"][-1]
        slope = (b["report_bytes"] - a["report_bytes"]) / (b["n_frames"] - a["n_frames"])
        lines += ["", f"Size growth between {a['n_frames']} and {b['n_frames']} frames: "
                  f"{slope / 1024:.1f} KiB per added frame (x{b['n_frames'] / a['n_frames']:.1f} "
                  f"frames: x{b['report_bytes'] / a['report_bytes']:.2f} bytes, "
                  f"x{b['report_files'] / a['report_files']:.2f} files)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks report-scale")
    parser.add_argument("--n", type=int, nargs="+", default=[100, 500],
                        help="frame counts (default: 100 500)")
    parser.add_argument("--size", type=int, default=256, help="frame size in pixels")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep the frames and runs in this directory")
    args = parser.parse_args(argv)
    command = "python -m benchmarks report-scale " + " ".join(argv or sys.argv[2:])
    run_per_n("report-scale", args.n,
              lambda n, workdir: measure_one(n, args.size, workdir, args.workers),
              out_dir=args.out, keep=args.keep, command=command, markdown=_markdown,
              not_printed=("run", "report"))
    return 0
