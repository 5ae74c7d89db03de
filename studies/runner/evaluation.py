"""Evaluation of one fitted run: the test log-likelihood and ELBO, k-hat and latent usage, and
the arrays the report draws (samples, reconstructions, latent means and draws)."""
from __future__ import annotations

import contextlib
import math
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pyro
import torch

from pyro_lvm.inference import pairs
from pyro_lvm.inference.engine import isolated_param_store, resolve_pair
from pyro_lvm.studies.datasets import Dataset
from pyro_lvm.studies.runner import families
from pyro_lvm.studies.runner.schema import RunConfig

__all__ = ["ARTIFACTS", "evaluate_run"]

#: Arrays of ``artifacts.npz`` (each only when it can be computed). Image data
#: (``Dataset.image_shape`` set): ``samples``, ``originals`` and ``reconstructions`` are rows
#: of ``prod(image_shape)`` pixels in raw units (``Dataset.to_images``), otherwise rows in the
#: model's data space.
ARTIFACTS = {
    "samples": "[64, p] draws x ~ p(x) from the fitted model (model.sample)",
    "originals": "[16, p] the first test rows",
    "reconstructions": "[16, p] their reconstructions (model.reconstruct)",
    "latent_mean": "[n_test, d] posterior means E_q[z | x] of the test rows",
    "labels": "[n_test] labels of the test rows (when known)",
    "khat": "[n_test] Pareto k-hat of each test row's importance weights",
    "log_px_psis": "[n_test] PSIS-smoothed estimate of log p(x) per row (k-hat's draws)",
    "ess": "[n_test] effective sample size of each test row's importance weights",
    "log_px": "[n_test] per-row IS estimate of log p(x)",
    "log_px_se": "[n_test] its Monte Carlo standard error",
    "exact_log_px": "[n_test] exact log p(x) (linear models)",
    "kl_per_dim": "[d] mean over test rows of KL(q(z_j | x) || p(z_j))",
    "prior_samples": "[m, d] z ~ p(z)",
    "aggregate_posterior_samples": "[m, d] z ~ q(z | x_i), x_i a random test row",
}
NUM_SAMPLES_SHOWN = 64
NUM_RECONSTRUCTIONS = 16
NUM_LATENT_DRAWS = 1000


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().to(torch.float64).numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def _latent_site(trace) -> Optional[str]:
    """The guide's latent site: "z" when present (our models), else the first one."""
    from pyro.poutine.util import site_is_subsample

    names = [n for n, s in trace.nodes.items()
             if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)]
    return "z" if "z" in names else (names[0] if names else None)


def _latent_draws(model, x: torch.Tensor, mask) -> Tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """One z ~ p(z) and one z ~ q(z | x_i) per row of x, read off model / guide traces (works
    for any pair keeping the contract)."""
    import pyro.poutine as poutine

    model_fn, guide_fn, _ = resolve_pair(model)
    with torch.no_grad():
        g = poutine.trace(guide_fn).get_trace(x, mask=mask)
        m = poutine.trace(model_fn).get_trace(x, mask=mask)
    site = _latent_site(g)
    if site is None or site not in m.nodes:
        return None, None
    post = g.nodes[site]["value"].reshape(x.shape[0], -1)
    prior = m.nodes[site]["value"].reshape(x.shape[0], -1)
    return _to_numpy(prior), _to_numpy(post)


def _latent_means(model, x: torch.Tensor, mask) -> Optional[np.ndarray]:
    encode = getattr(model, "encode", None)
    with torch.no_grad():
        if callable(encode):
            try:
                loc = encode(x, mask=mask) if mask is not None else encode(x)
                loc = loc[0] if isinstance(loc, (tuple, list)) else loc
                return _to_numpy(loc).reshape(x.shape[0], -1)
            except TypeError:
                pass
        # generic: average 32 guide draws
        draws = [_latent_draws(model, x, mask)[1] for _ in range(32)]
    if draws[0] is None:
        return None
    return np.mean(draws, axis=0)


def _image_rows(dataset: Dataset, x) -> np.ndarray:
    arr = _to_numpy(x)
    if dataset.image_shape is None:
        return arr
    img = dataset.to_images(arr)
    return img.reshape(img.shape[0], -1)


def _diagnostics(model, dataset: Dataset, config: RunConfig, device) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
    """k-hat per test row and latent usage (inference.diagnostics)."""
    from pyro_lvm.inference import diagnostics

    x, mask = dataset.test, dataset.mask("test")
    metrics: Dict[str, Any] = {}
    arrays: Dict[str, np.ndarray] = {}
    # PSIS fits the largest min(K/5, 3 sqrt K) weights: below ~100 draws k-hat is unreliable,
    # above ~1000 it is no better and costs a second full importance-sampling pass.
    k = int(config.extra.get("num_diagnostic_samples", min(max(config.num_eval_samples, 100), 1000)))
    imp = diagnostics.importance_diagnostics(model, x, num_samples=k, mask=mask, device=device,
                                             seed=config.seed, progress=False)
    khat = imp.per_row["khat"].to_numpy(dtype=float)
    arrays["khat"] = khat
    arrays["ess"] = imp.per_row["ess"].to_numpy(dtype=float)
    finite = khat[np.isfinite(khat)]
    metrics.update(
        khat_good_frac=imp.fraction_good,
        khat_ok_frac=imp.fraction_ok,
        khat_bad_frac=imp.fraction_bad,
        khat_undetermined_frac=imp.fraction_undetermined,
        khat_median=float(np.median(khat)) if khat.size else math.nan,
        khat_max=float(np.max(finite)) if finite.size else math.nan,
        khat_num_samples=k,
        # rows above min(1 - 1/log10 K, 0.7): their estimates are not trustworthy
        khat_unreliable_frac=imp.fraction_unreliable,
        test_log_likelihood_psis=float(imp.per_row["log_px_psis"].mean()),
    )
    arrays["log_px_psis"] = imp.per_row["log_px_psis"].to_numpy(dtype=float)
    usage = diagnostics.latent_usage(model, x, mask=mask, device=device, seed=config.seed,
                                     progress=False)
    metrics["active_units"] = usage.num_active
    arrays["kl_per_dim"] = usage.per_dim["kl"].to_numpy(dtype=float)
    metrics["kl"] = usage.kl_total
    metrics["kl_se"] = usage.kl_total_mc_se
    return metrics, arrays



