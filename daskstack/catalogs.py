"""Reference catalogs: files or catalog services, normalised, cached, moved to the frame epoch.

Every catalog leaves this module as an astropy `Table` with the columns

* ``ra``, ``dec`` -- degrees, ICRS, at ``ref_epoch``
* ``mag`` -- magnitude used for brightness ordering (Gaia G, or the file's)
* ``pmra``, ``pmdec`` -- proper motion, mas/yr (``pmra`` includes cos(dec)); 0 if unknown
* ``ref_epoch`` -- decimal Julian year of the positions; NaN = no proper motion known
* ``<band>_mag``, ``<band>_mag_err`` -- where the catalog carries them, magnitudes in the
  bands of `BANDS` (``g_mag`` ... ``z_mag``: SDSS / Pan-STARRS-like, AB), for the
  photometric calibration (`daskstack.photcal`); ``meta['photsys']`` says whose system

sorted brightest first. The catalogs a run can name are the entries of `SOURCES`
(`CatalogSource`: its service query, the bands it carries, the epoch of its positions):
Gaia DR3 through astroquery (``'gaia'``: MAST ``Catalogs`` as in the learn.astropy
tutorial; ``'gaia-tap'``: the ESA Gaia TAP service), whose G and BP-RP become g, r, i
by the published Gaia DR3 relations (`gaia_sdss_magnitudes`); Pan-STARRS DR2
(``'panstarrs'``, MAST ``Catalogs``) and ATLAS-RefCat2 (``'refcat2'``, VizieR), which
carry g, r, i, z themselves; and local files (their ``<band>_mag`` columns, or ``mag``
declared as a band with ``CatalogSettings.mag_band``). `query_source`
wraps every service once: retries with exponential backoff, and a cache on disk per
field (catalog, rounded centre, radius, magnitude limit, service) with atomic writes:
500 frames of one field query the service once, and a cached field works offline.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.table import Table

from ._io import atomic_path
from .config import CatalogSettings
from .errors import DaskstackError

__all__ = [
    "CatalogError",
    "CatalogSource",
    "BANDS",
    "GAIA_DR3_EPOCH",
    "GAIA_SDSS_RELATIONS",
    "GaiaRelation",
    "SOURCES",
    "band_columns",
    "cache_path",
    "catalog_source",
    "gaia_sdss_magnitudes",
    "load_catalog",
    "normalize_catalog",
    "photometric_system",
    "propagate_proper_motion",
    "query_gaia",
    "query_source",
    "reference_catalog",
]

log = logging.getLogger(__name__)

GAIA_DR3_EPOCH = 2016.0

# accepted column names (lower-cased) for each normalised column, first match wins
ALIASES = {
    "ra": ("ra", "ra_deg", "raj2000", "ra_icrs", "radeg", "alpha_j2000", "ra_j2000", "_raj2000"),
    "dec": ("dec", "dec_deg", "dej2000", "decj2000", "de_icrs", "dec_icrs", "dedeg",
            "delta_j2000", "dec_j2000", "_dej2000"),
    "mag": ("mag", "phot_g_mean_mag", "gmag", "g_mag", "phot_g_mean_mag_", "rmag", "r_mag",
            "vmag", "mag_auto", "magnitude"),
    "pmra": ("pmra", "pm_ra", "pmra_cosdec", "pmrac"),
    "pmdec": ("pmdec", "pm_dec", "pmde"),
    "ref_epoch": ("ref_epoch", "epoch", "refepoch"),
}


# the photometric bands a catalog may carry as ``<band>_mag`` (and ``<band>_mag_err``)
BANDS = ("u", "g", "r", "i", "z", "y")
# exactly these names: "Gmag" (Gaia's G) or "gmag" of some other system must not pass
# for the SDSS-like g band
_BAND_COLUMN = re.compile(r"^([ugrizy])_mag(_err)?$")


class CatalogError(DaskstackError, RuntimeError):
    """A catalog that cannot be read or fetched; the message names the file or service."""


def _find(colnames, key):
    lower = {c.lower(): c for c in colnames}
    for alias in ALIASES[key]:
        if alias in lower:
            return lower[alias]
    return None


def _plain(column) -> np.ndarray:
    """Column values as a float array (masked -> NaN, Quantity -> value)."""
    values = getattr(column, "value", column)
    if np.ma.isMaskedArray(values):
        values = values.astype(float).filled(np.nan)
    return np.asarray(values, dtype=float)


def normalize_catalog(table: Table, name: str = "<table>", default_epoch: float | None = None
                      ) -> Table:
    """Rename and convert a catalog table to ra, dec, mag, pmra, pmdec, ref_epoch.

    Rows without finite ra/dec are dropped; a missing magnitude becomes NaN (such
    rows sort last); missing proper motions become 0 with ``ref_epoch`` NaN unless
    ``default_epoch`` is given. Raises `CatalogError` naming ``name`` and the
    missing columns.
    """
    cols = {key: _find(table.colnames, key) for key in ALIASES}
    missing = [key for key in ("ra", "dec") if cols[key] is None]
    if missing:
        raise CatalogError(
            f"{name}: missing column(s) {', '.join(missing)} (accepted names: "
            + "; ".join(f"{k}: {'/'.join(ALIASES[k][:4])}" for k in missing)
            + f"; found: {', '.join(table.colnames[:12])})"
        )
    ra = _plain(table[cols["ra"]])
    dec = _plain(table[cols["dec"]])
    if str(getattr(table[cols["ra"]], "unit", "") or "") in ("rad",):
        ra, dec = np.degrees(ra), np.degrees(dec)
    n = len(table)
    mag = _plain(table[cols["mag"]]) if cols["mag"] else np.full(n, np.nan)
    pmra = _plain(table[cols["pmra"]]) if cols["pmra"] else np.zeros(n)
    pmdec = _plain(table[cols["pmdec"]]) if cols["pmdec"] else np.zeros(n)
    if cols["ref_epoch"]:
        epoch = _plain(table[cols["ref_epoch"]])
    else:
        epoch = np.full(n, np.nan if default_epoch is None else float(default_epoch))
    has_pm = np.isfinite(pmra) & np.isfinite(pmdec)
    pmra = np.where(has_pm, pmra, 0.0)
    pmdec = np.where(has_pm, pmdec, 0.0)
    epoch = np.where(has_pm, epoch, np.nan)
    good = np.isfinite(ra) & np.isfinite(dec) & (np.abs(dec) <= 90)
    out = Table({
        "ra": np.mod(ra[good], 360.0), "dec": dec[good], "mag": mag[good],
        "pmra": pmra[good], "pmdec": pmdec[good], "ref_epoch": epoch[good],
    })
    out["ra"].unit = u.deg
    out["dec"].unit = u.deg
    out["mag"].unit = u.mag
    out["pmra"].unit = u.mas / u.yr
    out["pmdec"].unit = u.mas / u.yr
    for column, band, is_err in _band_columns_of(table):
        out[f"{band}_mag" + ("_err" if is_err else "")] = _plain(table[column])[good]
    order = np.argsort(np.where(np.isfinite(out["mag"]), out["mag"], np.inf), kind="stable")
    out = out[order]
    out.meta["source"] = name
    return out


def _band_columns_of(table: Table):
    """``(column, band, is_error)`` of the ``<band>_mag`` / ``<band>_mag_err`` columns of a
    table (lower case, as written: ``r_mag``, ``r_mag_err``)."""
    found, seen = [], set()
    for column in table.colnames:
        match = _BAND_COLUMN.match(column)
        if match is None:
            continue
        key = (match.group(1).lower(), bool(match.group(2)))
        if key not in seen:
            seen.add(key)
            found.append((column, *key))
    return found


def band_columns(table: Table) -> list[str]:
    """The bands of `BANDS` a normalised catalog carries magnitudes in (``['g', 'r']``)."""
    return [b for b in BANDS if f"{b}_mag" in table.colnames]


def load_catalog(path, columns: dict[str, str] | None = None) -> Table:
    """Read an ECSV / FITS / CSV (or other astropy-readable) catalog and normalise it.

    ``columns`` maps normalised names to the file's own column names where the usual
    aliases do not find them, e.g. ``{"ra": "RA_DEG", "dec": "DEC_DEG", "mag": "Gmag"}``
    (any case); a mapped column the file lacks is an error naming the columns it has.
    """
    path = Path(path)
    if not path.exists():
        raise CatalogError(f"{path}: catalog file does not exist")
    suffix = "".join(path.suffixes).lower()
    fmt = None
    if suffix.endswith(".ecsv"):
        fmt = "ascii.ecsv"
    elif suffix.endswith(".csv"):
        fmt = "ascii.csv"
    elif any(suffix.endswith(s) for s in (".fits", ".fit", ".fits.gz", ".fts")):
        fmt = "fits"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            table = Table.read(path, format=fmt) if fmt else Table.read(path)
    except Exception as err:  # astropy raises many types for unreadable tables
        raise CatalogError(f"{path}: cannot read catalog ({type(err).__name__}: {err})") from None
    if columns:
        table = _rename_columns(table, columns, path)
    table = normalize_catalog(table, name=str(path))
    if len(table) == 0:
        raise CatalogError(f"{path}: catalog holds no stars (no row with finite ra/dec)")
    return table


def _rename_columns(table: Table, columns: dict[str, str], path) -> Table:
    """The file's columns named in ``columns`` under their normalised names (which the
    aliases find first); other columns of those names are dropped."""
    lower = {c.lower(): c for c in table.colnames}
    missing = [f"{key}={name}" for key, name in columns.items() if name.lower() not in lower]
    if missing:
        raise CatalogError(f"{path}: no column {', '.join(missing)} (--catalog-columns); "
                           f"found: {', '.join(table.colnames[:20])}")
    picked = {key: table[lower[name.lower()]] for key, name in columns.items()}
    table = table.copy(copy_data=False)
    table.remove_columns([c for c in table.colnames if c.lower() in picked])
    for key, column in picked.items():
        table[key] = column
    return table


def propagate_proper_motion(table: Table, epoch: float | None) -> Table:
    """Move stars from their ``ref_epoch`` to ``epoch`` (decimal Julian year).

    Linear propagation on the sphere (tangent-plane offsets ``pmra * dt`` east,
    ``pmdec * dt`` north); enough for decades at mas/yr precision for the stars
    of a field. Rows with NaN ``ref_epoch`` or zero proper motion are unchanged.
    Returns a new table with ``ref_epoch`` set to ``epoch`` for moved rows.
    """
    out = table.copy()
    if epoch is None or len(out) == 0 or not np.isfinite(epoch):
        return out
    ref_epoch = _plain(out["ref_epoch"]) if "ref_epoch" in out.colnames else np.full(len(out), np.nan)
    pmra = _plain(out["pmra"]) if "pmra" in out.colnames else np.zeros(len(out))
    pmdec = _plain(out["pmdec"]) if "pmdec" in out.colnames else np.zeros(len(out))
    dt = float(epoch) - ref_epoch
    move = np.isfinite(dt) & ((pmra != 0) | (pmdec != 0))
    if not move.any():
        return out
    ra = _plain(out["ra"])
    dec = _plain(out["dec"])
    dt = np.where(move, dt, 0.0)
    d_east = np.radians(pmra * dt / 3.6e6)
    d_north = np.radians(pmdec * dt / 3.6e6)
    # gnomonic: tangent-plane offsets (xi, eta) about each star's own position
    r0, d0 = np.radians(ra), np.radians(dec)
    rho = np.hypot(d_east, d_north)
    with np.errstate(invalid="ignore", divide="ignore"):
        c = np.arctan(rho)
        sinc, cosc = np.sin(c), np.cos(c)
        new_dec = np.arcsin(cosc * np.sin(d0) + np.where(rho > 0, d_north * sinc * np.cos(d0) / rho, 0))
        new_ra = r0 + np.arctan2(d_east * sinc,
                                 rho * np.cos(d0) * cosc - d_north * np.sin(d0) * sinc)
    new_ra = np.where(rho > 0, new_ra, r0)
    new_dec = np.where(rho > 0, new_dec, d0)
    out["ra"] = np.where(move, np.mod(np.degrees(new_ra), 360.0), ra)
    out["dec"] = np.where(move, np.degrees(new_dec), dec)
    out["ra"].unit = u.deg
    out["dec"].unit = u.deg
    out["ref_epoch"] = np.where(move, float(epoch), ref_epoch)
    return out


# -- sources: the reference catalogs a run can name ----------------------------------------
def _field_key(center: SkyCoord, radius_deg: float, mag_limit: float, service: str) -> str:
    c = center.icrs
    return (f"{service}_ra{c.ra.deg:08.3f}_dec{c.dec.deg:+08.3f}_r{radius_deg:.3f}"
            f"_m{mag_limit:.1f}")


def cache_path(cache_dir, center: SkyCoord, radius_deg: float, mag_limit: float,
               service: str, catalog: str = "gaia") -> Path:
    """Where a field's query is cached: one ECSV per (catalog, rounded centre, radius, mag,
    service)."""
    key = _field_key(center, radius_deg, mag_limit, service)
    digest = hashlib.sha1(key.encode()).hexdigest()[:8]
    return Path(cache_dir) / f"{catalog.lower()}-{key}-{digest}.ecsv"


# -- photometric bands from Gaia DR3 ------------------------------------------------------
@dataclass(frozen=True)
class GaiaRelation:
    """``G - band = sum(coefficients[k] * (BP-RP)**k)``, valid for ``low < BP-RP < high``,
    with ``sigma`` (mag) the scatter of the stars about the fit."""

    band: str
    coefficients: tuple[float, ...]
    sigma: float
    low: float
    high: float


# The published Gaia (E)DR3 -> SDSS relations as functions of BP-RP: Riello et al. 2021,
# A&A 649, A3, Table C.2 (coefficients and sigma) and Table C.1 (validity ranges), as in
# the Gaia DR3 documentation, chapter 5.5.1 ("Relationships with other photometric
# systems"; DR3 photometry is EDR3's). There is no published relation for u or z from
# G and BP-RP: a u' or z_s frame gets no zero point from Gaia.
GAIA_SDSS_RELATIONS = {relation.band: relation for relation in (
    GaiaRelation("g", (0.2199, -0.6365, -0.1548, 0.0064), 0.0745, 0.3, 3.0),
    GaiaRelation("r", (-0.09837, 0.08592, 0.1907, -0.1701, 0.02263), 0.03776, 0.0, 3.0),
    GaiaRelation("i", (-0.293, 0.6404, -0.09609, -0.002104), 0.04092, 0.5, 2.0),
)}


def gaia_sdss_magnitudes(g, bp_rp, band: str, g_err=None) -> tuple[np.ndarray, np.ndarray]:
    """SDSS-like ``band`` magnitudes and errors from Gaia G and BP-RP (`GAIA_SDSS_RELATIONS`).

    ``band = G - (G - band)(BP-RP)``; the error is the relation's scatter (and ``g_err``,
    where given) in quadrature. Outside the relation's validity range of BP-RP, or
    without a colour: NaN (a star is never given a magnitude the relation does not
    cover). KeyError for a band without a relation.
    """
    relation = GAIA_SDSS_RELATIONS[band]
    g = np.asarray(g, float)
    colour = np.asarray(bp_rp, float)
    g_minus = np.polynomial.polynomial.polyval(colour, relation.coefficients)
    valid = (colour > relation.low) & (colour < relation.high) & np.isfinite(g)
    mag = np.where(valid, g - g_minus, np.nan)
    err = np.full(np.shape(mag), relation.sigma)
    if g_err is not None:
        err = np.hypot(err, np.nan_to_num(np.asarray(g_err, float)))
    return mag, np.where(valid, err, np.nan)


def _gaia_bands(raw: Table) -> Table:
    """Gaia's raw result with ``<band>_mag`` and ``_err`` from G and BP-RP added."""
    lower = {c.lower(): c for c in raw.colnames}
    g = lower.get("phot_g_mean_mag")
    if g is None:
        return raw
    bp, rp = lower.get("phot_bp_mean_mag"), lower.get("phot_rp_mean_mag")
    if "bp_rp" in lower:
        colour = _plain(raw[lower["bp_rp"]])
    elif bp and rp:
        colour = _plain(raw[bp]) - _plain(raw[rp])
    else:
        return raw
    raw = raw.copy(copy_data=False)
    for band in GAIA_SDSS_RELATIONS:
        raw[f"{band}_mag"], raw[f"{band}_mag_err"] = gaia_sdss_magnitudes(
            _plain(raw[g]), colour, band)
    return raw


