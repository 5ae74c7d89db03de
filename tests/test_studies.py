"""Study scripts and the shared runner: every script runs (--smoke), studies resume without
recomputing finished runs, failing runs are recorded, bad data stop a study before training."""
import hashlib
import importlib
import json
import pathlib
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from pyro_lvm.studies.runner import execution, families
from pyro_lvm.studies.datasets import Dataset, load_dataset
from pyro_lvm.studies.runner import RunConfig, StudyDataError, expand_grid, run_study

REPO = pathlib.Path(__file__).resolve().parents[1]
STUDIES_DIR = REPO / "studies"
#: Every study script; the coverage test fails when a script is not listed here.
STUDY_SCRIPTS = ("compare_priors", "compare_objectives", "compare_observation_models",
                 "linear_models", "compare_families", "compare_count_models", "cluster",
                 "impute", "compare_models")
NOT_STUDIES = {"__init__", "_checkout", "datasets", "count_families"}
#: Metrics that must be reproduced exactly by a resumed study (timings excluded).
REPRODUCIBLE = ("test_log_likelihood", "test_log_likelihood_se", "test_elbo", "kl",
                "active_units", "khat_median", "final_train_objective", "final_valid_objective")


def _snapshot(directory: pathlib.Path) -> dict:
    """path -> (mtime_ns, sha256) of every file below ``directory``."""
    return {str(p.relative_to(directory)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_data():
    return load_dataset("digits", binarize=True, max_rows=60)


def _tiny_grid(seeds=(0, 1, 2), **axes):
    base = RunConfig(hidden=(8,), latent_dim=2, epochs=1, batch_size=30, lr=1e-2,
                     num_eval_samples=10, device="cpu")
    return expand_grid(base, seeds=seeds, **axes)


# ---------------------------------------------------------------------------------- scripts
def test_every_study_script_is_listed():
    found = {p.stem for p in STUDIES_DIR.glob("*.py")} - NOT_STUDIES
    assert found == set(STUDY_SCRIPTS), (
        f"unlisted study scripts {sorted(found - set(STUDY_SCRIPTS))} / listed but missing "
        f"{sorted(set(STUDY_SCRIPTS) - found)}: add each study to STUDY_SCRIPTS (it then gets "
        f"a --smoke test)")


@pytest.mark.parametrize("script", [s for s in STUDY_SCRIPTS if s != "compare_priors"])
def test_study_script_smoke(script, tmp_path, capsys):
    module = importlib.import_module(f"pyro_lvm.studies.{script}")
    args = module.parse_args(["--smoke", "--out-dir", str(tmp_path), "--no-progress"])
    result = module.main(args)
    study_dir = tmp_path / f"{script}-smoke"
    table = pd.read_csv(study_dir / "results.csv")
    assert len(table) >= 2 and (table["status"] == "ok").all(), table[["run_id", "status", "error"]]
    if script == "impute":  # imputation metrics on held-out entries instead of log p(x)
        assert table["rmse"].notna().all() and set(table["rate"]) == {0.2, 0.5}
        with_draws = table[table["method"].isin(["ppca", "miwae-gaussian"])]
        assert with_draws["coverage_90"].between(0, 1).all()
        assert with_draws["log_p_missing"].notna().all()
    else:
        assert table["test_log_likelihood"].notna().all()
    assert (study_dir / "index.html").exists() and result.report == study_dir / "index.html"
    meta = json.loads((study_dir / "study.json").read_text())
    assert meta["status"] == "finished" and meta["dataset"]["sha256"]
    out = capsys.readouterr().out
    assert "report:" in out
    if script == "compare_observation_models":  # clean and contaminated fits, paired
        assert set(table["outlier_fraction"]) == {0.0, 0.05}
        assert result.findings and meta["findings"] == result.findings
        assert "Gaussian minus Student-t degradation" in out
    if script == "compare_families":  # every run labelled with what its log-likelihood is
        assert set(table["likelihood_kind"]) <= {"exact", "IS", "AIS"}
        assert (table.loc[table["likelihood_kind"] == "exact", "test_log_likelihood_se"] == 0).all()
        assert "published" in out
    if script == "linear_models":  # exact fits: the IS estimate equals the exact value
        exact = table[table["fit_method"] == "exact"]
        np.testing.assert_allclose(exact["test_log_likelihood"], exact["exact_test_log_likelihood"],
                                   atol=1e-4)
        assert exact["exact_test_log_likelihood"].notna().all()


def test_compare_priors_header_and_reliability_from_the_actual_grid(tmp_path):
    """An IWAE-only grid: no "KL warm-up" in the header; every run records the share of rows
    above the K-aware k-hat threshold and the PSIS-smoothed estimate; the verdict says which
    prior and how reliable the estimates are."""
    from pyro_lvm.studies import compare_priors

    args = compare_priors.parse_args(["--smoke", "--objectives", "iwae", "--priors", "normal",
                                      "mixture", "--out-dir", str(tmp_path), "--no-progress"])
    compare_priors.main(args)
    study_dir = tmp_path / "compare_priors-smoke"
    meta = json.loads((study_dir / "study.json").read_text())
    assert "warm-up" not in meta["description"] and "IWAE" in meta["description"]
    table = pd.read_csv(study_dir / "results.csv")
    assert table["khat_unreliable_frac"].between(0, 1).all()
    assert np.isfinite(table["test_log_likelihood_psis"]).all()
    html = (study_dir / "index.html").read_text()
    assert "Which prior?" in html and "Pareto k̂ above" in html


def test_compare_priors_command_line_smoke(tmp_path):
    """The main job as a user runs it: a fresh process, from the repository root."""
    proc = subprocess.run(
        [sys.executable, "studies/compare_priors.py", "--smoke", "--out-dir", str(tmp_path),
         "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    study_dir = tmp_path / "compare_priors-smoke"
    assert f"report:  {(study_dir / 'index.html').resolve()}" in proc.stdout
    table = pd.read_csv(study_dir / "results.csv")
    assert set(table["prior"]) == {"normal", "mixture", "vamp"}
    assert set(table["objective"]) == {"elbo", "iwae"}
    assert (table["status"] == "ok").all(), table[["run_id", "error"]]
    html = (study_dir / "index.html").read_text()
    assert all(rid in html for rid in table["run_id"])
    for run_id in table["run_id"]:
        files = {p.name for p in (study_dir / "runs" / run_id).iterdir()}
        assert {"config.json", "result.json", "history.csv", "model.pt", "artifacts.npz"} <= files
    # a problem found before training is one message and exit status 2, not a traceback
    proc = subprocess.run(
        [sys.executable, "studies/compare_priors.py", "--smoke", "--dataset", "binarized-mnist",
         "--data-path", str(tmp_path / "missing"), "--out-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: binarized MNIST not found") and "--data-path" in proc.stderr


# ---------------------------------------------------------------------------------- configs
def test_run_config_identity_and_round_trip():
    c = RunConfig(prior="vamp", objective="iwae", num_particles=5, hidden=(32, 16), seed=2,
                  extra={"num_pseudo_inputs": 50})
    assert c.run_id.startswith("dlvm-vamp-iwae5-bernoulli-s2-")
    assert RunConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert RunConfig.from_record(c.to_record()) == c
    assert c.to_record()["hidden"] == "32x16" and c.to_record()["num_pseudo_inputs"] == 50
    # identity ignores the device and the study, but not anything that changes results
    assert c.replace(device="cuda", study="x").run_id == c.run_id
    assert c.replace(lr=0.002).run_id != c.run_id
    assert c.replace(extra={"num_pseudo_inputs": 51}).run_id != c.run_id
    grid = expand_grid(c, seeds=[0, 1], prior=["normal", "mixture"],
                       objective=[{"objective": "elbo", "num_particles": 1},
                                  {"objective": "iwae", "num_particles": 5}])
    assert len(grid) == 8 and len({g.run_id for g in grid}) == 8
    with pytest.raises(ValueError, match="clash"):
        RunConfig(extra={"seed": 3})


def test_prior_warm_start_trains_both_phases(tmp_path, tiny_data, monkeypatch):
    """A VampPrior run warm-started with the standard normal prior: two fits (normal prior
    for w epochs, then the run's prior for the rest), the encoder and decoder carried over,
    one history with epochs, steps and the KL warm-up schedule going on across the switch."""
    base = RunConfig(prior="vamp", hidden=(8,), latent_dim=2, epochs=3, batch_size=30, lr=1e-2,
                     num_eval_samples=10, device="cpu", warmup_epochs=2,
                     extra={"num_pseudo_inputs": 5})
    config = base.replace(prior_warm_start_epochs=1)
    # the option is part of the run's identity, but the ids of runs without it are unchanged
    assert "prior_warm_start_epochs" not in base.identity() and config.run_id != base.run_id
    assert RunConfig.from_record(config.to_record()) == config
    with pytest.raises(ValueError, match="prior_warm_start_epochs"):
        base.replace(prior_warm_start_epochs=-1)

    real_fit = execution.fit_pair
    fits = []

    def recording_fit(model, dataset, config, **kwargs):
        fits.append((config.prior, config.epochs,
                     {k: v.clone() for k, v in model.state_dict().items()}))
        fitted = real_fit(model, dataset, config, **kwargs)
        fits[-1] += ({k: v.clone() for k, v in fitted.model.state_dict().items()},)
        return fitted

    monkeypatch.setattr(execution, "fit_pair", recording_fit)
    result = run_study("warm", tiny_data, [config, config.replace(prior_warm_start_epochs=3),
                                           config.replace(prior="normal")],
                       out_dir=tmp_path, render=False, progress=False)
    table = result.results.set_index("run_id")
    vamp_id, too_long_id, normal_id = table.index

    # 1. the warm-started run: normal prior for 1 epoch, then the VampPrior for 2
    assert [(prior, epochs) for prior, epochs, *_ in fits[:2]] == [("normal", 1), ("vamp", 2)]
    warm_end, vamp_start = fits[0][3], fits[1][2]
    shared = [k for k in vamp_start if not k.startswith("prior.")]
    assert shared and set(shared) == {k for k in warm_end if not k.startswith("prior.")}
    for k in shared:
        torch.testing.assert_close(vamp_start[k], warm_end[k], rtol=0, atol=0)
    assert "prior.pseudo_inputs" in vamp_start  # the prior kept its own (data) initialization
    row = table.loc[vamp_id]
    assert row["status"] == "ok" and row["prior_warm_start_epochs"] == 1
    assert row["epochs_run"] == config.epochs
    assert "warm start: 1 epoch(s) with the standard normal prior" in row["notes"]
    history = pd.read_csv(tmp_path / "warm" / "runs" / vamp_id / "history.csv")
    assert list(history["epoch"]) == [1, 2, 3]
    assert list(history["phase"]) == ["warm_start", "main", "main"]
    assert history["step"].is_monotonic_increasing and history["step"].is_unique
    assert history["beta"].is_monotonic_increasing and history["beta"].is_unique  # not restarted

    # 2. a warm start as long as the run leaves nothing for the VampPrior: a failed run
    assert table.loc[too_long_id, "status"] == "failed"
    assert "must be smaller than epochs=3" in table.loc[too_long_id, "error"]
    # 3. the normal prior needs no warm start: one ordinary fit, and the result says so
    assert [(prior, epochs) for prior, epochs, *_ in fits[2:]] == [("normal", 3)]
    assert table.loc[normal_id, "status"] == "ok" and table.loc[normal_id, "epochs_run"] == 3
    assert "ignored" in table.loc[normal_id, "notes"]


# ---------------------------------------------------------------------------------- resume
def test_interrupted_study_resumes_without_recomputing(tmp_path, tiny_data, monkeypatch):
    configs = _tiny_grid(prior=["normal"], seeds=(0, 1, 2))
    ids = [c.replace(dataset=tiny_data.name).run_id for c in configs]  # run_study names the data
    real_fit = execution.fit_pair
    calls = []

    def ctrl_c_in_second_run(*args, **kwargs):
        calls.append(kwargs["config"] if "config" in kwargs else args[2])
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the second run
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(execution, "fit_pair", ctrl_c_in_second_run)
    with pytest.raises(KeyboardInterrupt):
        run_study("resume", tiny_data, configs, out_dir=tmp_path, render=False, progress=False)
    study_dir = tmp_path / "resume"
    partial = pd.read_csv(study_dir / "results.csv")
    assert list(partial["status"]) == ["ok", "pending", "pending"]
    assert json.loads((study_dir / "study.json").read_text())["status"] == "interrupted"
    second = study_dir / "runs" / ids[1]
    assert (second / "config.json").exists() and not (second / "result.json").exists()
    first_result = (study_dir / "runs" / ids[0] / "result.json").read_bytes()

    calls.clear()
    monkeypatch.setattr(execution, "fit_pair", lambda *a, **k: (calls.append(1), real_fit(*a, **k))[1])
    resumed = run_study("resume", tiny_data, configs, out_dir=tmp_path, render=False, progress=False)
    assert len(calls) == 2  # only the unfinished runs were fit
    assert resumed.skipped == ids[:1] and resumed.executed == ids[1:]
    assert (study_dir / "runs" / ids[0] / "result.json").read_bytes() == first_result
    table = pd.read_csv(study_dir / "results.csv")
    assert (table["status"] == "ok").all()

    # the same table as an uninterrupted study (CPU fits are seeded and reproducible)
    monkeypatch.setattr(execution, "fit_pair", real_fit)
    straight = run_study("resume", tiny_data, configs, out_dir=tmp_path / "straight",
                         render=False, progress=False)
    reference = pd.read_csv(tmp_path / "straight" / "resume" / "results.csv")
    pd.testing.assert_frame_equal(table[["run_id", *REPRODUCIBLE]],
                                  reference[["run_id", *REPRODUCIBLE]])
    assert straight.executed == ids

    # a third call finds everything done; fresh=True starts over
    again = run_study("resume", tiny_data, configs, out_dir=tmp_path, render=False, progress=False)
    assert again.executed == [] and len(again.skipped) == 3
    calls.clear()
    monkeypatch.setattr(execution, "fit_pair", lambda *a, **k: (calls.append(1), real_fit(*a, **k))[1])
    run_study("resume", tiny_data, configs[:1], out_dir=tmp_path, render=False, progress=False,
              fresh=True)
    assert len(calls) == 1 and [p.name for p in (study_dir / "runs").iterdir()] == ids[:1]


# ---------------------------------------------------------------------------------- failures
@pytest.fixture(scope="module")
def finished_study(tmp_path_factory, tiny_data):
    """A rendered study with one healthy run, one invalid configuration and one NaN fit;
    named like the compare_priors smoke study so the bad-data tests can aim at it."""
    out = tmp_path_factory.mktemp("reports")
    configs = _tiny_grid(seeds=(0,), prior=["normal", "no-such-prior"]) + _tiny_grid(seeds=(7,))
    real_objective = families.build_objective

    def diverging(config):
        objective = real_objective(config)
        if config.seed != 7:
            return objective
        loss = objective.differentiable_loss
        steps = []

        def nan_from_second_step(*args, **kwargs):  # the fit diverges after one good step
            steps.append(1)
            value = loss(*args, **kwargs)
            return value * float("nan") if len(steps) > 1 else value

        objective.differentiable_loss = nan_from_second_step
        return objective

    mp = pytest.MonkeyPatch()
    mp.setattr(families, "build_objective", diverging)
    try:
        result = run_study("compare_priors-smoke", tiny_data, configs, out_dir=out, progress=False)
    finally:
        mp.undo()
    return out, result, configs


def test_failed_runs_are_recorded_and_the_grid_goes_on(finished_study):
    out, result, configs = finished_study
    table = result.results.set_index("run_id")
    ok, bad_config, nan_fit = table.index
    assert table.loc[ok, "status"] == "ok" and np.isfinite(table.loc[ok, "test_log_likelihood"])
    assert table.loc[bad_config, "status"] == "failed"
    assert "unknown prior 'no-such-prior'" in table.loc[bad_config, "error"]
    assert table.loc[nan_fit, "status"] == "failed"
    assert "NonFiniteLossError" in table.loc[nan_fit, "error"]
    saved = json.loads((result.study_dir / "runs" / nan_fit / "result.json").read_text())
    assert "Traceback" in saved["traceback"] and saved["status"] == "failed"
    assert sorted(result.failed) == sorted([bad_config, nan_fit])
    html = (result.study_dir / "index.html").read_text()
    assert bad_config in html and "no-such-prior" in html and nan_fit in html


def _assert_untouched(out, before, monkeypatch, attempt):
    """``attempt()`` must fail before any training and change no file under ``out``."""
    def no_training(*args, **kwargs):
        raise AssertionError("training started although the data are bad")

    monkeypatch.setattr(execution, "fit_pair", no_training)
    monkeypatch.setattr(execution, "fit_exact", no_training)
    attempt()
    assert _snapshot(out) == before


def test_bad_data_fails_before_training_and_leaves_the_report(finished_study, tiny_data,
                                                              monkeypatch, tmp_path):
    out, result, configs = finished_study
    before = _snapshot(out)
    assert "compare_priors-smoke/index.html" in before
    name, good = "compare_priors-smoke", configs[:1]

    def nan_data():
        test = tiny_data.test.clone()
        test[5, 9] = float("nan")
        bad = Dataset(tiny_data.name, tiny_data.train, tiny_data.valid, test)
        with pytest.raises(StudyDataError, match=r"test split contains 1 NaN.*\(row 5, column 9\)"):
            run_study(name, bad, good, out_dir=out, progress=False)

    def wrong_width():
        with pytest.raises(StudyDataError, match="columns but the model expects data_dim=64"):
            run_study(name, {"train": tiny_data.train.numpy(), "test": tiny_data.test[:, :60].numpy()},
                      good, out_dir=out, progress=False)

    def not_binary():
        continuous = load_dataset("digits", max_rows=60)
        with pytest.raises(StudyDataError, match=r"outside \{0, 1\} for a Bernoulli"):
            run_study(name, continuous, good, out_dir=out, progress=False)

    def missing_mnist():
        from pyro_lvm.studies import compare_priors

        args = compare_priors.parse_args(["--smoke", "--dataset", "binarized-mnist", "--data-path",
                                          str(tmp_path / "no-mnist-here"), "--out-dir", str(out)])
        with pytest.raises(FileNotFoundError, match="binarized MNIST not found"):
            compare_priors.main(args)

    for attempt in (nan_data, wrong_width, not_binary, missing_mnist):
        _assert_untouched(out, before, monkeypatch, attempt)


def test_changed_data_in_an_existing_study_needs_fresh(finished_study, tiny_data, monkeypatch):
    out, result, configs = finished_study
    before = _snapshot(out)
    other = load_dataset("digits", binarize=True, max_rows=60, seed=1)

    def attempt():
        with pytest.raises(ValueError, match="holds runs on different data.*--fresh"):
            run_study("compare_priors-smoke", other, configs[:1], out_dir=out, progress=False)

    _assert_untouched(out, before, monkeypatch, attempt)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_requested_without_gpu_fails_up_front(tmp_path, tiny_data):
    with pytest.raises(ValueError, match="CUDA is not available"):
        run_study("gpu", tiny_data, [c.replace(device="cuda") for c in _tiny_grid(seeds=(0,))],
                  out_dir=tmp_path, progress=False)
    assert not (tmp_path / "gpu").exists()


def test_a_study_runs_on_the_users_csv(tmp_path):
    """User data reach a study through --dataset: validated, split, standardized, reported."""
    from pyro_lvm.studies import linear_models

    rng = np.random.default_rng(0)
    latent = rng.normal(size=(150, 2))
    table = pd.DataFrame(latent @ rng.normal(size=(2, 6)) + 0.3 * rng.normal(size=(150, 6)),
                         columns=[f"m{j}" for j in range(6)])
    path = tmp_path / "measurements.csv"
    table.to_csv(path, index=False)
    args = linear_models.parse_args(["--smoke", "--dataset", str(path), "--models", "ppca", "fa",
                                     "--fit-methods", "exact", "--out-dir", str(tmp_path),
                                     "--no-report", "--no-progress"])
    result = linear_models.main(args)
    assert (result.results["status"] == "ok").all() and len(result.results) == 2
    meta = json.loads((result.study_dir / "study.json").read_text())
    assert meta["dataset"]["name"] == "measurements" and "CSV file" in meta["dataset"]["source"]
    # exact fits of a 2-factor model to 2-factor data: the estimate equals the exact value
    np.testing.assert_allclose(result.results["test_log_likelihood"],
                               result.results["exact_test_log_likelihood"], atol=1e-4)
