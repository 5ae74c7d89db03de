"""check_contract accepts pairs that keep the model/guide contract and names what is wrong
with pairs that do not (one distinct message per kind of violation)."""
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_lvm.inference.contract import ContractError, ContractReport, check_contract

N, P, D = 7, 3, 2


@pytest.fixture
def x():
    return torch.randn(N, P)


# ---- a hand-written user pair that keeps the contract -------------------------------------

def good_model(x, mask=None):
    loading = pyro.param("loading", torch.full((D, P), 0.1))
    with pyro.plate("data", x.shape[0], dim=-1):
        z = pyro.sample("z", dist.Normal(x.new_zeros(D), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ loading, 1.0).to_event(1), obs=x)


def good_guide(x, mask=None):
    weight = pyro.param("weight", torch.zeros(P, D))
    with pyro.plate("data", x.shape[0], dim=-1):
        pyro.sample("z", dist.Normal(x @ weight, 1.0).to_event(1))


def test_good_user_pair_passes_and_reports(x):
    report = check_contract((good_model, good_guide), x)
    assert isinstance(report, ContractReport)
    assert report.latent_sites == {"z": (D,)}
    assert report.observed_sites == {"x": (P,)}
    assert report.reparameterized and report.non_reparameterized_sites == ()
    assert report.data_size == N
    text = str(report)
    assert "'z'" in text and "'x'" in text and "Normal" in text and f"size {N}" in text
    # the check leaves nothing in the global parameter store
    assert len(pyro.get_param_store()) == 0


def test_model_plus_guide_keyword_and_mask_are_accepted(x):
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[0, 1] = False
    report = check_contract(good_model, x, mask, guide=good_guide)
    assert report.latent_sites == {"z": (D,)}


@pytest.mark.parametrize("cls_name", ["PPCA", "FactorAnalysis"])
def test_linear_models_keep_the_contract(cls_name, x):
    linear = pytest.importorskip("models.linear")
    model = getattr(linear, cls_name)(P, D)
    report = check_contract(model, x)
    assert report.latent_sites == {"z": (D,)}
    assert report.observed_sites == {"x": (P,)}
    assert report.reparameterized


# ---- broken pairs: one per kind of violation -----------------------------------------------

def no_plate_model(x, mask=None):
    z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], D), 1.0).to_event(2))
    pyro.sample("x", dist.Normal(z @ torch.ones(D, P), 1.0).to_event(2), obs=x)


def no_plate_guide(x, mask=None):
    pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], D), 1.0).to_event(2))


def plate_named(name, size=None, dim=-1):
    def model(x, mask=None):
        with pyro.plate(name, size or x.shape[0], dim=dim):
            z = pyro.sample("z", dist.Normal(x.new_zeros(D), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ torch.ones(D, P), 1.0).to_event(1), obs=x)

    def guide(x, mask=None):
        with pyro.plate(name, size or x.shape[0], dim=dim):
            pyro.sample("z", dist.Normal(x.new_zeros(D), 1.0).to_event(1))

    return model, guide


def global_latent_model(x, mask=None):
    scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", x.shape[0], dim=-1):
        z = pyro.sample("z", dist.Normal(x.new_zeros(D), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ torch.ones(D, P), scale).to_event(1), obs=x)


def global_latent_guide(x, mask=None):
    pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    good_guide(x)


def extra_latent_model(x, mask=None):
    with pyro.plate("data", x.shape[0], dim=-1):
        z = pyro.sample("z", dist.Normal(x.new_zeros(D), 1.0).to_event(1))
        u = pyro.sample("u", dist.Normal(x.new_zeros(P), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ torch.ones(D, P) + u, 1.0).to_event(1), obs=x)


def extra_latent_guide(x, mask=None):
    with pyro.plate("data", x.shape[0], dim=-1):
        pyro.sample("z", dist.Normal(x.new_zeros(D), 1.0).to_event(1))
        pyro.sample("w", dist.Normal(x.new_zeros(P), 1.0).to_event(1))