def _query_mast(center: SkyCoord, radius_deg: float, mag_limit: float, timeout: float) -> Table:
    from astroquery.mast import Catalogs

    Catalogs.TIMEOUT = timeout
    table = Catalogs.query_region(center, radius=radius_deg * u.deg, catalog="Gaia", version=3)
    if "phot_g_mean_mag" in table.colnames:
        mag = _plain(table["phot_g_mean_mag"])
        table = table[np.isfinite(mag) & (mag <= mag_limit)]
    return table


def _query_tap(center: SkyCoord, radius_deg: float, mag_limit: float, timeout: float) -> Table:
    from astroquery.gaia import Gaia

    c = center.icrs
    adql = (
        "SELECT source_id, ra, dec, phot_g_mean_mag, bp_rp, pmra, pmdec, ref_epoch "
        "FROM gaiadr3.gaia_source WHERE 1 = CONTAINS(POINT('ICRS', ra, dec), "
        f"CIRCLE('ICRS', {c.ra.deg:.8f}, {c.dec.deg:.8f}, {radius_deg:.6f})) "
        f"AND phot_g_mean_mag <= {mag_limit:.3f}"
    )
    job = Gaia.launch_job_async(adql)
    return job.get_results()


PANSTARRS_BANDS = ("g", "r", "i", "z", "y")


