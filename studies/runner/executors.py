"""Executors: who runs the runs of a study.

Runs are independent: each one is :func:`~pyro_lvm.studies.runner.execution.execute_run`
on one configuration, writing its files (``result.json`` last, atomically) into its own
folder of the study directory. An executor takes the runs still to do and yields
``(config, result)`` as runs finish; the study (:mod:`.study`) saves the results table
after each, under the study's lock, exactly as with local execution.

- :class:`LocalExecutor` runs them one after another in this process (progress inside each
  run: training steps and evaluation chunks).
- :class:`RayExecutor` submits each run as a Ray task calling the same function (so results
  are those of the local executor: every run seeds itself from its configuration and runs
  on ``num_threads`` threads), on a local Ray started for the study or on an existing
  cluster (``address``). The output directory must be reachable at the same path from
  every node (a shared file system); runs finished by a task are on disk even when the
  driver stops before collecting them, and the next invocation verifies and keeps them.
  Ctrl-C cancels the outstanding tasks and keeps the finished ones.

Ray is an optional extra: ``pip install -e ".[ray]"``.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import sys
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from pyro_lvm.studies.runner.schema import RunConfig

__all__ = ["EXECUTORS", "RunTask", "LocalExecutor", "RayExecutor", "make_executor",
           "ray_missing_message"]

EXECUTORS = ("local", "ray")


@dataclasses.dataclass
class RunTask:
    """One run to execute: its configuration, folder and the notes it starts with."""

    config: RunConfig
    run_dir: pathlib.Path
    notes: Optional[List[str]] = None


class LocalExecutor:
    """Run the tasks one after another in this process.

    ``start_progress(index, run_id)`` (optional) returns the progress display of one run.
    """

    name = "local"

    def run(self, tasks: Sequence[RunTask], dataset, *,
            start_progress: Optional[Callable[[int, str], Any]] = None,
            num_threads: Optional[int] = None) -> Iterator[Tuple[RunTask, Dict[str, Any]]]:
        from pyro_lvm.studies.runner import execution
        for index, task in enumerate(tasks):
            progress = start_progress(index, task.config.run_id) if start_progress else None
            yield task, execution.execute_run(task.config, dataset, task.run_dir,
                                              progress=progress, notes=task.notes)


def ray_missing_message() -> str:
    return ("--executor ray needs Ray, an optional extra: pip install -e \".[ray]\" "
            "(or pip install 'ray>=2.9')")


def _import_ray():
    try:
        import ray
    except ImportError:
        raise RuntimeError(ray_missing_message()) from None
    return ray


def _execute_in_worker(config: RunConfig, dataset, run_dir: str, notes, family_snapshot,
                       num_threads: Optional[int]) -> Dict[str, Any]:
    """The Ray task: the same run function as the local executor, in a worker process."""
    import torch

    from pyro_lvm.studies.runner import execution, families
    for family in family_snapshot:  # a user's families exist in the driver's registry only
        families.register_family(family, replace=True)
    if num_threads:
        torch.set_num_threads(int(num_threads))
    return execution.execute_run(config, dataset, pathlib.Path(run_dir), notes=notes)


class RayExecutor:
    """Run every task as a Ray task.

    Parameters
    ----------
    address : str, optional
        An existing cluster (``ray start --head`` prints it; ``"auto"`` finds a local one).
        None starts a private local Ray for the study and shuts it down afterwards.
    num_cpus : int, optional
        CPUs of a private local Ray (default: all of this machine's).
    """

    name = "ray"

    def __init__(self, address: Optional[str] = None, num_cpus: Optional[int] = None):
        self.address = address
        self.num_cpus = num_cpus
        _import_ray()  # fail before any work when Ray is missing

    def _init(self, ray) -> bool:
        """Start or join Ray; True when this executor started it (and must stop it)."""
        if ray.is_initialized():
            return False
        kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        if self.address:
            ray.init(address=self.address, **kwargs)
        else:
            # workers import a user's --model modules from the driver's current directory
            path = [os.getcwd()] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
            ray.init(num_cpus=self.num_cpus,
                     runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(path)}}, **kwargs)
        return True

    def run(self, tasks: Sequence[RunTask], dataset, *,
            start_progress: Optional[Callable[[int, str], Any]] = None,
            num_threads: Optional[int] = None) -> Iterator[Tuple[RunTask, Dict[str, Any]]]:
        if not tasks:
            return
        ray = _import_ray()
        from pyro_lvm.studies.runner import families
        started = self._init(ray)
        pending: Dict[Any, RunTask] = {}
        try:
            snapshot = [families.get_family(name) for name in sorted({t.config.model for t in tasks})]
            remote = ray.remote(num_cpus=1, max_retries=0)(_execute_in_worker)
            dataset_ref = ray.put(dataset)
            for task in tasks:
                ref = remote.remote(task.config, dataset_ref, str(task.run_dir), task.notes,
                                    snapshot, num_threads)
                pending[ref] = task
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    task = pending.pop(ref)
                    yield task, ray.get(ref)
        finally:
            for ref in pending:  # Ctrl-C, an error, or the caller stopped: cancel the rest
                ray.cancel(ref, force=True)
            if pending:
                print(f"cancelled {len(pending)} outstanding Ray task(s); finished runs are kept",
                      file=sys.stderr)
            if started:
                ray.shutdown()


def make_executor(name: str = "local", *, address: Optional[str] = None,
                  num_cpus: Optional[int] = None):
    """The executor called ``name`` (``"local"`` or ``"ray"``)."""
    if name == "local":
        if address:
            raise ValueError("--ray-address needs --executor ray")
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(address=address, num_cpus=num_cpus)
    raise ValueError(f"unknown executor {name!r}; use one of {EXECUTORS}")
