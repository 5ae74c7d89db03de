"""The Pyro-free path of the DLVM (``DLVM.log_weight_terms``) against Pyro tracing.

The oracle is the traced model/guide pair itself: at the same seed both must draw the same
latents and give the same log weights (to float rounding) and the same gradients for every
objective and estimator, for every prior, likelihood and missing-data mask. The path must
switch itself off whenever tracing could compute something else (subclasses, custom
components, active Pyro handlers).
"""
import math
from unittest import mock

import pyro
import pyro.poutine as poutine
import pytest
import torch
from torch.distributions import Bernoulli as TorchBernoulli

from pyro_lvm.inference.engine import isolated_param_store
from pyro_lvm.inference.fit import default_optimizer, fit
from pyro_lvm.inference.objectives import (ELBO, IWAE, log_weights, pyro_free_terms, trace_log_terms)
from pyro_lvm.models.dlvm import DLVM
from pyro_lvm.models.likelihoods import Bernoulli
from pyro_lvm.models.priors import StandardNormalPrior

PRIORS = ["normal", "mixture", "vamp"]
LIKELIHOODS = ["bernoulli", "gaussian", "studentt"]


def _model(prior, likelihood, seed=0, p=12, d=3):
    torch.manual_seed(seed)
    return DLVM(p, d, hidden=(9,), prior=prior, likelihood=likelihood, num_components=4,
                num_pseudo_inputs=5)


def _data(likelihood, n=7, p=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    if likelihood == "bernoulli":
        return (torch.rand(n, p, generator=g) < 0.4).float()
    return torch.randn(n, p, generator=g)


def _mask(n=7, p=12, seed=2):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, p, generator=g) < 0.75
    mask[:, 0] = True  # every row keeps an observed entry
    return mask


def _objectives():
    return [ELBO(), ELBO(3, beta=0.4, gradient="stl"), IWAE(6), IWAE(6, gradient="dreg"),
            IWAE(6, gradient="stl")]


def _traced(objective):
    kwargs = dict(num_particles=objective.num_particles, gradient=objective.gradient,
                  fast_path=False)
    if isinstance(objective, ELBO):
        kwargs["beta"] = objective.beta
    return type(objective)(**kwargs)


def _loss_and_grads(model, objective, x, mask, seed):
    model.zero_grad(set_to_none=True)
    with isolated_param_store():
        pyro.set_rng_seed(seed)
        loss = objective(model.model, model.guide, x, mask=mask, num_data=70)
        loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()
                         if p.grad is not None}


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("prior", PRIORS)
@pytest.mark.parametrize("masked", [False, True], ids=["complete", "masked"])
def test_same_draws_and_log_weights_as_tracing(prior, likelihood, masked):
    model = _model(prior, likelihood)
    x, mask = _data(likelihood), (_mask() if masked else None)
    assert pyro_free_terms(model.model, model.guide) is not None
    with isolated_param_store():
        pyro.set_rng_seed(3)
        traced = trace_log_terms(model.model, model.guide, x, 5, mask)
        pyro.set_rng_seed(3)
        fast = model.log_weight_terms(x, 5, mask)
    for name in ("log_lik", "log_prior", "log_q"):
        expected = getattr(traced, name)
        got = getattr(fast, name)
        assert got.shape == expected.shape == (5, 7)
        # float32 sums of at most 12 terms of size O(10): rounding is ~1e-5 absolute
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-5)
    # same generator consumption: the next draw agrees too
    with isolated_param_store():
        pyro.set_rng_seed(3)
        trace_log_terms(model.model, model.guide, x, 5, mask)
        after_traced = torch.rand(3)
        pyro.set_rng_seed(3)
        model.log_weight_terms(x, 5, mask)
        after_fast = torch.rand(3)
    assert torch.equal(after_traced, after_fast)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("prior", PRIORS)
def test_every_objective_has_the_traced_value_and_gradient(prior, likelihood):
    model = _model(prior, likelihood)
    x, mask = _data(likelihood), _mask()
    for objective in _objectives():
        for m in (None, mask):
            loss_fast, grads_fast = _loss_and_grads(model, objective, x, m, seed=11)
            loss_traced, grads_traced = _loss_and_grads(model, _traced(objective), x, m, seed=11)
            assert math.isclose(loss_fast, loss_traced, rel_tol=1e-5), objective
            assert set(grads_fast) == set(grads_traced), objective
            for name, g in grads_traced.items():
                scale = g.abs().max().clamp_min(1e-6)
                err = float((grads_fast[name] - g).abs().max() / scale)
                assert err < 1e-4, (objective, m is not None, name, err)


