"""Graph-captured training (fit(..., cuda_graph=True)).

Without a GPU the bookkeeping is checked with a CPU stand-in for the CUDA calls: "capturing"
runs the step's body once and puts every piece of state back (a capture records kernels
without running them) and "replaying" runs the body again. A fit through that stand-in must
then equal the eager fit bit for bit: the same batches reach the static buffers, the first
steps and the partial batches run eagerly, the step counter and the optimizer state advance
once per step, a changing KL weight forces a new capture. The real capture runs in the CUDA
test (skipped without a device).
"""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from pyro_lvm.inference.training import KLWarmup, fit
from pyro_lvm.inference.training import cuda_graph as cg
from pyro_lvm.inference.training import loop
from pyro_lvm.inference.objectives import ELBO, IWAE
from pyro_lvm.models import DLVM


class StandInBackend:
    """CPU stand-in for :class:`~pyro_lvm.inference.training.cuda_graph.CudaGraphBackend`."""

    def __init__(self, run, fail: bool = False):
        self.run, self.fail = run, fail

    def new_graph(self):
        return {"body": None}

    def pool(self, graph):
        return None

    def side_stream(self):
        return contextlib.nullcontext()

    def capture(self, graph, body, pool=None):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        state = self.run.state
        rng = torch.get_rng_state()
        params = [p.detach().clone() for p in state.params]
        optimizer = copy.deepcopy(state.optimizer.state_dict())
        body()  # a capture records the kernels: nothing it computes may remain
        torch.set_rng_state(rng)
        with torch.no_grad():
            for p, saved in zip(state.params, params):
                p.copy_(saved)
        state.optimizer.load_state_dict(optimizer)
        graph["body"] = body

    def replay(self, graph):
        graph["body"]()


def _data(rows=50, dim=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(rows, dim, generator=g) > 0.5).float()


def _fit(x, monkeypatch=None, backend=None, made=None, **kwargs):
    if backend is not None:
        monkeypatch.setattr(loop, "cuda_graph_unavailable", lambda device: None)

        def graphed(run):
            step = cg.GraphedTrainStep(run, backend=backend(run))
            made.append(step)
            return step
        monkeypatch.setattr(loop, "GraphedTrainStep", graphed)
    torch.manual_seed(0)
    model = DLVM(data_dim=x.shape[1], latent_dim=2, hidden=(8,))
    result = fit(model, x, epochs=3, batch_size=16, seed=3, progress=False,
                 cuda_graph=backend is not None, **kwargs)
    return model, result


def _same(a, b):
    for (name, p), (_, q) in zip(a[0].state_dict().items(), b[0].state_dict().items()):
        assert torch.equal(p, q), name
    assert a[1].history["train_objective"].tolist() == b[1].history["train_objective"].tolist()


@pytest.mark.parametrize("objective", [lambda: ELBO(), lambda: IWAE(num_particles=3)],
                         ids=["elbo", "iwae3"])
def test_replayed_steps_equal_eager_steps(objective, monkeypatch):
    x = _data()
    eager = _fit(x, objective=objective())
    made = []
    graphed = _fit(x, monkeypatch, StandInBackend, made, objective=objective())
    _same(eager, graphed)
    (step,) = made
    # 4 steps an epoch (16, 16, 16, 2 rows): 9 full batches, 3 of them warm-up, 1 capture
    assert step.captures == 1 and step.replays == 9 - 3
    assert graphed[1].history["step"].iloc[-1] == eager[1].history["step"].iloc[-1]


def test_a_changing_kl_weight_is_captured_again(monkeypatch):
    x = _data()
    eager = _fit(x, objective=ELBO(), callbacks=[KLWarmup(epochs=2)])
    made = []
    graphed = _fit(x, monkeypatch, StandInBackend, made, objective=ELBO(),
                   callbacks=[KLWarmup(epochs=2)])
    _same(eager, graphed)
    assert made[0].captures > 1  # beta changes every step during the warm-up


class HalveLearningRate:
    """A learning-rate schedule: lr halves at every epoch start."""

    def on_epoch_start(self, state):
        if state.epoch > 0:
            for group in state.optimizer.param_groups:
                group["lr"] = group["lr"] / 2


def test_a_learning_rate_schedule_is_captured_again(monkeypatch):
    x = _data()
    eager = _fit(x, callbacks=[HalveLearningRate()])
    made = []
    graphed = _fit(x, monkeypatch, StandInBackend, made, callbacks=[HalveLearningRate()])
    _same(eager, graphed)
    assert made[0].captures == 2  # epoch 0 is all warm-up; then one graph per learning rate


def test_a_step_that_cannot_be_captured_trains_eagerly_with_one_line(monkeypatch, capsys):
    x = _data()
    eager = _fit(x)
    made = []
    graphed = _fit(x, monkeypatch, lambda run: StandInBackend(run, fail=True), made)
    _same(eager, graphed)
    err = capsys.readouterr().err
    assert err.count("could not be captured") == 1 and "training eagerly" in err
    assert made[0].failed and made[0].replays == 0


def test_without_a_cuda_device_the_fit_says_so_and_trains_eagerly(capsys):
    x = _data()
    eager = _fit(x)
    capsys.readouterr()
    torch.manual_seed(0)
    model = DLVM(data_dim=x.shape[1], latent_dim=2, hidden=(8,))
    result = fit(model, x, epochs=3, batch_size=16, seed=3, progress=False, device="cpu",
                 cuda_graph=True)
    _same(eager, (model, result))
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["cuda_graph=True needs a CUDA device (this fit runs on cpu); training eagerly"]


def test_unavailable_reasons():
    assert "needs a CUDA device" in cg.cuda_graph_unavailable(torch.device("cpu"))
    if not torch.cuda.is_available():
        assert "not available" in cg.cuda_graph_unavailable(torch.device("cuda"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_real_capture_on_cuda_is_reproducible_and_close_to_eager():
    x = (torch.rand(400, 20, generator=torch.Generator().manual_seed(0)) > 0.5).float()

    def run(graph):
        torch.manual_seed(0)
        model = DLVM(data_dim=20, latent_dim=3, hidden=(32,))
        result = fit(model, x, objective=IWAE(num_particles=5), epochs=4, batch_size=100,
                     seed=1, device="cuda", progress=False, cuda_graph=graph)
        return model, result

    first, second, eager = run(True), run(True), run(False)
    _same(first, second)  # the same seed gives the same replayed draws
    hist = first[1].history["train_objective"]
    assert torch.isfinite(torch.tensor(hist.tolist())).all()
    # different draws than eager, but the same optimization: bounds within a few nats
    assert abs(hist.iloc[-1] - eager[1].history["train_objective"].iloc[-1]) < 2.0
