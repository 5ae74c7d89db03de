"""Generative processes as Pyro model/guide pairs.

- :mod:`pyro_lvm.models.linear`: factor analysis and probabilistic PCA (exact marginal and posterior,
  closed-form / EM fits).
- :mod:`pyro_lvm.models.poisson_pca`: Poisson PCA, a linear latent model for counts.
- :mod:`pyro_lvm.models.cluster_dlvm`: a DLVM with a mixture prior and an enumerated component
  latent, for clustering.
- :mod:`pyro_lvm.models.dlvm`: deep latent variable models (VAEs) built from :mod:`pyro_lvm.models.priors`,
  :mod:`pyro_lvm.models.likelihoods` and :mod:`pyro_lvm.models.networks`.
- :mod:`pyro_lvm.models.flows`: IAF guide and flow prior for DLVMs.
- Exact-likelihood and representation baselines: :mod:`pyro_lvm.models.bernoulli_mixture`
  (EM, enumerated pair), :mod:`pyro_lvm.models.made`, :mod:`pyro_lvm.models.rbm` (CD, AIS),
  :mod:`pyro_lvm.models.autoencoders`.
"""
from pyro_lvm.models.autoencoders import Autoencoder, DenoisingAutoencoder, LinearAutoencoder
from pyro_lvm.models.bernoulli_mixture import BernoulliMixture
from pyro_lvm.models.exact_pair import ExactLikelihoodPair
from pyro_lvm.models.flows import ConditionalIAF, FlowPrior, IAFGuide, IAFGuidedDLVM
from pyro_lvm.models.made import MADE
from pyro_lvm.models.rbm import RBM, AISResult
from pyro_lvm.models.dlvm import DLVM, LectureDLVM
from pyro_lvm.models.likelihoods import (Bernoulli, Binomial, Categorical, Gaussian, Likelihood,
                                         NegativeBinomial, Poisson, StudentT, make_likelihood)
from pyro_lvm.models.linear import PPCA, FactorAnalysis
from pyro_lvm.models.poisson_pca import PoissonPCA
from pyro_lvm.models.program import ProgramPair
from pyro_lvm.models.cluster_dlvm import ClusterDLVM
from pyro_lvm.models.networks import mlp
from pyro_lvm.models.priors import MixturePrior, Prior, StandardNormalPrior, VampPrior, make_prior
from pyro_lvm.models.validation import check_binary, check_data, check_mask

__all__ = [
    "FactorAnalysis", "PPCA", "PoissonPCA", "DLVM", "LectureDLVM", "ClusterDLVM",
    "Prior", "StandardNormalPrior", "MixturePrior", "VampPrior", "make_prior",
    "Likelihood", "Bernoulli", "Gaussian", "StudentT", "make_likelihood",
    "Poisson", "NegativeBinomial", "Binomial", "Categorical",
    "mlp", "check_data", "check_mask", "check_binary",
    "BernoulliMixture", "MADE", "RBM", "AISResult", "ExactLikelihoodPair",
    "LinearAutoencoder", "Autoencoder", "DenoisingAutoencoder",
    "IAFGuide", "ConditionalIAF", "FlowPrior", "IAFGuidedDLVM", "ProgramPair",
]
