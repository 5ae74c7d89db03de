"""inference/training/silent_modules.py: fit's training steps run a PyroModule pair without its
per-call parameter statements only where that cannot change a number (plain nn.Parameters,
no PyroParam / PyroSample, no outer handler), and the fit is then bit-identical to one that
issues every statement."""
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.nn import PyroModule, PyroParam, PyroSample
from pyro.nn.module import to_pyro_module_

import pyro_lvm.inference.training.step as fit_step
from pyro_lvm import IWAE, fit
from pyro_lvm.inference.training.silent_modules import silenceable_modules, silent_param_statements
from pyro_lvm.models.dlvm import DLVM
from pyro_lvm.models.linear import PPCA


def _dlvm():
    torch.manual_seed(0)
    return DLVM(12, 2, hidden=(8,), likelihood="bernoulli", prior="normal")


def _binary_rows(n=64, p=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, p, generator=g) < 0.4).float()


class _WithPyroSample(PyroModule):
    def __init__(self):
        super().__init__()
        self.loc = PyroSample(dist.Normal(0.0, 1.0))


class _WithPyroParam(PyroModule):
    def __init__(self):
        super().__init__()
        self.scale = PyroParam(torch.ones(2), constraint=dist.constraints.positive)


def test_only_trees_of_plain_parameters_are_silenced():
    model = _dlvm()
    modules = silenceable_modules(model)
    assert modules is not None and model in modules and model.likelihood in modules
    assert silenceable_modules(PPCA(12, 2)) is None            # PyroParams read the store
    assert silenceable_modules(_WithPyroSample()) is None      # sample statements need it
    assert silenceable_modules(_WithPyroParam()) is None
    assert silenceable_modules(torch.nn.Linear(2, 2)) is None  # pyro.module in user code
    assert silenceable_modules(None) is None
    # a sub-PyroModule converted in place has no Pyro name until first reached: left alone
    converted = _Converted()
    assert silenceable_modules(converted) is None
    converted(torch.zeros(1, 2))
    assert silenceable_modules(converted) is not None


class _Converted(PyroModule):
    def __init__(self):
        super().__init__()
        self.child = torch.nn.Linear(2, 2)
        to_pyro_module_(self.child)

    def forward(self, x):
        return self.child(x)


def test_module_local_params_setting_keeps_the_statements(monkeypatch):
    model, x = _dlvm(), _binary_rows(5)
    model.model(x), model.guide(x)
    modules = silenceable_modules(model)
    with pyro.settings.context(module_local_params=True):
        with silent_param_statements(modules):
            assert all(m._pyro_context is not _silent_context() for m in modules)


def _silent_context():
    from pyro_lvm.inference.training import silent_modules
    return silent_modules._SILENT


def _count_statements(monkeypatch):
    counts = {"param": 0, "module": 0}
    real_param, real_module = pyro.param, pyro.module

    def param(*args, **kwargs):
        counts["param"] += 1
        return real_param(*args, **kwargs)

    def module(*args, **kwargs):
        counts["module"] += 1
        return real_module(*args, **kwargs)

    monkeypatch.setattr(pyro, "param", param)
    monkeypatch.setattr(pyro, "module", module)
    return counts


def test_silent_block_issues_no_statement_and_restores_the_context(monkeypatch):
    model, x = _dlvm(), _binary_rows(5)
    counts = _count_statements(monkeypatch)
    model.model(x), model.guide(x)
    assert all(m._pyro_context is _silent_context() for m in _silenced_inside(model))
    assert counts["module"] >= 2  # positive control: the statements are counted
    counts.update(param=0, module=0)
    contexts = [m._pyro_context for m in silenceable_modules(model)]
    with silent_param_statements(silenceable_modules(model)):
        torch.manual_seed(3)
        quiet = model.model(x)
    assert counts == {"param": 0, "module": 0}
    assert [m._pyro_context for m in silenceable_modules(model)] == contexts
    torch.manual_seed(3)
    torch.testing.assert_close(quiet, model.model(x), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="boom"):
        with silent_param_statements(silenceable_modules(model)):
            raise RuntimeError("boom")
    assert [m._pyro_context for m in silenceable_modules(model)] == contexts