def evaluate_run(model, dataset: Dataset, config: RunConfig, device, notes: List[str], *,
                 progress=None):
    """Metrics (columns of ``results.csv``) and arrays (``artifacts.npz``) of a fitted run on the
    test split; failures of the secondary parts (diagnostics, pictures) become ``notes``.
    The family's evaluation hook (:class:`~pyro_lvm.studies.runner.families.Family`) adds
    its own metrics and arrays last."""
    from pyro_lvm.inference.evaluate import elbo as heldout_elbo
    from pyro_lvm.inference.evaluate import log_likelihood

    x, mask = dataset.test, dataset.mask("test")
    K = int(config.num_eval_samples)

    def phase(what):
        return progress.phase(what) if progress is not None else contextlib.nullcontext()

    bars = bool(progress is not None and progress.bars)
    with phase(f"the test log-likelihood (K = {K}, {x.shape[0]} rows)") as chunks:
        ll = log_likelihood(model, x, num_samples=K, mask=mask, device=device, seed=config.seed,
                            progress=chunks or bars)
    with phase("the held-out ELBO") as chunks:
        el = heldout_elbo(model, x, num_samples=min(K, 50), mask=mask, device=device,
                          seed=config.seed + 1, progress=chunks or bars)
    metrics: Dict[str, Any] = {
        "test_log_likelihood": ll.mean,
        "test_log_likelihood_se": ll.mc_se,
        "test_log_likelihood_data_se": ll.data_se,
        "exact_test_log_likelihood": ll.exact_mean,
        "test_elbo": el.mean,
        "test_elbo_se": el.mc_se if np.isfinite(el.mc_se) else el.data_se,
        "mean_ess": ll.mean_ess,
        "bits_per_dim": ll.bits_per_dim,
        "bits_per_dim_se": ll.bits_per_dim_se,
    }
    per_row = ll.per_row
    arrays: Dict[str, np.ndarray] = {
        "log_px": per_row["log_px"].to_numpy(float),
        "log_px_se": per_row["se"].to_numpy(float),
    }
    if "exact_log_px" in per_row.columns:
        arrays["exact_log_px"] = per_row["exact_log_px"].to_numpy(float)
    try:
        with phase("k-hat and latent usage"):
            diag_metrics, diag_arrays = _diagnostics(model, dataset, config, device)
        metrics.update(diag_metrics)
        arrays.update(diag_arrays)
    except Exception as exc:  # secondary numbers: keep the run's log-likelihood, say what broke
        notes.append(f"diagnostics (k-hat, latent usage) failed: {type(exc).__name__}: {exc}")
    with phase("samples, reconstructions and latent draws"):
        arrays.update(_report_arrays(model, dataset, config, device, notes))
    hook = families.get_family(config.model).evaluate
    if hook is not None:
        family_metrics, family_arrays = hook(model, dataset, config, device)
        metrics.update(family_metrics)
        arrays.update(family_arrays)
    return metrics, arrays


def _report_arrays(model, dataset: Dataset, config: RunConfig, device, notes) -> Dict[str, np.ndarray]:
    """Samples, reconstructions, latent means and prior / aggregate-posterior draws."""
    out: Dict[str, np.ndarray] = {}
    x_all = dataset.test.to(device)
    m_all = None if dataset.mask("test") is None else dataset.mask("test").to(device)
    was_training = getattr(model, "training", False)
    if isinstance(model, torch.nn.Module):
        model.eval()
    try:
        with isolated_param_store(pairs.fit_result_state(model, None)), torch.no_grad():
            pyro.set_rng_seed(config.seed + 2)
            sample = getattr(model, "sample", None)
            if callable(sample):
                out["samples"] = _image_rows(dataset, sample(NUM_SAMPLES_SHOWN))
            reconstruct = getattr(model, "reconstruct", None)
            n_rec = min(NUM_RECONSTRUCTIONS, x_all.shape[0])
            if callable(reconstruct):
                xr = x_all[:n_rec]
                mr = None if m_all is None else m_all[:n_rec]
                rec = reconstruct(xr, mask=mr) if mr is not None else reconstruct(xr)
                out["originals"] = _image_rows(dataset, xr)
                out["reconstructions"] = _image_rows(dataset, rec)
            z_mean = _latent_means(model, x_all, m_all)
            if z_mean is not None:
                out["latent_mean"] = z_mean
            labels = dataset.label("test")
            if labels is not None:
                out["labels"] = np.asarray(labels)
            m = min(NUM_LATENT_DRAWS, max(x_all.shape[0], 1) * 4)
            idx = torch.randint(x_all.shape[0], (m,), device=x_all.device)
            prior_z, post_z = _latent_draws(model, x_all[idx], None if m_all is None else m_all[idx])
            if prior_z is not None:
                out["prior_samples"] = prior_z
                out["aggregate_posterior_samples"] = post_z
    except Exception as exc:  # pictures are optional; the metrics are not
        notes.append(f"report arrays incomplete: {type(exc).__name__}: {exc}")
    finally:
        if isinstance(model, torch.nn.Module) and was_training:
            model.train()
    return out


