"""Benchmark inputs: synthetic LCO Sinistro-like frames (daskstack.simulate, no network)
and the real PDS 110 frames, plus the output grid every contender uses.

Synthetic frames are simulated with no pointing and no rotation error and no SIP, so
their header WCS *is* the simulation's truth (checked here, to 1e-6 px); every tool
then uses the header WCS as it is, as SWarp and the tutorial do. A dataset is
generated once for the largest N of a suite and cached under ``results/data``; the
N-frame benchmark uses its first N frames.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

REPO = Path(__file__).resolve().parent.parent
DEFAULT_REAL_DIR = (REPO / ".." / "shared" / "data" / "lco-pds110").resolve()
SYNTH_SEED = 2024
SYNTH_FILTER = "rp"
REAL_FILTER = "all"


@dataclass
class Dataset:
    """A set of input frames and the one output grid all contenders use."""

    name: str  # "real" or "synth4096"
    kind: str  # "real" | "synthetic"
    frames: list[Path]
    frame_shape: tuple[int, int]
    filter: str  # what daskstack names its coadd after
    directory: Path
    catalog: Path | None = None  # simulated truth (synthetic only)
    truth: Path | None = None
    info: dict = field(default_factory=dict)

    def subset(self, n: int) -> Dataset:
        if n > len(self.frames):
            raise ValueError(f"{self.name}: {n} frames asked, {len(self.frames)} available")
        return Dataset(self.name, self.kind, self.frames[:n], self.frame_shape, self.filter,
                       self.directory, self.catalog, self.truth, dict(self.info))

    @property
    def grid_head(self) -> Path:
        """The output grid: the first frame's header WCS and shape, as a text header."""
        path = self.directory / f"grid-{self.frames[0].name.split('.')[0]}.head"
        if not path.exists():
            write_grid_head(self.frames[0], path)
        return path


def _quiet():
    import warnings

    from astropy.utils.exceptions import AstropyWarning

    warnings.simplefilter("ignore", AstropyWarning)


def sci_header(path) -> fits.Header:
    _quiet()
    with fits.open(path) as hdul:
        hdu = hdul["SCI"] if "SCI" in hdul else hdul[0]
        header = hdu.header.copy()
    for axis in (1, 2):  # compressed HDUs: astropy presents the image's NAXISn
        header[f"NAXIS{axis}"] = int(header.get(f"ZNAXIS{axis}", header[f"NAXIS{axis}"]))
    return header


def grid_header(frame_path) -> fits.Header:
    """Celestial WCS + NAXIS1/2 of a frame's SCI header (nothing else)."""
    _quiet()
    header = sci_header(frame_path)
    wcs = WCS(header, naxis=2)
    out = fits.Header()
    out["NAXIS"] = 2
    out["NAXIS1"] = int(header["NAXIS1"])
    out["NAXIS2"] = int(header["NAXIS2"])
    out.extend(wcs.to_header(relax=True), update=True)
    for key in ("DATE-OBS", "MJD-OBS", "MJDREF", "TIMESYS", "DATE-BEG", "MJD-BEG", "DATEREF",
                "MJDREFI", "MJDREFF"):
        out.remove(key, ignore_missing=True, remove_all=True)
    return out


def write_grid_head(frame_path, path) -> Path:
    """A SWarp-style ``.head`` file (80-character cards, one per line, END), which
    daskstack's ``--grid`` reads too."""
    header = grid_header(frame_path)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [card.image for card in header.cards] + ["END".ljust(80)]
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------------------------------
# Synthetic frames
# ---------------------------------------------------------------------------------------
def synthetic(data_root, n_frames: int, size: int = 4096, seed: int = SYNTH_SEED,
              workers: int = 2, log=print, shape: tuple[int, int] | None = None) -> Dataset:
    """``n_frames`` simulated ``size``x``size`` frames (``shape`` (ny, nx) when given) in
    one filter with an exact header WCS (cached: regenerated only when more frames or
    other parameters are asked)."""
    from daskstack.simulate import simulate_field

    shape = tuple(shape or (size, size))
    square = shape[0] == shape[1]
    size = shape[1]
    directory = Path(data_root) / (f"synth{size}-seed{seed}" if square else
                                   f"synth{shape[1]}x{shape[0]}-seed{seed}")
    params = {"size": size, "seed": seed, "filters": [SYNTH_FILTER],
              "pointing_error_arcmin": 0.0, "rotation_error_deg": 0.0, "sip": False,
              "version": 1}
    if not square:
        params["shape"] = list(shape)
    stamp = directory / "dataset.json"
    if stamp.exists():
        previous = json.loads(stamp.read_text())
        if previous.get("params") == params and previous.get("n_frames", 0) >= n_frames:
            frames = [directory / name for name in previous["frames"]]
            if all(f.exists() for f in frames):
                return _synthetic_dataset(directory, frames, shape, previous)
        shutil.rmtree(directory, ignore_errors=True)
    log(f"  simulating {n_frames} frames of {shape[1]}x{shape[0]} into {directory} ...")
    directory.mkdir(parents=True, exist_ok=True)
    executor = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        field_ = simulate_field(directory, n_frames=n_frames, shape=shape,
                                filters=(SYNTH_FILTER,), seed=seed, pointing_error_arcmin=0.0,
                                rotation_error_deg=0.0, sip=False, executor=executor)
    finally:
        if executor is not None:
            executor.shutdown()
    frames = list(field_.frames)
    worst = check_header_wcs(frames, field_.truth_wcs, shape)
    if worst > 1e-6:
        raise RuntimeError(f"simulated header WCS differs from the truth by {worst:.3g} px; "
                           "the benchmark needs frames with a correct header WCS")
    record = {"params": params, "n_frames": n_frames, "frames": [f.name for f in frames],
              "header_vs_truth_max_px": worst}
    stamp.write_text(json.dumps(record, indent=1))
    return _synthetic_dataset(directory, frames, shape, record)


