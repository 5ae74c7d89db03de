"""What a study keeps on disk: atomic writes, JSON without NaN, and reading a run's result."""
from __future__ import annotations

import json
import math
import pathlib
from typing import Any, Dict, Optional

import numpy as np
import torch

from pyro_lvm._io import write_atomically

__all__ = ["write_text", "write_bytes", "dump_json", "read_json"]


def write_bytes(path: pathlib.Path, data: bytes) -> None:
    write_atomically(path, data)


def write_text(path: pathlib.Path, text: str) -> None:
    write_atomically(path, text.encode("utf-8"))


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (pathlib.Path, torch.device, torch.dtype)):
        return str(o)
    return repr(o)


def _clean_number(v):
    """JSON has no NaN/inf: NaN is stored as null, +-inf as the strings "inf" / "-inf"
    (``float()`` and ``pandas.to_numeric`` read them back)."""
    if isinstance(v, (float, np.floating)) and not math.isfinite(float(v)):
        return None if math.isnan(float(v)) else ("inf" if v > 0 else "-inf")
    if isinstance(v, np.generic):
        return v.item()
    return v


def dump_json(obj) -> str:
    def clean(o):
        if isinstance(o, dict):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return _clean_number(o)

    return json.dumps(clean(obj), indent=2, sort_keys=False, default=_json_default, allow_nan=False)




def read_json(path: pathlib.Path) -> Optional[Any]:
    """The JSON content of ``path``; None when it is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None
