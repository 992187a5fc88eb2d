"""Cosmic rays with few frames and a 2-D sky (issue 15, items 5 and 6), on synthetic truth.

- Two frames, a cosmic ray in one: the two-frame rule of the combine table takes it out
  of the coadd, and the stars (in both frames) keep their flux within 1 % of truth.
- ``--clean-cosmics``: L.A.Cosmic on a single frame masks the injected hits, not stars.
- ``--background 2d``: frames with a 5 % sky gradient, dithered by a third of a frame,
  leave no step above 0.1 sigma of the sky where they end in the coadd (a constant sky
  per frame leaves a clear one).
"""

import dask
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from scipy.stats import norm

from daskstack._pipeline import combine_store_path, register_files
from daskstack.combine import combine_stack
from daskstack.config import Settings
from daskstack.detect import cosmic_ray_mask
from daskstack.photometry import aperture_photometry
from daskstack.simulate import (
    make_catalog,
    render_frame,
    simulate_field,
    star_positions,
    true_frame_wcs,
)

# -- the two-frame rule, on arrays -----------------------------------------------------------


def test_pair_rule_rejects_a_hit_in_either_of_two_scaled_frames_and_nothing_else():
    """Frames of 30 s and 90 s scaled to e-/s: noise alone is rejected no more than its
    Gaussian tail beyond 4 sigma of the values' own (scaled) variances; a hit is, in whichever frame it falls; with the
    rule off, or for minmax (its own rule), the hit is averaged in."""
    rng = np.random.default_rng(7)
    shape = (200, 200)
    exptime = np.array([30.0, 90.0])
    sky_rate, rdnoise = 5.0, 8.0
    variance = (sky_rate * exptime + rdnoise**2)[:, None, None] * np.ones((2,) + shape)
    data = (sky_rate * exptime)[:, None, None] + rng.normal(0, np.sqrt(variance))
    hits = [(0, 50, 60), (1, 120, 30), (1, 10, 190)]
    for frame, y, x in hits:
        data[frame, y, x] += 40 * np.sqrt(variance[frame, y, x])
    data, variance = data.astype(np.float32), variance.astype(np.float32)
    scales = 1 / exptime
    offsets = -sky_rate * np.ones(2)  # sky subtracted: levels 0

    def coadd(method, **options):
        res = combine_stack(data, method=method, scales=scales, offsets=offsets,
                            variance=variance, **options)
        return dask.compute(res.image, res.nused, res.variance, scheduler="sync")

    noise = np.sqrt(np.median(variance[1]) / exptime[1] ** 2)
    # pure noise beyond 4 sigma either way: 2 * 3.2e-5 of the pixels, ~2.5 here
    false_alarms = 2 * norm.sf(4.0) * data[0].size
    for method in ("mean", "weighted", "median", "sigclip"):
        image, nused, var = coadd(method)
        assert (nused == 1).sum() - len(hits) <= false_alarms + 5 * np.sqrt(false_alarms)
        for _, y, x in hits:
            assert nused[y, x] == 1
            assert abs(image[y, x]) < 5 * np.sqrt(var[y, x]), method
        off, nused_off, _ = coadd(method, pair_sigma=0)
        assert (nused_off == 2).all()
        assert all(off[y, x] > 10 * noise for _, y, x in hits), method
    image, nused, _ = coadd("minmax", nlow=0, nhigh=1)
    assert (nused == 1).all()  # minmax drops the higher of two itself, once


