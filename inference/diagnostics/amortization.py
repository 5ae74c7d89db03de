"""Amortization gap: ELBO of a per-row Gaussian guide minus the ELBO of the amortized
guide (Cremer, Li & Duvenaud 2018)."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import torch


from pyro_lvm.inference.importance_weights import trace_log_terms
from pyro_lvm.inference import engine
from pyro_lvm.inference.objectives import ELBO
from pyro_lvm.inference.diagnostics._common import (_check_int, _check_positive, _chunk_sizes,
                                                    _flatten_event, _guide_sites, _prepare,
                                                    _progress, _seeded)
from pyro_lvm.inference.diagnostics.latent import _unwrap_independent


class _LocalGaussianGuide:
    """A per-row (non-amortized) Gaussian guide over the amortized guide's latent sites."""

    def __init__(self, sites: Dict[str, Tuple[torch.Size, torch.Tensor, torch.Tensor]],
                 covariance: str):
        self.event_shapes, self.full = {}, {}
        self.loc, self.raw_scale, self.raw_tril = {}, {}, {}
        for name, (event, mean, scale_tril) in sites.items():
            self.event_shapes[name] = event
            # a scalar latent has nothing to correlate: its "full" Gaussian is the diagonal one
            self.full[name] = covariance == "full" and len(event) == 1
            self.loc[name] = mean.detach().clone().requires_grad_(True)
            if self.full[name]:
                diag = torch.diagonal(scale_tril, dim1=-2, dim2=-1)
            else:
                # marginal standard deviations sqrt(diag(L L^T)) = row norms of L
                diag = scale_tril.norm(dim=-1)
            self.raw_scale[name] = diag.clamp_min(1e-30).log().detach().clone().requires_grad_(True)
            if self.full[name]:
                lower = torch.tril(scale_tril, -1).detach().clone()
                self.raw_tril[name] = lower.requires_grad_(True)

    def parameters(self) -> List[torch.Tensor]:
        return [*self.loc.values(), *self.raw_scale.values(), *self.raw_tril.values()]

    def distribution(self, name: str):
        loc, log_scale = self.loc[name], self.raw_scale[name]
        event = self.event_shapes[name]
        n = loc.shape[0]
        if self.full[name]:
            scale_tril = torch.tril(self.raw_tril[name], -1) + torch.diag_embed(log_scale.exp())
            return dist.MultivariateNormal(loc, scale_tril=scale_tril)
        if len(event) == 0:
            return dist.Normal(loc[:, 0], log_scale[:, 0].exp())
        return dist.Normal(loc.reshape(n, *event),
                           log_scale.exp().reshape(n, *event)).to_event(len(event))

    def __call__(self, x, mask=None):
        with pyro.plate("data", x.shape[0], dim=-1):
            for name in self.loc:
                pyro.sample(name, self.distribution(name))


def _has_real_support(fn) -> bool:
    support = fn.support
    while isinstance(support, torch.distributions.constraints.independent):
        support = support.base_constraint
    return support is torch.distributions.constraints.real or \
        support is torch.distributions.constraints.real_vector


def _site_init(fn, value: torch.Tensor, event: torch.Size):
    """Mean ``[n, D]`` and scale_tril ``[n, D, D]`` of one guide site (particle dim averaged)."""
    base, _ = _unwrap_independent(fn)
    if len(event) == 1 and isinstance(base, (torch.distributions.MultivariateNormal,
                                             torch.distributions.LowRankMultivariateNormal)):
        mean = base.mean.expand(value.shape)[0]
        tril = base.scale_tril.expand(*value.shape, event[0])[0]
        return mean, tril
    try:
        mean = _flatten_event(fn.mean.expand(value.shape)[0], event)
        sd = _flatten_event(fn.stddev.expand(value.shape)[0], event)
    except NotImplementedError:
        flat = _flatten_event(value, event)
        mean, sd = flat.mean(0), flat.std(0)
    return mean, torch.diag_embed(sd)


def _elbo_per_row(model_fn, guide_fn, x, mask, num_particles: int) -> Tuple[np.ndarray, np.ndarray]:
    """ELBO per row (mean of log weights) and its Monte Carlo standard error."""
    width = engine.draw_width(model_fn, guide_fn, x, mask, probe_rows=None)
    _, particle_chunk = _chunk_sizes(x.shape[0], num_particles, width, x.shape[0], x.device)
    log_w = engine.log_weight_matrix(model_fn, guide_fn, x, mask, num_particles,
                                     particle_chunk).double()
    return (log_w.mean(0).cpu().numpy(),
            (log_w.std(0) / math.sqrt(num_particles)).cpu().numpy())


