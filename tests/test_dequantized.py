"""Dequantized factor analysis: the importance-sampled log P(x) of integer rows against the exact
Gaussian probability of the cell x + [0, 1)^p (scipy's multivariate normal CDF)."""
import numpy as np
import pytest
import torch
from scipy import stats

from pyro_lvm.inference import log_likelihood
from pyro_lvm.models import FactorAnalysis
from pyro_lvm.models.dequantized import Dequantized


def _cell_log_prob(x, mean, cov):
    """log P(x <= X < x + 1) for X ~ N(mean, cov) in 2-D, by inclusion-exclusion of CDFs."""
    mvn = stats.multivariate_normal(mean, cov)
    hi, lo = x + 1.0, x
    p = (mvn.cdf(hi) - mvn.cdf([lo[0], hi[1]]) - mvn.cdf([hi[0], lo[1]]) + mvn.cdf(lo))
    return np.log(p)


def test_dequantized_fa_log_prob_matches_the_cell_probability():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    data = rng.multivariate_normal([3.0, 2.0], [[2.0, 1.2], [1.2, 1.5]], size=400)
    fa = FactorAnalysis(2, 1).double()
    fa.fit_em(torch.from_numpy(data), progress=False)
    model = Dequantized(fa)
    x = torch.from_numpy(np.floor(data[:12]))
    est = log_likelihood(model, x, num_samples=4000, device="cpu", seed=1)
    W, mu, psi = (t.detach().numpy() for t in fa._params())
    cov = W @ W.T + np.diag(psi)
    exact = np.array([_cell_log_prob(r, mu, cov) for r in x.numpy()])
    got, se = est.per_row["log_px"].to_numpy(), est.per_row["se"].to_numpy()
    z = (got - exact) / se
    # Bonferroni over 12 rows at a 1% family-wise level
    assert (np.abs(z) < stats.norm.ppf(1 - 0.01 / 24)).all(), z
    # positive control: the density at the integer point is a different number
    density = stats.multivariate_normal(mu, cov).logpdf(x.numpy())
    assert (np.abs(density - exact) / se > 5).mean() > 0.5
    # a probability: at most 1
    assert (got <= 1e-6).all()


def test_dequantized_refuses_fractional_data_and_masks():
    model = Dequantized(FactorAnalysis(3, 1))
    with pytest.raises(ValueError, match="integer-valued"):
        model.check_data(torch.tensor([[0.5, 1.0, 2.0], [1.0, 2.0, 3.0]]))
    with pytest.raises(ValueError, match="mask"):
        model.check_data(torch.ones(2, 3), mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="wraps FactorAnalysis"):
        Dequantized(torch.nn.Linear(2, 2))


def test_dequantized_takes_integer_arrays_as_they_are():
    rng = np.random.default_rng(2)
    data = rng.multivariate_normal([3.0, 2.0], [[2.0, 1.2], [1.2, 1.5]], size=200)
    fa = FactorAnalysis(2, 1).double()
    fa.fit_em(torch.from_numpy(data), progress=False)
    model = Dequantized(fa)
    ints = np.floor(data[:10]).astype(np.int64)
    a = log_likelihood(model, ints, num_samples=50, device="cpu", seed=3)
    b = log_likelihood(model, ints.astype(np.float64), num_samples=50, device="cpu", seed=3)
    assert a.mean == b.mean and a.per_row.equals(b.per_row)
