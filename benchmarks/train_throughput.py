"""Training throughput of ``fit`` against a hand-written PyTorch loop, Pyro's own SVI and
pythae, on one network, in one process or each side in fresh processes.

Same 784-300-300-40 ReLU Bernoulli VAE (``--architecture``), same weights, minibatches (100
rows), optimizer (Adam, lr 1e-3) and device on every side:

* **fit (DLVM)**: ``pyro_lvm.fit(DLVM, rows, objective=...)`` as a user calls it;
* **fit (user pair)**: the same call on :class:`UserVAE`, the network written as a user writes
  a Pyro pair: an ``nn.Module`` whose ``model`` / ``guide`` call ``pyro.module`` and build
  ``dist.Normal`` / ``dist.Bernoulli`` inside ``pyro.plate("data")``;
* **fit (user ProgramPair)**: the same network and distributions written as a
  :class:`pyro_lvm.models.ProgramPair` (:class:`UserProgramVAE`), which ``fit`` runs without
  Pyro's handler stack, as it runs the DLVM;
* **Pyro SVI**: ``pyro.infer.SVI(user.model, user.guide, pyro.optim.Adam, loss)`` with
  ``Trace_ELBO()`` for the ELBO and ``RenyiELBO(alpha=0, num_particles=K,
  vectorize_particles=True)`` (the IWAE bound) for K > 1, ``svi.step(xb)`` per minibatch;
* **pythae**: pythae's ``VAE`` / ``IWAE(number_samples=K)`` models (``reconstruction_loss=
  "bce"``) with the same encoder / decoder widths, ``model({"data": xb}).loss`` in a bare
  ``zero_grad / backward / Adam.step`` loop (optional: ``pip install --no-deps pythae``;
  skipped with a note when it is not installed);
* **hand**: :class:`common.MirrorVAE`, the network written out in ``torch.nn.functional``,
  the bound computed by hand, ``torch.optim.Adam(params, lr)`` as one writes it; **hand+fused**
  is the same with ``Adam(..., fused=True)`` (``fit``'s default optimizer), so that the part
  of a difference that comes from the optimizer kernel is visible.

Each loop visits ``steps`` minibatches in a random order, steps the optimizer and reads the
loss back to the host every step. The repetitions alternate (sides in order, then reversed,
...), so that all sides see the same machine state. Throughput is rows per second at the
*median step time* over all steps of all repetitions (the first step of each repetition, with
its lazy initialisations, excluded); ``[min-max]`` is the range of the per-repetition rates.
Ratios are to the hand-written loop. With ``--processes separate`` every repetition of every
side runs in a fresh Python process, as a user's script runs one fit: built from the same
seed (so from the initial weights, where in one shared process each repetition goes on
training the models the earlier ones trained), on the same rows, with the same warm-up. How
often freed memory is handed back to the system and faulted in again depends on the
allocator's state, which in one shared process the sides set for each other.
Each step's *CPU time* (``time.thread_time``: with one
torch thread every kernel runs on the calling thread) is recorded too: on a machine shared with
other jobs it does not count the time spent waiting for a core, so its ratio ("CPU-time /
hand") is the steadier measure of the work each side does per step.

Before timing, ``fit``'s objective on the DLVM and on both user pairs is checked to be the
*same* as the hand-written one: on one minibatch with the same seed (the same noise draws) the
loss and every parameter gradient must agree to float32 rounding.

``--profile`` runs ``cProfile`` over one ``fit`` call per objective and pair.

Usage::

    python benchmarks/train_throughput.py --smoke
    python benchmarks/train_throughput.py --threads 1                 # ELBO, IWAE 5, IWAE 50
    python benchmarks/train_throughput.py --threads 1 --processes separate
    python benchmarks/train_throughput.py --threads 1 --objectives iwae_50_dreg --profile
"""
from __future__ import annotations

import argparse
import cProfile
import json
import math
import pathlib
import pstats
import statistics
import sys
import time

BENCH_DIR = pathlib.Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import common  # noqa: E402  (puts the repository on sys.path)
if pathlib.Path(common.__file__).resolve().parent != BENCH_DIR:  # another 'common' module
    raise ImportError(f"benchmarks/common.py expected, got {common.__file__}")
import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from pyro_lvm.models import ProgramPair  # noqa: E402

