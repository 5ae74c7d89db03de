import itertools

import pytest
import torch

from pyro_lvm.models import RBM


def _brute_force_log_partition(rbm):
    """logsumexp over every (v, h) pair of -E(v, h): the definition, no analytic sums."""
    v = torch.tensor(list(itertools.product([0.0, 1.0], repeat=rbm.num_visible)), dtype=torch.float64)
    h = torch.tensor(list(itertools.product([0.0, 1.0], repeat=rbm.num_hidden)), dtype=torch.float64)
    w, b, c = (t.double() for t in (rbm.weight, rbm.visible_bias, rbm.hidden_bias))
    neg_energy = (v @ b)[:, None] + (h @ c)[None, :] + v @ w @ h.T
    return torch.logsumexp(neg_energy.flatten(), 0).item()


def _random_rbm(v, h, scale=1.0, seed=0):
    rbm = RBM(v, h, init_scale=scale, seed=seed).double()
    gen = torch.Generator().manual_seed(seed + 1)
    rbm.visible_bias.copy_(torch.randn(v, generator=gen, dtype=torch.float64))
    rbm.hidden_bias.copy_(torch.randn(h, generator=gen, dtype=torch.float64))
    return rbm


@pytest.mark.parametrize("shape", [(6, 4), (4, 7)])
def test_exact_log_partition_equals_brute_force(shape):
    rbm = _random_rbm(*shape)
    assert rbm.log_partition("exact") == pytest.approx(_brute_force_log_partition(rbm), abs=1e-10)
    grid = torch.tensor(list(itertools.product([0.0, 1.0], repeat=shape[0])), dtype=torch.float64)
    assert torch.logsumexp(rbm.log_prob(grid), 0).item() == pytest.approx(0.0, abs=1e-10)


@pytest.fixture(scope="module")
def mnist_rbm_784x12(binarized_mnist):
    train = binarized_mnist["train"][:1000].double()
    rbm = RBM(784, 12, seed=0).double().fit_cd(train, k=1, epochs=10, batch_size=50, lr=0.05)
    return rbm, train


def test_ais_within_three_standard_errors_of_exact(mnist_rbm_784x12):
    rbm, train = mnist_rbm_784x12
    exact = rbm.log_partition("exact")
    ais = rbm.log_partition("ais", data=train, num_runs=100, num_betas=3000,
                            generator=torch.Generator().manual_seed(0))
    assert 0 < ais.standard_error < 1.0
    assert abs(ais.estimate - exact) < 3 * ais.standard_error, (ais, exact)
    # positive control: the exact log Z of a slightly different RBM is far outside the band
    shifted = RBM(784, 12).double()
    shifted.load_state_dict(rbm.state_dict())
    shifted.hidden_bias.add_(0.05)
    assert abs(ais.estimate - shifted.log_partition("exact")) > 3 * ais.standard_error


def test_ais_log_prob_is_labelled_estimate_input(mnist_rbm_784x12, binarized_mnist):
    rbm, train = mnist_rbm_784x12
    ais = rbm.log_partition("ais", data=train, num_runs=20, num_betas=300,
                            generator=torch.Generator().manual_seed(1))
    test = binarized_mnist["test"][:50]
    diff = rbm.log_prob(test, log_partition=ais) - rbm.log_prob(test)
    assert torch.allclose(diff, torch.full_like(diff, rbm.log_partition("exact") - ais.estimate))


@pytest.mark.parametrize("persistent", [False, True])
def test_cd_training_increases_exact_log_likelihood(persistent):
    # toy data: two noisy prototypes on 10 visibles; exact log-likelihood via enumeration
    gen = torch.Generator().manual_seed(0)
    protos = torch.tensor([[1.0] * 5 + [0.0] * 5, [0.0] * 5 + [1.0] * 5], dtype=torch.float64)
    x = protos[torch.randint(0, 2, (500,), generator=gen)]
    flip = torch.rand(x.shape, generator=gen, dtype=torch.float64) < 0.05
    x = torch.where(flip, 1 - x, x)
    rbm = RBM(10, 4, seed=0).double()
    before = rbm.log_prob(x).mean().item()
    rbm.fit_cd(x, k=1, persistent=persistent, epochs=20, batch_size=25, lr=0.1)
    after = rbm.log_prob(x).mean().item()
    assert after > before + 1.0, (before, after)
    # a block Gibbs chain from the trained RBM reproduces the two prototypes
    draws = rbm.sample(200, num_steps=200, generator=torch.Generator().manual_seed(2))
    assert (draws[:, :5].mean(1) - draws[:, 5:].mean(1)).abs().mean() > 0.6


def test_free_energy_matches_summing_hidden_states():
    rbm = _random_rbm(5, 3)
    v = torch.tensor(list(itertools.product([0.0, 1.0], repeat=5)), dtype=torch.float64)
    h = torch.tensor(list(itertools.product([0.0, 1.0], repeat=3)), dtype=torch.float64)
    neg_e = (v @ rbm.visible_bias)[:, None] + (h @ rbm.hidden_bias)[None, :] + v @ rbm.weight @ h.T
    assert torch.allclose(rbm.free_energy(v), -torch.logsumexp(neg_e, 1))


def test_bad_input_named():
    rbm = RBM(4, 30)
    with pytest.raises(ValueError, match="method"):
        rbm.log_partition("bogus")
    with pytest.raises(ValueError, match="outside"):
        rbm.free_energy(rbm.check_data(torch.full((2, 4), 0.3)))
    big = RBM(30, 30)
    with pytest.raises(ValueError, match="ais"):
        big.log_partition("exact")
