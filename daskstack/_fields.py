"""Fields: which frames share a pointing, and the reference catalog of each field.

A batch may hold many targets. Frames are grouped once, early, by where they point
(`_fields`), so that one catalog query serves every frame of a field
(`_field_catalog`); frames too thin to solve alone are paired with the other exposures
of the same pointing, filter and camera (`_companion_groups`), and with the solved
exposures of the same camera and night (`_night_groups`). Plain functions of
`FrameMeta` records (header information, no pixels); `daskstack._pipeline` calls them
on the client.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
from astropy.coordinates import angular_separation

from . import catalogs
from .config import Settings
from .frames import FrameError, FrameMeta

__all__ = ["COMPANION_RADIUS_DEG", "field_label", "output_fields", "separation_deg"]


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


def _field_radius_deg(settings: Settings) -> float:
    """Pointings closer than this are one field (one catalog, one reference grid)."""
    return max(settings.solve.search_radius_arcmin / 60.0, 0.25)


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


def output_fields(metas: list[FrameMeta], settings: Settings) -> list[tuple[str, list[str]]]:
    """The batch's fields: ``[(field name, [frame names])]``, each field given its own
    grid and coadds. One field (named "") when the user fixed the grid (``--grid FILE``
    or ``--reference``) or when every frame belongs together; else frames are linked
    when their footprints overlap (centres closer than the sum of their half sides:
    mosaic pointings chain into one field) or when they name the same target (OBJECT)
    within the catalog search radius (a header pointing off by a few arcminutes);
    a frame whose header gives no pointing joins the field of its OBJECT, else the
    largest field. Names: a file-safe form of the field's commonest OBJECT, made
    unique; in input order of their first frame."""
    names = [m.name for m in metas]
    if not metas or settings.grid.method not in ("reference", "optimal") \
            or settings.grid.reference:
        return [("", names)]
    centres = [_frame_centre(m) for m in metas]
    pointed = [i for i, c in enumerate(centres) if c is not None]
    parent = list(range(len(metas)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    if pointed:
        ra = np.array([centres[i].ra.deg for i in pointed])
        dec = np.array([centres[i].dec.deg for i in pointed])
        half = np.array([_half_side_deg(metas[i]) for i in pointed])
        target = [metas[i].object.strip().lower() for i in pointed]
        radius = _field_radius_deg(settings)
        for a in range(len(pointed)):
            sep = separation_deg(ra[a], dec[a], ra[a + 1:], dec[a + 1:])
            same_target = np.array([bool(target[a]) and t == target[a]
                                    for t in target[a + 1:]], dtype=bool)
            linked = (sep < half[a] + half[a + 1:]) | (same_target & (sep < radius))
            for b in np.flatnonzero(linked):
                parent[root(pointed[a + 1 + b])] = root(pointed[a])
    groups: dict[int, list[int]] = {}
    for i in pointed:
        groups.setdefault(root(i), []).append(i)
    for i in (i for i, c in enumerate(centres) if c is None):
        same = [g for g, members in groups.items() if metas[i].object and any(
            metas[j].object == metas[i].object for j in members)]
        home = same[0] if same else max(groups, key=lambda g: len(groups[g]), default=None)
        groups.setdefault(i if home is None else home, []).append(i)
    ordered = sorted((sorted(members) for members in groups.values()), key=min)
    if len(ordered) == 1:
        return [("", names)]
    taken: set[str] = set()
    out = []
    for members in ordered:
        label = field_label([metas[i] for i in members])
        unique, n = label, 1
        while unique.lower() in taken:
            n += 1
            unique = f"{label}-{n}"
        taken.add(unique.lower())
        out.append((unique, [names[i] for i in sorted(members)]))
    return out


def field_label(members: list[FrameMeta]) -> str:
    """A file-safe name for a field: its commonest OBJECT (first in order among equals),
    else its pointing (``ra150.1000+02.2000``)."""
    counts: dict[str, int] = {}
    for m in members:
        if m.object.strip():
            counts[m.object.strip()] = counts.get(m.object.strip(), 0) + 1
    if counts:
        best = max(counts, key=lambda k: (counts[k], -list(counts).index(k)))
        label = re.sub(r"[^A-Za-z0-9_.+-]+", "_", best).strip("._")
        if label:
            return label
    centre = next((c for c in map(_frame_centre, members) if c is not None), None)
    if centre is None:
        return "field"
    return f"ra{centre.ra.deg:08.4f}{centre.dec.deg:+08.4f}"


def _half_side_deg(meta: FrameMeta) -> float:
    """Half the shorter side of the frame on the sky (degrees)."""
    try:
        from astropy.wcs.utils import proj_plane_pixel_scales

        scale = float(np.sqrt(np.prod(proj_plane_pixel_scales(meta.header_wcs().celestial))))
    except (FrameError, ValueError):
        scale = (meta.pixscale or 1.0) * meta.binning / 3600.0
    return min(meta.shape) / 2 * scale


COMPANION_RADIUS_DEG = 2.0 / 60  # exposures whose pointings agree this well: one pointing


def _companion_groups(records, catalog_of):
    """Failed frames that other exposures of the same pointing, filter and camera may
    help solve, each with those exposures (solved or not)."""
    pending = [r for r in records if r.status == "failed" and r.meta is not None
               and r.name in catalog_of and r.result is not None and r.result.n_detections]
    out = []
    for record in pending:
        partners = _pointing_partners(record, records)
        if partners:
            out.append((record, partners))
    return out


def _pointing_partners(record, records):
    """The other exposures of ``record``'s pointing, filter and camera."""
    m = record.meta
    return [p for p in records if p is not record and p.meta is not None
            and p.meta.filter == m.filter and p.meta.instrument == m.instrument
            and _same_pointing(m, p.meta)]


