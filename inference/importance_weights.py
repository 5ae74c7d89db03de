"""Per-data-point log importance weights of any model/guide pair.

Every estimate in pyro-lvm (the ELBO and IWAE objectives, the importance-sampled
log-likelihood, the diagnostics) is computed from one quantity,

.. math::

    \\log w_{ki} = \\log p_\\theta(x_i, z_{ki}) - \\log q_\\phi(z_{ki} \\mid x_i)
    = \\underbrace{\\log p_\\theta(x_i \\mid z_{ki})}_{\\text{log\\_lik}}
    + \\underbrace{\\log p_\\theta(z_{ki})}_{\\text{log\\_prior}}
    - \\underbrace{\\log q_\\phi(z_{ki} \\mid x_i)}_{\\text{log\\_q}},
    \\qquad z_{ki} \\sim q_\\phi(\\cdot \\mid x_i),\\; k = 1..K .

:func:`log_weights` returns this ``[K, batch]`` tensor for any pair that keeps the contract
(every sample site inside ``pyro.plate("data", N, dim=-1)``, event dims declared with
``.to_event``); :func:`trace_log_terms` returns the three terms separately
(:class:`LogTerms`), with the traces they came from.

Construction. The ``K`` particles are one vectorized pass: a plate named
:data:`PARTICLE_PLATE` on ``dim=-2``, left of the data plate, so that each site's
``log_prob`` has shape ``[K, batch]`` (broadcast from ``[batch]`` for sites that do not depend
on a particle). The guide is run once and its draws are replayed into one run of the model;
each term is the sum over the sites of that role of ``fn.log_prob(value)`` with the site's
``poutine.scale`` and ``poutine.mask`` applied. Model sites marked
``infer={"enumerate": "parallel"}`` and absent from the guide are summed out exactly
(:mod:`pyro_lvm.inference.enumeration`), so :math:`p(x_i, z_{ki})` is then the marginal over
them. A site outside the data plate, or whose ``log_prob`` does not broadcast to
``[K, batch]``, is an error naming the site.

Every density is the one the pair's own distribution objects define: the sites are recorded
from a run of the guide and of the model (replayed on the guide's draws) by a light Pyro
handler (:class:`_SiteRecorder`), with no separate hand-written formula for any model
family. When no handler is active outside the objective's own, parameter statements and
the subsample messages of plates that do not subsample are answered at the innermost frame
(:class:`_StoredParams`). The particle plate is one ``pyro.plate`` object per ``K``, entered
on every run. The ``model`` / ``guide`` of a :class:`pyro_lvm.models.ProgramPair` (a pair
written as two programs over the data plate's sites, the built-in DLVM among them) are run
without any handler when none is active outside: their programs record the same trace
themselves (:mod:`pyro_lvm.inference.programs`), so the rest of this module cannot tell.

The per-point bounds are pure functions of the weights:

.. math::

    \\mathrm{ELBO}(x_i) \\approx \\frac1K \\sum_k \\log w_{ki}, \\qquad
    \\mathrm{IWAE}_K(x_i) = \\operatorname{logsumexp}_k \\log w_{ki} - \\log K

(:func:`elbo_from_log_weights`, :func:`iwae_from_log_weights`); the objectives built on them,
with minibatch scaling and gradient estimators, are in :mod:`pyro_lvm.inference.objectives`.

References
----------
Burda, Grosse & Salakhutdinov (2016), Importance weighted autoencoders, ICLR.
Obermeyer et al. (2019), Tensor variable elimination for plated factor graphs, ICML
(exact enumeration of discrete sites).
"""
from __future__ import annotations

import contextlib
import functools
import math
import numbers
from dataclasses import dataclass
from typing import Callable, List, Optional

import pyro
import pyro.poutine as poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import _PYRO_STACK
from pyro.poutine.subsample_messenger import _Subsample
from pyro.poutine.util import site_is_subsample
import torch

