"""Throughput of the importance-sampled log-likelihood evaluation against hand-written PyTorch.

Both sides evaluate the same Bernoulli DLVM (``DLVM(784, 50, hidden=(200, 200))``) on the same
binarized-MNIST test rows with the same chunking (rows x particles per vectorized pass):

* **ours**: :func:`inference.evaluate.log_likelihood` (the DLVM's log weights as every pair's,
  streaming log-sum-exp, standard errors, ESS, ELBO moments);
* **hand-written**: the encoder/decoder weights copied into plain tensors and the IWAE log
  weights written out with ``torch.nn.functional`` and ``torch.distributions``:
  :math:`z = \\mu(x) + \\sigma(x)\\,\\varepsilon`,
  :math:`\\log w = \\log \\mathrm{Bern}(x \\mid \\mathrm{dec}(z)) + \\log \\mathcal N(z; 0, I)
  - \\log \\mathcal N(z; \\mu, \\sigma^2)`, reduced with a running ``logaddexp``.

Repetitions alternate (ours, hand-written, ours, ...) in one process so that both see the same
machine state; the median throughput (rows x samples / s) of each is compared and the ratio
ours / hand-written printed (target >= 0.9). Both draw their noise in the same order from the
same seed, so they must give the same per-row estimates; the largest difference is printed.
The peak memory of each side (above what the process held before it: the CUDA allocator's peak,
or the sampled resident set size on the CPU) is printed too.

Pyro and torch.distributions validate arguments by default (each check waits for the device).
``log_likelihood`` keeps those checks for the first chunk only (the data are validated up
front), and the hand-written side does the same; ``--validation on|off|both`` times either
global setting for both sides alike.

Usage::

    python benchmarks/eval_throughput.py --smoke
    python benchmarks/eval_throughput.py --rows 1000 --num-samples 1000 --device cuda
"""
from __future__ import annotations

import argparse
import math
import pathlib
import statistics
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from a checkout (not installed)
    sys.path.insert(0, str(REPO_ROOT))
BENCH_DIR = pathlib.Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import numpy as np  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import common  # noqa: E402
from eval_memory import load_mnist_split, peak_rss_bytes  # noqa: E402

TARGET_RATIO = 0.9

_ACTIVATIONS = {nn.Tanh: torch.tanh, nn.ReLU: torch.relu, nn.Softplus: F.softplus,
                nn.ELU: F.elu, nn.GELU: F.gelu}


def plain_mlp(seq: nn.Sequential):
    """Copy an ``nn.Sequential`` of Linear/activation layers into a plain function of tensors."""
    steps = []
    for layer in seq:
        if isinstance(layer, nn.Linear):
            w = layer.weight.detach().clone()
            b = None if layer.bias is None else layer.bias.detach().clone()
            steps.append(("linear", w, b))
        elif type(layer) in _ACTIVATIONS:
            steps.append(("act", _ACTIVATIONS[type(layer)], None))
        else:
            raise SystemExit(f"hand-written baseline does not know layer {layer!r}")

    def forward(h):
        for kind, a, b in steps:
            h = F.linear(h, a, b) if kind == "linear" else a(h)
        return h

    return forward


