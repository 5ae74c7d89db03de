"""Linear latent variable models: exact fits against scikit-learn, and SVI against the exact
optimum.

For each data set (``digits``: scikit-learn's bundled 8x8 digits, constant columns dropped,
standardized, 1797 x 61; ``synthetic``: rows drawn from a factor-analysis model with
heteroscedastic noise, columns standardized):

1. **PPCA, closed form**: ``PPCA(p, d).fit_closed_form(X)`` (Tipping & Bishop 1999) against
   ``sklearn.decomposition.PCA(d, svd_solver="full").fit(X)``; both are one eigen/singular
   value decomposition of the same data.
2. **Factor analysis, EM**: ``FactorAnalysis(p, d).fit_em(X, tol)`` (Rubin & Thayer 1982;
   stops when the mean log-likelihood per row rises by less than ``tol``) against
   ``sklearn.decomposition.FactorAnalysis(d, svd_method="lapack", tol=tol * n)`` (scikit-learn's
   tolerance is on the *total* log-likelihood, hence ``tol * n`` for the same stopping rule).
   Both reach the same maximum; the mean log-likelihood per row of each is printed.
3. **SVI**: ``pyro_lvm.fit(model, X, objective=ELBO(analytic_kl=True))`` (Adam, lr 0.01,
   batch 1000 by default) from the default initialisation
   until the exact mean log-likelihood per row of the fitted parameters,
   :math:`\\frac1n\\sum_i \\log p(x_i)` (``model.log_marginal``), is within 0.5% of the
   maximum-likelihood value (from 1. or 2.): a callback evaluates it after every epoch and
   stops the fit with ``StopFit``. The time of those checks is reported separately.

Times are medians over ``--repeats`` alternating repetitions (ours, scikit-learn, ours, ...);
ratio = ours / scikit-learn (below 1 means faster than scikit-learn).

Usage::

    python benchmarks/linear_models.py --smoke
    python benchmarks/linear_models.py                       # digits and synthetic
    python benchmarks/linear_models.py --dataset synthetic --rows 100000 --cols 200
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time
import warnings

BENCH_DIR = pathlib.Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import common  # noqa: E402  (puts the repository on sys.path)
if pathlib.Path(common.__file__).resolve().parent != BENCH_DIR:  # another 'common' module
    raise ImportError(f"benchmarks/common.py expected, got {common.__file__}")
import numpy as np  # noqa: E402
import torch  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(ap, data=False)
    ap.add_argument("--dataset", default="both", choices=["digits", "synthetic", "both"])
    ap.add_argument("--latent-dim", type=int, default=10)
    ap.add_argument("--rows", type=int, default=20000, help="rows of the synthetic data")
    ap.add_argument("--cols", type=int, default=100, help="columns of the synthetic data")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--em-tol", type=float, default=1e-6,
                    help="EM stops when the mean log-likelihood per row rises by less")
    ap.add_argument("--em-max-iter", type=int, default=10000)
    ap.add_argument("--target", type=float, default=0.005,
                    help="SVI stops within this fraction of |exact max log-likelihood per row|")
    ap.add_argument("--svi-epochs", type=int, default=2000, help="SVI epoch limit")
    ap.add_argument("--svi-batch-size", type=int, default=1000)
    ap.add_argument("--svi-lr", type=float, default=0.01)
    ap.add_argument("--svi-objective", default="elbo_analytic_kl",
                    choices=["elbo", "elbo_analytic_kl"],
                    help="ELBO with the closed-form KL (default) or the Monte Carlo one")
    ap.add_argument("--svi-models", nargs="*", default=["PPCA", "FactorAnalysis"],
                    choices=["PPCA", "FactorAnalysis"], help="models to fit by SVI (none: skip)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    return ap


# ----------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------
def digits() -> np.ndarray:
    from sklearn.datasets import load_digits

    X = load_digits().data.astype(np.float64)
    X = X[:, X.std(axis=0) > 0]
    return (X - X.mean(0)) / X.std(0)


def synthetic(rows: int, cols: int, latent_dim: int, seed: int) -> np.ndarray:
    """x = W z + mu + e, z ~ N(0, I_d), e ~ N(0, diag psi), psi_j ~ U(0.2, 1.5), then each
    column standardized (as one prepares data for factor analysis; the models' default
    initialisation, Psi = I and small W, is meant for standardized data)."""
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(cols, latent_dim))
    mu = rng.normal(size=cols)
    psi = rng.uniform(0.2, 1.5, size=cols)
    Z = rng.normal(size=(rows, latent_dim))
    X = Z @ W.T + mu + rng.normal(size=(rows, cols)) * np.sqrt(psi)
    return (X - X.mean(0)) / X.std(0)


# ----------------------------------------------------------------------------------------
# exact fits
# ----------------------------------------------------------------------------------------
def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _alternate(ours, theirs, repeats):
    t_ours, t_theirs, out_ours, out_theirs = [], [], None, None
    for rep in range(repeats):
        pair = [("ours", ours), ("theirs", theirs)]
        for side, fn in (pair if rep % 2 == 0 else pair[::-1]):
            t, out = _timed(fn)
            if side == "ours":
                t_ours.append(t)
                out_ours = out
            else:
                t_theirs.append(t)
                out_theirs = out
    return t_ours, t_theirs, out_ours, out_theirs


def bench_ppca(X: np.ndarray, d: int, repeats: int) -> dict:
    from pyro_lvm.models.linear import PPCA
    from sklearn.decomposition import PCA

    n, p = X.shape
    t_ours, t_sk, ours, sk = _alternate(
        lambda: PPCA(p, d).double().fit_closed_form(X),
        lambda: PCA(n_components=d, svd_solver="full").fit(X), repeats)
    Xt = torch.as_tensor(X)
    with torch.no_grad():
        ll_ours = float(ours.log_marginal(Xt).mean())
    return dict(method="PPCA closed form vs sklearn PCA(svd_solver='full')",
                ours_s=float(np.median(t_ours)), sklearn_s=float(np.median(t_sk)),
                ratio=float(np.median(t_ours) / np.median(t_sk)), ours_loglik=ll_ours,
                sklearn_loglik=float(sk.score(X)), ours_iter=None, sklearn_iter=None,
                note="sklearn uses the 1/(n-1) covariance: its maximum is a hair lower")


def bench_fa(X: np.ndarray, d: int, repeats: int, tol: float, max_iter: int) -> dict:
    from pyro_lvm.models.linear import FactorAnalysis
    from sklearn.decomposition import FactorAnalysis as SkFA

    n, p = X.shape

    def ours():
        return FactorAnalysis(p, d).double().fit_em(X, tol=tol, max_iter=max_iter,
                                                    progress=False)

    def theirs():
        with warnings.catch_warnings():
            # scikit-learn's ConvergenceWarning is reported through n_iter_ below
            warnings.simplefilter("ignore")
            return SkFA(n_components=d, svd_method="lapack", tol=tol * n, max_iter=max_iter,
                        random_state=0).fit(X)

    t_ours, t_sk, fa, sk = _alternate(ours, theirs, repeats)
    return dict(method=f"FA EM (tol {tol:g}/row) vs sklearn FactorAnalysis(lapack)",
                ours_s=float(np.median(t_ours)), sklearn_s=float(np.median(t_sk)),
                ratio=float(np.median(t_ours) / np.median(t_sk)),
                ours_loglik=float(fa.em_history_[-1]), sklearn_loglik=float(sk.score(X)),
                ours_iter=int(fa.n_iter_), sklearn_iter=int(sk.n_iter_), note="")


# ----------------------------------------------------------------------------------------
# SVI to 0.5% of the exact maximum
# ----------------------------------------------------------------------------------------
class _ExactLogLikTarget:
    """fit callback: exact mean log p(x) per row after each epoch; StopFit when within the
    target. Logs ``exact_loglik`` to the history and keeps the time it spends."""

    def __init__(self, X: torch.Tensor, target_value: float):
        self.X, self.target_value = X, target_value
        self.check_s = 0.0
        self.reached_epoch = None
        self.last = math.nan

    def on_epoch_end(self, state):
        from pyro_lvm.inference.training import StopFit

        start = time.perf_counter()
        with torch.no_grad():
            value = float(state.model.log_marginal(self.X.to(state.device)).mean())
        self.check_s += time.perf_counter() - start
        self.last = value
        state.log("exact_loglik", value)
        if value >= self.target_value:
            self.reached_epoch = int(state.history[-1]["epoch"])
            raise StopFit(f"exact log-likelihood per row {value:.4f} >= target "
                          f"{self.target_value:.4f}")


def bench_svi(cls_name: str, X: np.ndarray, d: int, exact: float, args, device) -> dict:
    from pyro_lvm.inference.training import fit
    from pyro_lvm.inference.objectives import ELBO
    import pyro_lvm.models.linear as linear

    n, p = X.shape
    target_value = exact - args.target * abs(exact)
    torch.manual_seed(args.seed)
    model = getattr(linear, cls_name)(p, d)
    Xt = torch.as_tensor(X, dtype=torch.get_default_dtype())
    callback = _ExactLogLikTarget(Xt, target_value)
    objective = ELBO(analytic_kl=args.svi_objective == "elbo_analytic_kl")
    result = fit(model, Xt, objective=objective, epochs=args.svi_epochs,
                 batch_size=args.svi_batch_size, lr=args.svi_lr, seed=args.seed, device=device,
                 progress=False, callbacks=[callback])
    reached = callback.reached_epoch is not None
    return dict(model=cls_name, objective=objective.name, exact_max=exact, target=target_value,
                reached=reached, epochs=len(result.history),
                steps=int(result.history["step"].iloc[-1]), final_loglik=callback.last,
                final_gap_pct=100 * (exact - callback.last) / abs(exact),
                fit_s=result.elapsed_s, check_s=callback.check_s,
                svi_s=result.elapsed_s - callback.check_s,
                final_train_elbo=float(result.history["train_objective"].iloc[-1]))


# ----------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------
def main(args=None) -> dict:
    """Run the benchmark; ``args``: argv list, Namespace or None. Returns the results dict."""
    args = common.parse(build_parser(), args)
    if args.smoke:
        args.dataset, args.rows, args.cols, args.latent_dim = "synthetic", 400, 8, 2
        args.repeats, args.svi_epochs, args.em_max_iter = 1, 2, 200
    device = common.setup_runtime(args)
    datasets = []
    if args.dataset in ("digits", "both"):
        datasets.append(("digits (1797 x 61, standardized)", digits()))
    if args.dataset in ("synthetic", "both"):
        datasets.append((f"synthetic FA ({args.rows} x {args.cols}, d={args.latent_dim})",
                         synthetic(args.rows, args.cols, args.latent_dim, args.seed)))
    exact_rows, svi_rows = [], []
    for label, X in datasets:
        d = args.latent_dim
        ppca = bench_ppca(X, d, args.repeats)
        fa = bench_fa(X, d, args.repeats, args.em_tol, args.em_max_iter)
        for r in (ppca, fa):
            exact_rows.append(dict(data=label, **r))
        exact_max = {"PPCA": ppca["ours_loglik"], "FactorAnalysis": fa["ours_loglik"]}
        for cls_name in args.svi_models:
            svi_rows.append(dict(data=label, **bench_svi(cls_name, X, d, exact_max[cls_name],
                                                         args, device)))

    print(f"\nlinear_models: exact fits vs scikit-learn (median of {args.repeats} alternating "
          f"repetitions), SVI to {100 * args.target:g}% of the exact maximum; device {device}")
    print(f"  machine: {common.machine_description(device)}\n")
    print(common.format_table(exact_rows, [
        ("data", "data", ""), ("method", "method", ""), ("ours_s", "ours s", ".4f"),
        ("sklearn_s", "sklearn s", ".4f"), ("ratio", "ours/sklearn", ".2f"),
        ("ours_iter", "iter ours", ""), ("sklearn_iter", "iter sklearn", ""),
        ("ours_loglik", "loglik/row ours", ".6f"),
        ("sklearn_loglik", "loglik/row sklearn", ".6f")]))
    if svi_rows:
        print(f"\n  SVI ({args.svi_objective}, Adam lr {args.svi_lr}, batch {args.svi_batch_size}) "
              f"until the exact log-likelihood per row is within {100 * args.target:g}% of the "
              f"maximum:")
        print(common.format_table(
            [dict(r, reached_text="yes" if r["reached"] else f"NO (limit {args.svi_epochs})")
             for r in svi_rows], [
                ("data", "data", ""), ("model", "model", ""),
                ("exact_max", "max loglik/row", ".4f"),
                ("final_loglik", "reached loglik/row", ".4f"), ("final_gap_pct", "gap %", ".3f"),
                ("reached_text", "reached", ""), ("epochs", "epochs", "d"), ("steps", "steps", "d"),
                ("svi_s", "SVI s", ".2f"), ("check_s", "check s", ".2f")]))
    out = dict(exact=exact_rows, svi=svi_rows, machine=common.machine_description(device),
               device=str(device))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return out


if __name__ == "__main__":
    main()
