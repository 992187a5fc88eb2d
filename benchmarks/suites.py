"""The suites: which data sizes, contenders and repeats."""

from __future__ import annotations

SUITES = {
    # < 10 minutes on 2 cores: the real frames and 5 synthetic 4096x4096 frames,
    # every contender once; astrometry on a few frames.
    "quick": {
        "real": {"contenders": "all", "repeats": 1},
        "synthetic": {"size": 4096, "n": [5], "repeats": {5: 1},
                      "contenders": {"all": [5]}},
        "astrometry": {"real_frames": 3, "big_frames": 2, "big_size": 4096,
                       "sweep_size": 2048, "sweep_frames": 1},
    },
    # < 90 minutes on 2 cores (measured: see README "Suites"). One repeat everywhere (the
    # quick suite repeats the real and N=5 figures); reproject_and_coadd (~ the tutorial's
    # per-frame cost) stops at N=10, daskstack with 1 worker at N=40; the tutorial (~0.9 GiB
    # per 4096^2 frame) is tried at N=40, where the memory cap stops it (recorded as
    # out-of-memory with the memory reached), and is then skipped at N=100; N=100 runs
    # floor, SWarp and daskstack-2w only.
    "full": {
        "real": {"contenders": "all", "repeats": 1},
        "synthetic": {"size": 4096, "n": [5, 10, 20, 40, 100],
                      "repeats": {5: 1, 10: 1, 20: 1, 40: 1, 100: 1},
                      "contenders": {"floor": "all", "tutorial": [5, 10, 20, 40], "swarp": "all",
                                     "daskstack-2w": "all", "daskstack-1w": [5, 10, 20, 40],
                                     "reproject_and_coadd": [5, 10]}},
        "astrometry": {"real_frames": 9, "big_frames": 5, "big_size": 4096,
                       "sweep_size": 4096, "sweep_frames": 2},
    },
}

POINTING_ERRORS_ARCMIN = [0, 1, 5, 10, 20]
ROTATION_ERRORS_DEG = [0, 30, 180]


def contenders_for(suite: dict, n: int, all_contenders) -> list[str]:
    spec = suite["synthetic"]["contenders"]
    if "all" in spec:
        return list(all_contenders) if spec["all"] == "all" or n in spec["all"] else []
    return [c for c in all_contenders
            if c in spec and (spec[c] == "all" or n in spec[c])]
