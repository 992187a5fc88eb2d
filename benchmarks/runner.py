"""Run a suite: inputs, every contender as its own measured process, agreement, report."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import psutil

from . import contenders as C
from . import datasets, measure, stats, suites

GiB = 2**30


def log(msg):
    print(msg, flush=True)


def _machine() -> dict:
    vm = psutil.virtual_memory()
    versions = {}
    for mod in ("numpy", "astropy", "reproject", "ccdproc", "dask", "distributed", "zarr",
                "daskstack", "scipy", "psutil"):
        try:  # the installed distribution's version, without importing it
            versions[mod] = metadata.version(mod)
        except metadata.PackageNotFoundError:
            try:
                versions[mod] = __import__(mod).__version__
            except Exception:  # noqa: BLE001
                versions[mod] = None
    swarp = None
    if C.SWARP:
        swarp = subprocess.run([C.SWARP, "-v"], capture_output=True, text=True).stdout.strip()
    return {"python": sys.version.split()[0], "platform": platform.platform(),
            "cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
            "memory_gib": vm.total / GiB, "available_gib": vm.available / GiB,
            "load_avg": os.getloadavg(), "versions": versions, "swarp": swarp}


def _provenance(command: str) -> dict:
    """The command that made the file and the commit it ran (with any uncommitted change
    to tracked files listed: a result from a modified tree says so)."""

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=datasets.REPO, capture_output=True,
                                  text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    modified = git("diff", "--name-only", "HEAD")
    return {"command": command,
            "commit": git("rev-parse", "HEAD"),
            "modified_files": modified.splitlines() if modified else [],
            "branch": git("rev-parse", "--abbrev-ref", "HEAD")}


def provenance_lines(result: dict, versions=("dask", "daskstack")) -> list[str]:
    """The markdown lines that say how a result was made: the command and commit (files
    modified beside it), the machine, its load when the benchmark started, versions."""
    p, m = result["provenance"], result["machine"]
    return [f"Command: `{p['command']}`; commit `{p['commit']}` (branch {p['branch']}"
            + (f", modified: {', '.join(p['modified_files'])}" if p["modified_files"] else "")
            + ").",
            f"Machine: {m['cpus']} CPUs ({m['affinity']} usable), {m['memory_gib']:.1f} GiB; "
            f"load average {', '.join(f'{v:.1f}' for v in m['load_avg'])} at the start; "
            f"Python {m['python']}, "
            + ", ".join(f"{name} {m['versions'].get(name)}" for name in versions) + "."]


def run_per_n(benchmark: str, ns, measure_n, *, out_dir: Path, keep: Path | None,
              command: str, markdown, not_printed=()) -> Path:
    """``measure_n(n, workdir)`` for each frame count ``n`` in a scratch directory (kept in
    ``keep`` when given); writes ``out_dir/<benchmark>-<date>.json`` (the results, the
    machine, the command and commit) and ``.md`` (``markdown(result)``), prints the
    markdown and returns its path."""
    import datetime
    import tempfile

    machine = _machine()
    workdir = keep or Path(tempfile.mkdtemp(prefix=f"{benchmark}-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        results = []
        for n in ns:
            log(f"{benchmark}: {n} frames ...")
            results.append(measure_n(n, workdir))
            log(json.dumps({k: v for k, v in results[-1].items() if k not in not_printed},
                           default=str))
    finally:
        if keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    result = {"benchmark": benchmark, "date": date, "machine": machine,
              "provenance": _provenance(command), "results": results}
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{benchmark}-{date}.json"
    json_path.write_text(json.dumps(result, indent=1, default=str))
    md_path = json_path.with_suffix(".md")
    md_path.write_text(markdown(result))
    print(md_path.read_text())
    return md_path


def new_record(contender, dataset) -> dict:
    return {"contender": contender, "dataset": dataset.name, "n_frames": len(dataset.frames),
            "frame_shape": list(dataset.frame_shape), "repeats": []}


def unpack_revision(revision: str, directory: Path) -> Path:
    """The package ``daskstack/`` of git ``revision`` unpacked (``git archive``) under
    ``directory``/<short hash>, to run beside the working tree (``--baseline``)."""
    sha = subprocess.run(["git", "rev-parse", "--short=10", f"{revision}^{{commit}}"],
                         cwd=datasets.REPO, capture_output=True, text=True, check=True
                         ).stdout.strip()
    target = Path(directory) / sha
    if not (target / "daskstack" / "__init__.py").exists():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", "--format=tar", sha, "daskstack"],
                                 cwd=datasets.REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def compile_bytecode(package: Path) -> None:
    """Byte-compile ``package`` as ``pip install`` does: an editable install or an
    unpacked revision has no ``.pyc`` files, and where ``PYTHONDONTWRITEBYTECODE`` is set
    (this machine sets it) every process of every run would compile the package's
    sources again in the client and in every worker, a cost no installed copy pays. Python reads the files whatever that variable says."""
    import compileall

    compileall.compile_dir(str(package), quiet=1, force=False)


def run_repeat(record: dict, dataset, run_dir: Path, mem_limit: int, timeout: float,
               profile: bool = False, baselines: Path | None = None) -> dict | None:
    """One repeat of ``record``'s contender on ``dataset``, appended to the record (with
    the record's outputs: those of its latest repeat); None when it cannot run here."""
    contender = record["contender"]
    shutil.rmtree(run_dir, ignore_errors=True)
    plan = C.plan(contender, dataset, run_dir, baselines)
    if plan is None:
        record["skipped"] = "SWarp is not installed (Debian package 'swarp')"
        return None
    record["note"] = plan.note
    rep = {"steps": [], "status": "ok", "load_avg": os.getloadavg()}
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
    rep["peak_process_rss_bytes"] = max(s["peak_process_rss_bytes"] for s in steps)
    rep["wall_core_s"] = sum(s["wall_s"] for s in core)
    rep["cpu_core_s"] = sum(s["cpu_s"] for s in core)
    rep["peak_core_rss_bytes"] = max((s["peak_rss_bytes"] for s in core), default=0)
    rep["stopped_at_rss_bytes"] = rep.get("stopped_at_rss_bytes")
    record["repeats"].append(rep)
    record["outputs"] = {k: str(v) for k, v in plan.outputs.items()}
    record["heavy"] = [str(p) for p in plan.heavy]
    record["summary"] = stats.summarise(record["repeats"])
    return rep


