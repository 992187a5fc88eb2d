"""The Dask graph: the one module that knows about Dask.

Phases, each a fan-out of small tasks over a `distributed.Client`::

    inspect   per frame: read the header (no pixels)          -> FrameMeta
    catalog   client: one reference catalog per field (cached); a small task holds it
    solve     per frame: read, detect, match, fit             -> SolveResult (WCS text + QA)
              again, with the detections of the other exposures of the same pointing,
              for frames too thin to solve alone
    fields    client: the batch's fields (`output_fields`), each its own grid, store
              and coadds (``OUT/<field>/`` when there are several)
    grid      client: one output grid per field from its solved WCSs (a mosaic: the
              optimal grid covering every pointing)
    register  per frame: reproject tile by tile into zarr    -> the tiles it covers
                                                                (+ sky level)
    combine   per output block: read only the frames over it, scale (a mosaic: sky
              levels matched over the overlaps), reject, combine -> zarr -> FITS
              (+ per frame: frame minus coadd, on request)
    report    per frame and per run: pictures, then one HTML page (on request)
    lightcurve  per block of frames: small boxes around the targets read from the store,
              aperture photometry                         -> light curves (on request)

The public functions take inputs and `Settings` (never changed: a run derives its own)
and an optional ``client`` (without one, a cluster is started from ``settings.cluster``):
`run` (every phase), `solve_files`, `register_files`, `combine_store_path` (one stage at
a time), `lightcurve_store_path` (forced photometry from the store) and `make_report`.
Each phase is a private helper on a client and the frames' `FrameRecord` list; the
stages' computation lives in their modules, the tasks here only wrap it.

Tasks carry paths and small records, never pixel arrays: workers open the files
themselves, so the graph grows with the number of frames, not with their size.
Results come back as they complete and are recorded in the run directory
(`daskstack._rundir`) as they do, so an interrupted run resumes where it stopped:
frames already solved or registered (same grid) are not computed again.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.table import Table

from . import catalogs, combine, qa
from . import store as store_mod
from ._exitcodes import EXIT_FAILED, EXIT_OK, EXIT_PARTIAL, outcome
from ._fields import (
    _companion_groups,
    _field_catalog,
    _field_radius_deg,
    _fields,
    _frame_centre,
    _night_groups,
    output_fields,
)
from ._io import as_path, local_path, remove_tree
from ._rundir import (
    ERRORS_FILE,
    EXCLUDED,
    INTERNAL_ERROR,
    ErrorLog,
    FrameRecord,
    InternalError,
    OutputLog,
    RunError,
    check_disk_space,
    check_run_dir,
    dedupe,
    dedupe_exposures,
    estimate_output_bytes,
    estimate_store_bytes,
    failure,
    field_dir,
    field_stores,
    mark_excluded,
    read_manifest,
    restore,
    result_from_wcs_file,
    run_dir_of,
    run_settings,
    run_signature,
    sha256,
    wcs_file,
    wcs_from_text,
    write_manifest,
)
from ._stats import sky_level
from ._write import coadd_header, coadd_planes, write_coadd_fits, write_difference
from .astrometry import SolveResult, solve_frame, write_wcs_file
from .combine import COMBINE_METHODS, _combine_tile, _or_nan, _scales
from .config import Settings
from .detect import frame_cosmic_rays
from .frames import FrameError, FrameMeta, frame_name, read_frame, read_meta, unusable_reason
from .grid import Grid, make_grid
from .noise import frame_noise_model
from .register import register_frame
from .sky import subtract_sky

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_PARTIAL",
    "RunError",
    "RunResult",
    "choose_grid",
    "combine_store_path",
    "lightcurve_store_path",
    "make_report",
    "reference_frame",
    "register_files",
    "run",
    "solve_files",
]

log = logging.getLogger(__name__)


ProgressCallback = Callable[[str, int, int], None]


@dataclass
class RunResult:
    """What a run produced: per-frame records, coadd paths, timings."""

    out_dir: Path
    frames: list[FrameRecord]
    coadds: dict[str, Path] = field(default_factory=dict)
    store: Path | None = None
    grid: Grid | None = None
    timings: dict[str, float] = field(default_factory=dict)
    written: list[Path] = field(default_factory=list)  # every coadd/picture combine wrote
    stores: list[Path] = field(default_factory=list)  # one per field (``store``: the only)

    @property
    def n_ok(self) -> int:
        return sum(f.status == "ok" for f in self.frames)

    @property
    def n_failed(self) -> int:
        return sum(f.status == "failed" for f in self.frames)

    @property
    def n_solved(self) -> int:
        """Frames with a WCS (solved, or a header WCS taken as good), registered or not."""
        return sum(f.result is not None and f.result.status == "ok" for f in self.frames)

    @property
    def n_combined(self) -> int:
        """Frames whose pixels are in a coadd: registered, and their filter combined."""
        return sum(f.status == "ok" and f.registered and f.meta is not None
                   and coadd_name(f.field, f.meta.filter) in self.coadds for f in self.frames)

    @property
    def n_errors(self) -> int:
        """Frames that failed on an internal error (a bug; tracebacks in errors.log)."""
        return sum(f.status == "failed" and f.reason.startswith(INTERNAL_ERROR)
                   for f in self.frames)

    @property
    def errors_log(self) -> Path:
        return self.out_dir / ERRORS_FILE

    @property
    def exit_code(self) -> int:
        # usable = combined: frames solved but never in a coadd are no result
        return outcome(self.n_combined, self.n_failed)

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


def _with_zero_point(frame, result: SolveResult, catalog: Table, settings: Settings,
                     detections=None) -> SolveResult:
    """The solved frame's zero point (`daskstack.photcal`) into its result, measured from
    the pixels and detections already in memory: no frame is read twice."""
    from .photcal import calibrate_frame

    if result.ok and settings.photometry.zero_points:
        zp = calibrate_frame(frame, result.wcs, catalog, result.fwhm_px,
                             detections=detections, settings=settings)
        result.zp, result.zp_err, result.n_zp = zp.zp, zp.zp_err, zp.n_zp
        result.zp_band, result.zp_reason = zp.band, zp.reason
        result.airmass, result.zp_stars = zp.airmass, zp.stars
    elif result.ok:
        result.zp_reason = "not measured (--no-zero-points)"
    return result


def _solve_task(meta: FrameMeta, catalog: Table, settings: Settings, companions=None):
    from .detect import detect_sources

    try:
        frame = read_frame(meta.path)
        if companions is not None:  # exposures that could not be read give None
            companions = [c for c in companions if c is not None] or None
        detections = detect_sources(frame, settings.detect)
        result = solve_frame(frame, catalog, settings, companions=companions,
                             detections=detections)
        return _with_zero_point(frame, result, catalog, settings, detections)
    except FrameError as err:
        return failure(meta, err.reason)
    except Exception as err:  # a bug: reported apart (errors.log), the batch goes on
        return InternalError.from_exception("solving", err)


def _constrained_task(meta: FrameMeta, catalog: Table, settings: Settings, prior,
                      companions, night_detections, night_wcs_headers):
    """Solve a thin frame with its camera's geometry that night (`solve_constrained`);
    the solved exposures' detections, mapped by their WCS, add the night's stars."""
    from .astrometry import night_sources, solve_constrained

    try:
        frame = read_frame(meta.path)
        companions = [c for c in companions if c is not None] or None
        pairs = [(d, wcs_from_text(h, d.shape)) for d, h in
                 zip(night_detections, night_wcs_headers, strict=True) if d is not None]
        night = night_sources([d for d, _ in pairs], [w for _, w in pairs],
                              radius_arcsec=2.0 * prior.scale_arcsec) if pairs else None
        result = solve_constrained(frame, catalog, prior, settings, companions=companions,
                                   night=night)
        return _with_zero_point(frame, result, catalog, settings)
    except FrameError as err:
        return failure(meta, err.reason)
    except Exception as err:  # a bug: reported apart (errors.log), the batch goes on
        return InternalError.from_exception("solving", err)


def _difference_task(store_path: str, filter_name: str, index: int, scale: float,
                     offset: float, coadd_key: str, path: str, header_text: str) -> str:
    """One frame, scaled as in the coadd, minus the coadd: ``path`` (FITS, grid WCS)."""
    from astropy.io import fits

    write_difference(store_path, filter_name, index, scale, offset, coadd_key, path,
                     fits.Header.fromstring(header_text))
    return path


def _detect_task(meta: FrameMeta, settings: Settings):
    """Detections of one frame, to help solve another exposure of the same pointing."""
    from .detect import detect_sources

    try:
        return detect_sources(read_frame(meta.path), settings.detect)
    except FrameError:
        return None


def _register_task(meta: FrameMeta, wcs_header: str, grid: Grid, store_path: str,
                   filter_name: str, index: int, settings: Settings, measure_sky: bool):
    from ._cluster import freeze_worker_heap

    start = time.perf_counter()
    freeze_worker_heap()
    try:
        frame = read_frame(meta.path)
        wcs = wcs_from_text(wcs_header, frame.data.shape)
        rs = settings.register
        variance, noise = frame_noise_model(frame, gain=rs.gain, rdnoise=rs.rdnoise)
        if rs.clean_cosmics:
            hits = frame_cosmic_rays(frame, noise["gain"], noise["rdnoise"])
            frame = dataclasses.replace(frame, mask=frame.mask | hits)
            variance[hits] = np.nan
        # the sky the chosen model removes before resampling (the noise model above keeps
        # its Poisson noise; the sky level measured below is the frame's own)
        # a frame taken with its header WCS was never detected on (``measure_sky``): measure
        # its sky here, from the pixels already in memory, rather than read it a second
        # time; before registration, which may NaN the frame's bad pixels in place
        sky = sky_level(frame.data, frame.mask) if measure_sky else None
        data = subtract_sky(frame.data, frame.mask, rs.background, rs.background_mesh)
        written = []  # the store tiles this frame covers: the combine reads only those

        def tiles():
            # copy=False: the frame's pixels are not used after this (saves a frame copy)
            for t in register_frame(data, frame.mask, wcs, grid, rs,
                                    conserve_flux=rs.conserve_flux,
                                    seed=index, variance=variance, copy=False):
                written.append([int(t.y0), int(t.x0)])
                yield t.y0, t.x0, t.data, t.footprint, t.variance, t.kernel_power

        store_mod.write_tiles(store_path, filter_name, index, tiles())
    except (FrameError, OSError):
        raise  # the frame unreadable now, or the store's disk: the frame fails, with why
    except Exception as err:  # a bug: reported apart (errors.log), the batch goes on
        return InternalError.from_exception("registering", err)
    return written, time.perf_counter() - start, sky


# --------------------------------------------------------------------------------------
# Helpers on the client
# --------------------------------------------------------------------------------------
def _progress_none(phase, done, total):
    return None


def _gather_as_completed(client, futures, phase, progress, on_result, submit_start=None):
    """Wait for futures, call ``on_result(key, value)`` as each finishes (resilient to
    lost workers: distributed retries their tasks elsewhere). ``submit_start``: the
    `time.perf_counter` when the phase began submitting them (logged: how long a
    phase of many frames takes to reach the scheduler)."""
    from distributed import as_completed

    total = len(futures)
    if submit_start is not None:
        log.info("%s: %d tasks submitted in %.2f s", phase, total,
                 time.perf_counter() - submit_start)
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


# --------------------------------------------------------------------------------------
# Phases
# --------------------------------------------------------------------------------------
def _inspect_frames(client, inputs, progress=_progress_none) -> list[FrameRecord]:
    records = [FrameRecord(file=str(p), name=frame_name(p)) for p in inputs]
    submit_start = time.perf_counter()
    futures = {i: client.submit(_inspect_task, str(p), pure=False) for i, p in enumerate(inputs)}

    def on_result(i, value):
        if isinstance(value, FrameMeta):
            records[i].meta = value
            for note in value.warnings:
                log.warning("%s: %s", Path(records[i].file).name, note)
        else:
            records[i].refusal = getattr(value, "reason", None) or f"unreadable: {value}"

    _gather_as_completed(client, futures, "inspect", progress, on_result, submit_start)
    return dedupe_exposures(records)


def _solve_frames(client, records: list[FrameRecord], out_dir: Path, settings: Settings,
                  progress=_progress_none, manifest=None, *, needs_exptime: bool = False,
                  output_log: OutputLog | None = None, errors: ErrorLog | None = None) -> None:
    """Solve every inspected frame not solved yet against ``settings.catalog.source``;
    write ``<name>.wcs`` for each success.

    Frames whose header already says they cannot work (a broken WCS, no start for the
    solver, no EXPTIME when ``needs_exptime``, a header WCS that its own header calls
    failed when that WCS is to be used as it is) fail here, before any pixel is read.
    A frame whose solving raised unexpectedly fails with an INTERNAL_ERROR reason and
    its traceback goes to ``errors`` (``OUT/errors.log``)."""
    output_log = output_log or OutputLog(out_dir)
    errors = errors or ErrorLog(output_log)
    catalog_source = settings.catalog.source
    wcs_source = settings.solve.wcs_source(catalog_source)
    for r in records:
        if r.meta is not None and r.result is None:
            reason = unusable_reason(r.meta, needs_exptime=needs_exptime,
                                     needs_start=wcs_source == "solve",
                                     trusts_header=wcs_source == "header")
            if reason:
                _accept_solution(r, failure(r.meta, reason), output_log)
    todo = [r for r in records if r.meta is not None and r.result is None]
    if wcs_source == "header":
        # nothing to solve and no pixel to read: the header WCS, checked, as it is (the
        # sky level is measured later, while the frame is registered)
        for r in todo:
            try:
                r.meta.header_wcs()
            except FrameError as err:
                _accept_solution(r, failure(r.meta, f"header WCS unusable: {err.reason}"),
                                 output_log)
                continue
            _accept_solution(r, SolveResult(
                name=r.meta.name, path=r.meta.path, filter=r.meta.filter, status="ok",
                wcs_header=r.meta.wcs_header, method="header",
                zp_reason="not measured: the header WCS was used, no catalog stars matched"),
                output_log)
        if manifest is not None:
            write_manifest(records, manifest)
        return
    if not todo:
        return
    cache_dir = settings.catalog.cache_dir or _catalog_cache(out_dir)
    field_radius = _field_radius_deg(settings)
    futures = {}
    catalog_of = {}  # frame name -> future of its field's catalog
    todo_by_name = {r.name: r for r in todo}
    for members in _fields([r.meta for r in todo], field_radius):
        try:
            catalog = _field_catalog(members, catalog_source, settings, cache_dir)
        except catalogs.CatalogError as err:
            # one cause for the whole field: said once, not once per frame
            names = [m.name for m in members]
            log.warning("%d frame(s) not solved (%s%s): %s", len(names), ", ".join(names[:3]),
                        ", ..." if len(names) > 3 else "", err)
            for meta in members:
                _accept_solution(todo_by_name[meta.name], failure(meta, str(err)), output_log,
                                 announce=False)
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
        if isinstance(value, BaseException):  # the task itself failed (a lost worker ...)
            value = InternalError.from_exception("solving", value)
        if isinstance(value, InternalError):
            errors.add(name, value)
            value = failure(record.meta, value.reason)
        _accept_solution(record, value, output_log)
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
    def on_retry(name, value):
        # only a success or a bug replaces the first answer, whose reason says more
        if not isinstance(value, SolveResult) or value.status == "ok":
            on_result(name, value)

    if retry:
        _gather_as_completed(client, retry, "solve+companions", progress, on_retry)
    _solve_constrained(client, records, catalog_of, settings, progress, on_retry)
    for r in records:
        if r.meta is not None and r.result is None:
            r.result = failure(r.meta, "not solved")
    _fit_zero_points(records, settings)
    if manifest is not None:
        write_manifest(records, manifest)


def _fit_zero_points(records: list[FrameRecord], settings: Settings) -> None:
    """The zero points of the frames solved now, fitted with one colour term per filter,
    camera and night (`daskstack.photcal.fit_zero_points`; the QA's groups of comparable
    frames) from the stars each frame's task measured."""
    from .photcal import fit_zero_points

    if not settings.photometry.colour_term:
        return
    groups: dict[str, list[FrameRecord]] = {}
    for r in records:
        if r.result is not None and r.result.ok and r.result.zp_stars is not None:
            groups.setdefault(qa.frame_group(r.row()), []).append(r)
    for group, members in groups.items():
        fits = fit_zero_points([r.result.zp_stars for r in members], members[0].result.zp_band,
                               settings.photometry)
        for r, zp in zip(members, fits, strict=True):
            r.result.zp, r.result.zp_err, r.result.n_zp = zp.zp, zp.zp_err, zp.n_zp
            r.result.zp_reason = zp.reason
        log.info("%s: colour term %.3f (g-r) from %d frame(s)", group, fits[0].colour_term,
                 len(members))


