"""Shared helpers of the benchmark scripts: command-line flags, data, a hand-written PyTorch
mirror of the Bernoulli DLVM, timing and table printing.

Every benchmark script in this folder is run as ``python benchmarks/<name>.py [flags]`` from a
checkout (no install needed) and exposes ``main(args)``, where ``args`` is an argv list or an
``argparse.Namespace``; ``--smoke`` makes a run that takes seconds (used by
``tests/test_benchmarks_smoke.py``).

Data: statically binarized MNIST (Larochelle & Murray 2011; 50,000 / 10,000 / 10,000 rows of
784 pixels), read from ``--data`` (a file or a directory holding ``binarized_mnist.npz``), else
``$PYRO_LVM_DATA``, else ``../shared/data/binarized_mnist.npz`` next to the repository. The
file stores each split bit-packed: ``np.unpackbits(a, axis=1)[:, :784]``.
"""
from __future__ import annotations

import argparse
import math
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from a checkout (not installed)
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

__all__ = [
    "REPO_ROOT", "ARCHITECTURES", "LOG_2PI",
    "mnist_path", "subset_rows", "load_binarized_mnist", "add_common_arguments", "parse",
    "setup_runtime",
    "sync", "Stopwatch", "PeakMemory", "median_and_spread", "machine_description", "format_table",
    "MirrorVAE", "copy_dlvm_weights",
]

LOG_2PI = math.log(2.0 * math.pi)

#: Network shapes of the literature for statically binarized MNIST, one stochastic layer.
#: ``burda``: Burda, Grosse & Salakhutdinov (2016), 784-200-200-50 with tanh, encoder and
#: decoder mirrored. ``tomczak``: Tomczak & Welling (2018), 784-300-300-40 with gated dense
#: hidden layers, h = (W1 u + b1) * sigmoid(W2 u + b2) (``activation="gated"``,
#: :class:`models.networks.GatedLinear`); their encoder's log-variance head (hardtanh on
#: [-6, 2]) is our softplus scale head, the remaining difference (see benchmarks/README).
#: ``relu``: 784-300-300-40 with ReLU, the training-throughput benchmark's network.
ARCHITECTURES: Dict[str, dict] = {
    "relu": dict(hidden=(300, 300), latent_dim=40, activation="relu"),
    "burda": dict(hidden=(200, 200), latent_dim=50, activation="tanh"),
    "tomczak": dict(hidden=(300, 300), latent_dim=40, activation="gated"),
}
MNIST_SPLITS = ("train", "valid", "test")
MNIST_SHAPE = {"train": 50000, "valid": 10000, "test": 10000}


# ----------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------
def mnist_path(data=None) -> pathlib.Path:
    """``data`` (file or directory), else ``$PYRO_LVM_DATA``, else the shared copy."""
    raw = data or os.environ.get("PYRO_LVM_DATA")
    if raw:
        path = pathlib.Path(raw).expanduser()
        return path / "binarized_mnist.npz" if path.is_dir() else path
    return REPO_ROOT.parent / "shared" / "data" / "binarized_mnist.npz"


def subset_rows(total: int, n: Optional[int], how: str = "random", seed: int = 0) -> np.ndarray:
    """Indices of a fixed subset of ``n`` of ``total`` rows (all rows when ``n`` is None).

    ``how="random"``: a uniform sample without replacement from a generator with its own fixed
    ``seed`` (not the run's seed, so that every run evaluates the same rows), sorted.
    ``how="first"``: rows ``0..n-1``. Use ``"random"`` for anything statistical: the static
    binarized MNIST *test* split is ordered in blocks of similar digits (the mean number of
    black pixels per block of 1000 rows ranges from 60 to 133), so its first rows are not a
    representative sample.
    """
    if n is None or n == total:
        return np.arange(total)
    if not 1 <= n <= total:
        raise SystemExit(f"asked for {n} rows of a split that has {total}")
    if how == "first":
        return np.arange(n)
    if how != "random":
        raise ValueError(f"how must be 'random' or 'first', got {how!r}")
    return np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False))


