"""The `daskstack` command: stage commands, the archive feeding `run`, option checks."""

import hashlib
import subprocess
import sys

import numpy as np
from astropy.io import fits
from astropy.table import Table
from click.testing import CliRunner

from daskstack._validate import wcs_error_px
from daskstack.cli import main

CLUSTER = ["--workers", "1", "--threads", "1"]


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


def test_bad_option_rejected_before_work(tmp_path):
    out = tmp_path / "never"
    result = invoke("run", "nothing.fits", "--catalog", "x.ecsv", "--out", out, "--sigma", "-1")
    assert result.exit_code == 2
    assert "combine.sigma must be > 0" in result.output
    assert not out.exists()
    result = invoke("run", "a.fits", "--out", out, "--combine", "average")
    assert result.exit_code == 2 and "average" in result.output
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[combine]\nmethod = 'mode'\n")
    result = invoke("run", "a.fits", "--catalog", "c", "--out", out, "--config", bad_toml)
    assert result.exit_code == 2 and "combine.method = 'mode'" in result.output


def test_config_file_and_option_override(tmp_path):
    from daskstack.config import Settings

    path = tmp_path / "s.toml"
    path.write_text("[combine]\nmethod = 'median'\nsigma = 2.5\n[register]\ntile = 256\n")
    settings = Settings.from_toml(path).update({"combine.sigma": 4.0}).validate()
    assert (settings.combine.method, settings.combine.sigma, settings.register.tile) == (
        "median", 4.0, 256)


def test_run_help_documents_every_option():
    result = invoke("run", "--help")
    assert result.exit_code == 0
    for option in ("--catalog", "--out", "--wcs", "--grid", "--combine", "--scale",
                   "--scheduler", "--jobqueue", "--walltime", "--lco-frames", "--sip-order",
                   "--search-radius", "--overwrite", "--config", "--quiet", "--verbose"):
        assert option in result.output
    # every option carries help text
    command = main.get_command(None, "run")
    for param in command.params:
        if param.param_type_name == "option":
            assert param.help, param.name


def test_solve_then_register_then_combine(sim_field, tmp_path):
    frames = [str(p) for p in sim_field.frames[:3]]
    out = tmp_path / "run"
    result = invoke("solve", *frames, "--catalog", sim_field.catalog, "--out", out, *CLUSTER)
    assert result.exit_code == 0, result.output
    qa = Table.read(out / "solve.ecsv")
    assert list(qa["status"]) == ["ok"] * 3
    for path in frames:
        name = path.split("/")[-1].replace(".fits.fz", "")
        shape = fits.getheader(path, "SCI")["NAXIS2"], fits.getheader(path, "SCI")["NAXIS1"]
        assert wcs_error_px(out / f"{name}.wcs", sim_field.truth_wcs[name], shape) < 0.1
    result = invoke("register", *frames, "--out", out, "--grid", "optimal", "--tile", 256,
                    *CLUSTER)
    assert result.exit_code == 0, result.output
    assert (out / "store.zarr").is_dir()
    result = invoke("combine", out / "store.zarr", "--combine", "median", *CLUSTER)
    assert result.exit_code == 0, result.output
    filters = {fits.getheader(p, "SCI")["FILTER"] for p in frames}
    for filter_name in filters:
        header = fits.getheader(out / f"coadd_{filter_name}.fits")
        assert header["COMBINE"] == "median"


def test_run_downloads_from_the_archive(sim_field, tmp_path, httpserver):
    """`run --lco-frames` fetches frames from an archive (a server on 127.0.0.1)."""
    ids = [101, 102, 103]
    for frame_id, path in zip(ids, sim_field.frames[:3], strict=True):
        body = path.read_bytes()
        url = httpserver.url_for(f"/files/{path.name}")
        httpserver.expect_request(f"/frames/{frame_id}/").respond_with_json({
            "id": frame_id, "filename": path.name, "url": url, "basename": path.name[:-8],
            "version_set": [{"id": 1, "md5": hashlib.md5(body).hexdigest(), "url": url,
                             "extension": ".fits.fz", "key": "k", "created": "2023"}],
            "primary_optical_element": "rp", "observation_date": "2023-07-02T00:00:00Z",
            "site_id": "lsc", "reduction_level": 91,
        })
        httpserver.expect_request(f"/files/{path.name}").respond_with_data(
            body, content_type="application/octet-stream")
    out = tmp_path / "lco-run"
    args = ["run", "--catalog", sim_field.catalog, "--out", out,
            "--archive-url", httpserver.url_for("/"), *CLUSTER, "-q"]
    for frame_id in ids:
        args += ["--lco-frames", frame_id]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    downloaded = sorted((out / "frames").glob("*.fits.fz"))
    assert [p.name for p in downloaded] == sorted(p.name for p in sim_field.frames[:3])
    manifest = Table.read(out / "manifest.ecsv")
    assert len(manifest) == 3 and set(manifest["status"]) == {"ok"}


