"""Pyro's ``Normal`` and ``Bernoulli`` with leaner ``log_prob`` formulas, used by the
built-in models.

The same distributions (sampling, ``expand``, ``mean``, entropy and the closed-form KL
divergences are Pyro's / torch's, found through the class hierarchy); only ``log_prob`` is
written with fewer elementwise passes. Inside a particle plate the guide's and the prior's
densities are evaluated on ``[K, batch, d]`` tensors, where torch's general formula
(``-(x - loc)^2 / (2 scale^2) - log scale - log sqrt(2 pi)``, the variance and the log of the
expanded scale each materialized) is a visible part of an IWAE step with large ``K``
(``benchmarks/README.md``, section 1), and so is the Bernoulli likelihood over the
``[K, batch, p]`` decoder logits. So ``to_event`` of the Normals sums the event in one
autograd node on the parameters as they were before the particle plate's expansion
(:class:`IndependentDiagonalNormal`), and the Bernoulli's event sum is one autograd node
(:class:`IndependentBinaryBernoulli`), for large logits a cache-sized chunk at a time (no
temporary as large as the logits). These are the single definition every path uses:
fitting, evaluation and diagnostics all call ``log_prob`` of the distribution the model or
guide builds.

``expand`` to the batch shape a distribution already has returns the distribution itself
(Pyro's plates expand every sample site's distribution to the plates' shape), and
``to_event`` returns an :class:`EventIndependent` with the same property.
"""
from __future__ import annotations

import math
from typing import Optional

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions.util import sum_rightmost

__all__ = ["DiagonalNormal", "StandardNormal", "BinaryBernoulli", "EventIndependent",
           "IndependentDiagonalNormal", "IndependentBinaryBernoulli", "normal_event_log_prob"]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class _ExpandKeepsShape:
    """``expand`` to the batch shape a distribution already has returns the distribution
    itself (distributions are immutable) rather than a copy.

    Pyro's plates expand the distribution of every sample site inside them to the plates'
    shape; for a site whose distribution is built in that shape (the usual case inside the
    data plate) torch's ``expand`` would build a new instance, with a new view of each
    parameter and a node in the autograd graph for each, to represent the same distribution.
    """

    def expand(self, batch_shape, _instance=None):
        if _instance is None and torch.Size(batch_shape) == self.batch_shape:
            return self
        return super().expand(batch_shape, _instance=_instance)


def _reinterpreted(base, reinterpreted_batch_ndims, independent_class):
    """``base.to_event(n)`` as an ``independent_class`` instance (Pyro's argument handling)."""
    if reinterpreted_batch_ndims is None:
        reinterpreted_batch_ndims = len(base.batch_shape)
    if reinterpreted_batch_ndims == 0:
        return base
    if reinterpreted_batch_ndims < 0:  # Pyro's own message
        raise ValueError(f"Cannot remove event dimensions from {type(base)}")
    return independent_class(base, reinterpreted_batch_ndims)


class EventIndependent(_ExpandKeepsShape, dist.Independent):
    """Pyro's ``Independent`` (what ``to_event`` returns) for the distributions of this module:
    the same distribution, whose ``expand`` to its own batch shape returns itself."""

    def to_event(self, reinterpreted_batch_ndims=None):
        if reinterpreted_batch_ndims is None:
            reinterpreted_batch_ndims = len(self.batch_shape)
        return self.base_dist.to_event(self.reinterpreted_batch_ndims + reinterpreted_batch_ndims)


class _ShapeKeepingBase(_ExpandKeepsShape):
    """``expand`` keeps an unchanged shape, ``to_event`` returns an :class:`EventIndependent`."""

    def to_event(self, reinterpreted_batch_ndims=None):
        return _reinterpreted(self, reinterpreted_batch_ndims, EventIndependent)


class DiagonalNormal(_ShapeKeepingBase, dist.Normal):
    """``Normal(loc, scale)`` whose ``log_prob`` standardizes once:

    .. math:: \\log \\mathcal{N}(x; \\mu, \\sigma) = -\\tfrac12 \\Big(\\frac{x - \\mu}{\\sigma}\\Big)^2
              - \\log \\sigma - \\tfrac12 \\log 2\\pi .

    ``to_event(n)`` returns an :class:`IndependentDiagonalNormal`, which sums the last
    dimension inside one autograd node; ``expand`` (a particle plate's, say) remembers the
    parameters before the expansion, so that this sum broadcasts them instead of reading the
    expanded copies (``log sigma`` is then taken once per row, not once per particle).
    """

    def expand(self, batch_shape, _instance=None):
        new = super().expand(batch_shape, _instance=_instance)
        if new is not self:
            new._unexpanded = self.unexpanded_params
        return new

    @property
    def unexpanded_params(self):
        """``(loc, scale)`` as given (broadcast together), before any ``expand``."""
        return getattr(self, "_unexpanded", None) or (self.loc, self.scale)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return _normal_log_density(value, self.loc, self.scale)

    def to_event(self, reinterpreted_batch_ndims=None):
        return _reinterpreted(self, reinterpreted_batch_ndims, IndependentDiagonalNormal)


