"""The clustering DLVM: the enumerated component latent against the summed mixture density and
a loop over components, responsibilities against quadrature, clusters on digits."""
import numpy as np
import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceEnum_ELBO

from pyro_lvm.models import ClusterDLVM

P, D, C = 5, 2, 3


def _model(latent_dim=D, **kw):
    torch.manual_seed(0)
    m = ClusterDLVM(P, latent_dim, C, likelihood="poisson", hidden=(8,), **kw).double()
    with torch.no_grad():  # distinct weights, spread components
        m.prior.logits.copy_(torch.tensor([0.3, -0.5, 0.1], dtype=torch.float64))
        m.prior.means.mul_(2.0)
    return m


def _data(n=7):
    return torch.poisson(torch.full((n, P), 2.0, dtype=torch.float64))


def _loop_log_joint(m, x, z):
    """log p(x, z) per row = log sum_c pi_c N(z; m_c, s_c) + log p(x | z), a Python loop over c."""
    weights, means, scales = m.prior.mixture_components()
    terms = []
    for c in range(C):
        log_n = torch.distributions.Normal(means[c], scales[c]).log_prob(z).sum(-1)
        terms.append(torch.log(weights[c]) + log_n)
    log_pz = torch.logsumexp(torch.stack(terms), 0)
    return log_pz + m.likelihood.log_prob(x, m.decoder(z))


def test_enumerated_and_summed_log_joint_equal_a_loop_over_components():
    m, x = _model(), _data()
    z = torch.randn(x.shape[0], D, dtype=torch.float64)
    loop = _loop_log_joint(m, x, z)
    # the summed form: the model's own trace with z fixed
    tr = poutine.trace(poutine.condition(m.model, data={"z": z})).get_trace(x)
    tr.compute_log_prob()
    summed = tr.nodes["z"]["log_prob"] + tr.nodes["x"]["log_prob"]
    torch.testing.assert_close(summed, loop)
    torch.testing.assert_close(m.component_log_prob(z).logsumexp(-1), m.prior.log_prob(z))
    # the enumerated form: Pyro sums c out exactly (no latent left but c, empty guide)
    enumerated = poutine.condition(m.enumerated_model, data={"z": z})
    loss = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(enumerated, lambda x: None, x)
    torch.testing.assert_close(-loss, loop.sum())
    # positive control: dropping one component changes the value
    with torch.no_grad():
        m.prior.logits[0] = -30.0
    assert not torch.allclose(_loop_log_joint(m, x, z), loop, atol=1e-3)


def test_enumerated_elbo_equals_summed_elbo_at_the_same_draws():
    m, x = _model(), _data()
    pyro.set_rng_seed(5)
    summed = Trace_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1).loss(
        m.model, m.guide, x)
    pyro.set_rng_seed(5)
    enum = TraceEnum_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1).loss(
        m.enumerated_model, m.guide, x)
    assert np.isclose(summed, enum, rtol=1e-10)


def test_responsibilities_match_quadrature_at_d1():
    """p(c | x) prop. to pi_c int N(z; m_c, s_c) p(x | z) dz on a dense grid, against the SNIS
    estimate from the guide's draws (K = 4000: its error is a few 1e-3)."""
    m, x = _model(latent_dim=1), _data(4)
    # a proposal wider than the posterior (mean ~ 2, sd ~ 1.1 for these rows) keeps the
    # importance weights bounded, so K = 4000 draws pin p(c | x) down to ~0.01; the untrained
    # encoder (sd ~ 0.7 around 0) would be consistent too, but needs ~1e5 draws
    last = m.encoder[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([2.0, 2.0], dtype=torch.float64))  # loc 2, sd ~ 2.1
    grid = torch.linspace(-15, 15, 30001, dtype=torch.float64)[:, None, None]  # [G, 1, 1]
    with torch.no_grad():
        comp = m.component_log_prob(grid)                       # [G, 1, C]
        log_lik = m.likelihood.log_prob(x, m.decoder(grid))     # [G, n]
        joint = torch.logsumexp(comp + log_lik[..., None], 0)   # [n, C]
        exact = torch.softmax(joint, -1)
        est = m.responsibilities(x, num_samples=4000, seed=1)
    assert est.shape == (4, C)
    torch.testing.assert_close(est.sum(-1), torch.ones(4, dtype=torch.float64))
    assert (est - exact).abs().max() < 0.02, (est, exact)
    # deterministic given the seed
    torch.testing.assert_close(m.responsibilities(x, num_samples=4000, seed=1), est)


def test_clusterdlvm_refuses_its_own_prior_arguments():
    with pytest.raises(ValueError, match="sets its own mixture prior"):
        ClusterDLVM(P, D, C, prior="normal")


@pytest.fixture(scope="module")
def digits_clusters():
    """A ClusterDLVM on the digits as counts (binomial, 16 trials), VaDE-style: a short fit,
    the mixture started at a GaussianMixture of the encoder means, a second short fit; and
    k-means on the raw pixels with the same seed (the paired baseline)."""
    from sklearn.cluster import KMeans

    from pyro_lvm.inference import fit
    from pyro_lvm.studies.datasets import load_dataset

    pyro.set_rng_seed(0)
    ds = load_dataset("digits", likelihood="binomial", split=(0.8, 0.0, 0.2))
    x, y = ds.train, ds.labels["train"]
    model = ClusterDLVM(ds.data_dim, 8, 10, likelihood="binomial",
                        likelihood_options={"total_count": 16}, hidden=(64,))
    fit(model, x, epochs=20, batch_size=128, lr=3e-3, device="cpu", progress=False, seed=0)
    model.init_clusters(x, seed=0)
    fit(model, x, epochs=20, batch_size=128, lr=1e-3, device="cpu", progress=False, seed=0)
    kmeans = KMeans(10, n_init=10, random_state=0).fit_predict(x.numpy())
    return y, model.predict(x, num_samples=50, seed=0), kmeans


@pytest.mark.slow
def test_digits_clusters_are_far_above_chance(digits_clusters):
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    y, dlvm, _ = digits_clusters
    assert len(np.unique(dlvm)) >= 8  # no collapse onto a few components
    assert adjusted_rand_score(y, dlvm) > 0.4 and normalized_mutual_info_score(y, dlvm) > 0.5
    # positive control: the same assignments against shuffled labels score near 0
    shuffled = np.random.default_rng(0).permutation(y)
    assert abs(adjusted_rand_score(shuffled, dlvm)) < 0.05


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="issue 16 asks for ARI >= k-means on raw pixels; with "
                   "this short CPU training the mixture-latent DLVM scores below k-means "
                   "(see benchmarks/README.md); strict: a pass is reported so the mark goes")
def test_digits_clusters_at_least_kmeans_on_raw_pixels(digits_clusters):
    from sklearn.metrics import adjusted_rand_score

    y, dlvm, kmeans = digits_clusters
    assert adjusted_rand_score(y, dlvm) >= adjusted_rand_score(y, kmeans)
