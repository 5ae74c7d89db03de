"""ProgramPair: a pair written once as two programs, run through Pyro or directly
(``pyro_lvm.models.program``, ``pyro_lvm.inference.programs``)."""
import copy
import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.nn import PyroModule, PyroSample
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import _PYRO_STACK

from pyro_lvm import check_contract, fit, log_likelihood
from pyro_lvm.inference import programs
from pyro_lvm.inference.contract import ContractError
from pyro_lvm.inference.importance_weights import _record, trace_log_terms
from pyro_lvm.inference.objectives import ELBO, IWAE
from pyro_lvm.models import DLVM, ClusterDLVM, LectureDLVM, ProgramPair


@pytest.fixture
def direct_runs(monkeypatch):
    """Counts the direct runs of programs."""
    calls = []
    original = programs.record_program

    def counted(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(programs, "record_program", counted)
    return calls


def _binary(n=12, p=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, p, generator=g) < 0.4).float()


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


def _loss_and_grads(pair, objective, x, mask=None, traced=False, seed=1):
    """Loss and gradients at a fixed seed; ``traced``: with a handler active, which makes the
    engine run the pair through Pyro."""
    pair.zero_grad(set_to_none=True)
    pyro.set_rng_seed(seed)
    with (Messenger() if traced else _nothing()):
        loss = objective.differentiable_loss(pair.model, pair.guide, x, mask=mask, num_data=50)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in pair.named_parameters() if p.grad is not None}
    return loss.detach(), grads


OBJECTIVES = [lambda: IWAE(5), ELBO, lambda: ELBO(num_particles=3),
              lambda: ELBO(analytic_kl=True), lambda: IWAE(3, gradient="dreg"),
              lambda: ELBO(gradient="stl")]


@pytest.mark.parametrize("prior", ["normal", "mixture", "vamp"])
@pytest.mark.parametrize("make_objective", OBJECTIVES, ids=lambda make: make().name)
def test_direct_run_gives_the_pyro_runs_losses_and_gradients_bit_for_bit(prior, make_objective,
                                                                         direct_runs):
    objective = make_objective()
    torch.manual_seed(0)
    pair = DLVM(10, 3, prior=prior, hidden=(7,), num_components=3, num_pseudo_inputs=4)
    x = _binary()
    with pytest.warns(UserWarning, match="no closed-form KL") if (
            objective.name == "elbo_analytic_kl" and prior != "normal") else _nothing():
        direct = _loss_and_grads(pair, objective, x)
    assert direct_runs, "the DLVM's programs were not run directly"
    runs = len(direct_runs)
    traced = _loss_and_grads(pair, objective, x, traced=True)
    assert len(direct_runs) == runs, "an active handler must make the engine use Pyro"
    assert torch.equal(direct[0], traced[0])
    assert direct[1].keys() == traced[1].keys() and direct[1]
    for name in direct[1]:
        assert torch.equal(direct[1][name], traced[1][name]), name


@pytest.mark.parametrize("likelihood", ["gaussian", "studentt", "bernoulli"])
def test_direct_run_with_a_mask_and_other_likelihoods(likelihood, direct_runs):
    torch.manual_seed(0)
    pair = DLVM(6, 2, likelihood=likelihood, hidden=(5,))
    x = _binary(8, 6) if likelihood == "bernoulli" else torch.randn(8, 6)
    mask = torch.rand(8, 6, generator=torch.Generator().manual_seed(3)) < 0.7
    direct = _loss_and_grads(pair, IWAE(4), x, mask=mask)
    assert direct_runs
    traced = _loss_and_grads(pair, IWAE(4), x, mask=mask, traced=True)
    assert torch.equal(direct[0], traced[0])
    assert all(torch.equal(direct[1][n], traced[1][n]) for n in direct[1])


