"""The user's own data: numpy arrays, torch tensors, pandas DataFrames, CSV / TSV / text and
``.npy`` files, as one table or a dict of splits; every piece is checked (non-numeric columns,
non-finite values with their rows, columns and file lines, widths, masks, values for the
observation model) before it is split, scaled and handed to the models."""
from __future__ import annotations

import os
import pathlib
from typing import Any, Dict, Mapping, Tuple, Union

import numpy as np
import torch

from pyro_lvm.models.validation import (check_binary, check_counts, check_data, check_magnitude,
                                        check_mask, constant_columns)
from pyro_lvm.studies.datasets.dataset import COUNT_LIKELIHOODS, SPLITS, Dataset
from pyro_lvm.studies.datasets.transforms import (_apply_scaling, _drop_constant_columns,
                                                  _float32, _fmt_split, _limit_rows,
                                                  _name_columns, _split_indices)

#: What user data may be given as (one table).
ArrayLike = Union[np.ndarray, torch.Tensor, "pandas.DataFrame", str, os.PathLike]


def _load_npy(path: pathlib.Path) -> np.ndarray:
    """A numeric ``.npy`` array; never unpickles (``allow_pickle=False``)."""
    with open(path, "rb") as handle:
        magic = handle.read(6)
    if magic != b"\x93NUMPY":
        raise ValueError(f"not a NumPy .npy file: {path}")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise ValueError(f"{path} holds Python objects, not numbers (object arrays are never "
                             f"loaded: they could run code); save a numeric array") from None
        raise ValueError(f"could not read {path} as a NumPy .npy file: {exc}") from None
    except (OSError, EOFError) as exc:
        raise ValueError(f"could not read {path} as a NumPy .npy file: {exc}") from None


def _looks_like_path(s: str) -> bool:
    return os.sep in s or "/" in s or pathlib.Path(s).suffix != "" or pathlib.Path(s).exists()


def _read_table(obj, label_column, what):
    """Return (float array or object array, column names or None, labels or None, source)."""
    import pandas as pd

    source = what
    if isinstance(obj, (str, os.PathLike)):
        path = pathlib.Path(obj).expanduser()
        if path.is_dir():
            raise ValueError(f"data path {path} is a directory; pass a .csv, .tsv, .txt or .npy "
                             f"file")
        if not path.is_file():
            raise FileNotFoundError(f"data file {path} does not exist")
        suffix = path.suffix.lower()
        if suffix in (".csv", ".tsv", ".txt"):
            try:
                obj = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",")
            except pd.errors.EmptyDataError:
                raise ValueError(f"{path} is empty: 0 data rows") from None
            except Exception as exc:
                raise ValueError(f"could not read {path} as CSV: {exc}") from None
            if len(obj) == 0:
                raise ValueError(f"{path} has 0 data rows (a header line and nothing else)")
            source = f"CSV file {path}"
        elif suffix == ".npy":
            obj = _load_npy(path)
            source = f"numpy file {path}"
        else:
            raise ValueError(f"unsupported data file {path}: use .csv, .tsv, .txt or .npy")
    labels = None
    if isinstance(obj, pd.DataFrame):
        df = obj
        if label_column is not None:
            if label_column not in df.columns:
                raise ValueError(f"label_column {label_column!r} is not a column of the {what}; "
                                 f"columns: {list(df.columns)}")
            labels = df[label_column].to_numpy()
            df = df.drop(columns=[label_column])
        names = [str(c) for c in df.columns]
        bad = [(c, df[c]) for c in df.columns
               if not (pd.api.types.is_numeric_dtype(df[c]) or pd.api.types.is_bool_dtype(df[c]))]
        if bad:
            desc = "; ".join(
                f"column {str(c)!r} (dtype {s.dtype}, e.g. {s.dropna().iloc[0]!r})" if s.notna().any()
                else f"column {str(c)!r} (dtype {s.dtype})" for c, s in bad)
            raise ValueError(
                f"the {source} has non-numeric column(s): {desc}; encode them as numbers (e.g. "
                f"pandas.get_dummies), drop them, or pass label_column= (--label-column) for a "
                f"label column"
            )
        arr = df.to_numpy(dtype=np.float64, na_value=np.nan)
        line_offset = 2 if source.startswith("CSV") else None  # header line + 1-based lines
        return arr, names, labels, source, line_offset
    if label_column is not None:
        raise ValueError("label_column= needs a DataFrame or CSV file; pass labels= for arrays")
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().numpy()
    return obj, None, labels, source, None


