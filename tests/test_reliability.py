"""Tests of inference/reliability.py: the K-aware k-hat threshold and the PSIS-smoothed estimate."""
from __future__ import annotations

import inspect
import math

import arviz as az
import numpy as np
import pytest
from scipy.special import logsumexp

from pyro_lvm import inference
from pyro_lvm.inference import reliability


def test_khat_threshold_values():
    # Vehtari et al. (2024): min(1 - 1/log10 S, 0.7)
    assert inference.khat_threshold is reliability.khat_threshold
    assert reliability.khat_threshold(25) == pytest.approx(0.285, abs=5e-4)
    assert reliability.khat_threshold(100) == pytest.approx(0.5, abs=1e-12)
    assert reliability.khat_threshold(1000) == pytest.approx(2 / 3, abs=1e-12)
    assert reliability.khat_threshold(10**6) == 0.7
    assert reliability.khat_threshold(np.int64(100)) == pytest.approx(0.5)
    for bad in (1, 0, -5, 2.5, True, "100", None):
        with pytest.raises(ValueError, match="num_samples"):
            reliability.khat_threshold(bad)


def test_khat_category_and_flags_use_the_threshold():
    k = np.array([-np.inf, 0.2, 0.3, 0.5, 0.51, 0.7, 0.71, np.inf, np.nan])
    assert list(reliability.khat_category(k, 25)) == [
        "good", "good", "ok", "ok", "ok", "ok", "bad", "undetermined", "undetermined"]
    assert list(reliability.khat_category(k, 100)) == [
        "good", "good", "good", "good", "ok", "ok", "bad", "undetermined", "undetermined"]
    np.testing.assert_array_equal(reliability.khat_unreliable(k, 100),
                                  [0, 0, 0, 0, 1, 1, 1, 0, 0])
    counts = reliability.reliability_counts(k, 100)
    assert counts == {"rows": 9, "threshold": 0.5, "unreliable": 3, "bad": 1,
                      "undetermined": 2, "unreliable_share": 3 / 9}


def _heavy_log_weights(rows: int, draws: int, seed: int = 0) -> np.ndarray:
    """Log weights of a too-narrow proposal: q = N(0, 1), p = N(0, 2^2) scaled by e^-40."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(rows, draws))
    log_p = -0.5 * (z / 2.0) ** 2 - math.log(2.0) - 40.0
    log_q = -0.5 * z**2
    return log_p - log_q


def test_psis_estimate_equals_arviz_unnormalized_smoothed_weights():
    """Against ArviZ directly: log of the mean of psislw's unnormalized smoothed weights."""
    if "normalize" not in inspect.signature(az.psislw).parameters:
        pytest.skip("this ArviZ has no psislw(normalize=False)")
    log_w = _heavy_log_weights(6, 1000)
    estimate, khat = reliability.psis_log_mean(log_w)
    smoothed, khat_direct = az.psislw(log_w.copy(), normalize=False)
    expected = logsumexp(smoothed, axis=-1) - math.log(log_w.shape[1])
    np.testing.assert_allclose(estimate, expected, rtol=0, atol=1e-10)
    np.testing.assert_array_equal(khat, khat_direct)
    # positive control: the tail was smoothed, so the raw estimate differs
    raw = logsumexp(log_w, axis=-1) - math.log(log_w.shape[1])
    assert np.all(np.abs(raw[:6] - estimate[:6]) > 1e-6)
    # the scale is carried through (the smoothing is shift-equivariant)
    shifted, _ = reliability.psis_log_mean(log_w + 123.0)
    np.testing.assert_allclose(shifted, estimate + 123.0, atol=1e-9)


def test_psis_estimate_without_smoothing_is_the_raw_estimate():
    # S = 20: a tail of 4 draws is too short to fit, psislw leaves the weights unchanged
    log_w = _heavy_log_weights(5, 20)
    estimate, khat = reliability.psis_log_mean(log_w)
    assert np.all(np.isinf(khat))
    np.testing.assert_allclose(estimate, logsumexp(log_w, axis=-1) - math.log(20), atol=1e-12)


def test_psis_estimate_from_smoothed_checks_shapes():
    with pytest.raises(ValueError, match="same shape"):
        reliability.psis_log_mean_from_smoothed(np.zeros((2, 5)), np.zeros((2, 4)))
