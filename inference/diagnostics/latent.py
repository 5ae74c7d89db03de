"""Latent usage: active units (Burda et al. 2016) and :math:`\\mathrm{KL}(q(z \\mid x)
\\,\\|\\, p(z))` per latent dimension; posterior collapse."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import torch
from torch.distributions import kl_divergence


from pyro_lvm.inference.objectives import trace_log_terms
from pyro_lvm.inference import engine
from pyro_lvm.inference.diagnostics._common import (_check_int, _check_positive, _chunk_sizes, _flatten_event, _guide_sites, _latent_labels, _prepare, _progress, _seeded)


def _unwrap_independent(fn) -> Tuple[Any, int]:
    """Strip ``Independent`` wrappers; return the base and the number of reinterpreted dims."""
    reinterpreted = 0
    while isinstance(fn, torch.distributions.Independent):
        reinterpreted += fn.reinterpreted_batch_ndims
        fn = fn.base_dist
    return fn, reinterpreted


def _marginals(fn, event_shape: torch.Size):
    """Univariate marginal distributions of each latent coordinate, batch ``[..., *event]``.

    Returns ``(marginals, factorizes)`` or ``(None, False)`` when no marginals are known.
    ``factorizes`` is True when the joint is the product of these marginals.
    """
    base, reinterpreted = _unwrap_independent(fn)
    if base.event_shape == torch.Size() and reinterpreted == len(event_shape):
        return base, True
    if len(event_shape) == 1 and isinstance(
            base, (torch.distributions.MultivariateNormal,
                   torch.distributions.LowRankMultivariateNormal)) and reinterpreted == 0:
        return dist.Normal(base.mean, base.stddev), False
    if (len(event_shape) == 1 and isinstance(base, torch.distributions.MixtureSameFamily)
            and reinterpreted == 0):
        component, comp_reinterpreted = _unwrap_independent(base.component_distribution)
        if isinstance(component, torch.distributions.Normal) and comp_reinterpreted == 1:
            # components: batch [..., C, d]; the marginal of coordinate j mixes N(loc_cj, scale_cj)
            loc = component.loc.movedim(-1, -2)
            scale = component.scale.movedim(-1, -2)
            logits = base.mixture_distribution.logits.unsqueeze(-2).expand(loc.shape)
            return dist.MixtureSameFamily(dist.Categorical(logits=logits),
                                          dist.Normal(loc, scale)), False
    return None, False


def _as_multivariate_normal(fn):
    """A factorized Normal (``Independent(Normal)``, one event dim) as a MultivariateNormal."""
    if isinstance(fn, torch.distributions.MultivariateNormal):
        return fn
    base, reinterpreted = _unwrap_independent(fn)
    if (isinstance(base, torch.distributions.Normal) and reinterpreted == 1
            and len(fn.event_shape) == 1):
        return dist.MultivariateNormal(base.loc, scale_tril=torch.diag_embed(base.scale))
    return None


def _analytic_kl(q, p) -> Optional[torch.Tensor]:
    """KL(q || p) in closed form, or None. Besides PyTorch's registry, a full-covariance
    Normal against a factorized Normal (either way round) is handled as MVN vs MVN."""
    try:
        return kl_divergence(q, p)
    except NotImplementedError:
        pass
    q_mvn, p_mvn = _as_multivariate_normal(q), _as_multivariate_normal(p)
    if q_mvn is not None and p_mvn is not None:
        return kl_divergence(q_mvn, p_mvn)
    return None


@dataclass
class LatentUsage:
    """How much each latent dimension is used.

    Attributes
    ----------
    per_dim : pandas.DataFrame
        One row per latent coordinate: ``latent_dim`` (label such as ``z[3]``), ``site``,
        ``activity`` (:math:`A_u = \\mathrm{Var}_x(E_q[z_u \\mid x])`), ``active``
        (:math:`A_u >` ``threshold``), ``kl`` (:math:`\\frac1n \\sum_i \\mathrm{KL}(q(z_u \\mid x_i)
        \\,\\|\\, p(z_u))`, nats; NaN when the prior has no per-dimension marginals),
        ``kl_se`` (Monte Carlo standard error; 0 when analytic), ``kl_method``
        (``analytic``: exact per-dimension KL of factorized guide and prior, these sum to the
        total KL; ``mc``: Monte Carlo of the same; ``analytic-marginal``/``mc-marginal``:
        KL between the one-dimensional marginals of a non-factorized guide or prior, which
        does *not* sum to the total KL; ``unavailable``), ``collapsed``
        (``kl`` < ``collapse_threshold``).
    kl_per_row : numpy.ndarray
        :math:`\\mathrm{KL}(q(z \\mid x_i) \\| p(z))` per data row (all latent sites).
    kl_total, kl_total_mc_se, kl_total_data_se : float
        Mean of ``kl_per_row``; its Monte Carlo standard error (0 when analytic) and its
        standard error over rows (the spread of KL across data points / sqrt(n)).
    kl_total_method : str
        ``analytic``, ``mc`` or ``mixed`` (analytic for some sites).
    mean_method : str
        How :math:`E_q[z \\mid x]` was obtained: ``guide_mean`` (the mean of the guide's
        distribution object), ``encode`` (``pair.encode(x)[0]``, when the guide distribution
        has no analytic mean) or ``monte_carlo`` (average of the guide's draws).
    posterior_means : numpy.ndarray, shape (n, num_latent)
    threshold, collapse_threshold : float
    """

    per_dim: pd.DataFrame
    kl_per_row: np.ndarray
    kl_total: float
    kl_total_mc_se: float
    kl_total_data_se: float
    kl_total_method: str
    mean_method: str
    posterior_means: np.ndarray
    threshold: float
    collapse_threshold: float
    num_samples: int

    @property
    def num_latent(self) -> int:
        return len(self.per_dim)

    @property
    def num_active(self) -> int:
        return int(self.per_dim["active"].sum())

    @property
    def num_collapsed(self) -> int:
        return int(self.per_dim["collapsed"].sum())

    @property
    def kl_per_dim_sums_to_total(self) -> bool:
        """True when every per-dimension KL is exact/factorized, so they add up to the total."""
        return bool(self.per_dim["kl_method"].isin(["analytic", "mc"]).all())

    @property
    def posterior_collapse(self) -> str:
        """``"none"``, ``"partial"`` (some dimensions have q(z_u|x) ~= p(z_u)) or ``"complete"``."""
        if self.per_dim["kl"].isna().all():
            return "unknown"
        if self.num_collapsed == 0:
            return "none"
        return "complete" if self.num_collapsed == self.num_latent else "partial"

    def to_dict(self) -> Dict[str, float]:
        return {
            "active_units": float(self.num_active),
            "latent_dims": float(self.num_latent),
            "active_fraction": self.num_active / self.num_latent,
            "collapsed_dims": float(self.num_collapsed),
            "kl_total": self.kl_total,
            "kl_total_mc_se": self.kl_total_mc_se,
            "kl_total_data_se": self.kl_total_data_se,
        }

    def summary(self) -> str:
        kl_text = (f"KL(q||p) per row {self.kl_total:.4g} nats ({self.kl_total_method}"
                   + (f", MC se {self.kl_total_mc_se:.2g}" if self.kl_total_method != "analytic"
                      else "") + ")")
        return (f"{self.num_active} of {self.num_latent} latent dimensions active "
                f"(Var_x E_q[z_u|x] > {self.threshold:g}); {self.num_collapsed} collapsed "
                f"(KL < {self.collapse_threshold:g} nats): posterior collapse "
                f"{self.posterior_collapse}; {kl_text}.")


def _encode_means(pair, xb: torch.Tensor, total_dim: int) -> Optional[torch.Tensor]:
    encode = getattr(pair, "encode", None)
    if not callable(encode):
        return None
    out = encode(xb)
    loc = out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(loc, torch.Tensor) or tuple(loc.shape) != (xb.shape[0], total_dim):
        return None
    return loc


def latent_usage(pair, data, *, threshold: float = 0.01, collapse_threshold: float = 0.01,
                 num_samples: Optional[int] = None, mask=None, device="auto", seed: int = 0,
                 batch_size: Optional[int] = None, progress: Optional[bool] = None,
                 guide=None, param_state=None) -> LatentUsage:
    """Active units and KL(q(z|x) || p(z)) per latent dimension.

    Activity of coordinate :math:`u` (Burda, Grosse & Salakhutdinov 2016):

    .. math:: A_u = \\mathrm{Var}_{x}\\big(E_{q(z \\mid x)}[z_u]\\big),

    the variance over data rows of the posterior mean; the unit is *active* when
    :math:`A_u >` ``threshold`` (0.01 in the paper, for data-independent priors of unit scale).
    :math:`E_q[z \\mid x]` is the mean of the guide's distribution at each latent site (exact,
    and always the guide's own -- an ``encode`` method may return something else, e.g. the
    exact posterior of a linear model); when a guide distribution has no analytic mean,
    ``pair.encode(x)[0]`` is used if present (and no mask is given), else the Monte Carlo
    mean of the guide's draws. Latent sites are concatenated along their flattened event
    dims.

    KL per dimension, averaged over rows: for a factorized guide and prior
    (``Independent`` of univariate distributions on both sides) it is
    :math:`\\mathrm{KL}(q(z_u \\mid x) \\| p(z_u))`, analytic where PyTorch has the formula
    (e.g. Normal vs Normal) else Monte Carlo, and these sum to the total KL. Otherwise the
    KL between the one-dimensional marginals is used where both sides have them (a
    ``MultivariateNormal`` guide, a mixture-of-Gaussians prior); those do not sum to the
    total (the difference is the dependence between coordinates). A dimension is
    *collapsed* when its KL is below ``collapse_threshold`` nats: the posterior of that
    coordinate equals the prior for every x, and the model ignores it.

    Parameters
    ----------
    threshold : float
        Activity threshold for :math:`A_u`.
    collapse_threshold : float
        KL (nats) under which a dimension counts as collapsed.
    num_samples : int, optional
        Guide draws per row for the Monte Carlo parts. Default: 1 when everything is
        analytic (means and KL), else 100.
    mask, device, seed, batch_size, progress, guide, param_state
        As in :func:`importance_diagnostics`.

    Returns
    -------
    LatentUsage

    References
    ----------
    Burda, Y., Grosse, R. & Salakhutdinov, R. (2016). Importance weighted autoencoders. ICLR.
    """
    threshold = _check_positive(threshold, "threshold")
    collapse_threshold = _check_positive(collapse_threshold, "collapse_threshold")
    if num_samples is not None:
        num_samples = _check_int(num_samples, "num_samples", 1)
    with _prepare(pair, data, mask, device, guide=guide, min_rows=2,
                  param_state=param_state) as prep, torch.no_grad(), _seeded(seed, prep.device):
        x, n = prep.x, prep.x.shape[0]
        # A one-particle probe decides whether anything needs Monte Carlo.
        probe = trace_log_terms(prep.model_fn, prep.guide_fn, x[:2],
                                1, None if prep.mask is None else prep.mask[:2])
        sites = _guide_sites(probe)
        needs_mc = False
        for name in sites:
            gfn = probe.guide_trace.nodes[name]["fn"]
            psite = probe.model_trace.nodes.get(name)
            if psite is None:
                raise ValueError(f"latent site {name!r} of the guide is not sampled in the model")
            event = gfn.event_shape
            try:
                needs_mc |= not bool(torch.isfinite(gfn.mean).all())
            except NotImplementedError:
                needs_mc = True
            if _analytic_kl(gfn, psite["fn"]) is None:
                needs_mc = True
            q_marg, q_fact = _marginals(gfn, event)
            p_marg, p_fact = _marginals(psite["fn"], event)
            if q_marg is not None and p_marg is not None:
                try:
                    kl_divergence(q_marg, p_marg)
                except NotImplementedError:
                    needs_mc = True
        if num_samples is None:
            num_samples = 100 if needs_mc else 1

        width = engine.draw_width(prep.model_fn, prep.guide_fn, x, prep.mask, prep.pair)
        rows_per_batch, _ = _chunk_sizes(n, num_samples, width, batch_size, prep.device)
        means, kl_rows, kl_rows_var = [], [], []
        kl_dim_sum: Dict[str, torch.Tensor] = {}
        kl_dim_var: Dict[str, torch.Tensor] = {}
        dim_method: Dict[str, str] = {}
        total_methods = set()
        mean_methods = set()
        event_shapes: Dict[str, torch.Size] = {}
        starts = range(0, n, rows_per_batch)
        with _progress(len(starts), "latent usage", progress) as bar:
            for start in starts:
                rows = slice(start, min(n, start + rows_per_batch))
                xb = x[rows]
                mb = None if prep.mask is None else prep.mask[rows]
                terms = trace_log_terms(prep.model_fn, prep.guide_fn, xb, num_samples, mb)
                batch_means, kl_row, kl_row_var = [], 0.0, 0.0
                batch_mc_mean = False
                for name in sites:
                    gsite = terms.guide_trace.nodes[name]
                    psite = terms.model_trace.nodes[name]
                    gfn, pfn, value = gsite["fn"], psite["fn"], gsite["value"]
                    event = gfn.event_shape
                    event_shapes[name] = event
                    try:
                        site_mean = gfn.mean.expand(value.shape).mean(0)
                    except NotImplementedError:
                        site_mean = None
                    # some distributions return NaN instead of raising (e.g. Categorical)
                    if site_mean is None or not bool(torch.isfinite(site_mean).all()):
                        site_mean = value.to(torch.get_default_dtype()).mean(0)
                        batch_mc_mean = True
                    batch_means.append(_flatten_event(site_mean, event))

                    # total KL for this site, per row
                    kl_site = _analytic_kl(gfn, pfn)
                    if kl_site is not None:
                        kl_site = kl_site.expand(value.shape[:2])
                        kl_row = kl_row + kl_site.mean(0)
                        if num_samples > 1:
                            kl_row_var = kl_row_var + kl_site.var(0) / num_samples
                        total_methods.add("analytic")
                    else:
                        diff = gfn.log_prob(value) - pfn.log_prob(value)
                        kl_row = kl_row + diff.mean(0)
                        kl_row_var = kl_row_var + (diff.var(0) / num_samples if num_samples > 1
                                                   else torch.full_like(diff[0], float("nan")))
                        total_methods.add("mc")

                    # KL per dimension
                    q_marg, q_fact = _marginals(gfn, event)
                    p_marg, p_fact = _marginals(pfn, event)
                    suffix = "" if (q_fact and p_fact) else "-marginal"
                    width = int(np.prod(event)) if len(event) else 1
                    if q_marg is None or p_marg is None:
                        per_dim = torch.full((num_samples, xb.shape[0], width), float("nan"),
                                             dtype=value.dtype, device=value.device)
                        method = "unavailable"
                    else:
                        try:
                            per_dim = kl_divergence(q_marg, p_marg)
                            method = "analytic" + suffix
                        except NotImplementedError:
                            per_dim = q_marg.log_prob(value) - p_marg.log_prob(value)
                            method = "mc" + suffix
                        per_dim = _flatten_event(per_dim.expand(value.shape), event)
                    dim_method[name] = method
                    per_dim_row = per_dim.mean(0)  # [B, width]
                    if name not in kl_dim_sum:
                        kl_dim_sum[name] = per_dim_row.new_zeros(width, dtype=torch.float64)
                        kl_dim_var[name] = per_dim_row.new_zeros(width, dtype=torch.float64)
                    kl_dim_sum[name] += per_dim_row.double().sum(0)
                    if method.startswith("mc") and num_samples > 1:
                        kl_dim_var[name] += (per_dim.double().var(0) / num_samples).sum(0)
                    elif method.startswith("mc"):
                        kl_dim_var[name] += float("nan")

                flat_means = torch.cat(batch_means, dim=-1)
                if batch_mc_mean:
                    # no analytic guide mean: the pair's encoder is exact where it exists
                    encoded = (_encode_means(prep.pair, xb, flat_means.shape[-1])
                               if prep.mask is None else None)
                    if encoded is not None:
                        flat_means = encoded
                        mean_methods.add("encode")
                    else:
                        mean_methods.add("monte_carlo")
                else:
                    mean_methods.add("guide_mean")
                means.append(flat_means.double().cpu())
                kl_rows.append(torch.as_tensor(kl_row).double().cpu().expand(xb.shape[0]))
                kl_rows_var.append(torch.as_tensor(kl_row_var).double().cpu().expand(xb.shape[0]))
                bar.update(1)

    posterior_means = torch.cat(means).numpy()
    mean_method = mean_methods.pop() if len(mean_methods) == 1 else "mixed"
    activity = posterior_means.var(axis=0, ddof=1)
    labels, site_col, kl_col, kl_se_col, method_col = [], [], [], [], []
    for name in sites:
        labels += _latent_labels(name, event_shapes[name])
        width = kl_dim_sum[name].numel()
        site_col += [name] * width
        kl_col.append((kl_dim_sum[name] / n).numpy())
        kl_se_col.append((kl_dim_var[name].sqrt() / n).numpy())
        method_col += [dim_method[name]] * width
    kl_dim = np.concatenate(kl_col)
    per_dim = pd.DataFrame({
        "latent_dim": labels,
        "site": site_col,
        "activity": activity,
        "active": activity > threshold,
        "kl": kl_dim,
        "kl_se": np.concatenate(kl_se_col),
        "kl_method": method_col,
    })
    with np.errstate(invalid="ignore"):
        per_dim["collapsed"] = kl_dim < collapse_threshold
    kl_per_row = torch.cat(kl_rows).numpy()
    kl_var = torch.cat(kl_rows_var).numpy()
    total_method = "mixed" if len(total_methods) > 1 else total_methods.pop()
    return LatentUsage(
        per_dim=per_dim,
        kl_per_row=kl_per_row,
        kl_total=float(kl_per_row.mean()),
        kl_total_mc_se=float(np.sqrt(kl_var.sum()) / n),
        kl_total_data_se=float(kl_per_row.std(ddof=1) / math.sqrt(n)),
        kl_total_method=total_method,
        mean_method=mean_method,
        posterior_means=posterior_means,
        threshold=threshold,
        collapse_threshold=collapse_threshold,
        num_samples=num_samples,
    )


