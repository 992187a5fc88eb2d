"""The Dask graph: the one module that knows about Dask.

Phases, each a fan-out of small tasks over a `distributed.Client`::

    inspect   per frame: read the header (no pixels)          -> FrameMeta
    catalog   client: one reference catalog per field (cached), scattered once
    solve     per frame: read, detect, match, fit             -> SolveResult (WCS text + QA)
    grid      client: one output grid from the solved WCSs
    register  per frame: reproject tile by tile into zarr    -> tile count
    combine   per output chunk: scale, reject, combine       -> zarr -> FITS (streamed)

Tasks carry paths and small records, never pixel arrays: workers open the files
themselves, so the graph grows with the number of frames, not with their size.
Results come back as they complete; the manifest is rewritten atomically as they
do, so an interrupted run resumes where it stopped: frames already solved or
registered (same grid) are not computed again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from . import catalogs, combine, store as store_mod
from ._io import atomic_path, atomic_write_text
from .astrometry import SolveResult, solve_frame, write_wcs_file
from .config import Settings
from .frames import FrameError, FrameMeta, frame_name, read_frame, read_meta, unusable_reason
from .grid import Grid, make_grid
from .register import register_frame, sky_level

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_PARTIAL",
    "RunError",
    "RunResult",
    "combine_store",
    "make_report",
    "register_frames",
    "run",
    "solve_frames",
]

log = logging.getLogger(__name__)

EXIT_OK = 0  # every frame made it into a coadd
EXIT_PARTIAL = 3  # coadds were written, some frames failed
EXIT_FAILED = 4  # nothing usable came out

MANIFEST_COLUMNS = [
    ("file", str), ("name", str), ("filter", str), ("status", str), ("reason", str),
    ("n_detections", int), ("n_matches", int), ("rms_arcsec", float), ("rms_px", float),
    ("fwhm_px", float), ("background", float), ("noise", float), ("flux_ratio", float),
    ("pixel_scale_arcsec", float), ("exptime", float), ("date_obs", str), ("mjd", float),
    ("registered", bool), ("t_solve", float), ("t_register", float), ("warnings", str),
]

ProgressCallback = Callable[[str, int, int], None]


class RunError(RuntimeError):
    """A run that cannot start or cannot go on (not a per-frame failure)."""


@dataclass
class FrameRecord:
    """Everything the run knows of one input frame; one manifest row."""

    file: str
    name: str
    meta: FrameMeta | None = None
    result: SolveResult | None = None
    status: str = "pending"
    reason: str = ""
    registered: bool = False
    t_register: float = float("nan")

    def row(self) -> dict:
        row = {"file": self.file, "name": self.name, "status": self.status,
               "reason": self.reason, "registered": self.registered,
               "t_register": self.t_register}
        meta, res = self.meta, self.result
        row["filter"] = meta.filter if meta else ""
        row["exptime"] = meta.exptime if meta and meta.exptime is not None else np.nan
        row["date_obs"] = meta.date_obs or "" if meta else ""
        row["mjd"] = meta.mjd if meta and meta.mjd is not None else np.nan
        row["warnings"] = "; ".join(getattr(meta, "warnings", ()) or ()) if meta else ""
        for key in ("n_detections", "n_matches", "rms_arcsec", "rms_px", "fwhm_px",
                    "background", "noise", "flux_ratio", "pixel_scale_arcsec"):
            value = getattr(res, key, None) if res is not None else None
            row[key] = value if value is not None else (0 if key.startswith("n_") else np.nan)
        row["t_solve"] = getattr(res, "elapsed", np.nan) if res is not None else np.nan
        return row


@dataclass
class RunResult:
    """What a run produced: per-frame records, coadd paths, timings."""

    out_dir: Path
    frames: list[FrameRecord]
    coadds: dict[str, Path] = field(default_factory=dict)
    store: Path | None = None
    grid: Grid | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def n_ok(self) -> int:
        return sum(f.status == "ok" for f in self.frames)

    @property
    def n_failed(self) -> int:
        return sum(f.status == "failed" for f in self.frames)

    @property
    def exit_code(self) -> int:
        if not self.coadds:
            return EXIT_FAILED
        return EXIT_OK if self.n_failed == 0 else EXIT_PARTIAL

    @property
    def manifest(self) -> Path:
        return self.out_dir / "manifest.ecsv"


# --------------------------------------------------------------------------------------
# Tasks: plain functions of paths and small records; they run on the workers.
# --------------------------------------------------------------------------------------
def _inspect_task(path: str):
    try:
        return read_meta(path)
    except FrameError as err:
        return err


def _catalog_task(catalog: Table) -> Table:
    return catalog


def _solve_task(meta: FrameMeta, catalog: Table, settings: Settings, companions=None):
    try:
        frame = read_frame(meta.path)
        return solve_frame(frame, catalog, settings, companions=companions)
    except FrameError as err:
        return _failure(meta, err.reason)
    except Exception as err:  # one frame's bug must not stop the batch: record it
        log.exception("%s: solving failed", meta.name)
        return _failure(meta, f"unexpected error: {type(err).__name__}: {err}")


def _detect_task(meta: FrameMeta, settings: Settings):
    """Detections of one frame, to help solve another exposure of the same pointing."""
    from .detect import detect_sources

    try:
        return detect_sources(read_frame(meta.path), settings.detect)
    except FrameError:
        return None


def _register_task(meta: FrameMeta, wcs_header: str, grid: Grid, store_path: str,
                   filter_name: str, index: int, settings: Settings):
    start = time.perf_counter()
    frame = read_frame(meta.path)
    wcs = _wcs_from_text(wcs_header, frame.data.shape)
    tiles = ((t.y0, t.x0, t.data, t.footprint)
             for t in register_frame(frame.data, frame.mask, wcs, grid, settings.register,
                                     conserve_flux=settings.register.conserve_flux,
                                     seed=index))
    count = store_mod.write_tiles(store_path, filter_name, index, tiles)
    # a frame taken with its header WCS was never detected on: measure its sky here,
    # from the pixels already in memory, rather than read the frame a second time
    sky = sky_level(frame.data, frame.mask) if settings.solve.wcs == "header" else None
    return count, time.perf_counter() - start, sky


def _failure(meta: FrameMeta, reason: str) -> SolveResult:
    return SolveResult(name=meta.name, path=meta.path, filter=meta.filter, status="failed",
                       reason=reason)


def _from_wcs_file(meta: FrameMeta, path: Path, row: dict | None = None) -> SolveResult:
    """A solved frame taken back from its ``.wcs`` file (and manifest row, on resume)."""
    from .frames import quiet_astropy

    with quiet_astropy():
        header = fits.getheader(path)
        from astropy.wcs import WCS

        wcs = WCS(header, relax=True)
    if not wcs.has_celestial:
        raise ValueError(f"{path.name} holds no celestial WCS")
    result = SolveResult(name=meta.name, path=meta.path, filter=meta.filter, status="ok",
                         wcs_header=wcs.to_header(relax=True).tostring(),
                         sip_order=int(header.get("A_ORDER", 0)))
    for key, value in (row or {}).items():
        if hasattr(result, key) and key not in ("name", "path", "filter", "status", "reason"):
            kind = type(getattr(result, key))
            try:
                setattr(result, key, kind(value))
            except (TypeError, ValueError):
                pass
    if row and "t_solve" in row:
        result.elapsed = float(row["t_solve"])
    return result


def _wcs_from_text(text: str, shape=None):
    from astropy.wcs import WCS

    from .frames import quiet_astropy

    with quiet_astropy():
        wcs = WCS(fits.Header.fromstring(text), relax=True)
    if shape is not None:
        wcs.array_shape = shape
    return wcs


# --------------------------------------------------------------------------------------
# Helpers on the client
# --------------------------------------------------------------------------------------
def _progress_none(phase, done, total):
    return None


def _gather_as_completed(client, futures, phase, progress, on_result):
    """Wait for futures, call ``on_result(key, value)`` as each finishes (resilient to
    lost workers: distributed retries their tasks elsewhere)."""
    from distributed import as_completed

    total = len(futures)
    progress(phase, 0, total)
    done = 0
    by_future = {f: k for k, f in futures.items()}
    for future in as_completed(list(futures.values())):
        key = by_future[future]
        try:
            value = future.result()
        except Exception as err:  # a task that raised: record against its frame
            value = err
        on_result(key, value)
        done += 1
        progress(phase, done, total)


def _run_signature(inputs, catalog, settings: Settings) -> dict:
    settings_dict = settings.to_dict()
    settings_dict.pop("cluster", None)  # where it runs does not change the result
    return {"inputs": [str(Path(p).resolve()) for p in inputs], "catalog": str(catalog),
            "settings": settings_dict}


def _check_run_dir(out_dir: Path, signature: dict, overwrite: bool) -> bool:
    """Prepare the run directory; True when an earlier run of the same inputs is resumed."""
    run_file = out_dir / "run.json"
    if out_dir.exists() and not out_dir.is_dir():
        raise RunError(f"{out_dir}: exists and is not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunError(f"{out_dir}: cannot create the output directory "
                       f"({err.strerror or err})") from None
    _check_writable(out_dir)
    _remove_stale_temporaries(out_dir)
    if run_file.exists():
        try:
            previous = json.loads(run_file.read_text())
        except (OSError, json.JSONDecodeError):
            previous = None
        same = previous is not None and _comparable(previous) == _comparable(signature)
        if same and not overwrite:
            return True
        if not overwrite:
            raise RunError(
                f"{out_dir} holds a different run (other inputs or options); "
                "use --overwrite to replace it or choose another --out"
            )
        for child in ("store.zarr",):
            shutil.rmtree(out_dir / child, ignore_errors=True)
        (out_dir / "manifest.ecsv").unlink(missing_ok=True)
        _remove_recorded_outputs(out_dir)  # no coadd of the old run may look like ours
    elif any(out_dir.iterdir()) and not overwrite and (out_dir / "manifest.ecsv").exists():
        raise RunError(f"{out_dir} holds a run without run.json; use --overwrite")
    atomic_write_text(run_file, json.dumps(signature, indent=1, default=str))
    return False


def _comparable(signature: dict) -> str:
    return json.dumps(signature, sort_keys=True, default=str)


# --------------------------------------------------------------------------------------
# Output safety: writable, room enough, checksums of what was written, no leftovers
# --------------------------------------------------------------------------------------
OUTPUTS_FILE = "outputs.ecsv"  # name, sha256, bytes of every .wcs and coadd written
_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp")  # names made by _io.atomic_path
_outputs_cache: dict[str, dict[str, tuple[str, int]]] = {}


def _check_writable(out_dir: Path) -> None:
    """Write a probe file: unlike os.access, this also holds for root and read-only mounts."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".daskstack-probe.", dir=out_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise RunError(f"{out_dir}: output directory is not writable "
                       f"({err.strerror or err})") from None
    if not os.access(out_dir, os.W_OK):
        raise RunError(f"{out_dir}: output directory is not writable")


