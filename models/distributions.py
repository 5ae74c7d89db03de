"""Pyro's ``Normal`` with leaner ``log_prob`` formulas, used by the built-in models.

The same distributions (sampling, ``expand``, ``mean``, entropy and the closed-form KL
divergences are Pyro's / torch's, found through the class hierarchy); only ``log_prob`` is
written with fewer elementwise passes. Inside a particle plate the guide's and the prior's
densities are evaluated on ``[K, batch, d]`` tensors, where torch's general formula
(``-(x - loc)^2 / (2 scale^2) - log scale - log sqrt(2 pi)``, the variance and the log of the
expanded scale each materialized) is a visible part of an IWAE step with large ``K``
(``benchmarks/README.md``, section 1). Like :class:`pyro_lvm.models.likelihoods.BinaryBernoulli`
these are the single definition every path uses: fitting, evaluation and diagnostics all call
``log_prob`` of the distribution the model or guide builds.
"""
from __future__ import annotations

import math

import pyro.distributions as dist
import torch

__all__ = ["DiagonalNormal", "StandardNormal"]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class DiagonalNormal(dist.Normal):
    """``Normal(loc, scale)`` whose ``log_prob`` standardizes once:

    .. math:: \\log \\mathcal{N}(x; \\mu, \\sigma) = -\\tfrac12 \\Big(\\frac{x - \\mu}{\\sigma}\\Big)^2
              - \\log \\sigma - \\tfrac12 \\log 2\\pi .
    """

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        standardized = (value - self.loc) / self.scale
        return -0.5 * standardized * standardized - self.scale.log() - _HALF_LOG_2PI


class StandardNormal(dist.Normal):
    """:math:`\\mathcal{N}(0, 1)` (built as ``StandardNormal(zeros, ones)``, as
    :class:`pyro_lvm.models.priors.StandardNormalPrior` does), whose ``log_prob`` skips the
    location and scale:

    .. math:: \\log \\mathcal{N}(z; 0, 1) = -\\tfrac12 z^2 - \\tfrac12 \\log 2\\pi .

    With Pyro's validation on, ``log_prob`` checks that the location is 0 and the scale 1.
    """

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
            if not (bool((self.loc == 0).all()) and bool((self.scale == 1).all())):
                raise ValueError("StandardNormal must be built with loc 0 and scale 1; use "
                                 "DiagonalNormal (or Normal) for other values")
        return -0.5 * value * value - _HALF_LOG_2PI
