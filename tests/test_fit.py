"""fit(): trains any pair keeping the contract, reproducibly and in isolation; stops with a
precise error on NaN; resumes from checkpoints; reaches the exact optimum of linear models."""
import math

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule

from pyro_lvm.inference.contract import ContractError
from pyro_lvm.inference.training import (EarlyStopping, FitResult, NonFiniteLossError, StopFit, fit)
from pyro_lvm.inference.importance_weights import log_weights

N, P, D = 40, 3, 2


class TinyPair(PyroModule):
    """A user-written linear-Gaussian pair (not one of the library's models). ``poison``
    plants a NaN in the likelihood's location of the batch's 4th row."""

    def __init__(self, data_dim=P, latent_dim=D):
        super().__init__()
        self.data_dim, self.latent_dim = data_dim, latent_dim
        self.loading = torch.nn.Parameter(0.1 * torch.randn(latent_dim, data_dim))
        self.bias = torch.nn.Parameter(torch.zeros(data_dim))
        self.encoder = torch.nn.Parameter(torch.zeros(data_dim, latent_dim))
        self.log_scale = torch.nn.Parameter(torch.zeros(latent_dim))
        self.poison = False
        self.poisoned_rows = []

    def model(self, x, mask=None):
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent_dim), 1.0).to_event(1))
            loc = z @ self.loading + self.bias
            if self.poison:
                factor = torch.ones(x.shape[0], 1, dtype=x.dtype)
                factor[3] = math.nan
                loc = loc * factor
                self.poisoned_rows.append(int(x[3, 0]))
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)

    def guide(self, x, mask=None):
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", dist.Normal(x @ self.encoder, self.log_scale.exp()).to_event(1))


def make_pair(seed=0):
    torch.manual_seed(seed)
    return TinyPair()


def plain_model(x, mask=None):
    loading = pyro.param("loading", lambda: torch.full((D, P), 0.1))
    bias = pyro.param("bias", lambda: torch.zeros(P))
    with pyro.plate("data", x.shape[0], dim=-1):
        z = pyro.sample("z", dist.Normal(x.new_zeros(D), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ loading + bias, 1.0).to_event(1), obs=x)


def plain_guide(x, mask=None):
    weight = pyro.param("weight", lambda: torch.zeros(P, D))
    scale = pyro.param("scale", lambda: torch.ones(D), constraint=dist.constraints.positive)
    with pyro.plate("data", x.shape[0], dim=-1):
        pyro.sample("z", dist.Normal(x @ weight, scale).to_event(1))