def _remove_stale_temporaries(out_dir: Path) -> None:
    """Temporaries of atomic writes that a killed run left behind (never final names)."""
    for path in out_dir.iterdir():
        if path.is_file() and _TEMPORARY.match(path.name):
            log.info("removing %s, left by an interrupted run", path.name)
            path.unlink(missing_ok=True)


def read_outputs(out_dir: Path) -> dict[str, tuple[str, int]]:
    """``{file name: (sha256, bytes)}`` of the outputs a run recorded in outputs.ecsv."""
    try:
        table = Table.read(Path(out_dir) / OUTPUTS_FILE, format="ascii.ecsv")
    except (OSError, ValueError):
        return {}
    return {str(row["file"]): (str(row["sha256"]), int(row["bytes"])) for row in table}


def _record_output(out_dir: Path, path: Path) -> None:
    """Add ``path`` (already renamed into place) to outputs.ecsv, atomically."""
    key = str(Path(out_dir).resolve())
    outputs = _outputs_cache.get(key)
    if outputs is None:
        outputs = _outputs_cache[key] = read_outputs(out_dir)
    outputs[path.name] = (run_fingerprint(path), path.stat().st_size)
    names = sorted(outputs)
    table = Table([names, [outputs[n][0] for n in names], [outputs[n][1] for n in names]],
                  names=("file", "sha256", "bytes"), dtype=(str, str, np.int64))
    table.meta["comments"] = ["daskstack outputs: sha256 of every file written (after it "
                              "was renamed into place)"]
    with atomic_path(Path(out_dir) / OUTPUTS_FILE) as tmp:
        table.write(tmp, format="ascii.ecsv")


