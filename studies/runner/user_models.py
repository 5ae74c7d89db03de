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

__all__ = ["FACTORY_OPTIONS", "load_factory", "register_models", "user_configs",
           "optional_methods"]

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
        families.register_family(families.Family(name, _builder(name, factory)), replace=True)
        names.append(name)
    return names


def user_configs(base: RunConfig, names: Sequence[str], seeds: Sequence[int]) -> List[RunConfig]:
    """One SVI run per user model and seed, with the base configuration's options."""
    return [base.replace(model=name, seed=int(seed), fit_method="svi",
                         prior_warm_start_epochs=0)
            for name in names for seed in seeds]


def optional_methods(pair) -> Dict[str, bool]:
    """Which optional methods (:data:`OPTIONAL_METHODS`) the pair has."""
    return {name: callable(getattr(pair, name, None)) for name in OPTIONAL_METHODS}
