"""The studies take the count and category observation models (--likelihood)."""
import numpy as np
import pandas as pd
import pytest

from pyro_lvm.studies import compare_priors


def test_compare_priors_with_a_count_likelihood(tmp_path):
    args = compare_priors.parse_args(["--smoke", "--likelihood", "poisson", "--priors", "normal",
                                      "--objectives", "elbo", "--out-dir", str(tmp_path),
                                      "--no-progress", "--no-report"])
    result = compare_priors.main(args)
    table = result.results
    assert (table["status"] == "ok").all() and (table["likelihood"] == "poisson").all()
    assert table["bits_per_dim"].notna().all()  # a log-probability of counts


def test_compare_priors_categorical_needs_groups_and_runs_with_them(tmp_path, capsys):
    with pytest.raises(SystemExit):
        compare_priors.parse_args(["--smoke", "--likelihood", "categorical"])
    assert "--categorical-groups" in capsys.readouterr().err
    rng = np.random.default_rng(0)
    onehot = np.hstack([np.eye(3)[rng.integers(0, 3, 80)], np.eye(2)[rng.integers(0, 2, 80)]])
    path = tmp_path / "cats.csv"
    pd.DataFrame(onehot, columns=[f"a{i}" for i in range(3)] + ["b0", "b1"]).to_csv(path, index=False)
    args = compare_priors.parse_args(["--smoke", "--dataset", str(path), "--likelihood",
                                      "categorical", "--categorical-groups", "3,2", "--priors",
                                      "normal", "--objectives", "elbo", "--out-dir",
                                      str(tmp_path), "--no-progress", "--no-report"])
    result = compare_priors.main(args)
    assert (result.results["status"] == "ok").all()


def test_cluster_study_runs_the_recipe_and_reports_paired_seeds(tmp_path):
    """The cluster study's runs have the pre-training phase (family hook) before the joint
    SVI phase, record it in their notes, and the findings give every seed's paired scores."""
    import json
    import pathlib

    from pyro_lvm.studies import cluster

    args = cluster.parse_args(["--smoke", "--pretrain-epochs", "2", "--out-dir",
                               str(tmp_path), "--no-progress", "--no-report"])
    result = cluster.main(args)
    table = result.results
    assert (table["status"] == "ok").all() and set(table["seed"]) == {0, 1}
    assert (table["covariance"] == "full").all()
    run_dirs = list(pathlib.Path(result.study_dir, "runs").iterdir())
    assert len(run_dirs) == 2
    for run_dir in run_dirs:
        history = pd.read_csv(run_dir / "history.csv")
        assert list(history["phase"]) == ["pretrain"] * 2 + ["main"] * args.epochs
        assert history["epoch"].tolist() == list(range(1, 3 + args.epochs))
        notes = json.loads((run_dir / "result.json").read_text())["notes"]
        assert any("pre-training: 2 epoch(s)" in n for n in notes)
    lines = cluster.findings(table)
    assert sum(line.startswith("seed ") for line in lines) == 2
    assert any("paired on the seed" in line for line in lines)
