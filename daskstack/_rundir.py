"""The run directory: what a run records, so that it can be checked and resumed.

``OUT/run.json`` (the inputs and settings, what a resume is checked against),
``OUT/manifest.ecsv`` (one `FrameRecord` per input frame), ``OUT/outputs.ecsv``
(sha256 of every file written, after its rename), ``OUT/errors.log`` (the traceback
of every frame that hit an unexpected exception: a bug), the ``.wcs`` files read back on
resume, and the checks made before any work starts: a writable directory with room
enough, no other run in it. Plain file I/O: no Dask here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from ._io import as_path, atomic_path, atomic_write_text, is_url, local_path, remove_tree
from .astrometry import SolveResult
from .config import Settings
from .errors import RunError
from .frames import FrameMeta, frame_name, quiet_astropy
from .grid import Grid
from .store import FrameInfo

__all__ = [
    "ERRORS_FILE",
    "INTERNAL_ERROR",
    "MANIFEST_COLUMNS",
    "OUTPUTS_FILE",
    "DifferentRunError",
    "ErrorLog",
    "FrameRecord",
    "InternalError",
    "OutputLog",
    "RunError",
    "EXCLUDED",
    "check_run_dir",
    "describe_differences",
    "only_combine_differs",
    "run_differences",
    "dedupe",
    "dedupe_exposures",
    "estimate_output_bytes",
    "estimate_store_bytes",
    "failure",
    "field_dir",
    "field_stores",
    "mark_excluded",
    "read_manifest",
    "restore",
    "result_from_wcs_file",
    "run_dir_of",
    "run_settings",
    "run_signature",
    "sha256",
    "wcs_file",
    "wcs_from_text",
    "write_manifest",
]

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = [
    ("file", str), ("name", str), ("filter", str), ("status", str), ("reason", str),
    ("n_detections", int), ("n_matches", int), ("rms_arcsec", float), ("rms_px", float),
    ("fwhm_px", float), ("elongation", float), ("background", float), ("noise", float),
    ("flux_ratio", float), ("pixel_scale_arcsec", float), ("exptime", float),
    ("date_obs", str), ("mjd", float), ("telescope", str), ("instrument", str),
    ("registered", bool), ("t_solve", float), ("t_register", float), ("warnings", str),
    ("method", str),  # the evidence that gave the WCS (SolveResult.method); "" if none
    # the zero point (daskstack.photcal): its catalog band, or why there is none
    ("zp", float), ("zp_err", float), ("n_zp", int), ("zp_band", str), ("zp_reason", str),
    ("airmass", float), ("site", str),
    ("field", str),  # the frame's field (`daskstack._fields.output_fields`); "" = the only one
]
OUTPUTS_FILE = "outputs.ecsv"  # name, sha256, bytes of every .wcs and coadd written
TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp")  # names made by _io.atomic_path
ERRORS_FILE = "errors.log"  # the traceback of every frame that hit an internal error
INTERNAL_ERROR = "unexpected error"  # how the manifest reason of such a frame begins
# status of a solved and registered frame left out of the coadds by a person's choice
# (--exclude, a quality cut); its reason names the rule. Combine-time: it is still in
# the store, and a later combine without that rule takes it back.
EXCLUDED = "excluded"
# When set, `write_manifest` appends every internal-error reason it writes to this file:
# the test suite sets it to fail any test whose run hit a bug (also in subprocesses).
INTERNAL_ERRORS_ENV = "DASKSTACK_INTERNAL_ERRORS_FILE"


class DifferentRunError(RunError):
    """The run directory holds a run of other inputs or settings.

    ``differences`` lists ``(what, before, now)``; ``combine_only`` is True when only
    combine-time settings (``combine.*``) differ, which ``daskstack combine`` redoes
    from the store without solving or registering again."""

    def __init__(self, message: str, differences: list[tuple[str, object, object]]):
        super().__init__(message)
        self.differences = differences
        self.combine_only = only_combine_differs(differences)


@dataclass
class FrameRecord:
    """Everything the run knows of one input frame; one manifest row.

    Its status and reason are not stored but derived (one source of truth): ``failed``
    with ``refusal`` when the frame was refused outside the solver (unreadable, off the
    grid, registration failed), else the solver's `SolveResult` status and reason
    (``pending`` before it has one).
    """

    file: str
    name: str
    meta: FrameMeta | None = None
    result: SolveResult | None = None
    refusal: str = ""  # why the frame was refused outside the solver; "" = it was not
    # the rule that left this solved frame out of the coadds (--exclude, a quality cut:
    # a combine-time choice, decided again at each combine); "" = it was not
    exclusion: str = ""
    registered: bool = False
    t_register: float = float("nan")
    field: str = ""  # the field (its directory OUT/<field>/); "" in a batch of one field

    @property
    def status(self) -> str:
        """``ok``, ``failed``, ``excluded`` (solved, left out of the coadds on purpose) or
        ``pending`` (not solved yet)."""
        if self.refusal:
            return "failed"
        if self.result is None:
            return "pending"
        return EXCLUDED if self.exclusion and self.result.status == "ok" else \
            self.result.status

    @property
    def reason(self) -> str:
        """Why the frame failed, or the rule that excluded it; "" for a frame in the
        coadds."""
        if self.refusal:
            return self.refusal
        if self.result is None:
            return ""
        if self.result.status == "ok":
            return self.exclusion
        return self.result.reason

    def info(self) -> FrameInfo:
        """The store's record of this (solved) frame: what scaling and headers need."""
        meta, res = self.meta, self.result
        return FrameInfo(
            file=self.file, filter=meta.filter, exptime=meta.exptime, date_obs=meta.date_obs,
            mjd=meta.mjd, gain=meta.gain, rdnoise=meta.rdnoise,
            background=_finite(res.background), noise=_finite(res.noise),
            flux_ratio=_finite(res.flux_ratio), fwhm_px=_finite(res.fwhm_px),
            n_matches=int(res.n_matches), rms_arcsec=_finite(res.rms_arcsec),
            elongation=_finite(res.elongation), site=meta.site,
            telescope=meta.telescope, instrument=meta.instrument, object=meta.object,
            bunit=meta.bunit, zp=float(res.zp), zp_err=float(res.zp_err), n_zp=int(res.n_zp),
            airmass=meta.airmass)

    def row(self) -> dict:
        row = {"file": self.file, "name": self.name, "status": self.status,
               "reason": self.reason, "registered": self.registered,
               "t_register": self.t_register}
        meta, res = self.meta, self.result
        row["filter"] = meta.filter if meta else ""
        row["exptime"] = meta.exptime if meta and meta.exptime is not None else np.nan
        row["date_obs"] = meta.date_obs or "" if meta else ""
        row["mjd"] = meta.mjd if meta and meta.mjd is not None else np.nan
        row["telescope"] = meta.telescope if meta else ""
        row["instrument"] = meta.instrument if meta else ""
        row["warnings"] = "; ".join(getattr(meta, "warnings", ()) or ()) if meta else ""
        row["site"] = meta.site if meta else ""
        row["zp_band"] = res.zp_band if res is not None else ""
        row["zp_reason"] = res.zp_reason if res is not None else ""
        for key in ("n_detections", "n_matches", "rms_arcsec", "rms_px", "fwhm_px",
                    "elongation", "background", "noise", "flux_ratio", "pixel_scale_arcsec",
                    "zp", "zp_err", "n_zp", "airmass"):
            value = getattr(res, key, None) if res is not None else None
            row[key] = value if value is not None else (0 if key.startswith("n_") else np.nan)
        row["t_solve"] = getattr(res, "elapsed", np.nan) if res is not None else np.nan
        row["method"] = res.method if res is not None and res.status == "ok" else ""
        row["field"] = self.field
        return row


