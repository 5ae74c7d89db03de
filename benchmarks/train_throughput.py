"""Training throughput of ``inference.fit`` against a hand-written PyTorch training loop.

Same network, objective, minibatches, optimizer and device on both sides, one process:

* **fit**: ``inference.fit.fit(DLVM, rows, objective=..., epochs=1, batch_size=B)`` -- the
  library as a user calls it (the objectives of ``inference.objectives`` on the DLVM's
  Pyro-free path, fit's NaN guard, history and callbacks, and fit's default optimizer, Adam
  with torch's fused kernel); **fit+compile**: the same with ``objective(..., compile=True)``;
* **loop**: the same (eager) objective object (``objective.differentiable_loss(model.model,
  model.guide, xb, num_data=N)``) in a bare ``zero_grad / backward / Adam.step`` loop with
  torch's default Adam, which separates the cost of the objectives from that of ``fit``;
* **hand**: :class:`common.MirrorVAE`, the DLVM written out in ``torch.nn.functional``
  (weights copied from the DLVM), the bound computed by hand, DReG with the usual one-backward
  hook on ``z``, and ``torch.optim.Adam`` as one writes it (``Adam(params, lr)``, torch's
  default implementation on the CPU). **hand+fused** is the same loop with
  ``Adam(..., fused=True)``, shown so that the part of the difference that comes from the
  optimizer kernel is visible.

Each loop visits ``steps`` minibatches of ``B`` rows in a random order, calls ``Adam.step`` and
reads the loss back to the host (``loss.item()``) every step, as any training loop that logs
its loss does. The repetitions alternate (fit, loop, hand, then hand, loop, fit, ...), so that
all sides see the same machine state. Throughput is rows per second at the *median step time*
over all steps of all repetitions (the first step of each repetition, with its lazy
initialisations, excluded): on a shared machine the median resists bursts of load that a mean
does not; ``[min-max]`` is the range of the per-repetition throughputs. The end-to-end rate of
the whole ``fit`` call (data validation, contract check, setup) is printed too.

Before timing, every objective is checked to be the *same* on both sides: on one minibatch
and the same seed (so the same noise draws) the loss values and every parameter gradient of
``fit``'s objective and of the hand-written one must agree to float32 rounding.

``--profile`` runs ``cProfile`` over one ``fit`` call per objective and prints where the time
goes (autograd backward, torch kernels called from Python, Pyro's Python code, pyro-lvm's
Python code) and the most expensive Python functions.

Usage::

    python benchmarks/train_throughput.py --smoke
    python benchmarks/train_throughput.py                          # ELBO, IWAE 5/50, DReG 50
    python benchmarks/train_throughput.py --validation both --profile
    python benchmarks/train_throughput.py --device cuda --steps 200 --steps-large 100
"""
from __future__ import annotations

import argparse
import cProfile
import json
import math
import pathlib
import pstats
import sys
import time

BENCH_DIR = pathlib.Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import common  # noqa: E402  (puts the repository on sys.path)
if pathlib.Path(common.__file__).resolve().parent != BENCH_DIR:  # another 'common' module
    raise ImportError(f"benchmarks/common.py expected, got {common.__file__}")
import pyro  # noqa: E402
import torch  # noqa: E402

TARGET_RATIO = 1.0
#: name -> (objective kind, K, gradient estimator)
OBJECTIVES = {
    "elbo": ("elbo", 1, "standard"),
    "iwae_5": ("iwae", 5, "standard"),
    "iwae_50": ("iwae", 50, "standard"),
    "iwae_50_dreg": ("iwae", 50, "dreg"),
}
#: K from which --steps-large applies
LARGE_K = 20
# float32 network, sums over 784 pixels and B rows: the two sides differ by rounding only
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-3


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(ap)
    ap.add_argument("--objectives", nargs="+", default=list(OBJECTIVES),
                    choices=list(OBJECTIVES), help="which objectives to time")
    ap.add_argument("--architecture", default="burda", choices=list(common.ARCHITECTURES))
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--steps", type=int, default=50,
                    help="optimizer steps per timed repetition (K < %d)" % LARGE_K)
    ap.add_argument("--steps-large", type=int, default=10,
                    help="optimizer steps per timed repetition for K >= %d" % LARGE_K)
    ap.add_argument("--repeats", type=int, default=7, help="alternating repetitions per side")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--validation", default="on", choices=["on", "off", "both"],
                    help="Pyro/torch.distributions argument validation (Pyro's default is on)")
    ap.add_argument("--compile", default="both", choices=["off", "on", "both"],
                    help="time fit with the eager objective (off), with compile=True (on), or "
                         "both; compiling takes seconds per objective (reported)")
    ap.add_argument("--profile", action="store_true",
                    help="cProfile one fit call per objective and print where the time goes")
    ap.add_argument("--profile-steps", type=int, default=20)
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    return ap


