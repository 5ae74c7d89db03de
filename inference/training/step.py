"""One optimization step of :func:`pyro_lvm.inference.fit`, and what it needs: one interface
over pyro-lvm and Pyro objectives, the optimizer, the parameters a pair trains."""
from __future__ import annotations

import functools
import math
import warnings
from typing import Dict, List, Optional

import pyro
import pyro.poutine as poutine
import torch

from .silent_modules import silenceable_modules, silent_param_statements

__all__ = ["ObjectiveAdapter", "default_optimizer", "optimizer_factory", "collect_params",
           "param_names", "optimizer_name", "gradient_summary", "finite_step", "train_step"]


class ObjectiveAdapter:
    """One interface over both kinds of objective.

    * pyro-lvm objectives (class attribute ``pyro_lvm_objective = True``) take ``num_data``
      and scale outside the log-mean-exp themselves.
    * ``pyro.infer.ELBO`` instances are given model and guide wrapped in
      ``poutine.scale(scale=N / |B|)``, which for the ELBO (a sum of per-row terms) is the
      same unbiased minibatch scaling.
    """

    def __init__(self, objective, model_fn, guide_fn, num_data: int, *,
                 step_validation: bool, module=None):
        if isinstance(objective, type):
            raise TypeError(f"objective must be an instance, got the class {objective.__name__}; "
                            f"write {objective.__name__}() instead")
        self.objective = objective
        self.model_fn, self.guide_fn, self.num_data = model_fn, guide_fn, num_data
        #: Pyro's validation during training steps (fit turns it off once every row has been
        #: checked: :mod:`pyro_lvm.inference.training.row_checks`)
        self.step_validation = step_validation
        #: the pair's PyroModule, whose parameter statements the steps may skip
        #: (:mod:`pyro_lvm.inference.training.silent_modules`); its tree is inspected at first use
        self._module, self._silent = module, None
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
        """Scaled minibatch loss with gradients accumulated into ``.grad`` (returns it detached),
        with Pyro's validation as :attr:`step_validation` says."""
        if self._silent is None:  # Pyro's own ELBOs look for param sites: never silenced
            self._silent = silent_param_statements(
                silenceable_modules(self._module) if self.kind == "pyro_lvm" else None)
        with pyro.validation_enabled(self.step_validation), self._silent:
            return self._train_loss(xb, mb)

    def _train_loss(self, xb, mb):
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
        with torch.no_grad():
            return -float(self.objective.loss(self.model_fn, self.guide_fn, xb, mask=mb))



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


def collect_params(module, capture_trace) -> List[torch.Tensor]:
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


def param_names(module, params) -> Dict[int, str]:
    names = {id(p): name for name, p in pyro.get_param_store().named_parameters()}
    if module is not None:
        names.update({id(p): name for name, p in module.named_parameters()})
    return {id(p): names.get(id(p), f"<parameter {i}>") for i, p in enumerate(params)}



def optimizer_factory(optimizer, lr: float):
    """``params -> torch.optim.Optimizer`` from fit's ``optimizer`` argument (None: Adam,
    :func:`default_optimizer`; an optimizer class: called with ``lr=lr``; a callable: as is)."""
    if optimizer is None:
        return lambda params: default_optimizer(params, lr)
    if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        return lambda params: optimizer(params, lr=lr)
    if callable(optimizer):
        return optimizer
    raise TypeError(f"optimizer must be a callable params -> torch.optim.Optimizer or an "
                    f"optimizer class, got {type(optimizer).__name__}")


def optimizer_name(optimizer) -> str:
    """A description of fit's ``optimizer`` argument that is the same in every process (a
    resumed fit must use the optimizer of the fit that wrote the checkpoint)."""
    if optimizer is None:
        return "Adam (default_optimizer)"
    if isinstance(optimizer, functools.partial):
        keywords = ", ".join(f"{k}={v!r}" for k, v in sorted(optimizer.keywords.items()))
        return f"partial({optimizer_name(optimizer.func)}, {keywords})"
    name = getattr(optimizer, "__qualname__", None) or type(optimizer).__qualname__
    module = getattr(optimizer, "__module__", None) or type(optimizer).__module__
    return f"{module}.{name}"


def gradient_summary(grads: List[torch.Tensor], loss: torch.Tensor, norm: bool) -> torch.Tensor:
    """A scalar (``loss``'s dtype and device) that is finite when every gradient entry is: the
    total 2-norm with ``norm`` (clipping needs it), else the sum of the entries, one cheaper
    pass over them (about half the norm's time on a CPU core) that overflows only where the
    norm's squares would first. Not finite: :func:`finite_step` looks at the entries."""
    if norm or not grads or len({(g.dtype, g.device) for g in grads}) > 1:
        return torch.nn.utils.get_total_norm(grads).to(loss)
    return torch.stack([g.sum() for g in grads]).sum().to(loss)


def finite_step(loss_value: float, summary_value: float, grads: List[torch.Tensor]) -> bool:
    """Whether a step's loss and every gradient entry are finite, given the loss and the
    :func:`gradient_summary` (a summary that overflowed with finite entries is not a failure)."""
    if not math.isfinite(loss_value):
        return False
    return math.isfinite(summary_value) or all(bool(torch.isfinite(g).all()) for g in grads)


def train_step(run, xb: torch.Tensor, mb: Optional[torch.Tensor], batch_rows: torch.Tensor,
               *, epoch: int, step: int) -> float:
    """One optimizer step on the minibatch ``xb`` (rows ``batch_rows`` of the training data);
    returns the loss. A non-finite loss or gradient is handed to ``run.non_finite`` (which
    raises) before the optimizer steps, so the parameters stay the last finite ones.

    ``run`` is the fit in progress (:class:`pyro_lvm.inference.training.loop.FitRun`): its state,
    objective adapter, module and ``clip_norm``."""
    state = run.state
    rng_before = run.torch_rng_state()
    state.optimizer.zero_grad(set_to_none=True)
    try:
        loss = run.adapter.train_loss(xb, mb)
    except ValueError as exc:
        # Distribution validation rejects NaN parameters with a ValueError: locate the site
        # (other ValueErrors re-raise).
        run.non_finite(exc, epoch=epoch, step=step, xb=xb, mb=mb, batch_rows=batch_rows,
                       rng_before=rng_before)
    grads = [p.grad for p in state.params if p.grad is not None]
    summary = gradient_summary(grads, loss, norm=run.clip_norm is not None)
    loss_value, summary_value = torch.stack([loss.reshape(()), summary]).tolist()
    if not finite_step(loss_value, summary_value, grads):
        run.non_finite(None, epoch=epoch, step=step, xb=xb, mb=mb, batch_rows=batch_rows,
                       rng_before=rng_before, loss_value=loss_value,
                       grad_norm=float(torch.nn.utils.get_total_norm(grads)))
    if run.clip_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(state.params, run.clip_norm, summary)
    state.optimizer.step()
    state.global_step += 1
    return loss_value
