"""Deep latent variable models: the model/guide contract with vectorized particles for every
prior x likelihood, gradients to every prior parameter under SVI, masks, data checks, the
Gaussian scale floor, Student-t robustness to outliers, a short binarized-MNIST fit, the
lecture's fixed-decoder example and device handling."""
import copy
import math

import numpy as np
import pyro
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from scipy import stats

from conftest import requires_cuda
from pyro_lvm.inference.engine import isolated_param_store
from pyro_lvm.inference.contract import check_contract
from pyro_lvm.inference.training import fit
from pyro_lvm.inference.importance_weights import log_weights, trace_log_terms
from pyro_lvm.models.dlvm import DLVM, LectureDLVM
from pyro_lvm.models.likelihoods import Gaussian
from pyro_lvm.models.networks import ACTIVATIONS, mlp
from pyro_lvm.models.priors import MixturePrior, VampPrior

PRIORS = ["normal", "mixture", "vamp"]
LIKELIHOODS = ["bernoulli", "gaussian", "studentt"]


def _small(prior="normal", likelihood="bernoulli", p=6, d=2, **kw):
    kw.setdefault("hidden", (8,))
    return DLVM(p, d, prior=prior, likelihood=likelihood, num_components=3,
                num_pseudo_inputs=5, **kw)


def _data(likelihood, n=7, p=6):
    if likelihood == "bernoulli":
        return (torch.rand(n, p) > 0.5).float()
    return torch.randn(n, p)


def _mask(n=7, p=6):
    mask = torch.rand(n, p) > 0.4
    mask[:, 0] = True  # every row keeps an observed entry
    return mask


def _paired_se(diff: torch.Tensor) -> float:
    return float(diff.std() / math.sqrt(diff.numel()))


# ---------------------------------------------------------------------------------- networks
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS) + [torch.nn.SiLU])
def test_mlp_shapes_and_activations(activation):
    net = mlp(3, (4, 5), 2, activation)
    assert isinstance(net, torch.nn.Sequential)
    assert [m.out_features for m in net if isinstance(m, torch.nn.Linear)] == [4, 5, 2]
    assert net(torch.randn(7, 11, 3)).shape == (7, 11, 2)


def test_gated_linear_units_follow_their_definition():
    torch.manual_seed(0)
    net = mlp(6, (5, 4), 3, "gated")
    assert [type(m).__name__ for m in net] == ["GatedLinear", "GatedLinear", "Linear"]
    unit = net[0]
    u = torch.randn(2, 7, 6)
    weight, bias = unit.linear.weight, unit.linear.bias
    expected = (u @ weight[:5].T + bias[:5]) * torch.sigmoid(u @ weight[5:].T + bias[5:])
    torch.testing.assert_close(unit(u), expected)
    assert net(u).shape == (2, 7, 3)
    model = DLVM(12, 2, hidden=(8,), activation="gated")
    assert model.config["activation"] == "gated"
    x = (torch.rand(5, 12) < 0.5).float()
    pyro.set_rng_seed(1)
    traced = trace_log_terms(model.model, model.guide, x, 3).log_weights
    pyro.set_rng_seed(1)
    torch.testing.assert_close(log_weights(model.model, model.guide, x, 3), traced,
                               rtol=1e-5, atol=1e-4)


def test_mlp_errors():
    with pytest.raises(ValueError, match="unknown activation 'sigmoidal'"):
        mlp(3, (4,), 2, "sigmoidal")
    with pytest.raises(ValueError, match="activation must be"):
        mlp(3, (4,), 2, 3)
    with pytest.raises(ValueError, match="hidden layer width"):
        mlp(3, (4, 0), 2)
    with pytest.raises(ValueError, match="in_dim"):
        mlp(0, (4,), 2)
    assert len(mlp(3, (), 2)) == 1  # no hidden layer: one affine map


