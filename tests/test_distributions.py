"""models/distributions.py: the lean Normal log densities equal torch's Normal (values and
gradients, expanded and not), keep their class through expand / to_event, and give the
closed-form KL of torch's registry; the Bernoulli event log density (one autograd node) equals
torch's binary cross-entropy in value, gradient and second derivative, in every broadcasting
direction."""
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
import torch.nn.functional as F

import pyro_lvm.models.distributions as distributions
from pyro_lvm.models.distributions import (BinaryBernoulli, DiagonalNormal, EventIndependent,
                                            IndependentBinaryBernoulli, IndependentDiagonalNormal,
                                            StandardNormal, binary_bernoulli_event_log_prob,
                                            normal_event_log_prob)


def test_diagonal_normal_log_prob_and_gradients_equal_torch_normal():
    torch.manual_seed(0)
    loc = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(7, 3, dtype=torch.float64).add(0.1).requires_grad_()
    value = torch.randn(5, 7, 3, dtype=torch.float64)
    ours = DiagonalNormal(loc, scale).expand([5, 7, 3]).log_prob(value)
    ref = dist.Normal(loc, scale).expand([5, 7, 3]).log_prob(value)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    g_ours = torch.autograd.grad(ours.sum(), (loc, scale))
    g_ref = torch.autograd.grad(ref.sum(), (loc, scale))
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_standard_normal_log_prob_equals_torch_and_checks_its_parameters():
    torch.manual_seed(1)
    z = torch.randn(4, 6, 2, dtype=torch.float64, requires_grad=True)
    ours = StandardNormal(torch.zeros(2, dtype=torch.float64),
                          torch.ones(2, dtype=torch.float64)).to_event(1)
    ref = dist.Normal(torch.zeros(2, dtype=torch.float64), 1.0).to_event(1)
    torch.testing.assert_close(ours.log_prob(z), ref.log_prob(z), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(ours.log_prob(z).sum(), z)[0], -z)
    with pyro.validation_enabled(True), pytest.raises(ValueError, match="loc 0 and scale 1"):
        StandardNormal(torch.zeros(2), 2 * torch.ones(2)).log_prob(torch.zeros(2))


def test_expand_keeps_the_class_and_kl_uses_the_closed_form():
    q = DiagonalNormal(torch.tensor([0.5, -1.0]), torch.tensor([0.3, 2.0]))
    p = StandardNormal(torch.zeros(2), torch.ones(2))
    assert type(q.expand([4, 2])) is DiagonalNormal
    assert type(p.expand([4, 2])) is StandardNormal
    kl = torch.distributions.kl_divergence(q, p)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(q.loc, q.scale),
                                            torch.distributions.Normal(0.0, 1.0))
    torch.testing.assert_close(kl, ref)


def _bce_event_log_prob(logits, x):
    """The reference: torch's binary cross-entropy with logits, summed over the last dim."""
    shape = torch.broadcast_shapes(logits.shape, x.shape)
    return -F.binary_cross_entropy_with_logits(logits.expand(shape), x.expand(shape),
                                               reduction="none").sum(-1)


@pytest.mark.parametrize("logits_shape, x_shape", [
    ((4, 5, 30), (5, 30)),      # particles on the logits, data broadcast (the objectives' case)
    ((5, 30), (4, 5, 30)),      # the logits broadcast against the values
    ((4, 5, 30), (4, 5, 30)),
    ((1, 5, 30), (4, 1, 30)),   # both broadcast
])
def test_bernoulli_event_log_prob_value_and_gradients_equal_torch_bce(logits_shape, x_shape):
    g = torch.Generator().manual_seed(2)
    logits = (8 * torch.randn(logits_shape, generator=g, dtype=torch.float64)).requires_grad_()
    x = (torch.rand(x_shape, generator=g, dtype=torch.float64) < 0.4).double()
    ours = binary_bernoulli_event_log_prob(logits, x)
    ref = _bce_event_log_prob(logits, x)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    weights = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    (g_ours,) = torch.autograd.grad((weights * ours).sum(), logits)
    (g_ref,) = torch.autograd.grad((weights * ref).sum(), logits)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda l: binary_bernoulli_event_log_prob(l, x[..., :4]),
                                    (logits.detach()[..., :4].clone().requires_grad_(),))


