"""The engine every study uses: a dataset x a grid of configurations x seeds, run to disk.

A *run* is one :class:`RunConfig` (model family, prior, observation model, objective,
architecture, optimization settings, seed) fit to the training split and evaluated on the
test split. A *study* is a list of runs on one :class:`studies.datasets.Dataset`.
:func:`run_study` executes the runs one after another and keeps everything on disk::

    <out_dir>/<study>/study.json            what, on which data, with which code, when
    <out_dir>/<study>/results.csv           one row per run of the grid: config, status, metrics
    <out_dir>/<study>/index.html            the report (reports.render_report)
    <out_dir>/<study>/runs/<run_id>/
        config.json     the run's configuration (flat: the config columns of results.csv)
        history.csv     learning curves (epoch, step, train_objective, valid_objective, ...)
        model.pt        the fitted state_dict
        artifacts.npz   arrays for the report (see ARTIFACTS)
        result.json     status, metrics, timings, device; written LAST: it marks completion

Durability. Every file is written atomically (a temporary file in the same directory, then
:func:`os.replace`), and ``result.json`` is written only after everything else of the run,
so a run directory either has its ``result.json`` (the run is done and is never recomputed)
or it is redone from scratch. Re-running the same command therefore resumes a study: Ctrl-C
loses at most the run in progress. ``fresh=True`` deletes earlier runs first.

Failures. Bad *data* are caught before anything is trained or written: the dataset is
validated against every model of the grid up front (:func:`validate_study`) and a
ValueError names the problem, leaving an earlier study directory untouched. A failing
*run* (a non-finite loss, a configuration its model rejects, any other exception) is
recorded with status ``"failed"``, its message and traceback, and the grid goes on.

Metrics (columns of ``results.csv``; every estimate with its standard error, every bound
called a bound):

``test_log_likelihood`` / ``_se`` / ``_data_se``
    Importance-sampled estimate of the mean test log p(x) in nats per row with
    ``num_eval_samples`` draws from the guide (the IWAE_K bound in expectation,
    :func:`inference.evaluate.log_likelihood`), its Monte Carlo standard error and its
    standard error across test rows.
``exact_test_log_likelihood``
    Exact mean test log p(x) (linear models; empty otherwise).
``test_elbo`` / ``_se``
    Held-out ELBO (a lower bound), with its Monte Carlo standard error.
``kl``, ``active_units``
    Mean KL(q(z|x) || p(z)) over test rows, and the number of latent dimensions with
    Var_x E_q[z_j | x] > 0.01 (Burda et al. 2016).
``khat_good_frac``, ``khat_ok_frac``, ``khat_bad_frac``, ``khat_median``, ``khat_max``
    Pareto k-hat of each test row's importance weights (k < 0.5 good, 0.5-0.7 usable,
    > 0.7 unreliable).
``bits_per_dim`` / ``_se``
    For binary data.
``train_time_s``, ``eval_time_s``, ``wall_time_s``, ``device``
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import hashlib
import io
import itertools
import json
import math
import os
import pathlib
import platform
import shlex
import shutil
import subprocess
import sys
import time
import traceback as _traceback
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import pyro
import torch
from tqdm.auto import tqdm

from pyro_lvm.inference._runtime import isolated_param_store, resolve_device
from pyro_lvm.paths import DEFAULT_OUT_DIR, git_checkout_root
from pyro_lvm.reports.atomic import write_atomically
from pyro_lvm.studies.datasets import SPLITS, Dataset, contaminate, load_dataset, validate_for_likelihood

__all__ = [
    "RunConfig",
    "StudyResult",
    "StudyDataError",
    "ARTIFACTS",
    "METRIC_COLUMNS",
    "expand_grid",
    "run_study",
    "execute_run",
    "validate_study",
    "build_model",
    "build_objective",
    "run_data",
    "load_results",
    "add_common_args",
    "dataset_from_args",
    "base_config_from_args",
    "study_name_from_args",
    "finish_message",
    "cli",
]

MODEL_FAMILIES = ("dlvm", "ppca", "fa")
OBJECTIVES = ("elbo", "iwae")
GRADIENTS = ("standard", "dreg", "stl")
FIT_METHODS = ("svi", "exact")

#: Metric columns of results.csv (in this order), after the config columns.
METRIC_COLUMNS = (
    "test_log_likelihood", "test_log_likelihood_se", "test_log_likelihood_data_se",
    "exact_test_log_likelihood", "test_elbo", "test_elbo_se", "kl", "active_units",
    "khat_good_frac", "khat_ok_frac", "khat_bad_frac", "khat_undetermined_frac", "khat_median",
    "khat_max", "khat_num_samples", "kl_se", "mean_ess",
    "bits_per_dim", "bits_per_dim_se", "final_train_objective", "final_valid_objective",
    "epochs_run", "num_parameters", "train_time_s", "eval_time_s", "wall_time_s",
)
STATUS_COLUMNS = ("status", "error", "device", "notes")

#: Arrays of ``artifacts.npz`` (each only when it can be computed). Image data
#: (``Dataset.image_shape`` set): ``samples``, ``originals`` and ``reconstructions`` are rows
#: of ``prod(image_shape)`` pixels in raw units (``Dataset.to_images``), otherwise rows in the
#: model's data space.
ARTIFACTS = {
    "samples": "[64, p] draws x ~ p(x) from the fitted model (model.sample)",
    "originals": "[16, p] the first test rows",
    "reconstructions": "[16, p] their reconstructions (model.reconstruct)",
    "latent_mean": "[n_test, d] posterior means E_q[z | x] of the test rows",
    "labels": "[n_test] labels of the test rows (when known)",
    "khat": "[n_test] Pareto k-hat of each test row's importance weights",
    "ess": "[n_test] effective sample size of each test row's importance weights",
    "log_px": "[n_test] per-row IS estimate of log p(x)",
    "log_px_se": "[n_test] its Monte Carlo standard error",
    "exact_log_px": "[n_test] exact log p(x) (linear models)",
    "kl_per_dim": "[d] mean over test rows of KL(q(z_j | x) || p(z_j))",
    "prior_samples": "[m, d] z ~ p(z)",
    "aggregate_posterior_samples": "[m, d] z ~ q(z | x_i), x_i a random test row",
}
NUM_SAMPLES_SHOWN = 64
NUM_RECONSTRUCTIONS = 16
NUM_LATENT_DRAWS = 1000


class StudyDataError(ValueError):
    """The study's data cannot be used by (some of) its models; nothing was run."""


