"""The study's question answered: paired, Holm-adjusted comparisons of a factor's levels.

A study varies one *factor* (the prior in compare_priors, the objective in compare_objectives,
the observation model, the model family) and perhaps other settings (the objective in
compare_priors). Levels :math:`a, b` of the factor are compared *within* each level of the
other varying settings (a *stratum*: "with the ELBO", "with IWAE-5"), never pooled across
them, on runs matched on the seed:

.. math::

    d_s = \\bar y_{a,s} - \\bar y_{b,s}, \\quad s = 1..m, \\qquad
    \\bar d = \\frac1m \\sum_s d_s, \\quad
    \\widehat{\\mathrm{se}}_{\\mathrm{seed}} = \\mathrm{sd}(d)/\\sqrt m .

Here :math:`\\bar y_{c,s}` is run :math:`(c, s)`'s mean over the :math:`N` test rows of the
per-row metric. Seeds say how much training varies; they hold the test set fixed. The
test-set sampling error, what another test set of the same size would change, is estimated
*paired over test rows* (the configurations evaluate the same rows), from the per-row values
saved by every run: :math:`e_i = \\frac1m \\sum_s (y_{a,s,i} - y_{b,s,i})`,
:math:`\\widehat{\\mathrm{se}}_{\\mathrm{rows}} = \\mathrm{sd}_i(e_i)/\\sqrt N`. The two are
added in quadrature, :math:`\\widehat{\\mathrm{se}}^2 = \\widehat{\\mathrm{se}}_{\\mathrm{seed}}^2
+ \\widehat{\\mathrm{se}}_{\\mathrm{rows}}^2`, with Welch-Satterthwaite degrees of freedom

.. math::

    \\nu = \\frac{(\\widehat{\\mathrm{se}}_{\\mathrm{seed}}^2 +
    \\widehat{\\mathrm{se}}_{\\mathrm{rows}}^2)^2}{\\widehat{\\mathrm{se}}_{\\mathrm{seed}}^4/(m-1)
    + \\widehat{\\mathrm{se}}_{\\mathrm{rows}}^4/(N-1)} ,

and a two-sided t test per comparison. Every comparison of the factor (all pairs of levels in
all strata) is one family, adjusted by Holm's step-down procedure (:func:`holm_intervals`).

A comparison is *called* (``a > b``) only when its Holm-adjusted interval excludes 0 **and**
both estimates are reliable: at most ``max_unreliable_share`` of the test rows of either
configuration have a Pareto :math:`\\hat k` above the K-aware threshold
(:func:`pyro_lvm.inference.reliability.khat_threshold`). Above it the importance-sampled
estimates of those rows are biased low by an unknown amount and their standard errors are
not trustworthy, so the difference may be an artefact of the proposal.

References
----------
Holm, S. (1979). A simple sequentially rejective multiple test procedure. Scandinavian
Journal of Statistics 6(2), 65-70.
Welch, B. L. (1947). The generalization of Student's problem when several different
population variances are involved. Biometrika 34, 28-35.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from . import analysis

__all__ = ["ComparisonVerdict", "factor_comparisons", "factor_verdict", "holm_intervals",
           "refining_columns", "row_standard_error", "strata_columns"]

#: Largest share of test rows above the k-hat threshold for which a comparison is called.
MAX_UNRELIABLE_SHARE = 0.1


def holm_intervals(estimate, se, df, confidence: float = 0.95) -> pd.DataFrame:
    """Two-sided t tests of ``estimate == 0`` with Holm step-down adjusted intervals.

    For :math:`m` hypotheses with p-values :math:`p_j = 2\\,T_{\\nu_j}(-|t_j|)`,
    :math:`t_j = \\hat\\theta_j / \\widehat{\\mathrm{se}}_j`, sorted
    :math:`p_{(1)} \\le \\dots \\le p_{(m)}`, Holm's procedure at level
    :math:`\\alpha = 1 - \\gamma` rejects :math:`H_{(1)}, \\dots, H_{(r-1)}` where :math:`r` is
    the first rank with :math:`p_{(r)} > \\alpha_r = \\alpha/(m - r + 1)`. The adjusted p-value
    is :math:`\\tilde p_{(i)} = \\min(1, \\max_{j \\le i} (m - j + 1) p_{(j)})`. The interval of
    the hypothesis of rank :math:`i` has coverage :math:`1 - \\alpha_{\\min(i, r)}`, the level
    of the step that decides it:

    .. math:: \\hat\\theta \\pm t_{\\nu,\\, 1 - \\alpha_{\\min(i,r)}/2}\\, \\widehat{\\mathrm{se}} ,

    so it excludes 0 exactly when Holm rejects (:math:`\\tilde p \\le \\alpha`): rejected
    hypotheses get the interval of their own step, the others that of the first accepted step
    (wider than :math:`1-\\alpha`, narrower than Bonferroni's :math:`1 - \\alpha/m` except
    for the first). Rows with a missing or non-positive ``se`` or ``df`` are not tested (NaN)
    and do not count in :math:`m`; a zero ``se`` makes the estimate exact (p = 0 unless it is 0).

    Parameters
    ----------
    estimate, se, df : array-like of the same length
        Estimates, their standard errors and the degrees of freedom of the t reference.
    confidence : float
        :math:`\\gamma`, the family-wise confidence, in (0, 1).

    Returns
    -------
    DataFrame
        Per input row (same order): ``estimate``, ``se``, ``df``, ``t``, ``p_value``,
        ``p_holm``, ``level`` (coverage of the interval), ``ci_low``, ``ci_high``,
        ``rejected``.
    """
    analysis._check_confidence(confidence)
    estimate = np.asarray(estimate, dtype=float)
    se = np.asarray(se, dtype=float)
    df = np.asarray(df, dtype=float)
    if not (estimate.shape == se.shape == df.shape) or estimate.ndim != 1:
        raise ValueError(f"estimate, se and df must be 1-D of one length, got "
                         f"{estimate.shape}, {se.shape}, {df.shape}")
    alpha = 1.0 - float(confidence)
    testable = np.isfinite(estimate) & np.isfinite(se) & (se >= 0) & np.isfinite(df) & (df > 0)
    t = np.full(estimate.shape, math.nan)
    p = np.full(estimate.shape, math.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        # se = 0 (deterministic fits, identical differences): the difference is known exactly
        t[testable] = np.where(se[testable] > 0, estimate[testable] / se[testable],
                               np.where(estimate[testable] == 0, 0.0,
                                        np.sign(estimate[testable]) * np.inf))
    p[testable] = 2.0 * stats.t.sf(np.abs(t[testable]), df[testable])
    index = np.nonzero(testable)[0]
    m = index.size
    order = index[np.argsort(p[index], kind="stable")]
    step_alpha = alpha / (m - np.arange(m))  # alpha_i = alpha / (m - i + 1), i = 1..m
    passed = p[order] <= step_alpha
    first_accepted = int(np.argmin(passed)) if not passed.all() else m
    level = np.full(estimate.shape, math.nan)
    p_holm = np.full(estimate.shape, math.nan)
    rejected = np.zeros(estimate.shape, dtype=bool)
    if m:
        used = np.minimum(np.arange(m), first_accepted if first_accepted < m else m - 1)
        level[order] = 1.0 - step_alpha[used]
        p_holm[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
        rejected[order] = np.arange(m) < first_accepted
    half = np.full(estimate.shape, math.nan)
    half[testable] = stats.t.ppf(0.5 + level[testable] / 2.0, df[testable]) * se[testable]
    return pd.DataFrame({
        "estimate": estimate, "se": se, "df": df, "t": t, "p_value": p, "p_holm": p_holm,
        "level": level, "ci_low": estimate - half, "ci_high": estimate + half,
        "rejected": rejected,
    })


def _row_matrix(run_ids, per_row: Mapping[str, np.ndarray] | None):
    """Stack the per-row values of ``run_ids`` ([runs, N]); None when any is missing or they
    differ in length (then the runs did not evaluate the same test rows)."""
    if not per_row:
        return None
    arrays = [per_row.get(rid) for rid in run_ids]
    if not arrays or any(a is None for a in arrays):
        return None
    arrays = [np.asarray(a, dtype=float).ravel() for a in arrays]
    if len({a.size for a in arrays}) != 1 or arrays[0].size < 2:
        return None
    matrix = np.stack(arrays)
    return matrix if np.isfinite(matrix).all() else None


def row_standard_error(run_ids: Sequence[str], per_row: Mapping[str, np.ndarray] | None,
                       minus: Sequence[str] | None = None) -> float:
    """Test-set sampling error of a mean over runs (or of a paired difference of two).

    With the runs' per-row values :math:`y_{s,i}` on the same :math:`N` test rows,
    :math:`e_i = \\frac1m \\sum_s y_{s,i}` (minus the same for the ``minus`` runs, matched
    in order), the standard error is :math:`\\mathrm{sd}_i(e_i)/\\sqrt N`. NaN when any run
    lacks per-row values or the runs' rows differ in number.
    """
    rows = _row_matrix(run_ids, per_row)
    if rows is None:
        return math.nan
    e = rows.mean(axis=0)
    if minus is not None:
        other = _row_matrix(minus, per_row)
        if other is None or other.shape != rows.shape:
            return math.nan
        e = e - other.mean(axis=0)
    return float(e.std(ddof=1) / math.sqrt(e.size))


def strata_columns(results: pd.DataFrame, factor: str,
                   columns: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """The other settings to compare ``factor`` within, and those tied to the factor.

    Returns ``(strata, tied)``: ``strata`` are the varying configuration columns other than
    ``factor`` that are not a function of its level, leaving out any column that is a
    function of an earlier stratum column (``num_particles`` of ``objective``); ``tied``
    are those that change together with ``factor`` (part of what a level means).
    """
    columns = analysis.config_columns(results) if columns is None else list(columns)
    others = [c for c in analysis.varying_columns(results, columns) if c != factor]
    tied = analysis.tied_columns(results, factor, others)
    refining = refining_columns(results, factor, columns)
    strata: list[str] = []
    for column in others:
        if column in tied or column in refining:
            continue
        if any(column in analysis.tied_columns(results, chosen, [column]) for chosen in strata):
            continue
        strata.append(column)
    return strata, tied


def refining_columns(results: pd.DataFrame, factor: str,
                     columns: Sequence[str] | None = None) -> list[str]:
    """Varying columns that split a level of ``factor`` (``num_particles`` 5 and 50 of
    ``objective=iwae``) and determine it (``objective`` is a function of ``num_particles``):
    they are part of the levels compared ("iwae (num_particles=5)"), not strata."""
    columns = analysis.config_columns(results) if columns is None else list(columns)
    others = [c for c in analysis.varying_columns(results, columns) if c != factor]
    tied = set(analysis.tied_columns(results, factor, others))
    return [c for c in others if c not in tied
            and factor in analysis.tied_columns(results, c, [factor])]


def _levels(frame: pd.DataFrame, factor: str, refining: Sequence[str]) -> pd.Series:
    level = frame[factor].map(analysis._format_value)
    if not refining:
        return level
    detail = [frame[c].map(lambda v, c=c: f"{c}={analysis._format_value(v)}") for c in refining]
    extra = detail[0]
    for part in detail[1:]:
        extra = extra + ", " + part
    return level + " (" + extra + ")"


def _level_stats(frame: pd.DataFrame, share_column: str | None) -> tuple[float, float]:
    values = frame["_value"]
    share = math.nan
    if share_column and share_column in frame.columns:
        shares = pd.to_numeric(frame[share_column], errors="coerce").dropna()
        share = float(shares.mean()) if len(shares) else math.nan
    return float(values.mean()), share


def factor_comparisons(
    results: pd.DataFrame,
    factor: str,
    metric: str = "test_log_likelihood",
    *,
    columns: Sequence[str] | None = None,
    per_row: Mapping[str, np.ndarray] | None = None,
    unreliable_column: str | None = "khat_unreliable_frac",
    higher_is_better: bool = True,
    confidence: float = 0.95,
    max_unreliable_share: float = MAX_UNRELIABLE_SHARE,
) -> pd.DataFrame:
    """Every pair of levels of ``factor`` compared within each stratum, Holm-adjusted.

    See the module docstring for the statistics.

    Parameters
    ----------
    results : DataFrame
        One row per run (``run_id``, ``seed``, ``status``, the config columns, ``metric``).
    factor : str
        The column whose levels are compared.
    metric : str
        The per-run metric (a mean over test rows).
    columns : sequence of str, optional
        Configuration columns (default :func:`analysis.config_columns`).
    per_row : mapping run_id -> 1-D array, optional
        Each run's per-test-row values of the metric (for the test-set sampling error).
    unreliable_column : str, optional
        Column with each run's share of test rows whose k-hat is above the threshold.
    higher_is_better : bool
    confidence : float
        Family-wise confidence of the Holm-adjusted intervals.
    max_unreliable_share : float
        Largest share of unreliable rows (in either configuration) for which a winner is
        called.

    Returns
    -------
    DataFrame
        One row per (stratum, pair of levels), the better-looking level first
        (``mean_difference`` >= 0 in the "better" direction): ``stratum`` (label, "" when
        there is none), ``level_a``, ``level_b``, ``n_pairs``, ``mean_a``, ``mean_b``,
        ``mean_difference`` (a − b), ``se_seed``, ``se_rows``, ``se``, ``df``, ``p_value``,
        ``p_holm``, ``level``, ``ci_low``, ``ci_high``, ``distinguishable``,
        ``unreliable_a``, ``unreliable_b`` (shares; NaN when not recorded), ``reliable``
        (no recorded share above ``max_unreliable_share``), ``called`` (a is better:
        distinguishable and reliable).
    """
    analysis._require_columns(results, [factor, metric], "factor_comparisons")
    strata, _ = strata_columns(results, factor, columns)
    refining = refining_columns(results, factor, columns)
    ok = results.loc[analysis._ok_mask(results)].copy()
    ok["_value"] = analysis._finite_metric(ok, metric)
    ok = ok.loc[ok["_value"].notna()]
    ok["_level"] = _levels(ok, factor, refining)
    ok["_stratum"] = analysis._key_strings(ok, strata)
    ok["_seed"] = (ok["seed"].map(analysis._format_value) if "seed" in ok.columns
                   else ok.index.astype(str))
    if ok.duplicated(["_stratum", "_level", "_seed"]).any():
        raise ValueError(f"factor_comparisons: two runs share the level of {factor!r}, the "
                         f"settings {strata} and the seed; the pairing would be ambiguous")
    levels = list(pd.unique(_levels(results, factor, refining)))
    sign = 1.0 if higher_is_better else -1.0
    rows = []
    for stratum_key, group in ok.groupby("_stratum", sort=False):
        first = group.iloc[0]
        label = ", ".join(f"{c}={analysis._format_value(first[c])}" for c in strata)
        for a, b in itertools.combinations(levels, 2):
            ga = group.loc[group["_level"] == a].set_index("_seed")
            gb = group.loc[group["_level"] == b].set_index("_seed")
            if ga.empty or gb.empty:
                continue
            seeds = ga.index.intersection(gb.index)
            d = (ga.loc[seeds, "_value"] - gb.loc[seeds, "_value"]).to_numpy(float)
            if d.size and sign * d.mean() < 0:
                a, b, ga, gb, d = b, a, gb, ga, -d
            mean_a, share_a = _level_stats(ga, unreliable_column)
            mean_b, share_b = _level_stats(gb, unreliable_column)
            m = d.size
            se_seed = float(d.std(ddof=1) / math.sqrt(m)) if m >= 2 else math.nan
            se_rows = row_standard_error(ga.loc[seeds, "run_id"].tolist(), per_row,
                                         gb.loc[seeds, "run_id"].tolist()) if m else math.nan
            n_rows = (np.asarray(per_row[ga.loc[seeds, "run_id"].iloc[0]]).size
                      if m and np.isfinite(se_rows) else 0)
            se, df = _combine(se_seed, m, se_rows, n_rows)
            rows.append({
                "stratum": label, "level_a": a, "level_b": b, "n_pairs": m,
                "mean_a": mean_a, "mean_b": mean_b,
                "mean_difference": float(d.mean()) if m else math.nan,
                "se_seed": se_seed, "se_rows": se_rows, "se": se, "df": df,
                "unreliable_a": share_a, "unreliable_b": share_b,
            })
    frame = pd.DataFrame(rows, columns=[
        "stratum", "level_a", "level_b", "n_pairs", "mean_a", "mean_b", "mean_difference",
        "se_seed", "se_rows", "se", "df", "unreliable_a", "unreliable_b"])
    tests = holm_intervals(frame["mean_difference"], frame["se"], frame["df"], confidence)
    for column in ("p_value", "p_holm", "level", "ci_low", "ci_high"):
        frame[column] = tests[column].to_numpy()
    frame["distinguishable"] = tests["rejected"].to_numpy()
    # a share that was not recorded (no k-hat; an exact metric) does not block the call;
    # the verdict says when reliability is unknown
    shares = frame[["unreliable_a", "unreliable_b"]]
    frame["reliable"] = (shares.le(max_unreliable_share) | shares.isna()).all(axis=1)
    frame["called"] = frame["distinguishable"] & frame["reliable"]
    frame["confidence"] = float(confidence)
    return frame


def _combine(se_seed: float, m: int, se_rows: float, n_rows: int) -> tuple[float, float]:
    """Seed and test-set standard errors in quadrature, Welch-Satterthwaite df."""
    if not np.isfinite(se_seed):
        return math.nan, math.nan
    if not np.isfinite(se_rows) or n_rows < 2:
        return se_seed, float(m - 1)
    total = se_seed**2 + se_rows**2
    if total == 0:
        return 0.0, float(m - 1)
    df = total**2 / (se_seed**4 / (m - 1) + se_rows**4 / (n_rows - 1))
    return math.sqrt(total), float(df)


# --------------------------------------------------------------------------- verdict


@dataclasses.dataclass
class ComparisonVerdict:
    """The answer to "which level of the factor is better?", one line per comparison.

    Attributes
    ----------
    factor, metric, label : str
    comparisons : DataFrame
        :func:`factor_comparisons`.
    threshold : float or None
        The k-hat threshold the shares refer to.
    num_khat_samples : int or None
        Draws behind the k-hat values.
    max_unreliable_share : float
    units : str
    """

    factor: str
    metric: str
    label: str
    comparisons: pd.DataFrame
    threshold: float | None
    num_khat_samples: int | None
    max_unreliable_share: float = MAX_UNRELIABLE_SHARE
    units: str = "nats/row"
    check_reliability: bool = True

    def _line(self, row) -> str:
        where = f"with {row['stratum']}" if row["stratum"] else "overall"
        diff = row["mean_difference"]
        seeds = f"{int(row['n_pairs'])} matched seed{'s' if row['n_pairs'] != 1 else ''}"
        if row["n_pairs"] == 0:
            return (f"{row['level_a']} vs {row['level_b']} {where}: no seed finished in both, "
                    f"no comparison.")
        if not np.isfinite(row["ci_low"]):
            rows = (f" (test-set se {row['se_rows']:.2f})" if np.isfinite(row["se_rows"])
                    else "")
            return (f"{row['level_a']} vs {row['level_b']} {where}: difference {diff:+.2f} "
                    f"{self.units}{rows} from {seeds}; no interval (the seed spread needs at "
                    f"least 2 seeds).")
        interval = f"[{row['ci_low']:.2f}, {row['ci_high']:.2f}]"
        evidence = f"({seeds})"
        if not row["distinguishable"]:
            return (f"{row['level_a']} vs {row['level_b']} {where}: not distinguishable, "
                    f"difference {diff:+.2f} {self.units} {interval} {evidence}.")
        claim = f"{row['level_a']} > {row['level_b']} by {diff:.2f} {self.units} {interval}"
        if row["called"]:
            unknown = (self.check_reliability and not (
                np.isfinite(row["unreliable_a"]) and np.isfinite(row["unreliable_b"])))
            caveat = ("; how reliable these importance-sampled estimates are is unknown (no "
                      "k-hat recorded)" if unknown else "")
            return f"{where[0].upper() + where[1:]}: {claim} {evidence}{caveat}."
        return (f"{where[0].upper() + where[1:]}: {claim} {evidence} by the estimates, but no "
                f"winner is called: {self._shares(row)}.")

    def _shares(self, row) -> str:
        def share(value):
            return "an unknown share" if not np.isfinite(value) else f"{value:.0%}"

        thr = (f"k̂ above {self.threshold:.2f}" if self.threshold is not None
               else "k̂ above the threshold")
        return (f"{share(row['unreliable_a'])} ({row['level_a']}) and "
                f"{share(row['unreliable_b'])} ({row['level_b']}) of the test rows have {thr}"
                f" (more than {self.max_unreliable_share:.0%} is unreliable), so these "
                f"importance-sampled estimates may be biased low by different amounts; "
                f"more importance samples or a better guide would help")

    @property
    def sentences(self) -> list[str]:
        """One line per comparison, called ones first within each stratum."""
        if self.comparisons.empty:
            return [f"No two levels of {self.factor} have matched runs; nothing to compare."]
        out = []
        for stratum, group in self.comparisons.groupby("stratum", sort=False):
            order = group.assign(_o=(~group["called"]).astype(int)
                                 + (~group["distinguishable"]).astype(int))
            out.extend(self._line(row) for _, row in order.sort_values(
                "_o", kind="stable").iterrows())
        return out

    @property
    def reliability(self) -> str | None:
        """A sentence on the share of unreliable rows over every configuration."""
        shares = pd.concat([self.comparisons["unreliable_a"],
                            self.comparisons["unreliable_b"]]).dropna()
        if shares.empty or self.threshold is None:
            return None
        k = f" (K = {self.num_khat_samples})" if self.num_khat_samples else ""
        return (f"Reliability: between {shares.min():.0%} and {shares.max():.0%} of the test "
                f"rows per configuration have Pareto k̂ above {self.threshold:.2f}{k}; their "
                f"estimates and standard errors are not trustworthy. A winner is called only "
                f"when at most {self.max_unreliable_share:.0%} of either configuration's rows "
                f"are.")


def factor_verdict(results: pd.DataFrame, factor: str, metric: str = "test_log_likelihood",
                   *, num_samples: int | None = None, num_khat_samples: int | None = None,
                   **kwargs) -> ComparisonVerdict:
    """:func:`factor_comparisons` put into words (see :class:`ComparisonVerdict`).

    ``num_khat_samples`` (the draws behind k-hat) sets the threshold the sentences quote;
    other keyword arguments go to :func:`factor_comparisons`.
    """
    from pyro_lvm.inference.reliability import khat_threshold

    # an exact value (linear models) has no importance-sampling error to be unreliable
    check = metric != "exact_test_log_likelihood"
    if not check:
        kwargs["unreliable_column"] = None
        num_khat_samples = None
    comparisons = factor_comparisons(results, factor, metric, **kwargs)
    threshold = khat_threshold(num_khat_samples) if num_khat_samples else None
    return ComparisonVerdict(
        factor=factor, metric=metric, label=analysis.metric_label(metric, num_samples),
        comparisons=comparisons, threshold=threshold, num_khat_samples=num_khat_samples,
        max_unreliable_share=kwargs.get("max_unreliable_share", MAX_UNRELIABLE_SHARE),
        check_reliability=check)
