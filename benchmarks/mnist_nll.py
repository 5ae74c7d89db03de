r"""Test negative log-likelihood of a DLVM on statically binarized MNIST, comparable to the
published numbers.

Trains ``models.dlvm.DLVM`` (Bernoulli observation model, one stochastic layer) on the 50,000
training rows with ``pyro_lvm.fit``, records the training and validation curves (10,000
validation rows, the training objective per row after every epoch) and then estimates on the
test rows

* the log-likelihood, :math:`\\frac1n\\sum_i \\log\\hat p(x_i)` with ``--eval-samples`` (5000)
  importance samples from the guide (``inference.evaluate.log_likelihood``; an IWAE_5000
  estimate: a stochastic lower bound, biased down by O(1/K)), with its Monte Carlo standard
  error and its standard error over test rows; NLL = minus it;
* the test ELBO (``inference.evaluate.elbo``), a looser bound;
* active units (Burda et al. 2016: :math:`\\mathrm{Var}_x E_q[z_u\\mid x] > 0.01`).

Published numbers to compare with (nats, statically binarized MNIST, test NLL, IWAE_5000):

=========================================  =======  ====================================
model                                       NLL      source
=========================================  =======  ====================================
VAE, k = 1 (ELBO), 784-200-200-50          88.71    Burda et al. 2016, appendix (static)
IWAE, k = 5                                 87.63    Burda et al. 2016, appendix (static)
IWAE, k = 50                                87.10    Burda et al. 2016, appendix (static)
VAE + VampPrior, 784-300-300-40 (gated)    85.57    Tomczak & Welling 2018
=========================================  =======  ====================================

The published numbers come from ~3280 epochs (Burda) or early stopping with patience 50 after
a 100-epoch KL warm-up (Tomczak & Welling); see benchmarks/README.md for the full recipes and
the flags that reproduce them (``--lr-schedule burda``, ``--warmup-epochs``,
``--early-stopping-patience``). A short CPU run is far from converged and is expected to be
several nats worse.

Outputs in ``--out`` (default ``runs/benchmarks/mnist_nll/<configuration>``): ``config.json``,
``curve.csv`` (rewritten after every epoch), ``results.json``, ``test_per_row.csv`` (per test
row: estimate, Monte Carlo se, ESS), ``fit_checkpoint.pt`` (the fit resumes from it when the
same command is run again) and ``model_state.pt``.

``--compare DIR_A DIR_B`` compares two finished runs on the test rows both evaluated: the
paired difference of the per-row estimates, :math:`\bar\Delta = \frac1n\sum_i
(\log\hat p_A(x_i) - \log\hat p_B(x_i))`, with standard error
:math:`\operatorname{sd}_i(\Delta_i)/\sqrt n` (it includes the Monte Carlo noise of both
estimates). Pairing removes the spread of log p(x) across digits, which dominates the
unpaired standard errors.

Usage::

    python benchmarks/mnist_nll.py --smoke
    python benchmarks/mnist_nll.py --objective elbo --epochs 10 --eval-rows 1000
    python benchmarks/mnist_nll.py --objective iwae --num-particles 5 --epochs 10
    python benchmarks/mnist_nll.py --objective iwae --num-particles 50 --lr-schedule burda \\
        --device cuda                                    # Burda et al.: 3280 epochs
    python benchmarks/mnist_nll.py --prior vamp --architecture tomczak --warmup-epochs 100 \\
        --early-stopping-patience 50 --epochs 2000 --lr 5e-4 --device cuda
    python benchmarks/mnist_nll.py --compare runs/benchmarks/mnist_nll/A runs/benchmarks/mnist_nll/B
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import tempfile
import time

BENCH_DIR = pathlib.Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import common  # noqa: E402  (puts the repository on sys.path)
if pathlib.Path(common.__file__).resolve().parent != BENCH_DIR:  # another 'common' module
    raise ImportError(f"benchmarks/common.py expected, got {common.__file__}")
import torch  # noqa: E402

#: (prior, objective, K) -> (published test NLL in nats, source)
PUBLISHED = {
    ("normal", "elbo", 1): (88.71, "Burda et al. 2016 (appendix, static MNIST): VAE k=1"),
    ("normal", "iwae", 5): (87.63, "Burda et al. 2016 (appendix, static MNIST): IWAE k=5"),
    ("normal", "iwae", 50): (87.10, "Burda et al. 2016 (appendix, static MNIST): IWAE k=50"),
    ("vamp", "elbo", 1): (85.57, "Tomczak & Welling 2018: VAE + VampPrior"),
}
#: Burda et al. (2016): stage i = 0..7 lasts 3^i epochs at learning rate lr * 10^(-i/7).
BURDA_STAGES = 8
BURDA_EPOCHS = sum(3 ** i for i in range(BURDA_STAGES))  # 3280


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(ap)
    ap.add_argument("--prior", default="normal", choices=["normal", "mixture", "vamp"])
    ap.add_argument("--objective", default="elbo", choices=["elbo", "iwae"])
    ap.add_argument("--num-particles", type=int, default=None,
                    help="K (default: 1 for elbo, 5 for iwae)")
    ap.add_argument("--gradient", default="standard", choices=["standard", "dreg", "stl"],
                    help="guide-gradient estimator (dreg: IWAE only)")
    ap.add_argument("--architecture", default="burda", choices=list(common.ARCHITECTURES))
    ap.add_argument("--num-components", type=int, default=500, help="mixture prior components")
    ap.add_argument("--num-pseudo-inputs", type=int, default=500, help="VampPrior pseudo-inputs")
    ap.add_argument("--epochs", type=int, default=20,
                    help=f"epochs (with --lr-schedule burda: at most {BURDA_EPOCHS})")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--adam-eps", type=float, default=1e-4, help="Adam epsilon (Burda: 1e-4)")
    ap.add_argument("--lr-schedule", default="constant",
                    choices=["constant", "burda", "exponential"],
                    help="burda: 3^i epochs at lr*10^(-i/7), i=0..7; exponential: lr * "
                         "decay^epoch")
    ap.add_argument("--lr-decay", type=float, default=0.99, help="factor of 'exponential'")
    ap.add_argument("--warmup-epochs", type=float, default=0,
                    help="KL warm-up (ELBO only): beta from 0 to 1 over this many epochs")
    ap.add_argument("--early-stopping-patience", type=int, default=None,
                    help="stop after this many epochs without a better validation objective "
                         "(counted after warm-up) and restore the best epoch")
    ap.add_argument("--clip-norm", type=float, default=None)
    ap.add_argument("--cuda-graph", action="store_true",
                    help="fit(..., cuda_graph=True): replay the training step from CUDA graphs "
                         "(a CUDA device; elsewhere fit says so and trains eagerly)")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="stop training after this many seconds (then evaluate as usual; the "
                         "epochs reached are in curve.csv)")
    ap.add_argument("--train-rows", type=int, default=None,
                    help="train on a fixed random subset of this many rows (default all 50000)")
    ap.add_argument("--valid-rows", type=int, default=None,
                    help="validate on a fixed random subset (default all 10000)")
    ap.add_argument("--eval-rows", type=int, default=None,
                    help="test rows to evaluate: a fixed random subset, the same for every run "
                         "(default all 10000; the test split is ordered by digit, so never its "
                         "first rows)")
    ap.add_argument("--eval-samples", type=int, default=5000, help="importance samples per row")
    ap.add_argument("--elbo-samples", type=int, default=100,
                    help="draws per test row for the test ELBO")
    ap.add_argument("--out", default=None,
                    help="output directory (default runs/benchmarks/mnist_nll/<configuration>)")
    ap.add_argument("--fresh", action="store_true",
                    help="ignore a checkpoint in --out and train from scratch")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--compare", nargs=2, metavar=("DIR_A", "DIR_B"), default=None,
                    help="compare two finished runs (paired over test rows) and exit")
    return ap


def run_name(args) -> str:
    return (f"{args.prior}_{args.objective}{args.num_particles}_{args.gradient}_"
            f"{args.architecture}_e{args.epochs}_b{args.batch_size}_lr{args.lr:g}_"
            f"{args.lr_schedule}_w{args.warmup_epochs:g}_s{args.seed}")


def _check_args(ap, args) -> None:
    if args.num_particles is None:
        args.num_particles = 1 if args.objective == "elbo" else 5
    if args.num_particles < 1:
        ap.error(f"--num-particles must be >= 1, got {args.num_particles}")
    if args.gradient == "dreg" and args.objective != "iwae":
        ap.error("--gradient dreg is an estimator for the IWAE bound; use --objective iwae")
    if args.warmup_epochs and args.objective != "elbo":
        ap.error("--warmup-epochs weights the KL term of the ELBO; the IWAE bound has none")
    if args.lr_schedule == "burda" and args.epochs > BURDA_EPOCHS:
        ap.error(f"--lr-schedule burda covers {BURDA_EPOCHS} epochs; got --epochs {args.epochs}")
    for name in ("epochs", "batch_size", "eval_samples", "elbo_samples"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")


# ----------------------------------------------------------------------------------------
# callbacks
# ----------------------------------------------------------------------------------------
def scheduled_lr(args, epoch: int) -> float:
    """Learning rate of (0-based) ``epoch``."""
    if args.lr_schedule == "burda":
        stage, end = 0, 1
        while epoch >= end and stage < BURDA_STAGES - 1:
            stage += 1
            end += 3 ** stage
        return args.lr * 10 ** (-stage / 7)
    if args.lr_schedule == "exponential":
        return args.lr * args.lr_decay ** epoch
    return args.lr


class LearningRateSchedule:
    """Sets the optimizer's learning rate to ``scheduled_lr(epoch)`` and logs it (``lr``)."""

    def __init__(self, args):
        self.args = args

    def on_step_start(self, state):
        lr = scheduled_lr(self.args, state.epoch)
        if state.optimizer is not None:
            for group in state.optimizer.param_groups:
                if group["lr"] != lr:
                    group["lr"] = lr
        if state.step == 0:
            state.log("lr", lr)


