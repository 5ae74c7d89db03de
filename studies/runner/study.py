"""Study orchestration: validate the data against the grid, take the study's lock, resume
from the runs on disk, execute the rest one after another, keep ``results.csv`` and
``study.json`` current, and render the report."""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import pathlib
import shlex
import shutil
import sys
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import pandas as pd
import torch

from pyro_lvm.inference.engine import isolated_param_store, resolve_device
from pyro_lvm.paths import DEFAULT_OUT_DIR
from pyro_lvm.studies.datasets import SPLITS, Dataset, load_dataset, validate_for_likelihood
from pyro_lvm.studies.runner import execution, families, provenance, storage, user_models
from pyro_lvm.studies.runner.evaluation import ARTIFACTS
from pyro_lvm.studies.runner.executors import LocalExecutor, RunTask
from pyro_lvm.studies.runner.lock import StudyLock
from pyro_lvm.studies.runner.progress import StudyProgress
from pyro_lvm.studies.runner.results import read_result, results_frame
from pyro_lvm.studies.runner.schema import (METRIC_COLUMNS, STATUS_COLUMNS, RunConfig,
                                            StudyDataError)

__all__ = ["StudyResult", "StudyIOError", "run_study", "validate_study", "render_study"]


class StudyIOError(OSError):
    """The study could not be written (disk full, read-only, no permission)."""

    ADVICE = {errno.ENOSPC: "free space on that file system or pass another --out-dir",
              errno.EROFS: "the file system is read-only: pass a writable --out-dir",
              errno.EACCES: "no permission: make the directory writable or pass another --out-dir",
              errno.EPERM: "not permitted: make the directory writable or pass another --out-dir"}

    @classmethod
    def from_os_error(cls, exc: OSError) -> "StudyIOError":
        advice = cls.ADVICE.get(exc.errno, "free space or pass another --out-dir")
        if getattr(errno, "EDQUOT", None) == exc.errno:
            advice = "disk quota exceeded: free space or pass another --out-dir"
        where = exc.filename if exc.filename is not None else "the study directory"
        error = cls(exc.errno, f"cannot write {where}: {exc.strerror}; {advice} (finished runs "
                               f"are kept; run the same command again to resume)")
        error.filename = exc.filename
        return error

    def __str__(self) -> str:
        return self.strerror


@dataclasses.dataclass
class StudyResult:
    """What :func:`run_study` did.

    Attributes
    ----------
    study_dir : pathlib.Path
    results : pandas.DataFrame
        The results table (also in ``results.csv``).
    report : pathlib.Path or None
        The HTML report, when rendered.
    executed, skipped, failed : list of str
        Run ids run now, found finished on disk, and failed (now or before).
    findings : list of str
        The study's conclusions (``findings`` of :func:`run_study`).
    """

    study_dir: pathlib.Path
    results: pd.DataFrame
    report: Optional[pathlib.Path]
    executed: List[str]
    skipped: List[str]
    failed: List[str]
    findings: List[str] = dataclasses.field(default_factory=list)


# ---------------------------------------------------------------------------- validation
def validate_study(dataset: Dataset, configs: Sequence[RunConfig]) -> None:
    """Check the data against every model of the grid before anything runs.

    Raises :class:`StudyDataError` (a ValueError) naming the split, the rows/columns and the
    configuration when the data cannot be used. A configuration whose model cannot even be
    built is *not* a data problem: it is left to fail (and be recorded) as a run.
    """
    from pyro_lvm.models.validation import check_data

    if not isinstance(dataset, Dataset):
        raise StudyDataError(f"expected a studies.datasets.Dataset, got {type(dataset).__name__}")
    p = dataset.data_dim
    for split in SPLITS:
        x = getattr(dataset, split)
        if split != "valid" and x.shape[0] == 0:
            raise StudyDataError(f"the {split} split of {dataset.name!r} is empty")
        if x.shape[0]:
            try:
                check_data(x, p, name=f"{dataset.name} {split} split", mask=dataset.mask(split))
            except ValueError as exc:
                raise StudyDataError(str(exc)) from None
    checked = set()
    for config in configs:
        key = (config.model, config.likelihood, config.prior, config.latent_dim)
        if key not in checked:
            checked.add(key)
            _validate_for_config(dataset, config)


