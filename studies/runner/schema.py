"""The run schema: what one run of a study is (:class:`RunConfig`), its identity (run id and
configuration hash), and grids of runs (:func:`expand_grid`)."""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from typing import Any, Dict, Iterable, List, Mapping, Tuple

import numpy as np

__all__ = ["RunConfig", "StudyDataError", "expand_grid", "OBJECTIVES", "GRADIENTS", "FIT_METHODS",
           "METRIC_COLUMNS", "STATUS_COLUMNS", "RESULT_SCHEMA_VERSION", "slug"]

OBJECTIVES = ("elbo", "iwae")
GRADIENTS = ("standard", "dreg", "stl")
FIT_METHODS = ("svi", "exact")
#: Version of the layout of ``result.json``; a result of another version is recomputed.
RESULT_SCHEMA_VERSION = 1

#: Metric columns of results.csv (in this order), after the config columns.
METRIC_COLUMNS = (
    "test_log_likelihood", "test_log_likelihood_se", "test_log_likelihood_data_se",
    "exact_test_log_likelihood", "test_elbo", "test_elbo_se", "kl", "active_units",
    "khat_good_frac", "khat_ok_frac", "khat_bad_frac", "khat_undetermined_frac", "khat_median",
    "khat_max", "khat_num_samples", "khat_unreliable_frac", "test_log_likelihood_psis",
    "kl_se", "mean_ess",
    "bits_per_dim", "bits_per_dim_se", "final_train_objective", "final_valid_objective",
    "epochs_run", "num_parameters", "train_time_s", "eval_time_s", "wall_time_s",
)
STATUS_COLUMNS = ("status", "error", "device", "notes")


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
    model : str
        A model family registered in :mod:`pyro_lvm.studies.runner.families`: built in,
        "dlvm" (deep latent variable model), "ppca" (probabilistic PCA), "fa" (factor
        analysis).
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
    def config_hash(self) -> str:
        """SHA-256 (hex) of :meth:`identity`: recorded in ``result.json`` and checked on resume."""
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()

    @property
    def run_id(self) -> str:
        """Readable and unique: ``dlvm-vamp-iwae5-bernoulli-s0-1a2b3c4d``."""
        return f"{self.label()}-s{self.seed}-{self.config_hash[:8]}"

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
        return "-".join(slug(p) for p in parts)

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


def slug(s) -> str:
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


