"""How any model/guide pair is fit, evaluated and diagnosed.

Everything here takes any object keeping the model/guide contract (see the README).
"""
from pyro_lvm.inference.engine import isolated_param_store, resolve_device
from pyro_lvm.inference.contract import ContractError, ContractReport, check_contract
from pyro_lvm.inference.diagnostics import (Diagnostics, ImportanceDiagnostics, LatentUsage, amortization_gap,
                                   diagnose, importance_diagnostics, latent_usage,
                                   posterior_predictive_check, to_inference_data)
from pyro_lvm.inference.estimates import ELBOEstimate, LogLikelihoodEstimate, ReconstructionError
from pyro_lvm.inference.evaluate import elbo, evaluate, log_likelihood, reconstruction_error
from pyro_lvm.inference.amputation import ampute
from pyro_lvm.inference.impute import (ConditionalLogLikelihood, Imputation,
                                       conditional_log_likelihood, impute, imputation_error,
                                       interval_coverage, missing_mask)
from pyro_lvm.inference.rubin import (RubinPooled, pooled_column_mean, pooled_regression,
                                      rubin_pool)
from pyro_lvm.inference.training import (EarlyStopping, FitResult, FitState, KLWarmup, NonFiniteLossError,
                                    StopFit, fit, linear_warmup)
from pyro_lvm.inference.importance_weights import (LogTerms, elbo_from_log_weights,
                                                   iwae_from_log_weights, log_weights,
                                                   trace_log_terms)
from pyro_lvm.inference.objectives import ELBO, IWAE
from pyro_lvm.inference.reliability import khat_threshold

__all__ = [
    "check_contract", "ContractError", "ContractReport",
    "fit", "FitResult", "FitState", "StopFit", "EarlyStopping", "NonFiniteLossError",
    "log_weights", "trace_log_terms", "LogTerms", "ELBO", "IWAE", "KLWarmup", "linear_warmup",
    "elbo_from_log_weights", "iwae_from_log_weights",
    "log_likelihood", "elbo", "reconstruction_error", "evaluate",
    "LogLikelihoodEstimate", "ELBOEstimate", "ReconstructionError",
    "importance_diagnostics", "latent_usage", "posterior_predictive_check", "amortization_gap",
    "to_inference_data", "diagnose", "Diagnostics", "ImportanceDiagnostics", "LatentUsage",
    "resolve_device", "isolated_param_store", "khat_threshold",
    "impute", "Imputation", "conditional_log_likelihood", "ConditionalLogLikelihood",
    "missing_mask", "imputation_error", "interval_coverage", "ampute",
    "rubin_pool", "RubinPooled", "pooled_column_mean", "pooled_regression",
]
