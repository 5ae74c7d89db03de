"""A user's own pair in a study: studies/compare_models.py and --model MODULE:FACTORY from a
directory holding the user's mypairs.py, run_study(models=...), and the README's workflow."""
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pandas as pd
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
README = REPO / "README.md"

MYPAIRS = textwrap.dedent('''
    import pyro
    import pyro.distributions as dist
    import torch
    import torch.nn as nn


    class LaplaceFactors(nn.Module):
        """z ~ Laplace(0, 1)^d, x | z ~ N(W z + b, s^2); written as Pyro's examples are:
        model(x) / guide(x), pyro.module, no mask."""

        def __init__(self, data_dim, latent_dim):
            super().__init__()
            self.decoder = nn.Linear(latent_dim, data_dim)
            self.log_s = nn.Parameter(torch.zeros(()))
            self.encoder = nn.Linear(data_dim, 2 * latent_dim)
            self.latent_dim = latent_dim

        def model(self, x):
            pyro.module("decoder", self.decoder)
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("z", dist.Laplace(x.new_zeros(self.latent_dim), 1.0).to_event(1))
                pyro.sample("x", dist.Normal(self.decoder(z), self.log_s.exp()).to_event(1), obs=x)

        def guide(self, x):
            pyro.module("encoder", self.encoder)
            loc, log_scale = self.encoder(x).chunk(2, dim=-1)
            with pyro.plate("data", x.shape[0]):
                pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


    def make_pair(data_dim, latent_dim=2):
        return LaplaceFactors(data_dim, latent_dim)
''')


def _env():
    # `python -m pyro_lvm...` from another directory imports this checkout's package
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    return env


