"""Input validation shared by every model family, the fitting loop and the data loaders.

Every check raises :class:`ValueError` naming what is wrong and where (row, column),
*before* any work is done, so a long fit never dies halfway on bad data.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from pyro.infer.util import is_validation_enabled

__all__ = ["check_data", "check_mask", "check_binary", "check_counts", "constant_columns",
           "check_column_variance", "per_call_data_checks", "positive_int",
           "check_magnitude", "FLOAT32_SAFE_MAX"]

#: The largest |x| accepted for float32 (or narrower) models: a Gaussian or Student-t log
#: density squares its data and sums over columns, and float32 overflows above 3.4e38,
#: i.e. at |x| of about 1.8e19; the margin leaves room for sums over many columns.
FLOAT32_SAFE_MAX = 1e16

def per_call_data_checks() -> bool:
    """Whether a model should check its input on this call: whenever Pyro's validation is on.

    There is no way for a caller to switch these checks off while validation stays on (no
    hidden flag changes how a model behaves): they cost one pass over the batch (about 20 us
    for 100 x 784 on a CPU core), and without them a direct call such as
    ``log_weights(dlvm.model, dlvm.guide, x)`` would score values outside the observation
    model's support instead of refusing them. ``pyro.enable_validation(False)`` turns them off
    together with Pyro's own checks."""
    return is_validation_enabled()


