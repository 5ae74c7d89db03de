"""MADE: masked autoencoder for distribution estimation (Germain et al. 2015), for binary data.

An autoregressive model with an exact, normalized likelihood:

.. math::

    p(x) = \\prod_{d=1}^{p} p\\big(x_{o_d} \\mid x_{o_1}, \\dots, x_{o_{d-1}}\\big), \\qquad
    p\\big(x_{o_d} = 1 \\mid x_{o_{<d}}\\big) = \\sigma\\big(f(x)_{o_d}\\big),

for an ordering :math:`o` of the inputs, where :math:`f` is an MLP whose weight matrices are
multiplied by binary masks so that output :math:`o_d` depends on inputs :math:`o_{<d}` only.
Masks follow the paper: every input gets its degree :math:`m^0(j) =` its position in the
ordering (1..p), every hidden unit a degree :math:`m^l(k)` drawn uniformly from
:math:`\\{\\min_{k'} m^{l-1}(k'), \\dots, p - 1\\}`; a hidden connection is kept when
:math:`m^l(k) \\ge m^{l-1}(k')` and an output connection when :math:`m^0(d) > m^L(k)`.

Order-agnostic and connectivity-agnostic training (Germain et al. 2015, section 4.2): with
``num_masks = M > 1`` the model holds ``M`` seeded (ordering, connectivity) pairs and training
moves to the next one at every step; each pair defines a normalized distribution
:math:`p_m(x)`, and the model's density is their ensemble
:math:`p(x) = \\frac1M \\sum_m p_m(x)` (also normalized), as the paper evaluates it.
``num_masks=1`` with ``natural_ordering=True`` is the plain MADE with the identity ordering.

References
----------
Germain, M., Gregor, K., Murray, I. & Larochelle, H. (2015). MADE: masked autoencoder for
distribution estimation. ICML (binarized MNIST: 88.40 nats with one hidden layer, 86.64 with
two layers and 32 masks).
Uria, B., Murray, I. & Larochelle, H. (2014). A deep and tractable density estimator. ICML.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import validation
from .validation import positive_int
from .networks import resolve_activation

__all__ = ["MADE", "MaskedLinear", "made_masks"]


class MaskedLinear(nn.Linear):
    """``y = x (W * M)^T + b`` with a fixed binary mask ``M`` (a buffer, set by :meth:`set_mask`)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features)
        self.register_buffer("mask", torch.ones(out_features, in_features))

    def set_mask(self, mask: torch.Tensor) -> None:
        self.mask.copy_(mask.to(self.mask))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


def made_masks(ordering: np.ndarray, hidden: Sequence[int], rng: np.random.Generator):
    """The masks ``[out, in]`` of every layer for one ordering (see the module docstring).

    Parameters
    ----------
    ordering : array of int ``[p]``
        ``ordering[j]`` is the position (0-based) of input ``j`` in the autoregressive order.
    hidden : sequence of int
        Hidden layer widths.
    rng : numpy Generator
        Draws the hidden units' degrees.
    """
    p = len(ordering)
    degrees = [np.asarray(ordering) + 1]                       # inputs: 1..p
    for width in hidden:
        low = min(int(degrees[-1].min()), p - 1)
        degrees.append(rng.integers(low, p, size=width))       # in [low, p - 1]
    masks = [(d_out[:, None] >= d_in[None, :]) for d_in, d_out in zip(degrees[:-1], degrees[1:])]
    masks.append(degrees[0][:, None] > degrees[-1][None, :])
    return [torch.from_numpy(m.astype(np.float32)) for m in masks]


