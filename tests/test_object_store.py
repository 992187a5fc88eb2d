"""Frames and run directory on an object store: an S3-compatible server (moto's server
mode) on 127.0.0.1, a ``dask scheduler`` and two ``dask worker`` processes that share no
filesystem with the client (each in its own empty working directory, HOME an empty
directory). ``daskstack run s3://frames/*.fits.fz --out s3://runs/r1`` gives the coadds
of a local run, writes nothing of the run to the local disk, and no credential reaches a
log or an output; the same command after tonight's frames were uploaded solves and
registers only those (their objects untouched) and gives the coadds of a one-shot run of
all the frames on the same grid."""

from __future__ import annotations

import io
import os
import secrets
import subprocess
import sys

import numpy as np
import pytest
from astropy.io import fits

from daskstack._pipeline import EXIT_OK, run
from daskstack._rundir import read_manifest
from daskstack.config import Settings

from .helpers import assert_same_pixels, dask_processes_in, registered_pixels

N_FIRST = 6
PLANES = ("PRIMARY", "ERR", "WEIGHT", "NFRAMES", "EXPMAP")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with buckets ``frames`` and ``runs``; credentials
    and endpoint in this process's environment, as a user would set them:
    ``(fsspec filesystem, environment, secrets)``."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    credentials = {"AWS_ACCESS_KEY_ID": "AKIA" + secrets.token_hex(8).upper(),
                   "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30)}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in {"AWS_ENDPOINT_URL": f"http://{host}:{port}",
                           "AWS_DEFAULT_REGION": "us-east-1", **credentials}.items():
            patch.setenv(key, value)
        import fsspec

        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir("frames")
        fs.mkdir("runs")
        yield fs, dict(os.environ), list(credentials.values())
    server.stop()


@pytest.fixture(scope="module")
def field(tmp_path_factory):
    """Twelve small frames with an exact header WCS (--wcs header), two filters."""
    from daskstack.simulate import simulate_field

    return simulate_field(tmp_path_factory.mktemp("s3-frames") / "inputs", n_frames=12,
                          shape=(256, 256), filters=("rp", "gp"), seed=31,
                          pointing_error_arcmin=0, rotation_error_deg=0)


def _fits(fs, key) -> fits.HDUList:
    return fits.open(io.BytesIO(fs.cat_file(key)))


def _assert_same_coadds(fs, run_key, local_coadds) -> None:
    for filter_name, path in local_coadds.items():
        with _fits(fs, f"{run_key}/coadd_{filter_name}.fits") as got, \
                fits.open(path) as expected:
            for plane in PLANES:
                np.testing.assert_allclose(got[plane].data, expected[plane].data, rtol=2e-7,
                                           atol=0, equal_nan=True,
                                           err_msg=f"{filter_name} {plane}")


def _wcs_objects(fs, prefix) -> dict[str, tuple]:
    """(size, ETag, LastModified) of every .wcs object."""
    fs.invalidate_cache()  # listed before the run wrote
    return {key: (info["size"], info["ETag"], info["LastModified"])
            for key, info in fs.find(prefix, detail=True).items() if key.endswith(".wcs")}


def _register_times(manifest) -> dict[str, float]:
    return dict(zip(map(str, manifest["name"]), map(float, manifest["t_register"]),
                    strict=True))


def _files_under(*directories) -> list[str]:
    return sorted(str(p) for d in directories for p in d.rglob("*") if p.is_file())


