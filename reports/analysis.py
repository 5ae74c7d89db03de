"""Statistics behind a study report: per-configuration summaries, paired differences, a verdict.

A *study* is a grid of configurations, each fit once per seed. One row of ``results.csv`` is one
run. The *configuration* of a run is every config column except ``run_id`` and ``seed``; seeds
are replicates of a configuration. All functions here are pure (they read a
:class:`pandas.DataFrame` and return new ones) and exclude failed runs from every statistic
while counting them.

Notation. For a configuration :math:`c` with successful seeds :math:`s = 1, \\dots, n_c` and
per-run metric :math:`y_{cs}` (e.g. the importance-sampled estimate of the mean test
:math:`\\log p(x)`),

.. math::

    \\bar y_c = \\frac{1}{n_c} \\sum_s y_{cs}, \\qquad
    \\widehat{\\mathrm{se}}(\\bar y_c) = \\frac{\\mathrm{sd}_s(y_{cs})}{\\sqrt{n_c}}

with the sample standard deviation (``ddof=1``). The standard error is over seeds: it contains
the seed-to-seed variation of training *and* the Monte Carlo error of each run's estimate.

Two levels :math:`a, b` of a factor (e.g. ``prior``) are compared on *matched* runs, runs
equal in every other config column and in the seed, :math:`d_j = y_{a,j} - y_{b,j}`,
:math:`j = 1, \\dots, m`, with a Student-t interval
:math:`\\bar d \\pm t_{m-1, 1-\\alpha/2}\\, \\mathrm{sd}(d)/\\sqrt{m}` (the paired t-test of
Student 1908; see e.g. Wasserman, *All of Statistics*, 2004, sec. 10.3). Pairing on the seed
removes the variation shared by runs with the same seed (same data split order, same
initialization stream), which is why paired intervals are usually much narrower than the
difference of two per-configuration standard errors suggests.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
from scipy import stats

__all__ = [
    "BOOKKEEPING_COLUMNS",
    "METRIC_COLUMNS",
    "Verdict",
    "config_columns",
    "config_label",
    "failed_runs",
    "format_estimate",
    "metric_label",
    "num_eval_samples",
    "paired_differences",
    "successful_runs",
    "summarize",
    "tied_columns",
    "varying_columns",
    "verdict",
]

#: Per-run outcomes written by the study runner (never part of a configuration).
METRIC_COLUMNS: tuple[str, ...] = (
    "test_log_likelihood", "test_log_likelihood_se", "test_log_likelihood_data_se",
    "exact_test_log_likelihood", "test_elbo", "test_elbo_se", "kl", "kl_se", "active_units",
    "khat_good_frac", "khat_ok_frac", "khat_bad_frac", "khat_undetermined_frac",
    "khat_unreliable_frac", "test_log_likelihood_psis", "khat_median",
    "khat_max", "khat_num_samples", "mean_ess", "bits_per_dim", "bits_per_dim_se",
    "final_train_objective", "final_valid_objective", "epochs_run", "num_parameters",
    "train_time_s", "eval_time_s", "wall_time_s",
)
#: Identifiers and status columns (never part of a configuration).
BOOKKEEPING_COLUMNS: tuple[str, ...] = ("run_id", "seed", "status", "error", "traceback", "device",
                                       "notes", "settings_not_used")

#: Columns that may hold the number of importance samples K used for the test estimate.
_EVAL_SAMPLE_COLUMNS = ("num_eval_samples", "eval_samples", "eval_num_samples")


# --------------------------------------------------------------------------- helpers


def _require_columns(results: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    if not isinstance(results, pd.DataFrame):
        raise ValueError(f"results must be a pandas DataFrame, got {type(results).__name__}")
    missing = [c for c in columns if c not in results.columns]
    if missing:
        raise ValueError(
            f"{what}: column(s) {missing} not in the results table; "
            f"available columns: {list(results.columns)}"
        )


#: Status values of runs that have not (yet) produced a result: neither ok nor failed.
PENDING_STATUSES = ("pending", "running", "interrupted", "")


def _status(results: pd.DataFrame) -> pd.Series:
    if "status" not in results.columns:
        return pd.Series("ok", index=results.index, dtype="string")
    return results["status"].astype("string").str.strip().str.lower().fillna("")


def _ok_mask(results: pd.DataFrame) -> pd.Series:
    """True for runs that finished (``status == "ok"``); all runs when there is no status."""
    return _status(results).eq("ok").astype(bool)


def _pending_mask(results: pd.DataFrame) -> pd.Series:
    """True for runs not done yet (status pending, running, interrupted or missing)."""
    return _status(results).isin(PENDING_STATUSES).astype(bool)


def _failed_mask(results: pd.DataFrame) -> pd.Series:
    """True for runs that ended without a result (``"failed"`` or any unknown status)."""
    return ~(_ok_mask(results) | _pending_mask(results))


def successful_runs(results: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``results`` whose ``status`` is ``"ok"``."""
    _require_columns(results, [], "successful_runs")
    return results.loc[_ok_mask(results)]