def positive_int(value, what: str) -> int:
    """``value`` if it is a positive ``int`` (booleans refused), else ValueError naming ``what``
    (the option checks of the models' constructors)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value


def _first_bad(bad: np.ndarray, limit: int = 5) -> str:
    rows, cols = np.nonzero(bad)
    where = ", ".join(f"(row {r}, column {c})" for r, c in zip(rows[:limit], cols[:limit]))
    more = f" and {len(rows) - limit} more" if len(rows) > limit else ""
    return where + more


def check_data(
    x,
    data_dim: Optional[int] = None,
    *,
    name: str = "data",
    min_rows: int = 1,
    mask=None,
    dtype: Optional[torch.dtype] = None,
    integer_values: bool = False,
) -> torch.Tensor:
    """Validate a data matrix and return it as a floating point tensor.

    Parameters
    ----------
    x : array-like or torch.Tensor, shape (n, p)
        Numeric data. Booleans and integers are rejected unless they are 0/1 (binary data,
        converted to float); anything non-numeric is rejected.
    data_dim : int, optional
        Expected number of columns ``p``.
    name : str
        What to call the array in messages.
    min_rows : int
        Minimum number of rows.
    mask : array-like of bool, optional
        Observed-entry mask; entries where ``mask`` is False may hold NaN (they are
        replaced by 0 in the returned tensor and never enter a likelihood).
    dtype : torch.dtype, optional
        Floating dtype of the result; defaults to ``x``'s own floating dtype or
        ``torch.get_default_dtype()``.
    integer_values : bool
        Accept integer data of any value (converted to float), for models of counts, whose
        likelihood checks the values itself; otherwise integers other than 0/1 are refused.

    Raises
    ------
    ValueError
        Non-numeric values, wrong number of dimensions or columns, too few rows,
        NaN or infinite values (with their rows and columns).
    """
    if isinstance(x, torch.Tensor) and x.is_floating_point() and not x.is_complex():
        return _check_float_tensor(x, data_dim, name=name, min_rows=min_rows, mask=mask,
                                   dtype=dtype)
    if isinstance(x, torch.Tensor):
        arr = x.detach().cpu().numpy()
        src_dtype = x.dtype if x.is_floating_point() else None
    else:
        try:
            arr = np.asarray(x)
        except Exception as exc:  # ragged lists and the like
            raise ValueError(f"{name} could not be read as a numeric array: {exc}") from None
        src_dtype = None
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(
            f"{name} must be numeric, got dtype {arr.dtype}; convert it (e.g. "
            f"pandas.get_dummies for categorical columns) before fitting"
        )
    if np.iscomplexobj(arr):
        raise ValueError(f"{name} must be real-valued, got complex dtype {arr.dtype}")
    _check_shape(tuple(arr.shape), data_dim, name=name, min_rows=min_rows)
    if not np.issubdtype(arr.dtype, np.floating) and not integer_values:
        vals = np.unique(arr)
        if not np.all(np.isin(vals, [0, 1])):
            raise ValueError(
                f"{name} has integer dtype {arr.dtype} with values other than 0/1 "
                f"(e.g. {vals[~np.isin(vals, [0, 1])][:3].tolist()}); pass floating point data "
                f"for a continuous model, or 0/1 data for binary models (count models, e.g. "
                f"likelihood='poisson', 'negbinomial' or 'binomial' and PoissonPCA, take integer "
                f"counts as they are)"
            )
    arr = arr.astype(np.float64, copy=False)
    if not arr.flags.writeable:
        # e.g. np.asarray of a pandas DataFrame under copy-on-write; torch warns on read-only arrays
        arr = arr.copy()
    mask_arr = None
    if mask is not None:
        mask_arr = check_mask(mask, arr.shape, name=name)
    finite = np.isfinite(arr)
    bad = ~finite if mask_arr is None else (~finite & mask_arr)
    if bad.any():
        kind = "NaN" if np.isnan(arr[bad]).any() else "infinite"
        raise ValueError(
            f"{name} contains {int(bad.sum())} {kind}/non-finite value(s) at {_first_bad(bad)}"
            + ("" if mask_arr is not None else "; pass mask= to mark missing entries instead")
        )
    if mask_arr is not None:
        arr = np.where(mask_arr, arr, 0.0)
    out_dtype = dtype or src_dtype or torch.get_default_dtype()
    check_magnitude(arr, out_dtype, name=name)
    if isinstance(x, torch.Tensor) and mask_arr is None and x.dtype == out_dtype:
        return x
    out = torch.as_tensor(arr, dtype=out_dtype)
    if isinstance(x, torch.Tensor):
        out = out.to(x.device)
    return out


def _check_shape(shape: tuple, data_dim: Optional[int], *, name: str, min_rows: int) -> None:
    if len(shape) != 2:
        raise ValueError(f"{name} must be a 2-D array (rows x features), got shape {shape}")
    n, p = shape
    if data_dim is not None and p != data_dim:
        raise ValueError(f"{name} has {p} columns but the model expects data_dim={data_dim}")
    if n < min_rows:
        raise ValueError(f"{name} has {n} row(s); at least {min_rows} are needed")


def _check_float_tensor(x: torch.Tensor, data_dim: Optional[int], *, name: str, min_rows: int,
                        mask, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """:func:`check_data` for a floating-point tensor, checked where it lives (no float64 copy
    of the whole array: on 50,000 x 784 MNIST rows the copy cost about a second)."""
    _check_shape(tuple(x.shape), data_dim, name=name, min_rows=min_rows)
    x = x.detach()
    mask_t = None
    if mask is not None:
        mask_t = torch.as_tensor(check_mask(mask, tuple(x.shape), name=name), device=x.device)
    bad = ~torch.isfinite(x)
    if mask_t is not None:
        bad &= mask_t
    if bool(bad.any()):
        bad_np = bad.cpu().numpy()
        kind = "NaN" if bool(torch.isnan(x[bad]).any()) else "infinite"
        raise ValueError(
            f"{name} contains {int(bad_np.sum())} {kind}/non-finite value(s) at "
            f"{_first_bad(bad_np)}"
            + ("" if mask_t is not None else "; pass mask= to mark missing entries instead")
        )
    out_dtype = dtype or x.dtype
    if mask_t is not None:
        x = torch.where(mask_t, x, torch.zeros((), dtype=x.dtype, device=x.device))
    check_magnitude(x, out_dtype, name=name)
    return x if x.dtype == out_dtype else x.to(out_dtype)


def check_magnitude(x, dtype: torch.dtype, *, name: str = "data") -> None:
    """Raise ValueError when finite values of ``x`` (array or tensor, missing entries zeroed)
    are too large for arithmetic in ``dtype`` (float32 and narrower: |x| > FLOAT32_SAFE_MAX),
    naming their rows and columns; the data would fit with non-finite objectives."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return
    if isinstance(x, torch.Tensor):
        big = x.abs() > FLOAT32_SAFE_MAX
        if not bool(big.any()):
            return
        big = big.cpu().numpy()
    else:
        big = np.abs(x) > FLOAT32_SAFE_MAX
        if not big.any():
            return
    raise ValueError(
        f"{name} has {int(big.sum())} value(s) too large for {str(dtype).replace('torch.', '')} "
        f"arithmetic (|x| > {FLOAT32_SAFE_MAX:g}: their squares overflow) at {_first_bad(big)}; "
        f"rescale the data (e.g. standardize them) or fit in float64 (model.double())")


