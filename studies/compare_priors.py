"""Which prior p(z) gives the better deep latent variable model? (the main job)

Grid: priors {standard normal, learnable mixture of Gaussians, VampPrior} x training
objectives {ELBO, IWAE_K} x seeds, each a DLVM fit with SVI on the same data, evaluated on
held-out test rows by an importance-sampled estimate of log p(x) (with its Monte Carlo
standard error), the held-out ELBO, KL, active units and the Pareto k-hat of every test
row's importance weights. The report ranks the configurations by the estimate of
log p(x), gives paired differences between priors (matched on objective and seed) with
t intervals, and names the best configuration with its evidence.

Defaults (chosen so the whole study finishes in under 3 minutes on a 2-core CPU):

* data: scikit-learn's bundled 8x8 digits, **binarized** (pixel > 8 of 16) with a
  Bernoulli observation model. Binary data give the model a proper probability mass
  function (log p(x) <= 0, bits per dimension make sense, the same set-up as the
  binarized-MNIST literature) and avoid the unbounded likelihood of a Gaussian decoder
  (Mattei & Frellsen 2018). ``--continuous`` uses standardized continuous digits with a
  Gaussian observation model instead. 1437 / 180 / 180 rows (train / valid / test, seed 0).
* model: latent dimension 2 (the prior and the aggregate posterior can be drawn without a
  projection, which is where priors differ most visibly), MLP encoder and decoder 64-64 tanh,
  mixture prior with 10 components, VampPrior with 50 pseudo-inputs started at training rows
  (a tenth of the paper's 500, which was for 50000 MNIST rows).
* training: 30 epochs of Adam (lr 0.01, minibatches of 100), ELBO (1 particle) or
  IWAE with K = 5; 3 seeds (0, 1, 2). ELBO fits warm the KL term up linearly over the
  first 10 epochs (Bowman et al. 2016; Sønderby et al. 2016): without it the VampPrior,
  whose components are the encoder's own posteriors, falls into posterior collapse in most
  seeds (KL = 0, no active unit). IWAE has no KL weight to warm up (the report notes it).
* VampPrior warm start (``--vamp-warm-start-epochs``, default 5 of the 30 epochs; 1 with
  ``--smoke``; 0 turns it off): each VampPrior run first trains the same DLVM with the
  standard normal prior for that many epochs (same seed, objective and KL warm-up, so it
  is the start of the normal-prior run of that seed), then copies its encoder and decoder
  into the VampPrior model (pseudo-inputs at training rows) and trains the remaining
  epochs (``RunConfig.prior_warm_start_epochs``). Why: from random weights the VampPrior
  collapses on these small data (KL 0, no active unit; at latent dimension 8 in every
  seed, with either objective and with KL warm-up), an optimization failure rather than a
  property of the prior (see ``models.priors.VampPrior``); started from the warm-started
  weights it keeps its units and is competitive with the normal prior. The epochs of both
  phases count towards ``--epochs``; the learning curves show the switch. The column
  ``prior_warm_start_epochs`` changes with the prior, so the paired differences still
  match runs on objective and seed only.
* evaluation: 1000 importance samples per test row.

Run ``python studies/compare_priors.py`` (``--help`` for every flag; ``--smoke`` for a
seconds-long check; ``--dataset binarized-mnist`` for the benchmark data, which wants a
larger model and more epochs, e.g. ``--latent-dim 40 --hidden 300x300 --epochs 100
--num-pseudo-inputs 500 --device auto``). Re-running the same command resumes.

References
----------
Burda, Grosse & Salakhutdinov (2016), Importance weighted autoencoders, ICLR.
Tomczak & Welling (2018), VAE with a VampPrior, AISTATS.
Mattei & Frellsen (2018), Leveraging the exact likelihood of deep latent variable models,
NeurIPS.
Bowman et al. (2016), Generating sentences from a continuous space, CoNLL.
Sønderby et al. (2016), Ladder variational autoencoders, NeurIPS.
"""
from __future__ import annotations

import argparse

if __package__ in (None, ""):  # run as a file from a checkout: use this checkout's pyro_lvm
    import _checkout  # noqa: F401  (studies/_checkout.py, beside this script)

from pyro_lvm.studies import runner  # noqa: E402
from pyro_lvm.studies.runner import expand_grid  # noqa: E402

NAME = "compare_priors"
PRIORS = ("normal", "mixture", "vamp")
OBJECTIVES = ("elbo", "iwae")
LIKELIHOOD_CHOICES = ["bernoulli", "gaussian", "studentt", "poisson", "negbinomial", "binomial",
                      "categorical"]
DEFAULTS = dict(latent_dim=2, hidden="64x64", epochs=30, batch_size=100, lr=1e-2,
                num_particles=5, num_eval_samples=1000, seeds=[0, 1, 2], warmup_epochs=10)


