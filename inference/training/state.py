"""What a fit returns (:class:`FitResult`) and what its callbacks see (:class:`FitState`)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import pandas as pd
import pyro
import torch

__all__ = ["HISTORY_COLUMNS", "StopFit", "FitResult", "FitState", "history_frame", "all_finite"]

#: Columns every history row has, in this order (callbacks may add more).
HISTORY_COLUMNS = ("epoch", "step", "train_objective", "valid_objective", "time_s")


class StopFit(Exception):
    """Raise from a callback to end the fit early.

    Raised in a step hook, the current epoch is closed after that step (its history row
    covers the steps taken); raised in ``on_epoch_end``, the fit ends after that epoch. The
    exception's message becomes ``FitResult.stop_reason``.
    """



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
    guide : callable or None
        The ``guide=`` given to :func:`fit` (when the pair was a bare model callable).

    A fit result can be passed wherever a pair is expected (``log_likelihood(result, x)``,
    ``elbo``, ``evaluate``, ``diagnose``, ``to_inference_data``...): the trained
    ``pyro.param`` values are then activated for the evaluation, and the pair's optional
    methods (``log_marginal``, ``sample``...) are read through the result.
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
    guide: Any = None

    def __getattr__(self, name: str):
        # A fit result stands in for its pair everywhere (log_likelihood(result, x), ...):
        # the pair's optional methods (log_marginal, sample, reconstruct, data_dim, ...) are
        # read through it. Dunder and private names are not forwarded (copy, pickle).
        if name.startswith("_") or name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)

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



def all_finite(snapshot: dict) -> bool:
    tensors = list((snapshot.get("module") or {}).values()) + list(snapshot["store"].values())
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def history_frame(rows: List[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame({c: pd.Series(dtype="int64" if c in ("epoch", "step") else "float64")
                             for c in HISTORY_COLUMNS})
    extra = [c for c in frame.columns if c not in HISTORY_COLUMNS]
    return frame[list(HISTORY_COLUMNS) + extra].reset_index(drop=True)

