"""A model with an exact (or exactly-offset) ``log_prob`` as a Pyro model/guide pair with no
latent site, so that every entry point that takes a pair (``log_likelihood``, the study runner)
accepts MADE, the RBM and the mixture of Bernoullis.

With no latent site the importance weights are ``log w = log p(x)`` for every draw, so the
importance-sampled estimate equals ``log p(x)`` exactly (standard error 0) whatever the number
of draws. For the RBM, ``log p(x) = -F(x) - log Z`` with ``log Z`` an AIS estimate: the value
is then an AIS estimate, and whoever reports it must say so (the ``likelihood_kind`` of
:class:`ExactLikelihoodPair`).
"""
from __future__ import annotations

from typing import Callable, Optional

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import constraints

__all__ = ["ExactLikelihoodPair", "RowDensity"]


class RowDensity(dist.TorchDistribution):
    """A distribution over rows ``[n, p]`` (batch ``[n]``, event ``[p]``) whose ``log_prob`` is
    a given function of the rows; sampling draws from a given sampler."""

    arg_constraints: dict = {}
    support = constraints.independent(constraints.boolean, 1)

    def __init__(self, log_prob_fn: Callable, sample_fn: Callable, batch_size: int,
                 data_dim: int, validate_args=None):
        self._log_prob_fn, self._sample_fn = log_prob_fn, sample_fn
        super().__init__(torch.Size([batch_size]), torch.Size([data_dim]),
                         validate_args=validate_args)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        flat = value.reshape(-1, value.shape[-1])
        return self._log_prob_fn(flat).reshape(value.shape[:-1])

    def sample(self, sample_shape=torch.Size()):
        n = int(torch.Size(sample_shape).numel() * self.batch_shape.numel())
        out = self._sample_fn(n)
        return out.reshape(tuple(sample_shape) + tuple(self.batch_shape) + tuple(self.event_shape))

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        new = RowDensity(self._log_prob_fn, self._sample_fn, 1, self.event_shape[0])
        new._batch_shape = batch_shape
        return new


class ExactLikelihoodPair(nn.Module):
    """Wrap ``base`` (with ``log_prob(x)`` or ``log_marginal(x)``, ``sample(n)``,
    ``data_dim``) as ``model(x)`` = one observed site ``"x"`` inside ``pyro.plate("data")``
    and an empty guide.

    Parameters
    ----------
    base : nn.Module
        The density model.
    likelihood_kind : {"exact", "AIS"}
        What its ``log_prob`` is (``"AIS"`` for an RBM scored with an AIS estimate of log Z).
    log_prob : callable, optional
        ``x -> [n]``; defaults to ``base.log_marginal`` or ``base.log_prob``.
    """

    def __init__(self, base: nn.Module, likelihood_kind: str = "exact",
                 log_prob: Optional[Callable] = None):
        super().__init__()
        self.base = base
        self.likelihood_kind = likelihood_kind
        self.data_dim = int(getattr(base, "data_dim", getattr(base, "num_visible", 0)))
        self._log_prob = log_prob or getattr(base, "log_marginal", None) or base.log_prob
        if likelihood_kind != "exact":
            # not an exact value: evaluation entry points must not report it as one
            self.log_marginal = None

    def log_marginal(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """:math:`\\log p(x)` per row, ``[n]`` (no missing entries); absent (None) unless
        ``likelihood_kind="exact"``."""
        if mask is not None and not bool(mask.all()):
            raise ValueError(f"{type(self.base).__name__} cannot score rows with missing entries")
        return self._log_prob(x)

    def model(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
        if mask is not None and not bool(mask.all()):
            raise ValueError(f"{type(self.base).__name__} cannot score rows with missing entries")
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("x", RowDensity(self._log_prob, self.sample, x.shape[0], x.shape[1]),
                        obs=x)

    def guide(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
        """Empty: the model has no latent site."""

    def sample(self, n: int) -> torch.Tensor:
        return self.base.sample(n)

    def check_data(self, x, mask=None):
        return self.base.check_data(x)
