"""studies/impute.py beyond the suite's --smoke run: user CSV with missing cells, binary
data, resuming, bad flags."""
import json

import numpy as np
import pandas as pd
import pytest

from pyro_lvm.studies import impute as study


def _csv(tmp_path, n=120, p=6, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 2))
    x = z @ rng.normal(size=(2, p)) + 0.3 * rng.normal(size=(n, p))
    x[rng.random((n, p)) < 0.05] = np.nan  # missing in the file: never scored
    path = tmp_path / "user.csv"
    pd.DataFrame(x, columns=[f"g{j}" for j in range(p)]).to_csv(path, index=False)
    return path


def test_user_csv_with_missing_cells_and_resume(tmp_path, capsys):
    path = _csv(tmp_path)
    argv = ["--smoke", "--dataset", str(path), "--allow-missing", "--out-dir", str(tmp_path),
            "--no-progress", "--methods", "mean", "fa", "miwae-studentt", "--rates", "0.3",
            "--latent-dim", "2"]
    result = study.main(study.parse_args(argv))
    table = result.results
    assert (table["status"] == "ok").all(), table[["run_id", "error"]]
    ds_mask = result.study_dir / "runs"
    # held-out entries: amputed among those present in the file
    train_rows = int(json.loads((result.study_dir / "study.json").read_text())["dataset"]["rows"])
    assert (table["num_held_out"] < 0.3 * train_rows * 6 + 40).all()
    assert table.loc[table["method"] == "fa", "log_p_missing_se"].eq(0).all()
    assert table.loc[table["method"] == "miwae-studentt", "log_p_missing_se"].gt(0).all()
    stamps = {f.name: f.stat().st_mtime_ns for f in ds_mask.iterdir()}
    again = study.main(study.parse_args(argv))  # resumes: nothing recomputed
    assert {f.name: f.stat().st_mtime_ns for f in ds_mask.iterdir()} == stamps
    pd.testing.assert_frame_equal(again.results, table)
    with pytest.raises(ValueError, match="other data or settings"):
        study.main(study.parse_args(argv + ["--epochs", "3"]))


def test_binary_data_use_bernoulli_miwae_and_accuracy(tmp_path, monkeypatch):
    from conftest import mnist_path

    monkeypatch.setenv("PYRO_LVM_DATA", str(mnist_path()))
    argv = ["--smoke", "--dataset", "binarized-mnist", "--max-rows", "60", "--out-dir",
            str(tmp_path), "--no-progress", "--methods", "mean", "miwae-bernoulli",
            "--rates", "0.5", "--examples", "3"]
    result = study.main(study.parse_args(argv))
    table = result.results
    assert (table["status"] == "ok").all(), table[["run_id", "error"]]
    assert table["accuracy"].between(0, 1).all()
    assert table["coverage_90"].isna().all()  # no quantile intervals for 0/1 draws
    assert "Imputed examples" in result.report.read_text()
    with pytest.raises(ValueError, match="not for binary"):
        study.main(study.parse_args(argv + ["--methods", "miwae-gaussian"]))


def test_bad_flags_exit_before_work(tmp_path):
    with pytest.raises(SystemExit):
        study.parse_args(["--rates", "1.5"])
    with pytest.raises(SystemExit):
        study.parse_args(["--methods", "median"])
    with pytest.raises(ValueError, match="not for continuous"):
        study.main(study.parse_args(["--smoke", "--out-dir", str(tmp_path), "--methods",
                                     "miwae-bernoulli"]))
    assert not (tmp_path / "impute-smoke").exists()
