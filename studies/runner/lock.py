"""One writer per study: a lock file in the study directory.

``<study>/.lock`` is held with an operating-system file lock (:mod:`filelock`), which the
system releases when the holding process ends, however it ends (a SIGKILL included): a
lock is stale exactly when its process is gone, and a stale lock is simply taken over.
``<study>/.lock.json`` says who holds it (pid, host, start time, command line) so that a
second invocation can name the holder when it refuses, or wait for it (``wait=True``,
``--wait``).
"""
from __future__ import annotations

import json
import os
import pathlib
import socket
import sys
import time
from typing import Any, Dict, Optional

import filelock

from pyro_lvm.studies.runner import provenance, storage

__all__ = ["StudyLocked", "StudyLock"]

LOCK_NAME, INFO_NAME = ".lock", ".lock.json"


class StudyLocked(RuntimeError):
    """Another invocation is writing this study."""


def _describe(info: Optional[Dict[str, Any]]) -> str:
    if not isinstance(info, dict):
        return "another process (no holder information)"
    return (f"process {info.get('pid')} on {info.get('host')} since {info.get('started')} "
            f"({info.get('command_line')})")


class StudyLock:
    """Context manager holding the lock of ``study_dir`` (created if missing).

    Parameters
    ----------
    study_dir : path
    wait : bool
        Wait for the holder to finish instead of raising :class:`StudyLocked`.
    command_line : str, optional
        Recorded in the holder information.
    """

    def __init__(self, study_dir, *, wait: bool = False, command_line: Optional[str] = None):
        self.study_dir = pathlib.Path(study_dir)
        self.wait = wait
        self.command_line = command_line
        self._lock: Optional[filelock.BaseFileLock] = None

    @property
    def info_path(self) -> pathlib.Path:
        return self.study_dir / INFO_NAME

    def holder(self, patience_s: float = 2.0) -> Optional[Dict[str, Any]]:
        """The holder's information; the holder writes it just after taking the lock, so a
        contender that lost the race waits up to ``patience_s`` for it to appear."""
        deadline = time.monotonic() + patience_s
        while True:
            info = storage.read_json(self.info_path)
            if isinstance(info, dict) or time.monotonic() >= deadline:
                return info if isinstance(info, dict) else None
            time.sleep(0.05)

    def acquire(self) -> "StudyLock":
        self.study_dir.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(self.study_dir / LOCK_NAME), timeout=0)
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            if not self.wait:
                raise StudyLocked(
                    f"{self.study_dir} is being written by {_describe(self.holder())}; wait for it "
                    f"to finish (--wait) or use another --out-dir") from None
            print(f"waiting for {_describe(self.holder())} to finish {self.study_dir} ...",
                  file=sys.stderr)
            lock.acquire(timeout=-1)
        self._lock = lock
        try:
            storage.write_text(self.info_path, json.dumps({
                "pid": os.getpid(), "host": socket.gethostname(), "started": provenance.now(),
                "command_line": self.command_line}, indent=2))
        except BaseException:
            self.release()
            raise
        return self

    def release(self) -> None:
        if self._lock is None:
            return
        try:
            self.info_path.unlink(missing_ok=True)
        except OSError:
            pass  # a read-only or full disk: the info is stale once the lock is free
        self._lock.release()
        self._lock = None

    def __enter__(self) -> "StudyLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
