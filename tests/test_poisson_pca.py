"""Poisson PCA: importance-sampled log-likelihood against quadrature (d = 1), recovery of the
loading subspace (d = 2), contract and data checks."""
import numpy as np
import pytest
import torch
from numpy.polynomial.hermite_e import hermegauss
from scipy import linalg, special, stats

from pyro_lvm.inference import check_contract, fit, log_likelihood
from pyro_lvm.models import PoissonPCA


def _set_truth(model, W, mu):
    with torch.no_grad():
        model.loadings.copy_(torch.as_tensor(W, dtype=model.loadings.dtype))
        model.offset.copy_(torch.as_tensor(mu, dtype=model.offset.dtype))


def _log_joint_1d(x, z, w, mu):
    """log N(z; 0, 1) + sum_j log Poisson(x_j; exp(w_j z + mu_j)) for a grid of z, float64."""
    eta = z[:, None] * w[None, :] + mu[None, :]
    log_lik = (x[None, :] * eta - np.exp(eta) - special.gammaln(x + 1)[None, :]).sum(-1)
    return log_lik - 0.5 * z ** 2 - 0.5 * np.log(2 * np.pi)


def quadrature_log_px(x, w, mu, nodes=80):
    """log p(x) = log int N(z;0,1) prod_j Poisson(x_j | e^{w_j z + mu_j}) dz by adaptive
    Gauss-Hermite quadrature: centred at the posterior mode m with the Laplace scale s,
    int f(z) dz = s int f(m + s t) e^{t^2/2} e^{-t^2/2} dt."""
    grid = np.linspace(-8, 8, 16001)
    lj = _log_joint_1d(x, grid, w, mu)
    m = grid[np.argmax(lj)]
    curvature = 1.0 + (w ** 2 * np.exp(w * m + mu)).sum()  # -d2/dz2 of the log joint
    s = 1.0 / np.sqrt(curvature)
    t, weights = hermegauss(nodes)
    z = m + s * t
    return special.logsumexp(_log_joint_1d(x, z, w, mu) + 0.5 * t ** 2 + np.log(weights)) \
        + np.log(s)


def test_quadrature_reference_against_a_dense_grid():
    """The quadrature oracle itself, against a trapezoid rule on a fine grid."""
    rng = np.random.default_rng(0)
    w, mu = rng.normal(0, 0.8, 5), rng.normal(1.0, 0.3, 5)
    x = rng.poisson(np.exp(mu + w * 0.7)).astype(float)
    grid = np.linspace(-12, 12, 200001)
    dense = special.logsumexp(_log_joint_1d(x, grid, w, mu)) + np.log(grid[1] - grid[0])
    assert abs(quadrature_log_px(x, w, mu) - dense) < 1e-8


def test_importance_sampled_log_likelihood_within_3_se_of_quadrature_d1():
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        p = 6
        rng = np.random.default_rng(1)
        W, mu = rng.normal(0, 0.7, (p, 1)), rng.normal(1.0, 0.5, p)
        model = PoissonPCA(p, 1, hidden=(32,))
        _set_truth(model, W, mu)
        x, _ = model.sample(300, return_latent=True)
        # a trained guide as the proposal; fit moves W and mu a little, so put the known
        # truth back before evaluating (the guide stays a good proposal for it)
        fit(model, x, epochs=60, batch_size=100, lr=1e-2, device="cpu", progress=False)
        _set_truth(model, W, mu)
        rows = x[:25]
        est = log_likelihood(model, rows, num_samples=2000, device="cpu", seed=3)
        exact = np.array([quadrature_log_px(r, W[:, 0], mu) for r in rows.numpy()])
        got, se = est.per_row["log_px"].to_numpy(), est.per_row["se"].to_numpy()
        assert est.discrete and est.bits_per_dim is not None
        assert (se > 0).all() and (se < 0.1).all()  # a trained guide: small, honest se
        z = (got - exact) / se
        # each row within 3 se would fail by chance with probability 1 - 0.9973^25 = 6.5%
        # even for a perfect estimator; a Bonferroni bound keeps the family-wise false alarm
        # rate at 1% (|z| < 3.48 for 25 rows), and most rows must be within 3 se
        assert (np.abs(z) < stats.norm.ppf(1 - 0.01 / (2 * len(z)))).all(), z
        assert (np.abs(z) < 3).mean() >= 0.9, z
        assert abs(est.mean - exact.mean()) < 3 * est.mc_se
        # positive control: a wrong offset moves the estimate far outside 3 se
        _set_truth(model, W, mu + 0.3)
        wrong = log_likelihood(model, rows, num_samples=2000, device="cpu", seed=3)
        assert (np.abs(wrong.per_row["log_px"].to_numpy() - exact) / se > 3).mean() > 0.5
    finally:
        torch.set_default_dtype(torch.float32)


def test_fitted_subspace_recovers_the_true_one_d2():
    """Principal angles between the fitted and true column spaces of W.

    Tolerance 0.15 rad (8.6 degrees). Why: with N = 2000 rows, rates around e^1.2 = 3.3
    and loadings of size ~0.6, the Fisher information of one loading is about N * rate * E[z^2]
    = 6600, so each entry of W has a sampling sd near 0.012 and a column (norm ~ 0.6 sqrt(8) =
    1.7) turns by about 0.012 / 1.7 = 0.007 rad; the variational (amortized Gaussian) fit adds
    a small bias and SGD noise. 0.15 rad leaves an order of magnitude for those, yet a random
    2-D subspace of R^8 is far outside it (checked below), as is the initial one.
    """
    torch.manual_seed(0)
    p, d = 8, 2
    rng = np.random.default_rng(2)
    W, mu = rng.normal(0, 0.6, (p, d)), rng.normal(1.2, 0.3, p)
    truth = PoissonPCA(p, d)
    _set_truth(truth, W, mu)
    x = truth.sample(2000)
    model = PoissonPCA(p, d, hidden=(32,)).init_from_data(x)
    initial = linalg.subspace_angles(model.subspace().numpy(), W)
    fit(model, x, epochs=40, batch_size=100, lr=1e-2, device="cpu", progress=False)
    angles = linalg.subspace_angles(model.subspace().numpy(), W)
    assert angles.max() < 0.15, angles
    assert initial.max() > 0.15  # the fit moved the subspace, it did not start there
    random_basis = np.linalg.qr(rng.normal(size=(p, d)))[0]
    assert linalg.subspace_angles(random_basis, W).max() > 0.15


def test_contract_and_data_checks():
    model = PoissonPCA(4, 1)
    x = torch.poisson(torch.full((10, 4), 2.0))
    report = check_contract(model, x)
    assert report.latent_sites == {"z": (1,)} and report.observed_sites == {"x": (4,)}
    with pytest.raises(ValueError, match=r"not non-negative integers.*row 3, column 2"):
        bad = x.clone()
        bad[3, 2] = 1.5
        model.check_data(bad)
    with pytest.raises(ValueError, match="latent_dim=4 must be smaller"):
        PoissonPCA(4, 4)
    assert model.sample(5).shape == (5, 4)
    assert model.reconstruct(x).shape == (10, 4)
