"""Pyro's ``Normal`` and ``Bernoulli`` with leaner ``log_prob`` formulas, used by the
built-in models.

The same distributions (sampling, ``expand``, ``mean``, entropy and the closed-form KL
divergences are Pyro's / torch's, found through the class hierarchy); only ``log_prob`` is
written with fewer elementwise passes. Inside a particle plate the guide's and the prior's
densities are evaluated on ``[K, batch, d]`` tensors, where torch's general formula
(``-(x - loc)^2 / (2 scale^2) - log scale - log sqrt(2 pi)``, the variance and the log of the
expanded scale each materialized) is a visible part of an IWAE step with large ``K``
(``benchmarks/README.md``, section 1); so is the Bernoulli likelihood over the
``[K, batch, p]`` decoder logits, whose event sum :class:`BinaryBernoulli` computes in one
autograd node (:class:`IndependentBinaryBernoulli`). These are the single definition every
path uses: fitting, evaluation and diagnostics all call ``log_prob`` of the distribution the
model or guide builds.
"""
from __future__ import annotations

import math

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions.util import sum_rightmost

__all__ = ["DiagonalNormal", "StandardNormal", "BinaryBernoulli", "IndependentBinaryBernoulli"]

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


class BinaryBernoulli(dist.Bernoulli):
    """Pyro's ``Bernoulli`` with a cheaper ``log_prob`` for values in {0, 1}:

    .. math:: \\log p(x \\mid \\eta) = -\\operatorname{softplus}\\big((1 - 2x)\\,\\eta\\big)
              = \\log\\sigma\\big((2x - 1)\\,\\eta\\big),

    which is :math:`\\log\\sigma(\\eta)` at :math:`x = 1` and :math:`\\log\\sigma(-\\eta)` at
    :math:`x = 0` (:math:`\\eta` = logits): the same numbers as torch's
    ``-binary_cross_entropy_with_logits`` up to float rounding, in fewer passes over the
    ``[..., p]`` logits, and ``(2x - 1)`` broadcasts against particle dimensions without
    expanding ``x``. ``to_event(n)`` returns an :class:`IndependentBinaryBernoulli`, whose
    ``log_prob`` also sums the last dimension inside one autograd node. Only valid for
    binary values (torch's formula also accepts fractional ones), which argument validation
    enforces; :class:`pyro_lvm.models.likelihoods.Bernoulli` uses it unless
    ``allow_fractional=True``. Sampling, ``expand``, ``mean`` etc. are Pyro's.
    """

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return _binary_log_prob(self.logits, value)

    def to_event(self, reinterpreted_batch_ndims=None):
        if reinterpreted_batch_ndims is None:
            reinterpreted_batch_ndims = len(self.batch_shape)
        if reinterpreted_batch_ndims == 0:
            return self
        if reinterpreted_batch_ndims < 0:  # Pyro's own message
            raise ValueError(f"Cannot remove event dimensions from {type(self)}")
        return IndependentBinaryBernoulli(self, reinterpreted_batch_ndims)


class IndependentBinaryBernoulli(dist.Independent):
    """``BinaryBernoulli(logits).to_event(n)``: Pyro's ``Independent`` whose ``log_prob`` sums
    the last dimension in one autograd node (:func:`binary_bernoulli_event_log_prob`)."""

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self.base_dist._validate_sample(value)
        log_p = binary_bernoulli_event_log_prob(self.base_dist.logits, value)
        return sum_rightmost(log_p, self.reinterpreted_batch_ndims - 1)

    def to_event(self, reinterpreted_batch_ndims=None):
        if reinterpreted_batch_ndims is None:
            reinterpreted_batch_ndims = len(self.batch_shape)
        return self.base_dist.to_event(self.reinterpreted_batch_ndims + reinterpreted_batch_ndims)


def binary_bernoulli_event_log_prob(logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """:math:`\\sum_j \\log\\sigma\\big((2x_j - 1)\\,\\eta_j\\big)` over the last dimension, for
    binary ``value`` broadcasting against ``logits``.

    The gradient :math:`\\partial/\\partial\\eta_j = x_j - \\sigma(\\eta_j)` is formed in one
    buffer (torch's autograd of the elementwise formula keeps two full-size tensors from the
    forward pass and builds two more backward). Higher-order gradients are supported; when
    ``value`` itself requires a gradient, under ``torch.func`` transforms and for tensor
    subclasses (``__torch_function__``), the plain elementwise formula (same numbers) is used.
    """
    if not torch.is_tensor(value) or not value.is_floating_point():
        value = torch.as_tensor(value, dtype=logits.dtype, device=logits.device)
    if (value.requires_grad or torch._C._are_functorch_transforms_active()
            or torch.overrides.has_torch_function((logits, value))):
        # e.g. Pyro's ProvenanceTensor (TraceGraph_ELBO with a non-reparameterized guide
        # site), which a custom autograd function would cut from the graph
        return _binary_log_prob(logits, value).sum(-1)
    return _BinaryBernoulliEventLogProb.apply(logits, value)


def _binary_log_prob(logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The elementwise density of :class:`BinaryBernoulli`, every path's one formula."""
    return F.logsigmoid((2 * value - 1) * logits)


def _broadcasts_into(shape: torch.Size, target: torch.Size) -> bool:
    """Whether ``shape`` broadcasts to ``target`` without growing it."""
    return len(shape) <= len(target) and all(
        s == 1 or s == t for s, t in zip(reversed(shape), reversed(target)))


class _BinaryBernoulliEventLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, value):
        ctx.save_for_backward(logits, value)
        return _binary_log_prob(logits, value).sum(-1)

    @staticmethod
    def backward(ctx, grad):
        logits, value = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None
        grad = grad.unsqueeze(-1)
        if not torch.is_grad_enabled() and _broadcasts_into(value.shape, logits.shape):
            # one buffer: sigmoid, then subtract and scale in place
            grad_logits = torch.sigmoid(logits).sub_(value).mul_(-grad)
        else:  # differentiable (create_graph) or broadcasting beyond the logits' shape
            grad_logits = (value - torch.sigmoid(logits)) * grad
        if grad_logits.shape != logits.shape:
            grad_logits = grad_logits.sum_to_size(logits.shape)
        return grad_logits, None
