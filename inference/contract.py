"""Check that a model/guide pair keeps the pyro-lvm contract, and say what is wrong if not.

The contract (see ``DESIGN.md``)::

    model(x[, mask])   # p(z) p(x | z); every sample site inside pyro.plate("data", N, dim=-1)
    guide(x[, mask])   # q(z | x); the same latent site names (enumerated discrete sites aside)

Every estimator in :mod:`pyro_lvm.inference` relies on the per-data-point decomposition

.. math::

    \\log w_{ki} = \\log p(x_i \\mid z_{ki}) + \\log p(z_{ki}) - \\log q(z_{ki} \\mid x_i),
    \\qquad z_{ki} \\sim q(\\cdot \\mid x_i),

which only exists when the data plate is the *only* batch dimension of every site (event
dimensions declared with ``.to_event``) and when the code broadcasts over a particle plate
added on the left (``z`` of shape ``[K, N, d]``). :func:`check_contract` runs the pair once as
written and once with two vectorized particles (and compares a one-particle run with and
without the particle plate on the same random numbers, and the model's densities of each half
of the rows scored alone and in the whole batch), and raises :class:`ContractError` naming the
first violation it finds, so a user learns about a wrong plate or a forgotten ``.to_event``
before a long fit, not from a broadcasting error deep inside an objective.
"""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import pyro.poutine as poutine
from pyro.poutine.messenger import Messenger
import pyro.util
import torch
from pyro.poutine.util import site_is_subsample
from torch.distributions import constraints

try:  # recent torch wraps a mixture's component support in its own constraint class
    from torch.distributions.mixture_same_family import MixtureSameFamilyConstraint
    _WRAPPING_CONSTRAINTS = (constraints.independent, MixtureSameFamilyConstraint)
except ImportError:  # pragma: no cover - older torch
    _WRAPPING_CONSTRAINTS = (constraints.independent,)

from pyro_lvm.inference import pairs, programs
from pyro_lvm.inference.engine import isolated_param_store, resolve_pair
from pyro_lvm.inference.importance_weights import (DATA_PLATE, PARTICLE_PLATE, LogTerms,
                                                   _replayed_model, model_terms_of_particle,
                                                   model_terms_on_rows, trace_log_terms)

__all__ = ["ContractError", "ContractReport", "check_contract"]

#: Number of vectorized particles used for the broadcasting check (2, not 1, so that a
#: dimension of size 1 cannot hide a broadcasting mistake).
_CHECK_PARTICLES = 2


class ContractError(ValueError):
    """A model/guide pair does not keep the pyro-lvm contract (the message says how)."""