class HandWrittenIWAE:
    """The DLVM's IWAE log weights in plain PyTorch (weights copied, no Pyro)."""

    def __init__(self, model):
        from pyro_lvm.models.likelihoods import Bernoulli
        from pyro_lvm.models.priors import StandardNormalPrior

        if not isinstance(model.likelihood, Bernoulli) or not isinstance(model.prior,
                                                                          StandardNormalPrior):
            raise SystemExit("the hand-written baseline covers the Bernoulli / standard normal DLVM")
        self.encoder = plain_mlp(model.encoder)
        self.decoder = plain_mlp(model.decoder)
        self.d = model.latent_dim
        self.min_scale = model.min_encoder_scale

    def log_weights(self, x, k, validate_args=None):
        out = self.encoder(x)
        loc, scale = out[..., :self.d], F.softplus(out[..., self.d:]) + self.min_scale
        q = torch.distributions.Normal(loc, scale, validate_args=validate_args)
        # the same draw as Normal.rsample of the guide expanded to [k, batch, d]
        eps = torch.empty((k,) + loc.shape, dtype=loc.dtype, device=loc.device).normal_()
        z = loc + eps * scale
        log_q = q.log_prob(z).sum(-1)
        log_prior = torch.distributions.Normal(torch.zeros_like(loc), torch.ones_like(loc),
                                               validate_args=validate_args).log_prob(z).sum(-1)
        log_lik = torch.distributions.Bernoulli(logits=self.decoder(z), validate_args=validate_args
                                                ).log_prob(x).sum(-1)
        return log_lik + log_prior - log_q

    @torch.no_grad()
    def log_likelihood(self, x, num_samples, rows, particles, seed):
        """Per-row logsumexp_k log w - log K with the given chunking; returns a CPU tensor."""
        torch.manual_seed(seed)
        out = []
        first = True
        for start in range(0, x.shape[0], rows):
            xb = x[start:start + rows]
            acc = torch.full((xb.shape[0],), -math.inf, dtype=torch.float64, device=x.device)
            done = 0
            while done < num_samples:
                k = min(particles, num_samples - done)
                # like log_likelihood: argument checks (if enabled) on the first chunk only
                lw = self.log_weights(xb, k, None if first else False)
                first = False
                acc = torch.logaddexp(acc, torch.logsumexp(lw.double(), dim=0))
                done += k
            out.append(acc - math.log(num_samples))
        return torch.cat(out).cpu()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="binarized_mnist.npz file or its directory")
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3, help="timed repetitions of each side")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--max-elements", type=int, default=None,
                    help="chunk element budget (default: log_likelihood's)")
    ap.add_argument("--validation", default="on", choices=["on", "off", "both"],
                    help="Pyro / torch.distributions argument validation for both sides")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--smoke", action="store_true", help="tiny run: 100 rows x 50 samples, 2 repeats")
    return ap


def _time(fn, device):
    """Wall-clock and process CPU seconds of ``fn()`` (the CPU time is the steadier measure on
    a shared machine; the wall time is the throughput a user sees)."""
    common.sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    common.sync(device)
    return time.perf_counter() - t0, time.process_time() - c0, out


def run_once(model, hand, x, args, device, validate: bool) -> dict:
    from pyro_lvm.inference.engine import default_max_elements
    from pyro_lvm.inference.evaluate import log_likelihood

    budget = args.max_elements or default_max_elements(device)
    draws = x.shape[0] * args.num_samples
    ours_t, hand_t, ours_c, hand_c, ours_m, hand_m = [], [], [], [], [], []
    ours = theirs = None
    with pyro.validation_enabled(validate):
        # warm-up (allocator, kernels, lazy inits) on both sides, untimed
        est = log_likelihood(model, x[:min(64, len(x))], min(args.num_samples, 16), device=device,
                             progress=False, max_elements=budget)
        hand.log_likelihood(x[:min(64, len(x))], min(args.num_samples, 16),
                            min(64, len(x)), min(args.num_samples, 16), args.seed)
        for _ in range(args.repeats):
            with common.PeakMemory(device) as mem:
                t, c, est = _time(lambda: log_likelihood(model, x, args.num_samples,
                                                         device=device, seed=args.seed,
                                                         progress=False, max_elements=budget),
                                  device)
            ours_t.append(t)
            ours_c.append(c)
            ours_m.append(mem.peak_bytes)
            ours = est
            with common.PeakMemory(device) as mem:
                t, c, theirs = _time(lambda: hand.log_likelihood(x, args.num_samples,
                                                                 est.rows_per_chunk,
                                                                 est.particles_per_chunk,
                                                                 args.seed), device)
            hand_t.append(t)
            hand_c.append(c)
            hand_m.append(mem.peak_bytes)
    ours_rate = draws / statistics.median(ours_t)
    hand_rate = draws / statistics.median(hand_t)
    diff = np.abs(ours.per_row["log_px"].to_numpy() - theirs.numpy())
    return dict(validation=validate, rows_per_chunk=ours.rows_per_chunk,
                particles_per_chunk=ours.particles_per_chunk, ours_draws_per_s=ours_rate,
                hand_draws_per_s=hand_rate, ratio=ours_rate / hand_rate,
                cpu_time_ratio=statistics.median(hand_c) / statistics.median(ours_c),
                ours_times_s=ours_t, hand_times_s=hand_t, ours_cpu_s=ours_c, hand_cpu_s=hand_c,
                ours_peak_mib=max(ours_m) / 2**20, hand_peak_mib=max(hand_m) / 2**20,
                max_abs_diff=float(diff.max()), log_px=ours.mean, mc_se=ours.mc_se)


