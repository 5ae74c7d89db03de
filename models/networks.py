"""Small multilayer perceptrons shared by the encoders and decoders of :mod:`models.dlvm`.

An MLP with hidden widths :math:`h_1, \\dots, h_L` computes

.. math::

    f(u) = W_{L+1}\\, a\\big(W_L \\cdots a(W_1 u + b_1) \\cdots + b_L\\big) + b_{L+1},

with an elementwise activation :math:`a` between layers and a linear (unconstrained)
output layer; the model that uses the output maps it to its parameter space (softplus for
scales, logits for probabilities, ...).
"""
from __future__ import annotations

from typing import Sequence, Type, Union

from torch import nn

__all__ = ["ACTIVATIONS", "mlp", "resolve_activation"]

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
    or an ``nn.Module`` subclass (instantiated with no arguments) to a module class."""
    if isinstance(activation, str):
        try:
            return ACTIVATIONS[activation.lower()]
        except KeyError:
            raise ValueError(
                f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)} "
                f"or pass a torch.nn.Module class such as torch.nn.SiLU"
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
        Nonlinearity between layers (none after the output layer).

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
    act = resolve_activation(activation)
    layers: list = []
    widths = (in_dim,) + hidden
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), act()]
    layers.append(nn.Linear(widths[-1], out_dim))
    return nn.Sequential(*layers)