def _validate_for_config(dataset: Dataset, config: RunConfig) -> None:
    if config.likelihood in ("bernoulli", "gaussian", "studentt"):
        try:
            validate_for_likelihood(dataset, config.likelihood)
        except ValueError as exc:
            raise StudyDataError(f"{exc} [configuration {config.label()}]") from None
    try:
        with isolated_param_store():
            model = families.build_model(config, dataset)
    except Exception:  # a bad configuration, recorded when its run fails
        return
    check = getattr(model, "check_data", None)
    if check is None:
        return
    for split in SPLITS:
        x = getattr(dataset, split)
        if x.shape[0] == 0:
            continue
        try:
            check(x, mask=dataset.mask(split))
        except ValueError as exc:
            raise StudyDataError(
                f"{dataset.name} {split} split cannot be modelled by {config.label()}: {exc}"
            ) from None


def _prepare(name: str, dataset, configs: Sequence[RunConfig]) -> Tuple[Dataset, List[RunConfig]]:
    """The dataset and the grid, named and checked (nothing is written yet)."""
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise ValueError(f"invalid study name {name!r}")
    if not isinstance(dataset, Dataset):
        try:
            dataset = load_dataset(dataset)
        except (ValueError, FileNotFoundError) as exc:
            raise StudyDataError(str(exc)) from None
    if not configs:
        raise ValueError("the study has no configurations to run")
    configs = [c.replace(study=name, dataset=dataset.name) for c in configs]
    ids = [c.run_id for c in configs]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"the grid lists the same run more than once: {dup}")
    for device in sorted({c.device for c in configs}):
        resolve_device(device)  # ValueError: CUDA requested on a machine without it
    validate_study(dataset, configs)
    return dataset, configs


def _check_same_data(study_dir: pathlib.Path, dataset: Dataset, old_meta) -> None:
    old_sha = ((old_meta or {}).get("dataset") or {}).get("sha256")
    runs_dir = study_dir / "runs"
    if old_sha and old_sha != dataset.sha256 and runs_dir.exists() and any(runs_dir.iterdir()):
        raise ValueError(
            f"{study_dir} holds runs on different data (SHA-256 {old_sha[:12]}..., now "
            f"{dataset.sha256[:12]}... for {dataset.name}); pass fresh=True (--fresh) to replace "
            f"them or use another out_dir (--out-dir) to keep both"
        )


# ---------------------------------------------------------------------------- study.json
def _study_meta(name: str, dataset: Dataset, configs: Sequence[RunConfig], *, title, description,
                command_line, metadata, old_meta) -> Dict[str, Any]:
    """``study.json`` at the start of an invocation; earlier invocations are kept."""
    old_meta = old_meta if isinstance(old_meta, dict) else {}
    previous = [i for i in old_meta.get("invocations") or [] if isinstance(i, dict)]
    started = provenance.now()
    meta: Dict[str, Any] = {
        "name": name,
        "title": title or name,
        "description": description,
        "command_line": command_line,
        "dataset": {**dataset.summary(), "shape": [sum(dataset.sizes.values()), dataset.data_dim]},
        "grid": provenance.grid_summary(configs),
        "seeds": sorted({c.seed for c in configs}),
        "num_runs": len(configs),
        "config_columns": list(configs[0].to_record()),
        "metric_columns": list(METRIC_COLUMNS),
        "status_columns": list(STATUS_COLUMNS),
        "artifacts": ARTIFACTS,
        "versions": provenance.versions(),
        "git_commit": provenance.git_commit(),
        "device": provenance.device_info(configs),
        "started": (previous[0].get("started") if previous else None) or started,
        "finished": None,
        "status": "running",
        "invocations": previous + [{"command_line": command_line, "started": started,
                                    "finished": None, "status": "running", "computed": []}],
    }
    meta.update(dict(metadata or {}))
    return meta


