"""Deterministic autoencoders as representation baselines: linear, nonlinear and denoising.

No likelihood is claimed for any of them: they are judged by reconstruction error and by how
many code dimensions they use, beside the probabilistic models.

* :class:`LinearAutoencoder` -- :math:`\\hat x = D (E (x - m)) + m` with linear maps
  :math:`E: \\mathbb{R}^p \\to \\mathbb{R}^d`, :math:`D: \\mathbb{R}^d \\to \\mathbb{R}^p`, trained by
  stochastic gradient on the squared error. Its global minima span the top-:math:`d` principal
  subspace (Baldi & Hornik 1989): the column space of :math:`D` equals that of the leading
  :math:`d` eigenvectors of the sample covariance, though :math:`D` itself need not be
  orthonormal (:meth:`LinearAutoencoder.decoder_subspace` returns an orthonormal basis).
* :class:`Autoencoder` -- MLP encoder and decoder, squared error (``loss="mse"``) or Bernoulli
  cross-entropy on logits (``loss="bce"``, for data in [0, 1]).
* :class:`DenoisingAutoencoder` -- the same network trained to reconstruct clean inputs from
  corrupted ones (Vincent et al. 2008): masking noise (each entry set to 0 with probability
  ``noise_level``) or additive Gaussian noise (standard deviation ``noise_level``).

Latent usage: :meth:`latent_usage` reports the variance of every code dimension across the data
and the number of "active" dimensions (variance above a threshold, the activity statistic of
Burda et al. 2016 applied to deterministic codes).

References
----------
Baldi, P. & Hornik, K. (1989). Neural networks and principal component analysis: learning
from examples without local minima. Neural Networks.
Vincent, P., Larochelle, H., Bengio, Y. & Manzagol, P.-A. (2008). Extracting and composing
robust features with denoising autoencoders. ICML.
Burda, Y., Grosse, R. & Salakhutdinov, R. (2016). Importance weighted autoencoders. ICLR.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import validation
from .validation import positive_int
from .networks import mlp

__all__ = ["LinearAutoencoder", "Autoencoder", "DenoisingAutoencoder"]


class _AutoencoderBase(nn.Module):
    """Shared data checks, reconstruction error, latent usage and the training loop."""

    data_dim: int
    latent_dim: int
    loss: str = "mse"

    def check_data(self, x) -> torch.Tensor:
        """Validate ``[n, data_dim]`` finite data (in [0, 1] for ``loss="bce"``); returns a
        float tensor on the model's device."""
        param = next(self.parameters())
        x = validation.check_data(x, self.data_dim, dtype=param.dtype)
        if self.loss == "bce":
            validation.check_binary(x, allow_fractional=True)
        return x.to(param.device)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode_raw(self, code: torch.Tensor) -> torch.Tensor:
        """The decoder's output before the loss's link (logits for ``"bce"``)."""
        raise NotImplementedError

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        out = self.decode_raw(code)
        return torch.sigmoid(out) if self.loss == "bce" else out

    def corrupt(self, x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        """The training input (the identity here; corrupted by the denoising autoencoder)."""
        return x

    def reconstruct(self, x) -> torch.Tensor:
        """:math:`\\hat x = \\text{decode}(\\text{encode}(x))`, ``[n, p]`` (no gradient)."""
        with torch.no_grad():
            return self.decode(self.encode(self.check_data(x)))

    def _loss_per_row(self, x_clean: torch.Tensor, x_input: torch.Tensor) -> torch.Tensor:
        out = self.decode_raw(self.encode(x_input))
        if self.loss == "bce":
            return F.binary_cross_entropy_with_logits(out, x_clean, reduction="none").sum(-1)
        return (out - x_clean).pow(2).sum(-1)

    def reconstruction_error(self, x) -> float:
        """Mean over rows of the summed squared error (``"mse"``) or Bernoulli cross-entropy
        (``"bce"``, nats per row) of the clean reconstruction."""
        x = self.check_data(x)
        with torch.no_grad():
            return float(self._loss_per_row(x, x).mean())

    def latent_usage(self, x, threshold: float = 1e-2) -> dict:
        """``variance`` (per code dimension, across rows of ``x``) and ``active`` (how many
        exceed ``threshold``)."""
        with torch.no_grad():
            codes = self.encode(self.check_data(x))
        var = codes.var(0, unbiased=False)
        return dict(variance=var.cpu(), active=int((var > threshold).sum()))

    def fit(self, x, epochs: int = 20, batch_size: int = 64, lr: float = 1e-3,
            optimizer: str = "adam", final_lr: Optional[float] = None, seed: int = 0,
            validation_data=None, progress: bool = False):
        """Minibatch stochastic gradient training (``optimizer`` ``"adam"`` or ``"sgd"`` with
        momentum 0.9) of the mean per-row loss; records ``train_loss`` (and ``valid_loss``)
        per epoch in ``history_``. With ``final_lr`` the step size decays geometrically from
        ``lr`` to ``final_lr`` over the epochs (a decaying step size lets SGD converge rather
        than hover at the noise floor of the minibatch gradients). Returns ``self``."""
        from tqdm.auto import tqdm

        x = self.check_data(x)
        valid = None if validation_data is None else self.check_data(validation_data)
        gen = torch.Generator().manual_seed(seed)
        if optimizer == "adam":
            opt = torch.optim.Adam(self.parameters(), lr=lr)
        elif optimizer == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=lr, momentum=0.9)
        else:
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
        epochs = positive_int(epochs, "epochs")
        decay = 1.0 if final_lr is None else (final_lr / lr) ** (1 / max(epochs - 1, 1))
        for epoch in tqdm(range(1, epochs + 1), disable=not progress, desc=type(self).__name__):
            for group in opt.param_groups:
                group["lr"] = lr * decay ** (epoch - 1)
            order = torch.randperm(x.shape[0], generator=gen).to(x.device)
            total = 0.0
            for start in range(0, x.shape[0], batch_size):
                batch = x[order[start:start + batch_size]]
                loss = self._loss_per_row(batch, self.corrupt(batch, gen)).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * batch.shape[0]
            row = dict(epoch=epoch, train_loss=total / x.shape[0])
            if valid is not None:
                row["valid_loss"] = self.reconstruction_error(valid)
            self.history_.append(row)
        return self


