r"""Discrete latents summed out exactly inside the log weights.

A discrete model site marked ``infer={"enumerate": "parallel"}`` and absent from the guide
is not sampled: Pyro's :class:`~pyro.poutine.enum_messenger.EnumMessenger` puts all of its
values on a dimension of its own, left of the particle plate (dims ``-3, -4, ...``; the data
plate is ``-1``, the particles ``-2``), and every site that depends on it broadcasts along
that dimension. The log weight of a particle is then

.. math::

    \log w_{ki} = \log \sum_{c} p(x_i, z_{ki}, c) - \log q(z_{ki} \mid x_i)
    = \operatorname{logsumexp}_c \Big[\sum_{s \in S_c} \log p_s\Big]
      + \sum_{s \notin S_c} \log p_s - \log q(z_{ki} \mid x_i),

where :math:`S_c` are the model sites whose log density depends on an enumerated value (the
others factor out of the sum). This is the exact marginal that Pyro's ``TraceEnum_ELBO``
computes by tensor contraction (``pyro.infer.traceenum_elbo``, ``pyro.ops.contract``); here
all enumerated dimensions are summed jointly, which is exact for any dependence between the
enumerated sites and costs the product of their support sizes per draw. The summed-out
block counts as likelihood (``log_lik``) when it contains an observed site, as prior
(``log_prior``) otherwise (e.g. a mixture prior's component: :math:`\log p(z) =
\log\sum_c \pi_c\, p(z \mid c)`).

Because the sum is exact, the ELBO and IWAE bounds, their gradients (the enumerated sites
need no score-function term) and the importance-sampled log-likelihood all see the
marginal model :math:`p(x, z)`.

Reference: Obermeyer, Bingham, Jankowiak, Pradhan, Chen, Goodman & Singh (2019), Tensor
variable elimination for plated factor graphs, ICML.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import pyro.poutine as poutine
import torch
from pyro.poutine.util import site_is_subsample

__all__ = ["FIRST_ENUM_DIM", "enumerated", "has_enumerated_sites", "marginalized_terms"]

#: The first dimension an enumerated site's values take (the particle plate is -2, the data
#: plate -1).
FIRST_ENUM_DIM = -3


def enumerated(model: Callable) -> Callable:
    """``model`` run under ``poutine.enum``: sites marked ``infer={"enumerate": "parallel"}``
    (and not replayed from the guide, which handlers applied inside this one do first) take all
    their values at once, on dims ``-3, -4, ...``."""
    return poutine.enum(model, first_available_dim=FIRST_ENUM_DIM)


def has_enumerated_sites(model_trace: poutine.Trace) -> bool:
    return any(site["type"] == "sample" and "_enumerate_dim" in site["infer"]
               for site in model_trace.nodes.values())


def marginalized_terms(model_trace: poutine.Trace, shape: torch.Size,
                       log_prob_of: Callable[[str, dict], torch.Tensor]
                       ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(log_lik, log_prior)`` ``[K, batch]`` of a model trace with its enumerated sites summed
    out (see the module docstring); None for a role with no site.

    ``log_prob_of(name, site)`` returns a site's log density (scale and mask applied) in the
    shape it has: ``[K, batch]`` (or broadcastable to it), with enumerated dims on the left
    when it depends on an enumerated value."""
    width = len(shape)
    log_lik = log_prior = None
    block, block_observed = None, False
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        log_p = log_prob_of(name, site)
        if log_p.dim() > width and any(s > 1 for s in log_p.shape[:-width]):
            block = log_p if block is None else block + log_p
            block_observed = block_observed or site["is_observed"]
            continue
        if log_p.dim() > width:
            log_p = log_p.reshape(log_p.shape[-width:])
        log_p = log_p.expand(shape)
        if site["is_observed"]:
            log_lik = log_p if log_lik is None else log_lik + log_p
        else:
            log_prior = log_p if log_prior is None else log_prior + log_p
    if block is not None:
        # every enumerated site's own log density spans its dim, so the block spans them all
        summed = torch.logsumexp(block.reshape((-1,) + tuple(block.shape[-width:])), dim=0)
        summed = summed.expand(shape)
        if block_observed:
            log_lik = summed if log_lik is None else log_lik + summed
        else:
            log_prior = summed if log_prior is None else log_prior + summed
    return log_lik, log_prior