def _finish_meta(meta: Dict[str, Any], status: str, executed: List[str], skipped: List[str],
                 frame: pd.DataFrame) -> None:
    finished = provenance.now()
    meta.update(finished=finished, status=status, num_executed=len(executed),
                num_skipped=len(skipped),
                compute_time_s=float(pd.to_numeric(frame["wall_time_s"], errors="coerce").sum()))
    meta["invocations"][-1].update(finished=finished, status=status, computed=list(executed))


# ---------------------------------------------------------------------------- the study
def run_study(
    name: str,
    dataset: Union[Dataset, Any],
    configs: Sequence[RunConfig],
    *,
    out_dir: Union[str, os.PathLike] = DEFAULT_OUT_DIR,
    fresh: bool = False,
    progress: bool = True,
    render: bool = True,
    command_line: Optional[str] = None,
    title: Optional[str] = None,
    description: Optional[str] = None,
    retry_failed: bool = False,
    on_run_end: Optional[Callable[[RunConfig, Dict[str, Any]], None]] = None,
    metadata: Optional[Mapping[str, Any]] = None,
    num_threads: Optional[int] = None,
    findings: Optional[Callable[[pd.DataFrame], List[str]]] = None,
    wait: bool = False,
    executor=None,
    models: Optional[Mapping[str, Callable[..., Any]]] = None,
) -> StudyResult:
    """Run (or resume) a study and render its report.

    Parameters
    ----------
    name : str
        Study name; the study lives in ``<out_dir>/<name>``.
    dataset : Dataset or anything :func:`studies.datasets.load_dataset` accepts
    configs : sequence of RunConfig
        The grid (see :func:`expand_grid`); ``study`` and ``dataset`` fields are filled in.
    out_dir : path
    fresh : bool
        Delete earlier runs of this study first (after the data passed validation).
    progress : bool
        A progress bar over the runs.
    render : bool
        Render ``index.html`` with :func:`reports.render_report` at the end.
    command_line, title, description : str, optional
        Recorded in ``study.json`` for the report.
    retry_failed : bool
        Re-run runs recorded as failed (by default they are kept, like finished ones).
    on_run_end : callable, optional
        ``on_run_end(config, result)`` after each executed run (after it is saved).
    metadata : mapping, optional
        More entries for ``study.json`` (e.g. the primary factor of the comparison).
    findings : callable, optional
        ``findings(results) -> list of str``: study-specific conclusions computed from the
        results table after the runs, stored in ``study.json`` (``"findings"``) for the
        report and printed by the scripts.
    models : mapping, optional
        Your own pairs: ``{"name": factory}``, each factory called with ``data_dim`` and the
        run's ``latent_dim``, ``hidden``, ``likelihood`` as keyword arguments it may ignore,
        returning a model/guide pair; put ``model="name"`` in configurations of the grid
        (:func:`pyro_lvm.studies.runner.user_models.user_configs` makes one per seed).
    num_threads : int, optional
        CPU threads for torch during the study (restored afterwards). Small models train
        fastest on one thread, and one thread per process avoids the oversubscription that
        slows a shared machine down many times over; None leaves torch's setting alone.
    wait : bool
        When another invocation holds the study's lock (:mod:`.lock`), wait for it instead
        of raising :class:`~pyro_lvm.studies.runner.lock.StudyLocked`.
    executor : LocalExecutor or RayExecutor, optional
        Who runs the runs (:mod:`.executors`): by default one after another in this process;
        ``RayExecutor(address=...)`` runs each as a Ray task calling the same run function
        (the same results), on a private local Ray or an existing cluster. The lock, the
        results table and the report stay with this process.

    A study directory that cannot be written and has nothing left to compute is only read
    (the results are returned; nothing is written).

    Returns
    -------
    StudyResult

    Raises
    ------
    StudyDataError
        The data cannot be used (before anything is run or written).
    ValueError
        Duplicate runs in the grid, an invalid name, or a study directory holding runs on
        different data (pass ``fresh=True`` or another ``out_dir``).
    StudyLocked
        Another invocation is writing the study (and ``wait`` is False).
    StudyIOError
        The disk is full, read-only or not writable (one line naming the path and what to
        free or change); the run in progress is redone by the next invocation.
    """
    user_models.register_models(models or {})
    dataset, configs = _prepare(name, dataset, configs)
    study_dir = pathlib.Path(out_dir) / name
    if command_line is None:
        command_line = " ".join(shlex.quote(a) for a in
                                [os.path.basename(sys.executable)] + sys.argv)
    options = dict(fresh=fresh, progress=progress, render=render, command_line=command_line,
                   title=title, description=description, retry_failed=retry_failed,
                   on_run_end=on_run_end, metadata=metadata, num_threads=num_threads,
                   findings=findings, executor=executor)
    if not fresh and _read_only(study_dir):
        done = _results_on_disk(study_dir, configs, retry_failed)
        if done is not None:  # nothing to compute and nothing may be written: just read
            frame = results_frame(configs, done)
            report = study_dir / "index.html"
            meta = storage.read_json(study_dir / "study.json") or {}
            return StudyResult(study_dir, frame, report if report.exists() else None, [],
                               list(done), [r for r, v in done.items() if v.get("status") == "failed"],
                               list(meta.get("findings") or []))
    try:
        with StudyLock(study_dir, wait=wait, command_line=command_line):
            return _run_locked(name, study_dir, dataset, configs, **options)
    except OSError as exc:
        if execution.is_io_failure(exc):
            raise StudyIOError.from_os_error(exc) from None
        raise