def make_data(n=N, seed=1, shift=2.0):
    """Rows with their own index in column 0 (so a test can tell which row was hit)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, P, generator=g) + shift
    x[:, 0] = torch.arange(n, dtype=x.dtype)
    return x


def states_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def clone_state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class LocalELBO:
    """A minimal objective following pyro-lvm's protocol (``num_data`` scaling outside the
    per-row bound); records the batch sizes it saw."""

    pyro_lvm_objective = True
    name = "local_elbo"
    num_particles = 1

    def __init__(self):
        self.calls = []

    def differentiable_loss(self, model, guide, x, mask=None, num_data=None):
        self.calls.append((x.shape[0], num_data))
        bound = log_weights(model, guide, x, 1, mask).mean(0)
        return -((num_data or x.shape[0]) / x.shape[0]) * bound.sum()

    def loss(self, model, guide, x, mask=None, num_data=None):
        return float(self.differentiable_loss(model, guide, x, mask, num_data).detach())


FAST = dict(progress=False, lr=0.05)


# ---- exactness on a real dataset ----------------------------------------------------------

@pytest.mark.parametrize("family", ["PPCA", "FactorAnalysis"])
def test_svi_reaches_the_exact_maximum_likelihood_on_digits(family, digits_standardized):
    linear = pytest.importorskip("models.linear")
    X = digits_standardized
    Xt = torch.as_tensor(X)
    cls = getattr(linear, family)
    exact = cls(X.shape[1], 5).double()
    exact = exact.fit_closed_form(X) if family == "PPCA" else exact.fit_em(X, progress=False)
    exact_ll = exact.log_marginal(Xt).mean().item()

    model = cls(X.shape[1], 5).double()
    result = fit(model, X, epochs=60, batch_size=len(X), seed=0, **FAST)
    with torch.no_grad():
        svi_ll = model.log_marginal(Xt).mean().item()
    # The ML estimate maximizes the likelihood: SVI cannot beat it, and must come within 0.5%.
    assert svi_ll <= exact_ll + 1e-6
    assert (exact_ll - svi_ll) / abs(exact_ll) < 0.005, (svi_ll, exact_ll)
    # The ELBO (full batch, last epoch) is a bound on the log-likelihood of its parameters and,
    # with a guide family containing the exact posterior, close to it.
    elbo = result.history["train_objective"].iloc[-1]
    assert (exact_ll - elbo) / abs(exact_ll) < 0.005, (elbo, exact_ll)


# ---- isolation, reproducibility ------------------------------------------------------------

def test_two_module_fits_back_to_back_both_train_and_share_nothing():
    first, second = make_pair(0), make_pair(0)
    init = clone_state(first)
    fit(first, make_data(seed=1), epochs=3, batch_size=16, **FAST)
    after_first = clone_state(first)
    fit(second, make_data(seed=2, shift=-1.0), epochs=3, batch_size=16, **FAST)
    for module in (first, second):
        assert all(not torch.equal(init[k], v) for k, v in clone_state(module).items()), \
            "every parameter should move away from its initial value"
    assert states_equal(clone_state(first), after_first), "second fit changed the first model"
    ptrs_first = {p.data_ptr() for p in first.parameters()}
    ptrs_second = {p.data_ptr() for p in second.parameters()}
    assert not ptrs_first & ptrs_second
    assert len(pyro.get_param_store()) == 0


def test_plain_function_pair_trains_in_its_own_param_store():
    results = [fit((plain_model, plain_guide), make_data(seed=s, shift=shift), epochs=3,
                   batch_size=16, **FAST) for s, shift in ((1, 2.0), (2, -2.0))]
    assert len(pyro.get_param_store()) == 0  # nothing leaked into the global store
    first, second = (r.param_store_state["params"] for r in results)
    assert set(first) == set(second) == {"loading", "bias", "weight", "scale"}
    for name in first:
        assert first[name] is not second[name]
        assert first[name].data_ptr() != second[name].data_ptr()
        assert not torch.equal(first[name], second[name])
    with results[0].activate():
        bias = pyro.param("bias").detach().clone()
        scale = pyro.param("scale")  # constrained view of the stored unconstrained value
        assert torch.allclose(scale.log(), first["scale"])
    assert not torch.equal(bias, torch.zeros(P)), "bias should have trained"
    assert bias.mean() > 0, "bias should move towards the data mean (about +2)"
    assert len(pyro.get_param_store()) == 0


def test_same_seed_gives_identical_history_and_parameters_different_seed_differs():
    x, valid = make_data(seed=1), make_data(n=12, seed=5)
    runs = []
    for seed in (7, 7, 8):
        pair = make_pair(0)
        result = fit(pair, x, epochs=3, batch_size=16, seed=seed, validation=valid, **FAST)
        runs.append((result, clone_state(pair)))
    (a, state_a), (b, state_b), (c, state_c) = runs
    pd.testing.assert_frame_equal(a.history.drop(columns="time_s"),
                                  b.history.drop(columns="time_s"))
    assert a.step_losses == b.step_losses
    assert states_equal(state_a, state_b)
    assert not np.array_equal(a.history["train_objective"], c.history["train_objective"])
    assert not states_equal(state_a, state_c)


# ---- history, objectives, callbacks --------------------------------------------------------

def test_history_columns_minibatches_and_our_objective_protocol():
    x, valid = make_data(n=50), make_data(n=10, seed=3)
    objective = LocalELBO()
    result = fit(make_pair(), x, objective=objective, epochs=2, batch_size=16, validation=valid,
                 **FAST)
    assert isinstance(result, FitResult)
    assert list(result.history.columns) == ["epoch", "step", "train_objective",
                                            "valid_objective", "time_s"]
    assert result.history["epoch"].tolist() == [1, 2]
    assert result.history["step"].tolist() == [4, 8]  # ceil(50 / 16) steps, last one partial
    assert result.objective_name == "local_elbo"
    # training calls: last partial batch included, always scaled by num_data = N
    training_calls = [c for c in objective.calls if c[1] is not None]
    assert [b for b, _ in training_calls] == [16, 16, 16, 2] * 2
    assert {n for _, n in training_calls} == {50}
    # train_objective is the bound per row over the epoch: row-weighted mean of the steps
    steps = np.array(result.step_objectives).reshape(2, 4)
    weights = np.array([16, 16, 16, 2])
    np.testing.assert_allclose(result.history["train_objective"], steps @ weights / 50)
    np.testing.assert_allclose(result.step_objectives, -np.array(result.step_losses) / 50)
    assert np.isfinite(result.history["valid_objective"]).all()
    assert (result.history["time_s"].diff().dropna() >= 0).all()


def test_our_objective_and_pyro_trace_elbo_give_the_same_fit():
    # Same seed => same draws (guide, then model replayed); both scale the batch by N/|B|.
    x = make_data(n=30)
    ours = fit(make_pair(), x, objective=LocalELBO(), epochs=2, batch_size=8, **FAST)
    pyros = fit(make_pair(), x, objective=pyro.infer.Trace_ELBO(), epochs=2, batch_size=8, **FAST)
    np.testing.assert_allclose(ours.step_losses, pyros.step_losses, rtol=1e-4)
    assert pyros.objective_name == "pyro.infer.Trace_ELBO"


def test_pyro_elbo_without_differentiable_loss_is_supported():
    result = fit(make_pair(), make_data(), objective=pyro.infer.TraceGraph_ELBO(), epochs=4,
                 batch_size=20, **FAST)
    assert result.history["train_objective"].iloc[-1] > result.history["train_objective"].iloc[0]


class Recorder:
    def __init__(self, stop_after_epoch=None):
        self.events = []
        self.stop_after_epoch = stop_after_epoch

    def on_fit_start(self, state):
        self.events.append("fit_start")

    def on_epoch_start(self, state):
        self.events.append(("epoch_start", state.epoch))

    def on_step_end(self, state):
        self.events.append(("step_end", state.epoch, state.step, state.global_step))
        state.log("last_step_objective", state.step_objective)

    def on_epoch_end(self, state):
        state.log("beta", 0.5 * (state.epoch + 1))
        if state.epoch == self.stop_after_epoch:
            raise StopFit("enough for today")

    def on_fit_end(self, state):
        self.events.append("fit_end")


def test_callbacks_see_every_hook_log_columns_and_stop_the_fit():
    recorder = Recorder(stop_after_epoch=1)
    result = fit(make_pair(), make_data(), epochs=5, batch_size=16, callbacks=[recorder], **FAST)
    assert result.stopped_early and result.stop_reason == "enough for today"
    assert result.history["epoch"].tolist() == [1, 2]
    assert result.history["beta"].tolist() == [0.5, 1.0]
    assert result.history["last_step_objective"].tolist() == [result.step_objectives[2],
                                                              result.step_objectives[5]]
    steps = [e for e in recorder.events if e[0] == "step_end"]
    assert [e[3] for e in steps] == list(range(1, 7))  # global_step counts steps taken
    assert recorder.events[0] == "fit_start" and recorder.events[-1] == "fit_end"
    with pytest.raises(ValueError, match="cannot log 'epoch'"):
        fit(make_pair(), make_data(), epochs=1, batch_size=16,
            callbacks=[type("Bad", (), {"on_epoch_end": lambda self, s: s.log("epoch", 1)})()],
            **FAST)


def test_early_stopping_stops_on_patience_and_restores_the_best_parameters():
    scores = [1.0, 3.0, 2.0, 2.5, 2.9, 1.0, 1.0, 1.0]
    pair = make_pair()
    best = {}

    class Score:
        def on_epoch_end(self, state):
            state.log("score", scores[state.epoch])
            if state.epoch == 1:
                best.update(clone_state(pair))

    stopper = EarlyStopping(patience=3, monitor="score")
    result = fit(pair, make_data(), epochs=8, batch_size=16, callbacks=[Score(), stopper], **FAST)
    assert result.stopped_early and "did not improve" in result.stop_reason
    assert result.history["epoch"].tolist() == [1, 2, 3, 4, 5]
    assert stopper.best_epoch == 2 and stopper.best_value == 3.0 and stopper.restored
    assert states_equal(clone_state(pair), best)


def test_early_stopping_on_validation_objective():
    stopper = EarlyStopping(patience=2, min_delta=0.0)
    result = fit(make_pair(), make_data(), epochs=4, batch_size=16, validation=make_data(n=10),
                 callbacks=[stopper], **FAST)
    best = result.history["valid_objective"].max()
    assert stopper.best_value == best
    with pytest.raises(ValueError, match="no validation data"):
        fit(make_pair(), make_data(), epochs=2, callbacks=[EarlyStopping()], **FAST)


def test_clip_norm_bounds_the_gradient_norm():
    def max_grad_norm(clip_norm):
        norms = []

        class Watch:
            def on_step_end(self, state):
                norms.append(torch.nn.utils.get_total_norm(
                    [p.grad for p in state.params]).item())

        fit(make_pair(), make_data(), epochs=2, batch_size=16, clip_norm=clip_norm,
            callbacks=[Watch()], **FAST)
        return max(norms)

    assert max_grad_norm(None) > 1.0
    assert max_grad_norm(1.0) <= 1.0 + 1e-5


def test_progress_bar_shows_objective(capsys):
    fit(make_pair(), make_data(), epochs=2, batch_size=16, lr=0.05, progress=True)
    err = capsys.readouterr().err
    assert "fit elbo" in err and "epoch 2/2 objective" in err


# ---- the NaN guard -------------------------------------------------------------------------

@pytest.mark.parametrize("validate", [True, False], ids=["validation", "no-validation"])
def test_nan_guard_names_epoch_step_site_row_and_restores_parameters(validate):
    pair = make_pair()
    snapshots = []

    class Poison:
        def on_step_start(self, state):
            if state.global_step == 6:  # the 7th step: epoch 2, step 2 with 5 steps per epoch
                pair.poison = True

        def on_step_end(self, state):
            snapshots.append(clone_state(pair))

    with pyro.validation_enabled(validate):
        with pytest.raises(NonFiniteLossError) as info:
            fit(pair, make_data(), epochs=3, batch_size=8, seed=1, callbacks=[Poison()], **FAST)
    err = info.value
    planted = pair.poisoned_rows[0]  # data row whose likelihood location was set to NaN
    assert planted != 3  # (with seed=1 the batch row and the data row differ)
    assert (f"at epoch 2, step 2 (global step 7): site 'x' in the model has log_prob=nan for "
            f"1 of 8 rows (first: row 3 of the batch = row {planted} of the data); parameters "
            f"restored to the last finite values (after global step 6)") in str(err)
    assert (err.epoch, err.step, err.global_step) == (2, 2, 7)
    assert err.site == "x" and err.role == "model" and err.rows == [planted]
    assert err.history["epoch"].tolist() == [1]
    assert len(snapshots) == 6
    assert states_equal(clone_state(pair), snapshots[-1])
    assert isinstance(err, FloatingPointError)


def test_non_finite_gradient_names_the_parameter():
    def model(x, mask=None):
        w = pyro.param("w", torch.zeros(()))
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", dist.Normal(x.new_zeros(D), 1.0).to_event(1))
            # d/dw of 0 * sqrt(w) at w = 0 is 0 * inf = nan, while the loss stays finite
            loc = z.sum(-1, keepdim=True) + 0.0 * torch.sqrt(w)
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)

    def guide(x, mask=None):
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", dist.Normal(x[..., :D], 1.0).to_event(1))

    with pytest.raises(NonFiniteLossError, match=r"non-finite gradient at epoch 1, step 1 "
                                                 r"\(global step 1\).*parameter\(s\) \['w'\]"):
        fit((model, guide), make_data(), epochs=1, batch_size=16, **FAST)


def test_parameters_stepped_to_non_finite_values_are_restored_from_a_finite_copy():
    pair = make_pair()
    initial = clone_state(pair)

    class Sabotage(torch.optim.SGD):
        """An optimizer whose step leaves a NaN parameter behind (finite loss and gradient)."""

        def step(self, closure=None):
            super().step(closure)
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(math.nan)

    sabotaging = lambda params: Sabotage(params, lr=0.01)  # noqa: E731
    with pytest.raises(NonFiniteLossError, match=r"at epoch 1, step 2 \(global step 2\): "
                                                 r"parameter\(s\) \[.*\] hold non-finite values; "
                                                 r"parameters restored to their values at the "
                                                 r"start of epoch 1") as info:
        fit(pair, make_data(), epochs=1, batch_size=16, optimizer=sabotaging, **FAST)
    assert info.value.parameter in dict(pair.named_parameters())
    assert states_equal(clone_state(pair), initial)


def test_tuple_of_bound_methods_is_treated_as_the_module():
    pair = make_pair().double()
    initial = clone_state(pair)
    result = fit((pair.model, pair.guide), make_data().numpy(), epochs=2, batch_size=16, **FAST)
    assert result.history["train_objective"].notna().all()
    assert all(not torch.equal(initial[k], v) for k, v in clone_state(pair).items())
    assert pair.loading.dtype == torch.float64  # data were cast to the module's dtype


# ---- checkpoints ---------------------------------------------------------------------------

class InterruptAt:
    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_start(self, state):
        if state.epoch == self.epoch:
            raise KeyboardInterrupt


@pytest.mark.parametrize("kind", ["module", "plain"])
def test_checkpoint_resume_after_ctrl_c_equals_an_uninterrupted_run(kind, tmp_path):
    x, valid = make_data(), make_data(n=10, seed=4)
    settings = dict(epochs=4, batch_size=16, seed=3, validation=valid, **FAST)
    path = tmp_path / "fit.pt"

    def pair():
        return make_pair(0) if kind == "module" else (plain_model, plain_guide)

    def params(result):
        if kind == "module":
            return clone_state(result.model)
        return {k: v.detach().clone() for k, v in result.param_store_state["params"].items()}

    reference = fit(pair(), x, **settings)
    with pytest.raises(KeyboardInterrupt):
        fit(pair(), x, checkpoint=path, callbacks=[InterruptAt(2)], **settings)
    assert path.exists()
    assert torch.load(path, weights_only=True)["epochs_completed"] == 2
    resumed_pair = make_pair(123) if kind == "module" else pair()  # other init: must be loaded
    resumed = fit(resumed_pair, x, checkpoint=path, **settings)
    pd.testing.assert_frame_equal(resumed.history.drop(columns="time_s"),
                                  reference.history.drop(columns="time_s"))
    assert resumed.step_losses == reference.step_losses
    assert states_equal(params(resumed), params(reference))
    # a checkpoint written by another fit is refused
    with pytest.raises(ValueError, match="written by a different fit"):
        fit(pair(), x, checkpoint=path, **{**settings, "batch_size": 8})


def test_finished_checkpoint_returns_without_training(tmp_path):
    path = tmp_path / "done.pt"
    first = fit(make_pair(), make_data(), epochs=2, batch_size=16, checkpoint=path, **FAST)
    pair = make_pair(5)
    again = fit(pair, make_data(), epochs=2, batch_size=16, checkpoint=path, **FAST)
    pd.testing.assert_frame_equal(first.history, again.history)
    assert states_equal(clone_state(pair), clone_state(first.model))


# ---- bad input is refused before any step --------------------------------------------------

def test_missing_entries_marked_by_mask_are_ignored():
    def masked_model(x, mask=None):
        bias = pyro.param("bias", lambda: x.new_zeros(P))
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", dist.Normal(x.new_zeros(D), 1.0).to_event(1))
            likelihood = dist.Normal(z.sum(-1, keepdim=True) + bias, 1.0)
            if mask is not None:
                likelihood = likelihood.mask(mask)
            pyro.sample("x", likelihood.to_event(1), obs=x)

    def masked_guide(x, mask=None):
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", dist.Normal(x.new_zeros(D), 1.0).to_event(1))

    x = make_data()
    x[::3, 2] = math.nan
    mask = ~torch.isnan(x)
    with pytest.raises(ValueError, match="pass mask= to mark missing entries"):
        fit((masked_model, masked_guide), x, epochs=1, **FAST)
    valid = make_data(n=6, seed=9)
    valid[0, 1] = math.nan
    result = fit((masked_model, masked_guide), x, mask=mask, validation=valid,
                 valid_mask=~torch.isnan(valid), epochs=2, batch_size=16, **FAST)
    assert np.isfinite(result.history[["train_objective", "valid_objective"]].to_numpy()).all()


class NoStepAllowed:
    def on_step_start(self, state):
        raise AssertionError("a training step was started")


@pytest.mark.parametrize("data, valid, message", [
    ("nan", None, r"data contains 1 NaN/non-finite value\(s\) at \(row 5, column 1\)"),
    ("wide", None, r"data has 4 columns but the model expects data_dim=3"),
    (None, "wide", r"validation has 4 columns but the model expects data_dim=3"),
    (None, "nan", r"validation contains 1 NaN"),
])
def test_bad_data_is_refused_before_any_step(data, valid, message):
    good = make_data()
    bad = {"nan": good.clone(), "wide": torch.randn(10, 4)}
    bad["nan"][5, 1] = math.nan
    with pytest.raises(ValueError, match=message):
        fit(make_pair(), bad.get(data, good), validation=bad.get(valid, make_data(n=5)),
            callbacks=[NoStepAllowed()], **FAST)


def test_pair_own_check_data_is_called():
    class Strict(TinyPair):
        def check_data(self, x, mask=None):
            if (x < 0).any():
                raise ValueError("Strict needs non-negative data")
            return x

    with pytest.raises(ValueError, match="Strict needs non-negative data"):
        fit(Strict(), make_data(shift=-5.0), callbacks=[NoStepAllowed()], **FAST)


def test_broken_pair_is_refused_before_any_step():
    def unplated_model(x, mask=None):
        z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], D), 1.0).to_event(2))
        pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True), 1.0).to_event(2), obs=x)

    def unplated_guide(x, mask=None):
        pyro.sample("z", dist.Normal(x[..., :D], 1.0).to_event(2))

    with pytest.raises(ContractError, match="no plate named 'data'"):
        fit((unplated_model, unplated_guide), make_data(), callbacks=[NoStepAllowed()], **FAST)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_a_value_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        fit(make_pair(), make_data(), device="cuda", **FAST)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(epochs=0), ValueError, "epochs must be an integer >= 1"),
    (dict(batch_size=0), ValueError, "batch_size must be an integer >= 1"),
    (dict(lr=-1.0), ValueError, "lr must be a positive finite number"),
    (dict(clip_norm=0.0), ValueError, "clip_norm must be a positive finite number"),
    (dict(objective=pyro.infer.Trace_ELBO), TypeError, "write Trace_ELBO\\(\\) instead"),
    (dict(objective="elbo"), TypeError, "objective must be a pyro-lvm objective"),
    (dict(callbacks=[EarlyStopping]), TypeError, "callbacks must be instances"),
])
def test_bad_arguments_are_named(kwargs, error, message):
    with pytest.raises(error, match=message):
        fit(make_pair(), make_data(), **{**FAST, **kwargs})


@pytest.mark.parametrize("likelihood", ["gaussian", "studentt"])
def test_fit_refuses_a_constant_column_under_a_learned_scale_like_the_loaders(likelihood):
    from pyro_lvm.models import DLVM
    from pyro_lvm.studies.datasets import load_dataset

    x = torch.randn(40, 5)
    x[:, 3] = 2.5
    steps = []

    class Spy:
        def on_step_start(self, state):
            steps.append(state.step)

    with pytest.raises(ValueError, match=r"constant column\(s\) 3\b.*unbounded likelihood"):
        fit(DLVM(5, 2, likelihood=likelihood, hidden=(8,)), x, epochs=1, batch_size=20,
            progress=False, callbacks=[Spy()])
    assert steps == []
    # the loaders refuse it too
    with pytest.raises(ValueError, match=r"column\(s\) 3 .*constant.*unbounded likelihood"):
        load_dataset(x.numpy(), likelihood=likelihood, scale=None)
    # a fixed scale keeps the likelihood bounded, and a column constant in one minibatch only
    # is fine (the check sees the whole training set)
    fit(DLVM(5, 2, likelihood="gaussian", gaussian_scale="fixed", hidden=(8,)), x, epochs=1,
        batch_size=20, progress=False)
    y = torch.randn(40, 5)
    y[:20, 3] = 2.5
    fit(DLVM(5, 2, likelihood=likelihood, hidden=(8,)), y, epochs=1, batch_size=20,
        progress=False)


def test_gradient_summary_finds_every_non_finite_entry_and_no_false_alarm():
    from pyro_lvm.inference.training.step import finite_step, gradient_summary

    loss = torch.tensor(1.0)

    def check(grads, clip=False):
        summary = gradient_summary(grads, loss, norm=clip)
        return finite_step(float(loss), float(summary), grads)

    finite = [torch.randn(30, 7), torch.randn(7)]
    assert check(finite) and check(finite, clip=True)
    for bad in (float("nan"), float("inf"), -float("inf")):
        grads = [g.clone() for g in finite]
        grads[1][3] = bad
        assert not check(grads) and not check(grads, clip=True), bad
    # +inf and -inf in different tensors: the sum is NaN, still caught
    assert not check([torch.tensor([float("inf")]), torch.tensor([-float("inf")])])
    # finite entries whose sum (and norm) overflow float32: not a failure
    huge = [torch.full((4,), 3e38), torch.full((4,), 3e38)]
    assert not math.isfinite(float(gradient_summary(huge, loss, norm=False)))
    assert check(huge) and check(huge, clip=True)
    # the norm, not the sum, when clipping needs it
    assert float(gradient_summary([torch.tensor([3.0, -4.0])], loss, norm=True)) == 5.0
    assert float(gradient_summary([torch.tensor([3.0, -4.0])], loss, norm=False)) == -1.0
    assert not finite_step(float("nan"), 0.0, finite)