def _agreement(dataset, records, n) -> tuple[list, list]:
    from . import compare

    # the outputs on disk are those of each contender's last try: compare only finished ones
    outputs = {r["contender"]: {k: Path(v) for k, v in r.get("outputs", {}).items()
                                if Path(v).exists()}
               for r in records if r["repeats"] and r["repeats"][-1]["status"] == "ok"}
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
              skip_real=False, profile=False, keep=False, ns=None,
              command=None, baseline=None) -> Path:
    """Run ``suite_name`` and write ``<suite>-<UTC time>.json`` (+ .md, .png) into ``out``;
    ``command`` is the argument list of ``python -m benchmarks`` that asked for it."""
    suite = suites.SUITES[suite_name]
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data_root = out / "data"
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    overrides = {k: v for k, v in {"only": only, "n": ns, "size": sizes, "repeats": repeats,
                                   "skip_real": skip_real, "skip_astrometry": skip_astrometry,
                                   "profile": profile,
                                   "real_dir": str(real_dir) if real_dir else None}.items() if v}
    # A run that is not the suite as defined says so in its name (and its report).
    kind = "custom-" if overrides else ""
    result_path = out / f"{suite_name}-{kind}{stamp}.json"
    mem_limit = int(mem_limit_gib * GiB) if mem_limit_gib else measure.default_mem_limit()
    contenders_all = [c for c in C.ALL_CONTENDERS if not only or c in only]
    baselines = data_root / "baselines"
    compile_bytecode(Path(datasets.REPO) / "daskstack")
    if baseline:  # another revision beside this one, interleaved: a change's before/after
        source = unpack_revision(baseline, baselines)
        compile_bytecode(source / "daskstack")
        contenders_all.insert(contenders_all.index("daskstack-2w") + 1
                              if "daskstack-2w" in contenders_all else len(contenders_all),
                              C.baseline_contender(source))
    results = {"suite": suite_name,
               "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
               "overrides": overrides,
               **_provenance("python -m benchmarks " + " ".join(map(str, command))
                             if command is not None
                             else f"benchmarks.runner.run_suite({suite_name!r}) from Python"),
               "machine": _machine(), "mem_limit_bytes": mem_limit,
               "baseline": baseline,  # the suite as defined, plus this revision beside it
               "swarp_config": C.SWARP_CONFIG, "schedule": [], "runs": [], "ratios": [],
               "agreement": [], "stars": [], "astrometry": None, "notes": []}
    if not C.SWARP:
        results["notes"].append("SWarp not installed: its rows are skipped")
    t_start = time.perf_counter()

    def save():
        results["elapsed_s"] = time.perf_counter() - t_start
        results["ratios"] = stats.paired_ratios(results["runs"])
        result_path.write_text(json.dumps(results, indent=1, default=str))

    def bench(dataset, n, contenders, n_repeats):
        """Every contender at one data size, the repeats interleaved (stats.interleaved_order):
        round r of every contender runs before round r+1 of any."""
        sub = dataset.subset(n)
        log(f"== {dataset.name} N={n} ({sub.frame_shape[1]}x{sub.frame_shape[0]}), "
            f"{n_repeats} interleaved repeat(s)")
        oom_before = {r["contender"] for r in results["runs"]
                      if r["dataset"] == dataset.name
                      and any(rep["status"] == "out-of-memory" for rep in r["repeats"])}
        records = {}
        for contender in contenders:
            records[contender] = new_record(contender, sub)
            if contender in oom_before:
                records[contender]["summary"] = {
                    "status": "skipped (out of memory at a smaller N)"}
            results["runs"].append(records[contender])
        order = stats.interleaved_order([c for c in contenders if c not in oom_before],
                                        n_repeats)
        results["schedule"].append({"dataset": dataset.name, "n_frames": n, "order": order})
        stopped = set()  # not tried again once skipped, failed or stopped for memory/time
        for r, round_order in enumerate(order):
            log(f"  round {r + 1}/{len(order)}: {', '.join(round_order)}")
            for position, contender in enumerate(round_order):
                if contender in stopped:
                    continue
                run_dir = out / "runs" / f"{dataset.name}-N{n}" / contender
                started = time.perf_counter() - t_start
                rep = run_repeat(records[contender], sub, run_dir, mem_limit, timeout, profile,
                                 baselines)
                if rep is None or rep["status"] != "ok":
                    stopped.add(contender)
                if rep is not None:
                    rep.update({"repeat": r, "position": position, "started_s": started})
                save()
        t0 = time.perf_counter()
        pairs, stars = _agreement(sub, list(records.values()), n)
        for p in pairs:
            p.update({"dataset": dataset.name, "n_frames": n})
        for s in stars:
            s.update({"dataset": dataset.name, "n_frames": n})
        results["agreement"] += pairs
        results["stars"] += stars
        log(f"    agreement computed in {time.perf_counter() - t0:.0f} s")
        if not keep:
            for rec in records.values():
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
    if not skip_astrometry and suite["astrometry"]:
        a = suite["astrometry"]
        # raw rows, merged into the results file (kept out of the committed top level)
        astro_json = out / "runs" / f"astrometry-{suite_name}-{stamp}.json"
        astro_json.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "benchmarks.astrometry_bench", str(astro_json),
               str(data_root), str(real_dir or datasets.DEFAULT_REAL_DIR), a["real_frames"],
               a["big_frames"], a["big_size"], a["sweep_size"], a["sweep_frames"]]
        log("== astrometry (one core)")
        m = measure.run_measured(cmd, cwd=datasets.REPO,
                                 log_path=out / "runs" / "astrometry.log",
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
            cont = [c for c in suites.contenders_for(suite, n, contenders_all)] \
                or contenders_all
            bench(ds, n, cont, repeats or spec["repeats"])
    save()
    from . import report

    md, png = report.write_report(result_path)
    log(f"results: {result_path}\nreport:  {md}\nplot:    {png}")
    return result_path