def _query_panstarrs(center: SkyCoord, radius_deg: float, mag_limit: float,
                     timeout: float) -> Table:
    """Pan-STARRS1 DR2 mean PSF magnitudes (MAST ``Catalogs``, ``catalog='Panstarrs'``),
    stars seen at least twice; PS1's -999 (no measurement) becomes NaN."""
    from astroquery.mast import Catalogs

    Catalogs.TIMEOUT = timeout
    columns = ["objID", "raMean", "decMean", "nDetections"] + [
        f"{b}{kind}" for b in PANSTARRS_BANDS for kind in ("MeanPSFMag", "MeanPSFMagErr")]
    raw = Catalogs.query_region(center, radius=radius_deg * u.deg, catalog="Panstarrs",
                                data_release="dr2", table="mean", columns=columns,
                                nDetections=[("gte", 2)], rMeanPSFMag=[("lte", mag_limit)])
    table = Table({"ra": _plain(raw["raMean"]), "dec": _plain(raw["decMean"])})
    for band in PANSTARRS_BANDS:
        for kind, suffix in (("MeanPSFMag", "_mag"), ("MeanPSFMagErr", "_mag_err")):
            values = _plain(raw[f"{band}{kind}"])
            table[f"{band}{suffix}"] = np.where(values > -900, values, np.nan)
    return table