class MADE(nn.Module):
    """MADE for binary data with ``num_masks`` orderings/connectivities (see module docstring).

    Parameters
    ----------
    data_dim : int
        ``p``.
    hidden : int or sequence of int
        Hidden layer widths.
    num_masks : int
        ``M``, the number of (ordering, connectivity) pairs trained and ensembled.
    activation : str or nn.Module class
        Hidden nonlinearity (default ``"relu"``, as in the paper).
    natural_ordering : bool
        Use the identity ordering for the first mask set (the others are always random).
    seed : int
        Seed of the orderings and connectivities.
    """

    def __init__(self, data_dim: int, hidden: Union[int, Sequence[int]] = 500,
                 num_masks: int = 1, *, activation="relu", natural_ordering: bool = False,
                 seed: int = 0):
        super().__init__()
        self.data_dim = positive_int(data_dim, "data_dim")
        if self.data_dim < 2:
            raise ValueError(f"data_dim must be at least 2 for MADE, got {data_dim}")
        hidden = (hidden,) if isinstance(hidden, int) else tuple(hidden)
        if not hidden:
            raise ValueError("hidden must name at least one hidden layer width")
        self.hidden = tuple(positive_int(h, "hidden width") for h in hidden)
        self.num_masks = positive_int(num_masks, "num_masks")
        widths = (self.data_dim,) + self.hidden + (self.data_dim,)
        act = resolve_activation(activation)
        layers = []
        for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(MaskedLinear(w_in, w_out))
            if i < len(widths) - 2:
                layers.append(act())
        self.net = nn.Sequential(*layers)
        rng = np.random.default_rng(seed)
        orderings, mask_sets = [], []
        for m in range(self.num_masks):
            order = (np.arange(self.data_dim) if natural_ordering and m == 0
                     else rng.permutation(self.data_dim))
            orderings.append(order)
            mask_sets.append(made_masks(order, self.hidden, rng))
        # every mask set is a buffer so that .to(device) and state_dict carry them
        self.register_buffer("orderings", torch.as_tensor(np.stack(orderings), dtype=torch.long))
        for layer_index in range(len(widths) - 1):
            self.register_buffer(f"masks_{layer_index}",
                                 torch.stack([ms[layer_index] for ms in mask_sets]))
        self.current_mask = -1
        self.use_mask(0)
        self.history_: list = []
        self.config = dict(model="MADE", data_dim=self.data_dim, hidden=self.hidden,
                           num_masks=self.num_masks, natural_ordering=natural_ordering,
                           seed=seed)

    # ------------------------------------------------------------------ masks
    def _masked_layers(self):
        return [m for m in self.net if isinstance(m, MaskedLinear)]

    def use_mask(self, index: int) -> None:
        """Switch to mask set ``index`` (ordering and connectivity)."""
        if not 0 <= index < self.num_masks:
            raise ValueError(f"mask index must be in [0, {self.num_masks}), got {index}")
        if index != self.current_mask:
            for i, layer in enumerate(self._masked_layers()):
                layer.set_mask(getattr(self, f"masks_{i}")[index])
            self.current_mask = index

    def next_mask(self) -> None:
        """Move to the next mask set (cyclically): order-agnostic training calls this per step."""
        self.use_mask((self.current_mask + 1) % self.num_masks)

    # ------------------------------------------------------------------ densities
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """:math:`\\operatorname{logit} p(x_j = 1 \\mid x_{<j})` under the current mask set, ``[n, p]``."""
        return self.net(x)

    def check_data(self, x) -> torch.Tensor:
        """Validate binary data with ``data_dim`` columns; returns a float tensor on the model's
        device."""
        x = validation.check_data(x, self.data_dim)
        validation.check_binary(x)
        param = next(self.parameters())
        return x.to(dtype=param.dtype, device=param.device)

    def _log_prob_current(self, x: torch.Tensor) -> torch.Tensor:
        # x log sigmoid(l) + (1 - x) log sigmoid(-l) = -BCE(l, x)
        return -F.binary_cross_entropy_with_logits(self.logits(x), x, reduction="none").sum(-1)

    def log_prob(self, x: torch.Tensor, mask_index: Optional[int] = None) -> torch.Tensor:
        """Exact :math:`\\log p(x)`, ``[n]``: under mask set ``mask_index``, or (default) the
        ensemble :math:`\\log \\frac1M \\sum_m p_m(x)` over all ``M`` mask sets."""
        x = self.check_data(x)
        previous = self.current_mask
        try:
            if mask_index is not None:
                self.use_mask(mask_index)
                return self._log_prob_current(x)
            terms = []
            for m in range(self.num_masks):
                self.use_mask(m)
                terms.append(self._log_prob_current(x))
            return torch.logsumexp(torch.stack(terms), 0) - math.log(self.num_masks)
        finally:
            self.use_mask(previous)

    def bits_per_dim(self, x: torch.Tensor, mask_index: Optional[int] = None) -> float:
        """:math:`-\\frac{1}{n p \\ln 2}\\sum_i \\log p(x_i)`."""
        with torch.no_grad():
            return float(-self.log_prob(x, mask_index).mean() / (self.data_dim * math.log(2)))

    @torch.no_grad()
    def sample(self, n: int, mask_index: Optional[int] = None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``n`` exact draws ``[n, p]``: ``p`` sequential passes in the mask set's ordering.
        With ``mask_index=None`` each row picks a mask set uniformly (a draw from the
        ensemble)."""
        n = positive_int(n, "n")
        param = next(self.parameters())
        previous = self.current_mask
        if mask_index is None:
            which = torch.randint(self.num_masks, (n,), generator=generator)
        else:
            which = torch.full((n,), int(mask_index), dtype=torch.long)
        out = torch.zeros(n, self.data_dim, dtype=param.dtype, device=param.device)
        try:
            for m in which.unique().tolist():
                rows = (which == m).nonzero().squeeze(-1).to(param.device)
                self.use_mask(m)
                x = torch.zeros(len(rows), self.data_dim, dtype=param.dtype, device=param.device)
                for j in torch.argsort(self.orderings[m]).tolist():
                    prob = torch.sigmoid(self.logits(x)[:, j])
                    u = torch.rand(len(rows), generator=generator).to(prob)
                    x[:, j] = (u < prob).to(x)
                out[rows] = x
        finally:
            self.use_mask(previous)
        return out

    # ------------------------------------------------------------------ training
    def fit(self, x, epochs: int = 10, batch_size: int = 100, lr: float = 1e-3, seed: int = 0,
            validation_data=None, progress: bool = False) -> "MADE":
        """Maximum likelihood by Adam on minibatches, moving to the next mask set every step
        (order- and connectivity-agnostic training when ``num_masks > 1``). Records per epoch
        the mean training NLL of the steps and, with ``validation_data``, the ensemble's mean
        validation NLL in ``history_``. Returns ``self``."""
        from tqdm.auto import tqdm

        x = self.check_data(x)
        valid = None if validation_data is None else self.check_data(validation_data)
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(self.parameters(), lr=lr)
        for epoch in tqdm(range(1, positive_int(epochs, "epochs") + 1), disable=not progress,
                          desc="MADE"):
            order = torch.randperm(x.shape[0], generator=gen).to(x.device)
            total = 0.0
            for start in range(0, x.shape[0], batch_size):
                batch = x[order[start:start + batch_size]]
                self.next_mask()
                loss = -self._log_prob_current(batch).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * batch.shape[0]
            row = dict(epoch=epoch, train_nll=total / x.shape[0])
            if valid is not None:
                with torch.no_grad():
                    row["valid_nll"] = float(-self.log_prob(valid).mean())
            self.history_.append(row)
        return self

    def extra_repr(self) -> str:
        return f"data_dim={self.data_dim}, hidden={self.hidden}, num_masks={self.num_masks}"