#: targets (ours / hand-written) from the project's issue 11
TARGETS = {"fit_dlvm": 1.0, "fit_user": 0.95}
#: name -> (objective kind, K, gradient estimator)
OBJECTIVES = {
    "elbo": ("elbo", 1, "standard"),
    "iwae_5": ("iwae", 5, "standard"),
    "iwae_50": ("iwae", 50, "standard"),
    "iwae_50_dreg": ("iwae", 50, "dreg"),
}
DEFAULT_OBJECTIVES = ["elbo", "iwae_5", "iwae_50"]
#: K from which --steps-large applies
LARGE_K = 20
# float32 network, sums over 784 pixels and B rows: the two sides differ by rounding only
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-3
SIDES = ("fit_dlvm", "fit_dlvm_graph", "fit_user", "fit_user_graph", "fit_user_program",
         "pyro_svi", "pythae", "hand", "hand_fused", "hand_graph")
#: sides that replay CUDA graphs (skipped with a note on other devices)
GRAPH_SIDES = ("fit_dlvm_graph", "fit_user_graph", "hand_graph")
DEFAULT_SIDES = [s for s in SIDES if s not in GRAPH_SIDES]
LABELS = {"fit_dlvm": "fit (DLVM)", "fit_user": "fit (user pair)",
          "fit_user_program": "fit (user ProgramPair)", "pyro_svi": "Pyro SVI",
          "pythae": "pythae", "hand": "hand-written", "hand_fused": "hand+fused Adam",
          "fit_dlvm_graph": "fit (DLVM), CUDA graph", "fit_user_graph": "fit (user pair), CUDA graph",
          "hand_graph": "hand-written, CUDA graph"}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(ap)
    ap.add_argument("--objectives", nargs="+", default=DEFAULT_OBJECTIVES,
                    choices=list(OBJECTIVES), help="which objectives to time")
    ap.add_argument("--architecture", default="relu", choices=list(common.ARCHITECTURES))
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--steps", type=int, default=50,
                    help="optimizer steps per timed repetition (K < %d)" % LARGE_K)
    ap.add_argument("--steps-large", type=int, default=10,
                    help="optimizer steps per timed repetition for K >= %d" % LARGE_K)
    ap.add_argument("--repeats", type=int, default=7, help="alternating repetitions per side")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--validation", default="on", choices=["on", "off"],
                    help="Pyro/torch.distributions argument validation (Pyro's default is on)")
    ap.add_argument("--sides", nargs="+", default=DEFAULT_SIDES, choices=list(SIDES),
                    help="which loops to time (hand is always timed: the ratios' reference); "
                         "the *_graph sides replay CUDA graphs (fit(..., cuda_graph=True) and a "
                         "hand-written captured step) and need a CUDA device")
    ap.add_argument("--profile", action="store_true",
                    help="cProfile one fit call per objective and pair")
    ap.add_argument("--profile-steps", type=int, default=20)
    ap.add_argument("--processes", default="shared", choices=["shared", "separate"],
                    help="shared: every side in this one process; separate: every repetition "
                         "of every side in a fresh Python process, as a user runs one fit "
                         "(the allocator's state is the process's: section 1 of "
                         "benchmarks/README.md)")
    ap.add_argument("--worker", default=None, choices=list(SIDES), help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    return ap


def _apply_smoke(args) -> None:
    args.steps, args.steps_large, args.repeats, args.profile_steps = 3, 3, 1, 3
    args.batch_size = 16
    args.smoke_architecture = dict(hidden=(32,), latent_dim=4, activation="tanh")


# ----------------------------------------------------------------------------------------
# a user's own pair, and the loops
# ----------------------------------------------------------------------------------------
class UserVAE(torch.nn.Module):
    """The Bernoulli VAE as a user writes a Pyro pair (no pyro-lvm code): an ``nn.Module``
    whose methods register its networks with ``pyro.module`` and build Pyro distributions.
    Its ``encoder`` / ``decoder`` have the DLVM's widths and parameter names, so weights copy
    over (:func:`common.copy_dlvm_weights`)."""

    def __init__(self, data_dim, latent_dim, hidden, activation, min_encoder_scale=1e-5):
        super().__init__()
        self.latent_dim, self.min_encoder_scale = latent_dim, min_encoder_scale
        mirror = common.MirrorVAE(data_dim, latent_dim, hidden, activation)
        self.encoder, self.decoder = mirror.encoder, mirror.decoder

    def model(self, x, mask=None):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x, mask=None):
        pyro.module("encoder", self.encoder)
        out = self.encoder(x)
        loc, scale = out[:, :self.latent_dim], F.softplus(out[:, self.latent_dim:])
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, scale + self.min_encoder_scale).to_event(1))



