"""The numbers behind issue 15's "Must show" for the noise model, as a committed result.

Runs the harness of ``tests/test_noise.py`` (20 synthetic frames of 10-80 s, dithered
and slightly rotated, each with a noiseless twin, registered with bilinear and
lanczos3) and the real PDS 110 frames, and reports what the tests assert on, and the
cost of registering a frame with its variance, per kernel:

    PYTHONPATH=. python scripts/noise_check.py

writes ``benchmarks/results/noise-check-<YYYYMMDD>.json`` (every figure, with the
machine, versions and commit) and ``.md`` (the tables), and prints the markdown.
"""

import sys
from pathlib import Path

import numpy as np
from photutils.aperture import CircularAperture, aperture_photometry

from daskstack._stats import sky_level
from daskstack.config import RegisterSettings
from daskstack.frames import read_frame
from daskstack.grid import Grid
from daskstack.noise import frame_noise_model
from daskstack.register import noise_correlation, register_frame
from tests import test_noise as harness


def synthetic(rows: list, lines: list) -> dict:
    """(coadd - truth) / ERR over sky pixels and aperture pulls, per kernel and method;
    the weighted coadd's S/N gain over the mean's against the depths' promise."""
    stacks, exptime, info = harness.make_stacks()
    sigma = np.sqrt(harness.SKY_RATE * exptime + harness.RDNOISE**2) / exptime
    expected = np.sqrt(np.sum(sigma**2) / len(exptime) ** 2 * np.sum(1 / sigma**2))
    x, y = info["x"], info["y"]
    ny, nx = harness.GRID_SHAPE
    inside = (x > 12) & (x < nx - 13) & (y > 12) & (y < ny - 13)
    apertures = CircularAperture(np.column_stack([x[inside], y[inside]]), r=2 * harness.FWHM)
    lines += ["## Synthetic: 20 frames of 10-80 s (tests/test_noise.py's harness)", "",
              "| kernel | method | sky px | std((coadd - truth) / ERR) | stars | std(pulls) "
              "| NOISECOR |", "|---|---|---|---|---|---|---|"]
    gains = {}
    for order in ("bilinear", "lanczos3"):
        noise = {}
        for method in ("mean", "weighted", "median", "sigclip"):
            image, err, truth = harness._coadd(stacks, exptime, order, method)
            sky = harness._sky_pixels(image, err, truth)
            noise[method] = np.std((image - truth)[sky])
            z = (image - truth)[sky] / err[sky]
            measured = aperture_photometry(image, apertures, error=err)
            true = np.asarray(aperture_photometry(truth, apertures)["aperture_sum"])
            error = np.asarray(measured["aperture_sum_err"]) * np.sqrt(noise_correlation(order))
            pulls = (np.asarray(measured["aperture_sum"]) - true) / error
            rows.append({"kernel": order, "method": method, "sky_pixels": int(sky.sum()),
                         "std_z": float(np.std(z)), "stars": len(pulls),
                         "std_pulls": float(np.std(pulls)),
                         "noisecor": noise_correlation(order)})
            lines.append(f"| {order} | {method} | {sky.sum()} | {np.std(z):.3f} | "
                         f"{len(pulls)} | {np.std(pulls):.3f} | {noise_correlation(order):.3f} |")
        gain = noise["mean"] / noise["weighted"]
        gains[order] = {"weighted_over_mean_snr": float(gain), "expected": float(expected)}
    lines.append("")
    for order, gain in gains.items():
        lines.append(f"{order}: weighted / mean S/N = {gain['weighted_over_mean_snr']:.3f}, "
                     f"expected from the depths {gain['expected']:.3f} "
                     f"({100 * (gain['weighted_over_mean_snr'] / gain['expected'] - 1):+.1f} %)")
    lines.append("")
    return gains


def registration_cost(rows: list, lines: list, size=2048, repeats=3):
    """Seconds to register one size x size frame (fast path, tile 1024), with and without
    its variance, per kernel: the best of ``repeats`` (a shared machine: indicative)."""
    import time

    from tests.helpers import tan_wcs

    rng = np.random.default_rng(0)
    data = rng.normal(200.0, 15.0, (size, size)).astype(np.float32)
    frame_wcs = tan_wcs((size, size), rotation_deg=0.7)
    grid = Grid.from_wcs(tan_wcs((size, size), ra=150.0004, dec=2.0003, rotation_deg=-0.2),
                         (size, size))
    variance = np.full(data.shape, 225.0, np.float32)
    lines += [f"## Registration of one {size}x{size} frame, best of {repeats} (s; a shared "
              "machine: indicative)", "", "| kernel | data only | data + variance |",
              "|---|---|---|"]
    for order in ("bilinear", "lanczos3"):
        settings = RegisterSettings(order=order, tile=1024)
        row = []
        for var in (None, variance):
            best = np.inf
            for _ in range(repeats):
                start = time.perf_counter()
                for _tile in register_frame(data, None, frame_wcs, grid, settings,
                                            variance=var):
                    pass
                best = min(best, time.perf_counter() - start)
            row.append(best)
        rows.append({"kernel": order, "data_only_s": row[0], "with_variance_s": row[1]})
        lines.append(f"| {order} | {row[0]:.2f} | {row[1]:.2f} |")
    lines.append("")


def real(rows: list, lines: list):
    lines += ["## Real frames: one-frame registration (bilinear, grid shifted by (0.37, -0.41) "
              "px)", "", "| frame | filter | ERR (median, sky) | sky scatter | ratio |",
              "|---|---|---|---|---|"]
    for number in ("1153", "1156", "1159", "1162"):
        frame = read_frame(harness.DATA / f"ogg0m404-kb82-20170815-{number}-e91.fits.fz")
        wcs = frame.meta.header_wcs()
        grid_wcs = wcs.deepcopy()
        grid_wcs.wcs.crpix = wcs.wcs.crpix + np.array([0.37, -0.41])
        grid = Grid.from_wcs(grid_wcs, frame.data.shape)
        variance, _ = frame_noise_model(frame)
        out, out_var, _ = harness.assemble(register_frame(
            frame.data, frame.mask, wcs, grid, RegisterSettings(tile=512), variance=variance),
            frame.data.shape)
        level, scatter = sky_level(out)
        sky = np.isfinite(out) & (np.abs(out - level) < 3 * scatter)
        predicted = float(np.sqrt(np.median(out_var[sky])))
        rows.append({"frame": number, "filter": frame.meta.filter, "err": predicted,
                     "sky_scatter": float(scatter), "ratio": predicted / float(scatter)})
        lines.append(f"| {number} | {frame.meta.filter} | {predicted:.2f} | {scatter:.2f} | "
                     f"{predicted / scatter:.3f} |")
    lines.append("")


def main() -> None:
    from benchmarks.astrometry_evidence import provenance, write_result

    result = {"provenance": provenance("PYTHONPATH=. python scripts/noise_check.py"),
              "synthetic": [], "real": [], "registration_cost": []}
    lines: list[str] = []
    result["weighted_gain"] = synthetic(result["synthetic"], lines)
    real(result["real"], lines)
    registration_cost(result["registration_cost"], lines)
    write_result(Path(__file__).resolve().parents[1] / "benchmarks" / "results", "noise-check",
                 result, "\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
