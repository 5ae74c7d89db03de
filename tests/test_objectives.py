"""Tests of inference.objectives: bounds, minibatch scaling, gradient estimators, analytic KL,
KL warm-up, and training with the objectives (issue 4).

Monte Carlo checks use fixed seeds and tolerances of 4 standard errors; replicates are drawn
in one vectorized pass (repeated rows are independent replicates, since rows are independent
given the parameters).
"""
import math
from types import SimpleNamespace

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule, PyroParam
from torch.distributions import constraints

from pyro_lvm.inference.training import KLWarmup, fit, linear_warmup
from pyro_lvm.inference.importance_weights import (elbo_from_log_weights,
                                                   iwae_from_log_weights, log_weights,
                                                   trace_log_terms)
from pyro_lvm.inference.objectives import ELBO, IWAE, _reparameterized_surrogate
from pyro_lvm.models.linear import PPCA

F64 = torch.float64
Z_TOL = 4.0  # standard errors


# ----------------------------------------------------------------------------------------
# model/guide pairs written as a user would write them
# ----------------------------------------------------------------------------------------
def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=F64)


class DiagGaussianPair(PyroModule):
    """z ~ prior; x | z ~ N(W z + mu, s^2 I); q(z | x) = N(A x + b, diag(scale^2)).

    ``prior="normal"``: N(0, I) (closed-form KL against the guide); ``prior="mixture"``: a
    fixed three-component Gaussian mixture (no closed-form KL).
    """

    def __init__(self, p=4, d=2, prior="normal", seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.p, self.d, self.prior = p, d, prior
        self.W = PyroParam(_randn(gen, p, d))
        self.mu = PyroParam(_randn(gen, p))
        self.log_s = PyroParam(torch.tensor(math.log(0.7), dtype=F64))
        self.A = PyroParam(0.2 * _randn(gen, d, p))
        self.b = PyroParam(0.2 * _randn(gen, d))
        self.scale = PyroParam(torch.full((d,), 0.6, dtype=F64), constraint=constraints.positive)
        self.register_buffer("component_locs", 1.5 * _randn(gen, 3, d))

    def prior_distribution(self, like):
        if self.prior == "normal":
            return dist.Normal(like.new_zeros(self.d), 1.0).to_event(1)
        mixing = dist.Categorical(logits=like.new_zeros(3))
        components = dist.Normal(self.component_locs, 0.8).to_event(1)
        return dist.MixtureSameFamily(mixing, components)

    def model(self, x, mask=None):
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", self.prior_distribution(x))
            pyro.sample("x", dist.Normal(z @ self.W.T + self.mu, self.log_s.exp()).to_event(1),
                        obs=x)

    def guide(self, x, mask=None):
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", dist.Normal(x @ self.A.T + self.b, self.scale).to_event(1))

    def guide_loc(self, x):
        return x @ self.A.T + self.b

    def data(self, n, seed=1):
        gen = torch.Generator().manual_seed(seed)
        z, noise = _randn(gen, n, self.d), _randn(gen, n, self.p)
        with torch.no_grad():
            return (z @ self.W.T.cpu() + self.mu.cpu() + 0.7 * noise).to(self.W.device)


class HierarchicalPair(PyroModule):
    """Two dependent latent sites, and a prior that shares a parameter with the encoder (as
    the VampPrior does):

    model: z1 ~ N(0.3 b1, I), z2 | z1 ~ N(0.5 z1, I), x ~ N(W1 z1 + W2 z2, s^2 I);
    guide: z1 ~ N(A1 x + b1, s1^2), z2 | z1 ~ N(A2 x + B z1, s2^2).
    """

    def __init__(self, p=3, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.W1, self.W2 = PyroParam(_randn(gen, p, 2)), PyroParam(_randn(gen, p, 2))
        self.log_s = PyroParam(torch.tensor(-0.3, dtype=F64))
        self.A1, self.A2 = PyroParam(0.3 * _randn(gen, 2, p)), PyroParam(0.3 * _randn(gen, 2, p))
        self.b1, self.B = PyroParam(0.3 * _randn(gen, 2)), PyroParam(0.3 * _randn(gen, 2, 2))
        self.log_s1 = PyroParam(torch.full((2,), -0.2, dtype=F64))
        self.log_s2 = PyroParam(torch.full((2,), -0.4, dtype=F64))

    def model(self, x, mask=None):
        with pyro.plate("data", x.shape[0], dim=-1):
            z1 = pyro.sample("z1", dist.Normal(0.3 * self.b1, 1.0).to_event(1))
            z2 = pyro.sample("z2", dist.Normal(0.5 * z1, 1.0).to_event(1))
            loc = z1 @ self.W1.T + z2 @ self.W2.T
            pyro.sample("x", dist.Normal(loc, self.log_s.exp()).to_event(1), obs=x)

    def guide(self, x, mask=None):
        with pyro.plate("data", x.shape[0], dim=-1):
            z1 = pyro.sample("z1", dist.Normal(x @ self.A1.T + self.b1,
                                               self.log_s1.exp()).to_event(1))
            pyro.sample("z2", dist.Normal(x @ self.A2.T + z1 @ self.B.T,
                                          self.log_s2.exp()).to_event(1))


class ReplicatedGaussian(PyroModule):
    """The Gaussian model of Rainforth et al. (2018), z ~ N(mu, I), x | z ~ N(z, I), with
    q(z | x) = N(a * x + b, diag(exp(2 log_s))) whose parameters are stored once per data
    row. All rows hold the same x and the same guide values, so the gradient with respect to
    row r's guide parameters is replicate r of the single-point gradient estimator: one
    backward pass gives R independent replicates."""

    def __init__(self, replicates, mu, a, b, log_s):
        super().__init__()
        expand = (replicates, mu.shape[0])
        self.mu = PyroParam(mu.clone())
        self.a = PyroParam(a.expand(expand).clone())
        self.b = PyroParam(b.expand(expand).clone())
        self.log_s = PyroParam(log_s.expand(expand).clone())

    def model(self, x, mask=None):
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", dist.Normal(self.mu, 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    def guide(self, x, mask=None):
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", dist.Normal(self.a * x + self.b, self.log_s.exp()).to_event(1))

    def guide_gradients(self):
        """Per-replicate gradient of the bound (minus the loss gradient) for a, b, log_s."""
        return {name: -getattr(self, name + "_unconstrained").grad
                for name in ("a", "b", "log_s")}


def replicated_gaussian(replicates, dim=3, seed=0):
    """A replicated Rainforth pair with a deliberately imperfect guide, and its data."""
    gen = torch.Generator().manual_seed(seed)
    mu = _randn(gen, dim)
    x0 = mu + math.sqrt(2.0) * _randn(gen, dim)
    # exact posterior: N((mu + x) / 2, I / 2); perturb every guide parameter
    a = 0.5 + 0.1 * _randn(gen, dim)
    b = mu / 2 + 0.1 * _randn(gen, dim)
    log_s = torch.full((dim,), 0.5 * math.log(2.0 / 3.0), dtype=F64)
    pair = ReplicatedGaussian(replicates, mu, a, b, log_s)
    return pair, x0.expand(replicates, dim).clone()


class BernoulliLatentPair:
    """Discrete latent: no reparameterized sampler."""

    def model(self, x, mask=None):
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", dist.Bernoulli(x.new_full((1,), 0.5)).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    def guide(self, x, mask=None):
        logit = pyro.param("logit", torch.zeros(1, dtype=x.dtype))
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", dist.Bernoulli(logits=logit.expand(x.shape[0], 1)).to_event(1))


# ----------------------------------------------------------------------------------------
# PPCA helpers (exact log p(x) and exact posterior)
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ppca_data():
    gen = torch.Generator().manual_seed(42)
    W = _randn(gen, 5, 2)
    return _randn(gen, 200, 2) @ W.T + 1.0 + 0.5 * _randn(gen, 200, 5)


def exact_ppca(X):
    """PPCA at its maximum-likelihood fit with the guide at the exact posterior (float64)."""
    return PPCA(5, 2).double().fit_closed_form(X)


def imperfect_ppca(X, weight_noise=0.05, scale_factor=1.3, seed=7):
    """The exact-posterior PPCA with a deliberately perturbed guide (model unchanged)."""
    model = exact_ppca(X)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.guide_weight = model.guide_weight + weight_noise * _randn(gen, 2, 5)
        model.guide_scale_tril = model.guide_scale_tril * scale_factor
    return model


def guide_param_names(module):
    return [n for n, _ in module.named_parameters() if n.startswith("guide_")]


def gradients_at_seed(objective, pair, x, seed, **kwargs):
    """(loss, {param name: gradient}) of ``objective.differentiable_loss`` at a seed."""
    pair.zero_grad(set_to_none=True)
    pyro.set_rng_seed(seed)
    loss = objective.differentiable_loss(pair.model, pair.guide, x, **kwargs)
    loss.backward()
    grads = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
             for n, p in pair.named_parameters()}
    return loss.detach(), grads


def mean_and_se(values):
    values = values.reshape(values.shape[0], -1)
    return values.mean(0), values.std(0) / math.sqrt(values.shape[0])


# ----------------------------------------------------------------------------------------
# pure bound functions
# ----------------------------------------------------------------------------------------
def test_bound_functions_follow_their_definitions():
    gen = torch.Generator().manual_seed(0)
    lw = 3.0 * _randn(gen, 7, 4)
    assert torch.allclose(elbo_from_log_weights(lw), lw.sum(0) / 7, rtol=1e-14)
    direct = torch.log(torch.exp(lw).mean(0))
    assert torch.allclose(iwae_from_log_weights(lw), direct, rtol=1e-12)
    # stable far from 0 (exp would overflow) and shifting every weight shifts the bound
    assert torch.allclose(iwae_from_log_weights(lw + 1000.0), direct + 1000.0, rtol=1e-14)
    # Jensen: IWAE >= ELBO for every point and every draw; equal for K = 1
    assert bool((iwae_from_log_weights(lw) >= elbo_from_log_weights(lw)).all())
    assert torch.equal(iwae_from_log_weights(lw[:1]), elbo_from_log_weights(lw[:1]))
    for fn in (elbo_from_log_weights, iwae_from_log_weights):
        with pytest.raises(ValueError, match="K >= 1"):
            fn(torch.empty(0, 3))
        with pytest.raises(ValueError, match="tensor"):
            fn([[0.0, 1.0]])


# ----------------------------------------------------------------------------------------
# agreement with ELBO and with Pyro's own estimators
# ----------------------------------------------------------------------------------------
def test_iwae_with_one_particle_equals_elbo_in_value_and_gradients():
    pair = DiagGaussianPair()
    x = pair.data(6)
    loss_elbo, grads_elbo = gradients_at_seed(ELBO(), pair, x, seed=3)
    loss_iwae, grads_iwae = gradients_at_seed(IWAE(1), pair, x, seed=3)
    assert torch.allclose(loss_iwae, loss_elbo, rtol=1e-13)
    for name in grads_elbo:
        assert torch.allclose(grads_iwae[name], grads_elbo[name], rtol=1e-11, atol=1e-13), name
    # and the reparameterized estimators coincide for one particle (w~ = w~^2 = 1/K = 1)
    _, grads_dreg = gradients_at_seed(IWAE(1, gradient="dreg"), pair, x, seed=3)
    _, grads_stl = gradients_at_seed(IWAE(1, gradient="stl"), pair, x, seed=3)
    _, grads_elbo_stl = gradients_at_seed(ELBO(gradient="stl"), pair, x, seed=3)
    for name in grads_dreg:
        assert torch.allclose(grads_dreg[name], grads_elbo_stl[name], rtol=1e-11, atol=1e-13)
        assert torch.allclose(grads_stl[name], grads_elbo_stl[name], rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("K", [1, 4, 32])
def test_iwae_equals_pyro_renyi_elbo_alpha0_and_elbo_equals_trace_elbo(K):
    """All latents in the data plate, no subsampling: Pyro's estimators are then per point too,
    and the vectorized particle plate draws the same values at the same seed."""
    pair = DiagGaussianPair()
    x = pair.data(6)
    pyro.set_rng_seed(11)
    ours = IWAE(K).loss(pair.model, pair.guide, x)
    pyro.set_rng_seed(11)
    ours_differentiable = IWAE(K).differentiable_loss(pair.model, pair.guide, x)
    pyro.set_rng_seed(11)
    renyi = pyro.infer.RenyiELBO(alpha=0, num_particles=K, vectorize_particles=True,
                                 max_plate_nesting=1).loss(pair.model, pair.guide, x)
    # RenyiELBO.loss = -sum_i (logsumexp_k log w_ki - log K), the same sign as ours
    assert ours == pytest.approx(renyi, rel=1e-12)
    assert float(ours_differentiable.detach()) == pytest.approx(renyi, rel=1e-12)

    pyro.set_rng_seed(12)
    ours_elbo = ELBO(K).loss(pair.model, pair.guide, x)
    pyro.set_rng_seed(12)
    trace_elbo = pyro.infer.Trace_ELBO(num_particles=K, vectorize_particles=True,
                                       max_plate_nesting=1).loss(pair.model, pair.guide, x)
    assert ours_elbo == pytest.approx(trace_elbo, rel=1e-12)


# ----------------------------------------------------------------------------------------
# bounds against the exact log-likelihood (PPCA)
# ----------------------------------------------------------------------------------------
def test_with_the_exact_posterior_every_bound_equals_the_exact_log_marginal(ppca_data):
    model = exact_ppca(ppca_data)
    x = ppca_data[:12]
    exact = model.log_marginal(x).detach()
    for K in (1, 5, 50):
        for objective in (ELBO(K), IWAE(K), ELBO(K, gradient="stl"), IWAE(K, gradient="dreg")):
            per_point = objective.bound_per_point(model.model, model.guide, x)
            assert torch.allclose(per_point, exact, rtol=0, atol=1e-10), objective.name
            loss = objective.differentiable_loss(model.model, model.guide, x)
            assert float(loss.detach()) == pytest.approx(-float(exact.sum()), rel=1e-12), \
                objective.name


def test_expected_iwae_increases_with_K_and_stays_below_the_exact_log_marginal(ppca_data):
    model = imperfect_ppca(ppca_data)
    x = ppca_data[:10]
    replicates = 400
    log_px = float(model.log_marginal(x).detach().mean())
    means, ses = {}, {}
    for K in (1, 5, 50):
        per_point = IWAE(K).bound_per_point(model.model, model.guide, x.repeat(replicates, 1))
        per_replicate = per_point.reshape(replicates, x.shape[0]).mean(1)  # mean over rows
        means[K] = float(per_replicate.mean())
        ses[K] = float(per_replicate.std()) / replicates ** 0.5
    for small, large in ((1, 5), (5, 50)):
        gap = means[large] - means[small]
        assert gap > Z_TOL * math.hypot(ses[small], ses[large]), (means, ses)
    for K in (1, 5, 50):
        # a lower bound on log p(x) in expectation (within Monte Carlo error)...
        assert means[K] - log_px < Z_TOL * ses[K], (K, means[K], ses[K], log_px)
    # ...and for this imperfect guide detectably below it at small K (the check has power)
    assert log_px - means[5] > Z_TOL * ses[5], (means, ses, log_px)


# ----------------------------------------------------------------------------------------
# minibatch scaling
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("objective", [ELBO(), IWAE(5)], ids=lambda o: o.name)
def test_minibatch_estimates_scaled_by_n_over_b_are_unbiased_for_the_full_data_bound(
        objective, ppca_data):
    model = imperfect_ppca(ppca_data)
    x = ppca_data[:40]
    num_data, batch = x.shape[0], 8
    # full-data bound sum_i E[bound_i], each row with 300 independent replicates
    replicates = 300
    per_row = objective.bound_per_point(model.model, model.guide, x.repeat(replicates, 1))
    row_mean, row_se = mean_and_se(per_row.reshape(replicates, num_data))
    full, full_se = float(row_mean.sum()), float(row_se.pow(2).sum().sqrt())

    # the N/B-scaled loss of a minibatch is -(N/B) * the sum of its per-row estimates
    for _ in range(3):
        rows = torch.randperm(num_data)[:batch]
        pyro.set_rng_seed(99)
        loss = objective.loss(model.model, model.guide, x[rows], num_data=num_data)
        pyro.set_rng_seed(99)
        per_point = objective.bound_per_point(model.model, model.guide, x[rows])
        assert loss == pytest.approx(-num_data / batch * float(per_point.sum()), rel=1e-12)

    # average of the scaled estimate over many uniformly random minibatches (vectorized:
    # rows of different minibatches are independent)
    num_batches = 3000
    rows = torch.stack([torch.randperm(num_data)[:batch] for _ in range(num_batches)])
    pyro.set_rng_seed(5)
    with torch.no_grad():
        lw = log_weights(model.model, model.guide, x[rows.reshape(-1)], objective.num_particles)
    bound = iwae_from_log_weights if isinstance(objective, IWAE) else elbo_from_log_weights
    estimates = (num_data / batch) * bound(lw).reshape(num_batches, batch).sum(1)
    mb_mean, mb_se = float(estimates.mean()), float(estimates.std()) / num_batches ** 0.5
    tolerance = Z_TOL * math.hypot(mb_se, full_se)
    assert abs(mb_mean - full) < tolerance, (mb_mean, full, tolerance)

    if isinstance(objective, IWAE):
        # the check has power: scaling inside the log-mean-exp (Pyro's RenyiELBO with
        # poutine.scale) is biased, and detected
        inside = iwae_from_log_weights((num_data / batch) * lw).reshape(num_batches, batch).sum(1)
        inside_se = float(inside.std()) / num_batches ** 0.5
        assert abs(float(inside.mean()) - full) > Z_TOL * math.hypot(inside_se, full_se)


def test_minibatches_of_a_partition_average_to_the_full_batch_bound_exactly(ppca_data):
    """With the exact posterior every per-row estimate equals log p(x_i) for every draw, so
    averaging the N/B-scaled estimates over a partition must reproduce the full-data value."""
    model = exact_ppca(ppca_data)
    x = ppca_data[:40]
    exact_total = float(model.log_marginal(x).detach().sum())
    order = torch.randperm(40)
    for objective in (ELBO(), ELBO(3), IWAE(4)):
        full = -objective.loss(model.model, model.guide, x)
        scaled = [-objective.loss(model.model, model.guide, x[part], num_data=40)
                  for part in order.reshape(5, 8)]
        assert sum(scaled) / len(scaled) == pytest.approx(full, rel=1e-12)
        assert full == pytest.approx(exact_total, rel=1e-12)


# ----------------------------------------------------------------------------------------
# gradient estimators
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("pair_cls", [DiagGaussianPair, HierarchicalPair])
@pytest.mark.parametrize("bound", ["iwae", "elbo"])
def test_surrogate_keeping_the_score_term_reproduces_the_standard_gradient(pair_cls, bound):
    """The DReG/STL construction differentiates through the draws with partial derivatives of
    log w at detached values; adding back the score term must give exactly the gradient of
    the Monte Carlo bound, also with dependent latent sites and a prior sharing parameters
    with the encoder."""
    pair = pair_cls()
    x = torch.randn(5, 4 if pair_cls is DiagGaussianPair else 3, dtype=F64)
    K = 6
    standard = IWAE(K) if bound == "iwae" else ELBO(K)
    loss_standard, grads_standard = gradients_at_seed(standard, pair, x, seed=21)

    pair.zero_grad(set_to_none=True)
    pyro.set_rng_seed(21)
    value, surrogate = _reparameterized_surrogate(pair.model, pair.guide, x, K, None,
                                                  bound=bound, estimator="standard",
                                                  keep_score=True)
    (-(value.sum().detach() + surrogate - surrogate.detach())).backward()
    assert float(-value.detach().sum()) == pytest.approx(float(loss_standard), rel=1e-13)
    for name, p in pair.named_parameters():
        assert torch.allclose(p.grad, grads_standard[name], rtol=1e-10, atol=1e-12), name


@pytest.mark.parametrize("pair_cls", [DiagGaussianPair, HierarchicalPair])
def test_model_gradients_are_the_standard_ones_for_every_estimator(pair_cls):
    pair = pair_cls()
    x = torch.randn(5, 4 if pair_cls is DiagGaussianPair else 3, dtype=F64)
    decoder = ["W_unconstrained", "mu_unconstrained", "log_s_unconstrained",
               "W1_unconstrained", "W2_unconstrained"]
    loss_std, grads_std = gradients_at_seed(IWAE(8), pair, x, seed=4)
    for gradient in ("dreg", "stl"):
        loss, grads = gradients_at_seed(IWAE(8, gradient=gradient), pair, x, seed=4)
        assert float(loss) == pytest.approx(float(loss_std), rel=1e-13)
        checked = [n for n in grads if n in decoder]
        assert checked
        for name in checked:
            assert torch.allclose(grads[name], grads_std[name], rtol=1e-10, atol=1e-12), name
        # ...while the guide gradients are a different estimator
        guide = [n for n in grads if n not in decoder]
        assert not all(torch.allclose(grads[n], grads_std[n]) for n in guide)


def test_dreg_is_unbiased_for_the_iwae_gradient_and_stl_for_the_elbo_gradient():
    """Paired comparison (same draws) over 4000 replicates of the single-point gradient."""
    replicates, K = 4000, 5
    pair, x = replicated_gaussian(replicates)

    def per_replicate(objective):
        pair.zero_grad(set_to_none=True)
        pyro.set_rng_seed(8)
        objective(pair.model, pair.guide, x).backward()
        return pair.guide_gradients()

    checks = [(IWAE(K), IWAE(K, gradient="dreg")), (ELBO(), ELBO(gradient="stl")),
              (ELBO(3), ELBO(3, gradient="stl"))]
    for reference, estimator in checks:
        ref, est = per_replicate(reference), per_replicate(estimator)
        for name in ref:
            diff_mean, diff_se = mean_and_se(est[name] - ref[name])
            z = (diff_mean / diff_se).abs()
            assert bool((z < Z_TOL).all()), (estimator.name, name, z)
    # power: STL is biased for IWAE with K > 1 (Tucker et al. 2019) and this check sees it
    ref, est = per_replicate(IWAE(K)), per_replicate(IWAE(K, gradient="stl"))
    diff_mean, diff_se = mean_and_se(est["b"] - ref["b"])
    assert float((diff_mean / diff_se).abs().max()) > Z_TOL


def test_encoder_gradient_snr_falls_with_K_for_standard_iwae_but_not_for_dreg():
    """Rainforth et al. (2018): SNR = |E g| / sd(g) of the standard IWAE encoder gradient
    decays like K^{-1/2}; DReG's grows (Tucker et al. 2019). Averaged over the encoder's
    location components, 2000 replicates each."""
    replicates = 2000
    pair, x = replicated_gaussian(replicates)
    snr = {}
    for gradient in ("standard", "dreg"):
        for K in (1, 10, 100):
            pair.zero_grad(set_to_none=True)
            pyro.set_rng_seed(K)
            IWAE(K, gradient=gradient)(pair.model, pair.guide, x).backward()
            g = pair.guide_gradients()["b"]
            snr[gradient, K] = float((g.mean(0).abs() / g.std(0)).mean())
    # an SNR estimated from 2000 replicates has a standard error of about
    # sqrt((1 + SNR^2 / 2) / 2000): 0.02 near 0, 0.1 at 6; the margins below are many SEs
    assert snr["standard", 10] < snr["standard", 1] / 1.5, snr
    assert snr["standard", 100] < snr["standard", 1] / 3, snr
    assert snr["dreg", 10] > 1.5 * snr["dreg", 1], snr
    assert snr["dreg", 100] > 1.5 * snr["dreg", 10], snr
    assert snr["dreg", 100] > 10 * snr["standard", 100], snr


def test_stl_and_dreg_guide_gradients_vanish_at_the_exact_posterior(ppca_data):
    model = exact_ppca(ppca_data)
    x = ppca_data[:10]
    guide_names = guide_param_names(model)
    for objective in (ELBO(3, gradient="stl"), IWAE(5, gradient="stl"), IWAE(5, gradient="dreg")):
        _, grads = gradients_at_seed(objective, model, x, seed=2)
        for name in guide_names:
            assert float(grads[name].abs().max()) < 1e-10, (objective.name, name)
        assert any(float(grads[n].abs().max()) > 1e-3 for n in grads if n not in guide_names)
    # the standard estimators are noisy there (the score term), so the check can fail
    for objective in (ELBO(3), IWAE(5)):
        _, grads = gradients_at_seed(objective, model, x, seed=2)
        assert max(float(grads[n].abs().max()) for n in guide_names) > 1e-3, objective.name


# ----------------------------------------------------------------------------------------
# analytic KL and beta
# ----------------------------------------------------------------------------------------
def test_analytic_kl_uses_the_closed_form_gaussian_kl_and_beta_weights_it(ppca_data):
    pair = DiagGaussianPair()
    x = pair.data(5)
    with torch.no_grad():
        loc, var = pair.guide_loc(x), pair.scale ** 2
        kl = 0.5 * (var + loc ** 2 - 1.0 - var.log()).sum(-1)
    for beta in (1.0, 0.3):
        pyro.set_rng_seed(6)
        analytic = ELBO(3, analytic_kl=True, beta=beta).bound_per_point(pair.model, pair.guide, x)
        pyro.set_rng_seed(6)
        terms = trace_log_terms(pair.model, pair.guide, x, 3)
        assert torch.allclose(analytic, terms.log_lik.mean(0).detach() - beta * kl, rtol=1e-12)
        # beta on the Monte Carlo ELBO: E[log p(x|z)] + beta E[log p(z) - log q(z|x)]
        pyro.set_rng_seed(6)
        mc = ELBO(3, beta=beta).bound_per_point(pair.model, pair.guide, x)
        expected = (terms.log_lik + beta * (terms.log_prior - terms.log_q)).mean(0).detach()
        assert torch.allclose(mc, expected, rtol=1e-12)

    # full-covariance guide (PPCA) against the standard normal prior: no torch registration,
    # handled in closed form (and without a warning: warnings are errors in this suite)
    model = imperfect_ppca(ppca_data)
    x = ppca_data[:5]
    with torch.no_grad():
        loc = x @ model.guide_weight.T + model.guide_bias
        cov = model.guide_scale_tril @ model.guide_scale_tril.T
        kl = 0.5 * (torch.trace(cov) + (loc ** 2).sum(-1) - 2 - torch.logdet(cov))
    pyro.set_rng_seed(6)
    analytic = ELBO(2, analytic_kl=True).bound_per_point(model.model, model.guide, x)
    pyro.set_rng_seed(6)
    terms = trace_log_terms(model.model, model.guide, x, 2)
    assert torch.allclose(analytic, terms.log_lik.mean(0).detach() - kl, rtol=1e-12)


def test_analytic_kl_elbo_equals_monte_carlo_elbo_in_expectation():
    """Paired at the same seed (same draws, so the log-likelihood terms cancel): the
    difference per replicate is log p(z) - log q(z|x) + KL(q || p), of mean zero."""
    pair = DiagGaussianPair()
    x = pair.data(3)
    replicates = 2000
    xr = x.repeat(replicates, 1)
    per_point = {}
    for analytic in (False, True):
        pyro.set_rng_seed(17)
        per_point[analytic] = ELBO(analytic_kl=analytic).bound_per_point(pair.model, pair.guide, xr)
    diff = (per_point[True] - per_point[False]).reshape(replicates, 3)
    diff_mean, diff_se = mean_and_se(diff)
    assert bool(((diff_mean / diff_se).abs() < Z_TOL).all()), (diff_mean, diff_se)
    # power: dropping (or doubling) the KL would be detected
    with torch.no_grad():
        loc, var = pair.guide_loc(x), pair.scale ** 2
        kl = 0.5 * (var + loc ** 2 - 1.0 - var.log()).sum(-1)
    assert bool((kl > 2 * Z_TOL * diff_se).all()), (kl, diff_se)


def test_analytic_kl_falls_back_to_monte_carlo_and_warns_once_per_objective():
    pair = DiagGaussianPair(prior="mixture")
    x = pair.data(4)
    objective = ELBO(2, analytic_kl=True)
    with pytest.warns(UserWarning, match=r"latent site 'z'.*MixtureSameFamily") as record:
        pyro.set_rng_seed(1)
        first = objective.loss(pair.model, pair.guide, x)
        second = objective.loss(pair.model, pair.guide, x)
        objective.differentiable_loss(pair.model, pair.guide, x).backward()
    assert len([w for w in record if issubclass(w.category, UserWarning)]) == 1
    pyro.set_rng_seed(1)
    assert first == pytest.approx(ELBO(2).loss(pair.model, pair.guide, x), rel=1e-13)
    assert second != first  # fresh draws, no caching
    with pytest.warns(UserWarning, match="'z'"):  # a new objective says it again
        ELBO(analytic_kl=True).loss(pair.model, pair.guide, x)


def test_beta_is_validated_and_not_defined_for_iwae():
    objective = ELBO()
    objective.beta = 0.5
    assert objective.beta == 0.5
    for bad in (-0.1, float("nan"), float("inf"), "1"):
        with pytest.raises(ValueError, match="beta"):
            objective.beta = bad
    iwae = IWAE(5)
    iwae.beta = 1.0
    assert iwae.beta == 1.0
    with pytest.raises(ValueError, match="IWAE"):
        iwae.beta = 0.5


# ----------------------------------------------------------------------------------------
# KL warm-up
# ----------------------------------------------------------------------------------------
def test_linear_warmup_schedule():
    assert [linear_warmup(t, 8) for t in range(11)] == [min(1.0, t / 8) for t in range(11)]
    assert linear_warmup(0, 1) == 0.0 and linear_warmup(5, 1) == 1.0
    for step, total in ((-1, 8), (0, 0), (0, -3), (0, float("nan"))):
        with pytest.raises(ValueError):
            linear_warmup(step, total)


def test_kl_warmup_callback_sets_and_logs_beta_per_step():
    logged = []
    state = SimpleNamespace(objective=ELBO(), global_step=0, steps_per_epoch=4,
                            log=lambda key, value: logged.append((key, value)))
    callback = KLWarmup(epochs=2)
    callback.on_fit_start(state)
    assert state.objective.beta == 0.0
    betas = []
    for step in range(11):
        state.global_step = step
        callback.on_step_start(state)
        betas.append(state.objective.beta)
    assert betas == [min(1.0, t / 8) for t in range(11)]
    assert logged == [("beta", b) for b in betas]

    with pytest.raises(ValueError, match="importance-weighted"):
        callback.on_step_start(SimpleNamespace(objective=IWAE(5), global_step=0,
                                               steps_per_epoch=4))
    with pytest.raises(ValueError, match="Trace_ELBO"):
        callback.on_fit_start(SimpleNamespace(objective=pyro.infer.Trace_ELBO()))
    for bad in (0, -1, "2"):
        with pytest.raises(ValueError, match="epochs"):
            KLWarmup(bad)


def test_kl_warmup_drives_beta_in_fit(ppca_data):
    model = exact_ppca(ppca_data)
    objective = ELBO()
    result = fit(model, ppca_data[:60], objective=objective, epochs=3, batch_size=20, lr=1e-3,
                 callbacks=[KLWarmup(epochs=2)], progress=False, device="cpu")
    # 3 steps per epoch, warm-up over 6 steps; the row keeps the epoch's last value
    assert list(result.history["beta"]) == pytest.approx([2 / 6, 5 / 6, 1.0])
    assert objective.beta == 1.0


# ----------------------------------------------------------------------------------------
# training: fit, a plain torch loop, Pyro's SVI
# ----------------------------------------------------------------------------------------
def _exact_log_px(model, X):
    with torch.no_grad():
        return float(model.log_marginal(X).mean())


@pytest.mark.parametrize("objective", [ELBO(), ELBO(analytic_kl=True), IWAE(5, gradient="dreg")],
                         ids=lambda o: o.name)
def test_objectives_train_a_model_in_fit(objective, ppca_data):
    model = PPCA(5, 2).double()
    before = _exact_log_px(model, ppca_data)
    result = fit(model, ppca_data, objective=objective, epochs=8, batch_size=50, lr=0.05,
                 progress=False, device="cpu")
    assert result.objective_name == objective.name
    after = _exact_log_px(result.model, ppca_data)
    assert after > before + 1.0, (before, after)
    history = result.history["train_objective"]
    assert history.iloc[-1] > history.iloc[0]


@pytest.mark.parametrize("objective", [ELBO(2, gradient="stl"), IWAE(5), IWAE(5, gradient="stl")],
                         ids=lambda o: o.name)
def test_objectives_are_plain_torch_losses(objective, ppca_data):
    model = PPCA(5, 2).double()
    x = ppca_data[:100]
    before = _exact_log_px(model, x)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(40):
        optimizer.zero_grad()
        objective(model.model, model.guide, x).backward()
        optimizer.step()
    assert _exact_log_px(model, x) > before + 1.0


def test_objectives_work_as_pyro_svi_losses(ppca_data):
    model = PPCA(5, 2).double()
    x = ppca_data[:100]
    before = _exact_log_px(model, x)
    svi = pyro.infer.SVI(model.model, model.guide, pyro.optim.Adam({"lr": 0.05}),
                         loss=IWAE(3, gradient="dreg"))
    for _ in range(40):
        loss = svi.step(x)
    assert math.isfinite(loss)
    assert _exact_log_px(model, x) > before + 1.0


# ----------------------------------------------------------------------------------------
# masks, names, errors
# ----------------------------------------------------------------------------------------
def test_mask_is_passed_to_model_and_guide(ppca_data):
    model = imperfect_ppca(ppca_data)
    x = ppca_data[:6].clone()
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[0, 1] = mask[3, 4] = False
    x[0, 1] = float("nan")  # masked entries may hold NaN
    losses = {}
    for name, objective in (("iwae", IWAE(4)), ("dreg", IWAE(4, gradient="dreg")),
                            ("elbo", ELBO(2, analytic_kl=True))):
        pyro.set_rng_seed(3)
        losses[name] = objective.loss(model.model, model.guide, x, mask=mask)
        pyro.set_rng_seed(3)
        differentiable = objective(model.model, model.guide, x, mask=mask)
        assert math.isfinite(losses[name])
        assert float(differentiable.detach()) == pytest.approx(losses[name], rel=1e-12)
    pyro.set_rng_seed(3)
    lw = log_weights(model.model, model.guide, x, 4, mask=mask).detach()
    assert losses["iwae"] == pytest.approx(-float(iwae_from_log_weights(lw).sum()), rel=1e-12)
    # masked entries are ignored whatever they hold; unmasked, the same values change the loss
    filled = torch.where(mask, x, torch.full_like(x, 100.0))
    pyro.set_rng_seed(3)
    assert IWAE(4).loss(model.model, model.guide, filled, mask=mask) == pytest.approx(
        losses["iwae"], rel=1e-12)
    pyro.set_rng_seed(3)
    assert IWAE(4).loss(model.model, model.guide, filled) > losses["iwae"] + 100


def test_names_and_repr():
    assert ELBO().name == "elbo"
    assert ELBO(5, analytic_kl=True).name == "elbo_5_analytic_kl"
    assert ELBO(gradient="stl").name == "elbo_stl"
    assert IWAE(5).name == "iwae_5"
    assert IWAE(50, gradient="dreg").name == "iwae_50_dreg"
    assert "gradient='dreg'" in repr(IWAE(50, gradient="dreg"))
    assert ELBO.pyro_lvm_objective and IWAE.pyro_lvm_objective


def test_invalid_arguments_raise_errors_that_name_the_problem():
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="num_particles"):
            IWAE(bad)
    with pytest.raises(ValueError, match="gradient"):
        IWAE(5, gradient="reinforce")
    with pytest.raises(ValueError, match="reduces to gradient='stl'"):
        ELBO(gradient="dreg")
    with pytest.raises(ValueError, match="gradient"):
        ELBO(gradient="reinforce")
    with pytest.raises(ValueError, match="analytic_kl"):
        ELBO(analytic_kl=True, gradient="stl")
    with pytest.raises(ValueError, match="beta"):
        ELBO(beta=-1.0)
    pair = DiagGaussianPair()
    x = pair.data(6)
    with pytest.raises(ValueError, match="num_data=4 is smaller than the minibatch size 6"):
        IWAE(2).loss(pair.model, pair.guide, x, num_data=4)
    with pytest.raises(ValueError, match="num_data"):
        IWAE(2).differentiable_loss(pair.model, pair.guide, x, num_data=10.5)
    with pytest.raises(ValueError, match="torch.Tensor"):
        ELBO().loss(pair.model, pair.guide, x.numpy())


def test_non_reparameterized_latent_is_refused_for_gradients_but_scored_for_values():
    pair = BernoulliLatentPair()
    x = torch.randn(4, 1, dtype=F64)
    assert math.isfinite(IWAE(3).loss(pair.model, pair.guide, x))
    for objective in (ELBO(), IWAE(3), IWAE(3, gradient="dreg"), ELBO(gradient="stl")):
        with pytest.raises(ValueError, match=r"guide site 'z' \(Independent\).*reparameterized"):
            objective.differentiable_loss(pair.model, pair.guide, x)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_objectives_run_on_cuda():
    pair = DiagGaussianPair().to("cuda")
    x = pair.data(8).to("cuda")
    for objective in (ELBO(2, analytic_kl=True), ELBO(gradient="stl"), IWAE(5),
                      IWAE(5, gradient="dreg")):
        pair.zero_grad(set_to_none=True)
        loss = objective(pair.model, pair.guide, x, num_data=100)
        loss.backward()
        assert loss.device.type == "cuda" and math.isfinite(float(loss.detach()))
        assert all(p.grad is not None and p.grad.device.type == "cuda"
                   for p in pair.parameters())


def test_parameter_statements_stop_at_the_objectives_own_handler_unless_an_outer_one_listens(
        monkeypatch):
    """With no handler outside the objective, ``pyro.param`` / ``pyro.module`` statements are
    answered by ``_StoredParams`` (the recorder and the particle plate never see them); under
    an outer handler (Pyro's SVI, ``poutine.trace(param_only=True)``) every statement reaches
    it as usual. Both give the same loss and gradients."""
    import pyro.poutine as poutine

    # patched on the class, where it is defined (pyro_lvm.inference.importance_weights)
    from pyro_lvm.inference.importance_weights import _StoredParams

    answered = []
    original = _StoredParams._pyro_param
    monkeypatch.setattr(_StoredParams, "_pyro_param",
                        lambda self, msg: (answered.append(msg["name"]), original(self, msg)))

    class UserPair(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dec = torch.nn.Linear(2, 3)

        def model(self, x, mask=None):
            pyro.module("dec", self.dec)
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
                pyro.sample("x", dist.Normal(self.dec(z), 1.0).to_event(1), obs=x)

        def guide(self, x, mask=None):
            loc = pyro.param("q_loc", lambda: x.new_zeros(x.shape[0], 2))
            with pyro.plate("data", x.shape[0]):
                pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))

    pyro.clear_param_store()
    pair, x = UserPair(), torch.randn(4, 3)
    ELBO().loss(pair.model, pair.guide, x)  # creates the parameters
    results = []
    for outer in (False, True):
        answered.clear()
        pyro.set_rng_seed(0)
        pair.dec.zero_grad()
        if outer:
            with poutine.trace(param_only=True) as capture:
                loss = ELBO().differentiable_loss(pair.model, pair.guide, x)
            assert {"dec$$$weight", "dec$$$bias", "q_loc"} <= set(capture.trace.nodes)
            assert answered == []
        else:
            loss = ELBO().differentiable_loss(pair.model, pair.guide, x)
            assert sorted(answered) == ["dec$$$bias", "dec$$$weight", "q_loc"]
        loss.backward()
        results.append((loss.detach(), pair.dec.weight.grad.clone()))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    pyro.clear_param_store()


