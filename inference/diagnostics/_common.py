"""Plumbing shared by the diagnostics: data preparation (device, evaluation mode and
parameter store, restored afterwards), a private random stream, chunk sizes and log-weight
iteration."""
from __future__ import annotations

import contextlib
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Tuple

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from tqdm.auto import tqdm

from pyro_lvm.models.validation import check_data, check_mask

from pyro_lvm.inference._runtime import (isolated_param_store, release_host_memory, resolve_device,
                                         resolve_pair)
from pyro_lvm.inference.objectives import log_weights, trace_log_terms



#: Number of tensor elements one vectorized model pass may hold per [particles, rows, width]
#: tensor; rows and particles are chunked so memory stays bounded for any request.
_ELEMENT_BUDGET = 2 ** 23

#: Smallest "width" assumed for one row of one particle when sizing chunks: the model's hidden
#: layers (unknown here) may be wider than the data.
_MIN_WIDTH = 256

_BUILTIN_STATISTICS = ("mean", "variance", "skewness", "kurtosis", "min", "max", "correlation")



@dataclass
class _Prepared:
    pair: Any
    model_fn: Callable
    guide_fn: Callable
    module: Optional[torch.nn.Module]
    x: torch.Tensor
    mask: Optional[torch.Tensor]
    device: torch.device
    feature_names: List[str]


def _module_dtype_device(module) -> Tuple[Optional[torch.dtype], Optional[torch.device]]:
    if module is None:
        return None, None
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype, tensor.device
    return None, None


