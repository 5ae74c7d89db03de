"""impute / conditional_log_likelihood / scoring against the exact PPCA conditionals."""
import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_lvm.inference import (conditional_log_likelihood, imputation_error, impute,
                                interval_coverage, missing_mask)
from pyro_lvm.models import DLVM, PPCA


def _ppca(p=6, d=2, seed=0):
    torch.manual_seed(seed)
    m = PPCA(p, d).double()
    m._assign(loading=torch.randn(p, d, dtype=torch.float64),
              mean=torch.randn(p, dtype=torch.float64),
              noise_variance=torch.tensor(0.3, dtype=torch.float64))
    m.set_guide_to_posterior()
    return m


def _mask(n, p, rate=0.4, seed=0):
    rng = np.random.default_rng(seed)
    mask = rng.random((n, p)) > rate
    mask[np.arange(n), rng.integers(0, p, n)] = True
    return mask


def _exact_posterior_guide(m, inflate=1.0, shift=0.0):
    """Guide = the exact posterior given each row's observed entries (optionally widened and
    shifted, which makes the importance weights non-uniform)."""
    def guide(x, mask=None):
        post = m.posterior(x, mask)
        loc = post.loc + shift * post.scale_tril[..., 0]
        with pyro.plate("data", x.shape[0], dim=-1):
            return pyro.sample("z", dist.MultivariateNormal(loc, scale_tril=inflate * post.scale_tril))
    return guide


def test_impute_mean_matches_exact_conditional_within_3_se():
    m = _ppca()
    x = m.sample(12).numpy()
    mask = _mask(*x.shape)
    res = impute((m.model, _exact_posterior_guide(m)), np.where(mask, x, np.nan), mask,
                 num_samples=2000, seed=0)
    exact = m.conditional(x, mask).mean.numpy()
    miss = ~mask
    assert miss.sum() >= 20
    z = (res.imputed - exact)[miss] / res.se[miss]
    assert np.all(np.abs(z) < 3), z
    # positive control: the unconditional mean is many standard errors away
    z_wrong = (res.imputed - m.mean.detach().numpy())[miss] / res.se[miss]
    assert np.mean(np.abs(z_wrong) > 3) > 0.8
    # observed entries returned unchanged, se 0 there
    np.testing.assert_array_equal(res.imputed[mask], x[mask])
    assert np.all(res.se[mask] == 0) and np.all(res.se[miss] > 0)


@pytest.mark.parametrize("inflate,shift", [(1.0, 0.0), (1.5, 0.3)])
def test_impute_mean_standard_errors_are_calibrated(inflate, shift):
    """z-scores against the exact conditional mean are ~N(0, 1), also with non-uniform weights
    (a widened, shifted guide) and the particles streamed in chunks."""
    m = _ppca(seed=1)
    x = m.sample(120).numpy()
    mask = _mask(*x.shape, seed=1)
    res = impute((m.model, _exact_posterior_guide(m, inflate, shift)), x, mask,
                 num_samples=1000, chunk_size=300, seed=2)
    assert res.particles_per_chunk == 300
    z = ((res.imputed - m.conditional(x, mask).mean.numpy()) / np.where(mask, 1, res.se))[~mask]
    assert abs(z.mean()) < 0.2 and 0.85 < z.std() < 1.15
    assert np.mean(np.abs(z) < 3) > 0.98
    if inflate != 1.0:
        assert np.median(res.ess) < 1000  # the weights really are non-uniform


def test_multiple_imputation_intervals_cover_90_percent():
    m = _ppca(seed=2)
    x = m.sample(500).numpy()
    mask = _mask(*x.shape, seed=2)
    res = impute((m.model, _exact_posterior_guide(m, 1.3, 0.2)), x, mask, num_samples=1000,
                 method="multiple", num_imputations=100, chunk_size=250, seed=3)
    assert res.draws.shape == (100, 500, 6)
    np.testing.assert_array_equal(res.draws[:, mask], np.broadcast_to(x[mask], (100, mask.sum())))
    cov = interval_coverage(res.draws, x, mask, level=0.9)
    assert cov["num_missing"] >= 1000
    assert abs(cov["coverage"] - 0.9) < 0.03, cov
    # positive control: draws from the marginal p(x_m) (ignoring x_o) are too wide
    marginal = m.sample(100 * 500).numpy().reshape(100, 500, 6)
    wide = interval_coverage(np.where(mask, x, marginal), x, mask, level=0.9)
    assert wide["mean_width"] > 1.3 * cov["mean_width"]
    # the exact conditional draws give the same coverage
    exact = interval_coverage(m.conditional(x, mask).sample(100, seed=0), x, mask, level=0.9)
    assert abs(exact["coverage"] - 0.9) < 0.03


