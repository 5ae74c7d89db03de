"""Held-out evaluation of a fitted model/guide pair: importance-sampled log-likelihood with
Monte Carlo standard errors, held-out ELBO, reconstruction error. The result types
(:class:`LogLikelihoodEstimate`, :class:`ELBOEstimate`, :class:`ReconstructionError`) are
defined in :mod:`pyro_lvm.inference.estimates` and importable from here.

Importance-sampled log-likelihood
---------------------------------
For each data row :math:`x_i` the guide :math:`q(z \\mid x_i)` is used as an importance
proposal,

.. math::

    w_{ik} = \\frac{p(x_i, z_{ik})}{q(z_{ik} \\mid x_i)}, \\quad z_{ik} \\sim q(\\cdot \\mid x_i),
    \\qquad
    \\log \\hat p(x_i) = \\log \\frac{1}{K} \\sum_{k=1}^K w_{ik}
                      = \\operatorname{logsumexp}_k \\log w_{ik} - \\log K .

:math:`\\hat p(x_i)` is unbiased for :math:`p(x_i)`, so by Jensen's inequality
:math:`E[\\log \\hat p(x_i)] = \\mathrm{IWAE}_K(x_i) \\le \\log p(x_i)`: the estimate is the
importance-weighted bound of Burda, Grosse & Salakhutdinov (2016), a *lower bound in
expectation* whose bias :math:`\\approx -\\operatorname{Var}(w)/(2 K\\, E[w]^2)` vanishes as
:math:`K \\to \\infty`. It is labeled "IS estimate of log p(x) (IWAE_K lower bound in
expectation)" everywhere.

Monte Carlo standard error (delta method). With :math:`\\bar w = K^{-1}\\sum_k w_k` and
:math:`\\widehat{\\operatorname{Var}}(w) = \\frac{K}{K-1}(\\overline{w^2} - \\bar w^2)`,

.. math::

    \\operatorname{se}(\\log \\hat p) \\approx \\frac{\\operatorname{sd}(\\bar w)}{\\bar w}
      = \\sqrt{\\frac{\\widehat{\\operatorname{Var}}(w)}{K \\bar w^2}}
      = \\sqrt{\\frac{K / \\mathrm{ESS} - 1}{K - 1}},
    \\qquad \\mathrm{ESS} = \\frac{(\\sum_k w_k)^2}{\\sum_k w_k^2}

(Kong 1992 for the effective sample size). The delta method needs a finite weight
variance; when the guide is much narrower than the posterior the variance is infinite and
the standard error is unreliable. :func:`log_likelihood` therefore computes each row's
Pareto k-hat of the same K weights (PSIS; :func:`pyro_lvm.inference.reliability.psis_khat`)
and flags the rows above :func:`pyro_lvm.inference.khat_threshold` (K-aware, at most 0.7),
as :func:`pyro_lvm.inference.diagnose` does.

The dataset mean :math:`n^{-1}\\sum_i \\log \\hat p(x_i)` comes with two standard errors that
answer different questions:

* ``mc_se`` :math:`= \\sqrt{\\sum_i \\operatorname{se}_i^2}/n` — Monte Carlo error of the
  estimate for *this* data set (rows are sampled independently), i.e. how much the number
  would move with another seed;
* ``data_se`` :math:`= \\operatorname{sd}_i(\\log \\hat p(x_i))/\\sqrt n` — sampling error
  across rows, i.e. how much it would move with another test set of the same size.

Streaming
---------
``K`` can be large (5000 is customary for MNIST) while the model's tensors grow like
particles x rows x data_dim, so rows and particles are processed in chunks whose size is
chosen from an element budget, and per row only a running maximum
:math:`m`, :math:`S_1 = \\sum_k e^{\\log w_k - m}` and :math:`S_2 = \\sum_k e^{2(\\log w_k - m)}`
are kept (a numerically stable streaming log-sum-exp; when a larger maximum arrives the
sums are rescaled by :math:`e^{m_\\text{old} - m_\\text{new}}`). Then
:math:`\\log\\hat p = m + \\log S_1 - \\log K` and :math:`\\mathrm{ESS} = S_1^2 / S_2`.

References
----------
Burda, Y., Grosse, R. & Salakhutdinov, R. (2016). Importance weighted autoencoders. ICLR.
Kong, A. (1992). A note on importance sampling using standardized weights. Tech. rep. 348,
Dept. of Statistics, University of Chicago.
Wu, Y., Burda, Y., Salakhutdinov, R. & Grosse, R. (2017). On the quantitative analysis of
decoder-based generative models. ICLR (IS estimates and their bias).
"""
from __future__ import annotations

import contextlib
import inspect
import math
import time
from types import SimpleNamespace
from typing import Dict, Optional, Tuple

