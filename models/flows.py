"""Normalizing flows for deep latent variable models: an inverse autoregressive flow (IAF) guide
and a masked autoregressive flow prior, built on Pyro's ``pyro.distributions.transforms``.

IAF posterior (Kingma et al. 2016). The encoder gives :math:`\\mu(x)`, :math:`\\sigma(x)` and a
context vector :math:`h(x)`; a Gaussian draw is pushed through :math:`T` autoregressive steps,

.. math::

    z_0 = \\mu(x) + \\sigma(x) \\odot \\varepsilon, \\quad \\varepsilon \\sim \\mathcal N(0, I),
    \\qquad
    z_t = s_t \\odot z_{t-1} + (1 - s_t) \\odot m_t, \\quad
    (m_t, s_t) = \\text{MADE}_t(z_{t-1}, h(x)),\\; s_t = \\sigma(\\cdot)

(Pyro's ``ConditionalAffineAutoregressive(..., stable=True)``, the gated update of the paper),
and

.. math::

    \\log q(z_T \\mid x) = \\log \\mathcal N(z_0; \\mu, \\operatorname{diag}\\sigma^2)
    - \\sum_{t=1}^T \\sum_{j} \\log s_{t,j},

one pass per step because :math:`\\partial z_t / \\partial z_{t-1}` is triangular. Successive
steps reverse the variable order. Drawing and scoring the draw are cheap (Pyro caches the
inverse of each draw); scoring a *given* :math:`z` (e.g. the DReG / STL estimators, which
re-score detached draws) inverts each step with :math:`d` sequential passes: correct, slower.

Flow prior (a MAF used as a density on :math:`\\mathbb R^d`; Papamakarios et al. 2017):
:math:`p(z) = \\mathcal N(u; 0, I) \\, |\\det \\partial u / \\partial z|` with
:math:`u = f_T^{-1} \\circ \\dots \\circ f_1^{-1}(z)`, where each :math:`f_t^{-1}` is an
affine autoregressive map evaluated in one pass, so :math:`\\log p(z)` on any :math:`z` is
cheap and sampling takes :math:`d` sequential passes per step.

Both keep the model/guide contract: the guide's site ``"z"`` inside ``pyro.plate("data")`` with
event shape ``[d]`` (the base Gaussian is ``.to_event(1)``), reparameterized, so ``fit``, IWAE
with DReG / STL, ``log_likelihood`` and k-hat work on them unchanged. A DLVM takes them as
``IAFGuidedDLVM(DLVM(...), num_flows=T)`` (the guide switch; a pair with the DLVM's model)
and ``DLVM(..., prior=FlowPrior(d, T))``.

References
----------
Kingma, D. P., Salimans, T., Jozefowicz, R., Chen, X., Sutskever, I. & Welling, M. (2016).
Improved variational inference with inverse autoregressive flow. NeurIPS.
Papamakarios, G., Pavlakou, T. & Murray, I. (2017). Masked autoregressive flow for density
estimation. NeurIPS.
Germain, M., Gregor, K., Murray, I. & Larochelle, H. (2015). MADE. ICML.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
import torch.nn.functional as F
from pyro.nn import AutoRegressiveNN, ConditionalAutoRegressiveNN, PyroModule, pyro_method
from torch import nn

from .base import unique_module_name
from .networks import mlp
from .priors import Prior
from .validation import positive_int

__all__ = ["ConditionalIAF", "IAFGuide", "FlowPrior", "IAFGuidedDLVM"]


def _alternating_permutation(latent_dim: int, step: int) -> torch.Tensor:
    """The identity order on even steps, the reversed order on odd steps."""
    order = torch.arange(latent_dim)
    return order if step % 2 == 0 else order.flip(0)


class ConditionalIAF(nn.Module):
    """``num_flows`` IAF steps conditioned on a context vector: the part of an IAF guide after
    the encoder (a plain ``nn.Module``; its parameters belong to whichever module holds it).

    Parameters
    ----------
    latent_dim : int
        ``d`` (at least 2: a one-dimensional autoregressive step has nothing to condition on).
    num_flows : int
        ``T``.
    context_dim : int
        Width of :math:`h(x)`.
    hidden : sequence of int
        Hidden widths of every step's conditional MADE (default ``(2 d + context_dim,)``).
    """

    def __init__(self, latent_dim: int, num_flows: int, context_dim: int,
                 hidden: Optional[Sequence[int]] = None):
        super().__init__()
        self.latent_dim = positive_int(latent_dim, "latent_dim")
        if latent_dim < 2:
            raise ValueError("IAF steps need latent_dim >= 2 (got 1): a one-dimensional "
                             "autoregressive step has no earlier coordinates to condition on")
        self.num_flows = positive_int(num_flows, "num_flows")
        self.context_dim = positive_int(context_dim, "context_dim")
        hidden = [2 * latent_dim + context_dim] if hidden is None else list(hidden)
        self.steps = nn.ModuleList([
            T.ConditionalAffineAutoregressive(
                ConditionalAutoRegressiveNN(latent_dim, context_dim, hidden,
                                            permutation=_alternating_permutation(latent_dim, t)),
                stable=True)
            for t in range(self.num_flows)])

    def transforms(self, context: torch.Tensor) -> list:
        """The ``T`` steps conditioned on ``context`` ``[..., context_dim]``."""
        return [step.condition(context) for step in self.steps]

    def distribution(self, loc: torch.Tensor, scale: torch.Tensor,
                     context: torch.Tensor) -> dist.TransformedDistribution:
        """:math:`q(z \\mid x)`: batch shape ``loc.shape[:-1]``, event shape ``[d]``."""
        base = dist.Normal(loc, scale).to_event(1)
        return dist.TransformedDistribution(base, self.transforms(context))


class IAFGuide(PyroModule):
    """A self-contained amortized IAF guide :math:`q_\\phi(z \\mid x)` (see module docstring).

    Pair it with any model whose latent site ``"z"`` (event shape ``[d]``) sits inside
    ``pyro.plate("data", n, dim=-1)``, e.g. ``(dlvm.model, IAFGuide(...).guide)``, or
    :class:`IAFGuidedDLVM` for a DLVM.

    Parameters
    ----------
    data_dim, latent_dim : int
    num_flows : int
        ``T``.
    hidden : sequence of int
        Encoder MLP widths.
    context_dim : int
        Width of the context :math:`h(x)` fed to every flow step (default ``latent_dim``).
    flow_hidden : sequence of int, optional
        Hidden widths of each step's MADE.
    activation : str or nn.Module class
        Encoder nonlinearity.
    min_scale : float
        :math:`\\sigma_{\\min}` added to the base scale.
    """

    def __init__(self, data_dim: int, latent_dim: int, num_flows: int = 2,
                 hidden: Sequence[int] = (200, 200), context_dim: Optional[int] = None,
                 flow_hidden: Optional[Sequence[int]] = None, activation="tanh",
                 min_scale: float = 1e-5):
        super().__init__(name=unique_module_name(type(self).__name__))
        self.data_dim = positive_int(data_dim, "data_dim")
        self.latent_dim = positive_int(latent_dim, "latent_dim")
        self.context_dim = latent_dim if context_dim is None else positive_int(context_dim,
                                                                                "context_dim")
        self.min_scale = float(min_scale)
        self.encoder = mlp(data_dim, tuple(hidden), 2 * latent_dim + self.context_dim,
                           activation)
        self.flow = ConditionalIAF(latent_dim, num_flows, self.context_dim, flow_hidden)

    def encode(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Base loc, base scale and context, ``[n, d]``, ``[n, d]``, ``[n, context_dim]``."""
        out = self.encoder(x)
        d = self.latent_dim
        return out[..., :d], F.softplus(out[..., d:2 * d]) + self.min_scale, out[..., 2 * d:]

    def distribution(self, x: torch.Tensor) -> dist.TransformedDistribution:
        """:math:`q_\\phi(z \\mid x)` for rows ``x`` ``[n, p]``."""
        return self.flow.distribution(*self.encode(x))

    @pyro_method
    def guide(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Site ``"z"`` ~ :math:`q_\\phi(z \\mid x)` inside ``pyro.plate("data")``; missing
        entries (``mask`` False) are set to 0 before encoding."""
        if x.dim() != 2 or x.shape[-1] != self.data_dim:
            raise ValueError(f"x has shape {tuple(x.shape)}; IAFGuide expects (batch, "
                             f"data_dim={self.data_dim})")
        if mask is not None:
            x = torch.where(mask.to(torch.bool), x, torch.zeros((), dtype=x.dtype,
                                                                 device=x.device))
        with pyro.plate("data", x.shape[0], dim=-1):
            return pyro.sample("z", self.distribution(x))


class FlowPrior(Prior):
    """:math:`p(z)`: a standard normal pushed through ``num_flows`` affine autoregressive steps,
    scored in one pass per step (see module docstring). Use as ``DLVM(..., prior=FlowPrior(d,
    T))``.

    Parameters
    ----------
    latent_dim : int
        ``d >= 2``.
    num_flows : int
        ``T``.
    hidden : sequence of int, optional
        Hidden widths of each step's MADE (default ``(4 d,)``).
    """

    def __init__(self, latent_dim: int, num_flows: int = 2,
                 hidden: Optional[Sequence[int]] = None):
        super().__init__(latent_dim)
        if latent_dim < 2:
            raise ValueError("FlowPrior needs latent_dim >= 2 (got 1)")
        self.num_flows = positive_int(num_flows, "num_flows")
        hidden = [4 * latent_dim] if hidden is None else list(hidden)
        self.steps = nn.ModuleList([
            T.AffineAutoregressive(AutoRegressiveNN(
                latent_dim, hidden, permutation=_alternating_permutation(latent_dim, t)))
            for t in range(self.num_flows)])
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))

    def distribution(self) -> dist.TransformedDistribution:
        # each step's .inv maps z -> u in one pass (the direction log_prob needs)
        base = dist.Normal(self.loc, self.scale).to_event(1)
        return dist.TransformedDistribution(base, [step.inv for step in reversed(self.steps)])

    def extra_repr(self) -> str:
        return f"latent_dim={self.latent_dim}, num_flows={self.num_flows}"


class IAFGuidedDLVM(nn.Module):
    """A :class:`~pyro_lvm.models.dlvm.DLVM`'s model with an :class:`IAFGuide` as its guide:
    ``IAFGuidedDLVM(DLVM(...), num_flows=T)`` is this project's ``guide_flows=T`` switch.

    The IAF guide has its own encoder with the DLVM's encoder widths and activation (plus the
    context output); the DLVM's own Gaussian encoder is not used. ``model``, ``sample``,
    ``check_data`` and ``eval_width`` are the DLVM's; ``reconstruct`` decodes the flow
    applied to the base mean. A VampPrior is refused: its components are the DLVM's Gaussian
    encoder at the pseudo-inputs, which this guide does not train.

    Parameters
    ----------
    dlvm : DLVM
    num_flows : int
        ``T`` IAF steps.
    context_dim : int, optional
        Width of the encoder's context (default ``latent_dim``).
    flow_hidden : sequence of int, optional
        Hidden widths of each step's MADE.
    """

    def __init__(self, dlvm, num_flows: int = 2, context_dim: Optional[int] = None,
                 flow_hidden: Optional[Sequence[int]] = None):
        super().__init__()
        from .priors import VampPrior

        if isinstance(dlvm.prior, VampPrior):
            raise ValueError("IAFGuidedDLVM does not support the VampPrior: its components are "
                             "the DLVM's Gaussian encoder, which the IAF guide replaces; use "
                             "prior='normal', 'mixture' or a FlowPrior")
        config = dlvm.config
        self.dlvm = dlvm
        self.iaf = IAFGuide(dlvm.data_dim, dlvm.latent_dim, num_flows,
                            hidden=config["encoder_hidden"], context_dim=context_dim,
                            flow_hidden=flow_hidden, activation=config["activation"],
                            min_scale=dlvm.min_encoder_scale)
        self.data_dim, self.latent_dim = dlvm.data_dim, dlvm.latent_dim
        self.config = {**config, "guide": "iaf", "guide_flows": num_flows}

    def model(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None):
        """The DLVM's model."""
        return self.dlvm.model(x, mask)

    def guide(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None):
        """The IAF guide (site ``"z"``)."""
        return self.iaf.guide(x, mask)

    def sample(self, n: int, **kwargs):
        return self.dlvm.sample(n, **kwargs)

    def reconstruct(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """:math:`E[x \\mid z]` at :math:`z` = the flow applied to the base mean, ``[n, p]``."""
        x, _ = self.dlvm._observed(x, mask)
        with torch.no_grad():
            z, _, context = self.iaf.encode(x)
            for step in self.iaf.flow.transforms(context):
                z = step(z)
            return self.dlvm.likelihood.mean(self.dlvm.decoder(z))

    def check_data(self, x, mask=None) -> torch.Tensor:
        return self.dlvm.check_data(x, mask)

    @property
    def eval_width(self) -> int:
        return self.dlvm.eval_width
