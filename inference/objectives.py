"""Objectives over per-data-point log importance weights.

Every objective in pyro-lvm is computed from one quantity,

.. math::

    \\log w_{ki} = \\log p_\\theta(x_i, z_{ki}) - \\log q_\\phi(z_{ki} \\mid x_i),
    \\qquad z_{ki} \\sim q_\\phi(\\cdot \\mid x_i),\\; k = 1..K,

with the ``K`` particles drawn in one vectorized pass (a plate on the left of the data
plate). :func:`~pyro_lvm.inference.importance_weights.log_weights` returns this ``[K, batch]``
tensor for any model/guide pair that keeps the contract (every sample site inside
``pyro.plate("data", N, dim=-1)``); how it is computed is described in
:mod:`pyro_lvm.inference.importance_weights`. This module builds the objectives on it: minibatch
scaling, guide-gradient estimators and analytic KL.

Bounds (per data point :math:`x_i`, both are lower bounds on :math:`\\log p_\\theta(x_i)`)

.. math::

    \\mathrm{ELBO}(x_i) = \\frac1K \\sum_k \\log w_{ki}, \\qquad
    \\mathrm{IWAE}_K(x_i) = \\log \\frac1K \\sum_k w_{ki}
    = \\operatorname{logsumexp}_k \\log w_{ki} - \\log K .

:math:`E[\\mathrm{IWAE}_K]` is non-decreasing in ``K`` and tends to :math:`\\log p(x_i)`
(Burda, Grosse & Salakhutdinov 2016). For a minibatch :math:`B` of size ``b`` out of ``N``
rows, the objectives return

.. math::

    \\mathcal{L} = -\\frac{N}{b} \\sum_{i \\in B} \\widehat{\\mathrm{bound}}(x_i),

i.e. the scale is applied *outside* the log-mean-exp, so that averaging over uniformly
random minibatches gives an unbiased estimate of the full-data bound
:math:`-\\sum_{i=1}^N E[\\widehat{\\mathrm{bound}}(x_i)]`. (Pyro's ``RenyiELBO`` puts
``poutine.scale`` inside the log-mean-exp, which is not unbiased for ``K > 1``.)

Guide-gradient estimators (reparameterized latents :math:`z = h_\\phi(\\epsilon, x)`):

* ``"standard"``: the gradient of the Monte Carlo bound itself,
  :math:`\\sum_k \\tilde w_k \\nabla_\\phi \\log w_k` with
  :math:`\\tilde w_k = w_k / \\sum_j w_j` (for the ELBO :math:`\\tilde w_k = 1/K`).
* ``"stl"`` (sticking the landing; Roeder, Wu & Duvenaud 2017): drop the score term
  :math:`-\\tilde w_k \\,\\partial_\\phi \\log q_\\phi(z_k\\mid x)` (the partial derivative
  with ``z`` held fixed). Unbiased for the ELBO (the score has mean zero) and exactly zero when
  ``q`` is the exact posterior; for IWAE with ``K > 1`` it is biased (Tucker et al. 2019).
* ``"dreg"`` (doubly reparameterized; Tucker, Lawson, Gu & Maddison 2019): the IWAE score term
  rewritten by the reparameterization identity, giving the unbiased estimator

  .. math::

      \\nabla_\\phi \\mathrm{IWAE}_K \\approx \\sum_k \\tilde w_k \\,\\partial_\\phi
      \\log p_\\theta(x, z_k)\\big|_{z_k\\ \\mathrm{fixed}}
      + \\sum_k \\tilde w_k^2 \\,\\frac{\\partial \\log w_k}{\\partial z_k}
      \\frac{d z_k}{d \\phi},

  whose signal-to-noise ratio does not decay as ``K`` grows (Rainforth et al. 2018 show that
  of the standard estimator decays like :math:`K^{-1/2}`).

All three share the model (decoder and prior) gradient
:math:`\\sum_k \\tilde w_k \\nabla_\\theta \\log p_\\theta(x, z_k)`. The construction used
here (:func:`_reparameterized_surrogate`) is generic: it works for any reparameterized guide,
including guides with several dependent latent sites and priors that share parameters with the
encoder (VampPrior), because it only uses partial derivatives with respect to the sampled
values and re-scores the model on detached samples. For a guide with one latent site (the
usual amortized guide, e.g. the DLVM's) the same estimators take one forward and one backward
pass (:func:`_one_pass_surrogate`).

Usage
-----
With :func:`pyro_lvm.fit` (``fit(pair, X, objective=IWAE(5, gradient="dreg"))``), with
Pyro's ``SVI(model, guide, optim, loss=IWAE(5))``, or as a plain torch loss::

    objective = IWAE(num_particles=5, gradient="dreg")
    for xb in loader:
        optimizer.zero_grad()
        objective(pair.model, pair.guide, xb, num_data=len(dataset)).backward()
        optimizer.step()

References
----------
Burda, Grosse & Salakhutdinov (2016), Importance weighted autoencoders, ICLR.
Roeder, Wu & Duvenaud (2017), Sticking the landing: simple, lower-variance gradient estimators
for variational inference, NeurIPS.
Rainforth, Kosiorek, Le, Maddison, Igl, Wood & Teh (2018), Tighter variational bounds are not
necessarily better, ICML.
Tucker, Lawson, Gu & Maddison (2019), Doubly reparameterized gradient estimators for Monte
Carlo objectives, ICLR.
Bowman et al. (2016), Generating sentences from a continuous space; Sønderby et al. (2016),
Ladder variational autoencoders (KL warm-up); Higgins et al. (2017), beta-VAE.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Callable, Optional, Tuple

import pyro.poutine as poutine
from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution
from pyro.poutine.util import site_is_subsample
import torch
from torch.distributions import Distribution, TransformedDistribution
from torch.distributions.constraints import Constraint

from pyro_lvm.inference import enumeration
from pyro_lvm.inference.kl import closed_form_kl
# the log-weight engine; its public names are re-exported here, where users import them
from pyro_lvm.inference import importance_weights
from pyro_lvm.inference.importance_weights import (DATA_PLATE, PARTICLE_PLATE, LogTerms,
                                                   _check_particles, _check_x,
                                                   _latent_site_names, _model_terms, _per_point,
                                                   _record, _run_guide, _score,
                                                   elbo_from_log_weights, iwae_from_log_weights,
                                                   log_weights, trace_log_terms)

__all__ = ["ELBO", "IWAE", *importance_weights.__all__]


# --------------------------------------------------------------------------------------
# Gradient machinery
# --------------------------------------------------------------------------------------
def _require_reparameterized(guide_trace: poutine.Trace, objective_name: str) -> None:
    for name in _latent_site_names(guide_trace):
        fn = guide_trace.nodes[name]["fn"]
        if not getattr(fn, "has_rsample", False):
            raise ValueError(
                f"{objective_name}: guide site {name!r} ({type(fn).__name__}) has no "
                f"reparameterized sampler (has_rsample=False); this objective differentiates "
                f"through the samples, so its gradient would be wrong. Use a reparameterizable "
                f"distribution, or pyro.infer.TraceGraph_ELBO for score-function gradients"
            )


def _broadcast_coefficient(coef: torch.Tensor, value: torch.Tensor, name: str) -> torch.Tensor:
    """Reshape a ``[K, batch]`` coefficient to multiply a site value ``[K, batch, *event]``."""
    if value.dim() < 2 or value.shape[:2] != coef.shape:
        raise ValueError(
            f"guide site {name!r} has value shape {tuple(value.shape)}, expected "
            f"[particles, batch, *event] = [{coef.shape[0]}, {coef.shape[1]}, ...]; declare "
            f"event dims with .to_event(...) so the data plate is the only batch dim"
        )
    return coef.reshape(coef.shape + (1,) * (value.dim() - 2))


class _GradientWeight:
    """Holds the per-draw factor that :class:`_ScaleGradient` applies; set after the forward
    pass has computed it (the normalized importance weights depend on the draws)."""

    weight: Optional[torch.Tensor] = None


class _ScaleGradient(torch.autograd.Function):
    """Identity on the draws ``z`` whose backward multiplies the incoming gradient by
    ``holder.weight`` (one backward pass for DReG, as hand-written implementations do)."""

    @staticmethod
    def forward(ctx, z, holder):
        ctx.holder = holder
        return z.view_as(z)

    @staticmethod
    def backward(ctx, grad):
        weight = ctx.holder.weight
        if weight is None:  # pragma: no cover - internal misuse
            raise RuntimeError("_ScaleGradient: the weight was not set before backward")
        return grad * weight, None


#: Attribute types a distribution may hold besides tensors and nested distributions for
#: :func:`_detached` to copy it (they carry no parameters).
_INERT_TYPES = (numbers.Number, str, bool, type(None), torch.Size, Constraint, torch.dtype)


def _detached(fn):
    """A copy of distribution ``fn`` with every tensor it holds detached, or None when it holds
    something that could carry parameters other than tensors (a transform, a module, a
    callable).

    Evaluating its ``log_prob`` at a draw gives :math:`\\log q_{\\bar\\phi}(z)`, the density
    with the guide's parameters held fixed: only the path through the draw keeps a gradient.
    """
    if not isinstance(fn, Distribution) or isinstance(fn, TransformedDistribution):
        return None
    copy = object.__new__(type(fn))
    for key, value in vars(fn).items():
        if torch.is_tensor(value):
            value = value.detach()
        elif isinstance(value, Distribution):
            value = _detached(value)
            if value is None:
                return None
        elif isinstance(value, (tuple, list)):
            if not all(torch.is_tensor(v) or isinstance(v, _INERT_TYPES) for v in value):
                return None
            value = type(value)(v.detach() if torch.is_tensor(v) else v for v in value)
        elif not isinstance(value, _INERT_TYPES):
            return None
        copy.__dict__[key] = value
    return copy


def _one_pass_surrogate(model: Callable, guide_trace: poutine.Trace, x: torch.Tensor,
                        num_particles: int, mask: Optional[torch.Tensor], *, bound: str,
                        estimator: str, beta: float = 1.0):
    """:func:`_reparameterized_surrogate` in one forward and one backward pass, for a guide
    with a single latent site whose distribution :func:`_detached` can copy (the usual
    amortized Gaussian guide); returns None for any other guide (the generic construction is
    used, on the same draws).

    ``log q`` is evaluated with the guide's parameters detached, so that only the path
    through the draws carries a gradient; with surrogate :math:`S = \\sum_{i,k} a_{ik}\\,
    \\ell_{ik}` (``a`` = ``w~`` for IWAE, ``1/K`` for the ELBO) the draws then receive
    :math:`a\\,\\partial\\ell/\\partial z`, and the model's parameters :math:`a\\,\\nabla\\log
    p`. DReG's path weight ``w~^2`` is reached by scaling the gradient flowing into the draws
    by ``w~`` once more (:class:`_ScaleGradient`). With one latent site no other draw depends
    on this one, so both are the generic estimator exactly (tested against it).
    """
    sites = _latent_site_names(guide_trace)
    if len(sites) != 1:
        return None
    site = guide_trace.nodes[sites[0]]
    fixed = _detached(site["fn"])
    if fixed is None:
        return None
    holder = _GradientWeight()
    z = site["value"]
    if estimator == "dreg":
        z = _ScaleGradient.apply(z, holder)
    scored = dict(site, fn=fixed, value=z, log_prob=None)
    replay = poutine.Trace()
    replay.add_node(sites[0], **scored)
    model_trace = _record(model, x, num_particles, mask, replay=replay, enumerate_sites=True)
    shape = torch.Size((num_particles, x.shape[0]))
    log_lik, log_prior = _model_terms(model_trace, shape)
    log_q = _per_point(sites[0], scored, shape, "guide")
    integrand = -beta * log_q
    for term, weight in ((log_lik, 1.0), (log_prior, beta)):
        if term is not None:
            integrand = integrand + (term if weight == 1.0 else weight * term)
    if bound == "iwae":
        value = iwae_from_log_weights(integrand.detach())
        normalized = torch.softmax(integrand.detach(), dim=0)
        if estimator == "dreg":
            holder.weight = normalized.reshape(normalized.shape + (1,) * (z.dim() - 2))
        surrogate = (normalized * integrand).sum()
    elif bound == "elbo":
        value = elbo_from_log_weights(integrand.detach())
        surrogate = integrand.sum() / num_particles
    else:  # pragma: no cover - internal misuse
        raise ValueError(f"unknown bound {bound!r}")
    return value, surrogate


def _reparameterized_surrogate(model: Callable, guide: Callable, x: torch.Tensor,
                               num_particles: int, mask: Optional[torch.Tensor], *,
                               bound: str, estimator: str, beta: float = 1.0,
                               keep_score: bool = False, objective_name: str = "objective",
                               guide_trace: Optional[poutine.Trace] = None
                               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Bound value and a surrogate whose gradient is the chosen estimator.

    Let :math:`\\bar z` be the guide's draws detached (fresh leaves) and
    :math:`\\ell_k(\\bar z) = \\log p(x, \\bar z_k)\\ [\\text{lik} + \\beta\\,\\text{prior}]
    - \\beta \\log q(\\bar z_k \\mid x)` re-scored on them. With model weights ``a`` (``w~`` for
    IWAE, ``1/K`` for the ELBO) and path weights ``c`` (``w~^2`` DReG, ``w~`` IWAE-STL,
    ``1/K`` ELBO-STL), the surrogate is

    .. math::

        S = \\sum_{i,k} a_{ik} [\\log p(x_i \\mid \\bar z_{ik}) + \\beta\\log p(\\bar z_{ik})]
          + \\sum_{\\text{sites } s} \\sum_{i,k} \\operatorname{sg}\\Big(c_{ik}
            \\frac{\\partial \\ell_{ik}}{\\partial \\bar z^{(s)}_{ik}}\\Big) \\cdot z^{(s)}_{ik}.

    The partial derivatives hold every other site value and every parameter fixed; multiplying
    them by the *total* derivative :math:`dz^{(s)}/d\\phi` of the reparameterized draws gives the
    pathwise derivative by the chain rule, also for guides whose later sites depend on earlier
    draws. ``keep_score=True`` adds :math:`-\\beta\\sum a \\log q(\\bar z)` (the score term), with
    which ``c = a`` reproduces the standard gradient exactly (used to test this construction).

    Returns ``(bound [batch], S)``; only the gradient of ``S`` is meaningful. ``guide_trace``:
    the guide's draws when it has already been run.
    """
    if guide_trace is None:
        guide_trace = _run_guide(guide, x, num_particles, mask)
        _require_reparameterized(guide_trace, objective_name)
    sites = _latent_site_names(guide_trace)
    draws = {name: guide_trace.nodes[name]["value"] for name in sites}
    leaves = {name: value.detach().requires_grad_() for name, value in draws.items()}
    replay_trace = poutine.Trace()
    for name in sites:
        replay_trace.add_node(name, type="sample", is_observed=False, value=leaves[name],
                              infer=dict(guide_trace.nodes[name]["infer"]))
    terms = _score(model, guide, x, num_particles, mask, guide_trace, replay_trace)
    integrand = terms.log_lik + beta * (terms.log_prior - terms.log_q)
    if bound == "iwae":
        value = iwae_from_log_weights(integrand)
        normalized = torch.softmax(integrand.detach(), dim=0)
        model_weight = normalized
        # DReG: w~^2 (Tucker et al. 2019, eq. 6); STL and the standard construction: w~
        path_weight = normalized ** 2 if estimator == "dreg" else normalized
    elif bound == "elbo":
        value = elbo_from_log_weights(integrand)
        model_weight = torch.full_like(integrand, 1.0 / num_particles).detach()
        path_weight = model_weight
    else:  # pragma: no cover - internal misuse
        raise ValueError(f"unknown bound {bound!r}")
    model_part = terms.log_lik + beta * terms.log_prior
    if keep_score:
        model_part = model_part - beta * terms.log_q
    surrogate = (model_weight * model_part).sum()
    grads = torch.autograd.grad(integrand.sum(), [leaves[n] for n in sites],
                                retain_graph=True, allow_unused=True) if sites else ()
    for name, grad in zip(sites, grads):
        if grad is None:  # the site value does not enter the integrand
            continue
        coef = _broadcast_coefficient(path_weight, draws[name], name)
        surrogate = surrogate + ((coef * grad).detach() * draws[name]).sum()
    return value, surrogate


# --------------------------------------------------------------------------------------
# Analytic KL
# --------------------------------------------------------------------------------------
def _unwrap(distribution):
    """Strip Pyro's Expanded/Masked wrappers; return (base distribution, mask or None)."""
    mask = None
    while True:
        if isinstance(distribution, MaskedDistribution):
            m = distribution._mask
            mask = m if mask is None else mask & m
            distribution = distribution.base_dist
        elif isinstance(distribution, ExpandedDistribution):
            distribution = distribution.base_dist
        else:
            return distribution, mask


def _analytic_site_kl(name: str, guide_site: dict, model_site: dict,
                      shape: torch.Size) -> Tuple[Optional[torch.Tensor], str]:
    """Per-point KL ``[K, batch]`` for one latent site, or (None, reason) when not available."""
    q_scale, p_scale = guide_site["scale"], model_site["scale"]
    if not (isinstance(q_scale, numbers.Number) and isinstance(p_scale, numbers.Number)
            and q_scale == p_scale):
        return None, "the guide and model sites carry different or tensor poutine.scale factors"
    if guide_site["mask"] is not None or model_site["mask"] is not None:
        return None, "the site is under poutine.mask"
    q, q_mask = _unwrap(guide_site["fn"])
    p, p_mask = _unwrap(model_site["fn"])
    kl = closed_form_kl(q, p)
    if kl is None:
        return None, (f"torch has no closed-form KL registered for guide "
                      f"{type(q).__name__} vs prior {type(p).__name__}")
    for m in (q_mask, p_mask):
        if m is False:
            kl = torch.zeros_like(kl)
        elif m is not None and m is not True:
            kl = torch.where(m, kl, kl.new_zeros(()))
    if q_scale != 1.0:
        kl = kl * q_scale
    try:
        kl = kl.expand(shape) if kl.shape != shape else kl
    except RuntimeError:
        return None, (f"the closed-form KL has shape {tuple(kl.shape)}, which does not broadcast "
                      f"to [particles, batch] = {tuple(shape)}")
    return kl, ""


# --------------------------------------------------------------------------------------
# Objectives
# --------------------------------------------------------------------------------------
class _Objective:
    """Shared protocol: ``differentiable_loss``, ``loss``, ``bound_per_point``, callable."""

    #: Marks objects implementing the pyro-lvm objective protocol (``fit`` checks this).
    pyro_lvm_objective = True
    #: Whether ``beta`` may be set (KL warm-up).
    supports_beta = False
    #: Gradients are taken through the draws: every guide latent needs ``rsample``.
    requires_reparameterized = True

    def __init__(self, num_particles: int, gradient: str, allowed: Tuple[str, ...]):
        self.num_particles = _check_particles(num_particles)
        if gradient not in allowed:
            raise ValueError(f"{type(self).__name__}: gradient must be one of {allowed}, got "
                             f"{gradient!r}")
        self.gradient = gradient

    def _surrogate(self, model, guide, x, mask, *, bound: str):
        """Bound and surrogate of the ``"stl"`` / ``"dreg"`` estimators: one pass for a guide
        with one latent site (:func:`_one_pass_surrogate`), the generic construction
        otherwise, on the same draws."""
        guide_trace = _run_guide(guide, x, self.num_particles, mask)
        _require_reparameterized(guide_trace, self.name)
        beta = self.beta
        out = _one_pass_surrogate(model, guide_trace, x, self.num_particles, mask, bound=bound,
                                  estimator=self.gradient, beta=beta)
        if out is not None:
            return out
        return _reparameterized_surrogate(model, guide, x, self.num_particles, mask, bound=bound,
                                          estimator=self.gradient, beta=beta,
                                          objective_name=self.name, guide_trace=guide_trace)

    def _standard_terms(self, model, guide, x, mask) -> LogTerms:
        """The log-weight terms whose gradient is the standard estimator (reparameterized
        draws). With one particle the runs leave the particle plate out (:func:`_record`): the
        same draws and densities (equal up to rounding) without the plate's per-site work in
        every training step."""
        particle_dim = self.num_particles > 1
        guide_trace = _run_guide(guide, x, self.num_particles, mask, particle_dim=particle_dim)
        _require_reparameterized(guide_trace, self.name)
        return _score(model, None, x, self.num_particles, mask, guide_trace,
                      particle_dim=particle_dim)

    # -- to implement ------------------------------------------------------------------
    def _bound(self, model, guide, x, mask) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _bound_and_surrogate(self, model, guide, x, mask):  # pragma: no cover
        raise NotImplementedError

    # -- protocol ----------------------------------------------------------------------
    @staticmethod
    def _minibatch_scale(num_data, batch_size: int) -> float:
        if num_data is None:
            return 1.0
        if isinstance(num_data, bool) or not isinstance(num_data, numbers.Integral):
            raise ValueError(f"num_data must be a positive integer (rows in the full data set), "
                             f"got {num_data!r}")
        if num_data < batch_size:
            raise ValueError(f"num_data={num_data} is smaller than the minibatch size "
                             f"{batch_size}; num_data is the number of rows in the full data set")
        return num_data / batch_size

    def differentiable_loss(self, model: Callable, guide: Callable, x: torch.Tensor,
                            mask: Optional[torch.Tensor] = None,
                            num_data: Optional[int] = None) -> torch.Tensor:
        """Scalar loss :math:`-\\frac{N}{b}\\sum_{i\\in B}\\widehat{\\mathrm{bound}}(x_i)` to
        minimize; its value is the bound estimate and its gradient the chosen estimator.

        Parameters
        ----------
        model, guide : callables ``(x, mask=None)`` keeping the model/guide contract.
        x : tensor ``[batch, ...]``, the minibatch (rows on dim 0).
        mask : optional bool tensor shaped like ``x`` (True = observed).
        num_data : rows ``N`` in the full data set (None: the minibatch is the data set).
        """
        x = _check_x(x)
        scale = self._minibatch_scale(num_data, x.shape[0])
        bound, surrogate = self._bound_and_surrogate(model, guide, x, mask)
        if surrogate is None:
            return -scale * bound.sum()
        return -scale * (bound.sum().detach() + (surrogate - surrogate.detach()))

    def __call__(self, model: Callable, guide: Callable, x: torch.Tensor,
                 mask: Optional[torch.Tensor] = None,
                 num_data: Optional[int] = None) -> torch.Tensor:
        """Same as :meth:`differentiable_loss` (use as a plain torch loss)."""
        return self.differentiable_loss(model, guide, x, mask=mask, num_data=num_data)

    def loss(self, model: Callable, guide: Callable, x: torch.Tensor,
             mask: Optional[torch.Tensor] = None, num_data: Optional[int] = None) -> float:
        """The value of :meth:`differentiable_loss` as a float, computed without gradients."""
        x = _check_x(x)
        scale = self._minibatch_scale(num_data, x.shape[0])
        with torch.no_grad():
            return float(-scale * self._bound(model, guide, x, mask).sum())

    def bound_per_point(self, model: Callable, guide: Callable, x: torch.Tensor,
                        mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-row bound estimates ``[batch]`` (nats, higher is better), without gradients.

        Each entry is an unbiased estimate of that row's bound (ELBO or
        :math:`E[\\mathrm{IWAE}_K]`); rows are independent given the parameters, so repeated
        rows give independent replicates (useful for Monte Carlo standard errors).
        """
        x = _check_x(x)
        with torch.no_grad():
            return self._bound(model, guide, x, mask)

    def loss_and_grads(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        """Pyro ``SVI`` compatibility: backpropagate :meth:`differentiable_loss`, return its
        value. Called as ``loss_and_grads(model, guide, x, mask=None, num_data=None)``."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return float(loss.detach())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._repr_args()})"


class ELBO(_Objective):
    """Evidence lower bound, per data point averaged over ``num_particles`` draws.

    .. math::

        \\mathrm{ELBO}_\\beta(x_i) = E_{q(z\\mid x_i)}[\\log p(x_i\\mid z)]
        - \\beta\\, \\mathrm{KL}(q(z\\mid x_i)\\,\\|\\,p(z))
        \\approx \\frac1K\\sum_k \\Big[\\log p(x_i\\mid z_k)
        + \\beta\\big(\\log p(z_k) - \\log q(z_k\\mid x_i)\\big)\\Big].

    ``beta = 1`` gives the ELBO (a lower bound on :math:`\\log p(x_i)`); ``beta < 1`` is the
    KL warm-up / beta-VAE objective (not a bound on :math:`\\log p(x)` any more).

    Parameters
    ----------
    num_particles : int
        Draws per data point (vectorized).
    analytic_kl : bool
        Replace the Monte Carlo term :math:`\\log p(z_k) - \\log q(z_k\\mid x)` of each latent
        site by the closed form :math:`-\\mathrm{KL}(q\\,\\|\\,p)` where torch registers one
        (plus full-covariance vs diagonal Gaussian). Sites without a closed form (e.g. a mixture
        prior) fall back to Monte Carlo, with one ``UserWarning`` per objective and site.
    beta : float >= 0
        Weight of the KL term; settable (see :class:`KLWarmup`).
    gradient : ``"standard"`` | ``"stl"``
        ``"stl"`` drops the score term of :math:`\\log q` (Roeder et al. 2017): same
        expectation, zero variance at the exact posterior. Not combinable with ``analytic_kl``.
    """

    supports_beta = True

    def __init__(self, num_particles: int = 1, analytic_kl: bool = False, beta: float = 1.0,
                 gradient: str = "standard"):
        if gradient == "dreg":
            raise ValueError("ELBO: gradient='dreg' is an estimator for the importance-weighted "
                             "bound (use IWAE(K, gradient='dreg')); for the ELBO the doubly "
                             "reparameterized gradient reduces to gradient='stl'")
        super().__init__(num_particles, gradient, ("standard", "stl"))
        if not isinstance(analytic_kl, bool):
            raise ValueError(f"analytic_kl must be True or False, got {analytic_kl!r}")
        if analytic_kl and gradient == "stl":
            raise ValueError("ELBO(analytic_kl=True, gradient='stl'): sticking the landing drops "
                             "the score of the Monte Carlo log q term, which analytic_kl removes; "
                             "use one or the other")
        self.analytic_kl = analytic_kl
        self.beta = beta
        self._warned_sites: set = set()

    @property
    def beta(self) -> float:
        return self._beta

    @beta.setter
    def beta(self, value) -> None:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                or not math.isfinite(value) or value < 0:
            raise ValueError(f"beta must be a finite number >= 0, got {value!r}")
        self._beta = float(value)

    @property
    def name(self) -> str:
        parts = ["elbo"]
        if self.num_particles > 1:
            parts.append(str(self.num_particles))
        if self.analytic_kl:
            parts.append("analytic_kl")
        if self.gradient != "standard":
            parts.append(self.gradient)
        return "_".join(parts)

    def _repr_args(self) -> str:
        return (f"num_particles={self.num_particles}, analytic_kl={self.analytic_kl}, "
                f"beta={self.beta}, gradient={self.gradient!r}")

    def _regularizer(self, terms: LogTerms) -> torch.Tensor:
        """Per-particle :math:`\\log p(z) - \\log q(z\\mid x)` with analytic KL where possible."""
        if not self.analytic_kl:
            return terms.log_prior - terms.log_q
        if enumeration.has_enumerated_sites(terms.model_trace):
            raise ValueError(f"{self.name}: analytic_kl with enumerated discrete sites is not "
                             f"supported (their sum mixes prior and likelihood terms); use "
                             f"ELBO() or IWAE(K)")
        reg = torch.zeros_like(terms.log_lik)
        covered = set()
        for name in terms.latent_sites():
            guide_site = terms.guide_trace.nodes[name]
            model_site = terms.model_trace.nodes.get(name)
            if model_site is None or model_site["type"] != "sample" or model_site["is_observed"]:
                raise ValueError(f"{self.name}: guide site {name!r} has no latent counterpart in "
                                 f"the model (run inference.check_contract for details)")
            kl, reason = _analytic_site_kl(name, guide_site, model_site, terms.shape)
            if kl is None:
                if name not in self._warned_sites:
                    self._warned_sites.add(name)
                    warnings.warn(
                        f"{self.name}: no closed-form KL for latent site {name!r} ({reason}); "
                        f"using the Monte Carlo estimate log p(z) - log q(z|x) for this site",
                        UserWarning, stacklevel=4)
                reg = reg + terms.site_log_prob(name, "model") - terms.site_log_prob(name, "guide")
            else:
                reg = reg - kl
            covered.add(name)
        # model latent sites the guide does not sample (a contract violation, but keep the
        # bookkeeping identical to the Monte Carlo path)
        for name, site in terms.model_trace.nodes.items():
            if (site["type"] == "sample" and not site["is_observed"]
                    and not site_is_subsample(site) and name not in covered):
                reg = reg + terms.site_log_prob(name, "model")
        return reg

    def _integrand(self, terms: LogTerms) -> torch.Tensor:
        return terms.log_lik + self.beta * self._regularizer(terms)

    def _bound(self, model, guide, x, mask):
        return elbo_from_log_weights(
            self._integrand(trace_log_terms(model, guide, x, self.num_particles, mask)))

    def _bound_and_surrogate(self, model, guide, x, mask):
        if self.gradient == "stl":
            return self._surrogate(model, guide, x, mask, bound="elbo")
        return elbo_from_log_weights(self._integrand(self._standard_terms(model, guide, x,
                                                                          mask))), None


class IWAE(_Objective):
    """Importance-weighted bound (Burda et al. 2016) per data point,

    .. math::

        \\mathrm{IWAE}_K(x_i) = \\log \\frac1K \\sum_{k=1}^K
        \\frac{p(x_i, z_{ki})}{q(z_{ki}\\mid x_i)}, \\qquad z_{ki}\\sim q(\\cdot\\mid x_i),

    summed over the minibatch and scaled by ``N/b`` outside the log-mean-exp.
    :math:`E[\\mathrm{IWAE}_1] = \\mathrm{ELBO} \\le E[\\mathrm{IWAE}_K] \\le
    E[\\mathrm{IWAE}_{K+1}] \\le \\log p(x_i)`.

    Parameters
    ----------
    num_particles : int
        ``K``, importance samples per data point (vectorized).
    gradient : ``"standard"`` | ``"dreg"`` | ``"stl"``
        Guide-gradient estimator (module docstring): ``"dreg"`` is unbiased with a
        signal-to-noise ratio that does not collapse as ``K`` grows; ``"stl"`` is biased for
        ``K > 1`` but zero-variance at the exact posterior. The model gradient is the standard
        one in all three.

    ``beta`` is fixed at 1: a KL weight is not defined inside the log-mean-exp.
    """

    supports_beta = False

    def __init__(self, num_particles: int = 5, gradient: str = "standard"):
        super().__init__(num_particles, gradient, ("standard", "dreg", "stl"))

    @property
    def beta(self) -> float:
        return 1.0

    @beta.setter
    def beta(self, value) -> None:
        if value != 1:
            raise ValueError(f"IWAE has no KL weight: beta={value!r} is not defined for the "
                             f"importance-weighted bound (only 1); use ELBO(beta=...) for "
                             f"KL warm-up")

    @property
    def name(self) -> str:
        suffix = "" if self.gradient == "standard" else f"_{self.gradient}"
        return f"iwae_{self.num_particles}{suffix}"

    def _repr_args(self) -> str:
        return f"num_particles={self.num_particles}, gradient={self.gradient!r}"

    def _bound(self, model, guide, x, mask):
        return iwae_from_log_weights(log_weights(model, guide, x, self.num_particles, mask))

    def _bound_and_surrogate(self, model, guide, x, mask):
        if self.gradient in ("dreg", "stl"):
            return self._surrogate(model, guide, x, mask, bound="iwae")
        return iwae_from_log_weights(self._standard_terms(model, guide, x, mask).log_weights), None