def test_pair_rule_keeps_a_star_seen_in_both_frames():
    """The same star, 30 % brighter at its peak in one frame (sharper seeing, or the
    resampling's phase): within ``pair_fraction`` of the lower value's signal, kept;
    each value is taken above its own frame's sky level (kept here, and unequal)."""
    yy, xx = np.mgrid[:41, :41]
    profile = np.exp(-((xx - 20) ** 2 + (yy - 20) ** 2) / (2 * 1.5**2))
    sky = np.array([200.0, 800.0])  # kept (no sky subtraction): the levels say where it is
    data = np.stack([sky[0] + 50000 * profile * 1.3, sky[1] + 50000 * profile])
    variance = data + 49.0
    res = combine_stack(data.astype(np.float32), method="mean", variance=variance,
                        sky_levels=sky)
    image, nused = dask.compute(res.image, res.nused, scheduler="sync")
    assert (nused == 2).all()
    # without the levels the frame with the brighter sky would lose its sky pixels
    res = combine_stack(data.astype(np.float32), method="mean", variance=variance)
    assert res.nused.compute(scheduler="sync")[0, 0] == 1
    # a peak 60 % brighter than the other's signal is more than pair_fraction allows
    brighter = data.copy()
    brighter[0] = sky[0] + 50000 * profile * 1.6
    res = combine_stack(brighter.astype(np.float32), method="mean", variance=brighter + 49,
                        sky_levels=sky)
    assert (res.nused.compute(scheduler="sync")[20, 20]) == 1


def test_sky_levels_left_after_scaling_for_each_sky_model():
    """The level each frame keeps (what the two-frame rule compares values above): 0
    when subtracted, the matched median for 'background', the scaled sky otherwise;
    frames registered with the 2-D sky removed keep none and are offset by nothing."""
    from types import SimpleNamespace

    from daskstack.combine import _scales, frame_scales
    from daskstack.config import CombineSettings

    sky = [10.0, 20.0, 40.0]
    np.testing.assert_allclose(frame_scales("background", sky=sky).levels, 20.0)
    np.testing.assert_allclose(frame_scales("none", sky=sky, subtract_background=True).levels,
                               0.0)
    np.testing.assert_allclose(frame_scales("exptime", exptime=[2.0, 4.0, 8.0],
                                            sky=sky).levels, [5.0, 5.0, 5.0])
    infos = [SimpleNamespace(exptime=2.0, background=b, flux_ratio=None, file=f"f{b}")
             for b in sky]
    constant = _scales(CombineSettings(scale="none"), infos, "constant")
    np.testing.assert_allclose(constant.offsets, [-10.0, -20.0, -40.0])
    for background in ("2d", "none"):
        kept = _scales(CombineSettings(scale="none"), infos, background)
        np.testing.assert_allclose(kept.offsets, 0.0)
    np.testing.assert_allclose(_scales(CombineSettings(scale="none"), infos, "2d").levels, 0.0)
    np.testing.assert_allclose(_scales(CombineSettings(scale="none"), infos, "none").levels,
                               sky)


# -- two frames through the pipeline ----------------------------------------------------------
SHAPE = (256, 256)
# (row, col, electrons) in the second frame, away from the brightest stars
HITS = [(40, 200, 4000.0), (128, 60, 2500.0), (210, 150, 6000.0), (90, 90, 1500.0)]


def _pair_field(directory, hits):
    """Two frames of one field, the second dithered by a few pixels (a fraction too) and
    hit by cosmic rays at known pixels; no other defects, seeing alike. The hits are added
    after the noise: the same field without them has the same noise, pixel for pixel."""
    return simulate_field(
        directory, n_frames=2, shape=SHAPE, filters=("rp",), seed=21,
        pointing_error_arcmin=0, rotation_error_deg=0, cosmic_rays=False, bad_columns=0,
        hot_pixels=0, fwhm_range=(3.0, 3.3), transparency_range=(1.0, 1.0), sky_gradient=0.0,
        mag_range=(11.0, 14.5), density_per_sq_deg=30000,
        frame_overrides={0: {"dither_arcsec": (0.0, 0.0)},
                         1: {"dither_arcsec": (2.3, -1.6), "cosmic_ray_hits": hits}})


def _register(field, client, out):
    settings = Settings().replace("register", tile=128)
    register_files([str(p) for p in field.frames], out, settings, wcs_source="header",
                   client=client)
    return out


