"""Clusters from a DLVM with a mixture latent, against k-means and Gaussian mixtures.

Model: :class:`pyro_lvm.models.ClusterDLVM`, :math:`c \\sim \\mathrm{Cat}(\\pi)`,
:math:`z \\mid c \\sim \\mathcal{N}(m_c, \\Sigma_c)` (full covariances by default,
``--covariance diag`` for diagonal ones), :math:`x \\mid z` from the decoder, with :math:`c`
summed out exactly. Fit by the VaDE-style recipe (Jiang et al. 2017;
:func:`pyro_lvm.models.cluster_dlvm.fit_clusters`): ``--pretrain-epochs`` epochs of the ELBO
with the KL term weighted by ``--pretrain-beta`` (close to an autoencoder), the mixture started
at k-means clusters of the training rows' encoder means, then ``--epochs`` epochs of the ELBO
with every parameter trained jointly. No label is used in training. A test row's cluster is
:math:`\\arg\\max_c p(c \\mid x)`, estimated from the importance weights of the guide's draws.

Baselines, each fitted on the test rows with the run's seed (so every comparison is paired on
the seed): k-means and a diagonal ``GaussianMixture`` on the DLVM's latent means
:math:`\\mu_\\phi(x)`; the same two on PCA scores (PCA of the training rows with as many
components as latent dimensions); k-means on the raw data. Scores: adjusted Rand index and
normalized mutual information against the labels (scikit-learn), columns ``ari_<method>`` and
``nmi_<method>`` of ``results.csv``; the findings give each method's mean over seeds, each
seed's DLVM and k-means scores, and the paired difference DLVM minus k-means on the raw data
with a t interval. The report's samples
are cluster-wise: column c of each mosaic holds draws of :math:`x \\sim p(x \\mid c)` (the
decoder mean at :math:`z \\sim p(z \\mid c)`).

Statically binarized MNIST (Larochelle & Murray 2011) has no labels in its published files, so on
it the study fits and shows the clusters (occupancy, cluster-wise samples) without ARI / NMI.

Defaults: scikit-learn's 8x8 digits as counts 0..16 with a binomial observation model
(``total_count`` 16), or binarized MNIST (``--dataset binarized-mnist``) with a Bernoulli one;
10 clusters, latent dimension 10, MLPs 128, batch 128, 30 pre-training epochs (KL weight 0.1,
lr 0.003) and 30 joint epochs (lr 0.002) of Adam, 5 seeds: the recipe measured in
benchmarks/README.md (section 6) and checked by ``tests/test_cluster_dlvm.py``.

References
----------
Jiang et al. (2017), Variational deep embedding, IJCAI.
Harchaoui, Mattei, Bouveyron & Almansa (2018), Wasserstein adversarial mixture clustering.
Hubert & Arabie (1985), Comparing partitions, Journal of Classification (ARI).
"""
from __future__ import annotations

import argparse

import numpy as np
from scipy import stats

if __package__ in (None, ""):  # run as a file from a checkout: use this checkout's pyro_lvm
    import _checkout  # noqa: F401  (studies/_checkout.py, beside this script)

from pyro_lvm.studies import count_families  # noqa: E402  (registers cluster-dlvm)
from pyro_lvm.studies import runner  # noqa: E402
from pyro_lvm.studies.runner import expand_grid  # noqa: E402

NAME = "cluster"
DEFAULTS = dict(latent_dim=10, hidden="128", epochs=30, batch_size=128, lr=2e-3,
                num_eval_samples=500, seeds=[0, 1, 2, 3, 4])


def parse_args(argv=None) -> argparse.Namespace:
    parser, g = runner.study_parser(
        NAME, "Clusters of a DLVM with a mixture latent against k-means and Gaussian mixtures "
              "on PCA scores, latent means and raw data (ARI / NMI against the labels).",
        DEFAULTS, omit=("num_particles",))
    g.add_argument("--num-clusters", type=runner.positive_int, default=10,
                   help="mixture components / clusters (default: %(default)s)")
    g.add_argument("--likelihood", choices=["bernoulli", "binomial", "poisson", "negbinomial"],
                   default=None, help="observation model (default: binomial for digits, "
                                      "bernoulli for binarized MNIST)")
    g.add_argument("--cluster-samples", type=runner.positive_int, default=100,
                   help="guide draws per test row for p(c | x) (default: %(default)s)")
    g.add_argument("--covariance", choices=["full", "diag"], default="full",
                   help="covariances of the mixture components (default: %(default)s)")
    g.add_argument("--pretrain-epochs", type=runner.nonnegative_int, default=30,
                   help="pre-training epochs before the mixture is started at k-means "
                        "clusters of the encoder means; 0: none (default: %(default)s)")
    g.add_argument("--pretrain-beta", type=runner.positive_float, default=0.1,
                   help="KL weight of the pre-training ELBO (default: %(default)s)")
    g.add_argument("--pretrain-lr", type=runner.positive_float, default=3e-3,
                   help="learning rate of the pre-training (default: %(default)s)")
    # two seeds even in a smoke run: the comparison with k-means is paired on the seed
    return runner.parse_study_args(parser, argv, smoke={"cluster_samples": 10, "seeds": [0, 1],
                                                        "pretrain_epochs": 1})


