"""Agreement of the coadds: pixel by pixel between contenders, and stars against the truth.

Pixels compared ("pixels that all cover"): finite in every coadd compared on this
dataset and covered by every input frame with no masked pixel (daskstack's WEIGHT
equals the number of frames) - so a bad pixel that the tutorial averages in and
daskstack leaves out does not count as a disagreement of the method.

Sky noise: the median over 128x128 boxes of the sigma-clipped standard deviation of
the reference coadd (daskstack's coadd of the same kind), i.e. the noise of the
coadd itself, not of a single frame.
"""

from __future__ import annotations

import warnings

import numpy as np
from astropy.io import fits
from astropy.stats import sigma_clipped_stats
from astropy.utils.exceptions import AstropyWarning
from astropy.wcs import WCS

warnings.simplefilter("ignore", AstropyWarning)


def load_image(path) -> np.ndarray:
    with fits.open(path, memmap=False) as hdul:
        return np.asarray(hdul[0].data, dtype=np.float64)


def load_weight(path) -> np.ndarray | None:
    """The number of frames behind each pixel of a daskstack coadd: its ``NFRAMES``
    extension (``WEIGHT`` is the inverse variance since the noise model; only older
    coadds, whose ``WEIGHT`` counted frames, lack ``NFRAMES``). None for other coadds."""
    with fits.open(path, memmap=False) as hdul:
        for name in ("NFRAMES", "WEIGHT"):
            if name in hdul:
                return np.asarray(hdul[name].data, dtype=np.float64)
    return None


def sky_noise(image, mask, box: int = 128) -> float:
    ny, nx = image.shape
    values = []
    for y0 in range(0, ny - box + 1, box):
        for x0 in range(0, nx - box + 1, box):
            m = mask[y0:y0 + box, x0:x0 + box]
            if m.mean() < 0.9:
                continue
            _, _, std = sigma_clipped_stats(image[y0:y0 + box, x0:x0 + box][m], sigma=3,
                                            maxiters=5)
            values.append(std)
    if not values:
        _, _, std = sigma_clipped_stats(image[mask], sigma=3, maxiters=5)
        return float(std)
    return float(np.median(values))


def difference_stats(a, b, mask, noise) -> dict:
    """|a - b| over ``mask``: median, 99th percentile and max in units of the sky
    noise, and the 99th percentile in float32 ulps of b."""
    m = mask & np.isfinite(a) & np.isfinite(b)
    if not m.any():
        return {"n_pixels": 0}
    d = np.abs(a[m] - b[m])
    ulp = np.spacing(np.abs(b[m]).astype(np.float32)).astype(np.float64)
    return {
        "n_pixels": int(m.sum()),
        "sky_noise": noise,
        "median_over_noise": float(np.median(d) / noise),
        "p99_over_noise": float(np.percentile(d, 99) / noise),
        "max_over_noise": float(d.max() / noise),
        "median_ulp32": float(np.median(d / ulp)),
        "p99_ulp32": float(np.percentile(d / ulp, 99)),
        "median_diff": float(np.median(a[m] - b[m])),
    }


def agreement(outputs: dict, n_frames: int, reference: str) -> list[dict]:
    """``outputs``: {contender: {kind: path}}; compare every contender's mean and median
    with ``reference``'s (a daskstack run), and the other pairs of interest."""
    ref = outputs.get(reference, {})
    if "mean" not in ref:
        return []
    weight = load_weight(ref["mean"])
    results = []
    for kind in ("mean", "median", "sigclip"):
        if kind not in ref:
            continue
        b = load_image(ref[kind])
        images = {c: load_image(o[kind]) for c, o in outputs.items()
                  if kind in o and c != reference and o[kind].exists()}
        common = np.isfinite(b)
        if weight is not None:
            common &= weight >= n_frames - 0.5
        for a in images.values():
            common &= np.isfinite(a)
        noise = sky_noise(b, common)
        for contender, a in images.items():
            stats = difference_stats(a, b, common, noise)
            results.append({"kind": kind, "a": contender, "b": reference, **stats})
        if "tutorial" in images and "swarp" in images:
            stats = difference_stats(images["swarp"], images["tutorial"], common, noise)
            results.append({"kind": kind, "a": "swarp", "b": "tutorial", **stats})
        del images
    return results