def _output_verified(out_dir: Path, path: Path) -> bool:
    """True when ``path`` is recorded in outputs.ecsv with its present checksum."""
    recorded = read_outputs(out_dir).get(path.name)
    return (recorded is not None and path.exists()
            and recorded[1] == path.stat().st_size and recorded[0] == run_fingerprint(path))


def _remove_recorded_outputs(out_dir: Path) -> None:
    for name in read_outputs(out_dir):
        if "/" not in name and name not in ("", ".", ".."):
            (out_dir / name).unlink(missing_ok=True)
    (out_dir / OUTPUTS_FILE).unlink(missing_ok=True)
    _outputs_cache.pop(str(Path(out_dir).resolve()), None)


def estimate_output_bytes(records: list[FrameRecord], grid: Grid | None = None,
                          tile: int = 1024) -> int:
    """Bytes the store and coadds may take, before compression (an upper bound).

    Without a grid (before solving): each frame as many grid pixels as it has pixels,
    the grid as large as the largest frame. With the grid: the tiles each solved frame
    overlaps, and the grid itself per filter. 8 bytes per pixel (data + footprint or
    image + weight, float32), the coadds twice (zarr + FITS).
    """
    usable = [r for r in records if r.meta is not None and r.status != "failed"]
    if not usable:
        return 0
    filters = {r.meta.filter for r in usable}
    if grid is None:
        frame_px = sum(r.meta.shape[0] * r.meta.shape[1] for r in usable)
        grid_px = max(r.meta.shape[0] * r.meta.shape[1] for r in usable)
    else:
        from .register import frame_tiles

        frame_px = 0
        for r in usable:
            if r.result is None or not r.result.wcs_header:
                continue
            wcs = _wcs_from_text(r.result.wcs_header, r.meta.shape)
            frame_px += len(frame_tiles(wcs, r.meta.shape, grid, tile)) * tile * tile
        grid_px = grid.shape[0] * grid.shape[1]
    return int(8 * frame_px + 2 * 8 * grid_px * len(filters))


def _check_disk_space(out_dir: Path, needed: int, when: str) -> None:
    free = shutil.disk_usage(out_dir).free
    if needed * 1.1 > free:
        raise RunError(f"{out_dir}: not enough disk space {when}: the store and coadds need "
                       f"up to {needed / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free")


def write_manifest(records: list[FrameRecord], path: Path) -> None:
    rows = [r.row() for r in records]
    table = Table(rows=[[row[name] for name, _ in MANIFEST_COLUMNS] for row in rows],
                  names=[name for name, _ in MANIFEST_COLUMNS],
                  dtype=[kind for _, kind in MANIFEST_COLUMNS]) if rows else Table(
        names=[name for name, _ in MANIFEST_COLUMNS], dtype=[k for _, k in MANIFEST_COLUMNS])
    table.meta["comments"] = ["daskstack manifest: one row per input frame",
                              "status: ok | failed | pending; reason: why a frame failed"]
    with atomic_path(path) as tmp:
        table.write(tmp, format="ascii.ecsv")


def read_manifest(path: Path) -> Table | None:
    try:
        return Table.read(path, format="ascii.ecsv")
    except (OSError, ValueError):
        return None


def _dedupe(inputs) -> list[str]:
    seen, unique = {}, []
    for path in inputs:
        key = str(Path(path).resolve())
        if key in seen:
            log.warning("%s: given more than once; used once", Path(path).name)
            continue
        name = frame_name(path)
        if name in seen.values():
            log.warning("%s: a frame of the same name was already given; this copy is "
                        "ignored", Path(path).name)
            continue
        seen[key] = name
        # absolute: workers (another host, another working directory) open it by path
        unique.append(str(Path(path).absolute()))
    return unique


def _fields(metas: list[FrameMeta], radius_deg: float) -> list[list[FrameMeta]]:
    """Group frames whose pointings lie within ``radius_deg`` (one catalog per group)."""
    from astropy.coordinates import SkyCoord

    groups: list[tuple[SkyCoord, list[FrameMeta]]] = []
    for meta in metas:
        centre = _frame_centre(meta)
        for coord, members in groups:
            if centre is not None and coord.separation(centre).deg < radius_deg:
                members.append(meta)
                break
        else:
            groups.append((centre, [meta]))
    return [members for _, members in groups]


def _frame_centre(meta: FrameMeta):
    from astropy.coordinates import SkyCoord

    try:
        wcs = meta.header_wcs()
        ra, dec = wcs.pixel_to_world_values((meta.shape[1] - 1) / 2, (meta.shape[0] - 1) / 2)
        return SkyCoord(float(ra), float(dec), unit="deg")
    except (FrameError, ValueError):
        if meta.ra is not None and meta.dec is not None:
            return SkyCoord(meta.ra, meta.dec, unit="deg")
        return None


def _field_catalog(members: list[FrameMeta], source: str, settings: Settings, cache_dir):
    """The reference catalog for one group of frames (file, or service query, cached)."""
    from astropy.coordinates import SkyCoord

    centres = [c for c in (_frame_centre(m) for m in members) if c is not None]
    if not centres:
        raise catalogs.CatalogError(f"no pointing known for {members[0].name}")
    ra = np.array([c.ra.deg for c in centres])
    dec = np.array([c.dec.deg for c in centres])
    centre = SkyCoord(np.degrees(np.angle(np.mean(np.exp(1j * np.radians(ra))))),
                      float(np.mean(dec)), unit="deg")
    half_diag = max(
        np.hypot(*m.shape) / 2 * (m.pixscale or 1.0) * m.binning / 3600.0 for m in members
    )
    spread = max(c.separation(centre).deg for c in centres)
    radius = half_diag + spread + settings.solve.search_radius_arcmin / 60.0
    catalog_settings = dataclasses.replace(settings.catalog, cache_dir=str(cache_dir))
    # proper motion is applied per frame by solve_frame, at each frame's own epoch
    table = catalogs.reference_catalog(source, centre, radius, catalog_settings)
    if len(table) == 0:
        raise catalogs.CatalogError(
            f"no stars of catalog {Path(str(source)).name} within {radius:.3f} deg of "
            f"RA {centre.ra.deg:.4f} Dec {centre.dec.deg:+.4f} (a frame of another field?)")
    return table


