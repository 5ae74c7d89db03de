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
import numpy as np
import pandas as pd

from pyro_lvm.inference import reliability

from . import analysis, comparisons, figures, tables
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


# --------------------------------------------------------------------------- layout


@dataclasses.dataclass
class Layout:
    """How configurations are named, grouped and coloured, the same in every table and figure.

    Attributes
    ----------
    columns : list of str
        Configuration columns.
    label_columns : list of str
        The configuration columns that vary (the study's factor first).
    short_columns : list of str
        Those naming a configuration in short labels (no column that is a function of an
        earlier one).
    labels : Series
        Short label per run (index of ``results``).
    factor : str or None
        The study's factor (``primary_factor`` of ``study.json``), if it varies.
    strata : list of str
        Other varying settings the factor is compared within.
    colors : dict
        Factor level -> colour.
    """

    columns: list[str]
    label_columns: list[str]
    short_columns: list[str]
    labels: pd.Series
    factor: str | None
    strata: list[str]
    colors: dict

    def level_of(self, row) -> str:
        return analysis._format_value(row[self.factor]) if self.factor else "all runs"

    def stratum_of(self, row) -> str:
        return ", ".join(f"{c}={analysis._format_value(row[c])}" for c in self.strata)

    def style_maps(self, results: pd.DataFrame):
        """label -> colour, line style and hatch (factor level and stratum)."""
        strata = list(dict.fromkeys(self.stratum_of(r) for _, r in results.iterrows()))
        colors, styles, hatches = {}, {}, {}
        for index, row in results.iterrows():
            label = self.labels[index]
            colors[label] = self.colors.get(self.level_of(row), "0.4")
            position = strata.index(self.stratum_of(row))
            styles[label] = figures.LINE_STYLES[position % len(figures.LINE_STYLES)]
            hatches[label] = figures.HATCHES[position % len(figures.HATCHES)]
        return colors, styles, hatches


def _layout(results: pd.DataFrame, meta: dict, columns: list[str]) -> Layout:
    label_columns = analysis.varying_columns(results, columns) if len(results) else []
    factor = meta.get("primary_factor")
    if factor not in label_columns:  # without one: the varying setting with the most levels
        counts = {c: results[c].map(analysis._format_value).nunique() for c in label_columns}
        factor = max(label_columns, key=lambda c: counts[c]) if label_columns else None
    if factor is not None:  # the study's main factor leads tables and figures
        label_columns = [factor] + [c for c in label_columns if c != factor]
    short = tables.short_label_columns(results, label_columns) if len(results) else []
    strata = comparisons.strata_columns(results, factor, columns)[0] if factor else []
    levels = (list(pd.unique(results[factor].map(analysis._format_value))) if factor
              else ["all runs"])
    return Layout(columns=columns, label_columns=label_columns, short_columns=short,
                  labels=tables.short_labels(results, short), factor=factor, strata=strata,
                  colors=figures.level_colors(levels))


def _per_row_values(study: StudyData, key: str) -> dict[str, np.ndarray]:
    """run_id -> per-test-row array ``key`` of the run's artifacts (runs that have it)."""
    out = {}
    for rid, record in study.runs.items():
        value = (record.artifacts or {}).get(key)
        if value is not None and value.ndim == 1 and value.size:
            out[rid] = value.astype(float)
    return out


def _khat_samples(results: pd.DataFrame) -> int | None:
    """The number of draws behind the k-hat values (``khat_num_samples``), when unique."""
    if "khat_num_samples" not in results.columns:
        return None
    values = pd.to_numeric(results["khat_num_samples"], errors="coerce").dropna().unique()
    return int(values[0]) if len(values) == 1 and values[0] >= 2 else None


def _add_unreliable_shares(study: StudyData, k_draws: int | None) -> None:
    """Fill ``khat_unreliable_frac`` (share of rows with k-hat above the K-aware threshold)
    from each run's per-row k-hat where the runner did not record it."""
    results = study.results
    if "khat_unreliable_frac" not in results.columns:
        results["khat_unreliable_frac"] = np.nan
    shares = pd.to_numeric(results["khat_unreliable_frac"], errors="coerce")
    per_run_k = (pd.to_numeric(results["khat_num_samples"], errors="coerce")
                 if "khat_num_samples" in results.columns else pd.Series(k_draws, results.index))
    for index in results.index[shares.isna()]:
        record = study.runs.get(results.at[index, "run_id"])
        khat = (record.artifacts or {}).get("khat") if record else None
        draws = per_run_k.get(index)
        if khat is not None and khat.size and draws is not None and np.isfinite(draws) \
                and draws >= 2:
            shares[index] = float(reliability.khat_unreliable(khat, int(draws)).mean())
    results["khat_unreliable_frac"] = shares


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