class OutputLog:
    """``OUT/outputs.ecsv``: name, sha256 and size of every file a run wrote, recorded
    after the file was renamed into place. A resumed run trusts a ``.wcs`` file only
    when it matches its record (a file renamed but not yet recorded when a run was
    killed is simply made again). One object per run keeps the records in memory."""

    def __init__(self, out_dir):
        self.out_dir = as_path(out_dir)
        self.path = self.out_dir / OUTPUTS_FILE
        self.records = read_outputs(self.out_dir)

    def add(self, path, digest: str | None = None) -> None:
        """Record ``path`` (already in place; ``digest``: its sha256 when the writer
        computed it) and rewrite the log atomically."""
        path = as_path(path)
        self.records[self._key(path)] = (digest or sha256(path), path.stat().st_size)
        self._write()

    def _write(self) -> None:
        names = sorted(self.records)
        table = Table([names, [self.records[n][0] for n in names],
                       [self.records[n][1] for n in names]],
                      names=("file", "sha256", "bytes"), dtype=(str, str, np.int64))
        table.meta["comments"] = ["daskstack outputs: sha256 of every file written (after "
                                  "it was renamed into place)"]
        with atomic_path(self.path) as tmp:
            table.write(tmp, format="ascii.ecsv")

    def _key(self, path: Path) -> str:
        """The name a file is recorded under: its path inside the run directory."""
        if is_url(path):
            inside = str(path).removeprefix(str(self.out_dir).rstrip("/") + "/")
            return inside if inside != str(path) else as_path(path).name
        try:
            return Path(path).resolve().relative_to(self.out_dir.resolve()).as_posix()
        except ValueError:
            return Path(path).name

    def verified(self, path) -> bool:
        """True when ``path`` exists and matches its record."""
        path = as_path(path)
        recorded = self.records.get(self._key(path))
        return (recorded is not None and path.exists()
                and recorded[1] == path.stat().st_size and recorded[0] == sha256(path))

    def discard(self, path) -> None:
        """Delete ``path`` and its record (an output this run replaces by nothing)."""
        path = as_path(path)
        path.unlink(missing_ok=True)
        if self.records.pop(self._key(path), None) is not None:
            self._write()

    def remove_all(self) -> None:
        """Delete every recorded output (``--overwrite``: no coadd of an old run may stay
        looking like the new run's) and the log itself."""
        for name in self.records:
            if name and ".." not in Path(name).parts and not Path(name).is_absolute():
                (self.out_dir / name).unlink(missing_ok=True)
        self.path.unlink(missing_ok=True)
        self.records = {}


