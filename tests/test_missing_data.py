"""Training on incomplete data (MIWAE bound for every DLVM likelihood, allow_missing) and
MIWAE imputation of binarized MNIST against mean and KNN imputation."""
import numpy as np
import pyro
import pytest
import torch

from pyro_lvm.inference import IWAE, ampute, fit, imputation_error, impute
from pyro_lvm.inference.importance_weights import log_weights
from pyro_lvm.models import DLVM


def _data(likelihood, n=40, p=6, seed=0):
    rng = np.random.default_rng(seed)
    if likelihood == "bernoulli":
        return (rng.random((n, p)) > 0.5).astype(np.float32)
    return rng.normal(size=(n, p)).astype(np.float32)


def _fit(likelihood, x, **kwargs):
    pyro.clear_param_store()
    torch.manual_seed(0)
    m = DLVM(x.shape[1], 2, likelihood=likelihood, hidden=(8,))
    res = fit(m, x, IWAE(5), epochs=3, batch_size=16, lr=1e-2, progress=False, seed=1, **kwargs)
    return m, res


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "studentt"])
def test_miwae_training_ignores_the_missing_values(likelihood):
    """NaN at missing entries with allow_missing=True and arbitrary values there with mask=
    give bit-identical fits: only observed entries enter the bound."""
    x = _data(likelihood)
    mask = ampute(x, 0.3, "mcar", seed=0)
    m1, r1 = _fit(likelihood, np.where(mask, x, np.nan), allow_missing=True)
    junk = np.where(mask, x, 1.0 if likelihood == "bernoulli" else 123.0).astype(np.float32)
    m2, r2 = _fit(likelihood, junk, mask=mask)
    assert np.isfinite(r1.history["train_objective"]).all()
    np.testing.assert_array_equal(r1.step_losses, r2.step_losses)
    for (n1, p1), (n2, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    # ...and differ from a fit that sees those values (positive control)
    _, r3 = _fit(likelihood, junk)
    assert r3.step_losses != r1.step_losses


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "studentt"])
def test_miwae_bound_sums_observed_entries_only(likelihood):
    """The log weights with a mask equal log p(z) - log q(z | x~) + sum over observed entries
    of log p(x_ij | z), x~ the zero-filled row (the encoder input)."""
    x = torch.as_tensor(_data(likelihood, n=5))
    mask = torch.as_tensor(ampute(x.numpy(), 0.4, "mcar", seed=1))
    torch.manual_seed(0)
    m = DLVM(6, 2, likelihood=likelihood, hidden=(8,))
    with torch.no_grad():
        torch.manual_seed(3)
        lw = log_weights(m.model, m.guide, torch.where(mask, x, torch.nan), 4, mask)
        torch.manual_seed(3)
        x0 = torch.where(mask, x, 0.0)
        loc, scale = m.encode(x0)
        z = loc + scale * torch.randn(4, 5, 2)
        log_q = torch.distributions.Normal(loc, scale).log_prob(z).sum(-1)
        log_prior = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
        per_entry = m.likelihood.distribution(m.decoder(z)).log_prob(x0)
        log_lik = torch.where(mask, per_entry, 0.0).sum(-1)
    torch.testing.assert_close(lw, log_lik + log_prior - log_q, rtol=1e-5, atol=1e-4)


def test_allow_missing_errors():
    x = _data("gaussian")
    x[3, 2] = np.nan
    m = DLVM(6, 2, likelihood="gaussian", hidden=(8,))
    with pytest.raises(ValueError, match=r"row 3, column 2"):
        fit(m, x, epochs=1, progress=False)

    def model(x):
        return m.model(x)

    def guide(x):
        return m.guide(x)

    with pytest.raises(ValueError, match="takes no mask argument"):
        fit((model, guide), x, epochs=1, progress=False, allow_missing=True)
    empty = x.copy()
    empty[5] = np.nan
    with pytest.raises(ValueError, match="row 5"):
        fit(m, empty, epochs=1, progress=False, allow_missing=True)


@pytest.mark.slow
def test_miwae_imputes_binarized_mnist_better_than_mean_and_knn(binarized_mnist):
    """50% of the pixels missing completely at random on 1000 training digits: MIWAE
    (Bernoulli DLVM trained with IWAE-5 on the observed pixels, imputed by SNIS with K=50)
    is more accurate on the missing pixels than column-mean imputation and scikit-learn's
    KNNImputer (k=5) in the same run, with a paired per-row difference > 3 standard errors."""
    from sklearn.impute import KNNImputer, SimpleImputer

    X = binarized_mnist["train"][:1000].numpy()
    mask = ampute(X, 0.5, "mcar", seed=0)
    X_nan = np.where(mask, X, np.nan)
    pyro.set_rng_seed(0)
    m = DLVM(784, 16, likelihood="bernoulli", hidden=(128,))
    res = fit(m, X_nan, IWAE(5), epochs=40, batch_size=50, lr=3e-3, allow_missing=True,
              progress=False)
    miwae = impute(res, X_nan, allow_missing=True, num_samples=50).imputed
    others = {"mean": SimpleImputer().fit_transform(X_nan),
              "knn": KNNImputer(n_neighbors=5).fit_transform(X_nan)}
    missing = ~mask

    def row_accuracy(est):
        return (((est >= 0.5) == (X == 1)) & missing).sum(1) / missing.sum(1)

    acc_miwae = imputation_error(X, miwae, mask)["accuracy"]
    for name, est in others.items():
        acc = imputation_error(X, est, mask)["accuracy"]
        diff = row_accuracy(miwae) - row_accuracy(est)
        se = diff.std(ddof=1) / np.sqrt(len(diff))
        assert acc_miwae > acc and diff.mean() > 3 * se, (name, acc_miwae, acc, diff.mean(), se)
