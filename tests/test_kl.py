"""closed_form_kl (inference/kl.py): the one closed-form KL used by ELBO(analytic_kl=True) and
latent_usage, against the Gaussian formula written out and against Monte Carlo."""
import math

import pyro.distributions as dist
import pytest
import torch

from pyro_lvm.inference.kl import closed_form_kl


def gaussian_kl(mu_q, cov_q, mu_p, cov_p):
    """0.5 [tr(S_p^-1 S_q) + (m_p - m_q)' S_p^-1 (m_p - m_q) - d + log|S_p| - log|S_q|]."""
    d = mu_q.shape[-1]
    inv = torch.linalg.inv(cov_p)
    diff = mu_p - mu_q
    return 0.5 * (torch.trace(inv @ cov_q) + diff @ inv @ diff - d
                  + torch.logdet(cov_p) - torch.logdet(cov_q))


def test_full_covariance_against_factorized_either_way_round():
    torch.manual_seed(0)
    a = torch.randn(3, 3, dtype=torch.float64)
    cov_q = a @ a.T + 0.5 * torch.eye(3, dtype=torch.float64)
    mu_q = torch.randn(3, dtype=torch.float64)
    mu_p, sd_p = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    q = dist.MultivariateNormal(mu_q, covariance_matrix=cov_q)
    p = dist.Normal(mu_p, sd_p).to_event(1)
    expected = gaussian_kl(mu_q, cov_q, mu_p, torch.diag(sd_p ** 2))
    assert closed_form_kl(q, p).item() == pytest.approx(expected.item(), rel=1e-10)
    reverse = gaussian_kl(mu_p, torch.diag(sd_p ** 2), mu_q, cov_q)
    assert closed_form_kl(p, q).item() == pytest.approx(reverse.item(), rel=1e-10)
    # Monte Carlo check of the same number (se-based tolerance)
    z = q.sample((200_000,))
    diff = q.log_prob(z) - p.log_prob(z)
    se = diff.std() / math.sqrt(len(diff))
    assert abs(diff.mean() - expected) < 4 * se


def test_registered_pairs_pass_through_and_unknown_pairs_give_none():
    q, p = dist.Normal(0.3, 0.7), dist.Normal(0.0, 1.0)
    assert torch.equal(closed_form_kl(q, p), torch.distributions.kl_divergence(q, p))
    mixture = dist.MixtureSameFamily(dist.Categorical(logits=torch.zeros(2)),
                                     dist.Normal(torch.tensor([-1.0, 1.0]), 1.0))
    assert closed_form_kl(q, mixture) is None
