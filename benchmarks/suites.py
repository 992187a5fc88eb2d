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
    # < 90 minutes on 2 cores. Repeats (median and spread) where a run is short;
    # reproject_and_coadd (~ the tutorial's per-frame cost, flat memory) and daskstack
    # with 1 worker stop at N=40 to stay in the time budget; the tutorial runs until it
    # is stopped for memory (and is then not tried at larger N).
    "full": {
        "real": {"contenders": "all", "repeats": 3},
        "synthetic": {"size": 4096, "n": [5, 10, 20, 40, 100],
                      "repeats": {5: 3, 10: 2, 20: 1, 40: 1, 100: 1},
                      "contenders": {"floor": "all", "tutorial": "all", "swarp": "all",
                                     "daskstack-2w": "all", "daskstack-1w": [5, 10, 20, 40],
                                     "reproject_and_coadd": [5, 10, 20]}},
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
