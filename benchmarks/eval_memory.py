"""Peak memory of the importance-sampled log-likelihood evaluation.

Runs :func:`inference.evaluate.log_likelihood` with ``num_samples`` = 5000 importance samples
on the 10,000 binarized-MNIST test rows, with a Bernoulli DLVM
(``DLVM(784, 50, hidden=(200, 200), likelihood="bernoulli")``; untrained weights are fine for
memory, which depends on shapes only), and prints the peak resident set size of the process
(``resource.getrusage(...).ru_maxrss``) and, on a GPU, ``torch.cuda.max_memory_allocated``.
Target: peak RSS < 4 GiB, whatever ``num_samples`` (rows and particles are streamed in chunks).

Usage::

    python benchmarks/eval_memory.py                       # full size (slow on a CPU)
    python benchmarks/eval_memory.py --smoke               # 200 rows x 100 samples
    python benchmarks/eval_memory.py --rows 1000 --num-samples 5000 --device cuda

The data file comes from ``--data``, else ``$PYRO_LVM_DATA`` (a file or a directory holding
``binarized_mnist.npz``), else ``../shared/data/binarized_mnist.npz`` next to the repository.
"""
from __future__ import annotations

import argparse
import pathlib
import resource
import sys
import time

BENCH_DIR = pathlib.Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import common  # noqa: E402  (puts the repository on sys.path)
if pathlib.Path(common.__file__).resolve().parent != BENCH_DIR:  # another 'common' module
    raise ImportError(f"benchmarks/common.py expected, got {common.__file__}")
from common import mnist_path  # noqa: E402

TARGET_GIB = 4.0
GIB = 1024 ** 3


def load_mnist_split(data=None, split: str = "test", rows=None) -> torch.Tensor:
    """One split of bit-packed binarized MNIST as a float32 0/1 tensor ``[rows, 784]``."""
    path = mnist_path(data)
    if not path.exists():
        raise SystemExit(f"binarized MNIST not found at {path}; pass --data PATH or set "
                         f"PYRO_LVM_DATA")
    with np.load(path) as z:
        if split not in z.files:
            raise SystemExit(f"{path} has no split {split!r} (found {z.files})")
        packed = z[split]
    if rows is not None:
        if rows > packed.shape[0]:
            raise SystemExit(f"--rows {rows} exceeds the {packed.shape[0]} rows of split {split!r}")
        packed = packed[:rows]
    return torch.from_numpy(np.unpackbits(packed, axis=1)[:, :784].astype(np.float32))


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="binarized_mnist.npz file or its directory")
    ap.add_argument("--rows", type=int, default=10000, help="test rows (default 10000)")
    ap.add_argument("--num-samples", type=int, default=5000, help="importance samples K (5000)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--max-elements", type=int, default=None,
                    help="chunk element budget (default: log_likelihood's)")
    ap.add_argument("--latent-dim", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="tiny run: 200 rows x 100 samples")
    ap.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return ap


def main(args=None) -> dict:
    """Run the benchmark; ``args`` is an argv list (None: sys.argv) or a parsed Namespace.
    Returns the measured numbers as a dict."""
    if not isinstance(args, argparse.Namespace):
        args = build_parser().parse_args(args)
    if args.smoke:
        args.rows, args.num_samples = 200, 100

    from pyro_lvm.inference.evaluate import log_likelihood
    from pyro_lvm.inference.engine import resolve_device
    from pyro_lvm.models.dlvm import DLVM

    device = resolve_device(args.device)
    x = load_mnist_split(args.data, "test", args.rows)
    rss_after_load = peak_rss_bytes()
    torch.manual_seed(args.seed)
    model = DLVM(784, args.latent_dim, hidden=(200, 200), likelihood="bernoulli")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    kwargs = {} if args.max_elements is None else {"max_elements": args.max_elements}
    t0 = time.perf_counter()
    est = log_likelihood(model, x, args.num_samples, device=device, seed=args.seed,
                         progress=not args.no_progress, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    peak = peak_rss_bytes()
    cuda_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    draws = args.rows * args.num_samples
    result = {
        "rows": args.rows, "num_samples": args.num_samples, "device": str(device),
        "rows_per_chunk": est.rows_per_chunk, "particles_per_chunk": est.particles_per_chunk,
        "elapsed_s": elapsed, "draws_per_s": draws / elapsed,
        "peak_rss_gib": peak / GIB, "rss_after_data_load_gib": rss_after_load / GIB,
        "cuda_max_allocated_gib": None if cuda_peak is None else cuda_peak / GIB,
        "log_px": est.mean, "mc_se": est.mc_se, "target_gib": TARGET_GIB,
        "pass": peak / GIB < TARGET_GIB,
    }
    print(f"\neval_memory: log_likelihood, Bernoulli DLVM(784, {args.latent_dim}, hidden=(200, 200)), "
          f"untrained, torch {torch.__version__}")
    width = 30
    rows = [
        ("rows x importance samples", f"{args.rows} x {args.num_samples} = {draws:,} draws"),
        ("device", str(device)),
        ("chunk (rows x particles)", f"{est.rows_per_chunk} x {est.particles_per_chunk}"),
        ("time", f"{elapsed:.1f} s ({draws / elapsed:,.0f} draws/s)"),
        ("peak RSS after data load", f"{rss_after_load / GIB:.3f} GiB"),
        ("peak RSS (ru_maxrss)", f"{peak / GIB:.3f} GiB  (target < {TARGET_GIB:g} GiB: "
                                 f"{'PASS' if result['pass'] else 'FAIL'})"),
    ]
    if cuda_peak is not None:
        rows.append(("torch.cuda.max_memory_allocated", f"{cuda_peak / GIB:.3f} GiB"))
    rows.append(("IS estimate of log p(x)", f"{est.mean:.2f} ± {est.mc_se:.2f} (MC se), "
                                            f"IWAE_{args.num_samples} (untrained model)"))
    for name, value in rows:
        print(f"  {name:<{width}} {value}")
    return result


if __name__ == "__main__":
    out = main()
    sys.exit(0 if out["pass"] else 1)
