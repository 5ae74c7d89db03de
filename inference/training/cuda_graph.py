"""Graph-captured training steps: ``fit(..., cuda_graph=True)``.

On a GPU a step of a small network is a few hundred microseconds of kernels, while Pyro's
per-step Python bookkeeping (building traces, distributions and the message stack) costs
milliseconds: eager training is bound by the CPU. Capturing the step in CUDA graphs
(:class:`torch.cuda.CUDAGraph`) records its kernels once; every later step copies the
minibatch into static input buffers and replays them, so the pair's Python (model, guide,
objective, Pyro's bookkeeping) runs only while capturing. This works for any pair whose step
is a fixed sequence of kernels for a fixed batch shape: the DLVM, a user's pair, pyro-lvm's
and Pyro's objectives.

A step is two graphs, so that fit keeps its guarantees:

1. *loss*: zero the gradients' storage, the objective's forward and backward pass, and the
   gradient summary (``step.gradient_summary``: the norm with ``clip_norm``, else the sum;
   static outputs ``loss`` and ``summary``);
2. the host reads ``loss`` and ``summary`` (one synchronization) and hands a non-finite
   step to the eager forensics *before* any parameter changes, exactly as the eager step;
3. *update*: gradient clipping (``clip_norm``) and the optimizer step.

Random draws stay correct and reproducible under capture: PyTorch's CUDA generator is
graph-safe (each replay advances the Philox offset that the capture registered), so every
replay draws new latents, and the same seed gives the same sequence (not the eager step's
draws).

What runs eagerly (``fit(..., cuda_graph=True)``; a fit not on a CUDA device trains eagerly
after one line saying why):

* the first ``warmup_steps`` steps (3; CUDA graphs need the lazily created optimizer state,
  cuBLAS workspaces and Pyro's parameters to exist before capture);
* any batch of another shape, i.e. the last partial batch of an epoch;
* everything, after a capture that failed (one line says why; data-dependent Python in a
  pair, such as a ``.item()`` in the model, makes capture impossible).

Objective settings and optimizer hyperparameters that change during the fit (``KLWarmup``
changes ``beta`` every step, a schedule changes ``lr``) are baked into a captured graph as
constants, so the step is captured again whenever the objective's scalar attributes or the
optimizer's hyperparameters change.
"""
from __future__ import annotations

import sys
from typing import Any, Optional, Tuple

import torch

from pyro_lvm.inference.training.step import finite_step, gradient_summary, train_step

__all__ = ["GraphedTrainStep", "cuda_graph_unavailable", "CudaGraphBackend"]


def cuda_graph_unavailable(device: torch.device) -> Optional[str]:
    """Why a fit on ``device`` cannot be graph-captured (None when it can be tried)."""
    if torch.device(device).type != "cuda":
        return f"cuda_graph=True needs a CUDA device (this fit runs on {torch.device(device).type})"
    if not torch.cuda.is_available():
        return "cuda_graph=True: CUDA is not available"
    return None


class CudaGraphBackend:
    """The CUDA calls graph capture needs, in one place (tests substitute a CPU stand-in
    with the same interface to check the bookkeeping without a GPU)."""

    def new_graph(self):
        return torch.cuda.CUDAGraph()

    def capture(self, graph, body, pool=None) -> None:
        """Record the kernels ``body()`` launches into ``graph`` (they are not run)."""
        with torch.cuda.graph(graph, pool=pool):
            body()

    def pool(self, graph):
        return graph.pool()

    def side_stream(self):
        """A context running warm-up steps on a side stream, as capture requires."""
        return _SideStream()

    def replay(self, graph) -> None:
        graph.replay()


class _SideStream:
    def __enter__(self):
        self.stream = torch.cuda.Stream()
        self.stream.wait_stream(torch.cuda.current_stream())
        self._ctx = torch.cuda.stream(self.stream)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        torch.cuda.current_stream().wait_stream(self.stream)
        return False


def _scalars(d) -> Tuple:
    return tuple(sorted((k, v) for k, v in d.items()
                        if isinstance(v, (bool, int, float, str, tuple))))


def _settings_signature(run) -> Tuple:
    """The objective's scalar settings and the optimizer's hyperparameters: both are baked
    into a captured graph as constants, so a change (KL warm-up's beta, a learning-rate
    schedule) means the graph is stale."""
    objective = run.adapter.objective
    groups = tuple(_scalars({k: v for k, v in g.items() if k != "params"})
                   for g in run.state.optimizer.param_groups)
    return _scalars(getattr(objective, "__dict__", {})), groups


def _make_capturable(optimizer: torch.optim.Optimizer) -> None:
    """Optimizers with a ``capturable`` option (Adam, AdamW, ...) refuse to be captured
    without it; it keeps their step counters on the device (moved there if a resumed
    optimizer state holds them on the host)."""
    for group in optimizer.param_groups:
        if "capturable" not in group or not all(p.is_cuda for p in group["params"]):
            continue
        group["capturable"] = True
        for p in group["params"]:
            state = optimizer.state.get(p) or {}
            step = state.get("step")
            if torch.is_tensor(step) and step.device != p.device:
                state["step"] = step.to(device=p.device, dtype=torch.float32)


