"""Executors of a study: the local one and Ray (the same run function, the same results)."""
from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import pandas as pd
import pytest

from pyro_lvm.studies.datasets import load_dataset
from pyro_lvm.studies.runner import RunConfig, expand_grid
from pyro_lvm.studies.runner.executors import (LocalExecutor, RayExecutor, RunTask,
                                               make_executor, ray_missing_message)

REPO = pathlib.Path(__file__).resolve().parents[1]
#: Columns that differ between two executions of the same runs (wall clock, host).
TIMING = ("fit_time_s", "eval_time_s", "wall_time_s", "time_s", "finished", "started", "device")


def _need_ray():
    if importlib.util.find_spec("ray") is None:
        if os.environ.get("CI"):
            pytest.fail("Ray is required in CI (.ci/run installs the [ray] extra)")
        pytest.skip("Ray is not installed (pip install -e '.[ray]')")
    import ray
    return ray


def _comparable(csv: pathlib.Path) -> pd.DataFrame:
    frame = pd.read_csv(csv)
    drop = [c for c in frame.columns if c in TIMING or c.endswith("_time_s") or "time" in c]
    return frame.drop(columns=drop).sort_values("run_id").reset_index(drop=True)


def test_make_executor_names_and_refusals():
    assert isinstance(make_executor("local"), LocalExecutor)
    with pytest.raises(ValueError, match="--ray-address needs --executor ray"):
        make_executor("local", address="auto")
    with pytest.raises(ValueError, match="unknown executor 'dask'"):
        make_executor("dask")
    assert "pip install -e \".[ray]\"" in ray_missing_message()


def test_cli_checks_executor_flags_before_any_run(tmp_path, monkeypatch):
    from pyro_lvm.studies import compare_priors
    with pytest.raises(SystemExit) as exit_info:
        compare_priors.parse_args(["--smoke", "--ray-address", "auto", "--out-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "ray" else real_find_spec(name, *a))
    with pytest.raises(SystemExit) as exit_info:
        compare_priors.parse_args(["--smoke", "--executor", "ray", "--out-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert not any(tmp_path.iterdir())


def test_missing_ray_is_one_clear_message_on_the_command_line(tmp_path):
    code = ("import sys, runpy; sys.modules['ray'] = None; "
            "sys.argv = ['compare_priors.py', '--smoke', '--executor', 'ray', '--out-dir', "
            f"{str(tmp_path)!r}]; runpy.run_module('pyro_lvm.studies.compare_priors', "
            "run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and ".[ray]" in proc.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_ray_executor_gives_the_local_results_and_cancels_on_stop(tmp_path):
    ray = _need_ray()
    from pyro_lvm.studies import compare_priors
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        common = ["--smoke", "--no-progress", "--no-report"]
        local = compare_priors.main(compare_priors.parse_args(
            common + ["--out-dir", str(tmp_path / "local")]))
        remote = compare_priors.main(compare_priors.parse_args(
            common + ["--out-dir", str(tmp_path / "ray"), "--executor", "ray"]))
        assert sorted(remote.executed) == sorted(local.executed) and len(local.executed) >= 6
        pd.testing.assert_frame_equal(_comparable(remote.study_dir / "results.csv"),
                                      _comparable(local.study_dir / "results.csv"))
        # the executor leaves a Ray it did not start running
        assert ray.is_initialized()

        # stopping the driver after the first finished run cancels the outstanding tasks
        data = load_dataset("digits", binarize=True, max_rows=60)
        base = RunConfig(hidden=(8,), latent_dim=2, epochs=3, batch_size=30, lr=1e-2,
                         num_eval_samples=10, device="cpu", study="t", dataset=data.name)
        tasks = [RunTask(c, tmp_path / "stop" / c.run_id) for c in expand_grid(base, seeds=range(6))]
        finished = RayExecutor().run(tasks, data, num_threads=1)
        first_task, first_result = next(finished)
        assert first_result["status"] == "ok"
        finished.close()
        done = [t for t in tasks if (t.run_dir / "result.json").exists()]
        assert first_task in done and len(done) < len(tasks)
    finally:
        ray.shutdown()
