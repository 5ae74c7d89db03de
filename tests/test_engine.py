"""The engine (inference/engine.py): one device policy (an evaluation leaves the pair where, in
the mode and with the parameters it found it), one chunk policy (every entry point plans its
chunks with the same element budget), one data validation."""
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_lvm.inference import (diagnose, elbo, engine, fit, importance_diagnostics,
                                latent_usage, log_likelihood, reconstruction_error)
from pyro_lvm.models.dlvm import DLVM

P, D = 5, 2


def binary_data(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, P, generator=g) < 0.5).float()


def small_dlvm():
    torch.manual_seed(0)
    return DLVM(P, D, hidden=(4,), prior="normal", likelihood="bernoulli")


ENTRY_POINTS = {
    "log_likelihood": lambda m, x: log_likelihood(m, x, num_samples=4, progress=False),
    "elbo": lambda m, x: elbo(m, x, num_samples=2, progress=False),
    "reconstruction_error": lambda m, x: reconstruction_error(m, x),
    "importance_diagnostics": lambda m, x: importance_diagnostics(m, x, 25, progress=False),
    "diagnose": lambda m, x: diagnose(m, x, num_samples=25, include_predictive=False,
                                      progress=False),
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_evaluation_moves_the_module_back_and_restores_its_modes(entry, monkeypatch):
    """Asked for another device, every evaluation entry point moves the module there and
    back afterwards, leaves every submodule's training flag as it was (a part frozen in eval
    mode stays so) and the caller's random state and parameter store untouched. On a CPU-only
    machine "another device" is ``cpu:0`` (a different torch.device that needs no GPU)."""
    elsewhere = torch.device("cpu", 0)
    monkeypatch.setattr(engine, "resolve_device", lambda device="auto": elsewhere)
    model = small_dlvm()
    model.train()
    model.decoder.eval()  # a frozen part
    flags = {name: m.training for name, m in model.named_modules()}
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    moves = []
    original_to = model.to

    def spy(*args, **kwargs):
        moves.append(args[0] if args else kwargs.get("device"))
        return original_to(*args, **kwargs)

    monkeypatch.setattr(model, "to", spy)
    store_before = dict(pyro.get_param_store().items())
    rng_before = torch.get_rng_state()
    ENTRY_POINTS[entry](model, binary_data())
    assert moves and moves[0] == elsewhere and moves[-1] == torch.device("cpu")
    assert len(moves) % 2 == 0  # every move there has its move back
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert {name: p.dtype for name, p in model.named_parameters()} == dtypes
    assert all(p.device == torch.device("cpu") for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert dict(pyro.get_param_store().items()) == store_before


def test_session_restores_even_when_the_evaluation_fails(monkeypatch):
    elsewhere = torch.device("cpu", 0)
    monkeypatch.setattr(engine, "resolve_device", lambda device="auto": elsewhere)
    model = small_dlvm()
    model.train()
    moves = []
    original_to = model.to
    monkeypatch.setattr(model, "to", lambda d: (moves.append(d), original_to(d))[1])
    with pytest.raises(RuntimeError, match="boom"):
        with engine.session(model, binary_data()) as s:
            assert not model.training and not torch.is_grad_enabled()
            assert s.x.shape == (12, P)
            raise RuntimeError("boom")
    assert moves == [elsewhere, torch.device("cpu")]
    assert model.training and torch.is_grad_enabled()


def test_a_module_already_on_the_device_is_not_moved(monkeypatch):
    model = small_dlvm()
    moves = []
    original_to = model.to
    monkeypatch.setattr(model, "to", lambda d: (moves.append(d), original_to(d))[1])
    log_likelihood(model, binary_data(), num_samples=2, device="cpu", progress=False)
    assert moves == []


def test_fit_keeps_the_trained_module_on_its_device(monkeypatch):
    """The one documented exception: fit trains in place and leaves the module on ``device``
    (``FitResult.device``)."""
    elsewhere = torch.device("cpu", 0)
    monkeypatch.setattr(engine, "resolve_device", lambda device="auto": elsewhere)
    model = small_dlvm()
    moves = []
    original_to = model.to
    monkeypatch.setattr(model, "to", lambda d: (moves.append(d), original_to(d))[1])
    result = fit(model, binary_data(), epochs=1, batch_size=6, progress=False)
    assert moves == [elsewhere] and result.device == elsewhere


def test_one_chunk_policy_for_every_entry_point(monkeypatch):
    """fit's validation, log_likelihood, elbo and the diagnostics all plan chunks with
    engine.plan_chunks under the device's one budget (engine.default_max_elements)."""
    budget = 4 * 3 * P  # room for 12 draws of one row
    monkeypatch.setattr(engine, "default_max_elements", lambda device: budget)
    calls = []
    original = engine.plan_chunks

    def spy(*args, **kwargs):
        calls.append(kwargs.get("max_elements"))
        rows, particles = original(*args, **kwargs)
        assert rows * particles * args[2] <= max(budget, args[2]) or \
            kwargs.get("batch_size") or kwargs.get("chunk_size")
        return rows, particles

    monkeypatch.setattr(engine, "plan_chunks", spy)
    model, x = small_dlvm(), binary_data()
    estimate = log_likelihood(model, x, num_samples=24, progress=False)
    assert estimate.particles_per_chunk * estimate.rows_per_chunk * P <= budget
    elbo(model, x, num_samples=2, progress=False)
    importance_diagnostics(model, x, 30, progress=False)
    latent_usage(model, x, progress=False)
    fit(model, x, epochs=1, batch_size=6, validation=x, progress=False, device="cpu")
    assert len(calls) >= 5 and set(calls) == {budget}


def test_no_other_budget_is_left():
    import pyro_lvm.inference.diagnostics._common as common
    import pyro_lvm.inference.evaluate as evaluate

    for module in (common, evaluate):
        assert not [n for n in vars(module) if "BUDGET" in n or n == "DEFAULT_MAX_ELEMENTS"]
    assert engine.default_max_elements("cpu") == engine.DEFAULT_MAX_ELEMENTS == 2 ** 25


def test_prepare_data_validates_before_anything_and_passes_the_name():
    seen = []

    class Pair:
        data_dim = P

        def model(self, x, mask=None):
            pass

        def guide(self, x, mask=None):
            pass

        def check_data(self, x, mask=None, name="data"):
            seen.append(name)

    x, mask = engine.prepare_data(Pair(), binary_data(), name="validation")
    assert seen == ["validation"] and x.dtype == torch.float32 and mask is None
    with pytest.raises(ValueError, match="column"):
        engine.prepare_data(Pair(), torch.zeros(3, P + 1))
    bad = binary_data()
    bad[4, 2] = float("nan")
    with pytest.raises(ValueError, match=r"row 4, column 2"):
        engine.prepare_data(Pair(), bad)


def test_plain_function_pairs_are_evaluated_on_a_snapshot_of_their_parameters():
    def model(x, mask=None):
        loc = pyro.param("loc", lambda: torch.zeros(P))
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", dist.Normal(x.new_zeros(D), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(loc + z.sum(-1, keepdim=True), 1.0).to_event(1), obs=x)

    def guide(x, mask=None):
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", dist.Normal(x.new_zeros(D), 1.0).to_event(1))

    x = torch.randn(6, P)
    with pyro.get_param_store().scope():
        pyro.param("loc", torch.full((P,), 3.0))
        with engine.session((model, guide), x) as s:
            assert torch.equal(pyro.param("loc"), torch.full((P,), 3.0))
            pyro.get_param_store()["loc"] = torch.zeros(P)  # changes stay inside
            assert s.module is None
        assert torch.equal(pyro.param("loc"), torch.full((P,), 3.0))