def check_mask(mask, shape, *, name: str = "data") -> np.ndarray:
    """Validate an observed-entry mask (True = observed) against the data shape."""
    m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if m.shape != tuple(shape):
        raise ValueError(f"mask for {name} has shape {m.shape}, expected {tuple(shape)}")
    if m.dtype != bool:
        if not np.all(np.isin(np.unique(m), [0, 1])):
            raise ValueError(f"mask for {name} must be boolean (True = observed)")
        m = m.astype(bool)
    empty = np.nonzero(~m.any(axis=1))[0]
    if len(empty):
        raise ValueError(
            f"mask for {name} leaves {len(empty)} row(s) with no observed entry "
            f"(first: row {empty[0]}); drop those rows"
        )
    return m


def check_binary(x: torch.Tensor, *, name: str = "data", allow_fractional: bool = False,
                 mask: Optional[torch.Tensor] = None) -> None:
    """Raise ValueError unless ``x`` is in {0, 1} (or [0, 1] when ``allow_fractional``)."""
    if allow_fractional:
        bad = (x < 0) | (x > 1)
        what = "outside [0, 1]"
    else:
        # x (1 - x) is 0 exactly for x in {0, 1}, nonzero or NaN otherwise: one cheap pass
        # decides the common all-valid case; the exact test locates the values
        bad = None if mask is None and not bool((x * (1 - x)).any()) else (x != 0) & (x != 1)
        what = "outside {0, 1}"
        if bad is None:
            return
    if mask is not None:
        bad = bad & mask.bool()
    if bool(bad.any()):
        b = bad.detach().cpu().numpy()
        raise ValueError(
            f"{name} has {int(b.sum())} value(s) {what} for a Bernoulli observation model, at "
            f"{_first_bad(b)} (e.g. {x[bad][:3].tolist()}); "
            f"binarize the data, use a Gaussian/Student-t likelihood"
            + ("" if allow_fractional else ", or pass allow_fractional=True for values in [0, 1]")
        )


def check_counts(x: torch.Tensor, *, name: str = "data", total_count=None,
                 mask: Optional[torch.Tensor] = None, model: str = "count") -> None:
    """Raise ValueError unless every observed entry of ``x`` is a non-negative integer and, when
    ``total_count`` (a number or a per-column tensor) is given, at most ``total_count``. The
    message names the first offending (row, column) pairs."""
    observed = None if mask is None else mask.bool()
    checks = [((x < 0) | (x != torch.round(x)), "that are not non-negative integers",
               "count models need counts (use a Gaussian/Student-t likelihood for continuous data)")]
    if total_count is not None:
        limit = torch.as_tensor(total_count, dtype=x.dtype, device=x.device)
        checks.append((x > limit, "above total_count",
                       "set total_count to the largest possible count"))
    for bad, what, hint in checks:
        if observed is not None:
            bad = bad & observed
        if bool(bad.any()):
            b = bad.detach().cpu().numpy()
            raise ValueError(
                f"{name} has {int(b.sum())} value(s) {what} for a {model} observation model, "
                f"at {_first_bad(b)} (e.g. {x[bad][:3].tolist()}); {hint}"
            )


def constant_columns(x, mask=None) -> np.ndarray:
    """Indices of the columns of ``x`` whose observed entries (``mask`` True) are all equal."""
    x = np.asarray(x.detach().cpu().numpy() if torch.is_tensor(x) else x, dtype=float)
    if mask is None:
        return np.nonzero(np.ptp(x, axis=0) == 0)[0]
    m = np.asarray(mask.detach().cpu().numpy() if torch.is_tensor(mask) else mask, dtype=bool)
    hi = np.where(m, x, -np.inf).max(0)
    lo = np.where(m, x, np.inf).min(0)
    return np.nonzero(~(hi > lo))[0]


def check_column_variance(x, mask=None, *, name: str = "data", model: str = "gaussian",
                          feature_names=None) -> None:
    """Refuse training data with a constant column under a model with a learnable
    observation scale (Gaussian, Student-t, factor analysis): the likelihood there grows
    without bound as the scale shrinks (to the scale floor), a number without meaning.
    Used on the whole training split by the loaders and by ``fit`` alike."""
    const = constant_columns(x, mask)
    if len(const):
        named = ", ".join(f"{c}" + (f" {feature_names[c]!r}" if feature_names is not None else "")
                          for c in const[:10]) + (f" and {len(const) - 10} more"
                                                   if len(const) > 10 else "")
        raise ValueError(
            f"{name} has constant column(s) {named}; a {model} observation model has an "
            f"unbounded likelihood there (its scale can shrink to the floor); drop them "
            f"(drop_constant=True in the loaders)")