def _finite(value):
    return float(value) if value is not None and np.isfinite(value) else None


@dataclass
class InternalError:
    """An exception nothing expected, raised while working on one frame: a bug in
    daskstack (or a library), not a bad frame. Small and picklable: tasks return it."""

    phase: str  # what was being done: "solving", "registering"
    reason: str  # the manifest reason: begins with INTERNAL_ERROR
    traceback: str  # the full traceback, for errors.log

    @classmethod
    def from_exception(cls, phase: str, err: BaseException) -> InternalError:
        return cls(phase, f"{INTERNAL_ERROR} while {phase}: "
                          f"{type(err).__name__}: {err} (a bug: see {ERRORS_FILE})",
                   "".join(traceback.format_exception(err)))


class ErrorLog:
    """``OUT/errors.log``: one entry per frame that hit an internal error, with the full
    traceback, rewritten atomically as entries come and recorded in outputs.ecsv.

    One object per command: its first entry replaces the log of an earlier command
    (`clear` removes that log at once, for a run, which tries every such frame again)."""

    def __init__(self, outputs: OutputLog):
        self.outputs = outputs
        self.path = outputs.out_dir / ERRORS_FILE
        self.entries: list[str] = []

    def clear(self) -> None:
        self.entries = []
        self.outputs.discard(self.path)

    def add(self, name: str, error: InternalError) -> None:
        log.error("%s: %s", name, error.reason)
        self.entries.append(f"=== {name}: {error.reason}\n{error.traceback.rstrip()}\n")
        header = (f"daskstack: {len(self.entries)} frame(s) hit an internal error (a bug, "
                  "not a bad frame); please report it with this file\n\n")
        atomic_write_text(self.path, header + "\n".join(self.entries))
        self.outputs.add(self.path)


def read_outputs(out_dir) -> dict[str, tuple[str, int]]:
    """``{file name: (sha256, bytes)}`` of the outputs a run recorded in outputs.ecsv."""
    table = read_manifest(as_path(out_dir) / OUTPUTS_FILE)
    if table is None:
        return {}
    return {str(row["file"]): (str(row["sha256"]), int(row["bytes"])) for row in table}


def run_signature(inputs, catalog, settings: Settings) -> dict:
    settings_dict = settings.to_dict()
    settings_dict.pop("cluster", None)  # where it runs does not change the result
    # nor whether the store is kept: the same run with it kept rebuilds a removed store
    settings_dict.get("register", {}).pop("keep_store", None)
    # nor which frames are left out of the coadds: a combine-time choice, changed by
    # combining the store again, never by solving or registering again
    settings_dict.pop("select", None)
    return {"inputs": [p if is_url(p) else str(Path(p).resolve()) for p in map(str, inputs)],
            "catalog": str(catalog),
            "settings": settings_dict}


