"""Factor analysis and PPCA (models/linear.py) against exact oracles: eigendecomposition
formulas, scikit-learn, dense multivariate normal densities and Gaussian conditioning."""
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from sklearn.decomposition import PCA
from sklearn.decomposition import FactorAnalysis as SkFactorAnalysis
from threadpoolctl import threadpool_limits

from pyro_lvm.inference.engine import isolated_param_store
from pyro_lvm.inference.importance_weights import log_weights, trace_log_terms
from pyro_lvm.models.linear import PPCA, FactorAnalysis

MODELS = [FactorAnalysis, PPCA]


@pytest.fixture(autouse=True)
def _single_blas_thread():
    """All problems here are small: BLAS threads only add contention on a shared CI box
    (scikit-learn's FactorAnalysis ran 10x slower with oversubscribed OpenBLAS threads)."""
    with threadpool_limits(limits=1):
        yield


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def random_model(cls, p=7, d=3, guide_covariance="full", seed=1):
    """A model with random (non-trivial) float64 parameters."""
    g = torch.Generator().manual_seed(seed)
    m = cls(p, d, guide_covariance=guide_covariance).double()
    m.loading = torch.randn(p, d, generator=g, dtype=torch.float64)
    m.mean = torch.randn(p, generator=g, dtype=torch.float64)
    shape = (p,) if cls is FactorAnalysis else ()
    m.noise_variance = 0.2 + torch.rand(shape, generator=g, dtype=torch.float64)
    return m


def dense_params(m):
    W = m.loading.detach()
    mu = m.mean.detach()
    psi = m.noise_variance.detach().expand(m.data_dim)
    return W, mu, psi, W @ W.T + torch.diag(psi)


def random_data(m, n=20, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, m.data_dim, generator=g, dtype=torch.float64) * 2.0