@pytest.fixture(scope="module")
def pair_field(tmp_path_factory):
    return _pair_field(tmp_path_factory.mktemp("pair") / "inputs", HITS)


@pytest.fixture(scope="module")
def pair_store(pair_field, dask_client, tmp_path_factory):
    return _register(pair_field, dask_client, tmp_path_factory.mktemp("pair-run"))


@pytest.fixture(scope="module")
def clean_store(dask_client, tmp_path_factory):
    """The same two frames without the hits."""
    field = _pair_field(tmp_path_factory.mktemp("pair-clean") / "inputs", [])
    return _register(field, dask_client, tmp_path_factory.mktemp("pair-clean-run"))


def _coadd(store, client, name, **combine):
    settings = Settings().replace("combine", scale="none", **combine)
    paths = combine_store_path(store / "store.zarr", store / name, settings, client=client)
    with fits.open(paths["rp"]) as hdul:
        return (hdul[0].data.astype(np.float64), hdul["ERR"].data.astype(np.float64),
                hdul[0].header)


def _hit_positions(pair_field, grid_wcs):
    truth = Table.read(pair_field.truth)
    frame_wcs = WCS(fits.getheader(pair_field.truth_wcs[truth["name"][1]]))
    rows, cols = np.array([h[0] for h in HITS]), np.array([h[1] for h in HITS])
    sky = frame_wcs.pixel_to_world(cols, rows)
    x, y = grid_wcs.world_to_pixel(sky)
    return np.asarray(x), np.asarray(y)


@pytest.mark.parametrize("method", ["mean", "weighted"])
def test_two_frames_cosmic_ray_absent_and_stars_within_one_percent(
        pair_field, pair_store, clean_store, dask_client, method):
    image, err, header = _coadd(pair_store, dask_client, f"{method}-pair", method=method)
    unprotected, _, _ = _coadd(pair_store, dask_client, f"{method}-off", method=method,
                               pair_sigma=0.0)
    clean, _, _ = _coadd(clean_store, dask_client, f"{method}-clean", method=method)
    assert header["PAIRSIG"] == 4.0 and header["BKGSUB"] == "constant"
    grid_wcs = WCS(header).celestial
    x, y = _hit_positions(pair_field, grid_wcs)
    for xi, yi in zip(x, y, strict=True):
        box = np.s_[int(round(yi)) - 1:int(round(yi)) + 2, int(round(xi)) - 1:int(round(xi)) + 2]
        # with the rule off the hit is there, at half its height (two frames averaged);
        # with it, the coadd is that of the frames without the hit: one frame's value
        # where the hit was against the mean of two, so within their noise, and on a
        # star (a hit may fall on one) within the two frames' resampling difference
        assert np.nanmax((unprotected - clean)[box] / err[box]) > 20
        assert np.all(np.abs(image - clean)[box] < 5 * err[box] + 0.1 * np.abs(clean[box]))
    elsewhere = np.ones(image.shape, bool)
    for xi, yi in zip(x, y, strict=True):
        elsewhere[int(round(yi)) - 3:int(round(yi)) + 4, int(round(xi)) - 3:int(round(xi)) + 4] = 0
    # elsewhere the same (but for the frames' sky levels and the store's rounding of the
    # tiles, which the hits moved a little)
    np.testing.assert_allclose(image[elsewhere], clean[elsewhere], atol=0.05 * np.nanmedian(err))

    # truth: the same apertures on each frame rendered without noise, averaged
    truth = Table.read(pair_field.truth)
    catalog = Table.read(pair_field.catalog)
    radius = 3.0 * float(np.max(truth["fwhm_px"]))
    sx, sy, index = star_positions(catalog, grid_wcs, float(truth["epoch"][0]), shape=SHAPE)
    inside = (sx > radius + 12) & (sx < SHAPE[1] - radius - 13) & (sy > radius + 12) & (
        sy < SHAPE[0] - radius - 13)
    true_flux = np.mean([_noiseless_aperture_flux(pair_field, row, catalog, index[inside],
                                                  radius) for row in truth], axis=0)
    phot = aperture_photometry(image, sx[inside], sy[inside], radius, variance=err**2)
    flux, flux_err = np.asarray(phot["flux"]), np.asarray(phot["flux_err"])
    precise = (flux_err < 0.003 * flux) & (np.asarray(phot["flags"]) == 0)
    assert precise.sum() >= 3
    assert np.all(np.abs(flux[precise] / true_flux[precise] - 1) < 0.01)
    # the rule took nothing from the stars: without hits, the same fluxes as without it
    clean_off, _, _ = _coadd(clean_store, dask_client, f"{method}-clean-off", method=method,
                             pair_sigma=0.0)
    with_rule, without = (np.asarray(aperture_photometry(a, sx[inside], sy[inside], radius)[
        "flux"]) for a in (clean, clean_off))
    np.testing.assert_allclose(with_rule[precise], without[precise], rtol=1e-3)


