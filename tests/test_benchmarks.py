"""The benchmark harness without heavy runs: its statistics, the interleaved order in which
it runs the repeats, and the markdown it renders from a result file.

``run_repeat`` (one measured repeat of one contender) is replaced by a fake that records
the order of the calls and returns drawn numbers, so the suite loop, the JSON and the
report are the real ones while nothing is reprojected.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest

from benchmarks import datasets, report, runner, stats

GiB = 2**30
CONTENDERS = ["floor", "tutorial", "swarp", "daskstack-1w", "daskstack-2w"]


@pytest.mark.parametrize("repeats", [1, 3, 5, 7])
def test_interleaved_order_rotates_every_contender_through_every_position(repeats):
    order = stats.interleaved_order(CONTENDERS, repeats)
    assert len(order) == repeats
    for round_order in order:  # every round runs every contender once
        assert sorted(round_order) == sorted(CONTENDERS)
    k = len(CONTENDERS)
    for c in CONTENDERS:
        positions = [round_order.index(c) for round_order in order]
        # k consecutive rounds put the contender at k different positions
        for start in range(0, repeats - k + 1):
            assert len(set(positions[start:start + k])) == k
        assert len(set(positions)) == min(repeats, k)
    # the same contender never runs twice in a row across a round boundary either
    flat = [c for round_order in order for c in round_order]
    assert all(a != b for a, b in zip(flat, flat[1:], strict=False))
    assert stats.interleaved_order([], 3) == []


def test_median_range_and_summary_use_only_finished_repeats():
    rng = np.random.default_rng(1)
    values = list(rng.uniform(1, 100, 5))
    spread = stats.median_range(values + [None])
    assert spread == {"median": float(np.median(values)), "min": min(values),
                      "max": max(values), "n": 5}
    assert stats.median_range([None]) is None

    reps = [_fake_repeat(v) for v in values[:3]]
    reps.insert(1, dict(_fake_repeat(1e6), status="out-of-memory"))
    s = stats.summarise(reps)
    assert (s["n_ok"], s["n"], s["status"]) == (3, 4, "ok")
    assert s["wall_core_s"] == statistics.median(values[:3])
    assert (s["wall_core_s_min"], s["wall_core_s_max"]) == (min(values[:3]), max(values[:3]))
    assert s["steps"]["only step"]["wall_s_max"] == max(values[:3])

    stopped = stats.summarise([dict(_fake_repeat(7.0), status="out-of-memory",
                                    stopped_at_rss_bytes=3 * GiB)])
    assert stopped["status"] == "out-of-memory" and stopped["stopped_at_rss_bytes"] == 3 * GiB


def test_ratios_are_taken_within_a_round_then_summarised():
    # Chosen so that the median of the per-round ratios differs from the ratio of the
    # medians: pairing by round is what is tested.
    num = [10.0, 40.0, 20.0]
    den = [20.0, 20.0, 80.0]
    rounds = [2, 0, 1]  # stored out of order: pairing must use the round, not the index
    runs = [_fake_record("daskstack-2w", [dict(_fake_repeat(v), repeat=r)
                                          for v, r in zip(num, rounds, strict=True)]),
            _fake_record("swarp", [dict(_fake_repeat(v), repeat=r)
                                   for v, r in zip(den, rounds, strict=True)])]
    (row,) = [r for r in stats.paired_ratios(runs) if r["measure"] == "wall_core_s"]
    per_round = [a / b for a, b in zip(num, den, strict=True)]
    assert row["ratio"] == "daskstack-2w / SWarp, wall"
    assert [p["repeat"] for p in row["per_repeat"]] == sorted(rounds)
    assert sorted(p["value"] for p in row["per_repeat"]) == sorted(per_round)
    assert row["median"] == statistics.median(per_round)
    assert row["median"] != statistics.median(num) / statistics.median(den)
    assert (row["min"], row["max"], row["n"]) == (min(per_round), max(per_round), 3)

    # a round in which one of the two did not finish gives no ratio
    runs[1]["repeats"][0]["status"] = "timeout"
    (row,) = [r for r in stats.paired_ratios(runs) if r["measure"] == "wall_core_s"]
    assert row["n"] == 2 and rounds[0] not in [p["repeat"] for p in row["per_repeat"]]


def test_a_baseline_revision_is_compared_round_by_round(tmp_path):
    """``--baseline REV``: the revision's package is unpacked (not checked out) and its
    runs are paired with this revision's in the same rounds."""
    source = runner.unpack_revision("HEAD", tmp_path)
    assert (source / "daskstack" / "__init__.py").exists()
    assert not (source / "tests").exists()  # the package only
    name = f"daskstack-2w@{source.name}"
    runs = [_fake_record("daskstack-2w", [dict(_fake_repeat(v), repeat=r)
                                          for r, v in enumerate([10.0, 30.0, 20.0])]),
            _fake_record(name, [dict(_fake_repeat(v), repeat=r)
                                for r, v in enumerate([20.0, 20.0, 40.0])])]
    (row,) = [r for r in stats.paired_ratios(runs) if r["measure"] == "wall_core_s"]
    assert (row["numerator"], row["denominator"]) == ("daskstack-2w", name)
    assert row["median"] == 0.5 and (row["min"], row["max"]) == (0.5, 1.5)
    from benchmarks import contenders, suites

    plan = contenders.plan(name, _FakeDataset(), tmp_path / "run", baselines=tmp_path)
    assert plan.steps[0].cmd[:2] == ["env", f"PYTHONPATH={source}"]
    spec = {"synthetic": {"contenders": {"daskstack-2w": 10}}}
    assert suites.contenders_for(spec, 5, ["daskstack-2w", name]) == ["daskstack-2w", name]
    assert suites.contenders_for(spec, 20, ["daskstack-2w", name]) == []


