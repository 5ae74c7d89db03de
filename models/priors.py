"""Priors :math:`p_\\lambda(z)` over the latent space :math:`\\mathbb{R}^d` of a deep latent
variable model.

* :class:`StandardNormalPrior` -- :math:`p(z) = \\mathcal{N}(z; 0, I_d)` (Kingma & Welling 2014;
  Rezende et al. 2014).
* :class:`MixturePrior` -- a learnable mixture of :math:`K` diagonal Gaussians,

  .. math:: p_\\lambda(z) = \\sum_{k=1}^K \\pi_k\\, \\mathcal{N}\\big(z; m_k, \\operatorname{diag} s_k^2\\big),
            \\qquad \\pi = \\operatorname{softmax}(\\alpha),\\; s_k = s_{\\min} + \\operatorname{softplus}(\\rho_k).

* :class:`VampPrior` -- the "variational mixture of posteriors" prior of Tomczak & Welling
  (2018): the aggregate posterior :math:`\\frac1N\\sum_n q_\\phi(z\\mid x_n)` is approximated by
  the encoder evaluated at :math:`K` learnable pseudo-inputs :math:`u_k`,

  .. math:: p_\\lambda(z) = \\sum_{k=1}^K w_k\\, q_\\phi(z \\mid u_k), \\qquad w_k = 1/K
            \\text{ (or learnable)},

  where :math:`q_\\phi` is the *same* encoder (same parameters) as the model's guide, so the
  prior moves with the encoder and gradients reach both :math:`\\phi` and the :math:`u_k`.

Every prior is a :class:`pyro.nn.PyroModule` with ``latent_dim``, :meth:`Prior.distribution`
(a distribution with batch shape ``[]`` and event shape ``[d]``, to be used as
``pyro.sample("z", prior.distribution())`` inside the data plate, which expands it),
:meth:`Prior.log_prob` and :meth:`Prior.sample`. Constants are buffers, so ``.to(device)``
moves everything.

A prior's parameters are registered with Pyro when it is used inside a model method of an
enclosing ``PyroModule`` (such as :class:`models.dlvm.DLVM`, whose ``model`` is a
``pyro_method``). To use a learnable prior in a plain function model, register it with
``pyro.module("prior", prior)`` first.

References
----------
Kingma, D. P. & Welling, M. (2014). Auto-encoding variational Bayes. ICLR.
Rezende, D. J., Mohamed, S. & Wierstra, D. (2014). Stochastic backpropagation and approximate
inference in deep generative models. ICML.
Tomczak, J. M. & Welling, M. (2018). VAE with a VampPrior. AISTATS.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple, Union

import pyro.distributions as dist
import numpy as np
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule
from torch import nn

from .distributions import StandardNormal
from .validation import positive_int

__all__ = ["Prior", "StandardNormalPrior", "MixturePrior", "FullCovarianceMixturePrior",
           "VampPrior", "make_prior",
           "PRIOR_NAMES", "DiagonalGaussianMixture"]

#: Accepted names (and aliases) for :func:`make_prior`.
PRIOR_NAMES = {
    "normal": "normal", "standard_normal": "normal", "gaussian": "normal",
    "mixture": "mixture", "mog": "mixture", "gmm": "mixture",
    "vamp": "vamp", "vampprior": "vamp",
}


def _positive_float(value, what: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a positive number, got {value!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{what} must be a positive finite number, got {value!r}")
    return value


def inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    """:math:`\\log(e^y - 1)`, the inverse of softplus, stable for large ``y``."""
    return y + torch.log(-torch.expm1(-y))


class Prior(PyroModule):
    """Base class of latent priors :math:`p(z)` on :math:`\\mathbb{R}^d`.

    Subclasses implement :meth:`distribution`.
    """

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = positive_int(latent_dim, "latent_dim")

    def distribution(self) -> dist.TorchDistribution:
        """:math:`p(z)` as a Pyro distribution with batch shape ``[]``, event shape ``[d]``."""
        raise NotImplementedError

    def _check_z(self, z: torch.Tensor) -> torch.Tensor:
        if not isinstance(z, torch.Tensor):
            raise ValueError(f"z must be a torch.Tensor, got {type(z).__name__}")
        if z.dim() < 1 or z.shape[-1] != self.latent_dim:
            raise ValueError(
                f"z has shape {tuple(z.shape)}; its last dimension must be latent_dim="
                f"{self.latent_dim}"
            )
        return z

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """:math:`\\log p(z)` for ``z`` of shape ``[..., d]``; returns shape ``[...]``."""
        return self.distribution().log_prob(self._check_z(z))

    def sample(self, n: int) -> torch.Tensor:
        """``n`` independent draws, shape ``[n, d]`` (no gradient)."""
        n = positive_int(n, "n")
        with torch.no_grad():
            return self.distribution().sample((n,))

    def extra_repr(self) -> str:
        return f"latent_dim={self.latent_dim}"


class StandardNormalPrior(Prior):
    """:math:`p(z) = \\mathcal{N}(z; 0, I_d)`; no learnable parameters."""

    def __init__(self, latent_dim: int):
        super().__init__(latent_dim)
        self.register_buffer("loc", torch.zeros(self.latent_dim))
        self.register_buffer("scale", torch.ones(self.latent_dim))

    def distribution(self) -> dist.TorchDistribution:
        return StandardNormal(self.loc, self.scale).to_event(1)


class DiagonalGaussianMixture(dist.MixtureSameFamily):
    """A mixture of ``K`` diagonal Gaussians on :math:`\\mathbb{R}^d` whose :meth:`log_prob`
    never forms a ``[..., K, d]`` tensor.

    Same distribution as ``MixtureSameFamily(Categorical(logits), Normal(loc, scale).to_event(1))``
    (sampling, ``expand``, marginals are inherited), but the component log densities are

    .. math:: \\log \\mathcal{N}(z; m_k, \\operatorname{diag} s_k^2) = -\\tfrac12 \\Big[
              \\textstyle\\sum_j \\tilde z_j^2 s_{kj}^{-2} - 2 \\sum_j \\tilde z_j \\tilde m_{kj} s_{kj}^{-2}
              + \\sum_j \\tilde m_{kj}^2 s_{kj}^{-2}\\Big] - \\textstyle\\sum_j \\log s_{kj}
              - \\tfrac d2 \\log 2\\pi,

    with :math:`\\tilde z = z - c`, :math:`\\tilde m_k = m_k - c` centred at the mean
    component location ``c``: two matrix products ``[..., d] x [d, K]``. The torch version
    broadcasts ``z`` against every component and materializes ``[..., K, d]``, which for a
    VampPrior with 500 components and ``K x B`` importance draws is hundreds of times the
    size of the draws themselves. The expanded quadratic form cancels large terms, so it is
    evaluated in (at least) float64: the relative error is then about
    :math:`10^{-16} (|\\tilde z| / s)^2`, negligible unless a component is sharper than
    :math:`10^{-6}` of its distance to the centre. The result has the input's dtype.

    Parameters
    ----------
    logits : tensor ``[K]``
    loc, scale : tensors ``[K, d]``
        Component parameters, without batch dimensions (``expand`` adds those).
    """

    def __init__(self, logits: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor,
                 validate_args=None):
        if logits.dim() != 1 or loc.dim() != 2 or loc.shape != scale.shape \
                or loc.shape[0] != logits.shape[0]:
            raise ValueError(
                f"DiagonalGaussianMixture needs logits [K], loc and scale [K, d] (no batch "
                f"dimensions); got logits {tuple(logits.shape)}, loc {tuple(loc.shape)}, "
                f"scale {tuple(scale.shape)}"
            )
        super().__init__(dist.Categorical(logits=logits), dist.Normal(loc, scale).to_event(1),
                         validate_args=validate_args)
        self._params = (logits, loc, scale)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(DiagonalGaussianMixture, _instance)
        new = super().expand(batch_shape, _instance=new)
        new._params = self._params
        return new

    @property
    def num_components(self) -> int:
        return int(self._params[0].shape[0])

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        logits, loc, scale = self._params
        work = torch.promote_types(value.dtype, torch.float64)
        z, loc, scale = value.to(work), loc.to(work), scale.to(work)
        center = loc.mean(0).detach()
        z, loc = z - center, loc - center
        precision = scale.pow(-2)                                              # [K, d]
        quad = ((z * z) @ precision.T - 2 * (z @ (loc * precision).T)
                + (loc * loc * precision).sum(-1))                             # [..., K]
        log_norm = -scale.log().sum(-1) - 0.5 * loc.shape[-1] * math.log(2 * math.pi)
        log_comp = -0.5 * quad + log_norm + torch.log_softmax(logits.to(work), -1)
        out = torch.logsumexp(log_comp, dim=-1).to(value.dtype)
        return out.expand(torch.broadcast_shapes(out.shape, self.batch_shape))


class _GaussianMixtureMixin:
    """Shared by the two mixture priors: the mixture as (weights, locs, scales)."""

    def mixture_components(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mixture weights ``[K]``, component means ``[K, d]`` and scales ``[K, d]``."""
        raise NotImplementedError

    def distribution(self) -> dist.TorchDistribution:
        logits, loc, scale = self._mixture_logits_loc_scale()
        return DiagonalGaussianMixture(logits, loc, scale)

    @property
    def eval_width(self) -> int:
        """Elements per draw of :math:`z` that :meth:`log_prob` keeps alive: the ``[..., K]``
        matrix of component log densities, in float64 (counted twice, in float32 units)."""
        components = getattr(self, "num_pseudo_inputs", None) or self.num_components
        return 2 * components