def test_the_particle_plate_is_built_once_and_is_free_again_after_an_error():
    """The particle plate object is reused across runs (building one sends a message through
    the handler stack); its dim is released when the pair raises, and an outer handler sees
    the particle frame on every site as with a fresh plate."""
    import pyro.poutine as poutine
    from pyro_lvm.inference import importance_weights as iw

    assert iw._particle_plate(3) is iw._particle_plate(3)
    assert iw._particle_plate(4) is not iw._particle_plate(3)
    x = torch.randn(5, 2)

    def model(x, mask=None):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    def guide(x, mask=None):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.5 * x, 0.8).to_event(1))

    def failing_guide(x, mask=None):
        guide(x)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        iw.log_weights(model, failing_guide, x, 3)

    class Frames(poutine.messenger.Messenger):  # an outer handler (the guide and the model
        def __init__(self):                       # both have a site "z")
            super().__init__()
            self.seen = []

        def _pyro_sample(self, msg):
            if msg["name"] == "z":
                self.seen.append({(f.name, f.dim, f.size) for f in msg["cond_indep_stack"]})

    with Frames() as outer:
        lw = iw.log_weights(model, guide, x, 3)
    assert lw.shape == (3, 5) and bool(torch.isfinite(lw).all())
    assert outer.seen == [{(iw.PARTICLE_PLATE, -2, 3), ("data", -1, 5)}] * 2
    # the same weights as Pyro's own vectorized particles at the same seed (fresh plates)
    pyro.set_rng_seed(9)
    ours = iw.log_weights(model, guide, x, 3)
    pyro.set_rng_seed(9)
    with pyro.plate(iw.PARTICLE_PLATE, 3, dim=-2):
        gtr = poutine.trace(guide).get_trace(x)
        mtr = poutine.trace(poutine.replay(model, trace=gtr)).get_trace(x)
    ref = (mtr.nodes["x"]["fn"].log_prob(x) + mtr.nodes["z"]["fn"].log_prob(gtr.nodes["z"]["value"])
           - gtr.nodes["z"]["fn"].log_prob(gtr.nodes["z"]["value"]))
    torch.testing.assert_close(ours, ref)


