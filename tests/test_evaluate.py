"""Tests of inference.evaluate: importance-sampled log p(x) with Monte Carlo standard errors,
held-out ELBO, reconstruction error, bits per dim, streaming and chunking, validation.

Exact references come from linear-Gaussian models (PPCA / factor analysis), whose marginal
likelihood, posterior and hence ELBO are available in closed form. Monte Carlo tolerances
are derived from standard errors, never set by eye.
"""
import json
import math

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy import stats

from pyro_lvm.inference.engine import pair_eval_width
from pyro_lvm.inference.evaluate import elbo, evaluate, log_likelihood, reconstruction_error
from pyro_lvm.models.dlvm import DLVM
from pyro_lvm.models.linear import PPCA

from conftest import synthetic_fa

F64 = torch.float64
PROB_3SE = 2 * stats.norm.sf(3.0)  # two-sided P(|Z| > 3) for a normal estimate


def allowed_exceedances(n: int, p: float = PROB_3SE, tail: float = 1e-4) -> int:
    """Largest count of |z| > 3 among n independent rows that is still plausible (the
    1 - tail quantile of Binomial(n, p)); a few exceedances are expected, not a failure."""
    return int(stats.binom.ppf(1 - tail, n, p))


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ppca_digits():
    """PPCA (d = 5) fit in closed form (float64) to 300 standardized digits rows."""
    from sklearn.datasets import load_digits

    X = load_digits().data.astype(np.float64)
    X = X[:, X.std(axis=0) > 0]
    X = (X - X.mean(0)) / X.std(0)
    X = torch.as_tensor(X[:300])
    model = PPCA(X.shape[1], 5).to(F64)
    model.fit_closed_form(X)
    return model, X


def imperfect(model, scale: float = 1.3, shift: float = 0.0):
    """Make the linear model's guide a deliberately imperfect (wider, shifted) proposal."""
    model.set_guide_to_posterior()
    with torch.no_grad():
        model.guide_scale_tril = model.guide_scale_tril * scale
        model.guide_bias = model.guide_bias + shift
    return model


def exact_elbo(model, X):
    """Analytic ELBO(x_i) = log p(x_i) - KL(q(z|x_i) || p(z|x_i)) for a linear model."""
    with torch.no_grad():
        loc = X @ model.guide_weight.T + model.guide_bias
        q = torch.distributions.MultivariateNormal(loc, scale_tril=model.guide_scale_tril)
        kl = torch.distributions.kl_divergence(q, model.posterior(X))
        return (model.log_marginal(X) - kl).numpy()


# ----------------------------------------------------------------------------- streaming math


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("which", ["ppca", "fa"])
def test_exact_posterior_guide_recovers_exact_log_px_with_zero_se(which, ppca_digits):
    if which == "ppca":
        model, X = ppca_digits
        model.set_guide_to_posterior()
        X = X[:60]
    else:
        model, X = synthetic_fa(n=60)
        model.set_guide_to_posterior()
    # tiny chunks: rows and particles are split, so any row misalignment would show
    est = log_likelihood(model, X, 64, chunk_size=5, batch_size=7, device="cpu")
    exact = model.log_marginal(X).detach().numpy()
    np.testing.assert_allclose(est.per_row["log_px"], exact, rtol=0, atol=1e-9)
    np.testing.assert_allclose(est.per_row["exact_log_px"], exact, rtol=1e-12)
    assert np.all(est.per_row["se"] < 1e-6)
    np.testing.assert_allclose(est.per_row["ess"], 64, rtol=1e-9)
    assert est.mc_se < 1e-6 and est.exact_mean == pytest.approx(exact.mean(), abs=1e-12)
    el = elbo(model, X, 8, device="cpu")
    np.testing.assert_allclose(el.per_row["elbo"], exact, atol=1e-9)  # KL(q || posterior) = 0
    assert np.all(el.per_row["se"] < 1e-6)


