"""Latent usage: active units (Burda et al. 2016) and :math:`\\mathrm{KL}(q(z \\mid x)
\\,\\|\\, p(z))` per latent dimension; posterior collapse."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, List

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import torch
from torch.distributions import kl_divergence


from pyro_lvm.inference.importance_weights import trace_log_terms
from pyro_lvm.inference import engine
from pyro_lvm.inference.kl import closed_form_kl
from pyro_lvm.inference.diagnostics._common import (_check_int, _check_positive, _chunk_sizes,
                                                    _flatten_event, _guide_sites, _latent_labels,
                                                    _prepare, _progress, _seeded)


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
        ``analytic``, ``mc`` or ``mixed`` (analytic for some sites); ``mc-enumerated`` when a
        site's prior depends on an enumerated discrete site (the KL is then to the prior
        marginalized over it, summed over the sites), ``unavailable`` (NaN) when an observed
        site depends on the enumerated one too.
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


def _needs_monte_carlo(probe, sites: List[str]) -> bool:
    """Whether a guide mean or a KL (total or per dimension) of a one-particle probe has no
    closed form, so that Monte Carlo draws are needed."""
    needs_mc = False
    for name in sites:
        gfn = probe.guide_trace.nodes[name]["fn"]
        psite = probe.model_trace.nodes.get(name)
        if psite is None:
            raise ValueError(f"latent site {name!r} of the guide is not sampled in the model")
        if _depends_on_enumerated(psite["fn"], probe.guide_trace.nodes[name]):
            return True  # the prior marginal over the enumerated sites: a Monte Carlo KL
        try:
            needs_mc |= not bool(torch.isfinite(gfn.mean).all())
        except NotImplementedError:
            needs_mc = True
        if closed_form_kl(gfn, psite["fn"]) is None:
            needs_mc = True
        q_marg, _ = _marginals(gfn, gfn.event_shape)
        p_marg, _ = _marginals(psite["fn"], gfn.event_shape)
        if q_marg is not None and p_marg is not None:
            try:
                kl_divergence(q_marg, p_marg)
            except NotImplementedError:
                needs_mc = True
    return needs_mc


def _site_mean(gfn, value: torch.Tensor) -> Tuple[torch.Tensor, bool]:
    """The guide's mean ``[B, *event]`` at a site, or the Monte Carlo mean of its draws (second
    value True) when the distribution has none."""
    try:
        site_mean = gfn.mean.expand(value.shape).mean(0)
    except NotImplementedError:
        site_mean = None
    # some distributions return NaN instead of raising (e.g. Categorical)
    if site_mean is None or not bool(torch.isfinite(site_mean).all()):
        return value.to(torch.get_default_dtype()).mean(0), True
    return site_mean, False


def _site_total_kl(gfn, pfn, value: torch.Tensor, num_samples: int):
    """KL(q || p) of one site per row ``[B]``, its Monte Carlo variance, and the method."""
    kl_site = closed_form_kl(gfn, pfn)
    if kl_site is not None:
        kl_site = kl_site.expand(value.shape[:2])
        variance = kl_site.var(0) / num_samples if num_samples > 1 else 0.0
        return kl_site.mean(0), variance, "analytic"
    diff = gfn.log_prob(value) - pfn.log_prob(value)
    variance = (diff.var(0) / num_samples if num_samples > 1
                else torch.full_like(diff[0], float("nan")))
    return diff.mean(0), variance, "mc"


def _site_kl_per_dim(gfn, pfn, value: torch.Tensor) -> Tuple[torch.Tensor, str]:
    """KL per latent coordinate ``[K, B, width]`` of one site (exact for factorized guide and
    prior, else between the one-dimensional marginals), and the method."""
    event = gfn.event_shape
    q_marg, q_fact = _marginals(gfn, event)
    p_marg, p_fact = _marginals(pfn, event)
    suffix = "" if (q_fact and p_fact) else "-marginal"
    width = int(np.prod(event)) if len(event) else 1
    if q_marg is None or p_marg is None:
        return torch.full((*value.shape[:2], width), float("nan"), dtype=value.dtype,
                          device=value.device), "unavailable"
    try:
        per_dim, method = kl_divergence(q_marg, p_marg), "analytic" + suffix
    except NotImplementedError:
        per_dim, method = q_marg.log_prob(value) - p_marg.log_prob(value), "mc" + suffix
    return _flatten_event(per_dim.expand(value.shape), event), method


def _depends_on_enumerated(pfn, gsite) -> bool:
    """Whether a model site's prior depends on an enumerated discrete site (its batch shape
    has dims, of size > 1, left of the particle and data dims: a mixture component)."""
    batch_dims = gsite["value"].dim() - len(gsite["fn"].event_shape)
    extra = tuple(pfn.batch_shape)[:-batch_dims] if batch_dims else tuple(pfn.batch_shape)
    return len(pfn.batch_shape) > batch_dims and any(size > 1 for size in extra)


def _marginal_total_kl(terms, num_samples: int):
    """KL(q || p) per row ``[B]`` summed over the latent sites, with the prior marginalized
    over the enumerated sites (``terms.log_prior``; a mixture prior's
    :math:`\\log \\sum_c \\pi_c p(z \\mid c)`), by Monte Carlo, and its variance. NaN when an
    observed site depends on an enumerated one: the enumerated sum then joins the prior and
    the likelihood, and a KL term of the prior alone is not defined."""
    joint_observed = any(
        site["is_observed"] and len(site["fn"].batch_shape) > 2
        and any(size > 1 for size in tuple(site["fn"].batch_shape)[:-2])
        for site in terms.model_trace.nodes.values() if site["type"] == "sample")
    diff = terms.log_q - terms.log_prior
    if joint_observed:
        diff = torch.full_like(diff, float("nan"))
    variance = (diff.var(0) / num_samples if num_samples > 1
                else torch.full_like(diff[0], float("nan")))
    return diff.mean(0), variance


class _UsageAccumulator:
    """Sums over row batches of what :func:`latent_usage` reports."""

    def __init__(self, sites: List[str], num_samples: int, pair, has_mask: bool):
        self.sites, self.num_samples, self.pair, self.has_mask = sites, num_samples, pair, has_mask
        self.means, self.kl_rows, self.kl_rows_var = [], [], []
        self.kl_dim_sum: Dict[str, torch.Tensor] = {}
        self.kl_dim_var: Dict[str, torch.Tensor] = {}
        self.dim_method: Dict[str, str] = {}
        self.event_shapes: Dict[str, torch.Size] = {}
        self.total_methods, self.mean_methods = set(), set()

    def add(self, terms, xb: torch.Tensor) -> None:
        batch_means, kl_row, kl_row_var, batch_mc_mean = [], 0.0, 0.0, False
        marginal = any(_depends_on_enumerated(terms.model_trace.nodes[name]["fn"],
                                              terms.guide_trace.nodes[name])
                       for name in self.sites)
        for name in self.sites:
            gsite, psite = terms.guide_trace.nodes[name], terms.model_trace.nodes[name]
            gfn, pfn, value = gsite["fn"], psite["fn"], gsite["value"]
            self.event_shapes[name] = gfn.event_shape
            site_mean, monte_carlo = _site_mean(gfn, value)
            batch_mc_mean |= monte_carlo
            batch_means.append(_flatten_event(site_mean, gfn.event_shape))
            if _depends_on_enumerated(pfn, gsite):
                width = int(np.prod(gfn.event_shape)) if len(gfn.event_shape) else 1
                self._add_per_dim(name, torch.full((*value.shape[:2], width), float("nan"),
                                                   dtype=torch.float64), "unavailable")
                continue
            if not marginal:
                kl, kl_var, method = _site_total_kl(gfn, pfn, value, self.num_samples)
                kl_row, kl_row_var = kl_row + kl, kl_row_var + kl_var
                self.total_methods.add(method)
            self._add_per_dim(name, *_site_kl_per_dim(gfn, pfn, value))
        if marginal:
            kl_row, kl_row_var = _marginal_total_kl(terms, self.num_samples)
            self.total_methods.add("mc-enumerated" if bool(torch.isfinite(kl_row).all())
                                   else "unavailable")
        self.means.append(self._batch_means(torch.cat(batch_means, dim=-1), batch_mc_mean, xb))
        self.kl_rows.append(torch.as_tensor(kl_row).double().cpu().expand(xb.shape[0]))
        self.kl_rows_var.append(torch.as_tensor(kl_row_var).double().cpu().expand(xb.shape[0]))

    def _add_per_dim(self, name: str, per_dim: torch.Tensor, method: str) -> None:
        self.dim_method[name] = method
        per_dim_row = per_dim.mean(0)  # [B, width]
        if name not in self.kl_dim_sum:
            width = per_dim_row.shape[-1]
            self.kl_dim_sum[name] = per_dim_row.new_zeros(width, dtype=torch.float64)
            self.kl_dim_var[name] = per_dim_row.new_zeros(width, dtype=torch.float64)
        self.kl_dim_sum[name] += per_dim_row.double().sum(0)
        if method.startswith("mc") and self.num_samples > 1:
            self.kl_dim_var[name] += (per_dim.double().var(0) / self.num_samples).sum(0)
        elif method.startswith("mc"):
            self.kl_dim_var[name] += float("nan")

    def _batch_means(self, flat_means: torch.Tensor, monte_carlo: bool,
                     xb: torch.Tensor) -> torch.Tensor:
        if not monte_carlo:
            self.mean_methods.add("guide_mean")
            return flat_means.double().cpu()
        # no analytic guide mean: the pair's encoder is exact where it exists
        encoded = None if self.has_mask else _encode_means(self.pair, xb, flat_means.shape[-1])
        if encoded is not None:
            self.mean_methods.add("encode")
            return encoded.double().cpu()
        self.mean_methods.add("monte_carlo")
        return flat_means.double().cpu()

    def result(self, threshold: float, collapse_threshold: float) -> LatentUsage:
        posterior_means = torch.cat(self.means).numpy()
        n = posterior_means.shape[0]
        activity = posterior_means.var(axis=0, ddof=1)
        labels, site_col, kl_col, kl_se_col, method_col = [], [], [], [], []
        for name in self.sites:
            labels += _latent_labels(name, self.event_shapes[name])
            width = self.kl_dim_sum[name].numel()
            site_col += [name] * width
            kl_col.append((self.kl_dim_sum[name] / n).numpy())
            kl_se_col.append((self.kl_dim_var[name].sqrt() / n).numpy())
            method_col += [self.dim_method[name]] * width
        kl_dim = np.concatenate(kl_col)
        per_dim = pd.DataFrame({"latent_dim": labels, "site": site_col, "activity": activity,
                                "active": activity > threshold, "kl": kl_dim,
                                "kl_se": np.concatenate(kl_se_col), "kl_method": method_col})
        with np.errstate(invalid="ignore"):
            per_dim["collapsed"] = kl_dim < collapse_threshold
        kl_per_row = torch.cat(self.kl_rows).numpy()
        kl_var = torch.cat(self.kl_rows_var).numpy()
        return LatentUsage(
            per_dim=per_dim, kl_per_row=kl_per_row, kl_total=float(kl_per_row.mean()),
            kl_total_mc_se=float(np.sqrt(kl_var.sum()) / n),
            kl_total_data_se=float(kl_per_row.std(ddof=1) / math.sqrt(n)),
            kl_total_method="mixed" if len(self.total_methods) > 1 else self.total_methods.pop(),
            mean_method=(self.mean_methods.pop() if len(self.mean_methods) == 1 else "mixed"),
            posterior_means=posterior_means, threshold=threshold,
            collapse_threshold=collapse_threshold, num_samples=self.num_samples)


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
        if num_samples is None:
            num_samples = 100 if _needs_monte_carlo(probe, sites) else 1
        width = engine.draw_width(prep.model_fn, prep.guide_fn, x, prep.mask, prep.pair)
        rows_per_batch, _ = _chunk_sizes(n, num_samples, width, batch_size, prep.device)
        usage = _UsageAccumulator(sites, num_samples, prep.pair, prep.mask is not None)
        starts = range(0, n, rows_per_batch)
        with _progress(len(starts), "latent usage", progress) as bar:
            for start in starts:
                rows = slice(start, min(n, start + rows_per_batch))
                mb = None if prep.mask is None else prep.mask[rows]
                usage.add(trace_log_terms(prep.model_fn, prep.guide_fn, x[rows], num_samples, mb),
                          x[rows])
                bar.update(1)
    return usage.result(threshold, collapse_threshold)
