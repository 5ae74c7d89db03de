"""Execution of one run: the run's data, its fit (SVI, with an optional warm start, or the
family's exact fit), its evaluation, and its files (written so that ``result.json``, last,
marks a complete run)."""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pathlib
import shutil
import time
import traceback as _traceback
from typing import Any, Dict, List, Optional, Union

import numpy as np
import pandas as pd
import pyro
import torch

from pyro_lvm.inference.engine import isolated_param_store, resolve_device
from pyro_lvm.studies.datasets import Dataset, contaminate
from pyro_lvm.studies.runner import families, storage
from pyro_lvm.studies.runner.evaluation import evaluate_run
from pyro_lvm.studies.runner.provenance import now
from pyro_lvm.studies.runner.schema import FIT_METHODS, RESULT_SCHEMA_VERSION, RunConfig

__all__ = ["execute_run", "run_data", "fit_pair", "fit_exact"]

def run_data(config: RunConfig, dataset: Dataset) -> Dataset:
    """The data a run sees: the study's dataset, with the training rows contaminated by
    gross errors when ``config.extra["outlier_fraction"] > 0``
    (:func:`studies.datasets.contaminate`, rows chosen with the run's seed,
    ``outlier_scale`` standard deviations, default 10). Validation and test rows are never
    changed, so every run is judged on the same clean held-out data."""
    fraction = float(config.extra.get("outlier_fraction", 0) or 0)
    if fraction == 0:
        return dataset
    return contaminate(dataset, fraction, float(config.extra.get("outlier_scale", 10.0)),
                       seed=config.seed)


def fit_pair(model, dataset: Dataset, config: RunConfig, *, objective, callbacks, device,
             progress=None):
    """Fit ``model`` with SVI (``pyro_lvm.fit``); a separate function so tests can count
    fits. ``progress`` (a RunProgress, optional) adds a callback showing the steps."""
    from pyro_lvm.inference.training import fit

    valid = dataset.valid if dataset.valid.shape[0] else None
    kwargs = {}
    if "clip_norm" in config.extra:
        kwargs["clip_norm"] = float(config.extra["clip_norm"])
    return fit(model, dataset.train, objective=objective, epochs=config.epochs,
               batch_size=config.batch_size, lr=config.lr, seed=config.seed, device=device,
               validation=valid, mask=dataset.mask("train"),
               callbacks=list(callbacks) + ([progress.fit_callback()] if progress else []),
               valid_mask=dataset.mask("valid") if valid is not None else None,
               progress=False, **kwargs)


def fit_exact(model, dataset: Dataset, config: RunConfig):
    """The family's exact fit (closed-form PPCA, EM factor analysis) on fully observed data."""
    if dataset.masks is not None:
        raise ValueError("exact fits (fit_method='exact') need fully observed data; use SVI")
    fitter = families.get_family(config.model).fit_exact
    if fitter is None:
        exact = [name for name in families.family_names()
                 if families.get_family(name).fit_exact is not None]
        raise ValueError(f"fit_method='exact' needs a family with an exact fit ({', '.join(exact)}), "
                         f"not {config.model!r}")
    return fitter(model, dataset, config)


def _history_frame(history) -> pd.DataFrame:
    if history is None:
        return pd.DataFrame(columns=["epoch", "step", "train_objective", "valid_objective", "time_s"])
    return history if isinstance(history, pd.DataFrame) else pd.DataFrame(history)


def _last_epoch_value(history: pd.DataFrame, column: str) -> Optional[float]:
    if column not in history.columns or history[column].notna().sum() == 0:
        return None
    h = history.dropna(subset=[column])
    if "epoch" in h.columns:
        h = h[h["epoch"] == h["epoch"].max()]
    return float(h[column].mean())



#: OSError numbers that mean "this machine cannot write here now": the run is not recorded
#: as failed (it is retried by the next invocation) and the study stops with one line.
IO_ERRNOS = frozenset(getattr(errno, name) for name in ("ENOSPC", "EROFS", "EACCES", "EPERM",
                                                        "EDQUOT", "EIO") if hasattr(errno, name))


