"""Tests of inference.diagnostics: PSIS k-hat, latent usage, predictive checks, amortization
gap and the ArviZ export, on PPCA (exact posterior known), a DLVM and hand-written pairs."""
import json
import math

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyro_lvm.inference import diagnostics as D
from pyro_lvm.models.dlvm import DLVM
from pyro_lvm.models.linear import PPCA


def _linear_gaussian_data(n, p, q, seed, noise=0.5, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(p, q, generator=g, dtype=dtype)
    z = torch.randn(n, q, generator=g, dtype=dtype)
    return z @ W.T + noise * torch.randn(n, p, generator=g, dtype=dtype) + 1.0


@pytest.fixture(scope="module")
def ppca_data():
    return _linear_gaussian_data(200, 6, 3, seed=1)


@pytest.fixture
def ppca(ppca_data):
    """PPCA at its maximum-likelihood fit; its guide is the exact posterior (float32)."""
    return PPCA(6, 3).fit_closed_form(ppca_data)


def _train_dlvm(X, latent_dim, steps, seed):
    """Brief training of a Gaussian DLVM by the reparameterized ELBO with analytic KL
    (a plain torch loop: fast, and independent of inference.fit)."""
    torch.manual_seed(seed)
    model = DLVM(X.shape[1], latent_dim, likelihood="gaussian", hidden=(32,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loc, scale = model.encode(X)
        z = loc + scale * torch.randn_like(loc)
        log_lik = model.likelihood.distribution(model.decoder(z)).log_prob(X).sum(-1)
        kl = 0.5 * (loc ** 2 + scale ** 2 - 1 - 2 * scale.log()).sum(-1)
        loss = (kl - log_lik).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model


@pytest.fixture(scope="module")
def trained_dlvm():
    """8 latent dims for data on a 2-D linear manifold plus noise: more than needed."""
    X = _linear_gaussian_data(300, 6, 2, seed=2, noise=0.3, dtype=torch.float32)
    X = (X - X.mean(0)) / X.std(0)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _train_dlvm(X, latent_dim=8, steps=1000, seed=0)
    finally:
        torch.set_num_threads(previous)
    return model, X


def _standard_normal_kl(loc, scale):
    """Closed-form KL(N(loc, diag scale^2) || N(0, I)) per row (written out, not via torch)."""
    return 0.5 * (loc ** 2 + scale ** 2 - 1.0 - 2.0 * torch.log(scale)).sum(-1)


# ------------------------------------------------------------------------------------------
# hand-written user pairs (not our models): two latent sites, other site names
# ------------------------------------------------------------------------------------------
class UserPair(nn.Module):
    """x ~ N(a B + b c, 0.7^2 I) with a ~ N(0, I_2) (site "a") and b ~ N(0, 1) (scalar site
    "b"); observed site "obs"; a linear encoder as guide."""

    def __init__(self, data_dim=5):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.register_buffer("B", torch.randn(2, data_dim, generator=g))
        self.register_buffer("c", torch.randn(data_dim, generator=g))
        self.enc = nn.Linear(data_dim, 6)

    def model(self, x, mask=None):
        with pyro.plate("data", x.shape[0], dim=-1):
            a = pyro.sample("a", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            b = pyro.sample("b", dist.Normal(0.0, 1.0))
            loc = a @ self.B + b.unsqueeze(-1) * self.c
            pyro.sample("obs", dist.Normal(loc, 0.7).to_event(1), obs=x)

    def guide_params(self, x):
        out = self.enc(x)
        return (out[:, :2], nn.functional.softplus(out[:, 2:4]) + 1e-3,
                out[:, 4], nn.functional.softplus(out[:, 5]) + 1e-3)

    def guide(self, x, mask=None):
        pyro.module("user_encoder", self.enc)
        loc_a, scale_a, loc_b, scale_b = self.guide_params(x)
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("a", dist.Normal(loc_a, scale_a).to_event(1))
            pyro.sample("b", dist.Normal(loc_b, scale_b))


@pytest.fixture
def user_pair():
    pair = UserPair()
    g = torch.Generator().manual_seed(4)
    a = torch.randn(150, 2, generator=g)
    b = torch.randn(150, generator=g)
    X = a @ pair.B + b.unsqueeze(-1) * pair.c + 0.7 * torch.randn(150, 5, generator=g)
    return pair, X


# ------------------------------------------------------------------------------------------
# importance diagnostics
# ------------------------------------------------------------------------------------------
def test_khat_exact_posterior_is_good_for_every_row(ppca, ppca_data):
    result = D.importance_diagnostics(ppca, ppca_data[:60], num_samples=500, progress=False)
    table = result.per_row
    assert len(table) == 60 and result.num_samples == 500
    # w = p(x, z) / p(z | x) = p(x) for every draw: constant weights, full ESS.
    assert (table["khat"] < D.KHAT_GOOD).all()
    assert result.fraction_good == 1.0
    assert table["constant_weights"].all()
    np.testing.assert_allclose(table["ess_fraction"], 1.0, rtol=1e-6)
    exact = ppca.log_marginal(ppca_data[:60]).detach().numpy()
    np.testing.assert_allclose(table["log_px_estimate"], exact, rtol=1e-5, atol=1e-4)


def test_khat_overdispersed_guide_is_good_for_every_row(ppca, ppca_data):
    # Wider than the posterior: the weights are bounded, the generalized Pareto fit must say so.
    with torch.no_grad():
        ppca.guide_scale_tril = ppca.guide_scale_tril * 1.25
    result = D.importance_diagnostics(ppca, ppca_data[:60], num_samples=1000, progress=False)
    assert not result.per_row["constant_weights"].any()
    assert (result.per_row["khat"] < D.KHAT_GOOD).all()
    assert ((result.per_row["ess_fraction"] > 0.2) & (result.per_row["ess_fraction"] < 1)).all()
    # the importance-sampled log p(x) is an estimate with a standard error that covers the truth
    exact = ppca.log_marginal(ppca_data[:60]).detach().numpy()
    z = (result.per_row["log_px_estimate"] - exact) / result.per_row["log_px_se"]
    assert (np.abs(z) < 4.5).all()


def test_khat_too_narrow_guide_is_bad_for_most_rows(ppca, ppca_data):
    with torch.no_grad():
        ppca.guide_scale_tril = ppca.guide_scale_tril * 0.2
    result = D.importance_diagnostics(ppca, ppca_data[:60], num_samples=1000, progress=False)
    assert result.fraction_bad > 0.5
    assert result.khat_median > D.KHAT_OK
    assert result.per_row["ess_fraction"].median() < 0.2
    fractions = result.fraction_good + result.fraction_ok + result.fraction_bad
    assert fractions + result.fraction_undetermined == pytest.approx(1.0)
    assert "bad (k > 0.7)" in result.summary()


@pytest.mark.parametrize("draws", [25, 100, 1000])
def test_importance_diagnostics_flag_rows_by_the_k_aware_threshold(ppca, ppca_data, draws):
    from pyro_lvm.inference import khat_threshold

    with torch.no_grad():
        ppca.guide_scale_tril = ppca.guide_scale_tril * 0.6
    result = D.importance_diagnostics(ppca, ppca_data[:60], num_samples=draws, progress=False)
    table = result.per_row
    threshold = khat_threshold(draws)
    assert result.threshold == threshold
    k = table["khat"].to_numpy()
    np.testing.assert_array_equal(table["unreliable"], np.isfinite(k) & (k > threshold))
    assert (table.loc[table["category"] == "good", "khat"] <= threshold).all()
    assert (table.loc[table["category"] == "ok", "khat"] > threshold).all()
    # positive control: some rows lie on each side of the threshold
    assert 0 < result.fraction_unreliable < 1
    assert result.to_dict()["khat_fraction_unreliable"] == result.fraction_unreliable
    assert f"k <= {threshold:.2f}" in result.summary()


def test_weight_summaries_psis_estimate_equals_arviz():
    """The PSIS-smoothed log p(x) per row: log of the mean of ArviZ's unnormalized smoothed
    weights, on the same log weights."""
    from pyro_lvm.inference.diagnostics import importance

    rng = np.random.default_rng(3)
    z = rng.normal(size=(8, 400))
    log_w = (-0.5 * (z / 3.0) ** 2 - math.log(3.0)) - (-0.5 * z**2) - 20.0  # q too narrow
    log_w[0] = -5.0  # constant weights: the exact guide, no smoothing
    summary = importance._weight_summaries(log_w.copy(), np.finfo(np.float64).eps, 0)
    smoothed, _ = az.psislw(log_w[1:].copy(), normalize=False)
    top = smoothed.max(axis=1, keepdims=True)
    expected = np.log(np.exp(smoothed - top).mean(axis=1)) + top[:, 0]
    np.testing.assert_allclose(summary["log_px_psis"][1:], expected, atol=1e-10)
    assert summary["log_px_psis"][0] == pytest.approx(-5.0)
    assert np.all(np.abs(summary["log_px_psis"][1:] - summary["log_px"][1:]) > 1e-8)


def test_importance_diagnostics_seed_and_rng(ppca, ppca_data):
    with torch.no_grad():
        ppca.guide_scale_tril = ppca.guide_scale_tril * 0.8
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = D.importance_diagnostics(ppca, ppca_data[:10], 100, seed=5, progress=False)
    assert torch.equal(torch.get_rng_state(), state), "the global RNG state must be restored"
    again = D.importance_diagnostics(ppca, ppca_data[:10], 100, seed=5, progress=False,
                                     batch_size=10)
    other = D.importance_diagnostics(ppca, ppca_data[:10], 100, seed=6, progress=False)
    np.testing.assert_array_equal(first.per_row["khat"], again.per_row["khat"])
    assert not np.array_equal(first.per_row["khat"], other.per_row["khat"])


def test_importance_diagnostics_user_pair(user_pair):
    pair, X = user_pair
    result = D.importance_diagnostics(pair, X, num_samples=200, progress=False, batch_size=64)
    assert list(result.per_row["row"]) == list(range(len(X)))
    assert np.isfinite(result.per_row["khat"]).all()
    assert set(result.per_row["category"]) <= {"good", "ok", "bad"}
    assert ((result.per_row["ess"] >= 1 - 1e-9) & (result.per_row["ess"] <= 200 + 1e-6)).all()
    # a (model, guide) tuple of plain functions works too and gives the same numbers
    again = D.importance_diagnostics((pair.model, pair.guide), X, num_samples=200,
                                     progress=False, batch_size=64)
    np.testing.assert_allclose(again.per_row["khat"], result.per_row["khat"])


def _param_model(x, mask=None):
    with pyro.plate("data", x.shape[0], dim=-1):
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)


def _param_guide(x, mask=None):
    # exact posterior N(x / 2, 1/2) when weight = 0.5 and scale = sqrt(0.5)
    weight = pyro.param("weight", torch.tensor(0.0))
    scale = pyro.param("scale", torch.tensor(1.0), constraint=dist.constraints.positive)
    with pyro.plate("data", x.shape[0], dim=-1):
        pyro.sample("z", dist.Normal(weight * x, scale).to_event(1))


def test_plain_function_pair_uses_the_param_store_without_changing_it():
    X = torch.randn(40, 2) * math.sqrt(2.0)
    pyro.param("weight", torch.tensor(0.5))
    pyro.param("scale", torch.tensor(math.sqrt(0.5)), constraint=dist.constraints.positive)
    before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    result = D.importance_diagnostics((_param_model, _param_guide), X, 100, progress=False)
    assert result.per_row["constant_weights"].all()  # exact guide: the stored values were used
    after = dict(pyro.get_param_store().items())
    assert set(after) == set(before)
    assert all(torch.equal(after[k].detach(), before[k]) for k in before)
    # an explicit param_state (e.g. FitResult.param_store_state) takes precedence
    with pyro.get_param_store().scope() as state:
        pyro.param("weight", torch.tensor(0.0))
        pyro.param("scale", torch.tensor(1.0), constraint=dist.constraints.positive)
    other = D.importance_diagnostics((_param_model, _param_guide), X, 100, progress=False,
                                     param_state=state)
    assert not other.per_row["constant_weights"].any()


def test_importance_diagnostics_rejects_bad_input(ppca, ppca_data):
    with pytest.raises(ValueError, match="num_samples"):
        D.importance_diagnostics(ppca, ppca_data, num_samples=10)
    with pytest.raises(ValueError, match="columns"):
        D.importance_diagnostics(ppca, ppca_data[:, :4], num_samples=100)
    bad = ppca_data.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="row 3, column 2"):
        D.importance_diagnostics(ppca, bad, num_samples=100)


# ------------------------------------------------------------------------------------------
# latent usage
# ------------------------------------------------------------------------------------------
def test_latent_usage_trained_dlvm_has_inactive_units(trained_dlvm):
    model, X = trained_dlvm
    usage = D.latent_usage(model, X, progress=False)
    assert usage.num_latent == 8
    assert 1 <= usage.num_active < 8
    assert usage.num_collapsed >= 1 and usage.posterior_collapse == "partial"
    assert (usage.per_dim["kl_method"] == "analytic").all() and usage.kl_total_method == "analytic"
    assert usage.kl_per_dim_sums_to_total and usage.num_samples == 1
    # the per-dimension KLs add up to the analytic KL term of the ELBO (standard normal prior,
    # diagonal Normal guide), computed here independently from the encoder
    with torch.no_grad():
        loc, scale = model.encode(X)
        analytic = _standard_normal_kl(loc.double(), scale.double())
    assert usage.per_dim["kl"].sum() == pytest.approx(float(analytic.mean()), rel=1e-5)
    assert usage.kl_total == pytest.approx(float(analytic.mean()), rel=1e-5)
    np.testing.assert_allclose(usage.kl_per_row, analytic.numpy(), rtol=1e-4, atol=1e-6)
    # activity is the variance over rows of the encoder mean
    np.testing.assert_allclose(usage.per_dim["activity"], loc.double().var(0).numpy(), rtol=1e-4)
    # inactive units carry (almost) no information: small KL
    inactive = usage.per_dim.loc[~usage.per_dim["active"], "kl"]
    assert (inactive < 0.05).all()


def test_latent_usage_detects_units_switched_off_by_construction():
    torch.manual_seed(0)
    model = DLVM(5, 6, likelihood="gaussian", hidden=(16,))
    off = [2, 3, 4, 5]
    with torch.no_grad():
        # decoder ignores the switched-off coordinates and the encoder returns the prior there
        model.decoder[0].weight[:, off] = 0.0
        final = model.encoder[-1]
        final.weight[off] = 0.0
        final.bias[off] = 0.0
        final.weight[[6 + j for j in off]] = 0.0
        target = torch.tensor(1.0 - model.min_encoder_scale)
        final.bias[[6 + j for j in off]] = target + torch.log(-torch.expm1(-target))
    X = torch.randn(100, 5) * 3
    usage = D.latent_usage(model, X, progress=False)
    assert usage.per_dim["active"].tolist() == [True, True, False, False, False, False]
    assert usage.per_dim["collapsed"].tolist() == [False, False, True, True, True, True]
    np.testing.assert_allclose(usage.per_dim["kl"].to_numpy()[off], 0.0, atol=1e-5)
    assert usage.per_dim["activity"].to_numpy()[off].max() == 0.0


def test_latent_usage_full_covariance_guide_uses_marginals(ppca, ppca_data):
    usage = D.latent_usage(ppca, ppca_data, progress=False)
    # KL of a full-covariance Gaussian against N(0, I) in closed form
    with torch.no_grad():
        post = ppca.posterior(ppca_data)
        cov = post.covariance_matrix.double()
        loc = post.loc.double()
    d = loc.shape[-1]
    exact = 0.5 * (torch.diagonal(cov, dim1=-2, dim2=-1).sum(-1) + (loc ** 2).sum(-1) - d
                   - torch.logdet(cov))
    assert usage.kl_total_method == "analytic"
    assert usage.kl_total == pytest.approx(float(exact.mean()), rel=1e-4)
    # the guide does not factorize: per-dimension KLs are between marginals and say so
    assert (usage.per_dim["kl_method"] == "analytic-marginal").all()
    assert not usage.kl_per_dim_sums_to_total
    marginal = _standard_normal_kl(loc.unsqueeze(-1), torch.diagonal(cov, dim1=-2, dim2=-1)
                                   .sqrt().unsqueeze(-1))
    np.testing.assert_allclose(usage.per_dim["kl"], marginal.mean(0).numpy(), rtol=1e-4)
    assert usage.num_active == 3


def test_latent_usage_mixture_prior_is_monte_carlo_with_standard_error():
    torch.manual_seed(0)
    model = DLVM(5, 3, prior="mixture", likelihood="gaussian", hidden=(16,), num_components=3)
    X = torch.randn(80, 5)
    usage = D.latent_usage(model, X, num_samples=200, progress=False)
    assert usage.kl_total_method == "mc" and usage.kl_total_mc_se > 0
    assert (usage.per_dim["kl_method"] == "mc-marginal").all()
    assert (usage.per_dim["kl_se"] > 0).all()
    # KL(q||p) >= 0 for each row, and the estimate is consistent with that within its error
    assert usage.kl_total > -4 * usage.kl_total_mc_se


def test_latent_usage_user_pair_two_sites(user_pair):
    pair, X = user_pair
    usage = D.latent_usage(pair, X, progress=False)
    assert usage.per_dim["latent_dim"].tolist() == ["a[0]", "a[1]", "b"]
    assert usage.per_dim["site"].tolist() == ["a", "a", "b"]
    with torch.no_grad():
        loc_a, scale_a, loc_b, scale_b = pair.guide_params(X)
    per_dim = torch.cat([_standard_normal_kl(loc_a.unsqueeze(-1), scale_a.unsqueeze(-1)),
                         _standard_normal_kl(loc_b.unsqueeze(-1), scale_b.unsqueeze(-1))
                         .unsqueeze(-1)], dim=-1)
    np.testing.assert_allclose(usage.per_dim["kl"], per_dim.double().mean(0).numpy(), rtol=1e-5)
    assert usage.per_dim["kl"].sum() == pytest.approx(usage.kl_total, rel=1e-6)
    means = torch.cat([loc_a, loc_b.unsqueeze(-1)], dim=-1).double()
    np.testing.assert_allclose(usage.posterior_means, means.numpy(), rtol=1e-6)


# ------------------------------------------------------------------------------------------
# posterior predictive checks
# ------------------------------------------------------------------------------------------
def test_ppc_data_from_the_model_itself_is_not_extreme(ppca):
    # data simulated from the fitted model, compared with that model's replicates
    pyro.set_rng_seed(7)
    X = ppca.sample(300)
    for kind in ("posterior", "prior"):
        table = D.posterior_predictive_check(ppca, X, kind=kind, num_replicates=200,
                                             progress=False)
        assert set(table["statistic"]) == {"mean", "variance", "correlation",
                                           "mean_abs_correlation"}
        assert len(table) == 6 + 6 + 15 + 1
        assert table["p_value"].between(0.001, 0.999, inclusive="neither").all(), kind
        assert not table["extreme"].any()
        assert table.attrs["observed_site"] == "x" and table.attrs["kind"] == kind


def test_ppc_flags_skewness_the_gaussian_model_cannot_produce():
    g = torch.Generator().manual_seed(8)
    latent = torch.randn(400, 2, generator=g, dtype=torch.float64).exp()  # log-normal: skewed
    X = latent @ torch.randn(2, 5, generator=g, dtype=torch.float64).abs() \
        + 0.1 * torch.randn(400, 5, generator=g, dtype=torch.float64)
    model = PPCA(5, 2).fit_closed_form(X)
    # kind="prior": replicates from the fitted marginal p(x), which is Gaussian
    table = D.posterior_predictive_check(model, X, statistics=("mean", "skewness"),
                                         num_replicates=200, progress=False)
    skew = table[table["statistic"] == "skewness"]
    assert (skew["observed"] > 1).all()
    assert skew["extreme"].all() and (skew["p_value"] == 0).all()
    # the check is not simply rejecting everything: the fitted means are reproduced
    means = table[table["statistic"] == "mean"]
    assert means["p_value"].between(0.001, 0.999, inclusive="neither").all()


def test_ppc_with_mask_uses_observed_entries(ppca, ppca_data):
    X = ppca_data[:80].clone()
    mask = torch.ones_like(X, dtype=torch.bool)
    mask[::3, 1] = False
    X[~mask] = float("nan")
    table = D.posterior_predictive_check(ppca, X, mask=mask, statistics=("mean", "max"),
                                         num_replicates=20, progress=False)
    observed_mean = table[(table["statistic"] == "mean") & (table["feature"] == "x[1]")]
    assert observed_mean["observed"].item() == pytest.approx(float(np.nanmean(X[:, 1].numpy())))
    assert np.isfinite(table["observed"]).all() and np.isfinite(table["replicated_mean"]).all()


def test_ppc_user_pair_and_custom_statistic(user_pair):
    pair, X = user_pair

    def row_norm_mean(x):
        return x.norm(dim=-1).mean()

    table = D.posterior_predictive_check(pair, X, statistics=("variance", row_norm_mean),
                                         num_replicates=30, progress=False)
    assert table.attrs["observed_site"] == "obs"
    custom = table[table["statistic"] == "row_norm_mean"]
    assert len(custom) == 1
    assert custom["observed"].item() == pytest.approx(float(X.double().norm(dim=-1).mean()))
    with pytest.raises(ValueError, match="unknown statistic"):
        D.posterior_predictive_check(pair, X, statistics=("medianx",))
    with pytest.raises(ValueError, match="kind"):
        D.posterior_predictive_check(pair, X, kind="likelihood")


# ------------------------------------------------------------------------------------------
# amortization gap
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_amortization_gap_is_zero_for_the_exact_posterior(ppca_data, covariance):
    # closed-form PPCA has orthogonal loadings, so the exact posterior is also diagonal
    model = PPCA(6, 3).double().fit_closed_form(ppca_data)
    gap = D.amortization_gap(model, ppca_data, num_steps=40, max_rows=15,
                             covariance=covariance, eval_particles=500, progress=False)
    assert gap["num_rows"] == 15 and len(gap["per_row"]) == 15
    assert abs(gap["mean_gap"]) <= 4 * gap["mc_se"] + 1e-9
    exact = model.log_marginal(ppca_data[:15]).detach().numpy()
    np.testing.assert_allclose(gap["per_row"]["elbo_amortized"], exact, rtol=1e-10)


def test_amortization_gap_trained_dlvm_is_nonnegative_and_model_untouched(trained_dlvm):
    model, X = trained_dlvm
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gap = D.amortization_gap(model, X, num_steps=60, max_rows=12, eval_particles=500,
                             progress=False)
    assert gap["mean_gap"] >= -4 * gap["mc_se"]
    assert gap["mean_gap"] >= -4 * gap["se"]
    # the local ELBOs are lower bounds estimated with standard errors, never above log p(x):
    # compare with a 2000-sample importance-sampled estimate
    imp = D.importance_diagnostics(model, X[:12], num_samples=2000, progress=False)
    upper = imp.per_row["log_px_estimate"] + 4 * imp.per_row["log_px_se"] + 4 * gap["per_row"][
        "elbo_local_se"]
    assert (gap["per_row"]["elbo_local"] <= upper).all()
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None for p in model.parameters()), "no gradient may reach the model"


def test_amortization_gap_rejects_bad_arguments(ppca, ppca_data):
    with pytest.raises(ValueError, match="covariance"):
        D.amortization_gap(ppca, ppca_data, covariance="banded")
    with pytest.raises(ValueError, match="max_rows"):
        D.amortization_gap(ppca, ppca_data, max_rows=0)


# ------------------------------------------------------------------------------------------
# ArviZ export
# ------------------------------------------------------------------------------------------
def _assert_same_inference_data(a, b):
    assert sorted(a.groups()) == sorted(b.groups())
    for group in a.groups():
        left, right = a[group], b[group]
        assert sorted(left.data_vars) == sorted(right.data_vars), group
        for name in left.data_vars:
            assert left[name].dims == right[name].dims, (group, name)
            np.testing.assert_array_equal(left[name].values, right[name].values)
        for name in left.coords:
            np.testing.assert_array_equal(left[name].values, right[name].values)
        assert left.attrs == right.attrs, group


def test_inference_data_round_trips_through_netcdf(trained_dlvm, tmp_path):
    model, X = trained_dlvm
    bundle = D.diagnose(model, X[:40], num_samples=100, include_predictive=False,
                        progress=False)
    idata = D.to_inference_data(model, X[:40], rows=[0, 5, 7], num_draws=50,
                                diagnostics=bundle)
    assert {"posterior", "log_likelihood", "sample_stats", "observed_data",
            "diagnostics"} <= set(idata.groups())
    z = idata.posterior["z"]
    assert z.dims == ("chain", "draw", "row", "latent_dim") and z.shape == (1, 50, 3, 8)
    assert idata.log_likelihood["x"].dims == ("chain", "draw", "row")
    assert idata.posterior.coords["row"].values.tolist() == [0, 5, 7]
    np.testing.assert_allclose(idata.observed_data["x"].values, X[[0, 5, 7]].double().numpy())
    np.testing.assert_allclose(idata.diagnostics["khat"].values,
                               bundle.importance.per_row["khat"].to_numpy()[[0, 5, 7]])
    np.testing.assert_allclose(idata.diagnostics["kl"].values, bundle.latent.per_dim["kl"])
    # the sample stats are exactly log p(x, z) - log q(z | x) = log_lik + log prior - log q
    assert np.isfinite(idata.sample_stats["log_importance_weight"].values).all()

    path = tmp_path / "diagnostics.nc"
    idata.to_netcdf(str(path))
    loaded = az.from_netcdf(str(path))
    _assert_same_inference_data(idata, loaded)


def test_inference_data_defaults_user_pair_and_loglik(user_pair, tmp_path):
    pair, X = user_pair
    loglik = np.arange(len(X), dtype=float)
    idata = D.to_inference_data(pair, X, num_draws=30, loglik=loglik)
    assert idata.posterior["a"].dims == ("chain", "draw", "row", "a_dim")
    assert idata.posterior["b"].shape == (1, 30, 20, 1)
    np.testing.assert_array_equal(idata.diagnostics["log_px_estimate"].values, loglik[:20])
    assert "obs" in idata.observed_data and "obs" in idata.log_likelihood
    assert idata.diagnostics.attrs["log_px_source"].startswith("user-supplied")
    path = tmp_path / "user.nc"
    idata.to_netcdf(str(path))
    _assert_same_inference_data(idata, az.from_netcdf(str(path)))
    with pytest.raises(ValueError, match="rows"):
        D.to_inference_data(pair, X, rows=[0, len(X)])
    with pytest.raises(ValueError, match="loglik"):
        D.to_inference_data(pair, X, loglik=np.zeros(7))


# ------------------------------------------------------------------------------------------
# bundle
# ------------------------------------------------------------------------------------------
def test_diagnose_bundle_flat_metrics(ppca, ppca_data):
    with torch.no_grad():
        ppca.guide_scale_tril = ppca.guide_scale_tril * 0.9
    result = D.diagnose(ppca, ppca_data[:50], num_samples=100, num_replicates=30,
                        include_amortization_gap=True, progress=False,
                        amortization_kwargs=dict(num_steps=10, max_rows=5, eval_particles=50))
    metrics = result.to_dict()
    assert all(isinstance(v, float) for v in metrics.values())
    for key in ("khat_median", "khat_fraction_bad", "active_units", "kl_total",
                "ppc_num_extreme", "amortization_gap", "amortization_gap_se"):
        assert key in metrics
    assert metrics["active_units"] == 3.0
    json.dumps(metrics)
    text = result.summary()
    assert "k-hat" in text and "latent dimensions active" in text and "Amortization gap" in text


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_diagnostics_on_cuda_leave_the_model_where_it_was(ppca, ppca_data):
    imp = D.importance_diagnostics(ppca, ppca_data[:20], 100, device="cuda", progress=False)
    assert imp.fraction_good == 1.0
    usage = D.latent_usage(ppca, ppca_data, device="cuda", progress=False)
    assert usage.num_active == 3
    assert ppca.loading.device.type == "cpu"


def test_latent_usage_of_an_enumerated_mixture_prior_is_the_kl_to_the_marginal_prior():
    """A prior that depends on an enumerated site (the cluster DLVM's ``enumerated_model``):
    the KL is to the prior marginalized over the components, estimated by Monte Carlo; it
    agrees with the same model written with the mixture prior directly (the oracle), and the
    per-coordinate KL, which that prior does not factor into, is unavailable (it crashed)."""
    from pyro_lvm.models.cluster_dlvm import ClusterDLVM

    torch.manual_seed(0)
    model = ClusterDLVM(6, 2, num_clusters=3, hidden=(16,))
    x = (torch.rand(60, 6) < 0.5).float()
    enumerated = D.latent_usage((model.enumerated_model, model.guide), x, num_samples=400,
                                progress=False)
    mixture = D.latent_usage(model, x, num_samples=400, progress=False, seed=1)
    assert enumerated.kl_total_method == "mc-enumerated"
    se = math.hypot(enumerated.kl_total_mc_se, mixture.kl_total_mc_se)
    assert 0 < se < 0.05
    assert abs(enumerated.kl_total - mixture.kl_total) < 4 * se
    assert (enumerated.per_dim["kl_method"] == "unavailable").all()
    assert enumerated.per_dim["kl"].isna().all()