def main(args=None) -> dict:
    """Run the benchmark; ``args`` is an argv list (None: sys.argv) or a parsed Namespace.
    Returns ``{"runs": [...], "pass": bool}``."""
    if not isinstance(args, argparse.Namespace):
        args = build_parser().parse_args(args)
    if args.smoke:
        args.rows, args.num_samples, args.repeats = 100, 50, 2
    from pyro_lvm.inference.engine import resolve_device
    from pyro_lvm.models.dlvm import DLVM

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    x = load_mnist_split(args.data, "test", args.rows).to(device)
    torch.manual_seed(args.seed)
    model = DLVM(784, 50, hidden=(200, 200), likelihood="bernoulli").to(device)
    hand = HandWrittenIWAE(model)
    settings = {"on": [True], "off": [False], "both": [True, False]}[args.validation]
    runs = [run_once(model, hand, x, args, device, v) for v in settings]

    print(f"\neval_throughput: IWAE_{args.num_samples} log-likelihood of {args.rows} binarized-MNIST "
          f"rows, Bernoulli DLVM(784, 50, hidden=(200, 200)), device {device}, torch "
          f"{torch.__version__}, {args.repeats} alternating repetitions (median)")
    header = (f"  {'validation':<11}{'chunk':>12}{'ours draws/s':>15}{'hand draws/s':>15}"
              f"{'ratio':>8}{'cpu-time ratio':>16}{'max |diff|':>12}{'peak MiB ours':>15}"
              f"{'peak MiB hand':>15}")
    print(header)
    for r in runs:
        chunk = f"{r['rows_per_chunk']}x{r['particles_per_chunk']}"
        print(f"  {'on' if r['validation'] else 'off':<11}{chunk:>12}{r['ours_draws_per_s']:>15,.0f}"
              f"{r['hand_draws_per_s']:>15,.0f}{r['ratio']:>8.3f}{r['cpu_time_ratio']:>16.3f}"
              f"{r['max_abs_diff']:>12.2e}{r['ours_peak_mib']:>15,.1f}{r['hand_peak_mib']:>15,.1f}")
    print("  ratio = ours / hand-written throughput (wall clock, median); cpu-time ratio = "
          "hand / ours process CPU time (steadier on a shared machine)")
    peak = "CUDA allocator peak" if device.type == "cuda" else "sampled resident set size"
    print(f"  peak MiB = largest {peak} above the level before each call (max over repetitions); "
          f"process peak RSS {peak_rss_bytes() / 2**20:,.0f} MiB")
    # float32 network, float64 accumulation on both sides: differences at float32 rounding
    tolerance = 1e-3
    same = all(r["max_abs_diff"] < tolerance for r in runs)
    ok = all(r["ratio"] >= TARGET_RATIO for r in runs)
    print(f"  same per-row estimates (max |diff| < {tolerance:g} nats): {'yes' if same else 'NO'}")
    print(f"  ratio ours / hand-written >= {TARGET_RATIO}: {'PASS' if ok else 'FAIL'}")
    return {"runs": runs, "same_estimates": same, "pass": ok and same}


if __name__ == "__main__":
    out = main()
    sys.exit(0 if out["pass"] else 1)