NIGHT_DAYS = 0.5  # exposures of one camera taken this close in time: one night
NIGHT_SOURCES_MAX = 6  # solved exposures of the pointing whose detections are used


def _same_camera_night(a: FrameMeta, b: FrameMeta) -> bool:
    """Same instrument on the same telescope, same frame size, within `NIGHT_DAYS`."""
    return (a.instrument == b.instrument and a.telescope == b.telescope
            and tuple(a.shape) == tuple(b.shape) and a.mjd is not None and b.mjd is not None
            and abs(a.mjd - b.mjd) < NIGHT_DAYS)


def _night_groups(records, catalog_of):
    """Failed frames that the solved exposures of the same camera and night may help
    solve (`daskstack.astrometry.solve_constrained`): ``(record, solved, night, thin)``
    each, with the solved records of the camera that night (their geometry), those of
    the same pointing nearest in time (their detections: up to `NIGHT_SOURCES_MAX`)
    and the other exposures of the pointing and filter (the frame's companions)."""
    pending = [r for r in records if r.status == "failed" and r.meta is not None
               and r.name in catalog_of and r.result is not None and r.result.n_detections]
    solved = [r for r in records if r.meta is not None and r.result is not None
              and r.result.status == "ok" and r.result.method != "header"]
    out = []
    for record in pending:
        m = record.meta
        geometry = [s for s in solved if _same_camera_night(m, s.meta)]
        if not geometry:
            continue
        near = [s for s in geometry if _same_pointing(m, s.meta)]
        near.sort(key=lambda s: abs(s.meta.mjd - m.mjd))
        out.append((record, geometry, near[:NIGHT_SOURCES_MAX],
                    _pointing_partners(record, records)))
    return out


def _same_pointing(a: FrameMeta, b: FrameMeta) -> bool:
    return (a.ra is not None and a.dec is not None and b.ra is not None and b.dec is not None
            and separation_deg(a.ra, a.dec, b.ra, b.dec) < COMPANION_RADIUS_DEG)


def separation_deg(ra1, dec1, ra2, dec2):
    """Great-circle separation in degrees between (ra1, dec1) and (ra2, dec2), all in
    degrees, with numpy broadcasting (a float for scalars). Vincenty's formula
    (`astropy.coordinates.angular_separation`): accurate at every angle, where the
    arccos of the spherical law of cosines loses milliarcseconds near 0."""
    sep = np.degrees(angular_separation(np.radians(ra1), np.radians(dec1),
                                        np.radians(ra2), np.radians(dec2)))
    return float(sep) if np.ndim(sep) == 0 else sep
