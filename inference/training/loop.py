"""The fitting loop: :func:`fit` checks its arguments and builds a :class:`FitRun`, which
starts (or resumes) the fit and runs epochs of :func:`~pyro_lvm.inference.training.step.train_step`
with the callbacks, validation and checkpoints around them."""
from __future__ import annotations

import functools
import math
import numbers
import sys
import time
import warnings
from typing import Callable, Iterable, List, Optional

import pyro
import pyro.poutine as poutine
from pyro.infer.util import is_validation_enabled
import torch
from tqdm import tqdm

from pyro_lvm.inference import engine
from pyro_lvm.inference.engine import check_int as _check_int
from pyro_lvm.inference.contract import check_contract
from pyro_lvm.inference.training import checkpoint as ckpt
from pyro_lvm.inference.training.callbacks import HOOKS, check_callbacks
from pyro_lvm.inference.training.forensics import raise_non_finite
from pyro_lvm.inference.training.row_checks import check_every_row
from pyro_lvm.inference.training.state import (FitResult, FitState, StopFit, all_finite,
                                          history_frame)
from pyro_lvm.inference.training.cuda_graph import GraphedTrainStep, cuda_graph_unavailable
from pyro_lvm.inference.training.step import (ObjectiveAdapter, collect_params, optimizer_factory,
                                         optimizer_name, train_step)

__all__ = ["fit", "FitRun"]

#: Rows used by the contract check that runs before training (cheap: the check only needs
#: the structure of the pair, not all the data).
_CONTRACT_CHECK_ROWS = 16


