"""The objectives' log weights and gradients against Pyro's own tracing, for every pair kind.

The objectives record sample sites with a light handler (``importance_weights._SiteRecorder``) and
score them with the distributions the pair itself builds; the DReG / STL estimators take one
pass for a guide with one latent site. The oracle here is the textbook construction on
``poutine.trace`` + ``poutine.replay``: at the same seed both must draw the same latents and
give the same log weights (bit for bit: the same distribution objects compute them) and the
same gradients for every objective and estimator, for every prior x likelihood x mask of the
DLVM and for a user's own pairs (plain functions with ``pyro.param``, an ``nn.Module`` with
``pyro.module``, a ``PyroModule``, a guide with two dependent latent sites).
"""
import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.nn import PyroModule, PyroParam
from torch.distributions import Bernoulli as TorchBernoulli

from pyro_lvm.inference.engine import isolated_param_store
from pyro_lvm.inference.training import fit
from pyro_lvm.inference.importance_weights import PARTICLE_PLATE, log_weights, trace_log_terms
from pyro_lvm.inference.objectives import ELBO, IWAE, _detached
from pyro_lvm.models.dlvm import DLVM
from pyro_lvm.models.likelihoods import Bernoulli, BinaryBernoulli

PRIORS = ["normal", "mixture", "vamp"]
LIKELIHOODS = ["bernoulli", "gaussian", "studentt"]
N, P, D = 7, 12, 3


def _dlvm(prior, likelihood, seed=0):
    torch.manual_seed(seed)
    return DLVM(P, D, hidden=(9,), prior=prior, likelihood=likelihood, num_components=4,
                num_pseudo_inputs=5)


def _data(likelihood="bernoulli", n=N, seed=1):
    g = torch.Generator().manual_seed(seed)
    if likelihood == "bernoulli":
        return (torch.rand(n, P, generator=g) < 0.4).float()
    return torch.randn(n, P, generator=g)


def _mask(n=N, seed=2):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, P, generator=g) < 0.75
    mask[:, 0] = True  # every row keeps an observed entry
    return mask


# ---------------------------------------------------------------------------------------
# user pairs, written as a user would
# ---------------------------------------------------------------------------------------
class ModulePair(torch.nn.Module):
    """An nn.Module registering its networks with pyro.module."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.encoder = torch.nn.Sequential(torch.nn.Linear(P, 9), torch.nn.ReLU(),
                                           torch.nn.Linear(9, 2 * D))
        self.decoder = torch.nn.Sequential(torch.nn.Linear(D, 9), torch.nn.ReLU(),
                                           torch.nn.Linear(9, P))

    def model(self, x, mask=None):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(D), 1.0).to_event(1))
            px = dist.Bernoulli(logits=self.decoder(z))
            pyro.sample("x", (px if mask is None else px.mask(mask)).to_event(1), obs=x)

    def guide(self, x, mask=None):
        pyro.module("encoder", self.encoder)
        out = self.encoder(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(out[:, :D], torch.nn.functional.softplus(out[:, D:])
                                         + 1e-3).to_event(1))


class PyroModulePair(PyroModule):
    """A PyroModule with PyroParams (one constrained) and a Student-t observation model."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(6)
        self.W = PyroParam(0.3 * torch.randn(P, D))
        self.s = PyroParam(torch.ones(()), constraint=dist.constraints.positive)
        self.A = PyroParam(0.1 * torch.randn(D, P))
        self.log_t = PyroParam(torch.zeros(D))

    def model(self, x, mask=None):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Laplace(x.new_zeros(D), 1.0).to_event(1))
            px = dist.StudentT(4.0, z @ self.W.T, self.s)
            pyro.sample("x", (px if mask is None else px.mask(mask)).to_event(1), obs=x)

    def guide(self, x, mask=None):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x @ self.A.T, self.log_t.exp()).to_event(1))


