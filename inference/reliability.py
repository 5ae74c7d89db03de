"""How far an importance-sampled estimate can be trusted: Pareto k-hat thresholds and PSIS.

Pure functions of numbers and log weights (numpy and ArviZ only), used alike by the
diagnostics (:func:`pyro_lvm.inference.importance_diagnostics`), the study runner's summaries
and the report, so that every place draws the line at the same k-hat.

For one data row with importance weights :math:`w_k = p(x, z_k) / q(z_k \\mid x)`,
:math:`z_k \\sim q`, :math:`k = 1, \\dots, S`, Pareto smoothed importance sampling (PSIS;
Vehtari, Simpson, Gelman, Yao & Gabry 2024) fits a generalized Pareto distribution to the
largest weights. Its shape :math:`\\hat k` estimates how many moments the weights have
(:math:`1/k`). With :math:`S` draws the PSIS estimate is reliable when

.. math::

    \\hat k \\le k_{\\min}(S) = \\min\\Bigl(1 - \\frac{1}{\\log_{10} S},\\ 0.7\\Bigr)

(0.285 for :math:`S = 25`, 0.5 for :math:`S = 100`, 0.667 for :math:`S = 1000`; their
sec. 3.2.4 and Table 1): below it the relative error falls like :math:`S^{-1/2}`; between it
and 0.7 more draws would make the estimate reliable; above 0.7 (:data:`KHAT_BAD`) the number
of draws needed grows so fast that no practical :math:`S` does, and the guide has to improve.
Above the threshold the delta-method Monte Carlo standard error of :math:`\\log \\hat p(x)`
is not trustworthy either (with infinite-variance weights it underestimates the actual
error).

References
----------
Vehtari, A., Simpson, D., Gelman, A., Yao, Y. & Gabry, J. (2024). Pareto smoothed importance
sampling. Journal of Machine Learning Research 25(72), 1-58.
"""
from __future__ import annotations

import math
import warnings

import numpy as np

__all__ = [
    "KHAT_BAD",
    "khat_threshold",
    "khat_category",
    "khat_unreliable",
    "KHAT_MIN_SAMPLES",
    "psis_khat",
    "constant_weight_rows",
    "arviz_psislw",
    "psis_log_mean",
    "psis_log_mean_from_smoothed",
    "reliability_counts",
]

#: Above this k-hat no practical number of draws makes importance sampling reliable.
KHAT_BAD = 0.7

#: Fewest draws per row from which a k-hat is computed (the minimum
#: :func:`pyro_lvm.inference.importance_diagnostics` accepts): ArviZ fits no tail at all
#: below 21 draws (its tail, the largest ceil(S/5) weights, would hold fewer than 5), and
#: :func:`khat_threshold` is below 0.3 there.
KHAT_MIN_SAMPLES = 25


def khat_threshold(num_samples: int) -> float:
    """The k-hat up to which a PSIS estimate from ``num_samples`` draws is reliable.

    .. math:: k_{\\min}(S) = \\min(1 - 1/\\log_{10} S,\\ 0.7)

    Parameters
    ----------
    num_samples : int
        S, the number of importance draws per row (at least 2; below 11 the threshold is
        zero or negative: no tail fit from that few draws can be trusted).

    Returns
    -------
    float
        0.285 at S = 25, 0.5 at S = 100, 0.667 at S = 1000, 0.7 from S = 2155 on.

    Raises
    ------
    ValueError
        ``num_samples`` is not an integer >= 2.
    """
    whole = isinstance(num_samples, (int, np.integer)) or (
        isinstance(num_samples, (float, np.floating)) and float(num_samples).is_integer())
    if isinstance(num_samples, bool) or not whole or num_samples < 2:
        raise ValueError(f"num_samples must be an integer >= 2, got {num_samples!r}")
    num_samples = int(num_samples)
    return min(1.0 - 1.0 / math.log10(num_samples), KHAT_BAD)


def khat_category(khat, num_samples: int) -> np.ndarray:
    """Each k-hat's reliability class for ``num_samples`` draws.

    ``"good"``: :math:`\\hat k \\le k_{\\min}(S)` (reliable); ``"ok"``:
    :math:`k_{\\min}(S) < \\hat k \\le 0.7` (more draws would make it reliable); ``"bad"``:
    finite :math:`\\hat k > 0.7` (the guide misses posterior mass); ``"undetermined"``:
    ``+inf`` or NaN (too few distinct large weights to fit a tail, or the fit failed).
    ``-inf`` (weights constant to working precision: the guide is exact there) is good.
    """
    k = np.asarray(khat, dtype=float)
    threshold = khat_threshold(num_samples)
    category = np.full(k.shape, "undetermined", dtype=object)
    category[k <= threshold] = "good"
    category[(k > threshold) & (k <= KHAT_BAD)] = "ok"
    category[(k > KHAT_BAD) & np.isfinite(k)] = "bad"
    return category


