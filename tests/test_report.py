"""The report: per-frame and per-run pictures, the HTML page, the CLI, headless Chromium."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from daskstack import _report as report
from daskstack._pipeline import make_report, run


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------
class _Page(HTMLParser):
    """Every <img src>, <a href> and the rows of table#frames."""

    def __init__(self):
        super().__init__()
        self.images, self.links, self.rows = [], [], []
        self._table = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        elif tag == "a" and "href" in attrs:
            self.links.append(attrs["href"])
        elif tag == "table":
            self._table = attrs.get("id")
        elif tag == "tr" and self._table == "frames" and "data-name" in attrs:
            self.rows.append(attrs)

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None


def parse_page(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text())
    return page


def local_targets(page: _Page, base: Path):
    """(reference, file) of every relative link and image; '#anchors' and inline
    thumbnails (data: URIs, in the page itself) skipped."""
    for ref in page.images + page.links:
        parsed = urlparse(ref)
        if parsed.scheme == "data" and ref.startswith("data:image/jpeg;base64,"):
            continue
        assert parsed.scheme == "" and parsed.netloc == "", f"not a relative link: {ref}"
        if not parsed.path:
            continue
        yield ref, (base / unquote(parsed.path)).resolve()


def png_pixels(path: Path) -> np.ndarray:
    from matplotlib.image import imread

    return imread(path)


def manifest(run_dir: Path) -> Table:
    return Table.read(run_dir / "manifest.ecsv", format="ascii.ecsv")


# --------------------------------------------------------------------------------------
# Fixtures: the shared synthetic run, and a small run with one failed frame
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sim_report(sim_run, dask_client):
    path = make_report(sim_run.out_dir, client=dask_client, all_pictures=True)
    return sim_run.out_dir, path


BAD_NAME = 'noise<&>"frame-e91'  # needs escaping in HTML and quoting in URLs


@pytest.fixture(scope="module")
def failed_run(sim_field, dask_client, tmp_path_factory):
    """Two good frames of one filter and one frame of pure sky noise (fails: no stars),
    run with ``report=True``."""
    base = tmp_path_factory.mktemp("report-failed")
    good = [p for p in sim_field.frames if "rp" in fits.getval(p, "FILTER", ext=1)][:2]
    bad = base / f"{BAD_NAME}.fits"
    with fits.open(good[0]) as hdul:
        sci = hdul["SCI"]
        noise = np.random.default_rng(5).normal(100.0, 10.0, sci.data.shape)
        hdu = fits.ImageHDU(noise.astype(np.float32), header=sci.header, name="SCI")
        hdu.header["DATE-OBS"] = "2023-07-03T00:00:00"  # another exposure, not a copy
        fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(bad)
    result = run([str(good[0]), str(bad), str(good[1])], str(sim_field.catalog), base / "out",
                 client=dask_client, report=True)
    return result


# --------------------------------------------------------------------------------------
# Per frame
# --------------------------------------------------------------------------------------
def test_frame_pictures_show_the_matches(sim_report):
    run_dir, _ = sim_report
    table = manifest(run_dir)
    frames_dir = run_dir / "report" / "frames"
    plots = report.load_frame_plots(frames_dir)
    assert set(plots) == set(table["name"])
    for row in table:
        p = plots[row["name"]]
        assert p.error == ""
        for kind in ("sources", "residuals"):
            png = frames_dir / p.files[kind]
            assert png.exists()
            pixels = png_pixels(png)
            assert pixels.shape[0] > 300 and pixels.shape[1] > 600
            assert pixels[..., :3].std() > 0.05  # an image, not a blank canvas
        # the markers read back from the figures are the numbers reported
        assert p.markers["detected"] == p.n_detections == row["n_detections"]
        assert p.markers["matched"] == p.markers["residuals"] == p.n_matches
        assert p.markers["catalog_after"] == p.n_catalog_after > 0
        assert p.markers["catalog_before"] == p.n_catalog_before > 0
        # ... and the matches drawn are the solver's, re-made through the solved WCS
        assert abs(p.n_matches - row["n_matches"]) <= max(3, 0.1 * row["n_matches"])
        assert p.rms_arcsec == pytest.approx(row["rms_arcsec"], rel=0.3)
        # the simulation's header WCS is ~1 arcmin off: the "before" picture shows it
        assert p.offset_arcsec > 5