REFCAT2_VIZIER = "J/ApJ/867/105/refcat2"  # Tonry et al. 2018, ATLAS All-Sky Stellar Reference
REFCAT2_BANDS = ("g", "r", "i", "z")


def _query_refcat2(center: SkyCoord, radius_deg: float, mag_limit: float,
                   timeout: float) -> Table:
    """ATLAS-RefCat2 (VizieR ``J/ApJ/867/105``): Pan-STARRS-system g, r, i, z and Gaia
    positions and proper motions at epoch 2015.5."""
    from astroquery.vizier import Vizier

    columns = ["RA_ICRS", "DE_ICRS", "pmRA", "pmDE"] + [
        name for b in REFCAT2_BANDS for name in (f"{b}mag", f"e_{b}mag")]
    vizier = Vizier(columns=columns, row_limit=-1, timeout=timeout,
                    column_filters={"rmag": f"<{mag_limit:.2f}"})
    # no astroquery cache: daskstack keeps its own (`cache_path`, keyed by the query's
    # settings); astroquery's, in the user's home, would answer an identical request
    # again from an old response without asking the service
    found = vizier.query_region(center, radius=radius_deg * u.deg, catalog=REFCAT2_VIZIER,
                                cache=False)
    if not len(found):
        return Table({"ra": [], "dec": [], "mag": []})
    raw = found[0]
    table = Table({"ra": _plain(raw["RA_ICRS"]), "dec": _plain(raw["DE_ICRS"]),
                   "pmra": _plain(raw["pmRA"]), "pmdec": _plain(raw["pmDE"])})
    for band in REFCAT2_BANDS:
        table[f"{band}_mag"] = _plain(raw[f"{band}mag"])
        table[f"{band}_mag_err"] = _plain(raw[f"e_{band}mag"])
    return table


