"""The suites: which data sizes, contenders and repeats.

Every suite repeats each run 3 times, interleaved (see ``stats.interleaved_order``), so
that its figures are medians with a range and its ratios come from runs made side by
side. The durations are planning estimates for an idle 2-core machine, made from the
per-run costs of an earlier one-repeat full-suite run whose result was not committed
(4096x4096 frames: the tutorial 176 s at N=10 and 388 s at N=20, SWarp 23 s / 70 s,
daskstack-2w 22 s / 38 s plus its sigma-clip step, daskstack-1w assumed ~1.7x
daskstack-2w, reproject_and_coadd ~13 s per frame, the floor ~1 s per frame). They size
the suites; they are not results.
"""

from __future__ import annotations

# "contenders" of "synthetic": contender -> the largest N it runs at (None: every N).
SUITES = {
    # ~15 minutes: the real frames and 5 synthetic 4096x4096 frames; every contender on
    # the real frames, every one but reproject_and_coadd (~65 s a repeat at N=5, ~ the
    # tutorial's per-frame cost; it is in "standard") on the synthetic ones; astrometry on
    # a few frames.
    "quick": {
        "real": {"repeats": 3},  # every contender
        "synthetic": {"size": 4096, "n": [5], "repeats": 3,
                      "contenders": {"floor": None, "tutorial": None, "swarp": None,
                                     "daskstack-1w": None, "daskstack-2w": None}},
        "astrometry": {"real_frames": 3, "big_frames": 2, "big_size": 4096,
                       "sweep_size": 2048, "sweep_frames": 1},
    },
    # ~50 minutes: the time and memory figures the README quotes, at N <= 20. Per round
    # ~220 s at N=5, ~420 s at N=10, ~230 s at N=20 (the tutorial, ~390 s and ~17 GiB at
    # N=20, and reproject_and_coadd stop at N=10): ~44 min for 3 rounds, plus the real
    # frames, generating 20 frames and the agreement. No astrometry (quick and full).
    "standard": {
        "real": {"repeats": 3},  # every contender
        "synthetic": {"size": 4096, "n": [5, 10, 20], "repeats": 3,
                      "contenders": {"floor": None, "tutorial": 10, "swarp": None,
                                     "daskstack-2w": None, "daskstack-1w": None,
                                     "reproject_and_coadd": 10}},
        "astrometry": None,
    },
    # ~3 hours (one round ~45 min, plus the tutorial's one try at N=40, the 100 frames'
    # generation and the astrometry): scaling to N=100. reproject_and_coadd stops at N=10,
    # daskstack with 1 worker at N=40; the tutorial (~0.9 GiB per 4096^2 frame) is tried
    # at N=40, where the memory cap stops it (recorded as out-of-memory with the memory
    # reached; not tried again), and is then skipped at N=100; N=100 runs floor, SWarp and
    # daskstack-2w only.
    "full": {
        "real": {"repeats": 3},  # every contender
        "synthetic": {"size": 4096, "n": [5, 10, 20, 40, 100], "repeats": 3,
                      "contenders": {"floor": None, "tutorial": 40, "swarp": None,
                                     "daskstack-2w": None, "daskstack-1w": 40,
                                     "reproject_and_coadd": 10}},
        "astrometry": {"real_frames": 9, "big_frames": 5, "big_size": 4096,
                       "sweep_size": 4096, "sweep_frames": 2},
    },
}

POINTING_ERRORS_ARCMIN = [0, 1, 5, 10, 20]
ROTATION_ERRORS_DEG = [0, 30, 180]


def contenders_for(suite: dict, n: int, all_contenders) -> list[str]:
    """The contenders a suite runs on its synthetic frames at N=n, in the canonical order:
    those it names whose largest N (None: no limit) is at least n, so that a run with other
    frame counts (``--n``) keeps each contender's limit."""
    spec = suite["synthetic"]["contenders"]
    # another revision (``daskstack-2w@<rev>``) runs wherever this revision's does
    return [c for c in all_contenders
            if (base := c.partition("@")[0]) in spec and (spec[base] is None or n <= spec[base])]
