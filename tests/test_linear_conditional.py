"""Exact conditional of the missing entries for FA and PPCA against the Schur complement."""
import numpy as np
import pytest
import scipy.stats
import torch

from pyro_lvm.models import PPCA, FactorAnalysis


def _random_model(cls, p=7, d=3, seed=0):
    torch.manual_seed(seed)
    m = cls(p, d).double()
    noise = torch.rand(p if cls is FactorAnalysis else (), dtype=torch.float64) + 0.3
    m._assign(loading=torch.randn(p, d, dtype=torch.float64),
              mean=torch.randn(p, dtype=torch.float64), noise_variance=noise)
    return m


def _mask(n, p, seed=1):
    rng = np.random.default_rng(seed)
    mask = rng.random((n, p)) > 0.45
    mask[np.arange(n), rng.integers(0, p, n)] = True  # at least one observed entry per row
    return mask


def _schur(C, mu, x, observed):
    o, m = observed, ~observed
    gain = C[np.ix_(m, o)] @ np.linalg.inv(C[np.ix_(o, o)])
    mean = mu[m] + gain @ (x[o] - mu[o])
    cov = C[np.ix_(m, m)] - gain @ C[np.ix_(o, m)]
    return mean, cov


@pytest.mark.parametrize("cls", [PPCA, FactorAnalysis])
def test_conditional_equals_schur_complement(cls):
    m = _random_model(cls)
    x = m.sample(40).numpy()
    mask = _mask(*x.shape)
    x_nan = np.where(mask, x, np.nan)  # missing entries may be NaN
    cond = m.conditional(x_nan, mask)
    C, mu = m.covariance().numpy(), m.mean.detach().numpy()
    for i in range(x.shape[0]):
        mean, cov = _schur(C, mu, x[i], mask[i])
        miss = ~mask[i]
        np.testing.assert_allclose(cond.mean[i, miss].numpy(), mean, rtol=0, atol=1e-8)
        np.testing.assert_allclose(cond.covariance[i][np.ix_(miss, miss)].numpy(), cov,
                                   rtol=0, atol=1e-8)
        np.testing.assert_allclose(cond.variance[i, miss].numpy(), np.diag(cov), atol=1e-8)
        # observed entries: the data, no variance
        np.testing.assert_array_equal(cond.mean[i, mask[i]].numpy(), x[i, mask[i]])
        assert np.all(cond.covariance[i][mask[i]].numpy() == 0)
        assert np.all(cond.variance[i, mask[i]].numpy() == 0)
    # the exact conditional density equals log p(x) - log p(x_o)
    full = m.log_marginal(x).detach().numpy()
    obs = m.log_marginal(x_nan, mask=mask).detach().numpy()
    for i in range(5):
        mean, cov = _schur(C, mu, x[i], mask[i])
        if (~mask[i]).any():
            lp = scipy.stats.multivariate_normal(mean, cov).logpdf(x[i, ~mask[i]])
            assert abs((full[i] - obs[i]) - lp) < 1e-8


def test_conditional_draws_have_the_conditional_moments():
    m = _random_model(FactorAnalysis, p=5, d=2, seed=3)
    x = m.sample(2).numpy()
    mask = np.array([[True, False, True, False, False], [False, True, True, True, False]])
    cond = m.conditional(x, mask)
    draws = cond.sample(20000, seed=0).numpy()
    assert draws.shape == (20000, 2, 5)
    np.testing.assert_array_equal(draws[:, mask], np.broadcast_to(x[mask], (20000, mask.sum())))
    for i in range(2):
        miss = ~mask[i]
        d = draws[:, i, miss]
        cov = cond.covariance[i][np.ix_(miss, miss)].numpy()
        se = np.sqrt(np.diag(cov) / d.shape[0])
        assert np.all(np.abs(d.mean(0) - cond.mean[i, miss].numpy()) < 4 * se)
        np.testing.assert_allclose(np.cov(d.T), cov, atol=0.05 * np.abs(cov).max())
    # same seed, same draws; another seed, other draws
    np.testing.assert_array_equal(cond.sample(3, seed=5).numpy(), cond.sample(3, seed=5).numpy())
    assert not np.array_equal(cond.sample(3, seed=5).numpy(), cond.sample(3, seed=6).numpy())


def test_conditional_without_covariance_and_bad_input():
    m = _random_model(PPCA)
    x = m.sample(4).numpy()
    mask = _mask(4, 7)
    assert m.conditional(x, mask, covariance=False).covariance is None
    with pytest.raises(ValueError, match="mask"):
        m.conditional(x, None)
    with pytest.raises(ValueError, match="shape"):
        m.conditional(x, mask[:, :3])
    empty = mask.copy()
    empty[2] = False
    with pytest.raises(ValueError, match="row 2"):
        m.conditional(x, empty)