def _function_pair():
    """Plain functions with pyro.param (a full-covariance guide)."""
    def model(x, mask=None):
        w = pyro.param("w", lambda: 0.3 * torch.randn(P, D, generator=torch.Generator()
                                                      .manual_seed(7)))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(D), 1.0).to_event(1))
            px = dist.Normal(z @ w.T, 0.5)
            pyro.sample("x", (px if mask is None else px.mask(mask)).to_event(1), obs=x)

    def guide(x, mask=None):
        a = pyro.param("a", lambda: torch.zeros(D, P))
        tril = pyro.param("tril", lambda: torch.eye(D), constraint=dist.constraints.lower_cholesky)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(x @ a.T, scale_tril=tril))

    return model, guide


def _two_site_pair():
    """A guide with two dependent latent sites: the generic (two-pass) construction."""
    def model(x, mask=None):
        w = pyro.param("w2", lambda: 0.3 * torch.ones(P, D))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(D), 1.0).to_event(1))
            u = pyro.sample("u", dist.Normal(z.sum(-1), 1.0))
            px = dist.Normal(z @ w.T + u.unsqueeze(-1), 0.7)
            pyro.sample("x", (px if mask is None else px.mask(mask)).to_event(1), obs=x)

    def guide(x, mask=None):
        a = pyro.param("a2", lambda: 0.1 * torch.ones(D, P))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x @ a.T, 0.8).to_event(1))
            pyro.sample("u", dist.Normal(0.5 * z.sum(-1), 0.6))

    return model, guide


USER_PAIRS = {"functions": _function_pair, "nn.Module+pyro.module": ModulePair,
              "PyroModule": PyroModulePair, "two latent sites": _two_site_pair}


def _pair(kind):
    made = USER_PAIRS[kind]()
    if isinstance(made, tuple):
        return made
    return made.model, made.guide


def _user_data(kind, n=N, seed=1):
    return _data("bernoulli" if kind == "nn.Module+pyro.module" else "gaussian", n, seed)


# ---------------------------------------------------------------------------------------
# the oracle: Pyro's tracing and the textbook estimators on it
# ---------------------------------------------------------------------------------------
def _vectorized(fn, k):
    def wrapped(*args, **kwargs):
        with pyro.plate(PARTICLE_PLATE, k, dim=-2):
            return fn(*args, **kwargs)
    return wrapped


def _site_sum(trace, names, shape):
    total = torch.zeros(shape)
    for name in names:
        total = total + trace.nodes[name]["log_prob"].expand(shape)
    return total


def _traced_parts(model, guide, x, k, mask, replay_values=None):
    """(guide trace, log_lik, log_prior, log_q) by poutine.trace + poutine.replay; with
    ``replay_values`` the model and guide are scored at those latent values."""
    guide_trace = poutine.trace(_vectorized(guide, k)).get_trace(x, mask=mask)
    replay = guide_trace
    if replay_values is not None:
        replay = poutine.Trace()
        for name, value in replay_values.items():
            replay.add_node(name, type="sample", is_observed=False, value=value, infer={})
        scored_guide = poutine.trace(poutine.replay(_vectorized(guide, k), trace=replay)
                                     ).get_trace(x, mask=mask)
    else:
        scored_guide = guide_trace
    model_trace = poutine.trace(poutine.replay(_vectorized(model, k), trace=replay)
                                ).get_trace(x, mask=mask)
    model_trace.compute_log_prob()
    scored_guide.compute_log_prob()
    shape = (k, x.shape[0])
    sample = [n for n, s in model_trace.nodes.items()
              if s["type"] == "sample" and not n.startswith(("data", PARTICLE_PLATE))]
    observed = [n for n in sample if model_trace.nodes[n]["is_observed"]]
    latent = [n for n in sample if not model_trace.nodes[n]["is_observed"]]
    return (guide_trace, _site_sum(model_trace, observed, shape),
            _site_sum(model_trace, latent, shape), _site_sum(scored_guide, latent, shape))


