"""Any Pyro model/guide pair, first class (inference/pairs.py and every entry point):
pairs written as Pyro writes them (no mask), fit results evaluated with their trained
parameters, mismatched sites and global latents refused with the site's name."""
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
import torch.nn as nn

from pyro_lvm.inference import (diagnose, elbo, evaluate, fit, log_likelihood,
                                to_inference_data)
from pyro_lvm.inference.objectives import ELBO
from pyro_lvm.inference.pairs import PairError


def binary_digits(rows=240):
    from sklearn.datasets import load_digits

    X = load_digits().data[:rows]
    return torch.as_tensor((X > 8).astype(np.float32))


# ---- Pyro's examples/vae pair, written as upstream writes it (no mask, pyro.module) -------
class Encoder(nn.Module):
    def __init__(self, z_dim, hidden_dim, pixels):
        super().__init__()
        self.pixels = pixels
        self.fc1 = nn.Linear(pixels, hidden_dim)
        self.fc21 = nn.Linear(hidden_dim, z_dim)
        self.fc22 = nn.Linear(hidden_dim, z_dim)
        self.softplus = nn.Softplus()

    def forward(self, x):
        hidden = self.softplus(self.fc1(x.reshape(-1, self.pixels)))
        return self.fc21(hidden), torch.exp(self.fc22(hidden))


class Decoder(nn.Module):
    def __init__(self, z_dim, hidden_dim, pixels):
        super().__init__()
        self.fc1 = nn.Linear(z_dim, hidden_dim)
        self.fc21 = nn.Linear(hidden_dim, pixels)
        self.softplus = nn.Softplus()
        self.sigmoid = nn.Sigmoid()

    def forward(self, z):
        hidden = self.softplus(self.fc1(z))
        return self.sigmoid(self.fc21(hidden))


class VAE(nn.Module):
    """The classic Pyro VAE: model(x) / guide(x), sites "latent" and "obs"."""

    def __init__(self, z_dim=2, hidden_dim=32, pixels=64):
        super().__init__()
        self.encoder = Encoder(z_dim, hidden_dim, pixels)
        self.decoder = Decoder(z_dim, hidden_dim, pixels)
        self.z_dim, self.pixels = z_dim, pixels

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z_loc = x.new_zeros(torch.Size((x.shape[0], self.z_dim)))
            z_scale = x.new_ones(torch.Size((x.shape[0], self.z_dim)))
            z = pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))
            loc_img = self.decoder(z)
            pyro.sample("obs", dist.Bernoulli(loc_img, validate_args=False).to_event(1),
                        obs=x.reshape(-1, self.pixels))

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            z_loc, z_scale = self.encoder(x)
            pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))


