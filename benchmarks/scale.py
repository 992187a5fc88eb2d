"""``python -m benchmarks scale``: a run of many small frames, end to end (issue 18).

    python -m benchmarks scale --n 100 300 1000 --shape 1020 1523 --repeats 3

N synthetic frames of the LCO 0.4 m camera's size (1523 x 1020 by default; one filter,
dithered by up to 20", cosmic rays, hot pixels and bad columns, an exact header WCS) are
registered and co-added end to end by ``daskstack run FRAMES --wcs header --combine
mean,median --workers W -v`` (no catalog: registration and combination only, as a
campaign re-run with its solved WCSs is). One dataset is simulated for the largest N
(cached under ``results/data/``); the N-frame runs use its first N frames.

Every run is a measured process (`measure.run_measured`: wall and CPU time of the
process tree, peak RSS of the tree and of its largest process, i.e. one worker or the
client). From its log: the phase times (the ``time:`` line) and how long each phase took
to hand its tasks to the scheduler (``inspect: N tasks submitted in X s``, the same for
``register``: the graph submitted). The repeats are interleaved: each round runs every N
once, the order of the N rotated by one place from round to round.

Judged: time per frame at each N (proportional to N when it is flat), the largest
process's memory (flat when it does not grow with N) and the submission times. Writes
``results/scale-<date>.json`` (every raw figure, machine, versions, commit, command) and
``.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

from . import datasets, measure, stats
from .runner import _machine, _provenance, provenance_lines

RESULTS = Path(__file__).resolve().parent / "results"
GiB = 2**30


def _submitted(log_text: str) -> dict[str, float]:
    """``{phase: seconds}`` from the run's ``<phase>: N tasks submitted in X s`` lines."""
    return {phase: float(seconds) for phase, seconds in
            re.findall(r"(\w+): \d+ tasks submitted in ([\d.]+) s", log_text)}


def _timings(log_text: str) -> dict[str, float]:
    """The phase timings the run printed (``time: inspect 1.2s  solve 0.0s ...``)."""
    line = next(line for line in log_text.splitlines() if line.startswith("time: "))
    return {k: float(v) for k, v in re.findall(r"(\S+) ([\d.]+)s", line)}


def measure_run(frames, workdir: Path, n: int, repeat: int, workers: int) -> dict:
    """One measured ``daskstack run`` of ``frames``; its figures and the log's."""
    out = workdir / f"run-{n}-{repeat}"
    cmd = [sys.executable, "-m", "daskstack.cli", "run", *map(str, frames), "--wcs", "header",
           "--combine", "mean,median", "--workers", str(workers), "--out", str(out),
           "--overwrite", "-v"]
    m = measure.run_measured(cmd, log_path=workdir / f"run-{n}-{repeat}.log").to_dict()
    text = Path(m["log"]).read_text()
    if m["status"] != "ok":
        raise RuntimeError(f"run of {n} frames: {m['status']} (exit {m['returncode']}): "
                           f"{text[-2000:]}")
    shutil.rmtree(out, ignore_errors=True)  # 1,000 frames' store: not kept between runs
    m.pop("cmd", None)  # N file names: the command is recorded once, in the summary
    m.pop("timeline", None)
    return {"n_frames": n, "repeat": repeat, **m, "phases_s": _timings(text),
            "submitted_s": _submitted(text)}


def _spread(values) -> dict:
    return stats.median_range(values) or {}


def summarise(runs: list[dict], n: int) -> dict:
    mine = [r for r in runs if r["n_frames"] == n]
    phases = sorted({p for r in mine for p in r["phases_s"]})
    return {
        "n_frames": n, "repeats": len(mine),
        "wall_s": _spread([r["wall_s"] for r in mine]),
        "cpu_s": _spread([r["cpu_s"] for r in mine]),
        "wall_per_frame_s": _spread([r["wall_s"] / n for r in mine]),
        "cpu_per_frame_s": _spread([r["cpu_s"] / n for r in mine]),
        "largest_process_gib": _spread([r["peak_process_rss_bytes"] / GiB for r in mine]),
        "tree_gib": _spread([r["peak_rss_bytes"] / GiB for r in mine]),
        "phase_per_frame_s": {p: _spread([r["phases_s"].get(p, 0.0) / n for r in mine])
                              for p in phases},
        "submitted_s": {p: _spread([r["submitted_s"].get(p) for r in mine])
                        for p in ("inspect", "register")},
    }


def _fmt(s: dict, scale: float = 1.0, digits: int = 2) -> str:
    if not s:
        return "-"
    return (f"{s['median'] * scale:.{digits}f} [{s['min'] * scale:.{digits}f}-"
            f"{s['max'] * scale:.{digits}f}]")