# --------------------------------------------------------------------------------------
# Phases
# --------------------------------------------------------------------------------------
def inspect_frames(client, inputs, progress=_progress_none) -> list[FrameRecord]:
    records = [FrameRecord(file=str(p), name=frame_name(p)) for p in inputs]
    futures = {i: client.submit(_inspect_task, str(p), pure=False) for i, p in enumerate(inputs)}

    def on_result(i, value):
        if isinstance(value, FrameMeta):
            records[i].meta = value
            for note in value.warnings:
                log.warning("%s: %s", Path(records[i].file).name, note)
        else:
            records[i].status = "failed"
            records[i].reason = getattr(value, "reason", None) or f"unreadable: {value}"

    _gather_as_completed(client, futures, "inspect", progress, on_result)
    return records


def solve_frames(client, records: list[FrameRecord], catalog_source: str, out_dir: Path,
                 settings: Settings, progress=_progress_none, manifest=None, *,
                 needs_exptime: bool = False) -> None:
    """Solve every inspected frame not solved yet; write ``<name>.wcs`` for each success.

    Frames whose header already says they cannot work (a broken WCS, no start for the
    solver, no EXPTIME when ``needs_exptime``) fail here, before any pixel is read."""
    for r in records:
        if r.meta is not None and r.result is None:
            reason = unusable_reason(r.meta, needs_exptime=needs_exptime,
                                     needs_start=settings.solve.wcs == "solve")
            if reason:
                _accept_solution(r, _failure(r.meta, reason), out_dir)
    todo = [r for r in records if r.meta is not None and r.result is None]
    if settings.solve.wcs == "header":
        # nothing to solve and no pixel to read: the header WCS, checked, as it is (the
        # sky level is measured later, while the frame is registered)
        for r in todo:
            try:
                r.meta.header_wcs()
            except FrameError as err:
                _accept_solution(r, _failure(r.meta, f"header WCS unusable: {err.reason}"),
                                 out_dir)
                continue
            _accept_solution(r, SolveResult(
                name=r.meta.name, path=r.meta.path, filter=r.meta.filter, status="ok",
                wcs_header=r.meta.wcs_header, method="header"), out_dir)
        if manifest is not None:
            write_manifest(records, manifest)
        return
    if not todo:
        return
    cache_dir = settings.catalog.cache_dir or str(out_dir / "catalog-cache")
    field_radius = max(settings.solve.search_radius_arcmin / 60.0, 0.25)
    futures = {}
    catalog_of = {}  # frame name -> future of its field's catalog
    todo_by_name = {r.name: r for r in todo}
    for members in _fields([r.meta for r in todo], field_radius):
        try:
            catalog = _field_catalog(members, catalog_source, settings, cache_dir)
        except catalogs.CatalogError as err:
            for meta in members:
                _accept_solution(todo_by_name[meta.name], _failure(meta, str(err)), out_dir)
            continue
        # a task holding the (small) table, not scatter: the scheduler can recompute
        # it if every worker holding it is lost (scattered data would be gone)
        catalog = client.submit(_catalog_task, catalog, pure=False)
        for meta in members:
            catalog_of[meta.name] = catalog
            futures[meta.name] = client.submit(_solve_task, meta, catalog, settings,
                                               pure=False)
    by_name = {r.name: r for r in records}
    last_write = [0.0]

    def on_result(name, value):
        record = by_name[name]
        if not isinstance(value, SolveResult):
            value = _failure(record.meta, f"unexpected error: {value}")
        _accept_solution(record, value, out_dir)
        if manifest is not None and time.monotonic() - last_write[0] > 2.0:
            write_manifest(records, manifest)
            last_write[0] = time.monotonic()

    _gather_as_completed(client, futures, "solve", progress, on_result)
    # Second chance for frames with too little evidence on their own (a u-band frame
    # shows a few catalog stars among many cosmic rays and hot pixels): keep only the
    # sources also seen in other exposures of the same pointing and filter.
    retry = {}
    for record, partners in _companion_groups(records, catalog_of):
        companions = [client.submit(_detect_task, p.meta, settings, pure=False)
                      for p in partners]
        retry[record.name] = client.submit(_solve_task, record.meta, catalog_of[record.name],
                                           settings, companions, pure=False)
    if retry:
        _gather_as_completed(client, retry, "solve+companions", progress, on_result)
    for r in records:
        if r.meta is not None and r.result is None:
            r.result = _failure(r.meta, "not solved")
            r.status, r.reason = "failed", r.result.reason
    if manifest is not None:
        write_manifest(records, manifest)


COMPANION_RADIUS_DEG = 2.0 / 60  # exposures whose pointings agree this well: one pointing


def _companion_groups(records, catalog_of):
    """Failed frames that other exposures of the same pointing, filter and camera may
    help solve, each with those exposures (solved or not)."""
    pending = [r for r in records if r.status == "failed" and r.meta is not None
               and r.name in catalog_of and r.result is not None and r.result.n_detections]
    out = []
    for record in pending:
        m = record.meta
        if m.ra is None or m.dec is None:
            continue
        partners = [
            p for p in records
            if p is not record and p.meta is not None and p.meta.filter == m.filter
            and p.meta.instrument == m.instrument and p.meta.ra is not None
            and p.meta.dec is not None
            and _separation_deg(m.ra, m.dec, p.meta.ra, p.meta.dec) < COMPANION_RADIUS_DEG
        ]
        if partners:
            out.append((record, partners))
    return out


def _separation_deg(ra1, dec1, ra2, dec2) -> float:
    ra1, dec1, ra2, dec2 = np.radians([ra1, dec1, ra2, dec2])
    cos = (np.sin(dec1) * np.sin(dec2) + np.cos(dec1) * np.cos(dec2) * np.cos(ra1 - ra2))
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))


def _accept_solution(record: FrameRecord, result: SolveResult, out_dir: Path) -> None:
    record.result = result
    if result.status == "ok":
        record.status, record.reason = "ok", ""
        write_wcs_file(result, out_dir / f"{record.name}.wcs")
        _record_output(out_dir, out_dir / f"{record.name}.wcs")
    else:
        record.status, record.reason = "failed", result.reason
        log.warning("%s: %s", Path(record.file).name, result.reason)


