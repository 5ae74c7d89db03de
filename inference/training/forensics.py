"""Non-finite forensics for :func:`pyro_lvm.inference.fit`: when a loss or gradient becomes
NaN/inf, find the epoch, step, sample site, parameter and data rows that produced it."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import pandas as pd
import pyro
import torch
from pyro.poutine.util import site_is_subsample

from pyro_lvm.inference.training.checkpoint import set_torch_rng_state
from pyro_lvm.inference.importance_weights import trace_log_terms

__all__ = ["NonFiniteLossError", "diagnose_sites", "describe_site", "raise_non_finite"]


class NonFiniteLossError(FloatingPointError):
    """The loss or its gradient became NaN/inf; the optimizer step was not taken.

    Attributes
    ----------
    epoch, step, global_step : int
        Where it happened, counted from 1 (``epoch`` as in the history's ``epoch`` column,
        ``step`` within the epoch, ``global_step`` over the whole fit).
    site : str or None
        The sample site whose log-density was non-finite in the diagnostic re-run.
    role : str or None
        ``"model"`` or ``"guide"`` (the program ``site`` belongs to).
    parameter : str or None
        A parameter whose value (or gradient) was non-finite, if that was the cause.
    rows : list of int
        Data rows (indices into the training data) where ``site`` was non-finite.
    history : pandas.DataFrame
        History of the epochs completed before the failure.
    param_store_state : dict
        The fit's parameter-store state (see :attr:`FitResult.param_store_state`), holding
        the restored parameters of ``pyro.param``-based pairs.
    """

    def __init__(self, message: str, *, epoch: int, step: int, global_step: int,
                 site: Optional[str] = None, role: Optional[str] = None,
                 parameter: Optional[str] = None, rows: Sequence[int] = (),
                 history: Optional[pd.DataFrame] = None, param_store_state=None):
        super().__init__(message)
        self.epoch = epoch
        self.step = step
        self.global_step = global_step
        self.site = site
        self.role = role
        self.parameter = parameter
        self.rows = list(rows)
        self.history = history
        self.param_store_state = param_store_state


def _site_report(trace, role: str, batch_rows: torch.Tensor):
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        if role == "guide" and site["is_observed"]:
            continue
        log_prob = site.get("log_prob")
        value = site["value"]
        for what, tensor in (("value", value), ("log_prob", log_prob)):
            if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
                continue
            bad = ~torch.isfinite(tensor)
            if not bool(bad.any()):
                continue
            first_value = tensor[bad].flatten()[0].item()
            per_row = None
            n = batch_rows.shape[0]
            if what == "log_prob" and tensor.dim() >= 1 and tensor.shape[-1] == n:
                per_row = bad.reshape(-1, n).any(0)
            elif what == "value" and tensor.dim() >= 1:
                # value shape [..., n, *event]: find the data dim from the right
                event_dims = len(getattr(site["fn"], "event_shape", ()))
                if tensor.dim() > event_dims and tensor.shape[tensor.dim() - event_dims - 1] == n:
                    reduced = bad.flatten(tensor.dim() - event_dims) if event_dims else bad
                    if event_dims:
                        reduced = reduced.any(-1)
                    per_row = reduced.reshape(-1, n).any(0)
            rows = []
            if per_row is not None:
                local = torch.nonzero(per_row).flatten().tolist()
                rows = [(i, int(batch_rows[i])) for i in local]
            return {"site": name, "role": role, "what": what, "first_value": first_value,
                    "rows": rows, "batch_size": n}
    return None


def diagnose_sites(model_fn, guide_fn, xb, mb, batch_rows, num_particles, rng_before, device):
    """Re-run the failing batch, first with the random state of the failing step (so the
    draws are the ones that failed), then with fresh draws, and return the first site (guide
    before model, in execution order) with a non-finite value or log-density."""
    attempts = [(rng_before, max(1, num_particles))] + [(None, max(8, num_particles))] * 3
    last_error = None
    for rng, particles in attempts:
        if rng is not None:
            set_torch_rng_state(rng, device)
        try:
            # Validation off: an invalid distribution parameter must show up as a non-finite
            # log-density we can locate, not as a second exception.
            with torch.no_grad(), pyro.validation_enabled(False):
                terms = trace_log_terms(model_fn, guide_fn, xb, num_particles=particles, mask=mb)
        except Exception as exc:  # the pair may break the contract in a way fit tolerates
            last_error = exc
            continue
        for role, trace in (("guide", terms.guide_trace), ("model", terms.model_trace)):
            found = _site_report(trace, role, batch_rows)
            if found is not None:
                return found, None
    return None, last_error


def describe_site(found: dict) -> str:
    rows = found["rows"]
    where = ""
    if rows:
        batch_row, data_row = rows[0]
        where = (f" for {len(rows)} of {found['batch_size']} rows (first: row {batch_row} of the "
                 f"batch = row {data_row} of the data)")
    return (f"site {found['site']!r} in the {found['role']} has {found['what']}="
            f"{found['first_value']}{where}")



def _fail(run, message: str, *, epoch: int, step: int, **details):
    # The optimizer step was not taken, so the live parameters are the last finite ones.
    from pyro_lvm.inference.training.state import history_frame

    raise NonFiniteLossError(
        message, epoch=epoch + 1, step=step + 1, global_step=run.state.global_step + 1,
        history=history_frame(run.state.history),
        param_store_state=pyro.get_param_store().get_state(), **details)


def raise_non_finite(run, exc_or_loss, *, epoch: int, step: int, xb, mb, batch_rows,
                     rng_before, loss_value=None, grad_norm=None):
    """Raise a :class:`NonFiniteLossError` naming where a non-finite loss (or gradient, or
    the ValueError ``exc_or_loss`` of Pyro's validation) came from: a non-finite parameter,
    else the first site with a non-finite value or log-density in a re-run of the batch
    (``rng_before``: the random state of the failing step). Re-raises ``exc_or_loss`` when it
    was not about a non-finite value after all.

    ``run`` is the fit in progress (:class:`pyro_lvm.inference.training.loop.FitRun`)."""
    from pyro_lvm.inference.training.step import param_names

    state = run.state
    where = f"epoch {epoch + 1}, step {step + 1} (global step {state.global_step + 1})"
    restored = ("parameters restored to the last finite values " + (
        f"(after global step {state.global_step})" if state.global_step
        else "(their initial values)"))
    names = param_names(run.module, state.params)
    bad_params = [names[id(p)] for p in state.params if not bool(torch.isfinite(p).all())]
    if bad_params:
        # Only a custom optimizer can step finite parameters to non-finite ones; the
        # epoch-start copy is the last state known to be finite.
        if run.finite_snapshot is not None:
            state.restore(run.finite_snapshot[1])
            restored_to = (f"parameters restored to their values at the start of epoch "
                           f"{run.finite_snapshot[0] + 1}, the last known to be finite")
        else:
            restored_to = "no finite copy of the parameters was available"
        _fail(run, f"non-finite loss at {where}: parameter(s) {bad_params} hold non-finite "
                   f"values; {restored_to}", epoch=epoch, step=step, parameter=bad_params[0])
    loss_is_finite = loss_value is not None and math.isfinite(loss_value)
    found, diag_error = diagnose_sites(run.model_fn, run.guide_fn, xb, mb, batch_rows,
                                       run.adapter.num_particles, rng_before, run.device)
    if loss_is_finite and grad_norm is not None and not math.isfinite(grad_norm):
        bad_grads = [names[id(p)] for p in state.params
                     if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
        extra = f"; {describe_site(found)}" if found else ""
        _fail(run, f"non-finite gradient at {where}: the loss {loss_value:.6g} is finite but the "
                   f"gradient of parameter(s) {bad_grads} is not{extra}; {restored}",
              epoch=epoch, step=step, parameter=bad_grads[0] if bad_grads else None,
              site=found["site"] if found else None, role=found["role"] if found else None,
              rows=[r for _, r in found["rows"]] if found else ())
    if found is None:
        if isinstance(exc_or_loss, BaseException):
            raise exc_or_loss  # not a non-finite value after all: the original error
        why = ("no sample site had a non-finite value or log-density in a diagnostic "
               "re-run of the batch (the objective itself overflowed, or the failing "
               "draw was not reproduced)")
        if diag_error is not None:
            why = f"the diagnostic re-run failed ({type(diag_error).__name__}: {diag_error})"
        _fail(run, f"non-finite loss ({loss_value}) at {where}: {why}; {restored}",
              epoch=epoch, step=step)
    value = "" if loss_value is None else f" ({loss_value})"
    _fail(run, f"non-finite loss{value} at {where}: {describe_site(found)}; {restored}",
          epoch=epoch, step=step, site=found["site"], role=found["role"],
          rows=[r for _, r in found["rows"]])