def test_full_plates_indices_are_answered_innermost_and_subsampling_plates_are_replayed():
    """With no outer handler, the subsample message of a plate without subsampling is answered
    by the innermost frame (its indices 0..n-1; the site is not recorded); a plate that
    subsamples goes through the recorder, so the model sees the guide's indices. Weights equal
    those computed with an outer handler (every message through every frame)."""
    import pyro.poutine as poutine
    from pyro.poutine.util import site_is_subsample
    from pyro_lvm.inference import importance_weights as iw

    x = torch.randn(6, 2)
    seen = {}

    def pair(subsample_size):
        def model(x, mask=None):
            with pyro.plate("data", x.shape[0], subsample_size=subsample_size) as idx:
                seen["model"] = idx
                z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
                pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x[idx])

        def guide(x, mask=None):
            with pyro.plate("data", x.shape[0], subsample_size=subsample_size) as idx:
                seen["guide"] = idx
                pyro.sample("z", dist.Normal(0.5 * x[idx], 0.7).to_event(1))
        return model, guide

    model, guide = pair(None)
    pyro.set_rng_seed(3)
    terms = iw.trace_log_terms(model, guide, x, 2)
    assert torch.equal(seen["model"], torch.arange(6)) and torch.equal(seen["guide"],
                                                                          torch.arange(6))
    assert not any(site_is_subsample(site) for site in terms.guide_trace.nodes.values())
    pyro.set_rng_seed(3)
    with poutine.block():  # an outer handler: every message through every frame
        reference = iw.trace_log_terms(model, guide, x, 2)
    # positive control: there the plate's site is recorded
    assert [n for n, s in reference.guide_trace.nodes.items() if site_is_subsample(s)] == ["data"]
    torch.testing.assert_close(terms.log_weights, reference.log_weights, rtol=0, atol=0)
    # a subsampling plate: recorded in the guide and replayed into the model
    model, guide = pair(4)
    for seed in range(5):
        pyro.set_rng_seed(seed)
        guide_trace = iw._record(guide, x, 2, None)
        iw._record(model, x, 2, None, replay=guide_trace, enumerate_sites=True)
        assert "data" in guide_trace.nodes and len(seen["guide"]) == 4
        assert torch.equal(seen["model"], seen["guide"])


