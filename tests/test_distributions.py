"""models/distributions.py: the lean Normal log densities equal torch's Normal (values and
gradients, expanded and not), keep their class through expand / to_event, and give the
closed-form KL of torch's registry."""
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_lvm.models.distributions import DiagonalNormal, StandardNormal


def test_diagonal_normal_log_prob_and_gradients_equal_torch_normal():
    torch.manual_seed(0)
    loc = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(7, 3, dtype=torch.float64).add(0.1).requires_grad_()
    value = torch.randn(5, 7, 3, dtype=torch.float64)
    ours = DiagonalNormal(loc, scale).expand([5, 7, 3]).log_prob(value)
    ref = dist.Normal(loc, scale).expand([5, 7, 3]).log_prob(value)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    g_ours = torch.autograd.grad(ours.sum(), (loc, scale))
    g_ref = torch.autograd.grad(ref.sum(), (loc, scale))
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_standard_normal_log_prob_equals_torch_and_checks_its_parameters():
    torch.manual_seed(1)
    z = torch.randn(4, 6, 2, dtype=torch.float64, requires_grad=True)
    ours = StandardNormal(torch.zeros(2, dtype=torch.float64),
                          torch.ones(2, dtype=torch.float64)).to_event(1)
    ref = dist.Normal(torch.zeros(2, dtype=torch.float64), 1.0).to_event(1)
    torch.testing.assert_close(ours.log_prob(z), ref.log_prob(z), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(ours.log_prob(z).sum(), z)[0], -z)
    with pyro.validation_enabled(True), pytest.raises(ValueError, match="loc 0 and scale 1"):
        StandardNormal(torch.zeros(2), 2 * torch.ones(2)).log_prob(torch.zeros(2))


def test_expand_keeps_the_class_and_kl_uses_the_closed_form():
    q = DiagonalNormal(torch.tensor([0.5, -1.0]), torch.tensor([0.3, 2.0]))
    p = StandardNormal(torch.zeros(2), torch.ones(2))
    assert type(q.expand([4, 2])) is DiagonalNormal
    assert type(p.expand([4, 2])) is StandardNormal
    kl = torch.distributions.kl_divergence(q, p)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(q.loc, q.scale),
                                            torch.distributions.Normal(0.0, 1.0))
    torch.testing.assert_close(kl, ref)
