"""What each contender runs, exactly: a list of steps, each one process, timed alone.

A contender's *core* steps produce its mean and median coadds (the figures compared
in the issue's targets); *extra* steps (daskstack's sigma-clipped combine) are timed
and reported separately.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = HERE / "scripts"
PY = sys.executable
SWARP = shutil.which("SWarp") or shutil.which("swarp")

ALL_CONTENDERS = ("floor", "tutorial", "swarp", "reproject_and_coadd", "daskstack-1w",
                  "daskstack-2w")


@dataclass
class Step:
    name: str
    cmd: list
    core: bool = True  # part of "mean + median"


@dataclass
class Plan:
    contender: str
    run_dir: Path
    steps: list[Step]
    outputs: dict[str, Path]  # "mean" | "median" | "sigclip" -> FITS (image in HDU 0)
    heavy: list[Path] = field(default_factory=list)  # deleted once compared
    note: str = ""


# SWarp: bilinear resampling onto the grid of coadd.head, no background subtraction, no
# astrometric flux scaling (the tutorial does none), BPM-derived weight maps, 2 threads.
SWARP_CONFIG = {
    "HEADER_SUFFIX": ".head",
    "WEIGHT_TYPE": "MAP_WEIGHT",
    "WEIGHT_SUFFIX": ".weight.fits",
    "RESCALE_WEIGHTS": "N",
    "COMBINE": "Y",
    "RESAMPLE": "Y",
    "RESAMPLING_TYPE": "BILINEAR",
    "OVERSAMPLING": "0",
    "INTERPOLATE": "N",
    "FSCALASTRO_TYPE": "NONE",
    "SUBTRACT_BACK": "N",
    "CELESTIAL_TYPE": "NATIVE",
    "PROJECTION_TYPE": "TAN",
    "COMBINE_BUFSIZE": "256",
    "MEM_MAX": "256",
    "VMEM_MAX": "2047",
    "DELETE_TMPFILES": "N",
    "WRITE_XML": "Y",
    "VERBOSE_TYPE": "NORMAL",
    "NTHREADS": "2",
}


def baseline_contender(source: Path, workers: int = 2) -> str:
    """The name of daskstack at another revision, unpacked in ``source`` (see
    `runner.unpack_revision`): ``daskstack-2w@<source directory name>``."""
    return f"daskstack-{workers}w@{Path(source).name}"


def daskstack_steps(frames, grid_head, run_dir: Path, workers: int, filter_name: str,
                    source: Path | None = None):
    """One `daskstack run` makes the mean and the median coadds from one read of the store
    (as SWarp and the tutorial make both); the sigma-clipped coadd is an extra step that
    re-combines the store without reprojecting. ``source``: run the daskstack found there
    (another revision, for a before/after comparison) instead of the installed one."""
    common = ["--scale", "none", "--keep-background", "--workers", str(workers),
              "--threads", "1", "-q"]
    # `env PYTHONPATH=...` puts the other revision's package first, in the workers too
    python = [PY] if source is None else ["env", f"PYTHONPATH={source}", PY]
    run = [*python, "-m", "daskstack.cli", "run", *map(str, frames), "--wcs", "header",
           "--grid", str(grid_head), "--combine", "mean,median", "--out", str(run_dir),
           "--overwrite", *common]
    store = run_dir / "store.zarr"
    sigclip = [*python, "-m", "daskstack.cli", "combine", str(store), "--out",
               str(run_dir / "sigclip"), "--combine", "sigclip", *common]
    steps = [Step("register+mean+median", run), Step("sigclip", sigclip, core=False)]
    outputs = {"mean": run_dir / f"coadd_{filter_name}.fits",
               "median": run_dir / f"coadd_{filter_name}_median.fits",
               "sigclip": run_dir / "sigclip" / f"coadd_{filter_name}.fits"}
    return steps, outputs, [store]


def swarp_setup(frames, grid_head, run_dir: Path):
    """Write the SWarp config, the .head grid files and input lists; return steps."""
    inputs = run_dir / "inputs"
    resamp = run_dir / "resamp"
    resamp.mkdir(parents=True, exist_ok=True)
    config = dict(SWARP_CONFIG, VMEM_DIR=str(run_dir), RESAMPLE_DIR=str(resamp))
    (run_dir / "swarp.conf").write_text(
        "".join(f"{key:<22} {value}\n" for key, value in config.items()))
    head = Path(grid_head).read_text()
    for name in ("coadd", "coadd_median"):
        (run_dir / f"{name}.head").write_text(head)
    names = [_stem(f) for f in frames]
    (run_dir / "resamp.txt").write_text(
        "".join(f"{resamp / (n + '.resamp.fits')}\n" for n in names))
    base = [SWARP, "-c", str(run_dir / "swarp.conf")]
    prepare = [PY, str(SCRIPTS / "swarp_prepare.py"), str(inputs), *map(str, frames)]
    average = base + [f"@{inputs / 'inputs.txt'}", "-COMBINE_TYPE", "AVERAGE",
                      "-IMAGEOUT_NAME", str(run_dir / "coadd.fits"),
                      "-WEIGHTOUT_NAME", str(run_dir / "coadd.weight.fits"),
                      "-XML_NAME", str(run_dir / "swarp-average.xml")]
    median = base + [f"@{run_dir / 'resamp.txt'}", "-RESAMPLE", "N", "-COMBINE_TYPE", "MEDIAN",
                     "-IMAGEOUT_NAME", str(run_dir / "coadd_median.fits"),
                     "-WEIGHTOUT_NAME", str(run_dir / "coadd_median.weight.fits"),
                     "-XML_NAME", str(run_dir / "swarp-median.xml")]
    steps = [Step("prepare (decompress + weights)", prepare),
             Step("resample+average", average), Step("median (resampled reused)", median)]
    outputs = {"mean": run_dir / "coadd.fits", "median": run_dir / "coadd_median.fits"}
    return steps, outputs, [inputs, resamp]


def _stem(path) -> str:
    name = Path(path).name
    for suffix in (".fits.fz", ".fits", ".fz"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def plan(contender: str, dataset, run_dir: Path, baselines: Path | None = None) -> Plan | None:
    """The steps of ``contender`` on ``dataset`` (a Dataset subset), or None when it
    cannot run here (SWarp not installed). ``daskstack-<W>w@<rev>`` runs the revision
    unpacked under ``baselines``/<rev>."""
    frames, grid = dataset.frames, dataset.grid_head
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if contender == "floor":
        return Plan(contender, run_dir, [Step("read all + write coadd", [
            PY, str(SCRIPTS / "floor.py"), str(run_dir), str(grid), *map(str, frames)])],
            {}, [run_dir / "floor.fits"])
    if contender == "tutorial":
        return Plan(contender, run_dir, [Step("reproject+mean+median", [
            PY, str(SCRIPTS / "tutorial_method.py"), str(run_dir), *map(str, frames)])],
            {"mean": run_dir / "mean.fits", "median": run_dir / "median.fits"})
    if contender == "reproject_and_coadd":
        return Plan(contender, run_dir, [Step("reproject_and_coadd mean", [
            PY, str(SCRIPTS / "reproject_coadd.py"), str(run_dir), *map(str, frames)])],
            {"mean": run_dir / "mean.fits"}, note="mean only")
    if contender == "swarp":
        if SWARP is None:
            return None
        steps, outputs, heavy = swarp_setup(frames, grid, run_dir)
        return Plan(contender, run_dir, steps, outputs, heavy)
    if contender.startswith("daskstack-"):
        name, _, revision = contender.partition("@")
        workers = int(name.split("-")[1].rstrip("w"))
        source = None
        if revision:
            if baselines is None or not (Path(baselines) / revision).is_dir():
                raise ValueError(f"{contender}: no unpacked revision {revision} under "
                                 f"{baselines}")
            source = Path(baselines) / revision
        steps, outputs, heavy = daskstack_steps(frames, grid, run_dir, workers, dataset.filter,
                                                source)
        return Plan(contender, run_dir, steps, outputs, heavy)
    raise ValueError(f"unknown contender {contender!r}")