def test_a_guide_plate_with_explicit_indices_is_replayed_into_the_model():
    """A guide plate given all rows in another order (``subsample=perm``) is recorded and its
    indices replayed into the model's full plate, with or without an outer handler (as
    ``poutine.replay``)."""
    import pyro.poutine as poutine
    from pyro_lvm.inference import importance_weights as iw

    x = torch.arange(12.).reshape(6, 2)
    perm = torch.tensor([3, 1, 5, 0, 2, 4])
    seen = {}

    def guide(x, mask=None):
        with pyro.plate("data", x.shape[0], subsample=perm) as idx:
            pyro.sample("z", dist.Normal(x[idx], 0.1).to_event(1))

    def model(x, mask=None):
        with pyro.plate("data", x.shape[0]) as idx:
            seen["model"] = idx
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 10.).to_event(1))
            pyro.sample("x", dist.Normal(z, 0.1).to_event(1), obs=x[idx])

    pyro.set_rng_seed(0)
    quiet = iw.log_weights(model, guide, x, 2)
    assert torch.equal(seen["model"], perm)
    pyro.set_rng_seed(0)
    with poutine.block():
        loud = iw.log_weights(model, guide, x, 2)
    assert torch.equal(seen["model"], perm)
    torch.testing.assert_close(quiet, loud, rtol=0, atol=0)