def checks(summaries: list[dict], submit_limit_s: float = 5.0) -> list[str]:
    """The issue's criteria on this run: time proportional to N (time per frame at the
    largest N against the smallest), memory flat, the graph submitted in time."""
    if len(summaries) < 2:
        return []
    a, b = summaries[0], summaries[-1]
    lines = []
    ratio = b["wall_per_frame_s"]["median"] / a["wall_per_frame_s"]["median"]
    lines.append(f"- wall time per frame, N={b['n_frames']} / N={a['n_frames']}: {ratio:.2f} "
                 f"(1 = time proportional to N)")
    for lo, hi in zip(summaries, summaries[1:], strict=False):
        # the cost of each added frame: the run's fixed start (cluster, imports) drops out
        slope = ((hi["wall_s"]["median"] - lo["wall_s"]["median"])
                 / (hi["n_frames"] - lo["n_frames"]))
        lines.append(f"- wall time per added frame, N={lo['n_frames']} to {hi['n_frames']}: "
                     f"{slope:.3f} s")
    ratio = b["cpu_per_frame_s"]["median"] / a["cpu_per_frame_s"]["median"]
    lines.append(f"- CPU time per frame, N={b['n_frames']} / N={a['n_frames']}: {ratio:.2f}")
    peak = [s["largest_process_gib"]["max"] for s in summaries]
    lines.append("- largest process, highest over the repeats: "
                 + ", ".join(f"N={s['n_frames']}: {p:.2f} GiB" for s, p in zip(summaries, peak, strict=True))
                 + f" (N={b['n_frames']} / N={a['n_frames']}: {peak[-1] / peak[0]:.2f})")
    worst = max((s["submitted_s"][p]["max"] for s in summaries for p in s["submitted_s"]
                 if s["submitted_s"][p]), default=None)
    if worst is not None:
        lines.append(f"- slowest submission of a phase's tasks: {worst:.2f} s (target < "
                     f"{submit_limit_s:g} s: {'met' if worst < submit_limit_s else 'MISSED'})")
    return lines


def markdown(result: dict) -> str:
    lines = [f"# Many small frames end to end ({result['date']})", "",
             *provenance_lines(result), "",
             f"Frames: {result['frame_shape'][1]}x{result['frame_shape'][0]} synthetic, "
             f"one filter, exact header WCS. Each run: `{result['run_command']}` "
             f"(`--workers {result['workers']}`), a measured process; "
             f"{result['repeats']} interleaved repeats (order: "
             + "; ".join(" ".join(map(str, order)) for order in result["order"]) + ").", "",
             "Median [min-max] over the repeats. 'submitted': from the start of a phase's "
             "submission to the scheduler holding every task of it (the run's log).", "",
             "| N | wall s | CPU s | wall s / frame | CPU s / frame | largest process GiB | "
             "tree GiB | register s / frame | combine s / frame | inspect submitted s | "
             "register submitted s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in result["summaries"]:
        per = s["phase_per_frame_s"]
        lines.append(
            f"| {s['n_frames']} | {_fmt(s['wall_s'], digits=1)} | {_fmt(s['cpu_s'], digits=1)} "
            f"| {_fmt(s['wall_per_frame_s'], digits=3)} | {_fmt(s['cpu_per_frame_s'], digits=3)} "
            f"| {_fmt(s['largest_process_gib'])} | {_fmt(s['tree_gib'])} | "
            f"{_fmt(per.get('register', {}), digits=3)} | {_fmt(per.get('combine', {}), digits=3)}"
            f" | {_fmt(s['submitted_s']['inspect'])} | {_fmt(s['submitted_s']['register'])} |")
    lines += ["", "## Checks", "", *checks(result["summaries"]), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks scale")
    parser.add_argument("--n", type=int, nargs="+", default=[100, 300, 1000],
                        help="frame counts (default: 100 300 1000)")
    parser.add_argument("--shape", type=int, nargs=2, default=[1020, 1523],
                        metavar=("NY", "NX"), help="frame shape (default: 1020 1523)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep the logs in this directory")
    args = parser.parse_args(argv)
    command = "python -m benchmarks scale " + " ".join(argv or sys.argv[2:])
    ns = sorted(args.n)
    machine = _machine()  # the load average before anything runs
    data = datasets.synthetic(args.out / "data", max(ns), shape=tuple(args.shape))
    # the interleaved schedule: every N once per round, the order rotated each round
    order = [list(map(int, o)) for o in stats.interleaved_order(ns, args.repeats)]
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    runs: list[dict] = []
    try:
        for repeat, round_order in enumerate(order):
            for n in round_order:
                runs.append(measure_run(data.frames[:n], workdir, n, repeat, args.workers))
                print(f"  N={n} repeat {repeat}: {runs[-1]['wall_s']:.1f} s wall, "
                      f"{runs[-1]['peak_process_rss_bytes'] / GiB:.2f} GiB", flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    result = {"benchmark": "scale", "date": date, "machine": machine,
              "provenance": _provenance(command), "frame_shape": list(args.shape),
              "workers": args.workers, "repeats": args.repeats, "order": order,
              "run_command": "daskstack run FRAMES --wcs header --combine mean,median "
                             "--workers W --out RUN --overwrite -v",
              "summaries": [summarise(runs, n) for n in ns], "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"scale-{date}.json"
    json_path.write_text(json.dumps(result, indent=1, default=str))
    json_path.with_suffix(".md").write_text(markdown(result))
    print(json_path.with_suffix(".md").read_text())
    return 0