# ====================================================================== configuration
@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One run of a study: what is fit, how, and with which seed (JSON-serializable).

    Attributes
    ----------
    study, dataset : str
        Filled in by :func:`run_study` (study name, ``Dataset.name``).
    model : {"dlvm", "ppca", "fa"}
        Deep latent variable model, probabilistic PCA or factor analysis.
    prior : str
        DLVM prior: "normal", "mixture", "vamp" (linear models: "normal").
    likelihood : str
        Observation model: "bernoulli", "gaussian", "studentt" (linear models: "gaussian").
    objective : {"elbo", "iwae"}
        Training objective (SVI fits).
    num_particles : int
        K: draws per data point of the objective (IWAE_K; ELBO averaged over K draws).
    gradient : {"standard", "dreg", "stl"}
        Guide-gradient estimator (DReG: IWAE only).
    latent_dim : int
    hidden : tuple of int
        Hidden layer widths of the encoder and decoder MLPs (DLVM).
    epochs, batch_size, lr : training settings (Adam).
    seed : int
        Seeds initialization, minibatch order and every Monte Carlo estimate of the run.
    num_eval_samples : int
        K of the importance-sampled test log-likelihood.
    warmup_epochs : int
        KL warm-up (beta from 0 to 1) over this many epochs; ELBO only (IWAE has no KL
        weight: ignored there, and the result says so). With a prior warm start the schedule
        runs over the epochs of both phases (it is not restarted at the switch).
    prior_warm_start_epochs : int
        0 (default): train the run's model from its random initialization. ``w > 0`` with a
        prior other than ``"normal"`` (DLVM): first fit the same DLVM with the standard normal
        prior (same architecture, likelihood, objective, seed, KL warm-up) for ``w`` epochs,
        copy its encoder, decoder and likelihood parameters (every entry of its
        ``state_dict`` except the prior's) into the run's model, whose prior keeps its own
        initialization (VampPrior: pseudo-inputs at training rows), then fit the remaining
        ``epochs - w`` epochs. ``epochs`` counts both phases; the history marks them in a
        ``phase`` column (``"warm_start"``, ``"main"``) with epochs counted on across the
        switch. This is the remedy for the VampPrior's posterior collapse from random
        weights (see :class:`models.priors.VampPrior`). Ignored, with a note, for the normal
        prior. Left out of the run id when 0, so the ids of earlier runs do not change.
    device : str
        "cpu", "cuda", "auto". Not part of the run's identity: a run done on one device is
        not redone on another.
    fit_method : {"svi", "exact"}
        "exact": closed form (PPCA) or EM (factor analysis) instead of SVI.
    extra : dict
        Further options, flattened into the results table: ``num_components`` (mixture
        prior), ``num_pseudo_inputs`` (VampPrior), ``activation``, ``analytic_kl``,
        ``clip_norm``, ``scale_floor``, ``em_tol`` (factor analysis EM),
        ``num_diagnostic_samples`` (k-hat), ``outlier_fraction`` / ``outlier_scale``
        (gross errors added to the training rows of this run, see :func:`run_data`); keys
        passed through to the model constructor go in ``model_kwargs`` (a dict).
    """

    study: str = ""
    dataset: str = ""
    model: str = "dlvm"
    prior: str = "normal"
    likelihood: str = "bernoulli"
    objective: str = "elbo"
    num_particles: int = 1
    gradient: str = "standard"
    latent_dim: int = 2
    hidden: Tuple[int, ...] = (64, 64)
    epochs: int = 10
    batch_size: int = 100
    lr: float = 1e-3
    seed: int = 0
    num_eval_samples: int = 1000
    warmup_epochs: int = 0
    prior_warm_start_epochs: int = 0
    device: str = "auto"
    fit_method: str = "svi"
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "hidden", tuple(int(h) for h in _as_tuple(self.hidden)))
        w = self.prior_warm_start_epochs
        if isinstance(w, bool) or not isinstance(w, (int, float, np.integer, np.floating)) \
                or not float(w).is_integer() or w < 0:
            raise ValueError(f"RunConfig.prior_warm_start_epochs must be a non-negative integer, "
                             f"got {w!r}")
        object.__setattr__(self, "prior_warm_start_epochs", int(w))
        object.__setattr__(self, "extra", dict(self.extra or {}))
        clash = set(self.extra) & {f.name for f in dataclasses.fields(self)}
        if clash:
            raise ValueError(f"RunConfig.extra keys {sorted(clash)} clash with config fields")
        try:
            json.dumps(self.extra)
        except TypeError as exc:
            raise ValueError(f"RunConfig.extra must be JSON-serializable: {exc}") from None

    # ------------------------------------------------------------------ identity
    def identity(self) -> Dict[str, Any]:
        """The fields that define the run's results (everything but study and device)."""
        d = self.to_dict()
        d.pop("study")
        d.pop("device")
        if d["prior_warm_start_epochs"] == 0:  # added later: keep the ids of earlier runs
            d.pop("prior_warm_start_epochs")
        return d

    @property
    def run_id(self) -> str:
        """Readable and unique: ``dlvm-vamp-iwae5-bernoulli-s0-1a2b3c4d``."""
        digest = hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:8]
        return f"{self.label()}-s{self.seed}-{digest}"

    def label(self) -> str:
        """Short readable description without the seed."""
        if self.model == "dlvm":
            obj = self.objective + (str(self.num_particles) if self.num_particles > 1 else "")
            if self.gradient != "standard":
                obj += f"-{self.gradient}"
            parts = ["dlvm", self.prior, obj, self.likelihood]
        else:
            parts = [self.model, self.fit_method]
            if self.fit_method == "svi":
                parts.append(self.objective + (str(self.num_particles) if self.num_particles > 1 else ""))
        return "-".join(_slug(p) for p in parts)

    # ------------------------------------------------------------------ (de)serialization
    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        d["extra"] = dict(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RunConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in d.items() if k in names}
        extra = dict(known.pop("extra", {}) or {})
        extra.update({k: v for k, v in d.items() if k not in names and k != "run_id"})
        return cls(**known, extra=extra)

    def to_record(self) -> Dict[str, Any]:
        """Flat form (``extra`` spread into columns, ``hidden`` as ``"64x64"``): one row of
        the config columns of ``results.csv``; also the content of ``config.json``."""
        d = self.to_dict()
        extra = d.pop("extra")
        d["hidden"] = "x".join(str(h) for h in self.hidden) if self.hidden else ""
        for k, v in extra.items():
            d[k] = json.dumps(v) if isinstance(v, (dict, list)) else v
        return d

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "RunConfig":
        d = dict(record)
        hidden = d.get("hidden", "")
        if isinstance(hidden, str):
            d["hidden"] = tuple(int(h) for h in hidden.split("x") if h)
        for k, v in list(d.items()):
            if isinstance(v, str) and v[:1] in "[{":
                try:
                    d[k] = json.loads(v)
                except ValueError:
                    pass
        return cls.from_dict(d)

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)


def _as_tuple(h) -> tuple:
    if h is None:
        return ()
    if isinstance(h, (int, np.integer)):
        return (int(h),)
    if isinstance(h, str):
        return tuple(int(v) for v in h.replace(",", "x").split("x") if v.strip())
    return tuple(h)


def _slug(s) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in str(s))


def expand_grid(base: RunConfig, *, seeds: Iterable[int] = (0,), **axes) -> List[RunConfig]:
    """Cartesian product of configuration axes (seeds innermost).

    Each axis is a list of values for the field of that name, or a list of dicts of
    field values that vary together (e.g. ``objective=[{"objective": "elbo",
    "num_particles": 1}, {"objective": "iwae", "num_particles": 5}]``). Fields not in
    RunConfig go to ``extra``.

    >>> len(expand_grid(RunConfig(), seeds=[0, 1], prior=["normal", "vamp"]))
    4
    """
    names = {f.name for f in dataclasses.fields(RunConfig)}
    out = []
    axis_values = [list(v) for v in axes.values()]
    for combo in itertools.product(*axis_values, list(seeds)):
        changes: Dict[str, Any] = {}
        for axis, value in zip(axes, combo[:-1]):
            changes.update(value if isinstance(value, Mapping) else {axis: value})
        changes["seed"] = int(combo[-1])
        extra = dict(base.extra)
        extra.update({k: v for k, v in changes.items() if k not in names})
        fields = {k: v for k, v in changes.items() if k in names}
        out.append(base.replace(**fields, extra=extra))
    return out