# The network queries by service name: ``(center, radius_deg, mag_limit, timeout) -> Table``
# of the service's own columns (tests replace entries to work offline).
_SERVICES = {"mast": _query_mast, "tap": _query_tap, "panstarrs": _query_panstarrs,
             "refcat2": _query_refcat2}


def _fetch_service(source, spec, center, radius_deg, settings) -> Table:
    if center is None or radius_deg is None:
        raise CatalogError(f"{spec}: a field centre and radius are needed to query "
                           f"{source.catalog}")
    return query_source(source, center, radius_deg, settings.mag_limit,
                        timeout=settings.timeout, retries=settings.retries,
                        cache_dir=settings.cache_dir or None)


def _fetch_file(source, spec, center, radius_deg, settings) -> Table:
    table = load_catalog(spec, settings.column_map)
    band = settings.mag_band
    if band and f"{band}_mag" not in table.colnames:
        # the person declares which band the file's `mag` is in (a file's own r_mag wins)
        table[f"{band}_mag"] = table["mag"]
    table.meta["photsys"] = photometric_system(spec, settings)
    if center is not None and radius_deg is not None and len(table):
        sep = SkyCoord(table["ra"], table["dec"], unit="deg").separation(center).deg
        table = table[sep <= radius_deg]
    mag = _plain(table["mag"])
    return table[~(mag > settings.mag_limit)]