def _solve_constrained(client, records, catalog_of, settings, progress, on_result) -> None:
    """Third chance for the frames still failed: the scale, rotation and distortion of
    their camera's solved exposures that night, only the shift searched
    (`daskstack.astrometry.solve_constrained`); ``method='constrained'`` when it works."""
    from .astrometry import geometry_prior

    detections = {}  # one detection task per frame, shared by every group that uses it

    def detected(record):
        if record.name not in detections:
            detections[record.name] = client.submit(_detect_task, record.meta, settings,
                                                    pure=False)
        return detections[record.name]

    tasks = {}
    for record, geometry, near, thin in _night_groups(records, catalog_of):
        solved = []
        for s in geometry:
            centre = _frame_centre(s.meta)
            if centre is not None:
                solved.append((s.name, wcs_from_text(s.result.wcs_header, s.meta.shape),
                               (centre.ra.deg, centre.dec.deg)))
        try:
            prior = geometry_prior(solved, record.meta.shape)
        except ValueError as err:
            log.info("%s: no constrained solve: %s", record.name, err)
            continue
        tasks[record.name] = client.submit(
            _constrained_task, record.meta, catalog_of[record.name], settings, prior,
            [detected(p) for p in thin], [detected(s) for s in near],
            [s.result.wcs_header for s in near], pure=False)
    if tasks:
        _gather_as_completed(client, tasks, "solve+night", progress, on_result)


def _accept_solution(record: FrameRecord, result: SolveResult, output_log: OutputLog,
                     announce: bool = True) -> None:
    record.result = result  # the record's status and reason follow from it
    if result.status == "ok":
        path = wcs_file(output_log.out_dir, record)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_wcs_file(result, path, record.meta.shape if record.meta else None)
        output_log.add(path)
    else:
        if announce:
            log.warning("%s: %s", Path(record.file).name, result.reason)


def reference_frame(records: list[FrameRecord], settings: Settings) -> str:
    """The frame whose pixel grid is the output grid ("" unless ``grid.method`` is
    'reference'): ``grid.reference`` if given, else the best solved frame of the deepest
    filter of the main field. Main field: the pointing with the most solved frames (a
    frame of another field among the inputs must not take the grid from the rest).
    Deepest: the largest summed exposure time of its solved frames. Best: most matched
    catalog stars, then the lowest RMS; frames taken with their header WCS have no such
    QA, so among equals the longest exposure, then the first name in sort order, wins.
    Never the command-line order: one frame with a bad WCS listed first would otherwise
    set the grid of every coadd."""
    if settings.grid.method != "reference":
        return ""
    if settings.grid.reference:
        return settings.grid.reference
    solved = [r for r in records if r.status == "ok"]
    if not solved:
        return ""
    fields = _fields([r.meta for r in solved], _field_radius_deg(settings))
    main = {m.name for m in min(fields, key=lambda members: (
        -len(members), -sum(m.exptime or 0.0 for m in members),
        min(m.name for m in members)))}
    solved = [r for r in solved if r.name in main]
    depth: dict[str, float] = {}
    for r in solved:
        depth[r.meta.filter] = depth.get(r.meta.filter, 0.0) + (r.meta.exptime or 0.0)
    deepest = min(depth, key=lambda f: (-depth[f], f))

    def quality(r):
        rms = r.result.rms_arcsec
        return (-r.result.n_matches, rms if np.isfinite(rms) else np.inf,
                -(r.meta.exptime or 0.0), r.name)

    return min((r for r in solved if r.meta.filter == deepest), key=quality).name