# ====================================================================== building blocks
def build_model(config: RunConfig, dataset: Dataset):
    """Construct the (unfitted) model of a configuration for a dataset.

    Raises ValueError for an unknown family / option (the run is then recorded as failed).
    """
    extra = dict(config.extra)
    if config.model not in MODEL_FAMILIES:
        raise ValueError(f"unknown model family {config.model!r}; use one of {MODEL_FAMILIES}")
    if config.latent_dim < 1:
        raise ValueError(f"latent_dim must be >= 1, got {config.latent_dim}")
    if config.model in ("ppca", "fa"):
        from pyro_lvm.models.linear import PPCA, FactorAnalysis

        if config.likelihood != "gaussian" or config.prior != "normal":
            raise ValueError(f"{config.model} is a linear-Gaussian model: use likelihood='gaussian' "
                             f"and prior='normal' (got {config.likelihood!r}, {config.prior!r})")
        kwargs = dict(extra.get("model_kwargs", {}))
        cls = PPCA if config.model == "ppca" else FactorAnalysis
        return cls(dataset.data_dim, config.latent_dim, **kwargs)
    from pyro_lvm.models.dlvm import DLVM

    kwargs = dict(extra.get("model_kwargs", {}))
    for key, cast in (("activation", str), ("num_components", int), ("num_pseudo_inputs", int),
                      ("scale_floor", float)):
        if key in extra:
            kwargs.setdefault(key, cast(extra[key]))
    model = DLVM(dataset.data_dim, config.latent_dim, prior=config.prior,
                 likelihood=config.likelihood, hidden=tuple(config.hidden), **kwargs)
    if hasattr(model.prior, "init_from_data") and extra.get("vamp_init", "data") == "data":
        # Tomczak & Welling (2018): pseudo-inputs started at (noisy) training rows rather than
        # at random; rows are drawn with the run's seed (set by the caller).
        model.init_from_data(dataset.train)
    return model


def build_objective(config: RunConfig):
    """The training objective of a configuration (inference.objectives)."""
    from pyro_lvm.inference.objectives import ELBO, IWAE

    if config.objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {config.objective!r}; use one of {OBJECTIVES}")
    if config.gradient not in GRADIENTS:
        raise ValueError(f"unknown gradient estimator {config.gradient!r}; use one of {GRADIENTS}")
    if config.objective == "elbo":
        return ELBO(num_particles=config.num_particles, gradient=config.gradient,
                    analytic_kl=bool(config.extra.get("analytic_kl", False)))
    return IWAE(num_particles=config.num_particles, gradient=config.gradient)


def run_data(config: RunConfig, dataset: Dataset) -> Dataset:
    """The data a run sees: the study's dataset, with the training rows contaminated by
    gross errors when ``config.extra["outlier_fraction"] > 0``
    (:func:`studies.datasets.contaminate`, rows chosen with the run's seed,
    ``outlier_scale`` standard deviations, default 10). Validation and test rows are never
    changed, so every run is judged on the same clean held-out data."""
    fraction = float(config.extra.get("outlier_fraction", 0) or 0)
    if fraction == 0:
        return dataset
    return contaminate(dataset, fraction, float(config.extra.get("outlier_scale", 10.0)),
                       seed=config.seed)


def fit_pair(model, dataset: Dataset, config: RunConfig, *, objective, callbacks, device):
    """Fit ``model`` with SVI (``inference.fit.fit``); a separate function so tests can count fits."""
    from pyro_lvm.inference.fit import fit

    valid = dataset.valid if dataset.valid.shape[0] else None
    kwargs = {}
    if "clip_norm" in config.extra:
        kwargs["clip_norm"] = float(config.extra["clip_norm"])
    return fit(model, dataset.train, objective=objective, epochs=config.epochs,
               batch_size=config.batch_size, lr=config.lr, seed=config.seed, device=device,
               validation=valid, callbacks=callbacks, mask=dataset.mask("train"),
               valid_mask=dataset.mask("valid") if valid is not None else None,
               progress=False, **kwargs)


def fit_exact(model, dataset: Dataset, config: RunConfig):
    """Closed-form PPCA / EM factor analysis on the training split (fully observed data)."""
    if dataset.masks is not None:
        raise ValueError("exact fits (fit_method='exact') need fully observed data; use SVI")
    if config.model == "ppca":
        return model.fit_closed_form(dataset.train.double())
    if config.model == "fa":
        tol = float(config.extra.get("em_tol", 1e-6))
        return model.fit_em(dataset.train.double(), tol=tol, progress=False)
    raise ValueError(f"fit_method='exact' needs a linear model (ppca, fa), not {config.model!r}")


# ====================================================================== validation
def validate_study(dataset: Dataset, configs: Sequence[RunConfig]) -> None:
    """Check the data against every model of the grid before anything runs.

    Raises :class:`StudyDataError` (a ValueError) naming the split, the rows/columns and the
    configuration when the data cannot be used. A configuration whose model cannot even be
    built is *not* a data problem: it is left to fail (and be recorded) as a run.
    """
    from pyro_lvm.models.validation import check_data

    if not isinstance(dataset, Dataset):
        raise StudyDataError(f"expected a studies.datasets.Dataset, got {type(dataset).__name__}")
    p = dataset.data_dim
    for split in SPLITS:
        x = getattr(dataset, split)
        if split != "valid" and x.shape[0] == 0:
            raise StudyDataError(f"the {split} split of {dataset.name!r} is empty")
        if x.shape[0]:
            try:
                check_data(x, p, name=f"{dataset.name} {split} split", mask=dataset.mask(split))
            except ValueError as exc:
                raise StudyDataError(str(exc)) from None
    checked = set()
    for config in configs:
        key = (config.model, config.likelihood, config.prior, config.latent_dim)
        if key in checked:
            continue
        checked.add(key)
        if config.likelihood in ("bernoulli", "gaussian", "studentt"):
            try:
                validate_for_likelihood(dataset, config.likelihood)
            except ValueError as exc:
                raise StudyDataError(f"{exc} [configuration {config.label()}]") from None
        try:
            with isolated_param_store():
                model = build_model(config, dataset)
        except Exception:  # a bad configuration, recorded when its run fails
            continue
        check = getattr(model, "check_data", None)
        if check is None:
            continue
        for split in SPLITS:
            x = getattr(dataset, split)
            if x.shape[0] == 0:
                continue
            try:
                check(x, mask=dataset.mask(split))
            except ValueError as exc:
                raise StudyDataError(
                    f"{dataset.name} {split} split cannot be modelled by {config.label()}: {exc}"
                ) from None


# ====================================================================== one run
def _atomic_write_bytes(path: pathlib.Path, data: bytes) -> None:
    write_atomically(path, data)


def _atomic_write_text(path: pathlib.Path, text: str) -> None:
    _atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (pathlib.Path, torch.device, torch.dtype)):
        return str(o)
    return repr(o)


def _clean_number(v):
    """JSON has no NaN/inf: NaN is stored as null, +-inf as the strings "inf" / "-inf"
    (``float()`` and ``pandas.to_numeric`` read them back)."""
    if isinstance(v, (float, np.floating)) and not math.isfinite(float(v)):
        return None if math.isnan(float(v)) else ("inf" if v > 0 else "-inf")
    if isinstance(v, np.generic):
        return v.item()
    return v