class _LearnedMixturePrior(Prior):
    """What the learned Gaussian mixture priors share: checked options, mixture ``logits``
    ``[K]`` and component ``means`` ``[K, d]``; subclasses add the component scales."""

    def __init__(self, latent_dim: int, num_components: int, init_scale: float,
                 init_spread: float, min_scale: float) -> None:
        super().__init__(latent_dim)
        self.num_components = positive_int(num_components, "num_components")
        init_scale = _positive_float(init_scale, "init_scale")
        init_spread = _positive_float(init_spread, "init_spread")
        self.min_scale = float(min_scale)
        if not (0 <= self.min_scale < init_scale):
            raise ValueError(
                f"min_scale must be in [0, init_scale={init_scale}), got {min_scale!r}"
            )
        self.logits = nn.Parameter(torch.zeros(self.num_components))
        self.means = nn.Parameter(init_spread * torch.randn(self.num_components, self.latent_dim))

    @property
    def weights(self) -> torch.Tensor:
        """Mixture weights :math:`\\pi` (softmax of ``logits``), shape ``[K]``."""
        return torch.softmax(self.logits, dim=-1)

    def component_distribution(self, index: Optional[torch.Tensor] = None
                               ) -> dist.TorchDistribution:
        """:math:`p(z \\mid c)` for every component (batch ``[K]``) or, given component
        indices, for those (batch ``index.shape``); event shape ``[d]``."""
        raise NotImplementedError

    def component_draws(self, eps: torch.Tensor) -> torch.Tensor:
        """:math:`z = m_c + L_c \\varepsilon` for standard normal ``eps`` ``[..., K, d]``: a draw
        of :math:`z \\sim p(z \\mid c)` in column ``c``."""
        raise NotImplementedError

    def set_components(self, weights, means, covariances) -> None:
        """Set :math:`\\pi` ``[K]``, :math:`m_k` ``[K, d]`` and the component covariances (the
        subclass's form)."""
        raise NotImplementedError

    def _set_weights_and_means(self, weights, means) -> None:
        like = self.logits
        with torch.no_grad():
            self.logits.copy_(torch.as_tensor(weights, dtype=torch.float64).log().to(like))
            self.means.copy_(torch.as_tensor(means).to(like))