@pytest.mark.parametrize("pair_factory", [
    lambda: LectureDLVM(hidden=(6,)),
    lambda: ClusterDLVM(5, 2, num_clusters=3, hidden=(6,)),
], ids=["lecture", "cluster"])
def test_other_program_pairs_agree_too(pair_factory, direct_runs):
    torch.manual_seed(0)
    pair = pair_factory()
    x = torch.randn(9, pair.data_dim) if isinstance(pair, LectureDLVM) else _binary(9, 5)
    direct = _loss_and_grads(pair, IWAE(3), x)
    assert direct_runs
    traced = _loss_and_grads(pair, IWAE(3), x, traced=True)
    assert torch.equal(direct[0], traced[0])


@pytest.mark.parametrize("num_particles, particle_dim", [(3, True), (1, True), (1, False)])
def test_direct_trace_has_the_fields_of_a_pyro_trace(num_particles, particle_dim):
    torch.manual_seed(0)
    pair = DLVM(10, 3, hidden=(7,))
    x = _binary()
    traces = []
    for traced in (False, True):
        pyro.set_rng_seed(4)
        with (Messenger() if traced else _nothing()):
            guide = _record(pair.guide, x, num_particles, None, particle_dim=particle_dim)
            model = _record(pair.model, x, num_particles, None, replay=guide,
                            enumerate_sites=True, particle_dim=particle_dim)
        traces.append((guide, model))
    for direct, pyro_trace in zip(*traces):
        pyro_sites = {n: s for n, s in pyro_trace.nodes.items()
                      if s["type"] == "sample" and s["name"] != "data"}
        assert list(direct.nodes) == list(pyro_sites)
        for name, site in direct.nodes.items():
            other = pyro_sites[name]
            for key in ("type", "name", "is_observed", "args", "kwargs", "scale", "mask",
                        "cond_indep_stack", "done"):
                assert site[key] == other[key], (name, key)
            # Pyro's enumeration handler, around the model run through Pyro, notes its
            # (here empty) enumeration dims in each site's infer dict
            assert site["infer"] == {k: v for k, v in other["infer"].items()
                                     if k != "_dim_to_id"}, name
            assert torch.equal(site["value"], other["value"])
            assert type(site["fn"]) is type(other["fn"])
            assert site["fn"].batch_shape == other["fn"].batch_shape
            assert site["fn"].has_rsample == other["fn"].has_rsample


def test_direct_run_keeps_pyros_shape_error():
    class Clashing(ProgramPair, torch.nn.Module):
        def guide_program(self, x, mask, sample):
            return sample("z", dist.Normal(torch.zeros(3, 2), 1.0).to_event(1))

        def model_program(self, x, mask, sample):
            sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            sample("x", dist.Normal(x, 1.0).to_event(1), obs=x)

    pair = Clashing()
    x = torch.randn(5, 2)
    messages = []
    for traced in (False, True):
        with pytest.raises(ValueError) as info, (Messenger() if traced else _nothing()):
            trace_log_terms(pair.model, pair.guide, x, 2)
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    assert "Shape mismatch inside plate('data') at site z dim -1, 5 vs 3" in messages[0]


# ------------------------------------------------------------------ a user's own program pair
class LinearGaussianProgram(ProgramPair, torch.nn.Module):
    """z ~ N(0, I_1), x | z ~ N(w z + b, s^2 I_p): log p(x) = log N(x; b, w w^T + s^2 I)."""

    def __init__(self, p=3):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([[1.0], [-0.5], [0.3]])[:p])
        self.b = torch.nn.Parameter(torch.tensor([0.2, -0.1, 0.4])[:p])
        self.log_s = torch.nn.Parameter(torch.tensor(-0.3))
        self.enc = torch.nn.Linear(p, 2)

    def guide_program(self, x, mask, sample):
        out = self.enc(x)
        return sample("z", dist.Normal(out[..., :1], torch.nn.functional.softplus(out[..., 1:])
                                       + 1e-3).to_event(1))

    def model_program(self, x, mask, sample):
        z = sample("z", dist.Normal(torch.zeros(1), 1.0).to_event(1))
        loc = z @ self.w.T + self.b
        sample("x", dist.Normal(loc, self.log_s.exp()).to_event(1), obs=x)

    def exact_log_p(self, x):
        cov = self.w @ self.w.T + self.log_s.exp() ** 2 * torch.eye(self.w.shape[0])
        return dist.MultivariateNormal(self.b, covariance_matrix=cov).log_prob(x)