def test_bounds_without_gradients_use_the_fast_path_and_agree():
    model = _model("normal", "bernoulli")
    x = _data("bernoulli")
    for objective in _objectives():
        with isolated_param_store():
            pyro.set_rng_seed(5)
            fast = objective.bound_per_point(model.model, model.guide, x)
            pyro.set_rng_seed(5)
            traced = _traced(objective).bound_per_point(model.model, model.guide, x)
        torch.testing.assert_close(fast, traced, rtol=1e-5, atol=1e-4)


def test_the_fast_path_makes_no_pyro_calls():
    model = _model("vamp", "bernoulli")
    x = _data("bernoulli")

    def forbidden(*args, **kwargs):
        raise AssertionError("pyro.sample called on the Pyro-free path")

    with mock.patch("pyro.sample", forbidden), isolated_param_store():
        lw = log_weights(model.model, model.guide, x, 4)
        IWAE(4, gradient="dreg")(model.model, model.guide, x).backward()
    assert lw.shape == (4, 7)
    with mock.patch("pyro.sample", forbidden), isolated_param_store(), \
            pytest.raises(AssertionError, match="Pyro-free"):
        log_weights(model.model, model.guide, x, 4, fast_path=False)


class _OwnModel(DLVM):
    def model(self, x, mask=None):  # e.g. a user's extra site or changed prior
        return super().model(x, mask)


class _OwnGuide(DLVM):
    def guide(self, x, mask=None):
        return super().guide(x, mask)


class _OwnEncoder(DLVM):
    def _encode(self, x):
        loc, scale = super()._encode(x)
        return loc, scale * 2


class _OwnPrior(StandardNormalPrior):
    def distribution(self):
        return pyro.distributions.Normal(self.loc + 1.0, self.scale).to_event(1)


def test_the_fast_path_switches_itself_off_when_tracing_could_differ():
    base = _model("normal", "bernoulli")
    other = _model("normal", "bernoulli")
    assert pyro_free_terms(base.model, base.guide) is not None
    # model and guide of different instances, plain functions, overridden methods
    assert pyro_free_terms(base.model, other.guide) is None
    assert pyro_free_terms(lambda x, mask=None: None, base.guide) is None
    for cls in (_OwnModel, _OwnGuide, _OwnEncoder):
        m = cls(12, 3, hidden=(9,))
        assert pyro_free_terms(m.model, m.guide) is None, cls.__name__
    custom = DLVM(12, 3, hidden=(9,), prior=_OwnPrior(3))
    assert pyro_free_terms(custom.model, custom.guide) is None
    # an active handler must see the sample sites
    with poutine.trace():
        assert pyro_free_terms(base.model, base.guide) is None
    with poutine.scale(scale=2.0):
        assert pyro_free_terms(base.model, base.guide) is None


def test_handlers_around_an_objective_are_honoured():
    model = _model("normal", "bernoulli")
    x = _data("bernoulli")
    with isolated_param_store():
        pyro.set_rng_seed(0)
        plain = ELBO().loss(model.model, model.guide, x)
        pyro.set_rng_seed(0)
        with poutine.scale(scale=2.0):
            scaled = ELBO().loss(model.model, model.guide, x)
    assert math.isclose(scaled, 2 * plain, rel_tol=1e-6)


def test_subclass_that_changes_the_model_is_scored_by_tracing():
    x = _data("bernoulli")
    torch.manual_seed(0)
    changed = _OwnEncoder(12, 3, hidden=(9,))
    with isolated_param_store():
        pyro.set_rng_seed(4)
        fast_default = log_weights(changed.model, changed.guide, x, 3)
        pyro.set_rng_seed(4)
        traced = trace_log_terms(changed.model, changed.guide, x, 3).log_weights
    assert torch.equal(fast_default, traced)


def test_fast_path_checks_the_data_under_validation():
    model = _model("normal", "bernoulli")
    x = _data("bernoulli")
    x[2, 5] = 0.5
    with pytest.raises(ValueError, match=r"outside \{0, 1\}.*row 2, column 5"):
        model.log_weight_terms(x, 2)
    with pytest.raises(ValueError, match="shape"):
        model.log_weight_terms(x[:, :5], 2)