def run_settings(run_dir) -> Settings:
    """The Settings a run was made with (from ``run.json``); defaults if absent."""
    try:
        values = json.loads((as_path(run_dir) / "run.json").read_text())
    except (OSError, ValueError):
        return Settings()
    settings = Settings.from_dict(values.get("settings", {}))
    if values.get("catalog"):
        settings = settings.replace("catalog", source=str(values["catalog"]))
    return settings


def check_run_dir(out_dir: Path, signature: dict, overwrite: bool) -> bool:
    """Prepare the run directory; True when an earlier run of the same inputs is resumed.

    The same settings with more inputs (tonight's frames added) resume too: ``run.json``
    then lists every input, and the run solves and registers only the frames added.
    Fewer inputs are a different run: a frame is left out of the coadds with
    ``--exclude`` (it stays in the store), or the run replaced with ``overwrite``.
    ``out_dir`` may be a URL (`_io.as_path`): an object store has no directories, and
    no temporaries to clean (nothing is renamed there)."""
    out_dir = as_path(out_dir)
    run_file = out_dir / "run.json"
    if out_dir.exists() and not out_dir.is_dir():
        raise RunError(f"{out_dir}: exists and is not a directory")
    _check_writable(out_dir)
    if run_file.exists():
        try:
            previous = json.loads(run_file.read_text())
        except (OSError, json.JSONDecodeError):
            previous = None
        same = previous is not None and _comparable(previous) == _comparable(signature)
        if same and not overwrite:
            return True
        added = frames_added(previous, signature)
        if added and not overwrite:
            log.info("%s: %d frame(s) added to the run; the others are taken as they are",
                     out_dir, len(added))
            atomic_write_text(run_file, json.dumps(signature, indent=1, default=str))
            return True
        if not overwrite:
            differences = run_differences(previous or {}, signature)
            message = (f"{out_dir} holds a different run: "
                       f"{describe_differences(differences) or 'unreadable run.json'}. ")
            if only_combine_differs(differences):
                message += ("Only combine settings differ: combine the store again with "
                            f"'daskstack combine {out_dir}' and the new combine options "
                            "(no solving or registering again); or ")
            if any(what == "inputs" and before for what, before, _ in differences):
                message += ("to leave frames out of the coadds, give the same inputs and "
                            "--exclude them (they stay in the store); or ")
            message += "use --overwrite to replace it, or choose another --out"
            raise DifferentRunError(message, differences)
        for child in ("store.zarr",):
            remove_tree(out_dir / child)
        (out_dir / "manifest.ecsv").unlink(missing_ok=True)
        OutputLog(out_dir).remove_all()  # no coadd of the old run may look like ours
    elif not overwrite and (out_dir / "manifest.ecsv").exists():
        raise RunError(f"{out_dir} holds a run without run.json; use --overwrite")
    atomic_write_text(run_file, json.dumps(signature, indent=1, default=str))
    return False


def run_differences(previous: dict, signature: dict) -> list[tuple[str, object, object]]:
    """What differs between two run signatures: ``(what, before, now)``; ``what`` is
    ``inputs`` (before: frames dropped, now: frames added), ``catalog`` or a setting
    ``section.name``."""
    out = []
    before, now = previous.get("inputs", []), signature.get("inputs", [])
    if before != now:
        out.append(("inputs", sorted(set(before) - set(now)), sorted(set(now) - set(before))))
    if str(previous.get("catalog")) != str(signature.get("catalog")):
        out.append(("catalog", previous.get("catalog"), signature.get("catalog")))
    old_settings, new_settings = previous.get("settings", {}), signature.get("settings", {})
    for section in sorted(set(old_settings) | set(new_settings)):
        old, new = old_settings.get(section, {}) or {}, new_settings.get(section, {}) or {}
        for name in sorted(set(old) | set(new)):
            a, b = old.get(name), new.get(name)
            if _comparable({"v": a}) != _comparable({"v": b}):
                out.append((f"{section}.{name}", a, b))
    return out


