"""Export a fitted pair, its draws and diagnostics as an :class:`arviz.InferenceData`
(NetCDF-writable)."""
from __future__ import annotations

import json
import math
import numbers
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pandas as pd
import pyro
import torch


from pyro_lvm.inference.importance_weights import trace_log_terms
from pyro_lvm.inference import engine
from pyro_lvm.inference.diagnostics._common import (_check_int, _chunk_sizes, _flatten_event,
                                                    _guide_sites, _latent_labels,
                                                    _observed_data_site, _prepare, _seeded)
from pyro_lvm.inference.diagnostics.bundle import Diagnostics
from pyro_lvm.inference.diagnostics.importance import ImportanceDiagnostics, _logsumexp, _weight_summaries, importance_diagnostics
from pyro_lvm.inference.diagnostics.latent import LatentUsage, latent_usage


def _netcdf_attr(value):
    """Convert a Python value to something netCDF can store as an attribute."""
    if value is None:
        return "none"
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (numbers.Integral,)):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, str):
        return str(value)  # plain str: subclasses (e.g. torch.__version__) do not serialize
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    return str(value)



def _loglik_per_row(loglik, rows: np.ndarray, num_data: int) -> Tuple[np.ndarray, np.ndarray]:
    """Per-row log p(x) estimates (and standard errors, NaN if unknown) for ``rows``."""
    table = getattr(loglik, "per_row", loglik)
    if isinstance(table, pd.DataFrame):
        if "log_px" not in table.columns:
            raise ValueError(f"loglik table needs a 'log_px' column, has {list(table.columns)}")
        values = table["log_px"].to_numpy(dtype=float)
        ses = (table["se"].to_numpy(dtype=float) if "se" in table.columns
               else np.full(len(values), np.nan))
    else:
        values = np.asarray(loglik, dtype=float).reshape(-1)
        ses = np.full(len(values), np.nan)
    if len(values) == num_data:
        return values[rows], ses[rows]
    if len(values) == len(rows):
        return values, ses
    raise ValueError(f"loglik has {len(values)} per-row values; expected one per data row "
                     f"({num_data}) or one per exported row ({len(rows)})")


def _collect_diagnostics(
        diagnostics) -> Tuple[Optional[ImportanceDiagnostics], Optional[LatentUsage]]:
    if diagnostics is None:
        return None, None
    items = diagnostics if isinstance(diagnostics, (list, tuple)) else [diagnostics]
    importance, latent = None, None
    for item in items:
        if isinstance(item, Diagnostics):
            importance = item.importance or importance
            latent = item.latent or latent
        elif isinstance(item, ImportanceDiagnostics):
            importance = item
        elif isinstance(item, LatentUsage):
            latent = item
        else:
            raise ValueError(f"diagnostics must be Diagnostics, ImportanceDiagnostics or "
                             f"LatentUsage objects, got {type(item).__name__}")
    return importance, latent


def _check_rows(rows, n: int) -> np.ndarray:
    if rows is None:
        rows = np.arange(min(20, n))
    rows = np.asarray(rows)
    if rows.ndim != 1 or len(rows) == 0 or not np.issubdtype(rows.dtype, np.integer):
        raise ValueError(f"rows must be a non-empty 1-D sequence of integers, got {rows!r}")
    if rows.min() < 0 or rows.max() >= n or len(np.unique(rows)) != len(rows):
        raise ValueError(f"rows must be distinct indices in [0, {n}); got {rows.tolist()[:10]}")
    return rows