def _synthetic_dataset(directory, frames, shape, record) -> Dataset:
    name = f"synth{shape[1]}" if shape[0] == shape[1] else f"synth{shape[1]}x{shape[0]}"
    return Dataset(name=name, kind="synthetic", frames=frames,
                   frame_shape=tuple(shape), filter=SYNTH_FILTER, directory=directory,
                   catalog=directory / "catalog.ecsv", truth=directory / "truth.ecsv",
                   info={"header_vs_truth_max_px": record.get("header_vs_truth_max_px")})


def check_header_wcs(frames, truth_wcs: dict, shape) -> float:
    """Largest RMS (px) over the frames between the header WCS and the true WCS."""
    from daskstack._validate import wcs_error_px
    from daskstack.frames import frame_name

    _quiet()
    worst = 0.0
    for path in frames:
        header_wcs = WCS(sci_header(path), naxis=2)
        worst = max(worst, wcs_error_px(header_wcs, truth_wcs[frame_name(path)], shape))
    return worst


# ---------------------------------------------------------------------------------------
# Real frames
# ---------------------------------------------------------------------------------------
def _replace_card(raw: bytearray, keyword: str, card: str) -> int:
    """Replace every 80-byte-aligned header card ``keyword`` (in place); count them."""
    key = keyword.ljust(8).encode() + b"="
    new = card.encode().ljust(80)
    count = 0
    start = 0
    while True:
        i = raw.find(key, start)
        if i < 0:
            return count
        if i % 80 == 0:
            raw[i:i + 80] = new
            count += 1
        start = i + 1


def real(data_root, real_dir=None, log=print) -> Dataset:
    """The PDS 110 frames whose header WCS was solved by LCO (WCSERR = 0): nine frames in
    three filters. Every contender combines all nine into one image (as in the issue's
    reference measurements), so they are copied with FILTER = 'all' (only that header
    card is rewritten, byte for byte; the compressed pixels are untouched) and daskstack
    makes one coadd of them."""
    real_dir = Path(real_dir or DEFAULT_REAL_DIR)
    directory = Path(data_root) / "real-pds110"
    directory.mkdir(parents=True, exist_ok=True)
    frames = []
    _quiet()
    for src in sorted(real_dir.glob("*.fits.fz")):
        dst = directory / src.name
        if not dst.exists():
            with fits.open(src) as hdul:
                if int(hdul["SCI"].header.get("WCSERR", 4)) != 0:
                    continue
            raw = bytearray(src.read_bytes())
            card = fits.Card("FILTER", REAL_FILTER, "all filters combined (benchmark copy)")
            if _replace_card(raw, "FILTER", card.image) == 0:
                raise RuntimeError(f"{src.name}: no FILTER card")
            tmp = dst.with_suffix(".tmp")
            tmp.write_bytes(bytes(raw))
            os.replace(tmp, dst)
        frames.append(dst)
    if not frames:
        raise FileNotFoundError(f"no frames with WCSERR=0 in {real_dir}")
    shape = sci_header(frames[0])
    return Dataset(name="real", kind="real", frames=frames,
                   frame_shape=(int(shape["NAXIS2"]), int(shape["NAXIS1"])),
                   filter=REAL_FILTER, directory=directory,
                   info={"source": str(real_dir)})


def truth_table(dataset: Dataset) -> Table | None:
    if dataset.truth is None:
        return None
    return Table.read(dataset.truth, format="ascii.ecsv")


def flux_per_unit(dataset: Dataset, names) -> np.ndarray:
    """Per frame: ADU of a star of magnitude m is this times 10**(-0.4 m)
    (exptime * transparency * 10**(0.4 zp) / gain, the simulation's model)."""
    table = truth_table(dataset)
    rows = {row["name"]: row for row in table}
    return np.array([rows[n]["exptime"] * rows[n]["transparency"]
                     * 10 ** (0.4 * rows[n]["zeropoint"]) / rows[n]["gain"] for n in names])
