"""The statistics of a suite: the interleaved order of the repeats, medians with their
range, and ratios taken within each round of the interleaving.

Pure functions on the result JSON's records (no processes, no files), so that the runner
and the report use one implementation and the tests can check it on fake records.
"""

from __future__ import annotations

import statistics

# What a repeat measures (sums over its steps; "core" = the steps making mean + median).
MEASURES = ("wall_s", "wall_core_s", "cpu_s", "cpu_core_s", "peak_rss_bytes",
            "peak_core_rss_bytes", "peak_process_rss_bytes")

# The ratios the report quotes: (label, numerator, denominator, measure). Each is taken
# between the two contenders' runs of the same round, then summarised over the rounds.
RATIOS = (
    ("daskstack-2w / SWarp, wall", "daskstack-2w", "swarp", "wall_core_s"),
    ("daskstack-2w / SWarp, CPU", "daskstack-2w", "swarp", "cpu_core_s"),
    ("daskstack-1w / SWarp, wall", "daskstack-1w", "swarp", "wall_core_s"),
    ("daskstack-1w / SWarp, CPU", "daskstack-1w", "swarp", "cpu_core_s"),
    ("tutorial / daskstack-2w, wall (speed-up)", "tutorial", "daskstack-2w", "wall_core_s"),
    ("tutorial / daskstack-1w, wall (speed-up)", "tutorial", "daskstack-1w", "wall_core_s"),
    ("daskstack-1w / daskstack-2w, wall (speed-up of 2 workers)", "daskstack-1w",
     "daskstack-2w", "wall_core_s"),
    ("daskstack-2w / floor, wall", "daskstack-2w", "floor", "wall_core_s"),
)


def interleaved_order(contenders, repeats: int) -> list[list[str]]:
    """The order of the runs at one data size: round r runs every contender once before
    round r+1 starts, its order rotated by r places. Each contender thus takes each
    position in turn, and a change in the machine's load (or a cache warmed by the run
    before) falls on all contenders alike instead of on whichever happens to run last."""
    contenders = list(contenders)
    k = len(contenders)
    if not k:
        return []
    return [contenders[r % k:] + contenders[:r % k] for r in range(repeats)]


def median_range(values) -> dict | None:
    """Median, minimum, maximum and count of ``values`` (None when there are none)."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def summarise(repeats: list[dict]) -> dict:
    """Median [min-max] of each measure over the repeats that finished ("ok"); for a
    contender that never finished, the status and memory at which the last try stopped."""
    ok = [r for r in repeats if r["status"] == "ok"]
    out = {"n_ok": len(ok), "n": len(repeats)}
    if not ok:
        bad = repeats[-1] if repeats else {}
        out["status"] = bad.get("status", "not run")
        out["stopped_at_rss_bytes"] = bad.get("stopped_at_rss_bytes")
        out["wall_s_at_stop"] = bad.get("wall_s")
        return out
    out["status"] = "ok"
    for key in MEASURES:
        spread = median_range(r.get(key) for r in ok)
        if spread:
            out[key] = spread["median"]
            out[key + "_min"], out[key + "_max"] = spread["min"], spread["max"]
    out["steps"] = {}
    for i, step in enumerate(ok[0]["steps"]):
        walls = median_range(r["steps"][i]["wall_s"] for r in ok)
        peaks = median_range(r["steps"][i]["peak_rss_bytes"] for r in ok)
        out["steps"][step["name"]] = {"wall_s": walls["median"],
                                      "wall_s_min": walls["min"], "wall_s_max": walls["max"],
                                      "peak_rss_bytes": peaks["median"]}
    return out


def _by_round(record: dict) -> dict[int, dict]:
    """The finished repeats of a record by round (older files have no "repeat" key: their
    repeats ran in order, so the index is the round)."""
    return {rep.get("repeat", i): rep for i, rep in enumerate(record.get("repeats", []))
            if rep.get("status") == "ok"}


def ratios_for(runs: list[dict]) -> tuple:
    """`RATIOS`, plus this revision against each other revision run beside it
    (``daskstack-2w@<rev>``, ``--baseline``): the before/after of a change, per round."""
    extra = []
    for name in sorted({rec["contender"] for rec in runs if "@" in rec["contender"]}):
        current = name.partition("@")[0]
        extra += [(f"{current} / {name}, wall", current, name, "wall_core_s"),
                  (f"{current} / {name}, CPU", current, name, "cpu_core_s")]
    return RATIOS + tuple(extra)


def paired_ratios(runs: list[dict], ratios=None) -> list[dict]:
    """For each data size, each ratio of ``ratios`` (default `ratios_for` the runs) whose
    two contenders both finished in some round: the ratio in every such round, and its
    median [min-max] over them."""
    ratios = ratios_for(runs) if ratios is None else ratios
    groups: dict[tuple, dict] = {}
    for rec in runs:
        groups.setdefault((rec["dataset"], rec["n_frames"]), {})[rec["contender"]] = rec
    out = []
    for (dataset, n), by in groups.items():
        for label, num, den, key in ratios:
            if num not in by or den not in by:
                continue
            a, b = _by_round(by[num]), _by_round(by[den])
            rounds = sorted(set(a) & set(b))
            per_round = [{"repeat": r, "value": a[r][key] / b[r][key]} for r in rounds
                         if b[r].get(key)]
            spread = median_range(p["value"] for p in per_round)
            if spread:
                out.append({"dataset": dataset, "n_frames": n, "ratio": label,
                            "numerator": num, "denominator": den, "measure": key,
                            "per_repeat": per_round, **spread})
    return out