def load_binarized_mnist(data=None, splits: Iterable[str] = MNIST_SPLITS,
                         rows: Optional[Dict[str, int]] = None, subset: str = "random",
                         return_indices: bool = False):
    """Splits of statically binarized MNIST as float32 0/1 tensors ``[n, 784]``.

    Parameters
    ----------
    data : str or path, optional
        See :func:`mnist_path`.
    splits : iterable of {"train", "valid", "test"}
    rows : dict split -> int, optional
        Keep a fixed subset of ``rows[split]`` rows of a split (see :func:`subset_rows`).
    subset : {"random", "first"}
        How that subset is chosen (:func:`subset_rows`).
    return_indices : bool
        Also return ``{split: row indices into the full split}``.

    Raises
    ------
    SystemExit
        The file is missing, lacks a split, or has fewer rows than asked for (a message that
        says which and how to point at the data).
    """
    path = mnist_path(data)
    if not path.exists():
        raise SystemExit(f"binarized MNIST not found at {path}; pass --data PATH (the .npz file "
                         f"or its directory) or set PYRO_LVM_DATA")
    rows = rows or {}
    out, indices = {}, {}
    with np.load(path) as archive:
        for split in splits:
            if split not in archive.files:
                raise SystemExit(f"{path} has no split {split!r} (it has {archive.files})")
            packed = archive[split]
            idx = subset_rows(packed.shape[0], rows.get(split), subset)
            if len(idx) != packed.shape[0]:
                packed = packed[idx]
            pixels = np.unpackbits(packed, axis=1)[:, :784]
            out[split] = torch.from_numpy(pixels.astype(np.float32))
            indices[split] = idx
    return (out, indices) if return_indices else out


# ----------------------------------------------------------------------------------------
# command line and runtime
# ----------------------------------------------------------------------------------------
def add_common_arguments(parser: argparse.ArgumentParser, *, data: bool = True) -> None:
    """``--device``, ``--seed``, ``--threads``, ``--smoke`` (and ``--data``)."""
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where to run (auto: cuda when available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch and BLAS threads (default: the libraries' own; 1 with "
                             "--smoke). "
                             "On a shared, loaded machine use 1: idle-waiting OpenMP threads "
                             "made a training step 20-30x slower with 2 threads on 2 busy cores")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny run that takes seconds (for tests)")
    if data:
        parser.add_argument("--data", default=None,
                            help="binarized_mnist.npz or its directory (default: $PYRO_LVM_DATA, "
                                 "else ../shared/data/binarized_mnist.npz)")


def parse(parser: argparse.ArgumentParser, args) -> argparse.Namespace:
    """``args`` may be a Namespace (returned as is), an argv list, or None (``sys.argv``)."""
    if isinstance(args, argparse.Namespace):
        return args
    return parser.parse_args(args)


def setup_runtime(args: argparse.Namespace) -> torch.device:
    """Apply ``--threads`` (``--smoke`` defaults to 1) to torch and to the BLAS thread pools of
    numpy/scikit-learn (threadpoolctl), and return the device of ``--device``."""
    from pyro_lvm.inference.engine import resolve_device

    threads = getattr(args, "threads", None)
    if threads is None and getattr(args, "smoke", False):
        threads = 1
    if threads:
        torch.set_num_threads(int(threads))
        # numpy/scipy/scikit-learn BLAS pools too, so that comparisons run alike
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=int(threads))
    return resolve_device(args.device)