def test_frame_figures_direct(sim_run, tmp_path):
    """The pure function: given WCSs and a catalog, it returns what it drew."""
    from daskstack.catalogs import reference_catalog

    settings = report.run_settings(sim_run.out_dir)
    record = next(r for r in sim_run.frames if r.status == "ok")
    catalog = reference_catalog(settings.catalog.source, None, None, settings.catalog)
    solved = report.load_wcs_file(sim_run.out_dir / f"{record.name}.wcs")
    # the solved WCS as "start" too: before and after coincide
    plots = report.frame_figures(record.file, solved, solved, catalog, settings, tmp_path)
    assert plots.offset_arcsec == pytest.approx(0, abs=1e-6)
    assert plots.n_catalog_before == plots.n_catalog_after
    assert plots.markers["matched"] == plots.n_matches > 20
    assert json.loads((tmp_path / f"{record.name}.json").read_text())["n_matches"] == \
        plots.n_matches


def test_display_binning_and_stretch():
    data = np.arange(3000 * 2000, dtype=np.float32).reshape(3000, 2000)
    image, factor = report.display_image(data, max_size=1000)
    assert factor == 3 and image.shape == (1000, 666)
    assert image[0, 0] == pytest.approx(data[:3, :3].mean())
    flat = report.scaled(np.full((10, 10), 5.0))
    assert np.isfinite(flat).all() and flat.min() >= 0 and flat.max() <= 1


# --------------------------------------------------------------------------------------
# Per run
# --------------------------------------------------------------------------------------
def test_run_pictures(sim_report, tmp_path):
    run_dir, _ = sim_report
    out = run_dir / "report"
    for coadd in run_dir.glob("coadd_*.fits"):
        key = coadd.stem.removeprefix("coadd_")
        for name in (f"coadd_{key}.png", f"weight_{key}.png"):
            assert png_pixels(out / name)[..., :3].std() > 0.02
    assert png_pixels(out / "overlay.png")[..., :3].std() > 0.02
    # the overlay's reference is the grid's reference frame, as the coadd's REFFRAME says
    drawn = report.two_colour_overlay(run_dir / "store.zarr", tmp_path / "overlay.png")
    refframe = fits.getheader(next(run_dir.glob("coadd_*.fits")))["REFFRAME"]
    assert drawn["reference"] == refframe != drawn["aligned"]
    assert (out / "summary.png").exists()
    assert not (out / "colour.png").exists()  # two filters only

    # three filters: a colour composite (three coadds on one grid)
    first = next(run_dir.glob("coadd_*.fits"))
    coadds = {}
    for i, filt in enumerate(("ip", "gp", "rp")):
        path = tmp_path / f"coadd_{filt}.fits"
        header = fits.Header()
        header["FILTER"] = filt
        fits.PrimaryHDU(fits.getdata(first) * (1 + i), header=header).writeto(path)
        coadds[filt] = str(path)
    info = report.colour_composite(coadds, tmp_path / "colour.png")
    assert info["filters"] == {"red": "ip", "green": "rp", "blue": "gp"}
    rgb = png_pixels(tmp_path / "colour.png")
    assert rgb.ndim == 3 and rgb[..., :3].std() > 0.02


def test_outliers_stand_out():
    rng = np.random.default_rng(1)
    n = 30
    table = Table({
        "name": [f"f{i:02d}" for i in range(n)], "filter": ["rp"] * n,
        "status": np.array(["ok"] * n, dtype="U10"),
        "rms_arcsec": rng.normal(0.1, 0.005, n), "n_matches": rng.integers(140, 160, n),
        "fwhm_px": rng.normal(3.0, 0.05, n), "background": rng.normal(150, 3, n),
        "pixel_scale_arcsec": np.full(n, 0.389), "flux_ratio": rng.normal(1.0, 0.01, n),
        "mjd": 60000 + np.arange(n) / 100,
    })
    table["rms_arcsec"][7] = 0.9
    table["n_matches"][12] = 15
    table["status"][20] = "failed"
    outliers = report.find_outliers(table)
    assert set(outliers) == {"f07", "f12"}
    assert "RMS" in outliers["f07"][0]