def test_bernoulli_event_log_prob_second_derivative_and_fallbacks():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    x = (torch.rand(4, 6, generator=g, dtype=torch.float64) < 0.5).double()
    assert torch.autograd.gradgradcheck(lambda l: binary_bernoulli_event_log_prob(l, x),
                                        (logits,))
    # a value that requires a gradient, and torch.func transforms, take the plain formula
    xg = x.clone().requires_grad_()
    torch.testing.assert_close(binary_bernoulli_event_log_prob(logits, xg),
                               _bce_event_log_prob(logits, x))
    per_sample = torch.func.vmap(
        torch.func.grad(lambda l: binary_bernoulli_event_log_prob(l, x).sum()))(logits.detach())
    torch.testing.assert_close(per_sample, (x - torch.sigmoid(logits)).detach())
    # positive control: the reference tells a sign error apart
    assert not torch.allclose(binary_bernoulli_event_log_prob(-logits, x),
                              _bce_event_log_prob(logits, x))


def test_binary_bernoulli_to_event_keeps_the_fused_class_and_pyros_semantics():
    g = torch.Generator().manual_seed(4)
    logits = 5 * torch.randn(4, 5, 30, generator=g)
    x = (torch.rand(5, 30, generator=g) < 0.5).float()
    d = BinaryBernoulli(logits=logits).to_event(1)
    assert type(d) is IndependentBinaryBernoulli and d.event_shape == (30,)
    assert BinaryBernoulli(logits=logits).to_event(0).__class__ is BinaryBernoulli
    expanded = BinaryBernoulli(logits=logits[0]).to_event(1).expand([4, 5])
    assert type(expanded) is IndependentBinaryBernoulli and expanded.batch_shape == (4, 5)
    ref = dist.Bernoulli(logits=logits).to_event(1).log_prob(x)
    torch.testing.assert_close(d.log_prob(x), ref, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(expanded.log_prob(x), ref[:1].expand(4, 5) * 0
                               + dist.Bernoulli(logits=logits[0]).to_event(1).log_prob(x),
                               rtol=1e-6, atol=1e-4)
    # to_event(2) = to_event(1).to_event(1): the event sum over two dims
    both = BinaryBernoulli(logits=logits).to_event(2)
    assert type(both) is IndependentBinaryBernoulli and both.event_shape == (5, 30)
    torch.testing.assert_close(both.log_prob(x), ref.sum(-1), rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(d.to_event(1).log_prob(x), ref.sum(-1), rtol=1e-6, atol=1e-3)
    # masking stays Pyro's (entries outside the mask contribute 0)
    mask = torch.rand(5, 30, generator=g) < 0.7
    masked = BinaryBernoulli(logits=logits).mask(mask).to_event(1).log_prob(x)
    torch.testing.assert_close(masked, dist.Bernoulli(logits=logits).mask(mask).to_event(1)
                               .log_prob(x), rtol=1e-6, atol=1e-4)
    with pyro.validation_enabled(True), pytest.raises(ValueError):
        BinaryBernoulli(logits=logits, validate_args=True).to_event(1).log_prob(
            torch.full((5, 30), 0.5))


def test_bernoulli_event_log_prob_keeps_the_graph_of_tensor_subclasses_and_odd_values():
    from pyro.ops.provenance import ProvenanceTensor

    g = torch.Generator().manual_seed(5)
    w = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    # TraceGraph_ELBO wraps values downstream of a non-reparameterized site in ProvenanceTensor
    logits = w * ProvenanceTensor(torch.randn(3, generator=g, dtype=torch.float64),
                                  frozenset({"c"}))
    out = binary_bernoulli_event_log_prob(logits, x)
    assert out.requires_grad
    (grad,) = torch.autograd.grad(out, w)
    (ref,) = torch.autograd.grad(_bce_event_log_prob(w * logits.detach() / w.detach(), x), w)
    torch.testing.assert_close(grad, ref)
    # a bool or Python-number value is a 0/1 value of the logits' dtype
    plain = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    flags = torch.tensor([True, False, True])
    (g_bool,) = torch.autograd.grad(binary_bernoulli_event_log_prob(plain, flags).sum(), plain)
    (g_ref,) = torch.autograd.grad(_bce_event_log_prob(plain, flags.double()).sum(), plain)
    torch.testing.assert_close(g_bool, g_ref)
    with pyro.validation_enabled(False):  # (with validation on, torch asks for a tensor)
        torch.testing.assert_close(BinaryBernoulli(logits=plain).to_event(1).log_prob(1.0),
                                   _bce_event_log_prob(plain, torch.ones(3, dtype=torch.float64)))
    d = BinaryBernoulli(logits=plain).to_event(1)
    with pytest.raises(ValueError, match="Cannot remove event dimensions"):
        d.to_event(-2)
    assert type(d.to_event(-1)) is BinaryBernoulli


def test_tracegraph_elbo_gradients_through_a_non_reparameterized_guide_site():
    """Pyro's TraceGraph_ELBO (the ELBO for guides with discrete sites) gives the same
    gradients with BinaryBernoulli as with Pyro's Bernoulli (positive control: it needs them)."""
    g = torch.Generator().manual_seed(6)
    x = (torch.rand(5, 4, generator=g) < 0.5).float()

    def grads(bernoulli):
        pyro.clear_param_store()
        w = pyro.param("w", torch.randn(3, 4, generator=torch.Generator().manual_seed(7)))
        probs = pyro.param("probs", torch.full((3,), 1 / 3),
                           constraint=dist.constraints.simplex)

        def model(x):
            with pyro.plate("data", x.shape[0]):
                c = pyro.sample("c", dist.Categorical(torch.full((3,), 1 / 3)))
                pyro.sample("x", bernoulli(logits=pyro.param("w")[c]).to_event(1), obs=x)

        def guide(x):
            with pyro.plate("data", x.shape[0]):
                pyro.sample("c", dist.Categorical(pyro.param("probs")))

        pyro.set_rng_seed(0)
        loss = pyro.infer.TraceGraph_ELBO().loss_and_grads(model, guide, x)
        return loss, w.unconstrained().grad.clone(), probs.unconstrained().grad.clone()

    ours, ref = grads(BinaryBernoulli), grads(dist.Bernoulli)
    assert ours[0] == pytest.approx(ref[0], rel=1e-6)
    assert ref[1].abs().sum() > 0
    torch.testing.assert_close(ours[1], ref[1])
    torch.testing.assert_close(ours[2], ref[2])


@pytest.mark.parametrize("logits_shape, x_shape, chunk_bytes", [
    ((50, 100, 784), (100, 784), None),   # IWAE-50 on a 784-pixel batch: particle chunks
    ((3, 2000, 784), (2000, 784), None),  # long blocks: row chunks inside each particle
    ((7, 5, 6), (5, 6), 3 * 6 * 8),       # forced: ragged row chunks (5 rows, 3 per chunk)
    ((7, 2, 6), (2, 6), 4 * 6 * 8),       # forced: two particles per chunk, the last one alone
])
def test_chunked_bernoulli_event_sum_is_the_unchunked_formula(monkeypatch, logits_shape, x_shape,
                                                               chunk_bytes):
    if chunk_bytes is not None:
        monkeypatch.setattr(distributions, "_CHUNK_BYTES", chunk_bytes)
    dtype = torch.float32 if chunk_bytes is None else torch.float64
    g = torch.Generator().manual_seed(6)
    logits = (4 * torch.randn(logits_shape, generator=g, dtype=dtype)).requires_grad_()
    x = (torch.rand(x_shape, generator=g, dtype=dtype) < 0.4).to(dtype)
    # positive control: these shapes do take the chunked path, in more than one chunk
    blocks = distributions._particle_blocks(logits.detach(), x)
    assert blocks is not None and len(distributions._chunks(blocks)) > 1
    ours = binary_bernoulli_event_log_prob(logits, x)
    # the same elementwise formula and per-row sums: bit for bit
    assert torch.equal(ours, distributions._binary_log_prob(logits.detach(), x).sum(-1))
    weights = torch.randn(ours.shape, generator=g, dtype=dtype)
    (grad,) = torch.autograd.grad((weights * ours).sum(), logits)
    ref = (x - torch.sigmoid(logits.detach())) * weights.unsqueeze(-1)
    torch.testing.assert_close(grad, ref, rtol=0, atol=2e-7 if dtype == torch.float32 else 1e-15)
    if chunk_bytes is not None:
        assert torch.autograd.gradcheck(lambda l: binary_bernoulli_event_log_prob(l, x),
                                        (logits.detach().clone().requires_grad_(),))
        # positive control: chunks paired with the wrong data rows are seen
        monkeypatch.setattr(distributions, "_particle_blocks",
                            lambda l, v, f=distributions._particle_blocks:
                            (lambda b: (b[0], b[1].roll(1, 0)))(f(l, v)))
        assert not torch.equal(binary_bernoulli_event_log_prob(logits.detach(), x),
                               ours.detach())


def test_small_or_unaligned_logits_take_the_plain_formula():
    x = torch.ones(100, 784)
    assert distributions._particle_blocks(torch.zeros(5, 100, 784), x) is None      # 1.5 MB
    assert distributions._particle_blocks(torch.zeros(50, 100, 784), x[:1]) is None  # broadcast
    assert distributions._particle_blocks(torch.zeros(50, 784, 100).transpose(1, 2), x) is None
    assert distributions._particle_blocks(torch.zeros(50, 100, 784), x.double()) is None
    assert distributions._particle_blocks(torch.zeros(50, 100, 784), x) is not None
    meta = torch.zeros(50, 100, 784, device="meta")  # not on the CPU: no chunks
    assert distributions._particle_blocks(meta, x.to("meta")) is None


def test_expand_to_the_same_shape_returns_the_distribution_and_pyros_plates_keep_it():
    loc, scale = torch.randn(6, 3), torch.rand(6, 3) + 0.1
    q = DiagonalNormal(loc, scale).to_event(1)
    assert type(q) is IndependentDiagonalNormal and isinstance(q, EventIndependent)
    assert q.expand([6]) is q
    assert q.base_dist.expand([6, 3]) is q.base_dist
    wider = q.expand([4, 6])
    assert type(wider) is IndependentDiagonalNormal and type(wider.base_dist) is DiagonalNormal
    assert wider.batch_shape == (4, 6) and wider is not q
    value = torch.randn(4, 6, 3)
    torch.testing.assert_close(wider.log_prob(value),
                               dist.Normal(loc, scale).to_event(1).log_prob(value))
    p = StandardNormal(torch.zeros(3), torch.ones(3)).to_event(1)
    assert type(p) is IndependentDiagonalNormal and p.expand([]) is p
    assert type(p.expand([6])) is IndependentDiagonalNormal and p.expand([6]).batch_shape == (6,)
    b = BinaryBernoulli(logits=torch.randn(6, 5)).to_event(1)
    assert b.expand([6]) is b and b.base_dist.expand([6, 5]) is b.base_dist
    assert type(q.to_event(1)) is IndependentDiagonalNormal and q.to_event(1).event_shape == (6, 3)
    assert q.to_event(-1) is q.base_dist
    with pytest.raises(ValueError, match="Cannot remove event dimensions"):
        DiagonalNormal(loc, scale).to_event(-1)

    def site_fn(d):
        with poutine.trace() as tr, pyro.plate("data", 6):
            pyro.sample("z", d)
        return tr.trace.nodes["z"]["fn"]

    assert site_fn(q) is q                     # the data plate's expand is the identity
    reference = dist.Normal(loc, scale).to_event(1)
    assert site_fn(reference) is not reference  # positive control: Pyro's copies


def test_chunked_bernoulli_gradient_takes_an_expanded_incoming_gradient(monkeypatch):
    """An event sum over more dims (``to_event(2)``: images) hands the event function an
    expanded gradient: the chunked gradient equals the plain formula's bit for bit."""
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(50, 100, 28, 28, generator=g).requires_grad_()  # 15.7 MB: chunked
    x = (torch.rand(100, 28, 28, generator=g) < 0.3).float()

    def grad():
        lp = BinaryBernoulli(logits=logits).to_event(2).log_prob(x)  # [50, 100]
        return torch.autograd.grad(torch.logsumexp(lp, 0).sum(), logits)[0]

    assert distributions._particle_blocks(logits.detach(), x) is not None
    chunked = grad()
    monkeypatch.setattr(distributions, "_CHUNK_BYTES", 1 << 40)
    assert distributions._particle_blocks(logits.detach(), x) is None  # positive control
    assert torch.equal(chunked, grad())


# (loc shape, scale shape, value shape, expand the to_event(1) distribution to)
NORMAL_SHAPES = [((3, 4), (3, 4), (5, 3, 4), (5, 3)),      # a particle plate over a data plate
                 ((3, 4), (4,), (5, 3, 4), (5, 3)),        # one scale for every row
                 ((3, 4), (3, 4), (3, 4), None),           # no expansion
                 ((3, 1), (3, 4), (2, 3, 4), (2, 3)),      # a location broadcasting over events
                 ((3, 4), (3, 1), (2, 3, 4), (2, 3))]      # a scale broadcasting over events


@pytest.mark.parametrize("loc_shape,scale_shape,value_shape,expand", NORMAL_SHAPES)
def test_normal_event_log_prob_value_gradients_and_second_derivatives_equal_torch(
        loc_shape, scale_shape, value_shape, expand):
    torch.manual_seed(0)
    loc = torch.randn(loc_shape, dtype=torch.float64, requires_grad=True)
    scale = (torch.rand(scale_shape, dtype=torch.float64) + 0.5).requires_grad_()
    value = torch.randn(value_shape, dtype=torch.float64, requires_grad=True)
    ours = DiagonalNormal(loc, scale).to_event(1)
    ours = ours if expand is None else ours.expand(expand)
    assert type(ours) is IndependentDiagonalNormal
    reference = dist.Normal(loc, scale).to_event(1)
    reference = reference if expand is None else reference.expand(expand)
    a, b = ours.log_prob(value), reference.log_prob(value)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    inputs = (value, loc, scale)
    weights = torch.randn(a.shape, dtype=torch.float64)
    first_a = torch.autograd.grad((a * weights).sum(), inputs, create_graph=True)
    first_b = torch.autograd.grad((b * weights).sum(), inputs, create_graph=True)
    for x, y in zip(first_a, first_b):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    for x, y in zip(first_a, first_b):  # second derivatives through every input
        for u, v in zip(torch.autograd.grad(x.pow(2).sum(), inputs, retain_graph=True),
                        torch.autograd.grad(y.pow(2).sum(), inputs, retain_graph=True)):
            torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(normal_event_log_prob, inputs)
    assert torch.autograd.gradgradcheck(normal_event_log_prob, inputs)


def test_normal_event_log_prob_uses_the_parameters_before_the_particle_expansion():
    loc = torch.randn(6, 3, requires_grad=True)
    scale = (torch.rand(6, 3) + 0.5).requires_grad_()
    wide = DiagonalNormal(loc, scale).to_event(1).expand([50, 6])
    assert wide.base_dist.scale.stride()[0] == 0              # torch's expanded view...
    unexpanded_loc, unexpanded_scale = wide.base_dist.unexpanded_params
    assert unexpanded_loc is loc and unexpanded_scale is scale  # ...and what the sum reads
    assert wide.expand([7, 50, 6]).base_dist.unexpanded_params[1] is scale
    z = wide.rsample()
    log_q = wide.log_prob(z)
    assert log_q.shape == (50, 6)
    torch.testing.assert_close(log_q, dist.Normal(loc, scale).to_event(1).log_prob(z))
    # a value narrower than the distribution broadcasts as torch's does (plain formula)
    narrow = torch.randn(6, 3)
    torch.testing.assert_close(wide.log_prob(narrow),
                               dist.Normal(loc, scale).to_event(1).expand([50, 6]).log_prob(narrow))
    # to_event(2): the extra event dimension is summed after the event density
    two = DiagonalNormal(loc, scale).to_event(2)
    torch.testing.assert_close(two.log_prob(z), dist.Normal(loc, scale).to_event(2).log_prob(z))


def test_standard_normal_event_log_prob_and_its_parameter_check():
    z = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    prior = StandardNormal(torch.zeros(3, 4, dtype=torch.float64),
                           torch.ones(3, 4, dtype=torch.float64)).to_event(1).expand([5, 3])
    reference = dist.Normal(0.0, 1.0).expand([5, 3, 4]).to_event(1)
    torch.testing.assert_close(prior.log_prob(z), reference.log_prob(z), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(prior.log_prob(z).sum(), z)[0], -z)
    assert torch.autograd.gradgradcheck(normal_event_log_prob, (z,))
    wrong = StandardNormal(torch.ones(3, 4), torch.ones(3, 4)).to_event(1)
    with pyro.validation_enabled(True), pytest.raises(ValueError, match="loc 0 and scale 1"):
        wrong.log_prob(torch.zeros(3, 4))


def test_normal_event_log_prob_keeps_functorch_and_tensor_subclass_graphs():
    loc, scale = torch.randn(4, 3), torch.rand(4, 3) + 0.5
    value = torch.randn(4, 3)

    def density(v):
        return normal_event_log_prob(v, loc, scale).sum()

    torch.testing.assert_close(torch.func.grad(density)(value), -(value - loc) / scale ** 2)

    class Tagged(torch.Tensor):
        pass

    tagged = value.clone().as_subclass(Tagged).requires_grad_()
    out = normal_event_log_prob(tagged, loc, scale)
    assert isinstance(out, Tagged) and out.grad_fn is not None
    assert "_NormalEventLogProb" not in type(out.grad_fn).__name__  # the plain formula
    torch.testing.assert_close(out.as_subclass(torch.Tensor),
                               dist.Normal(loc, scale).to_event(1).log_prob(value))


@pytest.mark.parametrize("param_shape,expand", [((), (4,)), ((), (3, 4)), ((3, 1), (3, 4))])
def test_normal_event_log_prob_counts_a_broadcast_scale_once_per_event_element(param_shape,
                                                                             expand):
    # Normal(0., s).expand([d]).to_event(1): the unexpanded scale is narrower than the event
    loc = torch.randn(param_shape, dtype=torch.float64, requires_grad=True)
    scale = (torch.rand(param_shape, dtype=torch.float64) + 0.5).requires_grad_()
    value = torch.randn(expand, dtype=torch.float64)
    ours = DiagonalNormal(loc, scale).expand(expand).to_event(1).log_prob(value)
    reference = dist.Normal(loc, scale).expand(expand).to_event(1).log_prob(value)
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    for x, y in zip(torch.autograd.grad(ours.sum(), (loc, scale)),
                    torch.autograd.grad(reference.sum(), (loc, scale))):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    # a value narrower than the parameters broadcasts up, as in torch
    narrow = torch.randn(1, dtype=torch.float64)
    torch.testing.assert_close(
        normal_event_log_prob(narrow, torch.zeros(4, dtype=torch.float64),
                              torch.full((4,), 2.0, dtype=torch.float64)),
        dist.Normal(torch.zeros(4, dtype=torch.float64), 2.0).to_event(1).log_prob(narrow))


def test_forward_mode_derivatives_of_the_event_densities_equal_torchs():
    import torch.autograd.forward_ad as forward_ad

    def jvp(fn, *pairs):
        with forward_ad.dual_level():
            out = fn(*[forward_ad.make_dual(x, t) for x, t in pairs])
            return forward_ad.unpack_dual(out).tangent

    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64)
    loc, scale = torch.randn(3, 4, **f64), torch.rand(3, 4, **f64) + 0.5
    value = torch.randn(5, 3, 4, **f64)
    pairs = [(value, torch.randn_like(value)), (loc, torch.randn_like(loc)),
             (scale, torch.randn_like(scale))]
    torch.testing.assert_close(
        jvp(lambda v, m, s: DiagonalNormal(m, s).to_event(1).expand([5, 3]).log_prob(v), *pairs),
        jvp(lambda v, m, s: dist.Normal(m, s).to_event(1).expand([5, 3]).log_prob(v), *pairs))
    zeros, ones = torch.zeros(3, 4, **f64), torch.ones(3, 4, **f64)
    torch.testing.assert_close(
        jvp(lambda v: StandardNormal(zeros, ones).to_event(1).expand([5, 3]).log_prob(v),
            pairs[0]),
        jvp(lambda v: dist.Normal(zeros, ones).to_event(1).expand([5, 3]).log_prob(v), pairs[0]))
    logits, x = torch.randn(5, 3, 4, **f64), (torch.rand(3, 4) < 0.5).double()
    tangents = (torch.randn_like(logits), torch.randn_like(x))
    torch.testing.assert_close(
        jvp(lambda eta: BinaryBernoulli(logits=eta).to_event(1).log_prob(x),
            (logits, tangents[0])),
        jvp(lambda eta: dist.Bernoulli(logits=eta).to_event(1).log_prob(x),
            (logits, tangents[0])))
    torch.testing.assert_close(  # a tangent on the value too: the elementwise formula's
        jvp(binary_bernoulli_event_log_prob, (logits, tangents[0]), (x, tangents[1])),
        jvp(lambda eta, v: F.logsigmoid((2 * v - 1) * eta).sum(-1), (logits, tangents[0]),
            (x, tangents[1])))
