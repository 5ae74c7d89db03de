"""Uniform dequantization: a continuous model turned into a probability model of integers.

For integer-valued rows :math:`x \\in \\mathbb{Z}^p` and a continuous model with density
:math:`p_\\theta`, the dequantized model (Theis, van den Oord & Bethge 2016) assigns

.. math:: P(x) = \\int_{[0,1)^p} p_\\theta(x + u)\\, du,

a proper probability mass function on :math:`\\mathbb{Z}^p` (the cells :math:`x + [0,1)^p` tile
:math:`\\mathbb{R}^p`), so its log-likelihood is comparable with those of count models such as
Poisson or binomial ones. :class:`Dequantized` writes it, for factor analysis and PPCA, as a
model/guide pair: the offset :math:`u` is a latent site ``"u"`` (uniform on the unit cube in
both the model and the guide, so :math:`\\log p(u) - \\log q(u) = 0`) and the linear-Gaussian
model scores :math:`x + u`. An importance sampling estimate of :math:`\\log p(x)` of this pair
(:func:`pyro_lvm.inference.log_likelihood`) therefore estimates :math:`\\log P(x)`, with a Monte
Carlo standard error (with the exact posterior as the guide for :math:`z`, only the :math:`u`
integral is left to sampling).

References
----------
Theis, L., van den Oord, A. & Bethge, M. (2016). A note on the evaluation of generative models.
ICLR.
"""
from __future__ import annotations

from typing import Optional

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, pyro_method

from . import validation
from .base import unique_module_name

__all__ = ["Dequantized"]


class Dequantized(PyroModule):
    """:math:`P(x) = \\int_{[0,1)^p} p(x + u)\\,du` for a fitted linear-Gaussian model ``base``
    (:class:`pyro_lvm.models.FactorAnalysis` or :class:`pyro_lvm.models.PPCA`; module docstring).
    Fit ``base`` on dequantized rows, e.g. ``base.fit_em(x + torch.rand_like(x))`` (which also
    sets its guide to the exact posterior, so only the :math:`u` integral is left to sampling).

    The model and guide are written out here rather than by calling ``base.model(x + u)``:
    under vectorized particles ``x + u`` has a particle dimension on the left, and the wrapped
    pair would size its data plate by it.
    """

    def __init__(self, base):
        super().__init__(name=unique_module_name(type(self).__name__))
        for attr in ("loading", "mean", "noise_variance", "guide_weight", "guide_bias"):
            if not hasattr(base, attr):
                raise ValueError(f"Dequantized wraps FactorAnalysis / PPCA; {type(base).__name__} "
                                 f"has no {attr!r}")
        self.base = base
        self.data_dim = int(base.data_dim)

    def _offset(self, x: torch.Tensor) -> torch.Tensor:
        return pyro.sample("u", dist.Uniform(x.new_zeros(()), x.new_ones(()))
                           .expand([self.data_dim]).to_event(1))

    @staticmethod
    def _no_mask(mask):
        if mask is not None:
            raise ValueError("Dequantized does not support missing entries (mask)")

    @pyro_method
    def model(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None):
        """``u ~ U[0, 1)^p``, ``z ~ N(0, I)``, ``x + u ~ N(W z + mu, Psi)``; sites ``"u"``,
        ``"z"``, ``"x"`` (observed value ``x + u``)."""
        self._no_mask(mask)
        base = self.base
        W, mu, scale = base.loading, base.mean, base._noise_diag(base.noise_variance).sqrt()
        with pyro.plate("data", x.shape[0], dim=-1):
            u = self._offset(x)
            z = pyro.sample("z", dist.Normal(base._prior_loc, base._prior_scale).to_event(1))
            pyro.sample("x", dist.Normal(z @ W.T + mu, scale).to_event(1), obs=x + u)
        return z

    @pyro_method
    def guide(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None):
        """``u ~ U[0, 1)^p`` (the model's density, so it cancels in the weights), then the
        wrapped model's guide :math:`q(z \\mid x + u)`."""
        self._no_mask(mask)
        base = self.base
        with pyro.plate("data", x.shape[0], dim=-1):
            u = self._offset(x)
            loc = (x + u) @ base.guide_weight.T + base.guide_bias
            return pyro.sample("z", base.guide_distribution(loc))

    #: integer arrays are this model's data (read by ``engine.prepare_data``)
    accepts_integer_data = True

    def check_data(self, x, mask=None) -> torch.Tensor:
        """The wrapped model's checks, and integer values (what a dequantized model scores);
        integer arrays are taken as they are."""
        self._no_mask(mask)
        if not (torch.is_tensor(x) and x.is_floating_point()):
            x = validation.check_data(x, self.data_dim, integer_values=True)
        out = self.base.check_data(x)
        if not bool((out == torch.round(out)).all()):
            raise ValueError("a dequantized model scores integer-valued data; these data have "
                             "non-integer values")
        return out

    def sample(self, n: int) -> torch.Tensor:
        """Integer rows: ``floor`` of draws of the wrapped model."""
        return torch.floor(self.base.sample(n))

    def extra_repr(self) -> str:
        return f"data_dim={self.data_dim}"
