"""The noise model: the variance of every pixel of a frame, in the frame's own units.

One place for it (registration, combination and the coadd's ``ERR``/``WEIGHT`` all
start from `frame_variance`). No I/O; the box mean is a compiled loop (`daskstack._compiled`).

Where the frame carries an error extension (``ERR``, 1 sigma per pixel, as later LCO
products do), its square is the variance. Otherwise the variance is Poisson noise of
everything the detector collected plus read noise:

    variance [unit**2] = max(signal, 0) / g + (rdnoise / g)**2

with ``g`` the electrons per data unit (1 for frames in electrons, else the gain in
e-/ADU; `combine.electrons_per_unit`) and ``rdnoise`` in electrons. ``signal`` is the
frame (sky included) averaged over 3 x 3 pixels: the expected counts, not the counts
themselves. Taking each pixel's own value would make its variance follow its own noise
(a low pixel gets a low variance), and inverse-variance weights would then pull the
coadd low by about 1/g per frame (a fifth of a sigma for 20 sky-limited frames); the
3 x 3 mean cuts that coupling nine-fold and leaves the expectation unchanged.

Masked, saturated or non-linear (at or above ``SATURATE`` or ``MAXLIN``: `FrameMeta.
linear_limit`) and non-finite pixels have no variance (NaN): zero weight everywhere
downstream.
"""

from __future__ import annotations

import logging

import numpy as np

__all__ = ["GAIN_KEYS", "RDNOISE_KEYS", "SATURATION_KEYS", "frame_noise_model", "frame_variance",
           "header_number",
           "poisson_variance"]

log = logging.getLogger(__name__)

# header keywords, in order of preference, that other observatories use for the same thing
GAIN_KEYS = ("GAIN", "EGAIN", "CCDGAIN", "GAINEFF", "ATODGAIN", "HIERARCH ESO DET OUT1 GAIN")
RDNOISE_KEYS = ("RDNOISE", "READNOIS", "READNOISE", "RON", "ENOISE", "RDNOISE1",
                "HIERARCH ESO DET OUT1 RON")
SATURATION_KEYS = ("SATURATE", "MAXLIN")  # the lowest of them is where pixels stop counting
# side of the box whose mean is the expected signal of its central pixel (the compiled
# loop, `daskstack._compiled.poisson_variance`, is written for this 3)
SMOOTH_PX = 3


def header_number(header, keys) -> float | None:
    """The first of ``keys`` in ``header`` holding a finite number, else None."""
    for key in keys:
        try:
            value = float(header.get(key))
        except (TypeError, ValueError):
            continue
        if np.isfinite(value):
            return value
    return None


def poisson_variance(data: np.ndarray, bad: np.ndarray, electrons_per_unit: float,
                     rdnoise_e: float) -> np.ndarray:
    """Poisson + read-noise variance (data units squared) of ``data``, NaN where ``bad``.

    The Poisson term is the 3 x 3 mean of the good pixels around each pixel, the edge
    pixels repeated past the border (see the module docstring), clipped at 0; float32
    throughout (a sum of 9 values loses nothing in float32), in one compiled pass
    (whole-frame numpy temporaries cost more than the arithmetic)."""
    from ._compiled import poisson_variance as compiled  # numba: only where frames are

    g = 1 / float(electrons_per_unit)
    read = (float(rdnoise_e) / float(electrons_per_unit)) ** 2
    return compiled(data, bad, g, read)


def frame_variance(data: np.ndarray, mask: np.ndarray | None = None, *,
                   electrons_per_unit: float = 1.0, rdnoise_e: float = 0.0,
                   error: np.ndarray | None = None) -> np.ndarray:
    """Variance per pixel of a frame (float32, the square of ``data``'s unit), NaN where
    the pixel must get no weight.

    data : the frame (sky not subtracted: its Poisson noise is part of the model).
    mask : True = bad (BPM, saturated, not finite); such pixels get NaN.
    electrons_per_unit : electrons per data unit (1 for frames in electrons).
    rdnoise_e : read noise in electrons.
    error : the frame's own 1-sigma error extension, if it has one: then the variance
        is ``error**2`` (pixels whose error is not finite or not > 0 get NaN) and the
        gain and read noise are not used.
    """
    data = np.asarray(data)
    bad = ~np.isfinite(data)
    if mask is not None:
        bad |= np.asarray(mask, bool)
    if error is not None:
        error = np.asarray(error, dtype=np.float32)
        if error.shape != data.shape:
            raise ValueError(f"error extension shape {error.shape} != image {data.shape}")
        with np.errstate(invalid="ignore"):
            bad = bad | ~(np.isfinite(error) & (error > 0))
        variance = np.square(error)
        variance[bad] = np.nan
        return variance
    if not electrons_per_unit > 0:
        raise ValueError(f"electrons per unit must be > 0, got {electrons_per_unit}")
    if not rdnoise_e >= 0:
        raise ValueError(f"read noise must be >= 0, got {rdnoise_e}")
    return poisson_variance(data, bad, electrons_per_unit, rdnoise_e)


def frame_noise_model(frame, *, gain: float = 0.0, rdnoise: float = -1.0
                      ) -> tuple[np.ndarray, dict]:
    """The variance of a `daskstack.frames.Frame` and how it was made.

    gain : e-/ADU; > 0 overrides the header (`GAIN_KEYS`), 0 = the header's.
    rdnoise : e-; >= 0 overrides the header (`RDNOISE_KEYS`), < 0 = the header's. A
        frame whose header gives no read noise gets the one its sky implies: the
        measured sky scatter squared minus the sky's own Poisson variance.

    Returns ``(variance, record)``; ``record`` says where the numbers came from
    (``source``: 'ERR' or 'model'; ``gain``, ``rdnoise``, ``rdnoise_source``)."""
    from ._stats import sky_level
    from .combine import electrons_per_unit

    meta = frame.meta
    mask = frame.mask
    if np.isfinite(meta.linear_limit):
        with np.errstate(invalid="ignore"):
            mask = mask | (frame.data >= meta.linear_limit)
    if frame.error is not None:
        return (frame_variance(frame.data, mask, error=frame.error),
                {"source": "ERR", "gain": meta.gain, "rdnoise": meta.rdnoise,
                 "rdnoise_source": "ERR"})
    gain = float(gain) if gain > 0 else meta.gain
    g = float(electrons_per_unit(meta.bunit or "adu", [gain])[0])
    if rdnoise >= 0:
        rn, rn_source = float(rdnoise), "option"
    elif meta.rdnoise_keyword:
        rn, rn_source = meta.rdnoise, meta.rdnoise_keyword
    else:
        sky, scatter = sky_level(frame.data, mask)
        rn = float(np.sqrt(max((scatter * g) ** 2 - max(sky, 0.0) * g, 0.0))) \
            if np.isfinite(scatter) else 0.0
        rn_source = "sky scatter"
        log.info("%s: no read-noise keyword; %.3g e- from the sky scatter", meta.name, rn)
    variance = frame_variance(frame.data, mask, electrons_per_unit=g, rdnoise_e=rn)
    return variance, {"source": "model", "gain": gain, "rdnoise": rn,
                      "rdnoise_source": rn_source}
