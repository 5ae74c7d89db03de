"""What every model family in :mod:`pyro_lvm.models` shares."""
from __future__ import annotations

import itertools

__all__ = ["unique_module_name"]

_instance_counter = itertools.count()


def unique_module_name(cls_name: str) -> str:
    """A process-unique Pyro name prefix for a top-level model instance.

    ``PyroModule`` mirrors its parameters into Pyro's global parameter store under
    ``<name>.<attribute>``. With the default empty name, two instances of the same class would
    look each other's tensors up by the same key, so gradients and values leak between models
    that are used outside an isolated store. A unique prefix per instance keeps them apart even
    then (fits and evaluations additionally run in their own store).
    """
    return f"{cls_name}_{next(_instance_counter)}"