class GraphedTrainStep:
    """``train_step`` with the steps of the full batch shape replayed from CUDA graphs.

    Parameters
    ----------
    run : FitRun
        The fit in progress (its state, objective adapter and ``clip_norm``).
    warmup_steps : int
        Eager steps before the first capture.
    backend : CudaGraphBackend, optional
        The CUDA calls (a stand-in in the tests).
    """

    def __init__(self, run, *, warmup_steps: int = 3, backend: Optional[Any] = None,
                 stream=None):
        self.run = run
        self.warmup_left = int(warmup_steps)
        self.backend = backend if backend is not None else CudaGraphBackend()
        self.stream = stream if stream is not None else sys.stderr
        self.failed: Optional[str] = None
        self.shape = None
        self.graphs = None
        self.signature = None
        self.captures = 0
        self.replays = 0

    # ----------------------------------------------------------------------------- the step
    def __call__(self, xb: torch.Tensor, mb: Optional[torch.Tensor], batch_rows: torch.Tensor,
                 *, epoch: int, step: int) -> float:
        if self.failed is not None:
            return train_step(self.run, xb, mb, batch_rows, epoch=epoch, step=step)
        if self.shape is None:  # the first step: before the optimizer creates its state
            self.shape = (tuple(xb.shape), None if mb is None else tuple(mb.shape))
            _make_capturable(self.run.state.optimizer)
        if (tuple(xb.shape), None if mb is None else tuple(mb.shape)) != self.shape:
            return train_step(self.run, xb, mb, batch_rows, epoch=epoch, step=step)
        if self.warmup_left > 0:
            self.warmup_left -= 1
            with self.backend.side_stream():
                return train_step(self.run, xb, mb, batch_rows, epoch=epoch, step=step)
        if self.graphs is None or self.signature != _settings_signature(self.run):
            if not self._capture(xb, mb):
                return train_step(self.run, xb, mb, batch_rows, epoch=epoch, step=step)
        return self._replay(xb, mb, batch_rows, epoch=epoch, step=step)

    # ------------------------------------------------------------------------- internals
    def _capture(self, xb: torch.Tensor, mb: Optional[torch.Tensor]) -> bool:
        run, state = self.run, self.run.state
        self.static_x = xb.clone()
        self.static_m = None if mb is None else mb.clone()
        loss_graph, update_graph = self.backend.new_graph(), self.backend.new_graph()
        try:
            self.backend.capture(loss_graph, self._loss_body)
            self.backend.capture(update_graph, self._update_body, pool=self.backend.pool(loss_graph))
        except Exception as exc:  # capture is impossible for this pair: train eagerly
            self.failed = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            print(f"cuda_graph=True: the step could not be captured ({self.failed}); "
                  f"training eagerly", file=self.stream)
            state.optimizer.zero_grad(set_to_none=True)
            self.graphs = None
            return False
        self.graphs = (loss_graph, update_graph)
        self.signature = _settings_signature(run)
        self.captures += 1
        return True

    def _loss_body(self) -> None:
        """Captured: the forward and backward pass into fresh gradient storage, the norm."""
        run, state = self.run, self.run.state
        state.optimizer.zero_grad(set_to_none=True)  # the capture allocates the gradients
        loss = run.adapter.train_loss(self.static_x, self.static_m)
        grads = [p.grad for p in state.params if p.grad is not None]
        summary = gradient_summary(grads, loss, norm=run.clip_norm is not None)
        self.static_out = torch.stack([loss.reshape(()), summary])

    def _update_body(self) -> None:
        """Captured: clipping and the optimizer step, reading the loss graph's gradients."""
        run, state = self.run, self.run.state
        if run.clip_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(state.params, run.clip_norm, self.static_out[1])
        state.optimizer.step()

    def _replay(self, xb, mb, batch_rows, *, epoch: int, step: int) -> float:
        run, state = self.run, self.run.state
        self.static_x.copy_(xb)
        if mb is not None:
            self.static_m.copy_(mb)
        loss_graph, update_graph = self.graphs
        self.backend.replay(loss_graph)
        loss_value, summary_value = self.static_out.tolist()
        grads = [p.grad for p in state.params if p.grad is not None]
        if not finite_step(loss_value, summary_value, grads):
            # parameters are still the last finite ones: let the eager forensics name the site
            run.non_finite(None, epoch=epoch, step=step, xb=xb, mb=mb, batch_rows=batch_rows,
                           rng_before=None, loss_value=loss_value,
                           grad_norm=float(torch.nn.utils.get_total_norm(grads)))
        self.backend.replay(update_graph)
        self.replays += 1
        state.global_step += 1
        return loss_value