def _check_positive(value, name: str, allow_none: bool = False) -> Optional[float]:
    if value is None and allow_none:
        return None
    if (not isinstance(value, numbers.Real) or isinstance(value, bool)
            or not math.isfinite(value) or value <= 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _prepare_inputs(pair, module, data, mask, validation, valid_mask):
    """Training and validation data (and masks) validated before the first step, in the
    module's floating dtype."""
    dtype = engine.module_dtype(module)
    x, train_mask = engine.prepare_data(pair, data, mask, name="data", dtype=dtype, module=module)
    # checks that need the whole training set (not a minibatch), e.g. constant columns
    check_training = getattr(pair, "check_training_data", None)
    if callable(check_training):
        check_training(x, train_mask)
    x_valid = valid_mask_t = None
    if validation is not None:
        x_valid, valid_mask_t = engine.prepare_data(pair, validation, valid_mask,
                                                    name="validation", dtype=dtype or x.dtype,
                                                    data_dim=int(x.shape[1]), module=module)
    elif valid_mask is not None:
        raise ValueError("valid_mask was given without validation data")
    return x, train_mask, x_valid, valid_mask_t


class FitRun:
    """One fit in progress: its data on the device, objective, optimizer, callbacks, history
    and checkpoint. :meth:`run` takes it from the start (or a checkpoint) to the end."""

    def __init__(self, *, pair, guide, model_fn, guide_fn, module, objective, x, mask,
                 x_valid, valid_mask, epochs, batch_size, seed, device, callbacks,
                 optimizer, lr, clip_norm, checkpoint, progress, check_pair, cuda_graph=False,
                 validate_every_step=False):
        self.pair, self.guide, self.module = pair, guide, module
        self.model_fn, self.guide_fn = model_fn, guide_fn
        self.device, self.seed, self.epochs, self.batch_size = device, seed, epochs, batch_size
        self.clip_norm, self.progress, self.check_pair = clip_norm, progress, check_pair
        self.callbacks, self.make_optimizer = callbacks, optimizer_factory(optimizer, lr)
        self.num_data = int(x.shape[0])
        # with Pyro's validation on, every row is checked once before the first step, and the
        # steps run without the per-call checks unless asked for (training.row_checks)
        self.rows_checked_once = is_validation_enabled() and not validate_every_step
        self.adapter = ObjectiveAdapter(
            objective, model_fn, guide_fn, self.num_data,
            step_validation=is_validation_enabled() and bool(validate_every_step), module=module)
        self.config = {"num_data": self.num_data, "data_dim": int(x.shape[1]),
                       "batch_size": batch_size, "objective_name": self.adapter.name, "lr": lr,
                       "optimizer": optimizer_name(optimizer), "seed": seed,
                       "data_fingerprint": ckpt.fingerprint(x), "has_module": module is not None}
        # a checkpoint is read (and refused) before anything moves
        self.ckpt_path = None if checkpoint is None else ckpt.check_path(checkpoint)
        self.payload = None
        if self.ckpt_path is not None and self.ckpt_path.exists():
            self.payload = ckpt.load_checkpoint(self.ckpt_path, self.config)
            if self.payload["epochs_completed"] > epochs:
                raise ValueError(f"checkpoint {str(self.ckpt_path)!r} already holds "
                                 f"{self.payload['epochs_completed']} epochs but epochs={epochs}; "
                                 f"ask for at least as many epochs or delete the file")
        if module is not None:
            module.to(device)
        self.x = x.to(device)
        self.mask = None if mask is None else mask.to(device)
        self.x_valid = None if x_valid is None else x_valid.to(device)
        self.valid_mask = None if valid_mask is None else valid_mask.to(device)
        self.steps_per_epoch = math.ceil(self.num_data / batch_size)
        # validation rows per pass: the minibatch size, within the engine's one chunk budget
        self._valid_rows = None if x_valid is None else engine.plan_chunks(
            int(x_valid.shape[0]), self.adapter.num_particles, int(x.shape[1]),
            max_elements=engine.default_max_elements(device), chunk_size=self.adapter.num_particles,
            batch_size=None)[0]
        if self._valid_rows is not None:
            self._valid_rows = min(self._valid_rows, batch_size)
        self.state = FitState(steps_per_epoch=self.steps_per_epoch, num_epochs=epochs, model=pair,
                              module=module, objective=objective, num_data=self.num_data,
                              batch_size=batch_size, device=device,
                              has_validation=self.x_valid is not None)
        self.hooks = {h: [getattr(cb, h) for cb in callbacks if callable(getattr(cb, h, None))]
                      for h in HOOKS}
        self.batch_generator = torch.Generator()
        self.step_losses: List[float] = []
        self.step_objectives: List[float] = []
        self.start_epoch, self.elapsed_before = 0, 0.0
        self.stopped, self.stop_reason = False, None
        self.pending_optimizer_state = None
        self.finite_snapshot = None  # (epoch index, FitState.snapshot()) known to be finite
        self.fit_start = time.perf_counter()
        self.bar = None
        self.step_fn = self._step_function(cuda_graph)

    def _step_function(self, cuda_graph: bool):
        """The step: eager :func:`train_step`, or graph-captured replays (``cuda_graph``)."""
        if cuda_graph:
            why_not = cuda_graph_unavailable(self.device)
            if why_not is None:
                return GraphedTrainStep(self)
            print(f"{why_not}; training eagerly", file=sys.stderr)
        return functools.partial(train_step, self)

    # -- small services used by the step and the forensics ---------------------------------
    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.fit_start

    def torch_rng_state(self) -> dict:
        return ckpt.torch_rng_state(self.device)

    def non_finite(self, exc_or_loss, **where) -> None:
        raise_non_finite(self, exc_or_loss, **where)

    def start_optimizer(self, params: List[torch.Tensor], epoch: int) -> None:
        """Build the optimizer over ``params`` (restoring a checkpoint's optimizer state)."""
        state = self.state
        state.params = params
        if not params:
            raise ValueError("the pair has no trainable parameters (no module parameter and no "
                             "pyro.param site was found)")
        state.optimizer = self.make_optimizer(params)
        if not isinstance(state.optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer(params) must return a torch.optim.Optimizer, got "
                            f"{type(state.optimizer).__name__}")
        if self.pending_optimizer_state is not None:
            state.optimizer.load_state_dict(self.pending_optimizer_state)
            self.pending_optimizer_state = None
        if self.finite_snapshot is None:
            self.finite_snapshot = (epoch, state.snapshot())

    # -- start, resume, checkpoint ----------------------------------------------------------
    def _start(self) -> None:
        """Seed a new fit, or restore the module and the bookkeeping from the checkpoint (the
        parameter-store values, the optimizer and the random states follow once the pair has
        created its parameters: :meth:`_restore_parameters`, :meth:`_restore_random_state`)."""
        payload, state = self.payload, self.state
        if payload is None:
            pyro.set_rng_seed(self.seed)
            self.batch_generator.manual_seed(self.seed)
            return
        if self.module is not None and payload["module_state"] is not None:
            self.module.load_state_dict(payload["module_state"])
        state.history = [dict(row) for row in payload["history"]]
        state.global_step = payload["global_step"]
        self.step_losses = list(payload["step_losses"])
        self.step_objectives = list(payload["step_objectives"])
        self.start_epoch = payload["epochs_completed"]
        self.elapsed_before = payload["elapsed_s"]
        self.stopped, self.stop_reason = payload["stopped_early"], payload["stop_reason"]
        self.pending_optimizer_state = payload["optimizer"]

    def _collect_parameters(self) -> List[torch.Tensor]:
        """The tensors to optimize, found like Pyro's SVI does (whatever a loss evaluation
        touches, module parameters included) from one loss evaluation on the first rows,
        without gradients and with its own random stream. Doing this before the first step
        (rather than tracing the first step) means every step, the first after a resume
        included, runs exactly as the others: the same code path, the same draws."""
        rows = min(self.num_data, self.batch_size)
        xb = self.x[:rows]
        mb = None if self.mask is None else self.mask[:rows]
        fork_devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=fork_devices), \
                poutine.trace(param_only=True) as capture:
            self.adapter.eval_sum(xb, mb)
        return collect_params(self.module, capture.trace)

    def _restore_parameters(self) -> None:
        """Copy the checkpoint's ``pyro.param`` values into the parameters the pair created
        (constraints come from the pair's code, never from the file)."""
        saved = self.payload["param_store"]["params"]
        live = dict(pyro.get_param_store().named_parameters())
        missing = sorted(set(saved) - set(live))
        if missing:
            raise ValueError(f"checkpoint {str(self.ckpt_path)!r} holds parameter(s) {missing} "
                             f"that the pair did not create; it was written by another pair")
        with torch.no_grad():
            for name, value in saved.items():
                if live[name].shape != value.shape:
                    raise ValueError(
                        f"checkpoint {str(self.ckpt_path)!r}: parameter {name!r} has shape "
                        f"{tuple(value.shape)} there, {tuple(live[name].shape)} in the pair")
                live[name].copy_(value)

    def _restore_random_state(self) -> None:
        """The random states of the checkpoint, set last before the loop so that nothing run
        while starting up (contract check, callbacks' ``on_fit_start``) shifts them."""
        if self.payload is not None:
            ckpt.set_rng_state(self.payload["rng"], self.device)
            self.batch_generator.set_state(self.payload["rng"]["batch_generator"])

    def _save_checkpoint(self, epochs_completed: int) -> None:
        state, module = self.state, self.module
        owned = set() if module is None else {id(p) for p in module.parameters()}
        store = pyro.get_param_store()
        rng = ckpt.rng_state(self.device)
        rng["batch_generator"] = self.batch_generator.get_state()
        ckpt.save_checkpoint(self.ckpt_path, {
            "format": ckpt.CHECKPOINT_FORMAT, "version": ckpt.CHECKPOINT_VERSION,
            "config": self.config, "epochs_completed": epochs_completed,
            "global_step": state.global_step,
            "module_state": None if module is None else dict(module.state_dict()),
            "param_store": {"params": {n: p for n, p in store.named_parameters()
                                       if id(p) not in owned}},
            "optimizer": None if state.optimizer is None else state.optimizer.state_dict(),
            "history": state.history, "step_losses": self.step_losses,
            "step_objectives": self.step_objectives, "rng": rng, "elapsed_s": self.elapsed(),
            "stopped_early": self.stopped, "stop_reason": self.stop_reason,
            "callbacks": [cb.state_dict() if callable(getattr(cb, "state_dict", None)) else None
                          for cb in self.callbacks],
        })

    def _check_pair(self) -> None:
        rows = min(self.num_data, _CONTRACT_CHECK_ROWS)
        fork_devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=fork_devices):
            check_contract(self.pair, self.x[:rows], None if self.mask is None else self.mask[:rows],
                           guide=self.guide,
                           require_reparameterized=self.adapter.requires_reparameterized)

    # -- the loop ---------------------------------------------------------------------------
    def _call_hooks(self, name: str) -> Optional[StopFit]:
        try:
            for hook in self.hooks[name]:
                hook(self.state)
        except StopFit as exc:
            return exc
        return None

    def _train_epoch(self, epoch: int):
        """The epoch's steps; returns ``(sum of the per-row bounds, rows seen, StopFit or
        None)``."""
        state, batch_size = self.state, self.batch_size
        order = torch.randperm(self.num_data, generator=self.batch_generator)
        order_dev = order.to(self.device)
        bound_sum, rows_seen = 0.0, 0
        epoch_clock, last_postfix = time.perf_counter(), 0.0
        try:
            for step in range(self.steps_per_epoch):
                state.step = step
                for hook in self.hooks["on_step_start"]:
                    hook(state)
                idx = order_dev[step * batch_size:(step + 1) * batch_size]
                xb = self.x.index_select(0, idx)
                mb = None if self.mask is None else self.mask.index_select(0, idx)
                loss_value = self.step_fn(xb, mb, order[step * batch_size:(step + 1) * batch_size],
                                        epoch=epoch, step=step)
                rows = int(idx.shape[0])
                state.loss = loss_value
                state.step_objective = -loss_value / self.num_data
                self.step_losses.append(loss_value)
                self.step_objectives.append(state.step_objective)
                # -loss * |B| / N = sum of the batch's per-row bounds
                bound_sum += -loss_value * rows / self.num_data
                rows_seen += rows
                for hook in self.hooks["on_step_end"]:
                    hook(state)
                if self.bar is not None:
                    last_postfix = self._show_step(epoch, bound_sum, rows_seen, epoch_clock,
                                                   last_postfix)
        except StopFit as exc:
            return bound_sum, rows_seen, exc
        return bound_sum, rows_seen, None

    def _show_step(self, epoch, bound_sum, rows_seen, epoch_clock, last_postfix) -> float:
        self.bar.update(1)
        now = time.perf_counter()
        if now - last_postfix <= 0.5:
            return last_postfix
        self.bar.set_postfix_str(
            f"epoch {epoch + 1}/{self.epochs} objective {bound_sum / rows_seen:.4g} "
            f"{rows_seen / max(now - epoch_clock, 1e-9):.0f} rows/s", refresh=False)
        return now

    def _valid_objective(self) -> float:
        if self.x_valid is None:
            return math.nan
        total, rows = 0.0, self._valid_rows
        for start in range(0, self.x_valid.shape[0], rows):
            chunk = self.x_valid[start:start + rows]
            chunk_mask = None if self.valid_mask is None else self.valid_mask[start:start + rows]
            total += self.adapter.eval_sum(chunk, chunk_mask)
        return total / self.x_valid.shape[0]

    def _end_epoch(self, epoch: int, bound_sum: float, rows_seen: int, stop_exc) -> None:
        """History row, ``on_epoch_end`` hooks, checkpoint."""
        state = self.state
        valid_value = self._valid_objective()
        row = {"epoch": epoch + 1, "step": state.global_step,
               "train_objective": bound_sum / rows_seen, "valid_objective": valid_value,
               "time_s": self.elapsed()}
        row.update(state.current_row)
        state.current_row = row
        state.history.append(row)
        stop_exc = stop_exc or self._call_hooks("on_epoch_end")
        row["time_s"] = self.elapsed()
        if stop_exc is not None:
            self.stopped, self.stop_reason = True, str(stop_exc)
        if self.bar is not None:
            valid_text = "" if self.x_valid is None else f" valid {valid_value:.4g}"
            self.bar.set_postfix_str(f"epoch {epoch + 1}/{self.epochs} objective "
                                     f"{row['train_objective']:.4g}{valid_text}")
        if self.ckpt_path is not None:
            self._save_checkpoint(epoch + 1)

    def _run_epoch(self, epoch: int) -> bool:
        """One epoch; returns False when the fit stopped before any step of it."""
        state = self.state
        state.epoch, state.step, state.current_row = epoch, 0, {}
        if state.params:
            # A copy per epoch for the rare case of parameters stepped to non-finite values
            # (possible with custom optimizers); kept only while finite.
            snapshot = state.snapshot()
            if all_finite(snapshot):
                self.finite_snapshot = (epoch, snapshot)
        stop_exc = self._call_hooks("on_epoch_start")
        bound_sum, rows_seen = 0.0, 0
        if stop_exc is None:
            bound_sum, rows_seen, stop_exc = self._train_epoch(epoch)
        else:
            # the epoch's order is drawn even when no step follows (as an uninterrupted fit)
            torch.randperm(self.num_data, generator=self.batch_generator)
        if rows_seen == 0:  # stopped before any step of this epoch
            self.stopped, self.stop_reason = True, str(stop_exc) if stop_exc else None
            return False
        self._end_epoch(epoch, bound_sum, rows_seen, stop_exc)
        return True

    def run(self) -> FitResult:
        with engine.isolated_param_store() as store_state, \
                engine.keep_freed_memory(self.device.type == "cpu"):
            self._start()
            if self.check_pair:
                self._check_pair()
            params = self._collect_parameters()
            if self.payload is not None:
                self._restore_parameters()
            if self.rows_checked_once:
                check_every_row(self.model_fn, self.guide_fn, self.x, self.mask,
                                rows_per_call=self.batch_size, device=self.device)
            self.start_optimizer(params, self.start_epoch)
            self._call_hooks_strict("on_fit_start")
            if self.payload is not None:
                for cb, cb_state in zip(self.callbacks, self.payload["callbacks"]):
                    if cb_state is not None and callable(getattr(cb, "load_state_dict", None)):
                        cb.load_state_dict(cb_state)
            self._restore_random_state()
            if self.progress and not self.stopped and self.start_epoch < self.epochs:
                self.bar = tqdm(total=self.epochs * self.steps_per_epoch,
                                initial=self.start_epoch * self.steps_per_epoch,
                                desc=f"fit {self.adapter.name}", unit="step", dynamic_ncols=True)
            try:
                for epoch in range(self.start_epoch, self.epochs):
                    if self.stopped or not self._run_epoch(epoch):
                        break
            finally:
                if self.bar is not None:
                    self.bar.close()
            self._call_hooks_strict("on_fit_end")
        return FitResult(
            model=self.pair, history=history_frame(self.state.history),
            objective_name=self.adapter.name, device=self.device, seed=self.seed,
            elapsed_s=self.elapsed(), stopped_early=self.stopped, stop_reason=self.stop_reason,
            step_losses=self.step_losses, step_objectives=self.step_objectives,
            param_store_state=store_state, num_data=self.num_data, batch_size=self.batch_size,
            checkpoint=None if self.ckpt_path is None else str(self.ckpt_path), guide=self.guide)

    def _call_hooks_strict(self, name: str) -> None:
        for hook in self.hooks[name]:
            hook(self.state)