class UserProgramVAE(ProgramPair, torch.nn.Module):
    """:class:`UserVAE` written as a :class:`pyro_lvm.models.ProgramPair` (two programs over
    the data plate's sites, torch's / Pyro's own ``Normal`` and ``Bernoulli``): what a user
    writes to have ``fit`` run the pair without Pyro's handler stack."""

    def __init__(self, data_dim, latent_dim, hidden, activation, min_encoder_scale=1e-5):
        super().__init__()
        self.latent_dim, self.min_encoder_scale = latent_dim, min_encoder_scale
        mirror = common.MirrorVAE(data_dim, latent_dim, hidden, activation)
        self.encoder, self.decoder = mirror.encoder, mirror.decoder

    def model_program(self, x, mask, sample):
        z = sample("z", dist.Normal(x.new_zeros(self.latent_dim), 1.0).to_event(1))
        sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide_program(self, x, mask, sample):
        out = self.encoder(x)
        loc, scale = out[:, :self.latent_dim], F.softplus(out[:, self.latent_dim:])
        sample("z", dist.Normal(loc, scale + self.min_encoder_scale).to_event(1))


class _StepClock:
    """Wall clock, this thread's CPU time and the page faults after every step: :meth:`tick` in
    a bare loop, or as a fit callback (``on_step_end``)."""

    def __init__(self):
        self.times, self.cpu_times, self.faults = [], [], []

    def tick(self) -> None:
        self.times.append(time.perf_counter())
        self.cpu_times.append(time.thread_time())
        self.faults.append(common.page_faults())

    def on_step_end(self, state) -> None:
        self.tick()


def _steady_rate(times, batch_size) -> float:
    if len(times) < 2:
        return math.nan
    return batch_size * (len(times) - 1) / (times[-1] - times[0])


def _step_durations(times):
    """Durations of steps 2..n (the timestamps are taken after each step)."""
    return [b - a for a, b in zip(times[:-1], times[1:])]


def _timing(clock: _StepClock, batch_size, skip: int = 0, **extra) -> dict:
    """Wall-clock and CPU-time (this thread's: with one torch thread every kernel runs on it)
    step durations, and the page faults of each step, after the first ``skip`` steps; CPU time
    does not count the time the thread waits for a core."""
    times = clock.times[skip:]
    return dict(rate=_steady_rate(times, batch_size), durations=_step_durations(times),
                cpu_durations=_step_durations(clock.cpu_times[skip:]),
                faults=_step_durations(clock.faults[skip:]), **extra)


def _plain_loop(params, rows, loss_fn, args, device, fused: bool = False) -> dict:
    """zero_grad / loss / backward / Adam.step / loss.item(), minibatches as fit draws them."""
    with common.Stopwatch(device) as sw:
        x = rows.to(device)
        n = x.shape[0]
        optimizer = (torch.optim.Adam(params, lr=args.lr, fused=True) if fused
                     else torch.optim.Adam(params, lr=args.lr))
        generator = torch.Generator().manual_seed(args.seed)
        order = torch.randperm(n, generator=generator).to(device)
        pyro.set_rng_seed(args.seed)
        clock, losses = _StepClock(), []
        for start in range(0, n, args.batch_size):
            xb = x.index_select(0, order[start:start + args.batch_size])
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(xb, n)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            clock.tick()
    return _timing(clock, args.batch_size, end_to_end=n / sw.seconds,
                   last_loss=losses[-1])



def run_fit(pair, rows, objective, args, device, cuda_graph: bool = False) -> dict:
    from pyro_lvm.inference.training import fit

    clock = _StepClock()
    with common.Stopwatch(device) as sw:
        result = fit(pair, rows, objective=objective, epochs=1, batch_size=args.batch_size,
                     lr=args.lr, seed=args.seed, device=device, progress=False,
                     callbacks=[clock], cuda_graph=cuda_graph)
    return _timing(clock, args.batch_size,
                   end_to_end=rows.shape[0] / sw.seconds, last_loss=result.step_losses[-1])


def run_hand(mirror, rows, spec, args, device, fused: bool = False) -> dict:
    kind, k, gradient = spec
    mirror.to(device)
    return _plain_loop(list(mirror.parameters()), rows,
                       lambda xb, n: mirror.loss(xb, kind, k, gradient, num_data=n), args, device,
                       fused=fused)


