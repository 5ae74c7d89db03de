"""The bad-input catalogue: every case fails with a clear error before the first training step
and leaves earlier outputs byte-identical.

Each case asserts the exception type (API) or the exit status (command line), a fragment of
the message naming the problem (the flag, the row, the file), that no training step ran, and
that an existing study directory is unchanged, file by file, afterwards.
"""
import hashlib
import os
import pathlib
import pickle

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_lvm import fit
from pyro_lvm.inference.contract import ContractError
from pyro_lvm.models.dlvm import DLVM
from pyro_lvm.studies import (compare_objectives, compare_observation_models, compare_priors,
                              linear_models)
from pyro_lvm.studies.datasets import Dataset, load_dataset
from pyro_lvm.studies.runner import (RunConfig, StudyDataError, cli, execution, expand_grid,
                                     run_study)

SCRIPTS = {"compare_priors": compare_priors, "compare_objectives": compare_objectives,
           "compare_observation_models": compare_observation_models,
           "linear_models": linear_models}


def _snapshot(directory: pathlib.Path) -> dict:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


class TrainingStarted(AssertionError):
    pass


class NoStep:
    """A fit callback that fails the test if a training step starts."""

    def on_step_start(self, state):
        raise TrainingStarted("a training step ran although the input is bad")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad data files, and an output directory holding finished studies of every script."""
    d = tmp_path_factory.mktemp("bad-inputs")
    rng = np.random.default_rng(0)
    good = pd.DataFrame(rng.normal(size=(60, 5)), columns=[f"g{j}" for j in range(5)])
    good.to_csv(d / "good.csv", index=False)
    huge = good.copy()
    huge.iloc[17, 2] = 1e30
    huge.to_csv(d / "huge.csv", index=False)
    constant = good.copy()
    constant["g3"] = 4.0
    constant.to_csv(d / "constant.csv", index=False)
    text = good.astype(object)
    text.iloc[4, 1] = "high"
    text.to_csv(d / "text.csv", index=False)
    nan = good.copy()
    nan.iloc[9, 0] = np.nan
    nan.to_csv(d / "nan.csv", index=False)
    inf = good.copy()
    inf.iloc[11, 4] = np.inf
    inf.to_csv(d / "inf.csv", index=False)
    (d / "header_only.csv").write_text("a,b,c\n")
    (d / "empty.csv").write_text("")
    (d / "random.npy").write_bytes(np.random.default_rng(1).bytes(200))
    np.save(d / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    np.save(d / "cube.npy", np.zeros((4, 3, 2)))
    (d / "table.xlsx").write_bytes(b"PK\x03\x04 not really")
    (d / "a_directory.csv").mkdir()
    out = d / "out"
    data = load_dataset("digits", binarize=True, max_rows=60)
    base = RunConfig(hidden=(8,), latent_dim=2, epochs=1, batch_size=30, num_eval_samples=10,
                     device="cpu")
    for script in SCRIPTS:  # a finished study where each script's smoke run would write
        run_study(f"{script}-smoke", data, [base], out_dir=out, progress=False, render=False)
    return d, out


@pytest.fixture
def guarded(files, monkeypatch):
    """Fail on any training; yield a checker that the outputs are byte-identical."""
    d, out = files

    def no_training(*args, **kwargs):
        raise TrainingStarted("training started although the input is bad")

    monkeypatch.setattr(execution, "fit_pair", no_training)
    monkeypatch.setattr(execution, "fit_exact", no_training)
    before = _snapshot(out)
    yield d, out
    assert _snapshot(out) == before, "existing outputs changed"


# ------------------------------------------------------------------------ command lines
S = "--smoke"
CLI_CASES = [
    # (script, flags, exit status, fragment of stderr)
    ("compare_priors", ["--latent-dim", "0"], 2, "--latent-dim: must be an integer >= 1"),
    ("compare_priors", ["--latent-dim", "-3"], 2, "--latent-dim"),
    ("compare_priors", ["--latent-dim", "two"], 2, "--latent-dim: must be an integer"),
    ("compare_priors", ["--epochs", "0"], 2, "--epochs: must be an integer >= 1"),
    ("compare_priors", ["--epochs", "-1"], 2, "--epochs: must be an integer >= 1"),
    ("compare_priors", ["--batch-size", "0"], 2, "--batch-size: must be an integer >= 1"),
    ("compare_priors", ["--lr", "nan"], 2, "--lr: must be a finite number > 0"),
    ("compare_priors", ["--lr", "0"], 2, "--lr: must be a finite number > 0"),
    ("compare_priors", ["--lr", "-0.1"], 2, "--lr"),
    ("compare_priors", ["--lr", "inf"], 2, "--lr: must be a finite number > 0"),
    ("compare_priors", ["-K", "0"], 2, "-K: must be an integer >= 1"),
    ("compare_priors", ["--num-eval-samples", "0"], 2, "--num-eval-samples: must be an integer"),
    ("compare_priors", ["--seeds", "-1"], 2, "--seeds: must be an integer >= 0"),
    ("compare_priors", ["--seeds", "0", "x"], 2, "--seeds"),
    ("compare_priors", ["--num-pseudo-inputs", "0"], 2, "--num-pseudo-inputs: must be an integer >= 1"),
    ("compare_priors", ["--num-components", "0"], 2, "--num-components: must be an integer >= 1"),
    ("compare_priors", ["--warmup-epochs", "-5"], 2, "--warmup-epochs: must be an integer >= 0"),
    ("compare_priors", ["--threads", "-2"], 2, "--threads: must be an integer >= 0"),
    ("compare_priors", ["--max-rows", "0"], 2, "--max-rows: must be an integer >= 1"),
    ("compare_priors", ["--hidden", "0"], 2, "--hidden: must be widths >= 1"),
    ("compare_priors", ["--hidden", "wide"], 2, "--hidden: must look like 64x64"),
    ("compare_priors", ["--vamp-warm-start-epochs", "-1"], 2, "--vamp-warm-start-epochs"),
    ("compare_priors", ["--epochs", "3", "--vamp-warm-start-epochs", "3"], 2,
     "--vamp-warm-start-epochs=3 leaves no epoch"),
    ("compare_priors", ["--epoch", "3"], 2, "unrecognized arguments: --epoch"),
    ("compare_priors", ["--priors", "laplace"], 2, "--priors: invalid choice: 'laplace'"),
    ("compare_priors", ["--objectives", "sgd"], 2, "--objectives: invalid choice"),
    ("compare_priors", ["--device", "tpu"], 2, "--device: invalid choice"),
    ("compare_priors", ["--likelihood", "zipf"], 2, "--likelihood: invalid choice"),
    ("compare_objectives", ["-K", "3"], 2, "unrecognized arguments: -K"),
    ("compare_objectives", ["--num-particles", "3"], 2, "unrecognized arguments: --num-particles"),
    ("compare_objectives", ["--ks", "0"], 2, "--ks: must be an integer >= 1"),
    ("compare_objectives", ["--gradients", "reinforce"], 2, "--gradients: invalid choice"),
    ("compare_observation_models", ["-K", "3"], 2, "-K applies to --objective iwae only"),
    ("compare_observation_models", ["--outlier-fraction", "0"], 2,
     "--outlier-fraction: must be a number in (0, 1)"),
    ("compare_observation_models", ["--outlier-fraction", "1.5"], 2, "--outlier-fraction"),
    ("compare_observation_models", ["--outlier-scale", "-1"], 2, "--outlier-scale"),
    ("compare_observation_models", ["--dataset", "binarized-mnist"], 2, "needs continuous data"),
    ("linear_models", ["-K", "3"], 2, "unrecognized arguments: -K"),
    ("linear_models", ["--dataset", "binarized-mnist"], 2, "needs continuous data"),
    ("linear_models", ["--latent-dim", "64"], 2, "--latent-dim 64 must be below the data dimension"),
    ("linear_models", ["--models", "vae"], 2, "--models: invalid choice"),
    # data given on the command line
    ("compare_priors", ["--dataset", "{d}/a_directory.csv"], 2, "is a directory"),
    ("compare_priors", ["--dataset", "{d}/header_only.csv"], 2, "0 data rows"),
    ("compare_priors", ["--dataset", "{d}/empty.csv"], 2, "0 data rows"),
    ("compare_priors", ["--dataset", "{d}/random.npy"], 2, "not a NumPy .npy file: {d}/random.npy"),
    ("compare_priors", ["--dataset", "{d}/objects.npy"], 2, "holds Python objects"),
    ("compare_priors", ["--dataset", "{d}/missing.csv"], 2, "does not exist"),
    ("compare_priors", ["--dataset", "{d}/table.xlsx"], 2, "unsupported data file"),
    ("compare_priors", ["--dataset", "{d}/huge.csv", "--likelihood", "gaussian"], 2,
     "too large for float32 arithmetic"),
    ("compare_priors", ["--dataset", "{d}/constant.csv", "--likelihood", "gaussian"], 2,
     "'g3' are constant"),
    ("compare_priors", ["--dataset", "{d}/text.csv", "--likelihood", "gaussian"], 2,
     "non-numeric column(s): column 'g1'"),
    ("compare_priors", ["--dataset", "{d}/nan.csv", "--likelihood", "gaussian"], 2, "--allow-missing"),
    ("compare_priors", ["--dataset", "{d}/inf.csv", "--likelihood", "gaussian",
                        "--allow-missing"], 2, "infinite"),
    ("compare_priors", ["--dataset", "{d}/good.csv", "--likelihood", "bernoulli"], 2,
     "outside {{0, 1}} for a Bernoulli"),
    ("compare_priors", ["--dataset", "{d}/good.csv", "--likelihood", "gaussian",
                        "--label-column", "nope"], 2, "label_column 'nope' is not a column"),
    ("compare_priors", ["--dataset", "mnist-fashion"], 2, "unknown dataset 'mnist-fashion'"),
    ("compare_priors", ["--dataset", "binarized-mnist", "--data-path", "{d}/nowhere"], 2,
     "binarized MNIST not found"),
]


@pytest.mark.parametrize("script, flags, status, fragment", CLI_CASES,
                         ids=[f"{c[0]}:{' '.join(c[1])}" for c in CLI_CASES])
def test_command_line_refuses(script, flags, status, fragment, guarded, capsys):
    d, out = guarded
    module = SCRIPTS[script]
    argv = [S, "--no-progress", "--out-dir", str(out)] + [f.format(d=d) for f in flags]
    with pytest.raises(SystemExit) as stop:
        cli(module.main, lambda: module.parse_args(argv))
    assert stop.value.code == status
    err = capsys.readouterr().err
    assert fragment.format(d=d) in err, err
    assert "Traceback" not in err


def test_smoke_keeps_the_flags_given():
    """--smoke shrinks only what the user did not set: --smoke --seeds 5 runs seed 5."""
    args = compare_priors.parse_args(["--smoke", "--seeds", "5", "--epochs", "3"])
    assert args.seeds == [5] and args.epochs == 3 and args.latent_dim == 2 and args.hidden == "16"
    default = compare_priors.parse_args(["--smoke"])
    assert default.seeds == [0] and default.epochs == 2
    args = compare_priors.parse_args(["--smoke", "--num-pseudo-inputs", "30"])
    assert args.num_pseudo_inputs == 30


# ------------------------------------------------------------------------ data through the API
def _bad_dataset(kind):
    data = load_dataset("digits", binarize=True, max_rows=60)
    test = data.test.clone()
    if kind == "nan":
        test[5, 9] = float("nan")
    elif kind == "inf":
        test[2, 3] = float("inf")
    elif kind == "huge":
        test[4, 1] = 1e30
    return Dataset(data.name, data.train, data.valid, test)


def _grid(**changes):
    return [RunConfig(hidden=(8,), latent_dim=2, epochs=1, batch_size=30, num_eval_samples=10,
                      device="cpu").replace(**changes)]


API_CASES = [
    # (name, callable(d, out), exception type, fragment)
    ("study NaN test row", lambda d, out: run_study("s", _bad_dataset("nan"), _grid(), out_dir=out),
     StudyDataError, "(row 5, column 9)"),
    ("study inf test row", lambda d, out: run_study("s", _bad_dataset("inf"), _grid(), out_dir=out),
     StudyDataError, "(row 2, column 3)"),
    ("study huge value", lambda d, out: run_study("s", _bad_dataset("huge"), _grid(), out_dir=out),
     StudyDataError, "too large for float32"),
    ("study wrong width", lambda d, out: run_study(
        "s", {"train": np.zeros((20, 4)), "test": np.zeros((5, 3))}, _grid(), out_dir=out),
     StudyDataError, "columns but the model expects data_dim=4"),
    ("study continuous for bernoulli", lambda d, out: run_study(
        "s", load_dataset("digits", max_rows=60), _grid(), out_dir=out),
     StudyDataError, "outside {0, 1} for a Bernoulli"),
    ("study no configurations", lambda d, out: run_study(
        "s", load_dataset("digits", binarize=True, max_rows=60), [], out_dir=out),
     ValueError, "no configurations"),
    ("study duplicate runs", lambda d, out: run_study(
        "s", load_dataset("digits", binarize=True, max_rows=60), _grid() * 2, out_dir=out),
     ValueError, "the same run more than once"),
    ("study name escapes", lambda d, out: run_study(
        "../escape", load_dataset("digits", binarize=True, max_rows=60), _grid(), out_dir=out),
     ValueError, "invalid study name"),
    ("study hidden name", lambda d, out: run_study(
        ".hidden", load_dataset("digits", binarize=True, max_rows=60), _grid(), out_dir=out),
     ValueError, "invalid study name"),
    ("study other data", lambda d, out: run_study(
        "compare_priors-smoke", load_dataset("digits", binarize=True, max_rows=60, seed=3),
        _grid(), out_dir=out), ValueError, "holds runs on different data"),
    ("study missing file", lambda d, out: run_study("s", str(d / "missing.csv"), _grid(),
                                                    out_dir=out), StudyDataError, "does not exist"),
    ("config warm start negative", lambda d, out: RunConfig(prior_warm_start_epochs=-1),
     ValueError, "prior_warm_start_epochs must be a non-negative integer"),
    ("config extra clash", lambda d, out: RunConfig(extra={"seed": 1}), ValueError, "clash"),
    ("config extra not JSON", lambda d, out: RunConfig(extra={"f": object()}), ValueError,
     "JSON-serializable"),
    ("load directory", lambda d, out: load_dataset(str(d / "a_directory.csv")), ValueError,
     "is a directory"),
    ("load header only", lambda d, out: load_dataset(str(d / "header_only.csv")), ValueError,
     "0 data rows"),
    ("load random bytes npy", lambda d, out: load_dataset(str(d / "random.npy")), ValueError,
     "not a NumPy .npy file"),
    ("load pickled npy", lambda d, out: load_dataset(str(d / "objects.npy")), ValueError,
     "holds Python objects"),
    ("load 3-D npy", lambda d, out: load_dataset(str(d / "cube.npy")), ValueError, "2-D array"),
    ("load huge", lambda d, out: load_dataset(str(d / "huge.csv")), ValueError,
     "(row 17, column 2)"),
    ("load constant gaussian", lambda d, out: load_dataset(str(d / "constant.csv"),
                                                           likelihood="gaussian"),
     ValueError, "'g3' are constant"),
    ("load NaN", lambda d, out: load_dataset(str(d / "nan.csv")), ValueError, "allow_missing"),
    ("load unknown name", lambda d, out: load_dataset("cifar"), ValueError, "unknown dataset 'cifar'"),
    ("load split sum", lambda d, out: load_dataset("digits", split=(0.5, 0.1, 0.1)), ValueError,
     "split"),
    ("load max_rows 0", lambda d, out: load_dataset("digits", max_rows=0), ValueError, "max_rows"),
    ("load bad scale", lambda d, out: load_dataset("digits", scale="log"), ValueError, "scale must"),
    ("load bad likelihood", lambda d, out: load_dataset("digits", likelihood="zipf"),
     ValueError, "likelihood must be one of"),
    ("load dict without train", lambda d, out: load_dataset({"test": np.zeros((3, 2))}),
     ValueError, "needs keys 'train' and 'test'"),
    ("load labels length", lambda d, out: load_dataset(np.zeros((10, 2)) + np.arange(2),
                                                        labels=np.zeros(3)),
     ValueError, "labels for 'data' have 3 entries"),
]


@pytest.mark.parametrize("name, attempt, exc_type, fragment", API_CASES,
                         ids=[c[0] for c in API_CASES])
def test_api_refuses(name, attempt, exc_type, fragment, guarded):
    d, out = guarded
    with pytest.raises(exc_type) as info:
        attempt(d, out)
    assert fragment in str(info.value)


# ------------------------------------------------------------------------ fit and broken pairs
X = torch.bernoulli(torch.rand(20, 4, generator=torch.Generator().manual_seed(0)))


def _model(x, mask=None):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        pyro.sample("x", dist.Bernoulli(logits=z.sum(-1, keepdim=True).expand(-1, 4)).to_event(1),
                    obs=x)


def _guide_empty(x, mask=None):
    pass


def _guide_extra(x, mask=None):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("w", dist.Normal(0.0, 1.0))


def _guide_ok(x, mask=None):
    loc = pyro.param("loc", torch.zeros(2))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))


def _model_no_plate(x, mask=None):
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    pyro.sample("x", dist.Bernoulli(logits=z).expand(x.shape).to_event(2), obs=x)


def _guide_no_plate(x, mask=None):
    pyro.sample("z", dist.Normal(pyro.param("m", torch.tensor(0.0)), 1.0))


def _model_without_mask(x):
    _model(x)


def _model_raises(x, mask=None):
    raise RuntimeError("boom in the user's model")


def _fit(pair, data=X, **kwargs):
    return fit(pair, data, epochs=1, progress=False, callbacks=[NoStep()], **kwargs)


FIT_CASES = [
    ("model without guide", lambda: _fit(_model), TypeError, "expected a model/guide pair"),
    ("not a pair", lambda: _fit(3), TypeError, "expected a model/guide pair"),
    ("guide misses a latent", lambda: _fit((_model, _guide_empty)), ContractError,
     "have no counterpart in the guide"),
    ("guide extra latent", lambda: _fit((_model, _guide_extra)), ContractError,
     "['w'] in the guide have no latent counterpart"),
    ("no data plate", lambda: _fit((_model_no_plate, _guide_no_plate)), ContractError,
     "no plate named 'data'"),
    ("model without mask argument, values missing",
     lambda: _fit((_model_without_mask, _guide_ok), mask=(torch.arange(4) != 1).expand(20, 4)),
     ContractError, "takes no mask: a pair must accept `mask`"),
    ("model raises", lambda: _fit((_model_raises, _guide_ok)), ContractError,
     "boom in the user's model"),
    ("epochs 0", lambda: fit(DLVM(4, 2), X, epochs=0, progress=False), ValueError,
     "epochs must be an integer >= 1"),
    ("batch size 0", lambda: _fit(DLVM(4, 2), batch_size=0), ValueError, "batch_size"),
    ("lr nan", lambda: _fit(DLVM(4, 2), lr=float("nan")), ValueError, "lr must be a positive"),
    ("clip norm negative", lambda: _fit(DLVM(4, 2), clip_norm=-1.0), ValueError, "clip_norm"),
    ("seed text", lambda: _fit(DLVM(4, 2), seed="a"), ValueError, "seed must be an integer"),
    ("objective text", lambda: _fit(DLVM(4, 2), objective="elbo"), TypeError,
     "objective must be a pyro-lvm objective"),
    ("width", lambda: _fit(DLVM(5, 2)), ValueError, "expects data_dim=5"),
    ("1-D data", lambda: _fit(DLVM(4, 2), X[0]), ValueError, "2-D array"),
    ("no rows", lambda: _fit(DLVM(4, 2), X[:0]), ValueError, "0 row(s)"),
    ("NaN data", lambda: _fit(DLVM(4, 2), torch.where(torch.arange(4) == 2, float("nan"), X)),
     ValueError, "NaN"),
    ("text data", lambda: _fit(DLVM(4, 2), [["a"] * 4] * 3), ValueError, "must be numeric"),
    ("not binary", lambda: _fit(DLVM(4, 2), X * 2), ValueError, "outside {0, 1}"),
    ("float32 overflow", lambda: _fit(DLVM(4, 2, likelihood="gaussian"),
                                      torch.where(torch.arange(4) == 1, 1e30, X)),
     ValueError, "too large for float32 arithmetic"),
    ("mask shape", lambda: _fit(DLVM(4, 2), mask=torch.ones(3, 3, dtype=torch.bool)), ValueError,
     "mask for data has shape (3, 3)"),
    ("validation width", lambda: _fit(DLVM(4, 2), validation=X[:, :3]), ValueError,
     "validation has 3 columns"),
]


@pytest.mark.parametrize("name, attempt, exc_type, fragment", FIT_CASES,
                         ids=[c[0] for c in FIT_CASES])
def test_fit_refuses(name, attempt, exc_type, fragment, guarded):
    with pytest.raises(exc_type) as info:
        attempt()
    assert fragment in str(info.value)


def test_the_catalogue_is_large_enough():
    assert len(CLI_CASES) + len(API_CASES) + len(FIT_CASES) >= 60


def test_a_good_input_passes_the_guard(files, guarded):
    """Positive control: the guard does catch training when the input is fine."""
    d, out = guarded
    with pytest.raises(TrainingStarted):
        _fit(DLVM(4, 2))
