"""How do latent variable models compare with exact-likelihood baselines on binary images?

Families, each fit on the same training rows and scored on the same test rows:

* mixture of Bernoullis (EM; exact log-likelihood),
* RBM (CD-k; log-likelihood with log Z by annealed importance sampling, labelled "AIS"; exact
  by enumeration when the hidden layer has at most 20 units),
* MADE (maximum likelihood by Adam, order-agnostic with several masks; exact log-likelihood),
* DLVM with a standard normal prior, with a VampPrior, and with an IAF guide (SVI on the
  ELBO; importance-sampled estimate of log p(x), labelled "IS", a lower bound in
  expectation).

Every run records its test log-likelihood with its kind (``likelihood_kind``: exact / IS /
AIS) and standard error (``test_log_likelihood_se``: 0 for exact values, the Monte Carlo
error for IS, the AIS error of log Z for the RBM), bits per dimension, samples, and training
and evaluation time. The report and the printed summary put the published numbers for
statically binarized MNIST (test NLL in nats) beside ours: mixture of Bernoullis 137.64 and
RBM-500 (CD-25) 86.34 (Larochelle & Murray 2011, table 2), MADE 88.40 (one hidden layer) and
86.64 (two layers, 32 masks) (Germain et al. 2015). Those were trained on 50,000 rows for
hundreds of epochs; the CPU-sized default here is not, so compare the ranking, not the
values (``--max-rows 50000 --epochs 100 --rbm-hidden 500 --cd-k 25 --made-hidden 500``
and the full test set move towards the published set-up).

Defaults (a CPU run of minutes): binarized MNIST, the first 1000 rows per split, 50
epochs (Adam, lr 3e-3, minibatches of 100; ELBO with KL warm-up over 10 epochs), latent
dimension 16, DLVM MLPs of one hidden layer of 200 units, 20 mixture components (EM), an RBM
with 100 hidden units trained by CD-1 (SGD, lr 0.05), a MADE with 500 hidden units and one
mask, 2 IAF steps, 100 VampPrior pseudo-inputs, 500 importance samples, one seed. ``--dataset digits`` runs on
scikit-learn's binarized 8x8 digits instead.

Run ``python studies/compare_families.py`` (``--help`` for every flag, ``--smoke`` for a
seconds-long check).

References
----------
Larochelle, H. & Murray, I. (2011). The neural autoregressive distribution estimator. AISTATS.
Salakhutdinov, R. & Murray, I. (2008). On the quantitative analysis of deep belief networks. ICML.
Germain, M., Gregor, K., Murray, I. & Larochelle, H. (2015). MADE. ICML.
Kingma, D. P. et al. (2016). Improved variational inference with inverse autoregressive flow.
NeurIPS.
Tomczak, J. M. & Welling, M. (2018). VAE with a VampPrior. AISTATS.
"""
from __future__ import annotations

import argparse
import math

if __package__ in (None, ""):  # run as a file from a checkout: use this checkout's pyro_lvm
    import _checkout  # noqa: F401  (studies/_checkout.py, beside this script)

import torch  # noqa: E402

from pyro_lvm.models import (MADE, RBM, BernoulliMixture, ExactLikelihoodPair,  # noqa: E402
                             IAFGuidedDLVM)
from pyro_lvm.studies import runner  # noqa: E402
from pyro_lvm.studies.runner import expand_grid, families  # noqa: E402

NAME = "compare_families"
FAMILIES = ("bernoulli-mixture", "rbm", "made", "dlvm-normal", "dlvm-vamp", "dlvm-iaf")
DEFAULTS = dict(dataset="binarized-mnist", latent_dim=16, hidden="200", epochs=50,
                batch_size=100, lr=3e-3, num_eval_samples=500, seeds=[0], warmup_epochs=10)
#: Published test negative log-likelihoods (nats) on statically binarized MNIST.
ANCHORS = {
    "bernoulli-mixture": "137.64 (500 components; Larochelle & Murray 2011)",
    "rbm": "86.34 (500 hidden, CD-25, AIS; Larochelle & Murray 2011)",
    "made": "88.40 (1 hidden layer); 86.64 (2 layers, 32 masks) (Germain et al. 2015)",
}
#: Rows per split unless --max-rows is given (binarized MNIST has 50000 / 10000 / 10000).
DEFAULT_MAX_ROWS = 1000
#: Hidden layers up to this size get the exact log Z (2^20 states) instead of AIS.
RBM_EXACT_HIDDEN = 20


# ------------------------------------------------------------------------------- families
def _extra(config, key, default):
    return config.extra.get(key, default)