class _FakeDataset:
    frames = [Path("a.fits.fz"), Path("b.fits.fz")]
    grid_head = Path("grid.head")
    filter = "rp"


@pytest.fixture(scope="module")
def fake_suite(tmp_path_factory):
    """Run the real suite loop with a fake ``run_repeat`` (and no coadds to compare);
    return (result JSON, calls)."""
    rng = np.random.default_rng(7)
    calls = []

    def fake_synthetic(data_root, n_frames, size=4096, log=print, **_):
        directory = Path(data_root) / "fake"
        directory.mkdir(parents=True, exist_ok=True)
        frames = [directory / f"frame{i}.fits.fz" for i in range(n_frames)]
        return datasets.Dataset(f"synth{size}", "synthetic", frames, (size, size), "rp",
                                directory)

    def fake_run_repeat(record, dataset, run_dir, mem_limit, timeout, profile=False,
                        baselines=None):
        c, n = record["contender"], len(dataset.frames)
        calls.append((n, c))
        rep = _fake_repeat(float(rng.uniform(1, 100)), rss=int(rng.uniform(0.1, 4) * GiB))
        if c == "tutorial" and n == 3 and len(record["repeats"]) == 1:
            rep.update(status="out-of-memory", stopped_at_rss_bytes=rep["peak_rss_bytes"])
        record["repeats"].append(rep)
        record["summary"] = stats.summarise(record["repeats"])
        return rep

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets, "synthetic", fake_synthetic)
        mp.setattr(runner, "run_repeat", fake_run_repeat)
        mp.setattr(runner, "log", lambda msg: None)
        mp.setattr(runner, "_agreement", lambda dataset, records, n: ([], []))  # no coadds
        path = runner.run_suite("standard", tmp_path_factory.mktemp("results"), ns=[2, 3, 4],
                                sizes=[64], repeats=3, skip_real=True, skip_astrometry=True,
                                only=CONTENDERS, command=["run", "--suite", "standard"])
    return path, calls


def test_suite_runs_the_repeats_interleaved_and_records_them(fake_suite):
    path, calls = fake_suite
    results = json.loads(path.read_text())
    assert path.name.startswith("standard-custom-")  # overridden: says so in its name
    assert results["overrides"]["n"] == [2, 3, 4]
    assert results["command"] == "python -m benchmarks run --suite standard"
    for key in ("commit", "machine", "modified_files"):
        assert key in results
    assert results["machine"]["versions"]["numpy"] == np.__version__

    schedule = {g["n_frames"]: g["order"] for g in results["schedule"]}
    assert set(schedule) == {2, 3, 4}
    expected = []
    for n in (2, 3, 4):
        assert schedule[n] == stats.interleaved_order(schedule[n][0], 3)
        for r, round_order in enumerate(schedule[n]):
            # the fake stops the tutorial for memory in its second try at N=3
            expected += [(n, c) for c in round_order
                         if not (n, c, r) == (3, "tutorial", 2)]
    # the runs happened in exactly the scheduled order: round by round, rotated
    assert calls == expected
    # the tutorial stopped for memory in round 2 at N=3: not tried in round 3, nor at N=4
    assert ("tutorial" in schedule[3][0]) and ("tutorial" not in schedule[4][0])
    assert sum(1 for c in calls if c == (3, "tutorial")) == 2
    tut4 = next(r for r in results["runs"] if r["n_frames"] == 4 and r["contender"] == "tutorial")
    assert tut4["summary"]["status"].startswith("skipped")
    # every finished repeat knows its round and place in it
    for rec in results["runs"]:
        for rep in rec["repeats"]:
            order = schedule[rec["n_frames"]][rep["repeat"]]
            assert order[rep["position"]] == rec["contender"]
    assert results["ratios"] == stats.paired_ratios(results["runs"])


