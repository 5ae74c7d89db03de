"""Checkpoints of :func:`pyro_lvm.inference.fit`: everything an interrupted fit needs to go on
exactly where it stopped (parameters, optimizer, history, random states, callbacks)."""
from __future__ import annotations

import contextlib
import os
import pathlib
import random
from typing import List

import numpy as np
import torch

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "fingerprint", "rng_state",
           "torch_rng_state", "set_rng_state", "set_torch_rng_state", "save_checkpoint",
           "load_checkpoint"]

CHECKPOINT_FORMAT = "pyro-lvm-fit-checkpoint"
CHECKPOINT_VERSION = 1


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


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


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)



def fingerprint(x: torch.Tensor) -> List[float]:
    return [float(x.shape[0]), float(x.shape[1]), float(x.detach().double().sum())]


def save_checkpoint(path: pathlib.Path, payload: dict) -> None:
    """Write atomically: a crash or Ctrl-C mid-write leaves the previous checkpoint intact."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def load_checkpoint(path: pathlib.Path, config: dict) -> dict:
    try:
        # Our own file holds numpy/python RNG states, which weights_only loading refuses;
        # only load checkpoints you wrote (like any pickle).
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ValueError(f"checkpoint {str(path)!r} exists but could not be read ({exc}); "
                         f"delete it to start afresh") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{str(path)!r} is not a pyro-lvm fit checkpoint")
    saved = payload["config"]
    for key in ("num_data", "data_dim", "batch_size", "objective_name", "seed", "data_fingerprint",
                "has_module"):
        if saved.get(key) != config[key]:
            raise ValueError(
                f"checkpoint {str(path)!r} was written by a different fit ({key}: "
                f"{saved.get(key)!r} there, {config[key]!r} now); resuming it would mix two "
                f"fits. Use the same settings and data, or delete the file / pick another path")
    return payload
