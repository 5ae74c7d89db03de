"""The engine: the one place every entry point (:func:`~pyro_lvm.inference.fit`,
:func:`~pyro_lvm.inference.log_likelihood`, :func:`~pyro_lvm.inference.elbo`,
:func:`~pyro_lvm.inference.diagnose` and each diagnostic) goes through to

* resolve a pair (:func:`resolve_pair`) and a device (:func:`resolve_device`);
* validate data before any work (:func:`prepare_data`: NaN/inf with row and column, width,
  numeric, the pair's own ``check_data``);
* place the pair on a device and **restore it afterwards** (:func:`session`): evaluation
  never leaves a module somewhere else, in another mode or with another parameter store than
  it found it (``fit`` is the one entry point that keeps the module where it trained it);
* activate parameters (:func:`isolated_param_store`; a plain-function pair is evaluated on a
  snapshot of its ``pyro.param`` values, or on ``param_state``);
* plan chunks with **one** element budget (:func:`default_max_elements`,
  :func:`plan_chunks`): ``particles x rows x width`` elements per vectorized pass, where the
  width per draw comes from a one-row probe (:func:`draw_width`);
* stream log importance weights chunk by chunk (:func:`stream_log_weights`,
  :class:`StreamingImportanceStats`) from :func:`pyro_lvm.inference.importance_weights.log_weights`.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import inspect
import math
import numbers
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Optional, Tuple, Union

import numpy as np
import pyro
import torch
from pyro.poutine.util import site_is_subsample

from pyro_lvm.inference import pairs
from pyro_lvm.inference.importance_weights import log_weights, trace_log_terms
from pyro_lvm.models import check_data, check_mask

__all__ = [
    "resolve_device", "resolve_pair", "isolated_param_store", "release_host_memory",
    "keep_freed_memory", "USER_ALLOCATOR_ENV", "KEEP_FREED_MEMORY_ENV",
    "check_int", "module_dtype", "module_device", "prepare_data", "Session", "session",
    "DEFAULT_MAX_ELEMENTS", "default_max_elements", "plan_chunks", "distribution_eval_width",
    "pair_eval_width", "draw_width", "stream_log_weights", "log_weight_matrix",
    "StreamingImportanceStats",
]

#: The one chunk budget: elements per [particles, rows, width] tensor of a vectorized pass.
#: 2**25 float32 elements are 128 MiB per full-size tensor; a Bernoulli decoder keeps a few
#: such tensors alive at once, so one chunk needs well under 1 GiB.
DEFAULT_MAX_ELEMENTS = 2 ** 25

#: Largest default budget on a GPU (2**30 float32 elements = 4 GiB per full-size tensor).
_MAX_GPU_ELEMENTS = 2 ** 30


# ------------------------------------------------------------------------------ runtime
_GLIBC = None

#: glibc's ``mallopt`` parameters (``malloc.h``)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: glibc's dynamic policy raises the mmap threshold up to this value (its
#: ``DEFAULT_MMAP_THRESHOLD_MAX`` on a 64-bit system; the trim threshold to twice it) as
#: large blocks are freed; before glibc 2.35 it was also the largest value ``mallopt`` accepted
_DYNAMIC_MMAP_THRESHOLD_MAX = 32 * 2 ** 20
#: what ``fit`` asks for: blocks below 1 GiB come from the heap and the top of the heap is
#: kept up to 1 GiB free
_FIT_THRESHOLD = 2 ** 30
#: environment variables by which a user sets glibc's thresholds; any of them turns
#: :func:`keep_freed_memory` off, so that the user's own settings stay in force
USER_ALLOCATOR_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_",
                       "MALLOC_TOP_PAD_")
#: set to 0 to leave glibc's allocator as it is during ``fit``
KEEP_FREED_MEMORY_ENV = "PYRO_LVM_KEEP_FREED_MEMORY"
_keep_lock = threading.Lock()
_keep_depth = 0  # blocks of keep_freed_memory open in this process
_keep_applied = False  # whether the outermost one set the thresholds


def _libc_names():
    yield "libc.so.6"
    yield ctypes.util.find_library("c")


def _glibc():
    """The C library when it is glibc (``mallopt``, ``malloc_trim``), else None."""
    global _GLIBC
    if _GLIBC is None:
        _GLIBC = False
        # the usual name first: find_library runs ldconfig
        for name in _libc_names():
            try:
                libc = ctypes.CDLL(name)
                libc.gnu_get_libc_version  # only glibc has it (not musl, macOS or Windows)
                libc.malloc_trim.argtypes = [ctypes.c_size_t]
                libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
                _GLIBC = libc
                break
            except (OSError, AttributeError, TypeError):  # TypeError: no library found
                continue
    return _GLIBC or None


def release_host_memory() -> None:
    """Hand freed C-heap memory back to the operating system (glibc ``malloc_trim(0)``; a no-op
    elsewhere).

    Long CPU evaluations allocate and free the same large chunk tensors thousands of times;
    glibc keeps some of the freed blocks (those under its mmap threshold, which it raises to
    32 MiB after the first frees) in a heap that fragments, so the resident size crept from
    0.8 to 3.8 GiB over the 1,250 chunks of a 10,000 x 5,000 MNIST evaluation although the
    live tensors stayed the same. Trimming after each chunk (about 0.05 ms) keeps it flat.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _keeping_wanted() -> bool:
    if os.environ.get(KEEP_FREED_MEMORY_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if any(name in os.environ for name in USER_ALLOCATOR_ENV):
        return False
    return "glibc.malloc." not in os.environ.get("GLIBC_TUNABLES", "")


def _keep(libc) -> bool:
    """Set the thresholds for keeping freed memory; whether glibc took them."""
    mmap_ok = (libc.mallopt(_M_MMAP_THRESHOLD, _FIT_THRESHOLD)
               # glibc before 2.35 refuses more than its dynamic maximum
               or libc.mallopt(_M_MMAP_THRESHOLD, _DYNAMIC_MMAP_THRESHOLD_MAX))
    return bool(libc.mallopt(_M_TRIM_THRESHOLD, _FIT_THRESHOLD)) and bool(mmap_ok)


def _release(libc) -> None:
    """Give the kept memory back; leave the thresholds where glibc's dynamic policy ends."""
    libc.mallopt(_M_MMAP_THRESHOLD, _DYNAMIC_MMAP_THRESHOLD_MAX)
    libc.mallopt(_M_TRIM_THRESHOLD, 2 * _DYNAMIC_MMAP_THRESHOLD_MAX)
    libc.malloc_trim(0)


def _reset_in_forked_child() -> None:
    # a process forked inside a fit does not run that fit's exit: give the memory policy back
    # (and a new lock: another thread of the parent may have held it at the fork)
    global _keep_depth, _keep_applied, _keep_lock
    if _keep_applied and _GLIBC:
        _release(_GLIBC)
    _keep_depth, _keep_applied, _keep_lock = 0, False, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_in_forked_child)