def _load_user(data, fractions, seed, binarize, threshold, scale, likelihood, mask,
               allow_missing, drop_constant, max_rows, labels, label_column, name) -> Dataset:
    """User data: read and check every piece (:func:`_read_piece`), split it
    (:func:`_user_splits`), then cut rows, binarize, handle constant columns and scale."""
    fixed, pieces = _user_pieces(data)
    if name is None:
        first = pieces.get("train", pieces.get("data"))
        name = (pathlib.Path(first).stem if isinstance(first, (str, os.PathLike)) else "user-data")

    arrays, masks, label_arrays, sources, names = {}, {}, {}, [], None
    width = None
    for key, obj in pieces.items():
        x, x_mask, cols, lab, source = _read_piece(
            key, obj, width, names, fixed=fixed, mask=mask, allow_missing=allow_missing,
            label_column=label_column, scale=scale, binarize=binarize, likelihood=likelihood,
            name=name)
        sources.append(source)
        if width is None:
            width = x.shape[1]
            names = cols
        arrays[key] = x
        masks[key] = x_mask
        if lab is not None:
            label_arrays[key] = np.asarray(lab)
    label_arrays = _user_labels(labels, label_column, label_arrays, arrays)
    parts, part_masks, part_labels, source = _user_splits(
        arrays, masks, label_arrays, sources, fixed=fixed, fractions=fractions, seed=seed,
        width=width, name=name)

    parts, part_labels, part_masks = _limit_rows(parts, part_labels, max_rows, part_masks)
    if max_rows:
        source += f"; first {max_rows} rows per split"
    if binarize:
        thr = 0.5 if threshold is None else float(threshold)
        parts = {s: (a > thr).astype(np.float64) for s, a in parts.items()}
        source += f"; binarized: x > {thr:g}"
    method = None if scale == "auto" else scale
    if binarize and method is not None:
        raise ValueError(f"scale={scale!r} would make binarized data non-binary; use scale=None")
    parts, part_masks, names, kept, fill, note = _user_constant_columns(
        parts, part_masks, names, drop_constant=drop_constant, method=method,
        likelihood=likelihood, name=name)
    source += note
    parts, scaling = _apply_scaling(parts, method, part_masks)
    if scaling is not None:
        source += f"; {method} with training-split statistics"
        for split in SPLITS:  # e.g. a test value far outside the training range
            check_magnitude(parts[split], torch.float32, name=f"{name} {split} split (scaled)")
    discrete = bool(binarize) or all(np.isin(a, (0.0, 1.0)).all() for a in parts.values())
    return Dataset(
        name=name, **{s: _float32(parts[s]) for s in SPLITS}, labels=part_labels,
        masks=None if part_masks is None else {s: torch.as_tensor(m, dtype=torch.bool) for s, m in part_masks.items()},
        discrete=bool(discrete), source=source, feature_names=names, kept_columns=kept,
        original_dim=width, fill_values=fill, scaling=scaling,
    )


def _user_pieces(data) -> Tuple[bool, Dict[str, Any]]:
    """``(fixed, pieces)``: a dict of splits (a fixed split, keys checked) or one table to
    split (``{"data": data}``)."""
    if isinstance(data, Mapping):
        unknown = set(data) - set(SPLITS)
        if unknown or "train" not in data or "test" not in data:
            raise ValueError(f"a dict of splits needs keys 'train' and 'test' (and optionally "
                             f"'valid'); got {sorted(map(str, data))}")
        return True, {s: data[s] for s in SPLITS if s in data}
    return False, {"data": data}


def _read_piece(key, obj, width, names, *, fixed, mask, allow_missing, label_column, scale,
                binarize, likelihood, name):
    """Read one piece of user data (a split, or the one table) and check it: its mask, its
    non-finite values, its width and column names against the first piece (``width``,
    ``names``; None for the first), its magnitude, and its values for a count or Bernoulli
    model. Returns ``(x float64 array, mask or None, column names, labels, source)``."""
    what = "data" if key == "data" else f"{key} split"
    arr, cols, lab, source, line_offset = _read_table(obj, label_column, what)
    x_mask = None
    if mask is not None:
        if fixed != isinstance(mask, Mapping):
            raise ValueError("pass mask as a dict of splits exactly when the data are a dict of splits")
        x_mask = mask.get(key) if fixed else mask
        if x_mask is not None:
            x_mask = check_mask(x_mask, np.shape(arr), name=f"{name} {what}")
    arr_np = np.asarray(arr)
    # Non-finite values are reported here with column names and CSV lines (check_data
    # would report positional indices only); NaN becomes 'missing' when allowed.
    if arr_np.dtype != object and np.issubdtype(arr_np.dtype, np.number) and arr_np.ndim == 2:
        arr_np = arr_np.astype(np.float64)
        if allow_missing:
            nan_mask = ~np.isnan(arr_np)
            x_mask = nan_mask if x_mask is None else (x_mask & nan_mask)
        _report_nonfinite(arr_np, x_mask, cols, line_offset, source, allow_missing)
    x = check_data(arr_np, width, name=f"{name} {what}", min_rows=1 if fixed else 3,
                   mask=x_mask, dtype=torch.float64)
    if scale in (None, "auto") and not binarize:  # stored as float32 as they are
        check_magnitude(x, torch.float32, name=f"{name} {what}")
    if width is not None and cols is not None and names is not None and cols != names:
        raise ValueError(f"the {what} has columns {cols}, the train split {names}")
    if likelihood in COUNT_LIKELIHOODS and not binarize:
        # before the shuffle, so rows in the message are the user's own rows
        check_counts(x, name=f"{name} {what}", model=likelihood,
                     mask=None if x_mask is None else torch.as_tensor(x_mask))
    if likelihood == "bernoulli" and not binarize:
        # before the shuffle, so rows in the message are the user's own rows
        check_binary(x, name=f"{name} {what}", mask=None if x_mask is None else torch.as_tensor(x_mask))
    x_mask = None if x_mask is None else check_mask(x_mask, x.shape, name=what)
    return x.numpy(), x_mask, cols, lab, source


