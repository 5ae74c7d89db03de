"""Observation models for counts: binomial, Poisson and negative-binomial DLVMs, Poisson PCA,
and factor analysis as a Gaussian reference, on the same rows.

Grid (x seeds), all with the same latent dimension, on the same training and test rows:

* DLVMs (standard normal prior, ELBO) with a binomial (``total_count`` = the largest possible
  count, 16 for the digits: each 8x8 pixel counts the inked cells of a 4x4 block), a Poisson and
  a negative-binomial (per-pixel dispersion) observation model;
* Poisson PCA (:class:`pyro_lvm.models.PoissonPCA`, SVI with the ELBO);
* factor analysis as a Gaussian reference, fitted by EM on dequantized training rows
  :math:`x + u`, :math:`u \\sim U[0,1)^p`, and scored as the probability model of integers
  :math:`P(x) = \\int_{[0,1)^p} p_{FA}(x + u)\\,du` (Theis, van den Oord & Bethge 2016).

Every model is judged by its test log-likelihood on the count scale: the importance-sampled
estimate, K draws per row, of a log *probability* of the integer counts for every model (for
factor analysis the draws are of the dequantization offset :math:`u`; a Gaussian density at the
integers would not be a probability and could not be compared). The findings label each.

Defaults: scikit-learn's 8x8 digits as counts 0..16 (three always-blank pixels dropped, so that
factor analysis is well posed), latent dimension 5, MLPs 64-64, 40 epochs of Adam (lr 0.003),
2 seeds, 1000 importance samples per test row.

References
----------
Lopez et al. (2018), Deep generative modeling for single-cell transcriptomics, Nature Methods.
Collins, Dasgupta & Schapire (2001), A generalization of PCA to the exponential family, NeurIPS.
Theis, van den Oord & Bethge (2016), A note on the evaluation of generative models, ICLR.
"""
from __future__ import annotations

import argparse

if __package__ in (None, ""):  # run as a file from a checkout: use this checkout's pyro_lvm
    import _checkout  # noqa: F401  (studies/_checkout.py, beside this script)

from pyro_lvm.studies import count_families  # noqa: E402,F401  (registers poisson-pca)
from pyro_lvm.studies import runner  # noqa: E402
from pyro_lvm.studies.runner import expand_grid  # noqa: E402

NAME = "compare_count_models"
DEFAULTS = dict(latent_dim=5, hidden="64x64", epochs=40, batch_size=100, lr=3e-3,
                num_eval_samples=1000, seeds=[0, 1])
MODELS = ("binomial", "poisson", "negbinomial", "poisson-pca", "fa")
LABELS = {
    "binomial": "log P(x), binomial DLVM",
    "poisson": "log P(x), Poisson DLVM",
    "negbinomial": "log P(x), negative-binomial DLVM",
    "poisson-pca": "log P(x), Poisson PCA",
    "fa-dequantized": "log P(x) = log of the integral of the FA density over x + [0, 1)^p "
                      "(dequantized factor analysis)",
}


def parse_args(argv=None) -> argparse.Namespace:
    parser, g = runner.study_parser(
        NAME, "Binomial, Poisson and negative-binomial DLVMs, Poisson PCA and factor analysis "
              "on count data, by the test log-likelihood on the count scale.", DEFAULTS,
        omit=("num_particles",))
    g.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS),
                   help="models (default: all)")
    g.add_argument("--total-count", type=runner.positive_int, default=None,
                   help="trials of the binomial model (default: 16 for digits, else the "
                        "largest count in the data)")
    return runner.parse_study_args(parser, argv, check=_check)


def _check(args: argparse.Namespace):
    if args.dataset == "binarized-mnist":
        return "--dataset binarized-mnist is binary, not counts: use digits or a count CSV"
    return None


def build_grid(args: argparse.Namespace, dataset) -> list:
    total = args.total_count or (16 if dataset.name.startswith("digits") else dataset.max_count)
    base = runner.base_config_from_args(args, prior="normal", objective="elbo", num_particles=1)
    variants = []
    for model in args.models:
        if model in ("binomial", "poisson", "negbinomial"):
            extra = ({"model_kwargs": {"likelihood_options": {"total_count": int(total)}}}
                     if model == "binomial" else {})
            variants.append({"model": "dlvm", "likelihood": model, "fit_method": "svi", **extra})
        elif model == "poisson-pca":
            variants.append({"model": "poisson-pca", "likelihood": "poisson", "fit_method": "svi"})
        else:
            variants.append({"model": "fa-dequantized", "likelihood": "gaussian",
                             "fit_method": "exact"})
    return expand_grid(base, seeds=args.seeds, model=variants)


def findings(results) -> list:
    """One labelled line per configuration: what its test log-likelihood is."""
    lines = []
    ok = results[results["status"] == "ok"]
    for (model, likelihood), rows in ok.groupby(["model", "likelihood"], sort=False):
        key = likelihood if model == "dlvm" else model
        mean = rows["test_log_likelihood"].mean()
        bpd = rows["bits_per_dim"].mean() if "bits_per_dim" in rows else float("nan")
        lines.append(f"{model} ({likelihood}): {LABELS.get(key, key)} = {mean:.2f} nats per "
                     f"test row (mean over {len(rows)} seed(s))"
                     + (f", {bpd:.3f} bits/dim" if bpd == bpd else ""))
    return lines


def main(args: argparse.Namespace) -> runner.StudyResult:
    dataset = runner.dataset_from_args(args, binarize=False, scale=None, drop_constant=True,
                                       likelihood="poisson")
    if args.latent_dim >= dataset.data_dim:
        raise ValueError(f"--latent-dim {args.latent_dim} must be below the data dimension "
                         f"{dataset.data_dim} for factor analysis and Poisson PCA")
    configs = build_grid(args, dataset)
    description = (
        f"{', '.join(args.models)} with latent dimension {args.latent_dim} on {dataset.name} "
        f"as counts ({dataset.data_dim} columns, largest count {dataset.max_count}, "
        f"{dataset.sizes['train']} training rows); DLVMs (MLPs {args.hidden}) and Poisson PCA by "
        f"SVI (ELBO, {args.epochs} epochs), factor analysis by EM. Test log-likelihood: "
        f"importance-sampled (K = {args.num_eval_samples}), a log-probability of the integer "
        f"counts for every model: factor analysis (EM on dequantized rows x + U[0, 1)) is "
        f"scored as P(x) = integral of its density over the cell x + [0, 1)^p."
    )
    return runner.run_from_args(NAME, args, dataset, configs,
                                title="Observation models for counts",
                                description=description, default_dataset="digits",
                                findings=findings,
                                primary_factor="model")


if __name__ == "__main__":
    runner.cli(main, parse_args)
