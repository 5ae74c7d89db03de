"""Objectives over per-data-point log importance weights.

Every objective in pyro-lvm is computed from one quantity,

.. math::

    \\log w_{ki} = \\log p_\\theta(x_i, z_{ki}) - \\log q_\\phi(z_{ki} \\mid x_i),
    \\qquad z_{ki} \\sim q_\\phi(\\cdot \\mid x_i),\\; k = 1..K,

with the ``K`` particles drawn in one vectorized pass (a plate on the left of the data
plate). :func:`log_weights` returns this ``[K, batch]`` tensor for any model/guide pair that
keeps the contract (every sample site inside ``pyro.plate("data", N, dim=-1)``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import pyro
import pyro.poutine as poutine
from pyro.poutine.util import site_is_subsample
import torch

__all__ = ["PARTICLE_PLATE", "LogTerms", "trace_log_terms", "log_weights"]

#: Name of the vectorized particle plate (the same name Pyro's own ELBOs use, so that
#: random draws agree with ``RenyiELBO(vectorize_particles=True)`` at the same seed).
PARTICLE_PLATE = "num_particles_vectorized"
DATA_PLATE = "data"


@dataclass
class LogTerms:
    """Per-particle, per-data-point log densities of one vectorized model/guide pass.

    All tensors have shape ``[K, batch]``.

    Attributes
    ----------
    log_lik : sum of the model's observed sites, :math:`\\log p(x_i \\mid z_{ki})`.
    log_prior : sum of the model's latent sites, :math:`\\log p(z_{ki})`.
    log_q : sum of the guide's sites, :math:`\\log q(z_{ki} \\mid x_i)`.
    model_trace, guide_trace : the Pyro traces (for analytic KL, diagnostics, gradients).
    """

    log_lik: torch.Tensor
    log_prior: torch.Tensor
    log_q: torch.Tensor
    model_trace: poutine.Trace
    guide_trace: poutine.Trace

    @property
    def log_weights(self) -> torch.Tensor:
        return self.log_lik + self.log_prior - self.log_q

    def latent_sites(self):
        """Names of the latent (guide) sample sites."""
        return [name for name, site in self.guide_trace.nodes.items()
                if site["type"] == "sample" and not site["is_observed"]
                and not site_is_subsample(site)]


def _vectorized(fn: Callable, num_particles: int) -> Callable:
    def wrapped(*args, **kwargs):
        with pyro.plate(PARTICLE_PLATE, num_particles, dim=-2):
            return fn(*args, **kwargs)

    return wrapped


def _per_point(site_name: str, site: dict, shape: torch.Size, role: str) -> torch.Tensor:
    log_p = site["log_prob"]
    frames = {f.name for f in site["cond_indep_stack"]}
    if DATA_PLATE not in frames:
        raise ValueError(
            f"{role} site {site_name!r} is not inside pyro.plate({DATA_PLATE!r}, ...): per-data-point "
            f"importance weights need every sample site in the data plate "
            f"(run inference.check_contract(model, x) for details)"
        )
    try:
        return log_p.expand(shape) if log_p.shape != shape else log_p
    except RuntimeError:
        raise ValueError(
            f"{role} site {site_name!r} has log_prob shape {tuple(log_p.shape)}, which does not "
            f"broadcast to [particles, batch] = {tuple(shape)}; declare event dims with "
            f".to_event(...) so the data plate is the only batch dim"
        ) from None


def trace_log_terms(model: Callable, guide: Callable, x: torch.Tensor, num_particles: int = 1,
                    mask: Optional[torch.Tensor] = None) -> LogTerms:
    """Run ``guide`` then ``model`` (replayed on the guide's draws) once with ``num_particles``
    vectorized particles and split the log densities per site role. See :class:`LogTerms`."""
    if num_particles < 1:
        raise ValueError(f"num_particles must be >= 1, got {num_particles}")
    guide_trace = poutine.trace(_vectorized(guide, num_particles)).get_trace(x, mask=mask)
    model_trace = poutine.trace(
        poutine.replay(_vectorized(model, num_particles), trace=guide_trace)
    ).get_trace(x, mask=mask)
    guide_trace.compute_log_prob()
    model_trace.compute_log_prob()
    shape = torch.Size((num_particles, x.shape[0]))
    zero = x.new_zeros(shape)
    log_lik, log_prior, log_q = zero, zero, zero
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        term = _per_point(name, site, shape, "model")
        if site["is_observed"]:
            log_lik = log_lik + term
        else:
            log_prior = log_prior + term
    for name, site in guide_trace.nodes.items():
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site):
            log_q = log_q + _per_point(name, site, shape, "guide")
    return LogTerms(log_lik, log_prior, log_q, model_trace, guide_trace)


def log_weights(model: Callable, guide: Callable, x: torch.Tensor, num_particles: int = 1,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Log importance weights ``log p(x_i, z_ki) - log q(z_ki | x_i)``, shape ``[K, batch]``.

    The ``K`` particles are drawn in a single vectorized guide pass and scored in a single
    model pass; gradients flow through the reparameterized draws.
    """
    return trace_log_terms(model, guide, x, num_particles, mask).log_weights