import numpy as np
import pandas as pd
import pyro
import pyro.poutine as poutine
from pyro.infer.util import is_validation_enabled
from pyro.poutine.util import site_is_subsample
import torch
from tqdm.auto import tqdm

from pyro_lvm.inference import engine, pairs, reliability
from pyro_lvm.inference.engine import StreamingImportanceStats, check_int
# the result types, re-exported here where users import them
from pyro_lvm.inference.estimates import ELBOEstimate, LogLikelihoodEstimate, ReconstructionError
from pyro_lvm.inference.importance_weights import trace_log_terms

__all__ = [
    "LogLikelihoodEstimate",
    "ELBOEstimate",
    "ReconstructionError",
    "log_likelihood",
    "elbo",
    "reconstruction_error",
    "evaluate",
    "NoReconstructionError",
]

#: Above this many particle-row draws a progress bar is shown when ``progress=None``.
_PROGRESS_THRESHOLD = 10_000_000

_LN2 = math.log(2.0)


def _probe(model_fn, guide_fn, x, mask) -> SimpleNamespace:
    """One particle on one row: per-draw tensor width and whether the observations are discrete."""
    terms = trace_log_terms(model_fn, guide_fn, x[:1], 1, None if mask is None else mask[:1])
    width = int(x.shape[1])
    supports = []  # per observed site: True (discrete), False (continuous), None (unknown)
    observed_fns = []
    for trace in (terms.model_trace, terms.guide_trace):
        for site in trace.nodes.values():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            value = site["value"]
            if isinstance(value, torch.Tensor):
                width = max(width, int(value.numel()))
            width = max(width, engine.distribution_eval_width(site["fn"]))
            if trace is terms.model_trace and site["is_observed"]:
                observed_fns.append((site["fn"], value))
                try:
                    supports.append(bool(site["fn"].support.is_discrete))
                except (AttributeError, NotImplementedError):
                    supports.append(None)
    if False in supports:
        discrete = False
    elif not supports or None in supports:
        discrete = None
    else:
        discrete = True
    return SimpleNamespace(width=width, discrete=discrete, observed=observed_fns)


def _data_in_support(pair, probe, ctx) -> bool:
    """Whether every row of the data is known to lie in the observation model's support:
    checked by the pair's own ``check_data`` (already run), or here, once, with the support
    constraint of the observed site when that site scores the data rows themselves."""
    if callable(getattr(pair, "check_data", None)):
        return True
    if ctx.mask is not None or len(probe.observed) != 1:
        return False
    fn, value = probe.observed[0]
    if not isinstance(value, torch.Tensor) or value.shape != ctx.x[:1].shape \
            or not torch.equal(value, ctx.x[:1]):
        return False  # the model transforms x before scoring it: cannot check generically
    try:
        for start in range(0, ctx.x.shape[0], 65536):
            if not bool(fn.support.check(ctx.x[start:start + 65536]).all()):
                return False
    except Exception:  # a support without a usable check: keep Pyro's per-chunk validation
        return False
    return True


def _is_binary(x: torch.Tensor, mask: Optional[torch.Tensor]) -> bool:
    ok = (x == 0) | (x == 1)
    if mask is not None:
        ok = ok | ~mask
    return bool(ok.all())


def _exact_log_px(pair, ctx, rows_per_chunk: int) -> Optional[np.ndarray]:
    fn = getattr(pair, "log_marginal", None)
    if not callable(fn):
        return None
    out = []
    n = ctx.x.shape[0]
    for start in range(0, n, rows_per_chunk):
        xb = ctx.x[start:start + rows_per_chunk]
        if ctx.mask is None:
            lp = fn(xb)
        else:
            lp = fn(xb, mask=ctx.mask[start:start + rows_per_chunk])
        lp = torch.as_tensor(lp).detach().reshape(-1)
        if lp.shape[0] != xb.shape[0]:
            raise ValueError(f"log_marginal returned {lp.shape[0]} values for {xb.shape[0]} rows; "
                             f"it must return one exact log p(x_i) per row")
        out.append(lp.to("cpu", torch.float64).numpy())
    return np.concatenate(out)


def _show_progress(progress, draws: int, chunks: int) -> bool:
    if callable(progress):  # the caller reports progress itself
        return False
    if progress is None:
        return draws >= _PROGRESS_THRESHOLD and chunks > 1
    return bool(progress)


def _raise_if_invalid(bad_rows: torch.Tensor) -> None:
    if bool(bad_rows.any()):
        rows_bad = torch.nonzero(bad_rows).reshape(-1).tolist()
        raise ValueError(
            f"log importance weights are NaN or +inf for data row(s) {rows_bad[:5]}"
            f"{' and more' if len(rows_bad) > 5 else ''}: the model or guide produced an "
            f"invalid log density (check parameters, scales and the data range)"
        )


