"""The results of held-out evaluation: :class:`LogLikelihoodEstimate` (importance-sampled
log p(x) with Monte Carlo and across-row standard errors, ESS, Pareto k-hat, bits per dimension),
:class:`ELBOEstimate` and :class:`ReconstructionError`, each with ``to_dict()`` for a metrics
JSON and ``summary()`` for people, printing every number with as many decimals as its
standard error warrants. How they are computed is in :mod:`pyro_lvm.inference.evaluate`."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional

import numpy as np
import pandas as pd

from pyro_lvm.inference import reliability

__all__ = ["LogLikelihoodEstimate", "ELBOEstimate", "ReconstructionError", "IS_LABEL",
           "ELBO_LABEL"]


IS_LABEL = "IS estimate of log p(x) (IWAE_K lower bound in expectation)"
ELBO_LABEL = "ELBO (lower bound on log p(x))"


def _fmt(value: Optional[float], se: Optional[float] = None) -> str:
    """Format a value with as many decimals as its standard error warrants (at least 2)."""
    if value is None or not np.isfinite(value):
        return str(value)
    decimals = 2
    if se is not None and np.isfinite(se) and se > 0:
        decimals = int(min(6, max(2, 1 - math.floor(math.log10(se)))))
    return f"{value:.{decimals}f}"


class _Summarized:
    """``str(result)`` is the result's ``summary()``."""

    def __str__(self) -> str:
        return self.summary()


@dataclass
class _PerRowEstimate(_Summarized):
    """The fields the two bound / likelihood estimates share (documented on each)."""

    per_row: pd.DataFrame
    mean: float
    mc_se: float
    data_se: float
    exact_mean: Optional[float]
    num_samples: int
    num_rows: int