# --------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------
def test_report_table_failed_first(failed_run):
    run_dir = failed_run.out_dir
    index = run_dir / "report" / "index.html"
    assert index.exists()
    assert "report" in failed_run.timings
    table = manifest(run_dir)
    page = parse_page(index)
    assert len(page.rows) == len(table) == 3
    statuses = [row["data-status"] for row in page.rows]
    assert statuses == sorted(statuses, key=lambda s: s == "ok")
    assert page.rows[0]["data-name"] == BAD_NAME and statuses[0] == "failed"
    text = index.read_text()
    assert "noise&lt;&amp;&gt;&quot;frame-e91" in text and BAD_NAME not in text
    reason = str(table[table["name"] == BAD_NAME]["reason"][0])
    assert reason and html.escape(reason) in text
    # the failed frame has its picture (header WCS only), shown near the top
    bad = report.load_frame_plots(run_dir / "report" / "frames")[BAD_NAME]
    assert set(bad.files) == {"sources"} and bad.status == "failed"
    assert text.index("Frames to look at") < text.index('id="frames"')
    # every relative link and image of the page is on disk
    targets = list(local_targets(page, index.parent))
    assert any(f.name == f"{BAD_NAME}_sources.png" for _, f in targets)
    missing = [ref for ref, f in targets if not f.exists()]
    assert not missing


def test_report_of_a_bare_manifest(failed_run, tmp_path):
    """Only a manifest (no coadd, store or pictures): still a page, one row per frame."""
    shutil.copy(failed_run.out_dir / "manifest.ecsv", tmp_path / "manifest.ecsv")
    index = report.write_report(tmp_path)
    page = parse_page(index)
    assert len(page.rows) == 3 and page.rows[0]["data-status"] == "failed"
    assert "no coadd was written" in index.read_text()
    assert all(f.exists() for _, f in local_targets(page, index.parent))


def test_report_regenerates_without_recomputing(failed_run, dask_client):
    """`daskstack report` (through an existing scheduler): new page, pipeline outputs
    untouched, per-frame pictures kept with --no-frames."""
    from click.testing import CliRunner

    from daskstack.cli import main

    run_dir = failed_run.out_dir
    watched = [run_dir / "manifest.ecsv", *run_dir.glob("coadd_*.fits"),
               *run_dir.glob("*.wcs")]
    before = {p: p.stat().st_mtime_ns for p in watched}
    index = run_dir / "report" / "index.html"
    index.unlink()
    good = next(str(n) for n, s in zip(manifest(run_dir)["name"], manifest(run_dir)["status"],
                                       strict=True) if s == "ok")
    assert not (run_dir / "report" / "frames" / f"{good}_residuals.png").exists()
    # --no-frames: the failed frame's pictures are not drawn again; --frame NAME draws a
    # good frame's pictures on demand
    result = CliRunner().invoke(main, ["report", str(run_dir), "--no-frames", "-q",
                                       "--frame", good,
                                       "--scheduler", dask_client.scheduler.address])
    assert result.exit_code == 0, result.output
    assert index.exists()
    assert {p: p.stat().st_mtime_ns for p in watched} == before
    page = parse_page(index)
    links = [unquote(src) for src in page.links]
    assert f"frames/{good}_residuals.png" in links
    assert any(link.endswith(f"{BAD_NAME}_sources.png") for link in links)
    unknown = CliRunner().invoke(main, ["report", str(run_dir), "--frame", "no-such-frame",
                                        "--scheduler", dask_client.scheduler.address])
    assert unknown.exit_code != 0 and "no-such-frame" in unknown.output
    assert CliRunner().invoke(main, ["report", str(run_dir.parent)]).exit_code == 2


# --------------------------------------------------------------------------------------
# Headless Chromium: the page renders, and no image is broken
# --------------------------------------------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars",
                  "--virtual-time-budget=5000"]


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian package "
                    "'chromium'; .ci/run installs it)")
