"""Small builders shared by tests (no files, no randomness beyond a seed), and real
Dask processes for the tests of where the pipeline runs."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from astropy.wcs import WCS, Sip


def tan_wcs(shape, ra=150.0, dec=2.0, rotation_deg=0.0, scale_arcsec=0.389, sip=False):
    """A TAN (optionally TAN-SIP with ~2 px of distortion at the corners) WCS."""
    ny, nx = shape
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"] if sip else ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [ra, dec]
    wcs.wcs.crpix = [(nx + 1) / 2, (ny + 1) / 2]
    t = np.deg2rad(rotation_deg)
    s = scale_arcsec / 3600.0
    wcs.wcs.cd = s * np.array([[-np.cos(t), np.sin(t)], [np.sin(t), np.cos(t)]])
    if sip:
        half = max(nx, ny) / 2
        a = np.zeros((4, 4))
        b = np.zeros((4, 4))
        a[2, 0], a[0, 2], a[1, 1], a[3, 0] = (1.0 / half**2, -0.6 / half**2, 0.8 / half**2,
                                              0.5 / half**3)
        b[0, 2], b[2, 0], b[1, 2] = 1.0 / half**2, 0.5 / half**2, 0.5 / half**3
        wcs.sip = Sip(a, b, None, None, wcs.wcs.crpix)
    wcs.array_shape = shape
    return wcs


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kill_group(proc: subprocess.Popen, sig=signal.SIGKILL, timeout=20.0) -> None:
    """End a process started with ``start_new_session=True`` and all its children."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout)


@contextlib.contextmanager
def dask_processes_in(directory: Path, env: dict | None = None, scratch: Path | None = None):
    """A ``dask scheduler`` and two single-threaded ``dask worker`` processes on
    127.0.0.1, each in its own process group and its own new, empty working directory
    (``directory/worker<i>``; logs in ``directory/dask-logs``), with ``env`` (default:
    this process's). ``scratch``: the workers' Dask local directory (default: their
    working directory). Yields ``(address, [worker procs])``; all ended on exit."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = []
    logs = directory / "dask-logs"
    logs.mkdir()
    try:
        scheduler = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
             "--port", str(port), "--dashboard-address", ":0"],
            stdout=open(logs / "scheduler.log", "wb"), stderr=subprocess.STDOUT,
            start_new_session=True, cwd=logs, env=env)
        procs.append(scheduler)
        workers = []
        for i in range(2):
            wdir = directory / f"worker{i}"
            wdir.mkdir()
            local = scratch / f"worker{i}" if scratch is not None else wdir
            workers.append(subprocess.Popen(
                [sys.executable, "-m", "distributed.cli.dask_worker", address, "--host",
                 "127.0.0.1", "--nthreads", "1", "--nworkers", "1", "--name", f"w{i}",
                 "--local-directory", str(local), "--death-timeout", "60"],
                stdout=open(logs / f"worker{i}.log", "wb"), stderr=subprocess.STDOUT,
                start_new_session=True, cwd=wdir, env=env))
        procs.extend(workers)
        from distributed import Client

        with Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
        yield address, workers
    finally:
        for proc in reversed(procs):
            kill_group(proc, signal.SIGTERM)


def registered_pixels(store_path) -> dict[str, dict[str, np.ndarray]]:
    """``{frame name: {plane: its (ny, nx) slice}}`` of every frame in a store (local or
    URL), decoded: compared before and after frames are added, whatever the chunk
    layout."""
    from daskstack.store import filter_key, open_store

    stack = open_store(store_path)
    group = stack.group()
    out = {}
    for filter_name, names in stack.filters.items():
        key = filter_key(filter_name)
        planes = {plane: group[f"{key}/{plane}"][...]
                  for plane in ("data", "variance", "kernel_power")}
        for index, name in enumerate(names):
            out[name] = {plane: values[index] for plane, values in planes.items()}
    return out


def assert_same_pixels(before: dict, after: dict) -> None:
    """Every frame of ``before`` (`registered_pixels`) has the same pixels in ``after``."""
    for name, planes in before.items():
        for plane, values in planes.items():
            np.testing.assert_array_equal(after[name][plane], values, err_msg=f"{name} {plane}")
