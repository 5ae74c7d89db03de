"""A model/guide pair written once, as two programs over the data plate's sites.

A Pyro pair keeping the project's contract has every sample site inside one
``pyro.plate("data", N, dim=-1)``. :class:`ProgramPair` lets a pair say so by construction:
it writes ``model_program(x, mask, sample)`` and ``guide_program(x, mask, sample)`` (or
``(x, sample)`` for a pair that takes no mask: it then refuses data with missing entries),
which declare their sites through the ``sample(name, fn, obs=None)`` they are given, and
inherits
``model`` and ``guide``: each enters the pair's Pyro module context (for a ``PyroModule``)
and ``pyro.plate("data", x.shape[0], dim=-1)``, then runs its program with
``pyro.sample``. So ``model`` and ``guide`` are ordinary Pyro functions, and everything that
takes a Pyro pair (``pyro.infer.SVI``, ``poutine.trace``, :func:`pyro_lvm.fit`) takes them
(Pyro's ``SVI`` trains the parameters it sees: a ``PyroModule``'s, or those registered with
``pyro.module`` / ``pyro.param`` in the programs).

What the declaration adds: pyro-lvm's engine may run the programs *directly*, with a
``sample`` that does what the data plate, a particle plate and the trace do at each site
(broadcast the distribution to the plates' batch shape, as Pyro's ``BroadcastMessenger``
does; draw it, or replay the guide's value in the model; record the site) and none of
Pyro's per-statement handler stack (:mod:`pyro_lvm.inference.programs`). The distributions
are the ones the programs build, so the densities, draws and random numbers are those of the
Pyro run, and :func:`pyro_lvm.check_contract` verifies that both runs agree.

A program must declare every random choice through ``sample`` (a ``pyro.sample``,
``pyro.plate``, ``pyro.factor`` or ``pyro.deterministic`` statement inside it, or a
``PyroSample`` attribute it reads, is refused by the direct run), and ``sample`` takes no ``infer`` argument: a pair with enumerated discrete
latents is written as a plain Pyro pair. A subclass that overrides ``model`` or ``guide``
itself is run through Pyro as any other pair.

Example
-------
.. code-block:: python

    class MyVAE(ProgramPair, torch.nn.Module):
        def guide_program(self, x, mask, sample):
            loc, scale = self.encoder(x)
            return sample("z", dist.Normal(loc, scale).to_event(1))

        def model_program(self, x, mask, sample):
            z = sample("z", dist.Normal(torch.zeros(d), 1.0).to_event(1))
            sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Callable, Optional

import pyro
import torch

__all__ = ["ProgramPair", "PROGRAM_ATTRIBUTE", "DATA_PLATE", "mask_use"]

#: The contract's data plate (``pyro_lvm.inference.importance_weights.DATA_PLATE``).
DATA_PLATE = "data"
#: Set on the derived ``model`` / ``guide`` functions: ``(name of the program it runs, the
#: function)``.
PROGRAM_ATTRIBUTE = "pyro_lvm_program"


def _module_context(pair):
    """The Pyro context a ``PyroModule``'s methods run in (``pyro_method``); none otherwise."""
    context = getattr(pair, "__dict__", {}).get("_pyro_context")
    return contextlib.nullcontext() if context is None else context


@functools.lru_cache(maxsize=None)
def _takes_mask(program) -> bool:
    """Whether a program (a function, ``self`` first) is written ``(self, x, mask, sample)``
    rather than ``(self, x, sample)``."""
    parameters = inspect.signature(program).parameters.values()
    if any(p.kind is p.VAR_POSITIONAL for p in parameters):  # a wrapper: the documented form
        return True
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) not in (3, 4):
        raise TypeError(f"{program.__qualname__} must take (self, x, mask, sample) or (self, x, "
                        f"sample), got ({', '.join(p.name for p in positional)})")
    return len(positional) == 4


def mask_use(program_name: str) -> str:
    """What a program does with ``mask`` (for the messages that ask for one)."""
    if program_name == "guide_program":
        return "use only the observed entries (e.g. encode x with the missing ones set to 0)"
    return ("score only the observed entries, e.g. sample('x', dist.Normal(loc, scale)"
            ".mask(mask).to_event(1), obs=x)")


def _derived(name: str, program_name: str, doc: str) -> Callable:
    def run(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None):
        with pyro.plate(DATA_PLATE, x.shape[0], dim=-1):
            return self.run_program(program_name, x, mask, pyro.sample)

    run.__name__, run.__qualname__, run.__doc__ = name, f"ProgramPair.{name}", doc
    # (program, the function itself): a wrapper made with functools.wraps copies the
    # attribute but is not the function it names, so it is not taken for the derived one
    setattr(run, PROGRAM_ATTRIBUTE, (program_name, run))
    return run


class ProgramPair:
    """Mixin for a pair declared as two programs (module docstring). Subclasses implement
    :meth:`model_program` and :meth:`guide_program`; ``model`` and ``guide`` are derived."""

    def model_program(self, x: torch.Tensor, mask: Optional[torch.Tensor],
                      sample: Callable) -> object:
        """The model's sites, each through ``sample(name, fn, obs=None)`` (returns the value),
        for the rows ``x`` (and ``mask``, True = observed; a program written ``(self, x,
        sample)`` takes none). Runs inside the data plate."""
        raise NotImplementedError

    def guide_program(self, x: torch.Tensor, mask: Optional[torch.Tensor],
                      sample: Callable) -> object:
        """The guide's latent sites, each through ``sample(name, fn)``. Runs inside the data
        plate."""
        raise NotImplementedError

    def program_takes_mask(self, program_name: str) -> bool:
        """Whether the program ``program_name`` is written with a ``mask`` argument."""
        program = getattr(type(self), program_name)
        return _takes_mask(getattr(program, "__func__", program))

    def run_program(self, program_name: str, x: torch.Tensor, mask: Optional[torch.Tensor],
                    sample: Callable) -> object:
        """Run one program, in the pair's Pyro module context (for a ``PyroModule``, what
        ``pyro_method`` enters), with the ``sample`` given (the derived functions pass
        ``pyro.sample``, the engine its direct recorder). A program written without ``mask``
        is called without it, and refuses data with missing entries, which it would score as
        observed."""
        program = getattr(self, program_name)
        with _module_context(self):
            if self.program_takes_mask(program_name):
                return program(x, mask, sample)
            if mask is not None and not bool(torch.as_tensor(mask).all()):
                missing = int((~torch.as_tensor(mask).bool()).sum())
                raise ValueError(
                    f"the data have {missing} missing value(s) (mask has False entries) but "
                    f"{type(self).__name__}.{program_name} takes no mask: write it "
                    f"{program_name}(self, x, mask, sample) and {mask_use(program_name)}")
            return program(x, sample)

    model = _derived("model", "model_program",
                     "The Pyro model: :meth:`model_program` inside ``pyro.plate('data', "
                     "len(x), dim=-1)`` with ``pyro.sample``.")
    guide = _derived("guide", "guide_program",
                     "The Pyro guide: :meth:`guide_program` inside ``pyro.plate('data', "
                     "len(x), dim=-1)`` with ``pyro.sample``.")
