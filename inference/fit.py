"""Fit any model/guide pair that keeps the contract by stochastic variational inference.

:func:`fit` maximizes a variational bound :math:`\\mathcal{L}(\\theta, \\phi) = \\sum_{i=1}^N
\\mathcal{L}_i` (the ELBO, or an importance-weighted bound) by minibatch stochastic gradient
ascent. A minibatch :math:`B \\subset \\{1..N\\}` gives the unbiased estimate

.. math::

    \\widehat{\\mathcal{L}} = \\frac{N}{|B|} \\sum_{i \\in B} \\widehat{\\mathcal{L}}_i ,

whose negative is the loss handed to the optimizer (Robbins & Monro 1951; Hoffman et al.
2013, *Stochastic variational inference*, JMLR 14). The history reports the bound **per data
row**, :math:`\\frac{1}{N}\\sum_i \\widehat{\\mathcal{L}}_i` in nats (higher is better): a
lower bound on the average log-likelihood, never the log-likelihood itself.

Everything a statistician needs to trust a fit is built in: each fit has its own parameter
store (two fits never share a tensor), a seed makes CPU runs bit-for-bit reproducible, the
data are validated before the first step, a non-finite loss stops the fit with the epoch,
step, site and data row that produced it (parameters restored to their last finite values),
and a checkpoint file lets an interrupted fit resume exactly where it stopped.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import numbers
import os
import pathlib
import random
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np
import pandas as pd
import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.util import site_is_subsample
from tqdm import tqdm

from pyro_lvm.inference._runtime import isolated_param_store, resolve_device, resolve_pair
from pyro_lvm.inference.contract import check_contract
from pyro_lvm.inference.objectives import trace_log_terms
from pyro_lvm.models.validation import check_data, check_mask, data_checked

__all__ = [
    "fit",
    "default_optimizer",
    "FitResult",
    "FitState",
    "StopFit",
    "EarlyStopping",
    "NonFiniteLossError",
]

#: Columns every history row has, in this order (callbacks may add more).
HISTORY_COLUMNS = ("epoch", "step", "train_objective", "valid_objective", "time_s")
_CHECKPOINT_FORMAT = "pyro-lvm-fit-checkpoint"
_CHECKPOINT_VERSION = 1
#: Rows used by the contract check that runs before training (cheap: the check only needs
#: the structure of the pair, not all the data).
_CONTRACT_CHECK_ROWS = 16
_HOOKS = ("on_fit_start", "on_epoch_start", "on_step_start", "on_step_end", "on_epoch_end",
          "on_fit_end")


class StopFit(Exception):
    """Raise from a callback to end the fit early.

    Raised in a step hook, the current epoch is closed after that step (its history row
    covers the steps taken); raised in ``on_epoch_end``, the fit ends after that epoch. The
    exception's message becomes ``FitResult.stop_reason``.
    """


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


# ----------------------------------------------------------------------------------------
# results and callback state
# ----------------------------------------------------------------------------------------

@dataclass(repr=False)
class FitResult:
    """What :func:`fit` returns.

    Attributes
    ----------
    model
        The pair as given to :func:`fit`, trained in place (a module is on ``device``).
    history : pandas.DataFrame
        One row per epoch: ``epoch`` (1-based), ``step`` (optimizer steps taken so far),
        ``train_objective`` (the bound per data row averaged over the epoch's minibatches,
        nats, higher is better; parameters change during the epoch, so it lags the current
        fit), ``valid_objective`` (the bound per row on the validation data at the end of the
        epoch, NaN without validation data), ``time_s`` (cumulative wall time), and any column
        a callback logged.
    objective_name : str
    device : torch.device
    seed : int
    elapsed_s : float
        Wall time of the whole fit (including earlier runs resumed from a checkpoint).
    stopped_early : bool
    stop_reason : str or None
    step_losses : list of float
        The loss the optimizer minimized at every step, :math:`-\\frac{N}{|B|}\\sum_{i\\in B}
        \\widehat{\\mathcal{L}}_i`.
    step_objectives : list of float
        The same per step, as the bound per data row (``-loss / N``): a learning curve.
    param_store_state : dict
        The fit's own Pyro parameter-store state. Pairs built from ``pyro.param`` (plain
        functions) keep their trained values *only* here; evaluate them inside
        ``with result.activate():`` (equivalently
        ``pyro.get_param_store().scope(result.param_store_state)``). ``PyroModule`` pairs keep
        their parameters in the module and need no activation.
    num_data : int
    batch_size : int
    """

    model: Any
    history: pd.DataFrame
    objective_name: str
    device: torch.device
    seed: int
    elapsed_s: float
    stopped_early: bool = False
    stop_reason: Optional[str] = None
    step_losses: List[float] = field(default_factory=list)
    step_objectives: List[float] = field(default_factory=list)
    param_store_state: Optional[dict] = None
    num_data: int = 0
    batch_size: int = 0
    checkpoint: Optional[str] = None

    def activate(self):
        """Context manager making this fit's ``pyro.param`` values the active parameter store."""
        return pyro.get_param_store().scope(self.param_store_state)

    @property
    def final_train_objective(self) -> float:
        return float(self.history["train_objective"].iloc[-1]) if len(self.history) else math.nan

    @property
    def final_valid_objective(self) -> float:
        return float(self.history["valid_objective"].iloc[-1]) if len(self.history) else math.nan

    def __repr__(self) -> str:
        epochs = len(self.history)
        stop = f", stopped early: {self.stop_reason}" if self.stopped_early else ""
        return (f"FitResult({self.objective_name}, {epochs} epoch(s), "
                f"{self.history['step'].iloc[-1] if epochs else 0} steps on {self.device}, seed "
                f"{self.seed}, train objective {self.final_train_objective:.4f} nats/row, valid "
                f"objective {self.final_valid_objective:.4f} nats/row, {self.elapsed_s:.1f} s{stop})")