@contextlib.contextmanager
def keep_freed_memory(enabled: bool = True) -> Iterator[bool]:
    """While inside, glibc keeps freed memory for reuse instead of handing it back to the
    operating system; yields whether it does. :func:`~pyro_lvm.inference.fit` trains inside
    it on the CPU.

    A training step allocates and frees the same multi-MB tensors every time (at ``K = 50``
    particles of a 784-pixel batch of 100, each full-size tensor is 15.7 MB). With glibc's
    default policy the memory freed at the end of a step is often returned to the system (the
    heap top beyond the trim threshold, and blocks over the mmap threshold), and the next step
    pays one page fault per 4 KiB page to get it back (``benchmarks/README.md``, section 1,
    measures what that costs). Inside, blocks under 1 GiB come from the heap (glibc 2.35 and
    later; before it, under 32 MiB, the largest mmap threshold it accepted) and up to 1 GiB
    of free memory at the top of the heap is kept, so those blocks stay in the process and are
    reused.

    On leaving the outermost block the freed memory is returned (``malloc_trim``) and the
    thresholds are set to where glibc's own dynamic policy takes them once a 32 MiB block
    has been freed: 32 MiB for mmap, 64 MiB for trimming. **They stay so after the block**:
    setting a threshold ends glibc's dynamic policy, which cannot be restored, and thresholds
    the program set earlier with ``mallopt`` are overwritten.

    A no-op (yields False) when ``enabled`` is false, without glibc (macOS, Windows, musl),
    when the environment variable ``PYRO_LVM_KEEP_FREED_MEMORY`` is ``0``, and when the user
    sets glibc's thresholds (``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_``,
    ``MALLOC_MMAP_MAX_``, ``MALLOC_TOP_PAD_`` or ``glibc.malloc.*`` in ``GLIBC_TUNABLES``):
    their settings win. With another allocator preloaded (jemalloc, tcmalloc) glibc's settings
    have no effect. Nested and concurrent blocks (threads) set the thresholds once, for the
    outermost; a process forked inside a block starts with glibc's settings as the block
    leaves them.
    """
    global _keep_depth, _keep_applied
    libc = _glibc() if enabled and _keeping_wanted() else None
    if libc is None:
        yield False
        return
    entered = False
    try:
        with _keep_lock:
            if _keep_depth == 0:
                _keep_applied = _keep(libc)
            _keep_depth += 1
            entered, applied = True, _keep_applied
        yield applied
    finally:
        if entered:
            with _keep_lock:
                _keep_depth -= 1
                if _keep_depth == 0:
                    _release(libc)
                    _keep_applied = False


