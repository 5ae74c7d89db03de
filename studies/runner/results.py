"""The results of a study: one row per run (``results.csv``), and the runs found on disk."""
from __future__ import annotations

import hashlib
import os
import pathlib
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import pandas as pd

from pyro_lvm.studies.runner import storage
from pyro_lvm.studies.runner.schema import METRIC_COLUMNS, RESULT_SCHEMA_VERSION, RunConfig

__all__ = ["results_frame", "load_results", "read_result"]


def _result_row(config: RunConfig, result: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    row: Dict[str, Any] = {"run_id": config.run_id}
    row.update(config.to_record())
    metrics = (result or {}).get("metrics") or {}
    row["status"] = (result or {}).get("status", "pending")
    row["error"] = (result or {}).get("error")
    row["device"] = (result or {}).get("device", config.device)
    row["notes"] = "; ".join((result or {}).get("notes") or []) or None
    for m in METRIC_COLUMNS:
        row[m] = metrics.get(m)
    for m, value in metrics.items():  # a family's own metrics (families.Family.evaluate)
        row.setdefault(m, value)
    return row


def results_frame(configs: Sequence[RunConfig], results: Mapping[str, Mapping]) -> pd.DataFrame:
    rows = [_result_row(c, results.get(c.run_id)) for c in configs]
    frame = pd.DataFrame(rows)
    for m in METRIC_COLUMNS:
        frame[m] = pd.to_numeric(frame[m], errors="coerce").astype("float64")
    return frame


def load_results(study_dir: Union[str, os.PathLike]) -> pd.DataFrame:
    """Read ``results.csv`` of a study directory."""
    path = pathlib.Path(study_dir) / "results.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; run the study first")
    return pd.read_csv(path)


def read_result(config: RunConfig, run_dir: pathlib.Path) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """The verified ``result.json`` of ``config``'s run directory, or ``(None, why)``.

    Trust but verify: a result is used only when it is a JSON object of a known schema
    version whose run id and configuration hash are this run's, whose status is "ok" or
    "failed", whose metrics are there (a finite or infinite number for the test
    log-likelihood of an "ok" run) and whose ``model.pt`` has the SHA-256 recorded in it.
    ``why`` is None for a run never started (no result.json) and otherwise says what
    failed, so that the recomputed run can note it.
    """
    path = run_dir / "result.json"
    if not path.exists():
        return None, None
    result = storage.read_json(path)
    problem = _result_problem(config, run_dir, result)
    if problem is not None:
        return None, f"{path.name} was not used ({problem}): recomputed"
    return result, None


def _result_problem(config: RunConfig, run_dir: pathlib.Path, result) -> Optional[str]:
    if not isinstance(result, dict):
        return "not a readable JSON object"
    if result.get("schema") != RESULT_SCHEMA_VERSION:
        return f"schema {result.get('schema')!r}, expected {RESULT_SCHEMA_VERSION}"
    if result.get("run_id") != config.run_id:
        return f"it belongs to run {str(result.get('run_id'))[:80]!r}"
    if result.get("config_hash") != config.config_hash:
        return "its configuration hash differs from this run's"
    status, metrics = result.get("status"), result.get("metrics")
    if status not in ("ok", "failed"):
        return f"status {str(status)[:40]!r}"
    if not isinstance(metrics, dict):
        return "no metrics"
    if status == "ok":
        value = metrics.get("test_log_likelihood")
        try:
            float(value)
        except (TypeError, ValueError):
            return "no test log-likelihood"
        if not isinstance(result.get("notes"), list):
            return "no notes list"
    digest = result.get("model_sha256")
    if digest is not None:
        try:
            actual = hashlib.sha256((run_dir / "model.pt").read_bytes()).hexdigest()
        except OSError:
            return "model.pt is missing"
        if actual != digest:
            return "model.pt does not match the hash recorded in result.json"
    elif status == "ok" and (run_dir / "model.pt").exists():
        return "a model.pt without a recorded hash"
    return None