def _oracle_loss(model, guide, x, k, mask, *, bound, gradient, beta=1.0):
    """-(bound summed over rows) whose gradient is the textbook estimator."""
    if gradient == "standard":
        _, lik, prior, q = _traced_parts(model, guide, x, k, mask)
        integrand = lik + beta * (prior - q)
        per_row = integrand.mean(0) if bound == "elbo" else (
            torch.logsumexp(integrand, 0) - math.log(k))
        return -per_row.sum()
    # DReG / STL (Roeder et al. 2017; Tucker et al. 2019): re-score at detached draws, weight
    # the partial derivatives with respect to the draws and multiply them by the draws
    guide_trace = poutine.trace(_vectorized(guide, k)).get_trace(x, mask=mask)
    names = [n for n, s in guide_trace.nodes.items() if s["type"] == "sample"
             and not s["is_observed"] and not n.startswith(("data", PARTICLE_PLATE))]
    draws = {n: guide_trace.nodes[n]["value"] for n in names}
    leaves = {n: v.detach().requires_grad_() for n, v in draws.items()}
    with poutine.block():
        _, lik, prior, q = _traced_parts(model, guide, x, k, mask, replay_values=leaves)
    integrand = lik + beta * (prior - q)
    if bound == "iwae":
        value = torch.logsumexp(integrand.detach(), 0) - math.log(k)
        model_weight = torch.softmax(integrand.detach(), 0)
        path_weight = model_weight ** 2 if gradient == "dreg" else model_weight
    else:
        value = integrand.detach().mean(0)
        model_weight = path_weight = torch.full_like(integrand, 1.0 / k)
    surrogate = (model_weight * (lik + beta * prior)).sum()
    grads = torch.autograd.grad(integrand.sum(), [leaves[n] for n in names], retain_graph=True)
    for name, grad in zip(names, grads):
        coef = path_weight.reshape(path_weight.shape + (1,) * (grad.dim() - 2))
        surrogate = surrogate + ((coef * grad).detach() * draws[name]).sum()
    return -(value.sum() + surrogate - surrogate.detach())


def _objectives():
    return [ELBO(), ELBO(3, beta=0.4, gradient="stl"), IWAE(6), IWAE(6, gradient="dreg"),
            IWAE(6, gradient="stl")]


def _spec(objective):
    bound = "elbo" if isinstance(objective, ELBO) else "iwae"
    return dict(bound=bound, gradient=objective.gradient, beta=objective.beta)


def _params(model, guide, x, mask):
    """Every parameter the pair touches (module parameters and param-store entries)."""
    with poutine.trace(param_only=True) as capture:
        trace_log_terms(model, guide, x, 2, mask)
    owner = getattr(model, "__self__", None)
    params = dict(owner.named_parameters()) if isinstance(owner, torch.nn.Module) else {}
    for name, site in capture.trace.nodes.items():
        value = site["value"]
        value = getattr(value, "unconstrained", lambda: value)()
        if all(value is not p for p in params.values()):
            params[name] = value
    return params


def _loss_and_grads(loss_fn, params):
    for p in params.values():
        p.grad = None
    loss = loss_fn()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in params.items() if p.grad is not None}


def _assert_same_objective(model, guide, x, mask, objective, seed=11):
    with isolated_param_store():
        params = _params(model, guide, x, mask)
        pyro.set_rng_seed(seed)
        ours, ours_g = _loss_and_grads(lambda: objective(model, guide, x, mask=mask), params)
        pyro.set_rng_seed(seed)
        ref, ref_g = _loss_and_grads(lambda: _oracle_loss(model, guide, x,
                                                           objective.num_particles, mask,
                                                           **_spec(objective)), params)
    assert math.isclose(ours, ref, rel_tol=1e-5, abs_tol=1e-4), (objective, ours, ref)
    assert set(ours_g) == set(ref_g) and ref_g, objective
    for name, g in ref_g.items():
        err = float((ours_g[name] - g).abs().max() / g.abs().max().clamp_min(1e-6))
        assert err < 1e-4, (objective, mask is not None, name, err)