def is_io_failure(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in IO_ERRNOS


def execute_run(config: RunConfig, dataset: Dataset, run_dir: Union[str, os.PathLike], *,
                progress=None, notes: Optional[List[str]] = None) -> Dict[str, Any]:
    """Fit, evaluate and save one run into ``run_dir``; returns the ``result.json`` content.

    Never raises for a failing run (except KeyboardInterrupt / SystemExit, and an OSError
    of :data:`IO_ERRNOS`: the disk, not the run, failed): the failure is recorded with
    status ``"failed"``, the message and the traceback. ``progress`` (a
    :class:`~pyro_lvm.studies.runner.progress.RunProgress`, optional) shows training steps
    and evaluation chunks; ``notes`` start the result's notes (why the run is redone).
    """
    run_dir = pathlib.Path(run_dir)
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a partial earlier attempt (no result.json): redo from scratch
    run_dir.mkdir(parents=True)
    storage.write_text(run_dir / "config.json", storage.dump_json(config.to_record()))
    t_start = time.perf_counter()
    result: Dict[str, Any] = {"schema": RESULT_SCHEMA_VERSION, "run_id": config.run_id,
                              "config_hash": config.config_hash, "status": "running",
                              "started": now(), "notes": list(notes or [])}
    history = None
    device = None
    try:
        device = resolve_device(config.device)
        metrics, history = _fit_evaluate_save(config, dataset, run_dir, device, result, progress)
        metrics["wall_time_s"] = time.perf_counter() - t_start
        result.update(status="ok", error=None, metrics=metrics)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # recorded; the grid goes on
        if is_io_failure(exc):
            raise
        result.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                      traceback=_traceback.format_exc(),
                      metrics={"wall_time_s": time.perf_counter() - t_start})
        if history is None and isinstance(getattr(exc, "history", None), pd.DataFrame):
            history = exc.history  # NonFiniteLossError: the curve up to the divergence
        if history is not None:
            storage.write_text(run_dir / "history.csv", _history_frame(history).to_csv(index=False))
    result["device"] = str(device) if device is not None else config.device
    result["finished"] = now()
    result["config"] = config.to_dict()
    text = storage.dump_json(result)
    storage.write_text(run_dir / "result.json", text)  # completion marker: last
    return json.loads(text)  # exactly what a resumed study reads back