from pyro_lvm.inference import enumeration, programs

__all__ = [
    "PARTICLE_PLATE",
    "DATA_PLATE",
    "LogTerms",
    "trace_log_terms",
    "model_terms_on_rows",
    "model_terms_of_particle",
    "log_weights",
    "elbo_from_log_weights",
    "iwae_from_log_weights",
]

#: Name of the vectorized particle plate (the same name Pyro's own ELBOs use, so that
#: random draws agree with ``RenyiELBO(vectorize_particles=True)`` at the same seed).
PARTICLE_PLATE = "num_particles_vectorized"
#: Name of the data plate every sample site of a pair must be inside (the contract).
DATA_PLATE = "data"


# --------------------------------------------------------------------------------------
# Log weights
# --------------------------------------------------------------------------------------
@dataclass
class LogTerms:
    """Per-particle, per-data-point log densities of one vectorized model/guide pass.

    All tensors have shape ``[K, batch]``.

    Attributes
    ----------
    log_lik : sum of the model's observed sites, :math:`\\log p(x_i \\mid z_{ki})`.
    log_prior : sum of the model's latent sites, :math:`\\log p(z_{ki})`.
    log_q : sum of the guide's sites, :math:`\\log q(z_{ki} \\mid x_i)`.
    model_trace, guide_trace : the Pyro traces (for analytic KL, diagnostics, gradients).
    """

    log_lik: torch.Tensor
    log_prior: torch.Tensor
    log_q: torch.Tensor
    model_trace: poutine.Trace
    guide_trace: poutine.Trace

    @property
    def log_weights(self) -> torch.Tensor:
        return self.log_lik + self.log_prior - self.log_q

    @property
    def shape(self) -> torch.Size:
        """``[K, batch]``."""
        return self.log_lik.shape

    def latent_sites(self) -> List[str]:
        """Names of the latent (guide) sample sites."""
        return _latent_site_names(self.guide_trace)

    def site_log_prob(self, name: str, role: str = "model") -> torch.Tensor:
        """Per-particle, per-point log density ``[K, batch]`` of one site of the model
        (``role="model"``) or guide (``role="guide"``) trace, with its scale and mask applied."""
        if role not in ("model", "guide"):
            raise ValueError(f"role must be 'model' or 'guide', got {role!r}")
        trace = self.model_trace if role == "model" else self.guide_trace
        if name not in trace.nodes or trace.nodes[name]["type"] != "sample":
            raise ValueError(f"{role} trace has no sample site named {name!r}")
        return _per_point(name, trace.nodes[name], self.shape, role)


def _latent_site_names(guide_trace: poutine.Trace) -> List[str]:
    return [name for name, site in guide_trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"]
            and not site_is_subsample(site)]


class _SiteRecorder(Messenger):
    """Records the sample sites of one run of a model or guide, as ``poutine.trace`` does
    (the message dicts, in a :class:`pyro.poutine.Trace`), and optionally replays latent
    values, as ``poutine.replay`` does.

    One handler instead of two, and only what the objectives read: no ``_INPUT`` /
    ``_RETURN`` nodes, no param sites (``pyro.module`` issues one per tensor on every call),
    no copy of each message. Every other handler on the stack (the plates, a user's
    ``poutine.scale``, ``condition``, ``trace``...) sees the sites as usual, so nothing about
    the pair's semantics changes; only the bookkeeping is lighter.

    Parameters
    ----------
    replay : Trace, optional
        Latent values to use at the model's latent sites of the same name (the guide's draws).
    """

    def __init__(self, replay: Optional[poutine.Trace] = None):
        super().__init__()
        self.trace = poutine.Trace()
        self.replay = replay

    def _pyro_sample(self, msg) -> None:
        if self.replay is None or msg["is_observed"]:
            return
        site = self.replay.nodes.get(msg["name"])
        if site is None:
            return
        if site["type"] != "sample" or site["is_observed"]:
            raise RuntimeError(f"site {msg['name']} must be sampled in trace")
        msg["done"] = True
        msg["value"] = site["value"]
        msg["infer"] = site["infer"]

    def _pyro_post_sample(self, msg) -> None:
        if msg["infer"].get("_do_not_trace"):
            return
        self.trace.add_node(msg["name"], **msg)