def _local_start(prep, x, mask_sub, covariance: str) -> dict:
    """The amortized guide's distribution at every latent site, per row: the local guides'
    starting point ``{site: (event shape, mean [n, D], scale_tril [n, D, D])}``."""
    with torch.no_grad():
        probe = trace_log_terms(prep.model_fn, prep.guide_fn, x, 1, mask_sub)
        init = {}
        for name in _guide_sites(probe):
            site = probe.guide_trace.nodes[name]
            event = site["fn"].event_shape
            if not _has_real_support(site["fn"]):
                raise ValueError(
                    f"amortization_gap fits Gaussian local guides, so every latent site must "
                    f"be real-valued; site {name!r} has support {site['fn'].support}")
            if covariance == "full" and len(event) > 1:
                raise ValueError(
                    f"covariance='full' needs 1-D latent sites; site {name!r} has event shape "
                    f"{tuple(event)} (use covariance='diag')")
            mean, tril = _site_init(site["fn"], site["value"], event)
            init[name] = (event, mean.detach(), tril.detach())
    return init


def _fit_local_guide(model_fn, local, x, mask_sub, *, num_steps: int, lr: float,
                     num_particles: int, progress) -> float:
    """Maximize each row's ELBO over its local Gaussian with Adam (linearly decaying step size)
    on the library's own sticking-the-landing ELBO gradient; returns the last loss per row."""
    params = local.parameters()
    optimizer = torch.optim.Adam(params, lr=lr)
    objective = ELBO(num_particles, gradient="stl")  # sticking the landing (Roeder et al.)
    final_loss = float("nan")
    # The model's parameters stay fixed: gradients are taken with torch.autograd.grad
    # with respect to the local parameters only, so nothing accumulates in (or steps)
    # the model's or the amortized guide's parameters. (Setting requires_grad=False on
    # them instead would make pyro.module warn and skip them in the param store.)
    with _progress(num_steps, "amortization gap", progress) as bar:
        for step in range(num_steps):
            # Linear decay to 0: Adam's normalized steps would otherwise keep the
            # iterate bouncing at a distance ~lr around the optimum.
            for group in optimizer.param_groups:
                group["lr"] = lr * (1.0 - step / num_steps)
            loss = objective.differentiable_loss(model_fn, local, x, mask=mask_sub)
            if not torch.isfinite(loss):
                raise RuntimeError(
                    f"amortization_gap: the local-guide ELBO became non-finite at step "
                    f"{step}; lower lr (now {lr})")
            grads = torch.autograd.grad(loss, params)
            for q, g in zip(params, grads):
                q.grad = g
            optimizer.step()
            final_loss = float(loss.detach()) / x.shape[0]
            bar.update(1)
    return final_loss


def _keep_the_better(model_fn, local, x, mask_sub, start_values, eval_particles: int) -> int:
    """Per row, keep the better of the starting point and the optimized local guide, judged on
    draws independent of those of the final estimate (no selection bias); returns how many
    rows the optimization improved."""
    params = local.parameters()
    end_values = [q.detach().clone() for q in params]
    elbo_end, _ = _elbo_per_row(model_fn, local, x, mask_sub, eval_particles)
    for q, start in zip(params, start_values):
        q.copy_(start)
    elbo_start, _ = _elbo_per_row(model_fn, local, x, mask_sub, eval_particles)
    keep_end = torch.as_tensor(elbo_end > elbo_start, device=x.device)
    for q, start, end in zip(params, start_values, end_values):
        q.copy_(torch.where(keep_end.reshape(-1, *([1] * (q.dim() - 1))), end, start))
    return int(keep_end.sum())


