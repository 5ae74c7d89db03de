r"""Linear Gaussian latent variable models: factor analysis and probabilistic PCA.

Generative processes
--------------------
For a latent :math:`z \in \mathbb{R}^d` and an observation :math:`x \in \mathbb{R}^p`
(:math:`d < p`):

**Factor analysis** (Rubin & Thayer 1982)

.. math::

    z &\sim \mathcal{N}(0, I_d), \\
    x \mid z &\sim \mathcal{N}(W z + \mu,\; \Psi), \qquad
    \Psi = \operatorname{diag}(\psi_1, \dots, \psi_p),\; \psi_j > 0,

**Probabilistic PCA** (Tipping & Bishop 1999): the same with :math:`\Psi = \sigma^2 I_p`.

Both are linear-Gaussian, so everything is available in closed form:

* marginal :math:`x \sim \mathcal{N}(\mu, C)`, :math:`C = W W^\top + \Psi`;
* posterior :math:`z \mid x \sim \mathcal{N}\big(\Sigma W^\top \Psi^{-1} (x - \mu),\, \Sigma\big)`,
  :math:`\Sigma = (I_d + W^\top \Psi^{-1} W)^{-1}`; the covariance does not depend on
  :math:`x` and the mean is affine in :math:`x`, so the amortized guide
  :math:`q(z \mid x) = \mathcal{N}(A x + b, S S^\top)` contains the exact posterior
  (``A = \Sigma W^\top \Psi^{-1}``, ``b = -A\mu``, ``S = \operatorname{chol}\Sigma``) and with
  it the ELBO equals :math:`\log p(x)` for every draw of :math:`z`;
* missing entries (``mask`` False) are marginalized exactly: the observed coordinates
  :math:`o` of a row follow :math:`\mathcal{N}(\mu_o, W_o W_o^\top + \Psi_o)`.

:math:`\log p(x)` is computed with the matrix determinant lemma and the Woodbury identity
through one :math:`d \times d` Cholesky factor of
:math:`M = I_d + W^\top \Psi^{-1} W`; no :math:`p \times p` matrix is formed or inverted:

.. math::

    \log\det C = \textstyle\sum_j \log\psi_j + \log\det M, \qquad
    r^\top C^{-1} r = \lVert \Psi^{-1/2} r \rVert^2
        - \lVert L^{-1} W^\top \Psi^{-1} r \rVert^2, \quad M = L L^\top .

References
----------
* M. E. Tipping and C. M. Bishop (1999). Probabilistic principal component analysis.
  *J. R. Statist. Soc. B* 61(3), 611-622.
* D. B. Rubin and D. T. Thayer (1982). EM algorithms for ML factor analysis.
  *Psychometrika* 47(1), 69-76.
* C. M. Bishop (2006). *Pattern Recognition and Machine Learning*, chapter 12
  (continuous latent variables).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.nn import PyroModule, PyroParam, pyro_method
from tqdm.auto import tqdm

from pyro_lvm.models import validation
from pyro_lvm.models.base import unique_module_name

__all__ = ["FactorAnalysis", "PPCA", "GaussianConditional"]

_LOG_2PI = math.log(2.0 * math.pi)
# Rows of a masked batch processed at once when per-row d x d factors are gathered;
# bounds memory at about this many d x d matrices.
_MASK_CHUNK_ROWS = 4096


def _woodbury_factor(loading: torch.Tensor, noise_variance: torch.Tensor,
                     pattern: Optional[torch.Tensor] = None):
    r"""Whitened loading and Cholesky factor(s) of :math:`M = I + W^\top \Psi^{-1} W`.

    Returns ``(whitened, chol)`` with ``whitened = \Psi^{-1/2} W`` ``[p, d]`` and ``chol`` the
    lower Cholesky factor of ``M`` (``[d, d]``), or, when ``pattern`` (``[G, p]``, 0/1 for
    observed coordinates) is given, of :math:`M_g = I + W_o^\top \Psi_o^{-1} W_o` per
    pattern (``[G, d, d]``).
    """
    d = loading.shape[-1]
    whitened = loading / noise_variance.sqrt().unsqueeze(-1)
    eye = torch.eye(d, dtype=loading.dtype, device=loading.device)
    if pattern is None:
        precision = eye + whitened.T @ whitened
    else:
        precision = eye + torch.einsum("gp,pd,pe->gde", pattern, whitened, whitened)
    return whitened, torch.linalg.cholesky(precision)


def _floating_dtype_of(x) -> Optional[torch.dtype]:
    """torch dtype of a floating tensor or numpy array; None for anything else."""
    if isinstance(x, torch.Tensor):
        return x.dtype if x.is_floating_point() else None
    source = getattr(x, "dtype", None)
    if source is None:
        return None
    try:
        np_dtype = np.dtype(source)
    except TypeError:  # e.g. a pandas extension dtype
        return None
    return {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32,
            np.dtype(np.float64): torch.float64}.get(np_dtype)


class _LinearGaussianLVM(PyroModule):
    """Shared machinery of :class:`FactorAnalysis` and :class:`PPCA` (see the module docstring).

    Subclasses define the ``noise_variance`` parameter and :meth:`_noise_diag`.
    """

    _isotropic = False
    _default_em_init = "pca"

    def __init__(self, data_dim: int, latent_dim: int, guide_covariance: str = "full"):
        super().__init__(name=unique_module_name(type(self).__name__))
        name = type(self).__name__
        for arg, val in (("data_dim", data_dim), ("latent_dim", latent_dim)):
            if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
                raise ValueError(f"{name}: {arg} must be a positive integer, got {val!r}")
        if latent_dim >= data_dim:
            raise ValueError(
                f"{name}: latent_dim={latent_dim} must be smaller than data_dim={data_dim} "
                f"(with d >= p the linear-Gaussian model is not identified; "
                f"a full-rank Gaussian needs no latent variables)"
            )
        if guide_covariance not in ("full", "diag"):
            raise ValueError(
                f"{name}: guide_covariance must be 'full' or 'diag', got {guide_covariance!r}"
            )
        self.data_dim = int(data_dim)
        self.latent_dim = int(latent_dim)
        self.guide_covariance = guide_covariance
        dtype = torch.get_default_dtype()
        p, d = self.data_dim, self.latent_dim
        self.register_buffer("_prior_loc", torch.zeros(d, dtype=dtype))
        self.register_buffer("_prior_scale", torch.ones(d, dtype=dtype))
        # Small random loadings break the rotational symmetry at W = 0 (a saddle of the
        # likelihood) while keeping the initial model close to N(0, I) for standardized data.
        self.loading = PyroParam(0.1 * torch.randn(p, d, dtype=dtype))
        self.mean = PyroParam(torch.zeros(p, dtype=dtype))
        self._init_noise(dtype)
        self.guide_weight = PyroParam(torch.zeros(d, p, dtype=dtype))
        self.guide_bias = PyroParam(torch.zeros(d, dtype=dtype))
        if guide_covariance == "full":
            self.guide_scale_tril = PyroParam(torch.eye(d, dtype=dtype),
                                              constraint=constraints.lower_cholesky)
        else:
            self.guide_scale = PyroParam(torch.ones(d, dtype=dtype),
                                         constraint=constraints.positive)
        # The guide starts at the exact posterior of the initial model, which is close to the
        # prior because the loadings are small.
        self.set_guide_to_posterior()

    # ------------------------------------------------------------------ parameters
    def _init_noise(self, dtype):  # pragma: no cover - abstract
        raise NotImplementedError

    def _noise_diag(self, noise_variance: torch.Tensor) -> torch.Tensor:
        """Diagonal of Psi as a ``[p]`` tensor from the ``noise_variance`` parameter."""
        return noise_variance.expand(self.data_dim)

    @property
    def _dtype(self) -> torch.dtype:
        return self._prior_loc.dtype

    @property
    def _device(self) -> torch.device:
        return self._prior_loc.device

    def _params(self, dtype: Optional[torch.dtype] = None):
        """(W [p,d], mu [p], Psi diagonal [p]) read module-locally (no param-store sync)."""
        W, mu, psi = self.loading, self.mean, self._noise_diag(self.noise_variance)
        if dtype is not None:
            W, mu, psi = W.to(dtype), mu.to(dtype), psi.to(dtype)
        return W, mu, psi

    def extra_repr(self) -> str:
        return (f"data_dim={self.data_dim}, latent_dim={self.latent_dim}, "
                f"guide_covariance={self.guide_covariance!r}")

    # ------------------------------------------------------------------ validation
    def check_data(self, x, mask=None, *, min_rows: int = 1, name: str = "data") -> torch.Tensor:
        """Validate ``x`` (and ``mask``) for this model and return it as a tensor in the
        module's dtype and on its device (masked entries are set to 0).

        Raises
        ------
        ValueError
            Non-numeric data, wrong number of columns (must be ``data_dim``), fewer than
            ``min_rows`` rows, NaN/inf in observed entries (with row and column).
        """
        out = validation.check_data(x, self.data_dim, name=name, min_rows=min_rows, mask=mask,
                                    dtype=self._dtype)
        return out.to(self._device)

    def _check_eval_input(self, x, mask=None, name: str = "x"):
        """Validate for an evaluation method; compute in the wider of data and module dtype."""
        src = _floating_dtype_of(x)
        dtype = torch.promote_types(src, self._dtype) if src is not None else self._dtype
        x = validation.check_data(x, self.data_dim, name=name, mask=mask, dtype=dtype)
        x = x.to(self._device)
        if mask is not None:
            mask = torch.as_tensor(mask, device=self._device).bool()
        return x, mask, dtype

    # ------------------------------------------------------------------ Pyro model/guide
    @pyro_method
    def model(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None):
        r"""Generative model :math:`p(z)\,p(x \mid z)`; sites ``"z"`` (event ``[d]``) and ``"x"``
        (observed, event ``[p]``), both in ``pyro.plate("data", n, dim=-1)``.

        Entries with ``mask`` False do not enter the likelihood (their values are ignored and
        may be NaN). Broadcasts over leading (particle) dimensions of ``z``.
        """
        W = self.loading
        mu = self.mean
        scale = self._noise_diag(self.noise_variance).sqrt()
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", dist.Normal(self._prior_loc, self._prior_scale).to_event(1))
            loc = z @ W.T + mu
            obs_dist = dist.Normal(loc, scale)
            if mask is not None:
                x = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
                obs_dist = obs_dist.mask(mask)
            pyro.sample("x", obs_dist.to_event(1), obs=x)
        return z

    @pyro_method
    def guide(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None):
        r"""Amortized guide :math:`q(z \mid x) = \mathcal{N}(A \tilde x + b, S S^\top)`
        (full ``S``, or diagonal for ``guide_covariance="diag"``).

        :math:`\tilde x` is ``x`` with missing entries (``mask`` False) replaced by the model
        mean :math:`\mu` (detached), so they carry no information. For fully observed rows the
        family contains the exact posterior; for rows with missing entries the exact posterior
        covariance depends on the missingness pattern, so the guide is an approximation there.
        """
        A = self.guide_weight
        b = self.guide_bias
        if mask is not None:
            x = torch.where(mask, x, self.mean.detach().to(x.dtype))
        with pyro.plate("data", x.shape[0], dim=-1):
            return pyro.sample("z", self.guide_distribution(x @ A.T + b))

    def guide_distribution(self, loc: torch.Tensor) -> dist.TorchDistribution:
        """:math:`\\mathcal{N}(\\mathrm{loc}, S S^\\top)` with the guide's full or diagonal scale."""
        if self.guide_covariance == "full":
            return dist.MultivariateNormal(loc, scale_tril=self.guide_scale_tril)
        return dist.Normal(loc, self.guide_scale).to_event(1)

    # ------------------------------------------------------------------ exact quantities
    def log_marginal(self, x, mask=None) -> torch.Tensor:
        r"""Exact per-row log-likelihood :math:`\log \mathcal{N}(x_i; \mu, W W^\top + \Psi)`.

        With ``mask`` (bool ``[n, p]``, True = observed), each row's missing coordinates are
        marginalized out: :math:`\log \mathcal{N}(x_{i,o}; \mu_o, W_o W_o^\top + \Psi_o)`.
        Rows are grouped by missingness pattern, so one :math:`d \times d` Cholesky factor is
        computed per distinct pattern. Computed in the wider of the data's and the module's
        floating dtype; differentiable in the parameters.

        Returns
        -------
        torch.Tensor, shape ``[n]``
        """
        x, mask, dtype = self._check_eval_input(x, mask)
        W, mu, psi = self._params(dtype)
        resid = x - mu
        if mask is None:
            whitened, chol = _woodbury_factor(W, psi)
            r_white = resid / psi.sqrt()
            proj = torch.linalg.solve_triangular(chol, (r_white @ whitened).T, upper=False)
            quad = r_white.pow(2).sum(-1) - proj.pow(2).sum(0)
            logdet = psi.log().sum() + 2.0 * chol.diagonal().log().sum()
            return -0.5 * (self.data_dim * _LOG_2PI + logdet + quad)
        patterns, inverse = torch.unique(mask, dim=0, return_inverse=True)
        pattern = patterns.to(dtype)
        whitened, chol = _woodbury_factor(W, psi, pattern)
        logdet = (pattern * psi.log()).sum(-1) + 2.0 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        r_white = mask.to(dtype) * resid / psi.sqrt()
        rhs = r_white @ whitened  # [n, d]; missing coordinates contribute nothing
        reduction = torch.empty(x.shape[0], dtype=dtype, device=x.device)
        for start in range(0, x.shape[0], _MASK_CHUNK_ROWS):
            rows = slice(start, start + _MASK_CHUNK_ROWS)
            proj = torch.linalg.solve_triangular(chol[inverse[rows]], rhs[rows].unsqueeze(-1),
                                                 upper=False)
            reduction[rows] = proj.squeeze(-1).pow(2).sum(-1)
        quad = r_white.pow(2).sum(-1) - reduction
        num_observed = mask.sum(-1).to(dtype)
        return -0.5 * (num_observed * _LOG_2PI + logdet[inverse] + quad)

    def posterior(self, x, mask=None) -> torch.distributions.MultivariateNormal:
        r"""Exact posterior :math:`p(z \mid x_i) = \mathcal{N}(\Sigma W^\top \Psi^{-1}(x_i - \mu),
        \Sigma)` with :math:`\Sigma = (I + W^\top \Psi^{-1} W)^{-1}`, one per row.

        With ``mask``, the posterior given each row's observed coordinates
        (:math:`W_o, \Psi_o, \mu_o`).

        Returns
        -------
        torch.distributions.MultivariateNormal
            batch shape ``[n]``, event shape ``[d]``.
        """
        x, mask, dtype = self._check_eval_input(x, mask)
        W, mu, psi = self._params(dtype)
        resid = x - mu
        if mask is None:
            whitened, chol = _woodbury_factor(W, psi)
            rhs = (resid / psi.sqrt()) @ whitened  # W^T Psi^{-1} (x - mu), [n, d]
            loc = torch.cholesky_solve(rhs.T, chol).T
            cov = torch.cholesky_inverse(chol)
            return torch.distributions.MultivariateNormal(
                loc, scale_tril=torch.linalg.cholesky(cov))
        patterns, inverse = torch.unique(mask, dim=0, return_inverse=True)
        whitened, chol = _woodbury_factor(W, psi, patterns.to(dtype))
        rhs = (mask.to(dtype) * resid / psi.sqrt()) @ whitened
        cov = torch.cholesky_inverse(chol)
        loc = (cov[inverse] @ rhs.unsqueeze(-1)).squeeze(-1)
        return torch.distributions.MultivariateNormal(
            loc, scale_tril=torch.linalg.cholesky(cov)[inverse])

    @torch.no_grad()
    def conditional(self, x, mask, *, covariance: bool = True) -> "GaussianConditional":
        r"""Exact conditional distribution of each row's missing entries given its observed ones.

        For a row with observed coordinates :math:`o` and missing :math:`m` (``mask`` False),
        :math:`x_m \mid x_o \sim \mathcal{N}(\mu_m + C_{mo} C_{oo}^{-1}(x_o - \mu_o),\;
        C_{mm} - C_{mo} C_{oo}^{-1} C_{om})` with :math:`C = W W^\top + \Psi` (the Schur
        complement). It is computed through the latent posterior given the observed entries,
        :math:`z \mid x_o \sim \mathcal{N}(m_o, \Sigma_o)` (:meth:`posterior`), since
        :math:`x_m = W_m z + \mu_m + \varepsilon_m` with :math:`\varepsilon_m \perp z`:

        .. math::

            E[x_m \mid x_o] = W_m m_o + \mu_m, \qquad
            \operatorname{Cov}(x_m \mid x_o) = W_m \Sigma_o W_m^\top + \Psi_m,

        one :math:`d \times d` factor per missingness pattern and no :math:`p \times p` inverse.

        Parameters
        ----------
        x : array-like or tensor ``[n, p]``
            Data; entries where ``mask`` is False are ignored (may be NaN).
        mask : bool array-like ``[n, p]``
            True = observed. Every row needs at least one observed entry.
        covariance : bool
            Also form the ``[n, p, p]`` covariance (memory :math:`n p^2`); the mean, the
            variances and :meth:`GaussianConditional.sample` never need it.

        Returns
        -------
        GaussianConditional
            ``mean`` ``[n, p]`` (observed entries equal to ``x``, missing ones the conditional
            mean), ``variance`` ``[n, p]`` (0 at observed entries), ``covariance``
            ``[n, p, p]`` or None (rows/columns of observed entries are 0), ``mask``, and
            ``sample(num_draws, seed)`` drawing completed rows ``[M, n, p]``.
        """
        if mask is None:
            raise ValueError(f"{type(self).__name__}.conditional needs mask= (bool, True = "
                             f"observed) marking the entries to condition on")
        x, mask, dtype = self._check_eval_input(x, mask)
        post = self.posterior(x, mask)
        W, mu, psi = self._params(dtype)
        missing = (~mask).to(dtype)
        completed = torch.where(mask, x, post.mean @ W.T + mu)
        # W Sigma_o W^T diagonal: ||(W L_o)_j||^2 row-wise, with Sigma_o = L_o L_o^T
        WL = torch.einsum("pd,nde->npe", W, post.scale_tril)
        variance = (WL.pow(2).sum(-1) + psi) * missing
        cov = None
        if covariance:
            cov = WL @ WL.transpose(-1, -2) + torch.diag_embed(psi.expand_as(x))
            cov = cov * missing.unsqueeze(-1) * missing.unsqueeze(-2)
        return GaussianConditional(mean=completed, variance=variance, covariance=cov, mask=mask,
                                   _loading=W, _location=mu, _noise_variance=psi,
                                   _posterior=post)

    def covariance(self) -> torch.Tensor:
        r"""Marginal covariance :math:`C = W W^\top + \Psi`, ``[p, p]`` (detached)."""
        with torch.no_grad():
            W, _, psi = self._params()
            return W @ W.T + torch.diag(psi)

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        r"""Draw ``n`` rows :math:`x = W z + \mu + \Psi^{1/2}\varepsilon`, ``[n, p]``
        (uses torch's global RNG, seeded by ``pyro.set_rng_seed``)."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"sample: n must be a positive integer, got {n!r}")
        W, mu, psi = self._params()
        z = torch.randn(n, self.latent_dim, dtype=W.dtype, device=W.device)
        eps = torch.randn(n, self.data_dim, dtype=W.dtype, device=W.device)
        return z @ W.T + mu + eps * psi.sqrt()

    @torch.no_grad()
    def encode(self, x, mask=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Exact posterior mean ``[n, d]`` and posterior marginal standard deviations ``[n, d]``."""
        post = self.posterior(x, mask)
        std = post.covariance_matrix.diagonal(dim1=-2, dim2=-1).sqrt()
        return post.mean, std.expand_as(post.mean)

    @torch.no_grad()
    def reconstruct(self, x, mask=None) -> torch.Tensor:
        r""":math:`W\,E[z \mid x] + \mu`, ``[n, p]`` (with ``mask``: the conditional-mean
        reconstruction from the observed coordinates, which also imputes the missing ones)."""
        loc, _ = self.encode(x, mask)
        W, mu, _ = self._params(loc.dtype)
        return loc @ W.T + mu

    # ------------------------------------------------------------------ guide <- posterior
    @torch.no_grad()
    def set_guide_to_posterior(self, rotate: bool = True):
        r"""Set the guide to the exact posterior of the current model (fully observed rows).

        :math:`A = \Sigma W^\top \Psi^{-1}`, :math:`b = -A\mu`, :math:`S = \operatorname{chol}
        \Sigma`. The ELBO then equals :math:`\log p(x)` for every draw.

        For ``guide_covariance="diag"`` the guide is exact only when :math:`\Sigma` is
        diagonal, i.e. when :math:`W^\top \Psi^{-1} W` is diagonal. If it is not and
        ``rotate`` is True, the loading is first rotated, :math:`W \leftarrow W R` with
        :math:`R` the eigenvectors of :math:`W^\top \Psi^{-1} W` (largest eigenvalue first);
        :math:`W W^\top` and hence :math:`p(x)` are unchanged (the prior is rotation invariant),
        and the diagonal guide becomes exact. With ``rotate=False`` the diagonal scale is set
        to :math:`\sqrt{\operatorname{diag}\Sigma}` (not exact).

        Returns ``self``.
        """
        W, mu, psi = self._params(torch.float64)
        if self.guide_covariance == "diag" and rotate:
            gram = (W / psi.unsqueeze(-1)).T @ W
            off = gram - torch.diag(gram.diagonal())
            if off.abs().max() > 1e-12 * gram.diagonal().abs().max().clamp_min(1e-300):
                _, vecs = torch.linalg.eigh(gram)
                W = W @ vecs.flip(-1)
                self._assign(loading=W)
        whitened, chol = _woodbury_factor(W, psi)
        cov = torch.cholesky_inverse(chol)
        A = cov @ (whitened / psi.sqrt().unsqueeze(-1)).T  # Sigma W^T Psi^{-1}, [d, p]
        self._assign(guide_weight=A, guide_bias=-(A @ mu))
        if self.guide_covariance == "full":
            self._assign(guide_scale_tril=torch.linalg.cholesky(cov))
        else:
            self._assign(guide_scale=cov.diagonal().sqrt())
        return self

    # ------------------------------------------------------------------ fitting
    def _sample_moments(self, X):
        """Validated data (>= 2 rows) -> (mean [p], 1/N covariance [p, p]) in float64, CPU."""
        X = validation.check_data(X, self.data_dim, name="X", min_rows=2,
                                  dtype=torch.float64).detach().cpu()
        mu = X.mean(0)
        Xc = X - mu
        S = Xc.T @ Xc / X.shape[0]
        return mu, (S + S.T) / 2

    def _assign(self, **values: torch.Tensor) -> None:
        """Overwrite parameter values (computed in float64, possibly on another device) in
        the module's dtype and on its device, keeping the Parameter objects."""
        for name, value in values.items():
            setattr(self, name, value.detach().to(dtype=self._dtype, device=self._device))

    def _set_fitted(self, W: torch.Tensor, mu: torch.Tensor, noise: torch.Tensor):
        self._assign(loading=W, mean=mu, noise_variance=noise)

    def fit_em(self, X, tol: float = 1e-8, max_iter: int = 10000, progress: bool = True,
               init: Optional[str] = None):
        r"""Maximum-likelihood fit by EM (Rubin & Thayer 1982; isotropic M-step for PPCA,
        Tipping & Bishop 1999 sect. 3.2).

        ``init="pca"`` starts from the PPCA closed-form solution (the default for factor
        analysis), ``init="current"`` from the module's current loading and noise variance
        (the default for PPCA, whose closed form is already the optimum).

        With :math:`S` the :math:`1/N` sample covariance, :math:`\mu` the sample mean and
        :math:`\beta = \Sigma W^\top \Psi^{-1}` (E-step),

        .. math::

            E_{zz} = \Sigma + \beta S \beta^\top, \quad
            W \leftarrow S \beta^\top E_{zz}^{-1}, \quad
            \Psi \leftarrow \operatorname{diag}(S - W \beta S)

        (for PPCA :math:`\sigma^2` is the mean of that diagonal). Iterates until the mean
        log-likelihood per row increases by less than ``tol``; each iteration costs
        :math:`O(p^2 d)` and no :math:`p \times p` inverse. Computed in float64.

        Sets ``em_history_`` (mean log-likelihood per row, starting point first; EM makes it
        non-decreasing up to rounding), ``converged_`` and ``n_iter_``, sets the guide to the
        exact posterior, and warns (UserWarning) when ``max_iter`` is reached first.

        Returns ``self``.
        """
        if not (isinstance(tol, (int, float)) and tol > 0):
            raise ValueError(f"fit_em: tol must be a positive number, got {tol!r}")
        if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
            raise ValueError(f"fit_em: max_iter must be a positive integer, got {max_iter!r}")
        init = self._default_em_init if init is None else init
        if init not in ("pca", "current"):
            raise ValueError(f"fit_em: init must be 'pca' or 'current', got {init!r}")
        mu, S = self._sample_moments(X)
        variances = S.diagonal()
        if not self._isotropic:
            const = torch.nonzero(variances <= 1e-12 * variances.max().clamp_min(1e-300))
            if len(const):
                cols = const.flatten().tolist()
                raise ValueError(
                    f"{type(self).__name__}.fit_em: column(s) {cols[:10]} of X are constant "
                    f"(zero variance); the factor-analysis likelihood is unbounded there "
                    f"(psi_j -> 0). Drop constant columns."
                )
        if init == "pca":
            W, sigma2 = _ppca_closed_form(S, self.latent_dim,
                                          f"{type(self).__name__}.fit_em (init='pca')")
            psi = sigma2.expand(self.data_dim).clone()
        else:
            W, _, psi = (t.detach().cpu().clone() for t in self._params(torch.float64))
        # Heywood cases (psi_j -> 0) would make the likelihood unbounded; keep psi_j positive.
        floor = 1e-12 * variances.clamp_min(variances.max() * 1e-12)
        history: List[float] = [_mean_loglik(S, W, psi)]
        converged = False
        bar = tqdm(total=max_iter, desc=f"{type(self).__name__} EM", disable=not progress,
                   leave=False)
        # Each iteration is a handful of p x p / d x d operations: for moderate p, thread
        # start-up and contention dominate (measured 30x slower with 2 threads on a busy
        # 2-core machine), so run single-threaded and restore the setting afterwards.
        num_threads = torch.get_num_threads()
        single_thread = self.data_dim <= 256
        if single_thread:
            torch.set_num_threads(1)
        try:
            for _ in range(max_iter):
                _, chol = _woodbury_factor(W, psi)
                cov = torch.cholesky_inverse(chol)
                beta = cov @ (W / psi.unsqueeze(-1)).T  # [d, p]
                S_beta = S @ beta.T  # [p, d]
                Ezz = cov + beta @ S_beta
                W = torch.linalg.solve(Ezz, S_beta.T).T  # S beta^T Ezz^{-1} (Ezz symmetric)
                psi = variances - (W * S_beta).sum(-1)
                if self._isotropic:
                    psi = psi.mean().expand(self.data_dim).clone()
                psi = torch.maximum(psi, floor)
                history.append(_mean_loglik(S, W, psi))
                bar.update(1)
                increase = history[-1] - history[-2]
                if len(history) % 50 == 0:
                    bar.set_postfix(loglik=f"{history[-1]:.6f}", increase=f"{increase:.2e}")
                if increase < tol:
                    converged = True
                    break
        finally:
            bar.close()
            if single_thread:
                torch.set_num_threads(num_threads)
        noise = psi[:1].reshape(()) if self._isotropic else psi
        self._set_fitted(W, mu, noise)
        self.em_history_ = history
        self.converged_ = converged
        self.n_iter_ = len(history) - 1
        if not converged:
            warnings.warn(
                f"{type(self).__name__}.fit_em did not converge in max_iter={max_iter} "
                f"iterations: the last increase of the mean log-likelihood per row was "
                f"{history[-1] - history[-2]:.3e} >= tol={tol:g}; increase max_iter",
                UserWarning, stacklevel=2,
            )
        self.set_guide_to_posterior()
        return self


