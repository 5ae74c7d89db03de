"""What every entry point needs to know about a model/guide pair before it runs it.

* **mask is optional** (:func:`mask_optional`): a model or guide written ``model(x)``, as
  Pyro's own examples write them, is called without ``mask`` when the data are fully
  observed; with missing values the error says that the pair must accept ``mask``.
* **a fit result is a pair** (:func:`unwrap_fit_result`, :func:`fit_result_state`): the
  result of :func:`pyro_lvm.inference.fit` carries the pair and the ``pyro.param`` values it
  trained, so ``log_likelihood(result, x)`` evaluates the trained parameters.
* **the sites match** (:func:`check_sites`): every latent site of the model is sampled by
  the guide under the same name, or is a discrete site marked
  ``infer={"enumerate": "parallel"}`` that the log weights sum out exactly; the guide samples
  nothing the model does not have; every latent site is inside ``pyro.plate("data")``.
* **the parameters exist** (:func:`check_pair_for_evaluation`): a plain-function pair whose
  ``pyro.param`` values are not in the active parameter store is refused rather than
  evaluated with freshly initialized parameters.

:func:`check_pair_for_evaluation` runs the pair once on one row (one guide pass, one model
pass) and raises before any sampling; every evaluation entry point calls it.
"""
from __future__ import annotations

import inspect
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.util import site_is_subsample

from pyro_lvm.inference import programs
from pyro_lvm.models.program import mask_use

__all__ = ["PairError", "accepts_mask", "mask_optional", "unwrap_fit_result", "fit_result_state",
           "is_enumerated", "check_sites", "takes_no_mask", "mask_required_message",
           "maskless_program_advice",
           "evaluation_param_state", "checked_for_evaluation", "check_pair_for_evaluation",
           "owning_module"]

DATA_PLATE = "data"


class PairError(ValueError):
    """A model/guide pair cannot be evaluated as given (the message says why and what to do)."""