def _noiseless_aperture_flux(field, row, catalog, index, radius):
    """Aperture fluxes (sky annulus subtracted) of the catalog stars ``index`` in the
    frame of truth ``row`` rendered without noise, at their true positions in it."""
    wcs = WCS(fits.getheader(field.truth_wcs[row["name"]]))
    image, _, info = render_frame(
        catalog[index], wcs, SHAPE, epoch=float(row["epoch"]), fwhm_px=float(row["fwhm_px"]),
        moffat_beta=float(row["moffat_beta"]), sky=float(row["sky"]),
        rdnoise=float(row["rdnoise"]), exptime=float(row["exptime"]),
        zeropoint=float(row["zeropoint"]), transparency=float(row["transparency"]),
        noise=False)
    order = np.argsort(info["index"])  # rendered stars, back in the order of ``index``
    assert len(order) == len(index)
    phot = aperture_photometry(image, info["x"][order], info["y"][order], radius)
    return np.asarray(phot["flux"])


# -- L.A.Cosmic on a single frame -------------------------------------------------------------
@pytest.fixture(scope="module")
def single_frame():
    shape = (300, 300)
    wcs = true_frame_wcs((150.0, 2.0), shape, 0.389)
    catalog = make_catalog((150.0, 2.0), 0.03, density_per_sq_deg=30000,
                           mag_range=(12.0, 20.0), seed=1)
    rng = np.random.default_rng(3)
    hits = [(30, 40, 3000.0), (150, 200, 1200.0), (260, 100, 8000.0), (75, 250, 2000.0)]
    data, bpm, info = render_frame(catalog, wcs, shape, sky=300.0, fwhm_px=3.0, rng=rng,
                                   n_cosmic_rays=25, cosmic_ray_hits=hits)
    hit = np.zeros(shape, bool)
    for rows, cols in info["cosmic_rays"]:
        hit[rows, cols] = True
    return data, bpm, info, hit


def test_lacosmic_masks_the_hits_not_the_stars(single_frame):
    data, bpm, info, hit = single_frame
    found = cosmic_ray_mask(data, bpm > 0, electrons_per_unit=1.0, rdnoise_e=7.0,
                            saturation=120000.0)
    assert (found & hit).sum() >= 0.9 * hit.sum()
    # what else it flags is the hits' own halo (L.A.Cosmic grows each hit by a pixel), and
    # a rare noise spike on the sky
    from scipy.ndimage import binary_dilation

    halo = binary_dilation(hit, np.ones((3, 3), bool))
    assert (found & ~halo).sum() <= 1e-4 * hit.size
    yy, xx = np.mgrid[:data.shape[0], :data.shape[1]]
    for x, y in zip(info["x"], info["y"], strict=True):
        core = (xx - x) ** 2 + (yy - y) ** 2 < 3.0**2
        assert not (found & core & ~hit).any(), (x, y)


