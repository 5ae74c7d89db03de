"""Steps shared by the loaders: the seeded train / validation / test split, row limits,
dropping training-constant columns, scaling with training-split statistics, and the
``float32`` tensors the models see."""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import torch

from pyro_lvm.models.validation import constant_columns


def _check_split(split) -> Tuple[float, float, float]:
    try:
        fr = tuple(float(f) for f in split)
    except TypeError:
        raise ValueError(f"split must be three fractions (train, valid, test), got {split!r}") from None
    if len(fr) != 3 or any(f < 0 for f in fr) or abs(sum(fr) - 1) > 1e-6 or fr[0] == 0 or fr[2] == 0:
        raise ValueError(f"split must be three non-negative fractions (train, valid, test) summing to 1 "
                         f"with train and test > 0, got {split!r}")
    return fr


def _fmt_split(fr) -> str:
    return "/".join(f"{100 * f:g}%" for f in fr)


def _split_indices(n: int, fractions, seed: int) -> Dict[str, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    n_test = max(1, int(round(fractions[2] * n)))
    n_valid = int(round(fractions[1] * n))
    n_train = n - n_test - n_valid
    if n_train < 2:
        raise ValueError(f"{n} rows are too few to split {_fmt_split(fractions)} "
                         f"(train would have {n_train} rows)")
    return {"train": perm[:n_train], "valid": perm[n_train:n_train + n_valid],
            "test": perm[n_train + n_valid:]}


def _name_columns(cols, names) -> str:
    return ", ".join(f"{c}" + (f" {names[c]!r}" if names is not None else "") for c in cols[:10]) + \
        (f" and {len(cols) - 10} more" if len(cols) > 10 else "")


def _drop_constant_columns(parts, drop, needed, masks=None, names=None):
    """Drop training-constant columns. Returns (parts, kept or None, fill values, note)."""
    const = constant_columns(parts["train"], None if masks is None else masks["train"])
    if not len(const) or not (drop and needed):
        return parts, None, None, ""
    p = parts["train"].shape[1]
    kept = np.setdiff1d(np.arange(p), const)
    if len(kept) == 0:
        raise ValueError("every column is constant in the training split; nothing to model")
    fill = parts["train"][0, const].copy() if parts["train"].shape[0] else np.zeros(len(const))
    note = f"; dropped {len(const)} column(s) constant in the training split ({_name_columns(const, names)})"
    return {s: a[:, kept] for s, a in parts.items()}, kept, fill, note


def _apply_scaling(parts, method, masks=None):
    if method is None:
        return parts, None
    train = parts["train"]
    obs = np.ones_like(train, dtype=bool) if masks is None else masks["train"]
    tr = np.where(obs, train, np.nan)
    if method == "standardize":
        loc = np.nanmean(tr, axis=0)
        spread = np.nanstd(tr, axis=0)
    elif method == "minmax":
        loc = np.nanmin(tr, axis=0)
        spread = np.nanmax(tr, axis=0) - loc
    else:
        raise ValueError(f"unknown scale {method!r}")
    if np.any(~(spread > 0)):
        bad = np.nonzero(~(spread > 0))[0]
        raise ValueError(f"column(s) {bad[:10].tolist()} are constant in the training split; "
                         f"scale={method!r} cannot divide by 0 (drop_constant=True drops them)")
    out = {}
    for s, a in parts.items():
        z = (a - loc) / spread
        if masks is not None:
            z = np.where(masks[s], z, 0.0)  # missing entries stay 0, as check_data leaves them
        out[s] = z
    return out, {"method": method, "loc": loc, "scale": spread}


def _limit_rows(parts, labels, max_rows, masks=None):
    """Keep the first ``max_rows`` rows of every split (parts, labels and masks)."""
    if max_rows is not None:
        parts = {s: a[:max_rows] for s, a in parts.items()}
        labels = None if labels is None else {s: a[:max_rows] for s, a in labels.items()}
        masks = None if masks is None else {s: m[:max_rows] for s, m in masks.items()}
    return parts, labels, masks


def _float32(a: np.ndarray) -> torch.Tensor:
    # a fresh, writable, C-contiguous copy (pandas may hand out read-only views)
    return torch.from_numpy(np.array(a, dtype=np.float32, order="C"))