@pytest.mark.parametrize("which", ["ppca", "fa"])
def test_estimate_within_3_se_of_exact_log_px(which, ppca_digits):
    if which == "ppca":
        model, X = ppca_digits
        imperfect(model, scale=1.3)
        X = X[:150]
    else:
        model, X = synthetic_fa(n=150)
        imperfect(model, scale=1.3, shift=0.1)
    # large enough that the O(1/K) bias is small next to the Monte Carlo error (checked below)
    K = {"ppca": 1000, "fa": 2000}[which]
    est = log_likelihood(model, X, K, device="cpu", seed=11)
    rows = est.per_row
    z = (rows["log_px"] - rows["exact_log_px"]) / rows["se"]
    assert np.all(rows["se"] > 0) and np.all(rows["ess"] < K)  # the guide really is imperfect
    assert int((np.abs(z) > 3).sum()) <= allowed_exceedances(len(rows))
    # Dataset mean. The O(1/K) downward bias, about -se_i^2 / 2 per row, is far below mc_se here.
    bias = float((rows["se"] ** 2).mean() / 2)
    assert bias < 0.2 * est.mc_se
    assert abs(est.mean - est.exact_mean) <= 3 * est.mc_se
    # The estimate cannot beat the bound by much: IWAE_K <= log p(x) in expectation.
    assert est.mean <= est.exact_mean + 3 * est.mc_se


def test_reported_se_matches_spread_over_seeds(ppca_digits):
    """The delta-method se is itself right: the spread of the estimate over R independent
    seeds matches the reported se (root mean square over rows, within 30%)."""
    model, X = ppca_digits
    imperfect(model, scale=1.3, shift=0.05)
    X = X[:50]
    R, K = 20, 200
    runs = [log_likelihood(model, X, K, device="cpu", seed=s).per_row for s in range(R)]
    values = np.stack([r["log_px"].to_numpy() for r in runs])  # [R, n]
    ses = np.stack([r["se"].to_numpy() for r in runs])
    empirical_var = values.var(axis=0, ddof=1)
    reported_var = (ses ** 2).mean(axis=0)
    ratio = math.sqrt(empirical_var.mean() / reported_var.mean())
    assert 0.7 < ratio < 1.3, ratio
    # and the mean's mc_se matches the spread of the dataset mean over seeds
    means = values.mean(axis=1)
    mc_se = np.mean([math.sqrt((s ** 2).sum()) / s.shape[0] for s in ses])
    # sd of R=20 draws has relative sd ~ 1/sqrt(2*19) = 16%; allow 3 of those
    assert abs(means.std(ddof=1) / mc_se - 1) < 0.5


def test_elbo_estimate_matches_analytic_elbo():
    model, X = synthetic_fa(n=150)
    imperfect(model, scale=1.5, shift=0.2)
    want = exact_elbo(model, X)
    el = elbo(model, X, 20, device="cpu", seed=2)
    z = (el.per_row["elbo"] - want) / el.per_row["se"]
    # per-row t-statistics with 19 df: use the t tail, not the normal one
    p_tail = 2 * stats.t.sf(3.0, df=19)
    assert int((np.abs(z) > 3).sum()) <= allowed_exceedances(len(want), p_tail)
    assert abs(el.mean - want.mean()) <= 4 * el.mc_se
    assert el.mean < el.exact_mean  # a bound, strictly below log p(x) for an imperfect guide
    assert "lower bound" in el.label and "ELBO" in el.summary()
    # K = 1: no per-row Monte Carlo se can be estimated; say so rather than report 0
    one = elbo(model, X, 1, device="cpu")
    assert one.per_row["se"].isna().all() and math.isnan(one.mc_se)
    assert "K=1" in one.summary() and np.isfinite(one.data_se)


# ----------------------------------------------------------------------------- chunking / seeds
def test_deterministic_for_a_seed_and_leaves_global_rng_alone():
    model, X = synthetic_fa(n=40)
    imperfect(model)
    torch.manual_seed(123)
    a = log_likelihood(model, X, 100, device="cpu", seed=5)
    after = torch.rand(3)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    assert torch.equal(after, expected_next)  # the caller's RNG stream is untouched
    b = log_likelihood(model, X, 100, device="cpu", seed=5)
    pd.testing.assert_frame_equal(a.per_row, b.per_row)
    c = log_likelihood(model, X, 100, device="cpu", seed=6)
    assert not np.allclose(a.per_row["log_px"], c.per_row["log_px"])