def build_grid(args: argparse.Namespace, dataset) -> list:
    extra = {"num_clusters": args.num_clusters, "cluster_samples": args.cluster_samples,
             "covariance": args.covariance, "pretrain_epochs": args.pretrain_epochs,
             "pretrain_beta": args.pretrain_beta, "pretrain_lr": args.pretrain_lr}
    if args.likelihood == "binomial":
        extra["model_kwargs"] = {"likelihood_options": {"total_count": int(dataset.max_count)}}
    base = runner.base_config_from_args(args, model="cluster-dlvm", prior="mixture",
                                        likelihood=args.likelihood, objective="elbo",
                                        num_particles=1, extra=extra)
    return expand_grid(base, seeds=args.seeds)


def findings(results) -> list:
    ok = results[results["status"] == "ok"]
    if "ari_dlvm" not in ok.columns or not len(ok):
        return ["no clustering scores: the data have no labels (statically binarized MNIST "
                "ships without them), or no run finished"]
    lines = []
    for method in count_families.CLUSTER_METHODS:
        ari, nmi = ok[f"ari_{method}"], ok[f"nmi_{method}"]
        lines.append(f"{method}: ARI {ari.mean():.3f}, NMI {nmi.mean():.3f} (mean over "
                     f"{len(ok)} seed(s))")
    for _, row in ok.sort_values("seed").iterrows():
        lines.append(f"seed {int(row['seed'])}: DLVM ARI {row['ari_dlvm']:.3f} (NMI "
                     f"{row['nmi_dlvm']:.3f}), k-means on raw data ARI "
                     f"{row['ari_kmeans_raw']:.3f} (NMI {row['nmi_kmeans_raw']:.3f}), "
                     f"difference {row['ari_dlvm'] - row['ari_kmeans_raw']:+.3f}")
    diff = (ok["ari_dlvm"] - ok["ari_kmeans_raw"]).to_numpy(float)
    if len(diff) > 1:
        lo, hi = stats.t.interval(0.95, len(diff) - 1, loc=diff.mean(),
                                  scale=diff.std(ddof=1) / np.sqrt(len(diff)))
        lines.append(f"ARI of the DLVM minus k-means on raw data, paired on the seed: "
                     f"{diff.mean():+.3f} (95% t interval {lo:+.3f} to {hi:+.3f})")
    else:
        lines.append(f"ARI of the DLVM minus k-means on raw data: {diff.mean():+.3f} (one seed)")
    return lines


def main(args: argparse.Namespace) -> runner.StudyResult:
    mnist = args.dataset == "binarized-mnist"
    if args.likelihood is None:
        args.likelihood = "bernoulli" if mnist else "binomial"
    binarize = args.likelihood == "bernoulli" and not mnist
    count = args.likelihood != "bernoulli"
    dataset = runner.dataset_from_args(args, binarize=binarize, likelihood=args.likelihood,
                                       **({"scale": None} if count else {}))
    # Statically binarized MNIST (Larochelle & Murray 2011) ships without labels: the study
    # then still fits and shows the clusters (occupancy, cluster-wise samples), without ARI/NMI
    unlabelled = dataset.labels is None
    configs = build_grid(args, dataset)
    description = (
        f"A DLVM with a {args.num_clusters}-component mixture latent ({args.covariance} "
        f"covariances, latent dimension {args.latent_dim}, MLPs {args.hidden}, "
        f"{args.likelihood} observation model) on {dataset.name} "
        f"({dataset.sizes['train']} training rows), fitted VaDE-style: "
        f"{args.pretrain_epochs} epochs of the ELBO with KL weight {args.pretrain_beta:g}, the "
        f"mixture started at k-means clusters of the encoder means, then {args.epochs} joint "
        f"epochs of the ELBO (no labels in training); "
        f"{len(args.seeds)} seed(s). Clusters of the test rows (argmax of p(c | x) from "
        f"{args.cluster_samples} importance-weighted guide draws) against k-means and diagonal "
        f"Gaussian mixtures on the DLVM's latent means and on PCA scores, and k-means on the raw "
        f"data, all with the run's seed; ARI and NMI against the labels are in the results "
        f"table (ari_*, nmi_*). Samples are cluster-wise: column c of a mosaic is cluster c."
        + (f" {dataset.name} has no labels here, so ARI and NMI are not computed." if unlabelled
           else "")
    )
    return runner.run_from_args(NAME, args, dataset, configs,
                                title="Clusters from a mixture-latent DLVM",
                                description=description, findings=findings,
                                default_dataset="digits",
                                primary_factor="model")


if __name__ == "__main__":
    runner.cli(main, parse_args)
