"""Count and category observation models (Poisson, negative binomial, binomial, categorical):
densities against scipy.stats, data checks naming rows and columns, and DLVMs built on them."""
import numpy as np
import pytest
import torch
from scipy import special, stats

from pyro_lvm.inference import fit, log_likelihood
from pyro_lvm.models import DLVM
from pyro_lvm.models.likelihoods import (DEFAULT_DISPERSION_BOUNDS, Binomial, Categorical,
                                         NegativeBinomial, OneHotGroups, Poisson, make_likelihood)

P = 6
GROUPS = [3, 2, 1]  # invalid: a group of 1


def _mask(shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) > 0.3


def _masked_sum(expected, mask):
    return np.where(mask.numpy(), expected, 0.0).sum(-1)


def test_poisson_matches_scipy_with_mask():
    lik = make_likelihood("poisson", P)
    assert isinstance(lik, Poisson) and lik.output_dim == P
    eta = torch.randn(4, P, dtype=torch.float64) * 1.5
    x = torch.poisson(torch.full((4, P), 3.0)).double()
    expected = stats.poisson.logpmf(x.numpy(), np.exp(eta.numpy()))
    np.testing.assert_allclose(lik.distribution(eta).log_prob(x).numpy(), expected, rtol=1e-10)
    mask = _mask(x.shape)
    np.testing.assert_allclose(lik.log_prob(x, eta, mask).numpy(), _masked_sum(expected, mask),
                               rtol=1e-10)
    torch.testing.assert_close(lik.mean(eta), eta.exp())
    assert lik.log_density_upper_bound() == 0.0


@pytest.mark.parametrize("dispersion", ["per_dimension", "decoder"])
def test_negative_binomial_matches_scipy_mean_and_variance(dispersion):
    lik = NegativeBinomial(dispersion=dispersion, data_dim=P).double()
    k = 2 if dispersion == "decoder" else 1
    assert lik.output_dim == k * P
    if dispersion == "per_dimension":
        with torch.no_grad():
            lik.raw_dispersion.copy_(torch.randn(P) * 3)
    out = torch.randn(5, k * P, dtype=torch.float64) * 1.5
    x = torch.poisson(torch.full((5, P), 4.0)).double()
    mu, r = (t.detach().numpy() for t in lik.params(out))
    lo, hi = DEFAULT_DISPERSION_BOUNDS
    assert (r > lo).all() and (r < hi).all()
    expected = stats.nbinom.logpmf(x.numpy(), r, r / (r + mu))
    d = lik.distribution(out)
    np.testing.assert_allclose(d.log_prob(x).detach().numpy(), expected, rtol=1e-8)
    # torch's parameterization has the intended moments: E = mu, Var = mu + mu^2 / r
    np.testing.assert_allclose(d.mean.detach().numpy(), mu, rtol=1e-8)
    np.testing.assert_allclose(d.variance.detach().numpy(), mu + mu ** 2 / r, rtol=1e-8)
    mask = _mask(x.shape)
    np.testing.assert_allclose(lik.log_prob(x, out, mask).detach().numpy(),
                               _masked_sum(expected, mask), rtol=1e-8)


def test_negative_binomial_options_are_checked():
    with pytest.raises(ValueError, match="dispersion must be one of"):
        NegativeBinomial(dispersion="gene")
    with pytest.raises(ValueError, match="0 < low < high"):
        NegativeBinomial(dispersion_bounds=(0, 10))
    with pytest.raises(ValueError, match="init_dispersion"):
        NegativeBinomial(init_dispersion=1e4)


@pytest.mark.parametrize("total_count", [16, [1, 2, 3, 4, 5, 16]])
def test_binomial_matches_scipy(total_count):
    lik = make_likelihood("binomial", P, total_count=total_count)
    n = np.broadcast_to(np.asarray(total_count), (P,))
    logits = torch.randn(3, 4, P, dtype=torch.float64) * 2
    x = torch.from_numpy(np.random.default_rng(0).binomial(n, 0.4, size=(4, P))).double()
    expected = stats.binom.logpmf(x.numpy(), n, special.expit(logits.numpy()))
    np.testing.assert_allclose(lik.distribution(logits).log_prob(x).numpy(), expected, rtol=1e-8)
    mask = _mask(x.shape)
    np.testing.assert_allclose(lik.log_prob(x, logits, mask).numpy(),
                               _masked_sum(expected, mask), rtol=1e-8)
    torch.testing.assert_close(lik.mean(logits), torch.from_numpy(n * special.expit(logits.numpy())))