def _read_only(study_dir: pathlib.Path) -> bool:
    """Whether the study directory (or the nearest existing parent) cannot be written."""
    path = study_dir
    while not path.exists() and path != path.parent:
        path = path.parent
    return not os.access(path, os.W_OK)


def _results_on_disk(study_dir: pathlib.Path, configs, retry_failed: bool):
    """The verified results of every run, or None when some run would be computed."""
    done = {}
    for c in configs:
        r, _ = read_result(c, study_dir / "runs" / c.run_id)
        if r is None or (retry_failed and r.get("status") == "failed"):
            return None
        done[c.run_id] = r
    return done


def _run_locked(name, study_dir, dataset, configs, *, fresh, progress, render, command_line,
                title, description, retry_failed, on_run_end, metadata, num_threads,
                findings, executor) -> StudyResult:
    """:func:`run_study` once the study's lock is held."""
    meta_path, runs_dir = study_dir / "study.json", study_dir / "runs"
    old_meta = None if fresh else storage.read_json(meta_path)
    if not fresh:
        _check_same_data(study_dir, dataset, old_meta)
    if fresh and study_dir.exists():
        shutil.rmtree(runs_dir, ignore_errors=True)
        for f in ("results.csv", "study.json"):
            (study_dir / f).unlink(missing_ok=True)
    runs_dir.mkdir(parents=True, exist_ok=True)
    meta = _study_meta(name, dataset, configs, title=title, description=description,
                       command_line=command_line, metadata=metadata, old_meta=old_meta)
    storage.write_text(meta_path, storage.dump_json(meta))

    results: Dict[str, Dict[str, Any]] = {}
    notes: Dict[str, str] = {}
    skipped, todo = [], []
    for c in configs:
        r, why = read_result(c, runs_dir / c.run_id)
        if r is not None and not (retry_failed and r.get("status") == "failed"):
            results[c.run_id] = r
            skipped.append(c.run_id)
        else:
            todo.append(c)
            if why:
                notes[c.run_id] = why
    executed: List[str] = []
    frame = _run_all(name, study_dir, dataset, configs, todo, results, executed, notes, meta,
                     skipped=skipped, progress=progress, num_threads=num_threads,
                     on_run_end=on_run_end, executor=executor)
    if findings is not None:
        try:
            meta["findings"] = [str(line) for line in findings(frame)]
        except Exception as exc:  # a summary must not cost the runs
            meta["findings"] = [f"(the study's summary could not be computed: "
                                f"{type(exc).__name__}: {exc})"]
        storage.write_text(meta_path, storage.dump_json(meta))
    report = render_study(study_dir) if render else None
    failed = [c.run_id for c in configs if results.get(c.run_id, {}).get("status") == "failed"]
    return StudyResult(study_dir=study_dir, results=frame, report=report, executed=executed,
                       skipped=skipped, failed=failed, findings=list(meta.get("findings") or []))


