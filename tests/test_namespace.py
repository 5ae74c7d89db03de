"""The one import namespace: ``pyro_lvm.*`` from a checkout, next to a user's own modules,
and from a wheel installed into a fresh environment."""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

USER_MODELS = "raise ImportError('the user\\'s own models.py was imported by pyro_lvm')\n"
USER_INFERENCE = "raise ImportError('the user\\'s own inference.py was imported by pyro_lvm')\n"


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(extra)
    return env


def _run(args, cwd, env=None, timeout=300):
    return subprocess.run(args, cwd=cwd, env=env or _clean_env(), capture_output=True, text=True,
                          timeout=timeout)


def test_public_names_import_from_the_top_package():
    import pyro_lvm
    from pyro_lvm import ELBO, IWAE, check_contract, diagnose, elbo, fit, log_likelihood  # noqa: F401
    import pyro_lvm.inference
    import pyro_lvm.models
    import pyro_lvm.reports
    import pyro_lvm.studies
    assert pyro_lvm.fit is pyro_lvm.inference.fit
    assert pyro_lvm.models.DLVM.__module__ == "pyro_lvm.models.dlvm"
    # the function and the package that implements it have different names, so every module
    # of the package is reachable as an attribute too
    import pyro_lvm.inference.training.step as step
    assert callable(pyro_lvm.inference.fit) and step.train_step.__module__ == step.__name__
    assert pyro_lvm.inference.training.loop.fit is pyro_lvm.fit


def test_no_bare_package_names_are_installed(tmp_path):
    probe = ("import importlib.util, json; print(json.dumps({n: importlib.util.find_spec(n) is not None "
             "for n in ('models', 'inference', 'studies', 'reports', 'pyro_lvm')}))")
    proc = _run([sys.executable, "-c", probe], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"models": False, "inference": False, "studies": False,
                                       "reports": False, "pyro_lvm": True}


def test_users_own_models_and_inference_modules_do_not_collide(tmp_path):
    (tmp_path / "models.py").write_text(USER_MODELS)
    (tmp_path / "inference.py").write_text(USER_INFERENCE)
    code = textwrap.dedent("""
        import torch
        from pyro_lvm import fit, ELBO
        from pyro_lvm.models import PPCA
        x = torch.randn(40, 4)
        result = fit(PPCA(4, 1), x, objective=ELBO(), epochs=1, batch_size=20, progress=False)
        print("ok", len(result.history))
    """)
    proc = _run([sys.executable, "-c", code], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok 1"
    # a smoke study, as a module and as a file of the checkout, from the user's directory
    for cmd in ([sys.executable, "-m", "pyro_lvm.studies.linear_models"],
                [sys.executable, str(REPO / "studies" / "linear_models.py")]):
        out = tmp_path / ("as-module" if "-m" in cmd else "as-file")
        proc = _run(cmd + ["--smoke", "--no-progress", "--out-dir", str(out)], cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (out / "linear_models-smoke" / "index.html").is_file()


@pytest.mark.slow
def test_wheel_installs_and_runs_the_main_job_from_an_empty_directory(tmp_path):
    # build from a copy of the project's files: setuptools keeps a build/ folder beside the
    # sources, whose stale files (a module since removed) would end up in the wheel
    source = tmp_path / "source"
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "--cached", "--others",
                             "--exclude-standard", "-z"], capture_output=True, text=True, check=True)
    for name in filter(None, listed.stdout.split("\0")):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    wheels = tmp_path / "wheels"
    proc = _run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps",
                 "--no-build-isolation", "-q", "-w", str(wheels)], cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = wheels.glob("pyro_lvm-*.whl")
    # the fresh environment borrows its dependencies (torch, pyro, ...) from this one
    venv = tmp_path / "venv"
    proc = _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    python = venv / "bin" / "python"
    proc = _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed",
                 str(wheel)], cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    work = tmp_path / "empty"
    work.mkdir()
    proc = _run([str(python), "-c", "import pyro_lvm, pyro_lvm.reports; print(pyro_lvm.__file__)"], cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert str(venv) in proc.stdout and str(REPO) not in proc.stdout
    # the wheel holds exactly the project's packages (no stale modules, no bare names)
    import zipfile
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.split("/")[0] in ("models", "inference", "studies", "reports")]
    assert "pyro_lvm/inference/training/loop.py" in names
    assert not [n for n in names if n.startswith("pyro_lvm/inference/fit")]
    proc = _run([str(python), "-m", "pyro_lvm.studies.compare_priors", "--smoke", "--no-progress"],
                cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = work / "pyro-lvm-out" / "compare_priors-smoke"
    assert (study / "index.html").is_file() and (study / "results.csv").is_file()
    meta = json.loads((study / "study.json").read_text())
    # an installed copy is not a git checkout: no commit is claimed
    assert "git_commit" in meta and meta["git_commit"] is None
    assert not list(work.glob("*.py"))