def test_a_users_program_pair_fits_and_evaluates_against_its_closed_form(direct_runs):
    torch.manual_seed(0)
    truth = LinearGaussianProgram()
    with torch.no_grad():
        z = torch.randn(400, 1)
        x = z @ truth.w.T + truth.b + truth.log_s.exp() * torch.randn(400, 3)
    pair = LinearGaussianProgram()
    report = check_contract(pair, x[:8])
    assert report.latent_sites == {"z": (1,)}
    result = fit(pair, x, objective=IWAE(5), epochs=3, batch_size=50, seed=0, progress=False)
    assert direct_runs.count("model_program") >= 3 * 8
    assert math.isfinite(result.step_losses[-1])
    estimate = log_likelihood(pair, x[:40], num_samples=2000, seed=0)
    with torch.no_grad():
        exact = pair.exact_log_p(x[:40]).mean().item()
    assert abs(estimate.mean - exact) < 4 * estimate.mc_se + 1e-4, (estimate.mean, exact)


def test_fit_of_a_program_pair_equals_fit_through_pyro_bit_for_bit(direct_runs):
    torch.manual_seed(0)
    pair = DLVM(10, 2, hidden=(6,))
    twin, initial = copy.deepcopy(pair), copy.deepcopy(pair)
    x = _binary(60, 10, seed=5)
    direct = fit(pair, x, objective=IWAE(3), epochs=2, batch_size=20, seed=3, progress=False)
    runs = len(direct_runs)
    assert runs >= 2 * 2 * 3  # guide and model of every step ran directly

    # the same module, its model and guide run through Pyro: a handler around each call
    def model(x, mask=None):
        with Messenger():
            return twin.model(x, mask)

    def guide(x, mask=None):
        with Messenger():
            return twin.guide(x, mask)

    traced = fit(_Wrapped(twin, model, guide), x, objective=IWAE(3), epochs=2, batch_size=20,
                 seed=3, progress=False)
    assert len(direct_runs) == runs  # the wrapped pair trained through Pyro
    assert direct.step_losses == traced.step_losses
    for (name, a), (_, b) in zip(pair.named_parameters(), twin.named_parameters()):
        assert torch.equal(a, b), name
    assert not any(torch.equal(a, b) for a, b in zip(pair.parameters(), initial.parameters()))


class _Wrapped(torch.nn.Module):
    def __init__(self, inner, model, guide):
        super().__init__()
        self.inner, self.model, self.guide = inner, model, guide


# ------------------------------------------------------------------ refusals
class _Base(ProgramPair, torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.loc = torch.nn.Parameter(torch.zeros(2))

    def guide_program(self, x, mask, sample):
        return sample("z", dist.Normal(self.loc.expand(x.shape[0], 2), 1.0).to_event(1))

    def model_program(self, x, mask, sample):
        z = sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)


class DirectSample(_Base):
    """A valid Pyro pair (its guide samples ``w`` too), but ``w`` bypasses ``sample``."""

    def guide_program(self, x, mask, sample):
        pyro.sample("w", dist.Normal(torch.zeros(x.shape[0], 2), 1.0).to_event(1))
        return super().guide_program(x, mask, sample)

    def model_program(self, x, mask, sample):
        w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        z = sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        sample("x", dist.Normal(z + w, 1.0).to_event(1), obs=x)


class InferArgument(_Base):
    def model_program(self, x, mask, sample):
        z = sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1), infer={"x": 1})
        sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)


class HandlerDependent(_Base):
    def model_program(self, x, mask, sample):
        z = sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        shift = 1.0 if len(_PYRO_STACK) > 2 else 0.0
        sample("x", dist.Normal(z + shift, 1.0).to_event(1), obs=x)


