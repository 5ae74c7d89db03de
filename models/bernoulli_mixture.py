"""Mixture of multivariate Bernoullis: the binary-data analogue of factor analysis, with an
exact likelihood, an EM fit and a Pyro model/guide pair whose discrete latent is enumerated.

Generative process for binary rows :math:`x_i \\in \\{0, 1\\}^p`:

.. math::

    c_i \\sim \\operatorname{Categorical}(\\pi), \\qquad
    x_{ij} \\mid c_i = k \\sim \\operatorname{Bernoulli}(\\mu_{kj}), \\quad j = 1..p,

so that :math:`\\log p(x_i) = \\operatorname{logsumexp}_k \\big[\\log \\pi_k + \\sum_j
x_{ij} \\log \\mu_{kj} + (1 - x_{ij}) \\log(1 - \\mu_{kj})\\big]` is exact and cheap (missing
entries drop out of the sum: they are marginalized exactly).

EM (Dempster, Laird & Rubin 1977; Bishop 2006, section 9.3.3): the E-step computes the
responsibilities :math:`r_{ik} = p(c_i = k \\mid x_i)`, the M-step sets
:math:`\\pi_k = N_k / N` and :math:`\\mu_{kj} = (\\sum_i r_{ik} x_{ij} + s) / (N_k + 2 s)`
with :math:`N_k = \\sum_i r_{ik}`. ``smoothing`` :math:`s \\ge 0` is the MAP estimate under a
:math:`\\operatorname{Beta}(1 + s, 1 + s)` prior on every :math:`\\mu_{kj}` (it keeps test
rows with a pixel never seen "on" in a component at a finite log-likelihood). With
:math:`s = 0` the log-likelihood never decreases; with :math:`s > 0` the log-likelihood plus
the log prior never decreases (both are recorded in ``history_``).

As a Pyro pair (:meth:`BernoulliMixture.model` / :meth:`BernoulliMixture.guide`): the component
is a model site ``"component"`` with ``infer={"enumerate": "parallel"}`` inside
``pyro.plate("data")``, absent from the (empty) guide, so ``pyro.infer.TraceEnum_ELBO`` sums
it out and its loss is exactly :math:`-\\sum_i \\log p(x_i)`.

References
----------
Dempster, A. P., Laird, N. M. & Rubin, D. B. (1977). Maximum likelihood from incomplete data
via the EM algorithm. JRSS B.
Bishop, C. M. (2006). Pattern Recognition and Machine Learning, section 9.3.3.
Larochelle, H. & Murray, I. (2011). The neural autoregressive distribution estimator.
AISTATS (table 2: mixture of Bernoullis 137.64 nats on binarized MNIST).
"""
from __future__ import annotations

import math
from typing import Optional

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule, pyro_method
from torch import nn

from . import validation
from .validation import positive_int
from .base import unique_module_name

__all__ = ["BernoulliMixture"]

#: EM keeps logits inside +-LOGIT_BOUND: a probability of exactly 0 or 1 (possible with
#: smoothing=0) would make the logit infinite; at 30 the change in any log-probability is
#: below 1e-13.
LOGIT_BOUND = 30.0


