"""Discrete latents summed out exactly inside the log weights (inference/enumeration.py):
Gaussian mixtures against their exact log-likelihood and scikit-learn's EM, a mixture-prior
DLVM against the same prior written as a MixtureSameFamily, discrete latents sampled by the
guide under Pyro's TraceGraph_ELBO."""
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn as nn
from torch.distributions import constraints

from pyro_lvm.inference import ELBO, IWAE, elbo, fit, log_likelihood

C, P = 3, 2
CENTERS = torch.tensor([[-4.0, 0.0], [0.0, 4.0], [4.0, -1.0]])


def mixture_data(n=300, seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % C
    scales = torch.tensor([[1.0, 0.5], [0.7, 1.2], [0.6, 0.6]])
    return (CENTERS[labels] + scales[labels] * torch.randn(n, P, generator=gen)).double()


# ---- a Gaussian mixture: the component enumerated, nothing left for the guide -----------
def gmm_model(x, mask=None):
    weights = pyro.param("weights", lambda: x.new_full((C,), 1.0 / C),
                         constraint=constraints.simplex)
    locs = pyro.param("locs", lambda: x.new_tensor([[-1.0, 1.0], [1.0, 1.0], [1.0, -1.0]]))
    scales = pyro.param("scales", lambda: x.new_ones(C, P), constraint=constraints.positive)
    with pyro.plate("data", x.shape[0], dim=-1):
        c = pyro.sample("component", dist.Categorical(weights), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(locs[c], scales[c]).to_event(1), obs=x)


def gmm_guide(x, mask=None):
    with pyro.plate("data", x.shape[0], dim=-1):
        pass


def exact_gmm_log_px(x, weights, locs, scales):
    comp = dist.Normal(locs, scales).to_event(1).log_prob(x.unsqueeze(-2))  # [n, C]
    return torch.logsumexp(torch.log(weights) + comp, dim=-1)


def test_gmm_log_likelihood_is_the_exact_mixture_log_likelihood():
    x = mixture_data(60)
    est = log_likelihood((gmm_model, gmm_guide), x, num_samples=10, device="cpu",
                         param_state=_initial_state(x))
    with pyro.get_param_store().scope(_initial_state(x)):
        store = pyro.get_param_store()
        exact = exact_gmm_log_px(x, store["weights"], store["locs"], store["scales"])
    exact = exact.detach().numpy()
    np.testing.assert_allclose(est.per_row["log_px"], exact, rtol=0, atol=1e-9)


def _initial_state(x):
    with pyro.get_param_store().scope() as state:
        pyro.poutine.trace(gmm_model).get_trace(x[:1])
    return state


@pytest.mark.parametrize("objective", [ELBO(), IWAE(3)], ids=["elbo", "iwae"])
def test_fitting_the_gmm_reaches_sklearn_em(objective):
    from sklearn.mixture import GaussianMixture

    x = mixture_data(300)
    reference = GaussianMixture(C, covariance_type="diag", random_state=0, tol=1e-8,
                                max_iter=500).fit(x.numpy()).score(x.numpy())
    before = log_likelihood((gmm_model, gmm_guide), x, num_samples=1, device="cpu",
                            param_state=_initial_state(x)).mean
    assert before < 1.05 * reference  # positive control: the start is > 5% away
    result = fit((gmm_model, gmm_guide), x, objective=objective, epochs=250, batch_size=300,
                 lr=0.05, progress=False, device="cpu")
    after = log_likelihood(result, x, num_samples=1, device="cpu").mean
    assert abs(after - reference) <= 0.005 * abs(reference), (after, reference)


# ---- a mixture of factor analysers: enumerated component + continuous latent ------------
W = torch.tensor([[[1.0, 0.5]], [[-0.5, 1.0]], [[0.8, -0.8]]]).double()  # [C, 1, P]
PI = torch.tensor([0.5, 0.3, 0.2]).double()
NOISE = 0.5


def mfa_model(x, mask=None):
    with pyro.plate("data", x.shape[0], dim=-1):
        c = pyro.sample("component", dist.Categorical(PI), infer={"enumerate": "parallel"})
        z = pyro.sample("z", dist.Normal(x.new_zeros(1), 1.0).to_event(1))
        loc = (z.unsqueeze(-2) @ W[c]).squeeze(-2) + CENTERS.double()[c]
        pyro.sample("x", dist.Normal(loc, NOISE).to_event(1), obs=x)


def mfa_guide(x, mask=None):
    with pyro.plate("data", x.shape[0], dim=-1):
        pyro.sample("z", dist.Normal(x.new_zeros(1), 1.3).to_event(1))


def exact_mfa_log_px(x):
    cov = W.transpose(-1, -2) @ W + NOISE ** 2 * torch.eye(P).double()  # [C, P, P]
    comp = dist.MultivariateNormal(CENTERS.double(), cov).log_prob(x.unsqueeze(-2))
    return torch.logsumexp(torch.log(PI) + comp, dim=-1)


def test_enumerated_component_with_a_continuous_latent_within_3_se_on_every_row():
    x = mixture_data(20, seed=1)
    est = log_likelihood((mfa_model, mfa_guide), x, num_samples=3000, device="cpu", seed=0)
    exact = exact_mfa_log_px(x).numpy()
    z_scores = (est.per_row["log_px"].to_numpy() - exact) / est.per_row["se"].to_numpy()
    assert np.all(np.abs(z_scores) < 3), z_scores
    # the ELBO is below the exact value on average (a bound), not above
    assert elbo((mfa_model, mfa_guide), x, num_samples=50, device="cpu").mean < exact.mean()
    # positive control: drawing the component from the prior instead (Pyro's default without
    # the mark) is the mismatch the pair check refuses
    def unmarked(x, mask=None):
        with pyro.plate("data", x.shape[0], dim=-1):
            c = pyro.sample("component", dist.Categorical(PI))
            z = pyro.sample("z", dist.Normal(x.new_zeros(1), 1.0).to_event(1))
            loc = (z.unsqueeze(-2) @ W[c]).squeeze(-2) + CENTERS.double()[c]
            pyro.sample("x", dist.Normal(loc, NOISE).to_event(1), obs=x)
    with pytest.raises(ValueError, match=r"\['component'\] in the model have no counterpart"):
        log_likelihood((unmarked, mfa_guide), x, num_samples=10, device="cpu")


# ---- a mixture-prior DLVM with the component enumerated -----------------------------------
class MixturePriorVAE(nn.Module):
    def __init__(self, pixels=64, z_dim=2, components=4, hidden=32, enumerate_component=True):
        super().__init__()
        self.enumerate_component = enumerate_component
        self.logits = nn.Parameter(torch.zeros(components))
        self.prior_locs = nn.Parameter(torch.randn(components, z_dim))
        self.prior_log_scales = nn.Parameter(torch.zeros(components, z_dim))
        self.decoder = nn.Sequential(nn.Linear(z_dim, hidden), nn.Tanh(), nn.Linear(hidden, pixels))
        self.encoder = nn.Sequential(nn.Linear(pixels, hidden), nn.Tanh(),
                                     nn.Linear(hidden, 2 * z_dim))

    def model(self, x, mask=None):
        with pyro.plate("data", x.shape[0], dim=-1):
            if self.enumerate_component:
                c = pyro.sample("component", dist.Categorical(logits=self.logits),
                                infer={"enumerate": "parallel"})
                prior = dist.Normal(self.prior_locs[c], self.prior_log_scales[c].exp()).to_event(1)
            else:
                prior = dist.MixtureSameFamily(
                    dist.Categorical(logits=self.logits),
                    dist.Normal(self.prior_locs, self.prior_log_scales.exp()).to_event(1))
            z = pyro.sample("z", prior)
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x, mask=None):
        loc, log_scale = self.encoder(x).chunk(2, dim=-1)
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


