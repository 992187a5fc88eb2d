"""daskstack: calibrate, register and co-add telescope frames at any scale with Dask.

The public API follows the learn.astropy tutorial "Image Registration and
Combination", one function per step, each usable on its own in a notebook::

    frame = read_frame(path)                          # read (SCI + BPM, LCO quirks)
    detections = detect_sources(frame)                # find stars (photocentres)
    catalog = reference_catalog("gaia", centre, r)    # Gaia / a local file, cached
    result = solve_frame(frame, catalog)              # match + fit a corrected WCS
    grid = make_grid([(shape, wcs), ...], settings.grid)   # choose the output grid
    tiles = register_frame(data, mask, wcs, grid, settings.register)  # reproject
    coadd = combine_stack(stack, method="sigclip")    # combine (lazy, dask)

and `run` does all of it for many frames as one Dask computation, into a run
directory (coadds, manifest, WCS files, zarr store), resumably.

The stable surface is what this module exports (``__all__``); the modules behind it
may change between versions:

- one step at a time: `read_frame`, `read_meta`, `detect_sources`, `reference_catalog`,
  `load_catalog`, `propagate_proper_motion`, `solve_frame`, `write_wcs_file`,
  `make_grid`, `register_frame`, `frame_scales`, `combine_stack`, `open_store`;
- many frames on a Dask cluster (each takes inputs and `Settings`, and an optional
  ``client=``; without one a cluster is started from ``settings.cluster``): `run`,
  `solve_files`, `register_files`, `combine_store_path`, `lightcurve_store_path`,
  `make_report`;
- records and options: `Settings` (immutable: `Settings.replace`, `Settings.update`
  return new ones), `Frame`, `FrameMeta`, `Detections`, `SolveResult`, `Grid`,
  `FrameRecord` (one frame of a run), `FrameInfo` (its record in the store),
  `RunResult`;
- errors: `DaskstackError` (the base of every error raised on purpose), `FrameError`,
  `SettingsError`.
"""

from ._pipeline import (
    RunResult,
    combine_store_path,
    lightcurve_store_path,
    make_report,
    register_files,
    run,
    solve_files,
)
from ._rundir import FrameRecord
from .astrometry import SolveResult, solve_frame, write_wcs_file
from .catalogs import load_catalog, propagate_proper_motion, reference_catalog
from .combine import combine_stack, frame_scales
from .config import Settings, SettingsError
from .detect import Detections, detect_sources
from .errors import DaskstackError
from .frames import Frame, FrameError, FrameMeta, read_frame, read_meta
from .grid import Grid, make_grid
from .register import register_frame
from .store import FrameInfo, open_store

__version__ = "0.1.0"

__all__ = [
    "DaskstackError",
    "Detections",
    "Frame",
    "FrameError",
    "FrameInfo",
    "FrameMeta",
    "FrameRecord",
    "Grid",
    "RunResult",
    "Settings",
    "SettingsError",
    "SolveResult",
    "combine_stack",
    "combine_store_path",
    "lightcurve_store_path",
    "detect_sources",
    "frame_scales",
    "load_catalog",
    "make_grid",
    "make_report",
    "open_store",
    "propagate_proper_motion",
    "read_frame",
    "read_meta",
    "reference_catalog",
    "register_files",
    "register_frame",
    "run",
    "solve_files",
    "solve_frame",
    "write_wcs_file",
]
