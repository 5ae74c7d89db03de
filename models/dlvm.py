"""Deep latent variable models (DLVMs, variational autoencoders) as Pyro model/guide pairs.

Generative process (Kingma & Welling 2014; Rezende et al. 2014), for rows
:math:`x_i \\in \\mathbb{R}^p`, :math:`i = 1..N`:

.. math::

    z_i \\sim p_\\lambda(z) \\quad (z_i \\in \\mathbb{R}^d), \\qquad
    x_i \\mid z_i \\sim \\prod_{j=1}^p \\Phi\\big(x_{ij} \\mid f_\\theta(z_i)_j\\big),

where :math:`f_\\theta` is an MLP decoder, :math:`p_\\lambda` one of the priors of
:mod:`pyro_lvm.models.priors` (standard normal, learnable mixture of Gaussians, VampPrior of Tomczak &
Welling 2018) and :math:`\\Phi` one of the observation models of :mod:`pyro_lvm.models.likelihoods`
(Bernoulli; Gaussian with a scale floor, Mattei & Frellsen 2018; Student-t, Takahashi et al.
2018). Only observed entries (``mask``) enter :math:`\\log p(x_i \\mid z_i)`.

Amortized variational family (the guide), an MLP encoder :math:`g_\\phi`:

.. math::

    q_\\phi(z_i \\mid x_i) = \\mathcal{N}\\big(z_i;\\, \\mu_\\phi(\\tilde x_i),\\,
    \\operatorname{diag} \\sigma_\\phi(\\tilde x_i)^2\\big), \\qquad
    \\sigma_\\phi = \\operatorname{softplus}(\\cdot) + \\sigma_{\\min},

reparameterized, with :math:`\\tilde x_i` the row with missing entries set to 0 (zero
imputation, as in Mattei & Frellsen 2019, MIWAE).

Both ``model`` and ``guide`` keep the project's contract: one ``pyro.plate("data", N, dim=-1)``,
latent site ``"z"`` with event shape ``[d]``, observed site ``"x"`` with event shape ``[p]``,
and every tensor broadcasts over extra leading (particle) dimensions. They are written once, as
the programs of a :class:`pyro_lvm.models.program.ProgramPair` (``model_program``,
``guide_program``), from which ``model`` / ``guide`` and the engine's direct run both derive.

:class:`LectureDLVM` is the fixed-decoder two-dimensional example from the lecture, a known
DLVM to simulate data from.

References
----------
Kingma, D. P. & Welling, M. (2014). Auto-encoding variational Bayes. ICLR.
Rezende, D. J., Mohamed, S. & Wierstra, D. (2014). Stochastic backpropagation and approximate
inference in deep generative models. ICML.
Tomczak, J. M. & Welling, M. (2018). VAE with a VampPrior. AISTATS.
Mattei, P.-A. & Frellsen, J. (2018). Leveraging the exact likelihood of deep latent variable
models. NeurIPS.
Mattei, P.-A. & Frellsen, J. (2019). MIWAE: deep generative modelling and imputation of
incomplete data sets. ICML.
Takahashi, H. et al. (2018). Student-t variational autoencoder for robust density estimation.
IJCAI.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule

from . import validation
from .base import unique_module_name
from .distributions import DiagonalNormal
from .likelihoods import (DEFAULT_DF_BOUNDS, DEFAULT_SCALE_FLOOR, LIKELIHOOD_NAMES, Likelihood,
                          make_likelihood)
from .networks import mlp
from .priors import PRIOR_NAMES, Prior, StandardNormalPrior, make_prior
from .program import ProgramPair

__all__ = ["DLVM", "LectureDLVM"]


def _hidden_tuple(hidden, what: str) -> Tuple[int, ...]:
    if isinstance(hidden, int):
        hidden = (hidden,)
    try:
        return tuple(hidden)
    except TypeError:
        raise ValueError(f"{what} must be a sequence of layer widths, got {hidden!r}") from None


class _AmortizedGaussianGuideMixin(ProgramPair):
    """Observed-data preparation, data checks and the amortized Gaussian guide, shared by the
    DLVMs and :class:`pyro_lvm.models.poisson_pca.PoissonPCA` (which encodes ``log1p(x)``).
    The guide is a :class:`pyro_lvm.models.program.ProgramPair` program."""

    data_dim: int
    latent_dim: int
    min_encoder_scale: float

    def _observed(self, x: torch.Tensor, mask: Optional[torch.Tensor]):
        """Check the shape of ``x``/``mask`` and zero the missing entries (NaN-safe)."""
        if not isinstance(x, torch.Tensor):
            raise ValueError(
                f"x must be a torch.Tensor of shape (batch, {self.data_dim}), got "
                f"{type(x).__name__}; use model.check_data(x) to convert and validate arrays"
            )
        if x.dim() != 2 or x.shape[-1] != self.data_dim:
            raise ValueError(
                f"x has shape {tuple(x.shape)}; {type(self).__name__} expects (batch, "
                f"data_dim={self.data_dim})"
            )
        if mask is None:
            return x, None
        if not isinstance(mask, torch.Tensor) or mask.shape != x.shape:
            shape = tuple(mask.shape) if hasattr(mask, "shape") else type(mask).__name__
            raise ValueError(f"mask has shape {shape}; it must be a tensor shaped like x, "
                             f"{tuple(x.shape)}")
        mask = mask.to(device=x.device, dtype=torch.bool)
        # torch.where, not x * mask: a NaN in a missing entry would survive multiplication
        # by 0 and poison the gradients.
        return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device)), mask

    @property
    def accepts_integer_data(self) -> bool:
        """Whether integer arrays of any value are data for this model (count likelihoods);
        read by :func:`pyro_lvm.inference.engine.prepare_data` as well."""
        return bool(getattr(getattr(self, "likelihood", None), "integer_data", False))

    def check_data(self, x, mask=None) -> torch.Tensor:
        """Validate data for this model (finite, ``data_dim`` columns, and the likelihood's
        support, e.g. {0, 1} for Bernoulli, non-negative integers for counts, which may come
        as an integer array); returns it as a float tensor."""
        x = validation.check_data(x, self.data_dim, mask=mask,
                                  integer_values=self.accepts_integer_data)
        mask_t = None
        if mask is not None:
            mask_t = torch.as_tensor(validation.check_mask(mask, tuple(x.shape)), device=x.device)
        self.likelihood.check_data(x, mask_t)
        return x

    def _encode(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        out = self.encoder(x)
        loc, raw_scale = out[..., :self.latent_dim], out[..., self.latent_dim:]
        return loc, F.softplus(raw_scale) + self.min_encoder_scale

    def encode(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of :math:`q_\\phi(z\\mid x)`, each ``[n, d]``."""
        x, _ = self._observed(x, mask)
        return self._encode(x)

    def guide_program(self, x: torch.Tensor, mask: Optional[torch.Tensor], sample) -> torch.Tensor:
        """:math:`q_\\phi(z_i \\mid x_i) = \\mathcal{N}(\\mu_\\phi(x_i), \\operatorname{diag}
        \\sigma_\\phi(x_i)^2)`, site ``"z"`` (reparameterized); ``guide`` runs it in the data
        plate (:class:`pyro_lvm.models.program.ProgramPair`)."""
        x, _ = self._observed(x, mask)
        loc, scale = self._encode(x)
        return sample("z", DiagonalNormal(loc, scale).to_event(1))


