"""fit() checks every training row once with Pyro's validation before the first step, then
trains without the per-call checks (inference/training/row_checks.py); validate_every_step=True
keeps them on every step."""
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.util import is_validation_enabled

from pyro_lvm.inference.training import fit

P, D = 6, 2


class UserBernoulliPair(torch.nn.Module):
    """A user's Bernoulli pair without any data check of its own (only Pyro's support check
    can refuse a non-binary value). Records whether Pyro's validation was on in each call."""

    def __init__(self):
        super().__init__()
        self.decoder = torch.nn.Linear(D, P)
        self.encoder = torch.nn.Linear(P, 2 * D)
        self.validation_seen = []

    def model(self, x, mask=None):
        pyro.module("decoder", self.decoder)
        self.validation_seen.append(is_validation_enabled())
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(D), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x, mask=None):
        pyro.module("encoder", self.encoder)
        out = self.encoder(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(out[:, :D], torch.nn.functional.softplus(out[:, D:])
                                         + 1e-3).to_event(1))


class StepCounter:
    def __init__(self):
        self.steps = 0

    def on_step_end(self, state):
        self.steps += 1


def binary_rows(n=120, seed=0):
    return (np.random.default_rng(seed).random((n, P)) < 0.4).astype(np.float32)


def test_a_bad_row_far_from_the_first_batch_is_refused_before_any_step():
    x = binary_rows()
    x[97, 4] = 0.5  # outside Bernoulli's support; rows 96-111 are the 7th batch of 16
    pyro.set_rng_seed(0)
    pair, counter = UserBernoulliPair(), StepCounter()
    before = {k: v.clone() for k, v in pair.state_dict().items()}
    with pytest.raises(ValueError, match=r"training data, rows 96-111 .*support"):
        fit(pair, x, epochs=2, batch_size=16, progress=False, callbacks=[counter])
    assert counter.steps == 0
    assert all(torch.equal(before[k], v) for k, v in pair.state_dict().items())


def test_with_validate_every_step_the_same_row_is_refused_during_training():
    """Positive control: the refusal above comes from Pyro's support check, which the steps
    run when asked to."""
    x = binary_rows()
    x[97, 4] = 0.5
    pair = UserBernoulliPair()
    with pytest.raises(ValueError, match="support"):
        fit(pair, x, epochs=2, batch_size=16, progress=False, validate_every_step=True,
            check_pair=False)


def test_steps_run_without_pyro_validation_after_the_checked_pass():
    x = binary_rows()
    pair = UserBernoulliPair()
    fit(pair, x, epochs=2, batch_size=16, progress=False, check_pair=False)
    steps = 2 * 8
    # contract-free fit: one parameter-collecting call, one checked pass over 8 batches,
    # then 16 training steps
    assert len(pair.validation_seen) == 1 + 8 + steps
    assert all(pair.validation_seen[1:9])
    assert not any(pair.validation_seen[-steps:])


def test_validate_every_step_keeps_validation_in_every_step():
    pair = UserBernoulliPair()
    fit(pair, binary_rows(), epochs=1, batch_size=16, progress=False, check_pair=False,
        validate_every_step=True)
    assert all(pair.validation_seen)
    assert len(pair.validation_seen) == 1 + 8  # no separate pass


def test_with_pyro_validation_off_there_is_no_pass_and_no_check():
    pair = UserBernoulliPair()
    with pyro.validation_enabled(False):
        fit(pair, binary_rows(), epochs=1, batch_size=16, progress=False, check_pair=False)
    assert len(pair.validation_seen) == 1 + 8 and not any(pair.validation_seen)


def test_the_checked_pass_leaves_the_fit_bit_identical():
    """The pass runs on its own random stream: same seed, same parameters as a fit whose
    steps run validated throughout (the steps draw the same noise either way)."""
    x = binary_rows()
    results = []
    for every_step in (False, True):
        torch.manual_seed(1)
        pair = UserBernoulliPair()
        result = fit(pair, x, epochs=2, batch_size=16, progress=False, seed=3,
                     validate_every_step=every_step)
        results.append((result.step_losses, {k: v.clone() for k, v in pair.state_dict().items()}))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(results[0][1][k], results[1][1][k]) for k in results[0][1])
