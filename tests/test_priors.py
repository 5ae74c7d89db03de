"""Priors: sampling agrees with log_prob (goodness of fit), mixture log_prob by hand, the
VampPrior shares the encoder, errors name the problem."""
import copy

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import logsumexp

from pyro_lvm.models.networks import mlp
from pyro_lvm.models.priors import (MixturePrior, Prior, StandardNormalPrior, VampPrior, make_prior)

# Goodness-of-fit tests run at a fixed seed; a correct sampler fails one with probability
# 1e-3, and the seed is fixed, so the outcome is deterministic.
GOF_LEVEL = 1e-3


def _perturbed_mixture(latent_dim, num_components=4):
    prior = MixturePrior(latent_dim, num_components=num_components, init_spread=2.0)
    with torch.no_grad():
        prior.logits.copy_(torch.randn(num_components))
        prior.raw_scales.copy_(torch.randn(num_components, latent_dim) * 0.5)
    return prior


class _Encoder(torch.nn.Module):
    """A small stand-alone encoder u -> (loc, scale), as a DLVM would supply."""

    def __init__(self, data_dim, latent_dim):
        super().__init__()
        self.net = mlp(data_dim, (8,), 2 * latent_dim)
        self.latent_dim = latent_dim

    def forward(self, u):
        out = self.net(u)
        return out[..., :self.latent_dim], torch.nn.functional.softplus(out[..., self.latent_dim:]) + 0.1


def _vamp(latent_dim, data_dim=3, k=6):
    enc = _Encoder(data_dim, latent_dim)
    return VampPrior(latent_dim, data_dim, num_pseudo_inputs=k, encoder_fn=enc), enc


def _make(kind, latent_dim):
    if kind == "normal":
        return StandardNormalPrior(latent_dim)
    if kind == "mixture":
        return _perturbed_mixture(latent_dim)
    return _vamp(latent_dim)[0]


def _components(prior):
    """(weights [K], loc [K, d], scale [K, d]) as float64 numpy, for hand computations."""
    if isinstance(prior, StandardNormalPrior):
        d = prior.latent_dim
        return np.ones(1), np.zeros((1, d)), np.ones((1, d))
    w, loc, scale = prior.mixture_components()
    return tuple(t.detach().double().numpy() for t in (w, loc, scale))


def _hand_log_prob(prior, z):
    """log sum_k w_k prod_j N(z_j; m_kj, s_kj), computed in float64 with scipy."""
    w, loc, scale = _components(prior)
    z = z.detach().double().numpy()
    comp = stats.norm.logpdf(z[:, None, :], loc[None], scale[None]).sum(-1)  # [n, K]
    return logsumexp(comp + np.log(w)[None], axis=1)


@pytest.mark.parametrize("kind", ["normal", "mixture", "vamp"])
def test_log_prob_equals_hand_computed_logsumexp(kind):
    prior = _make(kind, latent_dim=3)
    z = 2 * torch.randn(50, 3)
    np.testing.assert_allclose(prior.log_prob(z).detach().numpy(), _hand_log_prob(prior, z),
                               rtol=1e-5, atol=1e-4)


