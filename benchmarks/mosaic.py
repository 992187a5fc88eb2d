"""The combine of a mosaic: time against the number of frames, memory flat (issue 17).

    python -m benchmarks mosaic              # 2x2 ... 10x10 of 1024x1024, dense 2x2 ... 4x4
    python -m benchmarks mosaic --sides 3 5 --size 512   # try the machinery

A synthetic n x n mosaic of square frames (1024 x 1024 by default), each overlapping its
neighbours by a tenth, with its own sky level and Gaussian noise, is written straight
into a daskstack store on one grid (the frames aligned with the grid: registration is
not what is measured; each frame's tiles recorded as registration records them). Then
``daskstack combine`` (`daskstack._pipeline.combine_store_path`, sigclip, 2 workers of 1
thread, sky levels matched: a mosaic) runs in its own measured process (`measure`): wall
time, CPU time of the process tree, peak memory of the tree. ``sparse-nomatch`` runs skip the sky
matching; ``dense`` runs are the same combine with every block reading every frame (as daskstack did before the per-block
frame lists; sky matching off, since it needs those lists): its time grows with frames x
grid, which is what the per-block lists remove. Writes
``benchmarks/results/mosaic-<YYYYMMDD-HHMMSS>.json`` (machine, load, commit, every run)
and a ``.md`` table.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

OVERLAP = 0.1
SKY = 200.0  # e-, about; every frame its own level around it
READ_NOISE = 7.0


def _tan_wcs(n: int, scale_arcsec: float = 0.389):
    from astropy.wcs import WCS

    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [150.0, 2.0]
    wcs.wcs.crpix = [(n + 1) / 2, (n + 1) / 2]
    wcs.wcs.cd = [[-scale_arcsec / 3600, 0.0], [0.0, scale_arcsec / 3600]]
    return wcs


def make_mosaic_store(path: Path, side: int, size: int, seed: int = 0) -> dict:
    """A store of a ``side`` x ``side`` mosaic of ``size`` px frames; returns a summary."""
    from daskstack import store as store_mod
    from daskstack._pipeline import FRAME_TILES, MOSAIC
    from daskstack.grid import Grid
    from daskstack.store import FrameInfo

    step = int(round(size * (1 - OVERLAP)))
    n_grid = step * (side - 1) + size
    tile = 1024
    grid = Grid.from_wcs(_tan_wcs(n_grid), (n_grid, n_grid))
    rng = np.random.default_rng(seed)
    names = [f"mosaic-{k:04d}" for k in range(side * side)]
    skies = SKY * rng.uniform(0.7, 1.5, len(names))
    frames = {n: FrameInfo(file=f"{n}.fits", filter="rp", exptime=60.0, gain=1.0,
                           rdnoise=READ_NOISE, background=float(s),
                           noise=float(np.sqrt(s + READ_NOISE**2)), object="MOSAIC")
              for n, s in zip(names, skies, strict=True)}
    stack = store_mod.create_store(path, grid, frames, {"rp": names}, tile=tile,
                                   params={"registered": names, MOSAIC: True})
    tiles_of = {}
    for k, name in enumerate(names):
        y0, x0 = divmod(k, side)
        y0, x0 = y0 * step, x0 * step
        noise = np.sqrt(skies[k] + READ_NOISE**2)
        frame = (skies[k] + rng.normal(0, noise, (size, size))).astype(np.float32)
        tiles = []
        for ty in range(y0 // tile * tile, y0 + size, tile):
            for tx in range(x0 // tile * tile, x0 + size, tile):
                ny, nx = min(tile, n_grid - ty), min(tile, n_grid - tx)
                data = np.full((ny, nx), np.nan, np.float32)
                ys, xs = slice(max(y0, ty), min(y0 + size, ty + ny)), slice(
                    max(x0, tx), min(x0 + size, tx + nx))
                data[ys.start - ty:ys.stop - ty, xs.start - tx:xs.stop - tx] = frame[
                    ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]
                variance = np.where(np.isfinite(data), np.float32(noise**2), np.nan)
                power = np.where(np.isfinite(data), 1.0, np.nan).astype(np.float16)
                tiles.append((ty, tx, data, None, variance.astype(np.float32), power))
        store_mod.write_tiles(str(path), "rp", k, iter(tiles))
        tiles_of[name] = [[t[0], t[1]] for t in tiles]
    stack.params[FRAME_TILES] = tiles_of
    store_mod.update_frames(stack, {})
    return {"frames": len(names), "grid": n_grid, "frame_pixels": len(names) * size * size,
            "grid_pixels": n_grid * n_grid}


def combine_command(store: Path, out: Path, mode: str) -> None:
    """The measured process: combine ``store`` into ``out`` (``mode`` sparse or dense)."""
    from distributed import Client, LocalCluster

    from daskstack import _pipeline
    from daskstack._pipeline import combine_store_path
    from daskstack.config import Settings

    settings = Settings()
    if mode == "dense":  # every block reads every frame, as before the per-block lists
        _pipeline._block_members = lambda *args: None
    if mode in ("dense", "sparse-nomatch"):
        settings = settings.replace("combine", match_background="off")
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0",
                      processes=True) as cluster, Client(cluster) as client:
        cpu_before = sum(client.run(time.process_time).values()) + time.process_time()
        start = time.perf_counter()
        combine_store_path(store, out, settings, client=client, overwrite=True)
        wall = time.perf_counter() - start
        cpu = sum(client.run(time.process_time).values()) + time.process_time() - cpu_before
    # the combine alone, without starting and stopping the cluster
    (out / "combine-timing.json").write_text(json.dumps({"wall_s": wall, "cpu_s": cpu}))


def mosaic_benchmark(out_dir: Path, sides=(2, 3, 4, 10), size: int = 1024,
                     dense_sides=(2, 3, 4), work=None, nomatch_sides=()) -> Path:
    import shutil
    import tempfile

    from .measure import run_measured

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(work or tempfile.mkdtemp(prefix="daskstack-mosaic-"))
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root))
    runs = []
    plan = ([(s, "sparse") for s in sides] + [(s, "sparse-nomatch") for s in nomatch_sides]
            + [(s, "dense") for s in dense_sides])
    stores = {}
    for side, mode in plan:
        if side not in stores:
            store = work / f"mosaic-{side}x{side}" / "store.zarr"
            shutil.rmtree(store.parent, ignore_errors=True)
            store.parent.mkdir(parents=True)
            start = time.perf_counter()
            stores[side] = (store, make_mosaic_store(store, side, size))
            print(f"{side}x{side}: store written in {time.perf_counter() - start:.0f} s",
                  flush=True)
        store, summary = stores[side]
        target = work / f"out-{side}-{mode}"
        load_before = os.getloadavg()
        measured = run_measured([sys.executable, "-m", "benchmarks.mosaic", "combine",
                                 str(store), str(target), mode], cwd=root, env=env,
                                log_path=work / f"combine-{side}-{mode}.log")
        timing = target / "combine-timing.json"
        inner = json.loads(timing.read_text()) if timing.exists() else {}
        row = {"side": side, "mode": mode, **summary, "status": measured.status,
               "combine_wall_s": inner.get("wall_s"), "combine_cpu_s": inner.get("cpu_s"),
               "wall_s": measured.wall_s, "cpu_s": measured.cpu_s,
               "peak_rss_gib": measured.peak_rss_bytes / 2**30,
               "peak_process_rss_gib": measured.peak_process_rss_bytes / 2**30,
               "load_before": load_before, "load_after": os.getloadavg()}
        runs.append(row)
        print(json.dumps(row), flush=True)
        shutil.rmtree(target, ignore_errors=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                            text=True).stdout.strip()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    result = {"command": "python -m benchmarks mosaic " + " ".join(sys.argv[2:]),
              "commit": commit, "machine": platform.platform(), "cpus": os.cpu_count(),
              "python": platform.python_version(), "size": size, "overlap": OVERLAP,
              "runs": runs}
    json_path = out_dir / f"mosaic-{stamp}.json"
    json_path.write_text(json.dumps(result, indent=1))
    md_path = json_path.with_suffix(".md")
    md_path.write_text(_markdown(result))
    shutil.rmtree(work, ignore_errors=True)
    return md_path


def _markdown(result: dict) -> str:
    lines = [f"# Mosaic combine: {result['size']}x{result['size']} frames, overlap "
             f"{result['overlap']:.0%}", "",
             f"`{result['command']}` at {result['commit'][:10]}, {result['machine']}, "
             f"{result['cpus']} CPUs (shared: the load average is given per run)", "",
             "| mosaic | frames | grid | mode | combine wall s | combine CPU s | "
             "CPU s / frame | process wall s | process CPU s | peak RSS GiB (tree) | "
             "load before / after |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        cpu = r["combine_cpu_s"] or float("nan")
        lines.append(
            f"| {r['side']}x{r['side']} | {r['frames']} | {r['grid']}x{r['grid']} | "
            f"{r['mode']} | {r['combine_wall_s'] or float('nan'):.1f} | {cpu:.1f} | "
            f"{cpu / r['frames']:.2f} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | "
            f"{r['peak_rss_gib']:.2f} | {r['load_before'][0]:.1f} / "
            f"{r['load_after'][0]:.1f} |")
    lines += ["", "sparse: each output block reads only the frames that cover it (sky "
              "levels matched); sparse-nomatch: the same without sky matching; dense: "
              "every block reads every frame (sky matching off). "
              "combine: the `combine_store_path` call alone (CPU: process time of the "
              "client and both workers); process: the whole measured command (cluster start "
              "and stop included; CPU: user + system of the process tree), whose peak RSS "
              "is the tree's."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__" and sys.argv[1:2] == ["combine"]:
    combine_command(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4])