def test_the_dlvm_model_with_another_guide_passes_pyros_model_guide_check():
    """The DLVM builds its data plate on every call, so its traces hold the plate's site like
    any guide's (Pyro's validation warns about a plate in the guide but not in the model)."""
    import pyro.poutine as poutine
    from pyro_lvm.models.dlvm import DLVM
    from pyro_lvm.models.flows import IAFGuide

    model, flow = DLVM(5, 2, hidden=(4,)), IAFGuide(5, 2, hidden=(4,))
    x = (torch.rand(7, 5) < 0.5).float()
    with pyro.validation_enabled(True):  # warnings are errors in this suite
        for _ in range(2):
            pyro.infer.Trace_ELBO().loss(model.model, flow.guide, x)
            pyro.infer.Trace_ELBO().loss(model.model, model.guide, x[:3])
    for rows in (7, 3, 7):
        tr = poutine.trace(model.model).get_trace(x[:rows])
        assert tr.nodes["data"]["type"] == "sample"
        assert [(f.name, f.size) for f in tr.nodes["x"]["cond_indep_stack"]] == [("data", rows)]


# ----------------------------------------------------------------------------------------
# one particle: the standard estimator runs the pair without the particle plate
# ----------------------------------------------------------------------------------------
def _gmm_model(x, mask=None):
    weights = pyro.param("weights", lambda: x.new_tensor([0.2, 0.3, 0.5]),
                         constraint=constraints.simplex)
    locs = pyro.param("locs", lambda: x.new_tensor([[-1.0, 1.0], [1.0, 1.0], [1.0, -1.0]]))
    with pyro.plate("data", x.shape[0], dim=-1):
        c = pyro.sample("component", dist.Categorical(weights), infer={"enumerate": "parallel"})
        z = pyro.sample("z", dist.Normal(locs[c], 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, 0.5).to_event(1), obs=x)


