"""Quality control across frames: which frames to leave out, and which stand out.

Pure functions of small per-frame QA records (``{name: {column: value}}``, the
manifest's columns; a value that is unknown is None or NaN), no I/O:

* `excluded_frames`: the frames a person asked to leave out of the coadds, by name
  (``--exclude``, ``--exclude-file``) or by a quality cut (``--max-fwhm``, ``--max-rms``,
  ``--min-matches``, ``--max-sky``, ``--min-zp``/``--max-zp``), each with the rule that
  removed it;
* `find_outliers`: frames that stand out from the frames they should resemble, found the
  way a person looking at the numbers would: per group of comparable frames (same
  filter, telescope and instrument, night), a robust centre (median) and spread (MAD),
  and a frame far from the centre on the side that is bad;
* `parse_name_list` / `format_name_list`: the ``--exclude-file`` format (one frame name
  a line, ``#`` comments), so that ``report/suggested-exclude.txt`` is read as written.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from ._stats import mad_sigma
from .frames import frame_name

__all__ = [
    "CUTS",
    "METRICS",
    "OUTLIER_SIGMA",
    "Cut",
    "Metric",
    "excluded_frames",
    "find_outliers",
    "finite_or_none",
    "format_name_list",
    "frame_group",
    "group_statistics",
    "has_zero_points",
    "metric_values",
    "outlier_metrics",
    "parse_name_list",
    "qa_value",
]


@dataclass(frozen=True)
class Cut:
    """A quality cut: command-line option, `SelectSettings` field, QA column, bound."""

    option: str
    setting: str
    column: str
    bound: str  # "max": values above are cut; "min": values below are cut


CUTS = (
    Cut("--max-fwhm", "max_fwhm_px", "fwhm_px", "max"),
    Cut("--max-rms", "max_rms_arcsec", "rms_arcsec", "max"),
    Cut("--min-matches", "min_matches", "n_matches", "min"),
    Cut("--max-sky", "max_sky", "background", "max"),
    Cut("--min-zp", "min_zp", "zp", "min"),
    Cut("--max-zp", "max_zp", "zp", "max"),
)


def finite_or_none(value) -> float | None:
    """``value`` as a float; None when it is missing, masked (ECSV), not a number or not
    finite."""
    if value is None or np.ma.is_masked(value):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def qa_value(qa: dict, column: str) -> float | None:
    """A frame's QA value (`finite_or_none`); the matched stars of a frame never matched
    to a catalog (no RMS: its header WCS was used) are unknown, not 0."""
    value = finite_or_none(qa.get(column))
    if column == "n_matches" and finite_or_none(qa.get("rms_arcsec")) is None:
        return None
    return value


def has_zero_points(qa: dict[str, dict]) -> bool:
    return any(qa_value(row, "zp") is not None for row in qa.values())


def _active_cuts(select) -> list[tuple[Cut, float]]:
    cuts = []
    for cut in CUTS:
        limit = getattr(select, cut.setting)
        if cut.setting == "min_matches" and not limit:
            continue
        if limit is not None and math.isfinite(float(limit)):
            cuts.append((cut, float(limit)))
    return cuts


def excluded_frames(qa: dict[str, dict], select, listed: dict[str, str] | None = None,
                    ) -> dict[str, str]:
    """``{frame name: reason}`` for the frames of ``qa`` to leave out.

    ``select`` is a `daskstack.config.SelectSettings`; ``listed`` maps frame names given
    by a person to where they were given (``"--exclude"``, ``"--exclude-file F"``), beside
    ``select.exclude``. Names may be file names (``x-e91.fits.fz``): they are matched by
    frame name. The first rule that removes a frame is its reason.
    """
    wanted = {frame_name(n): "--exclude" for n in select.exclude}
    wanted.update({frame_name(n): how for n, how in (listed or {}).items()})
    out: dict[str, str] = {}
    cuts = _active_cuts(select)
    for name, row in qa.items():
        if name in wanted:
            out[name] = f"excluded by {wanted[name]}"
            continue
        for cut, limit in cuts:
            value = qa_value(row, cut.column)
            if value is None:
                continue
            if (value > limit) if cut.bound == "max" else (value < limit):
                relation = ">" if cut.bound == "max" else "<"
                out[name] = (f"excluded by {cut.option} {limit:g}: {cut.column} "
                             f"{value:.4g} {relation} {limit:g}")
                break
    return out


def parse_name_list(text: str) -> list[str]:
    """Frame names from ``--exclude-file`` text: one a line; blank lines and everything
    after a ``#`` ignored; file names taken as their frame names."""
    names = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(frame_name(line))
    return names


def format_name_list(reasons: dict[str, str], heading: str = "") -> str:
    """The ``--exclude-file`` text for ``{name: why}``: each name with its why as a
    comment (read back by `parse_name_list` as the names alone)."""
    lines = [f"# {line}" for line in heading.splitlines()]
    lines += [f"{name}  # {why}" for name, why in reasons.items()]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# Outliers
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Metric:
    """A QA column looked at across frames: which side is bad, and a floor of its spread
    relative to the median (frames that agree closely must not flag their noise)."""

    column: str
    label: str
    bad: str  # "high", "low" or "both"
    floor: float
    unit: str = ""