def _apply_smoke(args) -> None:
    args.steps, args.steps_large, args.repeats, args.profile_steps = 3, 3, 1, 3
    args.batch_size = 16
    args.smoke_architecture = dict(hidden=(32,), latent_dim=4, activation="tanh")
    # compiling takes seconds per objective; tests/test_pyro_free_path.py covers compile=True
    args.compile = "off"


# ----------------------------------------------------------------------------------------
# the three training loops
# ----------------------------------------------------------------------------------------
class _StepClock:
    """fit callback: a timestamp after every optimizer step."""

    def __init__(self):
        self.times = []

    def on_step_end(self, state):
        self.times.append(time.perf_counter())


def _steady_rate(times, batch_size) -> float:
    if len(times) < 2:
        return math.nan
    return batch_size * (len(times) - 1) / (times[-1] - times[0])


def _step_durations(times):
    """Durations of steps 2..n (the timestamps are taken after each step)."""
    return [b - a for a, b in zip(times[:-1], times[1:])]


def run_fit(model, rows, objective, args, device) -> dict:
    from pyro_lvm.inference.fit import fit

    clock = _StepClock()
    with common.Stopwatch(device) as sw:
        result = fit(model, rows, objective=objective, epochs=1, batch_size=args.batch_size,
                     lr=args.lr, seed=args.seed, device=device, progress=False,
                     callbacks=[clock])
    return dict(rate=_steady_rate(clock.times, args.batch_size),
                durations=_step_durations(clock.times),
                end_to_end=rows.shape[0] / sw.seconds, last_loss=result.step_losses[-1])


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
        times, losses = [], []
        for start in range(0, n, args.batch_size):
            xb = x.index_select(0, order[start:start + args.batch_size])
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(xb, n)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            times.append(time.perf_counter())
    return dict(rate=_steady_rate(times, args.batch_size), durations=_step_durations(times),
                end_to_end=n / sw.seconds, last_loss=losses[-1])


def run_loop(model, rows, objective, args, device) -> dict:
    from pyro_lvm.inference.engine import isolated_param_store

    model.to(device)
    with isolated_param_store():
        return _plain_loop(list(model.parameters()), rows,
                           lambda xb, n: objective.differentiable_loss(model.model, model.guide,
                                                                       xb, num_data=n),
                           args, device)


def run_hand(mirror, rows, spec, args, device, fused: bool = False) -> dict:
    kind, k, gradient = spec
    mirror.to(device)
    return _plain_loop(list(mirror.parameters()), rows,
                       lambda xb, n: mirror.loss(xb, kind, k, gradient, num_data=n), args, device,
                       fused=fused)


# ----------------------------------------------------------------------------------------
# checks and profile
# ----------------------------------------------------------------------------------------
def same_objective_check(model, mirror, objective, spec, x, num_data, seed) -> dict:
    """Loss and gradients of the library objective and the hand-written one on the same
    minibatch with the same noise draws (same seed); returns the relative differences."""
    from pyro_lvm.inference.engine import isolated_param_store

    kind, k, gradient = spec
    model.zero_grad(set_to_none=True)
    mirror.zero_grad(set_to_none=True)
    with isolated_param_store():
        pyro.set_rng_seed(seed)
        ours = objective.differentiable_loss(model.model, model.guide, x, num_data=num_data)
        ours.backward()
    pyro.set_rng_seed(seed)
    theirs = mirror.loss(x, kind, k, gradient, num_data=num_data)
    theirs.backward()
    loss_rel = abs(ours.item() - theirs.item()) / max(abs(theirs.item()), 1e-30)
    ours_grads = dict(model.named_parameters())
    grad_rel = 0.0
    for name, p in mirror.named_parameters():
        g_ours, g_hand = ours_grads[name].grad, p.grad
        denom = g_hand.abs().max().clamp_min(1e-30)
        grad_rel = max(grad_rel, float((g_ours - g_hand).abs().max() / denom))
    model.zero_grad(set_to_none=True)
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