def test_report_shows_medians_ranges_memory_and_ratios(fake_suite):
    path, _ = fake_suite
    results = json.loads(path.read_text())
    md_path, png = report.write_report(path)
    md = md_path.read_text()
    assert "CUSTOM RUN" in md and results["commit"] in md
    assert "python -m benchmarks run --suite standard" in md
    perf = report.performance_table(results)
    for rec in results["runs"]:
        s = rec["summary"]
        if s["status"] != "ok":
            continue
        walls = [r["wall_core_s"] for r in rec["repeats"] if r["status"] == "ok"]
        peaks = [r["peak_core_rss_bytes"] / GiB for r in rec["repeats"] if r["status"] == "ok"]
        row = next(line for line in perf.splitlines()
                   if f"| {rec['n_frames']} | {rec['contender']} |" in line)
        assert _median_range(walls, "{:.1f}") in row
        assert _median_range(peaks, "{:.2f}") in row, "peak memory of every contender"
        assert row in md
    oom = next(line for line in perf.splitlines() if "| 3 | tutorial |" in line)
    assert "| 1/2 |" in oom and "ok, then out-of-memory" in oom
    ratios = report.ratios_table(results)
    for r in results["ratios"]:
        line = next(line for line in ratios.splitlines()
                    if f"| {r['n_frames']} | {r['ratio']} |" in line)
        assert _median_range([p["value"] for p in r["per_repeat"]], "{:.2f}") in line
        assert ", ".join(f"{p['value']:.2f}" for p in r["per_repeat"]) in line
    assert any(r["ratio"].startswith("tutorial / daskstack-2w") for r in results["ratios"])
    assert png is not None and png.stat().st_size < 200_000  # small enough to commit


def _median_range(values, fmt):
    median = fmt.format(statistics.median(values))
    if len(values) == 1:
        return f"| {median} |"
    return f"{median} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def _fake_repeat(wall: float, rss: int = GiB) -> dict:
    step = {"name": "only step", "core": True, "wall_s": wall, "cpu_s": 1.5 * wall,
            "peak_rss_bytes": rss, "peak_process_rss_bytes": rss // 2, "status": "ok"}
    return {"status": "ok", "steps": [step], "wall_s": wall, "wall_core_s": wall,
            "cpu_s": 1.5 * wall, "cpu_core_s": 1.5 * wall, "peak_rss_bytes": rss,
            "peak_core_rss_bytes": rss, "peak_process_rss_bytes": rss // 2,
            "stopped_at_rss_bytes": None}


def _fake_record(contender: str, repeats: list[dict], n: int = 5) -> dict:
    return {"contender": contender, "dataset": "synth4096", "n_frames": n,
            "frame_shape": [4096, 4096], "repeats": repeats}


def test_report_scale_reads_the_run_timings():
    """report-scale takes the report's time from the run's own `time:` line."""
    from benchmarks.report_scale import _run_timings

    log = ("store: ~12 MiB for 500 frames\nframes: 500  solved: 500  in the coadd: 500  "
           "failed: 0\ntime: inspect 3.8s  solve 2.4s  register 10.1s  combine 2.9s  "
           "report 10.4s\ncoadd [rp]: /x/coadd_rp.fits\n")
    assert _run_timings(log) == {"inspect": 3.8, "solve": 2.4, "register": 10.1,
                                 "combine": 2.9, "report": 10.4}


def test_scale_benchmark_measures_every_n_interleaved_with_submission_times(tmp_path):
    """`python -m benchmarks scale` end to end on a few tiny frames: every N run in every
    round (rotated), the run's own log gives the phase times and how long the inspect and
    register tasks took to reach the scheduler, and the report judges the criteria."""
    import json

    from benchmarks import scale

    assert scale.main(["--n", "2", "4", "--shape", "96", "144", "--repeats", "2",
                       "--out", str(tmp_path)]) == 0
    result = json.loads(next(tmp_path.glob("scale-*.json")).read_text())
    assert result["order"] == [[2, 4], [4, 2]]
    assert [(r["n_frames"], r["repeat"]) for r in result["runs"]] == [(2, 0), (4, 0), (4, 1),
                                                                      (2, 1)]
    for run in result["runs"]:
        assert run["status"] == "ok"
        assert set(run["submitted_s"]) == {"inspect", "register"}
        assert run["phases_s"]["register"] > 0
        assert run["peak_process_rss_bytes"] > 0
    by_n = {s["n_frames"]: s for s in result["summaries"]}
    assert by_n[4]["repeats"] == 2 and by_n[4]["wall_s"]["n"] == 2
    assert by_n[4]["wall_per_frame_s"]["median"] == pytest.approx(by_n[4]["wall_s"]["median"] / 4)
    text = next(tmp_path.glob("scale-*.md")).read_text()
    assert "wall time per added frame, N=2 to 4" in text
    assert "slowest submission of a phase's tasks" in text
