"""Poisson PCA: a linear latent variable model for counts, as a Pyro model/guide pair.

For rows :math:`x_i \\in \\mathbb{N}^p`, :math:`i = 1..N`,

.. math::

    z_i \\sim \\mathcal{N}(0, I_d), \\qquad
    x_{ij} \\mid z_i \\sim \\mathrm{Poisson}\\big(\\exp(w_j^\\top z_i + \\mu_j)\\big),

the exponential-family PCA of Collins, Dasgupta & Schapire (2001) with a Gaussian prior on the
scores (the Poisson PPCA of the lecture, also the "Poisson log-normal PCA" of Chiquet, Mariadassou
& Robin 2018 without the extra per-entry noise). Unlike PPCA its marginal :math:`p(x)` has no
closed form; it is fitted by SVI with the amortized Gaussian guide

.. math:: q_\\phi(z_i \\mid x_i) = \\mathcal{N}\\big(\\mu_\\phi(\\log(1 + x_i)),
          \\operatorname{diag}\\sigma_\\phi(\\log(1 + x_i))^2\\big)

(an MLP of the log counts: raw counts span orders of magnitude), and its log-likelihood is
estimated by importance sampling with :func:`pyro_lvm.inference.log_likelihood` (with Monte
Carlo standard errors). The observation density is :class:`pyro_lvm.models.likelihoods.Poisson`
(one definition, shared with the DLVMs); the decoder is the affine map :math:`z \\mapsto W z + \\mu`.

:math:`W` is identified only up to a rotation :math:`W R` (the prior is isotropic), so compare
fitted and true loadings by the principal angles between their column spaces
(:meth:`PoissonPCA.subspace`).

References
----------
Collins, M., Dasgupta, S. & Schapire, R. E. (2001). A generalization of principal components
analysis to the exponential family. NeurIPS.
Chiquet, J., Mariadassou, M. & Robin, S. (2018). Variational inference for probabilistic Poisson
PCA. Annals of Applied Statistics 12(4).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule, pyro_method
from torch import nn

from . import validation
from .base import unique_module_name
from .dlvm import _AmortizedGaussianGuideMixin
from .likelihoods import Poisson
from .networks import mlp

__all__ = ["PoissonPCA"]


class PoissonPCA(_AmortizedGaussianGuideMixin, PyroModule):
    """Poisson PCA with an amortized Gaussian guide (see the module docstring).

    Parameters
    ----------
    data_dim, latent_dim : int
        ``p`` and ``d`` (``d < p``).
    hidden : sequence of int
        Hidden widths of the encoder MLP (the generative side is linear).
    activation : str
        Encoder activation (see :func:`pyro_lvm.models.networks.mlp`).
    init_scale : float
        Standard deviation of the random initial loadings.
    min_encoder_scale : float
        Floor of the guide's standard deviations (keeps :math:`\\log q` finite).

    Attributes
    ----------
    loadings : nn.Parameter ``[p, d]``
        :math:`W`.
    offset : nn.Parameter ``[p]``
        :math:`\\mu`, the log-rate at :math:`z = 0`; :meth:`init_from_data` sets it to the log
        of the column means.
    likelihood : Poisson
    encoder : nn.Sequential ``p -> 2 d``
    """

    def __init__(self, data_dim: int, latent_dim: int, hidden: Sequence[int] = (64,),
                 activation: str = "tanh", init_scale: float = 0.1,
                 min_encoder_scale: float = 1e-5):
        super().__init__(name=unique_module_name(type(self).__name__))
        for value, what in ((data_dim, "data_dim"), (latent_dim, "latent_dim")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{what} must be a positive integer, got {value!r}")
        if latent_dim >= data_dim:
            raise ValueError(f"PoissonPCA: latent_dim={latent_dim} must be smaller than "
                             f"data_dim={data_dim}")
        if not (min_encoder_scale > 0):
            raise ValueError(f"min_encoder_scale must be positive, got {min_encoder_scale!r}")
        self.data_dim, self.latent_dim = data_dim, latent_dim
        self.min_encoder_scale = float(min_encoder_scale)
        self.loadings = nn.Parameter(init_scale * torch.randn(data_dim, latent_dim))
        self.offset = nn.Parameter(torch.zeros(data_dim))
        self.likelihood = Poisson(data_dim=data_dim)
        self.encoder = mlp(data_dim, tuple(hidden), 2 * latent_dim, activation)
        self.config = dict(model="PoissonPCA", data_dim=data_dim, latent_dim=latent_dim,
                           hidden=tuple(hidden), activation=activation)

    # ------------------------------------------------------------------ pieces
    def log_rate(self, z: torch.Tensor) -> torch.Tensor:
        """:math:`W z + \\mu` for ``z`` ``[..., d]``; returns ``[..., p]``."""
        return z @ self.loadings.T + self.offset

    def _encode(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        # the shared amortized guide, on log1p of the counts (their scale varies widely)
        out = self.encoder(torch.log1p(x))
        loc, raw_scale = out[..., :self.latent_dim], out[..., self.latent_dim:]
        return loc, F.softplus(raw_scale) + self.min_encoder_scale

    # ------------------------------------------------------------------ model / guide
    @pyro_method
    def model(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """:math:`z_i \\sim \\mathcal{N}(0, I)`, :math:`x_{ij} \\sim \\mathrm{Poisson}(e^{w_j^\\top
        z_i + \\mu_j})` on the observed entries; sites ``"z"`` and ``"x"``."""
        x, mask = self._observed(x, mask)
        if validation.per_call_data_checks():
            self.likelihood.check_data(x, mask)
        zeros = x.new_zeros(self.latent_dim)
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", dist.Normal(zeros, 1.0).to_event(1))
            px = self.likelihood.distribution(self.log_rate(z))
            if mask is not None:
                px = px.mask(mask)
            pyro.sample("x", px.to_event(1), obs=x)
        return z

    # ------------------------------------------------------------------ conveniences
    def init_from_data(self, x) -> "PoissonPCA":
        """Start :math:`\\mu` at the log column means of ``x`` (floored at 1e-3 counts), so
        the first steps fit the loadings rather than the overall rates."""
        x = self.check_data(x)
        with torch.no_grad():
            self.offset.copy_(x.mean(0).clamp(min=1e-3).log().to(self.offset))
        return self

    def sample(self, n: int, *, return_latent: bool = False):
        """Draw ``n`` rows ``[n, p]`` (and ``z`` ``[n, d]`` with ``return_latent=True``)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        with torch.no_grad():
            z = torch.randn(n, self.latent_dim, dtype=self.offset.dtype,
                            device=self.offset.device)
            x = self.likelihood.distribution(self.log_rate(z)).sample()
        return (x, z) if return_latent else x

    def reconstruct(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """:math:`\\exp(W \\mu_\\phi(x) + \\mu)`, the rates at the encoder mean, ``[n, p]``."""
        loc, _ = self.encode(x, mask)
        return self.log_rate(loc).exp()

    def subspace(self) -> torch.Tensor:
        """An orthonormal basis ``[p, d]`` of the column space of :math:`W` (the identifiable
        part of the loadings)."""
        q, _ = torch.linalg.qr(self.loadings.detach())
        return q

    def extra_repr(self) -> str:
        return f"data_dim={self.data_dim}, latent_dim={self.latent_dim}"