def test_an_outer_handler_still_sees_every_parameter():
    model, x = _dlvm(), _binary_rows(5)
    with poutine.trace(param_only=True) as tr:
        with silent_param_statements(silenceable_modules(model)):
            model.guide(x)
            model.model(x)
    seen = {id(site["value"]) for site in tr.trace.nodes.values() if site["type"] == "param"}
    assert {id(p) for p in model.parameters()} <= seen


@pytest.mark.parametrize("objective", [None, IWAE(3)])
def test_fit_is_bit_identical_with_and_without_the_statements(monkeypatch, objective):
    x = _binary_rows()

    def run():
        pyro.clear_param_store()
        model = _dlvm()
        kwargs = {} if objective is None else {"objective": objective}
        result = fit(model, x, epochs=2, batch_size=16, seed=5, progress=False, **kwargs)
        return result, {n: p.detach().clone() for n, p in model.named_parameters()}

    silent_result, silent_params = run()
    monkeypatch.setattr(fit_step, "silenceable_modules", lambda module: None)
    loud_result, loud_params = run()
    assert silent_result.step_losses == loud_result.step_losses
    for name, value in loud_params.items():
        assert torch.equal(silent_params[name], value), name


def _silenced_inside(model):
    """The modules' contexts as seen inside a silent block (positive control of the swap)."""
    modules = silenceable_modules(model)
    with silent_param_statements(modules):
        return [type("Seen", (), {"_pyro_context": m._pyro_context})() for m in modules]


def test_pyros_own_elbos_are_never_silenced(monkeypatch):
    """RenyiELBO.loss_and_grads takes its gradient step only when the trace holds param
    sites: with Pyro's ELBOs every statement is issued (the fit equals a loud one)."""
    x = _binary_rows()

    def run():
        pyro.clear_param_store()
        model = _dlvm()
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        fit(model, x, objective=pyro.infer.RenyiELBO(alpha=0.5, num_particles=2), epochs=3,
            batch_size=x.shape[0], seed=5, progress=False)  # full batch: RenyiELBO is biased
        # with minibatches (fit warns)
        return {n: (p.detach() - start[n]) for n, p in model.named_parameters()}

    moved = run()
    assert max(float(d.abs().max()) for d in moved.values()) > 0  # it trains
    monkeypatch.setattr(fit_step, "silenceable_modules", lambda module: None)
    for name, delta in run().items():
        assert torch.equal(moved[name], delta), name


def test_a_sub_pyromodule_created_inside_the_block_keeps_the_trees_context():
    model, x = _dlvm(), _binary_rows(5)
    modules = silenceable_modules(model)
    root_context = model._pyro_context
    with silent_param_statements(modules):
        model.head = PyroModule[torch.nn.Linear](2, 2)   # created during a step
        model.head(torch.zeros(1, 2))
    assert model.head._pyro_context is root_context
    with poutine.trace(param_only=True) as tr:
        model.head(torch.zeros(1, 2))
    assert any(site["type"] == "param" and "head" in name for name, site in tr.trace.nodes.items())


def test_a_replaced_sub_pyromodule_and_its_children_get_the_trees_context():
    """A sub-PyroModule assigned during the block under an existing name (same number of
    children) and the PyroModules inside it are found too; one silent block is reusable."""
    model, x = _dlvm(), _binary_rows(5)
    block = silent_param_statements(silenceable_modules(model))
    root_context = model._pyro_context
    for _ in range(2):
        with block:
            inner = PyroModule[torch.nn.Sequential](PyroModule[torch.nn.Linear](2, 2))
            model.likelihood = inner   # replaces the likelihood PyroModule
        assert model.likelihood._pyro_context is root_context
        assert model.likelihood[0]._pyro_context is root_context
        with block:
            assert model._pyro_context is _silent_context()  # positive control: swapped
        assert model._pyro_context is root_context


def test_a_nested_entry_of_the_same_block_changes_nothing():
    model = _dlvm()
    block = silent_param_statements(silenceable_modules(model))
    root_context = model._pyro_context
    with block:
        with block:
            assert model._pyro_context is _silent_context()
        assert model._pyro_context is _silent_context()  # still inside the outer entry
    assert model._pyro_context is root_context
