"""Settings: every option of every stage in one validated object, with a TOML form.

A TOML file has one table per section (``[detect]``, ``[match]`` ...) with the
field names below; options given on the command line override the file. All
checks run in `Settings.validate`, before any work starts.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .combine import COMBINE_METHODS, REJECTIONS
from .errors import DaskstackError
from .register import KERNELS
from .sky import BACKGROUNDS

__all__ = [
    "CatalogSettings",
    "ClusterSettings",
    "CombineSettings",
    "DetectSettings",
    "GridSettings",
    "PhotometrySettings",
    "RegisterSettings",
    "SelectSettings",
    "SettingsError",
    "Settings",
    "SolveSettings",
    "option_choices",
    "option_default",
]


class SettingsError(DaskstackError, ValueError):
    """An option with a value that cannot work; the message names the option."""


def _choices(*values) -> dict:
    """Field metadata: the values an option may take. The CLI's choices and help, and
    `Settings.validate`, all read them from here (`option_choices`). One table instead
    of values (``COMBINE_METHODS``) is kept as it is: its keys, as they are when read."""
    return {"choices": values[0] if len(values) == 1 and isinstance(values[0], dict)
            else tuple(values)}


# the columns every reference catalog is normalised to (daskstack.catalogs)
CATALOG_COLUMNS = ("ra", "dec", "mag", "pmra", "pmdec", "ref_epoch")


@dataclass(frozen=True)
class DetectSettings:
    threshold_sigma: float = 5.0  # detection threshold above the local background noise
    max_stars: int = 300  # brightest usable stars kept for matching
    min_separation_fwhm: float = 2.5  # isolation: no brighter neighbour within this many FWHM
    edge_pixels: int = 8  # stars this close to the frame edge are dropped
    background_box: int = 128  # box size of the 2-D background mesh (pixels)
    # The photocentres for astrometry (daskstack.detect.isophotal_centroids): isophotal
    # barycentres above iso_threshold_sigma x sky RMS (image filtered with SExtractor's
    # 3 x 3 kernel), within iso_radius_fwhm x FWHM of the star. From the sweep in
    # benchmarks/results/detect-sweep-20261130.md (python -m benchmarks detect-sweep): on the
    # 9 real frames 3.5 sigma gives the smallest error against LCO's solution (median
    # 0.167", worst 0.362"; 2 sigma: 0.183"/0.472", 6 sigma: 0.216"/0.463"), and any radius
    # of 2-4 FWHM the same within 0.01". On simulated asymmetric / comatic / trailed PSFs
    # with exact photocentre truth a lower isophote is better (2 sigma: 0.07"/0.22"/0.03"
    # against 0.12"/0.30"/0.09" at 3.5 sigma): LCO's solution shares the isophotal positions
    # of SExtractor-like software; against Gaia on comatic optics try 2.
    iso_threshold_sigma: float = 3.5
    iso_radius_fwhm: float = 3.0
    # Sharp objects (cosmic rays, hot pixels) are flagged: second-moment FWHM below
    # sharp_fwhm_ratio x the frame FWHM, or a peak pixel holding more than
    # sharp_peak_fraction of the aperture flux.
    sharp_fwhm_ratio: float = 0.55
    sharp_peak_fraction: float = 0.9
    # Crowding: a neighbour within min_separation_fwhm x FWHM with more than
    # crowd_flux_ratio of the brighter one's flux flags both; within the measuring
    # aperture (1.4 x FWHM), a neighbour above crowd_aperture_flux_ratio flags the brighter.
    crowd_flux_ratio: float = 0.1
    crowd_aperture_flux_ratio: float = 0.02


@dataclass(frozen=True)
class CatalogSettings:
    source: str = "gaia"  # "gaia", "gaia-tap", or a path to an ECSV/FITS/CSV catalog
    mag_limit: float = 19.0  # faintest catalog stars used
    max_stars: int = 1000  # brightest catalog stars used per field
    cache_dir: str = ""  # on-disk cache of service queries; "" = <out>/catalog-cache
    propagate_pm: bool = True  # move stars from the catalog epoch to each frame's DATE-OBS
    timeout: float = 60.0  # seconds per service request
    retries: int = 4
    # a catalog file's unusual column names: "ra=RA_DEG,dec=DEC_DEG,mag=Gmag" ("" = the
    # usual names, found by alias)
    columns: str = ""
    # the band a catalog file's `mag` column is in, for zero points ("" = none: only the
    # file's own <band>_mag columns calibrate; daskstack.photcal)
    mag_band: str = field(default="", metadata=_choices("", "u", "g", "r", "i", "z", "y"))

    @property
    def column_map(self) -> dict[str, str]:
        """``columns`` as ``{normalised name: the file's column}``; `SettingsError` if bad."""
        mapping = {}
        for item in (i.strip() for i in self.columns.split(",")):
            if not item:
                continue
            key, sep, column = (part.strip() for part in item.partition("="))
            if not sep or not column or key.lower() not in CATALOG_COLUMNS:
                raise SettingsError(
                    f"catalog.columns: {item!r} is not NAME=COLUMN with NAME one of "
                    f"{', '.join(CATALOG_COLUMNS)} (e.g. ra=RA_DEG,dec=DEC_DEG,mag=Gmag)")
            mapping[key.lower()] = column
        return mapping


@dataclass(frozen=True)
class PhotometrySettings:
    """Per-frame zero points (`daskstack.photcal`), measured while solving."""

    zero_points: bool = True  # measure each solved frame's zero point (catalog bands)
    aperture_fwhm: float = 1.5  # aperture radius, in FWHM of the frame
    # the aperture correction (to total flux) from bright stars in this radius (FWHM)
    correction_fwhm: float = 5.0
    min_stars: int = 3  # fewer usable catalog stars: no zero point
    clip_sigma: float = 3.0
    # fit a colour term (g-r) per filter, camera and night with the frames' zero points
    colour_term: bool = True


@dataclass(frozen=True)
class SolveSettings:
    # "auto": solve with a catalog, else the header WCS where the header calls it good;
    # "solve": fit a new WCS (the header WCS only the start); "header": the header WCS
    wcs: str = field(default="auto", metadata=_choices("auto", "solve", "header"))
    search_radius_arcmin: float = 20.0  # how far the true centre may be from the header's
    scale_tolerance: float = 0.05  # fractional error allowed in the header pixel scale
    allow_flip: bool = True  # also try a mirrored sky (parity change)
    sip_order: int = 0  # 0 = TAN only, 2..4 = TAN-SIP
    min_matches: int = 8  # fewer matched stars: failed
    max_rms_arcsec: float = 2.0  # larger RMS residual: failed
    match_radius_arcsec: float = 0.0  # 0 = derived from the frame's FWHM and pixel scale
    clip_sigma: float = 3.0
    max_false_alarm: float = 1e-4  # largest accepted false-alarm probability of a pattern match
    max_skew: float = 0.02  # largest accepted axis ratio - 1 of the fitted CD matrix
    centroid_floor_px: float = 0.03  # fit weights 1/(sigma_centroid^2 + floor^2)
    companion_fraction: float = 0.6  # companions: a source must be in this fraction of them
    companion_max_shift_arcsec: float = 30.0  # companions: largest dither between exposures
    # thin frames solved with the geometry of the night's solved exposures: fewer matches
    # suffice because only the shift is searched (the false-alarm test still applies)
    constrained_min_matches: int = 4

    def wcs_source(self, catalog: str) -> str:
        """Where the frames' WCS comes from, 'solve' or 'header', given the catalog
        (``""`` = none): what ``wcs = "auto"`` means."""
        if self.wcs == "auto":
            return "solve" if catalog else "header"
        return self.wcs


@dataclass(frozen=True)
class GridSettings:
    method: str = "reference"  # "reference", "optimal", or the path of a FITS header/WCS file
    # frame name for method="reference"; "" = the best solved frame of the deepest filter
    reference: str = ""
    pixel_scale_arcsec: float = 0.0  # optimal grid: 0 = the finest input scale
    rotation_deg: float = 0.0  # optimal grid: position angle of +y
    shape: tuple[int, int] | None = None  # optimal grid: force (ny, nx)


@dataclass(frozen=True)
class RegisterSettings:
    method: str = field(default="interp", metadata=_choices("interp", "adaptive", "exact"))
    # interpolation order for method="interp"
    # its names: a new kernel is one row of register.KERNELS
    order: str = field(default="bilinear", metadata=_choices(*KERNELS))
    tile: int = 1024  # output tile size (pixels) = zarr chunk size on the sky axes
    fast_mapping: bool = True  # evaluate the pixel mapping on a coarse mesh (checked)
    mapping_tolerance_px: float = 0.01  # max mesh-interpolation error before the exact path
    conserve_flux: bool = True  # scale by output/input pixel area: e- per output pixel
    # noise model (daskstack.noise): override the header's gain (e-/ADU; 0 = the header's
    # GAIN or an alternative keyword) and read noise (e-; < 0 = the header's RDNOISE ...)
    gain: float = 0.0
    rdnoise: float = -1.0
    # the sky (sky.BACKGROUNDS): "constant" = one level per frame, removed by the
    # combine unless combine.subtract_background is false; "2d" = a smooth mesh
    # (background_mesh pixels a box) removed from each frame before resampling; "none"
    background: str = field(default="constant", metadata=_choices(BACKGROUNDS))
    background_mesh: int = 128
    # L.A.Cosmic (astroscrappy) on each frame before resampling: hits get no weight
    clean_cosmics: bool = False
    # False: remove store.zarr once the coadds are written (it is ~ the inputs' size
    # uncompressed; `daskstack combine` needs it, the same run with it kept rebuilds it)
    keep_store: bool = True


@dataclass(frozen=True)
class CombineSettings:
    # "mean", "median", "sigclip", "minmax", "weighted"; several, comma-separated, give
    # one coadd each from one read of the store (the first is coadd_<filter>.fits)
    method: str = field(default="sigclip", metadata=_choices(COMBINE_METHODS))
    scale: str = field(default="exptime", metadata=_choices(
        "none", "exptime", "background", "photometric"))
    sigma: float = 3.0
    iters: int = 3
    # centre for sigma clipping
    cenfunc: str = field(default="median", metadata=_choices("median", "mean"))
    nlow: int = 1  # minmax: lowest values rejected per pixel
    nhigh: int = 1  # minmax: highest values rejected per pixel
    subtract_background: bool = True  # remove each frame's sky level before combining
    # method="weighted": reject outliers first
    weighted_reject: str = field(default="none", metadata=_choices(REJECTIONS))
    difference: bool = False  # also write each frame minus the coadd (variable sources)
    # where only two frames cover a pixel, the higher value is rejected when it exceeds
    # the other by pair_sigma x their noise plus pair_fraction x the lower's signal
    # (combine.TWO_FRAME_REJECTIONS: every method but minmax); pair_sigma 0: off
    pair_sigma: float = 4.0
    pair_fraction: float = 0.5
    # match the frames' sky levels across their overlaps (offsets by least squares,
    # daskstack.skymatch): "auto" = in a mosaic (pointings that overlap only partly,
    # or --grid optimal), "on" = always, "off" = never
    match_background: str = field(default="auto", metadata=_choices("auto", "on", "off"))

    @property
    def methods(self) -> list[str]:
        """The combine methods asked for, in order (the first is the main coadd)."""
        return [m.strip() for m in self.method.split(",") if m.strip()]


@dataclass(frozen=True)
class SelectSettings:
    """Which registered frames go into the coadds: combine-time settings (changing them
    combines the store again; nothing is solved or registered again). A cut whose QA
    value a frame does not have (NaN: e.g. no zero point) leaves that frame in."""

    exclude: tuple[str, ...] = ()  # frame names (or file names) left out
    exclude_file: str = ""  # a file of frame names, one a line, '#' comments
    max_fwhm_px: float = float("nan")  # NaN = no cut
    max_rms_arcsec: float = float("nan")
    min_matches: int = 0  # 0 = no cut
    max_sky: float = float("nan")  # sky level (the manifest's background)
    min_zp: float = float("nan")  # zero point, where frames have one
    max_zp: float = float("nan")


@dataclass(frozen=True)
class ClusterSettings:
    scheduler: str = ""  # "" = a LocalCluster; "tcp://host:port" = an existing scheduler
    n_workers: int = 0  # LocalCluster workers; 0 = one per core
    threads_per_worker: int = 1
    memory_limit: str = "auto"
    # LocalCluster: the workers' statistical profiler (distributed samples every task
    # thread's stack 100 times a second, on the worker's event loop), which only the
    # dashboard's Profile page and dask's performance_report read: off unless asked for
    profile: bool = False
    # dask-jobqueue; "" = none
    jobqueue: str = field(default="", metadata=_choices(
        "", "slurm", "pbs", "sge", "lsf", "oar", "moab", "htcondor"))
    cores: int = 2
    memory: str = "4GiB"
    walltime: str = "01:00:00"
    queue: str = ""
    account: str = ""
    minimum_jobs: int = 0
    maximum_jobs: int = 4
    interface: str = ""  # jobqueue: network interface of scheduler and workers (e.g. ib0)
    python: str = ""  # jobqueue: python on the compute nodes; "" = this interpreter
    worker_directory: str = ""  # jobqueue: workers' scratch on the node; "" = <out>/.dask
    job_prologue: str = ""  # jobqueue: shell lines run before each worker (module load ...)
    job_directives: str = ""  # jobqueue: extra scheduler directives, one per line
    # jobqueue: seconds to wait for the first worker to join; then the run stops
    worker_timeout: float = 300.0


@dataclass(frozen=True)
class Settings:
    """All options of a run. ``Settings()`` are the defaults."""

    detect: DetectSettings = field(default_factory=DetectSettings)
    catalog: CatalogSettings = field(default_factory=CatalogSettings)
    solve: SolveSettings = field(default_factory=SolveSettings)
    photometry: PhotometrySettings = field(default_factory=PhotometrySettings)
    grid: GridSettings = field(default_factory=GridSettings)
    register: RegisterSettings = field(default_factory=RegisterSettings)
    combine: CombineSettings = field(default_factory=CombineSettings)
    select: SelectSettings = field(default_factory=SelectSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)

    # -- building -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict) -> Settings:
        return cls().update(values)

    @classmethod
    def from_toml(cls, path) -> Settings:
        path = Path(path)
        try:
            values = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise SettingsError(f"{path}: cannot read settings ({err})") from None
        return cls.from_dict(values)

    def update(self, values: dict) -> Settings:
        """New Settings with ``{"section": {"field": value}}`` (or ``{"section.field":
        value}``) set, each value converted and checked; ``self`` is not changed."""
        changes: dict[str, dict] = {}
        for key, value in values.items():
            if "." in key:
                section, name = key.split(".", 1)
                changes.setdefault(section, {})[name] = value
            elif isinstance(value, dict):
                changes.setdefault(key, {}).update(value)
            else:
                raise SettingsError(f"unknown setting {key!r}: expected a [section] table")
        settings = self
        for section, fields in changes.items():
            settings = settings.replace(section, **fields)
        return settings

    def replace(self, section: str, **values) -> Settings:
        """New Settings with fields of one section changed (converted and checked like
        `update`): ``settings.replace("combine", method="median")``."""
        group = getattr(self, section, None)
        if group is None or not dataclasses.is_dataclass(group):
            sections = ", ".join(f.name for f in dataclasses.fields(self))
            raise SettingsError(f"unknown settings section [{section}] (one of: {sections})")
        kinds = {f.name: f for f in dataclasses.fields(group)}
        for name in values:
            if name not in kinds:
                raise SettingsError(
                    f"unknown setting {section}.{name} (one of: {', '.join(sorted(kinds))})"
                )
        converted = {name: _coerce(f"{section}.{name}", value, option_default(section, name))
                     for name, value in values.items()}
        return dataclasses.replace(self, **{section: dataclasses.replace(group, **converted)})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # -- checking -------------------------------------------------------------------------
    def validate(self) -> Settings:
        """Raise `SettingsError` for the first option that cannot work."""
        for (section, name), choices in _CHOICES.items():
            value = getattr(getattr(self, section), name)
            values = self.combine.methods if (section, name) == ("combine", "method") else [
                value]
            if not values or any(v not in choices for v in values):
                raise SettingsError(
                    f"{section}.{name} = {value!r} is not one of {', '.join(map(repr, choices))}"
                )
        positive = [
            ("detect", "threshold_sigma"), ("detect", "max_stars"), ("detect", "background_box"),
            ("catalog", "max_stars"), ("catalog", "timeout"),
            ("solve", "search_radius_arcmin"), ("solve", "min_matches"),
            ("solve", "max_rms_arcsec"), ("solve", "clip_sigma"),
            ("register", "tile"), ("register", "mapping_tolerance_px"),
            ("register", "background_mesh"),
            ("combine", "sigma"), ("combine", "iters"), ("cluster", "cores"),
            ("cluster", "worker_timeout"), ("photometry", "aperture_fwhm"),
            ("photometry", "min_stars"), ("photometry", "clip_sigma"),
        ]
        for section, name in positive:
            if not getattr(getattr(self, section), name) > 0:
                raise SettingsError(f"{section}.{name} must be > 0")
        nonnegative = [
            ("register", "gain"),
            ("detect", "edge_pixels"), ("catalog", "retries"), ("solve", "match_radius_arcsec"),
            ("grid", "pixel_scale_arcsec"),
            ("combine", "nlow"), ("combine", "nhigh"), ("cluster", "n_workers"),
            ("combine", "pair_sigma"), ("combine", "pair_fraction"),
            ("select", "min_matches"),
            ("cluster", "minimum_jobs"),
        ]
        for section, name in nonnegative:
            if getattr(getattr(self, section), name) < 0:
                raise SettingsError(f"{section}.{name} must be >= 0")
        _check_detect(self.detect)
        if not self.photometry.correction_fwhm > self.photometry.aperture_fwhm:
            raise SettingsError("photometry.correction_fwhm must be > photometry.aperture_fwhm")
        if not 0 <= self.solve.scale_tolerance < 0.5:
            raise SettingsError("solve.scale_tolerance must be in [0, 0.5)")
        if not 0 < self.solve.max_false_alarm < 1:
            raise SettingsError("solve.max_false_alarm must be in (0, 1)")
        if not 0 < self.solve.companion_fraction <= 1:
            raise SettingsError("solve.companion_fraction must be in (0, 1]")
        if not self.solve.centroid_floor_px > 0:
            raise SettingsError("solve.centroid_floor_px must be > 0")
        if not self.solve.max_skew > 0:
            raise SettingsError("solve.max_skew must be > 0")
        if not self.solve.companion_max_shift_arcsec > 0:
            raise SettingsError("solve.companion_max_shift_arcsec must be > 0")
        if self.solve.constrained_min_matches < 3:
            raise SettingsError("solve.constrained_min_matches must be >= 3")
        if self.solve.sip_order not in (0, 2, 3, 4):
            raise SettingsError("solve.sip_order must be 0 (TAN only), 2, 3 or 4")
        if self.register.tile < 64:
            raise SettingsError("register.tile must be at least 64 pixels")
        if self.register.background_mesh < 16:
            raise SettingsError("register.background_mesh must be at least 16 pixels")
        if self.register.background == "2d" and not self.combine.subtract_background:
            raise SettingsError("register.background = '2d' removes the sky; "
                                "combine.subtract_background = false (--keep-background) "
                                "asks to keep it: choose one (--background none keeps it)")
        if self.cluster.maximum_jobs < self.cluster.minimum_jobs:
            raise SettingsError("cluster.maximum_jobs must be >= cluster.minimum_jobs")
        if self.grid.method not in ("reference", "optimal") and not Path(self.grid.method).exists():
            raise SettingsError(
                f"grid.method = {self.grid.method!r}: not 'reference', 'optimal' or an existing "
                "FITS header/WCS file"
            )
        for name in ("max_fwhm_px", "max_rms_arcsec"):
            if getattr(self.select, name) <= 0:  # NaN (no cut) compares False
                raise SettingsError(f"select.{name} must be > 0")
        if self.select.min_zp > self.select.max_zp:
            raise SettingsError("select.min_zp must be <= select.max_zp")
        if self.cluster.scheduler and self.cluster.jobqueue:
            raise SettingsError("cluster.scheduler and cluster.jobqueue exclude each other")
        _check_cluster(self.cluster)
        self.catalog.column_map  # noqa: B018  (raises SettingsError when unreadable)
        if self.cluster.scheduler and "://" not in self.cluster.scheduler:
            raise SettingsError(
                f"cluster.scheduler = {self.cluster.scheduler!r}: expected an address like "
                "tcp://host:8786"
            )
        return self


def _section_class(section: str) -> type:
    for f in dataclasses.fields(Settings):
        if f.name == section:
            return f.default_factory
    raise SettingsError(f"unknown settings section [{section}]")


def option_default(section: str, name: str):
    """The default of setting ``section.name``, as its dataclass declares it."""
    return getattr(_section_class(section)(), name)


def option_choices(section: str, name: str) -> tuple[str, ...] | None:
    """The values setting ``section.name`` may take (its field's ``choices`` metadata),
    or None for a free value."""
    for f in dataclasses.fields(_section_class(section)):
        if f.name == name:
            choices = f.metadata.get("choices")
            return None if choices is None else tuple(choices)
    raise SettingsError(f"unknown setting {section}.{name}")


# every option with a vocabulary, read from the fields' metadata (one declaration each)
_CHOICES = {
    (section.name, f.name): f.metadata["choices"]
    for section in dataclasses.fields(Settings)
    for f in dataclasses.fields(section.default_factory)
    if "choices" in f.metadata
}


def _check_detect(ds: DetectSettings) -> None:
    """The isophote, sharpness and crowding settings: ranges in which they mean something."""
    if not ds.iso_threshold_sigma > 0:
        raise SettingsError("detect.iso_threshold_sigma must be > 0")
    if not ds.iso_radius_fwhm >= 1:
        raise SettingsError("detect.iso_radius_fwhm must be >= 1 (the isophote of a star "
                            "reaches at least its FWHM)")
    if not 0 < ds.sharp_fwhm_ratio < 1:
        raise SettingsError("detect.sharp_fwhm_ratio must be in (0, 1)")
    if not 0 < ds.sharp_peak_fraction <= 1:
        raise SettingsError("detect.sharp_peak_fraction must be in (0, 1]")
    for name in ("crowd_flux_ratio", "crowd_aperture_flux_ratio"):
        if not 0 <= getattr(ds, name) <= 1:
            raise SettingsError(f"detect.{name} must be in [0, 1]")
    if not ds.min_separation_fwhm > 0:
        raise SettingsError("detect.min_separation_fwhm must be > 0")


def _check_cluster(cs: ClusterSettings) -> None:
    """Sizes, walltime and addresses of `ClusterSettings`, checked before anything starts."""
    import re

    from dask.utils import parse_bytes

    if cs.threads_per_worker < 1:
        raise SettingsError("cluster.threads_per_worker must be >= 1")
    if cs.maximum_jobs < 1:
        raise SettingsError("cluster.maximum_jobs must be >= 1")
    checks = [("memory", cs.memory)]
    if cs.memory_limit.strip().lower() not in ("auto", "0", "none"):
        checks.append(("memory_limit", cs.memory_limit))
    for name, value in checks:
        try:
            size = float(value) if re.fullmatch(r"0?\.\d+", value.strip()) else parse_bytes(value)
        except (ValueError, TypeError):
            size = None
        if size is None or size <= 0:
            raise SettingsError(
                f"cluster.{name} = {value!r}: expected a size like 4GiB or 500MB"
                + (", 'auto' or a fraction of the machine like 0.5" if name == "memory_limit"
                   else "")
            )
    if not re.fullmatch(r"(\d+-)?\d+(:\d{1,2}){0,2}", cs.walltime.strip()):
        raise SettingsError(
            f"cluster.walltime = {cs.walltime!r}: expected [D-]HH:MM:SS, e.g. 01:30:00"
        )
    if cs.scheduler:
        match = re.fullmatch(r"(tcp|tls|inproc|ucx|ws|wss)://([^:/\s]+|\[[0-9a-fA-F:]+\])"
                             r"(:(\d+))?/?", cs.scheduler.strip())
        if not match or (match.group(4) and not 0 < int(match.group(4)) < 65536):
            raise SettingsError(
                f"cluster.scheduler = {cs.scheduler!r}: expected an address like "
                "tcp://host:8786"
            )


def _coerce(name: str, value, default):
    """Convert ``value`` to the type of ``default``; a clear error if it cannot be."""
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered in ("1", "true", "yes", "on"):
                    return True
                if lowered in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, str):
            return str(value)
        if isinstance(default, tuple):  # select.exclude: names
            values = [value] if isinstance(value, str) else list(value)
            return tuple(str(v) for v in values)
        if default is None and value is not None:  # grid.shape
            if value in ("", "none"):
                return None
            if isinstance(value, str):
                value = value.replace("x", ",").split(",")
            ny, nx = (int(v) for v in value)
            return (ny, nx)
    except (TypeError, ValueError):
        raise SettingsError(
            f"{name} = {value!r} cannot be read as {type(default).__name__}"
        ) from None
    return value
