"""Your own model/guide pair against the built-in baselines, on your data.

Grid: each pair given with ``--model MODULE:FACTORY`` (repeatable; ``MODULE`` importable
from the current directory, e.g. your ``mypairs.py``; ``FACTORY`` called with ``data_dim``
and the options ``latent_dim``, ``hidden``, ``likelihood`` as keyword arguments it may
ignore, returning a pair) x seeds, beside three baselines with the same latent dimension:

* factor analysis (EM) and probabilistic PCA (closed form), whose test log-likelihood is
  known exactly (the importance-sampled estimate is reported beside it);
* a DLVM (MLP encoder and decoder ``--hidden``, standard normal prior) fit by SVI.

Every SVI fit uses the same objective, epochs, minibatches and learning rate; every model is
evaluated on the same held-out test rows by the importance-sampled estimate of log p(x)
(with its Monte Carlo standard error), the held-out ELBO and the Pareto k-hat of each row's
importance weights. The report ranks the models, gives paired differences (matched on the
seed) with adjusted intervals, and shows samples, reconstructions, the latent space and the
exact value for the models that provide them (a pair without the method gets one line
saying what it would need).

Data: standardized continuous columns with a Gaussian observation model for the baselines
(``--dataset`` a CSV or .npy file of yours; default scikit-learn's digits, dequantized).

Run ``python studies/compare_models.py --model mypairs:make_pair`` (or
``python -m pyro_lvm.studies.compare_models ...``); ``--smoke`` for a seconds-long check.
Re-running the same command resumes.
"""
from __future__ import annotations

import argparse

if __package__ in (None, ""):  # run as a file from a checkout: use this checkout's pyro_lvm
    import _checkout  # noqa: F401  (studies/_checkout.py, beside this script)

from pyro_lvm.studies import runner  # noqa: E402
from pyro_lvm.studies.runner import expand_grid  # noqa: E402

NAME = "compare_models"
BASELINES = ("fa", "ppca", "dlvm")
DEFAULTS = dict(latent_dim=5, hidden="64x64", epochs=40, batch_size=100, lr=1e-2,
                num_eval_samples=1000, seeds=[0, 1])


def parse_args(argv=None) -> argparse.Namespace:
    parser, g = runner.study_parser(
        NAME, "Compare your own model/guide pairs (--model MODULE:FACTORY) with factor "
              "analysis, PPCA (exact log-likelihoods) and a DLVM on your data; writes "
              "results.csv and an HTML report.", DEFAULTS, omit=("num_particles",))
    g.add_argument("--baselines", nargs="*", choices=BASELINES, default=list(BASELINES),
                   help="built-in models to compare with (default: all)")
    g.add_argument("--no-dequantize", action="store_true",
                   help="use the integer digits as they are instead of adding U(0, 1) noise")
    return runner.parse_study_args(parser, argv, check=_check)


def _check(args: argparse.Namespace):
    if args.dataset == "binarized-mnist":
        return ("--dataset binarized-mnist: compare_models fits Gaussian baselines and needs "
                "continuous data (use --dataset digits or a CSV file)")
    if not args.baselines and not args.user_models:
        return "nothing to compare: give --model MODULE:FACTORY or keep some --baselines"
    return None


def build_grid(args: argparse.Namespace) -> list:
    """The baselines' runs (the user's pairs are added by the runner from ``--model``)."""
    base = runner.base_config_from_args(args, prior="normal", likelihood="gaussian",
                                        objective="elbo", num_particles=1)
    variants = [{"model": m, "fit_method": "svi" if m == "dlvm" else "exact"}
                for m in args.baselines]
    return expand_grid(base, seeds=args.seeds, model=variants) if variants else [base]


def main(args: argparse.Namespace) -> runner.StudyResult:
    extra = {"dequantize": True} if args.dataset == "digits" and not args.no_dequantize else {}
    dataset = runner.dataset_from_args(args, binarize=False, scale="standardize",
                                       drop_constant=True, likelihood="gaussian", **extra)
    if {"fa", "ppca"} & set(args.baselines) and args.latent_dim >= dataset.data_dim:
        raise ValueError(f"--latent-dim {args.latent_dim} must be below the data dimension "
                         f"{dataset.data_dim} for the PPCA / factor analysis baselines")
    configs = build_grid(args)
    if not args.baselines:
        configs = []  # only the user's pairs (added by the runner)
    yours = ", ".join(args.user_models or []) or "no pair of yours (give --model MODULE:FACTORY)"
    description = (
        f"{yours} against {', '.join(b.upper() for b in args.baselines) or 'no baseline'} "
        f"with latent dimension {args.latent_dim} on {dataset.name} ({dataset.data_dim} "
        f"standardized columns, {dataset.sizes['train']} training rows). FA by EM and PPCA in "
        f"closed form (exact test log-likelihood), the DLVM (MLPs {args.hidden}) and your "
        f"pairs by SVI (ELBO, {args.epochs} epochs, lr {args.lr}). Test log-likelihood: "
        f"importance-sampled estimate with K = {args.num_eval_samples} draws per row.")
    return runner.run_from_args(NAME, args, dataset, configs,
                                title="Your model against FA, PPCA and a DLVM",
                                description=description,
                                default_dataset="digits-dequantized",
                                primary_factor="model")


if __name__ == "__main__":
    runner.cli(main, parse_args)