def _default_objective():
    from pyro_lvm.inference.objectives import ELBO

    return ELBO()


def _missing_data_masks(pair, guide, data, mask, validation, valid_mask):
    """``fit(allow_missing=True)``: the NaN entries of the data (and of the validation rows)
    join their masks (the pair must accept ``mask``)."""
    from pyro_lvm.inference.impute import missing_data_mask

    mask = missing_data_mask(pair, data, mask, allow_missing=True, guide=guide)
    if validation is not None:
        valid_mask = missing_data_mask(pair, validation, valid_mask, allow_missing=True,
                                       guide=guide, name="validation")
    return mask, valid_mask


def _warn_if_minibatch_biased(objective, batch_size: int, num_data: int) -> None:
    r"""One warning when the objective scales minibatches inside a log-mean-exp.

    Pyro's ``RenyiELBO`` computes :math:`\frac{1}{1-\alpha}\log\frac1K\sum_k
    w_k^{1-\alpha}` over the whole (scaled) minibatch, so the ``N/|B|`` scale that fit applies
    with ``poutine.scale`` ends up inside the log-mean-exp: its minibatch estimates are not
    unbiased for the full-data bound (the ``Trace_ELBO`` family is a sum over rows and scales
    correctly). :class:`~pyro_lvm.inference.objectives.IWAE` scales outside it."""
    if batch_size >= num_data or not isinstance(objective, pyro.infer.RenyiELBO):
        return
    warnings.warn(
        f"pyro.infer.RenyiELBO with minibatches (batch_size={batch_size} < {num_data} rows): the "
        f"N/|B| minibatch scale acts inside RenyiELBO's log-mean-exp, so the reported bound and "
        f"its gradients are biased for the full-data bound. Use pyro_lvm.inference.IWAE"
        f"(num_particles=K), which scales each row's bound outside the log-mean-exp (unbiased), "
        f"or batch_size >= {num_data}", UserWarning, stacklevel=3)