@dataclass(frozen=True)
class CatalogSource:
    """A reference catalog a run can use, as ``--catalog NAME`` names it.

    name : what the user writes (``'gaia'``); `SOURCES` is keyed by it.
    catalog, release : the catalog (``'Gaia'``, ``'DR3'``) for messages, table metadata
        and the cache files' names.
    service : key of its query in `_SERVICES` (and part of its cache key); None for a
        local file.
    bands : ``((band, column of the service's result), ...)``, the magnitudes the catalog
        carries; the first becomes the normalised ``mag`` (brightness order, limit).
    epoch : decimal year of the positions where the rows do not say (Gaia DR3: 2016.0).
    photsys : the photometric system of its ``<band>_mag`` columns (the coadd's PHOTSYS).
    derive : ``raw Table -> raw Table`` adding ``<band>_mag`` columns the catalog does not
        carry itself (Gaia: g, r, i from G and BP-RP); None = nothing to add.
    fetch : ``(source, spec, center, radius_deg, settings) -> normalised Table``;
        services go through `query_source` (cache and retries), files through
        `load_catalog`.
    """

    name: str
    catalog: str
    release: str
    service: str | None
    bands: tuple[tuple[str, str], ...]
    epoch: float | None
    fetch: Callable = _fetch_service
    photsys: str = ""
    derive: Callable | None = None

    @property
    def title(self) -> str:
        return f"{self.catalog} {self.release}".strip()


