"""Importance diagnostics: per-row Pareto k-hat (PSIS) and effective sample size of the
importance weights :math:`w_k = p(x, z_k) / q(z_k \\mid x)` (Vehtari et al. 2024; Yao et al.
2018)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np
import pandas as pd
import torch


from pyro_lvm.inference import reliability
from pyro_lvm.inference.diagnostics._common import _check_int, _iter_log_weights, _prepare, _seeded


#: The K-aware threshold at K = 100 draws (kept for reference; rows are classified by
#: :func:`pyro_lvm.inference.reliability.khat_threshold` of the actual number of draws).
KHAT_GOOD = 0.5
#: Pareto k-hat above which importance sampling (and the guide) should not be trusted.
KHAT_OK = reliability.KHAT_BAD

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
    constant = reliability.constant_weight_rows(log_w, eps)

    lse = _logsumexp(log_w, axis=1)
    ess = np.exp(2.0 * lse - _logsumexp(2.0 * log_w, axis=1))
    khat = np.full(num_rows, -np.inf)
    ess_psis = ess.copy()
    varying = np.nonzero(~constant)[0]
    if len(varying):
        smoothed, khat[varying] = reliability.arviz_psislw(log_w[varying])
        # smoothed log weights are normalized: ESS = 1 / sum(w~^2)
        ess_psis[varying] = np.exp(-_logsumexp(2.0 * smoothed, axis=1))
    log_px_psis = lse - math.log(k)
    if len(varying):
        log_px_psis[varying] = reliability.psis_log_mean_from_smoothed(log_w[varying], smoothed)
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
            "log_px_se": log_px_se, "log_px_psis": log_px_psis, "constant": constant}


def _khat_category(khat: np.ndarray, num_samples: int) -> np.ndarray:
    # +inf: ArviZ could not fit the tail (fewer than 5 distinct large weights, e.g. a discrete
    # latent with few values); NaN: the fit failed. Neither says how heavy the tail is.
    return reliability.khat_category(khat, num_samples)


@dataclass
class ImportanceDiagnostics:
    """Per-row PSIS diagnostics of the guide as an importance sampling proposal.

    Attributes
    ----------
    per_row : pandas.DataFrame
        One row per data row: ``row``, ``khat`` (Pareto shape of the weights' right tail;
        ``-inf`` when the weights are constant to working precision, ``inf`` when the tail
        had too few distinct values to fit, e.g. for a discrete latent with few states),
        ``category`` (``good`` k <= t(K) = min(1 - 1/log10 K, 0.7), ``ok`` t(K) < k <= 0.7,
        ``bad`` k > 0.7, ``undetermined`` for ``inf`` or a failed fit; median and max k-hat
        skip those; :func:`pyro_lvm.inference.khat_threshold`), ``unreliable`` (finite k above
        t(K): the row's estimate and its standard error are not trustworthy), ``ess`` and ``ess_fraction``
        (:math:`(\\sum_k w_k)^2 / \\sum_k w_k^2` and that over K), ``ess_psis`` and
        ``ess_psis_fraction`` (the same for the Pareto-smoothed weights), ``constant_weights``,
        ``log_px_estimate`` and ``log_px_se`` (the importance-sampled estimate
        :math:`\\log \\frac1K \\sum_k w_k` of log p(x) and its delta-method Monte Carlo
        standard error; an estimate, consistent as K grows, biased low for finite K),
        ``log_px_psis`` (the Pareto-smoothed estimate, the log of the mean of the smoothed
        weights; :func:`pyro_lvm.inference.reliability.psis_log_mean`).
    num_samples : int
        K, the number of importance samples per row.
    """

    per_row: pd.DataFrame
    num_samples: int

    def _fraction(self, category: str) -> float:
        return float((self.per_row["category"] == category).mean())

    @property
    def threshold(self) -> float:
        """The K-aware k-hat threshold min(1 - 1/log10 K, 0.7) for these draws."""
        return reliability.khat_threshold(self.num_samples)

    @property
    def fraction_unreliable(self) -> float:
        """Fraction of rows flagged: finite k-hat above :attr:`threshold`."""
        return float(self.per_row["unreliable"].mean())

    @property
    def fraction_good(self) -> float:
        """Fraction of rows with k-hat <= :attr:`threshold`."""
        return self._fraction("good")

    @property
    def fraction_ok(self) -> float:
        """Fraction of rows with :attr:`threshold` < k-hat <= 0.7 (more draws would help)."""
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
            "khat_threshold": self.threshold,
            "khat_fraction_unreliable": self.fraction_unreliable,
            "ess_fraction_median": self.ess_fraction_median,
            "ess_psis_fraction_median": float(np.median(self.per_row["ess_psis_fraction"])),
            "importance_num_samples": float(self.num_samples),
        }

    def summary(self) -> str:
        n = len(self.per_row)
        return (
            f"Pareto k-hat of the importance weights over {n} rows (K = {self.num_samples}): "
            f"median {self.khat_median:.3g}, max {self.khat_max:.3g}; "
            f"{100 * self.fraction_good:.1f}% good (k <= {self.threshold:.2f}), "
            f"{100 * self.fraction_ok:.1f}% ok ({self.threshold:.2f}-{KHAT_OK}, more draws would "
            f"help), {100 * self.fraction_bad:.1f}% bad (k > {KHAT_OK}); "
            f"{100 * self.fraction_unreliable:.1f}% of the rows' estimates are unreliable"
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
    :math:`\\hat k \\le \\min(1 - 1/\\log_{10} K, 0.7)` (:func:`pyro_lvm.inference.khat_threshold`,
    0.5 at K = 100) the estimate for that row is reliable and the guide a usable proposal;
    above it and up to 0.7 more draws would make it reliable; each row above the threshold
    is flagged (``unreliable``: its estimate and standard error are not trustworthy);
    :math:`\\hat k > 0.7` means the importance-sampled estimates for that row (including
    ``log p(x)``) are unreliable and the guide misses posterior mass -- typically it is too
    narrow. This is the check of Yao, Vehtari, Simpson & Gelman (2018) applied to each data
    point's posterior.

    Parameters
    ----------
    pair : model/guide pair (see :func:`inference.engine.resolve_pair`)
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
                "log_px_psis": summary["log_px_psis"],
            }))
    per_row = pd.concat(frames, ignore_index=True)
    per_row.insert(2, "category", _khat_category(per_row["khat"].to_numpy(), num_samples))
    per_row.insert(3, "unreliable", reliability.khat_unreliable(per_row["khat"].to_numpy(),
                                                                 num_samples))
    return ImportanceDiagnostics(per_row=per_row, num_samples=num_samples)