def random_mask(n, p, seed=3):
    """Boolean mask with ~35% missing, repeated patterns, fully observed rows, >=1 observed per row."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, p, generator=g) > 0.35
    mask[:, 0] |= ~mask.any(1)
    mask[1] = mask[0]  # a repeated pattern
    mask[2] = True  # a fully observed row
    return mask


# --------------------------------------------------------------------------- PPCA closed form
def test_ppca_closed_form_equals_tipping_bishop_formulas(digits_standardized, float64):
    X = digits_standardized
    n, p = X.shape
    q = 10
    m = PPCA(p, q).fit_closed_form(X)
    S = np.cov(X, rowvar=False, bias=True)  # 1/N covariance
    evals, evecs = np.linalg.eigh(S)
    evals, evecs = evals[::-1], evecs[:, ::-1]
    sigma2 = evals[q:].mean()
    U = evecs[:, :q]

    assert m.noise_variance.item() == pytest.approx(sigma2, rel=1e-12)
    np.testing.assert_allclose(m.mean.detach().numpy(), X.mean(0), atol=1e-12)
    # C = W W^T + sigma^2 I = U_q Lambda_q U_q^T + sigma^2 (I - U_q U_q^T)
    expected_cov = U @ np.diag(evals[:q]) @ U.T + sigma2 * (np.eye(p) - U @ U.T)
    np.testing.assert_allclose(m.covariance().numpy(), expected_cov, atol=1e-10)
    # R = I: W^T W = Lambda_q - sigma^2 I (orthogonal columns), columns span U_q
    W = m.loading.detach().numpy()
    np.testing.assert_allclose(W.T @ W, np.diag(evals[:q] - sigma2), atol=1e-10)
    np.testing.assert_allclose(np.abs(W / np.sqrt(evals[:q] - sigma2)), np.abs(U), atol=1e-8)
    # maximized log-likelihood, Tipping & Bishop (1999) eq. (4) at the ML solution
    ll_max = -0.5 * (p * (math.log(2 * math.pi) + 1) + np.log(evals[:q]).sum()
                     + (p - q) * math.log(sigma2))
    assert m.log_marginal(X).mean().item() == pytest.approx(ll_max, abs=1e-9)
    # posterior covariance is diagonal for the R = I solution, so the guide equals it
    post = m.posterior(X[:3])
    cov = post.covariance_matrix[0]
    assert torch.allclose(cov, torch.diag(cov.diagonal()), atol=1e-12)


def test_ppca_closed_form_matches_sklearn_pca_up_to_n_minus_1(digits_standardized, float64):
    """scikit-learn's PCA estimates the covariance with 1/(N-1); the ML fit uses 1/N.

    All eigenvalues, hence sklearn's explained_variance_, noise_variance_ and covariance,
    are c = N/(N-1) times ours. Our ML solution satisfies tr(C^{-1} S) = p, so its mean
    log-likelihood exceeds sklearn's score by exactly (p/2)(log c + 1/c - 1).
    """
    X = digits_standardized
    n, p = X.shape
    q = 10
    c = n / (n - 1)
    ours = PPCA(p, q).fit_closed_form(X)
    sk = PCA(n_components=q, svd_solver="full").fit(X)

    W = ours.loading.detach().numpy()
    sigma2 = ours.noise_variance.item()
    top_eigenvalues = np.diag(W.T @ W) + sigma2
    np.testing.assert_allclose(top_eigenvalues * c, sk.explained_variance_, rtol=1e-10)
    assert sigma2 * c == pytest.approx(sk.noise_variance_, rel=1e-10)
    np.testing.assert_allclose(ours.covariance().numpy() * c, sk.get_covariance(), atol=1e-10)

    # our log_marginal with sklearn's parameters reproduces sklearn's score exactly
    sk_as_ppca = PPCA(p, q)
    sk_as_ppca.loading = torch.as_tensor(
        sk.components_.T * np.sqrt(sk.explained_variance_ - sk.noise_variance_))
    sk_as_ppca.noise_variance = torch.tensor(sk.noise_variance_)
    sk_as_ppca.mean = torch.as_tensor(sk.mean_)
    per_row = sk_as_ppca.log_marginal(X).detach().numpy()
    np.testing.assert_allclose(per_row, sk.score_samples(X), rtol=0, atol=1e-8)
    assert per_row.mean() == pytest.approx(sk.score(X), abs=1e-8)

    # and the exact offset between the two fits on the training data
    ours_score = ours.log_marginal(X).mean().item()
    offset = -0.5 * p * (math.log(c) + 1.0 / c - 1.0)
    assert offset < 0
    assert sk.score(X) - ours_score == pytest.approx(offset, abs=1e-8)


def test_ppca_em_reaches_closed_form(digits_standardized, float64):
    X = digits_standardized[:600]
    p = X.shape[1]
    closed = PPCA(p, 4).fit_closed_form(X).log_marginal(X).mean().item()
    em = PPCA(p, 4).fit_em(X, tol=1e-9, progress=False)
    assert em.converged_
    history = np.asarray(em.em_history_)
    assert len(history) > 3  # started from the random initial model, not the optimum
    assert np.all(np.diff(history) >= -1e-12)
    assert history[-1] == pytest.approx(em.log_marginal(X).mean().item(), abs=1e-10)
    assert closed - 1e-5 < history[-1] <= closed + 1e-10


# --------------------------------------------------------------------------- FA EM
def test_fa_em_matches_sklearn_and_is_monotone(digits_standardized, float64):
    X = digits_standardized
    p = X.shape[1]
    d = 5
    fa = FactorAnalysis(p, d).fit_em(X, tol=1e-8, max_iter=10000, progress=False)
    sk = SkFactorAnalysis(n_components=d, svd_method="lapack", tol=1e-8, max_iter=10000,
                          random_state=0).fit(X)
    ours = fa.log_marginal(X).mean().item()
    assert fa.converged_
    assert abs(ours - sk.score(X)) < 1e-3
    history = np.asarray(fa.em_history_)
    assert history[-1] == pytest.approx(ours, abs=1e-10)
    # EM never decreases the likelihood (up to float64 rounding of values ~ 1e2)
    assert np.all(np.diff(history) >= -1e-12)
    assert history[-1] > history[0]
    np.testing.assert_allclose(fa.mean.detach().numpy(), X.mean(0), atol=1e-12)
    assert torch.all(fa.noise_variance > 0)


def test_fa_em_warns_when_not_converged(digits_standardized, float64):
    X = digits_standardized
    fa = FactorAnalysis(X.shape[1], 3)
    with pytest.warns(UserWarning, match="did not converge in max_iter=2"):
        fa.fit_em(X, max_iter=2, progress=False)
    assert not fa.converged_
    assert len(fa.em_history_) == 3


# --------------------------------------------------------------------------- exact marginal
@pytest.mark.parametrize("cls", MODELS)
def test_log_marginal_equals_dense_mvn(cls):
    m = random_model(cls)
    x = random_data(m)
    _, mu, _, C = dense_params(m)
    expected = torch.distributions.MultivariateNormal(mu, covariance_matrix=C).log_prob(x)
    torch.testing.assert_close(m.log_marginal(x), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("cls", MODELS)
def test_masked_log_marginal_equals_dense_mvn_on_observed_coordinates(cls):
    m = random_model(cls)
    x = random_data(m)
    mask = random_mask(*x.shape)
    x_missing = x.masked_fill(~mask, float("nan"))  # missing entries may be NaN
    _, mu, _, C = dense_params(m)
    got = m.log_marginal(x_missing, mask=mask)
    for i in range(x.shape[0]):
        o = mask[i]
        expected = torch.distributions.MultivariateNormal(
            mu[o], covariance_matrix=C[o][:, o]).log_prob(x[i, o])
        torch.testing.assert_close(got[i], expected, rtol=0, atol=1e-10)
    # a fully observed mask is the unmasked marginal
    full = torch.ones_like(mask)
    torch.testing.assert_close(m.log_marginal(x, mask=full), m.log_marginal(x), rtol=0,
                               atol=1e-10)


# --------------------------------------------------------------------------- exact posterior
@pytest.mark.parametrize("cls", MODELS)
def test_posterior_equals_gaussian_conditioning_of_the_joint(cls):
    m = random_model(cls)
    x = random_data(m, n=6)
    W, mu, _, C = dense_params(m)
    # (z, x) jointly Gaussian: Cov(z, x) = W^T, Cov(x) = C
    gain = torch.linalg.solve(C, W).T  # W^T C^{-1}
    post = m.posterior(x)
    assert post.batch_shape == (6,) and post.event_shape == (m.latent_dim,)
    torch.testing.assert_close(post.mean, (x - mu) @ gain.T, rtol=0, atol=1e-10)
    cov = torch.eye(m.latent_dim, dtype=torch.float64) - gain @ W
    torch.testing.assert_close(post.covariance_matrix, cov.expand(6, -1, -1), rtol=0, atol=1e-10)

    loc, scale = m.encode(x)
    torch.testing.assert_close(loc, post.mean)
    torch.testing.assert_close(scale, cov.diagonal().sqrt().expand(6, -1))
    torch.testing.assert_close(m.reconstruct(x), loc @ W.T + mu)

    # with missing entries: condition on each row's observed coordinates only
    mask = random_mask(6, m.data_dim)
    post_masked = m.posterior(x, mask=mask)
    for i in range(6):
        o = mask[i]
        gain_o = torch.linalg.solve(C[o][:, o], W[o]).T
        torch.testing.assert_close(post_masked.mean[i], gain_o @ (x[i, o] - mu[o]), rtol=0,
                                   atol=1e-10)
        torch.testing.assert_close(post_masked.covariance_matrix[i],
                                   torch.eye(m.latent_dim, dtype=torch.float64) - gain_o @ W[o],
                                   rtol=0, atol=1e-10)


# --------------------------------------------------------------------------- ELBO == log p(x)
@pytest.mark.parametrize("guide_covariance", ["full", "diag"])
@pytest.mark.parametrize("cls", MODELS)
def test_exact_guide_makes_every_log_weight_equal_log_marginal(cls, guide_covariance):
    m = random_model(cls, guide_covariance=guide_covariance)
    x = random_data(m)
    cov_before = m.covariance()
    m.set_guide_to_posterior()
    # for the diagonal guide the loading may be rotated; p(x) must not change
    torch.testing.assert_close(m.covariance(), cov_before, rtol=0, atol=1e-10)
    with isolated_param_store():
        lw = log_weights(m.model, m.guide, x, num_particles=16)
    assert lw.shape == (16, x.shape[0])
    torch.testing.assert_close(lw, m.log_marginal(x).expand(16, -1), rtol=0, atol=1e-9)


def test_diag_guide_without_rotation_is_not_exact_for_fa():
    """Control for the test above: a non-diagonal posterior covariance cannot be matched by
    a diagonal guide, so the log weights vary across particles, and their expectation is
    log p(x) - KL(q(z|x) || p(z|x)) (checked to 4 Monte Carlo standard errors)."""
    m = random_model(FactorAnalysis, guide_covariance="diag")
    m.set_guide_to_posterior(rotate=False)
    x = random_data(m)
    K = 200
    with isolated_param_store():
        lw = log_weights(m.model, m.guide, x, num_particles=K).detach()
    assert lw.std(0).min() > 1e-3
    q = torch.distributions.Independent(torch.distributions.Normal(
        x @ m.guide_weight.detach().T + m.guide_bias.detach(), m.guide_scale.detach()), 1)
    kl = torch.distributions.kl_divergence(q, m.posterior(x)).detach()
    assert kl.min() > 1e-3
    residual = lw - (m.log_marginal(x).detach() - kl)
    se = residual.std() / math.sqrt(residual.numel())
    assert residual.mean().abs() < 4 * se


@pytest.mark.parametrize("cls", MODELS)
def test_masked_model_with_exact_per_pattern_guide_gives_masked_log_marginal(cls):
    """The model's masked likelihood and the masked posterior/marginal are consistent:
    with q(z|x_o) = p(z|x_o) every log weight is log p(x_o)."""
    m = random_model(cls)
    x = random_data(m)
    mask = random_mask(*x.shape)

    def exact_guide(x, mask=None):
        post = m.posterior(x, mask=mask)
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", dist.MultivariateNormal(post.loc, scale_tril=post.scale_tril))

    with isolated_param_store():
        lw = log_weights(m.model, exact_guide, x, num_particles=8, mask=mask)
    torch.testing.assert_close(lw, m.log_marginal(x, mask=mask).expand(8, -1), rtol=0,
                               atol=1e-9)


@pytest.mark.parametrize("cls", MODELS)
def test_model_and_guide_shapes_with_particle_dim_and_masked_likelihood(cls):
    m = random_model(cls, p=6, d=2)
    x = random_data(m, n=5)
    mask = random_mask(5, 6)
    K = 3
    with isolated_param_store():
        terms = trace_log_terms(m.model, m.guide, x.masked_fill(~mask, float("nan")), K,
                                mask=mask)
    z = terms.guide_trace.nodes["z"]["value"]
    assert z.shape == (K, 5, 2)
    assert terms.model_trace.nodes["x"]["fn"].batch_shape == (K, 5)
    assert terms.model_trace.nodes["x"]["fn"].event_shape == (6,)
    for t in (terms.log_lik, terms.log_prior, terms.log_q):
        assert t.shape == (K, 5) and torch.isfinite(t).all()
    # only observed entries enter the likelihood
    W, mu, psi, _ = dense_params(m)
    per_entry = torch.distributions.Normal(z @ W.T + mu, psi.sqrt()).log_prob(x)
    expected = (per_entry * mask).sum(-1)
    torch.testing.assert_close(terms.log_lik, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(
        terms.log_prior, torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1))


# --------------------------------------------------------------------------- misc behaviour
def test_sample_covariance_matches_model_covariance():
    m = random_model(FactorAnalysis, p=5, d=2)
    n = 20000
    x = m.sample(n)
    assert x.shape == (n, 5)
    C = m.covariance()
    emp = torch.cov(x.T, correction=0)
    # SE of a sample covariance entry of a Gaussian: sqrt((C_ii C_jj + C_ij^2) / n)
    se = ((C.diagonal()[:, None] * C.diagonal()[None, :] + C ** 2) / n).sqrt()
    assert ((emp - C).abs() / se).max() < 4.5
    se_mean = (C.diagonal() / n).sqrt()
    assert ((x.mean(0) - m.mean.detach()).abs() / se_mean).max() < 4.5


def test_parameters_keep_default_dtype_and_closed_form_fit_is_computed_in_float64(
        digits_standardized):
    X = digits_standardized[:500]
    p = X.shape[1]
    m32 = PPCA(p, 3)
    assert m32.loading.dtype == torch.float32 and m32.noise_variance.dtype == torch.float32
    m32.fit_closed_form(X)
    assert m32.loading.dtype == torch.float32 and m32.guide_weight.dtype == torch.float32
    m64 = PPCA(p, 3).double().fit_closed_form(X)
    torch.testing.assert_close(m32.covariance().double(), m64.covariance(), rtol=1e-6,
                               atol=1e-6)
    # float64 data is evaluated in float64 even by a float32 model
    assert m32.log_marginal(torch.as_tensor(X)).dtype == torch.float64
    assert m32.log_marginal(X).dtype == torch.float64
    assert m32.log_marginal(X.astype(np.float32)).dtype == torch.float32
    checked = m32.check_data(X)
    assert checked.dtype == torch.float32 and checked.shape == X.shape


def test_diag_guide_rotation_keeps_likelihood(digits_standardized, float64):
    X = digits_standardized
    fa = FactorAnalysis(X.shape[1], 3, guide_covariance="diag").fit_em(X, progress=False)
    W = fa.loading.detach()
    gram = (W / fa.noise_variance.detach()[:, None]).T @ W
    # after the rotation the posterior covariance is diagonal, so the diag guide is exact
    assert torch.allclose(gram, torch.diag(gram.diagonal()), atol=1e-8)
    assert fa.em_history_[-1] == pytest.approx(fa.log_marginal(X).mean().item(), abs=1e-10)


# --------------------------------------------------------------------------- bad input
@pytest.fixture
def small_data():
    g = np.random.default_rng(0)
    return g.standard_normal((30, 6))


@pytest.mark.parametrize("cls", MODELS)
@pytest.mark.parametrize("value,kind", [(np.nan, "NaN"), (np.inf, "infinite")])
def test_nonfinite_data_names_row_and_column(cls, small_data, value, kind):
    X = small_data.copy()
    X[4, 2] = value
    m = cls(6, 2)
    fit = m.fit_closed_form if cls is PPCA else m.fit_em
    with pytest.raises(ValueError, match=rf"{kind}.*\(row 4, column 2\)"):
        fit(X)
    with pytest.raises(ValueError, match=r"\(row 4, column 2\)"):
        m.log_marginal(X)
    with pytest.raises(ValueError, match=r"\(row 4, column 2\)"):
        m.check_data(X)


@pytest.mark.parametrize("cls", MODELS)
def test_wrong_width_is_rejected(cls, small_data):
    m = cls(5, 2)
    msg = "has 6 columns but the model expects data_dim=5"
    for method in (m.log_marginal, m.posterior, m.check_data, m.fit_em):
        with pytest.raises(ValueError, match=msg):
            method(small_data)


@pytest.mark.parametrize("cls", MODELS)
def test_fewer_than_two_rows_is_rejected_by_fits(cls, small_data):
    m = cls(6, 2)
    fits = [m.fit_em] + ([m.fit_closed_form] if cls is PPCA else [])
    for fit in fits:
        with pytest.raises(ValueError, match=r"1 row\(s\); at least 2 are needed"):
            fit(small_data[:1])
    assert m.log_marginal(small_data[:1]).shape == (1,)  # one row is fine to evaluate


@pytest.mark.parametrize("cls", MODELS)
def test_non_float_data_is_rejected(cls):
    m = cls(3, 1)
    with pytest.raises(ValueError, match="must be numeric.*<U"):
        m.check_data(np.array([["a", "b", "c"], ["d", "e", "f"]]))
    with pytest.raises(ValueError, match="must be numeric.*object"):
        m.log_marginal(np.array([[1.0, None, 2.0], [1.0, 2.0, 3.0]], dtype=object))
    with pytest.raises(ValueError, match="integer dtype.*other than 0/1"):
        m.fit_em(np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]]))


def test_latent_dim_not_smaller_than_data_dim_is_rejected():
    with pytest.raises(ValueError, match=r"PPCA: latent_dim=5 must be smaller than data_dim=5"):
        PPCA(5, 5)
    with pytest.raises(ValueError, match=r"PPCA: latent_dim=7 must be smaller than data_dim=5"):
        PPCA(5, 7)
    with pytest.raises(ValueError, match=r"FactorAnalysis: latent_dim=4 must be smaller than "
                                         r"data_dim=4"):
        FactorAnalysis(4, 4)
    with pytest.raises(ValueError, match="latent_dim must be a positive integer, got 0"):
        PPCA(5, 0)
    with pytest.raises(ValueError, match="data_dim must be a positive integer, got -3"):
        FactorAnalysis(-3, 1)
    with pytest.raises(ValueError, match="latent_dim must be a positive integer, got 2.0"):
        FactorAnalysis(4, 2.0)
    with pytest.raises(ValueError, match="guide_covariance must be 'full' or 'diag'"):
        FactorAnalysis(4, 2, guide_covariance="lowrank")


def test_degenerate_data_is_rejected(small_data):
    X = small_data.copy()
    X[:, 3] = 1.5
    with pytest.raises(ValueError, match=r"column\(s\) \[3\] of X are constant"):
        FactorAnalysis(6, 2).fit_em(X, progress=False)
    rank_two = small_data[:, :2] @ np.ones((2, 6)) + np.arange(6)
    with pytest.raises(ValueError, match="ML noise variance is 0"):
        PPCA(6, 2).fit_closed_form(rank_two)


def test_masked_entries_may_be_nan_but_observed_ones_may_not(small_data):
    m = FactorAnalysis(6, 2)
    X = small_data.copy()
    mask = np.ones_like(X, dtype=bool)
    X[3, 1] = np.nan
    mask[3, 1] = False
    checked = m.check_data(X, mask=mask)
    assert checked[3, 1] == 0 and torch.isfinite(checked).all()
    assert torch.isfinite(m.log_marginal(X, mask=mask)).all()
    mask[3, 1] = True
    with pytest.raises(ValueError, match=r"\(row 3, column 1\)"):
        m.log_marginal(X, mask=mask)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("cls", MODELS)
def test_fits_and_exact_quantities_on_cuda(cls):
    source = random_model(FactorAnalysis, p=6, d=2)
    small_data = source.sample(300).numpy()
    m = cls(6, 2).double().to("cuda")
    m.fit_em(small_data, progress=False)
    if cls is PPCA:
        m.fit_closed_form(small_data)
    assert m.loading.device.type == "cuda" and m.guide_weight.device.type == "cuda"
    x = torch.as_tensor(small_data, device="cuda")
    with isolated_param_store():
        lw = log_weights(m.model, m.guide, x, num_particles=4)
    torch.testing.assert_close(lw, m.log_marginal(x).expand(4, -1), rtol=0, atol=1e-9)
    cpu = cls(6, 2).double()
    cpu.load_state_dict({k: v.cpu() for k, v in m.state_dict().items()})
    torch.testing.assert_close(cpu.log_marginal(small_data), m.log_marginal(x).cpu())


def test_two_instances_do_not_share_parameters_outside_an_isolated_store():
    """Running two same-class models in the global param store must not tie their tensors."""
    from pyro_lvm.inference.importance_weights import log_weights

    x = torch.randn(7, 5, dtype=torch.float64)
    a = PPCA(5, 2).double()
    b = PPCA(5, 2).double()
    with torch.no_grad():
        b.loading.add_(1.0)
    log_weights(a.model, a.guide, x, 2)
    log_weights(b.model, b.guide, x, 2)
    assert a.loading.data_ptr() != b.loading.data_ptr()
    assert not torch.allclose(a.loading, b.loading)
    names = set(pyro.get_param_store().keys())
    assert any(n.startswith(a._pyro_name + ".") for n in names)
    assert any(n.startswith(b._pyro_name + ".") for n in names)
