"""Amputation mechanisms: target rate, seed, and the dependence each mechanism promises."""
import numpy as np
import pytest

from pyro_lvm.inference.amputation import ampute


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    C = 0.6 * np.ones((6, 6)) + 0.4 * np.eye(6)
    return rng.multivariate_normal(np.zeros(6), C, size=4000)


@pytest.mark.parametrize("mechanism", ["mcar", "mar", "mnar"])
@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_rate_seed_and_no_empty_rows(data, mechanism, rate):
    mask = ampute(data, rate, mechanism, seed=3)
    assert mask.dtype == bool and mask.shape == data.shape
    assert abs((1 - mask.mean()) - rate) < 0.02
    assert mask.any(1).all()
    np.testing.assert_array_equal(mask, ampute(data, rate, mechanism, seed=3))
    assert not np.array_equal(mask, ampute(data, rate, mechanism, seed=4))


def test_mcar_is_independent_of_the_values(data):
    mask = ampute(data, 0.4, "mcar", seed=0)
    for j in range(6):
        assert abs(data[~mask[:, j], j].mean() - data[mask[:, j], j].mean()) < 0.1


def test_mar_depends_on_always_observed_columns_only(data):
    mask = ampute(data, 0.3, "mar", seed=0, observed_fraction=0.34, strength=3.0)
    always = np.nonzero(mask.all(0))[0]
    assert len(always) == 2
    j = next(c for c in range(6) if c not in always)
    # missingness predicted by the observed columns: a clear mean difference there...
    score = data[:, always].sum(1)
    assert abs(score[~mask[:, j]].mean() - score[mask[:, j]].mean()) > 0.3
    # ...and, given them, not by the value itself (residual of x_j on the observed columns)
    A = np.column_stack([np.ones(len(data)), data[:, always]])
    resid = data[:, j] - A @ np.linalg.lstsq(A, data[:, j], rcond=None)[0]
    assert abs(resid[~mask[:, j]].mean() - resid[mask[:, j]].mean()) < 0.08


def test_mnar_self_masking_hides_large_values(data):
    mask = ampute(data, 0.3, "mnar", seed=0, strength=2.0)
    for j in range(6):
        assert data[~mask[:, j], j].mean() > data[mask[:, j], j].mean() + 0.5


def test_bad_arguments():
    x = np.zeros((5, 3))
    with pytest.raises(ValueError, match="rate"):
        ampute(x, 1.2)
    with pytest.raises(ValueError, match="mechanism"):
        ampute(x, 0.2, "random")
    with pytest.raises(ValueError, match="complete"):
        ampute(np.full((5, 3), np.nan), 0.2)
    with pytest.raises(ValueError, match="unreachable"):
        ampute(np.random.default_rng(0).normal(size=(20, 4)), 0.8, "mar", observed_fraction=0.5)