@dataclass
class LogLikelihoodEstimate(_PerRowEstimate):
    """Importance-sampled estimate of log p(x) per row and for the data set.

    Attributes
    ----------
    per_row : pandas.DataFrame
        One row per data row: ``log_px`` (IS estimate, IWAE_K lower bound in expectation),
        ``se`` (its Monte Carlo standard error, delta method), ``ess`` (effective sample
        size of the K weights, between 1 and K), ``khat`` (Pareto k-hat of the row's K
        weights, :func:`pyro_lvm.inference.reliability.psis_khat`: ``-inf`` for constant
        weights, ``+inf`` when no tail could be fitted, NaN when K < 25), ``exact_log_px``
        (when the model has ``log_marginal``).
    mean : float
        Mean of ``log_px`` over rows (nats per row).
    mc_se : float
        Monte Carlo standard error of ``mean`` for this data set: sqrt(sum se_i^2) / n.
    data_se : float
        Sampling standard error across rows: sd(log_px) / sqrt(n) (NaN for one row).
    exact_mean : float or None
        Mean exact log p(x) when the model has ``log_marginal``.
    num_samples, num_rows : int
        K importance samples per row; number of rows.
    discrete : bool
        Whether the observation model is discrete (log p(x) is a log probability).
    bits_per_dim, bits_per_dim_se : float or None
        For discrete data, mean over rows of -log p(x_i) / (D_i ln 2) with D_i the
        number of observed entries of row i, and its Monte Carlo standard error; None
        for continuous data (a density has no bits-per-dim reading).
    label : str
        What the estimate is, for tables and plots.

    Reliability: a row whose k-hat is above :attr:`khat_threshold` (min(1 - 1/log10 K, 0.7),
    as in :func:`pyro_lvm.inference.diagnose`) has an unreliable estimate *and* standard
    error (the weights' variance may be infinite, and the delta-method se then understates
    the error); :attr:`fraction_unreliable` is their share and ``summary()`` says so. With
    K < 25 draws per row k-hat is not computed (NaN) and the summary says the estimate is
    unchecked; with K = 1 there is no standard error either (``mc_se`` is NaN).
    """

    discrete: bool = False
    bits_per_dim: Optional[float] = None
    bits_per_dim_se: Optional[float] = None
    exact_bits_per_dim: Optional[float] = None
    seed: int = 0
    device: str = "cpu"
    rows_per_chunk: int = 0
    particles_per_chunk: int = 0
    elapsed_s: float = 0.0
    label: str = IS_LABEL

    @property
    def mean_ess(self) -> float:
        """Mean effective sample size over rows."""
        return float(self.per_row["ess"].mean())

    @property
    def khat(self) -> np.ndarray:
        """Per-row Pareto k-hat of the importance weights (NaN when not computed, K < 25)."""
        if "khat" not in self.per_row.columns:
            return np.full(len(self.per_row), math.nan)
        return self.per_row["khat"].to_numpy(dtype=float)

    @property
    def khat_checked(self) -> bool:
        """Whether k-hat was computed (K >= 25 draws per row)."""
        return self.num_samples >= reliability.KHAT_MIN_SAMPLES and bool(
            np.any(~np.isnan(self.khat)))

    @property
    def khat_threshold(self) -> Optional[float]:
        """min(1 - 1/log10 K, 0.7) (:func:`pyro_lvm.inference.khat_threshold`); None when
        k-hat was not computed."""
        return reliability.khat_threshold(self.num_samples) if self.khat_checked else None

    @property
    def unreliable(self) -> np.ndarray:
        """Per row: finite k-hat above :attr:`khat_threshold` (estimate and se unreliable)."""
        if not self.khat_checked:
            return np.zeros(len(self.per_row), dtype=bool)
        return reliability.khat_unreliable(self.khat, self.num_samples)

    def _share(self, key: str) -> float:
        """``reliability.reliability_counts``' ``key`` count as a share of the rows (NaN when
        k-hat was not computed)."""
        if not self.khat_checked or not len(self.per_row):
            return math.nan
        return reliability.reliability_counts(self.khat, self.num_samples)[key] / len(self.per_row)

    @property
    def fraction_unreliable(self) -> float:
        """Share of rows whose k-hat is above :attr:`khat_threshold` (NaN when unchecked)."""
        return self._share("unreliable")

    @property
    def fraction_bad(self) -> float:
        """Share of rows with finite k-hat above 0.7 (only a better guide helps there)."""
        return self._share("bad")

    @property
    def fraction_undetermined(self) -> float:
        """Share of rows whose k-hat could not be fitted (``+inf`` or NaN) though K >= 25."""
        return self._share("undetermined")

    def _reliability_lines(self) -> list:
        """What the k-hat says about the estimate (one line, two with undetermined rows)."""
        K = self.num_samples
        if not self.khat_checked:
            return [f"  k̂ not computed: {K} draw{'s' if K != 1 else ''} per row "
                    f"{'are' if K != 1 else 'is'} too few for a Pareto tail fit (needs "
                    f"num_samples >= {reliability.KHAT_MIN_SAMPLES}): the reliability of "
                    f"{'these estimates' if K < 2 else 'these estimates and standard errors'} "
                    f"is unchecked"]
        threshold, bad_line = self.khat_threshold, reliability.KHAT_BAD
        unreliable, bad = self.fraction_unreliable, self.fraction_bad
        lines = []
        if unreliable > 0:
            if threshold >= bad_line:
                head = f"k̂ > {bad_line:g} for {100 * unreliable:.1f}% of rows"
            else:
                head = (f"k̂ > {threshold:.3f} (the threshold for K = {K}) for "
                        f"{100 * unreliable:.1f}% of rows"
                        + (f", k̂ > {bad_line:g} for {100 * bad:.1f}%" if bad > 0 else ""))
            if bad > 0 and unreliable > bad:
                advice = f"above {bad_line:g} only a better guide helps, below it more draws do"
            elif bad > 0:
                advice = f"above {bad_line:g} only a better guide helps"
            else:
                advice = "more draws would make them reliable"
            lines.append(f"  WARNING: {head}: their importance-sampling estimates and standard "
                         f"errors are unreliable ({advice})")
        else:
            finite = self.khat[np.isfinite(self.khat)]
            top = f"max k̂ {np.max(finite):.2f}" if finite.size else "constant weights"
            lines.append(f"  Pareto k̂ <= {threshold:.3f} (the threshold for K = {K}) for every "
                         f"fitted row ({top})")
        undetermined = self.fraction_undetermined
        if undetermined > 0:
            lines.append(f"  k̂ undetermined for {100 * undetermined:.1f}% of rows (too few "
                         f"distinct large weights for a tail fit): those rows are unchecked")
        return lines

    def to_dict(self) -> Dict[str, Any]:
        """Flat dict of the summary numbers (no per-row values), JSON-serializable."""
        out: Dict[str, Any] = {
            "label": self.label,
            "log_px": float(self.mean),
            "mc_se": float(self.mc_se),
            "data_se": float(self.data_se),
            "exact_log_px": None if self.exact_mean is None else float(self.exact_mean),
            "num_samples": int(self.num_samples),
            "num_rows": int(self.num_rows),
            "mean_ess": self.mean_ess,
            "discrete": bool(self.discrete),
            "bits_per_dim": self.bits_per_dim,
            "bits_per_dim_se": self.bits_per_dim_se,
            "khat_threshold": self.khat_threshold,
            "khat_unreliable_frac": self.fraction_unreliable if self.khat_checked else None,
            "khat_bad_frac": self.fraction_bad if self.khat_checked else None,
            "seed": int(self.seed),
            "elapsed_s": float(self.elapsed_s),
        }
        return out

    def summary(self) -> str:
        K, n = self.num_samples, self.num_rows
        if np.isfinite(self.mc_se):
            head = (f"log p(x) ≈ {_fmt(self.mean, self.mc_se)} ± {_fmt(self.mc_se, self.mc_se)} "
                    f"(MC se), IWAE_{K} estimate over {n} rows")
        else:
            head = (f"log p(x) ≈ {_fmt(self.mean, self.data_se)} (no MC se: "
                    + ("one sample per row gives no standard error, use num_samples >= 2"
                       if K < 2 else "not finite")
                    + f"), IWAE_{K} estimate over {n} rows")
        lines = [head] + self._reliability_lines() + [
            f"  [{self.label}; data se across rows {_fmt(self.data_se, self.data_se)}; "
            f"mean ESS {self.mean_ess:.1f} of {K}]",
        ]
        if self.exact_mean is not None:
            gap = self.mean - self.exact_mean
            lines.append(f"  exact log p(x) = {_fmt(self.exact_mean, self.mc_se)} "
                         f"(estimate - exact = {gap:.3g}, {gap / self.mc_se:.2f} MC se)"
                         if self.mc_se > 0 else
                         f"  exact log p(x) = {_fmt(self.exact_mean, self.mc_se)} "
                         f"(estimate - exact = {gap:.3g})")
        if self.bits_per_dim is not None and self.bits_per_dim_se is not None \
                and np.isfinite(self.bits_per_dim_se):
            lines.append(f"  bits/dim ≈ {_fmt(self.bits_per_dim, self.bits_per_dim_se)} ± "
                         f"{_fmt(self.bits_per_dim_se, self.bits_per_dim_se)} (MC se)")
        elif self.bits_per_dim is not None:
            lines.append(f"  bits/dim ≈ {_fmt(self.bits_per_dim)} (no MC se"
                         + (": one sample per row, use num_samples >= 2)" if K < 2 else ")"))
        return "\n".join(lines)



