"""Posterior diagnostics for any model/guide pair.

How good is the guide :math:`q_\\phi(z \\mid x)` as an approximation of
:math:`p_\\theta(z \\mid x)`, which latent dimensions does the model use, and does the
fitted model reproduce the data?

* :func:`importance_diagnostics` -- per-row Pareto :math:`\\hat k` of the importance weights
  :math:`w_k = p(x, z_k) / q(z_k \\mid x)` (PSIS, Vehtari et al. 2024) and their effective
  sample size. This is the variational-inference check of Yao, Vehtari, Simpson & Gelman
  (2018), "Yes, but did it work?", applied to each data point's local posterior.
* :func:`latent_usage` -- active units (Burda, Grosse & Salakhutdinov 2016) and
  :math:`\\mathrm{KL}(q(z \\mid x) \\,\\|\\, p(z))` per latent dimension; posterior collapse.
* :func:`posterior_predictive_check` -- replicated data sets from the fitted model and
  tail probabilities of summary statistics (Gelman, Meng & Stern 1996).
* :func:`amortization_gap` -- ELBO of a per-row (non-amortized) Gaussian guide minus the
  ELBO of the amortized guide (Cremer, Li & Duvenaud 2018).
* :func:`to_inference_data` -- an :class:`arviz.InferenceData` (NetCDF-writable).
* :func:`diagnose` -- all of the above in one bundle.

Every function accepts any pair keeping the model/guide contract (see ``DESIGN.md``); all
importance weights and latent draws come from :func:`inference.objectives.trace_log_terms`.
Evaluation runs under :func:`torch.no_grad` and in an isolated Pyro parameter store, with a
local random stream (the global torch RNG state is restored afterwards).
"""
from __future__ import annotations

import contextlib
import json
import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from torch.distributions import kl_divergence
from tqdm.auto import tqdm

from pyro_lvm.models.validation import check_data, check_mask

from ._runtime import isolated_param_store, release_host_memory, resolve_device, resolve_pair
from .objectives import PARTICLE_PLATE, log_weights, trace_log_terms

__all__ = [
    "KHAT_GOOD",
    "KHAT_OK",
    "ImportanceDiagnostics",
    "LatentUsage",
    "Diagnostics",
    "importance_diagnostics",
    "latent_usage",
    "posterior_predictive_check",
    "amortization_gap",
    "to_inference_data",
    "diagnose",
]

#: Pareto k-hat below which importance sampling is reliable (Vehtari et al. 2024).
KHAT_GOOD = 0.5
#: Pareto k-hat above which importance sampling (and the guide) should not be trusted.
KHAT_OK = 0.7

#: Number of tensor elements one vectorized model pass may hold per [particles, rows, width]
#: tensor; rows and particles are chunked so memory stays bounded for any request.
_ELEMENT_BUDGET = 2 ** 23

#: Smallest "width" assumed for one row of one particle when sizing chunks: the model's hidden
#: layers (unknown here) may be wider than the data.
_MIN_WIDTH = 256

_BUILTIN_STATISTICS = ("mean", "variance", "skewness", "kurtosis", "min", "max", "correlation")


# --------------------------------------------------------------------------------------
# shared plumbing
# --------------------------------------------------------------------------------------
@dataclass
class _Prepared:
    pair: Any
    model_fn: Callable
    guide_fn: Callable
    module: Optional[torch.nn.Module]
    x: torch.Tensor
    mask: Optional[torch.Tensor]
    device: torch.device
    feature_names: List[str]


def _module_dtype_device(module) -> Tuple[Optional[torch.dtype], Optional[torch.device]]:
    if module is None:
        return None, None
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype, tensor.device
    return None, None