def test_run_on_an_object_store_with_remote_workers(s3, field, tmp_path):
    fs, env, credentials = s3
    home, client_dir = tmp_path / "home", tmp_path / "client"
    home.mkdir()
    client_dir.mkdir()
    import matplotlib

    # HOME empty, to see what lands there; matplotlib's font cache (a library's, not the
    # run's, and slow to build) where this process has it
    env = {**env, "HOME": str(home), "MPLCONFIGDIR": matplotlib.get_cachedir()}
    for path in field.frames[:N_FIRST]:
        fs.put_file(str(path), f"frames/{path.name}")
    command = [sys.executable, "-m", "daskstack.cli", "run", "s3://frames/*.fits.fz",
               "--wcs", "header", "--out", "s3://runs/r1", "--difference", "-vv"]
    logs = []

    with dask_processes_in(tmp_path, env=env, scratch=tmp_path / "scratch") as (address, _):
        def run_s3(*more):
            done = subprocess.run([*command, "--scheduler", address, *more], cwd=client_dir,
                                  env=env, capture_output=True, text=True, timeout=300)
            logs.append(done.stdout + done.stderr)
            assert done.returncode == EXIT_OK, done.stdout + done.stderr

        def run_local(frames, out, settings=None):
            from distributed import Client

            with Client(address) as client:
                settings = (settings or Settings()).replace("solve", wcs="header")
                return run([str(p) for p in frames], "", out, settings, client=client)

        # last night: six frames, on the store and locally
        run_s3()
        local = run_local(field.frames[:N_FIRST], tmp_path / "local6")
        _assert_same_coadds(fs, "runs/r1", local.coadds)
        before = _wcs_objects(fs, "runs/r1")
        pixels = registered_pixels("s3://runs/r1/store.zarr")
        assert len(before) == len(pixels) == N_FIRST
        timings = _register_times(read_manifest("s3://runs/r1/manifest.ecsv"))

        # tonight: six more uploaded, the same command
        for path in field.frames[N_FIRST:]:
            fs.put_file(str(path), f"frames/{path.name}")
        run_s3("--report")  # pictures drawn by the workers, the page by the client
        after = _wcs_objects(fs, "runs/r1")
        assert {key: after.get(key) for key in before} == before  # not solved again
        assert len(after) == len(field.frames)
        assert_same_pixels(pixels, registered_pixels("s3://runs/r1/store.zarr"))
        manifest = read_manifest("s3://runs/r1/manifest.ecsv")
        # the registration time of each frame, measured when it was registered: kept
        assert {n: t for n, t in _register_times(manifest).items() if n in timings} == timings
        assert len(manifest) == len(field.frames)
        assert set(manifest["status"]) == {"ok"} and all(manifest["registered"])
        assert all(str(f).startswith("s3://frames/") for f in manifest["file"])
        assert len(fs.ls("runs/r1/difference")) == len(field.frames)  # written by workers
        page = fs.cat_file("runs/r1/report/index.html").decode()
        assert all(f.name.removesuffix(".fits.fz") in page for f in field.frames)
        assert fs.exists("runs/r1/report/coadd_rp.png")
        with _fits(fs, "runs/r1/coadd_rp.fits") as coadd:
            reference = coadd[0].header["REFFRAME"]
        once = run_local(field.frames, tmp_path / "local12",
                         Settings().replace("grid", reference=reference))
        _assert_same_coadds(fs, "runs/r1", once.coadds)

        # combine again from the store on the object store, one frame left out
        left_out = field.frames[0].name.removesuffix(".fits.fz")
        done = subprocess.run(
            [sys.executable, "-m", "daskstack.cli", "combine", "s3://runs/r1", "--exclude",
             left_out, "--scheduler", address, "-vv"], cwd=client_dir, env=env,
            capture_output=True, text=True, timeout=300)
        logs.append(done.stdout + done.stderr)
        assert done.returncode == EXIT_OK, done.stdout + done.stderr
        manifest = read_manifest("s3://runs/r1/manifest.ecsv")
        assert dict(zip(manifest["name"], manifest["status"], strict=True))[left_out] == \
            "excluded"
        filter_name = dict(zip(manifest["name"], manifest["filter"], strict=True))[left_out]
        with _fits(fs, f"runs/r1/coadd_{filter_name}.fits") as coadd:
            assert coadd[0].header["EXCL001"] == left_out

    # nothing of the run on the local disk: client and workers' working directories
    # and the home directory are as empty as they were given (Dask's own scratch space
    # and the system's temporary files aside)
    workers = [tmp_path / "worker0", tmp_path / "worker1"]
    assert _files_under(client_dir, home, *workers) == []
    # no credential in any output object or any log
    outputs = {key: fs.cat_file(key) for key in fs.find("runs/r1")}
    assert any(k.endswith("store.zarr/zarr.json") for k in outputs)
    dask_logs = [p.read_bytes() for p in (tmp_path / "dask-logs").iterdir()]
    assert any(b"Start worker" in text for text in dask_logs)
    assert any("DEBUG" in text for text in logs)  # -vv: the most the client logs
    for secret in credentials:
        for key, blob in outputs.items():
            assert secret.encode() not in blob, key
        for text in dask_logs + [text.encode() for text in logs]:
            assert secret.encode() not in text


def test_frames_are_read_from_http_urls(field, httpserver):
    """A frame served over HTTP (127.0.0.1) reads as the same file on disk does; a URL
    that serves nothing is a bad frame, named, not a crash."""
    from daskstack.cli import _check_inputs
    from daskstack.frames import FrameError, read_frame, read_meta

    path = field.frames[0]
    httpserver.expect_request(f"/frames/{path.name}").respond_with_data(path.read_bytes())
    url = httpserver.url_for(f"/frames/{path.name}")
    assert _check_inputs([url]) == [url]  # one frame: '?' in a URL begins a query
    meta = read_meta(url)
    assert (meta.path, meta.name) == (url, read_meta(path).name)
    got, expected = read_frame(url), read_frame(path)
    np.testing.assert_array_equal(got.data, expected.data)
    np.testing.assert_array_equal(got.mask, expected.mask)
    with pytest.raises(FrameError, match="missing.fits.fz: file does not exist"):
        read_meta(httpserver.url_for("/frames/missing.fits.fz"))


def test_what_is_a_url():
    from daskstack._io import as_path, is_url

    assert is_url("s3://bucket/run") and is_url("gs://b/x.fits") and is_url("https://h/a")
    assert not is_url("run1") and not is_url("/data/run") and not is_url("C:/data")
    assert not is_url("file:///data/run") and str(as_path("file:///data/run")) == "/data/run"
    assert str(as_path("s3://bucket/run") / "store.zarr") == "s3://bucket/run/store.zarr"
