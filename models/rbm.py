"""Bernoulli-Bernoulli restricted Boltzmann machine: contrastive-divergence training, block
Gibbs sampling, and its log partition function exactly (small layers) or by annealed
importance sampling.

Energy and free energy for visible :math:`v \\in \\{0,1\\}^V`, hidden :math:`h \\in \\{0,1\\}^H`:

.. math::

    E(v, h) = -b^\\top v - c^\\top h - v^\\top W h, \\qquad
    F(v) = -\\log \\sum_h e^{-E(v, h)} = -b^\\top v - \\sum_{j} \\operatorname{softplus}(c_j + v^\\top W_{:j}),

    p(v) = e^{-F(v)} / Z, \\qquad
    \\log Z = \\operatorname{logsumexp}_h \\Big[c^\\top h + \\sum_i \\operatorname{softplus}(b_i + W_{i:} h)\\Big]

(the last form sums the visibles out analytically, so the exact :math:`\\log Z` enumerates
:math:`2^{\\min(V, H)}` states of the smaller layer).

Training: CD-k (Hinton 2002) and persistent CD (Tieleman 2008), the gradient
:math:`\\langle v h^\\top \\rangle_{\\text{data}} - \\langle v h^\\top \\rangle_{\\text{chain}}`
with hidden probabilities in place of hidden samples.

AIS (Neal 2001; Salakhutdinov & Murray 2008): intermediate distributions
:math:`p_\\beta(v) \\propto e^{(1-\\beta) b_A^\\top v} \\, e^{-\\beta F(v)}`, i.e. the RBM with
visible bias :math:`(1-\\beta) b_A + \\beta b`, weights :math:`\\beta W` and hidden bias
:math:`\\beta c`, from the base-rate model (:math:`\\beta = 0`: independent visibles with
:math:`b_A` = the logits of the data's pixel means, and :math:`H` free hidden units,
:math:`Z_A = 2^H \\prod_i (1 + e^{b_{A,i}})`)
to the RBM (:math:`\\beta = 1`). ``M`` independent runs give importance weights :math:`w_m`
with :math:`E[w_m] = Z / Z_A`; the estimate is :math:`\\log Z_A + \\log \\bar w` and its
standard error (delta method) :math:`\\operatorname{sd}(w) / (\\sqrt M\\, \\bar w)`. The
estimate of :math:`Z` is unbiased, so :math:`\\log Z` is underestimated on average (and the
log-likelihood :math:`-F(v) - \\log Z` overestimated): an AIS estimate, labelled as such.

References
----------
Hinton, G. E. (2002). Training products of experts by minimizing contrastive divergence.
Neural Computation.
Tieleman, T. (2008). Training restricted Boltzmann machines using approximations to the
likelihood gradient. ICML.
Neal, R. M. (2001). Annealed importance sampling. Statistics and Computing.
Salakhutdinov, R. & Murray, I. (2008). On the quantitative analysis of deep belief networks.
ICML.
Larochelle, H. & Murray, I. (2011). The neural autoregressive distribution estimator.
AISTATS (table 2: RBM with 500 hidden units, CD-25, 86.34 nats on binarized MNIST, via AIS).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import validation
from .validation import positive_int

__all__ = ["RBM", "AISResult"]

#: Enumerating 2^k states of a layer above this size is refused (2^22 states x V is slow).
MAX_EXACT_UNITS = 22


class AISResult(NamedTuple):
    """An AIS estimate of :math:`\\log Z` and its Monte Carlo standard error."""

    estimate: float
    standard_error: float
    num_runs: int
    num_betas: int


def _all_binary(k: int, start: int, stop: int, dtype, device) -> torch.Tensor:
    """Rows ``start..stop-1`` of the ``2^k`` binary vectors (bit j of the row index)."""
    idx = torch.arange(start, stop, device=device)
    bits = torch.arange(k, device=device)
    return ((idx[:, None] >> bits[None, :]) & 1).to(dtype)


class RBM(nn.Module):
    """A Bernoulli-Bernoulli RBM (see the module docstring).

    Parameters
    ----------
    num_visible, num_hidden : int
        ``V`` and ``H``.
    init_scale : float
        Standard deviation of the initial weights (biases start at 0).
    seed : int
        Seed of the initial weights.
    """

    def __init__(self, num_visible: int, num_hidden: int, init_scale: float = 0.01,
                 seed: int = 0):
        super().__init__()
        self.num_visible = positive_int(num_visible, "num_visible")
        self.num_hidden = positive_int(num_hidden, "num_hidden")
        gen = torch.Generator().manual_seed(seed)
        # parameters without autograd: CD supplies the gradients directly
        self.weight = nn.Parameter(init_scale * torch.randn(num_visible, num_hidden,
                                                            generator=gen), requires_grad=False)
        self.visible_bias = nn.Parameter(torch.zeros(num_visible), requires_grad=False)
        self.hidden_bias = nn.Parameter(torch.zeros(num_hidden), requires_grad=False)
        self.history_: list = []
        self._persistent_chain: Optional[torch.Tensor] = None
        self.config = dict(model="RBM", num_visible=num_visible, num_hidden=num_hidden)

    # ------------------------------------------------------------------ energies
    def check_data(self, x) -> torch.Tensor:
        """Validate binary data with ``num_visible`` columns; returns a float tensor on the
        model's device."""
        x = validation.check_data(x, self.num_visible)
        validation.check_binary(x)
        return x.to(dtype=self.weight.dtype, device=self.weight.device)

    def free_energy(self, v: torch.Tensor) -> torch.Tensor:
        """:math:`F(v) = -b^\\top v - \\sum_j \\operatorname{softplus}(c_j + v^\\top W_{:j})`, ``[n]``."""
        return -(v @ self.visible_bias) - F.softplus(v @ self.weight + self.hidden_bias).sum(-1)

    def hidden_probs(self, v: torch.Tensor) -> torch.Tensor:
        """:math:`p(h_j = 1 \\mid v) = \\sigma(c_j + v^\\top W_{:j})`."""
        return torch.sigmoid(v @ self.weight + self.hidden_bias)

    def visible_probs(self, h: torch.Tensor) -> torch.Tensor:
        """:math:`p(v_i = 1 \\mid h) = \\sigma(b_i + W_{i:} h)`."""
        return torch.sigmoid(h @ self.weight.T + self.visible_bias)

    def gibbs_step(self, v: torch.Tensor, generator: Optional[torch.Generator] = None):
        """One block Gibbs sweep ``v -> h -> v'``; returns ``(v', p(h | v))``."""
        ph = self.hidden_probs(v)
        h = torch.bernoulli(ph, generator=generator)
        return torch.bernoulli(self.visible_probs(h), generator=generator), ph

    @torch.no_grad()
    def sample(self, n: int, num_steps: int = 1000, init: Optional[torch.Tensor] = None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``n`` visible states after ``num_steps`` block Gibbs sweeps from ``init`` (default:
        uniform random states), ``[n, V]``; approximate draws from :math:`p(v)`."""
        v = (torch.bernoulli(torch.full((positive_int(n, "n"), self.num_visible), 0.5,
                                        dtype=self.weight.dtype), generator=generator)
             .to(self.weight.device) if init is None else self.check_data(init))
        for _ in range(num_steps):
            v, _ = self.gibbs_step(v, generator)
        return v

    # ------------------------------------------------------------------ partition function
    @torch.no_grad()
    def log_partition(self, method: str = "exact", *, data=None, num_runs: int = 100,
                      num_betas: int = 10000, base_smoothing: float = 1e-3,
                      generator: Optional[torch.Generator] = None, chunk: int = 4096):
        """:math:`\\log Z`.

        ``method="exact"``: enumeration of the smaller layer's :math:`2^{\\min(V,H)}` states
        (refused above ``2^22``); returns a float.

        ``method="ais"``: annealed importance sampling from the base-rate model fitted to
        ``data`` (pixel means, smoothed by ``base_smoothing``; uniform when ``data`` is None)
        with ``num_runs`` runs and ``num_betas`` inverse temperatures evenly spaced in [0, 1];
        returns an :class:`AISResult` (estimate and standard error).
        """
        if method == "exact":
            return self._exact_log_partition(chunk)
        if method == "ais":
            return self._ais_log_partition(data, positive_int(num_runs, "num_runs"),
                                           positive_int(num_betas, "num_betas"),
                                           base_smoothing, generator)
        raise ValueError(f"method must be 'exact' or 'ais', got {method!r}")

    def _exact_log_partition(self, chunk: int) -> float:
        small = min(self.num_visible, self.num_hidden)
        if small > MAX_EXACT_UNITS:
            raise ValueError(
                f"exact log Z enumerates 2^{small} states; the smaller layer has {small} units "
                f"(limit {MAX_EXACT_UNITS}): use method='ais'")
        dtype, device = torch.float64, self.weight.device
        w, b, c = (t.to(dtype) for t in (self.weight, self.visible_bias, self.hidden_bias))
        parts = []
        for start in range(0, 2 ** small, chunk):
            states = _all_binary(small, start, min(start + chunk, 2 ** small), dtype, device)
            if self.num_hidden <= self.num_visible:     # sum the visibles out analytically
                parts.append(states @ c + F.softplus(states @ w.T + b).sum(-1))
            else:
                parts.append(states @ b + F.softplus(states @ w + c).sum(-1))
        return float(torch.logsumexp(torch.cat(parts), 0))

    def _ais_log_partition(self, data, num_runs: int, num_betas: int, base_smoothing: float,
                           generator) -> AISResult:
        dtype, device = torch.float64, self.weight.device
        w, b, c = (t.to(dtype) for t in (self.weight, self.visible_bias, self.hidden_bias))
        if data is None:
            base_bias = torch.zeros_like(b)
        else:
            mean = self.check_data(data).to(dtype).mean(0)
            mean = (mean + base_smoothing) / (1 + 2 * base_smoothing)
            base_bias = torch.logit(mean)
        # p_0(v) is exp(b_A . v) 2^H: at beta = 0 every hidden unit contributes softplus(0)
        log_z_base = float(F.softplus(base_bias).sum()) + self.num_hidden * math.log(2)
        betas = torch.linspace(0, 1, num_betas + 1, dtype=dtype).tolist()

        # log p*_beta(v) = v . ((1 - beta) b_A + beta b) + sum_j softplus(beta a_j(v)),
        # a(v) = v W + c: one product per step serves both temperatures and the Gibbs sweep
        v = torch.bernoulli(torch.sigmoid(base_bias).expand(num_runs, -1).cpu(),
                            generator=generator).to(device)
        log_w = torch.zeros(num_runs, dtype=dtype, device=device)
        for prev, beta in zip(betas[:-1], betas[1:]):
            a = v @ w + c
            log_w += ((beta - prev) * (v @ (b - base_bias))
                      + (F.softplus(beta * a) - F.softplus(prev * a)).sum(-1))
            if beta < 1:   # a Gibbs sweep leaving p_beta invariant
                h = torch.bernoulli(torch.sigmoid(beta * a).cpu(), generator=generator).to(device)
                pv = torch.sigmoid((1 - beta) * base_bias + beta * (h @ w.T + b))
                v = torch.bernoulli(pv.cpu(), generator=generator).to(device)
        log_mean = float(torch.logsumexp(log_w, 0) - math.log(num_runs))
        rel = torch.exp(log_w - log_mean)                  # w / mean(w)
        se = float(rel.std(unbiased=True) / math.sqrt(num_runs)) if num_runs > 1 else math.inf
        return AISResult(log_z_base + log_mean, se, num_runs, num_betas)

    def log_prob(self, v, log_partition: Optional[float] = None) -> torch.Tensor:
        """:math:`\\log p(v) = -F(v) - \\log Z`, ``[n]``. ``log_partition`` defaults to the exact
        value (small layers only); pass an AIS estimate for large RBMs (the result is then an
        AIS estimate, not an exact log-likelihood)."""
        v = self.check_data(v)
        if log_partition is None:
            log_partition = self._exact_log_partition(4096)
        elif isinstance(log_partition, AISResult):
            log_partition = log_partition.estimate
        with torch.no_grad():
            return -self.free_energy(v) - float(log_partition)

    # ------------------------------------------------------------------ training
    @torch.no_grad()
    def fit_cd(self, x, k: int = 1, persistent: bool = False, epochs: int = 10,
               batch_size: int = 100, lr: float = 0.05, momentum: float = 0.5,
               weight_decay: float = 0.0, init_visible_bias: bool = True, seed: int = 0,
               progress: bool = False) -> "RBM":
        """CD-k (``persistent=False``) or persistent CD-k training by SGD with momentum; returns
        ``self``. Records the mean reconstruction error per epoch in ``history_`` (a
        monitoring number only; the log-likelihood needs :meth:`log_partition`).

        The negative phase starts at the data (CD) or at a persistent set of ``batch_size``
        chains carried across updates (PCD), and runs ``k`` block Gibbs sweeps.
        ``init_visible_bias``: on the first call, start the visible biases at the logits of
        the data's (smoothed) pixel means (Hinton 2010, "A practical guide to training
        RBMs", section 8.1), which makes short CD runs far more effective.
        """
        from tqdm.auto import tqdm

        x = self.check_data(x)
        k = positive_int(k, "k")
        if init_visible_bias and not self.history_:
            self.visible_bias.copy_(torch.logit((x.mean(0) + 1e-2) / (1 + 2e-2)))
        gen = torch.Generator().manual_seed(seed)
        velocity = [torch.zeros_like(p) for p in (self.weight, self.visible_bias,
                                                    self.hidden_bias)]
        if persistent and (self._persistent_chain is None
                           or self._persistent_chain.shape[0] != batch_size):
            self._persistent_chain = torch.bernoulli(
                torch.full((batch_size, self.num_visible), 0.5, dtype=x.dtype),
                generator=gen).to(x.device)
        for epoch in tqdm(range(1, positive_int(epochs, "epochs") + 1), disable=not progress,
                          desc="CD-%d" % k):
            order = torch.randperm(x.shape[0], generator=gen).to(x.device)
            recon = 0.0
            for start in range(0, x.shape[0], batch_size):
                v0 = x[order[start:start + batch_size]]
                ph0 = self.hidden_probs(v0)
                vk = self._persistent_chain[:v0.shape[0]] if persistent else v0
                for _ in range(k):
                    vk, _ = self._gibbs_step_cpu_rng(vk, gen)
                if persistent:
                    self._persistent_chain[:v0.shape[0]] = vk
                phk = self.hidden_probs(vk)
                n = v0.shape[0]
                grads = ((v0.T @ ph0 - vk.T @ phk) / n - weight_decay * self.weight,
                         (v0 - vk).mean(0), (ph0 - phk).mean(0))
                for p, vel, g in zip((self.weight, self.visible_bias, self.hidden_bias),
                                     velocity, grads):
                    vel.mul_(momentum).add_(lr * g)
                    p.add_(vel)
                recon += float(((v0 - self.visible_probs(ph0)) ** 2).sum())
            self.history_.append(dict(epoch=epoch, reconstruction_error=recon / x.shape[0]))
        return self

    def _gibbs_step_cpu_rng(self, v: torch.Tensor, gen: torch.Generator):
        """A Gibbs sweep drawing from a CPU generator (reproducible on every device)."""
        ph = self.hidden_probs(v)
        h = torch.bernoulli(ph.cpu(), generator=gen).to(v.device)
        pv = self.visible_probs(h)
        return torch.bernoulli(pv.cpu(), generator=gen).to(v.device), ph

    def extra_repr(self) -> str:
        return f"num_visible={self.num_visible}, num_hidden={self.num_hidden}"
