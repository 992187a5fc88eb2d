"""The zarr v3 store: the hand-over between registration and combination.

Layout (``OUT/store.zarr``)::

    zarr.json                  attrs["daskstack"]: grid header and shape, tile size,
                               grid fingerprint, per-filter frame lists, per-frame
                               records (exptime, sky, flux ratio ...), register options
    <filter>/data              (n_frames, ny, nx) float32, NaN where the frame gives nothing
    <filter>/variance          (n_frames, ny, nx) float32, each frame's variance resampled
                               with its data (`daskstack.register`), NaN where data is NaN
    <filter>/kernel_power      (n_frames, ny, nx) float16, sum of the squared resampling
                               weights (variance / kernel_power = the input noise: the
                               inverse-variance weights of a coadd)
    <filter>/footprint         (n_frames, ny, nx) float32, 0..1 coverage of each frame; only
                               for flux-conserving reprojection (adaptive/exact), where
                               coverage is fractional: for interpolation it is exactly
                               "data is finite", and storing it would double the I/O
    coadd/<key>/image, ERR, WEIGHT, NFRAMES, EXPMAP
                               (ny, nx) float32: a coadd and its noise and coverage
                               (`COADD_PLANES`), written by the combine (``<key>``:
                               filter, then ``_<method>`` for the second and further
                               methods), streamed from here to FITS

Chunks are ``(1, tile, tile)``: each registration task writes whole chunks of its own
frame, so concurrent writers never touch the same chunk (a chunk spanning the stack
axis would be read-modify-written by every frame's task at once). The combine step
reads a block's ``n_frames`` chunks at once. With many frames its block (kept within a
memory budget) is smaller than a tile; then the tiles are zarr v3 shards of chunks of
the block's side (`chunk_layout`), so the combine still reads each chunk once.
The store describes itself: `open_store` gives back everything needed to combine
again, with other options, without reprojecting.

Who reads and writes which bytes: the store's structure (groups, arrays, attributes,
resizing, the coadd planes) goes through zarr-python. The frames' pixels, which
registration writes once per frame and every combine reads back, go through
tensorstore where the store is a local directory (`frame_array`): zarr-python reads
each inner chunk of a shard through several Python steps on its event loop (the shard's
index read, the file opened, the chunk decoded and copied, each a hop between threads),
and a combine of many frames reads many small chunks (its block shrinks as frames are
added); tensorstore does the same in C++. The files are the same zarr v3 either way. A
store at a URL is read and written by zarr-python through fsspec.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from dataclasses import dataclass

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from ._io import as_path, is_url, zarr_store
from .errors import DaskstackError
from .grid import Grid

__all__ = ["COADD_PLANES", "FRAME_PLANES", "FrameInfo", "FramePlane", "StackStore", "StoreError",
           "chunk_layout", "clear_frame", "coadd_key", "create_coadd_arrays", "create_store",
           "extends", "filter_key", "frame_array", "lazy_frames", "open_coadd_arrays",
           "open_store", "read_box", "read_frames_block", "read_plane", "update_frames",
           "write_tiles"]

FORMAT_VERSION = 2  # 2: a variance beside the data
# every registered frame is encoded once and decoded by every combine: lz4 with a byte
# shuffle stores a frame in 0.6x the bytes of no codec; its level (1 or 5) changes
# neither the bytes nor the time beyond the spread of repeats; zstd saves 6% more bytes
# and decodes 1.4x slower (benchmarks/results/store-codec-2026-12-02.md, through
# zarr-python)
COMPRESSOR = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")


class StoreError(DaskstackError, ValueError):
    """A store that is missing, not daskstack's, or does not fit the run."""


def _open_group(path, mode: str) -> zarr.Group:
    """The store's root group; ``path`` local or a URL (`daskstack._io.zarr_store`)."""
    return zarr.open_group(zarr_store(path, mode), mode=mode)


def filter_key(name: str) -> str:
    """A filter name as a safe zarr node name (``'r prime/x'`` -> ``'r_prime_x'``)."""
    key = re.sub(r"[^A-Za-z0-9_.-]", "_", name.strip()) or "unknown"
    return key.lstrip(".") or "unknown"


