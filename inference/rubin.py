r"""Rubin's rules: pooling an estimand over multiply imputed data sets.

With :math:`M` completed data sets, estimates :math:`\hat Q_j` and their complete-data
variances :math:`U_j` (Rubin 1987, sect. 3.1):

.. math::

    \bar Q = \frac1M \sum_j \hat Q_j, \qquad
    \bar U = \frac1M \sum_j U_j, \qquad
    B = \frac{1}{M-1} \sum_j (\hat Q_j - \bar Q)^2, \qquad
    T = \bar U + \Big(1 + \frac1M\Big) B,

and :math:`(\bar Q - Q)/\sqrt T` is approximately Student-t with
:math:`\nu_{\text{Rubin}} = (M - 1)\,(1 + 1/r)^2`, :math:`r = (1 + 1/M) B / \bar U`
(Rubin 1987, eq. 3.1.6), or, given the complete-data degrees of freedom :math:`\nu_{com}`,
the Barnard & Rubin (1999) small-sample version
:math:`\nu = (1/\nu_{\text{Rubin}} + 1/\hat\nu_{obs})^{-1}`,
:math:`\hat\nu_{obs} = \frac{\nu_{com} + 1}{\nu_{com} + 3}\,\nu_{com}\,(1 - \gamma)`,
:math:`\gamma = (1 + 1/M) B / T` (the fraction of missing information, also reported).

References
----------
Rubin, D. B. (1987). Multiple imputation for nonresponse in surveys. Wiley.
Barnard, J. & Rubin, D. B. (1999). Small-sample degrees of freedom with multiple imputation.
Biometrika 86(4), 948-955.
van Buuren, S. (2018). Flexible imputation of missing data, 2nd ed., sect. 2.3-2.4.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import scipy.stats

__all__ = ["RubinPooled", "rubin_pool", "pooled_column_mean", "pooled_regression"]


@dataclass
class RubinPooled:
    """Pooled estimate :math:`\\bar Q`, variances :math:`\\bar U`, :math:`B`, :math:`T`,
    degrees of freedom, fraction of missing information :math:`\\gamma` and a ``level``
    t-interval."""

    estimate: float
    within: float
    between: float
    total: float
    df: float
    fraction_missing_information: float
    ci_low: float
    ci_high: float
    level: float
    num_imputations: int

    @property
    def se(self) -> float:
        return math.sqrt(self.total)


def rubin_pool(estimates: Sequence[float], variances: Sequence[float], *, level: float = 0.95,
               df_complete: Optional[float] = None) -> RubinPooled:
    """Pool ``M >= 2`` estimates and their complete-data variances by Rubin's rules (see the
    module docstring); ``df_complete`` switches to the Barnard-Rubin degrees of freedom."""
    q = np.asarray(estimates, dtype=np.float64).reshape(-1)
    u = np.asarray(variances, dtype=np.float64).reshape(-1)
    if q.shape != u.shape:
        raise ValueError(f"estimates and variances differ in length: {q.size} vs {u.size}")
    if q.size < 2:
        raise ValueError(f"Rubin's rules need at least 2 imputations, got {q.size}")
    if not (np.isfinite(q).all() and np.isfinite(u).all() and (u >= 0).all()):
        raise ValueError("estimates must be finite and variances finite and non-negative")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    m = q.size
    q_bar, u_bar, b = float(q.mean()), float(u.mean()), float(q.var(ddof=1))
    t = u_bar + (1 + 1 / m) * b
    extra = (1 + 1 / m) * b
    df = math.inf if extra == 0 else (m - 1) * (1 + u_bar / extra) ** 2
    gamma = extra / t if t > 0 else 0.0
    if df_complete is not None:
        if not df_complete > 0:
            raise ValueError(f"df_complete must be positive, got {df_complete!r}")
        df_obs = (df_complete + 1) / (df_complete + 3) * df_complete * (1 - gamma)
        df = 1 / (1 / df + 1 / df_obs) if df_obs > 0 else 0.0
    crit = scipy.stats.t.ppf((1 + level) / 2, df) if math.isfinite(df) else \
        scipy.stats.norm.ppf((1 + level) / 2)
    half = float(crit) * math.sqrt(t)
    return RubinPooled(estimate=q_bar, within=u_bar, between=b, total=t, df=df,
                       fraction_missing_information=gamma, ci_low=q_bar - half,
                       ci_high=q_bar + half, level=level, num_imputations=m)


def _draws(draws) -> np.ndarray:
    d = np.asarray(draws.detach().cpu() if hasattr(draws, "detach") else draws, dtype=np.float64)
    if d.ndim != 3 or d.shape[0] < 2:
        raise ValueError(f"draws must be [M >= 2, rows, columns] completed data sets, got shape "
                         f"{d.shape}")
    if not np.isfinite(d).all():
        raise ValueError("draws must be finite (completed data sets)")
    return d


def pooled_column_mean(draws, column: int, *, level: float = 0.95) -> RubinPooled:
    """Rubin-pooled mean of one column: per data set the sample mean with variance
    :math:`s^2 / n`, complete-data degrees of freedom :math:`n - 1`."""
    d = _draws(draws)
    if not 0 <= column < d.shape[2]:
        raise ValueError(f"column {column} out of range for {d.shape[2]} columns")
    col = d[:, :, column]
    n = col.shape[1]
    return rubin_pool(col.mean(1), col.var(1, ddof=1) / n, level=level, df_complete=n - 1)


def pooled_regression(draws, response: int, predictors: Sequence[int], *,
                      level: float = 0.95) -> List[RubinPooled]:
    """Rubin-pooled ordinary least squares of column ``response`` on ``predictors`` (with an
    intercept): one :class:`RubinPooled` per coefficient, intercept first. Per data set the
    coefficient variances are :math:`\\hat\\sigma^2 (X^\\top X)^{-1}` (homoscedastic OLS),
    complete-data degrees of freedom :math:`n - k - 1`."""
    d = _draws(draws)
    predictors = list(predictors)
    if response in predictors or not predictors:
        raise ValueError("predictors must be a non-empty list of columns other than response")
    n = d.shape[1]
    k = len(predictors) + 1
    if n <= k:
        raise ValueError(f"{n} rows cannot fit {k} coefficients")
    coefs, variances = [], []
    for data in d:
        X = np.column_stack([np.ones(n), data[:, predictors]])
        y = data[:, response]
        beta, *_ = np.linalg.lstsq(X, y, rcond=None)
        resid = y - X @ beta
        sigma2 = resid @ resid / (n - k)
        coefs.append(beta)
        variances.append(sigma2 * np.diag(np.linalg.inv(X.T @ X)))
    coefs, variances = np.array(coefs), np.array(variances)
    return [rubin_pool(coefs[:, j], variances[:, j], level=level, df_complete=n - k)
            for j in range(k)]
