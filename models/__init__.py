"""Generative processes as Pyro model/guide pairs.

- :mod:`models.linear`: factor analysis and probabilistic PCA (exact marginal and posterior,
  closed-form / EM fits).
- :mod:`models.dlvm`: deep latent variable models (VAEs) built from :mod:`models.priors`,
  :mod:`models.likelihoods` and :mod:`models.networks`.
"""
from models.dlvm import DLVM, LectureDLVM
from models.likelihoods import Bernoulli, Gaussian, Likelihood, StudentT, make_likelihood
from models.linear import PPCA, FactorAnalysis
from models.networks import mlp
from models.priors import MixturePrior, Prior, StandardNormalPrior, VampPrior, make_prior
from models.validation import check_binary, check_data, check_mask

__all__ = [
    "FactorAnalysis", "PPCA", "DLVM", "LectureDLVM",
    "Prior", "StandardNormalPrior", "MixturePrior", "VampPrior", "make_prior",
    "Likelihood", "Bernoulli", "Gaussian", "StudentT", "make_likelihood",
    "mlp", "check_data", "check_mask", "check_binary",
]