def test_conditional_log_likelihood_matches_exact_density():
    m = _ppca(seed=3)
    x = m.sample(60).numpy()
    mask = _mask(*x.shape, seed=3)
    exact = (m.log_marginal(x) - m.log_marginal(x, mask=mask)).detach().numpy()
    for guide in (_exact_posterior_guide(m), _exact_posterior_guide(m, 1.5, 0.3)):
        res = conditional_log_likelihood((m.model, guide), x, mask, num_samples=2000, seed=1)
        pr = res.per_row
        has = pr["num_missing"].to_numpy() > 0
        z = (pr["log_p_missing"].to_numpy() - exact)[has] / pr["se"].to_numpy()[has]
        assert np.all(np.abs(z) < 3.5), z
        assert abs(np.mean(z)) < 0.5
        total = pr["log_p_missing"].sum()
        assert abs(total - exact.sum()) < 3 * np.sqrt((pr["se"] ** 2).sum())
        np.testing.assert_allclose(pr["log_p_missing"].to_numpy()[~has], 0.0, atol=1e-12)
    # the pair's own log_marginal gives the exact column
    own = conditional_log_likelihood(m, x, mask, num_samples=10)
    np.testing.assert_allclose(own.per_row["exact"].to_numpy(), exact, atol=1e-10)


def test_conditional_log_likelihood_standard_error_matches_spread_over_seeds():
    """The delta-method se (with the covariance of the two sums) predicts the spread of the
    estimate across seeds; ignoring the covariance (independent sums) overstates it."""
    m = _ppca(seed=4)
    x = m.sample(4).numpy()
    mask = np.array([[True, False, False, True, True, False]] * 4)
    guide = _exact_posterior_guide(m, 1.6, 0.5)
    runs = [conditional_log_likelihood((m.model, guide), x, mask, num_samples=200, seed=s)
            for s in range(60)]
    est = np.array([r.per_row["log_p_missing"].to_numpy() for r in runs])
    se = np.array([r.per_row["se"].to_numpy() for r in runs])
    ratio = est.std(0, ddof=1) / se.mean(0)
    assert np.all((ratio > 0.7) & (ratio < 1.35)), ratio
    # positive control: treating log(mean a) and log(mean w) as independent estimates
    from pyro_lvm.inference.importance_weights import trace_log_terms

    xt, mt = torch.as_tensor(x), torch.as_tensor(mask)
    with torch.no_grad():
        terms = trace_log_terms(m.model, guide, xt, 200, mt)
    lw = terms.log_weights.detach()
    base = terms.model_trace.nodes["x"]["fn"].base_dist.base_dist
    la = lw + torch.where(mt, 0.0, base.log_prob(xt)).sum(-1)
    w, a = torch.exp(lw - lw.max(0).values), torch.exp(la - la.max(0).values)
    rel_var = lambda v: v.var(0) / (v.shape[0] * v.mean(0) ** 2)  # noqa: E731
    se_independent = (rel_var(w) + rel_var(a)).sqrt().numpy()
    spread_over_independent = est.std(0, ddof=1) / se_independent
    assert np.mean(spread_over_independent) < 0.8 and np.all(spread_over_independent < 1)


def test_output_types_follow_the_input():
    m = _ppca()
    x = m.sample(5)
    mask = torch.as_tensor(_mask(5, 6))
    x_nan = torch.where(mask, x, torch.tensor(float("nan"), dtype=x.dtype))
    t = impute(m, x_nan, mask, num_samples=20)
    assert isinstance(t.imputed, torch.Tensor) and t.imputed.dtype == torch.float64
    assert torch.equal(t.imputed[mask], x[mask]) and not torch.isnan(t.imputed).any()
    a = impute(m, x_nan.numpy().astype(np.float32), mask.numpy(), num_samples=20)
    assert isinstance(a.imputed, np.ndarray) and a.imputed.dtype == np.float32
    df = pd.DataFrame(x_nan.numpy(), columns=list("abcdef"), index=range(10, 15))
    d = impute(m, df, allow_missing=True, num_samples=20)
    assert isinstance(d.imputed, pd.DataFrame) and list(d.imputed.columns) == list("abcdef")
    assert list(d.imputed.index) == list(range(10, 15)) and not d.imputed.isna().any().any()
    # the same seed gives the same numbers
    np.testing.assert_array_equal(impute(m, df, allow_missing=True, num_samples=20).se, d.se)


