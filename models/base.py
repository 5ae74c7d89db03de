"""What every model family in :mod:`pyro_lvm.models` shares."""
from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import torch

__all__ = ["unique_module_name", "LogWeightTerms", "normal_log_prob", "HALF_LOG_2PI"]

_instance_counter = itertools.count()


def unique_module_name(cls_name: str) -> str:
    """A process-unique Pyro name prefix for a top-level model instance.

    ``PyroModule`` mirrors its parameters into Pyro's global parameter store under
    ``<name>.<attribute>``. With the default empty name, two instances of the same class would
    look each other's tensors up by the same key, so gradients and values leak between models
    that are used outside an isolated store. A unique prefix per instance keeps them apart even
    then (fits and evaluations additionally run in their own store).
    """
    return f"{cls_name}_{next(_instance_counter)}"


class LogWeightTerms(NamedTuple):
    """Per-particle, per-row log densities ``[K, batch]`` of one vectorized pass, computed by a
    model family's own tensor code instead of Pyro traces (see ``log_weight_terms`` below).

    ``log_lik`` :math:`= \\log p(x_i \\mid z_{ki})` (observed entries only), ``log_prior``
    :math:`= \\log p(z_{ki})`, ``log_q`` :math:`= \\log q(z_{ki} \\mid x_i)`; the log
    importance weights are ``log_lik + log_prior - log_q``.

    The optional *Pyro-free path* of a model family is two methods on the module that owns the
    model and guide (:class:`models.dlvm.DLVM` has them)::

        log_weight_terms_match(model_fn, guide_fn) -> bool
        log_weight_terms(x, num_particles=1, mask=None, *, stop_guide_params=False,
                         latent_hook=None) -> LogWeightTerms

    ``log_weight_terms_match`` says whether ``(model_fn, guide_fn)`` are this module's own,
    unmodified ``model`` and ``guide`` (so that the tensor code computes exactly what tracing
    them would). ``log_weight_terms`` must consume the random number generator exactly as the
    traced guide does (same draws at the same seed) and return the same numbers as
    :func:`inference.objectives.trace_log_terms`. ``stop_guide_params=True`` evaluates
    :math:`\\log q` with the guide's distribution parameters detached (only the path through
    the draws keeps a gradient: the "sticking the landing" / DReG form); ``latent_hook``, if
    given, is applied to the draws ``[K, batch, d]`` before anything scores them (the
    objectives use it to rescale the gradient flowing back into the guide).
    """

    log_lik: torch.Tensor
    log_prior: torch.Tensor
    log_q: torch.Tensor


#: :math:`\\log\\sqrt{2\\pi}`, as torch.distributions.Normal writes it
HALF_LOG_2PI = math.log(math.sqrt(2 * math.pi))


def normal_log_prob(value: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Elementwise :math:`\\log \\mathcal N(v; \\mu, \\sigma^2)`, written with the same operations
    in the same order as ``torch.distributions.Normal.log_prob`` (bit-identical results, no
    distribution object, no argument validation)."""
    var = scale ** 2
    return -((value - loc) ** 2) / (2 * var) - scale.log() - HALF_LOG_2PI