def run_hand_graph(mirror, rows, spec, args, device, warmup: int = 3) -> dict:
    """The hand-written step captured once in a CUDA graph and replayed (the PyTorch recipe
    for whole-network capture: warm-up on a side stream, capturable Adam, static input)."""
    kind, k, gradient = spec
    mirror.to(device)
    params = list(mirror.parameters())
    with common.Stopwatch(device) as sw:
        x = rows.to(device)
        n = x.shape[0]
        optimizer = torch.optim.Adam(params, lr=args.lr, capturable=True)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed)).to(device)
        pyro.set_rng_seed(args.seed)
        batches = [order[i:i + args.batch_size] for i in range(0, n, args.batch_size)]
        static_x = x.index_select(0, batches[0]).clone()

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss = mirror.loss(static_x, kind, k, gradient, num_data=n)
            loss.backward()
            optimizer.step()
            return loss

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        clock, losses, graph, static_loss = _StepClock(), [], None, None
        for i, idx in enumerate(batches):
            static_x.copy_(x.index_select(0, idx))
            if i < warmup or static_x.shape[0] != idx.shape[0]:
                with torch.cuda.stream(side):
                    losses.append(step().item())
                torch.cuda.current_stream().wait_stream(side)
            else:
                if graph is None:
                    graph = torch.cuda.CUDAGraph()
                    optimizer.zero_grad(set_to_none=True)
                    with torch.cuda.graph(graph):
                        static_loss = step()
                graph.replay()
                losses.append(static_loss.item())
            clock.tick()
    return _timing(clock, args.batch_size, skip=warmup,
                   end_to_end=n / sw.seconds, last_loss=losses[-1])


def run_pyro_svi(user, rows, spec, args, device) -> dict:
    """Pyro's own SVI on the user pair (its loss is the batch's, unscaled: a constant factor)."""
    from pyro_lvm.inference.engine import isolated_param_store

    kind, k, _ = spec
    loss = (pyro.infer.Trace_ELBO() if kind == "elbo" else
            pyro.infer.RenyiELBO(alpha=0, num_particles=k, vectorize_particles=True,
                                 max_plate_nesting=2))
    user.to(device)
    with isolated_param_store(), common.Stopwatch(device) as sw:
        x = rows.to(device)
        n = x.shape[0]
        svi = pyro.infer.SVI(user.model, user.guide, pyro.optim.Adam({"lr": args.lr}), loss)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed)).to(device)
        pyro.set_rng_seed(args.seed)
        clock, losses = _StepClock(), []
        for start in range(0, n, args.batch_size):
            losses.append(svi.step(x.index_select(0, order[start:start + args.batch_size])))
            clock.tick()
    return _timing(clock, args.batch_size, end_to_end=n / sw.seconds,
                   last_loss=losses[-1])


def pythae_model(arch, spec, device):
    """pythae's VAE (K = 1) or IWAE (``number_samples=K``) with our widths, or None when pythae
    is not installed."""
    try:
        from pythae.models import IWAE as PythaeIWAE, IWAEConfig, VAE as PythaeVAE, VAEConfig
        from pythae.models.base.base_utils import ModelOutput
        from pythae.models.nn import BaseDecoder, BaseEncoder
    except ImportError:
        return None

    d, hidden = arch["latent_dim"], tuple(arch["hidden"])

    class Encoder(BaseEncoder):
        def __init__(self):
            super().__init__()
            self.net = common.MirrorVAE(784, d, hidden, arch["activation"]).encoder

        def forward(self, x):
            out = self.net(x)
            return ModelOutput(embedding=out[:, :d], log_covariance=out[:, d:])

    class Decoder(BaseDecoder):
        def __init__(self):
            super().__init__()
            self.net = common.MirrorVAE(784, d, hidden, arch["activation"]).decoder

        def forward(self, z):
            return ModelOutput(reconstruction=torch.sigmoid(self.net(z)))

    kind, k, _ = spec
    if kind == "elbo":
        config = VAEConfig(input_dim=(784,), latent_dim=d, reconstruction_loss="bce")
        model = PythaeVAE(config, encoder=Encoder(), decoder=Decoder())
    else:
        config = IWAEConfig(input_dim=(784,), latent_dim=d, reconstruction_loss="bce",
                            number_samples=k)
        model = PythaeIWAE(config, encoder=Encoder(), decoder=Decoder())
    return model.to(device)


def run_pythae(model, rows, args, device) -> dict:
    return _plain_loop(list(model.parameters()), rows,
                       lambda xb, n: model({"data": xb}).loss, args, device)


