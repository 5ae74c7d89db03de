"""Training steps of a ``PyroModule`` pair without its per-call parameter statements.

A ``PyroModule`` announces its parameters on every attribute access made while one of its
methods runs: a ``pyro.param`` statement per ``nn.Parameter`` and a ``pyro.module`` statement
(a walk over all of the child's parameters, one more ``pyro.param`` each) per plain
``nn.Module`` child. Each statement is a message through Pyro's handler stack. Their purpose
is to let handlers see the parameters (``SVI`` and :func:`pyro_lvm.fit` collect what to train
with ``poutine.trace(param_only=True)``) and to keep the module and the parameter store in
sync; neither changes the value a model reads when every parameter of the tree is a plain
``nn.Parameter``: PyroModule returns its own tensor and discards the statement's answer, and
``pyro.module`` leaves the child's tensors in place.

So during ``fit``'s training steps with a pyro-lvm objective (Pyro's own ELBOs look for
``param`` sites: ``RenyiELBO.loss_and_grads`` takes no gradient step without one), once the
parameters have been collected and when no handler is active outside fit's own,
:func:`silent_param_statements` runs the pair with its modules' Pyro context switched off: the same tensors, the same sample sites and densities,
none of the parameter messages. It does nothing (the statements are issued as usual) for a
tree holding a ``PyroParam`` (its constrained value is read through the store) or a
``PyroSample`` (its sample statement needs the context) or a sub-PyroModule not yet reached,
for an outer handler, with Pyro's ``module_local_params`` setting, and for a pair that is not
a ``PyroModule``.
"""
from __future__ import annotations

from typing import List, Optional

import pyro
import torch
from pyro.nn import PyroModule
from pyro.poutine.runtime import _PYRO_STACK

__all__ = ["silenceable_modules", "silent_param_statements"]


class _SilentContext:
    """Stands in for a PyroModule's ``_pyro_context`` (``pyro.nn.module._Context``): never
    active, so attribute access returns the module's own tensors without statements."""

    active = 0
    used = True

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        return None

    def get(self, name: str) -> None:
        return None

    def set(self, name: str, value: torch.Tensor) -> None:
        return None


_SILENT = _SilentContext()


def silenceable_modules(module: Optional[torch.nn.Module]) -> Optional[List[PyroModule]]:
    """The PyroModules of ``module``'s tree when its parameter statements can be skipped: every
    PyroModule has a Pyro context and no ``PyroParam`` or ``PyroSample``, and every sub-PyroModule
    already has its Pyro name (one that has none would take the switched-off context as its
    own the first time it is reached, so the tree is left alone); None otherwise."""
    if not isinstance(module, PyroModule):
        return None
    modules = [m for m in module.modules() if isinstance(m, PyroModule)]
    for m in modules:
        state = m.__dict__
        if ("_pyro_context" not in state or state.get("_pyro_params")
                or state.get("_pyro_samples") or (m is not module and not state.get("_pyro_name"))):
            return None
    return modules


class silent_param_statements:
    """Context manager: run the block with the Pyro context of ``modules`` (from
    :func:`silenceable_modules`) switched off, unless a Pyro handler is active (then nothing
    changes). A class rather than a generator: it is entered on every training step."""

    __slots__ = ("modules", "known", "saved", "depth")

    def __init__(self, modules: Optional[List[PyroModule]]):
        self.modules = modules or []
        self.known = {id(m) for m in self.modules}
        self.saved: Optional[list] = None
        self.depth = 0  # a nested entry of the same object changes nothing

    def __enter__(self) -> None:
        self.depth += 1
        # module-local parameters (a Pyro setting) read the context's own parameter state
        if (self.depth > 1 or not self.modules or _PYRO_STACK
                or pyro.settings.get("module_local_params")):
            return
        self.saved = [m.__dict__["_pyro_context"] for m in self.modules]
        for m in self.modules:
            m.__dict__["_pyro_context"] = _SILENT

    def __exit__(self, *exc) -> None:
        self.depth -= 1
        if self.depth > 0:
            return
        saved, self.saved = self.saved, None
        if saved is None:
            return
        for m, context in zip(self.modules, saved):
            m.__dict__["_pyro_context"] = context
        # A sub-PyroModule attached during the block took its parent's context, the stand-in
        # (PyroModule hands a parent's context down only to PyroModule children): it gets the
        # tree's own (modules[0] is the root, first in .modules()).
        if any(isinstance(child, PyroModule) and id(child) not in self.known
               for m in self.modules for child in m._modules.values()):
            for m in self.modules[0].modules():
                if m.__dict__.get("_pyro_context") is _SILENT:
                    m.__dict__["_pyro_context"] = saved[0]