def choose_grid(records: list[FrameRecord], settings: Settings) -> Grid:
    solved = [r for r in records if r.status == "ok"]
    names = [r.name for r in solved]
    if settings.grid.method == "reference" and solved:
        # only the reference frame's WCS is needed: do not parse thousands on the client
        wanted = reference_frame(records, settings)
        match = [r for r in solved if r.name == wanted]
        if match:  # else make_grid names the missing reference
            solved, names = match, [wanted]
    footprints = [(r.meta.shape, wcs_from_text(r.result.wcs_header, r.meta.shape))
                  for r in solved]
    return make_grid(footprints, settings.grid, names=names)


def _register_frames(client, records: list[FrameRecord], grid: Grid, store_path: Path,
                    settings: Settings, progress=_progress_none, manifest=None, *,
                    reference: str = "", errors: ErrorLog | None = None,
                    manifest_records: list[FrameRecord] | None = None, mosaic: bool = False):
    """Reproject every solved frame into the store (frames already registered are kept).

    A frame whose registration fails is all or nothing: the tiles it wrote before
    failing are cleared, and it is left out of the combine. ``reference``: the frame
    whose pixel grid ``grid`` is (recorded in the store, named in the coadd headers).
    A frame whose registering raised unexpectedly fails with an INTERNAL_ERROR reason;
    its traceback goes to ``errors`` (default ``errors.log`` beside the store).
    ``manifest_records``: every frame of the run, for the manifest (default ``records``,
    which may be one field's); ``mosaic``: the grid covers pointings that overlap only
    partly, so the combine matches the frames' sky levels (`MOSAIC`)."""
    from .register import frame_tiles

    errors = errors or ErrorLog(OutputLog(store_path.parent))

    for r in records:
        if r.status == "ok" and not frame_tiles(wcs_from_text(r.result.wcs_header, r.meta.shape),
                                                r.meta.shape, grid, settings.register.tile):
            r.registered = False
            r.refusal = f"does not overlap the output grid ({settings.grid.method} grid)"
            log.warning("%s: %s", Path(r.file).name, r.reason)
    solved = [r for r in records if r.status == "ok"]
    params = {"register": dataclasses.asdict(settings.register),
              "catalog": catalog_label(settings)}
    if catalog_label(settings):  # the system of the frames' zero points (coadd PHOTSYS)
        params["photsys"] = catalogs.photometric_system(settings.catalog.source,
                                                        settings.catalog)
    if reference:
        params["reference_frame"] = reference
    if mosaic:
        params[MOSAIC] = True
    try:  # read before create_store, which resets the params of a store it reuses
        previous = store_mod.open_store(store_path)
    except store_mod.StoreError:
        previous = None
    # the frames of a store of these frames, on this grid, keep their place (and their
    # tiles); frames added to the run (tonight's) go after them
    kept = (previous is not None and previous.grid.fingerprint == grid.fingerprint
            and previous.tile == settings.register.tile
            and {n for names in previous.filters.values() for n in names}
            <= {r.name for r in records})
    filters: dict[str, list[str]] = ({f: list(names) for f, names in previous.filters.items()}
                                     if kept else {})
    for r in solved:
        names = filters.setdefault(r.meta.filter, [])
        if r.name not in names:
            names.append(r.name)
    frame_info = {r.name: r.info() for r in solved}
    # chunks of the block the combine will read at this many frames (`chunk_layout`)
    inner = {f: _combine_tile(settings.register.tile, len(names), grid.shape,
                              methods=settings.combine.methods) for f, names in filters.items()}
    stack = store_mod.create_store(store_path, grid, frame_info, filters,
                                   tile=settings.register.tile, params=params,
                                   footprint=settings.register.method != "interp", inner=inner)
    reused = kept and previous.params.get("register") == params["register"]
    registered_before = set(previous.params.get("registered", [])) if reused else set()
    stack.params["registered"] = sorted(registered_before & {r.name for r in solved})
    tiles_before = previous.params.get(FRAME_TILES, {}) if reused else {}
    stack.params[FRAME_TILES] = {n: tiles_before[n] for n in stack.params["registered"]
                                 if n in tiles_before}
    futures = {}
    submit_start = time.perf_counter()
    for r in solved:
        if r.registered and r.name in registered_before:
            continue
        r.registered = False
        filter_name, index = stack.index_of(r.name)
        futures[r.name] = client.submit(_register_task, r.meta, r.result.wcs_header, grid,
                                        str(store_path), filter_name, index, settings,
                                        _finite(r.result.background) is None, pure=False,
                                        retries=1)
    by_name = {r.name: r for r in records}

    def on_result(name, value):
        record = by_name[name]
        if isinstance(value, BaseException) and not isinstance(value, (FrameError, OSError)):
            value = InternalError.from_exception("registering", value)
        if isinstance(value, (InternalError, BaseException)):
            if isinstance(value, InternalError):
                errors.add(name, value)
                record.refusal = value.reason
            else:
                record.refusal = f"registration failed: {getattr(value, 'reason', value)}"
                log.warning("%s: %s", record.name, record.reason)
            # the task may have written some tiles before it failed (or its worker died)
            filter_name, index = stack.index_of(name)
            store_mod.clear_frame(str(store_path), filter_name, index, frame_tiles(
                wcs_from_text(record.result.wcs_header, record.meta.shape),
                record.meta.shape, grid, stack.tile))
            return
        record.registered, record.t_register = True, value[1]
        stack.params[FRAME_TILES][name] = value[0]
        if value[2] is not None:  # header-WCS frames: the sky measured while registering
            record.result.background, record.result.noise = value[2]
            stack.frames[name] = record.info()
        if time.monotonic() - last_write[0] > 2.0:  # O(N) writes, not O(N^2)
            _checkpoint_registered(stack, solved, manifest_records, manifest)
            last_write[0] = time.monotonic()

    manifest_records = records if manifest_records is None else manifest_records
    last_write = [time.monotonic()]
    _gather_as_completed(client, futures, "register", progress, on_result, submit_start)
    _checkpoint_registered(stack, solved, manifest_records, manifest)
    return stack


def _checkpoint_registered(stack, solved, records, manifest) -> None:
    """Record which frames are in the store: the store first, then the manifest (a frame
    is skipped on resume only when both say so)."""
    stack.params["registered"] = [r.name for r in solved if r.registered]
    store_mod.update_frames(stack, {})
    if manifest is not None:
        write_manifest(records, manifest)


def catalog_label(settings: Settings) -> str:
    """The reference catalog the frames were solved against, for the coadd header:
    'gaia', 'gaia-tap' or the file's name; "" when the header WCS was used as it is."""
    source = str(settings.catalog.source or "")
    if not source or settings.solve.wcs == "header":
        return ""
    return Path(source).name


def _finite(value):
    return float(value) if value is not None and np.isfinite(value) else None


def _registered(stack) -> set[str]:
    """Frames whose pixels are in the store (stores that predate the "registered" record
    hold registered frames only)."""
    if "registered" in stack.params:
        return set(stack.params["registered"])
    return {n for names in stack.filters.values() for n in names}


def frame_selection(stack, settings: Settings, run_names=None) -> dict[str, str]:
    """``{frame name: reason}``: the registered frames of ``stack`` that
    ``settings.select`` leaves out of the coadds (names, ``--exclude-file``, quality cuts
    on each frame's QA as recorded in the store). ``run_names``: every frame of the run
    (a field's store holds some): names outside it are said to be unknown."""
    select = settings.select
    listed = {}
    if select.exclude_file:
        path = Path(select.exclude_file)
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise RunError(f"{path}: cannot read the --exclude-file ({err}); give a text "
                           "file of frame names, one a line") from None
        listed = {name: f"--exclude-file {path.name}" for name in qa.parse_name_list(text)}
    registered = _registered(stack)
    frames_qa = {name: info.to_dict() for name, info in stack.frames.items()
                 if name in registered}
    unknown = sorted({frame_name(n) for n in (*select.exclude, *listed)}
                     - set(stack.frames if run_names is None else run_names))
    if unknown:
        log.warning("not frames of this run, nothing to exclude: %s", ", ".join(unknown))
    if (math.isfinite(select.min_zp) or math.isfinite(select.max_zp)) and \
            not qa.has_zero_points(frames_qa):
        log.warning("no frame has a zero point: --min-zp/--max-zp exclude nothing")
    excluded = qa.excluded_frames(frames_qa, select, listed)
    for name, reason in excluded.items():
        log.info("%s: %s", name, reason)
    return excluded


COADD_SETTINGS = "coadds"  # store params: {coadd path: the combine settings it was made with}


def coadd_paths(stack, out_dir: Path, settings: Settings) -> dict[Path, dict]:
    """Every coadd `_combine_store` will write for ``settings``, with the combine settings
    each is made with: ``coadd_<filter>.fits`` for the first method, then
    ``coadd_<filter>_<method>.fits``."""
    registered = set(stack.params.get("registered", [])) or None
    planned = {}
    for filter_name, names in stack.filters.items():
        if not any(registered is None or n in registered for n in names):
            continue
        for n_method, method in enumerate(settings.combine.methods):
            node = store_mod.coadd_key(filter_name, "" if n_method == 0 else method)
            planned[out_dir / f"coadd_{node}.fits"] = _made_with(settings.combine, method)
    return planned


def _made_with(cs, method: str) -> dict:
    """The combine settings a coadd of ``method`` depends on (difference images aside)."""
    values = dataclasses.asdict(dataclasses.replace(cs, method=method))
    values.pop("difference")
    return values


def check_coadds_replaceable(stack, out_dir: Path, settings: Settings) -> None:
    """Raise `RunError` when a coadd `_combine_store` would write exists and was made with
    other combine settings (or settings not recorded): never replaced silently."""
    made_with = stack.params.get(COADD_SETTINGS, {})
    for path, wanted in coadd_paths(stack, out_dir, settings).items():
        if not path.exists():
            continue
        before = made_with.get(str(path.resolve()))
        if before == wanted:
            continue
        what = ("settings not recorded" if before is None else ", ".join(
            f"{name}: {before.get(name)!r} -> {value!r}" for name, value in wanted.items()
            if before.get(name) != value))
        raise RunError(f"{path} exists, made with other combine settings ({what}); "
                       "use --overwrite to replace it, or --out to write elsewhere")


