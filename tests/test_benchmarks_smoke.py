"""Every benchmark script runs end to end with ``--smoke`` (seconds), and its correctness
checks hold: the hand-written PyTorch objectives equal the library's on the same noise, the
exact linear fits agree with scikit-learn, the MNIST run writes its curve and results.

The scripts are imported and their ``main(argv)`` called in this process (no interpreter start
per script). A new script in ``benchmarks/`` must be added to ``SCRIPTS``
(``test_every_benchmark_script_is_smoke_tested`` fails otherwise).
"""
import importlib.util
import json
import math
import pathlib

import pytest
import torch

BENCH_DIR = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
#: modules in benchmarks/ that are helpers, not scripts
HELPERS = {"common.py"}


def _check_train_throughput(out, tmp_path):
    assert out["same_objective"], out["checks"]
    assert len(out["checks"]) == 9  # DLVM, user pair, user ProgramPair x three objectives
    names = {r["objective"] for r in out["results"]}
    assert names == {"elbo", "iwae_5", "iwae_50"}
    for r in out["results"]:
        expected = {"fit_dlvm", "fit_user", "fit_user_program", "pyro_svi", "hand", "hand_fused"}
        assert expected <= set(r["sides"]), r["sides"].keys()
        for side in r["sides"].values():
            assert math.isfinite(side["rows_per_s"]) and side["rows_per_s"] > 0
            assert side["ratio"] > 0
            assert side["paired"]["n"] == 1 and side["paired"]["ratio"] > 0
    assert set(out["pass_target"]) == {"fit_dlvm", "fit_user"}


def _check_linear_models(out, tmp_path):
    ppca, fa = out["exact"]
    # ours is the 1/N maximum-likelihood fit; sklearn's 1/(N-1) covariance cannot beat it
    assert ppca["ours_loglik"] >= ppca["sklearn_loglik"] - 1e-9
    # both EM implementations stop at the same maximum (tol 1e-6 nats per row)
    assert abs(fa["ours_loglik"] - fa["sklearn_loglik"]) < 1e-3
    assert fa["ours_s"] > 0 and fa["sklearn_s"] > 0
    assert [r["model"] for r in out["svi"]] == ["PPCA", "FactorAnalysis"]
    for r in out["svi"]:
        # the exact log-likelihood of any parameters is below the maximum
        assert r["final_loglik"] <= r["exact_max"] + 1e-6
        assert r["epochs"] >= 1


def _check_mnist_nll(out, tmp_path):
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["test_nll"] == pytest.approx(out["test_nll"])
    assert math.isfinite(out["test_nll"]) and out["test_log_px_mc_se"] > 0
    # the IWAE_K estimate is a tighter bound than the ELBO in expectation; 4 se apart at most
    se = math.hypot(out["test_log_px_data_se"], out["test_elbo_data_se"])
    assert out["test_log_px"] > out["test_elbo"] - 4 * se
    curve = (tmp_path / "curve.csv").read_text().strip().splitlines()
    assert len(curve) == 1 + out["epochs_run"] == 3
    assert out["published_nll"] == 88.71
    assert (tmp_path / "fit_checkpoint.pt").exists()


def _check_returns_dict(out, tmp_path):
    assert isinstance(out, dict)


def _check_cluster_digits(out, tmp_path):
    assert [(r["seed"], r["covariance"]) for r in out["rows"]] == [(0, "full"), (0, "diag")]
    for r in out["rows"]:
        assert -1 <= r["ari"] <= 1 and 0 <= r["nmi"] <= 1 and 0 <= r["kmeans_ari"] <= 1
        assert 1 <= r["occupied"] <= 10


def _check_eval_throughput(out, tmp_path):
    assert out["same_estimates"], out


#: script -> (extra argv after --smoke, check(out, tmp_path))
SCRIPTS = {
    "train_throughput.py": ([], _check_train_throughput),
    "linear_models.py": ([], _check_linear_models),
    "mnist_nll.py": (["--out", "{tmp}"], _check_mnist_nll),
    "eval_memory.py": ([], _check_returns_dict),
    "eval_throughput.py": ([], _check_eval_throughput),
    "cluster_digits.py": ([], _check_cluster_digits),
}


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name[:-3]}", BENCH_DIR / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def restore_threads():
    """--smoke runs single-threaded (torch and BLAS, see benchmarks/common.py); leave both
    settings as found."""
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    with threadpool_limits(limits=None):  # restores the BLAS pools' sizes on exit
        yield
    torch.set_num_threads(threads)


