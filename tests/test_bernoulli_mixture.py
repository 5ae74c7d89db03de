import itertools

import numpy as np
import pyro
import pytest
import torch

from pyro_lvm.models import BernoulliMixture


def _toy_data(n=300, p=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[0.9] * 4 + [0.1] * 4, [0.1] * 4 + [0.9] * 4, [0.5] * 8])[:, :p]
    c = torch.randint(0, 3, (n,), generator=gen)
    return torch.bernoulli(centers[c], generator=gen).double()


def _brute_force_log_marginal(mix, x):
    """sum_k pi_k prod_j mu^x (1-mu)^(1-x), a direct product of probabilities (no logsumexp)."""
    pi = torch.softmax(mix.weight_logits.detach(), -1)
    mu = torch.sigmoid(mix.logits.detach())
    out = []
    for row in x:
        total = 0.0
        for k in range(mix.num_components):
            total += float(pi[k] * torch.prod(mu[k] ** row * (1 - mu[k]) ** (1 - row)))
        out.append(np.log(total))
    return np.array(out)


@pytest.mark.parametrize("smoothing", [0.0, 0.5])
def test_em_objective_never_decreases_and_log_marginal_is_exact(smoothing):
    x = _toy_data()
    mix = BernoulliMixture(8, 3).double().fit_em(x, max_iter=50, tol=0.0, smoothing=smoothing)
    key = "log_likelihood" if smoothing == 0 else "objective"
    values = np.array([h[key] for h in mix.history_])
    assert len(values) > 5
    assert np.all(np.diff(values) >= -1e-10), np.diff(values).min()
    assert values[-1] > values[0] + 0.1          # EM did something
    np.testing.assert_allclose(mix.log_marginal(x[:40]).detach().numpy(),
                               _brute_force_log_marginal(mix, x[:40]), rtol=1e-10)


def test_brute_force_detects_wrong_values():
    # positive control: the brute-force oracle is sensitive to a perturbation of one weight
    x = _toy_data(n=10)
    mix = BernoulliMixture(8, 3).double().fit_em(x, max_iter=5)
    ref = _brute_force_log_marginal(mix, x)
    with torch.no_grad():
        mix.weight_logits[0] += 0.3
    assert np.abs(mix.log_marginal(x).detach().numpy() - ref).max() > 1e-3


def test_probabilities_sum_to_one_over_all_binary_vectors():
    mix = BernoulliMixture(6, 4).double()
    grid = torch.tensor(list(itertools.product([0.0, 1.0], repeat=6)), dtype=torch.float64)
    assert torch.logsumexp(mix.log_marginal(grid), 0).item() == pytest.approx(0.0, abs=1e-12)


def test_missing_entries_marginalized_exactly():
    mix = BernoulliMixture(4, 2).double()
    x = torch.tensor([[1.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False, False]])
    grid = torch.tensor(list(itertools.product([0.0, 1.0], repeat=2)), dtype=torch.float64)
    full = torch.cat([x[:, :2].expand(4, 2), grid], 1)
    expected = torch.logsumexp(mix.log_marginal(full), 0)
    assert mix.log_marginal(x, mask).item() == pytest.approx(expected.item(), abs=1e-12)


@pytest.mark.parametrize("masked", [False, True])
def test_enumerated_pair_equals_log_marginal(masked):
    x = _toy_data(n=50)
    mix = BernoulliMixture(8, 3).double().fit_em(x, max_iter=10)
    mask = None
    if masked:
        mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) > 0.3
    elbo = pyro.infer.TraceEnum_ELBO(max_plate_nesting=1)
    loss = elbo.loss(mix.model, mix.guide, x, mask)
    assert loss == pytest.approx(-mix.log_marginal(x, mask).sum().item(), rel=1e-10)


def test_enumerated_pair_trains_by_gradient():
    x = _toy_data(n=200).float()
    mix = BernoulliMixture(8, 3)
    before = mix.log_marginal(x).mean().item()
    elbo = pyro.infer.TraceEnum_ELBO(max_plate_nesting=1)
    opt = torch.optim.Adam(mix.parameters(), lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        elbo.differentiable_loss(mix.model, mix.guide, x).backward()
        opt.step()
    assert mix.log_marginal(x).mean().item() > before + 0.2


def test_bad_input_named():
    mix = BernoulliMixture(4, 2)
    with pytest.raises(ValueError, match="outside"):
        mix.log_marginal(torch.full((2, 4), 0.5))
    with pytest.raises(ValueError, match="4"):
        mix.log_marginal(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="smoothing"):
        mix.fit_em(torch.zeros(2, 4), smoothing=-1)


def test_em_on_binarized_mnist_subset(binarized_mnist):
    train, test = binarized_mnist["train"][:1000].double(), binarized_mnist["test"][:500].double()
    mix = BernoulliMixture(784, 20).double().fit_em(train, max_iter=30)
    test_ll = mix.log_marginal(test).mean().item()
    # far better than independent pixels, far worse than the 137.64 of 500 components on 50k
    independent = BernoulliMixture(784, 1).double().fit_em(train, max_iter=2)
    assert test_ll > independent.log_marginal(test).mean().item() + 10
    assert -250 < test_ll < -137
    assert mix.sample(3).shape == (3, 784)
