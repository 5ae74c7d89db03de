"""Posterior diagnostics for any model/guide pair.

How good is the guide :math:`q_\\phi(z \\mid x)` as an approximation of
:math:`p_\\theta(z \\mid x)`, which latent dimensions does the model use, and does the
fitted model reproduce the data?

* :func:`importance_diagnostics` -- per-row Pareto :math:`\\hat k` of the importance weights
  :math:`w_k = p(x, z_k) / q(z_k \\mid x)` (PSIS, Vehtari et al. 2024) and their effective
  sample size. This is the variational-inference check of Yao, Vehtari, Simpson & Gelman
  (2018), "Yes, but did it work?", applied to each data point's local posterior.
* :func:`latent_usage` -- active units (Burda, Grosse & Salakhutdinov 2016) and
  :math:`\\mathrm{KL}(q(z \\mid x) \\,\\|\\, p(z))` per latent dimension; posterior collapse.
* :func:`posterior_predictive_check` -- replicated data sets from the fitted model and
  tail probabilities of summary statistics (Gelman, Meng & Stern 1996).
* :func:`amortization_gap` -- ELBO of a per-row (non-amortized) Gaussian guide minus the
  ELBO of the amortized guide (Cremer, Li & Duvenaud 2018).
* :func:`to_inference_data` -- an :class:`arviz.InferenceData` (NetCDF-writable).
* :func:`diagnose` -- all of the above in one bundle.

Every function accepts any pair keeping the model/guide contract (see ``DESIGN.md``); all
importance weights and latent draws come from :func:`inference.importance_weights.trace_log_terms`.
Evaluation runs under :func:`torch.no_grad` and in an isolated Pyro parameter store, with a
local random stream (the global torch RNG state is restored afterwards).

One module per diagnostic: :mod:`.importance`, :mod:`.latent`, :mod:`.predictive`,
:mod:`.amortization`, :mod:`.arviz_export`, and :mod:`.bundle` (:func:`diagnose`).
"""
from pyro_lvm.inference.diagnostics.amortization import amortization_gap
from pyro_lvm.inference.diagnostics.arviz_export import to_inference_data
from pyro_lvm.inference.diagnostics.bundle import Diagnostics, diagnose
from pyro_lvm.inference.diagnostics.importance import (KHAT_GOOD, KHAT_OK, ImportanceDiagnostics,
                                                       importance_diagnostics)
from pyro_lvm.inference.diagnostics.latent import LatentUsage, latent_usage
from pyro_lvm.inference.diagnostics.predictive import posterior_predictive_check


__all__ = [
    "KHAT_GOOD",
    "KHAT_OK",
    "ImportanceDiagnostics",
    "LatentUsage",
    "Diagnostics",
    "importance_diagnostics",
    "latent_usage",
    "posterior_predictive_check",
    "amortization_gap",
    "to_inference_data",
    "diagnose",
]