#: On an accelerator, check for invalid log weights every this many chunks: each check
#: waits for the device, and waiting after every chunk would stall the launch queue.
_CHECK_EVERY_CHUNKS = 16


class _KhatRows:
    """Per-row PSIS k-hat of the streamed log weights (:func:`reliability.psis_khat`), one
    chunk of rows at a time: the ``[K, rows]`` log weights of the current row chunk are kept
    until its last particle chunk has arrived, never those of all rows. A complete row chunk
    is handed to the host at once (on an accelerator a copy queued without waiting) and its
    k-hat computed on the next call of :meth:`finish`, made after the next chunk's work has
    been queued, so that on an accelerator the CPU's tail fits overlap the device's sampling."""

    def __init__(self, num_samples: int):
        self.num_samples = int(num_samples)
        self.parts: list = []
        self.count = 0
        self.pending = None          # (host tensor [K, rows], event or None, eps)
        self.khat: list = []

    def add(self, lw: torch.Tensor) -> None:
        """Add a ``[particles, rows]`` chunk of the current row chunk's log weights."""
        self.parts.append(lw.detach())
        self.count += int(lw.shape[0])
        if self.count >= self.num_samples:
            self._close_rows()

    def _close_rows(self) -> None:
        block = self.parts[0] if len(self.parts) == 1 else torch.cat(self.parts, dim=0)
        self.parts, self.count = [], 0
        eps = float(torch.finfo(block.dtype).eps) if block.dtype.is_floating_point else None
        self.finish()
        if block.device.type == "cuda":
            host = block.to("cpu", non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.pending = (host, event, eps)
        else:
            self.pending = (block, None, eps)

    def finish(self) -> None:
        """Compute the k-hat of the row chunk handed over last (if any)."""
        if self.pending is None:
            return
        host, event, eps = self.pending
        self.pending = None
        if event is not None:
            event.synchronize()  # waits for the copy only, not for work queued after it
        self.khat.append(reliability.psis_khat(host.T.to(torch.float64).numpy(), eps=eps))

    def result(self) -> np.ndarray:
        if self.parts:
            raise RuntimeError(f"a row chunk ended after {self.count} of {self.num_samples} "
                               f"draws")
        self.finish()
        return np.concatenate(self.khat) if self.khat else np.zeros(0)


def _stream(ctx, num_samples: int, rows: int, particles: int, progress, desc: str,
            validate_first_only: bool = False, khat: bool = False) -> Dict[str, np.ndarray]:
    """Importance sampling over row chunks (outer) and particle chunks (inner).

    With ``validate_first_only``, Pyro's argument/support validation (if enabled) runs on the
    first chunk and is switched off for the rest: each check waits for the device, and the
    data have been validated up front; invalid parameters still surface as NaN/inf log
    weights, which are checked here. With ``khat`` (and ``num_samples >=
    reliability.KHAT_MIN_SAMPLES``) the result also has the per-row PSIS k-hat (``khat``)."""
    n = ctx.x.shape[0]
    row_chunks = math.ceil(n / rows)
    particle_chunks = math.ceil(num_samples / particles)
    show = _show_progress(progress, n * num_samples, row_chunks * particle_chunks)
    check_every = 1 if ctx.device.type == "cpu" else _CHECK_EVERY_CHUNKS
    bad_rows = torch.zeros(n, dtype=torch.bool, device=ctx.device)
    results, stats = [], None
    tails = _KhatRows(num_samples) if khat and num_samples >= reliability.KHAT_MIN_SAMPLES \
        else None
    report, done = (progress if callable(progress) else None), 0
    with contextlib.ExitStack() as stack, \
            tqdm(total=n * num_samples, desc=desc, unit="draw", unit_scale=True,
                 disable=not show, leave=False) as bar:
        chunks = engine.stream_log_weights(ctx.model_fn, ctx.guide_fn, ctx.x, ctx.mask,
                                           num_samples, rows, particles)
        for chunk_index, (start, stop, lw) in enumerate(chunks, 1):
            if stats is None or stats.row_start != start:
                if stats is not None:
                    results.append(stats.result_tensors())
                stats = StreamingImportanceStats(stop - start, device=ctx.device)
                stats.row_start = start
            bad_rows[start:stop] |= (torch.isnan(lw) | (lw == math.inf)).any(0)
            if chunk_index == 1 and validate_first_only:
                stack.enter_context(pyro.validation_enabled(False))
            if chunk_index % check_every == 0:
                _raise_if_invalid(bad_rows)
            stats.update(lw)
            if tails is not None:
                tails.finish()  # the previous row chunk's, now that this chunk is queued
                tails.add(lw)
            bar.update(lw.shape[0] * (stop - start))
            if report is not None:
                done += lw.shape[0] * (stop - start)
                report(done, n * num_samples)
        results.append(stats.result_tensors())
    _raise_if_invalid(bad_rows)
    out = {key: torch.cat([r[key] for r in results]).cpu().numpy() for key in results[0]}
    if tails is not None:
        out["khat"] = tails.result()
    return out


def _row_sizes(ctx) -> np.ndarray:
    if ctx.mask is None:
        return np.full(ctx.x.shape[0], float(ctx.x.shape[1]))
    return ctx.mask.sum(dim=1).cpu().numpy().astype(np.float64)


def _mean_and_ses(values: np.ndarray, se: np.ndarray) -> Tuple[float, float, float]:
    n = len(values)
    mean = float(np.mean(values))
    mc_se = float(np.sqrt(np.sum(se ** 2)) / n)
    data_se = float(np.std(values, ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return mean, mc_se, data_se


def _resolve_discrete(discrete, probe_discrete, ctx) -> bool:
    if discrete is not None:
        return bool(discrete)
    if probe_discrete is not None:
        return bool(probe_discrete)
    return _is_binary(ctx.x, ctx.mask)


def _ll_from_stream(ctx, raw, num_samples, discrete, exact, rows, particles,
                    elapsed) -> LogLikelihoodEstimate:
    per_row = pd.DataFrame({"log_px": raw["log_px"], "se": raw["se"], "ess": raw["ess"],
                            "khat": raw.get("khat", np.full(len(raw["log_px"]), math.nan))})
    if exact is not None:
        per_row["exact_log_px"] = exact
    mean, mc_se, data_se = _mean_and_ses(raw["log_px"], raw["se"])
    bpd = bpd_se = exact_bpd = None
    if discrete:
        scale = 1.0 / (_row_sizes(ctx) * _LN2)
        bpd = float(np.mean(-raw["log_px"] * scale))
        bpd_se = float(np.sqrt(np.sum((raw["se"] * scale) ** 2)) / len(scale))
        if exact is not None:
            exact_bpd = float(np.mean(-exact * scale))
    return LogLikelihoodEstimate(
        per_row=per_row, mean=mean, mc_se=mc_se, data_se=data_se,
        exact_mean=None if exact is None else float(np.mean(exact)),
        num_samples=num_samples, num_rows=len(per_row), discrete=bool(discrete),
        bits_per_dim=bpd, bits_per_dim_se=bpd_se, exact_bits_per_dim=exact_bpd,
        seed=ctx.seed, device=str(ctx.device), rows_per_chunk=rows, particles_per_chunk=particles,
        elapsed_s=elapsed,
    )


def _elbo_from_stream(ctx, raw, num_samples, exact) -> ELBOEstimate:
    per_row = pd.DataFrame({"elbo": raw["elbo"], "se": raw["elbo_se"]})
    if exact is not None:
        per_row["exact_log_px"] = exact
    mean, mc_se, data_se = _mean_and_ses(raw["elbo"], raw["elbo_se"])
    return ELBOEstimate(per_row=per_row, mean=mean, mc_se=mc_se, data_se=data_se,
                        exact_mean=None if exact is None else float(np.mean(exact)),
                        num_samples=num_samples, num_rows=len(per_row), seed=ctx.seed)


def _run_is(pair, data, num_samples, *, chunk_size, batch_size, mask, device, seed, progress,
            guide, max_elements, param_state, desc, need_exact=True, khat=False):
    num_samples = check_int(num_samples, "num_samples")
    if max_elements is not None:
        max_elements = check_int(max_elements, "max_elements")
    t0 = time.perf_counter()
    with engine.session(pair, data, mask=mask, device=device, guide=guide, seed=seed,
                        param_state=param_state) as ctx:
        if max_elements is None:
            max_elements = engine.default_max_elements(ctx.device)
        probe = _probe(ctx.model_fn, ctx.guide_fn, ctx.x, ctx.mask)
        width = max(probe.width, engine.pair_eval_width(pair))
        rows, particles = engine.plan_chunks(ctx.x.shape[0], num_samples, width,
                                             max_elements=max_elements, batch_size=batch_size,
                                             chunk_size=chunk_size)
        if khat and batch_size is None and num_samples >= reliability.KHAT_MIN_SAMPLES:
            # the k-hat keeps one row chunk's K log weights; bound them by the same budget
            # (only ever binding with a small explicit chunk_size: by default rows x K fits)
            rows = min(rows, max(1, max_elements // num_samples))
        validate_first_only = is_validation_enabled() and _data_in_support(pair, probe, ctx)
        torch.manual_seed(ctx.seed)  # after the probe, so the probe never shifts the stream
        raw = _stream(ctx, num_samples, rows, particles, progress, desc, validate_first_only,
                      khat=khat)
        exact = _exact_log_px(pair, ctx, rows if batch_size is None else batch_size) \
            if need_exact else None
    return ctx, probe, raw, exact, rows, particles, time.perf_counter() - t0


# ----------------------------------------------------------------------------- public API
def log_likelihood(pair, data, num_samples: int = 5000, *, chunk_size: Optional[int] = None,
                   batch_size: Optional[int] = None, mask=None, device="auto", seed: int = 0,
                   progress: Optional[bool] = None, guide=None, discrete: Optional[bool] = None,
                   max_elements: Optional[int] = None, param_state=None,
                   allow_missing: bool = False) -> LogLikelihoodEstimate:
    """Importance-sampled estimate of log p(x) per row, with Monte Carlo standard errors.

    .. math::

        \\log \\hat p(x_i) = \\operatorname{logsumexp}_{k=1}^K \\log w_{ik} - \\log K, \\qquad
        \\log w_{ik} = \\log p(x_i, z_{ik}) - \\log q(z_{ik}\\mid x_i), \\; z_{ik}\\sim q(\\cdot\\mid x_i),

    an IS estimate of log p(x) that is the IWAE_K lower bound in expectation (bias
    :math:`O(1/K)`, downward). Standard errors by the delta method; see the module docstring.

    Each row's K log weights also get a Pareto k-hat (ArviZ :func:`arviz.psislw` through
    :func:`pyro_lvm.inference.reliability.psis_khat`, the same k-hat ``diagnose`` reports),
    computed one chunk of rows at a time. Rows above min(1 - 1/log10 K, 0.7) have unreliable
    estimates and standard errors; the result's ``fraction_unreliable`` and ``summary()``
    say how many. k-hat needs K >= 25 (NaN below; the summary then says the estimate is
    unchecked).

    Parameters
    ----------
    pair : model/guide pair
        An object with ``.model``/``.guide`` (e.g. a ``PyroModule``), a ``(model, guide)``
        tuple, or a model callable with ``guide=``. **A module is moved to** ``device``
        **in place** (``module.to(device)``) and evaluated in ``eval()`` mode (its training
        flag is restored afterwards).
    data : array-like (numpy, torch, pandas), shape (n, p)
        Validated with :func:`models.validation.check_data` and, when the pair has one,
        its own ``check_data``.
    num_samples : int
        K, importance samples per row (>= 1; K >= 2 for a standard error).
    chunk_size, batch_size : int, optional
        Particles and rows per vectorized pass. By default chosen so that
        particles x rows x max(data_dim, latent_dim) <= ``max_elements``; memory then stays
        bounded whatever ``num_samples``. The random stream depends on the chunking, so
        different chunk sizes give different (equally valid) estimates.
    mask : array-like of bool, optional
        Observed entries (True = observed); log p(x) is then of the observed entries.
    allow_missing : bool
        Treat NaN entries of ``data`` as missing (combined with ``mask``), as
        ``fit(allow_missing=True)`` does: the estimate is then of log p(x_obs), the missing
        entries marginalized out. The pair must accept ``mask``; without ``allow_missing``,
        NaN is an error naming row and column.
    device : "auto" | "cpu" | "cuda" | torch.device
    seed : int
        The estimate is a deterministic function of the seed (the caller's global RNG state
        is left untouched).
    progress : bool or callable, optional
        tqdm progress bar; None shows it for long runs (>= 1e7 particle-row draws). A callable
        ``progress(done, total)`` is called instead after every chunk with the particle-row
        draws done so far and in all (the studies log evaluation progress with it).
    guide : callable, optional
        Proposal to use instead of the pair's own guide.
    discrete : bool, optional
        Whether log p(x) is a log probability (for bits per dim). None detects it from the
        support of the model's observed site, falling back to "all values in {0, 1}".
    max_elements : int, optional
        Element budget per chunk (see above); default :func:`default_max_elements` of the
        device (2**25 on a CPU, about 1/64 of the free memory on a GPU, at most 2**30).
    param_state : dict, optional
        Pyro param-store state (``pyro.get_param_store().get_state()``) for pairs whose
        parameters are ``pyro.param`` sites. By default a module pair is evaluated in an
        empty, isolated store and a plain-function pair in a snapshot of the global store.

    Returns
    -------
    LogLikelihoodEstimate

    Notes
    -----
    When Pyro's validation is on (its default), it checks the first chunk; the remaining
    chunks run without it whenever the data are known to lie in the observation model's
    support (checked by the pair's ``check_data``, or once up front against the observed
    site's support), because every such check waits for the device. Invalid parameters still
    show up as NaN/inf log weights, which raise a ValueError naming the rows.

    Raises
    ------
    ValueError
        Invalid data (with rows and columns), ``num_samples < 1``, CUDA requested but not
        available, NaN or +inf log weights (naming the rows); with ``allow_missing``, a row
        with every entry missing or a pair without a ``mask`` argument.
    """
    from pyro_lvm.inference.impute import missing_data_mask  # (impute imports this module)

    mask = missing_data_mask(pair, data, mask, allow_missing=allow_missing, guide=guide)
    ctx, probe, raw, exact, rows, particles, elapsed = _run_is(
        pair, data, num_samples, chunk_size=chunk_size, batch_size=batch_size, mask=mask,
        device=device, seed=seed, progress=progress, guide=guide, max_elements=max_elements,
        param_state=param_state, desc=f"IWAE_{num_samples} log p(x)", khat=True)
    disc = _resolve_discrete(discrete, probe.discrete, ctx)
    return _ll_from_stream(ctx, raw, int(num_samples), disc, exact, rows, particles, elapsed)


def elbo(pair, data, num_samples: int = 1, *, chunk_size: Optional[int] = None,
         batch_size: Optional[int] = None, mask=None, device="auto", seed: int = 0,
         progress: Optional[bool] = None, guide=None, max_elements: Optional[int] = None,
         param_state=None, allow_missing: bool = False) -> ELBOEstimate:
    """Held-out ELBO per row, :math:`\\frac1K \\sum_k \\log w_{ik}`, an unbiased estimate of
    :math:`\\mathrm{ELBO}(x_i) = \\log p(x_i) - \\mathrm{KL}(q(z\\mid x_i) \\,\\|\\, p(z\\mid x_i))
    \\le \\log p(x_i)` (a bound, not a likelihood), with standard error
    :math:`\\operatorname{sd}_k(\\log w_{ik})/\\sqrt K` (NaN for K = 1; use ``data_se`` then).

    Arguments as in :func:`log_likelihood`. Returns an :class:`ELBOEstimate`.
    """
    from pyro_lvm.inference.impute import missing_data_mask  # (impute imports this module)

    mask = missing_data_mask(pair, data, mask, allow_missing=allow_missing, guide=guide)
    ctx, _probe_info, raw, exact, _r, _p, _t = _run_is(
        pair, data, num_samples, chunk_size=chunk_size, batch_size=batch_size, mask=mask,
        device=device, seed=seed, progress=progress, guide=guide, max_elements=max_elements,
        param_state=param_state, desc=f"ELBO ({num_samples} draws)")
    return _elbo_from_stream(ctx, raw, int(num_samples), exact)


def _accepts_mask(fn) -> bool:
    if pairs.takes_no_mask(fn):  # a model(x) / guide(x) adapted by resolve_pair
        return False
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "mask" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


class NoReconstructionError(ValueError):
    """The pair has no ``reconstruct(x)`` and cannot be reconstructed generically."""


def _likelihood_mean_reconstruction(model_fn, guide_fn, xb, mb) -> torch.Tensor:
    """Mean of p(x | z) at z = E_q[z | x]: the generic reconstruction of any contract pair."""
    guide_trace = poutine.trace(guide_fn).get_trace(xb, mask=mb)
    latent_means = {}
    for name, site in guide_trace.nodes.items():
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site):
            try:
                latent_means[name] = site["fn"].mean
            except (AttributeError, NotImplementedError):
                raise NoReconstructionError(
                    f"cannot reconstruct generically: the guide distribution at site {name!r} "
                    f"({type(site['fn']).__name__}) has no mean; give the pair a reconstruct(x) method"
                ) from None
    model_trace = poutine.trace(poutine.condition(model_fn, data=latent_means)).get_trace(xb, mask=mb)
    observed = [site for name, site in model_trace.nodes.items()
                if site["type"] == "sample" and site["is_observed"] and name not in latent_means
                and not site_is_subsample(site)]
    if len(observed) != 1:
        raise NoReconstructionError(
            f"cannot reconstruct generically: the model has {len(observed)} observed sites "
            f"(expected exactly one, 'x'); give the pair a reconstruct(x) method"
        )
    try:
        mean = observed[0]["fn"].mean
    except (AttributeError, NotImplementedError):
        raise NoReconstructionError(
            f"cannot reconstruct generically: the observation distribution "
            f"({type(observed[0]['fn']).__name__}) has no mean; give the pair a reconstruct(x) method"
        ) from None
    return mean.expand(xb.shape)


def reconstruction_error(pair, data, *, mask=None, device="auto", batch_size: Optional[int] = None,
                         guide=None, method: str = "auto", seed: int = 0, binary: Optional[bool] = None,
                         param_state=None, progress: Optional[bool] = None) -> ReconstructionError:
    """Reconstruction error of each row.

    The reconstruction :math:`\\hat x_i` is ``pair.reconstruct(x)`` when the pair has it
    (``method="auto"`` or ``"reconstruct"``), otherwise the mean of :math:`p(x \\mid z)` at
    :math:`z = E_q[z \\mid x_i]` (``"likelihood_mean"``). Reported per row: the mean squared
    error over observed entries :math:`\\frac{1}{D_i}\\sum_j (x_{ij} - \\hat x_{ij})^2` and, for
    binary data with :math:`\\hat x \\in [0, 1]`, the binary cross-entropy
    :math:`-\\sum_j [x_{ij} \\log \\hat x_{ij} + (1 - x_{ij}) \\log(1 - \\hat x_{ij})]` (nats per row).

    ``binary`` (None = detect: all observed values in {0, 1}) decides whether the
    cross-entropy is reported. ``progress``: a tqdm bar over the row chunks (None: shown
    for long runs, >= 1e7 reconstructed entries in more than one chunk; a callable
    ``progress(done, total)`` is called instead after each chunk with the rows done so far
    and in all). Other arguments as in :func:`log_likelihood`.
    """
    if method not in ("auto", "reconstruct", "likelihood_mean"):
        raise ValueError(f"method must be 'auto', 'reconstruct' or 'likelihood_mean', got {method!r}")
    with contextlib.ExitStack() as stack:
        ctx = stack.enter_context(engine.session(pair, data, mask=mask, device=device, guide=guide,
                                                 seed=seed, param_state=param_state))
        own = getattr(pair, "reconstruct", None)
        if method == "reconstruct" and not callable(own):
            raise ValueError(f"method='reconstruct' but {type(pair).__name__} has no reconstruct(x)")
        use_own = callable(own) and method != "likelihood_mean"
        own_takes_mask = use_own and _accepts_mask(own)
        n, p = ctx.x.shape
        rows = batch_size or max(1, min(n, engine.default_max_elements(ctx.device) // (8 * p)))
        is_binary = _is_binary(ctx.x, ctx.mask) if binary is None else bool(binary)
        mse_parts, ce_parts = [], []
        ce_ok = is_binary
        show = _show_progress(progress, n * p, math.ceil(n / rows))
        report = progress if callable(progress) else None
        bar = stack.enter_context(tqdm(total=n, desc="reconstruction error", unit="row",
                                       unit_scale=True, disable=not show, leave=False))
        for start in range(0, n, rows):
            xb = ctx.x[start:start + rows]
            mb = None if ctx.mask is None else ctx.mask[start:start + rows]
            if use_own:
                recon = torch.as_tensor(own(xb) if mb is None or not own_takes_mask
                                        else own(xb, mask=mb))
            else:
                recon = _likelihood_mean_reconstruction(ctx.model_fn, ctx.guide_fn, xb, mb)
            if recon.shape != xb.shape:
                raise ValueError(f"reconstruction has shape {tuple(recon.shape)}, expected {tuple(xb.shape)}")
            recon = recon.to(torch.float64)
            xd = xb.to(torch.float64)
            w = torch.ones_like(xd) if mb is None else mb.to(torch.float64)
            mse_parts.append(((xd - recon) ** 2 * w).sum(1) / w.sum(1))
            if ce_ok:
                if bool(((recon < 0) | (recon > 1)).any()):
                    ce_ok = False
                else:
                    eps = torch.finfo(torch.float32).tiny
                    ce = -(xd * torch.log(recon.clamp_min(eps))
                           + (1 - xd) * torch.log((1 - recon).clamp_min(eps)))
                    ce_parts.append((ce * w).sum(1))
            bar.update(xb.shape[0])
            if report is not None:
                report(min(start + rows, n), n)
        method_used = "reconstruct" if use_own else "likelihood_mean"
    mse = torch.cat(mse_parts).cpu().numpy()
    per_row = pd.DataFrame({"mse": mse})
    n = len(mse)

    def _se(v):
        return float(np.std(v, ddof=1) / math.sqrt(n)) if n > 1 else math.nan

    ce_mean = ce_se = None
    if ce_ok:
        ce = torch.cat(ce_parts).cpu().numpy()
        per_row["cross_entropy"] = ce
        ce_mean, ce_se = float(ce.mean()), _se(ce)
    return ReconstructionError(per_row=per_row, mse=float(mse.mean()), mse_se=_se(mse),
                               cross_entropy=ce_mean, cross_entropy_se=ce_se,
                               method=method_used, num_rows=n)


def evaluate(pair, data, num_samples: int = 5000, *, chunk_size: Optional[int] = None,
             batch_size: Optional[int] = None, mask=None, device="auto", seed: int = 0,
             progress: Optional[bool] = None, guide=None, discrete: Optional[bool] = None,
             reconstruction="auto", max_elements: Optional[int] = None,
             param_state=None, allow_missing: bool = False) -> Dict[str, float]:
    """All held-out metrics in one flat dict of numbers (for a metrics JSON).

    One importance-sampling pass with K = ``num_samples`` draws per row gives both the IS
    estimate of log p(x) and the ELBO (the mean log weight over the same K draws, an
    unbiased ELBO estimate with K draws).

    Keys
    ----
    ``log_px_is``, ``log_px_is_mc_se``, ``log_px_is_data_se``
        IS estimate of log p(x) (IWAE_K lower bound in expectation), mean over rows, with
        its Monte Carlo and across-row standard errors; ``mean_ess``, ``min_ess``;
        ``khat_unreliable_frac`` (share of rows whose Pareto k-hat is above
        min(1 - 1/log10 K, 0.7): their estimates and se are unreliable) and ``khat_bad_frac``
        (above 0.7); both NaN for K < 25, when k-hat is not computed.
    ``log_px_exact``
        Exact mean log p(x) (only for models with ``log_marginal``).
    ``elbo``, ``elbo_mc_se``, ``elbo_data_se``
        Held-out ELBO (a lower bound).
    ``bits_per_dim``, ``bits_per_dim_mc_se`` (``bits_per_dim_exact``)
        Only for discrete observations.
    ``recon_mse``, ``recon_mse_se``, ``recon_cross_entropy``, ``recon_cross_entropy_se``
        Reconstruction error (cross-entropy for binary data only). ``reconstruction="auto"``
        omits these keys when the pair can neither reconstruct nor be reconstructed
        generically; ``True`` raises then; ``False`` skips them.
    ``num_samples``, ``num_rows``, ``seed``, ``elapsed_s``

    Arguments as in :func:`log_likelihood` (``allow_missing``: NaN entries are missing).
    """
    if reconstruction not in ("auto", True, False):
        raise ValueError(f"reconstruction must be 'auto', True or False, got {reconstruction!r}")
    from pyro_lvm.inference.impute import missing_data_mask  # (impute imports this module)

    mask = missing_data_mask(pair, data, mask, allow_missing=allow_missing, guide=guide)
    ctx, probe, raw, exact, rows, particles, elapsed = _run_is(
        pair, data, num_samples, chunk_size=chunk_size, batch_size=batch_size, mask=mask,
        device=device, seed=seed, progress=progress, guide=guide, max_elements=max_elements,
        param_state=param_state, desc=f"IWAE_{num_samples} log p(x)", khat=True)
    disc = _resolve_discrete(discrete, probe.discrete, ctx)
    ll = _ll_from_stream(ctx, raw, int(num_samples), disc, exact, rows, particles, elapsed)
    el = _elbo_from_stream(ctx, raw, int(num_samples), exact)
    out: Dict[str, float] = {
        "log_px_is": ll.mean,
        "log_px_is_mc_se": ll.mc_se,
        "log_px_is_data_se": ll.data_se,
        "mean_ess": ll.mean_ess,
        "min_ess": float(ll.per_row["ess"].min()),
        "khat_unreliable_frac": ll.fraction_unreliable,
        "khat_bad_frac": ll.fraction_bad,
        "elbo": el.mean,
        "elbo_mc_se": el.mc_se,
        "elbo_data_se": el.data_se,
    }
    if ll.exact_mean is not None:
        out["log_px_exact"] = ll.exact_mean
    if ll.bits_per_dim is not None:
        out["bits_per_dim"] = ll.bits_per_dim
        out["bits_per_dim_mc_se"] = ll.bits_per_dim_se
        if ll.exact_bits_per_dim is not None:
            out["bits_per_dim_exact"] = ll.exact_bits_per_dim
    if reconstruction is not False:
        try:
            rec = reconstruction_error(pair, data, mask=mask, device=device, guide=guide,
                                       seed=seed, param_state=param_state,
                                       progress=None if callable(progress) else progress)
        except NoReconstructionError:
            if reconstruction is True:
                raise
            rec = None
        if rec is not None:
            out["recon_mse"] = rec.mse
            out["recon_mse_se"] = rec.mse_se
            if rec.cross_entropy is not None:
                out["recon_cross_entropy"] = rec.cross_entropy
                out["recon_cross_entropy_se"] = rec.cross_entropy_se
    out.update(num_samples=float(num_samples), num_rows=float(ll.num_rows), seed=float(seed),
               elapsed_s=float(elapsed))
    return out