def khat_unreliable(khat, num_samples: int) -> np.ndarray:
    """True where a row's estimate is flagged: finite k-hat above :func:`khat_threshold`."""
    k = np.asarray(khat, dtype=float)
    return np.isfinite(k) & (k > khat_threshold(num_samples))


def reliability_counts(khat, num_samples: int) -> dict:
    """How many rows are reliable, flagged, bad or undetermined, for a data-set summary.

    Returns
    -------
    dict
        ``rows``, ``threshold`` (:func:`khat_threshold`), ``unreliable`` (finite
        :math:`\\hat k` above the threshold, the "bad" ones included), ``bad``
        (:math:`\\hat k > 0.7`), ``undetermined`` and ``unreliable_share``
        (``unreliable / rows``, NaN without rows).
    """
    k = np.asarray(khat, dtype=float).ravel()
    category = khat_category(k, num_samples)
    unreliable = int(khat_unreliable(k, num_samples).sum())
    return {
        "rows": int(k.size),
        "threshold": khat_threshold(num_samples),
        "unreliable": unreliable,
        "bad": int(np.sum(category == "bad")),
        "undetermined": int(np.sum(category == "undetermined")),
        "unreliable_share": unreliable / k.size if k.size else math.nan,
    }


def constant_weight_rows(log_weights: np.ndarray, eps: float) -> np.ndarray:
    """Rows (of ``[rows, S]`` log weights) whose weights are numerically constant: no zero
    weight, and finite log weights varying by at most ``sqrt(eps) * max(1, |max log w|)``
    (half the working precision ``eps``). The guide is the exact posterior there, and a
    Pareto fit to rounding noise would be meaningless: such rows get k-hat ``-inf``."""
    with np.errstate(invalid="ignore"):
        top = np.max(np.where(np.isfinite(log_weights), log_weights, -np.inf), axis=1)
        bottom = np.min(np.where(np.isfinite(log_weights), log_weights, np.inf), axis=1)
        return (~np.isneginf(log_weights).any(axis=1)) & (
            top - bottom <= math.sqrt(eps) * np.maximum(1.0, np.abs(top)))