def test_report_in_headless_chromium(failed_run, tmp_path):
    index = (failed_run.out_dir / "report" / "index.html").resolve()
    url = index.as_uri()
    shot = tmp_path / "shot.png"
    proc = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'a'}",
                           f"--screenshot={shot}", "--window-size=1280,2000", url],
                          capture_output=True, text=True, timeout=120)
    assert shot.exists(), proc.stderr[-2000:]
    pixels = png_pixels(shot)[..., :3]
    assert pixels.shape[:2] == (2000, 1280)
    assert pixels.std() > 0.05  # not a blank (uniform) page
    assert (pixels.mean(axis=2) < 0.5).mean() > 0.01  # text and pictures were drawn

    # the page's own load handler counts <img> that did not decode
    proc = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'b'}",
                           "--dump-dom", url], capture_output=True, text=True, timeout=120)
    dom = proc.stdout
    n_images = len(parse_page(index).images)
    assert n_images >= 5
    assert f'data-images="{n_images}"' in dom, proc.stderr[-2000:]
    assert 'data-broken-images="0"' in dom


# --------------------------------------------------------------------------------------
# A large run's page (issue 21): every frame in one table that sorts, with thumbnails
# --------------------------------------------------------------------------------------
def large_run_dir(base: Path, n: int = 500) -> tuple[Path, str]:
    """A run directory holding only a manifest of ``n`` solved frames over three nights
    and two filters (QA drawn at random, one frame with far worse seeing), and the
    thumbnails of ``n`` random images: what the page gets for a run of ``n`` frames.
    Returns the directory and the name of the frame with the largest FWHM."""
    from daskstack._rundir import MANIFEST_COLUMNS

    rng = np.random.default_rng(21)
    names = [f"lsc1m009-fa15-2023070{1 + i * 3 // n}-{i:04d}-e91" for i in range(n)]
    columns = {name: np.zeros(n, kind) if kind is not str else np.array([""] * n, "U64")
               for name, kind in MANIFEST_COLUMNS}
    table = Table(columns)
    table["name"] = names
    table["file"] = [f"/data/{name}.fits.fz" for name in names]
    table["filter"] = ["rp" if i % 2 else "gp" for i in range(n)]
    table["status"] = "ok"
    table["fwhm_px"] = rng.normal(3.5, 0.2, n)
    worst = int(rng.integers(n))
    table["fwhm_px"][worst] = 9.0
    table["elongation"] = rng.normal(1.1, 0.02, n)
    table["background"] = rng.normal(150, 5, n)
    table["rms_arcsec"] = rng.normal(0.1, 0.01, n)
    table["n_matches"] = rng.integers(80, 120, n)
    table["flux_ratio"] = rng.normal(100, 2, n)
    table["exptime"] = 60.0
    table["mjd"] = 60126.0 + np.arange(n) * 3.0 / n
    table.write(base / "manifest.ecsv", format="ascii.ecsv")
    thumbs = {name: report.thumbnail(rng.normal(0, 1, (256, 256))) for name in names}
    report.write_report(base, thumbnails=thumbs)
    return base, names[worst]


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian package "
                    "'chromium'; .ci/run installs it)")
def test_large_report_sorts_in_headless_chromium(tmp_path):
    run_dir, worst = large_run_dir(tmp_path)
    index = run_dir / "report" / "index.html"
    page = parse_page(index)
    assert len(page.rows) == 500 and len(page.images) >= 501  # thumbnails + summary
    assert page.rows[0]["data-name"] == worst  # flagged: first
    # a test copy of the page: first sort by frame number (the worst frame goes down
    # among the others), then the scripted click on the FWHM heading a person would make
    text = index.read_text()
    click = ("<script>var th = function (k) { return document.querySelector("
             "'#frames th[data-key=\"' + k + '\"]'); };"
             "th('index').click(); th('fwhm_px').click();</script>")
    copy = index.with_name("sorted.html")
    copy.write_text(text.replace("</body>", click + "</body>"))
    proc = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'c'}",
                           "--dump-dom", copy.as_uri()], capture_output=True, text=True,
                          timeout=180)
    dom = proc.stdout
    assert 'data-broken-images="0"' in dom, proc.stderr[-2000:]
    assert f'data-images="{len(page.images)}"' in dom
    rows = [m.group(1) for m in re.finditer(r'<tr id="frame-[^"]*"[^>]*data-name="([^"]+)"',
                                             dom)]
    assert len(rows) == 500
    assert rows[0] == worst
    fwhm = dict(zip(manifest(run_dir)["name"], manifest(run_dir)["fwhm_px"], strict=True))
    assert [fwhm[n] for n in rows] == sorted(fwhm.values(), reverse=True)
    assert 'aria-sort="descending"' in dom