# ----------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------
def sync(device) -> None:
    """Wait for queued GPU work (timings on CUDA are otherwise meaningless)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """``with Stopwatch(device) as sw: ...`` then ``sw.seconds`` (device synchronized)."""

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.seconds = math.nan

    def __enter__(self) -> "Stopwatch":
        sync(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        self.seconds = time.perf_counter() - self._start


def _rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class PeakMemory:
    """``with PeakMemory(device) as pm: ...`` then ``pm.peak_bytes``: the largest memory in use
    during the block *above what was in use when it started* -- on CUDA the allocator's peak
    (``torch.cuda.max_memory_allocated``), on the CPU the resident set size sampled every
    ``interval`` seconds by a background thread (so a spike shorter than that can be missed)."""

    def __init__(self, device="cpu", interval: float = 0.002):
        self.device = torch.device(device)
        self.interval = interval
        self.peak_bytes = 0

    def __enter__(self) -> "PeakMemory":
        import threading

        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._base = _rss_bytes()
        self._peak = self._base
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self._peak = max(self._peak, _rss_bytes())
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _rss_bytes())
        self.peak_bytes = self._peak - self._base


def paired_speed_ratio(reference_seconds: Sequence[float], side_seconds: Sequence[float],
                       level: float = 0.95) -> Dict[str, float]:
    """Speed of a side relative to a reference, from repetitions that ran both in turn.

    Repetition ``r`` gives the paired ratio :math:`\\rho_r = t^{ref}_r / t^{side}_r` (step
    times of the two in the same repetition, so a load that drifts between repetitions
    cancels). Returns the geometric mean :math:`\\exp(\\bar\\ell)` of the ratios and Student's
    t interval of level ``level`` for it, :math:`\\exp(\\bar\\ell \\pm t_{n-1}\\, s_\\ell /
    \\sqrt n)` with :math:`\\ell_r = \\log \\rho_r` (``scipy.stats.ttest_1samp``), and ``n``;
    the bounds are nan with fewer than two repetitions. The interval treats the repetitions as
    independent draws of the machine's noise; it says how far one run's ratio may be from the
    ratio a longer run would give on that machine, not what another machine gives.
    """
    from scipy import stats

    if len(reference_seconds) != len(side_seconds) or not reference_seconds:
        raise ValueError(f"need the same number (>= 1) of repetitions of both, got "
                         f"{len(reference_seconds)} and {len(side_seconds)}")
    logs = np.log(np.asarray(reference_seconds, float) / np.asarray(side_seconds, float))
    center = float(np.exp(logs.mean()))
    if logs.size < 2 or not np.isfinite(logs).all():
        return dict(ratio=center, lower=math.nan, upper=math.nan, n=int(logs.size))
    if np.ptp(logs) == 0.0:  # no spread: the interval is the point (scipy would give nan)
        return dict(ratio=center, lower=center, upper=center, n=int(logs.size))
    interval = stats.ttest_1samp(logs, 0.0).confidence_interval(level)
    return dict(ratio=center, lower=float(np.exp(interval.low)),
                upper=float(np.exp(interval.high)), n=int(logs.size))


def median_and_spread(values: Sequence[float]) -> Tuple[float, float, float]:
    """(median, min, max) of the repetitions."""
    values = [float(v) for v in values]
    return statistics.median(values), min(values), max(values)


def page_faults() -> float:
    """Minor page faults of this process so far (``getrusage``; nan where unavailable): a
    step that gets a large buffer back from the operating system pays one per 4 KiB page."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return math.nan
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)


def allocator_description() -> str:
    """glibc malloc settings from the environment (they decide whether freed multi-MB
    tensors return to the operating system between steps)."""
    from pyro_lvm.inference.engine import KEEP_FREED_MEMORY_ENV, USER_ALLOCATOR_ENV

    keys = (*USER_ALLOCATOR_ENV, "GLIBC_TUNABLES", KEEP_FREED_MEMORY_ENV)
    found = [f"{k}={os.environ[k]}" for k in keys if k in os.environ]
    return ", ".join(found) if found else "malloc defaults (no MALLOC_* / GLIBC_TUNABLES set)"


