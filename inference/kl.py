"""Closed-form KL divergences, one definition for the ELBO's ``analytic_kl`` and the latent-usage
diagnostic."""
from __future__ import annotations

from typing import Optional

import torch
from torch.distributions import Independent, MultivariateNormal, Normal, kl_divergence

__all__ = ["closed_form_kl"]


def _as_multivariate_normal(fn) -> Optional[MultivariateNormal]:
    """A factorized Normal (``Independent(Normal)`` with one event dim) as a MultivariateNormal;
    a MultivariateNormal as it is; None otherwise."""
    if isinstance(fn, MultivariateNormal):
        return fn
    base, reinterpreted = fn, 0
    while isinstance(base, Independent):
        reinterpreted += base.reinterpreted_batch_ndims
        base = base.base_dist
    if isinstance(base, Normal) and reinterpreted == 1 and len(fn.event_shape) == 1:
        return MultivariateNormal(base.loc, scale_tril=torch.diag_embed(base.scale))
    return None


def closed_form_kl(q, p) -> Optional[torch.Tensor]:
    """:math:`\\mathrm{KL}(q \\,\\|\\, p)` in closed form, or None when none is known.

    torch's registry (:func:`torch.distributions.kl_divergence`), plus a full-covariance
    Gaussian against a factorized one, either way round (e.g. a factor-analysis guide against
    its standard-normal prior), computed as MultivariateNormal vs MultivariateNormal, which
    torch does not register:

    .. math:: \\mathrm{KL} = \\tfrac12\\big[\\operatorname{tr}(\\Sigma_p^{-1}\\Sigma_q)
              + (\\mu_p - \\mu_q)^\\top \\Sigma_p^{-1} (\\mu_p - \\mu_q) - d
              + \\log\\det\\Sigma_p - \\log\\det\\Sigma_q\\big].
    """
    try:
        return kl_divergence(q, p)
    except NotImplementedError:
        pass
    q_mvn, p_mvn = _as_multivariate_normal(q), _as_multivariate_normal(p)
    if q_mvn is not None and p_mvn is not None:
        return kl_divergence(q_mvn, p_mvn)
    return None
