"""Imputation study: what statisticians use today against exact linear and MIWAE imputation.

Each run is one (missing rate, mechanism, seed, method). The training rows of the dataset
are amputed (:func:`pyro_lvm.inference.ampute`: MCAR, MAR or MNAR at the given rate); every
method sees only the observed entries and is scored on the held-out (amputed) entries. With
``--evaluate-on train`` (the default) each method is fit on the incomplete training rows and
imputes them (in-sample, as in Mattei & Frellsen 2019); with ``--evaluate-on test`` it is fit
on the incomplete training rows and imputes the test rows, amputed the same way with another
seed (out-of-sample: KNN's donors are the training rows, MIWAE's encoder and decoder were
trained on them):

* ``mean`` -- column means (scikit-learn ``SimpleImputer``);
* ``knn`` -- ``KNNImputer`` (k nearest rows on the observed columns);
* ``iterative`` -- ``IterativeImputer`` (chained Bayesian-ridge regressions, MICE-like;
  continuous data only);
* ``ppca``, ``fa`` -- probabilistic PCA / factor analysis fit by maximizing the *exact*
  observed-data log-likelihood (the Gaussian marginal of each row's observed entries, Adam
  on :meth:`~pyro_lvm.models.FactorAnalysis.log_marginal` with the mask), imputed by the
  exact conditional Gaussian (:meth:`~pyro_lvm.models.FactorAnalysis.conditional`; draws
  exact, log p(x_miss | x_obs) exact);
* ``miwae-gaussian``, ``miwae-studentt`` (continuous) and ``miwae-bernoulli`` (binary) --
  a DLVM trained with the IWAE bound on the observed entries (MIWAE; the encoder sees the
  zero-filled row), imputed by self-normalized importance sampling
  (:func:`pyro_lvm.inference.impute`) with ``--num-eval-samples`` draws per row.

Metrics (``results.csv``): RMSE and MAE on the held-out entries (accuracy for binary data),
coverage and mean width of 90% multiple-imputation intervals (methods with draws),
log p(x_miss | x_obs) per held-out entry (IS estimate with its MC standard error for MIWAE,
exact for PPCA/FA), a Rubin-pooled mean of the most-amputed column beside its complete-data
value, fit and imputation times. Paired differences against mean imputation (same amputed
data, across seeds) with t intervals go in the report, with imputed examples for image data.

Run ``python studies/impute.py`` (digits), ``--dataset binarized-mnist``, or
``--dataset my.csv [--allow-missing]`` (entries missing in the file are never scored).
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional

if __package__ in (None, ""):  # run as a file from a checkout: use this checkout's pyro_lvm
    import _checkout  # noqa: F401  (studies/_checkout.py, beside this script)

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyro  # noqa: E402
import scipy.stats  # noqa: E402
import torch  # noqa: E402

from pyro_lvm._io import write_atomically  # noqa: E402
from pyro_lvm.inference import (IWAE, ampute, conditional_log_likelihood, fit,  # noqa: E402
                                imputation_error, impute, interval_coverage,
                                isolated_param_store, pooled_column_mean, resolve_device)
from pyro_lvm.models import DLVM, PPCA, FactorAnalysis  # noqa: E402
from pyro_lvm.studies import runner  # noqa: E402
from pyro_lvm.studies.runner.lock import StudyLock  # noqa: E402

NAME = "impute"
DEFAULTS = dict(latent_dim=5, hidden="128", epochs=60, batch_size=64, lr=3e-3, num_particles=5,
                num_eval_samples=200, seeds=[0, 1, 2])
CONTINUOUS_METHODS = ("mean", "knn", "iterative", "ppca", "fa", "miwae-gaussian",
                      "miwae-studentt")
BINARY_METHODS = ("mean", "knn", "ppca", "fa", "miwae-bernoulli")
ALL_METHODS = tuple(dict.fromkeys(CONTINUOUS_METHODS + BINARY_METHODS))
SMOKE = dict(rates=[0.2, 0.5], methods=["mean", "knn", "ppca", "miwae-gaussian"],
             num_imputations=10, linear_steps=50, max_rows=150)
COLORS = {"mean": "#7f7f7f", "knn": "#8c564b", "iterative": "#9467bd", "ppca": "#1f77b4",
          "fa": "#17becf", "miwae-gaussian": "#d62728", "miwae-studentt": "#ff7f0e",
          "miwae-bernoulli": "#2ca02c"}


# ----------------------------------------------------------------------------- command line
def parse_args(argv=None) -> argparse.Namespace:
    parser, g = runner.study_parser(
        NAME, "Imputation of amputed data: mean, KNN, iterative imputation, exact PPCA/FA "
              "conditionals and MIWAE; writes results.csv and an HTML report.",
        DEFAULTS, omit=("warmup_epochs",))
    g.add_argument("--rates", type=runner.fraction, nargs="+", default=[0.2, 0.5],
                   help="missing rates of the amputation (default: %(default)s)")
    g.add_argument("--mechanisms", nargs="+", choices=["mcar", "mar", "mnar"], default=["mcar"],
                   help="amputation mechanisms (default: %(default)s)")
    g.add_argument("--methods", nargs="+", choices=ALL_METHODS, default=None,
                   help="imputation methods (default: all that suit the data)")
    g.add_argument("--num-imputations", type=runner.positive_int, default=20,
                   help="M, multiple imputations per method with draws (default: %(default)s)")
    g.add_argument("--knn-neighbors", type=runner.positive_int, default=5,
                   help="k of KNNImputer (default: %(default)s)")
    g.add_argument("--linear-steps", type=runner.positive_int, default=300,
                   help="Adam steps on the exact observed-data likelihood of PPCA/FA "
                        "(default: %(default)s)")
    g.add_argument("--evaluate-on", choices=["train", "test"], default="train",
                   help="rows that are imputed and scored: 'train' (the rows each method is fit "
                        "on, in-sample) or 'test' (fit on the amputed training rows, impute the "
                        "amputed test rows; written to <study>-on-test; default: %(default)s)")
    g.add_argument("--examples", type=runner.nonnegative_int, default=6,
                   help="imputed rows shown per method in the report (default: %(default)s)")
    return runner.parse_study_args(parser, argv, smoke=SMOKE)


# ----------------------------------------------------------------------------- data
@dataclass
class Rows:
    """Rows of one split with what is known about them: ``x`` the values (arbitrary where
    missing in the file), ``base`` the entries present in the file, ``mask`` the entries
    left observed by the amputation (None before it) and ``scored`` the held-out entries
    whose true values are known (``base & ~mask``)."""
    x: np.ndarray
    base: np.ndarray
    mask: Optional[np.ndarray] = None

    @property
    def scored(self) -> np.ndarray:
        return self.base & ~self.mask

    def amputed(self, rate: float, mechanism: str, seed: int) -> "Rows":
        return Rows(self.x, self.base, amputed_mask(self.x, self.base, rate, mechanism, seed))

    def with_nan(self) -> np.ndarray:
        return np.where(self.mask, self.x, np.nan)


def _split(ds, split: str) -> Rows:
    x = getattr(ds, split).numpy().astype(np.float64)
    base = ds.mask(split)
    return Rows(x, np.ones(x.shape, bool) if base is None else base.numpy().astype(bool))


def load(args: argparse.Namespace):
    """The dataset, the rows methods are fit on (training split), the rows they are scored on
    (the same rows, or the test split with ``--evaluate-on test``; base masks are the entries
    missing in the file) and whether the data are binary."""
    binary = args.dataset == "binarized-mnist"
    extra = {"dequantize": True} if args.dataset == "digits" else {}
    if binary:
        ds = runner.dataset_from_args(args, likelihood="bernoulli")
    else:
        ds = runner.dataset_from_args(args, scale="standardize", drop_constant=True,
                                      likelihood="gaussian", **extra)
    train = _split(ds, "train")
    target = train if args.evaluate_on == "train" else _split(ds, "test")
    if target.x.shape[0] == 0:
        raise ValueError(f"--evaluate-on test: {ds.name} has no test rows")
    binary = binary or all(bool(np.isin(r.x[r.base], [0.0, 1.0]).all()) for r in (train, target))
    return ds, train, target, binary


def methods_for(args, binary: bool) -> List[str]:
    allowed = BINARY_METHODS if binary else CONTINUOUS_METHODS
    methods = list(args.methods or allowed)
    bad = [m for m in methods if m not in allowed]
    if bad:
        raise ValueError(f"--methods {' '.join(bad)}: not for {'binary' if binary else 'continuous'}"
                         f" data (choose from {' '.join(allowed)})")
    return methods


def amputed_mask(x: np.ndarray, base: np.ndarray, rate: float, mechanism: str, seed: int):
    """Observed mask after amputation; rows keep at least one entry observed in the file."""
    filled = np.where(base, x, np.nanmean(np.where(base, x, np.nan), axis=0))
    keep = ampute(filled, rate, mechanism, seed=seed) & base
    for row in np.nonzero(~keep.any(1))[0]:
        keep[row, np.nonzero(base[row])[0][0]] = True
    return keep


# ----------------------------------------------------------------------------- methods
@dataclass
class MethodOutput:
    imputed: np.ndarray
    draws: Optional[np.ndarray] = None
    log_p_missing: Optional[float] = None  # per held-out entry
    log_p_missing_se: Optional[float] = None
    fit_time_s: float = 0.0
    impute_time_s: float = 0.0
    notes: List[str] = field(default_factory=list)


def _sklearn(method: str, train: Rows, target: Rows, args, seed: int) -> MethodOutput:
    from sklearn.experimental import enable_iterative_imputer  # noqa: F401
    from sklearn.impute import IterativeImputer, KNNImputer, SimpleImputer

    x_nan = train.with_nan()
    imputer = {"mean": lambda: SimpleImputer(strategy="mean"),
               "knn": lambda: KNNImputer(n_neighbors=args.knn_neighbors),
               "iterative": lambda: IterativeImputer(
                   max_iter=10, random_state=seed, n_nearest_features=min(20, x_nan.shape[1] - 1),
                   skip_complete=True)}[method]()
    t0 = time.perf_counter()
    if target is train:
        out, fit_time = imputer.fit_transform(x_nan), 0.0
    else:
        imputer.fit(x_nan)
        fit_time = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = imputer.transform(target.with_nan())
    if out.shape != target.x.shape:  # a column with no observed entry is dropped by sklearn
        raise ValueError(f"{method}: a column has no observed entry at this missing rate")
    return MethodOutput(imputed=out, fit_time_s=fit_time, impute_time_s=time.perf_counter() - t0)


def _fit_linear_exact(model, x: np.ndarray, mask: np.ndarray, steps: int, lr: float = 0.02):
    """Maximize the exact observed-data log-likelihood (each row's Gaussian marginal on its
    observed entries) by full-batch Adam, from the complete-data fit to mean-imputed rows."""
    filled = np.where(mask, x, np.nanmean(np.where(mask, x, np.nan), axis=0))
    if isinstance(model, PPCA):
        model.fit_closed_form(filled)
    else:
        with warnings.catch_warnings():  # only a starting point for the exact fit below
            warnings.filterwarnings("ignore", message=".*did not converge", category=UserWarning)
            model.fit_em(filled, progress=False, max_iter=200, tol=1e-6)
    xt, mt = torch.as_tensor(x), torch.as_tensor(mask)
    # guide parameters get no gradient from log_marginal; Adam leaves them alone
    opt = torch.optim.Adam(list(model.parameters()), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = -model.log_marginal(xt, mask=mt).mean()
        loss.backward()
        opt.step()
    return float(-loss.detach())


def _linear(method: str, train: Rows, target: Rows, args, seed: int) -> MethodOutput:
    torch.manual_seed(seed)
    cls = PPCA if method == "ppca" else FactorAnalysis
    x = target.x
    if args.latent_dim >= x.shape[1]:
        raise ValueError(f"--latent-dim {args.latent_dim} must be below {x.shape[1]} columns")
    model = cls(x.shape[1], args.latent_dim).double()
    t0 = time.perf_counter()
    with isolated_param_store():
        _fit_linear_exact(model, train.x, train.mask, args.linear_steps)
    fit_time = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.no_grad():
        cond = model.conditional(x, target.mask, covariance=False)
        draws = cond.sample(args.num_imputations, seed=seed).numpy()
        known = target.mask | target.scored  # missing in the file: neither given nor scored
        exact = (model.log_marginal(x, mask=known)
                 - model.log_marginal(x, mask=target.mask)).numpy()
    held_out = max(1, int(target.scored.sum()))
    return MethodOutput(imputed=cond.mean.numpy(), draws=draws,
                        log_p_missing=float(exact.sum() / held_out), log_p_missing_se=0.0,
                        fit_time_s=fit_time, impute_time_s=time.perf_counter() - t0)


def _miwae(method: str, train: Rows, target: Rows, args, seed: int) -> MethodOutput:
    likelihood = method.split("-", 1)[1]
    pyro.set_rng_seed(seed)
    hidden = runner.command_line.parse_hidden(args.hidden)
    model = DLVM(train.x.shape[1], args.latent_dim, likelihood=likelihood, hidden=hidden)
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    result = fit(model, train.with_nan().astype(np.float32), IWAE(args.num_particles),
                 epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=seed,
                 device=device, allow_missing=True, progress=not args.no_progress)
    fit_time = time.perf_counter() - t0
    t0 = time.perf_counter()
    imp = impute(result, target.with_nan().astype(np.float32), allow_missing=True,
                 num_samples=args.num_eval_samples, method="multiple",
                 num_imputations=args.num_imputations, seed=seed, device=device)
    impute_time = time.perf_counter() - t0
    cll = conditional_log_likelihood(result, target.x.astype(np.float32), target.mask,
                                     scored=target.scored, num_samples=args.num_eval_samples,
                                     seed=seed, device=device)
    held_out = max(1, int(target.scored.sum()))
    pr = cll.per_row
    notes = []
    if np.median(imp.ess) < 10:
        notes.append(f"median ESS of the imputation weights {np.median(imp.ess):.1f}: "
                     f"importance sampling is unreliable for these rows")
    return MethodOutput(imputed=imp.imputed.astype(np.float64), draws=imp.draws,
                        log_p_missing=float(pr["log_p_missing"].sum() / held_out),
                        log_p_missing_se=float(np.sqrt((pr["se"] ** 2).sum()) / held_out),
                        fit_time_s=fit_time, impute_time_s=impute_time, notes=notes)


def run_method(method: str, train: Rows, target: Rows, args, seed: int) -> MethodOutput:
    """Fit ``method`` on the observed entries of the amputed ``train`` rows and impute the
    amputed ``target`` rows (``train`` itself for in-sample imputation)."""
    if method in ("mean", "knn", "iterative"):
        return _sklearn(method, train, target, args, seed)
    if method in ("ppca", "fa"):
        return _linear(method, train, target, args, seed)
    return _miwae(method, train, target, args, seed)


# ----------------------------------------------------------------------------- one run
def run_id(rate: float, mechanism: str, seed: int, method: str) -> str:
    return f"{method}-{mechanism}-r{round(rate * 100):02d}-s{seed}"


def score(out: MethodOutput, rows: Rows, binary: bool) -> Dict[str, float]:
    """Metrics of one run on the held-out entries of the imputed rows (``rows.scored``)."""
    x, mask, scored = rows.x, rows.mask, rows.scored
    known = mask | scored
    metrics = imputation_error(np.where(known, x, 0.0), np.where(known, out.imputed, 0.0),
                               ~scored, binary=binary)
    metrics.pop("num_missing")
    metrics["num_held_out"] = int(scored.sum())
    metrics.update(coverage_90=math.nan, interval_width_90=math.nan, rubin_mean=math.nan,
                   rubin_mean_se=math.nan, complete_mean=math.nan)
    if out.draws is not None and not binary:  # 0/1 draws: quantile intervals are degenerate
        cov = interval_coverage(np.where(known, out.draws, 0.0), np.where(known, x, 0.0),
                                ~scored, level=0.9)
        metrics.update(coverage_90=cov["coverage"], interval_width_90=cov["mean_width"])
    if out.draws is not None:
        column = int(np.argmax(scored.sum(0)))
        if out.draws.shape[0] >= 2 and known[:, column].all():
            pooled = pooled_column_mean(out.draws, column)
            metrics.update(rubin_mean=pooled.estimate, rubin_mean_se=pooled.se,
                           complete_mean=float(x[:, column].mean()))
    metrics.update(log_p_missing=math.nan if out.log_p_missing is None else out.log_p_missing,
                   log_p_missing_se=math.nan if out.log_p_missing_se is None
                   else out.log_p_missing_se,
                   fit_time_s=out.fit_time_s, impute_time_s=out.impute_time_s)
    return metrics


def test_seed(seed: int) -> int:
    """Amputation seed of the test rows: another stream than the training rows' ``seed``
    (the same seed would remove the same pixels from the first rows of both splits)."""
    return int(np.random.SeedSequence([seed, 1]).generate_state(1)[0])


def execute(config: dict, train: Rows, target: Rows, binary: bool, args, run_dir):
    """Run one configuration (fit on the amputed ``train`` rows, impute and score the amputed
    ``target`` rows, which may be ``train``); write ``<run_id>.json`` (and the imputed example
    rows) atomically."""
    rate, mechanism, seed = config["rate"], config["mechanism"], config["seed"]
    same = target is train
    train = train.amputed(rate, mechanism, seed)
    target = train if same else target.amputed(rate, mechanism, test_seed(seed))
    mask = target.mask
    record = dict(config, status="ok", error="", notes="")
    try:
        out = run_method(config["method"], train, target, args, seed)
        record.update(score(out, target, binary))
        record["notes"] = "; ".join(out.notes)
        examples = out.imputed[:args.examples]
    except Exception as exc:  # recorded, and the grid goes on
        if isinstance(exc, KeyboardInterrupt):
            raise
        record.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        examples = np.zeros((0, target.x.shape[1]))
    path = run_dir / f"{config['run_id']}.npz"
    import io

    buffer = io.BytesIO()
    np.savez(buffer, imputed=examples, mask=mask[:args.examples])
    write_atomically(path, buffer.getvalue())
    write_atomically(run_dir / f"{config['run_id']}.json", json.dumps(record, indent=1))
    return record


def _finished(run_dir, config) -> Optional[dict]:
    path = run_dir / f"{config['run_id']}.json"
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    same = all(record.get(k) == config[k] for k in ("rate", "mechanism", "seed", "method"))
    return record if same and record.get("status") == "ok" else None


# ----------------------------------------------------------------------------- analysis
def summary_table(table: pd.DataFrame, metric_cols: List[str]) -> pd.DataFrame:
    ok = table[table["status"] == "ok"]
    groups = ok.groupby(["mechanism", "rate", "method"], sort=True)
    out = groups[metric_cols].mean()
    out.insert(0, "seeds", groups.size())
    return out.reset_index()


def paired_differences(table: pd.DataFrame, metric: str, reference: str = "mean",
                       level: float = 0.95) -> pd.DataFrame:
    """``metric`` of each method minus the reference method on the same amputed data
    (same mechanism, rate and seed), averaged over seeds with a paired t interval."""
    ok = table[table["status"] == "ok"]
    wide = ok.pivot_table(index=["mechanism", "rate", "seed"], columns="method", values=metric)
    rows = []
    if reference not in wide.columns:
        return pd.DataFrame()
    for method in wide.columns:
        if method == reference:
            continue
        diff = (wide[method] - wide[reference]).dropna()
        for (mechanism, rate), d in diff.groupby(level=["mechanism", "rate"]):
            n = len(d)
            mean = float(d.mean())
            se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
            half = float(scipy.stats.t.ppf((1 + level) / 2, n - 1) * se) if n > 1 else math.nan
            rows.append(dict(mechanism=mechanism, rate=rate, method=method, seeds=n,
                             difference=mean, se=se, ci_low=mean - half, ci_high=mean + half))
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- figures
def _figure(width, height, ncols=1):
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = Figure(figsize=(width, height), dpi=80, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def error_by_rate_figure(summary: pd.DataFrame, metric: str) -> Optional[str]:
    from pyro_lvm.reports.figures import figure_to_data_uri

    mechanisms = sorted(summary["mechanism"].unique())
    if summary.empty or summary[metric].isna().all():
        return None
    fig, axes = _figure(3.8 * len(mechanisms), 3.0, len(mechanisms))
    for ax, mech in zip(axes, mechanisms):
        part = summary[summary["mechanism"] == mech]
        for method, d in part.groupby("method"):
            d = d.sort_values("rate")
            ax.plot(d["rate"], d[metric], marker="o", label=method, color=COLORS.get(method))
        ax.set_title(mech.upper())
        ax.set_xlabel("missing rate")
        ax.set_ylabel(metric)
    axes[-1].legend(fontsize=8)
    return figure_to_data_uri(fig)


def bar_figure(summary: pd.DataFrame, metric: str, *, log: bool = False,
               reference: Optional[float] = None) -> Optional[str]:
    from pyro_lvm.reports.figures import figure_to_data_uri

    data = summary.dropna(subset=[metric])
    if data.empty:
        return None
    labels = [f"{r.method}\n{r.mechanism} {r.rate:g}" for r in data.itertuples()]
    fig, (ax,) = _figure(max(4.0, 0.45 * len(labels)), 3.2)
    ax.bar(range(len(labels)), data[metric], color=[COLORS.get(m) for m in data["method"]])
    ax.set_xticks(range(len(labels)), labels, rotation=70, fontsize=7)
    ax.set_ylabel(metric)
    if log:
        ax.set_yscale("log")
    if reference is not None:
        ax.axhline(reference, color="k", lw=1, ls="--")
    return figure_to_data_uri(fig)


def examples_figure(dataset, x: np.ndarray, study_dir, table: pd.DataFrame,
                    num: int) -> Optional[str]:
    """Truth, observed pixels (missing in red) and each method's imputation, for the first
    rows at the highest missing rate (first mechanism and seed)."""
    from pyro_lvm.reports.figures import figure_to_data_uri

    ok = table[table["status"] == "ok"]
    if dataset.image_shape is None or ok.empty or num == 0:
        return None
    rate, mech, seed = ok["rate"].max(), sorted(ok["mechanism"])[0], ok["seed"].min()
    chosen = ok[(ok["rate"] == rate) & (ok["mechanism"] == mech) & (ok["seed"] == seed)]
    panels, mask = [], None
    for r in chosen.itertuples():
        with np.load(study_dir / "runs" / f"{r.run_id}.npz") as z:
            if len(z["imputed"]):
                panels.append((r.method, z["imputed"]))
                mask = z["mask"]
    if not panels:
        return None
    n = min(num, len(mask))
    truth = dataset.to_images(x[:n])
    cols = dataset.kept_columns if dataset.kept_columns is not None \
        else np.arange(dataset.original_dim)
    hidden = np.zeros((n, dataset.original_dim), bool)
    hidden[:, cols] = ~mask[:n]
    hidden = hidden.reshape((n,) + tuple(dataset.image_shape))
    rows = [("truth", truth, None), ("observed", truth, hidden)]
    rows += [(m, dataset.to_images(v[:n]), None) for m, v in panels]
    lo, hi = float(np.min(truth)), float(np.max(truth))
    fig = _figure(0.9 * n + 1.4, 0.9 * len(rows), 1)[0]
    fig.clear()
    axes = fig.subplots(len(rows), n, squeeze=False)
    for i, (name, images, missing) in enumerate(rows):
        for j in range(n):
            ink = (np.clip(images[j].astype(float), lo, hi) - lo) / max(hi - lo, 1e-12)
            rgb = np.repeat((1 - ink)[..., None], 3, -1)
            if missing is not None:
                rgb[missing[j]] = (0.85, 0.25, 0.25)
            ax = axes[i, j]
            ax.imshow(rgb, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    return figure_to_data_uri(fig)


# ----------------------------------------------------------------------------- report
_CSS = """
:root { --ink: #1d2327; --muted: #5f6b73; --line: #d8dee3; --accent: #2c5d8a; --bad: #b03a2e; --bg-soft: #f5f7f9; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif; color: var(--ink);
       margin: 0; line-height: 1.45; font-size: 15px; }