def test_clean_cosmics_masks_the_hits_of_a_single_frame(dask_client, tmp_path):
    """``--clean-cosmics`` through registration: a single frame's hits have no weight in
    its coadd (NFRAMES 0), its stars do (NFRAMES 1); the header says it was cleaned."""
    field = simulate_field(
        tmp_path / "inputs", n_frames=1, shape=SHAPE, filters=("rp",), seed=22,
        pointing_error_arcmin=0, rotation_error_deg=0, cosmic_rays=False, bad_columns=0,
        hot_pixels=0, fwhm_range=(3.0, 3.0), mag_range=(12.0, 18.0),
        frame_overrides={0: {"cosmic_ray_hits": HITS}})
    settings = Settings().replace("register", tile=128, clean_cosmics=True)
    register_files([str(p) for p in field.frames], tmp_path / "run", settings,
                   wcs_source="header", client=dask_client)
    paths = combine_store_path(tmp_path / "run" / "store.zarr", tmp_path / "run", settings,
                               client=dask_client)
    with fits.open(paths["rp"]) as hdul:
        header, nframes = hdul[0].header, hdul["NFRAMES"].data
    assert header["CRCLEAN"] is True
    grid_wcs = WCS(header).celestial
    frame_wcs = WCS(fits.getheader(next(iter(field.truth_wcs.values()))))
    for row, col, _ in HITS:
        x, y = grid_wcs.world_to_pixel(frame_wcs.pixel_to_world(col, row))
        assert nframes[int(round(float(y))), int(round(float(x)))] == 0
    catalog = Table.read(field.catalog)
    sx, sy, _ = star_positions(catalog, grid_wcs, float(Table.read(field.truth)["epoch"][0]),
                               shape=SHAPE)
    # (within a few pixels of the frame's edges L.A.Cosmic's filters see a cut star, and
    # may take its core for a hit)
    inside = (sx > 8) & (sx < SHAPE[1] - 9) & (sy > 8) & (sy < SHAPE[0] - 9)
    assert inside.sum() > 5
    assert np.all(nframes[np.rint(sy[inside]).astype(int), np.rint(sx[inside]).astype(int)] == 1)


# -- a 2-D sky -------------------------------------------------------------------------------
SKY_SHAPE = (240, 240)
THIRD_ARCSEC = SKY_SHAPE[1] / 3 * 0.389  # a third of a frame


@pytest.fixture(scope="module")
def gradient_field(tmp_path_factory):
    """Three frames with a 5 % sky gradient across each (along x), the second dithered by
    a third of a frame in x, the third by a third in y; faint, sparse stars."""
    return simulate_field(
        tmp_path_factory.mktemp("gradient") / "inputs", n_frames=3, shape=SKY_SHAPE,
        filters=("rp",), seed=23, pointing_error_arcmin=0, rotation_error_deg=0,
        cosmic_rays=False, bad_columns=0, hot_pixels=0, sky=1000.0, mag_range=(17.0, 20.0),
        density_per_sq_deg=8000, frame_overrides={
            0: {"dither_arcsec": (0.0, 0.0), "sky_gradient": (0.05, 0.0)},
            1: {"dither_arcsec": (THIRD_ARCSEC, 0.0), "sky_gradient": (0.05, 0.0)},
            2: {"dither_arcsec": (0.0, THIRD_ARCSEC), "sky_gradient": (0.05, 0.0)}})