def test_binomial_needs_a_valid_total_count():
    with pytest.raises(ValueError, match="needs total_count"):
        make_likelihood("binomial", P)
    for bad in (0, 2.5, [[1, 2]]):
        with pytest.raises(ValueError, match="positive integer"):
            Binomial(total_count=bad)
    with pytest.raises(ValueError, match="have 6 entries"):
        Binomial(total_count=[1, 2], data_dim=P)


def test_categorical_is_a_product_of_categoricals_matching_scipy():
    groups = [[0, 2, 5], [1, 3], [4, 6, 7, 8]]  # non-consecutive columns
    lik = make_likelihood("categorical", 9, groups=groups)
    logits = torch.randn(2, 5, 9, dtype=torch.float64) * 2
    rng = np.random.default_rng(0)
    x = np.zeros((5, 9))
    for cols in groups:
        x[np.arange(5), rng.choice(cols, size=5)] = 1
    x_t = torch.from_numpy(x)
    expected = np.zeros((2, 5))
    for cols in groups:
        probs = special.softmax(logits.numpy()[..., cols], axis=-1)
        expected += stats.multinomial.logpmf(x[:, cols], 1, probs)
    np.testing.assert_allclose(lik.log_prob(x_t, logits).numpy(), expected, rtol=1e-10)
    d = lik.distribution(logits)
    assert d.batch_shape == (2, 5, 9) and d.support.is_discrete
    # masking a whole group removes exactly that group's term
    mask = torch.ones(5, 9, dtype=torch.bool)
    mask[1, groups[2]] = False
    probs2 = special.softmax(logits.numpy()[..., groups[2]], axis=-1)
    drop = stats.multinomial.logpmf(x[1, groups[2]], 1, probs2[:, 1])
    np.testing.assert_allclose(lik.log_prob(x_t, logits, mask).numpy()[:, 1],
                               expected[:, 1] - drop, rtol=1e-10)
    # group means are probabilities summing to one per group
    mean = lik.mean(logits)
    for cols in groups:
        torch.testing.assert_close(mean[..., cols].sum(-1), torch.ones(2, 5, dtype=torch.float64))


def test_one_hot_groups_sample_frequencies_and_expand():
    index = torch.tensor([0, 0, 0, 1, 1])
    logits = torch.tensor([0.0, 1.0, -1.0, 2.0, 0.0])
    d = OneHotGroups(logits, index, 2)
    draws = d.sample((20000,))
    assert draws.shape == (20000, 5)
    assert torch.equal(draws[:, :3].sum(-1), torch.ones(20000))
    assert torch.equal(draws[:, 3:].sum(-1), torch.ones(20000))
    p = d.mean
    se = (p * (1 - p) / 20000).sqrt()
    assert ((draws.mean(0) - p).abs() < 4 * se).all()
    e = d.expand((3, 5))
    assert e.batch_shape == (3, 5) and e.log_prob(draws[:3]).shape == (3, 5)


def test_categorical_groups_are_checked():
    with pytest.raises(ValueError, match=">= 2 and sum to data_dim=6"):
        Categorical(groups=GROUPS, data_dim=P)
    with pytest.raises(ValueError, match="columns \\[5\\] are in no categorical group"):
        Categorical(groups=[[0, 1], [2, 3, 4]], data_dim=P)
    with pytest.raises(ValueError, match="column 1 is in categorical groups 0 and 1"):
        Categorical(groups=[[0, 1], [1, 2, 3, 4, 5]], data_dim=P)
    with pytest.raises(ValueError, match="needs groups"):
        make_likelihood("categorical", P)