class BernoulliMixture(PyroModule):
    """A mixture of ``num_components`` product-Bernoulli distributions on :math:`\\{0,1\\}^p`
    (see the module docstring).

    Parameters
    ----------
    data_dim : int
        ``p``.
    num_components : int
        ``K``.

    Attributes
    ----------
    weight_logits : nn.Parameter ``[K]``
        :math:`\\log \\pi` up to a constant.
    logits : nn.Parameter ``[K, p]``
        :math:`\\operatorname{logit} \\mu_{kj}`.
    history_ : list of dict
        After :meth:`fit_em`: per iteration ``log_likelihood`` (mean per row) and
        ``objective`` (mean log-likelihood plus log prior per row).
    """

    def __init__(self, data_dim: int, num_components: int):
        super().__init__(name=unique_module_name(type(self).__name__))
        self.data_dim = positive_int(data_dim, "data_dim")
        self.num_components = positive_int(num_components, "num_components")
        self.weight_logits = nn.Parameter(torch.zeros(self.num_components))
        # small random logits break the symmetry for gradient training as well as EM
        self.logits = nn.Parameter(0.1 * torch.randn(self.num_components, self.data_dim))
        self.history_: list = []
        self.config = dict(model="BernoulliMixture", data_dim=self.data_dim,
                           num_components=self.num_components)

    # ------------------------------------------------------------------ densities
    def check_data(self, x, mask=None) -> torch.Tensor:
        """Validate binary data with ``data_dim`` columns; returns a float tensor."""
        x = validation.check_data(x, self.data_dim, mask=mask)
        mask_t = None if mask is None else torch.as_tensor(mask, dtype=torch.bool,
                                                           device=x.device)
        validation.check_binary(x, mask=mask_t)
        return x.to(dtype=self.logits.dtype, device=self.logits.device)

    def _component_log_probs(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """:math:`\\log \\pi_k + \\log p(x_i \\mid c_i = k)`, ``[n, K]`` (observed entries only)."""
        # x log sigmoid(l) + (1 - x) log sigmoid(-l) = x l - softplus(l)
        if mask is None:
            log_lik = x @ self.logits.T - F.softplus(self.logits).sum(-1)
        else:
            m = mask.to(x.dtype)
            log_lik = (x * m) @ self.logits.T - m @ F.softplus(self.logits).T
        return log_lik + torch.log_softmax(self.weight_logits, -1)

    def log_marginal(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Exact :math:`\\log p(x_i)` (missing entries marginalized), ``[n]``."""
        x = self.check_data(x, mask)
        mask = None if mask is None else torch.as_tensor(mask, dtype=torch.bool, device=x.device)
        return torch.logsumexp(self._component_log_probs(x, mask), -1)

    def responsibilities(self, x: torch.Tensor) -> torch.Tensor:
        """:math:`p(c_i = k \\mid x_i)`, ``[n, K]``."""
        x = self.check_data(x)
        return torch.softmax(self._component_log_probs(x, None), -1)

    def bits_per_dim(self, x: torch.Tensor) -> float:
        """:math:`-\\frac{1}{n p \\ln 2} \\sum_i \\log p(x_i)`."""
        return float(-self.log_marginal(x).mean() / (self.data_dim * math.log(2)))

    # ------------------------------------------------------------------ EM
    def _log_prior(self, smoothing: float) -> torch.Tensor:
        if smoothing == 0:
            return torch.zeros((), dtype=self.logits.dtype)
        # Beta(1 + s, 1 + s) up to a constant: s [log mu + log(1 - mu)]
        return -smoothing * (F.softplus(-self.logits) + F.softplus(self.logits)).sum()

    @torch.no_grad()
    def fit_em(self, x, max_iter: int = 100, tol: float = 1e-6, smoothing: float = 1e-2,
               init: str = "random_rows", seed: int = 0, progress: bool = False
               ) -> "BernoulliMixture":
        """Fit by EM (see the module docstring); returns ``self``.

        Parameters
        ----------
        x : array-like ``[n, p]`` of 0/1
        max_iter : int
            Maximum number of EM iterations.
        tol : float
            Stop when the mean objective per row improves by less than ``tol``.
        smoothing : float
            ``s >= 0`` of the Beta(1 + s, 1 + s) prior on the pixel probabilities.
        init : {"random_rows", "current"}
            ``"random_rows"``: responsibilities start as a random hard assignment of rows to
            components (a seeded permutation, so every component gets rows); ``"current"``:
            start from the current parameters.
        seed : int
            Seed of the initial assignment.
        progress : bool
            Show a tqdm bar.
        """
        if not (smoothing >= 0 and math.isfinite(smoothing)):
            raise ValueError(f"smoothing must be a finite number >= 0, got {smoothing!r}")
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
        if init not in ("random_rows", "current"):
            raise ValueError(f"init must be 'random_rows' or 'current', got {init!r}")
        x = self.check_data(x)
        n = x.shape[0]
        if init == "random_rows":
            gen = torch.Generator().manual_seed(seed)
            labels = torch.randperm(n, generator=gen) % self.num_components
            resp = F.one_hot(labels, self.num_components).to(x)
            self._m_step(x, resp, smoothing)
        self.history_ = []
        from tqdm.auto import tqdm
        for _ in tqdm(range(max_iter), disable=not progress, desc="EM"):
            joint = self._component_log_probs(x, None)
            log_lik = torch.logsumexp(joint, -1)
            mean_ll = float(log_lik.mean())
            objective = mean_ll + float(self._log_prior(smoothing)) / n
            self.history_.append(dict(log_likelihood=mean_ll, objective=objective))
            if len(self.history_) > 1 and objective - self.history_[-2]["objective"] < tol:
                break
            self._m_step(x, torch.exp(joint - log_lik[:, None]), smoothing)
        return self

    def _m_step(self, x: torch.Tensor, resp: torch.Tensor, smoothing: float) -> None:
        counts = resp.sum(0)                                                    # [K]
        hits = resp.T @ x                                                       # [K, p]
        probs = (hits + smoothing) / (counts[:, None] + 2 * smoothing)
        empty = counts <= 0
        probs = probs.nan_to_num(0.5)
        logits = torch.logit(probs).clamp(-LOGIT_BOUND, LOGIT_BOUND)
        # an empty component (weight 0) keeps its pixel probabilities: they do not affect
        # the likelihood
        self.logits.data = torch.where(empty[:, None], self.logits.data, logits)
        self.weight_logits.data = torch.log(counts / counts.sum()).clamp_min(-1e4)

    # ------------------------------------------------------------------ Pyro pair
    @pyro_method
    def model(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
        """:math:`c_i \\sim \\operatorname{Cat}(\\pi)` (enumerated, site ``"component"``),
        :math:`x_i \\mid c_i \\sim \\prod_j \\operatorname{Bernoulli}(\\mu_{c_i j})` on the
        observed entries (site ``"x"``)."""
        if x.dim() != 2 or x.shape[-1] != self.data_dim:
            raise ValueError(f"x has shape {tuple(x.shape)}; BernoulliMixture expects (batch, "
                             f"data_dim={self.data_dim})")
        with pyro.plate("data", x.shape[0], dim=-1):
            c = pyro.sample("component", dist.Categorical(logits=self.weight_logits),
                            infer={"enumerate": "parallel"})
            px = dist.Bernoulli(logits=self.logits[c])
            if mask is not None:
                px = px.mask(mask.to(torch.bool))
                x = torch.where(mask.to(torch.bool), x, torch.zeros_like(x))
            pyro.sample("x", px.to_event(1), obs=x)

    @pyro_method
    def guide(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
        """Empty: the only latent, the component, is enumerated in the model."""

    def sample(self, n: int, *, return_latent: bool = False):
        """``n`` rows ``[n, p]`` (and their components ``[n]``), no gradient."""
        n = positive_int(n, "n")
        with torch.no_grad():
            c = dist.Categorical(logits=self.weight_logits).sample((n,))
            x = dist.Bernoulli(logits=self.logits[c]).sample()
        return (x, c) if return_latent else x

    def extra_repr(self) -> str:
        return f"data_dim={self.data_dim}, num_components={self.num_components}"