@dataclass
class ELBOEstimate(_PerRowEstimate):
    """Held-out ELBO per row, :math:`\\mathrm{ELBO}(x_i) = E_q[\\log p(x_i, z) - \\log q(z\\mid x_i)]`,
    estimated with K draws from the guide (a lower bound on log p(x_i), not a likelihood).

    Attributes
    ----------
    per_row : pandas.DataFrame
        ``elbo`` (mean log weight over the K draws) and ``se`` (sd / sqrt(K); NaN for K = 1).
    mean, mc_se, data_se : float
        Mean over rows, its Monte Carlo se (sqrt(sum se_i^2)/n; NaN for K = 1, when the
        per-row Monte Carlo noise cannot be separated from the spread across rows — then
        ``data_se``, which includes it, is the standard error to use), and sd/sqrt(n).
    exact_mean : float or None
        Mean exact log p(x) when the model has ``log_marginal`` (ELBO <= it).
    """

    seed: int = 0
    label: str = ELBO_LABEL

    def to_dict(self) -> Dict[str, Any]:
        return {
            "label": self.label,
            "elbo": float(self.mean),
            "mc_se": float(self.mc_se),
            "data_se": float(self.data_se),
            "exact_log_px": None if self.exact_mean is None else float(self.exact_mean),
            "num_samples": int(self.num_samples),
            "num_rows": int(self.num_rows),
            "seed": int(self.seed),
        }

    def summary(self) -> str:
        if np.isfinite(self.mc_se):
            head = (f"ELBO ≈ {_fmt(self.mean, self.mc_se)} ± {_fmt(self.mc_se, self.mc_se)} (MC se), "
                    f"{self.num_samples} draw(s) per row over {self.num_rows} rows")
        else:
            head = (f"ELBO ≈ {_fmt(self.mean, self.data_se)} ± {_fmt(self.data_se, self.data_se)} "
                    f"(se across rows, includes MC noise; K=1), over {self.num_rows} rows")
        lines = [head, f"  [{self.label}; data se across rows {_fmt(self.data_se, self.data_se)}]"]
        if self.exact_mean is not None:
            lines.append(f"  exact log p(x) = {_fmt(self.exact_mean, self.data_se)} "
                         f"(gap log p(x) - ELBO = mean KL(q || posterior) ≈ "
                         f"{self.exact_mean - self.mean:.3g})")
        return "\n".join(lines)



