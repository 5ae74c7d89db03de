r"""Imputation of missing entries with any fitted model/guide pair, and the scoring of
imputations.

Single imputation (``method="mean"``)
-------------------------------------
For a row with observed entries :math:`x_o` and missing entries :math:`x_m` (``mask`` False),
the conditional mean is

.. math::

    E[x_m \mid x_o] = \int E[x_m \mid z]\, p(z \mid x_o)\, dz
      \approx \hat\mu = \frac{\sum_k w_k\, \mu_k}{\sum_k w_k}, \qquad
      w_k = \frac{p(x_o, z_k)}{q(z_k \mid x_o)}, \quad z_k \sim q(\cdot \mid x_o),
      \quad \mu_k = E[x_m \mid z_k],

the self-normalized importance-sampling (SNIS) estimate of Mattei & Frellsen (2019, MIWAE,
eq. 11). The weights use the observed entries only (the model is run with ``mask``), and
:math:`\mu_k` is the mean of the model's observation distribution at :math:`z_k` (read from
the model trace, so any pair whose observation site factorizes over columns works). Its Monte
Carlo standard error is the delta-method one of a ratio estimator (Owen 2013, sect. 9.2),

.. math::

    \operatorname{se}(\hat\mu)^2 \approx \sum_k \bar w_k^2\, (\mu_k - \hat\mu)^2,
    \qquad \bar w_k = w_k / \textstyle\sum_l w_l,

reliable when the weights have finite variance (check the effective sample size
:math:`\mathrm{ESS} = (\sum w)^2 / \sum w^2`, reported per row).

Multiple imputation (``method="multiple"``)
-------------------------------------------
Sampling importance resampling (Rubin 1988; MIWAE sect. 3.2): for each of the ``M``
imputations, an index :math:`k` is drawn with probability :math:`\bar w_k` and the missing
entries are drawn from :math:`p(x_m \mid z_k)`. As :math:`K \to \infty` the imputations are
draws from :math:`p(x_m \mid x_o)`. With particle chunks the resampling is streamed: slot
:math:`j` keeps its draw or takes one from the new chunk (chosen within it by weight) with
probability (chunk weight) / (total weight so far), which gives exactly the same distribution as
resampling from all :math:`K` at once.

Log-likelihood of the missing entries
-------------------------------------
With the complete rows known (held-out entries), :func:`conditional_log_likelihood` estimates

.. math::

    \log p(x_m \mid x_o) = \log p(x_o, x_m) - \log p(x_o)
      \approx \log \frac{\sum_k a_k}{\sum_k w_k}, \qquad a_k = w_k\, p(x_m \mid z_k),

both importance-sampling estimates from the *same* draws :math:`z_k \sim q(\cdot \mid x_o)`
(:math:`a_k` is the weight of the complete row). By the delta method with the covariance of the
two sums (they are positively correlated, so ignoring it overstates the error),

.. math::

    \operatorname{Var}\Big(\log \tfrac{\bar a}{\bar w}\Big) \approx \frac1K\Big[
      \frac{\operatorname{Var} a}{\bar a^2} + \frac{\operatorname{Var} w}{\bar w^2}
      - \frac{2 \operatorname{Cov}(a, w)}{\bar a \bar w}\Big]
    = \frac{K}{K-1} \sum_k \Big(\frac{a_k}{\sum a} - \frac{w_k}{\sum w}\Big)^2

with the sample (co)variances (divisor :math:`K-1`). Like any IS estimate of a log, it is
biased low by :math:`O(1/K)`.

References
----------
Mattei, P.-A. & Frellsen, J. (2019). MIWAE: deep generative modelling and imputation of
incomplete data sets. ICML.
Owen, A. B. (2013). Monte Carlo theory, methods and examples, chapter 9 (importance sampling).
Rubin, D. B. (1988). Using the SIR algorithm to simulate posterior distributions. Bayesian
Statistics 3.
Rubin, D. B. (1987). Multiple imputation for nonresponse in surveys. Wiley.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import numpy as np
import pandas as pd
import torch
from pyro.distributions.torch_distribution import MaskedDistribution
from pyro.poutine.util import site_is_subsample
from tqdm.auto import tqdm

from pyro_lvm.inference.engine import (check_int, default_max_elements, pair_eval_width,
                                       plan_chunks, resolve_pair, session)
from pyro_lvm.inference.evaluate import _accepts_mask, _probe, _raise_if_invalid, _show_progress
from pyro_lvm.inference import pairs
from pyro_lvm.inference.importance_weights import trace_log_terms
from pyro_lvm.models import check_mask

__all__ = ["Imputation", "ConditionalLogLikelihood", "impute", "conditional_log_likelihood",
           "missing_mask", "imputation_error", "interval_coverage"]


# ----------------------------------------------------------------------------- input handling
def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, pd.DataFrame):
        return x.to_numpy()
    return np.asarray(x)


def missing_mask(x, mask=None, *, allow_missing: bool = False, name: str = "x") -> np.ndarray:
    """The observed-entry mask (bool ``[n, p]``, True = observed) of ``x``, validated.

    ``mask`` given: checked for shape, type (boolean or 0/1) and rows with no observed entry;
    with ``allow_missing`` NaN entries are treated as missing too. ``mask`` None: with
    ``allow_missing`` the NaN entries are the missing ones; without it NaN is an error.

    Raises
    ------
    ValueError
        A mask of the wrong shape or type, a row with every entry missing, NaN that no mask
        and no ``allow_missing`` explain (with row and column), non-numeric data.
    """
    arr = _as_numpy(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (rows x columns), got shape {arr.shape}")
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    nan = np.isnan(arr) if np.issubdtype(arr.dtype, np.floating) else np.zeros(arr.shape, bool)
    if mask is None:
        if not allow_missing:
            if nan.any():
                r, c = np.argwhere(nan)[0]
                raise ValueError(
                    f"{name} has {int(nan.sum())} NaN value(s) (first: row {r}, column {c}) and "
                    f"no mask: pass mask= (True = observed) or allow_missing=True to treat NaN "
                    f"as missing")
            raise ValueError(f"nothing marks missing entries in {name}: pass mask= (bool, True "
                             f"= observed) or data with NaN and allow_missing=True")
        return check_mask(~nan, arr.shape, name=name)
    if isinstance(mask, (str, bytes)) or not hasattr(mask, "__len__"):
        raise ValueError(f"mask for {name} must be a boolean array of shape {arr.shape} "
                         f"(True = observed), got {type(mask).__name__}")
    m = _as_numpy(mask)
    if m.dtype == object or not (m.dtype == bool or np.issubdtype(m.dtype, np.number)):
        raise ValueError(f"mask for {name} must be boolean (True = observed), got dtype {m.dtype}")
    m = check_mask(m, arr.shape, name=name)
    if allow_missing:
        m = check_mask(m & ~nan, arr.shape, name=name)
    return m


def missing_data_mask(pair, data, mask=None, *, allow_missing: bool = False, guide=None,
                      name: str = "data"):
    """The ``mask`` that :func:`~pyro_lvm.inference.fit`, :func:`~pyro_lvm.inference.log_likelihood`,
    :func:`~pyro_lvm.inference.elbo` and :func:`~pyro_lvm.inference.evaluate` pass on, for their
    ``allow_missing`` argument (``name``: what to call ``data`` in messages).

    Without ``allow_missing``, ``mask`` unchanged (NaN in ``data`` outside it stays an error
    naming row and column, raised by the data check). With it, the pair must accept ``mask``
    (checked first), and the mask is
    the entries that are not NaN (and observed in ``mask`` when given), so the estimates are of
    :math:`\\log p(x_{\\mathrm{obs}})`, the missing entries marginalized out.

    Raises
    ------
    ValueError
        A model or guide without a ``mask`` argument, a row with every entry missing, a mask
        of the wrong shape or type -- before any work.
    """
    if not allow_missing:
        return mask
    model_fn, guide_fn, _ = resolve_pair(pair, guide)
    require_mask_argument(model_fn, guide_fn)
    return missing_mask(data, mask, allow_missing=True, name=name)


def _restore_type(values: np.ndarray, like):
    """``values`` (float64 numpy) in the type of ``like``: tensor (dtype, device), DataFrame
    (index, columns) or numpy (floating dtype kept, float64 otherwise)."""
    if isinstance(like, torch.Tensor):
        dtype = like.dtype if like.is_floating_point() else torch.get_default_dtype()
        return torch.as_tensor(values, dtype=dtype, device=like.device)
    if isinstance(like, pd.DataFrame):
        return pd.DataFrame(values, index=like.index, columns=like.columns)
    arr = np.asarray(like)
    return values.astype(arr.dtype if np.issubdtype(arr.dtype, np.floating) else np.float64)


def require_mask_argument(model_fn, guide_fn) -> None:
    """Raise ValueError unless both functions accept a ``mask`` keyword."""
    for fn, role in ((model_fn, "model"), (guide_fn, "guide")):
        advice = pairs.maskless_program_advice(fn, role)
        if advice is not None:
            raise ValueError(f"{advice} (without one it cannot leave missing entries out of "
                             f"the likelihood)")
        if not _accepts_mask(fn):
            name = getattr(fn, "__qualname__", type(fn).__name__)
            raise ValueError(
                f"the {role} {name} takes no mask argument, so it cannot leave missing entries "
                f"out of the likelihood; missing data need {role}(x, mask=None) with mask a "
                f"boolean tensor like x (True = observed) used to mask the observation site")


def _unwrap_fit_result(pair):
    """``(pair, param_state)``: a :class:`~pyro_lvm.inference.FitResult` gives its trained
    pair and its own parameter store (plain-function pairs keep their values only there)."""
    if hasattr(pair, "param_store_state") and hasattr(pair, "history") and hasattr(pair, "model"):
        return pair.model, pair.param_store_state
    return pair, None


def _check_method(method: str, num_imputations) -> int:
    if method not in ("mean", "multiple"):
        raise ValueError(f"method must be 'mean' or 'multiple', got {method!r}")
    return check_int(num_imputations, "num_imputations") if method == "multiple" else 0


# ----------------------------------------------------------------------------- model access
def _observation_distribution(model_trace, shape: torch.Size):
    """The model's single observed site as an elementwise distribution of ``shape``
    ``[K, rows, columns]`` (Independent and mask wrappers removed)."""
    observed = [(name, site) for name, site in model_trace.nodes.items()
                if site["type"] == "sample" and site["is_observed"] and not site_is_subsample(site)]
    if len(observed) != 1:
        raise ValueError(f"imputation needs exactly one observed site (the data rows), found "
                         f"{len(observed)}: {[n for n, _ in observed]}")
    name, site = observed[0]
    fn = site["fn"]
    for _ in range(16):
        if isinstance(fn, (torch.distributions.Independent, MaskedDistribution)):
            fn = fn.base_dist
        else:
            break
    if tuple(fn.event_shape) != ():
        raise ValueError(
            f"the observation site {name!r} ({type(fn).__name__}, event shape "
            f"{tuple(fn.event_shape)}) does not factorize over columns; imputation reads "
            f"E[x_j | z] and draws x_j | z per entry, so declare the columns with .to_event(1) "
            f"on an elementwise distribution")
    try:
        return name, fn.expand(shape) if tuple(fn.batch_shape) != tuple(shape) else fn
    except (RuntimeError, ValueError, NotImplementedError):
        raise ValueError(f"the observation site {name!r} has batch shape "
                         f"{tuple(fn.batch_shape)}, which does not broadcast to "
                         f"[particles, rows, columns] = {tuple(shape)}") from None


def _chunk(ctx, xb, mb, k):
    """Log weights on the observed entries ``[k, rows]`` and the observation distribution."""
    terms = trace_log_terms(ctx.model_fn, ctx.guide_fn, xb, k, mb)
    _, obs = _observation_distribution(terms.model_trace, torch.Size((k,) + tuple(xb.shape)))
    return terms.log_weights, obs


def _obs_mean(obs, name="observation distribution"):
    try:
        return obs.mean
    except (AttributeError, NotImplementedError):
        raise ValueError(f"the {name} ({type(obs).__name__}) has no mean; E[x | z] is needed "
                         f"for method='mean'") from None


# ----------------------------------------------------------------------------- streaming SNIS
class _SNISAccumulator:
    """Running SNIS sums for one chunk of rows (float64, rescaled as the maximum grows)."""

    def __init__(self, rows: int, cols: int, num_imputations: int, device):
        f64 = dict(dtype=torch.float64, device=device)
        self.max = torch.full((rows,), -math.inf, **f64)
        self.s1 = torch.zeros(rows, **f64)    # sum w
        self.s2 = torch.zeros(rows, **f64)    # sum w^2
        self.a1 = torch.zeros(rows, cols, **f64)  # sum w (mu - ref)
        self.a2 = torch.zeros(rows, cols, **f64)  # sum w^2 (mu - ref)
        self.a3 = torch.zeros(rows, cols, **f64)  # sum w^2 (mu - ref)^2
        self.ref = None
        self.log_total = torch.full((rows,), -math.inf, **f64)
        self.slots = None if not num_imputations else torch.zeros(num_imputations, rows, cols, **f64)

    def update(self, lw: torch.Tensor, mean: torch.Tensor, draws: Optional[torch.Tensor]):
        lw = lw.to(torch.float64)
        mean = mean.to(torch.float64)
        if self.ref is None:
            # Shifting by a first estimate avoids cancellation in sum w^2 (mu - mu_hat)^2.
            self.ref = mean.mean(0)
        new_max = torch.maximum(self.max, lw.max(0).values)
        r1 = torch.exp(self.max - new_max)
        r2 = r1 * r1
        w = torch.exp(lw - new_max)
        w2 = w * w
        dev = mean - self.ref
        self.s1 = self.s1 * r1 + w.sum(0)
        self.s2 = self.s2 * r2 + w2.sum(0)
        self.a1 = self.a1 * r1[:, None] + torch.einsum("kb,kbp->bp", w, dev)
        self.a2 = self.a2 * r2[:, None] + torch.einsum("kb,kbp->bp", w2, dev)
        self.a3 = self.a3 * r2[:, None] + torch.einsum("kb,kbp->bp", w2, dev * dev)
        self.max = new_max
        if draws is not None:
            self._resample(lw, draws.to(torch.float64))

    def _resample(self, lw: torch.Tensor, draws: torch.Tensor):
        """Streaming SIR: each slot takes a weight-chosen draw of this chunk with probability
        (chunk weight) / (total weight so far)."""
        num, rows = self.slots.shape[0], lw.shape[1]
        chunk_lse = torch.logsumexp(lw, 0)
        self.log_total = torch.logaddexp(self.log_total, chunk_lse)
        p_take = torch.exp(chunk_lse - self.log_total).nan_to_num(0.0)
        take = torch.rand(num, rows, dtype=torch.float64, device=lw.device) < p_take
        logits = (lw - chunk_lse).T.nan_to_num(0.0)  # [rows, k]
        idx = torch.distributions.Categorical(logits=logits).sample((num,))  # [M, rows]
        picked = draws[idx, torch.arange(rows, device=lw.device)]  # [M, rows, cols]
        self.slots = torch.where(take[..., None], picked, self.slots)

    def result(self):
        diff = self.a1 / self.s1[:, None]
        mean = self.ref + diff
        var = (self.a3 - 2 * diff * self.a2 + diff * diff * self.s2[:, None]) / self.s1[:, None] ** 2
        return mean, var.clamp_min(0.0).sqrt(), self.s1 ** 2 / self.s2


def _check_all_zero(running_max: torch.Tensor, start: int) -> None:
    dead = torch.isneginf(running_max)
    if bool(dead.any()):
        rows = (torch.nonzero(dead).reshape(-1) + start).tolist()
        raise ValueError(f"every importance weight is zero for data row(s) {rows[:5]}: the "
                         f"model gives the observed entries zero density under every draw")


# ----------------------------------------------------------------------------- results
@dataclass
class Imputation:
    """Result of :func:`impute`.

    Attributes
    ----------
    imputed : same type and shape as the input ``x``
        ``x`` with each missing entry replaced by its SNIS conditional-mean estimate (the
        observed entries unchanged).
    se : numpy ``[n, p]``
        Monte Carlo standard error of each imputed entry (0 at observed entries).
    draws : numpy ``[M, n, p]`` or None
        ``M`` completed data sets by sampling importance resampling (``method="multiple"``).
    mask : numpy bool ``[n, p]``, True = observed.
    ess : numpy ``[n]``, Kong's effective sample size of each row's weights.
    """

    imputed: Any
    se: np.ndarray
    draws: Optional[np.ndarray]
    mask: np.ndarray
    ess: np.ndarray
    method: str
    num_samples: int
    seed: int
    elapsed_s: float
    rows_per_chunk: int = 0
    particles_per_chunk: int = 0
    extra: Dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        n_miss = int((~self.mask).sum())
        se = self.se[~self.mask]
        return (f"Imputation ({self.method}): {n_miss} missing entries in {self.mask.shape[0]} "
                f"rows, K={self.num_samples} importance samples per row, median ESS "
                f"{np.median(self.ess):.1f}, MC se of imputed entries median "
                f"{np.median(se) if se.size else 0.0:.3g} (max {se.max() if se.size else 0.0:.3g})"
                + (f", {self.draws.shape[0]} imputations" if self.draws is not None else ""))

    def __str__(self) -> str:
        return self.summary()


# ----------------------------------------------------------------------------- public API
def impute(pair, x, mask=None, num_samples: int = 1000, *, method: str = "mean",
           num_imputations: int = 10, seed: int = 0, allow_missing: bool = False,
           device="auto", guide=None, batch_size: Optional[int] = None,
           chunk_size: Optional[int] = None, max_elements: Optional[int] = None,
           progress: Optional[bool] = None) -> Imputation:
    """Impute the missing entries of ``x`` with a fitted pair (see the module docstring).

    Parameters
    ----------
    pair : model/guide pair or FitResult
        Keeps the contract and accepts ``mask`` (missing entries must be left out of the
        likelihood); its observation site must factorize over columns and have a ``mean``
        (``method="mean"``) and ``sample`` (``"multiple"``).
    x : numpy array, tensor or DataFrame ``[n, p]``
        Data; missing entries may hold anything (NaN included).
    mask : bool array-like ``[n, p]``, optional
        True = observed. Without it, ``allow_missing=True`` takes NaN as missing.
    num_samples : int
        Importance samples ``K`` per row.
    method : {"mean", "multiple"}
        Single (SNIS conditional mean, with its standard error) or multiple imputation (also
        ``num_imputations`` SIR draws; ``imputed`` is still the conditional mean).
    num_imputations : int
        ``M`` for ``method="multiple"``.
    seed : int
        Seeds every draw (the global RNG state is restored afterwards).
    allow_missing : bool
        Treat NaN entries as missing.
    device, guide, batch_size, chunk_size, max_elements, progress
        As in :func:`pyro_lvm.inference.log_likelihood` (rows and particles per chunk are
        planned from the element budget, so memory is bounded whatever ``num_samples``).

    Returns
    -------
    Imputation

    Raises
    ------
    ValueError
        Before any work: a bad mask (shape, type, a row with no observed entry), NaN not
        marked missing, a model or guide without a ``mask`` argument, bad arguments.
    """
    num_samples = check_int(num_samples, "num_samples")
    num_imputations = _check_method(method, num_imputations)
    mask_np = missing_mask(x, mask, allow_missing=allow_missing)
    pair, param_state = _unwrap_fit_result(pair)
    model_fn, guide_fn, _ = resolve_pair(pair, guide)
    require_mask_argument(model_fn, guide_fn)
    x_np = _as_numpy(x).astype(np.float64)
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        ctx = stack.enter_context(session(pair, x_np, mask=mask_np, device=device, guide=guide,
                                          seed=seed, param_state=param_state))
        budget = max_elements or default_max_elements(ctx.device)
        probe = _probe(ctx.model_fn, ctx.guide_fn, ctx.x, ctx.mask)
        # the accumulators and the draws add a few [K, rows, columns] tensors per chunk
        width = 4 * max(probe.width, pair_eval_width(pair), ctx.x.shape[1])
        rows, particles = plan_chunks(ctx.x.shape[0], num_samples, width, max_elements=budget,
                                      batch_size=batch_size, chunk_size=chunk_size)
        torch.manual_seed(ctx.seed)
        means, ses, esss, draws = [], [], [], []
        n = ctx.x.shape[0]
        show = _show_progress(progress, n * num_samples, math.ceil(n / rows)
                              * math.ceil(num_samples / particles))
        bar = stack.enter_context(tqdm(total=n * num_samples, desc="impute", unit="draw",
                                       unit_scale=True, disable=not show, leave=False))
        for start in range(0, n, rows):
            xb, mb = ctx.x[start:start + rows], ctx.mask[start:start + rows]
            acc = _SNISAccumulator(xb.shape[0], xb.shape[1], num_imputations, ctx.device)
            done = 0
            while done < num_samples:
                k = min(particles, num_samples - done)
                lw, obs = _chunk(ctx, xb, mb, k)
                _raise_if_invalid((torch.isnan(lw) | (lw == math.inf)).any(0))
                acc.update(lw, _obs_mean(obs), obs.sample() if num_imputations else None)
                done += k
                bar.update(k * xb.shape[0])
            _check_all_zero(acc.max, start)
            mean, se, ess = acc.result()
            means.append(mean.cpu()), ses.append(se.cpu()), esss.append(ess.cpu())
            if num_imputations:
                draws.append(acc.slots.cpu())
    missing = ~mask_np
    mean = torch.cat(means).numpy()
    imputed = np.where(missing, mean, x_np)
    se = np.where(missing, torch.cat(ses).numpy(), 0.0)
    draws_np = None
    if num_imputations:
        draws_np = np.where(missing, torch.cat(draws, dim=1).numpy(), x_np)
    return Imputation(imputed=_restore_type(imputed, x), se=se, draws=draws_np, mask=mask_np,
                      ess=torch.cat(esss).numpy(), method=method, num_samples=num_samples,
                      seed=int(seed), elapsed_s=time.perf_counter() - t0, rows_per_chunk=rows,
                      particles_per_chunk=particles)


@dataclass
class ConditionalLogLikelihood:
    """Result of :func:`conditional_log_likelihood`.

    ``per_row`` columns: ``log_p_missing`` (IS estimate of :math:`\\log p(x_m \\mid x_o)`),
    ``se`` (delta-method MC standard error), ``ess`` (of the observed-entry weights),
    ``num_missing``, and ``exact`` when the pair has ``log_marginal`` (then
    :math:`\\log p(x) - \\log p(x_o)`). ``mean`` is the mean over rows, ``mc_se`` its Monte
    Carlo error, ``per_entry`` the sum over rows divided by the number of missing entries.
    """

    per_row: pd.DataFrame
    mean: float
    mc_se: float
    per_entry: float
    exact_mean: Optional[float]
    num_samples: int
    seed: int

    def summary(self) -> str:
        exact = "" if self.exact_mean is None else f" (exact {self.exact_mean:.4f})"
        return (f"IS estimate of log p(x_missing | x_observed), mean per row "
                f"{self.mean:.4f} +/- {self.mc_se:.4f} (MC se){exact}; {self.per_entry:.4f} "
                f"nats per missing entry; K={self.num_samples}")

    def __str__(self) -> str:
        return self.summary()


class _RatioAccumulator:
    """Running sums of w, w^2, a, a^2, w a (each with its own shift) for log(sum a / sum w)."""

    def __init__(self, rows: int, device):
        f64 = dict(dtype=torch.float64, device=device)
        self.mw = torch.full((rows,), -math.inf, **f64)
        self.ma = torch.full((rows,), -math.inf, **f64)
        self.sw, self.sww, self.sa, self.saa, self.swa = (torch.zeros(rows, **f64) for _ in range(5))
        self.count = 0

    def update(self, lw: torch.Tensor, la: torch.Tensor):
        lw, la = lw.to(torch.float64), la.to(torch.float64)
        new_w = torch.maximum(self.mw, lw.max(0).values)
        new_a = torch.maximum(self.ma, la.max(0).values)
        rw, ra = torch.exp(self.mw - new_w), torch.exp(self.ma - new_a)
        w, a = torch.exp(lw - new_w), torch.exp(la - new_a)
        self.sw = self.sw * rw + w.sum(0)
        self.sww = self.sww * rw * rw + (w * w).sum(0)
        self.sa = self.sa * ra + a.sum(0)
        self.saa = self.saa * ra * ra + (a * a).sum(0)
        self.swa = self.swa * rw * ra + (w * a).sum(0)
        self.mw, self.ma = new_w, new_a
        self.count += lw.shape[0]

    def result(self):
        K = self.count
        log_ratio = (self.ma + self.sa.log()) - (self.mw + self.sw.log())
        var = (self.saa / self.sa ** 2 + self.sww / self.sw ** 2
               - 2 * self.swa / (self.sa * self.sw)).clamp_min(0.0)
        se = (var * K / (K - 1)).sqrt() if K > 1 else torch.full_like(var, math.nan)
        return log_ratio, se, self.sw ** 2 / self.sww


def conditional_log_likelihood(pair, x, mask, num_samples: int = 1000, *, scored=None,
                               seed: int = 0,
                               device="auto", guide=None, batch_size: Optional[int] = None,
                               chunk_size: Optional[int] = None,
                               max_elements: Optional[int] = None) -> ConditionalLogLikelihood:
    """Importance-sampling estimate of :math:`\\log p(x_m \\mid x_o)` per row, where ``x``
    holds the true values of every entry and ``mask`` (True = observed) marks the entries
    conditioned on; the others (or only those of ``scored``, a bool mask disjoint from
    ``mask``, e.g. when some entries are unknown) are scored (see the module docstring for the
    estimator and its standard error). Proposal: the guide given the observed entries. Other
    arguments as in :func:`impute`. Raises ValueError before any work on bad input (a
    non-finite scored or observed value included: the held-out values must be known).
    """
    num_samples = check_int(num_samples, "num_samples")
    mask_np = missing_mask(x, mask)
    x_np = _as_numpy(x).astype(np.float64)
    if scored is None:
        scored_np = ~mask_np
    else:
        scored_np = _as_numpy(scored)
        if scored_np.shape != mask_np.shape or scored_np.dtype != bool:
            raise ValueError(f"scored must be a boolean array of shape {mask_np.shape}")
        if (scored_np & mask_np).any():
            raise ValueError("scored entries must be missing (mask False): an observed entry "
                             "cannot also be scored")
    known = mask_np | scored_np
    if not np.isfinite(x_np[known]).all():
        r, c = np.argwhere(known & ~np.isfinite(x_np))[0]
        raise ValueError(f"x must hold the true value of every entry (held-out ones included) "
                         f"to score them; it is not finite at row {r}, column {c}")
    pair, param_state = _unwrap_fit_result(pair)
    model_fn, guide_fn, _ = resolve_pair(pair, guide)
    require_mask_argument(model_fn, guide_fn)
    x_true_all = torch.as_tensor(np.where(known, x_np, 0.0))
    scored_all = torch.as_tensor(scored_np)
    with session(pair, x_np, mask=mask_np, device=device, guide=guide, seed=seed,
                 param_state=param_state) as ctx:
        budget = max_elements or default_max_elements(ctx.device)
        probe = _probe(ctx.model_fn, ctx.guide_fn, ctx.x, ctx.mask)
        width = 2 * max(probe.width, pair_eval_width(pair), ctx.x.shape[1])
        rows, particles = plan_chunks(ctx.x.shape[0], num_samples, width, max_elements=budget,
                                      batch_size=batch_size, chunk_size=chunk_size)
        torch.manual_seed(ctx.seed)
        out = []
        for start in range(0, ctx.x.shape[0], rows):
            xb, mb = ctx.x[start:start + rows], ctx.mask[start:start + rows]
            truth = x_true_all[start:start + rows].to(device=ctx.device, dtype=xb.dtype)
            sb = scored_all[start:start + rows].to(ctx.device)
            acc = _RatioAccumulator(xb.shape[0], ctx.device)
            done = 0
            while done < num_samples:
                k = min(particles, num_samples - done)
                lw, obs = _chunk(ctx, xb, mb, k)
                _raise_if_invalid((torch.isnan(lw) | (lw == math.inf)).any(0))
                log_r = torch.where(sb, obs.log_prob(truth),
                                    torch.zeros((), dtype=lw.dtype, device=lw.device)).sum(-1)
                acc.update(lw, lw + log_r)
                done += k
            out.append([t.cpu().numpy() for t in acc.result()])
        exact = None
        if callable(getattr(pair, "log_marginal", None)):
            known_t = torch.as_tensor(known, device=ctx.device)
            full = torch.as_tensor(pair.log_marginal(x_true_all.to(ctx.device, ctx.x.dtype),
                                                     mask=known_t))
            obs_only = torch.as_tensor(pair.log_marginal(ctx.x, mask=ctx.mask))
            exact = (full - obs_only).detach().cpu().numpy().astype(np.float64)
    per_row = pd.DataFrame({"log_p_missing": np.concatenate([o[0] for o in out]),
                            "se": np.concatenate([o[1] for o in out]),
                            "ess": np.concatenate([o[2] for o in out]),
                            "num_missing": scored_np.sum(1)})
    if exact is not None:
        per_row["exact"] = exact
    n = len(per_row)
    total_missing = max(1, int(per_row["num_missing"].sum()))
    return ConditionalLogLikelihood(
        per_row=per_row, mean=float(per_row["log_p_missing"].mean()),
        mc_se=float(np.sqrt((per_row["se"] ** 2).sum()) / n),
        per_entry=float(per_row["log_p_missing"].sum() / total_missing),
        exact_mean=None if exact is None else float(np.mean(exact)),
        num_samples=num_samples, seed=int(seed))


# ----------------------------------------------------------------------------- scoring
def imputation_error(x_true, imputed, mask, *, binary: Optional[bool] = None) -> Dict[str, float]:
    """Error of imputed values on the missing (held-out) entries.

    Returns ``rmse`` :math:`\\sqrt{\\operatorname{mean}_{(i,j)\\,\\text{missing}}
    (\\hat x_{ij} - x_{ij})^2}`, ``mae``, ``num_missing`` and, for binary truth (detected
    when ``binary`` is None), ``accuracy``: the fraction of missing entries where
    :math:`\\hat x_{ij}` rounded at 0.5 equals :math:`x_{ij}`.
    """
    truth, est = _as_numpy(x_true).astype(np.float64), _as_numpy(imputed).astype(np.float64)
    missing = ~missing_mask(truth, mask, name="x_true")
    if est.shape != truth.shape:
        raise ValueError(f"imputed has shape {est.shape}, expected {truth.shape}")
    diff = (est - truth)[missing]
    if not np.isfinite(diff).all():
        raise ValueError("x_true and imputed must be finite on the missing entries")
    out = dict(rmse=float(np.sqrt(np.mean(diff ** 2))) if diff.size else math.nan,
               mae=float(np.mean(np.abs(diff))) if diff.size else math.nan,
               num_missing=int(missing.sum()))
    if binary is None:
        binary = bool(np.isin(truth[missing], [0.0, 1.0]).all())
    if binary:
        out["accuracy"] = float(np.mean((est[missing] >= 0.5) == (truth[missing] == 1.0))) \
            if diff.size else math.nan
    return out


def interval_coverage(draws, x_true, mask, level: float = 0.9) -> Dict[str, float]:
    """Coverage of the central ``level`` intervals of multiple imputations.

    For each missing entry the interval runs between the :math:`(1 \\mp \\text{level})/2`
    quantiles of its ``M`` imputations, taken at order-statistic positions
    :math:`q (M + 1)` (numpy's ``"weibull"`` method), so that for exact i.i.d. draws from a
    continuous conditional the expected coverage is exactly ``level`` (the default linear
    interpolation covers about :math:`\\text{level}(M-1)/(M+1)`).

    Returns ``coverage`` (fraction of missing entries whose true value lies inside),
    ``mean_width`` and ``num_missing``.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    d = _as_numpy(draws).astype(np.float64)
    truth = _as_numpy(x_true).astype(np.float64)
    if d.ndim != 3 or d.shape[1:] != truth.shape:
        raise ValueError(f"draws must have shape [M, {truth.shape[0]}, {truth.shape[1]}], got "
                         f"{d.shape}")
    missing = ~missing_mask(truth, mask, name="x_true")
    lo, hi = np.quantile(d[:, missing], [(1 - level) / 2, (1 + level) / 2], axis=0,
                         method="weibull")
    t = truth[missing]
    return dict(coverage=float(np.mean((t >= lo) & (t <= hi))) if t.size else math.nan,
                mean_width=float(np.mean(hi - lo)) if t.size else math.nan,
                num_missing=int(missing.sum()))
