"""A DLVM for clustering: a mixture prior with an explicit component latent.

Generative process (Dilokthanakul et al. 2016; Jiang et al. 2017, VaDE; the deep mixture
clustering of Harchaoui, Mattei, Bouveyron & Almansa 2018):

.. math::

    c_i \\sim \\mathrm{Cat}(\\pi), \\qquad
    z_i \\mid c_i \\sim \\mathcal{N}(m_{c_i}, \\Sigma_{c_i}), \\qquad
    x_i \\mid z_i \\sim \\Phi(x_i \\mid f_\\theta(z_i)),

with diagonal :math:`\\Sigma_c = \\operatorname{diag} s_c^2` (``covariance="diag"``) or full
:math:`\\Sigma_c = L_c L_c^\\top` (``covariance="full"``); and

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
:math:`p(c \\mid z) \\propto \\pi_c \\mathcal{N}(z; m_c, \\Sigma_c)`.

Fitting for clusters (:func:`fit_clusters`, after VaDE): pre-train with a down-weighted KL
term, start the mixture at k-means clusters of the encoder means, then train jointly.

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
from .priors import FullCovarianceMixturePrior, MixturePrior

__all__ = ["ClusterDLVM", "pretrain_clusters", "fit_clusters"]


class ClusterDLVM(DLVM):
    """A :class:`DLVM` whose prior is a mixture of ``num_clusters`` diagonal Gaussians with an
    explicit component latent (see the module docstring).

    Parameters
    ----------
    data_dim, latent_dim : int
    num_clusters : int
        Number of mixture components :math:`C`.
    covariance : {"diag", "full"}
        Component covariances :math:`\\operatorname{diag} s_c^2` (:class:`MixturePrior`) or
        full :math:`L_c L_c^\\top` (:class:`FullCovarianceMixturePrior`); the clustering
        recipe (:func:`fit_clusters`) uses ``"full"``.
    **kwargs
        Any other :class:`DLVM` argument (likelihood, hidden, likelihood_options, ...).
    """

    def __init__(self, data_dim: int, latent_dim: int, num_clusters: int = 10,
                 covariance: str = "diag", **kwargs):
        if "prior" in kwargs or "num_components" in kwargs:
            raise ValueError("ClusterDLVM sets its own mixture prior; pass num_clusters")
        if covariance not in ("diag", "full"):
            raise ValueError(f"covariance must be 'diag' or 'full', got {covariance!r}")
        super().__init__(data_dim, latent_dim, prior="mixture", num_components=num_clusters,
                         **kwargs)
        assert isinstance(self.prior, MixturePrior)
        if covariance == "full":
            self.prior = FullCovarianceMixturePrior(latent_dim, num_clusters)
        self.covariance = covariance
        self.num_clusters = num_clusters
        self.config["model"] = "ClusterDLVM"
        self.config["covariance"] = covariance

    # ------------------------------------------------------------------ the mixture
    def component_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """:math:`\\log \\pi_c + \\log \\mathcal{N}(z; m_c, \\Sigma_c)` for each component,
        ``[..., C]`` for ``z`` ``[..., d]``; its logsumexp is :math:`\\log p(z)`."""
        log_n = self.component_distribution().log_prob(z.unsqueeze(-2))
        return torch.log_softmax(self.prior.logits, -1) + log_n

    def component_distribution(self, index: Optional[torch.Tensor] = None):
        """:math:`p(z \\mid c)` for every component (batch ``[C]``) or, given a tensor of
        component indices, for those (batch ``index.shape``); event shape ``[d]``."""
        return self.prior.component_distribution(index)

    def component_draws(self, eps: torch.Tensor) -> torch.Tensor:
        """:math:`z = m_c + L_c \\varepsilon` for standard normal ``eps`` ``[..., C, d]``: a
        draw of :math:`z \\sim p(z \\mid c)` in column ``c`` (:math:`L_c = \\operatorname{diag}
        s_c` for diagonal components)."""
        return self.prior.component_draws(eps)

    @pyro_method
    def enumerated_model(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None):
        """The generative process with the component site ``"c"`` enumerated in parallel
        (absent from the guide): use with ``pyro.infer.TraceEnum_ELBO(max_plate_nesting=1)``
        and :meth:`guide`."""
        x, mask = self._observed(x, mask)
        if validation.per_call_data_checks():
            self.likelihood.check_data(x, mask)
        with pyro.plate("data", x.shape[0], dim=-1):
            c = pyro.sample("c", dist.Categorical(logits=self.prior.logits),
                            infer={"enumerate": "parallel"})
            z = pyro.sample("z", self.component_distribution(c))
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

    def init_clusters(self, x, seed: int = 0, method: str = "kmeans",
                      mask=None) -> "ClusterDLVM":
        """Start the mixture at clusters of the encoder means :math:`\\mu_\\phi(x_i)` of ``x``
        (scikit-learn, ``seed``): the pre-training initialisation of VaDE (Jiang et al. 2017),
        which keeps components from starting empty.

        ``method="kmeans"`` (default): k-means (``n_init=10``) on the encoder means; the weights
        are the cluster sizes, the means the centroids, the scales the per-coordinate standard
        deviations within each cluster. ``method="gmm"``: a diagonal ``GaussianMixture`` fitted
        to the encoder means (its weights, means and scales). On the digits the k-means start
        clusters better (benchmarks/README.md, section 6): a diagonal mixture fitted by EM in
        the latent space tends to let broad components swallow neighbouring digits.
        """
        if method not in ("kmeans", "gmm"):
            raise ValueError(f"init_clusters: method must be 'kmeans' or 'gmm', got {method!r}")
        device = next(self.parameters()).device
        x = self.check_data(x, mask)
        mask_t = None if mask is None else torch.as_tensor(
            validation.check_mask(mask, tuple(x.shape)), device=device)
        with torch.no_grad():
            loc, _ = self.encode(x.to(device), mask_t)
        loc = loc.cpu().double().numpy()
        full = self.covariance == "full"
        if method == "gmm":
            from sklearn.mixture import GaussianMixture

            gmm = GaussianMixture(self.num_clusters, covariance_type=self.covariance,
                                  random_state=seed, reg_covar=1e-4).fit(loc)
            weights, means, variances = gmm.weights_, gmm.means_, gmm.covariances_
        else:
            from sklearn.cluster import KMeans

            labels = KMeans(self.num_clusters, n_init=10, random_state=seed).fit_predict(loc)
            weights, means, variances = _cluster_moments(loc, labels, self.num_clusters, full)
        self.prior.set_components(weights, means, variances)
        return self

    def extra_repr(self) -> str:
        return (f"data_dim={self.data_dim}, latent_dim={self.latent_dim}, "
                f"num_clusters={self.num_clusters}")


#: The recipe's defaults (chosen once on the digits, benchmarks/README.md section 6).
PRETRAIN_EPOCHS, PRETRAIN_BETA, PRETRAIN_LR = 30, 0.1, 3e-3


def pretrain_clusters(model: ClusterDLVM, x, *, epochs: int = PRETRAIN_EPOCHS,
                      beta: float = PRETRAIN_BETA, lr: float = PRETRAIN_LR,
                      batch_size: int = 128, seed: int = 0, init: str = "kmeans", mask=None,
                      device="cpu", progress: bool = False, callbacks=None):
    """The first two steps of the VaDE-style recipe (Jiang et al. 2017): pre-train, then start
    the mixture at clusters of the latent means.

    1. Fit ``model`` for ``epochs`` epochs on the ELBO with the KL term weighted by ``beta``
       (:class:`pyro_lvm.inference.objectives.ELBO`): with ``beta`` well below 1 this is
       close to the autoencoder pre-training of VaDE, so that the encoder means spread the
       rows out before any cluster is fixed (Higgins et al. 2017 for the KL weight).
    2. :meth:`ClusterDLVM.init_clusters` (``init``, ``seed``) on the encoder means of ``x``.

    Returns the :class:`pyro_lvm.inference.training.FitResult` of step 1. The labels are never used.
    """
    from pyro_lvm.inference.training import fit
    from pyro_lvm.inference.objectives import ELBO

    result = fit(model, x, objective=ELBO(beta=beta), epochs=epochs, batch_size=batch_size,
                 lr=lr, seed=seed, device=device, mask=mask, progress=progress,
                 callbacks=callbacks)
    model.init_clusters(x, seed=seed, method=init, mask=mask)
    return result


def fit_clusters(model: ClusterDLVM, x, *, epochs: int = 30, lr: float = 2e-3,
                 pretrain_epochs: int = PRETRAIN_EPOCHS, pretrain_beta: float = PRETRAIN_BETA,
                 pretrain_lr: float = PRETRAIN_LR, batch_size: int = 128, seed: int = 0,
                 init: str = "kmeans", mask=None, device="cpu", progress: bool = False):
    """The whole VaDE-style recipe: :func:`pretrain_clusters`, then ``epochs`` epochs of the
    ELBO (``beta`` = 1) with the mixture prior, every parameter trained jointly.

    Returns ``(pretrain_result, joint_result)``, two FitResults (histories of both phases).
    """
    from pyro_lvm.inference.training import fit
    from pyro_lvm.inference.objectives import ELBO

    pre = pretrain_clusters(model, x, epochs=pretrain_epochs, beta=pretrain_beta,
                            lr=pretrain_lr, batch_size=batch_size, seed=seed, init=init,
                            mask=mask, device=device, progress=progress)
    joint = fit(model, x, objective=ELBO(), epochs=epochs, batch_size=batch_size, lr=lr,
                seed=seed, device=device, mask=mask, progress=progress)
    return pre, joint


def _cluster_moments(points: np.ndarray, labels: np.ndarray, num_clusters: int,
                     full: bool = False):
    """Weights (sizes / n), means and variances of each cluster of ``points`` ``[n, d]``:
    per coordinate ``[C, d]``, or (``full``) covariance matrices ``[C, d, d]``, plus 1e-4 on
    the diagonal (the ``reg_covar`` of the GMM start). An empty or one-row cluster gets the
    overall mean and (co)variance (and a tiny weight when empty)."""
    n, d = points.shape
    weights = np.empty(num_clusters)
    means = np.empty((num_clusters, d))
    variances = np.empty((num_clusters, d, d) if full else (num_clusters, d))
    for k in range(num_clusters):
        members = points[labels == k]
        weights[k] = max(len(members), 1e-3) / n
        if len(members) < 2:
            members = points
        means[k] = members.mean(0)
        if full:
            variances[k] = np.cov(members, rowvar=False, bias=True) + 1e-4 * np.eye(d)
        else:
            variances[k] = members.var(0) + 1e-4
    return weights / weights.sum(), means, variances