def _run_all(name, study_dir, dataset, configs, todo, results, executed, notes, meta, *,
             skipped, progress, num_threads, on_run_end, executor=None) -> pd.DataFrame:
    """Execute the runs of ``todo`` with ``executor`` (default: one after another in this
    process), saving the table after each finished run."""
    def save_table():
        frame = results_frame(configs, results)
        storage.write_text(study_dir / "results.csv", frame.to_csv(index=False))
        return frame

    save_table()
    status = "interrupted"
    executor = executor if executor is not None else LocalExecutor()
    tasks = [RunTask(c, study_dir / "runs" / c.run_id,
                     [notes[c.run_id]] if c.run_id in notes else None) for c in todo]
    display = StudyProgress(name, len(todo), enabled=progress)
    runs = display.runs(executor.run(tasks, dataset, start_progress=display.start_run,
                                     num_threads=num_threads))
    threads_before = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(int(num_threads))
    meta["num_threads"] = torch.get_num_threads()
    meta["executor"] = executor.name
    try:
        for index, (task, result) in enumerate(runs):  # in the order runs finish
            c = task.config
            results[c.run_id] = result
            executed.append(c.run_id)
            save_table()
            display.end_run(index, c.run_id, result)
            if on_run_end is not None:
                on_run_end(c, result)
        status = "finished"
    except OSError as exc:
        if execution.is_io_failure(exc):
            status = "failed (I/O error)"
            for task in tasks:  # unfinished: redone next time; their files free some space
                if task.config.run_id not in results and not (task.run_dir / "result.json").exists():
                    shutil.rmtree(task.run_dir, ignore_errors=True)
        raise
    finally:
        runs.close()  # the run bar
        torch.set_num_threads(threads_before)
        frame = results_frame(configs, results)
        _finish_meta(meta, status, executed, skipped, frame)
        _close_study(study_dir, frame, meta, strict=status == "finished")
        if status == "interrupted":
            print(f"study {name} interrupted after {len(executed)} new run(s); re-run the same "
                  f"command to resume ({study_dir})", file=sys.stderr)
    return frame


def _close_study(study_dir: pathlib.Path, frame: pd.DataFrame, meta: Dict[str, Any], *,
                 strict: bool) -> None:
    """Write results.csv and study.json at the end of an invocation. After a failure
    (``strict=False``) study.json must still leave the "running" state: when the atomic
    write fails (a full disk) it is overwritten in place, which needs no new blocks."""
    try:
        storage.write_text(study_dir / "results.csv", frame.to_csv(index=False))
    except OSError:
        if strict:
            raise
    text = storage.dump_json(meta)
    try:
        storage.write_text(study_dir / "study.json", text)
    except OSError:
        if strict:
            raise
        try:
            with open(study_dir / "study.json", "r+b") as handle:
                handle.truncate(0)
                handle.write(text.encode("utf-8"))
        except OSError:
            pass


def render_study(study_dir: Union[str, os.PathLike]) -> pathlib.Path:
    """Render the HTML report of a study directory and return its path."""
    from pyro_lvm.reports import render_report
    return pathlib.Path(render_report(study_dir))
