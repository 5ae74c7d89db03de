"""Model families of a study: how a run's configuration becomes a model/guide pair.

A *family* is a name (the ``model`` field of :class:`~pyro_lvm.studies.runner.RunConfig`)
mapped to a :class:`Family`: a builder ``build(config, dataset) -> pair`` returning anything
:func:`pyro_lvm.fit` accepts (an object with ``model`` and ``guide`` methods, such as
:class:`pyro_lvm.models.dlvm.DLVM`), optionally an exact fitter and an evaluation hook.
To add a family to every study (a Poisson PCA, a count DLVM, a user's own pair)::

    from pyro_lvm.studies.runner import families

    def build_poisson_pca(config, dataset):
        return PoissonPCA(dataset.data_dim, config.latent_dim)

    families.register_family(families.Family("poisson-pca", build_poisson_pca))

and put ``model="poisson-pca"`` in the grid (:func:`~pyro_lvm.studies.runner.expand_grid`).
``evaluate(model, dataset, config, device) -> (metrics, arrays)`` adds family-specific
metrics (columns of ``results.csv`` after the standard ones) and arrays (``artifacts.npz``)
to every run of the family, after the standard evaluation.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple

from pyro_lvm.studies.datasets import Dataset
from pyro_lvm.studies.runner.schema import GRADIENTS, OBJECTIVES, RunConfig

__all__ = ["Family", "register_family", "get_family", "family_names", "build_model",
           "build_objective"]

Builder = Callable[[RunConfig, Dataset], Any]
ExactFitter = Callable[[Any, Dataset, RunConfig], Any]
EvaluationHook = Callable[[Any, Dataset, RunConfig, Any], Tuple[Dict[str, Any], Dict[str, Any]]]
PretrainHook = Callable[..., Tuple[Any, str]]


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family of the study grid.

    Attributes
    ----------
    name : str
        The value of ``RunConfig.model`` that selects it.
    build : callable
        ``build(config, dataset) -> pair``: the unfitted pair (raise ValueError for an option
        the family does not support; the run is then recorded as failed).
    fit_exact : callable, optional
        ``fit_exact(pair, dataset, config)``: the fit of ``fit_method="exact"`` (closed form,
        EM); None when the family has none.
    evaluate : callable, optional
        ``evaluate(pair, dataset, config, device) -> (metrics, arrays)``: extra metrics and
        arrays of a fitted run.
    pretrain : callable, optional
        ``pretrain(pair, dataset, config, device, progress) -> (history, note)``: a phase run
        before the SVI fit of ``fit_method="svi"`` (e.g. the VaDE pre-training and mixture
        start of ``cluster-dlvm``); its history joins the run's as phase ``"pretrain"`` and
        its time counts as training time; ``note`` goes into the run's notes.
    """

    name: str
    build: Builder
    fit_exact: Optional[ExactFitter] = None
    evaluate: Optional[EvaluationHook] = None
    pretrain: Optional[PretrainHook] = None


_FAMILIES: Dict[str, Family] = {}


def register_family(family: Family, *, replace: bool = False) -> Family:
    """Add ``family`` to the registry (``replace=True`` to redefine a registered name)."""
    if not isinstance(family, Family):
        raise TypeError(f"register_family expects a Family, got {type(family).__name__}")
    if family.name in _FAMILIES and not replace:
        raise ValueError(f"model family {family.name!r} is registered already; pass "
                         f"replace=True to redefine it")
    _FAMILIES[family.name] = family
    return family


def family_names() -> Tuple[str, ...]:
    return tuple(_FAMILIES)


def get_family(name: str) -> Family:
    """The registered family ``name``; ValueError naming the known ones otherwise."""
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; use one of {family_names()}") from None


def build_model(config: RunConfig, dataset: Dataset):
    """Construct the (unfitted) pair of a configuration for a dataset.

    Raises ValueError for an unknown family / option (the run is then recorded as failed).
    """
    family = get_family(config.model)
    if config.latent_dim < 1:
        raise ValueError(f"latent_dim must be >= 1, got {config.latent_dim}")
    return family.build(config, dataset)


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


# ---------------------------------------------------------------------- built-in families
def _build_linear(config: RunConfig, dataset: Dataset):
    from pyro_lvm.models.linear import PPCA, FactorAnalysis

    if config.likelihood != "gaussian" or config.prior != "normal":
        raise ValueError(f"{config.model} is a linear-Gaussian model: use likelihood='gaussian' "
                         f"and prior='normal' (got {config.likelihood!r}, {config.prior!r})")
    kwargs = dict(config.extra.get("model_kwargs", {}))
    cls = PPCA if config.model == "ppca" else FactorAnalysis
    return cls(dataset.data_dim, config.latent_dim, **kwargs)


def _fit_ppca_exact(model, dataset: Dataset, config: RunConfig):
    """Closed-form maximum-likelihood PPCA (Tipping & Bishop 1999) on the training split."""
    return model.fit_closed_form(dataset.train.double())


def _fit_fa_exact(model, dataset: Dataset, config: RunConfig):
    """EM factor analysis (Rubin & Thayer 1982) on the training split."""
    tol = float(config.extra.get("em_tol", 1e-6))
    return model.fit_em(dataset.train.double(), tol=tol, progress=False)


def _build_dlvm(config: RunConfig, dataset: Dataset):
    from pyro_lvm.models.dlvm import DLVM

    extra = dict(config.extra)
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


register_family(Family("dlvm", _build_dlvm))
register_family(Family("ppca", _build_linear, fit_exact=_fit_ppca_exact))
register_family(Family("fa", _build_linear, fit_exact=_fit_fa_exact))
