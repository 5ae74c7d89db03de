"""A DLVM for clustering: a mixture prior with an explicit component latent.

Generative process (Dilokthanakul et al. 2016; Jiang et al. 2017, VaDE; the deep mixture
clustering of Harchaoui, Mattei, Bouveyron & Almansa 2018):

.. math::

    c_i \\sim \\mathrm{Cat}(\\pi), \\qquad
    z_i \\mid c_i \\sim \\mathcal{N}(m_{c_i}, \\operatorname{diag} s_{c_i}^2), \\qquad
    x_i \\mid z_i \\sim \\Phi(x_i \\mid f_\\theta(z_i)),

with the amortized Gaussian guide :math:`q_\\phi(z_i \\mid x_i)` of
:class:`pyro_lvm.models.dlvm.DLVM` and no guide for :math:`c` (it is summed out exactly).

Two forms of the same model:

* :meth:`ClusterDLVM.enumerated_model` has the component site ``"c"`` with
  ``infer={"enumerate": "parallel"}`` and is absent from the guide: Pyro's
  ``TraceEnum_ELBO`` sums it out exactly.
* :meth:`ClusterDLVM.model` (inherited from :class:`DLVM` with its mixture prior) scores
  :math:`\\log p(z) = \\operatorname{logsumexp}_c [\\log \\pi_c + \\log \\mathcal{N}(z; m_c,
  s_c)]` directly: the same sum over :math:`c`, done inside the density, which is the form the
  project's log weights (fitting, importance-sampled log-likelihoods, diagnostics) handle
  until they enumerate discrete sites themselves. Tests check that both forms give the same
  :math:`\\log p(x, z)`.

Cluster responsibilities come from the importance weights of the guide's draws:
since :math:`c \\perp x \\mid z`,

.. math::

    p(c \\mid x) = \\int p(c \\mid z)\\, p(z \\mid x)\\, dz
    \\approx \\sum_{k=1}^K \\bar w_k\\, p(c \\mid z_k), \\qquad
    \\bar w_k = \\frac{w_k}{\\sum_l w_l}, \\; w_k = \\frac{p(x, z_k)}{q(z_k \\mid x)}, \\;
    z_k \\sim q(\\cdot \\mid x),

a self-normalized importance sampling estimate (consistent as :math:`K \\to \\infty`), with
:math:`p(c \\mid z) \\propto \\pi_c \\mathcal{N}(z; m_c, s_c)`.

References
----------
Dilokthanakul, N. et al. (2016). Deep unsupervised clustering with Gaussian mixture variational
autoencoders. arXiv:1611.02648.
Jiang, Z., Zheng, Y., Tan, H., Tang, B. & Zhou, H. (2017). Variational deep embedding: an
unsupervised and generative approach to clustering. IJCAI.
Harchaoui, W., Mattei, P.-A., Bouveyron, C. & Almansa, A. (2018). Wasserstein adversarial
mixture clustering. (Deep mixture clustering on MNIST.)
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.nn import pyro_method

from . import validation
from .dlvm import DLVM
from .priors import MixturePrior, inverse_softplus

__all__ = ["ClusterDLVM"]


class ClusterDLVM(DLVM):
    """A :class:`DLVM` whose prior is a mixture of ``num_clusters`` diagonal Gaussians with an
    explicit component latent (see the module docstring).

    Parameters
    ----------
    data_dim, latent_dim : int
    num_clusters : int
        Number of mixture components :math:`C`.
    **kwargs
        Any other :class:`DLVM` argument (likelihood, hidden, likelihood_options, ...).
    """

    def __init__(self, data_dim: int, latent_dim: int, num_clusters: int = 10, **kwargs):
        if "prior" in kwargs or "num_components" in kwargs:
            raise ValueError("ClusterDLVM sets its own mixture prior; pass num_clusters")
        super().__init__(data_dim, latent_dim, prior="mixture", num_components=num_clusters,
                         **kwargs)
        assert isinstance(self.prior, MixturePrior)
        self.num_clusters = num_clusters
        self.config["model"] = "ClusterDLVM"

    # ------------------------------------------------------------------ the mixture
    def component_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """:math:`\\log \\pi_c + \\log \\mathcal{N}(z; m_c, \\operatorname{diag} s_c^2)` for each
        component, ``[..., C]`` for ``z`` ``[..., d]``; its logsumexp is :math:`\\log p(z)`."""
        weights, means, scales = self.prior.mixture_components()
        log_n = dist.Normal(means, scales).log_prob(z.unsqueeze(-2)).sum(-1)
        return torch.log_softmax(self.prior.logits, -1) + log_n

    @pyro_method
    def enumerated_model(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None):
        """The generative process with the component site ``"c"`` enumerated in parallel
        (absent from the guide): use with ``pyro.infer.TraceEnum_ELBO(max_plate_nesting=1)``
        and :meth:`guide`."""
        x, mask = self._observed(x, mask)
        if validation.per_call_data_checks():
            self.likelihood.check_data(x, mask)
        _, means, scales = self.prior.mixture_components()
        with pyro.plate("data", x.shape[0], dim=-1):
            c = pyro.sample("c", dist.Categorical(logits=self.prior.logits),
                            infer={"enumerate": "parallel"})
            z = pyro.sample("z", dist.Normal(means[c], scales[c]).to_event(1))
            px = self.likelihood.distribution(self.decoder(z))
            if mask is not None:
                px = px.mask(mask)
            pyro.sample("x", px.to_event(1), obs=x)
        return z

    # ------------------------------------------------------------------ clusters
    def responsibilities(self, x, mask=None, num_samples: int = 100, seed: int = 0,
                         rows_per_chunk: int = 512) -> torch.Tensor:
        """:math:`p(c \\mid x_i)` ``[n, C]`` by self-normalized importance sampling with
        ``num_samples`` draws from the guide per row (module docstring). Deterministic given
        ``seed``; the global random state is left untouched."""
        x = self.check_data(x, mask)
        mask_t = None if mask is None else torch.as_tensor(
            validation.check_mask(mask, tuple(x.shape)), device=x.device)
        device = next(self.parameters()).device
        out = []
        with torch.no_grad(), torch.random.fork_rng(devices=[] if device.type == "cpu"
                                                    else [device]):
            torch.manual_seed(seed)
            for start in range(0, x.shape[0], rows_per_chunk):
                xb = x[start:start + rows_per_chunk].to(device)
                mb = None if mask_t is None else mask_t[start:start + rows_per_chunk].to(device)
                out.append(self._responsibilities(xb, mb, num_samples))
        return torch.cat(out)

    def _responsibilities(self, x, mask, num_samples: int) -> torch.Tensor:
        x, mask = self._observed(x, mask)
        loc, scale = self._encode(x)
        z = dist.Normal(loc, scale).sample((num_samples,))            # [S, n, d]
        comp = self.component_log_prob(z)                              # [S, n, C]
        log_prior = torch.logsumexp(comp, -1)
        log_w = (self.likelihood.log_prob(x, self.decoder(z), mask) + log_prior
                 - dist.Normal(loc, scale).log_prob(z).sum(-1))        # [S, n]
        log_w_bar = log_w - torch.logsumexp(log_w, 0)
        log_c_given_z = comp - log_prior.unsqueeze(-1)
        return torch.logsumexp(log_w_bar.unsqueeze(-1) + log_c_given_z, 0).exp()

    def predict(self, x, mask=None, num_samples: int = 100, seed: int = 0) -> np.ndarray:
        """The most probable cluster :math:`\\arg\\max_c p(c \\mid x_i)` of each row."""
        return self.responsibilities(x, mask, num_samples, seed).argmax(-1).cpu().numpy()

    def init_clusters(self, x, seed: int = 0) -> "ClusterDLVM":
        """Start the mixture at a diagonal Gaussian mixture (scikit-learn, ``seed``) fitted to
        the encoder means of ``x``: the pre-training initialisation of VaDE (Jiang et al.
        2017), which keeps components from starting empty."""
        from sklearn.mixture import GaussianMixture

        with torch.no_grad():
            loc, _ = self.encode(self.check_data(x).to(next(self.parameters()).device))
        gmm = GaussianMixture(self.num_clusters, covariance_type="diag", random_state=seed,
                              reg_covar=1e-4).fit(loc.cpu().double().numpy())
        prior = self.prior
        like = prior.logits
        with torch.no_grad():
            prior.logits.copy_(torch.as_tensor(np.log(gmm.weights_), dtype=like.dtype))
            prior.means.copy_(torch.as_tensor(gmm.means_, dtype=like.dtype))
            sd = np.sqrt(gmm.covariances_) - prior.min_scale
            prior.raw_scales.copy_(inverse_softplus(torch.as_tensor(
                np.maximum(sd, 1e-3), dtype=like.dtype)))
        return self

    def extra_repr(self) -> str:
        return (f"data_dim={self.data_dim}, latent_dim={self.latent_dim}, "
                f"num_clusters={self.num_clusters}")
