"""Progress inside runs (bars on a terminal, log lines otherwise, silence with --no-progress),
--smoke keeping explicit flags, and provenance across invocations."""
import io
import json

import pandas as pd
import pytest

from pyro_lvm.studies import compare_priors
from pyro_lvm.studies.datasets import load_dataset
from pyro_lvm.studies.runner import RunConfig, execution, expand_grid, progress, run_study


@pytest.fixture(scope="module")
def tiny_data():
    return load_dataset("digits", binarize=True, max_rows=60)


def _grid(seeds=(0, 1)):
    base = RunConfig(hidden=(8,), latent_dim=2, epochs=2, batch_size=30, lr=1e-2,
                     num_eval_samples=10, device="cpu")
    return expand_grid(base, seeds=list(seeds))


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_log_lines_when_stderr_is_not_a_terminal(tmp_path, tiny_data, capsys, monkeypatch):
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)  # a line at every step
    run_study("p", tiny_data, _grid(), out_dir=tmp_path, render=False, progress=True)
    err = capsys.readouterr().err
    run = "p: run 2/2 dlvm-normal-elbo-bernoulli-s1-"
    assert f"{run}" in err and "p: run 1/2 " in err
    training = [line for line in err.splitlines() if "training step" in line]
    # 60 rows x 0.8 = 48 training rows, batches of 30: 2 steps per epoch, 2 epochs, 2 runs
    assert any("training step 4/4 (epoch 2/2" in line for line in training), training
    assert all("steps/s, ETA" in line for line in training)
    assert "evaluating the test log-likelihood (K = 10, " in err
    chunk_lines = [line for line in err.splitlines()
                   if "evaluating the test log-likelihood" in line and " draws (" in line]
    assert chunk_lines and all("draws/s, ETA" in line for line in chunk_lines), err
    assert any(" draws (100%)" in line for line in chunk_lines)
    assert "evaluating k-hat and latent usage" in err
    assert err.count(": ok in ") == 2
    assert "\r" not in err  # no bars in a log file


def test_bars_on_a_terminal(tmp_path, tiny_data, monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    run_study("p", tiny_data, _grid(seeds=(0,)), out_dir=tmp_path, render=False, progress=True)
    out = terminal.getvalue()
    assert "p: 100%" in out and "1/1" in out  # the run bar
    assert "training" in out and "step" in out  # the current run's steps
    assert "IWAE_10 log p(x)" in out and "draw" in out  # the evaluation's chunks
    assert "training step" not in out  # no log lines on a terminal


def test_no_progress_is_silent(tmp_path, tiny_data, capsys, monkeypatch):
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)
    run_study("p", tiny_data, _grid(seeds=(0,)), out_dir=tmp_path, render=False, progress=False)
    assert capsys.readouterr().err == ""


def test_smoke_runs_the_seed_given(tiny_data):
    args = compare_priors.parse_args(["--smoke", "--seeds", "5", "--priors", "normal"])
    configs = compare_priors.build_grid(args, tiny_data)
    assert {c.seed for c in configs} == {5} and {c.epochs for c in configs} == {2}


def test_provenance_lists_every_invocation(tmp_path, tiny_data, monkeypatch):
    """An interrupted study resumed: both command lines, what each computed, the total
    compute time summed over runs, and a duration from the first start."""
    real_fit = execution.fit_pair
    calls = []

    def ctrl_c_in_second_run(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(execution, "fit_pair", ctrl_c_in_second_run)
    with pytest.raises(KeyboardInterrupt):
        run_study("p", tiny_data, _grid(), out_dir=tmp_path, render=False, progress=False,
                  command_line="python first.py")
    monkeypatch.setattr(execution, "fit_pair", real_fit)
    result = run_study("p", tiny_data, _grid(), out_dir=tmp_path, render=False, progress=False,
                       command_line="python second.py --resume")
    meta = json.loads((tmp_path / "p" / "study.json").read_text())
    first, second = meta["invocations"]
    assert first["command_line"] == "python first.py" and first["status"] == "interrupted"
    assert second["command_line"] == "python second.py --resume"
    assert second["status"] == "finished" and meta["status"] == "finished"
    ids = list(result.results["run_id"])
    assert first["computed"] == ids[:1] and second["computed"] == ids[1:]
    assert meta["started"] == first["started"] and meta["finished"] == second["finished"]
    assert first["started"] <= first["finished"] <= second["started"] <= second["finished"]
    table = pd.read_csv(tmp_path / "p" / "results.csv")
    assert meta["compute_time_s"] == pytest.approx(table["wall_time_s"].sum())
    assert meta["compute_time_s"] > 0


def test_allow_missing_and_label_column_flags(tmp_path):
    """The flags the loader's hints name: NaN cells become a mask, a label column is kept out."""
    import numpy as np

    from pyro_lvm.studies.runner import dataset_from_args

    rng = np.random.default_rng(0)
    table = pd.DataFrame(rng.normal(size=(40, 4)), columns=list("abcd"))
    table.iloc[3, 1] = np.nan
    table["kind"] = rng.integers(0, 3, size=40)
    path = tmp_path / "cells.csv"
    table.to_csv(path, index=False)
    args = compare_priors.parse_args(["--dataset", str(path), "--allow-missing",
                                      "--label-column", "kind"])
    dataset = dataset_from_args(args, likelihood="gaussian")
    assert dataset.data_dim == 4 and dataset.masks is not None
    assert sum(int((~m).sum()) for m in dataset.masks.values()) == 1
    assert dataset.label("test") is not None
    with pytest.raises(ValueError, match="--allow-missing"):
        dataset_from_args(compare_priors.parse_args(["--dataset", str(path), "--label-column",
                                                     "kind"]), likelihood="gaussian")