class StandardNormal(_ShapeKeepingBase, dist.Normal):
    """:math:`\\mathcal{N}(0, 1)` (built as ``StandardNormal(zeros, ones)``, as
    :class:`pyro_lvm.models.priors.StandardNormalPrior` does), whose ``log_prob`` skips the
    location and scale:

    .. math:: \\log \\mathcal{N}(z; 0, 1) = -\\tfrac12 z^2 - \\tfrac12 \\log 2\\pi .

    With Pyro's validation on, ``log_prob`` checks that the location is 0 and the scale 1.
    ``to_event(n)`` returns an :class:`IndependentDiagonalNormal` (its event sum in one
    autograd node).
    """

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return _normal_log_density(value)

    def _validate_sample(self, value: torch.Tensor) -> None:
        super()._validate_sample(value)
        if not (bool((self.loc == 0).all()) and bool((self.scale == 1).all())):
            raise ValueError("StandardNormal must be built with loc 0 and scale 1; use "
                             "DiagonalNormal (or Normal) for other values")

    @property
    def unexpanded_params(self):
        return None, None

    def to_event(self, reinterpreted_batch_ndims=None):
        return _reinterpreted(self, reinterpreted_batch_ndims, IndependentDiagonalNormal)


class IndependentDiagonalNormal(EventIndependent):
    """``DiagonalNormal(loc, scale).to_event(n)`` (or ``StandardNormal``'s): Pyro's
    ``Independent`` whose ``log_prob`` sums the last dimension in one autograd node
    (:func:`normal_event_log_prob`) on the parameters before any particle-plate expansion.
    Values of another shape than the distribution's (broadcasting against it) take the
    elementwise formula."""

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        base = self.base_dist
        if not (torch.is_tensor(value) and value.shape == base.batch_shape and value.dim() > 0):
            return super().log_prob(value)
        if self._validate_args:
            base._validate_sample(value)
        loc, scale = base.unexpanded_params
        log_p = normal_event_log_prob(value, loc, scale)
        return sum_rightmost(log_p, self.reinterpreted_batch_ndims - 1)