# ----------------------------------------------------------------------------------------
# checks and profile
# ----------------------------------------------------------------------------------------
def same_objective_check(pair, mirror, objective, spec, x, num_data, seed) -> dict:
    """Loss and gradients of ``fit``'s objective on ``pair`` and of the hand-written one on the
    same minibatch with the same noise draws (same seed); returns the relative differences."""
    from pyro_lvm.inference.engine import isolated_param_store

    kind, k, gradient = spec
    pair.zero_grad(set_to_none=True)
    mirror.zero_grad(set_to_none=True)
    with isolated_param_store():
        pyro.set_rng_seed(seed)
        ours = objective.differentiable_loss(pair.model, pair.guide, x, num_data=num_data)
        ours.backward()
    pyro.set_rng_seed(seed)
    theirs = mirror.loss(x, kind, k, gradient, num_data=num_data)
    theirs.backward()
    loss_rel = abs(ours.item() - theirs.item()) / max(abs(theirs.item()), 1e-30)
    ours_grads = dict(pair.named_parameters())
    grad_rel = 0.0
    for name, p in mirror.named_parameters():
        g_ours, g_hand = ours_grads[name].grad, p.grad
        denom = g_hand.abs().max().clamp_min(1e-30)
        grad_rel = max(grad_rel, float((g_ours - g_hand).abs().max() / denom))
    pair.zero_grad(set_to_none=True)
    mirror.zero_grad(set_to_none=True)
    same = loss_rel < LOSS_RTOL and grad_rel < GRAD_RTOL
    return dict(loss_ours=ours.item(), loss_hand=theirs.item(), loss_rel_diff=loss_rel,
                grad_max_rel_diff=grad_rel, same=same)


def _bucket(key) -> str:
    filename, _, func = key
    if "run_backward" in func:
        return "autograd backward (C++)"
    if filename == "~":
        return "torch kernels called from Python (C++)" if "torch" in func else "other builtins"
    if str(common.REPO_ROOT) in filename:
        return "pyro-lvm Python"
    if "/pyro/" in filename:
        return "Pyro Python (tracing, plates, handlers)"
    if "/torch/" in filename:
        return "torch Python (modules, distributions, optim)"
    return "other Python"


def profile_fit(pair, rows, objective, args, device, top: int = 12) -> dict:
    """cProfile of one fit call; self time grouped by where the code lives, top functions."""
    from pyro_lvm.inference.training import fit

    profiler = cProfile.Profile()
    profiler.enable()
    with common.Stopwatch(device) as sw:
        fit(pair, rows, objective=objective, epochs=1, batch_size=args.batch_size, lr=args.lr,
            seed=args.seed, device=device, progress=False)
    profiler.disable()
    stats = pstats.Stats(profiler)
    buckets = {}
    for key, (_, _, tottime, _, _) in stats.stats.items():
        buckets[_bucket(key)] = buckets.get(_bucket(key), 0.0) + tottime
    steps = math.ceil(rows.shape[0] / args.batch_size)
    python_funcs = []
    for key, (_, ncalls, tottime, cumtime, _) in stats.stats.items():
        filename, line, func = key
        if filename == "~":
            continue
        short = filename.split("site-packages/")[-1].replace(str(common.REPO_ROOT) + "/", "")
        python_funcs.append(dict(function=f"{short}:{line}({func})", calls=ncalls,
                                 cum_ms_per_step=1e3 * cumtime / steps,
                                 self_ms_per_step=1e3 * tottime / steps))
    python_funcs.sort(key=lambda r: -r["cum_ms_per_step"])
    return dict(steps=steps, wall_s=sw.seconds,
                buckets_ms_per_step={k: 1e3 * v / steps for k, v in
                                     sorted(buckets.items(), key=lambda kv: -kv[1])},
                top_cumulative=python_funcs[:top])


# ----------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------
def _make_objective(name):
    from pyro_lvm.inference.objectives import ELBO, IWAE

    kind, k, gradient = OBJECTIVES[name]
    if kind == "elbo":
        return ELBO()
    return IWAE(num_particles=k, gradient=gradient)


def _summary(outs, batch_size) -> dict:
    durations = [d for o in outs for d in o["durations"]]
    median_ms = 1e3 * common.median_and_spread(durations)[0]
    cpu_ms = 1e3 * common.median_and_spread([d for o in outs for d in o["cpu_durations"]])[0]
    _, lo, hi = common.median_and_spread([o["rate"] for o in outs])
    return dict(median_step_ms=median_ms, rows_per_s=1e3 * batch_size / median_ms, min=lo,
                max=hi, end_to_end=common.median_and_spread([o["end_to_end"] for o in outs])[0],
                median_cpu_ms=cpu_ms, cpu_rows_per_s=1e3 * batch_size / cpu_ms,
                faults_per_step=statistics.fmean([f for o in outs for f in o["faults"]] or
                                                 [math.nan]),
                last_losses=[o["last_loss"] for o in outs],
                repetition_step_s=[statistics.median(o["durations"]) if o["durations"]
                                   else math.nan for o in outs])