def arviz_psislw(log_weights: np.ndarray, reff: float = 1.0):
    """``arviz.psislw`` on ``[rows, S]`` log weights (a copy: ArviZ normalizes its input in
    place), without its RuntimeWarnings: ``(smoothed log weights, k-hat per row)``."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        import arviz as az

        smoothed, khat = az.psislw(np.array(log_weights, dtype=np.float64, copy=True),
                                   reff=reff)
    return np.asarray(smoothed), np.asarray(khat, dtype=np.float64)


def psis_khat(log_weights, eps: float | None = None, reff: float = 1.0) -> np.ndarray:
    """Pareto k-hat of each row's importance weights, from :func:`arviz.psislw`.

    Parameters
    ----------
    log_weights : array, shape (..., S)
        Log importance weights, draws on the last axis (one row per data row).
    eps : float, optional
        Machine epsilon of the precision the log weights were computed in (default: that of
        float32, the precision of model log densities); rows with numerically constant
        weights (:func:`constant_weight_rows`) get ``-inf``, the rule
        :func:`pyro_lvm.inference.importance_diagnostics` applies.
    reff : float
        Relative efficiency of the draws (1 for independent draws from the guide).

    Returns
    -------
    ndarray, shape (...)
        k-hat per row, as ArviZ computes it; ``-inf`` for constant weights; ``+inf`` where
        ArviZ fits no tail (fewer than 5 distinct large weights); NaN for a row with a NaN or
        ``+inf`` log weight or with every weight zero, and NaN for every row when
        ``S < KHAT_MIN_SAMPLES`` (too few draws for a tail fit). No warning is raised.
    """
    log_weights = np.asarray(log_weights, dtype=np.float64)
    if log_weights.ndim < 1:
        raise ValueError(f"log_weights must have the draws on a last axis, got shape "
                         f"{log_weights.shape}")
    shape, num_samples = log_weights.shape[:-1], log_weights.shape[-1]
    khat = np.full(shape, math.nan)
    if num_samples < KHAT_MIN_SAMPLES:
        return khat
    lw = log_weights.reshape(-1, num_samples)
    flat = khat.reshape(-1)
    if eps is None:
        eps = float(np.finfo(np.float32).eps)
    invalid = np.isnan(lw).any(axis=1) | np.isposinf(lw).any(axis=1) | np.isneginf(lw).all(axis=1)
    constant = ~invalid & constant_weight_rows(lw, eps)
    flat[constant] = -np.inf
    varying = np.nonzero(~invalid & ~constant)[0]
    if len(varying):
        flat[varying] = arviz_psislw(lw[varying], reff)[1]
    return flat.reshape(shape)


def _logsumexp(a: np.ndarray, axis: int = -1) -> np.ndarray:
    top = np.max(a, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log(np.sum(np.exp(a - top), axis=axis, keepdims=True)) + top
    return np.squeeze(out, axis=axis)


def _tail_length(num_samples: int, reff: float) -> int:
    # ArviZ's psislw: the largest ceil(min(S/5, 3 sqrt(S/reff))) weights form the tail
    return int(math.ceil(min(num_samples / 5.0, 3.0 * math.sqrt(num_samples / reff))))


def psis_log_mean_from_smoothed(log_weights, smoothed, reff: float = 1.0) -> np.ndarray:
    """PSIS estimate of :math:`\\log \\frac1S \\sum_k w_k` from ArviZ's normalized output.

    :func:`arviz.psislw` replaces the largest weights by quantiles of the fitted generalized
    Pareto distribution (capped at the largest raw weight) and returns the smoothed log
    weights *normalized* to sum to one, :math:`\\tilde\\ell_k = \\log \\tilde w_k - \\log
    \\sum_j \\tilde w_j`. The PSIS estimate of the mean weight is
    :math:`\\frac1S \\sum_k \\tilde w_k` (their eq. 2 with unnormalized weights), so the
    normalizer is needed. The body (every weight below the tail cut-off, at least the
    :math:`S - M` smallest with :math:`M = \\lceil \\min(S/5, 3\\sqrt{S/r_{\\mathrm{eff}}})
    \\rceil`) is left unchanged: :math:`\\tilde w_k = w_k` there. Summing over the body set B,

    .. math::

        \\log \\sum_j \\tilde w_j = \\operatorname{logsumexp}_{k \\in B} \\log w_k
                                 - \\operatorname{logsumexp}_{k \\in B} \\tilde\\ell_k ,
        \\qquad
        \\log \\hat p_{\\mathrm{PSIS}}(x) = \\log \\sum_j \\tilde w_j - \\log S .

    When no tail was smoothed (:math:`\\hat k = \\infty`) this is the raw estimate
    :math:`\\operatorname{logsumexp}_k \\log w_k - \\log S`.

    Parameters
    ----------
    log_weights : array, shape (..., S)
        Raw log weights, draws on the last axis.
    smoothed : array, shape (..., S)
        ``arviz.psislw(log_weights, reff)[0]`` (normalized smoothed log weights).
    reff : float
        The relative efficiency passed to ``psislw`` (1 for independent draws).

    Returns
    -------
    ndarray, shape (...)
        NaN for a row whose body weights are all zero (no unchanged weight fixes the scale).
    """
    log_weights = np.asarray(log_weights, dtype=np.float64)
    smoothed = np.asarray(smoothed, dtype=np.float64)
    if log_weights.shape != smoothed.shape or log_weights.ndim < 1:
        raise ValueError(f"log_weights {log_weights.shape} and smoothed {smoothed.shape} must "
                         f"have the same shape (..., S)")
    num_samples = log_weights.shape[-1]
    body = max(num_samples - _tail_length(num_samples, reff), 1)
    order = np.argsort(log_weights, axis=-1, kind="stable")[..., :body]
    raw_body = np.take_along_axis(log_weights, order, axis=-1)
    smoothed_body = np.take_along_axis(smoothed, order, axis=-1)
    with np.errstate(invalid="ignore"):
        log_total = _logsumexp(raw_body) - _logsumexp(smoothed_body)
    return log_total - math.log(num_samples)


def psis_log_mean(log_weights, reff: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Pareto-smoothed estimate of :math:`\\log \\frac1S \\sum_k w_k` and its k-hat, per row.

    Parameters
    ----------
    log_weights : array, shape (..., S)
        Log importance weights, draws on the last axis (e.g. :math:`\\log p(x_i, z_{ik}) -
        \\log q(z_{ik} \\mid x_i)` for row i), so the result estimates :math:`\\log p(x_i)`.
    reff : float
        Relative efficiency of the draws (1 for independent draws from the guide).

    Returns
    -------
    (estimate, khat) : arrays of shape (...)
        See :func:`psis_log_mean_from_smoothed`; ``khat`` as from :func:`arviz.psislw`.
    """
    log_weights = np.asarray(log_weights, dtype=np.float64)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        import arviz as az

        # psislw may modify its argument; it gets a copy
        smoothed, khat = az.psislw(np.array(log_weights, copy=True), reff=reff)
    smoothed = np.asarray(smoothed, dtype=np.float64)
    return psis_log_mean_from_smoothed(log_weights, smoothed, reff), np.asarray(khat, float)