def star_photometry(path, dataset, weight=None, aperture: float = 20.0) -> dict:
    """Positions and fluxes of bright, isolated, unsaturated catalog stars measured in a
    coadd against the simulation's truth (synthetic datasets only).

    Position: first moment (photutils ``centroid_com``, 11x11 box, local background
    removed) minus the true position on the grid. Flux: sum in a circle of
    ``aperture`` px minus the median of a 25-35 px annulus, divided by the expected
    mean over frames of exptime * transparency * 10**(-0.4 (m - zp)) / gain (Moffat
    wings outside 20 px hold <~0.5% of the flux).
    """
    from astropy.table import Table
    from photutils.aperture import CircularAnnulus, CircularAperture, aperture_photometry
    from photutils.centroids import centroid_com, centroid_sources

    from daskstack.frames import frame_name
    from daskstack.simulate import star_positions

    from .datasets import flux_per_unit, truth_table

    image = load_image(path)
    with fits.open(path) as hdul:
        wcs = WCS(hdul[0].header, naxis=2)
    ny, nx = image.shape
    catalog = Table.read(dataset.catalog, format="ascii.ecsv")
    names = [frame_name(p) for p in dataset.frames]
    table = truth_table(dataset)
    epochs = [row["epoch"] for row in table if row["name"] in names]
    x, y, index = star_positions(catalog, wcs, float(np.mean(epochs)), shape=(ny, nx))
    mag = np.asarray(catalog["phot_g_mean_mag"], dtype=float)
    k = flux_per_unit(dataset, names)
    expected = np.mean(k) * 10 ** (-0.4 * mag[index])
    peak_frame = np.max(k) * 10 ** (-0.4 * mag[index])
    # isolation: no star within 3 mag of it (or brighter) closer than 30 px
    all_x, all_y, all_i = star_positions(catalog, wcs, float(np.mean(epochs)), shape=(ny, nx),
                                         margin=40)
    from scipy.spatial import cKDTree

    tree = cKDTree(np.column_stack([all_x, all_y]))
    keep = []
    edge = 40
    for j in range(len(x)):
        if not (edge < x[j] < nx - 1 - edge and edge < y[j] < ny - 1 - edge):
            continue
        if not (3000 < expected[j] and peak_frame[j] < 6e5):
            continue
        near = tree.query_ball_point([x[j], y[j]], 30)
        if any(all_i[i] != index[j] and mag[all_i[i]] < mag[index[j]] + 3 for i in near):
            continue
        iy, ix = int(round(y[j])), int(round(x[j]))
        cut = image[iy - 36:iy + 37, ix - 36:ix + 37]
        if not np.all(np.isfinite(cut)):
            continue
        if weight is not None and np.any(weight[iy - 36:iy + 37, ix - 36:ix + 37]
                                         < len(names) - 0.5):
            continue
        keep.append(j)
    if not keep:
        return {"n_stars": 0}
    keep = np.array(keep)
    xs, ys = x[keep], y[keep]
    annulus = CircularAnnulus(np.column_stack([xs, ys]), 25, 35)
    masks = annulus.to_mask(method="center")
    bkg = np.array([np.median(m.get_values(image)) for m in masks])
    # centroid on the background-subtracted image, star by star
    cx, cy = np.empty(len(xs)), np.empty(len(xs))
    for i, (xx, yy, b) in enumerate(zip(xs, ys, bkg, strict=False)):
        ix, iy = int(round(xx)), int(round(yy))
        sub = image[iy - 8:iy + 9, ix - 8:ix + 9] - b
        px, py = centroid_sources(sub, xx - (ix - 8), yy - (iy - 8), box_size=11,
                                  centroid_func=centroid_com)
        cx[i], cy[i] = px[0] + ix - 8, py[0] + iy - 8
    apertures = CircularAperture(np.column_stack([xs, ys]), aperture)
    phot = aperture_photometry(image, apertures)
    flux = np.asarray(phot["aperture_sum"]) - bkg * apertures.area
    ratio = flux / expected[keep]
    dx, dy = cx - xs, cy - ys
    mad = 1.4826 * np.median(np.abs(ratio - np.median(ratio)))
    return {
        "n_stars": int(len(keep)),
        "dx_median_px": float(np.median(dx)), "dy_median_px": float(np.median(dy)),
        "offset_rms_px": float(np.sqrt(np.mean(dx**2 + dy**2))),
        "flux_ratio_median": float(np.median(ratio)),
        "flux_ratio_scatter": float(mad),
    }