def _guide_draws(prep, rows: np.ndarray, num_draws: int) -> Dict[str, Any]:
    """Guide draws (flattened per site), log-likelihood terms and log weights ``[draw, row]``
    for the exported rows, drawn in chunks of the engine's budget."""
    index = torch.as_tensor(rows, device=prep.device)
    xs = prep.x[index]
    ms = None if prep.mask is None else prep.mask[index]
    width = max(xs.shape[1], engine.draw_width(prep.model_fn, prep.guide_fn, xs, ms, prep.pair))
    _, particle_chunk = _chunk_sizes(len(rows), num_draws, width, len(rows), prep.device)
    draws: Dict[str, List[torch.Tensor]] = {}
    events: Dict[str, torch.Size] = {}
    log_lik, log_w = [], []
    remaining = num_draws
    while remaining > 0:
        k = min(particle_chunk, remaining)
        terms = trace_log_terms(prep.model_fn, prep.guide_fn, xs, k, ms)
        for name in _guide_sites(terms):
            site = terms.guide_trace.nodes[name]
            events[name] = site["fn"].event_shape
            value = site["value"].expand(k, len(rows), *events[name])
            draws.setdefault(name, []).append(_flatten_event(value, events[name]).double().cpu())
        log_lik.append(terms.log_lik.double().cpu())
        log_w.append(terms.log_weights.double().cpu())
        remaining -= k
    return {"draws": {name: torch.cat(parts).numpy() for name, parts in draws.items()},
            "events": events, "log_lik": torch.cat(log_lik).numpy(),
            "log_w": torch.cat(log_w).numpy(),
            "obs_site": _observed_data_site(prep.model_fn, xs, ms),
            "eps": torch.finfo(prep.x.dtype).eps, "feature_names": prep.feature_names,
            "x_rows": xs.double().cpu().numpy(),
            "mask_rows": None if ms is None else ms.cpu().numpy().astype(np.int8)}


def _draw_groups(drawn: Dict[str, Any], rows: np.ndarray, num_draws: int,
                 created: Dict[str, Any]) -> Dict[str, Any]:
    """The ``posterior``, ``log_likelihood``, ``sample_stats``, ``observed_data`` (and
    ``constant_data``) groups."""
    import xarray as xr

    row_coord = {"row": rows.astype(np.int64)}
    sites = list(drawn["draws"])
    posterior_vars, posterior_coords = {}, dict(row_coord)
    for name in sites:
        dim = "latent_dim" if len(sites) == 1 else f"{name}_dim"
        posterior_coords[dim] = _latent_labels(name, drawn["events"][name])
        posterior_vars[name] = (("chain", "draw", "row", dim), drawn["draws"][name][None])
    chain_draw = {"chain": np.array([0]), "draw": np.arange(num_draws)}
    posterior = xr.Dataset(posterior_vars, coords={**chain_draw, **posterior_coords}, attrs={
        **created, "inference": "variational",
        "description": "draws z_k ~ q(z | x_row) from the guide (variational posterior q(z|x)); "
                       "not exact posterior draws",
        "num_draws": num_draws})
    log_likelihood = xr.Dataset(
        {drawn["obs_site"]: (("chain", "draw", "row"), drawn["log_lik"][None])},
        coords={**chain_draw, **row_coord}, attrs={
            **created, "description": "log p(x_row | z_k) at the guide draws of the posterior "
                                      "group (draws from q, not p(z|x): loo/waic do not apply)"})
    sample_stats = xr.Dataset(
        {"log_importance_weight": (("chain", "draw", "row"), drawn["log_w"][None])},
        coords={**chain_draw, **row_coord}, attrs={
            **created, "description": "log p(x_row, z_k) - log q(z_k | x_row)"})
    feature_coords = {**row_coord, "feature": drawn["feature_names"]}
    groups = {"posterior": posterior, "log_likelihood": log_likelihood,
              "sample_stats": sample_stats,
              "observed_data": xr.Dataset({drawn["obs_site"]: (("row", "feature"),
                                                               drawn["x_rows"])},
                                          coords=feature_coords, attrs=created)}
    if drawn["mask_rows"] is not None:
        groups["constant_data"] = xr.Dataset({"mask": (("row", "feature"), drawn["mask_rows"])},
                                             coords=feature_coords,
                                             attrs={**created, "description": "1 = observed"})
    return groups