def _runners(name, pairs, args, device, notes) -> dict:
    """side -> ``run(rows)`` for one objective (the sides this device and install can run)."""
    spec = OBJECTIVES[name]
    dlvm, user, mirror, user_program = pairs
    objective = _make_objective(name)
    runners = {
        "fit_dlvm": lambda data: run_fit(dlvm, data, objective, args, device),
        "fit_user": lambda data: run_fit(user, data, objective, args, device),
        "fit_user_program": lambda data: run_fit(user_program, data, objective, args, device),
        "hand": lambda data: run_hand(mirror, data, spec, args, device),
        "hand_fused": lambda data: run_hand(mirror, data, spec, args, device, fused=True),
    }
    if device.type == "cuda":
        runners["fit_dlvm_graph"] = lambda data: run_fit(dlvm, data, objective, args, device,
                                                         cuda_graph=True)
        runners["fit_user_graph"] = lambda data: run_fit(user, data, objective, args, device,
                                                         cuda_graph=True)
        runners["hand_graph"] = lambda data: run_hand_graph(mirror, data, spec, args, device)
    elif any(s in args.sides for s in GRAPH_SIDES):
        notes.add("the CUDA-graph sides (*_graph) are skipped: each needs a CUDA device "
                  f"(this run is on {device.type})")
    if spec[2] == "standard":  # Pyro and pythae have no DReG
        runners["pyro_svi"] = lambda data: run_pyro_svi(user, data, spec, args, device)
        pythae = pythae_model(args.arch, spec, device) if args.worker in (None, "pythae") \
            else None
        if pythae is not None:
            runners["pythae"] = lambda data: run_pythae(pythae, data, args, device)
        elif args.worker is None:
            notes.add("pythae is not installed (pip install --no-deps pythae): its rows are "
                      "skipped")
    return runners


def _warm_up(runner, rows, args) -> None:
    """An untimed run on two minibatches (allocator, lazy initialisations); none with
    ``--smoke``."""
    if not args.smoke:
        with pyro.validation_enabled(args.validation == "on"):
            runner(rows[:2 * args.batch_size])


def _timed_rows(name, train, args):
    steps = args.steps_large if OBJECTIVES[name][1] >= LARGE_K else args.steps
    return steps, train[:steps * args.batch_size]


_WORKER_MARK = "train_throughput worker result: "
#: one repetition of one side in its own process takes seconds; a worker still running after
#: this is stuck
WORKER_TIMEOUT_S = 1800


def _worker_argv(args, name: str, side: str) -> list:
    argv = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", side,
            "--objectives", name, "--device", args.device, "--seed", str(args.seed),
            "--architecture", args.architecture, "--batch-size", str(args.batch_size),
            "--steps", str(args.steps), "--steps-large", str(args.steps_large),
            "--lr", repr(args.lr), "--validation", args.validation]
    if args.threads is not None:
        argv += ["--threads", str(args.threads)]
    if args.data is not None:
        argv += ["--data", str(args.data)]
    if args.smoke:
        argv.append("--smoke")
    return argv