class AfterWarmup:
    """Forwards ``on_epoch_end`` to ``inner`` only once the KL warm-up is over (the objective
    before that is not the ELBO, so it must not count as the best epoch)."""

    def __init__(self, inner, warmup_epochs: float):
        self.inner, self.warmup_epochs = inner, warmup_epochs

    def on_fit_start(self, state):
        self.inner.on_fit_start(state)

    def on_epoch_end(self, state):
        if state.epoch + 1 > math.ceil(self.warmup_epochs):
            self.inner.on_epoch_end(state)

    def on_fit_end(self, state):
        self.inner.on_fit_end(state)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, value):
        self.inner.load_state_dict(value)


class TimeLimit:
    """Stops the fit (``StopFit``) once ``seconds`` of training have passed."""

    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, None

    def on_fit_start(self, state):
        self.start = time.perf_counter()

    def on_step_end(self, state):
        from pyro_lvm.inference.training import StopFit

        if time.perf_counter() - self.start > self.seconds:
            raise StopFit(f"time limit of {self.seconds:g} s reached")


class CurveWriter:
    """Rewrites ``curve.csv`` after every epoch (watch a long run with ``tail``)."""

    def __init__(self, path: pathlib.Path):
        self.path = path

    def on_epoch_end(self, state):
        import pandas as pd

        tmp = self.path.with_suffix(".csv.tmp")
        pd.DataFrame(state.history).to_csv(tmp, index=False)
        os.replace(tmp, self.path)