def frames_added(previous: dict | None, signature: dict) -> list[str]:
    """The inputs ``signature`` adds to the run ``previous`` when nothing else differs
    (the same catalog and settings, no input dropped); [] otherwise."""
    if previous is None:
        return []
    differences = run_differences(previous, signature)
    if len(differences) != 1 or differences[0][0] != "inputs" or differences[0][1]:
        return []
    return list(differences[0][2])


def only_combine_differs(differences) -> bool:
    """True when every difference is a combine-time setting (``combine.*``)."""
    return bool(differences) and all(what.startswith("combine.") for what, _, _ in differences)


def describe_differences(differences, limit: int = 6) -> str:
    """``inputs: 2 frames added (a.fits, b.fits); combine.method: 'sigclip' -> 'mean'``."""
    parts = []
    for what, before, now in differences[:limit]:
        if what == "inputs":
            words = []
            for count, verb in ((now, "added"), (before, "dropped")):
                if count:
                    names = ", ".join(Path(p).name for p in count[:3])
                    more = ", ..." if len(count) > 3 else ""
                    words.append(f"{len(count)} frame(s) {verb} ({names}{more})")
            parts.append("inputs: " + ("; ".join(words) or "other order"))
        else:
            parts.append(f"{what}: {before!r} -> {now!r}")
    if len(differences) > limit:
        parts.append(f"{len(differences) - limit} more")
    return "; ".join(parts)


def _comparable(signature: dict) -> str:
    return json.dumps(signature, sort_keys=True, default=str)


def _check_writable(out_dir) -> None:
    """Make the directory and write a probe file in it: unlike os.access, this also holds
    for root and read-only mounts (and, for a URL, tries the store's credentials)."""
    if is_url(out_dir):
        probe = out_dir / f".daskstack-probe.{os.getpid()}"
        try:
            probe.write_bytes(b"")
            probe.unlink(missing_ok=True)
        except Exception as err:  # each store and SDK raises its own types
            raise RunError(f"{out_dir}: cannot write there ({type(err).__name__}: {err}); "
                           "check the URL and the store's credentials") from None
        return
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunError(f"{out_dir}: cannot create the output directory "
                       f"({err.strerror or err})") from None
    _remove_stale_temporaries(out_dir)
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
        if path.is_file() and TEMPORARY.match(path.name):
            log.info("removing %s, left by an interrupted run", path.name)
            path.unlink(missing_ok=True)


def estimate_output_bytes(records: list[FrameRecord], grid: Grid | None = None,
                          tile: int = 1024) -> int:
    """Bytes the store and coadds may take, before compression (an upper bound).

    Without a grid (before solving): each frame as many grid pixels as it has pixels,
    the grid as large as the largest frame. With the grid: the tiles each solved frame
    overlaps, and the grid itself per filter. 14 bytes per frame pixel (data, variance and
    footprint, float32; kernel power, float16); 20 per coadd pixel (image, ERR, WEIGHT, NFRAMES, EXPMAP), twice
    (zarr + FITS).
    """
    frame_px, grid_px, n_filters = _planned_pixels(records, grid, tile)
    return int(14 * frame_px + 2 * 20 * grid_px * n_filters)


def estimate_store_bytes(records: list[FrameRecord], grid: Grid, tile: int = 1024,
                         footprint: bool = False) -> int:
    """Bytes of the registered stack (``store.zarr``) before compression: the tiles each
    solved frame overlaps, float32 data and variance, float16 kernel power (and float32
    footprint, for flux-conserving methods)."""
    frame_px, _, _ = _planned_pixels(records, grid, tile)
    return int((14 if footprint else 10) * frame_px)


def _planned_pixels(records, grid, tile) -> tuple[int, int, int]:
    """(frame pixels in the store, grid pixels, filters) of the frames not failed."""
    usable = [r for r in records if r.meta is not None and r.status != "failed"]
    if not usable:
        return 0, 0, 0
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
            wcs = wcs_from_text(r.result.wcs_header, r.meta.shape)
            gny, gnx = grid.shape  # edge tiles (chunks) stop at the grid's edge
            frame_px += sum(min(tile, gny - y0) * min(tile, gnx - x0)
                            for y0, x0 in frame_tiles(wcs, r.meta.shape, grid, tile))
        grid_px = grid.shape[0] * grid.shape[1]
    return frame_px, grid_px, len(filters)