class MixturePrior(_GaussianMixtureMixin, _LearnedMixturePrior):
    """Learnable mixture of ``K`` diagonal Gaussians,
    :math:`p(z) = \\sum_k \\pi_k \\mathcal{N}(z; m_k, \\operatorname{diag} s_k^2)`.

    Parameters
    ----------
    latent_dim : int
    num_components : int
        ``K``.
    init_scale : float
        Initial component scale :math:`s_k` (all coordinates).
    init_spread : float
        Component means start at :math:`m_k \\sim \\mathcal{N}(0, \\text{init\\_spread}^2 I)`
        (random, so that the components are not symmetric and can separate; seeded by the
        global torch RNG).
    min_scale : float
        Floor :math:`s_{\\min}` of the component scales, :math:`s = s_{\\min} + \\operatorname{softplus}(\\rho)`:
        a component collapsing onto a single posterior mean would otherwise make
        :math:`\\log p(z)` grow without bound.

    Learnable parameters: ``logits`` :math:`\\alpha` ``[K]`` (weights :math:`\\operatorname{softmax}(\\alpha)`),
    ``means`` ``[K, d]``, ``raw_scales`` :math:`\\rho` ``[K, d]``.
    """

    def __init__(self, latent_dim: int, num_components: int = 10, init_scale: float = 1.0,
                 init_spread: float = 1.0, min_scale: float = 1e-4):
        super().__init__(latent_dim, num_components, init_scale, init_spread, min_scale)
        init_scale = float(init_scale)  # checked above: positive, > min_scale
        K, d = self.num_components, self.latent_dim
        self.raw_scales = nn.Parameter(
            inverse_softplus(torch.full((K, d), init_scale - self.min_scale))
        )

    @property
    def scales(self) -> torch.Tensor:
        """Component scales :math:`s_k`, shape ``[K, d]``."""
        return self.min_scale + F.softplus(self.raw_scales)

    def _mixture_logits_loc_scale(self):
        return self.logits, self.means, self.scales

    def mixture_components(self):
        return self.weights, self.means, self.scales

    def component_distribution(self, index=None):
        means, scales = self.means, self.scales
        if index is not None:
            means, scales = means[index], scales[index]
        return dist.Normal(means, scales).to_event(1)

    def component_draws(self, eps):
        return self.means + self.scales * eps

    def set_components(self, weights, means, covariances) -> None:
        """``covariances``: per-coordinate variances ``[K, d]`` (component scales below
        ``min_scale`` are raised to just above it)."""
        self._set_weights_and_means(weights, means)
        sd = np.maximum(np.sqrt(np.asarray(covariances, dtype=np.float64)) - self.min_scale, 1e-3)
        with torch.no_grad():
            self.raw_scales.copy_(inverse_softplus(torch.as_tensor(
                sd, dtype=self.raw_scales.dtype)))

    def extra_repr(self) -> str:
        return f"latent_dim={self.latent_dim}, num_components={self.num_components}"


