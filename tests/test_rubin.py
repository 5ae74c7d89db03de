"""Rubin's rules: hand-computed values, limits, and the coverage of pooled intervals."""
import math

import numpy as np
import pytest
import scipy.stats

from pyro_lvm.inference import pooled_column_mean, pooled_regression, rubin_pool
from pyro_lvm.inference.amputation import ampute


def test_rubin_pool_hand_computed():
    r = rubin_pool([1.0, 2.0, 3.0, 6.0], [0.5, 0.7, 0.6, 0.6], level=0.9)
    q_bar, u_bar, b = 3.0, 0.6, np.var([1, 2, 3, 6], ddof=1)
    t = u_bar + 1.25 * b
    df = 3 * (1 + u_bar / (1.25 * b)) ** 2
    assert (r.estimate, r.within, r.between) == pytest.approx((q_bar, u_bar, b))
    assert r.total == pytest.approx(t) and r.df == pytest.approx(df)
    assert r.fraction_missing_information == pytest.approx(1.25 * b / t)
    half = scipy.stats.t.ppf(0.95, df) * math.sqrt(t)
    assert (r.ci_low, r.ci_high) == pytest.approx((q_bar - half, q_bar + half))
    # Barnard-Rubin degrees of freedom
    br = rubin_pool([1.0, 2.0, 3.0, 6.0], [0.5, 0.7, 0.6, 0.6], df_complete=20)
    gamma = 1.25 * b / t
    df_obs = 21 / 23 * 20 * (1 - gamma)
    assert br.df == pytest.approx(1 / (1 / df + 1 / df_obs)) and br.df < min(df, 20)


def test_rubin_pool_without_between_variance_is_the_complete_data_answer():
    r = rubin_pool([2.0] * 5, [0.04] * 5)
    assert r.between == 0 and r.total == pytest.approx(0.04) and math.isinf(r.df)
    assert r.ci_high - 2.0 == pytest.approx(1.959964 * 0.2, rel=1e-5)


def test_rubin_pool_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        rubin_pool([1.0], [1.0])
    with pytest.raises(ValueError, match="length"):
        rubin_pool([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="non-negative"):
        rubin_pool([1.0, 2.0], [1.0, -1.0])
    with pytest.raises(ValueError, match="draws"):
        pooled_column_mean(np.zeros((1, 5, 2)), 0)
    with pytest.raises(ValueError, match="predictors"):
        pooled_regression(np.zeros((3, 5, 2)), 0, [0])


def test_pooled_regression_recovers_ols_on_identical_data_sets():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 3))
    X[:, 0] = 1.0 + 2.0 * X[:, 1] - X[:, 2] + 0.1 * rng.normal(size=50)
    pooled = pooled_regression(np.stack([X, X, X]), 0, [1, 2])
    A = np.column_stack([np.ones(50), X[:, 1:]])
    beta, res, *_ = np.linalg.lstsq(A, X[:, 0], rcond=None)
    var = res[0] / 47 * np.diag(np.linalg.inv(A.T @ A))
    for j in range(3):
        assert pooled[j].estimate == pytest.approx(beta[j])
        assert pooled[j].total == pytest.approx(var[j]) and pooled[j].between < 1e-25


def _bayesian_regression_imputations(x, mask, M, rng):
    """Proper imputations of column 1 from column 0 (van Buuren 2018, algorithm 3.1):
    sigma^2 and beta drawn from their posterior given the complete cases, then the missing
    values from the regression."""
    seen = mask[:, 1]
    A = np.column_stack([np.ones(seen.sum()), x[seen, 0]])
    y = x[seen, 1]
    V = np.linalg.inv(A.T @ A)
    beta_hat = V @ A.T @ y
    rss = np.sum((y - A @ beta_hat) ** 2)
    out = np.repeat(x[None], M, axis=0)
    for j in range(M):
        sigma2 = rss / rng.chisquare(len(y) - 2)
        beta = rng.multivariate_normal(beta_hat, sigma2 * V)
        miss = ~seen
        out[j, miss, 1] = beta[0] + beta[1] * x[miss, 0] + np.sqrt(sigma2) * rng.normal(size=miss.sum())
    return out


def test_pooled_intervals_cover_the_population_mean_and_slope():
    """Rubin intervals from proper imputations under MAR (amputation) cover the population
    mean and regression slope at about the nominal 90%; complete-case intervals of the mean,
    biased by MAR, do not."""
    rng = np.random.default_rng(0)
    C = np.array([[1.0, 0.8], [0.8, 1.0]])
    true_mean, true_slope = 0.0, 0.8  # E[x1]; slope of x0 on x1 = C01 / C11
    reps, hits_mean, hits_slope, hits_cc = 300, 0, 0, 0
    for r in range(reps):
        x = rng.multivariate_normal([0.0, 0.0], C, size=60)
        mask = ampute(x, 0.25, "mar", seed=r, observed_fraction=0.5, strength=3.0)
        assert mask[:, 0].all() or mask[:, 1].all()
        if not mask[:, 0].all():  # the always-observed column is drawn at random
            x, mask = x[:, ::-1].copy(), mask[:, ::-1].copy()
        draws = _bayesian_regression_imputations(x, mask, 20, rng)
        pm = pooled_column_mean(draws, 1, level=0.9)
        hits_mean += pm.ci_low <= true_mean <= pm.ci_high
        slope = pooled_regression(draws, 0, [1], level=0.9)[1]
        hits_slope += slope.ci_low <= true_slope <= slope.ci_high
        seen = x[mask[:, 1], 1]
        half = scipy.stats.t.ppf(0.95, len(seen) - 1) * seen.std(ddof=1) / np.sqrt(len(seen))
        hits_cc += abs(seen.mean() - true_mean) <= half
    se = math.sqrt(0.09 / reps)
    assert abs(hits_mean / reps - 0.9) < 3 * se, hits_mean / reps
    assert abs(hits_slope / reps - 0.9) < 3 * se, hits_slope / reps
    assert hits_cc / reps < 0.75, hits_cc / reps