@dataclass
class GaussianConditional:
    """Exact Gaussian conditional of the missing entries of each row (see
    :meth:`FactorAnalysis.conditional`). Tensors are ``[n, p]`` (``covariance`` ``[n, p, p]``);
    observed entries carry their data value, variance 0 and covariance 0."""

    mean: torch.Tensor
    variance: torch.Tensor
    covariance: Optional[torch.Tensor]
    mask: torch.Tensor
    _loading: torch.Tensor = field(repr=False)
    _location: torch.Tensor = field(repr=False)
    _noise_variance: torch.Tensor = field(repr=False)
    _posterior: torch.distributions.MultivariateNormal = field(repr=False)

    @torch.no_grad()
    def sample(self, num_draws: int, seed: Optional[int] = None) -> torch.Tensor:
        r"""``num_draws`` completed data sets ``[M, n, p]``: observed entries as given, missing
        ones drawn exactly from :math:`p(x_m \mid x_o)` as
        :math:`W_m z + \mu_m + \Psi_m^{1/2}\varepsilon`, :math:`z \sim p(z \mid x_o)`
        (a ``torch.Generator`` seeded with ``seed``, or torch's global RNG when None)."""
        if isinstance(num_draws, bool) or not isinstance(num_draws, (int, np.integer)) \
                or num_draws < 1:
            raise ValueError(f"num_draws must be a positive integer, got {num_draws!r}")
        post, W, psi = self._posterior, self._loading, self._noise_variance
        gen = None
        if seed is not None:
            gen = torch.Generator(device=W.device).manual_seed(int(seed))
        n, d = post.mean.shape
        eps_z = torch.randn((num_draws, n, d), generator=gen, dtype=W.dtype, device=W.device)
        eps_x = torch.randn((num_draws,) + tuple(self.mean.shape), generator=gen,
                            dtype=W.dtype, device=W.device)
        z = post.mean + (post.scale_tril @ eps_z.unsqueeze(-1)).squeeze(-1)
        draws = z @ W.T + self._location + eps_x * psi.sqrt()
        return torch.where(self.mask, self.mean, draws)