class DLVM(_AmortizedGaussianGuideMixin, PyroModule):
    """A deep latent variable model with an amortized Gaussian guide (see module docstring).

    Parameters
    ----------
    data_dim, latent_dim : int
        ``p`` and ``d``.
    prior : {"normal", "mixture", "vamp"} or Prior
        :math:`p_\\lambda(z)`; a :class:`models.priors.VampPrior` (by name, or an instance
        without an encoder) gets this model's encoder attached. Call :meth:`init_from_data`
        with training rows to start its pseudo-inputs there.
    likelihood : {"bernoulli", "gaussian", "studentt"} or Likelihood
        The observation model :math:`\\Phi`.
    hidden : sequence of int
        Hidden widths of both MLPs (the decoder mirrors them), unless ``encoder_hidden`` /
        ``decoder_hidden`` are given.
    activation : str or nn.Module class
        See :func:`models.networks.mlp`.
    num_components : int
        ``K`` of the mixture prior.
    num_pseudo_inputs : int
        ``K`` of the VampPrior.
    scale_floor : float
        Lower bound of Gaussian / Student-t observation scales (see
        :mod:`pyro_lvm.models.likelihoods`; default 1e-3).
    gaussian_scale : {"per_dimension", "decoder", "fixed"}
        How the Gaussian scale is parameterized.
    df_bounds : (float, float)
        Student-t degrees-of-freedom interval (default (2, 100)).
    allow_fractional : bool
        Bernoulli only: accept values in [0, 1] (see :class:`models.likelihoods.Bernoulli`).
    min_encoder_scale : float
        :math:`\\sigma_{\\min}` of the guide, keeps :math:`\\log q` finite.
    prior_options, likelihood_options : dict, optional
        Further constructor arguments of the prior / likelihood.

    Attributes
    ----------
    encoder : nn.Sequential, ``p -> 2d`` (loc and raw scale)
    decoder : nn.Sequential, ``d -> k p`` (``k`` = ``likelihood.params_per_dim``)
    prior : Prior
    likelihood : Likelihood
    config : dict
        The constructor arguments (for provenance in reports).
    """

    def __init__(self, data_dim: int, latent_dim: int,
                 prior: Union[str, Prior] = "normal",
                 likelihood: Union[str, Likelihood] = "bernoulli",
                 hidden: Sequence[int] = (200, 200), activation="tanh", *,
                 encoder_hidden: Optional[Sequence[int]] = None,
                 decoder_hidden: Optional[Sequence[int]] = None,
                 num_components: int = 10, num_pseudo_inputs: int = 500,
                 scale_floor: float = DEFAULT_SCALE_FLOOR, gaussian_scale: str = "per_dimension",
                 df_bounds: Sequence[float] = DEFAULT_DF_BOUNDS, allow_fractional: bool = False,
                 min_encoder_scale: float = 1e-5, prior_options: Optional[dict] = None,
                 likelihood_options: Optional[dict] = None):
        super().__init__(name=unique_module_name(type(self).__name__))
        for value, what in ((data_dim, "data_dim"), (latent_dim, "latent_dim")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{what} must be a positive integer, got {value!r}")
        if not (min_encoder_scale > 0):
            raise ValueError(f"min_encoder_scale must be positive, got {min_encoder_scale!r}")
        self.data_dim, self.latent_dim = data_dim, latent_dim
        self.min_encoder_scale = float(min_encoder_scale)
        hidden = _hidden_tuple(hidden, "hidden")
        encoder_hidden = hidden if encoder_hidden is None else _hidden_tuple(encoder_hidden,
                                                                             "encoder_hidden")
        decoder_hidden = (tuple(reversed(hidden)) if decoder_hidden is None
                          else _hidden_tuple(decoder_hidden, "decoder_hidden"))

        if isinstance(likelihood, str):
            key = LIKELIHOOD_NAMES.get(likelihood.lower())
            defaults = {
                "bernoulli": dict(allow_fractional=allow_fractional),
                "gaussian": dict(scale=gaussian_scale, scale_floor=scale_floor),
                "studentt": dict(df_bounds=df_bounds, scale_floor=scale_floor),
            }.get(key, {})
            likelihood = make_likelihood(likelihood, data_dim,
                                         **{**defaults, **(likelihood_options or {})})
        else:
            likelihood = make_likelihood(likelihood, data_dim, **(likelihood_options or {}))
        self.likelihood = likelihood

        self.encoder = mlp(data_dim, encoder_hidden, 2 * latent_dim, activation)
        self.decoder = mlp(latent_dim, decoder_hidden, likelihood.output_dim, activation)

        self.prior = make_prior(prior, latent_dim, data_dim=data_dim,
                                num_components=num_components,
                                num_pseudo_inputs=num_pseudo_inputs, **(prior_options or {}))
        if hasattr(self.prior, "attach_encoder") and not self.prior.has_encoder:
            # The VampPrior evaluates *this* encoder (shared parameters, not a copy).
            self.prior.attach_encoder(self._encode)

        prior_key = PRIOR_NAMES.get(prior.lower(), prior) if isinstance(prior, str) else None
        self.config = dict(
            data_dim=data_dim, latent_dim=latent_dim,
            prior=prior_key or type(self.prior).__name__,
            likelihood=getattr(self.likelihood, "name", type(self.likelihood).__name__),
            encoder_hidden=encoder_hidden, decoder_hidden=decoder_hidden,
            activation=activation if isinstance(activation, str) else activation.__name__,
            num_components=getattr(self.prior, "num_components", None),
            num_pseudo_inputs=getattr(self.prior, "num_pseudo_inputs", None),
            scale_floor=getattr(self.likelihood, "scale_floor", None),
            gaussian_scale=getattr(self.likelihood, "scale_mode", None),
            df_bounds=getattr(self.likelihood, "df_bounds", None),
            allow_fractional=getattr(self.likelihood, "allow_fractional", None),
            min_encoder_scale=self.min_encoder_scale,
        )

    # ------------------------------------------------------------------ model / guide
    def model_program(self, x: torch.Tensor, mask: Optional[torch.Tensor], sample) -> torch.Tensor:
        """:math:`z_i \\sim p_\\lambda(z)`, :math:`x_i \\mid z_i \\sim \\Phi(x_i \\mid f_\\theta(z_i))`
        on the observed entries; sites ``"z"`` and ``"x"``; returns the decoder output.
        ``model`` runs it in the data plate (:class:`pyro_lvm.models.program.ProgramPair`)."""
        x, mask = self._observed(x, mask)
        if validation.per_call_data_checks():
            # A clear message (which value, where) before Pyro's generic support error.
            self.likelihood.check_data(x, mask)
        z = sample("z", self.prior.distribution())
        out = self.decoder(z)
        px = self.likelihood.distribution(out)
        if mask is not None:
            px = px.mask(mask)
        sample("x", px.to_event(1), obs=x)
        return out

    # ------------------------------------------------------------------ conveniences
    def sample(self, n: int, *, mean: bool = False, return_latent: bool = False):
        """Draw ``n`` rows from the model: :math:`z \\sim p(z)`, then :math:`x \\sim \\Phi(\\cdot\\mid
        f_\\theta(z))` (or :math:`E[x \\mid z]` when ``mean=True``). Returns ``x`` ``[n, p]``, or
        ``(x, z)`` with ``return_latent=True``. No gradients."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        with torch.no_grad():
            z = self.prior.sample(n)
            out = self.decoder(z)
            x = self.likelihood.mean(out) if mean else self.likelihood.distribution(out).sample()
        return (x, z) if return_latent else x

    def reconstruct(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """:math:`E[x \\mid z = \\mu_\\phi(x)]`, the likelihood mean at the encoder mean, ``[n, p]``."""
        loc, _ = self.encode(x, mask)
        return self.likelihood.mean(self.decoder(loc))

    def check_training_data(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
        """Checks of the whole training set, run once by ``fit`` before the first step: a
        Gaussian or Student-t observation model with a learned scale refuses constant
        columns (the same check as the data loaders)."""
        if getattr(self.likelihood, "learns_scale", False):
            validation.check_column_variance(x, mask, name="training data",
                                             model=type(self.likelihood).__name__)

    @property
    def eval_width(self) -> int:
        """Elements per draw (one particle of one row) that evaluating the model keeps alive:
        the widest of the data, the decoder's output and hidden layers, and what the prior's
        ``log_prob`` materializes (``2 K`` for a mixture / VampPrior with ``K`` components,
        see :class:`models.priors.DiagonalGaussianMixture`). The chunk planners of
        :mod:`pyro_lvm.inference.evaluate` and :mod:`pyro_lvm.inference.diagnostics` read this hint."""
        widths = [self.data_dim, self.latent_dim, int(self.likelihood.output_dim)]
        widths += [m.out_features for m in self.decoder.modules() if isinstance(m, torch.nn.Linear)]
        widths += [m.out_features for m in self.encoder.modules() if isinstance(m, torch.nn.Linear)]
        widths.append(int(getattr(self.prior, "eval_width", 0) or 0))
        return max(widths)

    def init_from_data(self, x) -> "DLVM":
        """Data-dependent initialisation: the VampPrior's pseudo-inputs start at training rows."""
        if hasattr(self.prior, "init_from_data"):
            self.prior.init_from_data(self.check_data(x))
        return self

    def extra_repr(self) -> str:
        return f"data_dim={self.data_dim}, latent_dim={self.latent_dim}"


class LectureDLVM(_AmortizedGaussianGuideMixin, PyroModule):
    """The lecture's two-dimensional DLVM with a known, fixed decoder, and a learnable
    amortized guide.

    .. math::

        z \\sim \\mathcal{N}(0, 1), \\qquad
        x \\mid z \\sim \\mathcal{N}\\big(\\mu(z), \\Sigma(z)\\big), \\qquad
        \\mu(z) = \\begin{pmatrix} 10 \\sin(z)^3 \\\\ 10\\cos(z) - 10 \\cos(z)^4 \\end{pmatrix},
        \\qquad
        \\Sigma(z) = \\operatorname{diag}\\Big(\\big(\\tfrac{\\sin z}{3z}\\big)^2 + \\epsilon,\\;
        \\big(\\tfrac{\\sin z}{z}\\big)^2 + \\epsilon\\Big).

    :math:`\\sin z / z` is evaluated as ``torch.sinc(z / pi)``, which is exact and smooth at
    :math:`z = 0` (value 1). The variance vanishes at :math:`z = k\\pi`, :math:`k \\ne 0`;
    the small floor :math:`\\epsilon` (``variance_floor``, default 1e-6, i.e. a standard
    deviation of at least 1e-3) keeps :math:`\\log p(x\\mid z)` finite there. It changes the
    variances by at most 1e-6, far below anything visible in the data.

    The decoder has no learnable parameters; the guide
    :math:`q_\\phi(z\\mid x) = \\mathcal{N}(\\mu_\\phi(x), \\sigma_\\phi(x)^2)` is a small MLP
    (``hidden``). Note that :math:`p(z \\mid x)` can be far from Gaussian here (e.g. bimodal where
    the curve :math:`\\mu` passes near itself), which makes this a useful test of guides and
    importance-weighted bounds.
    """

    data_dim = 2
    latent_dim = 1
    #: The data range is about +-10 to +-20; the encoder sees ``x / INPUT_SCALE`` so that its
    #: tanh units do not start saturated (a fixed part of the guide, not a parameter).
    INPUT_SCALE = 10.0

    def __init__(self, hidden: Sequence[int] = (64, 64), activation="tanh",
                 variance_floor: float = 1e-6, min_encoder_scale: float = 1e-5):
        super().__init__(name=unique_module_name(type(self).__name__))
        if not (variance_floor > 0):
            raise ValueError(f"variance_floor must be positive, got {variance_floor!r}")
        if not (min_encoder_scale > 0):
            raise ValueError(f"min_encoder_scale must be positive, got {min_encoder_scale!r}")
        self.variance_floor = float(variance_floor)
        self.min_encoder_scale = float(min_encoder_scale)
        self.prior = StandardNormalPrior(1)
        self.encoder = mlp(2, _hidden_tuple(hidden, "hidden"), 2, activation)
        self.config = dict(model="LectureDLVM", hidden=_hidden_tuple(hidden, "hidden"),
                           variance_floor=self.variance_floor)

    def _encode(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return super()._encode(x / self.INPUT_SCALE)

    @staticmethod
    def decoder_mean(z: torch.Tensor) -> torch.Tensor:
        """:math:`\\mu(z)` for ``z`` of shape ``[..., 1]``; returns ``[..., 2]``."""
        s, c = torch.sin(z), torch.cos(z)
        return torch.cat([10 * s ** 3, 10 * c - 10 * c ** 4], dim=-1)

    def decoder_scale(self, z: torch.Tensor) -> torch.Tensor:
        """:math:`\\sqrt{\\operatorname{diag}\\Sigma(z)}` for ``z`` ``[..., 1]``; returns ``[..., 2]``."""
        sinc = torch.sinc(z / math.pi)  # sin(z) / z, = 1 at z = 0
        variance = torch.cat([(sinc / 3) ** 2, sinc ** 2], dim=-1) + self.variance_floor
        return variance.sqrt()

    def decoder_distribution(self, z: torch.Tensor) -> dist.TorchDistribution:
        """:math:`p(x \\mid z)`: batch shape ``z.shape[:-1]``, event shape ``[2]``."""
        return dist.Normal(self.decoder_mean(z), self.decoder_scale(z)).to_event(1)

    def conditional_log_prob(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """:math:`\\log p(x \\mid z)` (exact), broadcasting ``x`` ``[..., 2]`` with ``z`` ``[..., 1]``."""
        return self.decoder_distribution(z).log_prob(x)

    def model_program(self, x: torch.Tensor, mask: Optional[torch.Tensor], sample) -> torch.Tensor:
        """:math:`z_i \\sim \\mathcal{N}(0, 1)`, :math:`x_i \\mid z_i \\sim \\mathcal{N}(\\mu(z_i),
        \\Sigma(z_i))` on the observed entries (``model`` runs it in the data plate)."""
        x, mask = self._observed(x, mask)
        z = sample("z", self.prior.distribution())
        px = dist.Normal(self.decoder_mean(z), self.decoder_scale(z))
        if mask is not None:
            px = px.mask(mask)
        sample("x", px.to_event(1), obs=x)
        return z

    def sample(self, n: int, *, return_latent: bool = False):
        """Simulate ``n`` rows from the known DLVM, ``[n, 2]`` (and ``z`` ``[n, 1]``)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        with torch.no_grad():
            z = self.prior.sample(n)
            x = self.decoder_distribution(z).sample()
        return (x, z) if return_latent else x

    def reconstruct(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """:math:`\\mu(\\mu_\\phi(x))`, the decoder mean at the encoder mean, ``[n, 2]``."""
        loc, _ = self.encode(x, mask)
        return self.decoder_mean(loc)

    def check_data(self, x, mask=None) -> torch.Tensor:
        """Validate data (finite, two columns); returns a float tensor."""
        return validation.check_data(x, 2, mask=mask)
