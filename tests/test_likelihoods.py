"""Observation models: densities against scipy, parameter maps and bounds, data checks."""
import math

import numpy as np
import pyro
import pytest
import torch
import torch.nn.functional as F
from scipy import special, stats

from pyro_lvm.models.likelihoods import (DEFAULT_DF_BOUNDS, DEFAULT_SCALE_FLOOR, Bernoulli, Gaussian,
                                Likelihood, StudentT, make_likelihood)

P = 5


def _softplus64(t):
    return np.logaddexp(0.0, t)


def test_bernoulli_log_prob_mean_and_shapes():
    lik = Bernoulli(data_dim=P)
    assert lik.params_per_dim == 1 and lik.output_dim == P
    out = torch.randn(3, 4, P)
    x = (torch.rand(4, P) > 0.5).float()
    d = lik.distribution(out)
    assert d.batch_shape == (3, 4, P)
    prob = torch.sigmoid(out.double()).numpy()
    np.testing.assert_allclose(d.log_prob(x).detach().numpy(),
                               stats.bernoulli.logpmf(x.numpy(), prob), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lik.mean(out), torch.sigmoid(out))
    assert lik.log_density_upper_bound() == 0.0


def test_bernoulli_data_checks():
    lik = Bernoulli(data_dim=3)
    lik.check_data(torch.tensor([[0.0, 1.0, 1.0]]))
    with pytest.raises(ValueError, match=r"outside \{0, 1\}.*row 0, column 1"):
        lik.check_data(torch.tensor([[0.0, 0.5, 1.0]]))
    with pytest.raises(ValueError, match="allow_fractional"):
        lik.check_data(torch.tensor([[0.0, 2.0, 1.0]]))
    # a masked-out entry is not checked
    lik.check_data(torch.tensor([[0.0, 0.5, 1.0]]), mask=torch.tensor([[True, False, True]]))
    frac = Bernoulli(allow_fractional=True, data_dim=3)
    frac.check_data(torch.tensor([[0.0, 0.25, 1.0]]))
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        frac.check_data(torch.tensor([[0.0, 1.5, 1.0]]))
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        frac.check_data(torch.tensor([[-0.1, 0.5, 1.0]]))


def test_fractional_bernoulli_scores_cross_entropy_with_validation_on():
    assert pyro.poutine.util.is_validation_enabled()
    lik = Bernoulli(allow_fractional=True, data_dim=3)
    out = torch.randn(2, 3)
    x = torch.tensor([[0.2, 0.5, 1.0], [0.0, 0.9, 0.4]])
    lp = lik.distribution(out).to_event(1).log_prob(x)
    expected = -F.binary_cross_entropy_with_logits(out, x, reduction="none").sum(-1)
    torch.testing.assert_close(lp, expected)
    # the strict one refuses fractional values through Pyro's own support check too
    with pytest.raises(ValueError):
        Bernoulli(data_dim=3).distribution(out).log_prob(x)


@pytest.mark.parametrize("mode", ["per_dimension", "decoder", "fixed"])
def test_gaussian_log_prob_matches_scipy(mode):
    floor = 0.01
    lik = Gaussian(scale=mode, scale_floor=floor, fixed_scale=0.3, data_dim=P)
    k = 2 if mode == "decoder" else 1
    assert lik.params_per_dim == k and lik.output_dim == k * P
    out = torch.randn(3, 4, k * P)
    x = torch.randn(4, P)
    d = lik.distribution(out)
    assert d.batch_shape == (3, 4, P)
    o = out.double().numpy()
    loc = o[..., :P]
    if mode == "decoder":
        scale = floor + _softplus64(o[..., P:])
    elif mode == "per_dimension":
        scale = floor + _softplus64(lik.raw_scale.detach().double().numpy())
        np.testing.assert_allclose(scale, 1.0, rtol=1e-5)  # init_scale
    else:
        scale = 0.3
    np.testing.assert_allclose(d.log_prob(x).detach().numpy(),
                               stats.norm.logpdf(x.double().numpy(), loc, scale), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lik.mean(out), out[..., :P])


def test_gaussian_scale_floor_bounds_the_density():
    """However negative the raw scale, sigma >= floor and log p(x|z) <= the analytic bound
    -p (log floor + log(2 pi) / 2), attained at loc = x."""
    lik = Gaussian(scale="decoder", data_dim=P)
    assert lik.scale_floor == DEFAULT_SCALE_FLOOR
    x = torch.randn(2, P)
    out = torch.cat([x, torch.full_like(x, -1e4)], dim=-1)
    loc, scale = lik.loc_scale(out)
    assert torch.all(scale >= DEFAULT_SCALE_FLOOR)
    lp = lik.distribution(out).log_prob(x).sum(-1)
    bound = lik.log_density_upper_bound()
    assert bound == pytest.approx(-P * (math.log(1e-3) + 0.5 * math.log(2 * math.pi)))
    torch.testing.assert_close(lp, torch.full_like(lp, bound))
    # per-dimension parameterization: same floor
    lik2 = Gaussian(scale="per_dimension", data_dim=P)
    with torch.no_grad():
        lik2.raw_scale.fill_(-1e4)
    assert torch.all(lik2.loc_scale(x)[1] >= DEFAULT_SCALE_FLOOR)
    # no floor: unbounded, and the bound says so
    assert Gaussian(scale="decoder", scale_floor=0.0, data_dim=P).log_density_upper_bound() == math.inf
    assert Gaussian(scale="fixed", fixed_scale=2.0, data_dim=P).log_density_upper_bound() == \
        pytest.approx(float(stats.norm.logpdf(0, 0, 2.0)) * P)