def _in_fresh_process(side: str, name: str, args) -> dict:
    """One repetition of ``side`` in a new Python process (``--worker``), as a user's script
    runs one fit: from the initial weights, with the process's allocator at glibc's
    defaults."""
    import subprocess

    try:
        done = subprocess.run(_worker_argv(args, name, side), capture_output=True, text=True,
                              timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the {side} / {name} worker did not finish in {WORKER_TIMEOUT_S} s")
    marked = [line for line in done.stdout.splitlines() if line.startswith(_WORKER_MARK)]
    if done.returncode != 0 or not marked:
        raise RuntimeError(f"the {side} / {name} worker failed (exit {done.returncode}):\n"
                           f"{done.stderr[-3000:]}")
    return json.loads(marked[-1][len(_WORKER_MARK):])


def _time_objective(name, pairs, train, args, device, notes) -> dict:
    """Every side on one objective, alternating inside the same repetitions (in this process,
    or each in a fresh one with ``--processes separate``)."""
    spec = OBJECTIVES[name]
    steps, rows = _timed_rows(name, train, args)
    runners = _runners(name, pairs, args, device, notes)
    sides = [s for s in SIDES if s in runners and (s in args.sides or s == "hand")]
    validate = args.validation == "on"
    if args.processes == "separate":  # each worker warms up its own process
        run_side = lambda side: _in_fresh_process(side, name, args)  # noqa: E731
    else:
        run_side = lambda side: runners[side](rows)  # noqa: E731
        for side in sides:
            _warm_up(runners[side], rows, args)
    timed = {side: [] for side in sides}
    with pyro.validation_enabled(validate):
        for rep in range(args.repeats):
            for side in (sides if rep % 2 == 0 else sides[::-1]):
                timed[side].append(run_side(side))
    stats = {side: _summary(outs, args.batch_size) for side, outs in timed.items()}
    hand = stats["hand"]["rows_per_s"]
    hand_cpu = stats["hand"]["cpu_rows_per_s"]
    for side in stats.values():
        side["ratio"] = side["rows_per_s"] / hand
        side["cpu_ratio"] = side["cpu_rows_per_s"] / hand_cpu
        side["paired"] = common.paired_speed_ratio(stats["hand"]["repetition_step_s"],
                                                   side["repetition_step_s"])
    return dict(objective=name, k=spec[1], gradient=spec[2], steps=steps,
                validation=validate, batch_size=args.batch_size, processes=args.processes,
                sides=stats)


def _run_worker(pairs, train, args, device) -> dict:
    """``--worker SIDE``: one warmed-up repetition of one side, printed as JSON."""
    name = args.objectives[0]
    runners = _runners(name, pairs, args, device, set())
    if args.worker not in runners:
        raise SystemExit(f"side {args.worker} cannot run here (device {device.type})")
    rows = _timed_rows(name, train, args)[1]
    _warm_up(runners[args.worker], rows, args)
    with pyro.validation_enabled(args.validation == "on"):
        out = runners[args.worker](rows)
    print(_WORKER_MARK + json.dumps(out))
    return out


def _interval_text(paired) -> str:
    if math.isnan(paired["lower"]):
        return f"{paired['ratio']:.3f} [-]"
    return f"{paired['ratio']:.3f} [{paired['lower']:.3f}-{paired['upper']:.3f}]"


def _against(paired, target) -> str:
    """Where the interval lies against the target."""
    if paired["n"] < 2:
        return "(one repetition: no interval)"
    if math.isnan(paired["lower"]):
        return "(no interval: a repetition without a step time)"
    if paired["lower"] >= target:
        return "(above)"
    if paired["upper"] < target:
        return "(below)"
    return "(contains it)"


def _print_results(results, checks, profiles, args, device, arch_text, notes) -> None:
    print(f"\ntrain_throughput: Bernoulli VAE {arch_text}, batch {args.batch_size}, Adam lr "
          f"{args.lr}, device {device}, validation {args.validation}")
    print(f"  machine: {common.machine_description(device)}")
    print(f"  allocator: {common.allocator_description()} (a freed multi-MB tensor that "
          f"glibc returns to the system costs one page fault per 4 KiB when it comes back)")
    where = ("each in a fresh process" if args.processes == "separate"
             else "all in this process")
    print(f"  rows/s at the median step time over {args.repeats} alternating repetitions "
          f"({where}) [min-max of the per-repetition rates]; ratio = side / hand-written; "
          f"paired reps: geometric mean of the repetitions' own ratios and its t interval")
    print("  (how far this run's ratio may be from a longer run's on this machine)\n")
    table = []
    for r in results:
        for side in SIDES:
            s = r["sides"].get(side)
            if s is None:
                continue
            table.append(dict(objective=r["objective"], side=LABELS[side],
                              rate=f"{s['rows_per_s']:,.0f} [{s['min']:,.0f}-{s['max']:,.0f}]",
                              ms=s["median_step_ms"], ratio=s["ratio"],
                              paired=_interval_text(s["paired"]),
                              cpu_ms=s["median_cpu_ms"], cpu_ratio=s["cpu_ratio"],
                              faults=s["faults_per_step"]))
    print(common.format_table(table, [
        ("objective", "objective", ""), ("side", "side", ""), ("rate", "rows/s", ""),
        ("ms", "median ms/step", ".2f"), ("ratio", "/ hand", ".3f"),
        ("paired", "paired reps: mean [95% CI]", ""),
        ("cpu_ms", "CPU ms/step", ".2f"), ("cpu_ratio", "CPU-time / hand", ".3f"),
        ("faults", "page faults/step", ",.0f")]))
    for note in sorted(notes):
        print(f"  note: {note}")
    print("\n  same objective as the hand-written one on the same batch and noise:")
    print(common.format_table(
        [dict(check=n, **c, same_text="yes" if c["same"] else "NO") for n, c in checks.items()],
        [("check", "pair / objective", ""), ("loss_ours", "loss ours", ".6g"),
         ("loss_hand", "loss hand", ".6g"), ("loss_rel_diff", "rel. diff", ".1e"),
         ("grad_max_rel_diff", "max grad rel. diff", ".1e"), ("same_text", "same", "")]))
    for name, prof in profiles.items():
        print(f"\n  profile of fit, {name}: {prof['steps']} steps, {prof['wall_s']:.2f} s under "
              f"cProfile (which inflates Python time); self time in ms per step:")
        for bucket, ms in prof["buckets_ms_per_step"].items():
            print(f"    {ms:9.2f}  {bucket}")
        print("    most expensive Python functions (cumulative ms per step):")
        for f in prof["top_cumulative"]:
            print(f"    {f['cum_ms_per_step']:9.2f}  {f['function']}  ({f['calls']} calls)")
    for side, target in TARGETS.items():
        for key, what in (("ratio", "wall clock"), ("cpu_ratio", "CPU time")):
            ratios = [r["sides"][side][key] for r in results if side in r["sides"]]
            if ratios:
                print(f"  {LABELS[side]} / hand-written >= {target} for every objective "
                      f"({what}): {'PASS' if min(ratios) >= target else 'FAIL'} (lowest "
                      f"{min(ratios):.3f})")
        timed = [r for r in results if side in r["sides"]]
        if timed:
            print(f"  {LABELS[side]} vs {target}, paired 95% intervals: " + "; ".join(
                f"{r['objective']} {_interval_text(r['sides'][side]['paired'])} "
                f"{_against(r['sides'][side]['paired'], target)}" for r in timed))


def main(args=None) -> dict:
    """Run the benchmark; ``args``: argv list, Namespace or None. Returns the results dict."""
    args = common.parse(build_parser(), args)
    args.smoke_architecture = None
    if args.smoke:
        _apply_smoke(args)
    device = common.setup_runtime(args)
    from pyro_lvm.models.dlvm import DLVM

    arch = args.arch = args.smoke_architecture or common.ARCHITECTURES[args.architecture]
    largest = max(args.steps, args.steps_large)
    need = largest * args.batch_size * (2 if args.smoke else 1)
    train = common.load_binarized_mnist(args.data, ["train"], rows={"train": min(need, 50000)})[
        "train"]

    torch.manual_seed(args.seed)
    dlvm = DLVM(784, arch["latent_dim"], hidden=arch["hidden"], activation=arch["activation"],
                likelihood="bernoulli", prior="normal")
    mirror = common.MirrorVAE.from_dlvm(dlvm)
    user = UserVAE(784, arch["latent_dim"], arch["hidden"], arch["activation"],
                   dlvm.min_encoder_scale)
    common.copy_dlvm_weights(dlvm, user)
    user_program = UserProgramVAE(784, arch["latent_dim"], arch["hidden"], arch["activation"],
                                  dlvm.min_encoder_scale)
    common.copy_dlvm_weights(dlvm, user_program)
    pairs = (dlvm, user, mirror, user_program)
    if args.worker is not None:
        for model in pairs:
            model.to(device)
        return dict(worker=_run_worker(pairs, train, args, device))
    checks, profiles, notes, results = {}, {}, set(), []
    # The checks run on the CPU before any training (identical weights on every side): the
    # CPU generator gives both sides the same noise, which CUDA kernels need not do.
    for name in args.objectives:
        for label, pair in (("DLVM", dlvm), ("user pair", user),
                            ("user ProgramPair", user_program)):
            with pyro.validation_enabled(True):
                checks[f"{label} / {name}"] = same_objective_check(
                    pair, mirror, _make_objective(name), OBJECTIVES[name],
                    train[:args.batch_size], train.shape[0], args.seed)
    for model in pairs:
        model.to(device)
    for name in args.objectives:
        results.append(_time_objective(name, pairs, train, args, device, notes))
        if args.profile:
            for label, pair in (("DLVM", dlvm), ("user pair", user)):
                with pyro.validation_enabled(args.validation == "on"):
                    profiles[f"{label} / {name}"] = profile_fit(
                        pair, train[:args.profile_steps * args.batch_size],
                        _make_objective(name), args, device)

    arch_text = (f"784-{'-'.join(map(str, arch['hidden']))}-{arch['latent_dim']} "
                 f"{arch['activation']}")
    _print_results(results, checks, profiles, args, device, arch_text, notes)
    all_same = all(c["same"] for c in checks.values())
    print(f"\n  every checked objective identical to the hand-written one: "
          f"{'yes' if all_same else 'NO'}")
    out = dict(results=results, checks=checks, profiles=profiles, same_objective=all_same,
               notes=sorted(notes), machine=common.machine_description(device),
               device=str(device), architecture=arch_text, processes=args.processes,
               pass_target={side: all(r["sides"][side]["ratio"] >= target for r in results
                                      if side in r["sides"]) for side, target in TARGETS.items()})
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return out


if __name__ == "__main__":
    result = main()
    sys.exit(0 if result.get("same_objective", True) else 1)