def _gmm_guide(x, mask=None):
    shift = pyro.param("shift", lambda: x.new_zeros(2))
    with pyro.plate("data", x.shape[0], dim=-1):
        pyro.sample("z", dist.Normal(0.8 * x + shift, 0.6).to_event(1))


def _one_particle_pairs():
    from pyro_lvm.models.dlvm import DLVM

    torch.manual_seed(0)
    binary = (torch.rand(12, 10) < 0.4).float()
    real = torch.randn(12, 3, dtype=F64)
    mask = torch.rand(12, 10) < 0.8
    return [
        ("DLVM normal", DLVM(10, 2, hidden=(8,)), binary, None),
        ("DLVM normal, mask", DLVM(10, 2, hidden=(8,)), binary, mask),
        ("DLVM mixture", DLVM(10, 2, hidden=(8,), prior="mixture", num_components=3), binary,
         None),
        ("DLVM vamp", DLVM(10, 2, hidden=(8,), prior="vamp", num_pseudo_inputs=4), binary, None),
        ("two dependent latents", HierarchicalPair(), real, None),
        ("enumerated component", SimpleNamespace(model=_gmm_model, guide=_gmm_guide),
         torch.randn(12, 2, dtype=F64), None),
    ]


def _loss_and_grads(objective, pair, x, mask, seed, scored):
    """``objective``'s training loss on ``x`` at ``seed`` and the gradients of every parameter
    (module parameters and the param store's), computed by ``scored``."""
    pyro.set_rng_seed(seed)
    loss = scored(pair, x, mask)
    params = [p for _, p in sorted(pyro.get_param_store().named_parameters())]
    if isinstance(pair, torch.nn.Module):
        params += list(pair.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss.detach(), [g for g in grads if g is not None]


@pytest.mark.filterwarnings("ignore:.*no closed-form KL:UserWarning")  # mixture, VampPrior
@pytest.mark.parametrize("objective", [ELBO(), ELBO(analytic_kl=True), ELBO(beta=0.3), IWAE(1)],
                         ids=["elbo", "elbo_analytic_kl", "elbo_beta", "iwae_1"])
def test_one_particle_leaves_out_the_particle_plate_with_the_same_loss_and_gradients(objective):
    """With one particle the standard estimator runs the pair without the particle plate (as
    Pyro's Trace_ELBO does); its loss and every gradient equal those computed, on the same
    draws, from the generic path that keeps the plate (``trace_log_terms``), bit for bit for
    these built-in and user pairs, a mask, an enumerated discrete site, analytic KL and a KL
    weight (in general up to floating-point rounding: next test)."""
    from pyro_lvm.inference import importance_weights as iw

    def with_plate(pair, x, mask):
        terms = trace_log_terms(pair.model, pair.guide, x, 1, mask)
        bound = (elbo_from_log_weights(objective._integrand(terms))
                 if isinstance(objective, ELBO) else iwae_from_log_weights(terms.log_weights))
        return -(40 / x.shape[0]) * bound.sum()

    def fitted(pair, x, mask):
        return objective.differentiable_loss(pair.model, pair.guide, x, mask=mask, num_data=40)

    for name, pair, x, mask in _one_particle_pairs():
        if name == "enumerated component" and objective.name == "elbo_analytic_kl":
            continue  # refused with enumerated sites (tested elsewhere)
        with pyro.get_param_store().scope(), pyro.validation_enabled(True):
            ours, ours_grads = _loss_and_grads(objective, pair, x, mask, 3, fitted)
            reference, reference_grads = _loss_and_grads(objective, pair, x, mask, 3, with_plate)
            other_seed, _ = _loss_and_grads(objective, pair, x, mask, 4, fitted)
            # the runs really differ: the sites' values have no particle dim without the plate
            with _ValueShapes() as plain:
                fitted(pair, x, mask)
            with _ValueShapes() as plated:
                with_plate(pair, x, mask)
        assert torch.equal(ours, reference), name
        assert len(ours_grads) == len(reference_grads) > 0, name
        for got, want in zip(ours_grads, reference_grads):
            assert torch.equal(got, want), name
        assert not torch.equal(ours, other_seed), name  # positive control: the draws matter
        latent = [(site, shape) for site, shape in plain.shapes if site in ("z", "z1", "z2")]
        assert latent and len(plain.shapes) == len(plated.shapes), name
        for (site, shape), (plated_site, plated_shape) in zip(plain.shapes, plated.shapes):
            assert site == plated_site and plated_shape == (1,) + shape, (name, site)


def _transposed_matmul_pair():
    """A decoder written ``W @ z.mT``: with the particle plate torch multiplies a 2-D by a 3-D
    tensor, whose rounding differs from the 2-D product without it."""
    def model(x, mask=None):
        weight = pyro.param("W", lambda: torch.linspace(-1, 1, 30).reshape(10, 3))
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))
            pyro.sample("x", dist.Normal((weight @ z.mT).mT, 0.5).to_event(1), obs=x)

    def guide(x, mask=None):
        a = pyro.param("A", lambda: torch.linspace(-0.1, 0.1, 30).reshape(3, 10))
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", dist.Normal(x @ a.T, 0.6).to_event(1))

    return SimpleNamespace(model=model, guide=guide)