def _ppca_closed_form(S: torch.Tensor, q: int, who: str = "PPCA"):
    r"""Tipping-Bishop ML solution from a 1/N covariance: ``(W [p, q], sigma2 [])``."""
    evals, evecs = torch.linalg.eigh(S)
    evals, evecs = evals.flip(0), evecs.flip(1)  # descending
    sigma2 = evals[q:].mean()
    if not sigma2 > 1e-12 * evals[0]:
        raise ValueError(
            f"{who}: the mean of the {S.shape[0] - q} smallest eigenvalues of the sample "
            f"covariance is {float(sigma2):.3g}, i.e. the data lie (numerically) in a "
            f"{q}-dimensional subspace and the ML noise variance is 0; reduce latent_dim "
            f"or use data with full-rank covariance (more rows than columns)"
        )
    W = evecs[:, :q] * (evals[:q] - sigma2).clamp_min(0.0).sqrt()
    return W, sigma2


def _mean_loglik(S: torch.Tensor, W: torch.Tensor, psi: torch.Tensor) -> float:
    r"""Mean log-likelihood per row from the 1/N covariance ``S`` (mean at the sample mean):
    :math:`-\tfrac12[p\log 2\pi + \log\det C + \operatorname{tr}(C^{-1} S)]`."""
    whitened, chol = _woodbury_factor(W, psi)
    s_white = S / torch.outer(psi.sqrt(), psi.sqrt())  # Psi^{-1/2} S Psi^{-1/2}
    proj = torch.linalg.solve_triangular(chol, whitened.T, upper=False)  # L^{-1} W~^T, [d, p]
    trace = s_white.diagonal().sum() - (proj @ s_white * proj).sum()
    logdet = psi.log().sum() + 2.0 * chol.diagonal().log().sum()
    return float(-0.5 * (S.shape[0] * _LOG_2PI + logdet + trace))


