"""Incremental runs: the same `run` with tonight's frames added to the inputs solves and
registers only the frames added, appends them to the store (on the first run's grid) and
combines again; the coadds equal a one-shot run of all the frames on the same grid.
(The same on an object store: tests/test_object_store.py.)"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from astropy.io import fits

from daskstack import _pipeline, store
from daskstack._pipeline import EXIT_OK, run
from daskstack._rundir import DifferentRunError, check_run_dir, run_signature
from daskstack.config import Settings
from daskstack.store import open_store

from .helpers import assert_same_pixels, registered_pixels

N_FIRST = 6


@pytest.fixture(scope="module")
def night_field(tmp_path_factory):
    """Twelve small frames of one field in two filters: the first six are last night's,
    the other six tonight's."""
    from daskstack.simulate import DEFAULT_DENSITY, simulate_field

    return simulate_field(tmp_path_factory.mktemp("nights") / "inputs", n_frames=12,
                          shape=(448, 448), filters=("rp", "gp"), seed=23,
                          density_per_sq_deg=3 * DEFAULT_DENSITY, pointing_error_arcmin=0.3)


@pytest.fixture(scope="module")
def thread_client():
    """Tasks in this process (threads): the calls of the solver and of registration
    can be counted by patching them."""
    from distributed import Client

    with Client(processes=False, n_workers=1, threads_per_worker=2,
                dashboard_address=":0") as client:
        yield client


def _counting(monkeypatch):
    """Patch the solver and the store's tile writer (both called inside the tasks, so
    patched in the tasks' thread too) to record what they are called on: solved frame
    names, registered (filter, index in the store)."""
    calls = {"solve": [], "register": []}
    solve, write_tiles = _pipeline.solve_frame, store.write_tiles

    def counted_solve(frame, *args, **kwargs):
        calls["solve"].append(frame.meta.name)
        return solve(frame, *args, **kwargs)

    def counted_write_tiles(store_path, filter_name, index, tiles):
        calls["register"].append((filter_name, index))
        return write_tiles(store_path, filter_name, index, tiles)

    monkeypatch.setattr(_pipeline, "solve_frame", counted_solve)
    monkeypatch.setattr(store, "write_tiles", counted_write_tiles)
    return calls


def _wcs_files(out) -> dict[str, tuple[int, str]]:
    """(mtime, sha256) of every .wcs file."""
    return {p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in out.glob("*.wcs")}


def test_frames_added_to_a_run_are_the_only_ones_computed(night_field, thread_client,
                                                          tmp_path, monkeypatch):
    frames = [str(p) for p in night_field.frames]
    catalog = str(night_field.catalog)
    out = tmp_path / "campaign"
    first = run(frames[:N_FIRST], catalog, out, client=thread_client)
    assert first.exit_code == EXIT_OK
    reference = open_store(out / "store.zarr").params["reference_frame"]
    grid = first.grid.fingerprint
    wcs_before = _wcs_files(out)
    pixels_before = registered_pixels(out / "store.zarr")
    assert len(wcs_before) == len(pixels_before) == N_FIRST

    calls = _counting(monkeypatch)
    second = run(frames, catalog, out, client=thread_client)
    assert second.exit_code == EXIT_OK
    added = {f.name for f in second.frames[N_FIRST:]}
    assert sorted(calls["solve"]) == sorted(added)  # last night's frames: not solved again
    stack = open_store(out / "store.zarr")
    registered = [stack.filters[f][i] for f, i in calls["register"]]
    assert sorted(registered) == sorted(added)  # nor registered again
    wcs_after = _wcs_files(out)
    assert {name: wcs_after.get(name) for name in wcs_before} == wcs_before  # untouched
    assert len(wcs_after) == len(frames)
    assert_same_pixels(pixels_before, registered_pixels(out / "store.zarr"))
    assert second.grid.fingerprint == grid  # the first run's grid is kept
    assert stack.params["reference_frame"] == reference
    assert sorted(stack.params["registered"]) == sorted(f.name for f in second.frames)
    assert sum(map(len, stack.filters.values())) == len(frames)
    for filter_name, names in stack.filters.items():  # the frame axis grew with the frames
        assert stack.arrays(filter_name)[0].shape[0] == len(names)

    # the same twelve frames at once, on the same grid: the same coadds, to float32
    monkeypatch.undo()
    settings = Settings().replace("grid", reference=reference)
    once = run(frames, catalog, tmp_path / "one-shot", settings, client=thread_client)
    assert once.grid.fingerprint == grid
    assert set(once.coadds) == set(second.coadds) == {"rp", "gp"}
    for filter_name, path in once.coadds.items():
        with fits.open(path) as expected, fits.open(second.coadds[filter_name]) as got:
            assert got[0].header["NCOMBINE"] == expected[0].header["NCOMBINE"] > N_FIRST // 2
            for hdu in ("PRIMARY", "ERR", "WEIGHT", "NFRAMES", "EXPMAP"):
                np.testing.assert_allclose(got[hdu].data, expected[hdu].data, rtol=2e-7,
                                           atol=0, equal_nan=True, err_msg=hdu)


def test_what_counts_as_the_same_run(tmp_path):
    """More inputs with the same settings resume (run.json then lists them all); fewer
    inputs, or more with other settings, are a different run (refused without
    --overwrite)."""
    frames = [str(tmp_path / f"f{i}.fits") for i in range(4)]
    out = tmp_path / "run"
    assert not check_run_dir(out, run_signature(frames[:2], "cat.ecsv", Settings()), False)
    assert check_run_dir(out, run_signature(frames, "cat.ecsv", Settings()), False)
    assert check_run_dir(out, run_signature(frames, "cat.ecsv", Settings()), False)
    with pytest.raises(DifferentRunError, match=r"1 frame\(s\) dropped.*--exclude"):
        check_run_dir(out, run_signature(frames[:3], "cat.ecsv", Settings()), False)
    other = Settings().replace("register", order="lanczos3")
    with pytest.raises(DifferentRunError, match="register.order") as err:
        check_run_dir(out, run_signature(frames + [str(tmp_path / "f9.fits")], "cat.ecsv",
                                         other), False)
    assert "1 frame(s) added" in str(err.value)