@pytest.mark.parametrize("lik", [Poisson(data_dim=3), NegativeBinomial(data_dim=3),
                                 Binomial(total_count=4, data_dim=3)], ids=lambda l: l.name)
def test_count_data_checks_name_row_and_column(lik):
    lik.check_data(torch.tensor([[0.0, 3.0, 4.0]]))
    with pytest.raises(ValueError, match=r"not non-negative integers.*row 1, column 2"):
        lik.check_data(torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, 2.5]]))
    with pytest.raises(ValueError, match=r"not non-negative integers.*row 0, column 0"):
        lik.check_data(torch.tensor([[-1.0, 1.0, 2.0]]))
    # a masked-out entry is not checked
    lik.check_data(torch.tensor([[0.0, 0.5, 1.0]]), mask=torch.tensor([[True, False, True]]))


def test_binomial_refuses_counts_above_total_count():
    lik = Binomial(total_count=[4, 4, 16], data_dim=3)
    lik.check_data(torch.tensor([[4.0, 0.0, 16.0]]))
    with pytest.raises(ValueError, match=r"above total_count.*row 1, column 1"):
        lik.check_data(torch.tensor([[4.0, 0.0, 16.0], [0.0, 5.0, 5.0]]))


def test_categorical_data_checks_name_row_and_group():
    lik = Categorical(groups=[3, 3], data_dim=P)
    good = torch.tensor([[1.0, 0, 0, 0, 1, 0], [0, 0, 1, 1, 0, 0]])
    lik.check_data(good)
    with pytest.raises(ValueError, match=r"outside \{0, 1\}.*row 1, column 2"):
        lik.check_data(torch.tensor([[1.0, 0, 0, 0, 1, 0], [0, 0, 2, 1, 0, 0]]))
    with pytest.raises(ValueError, match=r"not one-hot.*row 1, columns \[3, 4, 5\]"):
        lik.check_data(torch.tensor([[1.0, 0, 0, 0, 1, 0], [0, 0, 1, 1, 1, 0]]))
    with pytest.raises(ValueError, match=r"not one-hot.*row 0, columns \[0, 1, 2\]"):
        lik.check_data(torch.tensor([[0.0, 0, 0, 0, 1, 0]]))
    whole = torch.tensor([[True] * 3 + [False] * 3])
    lik.check_data(torch.tensor([[0.0, 1, 0, 0, 0, 0]]), mask=whole)  # missing group skipped
    with pytest.raises(ValueError, match="mask drops only part of categorical group 1"):
        lik.check_data(torch.tensor([[0.0, 1, 0, 0, 1, 0]]),
                       mask=torch.tensor([[True] * 4 + [False] * 2]))


def _count_data(name, n=60):
    g = torch.Generator().manual_seed(0)
    if name == "binomial":
        return torch.binomial(torch.full((n, P), 16.0), torch.rand(n, P, generator=g))
    if name == "categorical":
        x = torch.zeros(n, P)
        x[torch.arange(n), torch.randint(0, 3, (n,), generator=g)] = 1
        x[torch.arange(n), 3 + torch.randint(0, 3, (n,), generator=g)] = 1
        return x
    return torch.poisson(5 * torch.rand(n, P, generator=g))


@pytest.mark.parametrize("name,options", [
    ("poisson", {}), ("negbinomial", {}), ("negbinomial", {"dispersion": "decoder"}),
    ("binomial", {"total_count": 16}), ("categorical", {"groups": [3, 3]})])
def test_dlvm_with_each_count_model_trains_and_evaluates(name, options):
    x = _count_data(name)
    m = DLVM(P, 2, likelihood=name, likelihood_options=options, hidden=(16,))
    before = log_likelihood(m, x, num_samples=20, device="cpu", seed=0)
    result = fit(m, x, epochs=30, batch_size=30, lr=1e-2, device="cpu", progress=False)
    hist = result.history
    assert np.isfinite(hist["train_objective"]).all()
    ll = log_likelihood(m, x, num_samples=20, device="cpu", seed=0)
    assert ll.discrete and ll.bits_per_dim is not None
    assert ll.mean <= 0 and ll.mean > before.mean  # a log probability, and training helped
    assert np.isclose(ll.bits_per_dim, -ll.mean / (P * np.log(2)))
    with pytest.raises(ValueError, match="row 2, column 1"):
        bad = x.clone()
        bad[2, 1] = 0.5
        fit(m, bad, epochs=1, progress=False, device="cpu")