def test_chunk_sizes_change_draws_but_not_the_estimate():
    model, X = synthetic_fa(n=120)
    imperfect(model, scale=1.4, shift=0.1)
    whole = log_likelihood(model, X, 300, device="cpu", seed=0)
    assert whole.particles_per_chunk == 300 and whole.rows_per_chunk == 120
    tiny = log_likelihood(model, X, 300, chunk_size=37, batch_size=13, device="cpu", seed=0)
    budget = log_likelihood(model, X, 300, max_elements=40000, device="cpu", seed=0)
    assert budget.rows_per_chunk * budget.particles_per_chunk * 8 <= 40000
    assert budget.rows_per_chunk < 120
    for other in (tiny, budget):
        diff = other.per_row["log_px"] - whole.per_row["log_px"]
        se = np.sqrt(other.per_row["se"] ** 2 + whole.per_row["se"] ** 2)
        assert int((np.abs(diff / se) > 3).sum()) <= allowed_exceedances(len(diff))
        assert abs(other.mean - whole.mean) <= 4 * math.hypot(other.mc_se, whole.mc_se)
        pd.testing.assert_series_equal(other.per_row["exact_log_px"], whole.per_row["exact_log_px"])


# ----------------------------------------------------------------------------- bits per dim
class IndependentBernoulliPair(pyro.nn.PyroModule):
    """x_j ~ Bernoulli(sigmoid(b_j)) independently of z ~ N(0, I_2); the guide is the prior.
    Every log weight equals log p(x) exactly, so the IS estimate is exact."""

    def __init__(self, data_dim, bias):
        super().__init__()
        self.data_dim = data_dim
        self.register_buffer("bias", torch.as_tensor(bias, dtype=torch.float32).expand(data_dim))

    def model(self, x, mask=None):
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            logits = self.bias + 0.0 * z.sum(-1, keepdim=True)
            px = dist.Bernoulli(logits=logits)
            if mask is not None:
                px = px.mask(mask)
            pyro.sample("x", px.to_event(1), obs=x)

    def guide(self, x, mask=None):
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    def log_marginal(self, x, mask=None):
        lp = dist.Bernoulli(logits=self.bias).log_prob(x)
        return (lp if mask is None else lp * mask).sum(-1)


def test_bits_per_dim_on_binary_data():
    g = torch.Generator().manual_seed(0)
    X = (torch.rand(50, 12, generator=g) < 0.3).float()
    fair = log_likelihood(IndependentBernoulliPair(12, 0.0), X, 10, device="cpu")
    assert fair.discrete and fair.bits_per_dim == pytest.approx(1.0, abs=1e-6)  # a fair coin
    assert fair.bits_per_dim_se == pytest.approx(0.0, abs=1e-6)
    biased = log_likelihood(IndependentBernoulliPair(12, -1.0), X, 10, device="cpu")
    assert biased.bits_per_dim == pytest.approx(-biased.exact_mean / (12 * math.log(2)), rel=1e-5)
    assert biased.exact_bits_per_dim == pytest.approx(biased.bits_per_dim, rel=1e-5)
    assert "bits/dim" in biased.summary()
    # with a mask, bits are per observed entry of each row: still 1 for a fair coin
    mask = torch.rand(50, 12, generator=g) < 0.6
    mask[:, 0] = True
    masked = log_likelihood(IndependentBernoulliPair(12, 0.0), X, 10, mask=mask, device="cpu")
    assert masked.bits_per_dim == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(masked.per_row["log_px"], -mask.sum(1).numpy() * math.log(2),
                               rtol=1e-5)