def unobserved_model(x, mask=None):
    with pyro.plate("data", x.shape[0], dim=-1):
        pyro.sample("z", dist.Normal(x.new_zeros(D), 1.0).to_event(1))


def no_to_event_model(x, mask=None):
    with pyro.plate("data", x.shape[0], dim=-1):
        z = pyro.sample("z", dist.Normal(x.new_zeros(D), 1.0).to_event(1))
        # Normal over [n, P] without .to_event(1): batch shape (n, P), the data plate at the
        # right dim only by accident of broadcasting rules
        pyro.sample("x", dist.Normal(z @ torch.ones(D, P), 1.0), obs=x)


def non_broadcasting_model(x, mask=None):
    loading = torch.ones(P, D)
    with pyro.plate("data", x.shape[0], dim=-1):
        z = pyro.sample("z", dist.Normal(x.new_zeros(D), 1.0).to_event(1))
        loc = torch.mm(loading, z.reshape(-1, D).T).T.reshape(x.shape)  # assumes z is [n, D]
        pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)


def discrete_model(x, mask=None):
    with pyro.plate("data", x.shape[0], dim=-1):
        z = pyro.sample("z", dist.Bernoulli(x.new_full((D,), 0.5)).to_event(1))
        pyro.sample("x", dist.Normal(z @ torch.ones(D, P), 1.0).to_event(1), obs=x)


def discrete_guide(x, mask=None):
    with pyro.plate("data", x.shape[0], dim=-1):
        pyro.sample("z", dist.Bernoulli(x.new_full((D,), 0.3)).to_event(1))


def positive_model(x, mask=None):
    with pyro.plate("data", x.shape[0], dim=-1):
        z = pyro.sample("z", dist.LogNormal(x.new_zeros(D), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ torch.ones(D, P), 1.0).to_event(1), obs=x)


def shifted_model(shift, truncate=False):
    """``good_model`` with the decoder's mean ``loc`` replaced by ``loc - shift(loc)``; with
    ``truncate``, rows whose first column is not positive get a scale of 1e-30 (log weight
    -inf in float32)."""
    def model(x, mask=None):
        loading = pyro.param("loading", torch.full((D, P), 0.1))
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", dist.Normal(x.new_zeros(D), 1.0).to_event(1))
            loc = z @ loading
            loc = loc if shift is None else loc - shift(loc)
            if truncate:
                scale = torch.where(x[..., :1] > 0, 1.0, 1e-30).expand(x.shape)
                pyro.sample("x", dist.Normal(loc, scale).to_event(1), obs=x.abs() + 1)
            else:
                pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)
    return model


# centres the decoder's mean over dim 0: the rows without a particle dim, the particles with
# one; every shape check passes
dim0_model = shifted_model(lambda loc: loc.mean(0))
# centres it over the data rows: row i's density depends on the others
row_mixing_model = shifted_model(lambda loc: loc.mean(-2, keepdim=True))


def particle_folding_model(x, mask=None):
    """``good_model`` whose decoder reads ``z.reshape(-1, D)[:n]``: with K particles every
    particle is scored on particle 0's latents; with one particle (with or without the
    particle plate) it is ``good_model``, so every shape check passes."""
    loading = pyro.param("loading", torch.full((D, P), 0.1))
    with pyro.plate("data", x.shape[0], dim=-1):
        z = pyro.sample("z", dist.Normal(x.new_zeros(D), 1.0).to_event(1))
        folded = z.reshape(-1, D)[: x.shape[0]]
        pyro.sample("x", dist.Normal(folded @ loading, 1.0).to_event(1), obs=x)


def scaled_model(scale):
    """``good_model`` with its observed site inside ``poutine.scale(scale=scale)``."""
    def model(x, mask=None):
        loading = pyro.param("loading", torch.full((D, P), 0.1))
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", dist.Normal(x.new_zeros(D), 1.0).to_event(1))
            with pyro.poutine.scale(scale=scale):
                pyro.sample("x", dist.Normal(z @ loading, 1.0).to_event(1), obs=x)
    return model


