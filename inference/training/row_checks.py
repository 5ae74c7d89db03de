"""Pyro's argument and support validation, run once over every training row before the fit.

While Pyro's validation is on, every ``pyro.sample`` statement checks its distribution's
arguments (a constraint test and a device-to-host read per argument) and every observed
value's support, and a pair's own per-call data checks run too. On a small network that is a
noticeable share of a training step, and it finds nothing new after the first pass over the
data: the data do not change between epochs, and a parameter that leaves its domain shows up
as a non-finite loss or gradient, which :func:`~pyro_lvm.inference.training.step.train_step`
checks on every step and :mod:`~pyro_lvm.inference.training.forensics` locates (site, parameter,
rows) with validation back on.

So :func:`pyro_lvm.inference.fit` runs the pair once over all training rows here, in batches
of the training batch size (the last, smaller batch included, so any shape the steps will
see is checked), with validation on, no gradients and its own random stream; then it trains
with Pyro's per-call checks off (``fit(..., validate_every_step=True)`` keeps them on).
Anything that validation would have refused during training is refused here, before the
first step, naming the rows.
"""
from __future__ import annotations

from typing import Optional

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.util import site_is_subsample

__all__ = ["check_every_row"]


def _score_sites(trace) -> None:
    """``log_prob`` of every sample site: validates observed values against the support
    (the distributions' arguments were validated when they were built)."""
    for site in trace.nodes.values():
        if site["type"] == "sample" and not site_is_subsample(site):
            site["fn"].log_prob(site["value"])


def check_every_row(model_fn, guide_fn, x: torch.Tensor, mask: Optional[torch.Tensor], *,
                    rows_per_call: int, device: torch.device, name: str = "training data") -> None:
    """Run ``guide`` then ``model`` (replayed on the guide's draws) on every row of ``x``,
    ``rows_per_call`` at a time, with Pyro's validation on.

    Raises
    ------
    ValueError
        What Pyro's validation (or the pair's own data checks) refused, prefixed with the
        rows of the batch it was refused in.
    """
    fork_devices = [device] if device.type == "cuda" else []
    num_rows = int(x.shape[0])
    with torch.no_grad(), pyro.validation_enabled(True), \
            torch.random.fork_rng(devices=fork_devices):
        for start in range(0, num_rows, rows_per_call):
            stop = min(start + rows_per_call, num_rows)
            xb = x[start:stop]
            mb = None if mask is None else mask[start:stop]
            try:
                guide_trace = poutine.trace(guide_fn).get_trace(xb, mask=mb)
                model_trace = poutine.trace(
                    poutine.replay(model_fn, trace=guide_trace)).get_trace(xb, mask=mb)
                _score_sites(guide_trace)
                _score_sites(model_trace)
            except ValueError as exc:
                raise ValueError(f"{name}, rows {start}-{stop - 1} (checked with Pyro's "
                                 f"validation before the first step): {exc}") from exc