class SlightlyHandlerDependent(_Base):
    """Differs between the runs by 1e-5 of the observation scale only."""

    def model_program(self, x, mask, sample):
        z = sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        scale = 1.0 + (1e-5 if len(_PYRO_STACK) > 2 else 0.0)
        sample("x", dist.Normal(z, scale).to_event(1), obs=x)


class Deterministic(_Base):
    def model_program(self, x, mask, sample):
        z = sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.deterministic("mean", z.sum(-1))
        sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)


class Factor(_Base):
    def model_program(self, x, mask, sample):
        z = sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.factor("penalty", -z.pow(2).sum(-1))
        sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)


class InnerPlate(_Base):
    def model_program(self, x, mask, sample):
        z = sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("cols", 2, dim=-2):
            pass
        sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)


class WithPyroSample(ProgramPair, PyroModule):
    def __init__(self):
        super().__init__()
        self.bias = PyroSample(dist.Normal(0.0, 1.0))

    def guide_program(self, x, mask, sample):
        self.bias  # the guide draws the model's PyroSample site too (a valid Pyro pair)
        return sample("z", dist.Normal(torch.zeros(x.shape[0], 2), 1.0).to_event(1))

    def model_program(self, x, mask, sample):
        z = sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        sample("x", dist.Normal(z + self.bias.unsqueeze(-1), 1.0).to_event(1), obs=x)


@pytest.mark.parametrize("cls, message", [
    (DirectSample, r"programs directly failed: a pyro.sample statement \(or a PyroSample "
                   r"attribute\) \('w'\)"),
    (InferArgument, r"sample takes \(name, fn, obs=None\), got infer"),
    (HandlerDependent, r"must not depend on the Pyro handlers"),
    (SlightlyHandlerDependent, r"must not depend on the Pyro handlers"),
    (Deterministic, r"programs directly failed: a pyro.deterministic statement \('mean'\)"),
    (Factor, r"programs directly failed: a pyro.factor statement \('penalty'\)"),
    (InnerPlate, r"programs directly failed: a pyro.plate \('cols'\)"),
    (WithPyroSample, r"programs directly failed: a pyro.sample statement \(or a PyroSample "
                     r"attribute\) \('bias'\)"),
])
def test_check_contract_refuses_programs_that_a_direct_run_cannot_reproduce(cls, message):
    x = torch.randn(6, 2)
    with pytest.raises(ContractError, match=message):
        check_contract(cls(), x)
    with pytest.raises(ContractError, match=message):
        fit(cls(), x, epochs=1, batch_size=6, progress=False)


def test_the_well_behaved_base_passes_the_same_check():
    """Positive control for the refusals above."""
    check_contract(_Base(), torch.randn(6, 2))


def test_a_subclass_overriding_model_is_run_through_pyro(direct_runs):
    class OwnModel(_Base):
        def model(self, x, mask=None):
            with pyro.plate("data", x.shape[0], dim=-1):
                z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
                pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    pair = OwnModel()
    assert programs.declared_program(pair.model) is None
    assert programs.declared_program(pair.guide) is not None
    IWAE(2).differentiable_loss(pair.model, pair.guide, torch.randn(4, 2))
    assert direct_runs == ["guide_program"]


def test_derived_model_and_guide_are_plain_pyro_functions():
    pair = _Base()
    x = torch.randn(4, 2)
    guide_trace = poutine.trace(pair.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(pair.model, trace=guide_trace)).get_trace(x)
    assert model_trace.nodes["z"]["value"] is guide_trace.nodes["z"]["value"]
    assert [f.name for f in model_trace.nodes["x"]["cond_indep_stack"]] == ["data"]
    assert ProgramPair.model.__name__ == "model" and ProgramPair.guide.__name__ == "guide"


def test_the_models_and_the_engine_name_the_data_plate_and_the_marker_alike():
    from pyro_lvm.inference import importance_weights
    from pyro_lvm.models import program

    assert program.DATA_PLATE == programs.DATA_PLATE == importance_weights.DATA_PLATE
    assert program.PROGRAM_ATTRIBUTE == programs.PROGRAM_ATTRIBUTE
    assert getattr(ProgramPair.model, programs.PROGRAM_ATTRIBUTE) == ("model_program",
                                                                     ProgramPair.model)