def subsampled_pair(x_rows):
    """``good_model`` / ``good_guide`` whose data plate has twice as many rows as x and takes
    x's rows as its subsample (each site then has scale 2)."""
    def model(x, mask=None):
        loading = pyro.param("loading", torch.full((D, P), 0.1))
        with pyro.plate("data", 2 * x_rows, subsample=torch.arange(x_rows)):
            z = pyro.sample("z", dist.Normal(x.new_zeros(D), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ loading, 1.0).to_event(1), obs=x)

    def guide(x, mask=None):
        weight = pyro.param("weight", torch.zeros(P, D))
        with pyro.plate("data", 2 * x_rows, subsample=torch.arange(x_rows)):
            pyro.sample("z", dist.Normal(x @ weight, 1.0).to_event(1))
    return model, guide


def model_without_mask(x):
    good_model(x)


def guide_without_mask(x):
    good_guide(x)


BROKEN = {
    "no data plate": ((no_plate_model, no_plate_guide), r"no plate named 'data'.*no plate at all"),
    "plate with another name": (plate_named("batch"), r"no plate named 'data'.*found plate\(s\) \['batch'\]"),
    "plate of wrong size": (plate_named("data", size=N + 1), r"has size 8 but x has 7 rows"),
    "plate at the wrong dim": (plate_named("data", dim=-2), r"is at dim=-2; it must be dim=-1"),
    "latent outside the plate": ((global_latent_model, global_latent_guide),
                                 r"latent site 'scale' in the guide is outside pyro.plate\('data'\)"),
    "latent missing in the guide": ((extra_latent_model, good_guide),
                                    r"latent site\(s\) \['u'\] in the model have no counterpart in the guide"),
    "latent missing in the model": ((good_model, extra_latent_guide),
                                    r"latent site\(s\) \['w'\] in the guide have no latent counterpart"),
    "no observed site": ((unobserved_model, good_guide), r"the model has no observed site"),
    "missing to_event": ((no_to_event_model, good_guide),
                         r"site 'x' in the model has a batch shape that clashes with pyro.plate\('data'\).*\.to_event"),
    "no particle broadcasting": ((non_broadcasting_model, good_guide),
                                 r"does not broadcast with a particle dimension on the left"),
    "reads the particle dim": ((dim0_model, good_guide),
                               r"row 0 has log weight \S+ with a particle plate of size 1 on the left "
                               r"and \S+ without it .*the pair reads the particle dim"),
    "mixes rows": ((row_mixing_model, good_guide),
                   r"the model mixes rows: row 0's log p\(x, z\) is \S+ in a batch of all 7 "
                   r"rows and \S+ in a batch of rows 0-2 only \(the same latent values\)"),
    "mixes particles": ((particle_folding_model, good_guide),
                        r"the model mixes particles: row 0's log p\(x, z\) for particle 1 is \S+ "
                        r"when 2 particles run vectorized .* and \S+ when particle 1's latent "
                        r"values are scored alone"),
    "scaled site": ((scaled_model(0.5), good_guide),
                    r"site 'x' in the model has scale 0.5 \(a poutine.scale"),
    "subsampling data plate": (subsampled_pair(N),
                               r"site 'z' in the guide has scale 2, set by its subsampling "
                               r"plate\(s\) 'data' \(7 of 14\)"),
    "not reparameterized": ((discrete_model, discrete_guide),
                            r"latent site\(s\) \['z'\] in the guide use distribution\(s\) \['Bernoulli'\] without rsample"),
    "guide support wider than the prior's": ((positive_model, good_guide),
                                             r"latent site 'z': the guide's Normal has support"),
}


@pytest.mark.parametrize("pair", [(model_without_mask, good_guide), (good_model, guide_without_mask),
                                  (model_without_mask, guide_without_mask)])
