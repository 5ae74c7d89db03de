"""A user's own model/guide pairs in a study: ``--model MODULE:FACTORY`` and
``run_study(..., models={"name": factory})``.

A *factory* is any callable returning a pair (anything :func:`pyro_lvm.fit` accepts: an
object with ``model`` and ``guide`` methods, a ``(model, guide)`` tuple of functions). It is
called with ``data_dim`` and the study's options ``latent_dim``, ``hidden`` and
``likelihood`` as keyword arguments, each only when the factory takes it (or takes
``**kwargs``), so ``def make_pair(data_dim): ...`` is a factory too. Each factory becomes a
model family (:mod:`pyro_lvm.studies.runner.families`) under its name.

On the command line ``MODULE`` is imported from the current directory first (a user's
``mypairs.py`` next to where the study is run), then from the installed packages.
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any, Callable, Dict, List, Mapping, Sequence

from pyro_lvm.studies.runner import families
from pyro_lvm.studies.runner.schema import RunConfig

__all__ = ["FACTORY_OPTIONS", "TRAINING_SETTINGS", "load_factory", "register_models",
           "user_configs", "optional_methods"]

#: The keyword arguments a factory may take (data_dim and the study's options).
FACTORY_OPTIONS = ("data_dim", "latent_dim", "hidden", "likelihood")

#: Optional methods of a pair that unlock report sections, and what each shows.
OPTIONAL_METHODS = {
    "sample": "samples (sample(n) -> [n, p] draws x ~ p(x))",
    "reconstruct": "reconstructions (reconstruct(x) -> x's reconstruction)",
    "encode": "the latent space (encode(x) -> posterior means E_q[z | x])",
    "log_marginal": "the exact log-likelihood (log_marginal(x) -> exact log p(x_i) per row)",
}


def load_factory(spec: str) -> Callable:
    """The factory named by ``MODULE:FACTORY`` (``MODULE`` importable from the current
    directory or the installed packages; ``FACTORY`` a callable in it, dots for nested
    attributes). ValueError naming the flag's value and the problem otherwise."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ValueError(f"--model {spec!r}: expected MODULE:FACTORY, e.g. mypairs:make_pair "
                         f"(mypairs.py in the current directory defining make_pair)")
    module_name, attr = spec.split(":")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        # a study script run as a file drops its own folder, not the current directory: put
        # the current directory first, as `python -m` does, so a user's mypairs.py is found
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"--model {spec!r}: cannot import module {module_name!r} from the "
                         f"current directory {cwd} or the installed packages ({exc})") from None
    factory: Any = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise ValueError(f"--model {spec!r}: module {module_name!r} "
                             f"({getattr(module, '__file__', '?')}) has no {attr!r}")
    if not callable(factory):
        raise ValueError(f"--model {spec!r}: {attr!r} is a {type(factory).__name__}, not a "
                         f"callable returning a model/guide pair")
    return factory


def _factory_kwargs(factory: Callable, values: Mapping[str, Any]) -> Dict[str, Any]:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return dict(values)
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return dict(values)
    return {k: v for k, v in values.items() if k in params}


def _builder(name: str, factory: Callable):
    from pyro_lvm.inference.engine import resolve_pair

    def build(config: RunConfig, dataset):
        values = dict(data_dim=int(dataset.data_dim), latent_dim=int(config.latent_dim),
                      hidden=tuple(config.hidden), likelihood=config.likelihood)
        pair = factory(**_factory_kwargs(factory, values))
        try:
            resolve_pair(pair)
        except TypeError as exc:
            raise ValueError(f"model {name!r}: the factory returned {type(pair).__name__}, "
                             f"not a model/guide pair ({exc})") from None
        return pair

    return build


#: The column of ``results.csv`` naming, for a user's run, the configuration settings its
#: pair does not use (the report marks them in its table of shared settings)
UNUSED_SETTINGS_COLUMN = "settings_not_used"

#: Settings of the built-in models a user's pair never receives
_BUILT_IN_SETTINGS = ("prior", "prior_warm_start_epochs")


def unused_settings(factory: Callable, config: RunConfig) -> List[str]:
    """The settings of ``config`` a user's pair built by ``factory`` does not use: the
    built-in models' own (the prior, its warm start, the options in ``extra`` such as
    ``num_components``) and the factory options (:data:`FACTORY_OPTIONS`) its signature does
    not take."""
    taken = _factory_kwargs(factory, {k: None for k in FACTORY_OPTIONS})
    return (list(_BUILT_IN_SETTINGS) + [k for k in FACTORY_OPTIONS[1:] if k not in taken]
            + sorted(config.extra))


def _unused_settings_hook(factory: Callable):
    def evaluate(pair, dataset, config, device):
        return {UNUSED_SETTINGS_COLUMN: ",".join(unused_settings(factory, config))}, {}

    return evaluate


def register_models(models: Mapping[str, Callable]) -> List[str]:
    """Register each ``name -> factory`` as a model family (replacing an earlier
    registration of the same user name); returns the names."""
    names = []
    for name, factory in dict(models or {}).items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"models: names must be non-empty strings, got {name!r}")
        if not callable(factory):
            raise ValueError(f"models[{name!r}] must be a callable returning a pair, got "
                             f"{type(factory).__name__}")
        builtin = name in ("dlvm", "ppca", "fa")
        if builtin:
            raise ValueError(f"models: {name!r} is a built-in family; give your pair another name")
        families.register_family(families.Family(name, _builder(name, factory),
                                                 evaluate=_unused_settings_hook(factory)),
                                 replace=True)
        names.append(name)
    return names


#: Run settings that apply to any pair: a user's runs take every combination of them the
#: study's grid has (with the factory options, :data:`FACTORY_OPTIONS`, its signature takes).
TRAINING_SETTINGS = ("objective", "num_particles", "gradient", "epochs", "batch_size", "lr",
                     "warmup_epochs", "num_eval_samples")


def user_configs(base: RunConfig, names: Sequence[str], seeds: Sequence[int], *,
                 grid: Sequence[RunConfig] = (),
                 factories: Mapping[str, Callable] = None) -> List[RunConfig]:
    """One SVI run per user model, seed and distinct combination, among the configurations
    of ``grid``, of the settings that apply to any pair: the training settings
    (:data:`TRAINING_SETTINGS`: objective, K, gradient estimator, epochs, batch size,
    learning rate, KL warm-up, evaluation draws) and those of the factory options
    ``latent_dim``, ``hidden``, ``likelihood`` that the model's factory (``factories[name]``)
    takes. So the objectives study compares every objective on the user's pair too, while
    the priors study, whose grid varies only the built-in prior, gives it one run per seed.
    Settings of the built-in models (the prior, the model family, a prior warm start) are
    not carried over; without ``grid`` every run has ``base``'s settings."""
    runs = []
    for name in names:
        factory = (factories or {}).get(name)
        taken = (list(_factory_kwargs(factory, {k: None for k in FACTORY_OPTIONS[1:]}))
                 if factory is not None else [])
        fields = list(TRAINING_SETTINGS) + taken
        combinations = []
        for config in (list(grid) or [base]):
            combination = {field: getattr(config, field) for field in fields}
            if combination not in combinations:
                combinations.append(combination)
        runs.extend(base.replace(model=name, seed=int(seed), fit_method="svi",
                                 prior_warm_start_epochs=0, **combination)
                    for combination in combinations for seed in seeds)
    return runs


def optional_methods(pair) -> Dict[str, bool]:
    """Which optional methods (:data:`OPTIONAL_METHODS`) the pair has."""
    return {name: callable(getattr(pair, name, None)) for name in OPTIONAL_METHODS}