class FullCovarianceMixturePrior(_LearnedMixturePrior):
    """Learnable mixture of ``K`` Gaussians with full covariances,
    :math:`p(z) = \\sum_k \\pi_k \\mathcal{N}(z; m_k, L_k L_k^\\top)`.

    :math:`L_k` is lower triangular with diagonal :math:`s_{\\min} +
    \\operatorname{softplus}(\\rho_{k,jj})` and free entries below it, so every covariance is
    positive definite with eigenvalues bounded below by a multiple of :math:`s_{\\min}^2`
    (the floor that keeps :math:`\\log p(z)` bounded, as in :class:`MixturePrior`). A
    diagonal mixture cannot follow clusters that are tilted in the latent space; on the
    digits the encoder means of a pre-trained DLVM form such clusters (benchmarks/README.md,
    section 6).

    Parameters
    ----------
    latent_dim, num_components, init_scale, init_spread, min_scale
        As for :class:`MixturePrior` (components start isotropic, ``L_k = init_scale * I``).

    Learnable parameters: ``logits`` ``[K]``, ``means`` ``[K, d]``, ``raw_tril`` ``[K, d, d]``
    (strictly lower part: the off-diagonal of :math:`L_k`; diagonal: :math:`\\rho_k`; the
    upper part is unused).
    """

    def __init__(self, latent_dim: int, num_components: int = 10, init_scale: float = 1.0,
                 init_spread: float = 1.0, min_scale: float = 1e-4):
        super().__init__(latent_dim, num_components, init_scale, init_spread, min_scale)
        init_scale = float(init_scale)  # checked above: positive, > min_scale
        K, d = self.num_components, self.latent_dim
        raw = torch.zeros(K, d, d)
        raw.diagonal(dim1=-2, dim2=-1).fill_(float(inverse_softplus(
            torch.tensor(init_scale - self.min_scale))))
        self.raw_tril = nn.Parameter(raw)

    @property
    def scale_tril(self) -> torch.Tensor:
        """Cholesky factors :math:`L_k`, shape ``[K, d, d]``."""
        diag = self.min_scale + F.softplus(self.raw_tril.diagonal(dim1=-2, dim2=-1))
        return torch.tril(self.raw_tril, -1) + torch.diag_embed(diag)

    def set_components(self, weights, means, covariances) -> None:
        """``covariances``: ``[K, d, d]``, positive definite (Cholesky diagonals below
        ``min_scale`` are raised to just above it)."""
        self._set_weights_and_means(weights, means)
        chol = torch.linalg.cholesky(torch.as_tensor(covariances, dtype=torch.float64))
        diag = (chol.diagonal(dim1=-2, dim2=-1) - self.min_scale).clamp_min(1e-6)
        raw = torch.tril(chol, -1) + torch.diag_embed(inverse_softplus(diag))
        with torch.no_grad():
            self.raw_tril.copy_(raw.to(self.raw_tril))

    @property
    def eval_width(self) -> int:
        """Elements per draw of :math:`z` that :meth:`log_prob` keeps alive (the ``[..., K, d]``
        whitened differences)."""
        return self.num_components * (self.latent_dim + 2)

    def component_distribution(self, index=None):
        means, tril = self.means, self.scale_tril
        if index is not None:
            means, tril = means[index], tril[index]
        return dist.MultivariateNormal(means, scale_tril=tril)

    def component_draws(self, eps):
        return self.means + (self.scale_tril @ eps.unsqueeze(-1)).squeeze(-1)

    def distribution(self) -> dist.TorchDistribution:
        return dist.MixtureSameFamily(dist.Categorical(logits=self.logits),
                                      self.component_distribution())

    def extra_repr(self) -> str:
        return f"latent_dim={self.latent_dim}, num_components={self.num_components}, full"