def choose_grid(records: list[FrameRecord], settings: Settings) -> Grid:
    solved = [r for r in records if r.status == "ok"]
    footprints = [(r.meta.shape, _wcs_from_text(r.result.wcs_header, r.meta.shape))
                  for r in solved]
    return make_grid(footprints, settings.grid, names=[r.name for r in solved])


def register_frames(client, records: list[FrameRecord], grid: Grid, store_path: Path,
                    settings: Settings, progress=_progress_none, manifest=None):
    """Reproject every solved frame into the store (frames already registered are kept)."""
    from .register import frame_tiles

    for r in records:
        if r.status == "ok" and not frame_tiles(_wcs_from_text(r.result.wcs_header, r.meta.shape),
                                                r.meta.shape, grid, settings.register.tile):
            r.status, r.registered = "failed", False
            r.reason = f"does not overlap the output grid ({settings.grid.method} grid)"
            log.warning("%s: %s", Path(r.file).name, r.reason)
    solved = [r for r in records if r.status == "ok"]
    filters: dict[str, list[str]] = {}
    for r in solved:
        filters.setdefault(r.meta.filter, []).append(r.name)
    frame_info = {r.name: _frame_info(r) for r in solved}
    params = {"register": dataclasses.asdict(settings.register)}
    try:  # read before create_store, which resets the params of a store it reuses
        previous = store_mod.open_store(store_path)
    except store_mod.StoreError:
        previous = None
    stack = store_mod.create_store(store_path, grid, frame_info, filters,
                                   tile=settings.register.tile, params=params,
                                   footprint=settings.register.method != "interp")
    reused = (previous is not None and previous.grid.fingerprint == grid.fingerprint
              and previous.tile == stack.tile and previous.filters == filters
              and previous.params.get("register") == params["register"])
    registered_before = set(previous.params.get("registered", [])) if reused else set()
    stack.params["registered"] = sorted(registered_before & {r.name for r in solved})
    futures = {}
    for r in solved:
        if r.registered and r.name in registered_before:
            continue
        r.registered = False
        filter_name, index = stack.index_of(r.name)
        futures[r.name] = client.submit(_register_task, r.meta, r.result.wcs_header, grid,
                                        str(store_path), filter_name, index, settings,
                                        pure=False, retries=1)
    by_name = {r.name: r for r in records}

    def on_result(name, value):
        record = by_name[name]
        if isinstance(value, BaseException):
            record.status = "failed"
            record.reason = f"registration failed: {getattr(value, 'reason', value)}"
            log.warning("%s: %s", record.name, record.reason)
            return
        record.registered, record.t_register = True, value[1]
        if value[2] is not None:  # header-WCS frames: the sky measured while registering
            record.result.background, record.result.noise = value[2]
            stack.frames[name] = _frame_info(record)
        if time.monotonic() - last_write[0] > 2.0:  # O(N) writes, not O(N^2)
            _checkpoint_registered(stack, solved, records, manifest)
            last_write[0] = time.monotonic()

    last_write = [time.monotonic()]
    _gather_as_completed(client, futures, "register", progress, on_result)
    _checkpoint_registered(stack, solved, records, manifest)
    return stack


def _checkpoint_registered(stack, solved, records, manifest) -> None:
    """Record which frames are in the store: the store first, then the manifest (a frame
    is skipped on resume only when both say so)."""
    stack.params["registered"] = [r.name for r in solved if r.registered]
    store_mod.update_frames(stack, {})
    if manifest is not None:
        write_manifest(records, manifest)


def _frame_info(record: FrameRecord) -> dict:
    meta, res = record.meta, record.result
    return {
        "file": record.file, "filter": meta.filter, "exptime": meta.exptime,
        "date_obs": meta.date_obs, "mjd": meta.mjd, "gain": meta.gain,
        "rdnoise": meta.rdnoise, "background": _finite(res.background),
        "flux_ratio": _finite(res.flux_ratio), "fwhm_px": _finite(res.fwhm_px),
        "site": meta.site, "telescope": meta.telescope, "instrument": meta.instrument,
    }


def _finite(value):
    return float(value) if value is not None and np.isfinite(value) else None


def combine_store(client, store_path: Path, out_dir: Path, settings: Settings,
                  progress=_progress_none) -> dict[str, Path]:
    """Combine every filter of a store into ``coadd_<filter>.fits`` (no reprojection)."""
    import dask.array as da

    stack = store_mod.open_store(store_path)
    cs = settings.combine
    outputs = {}
    registered = set(stack.params.get("registered", [])) or None
    filters = list(stack.filters.items())
    progress("combine", 0, len(filters))
    for done, (filter_name, names) in enumerate(filters, 1):
        keep = [i for i, n in enumerate(names) if registered is None or n in registered]
        if not keep:
            continue
        data_arr, foot_arr = stack.arrays(filter_name)
        block = _combine_tile(stack.tile, len(keep), stack.grid.shape)
        # each task reads its whole (frames, block, block) slab straight from the store:
        # no rechunking, nothing moves between workers
        data = da.from_zarr(data_arr, chunks=(data_arr.shape[0], block, block))
        foot = (None if foot_arr is None else
                da.from_zarr(foot_arr, chunks=(foot_arr.shape[0], block, block)))
        if len(keep) < data_arr.shape[0]:
            data = data[keep]
            foot = None if foot is None else foot[keep]
        infos = [stack.frames[names[i]] for i in keep]
        scales = _scales(cs, infos)
        key = store_mod.filter_key(filter_name)
        group = stack.group("r+")
        ny, nx = stack.grid.shape
        sources, targets, paths = [], [], []
        # several methods share one read of each slab: one graph, one compute
        for n_method, method in enumerate(cs.methods):
            frame_weights = None
            if method == "weighted":
                frame_weights = combine.inverse_variance_weights(
                    gain=[f["gain"] for f in infos], rdnoise=[f["rdnoise"] for f in infos],
                    sky=[_or_nan(f["background"]) for f in infos], scale=scales.scales)
            result = combine.combine_stack(
                data, foot, method=method, sigma=cs.sigma, iters=cs.iters,
                cenfunc=cs.cenfunc, nlow=cs.nlow, nhigh=cs.nhigh, scales=scales.scales,
                offsets=scales.offsets, frame_weights=frame_weights)
            suffix = "" if n_method == 0 else f"_{method}"
            pair = []
            for name in ("image", "weight"):
                pair.append(group.create_array(
                    f"coadd/{key}{suffix}/{name}", shape=(ny, nx), chunks=(block, block),
                    dtype="float32", fill_value=np.nan if name == "image" else 0.0,
                    overwrite=True))
            sources += [result.image.astype("float32"), result.weight.astype("float32")]
            targets.append(pair)
            paths.append((method, out_dir / f"coadd_{key}{suffix}.fits"))
        da.store(sources, [t for pair in targets for t in pair], lock=False, compute=True)
        for (method, path), (image, weight) in zip(paths, targets, strict=True):
            header = _coadd_header(stack, filter_name, [names[i] for i in keep], infos,
                                   dataclasses.replace(cs, method=method), scales)
            _write_coadd_fits(path, header, image, weight)
            _record_output(out_dir, path)
        outputs[filter_name] = paths[0][1]
        progress("combine", done, len(filters))
    if len(outputs) >= 3:  # colourise, as the tutorial does with its bands
        from .report import colour_composite

        colour = colour_composite({f: str(p) for f, p in outputs.items()},
                                  out_dir / "colour.png")
        if colour is not None:
            _record_output(out_dir, out_dir / "colour.png")
    return outputs


