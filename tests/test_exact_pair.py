import torch

from pyro_lvm.inference import log_likelihood
from pyro_lvm.models import MADE, RBM, BernoulliMixture, ExactLikelihoodPair


def test_is_estimate_of_a_pair_without_latents_is_the_exact_log_likelihood():
    x = torch.bernoulli(torch.full((20, 6), 0.3), generator=torch.Generator().manual_seed(0))
    for base in (MADE(6, 8), BernoulliMixture(6, 2), RBM(6, 3)):
        pair = ExactLikelihoodPair(base)
        est = log_likelihood(pair, x, num_samples=5, seed=0)
        with torch.no_grad():
            exact = pair.log_marginal(x).mean().item()
        assert abs(est.mean - exact) < 1e-5 and est.mc_se == 0.0
        assert pair.sample(3).shape == (3, 6)


def test_an_ais_scored_pair_is_not_reported_as_exact():
    rbm = RBM(6, 3)
    pair = ExactLikelihoodPair(rbm, likelihood_kind="AIS",
                               log_prob=lambda x: rbm.log_prob(x, log_partition=1.0))
    x = torch.bernoulli(torch.full((5, 6), 0.3), generator=torch.Generator().manual_seed(0))
    est = log_likelihood(pair, x, num_samples=3, seed=0)
    assert est.exact_mean is None
    assert abs(est.mean - rbm.log_prob(x, log_partition=1.0).mean().item()) < 1e-5