def resolve_device(device: Union[str, torch.device, None] = "auto") -> torch.device:
    """Map ``"auto" | "cpu" | "cuda" | "cuda:N" | torch.device | None`` to a torch.device.

    ``"auto"`` (or None) picks CUDA when available, else CPU. Asking for CUDA on a machine
    without it raises a ValueError rather than failing later inside a kernel.
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={str(device)!r} was requested but CUDA is not available on this machine; "
            f"use device='cpu' or device='auto'"
        )
    return dev


@contextlib.contextmanager
def isolated_param_store(state=None) -> Iterator[dict]:
    """Run a block with its own Pyro parameter store.

    ``pyro.module``/``PyroModule`` look parameters up by name in the global store, so two
    models with the same parameter names would silently share (or overwrite) tensors.
    Every fit and evaluation runs inside this context; the global store is restored after.
    Yields the scoped store's state dict (it keeps any ``pyro.param`` created inside).

    Pyro's own alternative, ``pyro.settings.set(module_local_params=True)``, is not used: it is
    a process-wide switch (it would change how a user's other PyroModules behave), modules
    must be built under the same setting they are used with, and with it Pyro's own
    ``SVI`` fails on PyroModule parameters (``'Parameter' object has no attribute
    'unconstrained'``, seen with tests/test_dlvm.py), so a scoped store per fit (plus a unique
    name per model instance, :func:`pyro_lvm.models.base.unique_module_name`) is kept.
    """
    with pyro.get_param_store().scope(state) as scoped_state:
        yield scoped_state


def resolve_pair(pair, guide=None):
    """Normalize the ways a model/guide pair can be given.

    Accepts an object with ``.model`` and ``.guide`` methods (the usual ``PyroModule``),
    a ``(model_fn, guide_fn)`` tuple, a model callable plus ``guide=``, or the
    :class:`~pyro_lvm.inference.training.FitResult` of any of these. A model or guide without a
    ``mask`` argument is returned wrapped to be callable as ``fn(x, mask=None)``
    (:func:`pyro_lvm.inference.pairs.mask_optional`).

    Returns
    -------
    (model_fn, guide_fn, module)
        ``module`` is the ``torch.nn.Module`` that owns the parameters (moved by ``.to``):
        the pair, or the owner of bound ``model``/``guide`` methods; None for plain functions.
    """
    pair, guide = pairs.unwrap_fit_result(pair, guide)
    if guide is not None:
        model_fn = pair.model if hasattr(pair, "model") and callable(pair.model) else pair
        return _adapted(pair, model_fn, guide)
    if isinstance(pair, tuple) and len(pair) == 2 and all(callable(f) for f in pair):
        return _adapted(pair, pair[0], pair[1])
    if callable(getattr(pair, "model", None)) and callable(getattr(pair, "guide", None)):
        return _adapted(pair, pair.model, pair.guide)
    raise TypeError(
        f"expected a model/guide pair: an object with .model(x, mask=None) and .guide(x, mask=None) "
        f"methods, a (model, guide) tuple, or a model with guide=...; got {type(pair).__name__}"
    )


def _adapted(pair, model_fn, guide_fn):
    module = pairs.owning_module(pair, model_fn, guide_fn)
    return pairs.mask_optional(model_fn, "model"), pairs.mask_optional(guide_fn, "guide"), module


def check_int(value, name: str, minimum: int = 1) -> int:
    """``value`` as an int, refusing booleans, non-integers and values below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


# ------------------------------------------------------------------------------ data
def module_dtype(module: Optional[torch.nn.Module]) -> Optional[torch.dtype]:
    """The floating dtype of a module's first floating parameter or buffer (None: no module)."""
    for tensor in _module_tensors(module):
        if tensor.is_floating_point():
            return tensor.dtype
    return None


def module_device(module: Optional[torch.nn.Module]) -> Optional[torch.device]:
    """The device of a module's first parameter or buffer (None: no module or no tensor)."""
    for tensor in _module_tensors(module):
        return tensor.device
    return None


def _module_tensors(module) -> Iterator[torch.Tensor]:
    if module is None:
        return iter(())
    return iter(list(module.parameters()) + list(module.buffers()))


def prepare_data(pair, data, mask=None, *, name: str = "data", dtype=None, min_rows: int = 1,
                 data_dim: Optional[int] = None, module: Optional[torch.nn.Module] = None
                 ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Validate ``data`` (and ``mask``) before any work: :func:`pyro_lvm.models.check_data`
    (NaN/inf with row and column, numeric, the width ``pair.data_dim`` or ``data_dim``;
    integer arrays other than 0/1 only when the pair, or the ``module`` owning it
    (:func:`resolve_pair`), says ``accepts_integer_data = True``), then the pair's own
    ``check_data(x, mask=None[, name=])`` when it has one. Returns CPU tensors, ``x`` in
    ``dtype`` (default: the data's own floating dtype)."""
    if data_dim is None:
        declared = getattr(pair, "data_dim", None)
        data_dim = int(declared) if isinstance(declared, numbers.Integral) else None
    x = check_data(data, data_dim, name=name, min_rows=min_rows, mask=mask, dtype=dtype,
                   integer_values=any(bool(getattr(owner, "accepts_integer_data", False))
                                      for owner in (pair, module)))
    mask_t = None
    if mask is not None:
        mask_t = torch.as_tensor(check_mask(mask, tuple(x.shape), name=name))
    own_check = getattr(pair, "check_data", None)
    if callable(own_check):
        try:
            accepts_name = "name" in inspect.signature(own_check).parameters
        except (TypeError, ValueError):
            accepts_name = False
        checked = (own_check(x, mask=mask_t, name=name) if accepts_name
                   else own_check(x, mask=mask_t))
        if isinstance(checked, torch.Tensor):
            x = checked if dtype is None else checked.to(dtype)
    return x, mask_t


# ------------------------------------------------------------------------------ sessions
@dataclass
class Session:
    """A pair ready to evaluate: its functions, module, data and mask on ``device``."""

    pair: Any
    model_fn: Callable
    guide_fn: Callable
    module: Optional[torch.nn.Module]
    x: torch.Tensor
    mask: Optional[torch.Tensor]
    device: torch.device
    seed: Optional[int]


def _activated_state(pair, param_state, module, device) -> Optional[dict]:
    """The parameter-store state to evaluate in: ``param_state`` (e.g.
    ``FitResult.param_store_state``), the trained values of a fit result given as the pair,
    or for a plain-function pair a snapshot of the global store (so nothing here can change
    it); detached copies on ``device``."""
    param_state = pairs.evaluation_param_state(pair, module, param_state)
    if param_state is None:
        return None
    return {"params": {k: v.detach().to(device) for k, v in param_state["params"].items()},
            "constraints": dict(param_state["constraints"])}


@contextlib.contextmanager
def session(pair, data, *, mask=None, device="auto", guide=None, param_state=None,
            seed: Optional[int] = None, min_rows: int = 1,
            no_grad: bool = True) -> Iterator[Session]:
    """Evaluate ``pair`` on ``data``: validate (before anything moves), move the module to
    ``device`` in ``eval()`` mode, activate the parameters in an isolated store, switch off
    gradients (unless ``no_grad=False``) and fork the random state (seeded with ``seed`` when
    given).

    On exit the module is moved back to the device it was on and gets its training flag
    back, the parameter store and the caller's random state are restored: an evaluation
    leaves the pair as it found it, whatever ``device`` it ran on.

    ``pair`` may be a :class:`~pyro_lvm.inference.training.FitResult` (its trained ``pyro.param``
    values are activated). Before anything is drawn the pair is run once on one row
    (:func:`pyro_lvm.inference.pairs.check_pair_for_evaluation`): mismatched sites, global
    latents and a plain-function pair whose parameters are not in the store raise
    :class:`~pyro_lvm.inference.pairs.PairError` naming them.
    """
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        seed = int(seed)
    dev = resolve_device(device)
    model_fn, guide_fn, module = resolve_pair(pair, guide)
    x, mask_t = prepare_data(pair, data, mask, dtype=module_dtype(module), min_rows=min_rows,
                             module=module)
    original_device = module_device(module)
    moved = module is not None and original_device is not None and original_device != dev
    # every submodule's own flag, so a module with parts frozen in eval mode is left so
    training_flags = [] if module is None else [(m, m.training) for m in module.modules()]
    rng_devices = [dev] if dev.type == "cuda" else []
    try:
        if moved:
            module.to(dev)
        if module is not None:
            module.eval()  # dropout / batch norm in evaluation mode
        x = x.to(dev)
        mask_t = None if mask_t is None else mask_t.to(dev)
        with isolated_param_store(_activated_state(pair, param_state, module, dev)), \
                torch.set_grad_enabled(not no_grad), torch.random.fork_rng(devices=rng_devices):
            # the pair checked as fit checks it, before any draw: sites matched, global
            # latents refused, a plain-function pair's parameters present
            pairs.checked_for_evaluation(model_fn, guide_fn, x, mask_t, module)
            if seed is not None:
                torch.manual_seed(seed)
            yield Session(pair, model_fn, guide_fn, module, x, mask_t, dev, seed)
    finally:
        for submodule, flag in training_flags:
            submodule.training = flag
        if moved:
            module.to(original_device)


# ------------------------------------------------------------------------------ chunk planning
def default_max_elements(device) -> int:
    """The chunk budget for ``device``.

    CPU: :data:`DEFAULT_MAX_ELEMENTS`. CUDA: a sixty-fourth of the free device memory in
    elements (a decoder keeps a few full-size float32 tensors alive, so a chunk then takes
    about a quarter of the free memory), between ``DEFAULT_MAX_ELEMENTS`` and 2**30. Larger
    chunks matter on a GPU: each vectorized pass has a fixed Python cost (Pyro's traces) that
    a fast device otherwise waits on.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return DEFAULT_MAX_ELEMENTS
    free, _total = torch.cuda.mem_get_info(device)
    return int(min(_MAX_GPU_ELEMENTS, max(DEFAULT_MAX_ELEMENTS, free // 64)))


def distribution_eval_width(fn) -> int:
    """Elements per draw that evaluating ``fn.log_prob`` keeps alive, beyond the value itself.

    A distribution may declare it as an integer attribute ``eval_width`` (e.g.
    :class:`models.priors.DiagonalGaussianMixture`). A ``MixtureSameFamily`` without one
    broadcasts each draw against all ``C`` components, ``C x event size`` elements per draw.
    Wrappers (``Independent``, ``MaskedDistribution``, ...) are looked through. 0 when
    nothing is known.
    """
    seen = 0
    while fn is not None and seen < 16:
        declared = getattr(fn, "eval_width", None)
        if isinstance(declared, int) and not isinstance(declared, bool):
            return max(0, declared)
        if isinstance(fn, torch.distributions.MixtureSameFamily):
            components = int(fn.mixture_distribution.logits.shape[-1])
            return components * max(1, int(torch.Size(fn.event_shape).numel()))
        fn = getattr(fn, "base_dist", None)
        seen += 1
    return 0


def pair_eval_width(pair) -> int:
    """The optional per-draw cost hint ``pair.eval_width`` (0 when absent).

    A model/guide pair whose log densities materialize tensors wider than its data and
    latent values per draw (a mixture prior over ``C`` components, a wide decoder) can
    declare the widest as ``eval_width`` (an int, elements per particle and row); the
    chunk planners of :mod:`pyro_lvm.inference.evaluate` and :mod:`pyro_lvm.inference.diagnostics` then
    budget ``particles x rows x eval_width`` elements per chunk.
    """
    hint = getattr(pair, "eval_width", None)
    if hint is None:
        return 0
    if callable(hint):
        hint = hint()
    if isinstance(hint, bool) or not isinstance(hint, (int, np.integer)) or int(hint) < 1:
        raise ValueError(f"pair.eval_width must be a positive integer (elements per draw), "
                         f"got {hint!r}")
    return int(hint)


def plan_chunks(num_rows: int, num_samples: int, width: int, *,
                max_elements: int = DEFAULT_MAX_ELEMENTS,
                batch_size: Optional[int] = None,
                chunk_size: Optional[int] = None) -> Tuple[int, int]:
    """Choose ``(rows_per_chunk, particles_per_chunk)`` so that
    particles x rows x width <= ``max_elements``.

    Particles are favored (an amortized encoder runs once per chunk of rows, so more
    particles per call means less encoder work per draw); rows fill the rest of the budget.
    ``batch_size`` (rows) and ``chunk_size`` (particles), when given, are used as they are
    and only the other one is derived. A single particle of a single row is always allowed,
    even when it alone exceeds the budget.
    """
    for name, value in (("num_rows", num_rows), ("num_samples", num_samples), ("width", width),
                        ("max_elements", max_elements)):
        if int(value) < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    for name, value in (("batch_size", batch_size), ("chunk_size", chunk_size)):
        if value is not None and (int(value) != value or int(value) < 1):
            raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    per_draw = int(width)
    if chunk_size is not None:
        particles = min(int(chunk_size), num_samples)
    elif batch_size is not None:
        particles = min(num_samples, max(1, max_elements // (min(int(batch_size), num_rows) * per_draw)))
    else:
        particles = min(num_samples, max(1, max_elements // per_draw))
    if batch_size is not None:
        rows = min(int(batch_size), num_rows)
    else:
        rows = min(num_rows, max(1, max_elements // (particles * per_draw)))
    return rows, particles



def draw_width(model_fn, guide_fn, x: torch.Tensor, mask=None, pair=None, *,
               probe_rows: Optional[int] = 1) -> int:
    """Elements per particle and row that one vectorized pass keeps alive: the data width,
    the widest sample site, what a site's ``log_prob`` materializes
    (:func:`distribution_eval_width`) and the pair's own hint (:func:`pair_eval_width`).
    Found from one particle on ``probe_rows`` rows (None: all; for guides with per-row
    parameters, which are retried on all rows), without advancing the random stream."""
    width = int(x.shape[1]) if x.dim() > 1 else 1
    if pair is not None:
        width = max(width, pair_eval_width(pair))
    rows = slice(None) if probe_rows is None else slice(0, probe_rows)
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        try:
            probe = trace_log_terms(model_fn, guide_fn, x[rows], 1,
                                    None if mask is None else mask[rows])
        except (ValueError, RuntimeError):
            if probe_rows is None:
                raise
            # e.g. a guide with one parameter per data row only accepts all of them
            probe = trace_log_terms(model_fn, guide_fn, x, 1, mask)
    for trace in (probe.model_trace, probe.guide_trace):
        for site in trace.nodes.values():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            if isinstance(site["value"], torch.Tensor):
                width = max(width, int(site["value"].numel()))
            width = max(width, distribution_eval_width(site["fn"]))
    return width


# ------------------------------------------------------------------------------ streaming
def stream_log_weights(model_fn, guide_fn, x: torch.Tensor, mask, num_samples: int, rows: int,
                       particles: int) -> Iterator[Tuple[int, int, torch.Tensor]]:
    """Log importance weights over row chunks (outer) and particle chunks (inner): yields
    ``(first_row, last_row_plus_one, log_w)`` with ``log_w`` of shape ``[k, rows]``, ``k <=
    particles``, ``num_samples`` particles per row in all. Freed host memory is returned to
    the system after each row chunk on the CPU (:func:`release_host_memory`)."""
    n = x.shape[0]
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        xb = x[start:stop]
        mb = None if mask is None else mask[start:stop]
        done = 0
        while done < num_samples:
            k = min(particles, num_samples - done)
            yield start, stop, log_weights(model_fn, guide_fn, xb, k, mb).detach()
            done += k
        if x.device.type == "cpu":
            release_host_memory()


def log_weight_matrix(model_fn, guide_fn, x, mask, num_samples: int,
                      particles: int) -> torch.Tensor:
    """Log importance weights ``[num_samples, rows]`` for one batch of rows, drawn in chunks of
    ``particles``."""
    return torch.cat([lw for _, _, lw in stream_log_weights(model_fn, guide_fn, x, mask,
                                                            num_samples, x.shape[0], particles)])


class StreamingImportanceStats:
    """Per-row streaming summaries of log importance weights, fed chunk by chunk.

    Keeps, for ``num_rows`` rows, the running maximum :math:`m` of the log weights, the
    rescaled sums :math:`S_1 = \\sum_k e^{\\log w_k - m}` and
    :math:`S_2 = \\sum_k e^{2(\\log w_k - m)}`, and shifted first and second moments of the
    log weights themselves (for the ELBO, :math:`K^{-1} \\sum_k \\log w_k`). Memory is
    O(num_rows) whatever the number of particles; accumulation is in float64.

    Parameters
    ----------
    num_rows : int
    device : torch.device, optional
    """

    def __init__(self, num_rows: int, device=None):
        kw = dict(dtype=torch.float64, device=device)
        self.num_rows = int(num_rows)
        self.count = 0
        self.max = torch.full((num_rows,), -math.inf, **kw)
        self.sum_w = torch.zeros(num_rows, **kw)       # S_1
        self.sum_w2 = torch.zeros(num_rows, **kw)      # S_2
        self._shift: Optional[torch.Tensor] = None     # per-row shift for the log-weight moments
        self.sum_lw = torch.zeros(num_rows, **kw)
        self.sum_lw2 = torch.zeros(num_rows, **kw)

    def update(self, log_w: torch.Tensor) -> None:
        """Add a chunk of log weights of shape ``[particles, num_rows]``."""
        if log_w.dim() != 2 or log_w.shape[1] != self.num_rows:
            raise ValueError(
                f"expected log weights of shape [particles, {self.num_rows}], got {tuple(log_w.shape)}"
            )
        lw = log_w.detach().to(self.max.device, torch.float64)
        chunk_max = lw.max(dim=0).values
        new_max = torch.maximum(self.max, chunk_max)
        # Rows whose weights are all zero so far (max = -inf) have nothing to rescale.
        ref = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
        rescale = torch.exp(self.max - ref)
        self.sum_w = self.sum_w * rescale + torch.exp(lw - ref).sum(dim=0)
        self.sum_w2 = self.sum_w2 * rescale ** 2 + torch.exp(2.0 * (lw - ref)).sum(dim=0)
        self.max = new_max
        if self._shift is None:
            # Shifting by the first chunk's mean avoids cancellation in sum(lw^2) - sum(lw)^2/K.
            mean0 = lw.mean(dim=0)
            self._shift = torch.where(torch.isfinite(mean0), mean0, torch.zeros_like(mean0))
        centered = lw - self._shift
        self.sum_lw = self.sum_lw + centered.sum(dim=0)
        self.sum_lw2 = self.sum_lw2 + (centered ** 2).sum(dim=0)
        self.count += lw.shape[0]

    def result(self) -> Dict[str, np.ndarray]:
        """Per-row results as float64 numpy arrays (see :meth:`result_tensors`)."""
        return {k: v.cpu().numpy() for k, v in self.result_tensors().items()}

    def result_tensors(self) -> Dict[str, torch.Tensor]:
        """Per-row results as float64 tensors on the accumulator's device (no host sync).

        Keys: ``log_px`` (log-mean-exp of the weights), ``se`` (delta-method se, NaN for
        K = 1), ``ess`` (Kong's effective sample size), ``elbo`` (mean log weight) and
        ``elbo_se`` (its standard error, NaN for K = 1).
        """
        if self.count == 0:
            raise ValueError("no log weights were added")
        K = float(self.count)
        log_px = self.max + torch.log(self.sum_w) - math.log(K)
        ess = self.sum_w ** 2 / self.sum_w2
        if self.count > 1:
            # se^2 = (K/ESS - 1)/(K - 1) is Var_hat(w) / (K wbar^2) with the K/(K-1) correction;
            # clamp tiny negative rounding errors (equal weights give exactly ESS = K).
            se = torch.sqrt(torch.clamp((K / ess - 1.0) / (K - 1.0), min=0.0))
            var_lw = (self.sum_lw2 - self.sum_lw ** 2 / K) / (K - 1.0)
            elbo_se = torch.sqrt(torch.clamp(var_lw, min=0.0) / K)
        else:
            se = torch.full_like(log_px, math.nan)
            elbo_se = torch.full_like(log_px, math.nan)
        elbo_val = self._shift + self.sum_lw / K
        return dict(log_px=log_px, se=se, ess=ess, elbo=elbo_val, elbo_se=elbo_se)

