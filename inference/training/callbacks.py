"""Callbacks for :func:`pyro_lvm.inference.fit`: early stopping and KL warm-up.

A callback is any object with some of the hooks in :data:`HOOKS`, each taking the fit's
:class:`~pyro_lvm.inference.training.FitState`; raising :class:`~pyro_lvm.inference.training.StopFit`
ends the fit. Callbacks with ``state_dict``/``load_state_dict`` are saved in checkpoints.
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable, List

from pyro_lvm.inference.engine import check_int
from pyro_lvm.inference.training.state import FitState, StopFit

__all__ = ["HOOKS", "check_callbacks", "EarlyStopping", "KLWarmup", "linear_warmup"]

HOOKS = ("on_fit_start", "on_epoch_start", "on_step_start", "on_step_end", "on_epoch_end",
         "on_fit_end")


def check_callbacks(callbacks: Iterable) -> List:
    """The callbacks as a list, each checked to be an instance with at least one hook."""
    callbacks = list(callbacks or [])
    for cb in callbacks:
        if isinstance(cb, type):
            raise TypeError(f"callbacks must be instances, got the class {cb.__name__}; "
                            f"write {cb.__name__}(...)")
        if not any(callable(getattr(cb, hook, None)) for hook in HOOKS):
            raise TypeError(f"callback {cb!r} has none of the hooks {list(HOOKS)}")
    return callbacks


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
        check_int(patience, "patience", 1)
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
# KL warm-up
# ----------------------------------------------------------------------------------------

def linear_warmup(step, total_steps) -> float:
    """Linear warm-up weight :math:`\\beta_t = \\min(1, t / T)` at step ``t >= 0`` of ``T > 0``."""
    if isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Real) \
            or not total_steps > 0:
        raise ValueError(f"total_steps must be a positive number, got {total_steps!r}")
    if isinstance(step, bool) or not isinstance(step, numbers.Real) or step < 0:
        raise ValueError(f"step must be a number >= 0, got {step!r}")
    return float(min(1.0, step / total_steps))


class KLWarmup:
    """``fit`` callback: KL warm-up, :math:`\\beta` linear from 0 to 1 over ``epochs`` epochs.

    Before every optimization step sets ``state.objective.beta =
    linear_warmup(state.global_step + start_epoch * state.steps_per_epoch, epochs *
    state.steps_per_epoch)`` (so the first step uses :math:`\\beta = 0` and :math:`\\beta = 1`
    from step ``epochs * steps_per_epoch`` on) and logs it as the ``beta`` column of the
    history. Needs an objective with a settable KL weight (:class:`ELBO`); the objective is left
    at :math:`\\beta = 1` only once warm-up ends, so report bounds from epochs after the warm-up
    (Bowman et al. 2016; Sønderby et al. 2016).

    ``start_epoch`` continues a schedule begun by an earlier fit (e.g. a warm start of that
    many epochs): the warm-up goes on where it stood instead of restarting at 0.
    """

    def __init__(self, epochs, start_epoch: int = 0):
        if isinstance(epochs, bool) or not isinstance(epochs, numbers.Real) or not epochs > 0:
            raise ValueError(f"KLWarmup: epochs must be a positive number, got {epochs!r}")
        check_int(start_epoch, "KLWarmup: start_epoch", 0)
        self.epochs = epochs
        self.start_epoch = int(start_epoch)

    @staticmethod
    def _objective(state):
        objective = getattr(state, "objective", None)
        if not getattr(objective, "supports_beta", False):
            raise ValueError(
                f"KLWarmup needs an objective with a KL weight beta (inference.objectives.ELBO); "
                f"got {type(objective).__name__}"
                + (" (the importance-weighted bound has no KL term to weight)"
                   if type(objective).__name__ == "IWAE" else "")
            )
        return objective

    def _beta(self, state) -> float:
        steps_per_epoch = getattr(state, "steps_per_epoch", None)
        if not steps_per_epoch:
            raise ValueError(f"KLWarmup: state.steps_per_epoch must be a positive integer, got "
                             f"{steps_per_epoch!r}")
        offset = self.start_epoch * int(steps_per_epoch)
        return linear_warmup(state.global_step + offset, self.epochs * steps_per_epoch)

    def on_fit_start(self, state) -> None:
        objective = self._objective(state)  # fails early for an objective without a KL weight
        objective.beta = self._beta(state)

    def on_step_start(self, state) -> None:
        objective = self._objective(state)
        beta = self._beta(state)
        objective.beta = beta
        log = getattr(state, "log", None)
        if callable(log):
            log("beta", beta)

    def __repr__(self) -> str:
        start = f", start_epoch={self.start_epoch}" if self.start_epoch else ""
        return f"KLWarmup(epochs={self.epochs}{start})"