# ----------------------------------------------------------------------------- mask
def accepts_mask(fn: Callable) -> bool:
    """Whether ``fn`` can be called as ``fn(x, mask=...)`` (True when it cannot be told)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins and exotic callables: assume the contract
        return True
    params = signature.parameters
    return "mask" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _describe(fn: Callable) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) \
        or type(fn).__name__


def mask_optional(fn: Callable, role: str) -> Callable:
    """``fn`` callable as ``fn(x, mask=None)``.

    A function that takes ``mask`` is returned as it is. One that does not is wrapped: it is
    called as ``fn(x)`` when ``mask`` is None or marks every entry observed, and refused
    (:class:`PairError`) when ``mask`` marks missing entries, since the pair would then score
    the missing values as data.
    """
    if accepts_mask(fn) or getattr(fn, "_pyro_lvm_without_mask", None) is not None:
        return fn

    def call(x, mask=None):
        if mask is not None and not bool(torch.as_tensor(mask).all()):
            raise PairError(mask_required_message(fn, role, mask))
        return fn(x)

    call.__name__ = getattr(fn, "__name__", role)
    call.__qualname__ = _describe(fn)
    call._pyro_lvm_without_mask = fn
    return call


def _maskless_program(fn: Callable) -> Optional[Tuple[str, object]]:
    """``(program name, pair)`` when ``fn`` is derived by a ``ProgramPair`` from a program
    written without ``mask``; None otherwise."""
    declared = programs.declared_program(fn)
    if declared is None or declared[1].program_takes_mask(declared[0]):
        return None
    return declared


def maskless_program_advice(fn: Callable, role: str) -> Optional[str]:
    """What to write when ``fn``, the ``role`` (model or guide) of a ``ProgramPair``, comes
    from a program without ``mask``; None for any other function."""
    found = _maskless_program(fn)
    if found is None:
        return None
    name, pair = found
    return (f"the {role}'s program {type(pair).__name__}.{name} takes no mask: write it "
            f"{name}(self, x, mask, sample) and {mask_use(name)}")


def takes_no_mask(fn: Callable) -> bool:
    """Whether ``fn`` is a model or guide wrapped by :func:`mask_optional`, or derived by a
    ``ProgramPair`` from a program written without ``mask`` (takes no mask)."""
    return (getattr(fn, "_pyro_lvm_without_mask", None) is not None
            or _maskless_program(fn) is not None)


def mask_required_message(fn: Callable, role: str, mask) -> str:
    """Why a pair without a ``mask`` argument cannot take data with missing values."""
    missing = int((~torch.as_tensor(mask).bool()).sum())
    advice = maskless_program_advice(fn, role)
    if advice is not None:
        return f"the data have {missing} missing value(s) (mask has False entries) but {advice}"
    fn = getattr(fn, "_pyro_lvm_without_mask", fn)
    return (f"the data have {missing} missing value(s) (mask has False entries) but the "
            f"{role} {_describe(fn)} takes no mask: a pair must accept `mask` to be fit or "
            f"evaluated on incomplete data. Write {role}(x, mask=None) and score only the "
            f"observed entries, e.g. pyro.sample('x', dist.Normal(loc, scale)"
            f".mask(mask).to_event(1), obs=x)")


# ----------------------------------------------------------------------------- fit results
def _is_fit_result(obj) -> bool:
    from pyro_lvm.inference.training.state import FitResult

    return isinstance(obj, FitResult)


def unwrap_fit_result(pair, guide=None):
    """``(pair, guide)`` with a :class:`~pyro_lvm.inference.training.FitResult` replaced by the
    pair it trained (and the guide it was given, if any)."""
    if _is_fit_result(pair):
        if guide is None:
            guide = getattr(pair, "guide", None)
        pair = pair.model
    return pair, guide


def owning_module(pair, model_fn, guide_fn) -> Optional[torch.nn.Module]:
    """The ``torch.nn.Module`` that owns the pair's parameters: the pair itself, or the
    object whose bound methods model and guide are (``(m.model, m.guide)``); else None."""
    if isinstance(pair, torch.nn.Module):
        return pair
    for fn in (model_fn, guide_fn):
        fn = getattr(fn, "_pyro_lvm_without_mask", fn)
        owner = getattr(fn, "__self__", None)
        if isinstance(owner, torch.nn.Module):
            return owner
    return None


def fit_result_state(pair, module: Optional[torch.nn.Module]) -> Optional[dict]:
    """The parameter-store state to evaluate a fit result in (None: not a fit result).

    The ``pyro.param`` values the fit trained, less the tensors a module owns (a module
    carries its own parameters, which may have changed since)."""
    if not _is_fit_result(pair) or pair.param_store_state is None:
        return None
    state = pair.param_store_state
    owned = set() if module is None else {id(p) for p in module.parameters()}
    params = {k: v for k, v in state["params"].items() if id(v) not in owned}
    return {"params": params,
            "constraints": {k: v for k, v in state["constraints"].items() if k in params}}


# ----------------------------------------------------------------------------- sites
def is_enumerated(site: dict) -> bool:
    """Whether a model site is marked for exact summation (``infer={"enumerate":
    "parallel"}``)."""
    return site["type"] == "sample" and not site["is_observed"] \
        and site["infer"].get("enumerate") == "parallel"


def _sample_sites(trace: poutine.Trace) -> Iterable[Tuple[str, dict]]:
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and not site_is_subsample(site):
            yield name, site


def _in_data_plate(site: dict) -> bool:
    return any(frame.name == DATA_PLATE for frame in site["cond_indep_stack"])


def check_sites(model_trace: poutine.Trace, guide_trace: poutine.Trace,
                error: type = PairError) -> Dict[str, List[str]]:
    """Check that the latent sites of model and guide match, and are all per data point.

    Returns ``{"latent": guide latent sites, "enumerated": model sites summed out}``.

    Raises ``error`` naming the site when a latent site is outside ``pyro.plate("data")``,
    when a model latent site is neither in the guide nor marked for enumeration (the prior
    would then be both the proposal and the target of that site, and the weights wrong),
    when an enumerated site cannot be enumerated, or when the guide samples a site the model
    does not have (or observes).
    """
    for role, trace in (("guide", guide_trace), ("model", model_trace)):
        for name, site in _sample_sites(trace):
            if site["is_observed"] or _in_data_plate(site):
                continue
            plates = [frame.name for frame in site["cond_indep_stack"]]
            if plates:
                raise error(
                    f"latent site {name!r} in the {role} is inside pyro.plate(s) {plates} but "
                    f"not pyro.plate({DATA_PLATE!r}): the plate over the data rows must be named "
                    f"{DATA_PLATE!r}, pyro.plate({DATA_PLATE!r}, x.shape[0], dim=-1), in the "
                    f"model and in the guide")
            raise error(
                f"latent site {name!r} in the {role} is outside pyro.plate({DATA_PLATE!r}): a "
                f"global latent variable is not supported, because the importance weights "
                f"p(x_i, z_i) / q(z_i | x_i) are per data point and need every latent inside "
                f"the data plate. Make {name!r} a parameter (pyro.param, or a module "
                f"parameter) fitted by maximum likelihood, or a per-row latent inside "
                f"pyro.plate({DATA_PLATE!r}, x.shape[0], dim=-1)")
    model_latent = [n for n, s in _sample_sites(model_trace) if not s["is_observed"]]
    guide_latent = [n for n, s in _sample_sites(guide_trace) if not s["is_observed"]]
    enumerated = [n for n in model_latent
                  if n not in guide_latent and is_enumerated(model_trace.nodes[n])]
    only_model = [n for n in model_latent if n not in guide_latent and n not in enumerated]
    if only_model:
        raise error(
            f"latent site(s) {only_model} in the model have no counterpart in the guide "
            f"(guide latent sites: {guide_latent}): the guide must sample every continuous "
            f"latent site of the model under the same name (otherwise it is drawn from the "
            f"prior and the weights are wrong); a discrete site can instead be summed out "
            f"exactly by marking it in the model with infer={{'enumerate': 'parallel'}}")
    for name in enumerated:
        fn = model_trace.nodes[name]["fn"]
        if not getattr(fn, "has_enumerate_support", False):
            raise error(
                f"latent site {name!r} in the model is marked infer={{'enumerate': "
                f"'parallel'}} but its distribution {type(fn).__name__} has no finite support "
                f"to sum over; sample it in the guide instead")
    only_guide = [n for n in guide_latent if n not in model_latent]
    if only_guide:
        observed = [n for n in only_guide if n in model_trace.nodes]
        raise error(
            f"latent site(s) {only_guide} in the guide have no latent counterpart in the "
            f"model (model latent sites: {model_latent})"
            + (f"; {observed} are observed in the model and must not be sampled by the guide"
               if observed else "; every guide site must be a latent site of the model under "
                                "the same name (check the site names)"))
    return {"latent": guide_latent, "enumerated": enumerated}


def _missing_parameters(param_trace: poutine.Trace, present: set) -> List[str]:
    names = []
    for name, site in param_trace.nodes.items():
        if site["type"] != "param" or "$$$" in name:  # pyro.module parameters live in the module
            continue
        if name not in present and name not in names:
            names.append(name)
    return names


#: Rows of the data :func:`check_pair_for_evaluation` runs :func:`pyro_lvm.check_contract` on
#: (as many as ``fit`` checks)
EVALUATION_CHECK_ROWS = 16


def check_pair_for_evaluation(model_fn: Callable, guide_fn: Callable, x: torch.Tensor,
                              mask: Optional[torch.Tensor], module) -> Dict[str, List[str]]:
    """Run the pair on the first rows and refuse what would give a wrong number.

    To be called inside the activated parameter store of an evaluation (and inside
    ``torch.random.fork_rng``: it draws). Raises :class:`PairError` for a plain-function
    pair whose ``pyro.param`` values are not in the active store (naming them and saying how
    to pass the fit result), and for mismatched sites (:func:`check_sites`); then runs
    :func:`pyro_lvm.check_contract` on the first :data:`EVALUATION_CHECK_ROWS` rows with the
    active parameters, so evaluation refuses what ``fit`` refuses (a missing ``.to_event``, a
    scaled site, a model that mixes rows or particles, ...) with the same
    :class:`~pyro_lvm.inference.contract.ContractError`, except that a guide need not be
    reparameterized nor match the prior's support (neither biases an importance-sampling
    estimate); not for a pair whose guide draws nothing (its weights are the model's density,
    the same for every particle). Any parameter the runs create is discarded. Returns
    :func:`check_sites`' summary.
    """
    from pyro_lvm.inference.contract import check_contract  # contract imports this module

    store = pyro.get_param_store()
    present = set(store.keys())
    xb = x[:1]
    mb = None if mask is None else mask[:1]
    failure, sites = None, None
    with store.scope(store.get_state()), poutine.trace(param_only=True) as params:
        try:
            guide_trace = poutine.trace(guide_fn).get_trace(xb, mask=mb)
            model_trace = poutine.trace(poutine.replay(model_fn, trace=guide_trace)).get_trace(
                xb, mask=mb)
        except Exception as exc:  # noqa: BLE001 - check_contract below names the problem
            failure = exc
    if module is None:
        missing = _missing_parameters(params.trace, present)
        if missing:
            raise PairError(
                f"parameter(s) {missing} of the pair are not in the active Pyro parameter store, "
                f"so they would be evaluated at freshly initialized values. Pass the result of "
                f"fit instead of the pair (log_likelihood(result, x), diagnose(result, x), ...), "
                f"or evaluate inside `with result.activate():`, or pass "
                f"param_state=result.param_store_state")
    if failure is None:
        sites = check_sites(model_trace, guide_trace)
        if not sites["latent"]:
            # no draw to check: the weights are the model's (exact) density for every particle
            return sites
    rows = slice(0, EVALUATION_CHECK_ROWS)
    check_contract((model_fn, guide_fn), x[rows], None if mask is None else mask[rows],
                   require_reparameterized=False, check_support=False,
                   param_state=store.get_state())
    if failure is not None:
        raise failure
    return sites


def evaluation_param_state(pair, module, param_state) -> Optional[dict]:
    """The parameter-store state an evaluation activates: ``param_state`` when given, else
    the trained values of a fit result, else (plain-function pairs) a snapshot of the global
    store; None (an empty store) for a module pair."""
    if param_state is None:
        param_state = fit_result_state(pair, module)
    if param_state is None and module is None:
        param_state = pyro.get_param_store().get_state()
    return param_state


def checked_for_evaluation(model_fn, guide_fn, x, mask, module) -> Dict[str, List[str]]:
    """:func:`check_pair_for_evaluation` with its own random state (the caller's stream of
    draws is not shifted by the check), without gradients."""
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        return check_pair_for_evaluation(model_fn, guide_fn, x, mask, module)