def machine_description(device) -> str:
    """One line: CPU model, cores, torch threads, load average, versions, GPU name."""
    import pyro

    device = torch.device(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    parts = [f"{cpu}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}"]
    try:
        load = os.getloadavg()
        parts.append(f"load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} (1/5/15 min)")
    except OSError:
        pass
    if device.type == "cuda":
        parts.append(f"GPU {torch.cuda.get_device_name(device)}")
    parts.append(f"python {platform.python_version()}, torch {torch.__version__}, "
                 f"pyro {pyro.__version__}")
    return "; ".join(parts)


def format_table(rows: List[dict], columns: Sequence[Tuple[str, str, str]]) -> str:
    """Plain-text table. ``columns``: (key, header, format spec such as ``",.0f"`` or ``""``).
    Missing or None values print as ``-``."""
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        line = []
        for key, _, spec in columns:
            value = row.get(key)
            if value is None or (isinstance(value, float) and math.isnan(value) and spec):
                line.append("-")
            else:
                line.append(format(value, spec) if spec else str(value))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = []
    for j, row in enumerate(cells):
        lines.append("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# the hand-written PyTorch mirror of the Bernoulli DLVM
# ----------------------------------------------------------------------------------------
_ACTIVATION_MODULES = {"tanh": nn.Tanh, "relu": nn.ReLU, "softplus": nn.Softplus,
                       "elu": nn.ELU, "gelu": nn.GELU}


class _Gated(nn.Module):
    """(W1 u + b1) * sigmoid(W2 u + b2), the two maps stacked in one Linear named ``linear``
    (the parameter names of models.networks.GatedLinear, so weights copy across)."""

    def __init__(self, a: int, b: int):
        super().__init__()
        self.linear = nn.Linear(a, 2 * b)

    def forward(self, u):
        value, gate = self.linear(u).chunk(2, dim=-1)
        return value * torch.sigmoid(gate)


def _plain_mlp(in_dim: int, hidden: Sequence[int], out_dim: int, activation: str) -> nn.Sequential:
    layers: List[nn.Module] = []
    widths = (in_dim,) + tuple(hidden)
    for a, b in zip(widths[:-1], widths[1:]):
        layers += ([_Gated(a, b)] if activation == "gated"
                   else [nn.Linear(a, b), _ACTIVATION_MODULES[activation]()])
    layers.append(nn.Linear(widths[-1], out_dim))
    return nn.Sequential(*layers)


class MirrorVAE(nn.Module):
    """What one writes by hand in PyTorch for the Bernoulli DLVM with a standard normal prior:

    .. math::

        q(z \\mid x) = \\mathcal N(\\mu(x), \\operatorname{diag}\\sigma(x)^2),\\;
        \\sigma = \\operatorname{softplus}(\\cdot) + \\sigma_{\\min}, \\qquad
        z_k = \\mu + \\sigma \\odot \\varepsilon_k, \\qquad
        \\log w_k = \\log \\mathrm{Bern}(x \\mid \\mathrm{dec}(z_k)) + \\log\\mathcal N(z_k; 0, I)
        - \\log q(z_k \\mid x),

    with ``Linear``/activation stacks of the same widths as ``models.dlvm.DLVM`` (encoder
    ``p -> hidden -> 2d``, decoder ``d -> reversed(hidden) -> p``), written with
    ``torch.nn.functional`` (no ``torch.distributions``, no argument validation). The noise is
    drawn as one ``[K, batch, d]`` standard-normal tensor, the same draw (same order, same
    generator) as the Pyro guide's ``Normal(loc, scale).to_event(1)`` under a particle plate,
    so on the same seed both sides see the same :math:`\\varepsilon`.
    """

    def __init__(self, data_dim: int, latent_dim: int, hidden: Sequence[int] = (200, 200),
                 activation: str = "tanh", min_encoder_scale: float = 1e-5):
        super().__init__()
        self.data_dim, self.latent_dim = data_dim, latent_dim
        self.min_encoder_scale = float(min_encoder_scale)
        self.encoder = _plain_mlp(data_dim, hidden, 2 * latent_dim, activation)
        self.decoder = _plain_mlp(latent_dim, tuple(reversed(hidden)), data_dim, activation)

    @classmethod
    def from_dlvm(cls, model) -> "MirrorVAE":
        """A mirror of a Bernoulli / standard-normal ``DLVM`` holding copies of its weights."""
        from pyro_lvm.models.likelihoods import Bernoulli
        from pyro_lvm.models.priors import StandardNormalPrior

        if not isinstance(model.likelihood, Bernoulli) or not isinstance(model.prior,
                                                                          StandardNormalPrior):
            raise ValueError("the hand-written mirror covers the Bernoulli DLVM with the standard "
                             f"normal prior, got {type(model.likelihood).__name__} / "
                             f"{type(model.prior).__name__}")
        cfg = model.config
        if tuple(cfg["decoder_hidden"]) != tuple(reversed(cfg["encoder_hidden"])):
            raise ValueError("the mirror assumes the decoder widths mirror the encoder's")
        mirror = cls(model.data_dim, model.latent_dim, cfg["encoder_hidden"], cfg["activation"],
                     model.min_encoder_scale)
        copy_dlvm_weights(model, mirror)
        param = next(model.parameters())
        return mirror.to(device=param.device, dtype=param.dtype)

    def encode(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        out = self.encoder(x)
        d = self.latent_dim
        return out[..., :d], F.softplus(out[..., d:]) + self.min_encoder_scale

    def _log_weight_parts(self, x, num_particles: int, path_only_q: bool):
        loc, scale = self.encode(x)
        eps = torch.randn((num_particles,) + loc.shape, dtype=loc.dtype, device=loc.device)
        z = loc + scale * eps
        logits = self.decoder(z)
        log_lik = -F.binary_cross_entropy_with_logits(
            logits, x.expand(logits.shape), reduction="none").sum(-1)
        log_prior = -0.5 * (z.pow(2).sum(-1) + self.latent_dim * LOG_2PI)
        if path_only_q:
            # log q(z) with the guide's parameters held fixed: only the path through z counts
            loc_c, scale_c = loc.detach(), scale.detach()
            log_q = -0.5 * (((z - loc_c) / scale_c).pow(2).sum(-1) + self.latent_dim * LOG_2PI) \
                - scale_c.log().sum(-1)
        else:
            # (z - loc) / scale = eps, so log q needs no division; same total derivative
            log_q = -0.5 * (eps.pow(2).sum(-1) + self.latent_dim * LOG_2PI) - scale.log().sum(-1)
        return z, log_lik + log_prior - log_q

    def log_weights(self, x: torch.Tensor, num_particles: int = 1) -> torch.Tensor:
        """``[K, batch]`` log importance weights (gradients through the reparameterized draws)."""
        return self._log_weight_parts(x, num_particles, path_only_q=False)[1]

    def loss(self, x: torch.Tensor, objective: str = "elbo", num_particles: int = 1,
             gradient: str = "standard", num_data: Optional[int] = None) -> torch.Tensor:
        """``-(N/B) sum_i bound_i`` for ``objective`` "elbo" or "iwae" (``num_particles`` K).

        ``gradient="dreg"`` (IWAE only): the doubly reparameterized estimator of Tucker et al.
        (2019), written the way it is usually hand-coded: ``log q`` with the encoder outputs
        detached, decoder weighted by the normalized weights ``w~`` and a hook on ``z`` that
        multiplies the gradient flowing into the encoder by ``w~`` once more (so the encoder
        sees ``w~^2 d log w / dz``), one backward pass.
        """
        scale = 1.0 if num_data is None else num_data / x.shape[0]
        if gradient == "dreg":
            if objective != "iwae":
                raise ValueError("DReG is an estimator for the IWAE bound")
            z, lw = self._log_weight_parts(x, num_particles, path_only_q=True)
            normalized = torch.softmax(lw.detach(), dim=0)
            if z.requires_grad:
                z.register_hook(lambda g: g * normalized.unsqueeze(-1))
            bound = torch.logsumexp(lw.detach(), dim=0) - math.log(num_particles)
            surrogate = (normalized * lw).sum()
            return -scale * (bound.sum() + (surrogate - surrogate.detach()))
        if gradient != "standard":
            raise ValueError(f"gradient must be 'standard' or 'dreg', got {gradient!r}")
        lw = self.log_weights(x, num_particles)
        if objective == "elbo":
            bound = lw.mean(0)
        elif objective == "iwae":
            bound = torch.logsumexp(lw, dim=0) - math.log(num_particles)
        else:
            raise ValueError(f"objective must be 'elbo' or 'iwae', got {objective!r}")
        return -scale * bound.sum()


def copy_dlvm_weights(model, mirror: nn.Module) -> None:
    """Copy the encoder/decoder weights of a DLVM into a module with the same ``encoder.*`` /
    ``decoder.*`` parameter names (e.g. :class:`MirrorVAE`)."""
    source = {k: v for k, v in model.state_dict().items()
              if k.startswith(("encoder.", "decoder."))}
    target = mirror.state_dict()
    if set(source) != {k for k in target if k.startswith(("encoder.", "decoder."))}:
        raise ValueError(f"parameter names differ: DLVM {sorted(source)} vs mirror "
                         f"{sorted(target)}")
    for key, value in source.items():
        if target[key].shape != value.shape:
            raise ValueError(f"{key}: shape {tuple(value.shape)} in the DLVM, "
                             f"{tuple(target[key].shape)} in the mirror")
    mirror.load_state_dict(source, strict=False)