def _dump_json(obj) -> str:
    def clean(o):
        if isinstance(o, dict):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return _clean_number(o)

    return json.dumps(clean(obj), indent=2, sort_keys=False, default=_json_default, allow_nan=False)


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().to(torch.float64).numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def _latent_site(trace) -> Optional[str]:
    """The guide's latent site: "z" when present (our models), else the first one."""
    from pyro.poutine.util import site_is_subsample

    names = [n for n, s in trace.nodes.items()
             if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)]
    return "z" if "z" in names else (names[0] if names else None)


def _latent_draws(model, x: torch.Tensor, mask) -> Tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """One z ~ p(z) and one z ~ q(z | x_i) per row of x, read off model / guide traces (works
    for any pair keeping the contract)."""
    import pyro.poutine as poutine

    with torch.no_grad():
        g = poutine.trace(model.guide).get_trace(x, mask=mask)
        m = poutine.trace(model.model).get_trace(x, mask=mask)
    site = _latent_site(g)
    if site is None or site not in m.nodes:
        return None, None
    post = g.nodes[site]["value"].reshape(x.shape[0], -1)
    prior = m.nodes[site]["value"].reshape(x.shape[0], -1)
    return _to_numpy(prior), _to_numpy(post)


def _latent_means(model, x: torch.Tensor, mask) -> Optional[np.ndarray]:
    encode = getattr(model, "encode", None)
    with torch.no_grad():
        if callable(encode):
            try:
                loc = encode(x, mask=mask) if mask is not None else encode(x)
                loc = loc[0] if isinstance(loc, (tuple, list)) else loc
                return _to_numpy(loc).reshape(x.shape[0], -1)
            except TypeError:
                pass
        # generic: average 32 guide draws
        draws = [_latent_draws(model, x, mask)[1] for _ in range(32)]
    if draws[0] is None:
        return None
    return np.mean(draws, axis=0)


def _image_rows(dataset: Dataset, x) -> np.ndarray:
    arr = _to_numpy(x)
    if dataset.image_shape is None:
        return arr
    img = dataset.to_images(arr)
    return img.reshape(img.shape[0], -1)


def _diagnostics(model, dataset: Dataset, config: RunConfig, device) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
    """k-hat per test row and latent usage (inference.diagnostics)."""
    from pyro_lvm.inference import diagnostics

    x, mask = dataset.test, dataset.mask("test")
    metrics: Dict[str, Any] = {}
    arrays: Dict[str, np.ndarray] = {}
    # PSIS fits the largest min(K/5, 3 sqrt K) weights: below ~100 draws k-hat is unreliable,
    # above ~1000 it is no better and costs a second full importance-sampling pass.
    k = int(config.extra.get("num_diagnostic_samples", min(max(config.num_eval_samples, 100), 1000)))
    imp = diagnostics.importance_diagnostics(model, x, num_samples=k, mask=mask, device=device,
                                             seed=config.seed, progress=False)
    khat = imp.per_row["khat"].to_numpy(dtype=float)
    arrays["khat"] = khat
    arrays["ess"] = imp.per_row["ess"].to_numpy(dtype=float)
    finite = khat[np.isfinite(khat)]
    metrics.update(
        khat_good_frac=imp.fraction_good,
        khat_ok_frac=imp.fraction_ok,
        khat_bad_frac=imp.fraction_bad,
        khat_undetermined_frac=imp.fraction_undetermined,
        khat_median=float(np.median(khat)) if khat.size else math.nan,
        khat_max=float(np.max(finite)) if finite.size else math.nan,
        khat_num_samples=k,
    )
    usage = diagnostics.latent_usage(model, x, mask=mask, device=device, seed=config.seed,
                                     progress=False)
    metrics["active_units"] = usage.num_active
    arrays["kl_per_dim"] = usage.per_dim["kl"].to_numpy(dtype=float)
    metrics["kl"] = usage.kl_total
    metrics["kl_se"] = usage.kl_total_mc_se
    return metrics, arrays


def _get(obj, *names, default=KeyError):
    for name in names:
        if isinstance(obj, Mapping) and name in obj:
            return obj[name]
        if hasattr(obj, name):
            return getattr(obj, name)
    if default is KeyError:
        raise KeyError(f"none of {names} in {type(obj).__name__}")
    return default


def _history_frame(history) -> pd.DataFrame:
    if history is None:
        return pd.DataFrame(columns=["epoch", "step", "train_objective", "valid_objective", "time_s"])
    return history if isinstance(history, pd.DataFrame) else pd.DataFrame(history)


def _last_epoch_value(history: pd.DataFrame, column: str) -> Optional[float]:
    if column not in history.columns or history[column].notna().sum() == 0:
        return None
    h = history.dropna(subset=[column])
    if "epoch" in h.columns:
        h = h[h["epoch"] == h["epoch"].max()]
    return float(h[column].mean())