class FactorAnalysis(_LinearGaussianLVM):
    r"""Factor analysis, :math:`z \sim \mathcal{N}(0, I_d)`,
    :math:`x \mid z \sim \mathcal{N}(W z + \mu, \Psi)` with diagonal positive :math:`\Psi`.

    Parameters
    ----------
    data_dim : int
        :math:`p`, number of observed columns.
    latent_dim : int
        :math:`d`, number of factors; must satisfy ``1 <= latent_dim < data_dim``.
    guide_covariance : {"full", "diag"}
        Covariance of the amortized guide :math:`q(z \mid x) = \mathcal{N}(Ax + b, SS^\top)`:
        lower-triangular ``S`` (``guide_scale_tril``) or diagonal (``guide_scale``).

    Attributes (Pyro parameters)
    ----------------------------
    loading : ``[p, d]`` (W); mean : ``[p]`` (mu); noise_variance : ``[p]`` (diagonal of Psi,
    positive); guide_weight ``[d, p]`` (A), guide_bias ``[d]`` (b), guide_scale_tril
    ``[d, d]`` or guide_scale ``[d]``.

    Parameters are created in ``torch.get_default_dtype()``. Initial values: ``W`` entries
    :math:`\mathcal{N}(0, 0.1^2)`, :math:`\mu = 0`, :math:`\Psi = I` (suited to standardized
    data), guide = exact posterior of that initial model (close to the prior).
    See the module docstring for the model, the exact marginal and posterior.
    """

    def _init_noise(self, dtype):
        self.noise_variance = PyroParam(torch.ones(self.data_dim, dtype=dtype),
                                        constraint=constraints.positive)

    def _noise_diag(self, noise_variance):
        return noise_variance