class FitState:
    """The state a callback sees (the same object for every hook of one fit).

    Attributes
    ----------
    epoch : int
        Index of the current epoch, counted from 0 (history rows count from 1).
    step : int
        Index of the current step within the epoch, from 0.
    global_step : int
        Optimizer steps completed before the current one (so in ``on_step_end`` the step just
        taken is number ``global_step``; in ``on_epoch_end`` it is the epoch's last).
    steps_per_epoch, num_epochs, num_data, batch_size : int
    model : the pair as given to :func:`fit`; module : its ``torch.nn.Module`` or None
    objective : the objective object (callbacks such as KL warm-up set attributes on it)
    optimizer : the torch optimizer (None until the first step has collected the parameters)
    params : list of the unconstrained parameter tensors being optimized
    history : list of dict, one per completed epoch (the current one is appended before
        ``on_epoch_end``)
    loss, step_objective : the last step's loss and bound per row (floats)
    has_validation : bool
    device : torch.device
    """

    def __init__(self, **kwargs):
        self.epoch = 0
        self.step = 0
        self.global_step = 0
        self.loss = math.nan
        self.step_objective = math.nan
        self.optimizer = None
        self.params: List[torch.Tensor] = []
        self.history: List[dict] = []
        self.current_row: Dict[str, Any] = {}
        self.__dict__.update(kwargs)

    def log(self, key: str, value) -> None:
        """Add ``key: value`` to the current epoch's history row (the last value logged in an
        epoch wins)."""
        if key in HISTORY_COLUMNS:
            raise ValueError(f"callbacks cannot log {key!r}: it is one of fit's own history "
                             f"columns {list(HISTORY_COLUMNS)}")
        if isinstance(value, torch.Tensor):
            value = value.item()
        self.current_row[key] = value

    def snapshot(self) -> dict:
        """CPU copy of every trained value: the module's ``state_dict`` and the parameters of
        the fit's parameter store that the module does not own."""
        module_state = None
        owned = set()
        if self.module is not None:
            module_state = {k: v.detach().to("cpu", copy=True)
                            for k, v in self.module.state_dict().items()}
            owned = {id(p) for p in self.module.parameters()}
        store = {name: p.detach().to("cpu", copy=True)
                 for name, p in pyro.get_param_store().named_parameters() if id(p) not in owned}
        return {"module": module_state, "store": store}

    def restore(self, snapshot: dict) -> None:
        """Copy a :meth:`snapshot` back into the live tensors (in place: the optimizer keeps
        pointing at them)."""
        with torch.no_grad():
            if snapshot.get("module") is not None:
                self.module.load_state_dict(snapshot["module"])
            live = dict(pyro.get_param_store().named_parameters())
            for name, value in snapshot.get("store", {}).items():
                if name in live:
                    live[name].copy_(value)


# ----------------------------------------------------------------------------------------
# early stopping
# ----------------------------------------------------------------------------------------