header { background: var(--accent); color: #fff; padding: 1.2rem 2rem; }
header h1 { margin: 0 0 .3rem 0; font-size: 1.6rem; } header p { margin: 0; opacity: .9; }
main { padding: 0 2rem 3rem 2rem; max-width: 1400px; }
section { margin-top: 2rem; }
h2 { border-bottom: 2px solid var(--line); padding-bottom: .2rem; font-size: 1.3rem; }
.note { color: var(--muted); font-size: .88rem; }
.verdict { border-left: 4px solid var(--accent); background: #eef4fa; padding: .7rem 1rem; }
.scroll { overflow-x: auto; }
table.data { border-collapse: collapse; font-size: .86rem; margin: .5rem 0 1rem 0; }
table.data th, table.data td { border: 1px solid var(--line); padding: .25rem .55rem; text-align: right; white-space: nowrap; }
table.data th { background: var(--bg-soft); text-align: center; white-space: normal; }
img { max-width: 100%; }
pre { white-space: pre-wrap; overflow-wrap: anywhere; font-size: .8rem; }
"""


def _html_table(frame: pd.DataFrame) -> str:
    if frame is None or frame.empty:
        return '<p class="note">(none)</p>'
    return '<div class="scroll">' + frame.to_html(
        classes="data", index=False, na_rep="", float_format=lambda v: f"{v:.4g}",
        border=0) + "</div>"


_SUMMARY_LABELS = {"rmse": "RMSE", "mae": "MAE", "accuracy": "accuracy",
                   "coverage_90": "coverage of 90% intervals", "interval_width_90": "90% interval width",
                   "complete_mean": "complete-data mean", "fit_time_s": "fit (s)",
                   "impute_time_s": "impute (s)"}


def _with_se(frame: pd.DataFrame, value: str, se: str, label: str) -> pd.DataFrame:
    """``value`` and its Monte Carlo ``se`` as one "v ± se" column named ``label``."""
    if value not in frame or frame[value].isna().all():
        return frame.drop(columns=[c for c in (value, se) if c in frame])
    ses = frame[se] if se in frame else pd.Series(np.nan, index=frame.index)
    text = [("" if not np.isfinite(v) else f"{v:.4g}" if not np.isfinite(e)
             else f"{v:.4g} (exact)" if e == 0 else f"{v:.4g} ± {e:.2g}")
            for v, e in zip(frame[value].astype(float), ses.astype(float))]
    out = frame.drop(columns=[c for c in (value, se) if c in frame])
    out[label] = text
    return out


def _display_summary(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary as the report shows it: estimates with their standard errors in one
    column, readable headers (they wrap), and no column that no method filled (coverage
    without draws, Rubin's rules without multiple imputations)."""
    out = summary.dropna(axis=1, how="all")
    out = _with_se(out, "log_p_missing", "log_p_missing_se", "log p(x_miss | x_obs) per entry ± se")
    out = _with_se(out, "rubin_mean", "rubin_mean_se", "Rubin pooled mean ± se")
    return out.rename(columns=_SUMMARY_LABELS)


def _img(uri: Optional[str], alt: str) -> str:
    return f'<img src="{uri}" alt="{alt}">' if uri else '<p class="note">(no data)</p>'


def findings(table: pd.DataFrame, metric: str, better: str) -> List[str]:
    """One line per (mechanism, rate): the best method and its paired difference to mean
    imputation."""
    lines = []
    summary = summary_table(table, [metric])
    diffs = paired_differences(table, metric)
    for (mech, rate), part in summary.groupby(["mechanism", "rate"]):
        part = part.dropna(subset=[metric])
        if part.empty:
            continue
        best = part.loc[part[metric].idxmin() if better == "lower" else part[metric].idxmax()]
        line = f"{mech.upper()} {rate:g}: best {metric} {best[metric]:.4g} by {best['method']}"
        if not diffs.empty and best["method"] != "mean":
            d = diffs[(diffs["mechanism"] == mech) & (diffs["rate"] == rate)
                      & (diffs["method"] == best["method"])]
            if len(d) and np.isfinite(d["ci_low"].iloc[0]):
                line += (f" (minus mean imputation {d['difference'].iloc[0]:+.4g}, 95% CI "
                         f"[{d['ci_low'].iloc[0]:+.4g}, {d['ci_high'].iloc[0]:+.4g}] over "
                         f"{int(d['seeds'].iloc[0])} seeds)")
            elif len(d):
                line += f" (minus mean imputation {d['difference'].iloc[0]:+.4g}, one seed: no interval)"
        lines.append(line)
    return lines


def render_report(study_dir, table: pd.DataFrame, meta: dict, dataset, x: np.ndarray,
                  binary: bool, examples: int) -> str:
    import html

    metric = "accuracy" if binary else "rmse"
    better = "higher" if binary else "lower"
    metric_cols = [c for c in ("rmse", "mae", "accuracy", "coverage_90", "interval_width_90",
                               "log_p_missing", "log_p_missing_se", "rubin_mean", "rubin_mean_se",
                               "complete_mean",
                               "fit_time_s", "impute_time_s") if c in table.columns]
    summary = summary_table(table, metric_cols)
    lines = findings(table, metric, better)
    failed = table[table["status"] != "ok"][["run_id", "error"]] if "error" in table else None
    sections = [
        ("Verdict", '<div class="verdict">' + "".join(f"<p>{html.escape(t)}</p>" for t in lines)
         + f'<p class="note">{metric} on held-out entries, {better} is better; differences are '
           f'paired by amputed data set (same mechanism, rate and seed).</p></div>'),
        ("Summary (mean over seeds)", _html_table(_display_summary(summary))),
        (f"Paired differences in {metric} against mean imputation",
         _html_table(paired_differences(table, metric))),
        (f"{metric} by missing rate", _img(error_by_rate_figure(summary, metric), metric)),
        ("Coverage of 90% multiple-imputation intervals",
         _img(bar_figure(summary, "coverage_90", reference=0.9), "coverage")
         + '<p class="note">Methods with draws (exact conditional for PPCA/FA, sampling '
           'importance resampling for MIWAE); the dashed line is the nominal 90%.</p>'),
        ("log p(x_miss | x_obs) per held-out entry",
         _img(bar_figure(summary, "log_p_missing"), "log p")
         + '<p class="note">Exact for PPCA/FA; importance-sampling estimate (ratio of two IS '
           'estimates, biased low by O(1/K)) for MIWAE, MC standard error in the summary.</p>'),
        ("Imputed examples", _img(examples_figure(dataset, x, study_dir, table, examples),
                                  "examples")
         + '<p class="note">Highest missing rate; missing pixels in red.</p>'),
        ("Timings (fit + impute, seconds)", _img(bar_figure(
            summary.assign(total_time_s=summary["fit_time_s"] + summary["impute_time_s"]),
            "total_time_s", log=True), "timings")),
        ("Failed runs", _html_table(failed)),
        ("Provenance", "<pre>" + html.escape(json.dumps(meta, indent=1, default=str)) + "</pre>"),
    ]
    body = "".join(f"<section><h2>{html.escape(t)}</h2>{c}</section>" for t, c in sections)
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
            "img-src data:; style-src 'unsafe-inline'\">"
            "<meta name=\"generator\" content=\"pyro-lvm reports\">"
            f"<title>{html.escape(meta['title'])} · pyro-lvm study report</title>"
            f"<style>{_CSS}</style></head><body><header><h1>{html.escape(meta['title'])}</h1>"
            f"<p>{html.escape(meta['description'])}</p></header><main>{body}</main></body></html>")


# ----------------------------------------------------------------------------- main
@dataclass
class StudyResult:
    study_dir: object
    results: pd.DataFrame
    report: Optional[object]
    findings: List[str]


def _settings(args, methods) -> dict:
    keys = ("latent_dim", "hidden", "epochs", "batch_size", "lr", "num_particles",
            "num_eval_samples", "num_imputations", "knn_neighbors", "linear_steps", "examples",
            "device", "evaluate_on")
    return {k: getattr(args, k) for k in keys}


def main(args: argparse.Namespace) -> StudyResult:
    import pathlib

    torch.set_num_threads(args.threads or torch.get_num_threads())
    dataset, train, target, binary = load(args)
    x = target.x
    methods = methods_for(args, binary)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    name = runner.study_name_from_args(NAME if args.evaluate_on == "train" else f"{NAME}-on-test",
                                       args, dataset, default_dataset="digits-dequantized")
    study_dir = pathlib.Path(args.out_dir) / name
    command_line = " ".join(shlex.quote(a) for a in ["python"] + sys.argv)
    with StudyLock(study_dir, wait=args.wait, command_line=command_line):
        return _run_locked(args, dataset, train, target, binary, methods, study_dir,
                           command_line)


def _run_locked(args, dataset, train: Rows, target: Rows, binary: bool, methods: List[str],
                study_dir, command_line: str) -> StudyResult:
    """The study under its lock (one writer per study directory): check what an earlier
    invocation left, run what is missing, write the table and the report."""
    from datetime import datetime, timezone

    x = target.x
    run_dir = study_dir / "runs"
    settings = _settings(args, methods)
    if args.fresh and run_dir.exists():
        for f in run_dir.iterdir():
            f.unlink()
    meta_path = study_dir / "study.json"
    if meta_path.exists() and not args.fresh:
        old = json.loads(meta_path.read_text())
        # studies written before --evaluate-on existed evaluated in-sample
        old_settings = {"evaluate_on": "train", **(old.get("settings") or {})}
        if old.get("dataset", {}).get("sha256") != dataset.sha256 or old_settings != settings:
            raise ValueError(f"{study_dir} holds a study of other data or settings; pass --fresh "
                             f"to replace it or --out-dir for another place")
    run_dir.mkdir(parents=True, exist_ok=True)
    title = f"Imputation on {dataset.name}: {', '.join(methods)}" + (
        " (smoke test)" if args.smoke else "")
    scored_rows = ("in-sample" if args.evaluate_on == "train" else
                   f"fit on {train.x.shape[0]} amputed training rows, scored on {x.shape[0]} "
                   f"amputed test rows")
    description = (f"{dataset.name}: {x.shape[0]} {args.evaluate_on} rows x {x.shape[1]} columns "
                   f"({'binary' if binary else 'standardized continuous'}), amputed "
                   f"{'/'.join(args.mechanisms)} at rates {', '.join(f'{r:g}' for r in args.rates)}"
                   f" ({scored_rows}); methods {', '.join(methods)}; {len(args.seeds)} seed(s)."
                   f" MIWAE: DLVM "
                   f"(MLP {args.hidden}, d={args.latent_dim}) trained {args.epochs} epochs with "
                   f"IWAE-{args.num_particles}, imputed with K={args.num_eval_samples}.")
    meta = dict(title=title, description=description, status="running", settings=settings,
                dataset=dict(name=dataset.name, sha256=dataset.sha256, rows=int(train.x.shape[0]),
                             scored_rows=int(x.shape[0]), evaluate_on=args.evaluate_on,
                             columns=int(x.shape[1]), binary=binary, source=dataset.source),
                command_line=command_line,
                started=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    write_atomically(meta_path, json.dumps(meta, indent=1, default=str))
    configs = [dict(run_id=run_id(rate, mech, seed, method), rate=rate, mechanism=mech,
                    seed=seed, method=method)
               for mech in args.mechanisms for rate in args.rates for seed in args.seeds
               for method in methods]
    records = []
    for i, config in enumerate(configs):
        record = None if args.retry_failed else _finished(run_dir, config)
        if record is None:
            if not args.no_progress:
                print(f"[{i + 1}/{len(configs)}] {config['run_id']}", flush=True)
            record = execute(config, train, target, binary, args, run_dir)
        records.append(record)
        table = pd.DataFrame(records)
        write_atomically(study_dir / "results.csv", table.to_csv(index=False))
    table = pd.DataFrame(records)
    meta.update(status="finished", finished=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    lines = findings(table, "accuracy" if binary else "rmse", "higher" if binary else "lower")
    meta["findings"] = lines
    write_atomically(meta_path, json.dumps(meta, indent=1, default=str))
    report = None
    if not args.no_report:
        report = study_dir / "index.html"
        write_atomically(report, render_report(study_dir, table, meta, dataset, x, binary,
                                               args.examples))
    ok = int((table["status"] == "ok").sum())
    print("\n".join(lines + [f"{ok} of {len(table)} runs ok",
                             f"results: {study_dir / 'results.csv'}",
                             f"report:  {report.resolve() if report else '(not rendered)'}"]))
    return StudyResult(study_dir=study_dir, results=table, report=report, findings=lines)


if __name__ == "__main__":
    runner.cli(main, parse_args)