@dataclass
class ReconstructionError(_Summarized):
    """Per-row reconstruction error of x by the model's reconstruction.

    Attributes
    ----------
    per_row : pandas.DataFrame
        ``mse`` (mean squared error over the observed entries of the row) and, for binary
        data with reconstructions in [0, 1], ``cross_entropy`` (binary cross-entropy summed
        over the observed entries, nats).
    mse, mse_se : float
        Mean over rows and its standard error across rows (sd/sqrt(n)).
    cross_entropy, cross_entropy_se : float or None
    method : str
        ``"reconstruct"`` (the pair's own ``reconstruct(x)``) or ``"likelihood_mean"`` (mean of
        p(x | z) at z = mean of q(z | x)). Both are deterministic given the parameters, so
        there is no Monte Carlo error.
    """

    per_row: pd.DataFrame
    mse: float
    mse_se: float
    cross_entropy: Optional[float]
    cross_entropy_se: Optional[float]
    method: str
    num_rows: int

    def to_dict(self) -> Dict[str, Any]:
        return {
            "mse": float(self.mse),
            "mse_se": float(self.mse_se),
            "cross_entropy": self.cross_entropy,
            "cross_entropy_se": self.cross_entropy_se,
            "method": self.method,
            "num_rows": int(self.num_rows),
        }

    def summary(self) -> str:
        s = (f"reconstruction MSE = {_fmt(self.mse, self.mse_se)} ± {_fmt(self.mse_se, self.mse_se)} "
             f"(se across rows) over {self.num_rows} rows [{self.method}]")
        if self.cross_entropy is not None:
            s += (f"\n  binary cross-entropy = {_fmt(self.cross_entropy, self.cross_entropy_se)} ± "
                  f"{_fmt(self.cross_entropy_se, self.cross_entropy_se)} nats per row")
        return s
