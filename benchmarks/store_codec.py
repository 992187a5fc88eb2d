"""``python -m benchmarks store-codec``: what the store's codec costs per registered frame.

The frames of the synthetic 4096x4096 benchmark dataset are registered once onto its grid
(`daskstack.register_files`, header WCS: the planes the store really holds, NaN borders
included). Their data, variance and kernel-power planes are then written again into
stores of the same layout as a run of N frames makes (`daskstack.store.chunk_layout`:
1024-pixel shards of inner chunks the side of the combine block, `combine._combine_tile`)
with each candidate codec, tile by tile as `store.write_tiles` writes them, and read back
as the combine reads them: ``(frames, block, block)`` slabs of data and variance, through
zarr-python; and with the store's own codec through tensorstore too, as daskstack writes
and reads a local store's frames (`daskstack.store.frame_array`). Per candidate: CPU
and wall time per frame of the write and of the read, and bytes per frame. At most
``--distinct`` frames are registered; a larger N repeats them (the same bytes per frame,
the chunk count and layout of N frames).
The codecs run interleaved (each repeat runs every codec, the order rotated), in this
one process on one core, so the ratios between codecs are what to read.

Writes ``benchmarks/results/store-codec-<date>.json`` and ``.md`` (``store-io-<date>``
with ``--store-codec-only``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from .runner import provenance_lines, run_per_n
from .stats import median_range

PLANES = (("data", "float32"), ("variance", "float32"), ("kernel_power", "float16"))


TENSORSTORE = "the store's codec, through tensorstore (daskstack.store.frame_array)"
ZARR_PYTHON = "the store's codec, through zarr-python"


def codecs(store_codec_only: bool = False) -> dict:
    """``{label: codec}``; the tensorstore candidate's codec is the store's."""
    from zarr.codecs import BloscCodec

    from daskstack.store import COMPRESSOR

    if store_codec_only:
        return {ZARR_PYTHON: COMPRESSOR, TENSORSTORE: COMPRESSOR}
    return {
        TENSORSTORE: COMPRESSOR,
        "blosc lz4 clevel 5, byte shuffle": BloscCodec(cname="lz4", clevel=5,
                                                        shuffle="shuffle"),
        "blosc lz4 clevel 1, byte shuffle": BloscCodec(cname="lz4", clevel=1,
                                                        shuffle="shuffle"),
        "blosc lz4 clevel 5, no shuffle": BloscCodec(cname="lz4", clevel=5,
                                                      shuffle="noshuffle"),
        "blosc zstd clevel 1, byte shuffle": BloscCodec(cname="zstd", clevel=1,
                                                         shuffle="shuffle"),
        "none": None,
    }


def _registered_planes(frames, grid_head, workdir: Path, workers: int) -> list[tuple]:
    from daskstack import Settings, open_store, register_files

    settings = Settings().update({"grid": {"method": str(grid_head)},
                                  "cluster": {"n_workers": workers,
                                              "threads_per_worker": 1}})
    register_files([str(f) for f in frames], workdir / "registered", settings,
                   wcs_source="header")
    stack = open_store(workdir / "registered" / "store.zarr")
    (filter_name,) = stack.filters
    data, _ = stack.arrays(filter_name)
    variance, power = stack.variance(filter_name)
    return [(data[i], variance[i], power[i]) for i in range(data.shape[0])]


def _write_read(path: Path, codec, planes, tile: int, inner: int,
                tensorstore: bool = False) -> dict:
    import zarr

    from daskstack.store import chunk_layout, filter_key, frame_array

    shutil.rmtree(path, ignore_errors=True)
    n = len(planes)
    ny, nx = planes[0][0].shape
    chunks, shards = chunk_layout(tile, (ny, nx), inner)
    group = zarr.open_group(path, mode="w")
    arrays = [group.create_array(f"{filter_key('bench')}/{name}", shape=(n, ny, nx),
                                 chunks=chunks, shards=shards, dtype=dtype,
                                 fill_value=np.nan, compressors=codec)
              .with_config({"write_empty_chunks": True}) for name, dtype in PLANES]
    if tensorstore:
        arrays = [frame_array(str(path), "bench", name, write=True) for name, _ in PLANES]
    wall, cpu = time.perf_counter(), time.process_time()
    for index, frame in enumerate(planes):
        for y0 in range(0, ny, tile):
            for x0 in range(0, nx, tile):
                for array, plane in zip(arrays, frame, strict=True):
                    array[index, y0:y0 + tile, x0:x0 + tile] = plane[y0:y0 + tile,
                                                                     x0:x0 + tile]
    write = (time.perf_counter() - wall) / n, (time.process_time() - cpu) / n
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    wall, cpu = time.perf_counter(), time.process_time()
    for y0 in range(0, ny, inner):
        for x0 in range(0, nx, inner):
            for array in arrays[:2]:  # the plain combine reads data and variance
                array[:, y0:y0 + inner, x0:x0 + inner]
    read = (time.perf_counter() - wall) / n, (time.process_time() - cpu) / n
    shutil.rmtree(path, ignore_errors=True)
    return {"write_wall_s": write[0], "write_cpu_s": write[1], "read_wall_s": read[0],
            "read_cpu_s": read[1], "bytes_per_frame": size / n}


def measure_n(n_frames: int, workdir: Path, *, data_root: Path, repeats: int,
              workers: int, distinct: int = 20, store_codec_only: bool = False) -> dict:
    from daskstack.combine import _combine_tile

    from . import datasets

    distinct = min(distinct, n_frames)
    dataset = datasets.synthetic(data_root, distinct, 4096, workers=workers)
    registered = _registered_planes(dataset.frames[:distinct], dataset.grid_head, workdir,
                                    workers)
    planes = [registered[i % distinct] for i in range(n_frames)]
    tile = 1024
    inner = _combine_tile(tile, n_frames, planes[0][0].shape, methods=("mean", "median"))
    candidates = codecs(store_codec_only)
    names = list(candidates)
    raw = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            raw[name].append(_write_read(workdir / "codec.zarr", candidates[name], planes,
                                         tile, inner, tensorstore=name == TENSORSTORE))
    summary = {name: {key: median_range([r[key] for r in runs]) for key in runs[0]}
               for name, runs in raw.items()}
    from daskstack.store import COMPRESSOR

    return {"n_frames": n_frames, "distinct_frames": distinct,
            "store_codec": repr(COMPRESSOR), "frame_shape": list(planes[0][0].shape),
            "tile": tile, "inner_chunk": inner, "repeats": repeats,
            "codecs": {name: repr(candidates[name]) for name in names},
            "summary": summary, "raw": raw}


def _cell(stat, scale=1.0, fmt="{:.3f}") -> str:
    return (f"{fmt.format(stat['median'] / scale)} [{fmt.format(stat['min'] / scale)}-"
            f"{fmt.format(stat['max'] / scale)}]")


def _markdown(result: dict) -> str:
    lines = [f"# The store's codec and the library that reads it ({result['date']})", "", *provenance_lines(result), "",
             "Per registered 4096x4096 frame (data, variance float32 and kernel power "
             "float16 written; data and variance read back in the combine's slabs), one "
             "process on one core; median [min-max] over the interleaved repeats. See "
             "`benchmarks/store_codec.py`.", ""]
    for record in result["results"]:
        lines += [f"## {record['n_frames']} frames ({record.get('distinct_frames', '')} "
                  f"registered): {record['tile']}-pixel shards of "
                  f"{record['inner_chunk']}-pixel chunks, {record['repeats']} repeats", "",
                  "| codec | write CPU s | write wall s | read CPU s | read wall s | "
                  "MB per frame |", "|---|---|---|---|---|---|"]
        for name, s in record["summary"].items():
            lines.append(f"| {name} | {_cell(s['write_cpu_s'])} | {_cell(s['write_wall_s'])}"
                         f" | {_cell(s['read_cpu_s'])} | {_cell(s['read_wall_s'])} | "
                         f"{_cell(s['bytes_per_frame'], 1e6, '{:.1f}')} |")
        lines += ["", "Codecs: " + "; ".join(f"{k}: `{v}`"
                                             for k, v in record["codecs"].items()) + ".",
                  "", f"The store's codec (`daskstack.store.COMPRESSOR`) at this commit: "
                  f"`{record['store_codec']}`.", ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks store-codec",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[20],
                        help="frames registered (the layout of a run of that many)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--distinct", type=int, default=20,
                        help="frames registered; a larger N repeats them")
    parser.add_argument("--store-codec-only", action="store_true",
                        help="only the store's codec, through zarr-python and tensorstore")
    parser.add_argument("--workers", type=int, default=2, help="for the registration")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--keep", type=Path, default=None, help="keep the scratch here")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    command = " ".join(["python -m benchmarks store-codec", *argv])
    # the libraries alone are a result of their own (store-io-<date>), not a new codec one
    run_per_n("store-io" if args.store_codec_only else "store-codec", args.n,
              lambda n, workdir: measure_n(n, workdir, data_root=args.out / "data",
                                           repeats=args.repeats, workers=args.workers,
                                           distinct=args.distinct,
                                           store_codec_only=args.store_codec_only),
              out_dir=args.out, keep=args.keep, command=command,
              markdown=_markdown, not_printed=("raw",))
    return 0
