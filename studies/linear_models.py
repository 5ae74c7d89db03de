"""From shallow to deep: factor analysis, probabilistic PCA and a DLVM on the same data.

Grid (x seeds):

* PPCA, exact maximum-likelihood fit (closed form, Tipping & Bishop 1999) and SVI fit;
* factor analysis, exact fit (EM, Rubin & Thayer 1982) and SVI fit;
* a DLVM with a Gaussian observation model (SVI).

All share the latent dimension, see the same standardized continuous data and are judged
on the same test rows. For the linear models the exact test log-likelihood
(``exact_test_log_likelihood``, from the marginal :math:`\\mathcal{N}(\\mu, WW^\\top + \\Psi)`)
is reported beside the importance-sampled estimate, so the report shows (i) how close
SVI gets to the maximum-likelihood fit, (ii) that the IS estimate agrees with the exact
value within its Monte Carlo error, and (iii) how much a non-linear decoder adds. For exact
fits the guide is set to the exact posterior, so every importance weight equals p(x) and
the estimate is exact (Monte Carlo standard error 0, k-hat -inf: constant weights).

Defaults: scikit-learn's 8x8 digits as continuous data, dequantized (pixel + U(0, 1), so
that densities of the integer-valued pixels are bounded and comparable; Theis et al. 2016)
and standardized, latent dimension 5, DLVM MLPs 64-64, SVI with the ELBO for 40 epochs of Adam
(lr 0.01), 2 seeds, 1000 importance samples per test row.

References
----------
Tipping & Bishop (1999), Probabilistic principal component analysis, JRSS B.
Rubin & Thayer (1982), EM algorithms for ML factor analysis, Psychometrika.
"""
from __future__ import annotations

import argparse

if __package__ in (None, ""):  # run as a file from a checkout: use this checkout's pyro_lvm
    import _checkout  # noqa: F401  (studies/_checkout.py, beside this script)

from pyro_lvm.studies import runner  # noqa: E402
from pyro_lvm.studies.runner import expand_grid  # noqa: E402

NAME = "linear_models"
DEFAULTS = dict(latent_dim=5, hidden="64x64", epochs=40, batch_size=100, lr=1e-2,
                num_eval_samples=1000, seeds=[0, 1])
MODELS = ("ppca", "fa", "dlvm")


def parse_args(argv=None) -> argparse.Namespace:
    parser, g = runner.study_parser(
        NAME, "Factor analysis and PPCA (exact and SVI fits, exact log-likelihood) against a "
              "Gaussian DLVM on continuous data; writes results.csv and an HTML report.",
        DEFAULTS, omit=("num_particles",))  # every SVI fit uses the one-particle ELBO
    g.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS),
                   help="model families (default: all)")
    g.add_argument("--no-dequantize", action="store_true",
                   help="use the integer digits as they are instead of adding U(0, 1) noise")
    g.add_argument("--fit-methods", nargs="+", choices=["exact", "svi"], default=["exact", "svi"],
                   help="fits of the linear models (default: both); the DLVM is always SVI")
    return runner.parse_study_args(parser, argv, check=_check)


def _check(args: argparse.Namespace):
    if args.dataset == "binarized-mnist":
        return ("--dataset binarized-mnist: linear_models needs continuous data "
                "(use --dataset digits or a CSV file)")
    return None


def build_grid(args: argparse.Namespace, dataset) -> list:
    base = runner.base_config_from_args(args, prior="normal", likelihood="gaussian",
                                        objective="elbo", num_particles=1)
    variants = []
    for model in args.models:
        if model == "dlvm":
            variants.append({"model": "dlvm", "fit_method": "svi"})
        else:
            variants.extend({"model": model, "fit_method": m} for m in args.fit_methods)
    return expand_grid(base, seeds=args.seeds, model=variants)


def main(args: argparse.Namespace) -> runner.StudyResult:
    extra = {"dequantize": True} if args.dataset == "digits" and not args.no_dequantize else {}
    dataset = runner.dataset_from_args(args, binarize=False, scale="standardize",
                                       drop_constant=True, likelihood="gaussian", **extra)
    if args.latent_dim >= dataset.data_dim:
        raise ValueError(f"--latent-dim {args.latent_dim} must be below the data dimension "
                         f"{dataset.data_dim} for PPCA / factor analysis")
    configs = build_grid(args, dataset)
    description = (
        f"{', '.join(m.upper() for m in args.models)} with latent dimension {args.latent_dim} on "
        f"{dataset.name} ({dataset.data_dim} standardized columns, {dataset.sizes['train']} "
        f"training rows); linear models fit exactly ({'/'.join(args.fit_methods)}) and by SVI "
        f"(ELBO, {args.epochs} epochs), the DLVM (MLPs {args.hidden}) by SVI. Test "
        f"log-likelihood: importance-sampled estimate (K = {args.num_eval_samples}) and, for "
        f"the linear models, the exact value."
    )
    return runner.run_from_args(NAME, args, dataset, configs,
                                title="Factor analysis, PPCA and a DLVM: exact and SVI fits",
                                description=description,
                                default_dataset="digits-dequantized",
                                primary_factor="model")


if __name__ == "__main__":
    runner.cli(main, parse_args)
