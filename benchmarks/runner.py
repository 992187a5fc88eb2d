"""Run a suite: inputs, every contender as its own measured process, agreement, report."""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import psutil

from . import contenders as C
from . import datasets, measure, suites

GiB = 2**30


def log(msg):
    print(msg, flush=True)


def _machine() -> dict:
    vm = psutil.virtual_memory()
    versions = {}
    for mod in ("numpy", "astropy", "reproject", "ccdproc", "dask", "distributed", "zarr",
                "daskstack", "scipy"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            versions[mod] = None
    swarp = None
    if C.SWARP:
        import subprocess

        swarp = subprocess.run([C.SWARP, "-v"], capture_output=True, text=True).stdout.strip()
    return {"python": sys.version.split()[0], "platform": platform.platform(),
            "cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
            "memory_gib": vm.total / GiB, "available_gib": vm.available / GiB,
            "load_avg": os.getloadavg(), "versions": versions, "swarp": swarp}


def _summary(repeats: list[dict]) -> dict:
    ok = [r for r in repeats if r["status"] == "ok"]
    out = {"n_ok": len(ok), "n": len(repeats)}
    if not ok:
        bad = repeats[-1] if repeats else {}
        out["status"] = bad.get("status", "not run")
        out["stopped_at_rss_bytes"] = bad.get("stopped_at_rss_bytes")
        out["wall_s_at_stop"] = bad.get("wall_s")
        return out
    out["status"] = "ok"
    for key in ("wall_s", "wall_core_s", "cpu_s", "cpu_core_s", "peak_rss_bytes",
                "peak_core_rss_bytes"):
        values = [r[key] for r in ok]
        out[key] = statistics.median(values)
        out[key + "_min"], out[key + "_max"] = min(values), max(values)
    out["steps"] = {}
    for i, step in enumerate(ok[0]["steps"]):
        walls = [r["steps"][i]["wall_s"] for r in ok]
        peaks = [r["steps"][i]["peak_rss_bytes"] for r in ok]
        out["steps"][step["name"]] = {"wall_s": statistics.median(walls),
                                      "peak_rss_bytes": statistics.median(peaks)}
    return out


def run_contender(contender, dataset, run_dir: Path, repeats: int, mem_limit: int,
                  timeout: float, profile: bool = False) -> dict:
    record = {"contender": contender, "dataset": dataset.name, "n_frames": len(dataset.frames),
              "frame_shape": list(dataset.frame_shape), "repeats": []}
    for _r in range(repeats):
        shutil.rmtree(run_dir, ignore_errors=True)
        plan = C.plan(contender, dataset, run_dir)
        if plan is None:
            record["skipped"] = "SWarp is not installed (Debian package 'swarp')"
            return record
        record["note"] = plan.note
        rep = {"steps": [], "status": "ok"}
        for k, step in enumerate(plan.steps):
            cmd = step.cmd
            if profile and contender.startswith("daskstack") and shutil.which("py-spy"):
                cmd = ["py-spy", "record", "--subprocesses", "--rate", "50", "--format",
                       "speedscope", "-o", str(run_dir / f"profile-{k}.json"), "--", *cmd]
            m = measure.run_measured(cmd, cwd=run_dir, log_path=run_dir / f"step{k}.log",
                                     mem_limit_bytes=mem_limit, timeout_s=timeout)
            d = m.to_dict()
            d.update({"name": step.name, "core": step.core})
            rep["steps"].append(d)
            log(f"    {contender:<20} {step.name:<32} {m.status:<13} {m.wall_s:7.1f} s  "
                f"cpu {m.cpu_s:7.1f} s  peak {m.peak_rss_bytes / GiB:5.2f} GiB")
            if m.status != "ok":
                rep["status"] = m.status
                rep["stopped_at_rss_bytes"] = m.stopped_at_rss_bytes
                try:
                    rep["log_tail"] = Path(m.log).read_text(errors="replace")[-3000:]
                except OSError:
                    pass
                break
        steps = rep["steps"]
        core = [s for s in steps if s["core"]]
        rep["wall_s"] = sum(s["wall_s"] for s in steps)
        rep["cpu_s"] = sum(s["cpu_s"] for s in steps)
        rep["peak_rss_bytes"] = max(s["peak_rss_bytes"] for s in steps)
        rep["wall_core_s"] = sum(s["wall_s"] for s in core)
        rep["cpu_core_s"] = sum(s["cpu_s"] for s in core)
        rep["peak_core_rss_bytes"] = max((s["peak_rss_bytes"] for s in core), default=0)
        rep["stopped_at_rss_bytes"] = rep.get("stopped_at_rss_bytes")
        record["repeats"].append(rep)
        record["outputs"] = {k: str(v) for k, v in plan.outputs.items()}
        record["heavy"] = [str(p) for p in plan.heavy]
        if rep["status"] != "ok":
            break
    record["summary"] = _summary(record["repeats"])
    return record


def _agreement(dataset, records, n) -> tuple[list, list]:
    from . import compare

    outputs = {r["contender"]: {k: Path(v) for k, v in r.get("outputs", {}).items()
                                if Path(v).exists()}
               for r in records if r.get("summary", {}).get("status") == "ok"}
    reference = next((c for c in ("daskstack-2w", "daskstack-1w") if c in outputs), None)
    if reference is None:
        return [], []
    pairs = compare.agreement(outputs, n, reference)
    stars = []
    if dataset.kind == "synthetic":
        weight = compare.load_weight(outputs[reference]["mean"])
        for contender, outs in outputs.items():
            for kind, path in outs.items():
                try:
                    s = compare.star_photometry(path, dataset, weight)
                except Exception as err:  # noqa: BLE001
                    s = {"error": f"{type(err).__name__}: {err}"}
                stars.append({"coadd": f"{contender}:{kind}", **s})
    return pairs, stars


def run_suite(suite_name: str, out: Path, *, real_dir=None, only=None, sizes=None,
              repeats=None, mem_limit_gib=None, timeout=None, skip_astrometry=False,
              skip_real=False, profile=False, keep=False, ns=None) -> Path:
    suite = suites.SUITES[suite_name]
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data_root = out / "data"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    result_path = out / f"{suite_name}-{stamp}.json"
    mem_limit = int(mem_limit_gib * GiB) if mem_limit_gib else measure.default_mem_limit()
    contenders_all = [c for c in C.ALL_CONTENDERS if not only or c in only]
    results = {"suite": suite_name, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
               "machine": _machine(), "mem_limit_bytes": mem_limit,
               "swarp_config": C.SWARP_CONFIG, "runs": [], "agreement": [], "stars": [],
               "astrometry": None, "notes": []}
    if not C.SWARP:
        results["notes"].append("SWarp not installed: its rows are skipped")
    t_start = time.perf_counter()

    def save():
        results["elapsed_s"] = time.perf_counter() - t_start
        result_path.write_text(json.dumps(results, indent=1, default=str))

    def bench(dataset, n, contenders, n_repeats):
        sub = dataset.subset(n)
        log(f"== {dataset.name} N={n} ({sub.frame_shape[1]}x{sub.frame_shape[0]}), "
            f"{n_repeats} repeat(s)")
        records = []
        oom_before = {r["contender"] for r in results["runs"]
                      if r["dataset"] == dataset.name
                      and r.get("summary", {}).get("status") == "out-of-memory"}
        for contender in contenders:
            run_dir = out / "runs" / f"{dataset.name}-N{n}" / contender
            if contender in oom_before:
                rec = {"contender": contender, "dataset": dataset.name, "n_frames": n,
                       "frame_shape": list(sub.frame_shape), "repeats": [],
                       "summary": {"status": "skipped (out of memory at a smaller N)"}}
            else:
                rec = run_contender(contender, sub, run_dir, n_repeats, mem_limit, timeout,
                                    profile)
            records.append(rec)
            results["runs"].append(rec)
            save()
        t0 = time.perf_counter()
        pairs, stars = _agreement(sub, records, n)
        for p in pairs:
            p.update({"dataset": dataset.name, "n_frames": n})
        for s in stars:
            s.update({"dataset": dataset.name, "n_frames": n})
        results["agreement"] += pairs
        results["stars"] += stars
        log(f"    agreement computed in {time.perf_counter() - t0:.0f} s")
        if not keep:
            for rec in records:
                for p in rec.get("heavy", []):
                    shutil.rmtree(p, ignore_errors=True) if Path(p).is_dir() else \
                        Path(p).unlink(missing_ok=True)
        save()

    # real frames
    if not skip_real:
        try:
            ds = datasets.real(data_root, real_dir, log=log)
            bench(ds, len(ds.frames), contenders_all, repeats or suite["real"]["repeats"])
        except FileNotFoundError as err:
            results["notes"].append(f"real frames skipped: {err}")
            log(f"real frames skipped: {err}")
    # astrometry (before the synthetic sizes, so that a run stopped for time during the
    # largest N still has it)
    if not skip_astrometry:
        a = suite["astrometry"]
        astro_json = out / f"astrometry-{suite_name}-{stamp}.json"
        cmd = [sys.executable, "-m", "benchmarks.astrometry_bench", str(astro_json),
               str(data_root), str(real_dir or datasets.DEFAULT_REAL_DIR), a["real_frames"],
               a["big_frames"], a["big_size"], a["sweep_size"], a["sweep_frames"]]
        log("== astrometry (one core)")
        m = measure.run_measured(cmd, cwd=datasets.REPO, log_path=out / "astrometry.log",
                                 env=measure.single_core_env(), timeout_s=timeout)
        results["astrometry_process"] = m.to_dict()
        if astro_json.exists():
            results["astrometry"] = json.loads(astro_json.read_text())
        log(f"    astrometry {m.status} in {m.wall_s:.0f} s")
    # synthetic frames
    spec = suite["synthetic"]
    ns = ns or spec["n"]
    for size in sizes or [spec["size"]]:
        t0 = time.perf_counter()
        ds = datasets.synthetic(data_root, max(ns), size=size, log=log)
        results.setdefault("generation_s", {})[f"synth{size}"] = time.perf_counter() - t0
        for n in ns:
            cont = [c for c in suites.contenders_for(suite, n, C.ALL_CONTENDERS)
                    if c in contenders_all] or contenders_all
            bench(ds, n, cont, repeats or spec["repeats"].get(n, 1))
    save()
    from . import report

    md, png = report.write_report(result_path)
    log(f"results: {result_path}\nreport:  {md}\nplot:    {png}")
    return result_path