def _combine_store(client, store_path: Path, out_dir: Path, settings: Settings,
                   progress=_progress_none, output_log: OutputLog | None = None,
                   written: list | None = None,
                   excluded: dict[str, str] | None = None) -> dict[str, Path]:
    """Combine every filter of a store into ``coadd_<filter>.fits`` (no reprojection).

    Every file written (coadds, differences, colour picture) is appended to ``written``
    when a list is given; the combine settings of each coadd are kept in the store.
    ``excluded``: ``{frame name: reason}`` of the frames left out (default: what
    `frame_selection` says of ``settings.select``); they are listed in the headers."""
    import dask.array as da
    from distributed import wait

    output_log = output_log or OutputLog(out_dir)
    written = [] if written is None else written

    def wrote(path, digest=None):
        output_log.add(path, digest)
        written.append(as_path(path))

    _check_store_kept(store_path)
    stack = store_mod.open_store(store_path)
    if excluded is None:
        excluded = frame_selection(stack, settings)
    cs = settings.combine
    outputs = {}
    registered = _registered(stack) - set(excluded)
    filters = list(stack.filters.items())
    progress("combine", 0, len(filters))
    for done, (filter_name, names) in enumerate(filters, 1):
        keep = [i for i, n in enumerate(names) if n in registered]
        left_out = {n: excluded[n] for n in names if n in excluded}
        if not keep:
            if left_out:
                log.warning("%s: every frame is excluded; no coadd", filter_name)
            continue
        data_arr, foot_arr = stack.arrays(filter_name)
        var_arr, power_arr = stack.variance(filter_name)
        if power_arr is None:
            raise store_mod.StoreError(
                f"{store_path}: written before daskstack stored variances; register the "
                "frames again (daskstack register, or run) to get ERR and WEIGHT maps")
        # a block holds the frames that cover it: in a mosaic a few, not all of them
        covering = _block_members(stack, [names[i] for i in keep], stack.tile)
        depth = len(keep) if covering is None else max(map(len, covering.values()))
        block = _combine_tile(stack.tile, max(depth, 1), stack.grid.shape, methods=cs.methods)
        # each task reads its whole (frames, block, block) slab straight from the store:
        # no rechunking, nothing moves between workers
        planes = store_mod.lazy_frames(stack, filter_name, (data_arr.shape[0], block, block))
        data, foot, variance, power = (planes[p] for p in store_mod.FRAME_PLANES)
        if len(keep) < data_arr.shape[0]:
            data, variance, power = data[keep], variance[keep], power[keep]
            foot = None if foot is None else foot[keep]
        infos = [stack.frames[names[i]] for i in keep]
        # the sky model the frames were registered with (stores before it: 'constant')
        scales = _scales(cs, infos, registered_background(stack))
        members = covering and _block_members(stack, [names[i] for i in keep], block)
        if members is not None and _matches_background(stack, cs):
            corrections = _sky_corrections(stack, filter_name, keep, members, block, scales)
            scales = scales._replace(
                offsets=scales.offsets - corrections,
                levels=None if scales.levels is None else scales.levels - corrections)
        # blocks that not every frame covers (a mosaic) read only the frames over them;
        # otherwise every method is combined from one read of each slab
        partial = members is not None and any(len(f) < len(keep) for f in members.values())
        key = store_mod.filter_key(filter_name)
        targets, paths = [], []
        # several methods share one read of each slab: one task per slab, one compute
        weights_of = {}
        for method in cs.methods:
            if COMBINE_METHODS[method].estimator == "weighted":
                # per pixel, the weights are the inverse variances; these per-frame sky
                # weights only give the header's effective GAIN
                weights_of[method] = combine.inverse_variance_weights(
                    gain=[f.gain for f in infos], rdnoise=[f.rdnoise for f in infos],
                    sky=[_or_nan(f.background) for f in infos], scale=scales.scales)
        common = dict(
            sigma=cs.sigma, iters=cs.iters, cenfunc=cs.cenfunc, nlow=cs.nlow, nhigh=cs.nhigh,
            scales=scales.scales, offsets=scales.offsets,
            exptime=[_or_nan(f.exptime) for f in infos], pair_sigma=cs.pair_sigma,
            pair_fraction=cs.pair_fraction, sky_levels=scales.levels)
        own = [(method, {"reject": cs.weighted_reject
                         if COMBINE_METHODS[method].rejection is None else "none"})
               for method in cs.methods]
        if partial:
            packed = da.concatenate(
                [_combine_blocks(stack, filter_name, keep, members, block,
                                 dict(common, method=method, **options))
                 for method, options in own], axis=0)
        else:
            # only inverse-variance weights use the kernel power: other methods need not
            # read (and decompress) it
            packed = combine.packed_stacks(data, foot, variance=variance,
                                           kernel_power=power if weights_of else None,
                                           methods=own, **common)
        for n_method, method in enumerate(cs.methods):
            node = store_mod.coadd_key(filter_name, "" if n_method == 0 else method)
            targets.append(store_mod.create_coadd_arrays(stack, node, block))
            paths.append((method, node, out_dir / f"coadd_{node}.fits"))
        _store_coadds(packed, targets)
        # each coadd file is written (streamed from the store, synced, hashed) by a
        # worker: the methods' files side by side, not one after another on the client
        files = [client.submit(_write_coadd_task, stack.path, node, path, coadd_header(
                     stack, filter_name, [names[i] for i in keep], infos,
                     dataclasses.replace(cs, method=method), scales, weights_of.get(method),
                     excluded=left_out), pure=False)
                 for method, node, path in paths]
        wait(files)  # a file that failed does not keep the others out of the output log
        for (method, _, path), file in zip(paths, files, strict=True):
            if file.status == "finished":
                wrote(path, file.result())
                stack.params.setdefault(COADD_SETTINGS, {})[str(as_path(path).resolve())] = (
                    _made_with(cs, method))
        for file in files:
            file.result()  # the first failure, as its writer raised it
        store_mod.update_frames(stack, {})  # records the settings of the coadds
        outputs[filter_name] = paths[0][2]
        if cs.difference:
            _write_differences(client, stack, filter_name, [names[i] for i in keep], keep,
                               scales, key, out_dir, wrote)
        progress("combine", done, len(filters))
    if len(outputs) >= 3:  # colourise, as the tutorial does with its bands
        from ._report import colour_composite

        colour = colour_composite({f: str(p) for f, p in outputs.items()},
                                  out_dir / "colour.png")
        if colour is not None:
            wrote(out_dir / "colour.png")
    return outputs


FRAME_TILES = "frame_tiles"  # store params: {frame name: [[y0, x0], ...] of its tiles}
MOSAIC = "mosaic"  # store params: the grid covers pointings that overlap only partly


def _block_members(stack, names: list[str], block: int) -> dict | None:
    """``{(y0, x0): [positions in names]}``: for each output block of size ``block``, the
    frames that cover it (from the store tiles each frame wrote while registering);
    None when the store does not record them (a store written before that record)."""
    recorded = stack.params.get(FRAME_TILES, {})
    if not all(n in recorded for n in names):
        return None
    tile = stack.tile
    ny, nx = stack.grid.shape
    members: dict[tuple[int, int], list[int]] = {
        (y0, x0): [] for y0 in range(0, ny, block) for x0 in range(0, nx, block)}
    for position, name in enumerate(names):
        for ty, tx in recorded[name]:  # a store tile holds whole combine blocks
            for y0 in range(ty, min(ty + tile, ny), block):
                for x0 in range(tx, min(tx + tile, nx), block):
                    members[(y0, x0)].append(position)
    return members


def _store_coadds(packed, targets: list[dict]) -> None:
    """Write the coadd planes (`coadd_planes`) of each method of ``packed`` (the
    ``(5 * methods, ny, nx)`` dask array of `combine.packed_stacks`) into its arrays,
    ``targets[k]`` (`store.create_coadd_arrays`, chunked as ``packed``'s blocks): each
    block becomes planes and is written by the task that combined it, while it is in
    memory; a task per plane and chunk, as a store of each plane would make, cost the
    scheduler and the workers more than their writing."""
    chunks = tuple((1,) * len(c) for c in packed.chunks)
    packed.map_blocks(_store_coadd_block, targets=targets, chunks=chunks, dtype=np.int8,
                      meta=np.empty((0, 0, 0), np.int8)).compute()