def _feature_names(data, width: int) -> List[str]:
    columns = getattr(data, "columns", None)
    if columns is not None and len(columns) == width:
        return [str(c) for c in columns]
    return [f"x[{j}]" for j in range(width)]


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_positive(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


@contextlib.contextmanager
def _prepare(pair, data, mask, device, *, guide=None, min_rows: int = 1,
             param_state=None) -> Iterator[_Prepared]:
    """Validate the data, move pair and data to ``device``, switch the module to eval mode and
    isolate the param store.

    The module is moved back to its original device and training flag on exit, so a
    diagnostic never leaves the user's model somewhere else than it found it. Pairs of plain
    functions keep their parameters in the global Pyro param store: they are evaluated on a
    detached snapshot of it (or of ``param_state``, e.g. ``FitResult.param_store_state``),
    so nothing here can change them.
    """
    model_fn, guide_fn, module = resolve_pair(pair, guide)
    dev = resolve_device(device)
    dtype, original_device = _module_dtype_device(module)
    x = check_data(data, name="data", min_rows=min_rows, mask=mask, dtype=dtype)
    feature_names = _feature_names(data, x.shape[1])
    mask_t = None
    if mask is not None:
        mask_t = torch.as_tensor(check_mask(mask, tuple(x.shape), name="data"))
    model_check = getattr(pair, "check_data", None)
    if callable(model_check):
        checked = model_check(x, mask=mask_t)
        if isinstance(checked, torch.Tensor):
            x = checked
    if param_state is None and module is None:
        param_state = pyro.get_param_store().get_state()
    if param_state is not None:
        param_state = {"params": {k: v.detach().to(dev) for k, v in param_state["params"].items()},
                       "constraints": dict(param_state["constraints"])}
    moved = module is not None and original_device is not None and original_device != dev
    was_training = module.training if module is not None else False
    try:
        if moved:
            module.to(dev)
        if module is not None:
            module.eval()  # dropout / batch norm in evaluation mode
        x = x.to(dev)
        if mask_t is not None:
            mask_t = mask_t.to(dev)
        with isolated_param_store(param_state):
            yield _Prepared(pair, model_fn, guide_fn, module, x, mask_t, dev, feature_names)
    finally:
        if module is not None and was_training:
            module.train()
        if moved:
            module.to(original_device)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    """A private random stream: seeds torch (and CUDA) and restores the previous state after."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


def _progress(total: int, desc: str, progress: Optional[bool]):
    # progress=None: let tqdm decide (it hides itself when stderr is not a terminal).
    return tqdm(total=total, desc=desc, leave=False,
                disable=None if progress is None else not progress)


def _chunk_sizes(num_rows: int, num_particles: int, width: int,
                 batch_size: Optional[int]) -> Tuple[int, int]:
    """Rows per batch and particles per vectorized pass so one [K, B, width] tensor stays
    within the element budget."""
    width = max(_MIN_WIDTH, width)
    if batch_size is None:
        batch_size = max(1, _ELEMENT_BUDGET // (num_particles * width))
    else:
        batch_size = _check_int(batch_size, "batch_size", 1)
    batch_size = min(batch_size, num_rows)
    particle_chunk = max(1, min(num_particles, _ELEMENT_BUDGET // (batch_size * width)))
    return batch_size, particle_chunk


def _draw_width(model_fn, guide_fn, x: torch.Tensor, mask, pair=None, *,
                probe_rows: Optional[int] = 1) -> int:
    """Elements per particle and row that one vectorized pass keeps alive: the data width,
    the widest sample site, what a site's ``log_prob`` materializes (e.g. a mixture prior's
    ``[..., C]`` component matrix; :func:`inference.evaluate.distribution_eval_width`) and
    the pair's own ``eval_width`` hint (:func:`inference.evaluate.pair_eval_width`).
    Found from one particle on ``probe_rows`` rows (None: all; for guides with per-row
    parameters), without advancing the random stream."""
    from pyro_lvm.inference.evaluate import distribution_eval_width, pair_eval_width

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
            if site["type"] != "sample":
                continue
            if isinstance(site["value"], torch.Tensor):
                width = max(width, int(site["value"].numel()))
            width = max(width, distribution_eval_width(site["fn"]))
    return width


def _log_weight_matrix(model_fn, guide_fn, x, mask, num_particles: int,
                       particle_chunk: int) -> torch.Tensor:
    """Log importance weights ``[K, B]`` for one batch of rows, particles drawn in chunks."""
    parts = []
    remaining = num_particles
    while remaining > 0:
        k = min(particle_chunk, remaining)
        parts.append(log_weights(model_fn, guide_fn, x, k, mask).detach())
        remaining -= k
    return torch.cat(parts, dim=0)


def _iter_log_weights(prep: _Prepared, num_particles: int, batch_size, progress, desc: str):
    """Yield ``(row_slice, log_w [K, B])`` over the data in row batches."""
    model_fn, guide_fn, x, mask = prep.model_fn, prep.guide_fn, prep.x, prep.mask
    n = x.shape[0]
    width = _draw_width(model_fn, guide_fn, x, mask, prep.pair)
    rows_per_batch, particle_chunk = _chunk_sizes(n, num_particles, width, batch_size)
    starts = range(0, n, rows_per_batch)
    with _progress(len(starts), desc, progress) as bar:
        for start in starts:
            rows = slice(start, min(n, start + rows_per_batch))
            xb = x[rows]
            mb = None if mask is None else mask[rows]
            yield rows, _log_weight_matrix(model_fn, guide_fn, xb, mb, num_particles,
                                           particle_chunk)
            if x.device.type == "cpu":
                release_host_memory()  # see inference._runtime: a long loop fragments the heap
            bar.update(1)


def _latent_labels(site: str, event_shape: torch.Size) -> List[str]:
    if len(event_shape) == 0:
        return [site]
    labels = []
    for index in np.ndindex(*event_shape):
        inner = ",".join(str(i) for i in index)
        labels.append(f"{site}[{inner}]")
    return labels


def _flatten_event(value: torch.Tensor, event_shape: torch.Size) -> torch.Tensor:
    """``[..., *event]`` -> ``[..., prod(event)]``."""
    lead = value.shape[: value.dim() - len(event_shape)]
    return value.reshape(*lead, int(np.prod(event_shape)) if len(event_shape) else 1)


def _guide_sites(terms) -> List[str]:
    sites = terms.latent_sites()
    if not sites:
        raise ValueError("the guide has no latent sample site; there is nothing to diagnose")
    return sites


def _observed_data_site(model_fn, x, mask) -> str:
    """Name of the model's observed site that holds the data matrix (``"x"`` in our models)."""
    trace = poutine.trace(model_fn).get_trace(x, mask=mask)
    candidates = [name for name, site in trace.nodes.items()
                  if site["type"] == "sample" and site["is_observed"]
                  and tuple(torch.as_tensor(site["value"]).shape) == tuple(x.shape)]
    if len(candidates) == 1:
        return candidates[0]
    if "x" in candidates:
        return "x"
    if not candidates:
        raise ValueError(
            f"the model has no observed sample site whose value has the data's shape "
            f"{tuple(x.shape)}; the contract needs pyro.sample('x', ..., obs=x)")
    raise ValueError(f"the model has several observed sites holding the data ({candidates}); "
                     f"name the data site 'x'")