def parse_args(argv=None) -> argparse.Namespace:
    parser, g = runner.study_parser(
        NAME, "Compare priors (standard normal, mixture of Gaussians, VampPrior) of a deep "
              "latent variable model, trained with the ELBO and with IWAE_K, over seeds; writes "
              "results.csv and an HTML report.", DEFAULTS)
    g.add_argument("--priors", nargs="+", choices=PRIORS, default=list(PRIORS),
                   help="priors to compare (default: all)")
    g.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=list(OBJECTIVES),
                   help="training objectives (default: both); IWAE uses K = --num-particles")
    g.add_argument("--continuous", action="store_true",
                   help="digits as standardized continuous data with a Gaussian observation "
                        "model instead of binarized digits with a Bernoulli one")
    g.add_argument("--likelihood", choices=LIKELIHOOD_CHOICES, default=None,
                   help="observation model (default: bernoulli for binary data, gaussian "
                        "otherwise); the count models keep digits as counts 0..16")
    g.add_argument("--total-count", type=runner.positive_int, default=None,
                   help="binomial trials (default: 16 for digits, else the largest count)")
    g.add_argument("--categorical-groups", type=_group_sizes, default=None,
                   help="sizes of the consecutive one-hot column groups for "
                        "--likelihood categorical, e.g. 3,2,4")
    g.add_argument("--num-components", type=runner.positive_int, default=10,
                   help="components of the mixture prior (default: %(default)s)")
    g.add_argument("--num-pseudo-inputs", type=runner.positive_int, default=None,
                   help="pseudo-inputs of the VampPrior (default: 50 for digits, 500 otherwise)")
    g.add_argument("--vamp-warm-start-epochs", type=runner.nonnegative_int, default=5,
                   help="train each VampPrior run's encoder and decoder with the standard "
                        "normal prior for this many of its epochs first (0: from random "
                        "weights; default: %(default)s, 1 with --smoke)")
    return runner.parse_study_args(
        parser, argv, check=_check,
        smoke={"vamp_warm_start_epochs": lambda a: min(a.vamp_warm_start_epochs, 1),
               "num_pseudo_inputs": lambda a: min(a.num_pseudo_inputs or 10, 10)})


def _group_sizes(text: str) -> list:
    try:
        sizes = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated group sizes, got {text!r}") from None
    if any(v < 2 for v in sizes):
        raise argparse.ArgumentTypeError(f"every categorical group needs >= 2 columns, got {text!r}")
    return sizes


def _likelihood_options(args: argparse.Namespace, dataset) -> dict:
    """Constructor options of the count / category likelihoods (empty for the others)."""
    if args.likelihood == "binomial":
        total = args.total_count or (16 if dataset.name.startswith("digits") else dataset.max_count)
        return {"total_count": int(total)}
    if args.likelihood == "categorical":
        return {"groups": list(args.categorical_groups)}
    return {}


def _check(args: argparse.Namespace):
    if args.likelihood == "categorical" and not args.categorical_groups:
        return "--likelihood categorical needs --categorical-groups (sizes of one-hot groups)"
    warm = args.vamp_warm_start_epochs
    if warm and "vamp" in args.priors and warm >= args.epochs:
        return (f"--vamp-warm-start-epochs={warm} leaves no epoch for the VampPrior: it must be "
                f"smaller than --epochs={args.epochs}")
    return None


def build_grid(args: argparse.Namespace, dataset) -> list:
    likelihood = args.likelihood or ("bernoulli" if dataset.discrete else "gaussian")
    pseudo = args.num_pseudo_inputs or (50 if dataset.name.startswith("digits") else 500)
    extra = {"num_components": args.num_components, "num_pseudo_inputs": pseudo}
    options = _likelihood_options(args, dataset)
    if options:
        extra["model_kwargs"] = {"likelihood_options": options}
    base = runner.base_config_from_args(args, model="dlvm", likelihood=likelihood, extra=extra)
    objectives = []
    for objective in args.objectives:
        if objective == "elbo":
            objectives.append({"objective": "elbo", "num_particles": 1,
                               "warmup_epochs": args.warmup_epochs})
        else:  # no KL weight inside the log-mean-exp: nothing to warm up
            objectives.append({"objective": "iwae", "num_particles": args.num_particles,
                               "warmup_epochs": 0})
    warm = args.vamp_warm_start_epochs
    priors = [{"prior": p, "prior_warm_start_epochs": warm if p == "vamp" else 0}
              for p in args.priors]
    return expand_grid(base, seeds=args.seeds, prior=priors, objective=objectives)


def main(args: argparse.Namespace) -> runner.StudyResult:
    likelihood = args.likelihood
    counts = likelihood in ("poisson", "negbinomial", "binomial")
    binarize = not args.continuous and args.dataset == "digits" and not counts
    if likelihood is None and args.dataset in ("digits", "binarized-mnist"):
        likelihood = "bernoulli" if binarize or args.dataset == "binarized-mnist" else "gaussian"
    dataset = runner.dataset_from_args(args, binarize=binarize, likelihood=likelihood)
    args.likelihood = likelihood
    configs = build_grid(args, dataset)
    description = (
        f"Priors {', '.join(args.priors)} of a deep latent variable model "
        f"(latent dimension {args.latent_dim}, MLPs {args.hidden}, "
        f"{configs[0].likelihood} observation model) trained with "
        f"{' and '.join('ELBO' if o == 'elbo' else f'IWAE_{args.num_particles}' for o in args.objectives)} "
        f"for {args.epochs} epochs"
        # from the grid: no warm-up is mentioned when no run of the grid has one (IWAE only)
        + (f" (ELBO with KL warm-up over {args.warmup_epochs} epochs)"
           if any(c.warmup_epochs for c in configs) else "")
        + (f"; VampPrior runs start from {args.vamp_warm_start_epochs} epoch(s) with the standard "
           f"normal prior (encoder and decoder carried over)"
           if getattr(args, "vamp_warm_start_epochs", 0) and "vamp" in args.priors else "")
        + f", {len(args.seeds)} seed(s) each, on {dataset.name} "
        f"({dataset.sizes['train']} training rows). Configurations are compared by the "
        f"importance-sampled estimate of the test log-likelihood (K = {args.num_eval_samples}); "
        f"differences between priors are paired on objective and seed."
    )
    return runner.run_from_args(NAME, args, dataset, configs, title="Comparing priors of a DLVM",
                                description=description,
                                default_dataset="digits-binarized",
                                primary_factor="prior")


if __name__ == "__main__":
    runner.cli(main, parse_args)
