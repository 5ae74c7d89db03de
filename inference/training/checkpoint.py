"""Checkpoints of :func:`pyro_lvm.inference.fit`: everything an interrupted fit needs to go on
exactly where it stopped (module ``state_dict``, extra ``pyro.param`` values, optimizer state,
history, random states, callbacks), written atomically after every epoch.

If the file exists when ``fit`` starts, the fit resumes from it; on CPU the result is
bit-for-bit that of an uninterrupted run (every step, the first after a resume included, takes
the same path with the same random state). A resume with another ``lr``, ``optimizer``,
objective, ``batch_size``, ``seed`` or data is refused, naming both values. After Ctrl-C the last
completed epoch is on disk; the checkpoint of a fit that stopped early (``StopFit``,
``EarlyStopping``) or has all its epochs returns at once.

A checkpoint holds only tensors, numbers, strings, lists, tuples and dicts, and is read with
``torch.load(weights_only=True)``: loading a file never runs code from it (a crafted file is
refused with a message naming it). Parameter constraints are not stored: they come from the
pair's own code, which creates its parameters again before the saved values are copied in.
"""
from __future__ import annotations

import io
import math
import pathlib
import pickle
import random
from typing import Any, Dict, List

import numpy as np
import torch

from pyro_lvm._io import write_atomically

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "CONFIG_KEYS", "check_path", "fingerprint",
           "rng_state", "torch_rng_state", "set_rng_state", "set_torch_rng_state", "to_plain",
           "save_checkpoint", "load_checkpoint"]

CHECKPOINT_FORMAT = "pyro-lvm-fit-checkpoint"
#: 2: loadable with ``weights_only=True`` (no pickled objects, no parameter constraints).
CHECKPOINT_VERSION = 2
#: Settings a resumed fit must share with the fit that wrote the checkpoint.
CONFIG_KEYS = ("num_data", "data_dim", "batch_size", "objective_name", "lr", "optimizer", "seed",
               "data_fingerprint", "has_module")


def check_path(checkpoint) -> pathlib.Path:
    """``checkpoint`` as a path to a file (existing or not), refusing a directory up front."""
    path = pathlib.Path(checkpoint)
    if path.is_dir():
        raise ValueError(f"checkpoint={str(checkpoint)!r} is a directory; give the path of a file "
                         f"to save the fit to, e.g. {str(path / 'fit.pt')!r}")
    return path


def fingerprint(x: torch.Tensor) -> List[float]:
    """Shape and sum of the training data (on the CPU, so the same on every device)."""
    return [float(x.shape[0]), float(x.shape[1]), float(x.detach().cpu().double().sum())]


# -- random states, as tensors and numbers --------------------------------------------------
def rng_state(device: torch.device) -> dict:
    """torch (and CUDA), NumPy and Python random states, in a ``weights_only``-loadable form."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
             "python": {"version": int(version), "internal": list(internal),
                        "gauss_next": gauss_next}}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["internal"]),
                     python_state["gauss_next"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def torch_rng_state(device: torch.device) -> dict:
    """The random state Pyro's samplers draw from (torch only: cheap enough for every step)."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_torch_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# -- writing and reading ----------------------------------------------------------------------
def to_plain(value: Any, where: str = "checkpoint") -> Any:
    """``value`` with NumPy scalars and arrays turned into Python numbers and tensors, and
    tensors detached onto the CPU; anything that ``torch.load(weights_only=True)`` would refuse
    raises a TypeError naming where it was found (e.g. a callback's ``state_dict``)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device,
                                           torch.Size)):
        return value
    if isinstance(value, dict):
        return {key: to_plain(item, f"{where}[{key!r}]") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        plain = [to_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
        return plain if isinstance(value, list) else tuple(plain)
    raise TypeError(f"cannot save {where}: a {type(value).__name__} is not a tensor, number, "
                    f"string, list or dict (checkpoints must load with "
                    f"torch.load(weights_only=True))")


def save_checkpoint(path: pathlib.Path, payload: dict) -> None:
    """Write atomically: a crash or Ctrl-C mid-write leaves the previous checkpoint intact."""
    buffer = io.BytesIO()
    torch.save(to_plain(payload), buffer)
    write_atomically(path, buffer.getvalue())


def load_checkpoint(path: pathlib.Path, config: Dict[str, Any]) -> dict:
    """Read a checkpoint without running code from it, and check that it was written by a fit
    with the same ``config`` (the :data:`CONFIG_KEYS`)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"checkpoint {str(path)!r} was refused: it holds objects other than tensors, "
            f"numbers, strings, lists and dicts, and loading it could run code "
            f"(torch.load(weights_only=True) said: {str(exc).splitlines()[0]}). pyro-lvm never "
            f"writes such a file; delete it if you did not make it, or pick another path"
        ) from None
    except Exception as exc:
        raise ValueError(f"checkpoint {str(path)!r} exists but could not be read "
                         f"({type(exc).__name__}: {exc}); delete it to start afresh") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{str(path)!r} is not a pyro-lvm fit checkpoint")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint {str(path)!r} has format version {payload.get('version')!r}; "
                         f"this pyro-lvm reads version {CHECKPOINT_VERSION}. Delete it to start "
                         f"afresh")
    saved = payload["config"]
    for key in CONFIG_KEYS:
        if not _same(saved.get(key), config[key]):
            raise ValueError(
                f"checkpoint {str(path)!r} was written by a different fit ({key}: "
                f"{saved.get(key)!r} there, {config[key]!r} now); resuming it would mix two "
                f"fits. Use the same settings and data, or delete the file / pick another path")
    return payload


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b
