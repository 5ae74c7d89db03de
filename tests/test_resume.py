"""Resuming a fit from its checkpoint: bit-identical to an uninterrupted fit for every kind of
pair (the DLVM's Pyro-free path with each prior, plain functions with ``pyro.param``, an
``nn.Module`` with ``pyro.module``); refused when the settings differ; and a checkpoint never
runs code when it is read (``torch.load(weights_only=True)``)."""
import pathlib

import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_lvm.inference.training import fit
from pyro_lvm.inference.objectives import ELBO, IWAE
from pyro_lvm.models.dlvm import DLVM

N, P, D = 24, 6, 2
FAST = dict(progress=False, device="cpu")


def binary_data(n=N, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, P, generator=g) < 0.4).float()


def dlvm(prior, seed=0):
    torch.manual_seed(seed)
    return DLVM(P, D, hidden=(5,), prior=prior, likelihood="bernoulli", num_components=3,
                num_pseudo_inputs=4)


def plain_model(x, mask=None):
    loading = pyro.param("loading", lambda: 0.1 * torch.randn(D, P))
    bias = pyro.param("bias", lambda: torch.zeros(P))
    with pyro.plate("data", x.shape[0], dim=-1):
        z = pyro.sample("z", dist.Normal(x.new_zeros(D), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ loading + bias, 1.0).to_event(1), obs=x)


def plain_guide(x, mask=None):
    weight = pyro.param("weight", lambda: torch.zeros(P, D))
    scale = pyro.param("scale", lambda: torch.ones(D), constraint=dist.constraints.positive)
    with pyro.plate("data", x.shape[0], dim=-1):
        pyro.sample("z", dist.Normal(x @ weight, scale).to_event(1))


class ModulePair(torch.nn.Module):
    """A plain ``nn.Module`` whose networks reach Pyro through ``pyro.module``."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.decoder = torch.nn.Linear(D, P)
        self.encoder = torch.nn.Linear(P, 2 * D)

    def model(self, x, mask=None):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", dist.Normal(x.new_zeros(D), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), 1.0).to_event(1), obs=x)

    def guide(self, x, mask=None):
        pyro.module("encoder", self.encoder)
        loc, log_scale = self.encoder(x).chunk(2, dim=-1)
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


def _params(result):
    if isinstance(result.model, torch.nn.Module):
        return {k: v.detach().clone() for k, v in result.model.state_dict().items()}
    return {k: v.detach().clone() for k, v in result.param_store_state["params"].items()}


def assert_resume_is_bit_identical(make_pair, x, tmp_path, objective, **settings):
    settings = dict(batch_size=8, seed=5, **FAST, **settings)
    straight = fit(make_pair(), x, epochs=12, objective=objective(), **settings)
    path = tmp_path / "fit.pt"
    fit(make_pair(), x, epochs=4, objective=objective(), checkpoint=path, **settings)
    resumed = fit(make_pair(), x, epochs=12, objective=objective(), checkpoint=path, **settings)
    pd.testing.assert_frame_equal(resumed.history.drop(columns="time_s"),
                                  straight.history.drop(columns="time_s"), check_exact=True)
    assert resumed.step_losses == straight.step_losses
    a, b = _params(resumed), _params(straight)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    return straight


@pytest.mark.parametrize("prior", ["normal", "mixture", "vamp"])
@pytest.mark.parametrize("objective", [ELBO, lambda: IWAE(3)], ids=["elbo", "iwae3"])
def test_dlvm_resume_equals_straight_fit(prior, objective, tmp_path):
    x = binary_data()
    straight = assert_resume_is_bit_identical(lambda: dlvm(prior), x, tmp_path, objective,
                                              lr=0.01)
    assert straight.history["step"].iloc[-1] == 12 * 3


@pytest.mark.parametrize("kind", ["plain functions", "nn.Module with pyro.module"])
def test_user_pair_resume_equals_straight_fit(kind, tmp_path):
    x = torch.randn(N, P, generator=torch.Generator().manual_seed(3))
    make = (lambda: (plain_model, plain_guide)) if kind == "plain functions" else ModulePair
    assert_resume_is_bit_identical(make, x, tmp_path, lambda: IWAE(2), lr=0.02,
                                   validation=x[:5])


def test_resume_with_another_lr_optimizer_or_objective_is_refused(tmp_path):
    x = binary_data()
    path = tmp_path / "fit.pt"
    fit(dlvm("normal"), x, epochs=1, batch_size=8, lr=0.01, checkpoint=path, **FAST)
    with pytest.raises(ValueError, match=r"lr: 0\.01 there, 0\.002 now"):
        fit(dlvm("normal"), x, epochs=2, batch_size=8, lr=0.002, checkpoint=path, **FAST)
    with pytest.raises(ValueError, match=r"optimizer: 'Adam \(default_optimizer\)' there, "
                                         r"'torch\.optim\.sgd\.SGD' now"):
        fit(dlvm("normal"), x, epochs=2, batch_size=8, lr=0.01, optimizer=torch.optim.SGD,
            checkpoint=path, **FAST)
    with pytest.raises(ValueError, match=r"objective_name: 'elbo' there, 'iwae_4' now"):
        fit(dlvm("normal"), x, epochs=2, batch_size=8, lr=0.01, objective=IWAE(4),
            checkpoint=path, **FAST)
    # the same settings resume
    assert len(fit(dlvm("normal"), x, epochs=2, batch_size=8, lr=0.01, checkpoint=path,
                   **FAST).history) == 2


def test_checkpoint_loads_without_running_code(tmp_path):
    """The file holds tensors, numbers, strings, lists and dicts only: it loads with
    ``weights_only=True``, and a crafted file whose unpickling would create a file is refused
    (naming the checkpoint) without creating it."""
    x = binary_data()
    path = tmp_path / "fit.pt"
    fit(dlvm("mixture"), x, epochs=2, batch_size=8, checkpoint=path, **FAST)
    payload = torch.load(path, weights_only=True)
    assert payload["epochs_completed"] == 2 and payload["optimizer"]["state"]

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (pathlib.Path.touch, (marker,))

    crafted = tmp_path / "crafted.pt"
    torch.save({"format": "pyro-lvm-fit-checkpoint", "version": 2, "x": Exploit()}, crafted)
    assert not marker.exists()
    with pytest.raises(ValueError, match=r"crafted\.pt.*refused.*could run code"):
        fit(dlvm("mixture"), x, epochs=2, batch_size=8, checkpoint=crafted, **FAST)
    assert not marker.exists()
    # positive control: unpickling the same file the unsafe way does create it
    with open(crafted, "rb") as handle:
        torch.load(handle, weights_only=False)
    assert marker.exists()


def test_checkpoint_that_is_a_directory_is_named(tmp_path):
    model = dlvm("normal")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for where in (tmp_path, "."):
        with pytest.raises(ValueError, match="is a directory"):
            fit(model, binary_data(), epochs=1, checkpoint=where, **FAST)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_pickled_object_in_a_callback_state_is_refused_when_saving(tmp_path):
    class Odd:
        def on_epoch_end(self, state):
            pass

        def state_dict(self):
            return {"when": object()}

    with pytest.raises(TypeError, match=r"callbacks.*object is not a tensor"):
        fit(dlvm("normal"), binary_data(), epochs=1, batch_size=8, callbacks=[Odd()],
            checkpoint=tmp_path / "fit.pt", **FAST)