def test_bits_per_dim_follows_the_observation_model_not_the_values():
    g = torch.Generator().manual_seed(1)
    X = (torch.rand(40, 20, generator=g) < 0.5).float()
    bern = log_likelihood(DLVM(20, 2, hidden=(8,), likelihood="bernoulli"), X, 20, device="cpu")
    assert bern.discrete
    assert bern.bits_per_dim == pytest.approx(-bern.mean / (20 * math.log(2)), rel=1e-9)
    assert bern.bits_per_dim_se == pytest.approx(bern.mc_se / (20 * math.log(2)), rel=1e-9)
    # 0/1 values under a Gaussian observation model are a density: no bits per dim
    gauss = log_likelihood(DLVM(20, 2, hidden=(8,), likelihood="gaussian"), X, 20, device="cpu")
    assert not gauss.discrete and gauss.bits_per_dim is None
    forced = log_likelihood(DLVM(20, 2, hidden=(8,), likelihood="gaussian"), X, 20,
                            device="cpu", discrete=True)
    assert forced.bits_per_dim is not None


# ----------------------------------------------------------------------------- reconstruction
def test_generic_reconstruction_equals_model_reconstruct(ppca_digits):
    model, X = ppca_digits
    model.set_guide_to_posterior()
    X = X[:40]
    own = reconstruction_error(model, X, device="cpu")
    generic = reconstruction_error(model, X, device="cpu", method="likelihood_mean")
    assert own.method == "reconstruct" and generic.method == "likelihood_mean"
    np.testing.assert_allclose(own.per_row["mse"], generic.per_row["mse"], rtol=1e-8)
    direct = ((X - model.reconstruct(X)) ** 2).mean(1).numpy()
    np.testing.assert_allclose(own.per_row["mse"], direct, rtol=1e-10)
    assert own.cross_entropy is None  # continuous data
    assert own.mse_se == pytest.approx(direct.std(ddof=1) / math.sqrt(40))


def test_binary_cross_entropy_of_reconstruction():
    g = torch.Generator().manual_seed(2)
    X = (torch.rand(30, 15, generator=g) < 0.4).float()
    model = DLVM(15, 2, hidden=(8,))
    rec = reconstruction_error(model, X, device="cpu")
    with torch.no_grad():
        r = model.reconstruct(X).double()
    Xd = X.double()
    bce = -(Xd * r.log() + (1 - Xd) * (1 - r).log()).sum(1).numpy()
    np.testing.assert_allclose(rec.per_row["cross_entropy"], bce, rtol=1e-9)
    np.testing.assert_allclose(rec.per_row["mse"], ((Xd - r) ** 2).mean(1).numpy(), rtol=1e-9)


def test_missing_entries_with_a_dlvm():
    g = torch.Generator().manual_seed(4)
    X = (torch.rand(30, 10, generator=g) < 0.4).float()
    mask = torch.rand(30, 10, generator=g) < 0.7
    mask[:, 0] = True
    X[~mask] = float("nan")  # missing entries may hold anything, NaN included
    model = DLVM(10, 2, hidden=(8,))
    out = evaluate(model, X, 20, mask=mask, device="cpu")
    assert np.isfinite(out["log_px_is"]) and np.isfinite(out["bits_per_dim"])
    rec = reconstruction_error(model, X, mask=mask, device="cpu")
    x0 = torch.nan_to_num(X, nan=0.0)
    with torch.no_grad():
        r = model.reconstruct(x0, mask).double()
    m = mask.double()
    want = (((x0.double() - r) ** 2) * m).sum(1) / m.sum(1)
    np.testing.assert_allclose(rec.per_row["mse"], want.numpy(), rtol=1e-9)
    assert out["recon_mse"] == pytest.approx(rec.mse)


# ----------------------------------------------------------------------------- evaluate()
def test_evaluate_returns_flat_metrics_consistent_with_parts():
    model, X = synthetic_fa(n=80)
    imperfect(model)
    out = evaluate(model, X, 200, device="cpu", seed=3)
    json.dumps(out)  # flat and serializable
    assert all(isinstance(v, float) for v in out.values())
    ll = log_likelihood(model, X, 200, device="cpu", seed=3)
    assert out["log_px_is"] == ll.mean and out["log_px_is_mc_se"] == ll.mc_se
    assert out["log_px_exact"] == pytest.approx(ll.exact_mean)
    assert out["elbo"] < out["log_px_is"]
    assert abs(out["elbo"] - exact_elbo(model, X).mean()) <= 4 * out["elbo_mc_se"]
    assert out["recon_mse"] == pytest.approx(reconstruction_error(model, X, device="cpu").mse)
    assert "bits_per_dim" not in out and "recon_cross_entropy" not in out
    assert out["num_samples"] == 200 and out["num_rows"] == 80