def normal_event_log_prob(value: torch.Tensor, loc: Optional[torch.Tensor] = None,
                          scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:math:`\\sum_j \\log \\mathcal N(x_j; \\mu_j, \\sigma_j) = -\\tfrac12 \\lVert s \\rVert^2
    - \\sum_j \\log\\sigma_j - \\tfrac d2 \\log 2\\pi`, :math:`s = (x - \\mu) / \\sigma`, over the
    last dimension (``loc`` and ``scale`` broadcasting into ``value``; None: 0 and 1).

    Its gradients, :math:`\\partial/\\partial x = -s/\\sigma`, :math:`\\partial/\\partial\\mu =
    s/\\sigma` and :math:`\\partial/\\partial\\sigma = (s^2 - 1)/\\sigma`, are formed from one saved
    buffer (torch's autograd of the elementwise formula keeps and builds several more).
    Higher-order gradients and forward-mode differentiation are supported; under
    ``torch.func`` transforms, for tensor subclasses (``__torch_function__``), for a scale
    broadcasting along the last dimension and for a value narrower than the parameters, the
    plain formula (same numbers) is used.
    """
    tensors = tuple(t for t in (value, loc, scale) if t is not None)
    if (not all(_broadcasts_into(t.shape, value.shape) for t in tensors[1:])
            or (scale is not None and scale.shape[-1:] != value.shape[-1:])
            or _needs_plain_autograd(tensors)):
        # every element of the broadcast shape counts, a narrower scale's log too
        return _normal_log_density(value, loc, scale).sum(-1)
    if loc is None and scale is None:
        return _StandardNormalEventLogProb.apply(value)
    if loc is None:
        loc = torch.zeros((), dtype=value.dtype, device=value.device)
    if scale is None:
        scale = torch.ones(value.shape[-1:], dtype=value.dtype, device=value.device)
    return _NormalEventLogProb.apply(value, loc, scale)


def _normal_log_density(value: torch.Tensor, loc: Optional[torch.Tensor] = None,
                        scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The elementwise :math:`\\log \\mathcal N(x; \\mu, \\sigma)` (None: 0 and 1), in the
    inputs' broadcast shape: the one formula behind :class:`DiagonalNormal`,
    :class:`StandardNormal` and the plain path of :func:`normal_event_log_prob`."""
    standardized = value if loc is None else value - loc
    standardized = standardized if scale is None else standardized / scale
    if scale is None:
        return -0.5 * standardized * standardized - _HALF_LOG_2PI
    return -0.5 * standardized * standardized - scale.log() - _HALF_LOG_2PI


def _needs_plain_autograd(tensors) -> bool:
    """Whether a custom autograd function would lose something: under ``torch.func``
    transforms, and for tensor subclasses (``__torch_function__``, e.g. Pyro's
    ``ProvenanceTensor``), which a custom function would cut from the graph."""
    return (torch._C._are_functorch_transforms_active()
            or torch.overrides.has_torch_function(tensors))


class _StandardNormalEventLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value):
        ctx.save_for_backward(value)
        ctx.save_for_forward(value)
        return torch.linalg.vecdot(value, value).mul_(-0.5).sub_(value.shape[-1] * _HALF_LOG_2PI)

    @staticmethod
    def jvp(ctx, value_tangent):
        value, = ctx.saved_tensors
        return -torch.linalg.vecdot(value, value_tangent)

    @staticmethod
    def backward(ctx, grad):
        value, = ctx.saved_tensors
        return value * grad.neg().unsqueeze(-1)


class _NormalEventLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, loc, scale):
        standardized = torch.sub(value, loc).div_(scale)
        ctx.save_for_backward(value, loc, scale, standardized)
        ctx.save_for_forward(scale, standardized)
        log_det = scale.log().sum(-1).add_(value.shape[-1] * _HALF_LOG_2PI)
        return torch.linalg.vecdot(standardized, standardized).mul_(-0.5).sub_(log_det)

    @staticmethod
    def jvp(ctx, value_tangent, loc_tangent, scale_tangent):
        scale, standardized = ctx.saved_tensors
        weighted = standardized / scale
        out = torch.zeros(standardized.shape[:-1], dtype=scale.dtype, device=scale.device)
        if value_tangent is not None:
            out = out - torch.linalg.vecdot(weighted, value_tangent)
        if loc_tangent is not None:
            out = out + torch.linalg.vecdot(weighted, loc_tangent)
        if scale_tangent is not None:
            out = out + torch.linalg.vecdot(weighted * standardized - 1 / scale, scale_tangent)
        return out

    @staticmethod
    def backward(ctx, grad):
        value, loc, scale, standardized = ctx.saved_tensors
        grad = grad.unsqueeze(-1)
        if torch.is_grad_enabled():  # create_graph: differentiable in the inputs
            standardized = (value - loc) / scale
            weighted = standardized / scale * grad
        else:
            weighted = torch.div(standardized, scale).mul_(grad)  # s g / sigma
        grad_value = (-weighted).sum_to_size(value.shape) if ctx.needs_input_grad[0] else None
        grad_loc = weighted.sum_to_size(loc.shape) if ctx.needs_input_grad[1] else None
        grad_scale = None
        if ctx.needs_input_grad[2]:
            # sum over the broadcast rows of g (s^2 - 1) / sigma, the -1 term summed first;
            # in place unless the location's gradient is that same buffer
            in_place = not torch.is_grad_enabled() and (grad_loc is None
                                                        or loc.shape != weighted.shape)
            squares = weighted.mul_(standardized) if in_place else weighted * standardized
            grad_scale = squares.sum_to_size(scale.shape) \
                - grad.sum_to_size(scale.shape[:-1] + (1,)) / scale
        return grad_value, grad_loc, grad_scale


class BinaryBernoulli(_ExpandKeepsShape, dist.Bernoulli):
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
        return _reinterpreted(self, reinterpreted_batch_ndims, IndependentBinaryBernoulli)


class IndependentBinaryBernoulli(EventIndependent):
    """``BinaryBernoulli(logits).to_event(n)``: Pyro's ``Independent`` whose ``log_prob`` sums
    the last dimension in one autograd node (:func:`binary_bernoulli_event_log_prob`)."""

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self.base_dist._validate_sample(value)
        log_p = binary_bernoulli_event_log_prob(self.base_dist.logits, value)
        return sum_rightmost(log_p, self.reinterpreted_batch_ndims - 1)


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
    if value.requires_grad or _needs_plain_autograd((logits, value)):
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


#: Bytes of logits per chunk in :func:`_binary_event_sum` and the gradient: a chunk's
#: temporaries stay in a core's cache and are small enough to be reused from the heap.
_CHUNK_BYTES = 1 << 20