@dataclass(frozen=True)
class FrameInfo:
    """What the store keeps of one registered frame: what the scaling, the weights and
    the coadd header need, so that a combine can run again from the store alone.
    None where the frame's header or solution did not say."""

    file: str = ""
    filter: str = ""
    exptime: float | None = None
    date_obs: str | None = None
    mjd: float | None = None
    gain: float | None = None
    rdnoise: float | None = None
    background: float | None = None  # sky level (frame units)
    noise: float | None = None  # sky noise (frame units)
    flux_ratio: float | None = None  # catalog stars' flux relative to the reference
    fwhm_px: float | None = None
    # QA the combine-time cuts judge (--max-rms, --min-matches; daskstack.qa)
    n_matches: int | None = None
    rms_arcsec: float | None = None
    elongation: float | None = None
    site: str | None = None
    telescope: str | None = None
    instrument: str | None = None
    object: str | None = None
    bunit: str | None = None
    # magnitude zero point (daskstack.photcal): mag = zp - 2.5 log10(flux in the frame's
    # pixel units per second of exposure), in the catalog band of the filter; NaN = none
    zp: float = float("nan")
    zp_err: float = float("nan")
    n_zp: int = 0
    airmass: float | None = None  # the header's AIRMASS (light curves)

    def to_dict(self) -> dict:
        """JSON-ready, for the store's attributes."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> FrameInfo:
        """From the store's attributes; fields a store written earlier lacks stay None,
        fields it has that this version does not know are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def __eq__(self, other) -> bool:
        """Field by field, NaN equal to NaN (an unknown zero point stays unknown through
        the store's JSON)."""
        if not isinstance(other, FrameInfo):
            return NotImplemented
        return all(a == b or (isinstance(a, float) and isinstance(b, float) and a != a
                              and b != b)
                   for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other),
                                   strict=True))


@dataclass
class StackStore:
    """An open daskstack store: its grid, frame records and per-filter arrays."""

    path: str
    grid: Grid
    tile: int
    filters: dict[str, list[str]]  # filter -> frame names in stack order
    frames: dict[str, FrameInfo]  # frame name -> its record (exptime, sky, flux ratio ...)
    params: dict

    def group(self, mode="r") -> zarr.Group:
        return _open_group(self.path, mode)

    def arrays(self, filter_name: str):
        """(data, footprint) zarr arrays of one filter; footprint is None where coverage
        is given by the data alone (interpolation)."""
        group = self.group()
        key = filter_key(filter_name)
        footprint = group.get(f"{key}/footprint")
        return group[f"{key}/data"], footprint

    def variance(self, filter_name: str):
        """(variance, kernel_power) zarr arrays of one filter (None, None in a store
        written before them)."""
        group = self.group()
        key = filter_key(filter_name)
        return group.get(f"{key}/variance"), group.get(f"{key}/kernel_power")

    def index_of(self, name: str) -> tuple[str, int]:
        for filter_name, names in self.filters.items():
            if name in names:
                return filter_name, names.index(name)
        raise StoreError(f"frame {name!r} is not in store {self.path}")


def create_store(path, grid: Grid, frames: dict[str, FrameInfo], filters: dict[str, list[str]],
                 *, tile: int, params: dict | None = None,
                 footprint: bool = False, inner: dict[str, int] | None = None) -> StackStore:
    """Create (or reuse) the store for a run.

    An existing store on the same grid and tile is reused, so a resumed run keeps the
    tiles already written: when each of its frame lists begins ``filters``' list of the
    same filter, the frames added (tonight's, appended to the lists) get new slices at
    the end of the frame axis, and new filters new arrays; the frames already in it keep
    their index and their tiles. Anything else is replaced.
    ``inner``: per filter, the side of the chunks the combine will read (its block, see
    `chunk_layout`); default: the tile.
    """
    try:
        existing = open_store(path)
    except StoreError:
        existing = None
    if (existing is not None and existing.grid.fingerprint == grid.fingerprint
            and existing.tile == tile and extends(existing.filters, filters)
            and all((existing.arrays(f)[1] is not None) == footprint
                    and existing.variance(f)[1] is not None for f in existing.filters)):
        _append_frames(existing, filters, footprint, inner)
        existing.frames.update(frames)
        existing.params = params or {}
        _write_attrs(existing)
        return existing
    group = _open_group(path, "w")
    for filter_name, names in filters.items():
        _create_frame_arrays(group, filter_name, len(names), grid, tile, footprint,
                             (inner or {}).get(filter_name))
    store = StackStore(path=str(path), grid=grid, tile=tile, filters=filters, frames=frames,
                       params=params or {})
    _write_attrs(store)
    return store