class VampPrior(_GaussianMixtureMixin, Prior):
    """VampPrior (Tomczak & Welling 2018): :math:`p(z) = \\sum_k w_k\\, q_\\phi(z \\mid u_k)`.

    Parameters
    ----------
    latent_dim, data_dim : int
        Latent dimension ``d`` and data dimension ``p`` (width of a pseudo-input).
    num_pseudo_inputs : int
        ``K`` (the paper uses 500 for MNIST).
    encoder_fn : callable, optional
        ``encoder_fn(u) -> (loc, scale)`` with ``u`` of shape ``[K, p]`` and ``loc``, ``scale``
        of shape ``[K, d]``: the guide's encoder :math:`q_\\phi(z\\mid x) = \\mathcal{N}(\\mu_\\phi(x),
        \\operatorname{diag}\\sigma_\\phi(x)^2)`. It must be the model's *own* encoder (not a copy)
        so that the prior shares :math:`\\phi`. :class:`models.dlvm.DLVM` attaches its encoder
        automatically; otherwise call :meth:`attach_encoder`.
    pseudo_input_init : {"normal", "uniform"} or tensor ``[K, p]``
        Initial pseudo-inputs: i.i.d. standard normal (standardized continuous data),
        i.i.d. uniform on [0, 1] (binary/[0, 1] data), or given values. Initialising from
        training rows usually works better: call :meth:`init_from_data`.
    learn_weights : bool
        False (default, as in the paper): fixed uniform weights :math:`w_k = 1/K` (a buffer).
        True: learnable logits.

    Notes
    -----
    The pseudo-inputs are unconstrained real vectors. For binary data the paper clips them to
    [0, 1] (hard tanh); here they are fed to the encoder as they are.

    **Posterior collapse from a random start.** The VampPrior has no scale of its own: its
    components have the encoder's scales, so :math:`\\mathrm{KL}(q(z\\mid x)\\,\\|\\,p)`
    penalizes differences between posterior means in units of the (early on, quickly
    shrinking) posterior standard deviations, while a freshly initialized decoder gains
    little from them. On small data (binarized scikit-learn digits, ``d = 8``, 64-64 tanh
    MLPs, Adam) training from random weights then collapses to an encoder that ignores
    ``x`` (KL 0) in every seed, with the ELBO or IWAE, 50 or 500 pseudo-inputs, learning
    rate 1e-2 or 1e-3 and with linear KL warm-up; the density itself is correct (the
    tests check it against a loop over pseudo-inputs). Started from weights trained for a
    few epochs with the standard normal prior, the same model keeps all its units and
    reaches a higher ELBO than the standard normal prior. Recommended: train the encoder
    and decoder briefly with ``prior="normal"``, copy their ``state_dict`` into the
    VampPrior model (``init_from_data`` for the pseudo-inputs), then continue training.
    """

    def __init__(self, latent_dim: int, data_dim: int, num_pseudo_inputs: int = 500,
                 encoder_fn: Optional[Callable] = None,
                 pseudo_input_init: Union[str, torch.Tensor] = "normal",
                 learn_weights: bool = False):
        super().__init__(latent_dim)
        self.data_dim = positive_int(data_dim, "data_dim")
        self.num_pseudo_inputs = positive_int(num_pseudo_inputs, "num_pseudo_inputs")
        K, p = self.num_pseudo_inputs, self.data_dim
        if isinstance(pseudo_input_init, torch.Tensor):
            if tuple(pseudo_input_init.shape) != (K, p):
                raise ValueError(
                    f"pseudo_input_init has shape {tuple(pseudo_input_init.shape)}, expected "
                    f"(num_pseudo_inputs, data_dim) = ({K}, {p})"
                )
            init = pseudo_input_init.detach().to(torch.get_default_dtype()).clone()
        elif pseudo_input_init == "normal":
            init = torch.randn(K, p)
        elif pseudo_input_init == "uniform":
            init = torch.rand(K, p)
        else:
            raise ValueError(
                f"pseudo_input_init must be 'normal', 'uniform' or a tensor of shape ({K}, {p}), "
                f"got {pseudo_input_init!r}"
            )
        if not torch.isfinite(init).all():
            raise ValueError("pseudo_input_init contains NaN or infinite values")
        self.pseudo_inputs = nn.Parameter(init)
        self.learn_weights = bool(learn_weights)
        if self.learn_weights:
            self.logits = nn.Parameter(torch.zeros(K))
        else:
            self.register_buffer("logits", torch.zeros(K))
        self._encoder_fn = None
        if encoder_fn is not None:
            self.attach_encoder(encoder_fn)

    def attach_encoder(self, encoder_fn: Callable) -> "VampPrior":
        """Use ``encoder_fn(u) -> (loc, scale)`` as :math:`q_\\phi(z\\mid u)` (shares its parameters)."""
        if not callable(encoder_fn):
            raise ValueError(f"encoder_fn must be callable, got {type(encoder_fn).__name__}")
        # A plain attribute, not a registered submodule: the encoder belongs to (and is
        # trained and moved with) the enclosing model; registering it here would list its
        # parameters twice.
        object.__setattr__(self, "_encoder_fn", encoder_fn)
        return self

    @property
    def has_encoder(self) -> bool:
        return self._encoder_fn is not None

    @property
    def weights(self) -> torch.Tensor:
        """Mixture weights ``[K]`` (uniform unless ``learn_weights``)."""
        return torch.softmax(self.logits, dim=-1)

    def _mixture_logits_loc_scale(self):
        if self._encoder_fn is None:
            raise ValueError(
                "this VampPrior has no encoder: use it inside models.dlvm.DLVM (which attaches "
                "its encoder) or call prior.attach_encoder(encoder_fn) first"
            )
        loc, scale = self._encoder_fn(self.pseudo_inputs)
        expected = (self.num_pseudo_inputs, self.latent_dim)
        if tuple(loc.shape) != expected or tuple(scale.shape) != expected:
            raise ValueError(
                f"encoder_fn returned loc {tuple(loc.shape)} and scale {tuple(scale.shape)} for "
                f"the pseudo-inputs; expected both {expected} (num_pseudo_inputs, latent_dim)"
            )
        return self.logits, loc, scale

    def mixture_components(self):
        _, loc, scale = self._mixture_logits_loc_scale()
        return self.weights, loc, scale

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor, noise_scale: float = 0.01) -> "VampPrior":
        """Set the pseudo-inputs to randomly chosen rows of ``x`` plus Gaussian noise.

        :math:`u_k = x_{n_k} + \\epsilon_k`, :math:`\\epsilon_{kj} \\sim \\mathcal{N}(0, (c\\,
        \\mathrm{sd}_j)^2)`, rows drawn without replacement when ``x`` has at least ``K`` rows
        (with replacement otherwise), ``c = noise_scale``, :math:`\\mathrm{sd}_j` the column
        standard deviation. Uses the global torch RNG.
        """
        from .validation import check_data

        x = check_data(x, self.data_dim, name="x (for the pseudo-inputs)")
        if not (noise_scale >= 0):
            raise ValueError(f"noise_scale must be >= 0, got {noise_scale!r}")
        u = self.pseudo_inputs
        x = x.to(device=u.device, dtype=u.dtype)
        n, K = x.shape[0], self.num_pseudo_inputs
        if n >= K:
            idx = torch.randperm(n, device=x.device)[:K]
        else:
            idx = torch.randint(n, (K,), device=x.device)
        sd = x.std(dim=0) if n > 1 else torch.ones_like(x[0])
        u.copy_(x[idx] + noise_scale * sd * torch.randn(K, self.data_dim, device=u.device,
                                                         dtype=u.dtype))
        return self

    def extra_repr(self) -> str:
        return (f"latent_dim={self.latent_dim}, data_dim={self.data_dim}, "
                f"num_pseudo_inputs={self.num_pseudo_inputs}, learn_weights={self.learn_weights}")


