#!/usr/bin/env python3
"""How big the Dask graph of a run is, and how long it takes to build and start, for
1,000 frames of 4096x4096 -- from synthetic headers, with no pixels anywhere.

Every phase is submitted the way `daskstack._pipeline` submits it (same task functions,
same arguments) to a scheduler that has no workers, so nothing runs: we measure what
the client builds and ships, not the work.

    inspect   one task per frame: (path)
    solve     one task per frame: (FrameMeta, catalog future, Settings)
    grid      the client's reduction: the output grid from 1,000 solved WCSs
    register  one task per frame: (FrameMeta, WCS text, Grid, store path, filter, index,
              Settings)
    combine   the lazy dask-array graph over the zarr store: per output chunk, read the
              frames' chunks, scale, reject, combine, store

For each phase: tasks, build time (submit until the scheduler holds every task),
serialized size (pickle, as distributed ships task arguments) in total and for the
largest task. A 4096x4096 float32 frame is 64 MiB: the largest task must be a tiny
fraction of that. Results are printed and written to
``benchmarks/results/graph_build.json``.

    python benchmarks/graph_build.py [--frames 1000] [--size 4096] [--filters rp,gp]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def synthetic_metas(n_frames: int, size: int, filters: list[str]):
    """``n_frames`` FrameMeta records of LCO-like 1-m frames, dithered around one field."""
    from astropy.wcs import WCS

    from daskstack.frames import FrameMeta

    rng = np.random.default_rng(1)
    scale = 0.389 / 3600.0
    metas = []
    for i in range(n_frames):
        wcs = WCS(naxis=2)
        wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        ra, dec = 150.1 + rng.normal(0, 20 / 3600), 2.2 + rng.normal(0, 20 / 3600)
        wcs.wcs.crval = [ra, dec]
        wcs.wcs.crpix = [(size + 1) / 2, (size + 1) / 2]
        wcs.wcs.cd = [[-scale, 0], [0, scale]]
        name = f"lsc1m009-fa15-20230702-{i + 1:04d}-e91"
        metas.append(FrameMeta(
            path=f"/data/lco/{name}.fits.fz", name=name, shape=(size, size),
            filter=filters[i % len(filters)], exptime=120.0,
            date_obs="2023-07-02T03:00:00.000", mjd=60127.125 + i * 0.002, gain=1.0,
            rdnoise=7.0, saturate=120000.0, pixscale=0.389, ra=ra, dec=dec, site="lsc",
            telescope="1m0-09", instrument="fa15", wcs_header=wcs.to_header().tostring()))
    return metas


def _task_bytes(func, args, kwargs=None) -> int:
    from distributed.protocol import pickle

    return len(pickle.dumps((func, args, kwargs or {})))


def _submit_phase(client, scheduler, calls, **submit_kwargs) -> dict:
    """Submit ``calls`` [(func, args)], wait until the scheduler holds them all."""
    before = len(scheduler.tasks)
    start = time.perf_counter()
    futures = [client.submit(func, *args, pure=False, **submit_kwargs) for func, args in calls]
    submitted = time.perf_counter() - start
    deadline = time.monotonic() + 600
    while len(scheduler.tasks) < before + len(futures) and time.monotonic() < deadline:
        time.sleep(0.005)
    started = time.perf_counter() - start
    sizes = [_task_bytes(func, args) for func, args in calls]
    return {"tasks": len(futures), "submit_s": round(submitted, 3),
            "build_and_start_s": round(started, 3), "bytes_total": int(sum(sizes)),
            "bytes_max_task": int(max(sizes)), "futures": futures}


def _placeholder_catalog():  # never runs: no workers
    raise RuntimeError("not meant to run")


def build_combine(store_path: Path, grid, metas, settings) -> dict:
    import dask
    import dask.array as da

    from daskstack import combine
    from daskstack import store as store_mod
    from daskstack.combine import _combine_tile

    filters: dict[str, list[str]] = {}
    for m in metas:
        filters.setdefault(m.filter, []).append(m.name)
    frames = {m.name: store_mod.FrameInfo(exptime=m.exptime, background=100.0, flux_ratio=1.0,
                                          gain=m.gain, rdnoise=m.rdnoise) for m in metas}
    start = time.perf_counter()
    stack = store_mod.create_store(store_path, grid, frames, filters,
                                   tile=settings.register.tile)  # metadata only: no chunks
    store_s = time.perf_counter() - start
    cs = settings.combine
    start = time.perf_counter()
    graphs, blocks = [], {}
    for filter_name, names in stack.filters.items():
        # as pipeline._combine_store: each task reads a whole (frames, block, block) slab
        data_arr, foot_arr = stack.arrays(filter_name)
        block = _combine_tile(stack.tile, len(names), stack.grid.shape)
        blocks[filter_name] = block
        data = da.from_zarr(data_arr, chunks=(data_arr.shape[0], block, block))
        foot = (None if foot_arr is None else
                da.from_zarr(foot_arr, chunks=(foot_arr.shape[0], block, block)))
        scales = combine.frame_scales(cs.scale, exptime=np.full(len(names), 120.0),
                                      sky=np.full(len(names), 100.0),
                                      subtract_background=cs.subtract_background,
                                      n_frames=len(names))
        for method in getattr(cs, "methods", None) or [cs.method]:
            result = combine.combine_stack(
                data, foot, method=method, sigma=cs.sigma, iters=cs.iters,
                cenfunc=cs.cenfunc, nlow=cs.nlow, nhigh=cs.nhigh, scales=scales.scales,
                offsets=scales.offsets)
            graphs += [result.image.astype("float32"), result.weight.astype("float32")]
    stored = da.store(graphs, _sinks(graphs), lock=False, compute=False)
    stored = list(stored) if isinstance(stored, (list, tuple)) else [stored]
    # optimized, as `Client.compute` would ship it to the scheduler
    graph = dict(dask.base.collections_to_expr(stored).optimize().__dask_graph__())
    build_s = time.perf_counter() - start
    from distributed.protocol import pickle

    start = time.perf_counter()
    size = len(pickle.dumps(graph))
    pickle_s = time.perf_counter() - start
    return {"tasks": len(graph), "store_metadata_s": round(store_s, 3),
            "build_s": round(build_s, 3), "pickle_s": round(pickle_s, 3),
            "bytes_total": size, "block": blocks,
            "output_chunks": sum(int(np.prod(g.numblocks)) for g in graphs[::2])}


class _Sink:
    """A write target that only records the shape (``da.store`` needs ``__setitem__``)."""

    def __init__(self, shape):
        self.shape = shape

    def __setitem__(self, key, value):
        pass


def _sinks(arrays):
    return [_Sink(a.shape) for a in arrays]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--size", type=int, default=4096, help="frame size (square)")
    parser.add_argument("--filters", default="rp,gp")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "graph_build.json")
    args = parser.parse_args(argv)

    from distributed import Client, LocalCluster

    from daskstack import _pipeline as pipeline
    from daskstack._pipeline import FrameRecord
    from daskstack.astrometry import SolveResult
    from daskstack.config import Settings

    settings = Settings().validate()
    report = {"frames": args.frames, "frame_shape": [args.size, args.size],
              "frame_bytes_float32": args.size * args.size * 4,
              "python": platform.python_version(), "phases": {}}

    start = time.perf_counter()
    metas = synthetic_metas(args.frames, args.size, args.filters.split(","))
    report["make_headers_s"] = round(time.perf_counter() - start, 3)

    # a scheduler with no workers: tasks are accepted and wait; nothing runs
    with LocalCluster(n_workers=0, processes=False, dashboard_address=None,
                      silence_logs=40) as cluster, Client(cluster) as client:
        scheduler = cluster.scheduler
        phases = report["phases"]
        phases["inspect"] = _submit_phase(
            client, scheduler, [(pipeline._inspect_task, (m.path,)) for m in metas])

        catalog = client.submit(_placeholder_catalog, pure=False)  # stands for the scatter
        phases["solve"] = _submit_phase(
            client, scheduler, [(pipeline._solve_task, (m, catalog, settings)) for m in metas])

        # grid: the client-side reduction over the solved frames
        records = []
        for m in metas:
            rec = FrameRecord(file=m.path, name=m.name, meta=m)
            rec.result = SolveResult(name=m.name, path=m.path, filter=m.filter, status="ok",
                                     wcs_header=m.wcs_header)
            records.append(rec)
        start = time.perf_counter()
        grid = pipeline.choose_grid(records, settings)
        phases["grid"] = {"tasks": 0, "client_s": round(time.perf_counter() - start, 3),
                          "grid_shape": list(grid.shape)}

        store_path = Path(tempfile.mkdtemp(prefix="graph-build-")) / "store.zarr"
        index = {}
        for m in metas:
            index.setdefault(m.filter, []).append(m.name)
        calls = [(pipeline._register_task,
                  (m, m.wcs_header, grid, str(store_path), m.filter,
                   index[m.filter].index(m.name), settings)) for m in metas]
        phases["register"] = _submit_phase(client, scheduler, calls, retries=1)

        phases["combine"] = build_combine(store_path, grid, metas, settings)

        for phase in ("inspect", "solve", "register"):
            client.cancel(phases[phase].pop("futures"))
        client.cancel(catalog)

    totals = {
        "tasks": sum(p["tasks"] for p in report["phases"].values()),
        "seconds": round(sum(p.get("build_and_start_s", 0) + p.get("build_s", 0)
                             + p.get("client_s", 0) for p in report["phases"].values()), 3),
        "bytes": sum(p.get("bytes_total", 0) for p in report["phases"].values()),
    }
    report["total"] = totals
    largest = max(p.get("bytes_max_task", 0) for p in report["phases"].values())
    report["largest_task_bytes"] = largest
    report["largest_task_vs_one_frame"] = largest / report["frame_bytes_float32"]

    print(f"graph for {args.frames} frames of {args.size}x{args.size} "
          f"(one frame = {report['frame_bytes_float32'] / 2**20:.0f} MiB of pixels)")
    print(f"{'phase':<9} {'tasks':>7} {'seconds':>8} {'MiB':>8} {'max task':>9}")
    for name, p in report["phases"].items():
        seconds = p.get("build_and_start_s", p.get("build_s", p.get("client_s", 0)))
        print(f"{name:<9} {p['tasks']:>7} {seconds:>8.2f} {p.get('bytes_total', 0) / 2**20:>8.2f}"
              f" {p.get('bytes_max_task', 0) / 1024:>7.1f}K")
    print(f"{'total':<9} {totals['tasks']:>7} {totals['seconds']:>8.2f} "
          f"{totals['bytes'] / 2**20:>8.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