def _needs_method(ok, shown, what: str, method: str) -> str:
    """One sentence naming the configurations whose pair cannot show ``what`` and the method
    it would need (empty when every configuration shows it). ``shown``: labels shown."""
    missing = sorted(set(ok["configuration"]) - set(shown))
    if not missing:
        return ""
    return (f" No {what} for {', '.join(missing)}: the pair would need {method}.")


def _figure_sections(study, layout: Layout, k, k_draws, notes):
    results = study.results
    labels = dict(zip(results["run_id"], layout.labels))
    ok = analysis.successful_runs(results).copy()
    ok["configuration"] = ok["run_id"].map(labels)
    colors, styles, hatches = layout.style_maps(ok)
    factor = layout.factor
    sections = []

    def add(section_id, title, caption, draw, short=None):
        # ``draw`` is called here, not by the caller, so that a figure function that raises
        # costs only its own figure: the section then says why it is missing
        try:
            uri = draw()
        except Exception as exc:  # noqa: BLE001 - any plotting error degrades to a note
            message = f"figure {title} could not be drawn: {type(exc).__name__}: {exc}"
            notes.append(message)
            sections.append({"id": section_id, "title": title, "short": short or title,
                             "caption": caption, "uri": None, "error": message})
            return
        if uri is not None:
            sections.append({"id": section_id, "title": title, "short": short or title,
                             "caption": caption, "uri": uri, "error": None})

    # the metric per level of the factor, within each stratum (x axis), one colour per level
    frame = ok.copy()
    x = ", ".join(layout.strata) or "within"
    frame[x] = ([layout.stratum_of(r) or "all runs" for _, r in frame.iterrows()]
                if layout.strata else (frame[factor] if factor else "all runs"))
    hue = factor or x
    if not factor:
        frame[x] = "all runs"
    for metric in ("test_log_likelihood", "exact_test_log_likelihood", "test_elbo"):
        if metric not in frame.columns:
            continue
        label = analysis.metric_label(metric, k)
        short = {"test_log_likelihood": "log p(x) estimate", "test_elbo": "ELBO",
                 "exact_test_log_likelihood": "exact log p(x)"}[metric]
        missing = ""
        if metric == "exact_test_log_likelihood":
            missing = _needs_method(ok, ok.loc[ok[metric].notna(), "configuration"],
                                    "exact value", "log_marginal(x) returning the exact "
                                                   "log p(x_i) per row")
        add(f"fig-{metric}", f"{label} per {factor or 'configuration'}",
            "Diamonds: mean over seeds with ±1 standard error (sd/√n over seeds); dots: single "
            "runs. Units: nats per test row, higher is better. Colours: levels of "
            f"{factor or 'the configuration'}, as in every figure.{missing}",
            lambda metric=metric, label=label: figures.metric_by_factor(
                frame, metric, x, hue=hue, palette=layout.colors, ylabel=label),
            short=f"{short} per {factor or 'configuration'}")

    # learning curves: one panel per stratum (runs optimizing the same bound), shared y axis
    histories = {rid: study.runs[rid].history for rid in ok["run_id"]
                 if study.runs.get(rid) is not None and study.runs[rid].history is not None}
    panel_of = {rid: (layout.stratum_of(row) or "all runs")
                for rid, (_, row) in zip(ok["run_id"], ok.iterrows())}
    color_of = {rid: layout.colors.get(layout.level_of(row), "0.4")
                for rid, (_, row) in zip(ok["run_id"], ok.iterrows())}
    legend_of = {rid: layout.level_of(row) for rid, (_, row) in zip(ok["run_id"], ok.iterrows())}
    add("fig-learning-curves", "Learning curves",
        "Training objective (solid) and validation objective (dashed) per epoch, nats per data "
        "row; one line per run (seed), coloured by "
        f"{factor or 'configuration'}; panels share the y axis. The objective is the bound "
        "being optimized (ELBO or IWAE_K), not log p(x).",
        lambda: figures.learning_curves(histories, panel_of, color_of, legend_of,
                                        ylabel="bound per data row (nats)"),
        short="Learning curves")

    reps = _representatives(study, labels)

    # k-hat: pool seeds of each configuration
    khats: dict[str, list[np.ndarray]] = {}
    for rid in ok["run_id"]:
        record = study.runs.get(rid)
        k_values = _artifact(record, "khat") if record else None
        if k_values is not None:
            khats.setdefault(labels[rid], []).append(k_values.ravel())
    if k_draws is not None:
        threshold = reliability.khat_threshold(k_draws)
        add("fig-khat", "Pareto k̂ of the importance weights per test row",
            f"Each point is one test row of one seed (k̂ from K = {k_draws} draws). k̂ ≤ "
            f"{threshold:.2f} = min(1 − 1/log₁₀ K, 0.7) (below the dotted line): the "
            f"importance-sampled estimate of log p(x) for that row is reliable; between "
            f"{threshold:.2f} and 0.7: more draws would make it reliable; above 0.7 (the dashed "
            f"line): the weights' tail is too heavy for any practical K, the guide misses "
            f"posterior mass. Above the threshold the row's Monte Carlo standard error is not "
            f"trustworthy.",
            lambda: figures.khat_distribution(khats, k_draws, colors=colors, styles=styles),
            short="Pareto k̂")
    elif khats:
        notes.append("k-hat values without a unique number of draws (khat_num_samples); the "
                     "k-hat figure is left out.")

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
        lambda: figures.latent_usage(au, kl_mean, colors=colors, hatches=hatches),
        short="Latent usage")

    # image data
    image_shape = (study.meta.get("dataset") or {}).get("image_shape")
    if image_shape:
        pixels = int(np.prod(image_shape))
        samples, recon = {}, {}
        for lab, record in reps.items():
            s = _artifact(record, "samples")
            o, r = _artifact(record, "originals"), _artifact(record, "reconstructions")
            if s is not None:
                if s.ndim == 2 and s.shape[1] == pixels:
                    samples[lab] = s
                else:
                    notes.append(f"samples of run {record.run_id} have shape {s.shape}, not "
                                 f"[n, {pixels}] for images {tuple(image_shape)}; not drawn.")
            if o is not None and r is not None:
                if o.ndim == 2 and o.shape == r.shape and o.shape[1] == pixels:
                    recon[lab] = (o, r)
                else:
                    notes.append(f"originals {o.shape} / reconstructions {r.shape} of run "
                                 f"{record.run_id} do not fit images {tuple(image_shape)}; "
                                 f"not drawn.")
        add("fig-samples", "Samples from the model",
            "x ~ p(x) = ∫ p(x|z) p(z) dz, one panel per configuration (the run with the lowest "
            "seed)." + _needs_method(ok, samples, "samples", "sample(n) returning [n, p] draws"),
            lambda: figures.samples_grid(samples, image_shape), short="Samples")
        add("fig-reconstructions", "Reconstructions",
            "Top row of each panel: test images; bottom row: their reconstructions (decoder "
            "mean at the guide's posterior mean), one panel per configuration (the run with the "
            "lowest seed)." + _needs_method(ok, recon, "reconstructions",
                                            "reconstruct(x) returning x's reconstruction"),
            lambda: figures.reconstructions(recon, image_shape), short="Reconstructions")

    latents, priors = {}, {}
    for lab, record in reps.items():
        z = _artifact(record, "latent_mean")
        if z is not None and z.ndim == 2:
            y = _artifact(record, "labels")
            if y is not None and y.size != z.shape[0]:
                notes.append(f"run {record.run_id}: {y.size} labels for {z.shape[0]} latent "
                             f"means; drawn without labels.")
                y = None
            latents[lab] = (z, y)
        p, q = _artifact(record, "prior_samples"), _artifact(record, "aggregate_posterior_samples")
        if p is not None and q is not None and p.ndim == q.ndim == 2 and p.shape[1] == q.shape[1]:
            priors[lab] = (p, q)
    add("fig-latent-space", "Latent space",
        "Posterior means E_q[z|x] of test rows, coloured by label; latents with more than two "
        "dimensions are projected on their first two principal components; the run with the "
        "lowest seed of each configuration."
        + _needs_method(ok, latents, "latent space",
                        "encode(x) returning posterior means, or a guide with latent sites"),
        lambda: figures.latent_scatter(latents), short="Latent space")
    add("fig-prior-vs-aggregate", "Prior vs aggregate posterior",
        "Contours: kernel density estimate of the prior p(z) from its samples; points: samples "
        "of the aggregate posterior q(z) = (1/N) Σ_i q(z|x_i). Prior mass the points do not "
        "reach decodes to atypical samples. Above two dimensions both are projected on the "
        "principal axes of the aggregate posterior samples.",
        lambda: figures.prior_vs_aggregate_posterior(priors), short="Prior vs q(z)")
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