def binary_digits(rows):
    from sklearn.datasets import load_digits

    return torch.as_tensor((load_digits().data[:rows] > 8).astype(np.float32))


def test_mixture_prior_dlvm_with_enumerated_component_trains_and_matches_mixture_same_family():
    x = binary_digits(200)
    torch.manual_seed(0)
    vae = MixturePriorVAE()
    before = log_likelihood(vae, x, num_samples=20, device="cpu", seed=1).mean
    result = fit(vae, x, objective=IWAE(4), epochs=8, batch_size=50, lr=1e-2, progress=False,
                 device="cpu")
    history = result.history["train_objective"].to_numpy()
    assert np.all(np.isfinite(history)) and history[-1] > history[0] + 5
    after = log_likelihood(vae, x, num_samples=20, device="cpu", seed=1)
    assert after.mean > before + 5
    # the same parameters with the prior written as a MixtureSameFamily: the same log weights
    vae.enumerate_component = False
    same = log_likelihood(vae, x, num_samples=20, device="cpu", seed=1)
    np.testing.assert_allclose(same.per_row["log_px"], after.per_row["log_px"], rtol=1e-5)


# ---- discrete latents sampled by the guide (score-function objective) ---------------------
def bernoulli_model(x, mask=None):
    with pyro.plate("data", x.shape[0], dim=-1):
        b = pyro.sample("b", dist.Bernoulli(x.new_tensor(0.3)))
        pyro.sample("x", dist.Normal(x.new_zeros(1) + 3.0 * b.unsqueeze(-1), 1.0).to_event(1),
                    obs=x)


def bernoulli_guide(x, mask=None):
    weight = pyro.param("guide_weight", lambda: x.new_zeros(()))
    bias = pyro.param("guide_bias", lambda: x.new_zeros(()))
    with pyro.plate("data", x.shape[0], dim=-1):
        pyro.sample("b", dist.Bernoulli(logits=weight * x.squeeze(-1) + bias))


def test_discrete_latent_sampled_by_the_guide_with_tracegraph_elbo():
    gen = torch.Generator().manual_seed(0)
    b = (torch.rand(200, generator=gen) < 0.3).double()
    x = (3.0 * b + torch.randn(200, generator=gen, dtype=torch.float64)).unsqueeze(-1)
    result = fit((bernoulli_model, bernoulli_guide), x, objective=pyro.infer.TraceGraph_ELBO(),
                 epochs=150, batch_size=200, lr=0.05, progress=False, device="cpu")
    est = log_likelihood(result, x, num_samples=500, device="cpu")
    normal = dist.Normal(x.squeeze(-1), 1.0)
    exact = torch.logsumexp(torch.stack([math.log(0.7) + normal.log_prob(torch.zeros(())),
                                         math.log(0.3) + normal.log_prob(torch.full((), 3.0))]), 0)
    # the guide family holds the exact posterior (logistic in x), so near the optimum the
    # weights are almost equal and the standard errors tiny: allow 0.05 nats beside 4 se
    diff = est.per_row["log_px"].to_numpy() - exact.numpy()
    assert np.all(np.abs(diff) < 4 * est.per_row["se"].to_numpy() + 0.05), diff
    assert abs(est.mean - float(exact.mean())) < 4 * est.mc_se + 0.01
    # the guide learned: its weight on x is positive (rows near 3 get b = 1)
    with result.activate():
        assert float(pyro.param("guide_weight").detach()) > 0.5
