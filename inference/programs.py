"""Direct runs of a pair declared as programs (:class:`pyro_lvm.models.ProgramPair`).

A ``ProgramPair``'s ``model`` and ``guide`` run their program inside the data plate with
``pyro.sample``; every statement then passes through Pyro's handler stack (the plates, the
objective's recorder and particle plate), which is most of what a training step spends
outside the pair's own tensor operations (``benchmarks/README.md``, section 1). A direct run
gives the program a ``sample`` that does, at each site, what those handlers do:

* broadcast the distribution to the plates' batch shape, the data plate on dim -1 and, with
  particles, the particle plate on dim -2 (the rule of Pyro's ``BroadcastMessenger``, its
  shape error included);
* draw the value by calling the distribution (``rsample`` where it has one, as Pyro's default
  does), or take the observation, or, in the model, the guide's value of a latent site of the
  same name (as ``poutine.replay`` does);
* record the site in a :class:`pyro.poutine.Trace`, with the fields a Pyro trace has (the
  plates' frames in ``cond_indep_stack``, scale 1, no mask).

The densities are then computed from that trace by the same code as from a Pyro trace, with the
distributions the program built: the same numbers, draws and random-number stream as the Pyro
run, so nothing downstream (objectives, analytic KL, evaluation) knows which run made the
trace. :func:`pyro_lvm.check_contract` runs both and refuses a pair for which they differ by
more than rounding.

A direct run happens only where nothing could tell the difference: when no Pyro handler is
active around the objective (a user's ``poutine.scale`` or ``trace``, Pyro's ``SVI``), and for
the derived ``model`` / ``guide`` themselves (a subclass overriding one is run through Pyro).
A ``pyro.sample``, ``pyro.plate``, ``pyro.factor`` or ``pyro.deterministic`` statement issued
during a direct run (inside the program, or by a ``PyroSample`` attribute) would bypass the
recording; a sentinel handler refuses it with :class:`ProgramError` instead of returning an
unrecorded draw.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import pyro.poutine as poutine
import torch
from pyro.distributions.torch_distribution import TorchDistributionMixin
from pyro.poutine.indep_messenger import CondIndepStackFrame
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample

__all__ = ["ProgramError", "declared_program", "record_program", "plate_frame",
           "PROGRAM_ATTRIBUTE"]

#: The contract's data plate (``pyro_lvm.inference.importance_weights.DATA_PLATE``, which
#: imports this module; ``pyro_lvm.models.program.DATA_PLATE``, which the derived pairs enter).
DATA_PLATE = "data"
#: The attribute that marks a ``ProgramPair``'s derived ``model`` / ``guide`` functions
#: (``pyro_lvm.models.program.PROGRAM_ATTRIBUTE``).
PROGRAM_ATTRIBUTE = "pyro_lvm_program"


class ProgramError(RuntimeError):
    """A ``ProgramPair`` program issued a Pyro statement that a direct run cannot record."""


def declared_program(fn: Callable) -> Optional[Tuple[str, object]]:
    """``(program name, pair)`` when ``fn`` is the ``model`` or ``guide`` a ``ProgramPair``
    derives from its program (a bound method carrying :data:`PROGRAM_ATTRIBUTE`); None
    otherwise."""
    function = getattr(fn, "__func__", None)
    marker = getattr(function, PROGRAM_ATTRIBUTE, None)
    if not (isinstance(marker, tuple) and len(marker) == 2 and marker[1] is function):
        return None  # not derived, or a wrapper that copied the derived function's attributes
    return marker[0], fn.__self__


def plate_frame(plate) -> CondIndepStackFrame:
    """The frame a vectorized ``pyro.plate`` adds to each site inside it."""
    return CondIndepStackFrame(name=plate.name, dim=plate.dim, size=plate.subsample_size,
                               counter=plate.counter, full_size=plate.size)


def _broadcast(fn, frames: Tuple[CondIndepStackFrame, ...], name: str):
    """``fn`` expanded to the plates' batch shape: Pyro's ``BroadcastMessenger`` rule."""
    if not isinstance(fn, TorchDistributionMixin):
        return fn
    actual = fn.batch_shape
    target: List[Optional[int]] = [None if size == 1 else size for size in actual]
    for frame in frames:
        target = [None] * (-frame.dim - len(target)) + target
        if target[frame.dim] is not None and target[frame.dim] != frame.size:
            raise ValueError(f"Shape mismatch inside plate('{frame.name}') at site {name} dim "
                             f"{frame.dim}, {frame.size} vs {target[frame.dim]}")
        target[frame.dim] = frame.size
    for i in range(-len(target) + 1, 1):
        if target[i] is None:
            target[i] = actual[i] if len(actual) >= -i else 1
    expanded = fn.expand(target)
    if expanded.has_rsample != fn.has_rsample:
        expanded.has_rsample = fn.has_rsample
    return expanded


class _DirectSites:
    """The ``sample(name, fn, obs=None)`` of a direct run (module docstring)."""

    __slots__ = ("trace", "replay", "frames")

    def __init__(self, frames, replay: Optional[poutine.Trace]):
        self.trace = poutine.Trace()
        self.replay, self.frames = replay, frames

    def __call__(self, name: str, fn, *args, obs: Optional[torch.Tensor] = None, **kwargs):
        if args or kwargs:
            raise ProgramError(
                f"site {name!r}: a ProgramPair program's sample takes (name, fn, obs=None), got "
                f"{'positional arguments' if args else ', '.join(sorted(kwargs))} as well; a "
                f"site with infer=... (e.g. enumeration) or obs_mask needs a plain Pyro pair")
        fn = _broadcast(fn, self.frames, name)
        infer = {}
        if obs is not None:
            value = obs
        else:
            site = None if self.replay is None else self.replay.nodes.get(name)
            if site is None:
                value = fn()
            elif site["type"] != "sample" or site["is_observed"]:
                raise RuntimeError(f"site {name} must be sampled in trace")
            else:
                value, infer = site["value"], site["infer"]
        self.trace.add_node(name, type="sample", name=name, fn=fn, is_observed=obs is not None,
                            args=(), kwargs={}, value=value, infer=infer, scale=1.0, mask=None,
                            cond_indep_stack=self.frames, done=True, stop=False,
                            continuation=None)
        return value


class _RefuseStatements(Messenger):
    """Refuses the sample statements (``pyro.sample``, ``pyro.plate``'s subsample) that a
    direct run would not record; parameter statements pass to the store as usual."""

    def _pyro_sample(self, msg) -> None:
        raise ProgramError(
            f"{_statement(msg)} ({msg['name']!r}) was issued while a ProgramPair's program ran "
            f"directly, where it would not be recorded: declare every site through the "
            f"program's `sample` argument (the data plate is entered for it), read no "
            f"PyroSample attribute, or write the pair as plain Pyro model/guide functions")


def _statement(msg) -> str:
    """Which Pyro statement sent a sample message."""
    if isinstance(msg["fn"], _Subsample):
        return "a pyro.plate"
    if msg["infer"].get("_deterministic"):
        return "a pyro.deterministic statement"
    if msg["is_observed"] and type(msg["fn"]).__name__ == "Unit":
        return "a pyro.factor statement"
    return "a pyro.sample statement (or a PyroSample attribute)"


def record_program(program_name: str, pair, x: torch.Tensor, mask: Optional[torch.Tensor],
                   replay: Optional[poutine.Trace],
                   particle_frame: Optional[CondIndepStackFrame]) -> poutine.Trace:
    """Run the pair's program ``program_name`` directly (module docstring; through the pair's
    ``run_program``, as its derived function does) and return its sites as a Pyro trace;
    ``particle_frame`` is the particle plate's frame (None: no particle plate)."""
    data_frame = CondIndepStackFrame(name=DATA_PLATE, dim=-1, size=x.shape[0], counter=0,
                                     full_size=x.shape[0])
    frames = (data_frame,) if particle_frame is None else (particle_frame, data_frame)
    sites = _DirectSites(frames, replay)
    with _RefuseStatements():
        pair.run_program(program_name, x, mask, sites)
    return sites.trace
