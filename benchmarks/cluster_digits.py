"""Clusters of the 8x8 digits: the clustering DLVM's recipe against k-means on the raw pixels,
paired on the seed, in one run.

For each seed ``s``: ``pyro.set_rng_seed(s)``, ``ClusterDLVM(61, 10, 10, likelihood="binomial",
likelihood_options={"total_count": 16}, hidden=(128,), covariance=...)`` fitted by
:func:`pyro_lvm.models.cluster_dlvm.fit_clusters` (seed ``s``; the recipe's defaults: 30
epochs of the ELBO with KL weight 0.1, the mixture started at k-means clusters of the encoder
means, 30 joint epochs of the ELBO), clusters by ``predict`` (50 guide draws per row); and
``KMeans(10, n_init=10, random_state=s)`` on the raw pixels of the same rows (the 1,438
training rows of ``load_dataset("digits", likelihood="binomial", split=(0.8, 0, 0.2))``).
The labels are used only for the scores (ARI, NMI). Prints one markdown row per seed and
covariance, then the paired differences.

Usage::

    python benchmarks/cluster_digits.py --smoke
    python benchmarks/cluster_digits.py --threads 1 --seeds 0 1 2 3 4 5 6 7 8 9
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

BENCH_DIR = pathlib.Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import common  # noqa: E402,F401  (puts the repository on sys.path)


def run(seed: int, covariance: str, x, labels, device, epochs: int) -> dict:
    import pyro
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    from pyro_lvm.models import ClusterDLVM
    from pyro_lvm.models.cluster_dlvm import fit_clusters

    t0 = time.perf_counter()
    pyro.set_rng_seed(seed)
    model = ClusterDLVM(x.shape[1], 10, 10, likelihood="binomial",
                        likelihood_options={"total_count": 16}, hidden=(128,),
                        covariance=covariance)
    fit_clusters(model, x, seed=seed, device=device, epochs=epochs, pretrain_epochs=epochs)
    assigned = model.predict(x, num_samples=50, seed=seed)
    return {"ari": adjusted_rand_score(labels, assigned),
            "nmi": normalized_mutual_info_score(labels, assigned),
            "occupied": len(np.unique(assigned)), "time_s": time.perf_counter() - t0}


def main(argv=None) -> dict:
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    from pyro_lvm.studies.datasets import load_dataset

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_arguments(parser, data=False)
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="seeds (default: --seed and the 4 after it; --smoke: --seed)")
    parser.add_argument("--covariance", nargs="+", default=["full", "diag"],
                        choices=["full", "diag"])
    parser.add_argument("--epochs", type=int, default=30,
                        help="pre-training and joint epochs each (default: %(default)s; "
                             "--smoke: 1)")
    args = common.parse(parser, argv)
    device = common.setup_runtime(args)
    seeds = args.seeds or ([args.seed] if args.smoke else list(range(args.seed, args.seed + 5)))
    epochs = 1 if args.smoke else args.epochs
    ds = load_dataset("digits", likelihood="binomial", split=(0.8, 0.0, 0.2),
                      **({"max_rows": 300} if args.smoke else {}))
    x, labels = ds.train, np.asarray(ds.labels["train"])
    print("| seed | k-means ARI | k-means NMI | "
          + " | ".join(f"{c} ARI | {c} NMI | {c} minus k-means (ARI) | {c} time (s)"
                       for c in args.covariance) + " |")
    diffs = {c: [] for c in args.covariance}
    rows = []
    for seed in seeds:
        km = KMeans(10, n_init=10, random_state=seed).fit_predict(x.numpy())
        km_ari = adjusted_rand_score(labels, km)
        cells = [f"{seed}", f"{km_ari:.3f}", f"{normalized_mutual_info_score(labels, km):.3f}"]
        for cov in args.covariance:
            r = run(seed, cov, x, labels, device, epochs)
            diffs[cov].append(r["ari"] - km_ari)
            rows.append({"seed": seed, "covariance": cov, "kmeans_ari": km_ari, **r})
            cells += [f"{r['ari']:.3f}", f"{r['nmi']:.3f}", f"{r['ari'] - km_ari:+.3f}",
                      f"{r['time_s']:.1f}"]
        print("| " + " | ".join(cells) + " |", flush=True)
    for cov, d in diffs.items():
        d = np.asarray(d)
        print(f"{cov}: paired ARI difference mean {d.mean():+.3f}, min {d.min():+.3f}, "
              f"{(d >= 0).sum()}/{len(d)} seeds >= k-means")
    return {"rows": rows, "rows_clustered": int(x.shape[0]), "epochs": epochs}


if __name__ == "__main__":
    main()