def test_every_benchmark_script_is_smoke_tested():
    scripts = {p.name for p in BENCH_DIR.glob("*.py")} - HELPERS
    assert scripts == set(SCRIPTS), (
        f"benchmarks/ scripts without a smoke test: {sorted(scripts - set(SCRIPTS))}; "
        f"listed but missing: {sorted(set(SCRIPTS) - scripts)}")


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_script_smoke(name, tmp_path, restore_threads, capsys):
    extra, check = SCRIPTS[name]
    module = _load(name)
    torch.set_num_threads(1)
    out = module.main(["--smoke", *[a.format(tmp=tmp_path) for a in extra]])
    printed = capsys.readouterr().out
    assert printed.strip(), f"{name} printed no table"
    check(out, tmp_path)


def test_train_throughput_in_fresh_processes_times_the_same_training(restore_threads):
    """``--processes separate`` runs each side in a new process (``--worker``) built from the
    same seed, on the same rows: with ``--smoke`` (no warm-up, one repetition) and sides that
    share no model, the losses are those of the same sides in this process."""
    module = _load("train_throughput.py")
    torch.set_num_threads(1)
    flags = ["--smoke", "--objectives", "iwae_5", "--sides", "fit_user"]
    shared = module.main(flags)
    separate = module.main([*flags, "--processes", "separate"])
    assert separate["processes"] == "separate"
    (one,), (other,) = shared["results"], separate["results"]
    assert set(other["sides"]) == {"fit_user", "hand"}
    for side in ("fit_user", "hand"):
        assert other["sides"][side]["rows_per_s"] > 0
        assert other["sides"][side]["last_losses"] == one["sides"][side]["last_losses"]


@pytest.mark.parametrize("architecture", ["burda", "tomczak"])
def test_hand_written_mirror_computes_the_library_objectives(architecture):
    """The hand-written network of the benchmarks (tanh or gated layers) copies a DLVM's
    weights and, on the same noise, gives the library's loss for every benchmarked objective."""
    import sys

    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    common = _load("common.py")
    from pyro_lvm.models.dlvm import DLVM
    from pyro_lvm.inference.objectives import ELBO, IWAE
    import pyro

    arch = dict(common.ARCHITECTURES[architecture])
    torch.manual_seed(0)
    model = DLVM(784, arch["latent_dim"], hidden=(16, 12), activation=arch["activation"])
    mirror = common.MirrorVAE.from_dlvm(model)
    x = (torch.rand(9, 784) < 0.3).float()
    for objective, kind, k, gradient in ((ELBO(), "elbo", 1, "standard"),
                                         (IWAE(4), "iwae", 4, "standard"),
                                         (IWAE(4, gradient="dreg"), "iwae", 4, "dreg")):
        pyro.set_rng_seed(3)
        ours = objective(model.model, model.guide, x, num_data=90).item()
        pyro.set_rng_seed(3)
        theirs = mirror.loss(x, kind, k, gradient, num_data=90).item()
        assert math.isclose(ours, theirs, rel_tol=1e-5), (architecture, objective)


def test_paired_speed_ratio_is_students_t_interval_of_the_log_ratios():
    """The training table's interval: the geometric mean of the per-repetition ratios
    reference / side, with mean +- t(0.975, n - 1) s / sqrt(n) on the log scale (the t
    quantile from a table, not from scipy, which the helper uses)."""
    common = _load("common.py")
    reference = [10.0, 11.0, 12.0]
    side = [10.0, 10.0, 10.0]  # speed ratios 1.0, 1.1, 1.2
    logs = [math.log(r) for r in (1.0, 1.1, 1.2)]
    mean = sum(logs) / 3
    sd = math.sqrt(sum((v - mean) ** 2 for v in logs) / 2)
    half = 4.302652729749464 * sd / math.sqrt(3)  # t(0.975, 2)
    out = common.paired_speed_ratio(reference, side)
    assert out["n"] == 3
    assert math.isclose(out["ratio"], math.exp(mean), rel_tol=1e-12)
    assert math.isclose(out["lower"], math.exp(mean - half), rel_tol=1e-9)
    assert math.isclose(out["upper"], math.exp(mean + half), rel_tol=1e-9)
    # positive control: a side twice as slow in every repetition is not within the interval
    slow = common.paired_speed_ratio(reference, [2 * s for s in side])
    assert slow["upper"] < out["lower"]
    # no spread: the point; one repetition: no interval; unequal lengths: an error
    same = common.paired_speed_ratio([2.0, 4.0], [1.0, 2.0])
    assert same["lower"] == same["ratio"] == same["upper"] == 2.0
    assert math.isnan(common.paired_speed_ratio([2.0], [1.0])["lower"])
    with pytest.raises(ValueError, match="same number"):
        common.paired_speed_ratio([1.0, 2.0], [1.0])