def profile_fit(model, rows, objective, args, device, top: int = 12) -> dict:
    """cProfile of one fit call; self time grouped by where the code lives, top functions."""
    from pyro_lvm.inference.fit import fit

    profiler = cProfile.Profile()
    profiler.enable()
    with common.Stopwatch(device) as sw:
        fit(model, rows, objective=objective, epochs=1, batch_size=args.batch_size, lr=args.lr,
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
def _make_objective(name, compile: bool = False):
    from pyro_lvm.inference.objectives import ELBO, IWAE

    kind, k, gradient = OBJECTIVES[name]
    if kind == "elbo":
        return ELBO(compile=compile)
    return IWAE(num_particles=k, gradient=gradient, compile=compile)


def _compile_available(model, x) -> str:
    """'' when torch.compile works here, else the reason (e.g. no C++ compiler)."""
    from pyro_lvm.inference.objectives import ELBO

    try:
        ELBO(compile=True)(model.model, model.guide, x[:2]).backward()
    except Exception as exc:  # inductor raises a variety of errors without a toolchain
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        model.zero_grad(set_to_none=True)
    return ""


def main(args=None) -> dict:
    """Run the benchmark; ``args``: argv list, Namespace or None. Returns the results dict."""
    args = common.parse(build_parser(), args)
    args.smoke_architecture = None
    if args.smoke:
        _apply_smoke(args)
    device = common.setup_runtime(args)
    from pyro_lvm.models.dlvm import DLVM

    arch = args.smoke_architecture or common.ARCHITECTURES[args.architecture]
    largest = max(args.steps, args.steps_large)
    need = largest * args.batch_size * (2 if args.smoke else 1)
    train = common.load_binarized_mnist(args.data, ["train"], rows={"train": min(need, 50000)})[
        "train"]
    settings = {"on": [True], "off": [False], "both": [True, False]}[args.validation]

    torch.manual_seed(args.seed)
    model = DLVM(784, arch["latent_dim"], hidden=arch["hidden"], activation=arch["activation"],
                 likelihood="bernoulli", prior="normal")
    mirror = common.MirrorVAE.from_dlvm(model)
    results, checks, profiles = [], {}, {}
    # The checks run on the CPU before any training (identical weights on both sides): the
    # objective's arithmetic does not depend on the device, and the CPU generator gives both
    # sides the same noise, which CUDA's randn / normal_ kernels need not do.
    for name in args.objectives:
        with pyro.validation_enabled(True):
            checks[name] = same_objective_check(model, mirror, _make_objective(name),
                                                OBJECTIVES[name], train[:args.batch_size],
                                                train.shape[0], args.seed)
    model.to(device)
    mirror.to(device)
    compile_modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    compile_unavailable = ""
    if True in compile_modes:
        compile_unavailable = _compile_available(model, train)
        if compile_unavailable:
            print(f"  torch.compile is not available here ({compile_unavailable}); timing the "
                  f"eager objectives only")
            compile_modes = [False]
    compile_seconds = {}
    for name in args.objectives:
        spec = OBJECTIVES[name]
        objectives = {c: _make_objective(name, compile=c) for c in compile_modes}
        steps = args.steps_large if spec[1] >= LARGE_K else args.steps
        rows = train[:steps * args.batch_size]
        # every side and setting alternates inside the same repetitions, so all of them see
        # the same (shared, loaded) machine
        sides = ([("fit", v, c) for v in settings for c in compile_modes]
                 + [("loop", v, False) for v in settings]
                 + [("hand", None, False), ("hand_fused", None, False)])

        def run_side(kind, validate, compiled, data):
            if kind.startswith("hand"):  # plain tensors, no torch.distributions: no validation
                return run_hand(mirror, data, spec, args, device, fused=kind == "hand_fused")
            with pyro.validation_enabled(validate):
                if kind == "fit":
                    return run_fit(model, data, objectives[compiled], args, device)
                return run_loop(model, data, objectives[False], args, device)

        if True in compile_modes:
            # the first compiled step compiles (per objective, shape and grad mode)
            with common.Stopwatch(device) as sw:
                run_side("fit", settings[0], True, rows[:2 * args.batch_size])
            compile_seconds[name] = sw.seconds
        if not args.smoke:
            # untimed warm-up of every path (allocator, lazy initialisations)
            for side in sides:
                run_side(*side, rows[:2 * args.batch_size])
        timed = {side: [] for side in sides}
        for rep in range(args.repeats):
            for side in (sides if rep % 2 == 0 else sides[::-1]):
                timed[side].append(run_side(*side, rows))

        def summary(outs):
            durations = [d for o in outs for d in o["durations"]]
            median_ms = 1e3 * common.median_and_spread(durations)[0]
            _, lo, hi = common.median_and_spread([o["rate"] for o in outs])
            return dict(median_step_ms=median_ms, rows_per_s=1e3 * args.batch_size / median_ms,
                        min=lo, max=hi,
                        end_to_end=common.median_and_spread([o["end_to_end"] for o in outs])[0])

        hand = summary(timed[("hand", None, False)])
        hand_fused = summary(timed[("hand_fused", None, False)])
        for validate in settings:
            loop = summary(timed[("loop", validate, False)])
            for compiled in compile_modes:
                row = dict(objective=name, k=spec[1], gradient=spec[2], validation=validate,
                           compiled=compiled, steps=steps, batch_size=args.batch_size)
                for kind, stats in (("fit", summary(timed[("fit", validate, compiled)])),
                                    ("loop", loop), ("hand", hand), ("hand_fused", hand_fused)):
                    for key, value in stats.items():
                        row[f"{kind}_{key}"] = value
                row["ratio_fit"] = row["fit_rows_per_s"] / row["hand_rows_per_s"]
                row["ratio_fit_vs_hand_fused"] = (row["fit_rows_per_s"]
                                                  / row["hand_fused_rows_per_s"])
                row["ratio_loop"] = row["loop_rows_per_s"] / row["hand_rows_per_s"]
                row["overhead_ms_per_step"] = (row["fit_median_step_ms"]
                                               - row["hand_median_step_ms"])
                results.append(row)
        if args.profile:
            with pyro.validation_enabled(settings[0]):
                profiles[name] = profile_fit(model, train[:args.profile_steps * args.batch_size],
                                             objectives[False], args, device)

    arch_text = (f"{784}-{'-'.join(map(str, arch['hidden']))}-{arch['latent_dim']} "
                 f"{arch['activation']}")
    print(f"\ntrain_throughput: Bernoulli DLVM {arch_text} (decoder mirrored), batch "
          f"{args.batch_size}, Adam lr {args.lr}, device {device}")
    print(f"  machine: {common.machine_description(device)}")
    print(f"  steady-state rows/s at the median step time over {args.repeats} alternating "
          f"repetitions [min-max of the per-repetition rates]; ratio = ours / hand-written "
          f"(target >= {TARGET_RATIO} on CPU); fit uses fused Adam, 'hand' torch's default "
          f"Adam, 'hand+fused' fused Adam\n")
    table = []
    for r in results:
        table.append(dict(
            objective=r["objective"], validation="on" if r["validation"] else "off",
            compiled="yes" if r["compiled"] else "no", steps=r["steps"],
            fit=f"{r['fit_rows_per_s']:,.0f} [{r['fit_min']:,.0f}-{r['fit_max']:,.0f}]",
            loop=f"{r['loop_rows_per_s']:,.0f}",
            hand=f"{r['hand_rows_per_s']:,.0f} [{r['hand_min']:,.0f}-{r['hand_max']:,.0f}]",
            hand_fused=f"{r['hand_fused_rows_per_s']:,.0f}",
            ratio_fit=r["ratio_fit"], ratio_fused=r["ratio_fit_vs_hand_fused"],
            ratio_loop=r["ratio_loop"], overhead=r["overhead_ms_per_step"],
            e2e=r["fit_end_to_end"]))
    print(common.format_table(table, [
        ("objective", "objective", ""), ("validation", "valid.", ""),
        ("compiled", "compile", ""), ("steps", "steps", "d"),
        ("fit", "fit rows/s", ""), ("loop", "obj-in-loop rows/s", ""),
        ("hand", "hand rows/s", ""), ("hand_fused", "hand+fused rows/s", ""),
        ("ratio_fit", "fit/hand", ".3f"), ("ratio_fused", "fit/hand+fused", ".3f"),
        ("ratio_loop", "loop/hand", ".3f"), ("overhead", "fit-hand ms/step", "+.2f"),
        ("e2e", "fit end-to-end rows/s", ",.0f")]))
    if compile_seconds:
        print("\n  first compiled fit call (compilation included), seconds: "
              + ", ".join(f"{k} {v:.1f}" for k, v in compile_seconds.items()))
    print("\n  same objective on the same batch and noise (loss and all parameter gradients):")
    print(common.format_table(
        [dict(objective=n, **c, same_text="yes" if c["same"] else "NO") for n, c in checks.items()],
        [("objective", "objective", ""), ("loss_ours", "loss ours", ".6g"),
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
    all_same = all(c["same"] for c in checks.values())
    print(f"\n  every objective identical to the hand-written one: {'yes' if all_same else 'NO'}")
    for compiled in compile_modes:
        rows_c = [r for r in results if r["compiled"] == compiled]
        passed_c = all(r["ratio_fit"] >= TARGET_RATIO for r in rows_c)
        print(f"  fit{' (compile=True)' if compiled else ' (eager)'} / hand-written >= "
              f"{TARGET_RATIO} for every objective: {'PASS' if passed_c else 'FAIL'} "
              f"(lowest {min(r['ratio_fit'] for r in rows_c):.3f})")
    passed = all(r["ratio_fit"] >= TARGET_RATIO for r in results if not r["compiled"])
    out = dict(results=results, checks=checks, profiles=profiles, same_objective=all_same,
               pass_target=passed, compile_seconds=compile_seconds,
               compile_unavailable=compile_unavailable,
               machine=common.machine_description(device), device=str(device),
               architecture=arch_text)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return out


if __name__ == "__main__":
    result = main()
    sys.exit(0 if result["same_objective"] else 1)
