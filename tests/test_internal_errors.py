"""A frame's unexpected exception is a bug, not a bad frame: the run counts it apart
(`RunResult.n_errors`), keeps its traceback in ``OUT/errors.log`` (recorded in
outputs.ecsv), says so in the summary, and the other frames go on. A bug is provoked by
replacing a stage function, for one frame, with one that raises; the workers run in
this process (threads) so that the replacement reaches them."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table

from daskstack import _pipeline as pipeline
from daskstack import cli
from daskstack._pipeline import EXIT_OK, EXIT_PARTIAL, read_manifest, run
from daskstack._rundir import ERRORS_FILE, INTERNAL_ERROR, OUTPUTS_FILE, read_outputs, sha256
from daskstack.frames import frame_name

pytestmark = pytest.mark.internal_error


@pytest.fixture(scope="module")
def small_field(tmp_path_factory):
    from daskstack.simulate import simulate_field

    return simulate_field(tmp_path_factory.mktemp("bugs") / "inputs", n_frames=4,
                          shape=(384, 384), filters=("rp",), seed=5, cosmic_rays=False)


@pytest.fixture(scope="module")
def thread_client():
    from distributed import Client

    with Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=":0",
                silence_logs=50) as client:
        yield client


def _solve_raising_for(name, error):
    """`solve_frame`, except that it raises ``error`` on frame ``name``."""
    real = pipeline.solve_frame

    def solve_frame(frame, *args, **kwargs):
        if frame.name == name:
            raise error
        return real(frame, *args, **kwargs)
    return solve_frame


def _register_raising_for(path, error):
    """`register_frame`, except that it raises ``error`` on the pixels of ``path``."""
    from daskstack.frames import read_frame

    real, pixels = pipeline.register_frame, read_frame(str(path)).data

    def register_frame(data, *args, **kwargs):
        if data.shape == pixels.shape and np.array_equal(data, pixels, equal_nan=True):
            raise error
        return real(data, *args, **kwargs)
    return register_frame


def test_bugs_are_counted_logged_and_the_batch_goes_on(small_field, thread_client, tmp_path,
                                                       monkeypatch, capsys):
    names = [frame_name(p) for p in small_field.frames]
    solve_bug, register_bug = names[1], names[2]
    monkeypatch.setattr(pipeline, "solve_frame", _solve_raising_for(
        solve_bug, ZeroDivisionError("float division by zero")))
    monkeypatch.setattr(pipeline, "register_frame", _register_raising_for(
        small_field.frames[2], KeyError("tile")))
    out = tmp_path / "run"
    result = run([str(p) for p in small_field.frames], str(small_field.catalog), out,
                 client=thread_client)

    assert result.n_errors == 2 and result.n_failed == 2 and result.n_ok == 2
    assert result.coadds and result.exit_code == EXIT_PARTIAL
    rows = {row["name"]: row for row in read_manifest(out / "manifest.ecsv")}
    assert rows[solve_bug]["reason"].startswith(
        f"{INTERNAL_ERROR} while solving: ZeroDivisionError: float division by zero")
    assert rows[register_bug]["reason"].startswith(
        f"{INTERNAL_ERROR} while registering: KeyError")
    assert {n for n, row in rows.items() if row["status"] == "ok"} == set(names) - {
        solve_bug, register_bug}

    log = (out / ERRORS_FILE).read_text()
    for name, task, stage in ((solve_bug, "_solve_task", "solve_frame"),
                              (register_bug, "_register_task", "register_frame")):
        entry = log.split(f"=== {name}: ", 1)[1].split("\n=== ", 1)[0]
        assert "Traceback (most recent call last)" in entry
        # every frame from the task down to the stage function that raised
        assert f"in {task}\n" in entry and f"in {stage}\n" in entry
    assert read_outputs(out)[ERRORS_FILE][0] == sha256(out / ERRORS_FILE)
    Table.read(out / OUTPUTS_FILE, format="ascii.ecsv")

    cli._summary(result, quiet=False)
    captured = capsys.readouterr()
    assert (f"2 frames hit an internal error (a bug): see {out / ERRORS_FILE}, please "
            "report it") in captured.err
    cli._summary(result, quiet=True)  # even with -q
    assert "hit an internal error" in capsys.readouterr().err

    # the bug fixed, the run resumes: those frames are tried again, the old log goes
    monkeypatch.undo()
    again = run([str(p) for p in small_field.frames], str(small_field.catalog), out,
                client=thread_client)
    assert again.n_errors == 0 and again.exit_code == EXIT_OK
    assert not (out / ERRORS_FILE).exists() and ERRORS_FILE not in read_outputs(out)
    cli._summary(again, quiet=False)
    assert "internal error" not in capsys.readouterr().err


def test_a_bad_frame_is_not_counted_as_a_bug(small_field, thread_client, tmp_path):
    broken = tmp_path / "broken.fits"
    broken.write_bytes(small_field.frames[0].read_bytes()[:5000])  # truncated
    result = run([str(p) for p in small_field.frames[1:]] + [str(broken)],
                 str(small_field.catalog), tmp_path / "run", client=thread_client)
    failed = {r.name: r.reason for r in result.frames if r.status != "ok"}
    assert list(failed) == ["broken"] and result.n_errors == 0, failed
    assert not (tmp_path / "run" / ERRORS_FILE).exists()
