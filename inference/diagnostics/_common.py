"""Plumbing shared by the diagnostics, on top of :mod:`pyro_lvm.inference.engine`: a
prepared pair (:func:`_prepare`, the engine's session plus feature names), a private random
stream, chunk sizes from the engine's one budget, and log-weight iteration."""
from __future__ import annotations

import contextlib
import numbers
from dataclasses import dataclass, field, fields
from typing import Iterator, List, Optional, Tuple

import numpy as np
import pyro.poutine as poutine
import torch
from tqdm.auto import tqdm

from pyro_lvm.inference import engine
from pyro_lvm.inference.engine import check_int as _check_int

_BUILTIN_STATISTICS = ("mean", "variance", "skewness", "kurtosis", "min", "max", "correlation")


@dataclass
class _Prepared(engine.Session):
    """The engine's session, with the data's feature names."""

    feature_names: List[str] = field(default_factory=list)


def _feature_names(data, width: int) -> List[str]:
    columns = getattr(data, "columns", None)
    if columns is not None and len(columns) == width:
        return [str(c) for c in columns]
    return [f"x[{j}]" for j in range(width)]


def _check_positive(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


@contextlib.contextmanager
def _prepare(pair, data, mask, device, *, guide=None, min_rows: int = 1,
             param_state=None) -> Iterator[_Prepared]:
    """:func:`pyro_lvm.inference.engine.session` (validated data on ``device``, module in
    eval mode and moved back afterwards, parameters activated in an isolated store) with
    gradients left on (the amortization gap optimizes a local guide) and feature names."""
    with engine.session(pair, data, mask=mask, device=device, guide=guide,
                        param_state=param_state, min_rows=min_rows, no_grad=False) as s:
        yield _Prepared(**{f.name: getattr(s, f.name) for f in fields(s)},
                        feature_names=_feature_names(data, s.x.shape[1]))


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


def _chunk_sizes(num_rows: int, num_particles: int, width: int, batch_size: Optional[int],
                 device: torch.device) -> Tuple[int, int]:
    """Rows per batch and particles per vectorized pass: the engine's one chunk policy
    (:func:`pyro_lvm.inference.engine.plan_chunks` with the device's budget)."""
    if batch_size is not None:
        batch_size = _check_int(batch_size, "batch_size", 1)
    return engine.plan_chunks(num_rows, num_particles, width,
                              max_elements=engine.default_max_elements(device),
                              batch_size=batch_size)


def _iter_log_weights(prep: _Prepared, num_particles: int, batch_size, progress, desc: str):
    """Yield ``(row_slice, log_w [K, B])`` over the data in row batches."""
    model_fn, guide_fn, x, mask = prep.model_fn, prep.guide_fn, prep.x, prep.mask
    n = x.shape[0]
    width = engine.draw_width(model_fn, guide_fn, x, mask, prep.pair)
    rows_per_batch, particle_chunk = _chunk_sizes(n, num_particles, width, batch_size,
                                                  prep.device)
    starts = range(0, n, rows_per_batch)
    with _progress(len(starts), desc, progress) as bar:
        for start in starts:
            rows = slice(start, min(n, start + rows_per_batch))
            xb = x[rows]
            mb = None if mask is None else mask[rows]
            yield rows, engine.log_weight_matrix(model_fn, guide_fn, xb, mb, num_particles,
                                                 particle_chunk)
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