class _StoredParams(Messenger):
    """The innermost frame of a run when no handler was active before the objective's own
    (:func:`_record`). It answers two kinds of bookkeeping message that the frames it skips,
    the recorder, the particle plate and the enumeration handler, have nothing to do with:

    * a ``pyro.param`` statement for a name already in the parameter store, with
      ``store[name]`` (what the store itself returns; the initial value is then ignored):
      ``pyro.module`` / ``PyroModule`` issue one per parameter tensor on every call;
    * the subsample message a ``pyro.plate`` without subsampling sends when it is built, with
      the plate's indices ``0..size-1`` (what Pyro's own sampler returns). Such a plate's
      indices are the same in the guide and the model, so nothing is lost by not recording
      them; a subsampling plate (``subsample_size < size``), and a plate whose site the
      replayed trace holds (a guide's plate with explicit indices), go through every frame as
      usual, so that the model replays the guide's indices.

    Any outer handler (Pyro's ``SVI`` and ``fit`` collect the parameters with
    ``poutine.trace(param_only=True)``) sees every message as usual.
    """

    def __init__(self, replay: Optional[poutine.Trace] = None):
        # the model's run: a plate whose site the guide recorded is replayed by the recorder
        super().__init__()
        self.replay = replay

    def _pyro_param(self, msg) -> None:
        store = pyro.get_param_store()
        if msg["name"] in store:
            msg["value"] = store[msg["name"]]
            msg["done"] = msg["stop"] = True

    def _pyro_sample(self, msg) -> None:
        fn = msg["fn"]
        if (type(fn) is _Subsample and msg["value"] is None and not fn.use_cuda
                and (fn.subsample_size is None or fn.subsample_size >= fn.size)
                and (self.replay is None or msg["name"] not in self.replay.nodes)):
            msg["value"] = torch.arange(fn.size, device=fn.device)
            msg["done"] = msg["stop"] = True


def _record(fn: Callable, x: torch.Tensor, num_particles: int, mask: Optional[torch.Tensor],
            replay: Optional[poutine.Trace] = None,
            enumerate_sites: bool = False, particle_dim: bool = True) -> poutine.Trace:
    """Run ``fn(x, mask=mask)`` once with ``num_particles`` vectorized particles (a plate on
    the left of the data plate) and return its sample sites. With ``enumerate_sites`` (the
    model), sites marked ``infer={"enumerate": "parallel"}`` that ``replay`` does not hold take all
    their values on dims left of the particle plate (:mod:`pyro_lvm.inference.enumeration`);
    the enumeration handler sits below the recorder, so replayed values come first.

    ``particle_dim=False`` with one particle runs ``fn`` without the particle plate, as Pyro's
    ``Trace_ELBO`` runs a pair: the same draws in the same order and the same densities, the
    values without the leading dim of size 1 (which the contract lets a pair broadcast
    against, not require), and none of the plate's per-site work. The numbers equal the
    plate's up to floating-point rounding (one broadcast less can change a summation order or
    a matmul kernel); :func:`pyro_lvm.check_contract` refuses a pair for which they differ
    by more.

    A :class:`pyro_lvm.models.ProgramPair`'s derived ``model`` / ``guide``, with no handler
    active outside, runs directly (:func:`pyro_lvm.inference.programs.record_program`): the
    same trace without Pyro's handler stack."""
    # whether any handler was active before ours (checked before the stack grows below)
    outer = bool(_PYRO_STACK)
    declared = None if outer else programs.declared_program(fn)
    if declared is not None:  # a ProgramPair's model / guide: run without the handler stack
        particle_frame = (programs.plate_frame(_particle_plate(num_particles))
                          if particle_dim or num_particles > 1 else None)
        return programs.record_program(*declared, x, mask, replay, particle_frame)
    recorder = _SiteRecorder(replay)
    enum = (poutine.enum(first_available_dim=enumeration.FIRST_ENUM_DIM) if enumerate_sites
            else contextlib.nullcontext())
    # built (the first time) outside our frames
    particles = (_particle_plate(num_particles) if particle_dim or num_particles > 1
                 else contextlib.nullcontext())
    with enum, recorder, particles, (contextlib.nullcontext() if outer
                                     else _StoredParams(replay)):
        fn(x, mask=mask)
    return recorder.trace