# ------------------------------------------------------------------------- shapes / contract
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("prior", PRIORS)
def test_model_and_guide_run_with_vectorized_particles(prior, likelihood):
    m = _small(prior, likelihood)
    x = _data(likelihood)
    for mask in (None, _mask()):
        terms = trace_log_terms(m.model, m.guide, x, num_particles=3, mask=mask)
        for name in ("log_lik", "log_prior", "log_q"):
            value = getattr(terms, name)
            assert value.shape == (3, 7), name
            assert torch.isfinite(value).all(), name
        z = terms.guide_trace.nodes["z"]
        assert z["value"].shape == (3, 7, 2)
        assert z["fn"].has_rsample  # reparameterized: IWAE/DReG gradients apply
        assert terms.model_trace.nodes["x"]["fn"].event_shape == (6,)


@pytest.mark.parametrize("prior", PRIORS)
def test_check_contract_accepts_every_prior(prior):
    report = check_contract(_small(prior, "gaussian"), torch.randn(5, 6), mask=_mask(5))
    assert report is not None


# ---------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("prior", PRIORS)
def test_every_parameter_gets_a_finite_nonzero_gradient(prior, likelihood):
    m = _small(prior, likelihood)
    loss = -log_weights(m.model, m.guide, _data(likelihood), num_particles=3).mean()
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, f"no gradient reaches {name}"
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("prior,options,expected", [
    ("mixture", {}, {"prior.logits", "prior.means", "prior.raw_scales"}),
    ("vamp", {}, {"prior.pseudo_inputs"}),
    ("vamp", {"learn_weights": True}, {"prior.pseudo_inputs", "prior.logits"}),
])
def test_svi_updates_every_learnable_prior_parameter(prior, options, expected):
    """Pyro's own SVI (which finds parameters through the param store) trains the prior."""
    m = _small(prior, "bernoulli", prior_options=options)
    x = _data("bernoulli", n=20)
    before = {f"prior.{n}": p.detach().clone() for n, p in m.prior.named_parameters()}
    assert set(before) == expected
    with isolated_param_store():
        svi = SVI(m.model, m.guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
        for _ in range(3):
            assert math.isfinite(svi.step(x))
        registered = {n.split(".", 1)[1] for n in pyro.get_param_store().keys()}
    assert expected <= registered
    for n, p in m.prior.named_parameters():
        assert not torch.equal(p.detach(), before[f"prior.{n}"]), f"{n} did not change"


# ------------------------------------------------------------------------------------- masks
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_mask_drops_missing_entries_even_nan(likelihood):
    m = _small("normal", likelihood)
    x, mask = _data(likelihood), _mask()
    x_nan = x.clone()
    x_nan[~mask] = float("nan")
    pyro.set_rng_seed(1)
    t1 = trace_log_terms(m.model, m.guide, x, 2, mask=mask)
    pyro.set_rng_seed(1)
    t2 = trace_log_terms(m.model, m.guide, x_nan, 2, mask=mask)
    torch.testing.assert_close(t1.log_weights, t2.log_weights)
    # by hand: the sum over observed entries of the per-entry log densities
    z = t1.guide_trace.nodes["z"]["value"]
    per_entry = m.likelihood.distribution(m.decoder(z)).log_prob(x)
    torch.testing.assert_close(t1.log_lik, (per_entry * mask).sum(-1))
    (-t2.log_weights.mean()).backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


# --------------------------------------------------------------------------------- data checks
def test_bernoulli_data_checks():
    m = _small("normal", "bernoulli", p=4)
    ok = m.check_data(np.array([[0, 1, 1, 0]]))
    assert ok.dtype == torch.float32 and ok.shape == (1, 4)
    bad = torch.tensor([[0.0, 0.5, 1.0, 1.0]])
    with pytest.raises(ValueError, match=r"outside \{0, 1\}.*row 0, column 1"):
        m.check_data(bad)
    with pytest.raises(ValueError, match=r"outside \{0, 1\}"):
        trace_log_terms(m.model, m.guide, bad, 1)  # the model itself refuses (validation on)
    with pytest.raises(ValueError, match=r"outside \{0, 1\}"):
        fit(m, bad.repeat(4, 1), epochs=1, progress=False, device="cpu")
    # a missing entry is not checked
    m.check_data(bad, mask=torch.tensor([[True, False, True, True]]))
    frac = _small("normal", "bernoulli", p=4, allow_fractional=True)
    frac.check_data(bad)
    assert torch.isfinite(log_weights(frac.model, frac.guide, bad, 2)).all()
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        frac.check_data(torch.tensor([[0.0, 1.5, 1.0, 1.0]]))


def test_shape_and_value_checks():
    m = _small("normal", "gaussian", p=4)
    with pytest.raises(ValueError, match="5 columns but the model expects data_dim=4"):
        m.check_data(torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"expects \(batch, data_dim=4\)"):
        m.model(torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"expects \(batch, data_dim=4\)"):
        m.guide(torch.zeros(4))
    with pytest.raises(ValueError, match="mask has shape"):
        m.guide(torch.zeros(3, 4), mask=torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="NaN.*row 1, column 2"):
        m.check_data(torch.tensor([[0.0] * 4, [0.0, 0.0, float("nan"), 0.0]]))
    with pytest.raises(ValueError, match="must be a torch.Tensor"):
        m.model(np.zeros((3, 4)))
    assert m.check_data(np.random.randn(3, 4) * 100).shape == (3, 4)  # any real value


def test_constructor_errors():
    with pytest.raises(ValueError, match="data_dim must be a positive integer"):
        DLVM(0, 2)
    with pytest.raises(ValueError, match="unknown prior"):
        DLVM(4, 2, prior="flat")
    with pytest.raises(ValueError, match="unknown likelihood"):
        DLVM(4, 2, likelihood="zipf")
    with pytest.raises(ValueError, match="unknown activation"):
        DLVM(4, 2, activation="swish2")
    with pytest.raises(ValueError, match="latent_dim"):
        DLVM(4, 2, prior=MixturePrior(3))
    with pytest.raises(ValueError, match="built for data_dim=5"):
        DLVM(4, 2, likelihood=Gaussian(data_dim=5))


# -------------------------------------------------------------------------------- conveniences
def test_sample_reconstruct_encode():
    m = _small("mixture", "bernoulli")
    x = m.sample(11)
    assert x.shape == (11, 6) and set(x.unique().tolist()) <= {0.0, 1.0}
    xm, z = m.sample(4, mean=True, return_latent=True)
    assert xm.shape == (4, 6) and z.shape == (4, 2)
    assert torch.all((xm > 0) & (xm < 1))
    torch.testing.assert_close(xm, torch.sigmoid(m.decoder(z)))
    loc, scale = m.encode(x)
    assert loc.shape == scale.shape == (11, 2) and torch.all(scale > 0)
    rec = m.reconstruct(x)
    torch.testing.assert_close(rec, torch.sigmoid(m.decoder(loc)))
    with pytest.raises(ValueError, match="n must be"):
        m.sample(0)
    g = _small("vamp", "gaussian")
    assert g.sample(5).shape == (5, 6)
    assert g.config["prior"] == "vamp" and g.config["num_pseudo_inputs"] == 5


def test_vamp_prior_uses_the_models_own_encoder():
    m = _small("vamp", "gaussian")
    assert isinstance(m.prior, VampPrior)
    own = {id(p) for p in m.prior.parameters()}
    assert own == {id(m.prior.pseudo_inputs)}  # encoder parameters are not duplicated
    assert len(list(m.parameters())) == len({id(p) for p in m.parameters()})
    w, loc, scale = m.prior.mixture_components()
    loc2, scale2 = m.encode(m.prior.pseudo_inputs)
    torch.testing.assert_close(loc, loc2)
    torch.testing.assert_close(scale, scale2)
    x = torch.randn(50, 6)
    m.init_from_data(x)
    assert torch.cdist(m.prior.pseudo_inputs.detach(), x).min(1).values.max() < 0.1
    # a copy evaluates the copy's encoder
    c = copy.deepcopy(m)
    with torch.no_grad():
        c.encoder[-1].bias.add_(1.0)
    z = torch.randn(3, 2)
    assert not torch.allclose(c.prior.log_prob(z), m.prior.log_prob(z))


def test_state_dict_round_trip_and_float64():
    m = _small("vamp", "studentt")
    clone = _small("vamp", "studentt")
    clone.load_state_dict(m.state_dict())
    x = torch.randn(5, 6)
    z = torch.randn(4, 2)
    torch.testing.assert_close(clone.prior.log_prob(z), m.prior.log_prob(z))
    torch.testing.assert_close(clone.reconstruct(x), m.reconstruct(x))
    # everything (parameters and buffers) follows .to(): float64 as a CPU stand-in for a device
    for prior in PRIORS:
        m64 = _small(prior, "gaussian", gaussian_scale="fixed").double()
        assert all(t.dtype == torch.float64 for t in list(m64.parameters()) + list(m64.buffers()))
        lw = log_weights(m64.model, m64.guide, x.double(), 2)
        assert lw.dtype == torch.float64 and torch.isfinite(lw).all()
        assert m64.sample(3).dtype == torch.float64


# ---------------------------------------------------------------------------- Gaussian floor
def test_gaussian_floor_bounds_the_degenerate_solution():
    """Mattei & Frellsen's construction: a decoder that puts its mean on a (duplicated)
    data row and lets the variance go to zero. Without a floor log p(x|z) grows without bound
    as the raw scale decreases; with the floor it stops at -p (log floor + log(2 pi) / 2)."""
    p = 4
    x = torch.randn(1, p).repeat(10, 1)  # one row, duplicated
    values = {}
    for floor in (1e-3, 0.0):
        m = DLVM(p, 2, likelihood="gaussian", gaussian_scale="decoder", scale_floor=floor,
                 hidden=(4,))
        last = m.decoder[-1]
        values[floor] = []
        for raw in (-10.0, -20.0, -40.0):
            with torch.no_grad():
                last.weight.zero_()
                last.bias.copy_(torch.cat([x[0], torch.full((p,), raw)]))
            with torch.no_grad():
                values[floor].append(float(trace_log_terms(m.model, m.guide, x, 2).log_lik.max()))
    floored = np.array(values[1e-3])
    bound = -p * (math.log(1e-3) + 0.5 * math.log(2 * math.pi))
    assert np.all(floored <= bound + 1e-3) and floored[-1] == pytest.approx(bound, rel=1e-5)
    unfloored = np.array(values[0.0])
    assert np.all(np.diff(unfloored) > p * 9)  # ~ +p * 10 nats per e^-10 in scale
    assert unfloored[-1] > bound + 50


def test_gaussian_floor_holds_under_training_on_duplicated_rows():
    """Training on duplicated rows with a constant column pushes that column's scale to 0;
    the floor stops it there and the ELBO stays finite and below the floor's bound, while
    the same model with (almost) no floor goes straight past it."""
    base = torch.randn(8, 4)
    x = base.repeat(25, 1)
    x[:, 3] = 0.5
    floor = 0.05
    result = {}
    for f in (floor, 1e-6):
        pyro.set_rng_seed(0)
        m = DLVM(4, 2, likelihood="gaussian", scale_floor=f, hidden=(8,))
        opt = torch.optim.Adam(m.parameters(), lr=0.01)
        for _ in range(700):
            opt.zero_grad()
            (-log_weights(m.model, m.guide, x, 1).mean()).backward()
            opt.step()
        with torch.no_grad():
            elbo = log_weights(m.model, m.guide, x, 10).mean(0)
            scale = m.likelihood.loc_scale(torch.zeros(1, 4))[1][0]
        result[f] = (elbo, scale, m.likelihood.log_density_upper_bound())
    elbo, scale, bound = result[floor]
    assert torch.isfinite(elbo).all()
    assert float(elbo.mean()) + 4 * _paired_se(elbo) < bound
    assert torch.all(scale >= floor)
    assert scale[3] < 2 * floor  # training pushed the constant column against the floor
    _, scale_free, _ = result[1e-6]
    assert scale_free[3] < floor / 2  # ... and without it goes on towards zero


# ------------------------------------------------------------------------ Student-t outliers
def _train_full_batch(m, x, steps, lr):
    opt = torch.optim.Adam(m.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        (-log_weights(m.model, m.guide, x, 1).mean()).backward()
        opt.step()
    return m


def _iwae_per_row(m, x, k=100):
    with torch.no_grad():
        return torch.logsumexp(log_weights(m.model, m.guide, x, k), 0) - math.log(k)


def test_student_t_is_less_affected_by_gross_outliers_than_gaussian():
    """Clean data on a 1-D curve in R^5 with N(0, 0.1^2) noise; 5% of the training rows are
    replaced by gross outliers (uniform on [-10, 10]^5, the clean data lie in [-2.3, 2.3]).
    Both models (default Gaussian with a learned per-dimension scale, and Student-t) are
    trained on the contaminated rows and compared on held-out *clean* rows by the IWAE_100
    estimate of log p(x) per row (paired over rows; margin 4 standard errors).

    (A Gaussian whose scale is a decoder output can partly absorb outliers by giving them
    their own latent region with a huge variance; the per-dimension Gaussian cannot.)"""
    p, n_train, n_out = 5, 1000, 50
    w, b = torch.linspace(0.5, 1.5, p), torch.linspace(0.0, 2.0, p)

    def simulate(n):
        z = torch.randn(n, 1)
        return 2 * torch.sin(z * w + b) + 0.1 * torch.randn(n, p)

    clean_train, test = simulate(n_train), simulate(500)
    train = clean_train.clone()
    train[torch.randperm(n_train)[:n_out]] = (torch.rand(n_out, p) * 2 - 1) * 10
    ll = {}
    for lik in ("gaussian", "studentt"):
        pyro.set_rng_seed(0)
        m = _train_full_batch(DLVM(p, 1, likelihood=lik, hidden=(32,)), train, 500, 1e-2)
        ll[lik] = _iwae_per_row(m, test)
        if lik == "gaussian":
            # the mechanism: the outliers inflate the Gaussian noise scale well above 0.1
            assert torch.all(m.likelihood.loc_scale(torch.zeros(1, p))[1] > 0.3)
    diff = ll["studentt"] - ll["gaussian"]
    assert float(diff.mean()) > 4 * _paired_se(diff), (float(diff.mean()), _paired_se(diff))


# ----------------------------------------------------------------------------------- MNIST
def test_bernoulli_dlvm_on_binarized_mnist_improves_validation_elbo(binarized_mnist):
    train = binarized_mnist["train"][:10000]
    valid = binarized_mnist["valid"][:1000]
    m = DLVM(784, 20, hidden=(200,))

    def valid_elbo(model):
        # common random numbers across epochs make the paired differences precise
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(123)
            return log_weights(model.model, model.guide, valid, 1)[0]

    per_epoch = [valid_elbo(m)]

    class TrackValidation:
        def on_epoch_end(self, state):
            per_epoch.append(valid_elbo(state.model))

    result = fit(m, train, epochs=3, batch_size=100, lr=1e-3, seed=0, device="cpu",
                 validation=valid, callbacks=[TrackValidation()], progress=False)
    assert len(per_epoch) == 4
    for epoch, (before, after) in enumerate(zip(per_epoch[:-1], per_epoch[1:]), start=1):
        diff = after - before
        assert float(diff.mean()) > 4 * _paired_se(diff), \
            f"epoch {epoch}: validation ELBO change {float(diff.mean()):.2f} nats"
    assert np.all(np.diff(result.history["valid_objective"].to_numpy()) > 0)
    samples = result.model.sample(16)
    assert samples.shape == (16, 784)
    assert set(samples.unique().tolist()) <= {0.0, 1.0}


# ------------------------------------------------------------------------------ LectureDLVM
def test_lecture_dlvm_decoder_is_the_stated_gaussian():
    m = LectureDLVM(variance_floor=1e-6)
    z = torch.tensor([[0.0], [1e-7], [0.4], [-1.3], [math.pi], [2.5]])
    x = torch.randn(6, 2) * 3
    zz = z.double().numpy()[:, 0]
    sinc = np.where(zz == 0, 1.0, np.sin(zz) / np.where(zz == 0, 1.0, zz))
    mu = np.stack([10 * np.sin(zz) ** 3, 10 * np.cos(zz) - 10 * np.cos(zz) ** 4], -1)
    sd = np.sqrt(np.stack([(sinc / 3) ** 2, sinc ** 2], -1) + 1e-6)
    expected = stats.norm.logpdf(x.double().numpy(), mu, sd).sum(-1)
    got = m.conditional_log_prob(x, z)
    assert torch.isfinite(got).all()  # including z = 0 and z = pi
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-4, atol=1e-3)
    assert list(m.decoder_mean(z).shape) == [6, 2]
    assert [n for n, _ in m.named_parameters() if not n.startswith("encoder")] == []


def test_lecture_dlvm_simulates_and_its_guide_can_be_fitted():
    m = LectureDLVM()
    x, z = m.sample(3000, return_latent=True)
    assert x.shape == (3000, 2) and z.shape == (3000, 1)
    # simulated data follow the decoder: standardized residuals are N(0, 1)
    resid = ((x - m.decoder_mean(z)) / m.decoder_scale(z)).reshape(-1).numpy()
    assert stats.kstest(resid, "norm").pvalue > 1e-3
    terms = trace_log_terms(m.model, m.guide, x[:7], 3, mask=_mask(7, 2))
    assert terms.log_weights.shape == (3, 7) and torch.isfinite(terms.log_weights).all()
    train, test, z_test = x[:2000], x[2000:], z[2000:]

    def held_out_elbo():
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(7)
            return log_weights(m.model, m.guide, test, 1)[0]

    before = held_out_elbo()
    loc_before = m.encode(test)[0].detach()
    fit(m, train, epochs=10, batch_size=100, lr=3e-3, seed=0, device="cpu", progress=False)
    diff = held_out_elbo() - before
    assert float(diff.mean()) > 4 * _paired_se(diff)
    # the guide learned to invert the decoder: its mean tracks the z that generated x
    err_before = (loc_before - z_test).abs().median()
    err_after = (m.encode(test)[0].detach() - z_test).abs().median()
    assert err_after < 0.5 * err_before and err_after < 0.3
    with pytest.raises(ValueError, match="columns"):
        m.check_data(torch.zeros(3, 3))


# ------------------------------------------------------------------------------------ device
@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("prior", PRIORS)
def test_moves_to_cuda(prior):
    m = _small(prior, "gaussian").to("cuda")
    for name, t in list(m.named_parameters()) + list(m.named_buffers()):
        assert t.is_cuda, name
    x, mask = torch.randn(7, 6, device="cuda"), _mask().cuda()
    terms = trace_log_terms(m.model, m.guide, x, 3, mask=mask)
    assert terms.log_weights.is_cuda and torch.isfinite(terms.log_weights).all()
    (-terms.log_weights.mean()).backward()
    assert all(p.grad is not None and p.grad.is_cuda for p in m.parameters())
    assert m.sample(4).is_cuda and m.reconstruct(x).is_cuda
    lecture = LectureDLVM().to("cuda")
    assert lecture.sample(5).is_cuda
    assert torch.isfinite(log_weights(lecture.model, lecture.guide, lecture.sample(5), 2)).all()


def test_two_dlvms_do_not_share_parameters_outside_an_isolated_store():
    from pyro_lvm.inference.importance_weights import log_weights

    x = torch.bernoulli(torch.full((6, 12), 0.5))
    a = DLVM(12, 2, hidden=(8,))
    b = DLVM(12, 2, hidden=(8,))
    log_weights(a.model, a.guide, x, 2)
    log_weights(b.model, b.guide, x, 2)
    pa = dict(a.named_parameters())
    pb = dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    assert all(pa[k].data_ptr() != pb[k].data_ptr() for k in pa)
    assert not torch.equal(pa["decoder.0.weight"], pb["decoder.0.weight"])
