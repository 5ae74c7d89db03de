"""Posterior predictive checks: replicated data sets from the fitted model and tail
probabilities of summary statistics (Gelman, Meng & Stern 1996)."""
from __future__ import annotations

import math
import numbers
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import pyro
import pyro.poutine as poutine
import torch


from pyro_lvm.inference.importance_weights import PARTICLE_PLATE
from pyro_lvm.inference.diagnostics._common import (_BUILTIN_STATISTICS, _chunk_sizes, _Prepared,
                                                    _check_int, _observed_data_site, _prepare,
                                                    _progress, _seeded)


def _vectorized(fn: Callable, num: int) -> Callable:
    def wrapped(*args, **kwargs):
        with pyro.plate(PARTICLE_PLATE, num, dim=-2):
            return fn(*args, **kwargs)

    return wrapped


def _replicates(prep: _Prepared, site: str, kind: str, num: int) -> torch.Tensor:
    """``num`` replicated data sets, shape ``[num, n, p]``."""
    model = poutine.uncondition(_vectorized(prep.model_fn, num))
    if kind == "posterior":
        guide_trace = poutine.trace(_vectorized(prep.guide_fn, num)).get_trace(prep.x,
                                                                                mask=prep.mask)
        model = poutine.replay(model, trace=guide_trace)
    trace = poutine.trace(model).get_trace(prep.x, mask=prep.mask)
    value = trace.nodes[site]["value"]
    try:
        return value.expand(num, *prep.x.shape)
    except RuntimeError:
        raise ValueError(
            f"replicated values of site {site!r} have shape {tuple(value.shape)}, which does not "
            f"broadcast to [replicates, rows, features] = {(num, *prep.x.shape)}") from None


def _masked_moments(x: torch.Tensor, weight: torch.Tensor, center: torch.Tensor):
    """Per-feature count, mean and central moments 2-4 over rows; x [R, n, p], weight [n, p]."""
    count = weight.sum(0)
    xc = x - center
    mean_c = (weight * xc).sum(-2) / count
    dev = xc - mean_c.unsqueeze(-2)
    m2 = (weight * dev ** 2).sum(-2) / count
    m3 = (weight * dev ** 3).sum(-2) / count
    m4 = (weight * dev ** 4).sum(-2) / count
    return count, mean_c + center, m2, m3, m4