@functools.lru_cache(maxsize=64)
def _particle_plate(num_particles: int) -> pyro.plate:
    """The particle plate for ``num_particles``, built once and entered on every run (as a
    model reuses one ``pyro.plate`` object for several statements): building a plate sends
    its subsample message through the handler stack, entering it only claims its dim."""
    return pyro.plate(PARTICLE_PLATE, num_particles, dim=-2)


def _compute_log_prob(site: dict) -> torch.Tensor:
    """``site["log_prob"]``: the site's ``fn.log_prob(value)`` with its scale and mask applied,
    as ``Trace.compute_log_prob`` computes it."""
    log_p = site.get("log_prob")
    if log_p is None:
        log_p = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
        log_p = scale_and_mask(log_p, site["scale"], site["mask"])
        site["log_prob"] = log_p
    return log_p


def _per_point(site_name: str, site: dict, shape: torch.Size, role: str) -> torch.Tensor:
    log_p = _compute_log_prob(site)
    frames = {f.name for f in site["cond_indep_stack"]}
    if DATA_PLATE not in frames:
        raise ValueError(
            f"{role} site {site_name!r} is not inside pyro.plate({DATA_PLATE!r}, ...): "
            f"per-data-point importance weights need every sample site in the data plate "
            f"(run inference.check_contract(model, x) for details)"
        )
    try:
        return log_p.expand(shape) if log_p.shape != shape else log_p
    except RuntimeError:
        raise ValueError(
            f"{role} site {site_name!r} has log_prob shape {tuple(log_p.shape)}, which does not "
            f"broadcast to [particles, batch] = {tuple(shape)}; declare event dims with "
            f".to_event(...) so the data plate is the only batch dim"
        ) from None


def _check_particles(num_particles) -> int:
    if isinstance(num_particles, bool) or not isinstance(num_particles, numbers.Integral):
        raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")
    if num_particles < 1:
        raise ValueError(f"num_particles must be >= 1, got {num_particles}")
    return int(num_particles)


def _check_x(x) -> torch.Tensor:
    if not torch.is_tensor(x):
        raise ValueError(f"x must be a torch.Tensor with the data rows on dim 0, got "
                         f"{type(x).__name__}")
    if x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(f"x must have at least one data row on dim 0, got shape {tuple(x.shape)}")
    return x


def _run_guide(guide: Callable, x: torch.Tensor, num_particles: int,
               mask: Optional[torch.Tensor], particle_dim: bool = True) -> poutine.Trace:
    return _record(guide, x, num_particles, mask, particle_dim=particle_dim)


def _checked_log_prob(site_name: str, site: dict) -> torch.Tensor:
    """A model site's log density in the shape it has, after checking its data plate."""
    if DATA_PLATE not in {f.name for f in site["cond_indep_stack"]}:
        _per_point(site_name, site, torch.Size(), "model")  # raises the plate error
    return _compute_log_prob(site)


