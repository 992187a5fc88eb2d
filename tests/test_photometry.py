"""Aperture photometry (`daskstack.photometry`): unbiased fluxes and errors that are the
scatter, on Gaussian stars of known flux in Poisson + read noise."""

from __future__ import annotations

import numpy as np

from daskstack.photometry import PHOT_FLAG_EDGE, PHOT_FLAG_MASKED, aperture_photometry

SHAPE = (64, 64)
SKY, RDNOISE, SIGMA_PSF, FLUX = 200.0, 5.0, 1.8, 20000.0


def _star(x0, y0, flux=FLUX):
    yy, xx = np.mgrid[:SHAPE[0], :SHAPE[1]]
    return flux / (2 * np.pi * SIGMA_PSF**2) * np.exp(
        -((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * SIGMA_PSF**2))


def test_fluxes_unbiased_and_errors_are_the_scatter():
    rng = np.random.default_rng(1)
    truth = SKY + _star(31.3, 32.6)
    variance = truth + RDNOISE**2
    radius = 4 * SIGMA_PSF  # encloses all but exp(-8) of a Gaussian's flux
    results = []
    for _ in range(300):
        image = truth + rng.normal(0.0, np.sqrt(variance))
        results.append(aperture_photometry(image, [31.3], [32.6], radius, variance=variance))
    flux = np.array([r["flux"][0] for r in results])
    err = np.array([r["flux_err"][0] for r in results])
    enclosed = FLUX * (1 - np.exp(-radius**2 / (2 * SIGMA_PSF**2)))
    pulls = (flux - enclosed) / err
    assert abs(np.mean(pulls)) < 0.2
    assert 0.9 < np.std(pulls) < 1.1
    # without a variance map the error is the sky's alone: smaller than the truth here
    sky_only = aperture_photometry(truth, [31.3], [32.6], radius)
    assert sky_only["flux_err"][0] < np.median(err)


def test_flags_for_masked_and_edge_apertures():
    image = SKY + _star(10.0, 10.0) + _star(40.0, 40.0)
    mask = np.zeros(SHAPE, bool)
    mask[40, 41] = True
    table = aperture_photometry(image, [40.0, 1.0, 10.0], [40.0, 1.0, 10.0], 4.0, mask=mask)
    assert table["flags"][0] & PHOT_FLAG_MASKED
    assert table["flags"][1] & PHOT_FLAG_EDGE
    assert table["flags"][2] == 0
    enclosed = FLUX * (1 - np.exp(-4.0**2 / (2 * SIGMA_PSF**2)))
    assert abs(table["flux"][2] / enclosed - 1) < 0.01


def test_correlation_scales_the_variance_term():
    image = np.full(SHAPE, SKY)
    variance = np.full(SHAPE, 4.0)
    one = aperture_photometry(image, [32.0], [32.0], 3.0, variance=variance)
    two = aperture_photometry(image, [32.0], [32.0], 3.0, variance=variance, correlation=2.0)
    assert two["flux_err"][0] ** 2 > 1.9 * one["flux_err"][0] ** 2