def _primary_metric(results: pd.DataFrame, meta: dict) -> str | None:
    """The metric configurations are ranked by: the exact log-likelihood when every finished
    run has one (linear models), else the study's choice, else the first available."""
    ok_runs = analysis.successful_runs(results)
    exact = "exact_test_log_likelihood"
    if exact in ok_runs.columns and len(ok_runs) and analysis._finite_metric(
            ok_runs, exact).notna().all():
        return exact
    wanted = meta.get("primary_metric")
    order = ([wanted] if isinstance(wanted, str) else []) + list(PRIMARY_METRICS)
    return next((m for m in order if m in results.columns and ok_runs[m].notna().any()), None)


def _verdict(results, layout: Layout, primary, k, k_draws, per_row):
    """The verdict's sentences and the comparison tables (one per varying factor)."""
    ok_mask, failed_mask = analysis._ok_mask(results), analysis._failed_mask(results)
    pending_mask = analysis._pending_mask(results)
    if primary is None:
        return [f"No successful run reported a test log-likelihood or ELBO; nothing to compare "
                f"({int(failed_mask.sum())} of {len(results)} runs failed, "
                f"{int(pending_mask.sum())} not run yet)."], []
    label = analysis.metric_label(primary, k)
    blocks, sentences = [], []
    shown: list[str] = []
    for factor in layout.short_columns or []:
        strata, tied = comparisons.strata_columns(results, factor, layout.columns)
        try:
            v = comparisons.factor_verdict(results, factor, primary, columns=layout.columns,
                                           per_row=per_row, num_samples=k,
                                           num_khat_samples=k_draws)
        except ValueError as error:
            blocks.append({"factor": factor, "table": None, "note": str(error), "tied": tied})
            continue
        within = (f"within each {', '.join(strata)}" if strata else "over all runs")
        blocks.append({
            "factor": factor, "tied": tied, "table": tables.html_table(
                tables.comparison_table(v.comparisons)) if len(v.comparisons) else None,
            "note": f"Matched on the seed {within}; {', '.join(tied) + ' change' if tied else ''}"
                    f"{' together with ' + factor + ' (part of each level); ' if tied else ''}"
                    f"metric: {label}. The Holm adjustment covers the {len(v.comparisons)} "
                    f"comparisons of this table.",
        })
        shown.append(factor)
        if factor == layout.factor:
            sentences.append(
                f"Which {factor}? Levels compared {within}, on runs matched on the seed, by "
                f"{label} (higher is better); the uncertainty is the seed-to-seed spread plus "
                f"the test-set sampling error (paired over test rows); intervals are "
                f"Holm-adjusted, {100 * v.comparisons['confidence'].iloc[0]:g}% family-wise."
                if len(v.comparisons) else f"Which {factor}?")
            sentences.extend(v.sentences)
            if v.reliability:
                sentences.append(v.reliability)
    if not sentences:  # nothing varies: say how the one configuration did
        sentences = analysis.verdict(results, primary, by=layout.columns, num_samples=k
                                     ).sentences
    else:
        if failed_mask.any():
            sentences.append(f"{int(failed_mask.sum())} of {len(results)} runs failed; they are "
                             f"excluded from these statistics and listed under Failed runs.")
        if pending_mask.any():
            sentences.append(f"{int(pending_mask.sum())} of {len(results)} runs have not run yet "
                             f"(the study was interrupted or is still running); re-running the "
                             f"study completes them.")
    del ok_mask
    return sentences, blocks