# ------------------------------------------------------------------ programs without a mask
class NoMaskProgram(ProgramPair, torch.nn.Module):
    """Written (self, x, sample): the pair takes no mask."""

    def __init__(self):
        super().__init__()
        self.loc = torch.nn.Parameter(torch.zeros(2))

    def guide_program(self, x, sample):
        return sample("z", dist.Normal(self.loc.expand(x.shape[0], 2), 1.0).to_event(1))

    def model_program(self, x, sample):
        z = sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)


def test_a_program_without_mask_runs_on_complete_data_and_refuses_missing_values(direct_runs):
    pair = NoMaskProgram()
    x = torch.randn(6, 2)
    assert not pair.program_takes_mask("model_program")
    check_contract(pair, x)
    full = torch.ones_like(x, dtype=torch.bool)
    IWAE(2).differentiable_loss(pair.model, pair.guide, x, mask=full)
    assert direct_runs[-2:] == ["guide_program", "model_program"]
    mask = full.clone()
    mask[3, 1] = False
    with pytest.raises(ContractError, match=r"1 missing value\(s\).*model's program "
                                            r"NoMaskProgram.model_program takes no mask"):
        check_contract(pair, x, mask)
    for traced in (False, True):  # the direct run and the derived Pyro functions alike
        with pytest.raises(ValueError, match="NoMaskProgram.guide_program takes no mask"), \
                (Messenger() if traced else _nothing()):
            IWAE(2).differentiable_loss(pair.model, pair.guide, x, mask=mask)
    with pytest.raises(ValueError, match="takes no mask"):
        log_likelihood(pair, x, mask=mask, num_samples=4)


def test_a_program_with_a_wrong_signature_is_named():
    class ThreeArguments(_Base):
        def model_program(self, x, mask, sample, extra):
            pass

    with pytest.raises(TypeError, match=r"model_program must take \(self, x, mask, sample\) or "
                                        r"\(self, x, sample\), got \(self, x, mask, sample, extra\)"):
        ThreeArguments().model(torch.randn(3, 2))


def test_an_override_made_with_functools_wraps_is_not_taken_for_the_derived_model(direct_runs):
    import functools

    class Flipped(_Base):
        @functools.wraps(_Base.model)
        def model(self, x, mask=None):
            return ProgramPair.model(self, x.flip(-1), mask)

    pair = Flipped()
    x = torch.randn(5, 2)
    assert programs.declared_program(pair.model) is None
    assert programs.declared_program(pair.guide) == ("guide_program", pair)
    direct = _loss_and_grads(pair, IWAE(3), x)
    assert direct_runs == ["guide_program"]
    traced = _loss_and_grads(pair, IWAE(3), x, traced=True)
    assert torch.equal(direct[0], traced[0])


def test_missing_values_through_nan_name_the_program_without_mask():
    x = torch.randn(6, 2)
    x[2, 0] = float("nan")
    with pytest.raises(ValueError, match=r"model's program NoMaskProgram.model_program takes no "
                                         r"mask.*model_program\(self, x, mask, sample\)"):
        log_likelihood(NoMaskProgram(), x, num_samples=4, allow_missing=True)


def test_the_advice_for_a_guide_program_without_mask_is_about_the_guide():
    class GuideWithoutMask(_Base):
        def guide_program(self, x, sample):
            return sample("z", dist.Normal(self.loc.expand(x.shape[0], 2), 1.0).to_event(1))

    mask = torch.ones(4, 2, dtype=torch.bool)
    mask[0, 0] = False
    with pytest.raises(ContractError, match=r"GuideWithoutMask.guide_program takes no mask.*"
                                            r"encode x with the missing ones set to 0"):
        check_contract(GuideWithoutMask(), torch.randn(4, 2), mask)