def make_prior(spec: Union[str, Prior], latent_dim: int, *, data_dim: Optional[int] = None,
               encoder_fn: Optional[Callable] = None, num_components: int = 10,
               num_pseudo_inputs: int = 500, **options) -> Prior:
    """Build a prior from a name (``"normal"``, ``"mixture"``, ``"vamp"``; aliases in
    :data:`PRIOR_NAMES`) or check a given :class:`Prior` instance.

    ``options`` go to the prior's constructor (e.g. ``init_scale`` for the mixture,
    ``pseudo_input_init`` or ``learn_weights`` for the VampPrior). ``data_dim`` is required
    for the VampPrior.
    """
    if isinstance(spec, Prior):
        if spec.latent_dim != latent_dim:
            raise ValueError(
                f"the prior has latent_dim={spec.latent_dim} but the model has latent_dim={latent_dim}"
            )
        if isinstance(spec, VampPrior) and data_dim is not None and spec.data_dim != data_dim:
            raise ValueError(
                f"the VampPrior has data_dim={spec.data_dim} but the model has data_dim={data_dim}"
            )
        if options:
            raise ValueError(f"options {sorted(options)} cannot be applied to a prior instance")
        return spec
    if not isinstance(spec, str) or spec.lower() not in PRIOR_NAMES:
        raise ValueError(
            f"unknown prior {spec!r}; use one of {sorted(set(PRIOR_NAMES))} or a "
            f"models.priors.Prior instance"
        )
    name = PRIOR_NAMES[spec.lower()]
    if name == "normal":
        if options:
            raise ValueError(f"the standard normal prior takes no options, got {sorted(options)}")
        return StandardNormalPrior(latent_dim)
    if name == "mixture":
        return MixturePrior(latent_dim, num_components=num_components, **options)
    if data_dim is None:
        raise ValueError("the VampPrior needs data_dim (the width of a pseudo-input)")
    return VampPrior(latent_dim, data_dim, num_pseudo_inputs=num_pseudo_inputs,
                     encoder_fn=encoder_fn, **options)