def test_summary_names_the_estimate_honestly():
    model, X = synthetic_fa(n=30)
    imperfect(model)
    text = str(log_likelihood(model, X, 50, device="cpu"))
    assert "IWAE_50" in text and "MC se" in text and "lower bound" in text
    assert "exact log p(x)" in text and "30 rows" in text
    d = log_likelihood(model, X, 50, device="cpu").to_dict()
    json.dumps(d)
    assert d["num_samples"] == 50 and d["exact_log_px"] is not None


# ----------------------------------------------------------------------------- inputs
def test_accepts_numpy_pandas_and_torch_alike():
    model, X = synthetic_fa(n=25)
    imperfect(model)
    a = log_likelihood(model, X, 30, device="cpu")
    b = log_likelihood(model, X.numpy(), 30, device="cpu")
    c = log_likelihood(model, pd.DataFrame(X.numpy()), 30, device="cpu")
    pd.testing.assert_frame_equal(a.per_row, b.per_row)
    pd.testing.assert_frame_equal(a.per_row, c.per_row)


def test_plain_function_pair_uses_global_params_without_changing_them():
    """A user's pair of functions with pyro.param sites: z ~ N(0,1), x | z ~ N(z + m, 1),
    exact posterior guide N((x - m)/2, 1/2); log p(x) = log N(x; m, 2)."""

    def model(x, mask=None):
        m = pyro.param("m", torch.tensor(0.0))
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", dist.Normal(torch.zeros(1), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z + m, 1.0).to_event(1), obs=x)

    def guide(x, mask=None):
        m = pyro.param("m", torch.tensor(0.0))
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", dist.Normal((x - m) / 2, math.sqrt(0.5)).to_event(1))

    pyro.param("m", torch.tensor(1.5))
    X = torch.randn(20, 1) + 1.5
    est = log_likelihood((model, guide), X, 10, device="cpu")
    want = dist.Normal(1.5, math.sqrt(2.0)).log_prob(X[:, 0]).numpy()
    np.testing.assert_allclose(est.per_row["log_px"], want, rtol=1e-5)
    assert est.per_row["se"].max() < 1e-3 and est.exact_mean is None
    assert pyro.param("m").item() == 1.5 and list(pyro.get_param_store().keys()) == ["m"]