# ----------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------
def published_row(args):
    if args.gradient != "standard" and args.objective == "elbo":
        return None
    return PUBLISHED.get((args.prior, args.objective, args.num_particles))


def compare_runs(dir_a, dir_b) -> dict:
    """Paired comparison of two finished runs on their common test rows (see module doc)."""
    import numpy as np
    import pandas as pd

    runs = []
    for d in (pathlib.Path(dir_a), pathlib.Path(dir_b)):
        for name in ("results.json", "test_per_row.csv"):
            if not (d / name).exists():
                raise SystemExit(f"{d} has no {name}: not a finished mnist_nll run")
        runs.append((json.loads((d / "results.json").read_text()),
                     pd.read_csv(d / "test_per_row.csv", index_col="test_row")))
    (res_a, rows_a), (res_b, rows_b) = runs
    if res_a["eval_samples"] != res_b["eval_samples"]:
        raise SystemExit(f"the runs used different --eval-samples ({res_a['eval_samples']} vs "
                         f"{res_b['eval_samples']}); their estimates are not comparable")
    common_rows = rows_a.index.intersection(rows_b.index)
    if len(common_rows) < 2:
        raise SystemExit("the runs share fewer than 2 evaluated test rows")
    diff = (rows_a.loc[common_rows, "log_px"] - rows_b.loc[common_rows, "log_px"]).to_numpy()
    n = len(diff)
    mean, se = float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(n))
    out = dict(run_a=res_a["run"], run_b=res_b["run"], rows=n,
               log_px_a=float(rows_a.loc[common_rows, "log_px"].mean()),
               log_px_b=float(rows_b.loc[common_rows, "log_px"].mean()),
               mean_difference=mean, se=se, z=mean / se if se > 0 else math.nan,
               fraction_rows_a_better=float((diff > 0).mean()))
    print(f"\nmnist_nll --compare: test log p(x) estimates (IWAE_{res_a['eval_samples']}), "
          f"paired over {n} test rows")
    print(f"  A = {out['run_a']}: {out['log_px_a']:.3f} nats/row (NLL {-out['log_px_a']:.3f})")
    print(f"  B = {out['run_b']}: {out['log_px_b']:.3f} nats/row (NLL {-out['log_px_b']:.3f})")
    print(f"  A - B = {mean:+.3f} ± {se:.3f} nats/row (paired se; z = {out['z']:.1f}); A is higher "
          f"on {100 * out['fraction_rows_a_better']:.1f}% of rows")
    return out