@pytest.mark.parametrize("objective", [ELBO(), IWAE(1)], ids=["elbo", "iwae_1"])
def test_one_particle_without_the_plate_equals_the_plate_path_up_to_rounding(objective):
    """Without the plate a site's parameters broadcast through one expand less (the gradient of
    an enumerated Categorical's logits then sums its rows in another order) and a matmul may run
    a 2-D instead of a batched kernel: loss and gradients agree to rounding, not bit for bit."""
    from pyro_lvm.models import BernoulliMixture

    def with_plate(pair, x, mask):
        return -elbo_from_log_weights(trace_log_terms(pair.model, pair.guide, x, 1).log_weights
                                      ).sum()

    def fitted(pair, x, mask):
        return objective.differentiable_loss(pair.model, pair.guide, x)

    torch.manual_seed(1)
    cases = [("BernoulliMixture", BernoulliMixture(12, 3), (torch.rand(40, 12) < 0.4).float()),
             ("W @ z.mT", _transposed_matmul_pair(), torch.randn(19, 10))]
    differs = 0
    for name, pair, x in cases:
        with pyro.get_param_store().scope():
            ours, ours_grads = _loss_and_grads(objective, pair, x, None, 0, fitted)
            reference, reference_grads = _loss_and_grads(objective, pair, x, None, 0, with_plate)
        assert torch.allclose(ours, reference, rtol=1e-6), name
        assert len(ours_grads) == len(reference_grads) > 0, name
        for got, want in zip(ours_grads, reference_grads):
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max()), name
        differs += not (torch.equal(ours, reference)
                        and all(map(torch.equal, ours_grads, reference_grads)))
    assert differs == len(cases)  # both really differ in the last bits (the claim is rounding)


class _ValueShapes(pyro.poutine.messenger.Messenger):
    """Records the value shape of every drawn latent site (outside the objective's handlers;
    not the observed sites, the plates' indices or the enumerated values)."""

    def __enter__(self):
        self.shapes = []
        return super().__enter__()

    def _pyro_post_sample(self, msg):
        if not (msg["is_observed"] or msg["name"] == "data"
                or "_enumerate_dim" in msg["infer"]):
            self.shapes.append((msg["name"], tuple(msg["value"].shape)))