def amortization_gap(pair, data, *, num_steps: int = 300, lr: float = 0.05,
                     num_particles: int = 16, eval_particles: int = 1000, max_rows: int = 100,
                     covariance: str = "diag", mask=None, device="auto", seed: int = 0,
                     progress: Optional[bool] = None, guide=None,
                     param_state=None) -> Dict[str, Any]:
    """ELBO of a per-row Gaussian guide minus the ELBO of the amortized guide.

    The amortized guide :math:`q_\\phi(z \\mid x)` shares one network across rows; the
    *amortization gap* (Cremer, Li & Duvenaud 2018) is what that sharing costs,

    .. math:: \\Delta_i = \\max_{\\lambda_i} \\mathrm{ELBO}(x_i; q_{\\lambda_i})
              - \\mathrm{ELBO}(x_i; q_\\phi(\\cdot \\mid x_i)),

    with :math:`q_{\\lambda_i}` a Gaussian with its own parameters for row :math:`i`
    (``covariance="diag"``: independent Normal per coordinate; ``"full"``: full-covariance
    Normal, for 1-D latent sites). The local guide is initialised at the amortized guide's
    mean and scale and optimized with Adam (learning rate decaying linearly to 0) on the
    first ``max_rows`` rows of ``data`` (pass held-out rows), the model's parameters frozen.
    Gradients use the "sticking the landing" estimator (Roeder et al. 2017), which has zero
    variance when the guide equals the posterior. Per row, the better of the starting point
    and the optimized parameters is kept (judged with ``eval_particles`` draws), and both
    ELBOs are then re-estimated per row with ``eval_particles`` fresh draws, so the selection
    does not bias the reported values.

    A positive gap means a better guide exists for these rows than the encoder produces.
    Since the local guide starts at the amortized one, a negative gap beyond its standard
    error only arises when the amortized family is richer than the local one (e.g. a
    full-covariance amortized guide against ``covariance="diag"``).

    Parameters
    ----------
    num_steps, lr, num_particles : int, float, int
        Adam steps, initial learning rate and particles per gradient estimate for the local
        guides (all rows are optimized together; their objectives are independent).
    eval_particles : int
        Particles per row for each ELBO estimate.
    max_rows : int
        Number of rows (the first ones) to use; the cost is ``num_steps`` passes over them.
    covariance : {"diag", "full"}
        Local guide family.
    mask, device, seed, progress, guide, param_state
        As in :func:`importance_diagnostics`.

    Returns
    -------
    dict
        ``mean_gap`` (mean of :math:`\\Delta_i`, nats), ``mc_se`` (its Monte Carlo standard
        error for these rows), ``se`` (standard error over rows, std(Delta_i)/sqrt(n), for the
        population of rows; it includes the Monte Carlo noise), ``elbo_amortized``,
        ``elbo_local`` (means over rows), ``num_rows``, ``covariance``, ``num_steps``,
        ``final_loss`` (negative ELBO per row at the last step), ``rows_improved`` (rows where
        the optimized local parameters beat the starting point), and ``per_row`` (DataFrame:
        row, elbo_amortized, elbo_amortized_se, elbo_local, elbo_local_se, gap, gap_se).

    References
    ----------
    Cremer, C., Li, X. & Duvenaud, D. (2018). Inference suboptimality in variational
    autoencoders. ICML.
    Roeder, G., Wu, Y. & Duvenaud, D. (2017). Sticking the landing. NeurIPS.
    """
    num_steps = _check_int(num_steps, "num_steps", 0)
    lr = _check_positive(lr, "lr")
    num_particles = _check_int(num_particles, "num_particles", 1)
    eval_particles = _check_int(eval_particles, "eval_particles", 2)
    max_rows = _check_int(max_rows, "max_rows", 1)
    if covariance not in ("diag", "full"):
        raise ValueError(f"covariance must be 'diag' or 'full', got {covariance!r}")
    with _prepare(pair, data, mask, device, guide=guide, param_state=param_state) as prep, \
            _seeded(seed, prep.device):
        x = prep.x[:max_rows]
        mask_sub = None if prep.mask is None else prep.mask[:max_rows]
        n = x.shape[0]
        local = _LocalGaussianGuide(_local_start(prep, x, mask_sub, covariance), covariance)
        params = local.parameters()
        start_values = [q.detach().clone() for q in params]
        final_loss = _fit_local_guide(prep.model_fn, local, x, mask_sub, num_steps=num_steps,
                                      lr=lr, num_particles=num_particles, progress=progress)
        with torch.no_grad():
            rows_improved = (_keep_the_better(prep.model_fn, local, x, mask_sub, start_values,
                                              eval_particles) if num_steps > 0 else 0)
            elbo_a, se_a = _elbo_per_row(prep.model_fn, prep.guide_fn, x, mask_sub, eval_particles)
            elbo_l, se_l = _elbo_per_row(prep.model_fn, local, x, mask_sub, eval_particles)
    gap = elbo_l - elbo_a
    gap_se = np.sqrt(se_a ** 2 + se_l ** 2)
    per_row = pd.DataFrame({"row": np.arange(n), "elbo_amortized": elbo_a,
                            "elbo_amortized_se": se_a, "elbo_local": elbo_l,
                            "elbo_local_se": se_l, "gap": gap, "gap_se": gap_se})
    return {
        "mean_gap": float(gap.mean()),
        "mc_se": float(np.sqrt((gap_se ** 2).sum()) / n),
        "se": float(gap.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
        "elbo_amortized": float(elbo_a.mean()),
        "elbo_local": float(elbo_l.mean()),
        "num_rows": n,
        "covariance": covariance,
        "num_steps": num_steps,
        "final_loss": final_loss,
        "rows_improved": rows_improved,
        "per_row": per_row,
    }


