"""Provenance of a study: library versions, the git commit, the device, the grid, the time."""
from __future__ import annotations

import datetime as _dt
import json
import platform
import subprocess
from typing import Any, Dict, List, Optional, Sequence

import torch

from pyro_lvm.inference.engine import resolve_device
from pyro_lvm.paths import git_checkout_root
from pyro_lvm.studies.runner.schema import RunConfig

__all__ = ["now", "versions", "git_commit", "device_info", "grid_summary"]


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def versions() -> Dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("pyro-lvm", "torch", "pyro-ppl", "numpy", "scipy", "pandas", "scikit-learn",
                 "arviz", "matplotlib", "seaborn", "jinja2"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    out["platform"] = platform.platform()
    return out


def git_commit() -> Optional[str]:
    """The commit of the checkout this code runs from; None for an installed copy."""
    root = git_checkout_root()
    if root is None:
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def device_info(configs: Sequence[RunConfig]) -> str:
    requested = sorted({c.device for c in configs}) or ["auto"]
    parts = []
    for r in requested:
        try:
            d = resolve_device(r)
        except ValueError as exc:
            parts.append(f"{r}: unavailable ({exc})")
            continue
        desc = str(d)
        if d.type == "cuda":
            desc += f" ({torch.cuda.get_device_name(d)})"
        else:
            desc += f" ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        parts.append(desc if r == str(d) else f"{r} -> {desc}")
    return "; ".join(parts)


def grid_summary(configs: Sequence[RunConfig]) -> Dict[str, List[Any]]:
    """Values of every config column that varies over the grid (plus seeds)."""
    records = [c.to_record() for c in configs]
    keys = list(dict.fromkeys(k for r in records for k in r))
    grid = {}
    for k in keys:
        if k in ("study", "dataset"):
            continue
        values = list(dict.fromkeys(json.dumps(r.get(k), default=str) for r in records))
        if len(values) > 1 or k in ("seed", "num_eval_samples"):
            grid[k] = [json.loads(v) for v in values]
    return grid