def execute_run(config: RunConfig, dataset: Dataset, run_dir: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Fit, evaluate and save one run into ``run_dir``; returns the ``result.json`` content.

    Never raises for a failing run (except KeyboardInterrupt / SystemExit): the failure is
    recorded with status ``"failed"``, the message and the traceback.
    """
    run_dir = pathlib.Path(run_dir)
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a partial earlier attempt (no result.json): redo from scratch
    run_dir.mkdir(parents=True)
    _atomic_write_text(run_dir / "config.json", _dump_json(config.to_record()))
    t_start = time.perf_counter()
    started = _now()
    result: Dict[str, Any] = {"run_id": config.run_id, "status": "running", "started": started,
                              "notes": []}
    history = None
    device = None
    try:
        device = resolve_device(config.device)
        dataset = run_data(config, dataset)
        result["data_sha256"] = dataset.sha256  # differs from the study's with outliers added
        result["data_source"] = dataset.source
        pyro.set_rng_seed(config.seed)  # model initialization (and VampPrior rows)
        with isolated_param_store():
            model = build_model(config, dataset)
            t0 = time.perf_counter()
            if config.fit_method == "exact":
                fit_exact(model, dataset, config)
                model = model.to(device)
                history = None
                result["objective"] = "exact (closed form)" if config.model == "ppca" else "exact (EM)"
            elif config.fit_method == "svi":
                model, history, objective, fitted = _fit_svi(model, dataset, config, device,
                                                             result["notes"])
                result["objective"] = getattr(objective, "name", config.objective)
                result["stopped_early"] = bool(getattr(fitted, "stopped_early", False))
            else:
                raise ValueError(f"unknown fit_method {config.fit_method!r}; use one of {FIT_METHODS}")
            train_time = time.perf_counter() - t0
            t1 = time.perf_counter()
            metrics, arrays = _evaluate_run(model, dataset, config, device, result["notes"])
            eval_time = time.perf_counter() - t1
            history = _history_frame(history)
            metrics["final_train_objective"] = _last_epoch_value(history, "train_objective")
            metrics["final_valid_objective"] = _last_epoch_value(history, "valid_objective")
            metrics["epochs_run"] = int(history["epoch"].nunique()) if "epoch" in history.columns else 0
            metrics["num_parameters"] = int(sum(p.numel() for p in model.parameters())) \
                if isinstance(model, torch.nn.Module) else None
            _atomic_write_text(run_dir / "history.csv", history.to_csv(index=False))
            if isinstance(model, torch.nn.Module):
                buf = io.BytesIO()
                torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
                _atomic_write_bytes(run_dir / "model.pt", buf.getvalue())
            buf = io.BytesIO()
            np.savez_compressed(buf, **arrays)
            _atomic_write_bytes(run_dir / "artifacts.npz", buf.getvalue())
        metrics.update(train_time_s=train_time, eval_time_s=eval_time,
                       wall_time_s=time.perf_counter() - t_start)
        result.update(status="ok", error=None, metrics=metrics)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # recorded; the grid goes on
        result.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                      traceback=_traceback.format_exc(),
                      metrics={"wall_time_s": time.perf_counter() - t_start})
        if history is None and isinstance(getattr(exc, "history", None), pd.DataFrame):
            history = exc.history  # NonFiniteLossError: the curve up to the divergence
        if history is not None:
            _atomic_write_text(run_dir / "history.csv", _history_frame(history).to_csv(index=False))
    result["device"] = str(device) if device is not None else config.device
    result["finished"] = _now()
    result["config"] = config.to_dict()
    text = _dump_json(result)
    _atomic_write_text(run_dir / "result.json", text)  # completion marker: last
    return json.loads(text)  # exactly what a resumed study reads back


WARM_START_PHASE, MAIN_PHASE = "warm_start", "main"


def _kl_warmup_callbacks(config: RunConfig, objective, notes: Optional[List[str]],
                         epochs_before: int = 0) -> list:
    """KL warm-up over ``config.warmup_epochs`` epochs for a fit that starts after
    ``epochs_before`` epochs of an earlier phase (the schedule goes on, it does not restart);
    ``notes`` (None: say nothing) gets a note when the objective has no KL weight."""
    if config.warmup_epochs <= epochs_before:
        return []
    if not getattr(objective, "supports_beta", False):
        if notes is not None:
            notes.append(f"warmup_epochs={config.warmup_epochs} ignored: {objective.name} has no "
                         f"KL weight to warm up")
        return []
    from pyro_lvm.inference.objectives import KLWarmup, linear_warmup

    if epochs_before == 0:
        return [KLWarmup(config.warmup_epochs)]

    class ContinuedKLWarmup(KLWarmup):
        """beta = linear_warmup(steps of the earlier phase + this fit's step)."""

        def on_fit_start(self, state) -> None:
            self._objective(state)  # fails early for an objective without a KL weight

        def on_step_start(self, state) -> None:
            objective = self._objective(state)
            steps_per_epoch = int(state.steps_per_epoch)
            objective.beta = linear_warmup(state.global_step + epochs_before * steps_per_epoch,
                                           self.epochs * steps_per_epoch)
            state.log("beta", objective.beta)

    return [ContinuedKLWarmup(config.warmup_epochs)]


def _fit_svi(model, dataset: Dataset, config: RunConfig, device, notes: List[str]):
    """SVI fit of a run, with the standard-normal warm start of ``prior_warm_start_epochs``.

    Returns ``(model, history, objective, fitted)`` (objective and FitResult of the last
    phase; history of both phases).
    """
    w = config.prior_warm_start_epochs
    if w > 0 and config.prior == "normal":
        notes.append(f"prior_warm_start_epochs={w} ignored: the prior is already the standard "
                     f"normal")
        w = 0
    if w > 0 and config.model != "dlvm":
        raise ValueError(f"prior_warm_start_epochs needs a DLVM (model='dlvm'), not "
                         f"{config.model!r}")
    if w >= config.epochs:
        raise ValueError(f"prior_warm_start_epochs={w} leaves no epoch for the {config.prior!r} "
                         f"prior: it must be smaller than epochs={config.epochs}")
    warm_history = None
    if w > 0:
        warm_config = config.replace(prior="normal", prior_warm_start_epochs=0, epochs=w)
        # seeded as the normal-prior run of this seed: phase 1 is its first w epochs
        pyro.set_rng_seed(config.seed)
        with isolated_param_store():
            warm_model = build_model(warm_config, dataset)
            warm_objective = build_objective(warm_config)
            warm_fitted = fit_pair(warm_model, dataset, warm_config, objective=warm_objective,
                                   callbacks=_kl_warmup_callbacks(warm_config, warm_objective, notes),
                                   device=device)
        warm_model = getattr(warm_fitted, "model", warm_model)
        _copy_all_but_prior(warm_model, model)
        warm_history = _history_frame(getattr(warm_fitted, "history", None)).assign(
            phase=WARM_START_PHASE)
        notes.append(f"warm start: {w} epoch(s) with the standard normal prior, then "
                     f"{config.epochs - w} with the {config.prior} prior (encoder and decoder "
                     f"carried over)")
    main_config = config.replace(epochs=config.epochs - w)
    objective = build_objective(main_config)
    # (a note that the objective has no KL weight was made in the warm start already)
    callbacks = _kl_warmup_callbacks(config, objective, notes if w == 0 else None,
                                     epochs_before=w)
    try:
        fitted = fit_pair(model, dataset, main_config, objective=objective, callbacks=callbacks,
                          device=device)
    except Exception as exc:
        partial = getattr(exc, "history", None)
        if warm_history is not None and isinstance(partial, pd.DataFrame):
            exc.history = _join_phases(warm_history, partial)
        raise
    model = getattr(fitted, "model", model)
    history = _history_frame(getattr(fitted, "history", None))
    if warm_history is not None:
        history = _join_phases(warm_history, history)
    return model, history, objective, fitted


def _join_phases(warm: pd.DataFrame, main: pd.DataFrame) -> pd.DataFrame:
    """One history: the main phase's epochs and steps counted on from the warm start's."""
    main = main.assign(phase=MAIN_PHASE)
    for column in ("epoch", "step"):
        if column in warm.columns and column in main.columns and len(warm):
            main[column] = main[column] + warm[column].max()
    if "time_s" in warm.columns and "time_s" in main.columns and len(warm):
        main["time_s"] = main["time_s"] + warm["time_s"].max()  # cumulative wall time
    return pd.concat([warm, main], ignore_index=True)


def _copy_all_but_prior(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Load every ``state_dict`` entry of ``source`` except the prior's into ``target``.

    Raises ValueError unless the two models have exactly the same non-prior entries (the
    warm start must carry over the whole encoder, decoder and likelihood, nothing else).
    """
    def non_prior(m):
        return {k: v for k, v in m.state_dict().items() if not k.startswith("prior.")}

    src, dst = non_prior(source), non_prior(target)
    if set(src) != set(dst):
        raise ValueError(f"warm start: the normal-prior model and the run's model differ in "
                         f"non-prior parameters (only in the warm start: "
                         f"{sorted(set(src) - set(dst))}, only in the run's model: "
                         f"{sorted(set(dst) - set(src))})")
    shapes = [k for k in src if src[k].shape != dst[k].shape]
    if shapes:
        raise ValueError(f"warm start: parameter shapes differ for {shapes}")
    missing, unexpected = target.load_state_dict(src, strict=False)
    assert not unexpected and all(k.startswith("prior.") for k in missing)


def _evaluate_run(model, dataset: Dataset, config: RunConfig, device, notes: List[str]):
    from pyro_lvm.inference.evaluate import elbo as heldout_elbo
    from pyro_lvm.inference.evaluate import log_likelihood

    x, mask = dataset.test, dataset.mask("test")
    K = int(config.num_eval_samples)
    ll = log_likelihood(model, x, num_samples=K, mask=mask, device=device, seed=config.seed,
                        progress=False)
    el = heldout_elbo(model, x, num_samples=min(K, 50), mask=mask, device=device,
                      seed=config.seed + 1, progress=False)
    metrics: Dict[str, Any] = {
        "test_log_likelihood": ll.mean,
        "test_log_likelihood_se": ll.mc_se,
        "test_log_likelihood_data_se": ll.data_se,
        "exact_test_log_likelihood": ll.exact_mean,
        "test_elbo": el.mean,
        "test_elbo_se": el.mc_se if np.isfinite(el.mc_se) else el.data_se,
        "mean_ess": ll.mean_ess,
        "bits_per_dim": ll.bits_per_dim,
        "bits_per_dim_se": ll.bits_per_dim_se,
    }
    per_row = ll.per_row
    arrays: Dict[str, np.ndarray] = {
        "log_px": per_row["log_px"].to_numpy(float),
        "log_px_se": per_row["se"].to_numpy(float),
    }
    if "exact_log_px" in per_row.columns:
        arrays["exact_log_px"] = per_row["exact_log_px"].to_numpy(float)
    try:
        diag_metrics, diag_arrays = _diagnostics(model, dataset, config, device)
        metrics.update(diag_metrics)
        arrays.update(diag_arrays)
    except Exception as exc:  # secondary numbers: keep the run's log-likelihood, say what broke
        notes.append(f"diagnostics (k-hat, latent usage) failed: {type(exc).__name__}: {exc}")
    arrays.update(_report_arrays(model, dataset, config, device, notes))
    return metrics, arrays


def _report_arrays(model, dataset: Dataset, config: RunConfig, device, notes) -> Dict[str, np.ndarray]:
    """Samples, reconstructions, latent means and prior / aggregate-posterior draws."""
    out: Dict[str, np.ndarray] = {}
    x_all = dataset.test.to(device)
    m_all = None if dataset.mask("test") is None else dataset.mask("test").to(device)
    was_training = getattr(model, "training", False)
    if isinstance(model, torch.nn.Module):
        model.eval()
    try:
        with isolated_param_store(), torch.no_grad():
            pyro.set_rng_seed(config.seed + 2)
            sample = getattr(model, "sample", None)
            if callable(sample):
                out["samples"] = _image_rows(dataset, sample(NUM_SAMPLES_SHOWN))
            reconstruct = getattr(model, "reconstruct", None)
            n_rec = min(NUM_RECONSTRUCTIONS, x_all.shape[0])
            if callable(reconstruct):
                xr = x_all[:n_rec]
                mr = None if m_all is None else m_all[:n_rec]
                rec = reconstruct(xr, mask=mr) if mr is not None else reconstruct(xr)
                out["originals"] = _image_rows(dataset, xr)
                out["reconstructions"] = _image_rows(dataset, rec)
            z_mean = _latent_means(model, x_all, m_all)
            if z_mean is not None:
                out["latent_mean"] = z_mean
            labels = dataset.label("test")
            if labels is not None:
                out["labels"] = np.asarray(labels)
            m = min(NUM_LATENT_DRAWS, max(x_all.shape[0], 1) * 4)
            idx = torch.randint(x_all.shape[0], (m,), device=x_all.device)
            prior_z, post_z = _latent_draws(model, x_all[idx], None if m_all is None else m_all[idx])
            if prior_z is not None:
                out["prior_samples"] = prior_z
                out["aggregate_posterior_samples"] = post_z
    except Exception as exc:  # pictures are optional; the metrics are not
        notes.append(f"report arrays incomplete: {type(exc).__name__}: {exc}")
    finally:
        if isinstance(model, torch.nn.Module) and was_training:
            model.train()
    return out


# ====================================================================== the study
@dataclasses.dataclass
class StudyResult:
    """What :func:`run_study` did.

    Attributes
    ----------
    study_dir : pathlib.Path
    results : pandas.DataFrame
        The results table (also in ``results.csv``).
    report : pathlib.Path or None
        The HTML report, when rendered.
    executed, skipped, failed : list of str
        Run ids run now, found finished on disk, and failed (now or before).
    """

    study_dir: pathlib.Path
    results: pd.DataFrame
    report: Optional[pathlib.Path]
    executed: List[str]
    skipped: List[str]
    failed: List[str]
    findings: List[str] = dataclasses.field(default_factory=list)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def _versions() -> Dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("pyro-lvm", "torch", "pyro-ppl", "numpy", "scipy", "pandas", "scikit-learn",
                 "arviz", "matplotlib", "seaborn", "jinja2"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    out["platform"] = platform.platform()
    return out


def _git_commit() -> Optional[str]:
    """The commit of the checkout this code runs from; None for an installed copy."""
    root = git_checkout_root()
    if root is None:
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _device_info(configs: Sequence[RunConfig]) -> str:
    requested = sorted({c.device for c in configs}) or ["auto"]
    parts = []
    for r in requested:
        try:
            d = resolve_device(r)
        except ValueError as exc:
            parts.append(f"{r}: unavailable ({exc})")
            continue
        desc = str(d)
        if d.type == "cuda":
            desc += f" ({torch.cuda.get_device_name(d)})"
        else:
            desc += f" ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        parts.append(desc if r == str(d) else f"{r} -> {desc}")
    return "; ".join(parts)


def _grid_summary(configs: Sequence[RunConfig]) -> Dict[str, List[Any]]:
    """Values of every config column that varies over the grid (plus seeds)."""
    records = [c.to_record() for c in configs]
    keys = list(dict.fromkeys(k for r in records for k in r))
    grid = {}
    for k in keys:
        if k in ("study", "dataset"):
            continue
        values = list(dict.fromkeys(json.dumps(r.get(k), default=str) for r in records))
        if len(values) > 1 or k in ("seed", "num_eval_samples"):
            grid[k] = [json.loads(v) for v in values]
    return grid


def _result_row(config: RunConfig, result: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    row: Dict[str, Any] = {"run_id": config.run_id}
    row.update(config.to_record())
    metrics = (result or {}).get("metrics") or {}
    row["status"] = (result or {}).get("status", "pending")
    row["error"] = (result or {}).get("error")
    row["device"] = (result or {}).get("device", config.device)
    row["notes"] = "; ".join((result or {}).get("notes") or []) or None
    for m in METRIC_COLUMNS:
        row[m] = metrics.get(m)
    return row


def _results_frame(configs: Sequence[RunConfig], results: Mapping[str, Mapping]) -> pd.DataFrame:
    rows = [_result_row(c, results.get(c.run_id)) for c in configs]
    frame = pd.DataFrame(rows)
    for m in METRIC_COLUMNS:
        frame[m] = pd.to_numeric(frame[m], errors="coerce").astype("float64")
    return frame


def load_results(study_dir: Union[str, os.PathLike]) -> pd.DataFrame:
    """Read ``results.csv`` of a study directory."""
    path = pathlib.Path(study_dir) / "results.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; run the study first")
    return pd.read_csv(path)


def _read_result(run_dir: pathlib.Path) -> Optional[Dict[str, Any]]:
    path = run_dir / "result.json"
    if not path.exists():
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None  # unreadable: redo the run


def run_study(
    name: str,
    dataset: Union[Dataset, Any],
    configs: Sequence[RunConfig],
    *,
    out_dir: Union[str, os.PathLike] = DEFAULT_OUT_DIR,
    fresh: bool = False,
    progress: bool = True,
    render: bool = True,
    command_line: Optional[str] = None,
    title: Optional[str] = None,
    description: Optional[str] = None,
    retry_failed: bool = False,
    on_run_end: Optional[Callable[[RunConfig, Dict[str, Any]], None]] = None,
    metadata: Optional[Mapping[str, Any]] = None,
    num_threads: Optional[int] = None,
    findings: Optional[Callable[[pd.DataFrame], List[str]]] = None,
) -> StudyResult:
    """Run (or resume) a study and render its report.

    Parameters
    ----------
    name : str
        Study name; the study lives in ``<out_dir>/<name>``.
    dataset : Dataset or anything :func:`studies.datasets.load_dataset` accepts
    configs : sequence of RunConfig
        The grid (see :func:`expand_grid`); ``study`` and ``dataset`` fields are filled in.
    out_dir : path
    fresh : bool
        Delete earlier runs of this study first (after the data passed validation).
    progress : bool
        A progress bar over the runs.
    render : bool
        Render ``index.html`` with :func:`reports.render_report` at the end.
    command_line, title, description : str, optional
        Recorded in ``study.json`` for the report.
    retry_failed : bool
        Re-run runs recorded as failed (by default they are kept, like finished ones).
    on_run_end : callable, optional
        ``on_run_end(config, result)`` after each executed run (after it is saved).
    metadata : mapping, optional
        More entries for ``study.json`` (e.g. the primary factor of the comparison).
    findings : callable, optional
        ``findings(results) -> list of str``: study-specific conclusions computed from the
        results table after the runs, stored in ``study.json`` (``"findings"``) for the
        report and printed by the scripts.
    num_threads : int, optional
        CPU threads for torch during the study (restored afterwards). Small models train
        fastest on one thread, and one thread per process avoids the oversubscription that
        slows a shared machine down many times over; None leaves torch's setting alone.

    Returns
    -------
    StudyResult

    Raises
    ------
    StudyDataError
        The data cannot be used (before anything is run or written).
    ValueError
        Duplicate runs in the grid, an invalid name, or a study directory holding runs on
        different data (pass ``fresh=True`` or another ``out_dir``).
    """
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise ValueError(f"invalid study name {name!r}")
    if not isinstance(dataset, Dataset):
        try:
            dataset = load_dataset(dataset)
        except (ValueError, FileNotFoundError) as exc:
            raise StudyDataError(str(exc)) from None
    if not configs:
        raise ValueError("the study has no configurations to run")
    configs = [c.replace(study=name, dataset=dataset.name) for c in configs]
    ids = [c.run_id for c in configs]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"the grid lists the same run more than once: {dup}")
    # 1. everything that can be wrong with the data (and the machine), before anything is touched
    for device in sorted({c.device for c in configs}):
        resolve_device(device)  # ValueError: CUDA requested on a machine without it
    validate_study(dataset, configs)
    study_dir = pathlib.Path(out_dir) / name
    meta_path = study_dir / "study.json"
    runs_dir = study_dir / "runs"
    if not fresh and meta_path.exists():
        try:
            old = json.loads(meta_path.read_text(encoding="utf-8"))
            old_sha = (old.get("dataset") or {}).get("sha256")
        except (OSError, ValueError):
            old_sha = None
        if old_sha and old_sha != dataset.sha256 and runs_dir.exists() and any(runs_dir.iterdir()):
            raise ValueError(
                f"{study_dir} holds runs on different data (SHA-256 {old_sha[:12]}..., now "
                f"{dataset.sha256[:12]}... for {dataset.name}); pass fresh=True (--fresh) to replace "
                f"them or use another out_dir (--out-dir) to keep both"
            )
    # 2. the study directory
    if fresh and study_dir.exists():
        shutil.rmtree(runs_dir, ignore_errors=True)
        for f in ("results.csv", "study.json"):
            (study_dir / f).unlink(missing_ok=True)
    runs_dir.mkdir(parents=True, exist_ok=True)
    meta: Dict[str, Any] = {
        "name": name,
        "title": title or name,
        "description": description,
        "command_line": command_line if command_line is not None else
        " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable)] + sys.argv),
        "dataset": {**dataset.summary(), "shape": [sum(dataset.sizes.values()), dataset.data_dim]},
        "grid": _grid_summary(configs),
        "seeds": sorted({c.seed for c in configs}),
        "num_runs": len(configs),
        "config_columns": list(configs[0].to_record()),
        "metric_columns": list(METRIC_COLUMNS),
        "status_columns": list(STATUS_COLUMNS),
        "artifacts": ARTIFACTS,
        "versions": _versions(),
        "git_commit": _git_commit(),
        "device": _device_info(configs),
        "started": _now(),
        "finished": None,
        "status": "running",
    }
    meta.update(dict(metadata or {}))
    _atomic_write_text(meta_path, _dump_json(meta))

    results: Dict[str, Dict[str, Any]] = {}
    executed, skipped = [], []
    todo = []
    for c in configs:
        r = _read_result(runs_dir / c.run_id)
        if r is not None and not (retry_failed and r.get("status") == "failed"):
            results[c.run_id] = r
            skipped.append(c.run_id)
        else:
            todo.append(c)

    def save_table():
        frame = _results_frame(configs, results)
        _atomic_write_text(study_dir / "results.csv", frame.to_csv(index=False))
        return frame

    save_table()
    status = "interrupted"
    bar = tqdm(todo, desc=name, unit="run", disable=not progress, leave=True)
    threads_before = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(int(num_threads))
    meta["num_threads"] = torch.get_num_threads()
    try:
        for c in bar:
            bar.set_postfix_str(c.run_id, refresh=True)
            result = execute_run(c, dataset, runs_dir / c.run_id)
            results[c.run_id] = result
            executed.append(c.run_id)
            save_table()
            if result["status"] != "ok" and progress:
                tqdm.write(f"run {c.run_id} failed: {result['error']}", file=sys.stderr)
            if on_run_end is not None:
                on_run_end(c, result)
        status = "finished"
    finally:
        torch.set_num_threads(threads_before)
        bar.close()
        frame = save_table()
        meta.update(finished=_now(), status=status,
                    num_executed=len(executed), num_skipped=len(skipped))
        _atomic_write_text(meta_path, _dump_json(meta))
        if status != "finished":
            print(f"study {name} interrupted after {len(executed)} new run(s); re-run the same "
                  f"command to resume ({study_dir})", file=sys.stderr)
    if findings is not None:
        try:
            meta["findings"] = [str(line) for line in findings(frame)]
        except Exception as exc:  # a summary must not cost the runs
            meta["findings"] = [f"(the study's summary could not be computed: "
                                f"{type(exc).__name__}: {exc})"]
        _atomic_write_text(meta_path, _dump_json(meta))
    report = None
    if render:
        report = render_study(study_dir)
    failed = [c.run_id for c in configs if results.get(c.run_id, {}).get("status") == "failed"]
    return StudyResult(study_dir=study_dir, results=frame, report=report, executed=executed,
                       skipped=skipped, failed=failed, findings=list(meta.get("findings") or []))


def render_study(study_dir: Union[str, os.PathLike]) -> pathlib.Path:
    """Render the HTML report of a study directory and return its path."""
    from pyro_lvm.reports import render_report
    return pathlib.Path(render_report(study_dir))


# ====================================================================== command line
def add_common_args(parser: argparse.ArgumentParser, **defaults) -> argparse.ArgumentParser:
    """Flags shared by every study script; ``defaults`` override the built-in defaults."""
    d = dict(dataset="digits", latent_dim=2, hidden="64x64", epochs=10, batch_size=100, lr=1e-3,
             num_particles=5, num_eval_samples=1000, seeds=[0, 1, 2], device="cpu",
             out_dir=DEFAULT_OUT_DIR, warmup_epochs=0)
    d.update(defaults)
    g = parser.add_argument_group("common study options")
    g.add_argument("--dataset", default=d["dataset"],
                   help="'digits' (bundled with scikit-learn), 'binarized-mnist', or a CSV/.npy path "
                        "(default: ./%(default)s, relative to the current directory)")
    g.add_argument("--data-path", default=None,
                   help="file or directory holding binarized_mnist.npz (or the .amat files); "
                        "default: $PYRO_LVM_DATA, then ../shared/data next to the repository")
    g.add_argument("--max-rows", type=int, default=None,
                   help="use at most this many rows per split (quick runs)")
    g.add_argument("--latent-dim", type=int, default=d["latent_dim"], help="latent dimension d (default: ./%(default)s, relative to the current directory)")
    g.add_argument("--hidden", default=d["hidden"],
                   help="hidden layer widths of encoder and decoder, e.g. 200x200 (default: ./%(default)s, relative to the current directory)")
    g.add_argument("--epochs", type=int, default=d["epochs"], help="training epochs (default: ./%(default)s, relative to the current directory)")
    g.add_argument("--batch-size", type=int, default=d["batch_size"], help="minibatch size (default: ./%(default)s, relative to the current directory)")
    g.add_argument("--lr", type=float, default=d["lr"], help="Adam learning rate (default: ./%(default)s, relative to the current directory)")
    g.add_argument("--num-particles", "-K", type=int, default=d["num_particles"],
                   help="K of the IWAE objective (default: ./%(default)s, relative to the current directory)")
    g.add_argument("--warmup-epochs", type=int, default=d["warmup_epochs"],
                   help="KL warm-up epochs for the ELBO (default: ./%(default)s, relative to the current directory)")
    g.add_argument("--num-eval-samples", type=int, default=d["num_eval_samples"],
                   help="importance samples per test row for the log-likelihood estimate (default: ./%(default)s, relative to the current directory)")
    g.add_argument("--seeds", type=int, nargs="+", default=d["seeds"],
                   help="seeds (replicates) of every configuration (default: ./%(default)s, relative to the current directory)")
    g.add_argument("--device", choices=["cpu", "cuda", "auto"], default=d["device"],
                   help="where to train and evaluate (default: ./%(default)s, relative to the current directory)")
    g.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; small models are fastest on 1 (0: torch's default; "
                        "default: ./%(default)s, relative to the current directory)")
    g.add_argument("--out-dir", default=d["out_dir"],
                   help="studies are written to OUT_DIR/<study> (default: ./%(default)s, relative to the current directory)")
    g.add_argument("--smoke", action="store_true",
                   help="a tiny version of the study that runs in seconds (written to <study>-smoke)")
    g.add_argument("--fresh", action="store_true", help="delete earlier runs of this study first")
    g.add_argument("--retry-failed", action="store_true", help="re-run runs that failed before")
    g.add_argument("--no-report", action="store_true", help="do not render the HTML report")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def parse_hidden(text) -> Tuple[int, ...]:
    try:
        hidden = _as_tuple(text)
    except ValueError:
        raise ValueError(f"--hidden must look like 64x64 or 200,200; got {text!r}") from None
    if any(h < 1 for h in hidden):
        raise ValueError(f"--hidden widths must be positive, got {text!r}")
    return hidden


SMOKE_SETTINGS = dict(latent_dim=2, hidden=(16,), epochs=2, batch_size=64, num_eval_samples=20,
                      seeds=[0], max_rows=300)


def apply_smoke(args: argparse.Namespace) -> argparse.Namespace:
    """Shrink a study to seconds (``--smoke``): tiny network, 2 epochs, 1 seed, few rows."""
    if not getattr(args, "smoke", False):
        return args
    args = argparse.Namespace(**vars(args))
    for k, v in SMOKE_SETTINGS.items():
        if k == "max_rows" and args.max_rows is not None:
            continue
        setattr(args, k, v)
    args.num_particles = min(args.num_particles, 3)
    args.warmup_epochs = min(args.warmup_epochs, 1)
    args.hidden = "x".join(map(str, SMOKE_SETTINGS["hidden"]))
    return args


def study_name_from_args(name: str, args: argparse.Namespace, dataset: Optional[Dataset] = None,
                         default_dataset: Optional[str] = None) -> str:
    """The study directory name: ``<name>``, ``<name>-<dataset>`` when the study runs on
    other data than its default (so a benchmark run never collides with the default one),
    and ``-smoke`` for smoke runs (which never overwrite a real study)."""
    out = name
    if dataset is not None and default_dataset is not None and dataset.name != default_dataset:
        out += f"-{_slug(dataset.name)}"
    return f"{out}-smoke" if getattr(args, "smoke", False) else out


def dataset_from_args(args: argparse.Namespace, *, binarize: bool = False,
                      likelihood: Optional[str] = None, **kwargs) -> Dataset:
    """Load ``--dataset`` (with ``--data-path``, ``--max-rows``), validated for ``likelihood``.

    ``binarize`` applies to digits and user data (binarized MNIST is binary already).
    Raises before any training when the data are missing or unusable.
    """
    if args.dataset == "binarized-mnist":
        binarize = False
    return load_dataset(args.dataset, binarize=binarize, likelihood=likelihood,
                        data_path=args.data_path, max_rows=args.max_rows, **kwargs)


def base_config_from_args(args: argparse.Namespace, **fields) -> RunConfig:
    """A RunConfig with the common flags filled in (``fields`` override)."""
    base = dict(latent_dim=args.latent_dim, hidden=parse_hidden(args.hidden), epochs=args.epochs,
                batch_size=args.batch_size, lr=args.lr, num_eval_samples=args.num_eval_samples,
                warmup_epochs=args.warmup_epochs, device=args.device)
    base.update(fields)
    return RunConfig(**base)


def run_from_args(name: str, args: argparse.Namespace, dataset: Dataset, configs: Sequence[RunConfig],
                  *, title: str, description: str, metadata: Optional[Mapping] = None,
                  default_dataset: Optional[str] = None,
                  findings: Optional[Callable[[pd.DataFrame], List[str]]] = None) -> StudyResult:
    """:func:`run_study` with the common flags (used by every study script)."""
    study = study_name_from_args(name, args, dataset, default_dataset)
    return run_study(study, dataset, configs, out_dir=args.out_dir,
                     fresh=args.fresh, progress=not args.no_progress, render=not args.no_report,
                     title=title + (" (smoke test)" if args.smoke else ""), description=description,
                     retry_failed=args.retry_failed, metadata=metadata,
                     num_threads=args.threads or None, findings=findings,
                     command_line=" ".join(shlex.quote(a) for a in ["python"] + sys.argv))


def finish_message(result: StudyResult) -> str:
    """The lines a study script prints at the end (where the report is)."""
    n = len(result.results)
    ok = int((result.results["status"] == "ok").sum())
    lines = [*result.findings,
             f"{ok} of {n} runs ok ({len(result.executed)} run now, {len(result.skipped)} "
             f"found finished on disk, {len(result.failed)} failed)",
             f"results: {result.study_dir / 'results.csv'}"]
    if result.report is not None:
        lines.append(f"report:  {result.report.resolve()}")
    else:
        lines.append("report:  (not rendered)")
    return "\n".join(lines)


def cli(main: Callable[[argparse.Namespace], Any], parse_args: Callable[[], argparse.Namespace]) -> None:
    """Entry point of a study script: problems found before training (bad or missing data,
    a study directory holding other data, CUDA unavailable) are printed as one message
    naming the problem (exit status 2), Ctrl-C exits with status 130 after saying how to
    resume; runs finished before the interruption are kept on disk."""
    args = parse_args()
    try:
        main(args)
    except KeyboardInterrupt:
        print("interrupted: finished runs are saved; run the same command again to resume",
              file=sys.stderr)
        raise SystemExit(130) from None
    except (StudyDataError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