# ---------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("prior", PRIORS)
@pytest.mark.parametrize("masked", [False, True], ids=["complete", "masked"])
def test_dlvm_draws_and_log_weights_are_pyros(prior, likelihood, masked):
    model = _dlvm(prior, likelihood)
    x, mask = _data(likelihood), (_mask() if masked else None)
    with isolated_param_store():
        pyro.set_rng_seed(3)
        _, lik, log_prior, log_q = _traced_parts(model.model, model.guide, x, 5, mask)
        after_traced = torch.rand(3)
        pyro.set_rng_seed(3)
        ours = trace_log_terms(model.model, model.guide, x, 5, mask)
        after_ours = torch.rand(3)
    for got, expected in ((ours.log_lik, lik), (ours.log_prior, log_prior), (ours.log_q, log_q)):
        assert got.shape == (5, N)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert torch.equal(after_traced, after_ours)  # the same generator consumption


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("prior", PRIORS)
def test_dlvm_objectives_have_the_textbook_values_and_gradients(prior, likelihood):
    model = _dlvm(prior, likelihood)
    x = _data(likelihood)
    for objective in _objectives():
        for mask in (None, _mask()):
            _assert_same_objective(model.model, model.guide, x, mask, objective)


@pytest.mark.parametrize("kind", list(USER_PAIRS))
def test_user_pairs_have_pyros_log_weights_and_the_textbook_gradients(kind):
    model, guide = _pair(kind)
    x = _user_data(kind)
    for mask in (None, _mask()):
        with isolated_param_store():
            pyro.set_rng_seed(4)
            _, lik, log_prior, log_q = _traced_parts(model, guide, x, 4, mask)
            pyro.set_rng_seed(4)
            ours = log_weights(model, guide, x, 4, mask)
        torch.testing.assert_close(ours, lik + log_prior - log_q, rtol=0, atol=0)
        for objective in _objectives():
            _assert_same_objective(model, guide, x, mask, objective)


def test_the_oracle_can_fail():
    """Positive control: a wrong path weight (IWAE-STL's w~ instead of DReG's w~^2) is caught."""
    model = _dlvm("normal", "bernoulli")
    x = _data()
    with isolated_param_store():
        params = _params(model.model, model.guide, x, None)
        pyro.set_rng_seed(1)
        _, dreg = _loss_and_grads(lambda: IWAE(6, gradient="dreg")(model.model, model.guide, x),
                                  params)
        pyro.set_rng_seed(1)
        _, stl = _loss_and_grads(lambda: _oracle_loss(model.model, model.guide, x, 6, None,
                                                      bound="iwae", gradient="stl"), params)
    worst = max(float((dreg[n] - g).abs().max() / g.abs().max()) for n, g in stl.items())
    assert worst > 1e-2


def test_handlers_around_an_objective_are_honoured():
    model = _dlvm("normal", "bernoulli")
    x = _data()
    with isolated_param_store():
        pyro.set_rng_seed(0)
        plain = ELBO().loss(model.model, model.guide, x)
        pyro.set_rng_seed(0)
        with poutine.scale(scale=2.0):
            scaled = ELBO().loss(model.model, model.guide, x)
        pyro.set_rng_seed(0)
        with poutine.block(hide=["x"]):  # a blocked site is still scored by the objective
            blocked = ELBO().loss(model.model, model.guide, x)
    assert math.isclose(scaled, 2 * plain, rel_tol=1e-6)
    assert math.isclose(blocked, plain, rel_tol=1e-6)


def test_outer_handlers_still_see_every_param_and_sample_site():
    model, guide = _pair("nn.Module+pyro.module")
    x = _user_data("nn.Module+pyro.module")
    class Seen(poutine.messenger.Messenger):
        names = []

        def _pyro_sample(self, msg):
            self.names.append(msg["name"])

    with isolated_param_store(), poutine.trace(param_only=True) as outer, Seen():
        IWAE(3, gradient="dreg")(model, guide, x).backward()
    assert Seen.names.count("z") == 2 and Seen.names.count("x") == 1  # guide, model
    assert set(outer.trace.nodes) >= {"encoder$$$0.weight", "decoder$$$2.bias"}