def chunk_layout(tile: int, shape, inner: int | None = None):
    """``(chunks, shards)`` of a frame plane: one ``tile`` x ``tile`` unit per
    registration write (a shard; written whole, by one task), made of ``inner`` x
    ``inner`` chunks when ``inner`` divides it (shards None when it does not, or when
    ``inner`` is the tile: plain chunks). The combine reads ``(frames, block, block)``
    slabs, its block as small as a memory budget asks at that many frames; chunks of
    that side are each read and decompressed once, where whole tiles would be read
    (tile / block)**2 times."""
    ny, nx = shape
    outer = (1, min(tile, ny), min(tile, nx))
    if not inner:
        return outer, None
    chunks = (1,) + tuple(inner if inner < side and side % inner == 0 else side
                          for side in outer[1:])
    return (outer, None) if chunks == outer else (chunks, outer)


def extends(before: dict[str, list[str]], after: dict[str, list[str]]) -> bool:
    """True when every frame list of ``before`` begins the list of the same filter in
    ``after`` (frames only added, at the ends: no index of ``before`` changes)."""
    return all(after.get(f, [])[:len(names)] == names for f, names in before.items())


def _create_frame_arrays(group: zarr.Group, filter_name: str, n_frames: int, grid: Grid,
                         tile: int, footprint: bool, inner: int | None = None) -> None:
    """The (n_frames, ny, nx) arrays of one filter (`create_store` documents them)."""
    ny, nx = grid.shape
    key = filter_key(filter_name)
    shape = (n_frames, ny, nx)
    chunks, shards = chunk_layout(tile, grid.shape, inner)
    for name, dtype in (("data", "float32"), ("variance", "float32"),
                        ("kernel_power", "float16")):
        group.create_array(f"{key}/{name}", shape=shape, chunks=chunks, dtype=dtype,
                           shards=shards, fill_value=np.nan,
                           dimension_names=("frame", "y", "x"), compressors=COMPRESSOR)
    if footprint:
        group.create_array(f"{key}/footprint", shape=shape, chunks=chunks,
                           shards=shards, dtype="float32", fill_value=0.0,
                           dimension_names=("frame", "y", "x"), compressors=COMPRESSOR)


def _append_frames(store: StackStore, filters: dict[str, list[str]], footprint: bool,
                   inner: dict[str, int] | None = None) -> None:
    """Grow ``store`` to ``filters`` (which `extends` its lists): the frame axis of each
    filter's arrays resized (the chunks written stay as they are), new filters' arrays
    created. Client side, before any task writes."""
    group = store.group("r+")
    for filter_name, names in filters.items():
        before = store.filters.get(filter_name)
        if before is None:
            _create_frame_arrays(group, filter_name, len(names), store.grid, store.tile,
                                 footprint, (inner or {}).get(filter_name))
        elif len(names) > len(before):
            for _, array in group[filter_key(filter_name)].arrays():
                array.resize((len(names), *array.shape[1:]))
    store.filters = {f: list(names) for f, names in filters.items()}


def update_frames(store: StackStore, frames: dict[str, FrameInfo]) -> None:
    """Merge per-frame records into the store's metadata (client side only)."""
    store.frames.update(frames)
    _write_attrs(store)


def _write_attrs(store: StackStore) -> None:
    group = _open_group(store.path, "a")
    group.attrs["daskstack"] = {
        "format_version": FORMAT_VERSION,
        "grid_header": store.grid.header_text,
        "grid_shape": list(store.grid.shape),
        "grid_fingerprint": store.grid.fingerprint,
        "tile": store.tile,
        "filters": store.filters,
        "frames": {name: info.to_dict() for name, info in store.frames.items()},
        "params": store.params,
    }