def _log_px_vars(drawn, rows, num_draws, loglik, n: int, diag_vars, diag_attrs) -> None:
    """Per-row ``log_px_estimate`` and ``log_px_se``: from ``loglik`` when given, else from
    the exported draws."""
    log_w_arr = drawn["log_w"]
    if loglik is not None:
        log_px, log_px_se = _loglik_per_row(loglik, rows, n)
        diag_attrs["log_px_source"] = f"user-supplied ({type(loglik).__name__})"
    else:
        log_px = _logsumexp(log_w_arr, axis=0) - math.log(num_draws)
        scaled = np.exp(log_w_arr - log_w_arr.max(0, keepdims=True))
        log_px_se = (scaled.std(0, ddof=1) / (scaled.mean(0) * math.sqrt(num_draws))
                     if num_draws > 1 else np.full(len(rows), np.nan))
        diag_attrs["log_px_source"] = (f"importance sampling with the {num_draws} guide draws of "
                                       f"the posterior group (an estimate, biased low)")
    diag_vars["log_px_estimate"] = (("row",), np.asarray(log_px, dtype=float))
    diag_vars["log_px_se"] = (("row",), np.asarray(log_px_se, dtype=float))


def _khat_vars(drawn, rows, num_draws, importance, diag_vars, diag_attrs) -> None:
    """Per-row k-hat and ESS: from ``importance`` when given, else PSIS on the exported draws
    (from 25 draws on)."""
    if importance is not None:
        table = importance.per_row.set_index("row")
        missing = sorted(set(rows.tolist()) - set(table.index.tolist()))
        if missing:
            raise ValueError(f"importance diagnostics lack rows {missing[:10]} that are exported")
        selected = table.loc[rows]
        for col in ("khat", "ess", "ess_fraction"):
            diag_vars[col] = (("row",), selected[col].to_numpy(dtype=float))
        diag_attrs.update(importance.to_dict())
        diag_attrs["khat_source"] = f"importance_diagnostics with K = {importance.num_samples}"
    elif num_draws >= 25:
        own = _weight_summaries(drawn["log_w"].T.copy(), drawn["eps"], 0)
        diag_vars["khat"] = (("row",), own["khat"])
        diag_vars["ess"] = (("row",), own["ess"])
        diag_vars["ess_fraction"] = (("row",), own["ess"] / num_draws)
        diag_attrs["khat_source"] = f"PSIS on the {num_draws} exported draws per row"


def _latent_vars(latent, diag_vars, diag_attrs, diag_coords) -> None:
    per_dim = latent.per_dim
    diag_coords["latent_dim"] = per_dim["latent_dim"].tolist()
    for col in ("activity", "kl", "kl_se"):
        diag_vars[col] = (("latent_dim",), per_dim[col].to_numpy(dtype=float))
    for col in ("active", "collapsed"):
        diag_vars[col] = (("latent_dim",), per_dim[col].to_numpy().astype(np.int8))
    diag_attrs.update(latent.to_dict())
    diag_attrs.update({"kl_total_method": latent.kl_total_method,
                       "kl_methods": ",".join(sorted(set(per_dim["kl_method"]))),
                       "mean_method": latent.mean_method,
                       "posterior_collapse": latent.posterior_collapse,
                       "activity_threshold": latent.threshold,
                       "collapse_threshold": latent.collapse_threshold})