class EarlyStopping:
    """Stop when a monitored history column stops improving, and keep the best parameters.

    Parameters
    ----------
    patience : int
        Number of epochs without improvement after which the fit stops.
    min_delta : float
        An epoch improves on the best value only by more than ``min_delta`` (nats per row).
    monitor : str
        History column to watch; objectives are bounds, so higher is better.
    mode : {"max", "min"}
        ``"max"`` for objectives, ``"min"`` for a logged loss-like column.
    restore_best : bool
        At the end of the fit (stopped or not) copy back the parameters of the best epoch (a
        CPU copy is kept each time the monitored value improves).

    Attributes
    ----------
    best_value, best_epoch : the best monitored value and its (1-based) epoch
    stopped_epoch : the epoch after which the fit was stopped, or None
    restored : whether the best parameters were copied back
    """

    def __init__(self, patience: int = 5, min_delta: float = 0.0,
                 monitor: str = "valid_objective", mode: str = "max", restore_best: bool = True):
        if not isinstance(patience, numbers.Integral) or isinstance(patience, bool) or patience < 1:
            raise ValueError(f"patience must be a positive integer, got {patience!r}")
        if not isinstance(min_delta, numbers.Real) or not min_delta >= 0:
            raise ValueError(f"min_delta must be a non-negative number, got {min_delta!r}")
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.patience = int(patience)
        self.min_delta = float(min_delta)
        self.monitor = monitor
        self.mode = mode
        self.restore_best = restore_best
        self._reset()

    def _reset(self):
        self.best_value = None
        self.best_epoch = None
        self.wait = 0
        self.stopped_epoch = None
        self.restored = False
        self._best_state = None

    def on_fit_start(self, state: FitState) -> None:
        if self.monitor == "valid_objective" and not state.has_validation:
            raise ValueError("EarlyStopping monitors 'valid_objective' but fit() got no "
                             "validation data; pass validation=... or monitor='train_objective'")
        self._reset()

    def _improved(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best_value is None:
            return True
        if self.mode == "max":
            return value > self.best_value + self.min_delta
        return value < self.best_value - self.min_delta

    def on_epoch_end(self, state: FitState) -> None:
        row = state.history[-1]
        if self.monitor not in row:
            raise ValueError(f"EarlyStopping monitors {self.monitor!r}, which is not a history "
                             f"column (columns: {sorted(row)})")
        value = float(row[self.monitor])
        if self._improved(value):
            self.best_value, self.best_epoch, self.wait = value, int(row["epoch"]), 0
            if self.restore_best:
                self._best_state = state.snapshot()
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = int(row["epoch"])
            best = "none finite" if self.best_value is None else (
                f"best {self.best_value:.6g} at epoch {self.best_epoch}")
            raise StopFit(f"EarlyStopping: {self.monitor} did not improve by more than "
                          f"{self.min_delta:g} for {self.patience} epoch(s) ({best})")

    def on_fit_end(self, state: FitState) -> None:
        last_epoch = int(state.history[-1]["epoch"]) if state.history else None
        if self.restore_best and self._best_state is not None and self.best_epoch != last_epoch:
            state.restore(self._best_state)
            self.restored = True

    def state_dict(self) -> dict:
        return {"best_value": self.best_value, "best_epoch": self.best_epoch, "wait": self.wait,
                "stopped_epoch": self.stopped_epoch, "best_state": self._best_state}

    def load_state_dict(self, state: dict) -> None:
        self.best_value = state["best_value"]
        self.best_epoch = state["best_epoch"]
        self.wait = state["wait"]
        self.stopped_epoch = state["stopped_epoch"]
        self._best_state = state["best_state"]


# ----------------------------------------------------------------------------------------
# objectives: ours (differentiable_loss with num_data) and Pyro's ELBO classes
# ----------------------------------------------------------------------------------------

class _ObjectiveAdapter:
    """One interface over both kinds of objective.

    * pyro-lvm objectives (class attribute ``pyro_lvm_objective = True``) take ``num_data``
      and scale outside the log-mean-exp themselves.
    * ``pyro.infer.ELBO`` instances are given model and guide wrapped in
      ``poutine.scale(scale=N / |B|)``, which for the ELBO (a sum of per-row terms) is the
      same unbiased minibatch scaling.
    """

    def __init__(self, objective, model_fn, guide_fn, num_data: int):
        if isinstance(objective, type):
            raise TypeError(f"objective must be an instance, got the class {objective.__name__}; "
                            f"write {objective.__name__}() instead")
        self.objective = objective
        self.model_fn, self.guide_fn, self.num_data = model_fn, guide_fn, num_data
        if getattr(objective, "pyro_lvm_objective", False):
            self.kind = "pyro_lvm"
            self.name = str(getattr(objective, "name", type(objective).__name__))
            self.num_particles = int(getattr(objective, "num_particles", 1))
            self.requires_reparameterized = bool(
                getattr(objective, "requires_reparameterized", True))
        elif isinstance(objective, pyro.infer.ELBO):
            self.kind = "pyro"
            particles = int(getattr(objective, "num_particles", 1))
            self.name = f"pyro.infer.{type(objective).__name__}" + (
                f"(num_particles={particles})" if particles != 1 else "")
            self.num_particles = particles if getattr(objective, "vectorize_particles", False) else 1
            self.requires_reparameterized = False  # Pyro's ELBOs add score-function terms
            self._differentiable = callable(getattr(objective, "differentiable_loss", None))
        else:
            raise TypeError(
                f"objective must be a pyro-lvm objective (e.g. inference.objectives.ELBO(), "
                f"IWAE(num_particles=K)) or a pyro.infer.ELBO instance (e.g. Trace_ELBO()), "
                f"got {type(objective).__name__}")

    def _scaled(self, batch_rows: int):
        scale = self.num_data / batch_rows
        if scale == 1.0:
            return self.model_fn, self.guide_fn
        return (poutine.scale(self.model_fn, scale=scale),
                poutine.scale(self.guide_fn, scale=scale))

    def train_loss(self, xb: torch.Tensor, mb: Optional[torch.Tensor]) -> torch.Tensor:
        """Scaled minibatch loss with gradients accumulated into ``.grad`` (returns it detached).

        The rows were validated once before training, so the models' per-call data checks are
        skipped (:func:`models.validation.data_checked`)."""
        with data_checked():
            return self._train_loss(xb, mb)

    def _train_loss(self, xb: torch.Tensor, mb: Optional[torch.Tensor]) -> torch.Tensor:
        if self.kind == "pyro":
            # Pyro warns on NaN losses (forward and backward); fit raises a precise
            # NonFiniteLossError instead, so the warning would only duplicate it.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Encountered (NaN|[+-]?inf)")
                return self._pyro_train_loss(xb, mb)
        if self.kind == "pyro_lvm":
            loss = self.objective.differentiable_loss(self.model_fn, self.guide_fn, xb, mask=mb,
                                                      num_data=self.num_data)
            loss.backward()
            return loss.detach()
        raise AssertionError(self.kind)

    def _pyro_train_loss(self, xb, mb):
        model, guide = self._scaled(xb.shape[0])
        if self._differentiable:
            loss = self.objective.differentiable_loss(model, guide, xb, mask=mb)
            loss.backward()
            return loss.detach()
        value = self.objective.loss_and_grads(model, guide, xb, mask=mb)
        return torch.tensor(float(value), dtype=xb.dtype, device=xb.device)

    def eval_sum(self, xb: torch.Tensor, mb: Optional[torch.Tensor]) -> float:
        """:math:`\\sum_{i \\in B} \\widehat{\\mathcal{L}}_i` on a chunk, without gradients."""
        with torch.no_grad(), data_checked():
            return -float(self.objective.loss(self.model_fn, self.guide_fn, xb, mask=mb))


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------

def _check_int(value, name: str, minimum: int) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_positive(value, name: str, allow_none: bool = False) -> Optional[float]:
    if value is None and allow_none:
        return None
    if (not isinstance(value, numbers.Real) or isinstance(value, bool)
            or not math.isfinite(value) or value <= 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _module_dtype(module) -> Optional[torch.dtype]:
    if module is None:
        return None
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return None


def _prepare_data(pair, data, mask, *, name: str, dtype, data_dim):
    x = check_data(data, data_dim, name=name, min_rows=1, mask=mask, dtype=dtype)
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


def default_optimizer(params: List[torch.Tensor], lr: float,
                      **adam_options) -> torch.optim.Optimizer:
    """``torch.optim.Adam(params, lr=lr, **adam_options)`` (e.g. ``eps``, ``betas``), with the
    fused kernel (``fused=True``) where torch has one for every parameter (floating point, on a
    CPU or CUDA device): the same update rule in one kernel per step instead of about ten small
    operations per parameter tensor (on the CPU about 0.5 ms less per step for a
    784-200-200-50 DLVM). The two differ only by floating-point rounding."""
    fused_devices = {"cpu", "cuda"}
    if params and all(p.is_floating_point() and p.device.type in fused_devices
                      and p.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
                      for p in params) and len({p.device for p in params}) == 1:
        try:
            return torch.optim.Adam(params, lr=lr, fused=True, **adam_options)
        except (RuntimeError, ValueError):  # a torch build without the fused kernel
            pass
    return torch.optim.Adam(params, lr=lr, **adam_options)


def _collect_params(module, capture_trace) -> List[torch.Tensor]:
    """Union (by identity, first-seen order) of the module's parameters and the unconstrained
    tensors behind every ``pyro.param`` site of a traced loss evaluation (as Pyro's SVI does)."""
    params, seen = [], set()

    def add(tensor):
        if tensor is not None and id(tensor) not in seen and tensor.requires_grad:
            seen.add(id(tensor))
            params.append(tensor)

    if module is not None:
        for p in module.parameters():
            add(p)
    for site in capture_trace.nodes.values():
        value = site["value"]
        unconstrained = getattr(value, "unconstrained", None)
        add(unconstrained() if callable(unconstrained) else value)
    return params


def _param_names(module, params) -> Dict[int, str]:
    names = {id(p): name for name, p in pyro.get_param_store().named_parameters()}
    if module is not None:
        names.update({id(p): name for name, p in module.named_parameters()})
    return {id(p): names.get(id(p), f"<parameter {i}>") for i, p in enumerate(params)}


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _torch_rng_state(device: torch.device) -> dict:
    """The random state Pyro's samplers draw from (torch only: cheap enough for every step)."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_torch_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _all_finite(snapshot: dict) -> bool:
    tensors = list((snapshot.get("module") or {}).values()) + list(snapshot["store"].values())
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def _history_frame(rows: List[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame({c: pd.Series(dtype="int64" if c in ("epoch", "step") else "float64")
                             for c in HISTORY_COLUMNS})
    extra = [c for c in frame.columns if c not in HISTORY_COLUMNS]
    return frame[list(HISTORY_COLUMNS) + extra].reset_index(drop=True)


def _fingerprint(x: torch.Tensor) -> List[float]:
    return [float(x.shape[0]), float(x.shape[1]), float(x.detach().double().sum())]


def _save_checkpoint(path: pathlib.Path, payload: dict) -> None:
    """Write atomically: a crash or Ctrl-C mid-write leaves the previous checkpoint intact."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _load_checkpoint(path: pathlib.Path, config: dict) -> dict:
    try:
        # Our own file holds numpy/python RNG states, which weights_only loading refuses;
        # only load checkpoints you wrote (like any pickle).
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ValueError(f"checkpoint {str(path)!r} exists but could not be read ({exc}); "
                         f"delete it to start afresh") from exc
    if not isinstance(payload, dict) or payload.get("format") != _CHECKPOINT_FORMAT:
        raise ValueError(f"{str(path)!r} is not a pyro-lvm fit checkpoint")
    saved = payload["config"]
    for key in ("num_data", "data_dim", "batch_size", "objective_name", "seed", "data_fingerprint",
                "has_module"):
        if saved.get(key) != config[key]:
            raise ValueError(
                f"checkpoint {str(path)!r} was written by a different fit ({key}: "
                f"{saved.get(key)!r} there, {config[key]!r} now); resuming it would mix two "
                f"fits. Use the same settings and data, or delete the file / pick another path")
    return payload


# ----------------------------------------------------------------------------------------
# the non-finite diagnostic
# ----------------------------------------------------------------------------------------

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


def _diagnose_sites(model_fn, guide_fn, xb, mb, batch_rows, num_particles, rng_before, device):
    """Re-run the failing batch, first with the random state of the failing step (so the
    draws are the ones that failed), then with fresh draws, and return the first site (guide
    before model, in execution order) with a non-finite value or log-density."""
    attempts = [(rng_before, max(1, num_particles))] + [(None, max(8, num_particles))] * 3
    last_error = None
    for rng, particles in attempts:
        if rng is not None:
            _set_torch_rng_state(rng, device)
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


def _describe_site(found: dict) -> str:
    rows = found["rows"]
    where = ""
    if rows:
        batch_row, data_row = rows[0]
        where = (f" for {len(rows)} of {found['batch_size']} rows (first: row {batch_row} of the "
                 f"batch = row {data_row} of the data)")
    return (f"site {found['site']!r} in the {found['role']} has {found['what']}="
            f"{found['first_value']}{where}")


# ----------------------------------------------------------------------------------------
# fit
# ----------------------------------------------------------------------------------------

def fit(pair, data, objective=None, epochs: int = 10, batch_size: int = 128, lr: float = 1e-3,
        seed: int = 0, device="auto", validation=None, callbacks: Optional[Iterable] = None,
        mask=None, valid_mask=None, guide: Optional[Callable] = None, progress: bool = True,
        checkpoint=None, clip_norm: Optional[float] = None, optimizer=None,
        check_pair: bool = True) -> FitResult:
    """Fit a model/guide pair by minibatch stochastic variational inference.

    Maximizes the objective's bound :math:`\\sum_i \\mathcal{L}_i` with minibatch estimates
    :math:`\\frac{N}{|B|}\\sum_{i\\in B}\\widehat{\\mathcal{L}}_i` (each epoch visits every row
    once in a fresh random order; the last, smaller batch is kept and scaled by
    :math:`N/|B|` too).

    Parameters
    ----------
    pair : PyroModule with ``.model``/``.guide``, ``(model, guide)`` tuple, or model callable
        Anything keeping the contract ``model(x, mask=None)`` / ``guide(x, mask=None)``.
        Parameters may live in a module (moved with ``.to(device)``) or be ``pyro.param``
        statements (created inside this fit's own parameter store; see ``FitResult``; create
        their initial values on ``x.device``, e.g. ``lambda: x.new_zeros(p)``, for GPU fits).
    data : array-like or tensor, shape (N, p)
        Training data; validated (NaN/inf, width against ``pair.data_dim``, numeric) and by
        the pair's own ``check_data(x, mask=None)`` when it has one, before any step. Data
        are cast to the module's floating dtype (``model.double()`` fits in float64).
    objective : optional
        A pyro-lvm objective (``inference.objectives.ELBO()``, ``IWAE(K)``...) or a
        ``pyro.infer.ELBO`` instance. Default: :class:`inference.objectives.ELBO` (one particle).
    epochs : int
        Total number of epochs (when resuming from ``checkpoint``, including the saved ones).
    batch_size : int
        Rows per minibatch (``batch_size >= N`` is full-batch gradient ascent).
    lr : float
        Learning rate of the default optimizer, ``torch.optim.Adam`` (Kingma & Ba 2015), with
        torch's fused kernel where available (:func:`default_optimizer`).
    seed : int
        Seeds Pyro/torch/numpy/random (``pyro.set_rng_seed``) and the minibatch order. On CPU
        the same seed gives bit-for-bit the same history (except ``time_s``) and parameters.
    device : {"auto", "cpu", "cuda", "cuda:N"} or torch.device
        Where to fit; the module and the data are moved there.
    validation : array-like, optional
        Held-out rows; the bound per row on them is computed after every epoch (no gradient,
        in chunks of ``batch_size``).
    callbacks : iterable, optional
        Objects with any of ``on_fit_start``, ``on_epoch_start``, ``on_step_start``,
        ``on_step_end``, ``on_epoch_end``, ``on_fit_end`` taking a :class:`FitState`; raise
        :class:`StopFit` to stop. Callbacks with ``state_dict``/``load_state_dict`` are
        saved in the checkpoint.
    mask, valid_mask : bool array-like of the data's shape, optional
        Observed entries (True); missing entries may hold NaN. Passed to model and guide.
    guide : callable, optional
        The guide, when ``pair`` is a bare model callable.
    progress : bool
        Show a tqdm bar (epochs x steps) with the running objective and rows per second.
    checkpoint : str or path, optional
        File to save the fit to after every epoch (atomically: module ``state_dict``, extra
        ``pyro.param`` values, optimizer state, history, RNG states, callbacks). If the file
        exists when ``fit`` starts, the fit resumes from it; on CPU the result is identical to
        an uninterrupted run. After Ctrl-C the last completed epoch is on disk. A checkpoint of
        a fit that was stopped early (``StopFit``, ``EarlyStopping``) or has all ``epochs``
        returns at once. The file is a pickle: load only checkpoints you wrote.
    clip_norm : float, optional
        Clip the gradient's global 2-norm to this value.
    optimizer : callable, optional
        ``params -> torch.optim.Optimizer``, or an optimizer class (called with ``lr=lr``).
    check_pair : bool
        Run :func:`inference.check_contract` on the first rows before training (with its own
        random state, so the fit's draws are unaffected). Disable only for pairs the check
        cannot handle.

    Returns
    -------
    FitResult

    Raises
    ------
    ValueError
        Bad arguments, bad data (before any step), a pair breaking the contract
        (:class:`inference.contract.ContractError`), an unusable checkpoint.
    NonFiniteLossError
        A non-finite loss or gradient; no step is taken with it, the parameters are those
        after the last finite step, and the message names epoch, step, site and data row.

    Notes
    -----
    ``train_objective`` is the average of the minibatch estimates over the epoch, with the
    parameters changing as it goes; for a bound *at* the final parameters evaluate the pair
    again (``valid_objective`` on held-out rows is computed at the end of each epoch).
    """
    # -- arguments ------------------------------------------------------------------------
    epochs = _check_int(epochs, "epochs", 1)
    batch_size = _check_int(batch_size, "batch_size", 1)
    lr = _check_positive(lr, "lr")
    seed = _check_int(seed, "seed", 0)
    clip_norm = _check_positive(clip_norm, "clip_norm", allow_none=True)
    callbacks = list(callbacks or [])
    for cb in callbacks:
        if isinstance(cb, type):
            raise TypeError(f"callbacks must be instances, got the class {cb.__name__}; "
                            f"write {cb.__name__}(...)")
        if not any(callable(getattr(cb, hook, None)) for hook in _HOOKS):
            raise TypeError(f"callback {cb!r} has none of the hooks {list(_HOOKS)}")
    model_fn, guide_fn, module = resolve_pair(pair, guide)
    if module is None and isinstance(getattr(model_fn, "__self__", None), torch.nn.Module):
        module = model_fn.__self__  # (m.model, m.guide): still move and checkpoint m
    dev = resolve_device(device)
    if objective is None:
        from pyro_lvm.inference.objectives import ELBO  # objectives imports nothing from fit; no cycle

        objective = ELBO()

    # -- data: everything is validated before the first step ------------------------------
    dtype = _module_dtype(module)
    data_dim = getattr(pair, "data_dim", None)
    data_dim = int(data_dim) if isinstance(data_dim, numbers.Integral) else None
    x, train_mask = _prepare_data(pair, data, mask, name="data", dtype=dtype, data_dim=data_dim)
    num_data, width = int(x.shape[0]), int(x.shape[1])
    if data_dim is None:
        data_dim = width
    x_valid = valid_mask_t = None
    if validation is not None:
        x_valid, valid_mask_t = _prepare_data(pair, validation, valid_mask, name="validation",
                                              dtype=dtype or x.dtype, data_dim=data_dim)
    elif valid_mask is not None:
        raise ValueError("valid_mask was given without validation data")
    adapter = _ObjectiveAdapter(objective, model_fn, guide_fn, num_data)
    if optimizer is None:
        make_optimizer = lambda params: default_optimizer(params, lr)  # noqa: E731
    elif isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        make_optimizer = lambda params: optimizer(params, lr=lr)  # noqa: E731
    elif callable(optimizer):
        make_optimizer = optimizer
    else:
        raise TypeError(f"optimizer must be a callable params -> torch.optim.Optimizer or an "
                        f"optimizer class, got {type(optimizer).__name__}")

    if module is not None:
        module.to(dev)
    x = x.to(dev)
    train_mask = None if train_mask is None else train_mask.to(dev)
    if x_valid is not None:
        x_valid = x_valid.to(dev)
        valid_mask_t = None if valid_mask_t is None else valid_mask_t.to(dev)

    steps_per_epoch = math.ceil(num_data / batch_size)
    config = {"num_data": num_data, "data_dim": width, "batch_size": batch_size,
              "objective_name": adapter.name, "seed": seed, "data_fingerprint": _fingerprint(x),
              "has_module": module is not None}
    ckpt_path = None if checkpoint is None else pathlib.Path(checkpoint)
    payload = None
    if ckpt_path is not None and ckpt_path.exists():
        payload = _load_checkpoint(ckpt_path, config)
        if payload["epochs_completed"] > epochs:
            raise ValueError(f"checkpoint {str(ckpt_path)!r} already holds "
                             f"{payload['epochs_completed']} epochs but epochs={epochs}; ask for "
                             f"at least as many epochs or delete the file")

    state = FitState(steps_per_epoch=steps_per_epoch, num_epochs=epochs, model=pair,
                     module=module, objective=objective, num_data=num_data,
                     batch_size=batch_size, device=dev, has_validation=x_valid is not None)
    hooks = {h: [getattr(cb, h) for cb in callbacks if callable(getattr(cb, h, None))]
             for h in _HOOKS}
    batch_generator = torch.Generator()
    step_losses: List[float] = []
    step_objectives: List[float] = []
    start_epoch, elapsed_before = 0, 0.0
    stopped, stop_reason = False, None
    pending_optimizer_state = None
    finite_snapshot = None  # (epoch index, FitState.snapshot()) known to be finite
    fit_start = time.perf_counter()
    bar = None

    with isolated_param_store() as store_state:
        # -- start or resume --------------------------------------------------------------
        if payload is None:
            pyro.set_rng_seed(seed)
            batch_generator.manual_seed(seed)
        else:
            if module is not None and payload["module_state"] is not None:
                module.load_state_dict(payload["module_state"])
            saved_store = payload["param_store"]
            if saved_store["params"]:
                pyro.get_param_store().set_state({
                    "params": {n: t.to(dev).requires_grad_(True)
                               for n, t in saved_store["params"].items()},
                    "constraints": dict(saved_store["constraints"])})
            _set_rng_state(payload["rng"], dev)
            batch_generator.set_state(payload["rng"]["batch_generator"])
            state.history = [dict(row) for row in payload["history"]]
            state.global_step = payload["global_step"]
            step_losses = list(payload["step_losses"])
            step_objectives = list(payload["step_objectives"])
            start_epoch = payload["epochs_completed"]
            elapsed_before = payload["elapsed_s"]
            stopped, stop_reason = payload["stopped_early"], payload["stop_reason"]
            pending_optimizer_state = payload["optimizer"]

        if check_pair:
            rows = min(num_data, _CONTRACT_CHECK_ROWS)
            fork_devices = [dev] if dev.type == "cuda" else []
            with torch.random.fork_rng(devices=fork_devices):
                check_contract(pair, x[:rows], None if train_mask is None else train_mask[:rows],
                               guide=guide, require_reparameterized=adapter.requires_reparameterized)

        for hook in hooks["on_fit_start"]:
            hook(state)
        if payload is not None:
            for cb, cb_state in zip(callbacks, payload["callbacks"]):
                if cb_state is not None and callable(getattr(cb, "load_state_dict", None)):
                    cb.load_state_dict(cb_state)

        def elapsed() -> float:
            return elapsed_before + time.perf_counter() - fit_start

        def history_frame() -> pd.DataFrame:
            return _history_frame(state.history)

        def save_checkpoint(epochs_completed: int) -> None:
            owned = set() if module is None else {id(p) for p in module.parameters()}
            store = pyro.get_param_store()
            extra = {n: p for n, p in store.named_parameters() if id(p) not in owned}
            rng = _rng_state(dev)
            rng["batch_generator"] = batch_generator.get_state()
            _save_checkpoint(ckpt_path, {
                "format": _CHECKPOINT_FORMAT, "version": _CHECKPOINT_VERSION, "config": config,
                "epochs_completed": epochs_completed, "global_step": state.global_step,
                "module_state": None if module is None else {
                    k: v.detach().cpu() for k, v in module.state_dict().items()},
                "param_store": {"params": {n: p.detach().cpu() for n, p in extra.items()},
                                "constraints": {n: store._constraints[n] for n in extra}},
                "optimizer": None if state.optimizer is None else state.optimizer.state_dict(),
                "history": state.history, "step_losses": step_losses,
                "step_objectives": step_objectives, "rng": rng, "elapsed_s": elapsed(),
                "stopped_early": stopped, "stop_reason": stop_reason,
                "callbacks": [cb.state_dict() if callable(getattr(cb, "state_dict", None))
                              else None for cb in callbacks],
            })

        def fail(message: str, *, epoch, step, **details):
            # The optimizer step was not taken, so the live parameters are the last finite ones.
            raise NonFiniteLossError(
                message, epoch=epoch + 1, step=step + 1, global_step=state.global_step + 1,
                history=history_frame(), param_store_state=pyro.get_param_store().get_state(),
                **details)

        def non_finite(exc_or_loss, *, epoch, step, xb, mb, batch_rows, rng_before,
                       loss_value=None, grad_norm=None, finite_snapshot=None):
            where = (f"epoch {epoch + 1}, step {step + 1} (global step {state.global_step + 1})")
            restored = ("parameters restored to the last finite values " + (
                f"(after global step {state.global_step})" if state.global_step
                else "(their initial values)"))
            names = _param_names(module, state.params)
            bad_params = [names[id(p)] for p in state.params if not bool(torch.isfinite(p).all())]
            if bad_params:
                # Only a custom optimizer can step finite parameters to non-finite ones; the
                # epoch-start copy is the last state known to be finite.
                if finite_snapshot is not None:
                    state.restore(finite_snapshot[1])
                    restored_to = (f"parameters restored to their values at the start of epoch "
                                   f"{finite_snapshot[0] + 1}, the last known to be finite")
                else:
                    restored_to = "no finite copy of the parameters was available"
                fail(f"non-finite loss at {where}: parameter(s) {bad_params} hold non-finite "
                     f"values; {restored_to}", epoch=epoch, step=step, parameter=bad_params[0])
            loss_is_finite = loss_value is not None and math.isfinite(loss_value)
            found, diag_error = _diagnose_sites(model_fn, guide_fn, xb, mb, batch_rows,
                                                adapter.num_particles, rng_before, dev)
            if loss_is_finite and grad_norm is not None and not math.isfinite(grad_norm):
                bad_grads = [names[id(p)] for p in state.params
                             if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
                extra = f"; {_describe_site(found)}" if found else ""
                fail(f"non-finite gradient at {where}: the loss {loss_value:.6g} is finite but the "
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
                fail(f"non-finite loss ({loss_value}) at {where}: {why}; {restored}",
                     epoch=epoch, step=step)
            value = "" if loss_value is None else f" ({loss_value})"
            fail(f"non-finite loss{value} at {where}: {_describe_site(found)}; {restored}",
                 epoch=epoch, step=step, site=found["site"], role=found["role"],
                 rows=[r for _, r in found["rows"]])

        # -- the loop ---------------------------------------------------------------------
        if progress and not stopped and start_epoch < epochs:
            bar = tqdm(total=epochs * steps_per_epoch, initial=start_epoch * steps_per_epoch,
                       desc=f"fit {adapter.name}", unit="step", dynamic_ncols=True)
        try:
            for epoch in range(start_epoch, epochs):
                if stopped:
                    break
                state.epoch, state.step, state.current_row = epoch, 0, {}
                if state.params:
                    # A copy per epoch for the rare case of parameters stepped to non-finite
                    # values (possible with custom optimizers); kept only while finite.
                    snapshot = state.snapshot()
                    if _all_finite(snapshot):
                        finite_snapshot = (epoch, snapshot)
                stop_exc = None
                try:
                    for hook in hooks["on_epoch_start"]:
                        hook(state)
                except StopFit as exc:
                    stop_exc = exc
                order = torch.randperm(num_data, generator=batch_generator)
                order_dev = order.to(dev)
                bound_sum, rows_seen = 0.0, 0
                epoch_clock, last_postfix = time.perf_counter(), 0.0
                if stop_exc is None:
                    try:
                        for step in range(steps_per_epoch):
                            state.step = step
                            for hook in hooks["on_step_start"]:
                                hook(state)
                            idx = order_dev[step * batch_size:(step + 1) * batch_size]
                            xb = x.index_select(0, idx)
                            mb = None if train_mask is None else train_mask.index_select(0, idx)
                            rng_before = _torch_rng_state(dev)
                            if state.optimizer is not None:
                                state.optimizer.zero_grad(set_to_none=True)
                            batch_rows = order[step * batch_size:(step + 1) * batch_size]
                            first_step = state.optimizer is None
                            try:
                                if first_step:
                                    # Like Pyro's SVI: the parameters are whatever the first
                                    # loss evaluation touches (module ones included).
                                    with poutine.trace(param_only=True) as capture:
                                        loss = adapter.train_loss(xb, mb)
                                else:
                                    loss = adapter.train_loss(xb, mb)
                            except ValueError as exc:
                                # Distribution validation rejects NaN parameters with a
                                # ValueError: locate the site (other ValueErrors re-raise).
                                non_finite(exc, epoch=epoch, step=step, xb=xb, mb=mb,
                                           batch_rows=batch_rows, rng_before=rng_before,
                                           finite_snapshot=finite_snapshot)
                            if first_step:
                                state.params = _collect_params(module, capture.trace)
                                if not state.params:
                                    raise ValueError(
                                        "the pair has no trainable parameters (no module "
                                        "parameter and no pyro.param site was found)")
                                state.optimizer = make_optimizer(state.params)
                                if not isinstance(state.optimizer, torch.optim.Optimizer):
                                    raise TypeError(
                                        f"optimizer(params) must return a torch.optim."
                                        f"Optimizer, got {type(state.optimizer).__name__}")
                                if pending_optimizer_state is not None:
                                    state.optimizer.load_state_dict(pending_optimizer_state)
                                    pending_optimizer_state = None
                                if finite_snapshot is None:
                                    finite_snapshot = (epoch, state.snapshot())
                            grads = [p.grad for p in state.params if p.grad is not None]
                            grad_norm = torch.nn.utils.get_total_norm(grads).to(loss)
                            loss_value, norm_value = torch.stack([loss.reshape(()),
                                                                  grad_norm]).tolist()
                            if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
                                non_finite(None, epoch=epoch, step=step, xb=xb, mb=mb,
                                           batch_rows=batch_rows, rng_before=rng_before,
                                           loss_value=loss_value, grad_norm=norm_value,
                                           finite_snapshot=finite_snapshot)
                            if clip_norm is not None:
                                torch.nn.utils.clip_grads_with_norm_(state.params, clip_norm,
                                                                     grad_norm)
                            state.optimizer.step()
                            state.global_step += 1
                            rows = int(idx.shape[0])
                            state.loss = loss_value
                            state.step_objective = -loss_value / num_data
                            step_losses.append(loss_value)
                            step_objectives.append(state.step_objective)
                            # -loss * |B| / N = sum of the batch's per-row bounds
                            bound_sum += -loss_value * rows / num_data
                            rows_seen += rows
                            for hook in hooks["on_step_end"]:
                                hook(state)
                            if bar is not None:
                                bar.update(1)
                                now = time.perf_counter()
                                if now - last_postfix > 0.5:
                                    last_postfix = now
                                    bar.set_postfix_str(
                                        f"epoch {epoch + 1}/{epochs} objective "
                                        f"{bound_sum / rows_seen:.4g} "
                                        f"{rows_seen / max(now - epoch_clock, 1e-9):.0f} rows/s",
                                        refresh=False)
                    except StopFit as exc:
                        stop_exc = exc
                if rows_seen == 0:  # stopped before any step of this epoch
                    stopped, stop_reason = True, str(stop_exc) if stop_exc else None
                    break

                # -- end of epoch: history row, callbacks, checkpoint ---------------------
                valid_value = math.nan
                if x_valid is not None:
                    total = 0.0
                    for start in range(0, x_valid.shape[0], batch_size):
                        chunk = x_valid[start:start + batch_size]
                        chunk_mask = (None if valid_mask_t is None
                                      else valid_mask_t[start:start + batch_size])
                        total += adapter.eval_sum(chunk, chunk_mask)
                    valid_value = total / x_valid.shape[0]
                row = {"epoch": epoch + 1, "step": state.global_step,
                       "train_objective": bound_sum / rows_seen, "valid_objective": valid_value,
                       "time_s": elapsed()}
                row.update(state.current_row)
                state.current_row = row
                state.history.append(row)
                try:
                    for hook in hooks["on_epoch_end"]:
                        hook(state)
                except StopFit as exc:
                    stop_exc = stop_exc or exc
                row["time_s"] = elapsed()
                if stop_exc is not None:
                    stopped, stop_reason = True, str(stop_exc)
                if bar is not None:
                    valid_text = "" if x_valid is None else f" valid {valid_value:.4g}"
                    bar.set_postfix_str(f"epoch {epoch + 1}/{epochs} objective "
                                        f"{row['train_objective']:.4g}{valid_text}")
                if ckpt_path is not None:
                    save_checkpoint(epoch + 1)
        finally:
            if bar is not None:
                bar.close()

        for hook in hooks["on_fit_end"]:
            hook(state)

    return FitResult(
        model=pair, history=_history_frame(state.history), objective_name=adapter.name,
        device=dev, seed=seed, elapsed_s=elapsed_before + time.perf_counter() - fit_start,
        stopped_early=stopped, stop_reason=stop_reason, step_losses=step_losses,
        step_objectives=step_objectives, param_store_state=store_state, num_data=num_data,
        batch_size=batch_size, checkpoint=None if ckpt_path is None else str(ckpt_path))