def open_store(path) -> StackStore:
    """Reopen a store written by daskstack, with its grid and frame records."""
    try:
        group = _open_group(path, "r")
        attrs = dict(group.attrs).get("daskstack")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError, KeyError):
        raise StoreError(f"{path}: not a zarr store") from None
    if not attrs:
        raise StoreError(f"{path}: a zarr store, but not one written by daskstack")
    grid = Grid(shape=tuple(attrs["grid_shape"]), header_text=attrs["grid_header"])
    return StackStore(path=str(path), grid=grid, tile=int(attrs["tile"]),
                      filters={k: list(v) for k, v in attrs["filters"].items()},
                      frames={name: FrameInfo.from_dict(values)
                              for name, values in attrs.get("frames", {}).items()},
                      params=dict(attrs.get("params", {})))


def coadd_key(filter_name: str, method: str = "") -> str:
    """Node name of a coadd: the filter's key, ``_<method>`` appended for the second and
    further methods of a run (``method`` = "" for the first)."""
    return filter_key(filter_name) + (f"_{method}" if method else "")


# the planes of a coadd (names as its FITS extensions, `daskstack._write`) -> fill value
COADD_PLANES = {"image": np.nan, "ERR": np.nan, "WEIGHT": 0.0, "NFRAMES": 0.0,
                "EXPMAP": 0.0}


def create_coadd_arrays(store: StackStore, key: str, block: int) -> dict:
    """New arrays ``coadd/<key>/<plane>`` of `COADD_PLANES` on the grid, chunked
    ``(block, block)`` as the combine writes them; an earlier coadd of the same key is
    replaced. Returns ``{plane: array}``."""
    group = store.group("r+")
    ny, nx = store.grid.shape
    return {name: group.create_array(f"coadd/{key}/{name}", shape=(ny, nx),
                                     chunks=(block, block), dtype="float32",
                                     fill_value=fill, overwrite=True,
                                     compressors=COMPRESSOR)
            for name, fill in COADD_PLANES.items()}


# -- the frames' pixels of a local store: tensorstore ------------------------------------
FRAME_PLANES = ("data", "footprint", "variance", "kernel_power")
_contexts: dict = {}  # per process: tensorstore's thread pools, made once


def _tensorstore_context():
    """One tensorstore context per process: as many decoding threads as the Dask worker
    has threads (one outside a worker), so that a worker uses its own cores only; no
    chunk cache (every chunk is read once); no fsync of each shard written: tensorstore
    syncs every file it writes by default, and a registration task then waited on the
    disk for each tile of each plane. The store is as durable as zarr-python left it
    (which never syncs): a frame's pixels reach the disk with the page cache, and a run
    cut short registers again the frames the store does not record as written."""
    import tensorstore as ts

    try:
        from distributed import get_worker

        threads = get_worker().state.nthreads
    except (ImportError, ValueError):
        threads = 1
    if threads not in _contexts:
        _contexts[threads] = ts.Context({
            "data_copy_concurrency": {"limit": threads},
            "file_io_concurrency": {"limit": 4 * threads},
            "file_io_sync": False,
            "cache_pool": {"total_bytes_limit": 0}})
    return _contexts[threads]


class _FrameArray:
    """A frame plane of a local store through tensorstore: ``[selection]`` reads,
    ``.oindex[frames, ys, xs]`` reads chosen frames, ``[selection] = values`` writes.
    tensorstore's failures to read or write the files are raised as `OSError`, as
    zarr-python's are: the frame's or the disk's problem, not a bug."""

    def __init__(self, array, where: str):
        self._array, self._where = array, where
        self.shape, self.dtype = tuple(array.shape), array.dtype.numpy_dtype
        self.oindex = _OrthogonalReader(self)

    def _result(self, future):
        try:
            return future.result()
        except ValueError as err:
            raise OSError(f"{self._where}: {err}") from err

    def __getitem__(self, selection) -> np.ndarray:
        return self._result(self._array[selection].read())

    def __setitem__(self, selection, values) -> None:
        self.start_write(selection, values)()

    def start_write(self, selection, values):
        """Write ``values`` at ``selection`` once they are copied: returns a function
        that waits until they are in the store. ``values`` may be changed as soon as
        this returns; encoding and writing go on in tensorstore's threads meanwhile."""
        written = self._array[selection].write(np.asarray(values, dtype=self.dtype))
        self._result(written.copy)
        return lambda: self._result(written.commit)