def _scales(cs, infos):
    """Per-frame scales/offsets; a clear error names the frame whose record lacks a value."""
    def values(key):
        out = np.array([_or_nan(f.get(key)) for f in infos])
        bad = [f["file"] for f, v in zip(infos, out, strict=True) if not np.isfinite(v)]
        if bad and (cs.scale in _NEEDS.get(key, ()) or (key == "background"
                                                       and cs.subtract_background)):
            raise RunError(f"--scale {cs.scale}: no {key} known for {Path(bad[0]).name}")
        return out

    exptime, sky, ratio = values("exptime"), values("background"), values("flux_ratio")
    if cs.scale == "photometric":
        ratio = ratio / np.median(ratio)  # the coadd is in the units of a typical frame
    return combine.frame_scales(cs.scale, exptime=exptime, sky=sky, flux_ratio=ratio,
                                subtract_background=cs.subtract_background,
                                n_frames=len(infos))


_NEEDS = {"exptime": ("exptime",), "background": ("background",),
          "flux_ratio": ("photometric",)}


def _or_nan(value):
    return np.nan if value is None else float(value)


def _combine_tile(tile: int, n_frames: int, shape, budget_bytes: int = 384 * 2**20) -> int:
    """Output block size for the combine: a block holds all frames of a tile, so shrink
    the tile as frames are added to keep each task's memory bounded (flat in N). The
    combine needs up to ~4x its input block (sorting, masks: see combine.py)."""
    block = tile
    while block > 128 and n_frames * block * block * 4 * 4 > budget_bytes:
        block //= 2
    return min(block, max(shape))


def _coadd_header(stack, filter_name, names, infos, cs, scales) -> fits.Header:
    header = stack.grid.header
    header["FILTER"] = (filter_name, "filter of the combined frames")
    header["NCOMBINE"] = (len(names), "number of frames combined")
    exptimes = [f["exptime"] for f in infos if f.get("exptime")]
    header["EXPTIME"] = (float(np.sum(exptimes)) if exptimes else 0.0,
                         "[s] summed exposure time of the inputs")
    dates = sorted(f["date_obs"] for f in infos if f.get("date_obs"))
    if dates:
        header["DATE-OBS"] = (dates[0], "start of the first input exposure")
        header["DATE-END"] = (dates[-1], "start of the last input exposure")
    header["COMBINE"] = (cs.method, "daskstack combine method")
    header["SCALING"] = (cs.scale, "daskstack per-frame scaling")
    if cs.method == "sigclip":
        header["CLIPSIG"] = (cs.sigma, "sigma-clipping threshold")
        header["CLIPITER"] = (cs.iters, "sigma-clipping iterations")
    header["BUNIT"] = (scales.unit("electron"), "unit of the coadd")
    header["ORIGIN"] = "daskstack"
    for i, name in enumerate(names, 1):
        header[f"IMCMB{i:03d}" if i < 1000 else "HISTORY"] = name
    return header