def _edge_steps(image, nframes, width=30):
    """``[(step, sky sigma)]`` at every frame edge inside the coadd. Where the number of
    frames changes from one column to the next (and likewise rows), over the run of rows
    whose frame counts are the same on each side: a line fitted to the (sigma-clipped)
    column means of ``width`` columns on each side, the two lines' difference at the
    edge (a coadd may slope across it); sigma: the pixel scatter on the deeper side."""
    from astropy.stats import sigma_clip, sigma_clipped_stats

    steps = []
    for img, count in ((image, nframes), (image.T, nframes.T)):
        changes = np.nonzero((count[:, :-1] != count[:, 1:]).sum(axis=0) > width)[0]
        for c in changes:
            if c + 1 < width or c + 1 + width > img.shape[1]:
                continue
            before, after = count[:, c + 1 - width:c + 1], count[:, c + 1:c + 1 + width]
            flat = (before.min(axis=1) == before.max(axis=1)) & (
                after.min(axis=1) == after.max(axis=1)) & (before[:, 0] > 0) & (after[:, 0] > 0)
            for pair in {(int(b), int(a)) for b, a in zip(before[flat, 0], after[flat, 0],
                                                          strict=True) if b != a}:
                rows = flat & (before[:, 0] == pair[0]) & (after[:, 0] == pair[1])
                if rows.sum() < 40:
                    continue
                edge = []
                for columns in (np.arange(c + 1 - width, c + 1), np.arange(c + 1, c + 1 + width)):
                    profile = sigma_clip(img[rows][:, columns], axis=0).mean(axis=0)
                    slope, intercept = np.polyfit(columns, profile, 1)
                    edge.append(slope * (c + 0.5) + intercept)
                _, _, std_before = sigma_clipped_stats(img[rows, c + 1 - width:c + 1])
                _, _, std_after = sigma_clipped_stats(img[rows, c + 1:c + 1 + width])
                deeper = std_before if pair[0] > pair[1] else std_after
                steps.append((float(edge[1] - edge[0]), float(deeper)))
    return steps


@pytest.mark.parametrize("background", ["2d", "constant"])
def test_a_sky_gradient_leaves_no_step_where_frames_end(gradient_field, dask_client,
                                                        tmp_path, background):
    truth = Table.read(gradient_field.truth)
    settings = Settings().replace("register", tile=128, background=background,
                                  background_mesh=80).replace(
        "grid", reference=str(truth["name"][0])).replace("combine", method="mean",
                                                          scale="none")
    register_files([str(p) for p in gradient_field.frames], tmp_path, settings,
                   wcs_source="header", client=dask_client)
    paths = combine_store_path(tmp_path / "store.zarr", tmp_path, settings, client=dask_client)
    with fits.open(paths["rp"]) as hdul:
        image, nframes = hdul[0].data.astype(np.float64), hdul["NFRAMES"].data
        assert hdul[0].header["BKGSUB"] == background
        assert hdul[0].header.get("BKGMESH") == (80 if background == "2d" else None)
    steps = _edge_steps(image, nframes)
    assert len(steps) >= 3  # frame 1's edge (with and without frame 2), frame 2's edge
    ratio = [abs(step) / sigma for step, sigma in steps]
    if background == "2d":
        assert max(ratio) < 0.1, steps
    else:  # one level per frame leaves each frame's gradient: a clear step
        assert max(ratio) > 0.25, steps


# -- the options -----------------------------------------------------------------------------
def test_options_in_the_help_and_checked():
    from click.testing import CliRunner

    from daskstack.cli import main
    from daskstack.config import SettingsError

    text = CliRunner().invoke(main, ["run", "--help"], terminal_width=200).output
    for option in ("--background [constant|2d|none]", "--background-mesh PIXELS",
                   "--clean-cosmics", "--pair-sigma K", "--pair-fraction"):
        assert option in text, option
    combine_help = CliRunner().invoke(main, ["combine", "--help"]).output
    # the sky is removed when registering: combine cannot change it
    assert "--pair-sigma" in combine_help and "--background [" not in combine_help
    with pytest.raises(SettingsError, match="keep-background"):
        Settings().replace("register", background="2d").replace(
            "combine", subtract_background=False).validate()
    with pytest.raises(SettingsError, match="background_mesh"):
        Settings().replace("register", background_mesh=8).validate()
    with pytest.raises(SettingsError, match="pair_sigma"):
        Settings().replace("combine", pair_sigma=-1).validate()
