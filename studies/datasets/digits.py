"""The embedded default: scikit-learn's 8x8 handwritten digits, binarized or continuous
(see :mod:`pyro_lvm.studies.datasets`)."""
from __future__ import annotations

import numpy as np

from pyro_lvm.studies.datasets.dataset import SPLITS, Dataset
from pyro_lvm.studies.datasets.transforms import (_apply_scaling, _drop_constant_columns,
                                                  _float32, _fmt_split, _limit_rows,
                                                  _split_indices)

DIGITS_THRESHOLD = 8.0  # pixels are 0..16; > 8 means "more ink than not"


def _load_digits(fractions, seed, binarize, threshold, scale, drop_constant, max_rows,
                 dequantize=False) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    raw = bunch.data.astype(np.float64)  # [1797, 64], values 0..16
    y = bunch.target.astype(np.int64)
    idx = _split_indices(raw.shape[0], fractions, seed)
    parts = {s: raw[i] for s, i in idx.items()}
    labels = {s: y[i] for s, i in idx.items()}
    # rows are cut before any statistic (constant columns, scaling) is computed on them
    parts, labels, _ = _limit_rows(parts, labels, max_rows)
    source = "scikit-learn load_digits (UCI optical digits, 8x8, values 0..16)"
    if binarize:
        if dequantize:
            raise ValueError("dequantize applies to continuous digits, not to binarized ones")
        thr = DIGITS_THRESHOLD if threshold is None else float(threshold)
        parts = {s: (a > thr).astype(np.float64) for s, a in parts.items()}
        source += f"; binarized: pixel > {thr:g}"
        if scale not in ("auto", None):
            raise ValueError(f"scale={scale!r} would make binarized digits non-binary; use scale=None")
        ds_name, scaling, kept, fill = "digits-binarized", None, None, None
    else:
        ds_name = "digits"
        if dequantize:
            noise = np.random.default_rng([seed, 1]).random(raw.shape)  # one draw per pixel
            parts = {s: parts[s] + noise[idx[s][:len(parts[s])]] for s in SPLITS}
            source += "; dequantized: pixel + U(0, 1)"
            ds_name = "digits-dequantized"
        drop = True if drop_constant is None else drop_constant
        method = "standardize" if scale == "auto" else scale
        parts, kept, fill, note = _drop_constant_columns(parts, drop, True, None)
        source += note
        parts, scaling = _apply_scaling(parts, method)
        if scaling is not None:
            source += f"; {method} with training-split statistics"
    source += (f"; first {max_rows} rows per split" if max_rows else "") + f"; shuffled with seed {seed}, split {_fmt_split(fractions)}"
    return Dataset(
        name=ds_name, **{s: _float32(parts[s]) for s in SPLITS}, labels=labels,
        image_shape=(8, 8), discrete=bool(binarize), source=source,
        feature_names=[f"pixel_{r}_{c}" for r in range(8) for c in range(8)]
        if kept is None else [f"pixel_{k // 8}_{k % 8}" for k in kept],
        kept_columns=kept, original_dim=64, fill_values=fill, scaling=scaling,
    )
