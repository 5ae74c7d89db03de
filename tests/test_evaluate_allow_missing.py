"""log_likelihood / elbo / evaluate with allow_missing=True: NaN entries are missing and the
estimates are of log p(x_obs), checked against the closed-form Gaussian marginal of PPCA."""
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import scipy.stats
import torch

from pyro_lvm.inference import ampute, elbo, evaluate, log_likelihood
from pyro_lvm.models import PPCA


def _ppca_data(n=200, p=6, q=2, rate=0.3, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(p, q))
    x = rng.normal(size=(n, q)) @ w.T + rng.normal(size=p) + 0.5 * rng.normal(size=(n, p))
    mask = ampute(x, rate, "mcar", seed=seed)
    mask[~mask.any(1), 0] = True
    torch.manual_seed(seed)
    model = PPCA(p, q).double().fit_closed_form(x)  # guide: exact posterior of complete rows
    return model, x, mask


def _wide_posterior_guide(model, widen=1.5):
    """The exact posterior given each row's observed entries, its scale widened: a proposal
    with bounded weights, so that the IS estimate and its standard error are trustworthy."""
    def guide(x, mask=None):
        post = model.posterior(x, mask)
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", dist.MultivariateNormal(post.loc, scale_tril=widen * post.scale_tril))
    return guide


def _exact_observed_log_lik(model, x, mask, noise_scale=1.0):
    """log N(x_o; mu_o, W_o W_o^T + sigma^2 I) per row, by scipy (independent of the model's
    own log_marginal)."""
    with torch.no_grad():
        w, mu, psi = (t.numpy() for t in model._params())
    cov = w @ w.T + np.diag(psi) * noise_scale
    return np.array([scipy.stats.multivariate_normal(mu[o], cov[np.ix_(o, o)]).logpdf(row[o])
                     for row, o in zip(x, mask)])


def test_log_likelihood_of_observed_entries_matches_the_ppca_marginal():
    model, x, mask = _ppca_data()
    x_nan = np.where(mask, x, np.nan)
    guide = _wide_posterior_guide(model)
    est = log_likelihood(model, x_nan, num_samples=500, allow_missing=True, seed=0,
                         progress=False, guide=guide)
    exact = _exact_observed_log_lik(model, x, mask)
    assert est.exact_mean == pytest.approx(exact.mean(), abs=1e-8)  # the mask reached log_marginal
    assert 0 < est.mc_se < 0.05
    assert abs(est.mean - exact.mean()) < 3 * est.mc_se, (est.mean, exact.mean(), est.mc_se)
    # per row too: the IS estimate within 3 of its standard errors (a few rows may fall outside)
    z = (est.per_row["log_px"].to_numpy() - exact) / est.per_row["se"].to_numpy()
    assert np.mean(np.abs(z) < 3) > 0.95
    # positive control: a slightly wrong noise variance is detected
    wrong = _exact_observed_log_lik(model, x, mask, noise_scale=1.1)
    assert abs(est.mean - wrong.mean()) > 3 * est.mc_se
    # the same numbers as passing the mask with arbitrary values at the missing entries
    junk = np.where(mask, x, 1e6)
    same = log_likelihood(model, junk, mask=mask, num_samples=500, seed=0, progress=False,
                          guide=guide)
    np.testing.assert_array_equal(same.per_row["log_px"], est.per_row["log_px"])


def test_evaluate_and_elbo_take_nan_as_missing():
    model, x, mask = _ppca_data(n=60)
    x_nan = torch.as_tensor(np.where(mask, x, np.nan))
    guide = _wide_posterior_guide(model)
    out = evaluate(model, x_nan, num_samples=200, allow_missing=True, seed=1, progress=False,
                   guide=guide)
    exact = _exact_observed_log_lik(model, x, mask).mean()
    assert out["log_px_exact"] == pytest.approx(exact, abs=1e-8)
    assert abs(out["log_px_is"] - exact) < 3 * out["log_px_is_mc_se"]
    assert out["elbo"] <= out["log_px_is"] and np.isfinite(out["recon_mse"])
    bound = elbo(model, x_nan, num_samples=200, allow_missing=True, seed=1, progress=False,
                 guide=guide)
    assert bound.mean == pytest.approx(out["elbo"], rel=1e-12)
    # mask= and NaN combine: also hiding column 0 changes the estimate
    fewer = mask.copy()
    fewer[:, 0] = False
    fewer[~fewer.any(1), 1] = True
    narrower = evaluate(model, x_nan, mask=fewer, num_samples=200, allow_missing=True, seed=1,
                        progress=False, guide=guide)
    assert narrower["log_px_exact"] == pytest.approx(
        _exact_observed_log_lik(model, x, fewer & mask).mean(), abs=1e-8)


def test_missing_data_errors_come_before_any_work(monkeypatch):
    from pyro_lvm.inference import engine

    model, x, mask = _ppca_data(n=20)
    x_nan = np.where(mask, x, np.nan)
    r, c = np.argwhere(~mask)[0]

    def no_work(*args, **kwargs):
        raise AssertionError("the estimate started")

    monkeypatch.setattr(engine, "stream_log_weights", no_work)
    for fn in (log_likelihood, evaluate, elbo):
        with pytest.raises(ValueError, match=rf"row {r}, column {c}"):
            fn(model, x_nan, num_samples=10)  # NaN without allow_missing
        empty = x_nan.copy()
        empty[7] = np.nan
        with pytest.raises(ValueError, match="row 7"):
            fn(model, empty, num_samples=10, allow_missing=True)

        def model_fn(x):
            return model.model(x)

        def guide_fn(x):
            return model.guide(x)

        with pytest.raises(ValueError, match="takes no mask argument"):
            fn((model_fn, guide_fn), x_nan, num_samples=10, allow_missing=True)
    with pytest.raises(AssertionError, match="the estimate started"):  # the patch is reached
        log_likelihood(model, x_nan, num_samples=10, allow_missing=True)