class PPCA(_LinearGaussianLVM):
    r"""Probabilistic PCA (Tipping & Bishop 1999): factor analysis with :math:`\Psi = \sigma^2 I`.

    Same parameters as :class:`FactorAnalysis` except ``noise_variance``, a positive scalar
    :math:`\sigma^2`. ``latent_dim`` must be smaller than ``data_dim``.
    :meth:`fit_closed_form` gives the maximum-likelihood solution directly; :meth:`fit_em`
    reaches the same optimum iteratively.
    """

    _isotropic = True
    _default_em_init = "current"

    def _init_noise(self, dtype):
        self.noise_variance = PyroParam(torch.ones((), dtype=dtype),
                                        constraint=constraints.positive)

    def fit_closed_form(self, X):
        r"""Maximum-likelihood PPCA (Tipping & Bishop 1999, eqs. 7-8).

        With :math:`S = \frac1N \sum_i (x_i - \bar x)(x_i - \bar x)^\top` (the :math:`1/N`, ML
        covariance; scikit-learn's ``PCA`` uses :math:`1/(N-1)`) and eigenpairs
        :math:`\lambda_1 \ge \dots \ge \lambda_p`, :math:`U`:

        .. math::

            \mu = \bar x, \qquad
            \sigma^2 = \frac{1}{p - d} \sum_{j > d} \lambda_j, \qquad
            W = U_d (\Lambda_d - \sigma^2 I)^{1/2}

        (the rotation :math:`R` is the identity, so the columns of :math:`W` are orthogonal and
        the posterior covariance is diagonal). Computed in float64, stored in the module's
        dtype; the guide is set to the exact posterior. Returns ``self``.

        Raises
        ------
        ValueError
            Invalid data (see :meth:`check_data`), fewer than 2 rows, or data whose
            discarded eigenvalues are all zero (the ML noise variance would be 0).
        """
        mu, S = self._sample_moments(X)
        W, sigma2 = _ppca_closed_form(S, self.latent_dim, "PPCA.fit_closed_form")
        self._set_fitted(W, mu, sigma2)
        self.set_guide_to_posterior()
        return self