GAIA_BANDS = (("G", "phot_g_mean_mag"),)
GAIA_PHOTSYS = "SDSS from Gaia DR3 G, BP-RP (Riello+2021)"

# The sources a run can name; a new catalog is one entry here (and, for a new service,
# its query in _SERVICES), plus its tests.
SOURCES = {source.name: source for source in (
    CatalogSource("gaia", "Gaia", "DR3", "mast", GAIA_BANDS, GAIA_DR3_EPOCH,
                  photsys=GAIA_PHOTSYS, derive=_gaia_bands),
    CatalogSource("gaia-tap", "Gaia", "DR3", "tap", GAIA_BANDS, GAIA_DR3_EPOCH,
                  photsys=GAIA_PHOTSYS, derive=_gaia_bands),
    # PS1 positions: means over 2010-2014 (no proper motions)
    CatalogSource("panstarrs", "Pan-STARRS1", "DR2", "panstarrs", (("r", "r_mag"),), 2012.0,
                  photsys="Pan-STARRS1 DR2 (AB)"),
    CatalogSource("refcat2", "ATLAS-RefCat2", "", "refcat2", (("r", "r_mag"),), 2015.5,
                  photsys="ATLAS-RefCat2 (Pan-STARRS1 AB)"),
    CatalogSource("file", "catalog file", "", None, (), None, _fetch_file),
)}
FILE_SOURCE = SOURCES["file"]


def photometric_system(spec, settings: CatalogSettings | None = None) -> str:
    """What the zero points of frames calibrated against catalog ``spec`` are in (the
    coadd's PHOTSYS): a source's system, or for a file its name and, with
    ``settings.mag_band``, that its ``mag`` was declared to be that band."""
    source = catalog_source(spec)
    if source is not FILE_SOURCE:
        return source.photsys
    band = settings.mag_band if settings is not None else ""
    name = Path(str(spec)).name
    return f"{name} mag as {band} (declared)" if band else f"{name} <band>_mag"


def catalog_source(spec) -> CatalogSource:
    """The source that ``spec`` names: an entry of `SOURCES` (``'gaia'``, ``'gaia-tap'``),
    else a catalog file (``spec`` is its path)."""
    return SOURCES.get(str(spec), FILE_SOURCE)