class _OrthogonalReader:
    def __init__(self, frame_array: _FrameArray):
        self._of = frame_array

    def __getitem__(self, selection) -> np.ndarray:
        return self._of._result(self._of._array.oindex[selection].read())


def frame_array(store_path: str, filter_name: str, plane: str, *, write: bool = False):
    """Frame plane ``plane`` (`FRAME_PLANES`) of a filter: ``[selection]`` reads (and,
    with ``write``, ``[selection] = values`` writes) its pixels; None when the store has
    no such plane (a footprint is stored only for flux-conserving reprojection).

    A local store's plane is opened through tensorstore (see the module docstring),
    afresh on each call (it reads only the array's metadata), so a store grown by an incremental run is seen at its new size; a store at a URL gives
    the zarr-python array. Chunks are written as they are, even all-NaN ones: checking
    each chunk against the fill value first costs a scan of every chunk to skip the few
    that a registered tile leaves empty."""
    key = f"{filter_key(filter_name)}/{plane}"
    if is_url(str(store_path)):
        array = _open_group(store_path, "r+" if write else "r").get(key)
        if array is None or not write:
            return array
        return array.with_config({"write_empty_chunks": True})
    import tensorstore as ts

    path = os.path.join(str(as_path(store_path)), key)
    if not os.path.exists(os.path.join(path, "zarr.json")):
        return None
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": path}}
    if write:
        spec["store_data_equal_to_fill_value"] = True
    try:
        array = ts.open(spec, read=True, write=write, context=_tensorstore_context()).result()
    except ValueError as err:
        raise OSError(f"{path}: {err}") from err
    return _FrameArray(array, path)


class FramePlane:
    """A frame plane of a store as `dask.array.from_array` reads it: only the store's
    path, the plane's name, shape and dtype travel in the graph; each read opens the
    plane on the worker (`frame_array`)."""

    def __init__(self, store_path: str, filter_name: str, plane: str, shape, dtype):
        self.store_path, self.filter_name, self.plane = str(store_path), filter_name, plane
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, selection) -> np.ndarray:
        return frame_array(self.store_path, self.filter_name, self.plane)[selection]


def lazy_frames(stack: StackStore, filter_name: str, chunks) -> dict:
    """``{plane: dask array of chunks}`` of a filter's frame planes (`FRAME_PLANES`; None
    for a plane the store lacks): each task reads its chunk straight from the store."""
    import dask.array as da
    from dask.base import tokenize

    group = stack.group()[filter_key(filter_name)]
    planes = {}
    for plane in FRAME_PLANES:
        array = group.get(plane)
        if array is None:
            planes[plane] = None
            continue
        source = FramePlane(stack.path, filter_name, plane, array.shape, array.dtype)
        name = f"{plane}-{tokenize(stack.path, filter_name, plane, array.shape, chunks)}"
        planes[plane] = da.from_array(source, chunks=chunks, name=name, asarray=False,
                                      fancy=False, lock=False,
                                      meta=np.empty((0,) * array.ndim, array.dtype))
    return planes


def open_coadd_arrays(store_path: str, key: str) -> dict:
    """``{plane: array}`` of coadd ``key`` (read only; a worker opens by path)."""
    group = _open_group(store_path, "r")
    return {name: group[f"coadd/{key}/{name}"] for name in COADD_PLANES}


def read_plane(store_path: str, filter_name: str, index: int) -> np.ndarray:
    """One registered frame's plane (ny, nx) of the stack (a worker opens by path)."""
    return frame_array(store_path, filter_name, "data")[index]