def _particle_blocks(logits: torch.Tensor, value: torch.Tensor):
    """``(logits as [P, Q, D], value as [Q, D])`` when ``value`` is the trailing block of
    ``logits`` repeated ``P`` times (the observed rows under a particle plate) and the logits are
    large enough for chunks to pay; None otherwise. CPU only: a GPU's caching allocator keeps
    freed memory, and there each chunk would cost kernel launches."""
    if (logits.device.type != "cpu" or logits.dim() < 2 or value.dim() < 1
            or value.dtype != logits.dtype
            or logits.shape[logits.dim() - value.dim():] != value.shape
            or logits.numel() * logits.element_size() <= 2 * _CHUNK_BYTES
            or not (logits.is_contiguous() and value.is_contiguous())):
        return None
    width = logits.shape[-1]
    rows = value.numel() // width
    return logits.view(-1, rows, width), value.view(rows, width)


def _chunks(blocks):
    """``(particle slice, row slice)`` pairs covering ``[P, Q]`` about ``_CHUNK_BYTES`` of
    logits at a time, the row slices outermost."""
    logits, _ = blocks
    particles, rows, width = logits.shape
    chunk_rows = max(1, _CHUNK_BYTES // (width * logits.element_size()))
    if rows <= chunk_rows:
        step = max(1, chunk_rows // rows)
        return [(slice(p, p + step), slice(0, rows)) for p in range(0, particles, step)]
    return [(slice(p, p + 1), slice(q, q + chunk_rows))
            for q in range(0, rows, chunk_rows) for p in range(particles)]


def _binary_event_sum(logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``_binary_log_prob(logits, value).sum(-1)``, for large logits evaluated a chunk at a
    time (the same elementwise formula and per-row sums), so that no temporary as large as the
    logits is allocated: at ``K = 50`` particles of a 784-pixel batch of 100 each would be
    15.7 MB, which the C allocator may hand back to the system and fault in again on the next
    call (``benchmarks/README.md``, section 1)."""
    blocks = _particle_blocks(logits, value)
    if blocks is None:
        return _binary_log_prob(logits, value).sum(-1)
    blocked_logits, blocked_value = blocks
    out = logits.new_empty(blocked_logits.shape[:2])
    for particles, rows in _chunks(blocks):
        torch.sum(_binary_log_prob(blocked_logits[particles, rows], blocked_value[rows]), -1,
                  out=out[particles, rows])
    return out.view(logits.shape[:-1])


def _binary_event_grad(logits: torch.Tensor, value: torch.Tensor,
                       grad: torch.Tensor) -> torch.Tensor:
    """``(value - sigmoid(logits)) * grad[..., None]`` in one buffer shaped like ``logits``
    (``value`` broadcasting into it), chunked as :func:`_binary_event_sum`."""
    grad = grad.unsqueeze(-1)
    blocks = _particle_blocks(logits, value)
    if blocks is None or grad.shape != logits.shape[:-1] + (1,):
        return torch.sigmoid(logits).sub_(value).mul_(-grad)
    blocked_logits, blocked_value = blocks
    out = torch.empty_like(blocked_logits)
    # (autograd may pass an expanded gradient, e.g. from an event sum over more dims)
    blocked_grad = grad.reshape(blocked_logits.shape[:2] + (1,))
    for particles, rows in _chunks(blocks):
        chunk = torch.sigmoid(blocked_logits[particles, rows], out=out[particles, rows])
        chunk.sub_(blocked_value[rows]).mul_(-blocked_grad[particles, rows])
    return out.view(logits.shape)


class _BinaryBernoulliEventLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, value):
        ctx.save_for_backward(logits, value)
        ctx.save_for_forward(logits, value)
        return _binary_event_sum(logits, value)

    @staticmethod
    def jvp(ctx, logits_tangent, value_tangent):
        logits, value = ctx.saved_tensors
        out = torch.zeros(torch.broadcast_shapes(logits.shape, value.shape)[:-1],
                          dtype=logits.dtype, device=logits.device)
        if logits_tangent is not None:
            out = out + torch.linalg.vecdot(value - torch.sigmoid(logits), logits_tangent)
        if value_tangent is not None:  # d/dx log sigmoid((2x - 1) eta) = 2 eta sigmoid(-(...))
            signed = (2 * value - 1) * logits
            out = out + torch.linalg.vecdot(2 * logits * torch.sigmoid(-signed), value_tangent)
        return out

    @staticmethod
    def backward(ctx, grad):
        logits, value = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None
        if not torch.is_grad_enabled() and _broadcasts_into(value.shape, logits.shape):
            grad_logits = _binary_event_grad(logits, value, grad)
        else:  # differentiable (create_graph) or broadcasting beyond the logits' shape
            grad_logits = (value - torch.sigmoid(logits)) * grad.unsqueeze(-1)
        if grad_logits.shape != logits.shape:
            grad_logits = grad_logits.sum_to_size(logits.shape)
        return grad_logits, None