def test_validation_errors_name_the_problem():
    model, X = synthetic_fa(n=10)
    bad = X.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match=r"row 3, column 2"):
        log_likelihood(model, bad, 5, device="cpu")
    with pytest.raises(ValueError, match="columns"):
        log_likelihood(model, X[:, :5], 5, device="cpu")
    with pytest.raises(ValueError, match="num_samples"):
        log_likelihood(model, X, 0, device="cpu")
    with pytest.raises(ValueError, match="num_samples"):
        log_likelihood(model, X, 2.5, device="cpu")
    with pytest.raises(ValueError, match="seed"):
        log_likelihood(model, X, 5, device="cpu", seed="a")
    with pytest.raises(ValueError, match="method"):
        reconstruction_error(model, X, method="nope", device="cpu")
    binary_model = DLVM(4, 2, hidden=(4,))
    with pytest.raises(ValueError, match="outside"):
        log_likelihood(binary_model, np.full((3, 4), 0.5), 5, device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_request_without_cuda_is_a_value_error():
    model, X = synthetic_fa(n=5)
    with pytest.raises(ValueError, match="CUDA"):
        log_likelihood(model, X, 5, device="cuda")


def test_out_of_support_row_in_a_later_chunk_is_not_missed():
    """Pyro's checks run on the first chunk only when the data are known to be in the
    observation model's support; a pair without check_data gets an up-front support check,
    so a non-binary value far from the first chunk still raises."""
    X = torch.zeros(40, 3)
    X[33, 1] = 0.5
    pair = IndependentBernoulliPair(3, 0.0)  # no check_data of its own
    pair.log_marginal = None  # and no exact value, whose own torch check would catch it
    with pytest.raises(ValueError):
        log_likelihood(pair, X, 4, device="cpu", batch_size=5)


def test_validation_setting_is_restored():
    from pyro.infer.util import is_validation_enabled

    model, X = synthetic_fa(n=30)
    assert is_validation_enabled()
    log_likelihood(model, X, 4, device="cpu", batch_size=5)  # many chunks, checks on the first
    assert is_validation_enabled()
    assert torch.distributions.Distribution._validate_args


def test_nan_log_weights_name_the_rows():
    def model(x, mask=None):
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", dist.Normal(torch.zeros(1), 1.0).to_event(1))
            # an invalid log density exactly for the row whose value is 3
            bad = torch.where(x[:, 0] == 3, torch.tensor(float("nan")), torch.tensor(0.0))
            pyro.factor("x_term", z.sum(-1) * 0 + bad)

    def guide(x, mask=None):
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", dist.Normal(torch.zeros(1), 1.0).to_event(1))

    # with Pyro's validation off (as in fast production runs) our own check names the row
    with pyro.validation_enabled(False), pytest.raises(ValueError, match=r"data row\(s\) \[3\]"):
        log_likelihood((model, guide), torch.arange(12.0).reshape(6, 2) / 2, 4, device="cpu",
                       batch_size=2)


def test_module_is_evaluated_in_eval_mode_and_mode_is_restored():
    model, X = synthetic_fa(n=10)
    model.train()
    seen = []
    original = model.guide

    def spy(x, mask=None):
        seen.append(model.training)
        return original(x, mask)

    log_likelihood(model, X, 5, device="cpu", guide=spy, progress=True)
    assert seen and not any(seen) and model.training


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_estimate_agrees_with_cpu():
    model, X = synthetic_fa(n=100)
    imperfect(model)
    cpu = log_likelihood(model, X, 200, device="cpu", seed=0)
    gpu = log_likelihood(model, X, 200, device="cuda", seed=0)
    assert gpu.device.startswith("cuda")
    assert abs(gpu.mean - cpu.mean) <= 4 * math.hypot(gpu.mc_se, cpu.mc_se)
    np.testing.assert_allclose(gpu.per_row["exact_log_px"], cpu.per_row["exact_log_px"], rtol=1e-9)
    model.to("cpu")


# ---------------------------------------------------------------------------------------
# chunk planning for priors whose log_prob is wider than the draws (VampPrior)
# ---------------------------------------------------------------------------------------
def test_planner_budgets_a_vamp_prior_and_encodes_pseudo_inputs_once_per_chunk():
    """The VampPrior's [particles, rows, C] component matrix is budgeted (pair.eval_width),
    and the encoder sees the pseudo-inputs once per vectorized chunk, not once per particle."""

    model = DLVM(10, 2, prior="vamp", hidden=(8,), num_pseudo_inputs=50)
    assert pair_eval_width(model) == 100
    x = (torch.rand(30, 10) > 0.5).float()
    calls = []
    encode = model._encode

    def counting_encode(u):
        if u.shape[0] == 50 and u.dim() == 2:
            calls.append(1)
        return encode(u)

    model.prior.attach_encoder(counting_encode)
    log_likelihood(model, x, num_samples=40, progress=False)  # one chunk
    # the calls outside the chunks: the pair's checks and the planning probe
    outside = len(calls) - 1
    calls.clear()
    est = log_likelihood(model, x, num_samples=40, max_elements=30 * 40 * 100 // 4,
                         progress=False)
    # budget for a quarter of all draws at width 100 -> at least 4 chunks, each one call
    chunks = len(calls) - outside
    assert 4 <= chunks <= 8
    assert np.isfinite(est.mean)