def test_demo_command_runs_end_to_end(tmp_path):
    """The embedded default, scaled down: synthetic inputs + truth, coadds, summary."""
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "daskstack.cli", "demo", "--out", str(out),
                           "--n-frames", "2", "--size", "512", "--workers", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "inputs" / "catalog.ecsv").exists()
    assert len(list((out / "inputs" / "truth").glob("*.wcs"))) == 2
    assert "solved: 2" in proc.stdout
    errors = [float(line.split(":")[1].split("px")[0]) for line in proc.stdout.splitlines()
              if line.strip().endswith("\")") and " px " in line]
    assert len(errors) == 2 and max(errors) < 0.1
    # the grid is one frame's (REFFRAME); the other is ~1' away (pointing error)
    reference = fits.getheader(out / "coadd_rp.fits")["REFFRAME"]
    coverage = {f: np.isfinite(fits.getdata(out / f"coadd_{f}.fits")).mean()
                for f in ("rp", "gp")}
    grid_filter = next(f for f in coverage if fits.getheader(
        out / "inputs" / f"{reference}.fits.fz", "SCI")["FILTER"] == f)
    assert coverage[grid_filter] > 0.95 and min(coverage.values()) > 0.2


def test_three_filters_give_a_colour_composite(tmp_path):
    """Header-WCS frames in three filters: one coadd each and a colour PNG."""
    from daskstack.simulate import simulate_field

    field = simulate_field(tmp_path / "in", n_frames=3, shape=(320, 320),
                           filters=("gp", "rp", "ip"), seed=3, pointing_error_arcmin=0,
                           rotation_error_deg=0, dither_arcsec=3)
    out = tmp_path / "out"
    frames = [str(p) for p in field.frames]
    assert invoke("register", *frames, "--out", out, "--wcs", "header", *CLUSTER).exit_code == 0
    result = invoke("combine", out / "store.zarr", "--combine", "mean", *CLUSTER)
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.glob("coadd_*.fits")} == {
        "coadd_gp.fits", "coadd_rp.fits", "coadd_ip.fits"}
    import matplotlib.image

    rgb = matplotlib.image.imread(out / "colour.png")
    assert rgb.shape[2] >= 3 and rgb[..., :3].std() > 0.05


def test_exit_codes_of_every_command(sim_field, dask_client, tmp_path):
    """0 all done, 3 partial, 4 nothing usable, 2 bad usage: the same for every command
    (run's 0/3/4 are checked in test_hostile and test_archive, download's in test_archive)."""
    from daskstack._exitcodes import EXIT_FAILED, EXIT_OK, EXIT_PARTIAL, EXIT_USAGE

    good = str(sim_field.frames[0])
    bad = tmp_path / "notfits.fits"
    bad.write_text("not a FITS file")
    scheduler = ["--scheduler", dask_client.scheduler.address]
    catalog = ["--catalog", sim_field.catalog]

    def code(*args):
        return invoke(*args).exit_code

    assert code("solve", good, *catalog, "--out", tmp_path / "s0", *scheduler) == EXIT_OK
    assert code("solve", good, bad, *catalog, "--out", tmp_path / "s3", *scheduler) == \
        EXIT_PARTIAL
    assert code("solve", bad, *catalog, "--out", tmp_path / "s4", *scheduler) == EXIT_FAILED
    assert code("solve", *catalog, "--out", tmp_path / "s2") == EXIT_USAGE

    # the WCS solved above (the simulated headers say WCSERR = 4: --wcs header refuses them)
    solved = ["--tile", "256", *scheduler]
    assert code("register", good, "--out", tmp_path / "s0", *solved) == EXIT_OK
    assert code("register", good, bad, "--out", tmp_path / "s3", *solved) == EXIT_PARTIAL
    assert code("register", bad, "--out", tmp_path / "s4", *solved) == EXIT_FAILED
    assert code("register", good, "--out", tmp_path / "r4", "--wcs", "header",
                *solved) == EXIT_FAILED
    assert code("register", "--out", tmp_path / "r2") == EXIT_USAGE

    assert code("combine", tmp_path / "s0" / "store.zarr", *scheduler) == EXIT_OK
    not_a_store = tmp_path / "empty.zarr"
    not_a_store.mkdir()
    assert code("combine", not_a_store, *scheduler) == EXIT_FAILED
    assert code("combine", tmp_path / "missing.zarr") == EXIT_USAGE

    assert code("report", tmp_path / "s0") == EXIT_USAGE  # no manifest: not a run directory
    assert code("demo", "--n-frames", "0", "--out", tmp_path / "d") == EXIT_USAGE
    assert not (tmp_path / "d").exists()