def _correlations(x: torch.Tensor, weight: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """Pairwise-complete Pearson correlations ``[R, q, q]`` (rows where both are observed)."""
    xc = (x - center) * weight
    pair_count = weight.T @ weight
    sum_x = xc.transpose(-1, -2) @ weight  # [j, k]: sum of x_j over rows observing j and k
    sum_xx = (xc * (x - center)).transpose(-1, -2) @ weight
    sum_xy = xc.transpose(-1, -2) @ xc
    mean_jk = sum_x / pair_count
    mean_kj = mean_jk.transpose(-1, -2)
    cov = sum_xy / pair_count - mean_jk * mean_kj
    var_jk = sum_xx / pair_count - mean_jk ** 2
    var_kj = var_jk.transpose(-1, -2)
    return cov / torch.sqrt(var_jk.clamp_min(0) * var_kj.clamp_min(0))


class _StatisticPlan:
    """Which statistics to compute and on which features."""

    def __init__(self, statistics, x: torch.Tensor, weight: torch.Tensor, names: List[str],
                 max_features: int, rng: np.random.Generator):
        self.builtin: List[str] = []
        self.custom: List[Tuple[str, Callable]] = []
        for stat in statistics:
            if callable(stat):
                self.custom.append((getattr(stat, "__name__", "custom"), stat))
            elif isinstance(stat, str) and stat in _BUILTIN_STATISTICS:
                self.builtin.append(stat)
            else:
                raise ValueError(f"unknown statistic {stat!r}; use one of {_BUILTIN_STATISTICS} "
                                 f"or a callable x -> tensor")
        if not self.builtin and not self.custom:
            raise ValueError("statistics is empty")
        self.names = names
        self.center = (x * weight).sum(0) / weight.sum(0)
        _, _, m2, _, _ = _masked_moments(x.unsqueeze(0), weight, self.center)
        varying = np.nonzero(m2[0].cpu().numpy() > 0)[0]
        if len(varying) > max_features:
            varying = np.sort(rng.choice(varying, size=max_features, replace=False))
        self.corr_features = varying
        iu = np.triu_indices(len(varying), k=1)
        self.pairs = (iu[0], iu[1])

    def compute(self, x: torch.Tensor,
                weight: torch.Tensor) -> Dict[str, Tuple[List[str], torch.Tensor]]:
        """Statistics of replicated (or observed, R = 1) data ``x [R, n, p]``:
        name -> (labels, values ``[R, m]``)."""
        out = {}
        moments = None
        if any(s in self.builtin for s in ("mean", "variance", "skewness", "kurtosis")):
            count, mean, m2, m3, m4 = _masked_moments(x, weight, self.center)
            moments = (count, mean, m2, m3, m4)
        for stat in self.builtin:
            if stat == "mean":
                out["mean"] = (self.names, moments[1])
            elif stat == "variance":
                out["variance"] = (self.names, moments[2] * moments[0] / (moments[0] - 1))
            elif stat == "skewness":
                out["skewness"] = (self.names, moments[3] / moments[2] ** 1.5)
            elif stat == "kurtosis":
                out["kurtosis"] = (self.names, moments[4] / moments[2] ** 2 - 3.0)
            elif stat == "min":
                out["min"] = (self.names, torch.where(weight > 0, x, torch.inf).amin(-2))
            elif stat == "max":
                out["max"] = (self.names, torch.where(weight > 0, x, -torch.inf).amax(-2))
            elif stat == "correlation" and len(self.corr_features) >= 2:
                idx = torch.as_tensor(self.corr_features, device=x.device)
                corr = _correlations(x[..., idx], weight[:, idx], self.center[idx])
                j, k = self.pairs
                values = corr[:, j, k]
                labels = [f"{self.names[self.corr_features[a]]},{self.names[self.corr_features[b]]}"
                          for a, b in zip(j, k)]
                out["correlation"] = (labels, values)
                out["mean_abs_correlation"] = (["all pairs"], values.abs().mean(-1, keepdim=True))
        for name, fn in self.custom:
            values = torch.stack([torch.as_tensor(fn(xr), dtype=torch.float64).reshape(-1)
                                  for xr in x])
            labels = ([name] if values.shape[-1] == 1
                      else [f"{name}[{i}]" for i in range(values.shape[-1])])
            out[name] = (labels, values.to(x.device))
        return out


def _tail_probabilities(observed, replicated, extreme: float) -> pd.DataFrame:
    """One row per statistic and feature: observed value, replicated mean and sd, z-score and
    the tail probabilities of the observed value among the replicates."""
    frames = []
    for name, (labels, obs_values) in observed.items():
        obs = obs_values[0].cpu().numpy()
        reps = torch.cat(replicated[name]).numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            rep_mean = reps.mean(0)
            rep_sd = reps.std(0, ddof=1)
            z = (obs - rep_mean) / rep_sd
            p_upper = (reps >= obs).mean(0)
            p_lower = (reps <= obs).mean(0)
        undefined = ~np.isfinite(obs) | ~np.isfinite(reps).all(0)
        p_upper = np.where(undefined, np.nan, p_upper)
        p_two = np.where(undefined, np.nan, np.minimum(1.0, 2.0 * np.minimum(p_upper, p_lower)))
        frames.append(pd.DataFrame({
            "statistic": name, "feature": labels, "observed": obs,
            "replicated_mean": rep_mean, "replicated_sd": rep_sd, "z_score": z,
            "p_value": p_upper, "p_two_sided": p_two,
            "extreme": np.nan_to_num(p_two, nan=1.0) < extreme,
        }))
    return pd.concat(frames, ignore_index=True)


def posterior_predictive_check(pair, data, *, kind: str = "prior", num_replicates: int = 100,
                               statistics: Sequence[Union[str, Callable]] = ("mean", "variance",
                                                                             "correlation"),
                               max_features: int = 20, extreme: float = 0.01, mask=None,
                               device="auto", seed: int = 0, progress: Optional[bool] = None,
                               guide=None, param_state=None) -> pd.DataFrame:
    """Compare summary statistics of the data with data sets replicated from the fitted model.

    Each replicate :math:`x^{rep}` has the same number of rows as the data:

    * ``kind="prior"`` (default): :math:`z_i \\sim p(z)` and
      :math:`x^{rep}_i \\sim p_\\theta(x \\mid z_i)`, i.e. draws from the fitted marginal
      :math:`p_\\theta(x)` -- the predictive distribution of a new data set given the fitted
      (global) parameters, with new local latents (for hierarchical models, Gelman, Meng &
      Stern 1996 discuss which parameters to replicate; replicating the local ones anew is
      the "mixed predictive" check of Marshall & Spiegelhalter 2003);
    * ``kind="posterior"``: for every row, :math:`z_i \\sim q(z \\mid x_i)` (the guide, standing
      in for the posterior) and :math:`x^{rep}_i \\sim p_\\theta(x \\mid z_i)`. Each replicate
      row is tied to its observed row through :math:`z_i`, so this check is very conservative:
      with little observation noise :math:`x^{rep} \\approx x` and any statistic is reproduced
      (e.g. the skewness of log-normal data under PPCA is flagged by ``"prior"`` but not by
      ``"posterior"``). It checks the observation model around each row's own latent.

    Replicates come from the model itself, run with its observed site unconditioned
    (:func:`pyro.poutine.uncondition`), so they are draws from the observation model and not
    e.g. Bernoulli means. For each statistic :math:`T` the tail probability
    :math:`p = \\Pr(T(x^{rep}) \\ge T(x))` is estimated from the replicates, with the
    two-sided version :math:`\\min(1, 2\\min(\\Pr(T^{rep} \\ge T), \\Pr(T^{rep} \\le T)))`.
    Values of p near 0 or 1 mean the model does not reproduce that aspect of the data.
    Posterior predictive p-values are conservative (the data were used to fit the model),
    so a non-extreme p is weak evidence of fit; an extreme one is strong evidence of misfit.
    With R replicates p has resolution 1/R; many statistics (one per feature) give some small
    p by chance alone -- about ``extreme`` times the number of statistics are expected.

    Parameters
    ----------
    kind : {"prior", "posterior"}
    num_replicates : int
        R, replicated data sets (>= 100 recommended).
    statistics : sequence of str or callable
        Built in: ``"mean"``, ``"variance"`` (unbiased), ``"skewness"``, ``"kurtosis"``
        (excess), ``"min"``, ``"max"`` (per feature), ``"correlation"`` (Pearson correlation
        of every pair of up to ``max_features`` features -- a random subset, fixed by ``seed``,
        of the non-constant features when there are more -- plus their mean absolute
        correlation ``"mean_abs_correlation"``). A callable gets one data set (tensor
        ``[n, p]``, float64) and returns a scalar or 1-D tensor; it sees unobserved entries
        as zeros in the data and as replicated values in replicates.
    max_features : int
        Most features entering pairwise correlations.
    extreme : float
        A statistic is flagged ``extreme`` when its two-sided tail probability is below this.
    mask, device, seed, progress, guide, param_state
        As in :func:`importance_diagnostics`; with a mask, statistics use observed entries only
        (pairwise-complete rows for correlations), in data and replicates alike.

    Returns
    -------
    pandas.DataFrame
        Columns ``statistic``, ``feature``, ``observed``, ``replicated_mean``,
        ``replicated_sd``, ``z_score`` ((observed - replicated_mean) / replicated_sd),
        ``p_value`` (:math:`\\Pr(T^{rep} \\ge T)`), ``p_two_sided``, ``extreme``.
        ``DataFrame.attrs`` records kind, num_replicates, the observed site and the
        correlation features.

    References
    ----------
    Gelman, A., Meng, X.-L. & Stern, H. (1996). Posterior predictive assessment of model
    fitness via realized discrepancies. Statistica Sinica 6, 733-807.
    Marshall, E. C. & Spiegelhalter, D. J. (2003). Approximate cross-validatory predictive
    checks in disease mapping models. Statistics in Medicine 22, 1649-1660.
    """
    if kind not in ("prior", "posterior"):
        raise ValueError(f"kind must be 'prior' (fitted marginal) or 'posterior' (latents from "
                         f"the guide), got {kind!r}")
    num_replicates = _check_int(num_replicates, "num_replicates", 2)
    max_features = _check_int(max_features, "max_features", 2)
    if not (isinstance(extreme, numbers.Real) and 0 < extreme < 1):
        raise ValueError(f"extreme must be a probability in (0, 1), got {extreme!r}")
    if isinstance(statistics, str) or callable(statistics):
        statistics = (statistics,)
    rng = np.random.default_rng(seed)
    with _prepare(pair, data, mask, device, guide=guide, min_rows=2,
                  param_state=param_state) as prep, torch.no_grad(), _seeded(seed, prep.device):
        n, p = prep.x.shape
        weight = (torch.ones_like(prep.x) if prep.mask is None else prep.mask).double()
        observed_x = prep.x.double()
        plan = _StatisticPlan(statistics, observed_x, weight, prep.feature_names, max_features, rng)
        site = _observed_data_site(prep.model_fn, prep.x, prep.mask)
        observed = plan.compute(observed_x.unsqueeze(0), weight)
        chunk = _chunk_sizes(n, num_replicates, p, n, prep.device)[1]
        replicated: Dict[str, List[torch.Tensor]] = {name: [] for name in observed}
        with _progress(math.ceil(num_replicates / chunk), f"{kind} predictive check",
                       progress) as bar:
            done = 0
            while done < num_replicates:
                r = min(chunk, num_replicates - done)
                x_rep = _replicates(prep, site, kind, r).double()
                for name, (_, values) in plan.compute(x_rep, weight).items():
                    replicated[name].append(values.cpu())
                done += r
                bar.update(1)

    table = _tail_probabilities(observed, replicated, extreme)
    table.attrs.update({
        "kind": kind, "num_replicates": num_replicates, "observed_site": site,
        "extreme": float(extreme),
        "correlation_features": [prep.feature_names[j] for j in plan.corr_features],
    })
    return table