def read_frames_block(store_path: str, filter_name: str, frames, y0: int, y1: int, x0: int,
                      x1: int):
    """``(data, footprint, variance, kernel_power)`` of only the stack's ``frames``
    (sorted indices) on ``[y0:y1, x0:x1]``, each ``(len(frames), y1 - y0, x1 - x0)``
    (footprint None where the store has none): a block of a mosaic reads the frames
    that cover it, not the fill values of every other (a worker opens by path)."""
    frames = list(frames)
    out = []
    for plane in FRAME_PLANES:
        array = frame_array(store_path, filter_name, plane)
        out.append(None if array is None else
                   array.oindex[frames, slice(y0, y1), slice(x0, x1)])
    return tuple(out)


def read_box(store_path: str, filter_name: str, start: int, stop: int, y0: int, y1: int,
             x0: int, x1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(data, variance, kernel_power)`` of frames ``start:stop`` of a filter in the
    region ``[y0:y1, x0:x1]``, each ``(stop - start, y1 - y0, x1 - x0)``: only the chunks
    the region touches are read (a worker opens by path)."""
    return tuple(frame_array(store_path, filter_name, plane)[start:stop, y0:y1, x0:x1]
                 for plane in ("data", "variance", "kernel_power"))


def write_tiles(store_path: str, filter_name: str, index: int, tiles) -> int:
    """Write one frame's registered tiles into its slice of the stack; returns tiles written.

    ``tiles`` yields ``(y0, x0, data, footprint, variance, kernel_power)``. Runs on a worker: it opens
    the store by path, so only the path travels through the graph.
    """
    arrays = [frame_array(store_path, filter_name, plane, write=True)
              for plane in FRAME_PLANES]
    count = 0
    pending = []  # writes handed to tensorstore, not yet waited for: one tile's at most
    try:
        for y0, x0, *planes in tiles:
            _wait_for(pending)  # the previous tile's, encoded and written while this was made
            ny, nx = planes[0].shape
            where = (index, slice(y0, y0 + ny), slice(x0, x0 + nx))
            for array, values in zip(arrays, planes, strict=True):
                if array is not None:
                    pending.append(_start_write(array, where, values))
            count += 1
        _wait_for(pending)
    except BaseException:
        # a frame that fails is cleared from the store (`clear_frame`) after this task
        # ends: no write of it, even one begun for a tile left half-handed over, may
        # still be under way then
        _wait_for(pending, quiet=True)
        raise
    return count


def _wait_for(pending: list, quiet: bool = False) -> None:
    """Wait for each write of ``pending`` (emptying it); ``quiet``: their `OSError`s
    are dropped (an error is already on its way)."""
    while pending:
        finish = pending.pop(0)
        if quiet:
            with contextlib.suppress(OSError):
                finish()
        else:
            finish()


def _start_write(array, selection, values):
    """Begin writing ``values``; returns the function that waits for it (tensorstore
    writes in its own threads; zarr-python's array has written when this returns)."""
    if isinstance(array, _FrameArray):
        return array.start_write(selection, values)
    array[selection] = values
    return lambda: None


def clear_frame(store_path: str, filter_name: str, index: int, tiles) -> None:
    """Reset one frame's slice to "no data" on the tiles ``(y0, x0)`` it may have written
    (a registration that failed half-way must leave no pixel behind). Chunks that hold
    only the fill value are deleted, not written, so this costs no space."""
    group = _open_group(store_path, "r+")
    key = filter_key(filter_name)
    arrays = [(group[f"{key}/data"], np.nan), (group.get(f"{key}/variance"), np.nan),
              (group.get(f"{key}/kernel_power"), np.nan), (group.get(f"{key}/footprint"), 0.0)]
    for array, empty in arrays:
        if array is None:
            continue
        _, ny, nx = array.shape
        _, tile_y, tile_x = array.shards or array.chunks
        for y0, x0 in tiles:
            # whole chunks: the tiles of a run are its chunks
            y0, x0 = y0 // tile_y * tile_y, x0 // tile_x * tile_x
            array[index, y0:min(y0 + tile_y, ny), x0:min(x0 + tile_x, nx)] = empty