def _user_labels(labels, label_column, from_columns, arrays):
    """Labels per piece: ``labels=`` (one per row, or a dict per split) or those read from
    ``label_column`` (``from_columns``); each checked against its piece's rows."""
    if labels is not None:
        if label_column is not None:
            raise ValueError("pass either labels= or label_column=, not both")
        from_columns = dict(labels) if isinstance(labels, Mapping) else {"data": np.asarray(labels)}
    for key, lab in from_columns.items():
        if key not in arrays or len(lab) != arrays[key].shape[0]:
            raise ValueError(f"labels for {key!r} have {len(lab)} entries but the data have "
                             f"{arrays[key].shape[0] if key in arrays else 0} rows")
    return from_columns


def _user_splits(arrays, masks, label_arrays, sources, *, fixed, fractions, seed, width, name):
    """The train / validation / test parts, masks and labels: the user's own split
    (``fixed``; a missing validation split has 0 rows) or one table shuffled with ``seed`` and
    cut by ``fractions``. Returns ``(parts, masks or None, labels or None, source)``."""
    if fixed:
        parts = {s: arrays.get(s, np.empty((0, width))) for s in SPLITS}
        part_masks = {s: masks.get(s) for s in SPLITS} if any(m is not None for m in masks.values()) else None
        if part_masks is not None:
            part_masks = {s: (np.ones(parts[s].shape, bool) if m is None else m) for s, m in part_masks.items()}
        part_labels = {s: label_arrays[s] for s in SPLITS if s in label_arrays} or None
        source = "; ".join(f"{s}: {src}" for s, src in zip(arrays, sources)) + "; fixed split"
        return parts, part_masks, part_labels, source
    n = arrays["data"].shape[0]
    idx = _split_indices(n, fractions, seed)
    parts = {s: arrays["data"][i] for s, i in idx.items()}
    part_masks = None if masks["data"] is None else {s: masks["data"][i] for s, i in idx.items()}
    part_labels = None if "data" not in label_arrays else {s: label_arrays["data"][i] for s, i in idx.items()}
    source = f"{sources[0]}; shuffled with seed {seed}, split {_fmt_split(fractions)}"
    if part_masks is not None:
        for s in SPLITS:
            if part_masks[s].shape[0]:
                check_mask(part_masks[s], parts[s].shape, name=f"{name} {s} split")
    return parts, part_masks, part_labels, source


def _user_constant_columns(parts, masks, names, *, drop_constant, method, likelihood, name):
    """Columns constant in the training split: dropped with ``drop_constant``, otherwise an
    error naming them where they break the model (Gaussian / Student-t) or the scaling.
    Returns ``(parts, masks, names, kept or None, fill values or None, note)``."""
    if drop_constant:
        parts, kept, fill, note = _drop_constant_columns(parts, True, True, masks, names)
        if kept is not None:
            names = None if names is None else [names[k] for k in kept]
            if masks is not None:
                masks = {s: m[:, kept] for s, m in masks.items()}
        return parts, masks, names, kept, fill, note
    if method is not None or likelihood in ("gaussian", "studentt"):
        const = constant_columns(parts["train"], None if masks is None else masks["train"])
        if len(const):
            why = (f"a {likelihood} observation model has an unbounded likelihood on it"
                   if likelihood in ("gaussian", "studentt") else f"scale={method!r} divides by its spread")
            raise ValueError(
                f"{name}: column(s) {_name_columns(const, names)} are constant in the training "
                f"split ({parts['train'].shape[0]} rows); {why}. Drop them (drop_constant=True)."
            )
    return parts, masks, names, None, None, ""


def _report_nonfinite(arr, mask, cols, line_offset, source, allow_missing):
    bad = ~np.isfinite(arr)
    if mask is not None:
        bad &= mask
    if not bad.any():
        return
    rows, cc = np.nonzero(bad)
    where = []
    for r, c in list(zip(rows, cc))[:5]:
        row = f"row {r}" + (f" (line {r + line_offset} of the file)" if line_offset else "")
        col = f"column {c}" + (f" {cols[c]!r}" if cols is not None else "")
        where.append(f"{row}, {col}: {arr[r, c]}")
    more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
    hint = ("infinite values are not missing values; fix or drop them" if allow_missing
            else "pass allow_missing=True (--allow-missing) to treat NaN as missing (a mask), or "
                  "clean the data")
    raise ValueError(f"the {source} contains {len(rows)} non-finite value(s): "
                     f"{'; '.join(where)}{more}; {hint}")