def test_mask_is_optional_unless_values_are_missing(pair, x):
    # fully observed data: a pair written model(x) / guide(x) keeps the contract
    assert check_contract(pair, x).latent_sites == {"z": (D,)}
    assert check_contract(pair, x, torch.ones_like(x, dtype=torch.bool)).data_size == N
    # missing values: the error says the pair must accept mask
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[2, 1] = False
    role = "model" if pair[0] is model_without_mask else "guide"
    with pytest.raises(ContractError, match=rf"1 missing value.*the {role} \S*without_mask takes "
                                            rf"no mask: a pair must accept `mask`"):
        check_contract(pair, x, mask)


@pytest.mark.parametrize("kind", list(BROKEN))
def test_broken_pair_is_rejected_with_its_own_message(kind, x):
    pair, message = BROKEN[kind]
    with pytest.raises(ContractError, match=message):
        check_contract(pair, x)
    assert len(pyro.get_param_store()) == 0


def test_missing_to_event_is_found_when_pyro_cannot_see_it():
    # With as many columns as rows, the forgotten .to_event(1) broadcasts silently in Pyro's
    # plate check; the batch-shape check still catches it.
    square = torch.randn(N, N)

    def square_model(x, mask=None):
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", dist.Normal(x.new_zeros(D), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ torch.ones(D, N), 1.0), obs=x)

    def square_guide(x, mask=None):
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", dist.Normal(x[..., :D], 1.0).to_event(1))

    with pytest.raises(ContractError, match=r"site 'x' in the model has batch shape \(7, 7\)"
                                            r".*the data plate must be the only batch dimension"):
        check_contract((square_model, square_guide), square)


def test_messages_are_distinct(x):
    messages = {}
    for kind, (pair, _) in BROKEN.items():
        with pytest.raises(ContractError) as info:
            check_contract(pair, x)
        messages[kind] = str(info.value).split(":")[0]
    assert len(set(messages.values())) >= 10, messages


def test_contract_error_is_a_value_error():
    assert issubclass(ContractError, ValueError)


def test_non_reparameterized_guide_allowed_when_not_required(x):
    report = check_contract((discrete_model, discrete_guide), x, require_reparameterized=False)
    assert not report.reparameterized
    assert report.non_reparameterized_sites == ("z",)
    assert "[no rsample]" in str(report)


def test_support_check_can_be_disabled(x):
    with pyro.validation_enabled(False):  # else torch rejects the out-of-support draws itself
        report = check_contract((positive_model, good_guide), x, check_support=False)
    assert report.latent_sites == {"z": (D,)}


def test_a_crashing_model_is_reported_with_its_role(x):
    def crashing_model(x, mask=None):
        raise RuntimeError("boom")

    with pytest.raises(ContractError, match=r"running the model .* failed with RuntimeError: boom"):
        check_contract((crashing_model, good_guide), x)


def test_mixture_prior_on_the_real_line_accepts_a_normal_guide(x):
    def mixture_model(x, mask=None):
        components = dist.Normal(torch.tensor([[-2.0] * D, [2.0] * D]), 1.0).to_event(1)
        prior = dist.MixtureSameFamily(dist.Categorical(torch.ones(2)), components)
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", prior)
            pyro.sample("x", dist.Normal(z @ torch.ones(D, P), 1.0).to_event(1), obs=x)

    assert check_contract((mixture_model, good_guide), x).latent_sites == {"z": (D,)}


def test_non_tensor_input_is_rejected():
    with pytest.raises(ContractError, match="x must be a torch.Tensor"):
        check_contract((good_model, good_guide), [[1.0, 2.0, 3.0]])


def _dropout_model(centred):
    # dropout draws its mask from torch's generator, outside pyro.sample
    dropout = torch.nn.Dropout(0.5)

    def model(x, mask=None):
        loading = pyro.param("loading", torch.full((D, P), 0.1))
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", dist.Normal(x.new_zeros(D), 1.0).to_event(1))
            loc = dropout(z) @ loading
            loc = loc - loc.mean(0) if centred else loc
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)
    return model