def test_log_prob_broadcasts_over_leading_dims():
    prior = _perturbed_mixture(2)
    z = torch.randn(4, 5, 2)
    lp = prior.log_prob(z)
    assert lp.shape == (4, 5)
    np.testing.assert_allclose(lp.reshape(-1).detach().numpy(),
                               _hand_log_prob(prior, z.reshape(-1, 2)), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind", ["normal", "mixture", "vamp"])
def test_sample_marginals_match_log_prob_marginal_cdf(kind):
    """Kolmogorov-Smirnov test of each 1-D marginal of ``sample`` against the marginal CDF
    implied by the prior's parameters, F_j(t) = sum_k w_k Phi((t - m_kj) / s_kj)."""
    prior = _make(kind, latent_dim=3)
    z = prior.sample(4000)
    assert z.shape == (4000, 3)
    w, loc, scale = _components(prior)
    for j in range(3):
        cdf = lambda t, j=j: (w[None] * stats.norm.cdf((np.asarray(t)[:, None] - loc[None, :, j])
                                                       / scale[None, :, j])).sum(1)
        p_value = stats.kstest(z[:, j].numpy(), cdf).pvalue
        assert p_value > GOF_LEVEL, f"{kind} prior, marginal {j}: KS p = {p_value:.2e}"


@pytest.mark.parametrize("kind", ["normal", "mixture", "vamp"])
def test_sample_matches_exp_log_prob_on_a_2d_grid(kind):
    """Chi-square test in 2-D: counts of ``sample`` in grid cells against the cell
    probabilities obtained by integrating exp(log_prob) (midpoint rule, 20 x 20 points per
    cell), plus one cell for everything outside the grid."""
    prior = _make(kind, latent_dim=2)
    n = 6000
    z = prior.sample(n).numpy()
    lo = np.quantile(z, 0.01, axis=0)
    hi = np.quantile(z, 0.99, axis=0)
    cells, sub = 8, 20
    edges = [np.linspace(lo[j], hi[j], cells + 1) for j in range(2)]
    fine = [np.linspace(lo[j], hi[j], cells * sub + 1) for j in range(2)]
    mids = [(f[:-1] + f[1:]) / 2 for f in fine]
    g0, g1 = np.meshgrid(mids[0], mids[1], indexing="ij")
    pts = torch.tensor(np.stack([g0.ravel(), g1.ravel()], -1), dtype=torch.float32)
    dens = prior.log_prob(pts).exp().detach().double().numpy().reshape(cells * sub, cells * sub)
    area = np.diff(fine[0])[0] * np.diff(fine[1])[0]
    probs = dens.reshape(cells, sub, cells, sub).sum(axis=(1, 3)).ravel() * area
    counts, _, _ = np.histogram2d(z[:, 0], z[:, 1], bins=edges)
    observed = np.append(counts.ravel(), n - counts.sum())
    expected = np.append(probs, max(1.0 - probs.sum(), 0.0)) * n
    keep = expected > 5  # the usual validity condition of the chi-square approximation
    if (~keep).any():  # pool the sparse cells into one
        observed = np.append(observed[keep], observed[~keep].sum())
        expected = np.append(expected[keep], expected[~keep].sum())
    expected *= observed.sum() / expected.sum()  # guard the integration's tiny rounding error
    p_value = stats.chisquare(observed, expected).pvalue
    assert p_value > GOF_LEVEL, f"{kind} prior: chi-square p = {p_value:.2e}"


def test_standard_normal_is_buffers_only():
    prior = StandardNormalPrior(4)
    assert list(prior.parameters()) == []
    assert {name for name, _ in prior.named_buffers()} == {"loc", "scale"}
    prior = prior.double()
    assert prior.sample(3).dtype == torch.float64


def test_mixture_parameters_and_constraints():
    prior = MixturePrior(2, num_components=5, init_scale=0.7, min_scale=1e-3)
    names = {name for name, _ in prior.named_parameters()}
    assert names == {"logits", "means", "raw_scales"}
    np.testing.assert_allclose(prior.scales.detach().numpy(), 0.7, rtol=1e-5)
    np.testing.assert_allclose(prior.weights.detach().numpy(), 0.2, rtol=1e-6)
    with torch.no_grad():
        prior.raw_scales.fill_(-1e4)
    assert torch.all(prior.scales >= 1e-3)  # the floor holds however far the raw value goes
    assert torch.isfinite(prior.log_prob(torch.zeros(3, 2))).all()


def test_vamp_prior_shares_the_encoder_and_passes_gradients():
    prior, enc = _vamp(latent_dim=2)
    # not a copy: the encoder's parameters are not the prior's own
    own = {id(p) for p in prior.parameters()}
    assert not own & {id(p) for p in enc.parameters()}
    assert own == {id(prior.pseudo_inputs)}  # uniform weights are a buffer by default
    z = torch.randn(7, 2)
    before = prior.log_prob(z).detach().clone()
    with torch.no_grad():
        enc.net[-1].bias.add_(0.5)  # move the encoder: the prior moves with it
    assert not torch.allclose(prior.log_prob(z), before)
    prior.log_prob(z).sum().backward()
    for name, p in [("pseudo_inputs", prior.pseudo_inputs), ("encoder weight", enc.net[0].weight)]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_vamp_learnable_weights_and_uniform_default():
    prior, _ = _vamp(latent_dim=2, k=4)
    assert "logits" in dict(prior.named_buffers())
    np.testing.assert_allclose(prior.weights.numpy(), 0.25)
    prior_w = VampPrior(2, 3, num_pseudo_inputs=4, encoder_fn=_Encoder(3, 2), learn_weights=True)
    assert "logits" in dict(prior_w.named_parameters())


def test_vamp_init_from_data_and_init_options():
    x = torch.randn(100, 3) * 5
    prior, _ = _vamp(latent_dim=2, k=10)
    prior.init_from_data(x, noise_scale=0.01)
    # every pseudo-input is a data row plus noise of sd 0.01 * column sd (~0.05)
    dist_to_data = torch.cdist(prior.pseudo_inputs.detach(), x).min(dim=1).values
    assert dist_to_data.max() < 0.05 * 6
    # distinct rows when there are enough of them
    assert torch.unique(torch.cdist(prior.pseudo_inputs.detach(), x).argmin(1)).numel() == 10
    # fewer rows than pseudo-inputs: drawn with replacement
    prior.init_from_data(x[:3])
    with pytest.raises(ValueError, match="columns"):
        prior.init_from_data(torch.randn(5, 4))
    with pytest.raises(ValueError, match="NaN"):
        prior.init_from_data(torch.tensor([[0.0, float("nan"), 1.0]]))
    u = torch.rand(6, 3)
    p2 = VampPrior(2, 3, num_pseudo_inputs=6, pseudo_input_init=u)
    assert torch.equal(p2.pseudo_inputs.detach(), u)
    p3 = VampPrior(2, 3, num_pseudo_inputs=6, pseudo_input_init="uniform")
    assert (p3.pseudo_inputs >= 0).all() and (p3.pseudo_inputs <= 1).all()
    with pytest.raises(ValueError, match="shape"):
        VampPrior(2, 3, num_pseudo_inputs=6, pseudo_input_init=torch.zeros(5, 3))
    with pytest.raises(ValueError, match="pseudo_input_init"):
        VampPrior(2, 3, num_pseudo_inputs=6, pseudo_input_init="zeros")


def test_vamp_without_encoder_says_so():
    prior = VampPrior(2, 3, num_pseudo_inputs=4)
    with pytest.raises(ValueError, match="no encoder"):
        prior.sample(3)
    bad = VampPrior(2, 3, num_pseudo_inputs=4, encoder_fn=lambda u: (u, u.abs() + 1))
    with pytest.raises(ValueError, match="expected both"):
        bad.log_prob(torch.zeros(1, 2))


def test_vamp_deepcopy_keeps_encoder_binding_via_owner():
    """A VampPrior holding a bound method of its owner follows the owner through deepcopy."""

    class Owner(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = _Encoder(3, 2)
            self.prior = VampPrior(2, 3, num_pseudo_inputs=4, encoder_fn=self.encode)

        def encode(self, u):
            return self.enc(u)

    a = Owner()
    b = copy.deepcopy(a)
    z = torch.randn(5, 2)
    with torch.no_grad():
        b.enc.net[-1].bias.add_(1.0)
    assert not torch.allclose(a.prior.log_prob(z), b.prior.log_prob(z))
    assert b.prior._encoder_fn.__self__ is b


def test_make_prior_and_errors():
    assert isinstance(make_prior("normal", 3), StandardNormalPrior)
    mix = make_prior("mixture", 3, num_components=4, init_scale=0.5)
    assert isinstance(mix, MixturePrior) and mix.num_components == 4
    vamp = make_prior("vamp", 3, data_dim=5, num_pseudo_inputs=7)
    assert isinstance(vamp, VampPrior) and vamp.pseudo_inputs.shape == (7, 5)
    assert make_prior(mix, 3) is mix
    with pytest.raises(ValueError, match="unknown prior"):
        make_prior("laplace", 3)
    with pytest.raises(ValueError, match="latent_dim"):
        make_prior(mix, 2)
    with pytest.raises(ValueError, match="data_dim"):
        make_prior("vamp", 3)
    with pytest.raises(ValueError, match="no options"):
        make_prior("normal", 3, init_scale=2.0)
    with pytest.raises(ValueError, match="latent_dim must be a positive integer"):
        StandardNormalPrior(0)
    with pytest.raises(ValueError, match="num_components"):
        MixturePrior(2, num_components=0)
    with pytest.raises(ValueError, match="last dimension"):
        StandardNormalPrior(3).log_prob(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="n must be"):
        StandardNormalPrior(3).sample(0)
    assert issubclass(VampPrior, Prior) and issubclass(MixturePrior, Prior)


# ---------------------------------------------------------------------------------------
# VampPrior log density with particle dimensions; the memory-light mixture log_prob
# ---------------------------------------------------------------------------------------
def test_vamp_log_prob_with_particle_dim_matches_a_loop_over_pseudo_inputs():
    """log p(z) for z [K, B, d] (particles x rows) inside a DLVM trace equals
    log (1/C) sum_c N(z; mu(u_c), sigma(u_c)^2) computed one pseudo-input at a time,
    and its gradients reach the encoder and the pseudo-inputs identically."""
    from pyro_lvm.inference.importance_weights import trace_log_terms
    from pyro_lvm.models.dlvm import DLVM

    model = DLVM(12, 3, prior="vamp", hidden=(16,), num_pseudo_inputs=7)
    x = (torch.rand(5, 12) > 0.5).float()
    terms = trace_log_terms(model.model, model.guide, x, 4)
    z = terms.guide_trace.nodes["z"]["value"].detach()
    assert z.shape == (4, 5, 3)
    by_loop = []
    for c in range(7):
        loc, scale = model._encode(model.prior.pseudo_inputs[c:c + 1])
        by_loop.append(torch.distributions.Normal(loc[0], scale[0]).log_prob(z).sum(-1))
    expected = torch.logsumexp(torch.stack(by_loop, -1), -1) - np.log(7)
    got = model.prior.log_prob(z)
    assert got.shape == (4, 5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    params = [model.prior.pseudo_inputs] + list(model.encoder.parameters())
    g_got = torch.autograd.grad(got.sum(), params)
    g_exp = torch.autograd.grad(expected.sum(), params)
    for a, b in zip(g_got, g_exp):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_diagonal_gaussian_mixture_matches_torch_mixture_and_keeps_precision():
    from pyro_lvm.models.priors import DiagonalGaussianMixture

    C, d = 6, 4
    logits, loc = torch.randn(C), 5 + 3 * torch.randn(C, d)
    scale = torch.rand(C, d) * 0.5 + 1e-3   # sharp components far from the origin
    fast = DiagonalGaussianMixture(logits, loc, scale).expand([3, 2])
    ref = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=logits.double()),
        torch.distributions.Independent(torch.distributions.Normal(loc.double(), scale.double()), 1))
    z = loc[torch.randint(C, (3, 2))] + 0.01 * torch.randn(3, 2, d)
    got = fast.log_prob(z)
    assert got.shape == (3, 2) and got.dtype == z.dtype
    torch.testing.assert_close(got.double(), ref.log_prob(z.double()), rtol=1e-6, atol=1e-4)
    assert fast.sample().shape == (3, 2, d)
    assert fast.num_components == C
    with pytest.raises(ValueError, match="no batch"):
        DiagonalGaussianMixture(logits.expand(2, C), loc, scale)


@pytest.mark.parametrize("name", ["mixture", "vamp"])
def test_mixture_priors_declare_their_per_draw_evaluation_width(name):
    prior = make_prior(name, 3, data_dim=10, num_components=7, num_pseudo_inputs=9)
    assert prior.eval_width == 2 * (9 if name == "vamp" else 7)
