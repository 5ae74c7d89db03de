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


def test_evaluate_on_test_fits_on_training_rows_and_scores_test_rows(tmp_path, monkeypatch):
    """--evaluate-on test: every method is fit on the amputed training rows and scored on the
    amputed test rows (another amputation seed); mean and KNN numbers equal scikit-learn's
    fit(train).transform(test) recomputed here from the amputation alone."""
    from conftest import mnist_path
    from sklearn.impute import KNNImputer

    from pyro_lvm.inference import ampute
    from pyro_lvm.studies.datasets import load_dataset

    monkeypatch.setenv("PYRO_LVM_DATA", str(mnist_path()))
    argv = ["--smoke", "--dataset", "binarized-mnist", "--max-rows", "80", "--out-dir",
            str(tmp_path), "--no-progress", "--no-report", "--methods", "mean", "knn",
            "miwae-bernoulli", "--rates", "0.5", "--evaluate-on", "test"]
    result = study.main(study.parse_args(argv))
    table = result.results.set_index("method")
    assert (table["status"] == "ok").all(), table[["run_id", "error"]]
    assert result.study_dir.name == "impute-on-test-binarized-mnist-smoke"
    meta = json.loads((result.study_dir / "study.json").read_text())
    assert meta["dataset"]["evaluate_on"] == "test" and meta["settings"]["evaluate_on"] == "test"

    ds = load_dataset("binarized-mnist", data_path=str(mnist_path()), max_rows=80)
    x_train, x_test = ds.train.numpy().astype(float), ds.test.numpy().astype(float)
    seed = 0
    train_nan = np.where(ampute(x_train, 0.5, "mcar", seed=seed), x_train, np.nan)
    test_mask = ampute(x_test, 0.5, "mcar", seed=study.test_seed(seed))
    assert not np.array_equal(test_mask, ampute(x_test, 0.5, "mcar", seed=seed))
    held_out = ~test_mask

    def accuracy(imputed):
        return float(((imputed >= 0.5) == (x_test == 1))[held_out].mean())

    column_means = np.nan_to_num(np.nanmean(train_nan, axis=0), nan=0.0)
    expected = {"mean": accuracy(np.broadcast_to(column_means, x_test.shape)),
                "knn": accuracy(KNNImputer(n_neighbors=5).fit(train_nan).transform(
                    np.where(test_mask, x_test, np.nan)))}
    assert (table["num_held_out"] == held_out.sum()).all()
    for method, value in expected.items():
        assert table.loc[method, "accuracy"] == pytest.approx(value, abs=1e-12), method
    # positive control: scoring the training rows in-sample gives other numbers
    in_sample = study.main(study.parse_args(argv[:-2]))
    assert in_sample.study_dir.name == "impute-binarized-mnist-smoke"
    assert (in_sample.results.set_index("method")["accuracy"] != table["accuracy"]).all()
    assert np.isfinite(table.loc["miwae-bernoulli", "log_p_missing"])


def test_a_second_writer_of_the_same_study_is_refused(tmp_path):
    """One writer per study directory (studies/runner/lock.py), before any work."""
    from pyro_lvm.studies.runner.lock import StudyLock, StudyLocked

    argv = ["--smoke", "--out-dir", str(tmp_path), "--no-progress", "--methods", "mean",
            "--rates", "0.3"]
    with StudyLock(tmp_path / "impute-smoke"):
        with pytest.raises(StudyLocked, match="is being written by"):
            study.main(study.parse_args(argv))
    assert not (tmp_path / "impute-smoke" / "runs").exists()
    assert (study.main(study.parse_args(argv)).results["status"] == "ok").all()


def test_a_study_written_before_evaluate_on_existed_resumes(tmp_path):
    """study.json without settings.evaluate_on is an in-sample study: it resumes in-sample
    and refuses --evaluate-on test only by living in another directory."""
    argv = ["--smoke", "--out-dir", str(tmp_path), "--no-progress", "--no-report", "--methods",
            "mean", "--rates", "0.3"]
    first = study.main(study.parse_args(argv))
    meta_path = first.study_dir / "study.json"
    meta = json.loads(meta_path.read_text())
    del meta["settings"]["evaluate_on"]
    meta_path.write_text(json.dumps(meta))
    stamps = {f.name: f.stat().st_mtime_ns for f in (first.study_dir / "runs").iterdir()}
    again = study.main(study.parse_args(argv))
    assert {f.name: f.stat().st_mtime_ns for f in (first.study_dir / "runs").iterdir()} == stamps
    pd.testing.assert_frame_equal(again.results, first.results)
    other = study.main(study.parse_args(argv + ["--evaluate-on", "test"]))
    assert other.study_dir != first.study_dir and (other.results["status"] == "ok").all()


def test_report_summary_drops_empty_columns_and_shows_estimates_with_their_se():
    import numpy as np
    import pandas as pd

    from pyro_lvm.studies.impute import _display_summary

    summary = pd.DataFrame({
        "mechanism": ["mcar"] * 3, "rate": [0.5] * 3, "method": ["mean", "ppca", "miwae"],
        "seeds": [2, 2, 2], "rmse": [1.0, 0.9, 0.8], "coverage_90": [np.nan] * 3,
        "log_p_missing": [np.nan, -1.35, -1.437], "log_p_missing_se": [np.nan, 0.0, 0.00086]})
    shown = _display_summary(summary)
    assert "coverage of 90% intervals" not in shown and "coverage_90" not in shown
    column = shown["log p(x_miss | x_obs) per entry ± se"].tolist()
    assert column == ["", "-1.35 (exact)", "-1.437 ± 0.00086"]
    assert "RMSE" in shown and "log_p_missing_se" not in shown