def test_randomness_outside_the_sample_sites_is_the_same_in_both_runs(x):
    # the runs with and without the particle plate draw the same random numbers, dropout's
    # included: a pair with dropout passes, and one with dropout that reads dim 0 is refused
    assert check_contract((_dropout_model(False), good_guide), x).latent_sites == {"z": (D,)}
    with pytest.raises(ContractError, match="the pair reads the particle dim"):
        check_contract((_dropout_model(True), good_guide), x)


def test_guides_scored_on_their_own_draws_pass(x):
    # a flow without an inverse (planar) scores its draws from its cache, and a Delta site that
    # is a function of another latent is recomputed in each run: both keep the contract
    import torch.nn as nn
    from pyro.distributions import transforms

    class PlanarGuided(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.flow = nn.Linear(P, 2 * D), transforms.planar(D)
            self.f = nn.Sequential(nn.Linear(D, 32), nn.Tanh(), nn.Linear(32, D))

        def model(self, x, mask=None):
            pyro.module("pair", self)
            with pyro.plate("data", x.shape[0], dim=-1):
                z = pyro.sample("z", dist.Normal(x.new_zeros(D), 1.0).to_event(1))
                h = pyro.sample("h", dist.Normal(self.f(z), 1.0).to_event(1))
                pyro.sample("x", dist.Normal(h @ torch.full((D, P), 0.1), 1.0).to_event(1),
                            obs=x)

        def guide(self, x, mask=None):
            pyro.module("pair", self)
            loc, log_scale = self.enc(x).chunk(2, -1)
            with pyro.plate("data", x.shape[0], dim=-1):
                z = pyro.sample("z", dist.TransformedDistribution(
                    dist.Normal(loc, log_scale.exp()).to_event(1), [self.flow]))
                pyro.sample("h", dist.Delta(self.f(z), event_dim=1))

    torch.manual_seed(0)
    pair = PlanarGuided()
    for rows in (1, 2, 3, N):
        report = check_contract(pair, x[:rows])
        assert report.data_size == rows


def test_fit_rejects_a_pair_that_reads_the_particle_dim(x):
    from pyro_lvm import ELBO, fit

    with pytest.raises(ContractError, match="the pair reads the particle dim"):
        fit((dim0_model, good_guide), torch.randn(40, P), objective=ELBO(), epochs=1,
            batch_size=20, progress=False, device="cpu")


def test_the_particle_comparison_accepts_equal_infinite_log_weights(x):
    # rows outside the model's support have log weight -inf with and without the particle dim:
    # the same number, not a difference (nor a sign of hidden randomness, which would skip the
    # comparison and let the centred variant through)
    def truncated(centred):
        return shifted_model((lambda loc: loc.mean(0)) if centred else None, truncate=True)

    x = x.clone()
    x[:3, 0], x[3:, 0] = -1.0, 1.0  # three rows outside the support
    with pyro.validation_enabled(False):
        assert check_contract((truncated(False), good_guide), x).data_size == N
        with pytest.raises(ContractError, match="the pair reads the particle dim"):
            check_contract((truncated(True), good_guide), x)


def test_the_row_check_leaves_out_what_it_cannot_compare(x):
    # one row; a model with one parameter per training row (it cannot run on fewer rows); a
    # model with dropout (two runs differ): none is refused by the row check
    def per_row_model(x, mask=None):
        shift = pyro.param("shift", torch.zeros(N, P))
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", dist.Normal(x.new_zeros(D), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ torch.full((D, P), 0.1) + shift, 1.0).to_event(1),
                        obs=x)

    assert check_contract((row_mixing_model, good_guide), x[:1]).data_size == 1
    assert check_contract((per_row_model, good_guide), x).data_size == N
    assert check_contract((_dropout_model(False), good_guide), x).data_size == N


