"""Small multilayer perceptrons shared by the encoders and decoders of :mod:`pyro_lvm.models.dlvm`.

An MLP with hidden widths :math:`h_1, \\dots, h_L` computes

.. math::

    f(u) = W_{L+1}\\, a\\big(W_L \\cdots a(W_1 u + b_1) \\cdots + b_L\\big) + b_{L+1},

with an elementwise activation :math:`a` between layers and a linear (unconstrained)
output layer; the model that uses the output maps it to its parameter space (softplus for
scales, logits for probabilities, ...).

``activation="gated"`` replaces each hidden ``Linear -> a`` by a gated linear unit
(:class:`GatedLinear`; Dauphin et al. 2017),
:math:`h = (W u + b) \\odot \\operatorname{sigmoid}(V u + c)`, the hidden layers of the
VampPrior paper's MNIST networks (Tomczak & Welling 2018, "GatedDense").

References
----------
Dauphin, Fan, Auli & Grangier (2017), Language modeling with gated convolutional networks, ICML.
Tomczak & Welling (2018), VAE with a VampPrior, AISTATS.
"""
from __future__ import annotations

from typing import Sequence, Type, Union

import torch
from torch import nn

__all__ = ["ACTIVATIONS", "GATED", "GatedLinear", "mlp", "resolve_activation"]

#: The ``activation`` name that makes :func:`mlp` use :class:`GatedLinear` hidden layers.
GATED = "gated"


class GatedLinear(nn.Module):
    """:math:`h = (W u + b) \\odot \\operatorname{sigmoid}(V u + c)`, ``in_features ->
    out_features``; both affine maps are one ``Linear(in, 2 out)`` (one matrix product)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.linear = nn.Linear(in_features, 2 * out_features)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        value, gate = self.linear(u).chunk(2, dim=-1)
        return value * torch.sigmoid(gate)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"

#: Activation names accepted by :func:`mlp`.
ACTIVATIONS = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
    "gelu": nn.GELU,
}


def resolve_activation(activation: Union[str, Type[nn.Module]]) -> Type[nn.Module]:
    """Map an activation name (``"tanh"``, ``"relu"``, ``"softplus"``, ``"elu"``, ``"gelu"``)
    or an ``nn.Module`` subclass (instantiated with no arguments) to a module class.
    (``"gated"`` is not an elementwise activation; :func:`mlp` handles it.)"""
    if isinstance(activation, str):
        try:
            return ACTIVATIONS[activation.lower()]
        except KeyError:
            raise ValueError(
                f"unknown activation {activation!r}; choose one of "
                f"{sorted(ACTIVATIONS) + [GATED]} or pass a torch.nn.Module class such as "
                f"torch.nn.SiLU"
            ) from None
    if isinstance(activation, type) and issubclass(activation, nn.Module):
        return activation
    raise ValueError(
        f"activation must be a name in {sorted(ACTIVATIONS)} or a torch.nn.Module class, "
        f"got {activation!r}"
    )


def _check_width(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int,
        activation: Union[str, Type[nn.Module]] = "tanh") -> nn.Sequential:
    """Build ``Linear -> activation -> ... -> Linear`` as an ``nn.Sequential``.

    Parameters
    ----------
    in_dim, out_dim : int
        Input and output widths.
    hidden : sequence of int
        Hidden layer widths; ``()`` gives a single affine map.
    activation : str or nn.Module class
        Nonlinearity between layers (none after the output layer); ``"gated"``: every hidden
        layer is a :class:`GatedLinear` unit instead.

    Raises
    ------
    ValueError
        Non-positive widths or an unknown activation.
    """
    _check_width(in_dim, "in_dim")
    _check_width(out_dim, "out_dim")
    if isinstance(hidden, int):
        hidden = (hidden,)
    hidden = tuple(_check_width(h, f"hidden layer width (in hidden={tuple(hidden)})") for h in hidden)
    gated = isinstance(activation, str) and activation.lower() == GATED
    act = None if gated else resolve_activation(activation)
    layers: list = []
    widths = (in_dim,) + hidden
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [GatedLinear(a, b)] if gated else [nn.Linear(a, b), act()]
    layers.append(nn.Linear(widths[-1], out_dim))
    return nn.Sequential(*layers)