def test_integer_count_arrays_are_data_for_count_models_only():
    """Counts usually arrive as integer arrays: count models take them as they are (the same
    numbers as the float array); continuous models still refuse them, naming the fix."""
    from pyro_lvm.models import PoissonPCA

    counts = _count_data("poisson").numpy().astype(np.int64)
    results = []
    for data in (counts, counts.astype(np.float64), torch.from_numpy(counts)):
        torch.manual_seed(0)
        m = DLVM(P, 2, likelihood="poisson", hidden=(8,))
        fitted = fit(m, data, epochs=2, batch_size=30, device="cpu", progress=False, seed=1)
        ll = log_likelihood(m, data, num_samples=10, device="cpu", seed=0)
        results.append((fitted.step_losses, ll.mean))
    assert results[0] == results[1] == results[2]
    assert DLVM(P, 2, likelihood="poisson").check_data(counts).dtype == torch.get_default_dtype()
    assert PoissonPCA(P, 2).init_from_data(counts) is not None
    with pytest.raises(ValueError, match=r"not non-negative integers.*row 0, column 1"):
        DLVM(P, 2, likelihood="poisson").check_data(np.array([[0, -2] + [1] * (P - 2)]))
    with pytest.raises(ValueError, match="integer dtype int64 with values other than 0/1.*"
                                         "count models"):
        fit(DLVM(P, 2, likelihood="gaussian"), counts, epochs=1, device="cpu", progress=False)


def test_a_users_own_pair_opts_in_to_integer_counts():
    import pyro
    import pyro.distributions as dist

    class UserPoissonFactor(torch.nn.Module):
        def __init__(self, accepts):
            super().__init__()
            self.accepts_integer_data = accepts
            self.log_rate = torch.nn.Parameter(torch.zeros(P))
            self.loc = torch.nn.Parameter(torch.zeros(1))

        def model(self, x, mask=None):
            pyro.module("user_poisson", self)
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("z", dist.Normal(torch.zeros(1), 1.0).to_event(1))
                pyro.sample("x", dist.Poisson((self.log_rate + 0.1 * z).exp()).to_event(1), obs=x)

        def guide(self, x, mask=None):
            pyro.module("user_poisson", self)
            with pyro.plate("data", x.shape[0]):
                pyro.sample("z", dist.Normal(self.loc.expand(x.shape[0], 1), 1.0).to_event(1))

    counts = _count_data("poisson").numpy().astype(np.int32)
    result = fit(UserPoissonFactor(True), counts, epochs=1, batch_size=30, device="cpu",
                 progress=False)
    assert np.isfinite(result.step_losses).all()
    with pytest.raises(ValueError, match="integer dtype int32 with values other than 0/1"):
        fit(UserPoissonFactor(False), counts, epochs=1, device="cpu", progress=False)


def test_integer_counts_with_the_pair_given_as_bound_methods():
    counts = _count_data("poisson").numpy().astype(np.int64)
    for make_call in (lambda m: fit((m.model, m.guide), counts, epochs=1, batch_size=30,
                                    device="cpu", progress=False, seed=2),
                      lambda m: fit(m.model, counts, guide=m.guide, epochs=1, batch_size=30,
                                    device="cpu", progress=False, seed=2)):
        torch.manual_seed(0)
        m = DLVM(P, 2, likelihood="poisson", hidden=(8,))
        assert np.isfinite(make_call(m).step_losses).all()
    gaussian = DLVM(P, 2, likelihood="gaussian")
    with pytest.raises(ValueError, match="integer dtype int64"):
        fit((gaussian.model, gaussian.guide), counts, epochs=1, device="cpu", progress=False)
