"""Frames and run directory on an object store: an S3-compatible server (moto's server
mode) on 127.0.0.1, a ``dask scheduler`` and two ``dask worker`` processes that share no
filesystem with the client (each in its own empty working directory, HOME an empty
directory). ``daskstack run s3://frames/*.fits.fz --out s3://runs/r1`` gives the coadds
of a local run, writes nothing of the run to the local disk, and no credential reaches a
log or an output; the same command after tonight's frames were uploaded solves and
registers only those (their objects untouched) and gives the coadds of a one-shot run of
all the frames on the same grid. ``solve``, ``register`` and ``combine`` one stage at a time
onto the object store give what they give on a local directory; no command leaves an
object-store session open at exit (aiohttp's "Unclosed client session" on stderr)."""

from __future__ import annotations

import io
import os
import secrets
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

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


def _client_side(env, tmp_path) -> tuple[dict, Path, Path]:
    """``(environment, working directory, home)`` of a command run as a user would, the
    two directories new and empty, to see what lands there; matplotlib's font cache (a
    library's, not the run's, and slow to build) where this process has it."""
    import matplotlib

    home, client_dir = tmp_path / "home", tmp_path / "client"
    home.mkdir()
    client_dir.mkdir()
    return ({**env, "HOME": str(home), "MPLCONFIGDIR": matplotlib.get_cachedir()},
            client_dir, home)


def _daskstack(*args, env, cwd) -> str:
    """Run ``daskstack ARGS`` on its own local cluster (one worker process), quiet;
    returns its stderr, which holds that of the worker too."""
    done = subprocess.run([sys.executable, "-m", "daskstack.cli", *args, "--workers", "1",
                           "-q"], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == EXIT_OK, done.stdout + done.stderr
    return done.stderr


def test_run_on_an_object_store_with_remote_workers(s3, field, tmp_path):
    fs, env, credentials = s3
    env, client_dir, home = _client_side(env, tmp_path)
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
    # every object-store session closed (client; workers' logs)
    assert not any(b"Unclosed" in text for text in dask_logs + [t.encode() for t in logs])


def _upload(fs, frames, prefix) -> str:
    for path in frames:
        fs.put_file(str(path), f"{prefix}/{path.name}")
    return f"s3://{prefix}/*.fits.fz"


def test_solve_register_and_combine_onto_an_object_store(s3, field, tmp_path):
    """One stage at a time, each command with its own local cluster: the .wcs files,
    the store and the coadds on the object store are those of the same commands on a
    local directory; nothing lands on the local disk; no session is left open."""
    from distributed import Client

    from daskstack._pipeline import combine_store_path, register_files, solve_files
    from daskstack.frames import frame_name, quiet_astropy, read_meta

    fs, env, _ = s3
    env, client_dir, home = _client_side(env, tmp_path)
    frames = field.frames[:4]
    pattern = _upload(fs, frames, "frames/stages")
    run_key, catalog = "runs/stages", str(field.catalog)
    stderr = [_daskstack("solve", pattern, "--catalog", catalog, "--out", f"s3://{run_key}",
                         env=env, cwd=client_dir),
              _daskstack("register", pattern, "--out", f"s3://{run_key}", env=env,
                         cwd=client_dir),
              _daskstack("combine", f"s3://{run_key}", env=env, cwd=client_dir)]

    local = tmp_path / "local"
    with Client(processes=False, n_workers=1, threads_per_worker=1,
                dashboard_address=":0") as client:
        records = solve_files([str(p) for p in frames], catalog, local, client=client)
        register_files([str(p) for p in frames], local, client=client)
        coadds = combine_store_path(local / "store.zarr", local, client=client)
    names = [frame_name(p) for p in frames]
    assert [r.status for r in records] == ["ok"] * len(frames)
    solved = read_manifest(f"s3://{run_key}/solve.ecsv")
    assert sorted(solved["name"]) == sorted(names) and set(solved["status"]) == {"ok"}
    corners = np.array([[0.0, 0.0], [255.0, 0.0], [0.0, 255.0], [127.5, 127.5]])
    for name in names:
        with _fits(fs, f"{run_key}/{name}.wcs") as got, quiet_astropy():  # a header alone
            got_sky = WCS(got[0].header).all_pix2world(corners, 0)
            expected_sky = WCS(fits.getheader(local / f"{name}.wcs")).all_pix2world(corners,
                                                                                   0)
        np.testing.assert_allclose(got_sky, expected_sky, rtol=0, atol=1e-9, err_msg=name)
    pixels = registered_pixels(f"s3://{run_key}/store.zarr")
    assert sorted(pixels) == sorted(names)
    assert_same_pixels(registered_pixels(local / "store.zarr"), pixels)
    assert sorted(coadds) == sorted({read_meta(p).filter for p in frames})
    _assert_same_coadds(fs, run_key, coadds)
    assert _files_under(client_dir, home) == []
    for text in stderr:
        assert "Unclosed" not in text, text


def test_no_session_left_open_at_exit(s3, field, tmp_path):
    """run, combine and report on an object-store run directory, each with its own
    local cluster: neither the command nor its worker leaves an aiohttp session open
    (its "Unclosed client session" / "Unclosed connector" go to stderr at exit)."""
    fs, env, _ = s3
    env, client_dir, home = _client_side(env, tmp_path)
    pattern = _upload(fs, field.frames[:4], "frames/quiet")
    out = "s3://runs/quiet"
    stderr = {"run": _daskstack("run", pattern, "--wcs", "header", "--out", out, env=env,
                                cwd=client_dir),
              "combine": _daskstack("combine", out, env=env, cwd=client_dir),
              "report": _daskstack("report", out, env=env, cwd=client_dir)}
    assert fs.exists("runs/quiet/report/index.html")
    assert _files_under(client_dir, home) == []
    for command, text in stderr.items():
        assert "Unclosed" not in text, f"{command}: {text}"


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


def test_zarr_stores_of_a_process_share_one_filesystem(s3, tmp_path):
    """Every zarr store on a URL in one process, whichever thread opens it and however
    often it is unpickled (Dask sends the arrays of a graph so), works through one
    filesystem: one session for the process to close at exit, not one per thread and
    per unpickled array."""
    import pickle
    import threading

    import zarr

    from daskstack._io import zarr_store

    url = "s3://runs/shared/store.zarr"
    zarr.open_group(zarr_store(url, "w"), mode="w").attrs["written"] = 1
    stores = []
    threads = [threading.Thread(target=lambda mode=mode: stores.append(zarr_store(url, mode)))
               for mode in ("r", "r+")]
    for thread in threads:
        thread.start()
        thread.join()
    assert sorted(store.read_only for store in stores) == [False, True]
    unpickled = [pickle.loads(pickle.dumps(store)) for store in stores]
    assert len({id(store.fs) for store in stores + unpickled}) == 1
    assert [store.read_only for store in unpickled] == [store.read_only for store in stores]
    assert all(store.path == "runs/shared/store.zarr" for store in unpickled)
    read_back = pickle.loads(pickle.dumps(zarr.open_group(zarr_store(url), mode="r")))
    assert read_back.attrs["written"] == 1
    assert zarr_store(tmp_path / "store.zarr", "w") == str(tmp_path / "store.zarr")