def _model_terms(model_trace: poutine.Trace, shape: torch.Size):
    """``(log_lik, log_prior)`` ``[K, batch]``: the model's observed and latent sites, with
    enumerated discrete sites summed out exactly (:mod:`pyro_lvm.inference.enumeration`)."""
    if enumeration.has_enumerated_sites(model_trace):
        return enumeration.marginalized_terms(model_trace, shape, _checked_log_prob)
    log_lik = log_prior = None
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        term = _per_point(name, site, shape, "model")
        if site["is_observed"]:
            log_lik = term if log_lik is None else log_lik + term
        else:
            log_prior = term if log_prior is None else log_prior + term
    return log_lik, log_prior


def _replayed_model(model: Callable, x: torch.Tensor, num_particles: int,
                    mask: Optional[torch.Tensor], replay: poutine.Trace, particle_dim: bool):
    """The model's trace replayed on ``replay``'s latent values, and its ``(log_lik,
    log_prior)`` ``[K, batch]``."""
    model_trace = _record(model, x, num_particles, mask, replay=replay, enumerate_sites=True,
                          particle_dim=particle_dim)
    return model_trace, _model_terms(model_trace, torch.Size((num_particles, x.shape[0])))


def _score(model: Callable, guide: Optional[Callable], x: torch.Tensor, num_particles: int,
           mask: Optional[torch.Tensor], guide_trace: poutine.Trace,
           replay_trace: Optional[poutine.Trace] = None,
           particle_dim: bool = True) -> LogTerms:
    """Score the model (and, when ``guide`` is given, re-run the guide) on the latent values of
    ``replay_trace`` (default: ``guide_trace``) and split the log densities per site role
    (``particle_dim``: as in :func:`_record`, for the runs of this call)."""
    replay_trace = guide_trace if replay_trace is None else replay_trace
    if guide is not None:
        guide_trace = _record(guide, x, num_particles, mask, replay=replay_trace,
                              particle_dim=particle_dim)
    model_trace, (log_lik, log_prior) = _replayed_model(model, x, num_particles, mask,
                                                        replay_trace, particle_dim)
    shape = torch.Size((num_particles, x.shape[0]))
    log_q = None
    for name in _latent_site_names(guide_trace):
        term = _per_point(name, guide_trace.nodes[name], shape, "guide")
        log_q = term if log_q is None else log_q + term
    if log_lik is None or log_prior is None or log_q is None:
        zero = x.new_zeros(shape)
        log_lik, log_prior, log_q = (zero if t is None else t for t in (log_lik, log_prior, log_q))
    return LogTerms(log_lik, log_prior, log_q, model_trace, guide_trace)


def trace_log_terms(model: Callable, guide: Callable, x: torch.Tensor, num_particles: int = 1,
                    mask: Optional[torch.Tensor] = None, *,
                    particle_plate: bool = True) -> LogTerms:
    """Run ``guide`` then ``model`` (replayed on the guide's draws) once with ``num_particles``
    vectorized particles and split the log densities per site role. See :class:`LogTerms`.

    The sites are recorded by a light handler (:class:`_SiteRecorder`) rather than
    ``poutine.trace`` + ``poutine.replay``: the same sites, draws and densities (the
    distributions the pair builds), with less per-call bookkeeping.

    ``particle_plate=False`` (one particle only) runs the pair without the particle plate, as
    a one-particle ELBO step does (:func:`_record`); the terms are still ``[1, batch]``."""
    num_particles = _check_particles(num_particles)
    if not particle_plate and num_particles != 1:
        raise ValueError(f"particle_plate=False needs num_particles=1, got {num_particles}")
    guide_trace = _run_guide(guide, x, num_particles, mask, particle_dim=particle_plate)
    return _score(model, None, x, num_particles, mask, guide_trace, particle_dim=particle_plate)


def _latent_values_replay(guide_trace: poutine.Trace, select: Callable) -> poutine.Trace:
    """A trace holding ``select(site)`` as the value of every latent site of ``guide_trace``."""
    replay = poutine.Trace()
    for name in _latent_site_names(guide_trace):
        site = guide_trace.nodes[name]
        replay.add_node(name, type="sample", is_observed=False, infer=dict(site["infer"]),
                        value=select(site))
    return replay


