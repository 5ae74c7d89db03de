"""Progress of a study: the run bar and, below it, the current run's training steps and
evaluation, with rates and an ETA.

On a terminal (stderr is a TTY) these are tqdm bars: the run bar, a bar over the current
run's training steps, and the importance-sampling bar of the log-likelihood estimate
(:func:`pyro_lvm.inference.evaluate.log_likelihood` with ``progress=True``). Otherwise (a
log file, a batch job) one line every :data:`LOG_INTERVAL_S` seconds says where the study
is: the run, the training step with steps per second and the ETA, or the evaluation step
and how long it has taken. ``progress=False`` (``--no-progress``) silences both.
"""
from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import Iterable, Iterator, Optional

__all__ = ["StudyProgress", "RunProgress", "LOG_INTERVAL_S"]

#: Seconds between two progress lines when stderr is not a terminal.
LOG_INTERVAL_S = 5.0


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, s = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {s:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class StudyProgress:
    """Progress display of one study invocation over ``total`` runs."""

    def __init__(self, name: str, total: int, *, enabled: bool = True, stream=None):
        self.name = name
        self.total = total
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.terminal = bool(enabled and callable(isatty) and isatty())
        self._bar = None

    def runs(self, todo: Iterable) -> Iterator:
        """Iterate over ``todo`` (the runs as they finish), showing the run bar."""
        from tqdm.auto import tqdm

        if self.terminal:
            self._bar = tqdm(todo, desc=self.name, unit="run", file=self.stream, leave=True,
                             position=0, total=self.total)
            try:
                yield from self._bar
            finally:
                self._bar.close()
            return
        yield from todo

    def start_run(self, index: int, run_id: str) -> Optional["RunProgress"]:
        """The progress of run ``index`` (0-based) of this invocation; None when disabled."""
        if not self.enabled:
            return None
        if self._bar is not None:
            self._bar.set_postfix_str(run_id, refresh=True)
        label = f"{self.name}: run {index + 1}/{self.total} {run_id}"
        if not self.terminal:
            self.log(f"{label}: started")
        return RunProgress(self, label)

    def end_run(self, index: int, run_id: str, result) -> None:
        """A line per finished run when stderr is not a terminal; failures always."""
        if not self.enabled:
            return
        status = result.get("status")
        if status != "ok":
            self.log(f"run {run_id} failed: {result.get('error')}")
        elif not self.terminal:
            seconds = (result.get("metrics") or {}).get("wall_time_s") or 0.0
            self.log(f"{self.name}: run {index + 1}/{self.total} {run_id}: ok in "
                     f"{_duration(float(seconds))}")

    def log(self, line: str) -> None:
        if self.terminal:
            from tqdm.auto import tqdm
            tqdm.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)


class _FitProgress:
    """A fit callback (see :mod:`pyro_lvm.inference.training.callbacks`) showing the steps."""

    def __init__(self, run: "RunProgress"):
        self.run = run
        self.bar = None
        self.total = 0
        self.started = self.last_line = 0.0

    def on_fit_start(self, state) -> None:
        self.total = int(state.num_epochs) * int(state.steps_per_epoch)
        self.started = self.last_line = time.monotonic()
        if self.run.study.terminal:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=self.total, desc="  training", unit="step", leave=False,
                            file=self.run.study.stream, position=1)

    def on_step_end(self, state) -> None:
        if self.bar is not None:
            self.bar.update(1)
            return
        now = time.monotonic()
        if now - self.last_line < LOG_INTERVAL_S:
            return
        self.last_line = now
        done = int(state.global_step) + 1
        rate = done / max(now - self.started, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        self.run.study.log(f"{self.run.label}: training step {done}/{self.total} (epoch "
                           f"{int(state.epoch) + 1}/{int(state.num_epochs)}, {rate:.1f} steps/s, "
                           f"ETA {_duration(eta)})")

    def on_fit_end(self, state) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class RunProgress:
    """The progress of one run: a fit callback for its training, phases for its evaluation."""

    def __init__(self, study: StudyProgress, label: str):
        self.study = study
        self.label = label

    def fit_callback(self) -> _FitProgress:
        return _FitProgress(self)

    @property
    def bars(self) -> bool:
        """Whether evaluation functions should show their own tqdm bars (on a terminal)."""
        return self.study.terminal

    @contextlib.contextmanager
    def phase(self, what: str):
        """Evaluation step ``what``: on a terminal its own bar shows the chunks (yields None);
        otherwise yields a ``progress(done, total)`` callback for the evaluation function and
        logs a line when the step starts, then at most every LOG_INTERVAL_S seconds the draws
        done with their rate and ETA (or the time so far, before the first chunk ends)."""
        if self.study.terminal:
            yield None
            return
        self.study.log(f"{self.label}: evaluating {what}")
        tracker = _ChunkTracker(self, what)
        stop = threading.Event()

        def heartbeat():
            while not stop.wait(max(LOG_INTERVAL_S, 0.05)):
                tracker.log_if_due()

        thread = threading.Thread(target=heartbeat, daemon=True)
        thread.start()
        try:
            yield tracker
        finally:
            stop.set()
            thread.join()


class _ChunkTracker:
    """``progress(done, total)`` for an evaluation off a terminal: a log line at most every
    LOG_INTERVAL_S seconds with the draws done, their rate and the ETA."""

    def __init__(self, run: RunProgress, what: str):
        self.run, self.what = run, what
        self.started = self.last_line = time.monotonic()
        self.done, self.total = 0, None
        self._lock = threading.Lock()

    def __call__(self, done: int, total: int) -> None:
        self.done, self.total = int(done), int(total)
        self.log_if_due()

    def log_if_due(self) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self.last_line < LOG_INTERVAL_S:
                return
            self.last_line = now
            elapsed = now - self.started
            if not self.total:
                text = f"{_duration(elapsed)} so far"
            else:
                rate = self.done / elapsed if elapsed > 0 else float("inf")
                eta = (self.total - self.done) / rate if rate > 0 else float("nan")
                text = (f"{self.done:,}/{self.total:,} draws ({100 * self.done / self.total:.0f}%), "
                        f"{rate:,.0f} draws/s, ETA {_duration(eta) if eta == eta else '?'}")
        self.run.study.log(f"{self.run.label}: evaluating {self.what}: {text}")