def test_detached_copies_hold_no_graph_and_refuse_what_they_cannot_copy():
    loc = torch.randn(4, 3, requires_grad=True)
    mixture = dist.MixtureSameFamily(dist.Categorical(logits=loc[:, 0]),
                                     dist.Normal(loc, 1.0).to_event(1))
    for fn in (dist.Normal(loc, 2.0).to_event(1).expand([5, 4]).mask(loc[:, 0] > 0),
               dist.MultivariateNormal(loc, scale_tril=torch.eye(3)), mixture):
        copy = _detached(fn)
        value = fn.sample()
        assert torch.equal(copy.log_prob(value), fn.log_prob(value).detach())
        assert not copy.log_prob(value).requires_grad
    flow = dist.TransformedDistribution(dist.Normal(loc, 1.0), [dist.transforms.ExpTransform()])
    assert _detached(flow) is None
    assert _detached(dist.Normal(loc, 1.0).expand([2, 4, 3])) is not None


def test_binary_bernoulli_log_prob_is_torchs_and_expands_like_it():
    g = torch.Generator().manual_seed(0)
    logits = 6 * torch.randn(4, 5, 30, generator=g)
    x = (torch.rand(5, 30, generator=g) < 0.5).float()
    expected = TorchBernoulli(logits=logits).log_prob(x.expand_as(logits))
    torch.testing.assert_close(BinaryBernoulli(logits=logits).log_prob(x), expected,
                               rtol=1e-6, atol=1e-5)
    expanded = BinaryBernoulli(logits=logits[0]).expand([4, 5, 30])
    assert isinstance(expanded, BinaryBernoulli)
    torch.testing.assert_close(expanded.log_prob(x), TorchBernoulli(logits=logits[0]).log_prob(x)
                               .expand(4, 5, 30), rtol=1e-6, atol=1e-5)
    with pyro.validation_enabled(True), pytest.raises(ValueError):
        BinaryBernoulli(logits=logits[0], validate_args=True).log_prob(torch.full((5, 30), 0.5))
    lik = Bernoulli(data_dim=30)
    assert isinstance(lik.distribution(logits), BinaryBernoulli)
    frac = torch.rand(5, 30, generator=g)
    soft = Bernoulli(allow_fractional=True, data_dim=30)
    torch.testing.assert_close(soft.log_prob(frac, logits),
                               TorchBernoulli(logits=logits, validate_args=False).log_prob(frac)
                               .sum(-1), rtol=1e-6, atol=1e-4)


def test_model_checks_the_data_on_every_call_while_validation_is_on():
    """No hidden flag: a model checks its input whenever Pyro's validation is on (inside fit
    too), only pyro.validation_enabled(False) turns that off, and fit rejects a bad row before
    the first step."""
    from pyro_lvm.models import validation

    assert not hasattr(validation, "data_checked")
    model = _dlvm("normal", "bernoulli")
    x = _data()
    x[1, 1] = 0.25
    assert validation.per_call_data_checks()
    with isolated_param_store():
        with pyro.validation_enabled(False):  # the caller vouches for the data
            assert not validation.per_call_data_checks()
            log_weights(model.model, model.guide, x, 2)
        with pytest.raises(ValueError, match=r"outside \{0, 1\}.*row 1, column 1"):
            log_weights(model.model, model.guide, x, 2)
        with pytest.raises(ValueError, match="shape"):
            log_weights(model.model, model.guide, x[:, :5], 2)
    # fit itself rejects the bad row before the first step
    with pytest.raises(ValueError, match=r"row 1, column 1"):
        fit(model, x, epochs=1, batch_size=7, progress=False)


def test_default_optimizer_is_fused_adam_where_torch_has_the_kernel():
    from pyro_lvm.inference.training import default_optimizer

    p = torch.nn.Parameter(torch.randn(3))
    optimizer = default_optimizer([p], 0.1)
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.defaults["fused"] is True
    assert optimizer.defaults["lr"] == 0.1
    q = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    assert default_optimizer([p, q], 0.1).defaults["fused"] is True
    # complex parameters have no fused kernel: the plain implementation is used
    plain = default_optimizer([torch.nn.Parameter(torch.randn(2, dtype=torch.complex64))], 0.1)
    assert isinstance(plain, torch.optim.Adam) and not plain.defaults.get("fused")