def _write_coadd_fits(path: Path, header: fits.Header, image_array, weight_array) -> None:
    """Stream the coadd (primary HDU) and its weight map (``WEIGHT`` extension) row block by
    row block from zarr into FITS, so the client never holds the whole mosaic twice."""
    ny, nx = image_array.shape
    rows = max(1, int(64 * 2**20 // (4 * nx)))
    with atomic_path(path) as tmp:
        primary = header.copy()
        primary["SIMPLE"] = True
        primary["BITPIX"] = -32
        primary.insert(1, ("BITPIX", -32)) if "BITPIX" not in primary else None
        _stream_hdu(tmp, _image_header(primary, ny, nx, primary_hdu=True), image_array, rows)
        weight_header = fits.Header()
        weight_header["EXTNAME"] = ("WEIGHT", "frames (or summed weights) per pixel")
        for key in header:
            if key.startswith(("CTYPE", "CRVAL", "CRPIX", "CD", "PC", "CDELT", "CUNIT",
                               "LONPOLE", "LATPOLE", "RADESYS", "EQUINOX", "WCSAXES")):
                weight_header[key] = header[key]
        _stream_hdu(tmp, _image_header(weight_header, ny, nx, primary_hdu=False),
                    weight_array, rows)


def _image_header(header: fits.Header, ny: int, nx: int, primary_hdu: bool) -> fits.Header:
    hdu = fits.PrimaryHDU() if primary_hdu else fits.ImageHDU()
    out = hdu.header
    out["BITPIX"] = -32
    out["NAXIS"] = 2
    out.set("NAXIS1", nx, after="NAXIS")  # before PCOUNT/GCOUNT, as the standard says
    out.set("NAXIS2", ny, after="NAXIS1")
    if not primary_hdu:
        out["PCOUNT"] = 0
        out["GCOUNT"] = 1
    skip = {"SIMPLE", "XTENSION", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND", "PCOUNT",
            "GCOUNT"}
    for card in header.cards:
        if card.keyword in skip or card.keyword == "":
            continue
        out.append(card, end=True)
    return out


def _stream_hdu(path, header, array, rows) -> None:
    hdu = fits.StreamingHDU(str(path), header)
    ny = array.shape[0]
    for y0 in range(0, ny, rows):
        hdu.write(np.asarray(array[y0:y0 + rows], dtype=">f4"))
    hdu.close()


# --------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------
def run(inputs, catalog: str, out_dir, settings: Settings | None = None, *, client=None,
        overwrite: bool = False, progress: ProgressCallback | None = None,
        report: bool = False) -> RunResult:
    """Solve, register and combine ``inputs`` into ``out_dir``; resumable.

    Parameters
    ----------
    inputs : list of paths
        Frames (FITS or fpack); duplicates are used once, with a warning.
    catalog : str
        Path of a reference catalog file, or ``"gaia"`` / ``"gaia-tap"``.
    out_dir : path
        Run directory: ``coadd_<filter>.fits``, ``manifest.ecsv``, ``<frame>.wcs``,
        ``store.zarr``, ``run.json``.
    client : distributed.Client, optional
        Where to run; default: a cluster from ``settings.cluster`` (a LocalCluster).
    report : bool
        Also draw every frame's pictures and write ``out_dir/report/index.html``
        (`make_report`).
    """
    from .cluster import open_client

    settings = (settings or Settings()).validate()
    settings.catalog.source = catalog
    progress = progress or _progress_none
    out_dir = Path(out_dir).absolute()  # workers write the store by this path
    inputs = _dedupe(inputs)
    if not inputs:
        raise RunError("no input frames")
    resumed = _check_run_dir(out_dir, _run_signature(inputs, catalog, settings), overwrite)
    if client is None:
        with open_client(settings.cluster, local_directory=str(out_dir / ".dask"),
                         announce=getattr(progress, "notice", None)) as own:
            return _run(own, inputs, catalog, out_dir, settings, progress, resumed, report)
    return _run(client, inputs, catalog, out_dir, settings, progress, resumed, report)


def _run(client, inputs, catalog, out_dir, settings, progress, resumed,
         report=False) -> RunResult:
    result = _run_stages(client, inputs, catalog, out_dir, settings, progress, resumed)
    if report:
        start = time.perf_counter()
        try:
            make_report(client, out_dir, settings, progress=progress)
        except Exception:  # the pictures must not fail a run whose coadds are written
            log.exception("the report could not be written")
        result.timings["report"] = time.perf_counter() - start
    return result


def _run_stages(client, inputs, catalog, out_dir, settings, progress, resumed) -> RunResult:
    manifest = out_dir / "manifest.ecsv"
    timings = {}
    start = time.perf_counter()
    records = inspect_frames(client, inputs, progress)
    _check_workers_see_inputs(records)
    if resumed:
        _restore(records, manifest, out_dir)
    _check_disk_space(out_dir, estimate_output_bytes(records), "for the planned store")
    timings["inspect"] = time.perf_counter() - start

    start = time.perf_counter()
    solve_frames(client, records, catalog, out_dir, settings, progress, manifest,
                 needs_exptime=settings.combine.scale == "exptime")
    timings["solve"] = time.perf_counter() - start
    result = RunResult(out_dir=out_dir, frames=records, timings=timings)
    if not any(r.status == "ok" for r in records):
        write_manifest(records, manifest)
        return result

    start = time.perf_counter()
    result.grid = choose_grid(records, settings)
    _check_disk_space(out_dir, estimate_output_bytes(records, result.grid,
                                                     settings.register.tile),
                      f"for the {result.grid.shape[1]}x{result.grid.shape[0]} grid")
    store_path = out_dir / "store.zarr"
    register_frames(client, records, result.grid, store_path, settings, progress, manifest)
    result.store = store_path
    timings["register"] = time.perf_counter() - start

    start = time.perf_counter()
    write_manifest(records, manifest)
    result.coadds = combine_store(client, store_path, out_dir, settings, progress)
    timings["combine"] = time.perf_counter() - start
    write_manifest(records, manifest)
    return result


def _check_workers_see_inputs(records: list[FrameRecord]) -> None:
    """Every frame missing on the workers but present here: the workers do not share this
    filesystem (a remote ``--scheduler`` or batch jobs); say so instead of failing each."""
    missing = [r for r in records if r.meta is None and "does not exist" in r.reason]
    if missing and len(missing) == len(records) and all(
            Path(r.file).exists() for r in missing[:5]):
        raise RunError(
            f"the Dask workers cannot see the input files (e.g. {missing[0].file}), which "
            "exist here: put the inputs and --out on a filesystem the workers share")


def _restore(records: list[FrameRecord], manifest: Path, out_dir: Path) -> None:
    """Take back what an earlier, interrupted run of the same inputs finished."""
    table = read_manifest(manifest)
    if table is None:
        return
    rows = {row["name"]: row for row in table}
    for record in records:
        row = rows.get(record.name)
        if row is None or record.meta is None or row["status"] != "ok":
            continue
        wcs_path = out_dir / f"{record.name}.wcs"
        if not wcs_path.exists() or not _output_verified(out_dir, wcs_path):
            continue  # written but not recorded (killed in between), or changed: solve again
        try:
            result = _from_wcs_file(record.meta, wcs_path,
                                    dict(zip(row.colnames, row, strict=True)))
        except (OSError, ValueError, KeyError):
            continue
        record.result, record.status = result, "ok"
        record.registered = bool(row["registered"])
        record.t_register = float(row["t_register"])


def run_fingerprint(path) -> str:
    """sha256 of a file, for manifests and checks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------
# One stage at a time (the `solve`, `register` and `combine` commands)
# --------------------------------------------------------------------------------------
def _with_client(settings: Settings, out_dir: Path, client, func, progress=None):
    from .cluster import open_client

    if client is not None:
        return func(client)
    with open_client(settings.cluster, local_directory=str(out_dir / ".dask"),
                     announce=getattr(progress, "notice", None)) as own:
        return func(own)


def solve_files(inputs, catalog: str, out_dir, settings: Settings | None = None, *,
                client=None, progress: ProgressCallback | None = None) -> list[FrameRecord]:
    """Astrometry only: ``OUT/<name>.wcs`` per solved frame and ``OUT/solve.ecsv`` (QA)."""
    settings = (settings or Settings()).validate()
    settings.catalog.source = catalog
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    progress = progress or _progress_none
    inputs = _dedupe(inputs)

    def work(client):
        records = inspect_frames(client, inputs, progress)
        solve_frames(client, records, catalog, out_dir, settings, progress)
        return records

    records = _with_client(settings, out_dir, client, work, progress)
    write_manifest(records, out_dir / "solve.ecsv")
    return records


def register_files(inputs, out_dir, settings: Settings | None = None, *,
                   wcs_source: str = "solved", client=None,
                   progress: ProgressCallback | None = None):
    """Reproject frames into ``OUT/store.zarr`` using ``OUT/<name>.wcs`` (from `solve_files`)
    or, with ``wcs_source='header'``, their header WCS."""
    settings = (settings or Settings()).validate()
    out_dir = Path(out_dir).absolute()  # workers write the store by this path
    out_dir.mkdir(parents=True, exist_ok=True)
    progress = progress or _progress_none
    inputs = _dedupe(inputs)

    def work(client):
        records = inspect_frames(client, inputs, progress)
        qa_rows = {}  # QA of `solve_files` (sky level, flux ratio ...) for the scaling
        for qa_name in ("solve.ecsv", "manifest.ecsv"):
            table = read_manifest(out_dir / qa_name)
            if table is not None:
                qa_rows.update({row["name"]: dict(zip(table.colnames, row, strict=True))
                                for row in table if row["status"] == "ok"})
        for record in records:
            if record.meta is None:
                continue
            wcs_file = out_dir / f"{record.name}.wcs"
            if wcs_source == "header":
                continue  # solve_frames below takes the header WCS as it is
            try:
                if wcs_file.exists():
                    record.result = _from_wcs_file(record.meta, wcs_file,
                                                   qa_rows.get(record.name))
                else:
                    record.result = _failure(
                        record.meta, f"no solved WCS ({wcs_file.name}); run daskstack solve "
                        "first or use --wcs header")
            except (OSError, ValueError) as err:
                record.result = _failure(record.meta, f"unreadable {wcs_file.name}: {err}")
            record.status = record.result.status
            record.reason = record.result.reason
        if wcs_source == "header":
            settings.solve.wcs = "header"
            solve_frames(client, records, "", out_dir, settings, progress)
        if not any(r.status == "ok" for r in records):
            raise RunError("no frame has a usable WCS: " + "; ".join(
                f"{r.name}: {r.reason}" for r in records[:3]))
        grid = choose_grid(records, settings)
        return register_frames(client, records, grid, out_dir / "store.zarr", settings,
                               progress)

    return _with_client(settings, out_dir, client, work, progress)


def combine_store_path(store_path, out_dir, settings: Settings | None = None, *, client=None,
                       progress: ProgressCallback | None = None) -> dict[str, Path]:
    """Combine an existing store again (other method or scaling) without reprojecting."""
    settings = (settings or Settings()).validate()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return _with_client(settings, out_dir, client, lambda c: combine_store(
        c, Path(store_path).absolute(), out_dir, settings, progress or _progress_none),
        progress)


# --------------------------------------------------------------------------------------
# The report: pictures as tasks, the page on the client (daskstack.report draws)
# --------------------------------------------------------------------------------------
def make_report(client, run_dir, settings: Settings | None = None, *, frames: bool = True,
                progress: ProgressCallback | None = None) -> Path:
    """Draw the pictures and write ``RUN_DIR/report/index.html``; nothing is recomputed.

    Reads the manifest, ``run.json``, the ``<name>.wcs`` files, the coadds and the store.
    Each frame's pictures (``frames=True``; else pictures made earlier are linked) and
    each per-run picture is one task that gets paths and the scattered field catalog.
    """
    from . import report as report_mod

    run_dir = Path(run_dir).absolute()
    progress = progress or _progress_none
    table = read_manifest(run_dir / "manifest.ecsv")
    if table is None:
        raise RunError(f"{run_dir}: no readable manifest.ecsv (not a daskstack run)")
    settings = settings or report_mod.run_settings(run_dir)
    frames_dir = run_dir / report_mod.REPORT_DIR / report_mod.FRAMES_DIR
    futures = {kind: client.submit(report_mod.run_safely, func, *args, pure=False)
               for kind, func, args in report_mod.run_figure_jobs(run_dir,
                                                                  settings.grid.reference)}
    if frames and len(table):
        frames_dir.mkdir(parents=True, exist_ok=True)
        records = inspect_frames(client, [str(f) for f in table["file"]], progress)
        reasons = {str(row["name"]): (str(row["status"]), "" if np.ma.is_masked(row["reason"])
                                      else str(row["reason"])) for row in table}
        catalog_of = {}
        source = settings.catalog.source
        if settings.solve.wcs != "header" and source:
            quick = dataclasses.replace(settings, catalog=dataclasses.replace(
                settings.catalog, retries=0, timeout=min(settings.catalog.timeout, 20.0)))
            cache_dir = settings.catalog.cache_dir or str(run_dir / "catalog-cache")
            radius = max(settings.solve.search_radius_arcmin / 60.0, 0.25)
            metas = [r.meta for r in records if r.meta is not None]
            for members in _fields(metas, radius):
                try:
                    catalog = client.scatter(_field_catalog(members, source, quick, cache_dir))
                except catalogs.CatalogError as err:
                    log.warning("report: no catalog for %s...: %s", members[0].name, err)
                    catalog = None
                catalog_of.update({m.name: catalog for m in members})
        for r in records:
            status, reason = reasons.get(r.name, (r.status, r.reason))
            if r.meta is None:
                status, reason = "failed", r.reason or reason
            solved = status == "ok" or reason.startswith("registration failed")
            wcs = run_dir / f"{r.name}.wcs"
            futures[f"frame:{r.name}"] = client.submit(
                report_mod.frame_task, r.file, str(wcs) if solved else None,
                catalog_of.get(r.name), settings, str(frames_dir), status, reason, r.name,
                pure=False)
    results = {}
    _gather_as_completed(client, futures, "report", progress, results.__setitem__)
    run_plots = {k: v for k, v in results.items() if not k.startswith("frame:")}
    return report_mod.write_report(run_dir, run_plots)