def test_bernoulli_log_prob_matches_torch_for_binary_and_fractional_data():
    g = torch.Generator().manual_seed(0)
    logits = 6 * torch.randn(4, 5, 30, generator=g)
    x = (torch.rand(5, 30, generator=g) < 0.5).float()
    mask = torch.rand(5, 30, generator=g) < 0.7
    expected = TorchBernoulli(logits=logits).log_prob(x.expand_as(logits))
    lik = Bernoulli(data_dim=30)
    torch.testing.assert_close(lik.log_prob(x, logits), expected.sum(-1), rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(lik.log_prob(x, logits, mask),
                               torch.where(mask, expected, 0.0).sum(-1), rtol=1e-6, atol=1e-4)
    frac = torch.rand(5, 30, generator=g)
    soft = Bernoulli(allow_fractional=True, data_dim=30)
    expected_frac = TorchBernoulli(logits=logits, validate_args=False).log_prob(frac)
    torch.testing.assert_close(soft.log_prob(frac, logits), expected_frac.sum(-1), rtol=1e-6,
                               atol=1e-4)


def test_fit_gives_the_same_result_with_and_without_the_fast_path():
    x = _data("bernoulli", n=40)
    results = []
    for fast in (True, False):
        model = _model("mixture", "bernoulli", seed=3)
        result = fit(model, x, objective=IWAE(4, gradient="dreg", fast_path=fast), epochs=3,
                     batch_size=10, lr=1e-2, seed=7, progress=False)
        results.append((result.step_losses, {k: v.clone() for k, v in
                                             model.state_dict().items()}))
    (loss_a, state_a), (loss_b, state_b) = results
    # identical draws and estimators; only float rounding differs between the two paths
    assert len(loss_a) == len(loss_b) == 12
    for a, b in zip(loss_a, loss_b):
        assert math.isclose(a, b, rel_tol=1e-4)
    for key in state_a:
        torch.testing.assert_close(state_a[key], state_b[key], rtol=1e-3, atol=1e-5)


def test_default_optimizer_is_fused_adam_where_torch_has_the_kernel():
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


def _compile_works() -> bool:
    try:
        torch.compile(lambda t: torch.tanh(t) * 2)(torch.ones(2))
    except Exception:  # no C++ toolchain for inductor on this machine
        return False
    return True


@pytest.mark.skipif(not _compile_works(), reason="torch.compile (inductor) unavailable")
def test_compiled_objectives_match_the_eager_ones():
    model = _model("vamp", "bernoulli")
    x, mask = _data("bernoulli"), _mask()
    for objective in (ELBO(compile=True), IWAE(6, gradient="dreg", compile=True)):
        eager = type(objective)(num_particles=objective.num_particles,
                                gradient=objective.gradient)
        for m in (None, mask):
            loss_c, grads_c = _loss_and_grads(model, objective, x, m, seed=2)
            loss_e, grads_e = _loss_and_grads(model, eager, x, m, seed=2)
            assert math.isclose(loss_c, loss_e, rel_tol=1e-5), objective
            for name, g in grads_e.items():
                err = float((grads_c[name] - g).abs().max() / g.abs().max().clamp_min(1e-6))
                assert err < 1e-4, (objective, name, err)
    assert "compile=True" in repr(ELBO(compile=True))


def test_compile_needs_the_fast_path_and_warns_for_traced_pairs():
    with pytest.raises(ValueError, match="fast_path"):
        ELBO(compile=True, fast_path=False)
    with pytest.raises(ValueError, match="compile must be True or False"):
        IWAE(3, compile="yes")
    model = _model("normal", "bernoulli")
    other = _model("normal", "bernoulli")
    x = _data("bernoulli")
    objective = ELBO(compile=True)
    with pytest.warns(UserWarning, match="no Pyro-free path"):
        objective(model.model, other.guide, x)
    objective(model.model, other.guide, x)  # warned once per objective


def test_data_validated_up_front_is_not_rechecked_per_call():
    from pyro_lvm.models.validation import data_checked, per_call_data_checks

    model = _model("normal", "bernoulli")
    x = _data("bernoulli")
    x[1, 1] = 0.25
    assert per_call_data_checks()
    with data_checked():
        assert not per_call_data_checks()
        model.log_weight_terms(x, 2)  # the caller vouches for the data: no per-call check
    assert per_call_data_checks()
    with pytest.raises(ValueError, match="outside"):
        model.log_weight_terms(x, 2)
    with pyro.validation_enabled(False):
        assert not per_call_data_checks()
    # fit itself still rejects the bad row before the first step
    with pytest.raises(ValueError, match=r"row 1, column 1"):
        fit(model, x, epochs=1, batch_size=7, progress=False)


def test_a_pyro_param_anywhere_in_the_model_switches_the_fast_path_off():
    from pyro.nn import PyroModule, PyroParam

    model = _model("normal", "bernoulli")
    assert pyro_free_terms(model.model, model.guide) is not None
    holder = PyroModule()
    holder.offset = PyroParam(torch.zeros(3))
    model.decoder.add_module("extra", holder)  # nested two levels down
    assert pyro_free_terms(model.model, model.guide) is None


@pytest.mark.skipif(not _compile_works(), reason="torch.compile (inductor) unavailable")
def test_compiled_path_is_not_recompiled_for_every_model_instance():
    import torch._dynamo

    x = _data("bernoulli")
    objective = IWAE(3, compile=True)

    def train_step(seed):
        model = _model("vamp", "bernoulli", seed=seed)
        objective(model.model, model.guide, x).backward()

    for seed in range(2):  # the first instances compile (and may specialize shapes once)
        train_step(seed)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for seed in range(2, 12):  # torch gives up compiling after 8 recompilations of a function
        train_step(seed)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