def test_a_model_that_reads_an_earlier_row_is_refused(x):
    # row i depends on row 0: the first half alone agrees with the batch, the second does not
    first_row_model = shifted_model(lambda loc: loc[..., :1, :])

    with pytest.raises(ContractError, match=r"the model mixes rows: row 3's .* rows 3-6 only"):
        check_contract((first_row_model, good_guide), x)


def test_rounding_of_a_smaller_batch_is_not_row_mixing():
    # a row-wise float32 Gaussian with scale 1e-3 on rows a little off its mean: a matrix
    # product rounds each row differently in a batch of one, and the small scale magnifies it
    # to about 1.2e-4 of the row's log density terms (a refusal at a tolerance of 1e-4)
    import torch.nn as nn

    data_dim, latent_dim, sigma = 50, 2, 1e-3

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.g = nn.Sequential(nn.Linear(latent_dim, 64), nn.Tanh(), nn.Linear(64, 64),
                                   nn.Tanh(), nn.Linear(64, data_dim - latent_dim))

        def mean(self, z):
            return torch.cat([z, self.g(z)], -1)

        def model(self, x, mask=None):
            pyro.module("pair", self)
            with pyro.plate("data", x.shape[0], dim=-1):
                z = pyro.sample("z", dist.Normal(x.new_zeros(latent_dim), 1.0).to_event(1))
                pyro.sample("x", dist.Normal(self.mean(z), sigma).to_event(1), obs=x)

        def guide(self, x, mask=None):
            pyro.module("pair", self)
            with pyro.plate("data", x.shape[0], dim=-1):
                pyro.sample("z", dist.Normal(x[:, :latent_dim], 1e-7).to_event(1))

    torch.manual_seed(0)
    pair = Pair()
    generator = torch.Generator().manual_seed(10)
    z = torch.randn(2, latent_dim, generator=generator)
    with torch.no_grad():
        x = pair.mean(z) + 3.5 * sigma * torch.randn(2, data_dim, generator=generator)
    pyro.set_rng_seed(10)
    assert check_contract(pair, x).data_size == 2


def test_a_row_mixing_model_is_refused_by_fit_before_any_step():
    from pyro_lvm import ELBO, fit

    with pytest.raises(ContractError, match="the model mixes rows"):
        fit((row_mixing_model, good_guide), torch.randn(40, P), objective=ELBO(), epochs=1,
            batch_size=20, progress=False, device="cpu")


def test_a_particle_mixing_model_is_refused_by_fit_before_any_step():
    from pyro_lvm import IWAE, fit

    with pytest.raises(ContractError, match="the model mixes particles"):
        fit((particle_folding_model, good_guide), torch.randn(40, P), objective=IWAE(5),
            epochs=1, batch_size=20, progress=False, device="cpu")


def test_the_particle_check_leaves_out_randomness_outside_the_sample_sites(x):
    # dropout draws other masks when a particle is scored alone: not compared, not refused
    assert check_contract((_dropout_model(False), good_guide), x).data_size == N


def test_a_unit_scale_passes_and_any_other_is_refused(x):
    assert check_contract((scaled_model(1.0), good_guide), x).data_size == N
    for scale in (2.0, torch.tensor(0.5), torch.full((N,), 0.5)):
        with pytest.raises(ContractError, match=r"site 'x' in the model has scale"):
            check_contract((scaled_model(scale), good_guide), x)


# ---- evaluation runs the same checks ------------------------------------------------------

@pytest.mark.parametrize("kind", ["missing to_event", "mixes particles", "scaled site",
                                  "subsampling data plate", "mixes rows",
                                  "reads the particle dim"])
def test_evaluation_refuses_what_check_contract_refuses_before_any_draw(kind, x):
    from pyro_lvm import elbo, log_likelihood

    (model, guide), message = BROKEN[kind]
    with pyro.get_param_store().scope():
        check = _params_created(model, guide, x)  # as after a user's own training
        for evaluate in (log_likelihood, elbo):
            before = torch.get_rng_state()
            with pytest.raises(ContractError, match=message):
                evaluate((model, guide), x, num_samples=4, progress=False)
            assert torch.equal(torch.get_rng_state(), before)
        assert check


