"""The ``daskstack`` command: thin; it parses options, builds Settings and calls the API.

Exit codes, the same for every command (`daskstack._exitcodes`): 0 all done (every frame
or archive record made it); 3 partial (something usable was written, some frames or
records failed, each reported with its reason); 4 nothing usable was produced; 2 bad usage,
options or inputs, or no batch job could start (nothing was computed); 130 interrupted
(Ctrl-C; the same command resumes). 1 is an unexpected error (a traceback): a bug.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shlex
import sys
import time
from pathlib import Path

import click

from ._exitcodes import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_USAGE,
    outcome,
)
from ._io import is_url
from .config import Settings, SettingsError, option_choices, option_default

__all__ = ["STAGE_OPTIONS", "SettingsOption", "main", "stage_options"]


# --------------------------------------------------------------------------------------
# Output helpers
# --------------------------------------------------------------------------------------
def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[
        min(verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr, force=True)
    import distributed  # noqa: F401  (it configures its loggers on import: quiet them after)

    for noisy in ("distributed", "tornado", "asyncio", "bokeh"):
        logging.getLogger(noisy).setLevel(max(level, logging.ERROR))
    # object-store clients: their debug logs show request headers (the access key id
    # in Authorization), which never go to a log
    for client in ("botocore", "aiobotocore", "boto3", "s3transfer", "s3fs", "gcsfs",
                   "fsspec", "urllib3", "aiohttp"):
        logging.getLogger(client).setLevel(max(level, logging.WARNING))


class ProgressBar:
    """One line per phase on stderr, rewritten in place: ``solve   [####    ] 12/40``."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr is not None
        self.phase = None
        self.started = 0.0

    def notice(self, text: str) -> None:
        if self.enabled:
            click.echo(text, err=True)

    def __call__(self, phase: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if phase != self.phase:
            self.phase, self.started = phase, time.perf_counter()
        if not sys.stderr.isatty() and done < total:
            return  # in logs and CI: one line per finished phase, not a stream of \r
        width = 30
        filled = int(width * done / total) if total else width
        elapsed = time.perf_counter() - self.started
        line = f"{phase:<9}[{'#' * filled}{' ' * (width - filled)}] {done}/{total} {elapsed:6.1f}s"
        end = "\n" if done >= total else ""
        click.echo(f"\r{line}", nl=False, err=True)
        if end:
            click.echo("", err=True)


def _fail(message: str, code: int = EXIT_USAGE):
    click.echo(f"daskstack: error: {message}", err=True)
    sys.exit(code)


# --------------------------------------------------------------------------------------
# Options shared by the commands
# --------------------------------------------------------------------------------------
def _choice(*values):
    return click.Choice(values, case_sensitive=False)


# (option, settings key, click kwargs). An option's choices and the default its help shows
# are not written here: both come from the Settings field (`_settings_option`).
STAGE_OPTIONS = {
    "solve": [
        ("--wcs", "solve.wcs", dict(
         help="'auto': 'solve' with a catalog, else 'header'; 'solve': fit a new WCS to each "
              "frame against the catalog (the header WCS only the start); 'header': use each "
              "frame's header WCS as it is, refusing frames whose header says it failed "
              "(LCO WCSERR != 0; frames without WCSERR are trusted).")),
        ("--search-radius", "solve.search_radius_arcmin", dict(type=float,
         help="How far (arcmin) the true field centre may lie from the header's.")),
        ("--scale-tolerance", "solve.scale_tolerance", dict(type=float,
         help="Fractional error allowed in the header pixel scale.")),
        ("--allow-flip/--no-flip", "solve.allow_flip", dict(default=None,
         help="Also try a mirrored sky (a flipped axis).")),
        ("--sip-order", "solve.sip_order", dict(type=click.IntRange(0, 4),
         help="0 fits TAN only; 2-4 add SIP distortion of that order.")),
        ("--threshold", "detect.threshold_sigma", dict(type=float,
         help="Detection threshold in units of the background noise.")),
        ("--mag-limit", "catalog.mag_limit", dict(type=float,
         help="Faintest catalog stars used (service catalogs).")),
        ("--catalog-cache", "catalog.cache_dir", dict(type=click.Path(file_okay=False),
         help="Directory caching catalog queries (default: OUT/catalog-cache).")),
        ("--catalog-columns", "catalog.columns", dict(metavar="ra=COL,dec=COL,mag=COL",
         help="A catalog file's column names where the usual ones (ra, RAJ2000, "
              "phot_g_mean_mag ...) are not found, e.g. ra=RA_DEG,dec=DEC_DEG,mag=Gmag "
              "(also pmra, pmdec, ref_epoch).")),
        ("--catalog-band", "catalog.mag_band", dict(
         help="The band a catalog file's mag column is in, for the frames' "
              "zero points (its own <band>_mag columns need no option); without it, a "
              "file calibrates only the bands it has as <band>_mag.")),
        ("--zero-points/--no-zero-points", "photometry.zero_points", dict(default=None,
         help="Measure each solved frame's magnitude zero point against the catalog's "
              "band for its filter (manifest zp, zp_err, n_zp).")),
    ],
    # the solver's own limits; in `run` and `combine` these options are quality cuts
    # (group "select"): a frame is then excluded from the coadds, not failed
    "solve-limits": [
        ("--min-matches", "solve.min_matches", dict(type=int,
         help="Fewer matched stars than this: the frame fails.")),
        ("--max-rms", "solve.max_rms_arcsec", dict(type=float,
         help="A larger RMS residual (arcsec): the frame fails.")),
    ],
    # combine-time: changing them combines the store again (no solving or registering,
    # no --overwrite); excluded frames stay in the manifest with status 'excluded'
    "select": [
        ("--exclude", "select.exclude", dict(multiple=True, metavar="NAME",
         help="Leave this frame (name or file name) out of the coadds; repeatable.")),
        ("--exclude-file", "select.exclude_file", dict(
         type=click.Path(exists=True, dir_okay=False),
         help="Leave out the frames named in FILE (one a line, '#' comments), e.g. "
              "OUT/report/suggested-exclude.txt.")),
        ("--max-fwhm", "select.max_fwhm_px", dict(type=float,
         help="Leave out frames whose FWHM (px) is larger.")),
        ("--max-rms", "select.max_rms_arcsec", dict(type=float,
         help="Leave out frames whose astrometric RMS (arcsec) is larger (the solver "
              "itself fails frames above solve.max_rms_arcsec, 2.0).")),
        ("--min-matches", "select.min_matches", dict(type=int,
         help="Leave out frames with fewer matched catalog stars (the solver itself "
              "fails frames below solve.min_matches, 8); 0: no cut.")),
        ("--max-sky", "select.max_sky", dict(type=float,
         help="Leave out frames whose sky level (the manifest's background) is higher.")),
        ("--min-zp", "select.min_zp", dict(type=float,
         help="Leave out frames whose zero point is lower (frames without one stay).")),
        ("--max-zp", "select.max_zp", dict(type=float,
         help="Leave out frames whose zero point is higher (frames without one stay).")),
    ],
    "register": [
        ("--grid", "grid.method", dict(
         help="Output grid: 'reference' (a frame's pixel grid, the tutorial's way), 'optimal' "
              "(covers all frames), or a FITS/header FILE holding the WCS.")),
        ("--reference", "grid.reference", dict(
         help="Frame name giving the reference grid (default: the best solved frame of the "
              "deepest filter; named in the coadd header as REFFRAME).")),
        ("--pixel-scale", "grid.pixel_scale_arcsec", dict(type=float,
         help="Optimal grid pixel scale (arcsec); 0: the finest input scale.")),
        ("--rotation", "grid.rotation_deg", dict(type=float,
         help="Optimal grid position angle of +y, degrees east of north.")),
        ("--reproject", "register.method", dict(
         help="Reprojection: interpolation, adaptive (anti-aliased) or exact "
              "(flux-conserving spherical polygons).")),
        ("--order", "register.order", dict(
         help="Interpolation kernel for --reproject interp; lanczos3 is SWarp's default.")),
        ("--gain", "register.gain", dict(type=float,
         help="Gain in e-/ADU for the noise model, overriding the header (GAIN, EGAIN ...); "
              "0 = the header's.")),
        ("--rdnoise", "register.rdnoise", dict(type=float,
         help="Read noise in e- for the noise model, overriding the header (RDNOISE, "
              "READNOIS, RON ...; without any: from the sky scatter); < 0 = the header's.")),
        ("--background", "register.background", dict(
         help="The sky: constant (one level per frame, removed when combining unless "
              "--keep-background); 2d (a smooth mesh, --background-mesh pixels a box, "
              "removed from each frame before resampling: a sky gradient leaves no step "
              "where frames end); none (kept, as --keep-background).")),
        ("--background-mesh", "register.background_mesh", dict(type=int, metavar="PIXELS",
         help="--background 2d: box size of the background mesh.")),
        ("--clean-cosmics/--no-clean-cosmics", "register.clean_cosmics", dict(default=None,
         help="Find cosmic rays in each frame with L.A.Cosmic (astroscrappy; the frame's "
              "gain, read noise and saturation) before resampling; hits get no weight. For "
              "single frames and small stacks.")),
        ("--tile", "register.tile", dict(type=int,
         help="Output tile size in pixels (zarr chunk).")),
        ("--fast-mapping/--exact-mapping", "register.fast_mapping", dict(default=None,
         help="Evaluate the pixel mapping on a checked coarse mesh (fast) or at every "
              "pixel.")),
        ("--conserve-flux/--no-conserve-flux", "register.conserve_flux", dict(default=None,
         help="Scale by the ratio of output to input pixel area, so values are electrons "
              "per output pixel (needed when pixel scales differ).")),
    ],
    "combine": [
        ("--combine", "combine.method", dict(
         help="How frames are combined per pixel: {choices}. Several, comma-separated "
              "(e.g. mean,median), are computed from one read of the store: the first is "
              "coadd_<filter>.fits, the others coadd_<filter>_<method>.fits.")),
        ("--scale", "combine.scale", dict(
         help="Per-frame scaling before combining: none; exptime (coadd in e-/s); "
              "background (match sky levels); photometric (every frame brought to one "
              "zero point, MAGZP in the header; where a frame has none, the flux of "
              "matched catalog stars).")),
        ("--sigma", "combine.sigma", dict(type=float, help="Sigma-clipping threshold.")),
        ("--iters", "combine.iters", dict(type=int, help="Sigma-clipping iterations.")),
        ("--cenfunc", "combine.cenfunc", dict(help="Centre for sigma clipping.")),
        ("--nlow", "combine.nlow", dict(type=int, help="minmax: lowest values rejected.")),
        ("--nhigh", "combine.nhigh", dict(type=int,
         help="minmax: highest values rejected.")),
        ("--weighted-reject", "combine.weighted_reject", dict(
         help="--combine weighted: reject outliers first (sigma clipping or min/max).")),
        ("--difference/--no-difference", "combine.difference", dict(default=None,
         help="Also write OUT/difference/<frame>.fits: each frame, scaled as in the coadd, "
              "minus the coadd (brings out variable stars and transients).")),
        ("--subtract-background/--keep-background", "combine.subtract_background",
         dict(default=None, help="Remove each frame's sky level before combining "
              "(--background constant).")),
        ("--pair-sigma", "combine.pair_sigma", dict(type=float, metavar="K",
         help="Where only two frames cover a pixel (cosmic rays), reject the higher value "
              "when it exceeds the other by K sigma of the noise model (plus "
              "--pair-fraction of the lower's signal); every method but minmax; 0: off.")),
        ("--pair-fraction", "combine.pair_fraction", dict(type=float,
         help="Two frames: how much higher than the lower value's signal (star) a value "
              "may be, as a fraction, for resampling and seeing differences.")),
        ("--match-background", "combine.match_background", dict(
         help="Match the frames' sky levels across their overlaps (least squares over "
              "the overlapping pairs) so that no seam shows: auto = in a mosaic "
              "(pointings that overlap only partly, or --grid optimal).")),
    ],
    "run": [
        ("--keep-store/--no-keep-store", "register.keep_store", dict(default=None,
         help="Keep OUT/store.zarr (the registered stack, about the inputs' size "
              "uncompressed) once the coadds are written; 'daskstack combine' needs it.")),
    ],
    "cluster": [
        ("--scheduler", "cluster.scheduler", dict(
         help="Address of an existing Dask scheduler (tcp://host:8786). Workers must see "
              "the input and output paths (shared filesystem), or have them as URLs "
              "(s3://...).")),
        ("--workers", "cluster.n_workers", dict(type=int,
         help="LocalCluster worker processes (0: one per core).")),
        ("--threads", "cluster.threads_per_worker", dict(type=int,
         help="Threads per LocalCluster worker.")),
        ("--memory-limit", "cluster.memory_limit", dict(
         help="Memory limit per LocalCluster worker, e.g. 4GiB.")),
        ("--worker-profile/--no-worker-profile", "cluster.profile", dict(default=None,
         help="LocalCluster: run the workers' statistical profiler (the dashboard's "
              "Profile page, dask's performance_report); off by default, it costs CPU.")),
        ("--jobqueue", "cluster.jobqueue", dict(
         help="Run workers as batch jobs through dask-jobqueue.")),
        ("--cores", "cluster.cores", dict(type=int, help="Cores per batch job.")),
        ("--memory", "cluster.memory", dict(help="Memory per batch job.")),
        ("--walltime", "cluster.walltime", dict(help="Walltime per batch job.")),
        ("--queue", "cluster.queue", dict(help="Batch queue / partition.")),
        ("--account", "cluster.account", dict(help="Batch account / project.")),
        ("--min-jobs", "cluster.minimum_jobs", dict(type=int,
         help="Adaptive scaling: fewest batch jobs.")),
        ("--max-jobs", "cluster.maximum_jobs", dict(type=int,
         help="Adaptive scaling: most batch jobs.")),
        ("--interface", "cluster.interface", dict(
         help="Batch jobs: network interface the scheduler and workers use (e.g. ib0).")),
        ("--worker-timeout", "cluster.worker_timeout", dict(type=float, metavar="SECONDS",
         help="Batch jobs: stop when no worker has joined after this long (queued jobs "
              "that never start).")),
    ],
}


def _catalog_names() -> str:
    """The catalog services ``--catalog`` can name (`catalogs.SOURCES`), for its help."""
    from .catalogs import SOURCES

    return ", ".join(f"'{name}' ({source.title} via {source.service.upper()})"
                     for name, source in SOURCES.items() if source.service)


_CATALOG_NAMES = _catalog_names()


def _param_name(option: str) -> str:
    return option.split("/")[0].lstrip("-").replace("-", "_")


class SettingsOption(click.Option):
    """A command-line option that sets one setting (``settings_key``, e.g. 'solve.wcs')."""

    def __init__(self, *args, settings_key: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.settings_key = settings_key


def _show_default(value, option: str = "") -> str:
    """How a help text shows a setting's default: ``[value]``; a flag shows the name
    chosen by default (``[fast-mapping]``); nothing for an empty default."""
    if isinstance(value, bool):
        on, _, off = option.partition("/")
        return f"[{(on if value else off or 'no-' + on).lstrip('-')}]"
    if value in ("", None, ()) or (isinstance(value, float) and value != value):
        return ""  # nothing by default (NaN: no cut)
    return f"[{value:g}]" if isinstance(value, float) else f"[{value}]"


def _settings_option(option: str, key: str, kwargs: dict) -> dict:
    """Click keyword arguments of the option for setting ``key``: its choices (field
    metadata; a comma-separated list like combine.method names them in the help) and
    its default shown in the help, both read from the Settings declaration."""
    section, name = key.split(".")
    kw = dict(kwargs)
    choices = [c for c in option_choices(section, name) or () if c]
    if choices:
        help_text = kw.get("help", "")
        if "{choices}" in help_text:
            kw["help"] = help_text.format(choices=", ".join(choices))
        else:
            kw.setdefault("type", _choice(*choices))
    shown = _show_default(option_default(section, name), option)
    if shown:
        kw["help"] = f"{kw.get('help', '')} {shown}".strip()
    kw.setdefault("default", None)
    return {**kw, "cls": SettingsOption, "settings_key": key}


def stage_options(*groups, only=None):
    """Decorate a command with the options of ``groups`` (those named in ``only``, when
    given); they arrive in ``overrides``."""
    options = [opt for group in groups for opt in STAGE_OPTIONS[group]
               if only is None or opt[0] in only]

    def decorator(func):
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            overrides = {}
            for option, key, _ in options:
                value = kwargs.pop(_param_name(option))
                if value is not None and value != ():  # () = a repeatable option not given
                    overrides[key] = value
            return func(*args, overrides=overrides, **kwargs)

        for option, key, kwargs in reversed(options):
            click.option(option, _param_name(option), **_settings_option(option, key,
                                                                          kwargs))(wrapper)
        return wrapper

    return decorator


def common_options(func):
    func = click.option("-q", "--quiet", is_flag=True, help="Only errors; no progress.")(func)
    func = click.option("-v", "--verbose", count=True,
                        help="More log output (-v info, -vv debug).")(func)
    func = click.option("--config", "config_file", type=click.Path(dir_okay=False),
                        help="TOML settings file; options given here override it.")(func)
    return func


def _settings(config_file, overrides) -> Settings:
    """Settings from file + options, validated before any work starts."""
    try:
        settings = Settings.from_toml(config_file) if config_file else Settings()
        return settings.update(overrides).validate()
    except SettingsError as err:
        _fail(str(err))


# what a directory argument is expanded to
DIRECTORY_SUFFIXES = (".fits", ".fits.fz", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fts.gz")


def _check_inputs(frames) -> list[str]:
    """The frames named: a directory gives its FITS files; a pattern the shell left
    as it was (it matched nothing there) is expanded here, and one matching nothing
    is an error, never a file name."""
    import glob

    if not frames:
        _fail("no input frames given")
    out = []
    for item in map(str, frames):
        if is_url(item):
            out += _expand_url(item)
            continue
        path = Path(item)
        if path.is_dir():
            found = sorted(str(p) for p in path.iterdir() if p.is_file()
                           and p.name.lower().endswith(DIRECTORY_SUFFIXES))
            if not found:
                _fail(f"{item}: directory holds no FITS files "
                      f"({', '.join('*' + s for s in DIRECTORY_SUFFIXES)})")
            out += found
        elif not path.exists() and glob.has_magic(item):
            found = sorted(glob.glob(item))
            if not found:
                _fail(f"{item}: no file matches this pattern")
            out += found
        else:
            out.append(item)
    return out


def _expand_url(item: str) -> list[str]:
    """The frames a URL names, as `_check_inputs` does for paths: an object-store prefix
    gives its FITS objects, a pattern (``s3://bucket/night/*.fits.fz``) is expanded by
    the store's own listing. An ``http(s)://`` URL is one frame (a web server lists
    nothing, and '?' there begins a query, not a pattern)."""
    import glob

    from ._io import as_path

    if item.startswith(("http://", "https://")):
        return [item]
    try:
        path = as_path(item)
        if glob.has_magic(item):
            found = sorted(path.fs.unstrip_protocol(p) for p in path.fs.glob(path.path))
            if not found:
                _fail(f"{item}: no object matches this pattern")
            return found
        if path.is_dir():
            found = sorted(str(p) for p in path.iterdir()
                           if p.name.lower().endswith(DIRECTORY_SUFFIXES))
            if not found:
                _fail(f"{item}: holds no FITS objects "
                      f"({', '.join('*' + s for s in DIRECTORY_SUFFIXES)})")
            return found
    except ImportError as err:  # fsspec names the package this scheme needs
        _fail(f"{item}: {err}")
    except Exception as err:  # each store and SDK raises its own types
        _fail(f"{item}: cannot list ({type(err).__name__}: {err}); check the URL and the "
              "store's credentials (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, a profile ...)")
    return [item]


def _failure_lines(records, shown: int = 3) -> list[str]:
    """``FAILED name: reason`` per failed frame; a reason shared by several frames (a
    catalog that cannot be reached) once, with the count and the first few names."""
    by_reason: dict[str, list[str]] = {}
    for record in records:
        if record.status == "failed":
            by_reason.setdefault(record.reason, []).append(Path(record.file).name)
    lines = []
    for reason, names in by_reason.items():
        if len(names) == 1:
            lines.append(f"  FAILED {names[0]}: {reason}")
        else:
            more = ", ..." if len(names) > shown else ""
            lines.append(f"  FAILED {len(names)} frames ({', '.join(names[:shown])}{more}): "
                         f"{reason}")
    return lines


def _summary(result, quiet: bool) -> None:
    if quiet:
        _internal_errors_notice(result.n_errors, result.errors_log)
        return
    echo = functools.partial(click.echo, err=False)
    n_excluded = sum(r.status == "excluded" for r in result.frames)
    echo(f"frames: {len(result.frames)}  solved: {result.n_solved}  "
         f"in the coadd: {result.n_combined}  failed: {result.n_failed}"
         + (f"  excluded: {n_excluded} (see the manifest)" if n_excluded else ""))
    for line in _failure_lines(result.frames):
        echo(line)
    if result.timings:
        echo("time: " + "  ".join(f"{k} {v:.1f}s" for k, v in result.timings.items()))
    for filter_name, path in result.coadds.items():
        echo(f"coadd [{filter_name}]: {path}")
    differences = [p for p in result.written if p.parent.name == "difference"]
    for path in result.written:  # further methods' coadds, the colour picture
        if path not in result.coadds.values() and path not in differences:
            echo(f"wrote {path}")
    if differences:
        echo(f"wrote {len(differences)} difference images in {differences[0].parent}")
    echo(f"manifest: {result.manifest}")
    _internal_errors_notice(result.n_errors, result.errors_log)
    if "report" in result.timings and (result.out_dir / "report" / "index.html").exists():
        echo(f"report: {result.out_dir / 'report' / 'index.html'}")


def _internal_errors_notice(n_errors: int, errors_log: Path) -> None:
    """On stderr, even with -q: a bug must not pass for a bad frame. Such frames count
    as failed frames for the exit code (3 when coadds were written, else 4): the coadds
    are as usable as a partial run's; this line and errors.log tell the bug apart."""
    if n_errors:
        frames = "frame" if n_errors == 1 else "frames"
        click.echo(f"daskstack: {n_errors} {frames} hit an internal error (a bug): see "
                   f"{errors_log}, please report it", err=True)


# --------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------
@click.group(context_settings={"help_option_names": ["-h", "--help"],
                               "max_content_width": 100})
@click.version_option(package_name="daskstack")
def main():
    """Calibrate, register and co-add telescope frames with Dask.

    \b
    daskstack demo                      synthetic LCO-like frames, the whole pipeline
    daskstack run FRAMES... --catalog gaia --out DIR
    daskstack solve FRAMES... --catalog FILE --out DIR    astrometry only
    daskstack register FRAMES... --out DIR               reproject into DIR/store.zarr
    daskstack combine DIR/store.zarr --combine median    combine again, no reprojection
    daskstack report DIR                 pictures of every frame, DIR/report/index.html
    daskstack lightcurve DIR --target "RA DEC"   forced photometry from the store
    daskstack download ID... --out DIR   frames from the LCO archive
    """


@main.command()
@click.argument("frames", nargs=-1, type=click.Path())
@click.option("--catalog", default="",
              help=f"Reference catalog: {_CATALOG_NAMES} or a file (ECSV/FITS/CSV with ra, "
                   "dec, a magnitude; pmra/pmdec/ref_epoch optional). Without one, frames "
                   "keep their header WCS (--wcs auto).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Run directory: coadd_<filter>.fits, manifest.ecsv, <frame>.wcs, "
                   "store.zarr.")
@click.option("--overwrite", is_flag=True,
              help="Replace a run directory that holds a different run.")
@click.option("--report/--no-report", "report", default=False, show_default=True,
              help="Also write OUT/report/index.html: every frame with a thumbnail, failed "
                   "and flagged frames first with their pictures, and "
                   "OUT/report/suggested-exclude.txt ('daskstack report OUT' does it later).")
@click.option("--lco-frames", "lco_frames", multiple=True, type=int, metavar="ID",
              help="LCO archive frame id to download (into OUT/frames/) and process; "
                   "repeatable.")
@click.option("--lco-query", "lco_query", multiple=True, metavar="KEY=VALUE",
              help="LCO archive query whose frames are downloaded and processed; repeatable "
                   "(keys as 'daskstack download': target, ra, dec, radius, start, end, "
                   "filter, site, telescope, instrument, rlevel, proposal, obstype).")
@click.option("--lco-limit", type=int, default=None, help="At most this many queried frames.")
@click.option("--archive-url", default=None,
              help="LCO archive API base URL (default: $DASKSTACK_LCO_ARCHIVE_URL or the real "
                   "archive). The token comes from $LCO_ARCHIVE_TOKEN.")
@stage_options("solve", "register", "combine", "select", "run", "cluster")
@common_options
def run(frames, catalog, out_dir, overwrite, report, lco_frames, lco_query, lco_limit,
        archive_url, config_file, verbose, quiet, overrides):
    """Solve, register and co-add FRAMES (FITS or fpack .fits.fz; LCO SCI/BPM extensions).

    Frames can also come from the LCO archive (--lco-frames, --lco-query). Re-running
    the same command resumes: frames already solved or registered are not computed
    again. One coadd per filter.
    """
    from ._cluster import ClusterError
    from ._pipeline import RunError
    from ._pipeline import run as run_pipeline
    from ._rundir import DifferentRunError
    from .archive import OUTCOMES_NAME

    _setup_logging(verbose, quiet)
    settings = _settings(config_file, overrides)
    if not catalog and settings.solve.wcs == "solve":
        _fail("--catalog is required to solve the frames' WCS (or use --wcs header)")
    not_downloaded = []
    if (lco_frames or lco_query) and is_url(out_dir):
        _fail("--lco-frames/--lco-query download into OUT/frames/ on this machine: give a "
              "local --out, or 'daskstack download' the frames and give their URLs")
    if lco_frames or lco_query:
        downloaded, not_downloaded = _lco_download(lco_frames, lco_query, lco_limit,
                                                   archive_url, Path(out_dir) / "frames")
        if not frames and not downloaded:
            _fail(f"no frame could be downloaded ({len(not_downloaded)} failed, see "
                  f"{Path(out_dir) / 'frames' / OUTCOMES_NAME})", code=EXIT_FAILED)
        frames = tuple(frames) + tuple(downloaded)
    frames = _check_inputs(frames)
    try:
        with _interruptible():
            result = run_pipeline(frames, catalog, out_dir, settings, overwrite=overwrite,
                                  progress=ProgressBar(not quiet), report=report)
    except DifferentRunError as err:
        if err.combine_only:
            _fail(f"{err}\n  {_combine_command(out_dir, err.differences)}")
        _fail(str(err))
    except (RunError, ClusterError) as err:
        _fail(str(err), code=EXIT_USAGE)
    _summary(result, quiet)
    if not_downloaded and not quiet:
        click.echo(f"archive: {len(not_downloaded)} frames not downloaded (not in the run; see "
                   f"{Path(out_dir) / 'frames' / OUTCOMES_NAME})")
    # Frames that never arrived are failed frames too: the run is at best partial.
    code = result.exit_code
    sys.exit(EXIT_PARTIAL if code == EXIT_OK and not_downloaded else code)


@contextlib.contextmanager
def _interruptible():
    """Ctrl-C ends the command with one line, not the tracebacks of every thread and
    worker process that the interrupt reaches while the cluster shuts down."""
    try:
        yield
    except KeyboardInterrupt:
        logging.disable(logging.CRITICAL)  # the cluster's shutdown noise, from here on
        sys.stderr.flush()
        click.echo("\ninterrupted: run the same command again to resume", err=True)
        os._exit(EXIT_INTERRUPTED)  # no interpreter teardown: it would wait on workers


def _combine_command(out_dir, differences) -> str:
    """``daskstack combine OUT --combine median ...``: the options of the combine settings
    that differ, as they are written on the command line."""
    option_of = {key: option for option, key, _ in STAGE_OPTIONS["combine"]}
    words = ["daskstack", "combine", shlex.quote(str(out_dir))]
    for what, _, value in differences:
        option = option_of.get(what)
        if option is None:
            continue
        if "/" in option:  # a --flag/--no-flag pair
            words.append(option.split("/")[0 if value else 1])
        else:
            words += [option, shlex.quote(str(value))]
    return " ".join(words)


def _checked_query(query: dict, option: str) -> dict:
    """The archive query keywords, checked before any request (bad ones: exit 2)."""
    from . import archive

    try:
        archive.build_query(**query)
    except (TypeError, archive.ArchiveError) as err:
        _fail(f"{option}: {err}")
    return query


def _archive_client(archive_url, **kwargs):
    """An `ArchiveClient`; bad settings (URL, token file) are bad usage: exit 2."""
    from . import archive

    try:
        return archive.ArchiveClient(archive_url, **kwargs)
    except archive.ArchiveError as err:
        _fail(str(err))


def _archive_failures(results) -> list:
    """The failed ones of ``results`` (archive `DownloadResult`), each echoed on stderr
    (errors: shown even with --quiet)."""
    failed = [r for r in results if not r.ok]
    for result in failed:
        click.echo(f"  FAILED {result.error}", err=True)
    return failed


def _lco_download(ids, query_items, limit, archive_url, out_dir) -> tuple[list[str], list]:
    """Fetch frames from the LCO archive for `run` (verified, skipped when present): the
    paths that arrived, and the failed `DownloadResult`s (each also on stderr)."""
    from . import archive

    query = {}
    for item in query_items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            _fail(f"--lco-query {item!r}: expected KEY=VALUE")
        query[key.strip()] = value.strip()
    query = _checked_query(query, "--lco-query")
    results = []
    with _archive_client(archive_url) as client:
        try:
            paths = archive.download_frames(list(ids) or None, query or None, out_dir,
                                            limit=limit, client=client, results=results,
                                            raise_errors=False)
        except archive.ArchiveError as err:  # the archive as a whole: unreachable, ...
            _fail(str(err), code=EXIT_FAILED)
    return [str(p) for p in paths], _archive_failures(results)


@main.command()
@click.option("--out", "out_dir", default="daskstack-demo", show_default=True,
              type=click.Path(file_okay=False),
              help="Where the synthetic inputs (OUT/inputs/) and the results go.")
@click.option("--n-frames", default=8, show_default=True, type=click.IntRange(1, 1000))
@click.option("--size", default=2048, show_default=True, type=click.IntRange(64, 8192),
              help="Frame size in pixels (square).")
@click.option("--filters", default="rp,gp", show_default=True,
              help="Comma-separated filters, cycled over the frames.")
@click.option("--seed", default=1, show_default=True, type=int)
@click.option("--overwrite/--no-overwrite", default=True, show_default=True)
@click.option("--report/--no-report", "report", default=True, show_default=True,
              help="Draw every frame's pictures and write OUT/report/index.html.")
@stage_options("combine", "cluster")
@common_options
def demo(out_dir, n_frames, size, filters, seed, overwrite, report, config_file, verbose,
         quiet, overrides):
    """Generate a synthetic LCO-like field with known truth and run the whole pipeline.

    Prints frames solved, each frame's WCS error against the simulation's truth, and
    the coadd paths. Needs no network.
    """
    from ._pipeline import run as run_pipeline
    from ._validate import wcs_error_px
    from .simulate import simulate_field

    _setup_logging(verbose, quiet)
    settings = _settings(config_file, overrides)
    out = Path(out_dir)
    if not quiet:
        click.echo(f"simulating {n_frames} frames of {size}x{size} in {out / 'inputs'} ...",
                   err=True)
    field = simulate_field(out / "inputs", n_frames=n_frames, shape=(size, size),
                           filters=tuple(f.strip() for f in filters.split(",") if f.strip()),
                           seed=seed)
    with _interruptible():
        result = run_pipeline([str(p) for p in field.frames], str(field.catalog), out,
                              settings, overwrite=overwrite, progress=ProgressBar(not quiet),
                              report=report)
    if not quiet:
        click.echo("per-frame WCS error against the truth (RMS over the frame):")
        for record in result.frames:
            if record.status != "ok":
                continue
            error = wcs_error_px(record.result.wcs, field.truth_wcs[record.name],
                                 record.meta.shape)
            click.echo(f"  {record.name}: {error:.4f} px  ({record.result.n_matches} stars, "
                       f"fit rms {record.result.rms_arcsec:.3f}\")")
    _summary(result, quiet)
    sys.exit(result.exit_code)


@main.command()
@click.argument("frames", nargs=-1, type=click.Path())
@click.option("--catalog", required=True,
              help=f"Reference catalog: {_CATALOG_NAMES} or a catalog file.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Writes OUT/<frame>.wcs (FITS header with the fitted WCS) and "
                   "OUT/solve.ecsv.")
@stage_options("solve", "solve-limits", "cluster")
@common_options
def solve(frames, catalog, out_dir, config_file, verbose, quiet, overrides):
    """Astrometry only: fit a WCS to each frame, in parallel.

    Writes OUT/<name>.wcs for every solved frame (as astrometry.net's solve-field)
    and OUT/solve.ecsv with one row of QA per frame; failed frames carry a reason.
    """
    from ._cluster import ClusterError
    from ._io import as_path
    from ._pipeline import RunError, solve_files
    from ._rundir import ERRORS_FILE, INTERNAL_ERROR

    _setup_logging(verbose, quiet)
    settings = _settings(config_file, overrides)
    frames = _check_inputs(frames)
    try:
        with _interruptible():
            records = solve_files(frames, catalog, out_dir, settings,
                                  progress=ProgressBar(not quiet))
    except (RunError, ClusterError) as err:
        _fail(str(err))
    failed = [r for r in records if r.status != "ok"]
    if not quiet:
        click.echo(f"frames: {len(records)}  solved: {len(records) - len(failed)}  "
                   f"failed: {len(failed)}")
        for line in _failure_lines(failed):
            click.echo(line)
        click.echo(f"QA: {as_path(out_dir) / 'solve.ecsv'}")
    _internal_errors_notice(sum(r.reason.startswith(INTERNAL_ERROR) for r in failed),
                            as_path(out_dir) / ERRORS_FILE)
    sys.exit(outcome(len(records) - len(failed), len(failed)))


@main.command()
@click.argument("frames", nargs=-1, type=click.Path())
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Run directory; frames' WCS from OUT/<name>.wcs (daskstack solve) or "
                   "from their headers with --wcs header.")
@click.option("--wcs", "wcs_source", type=_choice("solved", "header"), default="solved",
              show_default=True, help="Where each frame's WCS comes from.")
@stage_options("register", "cluster")
@common_options
def register(frames, out_dir, wcs_source, config_file, verbose, quiet, overrides):
    """Reproject FRAMES onto one grid, tile by tile, into OUT/store.zarr."""
    from ._cluster import ClusterError
    from ._pipeline import register_files
    from ._rundir import dedupe

    _setup_logging(verbose, quiet)
    settings = _settings(config_file, overrides)
    frames = _check_inputs(frames)
    try:
        with _interruptible():
            store = register_files(frames, out_dir, settings, wcs_source=wcs_source,
                                   progress=ProgressBar(not quiet))
    except ClusterError as err:  # nothing was computed: batch jobs that cannot start
        _fail(str(err))
    except (ValueError, RuntimeError) as err:
        _fail(str(err), code=EXIT_FAILED)
    n_frames = len(dedupe(frames))
    n_registered = len(store.params.get("registered", []))
    if not quiet:
        click.echo(f"store: {store.path}  grid {store.grid.shape[1]}x{store.grid.shape[0]}  "
                   f"filters: {', '.join(store.filters)}  registered: {n_registered} of "
                   f"{n_frames} frames")
    sys.exit(outcome(n_registered, n_frames - n_registered))


def _store_and_run_dir(path) -> tuple[Path, Path]:
    """``(store, run directory)`` from either a run directory (holding store.zarr) or
    the store itself (its directory is then the run directory); either may be a URL."""
    from ._io import as_path
    from ._rundir import field_stores

    path = as_path(path)
    if (path / "store.zarr").is_dir():
        return path / "store.zarr", path
    if field_stores(path):  # a run of several fields: combine combines each field's store
        return path, path
    if (path / "manifest.ecsv").exists() or (path / "run.json").exists():
        if any(path.glob("coadd_*.fits")):  # the store was dropped (--no-keep-store)
            return path / "store.zarr", path  # combine says how to get it back
        _fail(f"{path}: a run directory without store.zarr (nothing was registered)")
    if not path.exists():
        if (path.parent / "run.json").exists():  # a run's store, dropped: combine says why
            return path, path.parent
        _fail(f"{path}: no such run directory or store")
    return path, path.resolve().parent


@main.command()
@click.argument("store_path", metavar="RUN_DIR_OR_STORE", type=click.Path(file_okay=False))
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Where coadd_<filter>.fits go (default: the run directory).")
@click.option("--overwrite", is_flag=True,
              help="Replace coadds made with other combine settings (else refused).")
@stage_options("combine", "select", "cluster")
@common_options
def combine(store_path, out_dir, overwrite, config_file, verbose, quiet, overrides):
    """Combine a registered store again (OUT or OUT/store.zarr), without reprojecting.

    A coadd made with other combine settings is never replaced without --overwrite;
    every file written is printed. Also how to leave frames out (--exclude,
    --exclude-file, quality cuts): in seconds, nothing solved or registered again, no
    --overwrite needed; the run's manifest marks them 'excluded'.
    """
    from ._cluster import ClusterError
    from ._pipeline import RunError, combine_store_path

    _setup_logging(verbose, quiet)
    settings = _settings(config_file, overrides)
    store, run_dir = _store_and_run_dir(store_path)
    out = out_dir or run_dir
    written = []
    try:
        with _interruptible():
            combine_store_path(store, out, settings, progress=ProgressBar(not quiet),
                               overwrite=overwrite, written=written)
    except (RunError, ClusterError) as err:
        _fail(str(err))
    except ValueError as err:
        _fail(str(err), code=EXIT_FAILED)
    if not quiet:
        for path in written:
            click.echo(f"wrote {path}")


@main.command("report")
@click.argument("run_dir", metavar="RUN_DIR_OR_STORE", type=click.Path(file_okay=False))
@click.option("--frames/--no-frames", "frames", default=True, show_default=True,
              help="Draw the full-size pictures of failed and flagged frames again "
                   "(--no-frames: only the thumbnails, the per-run pictures and the page; "
                   "pictures made earlier stay linked).")
@click.option("--frame", "pictures", multiple=True, metavar="NAME",
              help="Also draw this frame's full-size pictures (sources and catalog before "
                   "and after the fit, residuals); repeatable.")
@click.option("--all-pictures", is_flag=True,
              help="Draw every frame's full-size pictures (costs about as much as solving).")
@stage_options("cluster", only=("--workers", "--scheduler"))
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors; no progress.")
def report_command(run_dir, frames, pictures, all_pictures, verbose, quiet, overrides):
    """Write RUN_DIR/report/index.html from the manifest, the .wcs files and the store.

    Nothing of the pipeline is computed again. The page is static (open it from the
    file system, no server or network needed): every frame in a table that sorts and
    filters, with a thumbnail; frames that stand out from their group (filter,
    telescope, night) flagged with why, and listed in RUN_DIR/report/suggested-exclude.txt
    for --exclude-file; full-size pictures of failed and flagged frames (--frame NAME
    or --all-pictures for others: the frame is read, its sources detected again and
    matched through the solved WCS).
    """
    from ._cluster import ClusterError
    from ._pipeline import RunError, make_report
    from ._rundir import run_settings

    _setup_logging(verbose, quiet)
    run_path = _store_and_run_dir(run_dir)[1]
    if not (run_path / "manifest.ecsv").exists():
        _fail(f"{run_dir}: no manifest.ecsv (not a daskstack run directory)")
    try:  # the run's settings, with where to draw as given here
        settings = run_settings(run_path).update(overrides).validate()
    except SettingsError as err:
        _fail(str(err))
    progress = ProgressBar(not quiet)
    try:
        with _interruptible():
            path = make_report(run_path, settings, frames=frames, pictures=pictures,
                               all_pictures=all_pictures, progress=progress)
    except (RunError, ClusterError) as err:
        _fail(str(err), code=EXIT_FAILED)
    if not quiet:
        click.echo(f"report: {path}")
        click.echo(f"suggested exclusions: {path.parent / 'suggested-exclude.txt'}")


@main.command("lightcurve")
@click.argument("run_dir", metavar="RUN_DIR_OR_STORE",
                type=click.Path(exists=True, file_okay=False))
@click.option("--target", "targets", multiple=True, required=True, metavar='"RA DEC"',
              help='A sky position, degrees or sexagesimal (RA in hours): "80.879 -1.173" '
                   'or "05:23:31 -01:10:24"; repeatable.')
@click.option("--target-name", "names", multiple=True, metavar="NAME",
              help="Names of the targets, in the order given (file names: default from "
                   "the coordinates); repeatable.")
@click.option("--catalog", default="",
              help="Catalog to choose the comparison stars from (a file, or gaia / "
                   "gaia-tap; default: the run's).")
@stage_options("cluster", only=("--workers", "--scheduler"))
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors; no progress.")
def lightcurve(run_dir, targets, names, catalog, verbose, quiet, overrides):
    """Light curves of sky positions from the registered frames (RUN_DIR or its store).

    Forced aperture photometry at each --target on every registered frame (a small box
    around each star read from RUN_DIR/store.zarr, never whole frames), calibrated with
    each frame's zero point (frames without one: flux, no mag, flag 8), and differential
    against comparison stars chosen from the run's catalog or --catalog (bright,
    isolated, unsaturated, near the target). Writes RUN_DIR/lightcurves/<name>.ecsv (mjd, frame,
    filter, site, flux, flux_err, mag, mag_err, zp, zp_err, airmass, fwhm, flags, then
    diff_mag, diff_mag_err, n_comp, aper_corr; one row per frame) and <name>.png;
    `daskstack report` then shows them.
    """
    from ._cluster import ClusterError
    from ._pipeline import RunError, lightcurve_store_path
    from ._rundir import run_settings
    from .lightcurve import LightcurveError

    _setup_logging(verbose, quiet)
    store, run_path = _store_and_run_dir(run_dir)
    try:
        settings = (run_settings(run_path) if (run_path / "run.json").exists()
                    else Settings()).update(overrides).validate()
    except SettingsError as err:
        _fail(str(err))
    try:
        with _interruptible():
            written = lightcurve_store_path(store, targets, names, settings, catalog=catalog,
                                            progress=ProgressBar(not quiet))
    except (LightcurveError, RunError, ClusterError) as err:
        _fail(str(err))
    except ValueError as err:  # a store that is not daskstack's
        _fail(str(err), code=EXIT_FAILED)
    if not quiet:
        for name, path in written.items():
            click.echo(f"light curve [{name}]: {path}")


@main.command("download")
@click.argument("ids", nargs=-1, type=click.IntRange(min=1), metavar="[ID]...")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory for the frames and their index lco-index.ecsv.")
@click.option("--target", help="Object name (part of it, any case), e.g. 'M 66'.")
@click.option("--ra", help="RA of a position the frames must cover: degrees or hh:mm:ss.")
@click.option("--dec", help="Dec of that position: degrees or dd:mm:ss.")
@click.option("--radius", type=click.FloatRange(min=0, max=10), default=0.0, show_default=True,
              help="Also frames within this many degrees of --ra/--dec (0: covering it).")
@click.option("--start", help="Earliest DATE-OBS, e.g. 2021-05-01 or 2021-05-01T12:00:00.")
@click.option("--end", help="Latest DATE-OBS (a date alone includes that whole day).")
@click.option("--filter", "filter_", metavar="NAME", help="Filter, e.g. rp, V, gp.")
@click.option("--site", help="Site code, e.g. ogg, coj, lsc, cpt, elp, tfn.")
@click.option("--telescope", help="Telescope id, e.g. 2m0a, 1m0a, 0m4a.")
@click.option("--instrument", help="Instrument id, e.g. ep02, fa14.")
@click.option("--rlevel", type=int, help="Reduction level: 91 = processed by BANZAI, 0 = raw.")
@click.option("--proposal", help="Proposal id, e.g. LCOEPO2014B-010.")
@click.option("--obstype", help="Observation type, e.g. EXPOSE, STANDARD, SKYFLAT.")
@click.option("--limit", type=click.IntRange(min=1), help="At most this many query matches.")
@click.option("--archive-url", metavar="URL",
              help="Archive API root (default: $DASKSTACK_LCO_ARCHIVE_URL, else "
                   "https://archive-api.lco.global).")
@click.option("--token-env", metavar="NAME", default="LCO_ARCHIVE_TOKEN", show_default=True,
              help="Environment variable holding the API token (proprietary data only).")
@click.option("--token-file", type=click.Path(dir_okay=False, exists=True),
              help="File whose first line is the API token (instead of the variable).")
@click.option("--workers", type=click.IntRange(min=1), default=4, show_default=True,
              help="Downloads at once.")
@click.option("--retries", type=click.IntRange(min=0), default=4, show_default=True,
              help="Retries on timeouts, 5xx and truncated downloads (backoff doubles).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=60.0,
              show_default=True, help="Seconds to wait for the server.")
@click.option("--dry-run", is_flag=True, help="List the matching frames, download nothing.")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors.")
def download(ids, out_dir, target, ra, dec, radius, start, end, filter_, site, telescope,
             instrument, rlevel, proposal, obstype, limit, archive_url, token_env, token_file,
             workers, retries, timeout, dry_run, verbose, quiet):
    """Download LCO frames by ID and/or by archive query into --out.

    Each file is checked against the archive's md5 and written atomically; frames
    already present and verified are not fetched again, so a re-run costs nothing.
    Each record is judged alone: one the archive got wrong (unsafe file name, no
    url, 404, wrong md5, truncated) fails with its reason and the others download.
    The paths are printed, one per line; the failures and a summary go to stderr,
    every frame's outcome to OUT/lco-download.ecsv. Exit 0 all downloaded or
    present, 3 some failed, 4 none arrived, 2 bad options. For proprietary data put
    your archive API token in $LCO_ARCHIVE_TOKEN (never on the command line).

    \b
    Examples:
      daskstack download 915222 934536 --out frames/
      daskstack download --target "M 66" --filter rp --rlevel 91 \\
          --start 2021-05-01 --end 2021-05-31 --limit 50 --out frames/
    """
    from . import archive

    _setup_logging(verbose, quiet)
    query = {
        key: value for key, value in {
            "target": target, "ra": ra, "dec": dec, "radius": radius or None, "start": start,
            "end": end, "filter": filter_, "site": site, "telescope": telescope,
            "instrument": instrument, "rlevel": rlevel, "proposal": proposal,
            "obstype": obstype,
        }.items() if value is not None
    }
    if not ids and not query:
        _fail("give frame ids or at least one query option (--target, --ra/--dec, ...)")
    query = _checked_query(query, "query options")
    results = []
    with _archive_client(archive_url, token_file=token_file, token_env=token_env,
                         timeout=timeout, retries=retries, max_workers=workers) as client:
        try:
            if dry_run:
                records, results = archive.resolve_records(client, ids, query or None, limit)
                for rec in records:
                    click.echo(f"{rec.id}\t{rec.filename}\t{rec.filter}\t{rec.date_obs}\t"
                               f"{rec.site}")
                failed = _archive_failures(results)
                if not quiet:
                    click.echo(f"{len(records)} frames, {len(failed)} refused", err=True)
                sys.exit(outcome(len(records), len(failed)))
            paths = archive.download_frames(ids, query or None, out_dir, limit=limit,
                                            client=client, results=results,
                                            raise_errors=False)
        except archive.ArchiveError as err:  # the archive as a whole: unreachable, ...
            _fail(str(err), code=EXIT_FAILED)
    for path in paths:
        click.echo(str(path))
    failed = _archive_failures(results)
    if not quiet:
        n_new = sum(r.status == "downloaded" for r in results)
        n_present = sum(r.status == "present" for r in results)
        click.echo(f"{n_new} downloaded, {n_present} already present, {len(failed)} failed "
                   f"-> {out_dir}" + (" (no frame matched)" if not results else ""), err=True)
    sys.exit(outcome(len(paths), len(failed)))


if __name__ == "__main__":
    sys.exit(main())
