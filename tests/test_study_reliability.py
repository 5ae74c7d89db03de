"""Studies survive kills, concurrent invocations, corrupted files, full and read-only disks.

* corrupted ``result.json`` / ``model.pt``: the run is recomputed with a note, never shown
  under the wrong run, never a crash;
* SIGKILL at random moments (3 trials, fixed seed): the rerun gives the results.csv of an
  uninterrupted study (timings aside);
* two invocations at once: exactly one computes, the other refuses (or waits with --wait);
  the number of fits equals the number of runs;
* a full disk (a small tmpfs) and a read-only directory: one line, study.json consistent,
  the interrupted run retried by the next invocation; nothing to compute on a read-only
  directory: results printed, nothing written.
"""
import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pandas as pd
import pytest

from pyro_lvm.studies.datasets import load_dataset
from pyro_lvm.studies.runner import (RunConfig, StudyIOError, StudyLocked, execution,
                                     expand_grid, run_study)
from pyro_lvm.studies.runner.lock import StudyLock

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMINGS = ["train_time_s", "eval_time_s", "wall_time_s"]
#: The smallest smoke study: 2 ELBO runs (seeds 0, 1) of the smoke DLVM.
SMOKE = [sys.executable, "studies/compare_objectives.py", "--smoke", "--ks", "1", "--seeds", "0",
         "1", "--no-report", "--no-progress"]


def _snapshot(directory: pathlib.Path) -> dict:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _table(study_dir: pathlib.Path) -> pd.DataFrame:
    return pd.read_csv(study_dir / "results.csv").drop(columns=TIMINGS)


def _smoke(out, *extra, **kwargs):
    return subprocess.run([*SMOKE, "--out-dir", str(out), *extra], cwd=REPO, capture_output=True,
                          text=True, timeout=300, **kwargs)