def independent_importance_sampler(vae, x, num_samples, seed):
    """log p(x_i) by importance sampling with q(z | x_i), written with torch alone."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        loc, scale = vae.encoder(x)
        eps = torch.randn((num_samples,) + loc.shape, generator=gen)
        z = loc + scale * eps
        log_q = torch.distributions.Normal(loc, scale).log_prob(z).sum(-1)
        log_prior = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
        probs = vae.decoder(z)
        log_lik = (x * torch.log(probs) + (1 - x) * torch.log1p(-probs)).sum(-1)
        lw = (log_lik + log_prior - log_q).double()
        log_px = torch.logsumexp(lw, 0) - math.log(num_samples)
        w = torch.exp(lw - lw.max(0).values)
        ess = w.sum(0) ** 2 / (w ** 2).sum(0)
        se = torch.sqrt(torch.clamp((num_samples / ess - 1) / (num_samples - 1), min=0))
    return log_px.numpy(), se.numpy()


def test_pyros_classic_vae_trains_and_evaluates_unchanged():
    x = binary_digits(240)
    vae = VAE()
    result = fit(vae, x, epochs=6, batch_size=60, lr=1e-2, progress=False, device="cpu")
    assert np.isfinite(result.final_train_objective)
    ours = log_likelihood(result, x[:60], num_samples=400, device="cpu", seed=1)
    theirs, theirs_se = independent_importance_sampler(vae, x[:60], 400, seed=7)
    diff = ours.mean - theirs.mean()
    se = math.sqrt(ours.mc_se ** 2 + (np.sqrt(np.sum(theirs_se ** 2)) / 60) ** 2)
    assert abs(diff) < 4 * se + 1e-6, (ours.mean, theirs.mean(), se)
    # the pair itself (not the result) gives the same number: its parameters are the module's
    same = log_likelihood(vae, x[:60], num_samples=400, device="cpu", seed=1)
    assert same.mean == ours.mean
    # positive control: an untrained VAE is far from the trained one
    untrained = log_likelihood(VAE(), x[:60], num_samples=50, device="cpu", seed=1)
    assert untrained.mean < ours.mean - 10 * se
    # Pyro's own objective trains it too
    pyro_fit = fit(VAE(), x, objective=pyro.infer.Trace_ELBO(), epochs=1, batch_size=120,
                   progress=False, device="cpu")
    assert np.isfinite(pyro_fit.final_train_objective)


def test_pair_without_mask_refuses_missing_values_and_names_mask():
    x = binary_digits(20)
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[3, 5] = False
    with pytest.raises(ValueError,
                       match=r"1 missing value.*takes no mask: a pair must accept `mask`"):
        log_likelihood(VAE(), x, num_samples=5, mask=mask, device="cpu")
    with pytest.raises(ValueError, match=r"a pair must accept `mask`"):
        fit(VAE(), x, mask=mask, epochs=1, progress=False, device="cpu")
    # fully observed through an all-True mask is fine
    log_likelihood(VAE(), x, num_samples=5, mask=torch.ones_like(mask), device="cpu")


# ---- a plain-function pair with pyro.param ------------------------------------------------
P, D = 4, 2


def plain_model(x, mask=None):
    loading = pyro.param("loading", lambda: 0.1 * torch.ones(D, P))
    noise = pyro.param("noise", lambda: torch.ones(P), constraint=dist.constraints.positive)
    with pyro.plate("data", x.shape[0], dim=-1):
        z = pyro.sample("z", dist.Normal(x.new_zeros(D), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ loading, noise).to_event(1), obs=x)


def plain_guide(x, mask=None):
    weight = pyro.param("weight", lambda: torch.zeros(P, D))
    scale = pyro.param("scale", lambda: torch.ones(D), constraint=dist.constraints.positive)
    with pyro.plate("data", x.shape[0], dim=-1):
        pyro.sample("z", dist.Normal(x @ weight, scale).to_event(1))


def correlated_data(n=300, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, D, generator=gen)
    W = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 1.5, 2.0, 1.0]])
    return z @ W + 0.3 * torch.randn(n, P, generator=gen)


def test_plain_function_pair_trained_parameters_travel():
    x = correlated_data()
    pair = (plain_model, plain_guide)
    result = fit(pair, x, epochs=30, batch_size=100, lr=0.05, progress=False, device="cpu")
    assert len(pyro.get_param_store()) == 0  # the fit kept its values to itself
    from_result = log_likelihood(result, x, num_samples=50, device="cpu", seed=3)
    with result.activate():
        inside = log_likelihood(pair, x, num_samples=50, device="cpu", seed=3)
    assert from_result.mean == inside.mean
    np.testing.assert_array_equal(from_result.per_row["log_px"], inside.per_row["log_px"])
    # an untrained pair (its parameters at their initial values) gives another number
    with pyro.get_param_store().scope() as untrained_state:
        poutine.trace(plain_model).get_trace(x[:1])
        poutine.trace(plain_guide).get_trace(x[:1])
    untrained = log_likelihood(pair, x, num_samples=50, device="cpu", seed=3,
                               param_state=untrained_state)
    assert untrained.mean < from_result.mean - 1.0
    # every entry point takes the result
    assert elbo(result, x, num_samples=5, device="cpu").mean < from_result.mean
    metrics = evaluate(result, x, num_samples=20, device="cpu", reconstruction=False)
    assert abs(metrics["log_px_is"] - from_result.mean) < 0.2
    diag = diagnose(result, x[:50], num_samples=50, include_predictive=False, device="cpu")
    assert diag.importance.fraction_bad < 0.5
    idata = to_inference_data(result, x[:20], num_draws=10, device="cpu")
    assert "log_likelihood" in idata.groups()
    # the bare functions, with the fit's store gone, are refused with the names and the fix
    for call in (lambda: log_likelihood(pair, x, num_samples=5, device="cpu"),
                 lambda: elbo(pair, x, device="cpu"),
                 lambda: diagnose(pair, x, num_samples=25, include_predictive=False, device="cpu"),
                 lambda: evaluate(pair, x, num_samples=5, device="cpu")):
        with pytest.raises(PairError, match=r"\['weight', 'scale', 'loading', 'noise'\] .* not in "
                                            r"the active Pyro parameter store.*result of fit"):
            call()
    assert len(pyro.get_param_store()) == 0  # and nothing was initialized


def test_bare_model_with_guide_keyword_travels_too():
    x = correlated_data(100)
    result = fit(plain_model, x, guide=plain_guide, epochs=3, batch_size=50, progress=False,
                 device="cpu")
    assert result.guide is plain_guide
    with result.activate():
        inside = log_likelihood(plain_model, x, num_samples=10, guide=plain_guide, device="cpu")
    assert log_likelihood(result, x, num_samples=10, device="cpu").mean == inside.mean


# ---- mismatched pairs: an error naming the site, from every entry point --------------------
def mixture_model_unmarked(x, mask=None):
    with pyro.plate("data", x.shape[0], dim=-1):
        c = pyro.sample("component", dist.Categorical(logits=x.new_zeros(2)))
        pyro.sample("x", dist.Normal(torch.stack([x.new_zeros(P), x.new_ones(P)])[c], 1.0)
                    .to_event(1), obs=x)


def empty_guide(x, mask=None):
    with pyro.plate("data", x.shape[0], dim=-1):
        pass


def forgotten_latent_model(x, mask=None):
    with pyro.plate("data", x.shape[0], dim=-1):
        z = pyro.sample("z", dist.Normal(x.new_zeros(D), 1.0).to_event(1))
        u = pyro.sample("u", dist.Normal(x.new_zeros(P), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ torch.ones(D, P) + u, 1.0).to_event(1), obs=x)


def fixed_guide(x, mask=None):
    with pyro.plate("data", x.shape[0], dim=-1):
        pyro.sample("z", dist.Normal(x.new_zeros(D), 1.0).to_event(1))


def fixed_model(x, mask=None):
    with pyro.plate("data", x.shape[0], dim=-1):
        z = pyro.sample("z", dist.Normal(x.new_zeros(D), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ torch.ones(D, P), 1.0).to_event(1), obs=x)


def extra_latent_guide(x, mask=None):
    with pyro.plate("data", x.shape[0], dim=-1):
        pyro.sample("z", dist.Normal(x.new_zeros(D), 1.0).to_event(1))
        pyro.sample("extra", dist.Normal(x.new_zeros(P), 1.0).to_event(1))


def global_model(x, mask=None):
    scale = pyro.sample("noise_scale", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", x.shape[0], dim=-1):
        z = pyro.sample("z", dist.Normal(x.new_zeros(D), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ torch.ones(D, P), scale).to_event(1), obs=x)


def global_guide(x, mask=None):
    pyro.sample("noise_scale", dist.LogNormal(0.0, 1.0))
    fixed_guide(x)


MISMATCHED = {
    "enumerated site not marked": ((mixture_model_unmarked, empty_guide),
                                   r"\['component'\] in the model have no counterpart in the "
                                   r"guide.*infer=\{'enumerate': 'parallel'\}"),
    "forgotten latent": ((forgotten_latent_model, fixed_guide),
                         r"\['u'\] in the model have no counterpart in the guide"),
    "extra latent": ((fixed_model, extra_latent_guide),
                     r"\['extra'\] in the guide have no latent counterpart in the model"),
    "global latent": ((global_model, global_guide),
                      r"latent site 'noise_scale' in the guide is outside pyro.plate\('data'\).*"
                      r"per data point and need every latent inside the data plate.*"
                      r"Make 'noise_scale' a parameter"),
}

ENTRY_POINTS = {
    "log_likelihood": lambda pair, x: log_likelihood(pair, x, num_samples=5, device="cpu"),
    "elbo": lambda pair, x: elbo(pair, x, device="cpu"),
    "diagnose": lambda pair, x: diagnose(pair, x, num_samples=25, include_predictive=False,
                                         device="cpu"),
    "evaluate": lambda pair, x: evaluate(pair, x, num_samples=5, device="cpu"),
    "to_inference_data": lambda pair, x: to_inference_data(pair, x, num_draws=5, device="cpu"),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("kind", list(MISMATCHED))
def test_mismatched_pairs_are_refused_naming_the_site(kind, entry):
    pair, message = MISMATCHED[kind]
    x = correlated_data(12)
    with pytest.raises(ValueError, match=message):
        ENTRY_POINTS[entry](pair, x)


def test_a_matching_pair_passes_the_same_checks():  # positive control of the test above
    x = correlated_data(12)
    for call in ENTRY_POINTS.values():
        call((fixed_model, fixed_guide), x)


# ---- objectives whose minibatch scaling is biased are named ---------------------------------
def test_renyi_elbo_with_minibatches_warns_once_naming_the_bias_and_iwae():
    x = correlated_data(40)
    with pytest.warns(UserWarning, match=r"RenyiELBO with minibatches \(batch_size=10 < 40 rows\).*"
                                         r"biased.*pyro_lvm.inference.IWAE") as record:
        fit((fixed_model, fixed_guide_with_param), x, objective=pyro.infer.RenyiELBO(alpha=0.5),
            epochs=2, batch_size=10, progress=False, device="cpu")
    assert sum("RenyiELBO" in str(w.message) for w in record) == 1
    # full batches are unbiased, and so is the Trace_ELBO family: no warning (errors here)
    fit((fixed_model, fixed_guide_with_param), x, objective=pyro.infer.RenyiELBO(alpha=0.5),
        epochs=1, batch_size=40, progress=False, device="cpu")
    fit((fixed_model, fixed_guide_with_param), x, objective=pyro.infer.Trace_ELBO(),
        epochs=1, batch_size=10, progress=False, device="cpu")


def fixed_guide_with_param(x, mask=None):
    loc = pyro.param("guide_loc", lambda: torch.zeros(D))
    with pyro.plate("data", x.shape[0], dim=-1):
        pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))