class LinearAutoencoder(_AutoencoderBase):
    """Linear encoder and decoder around the data mean (see the module docstring).

    Parameters
    ----------
    data_dim, latent_dim : int
        ``p`` and ``d`` (``d < p``).
    """

    def __init__(self, data_dim: int, latent_dim: int, seed: int = 0):
        super().__init__()
        self.data_dim = positive_int(data_dim, "data_dim")
        self.latent_dim = positive_int(latent_dim, "latent_dim")
        if latent_dim >= data_dim:
            raise ValueError(f"latent_dim ({latent_dim}) must be below data_dim ({data_dim})")
        gen = torch.Generator().manual_seed(seed)
        scale = data_dim ** -0.5
        self.encoder_weight = nn.Parameter(scale * torch.randn(latent_dim, data_dim, generator=gen))
        self.decoder_weight = nn.Parameter(scale * torch.randn(data_dim, latent_dim, generator=gen))
        self.center = nn.Parameter(torch.zeros(data_dim))
        self.history_: list = []
        self.config = dict(model="LinearAutoencoder", data_dim=data_dim, latent_dim=latent_dim)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.center) @ self.encoder_weight.T

    def decode_raw(self, code: torch.Tensor) -> torch.Tensor:
        return code @ self.decoder_weight.T + self.center

    def decoder_subspace(self) -> torch.Tensor:
        """An orthonormal basis ``[p, d]`` of the decoder's column space (QR)."""
        q, _ = torch.linalg.qr(self.decoder_weight.detach())
        return q


class Autoencoder(_AutoencoderBase):
    """MLP autoencoder.

    Parameters
    ----------
    data_dim, latent_dim : int
    hidden : sequence of int
        Encoder widths (the decoder mirrors them).
    activation : str or nn.Module class
        See :func:`models.networks.mlp`.
    loss : {"mse", "bce"}
        Squared error, or Bernoulli cross-entropy on logits for data in [0, 1].
    """

    def __init__(self, data_dim: int, latent_dim: int, hidden: Sequence[int] = (200,),
                 activation="relu", loss: str = "mse"):
        super().__init__()
        self.data_dim = positive_int(data_dim, "data_dim")
        self.latent_dim = positive_int(latent_dim, "latent_dim")
        if loss not in ("mse", "bce"):
            raise ValueError(f"loss must be 'mse' or 'bce', got {loss!r}")
        self.loss = loss
        hidden = (hidden,) if isinstance(hidden, int) else tuple(hidden)
        self.encoder = mlp(data_dim, hidden, latent_dim, activation)
        self.decoder = mlp(latent_dim, tuple(reversed(hidden)), data_dim, activation)
        self.history_: list = []
        self.config = dict(model=type(self).__name__, data_dim=data_dim, latent_dim=latent_dim,
                           hidden=hidden, loss=loss)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode_raw(self, code: torch.Tensor) -> torch.Tensor:
        return self.decoder(code)


class DenoisingAutoencoder(Autoencoder):
    """An :class:`Autoencoder` trained to undo corruption of its inputs (Vincent et al. 2008).

    Parameters
    ----------
    noise : {"masking", "gaussian"}
        Masking noise zeroes each entry with probability ``noise_level``; Gaussian noise adds
        :math:`\\mathcal{N}(0, \\text{noise\\_level}^2)` to each entry.
    noise_level : float
        See ``noise``.
    Other parameters as :class:`Autoencoder`.
    """

    def __init__(self, data_dim: int, latent_dim: int, hidden: Sequence[int] = (200,),
                 activation="relu", loss: str = "mse", noise: str = "masking",
                 noise_level: float = 0.25):
        super().__init__(data_dim, latent_dim, hidden, activation, loss)
        if noise not in ("masking", "gaussian"):
            raise ValueError(f"noise must be 'masking' or 'gaussian', got {noise!r}")
        if noise == "masking" and not 0 <= noise_level < 1:
            raise ValueError(f"noise_level must be in [0, 1) for masking noise, got {noise_level!r}")
        if noise == "gaussian" and not noise_level >= 0:
            raise ValueError(f"noise_level must be >= 0 for Gaussian noise, got {noise_level!r}")
        self.noise, self.noise_level = noise, float(noise_level)
        self.config.update(noise=noise, noise_level=self.noise_level)

    def corrupt(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """A corrupted copy of ``x`` (see ``noise``)."""
        if self.noise == "masking":
            keep = torch.rand(x.shape, generator=generator).to(x.device) >= self.noise_level
            return x * keep.to(x)
        return x + self.noise_level * torch.randn(x.shape, generator=generator).to(x)