def fit(pair, data, objective=None, epochs: int = 10, batch_size: int = 128, lr: float = 1e-3,
        seed: int = 0, device="auto", validation=None, callbacks: Optional[Iterable] = None,
        mask=None, valid_mask=None, guide: Optional[Callable] = None, progress: bool = True,
        checkpoint=None, clip_norm: Optional[float] = None, optimizer=None,
        check_pair: bool = True, cuda_graph: bool = False,
        allow_missing: bool = False, validate_every_step: bool = False) -> FitResult:
    """Fit a model/guide pair by minibatch stochastic variational inference.

    Maximizes the objective's bound :math:`\\sum_i \\mathcal{L}_i` with minibatch estimates
    :math:`\\frac{N}{|B|}\\sum_{i\\in B}\\widehat{\\mathcal{L}}_i` (each epoch visits every row
    once in a fresh random order; the last, smaller batch is kept and scaled by
    :math:`N/|B|` too).

    Parameters
    ----------
    pair : PyroModule with ``.model``/``.guide``, ``(model, guide)`` tuple, or model callable
        Anything keeping the contract ``model(x, mask=None)`` / ``guide(x, mask=None)``, with
        parameters in a module (moved to ``device``) or ``pyro.param`` statements (created in
        this fit's own parameter store, see ``FitResult``; initial values on ``x.device``).
    data : array-like or tensor, shape (N, p)
        Training data, validated before any step (NaN/inf, numeric, width, the pair's own
        ``check_data``) and cast to the module's floating dtype.
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
        Seeds Pyro/torch/numpy/random and the minibatch order; on CPU the same seed gives
        bit-for-bit the same history (except ``time_s``) and parameters.
    device : {"auto", "cpu", "cuda", "cuda:N"} or torch.device
        Where to fit; the module and the data are moved there.
    validation : array-like, optional
        Held-out rows; the bound per row on them is computed after every epoch (no gradient,
        in chunks of ``batch_size``).
    callbacks : iterable, optional
        Objects with any of ``on_fit_start``, ``on_epoch_start``, ``on_step_start``,
        ``on_step_end``, ``on_epoch_end``, ``on_fit_end`` taking a :class:`FitState`; raise
        :class:`StopFit` to stop. Their ``state_dict`` goes into the checkpoint.
    mask, valid_mask : bool array-like of the data's shape, optional
        Observed entries (True); missing entries may hold NaN. Passed to model and guide.
    allow_missing : bool
        NaN entries of ``data`` / ``validation`` are missing (combined with ``mask``; the pair
        must accept ``mask``); otherwise NaN is an error naming row and column. With a DLVM and
        ``IWAE(K)`` this is MIWAE (Mattei & Frellsen 2019).
    guide : callable, optional
        The guide, when ``pair`` is a bare model callable.
    progress : bool
        Show a tqdm bar (epochs x steps) with the running objective and rows per second.
    checkpoint : str or path, optional
        File saved atomically after every epoch; if it exists, the fit resumes from it,
        bit-for-bit on CPU. A resume with another ``lr``, ``optimizer``, objective,
        ``batch_size``, ``seed`` or data is refused, naming both values; the file is read with
        ``torch.load(weights_only=True)`` (:mod:`pyro_lvm.inference.training.checkpoint`).
    clip_norm : float, optional
        Clip the gradient's global 2-norm to this value.
    optimizer : callable, optional
        ``params -> torch.optim.Optimizer``, or an optimizer class (called with ``lr=lr``).
    check_pair : bool
        Run :func:`inference.check_contract` on the first rows before training (with its own
        random state); disable only for pairs the check cannot handle.
    cuda_graph : bool
        On a CUDA device, capture the training step in CUDA graphs and replay it; steps that
        cannot be captured run eagerly, with a one-line message
        (:mod:`pyro_lvm.inference.training.cuda_graph`).
    validate_every_step : bool
        With Pyro's validation on (its default), every training row is checked once with it
        before the first step and the steps run without the per-call checks
        (:mod:`pyro_lvm.inference.training.row_checks`); ``True`` keeps them in every step.

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

    On the CPU with glibc (Linux), the fit runs inside
    :func:`pyro_lvm.inference.engine.keep_freed_memory`: the C allocator keeps the memory a
    step frees for the next step instead of handing it back to the system and faulting it in
    again (at large ``K`` that costs several ms per step), and returns it when the fit ends.
    This sets glibc's process-wide mmap and trim thresholds, which stay at 32 and 64 MiB after
    the fit (where glibc's own dynamic policy takes them; thresholds set earlier with
    ``mallopt`` are overwritten); ``PYRO_LVM_KEEP_FREED_MEMORY=0`` or the user's own
    ``MALLOC_*`` threshold settings leave the allocator alone.
    """
    # -- arguments ------------------------------------------------------------------------
    epochs = _check_int(epochs, "epochs", 1)
    batch_size = _check_int(batch_size, "batch_size", 1)
    lr = _check_positive(lr, "lr")
    seed = _check_int(seed, "seed", 0)
    clip_norm = _check_positive(clip_norm, "clip_norm", allow_none=True)
    callbacks = check_callbacks(callbacks)
    model_fn, guide_fn, module = engine.resolve_pair(pair, guide)
    if module is None and isinstance(getattr(model_fn, "__self__", None), torch.nn.Module):
        module = model_fn.__self__  # (m.model, m.guide): still move and checkpoint m
    dev = engine.resolve_device(device)
    objective = _default_objective() if objective is None else objective
    if allow_missing:
        mask, valid_mask = _missing_data_masks(pair, guide, data, mask, validation, valid_mask)
    x, train_mask, x_valid, valid_mask_t = _prepare_inputs(pair, module, data, mask, validation,
                                                           valid_mask)
    _warn_if_minibatch_biased(objective, batch_size, int(x.shape[0]))
    run = FitRun(pair=pair, guide=guide, model_fn=model_fn, guide_fn=guide_fn, module=module,
                 objective=objective, x=x, mask=train_mask, x_valid=x_valid,
                 valid_mask=valid_mask_t, epochs=epochs, batch_size=batch_size, seed=seed,
                 device=dev, callbacks=callbacks, optimizer=optimizer, lr=lr,
                 clip_norm=clip_norm, checkpoint=checkpoint, progress=progress,
                 check_pair=check_pair, cuda_graph=bool(cuda_graph),
                 validate_every_step=bool(validate_every_step))
    return run.run()
