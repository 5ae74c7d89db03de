"""benchmarks/gpu_check.sh, the one prepared device check: its CPU dry run."""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils' timeout")
def test_gpu_check_dry_run_runs_every_step_and_writes_the_summary(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=900,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    summary = (out / "SUMMARY.md").read_text()
    assert "dry run on the CPU" in summary
    for name in ["cuda_tests", "train_b100", "mnist_elbo", "mnist_iwae"]:
        assert f"## {name}: ok" in summary, summary[-4000:]
        assert (out / f"{name}.txt").is_file()
    # eval_throughput exits 1 when its speed target is missed (on a loaded CPU, possibly):
    # the step must have run to its end and found the same estimates on both sides
    assert "## eval_k5000: " in summary and "time limit" not in summary
    assert "same per-row estimates (max |diff| < 0.001 nats): yes" in (
        out / "eval_k5000.txt").read_text()
    assert (out / "train_b100.json").is_file()
    # the CUDA-only sides say why they did not run instead of failing
    assert "needs a CUDA device" in (out / "train_b100.txt").read_text()


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils' timeout")
def test_gpu_check_skips_the_steps_that_no_longer_fit_its_time_budget(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env["GPU_CHECK_SECONDS"] = "5"  # under every step's own limit: nothing may start
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = (tmp_path / "out" / "SUMMARY.md").read_text()
    for name in ["imports", "cuda_tests", "train_b100", "eval_k5000", "mnist_elbo", "mnist_iwae"]:
        assert f"## {name}: skipped (its " in summary, summary
        assert not (tmp_path / "out" / f"{name}.txt").exists()
    assert proc.stdout.count("skipped (budget)") == 6