@dataclass(frozen=True)
class ContractReport:
    """What :func:`check_contract` found out about a pair that keeps the contract.

    Attributes
    ----------
    latent_sites : dict
        Latent site name -> event shape (the shape of one data point's draw).
    observed_sites : dict
        Observed site name -> event shape.
    guide_distributions : dict
        Latent site name -> the guide's distribution for it (class name).
    reparameterized : bool
        True when every latent site of the guide has ``rsample`` (required by the
        reparameterized ELBO/IWAE gradient estimators).
    non_reparameterized_sites : tuple of str
        Latent sites whose guide distribution has no ``rsample``.
    data_size : int
        Size of ``pyro.plate("data", ...)`` in the checked run (rows of ``x``).
    """

    latent_sites: Dict[str, Tuple[int, ...]]
    observed_sites: Dict[str, Tuple[int, ...]]
    guide_distributions: Dict[str, str]
    reparameterized: bool
    data_size: int
    non_reparameterized_sites: Tuple[str, ...] = field(default=())

    def __str__(self) -> str:
        lines = [f"model/guide pair keeps the contract (data plate of size {self.data_size})"]
        lines.append("  latent sites (guide distribution, event shape):")
        for name, shape in self.latent_sites.items():
            reparam = "" if name not in self.non_reparameterized_sites else "  [no rsample]"
            lines.append(f"    {name!r}: {self.guide_distributions.get(name, '?')}, "
                         f"event shape {tuple(shape)}{reparam}")
        if not self.latent_sites:
            lines.append("    (none)")
        lines.append("  observed sites (event shape):")
        for name, shape in self.observed_sites.items():
            lines.append(f"    {name!r}: {tuple(shape)}")
        lines.append(f"  reparameterized guide: {'yes' if self.reparameterized else 'no'}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------

def _sample_sites(trace: poutine.Trace):
    """(name, site) of the real sample sites of a trace (plates' subsample sites excluded)."""
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and not site_is_subsample(site):
            yield name, site


def _plate_sizes(trace: poutine.Trace) -> Dict[str, Tuple[Optional[int], int]]:
    """Plate name -> (dim, size) for every plate a site of the trace sits in."""
    plates = {}
    for _, site in _sample_sites(trace):
        for frame in site["cond_indep_stack"]:
            plates.setdefault(frame.name, (frame.dim, int(frame.size)))
    for name, site in trace.nodes.items():  # plates with no site inside still leave a node
        if site["type"] == "sample" and site_is_subsample(site) and name not in plates:
            plates[name] = (None, int(site["value"].shape[0]) if site["value"].dim() else 0)
    return plates


def _base_constraint(constraint):
    # independent(...) and the MixtureSameFamily constraint (mixture priors) both wrap the
    # component constraint in .base_constraint.
    while isinstance(constraint, _WRAPPING_CONSTRAINTS):
        constraint = constraint.base_constraint
    return constraint


def _is_unbounded(constraint) -> bool:
    return isinstance(_base_constraint(constraint), type(constraints.real))


def _run(fn: Callable, role: str, x: torch.Tensor, mask, replay_trace=None) -> poutine.Trace:
    runner = fn if replay_trace is None else poutine.replay(fn, trace=replay_trace)
    try:
        trace = poutine.trace(runner).get_trace(x, mask=mask)
    except ContractError:
        raise
    except Exception as exc:
        clash = re.search(r"Shape mismatch inside plate\('([^']*)'\) at site (\S+) dim", str(exc))
        if clash is not None:
            raise ContractError(
                f"site {clash.group(2)!r} in the {role} has a batch shape that clashes with "
                f"pyro.plate({clash.group(1)!r}) ({str(exc).splitlines()[0]}); the data plate must "
                f"be the only batch dimension: declare the per-row dimensions as event dims "
                f"with .to_event(k)"
            ) from exc
        raise ContractError(
            f"running the {role} as {role}(x, mask=...) on x of shape {tuple(x.shape)} failed "
            f"with {type(exc).__name__}: {exc}"
        ) from exc
    return trace


# ----------------------------------------------------------------------------------------
# the check
# ----------------------------------------------------------------------------------------

def _check_inputs(x, mask):
    """``x`` a tensor with rows; ``mask`` None or a boolean tensor of its shape."""
    if not isinstance(x, torch.Tensor):
        raise ContractError(f"x must be a torch.Tensor of shape (n, p), got {type(x).__name__}")
    if x.dim() < 1 or x.shape[0] < 1:
        raise ContractError(f"x must have at least one row, got shape {tuple(x.shape)}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.shape != x.shape:
            raise ContractError(
                f"mask must be a boolean tensor of x's shape {tuple(x.shape)}, got "
                f"{type(mask).__name__} of shape {tuple(getattr(mask, 'shape', ()))}")
        mask = mask.bool()
    return mask


def _check_data_plate(model_trace, guide_trace, traces, num_rows: int) -> None:
    """A plate named ``"data"`` at dim -1 of size ``n`` around every sample site."""
    plates = {**_plate_sizes(guide_trace), **_plate_sizes(model_trace)}
    if DATA_PLATE not in plates:
        found = sorted(p for p in plates if p != PARTICLE_PLATE)
        raise ContractError(
            f"no plate named {DATA_PLATE!r}: wrap every sample site of model and guide in "
            f"`with pyro.plate({DATA_PLATE!r}, x.shape[0], dim=-1):`"
            + (f" (found plate(s) {found}; rename the one over data rows to "
               f"{DATA_PLATE!r})" if found else " (the pair uses no plate at all)")
        )
    for role, trace in traces:
        for name, site in _sample_sites(trace):
            for frame in site["cond_indep_stack"]:
                if frame.name != DATA_PLATE:
                    continue
                if frame.dim != -1:
                    raise ContractError(
                        f"pyro.plate({DATA_PLATE!r}) around site {name!r} in the {role} is at "
                        f"dim={frame.dim}; it must be dim=-1 so a particle plate fits on its "
                        f"left: pyro.plate({DATA_PLATE!r}, x.shape[0], dim=-1)")
                if int(frame.size) != num_rows:
                    raise ContractError(
                        f"pyro.plate({DATA_PLATE!r}) around site {name!r} in the {role} has "
                        f"size {int(frame.size)} but x has {num_rows} rows; use "
                        f"pyro.plate({DATA_PLATE!r}, x.shape[0], dim=-1) (minibatch scaling "
                        f"is done by the fitting loop, not with subsample_size)")
    for role, trace in traces:
        for name, site in _sample_sites(trace):
            if site["is_observed"] and not any(f.name == DATA_PLATE
                                               for f in site["cond_indep_stack"]):
                raise ContractError(
                    f"observed site {name!r} in the {role} is outside "
                    f"pyro.plate({DATA_PLATE!r}): every sample site must be per data point")
    # latent sites outside the plate (global latents): pairs.check_sites says why and what to do


def _check_site_names(model_trace, guide_trace):
    """An observed site in the model; the same latent sites in model and guide (enumerated
    discrete model sites aside), all inside the data plate
    (:func:`pyro_lvm.inference.pairs.check_sites`). Returns ``(observed sites, guide latent
    names, enumerated model sites)``."""
    observed = {name: site for name, site in _sample_sites(model_trace) if site["is_observed"]}
    if not observed:
        raise ContractError(
            "the model has no observed site: the likelihood must be a sample site with "
            "obs=x, e.g. pyro.sample('x', dist.Normal(loc, scale).to_event(1), obs=x), "
            "inside the data plate")
    sites = pairs.check_sites(model_trace, guide_trace, error=ContractError)
    return observed, sites["latent"], sites["enumerated"]


def _check_latent_families(model_trace, guide_trace, guide_latent, *,
                           require_reparameterized: bool, check_support: bool):
    """Reparameterizable guide latents (when required) on the prior's support. Returns
    ``(latent event shapes, guide distribution names, non-reparameterized sites)``."""
    latent_sites = {}
    guide_distributions = {}
    non_reparam = []
    for name in guide_latent:
        gsite = guide_trace.nodes[name]
        fn = gsite["fn"]
        latent_sites[name] = tuple(getattr(fn, "event_shape", ()))
        base = fn
        while hasattr(base, "base_dist"):  # Independent / Masked / Expanded wrappers
            base = base.base_dist
        guide_distributions[name] = type(base).__name__
        if not getattr(fn, "has_rsample", False):
            non_reparam.append(name)
    if non_reparam and require_reparameterized:
        raise ContractError(
            f"latent site(s) {non_reparam} in the guide use distribution(s) "
            f"{[guide_distributions[n] for n in non_reparam]} without rsample (not "
            f"reparameterizable); the pathwise ELBO/IWAE gradients need reparameterized "
            f"latents. Use a continuous relaxation, a reparameterizable guide family, or "
            f"an objective with score-function gradients (e.g. pyro.infer.Trace_ELBO)")
    if check_support:
        for name in guide_latent:
            gfn, mfn = guide_trace.nodes[name]["fn"], model_trace.nodes[name]["fn"]
            try:
                gsupport, msupport = gfn.support, mfn.support
            except NotImplementedError:
                continue
            if _is_unbounded(msupport):
                continue
            value = guide_trace.nodes[name]["value"]
            inside = msupport.check(value)
            if _is_unbounded(gsupport) or not bool(torch.all(inside)):
                raise ContractError(
                    f"latent site {name!r}: the guide's {guide_distributions[name]} has support "
                    f"{_base_constraint(gsupport)} but the model's prior has support "
                    f"{_base_constraint(msupport)}; guide draws outside the prior's support "
                    f"give log p = -inf. Use a guide distribution on the prior's support "
                    f"(e.g. LogNormal or a TransformedDistribution for positive latents)")
    return latent_sites, guide_distributions, non_reparam


def _check_batch_shapes(traces, num_rows: int, enumerated=()) -> None:
    """The data plate is the only batch dimension of every site (enumerated model sites,
    summed out by the log weights, aside)."""
    for role, trace in traces:
        try:
            trace.compute_log_prob()
        except Exception as exc:
            raise ContractError(
                f"computing the log-densities of the {role}'s sites failed with "
                f"{type(exc).__name__}: {exc}") from exc
    for role, trace in traces:
        for name, site in _sample_sites(trace):
            if role == "guide" and site["is_observed"]:
                continue
            if role == "model" and name in enumerated:
                continue
            fn = site["fn"]
            batch_shape = tuple(getattr(fn, "batch_shape", ()))
            log_prob_shape = tuple(site["log_prob"].shape)
            if batch_shape != (num_rows,) or log_prob_shape != (num_rows,):
                event_shape = tuple(getattr(fn, "event_shape", ()))
                hint = ""
                if len(batch_shape) > 1:
                    hint = (f"; declare the per-row dim(s) as event dims with "
                            f".to_event({len(batch_shape) - 1})")
                raise ContractError(
                    f"site {name!r} in the {role} has batch shape {batch_shape} (event shape "
                    f"{event_shape}, log_prob shape {log_prob_shape}); the data plate must be "
                    f"the only batch dimension, i.e. batch shape ({num_rows},) = [.., n] with "
                    f"n = x.shape[0]{hint}")


def _check_site_scales(traces) -> None:
    """Every site has scale 1: a ``poutine.scale`` in the pair (a tempered likelihood, a weight
    per row, a minibatch factor ``N / B`` written by hand) or a subsampling plate (scale
    ``full size / subsample size``) changes the densities the estimates are made of, so the
    importance-sampled "log p(x)" would be the log of another quantity."""
    for role, trace in traces:
        for name, site in _sample_sites(trace):
            scale = site["scale"]
            if torch.is_tensor(scale) and scale.numel() != 1:
                shown = f"a tensor of shape {tuple(scale.shape)}"
            elif math.isclose(float(scale), 1.0, rel_tol=1e-6):
                continue
            else:
                shown = f"{float(scale):g}"
            subsampling = [f"{frame.name!r} ({frame.size} of {frame.full_size})"
                           for frame in site["cond_indep_stack"]
                           if getattr(frame, "full_size", None) not in (None, frame.size)]
            source = (f", set by its subsampling plate(s) {', '.join(subsampling)}"
                      if subsampling else " (a poutine.scale or a scale set by the pair)")
            raise ContractError(
                f"site {name!r} in the {role} has scale {shown}{source}: its log density is "
                f"then a weighted one, so the bounds and the importance-sampled log p(x) would "
                f"be of another quantity; every site needs scale 1 (the data plate takes all "
                f"rows of x, pyro.plate('data', x.shape[0]); the objectives scale minibatches "
                f"by num_data themselves, and ELBO(beta=...) weights the KL term)")


def _check_particle_plate(model_fn, guide_fn, x, mask, num_rows: int, enumerated=()):
    """Every site broadcasts with a particle plate on the left of the data plate (with
    enumerated sites, the values they enumerate on the dims further left). Returns the
    two-particle run's terms."""
    try:
        terms = trace_log_terms(model_fn, guide_fn, x, num_particles=_CHECK_PARTICLES,
                                mask=mask)
    except programs.ProgramError as exc:  # the first direct run of a ProgramPair's programs
        raise ContractError(f"running the pair's ProgramPair programs directly failed: {exc}") \
            from exc
    except Exception as exc:
        raise ContractError(
            f"the pair does not broadcast with a particle dimension on the left: running it "
            f"inside pyro.plate({PARTICLE_PLATE!r}, {_CHECK_PARTICLES}, dim=-2) failed with "
            f"{type(exc).__name__}: {exc}. Latent draws then have shape [K, n, ...]; write "
            f"code that works on leading batch dims (e.g. z @ W.T rather than W @ z.T, "
            f"x.shape[-1] rather than x.shape[1], .expand on the right dims)"
        ) from exc
    expected = (_CHECK_PARTICLES, num_rows)
    for role, trace in (("guide", terms.guide_trace), ("model", terms.model_trace)):
        for name, site in _sample_sites(trace):
            if role == "guide" and site["is_observed"]:
                continue
            shape = tuple(site["log_prob"].shape)
            if role == "model" and (name in enumerated
                                    or (enumerated and shape[-2:] == expected)):
                continue
            if shape != expected:
                raise ContractError(
                    f"with {_CHECK_PARTICLES} particles vectorized on the left, site {name!r} "
                    f"in the {role} has log_prob shape {shape}, expected {expected} = "
                    f"[particles, n]; the site ignores the particle dimension (e.g. a "
                    f"distribution built with .expand([n, ...]) or reshaped with x.shape[0]); "
                    f"let the plates broadcast instead")
    return terms


#: Relative tolerance of :func:`_check_without_particle_plate` (the two runs differ by rounding
#: only, about 1e-7 of the terms' size in float32)
_PLATE_FREE_RTOL = 1e-4


#: Relative tolerance of :func:`_check_direct_run` (the same operations on the same tensors)
_DIRECT_RUN_RTOL = 1e-6


def _agree(a: torch.Tensor, b: torch.Tensor, tol: torch.Tensor) -> torch.Tensor:
    """Elementwise: equal up to ``tol``, or the same infinity, or both NaN."""
    return (a == b) | ((a - b).abs() <= tol) | (a.isnan() & b.isnan())


def _rewinder(device: torch.device):
    """A function that puts the random generators (torch's, on ``device`` too, Python's and
    NumPy's, as :func:`pyro.util.get_rng_state` covers them) back where they are now."""
    state = pyro.util.get_rng_state()
    cuda = [(d, torch.cuda.get_rng_state(d)) for d in ([device] if device.type == "cuda" else [])]

    def rewind():
        pyro.util.set_rng_state(state)
        for d, cuda_state in cuda:
            torch.cuda.set_rng_state(cuda_state, d)
    return rewind


@contextlib.contextmanager
def _random_state_kept(device: torch.device):
    """Yields a :func:`_rewinder` to the state on entry; on leaving the generators are put
    back there too, so the checks draw nothing from the caller's generators."""
    rewind = _rewinder(device)
    try:
        yield rewind
    finally:
        rewind()


def _first_disagreement(a: torch.Tensor, b: torch.Tensor, tol: torch.Tensor):
    """The first index at which ``a`` and ``b`` do not :func:`_agree`, or None."""
    bad = (~_agree(a, b, tol)).nonzero()
    return int(bad[0, 0]) if bad.numel() else None


def _rounding_scale(*terms) -> torch.Tensor:
    """``1 + sum |term|``: the size the rounding of a sum of log-density terms scales with."""
    return 1 + sum(t.abs() for t in terms if t is not None)


#: Multiple of :func:`_observed_sensitivity` the comparisons allow on top of their relative
#: tolerance (the sensitivity assumes one rounding of relative size ``eps`` per element)
_SENSITIVITY_FACTOR = 4.0


def _observed_sensitivity(model_trace, num_rows: int) -> torch.Tensor:
    """Per row, ``eps * sum_j |d log p(x_j | .) / d x_j| * (1 + |x_j|)`` over the observed
    sites' elements: how far the observed log densities move when the quantities they are
    computed from (a decoder's mean, say) are rounded once in float precision. A matrix
    product over another number of rows (a batch of two particles, or half the rows) rounds
    differently; a sharp likelihood (a Gaussian with scale 1e-3) magnifies that by
    ``|x - mu| / sigma^2`` per element, far beyond a tolerance relative to the log density,
    which a row's log-likelihood near 0 makes tiny (review: a 784-dim Gaussian VAE with
    scale 1e-3 differed by 5e-3 between 2 and 1 particles). Sites whose value is not a
    floating tensor with the rows on the data dim, or whose density has no gradient in its
    value, add nothing."""
    total = torch.zeros(num_rows)
    for _, site in _sample_sites(model_trace):
        value = site["value"]
        if not site["is_observed"] or not torch.is_tensor(value) \
                or not value.is_floating_point():
            continue
        row_dim = value.dim() - len(getattr(site["fn"], "event_shape", ())) - 1
        if row_dim < 0 or value.shape[row_dim] != num_rows:
            continue
        probe = value.detach().clone().requires_grad_(True)
        try:
            with torch.enable_grad():
                log_p = site["fn"].log_prob(probe)
                grad, = torch.autograd.grad(log_p.sum(), probe, allow_unused=True)
        except Exception:  # noqa: BLE001 - no gradient in the value: no sensitivity to add
            continue
        if grad is None:
            continue
        per_element = (grad.abs() * (1 + probe.detach().abs())).nan_to_num(0.0, 0.0, 0.0)
        rows = per_element.movedim(row_dim, 0).reshape(num_rows, -1).sum(1)
        total = total.to(rows) + torch.finfo(value.dtype).eps * rows
    return total


def _tolerance(rtol: float, terms, with_q: bool = False) -> torch.Tensor:
    """``[K, batch]``: how far two computations of ``terms``' log densities may differ by
    rounding: ``rtol`` of :func:`_rounding_scale` of the model's terms (and ``log_q`` with
    ``with_q``), plus the observed sites' sensitivity to a rounding of what they are computed
    from (:func:`_observed_sensitivity`)."""
    parts = (terms.log_lik, terms.log_prior) + ((terms.log_q,) if with_q else ())
    scale = rtol * _rounding_scale(*parts)
    sensitivity = _observed_sensitivity(terms.model_trace, int(scale.shape[-1]))
    return scale + _SENSITIVITY_FACTOR * sensitivity.to(scale)


def _check_without_particle_plate(model_fn, guide_fn, x, mask, rewind):
    """A one-particle run without the particle plate (how a one-particle ELBO step runs the
    pair, as Pyro's ``Trace_ELBO`` does) gives the log weights of a run with a particle plate
    of size 1, on the same random numbers (``rewind`` between the runs: the draws are then the
    same, dropout included). A pair that reads the particle dim (``z.shape[0]`` as the batch
    size, a sum or mean over dim 0, a branch on ``z.dim()``) passes the shape checks but fails
    this one: it would train another objective than the one evaluation reports. Returns the
    terms of the run without the plate."""
    plated = trace_log_terms(model_fn, guide_fn, x, 1, mask)
    rewind()
    try:
        plain = trace_log_terms(model_fn, guide_fn, x, 1, mask, particle_plate=False)
    except Exception as exc:
        raise ContractError(
            f"the pair runs with a particle plate of size 1 but not without it, as a "
            f"one-particle ELBO step runs it: {type(exc).__name__}: {exc}") from exc
    with_plate, without = plated.log_weights[0], plain.log_weights[0]
    tol = _tolerance(_PLATE_FREE_RTOL, plated, with_q=True)[0]
    row = _first_disagreement(without, with_plate, tol)
    if row is not None:
        raise ContractError(
            f"row {row} has log weight {float(with_plate[row]):.6g} with a particle plate of "
            f"size 1 on the left and {float(without[row]):.6g} without it (as a one-particle "
            f"ELBO step runs the pair), on the same random numbers: the pair reads the "
            f"particle dim (e.g. z.shape[0] or x.shape[0] of a latent as the batch size, a sum "
            f"or mean over dim 0, a branch on z.dim()); index from the right (dim=-2, "
            f"shape[-2]) so that leading particle dims only broadcast")
    return plain


def _model_density(model_fn, x, guide_trace, rows: slice, mask) -> torch.Tensor:
    """``log p(x_i, z_i)`` of the rows ``rows`` scored on their own, ``[rows]``."""
    log_lik, log_prior = model_terms_on_rows(model_fn, x, guide_trace, rows, mask)
    return sum(t[0] for t in (log_lik, log_prior) if t is not None)


#: Relative tolerance of :func:`_check_rows_separate`. A float32 matrix product rounds a row
#: differently in batches of other sizes (one unit in the last place of each output), which a
#: small likelihood scale magnifies: up to 1.6e-4 of ``1 + |log_lik| + |log_prior|`` for
#: row-wise Gaussian models with scale 1e-5 to 1e-3 (review), against 0.01-0.5 for a model that
#: centres or normalizes across its rows.
_ROWS_RTOL = 1e-3


def _check_rows_separate(model_fn, x, mask, plain) -> None:
    """Row ``i``'s model density depends on row ``i`` only: the model scored on the first half
    of the rows, then on the second (their latent values from ``plain``, the one-particle run
    without the particle plate, replayed), gives those rows the densities they have in the
    whole batch. A model that mixes rows (a mean or normalization over the batch, BatchNorm
    or attention across rows, a row read by index, scaling by the batch size) is not a per-row
    density: minibatch bounds and chunked evaluations would then depend on which rows share a
    batch. Not checked with one row, nor when the model draws randomness outside
    ``pyro.sample`` (dropout: two runs differ by design) or cannot run on half the rows (e.g.
    one parameter per training row, or BatchNorm on a single row)."""
    num_rows = int(x.shape[0])
    if num_rows < 2:
        return
    halves = (slice(0, num_rows // 2), slice(num_rows // 2, num_rows))
    whole = (plain.log_lik + plain.log_prior)[0]
    try:
        again = _model_density(model_fn, x, plain.guide_trace, slice(0, num_rows), mask)
        parts = [_model_density(model_fn, x, plain.guide_trace, rows, mask) for rows in halves]
    except Exception:  # noqa: BLE001 - a model that cannot run on fewer rows is not compared
        return
    tol = _tolerance(_ROWS_RTOL, plain)[0]
    if not bool(_agree(again, whole, tol).all()):
        return  # randomness outside the sample sites
    for rows, part in zip(halves, parts):
        first = _first_disagreement(part, whole[rows], tol[rows])
        if first is not None:
            row = rows.start + first
            raise ContractError(
                f"the model mixes rows: row {row}'s log p(x, z) is {float(whole[row]):.6g} in a "
                f"batch of all {num_rows} rows and {float(part[row - rows.start]):.6g} in a batch "
                f"of rows {rows.start}-{rows.stop - 1} only (the same latent values): per-row "
                f"importance weights need each row's density to depend on that row only (no "
                f"mean, normalization, BatchNorm or attention across the data rows in the "
                f"model, and no scaling by the batch size: the objectives scale minibatches "
                f"themselves)")


def _check_particles_separate(model_fn, x, mask, terms) -> None:
    """Each particle's model density depends on that particle's latent values only: the model
    scored on particle ``k``'s draws alone, without the particle plate, gives the densities it
    has in the vectorized run ``terms`` (two particles). A model that folds the particle dim
    into the rows (``z.reshape(-1, d)``, ``z.view(-1, d)[:n]``), or reads one particle for all
    (``z[0]``), passes the shape checks and agrees with itself at one particle, but gives every
    ``K > 1`` bound and the importance-sampled log-likelihood wrong weights. Not checked when
    the model draws randomness outside ``pyro.sample`` (two runs differ by design) or cannot
    run on one particle's values (the other checks cover its shapes)."""
    num_particles = int(terms.log_lik.shape[0])
    whole = terms.log_lik + terms.log_prior
    tol = _tolerance(_ROWS_RTOL, terms)
    try:
        again = sum(t for t in _replayed_model(model_fn, x, num_particles, mask,
                                               terms.guide_trace, True)[1] if t is not None)
        alone = [model_terms_of_particle(model_fn, x, terms.guide_trace, k, mask)
                 for k in range(num_particles)]
    except Exception:  # noqa: BLE001 - a model that cannot run on one particle is not compared
        return
    if any(a is None for a in alone) or not bool(_agree(again, whole, tol).all()):
        return  # values without a particle dim, or randomness outside the sample sites
    for k, (log_lik, log_prior) in enumerate(alone):
        density = sum(t[0] for t in (log_lik, log_prior) if t is not None)
        row = _first_disagreement(density, whole[k], tol[k])
        if row is not None:
            raise ContractError(
                f"the model mixes particles: row {row}'s log p(x, z) for particle {k} is "
                f"{float(whole[k, row]):.6g} when {num_particles} particles run vectorized "
                f"(pyro.plate({PARTICLE_PLATE!r}, {num_particles}, dim=-2)) and "
                f"{float(density[row]):.6g} when particle {k}'s latent values are scored alone: "
                f"the model reads across the particle dim (e.g. z.reshape(-1, d) or "
                f"z.view(-1, d) folding particles into rows, z[0], a sum or mean over dim 0), "
                f"so every bound with K > 1 particles and the importance-sampled "
                f"log-likelihood would use wrong weights; keep leading dims (z @ W.T, "
                f"z.reshape(*z.shape[:-1], ...))")


def _check_direct_run(model_fn, guide_fn, x, mask, direct: LogTerms, rewind) -> None:
    """A :class:`pyro_lvm.models.ProgramPair` is trained and evaluated by running its programs
    directly (:mod:`pyro_lvm.inference.programs`): that run (``direct``, the particle check's,
    which ``rewind`` goes back before) must give the sites and log weights of its ``model`` /
    ``guide`` run through Pyro on the same random numbers."""
    if programs.declared_program(model_fn) is None and programs.declared_program(guide_fn) is None:
        return
    rewind()
    with Messenger():  # any active handler makes the engine run the pair through Pyro
        traced = trace_log_terms(model_fn, guide_fn, x, num_particles=_CHECK_PARTICLES, mask=mask)
    for role in ("guide", "model"):
        sites = [[name for name, _ in _sample_sites(getattr(t, f"{role}_trace"))]
                 for t in (direct, traced)]
        if sites[0] != sites[1]:
            raise ContractError(
                f"the {role}'s program run directly has the sample sites {sites[0]}, run through "
                f"Pyro {sites[1]}: a ProgramPair must declare every site through its program's "
                f"`sample` argument and behave the same whatever Pyro handlers are active")
    # the two runs compute the same operations on the same tensors: bit-identical on the
    # CPU; the tolerance only leaves room for nondeterministic GPU kernels
    direct_lw = direct.log_weights.detach()
    tol = _DIRECT_RUN_RTOL * _rounding_scale(traced.log_lik, traced.log_prior, traced.log_q)
    for k in range(_CHECK_PARTICLES):
        row = _first_disagreement(direct_lw[k], traced.log_weights[k], tol[k])
        if row is not None:
            raise ContractError(
                f"the pair's programs run directly give row {row}, particle {k} the log weight "
                f"{float(direct_lw[k, row]):.6g}, its model/guide run through Pyro "
                f"{float(traced.log_weights[k, row]):.6g}, on the same random numbers: a "
                f"ProgramPair's programs must not depend on the Pyro handlers around them")


def check_contract(pair, x, mask=None, *, guide=None, require_reparameterized: bool = True,
                   check_support: bool = True, param_state=None) -> ContractReport:
    """Run a model/guide pair on ``x`` and verify that it keeps the pyro-lvm contract.

    The pair is run once as written (guide, then model replayed on the guide's draws) and once
    through :func:`inference.importance_weights.trace_log_terms` with two particles vectorized in
    ``pyro.plate("num_particles_vectorized", 2, dim=-2)``, then twice with one particle, with
    and without that plate, on the same random numbers, and its model once more on each half
    of the rows and on each of the two particles' draws alone (their latent values
    replayed). Parameters created by the runs live
    in a throw-away parameter store (:func:`inference.engine.isolated_param_store`), so the
    check leaves no trace in the global store.

    Parameters
    ----------
    pair : object with ``.model``/``.guide``, ``(model, guide)`` tuple, or a model callable
        The pair to check (see :func:`inference.engine.resolve_pair`).
    x : torch.Tensor, shape (n, p)
        A few rows of data (the data plate must have size ``n``).
    mask : torch.Tensor of bool, optional
        Observed-entry mask passed to ``model`` and ``guide``.
    guide : callable, optional
        The guide when ``pair`` is a bare model callable.
    require_reparameterized : bool
        Reject latent sites whose guide distribution has no ``rsample`` (the reparameterized
        ELBO/IWAE gradients and DReG/STL need pathwise derivatives).
    check_support : bool
        Reject a guide whose distribution for a latent site can put mass outside the prior's
        support (e.g. a Normal guide for a log-normal prior): the bound would be :math:`-\\infty`.
    param_state : dict, optional
        A parameter-store state (``pyro.get_param_store().get_state()``, a fit result's
        ``param_store_state``) the runs start from; default: an empty store, so plain
        ``pyro.param`` statements take their initial values. Either way the global store is
        left as it was.

    Returns
    -------
    ContractReport
        Latent and observed site names with their event shapes, whether the guide is
        reparameterized, and the data plate size.

    Raises
    ------
    ContractError
        (a ``ValueError``) naming the first violation found, in this order: ``mask`` marks
        missing values but model or guide takes no ``mask``; running model or guide fails; no ``pyro.plate("data")``, or
        a data plate of the wrong size or not at ``dim=-1``; an observed site outside the data
        plate; no observed site; a latent site outside the data plate (a global latent);
        latent sites in the model but not the guide (unless marked
        ``infer={"enumerate": "parallel"}``, summed out exactly) or vice versa;
        a latent without ``rsample`` (when ``require_reparameterized``); guide support wider
        than the prior's; log-densities that cannot be computed, or a site whose batch shape
        is not ``[n]`` (missing ``.to_event``); a site whose scale is not 1 (a
        ``poutine.scale`` in the pair, a subsampling plate); code that does not broadcast
        over a particle dimension on the left; log weights that change when the particle
        plate is left out of a one-particle run (code that reads the particle dim); a model
        whose rows' densities change when it runs on half the rows (it mixes rows); a model
        whose particles' densities change when each particle's latent values are scored
        alone (it mixes particles, e.g. ``z.reshape(-1, d)``). The last two are not checked
        with randomness outside ``pyro.sample`` or for a model that cannot run on half the
        rows or on one particle; the row check not with one row.
    """
    model_fn, guide_fn, _module = resolve_pair(pair, guide)
    mask = _check_inputs(x, mask)
    num_rows = int(x.shape[0])
    if mask is not None and not bool(mask.all()):
        for fn, role in ((model_fn, "model"), (guide_fn, "guide")):
            if pairs.takes_no_mask(fn):
                raise ContractError(pairs.mask_required_message(fn, role, mask))
    with isolated_param_store(param_state):
        guide_trace = _run(guide_fn, "guide", x, mask)
        model_trace = _run(model_fn, "model", x, mask, replay_trace=guide_trace)
        traces = (("guide", guide_trace), ("model", model_trace))
        _check_data_plate(model_trace, guide_trace, traces, num_rows)
        observed, guide_latent, enumerated = _check_site_names(model_trace, guide_trace)
        latent_sites, guide_distributions, non_reparam = _check_latent_families(
            model_trace, guide_trace, guide_latent,
            require_reparameterized=require_reparameterized, check_support=check_support)
        _check_batch_shapes(traces, num_rows, enumerated)
        _check_site_scales(traces)
        rewind_to_particles = _rewinder(x.device)
        terms = _check_particle_plate(model_fn, guide_fn, x, mask, num_rows, enumerated)
        with _random_state_kept(x.device) as rewind, torch.no_grad():
            plain = _check_without_particle_plate(model_fn, guide_fn, x, mask, rewind)
            _check_rows_separate(model_fn, x, mask, plain)
            _check_particles_separate(model_fn, x, mask, terms)
            _check_direct_run(model_fn, guide_fn, x, mask, terms, rewind_to_particles)
    return ContractReport(
        latent_sites=latent_sites,
        observed_sites={n: tuple(getattr(s["fn"], "event_shape", ())) for n, s in observed.items()},
        guide_distributions=guide_distributions,
        reparameterized=not non_reparam,
        data_size=num_rows,
        non_reparameterized_sites=tuple(non_reparam),
    )