def to_inference_data(pair, data, *, rows=None, num_draws: int = 200, loglik=None,
                      diagnostics=None, mask=None, device="auto", seed: int = 0, guide=None,
                      param_state=None):
    """Export guide draws, log-likelihood terms, data and diagnostics as ArviZ InferenceData.

    Groups (``row`` is the index of the exported data row, ``draw`` the guide draw):

    * ``posterior`` -- one variable per latent site, dims ``(chain, draw, row, latent_dim)``
      (``<site>_dim`` when there are several sites; event dims flattened, labels such as
      ``z[3]``): draws :math:`z_k \\sim q(z \\mid x_i)` from the guide, i.e. the *variational*
      posterior, not exact posterior draws (``chain`` has length 1).
    * ``log_likelihood`` -- the observed site's :math:`\\log p(x_i \\mid z_k)` at those draws,
      dims ``(chain, draw, row)``. Because the draws come from q, not from p(z|x),
      ``az.loo``/``az.waic`` on this group do not estimate predictive accuracy.
    * ``sample_stats`` -- ``log_importance_weight``
      :math:`\\log p(x_i, z_k) - \\log q(z_k \\mid x_i)`, dims ``(chain, draw, row)``.
    * ``observed_data`` -- the exported rows, dims ``(row, feature)``;
      ``constant_data`` holds the mask (int8, 1 = observed) when one is given.
    * ``diagnostics`` -- per row: ``log_px_estimate`` and ``log_px_se`` (an estimate of
      log p(x_i), from ``loglik`` when given -- e.g. :func:`inference.evaluate.log_likelihood`
      -- else importance sampling with the draws above, see the group's ``log_px_source``
      attribute), ``khat``, ``ess``, ``ess_fraction``; per latent dimension (dim
      ``latent_dim``): ``activity``, ``active``, ``kl``, ``kl_se``, ``collapsed`` (0/1); the
      scalar summaries as attributes.

    Parameters
    ----------
    rows : sequence of int, optional
        Data rows to export (default: the first 20).
    num_draws : int
        Guide draws per row.
    loglik : LogLikelihoodEstimate, DataFrame with ``log_px`` (and ``se``) or array, optional
        Per-row log p(x) estimates, one per data row or one per exported row.
    diagnostics : Diagnostics, ImportanceDiagnostics, LatentUsage or a list of them, optional
        When None, k-hat and ESS come from the exported draws (``num_draws`` >= 25) and latent
        usage is computed on all of ``data``.
    mask, device, seed, guide, param_state
        As in :func:`importance_diagnostics`.

    Returns
    -------
    arviz.InferenceData
        Writable with ``idata.to_netcdf(path)`` (all attributes are strings or numbers).
    """
    import arviz as az
    import xarray as xr

    num_draws = _check_int(num_draws, "num_draws", 1)
    importance, latent = _collect_diagnostics(diagnostics)
    with _prepare(pair, data, mask, device, guide=guide, param_state=param_state) as prep, \
            torch.no_grad(), _seeded(seed, prep.device):
        n = prep.x.shape[0]
        rows = _check_rows(rows, n)
        drawn = _guide_draws(prep, rows, num_draws)
    if latent is None and diagnostics is None:
        latent = latent_usage(pair, data, mask=mask, device=device, seed=seed, guide=guide,
                              progress=False, param_state=param_state) if n >= 2 else None
    created = {"created_by": "pyro-lvm inference.diagnostics.to_inference_data",
               "pyro_version": str(pyro.__version__), "torch_version": str(torch.__version__),
               "seed": int(seed)}
    groups = _draw_groups(drawn, rows, num_draws, created)
    diag_vars: Dict[str, Any] = {}
    diag_attrs: Dict[str, Any] = {**created}
    diag_coords: Dict[str, Any] = {"row": rows.astype(np.int64)}
    _log_px_vars(drawn, rows, num_draws, loglik, n, diag_vars, diag_attrs)
    _khat_vars(drawn, rows, num_draws, importance, diag_vars, diag_attrs)
    if latent is not None:
        _latent_vars(latent, diag_vars, diag_attrs, diag_coords)
    groups["diagnostics"] = xr.Dataset(diag_vars, coords=diag_coords, attrs={
        key: _netcdf_attr(value) for key, value in diag_attrs.items()})
    for ds in groups.values():
        ds.attrs = {key: _netcdf_attr(value) for key, value in ds.attrs.items()}
    return az.InferenceData(**groups)
