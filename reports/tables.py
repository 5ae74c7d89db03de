"""The tables of a study report, as pandas frames of display strings.

Configurations are named by short labels (the values of the settings that tell them apart,
``"vamp · iwae"``); one key table maps each label to its full settings. Numbers keep their
``±`` on one line (non-breaking spaces), so a table can wrap between cells without splitting
an estimate.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import markupsafe
import numpy as np
import pandas as pd

from . import analysis, comparisons

__all__ = ["html_table", "key_table", "short_label_columns", "short_labels", "summary_table",
           "comparison_table", "runs_table"]

NBSP = "\u00a0"


def html_table(frame: pd.DataFrame, classes: str = "data") -> markupsafe.Markup:
    """A pandas table as HTML (pandas escapes cell text; the markup is pandas' own)."""
    html = frame.to_html(classes=classes, index=False, border=0, na_rep="—", escape=True)
    return markupsafe.Markup(html)


def fmt_number(value, digits: int = 2) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "—"
    return f"{value:.{digits}f}".replace("-", "−") if math.isfinite(value) else "—"


def fmt_share(value) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "—"
    return f"{value:.0%}" if math.isfinite(value) else "—"


def fmt_estimate(mean, se=None, digits: int = 2) -> str:
    """``"−95.21 ± 0.13"`` on one line."""
    text = analysis.format_estimate(mean, se, digits).replace("-", "−")
    return text.replace(" ± ", f"{NBSP}±{NBSP}")


def short_label_columns(results: pd.DataFrame, label_columns: Sequence[str]) -> list[str]:
    """The label columns that are not a function of an earlier one (``num_particles`` of
    ``objective``), provided the shorter set still tells every configuration apart."""
    kept: list[str] = []
    for column in label_columns:
        if any(column in analysis.tied_columns(results, k, [column]) for k in kept):
            continue
        kept.append(column)
    full = analysis._key_strings(results, list(label_columns)).nunique()
    return kept if analysis._key_strings(results, kept).nunique() == full else list(label_columns)


def short_labels(results: pd.DataFrame, columns: Sequence[str]) -> pd.Series:
    """``"vamp · iwae"`` per run: the values of ``columns`` (``"all runs"`` without any)."""
    if not columns:
        return pd.Series("all runs", index=results.index, dtype=object)
    parts = [results[c].map(analysis._format_value) for c in columns]
    label = parts[0].astype(object)
    for part in parts[1:]:
        label = label + " · " + part
    return label


def key_table(results: pd.DataFrame, label_columns: Sequence[str],
              labels: pd.Series) -> pd.DataFrame:
    """One row per configuration label with the full settings behind it."""
    frame = pd.DataFrame({"label": labels})
    for column in label_columns:
        frame[column] = results[column].map(analysis._format_value)
    return frame.drop_duplicates("label").reset_index(drop=True)


def summary_table(results: pd.DataFrame, columns: Sequence[str], labels: pd.Series,
                  k: int | None, primary: str | None,
                  per_row: Mapping[str, np.ndarray] | None = None,
                  threshold: float | None = None, higher_is_better: bool = True) -> pd.DataFrame:
    """Per configuration: rank, runs, the primary metric with its seed and test-set standard
    errors, the other metrics; sorted by rank (configurations without a value last).

    ``per_row`` maps run ids to the per-test-row values of ``primary`` (for the test-set
    standard error, :func:`comparisons.row_standard_error`).
    """
    frame = results.assign(_label=labels, _rows=0.0)
    by = [*columns, "_label"]
    counts = analysis.summarize(frame, "_rows", by=by)
    table = pd.DataFrame({"configuration": counts["_label"].to_numpy()})
    table["runs ok"] = counts["n"].to_numpy()
    table["failed"] = counts["n_failed"].to_numpy()
    if counts["n_pending"].any():
        table["not run yet"] = counts["n_pending"].to_numpy()
    order_values = None
    if primary:
        s = analysis.summarize(frame, primary, by=by)
        order_values = s["mean"].to_numpy(dtype=float)
        name = {"test_log_likelihood": f"log p(x), IS K={k}" if k else "log p(x), IS",
                "exact_test_log_likelihood": "exact log p(x)",
                "test_elbo": "ELBO"}.get(primary, primary)
        table[f"{name} ± seed se"] = [fmt_estimate(m, e) for m, e in zip(s["mean"], s["se"])]
        keys = analysis._key_strings(frame, by)
        ok = analysis._ok_mask(frame) & analysis._finite_metric(frame, primary).notna()
        row_se = []
        for key in analysis._key_strings(s, by):
            run_ids = frame.loc[ok & (keys == key), "run_id"].tolist()
            row_se.append(comparisons.row_standard_error(run_ids, per_row)
                          if per_row and run_ids else math.nan)
        if np.isfinite(row_se).any():
            table["test-set se"] = [fmt_number(v) for v in row_se]
        if primary == "test_log_likelihood" and "mc_se" in s.columns:
            table["MC se"] = [fmt_number(v, 3) for v in s["mc_se"]]
    extra = [("test_log_likelihood_psis", "PSIS log p(x)", 2), ("test_elbo", "ELBO", 2),
             ("exact_test_log_likelihood", "exact log p(x)", 2),
             ("bits_per_dim", "bits/dim", 3), ("kl", "KL", 2), ("active_units", "active units", 1)]
    for metric, name, digits in extra:
        if metric == primary or metric not in frame.columns or not frame[metric].notna().any():
            continue
        s = analysis.summarize(frame, metric, by=by)
        table[name] = [fmt_estimate(m, e, digits) for m, e in zip(s["mean"], s["se"])]
    if "khat_unreliable_frac" in frame.columns and frame["khat_unreliable_frac"].notna().any():
        s = analysis.summarize(frame, "khat_unreliable_frac", by=by)
        name = f"rows k̂ > {threshold:.2f}" if threshold is not None else "rows k̂ > threshold"
        table[name] = [fmt_share(v) for v in s["mean"]]
    if "wall_time_s" in frame.columns and frame["wall_time_s"].notna().any():
        s = analysis.summarize(frame, "wall_time_s", by=by)
        table["time/run (s)"] = [fmt_number(v, 1) for v in s["mean"]]
    if order_values is not None and np.isfinite(order_values).any():
        score = order_values if higher_is_better else -order_values
        rank = pd.Series(score).rank(ascending=False, method="min")
        table.insert(0, "rank", rank.map(lambda r: "—" if pd.isna(r) else str(int(r))))
        order = np.argsort(np.where(np.isfinite(score), -score, np.inf), kind="stable")
        table = table.iloc[order].reset_index(drop=True)
    return table


def comparison_table(frame: pd.DataFrame, units: str = "nats/row") -> pd.DataFrame:
    """:func:`comparisons.factor_comparisons` for display: better level first."""
    level = (f"{100 * frame['confidence'].iloc[0]:g}% Holm interval" if len(frame)
             else "Holm interval")

    def verdict(row):
        if row["n_pairs"] < 2 or not np.isfinite(row["ci_low"]):
            return "no interval"
        if not row["distinguishable"]:
            return "not distinguishable"
        return f"{row['level_a']} better" if row["called"] else "not called (k̂)"

    return pd.DataFrame({
        "within": frame["stratum"].replace("", "all runs"),
        "a": frame["level_a"], "b": frame["level_b"],
        f"a − b ({units})": [fmt_number(v) for v in frame["mean_difference"]],
        "se seeds": [fmt_number(v) for v in frame["se_seed"]],
        "se test rows": [fmt_number(v) for v in frame["se_rows"]],
        level: [f"[{fmt_number(lo)},{NBSP}{fmt_number(hi)}]" if np.isfinite(lo) else "—"
                for lo, hi in zip(frame["ci_low"], frame["ci_high"])],
        "Holm p": [f"{p:.3g}" if np.isfinite(p) else "—" for p in frame["p_holm"]],
        "seeds": frame["n_pairs"],
        "k̂ flagged a / b": [f"{fmt_share(a)} / {fmt_share(b)}"
                            for a, b in zip(frame["unreliable_a"], frame["unreliable_b"])],
        "verdict": [verdict(r) for _, r in frame.iterrows()],
    })


def runs_table(results: pd.DataFrame, labels: pd.Series, k: int | None,
               threshold: float | None, notes: pd.Series | None) -> pd.DataFrame:
    """One row per run, in the order of ``results``."""
    table = pd.DataFrame({"run_id": results["run_id"].to_numpy(),
                          "configuration": labels.to_numpy()})
    if "seed" in results.columns:
        table["seed"] = results["seed"].map(analysis._format_value).to_numpy()
    table["status"] = (results["status"].astype(str).to_numpy() if "status" in results.columns
                       else "ok")
    for metric, se, name in (("test_log_likelihood", "test_log_likelihood_se",
                              f"log p(x), IS K={k} ± MC se" if k else "log p(x), IS ± MC se"),
                             ("test_elbo", "test_elbo_se", "ELBO ± MC se")):
        if metric in results.columns:
            errors = results[se] if se in results.columns else [None] * len(results)
            table[name] = [fmt_estimate(m, e) for m, e in zip(results[metric], errors)]
    name = f"rows k̂ > {threshold:.2f}" if threshold is not None else "rows k̂ > threshold"
    for metric, header, fmt in (("exact_test_log_likelihood", "exact log p(x)", fmt_number),
                                ("test_log_likelihood_psis", "PSIS log p(x)", fmt_number),
                                ("kl", "KL", fmt_number),
                                ("active_units", "active units", lambda v: fmt_number(v, 0)),
                                ("khat_unreliable_frac", name, fmt_share),
                                ("wall_time_s", "time (s)", lambda v: fmt_number(v, 1))):
        if metric in results.columns and results[metric].notna().any():
            table[header] = [fmt(v) for v in results[metric]]
    if "device" in results.columns:
        table["device"] = results["device"].map(analysis._format_value).to_numpy()
    if notes is not None:
        table["notes"] = notes.fillna("").to_numpy()
    return table
