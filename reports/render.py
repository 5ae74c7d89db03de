"""Render a study directory into one self-contained HTML report.

Input layout (written by :mod:`pyro_lvm.studies.runner`)::

    <study_dir>/study.json          name, title, description, command line, dataset, grid, seeds,
                                    versions, git commit, device, start and finish times
    <study_dir>/results.csv         one row per run: config columns, status, error, metrics
    <study_dir>/runs/<run_id>/      config.json, result.json, history.csv, artifacts.npz

``study.json`` may carry ``findings`` (a list of sentences a study computed from its results,
shown next to the verdict) and ``results.csv`` a ``notes`` column (what went wrong or was
skipped inside a run that still finished, shown per run in the table of all runs).

Output: ``<study_dir>/index.html`` (or ``output``), written atomically (a temporary file in the
same directory, then :func:`os.replace`), so a reader never sees half a report and an error
while rendering leaves the previous report untouched. The file gets the permissions of any
newly created file (``0666`` minus the umask, e.g. ``0644``), so it can be served or shared.
A figure that cannot be drawn does not cost the report: its section says why instead.
Figures are embedded as PNG data URIs and the page carries a Content-Security-Policy that
forbids every external resource, so it opens offline exactly as it was written.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import pathlib
import zipfile
from collections.abc import Mapping

import jinja2
import markupsafe
import numpy as np
import pandas as pd

from . import analysis, figures
from .atomic import write_atomically

__all__ = ["RunRecord", "StudyData", "load_study", "render_report", "build_context"]

TEMPLATE_DIR = pathlib.Path(__file__).resolve().parent / "templates"
PRIMARY_METRICS = ("test_log_likelihood", "exact_test_log_likelihood", "test_elbo")
ARTIFACT_KEYS = ("samples", "originals", "reconstructions", "latent_mean", "labels", "khat",
                 "kl_per_dim", "prior_samples", "aggregate_posterior_samples")


# --------------------------------------------------------------------------- loading


@dataclasses.dataclass
class RunRecord:
    """What one run left on disk (each part ``None`` when missing)."""

    run_id: str
    config: dict | None = None
    result: dict | None = None
    history: pd.DataFrame | None = None
    artifacts: dict[str, np.ndarray] | None = None


@dataclasses.dataclass
class StudyData:
    """A study directory read into memory."""

    directory: pathlib.Path
    meta: dict
    results: pd.DataFrame
    runs: dict[str, RunRecord]
    notes: list[str]


def _read_json(path: pathlib.Path, notes: list[str]) -> dict | None:
    if not path.exists():
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except (OSError, ValueError) as error:
        notes.append(f"{path.name} of {path.parent.name} could not be read ({error}); ignored.")
        return None
    return value if isinstance(value, dict) else None


def _read_run(run_dir: pathlib.Path, run_id: str, notes: list[str]) -> RunRecord:
    record = RunRecord(run_id=run_id)
    if run_id in ("", ".", "..") or any(c in run_id for c in "/\\\0") or ":" in run_id:
        # the report reads only runs inside its own study directory
        notes.append(f"run id {run_id!r} in results.csv is not a directory name inside the "
                     f"study; ignored.")
        return record
    record.config = _read_json(run_dir / "config.json", notes)
    record.result = _read_json(run_dir / "result.json", notes)
    history_path = run_dir / "history.csv"
    if history_path.exists():
        try:
            record.history = pd.read_csv(history_path)
        except (OSError, ValueError) as error:
            notes.append(f"history.csv of run {run_id} could not be read ({error}); ignored.")
    artifacts_path = run_dir / "artifacts.npz"
    if artifacts_path.exists():
        try:
            with np.load(artifacts_path, allow_pickle=False) as archive:
                record.artifacts = {k: np.asarray(archive[k]) for k in archive.files}
        except (OSError, ValueError, zipfile.BadZipFile) as error:
            notes.append(f"artifacts.npz of run {run_id} could not be read ({error}); ignored.")
    return record


def load_study(study_dir: str | os.PathLike) -> StudyData:
    """Read ``study.json``, ``results.csv`` and every run's files from ``study_dir``.

    Raises
    ------
    FileNotFoundError
        ``study_dir``, ``study.json`` or ``results.csv`` is missing (the message names which).
    ValueError
        ``study.json`` is not a JSON object, or ``results.csv`` has no ``run_id`` column.
    """
    directory = pathlib.Path(study_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"study directory {directory} does not exist")
    notes: list[str] = []
    meta_path = directory / "study.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path} is missing; is {directory} a study directory?")
    with open(meta_path, encoding="utf-8") as handle:
        try:
            meta = json.load(handle)
        except ValueError as error:
            raise ValueError(f"{meta_path} is not valid JSON: {error}") from error
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path} must hold a JSON object, got {type(meta).__name__}")
    results_path = directory / "results.csv"
    if not results_path.exists():
        raise FileNotFoundError(f"{results_path} is missing; the study has recorded no run yet")
    try:
        results = pd.read_csv(results_path)
    except pd.errors.EmptyDataError:
        results = pd.DataFrame(columns=["run_id", "status", "error"])
    if "run_id" not in results.columns:
        raise ValueError(f"{results_path} has no run_id column (columns: {list(results.columns)})")
    results["run_id"] = results["run_id"].astype(str)
    if results["run_id"].duplicated().any():
        dup = results.loc[results["run_id"].duplicated(), "run_id"].tolist()
        raise ValueError(f"{results_path} lists run_id(s) {dup} more than once")
    for column in analysis.METRIC_COLUMNS:
        if column in results.columns:
            results[column] = pd.to_numeric(results[column], errors="coerce")
    runs = {rid: _read_run(directory / "runs" / rid, rid, notes) for rid in results["run_id"]}
    return StudyData(directory=directory, meta=meta, results=results, runs=runs, notes=notes)


# --------------------------------------------------------------------------- tables


def _table(frame: pd.DataFrame, classes: str = "data") -> markupsafe.Markup:
    """A pandas table as HTML (pandas escapes cell text; the markup is pandas' own)."""
    html = frame.to_html(classes=classes, index=False, border=0, na_rep="—", escape=True)
    return markupsafe.Markup(html)


def _fmt_number(value, digits: int = 2) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "—"
    return f"{value:.{digits}f}" if math.isfinite(value) else "—"


def _fmt_share(value) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "—"
    return f"{value:.0%}" if math.isfinite(value) else "—"


def _summary_table(results, columns, label_columns, k, primary) -> pd.DataFrame:
    # counts come from a column that every row has, so configurations without any finished
    # run (or studies without metric columns) are still listed
    counts = analysis.summarize(results.assign(_rows=0.0), "_rows", by=columns)
    base = analysis.summarize(results, primary, by=columns) if primary else counts
    table = pd.DataFrame()
    for column in label_columns:
        table[column] = counts[column].map(analysis._format_value)
    table["runs ok"] = counts["n"]
    table["failed"] = counts["n_failed"]
    if counts["n_pending"].any():
        table["not run yet"] = counts["n_pending"]
    metric_specs = [
        ("test_log_likelihood", 2), ("exact_test_log_likelihood", 2), ("test_elbo", 2),
        ("bits_per_dim", 3), ("kl", 2), ("active_units", 1),
    ]
    for metric, digits in metric_specs:
        if metric not in results.columns or not results[metric].notna().any():
            continue
        s = analysis.summarize(results, metric, by=columns)
        table[analysis.metric_label(metric, k) + " (mean ± se)"] = [
            analysis.format_estimate(m, e, digits) for m, e in zip(s["mean"], s["se"])]
        if metric == "test_log_likelihood" and "mc_se" in s.columns:
            table["MC se of that mean"] = [_fmt_number(v, 3) for v in s["mc_se"]]
    for metric in ("khat_bad_frac", "wall_time_s"):
        if metric in results.columns and results[metric].notna().any():
            s = analysis.summarize(results, metric, by=columns)
            name = ("share of rows with k̂ > 0.7 (mean)" if metric == "khat_bad_frac"
                    else "wall time per run, s (mean)")
            table[name] = [(_fmt_share if metric == "khat_bad_frac" else _fmt_number)(v)
                           for v in s["mean"]]
    if primary and base["n"].gt(0).any():
        table.insert(0, "rank", base["mean"].rank(ascending=False, method="min")
                     .map(lambda r: "—" if pd.isna(r) else str(int(r))))
    return table


def _paired_tables(results, columns, label_columns, metric, k):
    tables = []
    shown_factors: list[str] = []
    for factor in label_columns:
        others = [c for c in columns if c != factor]
        tied = analysis.tied_columns(results, factor, others)
        # a column tied both ways to a factor already shown is the same comparison again
        if any(g in tied and factor in analysis.tied_columns(results, g, [factor])
               for g in shown_factors):
            continue
        shown_factors.append(factor)
        pair_on = [c for c in others if c not in tied] + (
            ["seed"] if "seed" in results.columns else [])
        try:
            diffs = analysis.paired_differences(results, factor, metric, pair_on=pair_on)
        except ValueError as error:
            tables.append({"factor": factor, "table": None, "note": str(error)})
            continue
        diffs = diffs.loc[diffs["n_pairs"] > 0]
        if diffs.empty:
            continue
        level = f"{100 * diffs['confidence'].iloc[0]:g}% CI"
        shown = pd.DataFrame({
            "a": diffs["level_a"], "b": diffs["level_b"],
            "mean paired difference a − b": [_fmt_number(v) for v in diffs["mean_difference"]],
            "se": [_fmt_number(v) for v in diffs["se"]],
            level: [f"[{_fmt_number(lo)}, {_fmt_number(hi)}]" if math.isfinite(lo) else "—"
                    for lo, hi in zip(diffs["ci_low"], diffs["ci_high"])],
            "matched pairs": diffs["n_pairs"],
            "verdict": ["distinguishable" if d else "not distinguishable"
                        for d in diffs["distinguishable"]],
        })
        varying_pair_on = [c for c in pair_on if c in label_columns or c == "seed"]
        tables.append({
            "factor": factor,
            "tied": tied,
            "table": _table(shown),
            "note": f"Paired on {', '.join(varying_pair_on) or 'nothing'}"
                    + (" (every other setting is shared by all runs)" if varying_pair_on else "")
                    + (f"; {', '.join(tied)} change together with {factor} and are part of "
                       f"each level" if tied else "")
                    + f". Metric: {analysis.metric_label(metric, k)}.",
        })
    return tables


def _runs_table(results, label_columns, k) -> pd.DataFrame:
    table = pd.DataFrame({"run_id": results["run_id"]})
    for column in label_columns:
        table[column] = results[column].map(analysis._format_value)
    if "seed" in results.columns:
        table["seed"] = results["seed"].map(analysis._format_value)
    table["status"] = results["status"].astype(str) if "status" in results.columns else "ok"
    pairs = [("test_log_likelihood", "test_log_likelihood_se"), ("test_elbo", "test_elbo_se")]
    for metric, se in pairs:
        if metric in results.columns:
            errors = results[se] if se in results.columns else [None] * len(results)
            table[analysis.metric_label(metric, k) + " (± MC se)"] = [
                analysis.format_estimate(m, e) for m, e in zip(results[metric], errors)]
    for metric, fmt in (("exact_test_log_likelihood", _fmt_number), ("kl", _fmt_number),
                        ("active_units", lambda v: _fmt_number(v, 0)),
                        ("khat_bad_frac", _fmt_share), ("wall_time_s", lambda v: _fmt_number(v, 1))):
        if metric in results.columns and results[metric].notna().any():
            table[analysis.metric_label(metric, k)] = [fmt(v) for v in results[metric]]
    if "device" in results.columns:
        table["device"] = results["device"].map(analysis._format_value)
    notes = _run_notes(results)
    if notes is not None:
        table["notes"] = notes.fillna("")  # last column: the template lets it wrap
    return table


def _run_notes(results: pd.DataFrame) -> pd.Series | None:
    """The ``notes`` column of ``results.csv`` as text (missing -> NA); None when no run has any."""
    if "notes" not in results.columns:
        return None

    def text(value):
        if isinstance(value, str):
            return value.strip() or None
        return None if pd.isna(value) else str(value)

    notes = results["notes"].map(text)
    return notes if notes.notna().any() else None


def _findings(meta: dict, notes: list[str]) -> list[str]:
    """``study.json``'s ``findings``: a list of sentences (a lone string is one sentence)."""
    value = meta.get("findings")
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        notes.append(f"study.json: findings should be a list of strings, got "
                     f"{type(value).__name__}; not shown.")
        return []
    return [str(line).rstrip() for line in value if line is not None and str(line).strip()]


# --------------------------------------------------------------------------- figures


def _representatives(study: StudyData, labels: Mapping[str, str]) -> dict[str, RunRecord]:
    """One successful run per configuration (the lowest seed) whose artifacts exist."""
    ok = analysis.successful_runs(study.results)
    if "seed" in ok.columns:
        ok = ok.assign(_seed=pd.to_numeric(ok["seed"], errors="coerce")).sort_values(
            "_seed", kind="stable")
    chosen: dict[str, RunRecord] = {}
    for rid in ok["run_id"]:
        label = labels[rid]
        record = study.runs.get(rid)
        if label not in chosen and record is not None and record.artifacts:
            chosen[label] = record
    return chosen


def _artifact(record: RunRecord, key: str):
    value = (record.artifacts or {}).get(key)
    return None if value is None or value.size == 0 else value


def _figure_sections(study, columns, label_columns, k, notes):
    results = study.results
    labels = {rid: analysis.config_label(row, label_columns)
              for rid, (_, row) in zip(results["run_id"], results.iterrows())}
    ok = analysis.successful_runs(results).copy()
    ok["configuration"] = ok["run_id"].map(labels)
    sections = []

    def add(section_id, title, caption, draw, run_ids=(), short=None):
        # ``draw`` is called here, not by the caller, so that a figure function that raises
        # costs only its own figure: the section then says why it is missing
        try:
            uri = draw()
        except Exception as exc:  # noqa: BLE001 - any plotting error degrades to a note
            message = f"figure {title} could not be drawn: {type(exc).__name__}: {exc}"
            notes.append(message)
            sections.append({"id": section_id, "title": title, "short": short or title,
                             "caption": caption, "uri": None, "error": message,
                             "runs": list(run_ids)})
            return
        if uri is not None:
            sections.append({"id": section_id, "title": title, "short": short or title,
                             "caption": caption, "uri": uri, "error": None,
                             "runs": list(run_ids)})

    # test log-likelihood (and ELBO) with error bars per prior
    factor = label_columns[0] if label_columns else None
    frame = ok.copy()
    if factor is None:
        factor = "configuration"
    rest = [c for c in label_columns if c != factor]
    hue = None
    if rest:
        hue = " / ".join(rest)
        frame[hue] = [analysis.config_label(r, rest) for _, r in frame.iterrows()]
    for metric in ("test_log_likelihood", "exact_test_log_likelihood", "test_elbo"):
        if metric not in frame.columns:
            continue
        label = analysis.metric_label(metric, k)
        short = {"test_log_likelihood": "log p(x) estimate", "test_elbo": "ELBO",
                 "exact_test_log_likelihood": "exact log p(x)"}[metric]
        add(f"fig-{metric}", f"{label} per {factor}",
            f"Diamonds: mean over seeds with ±1 standard error (sd/√n over seeds); dots: single "
            f"runs. Units: nats per test row, higher is better.",
            lambda: figures.metric_by_factor(frame, metric, factor, hue=hue, ylabel=label),
            short=f"{short} per {factor}")

    # learning curves
    histories = {rid: study.runs[rid].history for rid in ok["run_id"]
                 if study.runs.get(rid) is not None and study.runs[rid].history is not None}
    add("fig-learning-curves", "Learning curves",
        "Training objective (solid) and validation objective (dashed) per epoch, nats per data "
        "row; each line is one seed. The objective is the bound being optimized (ELBO or "
        "IWAE_K), not log p(x).",
        lambda: figures.learning_curves(
            histories, labels, ylabel="bound per data row (nats)",
            line_labels=({rid: f"seed {analysis._format_value(seed)}"
                          for rid, seed in zip(ok["run_id"], ok["seed"])}
                         if "seed" in ok.columns else None)),
        histories, short="Learning curves")

    reps = _representatives(study, labels)

    # k-hat: pool seeds of each configuration
    khats: dict[str, list[np.ndarray]] = {}
    for rid in ok["run_id"]:
        record = study.runs.get(rid)
        k_values = _artifact(record, "khat") if record else None
        if k_values is not None:
            khats.setdefault(labels[rid], []).append(k_values.ravel())
    add("fig-khat", "Pareto k̂ of the importance weights per test row",
        "ArviZ-style k̂ plot: each point is one test row of one seed. k̂ < 0.5: the "
        "importance-sampled estimate of log p(x) is reliable for that row; 0.5 ≤ k̂ ≤ 0.7: "
        "usable; k̂ > 0.7 (above the dashed line): the weights have too heavy a tail and the estimate for that row is "
        "unreliable (the guide misses posterior mass).",
        lambda: figures.khat_distribution(khats), short="Pareto k̂")

    # active units and KL per dim
    kl: dict[str, list[np.ndarray]] = {}
    for rid in ok["run_id"]:
        record = study.runs.get(rid)
        values = _artifact(record, "kl_per_dim") if record else None
        if values is not None:
            kl.setdefault(labels[rid], []).append(values.ravel())
    kl_mean = {}
    for lab, values in kl.items():
        if len({v.size for v in values}) == 1:
            kl_mean[lab] = np.mean(values, axis=0)
        else:
            notes.append(f"KL per dim of {lab} has different lengths across seeds; not plotted.")
    au = ok[["configuration", "active_units"]] if "active_units" in ok.columns else None
    add("fig-latent-usage", "Latent usage",
        "Left: active units, dimensions j with Var_x(E_q[z_j|x]) > 0.01 (Burda et al. 2016), "
        "mean ± se over seeds. Right: KL(q(z_j|x) ‖ p(z_j)) per latent dimension averaged over "
        "test rows and seeds (for non-factorized priors, the per-dimension split is the "
        "runner's estimate); a dimension with KL near 0 is unused (posterior collapse).",
        lambda: figures.latent_usage(au, kl_mean), short="Latent usage")

    # image data
    image_shape = (study.meta.get("dataset") or {}).get("image_shape")
    if image_shape:
        pixels = int(np.prod(image_shape))
        samples, recon = {}, {}
        used_s, used_r = [], []
        for lab, record in reps.items():
            s = _artifact(record, "samples")
            o, r = _artifact(record, "originals"), _artifact(record, "reconstructions")
            if s is not None:
                if s.ndim == 2 and s.shape[1] == pixels:
                    samples[lab] = s
                    used_s.append(record.run_id)
                else:
                    notes.append(f"samples of run {record.run_id} have shape {s.shape}, not "
                                 f"[n, {pixels}] for images {tuple(image_shape)}; not drawn.")
            if o is not None and r is not None:
                if o.ndim == 2 and o.shape == r.shape and o.shape[1] == pixels:
                    recon[lab] = (o, r)
                    used_r.append(record.run_id)
                else:
                    notes.append(f"originals {o.shape} / reconstructions {r.shape} of run "
                                 f"{record.run_id} do not fit images {tuple(image_shape)}; "
                                 f"not drawn.")
        add("fig-samples", "Samples from the model",
            "x ~ p(x) = ∫ p(x|z) p(z) dz, one panel per configuration (the run with the lowest "
            "seed; run ids listed below).", lambda: figures.samples_grid(samples, image_shape), used_s,
            short="Samples")
        add("fig-reconstructions", "Reconstructions",
            "Top row of each panel: test images; bottom row: their reconstructions (decoder "
            "mean at the guide's posterior mean).",
            lambda: figures.reconstructions(recon, image_shape), used_r, short="Reconstructions")

    latents, used_l, priors, used_p = {}, [], {}, []
    for lab, record in reps.items():
        z = _artifact(record, "latent_mean")
        if z is not None and z.ndim == 2:
            y = _artifact(record, "labels")
            if y is not None and y.size != z.shape[0]:
                notes.append(f"run {record.run_id}: {y.size} labels for {z.shape[0]} latent "
                             f"means; drawn without labels.")
                y = None
            latents[lab] = (z, y)
            used_l.append(record.run_id)
        p, q = _artifact(record, "prior_samples"), _artifact(record, "aggregate_posterior_samples")
        if p is not None and q is not None and p.ndim == q.ndim == 2 and p.shape[1] == q.shape[1]:
            priors[lab] = (p, q)
            used_p.append(record.run_id)
    add("fig-latent-space", "Latent space",
        "Posterior means E_q[z|x] of test rows, coloured by label; latents with more than two "
        "dimensions are projected on their first two principal components.",
        lambda: figures.latent_scatter(latents), used_l, short="Latent space")
    add("fig-prior-vs-aggregate", "Prior vs aggregate posterior",
        "Contours: kernel density estimate of the prior p(z) from its samples; points: samples "
        "of the aggregate posterior q(z) = (1/N) Σ_i q(z|x_i). Prior mass the points do not "
        "reach decodes to atypical samples. Above two dimensions both are projected on the "
        "principal axes of the aggregate posterior samples.",
        lambda: figures.prior_vs_aggregate_posterior(priors), used_p, short="Prior vs q(z)")
    return sections


# --------------------------------------------------------------------------- provenance


def _parse_time(value):
    if not isinstance(value, str):
        return None
    try:
        return _dt.datetime.fromisoformat(value)
    except ValueError:
        return None


def _provenance(meta: dict, results: pd.DataFrame) -> dict:
    dataset = meta.get("dataset") or {}
    started, finished = _parse_time(meta.get("started")), _parse_time(meta.get("finished"))
    duration = None
    if started and finished and (started.tzinfo is None) == (finished.tzinfo is None):
        duration = f"{(finished - started).total_seconds():.1f} s"
    devices = sorted({str(d) for d in results["device"].dropna()}) if "device" in results else []
    seeds = meta.get("seeds")
    if seeds is None and "seed" in results.columns:
        seeds = sorted(pd.unique(results["seed"].dropna()).tolist())

    def total(column):
        if column in results.columns and results[column].notna().any():
            return f"{float(results[column].sum()):.1f} s"
        return None

    items = [
        ("command line", meta.get("command_line")),
        ("git commit", meta.get("git_commit")),
        ("device requested", meta.get("device")),
        ("devices used by runs", ", ".join(devices) or None),
        ("seeds", ", ".join(str(s) for s in seeds) if isinstance(seeds, list) else seeds),
        ("dataset", dataset.get("name")),
        ("data shape", " × ".join(str(s) for s in dataset["shape"])
         if isinstance(dataset.get("shape"), list) else dataset.get("shape")),
        ("data SHA-256", dataset.get("sha256")),
        ("image shape", " × ".join(str(s) for s in dataset["image_shape"])
         if isinstance(dataset.get("image_shape"), list) else None),
        ("discrete data", dataset.get("discrete")),
        ("started", meta.get("started")),
        ("finished", meta.get("finished")),
        ("study duration", duration),
        ("total training time", total("train_time_s")),
        ("total evaluation time", total("eval_time_s")),
        ("total wall time of runs", total("wall_time_s")),
        ("report rendered", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")),
    ]
    versions = meta.get("versions") or {}
    grid = meta.get("grid") or {}
    return {
        "items": [(k, "—" if v is None or v == "" else str(v)) for k, v in items],
        "versions": [(k, str(v)) for k, v in versions.items()] if isinstance(versions, dict) else [],
        "grid": [(k, json.dumps(v)) for k, v in grid.items()] if isinstance(grid, dict) else [],
    }


# --------------------------------------------------------------------------- context + render


def build_context(study: StudyData) -> dict:
    """Everything the template shows, computed from a loaded study."""
    results = study.results
    notes = list(study.notes)
    meta = study.meta
    # the runner lists its config columns in study.json; else every run's config.json keys
    candidates = set(meta.get("config_columns") or [])
    if not candidates:
        for record in study.runs.values():
            if record.config:
                candidates |= set(record.config)
    columns = analysis.config_columns(results, candidates or None)
    label_columns = analysis.varying_columns(results, columns) if len(results) else []
    factor = meta.get("primary_factor") or "prior"
    if factor in label_columns:  # the study's main factor leads tables and figures
        label_columns = [factor] + [c for c in label_columns if c != factor]
    fixed = [(c, analysis._format_value(results[c].iloc[0])) for c in columns
             if c not in label_columns and len(results)]
    k = analysis.num_eval_samples(results, meta)
    ok_runs = analysis.successful_runs(results)
    wanted = meta.get("primary_metric")
    order = ([wanted] if isinstance(wanted, str) else []) + list(PRIMARY_METRICS)
    primary = next((m for m in order if m in results.columns and ok_runs[m].notna().any()),
                   None)

    verdict = None
    if primary is not None:
        verdict = analysis.verdict(results, primary, by=columns, num_samples=k)
    ok_mask = analysis._ok_mask(results)
    failed_mask = analysis._failed_mask(results)
    pending_mask = analysis._pending_mask(results)
    if meta.get("status") and meta.get("status") != "finished":
        notes.append(f"study.json says the study is {meta['status']}: "
                     f"{int(pending_mask.sum())} run(s) have no result yet.")
    failed = []
    for _, row in results.loc[failed_mask].iterrows():
        record = study.runs.get(row["run_id"])
        traceback = (record.result or {}).get("traceback") if record else None
        error = row.get("error")
        if not isinstance(error, str) or not error.strip():
            error = (record.result or {}).get("error") if record else None
        failed.append({
            "run_id": row["run_id"],
            "configuration": analysis.config_label(row, label_columns),
            "seed": analysis._format_value(row["seed"]) if "seed" in row else "—",
            "error": error if isinstance(error, str) and error.strip() else "(no message recorded)",
            "traceback": traceback if isinstance(traceback, str) else None,
        })

    sections = _figure_sections(study, columns, label_columns, k, notes) if len(results) else []
    seeds = (sorted(pd.unique(results["seed"].dropna()).tolist())
             if "seed" in results.columns else [])
    summary = _summary_table(results, columns, label_columns, k, primary) if len(results) else None
    if verdict is not None:
        verdict_sentences = verdict.sentences
    else:
        verdict_sentences = [
            f"No successful run reported a test log-likelihood or ELBO; nothing to compare "
            f"({int(failed_mask.sum())} of {len(results)} runs failed, "
            f"{int(pending_mask.sum())} not run yet)."]
    findings = _findings(meta, notes)
    run_notes = _run_notes(results) if len(results) else None
    if run_notes is not None:
        notes.append(f"{int(run_notes.notna().sum())} run(s) left notes (steps of a run that "
                     f"failed or were skipped although the run finished); see the notes column "
                     f"of All runs.")
    return {
        "title": meta.get("title") or meta.get("name") or study.directory.name,
        "name": meta.get("name") or study.directory.name,
        "description": meta.get("description"),
        "overview": {
            "runs": len(results), "ok": int(ok_mask.sum()), "failed": int(failed_mask.sum()),
            "pending": int(pending_mask.sum()),
            "configurations": (len(summary) if summary is not None else 0),
            "seeds": len(seeds), "dataset": (meta.get("dataset") or {}).get("name") or "—",
        },
        "primary_label": analysis.metric_label(primary, k) if primary else None,
        "verdict": verdict_sentences,
        "findings": findings,
        "fixed": fixed,
        "summary_table": _table(summary) if summary is not None and not summary.empty else None,
        "paired": (_paired_tables(results, columns, label_columns, primary, k)
                   if primary else []),
        "figures": sections,
        "runs_table": (_table(_runs_table(results, label_columns, k),
                              classes="data runs" + (" with-notes" if run_notes is not None else ""))
                       if len(results) else None),
        "runs_have_notes": run_notes is not None,
        "failed": failed,
        "provenance": _provenance(meta, results),
        "notes": notes,
    }


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _write_atomically(path: pathlib.Path, text: str) -> None:
    write_atomically(path, text)


def render_report(study_dir: str | os.PathLike, output: str | os.PathLike | None = None
                  ) -> pathlib.Path:
    """Render ``study_dir`` into one self-contained HTML file and return its path.

    The page opens with the summary and the verdict (best configuration by the
    importance-sampled estimate of log p(x), with paired confidence intervals against the
    runners-up), then the tables, the figures, the failed runs with their messages and the
    provenance. Sections whose data are missing are left out. Everything is computed before
    anything is written; the file is then replaced atomically.

    Parameters
    ----------
    study_dir : path
        A study directory (``study.json``, ``results.csv``, ``runs/``).
    output : path, optional
        Where to write; an existing directory gets ``index.html`` inside it. Default
        ``<study_dir>/index.html``.

    Returns
    -------
    pathlib.Path
        The written report.
    """
    study = load_study(study_dir)
    if output is None:
        target = study.directory / "index.html"
    else:
        target = pathlib.Path(output)
        if target.is_dir():
            target = target / "index.html"
    context = build_context(study)
    html = _environment().get_template("study.html").render(**context)
    _write_atomically(target, html)
    return target