def _store_coadd_block(block, targets, block_info=None):
    (first, _), (y0, y1), (x0, x1) = block_info[0]["array-location"]
    # a mosaic's methods are blocks of their own along the first axis: ``first`` says
    # which method this block's first is
    for k, result in enumerate(combine.split_results(block), start=first // 5):
        planes = coadd_planes(result)
        for name, array in targets[k].items():
            array[y0:y1, x0:x1] = planes[name]
    return np.zeros((1, 1, 1), np.int8)


def _write_coadd_task(store_path, node: str, path, header) -> str:
    """Coadd ``node``'s FITS file at ``path`` from its planes in the store (a worker
    opens it by path); returns the file's sha256 for the output log."""
    write_coadd_fits(path, header, store_mod.open_coadd_arrays(store_path, node))
    return sha256(path)


def _matches_background(stack, cs) -> bool:
    return cs.match_background == "on" or (
        cs.match_background == "auto" and bool(stack.params.get(MOSAIC)))


def _block_frames(store_path, filter_name, rows, y0, y1, x0, x1):
    return store_mod.read_frames_block(store_path, filter_name, rows, y0, y1, x0, x1)


def _combine_block_task(read, frames, options, shape):
    if read is None:
        return combine.combine_frames([], np.empty((0,) + shape), options=options)
    return combine.combine_frames(frames, *read, options=options)


def _combine_blocks(stack, filter_name, keep, members, block, options):
    """The lazy combine of a filter, packed ``(5, ny, nx)`` as `combine.combine_result`
    reads it, each output block from one read of only the frames that cover it
    (``members``): memory per task and total work grow with the frames over the block,
    not with every frame of the mosaic."""
    import dask
    import dask.array as da

    ny, nx = stack.grid.shape
    options = dask.delayed(combine.combine_options(len(keep), **options), pure=True)
    rows = []
    for y0 in range(0, ny, block):
        row = []
        for x0 in range(0, nx, block):
            shape = (min(block, ny - y0), min(block, nx - x0))
            frames = members[(y0, x0)]
            read = None
            if frames:
                read = dask.delayed(_block_frames, pure=True)(
                    stack.path, filter_name, [keep[i] for i in frames], y0, y0 + shape[0],
                    x0, x0 + shape[1])
            task = dask.delayed(_combine_block_task, pure=True)(read, frames, options, shape)
            row.append(da.from_delayed(task, shape=(5,) + shape, dtype=np.float32))
        rows.append(row)
    return da.block(rows)


def _overlap_task(store_path, filter_name, rows, frames, scales, offsets, y0, y1, x0, x1):
    """The sky differences of the frames overlapping in one block (`overlap_differences`)
    on their values scaled as the combine scales them."""
    from .skymatch import overlap_differences

    data = store_mod.read_frames_block(store_path, filter_name, rows, y0, y1, x0, x1)[0]
    values = data * np.asarray(scales, np.float32)[:, None, None] \
        + np.asarray(offsets, np.float32)[:, None, None]
    return overlap_differences(values, frames)


def _sky_corrections(stack, filter_name, keep, members, block, scales) -> np.ndarray:
    """Per frame (of ``keep``), the sky correction that matches its level to the frames
    it overlaps (`daskstack.skymatch`), in the scaled units: subtracted from the offsets."""
    import dask

    from .skymatch import solve_offsets

    ny, nx = stack.grid.shape
    tasks = []
    for (y0, x0), frames in members.items():
        if len(frames) < 2:
            continue
        tasks.append(dask.delayed(_overlap_task, pure=True)(
            stack.path, filter_name, [keep[i] for i in frames], frames,
            scales.scales[frames], scales.offsets[frames], y0, min(y0 + block, ny), x0,
            min(x0 + block, nx)))
    pairs = [p for found in dask.compute(*tasks) for p in found]
    corrections = solve_offsets(pairs, len(keep))
    log.info("%s: sky levels matched over %d overlaps (corrections %.3g to %.3g)",
             filter_name, len(pairs), float(corrections.min(initial=0.0)),
             float(corrections.max(initial=0.0)))
    return corrections


def _write_differences(client, stack, filter_name, names, indices, scales, coadd_key,
                       out_dir, wrote) -> None:
    """``OUT/difference/<frame>.fits`` for every combined frame: one task each."""
    directory = out_dir / "difference"
    _make_directory(directory)
    header = stack.grid.header
    futures = {}
    for name, index, scale, offset in zip(names, indices, scales.scales, scales.offsets,
                                          strict=True):
        frame_header = header.copy()
        frame_header["FRAME"] = (name, "this frame minus the coadd")
        frame_header["FILTER"] = filter_name
        futures[name] = client.submit(
            _difference_task, stack.path, filter_name, index, float(scale), float(offset),
            coadd_key, str(directory / f"{name}.fits"), frame_header.tostring(), pure=False)
    _gather_as_completed(client, futures, "difference", _progress_none,
                         lambda name, path: wrote(as_path(path))
                         if isinstance(path, str) else log.warning(
                             "%s: no difference image (%s)", name, path))


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
        Also write ``out_dir/report/index.html`` and ``suggested-exclude.txt``
        (`make_report`: thumbnails of every frame, pictures of failed and flagged ones).

    Raises
    ------
    RunError
        Before any cluster starts or file is written (`check_before_work`, then the run
        directory: a `DifferentRunError` says what differs), or when the run cannot go on.
    """
    from ._cluster import open_client

    settings = _for_catalog(settings or Settings(), catalog).validate()
    progress = progress or _progress_none
    out_dir = run_location(out_dir)  # workers write the store by this path
    inputs = dedupe(inputs)
    if not inputs:
        raise RunError("no input frames")
    check_before_work(inputs, catalog, settings)
    resumed = check_run_dir(out_dir, run_signature(inputs, catalog, settings), overwrite)
    if client is None:
        with open_client(settings.cluster, local_directory=_dask_directory(out_dir),
                         announce=getattr(progress, "notice", None)) as own:
            return _run(own, inputs, out_dir, settings, progress, resumed, report)
    return _run(client, inputs, out_dir, settings, progress, resumed, report)


def run_location(out_dir):
    """The run directory as the workers reach it: an absolute local `Path`, or a URL
    (``s3://bucket/run``: `_io.as_path`), where workers and client write directly."""
    location = as_path(out_dir)
    return location.absolute() if local_path(location) is not None else location


def _make_directory(out_dir) -> None:
    """Make a local output directory (an object store has none to make)."""
    if local_path(out_dir) is not None:
        out_dir.mkdir(parents=True, exist_ok=True)


def _dask_directory(out_dir) -> str | None:
    """A local cluster's working directory: OUT/.dask; the system's temporary directory
    (Dask's default) for a run directory on an object store."""
    return str(out_dir / ".dask") if local_path(out_dir) is not None else None


def _catalog_cache(out_dir) -> str:
    """Where catalog queries are cached by default: OUT/catalog-cache, read and written
    on the client; for a run directory on an object store, the local temporary
    directory."""
    if local_path(out_dir) is not None:
        return str(out_dir / "catalog-cache")
    return str(Path(tempfile.gettempdir()) / "daskstack-catalog-cache")


def _for_catalog(settings: Settings, catalog: str) -> Settings:
    """The run's own Settings (the caller's are not changed): the catalog it was given
    as ``catalog.source``, the one place every phase reads it from, and ``solve.wcs``
    'auto' settled ('solve' with a catalog, else 'header'), so the run signature, the
    report and a resumed run all see what was done."""
    settings = settings.replace("catalog", source=catalog or "")
    return settings.replace("solve", wcs=settings.solve.wcs_source(settings.catalog.source))


def check_before_work(inputs, catalog: str, settings: Settings) -> None:
    """What can be known wrong before any cluster starts or file is written: a catalog
    file that cannot be read or whose columns do not resolve, a ``grid.reference`` that
    names no input, an ``--exclude-file`` that does not exist. Raises `RunError` saying
    what to change."""
    exclude_file = settings.select.exclude_file
    if exclude_file and not Path(exclude_file).is_file():
        raise RunError(f"{exclude_file}: --exclude-file does not exist (a text file of "
                       "frame names, one a line)")
    # a file names itself by a suffix or a directory; service names ('gaia') have none
    if catalog and (Path(catalog).suffix or Path(catalog).exists() or "/" in str(catalog)):
        try:
            catalogs.load_catalog(catalog, settings.catalog.column_map)
        except catalogs.CatalogError as err:
            raise RunError(f"catalog: {err}") from None
    reference = settings.grid.reference
    if settings.grid.method == "reference" and reference:
        names = [frame_name(p) for p in inputs]
        if reference not in names:
            hint = (f"; give the frame name {frame_name(reference)!r}"
                    if frame_name(reference) in names else "")
            shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
            raise RunError(f"--reference {reference!r} is not among the inputs ({shown})"
                           + hint)


def _run(client, inputs, out_dir, settings, progress, resumed, report=False) -> RunResult:
    result = _run_stages(client, inputs, out_dir, settings, progress, resumed)
    if report:
        start = time.perf_counter()
        try:
            _make_report(client, out_dir, settings, progress=progress)
        except Exception:  # the pictures must not fail a run whose coadds are written
            log.exception("the report could not be written")
        result.timings["report"] = time.perf_counter() - start
    if result.stores and result.coadds and not settings.register.keep_store:
        # after the report, which draws from the store; outputs.ecsv never lists the
        # store, so it stays true; combine says how to get the store back
        for store_path in result.stores:
            remove_tree(store_path)
            log.info("removed %s (--no-keep-store)", store_path)
        result.store, result.stores = None, []
    return result


def _check_store_kept(store_path: Path) -> None:
    """A run directory whose store is gone: say why and how to get it back."""
    store_path = as_path(store_path)
    if not store_path.exists() and ((store_path.parent / "run.json").exists() or (
            store_path.parent.parent / "run.json").exists()):  # a field's store: OUT/<field>/
        raise RunError(
            f"{store_path}: the registered stack was removed after the coadds were written "
            "(run with --no-keep-store); run the same 'daskstack run' command again with "
            "--keep-store to register the frames again, then combine")


def _run_stages(client, inputs, out_dir, settings, progress, resumed) -> RunResult:
    manifest = out_dir / "manifest.ecsv"
    output_log = OutputLog(out_dir)
    errors = ErrorLog(output_log)
    errors.clear()  # frames an earlier run left with an internal error are tried again
    timings = {}
    start = time.perf_counter()
    records = _inspect_frames(client, inputs, progress)
    _check_workers_see_inputs(records)
    fields = _assign_fields(records, settings)
    if resumed:
        restore(records, manifest, output_log)
    check_disk_space(out_dir, estimate_output_bytes(records), "for the planned store")
    timings["inspect"] = time.perf_counter() - start

    start = time.perf_counter()
    _solve_frames(client, records, out_dir, settings, progress, manifest,
                  needs_exptime=settings.combine.scale == "exptime", output_log=output_log,
                  errors=errors)
    timings["solve"] = time.perf_counter() - start
    result = RunResult(out_dir=out_dir, frames=records, timings=timings)
    if not any(r.status == "ok" for r in records):
        write_manifest(records, manifest)
        return result

    start = time.perf_counter()
    stores = {}  # field -> its store
    for field_name, members in fields:
        if not any(r.status == "ok" for r in members):
            continue
        directory = field_dir(out_dir, field_name)
        _make_directory(directory)
        store_path = directory / "store.zarr"
        kept = _kept_grid(store_path) if resumed else None
        if kept is not None:  # frames added to a run: registered on the grid of its coadds
            grid, reference = kept
            mosaic = bool(store_mod.open_store(store_path).params.get(MOSAIC))
        else:
            grid, reference, mosaic = _field_grid(members, settings)
        if field_name:
            log.info("field %s: %d frames, %s grid %dx%d", field_name, len(members),
                     "mosaic" if mosaic else "reference", grid.shape[1], grid.shape[0])
        result.grid = result.grid or grid
        check_disk_space(out_dir, estimate_output_bytes(members, grid,
                                                         settings.register.tile),
                         f"for the {grid.shape[1]}x{grid.shape[0]} grid")
        _announce_store_size(members, grid, settings, progress)
        stores[field_name] = store_path
        _register_frames(client, members, grid, store_path, settings, progress,
                         manifest, reference=reference, errors=errors, manifest_records=records,
                         mosaic=mosaic)
    result.stores = list(stores.values())
    result.store = stores.get("")
    timings["register"] = time.perf_counter() - start

    start = time.perf_counter()
    names = {r.name for r in records}
    excluded = {}
    for store_path in stores.values():
        excluded.update(frame_selection(store_mod.open_store(store_path), settings, names))
    for r in records:
        if r.status == "ok":  # ok, or excluded by an earlier run of these frames
            r.exclusion = excluded.get(r.name, "")
    write_manifest(records, manifest)
    for field_name, store_path in stores.items():
        coadds = _combine_store(client, store_path, field_dir(out_dir, field_name), settings,
                                progress, output_log, written=result.written,
                                excluded=excluded)
        result.coadds.update({coadd_name(field_name, f): p for f, p in coadds.items()})
    timings["combine"] = time.perf_counter() - start
    write_manifest(records, manifest)
    return result


def coadd_name(field_name: str, filter_name: str) -> str:
    """The key of a coadd in `RunResult.coadds`: its filter, ``<field>/<filter>`` in a
    batch of several fields."""
    return f"{field_name}/{filter_name}" if field_name else filter_name


def _assign_fields(records: list[FrameRecord], settings: Settings):
    """Each record's field (`output_fields`): ``[(field, [records])]``, input order."""
    fields = output_fields([r.meta for r in records if r.meta is not None], settings)
    field_of = {name: field_name for field_name, names in fields for name in names}
    for r in records:
        r.field = field_of.get(r.name, "")
    return [(f, [r for r in records if r.field == f]) for f, _ in fields]


def _field_grid(records: list[FrameRecord], settings: Settings) -> tuple[Grid, str, bool]:
    """``(grid, reference frame, mosaic)`` of one field. A mosaic (its pointings overlap
    only partly: a solved frame's centre lies outside the reference frame; or
    ``--grid optimal``) gets the optimal grid covering every frame, and its sky levels
    matched; a fixed grid (``--grid FILE``, ``--reference``) is kept as it is."""
    reference = reference_frame(records, settings)
    if settings.grid.method == "optimal":
        return choose_grid(records, settings), "", True
    if settings.grid.method == "reference" and not settings.grid.reference \
            and _is_mosaic([r for r in records if r.status == "ok"], reference):
        return choose_grid(records, settings.replace("grid", method="optimal")), "", True
    return choose_grid(records, settings), reference, False


def _is_mosaic(solved: list[FrameRecord], reference: str) -> bool:
    """True when some solved frame's centre falls outside the reference frame's grid."""
    ref = next((r for r in solved if r.name == reference), None)
    if ref is None or len(solved) < 2:
        return False
    ras, decs = [], []
    for r in solved:
        ny, nx = r.meta.shape
        ra, dec = wcs_from_text(r.result.wcs_header, r.meta.shape).pixel_to_world_values(
            (nx - 1) / 2, (ny - 1) / 2)
        ras.append(float(ra))
        decs.append(float(dec))
    x, y = wcs_from_text(ref.result.wcs_header, ref.meta.shape).world_to_pixel_values(
        np.array(ras), np.array(decs))
    ny, nx = ref.meta.shape
    inside = (x > -0.5) & (x < nx - 0.5) & (y > -0.5) & (y < ny - 0.5)
    return not bool(np.all(inside))


def _kept_grid(store_path) -> tuple[Grid, str] | None:
    """(grid, reference frame) of the store a resumed run made; None without one. A run
    to which frames were added keeps it: the frames registered are not moved, and a
    new frame is registered where it overlaps it (one wholly off it fails)."""
    try:
        stack = store_mod.open_store(store_path)
    except store_mod.StoreError:
        return None
    return stack.grid, stack.params.get("reference_frame", "")


def _announce_store_size(records, grid: Grid, settings: Settings, progress) -> None:
    """Say before registering how large the store will be (logged and, in the command,
    shown with the progress)."""
    size = estimate_store_bytes(records, grid, settings.register.tile,
                                footprint=settings.register.method != "interp")
    n_frames = sum(r.status == "ok" for r in records)
    amount = f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"
    text = (f"store: ~{amount} for {n_frames} frames on a "
            f"{grid.shape[1]}x{grid.shape[0]} grid (before compression)")
    log.info(text)
    notice = getattr(progress, "notice", None)
    if notice is not None:
        notice(text)


def registered_background(stack) -> str:
    """The sky model (`sky.BACKGROUNDS`) the frames of ``stack`` were registered
    with: 'constant' for stores written before there was a choice."""
    return (stack.params.get("register") or {}).get("background", "constant")


def _check_workers_see_inputs(records: list[FrameRecord]) -> None:
    """Every frame missing on the workers but present here: the workers do not share this
    filesystem (a remote ``--scheduler`` or batch jobs); say so instead of failing each."""
    missing = [r for r in records if r.meta is None and "does not exist" in r.reason]
    if missing and len(missing) == len(records) and all(
            as_path(r.file).exists() for r in missing[:5]):
        raise RunError(
            f"the Dask workers cannot see the input files (e.g. {missing[0].file}), which "
            "exist here: put the inputs and --out on a filesystem the workers share")


# --------------------------------------------------------------------------------------
# One stage at a time (the `solve`, `register` and `combine` commands)
# --------------------------------------------------------------------------------------
def _with_client(settings: Settings, out_dir: Path, client, func, progress=None):
    from ._cluster import open_client

    if client is not None:
        return func(client)
    with open_client(settings.cluster, local_directory=_dask_directory(out_dir),
                     announce=getattr(progress, "notice", None)) as own:
        return func(own)


def solve_files(inputs, catalog: str, out_dir, settings: Settings | None = None, *,
                client=None, progress: ProgressCallback | None = None) -> list[FrameRecord]:
    """Astrometry only: ``OUT/<name>.wcs`` per solved frame and ``OUT/solve.ecsv`` (QA)."""
    settings = (settings or Settings()).replace("catalog", source=catalog).validate()
    out_dir = run_location(out_dir)
    progress = progress or _progress_none
    inputs = dedupe(inputs)
    check_before_work(inputs, catalog, settings)
    _make_directory(out_dir)

    def work(client):
        records = _inspect_frames(client, inputs, progress)
        _solve_frames(client, records, out_dir, settings, progress)
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
    out_dir = run_location(out_dir)  # workers write the store by this path
    _make_directory(out_dir)
    progress = progress or _progress_none
    inputs = dedupe(inputs)
    # which catalog solved the .wcs files is not known here
    settings = settings.replace("catalog", source="")
    if wcs_source == "header":
        settings = settings.replace("solve", wcs="header")

    def work(client):
        records = _inspect_frames(client, inputs, progress)
        qa_rows = {}  # QA of `solve_files` (sky level, flux ratio ...) for the scaling
        for qa_name in ("solve.ecsv", "manifest.ecsv"):
            table = read_manifest(out_dir / qa_name)
            if table is not None:
                qa_rows.update({row["name"]: dict(zip(table.colnames, row, strict=True))
                                for row in table if row["status"] in ("ok", EXCLUDED)})
        for record in records:
            if record.meta is None:
                continue
            wcs_file = out_dir / f"{record.name}.wcs"
            if wcs_source == "header":
                continue  # _solve_frames below takes the header WCS as it is
            try:
                if wcs_file.exists():
                    record.result = result_from_wcs_file(record.meta, wcs_file,
                                                   qa_rows.get(record.name))
                else:
                    record.result = failure(
                        record.meta, f"no solved WCS ({wcs_file.name}); run daskstack solve "
                        "first or use --wcs header")
            except (OSError, ValueError) as err:
                record.result = failure(record.meta, f"unreadable {wcs_file.name}: {err}")
        output_log = OutputLog(out_dir)
        errors = ErrorLog(output_log)
        if wcs_source == "header":
            _solve_frames(client, records, out_dir, settings, progress,
                          output_log=output_log, errors=errors)
        if not any(r.status == "ok" for r in records):
            raise RunError("no frame has a usable WCS: " + "; ".join(
                f"{r.name}: {r.reason}" for r in records[:3]))
        grid = choose_grid(records, settings)
        return _register_frames(client, records, grid, out_dir / "store.zarr", settings,
                                progress, reference=reference_frame(records, settings),
                                errors=errors)

    return _with_client(settings, out_dir, client, work, progress)


def combine_store_path(store_path, out_dir, settings: Settings | None = None, *, client=None,
                       progress: ProgressCallback | None = None, overwrite: bool = False,
                       written: list | None = None) -> dict[str, Path]:
    """Combine an existing store again (other method or scaling) without reprojecting.

    A coadd already in ``out_dir`` made with other combine settings is replaced only
    with ``overwrite`` (else `RunError`, before any work); every file written is
    appended to ``written``."""
    settings = (settings or Settings()).validate()
    fields = field_stores(store_path)  # a run directory of several fields: each one's
    out_dir = run_location(out_dir)
    if not fields:
        fields = {"": run_location(store_path)}
        out_dirs = {"": out_dir}
    else:
        fields = {f: run_location(path) for f, path in fields.items()}
        out_dirs = {f: out_dir / f for f in fields}
    stacks = {}
    for f, path in fields.items():
        _check_store_kept(path)  # before a cluster is started for nothing
        stacks[f] = store_mod.open_store(path)  # StoreError: not a daskstack store
        if not overwrite:
            check_coadds_replaceable(stacks[f], out_dirs[f], settings)
    run_names = {n for stack in stacks.values() for n in stack.frames}
    excluded = {}
    for stack in stacks.values():
        excluded.update(frame_selection(stack, settings, run_names))

    def combine_all(client):
        outputs, output_log = {}, OutputLog(out_dir)
        for f, path in fields.items():
            _make_directory(out_dirs[f])
            coadds = _combine_store(client, path, out_dirs[f], settings,
                                    progress or _progress_none, output_log, written=written,
                                    excluded=excluded)
            outputs.update({coadd_name(f, k): p for k, p in coadds.items()})
        return outputs

    outputs = _with_client(settings, out_dir, client, combine_all, progress)
    # the run's manifest (beside the store, or above a field's) says which frames this
    # combine left out
    for f, path in fields.items():
        mark_excluded(run_dir_of(path) / "manifest.ecsv", excluded, only=set(stacks[f].frames))
    return outputs


# --------------------------------------------------------------------------------------
# Light curves: forced photometry from the store (daskstack.lightcurve computes)
# --------------------------------------------------------------------------------------
LIGHTCURVE_BLOCK = 64  # frames per task: a task per frame would cost more than its work
LIGHTCURVE_DIR = "lightcurves"


def _lightcurve_task(store_path: str, filter_name: str, start: int, stop: int, boxes, stars,
                     fwhm, scale, resampled: bool, max_fwhm: float) -> dict:
    """Photometry of every star on frames ``start:stop`` of a filter: only the boxes
    around the stars are read."""
    from .lightcurve import measure_block

    cubes = [store_mod.read_box(store_path, filter_name, start, stop, b.y0, b.y1, b.x0, b.x1)
             for b in boxes]
    return measure_block(cubes, boxes, stars, fwhm, scale=scale, resampled=resampled,
                         max_fwhm=max_fwhm)


def lightcurve_store_path(store_path, targets, names=(), settings: Settings | None = None, *,
                          catalog: str = "", client=None,
                          progress: ProgressCallback | None = None,
                          out_dir=None) -> dict[str, Path]:
    """Light curves of sky positions from a store: forced aperture photometry on every
    registered frame (`daskstack.lightcurve`), calibrated with each frame's zero point,
    and differential against comparison stars of the run's catalog.

    ``targets``: ``"RA DEC"`` strings (degrees or sexagesimal) or ``(ra, dec)`` degrees;
    ``names``: their names, in order (the others are named from their coordinates).
    Writes ``OUT/lightcurves/<name>.ecsv`` and ``<name>.png`` per target (``OUT``: the
    run directory, the store's parent, unless ``out_dir``); returns ``{name: ecsv}``.
    One task per block of `LIGHTCURVE_BLOCK` frames of a filter, reading only the store
    chunks around the stars. ``settings``: the run's (default: its ``run.json``), for
    the catalog and the cluster; ``catalog``: where to choose the comparison stars
    instead of the run's catalog (a file or a service name, as for `run`).
    """
    from . import lightcurve as lc

    store_path = Path(store_path).absolute()
    _check_store_kept(store_path)
    stack = store_mod.open_store(store_path)  # StoreError: not a daskstack store
    run_dir = store_path.parent
    out_dir = Path(out_dir).absolute() if out_dir else run_dir
    if settings is None:
        settings = run_settings(run_dir) if (run_dir / "run.json").exists() else Settings()
    if catalog:
        settings = settings.replace("catalog", source=str(catalog))
    targets = list(targets)
    if not targets:
        raise RunError("no target given: --target \"RA DEC\"")
    if len(names) > len(targets):
        raise RunError(f"{len(names)} --target-name for {len(targets)} --target")
    coords = [tuple(map(float, t)) if not isinstance(t, str) else lc.parse_target(t)
              for t in targets]
    labels = [lc.target_name(ra, dec, names[i] if i < len(names) else "")
              for i, (ra, dec) in enumerate(coords)]
    if len(set(labels)) < len(labels):
        raise RunError(f"targets with the same name: {', '.join(labels)}")
    wcs = stack.grid.wcs
    ny, nx = stack.grid.shape
    tx, ty = wcs.world_to_pixel_values([c[0] for c in coords], [c[1] for c in coords])
    stars = [lc.Star(ra, dec, float(x), float(y)) for (ra, dec), x, y in
             zip(coords, np.atleast_1d(tx), np.atleast_1d(ty), strict=True)]
    for label, star in zip(labels, stars, strict=True):
        if not (-0.5 <= star.x < nx - 0.5 and -0.5 <= star.y < ny - 0.5):
            raise RunError(f"target {label} (RA {star.ra:.5f} Dec {star.dec:+.5f}) is not "
                           f"on the grid of {store_path} ({nx}x{ny} px)")

    frames, fwhm, scale = _lightcurve_frames(stack, run_dir)
    if not len(frames):
        raise RunError(f"{store_path}: no registered frame")
    grid_scale = stack.grid.pixel_scale_arcsec
    known = fwhm[np.isfinite(fwhm)]
    # the boxes hold the sky annulus of the worst frame's seeing, up to 3x the typical
    typical = (float(np.median(known)) if len(known)
               else lc.DEFAULT_FWHM_ARCSEC / grid_scale)
    box_fwhm = (float(min(np.max(known), 3 * typical)) if len(known)
                else 2.5 * lc.DEFAULT_FWHM_ARCSEC / grid_scale)
    half = lc.star_box_half(box_fwhm)
    candidate_stars, candidates = _comparison_candidates(
        stack, settings, run_dir, stars, isolation_px=lc.ISOLATION_FWHM * typical,
        margin_px=lc.SKY_FWHM[1] * typical + 1.0, epoch_mjd=float(np.nanmedian(frames["mjd"])))
    every = stars + candidate_stars
    boxes = lc.reading_boxes(every, half, (ny, nx), (stack.tile, stack.tile))
    method = (stack.params.get("register") or {}).get("method", "interp")
    resampled = method == "interp"
    max_fwhm = (half - 2) / lc.SKY_FWHM[1]

    def work(client):
        futures = {}
        for filter_name, names_ in stack.filters.items():
            rows = np.flatnonzero(frames["filter"] == filter_name)
            if not len(rows):
                continue
            index = np.asarray(frames["index"])[rows]
            for start in range(0, int(index.max()) + 1, LIGHTCURVE_BLOCK):
                stop = min(start + LIGHTCURVE_BLOCK, len(names_))
                block_fwhm = np.full(stop - start, np.nan)
                block_scale = np.ones(stop - start)
                inside = (index >= start) & (index < stop)
                if not inside.any():
                    continue
                block_fwhm[index[inside] - start] = fwhm[rows[inside]]
                block_scale[index[inside] - start] = scale[rows[inside]]
                futures[(filter_name, start)] = client.submit(
                    _lightcurve_task, str(store_path), filter_name, start, stop, boxes, every,
                    block_fwhm, block_scale, resampled, max_fwhm, pure=False)
        results = {}
        _gather_as_completed(client, futures, "lightcurve", progress or _progress_none,
                             results.__setitem__)
        return results

    results = _with_client(settings, out_dir, client, work, progress)
    phot = {key: np.full((len(frames), len(every)), np.nan) for key in lc.PHOT_ARRAYS}
    phot["flags"] = np.full((len(frames), len(every)), lc.LC_FLAG_NO_DATA, np.int32)
    phot["fwhm"] = np.full(len(frames), np.nan)
    for (filter_name, start), value in results.items():
        if isinstance(value, BaseException):
            raise RunError(f"light curves: frames {start}.. of {filter_name} could not be "
                           f"measured: {value}") from value
        rows = np.flatnonzero((frames["filter"] == filter_name)
                              & (frames["index"] >= start)
                              & (frames["index"] < start + LIGHTCURVE_BLOCK))
        local = np.asarray(frames["index"])[rows] - start
        for key in phot:
            phot[key][rows] = value[key][local]
    tables = lc.light_curves(frames, phot, len(stars), candidates, candidate_stars)
    directory = out_dir / LIGHTCURVE_DIR
    directory.mkdir(parents=True, exist_ok=True)
    written = {}
    from ._io import atomic_path
    from ._report import lightcurve_figure

    for label, star, table in zip(labels, stars, tables, strict=True):
        table.sort("mjd")
        table.meta.update({
            "target": label, "ra": star.ra, "dec": star.dec, "x_grid": star.x,
            "y_grid": star.y, "store": str(store_path),
            "aperture": (f"radius {lc.APERTURE_FWHM:g} x each frame's FWHM (the fwhm column, "
                         f"grid pixels); sky annulus {lc.SKY_FWHM[0]:g}-{lc.SKY_FWHM[1]:g} x "
                         f"FWHM; flux corrected to {lc.TOTAL_FWHM:g} x FWHM (aper_corr)"),
            "flags": {"1": "masked or saturated pixel in the aperture",
                      "2": "aperture leaves the grid", "4": "no local sky",
                      str(lc.LC_FLAG_NO_ZP): "no zero point: no mag",
                      str(lc.LC_FLAG_NO_COMPARISON): "no comparison star: no diff_mag",
                      str(lc.LC_FLAG_NO_DATA): "frame does not cover the target"}})
        path = directory / f"{label}.ecsv"
        with atomic_path(path) as tmp:
            table.write(tmp, format="ascii.ecsv", overwrite=True)
        lightcurve_figure(table, directory / f"{label}.png", title=label)
        written[label] = path
        log.info("light curve %s: %d frames -> %s", label, len(table), path)
    return written


def _lightcurve_frames(stack, run_dir: Path):
    """The registered frames (a table: name, filter, index in the filter's stack, mjd,
    site, exptime, zp, zp_err, airmass), each one's FWHM in grid pixels (NaN: not
    measured) and its pixel size over the grid's (1 where the manifest does not say)."""
    registered = _registered(stack)
    manifest = read_manifest(run_dir / "manifest.ecsv")
    frame_scale = {}
    if manifest is not None and "pixel_scale_arcsec" in manifest.colnames:
        frame_scale = {str(n): float(v) for n, v in
                       zip(manifest["name"], manifest["pixel_scale_arcsec"], strict=True)
                       if np.isfinite(v) and v > 0}
    grid_scale = stack.grid.pixel_scale_arcsec
    rows = []
    for filter_name, names in stack.filters.items():
        for index, name in enumerate(names):
            if name not in registered:
                continue
            info = stack.frames.get(name) or store_mod.FrameInfo()
            ratio = frame_scale.get(name, grid_scale) / grid_scale
            rows.append({
                "frame": name, "filter": filter_name, "index": index,
                # mid-exposure: the time a light curve's point stands for
                "mjd": _or_nan(info.mjd) + 0.5 * (info.exptime or 0.0) / 86400.0,
                "site": info.site or "",
                "exptime": _or_nan(info.exptime), "zp": _or_nan(info.zp),
                "zp_err": _or_nan(info.zp_err), "airmass": _or_nan(info.airmass),
                "fwhm": _or_nan(info.fwhm_px) * ratio, "scale": ratio})
    if not rows:
        return Table(), np.zeros(0), np.zeros(0)
    table = Table(rows=rows)
    return table, np.asarray(table["fwhm"], float), np.asarray(table["scale"], float)


def _comparison_candidates(stack, settings: Settings, run_dir: Path, targets, *,
                           isolation_px: float, margin_px: float, epoch_mjd: float):
    """Comparison candidates from the run's catalog: ``(stars, per target: their
    indices)``; none (with a warning) where the run had no catalog or it cannot be
    read."""
    from astropy.coordinates import SkyCoord
    from astropy.time import Time

    from . import lightcurve as lc

    source = settings.catalog.source
    if not source:
        log.warning("the run has no catalog: no comparison stars, no differential "
                    "photometry (diff_mag NaN)")
        return [], [[] for _ in targets]
    ny, nx = stack.grid.shape
    wcs = stack.grid.wcs
    ra0, dec0 = wcs.pixel_to_world_values((nx - 1) / 2, (ny - 1) / 2)
    radius = 0.5 * math.hypot(nx, ny) * stack.grid.pixel_scale_arcsec / 3600.0
    cache_dir = settings.catalog.cache_dir or str(run_dir / "catalog-cache")
    epoch = float(Time(epoch_mjd, format="mjd").jyear) if np.isfinite(epoch_mjd) else None
    try:
        catalog = catalogs.reference_catalog(
            source, SkyCoord(float(ra0), float(dec0), unit="deg"), radius,
            dataclasses.replace(settings.catalog, cache_dir=cache_dir), epoch=epoch)
    except catalogs.CatalogError as err:
        log.warning("no comparison stars: catalog %s: %s", source, err)
        return [], [[] for _ in targets]
    x, y = wcs.world_to_pixel_values(np.asarray(catalog["ra"]), np.asarray(catalog["dec"]))
    chosen = lc.choose_candidates(catalog, x, y, targets, (ny, nx),
                                  isolation_px=isolation_px, margin_px=margin_px)
    rows = sorted({i for per_target in chosen for i in per_target})
    position = {row: k for k, row in enumerate(rows)}
    stars = [lc.Star(float(catalog["ra"][i]), float(catalog["dec"][i]), float(x[i]),
                     float(y[i]), float(catalog["mag"][i])) for i in rows]
    return stars, [[position[i] for i in per_target] for per_target in chosen]


# --------------------------------------------------------------------------------------
# The report: pictures as tasks, the page on the client (daskstack._report draws)
# --------------------------------------------------------------------------------------
def make_report(run_dir, settings: Settings | None = None, *, client=None,
                frames: bool = True, pictures=(), all_pictures: bool = False,
                progress: ProgressCallback | None = None) -> Path:
    """Write ``RUN_DIR/report/index.html`` and ``report/suggested-exclude.txt``; nothing
    of the pipeline is recomputed.

    Reads the manifest, ``run.json``, the ``<name>.wcs`` files, the coadds and the store.
    Every frame gets a thumbnail (binned from its registered pixels in the store, or
    from its file read once), made in tasks of a few frames each. Full-size pictures
    (the frame read, its sources detected again and matched: about what solving it
    costs) are drawn for failed and flagged frames (``frames=True``; else pictures
    made earlier stay linked), for the frames named in ``pictures``, or for every
    frame with ``all_pictures``. Each per-run picture is one task.
    ``settings``: those of the run (default: from its ``run.json``, `run_settings`);
    ``client``: where to draw (default: a cluster from ``settings.cluster``).
    """
    run_dir = run_location(run_dir)
    if read_manifest(run_dir / "manifest.ecsv") is None:
        raise RunError(f"{run_dir}: no readable manifest.ecsv (not a daskstack run)")
    settings = settings or run_settings(run_dir)
    return _with_client(settings, run_dir, client, lambda c: _make_report(
        c, run_dir, settings, frames=frames, pictures=pictures, all_pictures=all_pictures,
        progress=progress), progress)


def _make_report(client, run_dir, settings: Settings, *, frames: bool = True, pictures=(),
                 all_pictures: bool = False,
                 progress: ProgressCallback | None = None) -> Path:
    from . import _report as report_mod

    run_dir = run_location(run_dir)
    progress = progress or _progress_none
    table = read_manifest(run_dir / "manifest.ecsv")
    if table is None:
        raise RunError(f"{run_dir}: no readable manifest.ecsv (not a daskstack run)")
    names = [str(n) for n in table["name"]]
    unknown = sorted({frame_name(n) for n in pictures} - set(names))
    if unknown:
        raise RunError(f"{run_dir}: not frames of this run: {', '.join(unknown)} (frame names "
                       "as in manifest.ecsv)")
    if all_pictures:
        drawn = set(names)
    else:
        drawn = {frame_name(n) for n in pictures}
        if frames:
            drawn |= set(report_mod.frames_needing_pictures(
                table, report_mod.find_outliers(table)))
    frames_dir = run_dir / report_mod.REPORT_DIR / report_mod.FRAMES_DIR
    # submitted in the order they should run: the few full-size pictures (the longest
    # tasks) first, then the per-run pictures, then the thumbnails
    futures = {}
    rows = [row for row in table if str(row["name"]) in drawn]
    if rows:
        frames_dir.mkdir(parents=True, exist_ok=True)
        catalog_of = _report_catalogs(client, run_dir, settings,
                                      [str(row["file"]) for row in rows], progress)
        for row in rows:
            name, status = str(row["name"]), str(row["status"])
            reason = "" if np.ma.is_masked(row["reason"]) else str(row["reason"])
            solved = status in ("ok", EXCLUDED) or reason.startswith(
                ("registration failed", f"{INTERNAL_ERROR} while registering"))
            field_name = "" if "field" not in table.colnames or np.ma.is_masked(
                row["field"]) else str(row["field"])
            wcs = field_dir(run_dir, field_name) / f"{name}.wcs"
            futures[f"frame:{name}"] = client.submit(
                report_mod.frame_task, str(row["file"]), str(wcs) if solved else None,
                catalog_of.get(name), settings, str(frames_dir), status, reason, name,
                pure=False)
    futures.update({kind: client.submit(report_mod.run_safely, func, *args, pure=False)
                    for kind, func, args in report_mod.run_figure_jobs(
                        run_dir, settings.grid.reference)})
    futures.update(_thumbnail_futures(client, run_dir, table))
    # drawn here while the workers draw theirs
    (run_dir / report_mod.REPORT_DIR).mkdir(parents=True, exist_ok=True)
    summary = report_mod.run_safely(report_mod.summary_plots, table, run_dir /
                                    report_mod.REPORT_DIR / "summary.png")
    results = {}
    _gather_as_completed(client, futures, "report", progress, results.__setitem__)
    run_plots = {k: v for k, v in results.items() if not k.startswith(("frame:", "thumbs:"))}
    thumbnails = {}
    for key, value in results.items():
        if key.startswith("thumbs:"):
            if isinstance(value, dict):
                thumbnails.update(value)
            else:  # the task itself was lost: no thumbnails for its frames, say why
                log.warning("report: thumbnails of a batch failed: %s", value)
    return report_mod.write_report(run_dir, run_plots, thumbnails=thumbnails,
                                   summary=summary)


def _report_catalogs(client, run_dir: Path, settings: Settings, files: list[str],
                     progress) -> dict:
    """``{frame name: scattered catalog}`` of the frames to draw, one per field, when
    the run solved against a catalog (the frames' headers are read for their fields)."""
    source = settings.catalog.source
    if settings.solve.wcs == "header" or not source:
        return {}
    quick = dataclasses.replace(settings, catalog=dataclasses.replace(
        settings.catalog, retries=0, timeout=min(settings.catalog.timeout, 20.0)))
    cache_dir = settings.catalog.cache_dir or _catalog_cache(run_dir)
    metas = [r.meta for r in _inspect_frames(client, files, progress) if r.meta is not None]
    catalog_of = {}
    for members in _fields(metas, _field_radius_deg(settings)):
        try:
            catalog = client.scatter(_field_catalog(members, source, quick, cache_dir))
        except catalogs.CatalogError as err:
            log.warning("report: no catalog for %s...: %s", members[0].name, err)
            catalog = None
        catalog_of.update({m.name: catalog for m in members})
    return catalog_of


def _thumbnail_futures(client, run_dir: Path, table, batch: int = 32) -> dict:
    """One task per ``batch`` frames: thumbnails from the store where the frame was
    registered (and the store kept), else from the frame's file."""
    from . import _report as report_mod

    in_store = {}  # frame name -> (its store, its filter there)
    for store_path in [run_dir / "store.zarr", *field_stores(run_dir).values()]:
        try:
            stack = store_mod.open_store(store_path)
        except store_mod.StoreError:
            continue
        registered = _registered(stack)
        in_store.update({name: (str(store_path), filter_name)
                         for filter_name, members in stack.filters.items()
                         for name in members if name in registered})
    by_store: dict = {}
    for name, path in zip(table["name"], table["file"], strict=True):
        store_path, filter_name = in_store.get(str(name), (None, None))
        by_store.setdefault(store_path, []).append((str(name), filter_name, str(path)))
    return {f"thumbs:{store_path}:{k}": client.submit(
                report_mod.thumbnails_task, store_path, items[k:k + batch], pure=False)
            for store_path, items in by_store.items() for k in range(0, len(items), batch)}