def model_terms_on_rows(model: Callable, x: torch.Tensor, guide_trace: poutine.Trace,
                        rows: slice, mask: Optional[torch.Tensor] = None):
    """``(log_lik, log_prior)``, each ``[1, len(rows)]``: the model run without the particle
    plate on the rows ``rows`` of ``x`` (and ``mask``), replayed on those rows of the latent
    values of ``guide_trace`` (a one-particle run without the plate, values ``[batch, ...]``).
    For a model whose row ``i`` depends on row ``i`` only, the terms of the same rows agree
    whatever other rows the batch holds."""
    replay = _latent_values_replay(guide_trace, lambda site: site["value"][rows])
    return _replayed_model(model, x[rows], 1, None if mask is None else mask[rows], replay,
                           particle_dim=False)[1]


def model_terms_of_particle(model: Callable, x: torch.Tensor, guide_trace: poutine.Trace,
                            particle: int, mask: Optional[torch.Tensor] = None):
    """``(log_lik, log_prior)``, each ``[1, batch]``: the model run without the particle plate
    on all rows of ``x``, replayed on particle ``particle`` of the latent values of
    ``guide_trace`` (a run with a particle plate, values ``[K, batch, ...]``). For a model that
    only broadcasts over the particle dim, the terms equal that particle's terms in the
    vectorized run. None when a latent value lacks the particle dim where the plate puts it
    (left of the data dim and the site's event dims)."""
    values = {}
    for name in _latent_site_names(guide_trace):
        site = guide_trace.nodes[name]
        value = site["value"]
        dim = value.dim() - len(getattr(site["fn"], "event_shape", ())) - 2
        if dim < 0 or value.shape[dim] <= particle:
            return None
        values[name] = value.select(dim, particle)
    replay = _latent_values_replay(guide_trace, lambda site: values[site["name"]])
    return _replayed_model(model, x, 1, mask, replay, particle_dim=False)[1]

def log_weights(model: Callable, guide: Callable, x: torch.Tensor, num_particles: int = 1,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Log importance weights ``log p(x_i, z_ki) - log q(z_ki | x_i)``, shape ``[K, batch]``.

    The ``K`` particles are drawn in a single vectorized guide pass and scored in a single
    model pass; gradients flow through the reparameterized draws.
    """
    return trace_log_terms(model, guide, x, num_particles, mask).log_weights


# --------------------------------------------------------------------------------------
# Pure bound functions
# --------------------------------------------------------------------------------------
def _check_log_weights(lw) -> torch.Tensor:
    if not torch.is_tensor(lw):
        raise ValueError(f"log weights must be a tensor [K, batch], got {type(lw).__name__}")
    if lw.dim() < 1 or lw.shape[0] < 1:
        raise ValueError(f"log weights must have the K >= 1 particles on dim 0, got shape "
                         f"{tuple(lw.shape)}")
    return lw


def elbo_from_log_weights(lw: torch.Tensor) -> torch.Tensor:
    """Per-point ELBO estimate :math:`\\frac1K\\sum_k \\log w_{ki}` from log weights ``[K, ...]``.

    Returns a tensor of shape ``lw.shape[1:]`` (``[batch]`` for ``[K, batch]`` input).
    """
    return _check_log_weights(lw).mean(dim=0)


def iwae_from_log_weights(lw: torch.Tensor) -> torch.Tensor:
    """Per-point IWAE bound estimate :math:`\\log\\frac1K\\sum_k w_{ki}` from log weights
    ``[K, ...]``, computed stably as ``logsumexp_k - log K``. Returns ``lw.shape[1:]``."""
    lw = _check_log_weights(lw)
    return torch.logsumexp(lw, dim=0) - math.log(lw.shape[0])