def _not_used_by(results: pd.DataFrame, setting: str) -> str:
    """`` (not used by: mine)`` when the runs of a user's pair record ``setting`` among the
    settings their pair does not use (``settings_not_used``, e.g. the built-in prior), else
    ``""``: a setting shared by every run is not one every pair was built with."""
    if "settings_not_used" not in results.columns or "model" not in results.columns:
        return ""
    models = []
    for model, listed in zip(results["model"], results["settings_not_used"]):
        if isinstance(listed, str) and setting in listed.split(",") and model not in models:
            models.append(str(model))
    return f" (not used by: {', '.join(models)})" if models else ""


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
    layout = _layout(results, meta, columns)
    fixed = [(c, analysis._format_value(results[c].iloc[0]) + _not_used_by(results, c))
             for c in columns if c not in layout.label_columns and len(results)]
    k = analysis.num_eval_samples(results, meta)
    k_draws = _khat_samples(results)
    _add_unreliable_shares(study, k_draws)
    threshold = reliability.khat_threshold(k_draws) if k_draws else None
    primary = _primary_metric(results, meta)
    per_row = _per_row_values(study, {"test_log_likelihood": "log_px",
                                      "exact_test_log_likelihood": "exact_log_px"}
                              .get(primary, "-"))
    verdict_sentences, paired = _verdict(results, layout, primary, k, k_draws, per_row)
    failed_mask = analysis._failed_mask(results)
    pending_mask = analysis._pending_mask(results)
    if meta.get("status") and meta.get("status") != "finished":
        notes.append(f"study.json says the study is {meta['status']}: "
                     f"{int(pending_mask.sum())} run(s) have no result yet.")
    failed = []
    for index, row in results.loc[failed_mask].iterrows():
        record = study.runs.get(row["run_id"])
        traceback = (record.result or {}).get("traceback") if record else None
        error = row.get("error")
        if not isinstance(error, str) or not error.strip():
            error = (record.result or {}).get("error") if record else None
        failed.append({
            "run_id": row["run_id"],
            "configuration": layout.labels[index],
            "seed": analysis._format_value(row["seed"]) if "seed" in row else "—",
            "error": error if isinstance(error, str) and error.strip() else "(no message recorded)",
            "traceback": traceback if isinstance(traceback, str) else None,
        })

    sections = _figure_sections(study, layout, k, k_draws, notes) if len(results) else []
    seeds = (sorted(pd.unique(results["seed"].dropna()).tolist())
             if "seed" in results.columns else [])
    summary = (tables.summary_table(results, columns, layout.labels, k, primary, per_row,
                                    threshold) if len(results) else None)
    key = (tables.key_table(results, layout.label_columns, layout.labels)
           if len(results) and layout.label_columns else None)
    findings = _findings(meta, notes)
    run_notes = _run_notes(results) if len(results) else None
    if run_notes is not None:
        notes.append(f"{int(run_notes.notna().sum())} run(s) left notes (what a run did beyond "
                     f"the plan, or skipped); see the notes column of All runs.")
    return {
        "title": meta.get("title") or meta.get("name") or study.directory.name,
        "name": meta.get("name") or study.directory.name,
        "description": meta.get("description"),
        "overview": {
            "runs": len(results), "ok": int(analysis._ok_mask(results).sum()),
            "failed": int(failed_mask.sum()), "pending": int(pending_mask.sum()),
            "configurations": (len(summary) if summary is not None else 0),
            "seeds": len(seeds), "dataset": (meta.get("dataset") or {}).get("name") or "—",
        },
        "primary_label": analysis.metric_label(primary, k) if primary else None,
        "verdict": verdict_sentences,
        "findings": findings,
        "fixed": fixed,
        "key_table": tables.html_table(key, classes="data key") if key is not None else None,
        "summary_table": (tables.html_table(summary) if summary is not None and not summary.empty
                          else None),
        "threshold": threshold,
        "paired": paired,
        "figures": sections,
        "runs_table": (tables.html_table(
            tables.runs_table(results, layout.labels, k, threshold, run_notes),
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