def check_disk_space(out_dir: Path, needed: int, when: str) -> None:
    if local_path(out_dir) is None:
        return  # an object store has no fixed size to check against
    free = shutil.disk_usage(out_dir).free
    if needed * 1.1 > free:
        raise RunError(f"{out_dir}: not enough disk space {when}: the store and coadds need "
                       f"up to {needed / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free")


def write_manifest(records: list[FrameRecord], path: Path) -> None:
    rows = [r.row() for r in records]
    _report_internal_errors(rows, path)
    table = Table(rows=[[row[name] for name, _ in MANIFEST_COLUMNS] for row in rows],
                  names=[name for name, _ in MANIFEST_COLUMNS],
                  dtype=[kind for _, kind in MANIFEST_COLUMNS]) if rows else Table(
        names=[name for name, _ in MANIFEST_COLUMNS], dtype=[k for _, k in MANIFEST_COLUMNS])
    table.meta["comments"] = ["daskstack manifest: one row per input frame",
                              "status: ok | failed | excluded | pending; reason: why a frame failed or "
                              "which rule excluded it"]
    with atomic_path(path) as tmp:
        table.write(tmp, format="ascii.ecsv")


def _report_internal_errors(rows: list[dict], path: Path) -> None:
    """Append each internal-error reason to ``$DASKSTACK_INTERNAL_ERRORS_FILE``, if set."""
    target = os.environ.get(INTERNAL_ERRORS_ENV)
    bugs = [row for row in rows if row["reason"].startswith(INTERNAL_ERROR)]
    if target and bugs:
        with open(target, "a") as handle:
            for row in bugs:
                handle.write(f"{path}: {row['name']}: {row['reason']}\n")


def read_manifest(path: Path) -> Table | None:
    """An ECSV table of the run directory (manifest, outputs ...); None if absent or
    unreadable."""
    try:
        if is_url(path):  # astropy reads local files only: the text, read through fsspec
            return Table.read(as_path(path).read_text(), format="ascii.ecsv")
        return Table.read(path, format="ascii.ecsv")
    except (OSError, ValueError):
        return None


def dedupe(inputs) -> list[str]:
    """Input paths, each frame once: a path given twice, or a second file of the same
    frame name, is dropped with a warning. Copies under other names are found once the
    headers are read (`dedupe_exposures`)."""
    seen, unique = {}, []
    for path in inputs:
        # a URL is absolute already: every worker reads it as it is
        key = str(path) if is_url(path) else str(Path(path).resolve())
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
        unique.append(key if is_url(path) else str(Path(path).absolute()))
    return unique


def dedupe_exposures(records: list[FrameRecord]) -> list[FrameRecord]:
    """The records without copies of one exposure under other file names: the same
    DATE-OBS, TELESCOP and INSTRUME, or (frames whose header does not say when and
    where they were taken) the same bytes. The first given is kept; each copy dropped
    is named in a warning with the frame it repeats. Checksums are computed only for
    files of the same size (copies have it), so a batch of distinct frames reads none."""
    keys = {id(r): _exposure_key(r.meta) for r in records if r.meta is not None}
    sizes: dict[int, int] = {}
    for r in records:
        if r.meta is not None and keys[id(r)] is None:
            size = as_path(r.file).stat().st_size
            sizes[size] = sizes.get(size, 0) + 1
    kept, first_of = [], {}
    for record in records:
        key = keys.get(id(record))
        if key is None and record.meta is not None \
                and sizes.get(as_path(record.file).stat().st_size, 0) > 1:
            key = ("same checksum", sha256(record.file))
        if key is not None and key in first_of:
            log.warning("%s: the same exposure as %s (%s); used once",
                        Path(record.file).name, Path(first_of[key].file).name, key[0])
            continue
        if key is not None:
            first_of[key] = record
        kept.append(record)
    return kept


def _exposure_key(meta: FrameMeta):
    if meta.date_obs and (meta.telescope or meta.instrument):
        return ("same DATE-OBS, telescope and instrument", meta.date_obs, meta.telescope,
                meta.instrument)
    return None


def failure(meta: FrameMeta, reason: str) -> SolveResult:
    """The record of a frame that failed before or outside the solver."""
    return SolveResult(name=meta.name, path=meta.path, filter=meta.filter, status="failed",
                       reason=reason)


def result_from_wcs_file(meta: FrameMeta, path: Path, row: dict | None = None) -> SolveResult:
    """A solved frame taken back from its ``.wcs`` file (and manifest row, on resume)."""
    with quiet_astropy(), as_path(path).open("rb") as handle:  # a file or an object
        header = fits.getheader(handle)
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