class _RBMPair(ExactLikelihoodPair):
    """An RBM as a pair without latents; log Z exact for small hidden layers, AIS otherwise
    (computed once, at the first evaluation, from the base-rate model of the training rows)."""

    def __init__(self, rbm: RBM, num_runs: int, num_betas: int):
        small = rbm.num_hidden <= RBM_EXACT_HIDDEN or rbm.num_visible <= RBM_EXACT_HIDDEN
        super().__init__(rbm, "exact" if small else "AIS", log_prob=self._rbm_log_prob)
        self.num_runs, self.num_betas = num_runs, num_betas
        self.train_rows = None
        self.log_z = None        # float (exact) or AISResult

    def _rbm_log_prob(self, x):
        if self.log_z is None:
            if self.likelihood_kind == "exact":
                self.log_z = self.base.log_partition("exact")
            else:
                self.log_z = self.base.log_partition(
                    "ais", data=self.train_rows, num_runs=self.num_runs,
                    num_betas=self.num_betas, generator=torch.Generator().manual_seed(0))
        return self.base.log_prob(x, log_partition=self.log_z)


def _build_mixture(config, dataset):
    return ExactLikelihoodPair(BernoulliMixture(dataset.data_dim,
                                                int(_extra(config, "num_components", 50))))


def _fit_mixture(pair, dataset, config):
    pair.fit_description = "EM"
    pair.base.double().fit_em(dataset.train.double(), max_iter=int(_extra(config, "em_iter", 50)),
                              seed=config.seed)
    pair.base.float()


def _build_rbm(config, dataset):
    rbm = RBM(dataset.data_dim, int(_extra(config, "rbm_hidden", 100)), seed=config.seed)
    return _RBMPair(rbm, int(_extra(config, "ais_runs", 100)),
                    int(_extra(config, "ais_betas", 10000)))


def _fit_rbm(pair, dataset, config):
    pair.fit_description = f"CD-{int(_extra(config, 'cd_k', 1))}"
    pair.base.fit_cd(dataset.train, k=int(_extra(config, "cd_k", 1)), epochs=config.epochs,
                     batch_size=config.batch_size, lr=float(_extra(config, "rbm_lr", 0.05)),
                     seed=config.seed)
    pair.train_rows = dataset.train


def _build_made(config, dataset):
    return ExactLikelihoodPair(MADE(dataset.data_dim, int(_extra(config, "made_hidden", 500)),
                                    num_masks=int(_extra(config, "num_masks", 1)),
                                    seed=config.seed))


def _fit_made(pair, dataset, config):
    pair.fit_description = "maximum likelihood (Adam)"
    pair.base.fit(dataset.train, epochs=config.epochs, batch_size=config.batch_size,
                  lr=config.lr, seed=config.seed)


def _build_dlvm_iaf(config, dataset):
    dlvm = families.get_family("dlvm").build(config, dataset)
    return IAFGuidedDLVM(dlvm, num_flows=int(_extra(config, "guide_flows", 2)))


def _kind_hook(kind_of):
    def evaluate(model, dataset, config, device):
        kind = kind_of(model)
        metrics = {"likelihood_kind": kind, "published_nll": ANCHORS.get(config.model, "")}
        if isinstance(model, _RBMPair) and kind == "AIS":
            # every row shares log Z: the AIS error of log Z is the error of the mean
            metrics.update(test_log_likelihood_se=model.log_z.standard_error,
                           ais_log_z=model.log_z.estimate, ais_num_betas=model.num_betas,
                           ais_num_runs=model.num_runs)
        return metrics, {}
    return evaluate


def register_families() -> None:
    """Add this study's families to the runner's registry (idempotent)."""
    exact_kind = _kind_hook(lambda m: m.likelihood_kind)
    is_kind = _kind_hook(lambda m: "IS")
    for family in (
            families.Family("bernoulli-mixture", _build_mixture, _fit_mixture, exact_kind),
            families.Family("rbm", _build_rbm, _fit_rbm, exact_kind),
            families.Family("made", _build_made, _fit_made, exact_kind),
            families.Family("dlvm-iaf", _build_dlvm_iaf, None, is_kind),
            families.Family("dlvm-is", families.get_family("dlvm").build, None, is_kind)):
        families.register_family(family, replace=True)


# ------------------------------------------------------------------------------- flags, grid
def parse_args(argv=None) -> argparse.Namespace:
    parser, g = runner.study_parser(
        NAME, "Compare a mixture of Bernoullis, an RBM, MADE and DLVMs (normal prior, VampPrior, "
              "IAF guide) by test log-likelihood, each labelled exact / IS / AIS; writes "
              "results.csv and an HTML report.", DEFAULTS)
    g.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES),
                   help="model families to compare (default: all)")
    g.add_argument("--num-components", type=runner.positive_int, default=20,
                   help="mixture of Bernoullis components (default: %(default)s)")
    g.add_argument("--rbm-hidden", type=runner.positive_int, default=100,
                   help="RBM hidden units (default: %(default)s)")
    g.add_argument("--cd-k", type=runner.positive_int, default=1,
                   help="Gibbs sweeps of CD-k (default: %(default)s)")
    g.add_argument("--ais-betas", type=runner.positive_int, default=10000,
                   help="AIS inverse temperatures (default: %(default)s)")
    g.add_argument("--ais-runs", type=runner.positive_int, default=100,
                   help="AIS runs (default: %(default)s)")
    g.add_argument("--made-hidden", type=runner.positive_int, default=500,
                   help="MADE hidden units (default: %(default)s)")
    g.add_argument("--num-masks", type=runner.positive_int, default=1,
                   help="MADE orderings/connectivities (default: %(default)s)")
    g.add_argument("--guide-flows", type=runner.positive_int, default=2,
                   help="IAF steps of the flow guide (default: %(default)s)")
    g.add_argument("--num-pseudo-inputs", type=runner.positive_int, default=None,
                   help="VampPrior pseudo-inputs (default: 50 for digits, 100 otherwise)")
    args = runner.parse_study_args(parser, argv, smoke={
        "num_components": lambda a: min(a.num_components, 5),
        "rbm_hidden": lambda a: min(a.rbm_hidden, 8), "ais_betas": lambda a: min(a.ais_betas, 200),
        "ais_runs": lambda a: min(a.ais_runs, 20), "made_hidden": lambda a: min(a.made_hidden, 32),
        "num_pseudo_inputs": lambda a: min(a.num_pseudo_inputs or 10, 10)})
    if "max_rows" not in args.given and args.max_rows is None:
        args.max_rows = DEFAULT_MAX_ROWS    # CPU-sized default; --max-rows 50000 for all rows
    return args