def _feature_names(data, width: int) -> List[str]:
    columns = getattr(data, "columns", None)
    if columns is not None and len(columns) == width:
        return [str(c) for c in columns]
    return [f"x[{j}]" for j in range(width)]


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_positive(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


@contextlib.contextmanager
def _prepare(pair, data, mask, device, *, guide=None, min_rows: int = 1,
             param_state=None) -> Iterator[_Prepared]:
    """Validate the data, move pair and data to ``device``, switch the module to eval mode and
    isolate the param store.

    The module is moved back to its original device and training flag on exit, so a
    diagnostic never leaves the user's model somewhere else than it found it. Pairs of plain
    functions keep their parameters in the global Pyro param store: they are evaluated on a
    detached snapshot of it (or of ``param_state``, e.g. ``FitResult.param_store_state``),
    so nothing here can change them.
    """
    model_fn, guide_fn, module = resolve_pair(pair, guide)
    dev = resolve_device(device)
    dtype, original_device = _module_dtype_device(module)
    x = check_data(data, name="data", min_rows=min_rows, mask=mask, dtype=dtype)
    feature_names = _feature_names(data, x.shape[1])
    mask_t = None
    if mask is not None:
        mask_t = torch.as_tensor(check_mask(mask, tuple(x.shape), name="data"))
    model_check = getattr(pair, "check_data", None)
    if callable(model_check):
        checked = model_check(x, mask=mask_t)
        if isinstance(checked, torch.Tensor):
            x = checked
    if param_state is None and module is None:
        param_state = pyro.get_param_store().get_state()
    if param_state is not None:
        param_state = {"params": {k: v.detach().to(dev) for k, v in param_state["params"].items()},
                       "constraints": dict(param_state["constraints"])}
    moved = module is not None and original_device is not None and original_device != dev
    was_training = module.training if module is not None else False
    try:
        if moved:
            module.to(dev)
        if module is not None:
            module.eval()  # dropout / batch norm in evaluation mode
        x = x.to(dev)
        if mask_t is not None:
            mask_t = mask_t.to(dev)
        with isolated_param_store(param_state):
            yield _Prepared(pair, model_fn, guide_fn, module, x, mask_t, dev, feature_names)
    finally:
        if module is not None and was_training:
            module.train()
        if moved:
            module.to(original_device)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    """A private random stream: seeds torch (and CUDA) and restores the previous state after."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


def _progress(total: int, desc: str, progress: Optional[bool]):
    # progress=None: let tqdm decide (it hides itself when stderr is not a terminal).
    return tqdm(total=total, desc=desc, leave=False,
                disable=None if progress is None else not progress)


def _chunk_sizes(num_rows: int, num_particles: int, width: int,
                 batch_size: Optional[int]) -> Tuple[int, int]:
    """Rows per batch and particles per vectorized pass so one [K, B, width] tensor stays
    within the element budget."""
    width = max(_MIN_WIDTH, width)
    if batch_size is None:
        batch_size = max(1, _ELEMENT_BUDGET // (num_particles * width))
    else:
        batch_size = _check_int(batch_size, "batch_size", 1)
    batch_size = min(batch_size, num_rows)
    particle_chunk = max(1, min(num_particles, _ELEMENT_BUDGET // (batch_size * width)))
    return batch_size, particle_chunk


def _draw_width(model_fn, guide_fn, x: torch.Tensor, mask, pair=None, *,
                probe_rows: Optional[int] = 1) -> int:
    """Elements per particle and row that one vectorized pass keeps alive: the data width,
    the widest sample site, what a site's ``log_prob`` materializes (e.g. a mixture prior's
    ``[..., C]`` component matrix; :func:`inference.evaluate.distribution_eval_width`) and
    the pair's own ``eval_width`` hint (:func:`inference.evaluate.pair_eval_width`).
    Found from one particle on ``probe_rows`` rows (None: all; for guides with per-row
    parameters), without advancing the random stream."""
    from .evaluate import distribution_eval_width, pair_eval_width

    width = int(x.shape[1]) if x.dim() > 1 else 1
    if pair is not None:
        width = max(width, pair_eval_width(pair))
    rows = slice(None) if probe_rows is None else slice(0, probe_rows)
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        try:
            probe = trace_log_terms(model_fn, guide_fn, x[rows], 1,
                                    None if mask is None else mask[rows])
        except (ValueError, RuntimeError):
            if probe_rows is None:
                raise
            # e.g. a guide with one parameter per data row only accepts all of them
            probe = trace_log_terms(model_fn, guide_fn, x, 1, mask)
    for trace in (probe.model_trace, probe.guide_trace):
        for site in trace.nodes.values():
            if site["type"] != "sample":
                continue
            if isinstance(site["value"], torch.Tensor):
                width = max(width, int(site["value"].numel()))
            width = max(width, distribution_eval_width(site["fn"]))
    return width


def _log_weight_matrix(model_fn, guide_fn, x, mask, num_particles: int,
                       particle_chunk: int) -> torch.Tensor:
    """Log importance weights ``[K, B]`` for one batch of rows, particles drawn in chunks."""
    parts = []
    remaining = num_particles
    while remaining > 0:
        k = min(particle_chunk, remaining)
        parts.append(log_weights(model_fn, guide_fn, x, k, mask).detach())
        remaining -= k
    return torch.cat(parts, dim=0)


def _iter_log_weights(prep: _Prepared, num_particles: int, batch_size, progress, desc: str):
    """Yield ``(row_slice, log_w [K, B])`` over the data in row batches."""
    model_fn, guide_fn, x, mask = prep.model_fn, prep.guide_fn, prep.x, prep.mask
    n = x.shape[0]
    width = _draw_width(model_fn, guide_fn, x, mask, prep.pair)
    rows_per_batch, particle_chunk = _chunk_sizes(n, num_particles, width, batch_size)
    starts = range(0, n, rows_per_batch)
    with _progress(len(starts), desc, progress) as bar:
        for start in starts:
            rows = slice(start, min(n, start + rows_per_batch))
            xb = x[rows]
            mb = None if mask is None else mask[rows]
            yield rows, _log_weight_matrix(model_fn, guide_fn, xb, mb, num_particles,
                                           particle_chunk)
            if x.device.type == "cpu":
                release_host_memory()  # see inference._runtime: a long loop fragments the heap
            bar.update(1)


def _latent_labels(site: str, event_shape: torch.Size) -> List[str]:
    if len(event_shape) == 0:
        return [site]
    labels = []
    for index in np.ndindex(*event_shape):
        inner = ",".join(str(i) for i in index)
        labels.append(f"{site}[{inner}]")
    return labels


def _flatten_event(value: torch.Tensor, event_shape: torch.Size) -> torch.Tensor:
    """``[..., *event]`` -> ``[..., prod(event)]``."""
    lead = value.shape[: value.dim() - len(event_shape)]
    return value.reshape(*lead, int(np.prod(event_shape)) if len(event_shape) else 1)


def _guide_sites(terms) -> List[str]:
    sites = terms.latent_sites()
    if not sites:
        raise ValueError("the guide has no latent sample site; there is nothing to diagnose")
    return sites


def _observed_data_site(model_fn, x, mask) -> str:
    """Name of the model's observed site that holds the data matrix (``"x"`` in our models)."""
    trace = poutine.trace(model_fn).get_trace(x, mask=mask)
    candidates = [name for name, site in trace.nodes.items()
                  if site["type"] == "sample" and site["is_observed"]
                  and tuple(torch.as_tensor(site["value"]).shape) == tuple(x.shape)]
    if len(candidates) == 1:
        return candidates[0]
    if "x" in candidates:
        return "x"
    if not candidates:
        raise ValueError(
            f"the model has no observed sample site whose value has the data's shape "
            f"{tuple(x.shape)}; the contract needs pyro.sample('x', ..., obs=x)")
    raise ValueError(f"the model has several observed sites holding the data ({candidates}); "
                     f"name the data site 'x'")


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