def test_bad_input_is_refused_before_any_work(monkeypatch):
    import sys

    imp = sys.modules["pyro_lvm.inference.impute"]  # the package attribute is the function

    def fail(*a, **k):
        raise AssertionError("work started")

    monkeypatch.setattr(imp, "session", fail)
    m = _ppca()
    x = m.sample(6).numpy()
    mask = _mask(6, 6)
    with pytest.raises(ValueError, match=r"mask for x has shape \(6, 5\)"):
        impute(m, x, mask[:, :5])
    with pytest.raises(ValueError, match="boolean"):
        impute(m, x, mask * 0.5)
    with pytest.raises(ValueError, match="boolean"):
        impute(m, x, "all")
    with pytest.raises(ValueError, match="boolean"):
        impute(m, x, np.array(mask, dtype=object))
    empty = mask.copy()
    empty[3] = False
    with pytest.raises(ValueError, match="row 3"):
        impute(m, x, empty)
    x_nan = x.copy()
    x_nan[2, 4] = np.nan
    with pytest.raises(ValueError, match="row 2, column 4"):
        impute(m, x_nan)  # NaN, no mask, allow_missing=False
    with pytest.raises(ValueError, match="nothing marks missing"):
        impute(m, x)
    all_nan = x.copy()
    all_nan[1] = np.nan
    with pytest.raises(ValueError, match="row 1"):
        impute(m, all_nan, allow_missing=True)

    def model(x):
        return m.model(x)

    def guide(x):
        return m.guide(x)

    with pytest.raises(ValueError, match="takes no mask argument"):
        impute((model, guide), x, mask)
    with pytest.raises(ValueError, match="method"):
        impute(m, x, mask, method="median")
    with pytest.raises(ValueError, match="num_imputations"):
        impute(m, x, mask, method="multiple", num_imputations=0)
    with pytest.raises(ValueError, match="true value"):
        conditional_log_likelihood(m, np.where(mask, x, np.nan), mask)


def test_nan_outside_the_mask_is_refused():
    m = _ppca()
    x = m.sample(6).numpy()
    mask = _mask(6, 6)
    x[mask.nonzero()[0][0], mask.nonzero()[1][0]] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        impute(m, x, mask)
    # with allow_missing, a NaN at an entry the mask calls observed is missing too
    res = impute(m, x, mask, allow_missing=True, num_samples=10)
    assert not np.isnan(res.imputed).any()


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "studentt"])
def test_impute_with_every_dlvm_likelihood(likelihood):
    torch.manual_seed(0)
    m = DLVM(8, 2, likelihood=likelihood, hidden=(16,))
    rng = np.random.default_rng(0)
    x = (rng.random((10, 8)) > 0.5).astype(np.float32) if likelihood == "bernoulli" \
        else rng.normal(size=(10, 8)).astype(np.float32)
    mask = _mask(10, 8)
    res = impute(m, x, mask, num_samples=50, method="multiple", num_imputations=3)
    assert res.imputed.shape == x.shape and np.isfinite(res.imputed).all()
    assert res.draws.shape == (3, 10, 8) and np.isfinite(res.draws).all()
    if likelihood == "bernoulli":
        assert set(np.unique(res.draws)) <= {0.0, 1.0}
        assert ((res.imputed >= 0) & (res.imputed <= 1)).all()
    cll = conditional_log_likelihood(m, x, mask, num_samples=50)
    assert np.isfinite(cll.per_row["log_p_missing"]).all()


def test_scoring_helpers():
    truth = np.array([[1.0, 2.0], [3.0, 4.0]])
    mask = np.array([[True, False], [False, True]])
    est = np.array([[1.0, 2.5], [2.0, 4.0]])
    err = imputation_error(truth, est, mask)
    assert err["num_missing"] == 2
    assert err["rmse"] == pytest.approx(np.sqrt((0.25 + 1.0) / 2))
    assert err["mae"] == pytest.approx(0.75) and "accuracy" not in err
    b = imputation_error(np.array([[1, 0, 1.0]]), np.array([[0.2, 0.4, 0.9]]),
                         np.array([[False, False, True]]))
    assert b["accuracy"] == 0.5
    draws = np.stack([np.full((2, 2), v) for v in range(1, 11)]).astype(float)
    c = interval_coverage(draws, truth, mask, level=0.5)
    # order-statistic positions q (M + 1): [2.75, 8.25] holds 3 (row 1) but not 2 (row 0)
    assert c["num_missing"] == 2 and c["coverage"] == 0.5
    assert c["mean_width"] == pytest.approx(5.5)


def test_conditional_log_likelihood_of_a_subset_of_the_missing_entries():
    """``scored`` limits the scored entries (others unknown, e.g. missing in the file)."""
    m = _ppca(seed=5)
    x = m.sample(30).numpy()
    mask = _mask(*x.shape, seed=5)
    rng = np.random.default_rng(1)
    scored = ~mask & (rng.random(x.shape) < 0.5)
    x_unknown = np.where(mask | scored, x, np.nan)
    res = conditional_log_likelihood((m.model, _exact_posterior_guide(m)), x_unknown, mask,
                                     scored=scored, num_samples=2000)
    exact = (m.log_marginal(x, mask=mask | scored) - m.log_marginal(x, mask=mask)).detach().numpy()
    pr = res.per_row
    assert (pr["num_missing"].to_numpy() == scored.sum(1)).all()
    z = (pr["log_p_missing"].to_numpy() - exact)[scored.any(1)] / pr["se"].to_numpy()[scored.any(1)]
    assert np.all(np.abs(z) < 3.5)
    with pytest.raises(ValueError, match="cannot also be scored"):
        conditional_log_likelihood(m, x, mask, scored=scored | mask)
    with pytest.raises(ValueError, match="true value"):
        conditional_log_likelihood(m, np.where(scored, np.nan, x), mask, scored=scored)
