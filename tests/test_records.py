"""Per-frame records: the store's typed `FrameInfo` and a `FrameRecord` whose status is
derived from its result (one source of truth)."""

from __future__ import annotations

import numpy as np
import zarr

from daskstack import store as store_mod
from daskstack._rundir import FrameRecord, failure
from daskstack.astrometry import SolveResult
from daskstack.frames import FrameMeta
from daskstack.grid import Grid

from .helpers import tan_wcs


def _meta(name="a"):
    return FrameMeta(path=f"{name}.fits", name=name, shape=(10, 10), filter="rp",
                     exptime=30.0, date_obs="2024-01-01T00:00:00", mjd=60310.0, gain=2.0,
                     rdnoise=5.0, saturate=np.inf, pixscale=1.0, ra=0.0, dec=0.0)


def test_frame_status_follows_its_result_and_refusal():
    meta = _meta()
    record = FrameRecord(file=meta.path, name=meta.name, meta=meta)
    assert (record.status, record.reason) == ("pending", "")
    record.result = failure(meta, "too few matches")
    assert (record.status, record.reason) == ("failed", "too few matches")
    record.result = SolveResult(name="a", path=meta.path, filter="rp", status="ok",
                                reason="header WCS taken as is", background=12.0)
    assert (record.status, record.reason) == ("ok", "")
    record.refusal = "registration failed: disk full"
    assert (record.status, record.reason) == ("failed", "registration failed: disk full")
    row = record.row()
    assert (row["status"], row["reason"]) == ("failed", "registration failed: disk full")


def test_frame_info_round_trips_through_the_store(tmp_path):
    meta = _meta()
    result = SolveResult(name="a", path=meta.path, filter="rp", status="ok", background=12.0,
                         noise=3.0, flux_ratio=float("nan"), fwhm_px=2.5)
    info = FrameRecord(file=meta.path, name="a", meta=meta, result=result).info()
    assert (info.exptime, info.gain, info.background, info.noise) == (30.0, 2.0, 12.0, 3.0)
    assert info.flux_ratio is None  # not finite: unknown, not NaN in JSON
    grid = Grid.from_wcs(tan_wcs((20, 20)), (20, 20))
    path = tmp_path / "store.zarr"
    store_mod.create_store(path, grid, {"a": info}, {"rp": ["a"]}, tile=64)
    back = store_mod.open_store(path).frames
    # every field back as it was (as text: a zero point not measured is NaN, which is not
    # equal to itself)
    assert list(back) == ["a"] and repr(back["a"]) == repr(info)


def test_a_store_written_before_frame_info_still_opens(tmp_path):
    """Stores of earlier versions: records without new fields (noise) or with fields this
    version does not know open as FrameInfo, the unknown left out, the missing None."""
    grid = Grid.from_wcs(tan_wcs((20, 20)), (20, 20))
    path = tmp_path / "store.zarr"
    store_mod.create_store(path, grid, {"a": store_mod.FrameInfo()}, {"rp": ["a"]}, tile=64)
    group = zarr.open_group(str(path), mode="a")
    attrs = dict(group.attrs["daskstack"])
    attrs["frames"] = {"a": {"file": "a.fits", "exptime": 10.0, "background": 5.0,
                             "retired_field": 1}}
    group.attrs["daskstack"] = attrs
    info = store_mod.open_store(path).frames["a"]
    assert (info.file, info.exptime, info.background, info.noise) == ("a.fits", 10.0, 5.0,
                                                                      None)