def _smoke_here(out, capsys, *extra):
    """The smoke study in this process (as the command line runs it): (status, stdout, stderr)."""
    from pyro_lvm.studies import compare_objectives
    from pyro_lvm.studies.runner import cli

    capsys.readouterr()
    argv = [*SMOKE[2:], "--out-dir", str(out), *extra]
    try:
        cli(compare_objectives.main, lambda: compare_objectives.parse_args(argv))
        status = 0
    except SystemExit as stop:
        status = stop.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted smoke study (and how long it took)."""
    out = tmp_path_factory.mktemp("reference")
    start = time.monotonic()
    proc = _smoke(out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out / "compare_objectives-smoke", time.monotonic() - start


# ------------------------------------------------------------------------ corrupted files
@pytest.fixture(scope="module")
def tiny_data():
    return load_dataset("digits", binarize=True, max_rows=60)


def _grid():
    base = RunConfig(hidden=(8,), latent_dim=2, epochs=1, batch_size=30, lr=1e-2,
                     num_eval_samples=10, device="cpu")
    return expand_grid(base, seeds=[0, 1])


def _corrupt_copy_other(a, b):
    shutil.copy(a / "result.json", b / "result.json")


CORRUPTIONS = {
    "another run's result.json": _corrupt_copy_other,
    "status ok, no metrics": lambda a, b: (b / "result.json").write_text('{"status": "ok"}'),
    "a JSON list": lambda a, b: (b / "result.json").write_text("[]"),
    "not JSON": lambda a, b: (b / "result.json").write_bytes(b"\x00\xffgarbage"),
    "model.pt deleted": lambda a, b: (b / "model.pt").unlink(),
    "model.pt garbage": lambda a, b: (b / "model.pt").write_bytes(os.urandom(64)),
    "old schema": lambda a, b: (b / "result.json").write_text(json.dumps(
        {**json.loads((b / "result.json").read_text()), "schema": 0})),
    "other configuration": lambda a, b: (b / "result.json").write_text(json.dumps(
        {**json.loads((b / "result.json").read_text()), "config_hash": "0" * 64})),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_corrupted_run_is_recomputed_never_trusted(corruption, tmp_path, tiny_data,
                                                      monkeypatch):
    first = run_study("s", tiny_data, _grid(), out_dir=tmp_path, progress=False, render=False)
    ids = list(first.results["run_id"])
    runs = tmp_path / "s" / "runs"
    CORRUPTIONS[corruption](runs / ids[0], runs / ids[1])
    fits = []
    real_fit = execution.fit_pair
    monkeypatch.setattr(execution, "fit_pair",
                        lambda *a, **k: (fits.append(1), real_fit(*a, **k))[1])
    again = run_study("s", tiny_data, _grid(), out_dir=tmp_path, progress=False, render=False)
    assert again.executed == ids[1:] and again.skipped == ids[:1] and len(fits) == 1
    table = again.results.set_index("run_id")
    assert (table["status"] == "ok").all()
    # the recomputed run shows its own numbers (the same as before: CPU fits are seeded)
    pd.testing.assert_frame_equal(again.results.drop(columns=TIMINGS + ["notes"]),
                                  first.results.drop(columns=TIMINGS + ["notes"]))
    assert "was not used" in table.loc[ids[1], "notes"] and "recomputed" in table.loc[ids[1], "notes"]
    assert pd.isna(table.loc[ids[0], "notes"])


# ------------------------------------------------------------------------ one writer
def test_a_held_lock_refuses_and_names_the_holder(tmp_path, tiny_data):
    study = tmp_path / "s"
    with StudyLock(study, command_line="python the-other-one.py"):
        with pytest.raises(StudyLocked, match=rf"process {os.getpid()} on .*the-other-one\.py.*--wait"):
            run_study("s", tiny_data, _grid(), out_dir=tmp_path, progress=False, render=False)
        assert not (study / "runs").exists()
    # released: the study runs; the holder information is gone afterwards
    run_study("s", tiny_data, _grid()[:1], out_dir=tmp_path, progress=False, render=False)
    assert not (study / ".lock.json").exists()


def _computed(study_dir):
    meta = json.loads((study_dir / "study.json").read_text())
    return [rid for inv in meta["invocations"] for rid in inv["computed"]], meta


@pytest.mark.slow
@pytest.mark.parametrize("wait", [False, True])
def test_two_invocations_at_once(wait, tmp_path, reference):
    extra = ["--wait"] if wait else []
    procs = [subprocess.Popen([*SMOKE, "--out-dir", str(tmp_path), *extra], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outcomes = [(p.returncode, err) for p in procs for _, err in [p.communicate(timeout=300)]]
    codes = sorted(code for code, _ in outcomes)
    study_dir = tmp_path / "compare_objectives-smoke"
    computed, meta = _computed(study_dir)
    assert sorted(computed) == sorted(pd.read_csv(study_dir / "results.csv")["run_id"])  # fits == runs
    if wait:
        assert codes == [0, 0], outcomes
        assert len(meta["invocations"]) == 2 and [] in [i["computed"] for i in meta["invocations"]]
    else:
        assert codes == [0, 1], outcomes
        refused = [err for code, err in outcomes if code == 1][0]
        assert "is being written by process" in refused and "--wait" in refused
        assert len(refused.strip().splitlines()) == 1
        assert len(meta["invocations"]) == 1
    pd.testing.assert_frame_equal(_table(study_dir), _table(reference[0]))


# ------------------------------------------------------------------------ kill -9
@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume(tmp_path, reference, capsys):
    ref_dir, seconds = reference
    rng = np.random.default_rng(20261130)
    killed = []
    for trial in range(3):
        out = tmp_path / f"trial{trial}"
        proc = subprocess.Popen([*SMOKE, "--out-dir", str(out)], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(float(rng.uniform(0.3, 1.0)) * seconds)
        proc.send_signal(signal.SIGKILL)
        killed.append(proc.wait() == -signal.SIGKILL)
        status, _, err = _smoke_here(out, capsys)
        assert status == 0, err[-2000:]
        study_dir = out / "compare_objectives-smoke"
        pd.testing.assert_frame_equal(_table(study_dir), _table(ref_dir))
        assert json.loads((study_dir / "study.json").read_text())["status"] == "finished"
    assert any(killed), "every trial finished before its kill: the test tested nothing"


# ------------------------------------------------------------------------ full and read-only disks
@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs mount point (root and mount needed), unmounted afterwards."""
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=100k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or 'mount failed'})")

    def remount(options):
        subprocess.run(["mount", "-o", f"remount,{options}", str(mount)], check=True)

    yield mount, remount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.slow
def test_full_disk_one_line_then_resume(small_disk, reference, capsys):
    mount, remount = small_disk
    status, _, err = _smoke_here(mount, capsys)
    assert status == 1, (status, err[-2000:])
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "No space left on device" in lines[0], err
    assert "free space on that file system" in lines[0] and str(mount) in lines[0]
    study_dir = mount / "compare_objectives-smoke"
    meta = json.loads((study_dir / "study.json").read_text())
    assert meta["status"] == "failed (I/O error)"
    remount("size=20m")  # space freed: the same command finishes, the run that failed included
    status, _, err = _smoke_here(mount, capsys)
    assert status == 0, err[-2000:]
    pd.testing.assert_frame_equal(_table(study_dir), _table(reference[0]))
    assert json.loads((study_dir / "study.json").read_text())["status"] == "finished"


@pytest.mark.slow
def test_read_only_directory(small_disk, reference, capsys):
    mount, remount = small_disk
    remount("size=20m")
    assert _smoke_here(mount, capsys)[0] == 0
    remount("ro")
    before = _snapshot(mount)
    status, out, err = _smoke_here(mount, capsys)  # nothing to compute: printed, not written
    assert status == 0, err
    assert "2 of 2 runs ok (0 run now, 2 found finished on disk" in out
    status, _, err = _smoke_here(mount, capsys, "--seeds", "0", "1", "2")  # one to compute
    assert status == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Read-only file system" in lines[0] and "--out-dir" in lines[0]
    assert _snapshot(mount) == before
    meta = json.loads((mount / "compare_objectives-smoke" / "study.json").read_text())
    assert meta["status"] == "finished"