def _fit_evaluate_save(config: RunConfig, dataset: Dataset, run_dir: pathlib.Path, device,
                       result: Dict[str, Any], progress):
    """The body of a run: returns ``(metrics, history)``; fills ``result`` (objective, data,
    file hashes) and writes history.csv, model.pt and artifacts.npz."""
    dataset = run_data(config, dataset)
    result["data_sha256"] = dataset.sha256  # differs from the study's with outliers added
    result["data_source"] = dataset.source
    pyro.set_rng_seed(config.seed)  # model initialization (and VampPrior rows)
    with isolated_param_store():
        model = families.build_model(config, dataset)
        t0 = time.perf_counter()
        if config.fit_method == "exact":
            fit_exact(model, dataset, config)
            model = model.to(device)
            history = None
            result["objective"] = getattr(model, "fit_description", None) or (
                "exact (closed form)" if config.model == "ppca" else "exact (EM)")
        elif config.fit_method == "svi":
            model, history, objective, fitted = _fit_svi(model, dataset, config, device,
                                                         result["notes"], progress)
            result["objective"] = getattr(objective, "name", config.objective)
            result["stopped_early"] = bool(getattr(fitted, "stopped_early", False))
        else:
            raise ValueError(f"unknown fit_method {config.fit_method!r}; use one of {FIT_METHODS}")
        train_time = time.perf_counter() - t0
        history = _history_frame(history)
        check_finite_validation(model, dataset, history, device)
        t1 = time.perf_counter()
        metrics, arrays = evaluate_run(model, dataset, config, device, result["notes"],
                                       progress=progress)
        metrics.update(train_time_s=train_time, eval_time_s=time.perf_counter() - t1)
        metrics["final_train_objective"] = _last_epoch_value(history, "train_objective")
        metrics["final_valid_objective"] = _last_epoch_value(history, "valid_objective")
        metrics["epochs_run"] = int(history["epoch"].nunique()) if "epoch" in history.columns else 0
        metrics["num_parameters"] = int(sum(p.numel() for p in model.parameters())) \
            if isinstance(model, torch.nn.Module) else None
        storage.write_text(run_dir / "history.csv", history.to_csv(index=False))
        if isinstance(model, torch.nn.Module):
            buf = io.BytesIO()
            torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
            storage.write_bytes(run_dir / "model.pt", buf.getvalue())
            result["model_sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        storage.write_bytes(run_dir / "artifacts.npz", buf.getvalue())
    return metrics, history


def check_finite_validation(model, dataset: Dataset, history: pd.DataFrame, device) -> None:
    """ValueError naming the validation rows whose held-out ELBO is not finite, when the
    learning curve's validation objective is not finite (a run is then "failed", not "ok")."""
    if "valid_objective" not in history.columns or not len(history):
        return
    values = pd.to_numeric(history["valid_objective"], errors="coerce").dropna().to_numpy(float)
    if values.size == 0 or np.isfinite(values).all():
        return
    from pyro_lvm.inference.evaluate import elbo as heldout_elbo

    rows = []
    try:
        per_row = heldout_elbo(model, dataset.valid, num_samples=1, mask=dataset.mask("valid"),
                               device=device, progress=False).per_row
        rows = np.flatnonzero(~np.isfinite(per_row["elbo"].to_numpy(float))).tolist()
    except Exception:  # naming the rows is a courtesy; the verdict stands without it
        pass
    where = (f" (validation row(s) {', '.join(map(str, rows[:5]))}"
             f"{' ...' if len(rows) > 5 else ''})" if rows else "")
    raise ValueError(f"the validation objective is not finite{where}: the data cannot be fit "
                     f"by this model as they are (rescale them or check for extreme values)")


WARM_START_PHASE, PRETRAIN_PHASE, MAIN_PHASE = "warm_start", "pretrain", "main"


def _kl_warmup_callbacks(config: RunConfig, objective, notes: Optional[List[str]],
                         epochs_before: int = 0) -> list:
    """KL warm-up over ``config.warmup_epochs`` epochs for a fit that starts after
    ``epochs_before`` epochs of an earlier phase (the schedule goes on, it does not restart);
    ``notes`` (None: say nothing) gets a note when the objective has no KL weight."""
    if config.warmup_epochs <= epochs_before:
        return []
    if not getattr(objective, "supports_beta", False):
        if notes is not None:
            notes.append(f"warmup_epochs={config.warmup_epochs} ignored: {objective.name} has no "
                         f"KL weight to warm up")
        return []
    from pyro_lvm.inference.training import KLWarmup

    return [KLWarmup(config.warmup_epochs, start_epoch=epochs_before)]


def _fit_svi(model, dataset: Dataset, config: RunConfig, device, notes: List[str],
             progress=None):
    """SVI fit of a run, with the standard-normal warm start of ``prior_warm_start_epochs`` or
    the family's own pre-training phase (:attr:`Family.pretrain`).

    Returns ``(model, history, objective, fitted)`` (objective and FitResult of the last
    phase; history of both phases).
    """
    w = config.prior_warm_start_epochs
    if w > 0 and config.prior == "normal":
        notes.append(f"prior_warm_start_epochs={w} ignored: the prior is already the standard "
                     f"normal")
        w = 0
    if w > 0 and config.model != "dlvm":
        raise ValueError(f"prior_warm_start_epochs needs a DLVM (model='dlvm'), not "
                         f"{config.model!r}")
    if w >= config.epochs:
        raise ValueError(f"prior_warm_start_epochs={w} leaves no epoch for the {config.prior!r} "
                         f"prior: it must be smaller than epochs={config.epochs}")
    warm_history = None
    if w > 0:
        warm_config = config.replace(prior="normal", prior_warm_start_epochs=0, epochs=w)
        # seeded as the normal-prior run of this seed: phase 1 is its first w epochs
        pyro.set_rng_seed(config.seed)
        with isolated_param_store():
            warm_model = families.build_model(warm_config, dataset)
            warm_objective = families.build_objective(warm_config)
            warm_fitted = fit_pair(warm_model, dataset, warm_config, objective=warm_objective,
                                   callbacks=_kl_warmup_callbacks(warm_config, warm_objective, notes),
                                   device=device, progress=progress)
        warm_model = getattr(warm_fitted, "model", warm_model)
        _copy_all_but_prior(warm_model, model)
        warm_history = _history_frame(getattr(warm_fitted, "history", None)).assign(
            phase=WARM_START_PHASE)
        notes.append(f"warm start: {w} epoch(s) with the standard normal prior, then "
                     f"{config.epochs - w} with the {config.prior} prior (encoder and decoder "
                     f"carried over)")
    pretrain = families.get_family(config.model).pretrain
    if pretrain is not None:
        if w > 0:
            raise ValueError(f"{config.model!r} has its own pre-training phase; leave "
                             f"prior_warm_start_epochs at 0")
        pre_history, note = pretrain(model, dataset, config, device, progress)
        warm_history = _history_frame(pre_history).assign(phase=PRETRAIN_PHASE)
        notes.append(note)
    main_config = config.replace(epochs=config.epochs - w)
    objective = families.build_objective(main_config)
    # (a note that the objective has no KL weight was made in the warm start already)
    callbacks = _kl_warmup_callbacks(config, objective, notes if w == 0 else None,
                                     epochs_before=w)
    try:
        fitted = fit_pair(model, dataset, main_config, objective=objective, callbacks=callbacks,
                          device=device, progress=progress)
    except Exception as exc:
        partial = getattr(exc, "history", None)
        if warm_history is not None and isinstance(partial, pd.DataFrame):
            exc.history = _join_phases(warm_history, partial)
        raise
    model = getattr(fitted, "model", model)
    if not isinstance(model, torch.nn.Module) and fitted is not None:
        # a pair of plain functions keeps its trained pyro.param values in the fit result,
        # which stands in for the pair in every evaluation
        model = fitted
    history = _history_frame(getattr(fitted, "history", None))
    if warm_history is not None:
        history = _join_phases(warm_history, history)
    return model, history, objective, fitted


def _join_phases(warm: pd.DataFrame, main: pd.DataFrame) -> pd.DataFrame:
    """One history: the main phase's epochs and steps counted on from the warm start's."""
    main = main.assign(phase=MAIN_PHASE)
    for column in ("epoch", "step"):
        if column in warm.columns and column in main.columns and len(warm):
            main[column] = main[column] + warm[column].max()
    if "time_s" in warm.columns and "time_s" in main.columns and len(warm):
        main["time_s"] = main["time_s"] + warm["time_s"].max()  # cumulative wall time
    return pd.concat([warm, main], ignore_index=True)


def _copy_all_but_prior(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Load every ``state_dict`` entry of ``source`` except the prior's into ``target``.

    Raises ValueError unless the two models have exactly the same non-prior entries (the
    warm start must carry over the whole encoder, decoder and likelihood, nothing else).
    """
    def non_prior(m):
        return {k: v for k, v in m.state_dict().items() if not k.startswith("prior.")}

    src, dst = non_prior(source), non_prior(target)
    if set(src) != set(dst):
        raise ValueError(f"warm start: the normal-prior model and the run's model differ in "
                         f"non-prior parameters (only in the warm start: "
                         f"{sorted(set(src) - set(dst))}, only in the run's model: "
                         f"{sorted(set(dst) - set(src))})")
    shapes = [k for k in src if src[k].shape != dst[k].shape]
    if shapes:
        raise ValueError(f"warm start: parameter shapes differ for {shapes}")
    missing, unexpected = target.load_state_dict(src, strict=False)
    assert not unexpected and all(k.startswith("prior.") for k in missing)