@pytest.mark.parametrize("raw_df", [-1e4, -3.0, 0.0, 3.0, 1e4])
def test_student_t_parameters_and_log_prob(raw_df):
    lik = StudentT(data_dim=P)
    assert lik.params_per_dim == 3 and lik.df_bounds == DEFAULT_DF_BOUNDS
    out = torch.randn(4, 3 * P)
    out[:, 2 * P:] = raw_df
    df, loc, scale = lik.params(out)
    lo, hi = DEFAULT_DF_BOUNDS
    assert torch.all(df >= lo) and torch.all(df <= hi)
    assert torch.all(scale >= DEFAULT_SCALE_FLOOR)
    x = 3 * torch.randn(4, P)
    o = out.double().numpy()
    df64 = lo + (hi - lo) * special.expit(o[:, 2 * P:])
    scale64 = DEFAULT_SCALE_FLOOR + _softplus64(o[:, P:2 * P])
    expected = stats.t.logpdf(x.double().numpy(), df64, o[:, :P], scale64)
    # float32 stays accurate over the whole df interval (the reason for the upper bound)
    np.testing.assert_allclose(lik.distribution(out).log_prob(x).detach().numpy(), expected,
                               rtol=1e-5, atol=2e-4)
    torch.testing.assert_close(lik.mean(out), out[:, :P])


def test_student_t_density_bound_and_options():
    lik = StudentT(df_bounds=(3.0, 30.0), scale_floor=0.01, data_dim=2)
    x = torch.zeros(1, 2)
    out = torch.cat([x, torch.full((1, 2), -1e4), torch.full((1, 2), 1e4)], -1)
    lp = lik.distribution(out).log_prob(x).sum()
    assert float(lp) == pytest.approx(lik.log_density_upper_bound(), rel=1e-5)
    assert float(lp) == pytest.approx(2 * stats.t.logpdf(0.0, 30.0, 0.0, 0.01), rel=1e-5)
    for bad in [(0.0, 10.0), (5.0, 5.0), (2.0, math.inf), (1.0,), "x"]:
        with pytest.raises(ValueError, match="df_bounds"):
            StudentT(df_bounds=bad)
    with pytest.raises(ValueError, match="scale_floor"):
        StudentT(scale_floor=-1.0)


def test_split_width_and_bind_errors():
    lik = StudentT(data_dim=P)
    with pytest.raises(ValueError, match="width 10; expected 3"):
        lik.distribution(torch.zeros(2, 10))
    with pytest.raises(ValueError, match="built for data_dim=5"):
        lik.bind(6)
    assert lik.bind(5) is lik
    unbound = Gaussian(scale="per_dimension")
    with pytest.raises(ValueError, match="data_dim is not set"):
        unbound.output_dim
    unbound.bind(3)
    assert unbound.raw_scale.shape == (3,)
    with pytest.raises(ValueError, match="scale must be one of"):
        Gaussian(scale="learned")
    with pytest.raises(ValueError, match="init_scale"):
        Gaussian(scale_floor=0.5, init_scale=0.1)
    with pytest.raises(ValueError, match="fixed_scale must be positive"):
        Gaussian(scale="fixed", fixed_scale=0.0)
    with pytest.raises(ValueError, match="fixed_scale must be a scalar or have 3"):
        Gaussian(scale="fixed", fixed_scale=torch.ones(2), data_dim=3)


def test_make_likelihood():
    assert isinstance(make_likelihood("bernoulli", 4), Bernoulli)
    g = make_likelihood("normal", 4, scale="decoder", scale_floor=0.1)
    assert isinstance(g, Gaussian) and g.scale_floor == 0.1 and g.output_dim == 8
    t = make_likelihood("student-t", 4)
    assert isinstance(t, StudentT) and t.output_dim == 12
    assert make_likelihood(g, 4) is g
    with pytest.raises(ValueError, match="unknown likelihood"):
        make_likelihood("zipf", 4)
    with pytest.raises(ValueError, match="bad option"):
        make_likelihood("bernoulli", 4, scale_floor=0.1)
    with pytest.raises(ValueError, match="cannot be applied"):
        make_likelihood(g, 4, scale_floor=0.2)
    assert issubclass(StudentT, Likelihood)


def test_buffers_move_with_dtype():
    lik = Gaussian(scale="fixed", fixed_scale=0.5, data_dim=3).double()
    assert lik.fixed_scale.dtype == torch.float64
    out = torch.zeros(2, 3, dtype=torch.float64)
    assert lik.distribution(out).log_prob(out).dtype == torch.float64