def test_evaluation_does_not_need_a_reparameterized_guide(x):
    # a guide without rsample biases no importance-sampling estimate
    from pyro_lvm import log_likelihood

    with pyro.get_param_store().scope():
        _params_created(discrete_model, discrete_guide, x)
        estimate = log_likelihood((discrete_model, discrete_guide), x, num_samples=8,
                                  progress=False)
    assert len(estimate.per_row) == N


def _params_created(model, guide, x):
    """Run the pair once outside any check (its pyro.param values enter the active store)."""
    try:
        guide(x)
        model(x)
    except Exception:  # noqa: BLE001 - a broken pair may fail; its params exist by then
        pass
    return True


def test_evaluation_names_a_data_plate_under_another_name(x):
    from pyro_lvm import log_likelihood
    from pyro_lvm.inference.pairs import PairError

    model, guide = plate_named("batch")
    with pyro.get_param_store().scope():
        _params_created(model, guide, x)
        with pytest.raises(PairError, match=r"latent site 'z' in the guide is inside "
                                            r"pyro.plate\(s\) \['batch'\] but not "
                                            r"pyro.plate\('data'\)"):
            log_likelihood((model, guide), x, num_samples=4, progress=False)


def _sharp_gaussian_vae(fold_particles: bool):
    """A float32 VAE with a 2-512-512-784 decoder and a Gaussian likelihood of scale 1e-3 (the
    review's case); ``fold_particles`` reads ``z.reshape(-1, 2)[:n]`` (mixes particles)."""
    import torch.nn as nn

    class VAE(nn.Module):
        def __init__(self):
            super().__init__()
            self.dec = nn.Sequential(nn.Linear(2, 512), nn.Tanh(), nn.Linear(512, 512),
                                     nn.Tanh(), nn.Linear(512, 784))
            self.enc = nn.Linear(784, 2)
            nn.init.zeros_(self.enc.weight)
            nn.init.zeros_(self.enc.bias)

        def model(self, x, mask=None):
            pyro.module("vae", self)
            with pyro.plate("data", x.shape[0], dim=-1):
                z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
                z = z.reshape(-1, 2)[: x.shape[0]] if fold_particles else z
                pyro.sample("x", dist.Normal(self.dec(z), 1e-3).to_event(1), obs=x)

        def guide(self, x, mask=None):
            pyro.module("vae", self)
            with pyro.plate("data", x.shape[0], dim=-1):
                pyro.sample("z", dist.Normal(self.enc(x), 1e-3).to_event(1))

    return VAE()


@pytest.mark.parametrize("rows,seed", [(1, 0), (2, 3), (5, 2), (6, 0), (7, 1)])
def test_rounding_magnified_by_a_sharp_likelihood_is_not_mixing(rows, seed):
    # each row's log p(x | z) is near 0 (the quadratic term cancels -log sigma), so a tolerance
    # relative to the log densities is tiny, while a matrix product over 2 particles or half
    # the rows rounds the decoder's mean differently and 1/sigma^2 magnifies it (review: 5e-3
    # between 2 and 1 particles): refused before the tolerance took the likelihood's
    # sensitivity to its mean into account
    import math

    torch.manual_seed(seed)
    pair = _sharp_gaussian_vae(fold_particles=False)
    with torch.no_grad():
        mean = pair.dec(torch.zeros(2))
        residual = 1e-3 * math.sqrt(2 * (-math.log(1e-3) - 0.5 * math.log(2 * math.pi)))
        x = mean + residual * torch.sign(torch.randn(rows, 784))
    assert check_contract(pair, x).data_size == rows
    if rows > 1:  # the tolerance does not hide real mixing in the same sharp model
        folded = _sharp_gaussian_vae(fold_particles=True)
        folded.load_state_dict(pair.state_dict())
        with pytest.raises(ContractError, match="the model mixes particles"):
            check_contract(folded, x)