# --------------------------------------------------------------------------------------
# importance diagnostics: PSIS k-hat and ESS per row
# --------------------------------------------------------------------------------------
def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    top = np.max(a, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        out = np.log(np.sum(np.exp(a - top), axis=axis, keepdims=True)) + top
    return np.squeeze(out, axis=axis)


def _weight_summaries(log_w: np.ndarray, eps: float, first_row: int) -> Dict[str, np.ndarray]:
    """PSIS k-hat, ESS and the IS estimate of log p(x) per row of ``log_w`` ([B, K], float64).

    Rows whose log weights vary by less than ``sqrt(eps) * max(1, |log w|)`` (half the working
    precision) have numerically constant weights: the guide is the exact posterior there and
    a generalized Pareto fit to rounding noise would be meaningless, so k-hat is set to
    ``-inf`` (lighter than any tail) and the ESS to K.
    """
    num_rows, k = log_w.shape
    if np.isnan(log_w).any() or np.isposinf(log_w).any():
        bad = np.nonzero(np.isnan(log_w).any(1) | np.isposinf(log_w).any(1))[0] + first_row
        raise ValueError(
            f"log importance weights are NaN or +inf for data row(s) {bad[:5].tolist()}: the model "
            f"or guide density is not finite there (check the data range and the model's support)")
    all_zero = np.isneginf(log_w).all(axis=1)
    if all_zero.any():
        bad = np.nonzero(all_zero)[0] + first_row
        raise ValueError(
            f"every importance weight is zero (log weight -inf) for data row(s) "
            f"{bad[:5].tolist()}: "
            f"the guide proposes only values outside the model's support")
    finite_max = np.max(np.where(np.isfinite(log_w), log_w, -np.inf), axis=1)
    finite_min = np.min(np.where(np.isfinite(log_w), log_w, np.inf), axis=1)
    constant = (~np.isneginf(log_w).any(axis=1)) & (
        finite_max - finite_min <= math.sqrt(eps) * np.maximum(1.0, np.abs(finite_max)))

    lse = _logsumexp(log_w, axis=1)
    ess = np.exp(2.0 * lse - _logsumexp(2.0 * log_w, axis=1))
    khat = np.full(num_rows, -np.inf)
    ess_psis = ess.copy()
    varying = np.nonzero(~constant)[0]
    if len(varying):
        # psislw normalizes its input in place, so it gets a copy; samples are on the last axis.
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            import arviz as az

            smoothed, k_varying = az.psislw(np.array(log_w[varying], dtype=np.float64, copy=True),
                                            reff=1.0)
        khat[varying] = np.asarray(k_varying, dtype=np.float64)
        # smoothed log weights are normalized: ESS = 1 / sum(w~^2)
        ess_psis[varying] = np.exp(-_logsumexp(2.0 * np.asarray(smoothed), axis=1))
    ess[constant] = k
    ess_psis[constant] = k

    log_px = lse - math.log(k)
    # delta method: Var(log mean w) ~= Var(w) / (K mean(w)^2); weights rescaled by their max.
    scaled = np.exp(log_w - finite_max[:, None])
    mean_w = scaled.mean(axis=1)
    sd_w = scaled.std(axis=1, ddof=1)
    log_px_se = sd_w / (mean_w * math.sqrt(k))
    log_px_se[constant] = 0.0
    return {"khat": khat, "ess": ess, "ess_psis": ess_psis, "log_px": log_px,
            "log_px_se": log_px_se, "constant": constant}


def _khat_category(khat: np.ndarray) -> np.ndarray:
    # +inf: ArviZ could not fit the tail (fewer than 5 distinct large weights, e.g. a discrete
    # latent with few values); NaN: the fit failed. Neither says how heavy the tail is.
    category = np.full(khat.shape, "undetermined", dtype=object)
    category[khat < KHAT_GOOD] = "good"
    category[(khat >= KHAT_GOOD) & (khat <= KHAT_OK)] = "ok"
    category[(khat > KHAT_OK) & np.isfinite(khat)] = "bad"
    return category


@dataclass
class ImportanceDiagnostics:
    """Per-row PSIS diagnostics of the guide as an importance sampling proposal.

    Attributes
    ----------
    per_row : pandas.DataFrame
        One row per data row: ``row``, ``khat`` (Pareto shape of the weights' right tail;
        ``-inf`` when the weights are constant to working precision, ``inf`` when the tail
        had too few distinct values to fit, e.g. for a discrete latent with few states),
        ``category`` (``good`` k < 0.5, ``ok`` 0.5 <= k <= 0.7, ``bad`` k > 0.7,
        ``undetermined`` for ``inf`` or a failed fit; median and max k-hat skip those), ``ess`` and ``ess_fraction``
        (:math:`(\\sum_k w_k)^2 / \\sum_k w_k^2` and that over K), ``ess_psis`` and
        ``ess_psis_fraction`` (the same for the Pareto-smoothed weights), ``constant_weights``,
        ``log_px_estimate`` and ``log_px_se`` (the importance-sampled estimate
        :math:`\\log \\frac1K \\sum_k w_k` of log p(x) and its delta-method Monte Carlo
        standard error; an estimate, consistent as K grows, biased low for finite K).
    num_samples : int
        K, the number of importance samples per row.
    """

    per_row: pd.DataFrame
    num_samples: int

    def _fraction(self, category: str) -> float:
        return float((self.per_row["category"] == category).mean())

    @property
    def fraction_good(self) -> float:
        """Fraction of rows with k-hat < 0.5."""
        return self._fraction("good")

    @property
    def fraction_ok(self) -> float:
        """Fraction of rows with 0.5 <= k-hat <= 0.7 (usable)."""
        return self._fraction("ok")

    @property
    def fraction_bad(self) -> float:
        """Fraction of rows with k-hat > 0.7 (importance sampling, and the guide, unreliable)."""
        return self._fraction("bad")

    @property
    def fraction_undetermined(self) -> float:
        return self._fraction("undetermined")

    def _khat_stat(self, reducer) -> float:
        khat = self.per_row["khat"].to_numpy()
        khat = khat[~(np.isnan(khat) | np.isposinf(khat))]  # undetermined fits
        return float(reducer(khat)) if len(khat) else float("nan")

    @property
    def khat_median(self) -> float:
        """Median k-hat over rows (``-inf`` when most rows have constant weights)."""
        return self._khat_stat(np.median)

    @property
    def khat_max(self) -> float:
        return self._khat_stat(np.max)

    @property
    def ess_fraction_median(self) -> float:
        return float(np.median(self.per_row["ess_fraction"].to_numpy()))

    def to_dict(self) -> Dict[str, float]:
        """Flat floats; k-hat values may be ``-inf`` (constant weights, i.e. an exact guide)."""
        return {
            "khat_median": self.khat_median,
            "khat_max": self.khat_max,
            "khat_fraction_good": self.fraction_good,
            "khat_fraction_ok": self.fraction_ok,
            "khat_fraction_bad": self.fraction_bad,
            "ess_fraction_median": self.ess_fraction_median,
            "ess_psis_fraction_median": float(np.median(self.per_row["ess_psis_fraction"])),
            "importance_num_samples": float(self.num_samples),
        }

    def summary(self) -> str:
        n = len(self.per_row)
        return (
            f"Pareto k-hat of the importance weights over {n} rows (K = {self.num_samples}): "
            f"median {self.khat_median:.3g}, max {self.khat_max:.3g}; "
            f"{100 * self.fraction_good:.1f}% good (k < {KHAT_GOOD}), "
            f"{100 * self.fraction_ok:.1f}% ok ({KHAT_GOOD}-{KHAT_OK}), "
            f"{100 * self.fraction_bad:.1f}% bad (k > {KHAT_OK})"
            + (f", {100 * self.fraction_undetermined:.1f}% undetermined"
               if self.fraction_undetermined > 0 else "")
            + f". Median ESS fraction {self.ess_fraction_median:.3g}.")


def importance_diagnostics(pair, data, num_samples: int = 1000, *, mask=None, device="auto",
                           seed: int = 0, batch_size: Optional[int] = None,
                           progress: Optional[bool] = None, guide=None,
                           param_state=None) -> ImportanceDiagnostics:
    """Per-row Pareto k-hat and effective sample size of the importance weights.

    For each data row :math:`x_i`, draw :math:`z_{ik} \\sim q(z \\mid x_i)`, ``k = 1..K``, and form
    :math:`w_{ik} = p(x_i, z_{ik}) / q(z_{ik} \\mid x_i)`. Pareto smoothed importance sampling
    (ArviZ :func:`arviz.psislw`) fits a generalized Pareto distribution to the largest weights;
    its shape :math:`\\hat k` says how heavy the right tail of the weights is. If
    :math:`\\hat k < 0.5` the weights have finite variance and the guide is a usable proposal
    (and close to the posterior); :math:`0.5 \\le \\hat k \\le 0.7` is usable with PSIS;
    :math:`\\hat k > 0.7` means the importance-sampled estimates for that row (including
    ``log p(x)``) are unreliable and the guide misses posterior mass -- typically it is too
    narrow. This is the check of Yao, Vehtari, Simpson & Gelman (2018) applied to each data
    point's posterior.

    Parameters
    ----------
    pair : model/guide pair (see :func:`inference._runtime.resolve_pair`)
    data : array-like, shape (n, p)
    num_samples : int
        K, importance samples per row. k-hat is unreliable with fewer than about 100
        samples (the tail fit uses only the largest :math:`\\min(K/5, 3\\sqrt{K})` weights);
        the minimum accepted is 25.
    mask : bool array-like, optional
        Observed entries (passed to model and guide).
    device, seed, batch_size, progress, guide
        Device (``"auto"``), seed of the private random stream, rows per vectorized pass
        (default: chosen to bound memory), progress bar (None: auto), explicit guide.
    param_state : dict, optional
        A Pyro param-store state to evaluate plain-function pairs with (e.g.
        ``FitResult.param_store_state``); default: a snapshot of the global store.
        ``PyroModule`` pairs carry their own parameters and need none.

    Returns
    -------
    ImportanceDiagnostics

    References
    ----------
    Yao, Y., Vehtari, A., Simpson, D. & Gelman, A. (2018). Yes, but did it work?: Evaluating
    variational inference. ICML.
    Vehtari, A., Simpson, D., Gelman, A., Yao, Y. & Gabry, J. (2024). Pareto smoothed
    importance sampling. JMLR 25(72).
    """
    num_samples = _check_int(num_samples, "num_samples", 25)
    frames = []
    with _prepare(pair, data, mask, device, guide=guide, param_state=param_state) as prep, \
            torch.no_grad(), _seeded(seed, prep.device):
        for rows, log_w in _iter_log_weights(prep, num_samples, batch_size, progress,
                                             desc="importance diagnostics"):
            eps = torch.finfo(log_w.dtype).eps
            summary = _weight_summaries(log_w.T.double().cpu().numpy(), eps, rows.start)
            frames.append(pd.DataFrame({
                "row": np.arange(rows.start, rows.stop),
                "khat": summary["khat"],
                "ess": summary["ess"],
                "ess_fraction": summary["ess"] / num_samples,
                "ess_psis": summary["ess_psis"],
                "ess_psis_fraction": summary["ess_psis"] / num_samples,
                "constant_weights": summary["constant"],
                "log_px_estimate": summary["log_px"],
                "log_px_se": summary["log_px_se"],
            }))
    per_row = pd.concat(frames, ignore_index=True)
    per_row.insert(2, "category", _khat_category(per_row["khat"].to_numpy()))
    return ImportanceDiagnostics(per_row=per_row, num_samples=num_samples)


# --------------------------------------------------------------------------------------
# latent usage: active units and KL per dimension
# --------------------------------------------------------------------------------------
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

        width = _draw_width(prep.model_fn, prep.guide_fn, x, prep.mask, prep.pair)
        rows_per_batch, _ = _chunk_sizes(n, num_samples, width, batch_size)
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


# --------------------------------------------------------------------------------------
# posterior predictive checks
# --------------------------------------------------------------------------------------
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
        chunk = max(1, min(num_replicates, _ELEMENT_BUDGET // (n * max(p, _MIN_WIDTH))))
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
    table = pd.concat(frames, ignore_index=True)
    table.attrs.update({
        "kind": kind, "num_replicates": num_replicates, "observed_site": site,
        "extreme": float(extreme),
        "correlation_features": [prep.feature_names[j] for j in plan.corr_features],
    })
    return table


# --------------------------------------------------------------------------------------
# amortization gap
# --------------------------------------------------------------------------------------
class _LocalGaussianGuide:
    """A per-row (non-amortized) Gaussian guide over the amortized guide's latent sites."""

    def __init__(self, sites: Dict[str, Tuple[torch.Size, torch.Tensor, torch.Tensor]],
                 covariance: str):
        self.event_shapes, self.full = {}, {}
        self.loc, self.raw_scale, self.raw_tril = {}, {}, {}
        for name, (event, mean, scale_tril) in sites.items():
            self.event_shapes[name] = event
            # a scalar latent has nothing to correlate: its "full" Gaussian is the diagonal one
            self.full[name] = covariance == "full" and len(event) == 1
            self.loc[name] = mean.detach().clone().requires_grad_(True)
            if self.full[name]:
                diag = torch.diagonal(scale_tril, dim1=-2, dim2=-1)
            else:
                # marginal standard deviations sqrt(diag(L L^T)) = row norms of L
                diag = scale_tril.norm(dim=-1)
            self.raw_scale[name] = diag.clamp_min(1e-30).log().detach().clone().requires_grad_(True)
            if self.full[name]:
                lower = torch.tril(scale_tril, -1).detach().clone()
                self.raw_tril[name] = lower.requires_grad_(True)

    def parameters(self) -> List[torch.Tensor]:
        return [*self.loc.values(), *self.raw_scale.values(), *self.raw_tril.values()]

    def distribution(self, name: str, detach: bool = False):
        loc, log_scale = self.loc[name], self.raw_scale[name]
        if detach:
            loc, log_scale = loc.detach(), log_scale.detach()
        event = self.event_shapes[name]
        n = loc.shape[0]
        if self.full[name]:
            lower = self.raw_tril[name].detach() if detach else self.raw_tril[name]
            scale_tril = torch.tril(lower, -1) + torch.diag_embed(log_scale.exp())
            return dist.MultivariateNormal(loc, scale_tril=scale_tril)
        if len(event) == 0:
            return dist.Normal(loc[:, 0], log_scale[:, 0].exp())
        return dist.Normal(loc.reshape(n, *event),
                           log_scale.exp().reshape(n, *event)).to_event(len(event))

    def __call__(self, x, mask=None):
        with pyro.plate("data", x.shape[0], dim=-1):
            for name in self.loc:
                pyro.sample(name, self.distribution(name))


def _has_real_support(fn) -> bool:
    support = fn.support
    while isinstance(support, torch.distributions.constraints.independent):
        support = support.base_constraint
    return support is torch.distributions.constraints.real or \
        support is torch.distributions.constraints.real_vector


def _site_init(fn, value: torch.Tensor, event: torch.Size):
    """Mean ``[n, D]`` and scale_tril ``[n, D, D]`` of one guide site (particle dim averaged)."""
    base, _ = _unwrap_independent(fn)
    if len(event) == 1 and isinstance(base, (torch.distributions.MultivariateNormal,
                                             torch.distributions.LowRankMultivariateNormal)):
        mean = base.mean.expand(value.shape)[0]
        tril = base.scale_tril.expand(*value.shape, event[0])[0]
        return mean, tril
    try:
        mean = _flatten_event(fn.mean.expand(value.shape)[0], event)
        sd = _flatten_event(fn.stddev.expand(value.shape)[0], event)
    except NotImplementedError:
        flat = _flatten_event(value, event)
        mean, sd = flat.mean(0), flat.std(0)
    return mean, torch.diag_embed(sd)


def _elbo_per_row(model_fn, guide_fn, x, mask, num_particles: int) -> Tuple[np.ndarray, np.ndarray]:
    """ELBO per row (mean of log weights) and its Monte Carlo standard error."""
    width = _draw_width(model_fn, guide_fn, x, mask, probe_rows=None)
    _, particle_chunk = _chunk_sizes(x.shape[0], num_particles, width, x.shape[0])
    log_w = _log_weight_matrix(model_fn, guide_fn, x, mask, num_particles, particle_chunk).double()
    return (log_w.mean(0).cpu().numpy(),
            (log_w.std(0) / math.sqrt(num_particles)).cpu().numpy())


def amortization_gap(pair, data, *, num_steps: int = 300, lr: float = 0.05,
                     num_particles: int = 16, eval_particles: int = 1000, max_rows: int = 100,
                     covariance: str = "diag", mask=None, device="auto", seed: int = 0,
                     progress: Optional[bool] = None, guide=None,
                     param_state=None) -> Dict[str, Any]:
    """ELBO of a per-row Gaussian guide minus the ELBO of the amortized guide.

    The amortized guide :math:`q_\\phi(z \\mid x)` shares one network across rows; the
    *amortization gap* (Cremer, Li & Duvenaud 2018) is what that sharing costs,

    .. math:: \\Delta_i = \\max_{\\lambda_i} \\mathrm{ELBO}(x_i; q_{\\lambda_i})
              - \\mathrm{ELBO}(x_i; q_\\phi(\\cdot \\mid x_i)),

    with :math:`q_{\\lambda_i}` a Gaussian with its own parameters for row :math:`i`
    (``covariance="diag"``: independent Normal per coordinate; ``"full"``: full-covariance
    Normal, for 1-D latent sites). The local guide is initialised at the amortized guide's
    mean and scale and optimized with Adam (learning rate decaying linearly to 0) on the
    first ``max_rows`` rows of ``data`` (pass held-out rows), the model's parameters frozen.
    Gradients use the "sticking the landing" estimator (Roeder et al. 2017), which has zero
    variance when the guide equals the posterior. Per row, the better of the starting point
    and the optimized parameters is kept (judged with ``eval_particles`` draws), and both
    ELBOs are then re-estimated per row with ``eval_particles`` fresh draws, so the selection
    does not bias the reported values.

    A positive gap means a better guide exists for these rows than the encoder produces.
    Since the local guide starts at the amortized one, a negative gap beyond its standard
    error only arises when the amortized family is richer than the local one (e.g. a
    full-covariance amortized guide against ``covariance="diag"``).

    Parameters
    ----------
    num_steps, lr, num_particles : int, float, int
        Adam steps, initial learning rate and particles per gradient estimate for the local
        guides (all rows are optimized together; their objectives are independent).
    eval_particles : int
        Particles per row for each ELBO estimate.
    max_rows : int
        Number of rows (the first ones) to use; the cost is ``num_steps`` passes over them.
    covariance : {"diag", "full"}
        Local guide family.
    mask, device, seed, progress, guide, param_state
        As in :func:`importance_diagnostics`.

    Returns
    -------
    dict
        ``mean_gap`` (mean of :math:`\\Delta_i`, nats), ``mc_se`` (its Monte Carlo standard
        error for these rows), ``se`` (standard error over rows, std(Delta_i)/sqrt(n), for the
        population of rows; it includes the Monte Carlo noise), ``elbo_amortized``,
        ``elbo_local`` (means over rows), ``num_rows``, ``covariance``, ``num_steps``,
        ``final_loss`` (negative ELBO per row at the last step), ``rows_improved`` (rows where
        the optimized local parameters beat the starting point), and ``per_row`` (DataFrame:
        row, elbo_amortized, elbo_amortized_se, elbo_local, elbo_local_se, gap, gap_se).

    References
    ----------
    Cremer, C., Li, X. & Duvenaud, D. (2018). Inference suboptimality in variational
    autoencoders. ICML.
    Roeder, G., Wu, Y. & Duvenaud, D. (2017). Sticking the landing. NeurIPS.
    """
    num_steps = _check_int(num_steps, "num_steps", 0)
    lr = _check_positive(lr, "lr")
    num_particles = _check_int(num_particles, "num_particles", 1)
    eval_particles = _check_int(eval_particles, "eval_particles", 2)
    max_rows = _check_int(max_rows, "max_rows", 1)
    if covariance not in ("diag", "full"):
        raise ValueError(f"covariance must be 'diag' or 'full', got {covariance!r}")
    with _prepare(pair, data, mask, device, guide=guide, param_state=param_state) as prep, \
            _seeded(seed, prep.device):
        x = prep.x[:max_rows]
        mask_sub = None if prep.mask is None else prep.mask[:max_rows]
        n = x.shape[0]
        with torch.no_grad():
            probe = trace_log_terms(prep.model_fn, prep.guide_fn, x, 1, mask_sub)
            init = {}
            for name in _guide_sites(probe):
                site = probe.guide_trace.nodes[name]
                event = site["fn"].event_shape
                if not _has_real_support(site["fn"]):
                    raise ValueError(
                        f"amortization_gap fits Gaussian local guides, so every latent site must "
                        f"be real-valued; site {name!r} has support {site['fn'].support}")
                if covariance == "full" and len(event) > 1:
                    raise ValueError(
                        f"covariance='full' needs 1-D latent sites; site {name!r} has event shape "
                        f"{tuple(event)} (use covariance='diag')")
                mean, tril = _site_init(site["fn"], site["value"], event)
                init[name] = (event, mean.detach(), tril.detach())
        local = _LocalGaussianGuide(init, covariance)
        params = local.parameters()
        start_values = [q.detach().clone() for q in params]
        optimizer = torch.optim.Adam(params, lr=lr)
        final_loss = float("nan")
        # The model's parameters stay fixed: gradients are taken with torch.autograd.grad
        # with respect to the local parameters only, so nothing accumulates in (or steps)
        # the model's or the amortized guide's parameters. (Setting requires_grad=False on
        # them instead would make pyro.module warn and skip them in the param store.)
        with _progress(num_steps, "amortization gap", progress) as bar:
            for step in range(num_steps):
                # Linear decay to 0: Adam's normalized steps would otherwise keep the
                # iterate bouncing at a distance ~lr around the optimum.
                for group in optimizer.param_groups:
                    group["lr"] = lr * (1.0 - step / num_steps)
                terms = trace_log_terms(prep.model_fn, local, x, num_particles, mask_sub)
                # sticking the landing: log q at the draws with the parameters detached
                log_q = 0.0
                for name in local.loc:
                    value = terms.guide_trace.nodes[name]["value"]
                    log_q = log_q + local.distribution(name, detach=True).log_prob(value)
                elbo = (terms.log_lik + terms.log_prior - log_q).mean(0)
                loss = -elbo.sum()
                if not torch.isfinite(loss):
                    raise RuntimeError(
                        f"amortization_gap: the local-guide ELBO became non-finite at step "
                        f"{step}; lower lr (now {lr})")
                grads = torch.autograd.grad(loss, params)
                for q, g in zip(params, grads):
                    q.grad = g
                optimizer.step()
                final_loss = float(loss.detach()) / n
                bar.update(1)
        with torch.no_grad():
            if num_steps > 0:
                # Per row, keep the better of the starting point and the optimized guide,
                # judged on draws independent of those of the final estimate (no selection bias).
                end_values = [q.detach().clone() for q in params]
                elbo_end, _ = _elbo_per_row(prep.model_fn, local, x, mask_sub, eval_particles)
                for q, start in zip(params, start_values):
                    q.copy_(start)
                elbo_start, _ = _elbo_per_row(prep.model_fn, local, x, mask_sub, eval_particles)
                keep_end = torch.as_tensor(elbo_end > elbo_start, device=x.device)
                for q, start, end in zip(params, start_values, end_values):
                    q.copy_(torch.where(keep_end.reshape(-1, *([1] * (q.dim() - 1))), end, start))
                rows_improved = int(keep_end.sum())
            else:
                rows_improved = 0
            elbo_a, se_a = _elbo_per_row(prep.model_fn, prep.guide_fn, x, mask_sub, eval_particles)
            elbo_l, se_l = _elbo_per_row(prep.model_fn, local, x, mask_sub, eval_particles)
    gap = elbo_l - elbo_a
    gap_se = np.sqrt(se_a ** 2 + se_l ** 2)
    per_row = pd.DataFrame({"row": np.arange(n), "elbo_amortized": elbo_a,
                            "elbo_amortized_se": se_a, "elbo_local": elbo_l,
                            "elbo_local_se": se_l, "gap": gap, "gap_se": gap_se})
    return {
        "mean_gap": float(gap.mean()),
        "mc_se": float(np.sqrt((gap_se ** 2).sum()) / n),
        "se": float(gap.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
        "elbo_amortized": float(elbo_a.mean()),
        "elbo_local": float(elbo_l.mean()),
        "num_rows": n,
        "covariance": covariance,
        "num_steps": num_steps,
        "final_loss": final_loss,
        "rows_improved": rows_improved,
        "per_row": per_row,
    }


# --------------------------------------------------------------------------------------
# bundle
# --------------------------------------------------------------------------------------
@dataclass
class Diagnostics:
    """Everything :func:`diagnose` computed; parts that were not requested are None."""

    importance: Optional[ImportanceDiagnostics] = None
    latent: Optional[LatentUsage] = None
    predictive: Optional[pd.DataFrame] = None
    amortization: Optional[Dict[str, Any]] = None

    def to_dict(self) -> Dict[str, float]:
        """Flat ``name -> float`` for a metrics JSON (k-hat, ESS, active units, KL, PPC, gap)."""
        out: Dict[str, float] = {}
        if self.importance is not None:
            out.update(self.importance.to_dict())
        if self.latent is not None:
            out.update(self.latent.to_dict())
        if self.predictive is not None:
            p_two = self.predictive["p_two_sided"].to_numpy(dtype=float)
            out.update({
                "ppc_num_statistics": float(len(self.predictive)),
                "ppc_num_extreme": float(self.predictive["extreme"].sum()),
                "ppc_fraction_extreme": float(self.predictive["extreme"].mean()),
                "ppc_min_p_two_sided": float(np.nanmin(p_two)) if np.isfinite(p_two).any()
                else float("nan"),
            })
        if self.amortization is not None:
            out.update({
                "amortization_gap": self.amortization["mean_gap"],
                "amortization_gap_se": self.amortization["se"],
                "amortization_gap_mc_se": self.amortization["mc_se"],
            })
        return out

    def summary(self) -> str:
        lines = []
        if self.importance is not None:
            lines.append(self.importance.summary())
        if self.latent is not None:
            lines.append(self.latent.summary())
        if self.predictive is not None:
            table = self.predictive
            source = {"prior": "the fitted marginal p(x)",
                      "posterior": "p(x|z) with z from the guide"}.get(table.attrs.get("kind"), "?")
            lines.append(
                f"Predictive check with {table.attrs.get('num_replicates', '?')} replicates from "
                f"{source}: {int(table['extreme'].sum())} "
                f"of {len(table)} statistics extreme (two-sided p < "
                f"{table.attrs.get('extreme', float('nan')):g}; about "
                f"{table.attrs.get('extreme', 0) * len(table):.1f} expected by chance)"
                + (": " + ", ".join(f"{s} {f}" for s, f in
                                    table.loc[table["extreme"], ["statistic", "feature"]]
                                    .head(8).itertuples(index=False))
                   if table["extreme"].any() else "") + ".")
        if self.amortization is not None:
            gap = self.amortization
            lines.append(
                f"Amortization gap on {gap['num_rows']} rows: ELBO(local {gap['covariance']} "
                f"Gaussian) - ELBO(amortized) = {gap['mean_gap']:.4g} nats per row "
                f"(se {gap['se']:.2g}, Monte Carlo se {gap['mc_se']:.2g}).")
        return "\n".join(lines)


def diagnose(pair, data, *, num_samples: int = 1000, include_predictive: bool = True,
             predictive_kind: str = "prior", num_replicates: int = 100,
             include_amortization_gap: bool = False,
             amortization_kwargs: Optional[Dict[str, Any]] = None, mask=None, device="auto",
             seed: int = 0, batch_size: Optional[int] = None, progress: Optional[bool] = None,
             guide=None, param_state=None) -> Diagnostics:
    """Run the diagnostics of this module on one pair and data set.

    :func:`importance_diagnostics` (``num_samples`` per row), :func:`latent_usage`,
    :func:`posterior_predictive_check` (``include_predictive``) and
    :func:`amortization_gap` (``include_amortization_gap``, with ``amortization_kwargs``;
    off by default because it optimizes a guide per row). All share ``seed``, ``device``,
    ``mask`` and ``guide``.

    Returns
    -------
    Diagnostics
        ``to_dict()`` gives flat floats for a metrics file, ``summary()`` a paragraph.
    """
    common = dict(mask=mask, device=device, seed=seed, progress=progress, guide=guide,
                  param_state=param_state)
    result = Diagnostics()
    result.importance = importance_diagnostics(pair, data, num_samples, batch_size=batch_size,
                                               **common)
    result.latent = latent_usage(pair, data, batch_size=batch_size, **common)
    if include_predictive:
        result.predictive = posterior_predictive_check(pair, data, kind=predictive_kind,
                                                       num_replicates=num_replicates, **common)
    if include_amortization_gap:
        result.amortization = amortization_gap(pair, data, **{**common,
                                                              **(amortization_kwargs or {})})
    return result


# --------------------------------------------------------------------------------------
# ArviZ export
# --------------------------------------------------------------------------------------
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
        n, p = prep.x.shape
        if rows is None:
            rows = np.arange(min(20, n))
        rows = np.asarray(rows)
        if rows.ndim != 1 or len(rows) == 0 or not np.issubdtype(rows.dtype, np.integer):
            raise ValueError(f"rows must be a non-empty 1-D sequence of integers, got {rows!r}")
        if rows.min() < 0 or rows.max() >= n or len(np.unique(rows)) != len(rows):
            raise ValueError(f"rows must be distinct indices in [0, {n}); got {rows.tolist()[:10]}")
        index = torch.as_tensor(rows, device=prep.device)
        xs = prep.x[index]
        ms = None if prep.mask is None else prep.mask[index]
        obs_site = _observed_data_site(prep.model_fn, xs, ms)
        width = max(p, _draw_width(prep.model_fn, prep.guide_fn, xs, ms, prep.pair))
        _, particle_chunk = _chunk_sizes(len(rows), num_draws, width, len(rows))
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
                flat = _flatten_event(value, events[name]).double().cpu()
                draws.setdefault(name, []).append(flat)
            log_lik.append(terms.log_lik.double().cpu())
            log_w.append(terms.log_weights.double().cpu())
            remaining -= k
        eps = torch.finfo(prep.x.dtype).eps
        feature_names = prep.feature_names
        x_rows = xs.double().cpu().numpy()
        mask_rows = None if ms is None else ms.cpu().numpy().astype(np.int8)
    log_lik_arr = torch.cat(log_lik).numpy()
    log_w_arr = torch.cat(log_w).numpy()
    if latent is None and diagnostics is None:
        latent = latent_usage(pair, data, mask=mask, device=device, seed=seed, guide=guide,
                              progress=False, param_state=param_state) if n >= 2 else None

    row_coord = {"row": rows.astype(np.int64)}
    sites = list(draws)
    posterior_vars, posterior_coords = {}, dict(row_coord)
    for name in sites:
        dim = "latent_dim" if len(sites) == 1 else f"{name}_dim"
        posterior_coords[dim] = _latent_labels(name, events[name])
        posterior_vars[name] = (("chain", "draw", "row", dim), torch.cat(draws[name]).numpy()[None])
    chain_draw = {"chain": np.array([0]), "draw": np.arange(num_draws)}
    created = {"created_by": "pyro-lvm inference.diagnostics.to_inference_data",
               "pyro_version": str(pyro.__version__), "torch_version": str(torch.__version__),
               "seed": int(seed)}
    posterior = xr.Dataset(posterior_vars, coords={**chain_draw, **posterior_coords}, attrs={
        **created, "inference": "variational",
        "description": "draws z_k ~ q(z | x_row) from the guide (variational posterior q(z|x)); "
                       "not exact posterior draws",
        "num_draws": num_draws})
    log_likelihood = xr.Dataset(
        {obs_site: (("chain", "draw", "row"), log_lik_arr[None])},
        coords={**chain_draw, **row_coord}, attrs={
            **created, "description": "log p(x_row | z_k) at the guide draws of the posterior "
                                      "group (draws from q, not p(z|x): loo/waic do not apply)"})
    sample_stats = xr.Dataset(
        {"log_importance_weight": (("chain", "draw", "row"), log_w_arr[None])},
        coords={**chain_draw, **row_coord}, attrs={
            **created, "description": "log p(x_row, z_k) - log q(z_k | x_row)"})
    observed_data = xr.Dataset({obs_site: (("row", "feature"), x_rows)},
                               coords={**row_coord, "feature": feature_names}, attrs=created)
    groups = {"posterior": posterior, "log_likelihood": log_likelihood,
              "sample_stats": sample_stats, "observed_data": observed_data}
    if mask_rows is not None:
        groups["constant_data"] = xr.Dataset({"mask": (("row", "feature"), mask_rows)},
                                             coords={**row_coord, "feature": feature_names},
                                             attrs={**created, "description": "1 = observed"})

    # per-row diagnostics
    own = _weight_summaries(log_w_arr.T.copy(), eps, 0) if num_draws >= 25 else None
    diag_vars: Dict[str, Any] = {}
    diag_attrs: Dict[str, Any] = {**created}
    if loglik is not None:
        log_px, log_px_se = _loglik_per_row(loglik, rows, n)
        diag_attrs["log_px_source"] = f"user-supplied ({type(loglik).__name__})"
    else:
        lse = _logsumexp(log_w_arr, axis=0)
        log_px = lse - math.log(num_draws)
        scaled = np.exp(log_w_arr - log_w_arr.max(0, keepdims=True))
        log_px_se = (scaled.std(0, ddof=1) / (scaled.mean(0) * math.sqrt(num_draws))
                     if num_draws > 1 else np.full(len(rows), np.nan))
        diag_attrs["log_px_source"] = (f"importance sampling with the {num_draws} guide draws of "
                                       f"the posterior group (an estimate, biased low)")
    diag_vars["log_px_estimate"] = (("row",), np.asarray(log_px, dtype=float))
    diag_vars["log_px_se"] = (("row",), np.asarray(log_px_se, dtype=float))
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
    elif own is not None:
        diag_vars["khat"] = (("row",), own["khat"])
        diag_vars["ess"] = (("row",), own["ess"])
        diag_vars["ess_fraction"] = (("row",), own["ess"] / num_draws)
        diag_attrs["khat_source"] = f"PSIS on the {num_draws} exported draws per row"
    diag_coords: Dict[str, Any] = dict(row_coord)
    if latent is not None:
        per_dim = latent.per_dim
        diag_coords["latent_dim"] = per_dim["latent_dim"].tolist()
        diag_vars["activity"] = (("latent_dim",), per_dim["activity"].to_numpy(dtype=float))
        diag_vars["active"] = (("latent_dim",), per_dim["active"].to_numpy().astype(np.int8))
        diag_vars["kl"] = (("latent_dim",), per_dim["kl"].to_numpy(dtype=float))
        diag_vars["kl_se"] = (("latent_dim",), per_dim["kl_se"].to_numpy(dtype=float))
        diag_vars["collapsed"] = (("latent_dim",), per_dim["collapsed"].to_numpy().astype(np.int8))
        diag_attrs.update(latent.to_dict())
        diag_attrs.update({"kl_total_method": latent.kl_total_method,
                           "kl_methods": ",".join(sorted(set(per_dim["kl_method"]))),
                           "mean_method": latent.mean_method,
                           "posterior_collapse": latent.posterior_collapse,
                           "activity_threshold": latent.threshold,
                           "collapse_threshold": latent.collapse_threshold})
    groups["diagnostics"] = xr.Dataset(diag_vars, coords=diag_coords, attrs={
        key: _netcdf_attr(value) for key, value in diag_attrs.items()})
    for ds in groups.values():
        ds.attrs = {key: _netcdf_attr(value) for key, value in ds.attrs.items()}
    return az.InferenceData(**groups)