def main(args=None) -> dict:
    """Train, evaluate, write the outputs; ``args``: argv list, Namespace or None. Returns the
    results dict (also written to ``results.json``)."""
    ap = build_parser()
    args = common.parse(ap, args)
    if args.compare:
        return compare_runs(*args.compare)
    if args.smoke:
        args.train_rows, args.valid_rows, args.eval_rows = 300, 100, 40
        args.epochs, args.batch_size = 2, 100
        args.eval_samples, args.elbo_samples = 20, 4
        args.num_components = args.num_pseudo_inputs = 5
        args.no_progress = True
    _check_args(ap, args)
    device = common.setup_runtime(args)

    from pyro_lvm.inference.diagnostics import latent_usage
    from pyro_lvm.inference.evaluate import elbo, log_likelihood
    from pyro_lvm.inference.training import EarlyStopping, KLWarmup, default_optimizer, fit
    from pyro_lvm.inference.objectives import ELBO, IWAE
    from pyro_lvm.models.dlvm import DLVM

    if args.out is None:
        base = (pathlib.Path(tempfile.mkdtemp(prefix="mnist_nll_smoke_")) if args.smoke
                else common.REPO_ROOT / "runs" / "benchmarks" / "mnist_nll")
        out = base / run_name(args)
    else:
        out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "fit_checkpoint.pt"
    if args.fresh and checkpoint.exists():
        checkpoint.unlink()

    rows = {k: v for k, v in (("train", args.train_rows), ("valid", args.valid_rows),
                              ("test", args.eval_rows)) if v is not None}
    data, row_indices = common.load_binarized_mnist(args.data, rows=rows, subset="random",
                                                    return_indices=True)
    arch = common.ARCHITECTURES[args.architecture]
    config = dict(vars(args), device=str(device), run=run_name(args),
                  network=f"784-{'-'.join(map(str, arch['hidden']))}-{arch['latent_dim']} "
                          f"{arch['activation']} (encoder; decoder mirrored)",
                  rows={k: int(v.shape[0]) for k, v in data.items()},
                  subset_rule="all rows, or a fixed uniform random subset (common.subset_rows, "
                              "seed 0) when fewer are asked for",
                  machine=common.machine_description(device))
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str))

    torch.manual_seed(args.seed)
    model = DLVM(784, arch["latent_dim"], prior=args.prior, likelihood="bernoulli",
                 hidden=arch["hidden"], activation=arch["activation"],
                 num_components=args.num_components, num_pseudo_inputs=args.num_pseudo_inputs)
    if args.prior == "vamp":
        model.init_from_data(data["train"])
    if args.objective == "elbo":
        objective = ELBO(num_particles=args.num_particles, gradient=args.gradient)
    else:
        objective = IWAE(num_particles=args.num_particles, gradient=args.gradient)

    callbacks = [LearningRateSchedule(args)]
    if args.warmup_epochs:
        callbacks.append(KLWarmup(args.warmup_epochs))
    stopper = None
    if args.early_stopping_patience:
        stopper = EarlyStopping(patience=args.early_stopping_patience)
        callbacks.append(AfterWarmup(stopper, args.warmup_epochs))
    callbacks.append(CurveWriter(out / "curve.csv"))
    if args.time_limit:
        callbacks.append(TimeLimit(args.time_limit))

    eps = args.adam_eps
    result = fit(model, data["train"], objective=objective, epochs=args.epochs,
                 batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=device,
                 validation=data["valid"], callbacks=callbacks, progress=not args.no_progress,
                 checkpoint=checkpoint, clip_norm=args.clip_norm, cuda_graph=args.cuda_graph,
                 optimizer=lambda params: default_optimizer(params, args.lr, eps=eps))
    result.history.to_csv(out / "curve.csv", index=False)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()},
               out / "model_state.pt")

    test = data["test"]
    progress = None if not args.no_progress else False
    start = time.perf_counter()
    ll = log_likelihood(model, test, num_samples=args.eval_samples, device=device,
                        seed=args.seed, progress=progress)
    eval_s = time.perf_counter() - start
    test_elbo = elbo(model, test, num_samples=args.elbo_samples, device=device, seed=args.seed,
                     progress=progress)
    usage = latent_usage(model, test, device=device, seed=args.seed, progress=False)

    published = published_row(args)
    history = result.history
    best_valid = float(history["valid_objective"].max()) if len(history) else math.nan
    results = dict(
        run=run_name(args), objective=objective.name, prior=args.prior,
        architecture=args.architecture, epochs_run=len(history),
        steps=int(history["step"].iloc[-1]) if len(history) else 0,
        stopped_early=result.stopped_early, stop_reason=result.stop_reason,
        best_epoch=None if stopper is None else stopper.best_epoch,
        train_s=result.elapsed_s, eval_s=eval_s,
        final_train_objective=result.final_train_objective,
        final_valid_objective=result.final_valid_objective, best_valid_objective=best_valid,
        test_rows=int(test.shape[0]), eval_samples=args.eval_samples,
        test_log_px=ll.mean, test_nll=-ll.mean, test_log_px_mc_se=ll.mc_se,
        test_log_px_data_se=ll.data_se, test_mean_ess=ll.mean_ess,
        test_elbo=test_elbo.mean, test_elbo_mc_se=test_elbo.mc_se,
        test_elbo_data_se=test_elbo.data_se, elbo_samples=args.elbo_samples,
        active_units=usage.num_active, latent_dim=usage.num_latent, kl_total=usage.kl_total,
        published_nll=None if published is None else published[0],
        published_source=None if published is None else published[1],
        device=str(device), machine=common.machine_description(device), out=str(out))
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    per_row = ll.per_row.copy()
    per_row.index = row_indices["test"]  # rows of the full test split, for --compare
    per_row.to_csv(out / "test_per_row.csv", index_label="test_row")

    print(f"\nmnist_nll: {run_name(args)}  ({config['network']}; {int(data['train'].shape[0])} "
          f"train rows, {int(data['valid'].shape[0])} validation rows)")
    print(f"  machine: {results['machine']}")
    print(f"  trained {results['epochs_run']} epochs / {results['steps']} steps in "
          f"{results['train_s']:.0f} s" + (f"; stopped early: {result.stop_reason}"
                                            if result.stopped_early else ""))
    row = dict(
        config=f"{args.prior} prior, {objective.name}",
        nll=f"{-ll.mean:.2f} ± {ll.mc_se:.2f} (± {ll.data_se:.2f})",
        elbo=f"{test_elbo.mean:.2f} ± {test_elbo.data_se:.2f}",
        valid=f"{best_valid:.2f}", au=f"{usage.num_active}/{usage.num_latent}",
        epochs=results["epochs_run"],
        published="-" if published is None else f"{published[0]:.2f} ({published[1]})")
    print(common.format_table([row], [
        ("config", "configuration", ""),
        ("nll", f"test NLL, IWAE_{args.eval_samples} (± MC se) (± se over rows)", ""),
        ("elbo", "test ELBO (± se)", ""), ("valid", "best valid objective", ""),
        ("au", "active units", ""), ("epochs", "epochs", "d"),
        ("published", "published NLL", "")]))
    print(f"  test rows: {int(test.shape[0])}"
          + ("" if test.shape[0] == 10000 else " (a fixed uniform random subset, seed 0, the "
                                                "same in every run)")
          + f"; evaluation took {eval_s:.0f} s; outputs in {out}")
    return results


if __name__ == "__main__":
    main()