def restore(records: list[FrameRecord], manifest: Path, outputs: OutputLog) -> None:
    """Take back what an earlier, interrupted run of the same inputs finished."""
    out_dir = outputs.out_dir
    table = read_manifest(manifest)
    if table is None:
        return
    rows = {row["name"]: row for row in table}
    for record in records:
        row = rows.get(record.name)
        if row is None or record.meta is None or row["status"] not in ("ok", EXCLUDED):
            continue  # an excluded frame is solved and registered: taken back as ok
        wcs_path = wcs_file(out_dir, record)
        if not outputs.verified(wcs_path):
            continue  # written but not recorded (killed in between), or changed: solve again
        try:
            result = result_from_wcs_file(record.meta, wcs_path,
                                          dict(zip(row.colnames, row, strict=True)))
        except (OSError, ValueError, KeyError):
            continue
        record.result = result
        record.registered = bool(row["registered"])
        record.t_register = float(row["t_register"])


def mark_excluded(manifest: Path, excluded: dict[str, str], only=None) -> None:
    """Rewrite the manifest's status of the usable frames (``ok`` or ``excluded``): those
    in ``excluded`` (``{name: reason}``) become ``excluded`` with that reason, the others
    ``ok`` again (a combine without the rule that left them out). ``only``: the names
    of the frames this combine judged (one field's store), or None for every frame."""
    table = read_manifest(manifest)
    if table is None:
        return
    status = [str(s) for s in table["status"]]
    reasons = ["" if np.ma.is_masked(r) else str(r) for r in table["reason"]]
    for i, name in enumerate(str(n) for n in table["name"]):
        if status[i] in ("ok", EXCLUDED) and (only is None or name in only):
            status[i] = EXCLUDED if name in excluded else "ok"
            reasons[i] = excluded.get(name, "")
    table["status"] = status
    table["reason"] = reasons
    with atomic_path(manifest) as tmp:
        table.write(tmp, format="ascii.ecsv")


def field_dir(out_dir, field: str) -> Path:
    """Where a field's coadds, store and ``.wcs`` files go: ``OUT/<field>/``, or ``OUT``
    itself in a batch of one field (``field`` "")."""
    return as_path(out_dir) / field if field else as_path(out_dir)


def wcs_file(out_dir, record: FrameRecord) -> Path:
    """The ``.wcs`` file of a frame of a run: ``OUT[/<field>]/<name>.wcs``."""
    return field_dir(out_dir, record.field) / f"{record.name}.wcs"


def field_stores(run_dir) -> dict[str, Path]:
    """``{field: store}`` of a run of several fields (``OUT/<field>/store.zarr``, or its
    coadds where the store was removed); empty for a run of one field."""
    if local_path(run_dir) is None:
        return {}  # a run on an object store: one field
    run_dir = local_path(run_dir)
    if (run_dir / "store.zarr").exists() or any(run_dir.glob("coadd_*.fits")):
        return {}
    table = read_manifest(run_dir / "manifest.ecsv")
    fields = [] if table is None or "field" not in table.colnames else sorted(
        {str(f) for f in table["field"] if not np.ma.is_masked(f) and str(f)})
    return {f: run_dir / f / "store.zarr" for f in fields
            if (run_dir / f / "store.zarr").exists() or any((run_dir / f).glob("coadd_*.fits"))}


def run_dir_of(store_path) -> Path:
    """The run directory of a store: its parent, or for a field's store
    (``OUT/<field>/store.zarr``) the parent's parent, where ``manifest.ecsv`` is."""
    parent = as_path(store_path)
    parent = (parent.absolute() if isinstance(parent, Path) else parent).parent
    if not (parent / "manifest.ecsv").exists() and (parent.parent / "run.json").exists():
        return parent.parent
    return parent


def sha256(path) -> str:
    """sha256 of a file, for the output log and checks."""
    digest = hashlib.sha256()
    with as_path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def wcs_from_text(text: str, shape=None) -> WCS:
    """A WCS from header text (how WCSs travel between tasks), optionally with its shape."""
    with quiet_astropy():
        wcs = WCS(fits.Header.fromstring(text), relax=True)
    if shape is not None:
        wcs.array_shape = shape
    return wcs
