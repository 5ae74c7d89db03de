"""Model families of the count and cluster studies, registered with the runner on import
(:mod:`pyro_lvm.studies.runner.families`):

* ``"poisson-pca"``: :class:`pyro_lvm.models.PoissonPCA` (offset started at the log column
  means of the training rows).
* ``"fa-dequantized"``: factor analysis fitted by EM on dequantized training rows and scored
  as the probability model of integers :math:`P(x) = \\int_{[0,1)^p} p_{FA}(x + u)\\,du`
  (:class:`pyro_lvm.models.dequantized.Dequantized`), so that its test log-likelihood is a
  log-probability comparable with those of count models.
* ``"cluster-dlvm"``: :class:`pyro_lvm.models.ClusterDLVM` with ``num_clusters`` components
  and ``covariance`` (``extra``; default ``"full"``), fitted by the VaDE-style recipe of
  :func:`pyro_lvm.models.cluster_dlvm.fit_clusters`: its pre-training hook runs
  ``extra["pretrain_epochs"]`` epochs with KL weight ``extra["pretrain_beta"]`` and starts the
  mixture at k-means clusters of the encoder means, then the run's SVI fit is the joint phase;
  its evaluation hook adds clustering scores on the test rows -- ARI and NMI
  (scikit-learn) against the labels of the DLVM's clusters (:math:`\\arg\\max_c p(c\\mid x)`),
  of k-means and a diagonal ``GaussianMixture`` on the DLVM's latent means, on PCA scores (PCA
  of the training rows, as many components as latent dimensions) and of k-means on the raw
  data, all seeded by the run's seed so that every comparison is paired -- and replaces the
  run's ``samples`` by cluster-wise samples :math:`x \\sim p(x \\mid c)`, one column per
  cluster.

Count likelihoods take their options from ``extra["model_kwargs"]`` as for any DLVM, e.g.
``{"likelihood_options": {"total_count": 16}}`` for a binomial model of the digits.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

import numpy as np
import torch

from pyro_lvm.studies.datasets import Dataset
from pyro_lvm.studies.runner import families
from pyro_lvm.studies.runner.schema import RunConfig

__all__ = ["CLUSTER_METHODS", "clustering_scores"]

#: Columns the cluster-dlvm hook adds: ``ari_<method>`` and ``nmi_<method>`` for each.
CLUSTER_METHODS = ("dlvm", "kmeans_latent", "gmm_latent", "kmeans_pca", "gmm_pca", "kmeans_raw")
SAMPLES_PER_CLUSTER = 4


def _build_poisson_pca(config: RunConfig, dataset: Dataset):
    from pyro_lvm.models.poisson_pca import PoissonPCA

    if config.prior != "normal" or config.likelihood != "poisson":
        raise ValueError("poisson-pca has a standard normal prior and a Poisson observation "
                         "model: use prior='normal', likelihood='poisson'")
    kwargs = dict(config.extra.get("model_kwargs", {}))
    model = PoissonPCA(dataset.data_dim, config.latent_dim, hidden=tuple(config.hidden), **kwargs)
    return model.init_from_data(dataset.train)


def _build_fa_dequantized(config: RunConfig, dataset: Dataset):
    from pyro_lvm.models.dequantized import Dequantized
    from pyro_lvm.models.linear import FactorAnalysis

    if config.prior != "normal" or config.likelihood != "gaussian":
        raise ValueError("fa-dequantized is factor analysis: use prior='normal', "
                         "likelihood='gaussian'")
    return Dequantized(FactorAnalysis(dataset.data_dim, config.latent_dim))


def _fit_fa_dequantized(model, dataset: Dataset, config: RunConfig):
    """EM factor analysis on the dequantized training rows x + u, u ~ U[0, 1)^p (one draw per
    entry, seeded by the run's seed)."""
    gen = torch.Generator().manual_seed(int(config.seed))
    x = dataset.train.double()
    model.base.fit_em(x + torch.rand(x.shape, generator=gen, dtype=x.dtype), progress=False)
    return model


def _build_cluster_dlvm(config: RunConfig, dataset: Dataset):
    from pyro_lvm.models.cluster_dlvm import ClusterDLVM

    kwargs = dict(config.extra.get("model_kwargs", {}))
    kwargs.setdefault("covariance", str(config.extra.get("covariance", "full")))
    return ClusterDLVM(dataset.data_dim, config.latent_dim,
                       int(config.extra.get("num_clusters", 10)), likelihood=config.likelihood,
                       hidden=tuple(config.hidden), **kwargs)


def _pretrain_cluster_dlvm(model, dataset: Dataset, config: RunConfig, device, progress):
    """The VaDE-style start of ``cluster-dlvm`` (:func:`pyro_lvm.models.cluster_dlvm.
    pretrain_clusters`): ``extra["pretrain_epochs"]`` epochs of the ELBO with KL weight
    ``extra["pretrain_beta"]``, then the mixture at k-means clusters (``extra["cluster_init"]``)
    of the training rows' encoder means; the run's SVI fit is then the joint phase."""
    from pyro_lvm.models import cluster_dlvm

    extra = config.extra
    epochs = int(extra.get("pretrain_epochs", cluster_dlvm.PRETRAIN_EPOCHS))
    beta = float(extra.get("pretrain_beta", cluster_dlvm.PRETRAIN_BETA))
    lr = float(extra.get("pretrain_lr", cluster_dlvm.PRETRAIN_LR))
    init = str(extra.get("cluster_init", "kmeans"))
    if epochs == 0:  # no pre-training: the mixture starts where the model was built
        return None, "no pre-training (pretrain_epochs=0): the mixture prior starts at random"
    result = cluster_dlvm.pretrain_clusters(
        model, dataset.train, epochs=epochs, beta=beta, lr=lr, batch_size=config.batch_size,
        seed=config.seed, init=init, mask=dataset.mask("train"), device=device,
        callbacks=[progress.fit_callback()] if progress is not None else None)
    return result.history, (f"pre-training: {epochs} epoch(s) of the ELBO with KL weight "
                            f"{beta:g} (lr {lr:g}), then the mixture started at {init} "
                            f"clusters of the encoder means (VaDE-style)")


def clustering_scores(labels: np.ndarray, assignments: Dict[str, np.ndarray]) -> Dict[str, float]:
    """``ari_<name>`` and ``nmi_<name>`` (scikit-learn) of each assignment against ``labels``."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    out = {}
    for name, assigned in assignments.items():
        out[f"ari_{name}"] = float(adjusted_rand_score(labels, assigned))
        out[f"nmi_{name}"] = float(normalized_mutual_info_score(labels, assigned))
    return out


def baseline_assignments(train: np.ndarray, test: np.ndarray, num_clusters: int,
                         num_components: int, seed: int, prefix: str = "") -> Dict[str, np.ndarray]:
    """k-means and a diagonal GaussianMixture on PCA scores (PCA fitted on ``train``) and
    k-means on the raw rows, each fitted on ``test`` with ``seed``."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture

    scores = PCA(num_components, random_state=seed).fit(train).transform(test)
    return {
        "kmeans_pca": KMeans(num_clusters, n_init=10, random_state=seed).fit_predict(scores),
        "gmm_pca": GaussianMixture(num_clusters, covariance_type="diag", random_state=seed,
                                   reg_covar=1e-4).fit(scores).predict(scores),
        "kmeans_raw": KMeans(num_clusters, n_init=10, random_state=seed).fit_predict(test),
    }


def _evaluate_cluster_dlvm(model, dataset: Dataset, config: RunConfig,
                           device) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
    from sklearn.cluster import KMeans
    from sklearn.mixture import GaussianMixture

    labels = dataset.label("test")
    x = dataset.test.to(device)
    mask = dataset.mask("test")
    seed, C = int(config.seed), model.num_clusters
    model.eval()
    with torch.no_grad():
        latent = model.encode(x, None if mask is None else mask.to(device))[0].cpu().double().numpy()
    assignments = {
        "dlvm": model.predict(x, mask, num_samples=int(config.extra.get("cluster_samples", 100)),
                              seed=seed),
        "kmeans_latent": KMeans(C, n_init=10, random_state=seed).fit_predict(latent),
        "gmm_latent": GaussianMixture(C, covariance_type="diag", random_state=seed,
                                      reg_covar=1e-4).fit(latent).predict(latent),
    }
    assignments.update(baseline_assignments(dataset.train.double().numpy(),
                                            dataset.test.double().numpy(), C,
                                            config.latent_dim, seed))
    metrics: Dict[str, Any] = {"num_clusters": C,
                               "occupied_clusters": int(len(np.unique(assignments["dlvm"])))}
    if labels is not None:
        metrics.update(clustering_scores(np.asarray(labels), assignments))
    arrays = {"cluster_assignments": assignments["dlvm"].astype(np.int64),
              "samples": _cluster_samples(model, dataset, seed)}
    return metrics, arrays


def _cluster_samples(model, dataset: Dataset, seed: int) -> np.ndarray:
    """Rows ``[SAMPLES_PER_CLUSTER * C, pixels]``: row r, column c of a 10-column mosaic holds a
    draw of :math:`x \\sim p(x \\mid c)` (decoder mean at :math:`z \\sim p(z \\mid c)`)."""
    means = model.prior.means
    C = means.shape[0]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        eps = torch.randn((SAMPLES_PER_CLUSTER, C, means.shape[1]), generator=gen)
        z = model.component_draws(eps.to(means))
        x = model.likelihood.mean(model.decoder(z)).reshape(SAMPLES_PER_CLUSTER * C, -1)
    images = dataset.to_images(x.cpu().numpy())
    return (x.cpu().numpy() if images is None else images.reshape(images.shape[0], -1))


families.register_family(families.Family("poisson-pca", _build_poisson_pca), replace=True)
families.register_family(families.Family("fa-dequantized", _build_fa_dequantized,
                                         fit_exact=_fit_fa_dequantized), replace=True)
families.register_family(families.Family("cluster-dlvm", _build_cluster_dlvm,
                                         evaluate=_evaluate_cluster_dlvm,
                                         pretrain=_pretrain_cluster_dlvm), replace=True)