def _study_with_mypairs(tmp_path: pathlib.Path, study: str) -> pathlib.Path:
    """Run ``python -m pyro_lvm.studies.<study> --model mypairs:make_pair --smoke`` from a
    directory holding the user's mypairs.py; returns the study's directory."""
    (tmp_path / "mypairs.py").write_text(MYPAIRS)
    cmd = [sys.executable, "-m", f"pyro_lvm.studies.{study}", "--model", "mypairs:make_pair",
           "--smoke", "--no-progress", "--out-dir", "out"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=_env(),
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp_path / "out" / f"{study}-smoke"


def _check_report(study_dir: pathlib.Path, name: str):
    results = pd.read_csv(study_dir / "results.csv")
    models = set(results["model"])
    assert {"fa", "ppca", "dlvm", name} <= models, models
    assert (results["status"] == "ok").all(), results[["run_id", "status", "error"]]
    html = (study_dir / "index.html").read_text()
    verdict = html[html.index('id="verdict"'):] if 'id="verdict"' in html else html
    label = re.escape(name.replace(":", "_"))
    assert re.search(label, verdict), "the user's pair is not in the verdict"
    for baseline in ("fa", "ppca", "dlvm"):
        assert baseline in verdict


def test_compare_models_with_a_users_pair_from_the_current_directory(tmp_path):
    # the module form here; the checkout form (python <repo>/studies/compare_models.py, which
    # drops its own folder from sys.path) runs in test_readme_walks_the_workflow_and_it_runs
    _check_report(_study_with_mypairs(tmp_path, "compare_models"), "mypairs:make_pair")


def test_a_model_spec_that_cannot_be_loaded_is_named_before_any_run(tmp_path):
    cmd = [sys.executable, str(REPO / "studies" / "compare_models.py"), "--model",
           "nosuchmodule:make_pair", "--smoke", "--out-dir", "out"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=_env(),
                          timeout=300)
    assert proc.returncode == 2
    assert "--model 'nosuchmodule:make_pair': cannot import module 'nosuchmodule'" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_run_study_takes_models(tmp_path, monkeypatch):
    from pyro_lvm.studies.datasets import load_dataset
    from pyro_lvm.studies.runner import RunConfig, expand_grid, run_study

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mypairs.py").write_text(MYPAIRS)
    monkeypatch.syspath_prepend(str(tmp_path))
    import mypairs

    dataset = load_dataset("digits", scale="standardize", drop_constant=True, max_rows=150,
                           likelihood="gaussian")
    base = RunConfig(likelihood="gaussian", latent_dim=2, hidden=(8,), epochs=1,
                     batch_size=50, num_eval_samples=10, device="cpu")
    configs = expand_grid(base, seeds=[0], model=[{"model": "mine"},
                                                   {"model": "ppca", "fit_method": "exact"}])
    result = run_study("mine", dataset, configs, out_dir=tmp_path, progress=False,
                       render=False, models={"mine": mypairs.make_pair})
    frame = result.results.set_index("model")
    assert frame.loc["mine", "status"] == "ok"
    assert frame.loc["mine", "test_log_likelihood"] < frame.loc["ppca", "test_log_likelihood"] + 50


def _readme_section():
    text = README.read_text()
    start = text.index("## Write your own model/guide pair")
    return text[start:text.index("\n## ", start + 3)]


def test_readme_walks_the_workflow_and_it_runs(tmp_path):
    section = _readme_section()
    steps = ["check_contract(", "fit(", "log_likelihood(result", "compare_models.py --model"]
    positions = [section.index(step) for step in steps]
    assert positions == sorted(positions), "the README section must walk the steps in order"
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    mypairs = next(b for b in blocks if b.startswith("# mypairs.py"))
    (tmp_path / "mypairs.py").write_text(mypairs)
    usage = next(b for b in blocks if not b.startswith("# mypairs.py"))
    proc = subprocess.run([sys.executable, "-c", "from mypairs import make_pair\n" + usage],
                          cwd=tmp_path, capture_output=True,
                          text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    command = re.search(r"```bash\n(python studies/compare_models.py --model [^\n]*)\n", section)
    args = command.group(1).split()[2:]
    proc = subprocess.run([sys.executable, str(REPO / "studies" / "compare_models.py"), *args,
                           "--smoke", "--no-progress", "--out-dir", "out"], cwd=tmp_path,
                          capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_report(tmp_path / "out" / "compare_models-smoke", "mypairs:make_pair")


# ---- which runs a user's pair gets in a study ---------------------------------------------

def _grid(**factor):
    from pyro_lvm.studies.runner import RunConfig, expand_grid

    base = RunConfig(model="dlvm", likelihood="gaussian", latent_dim=2, hidden=(8,), epochs=1)
    return base, expand_grid(base, seeds=[0, 1], **factor)


def test_a_users_pair_gets_every_objective_of_the_objectives_grid():
    from pyro_lvm.studies.compare_objectives import objective_variants
    from pyro_lvm.studies.runner.user_models import user_configs

    base, grid = _grid(objective=objective_variants([1, 5], ["standard", "dreg"]))
    runs = user_configs(base, ["mine"], [0, 1], grid=grid,
                        factories={"mine": lambda data_dim, latent_dim=2: None})
    combos = {(r.objective, r.num_particles, r.gradient) for r in runs}
    assert combos == {("elbo", 1, "standard"), ("iwae", 5, "standard"), ("iwae", 5, "dreg")}
    assert len(runs) == 3 * 2 and {r.model for r in runs} == {"mine"}
    assert len({r.run_id for r in runs}) == len(runs)


def test_settings_of_the_built_in_models_do_not_multiply_a_users_runs():
    from pyro_lvm.studies.runner.user_models import user_configs

    # the priors study: one run per seed, with the base prior left as it is
    base, grid = _grid(prior=[{"prior": p} for p in ("normal", "mixture", "vamp")])
    assert len(user_configs(base, ["mine"], [0, 1], grid=grid)) == 2
    # a latent-dimension grid: varied only for a factory that takes latent_dim
    base, grid = _grid(latent_dim=[{"latent_dim": d} for d in (2, 4)])
    takes = user_configs(base, ["mine"], [0], grid=grid,
                         factories={"mine": lambda data_dim, latent_dim: None})
    ignores = user_configs(base, ["mine"], [0], grid=grid,
                           factories={"mine": lambda data_dim: None})
    assert sorted(r.latent_dim for r in takes) == [2, 4]
    assert len(ignores) == 1


def test_compare_objectives_compares_objectives_on_a_users_pair(tmp_path):
    study_dir = _study_with_mypairs(tmp_path, "compare_objectives")
    results = pd.read_csv(study_dir / "results.csv")
    assert (results["status"] == "ok").all(), results[["run_id", "status", "error"]]
    mine = results[results["model"] == "mypairs:make_pair"]
    dlvm = results[results["model"] == "dlvm"]
    objectives = lambda frame: set(zip(frame["objective"], frame["num_particles"],  # noqa: E731
                                       frame["gradient"]))
    assert len(objectives(dlvm)) >= 2 and objectives(mine) == objectives(dlvm)
    # the shared settings the user's pair was not built with are marked in the report
    html = (study_dir / "index.html").read_text()
    shared = html[html.index("Settings shared by every run"):html.index('id="results"')]
    for setting in ("prior", "hidden", "likelihood"):
        row = shared[shared.index(f"<th>{setting}</th>"):]
        assert "(not used by: mypairs:make_pair)" in row[:row.index("</tr>")], setting
    latent = shared[shared.index("<th>latent_dim</th>"):]
    assert "not used by" not in latent[:latent.index("</tr>")]  # make_pair takes latent_dim


def test_the_settings_a_users_pair_does_not_use():
    from pyro_lvm.studies.runner import RunConfig
    from pyro_lvm.studies.runner.user_models import unused_settings

    config = RunConfig(extra={"num_components": 3})
    assert unused_settings(lambda data_dim, latent_dim: None, config) == [
        "prior", "prior_warm_start_epochs", "hidden", "likelihood", "num_components"]
    assert unused_settings(lambda data_dim, **options: None, config) == [
        "prior", "prior_warm_start_epochs", "num_components"]