def query_source(source: CatalogSource, center: SkyCoord, radius_deg: float,
                 mag_limit: float = 19.0, timeout: float = 60.0, retries: int = 4,
                 cache_dir=None, backoff: float = 2.0) -> Table:
    """Stars of a service catalog within ``radius_deg`` of ``center``, normalised (see
    module notes), with retries and the on-disk cache written once for every source.

    Parameters
    ----------
    source : CatalogSource
        A service source (``source.service`` set), e.g. ``SOURCES['gaia']``.
    center : SkyCoord
    radius_deg : float
    mag_limit : float
        Faintest magnitude kept (in the source's first band).
    timeout : float
        Seconds per request (where the service supports it).
    retries : int
        Further attempts after a failure, waiting ``backoff * 2**k`` s in between.
    cache_dir : path or None
        If given, the normalised result is cached there (atomic ECSV write) and a
        cached field is returned without any network access.

    Raises
    ------
    CatalogError
        Naming the catalog, the service and the field, after the last attempt failed.
    """
    service = source.service
    field_desc = (f"field RA {center.icrs.ra.deg:.4f} Dec {center.icrs.dec.deg:+.4f} "
                  f"radius {radius_deg:.3f} deg")
    path = (cache_path(cache_dir, center, radius_deg, mag_limit, service, source.catalog)
            if cache_dir else None)
    if path is not None and path.exists():
        try:
            cached = Table.read(path, format="ascii.ecsv")
            log.debug("%s %s: cached %s (%d stars)", source.catalog, service, path.name,
                      len(cached))
            return cached
        except Exception as err:  # a damaged cache file: query again
            log.warning("ignoring unreadable catalog cache %s (%s)", path, err)
    query = _SERVICES[service]
    last = None
    for attempt in range(int(retries) + 1):
        try:
            raw = query(center, radius_deg, mag_limit, timeout)
            break
        except Exception as err:  # network errors come in many types
            last = err
            log.warning("%s %s query failed (attempt %d/%d) for %s: %s", source.catalog,
                        service, attempt + 1, retries + 1, field_desc, err)
            if attempt < retries:
                time.sleep(backoff * 2**attempt)
    else:
        raise CatalogError(
            f"{source.catalog} query via {service} failed after {int(retries) + 1} attempts "
            f"for {field_desc}: {type(last).__name__}: {last}"
        )
    if source.derive is not None:
        raw = source.derive(raw)
    band, column = source.bands[0]
    if column in raw.colnames and "mag" not in raw.colnames:
        raw = raw.copy(copy_data=False)
        # the first band orders and limits the stars (a copy: a band column stays a band)
        raw["mag"] = raw[column]
    table = normalize_catalog(raw, name=f"{source.title} ({service})",
                              default_epoch=source.epoch)
    mag = _plain(table["mag"])
    table = table[~(mag > mag_limit)]
    table.meta.update({"service": service, "field": field_desc, "mag_limit": mag_limit,
                       "band": band, "photsys": source.photsys})
    if path is not None:
        with atomic_path(path) as tmp:
            table.write(tmp, format="ascii.ecsv")
    return table


def query_gaia(center: SkyCoord, radius_deg: float, mag_limit: float = 19.0,
               service: str = "mast", timeout: float = 60.0, retries: int = 4,
               cache_dir=None, backoff: float = 2.0) -> Table:
    """Gaia DR3 stars within ``radius_deg`` of ``center``: `query_source` of the Gaia
    source on ``service``, ``'mast'`` (MAST ``Catalogs.query_region(catalog="Gaia",
    version=3)``) or ``'tap'`` (ESA Gaia TAP)."""
    gaia = {s.service: s for s in SOURCES.values() if s.catalog == "Gaia"}
    if service not in gaia:
        raise CatalogError(f"unknown Gaia service {service!r} (one of: {', '.join(gaia)})")
    return query_source(gaia[service], center, radius_deg, mag_limit, timeout=timeout,
                        retries=retries, cache_dir=cache_dir, backoff=backoff)


def reference_catalog(source, center: SkyCoord | None = None, radius_deg: float | None = None,
                      settings: CatalogSettings | None = None, epoch: float | None = None
                      ) -> Table:
    """The one entry point: a normalised catalog for a field, optionally at ``epoch``.

    Parameters
    ----------
    source : str or path
        A name of `SOURCES` (``'gaia'`` = Gaia DR3 via MAST, ``'gaia-tap'`` = ESA TAP),
        or a catalog file.
    center, radius_deg
        The field (needed for a service; for a file, stars farther than ``radius_deg``
        from ``center`` are dropped when both are given).
    settings : CatalogSettings
        ``mag_limit``, ``max_stars`` (brightest kept), ``cache_dir``, ``propagate_pm``,
        ``timeout``, ``retries``.
    epoch : float or None
        Decimal year to propagate proper motions to (if ``settings.propagate_pm``).
    """
    settings = settings or CatalogSettings()
    found = catalog_source(source)
    table = found.fetch(found, str(source), center, radius_deg, settings)
    if settings.max_stars and len(table) > settings.max_stars:
        table = table[: settings.max_stars]
    if settings.propagate_pm and epoch is not None:
        table = propagate_proper_motion(table, epoch)
    return table