def build_grid(args: argparse.Namespace, dataset) -> list:
    pseudo = args.num_pseudo_inputs or (50 if dataset.name.startswith("digits") else 100)
    extra = {"num_components": args.num_components, "rbm_hidden": args.rbm_hidden,
             "cd_k": args.cd_k, "ais_betas": args.ais_betas, "ais_runs": args.ais_runs,
             "made_hidden": args.made_hidden, "num_masks": args.num_masks,
             "guide_flows": args.guide_flows, "num_pseudo_inputs": pseudo}
    base = runner.base_config_from_args(args, likelihood="bernoulli", extra=extra)
    rows = {
        "bernoulli-mixture": {"model": "bernoulli-mixture", "fit_method": "exact"},
        "rbm": {"model": "rbm", "fit_method": "exact"},
        "made": {"model": "made", "fit_method": "exact"},
        "dlvm-normal": {"model": "dlvm-is", "prior": "normal"},
        "dlvm-vamp": {"model": "dlvm-is", "prior": "vamp"},
        "dlvm-iaf": {"model": "dlvm-iaf", "prior": "normal"},
    }
    return expand_grid(base, seeds=args.seeds, family=[rows[f] for f in args.families])


def findings(table) -> list:
    """One line per configuration: our test NLL (kind, se) and bits/dim beside the anchor."""
    lines = []
    ok = table[table["status"] == "ok"]
    for _, row in ok.iterrows():
        name = row["model"] + ("" if row["model"] != "dlvm-is" else f" ({row['prior']} prior)")
        se = row.get("test_log_likelihood_se", math.nan)
        line = (f"{name}, seed {row['seed']}: test NLL {-row['test_log_likelihood']:.2f} nats "
                f"({row.get('likelihood_kind', 'IS')}, se {se:.3g}), "
                f"{row.get('bits_per_dim', math.nan):.4f} bits/dim, train "
                f"{row.get('train_time_s', math.nan):.1f} s, eval {row.get('eval_time_s', math.nan):.1f} s")
        anchor = ANCHORS.get(row["model"])
        lines.append(line + (f"; published: {anchor}" if anchor else ""))
    return lines


def main(args: argparse.Namespace) -> runner.StudyResult:
    register_families()
    binarize = args.dataset != "binarized-mnist"
    dataset = runner.dataset_from_args(args, binarize=binarize, likelihood="bernoulli")
    configs = build_grid(args, dataset)
    description = (
        f"Test log-likelihood of model families on {dataset.name} "
        f"({dataset.sizes['train']} training rows, {dataset.sizes['test']} test rows): "
        f"mixture of Bernoullis ({args.num_components} components, EM; exact), RBM "
        f"({args.rbm_hidden} hidden, CD-{args.cd_k}, {args.epochs} epochs; log Z by AIS with "
        f"{args.ais_runs} runs x {args.ais_betas} temperatures, or exact for <= "
        f"{RBM_EXACT_HIDDEN} hidden units), MADE ({args.made_hidden} hidden, {args.num_masks} "
        f"mask(s), Adam; exact), DLVMs (latent dimension {args.latent_dim}, MLPs {args.hidden}, "
        f"ELBO, {args.epochs} epochs) with a normal prior, a VampPrior and an IAF guide "
        f"({args.guide_flows} steps), scored by importance sampling (K = "
        f"{args.num_eval_samples}; IS). Published test NLLs on binarized MNIST (50,000 "
        f"training rows): mixture of Bernoullis 137.64, RBM-500 CD-25 86.34 (Larochelle & "
        f"Murray 2011), MADE 88.40 / 86.64 (Germain et al. 2015). For the families without "
        f"latent variables the k-hat and latent-usage diagnostics do not apply."
    )
    return runner.run_from_args(
        NAME, args, dataset, configs, title="Comparing model families",
        description=description, default_dataset="binarized-mnist", findings=findings,
        primary_factor="model")


if __name__ == "__main__":
    runner.cli(main, parse_args)