def failed_runs(results: pd.DataFrame, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """The rows of ``results`` that did not finish, with their error message.

    Parameters
    ----------
    results : DataFrame
        One row per run.
    columns : sequence of str, optional
        Configuration columns to keep next to ``run_id``, ``seed`` and ``error``
        (default: :func:`config_columns`).
    """
    _require_columns(results, [], "failed_runs")
    columns = config_columns(results) if columns is None else list(columns)
    keep = [c for c in ["run_id", *columns, "seed", "status", "error"] if c in results.columns]
    failed = results.loc[_failed_mask(results), keep].copy()
    if "error" in failed.columns:
        failed["error"] = failed["error"].astype("string").fillna("(no message recorded)")
    return failed.reset_index(drop=True)


def config_columns(results: pd.DataFrame, candidates: Iterable[str] | None = None) -> list[str]:
    """Columns that define a configuration (every config column except ``run_id`` and ``seed``).

    Parameters
    ----------
    results : DataFrame
        One row per run.
    candidates : iterable of str, optional
        The config keys the runner recorded (e.g. the keys of ``runs/<id>/config.json``). When
        given, the configuration columns are those of them present in ``results`` (in the
        table's order). When omitted, every column that is neither a known metric nor a
        bookkeeping column (``run_id``, ``seed``, ``status``, ``error``, ``device``,
        ``notes``) and does not end in ``_se`` or ``_time_s``.
    """
    _require_columns(results, [], "config_columns")
    excluded = set(METRIC_COLUMNS) | set(BOOKKEEPING_COLUMNS)
    if candidates is not None:
        wanted = set(candidates) - excluded
        return [c for c in results.columns if c in wanted]
    return [
        c for c in results.columns
        if c not in excluded and not c.endswith("_se") and not c.endswith("_time_s")
    ]


def varying_columns(results: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    """The subset of ``columns`` that take more than one value (missing counts as a value)."""
    _require_columns(results, columns, "varying_columns")
    return [c for c in columns if results[c].astype("string").fillna("<NA>").nunique() > 1]


def tied_columns(results: pd.DataFrame, factor: str, columns: Sequence[str]) -> list[str]:
    """Columns of ``columns`` that vary but are a function of ``factor``'s level.

    Such a column changes together with the factor (``num_particles`` = 1 for every ELBO run,
    5 for every IWAE run), so it is part of what a level *means* rather than a separate
    condition to match on.
    """
    _require_columns(results, [factor, *columns], "tied_columns")
    level = results[factor].map(_format_value)
    tied = []
    for column in varying_columns(results, [c for c in columns if c != factor]):
        values = results[column].map(_format_value)
        if values.groupby(level, sort=False).nunique().le(1).all():
            tied.append(column)
    return tied


def _format_value(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return "—"
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def config_label(row: pd.Series | dict, columns: Sequence[str]) -> str:
    """``"prior=vamp, objective=iwae_5"``: a configuration named by its (varying) columns."""
    if not columns:
        return "all runs"
    return ", ".join(f"{c}={_format_value(row[c])}" for c in columns)


def _key_strings(frame: pd.DataFrame, columns: Sequence[str]) -> pd.Series:
    """One hashable string per row identifying its values in ``columns`` (NaN matches NaN)."""
    if not columns:
        return pd.Series("", index=frame.index, dtype=object)
    parts = [frame[c].map(_format_value) for c in columns]
    key = parts[0]
    for p in parts[1:]:
        key = key + "\x1f" + p
    return key


def _finite_metric(frame: pd.DataFrame, metric: str) -> pd.Series:
    values = pd.to_numeric(frame[metric], errors="coerce").astype("float64")
    return values.where(np.isfinite(values))


def _t_interval(differences: np.ndarray, confidence: float) -> tuple[float, float, float, float]:
    """Mean, standard error and Student-t interval of ``differences`` (NaN when m < 2)."""
    m = differences.size
    if m == 0:
        return (math.nan,) * 4
    mean = float(differences.mean())
    if m < 2:
        return mean, math.nan, math.nan, math.nan
    se = float(differences.std(ddof=1) / math.sqrt(m))
    half = float(stats.t.ppf(0.5 + confidence / 2.0, df=m - 1)) * se
    return mean, se, mean - half, mean + half


def _check_confidence(confidence: float) -> None:
    if not (isinstance(confidence, (float, int)) and 0.0 < float(confidence) < 1.0):
        raise ValueError(f"confidence must be a number in (0, 1), got {confidence!r}")


# --------------------------------------------------------------------------- labels


def num_eval_samples(results: pd.DataFrame, study: dict | None = None) -> int | None:
    """The number of importance samples K behind ``test_log_likelihood``, when it is unique.

    Looked up in a results column (``num_eval_samples``, ``eval_samples``) and then in the
    study metadata (top level or ``grid``); ``None`` when unknown or when runs differ.
    """
    for column in _EVAL_SAMPLE_COLUMNS:
        if isinstance(results, pd.DataFrame) and column in results.columns:
            values = pd.to_numeric(results[column], errors="coerce").dropna().unique()
            return int(values[0]) if len(values) == 1 else None
    study = study or {}
    for source in (study, study.get("grid") or {}, study.get("settings") or {}):
        for column in _EVAL_SAMPLE_COLUMNS:
            value = source.get(column) if isinstance(source, dict) else None
            if isinstance(value, list):
                value = value[0] if len(value) == 1 else None
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return int(value)
    return None


def metric_label(metric: str, num_samples: int | None = None) -> str:
    """A label that says what a metric estimates (a bound is never called a likelihood).

    Parameters
    ----------
    metric : str
        Column name of ``results.csv``.
    num_samples : int, optional
        K, the number of importance samples of the test estimate.
    """
    k = f"K={num_samples}" if num_samples else "K as configured"
    labels = {
        "test_log_likelihood": f"IS estimate of log p(x) (IWAE_K, K={num_samples})"
        if num_samples else "IS estimate of log p(x) (IWAE_K, K as configured)",
        "test_log_likelihood_se": f"Monte Carlo se of the IS estimate of log p(x) ({k})",
        "exact_test_log_likelihood": "exact log p(x) (linear models)",
        "test_elbo": "ELBO (lower bound)",
        "test_elbo_se": "Monte Carlo se of the ELBO",
        "kl": "KL(q(z|x) ‖ p(z)) (nats)",
        "active_units": "active units (Var_x E_q[z_j] > 0.01)",
        "khat_good_frac": "fraction of test rows with Pareto k̂ at most min(1 − 1/log₁₀ K, 0.7)",
        "khat_ok_frac": "fraction of test rows with k̂ between min(1 − 1/log₁₀ K, 0.7) and 0.7",
        "khat_bad_frac": "fraction of test rows with k̂ > 0.7",
        "khat_unreliable_frac": "fraction of test rows with k̂ above min(1 − 1/log₁₀ K, 0.7) "
                                "(unreliable estimates)",
        "test_log_likelihood_psis": "PSIS-smoothed IS estimate of log p(x)",
        "khat_undetermined_frac": "fraction of test rows whose k̂ could not be estimated",
        "khat_median": "median Pareto k̂",
        "train_time_s": "training time (s)",
        "eval_time_s": "evaluation time (s)",
        "wall_time_s": "wall time (s)",
        "bits_per_dim": "bits/dim (from the IS estimate of log p(x))",
        "khat_max": "largest Pareto k̂",
        "mean_ess": "mean ESS of the importance weights",
    }
    return labels.get(metric, metric)


def format_estimate(mean: float, se: float | None = None, digits: int = 2) -> str:
    """``"-95.21 ± 0.13"``; ``"—"`` when the mean is missing; no ``±`` when se is missing."""
    if mean is None or not np.isfinite(mean):
        return "—"
    if se is None or not np.isfinite(se):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


# --------------------------------------------------------------------------- summaries


def summarize(
    results: pd.DataFrame,
    metric: str,
    by: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Mean and standard error of a metric over seeds, per configuration.

    For each configuration :math:`c` (a distinct value of the ``by`` columns) with successful
    runs :math:`y_{c1}, \\dots, y_{cn}`:
    ``mean`` :math:`= \\bar y_c`, ``sd`` the sample standard deviation (``ddof=1``),
    ``se`` :math:`= \\mathrm{sd}/\\sqrt{n}` (NaN when :math:`n < 2`).
    When the table has the Monte Carlo standard error of the metric (column ``<metric>_se``),
    ``mc_se`` :math:`= \\sqrt{\\sum_s \\mathrm{se}_{cs}^2}/n` is the part of the uncertainty of
    :math:`\\bar y_c` due to Monte Carlo estimation alone (it is already contained in ``se``).

    Parameters
    ----------
    results : DataFrame
        One row per run with a ``status`` column (``"ok"`` or ``"failed"``).
    metric : str
        The column to summarize.
    by : sequence of str, optional
        Configuration columns (default :func:`config_columns`); ``[]`` pools every run.

    Returns
    -------
    DataFrame
        One row per configuration in order of first appearance: the ``by`` columns, ``n``
        (successful runs with a finite value), ``mean``, ``sd``, ``se``, [``mc_se``],
        ``n_failed`` (failed runs of the configuration, excluded from the statistics),
        ``n_pending`` (runs not done yet),
        ``n_missing`` (successful runs without a finite value).
    """
    _require_columns(results, [metric], "summarize")
    by = config_columns(results) if by is None else list(by)
    _require_columns(results, by, "summarize (by)")
    ok, failed, pending = _ok_mask(results), _failed_mask(results), _pending_mask(results)
    values = _finite_metric(results, metric)
    mc_column = f"{metric}_se"
    mc = _finite_metric(results, mc_column) if mc_column in results.columns else None

    keys = _key_strings(results, by)
    rows = []
    for key in pd.unique(keys):
        in_group = keys == key
        first = results.loc[in_group].iloc[0]
        y = values[in_group & ok].dropna().to_numpy()
        n = y.size
        row = {c: first[c] for c in by}
        row["n"] = n
        row["mean"] = float(y.mean()) if n else math.nan
        row["sd"] = float(y.std(ddof=1)) if n >= 2 else math.nan
        row["se"] = row["sd"] / math.sqrt(n) if n >= 2 else math.nan
        if mc is not None:
            s = mc[in_group & ok & values.notna()].to_numpy()
            row["mc_se"] = (
                float(np.sqrt(np.sum(s**2)) / n) if n and np.isfinite(s).all() else math.nan
            )
        row["n_failed"] = int((in_group & failed).sum())
        row["n_pending"] = int((in_group & pending).sum())
        row["n_missing"] = int((in_group & ok).sum()) - n
        rows.append(row)
    columns = [*by, "n", "mean", "sd", "se", *(["mc_se"] if mc is not None else []),
               "n_failed", "n_pending", "n_missing"]
    return pd.DataFrame(rows, columns=columns)


def paired_differences(
    results: pd.DataFrame,
    factor: str = "prior",
    metric: str = "test_log_likelihood",
    pair_on: Sequence[str] | None = None,
    *,
    levels: Sequence | None = None,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """Paired differences of a metric between every two levels of a factor.

    Runs of levels :math:`a` and :math:`b` are *matched* when they agree in every
    ``pair_on`` column (by default every other configuration column and the seed). Over the
    :math:`m` matched pairs with :math:`d_j = y_{a,j} - y_{b,j}`:

    .. math::

        \\bar d = \\frac1m \\sum_j d_j, \\quad
        \\widehat{\\mathrm{se}} = \\frac{\\mathrm{sd}(d)}{\\sqrt m}, \\quad
        \\mathrm{CI} = \\bar d \\pm t_{m-1,\\,(1+\\gamma)/2}\\, \\widehat{\\mathrm{se}}

    with :math:`\\gamma` = ``confidence``. Pooling pairs over the other configuration columns
    estimates the difference averaged over the grid; heterogeneity across the grid widens the
    interval (it is in :math:`\\mathrm{sd}(d)`). Failed runs and runs without a finite value
    are excluded, so their partners are unmatched.

    Parameters
    ----------
    results : DataFrame
        One row per run.
    factor : str
        The column whose levels are compared (e.g. ``"prior"``).
    metric : str
        The column compared.
    pair_on : sequence of str, optional
        Columns that must agree for two runs to be a pair. Default: the other configuration
        columns plus ``seed``, leaving out columns *tied* to the factor (see
        :func:`tied_columns`; e.g. ``num_particles`` when ELBO always runs with 1 particle
        and IWAE with 5), which would otherwise leave no matched pair.
    levels : sequence, optional
        Levels to compare, in this order (default: order of first appearance).
    confidence : float
        Coverage of the t interval, in (0, 1).

    Returns
    -------
    DataFrame
        One row per pair of levels ``(level_a, level_b)``: ``factor``, ``level_a``,
        ``level_b``, ``n_pairs``, ``mean_difference`` (a − b), ``se``, ``ci_low``,
        ``ci_high``, ``confidence``, ``distinguishable`` (the interval excludes 0).
        ``n_pairs == 0`` rows have NaN statistics; ``se`` and the interval are NaN for one pair.

    Raises
    ------
    ValueError
        Unknown columns, ``factor`` in ``pair_on``, or two successful runs with the same
        ``pair_on`` values and level (the pairing would be ambiguous).
    """
    _check_confidence(confidence)
    _require_columns(results, [factor, metric], "paired_differences")
    if pair_on is None:
        others = [c for c in config_columns(results) if c != factor]
        tied = tied_columns(results, factor, others)
        pair_on = [c for c in others if c not in tied]
        if "seed" in results.columns:
            pair_on.append("seed")
    pair_on = list(pair_on)
    _require_columns(results, pair_on, "paired_differences (pair_on)")
    if factor in pair_on:
        raise ValueError(f"paired_differences: factor {factor!r} must not be in pair_on")

    ok = results.loc[_ok_mask(results)].copy()
    ok["_value"] = _finite_metric(ok, metric)
    ok = ok.loc[ok["_value"].notna()]
    ok["_key"] = _key_strings(ok, pair_on)
    ok["_level"] = ok[factor].map(_format_value)
    duplicated = ok.duplicated(["_key", "_level"], keep=False)
    if duplicated.any():
        ids = ok.loc[duplicated, "run_id"].tolist() if "run_id" in ok.columns else []
        raise ValueError(
            f"paired_differences: runs {ids} share the level of {factor!r} and every pair_on "
            f"column {pair_on}; add the column that tells them apart to pair_on"
        )

    if levels is None:
        levels = list(pd.unique(results[factor].map(_format_value)))
    else:
        levels = [_format_value(v) for v in levels]
    rows = []
    for a, b in itertools.combinations(levels, 2):
        ya = ok.loc[ok["_level"] == a].set_index("_key")["_value"]
        yb = ok.loc[ok["_level"] == b].set_index("_key")["_value"]
        common = ya.index.intersection(yb.index)
        d = (ya.loc[common] - yb.loc[common]).to_numpy(dtype=float)
        mean, se, low, high = _t_interval(d, confidence)
        rows.append({
            "factor": factor, "level_a": a, "level_b": b, "n_pairs": int(d.size),
            "mean_difference": mean, "se": se, "ci_low": low, "ci_high": high,
            "confidence": float(confidence),
            "distinguishable": bool(np.isfinite(low) and (low > 0 or high < 0)),
        })
    columns = ["factor", "level_a", "level_b", "n_pairs", "mean_difference", "se", "ci_low",
               "ci_high", "confidence", "distinguishable"]
    return pd.DataFrame(rows, columns=columns)


# --------------------------------------------------------------------------- verdict


@dataclasses.dataclass
class Verdict:
    """The best configuration by one metric, with its evidence.

    Attributes
    ----------
    metric, label : str
        The column compared and what it estimates.
    higher_is_better : bool
    confidence : float
    columns : list of str
        Configuration columns used to tell configurations apart.
    best : dict or None
        The winning configuration (column -> value); ``None`` when no run has a finite value.
    best_label : str
    best_mean, best_se : float
        Mean over seeds and its standard error (NaN for a single seed).
    best_n : int
        Successful seeds of the best configuration.
    comparisons : DataFrame
        One row per other configuration, runners-up first: ``configuration``, ``mean``,
        ``se``, ``n``, ``n_pairs`` (seeds both finished), ``mean_difference``
        (best − other, in the metric's units), ``se_difference``, ``ci_low``, ``ci_high``,
        ``distinguishable`` (the interval excludes 0).
    n_runs, n_ok, n_failed, n_pending : int
    failed : DataFrame
        The failed runs with their messages (see :func:`failed_runs`).
    """

    metric: str
    label: str
    higher_is_better: bool
    confidence: float
    columns: list[str]
    best: dict | None
    best_label: str
    best_mean: float
    best_se: float
    best_n: int
    comparisons: pd.DataFrame
    n_runs: int
    n_ok: int
    n_failed: int
    n_pending: int
    failed: pd.DataFrame

    @property
    def runner_up(self) -> pd.Series | None:
        """The comparison row of the second-best configuration (``None`` if there is none)."""
        return None if self.comparisons.empty else self.comparisons.iloc[0]

    @property
    def sentences(self) -> list[str]:
        """The verdict in plain words, one claim per sentence."""
        direction = "higher" if self.higher_is_better else "lower"
        out = []
        if self.best is None:
            out.append(
                f"No successful run has a finite {self.label}; there is nothing to compare "
                f"({self.n_failed} of {self.n_runs} runs failed"
                + (f", {self.n_pending} not run yet" if self.n_pending else "") + ")."
            )
            return out
        seeds = "seed" if self.best_n == 1 else "seeds"
        spread = (
            f"mean ± se over {self.best_n} {seeds}" if np.isfinite(self.best_se)
            else f"{self.best_n} {seeds}, no standard error from a single seed"
        )
        out.append(
            f"Best configuration by {self.label} ({direction} is better): {self.best_label}, "
            f"{format_estimate(self.best_mean, self.best_se)} ({spread})."
        )
        level = f"{100 * self.confidence:g}%"
        for _, row in self.comparisons.head(3).iterrows():
            if row["n_pairs"] == 0:
                out.append(
                    f"Against {row['configuration']} ({format_estimate(row['mean'], row['se'])})"
                    f": no seed finished in both, so no paired comparison."
                )
                continue
            diff = f"paired difference {row['mean_difference']:+.2f}"
            if np.isfinite(row["ci_low"]):
                interval = f"{level} CI [{row['ci_low']:+.2f}, {row['ci_high']:+.2f}]"
                call = ("distinguishable" if row["distinguishable"]
                        else "not distinguishable (the interval covers 0)")
            else:
                interval = "no interval from a single pair"
                call = "not distinguishable (one matched seed)"
            out.append(
                f"Against {row['configuration']} ({format_estimate(row['mean'], row['se'])}): "
                f"{diff}, {interval} over {int(row['n_pairs'])} matched "
                f"{'seed' if row['n_pairs'] == 1 else 'seeds'}: {call}."
            )
        if len(self.comparisons) > 3:
            out.append(f"{len(self.comparisons) - 3} further configurations are in the table.")
        if self.n_failed:
            out.append(
                f"{self.n_failed} of {self.n_runs} runs failed; failed runs are excluded from "
                f"these statistics and listed under Failed runs."
            )
        if self.n_pending:
            out.append(
                f"{self.n_pending} of {self.n_runs} runs have not run yet (the study was "
                f"interrupted or is still running); re-running the study completes them."
            )
        return out

    @property
    def text(self) -> str:
        return " ".join(self.sentences)


def verdict(
    results: pd.DataFrame,
    metric: str = "test_log_likelihood",
    *,
    by: Sequence[str] | None = None,
    higher_is_better: bool = True,
    confidence: float = 0.95,
    num_samples: int | None = None,
) -> Verdict:
    """Name the best configuration by ``metric`` and the evidence for it.

    The best configuration has the best mean over seeds (:func:`summarize`). It is compared
    with every other configuration on the seeds both finished (paired t interval of
    best − other, see :func:`paired_differences`); a comparison whose interval covers 0 is
    reported as *not distinguishable*. Picking the maximum of several noisy means favours
    the lucky one, so "best" means "best observed", and the intervals say how much of the
    lead is noise.

    Parameters
    ----------
    results : DataFrame
        One row per run.
    metric : str
        The column to rank by (default the IS estimate of the test log-likelihood).
    by : sequence of str, optional
        Configuration columns (default :func:`config_columns`).
    higher_is_better : bool
    confidence : float
        Coverage of the paired intervals.
    num_samples : int, optional
        K of the test estimate, for the label (default: looked up in ``results``).
    """
    _check_confidence(confidence)
    _require_columns(results, [metric], "verdict")
    by = config_columns(results) if by is None else list(by)
    _require_columns(results, by, "verdict (by)")
    label_columns = varying_columns(results, by) if by else []
    if num_samples is None:
        num_samples = num_eval_samples(results)
    summary = summarize(results, metric, by=by)
    ok = _ok_mask(results)
    n_runs, n_ok = len(results), int(ok.sum())
    n_failed, n_pending = int(_failed_mask(results).sum()), int(_pending_mask(results).sum())
    failed = failed_runs(results, by)
    empty = pd.DataFrame(columns=["configuration", "mean", "se", "n", "n_pairs",
                                  "mean_difference", "se_difference", "ci_low", "ci_high",
                                  "distinguishable"])
    common = dict(metric=metric, label=metric_label(metric, num_samples),
                  higher_is_better=bool(higher_is_better), confidence=float(confidence),
                  columns=by, n_runs=n_runs, n_ok=n_ok, n_failed=n_failed,
                  n_pending=n_pending, failed=failed)

    candidates = summary.loc[summary["n"] > 0]
    if candidates.empty:
        return Verdict(best=None, best_label="—", best_mean=math.nan, best_se=math.nan,
                       best_n=0, comparisons=empty, **common)
    order = candidates["mean"].to_numpy()
    best_pos = int(np.argmax(order) if higher_is_better else np.argmin(order))
    best_row = candidates.iloc[best_pos]

    values = _finite_metric(results, metric)
    keys = _key_strings(results, by)
    usable = ok & values.notna()
    seed_key = (results["seed"].map(_format_value) if "seed" in results.columns
                else pd.Series(results.index.astype(str), index=results.index))

    def by_seed(key: str) -> pd.Series:
        rows = usable & (keys == key)
        series = pd.Series(values[rows].to_numpy(), index=seed_key[rows].to_numpy())
        if series.index.has_duplicates:
            raise ValueError(
                f"verdict: configuration {config_label(results.loc[rows].iloc[0], by)!r} has "
                f"two runs with the same seed; add the column that tells them apart to `by`"
            )
        return series

    best_key = _key_strings(candidates.iloc[[best_pos]], by).iloc[0]
    best_by_seed = by_seed(best_key)
    comparisons = []
    for pos in range(len(candidates)):
        if pos == best_pos:
            continue
        row = candidates.iloc[pos]
        other = by_seed(_key_strings(candidates.iloc[[pos]], by).iloc[0])
        common_seeds = best_by_seed.index.intersection(other.index)
        d = (best_by_seed.loc[common_seeds] - other.loc[common_seeds]).to_numpy(dtype=float)
        mean_d, se_d, low, high = _t_interval(d, confidence)
        comparisons.append({
            "configuration": config_label(row, label_columns), "mean": row["mean"],
            "se": row["se"], "n": int(row["n"]), "n_pairs": int(d.size),
            "mean_difference": mean_d, "se_difference": se_d, "ci_low": low, "ci_high": high,
            "distinguishable": bool(np.isfinite(low) and (low > 0 or high < 0)),
        })
    comparisons = pd.DataFrame(comparisons, columns=empty.columns)
    if not comparisons.empty:
        comparisons = comparisons.sort_values(
            "mean", ascending=not higher_is_better, kind="stable").reset_index(drop=True)
    return Verdict(
        best={c: best_row[c] for c in by}, best_label=config_label(best_row, label_columns),
        best_mean=float(best_row["mean"]), best_se=float(best_row["se"]),
        best_n=int(best_row["n"]), comparisons=comparisons, **common,
    )
