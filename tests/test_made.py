import itertools

import pytest
import torch

from pyro_lvm.models import MADE


def _all_binary(p):
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=p)))


def test_probabilities_sum_to_one_for_every_mask_set():
    made = MADE(10, hidden=(16, 16), num_masks=4).double()
    for layer in made.net:               # non-trivial weights, not just the initialization
        if isinstance(layer, torch.nn.Linear):
            torch.nn.init.normal_(layer.weight, std=1.0)
            torch.nn.init.normal_(layer.bias, std=1.0)
    grid = _all_binary(10).double()
    with torch.no_grad():
        for m in range(4):
            assert torch.logsumexp(made.log_prob(grid, mask_index=m), 0).item() == \
                pytest.approx(0.0, abs=1e-10)
        assert torch.logsumexp(made.log_prob(grid), 0).item() == pytest.approx(0.0, abs=1e-10)
    assert len({tuple(o.tolist()) for o in made.orderings}) == 4


def test_unmasked_network_is_not_normalized():
    # positive control: without the masks the same sum is far from 1
    made = MADE(10, hidden=(16,), num_masks=1).double()
    for layer in made.net:
        if isinstance(layer, torch.nn.Linear):
            torch.nn.init.normal_(layer.weight, std=1.0)
            layer.mask.fill_(1.0)
    with torch.no_grad():
        total = torch.logsumexp(made._log_prob_current(_all_binary(10).double()), 0)
    assert abs(total.item()) > 1e-3


@pytest.mark.parametrize("hidden", [(12,), (12, 12)])
def test_autoregressive_property_from_the_jacobian(hidden):
    made = MADE(6, hidden=hidden, num_masks=3, seed=3).double()
    x = torch.rand(6, dtype=torch.float64)
    for m in range(3):
        made.use_mask(m)
        jac = torch.autograd.functional.jacobian(made.logits, x)     # [out j, in k]
        position = made.orderings[m]
        allowed = position[None, :] < position[:, None]            # input k before output j
        assert torch.all(jac[~allowed] == 0)
        # and the allowed connections are used (generically nonzero)
        assert (jac[allowed] != 0).float().mean() > 0.5


def test_natural_ordering_and_sampling_matches_probabilities():
    made = MADE(3, hidden=(8,), natural_ordering=True).double()
    for layer in made.net:
        if isinstance(layer, torch.nn.Linear):
            torch.nn.init.normal_(layer.weight, std=1.5)
    assert made.orderings[0].tolist() == [0, 1, 2]
    gen = torch.Generator().manual_seed(0)
    draws = made.sample(20000, generator=gen)
    grid = _all_binary(3).double()
    with torch.no_grad():
        probs = made.log_prob(grid).exp()
    codes = (draws @ torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64)).long()
    freq = torch.bincount(codes, minlength=8).double() / 20000
    se = (probs * (1 - probs) / 20000).sqrt()
    assert torch.all((freq - probs).abs() < 4 * se + 1e-9)


def test_training_improves_likelihood_and_bits_per_dim(binarized_mnist):
    train = binarized_mnist["train"][:500, ::4]          # 196 pixels: CPU-cheap
    test = binarized_mnist["test"][:200, ::4]
    made = MADE(196, hidden=(64,), num_masks=2)
    before = made.bits_per_dim(test)
    made.fit(train, epochs=5, batch_size=50, lr=3e-3, validation_data=test)
    after = made.bits_per_dim(test)
    assert after < before - 0.2
    assert made.history_[-1]["valid_nll"] == pytest.approx(after * 196 * 0.6931471805599453,
                                                           rel=1e-5)
    assert made.sample(2).shape == (2, 196)


def test_bad_input_named():
    made = MADE(4, hidden=8)
    with pytest.raises(ValueError, match="outside"):
        made.log_prob(torch.full((2, 4), 0.5))
    with pytest.raises(ValueError, match="mask index"):
        made.use_mask(3)
    with pytest.raises(ValueError, match="data_dim"):
        MADE(1)