METRICS = (
    Metric("fwhm_px", "FWHM", "high", 0.08, "px"),
    Metric("elongation", "elongation", "high", 0.05),
    Metric("background", "sky", "high", 0.10),
    Metric("transparency", "flux ratio", "low", 0.08),  # clouds: less light than the others
    Metric("rms_arcsec", "RMS", "high", 0.15, "\""),
    Metric("n_matches", "matched stars", "low", 0.10),
    Metric("zp", "zero point", "both", 0.0),  # a floor of 0.02 mag is added below
)
OUTLIER_SIGMA = 5.0  # robust sigmas from the group's median
MIN_GROUP = 4  # fewer comparable frames: no statistics, nothing flagged
_ZP_FLOOR_MAG = 0.02


def frame_group(row: dict) -> str:
    """The group of comparable frames: filter / telescope and instrument / night. Night:
    LCO's DAY-OBS in the frame name where there is one (the local date at the start of
    the night), else the UTC date of the exposure shifted by half a day."""
    filt = str(row.get("filter") or "?")
    camera = "-".join(str(row.get(k) or "") for k in ("telescope", "instrument")).strip("-")
    return f"{filt} / {camera or '?'} / {_night(row)}"


# an LCO frame name: site telescope - instrument - DAY-OBS - frame number - e<level>
_LCO_NAME = re.compile(r"-(\d{8})-\d{4}-e\d\d$")


def _night(row: dict) -> str:
    day_obs = row.get("day_obs") or ""
    if not day_obs:
        match = _LCO_NAME.search(str(row.get("name") or ""))
        day_obs = match.group(1) if match else ""
    if day_obs:
        return str(day_obs)
    mjd = qa_value(row, "mjd")
    if mjd is None:
        return "?"
    from astropy.time import Time

    return Time(mjd - 0.5, format="mjd").strftime("%Y%m%d")


def metric_values(rows: list[dict], metric: Metric) -> np.ndarray:
    values = []
    for row in rows:
        if metric.column == "transparency":  # photometric flux ratio per second
            ratio, exptime = qa_value(row, "flux_ratio"), qa_value(row, "exptime")
            value = ratio / exptime if ratio is not None and exptime else None
        else:
            value = qa_value(row, metric.column)
        values.append(np.nan if value is None else value)
    return np.asarray(values, float)


def group_statistics(qa: dict[str, dict], names: list[str] | None = None) -> dict:
    """``{group: {column: (median, spread, n)}}`` of the usable frames (``names``, default
    all) of each group: the robust centre and sigma (MAD, floored) used to flag."""
    names = list(qa) if names is None else names
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(frame_group(qa[name]), []).append(name)
    out = {}
    for group, members in groups.items():
        rows = [qa[n] for n in members]
        stats = {}
        for metric in METRICS:
            values = metric_values(rows, metric)
            good = values[np.isfinite(values)]
            if len(good) < MIN_GROUP:
                continue
            median = float(np.median(good))
            spread = mad_sigma(good, median)
            floor = metric.floor * abs(median) + (_ZP_FLOOR_MAG if metric.column == "zp"
                                                  else 0.0)
            stats[metric.column] = (median, max(spread, floor, 1e-12), len(good))
        out[group] = stats
    return out


def outlier_metrics(qa: dict[str, dict], names: list[str] | None = None,
                    sigma: float = OUTLIER_SIGMA) -> dict[str, dict[str, str]]:
    """``{frame name: {metric column: why}}`` for frames whose QA stands out in their
    group: `find_outliers`, metric by metric."""
    names = list(qa) if names is None else names
    stats = group_statistics(qa, names)
    out: dict[str, dict[str, str]] = {}
    for name in names:
        row = qa[name]
        group = stats.get(frame_group(row), {})
        for metric in METRICS:
            if metric.column not in group:
                continue
            median, spread, _ = group[metric.column]
            value = float(metric_values([row], metric)[0])
            if not math.isfinite(value):
                continue
            z = (value - median) / spread
            bad = {"high": z > sigma, "low": z < -sigma, "both": abs(z) > sigma}[metric.bad]
            if bad:
                unit = f" {metric.unit}" if metric.unit and metric.unit != "\"" else metric.unit
                out.setdefault(name, {})[metric.column] = (
                    f"{metric.label} {value:.3g}{unit} ({'high' if z > 0 else 'low'}: "
                    f"group median {median:.3g}, {abs(z):.0f} sigma)")
    return out


def find_outliers(qa: dict[str, dict], names: list[str] | None = None,
                  sigma: float = OUTLIER_SIGMA) -> dict[str, list[str]]:
    """``{frame name: [why, ...]}`` for frames whose QA stands out in their group.

    For each group (`frame_group`) of at least `MIN_GROUP` frames and each metric
    (`METRICS`: FWHM, elongation, sky, flux ratio per second, RMS, matched stars, zero
    point when frames have one): farther than ``sigma`` robust sigmas (1.4826 MAD, floored
    at a fraction of the median) from the median, on the bad side. ``names``: the frames
    to judge (default every frame of ``qa``; give the solved ones).
    """
    return {name: list(why.values())
            for name, why in outlier_metrics(qa, names, sigma).items()}
